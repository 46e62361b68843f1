//! Segment objects of the cold tier: a run of consecutive messages of one conversation, compacted
//! out of SQL, as one immutable object. `docs/log-format.md` ("Cold-tier segments") is the byte
//! layout; this module is its only writer and reader.
//!
//! A segment is a 44-byte header followed by one zstd frame of the record block; each record is
//! `len u32 | crc32 u32 | payload`, where the payload is exactly the WAL's message payload
//! ([`Message::encode`]). Everything is checked on read — header CRC, body CRC, every record's
//! CRC, the record count, consecutive seqs and a single conversation — so a damaged or misplaced
//! object is reported, never half-read. Pure functions, no IO.

use std::sync::Arc;

use ferry_shards::record::{Message, KIND_MESSAGE_V1};

pub const MAGIC: &[u8; 8] = b"FERRYSEG";
pub const VERSION: u8 = 1;
/// The body is one zstd frame.
pub const CODEC_ZSTD: u8 = 1;
pub const HEADER_LEN: usize = 44;
/// zstd level: a good ratio for JSON at a cost the compactor can afford.
const ZSTD_LEVEL: i32 = 3;
/// Upper bound for a record block, so a corrupt `raw_len` cannot ask for an absurd buffer.
pub const MAX_RAW_BYTES: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment has no messages")]
    Empty,
    #[error("segment messages must be one conversation with consecutive seqs ({0})")]
    NotARun(String),
    #[error("segment too large ({0} bytes before compression)")]
    TooLarge(usize),
    #[error("segment corrupt: {0}")]
    Corrupt(String),
}

/// What the header says (and the index row repeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u32,
    pub raw_len: u32,
}

/// Encodes consecutive messages of one conversation (ascending seq) as a segment object.
pub fn encode(messages: &[Arc<Message>]) -> Result<Vec<u8>, SegmentError> {
    let first = messages.first().ok_or(SegmentError::Empty)?;
    let last = messages.last().ok_or(SegmentError::Empty)?;
    for (i, m) in messages.iter().enumerate() {
        if m.conversation_id != first.conversation_id || m.seq != first.seq + i as u64 {
            return Err(SegmentError::NotARun(format!(
                "record {i} is {} seq {}, expected {} seq {}",
                m.conversation_id,
                m.seq,
                first.conversation_id,
                first.seq + i as u64
            )));
        }
    }
    let mut block = Vec::with_capacity(
        messages
            .iter()
            .map(|m| 8 + m.encoded_len(KIND_MESSAGE_V1))
            .sum(),
    );
    for m in messages {
        let payload = m.encode_as(KIND_MESSAGE_V1);
        block.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        block.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        block.extend_from_slice(&payload);
    }
    if block.len() > MAX_RAW_BYTES {
        return Err(SegmentError::TooLarge(block.len()));
    }
    let body = zstd::bulk::compress(&block, ZSTD_LEVEL)
        .map_err(|e| SegmentError::Corrupt(format!("zstd compress: {e}")))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(CODEC_ZSTD);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&first.seq.to_le_bytes());
    out.extend_from_slice(&last.seq.to_le_bytes());
    out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..40]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and checks the header.
