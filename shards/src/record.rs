//! The message record and its byte encoding inside a WAL frame's payload.
//!
//! The WAL frames are opaque to this module and this module knows nothing of frames: it encodes a
//! [`Message`] into the payload bytes (see `docs/log-format.md`, "Payload") and decodes them back.
//! Content and metadata are kept as the client's JSON text (validated once at the edge), so the
//! hot path never re-parses or re-serialises them.

use std::sync::{Arc, OnceLock};

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::ids::{ConversationId, ParticipantId};

/// WAL record kind of a message, as written: the payload carries the slot's ownership epoch.
pub const KIND_MESSAGE: u8 = 2;
/// The first message kind, without the epoch. Still read (a log written before the epoch was
/// recorded), and the record layout of cold-tier segments.
pub const KIND_MESSAGE_V1: u8 = 1;

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// Longest message `kind`, in bytes.
pub const MAX_KIND_BYTES: usize = 64;

/// One durable message of a conversation.
#[derive(Debug, Clone)]
pub struct Message {
    pub conversation_id: ConversationId,
    /// Slot of the conversation when the message was written (recorded for operators and moves).
    pub slot: u32,
    /// The slot's ownership epoch under which the owner wrote the message; `0` where it is not
    /// known (a kind-1 record, or a message read back from the archive).
    pub epoch: u64,
    pub seq: u64,
    /// Server-assigned UUIDv7.
    pub id: Uuid,
    /// Milliseconds since the Unix epoch, UTC.
    pub created_at_ms: i64,
    pub sender: ParticipantId,
    pub kind: Box<str>,
    pub content: Box<RawValue>,
    /// Always a JSON object.
    pub metadata: Box<RawValue>,
    pub idempotency_key: Option<Box<str>>,
    /// The message's JSON (its `Serialize` output) without its `content`, rendered on first use
    /// and kept: a message pushed to many subscribers is serialized once, not once per socket,
    /// and its content (most of its bytes) is held once, in `content`. See
    /// [`Message::json_parts`]. Construct with `Default::default()`.
    pub rendered: OnceLock<Rendered>,
}

