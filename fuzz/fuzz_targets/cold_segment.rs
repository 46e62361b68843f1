//! Cold-tier segment objects (`ferry_codec::segment`): `header` and `decode` never panic and
//! never allocate without bound, whatever the bytes; a segment that decodes re-encodes to the
//! same messages; and a record block built from fuzzer bytes decodes only if it is the block
//! `encode` writes for the messages it yields (up to whitespace around their JSON fields).
//!
//! A segment is guarded by a header CRC, a body CRC, a zstd frame and a CRC per record, none of
//! which random bytes pass. So the first byte picks how much of that the target builds itself:
//! nothing (the bytes are the object), the two outer CRCs, or everything (the rest of the input
//! is header fields and a record block whose lengths and CRCs are fixed up, then compressed).

#![no_main]

use ferry_codec::segment::{self, HEADER_LEN};
use ferry_shards::record::KIND_MESSAGE_V1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check(rest, None),
        1 => check(&repair_crcs(rest), None),
        _ => {
            if let Some((object, block)) = build(rest) {
                check(&object, Some(&block));
            }
        }
    }
});

fn check(bytes: &[u8], block: Option<&[u8]>) {
    let header = segment::header(bytes);
    let Ok(messages) = segment::decode(bytes) else {
        return;
    };
    let header = header.expect("a segment that decodes has a valid header");
    assert_eq!(messages.len() as u64, header.record_count as u64);
    assert_eq!(messages.first().map(|m| m.seq), Some(header.first_seq));
    assert_eq!(messages.last().map(|m| m.seq), Some(header.last_seq));
    if let Some(block) = block {
        let mut again = Vec::new();
        for m in &messages {
            let payload = m.encode_as(KIND_MESSAGE_V1);
            again.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            again.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            again.extend_from_slice(&payload);
        }
        // Byte for byte, but for whitespace around `content` and `metadata`, which a decoded
        // message does not keep (the node never writes any).
        if again != block {
            assert!(
                again.len() < block.len(),
                "the record block is not the canonical one"
            );
        }
    }
    let encoded = segment::encode(&messages).expect("decoded messages encode");
    let back = segment::decode(&encoded).expect("an encoded segment decodes");
    assert_eq!(segment::header(&encoded), Ok(header));
    assert_eq!(back.len(), messages.len());
    for (a, b) in messages.iter().zip(&back) {
        assert_eq!(a.encode(), b.encode());
    }
}

/// Recomputes the header CRC and the body CRC.
fn repair_crcs(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() >= HEADER_LEN {
        let body = crc32fast::hash(&out[HEADER_LEN..]);
        out[36..40].copy_from_slice(&body.to_le_bytes());
        let header = crc32fast::hash(&out[..40]);
        out[40..44].copy_from_slice(&header.to_le_bytes());
    }
    out
}

/// A whole object from `first_seq u64 | record_count u32 | raw_len_delta i8 | block`: the block's
/// record CRCs are repaired, the header says `record_count` records from `first_seq`, and its
/// `raw_len` is the block's length give or take the delta. Returns the object and the block.
fn build(bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if bytes.len() < 13 {
        return None;
    }
    let first_seq = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let delta = bytes[12] as i8;
    let mut block = bytes[13..].to_vec();
    let mut at = 0;
    while block.len() - at >= 8 {
        let len = u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|end| *end <= block.len()) else {
            break;
        };
        let crc = crc32fast::hash(&block[at + 8..end]);
        block[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
    let body = zstd::bulk::compress(&block, 1).ok()?;
    let raw_len = (block.len() as i64 + i64::from(delta)).clamp(0, i64::from(u32::MAX)) as u32;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(segment::MAGIC);
    out.push(segment::VERSION);
    out.push(segment::CODEC_ZSTD);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&first_seq.to_le_bytes());
    let last_seq = first_seq.wrapping_add(u64::from(count)).wrapping_sub(1);
    out.extend_from_slice(&last_seq.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..40]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&body);
    Some((out, block))
}
