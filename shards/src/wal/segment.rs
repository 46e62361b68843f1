//! Segment files: naming, listing, and the durable birth of a new segment.
//!
//! A segment is `<dir>/<first lsn, 20 digits>.wal`, preallocated to `segment_bytes` and filled
//! with frames from offset 0; the first zero `len` marks the end of written data. A segment is
//! born as `spare-<n>.wal.tmp` (preallocated, `fsync`ed), and only gets its real name by a rename
//! followed by a directory `fsync` — so a segment name on disk always refers to a whole,
//! preallocated file. Stray `*.tmp` files are leftovers of a crash and are removed on open.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::io::{Preallocate, WalFile, WalIo};
use super::{Lsn, WalError};

pub const SEGMENT_SUFFIX: &str = ".wal";
pub const TMP_SUFFIX: &str = ".tmp";
pub const QUARANTINE_DIR: &str = "quarantine";

pub fn segment_name(first_lsn: Lsn) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

pub fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(segment_name(first_lsn))
}

/// The first lsn encoded in a segment file name, if `name` is one.
pub fn parse_segment_name(name: &OsStr) -> Option<Lsn> {
    let name = name.to_str()?;
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segments in `dir`, oldest first.
pub fn list_segments(io: &dyn WalIo, dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, WalError> {
    let names = io.list(dir).map_err(|e| WalError::io("list", dir, e))?;
    let mut segments: Vec<(Lsn, PathBuf)> = names
        .iter()
        .filter_map(|n| parse_segment_name(n).map(|lsn| (lsn, dir.join(n))))
        .collect();
    segments.sort();
    Ok(segments)
}

/// Removes leftovers of interrupted segment or metadata creation.
pub fn remove_temp_files(io: &dyn WalIo, dir: &Path) -> Result<usize, WalError> {
    let names = io.list(dir).map_err(|e| WalError::io("list", dir, e))?;
    let mut removed = 0;
    for name in names {
        if name.to_str().is_some_and(|n| n.ends_with(TMP_SUFFIX)) {
            let path = dir.join(&name);
            io.remove(&path)
                .map_err(|e| WalError::io("remove", &path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A preallocated, synced file under a temporary name, waiting to become the next segment.
pub struct Spare {
    pub tmp: PathBuf,
    pub file: Box<dyn WalFile>,
    pub len: u64,
}

/// Creates a spare: create under a temp name, preallocate, `fsync`.
///
/// On failure the temp file is removed again: on a full disk a half-preallocated spare would hold
/// the very space a retry needs (and each retry would leave another one behind).
pub fn prepare_spare(
    io: &dyn WalIo,
    dir: &Path,
    len: u64,
    how: Preallocate,
    unique: u64,
) -> Result<Spare, WalError> {
    let tmp = dir.join(format!("spare-{unique}{SEGMENT_SUFFIX}{TMP_SUFFIX}"));
    let file = io
        .create(&tmp)
        .map_err(|e| WalError::io("create", &tmp, e))?;
    let reserved = file
        .preallocate(len, how)
        .map_err(|e| WalError::io("preallocate", &tmp, e))
        .and_then(|()| file.sync_all().map_err(|e| WalError::io("fsync", &tmp, e)));
    if let Err(e) = reserved {
        drop(file);
        if let Err(removal) = io.remove(&tmp) {
            tracing::warn!(file = %tmp.display(), error = %removal, "failed wal spare could not be removed; it is removed on the next open");
        }
        return Err(e);
    }
    Ok(Spare { tmp, file, len })
}

/// The segment the writer appends to.
pub struct ActiveSegment {
    pub first_lsn: Lsn,
    pub path: PathBuf,
    pub file: Box<dyn WalFile>,
    /// Bytes the file can hold; frames never cross it.
    pub capacity: u64,
    /// Where the next frame goes (end of written data).
    pub offset: u64,
}

/// Gives a spare its segment name durably: rename, then `fsync` the directory.
pub fn install_spare(
    io: &dyn WalIo,
    dir: &Path,
    spare: Spare,
    first_lsn: Lsn,
) -> Result<ActiveSegment, WalError> {
    rename_spare(io, dir, &spare, first_lsn)?;
    sync_installed(io, dir, spare, first_lsn)
}

/// The first half of [`install_spare`]: the rename, which may be repeated (it can fail for lack
/// of space when the directory needs another block).
pub fn rename_spare(
    io: &dyn WalIo,
    dir: &Path,
    spare: &Spare,
    first_lsn: Lsn,
) -> Result<(), WalError> {
    io.rename(&spare.tmp, &segment_path(dir, first_lsn))
        .map_err(|e| WalError::io("rename", &spare.tmp, e))
}

/// The second half of [`install_spare`]: the directory `fsync` that makes the name durable. Its
/// failure is never retried (as with any `fsync`).
pub fn sync_installed(
    io: &dyn WalIo,
    dir: &Path,
    spare: Spare,
    first_lsn: Lsn,
) -> Result<ActiveSegment, WalError> {
    io.sync_dir(dir)
        .map_err(|e| WalError::io("fsync dir", dir, e))?;
    Ok(ActiveSegment {
        first_lsn,
        path: segment_path(dir, first_lsn),
        file: spare.file,
        capacity: spare.len,
        offset: 0,
    })
}

/// Writes zeros over `start..end` of `file` (the torn-tail and repair truncation).
pub fn zero_range(file: &dyn WalFile, start: u64, end: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(end.saturating_sub(start)) as usize];
    let mut offset = start;
    while offset < end {
        let n = (end - offset).min(CHUNK) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_strangers() {
        assert_eq!(segment_name(42), "00000000000000000042.wal");
        assert_eq!(
            parse_segment_name(OsStr::new("00000000000000000042.wal")),
            Some(42)
        );
        assert_eq!(parse_segment_name(OsStr::new("42.wal")), None);
        assert_eq!(
            parse_segment_name(OsStr::new("0000000000000000004x.wal")),
            None
        );
        assert_eq!(
            parse_segment_name(OsStr::new("00000000000000000042.wal.tmp")),
            None
        );
        assert_eq!(parse_segment_name(OsStr::new("checkpoint")), None);
    }
}
