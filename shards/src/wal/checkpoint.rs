//! The two small metadata files beside the segments, both replaced atomically
//! (`<name>.tmp` → write → `fsync` → rename → `fsync` directory):
//!
//! - `checkpoint`: `"FWCK" | archived_lsn u64 LE | crc32 u32 LE` (16 bytes; the CRC covers the 12
//!   bytes before it). Every lsn ≤ `archived_lsn` is stored elsewhere and may be deleted here.
//! - `lost-lsns`: `"FWLS" | count u32 LE | count × (first u64 LE, last u64 LE) | crc32 u32 LE`.
//!   Ranges that a repair declared lost; recovery accepts an lsn jump only over lsns that are
//!   either ≤ the checkpoint or inside one of these ranges, so lsns are never reused after a repair.
//!
//! This module must not decide when to write: the housekeeper (checkpoint) and the repair path
//! (lost ranges) do.

use std::io::ErrorKind;
use std::path::Path;

use super::io::WalIo;
use super::{Lsn, WalError};

pub const CHECKPOINT_FILE: &str = "checkpoint";
pub const LOST_FILE: &str = "lost-lsns";
const CHECKPOINT_MAGIC: &[u8; 4] = b"FWCK";
const LOST_MAGIC: &[u8; 4] = b"FWLS";

pub fn encode_checkpoint(archived: Lsn) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16);
    buf.extend_from_slice(CHECKPOINT_MAGIC);
    buf.extend_from_slice(&archived.to_le_bytes());
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes a `checkpoint` file's bytes; the reason as text when they are damaged.
pub fn decode_checkpoint(bytes: &[u8]) -> Result<Lsn, String> {
    if bytes.len() != 16 {
        return Err(format!(
            "checkpoint file is {} bytes, expected 16",
            bytes.len()
        ));
    }
    if &bytes[..4] != CHECKPOINT_MAGIC {
        return Err("checkpoint file has a bad magic".into());
    }
    let stored = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if crc32fast::hash(&bytes[..12]) != stored {
        return Err("checkpoint file crc mismatch".into());
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&bytes[4..12]);
    Ok(u64::from_le_bytes(lsn))
}

/// Reads `file` in `dir`: `Ok(None)` when it does not exist.
fn read_optional(io: &dyn WalIo, dir: &Path, file: &str) -> Result<Option<Vec<u8>>, WalError> {
    let path = dir.join(file);
    match io.read(&path) {
        Ok(buf) => Ok(Some((*buf).as_ref().to_vec())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WalError::io("read", &path, e)),
    }
}

/// The checkpoint on disk: `Ok(None)` if there is none, `Err(reason)` inside `Ok` if it is damaged.
pub fn read_checkpoint(
    io: &dyn WalIo,
    dir: &Path,
) -> Result<Option<Result<Lsn, String>>, WalError> {
    Ok(read_optional(io, dir, CHECKPOINT_FILE)?.map(|b| decode_checkpoint(&b)))
}

pub fn write_checkpoint(io: &dyn WalIo, dir: &Path, archived: Lsn) -> Result<(), WalError> {
    write_atomically(io, dir, CHECKPOINT_FILE, &encode_checkpoint(archived))
}

