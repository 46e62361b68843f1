//! # The node's write-ahead log
//!
//! Owns `<data-dir>/wal/`: CRC32-framed records in preallocated segment files, the archived-LSN
//! `checkpoint`, the `lost-lsns` list written by repair, and `quarantine/`. Every accepted record
//! of the node goes through here before it is acknowledged. The byte format is documented in
//! `docs/log-format.md`.
//!
//! ## Layout
//! - [`frame`]: encode/decode of one frame, nothing else.
//! - [`segment`]: segment naming, listing, and the durable birth of a segment (temp name →
//!   preallocate → `fsync` → rename → directory `fsync`).
//! - [`checkpoint`]: the `checkpoint` and `lost-lsns` files.
//! - [`recovery`]: the scan on open: CRC and lsn continuity, torn-tail truncation, refusal on
//!   mid-log corruption, and the repair path.
//! - `writer`: the one writer thread: group commit (drain → one write → one `fdatasync` →
//!   completions in order) and poisoning.
//! - `housekeeper`: a background thread that persists checkpoints, deletes archived segments and
//!   prepares the next segment ahead of time, so neither stalls a batch.
//! - [`io`]: the [`WalIo`] trait every file operation goes through, and [`FsIo`], the real one.
//! - [`sim`]: a simulated disk for tests (crash with unsynced-write loss, fault injection).
//!
//! ## Invariants
//! - Lsns are 1-based and contiguous (+1 per record), assigned by the writer in queue order, and
//!   continue across restarts and segment deletion. After a repair they skip over the lost range,
//!   never reusing an lsn that was on disk.
//! - `durable_lsn ≤ written_lsn ≤ next_lsn - 1`. *Written* means handed to the kernel (`pwrite`
//!   returned); *durable* means an `fdatasync` covering it returned Ok. Under
//!   [`FsyncPolicy::Always`] a completion runs only once its lsn is durable; under `Interval` and
//!   `Never` once it is written. `durable_lsn` never moves backwards and never passes
//!   `written_lsn`; the two are equal whenever the writer is idle under `Always`.
//! - Completions run on the writer thread, exactly once each, strictly in submission (= lsn)
//!   order. A completion that is never reached (shutdown races) is called with `Err(Closed)`.
//! - A failed `fdatasync` (any error, `ENOSPC` included), a failed directory `fsync`, and a
//!   write that fails for any reason but lack of space poison the log for good: the failing batch
//!   and everything after it complete with `Err(Poisoned)`; fsync is never retried (the kernel may
//!   have dropped the dirty pages, so a retry could falsely succeed).
//! - Lack of space (`ENOSPC`/`EDQUOT`) from a write, a spare's creation or preallocation, or a
//!   segment rename does not poison: nothing dirty was lost, so the writer keeps what it holds,
//!   marks the log *disk full* ([`Wal::disk_full`]), and repeats the same operation — the same
//!   bytes at the same offset — with backoff until it succeeds. Meanwhile [`Wal::submit`] and
//!   [`Wal::barrier`] answer [`SubmitError::DiskFull`] and nothing queued is failed, so every
//!   record that got an lsn is either written in order or (at shutdown) answered `Closed`, never
//!   skipped. Bytes of a failed write that did reach the page cache are overwritten by the retry;
//!   a crash before it leaves them as an unacknowledged tail that recovery truncates (a torn
//!   frame) or replays (whole frames, never acknowledged — as after any crash before `fsync`).
//! - A segment is fully durable before its successor gets a name, so only the last segment can
//!   have a torn tail; anything bad before the last valid frame is corruption.
//! - The checkpoint file is durable before any segment it allows to delete is removed; the active
//!   segment is never deleted.
//!
//! ## What it must not do
//! - Interpret payloads: `kind` and `payload` are opaque bytes (the node encodes them).
//! - Block the caller: [`Wal::submit`] never waits; a full queue is [`SubmitError::Full`].
//! - Sleep to batch: a batch is whatever queued while the previous one was syncing.
//! - Run on tokio: the writer is a plain thread doing blocking IO.