/// A [`Message`]'s JSON around its `content`: everything before it, then everything after it.
#[derive(Debug, Clone)]
pub struct Rendered {
    around: Box<str>,
    /// Where `content` goes in `around`.
    split: u32,
    /// Where the id's text starts in `around` (`u16::MAX` if it lay beyond: ids are short, so
    /// it never does), and how long the time's text is; it ends two bytes before `around` does.
    /// Both fit beside `split`: the struct is no larger for them.
    id_at: u16,
    time_len: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record payload truncated at byte {0}")]
    Truncated(usize),
    #[error("record payload field {0} is invalid")]
    Invalid(&'static str),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

impl Message {
    /// The message as JSON (what its `Serialize` writes) in three pieces, written one after
    /// the other: what comes before `content`, `content`, and what comes after it. Rendered once.
    pub fn json_parts(&self) -> [&str; 3] {
        let rendered = self.rendered.get_or_init(|| self.render());
        let (head, tail) = rendered.around.split_at(rendered.split as usize);
        [head, self.content.get(), tail]
    }

    /// The id and the time as text, as the message's JSON has them (`Uuid`'s hyphenated lower
    /// case, [`format_rfc3339_millis`]), borrowed from its rendering: `None` while the message
    /// has not been rendered. The archive stores them so, without formatting them again.
    pub fn rendered_id_and_time(&self) -> Option<(&str, &str)> {
        const ID_LEN: usize = uuid::fmt::Hyphenated::LENGTH;
        let rendered = self.rendered.get().filter(|r| r.id_at != u16::MAX)?;
        let around = &*rendered.around;
        let id_at = usize::from(rendered.id_at);
        let id = around.get(id_at..id_at + ID_LEN)?;
        // The rendering ends `"created_at":"<time>"}`.
        let time_end = around.len().checked_sub(2)?;
        let time = around.get(time_end.checked_sub(usize::from(rendered.time_len))?..time_end)?;
        Some((id, time))
    }

    /// The length of [`Message::json_parts`] together.
    pub fn json_len(&self) -> usize {
        self.json_parts().iter().map(|p| p.len()).sum()
    }

    /// The message as one JSON string, newly allocated.
    pub fn to_json(&self) -> String {
        self.json_parts().concat()
    }

    /// The `Serialize` output without `content`, written directly: every message is rendered
    /// once, and the generic serializer spent most of its time on the id and the time (formatted
    /// into temporary strings) and on escaping strings that need none.
    fn render(&self) -> Rendered {
        let metadata = self.metadata.get();
        let mut out = String::with_capacity(
            160 + self.conversation_id.as_str().len()
                + self.sender.as_str().len()
                + self.kind.len()
                + metadata.len(),
        );
        out.push_str("{\"conversation_id\":");
        push_json_str(&mut out, self.conversation_id.as_str());
        out.push_str(",\"seq\":");
        out.push_str(itoa::Buffer::new().format(self.seq));
        out.push_str(",\"id\":\"");
        let id_at = u16::try_from(out.len()).unwrap_or(u16::MAX);
        out.push_str(
            self.id
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer()),
        );
        out.push_str("\",\"sender\":");
        push_json_str(&mut out, self.sender.as_str());
        out.push_str(",\"kind\":");
        push_json_str(&mut out, &self.kind);
        out.push_str(",\"content\":");
        let split = out.len() as u32;
        out.push_str(",\"metadata\":");
        out.push_str(metadata);
        out.push_str(",\"created_at\":\"");
        let time_at = out.len();
        push_rfc3339_millis(&mut out, self.created_at_ms);
        let time_len = (out.len() - time_at) as u16;
        out.push_str("\"}");
        Rendered {
            around: out.into_boxed_str(),
            split,
            id_at,
            time_len,
        }
    }

    /// Bytes this message accounts for in memory budgets (ring, archive backlog), counting its
    /// rendering (see [`Message::json_parts`]) as if it were there: a delivered message holds it.
    pub fn approx_bytes(&self) -> usize {
        let content = self.content.get().len();
        let rest = self.conversation_id.as_str().len()
            + self.sender.as_str().len()
            + self.kind.len()
            + self.metadata.get().len();
        // The shared allocation holding the struct, what it points to, then the rendering
        // around the content: the rest again plus keys, id, seq and timestamp (~150 bytes).
        16 + std::mem::size_of::<Message>()
            + rest
            + content
            + self.idempotency_key.as_deref().map_or(0, str::len)
            + rest
            + 160
    }

    /// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T02:28:36.123Z`.
    pub fn created_at(&self) -> String {
        format_rfc3339_millis(self.created_at_ms)
    }

    /// The exact length of [`Message::encode_as`]'s output for `kind`.
    pub fn encoded_len(&self, kind: u8) -> usize {
        // slot, (epoch), seq, created_at_ms, id; three str16; key flag (+ str16); two str32.
        let epoch = if kind == KIND_MESSAGE_V1 { 0 } else { 8 };
        4 + epoch
            + 8
            + 8
            + 16
            + (2 + self.conversation_id.as_str().len())
            + (2 + self.sender.as_str().len())
            + (2 + self.kind.len())
            + 1
            + self.idempotency_key.as_deref().map_or(0, |k| 2 + k.len())
            + (4 + self.content.get().len())
            + (4 + self.metadata.get().len())
    }

    /// Encodes the WAL payload of a [`KIND_MESSAGE`] record (see `docs/log-format.md`).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(KIND_MESSAGE)
    }

