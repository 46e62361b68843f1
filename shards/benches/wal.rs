//! WAL benchmarks, plain `main` with std timing (run: `cargo bench -p ferry-shards --bench wal`).
//!
//! - durable append throughput (`fsync = always`) from 4 submitter threads, 200-byte payloads,
//!   pipelined (submitters never wait, as conversation actors do) and closed-loop (each thread
//!   waits for its ack before the next append: latency-bound);
//! - the same pipelined run with `fsync = never`;
//! - fdatasync latency per preallocation mode (zero-fill vs `posix_fallocate`), first, while the
//!   disk is quiet;
//! - recovery scan rate over a ~256 MB log, page cache warm and cold (segments dropped from the
//!   cache with `posix_fadvise(DONTNEED)`, which touches only our files).
//!
//! Batch sizes and fsync latencies come from the WAL's own metrics, captured by a tiny recorder.
//! `FERRY_BENCH_DIR` picks the directory (default: the system temp dir); `FERRY_BENCH_QUICK=1`
//! shrinks every run for a smoke test; `FERRY_BENCH_ONLY=append|prealloc|scan` runs one part.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_shards::metrics as names;
use ferry_shards::wal::{FsyncPolicy, Preallocate, SubmitError, Wal, WalOptions};
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

// ---- a recorder that keeps every histogram sample ----

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value);
    }
}

fn histograms() -> &'static Mutex<HashMap<String, Arc<Samples>>> {
    static H: OnceLock<Mutex<HashMap<String, Arc<Samples>>>> = OnceLock::new();
    H.get_or_init(Default::default)
}

fn samples(name: &str) -> Arc<Samples> {
    histograms()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.to_string())
        .or_default()
        .clone()
}

/// Takes (and clears) the samples of a histogram, sorted.
fn take_sorted(name: &str) -> Vec<f64> {
    let samples = samples(name);
    let mut values = std::mem::take(&mut *samples.0.lock().unwrap_or_else(|e| e.into_inner()));
    values.sort_by(|a, b| a.total_cmp(b));
    values
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Capture;

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(samples(key.name()))
    }
}

// ---- runs ----

fn options(dir: &Path, fsync: FsyncPolicy) -> WalOptions {
    let mut opts = WalOptions::new(dir);
    opts.fsync = fsync;
    opts
}

fn report_batches(label: &str, records: u64, elapsed: Duration) {
    let batches = take_sorted(names::WAL_BATCH_RECORDS);
    let fsyncs = take_sorted(names::WAL_FSYNC_SECONDS);
    println!(
        "{label:<44} {:>10.0} records/s  ({records} in {:.2} s)",
        records as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "{:<44} batch records p50 {:.0} p99 {:.0} max {:.0} ({} batches); fdatasync p50 {:.3} ms p99 {:.3} ms ({} syncs)",
        "",
        pct(&batches, 0.5),
        pct(&batches, 0.99),
        batches.last().copied().unwrap_or(0.0),
        batches.len(),
        pct(&fsyncs, 0.5) * 1e3,
        pct(&fsyncs, 0.99) * 1e3,
        fsyncs.len(),
    );
}

