//! What one worker saw, kept so that workers never share a lock on the hot path: each owns a
//! [`Recorder`] and the run [`Recorder::merge`]s them at the end. Latencies are microseconds in
//! an HDR histogram (3 significant digits, 1 µs to 1 h; anything longer saturates at 1 h rather
//! than being dropped). The timeline keeps one bucket per second of the run for the plot.

use std::time::Duration;

use hdrhistogram::{Counter, Histogram};
use serde::Serialize;

/// Highest latency the histograms track, in microseconds (an hour).
const MAX_MICROS: u64 = 3_600_000_000;
/// Error messages kept verbatim for the report; the rest are only counted.
const MAX_ERROR_SAMPLES: usize = 8;

fn histogram<T: Counter>(sigfig: u8) -> Histogram<T> {
    Histogram::new_with_bounds(1, MAX_MICROS, sigfig).expect("static histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_MICROS)
}

/// One second of the run.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub ok: u64,
    pub try_again: u64,
    pub errors: u64,
    /// Coarser (2 digits, 32-bit counts) than the run's histogram: it is only drawn, and a run
    /// with a thousand subscribers keeps one per subscriber per second.
    pub latency: Histogram<u32>,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            ok: 0,
            try_again: 0,
            errors: 0,
            latency: histogram(2),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Recorder {
    /// Successful operations, microseconds from the scheduled time to the answer.
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub try_again: u64,
    pub errors: u64,
    /// Sends not made because `--max-outstanding` were already in flight.
    pub skipped: u64,
    pub timeline: Vec<Bucket>,
    pub error_samples: Vec<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            latency: histogram(3),
            ok: 0,
            try_again: 0,
            errors: 0,
            skipped: 0,
            timeline: Vec::new(),
            error_samples: Vec::new(),
        }
    }

    /// A recorder with its timeline already in place for a run of `seconds`. Histograms are
    /// zero-filled when made; made on the hot path, a thousand subscribers' recorders cost the
    /// load tool hundreds of megabytes of `memset` right after the clock starts (and again at
    /// every new second), which it would then report as the server's latency.
    pub fn for_run(seconds: f64) -> Recorder {
        let mut r = Recorder::new();
        let buckets = seconds.max(0.0).ceil() as usize + 1;
        r.timeline.resize_with(buckets, Bucket::new);
        r
    }

    fn bucket(&mut self, at: Duration) -> &mut Bucket {
        let second = at.as_secs() as usize;
        if self.timeline.len() <= second {
            self.timeline.resize_with(second + 1, Bucket::new);
        }
        &mut self.timeline[second]
    }

    /// A success answered `at` (since the run's start) `latency` after it was scheduled.
    pub fn record_ok(&mut self, at: Duration, latency: Duration) {
        let us = micros(latency);
        self.ok += 1;
        self.latency.saturating_record(us);
        let bucket = self.bucket(at);
        bucket.ok += 1;
        bucket.latency.saturating_record(us);
    }

    pub fn record_try_again(&mut self, at: Duration) {
        self.try_again += 1;
        self.bucket(at).try_again += 1;
    }

    pub fn record_error(&mut self, at: Duration, message: impl Into<String>) {
        self.errors += 1;
        self.bucket(at).errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(message.into());
        }
    }

    pub fn record_skipped(&mut self) {
        self.skipped += 1;
    }

    /// Folds `other` in: counts add, histograms add, timelines add second by second.
    pub fn merge(&mut self, other: &Recorder) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds always merge");
        self.ok += other.ok;
        self.try_again += other.try_again;
        self.errors += other.errors;
        self.skipped += other.skipped;
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize_with(other.timeline.len(), Bucket::new);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            mine.ok += theirs.ok;
            mine.try_again += theirs.try_again;
            mine.errors += theirs.errors;
            mine.latency
                .add(&theirs.latency)
                .expect("histograms with the same bounds always merge");
        }
        for sample in &other.error_samples {
            if self.error_samples.len() >= MAX_ERROR_SAMPLES {
                break;
            }
            self.error_samples.push(sample.clone());
        }
    }

    /// Merges every recorder into one.
    pub fn merged<'a>(all: impl IntoIterator<Item = &'a Recorder>) -> Recorder {
        let mut total = Recorder::new();
        for r in all {
            total.merge(r);
        }
        total
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary::of(&self.latency)
    }

    /// One point per second: throughput and latency percentiles, for the plot and the JSON.
    pub fn timeline_points(&self) -> Vec<TimelinePoint> {
        self.timeline
            .iter()
            .enumerate()
            .map(|(second, b)| TimelinePoint {
                second: second as u64,
                ok: b.ok,
                try_again: b.try_again,
                errors: b.errors,
                p50_ms: ms(b.latency.value_at_quantile(0.5), b.ok),
                p99_ms: ms(b.latency.value_at_quantile(0.99), b.ok),
                max_ms: ms(b.latency.max(), b.ok),
            })
            .collect()
    }
}