    /// Encodes the payload of `kind` ([`KIND_MESSAGE`] or [`KIND_MESSAGE_V1`]), all integers
    /// little-endian:
    ///
    /// `slot u32 | epoch u64 (not in kind 1) | seq u64 | created_at_ms i64 | id [16] |
    /// conversation_id str16 | sender str16 | kind str16 | idempotency_key (u8 present, str16 if
    /// present) | content str32 | metadata str32` where `str16` is a `u16` byte length followed by
    /// UTF-8 and `str32` likewise with a `u32`.
    pub fn encode_as(&self, kind: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len(kind));
        out.extend_from_slice(&self.slot.to_le_bytes());
        if kind != KIND_MESSAGE_V1 {
            out.extend_from_slice(&self.epoch.to_le_bytes());
        }
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.created_at_ms.to_le_bytes());
        out.extend_from_slice(self.id.as_bytes());
        put_str16(&mut out, self.conversation_id.as_str());
        put_str16(&mut out, self.sender.as_str());
        put_str16(&mut out, &self.kind);
        match &self.idempotency_key {
            Some(key) => {
                out.push(1);
                put_str16(&mut out, key);
            }
            None => out.push(0),
        }
        put_str32(&mut out, self.content.get());
        put_str32(&mut out, self.metadata.get());
        debug_assert_eq!(out.len(), self.encoded_len(kind));
        out
    }

    /// Decodes a [`KIND_MESSAGE`] payload.
    pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
        Message::decode_as(KIND_MESSAGE, payload)
    }

    /// Decodes a payload of `kind` ([`KIND_MESSAGE`] or [`KIND_MESSAGE_V1`], whose epoch reads
    /// as `0`).
    pub fn decode_as(kind: u8, payload: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader {
            buf: payload,
            pos: 0,
        };
        let slot = u32::from_le_bytes(r.array()?);
        let epoch = match kind {
            KIND_MESSAGE_V1 => 0,
            KIND_MESSAGE => u64::from_le_bytes(r.array()?),
            other => return Err(DecodeError::UnknownKind(other)),
        };
        let seq = u64::from_le_bytes(r.array()?);
        let created_at_ms = i64::from_le_bytes(r.array()?);
        let id = Uuid::from_bytes(r.array()?);
        let conversation_id = ConversationId::parse(r.str16()?)
            .map_err(|_| DecodeError::Invalid("conversation_id"))?;
        let sender =
            ParticipantId::parse(r.str16()?).map_err(|_| DecodeError::Invalid("sender"))?;
        let kind = Box::from(r.str16()?);
        let idempotency_key = match r.array::<1>()?[0] {
            0 => None,
            1 => Some(Box::from(r.str16()?)),
            _ => return Err(DecodeError::Invalid("idempotency_key")),
        };
        let content = RawValue::from_string(r.str32()?.to_owned())
            .map_err(|_| DecodeError::Invalid("content"))?;
        let metadata = RawValue::from_string(r.str32()?.to_owned())
            .map_err(|_| DecodeError::Invalid("metadata"))?;
        if r.pos != payload.len() {
            return Err(DecodeError::Invalid("trailing bytes"));
        }
        Ok(Message {
            conversation_id,
            slot,
            epoch,
            seq,
            id,
            created_at_ms,
            sender,
            kind,
            content,
            metadata,
            idempotency_key,
            rendered: Default::default(),
        })
    }
}

/// A WAL record decoded by kind.
#[derive(Debug, Clone)]
pub enum Record {
    Message(Arc<Message>),
}

