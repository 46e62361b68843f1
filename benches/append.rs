//! # In-process durable append benchmark
//!
//! Drives the real append path of `ferry serve` minus HTTP: [`Node::start`] over a real WAL in a
//! temp dir on the normal disk and the real SQLite archive ([`ferry::store::Store`], migrated),
//! with the Prometheus recorder installed as the server installs it. The node configuration is
//! [`NodeConfig::default`] and [`WalOptions::new`] (the server's defaults); only the fsync policy
//! changes per scenario.
//!
//! Scenarios (run in this order; pick any subset by name, default all):
//! - `fsync-floor`: one thread, 4 KiB `pwrite` + `fdatasync`, for the raw floor of this disk.
//! - `closed-always`: closed loop, fsync `always`: `--inflight` tasks spread over the
//!   conversations, each appending as soon as its previous append is acknowledged.
//! - `open-always`: open loop, fsync `always`: sends scheduled at a fixed `--rate`; latency is
//!   measured from the *scheduled* send time, so a stall is charged to every send it delays (no
//!   coordinated omission).
//! - `closed-never`: the closed loop with fsync `never` (benchmarks only; not durable).
//! - `wal-raw`: the WAL alone (no actors, no archive), one submitting thread, fsync `always`: the
//!   ceiling the node is working against.
//! - `recovery`: writes `--recovery-mb` of 200-byte records with `Wal` directly (fsync `never`),
//!   shuts it down and times `Wal::open`, warm (page cache) and cold (pages dropped with
//!   `posix_fadvise(DONTNEED)` on the segment files only).
//!
//! `try_again` answers are real behaviour (bounded mailboxes, bounded archive backlog): they are
//! counted by reason, never mixed into the latency histogram. A closed-loop task that gets one
//! waits `retry_after_ms` like a polite client; the open loop does not retry.
//!
//! Besides the numbers, each node scenario prints the CPU time of every thread group during the
//! measured window (from `/proc/self/task/*/stat`), which is where the time goes on this 2-core
//! machine, and the machine-wide CPU use (other processes included).
//!
//! Usage: `cargo bench --bench append -- [SCENARIO ...] [--duration S] [--warmup S]
//! [--inflight N[,N...]] [--rate R] [--conversations N] [--payload BYTES] [--recovery-mb MB]
//! [--segment-mb MB] [--dir PATH] [--no-metrics] [--idempotency-keys] [--archive sqlite|null]
//! [--database-url postgres://USER@HOST/DB]`
//!
//! `--database-url` archives into a fresh `ferry_bench_<random>` database on that Postgres server
//! (the user must be allowed to `CREATE DATABASE`; it is dropped afterwards) instead of SQLite.
//!
//! `--archive null` is a diagnostic, not a result: conversation loads still come from SQLite, but
//! archive batches are dropped, so the append path runs without the archiver competing for CPU.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use metrics::{Counter, Gauge, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serde_json::value::RawValue;

#[path = "common/pg.rs"]
mod pg;

use ferry::store::Store;
use ferry_shards::actor::conversation::AppendRequest;
use ferry_shards::archive::{Archive, ArchiveError, BoxFuture, ConversationSnapshot};
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::metrics as names;
use ferry_shards::node::{Node, NodeConfig, NodeError, TryAgainReason};
use ferry_shards::record::{now_ms, Message};
use ferry_shards::wal::{frame::FRAME_OVERHEAD, FsyncPolicy, Wal, WalOptions, WalStats};

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

const ALL_SCENARIOS: &[&str] = &[
    "fsync-floor",
    "closed-always",
    "open-always",
    "closed-never",
    "wal-raw",
    "recovery",
];