pub mod checkpoint;
mod error;
pub mod frame;
mod housekeeper;
pub mod io;
pub mod recovery;
pub mod segment;
pub mod sim;
mod writer;

#[cfg(test)]
mod tests;

use std::any::Any;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

pub use error::{SubmitError, WalError};
pub use io::{FsIo, Preallocate, WalFile, WalIo};
pub use recovery::{Damage, RepairReport};

use crate::metrics as names;
use segment::Spare;

/// Log sequence number: 1-based, +1 per record, never reused.
pub type Lsn = u64;

/// When the writer calls `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every batch, before its completions: the only durable policy.
    Always,
    /// Completions after the write; `fdatasync` at most once per interval (and on barrier).
    Interval(Duration),
    /// No `fdatasync` except on barrier, segment roll and shutdown: benchmarks only.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => {
                let ms = other.strip_prefix("interval:").ok_or_else(|| {
                    format!(
                        "unknown fsync policy {other:?}: expected always, interval:<ms> or never"
                    )
                })?;
                let ms = ms.trim().trim_end_matches("ms");
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("bad fsync interval {ms:?}: expected milliseconds"))?;
                if ms == 0 {
                    return Err("fsync interval must be at least 1 ms (use always)".into());
                }
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// How to open the WAL.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// The WAL directory itself (the node passes `<data-dir>/wal`).
    pub dir: PathBuf,
    /// Size of a segment file; a frame never spans two segments. Default 64 MiB.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Records (and barriers) the queue holds before `submit` answers `Full`. Default 65 536.
    pub queue_capacity: usize,
    /// The writer stops draining the queue into one batch past this many encoded bytes.
    /// Default 4 MiB.
    pub max_batch_bytes: usize,
    /// On mid-log corruption keep the valid prefix and quarantine the rest instead of refusing
    /// to open. Default false.
    pub repair: bool,
    /// How new segments reserve their space. Default [`Preallocate::ZeroFill`].
    pub preallocate: Preallocate,
    /// The longest wait between two attempts while the disk is full (the first is after 10 ms,
    /// doubling). Default 1 s.
    pub disk_full_retry: Duration,
}

