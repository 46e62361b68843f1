//! The archive as this crate sees it: a trait the node implements over SQL (SQLite embedded,
//! Postgres in production). This crate never names a database; it asks for what it needs to
//! rebuild a conversation's state and to hand durable messages off.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::conversation_log::DedupeEntry;
use crate::ids::{ConversationId, ParticipantId};
use crate::record::Message;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ArchiveError {
    /// The archive cannot be reached or refused the statement; retry later.
    #[error("archive unavailable: {0}")]
    Unavailable(String),
    /// The archive holds something this node cannot read.
    #[error("archive data invalid: {0}")]
    Invalid(String),
}

/// A conversation's durable description.
#[derive(Debug, Clone)]
pub struct ConversationMeta {
    pub id: ConversationId,
    pub participants: Vec<ParticipantId>,
    pub metadata: Box<RawValue>,
    pub created_at_ms: i64,
}

impl ConversationMeta {
    pub fn has_participant(&self, who: &str) -> bool {
        self.participants.iter().any(|p| p.as_str() == who)
    }
}

/// What a conversation actor needs from the archive when it starts.
#[derive(Debug, Clone)]
pub struct ConversationSnapshot {
    pub meta: ConversationMeta,
    /// Highest archived seq (0 if none).
    pub last_seq: u64,
    /// The most recent idempotency keys, oldest first.
    pub recent_keys: Vec<(String, DedupeEntry)>,
}

/// What a reader needs to know of a conversation the node holds nothing of in memory.
#[derive(Debug, Clone)]
pub struct ConversationSummary {
    pub meta: ConversationMeta,
    /// Highest archived seq (0 if none).
    pub last_seq: u64,
}

/// What a restore did with each message it was given (by seq).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    /// Written into their reserved seqs.
    pub restored: Vec<u64>,
    /// Already there (same seq, same id): an earlier restore wrote them.
    pub present: Vec<u64>,
    /// Not stored: the conversation already holds their idempotency key (a retry was taken by a
    /// live node meanwhile); their reserved seqs stay empty.
    pub duplicates: Vec<u64>,
    /// Not stored: no reservation for this node covers the seq, or another message holds it.
    /// Kept aside (`orphaned_messages`) and logged as errors.
    pub orphaned: Vec<u64>,
    /// Not stored: the slot was failed over from this node without reserved seqs (it ran
    /// `durability = "archive"`), so what SQL lacks of it was never acknowledged.
    #[serde(default)]
    pub unacknowledged: Vec<u64>,
}

pub trait Archive: Send + Sync + 'static {
    /// Loads what a starting conversation actor needs; `None` if the conversation does not exist.
    fn load_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
        dedupe_window: usize,
    ) -> BoxFuture<'a, Result<Option<ConversationSnapshot>, ArchiveError>>;

    /// The description and last archived seq, for a reader that starts no actor; `None` if the
    /// conversation does not exist. The default loads a snapshot without idempotency keys.
    fn describe_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
    ) -> BoxFuture<'a, Result<Option<ConversationSummary>, ArchiveError>> {
        Box::pin(async move {
            Ok(self
                .load_conversation(id, 0)
                .await?
                .map(|snapshot| ConversationSummary {
                    meta: snapshot.meta,
                    last_seq: snapshot.last_seq,
                }))
        })
    }

    /// Stores messages (any conversations, in WAL order) in one transaction. Must be idempotent:
    /// a message already stored under its (conversation_id, seq) is left as it is.
    fn store_messages<'a>(
        &'a self,
        messages: &'a [Arc<Message>],
    ) -> BoxFuture<'a, Result<(), ArchiveError>>;

    /// How many `store_messages` calls the archiver may have in flight at once (each on later
    /// messages than the one before). A backend whose writers serialize anyway (SQLite) says 1;
    /// one that inserts in parallel (Postgres, one transaction per connection) may say more.
    /// Calls may complete out of order; the archiver only counts a batch as archived once every
    /// batch before it is.
    fn max_concurrent_batches(&self) -> usize {
        1
    }

    /// Archived messages with `after_seq < seq < before_seq`, ascending; the first `limit` of them
    /// when `newest_first` is false, the last `limit` (still returned ascending) when it is true.
    fn read_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ArchiveError>>;

    /// Writes `messages` of conversation `id`, which node `node_id` acknowledged before their
    /// slot was failed over, into the seqs reserved for that node, in one transaction; never any
    /// other seq. A message whose idempotency key the archive holds, or is in `known_keys` (keys
    /// the caller holds beyond what the archive has), is not stored. Only a clustered archive
    /// keeps reserved seqs; the default refuses.
    fn restore_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        node_id: &'a str,
        messages: &'a [Arc<Message>],
        known_keys: &'a HashSet<String>,
    ) -> BoxFuture<'a, Result<Restored, ArchiveError>> {
        let _ = (id, node_id, messages, known_keys);
        Box::pin(async {
            Err(ArchiveError::Unavailable(
                "this archive keeps no reserved seqs".to_owned(),
            ))
        })
    }
}