/// `threads` submitters, each appending `per_thread` records of `payload` bytes without waiting
/// (retrying on `Full`); returns when every completion has run.
fn pipelined(wal: &Wal, threads: usize, per_thread: u64, payload: usize) -> Duration {
    let done = Arc::new(AtomicU64::new(0));
    let (finished_tx, finished_rx) = mpsc::channel();
    let total = threads as u64 * per_thread;
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let wal = wal.clone();
            let done = done.clone();
            let finished_tx = finished_tx.clone();
            std::thread::spawn(move || {
                let body = vec![t as u8; payload];
                for _ in 0..per_thread {
                    loop {
                        let done = done.clone();
                        let finished_tx = finished_tx.clone();
                        let result = wal.submit(
                            1,
                            body.clone(),
                            Box::new(move |r| {
                                if r.is_err() {
                                    eprintln!("append failed: {r:?}");
                                }
                                if done.fetch_add(1, Ordering::Relaxed) + 1 == total {
                                    let _ = finished_tx.send(());
                                }
                            }),
                        );
                        match result {
                            Ok(()) => break,
                            Err(SubmitError::Full) => std::thread::yield_now(),
                            Err(e) => panic!("submit: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let _ = finished_rx.recv();
    started.elapsed()
}

/// `threads` submitters, each waiting for its ack before the next append.
fn closed_loop(wal: &Wal, threads: usize, per_thread: u64, payload: usize) -> Duration {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let body = vec![t as u8; payload];
                for _ in 0..per_thread {
                    let (tx, rx) = mpsc::channel();
                    wal.submit(
                        1,
                        body.clone(),
                        Box::new(move |r| {
                            let _ = tx.send(r);
                        }),
                    )
                    .expect("submit");
                    let _ = rx.recv();
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    started.elapsed()
}

fn drop_from_page_cache(dir: &Path) {
    use std::os::unix::io::AsRawFd;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if let Ok(file) = std::fs::File::open(entry.path()) {
            // SAFETY: plain advisory syscall on a descriptor we own.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

fn main() {
    if let Err(e) = metrics::set_global_recorder(Capture) {
        eprintln!("could not install the metrics recorder: {e}");
    }
    let quick = std::env::var("FERRY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let scale = if quick { 20 } else { 1 };
    let base = std::env::var_os("FERRY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&base).expect("temp dir");
    println!("wal bench in {}", tmp.path().display());
    println!();
    let only = std::env::var("FERRY_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;

    // 1. fdatasync cost by preallocation mode: one thread, one 4 KiB record per sync.
    for (label, how) in [
        ("zero-fill", Preallocate::ZeroFill),
        ("fallocate", Preallocate::Fallocate),
    ]
    .into_iter()
    .filter(|_| run("prealloc"))
    {
        let dir = tmp.path().join(format!("prealloc-{label}"));
        let mut opts = options(&dir, FsyncPolicy::Always);
        opts.preallocate = how;
        let (wal, _) = Wal::open(opts).expect("open");
        let _ = take_sorted(names::WAL_BATCH_RECORDS);
        let _ = take_sorted(names::WAL_FSYNC_SECONDS);
        let n = 3_000 / scale;
        let elapsed = closed_loop(&wal, 1, n, 4096);
        let fsyncs = take_sorted(names::WAL_FSYNC_SECONDS);
        println!(
            "preallocate {label:<10} 4 KiB append + fdatasync: p50 {:.3} ms p99 {:.3} ms mean {:.3} ms ({:.0} syncs/s)",
            pct(&fsyncs, 0.5) * 1e3,
            pct(&fsyncs, 0.99) * 1e3,
            fsyncs.iter().sum::<f64>() / fsyncs.len().max(1) as f64 * 1e3,
            n as f64 / elapsed.as_secs_f64(),
        );
        wal.shutdown();
    }
    println!();

    // 2. Durable appends, pipelined.
    if run("append") {
        let dir = tmp.path().join("always");
        let (wal, _) = Wal::open(options(&dir, FsyncPolicy::Always)).expect("open");
        let _ = take_sorted(names::WAL_BATCH_RECORDS);
        let _ = take_sorted(names::WAL_FSYNC_SECONDS);
        let per_thread = 100_000 / scale;
        let elapsed = pipelined(&wal, 4, per_thread, 200);
        report_batches(
            "always, 4 threads pipelined, 200 B",
            4 * per_thread,
            elapsed,
        );
        let per_thread = 2_000 / scale;
        let elapsed = closed_loop(&wal, 4, per_thread, 200);
        report_batches(
            "always, 4 threads closed-loop, 200 B",
            4 * per_thread,
            elapsed,
        );
        wal.shutdown();
    }

    // 3. No fsync.
    if run("append") {
        let dir = tmp.path().join("never");
        let (wal, _) = Wal::open(options(&dir, FsyncPolicy::Never)).expect("open");
        let _ = take_sorted(names::WAL_BATCH_RECORDS);
        let _ = take_sorted(names::WAL_FSYNC_SECONDS);
        let per_thread = 250_000 / scale;
        let elapsed = pipelined(&wal, 4, per_thread, 200);
        report_batches("never, 4 threads pipelined, 200 B", 4 * per_thread, elapsed);
        wal.shutdown();
    }

    // 4. Recovery scan rate over a ~256 MB log.
    println!();
    if run("scan") {
        let dir = tmp.path().join("scan");
        let target_bytes: u64 = (256 << 20) / scale;
        let payload = 200;
        let records = target_bytes / (payload as u64 + 17);
        {
            let (wal, _) = Wal::open(options(&dir, FsyncPolicy::Never)).expect("open");
            pipelined(&wal, 4, records / 4, payload);
            wal.shutdown();
        }
        let _ = take_sorted(names::WAL_BATCH_RECORDS);
        let _ = take_sorted(names::WAL_FSYNC_SECONDS);
        for cache in ["warm", "warm", "cold", "cold"] {
            if cache == "cold" {
                drop_from_page_cache(&dir);
            }
            let (wal, recovery) = Wal::open(options(&dir, FsyncPolicy::Never)).expect("reopen");
            let secs = recovery.scan_duration.as_secs_f64();
            println!(
                "recovery scan ({cache} cache): {} records, {:.0} MB scanned in {:.3} s = {:.0} MB/s ({:.0} records/s)",
                recovery.records.len(),
                recovery.bytes_scanned as f64 / 1e6,
                secs,
                recovery.bytes_scanned as f64 / 1e6 / secs,
                recovery.records.len() as f64 / secs,
            );
            drop(recovery);
            wal.shutdown();
        }
    }
}