impl WalOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalOptions {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Always,
            queue_capacity: 65_536,
            max_batch_bytes: 4 << 20,
            repair: false,
            preallocate: Preallocate::default(),
            disk_full_retry: Duration::from_secs(1),
        }
    }

    fn validate(&self) -> Result<(), WalError> {
        let min = frame::FRAME_OVERHEAD as u64 * 4;
        if self.segment_bytes < min || self.segment_bytes > u64::from(u32::MAX) {
            return Err(WalError::InvalidOptions(format!(
                "segment_bytes must be between {min} and {}, got {}",
                u32::MAX,
                self.segment_bytes
            )));
        }
        if self.queue_capacity == 0 {
            return Err(WalError::InvalidOptions(
                "queue_capacity must be at least 1".into(),
            ));
        }
        if self.max_batch_bytes == 0 {
            return Err(WalError::InvalidOptions(
                "max_batch_bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The largest payload a record may carry.
    pub fn max_payload_bytes(&self) -> usize {
        (self.segment_bytes as usize).saturating_sub(frame::FRAME_OVERHEAD)
    }
}

/// One record read back by recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalRecord {
    pub lsn: Lsn,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// What [`Wal::open`] found on disk.
#[derive(Debug)]
pub struct Recovery {
    /// Every record with `lsn > checkpoint`, in lsn order.
    pub records: Vec<WalRecord>,
    /// The archived-lsn checkpoint read from disk (0 if none).
    pub checkpoint: Lsn,
    /// The lsn the next record will get.
    pub next_lsn: Lsn,
    /// Segment bytes read.
    pub bytes_scanned: u64,
    pub scan_duration: Duration,
    /// Bytes of a torn tail that were zeroed (0 if none).
    pub torn_tail_bytes: u64,
    /// Segments deleted because every record in them is ≤ the checkpoint.
    pub segments_deleted: usize,
    /// What repair did, when `repair` was set and there was something to repair.
    pub repair: Option<RepairReport>,
}

/// Called once, on the writer thread, with the record's lsn (or the barrier's durable lsn) or
/// the reason it will never be durable.
pub type Completion = Box<dyn FnOnce(Result<Lsn, WalError>) + Send + 'static>;

/// Counters for tests, the admin UI and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Segment files on disk (including the active one).
    pub segments: usize,
    pub bytes_written: u64,
    pub records_written: u64,
    /// Write batches (one `pwrite` each, except a batch split by a segment roll).
    pub batches: u64,
    /// The largest batch so far, in records.
    pub max_batch_records: u64,
    pub fsyncs: u64,
    pub segment_rolls: u64,
    /// Rolls that found no spare ready and created the segment inline.
    pub spare_misses: u64,
    pub written_lsn: Lsn,
    pub durable_lsn: Lsn,
    /// Highest checkpoint accepted by [`Wal::checkpoint`].
    pub checkpoint_lsn: Lsn,
    /// Highest checkpoint on disk.
    pub checkpoint_persisted_lsn: Lsn,
    pub segments_deleted: u64,
    pub queued: usize,
    /// Set while the writer waits for disk space (see the module docs).
    pub disk_full: bool,
    /// Times the writer found the disk full (one per episode, however long it lasted).
    pub disk_full_episodes: u64,
    pub poisoned: bool,
}

/// A request on the writer's queue.
enum Request {
    Append {
        kind: u8,
        payload: Vec<u8>,
        done: Waiter,
    },
    Barrier {
        done: Waiter,
    },
    Shutdown,
}

/// A completion that is called exactly once: by [`Waiter::complete`], or with `Err(Closed)` if the
/// request is dropped unanswered (e.g. still queued when the writer exits).
struct Waiter(Option<Completion>);

impl Waiter {
    fn complete(mut self, result: Result<Lsn, WalError>) {
        if let Some(done) = self.0.take() {
            call(done, result);
        }
    }

    /// Drops the completion without calling it (the caller got a synchronous error instead).
    fn disarm(mut self) {
        self.0.take();
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            call(done, Err(WalError::Closed));
        }
    }
}

/// Runs a completion; a panicking one is logged and does not take the writer thread down.
fn call(done: Completion, result: Result<Lsn, WalError>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(result)));
    if outcome.is_err() {
        tracing::error!("wal completion panicked");
    }
}

/// A segment on disk, as the writer and housekeeper track it.
struct SegmentEntry {
    first_lsn: Lsn,
    path: PathBuf,
}

/// State shared by the handle, the writer and the housekeeper.
struct Shared {
    opts: WalOptions,
    io: Arc<dyn WalIo>,
    /// Last lsn handed to the kernel.
    written_lsn: AtomicU64,
    /// Last lsn covered by a successful `fdatasync` (≤ `written_lsn`).
    durable_lsn: AtomicU64,
    /// Highest checkpoint accepted from the archiver (persisted lazily).
    checkpoint_requested: AtomicU64,
    /// Highest checkpoint known to be on disk.
    checkpoint_persisted: AtomicU64,
    poisoned: AtomicBool,
    /// Set by the writer while it waits for space; new requests are refused meanwhile.
    disk_full: AtomicBool,
    /// Set by shutdown: submits answer `Closed` from then on.
    closed: AtomicBool,
    queued: AtomicUsize,
    /// Segments on disk, oldest first; the last one is the writer's active segment.
    segments: Mutex<VecDeque<SegmentEntry>>,
    /// The next segment, prepared ahead by the housekeeper.
    spare: Mutex<Option<Spare>>,
    /// Set by the writer when it wants `spare` filled.
    spare_wanted: AtomicBool,
    spare_counter: AtomicU64,
    stats: Counters,
    writer_thread: Mutex<Option<ThreadId>>,
    /// The directory lock: released by a shutdown that joined both threads (no file operation
    /// can follow), or when the last handle and thread are gone.
    dir_lock: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

#[derive(Default)]
struct Counters {
    bytes_written: AtomicU64,
    records_written: AtomicU64,
    batches: AtomicU64,
    max_batch_records: AtomicU64,
    fsyncs: AtomicU64,
    segment_rolls: AtomicU64,
    spare_misses: AtomicU64,
    segments_deleted: AtomicU64,
    disk_full_episodes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn segments_len(&self) -> usize {
        lock(&self.segments).len()
    }

