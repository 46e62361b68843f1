//! The housekeeper thread: the slow, non-urgent file work, kept off the writer's path.
//!
//! - Persists the archived-lsn checkpoint (tmp → `fsync` → rename → `fsync` dir) when the
//!   archiver moved it, then deletes whole segments whose records are all ≤ the *persisted*
//!   value — never the active (last) segment, never before the checkpoint is durable.
//! - Prepares the next segment (preallocated, synced, under a temp name) once the writer asks, so
//!   a roll is a rename + directory `fsync`, not a 64 MiB preallocation.
//!
//! A failure here never poisons the log: a checkpoint that could not be written only means more
//! replay on the next start (it is retried with a fresh file on the next request), and a missing
//! spare makes the writer create one inline.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use super::checkpoint;
use super::segment;
use super::{lock, names, Lsn, Shared, WalError};

pub(super) enum Msg {
    /// Something may need doing: a new checkpoint, or a spare.
    Wake,
    /// Persist the latest checkpoint now and answer.
    Flush(SyncSender<Result<Lsn, WalError>>),
    /// The writer is done: persist the checkpoint, drop the spare, exit.
    Shutdown,
}

pub(super) struct Housekeeper {
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
}

impl Housekeeper {
    pub(super) fn new(shared: Arc<Shared>, rx: Receiver<Msg>) -> Housekeeper {
        Housekeeper { shared, rx }
    }

    pub(super) fn run(self) {
        while let Ok(msg) = self.rx.recv() {
            match msg {
                Msg::Wake => {
                    self.checkpoint_logged();
                    self.prepare_spare();
                }
                Msg::Flush(reply) => {
                    let _ = reply.send(self.checkpoint());
                }
                Msg::Shutdown => {
                    self.checkpoint_logged();
                    break;
                }
            }
        }
        if let Some(spare) = lock(&self.shared.spare).take() {
            let _ = self.shared.io.remove(&spare.tmp);
        }
    }

    fn checkpoint_logged(&self) {
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "wal checkpoint could not be persisted");
        }
    }

    /// Persists the requested checkpoint if it moved, then deletes the segments it covers.
    fn checkpoint(&self) -> Result<Lsn, WalError> {
        let shared = &self.shared;
        let requested = shared.checkpoint_requested.load(Ordering::Acquire);
        let persisted = shared.checkpoint_persisted.load(Ordering::Acquire);
        if requested > persisted {
            checkpoint::write_checkpoint(shared.io.as_ref(), &shared.opts.dir, requested)?;
            shared
                .checkpoint_persisted
                .store(requested, Ordering::Release);
        }
        let persisted = shared.checkpoint_persisted.load(Ordering::Acquire);
        self.delete_archived_segments(persisted);
        Ok(persisted)
    }

    fn delete_archived_segments(&self, persisted: Lsn) {
        let shared = &self.shared;
        let doomed: Vec<_> = {
            let mut segments = lock(&shared.segments);
            let mut doomed = Vec::new();
            // A segment's last lsn is its successor's first lsn - 1; the last one is active.
            while segments.len() > 1 && segments[1].first_lsn - 1 <= persisted {
                if let Some(entry) = segments.pop_front() {
                    doomed.push(entry);
                }
            }
            doomed
        };
        if doomed.is_empty() {
            return;
        }
        for entry in &doomed {
            if let Err(e) = shared.io.remove(&entry.path) {
                // Harmless: open deletes segments below the checkpoint again.
                tracing::warn!(segment = %entry.path.display(), error = %e, "wal segment could not be deleted");
            }
        }
        shared
            .stats
            .segments_deleted
            .fetch_add(doomed.len() as u64, Ordering::Relaxed);
        ::metrics::gauge!(names::WAL_SEGMENTS).set(shared.segments_len() as f64);
        tracing::debug!(
            deleted = doomed.len(),
            checkpoint = persisted,
            "wal segments below the checkpoint deleted"
        );
    }

    fn prepare_spare(&self) {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire)
            || !shared.spare_wanted.swap(false, Ordering::AcqRel)
            || lock(&shared.spare).is_some()
        {
            return;
        }
        match segment::prepare_spare(
            shared.io.as_ref(),
            &shared.opts.dir,
            shared.opts.segment_bytes,
            shared.opts.preallocate,
            shared.next_spare_id(),
        ) {
            Ok(spare) => {
                let mut slot = lock(&shared.spare);
                if slot.is_none() && !shared.closed.load(Ordering::Acquire) {
                    *slot = Some(spare);
                } else {
                    drop(slot);
                    let _ = shared.io.remove(&spare.tmp);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "wal spare segment could not be prepared; the writer will create it inline");
            }
        }
    }
}
