//! The writer thread: the only code that appends to segments.
//!
//! Loop: block for the first request, drain whatever else is already queued (up to
//! `max_batch_bytes`), assign lsns and encode every record into one buffer, write it with one
//! `pwrite`, `fdatasync` once (per policy), then run the batch's completions in order. Nothing
//! sleeps to wait for more work: the batch is whatever queued while the last one was syncing.
//!
//! Positions: `written_lsn` moves after the `pwrite` returns, `durable_lsn` after the
//! `fdatasync` returns; `durable_lsn ≤ written_lsn` always (see the module docs of `wal`).
//!
//! A batch that does not fit in the active segment is split: the part that fits is written and
//! synced, the segment rolls to the prepared spare (rename + directory `fsync`), and the rest goes
//! to the new segment — so a segment is wholly durable before its successor has a name.
//!
//! A failed `fdatasync` or directory `fsync`, and any other failed write or roll, poisons the log:
//! the error is logged once, the failing batch and all later requests complete with
//! `Err(Poisoned)`, and nothing is written again.
//!
//! Lack of space is the exception ([`Writer::until_space`]): a write, spare creation or rename
//! that fails with `ENOSPC` is repeated — the same bytes at the same offset — with backoff, while
//! the log is marked disk full and new requests are refused. The writer holds its batch (and the
//! queue) meanwhile instead of failing it: each record already has its lsn and its conversation
//! its seq, so failing one while later ones got written would leave a hole. A shutdown during the
//! wait answers what was not written with `Closed` (never acknowledged, never poisoned).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::frame;
use super::housekeeper::Msg as HouseMsg;
use super::segment::{self, ActiveSegment};
use super::{lock, names, FsyncPolicy, Lsn, Request, SegmentEntry, Shared, Waiter, WalError};

/// What to answer, in order, once the batch is written (and synced).
enum Pending {
    Record(Lsn, Waiter),
    Barrier(Waiter),
    Rejected(Waiter, WalError),
}