fn ms(us: u64, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        us as f64 / 1000.0
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        let count = h.len();
        LatencySummary {
            count,
            mean_ms: if count == 0 { 0.0 } else { h.mean() / 1000.0 },
            p50_ms: ms(h.value_at_quantile(0.5), count),
            p90_ms: ms(h.value_at_quantile(0.9), count),
            p99_ms: ms(h.value_at_quantile(0.99), count),
            p999_ms: ms(h.value_at_quantile(0.999), count),
            max_ms: ms(h.max(), count),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelinePoint {
    pub second: u64,
    pub ok: u64,
    pub try_again: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn merging_workers_equals_recording_everything_in_one() {
        // Worker a: 1..=900 ms at second 0; worker b: 901..=1000 ms at second 2 plus failures.
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        let mut all = Recorder::new();
        for v in 1..=1000u64 {
            let (w, at) = if v <= 900 {
                (&mut a, ms_(100))
            } else {
                (&mut b, ms_(2500))
            };
            w.record_ok(at, ms_(v));
            all.record_ok(at, ms_(v));
        }
        b.record_try_again(ms_(2600));
        b.record_try_again(ms_(2700));
        a.record_error(ms_(10), "boom");
        a.record_skipped();

        let merged = Recorder::merged([&a, &b]);
        assert_eq!(merged.ok, 1000);
        assert_eq!((merged.try_again, merged.errors, merged.skipped), (2, 1, 1));
        assert_eq!(merged.error_samples, vec!["boom".to_owned()]);
        assert_eq!(merged.latency.len(), all.latency.len());
        let s = merged.summary();
        assert_eq!(s, all.summary());
        // The tail comes only from worker b: a merge that dropped b would report p99 <= 900 ms.
        assert!((s.p50_ms - 500.0).abs() <= 1.0, "p50 {}", s.p50_ms);
        assert!((s.p90_ms - 900.0).abs() <= 1.0, "p90 {}", s.p90_ms);
        assert!((s.p99_ms - 990.0).abs() <= 1.0, "p99 {}", s.p99_ms);
        assert!((s.max_ms - 1000.0).abs() <= 1.0, "max {}", s.max_ms);

        let t = merged.timeline_points();
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].ok, t[0].errors), (900, 1));
        assert_eq!((t[1].ok, t[1].try_again), (0, 0));
        assert_eq!((t[2].ok, t[2].try_again), (100, 2));
        // Per-second buckets keep 2 significant digits: within 1%.
        assert!(
            t[2].p50_ms > 900.0 && t[0].max_ms <= 909.0,
            "{:?}",
            (t[2].p50_ms, t[0].max_ms)
        );
    }

    #[test]
    fn merge_order_does_not_matter_and_empty_merges_are_neutral() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.record_ok(ms_(0), ms_(3));
        b.record_ok(ms_(5000), ms_(7));
        let ab = Recorder::merged([&a, &b]);
        let ba = Recorder::merged([&b, &a, &Recorder::new()]);
        assert_eq!(ab.summary(), ba.summary());
        assert_eq!(ab.timeline_points(), ba.timeline_points());
        assert_eq!(Recorder::new().summary().count, 0);
    }

    #[test]
    fn latencies_beyond_the_range_saturate_instead_of_vanishing() {
        let mut r = Recorder::new();
        r.record_ok(ms_(0), Duration::from_secs(7200));
        r.record_ok(ms_(0), Duration::ZERO);
        assert_eq!(r.ok, 2);
        assert_eq!(r.latency.len(), 2);
        assert!(r.summary().max_ms >= 3_599_000.0);
    }
}
