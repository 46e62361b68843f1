//! WAL frames (`ferry_shards::wal::frame`): decoding never panics, whatever the bytes; a frame
//! that decodes re-encodes to exactly the bytes it came from; and what `encode` writes decodes
//! back to the same kind, lsn and payload, and no shorter cut of it passes as a frame.
//!
//! Random bytes almost never carry a matching CRC, so half the inputs first get their CRCs
//! repaired where a frame's length says one sits: that lets the fuzzer reach past the checksum
//! into the walk over consecutive frames.

#![no_main]

use ferry_shards::wal::frame::{self, Decoded, FRAME_OVERHEAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => walk(rest),
        1 => walk(&repair_crcs(rest)),
        _ => round_trip(rest),
    }
});

/// Decodes frame after frame the way recovery scans a segment.
fn walk(bytes: &[u8]) {
    let mut offset = 0;
    // Offsets past the end are the end, not a panic.
    assert_eq!(frame::decode(bytes, bytes.len() + 1), Decoded::End);
    while let Decoded::Frame(f) = frame::decode(bytes, offset) {
        assert!(f.encoded_len >= FRAME_OVERHEAD);
        assert_eq!(f.encoded_len, FRAME_OVERHEAD + f.payload.len());
        let mut again = Vec::new();
        frame::encode(&mut again, f.kind, f.lsn, f.payload);
        assert_eq!(again, &bytes[offset..offset + f.encoded_len]);
        offset += f.encoded_len;
    }
}

/// Writes the right CRC into every frame header the length fields chain through.
fn repair_crcs(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut offset = 0;
    while offset + FRAME_OVERHEAD <= out.len() {
        let len = u32::from_le_bytes(out[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (offset + 8)
            .checked_add(len)
            .filter(|end| *end <= out.len())
        else {
            break;
        };
        let crc = crc32fast::hash(&out[offset + 8..end]);
        out[offset + 4..offset + 8].copy_from_slice(&crc.to_le_bytes());
        offset = end;
    }
    out
}

fn round_trip(bytes: &[u8]) {
    if bytes.len() < 9 {
        return;
    }
    let kind = bytes[0];
    let lsn = u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
    let payload = &bytes[9..];
    let mut buf = Vec::new();
    frame::encode(&mut buf, kind, lsn, payload);
    assert_eq!(buf.len(), frame::frame_len(payload.len()));
    let Decoded::Frame(f) = frame::decode(&buf, 0) else {
        panic!("an encoded frame does not decode");
    };
    assert_eq!(
        (f.kind, f.lsn, f.payload, f.encoded_len),
        (kind, lsn, payload, buf.len())
    );
    // A frame cut short is never taken for a whole one.
    for cut in [0, 1, 4, 8, FRAME_OVERHEAD - 1, buf.len() - 1] {
        if cut < buf.len() {
            assert!(!matches!(frame::decode(&buf[..cut], 0), Decoded::Frame(_)));
        }
    }
}
