//! Conversation and participant identifiers.
//!
//! Both are 1–128 characters of `[A-Za-z0-9_.:@-]` (PROTOCOL.md). They are validated once, at the
//! edge, and carried as a cheap-to-clone `Arc<str>` afterwards so the hot path never re-validates
//! or re-allocates them.

use std::fmt;
use std::sync::Arc;

/// Longest id accepted, in bytes (all accepted characters are ASCII).
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} id must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_.:@-]")]
    Invalid { what: &'static str },
}

fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, IdError> {
                if valid(s) {
                    Ok(Self(Arc::from(s)))
                } else {
                    Err(IdError::Invalid { what: $what })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(ConversationId, "conversation");
id_type!(ParticipantId, "participant");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(ConversationId::parse("a").is_ok());
        assert!(ConversationId::parse("Room_1.general:x@y-z").is_ok());
        assert!(ConversationId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "a b", "a/b", "é", "a#", "a\n", "a?b", "a%20"] {
            assert!(ConversationId::parse(bad).is_err(), "{bad:?} accepted");
            assert!(ParticipantId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ConversationId::parse(&"x".repeat(129)).is_err());
    }
}