#[derive(Clone, Debug)]
struct Args {
    scenarios: Vec<String>,
    duration: Duration,
    warmup: Duration,
    inflight: Vec<usize>,
    rate: u64,
    conversations: usize,
    payload: usize,
    recovery_mb: u64,
    dir: PathBuf,
    metrics: bool,
    idempotency_keys: bool,
    /// Open loop: sends beyond this many outstanding are skipped (and counted) so an overloaded
    /// node cannot make the generator eat all memory.
    max_outstanding: usize,
    /// Diagnostic only: `null` keeps SQLite for conversation loads but discards archive batches,
    /// to show what the archiver costs the append path. Not what `ferry serve` runs.
    null_archive: bool,
    /// WAL segment size; default the server's 64 MiB.
    segment_mb: u64,
    /// Archive into a fresh database on this Postgres server instead of SQLite.
    database_url: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let default_dir = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let mut args = Args {
        scenarios: Vec::new(),
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        inflight: vec![4000],
        rate: 50_000,
        conversations: 1000,
        payload: 200,
        recovery_mb: 256,
        dir: default_dir,
        metrics: true,
        idempotency_keys: false,
        max_outstanding: 200_000,
        null_archive: false,
        segment_mb: 64,
        database_url: None,
    };
    let mut it = std::env::args().skip(1);
    let secs = |v: Option<String>, name: &str| -> Result<Duration, String> {
        let v = v.ok_or(format!("{name} needs a value"))?;
        v.parse::<f64>()
            .map(Duration::from_secs_f64)
            .map_err(|_| format!("{name}: bad number {v:?}"))
    };
    fn num<T: std::str::FromStr>(v: Option<String>, name: &str) -> Result<T, String> {
        let v = v.ok_or(format!("{name} needs a value"))?;
        v.replace('_', "")
            .parse()
            .map_err(|_| format!("{name}: bad number {v:?}"))
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            "--duration" => args.duration = secs(it.next(), "--duration")?,
            "--warmup" => args.warmup = secs(it.next(), "--warmup")?,
            "--inflight" => {
                let v: String = it.next().ok_or("--inflight needs a value")?;
                args.inflight = v
                    .split(',')
                    .map(|s| num(Some(s.to_owned()), "--inflight"))
                    .collect::<Result<_, _>>()?;
            }
            "--rate" => args.rate = num(it.next(), "--rate")?,
            "--conversations" => args.conversations = num(it.next(), "--conversations")?,
            "--payload" => args.payload = num(it.next(), "--payload")?,
            "--recovery-mb" => args.recovery_mb = num(it.next(), "--recovery-mb")?,
            "--segment-mb" => args.segment_mb = num(it.next(), "--segment-mb")?,
            "--database-url" => {
                args.database_url = Some(it.next().ok_or("--database-url needs a value")?)
            }
            "--max-outstanding" => args.max_outstanding = num(it.next(), "--max-outstanding")?,
            "--dir" => args.dir = PathBuf::from(it.next().ok_or("--dir needs a value")?),
            "--no-metrics" => args.metrics = false,
            "--archive" => match it.next().as_deref() {
                Some("sqlite") => args.null_archive = false,
                Some("null") => args.null_archive = true,
                other => return Err(format!("--archive: expected sqlite or null, got {other:?}")),
            },
            "--idempotency-keys" => args.idempotency_keys = true,
            "-h" | "--help" => {
                println!("scenarios: {} (default: all)", ALL_SCENARIOS.join(", "));
                println!("options: --duration S --warmup S --inflight N[,N..] --rate R --conversations N");
                println!(
                    "         --payload BYTES --recovery-mb MB --segment-mb MB --max-outstanding N --dir PATH"
                );
                println!("         --no-metrics --idempotency-keys --archive sqlite|null (null: diagnostic)");
                println!("         --database-url postgres://... (archive into a fresh Postgres database)");
                std::process::exit(0);
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if ALL_SCENARIOS.contains(&s) || s == "all" => args.scenarios.push(s.to_owned()),
            s => {
                return Err(format!(
                    "unknown scenario {s:?}; expected one of {ALL_SCENARIOS:?}"
                ))
            }
        }
    }
    if args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == "all") {
        args.scenarios = ALL_SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    if args.conversations == 0 || args.inflight.contains(&0) || args.rate == 0 {
        return Err("--conversations, --inflight and --rate must be positive".into());
    }
    if args.payload < 2 {
        return Err("--payload must be at least 2 (a JSON string)".into());
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Metrics: the server's Prometheus recorder, teed so the bench sees the WAL's per-batch numbers
// ---------------------------------------------------------------------------------------------

/// Exact per-batch distributions the WAL writer records as metrics, captured next to Prometheus.
struct WalTaps {
    batch_records: Mutex<Histogram<u64>>,
    /// Nanoseconds.
    fsync: Mutex<Histogram<u64>>,
    /// Nanoseconds from durable to stored in SQL, per archived message.
    archive_delay: Mutex<Histogram<u64>>,
}

impl WalTaps {
    fn new() -> WalTaps {
        WalTaps {
            batch_records: Mutex::new(Histogram::new_with_bounds(1, 1 << 24, 3).unwrap()),
            fsync: Mutex::new(Histogram::new_with_bounds(1_000, 120_000_000_000, 3).unwrap()),
            archive_delay: Mutex::new(
                Histogram::new_with_bounds(1_000, 3_600_000_000_000, 3).unwrap(),
            ),
        }
    }

    fn reset(&self) {
        self.batch_records.lock().unwrap().reset();
        self.fsync.lock().unwrap().reset();
        self.archive_delay.lock().unwrap().reset();
    }
}

static TAPS: std::sync::OnceLock<Arc<WalTaps>> = std::sync::OnceLock::new();

/// The server's recorder (same buckets as `ferry::metrics::install`), with the WAL batch-size
/// and fsync histograms also copied into [`WalTaps`].
struct TeeRecorder {
    inner: PrometheusRecorder,
    taps: Arc<WalTaps>,
}

enum Tap {
    BatchRecords,
    FsyncSeconds,
    ArchiveDelay,
}

struct TeeHistogram {
    inner: metrics::Histogram,
    tap: Tap,
    taps: Arc<WalTaps>,
}

impl metrics::HistogramFn for TeeHistogram {
    fn record(&self, value: f64) {
        self.inner.record(value);
        match self.tap {
            Tap::BatchRecords => {
                let _ = self
                    .taps
                    .batch_records
                    .lock()
                    .unwrap()
                    .record(value.max(1.0) as u64);
            }
            Tap::FsyncSeconds => {
                let ns = (value * 1e9).clamp(1_000.0, 120e9) as u64;
                let _ = self.taps.fsync.lock().unwrap().record(ns);
            }
            Tap::ArchiveDelay => {
                let ns = (value * 1e9).clamp(1_000.0, 3_600e9) as u64;
                let _ = self.taps.archive_delay.lock().unwrap().record(ns);
            }
        }
    }
}

impl Recorder for TeeRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Histogram {
        let inner = self.inner.register_histogram(key, metadata);
        let tap = match key.name() {
            n if n == names::WAL_BATCH_RECORDS => Tap::BatchRecords,
            n if n == names::WAL_FSYNC_SECONDS => Tap::FsyncSeconds,
            n if n == names::ARCHIVE_DELAY_SECONDS => Tap::ArchiveDelay,
            _ => return inner,
        };
        metrics::Histogram::from_arc(Arc::new(TeeHistogram {
            inner,
            tap,
            taps: self.taps.clone(),
        }))
    }
}

fn install_metrics() -> PrometheusHandle {
    // Mirrors `ferry::metrics::install` (the server's recorder), built rather than installed so
    // it can be teed.
    let buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let batch_buckets = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .expect("buckets")
        .set_buckets_for_metric(Matcher::Suffix("_records".into()), &batch_buckets)
        .expect("buckets")
        .build_recorder();
    let handle = recorder.handle();
    let taps = Arc::new(WalTaps::new());
    let _ = TAPS.set(taps.clone());
    metrics::set_global_recorder(TeeRecorder {
        inner: recorder,
        taps,
    })
    .expect("no recorder installed yet");
    // `install_recorder` leaves upkeep to the caller too; the server's exporter drains every 5 s.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("bench-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .expect("spawn upkeep");
    handle
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers
// ---------------------------------------------------------------------------------------------

/// Ack latencies in nanoseconds, sharded so concurrent recorders rarely share a lock.
struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    fn new() -> Latencies {
        Latencies {
            shards: (0..64)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1_000, 600_000_000_000, 3).unwrap()))
                .collect(),
        }
    }

    fn record(&self, shard: usize, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1_000, 600_000_000_000);
        let _ = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap()
            .record(ns);
    }

    fn merged(&self) -> Histogram<u64> {
        let mut out = Histogram::new_with_bounds(1_000, 600_000_000_000, 3).unwrap();
        for s in &self.shards {
            out.add(&*s.lock().unwrap()).unwrap();
        }
        out
    }
}