/// Why the writer stopped writing.
enum Failure {
    /// A fault after which nothing more may be written: poisons the log.
    Poison { op: &'static str, error: WalError },
    /// Shutdown came while the writer waited for disk space: what is not written is answered
    /// `Closed`; nothing on disk is in doubt, so nothing is poisoned.
    Abandoned,
}

/// The first wait after the disk was found full; it doubles up to `disk_full_retry`.
const DISK_FULL_FIRST_RETRY: Duration = Duration::from_millis(10);

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Request>,
    house_tx: SyncSender<HouseMsg>,
    active: ActiveSegment,
    next_lsn: Lsn,
    /// Encoded frames not yet written; always destined for `active` at `active.offset`.
    buf: Vec<u8>,
    batch: Vec<Pending>,
    batch_records: u64,
    /// Bytes written to `active` that no `fdatasync` covers yet.
    dirty: bool,
    last_sync: Instant,
    /// Set once the active segment is half full and a spare was asked for.
    spare_requested: bool,
    /// What poisoned the log, for every later error.
    poison_cause: Option<Arc<str>>,
    /// Shutdown interrupted a wait for disk space: nothing more is written (see [`Failure`]).
    abandoned: bool,
    fsync_seconds: ::metrics::Histogram,
    batch_records_hist: ::metrics::Histogram,
    bytes_total: ::metrics::Counter,
    records_total: ::metrics::Counter,
    durable_gauge: ::metrics::Gauge,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        rx: Receiver<Request>,
        house_tx: SyncSender<HouseMsg>,
        active: ActiveSegment,
        next_lsn: Lsn,
    ) -> Writer {
        let buf_capacity = shared.opts.max_batch_bytes.min(64 << 20) + 4096;
        Writer {
            shared,
            rx,
            house_tx,
            active,
            next_lsn,
            buf: Vec::with_capacity(buf_capacity),
            batch: Vec::new(),
            batch_records: 0,
            dirty: false,
            last_sync: Instant::now(),
            spare_requested: false,
            poison_cause: None,
            abandoned: false,
            fsync_seconds: ::metrics::histogram!(names::WAL_FSYNC_SECONDS),
            batch_records_hist: ::metrics::histogram!(names::WAL_BATCH_RECORDS),
            bytes_total: ::metrics::counter!(names::WAL_BYTES_TOTAL),
            records_total: ::metrics::counter!(names::WAL_RECORDS_TOTAL),
            durable_gauge: ::metrics::gauge!(names::WAL_DURABLE_LSN),
        }
    }

    pub(super) fn run(mut self) {
        self.maybe_request_spare();
        let mut stopping = false;
        loop {
            let first = if stopping {
                // Drain what raced in behind the shutdown request, then stop.
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            } else {
                match self.wait_for_request() {
                    Some(r) => r,
                    None => break,
                }
            };
            let mut force_sync = false;
            let mut batch_bytes = 0usize;
            self.accept(first, &mut stopping, &mut force_sync, &mut batch_bytes);
            while batch_bytes < self.shared.opts.max_batch_bytes {
                match self.rx.try_recv() {
                    Ok(r) => self.accept(r, &mut stopping, &mut force_sync, &mut batch_bytes),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.commit(force_sync || stopping);
            if self.shared.closed.load(Ordering::Acquire) {
                stopping = true;
            }
        }
        // Shutdown: make everything written durable, whatever the policy.
        self.commit(true);
        let _ = self.house_tx.send(HouseMsg::Shutdown);
        tracing::debug!(
            durable_lsn = self.shared.durable_lsn.load(Ordering::Acquire),
            "wal writer stopped"
        );
    }

    /// Blocks for the next request; under `Interval` it wakes up to sync dirty data on time.
    fn wait_for_request(&mut self) -> Option<Request> {
        loop {
            let deadline = match self.shared.opts.fsync {
                FsyncPolicy::Interval(every) if self.dirty && !self.poisoned() => {
                    Some(self.last_sync + every)
                }
                _ => None,
            };
            let Some(deadline) = deadline else {
                return self.rx.recv().ok();
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(r) => return Some(r),
                Err(RecvTimeoutError::Timeout) => self.commit(true),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Poisoned, or abandoned at shutdown: either way nothing more is written.
    fn stopped_writing(&self) -> bool {
        self.abandoned || self.poisoned()
    }

    /// The error for a request that will not be written.
    fn stopped_error(&self) -> WalError {
        if self.poisoned() {
            self.poison_error()
        } else {
            WalError::Closed
        }
    }

    fn poison_error(&self) -> WalError {
        WalError::Poisoned {
            cause: self
                .poison_cause
                .clone()
                .unwrap_or_else(|| Arc::from("earlier write or fsync")),
            durable_lsn: self.shared.durable_lsn.load(Ordering::Acquire),
        }
    }

    fn accept(
        &mut self,
        request: Request,
        stopping: &mut bool,
        force_sync: &mut bool,
        batch_bytes: &mut usize,
    ) {
        if !matches!(request, Request::Shutdown) {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        }
        match request {
            Request::Shutdown => *stopping = true,
            Request::Barrier { done } => {
                *force_sync = true;
                self.batch.push(Pending::Barrier(done));
            }
            Request::Append {
                kind,
                payload,
                done,
            } => {
                if self.stopped_writing() {
                    let err = self.stopped_error();
                    self.batch.push(Pending::Rejected(done, err));
                    return;
                }
                let max = self.shared.opts.max_payload_bytes();
                if payload.len() > max {
                    let err = WalError::RecordTooLarge {
                        len: payload.len(),
                        max,
                    };
                    self.batch.push(Pending::Rejected(done, err));
                    return;
                }
                let len = frame::frame_len(payload.len());
                let end = self.active.offset + self.buf.len() as u64 + len as u64;
                if end > self.active.capacity {
                    if let Err(failure) = self.roll() {
                        self.fail(failure);
                        let err = self.stopped_error();
                        self.batch.push(Pending::Rejected(done, err));
                        return;
                    }
                }
                let lsn = self.next_lsn;
                frame::encode(&mut self.buf, kind, lsn, &payload);
                self.next_lsn += 1;
                self.batch_records += 1;
                *batch_bytes += len;
                self.batch.push(Pending::Record(lsn, done));
            }
        }
    }

    /// Writes `buf` to the active segment with one `pwrite` (repeated while the disk is full).
    fn write_buf(&mut self) -> Result<(), Failure> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let offset = self.active.offset;
        // A retry writes the whole buffer again at the same offset: whatever part of a failed
        // attempt reached the page cache is overwritten with the same bytes.
        let result = self.until_space("write", |w| {
            w.active
                .file
                .write_all_at(&buf, offset)
                .map_err(|e| WalError::io("write", &w.active.path, e))
        });
        // Keep the allocation for the next batch.
        self.buf = buf;
        let n = self.buf.len() as u64;
        self.buf.clear();
        result?;
        self.active.offset += n;
        self.dirty = true;
        self.shared
            .written_lsn
            .store(self.next_lsn - 1, Ordering::Release);
        self.shared
            .stats
            .bytes_written
            .fetch_add(n, Ordering::Relaxed);
        self.bytes_total.increment(n);
        Ok(())
    }

    /// One `fdatasync` of the active segment, if anything written is not yet covered.
    fn sync(&mut self) -> Result<(), Failure> {
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.active.file.sync_data();
        self.fsync_seconds.record(started.elapsed().as_secs_f64());
        self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            // Never retried, whatever the errno: after a failed writeback the kernel may have
            // marked the pages clean, and a second fdatasync would report success for data
            // that is not on disk. ENOSPC here (thin provisioning, NFS) is no different.
            return Err(Failure::Poison {
                op: "fdatasync",
                error: WalError::io("fdatasync", &self.active.path, e),
            });
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        let written = self.shared.written_lsn.load(Ordering::Acquire);
        self.shared.durable_lsn.store(written, Ordering::Release);
        self.durable_gauge.set(written as f64);
        Ok(())
    }

    /// Closes the active segment (written and synced) and opens the next one under its name.
    fn roll(&mut self) -> Result<(), Failure> {
        self.write_buf()?;
        self.sync()?;
        let shared = self.shared.clone();
        let dir = &shared.opts.dir;
        let spare = self.until_space("segment creation", |_| {
            let spare = lock(&shared.spare).take();
            match spare {
                Some(spare) if spare.len == shared.opts.segment_bytes => Ok(spare),
                other => {
                    if let Some(stale) = other {
                        let _ = shared.io.remove(&stale.tmp);
                    }
                    shared.stats.spare_misses.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("wal spare segment not ready, creating one inline");
                    segment::prepare_spare(
                        shared.io.as_ref(),
                        dir,
                        shared.opts.segment_bytes,
                        shared.opts.preallocate,
                        shared.next_spare_id(),
                    )
                }
            }
        });
        let spare = spare?;
        let first_lsn = self.next_lsn;
        let renamed = self.until_space("segment roll", |_| {
            segment::rename_spare(shared.io.as_ref(), dir, &spare, first_lsn)
        });
        if let Err(failure) = renamed {
            let _ = shared.io.remove(&spare.tmp);
            return Err(failure);
        }
        let active = segment::sync_installed(shared.io.as_ref(), dir, spare, first_lsn).map_err(
            |error| Failure::Poison {
                op: "segment roll",
                error,
            },
        )?;
        let segments = {
            let mut segments = lock(&shared.segments);
            // An empty active segment (recovered, smaller than the record) has the same name as
            // its replacement: the rename replaced it, so it is not a second segment.
            if segments.back().map(|s| s.first_lsn) != Some(active.first_lsn) {
                segments.push_back(SegmentEntry {
                    first_lsn: active.first_lsn,
                    path: active.path.clone(),
                });
            }
            segments.len()
        };
        self.active = active;
        self.spare_requested = false;
        shared.stats.segment_rolls.fetch_add(1, Ordering::Relaxed);
        ::metrics::gauge!(names::WAL_SEGMENTS).set(segments as f64);
        tracing::debug!(first_lsn = self.next_lsn, "wal segment rolled");
        Ok(())
    }

    /// Asks the housekeeper for the next segment once the active one is half full.
    fn maybe_request_spare(&mut self) {
        if !self.spare_requested && self.active.offset * 2 >= self.active.capacity {
            self.spare_requested = true;
            self.shared.spare_wanted.store(true, Ordering::Release);
            let _ = self.house_tx.try_send(HouseMsg::Wake);
        }
    }

    /// Writes the batch, syncs per policy, runs the completions in order.
    fn commit(&mut self, force_sync: bool) {
        let records = std::mem::take(&mut self.batch_records);
        if !self.stopped_writing() {
            let result = self.write_buf().and_then(|()| {
                let due = match self.shared.opts.fsync {
                    FsyncPolicy::Always => true,
                    FsyncPolicy::Interval(every) => self.last_sync.elapsed() >= every,
                    FsyncPolicy::Never => false,
                };
                if due || force_sync {
                    self.sync()
                } else {
                    Ok(())
                }
            });
            if let Err(failure) = result {
                self.fail(failure);
            }
        }
        if records > 0 {
            let stats = &self.shared.stats;
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.records_written.fetch_add(records, Ordering::Relaxed);
            stats
                .max_batch_records
                .fetch_max(records, Ordering::Relaxed);
            self.records_total.increment(records);
            self.batch_records_hist.record(records as f64);
        }
        let stopped = self.stopped_writing();
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        for pending in std::mem::take(&mut self.batch) {
            match pending {
                Pending::Record(lsn, done) => {
                    if stopped && lsn > durable {
                        done.complete(Err(self.stopped_error()));
                    } else {
                        done.complete(Ok(lsn));
                    }
                }
                Pending::Barrier(done) => {
                    if stopped {
                        done.complete(Err(self.stopped_error()));
                    } else {
                        done.complete(Ok(durable));
                    }
                }
                Pending::Rejected(done, err) => done.complete(Err(err)),
            }
        }
        self.maybe_request_spare();
    }

    /// Runs `attempt` until it succeeds, repeating it with backoff while it fails for lack of
    /// space. Any other error is a [`Failure::Poison`]; a shutdown during the wait is
    /// [`Failure::Abandoned`]. While it waits, the log is marked disk full: `submit` and
    /// `barrier` refuse, and the metric and one log line tell the operator.
    fn until_space<T>(
        &mut self,
        op: &'static str,
        mut attempt: impl FnMut(&mut Self) -> Result<T, WalError>,
    ) -> Result<T, Failure> {
        let mut wait = DISK_FULL_FIRST_RETRY;
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            let error = match attempt(self) {
                Ok(value) => {
                    if attempts > 1 {
                        self.space_returned(op, attempts);
                    }
                    return Ok(value);
                }
                Err(error) if error.is_disk_full() => error,
                Err(error) => return Err(Failure::Poison { op, error }),
            };
            if attempts == 1 {
                self.disk_full(op, &error);
            }
            if self.shared.closed.load(Ordering::Acquire) {
                tracing::warn!(
                    op,
                    durable_lsn = self.shared.durable_lsn.load(Ordering::Acquire),
                    unwritten_requests = self.batch.len(),
                    "wal shutting down while the disk is full: unwritten records are not acknowledged"
                );
                return Err(Failure::Abandoned);
            }
            // Woken early by shutdown (`Handle::shutdown` unparks this thread).
            std::thread::park_timeout(wait);
            wait = (wait * 2).min(self.shared.opts.disk_full_retry.max(DISK_FULL_FIRST_RETRY));
        }
    }

    fn disk_full(&self, op: &'static str, error: &WalError) {
        if self.shared.disk_full.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared
            .stats
            .disk_full_episodes
            .fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(names::WAL_DISK_FULL_TOTAL).increment(1);
        ::metrics::gauge!(names::WAL_DISK_FULL).set(1.0);
        tracing::error!(
            op,
            error = %error,
            dir = %self.shared.opts.dir.display(),
            durable_lsn = self.shared.durable_lsn.load(Ordering::Acquire),
            waiting_requests = self.batch.len(),
            "wal disk full: appends get try_again until space returns; nothing acknowledged is lost"
        );
    }

    fn space_returned(&self, op: &'static str, attempts: u64) {
        if !self.shared.disk_full.swap(false, Ordering::AcqRel) {
            return;
        }
        ::metrics::gauge!(names::WAL_DISK_FULL).set(0.0);
        tracing::warn!(
            op,
            attempts,
            durable_lsn = self.shared.durable_lsn.load(Ordering::Acquire),
            "wal has disk space again: appends resume"
        );
    }

    fn fail(&mut self, failure: Failure) {
        match failure {
            Failure::Poison { op, error } => self.poison(op, error),
            Failure::Abandoned => {
                self.abandoned = true;
                self.buf.clear();
            }
        }
    }

    fn poison(&mut self, op: &'static str, error: WalError) {
        if self.shared.poisoned.swap(true, Ordering::AcqRel) {
            return;
        }
        ::metrics::gauge!(names::WAL_POISONED).set(1.0);
        if self.shared.disk_full.swap(false, Ordering::AcqRel) {
            // Poisoned while waiting for space: the node needs a restart now, not space.
            ::metrics::gauge!(names::WAL_DISK_FULL).set(0.0);
        }
        self.buf.clear();
        self.poison_cause = Some(Arc::from(format!("{op}: {error}")));
        tracing::error!(
            op,
            error = %error,
            segment = %self.active.path.display(),
            durable_lsn = self.shared.durable_lsn.load(Ordering::Acquire),
            written_lsn = self.shared.written_lsn.load(Ordering::Acquire),
            "wal poisoned: no further records will be acknowledged"
        );
    }
}