impl Record {
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Record, DecodeError> {
        match kind {
            KIND_MESSAGE | KIND_MESSAGE_V1 => Ok(Record::Message(Arc::new(Message::decode_as(
                kind, payload,
            )?))),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Message", 8)?;
        s.serialize_field("conversation_id", self.conversation_id.as_str())?;
        s.serialize_field("seq", &self.seq)?;
        s.serialize_field("id", &self.id.to_string())?;
        s.serialize_field("sender", self.sender.as_str())?;
        s.serialize_field("kind", &*self.kind)?;
        s.serialize_field("content", &self.content)?;
        s.serialize_field("metadata", &self.metadata)?;
        s.serialize_field("created_at", &self.created_at())?;
        s.end()
    }
}

/// `s` as a JSON string, exactly as `serde_json` writes it; strings with nothing to escape (ids,
/// kinds: nearly all of them) are copied as they are.
pub fn push_json_str(out: &mut String, s: &str) {
    if plain_json_prefix(s.as_bytes()) == s.len() {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// How many bytes at the start of `b` a JSON string holds as they are: up to the first quote,
/// backslash or control character (or all of them). Eight bytes at a time: a word holds such a
/// byte exactly when one of the three masks below keeps a high bit (bytes of 0x80 and above
/// never do).
pub fn plain_json_prefix(b: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut at = 0;
    while let Some(word) = b.get(at..at + 8) {
        let word = u64::from_ne_bytes(word.try_into().expect("eight bytes"));
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        // Zero bytes (the quote, the backslash) and bytes below 0x20 keep their high bit.
        let found = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(ONES * 0x20) & !word);
        if found & HIGH != 0 {
            break;
        }
        at += 8;
    }
    while let Some(&c) = b.get(at) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        at += 1;
    }
    at
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Every str16 field is bounded far below u16::MAX by validation at the edge.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len as usize]);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::Truncated(self.pos))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn str16(&mut self) -> Result<&'a str, DecodeError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::Invalid("utf-8"))
    }

    fn str32(&mut self) -> Result<&'a str, DecodeError> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::Invalid("utf-8"))
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339_millis(ms: i64) -> String {
    let mut out = String::with_capacity(24);
    push_rfc3339_millis(&mut out, ms);
    out
}

/// [`format_rfc3339_millis`] appended to `out`: a message's rendering and a `send`'s reply
/// write the time where it goes, without a string of its own.
pub fn push_rfc3339_millis(out: &mut String, ms: i64) {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    if !(0..=9999).contains(&y) {
        use std::fmt::Write;
        let _ = write!(
            out,
            "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{millis:03}Z"
        );
        return;
    }
    // Every message rendering and reply carries one of these: digits by hand, no formatter.
    // Every value below is within 0..=9999, so u32 arithmetic holds it.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y as u32);
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, hh as u32);
    put(14, 2, mm as u32);
    put(17, 2, ss as u32);
    put(20, 3, millis as u32);
    out.push_str(std::str::from_utf8(&b).expect("ascii digits"));
}