/// Outcome counters of one run.
#[derive(Default)]
struct Outcomes {
    ok: AtomicU64,
    mailbox_full: AtomicU64,
    wal_full: AtomicU64,
    archive_backlog: AtomicU64,
    restarting: AtomicU64,
    unavailable: AtomicU64,
    other_errors: AtomicU64,
}

impl Outcomes {
    fn count_err(&self, e: &NodeError) {
        let c = match e {
            NodeError::TryAgain { reason, .. } => match reason {
                TryAgainReason::MailboxFull => &self.mailbox_full,
                TryAgainReason::WalFull => &self.wal_full,
                TryAgainReason::ArchiveBacklog => &self.archive_backlog,
                TryAgainReason::Restarting | TryAgainReason::Activating => &self.restarting,
                TryAgainReason::Unavailable
                | TryAgainReason::SlotMoving
                | TryAgainReason::OwnerUnavailable
                | TryAgainReason::DiskFull => &self.unavailable,
            },
            _ => &self.other_errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn try_again(&self) -> u64 {
        self.mailbox_full.load(Ordering::Relaxed)
            + self.wal_full.load(Ordering::Relaxed)
            + self.archive_backlog.load(Ordering::Relaxed)
            + self.restarting.load(Ordering::Relaxed)
            + self.unavailable.load(Ordering::Relaxed)
    }

    fn try_again_breakdown(&self) -> String {
        let parts = [
            ("mailbox_full", &self.mailbox_full),
            ("wal_full", &self.wal_full),
            ("archive_backlog", &self.archive_backlog),
            ("restarting", &self.restarting),
            ("unavailable", &self.unavailable),
        ];
        let s: Vec<String> = parts
            .iter()
            .filter(|(_, c)| c.load(Ordering::Relaxed) > 0)
            .map(|(n, c)| format!("{n}={}", c.load(Ordering::Relaxed)))
            .collect();
        if s.is_empty() {
            "none".into()
        } else {
            s.join(" ")
        }
    }
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.2} s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}

fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_ns(h.value_at_quantile(0.5)),
        fmt_ns(h.value_at_quantile(0.9)),
        fmt_ns(h.value_at_quantile(0.99)),
        fmt_ns(h.value_at_quantile(0.999)),
        fmt_ns(h.max()),
        h.len()
    )
}

/// CPU seconds per thread group of this process, from `/proc/self/task/*/stat`.
fn thread_cpu() -> BTreeMap<String, f64> {
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        // Group numbered threads: "tokio-runtime-w", "ferry-sqlite-3" -> "ferry-sqlite".
        let group = comm.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // After the comm: state(0) ... utime(11) stime(12).
        let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
            continue;
        };
        let secs = (u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0)) / tick;
        *out.entry(group.to_owned()).or_insert(0.0) += secs;
    }
    out
}

/// Machine-wide CPU jiffies: (busy, iowait, total), from `/proc/stat`.
fn machine_cpu() -> (f64, f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0.0, 0.0, 0.0);
    };
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let idle = get(3);
    let iowait = get(4);
    let total: f64 = v.iter().take(8).sum();
    (total - idle - iowait, iowait, total)
}

struct CpuSnapshot {
    threads: BTreeMap<String, f64>,
    machine: (f64, f64, f64),
    at: Instant,
}

impl CpuSnapshot {
    fn take() -> CpuSnapshot {
        CpuSnapshot {
            threads: thread_cpu(),
            machine: machine_cpu(),
            at: Instant::now(),
        }
    }

    /// Prints per-thread-group CPU (in cores) between `self` and `later`; returns CPU seconds
    /// per thread group.
    fn report(&self, later: &CpuSnapshot) -> BTreeMap<String, f64> {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let mut rows: Vec<(String, f64)> = later
            .threads
            .iter()
            .map(|(k, v)| (k.clone(), v - self.threads.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d > 0.005 * wall)
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = rows.iter().map(|r| r.1).sum();
        let parts: Vec<String> = rows
            .iter()
            .map(|(k, d)| format!("{k} {:.2}", d / wall))
            .collect();
        println!(
            "  cpu (cores)     : this process {:.2} = {}",
            total / wall,
            parts.join(", ")
        );
        let (b0, w0, t0) = self.machine;
        let (b1, w1, t1) = later.machine;
        let dt = (t1 - t0).max(1.0);
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "  machine cpu     : busy {:.0}% of {} cores, iowait {:.0}%",
            100.0 * (b1 - b0) / dt,
            ncpu,
            100.0 * (w1 - w0) / dt
        );
        rows.into_iter().collect()
    }
}

