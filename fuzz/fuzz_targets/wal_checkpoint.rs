//! The WAL's `checkpoint` and `lost-lsns` files (`ferry_shards::wal::checkpoint`): decoding any
//! bytes never panics; what decodes re-encodes to the same bytes; and `covers` agrees with a
//! one-lsn-at-a-time check on small ranges.
//!
//! Both files end in a CRC the fuzzer would almost never guess, so half the inputs get it
//! repaired first.

#![no_main]

use ferry_shards::wal::checkpoint::{decode_checkpoint, encode_checkpoint, LostRanges};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        repair_crc(rest)
    } else {
        rest.to_vec()
    };
    if let Ok(lsn) = decode_checkpoint(&bytes) {
        assert_eq!(encode_checkpoint(lsn), bytes);
    }
    let Ok(lost) = LostRanges::decode(&bytes) else {
        return;
    };
    assert_eq!(lost.encode(), bytes);
    assert_eq!(
        lost.max_lsn(),
        lost.0.iter().map(|r| r.1).max().unwrap_or(0)
    );
    // Query ranges taken from the decoded ones, so they overlap them.
    let mut points = vec![0, 1, u64::MAX];
    for &(a, b) in &lost.0 {
        points.extend([a.saturating_sub(1), a, b, b.saturating_add(1)]);
    }
    points.truncate(12);
    for &first in &points {
        for &checkpoint in &points {
            for len in [0u64, 1, 3, 40] {
                let last = first.saturating_add(len);
                let covered = lost.covers(first, last, checkpoint);
                let one_by_one = (first..=last).all(|lsn| {
                    lsn <= checkpoint || lost.0.iter().any(|&(a, b)| a <= lsn && lsn <= b)
                });
                assert_eq!(
                    covered, one_by_one,
                    "{first}..={last} checkpoint {checkpoint}"
                );
            }
        }
    }
});

/// Makes the trailing CRC match the bytes before it.
fn repair_crc(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() >= 4 {
        let body = out.len() - 4;
        let crc = crc32fast::hash(&out[..body]);
        out[body..].copy_from_slice(&crc.to_le_bytes());
    }
    out
}
