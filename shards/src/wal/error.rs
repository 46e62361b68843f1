//! Errors of the WAL. `WalError` is `Clone` because one failure (a poisoning fsync) is handed to
//! every waiter of a batch; IO errors are therefore kept behind an `Arc`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Lsn;

/// Why [`super::Wal::submit`] or [`super::Wal::barrier`] refused a request. The completion was
/// dropped without being called.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds `queue_capacity` records: try again later.
    #[error("wal queue is full")]
    Full,
    /// A write or fsync failed earlier; nothing more will become durable.
    #[error("wal is poisoned")]
    Poisoned,
    /// The filesystem is full: the writer holds what it has and retries; nothing new is taken
    /// until a write succeeds again.
    #[error("wal disk is full")]
    DiskFull,
    /// [`super::Wal::shutdown`] was called.
    #[error("wal is closed")]
    Closed,
}

/// Errors of opening, running and checkpointing the WAL.
#[derive(Debug, thiserror::Error, Clone)]
pub enum WalError {
    #[error("wal io error: {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("wal is poisoned after a failed {cause}; nothing after lsn {durable_lsn} is known durable, restart the node")]
    Poisoned { cause: Arc<str>, durable_lsn: Lsn },
    #[error("{}", corrupt_message(.segment, .offset, .reason, .first_lsn, .last_known_lsn))]
    Corrupt {
        /// The damaged segment file (or the checkpoint file).
        segment: PathBuf,
        /// Byte offset of the first damaged frame in `segment`.
        offset: u64,
        /// What is wrong, in words.
        reason: String,
        /// First lsn that cannot be read back.
        first_lsn: Lsn,
        /// Highest lsn seen anywhere after the damage (`None`: nothing readable after it).
        last_known_lsn: Option<Lsn>,
    },
    #[error("wal is behind its checkpoint: the checkpoint promises every lsn after {checkpoint} is in the log, but the oldest segment {} starts at lsn {first_on_disk}; lsns {}..={} are missing. Refusing to open; restore the missing segments, or restart with repair enabled (`ferry serve --repair-wal` / FERRY_WAL__REPAIR=true) to record them as lost", .segment.display(), .checkpoint.saturating_add(1), .first_on_disk.saturating_sub(1))]
    Behind {
        checkpoint: Lsn,
        first_on_disk: Lsn,
        segment: PathBuf,
    },
    #[error("wal is closed")]
    Closed,
    #[error("wal record of {len} bytes exceeds the largest a segment can hold ({max} bytes)")]
    RecordTooLarge { len: usize, max: usize },
    #[error("checkpoint {archived} is ahead of the last written lsn {written}")]
    CheckpointAhead { archived: Lsn, written: Lsn },
    #[error("wal directory {} is in use by another wal (lock failed: {source})", .dir.display())]
    Locked {
        dir: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("invalid wal options: {0}")]
    InvalidOptions(String),
}

impl WalError {
    /// An allocation failed for lack of space (see [`super::io::is_disk_full`]).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, WalError::Io { source, .. } if super::io::is_disk_full(source))
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> WalError {
        WalError::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

fn corrupt_message(
    segment: &Path,
    offset: &u64,
    reason: &str,
    first_lsn: &Lsn,
    last_known_lsn: &Option<Lsn>,
) -> String {
    let (offset, first_lsn, last_known_lsn) = (*offset, *first_lsn, *last_known_lsn);
    let range = match last_known_lsn {
        _ if first_lsn == 0 => {
            "no record is damaged, but the log cannot be trusted without it".into()
        }
        Some(last) if last >= first_lsn => format!("lsns {first_lsn}..={last} are affected"),
        _ => format!("lsn {first_lsn} onwards is affected (no later record is readable)"),
    };
    let quarantine = segment
        .parent()
        .map(|d| d.join("quarantine"))
        .unwrap_or_else(|| PathBuf::from("quarantine"));
    format!(
        "wal corrupt: segment {} at byte offset {offset}: {reason}; {range}. Refusing to open. \
         To keep the valid prefix (every lsn below {first_lsn}), move the damaged segment(s) to {} \
         and get a report of exactly which lsns were lost, restart with repair enabled \
         (`ferry serve --repair-wal` / FERRY_WAL__REPAIR=true / WalOptions::repair)",
        segment.display(),
        quarantine.display(),
    )
}