/// CPU cost per acknowledged append (everything but SQLite) and per archived record (SQLite).
fn cpu_cost_report(cpu: &BTreeMap<String, f64>, acks: u64, archived: u64) {
    let sqlite: f64 = cpu
        .iter()
        .filter(|(k, _)| k.starts_with("ferry-sqlite"))
        .map(|(_, v)| v)
        .sum();
    let rest: f64 = cpu.values().sum::<f64>() - sqlite;
    let per = |secs: f64, n: u64| {
        if n == 0 {
            "n/a".to_owned()
        } else {
            format!("{:.1} µs", secs * 1e6 / n as f64)
        }
    };
    let group = |prefix: &str| -> f64 {
        cpu.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    // Thread names are cut to 15 bytes by the kernel.
    let writer = group("ferry-wal-wr");
    let tokio = group("tokio");
    println!(
        "  cpu per record  : {} per ack outside SQLite (tokio workers {}, wal writer {}); {} of SQLite per archived record",
        per(rest, acks),
        per(tokio, acks),
        per(writer, acks),
        per(sqlite, archived)
    );
}

fn wal_delta_report(s0: &WalStats, s1: &WalStats, window: f64, metrics: bool) {
    let records = s1.records_written - s0.records_written;
    let batches = s1.batches - s0.batches;
    let fsyncs = s1.fsyncs - s0.fsyncs;
    let bytes = s1.bytes_written - s0.bytes_written;
    println!(
        "  wal             : {records} records, {batches} batches, {fsyncs} fdatasyncs, {:.1} MB/s written, {} segment rolls",
        bytes as f64 / window / 1e6,
        s1.segment_rolls - s0.segment_rolls
    );
    if batches > 0 {
        let per_fsync = if fsyncs > 0 {
            format!("{:.1}", records as f64 / fsyncs as f64)
        } else {
            "n/a (no fsync)".into()
        };
        println!(
            "  batch size      : mean {:.1} records/batch (records/batches), {per_fsync} records/fdatasync, {:.0} fdatasyncs/s",
            records as f64 / batches as f64,
            fsyncs as f64 / window
        );
    }
    if metrics {
        if let Some(taps) = TAPS.get() {
            let b = taps.batch_records.lock().unwrap();
            if !b.is_empty() {
                println!(
                    "  batch records   : p10 {}  p50 {}  p90 {}  p99 {}  max {}  (per batch, n={})",
                    b.value_at_quantile(0.10),
                    b.value_at_quantile(0.5),
                    b.value_at_quantile(0.9),
                    b.value_at_quantile(0.99),
                    b.max(),
                    b.len()
                );
            }
            let f = taps.fsync.lock().unwrap();
            if !f.is_empty() {
                println!("  fdatasync time  : {}", latency_line(&f));
                // Share of the window the writer spent inside fdatasync.
                let sum_ns: f64 = f
                    .iter_recorded()
                    .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
                    .sum();
                println!(
                    "  writer in fsync : {:.0}% of the window",
                    100.0 * sum_ns / 1e9 / window
                );
            }
            let d = taps.archive_delay.lock().unwrap();
            if !d.is_empty() {
                println!(
                    "  archive delay   : {} (durable -> in SQL, per message archived in the window, n={})",
                    latency_line(&d),
                    d.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A node like `ferry serve` starts it
// ---------------------------------------------------------------------------------------------

struct Fixture {
    node: Node,
    store: Store,
    conversations: Vec<ConversationId>,
    sender: ParticipantId,
    content: Box<RawValue>,
    /// `(admin_url, database)` when archiving into Postgres: dropped at `stop`.
    postgres: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

fn content_of(bytes: usize) -> Box<RawValue> {
    // A JSON string of exactly `bytes` bytes, quotes included.
    let body: String = "ferry-bench-payload-"
        .chars()
        .cycle()
        .take(bytes - 2)
        .collect();
    RawValue::from_string(format!("\"{body}\"")).expect("valid json string")
}

async fn start_fixture(args: &Args, fsync: FsyncPolicy) -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("ferry-append-bench-")
        .tempdir_in(&args.dir)
        .expect("temp dir");
    let (url, postgres) = match &args.database_url {
        Some(admin) => {
            let (name, url) = pg::create_database(admin).await;
            println!("  archive         : Postgres, fresh database {name}");
            (url, Some((admin.clone(), name)))
        }
        None => (format!("sqlite://{}/ferry.db", dir.path().display()), None),
    };
    // The server's default archive pool size.
    let store = Store::connect(&url, 8).await.expect("open the archive");
    store.migrate().await.expect("migrate");
    let alice = ParticipantId::parse("alice").unwrap();
    let bob = ParticipantId::parse("bob").unwrap();
    let conversations: Vec<ConversationId> = (0..args.conversations)
        .map(|i| ConversationId::parse(&format!("bench-conv-{i:05}")).unwrap())
        .collect();
    let created = Instant::now();
    futures_util::stream::iter(conversations.iter())
        .map(|id| {
            let store = store.clone();
            let participants = [alice.clone(), bob.clone()];
            async move {
                store
                    .upsert_conversation(id, &participants, None, now_ms())
                    .await
                    .expect("create conversation")
            }
        })
        // One at a time: concurrent `upsert_conversation` calls fail with "database is locked"
        // (a deferred transaction that reads before it writes cannot upgrade its lock).
        .buffer_unordered(1)
        .for_each(|_| async {})
        .await;
    let created = created.elapsed();

    let mut wal = WalOptions::new(dir.path().join("wal"));
    wal.fsync = fsync;
    wal.segment_bytes = args.segment_mb << 20;
    let archive: Arc<dyn Archive> = if args.null_archive {
        println!(
            "  archive         : NULL (diagnostic): archive batches are discarded, not stored"
        );
        Arc::new(NullArchive(store.clone()))
    } else {
        Arc::new(store.clone())
    };
    let (node, _report) = Node::start(NodeConfig::default(), wal, archive)
        .await
        .expect("start node");
    // Activate every conversation actor up front so the warm-up measures appends, not loads.
    let activated = Instant::now();
    futures_util::stream::iter(conversations.iter())
        .map(|id| {
            let node = node.clone();
            async move { node.conversation(id).await.map(|_| ()) }
        })
        .buffer_unordered(64)
        .for_each(|r| async { r.expect("activate conversation") })
        .await;
    println!(
        "  setup           : {} conversations created in {:.2} s, activated in {:.2} s; data dir {}",
        conversations.len(),
        created.as_secs_f64(),
        activated.elapsed().as_secs_f64(),
        dir.path().display()
    );
    Fixture {
        node,
        store,
        conversations,
        sender: alice,
        content: content_of(args.payload),
        postgres,
        _dir: dir,
    }
}

impl Fixture {
    fn request(&self, key: Option<u64>) -> AppendRequest {
        request(&self.sender, &self.content, key)
    }

    async fn stop(self) {
        let stopped = Instant::now();
        let (backlog_records, _) = self.node.archive_backlog();
        self.node.shutdown().await;
        self.store.close().await;
        if let Some((admin, name)) = &self.postgres {
            pg::drop_database(admin, name).await;
        }
        println!(
            "  teardown        : node shutdown + archive close in {:.2} s ({} records were waiting for the archiver)",
            stopped.elapsed().as_secs_f64(),
            backlog_records
        );
    }
}

/// The real store for loads and reads; archive batches are acknowledged and dropped.
struct NullArchive(Store);

impl Archive for NullArchive {
    fn load_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
        dedupe_window: usize,
    ) -> BoxFuture<'a, Result<Option<ConversationSnapshot>, ArchiveError>> {
        self.0.load_conversation(id, dedupe_window)
    }

    fn store_messages<'a>(
        &'a self,
        _messages: &'a [Arc<Message>],
    ) -> BoxFuture<'a, Result<(), ArchiveError>> {
        Box::pin(async { Ok(()) })
    }

    fn read_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ArchiveError>> {
        self.0
            .read_messages(id, after_seq, before_seq, limit, newest_first)
    }
}

fn request(sender: &ParticipantId, content: &RawValue, key: Option<u64>) -> AppendRequest {
    AppendRequest {
        sender: sender.clone(),
        kind: "text".into(),
        content: content.to_owned(),
        metadata: RawValue::from_string("{}".to_owned()).expect("static json"),
        idempotency_key: key.map(|k| format!("bench-{k}").into_boxed_str()),
    }
}

fn archive_report(node: &Node, ck0: u64, ck1: u64, window: f64) {
    let (records, bytes) = node.archive_backlog();
    println!(
        "  archive         : {:.0} records/s archived to SQL (checkpoint lsn {} -> {}); backlog at end {} records / {:.1} MB (try_again above {} MB)",
        (ck1 - ck0) as f64 / window,
        ck0,
        ck1,
        records,
        bytes as f64 / 1e6,
        node.config().archive_backlog_bytes >> 20
    );
}

// ---------------------------------------------------------------------------------------------
// Closed loop
// ---------------------------------------------------------------------------------------------

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

async fn closed_loop(args: &Args, fsync: FsyncPolicy, inflight: usize) {
    println!(
        "\n== closed loop, fsync {fsync}: {inflight} in flight over {} conversations, {} B content, {:.0} s warm-up + {:.0} s ==",
        args.conversations,
        args.payload,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let fx = Arc::new(start_fixture(args, fsync).await);
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let outcomes = Arc::new(Outcomes::default());
    let lat = Arc::new(Latencies::new());
    let keys = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(inflight);
    for t in 0..inflight {
        let fx = fx.clone();
        let phase = phase.clone();
        let outcomes = outcomes.clone();
        let lat = lat.clone();
        let keys = keys.clone();
        let with_keys = args.idempotency_keys;
        tasks.push(tokio::spawn(async move {
            let conv = fx.conversations[t % fx.conversations.len()].clone();
            loop {
                if phase.load(Ordering::Relaxed) == STOP {
                    break;
                }
                let key = with_keys.then(|| keys.fetch_add(1, Ordering::Relaxed));
                let req = fx.request(key);
                let started = Instant::now();
                let result = fx.node.append(&conv, req).await;
                let took = started.elapsed();
                let measuring = phase.load(Ordering::Relaxed) == MEASURE;
                match result {
                    Ok(_) => {
                        if measuring {
                            outcomes.ok.fetch_add(1, Ordering::Relaxed);
                            lat.record(t, took);
                        }
                    }
                    Err(e) => {
                        if measuring {
                            outcomes.count_err(&e);
                        }
                        let wait = match &e {
                            NodeError::TryAgain { retry_after_ms, .. } => *retry_after_ms,
                            other => {
                                eprintln!("append failed: {other}");
                                100
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                }
            }
        }));
    }

    tokio::time::sleep(args.warmup).await;
    let wal0 = fx.node.wal().stats();
    if let Some(t) = TAPS.get() {
        t.reset();
    }
    let cpu0 = CpuSnapshot::take();
    let t0 = Instant::now();
    phase.store(MEASURE, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    phase.store(STOP, Ordering::Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let cpu1 = CpuSnapshot::take();
    let wal1 = fx.node.wal().stats();
    archive_report(&fx.node, wal0.checkpoint_lsn, wal1.checkpoint_lsn, window);
    for t in tasks {
        let _ = t.await;
    }

    let ok = outcomes.ok.load(Ordering::Relaxed);
    let h = lat.merged();
    println!(
        "  RESULT          : {:.0} acknowledged appends/s ({ok} in {window:.2} s)",
        ok as f64 / window
    );
    println!("  ack latency     : {}", latency_line(&h));
    println!(
        "  try_again       : {} ({}); other errors {}",
        outcomes.try_again(),
        outcomes.try_again_breakdown(),
        outcomes.other_errors.load(Ordering::Relaxed)
    );
    wal_delta_report(&wal0, &wal1, window, args.metrics);
    let cpu = cpu0.report(&cpu1);
    cpu_cost_report(&cpu, ok, wal1.checkpoint_lsn - wal0.checkpoint_lsn);
    match Arc::try_unwrap(fx) {
        Ok(fx) => fx.stop().await,
        Err(_) => eprintln!("fixture still shared; skipping orderly shutdown"),
    }
}

// ---------------------------------------------------------------------------------------------
// Open loop
// ---------------------------------------------------------------------------------------------

/// How late the generator itself was: the pacer thread's wake-up (`pacer`) and the moment the
/// send's task first ran on the runtime (`start`), both from the scheduled send time. Both are
/// part of the reported ack latency; `start - pacer` is the runtime's scheduling delay.
const PACER_NICE: libc::c_int = -10;

struct Lags {
    pacer: Latencies,
    start: Latencies,
    /// How long the pacer's `thread::sleep` overran its deadline.
    oversleep: Latencies,
    /// How long one `Handle::spawn` call took in the pacer.
    spawn: Latencies,
}

fn lag_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "n/a".into();
    }
    format!(
        "{} / {} / {}",
        fmt_ns(h.value_at_quantile(0.5)),
        fmt_ns(h.value_at_quantile(0.99)),
        fmt_ns(h.max())
    )
}

async fn open_loop(args: &Args, fsync: FsyncPolicy) {
    println!(
        "\n== open loop, fsync {fsync}: {} appends/s offered over {} conversations, {} B content, {:.0} s warm-up + {:.0} s ==",
        args.rate,
        args.conversations,
        args.payload,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let fx = Arc::new(start_fixture(args, fsync).await);
    let outcomes = Arc::new(Outcomes::default());
    let lat = Arc::new(Latencies::new());
    let outstanding = Arc::new(AtomicUsize::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let offered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();
    let lags = Arc::new(Lags {
        pacer: Latencies::new(),
        start: Latencies::new(),
        oversleep: Latencies::new(),
        spawn: Latencies::new(),
    });

    let start = Instant::now() + Duration::from_millis(20);
    let window_start = start + args.warmup;
    let window_end = window_start + args.duration;
    let rate = args.rate as f64;
    let max_outstanding = args.max_outstanding;
    let with_keys = args.idempotency_keys;

    // The pacer is a plain thread: tokio's timer has 1 ms granularity, which at 50k/s would
    // bunch sends into bursts of 50. A thread sleep here wakes within ~50-100 µs (timer slack);
    // every send is still timed from its exact scheduled instant.
    let pacer = {
        let fx = fx.clone();
        let outcomes = outcomes.clone();
        let lat = lat.clone();
        let outstanding = outstanding.clone();
        let skipped = skipped.clone();
        let offered = offered.clone();
        let stop = stop.clone();
        let lags = lags.clone();
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                // The pacer shares 2 cores with the node it drives; a late wake-up is charged to
                // every send it delays. Ask for a higher priority (best effort: needs
                // CAP_SYS_NICE) so the generator's own lag stays out of the node's numbers.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
                let reniced =
                    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, PACER_NICE) } == 0;
                println!(
                    "  pacer           : nice {}",
                    if reniced {
                        PACER_NICE.to_string()
                    } else {
                        "0 (renice refused)".into()
                    }
                );
                let mut i: u64 = 0;
                loop {
                    let now = Instant::now();
                    if now >= window_end || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    loop {
                        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
                        if scheduled > now {
                            break;
                        }
                        let measured = scheduled >= window_start && scheduled < window_end;
                        i += 1;
                        if measured {
                            offered.fetch_add(1, Ordering::Relaxed);
                        }
                        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
                            if measured {
                                skipped.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        outstanding.fetch_add(1, Ordering::Relaxed);
                        let fx = fx.clone();
                        let outcomes = outcomes.clone();
                        let lat = lat.clone();
                        let outstanding = outstanding.clone();
                        let task_lags = lags.clone();
                        let n = i;
                        if measured {
                            lags.pacer
                                .record(n as usize, now.saturating_duration_since(scheduled));
                        }
                        let spawn_started = Instant::now();
                        runtime.spawn(async move {
                            if measured {
                                task_lags.start.record(
                                    n as usize,
                                    Instant::now().saturating_duration_since(scheduled),
                                );
                            }
                            let conv = &fx.conversations[(n as usize) % fx.conversations.len()];
                            let req = fx.request(with_keys.then_some(n));
                            let result = fx.node.append(conv, req).await;
                            let took = Instant::now().saturating_duration_since(scheduled);
                            if measured {
                                match result {
                                    Ok(_) => {
                                        outcomes.ok.fetch_add(1, Ordering::Relaxed);
                                        lat.record(n as usize, took);
                                    }
                                    Err(e) => outcomes.count_err(&e),
                                }
                            }
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                        });
                        if measured {
                            lags.spawn.record(0, spawn_started.elapsed());
                        }
                    }
                    let next = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                        if next >= window_start {
                            lags.oversleep
                                .record(0, Instant::now().saturating_duration_since(next));
                        }
                    }
                }
                i
            })
            .expect("spawn pacer")
    };

    tokio::time::sleep_until(window_start.into()).await;
    let wal0 = fx.node.wal().stats();
    if let Some(t) = TAPS.get() {
        t.reset();
    }
    let cpu0 = CpuSnapshot::take();
    tokio::time::sleep_until(window_end.into()).await;
    let cpu1 = CpuSnapshot::take();
    let wal1 = fx.node.wal().stats();
    let window = args.duration.as_secs_f64();
    archive_report(&fx.node, wal0.checkpoint_lsn, wal1.checkpoint_lsn, window);
    let sent = tokio::task::spawn_blocking(move || pacer.join().expect("pacer"))
        .await
        .expect("join pacer");
    // Let every measured send finish: a late ack is charged to its scheduled time.
    let drain = Instant::now();
    while outstanding.load(Ordering::Relaxed) > 0 && drain.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let ok = outcomes.ok.load(Ordering::Relaxed);
    let h = lat.merged();
    println!(
        "  RESULT          : offered {:.0}/s ({} scheduled in the window), acknowledged {:.0}/s ({ok})",
        offered.load(Ordering::Relaxed) as f64 / window,
        offered.load(Ordering::Relaxed),
        ok as f64 / window
    );
    println!(
        "  ack latency     : {} (from scheduled send time)",
        latency_line(&h)
    );
    println!(
        "  try_again       : {} ({}); other errors {}; skipped by generator (>{} outstanding) {}",
        outcomes.try_again(),
        outcomes.try_again_breakdown(),
        outcomes.other_errors.load(Ordering::Relaxed),
        max_outstanding,
        skipped.load(Ordering::Relaxed)
    );
    println!(
        "  send lag        : pacer woke late by {}; task first ran late by {} (p50 / p99 / max, from the scheduled time)",
        lag_line(&lags.pacer.merged()),
        lag_line(&lags.start.merged())
    );
    println!(
        "  pacer internals : thread::sleep overran by {}; one Handle::spawn took {} (p50 / p99 / max)",
        lag_line(&lags.oversleep.merged()),
        lag_line(&lags.spawn.merged())
    );
    println!(
        "  generator       : {sent} sends in total incl. warm-up; in-flight sends drained {:.2} s after the window",
        drain.elapsed().as_secs_f64()
    );
    wal_delta_report(&wal0, &wal1, window, args.metrics);
    let cpu = cpu0.report(&cpu1);
    cpu_cost_report(
        &cpu,
        wal1.records_written - wal0.records_written,
        wal1.checkpoint_lsn - wal0.checkpoint_lsn,
    );
    // Spawned sends hold fixture clones until they finish; wait for the last ones to drop.
    let mut fx = fx;
    let fx = loop {
        match Arc::try_unwrap(fx) {
            Ok(fx) => break Some(fx),
            Err(again) => {
                if drain.elapsed() > Duration::from_secs(60) {
                    break None;
                }
                fx = again;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    match fx {
        Some(fx) => fx.stop().await,
        None => eprintln!("sends still running after 60 s; skipping orderly shutdown"),
    }
}

// ---------------------------------------------------------------------------------------------
// The WAL alone
// ---------------------------------------------------------------------------------------------

/// Submits records of `payload` bytes; waits and retries while the queue is full.
fn submit_blocking(wal: &Wal, payload: &[u8], done: ferry_shards::wal::Completion) {
    let mut done = Some(done);
    loop {
        // `submit` drops the completion on refusal, so hand it a forwarding one.
        let inner = done.take().expect("completion");
        let slot = Arc::new(Mutex::new(Some(inner)));
        let fwd = slot.clone();
        let r = wal.submit(
            1,
            payload.to_vec(),
            Box::new(move |res| {
                if let Some(f) = fwd.lock().unwrap().take() {
                    f(res)
                }
            }),
        );
        match r {
            Ok(()) => return,
            Err(ferry_shards::wal::SubmitError::Full) => {
                done = slot.lock().unwrap().take();
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => panic!("wal submit: {e}"),
        }
    }
}

fn barrier_wait(wal: &Wal) {
    let (tx, rx) = mpsc::sync_channel(1);
    loop {
        let tx = tx.clone();
        match wal.barrier(Box::new(move |r| {
            let _ = tx.send(r);
        })) {
            Ok(()) => break,
            Err(ferry_shards::wal::SubmitError::Full) => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("wal barrier: {e}"),
        }
    }
    rx.recv().expect("barrier answered").expect("barrier ok");
}

fn wal_raw(args: &Args) {
    println!(
        "\n== wal alone, fsync always: one thread submitting {} B records as fast as the queue takes them, {:.0} s warm-up + {:.0} s ==",
        args.payload,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let dir = tempfile::Builder::new()
        .prefix("ferry-wal-raw-")
        .tempdir_in(&args.dir)
        .expect("temp dir");
    let opts = WalOptions::new(dir.path().join("wal"));
    let (wal, _) = Wal::open(opts).expect("open wal");
    let payload = vec![b'x'; args.payload];
    let acked = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + args.warmup + args.duration;
    let mut started = None;
    let mut wal0 = None;
    let mut cpu0 = None;
    let warm_end = Instant::now() + args.warmup;
    let mut acked0 = 0;
    while Instant::now() < end {
        if started.is_none() && Instant::now() >= warm_end {
            wal0 = Some(wal.stats());
            if let Some(t) = TAPS.get() {
                t.reset();
            }
            cpu0 = Some(CpuSnapshot::take());
            acked0 = acked.load(Ordering::Relaxed);
            started = Some(Instant::now());
        }
        for _ in 0..256 {
            let acked = acked.clone();
            submit_blocking(
                &wal,
                &payload,
                Box::new(move |r| {
                    if r.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }),
            );
        }
    }
    let window = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let cpu1 = CpuSnapshot::take();
    let wal1 = wal.stats();
    let done = acked.load(Ordering::Relaxed) - acked0;
    println!(
        "  RESULT          : {:.0} durable records/s from the WAL alone",
        done as f64 / window
    );
    if let (Some(w0), Some(c0)) = (wal0, cpu0) {
        wal_delta_report(&w0, &wal1, window, args.metrics);
        let cpu = c0.report(&cpu1);
        let writer: f64 = cpu
            .iter()
            .filter(|(k, _)| k.starts_with("ferry-wal-wr"))
            .map(|(_, v)| v)
            .sum();
        println!(
            "  cpu per record  : {:.2} µs on the wal writer",
            writer * 1e6 / (wal1.records_written - w0.records_written).max(1) as f64
        );
    }
    wal.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Recovery scan
// ---------------------------------------------------------------------------------------------

fn drop_page_cache(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        if let Ok(f) = File::open(&path) {
            let _ = f.sync_all();
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc == 0 {
                n += 1;
            }
        }
    }
    n
}

fn recovery(args: &Args) {
    let frame = args.payload + FRAME_OVERHEAD;
    let records = (args.recovery_mb << 20) / frame as u64;
    println!(
        "\n== wal recovery scan: {records} records of {} B ({} B framed, {} MiB), written with fsync never ==",
        args.payload, frame, args.recovery_mb
    );
    let dir = tempfile::Builder::new()
        .prefix("ferry-recovery-")
        .tempdir_in(&args.dir)
        .expect("temp dir");
    let mut opts = WalOptions::new(dir.path().join("wal"));
    opts.fsync = FsyncPolicy::Never;
    let payload: Vec<u8> = (0..args.payload).map(|i| (i % 251) as u8).collect();
    {
        let written = Instant::now();
        let (wal, _) = Wal::open(opts.clone()).expect("open wal");
        for _ in 0..records {
            submit_blocking(&wal, &payload, Box::new(|_| {}));
        }
        barrier_wait(&wal);
        wal.shutdown();
        let s = wal.stats();
        drop(wal);
        println!(
            "  write           : {} records in {:.2} s ({:.0} records/s, fsync never), {} segments",
            s.records_written,
            written.elapsed().as_secs_f64(),
            s.records_written as f64 / written.elapsed().as_secs_f64(),
            s.segments
        );
    }
    for (label, cold) in [
        ("warm (page cache)", false),
        ("cold (fadvise DONTNEED)", true),
    ] {
        if cold {
            let files = drop_page_cache(&opts.dir);
            println!("  dropped the page cache of {files} wal files");
        }
        let opened = Instant::now();
        let (wal, rec) = Wal::open(opts.clone()).expect("reopen wal");
        let open_time = opened.elapsed();
        let payload_bytes: u64 = rec.records.iter().map(|r| r.payload.len() as u64).sum();
        let framed = payload_bytes + (rec.records.len() * FRAME_OVERHEAD) as u64;
        let scan = rec.scan_duration.as_secs_f64();
        println!(
            "  RESULT {label:<23}: scan {:.0} MB/s ({:.1} MB scanned in {:.3} s, {} records, {:.1} MB of frames => {:.0} MB/s of records); Wal::open total {:.3} s",
            rec.bytes_scanned as f64 / scan / 1e6,
            rec.bytes_scanned as f64 / 1e6,
            scan,
            rec.records.len(),
            framed as f64 / 1e6,
            framed as f64 / scan / 1e6,
            open_time.as_secs_f64()
        );
        assert_eq!(rec.records.len() as u64, records, "every record recovered");
        drop(rec);
        wal.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// The raw disk
// ---------------------------------------------------------------------------------------------

fn fsync_floor(args: &Args) {
    const N: usize = 2000;
    println!("\n== fdatasync floor: {N} × (4 KiB pwrite + fdatasync) on a preallocated file, one thread ==");
    let dir = tempfile::Builder::new()
        .prefix("ferry-fsync-floor-")
        .tempdir_in(&args.dir)
        .expect("temp dir");
    let path = dir.path().join("floor");
    let f = File::create(&path).expect("create");
    let len = (N * 4096) as u64;
    f.write_all_at(&vec![0u8; N * 4096], 0).expect("prefill");
    f.sync_all().expect("sync");
    let block = vec![7u8; 4096];
    let mut h = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
    let started = Instant::now();
    for i in 0..N {
        let t = Instant::now();
        f.write_all_at(&block, (i as u64 * 4096) % len)
            .expect("write");
        f.sync_data().expect("fdatasync");
        let _ = h.record((t.elapsed().as_nanos() as u64).max(1_000));
    }
    println!(
        "  RESULT          : {}; {:.0} syncs/s",
        latency_line(&h),
        N as f64 / started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------

fn fs_type(path: &Path) -> String {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "unknown".into();
    }
    match s.f_type as i64 {
        0x01021994 => "tmpfs (NOT a real disk: numbers are meaningless for fsync)".into(),
        0xEF53 => "ext2/3/4".into(),
        0x58465342 => "xfs".into(),
        0x9123683E => "btrfs".into(),
        0x794c7630 => "overlayfs".into(),
        other => format!("0x{other:x}"),
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&args.dir).expect("bench dir");
    println!("ferry in-process append benchmark");
    println!(
        "  scenarios {:?}; data under {} ({}); metrics recorder {}",
        args.scenarios,
        args.dir.display(),
        fs_type(&args.dir),
        if args.metrics {
            "prometheus (as `ferry serve`)"
        } else {
            "none"
        }
    );
    if args.metrics {
        let _ = install_metrics();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    for scenario in args.scenarios.clone() {
        match scenario.as_str() {
            "fsync-floor" => fsync_floor(&args),
            "closed-always" => {
                for &n in &args.inflight {
                    runtime.block_on(closed_loop(&args, FsyncPolicy::Always, n));
                }
            }
            "open-always" => runtime.block_on(open_loop(&args, FsyncPolicy::Always)),
            "closed-never" => {
                for &n in &args.inflight {
                    runtime.block_on(closed_loop(&args, FsyncPolicy::Never, n));
                }
            }
            "wal-raw" => wal_raw(&args),
            "recovery" => recovery(&args),
            _ => unreachable!(),
        }
    }
}