/// Howard Hinnant's days → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(seq: u64, key: Option<&str>, content: &str) -> Message {
        Message {
            conversation_id: ConversationId::parse("c-1").unwrap(),
            slot: 7,
            epoch: 0,
            seq,
            id: Uuid::now_v7(),
            created_at_ms: 1_700_000_000_123,
            sender: ParticipantId::parse("alice").unwrap(),
            kind: "text".into(),
            content: RawValue::from_string(content.to_owned()).unwrap(),
            metadata: RawValue::from_string("{\"a\":1}".to_owned()).unwrap(),
            idempotency_key: key.map(Box::from),
            rendered: Default::default(),
        }
    }

    #[test]
    fn hand_formatted_timestamps_match_the_formatter() {
        let reference = |ms: i64| {
            let secs = ms.div_euclid(1000);
            let sod = secs.rem_euclid(86_400);
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                sod / 3600,
                (sod / 60) % 60,
                sod % 60,
                ms.rem_euclid(1000)
            )
        };
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // 1970 .. ~2286, plus the edges of the four-digit range.
            let ms = (x >> 20) as i64 % 10_000_000_000_000;
            assert_eq!(format_rfc3339_millis(ms), reference(ms));
        }
        for ms in [
            -1,
            -62_135_596_800_000,
            253_402_300_799_999,
            253_402_300_800_000,
        ] {
            assert_eq!(format_rfc3339_millis(ms), reference(ms));
        }
    }

    #[test]
    fn formats_rfc3339_with_millis() {
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            format_rfc3339_millis(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn truncated_payloads_are_rejected_not_panicking() {
        for kind in [KIND_MESSAGE, KIND_MESSAGE_V1] {
            let bytes = message(3, Some("k"), "\"hi\"").encode_as(kind);
            for cut in 0..bytes.len() {
                assert!(Message::decode_as(kind, &bytes[..cut]).is_err());
            }
            assert!(Record::decode(9, &bytes).is_err());
        }
    }

    #[test]
    fn the_epoch_is_recorded_and_kind_1_records_still_read() {
        let mut m = message(5, Some("k"), "\"hi\"");
        m.epoch = 42;
        let Record::Message(back) = Record::decode(KIND_MESSAGE, &m.encode()).unwrap();
        assert_eq!((back.epoch, back.seq, back.slot), (42, 5, 7));

        let old = m.encode_as(KIND_MESSAGE_V1);
        assert_eq!(old.len() + 8, m.encode().len());
        let Record::Message(back) = Record::decode(KIND_MESSAGE_V1, &old).unwrap();
        assert_eq!((back.epoch, back.seq, back.slot), (0, 5, 7));
        assert_eq!(back.to_json(), m.to_json());
        // A kind-2 payload is not a valid kind-1 one, nor the other way round.
        assert!(Message::decode_as(KIND_MESSAGE_V1, &m.encode()).is_err());
        assert!(Message::decode_as(KIND_MESSAGE, &old).is_err());
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(seq in 1u64.., epoch in 0u64.., key in proptest::option::of("[a-z0-9]{1,40}"), text in ".{0,200}") {
            let content = serde_json::to_string(&text).unwrap();
            let mut m = message(seq, key.as_deref(), &content);
            m.epoch = epoch;
            let back = Message::decode(&m.encode()).unwrap();
            prop_assert_eq!(back.epoch, epoch);
            prop_assert_eq!(back.seq, m.seq);
            prop_assert_eq!(back.id, m.id);
            prop_assert_eq!(&back.idempotency_key, &m.idempotency_key);
            prop_assert_eq!(back.content.get(), m.content.get());
            prop_assert_eq!(back.metadata.get(), m.metadata.get());
            prop_assert_eq!(serde_json::to_string(&back).unwrap(), serde_json::to_string(&m).unwrap());
        }

        #[test]
        fn the_direct_rendering_is_the_serialize_output(
            seq in any::<u64>(),
            ms in -62_135_596_800_000i64..253_402_300_799_999,
            kind in "\\PC{1,20}|[\"\\\\\\x00-\\x1f\\x7f a-z]{1,20}",
            text in ".{0,200}",
        ) {
            let content = serde_json::to_string(&text).unwrap();
            let mut m = message(seq, None, &content);
            m.created_at_ms = ms;
            m.kind = kind.into();
            prop_assert!(m.rendered_id_and_time().is_none());
            // The offsets ride in what was padding: a rendering is a pointer, a length and 8 bytes.
            prop_assert_eq!(std::mem::size_of::<Rendered>(), 24);
            let json = m.to_json();
            prop_assert_eq!(m.json_len(), json.len());
            // The kept rendering holds everything but the content, which the message holds once.
            let kept = m.rendered.get().expect("rendered");
            prop_assert_eq!(kept.around.len() + m.content.get().len(), json.len());
            prop_assert_eq!(&json, &serde_json::to_string(&m).unwrap());
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(v["seq"].as_u64(), Some(seq));
            // The id and the time the archive borrows are those the JSON holds.
            let (id, time) = m.rendered_id_and_time().expect("rendered");
            prop_assert_eq!(id, m.id.to_string());
            prop_assert_eq!(time, format_rfc3339_millis(ms));
            prop_assert_eq!(v["id"].as_str(), Some(id));
            prop_assert_eq!(v["created_at"].as_str(), Some(time));
        }
    }
}