pub fn header(bytes: &[u8]) -> Result<SegmentHeader, SegmentError> {
    let corrupt = |what: String| Err(SegmentError::Corrupt(what));
    if bytes.len() < HEADER_LEN {
        return corrupt(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return corrupt("bad magic".into());
    }
    if crc32fast::hash(&bytes[..40]) != u32_at(bytes, 40) {
        return corrupt("header checksum mismatch".into());
    }
    if bytes[8] != VERSION {
        return corrupt(format!("unknown version {}", bytes[8]));
    }
    if bytes[9] != CODEC_ZSTD {
        return corrupt(format!("unknown codec {}", bytes[9]));
    }
    let h = SegmentHeader {
        first_seq: u64_at(bytes, 12),
        last_seq: u64_at(bytes, 20),
        record_count: u32_at(bytes, 28),
        raw_len: u32_at(bytes, 32),
    };
    // Without the `+ 1` a header spanning every seq (0..=u64::MAX) cannot overflow the check.
    if h.record_count == 0
        || h.last_seq.checked_sub(h.first_seq) != Some(u64::from(h.record_count) - 1)
    {
        return corrupt(format!(
            "seqs {}..={} do not match {} records",
            h.first_seq, h.last_seq, h.record_count
        ));
    }
    if h.raw_len as usize > MAX_RAW_BYTES {
        return corrupt(format!("record block of {} bytes", h.raw_len));
    }
    Ok(h)
}

/// Decodes a whole segment, checking everything; messages come back in seq order.
pub fn decode(bytes: &[u8]) -> Result<Vec<Arc<Message>>, SegmentError> {
    let h = header(bytes)?;
    let corrupt = |what: String| SegmentError::Corrupt(what);
    let body = &bytes[HEADER_LEN..];
    if crc32fast::hash(body) != u32_at(bytes, 36) {
        return Err(corrupt("body checksum mismatch".into()));
    }
    let block = zstd::bulk::decompress(body, h.raw_len as usize)
        .map_err(|e| corrupt(format!("zstd: {e}")))?;
    if block.len() != h.raw_len as usize {
        return Err(corrupt(format!(
            "record block is {} bytes, header says {}",
            block.len(),
            h.raw_len
        )));
    }
    // The header's count is a claim until the records are read, so it does not size the
    // allocation alone: every record takes at least its 8-byte header.
    let mut out: Vec<Arc<Message>> =
        Vec::with_capacity((h.record_count as usize).min(block.len() / 8));
    let mut at = 0;
    while at < block.len() {
        // Stopping at the count also keeps `first_seq + out.len()` below `last_seq`.
        if out.len() == h.record_count as usize {
            return Err(corrupt(format!(
                "more records than the {} the header says",
                h.record_count
            )));
        }
        if block.len() - at < 8 {
            return Err(corrupt(format!("truncated record header at {at}")));
        }
        let len = u32_at(&block, at) as usize;
        let crc = u32_at(&block, at + 4);
        let start = at + 8;
        let payload = block
            .get(start..start + len)
            .ok_or_else(|| corrupt(format!("truncated record at {at}")))?;
        if crc32fast::hash(payload) != crc {
            return Err(corrupt(format!("record {} checksum mismatch", out.len())));
        }
        let message = Message::decode_as(KIND_MESSAGE_V1, payload)
            .map_err(|e| corrupt(format!("record {}: {e}", out.len())))?;
        let expected = h.first_seq + out.len() as u64;
        if message.seq != expected {
            return Err(corrupt(format!(
                "record {} has seq {}, expected {expected}",
                out.len(),
                message.seq
            )));
        }
        if let Some(first) = out.first() {
            if first.conversation_id != message.conversation_id {
                return Err(corrupt("records of two conversations".into()));
            }
        }
        out.push(Arc::new(message));
        at = start + len;
    }
    if out.len() != h.record_count as usize {
        return Err(corrupt(format!(
            "{} records, header says {}",
            out.len(),
            h.record_count
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_shards::ids::{ConversationId, ParticipantId};
    use serde_json::value::RawValue;
    use uuid::Uuid;

    fn message(conversation: &str, seq: u64, text: &str) -> Arc<Message> {
        Arc::new(Message {
            conversation_id: ConversationId::parse(conversation).unwrap(),
            slot: 7,
            epoch: 0,
            seq,
            id: Uuid::now_v7(),
            created_at_ms: 1_700_000_000_000 + seq as i64,
            sender: ParticipantId::parse("alice").unwrap(),
            kind: "text".into(),
            content: RawValue::from_string(format!("{{\"text\":\"{text}\",\"n\":{seq}}}")).unwrap(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
            idempotency_key: seq.is_multiple_of(2).then(|| format!("k{seq}").into()),
            rendered: Default::default(),
        })
    }

    fn run(first: u64, n: u64) -> Vec<Arc<Message>> {
        (first..first + n)
            .map(|s| message("c:1", s, "hello hello hello"))
            .collect()
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let messages = run(41, 300);
        let bytes = encode(&messages).unwrap();
        assert!(bytes.len() < messages.iter().map(|m| m.encode().len()).sum::<usize>());
        let h = header(&bytes).unwrap();
        assert_eq!((h.first_seq, h.last_seq, h.record_count), (41, 340, 300));
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), messages.len());
        for (a, b) in messages.iter().zip(&back) {
            assert_eq!(a.encode(), b.encode(), "seq {}", a.seq);
        }
    }

    #[test]
    fn only_runs_of_one_conversation_are_encoded() {
        assert_eq!(encode(&[]), Err(SegmentError::Empty));
        let mut gap = run(1, 3);
        gap.push(message("c:1", 5, "x"));
        assert!(matches!(encode(&gap), Err(SegmentError::NotARun(_))));
        let mut mixed = run(1, 3);
        mixed.push(message("other", 4, "x"));
        assert!(matches!(encode(&mixed), Err(SegmentError::NotARun(_))));
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let bytes = encode(&run(1, 20)).unwrap();
        for at in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(
                decode(&damaged).is_err(),
                "flip at byte {at} of {} went unnoticed",
                bytes.len()
            );
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        assert!(decode(&bytes[..HEADER_LEN - 1]).is_err(), "short header");
    }

    /// A segment with the given header fields around `block`, every checksum right.
    fn object(first_seq: u64, last_seq: u64, record_count: u32, block: &[u8]) -> Vec<u8> {
        let body = zstd::bulk::compress(block, 1).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, CODEC_ZSTD, 0, 0]);
        out.extend_from_slice(&first_seq.to_le_bytes());
        out.extend_from_slice(&last_seq.to_le_bytes());
        out.extend_from_slice(&record_count.to_le_bytes());
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let header_crc = crc32fast::hash(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn block_of(messages: &[Arc<Message>]) -> Vec<u8> {
        let bytes = encode(messages).unwrap();
        zstd::bulk::decompress(&bytes[HEADER_LEN..], MAX_RAW_BYTES).unwrap()
    }

    // Found by the `cold_segment` fuzz target: a header claiming u32::MAX records sized a 32 GiB
    // allocation before a single record was read, and the process aborted.
    #[test]
    fn a_huge_record_count_is_an_error_not_an_allocation() {
        let block = block_of(&run(0, 1));
        let bytes = object(0, u64::from(u32::MAX) - 1, u32::MAX, &block);
        assert!(matches!(decode(&bytes), Err(SegmentError::Corrupt(_))));
    }

    // Seq arithmetic at the edges of u64: a header spanning every seq, and more records than the
    // header's count ending at u64::MAX, are errors rather than overflows.
    #[test]
    fn seqs_at_the_edges_do_not_overflow() {
        let block = block_of(&run(0, 1));
        assert!(matches!(
            decode(&object(0, u64::MAX, 0, &block)),
            Err(SegmentError::Corrupt(_))
        ));
        let mut two = block_of(&[message("c:1", u64::MAX, "x")]);
        two.extend_from_slice(&two.clone());
        let bytes = object(u64::MAX, u64::MAX, 1, &two);
        let err = decode(&bytes).unwrap_err();
        assert!(format!("{err}").contains("more records"), "{err}");
    }

    #[test]
    fn header_fields_sit_where_the_docs_say() {
        let bytes = encode(&run(1000, 2)).unwrap();
        assert_eq!(&bytes[0..8], b"FERRYSEG");
        assert_eq!(bytes[8], 1, "version");
        assert_eq!(bytes[9], 1, "codec zstd");
        assert_eq!(u64_at(&bytes, 12), 1000);
        assert_eq!(u64_at(&bytes, 20), 1001);
        assert_eq!(u32_at(&bytes, 28), 2);
        // The body is a zstd frame (magic 28 B5 2F FD).
        assert_eq!(&bytes[44..48], &[0x28, 0xB5, 0x2F, 0xFD]);
    }
}