    fn next_spare_id(&self) -> u64 {
        self.spare_counter.fetch_add(1, Ordering::Relaxed)
    }
}

/// Cheap, cloneable handle to the WAL. When the last clone is dropped the WAL shuts down.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    tx: SyncSender<Request>,
    house_tx: SyncSender<housekeeper::Msg>,
    threads: Mutex<Threads>,
}

#[derive(Default)]
struct Threads {
    writer: Option<JoinHandle<()>>,
    housekeeper: Option<JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Wal {
    /// Opens (or creates) the WAL on the real filesystem and recovers it.
    pub fn open(opts: WalOptions) -> Result<(Wal, Recovery), WalError> {
        Wal::open_with_io(opts, Arc::new(FsIo))
    }

    /// Opens the WAL with every file operation going through `io`.
    pub fn open_with_io(opts: WalOptions, io: Arc<dyn WalIo>) -> Result<(Wal, Recovery), WalError> {
        opts.validate()?;
        let dir = opts.dir.clone();
        io.create_dir_all(&dir)
            .map_err(|e| WalError::io("create dir", &dir, e))?;
        let dir_lock = io.lock_dir(&dir).map_err(|e| WalError::Locked {
            dir: dir.clone(),
            source: Arc::new(e),
        })?;
        let spare_counter = AtomicU64::new(0);
        let recovered = recovery::recover(io.as_ref(), &opts, &spare_counter)?;
        let recovery = recovered.recovery;
        let last_lsn = recovery.next_lsn - 1;
        let checkpoint = recovery.checkpoint;
        let segments: VecDeque<SegmentEntry> = recovered
            .segments
            .into_iter()
            .map(|(first_lsn, path)| SegmentEntry { first_lsn, path })
            .collect();
        let shared = Arc::new(Shared {
            io,
            written_lsn: AtomicU64::new(last_lsn),
            durable_lsn: AtomicU64::new(last_lsn),
            checkpoint_requested: AtomicU64::new(checkpoint),
            checkpoint_persisted: AtomicU64::new(checkpoint),
            poisoned: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            segments: Mutex::new(segments),
            spare: Mutex::new(None),
            spare_wanted: AtomicBool::new(false),
            spare_counter,
            stats: Counters::default(),
            writer_thread: Mutex::new(None),
            dir_lock: Mutex::new(Some(dir_lock)),
            opts,
        });
        ::metrics::gauge!(names::WAL_SEGMENTS).set(shared.segments_len() as f64);
        ::metrics::gauge!(names::WAL_DURABLE_LSN).set(last_lsn as f64);
        ::metrics::gauge!(names::WAL_CHECKPOINT_LSN).set(checkpoint as f64);
        ::metrics::gauge!(names::WAL_POISONED).set(0.0);
        ::metrics::gauge!(names::WAL_DISK_FULL).set(0.0);

        let (tx, rx) = mpsc::sync_channel(shared.opts.queue_capacity);
        let (house_tx, house_rx) = mpsc::sync_channel(64);
        let writer = writer::Writer::new(
            shared.clone(),
            rx,
            house_tx.clone(),
            recovered.active,
            recovery.next_lsn,
        );
        let writer = std::thread::Builder::new()
            .name("ferry-wal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| WalError::io("spawn writer thread", &shared.opts.dir, e))?;
        *lock(&shared.writer_thread) = Some(writer.thread().id());
        let house = housekeeper::Housekeeper::new(shared.clone(), house_rx);
        let housekeeper = std::thread::Builder::new()
            .name("ferry-wal-housekeeper".into())
            .spawn(move || house.run())
            .map_err(|e| WalError::io("spawn housekeeper thread", &shared.opts.dir, e))?;
        tracing::info!(
            dir = %shared.opts.dir.display(),
            next_lsn = recovery.next_lsn,
            checkpoint = checkpoint,
            records = recovery.records.len(),
            torn_tail_bytes = recovery.torn_tail_bytes,
            fsync = %shared.opts.fsync,
            "wal opened"
        );
        let wal = Wal {
            inner: Arc::new(Handle {
                shared,
                tx,
                house_tx,
                threads: Mutex::new(Threads {
                    writer: Some(writer),
                    housekeeper: Some(housekeeper),
                }),
            }),
        };
        Ok((wal, recovery))
    }

    /// Queues one record. Never blocks: a full queue returns [`SubmitError::Full`] at once, a
    /// full disk [`SubmitError::DiskFull`]. On `Err`, `done` is dropped without being called.
    ///
    /// `done` runs on the writer thread once the record is durable (`Always`) or written
    /// (`Interval`, `Never`), or with `Err` if the log is poisoned or closed first, or if the
    /// record is larger than [`WalOptions::max_payload_bytes`] (then it gets no lsn).
    /// Completions run strictly in submission (= lsn) order.
    pub fn submit(&self, kind: u8, payload: Vec<u8>, done: Completion) -> Result<(), SubmitError> {
        self.send(Request::Append {
            kind,
            payload,
            done: Waiter(Some(done)),
        })
    }

    /// Completes with `Ok(durable_lsn)` once everything submitted before it is durable (it forces
    /// an `fdatasync` under every policy); writes nothing.
    pub fn barrier(&self, done: Completion) -> Result<(), SubmitError> {
        self.send(Request::Barrier {
            done: Waiter(Some(done)),
        })
    }

    fn send(&self, request: Request) -> Result<(), SubmitError> {
        let shared = &self.inner.shared;
        let refuse = |request: Request, err: SubmitError| {
            if let Request::Append { done, .. } | Request::Barrier { done } = request {
                done.disarm();
            }
            Err(err)
        };
        if shared.poisoned.load(Ordering::Acquire) {
            return refuse(request, SubmitError::Poisoned);
        }
        if shared.closed.load(Ordering::Acquire) {
            return refuse(request, SubmitError::Closed);
        }
        if shared.disk_full.load(Ordering::Acquire) {
            return refuse(request, SubmitError::DiskFull);
        }
        // Count first so the writer's decrement can never underflow.
        shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.inner.tx.try_send(request) {
            Ok(()) => Ok(()),
            Err(e) => {
                shared.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(r) => refuse(r, SubmitError::Full),
                    TrySendError::Disconnected(r) => refuse(r, SubmitError::Closed),
                }
            }
        }
    }

    /// Records that every lsn ≤ `archived` is stored elsewhere. Cheap: the housekeeper persists
    /// it (tmp → `fsync` → rename → `fsync` dir) in the background and then deletes whole
    /// segments whose records are all ≤ the persisted value (never the active one). A value not
    /// above the current checkpoint is ignored; one above the last written lsn is an error.
    pub fn checkpoint(&self, archived: Lsn) -> Result<(), WalError> {
        let shared = &self.inner.shared;
        let written = shared.written_lsn.load(Ordering::Acquire);
        if archived > written {
            return Err(WalError::CheckpointAhead { archived, written });
        }
        let previous = shared
            .checkpoint_requested
            .fetch_max(archived, Ordering::AcqRel);
        if archived > previous {
            ::metrics::gauge!(names::WAL_CHECKPOINT_LSN).set(archived as f64);
            // A full channel already holds a wake-up; a closed one means shutdown persists it.
            let _ = self.inner.house_tx.try_send(housekeeper::Msg::Wake);
        }
        Ok(())
    }

    /// Blocks until the latest accepted checkpoint is on disk and the segments it covers are
    /// deleted. For tests and orderly shutdown; the archiver need not call it.
    pub fn flush_checkpoint(&self) -> Result<Lsn, WalError> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.inner
            .house_tx
            .send(housekeeper::Msg::Flush(reply_tx))
            .map_err(|_| WalError::Closed)?;
        reply_rx.recv().map_err(|_| WalError::Closed)?
    }