/// Replaces `dir/name` durably: tmp file, `fsync`, rename, directory `fsync`.
pub fn write_atomically(
    io: &dyn WalIo,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), WalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let file = io
        .create(&tmp)
        .map_err(|e| WalError::io("create", &tmp, e))?;
    file.write_all_at(bytes, 0)
        .map_err(|e| WalError::io("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| WalError::io("fsync", &tmp, e))?;
    drop(file);
    io.rename(&tmp, &path)
        .map_err(|e| WalError::io("rename", &tmp, e))?;
    io.sync_dir(dir)
        .map_err(|e| WalError::io("fsync dir", dir, e))
}

/// Lsn ranges (inclusive) that a repair declared lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LostRanges(pub Vec<(Lsn, Lsn)>);

impl LostRanges {
    pub fn read(io: &dyn WalIo, dir: &Path) -> Result<LostRanges, WalError> {
        let Some(bytes) = read_optional(io, dir, LOST_FILE)? else {
            return Ok(LostRanges::default());
        };
        LostRanges::decode(&bytes).map_err(|reason| WalError::Corrupt {
            segment: dir.join(LOST_FILE),
            offset: 0,
            reason,
            first_lsn: 0,
            last_known_lsn: None,
        })
    }

    /// Decodes a `lost-lsns` file's bytes; the reason as text when they are damaged.
    pub fn decode(bytes: &[u8]) -> Result<LostRanges, String> {
        if bytes.len() < 12 || &bytes[..4] != LOST_MAGIC {
            return Err("lost-lsns file has a bad header".into());
        }
        let body = &bytes[..bytes.len() - 4];
        let tail = &bytes[bytes.len() - 4..];
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if crc32fast::hash(body) != stored {
            return Err("lost-lsns file crc mismatch".into());
        }
        let count = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
        if body.len() != 8 + count * 16 {
            return Err("lost-lsns file length does not match its count".into());
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[i..i + 8]);
            u64::from_le_bytes(b)
        };
        Ok(LostRanges(
            (0..count)
                .map(|i| (u64_at(8 + i * 16), u64_at(16 + i * 16)))
                .collect(),
        ))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(12 + self.0.len() * 16);
        buf.extend_from_slice(LOST_MAGIC);
        buf.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (first, last) in &self.0 {
            buf.extend_from_slice(&first.to_le_bytes());
            buf.extend_from_slice(&last.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn write(&self, io: &dyn WalIo, dir: &Path) -> Result<(), WalError> {
        write_atomically(io, dir, LOST_FILE, &self.encode())
    }

    /// Highest lsn declared lost (0 if none).
    pub fn max_lsn(&self) -> Lsn {
        self.0.iter().map(|r| r.1).max().unwrap_or(0)
    }

    /// True when every lsn in `first..=last` is either ≤ `checkpoint` or declared lost, so the
    /// log may jump over it.
    pub fn covers(&self, first: Lsn, last: Lsn, checkpoint: Lsn) -> bool {
        // Checked, not saturating, additions: a checkpoint or a lost range that reaches
        // `u64::MAX` covers everything after it, and a saturated `next` would never pass `last`.
        let Some(after_checkpoint) = checkpoint.checked_add(1) else {
            return true;
        };
        let mut next = first.max(after_checkpoint);
        while next <= last {
            match self.0.iter().find(|(a, b)| *a <= next && next <= *b) {
                Some((_, b)) => match b.checked_add(1) {
                    Some(after) => next = after,
                    None => return true,
                },
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip_and_damage() {
        let bytes = encode_checkpoint(1234);
        assert_eq!(decode_checkpoint(&bytes), Ok(1234));
        let mut bad = bytes.clone();
        bad[6] ^= 0x10;
        assert!(decode_checkpoint(&bad).is_err());
        assert!(decode_checkpoint(&bytes[..15]).is_err());
    }

    #[test]
    fn lost_ranges_round_trip_and_cover() {
        let lost = LostRanges(vec![(10, 20), (21, 25), (40, 40)]);
        assert_eq!(LostRanges::decode(&lost.encode()), Ok(lost.clone()));
        assert!(lost.covers(10, 25, 0));
        assert!(lost.covers(5, 25, 9));
        assert!(!lost.covers(5, 25, 8));
        assert!(!lost.covers(26, 40, 0));
        assert!(lost.covers(26, 40, 39));
        assert!(lost.covers(7, 6, 0), "an empty range is always covered");
        let mut bad = lost.encode();
        bad[9] ^= 1;
        assert!(LostRanges::decode(&bad).is_err());
    }

    // Found by the `wal_checkpoint` fuzz target: with a checkpoint at `u64::MAX` the lsn
    // `u64::MAX` counted as uncovered. The same saturating addition made a lost range ending at
    // `u64::MAX` loop for ever.
    #[test]
    fn ranges_reaching_the_last_lsn() {
        let none = LostRanges::default();
        assert!(none.covers(u64::MAX, u64::MAX, u64::MAX));
        assert!(none.covers(3, u64::MAX, u64::MAX));
        assert!(!none.covers(u64::MAX, u64::MAX, u64::MAX - 1));
        let to_the_end = LostRanges(vec![(5, u64::MAX)]);
        assert!(to_the_end.covers(5, u64::MAX, 0));
        assert!(to_the_end.covers(u64::MAX, u64::MAX, 0));
        assert!(!to_the_end.covers(4, u64::MAX, 0));
    }
}
