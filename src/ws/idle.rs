//! An idle limit kept with one timer for a task's life, not a timer per activity: registering
//! and cancelling a timer cost more than the rest of a small frame's bookkeeping. Activity only
//! notes when it happened; the timer, when it fires, either finds the limit passed or moves on
//! to the limit after the latest activity.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub(crate) struct IdleClock {
    last: Instant,
    limit: Duration,
}

impl IdleClock {
    /// Starts counting now; the timer fires `limit` from now (pin it and select on it).
    pub(crate) fn start(limit: Duration) -> (Self, Sleep) {
        let last = Instant::now();
        (Self { last, limit }, tokio::time::sleep_until(last + limit))
    }

    /// Activity: the limit counts from now.
    pub(crate) fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// After `timer` fired: whether `limit` has passed since the latest activity. If not, the
    /// timer is moved on to that moment.
    pub(crate) fn expired(&self, timer: Pin<&mut Sleep>) -> bool {
        let deadline = self.last + self.limit;
        if deadline > Instant::now() {
            timer.reset(deadline);
            return false;
        }
        true
    }
}