    /// Last lsn covered by a successful `fdatasync`.
    pub fn durable_lsn(&self) -> Lsn {
        self.inner.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// Last lsn written to the kernel (≥ `durable_lsn`).
    pub fn written_lsn(&self) -> Lsn {
        self.inner.shared.written_lsn.load(Ordering::Acquire)
    }

    /// Highest checkpoint accepted (it may still be on its way to disk).
    pub fn checkpoint_lsn(&self) -> Lsn {
        self.inner
            .shared
            .checkpoint_requested
            .load(Ordering::Acquire)
    }

    pub fn poisoned(&self) -> bool {
        self.inner.shared.poisoned.load(Ordering::Acquire)
    }

    /// True while the writer waits for disk space; requests are refused with
    /// [`SubmitError::DiskFull`] meanwhile.
    pub fn disk_full(&self) -> bool {
        self.inner.shared.disk_full.load(Ordering::Acquire)
    }

    /// Records and barriers waiting in the queue.
    pub fn queued(&self) -> usize {
        self.inner.shared.queued.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &WalOptions {
        &self.inner.shared.opts
    }

    pub fn stats(&self) -> WalStats {
        let s = &self.inner.shared;
        let c = &s.stats;
        WalStats {
            segments: s.segments_len(),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            records_written: c.records_written.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            max_batch_records: c.max_batch_records.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            segment_rolls: c.segment_rolls.load(Ordering::Relaxed),
            spare_misses: c.spare_misses.load(Ordering::Relaxed),
            written_lsn: s.written_lsn.load(Ordering::Acquire),
            durable_lsn: s.durable_lsn.load(Ordering::Acquire),
            checkpoint_lsn: s.checkpoint_requested.load(Ordering::Acquire),
            checkpoint_persisted_lsn: s.checkpoint_persisted.load(Ordering::Acquire),
            segments_deleted: c.segments_deleted.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
            poisoned: s.poisoned.load(Ordering::Acquire),
            disk_full: s.disk_full.load(Ordering::Acquire),
            disk_full_episodes: c.disk_full_episodes.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, writes and syncs everything queued, completes it, persists the pending
    /// checkpoint, joins both threads and releases the directory lock (the directory may be
    /// opened again while this handle still exists). Idempotent. Called from a completion (on the
    /// writer thread) it stops the writer but cannot join it; the lock is then released when the
    /// last handle is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Handle {
    fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        // Wakes an idle writer; if the queue is full the writer is busy and sees `closed` after
        // draining it.
        let _ = self.tx.try_send(Request::Shutdown);
        let on_writer = *lock(&self.shared.writer_thread) == Some(std::thread::current().id());
        if on_writer {
            return;
        }
        let mut threads = lock(&self.threads);
        if let Some(writer) = threads.writer.take() {
            // A writer waiting for disk space parks between attempts: wake it to see `closed`.
            writer.thread().unpark();
            if writer.join().is_err() {
                tracing::error!("wal writer thread panicked");
            }
        }
        // The writer tells the housekeeper to finish once it is done; this covers a writer that
        // died early.
        let _ = self.house_tx.send(housekeeper::Msg::Shutdown);
        if let Some(house) = threads.housekeeper.take() {
            if house.join().is_err() {
                tracing::error!("wal housekeeper thread panicked");
            }
        }
        // Both threads are gone and every entry point now refuses: nothing touches the
        // directory any more, so another WAL may open it even while stale handles live on.
        lock(&self.shared.dir_lock).take();
    }
}
