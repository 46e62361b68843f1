//! The archiver: tails the archive queue in LSN order, stores batches in SQL (retrying with
//! backoff while the archive is unavailable), marks the logs archived and advances the WAL
//! checkpoint. On stop it makes one last attempt; whatever is left is replayed from the WAL on
//! the next start.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::shared::Shared;
use crate::archive::ArchiveError;
use crate::conversation_log::ConversationLog;
use crate::metrics as m;
use crate::record::Message;
use crate::wal::Lsn;

/// One archive batch: consecutive queue items, in LSN order.
type Batch = Vec<(Lsn, Arc<Message>, Arc<ConversationLog>, Instant)>;

type StoreResult = (Batch, Result<(), ArchiveError>, Duration);

/// Hands durable messages to the archive in LSN order and advances the WAL checkpoint.
///
/// Up to `Archive::max_concurrent_batches` batches are stored at once, each covering the queue
/// items after those of the batch before it. Results are taken strictly in order: a batch's
/// items leave the queue, its logs are marked archived and the checkpoint moves only after every
/// batch before it succeeded. When one fails, every later batch in flight is abandoned (one that
/// committed anyway is stored again on the retry, which the archive's idempotence makes harmless)
/// and the archiver retries from the front of the queue with backoff.
pub(super) async fn run_archiver(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(50);
    let depth = shared.archive.max_concurrent_batches().max(1);
    let backlog = BacklogGauges::new();
    let mut in_flight: VecDeque<tokio::task::JoinHandle<StoreResult>> = VecDeque::new();
    // Queue items (from the front) covered by the batches in flight.
    let mut dispatched = 0usize;
    let mut losses = shared.gates.losses();
    // A slot lost (failed over away from this node) since the last look: set by `lose_slot`,
    // or by the lease task through the gates.
    let mut lost = move |shared: &Shared| {
        let now = shared.gates.losses();
        let flagged = shared.lost_slots.swap(false, Ordering::AcqRel);
        let news = now != losses;
        losses = now;
        flagged || news
    };
    loop {
        let stopping = *stop.borrow();
        // Slots taken by another node while this one still held records of them: those records
        // leave the queue (no batch may carry them: the fence would refuse it). Only between
        // batches, while none is in flight, so the queue's front is what `dispatched` says.
        if in_flight.is_empty() && lost(&shared) {
            shared.extract_lost_slots();
        }
        // When the next batch is not full yet: the moment it is stored anyway.
        let mut linger_until = None;
        while in_flight.len() < depth {
            let batch = match next_batch(&shared, dispatched, stopping) {
                NextBatch::Ready(batch) => batch,
                NextBatch::Wait(until) => {
                    linger_until = until;
                    break;
                }
            };
            dispatched += batch.len();
            let archive = shared.archive.clone();
            in_flight.push_back(tokio::spawn(async move {
                let messages: Vec<Arc<Message>> = batch.iter().map(|b| b.1.clone()).collect();
                let started = Instant::now();
                let result = archive.store_messages(&messages).await;
                (batch, result, started.elapsed())
            }));
        }
        backlog.publish(&shared);
        let linger = async {
            match linger_until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        if in_flight.is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                _ = shared.archive_queue.notify.notified() => {}
                _ = stop.changed() => {}
                _ = linger => {}
            }
            continue;
        }
        // With room in the pipeline, new messages start another batch without waiting for the
        // oldest one to finish.
        let room = in_flight.len() < depth;
        let Some(oldest) = in_flight.front_mut() else {
            continue;
        };
        let done = if room && !stopping {
            tokio::select! {
                done = oldest => done,
                _ = shared.archive_queue.notify.notified() => continue,
                _ = stop.changed() => continue,
                _ = linger => continue,
            }
        } else {
            oldest.await
        };
        in_flight.pop_front();
        let (batch, result, took) = match done {
            Ok(done) => done,
            // The store call panicked: nothing is known about the batch; retry it.
            Err(e) => (
                Vec::new(),
                Err(ArchiveError::Unavailable(format!(
                    "archive task failed: {e}"
                ))),
                Duration::ZERO,
            ),
        };
        match result {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                metrics::histogram!(m::ARCHIVE_BATCH_SECONDS).record(took.as_secs_f64());
                metrics::counter!(m::ARCHIVE_RECORDS_TOTAL).increment(batch.len() as u64);
                let mut bytes = 0;
                let mut acks = Vec::with_capacity(batch.len());
                {
                    let mut items = shared
                        .archive_queue
                        .items
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for (lsn, ..) in &batch {
                        let item = items.pop_front();
                        debug_assert_eq!(item.as_ref().map(|i| i.lsn), Some(*lsn));
                        if let Some(mut item) = item {
                            bytes += item.message.approx_bytes();
                            acks.push((item.hidden, item.ack.take()));
                        }
                    }
                }
                dispatched -= batch.len();
                shared
                    .archive_queue
                    .bytes
                    .fetch_sub(bytes, Ordering::Relaxed);
                let delay = metrics::histogram!(m::ARCHIVE_DELAY_SECONDS);
                let now = Instant::now();
                for ((_, message, log, durable_at), (hidden, ack)) in batch.iter().zip(acks) {
                    shared.on_archived(message, log, hidden, ack);
                    delay.record(now.saturating_duration_since(*durable_at).as_secs_f64());
                }
                let last_lsn = batch.last().map_or(0, |b| b.0);
                let last_lsn = shared.checkpoint_limit(last_lsn);
                if let Err(e) = shared.wal.checkpoint(last_lsn) {
                    tracing::error!(error = %e, lsn = last_lsn, "wal checkpoint failed");
                }
            }
            Err(e) => {
                metrics::counter!(m::ARCHIVE_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, records = batch.len(), abandoned_batches = in_flight.len(), retry_in_ms = backoff.as_millis() as u64, "archive batch failed");
                for abandoned in in_flight.drain(..) {
                    abandoned.abort();
                }
                dispatched = 0;
                // Whether or not a loss was signalled: a record of a slot taken away can reach
                // the queue after the signal was seen (its WAL sync finished late), and the
                // fence refuses every batch that carries it until it leaves the queue.
                lost(&shared);
                shared.extract_lost_slots();
                if !shared.gates.lease_valid() {
                    shared.refuse_pending_acks();
                }
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum NextBatch {
    Ready(Batch),
    /// Nothing to store yet: the queue holds nothing undispatched (`None`), or a partial batch
    /// that lingers until the given moment.
    Wait(Option<Instant>),
}

/// The queue items after the first `dispatched`, as one batch of at most
/// `archive_batch_records` records and `archive_batch_bytes` bytes, once it is worth storing:
/// it is full, its oldest item has lingered `archive_linger`, or the node is stopping.
fn next_batch(shared: &Shared, dispatched: usize, stopping: bool) -> NextBatch {
    let config = &shared.config;
    let items = shared
        .archive_queue
        .items
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(oldest) = items.get(dispatched) else {
        shared.archive_queue.urgent.store(false, Ordering::Relaxed);
        return NextBatch::Wait(None);
    };
    let until = oldest.durable_at + config.archive_linger;
    let pending = || {
        items
            .iter()
            .skip(dispatched)
            .take(config.archive_batch_records)
    };
    let ready = stopping
        || shared.archive_queue.urgent.load(Ordering::Relaxed)
        || Instant::now() >= until
        || items.len() - dispatched >= config.archive_batch_records
        // Every queued byte (dispatched or not) bounds the pending ones: only when they could
        // fill a batch are the pending items counted.
        || (shared.archive_queue.bytes.load(Ordering::Relaxed) > config.archive_batch_bytes && {
            let mut bytes = 0usize;
            pending().any(|i| {
                bytes += i.message.approx_bytes();
                bytes > config.archive_batch_bytes
            })
        });
    if !ready {
        return NextBatch::Wait(Some(until));
    }
    let mut bytes = 0usize;
    let batch = pending()
        .take_while(|i| {
            let first = bytes == 0;
            bytes += i.message.approx_bytes();
            first || bytes <= config.archive_batch_bytes
        })
        .map(|i| (i.lsn, i.message.clone(), i.log.clone(), i.durable_at))
        .collect();
    NextBatch::Ready(batch)
}

/// The archive backlog's gauges, looked up in the recorder once: the loop publishes them on
/// every turn, which at a low rate is once per append.
struct BacklogGauges {
    bytes: metrics::Gauge,
    records: metrics::Gauge,
    lag: metrics::Gauge,
    ring: metrics::Gauge,
}

impl BacklogGauges {
    fn new() -> BacklogGauges {
        BacklogGauges {
            bytes: metrics::gauge!(m::ARCHIVE_BACKLOG_BYTES),
            records: metrics::gauge!(m::ARCHIVE_BACKLOG_RECORDS),
            lag: metrics::gauge!(m::ARCHIVE_LAG_SECONDS),
            ring: metrics::gauge!(m::RING_BYTES),
        }
    }

    fn publish(&self, shared: &Shared) {
        let oldest = shared
            .archive_queue
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .map(|i| i.durable_at);
        self.bytes.set(shared.archive_queue.bytes() as f64);
        self.records.set(shared.archive_queue.len() as f64);
        self.lag
            .set(oldest.map_or(0.0, |t| t.elapsed().as_secs_f64()));
        self.ring.set(shared.budget.used() as f64);
    }
}
