//! Live counters every worker bumps (relaxed atomics: they feed only the progress bar and the
//! `connections` alive count, never the report's numbers), and the progress bar, drawn only
//! when stderr is a terminal so CI logs and bench scripts stay clean.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub try_again: AtomicU64,
    pub errors: AtomicU64,
    pub delivered: AtomicU64,
}

impl Live {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The bar plus the task that refreshes it; dropping it (or [`Progress::finish`]) clears it.
pub struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Draws a bar of `total` sends when `enabled` and stderr is a terminal; otherwise nothing.
    pub fn start(live: Arc<Live>, total: u64, enabled: bool) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                ticker: None,
            };
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} sent  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                b.set_position(Live::get(&live.sent));
                b.set_message(format!(
                    "ok {}  try_again {}  errors {}  delivered {}",
                    Live::get(&live.ok),
                    Live::get(&live.try_again),
                    Live::get(&live.errors),
                    Live::get(&live.delivered)
                ));
            }
        });
        Progress {
            bar: Some(bar),
            ticker: Some(ticker),
        }
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}
