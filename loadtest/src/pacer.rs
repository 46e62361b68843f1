//! The open-loop send schedule. Send `i` is due at `start + i / rate`, fixed before the run
//! starts; the dispatch loop only decides *when it notices* a send is due, never *when it was due*,
//! so latencies measured from [`Pacer::offset`] include any time the generator or the server
//! spent stalled (no coordinated omission).
//!
//! Offsets are whole nanoseconds computed from `i` alone (no accumulated error), and
//! [`Pacer::due_by`] is defined as "how many offsets are `<= elapsed`", so the two always agree.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    rate: f64,
    total: u64,
}

impl Pacer {
    /// A schedule of `round(rate * duration_secs)` sends at `rate` per second.
    pub fn new(rate: f64, duration_secs: f64) -> Pacer {
        let total = (rate * duration_secs).round().max(0.0) as u64;
        Pacer { rate, total }
    }

    /// How many sends the run schedules.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// When send `i` is due, relative to the start.
    pub fn offset(&self, i: u64) -> Duration {
        Duration::from_nanos((i as f64 * 1e9 / self.rate).round() as u64)
    }

    /// How many sends are due once `elapsed` has passed: the count of `i < total` with
    /// `offset(i) <= elapsed`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let guess = (elapsed.as_secs_f64() * self.rate).floor() as u64 + 1;
        let mut due = guess.min(self.total);
        // The float guess can be off by one either way near a boundary; settle it on `offset`.
        while due < self.total && self.offset(due) <= elapsed {
            due += 1;
        }
        while due > 0 && self.offset(due - 1) > elapsed {
            due -= 1;
        }
        due
    }

    /// Calls `dispatch(i, scheduled_at)` for every send, in order, each as soon as it is due
    /// (several at once when the loop wakes late: the schedule does not slip).
    pub async fn drive(&self, start: Instant, mut dispatch: impl FnMut(u64, Instant)) {
        let mut next = 0;
        while next < self.total {
            let due = self.due_by(Instant::now().saturating_duration_since(start));
            while next < due {
                dispatch(next, start + self.offset(next));
                next += 1;
            }
            if next < self.total {
                tokio::time::sleep_until(start + self.offset(next)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_rate_without_drift() {
        let p = Pacer::new(1000.0, 2.0);
        assert_eq!(p.total(), 2000);
        assert_eq!(p.offset(0), Duration::ZERO);
        assert_eq!(p.offset(1), Duration::from_millis(1));
        assert_eq!(p.offset(1999), Duration::from_millis(1999));
        // A rate that is not a divisor of 1e9 still lands exactly on i / rate, not a sum of steps.
        let p = Pacer::new(3.0, 10.0);
        assert_eq!(p.offset(3), Duration::from_secs(1));
        assert_eq!(p.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(p.offset(29), Duration::from_nanos(9_666_666_667));
    }

    #[test]
    fn due_by_counts_exactly_the_offsets_reached() {
        let p = Pacer::new(7.0, 3.0);
        for i in 0..p.total() {
            let at = p.offset(i);
            assert_eq!(p.due_by(at), i + 1, "at offset({i})");
            if at > Duration::ZERO {
                assert_eq!(
                    p.due_by(at - Duration::from_nanos(1)),
                    i,
                    "just before offset({i})"
                );
            }
        }
        assert_eq!(p.due_by(Duration::from_secs(3600)), p.total());
        assert_eq!(Pacer::new(100.0, 0.0).due_by(Duration::from_secs(1)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drive_dispatches_every_send_on_schedule_in_order() {
        let p = Pacer::new(250.0, 1.0);
        let start = Instant::now();
        let mut seen = Vec::new();
        p.drive(start, |i, at| seen.push((i, at, Instant::now())))
            .await;
        assert_eq!(seen.len(), 250);
        for (n, (i, scheduled, fired)) in seen.iter().enumerate() {
            assert_eq!(*i, n as u64);
            assert_eq!(*scheduled, start + Duration::from_millis(4 * n as u64));
            assert!(fired >= scheduled, "send {i} fired before it was due");
        }
        // The loop ends right after the last due send, not a tick later.
        assert_eq!(Instant::now(), start + p.offset(249));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_loop_catches_up_without_moving_the_schedule() {
        let p = Pacer::new(1000.0, 0.1);
        // Start "in the past": 50 sends are already due when the loop first looks.
        let start = Instant::now() - Duration::from_millis(49);
        let mut seen = Vec::new();
        p.drive(start, |i, at| seen.push((i, at, Instant::now())))
            .await;
        assert_eq!(seen.len(), 100);
        let first_wake = seen[0].2;
        let burst = seen
            .iter()
            .filter(|(_, _, fired)| *fired == first_wake)
            .count();
        assert_eq!(burst, 50, "everything already due goes out at once");
        for (i, scheduled, _) in &seen {
            assert_eq!(*scheduled, start + Duration::from_millis(*i));
        }
    }
}
