//! The storage jobs, every `archive.compact_interval`: **compaction** moves messages older than
//! `archive.sql_retention` out of SQL into per-conversation segment objects in the cold tier, and
//! **retention** deletes everything older than `retention` from every tier.
//!
//! Per conversation, the oldest messages still in SQL are taken in runs of at most
//! `archive.segment_records`; each run is encoded ([`crate::segment`]), written to the object
//! store and made durable, and only then is its index row inserted and its rows deleted from SQL —
//! in one SQL transaction. A failure at any step leaves SQL as it was (the run is retried on the
//! next pass); a crash between the object write and the SQL commit leaves an object that the
//! retry overwrites with the same bytes under the same key. Nothing is deleted early, nothing is
//! lost, and readers merge SQL and segments (see [`crate::store`]), so a message is readable at
//! every moment.
//!
//! To avoid a trickle of tiny segments, a conversation is compacted once it has at least
//! `segment_records` messages past `sql_retention`, or any message past twice `sql_retention`.
//! So a message leaves SQL between `sql_retention` and `2 × sql_retention` after it was written.
//!
//! Retention deletes a segment once its newest message is older than `retention`: it first raises
//! the conversation's `expired_through_seq` past the segment (from then on no read asks for it),
//! then deletes the object, then the index row. SQL rows older than `retention` (if
//! `sql_retention ≥ retention`, or compaction lags) are deleted in one transaction with the same
//! raise. A crash between steps leaves an index row nobody reads; the next pass finishes the job
//! (deleting a missing object succeeds). Every step is idempotent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use ferry_shards::record::now_ms;

use crate::cold::ColdTier;
use crate::metrics as m;
use crate::store::{SegmentRow, Store, StoreError};

/// Conversations handled per pass (the next pass continues with the rest).
const CONVERSATIONS_PER_PASS: usize = 256;

#[derive(Debug, Clone)]
pub struct CompactorConfig {
    /// Messages older than this leave SQL.
    pub sql_retention: Duration,
    /// Time between passes.
    pub interval: Duration,
    /// Most messages per segment, and the count that makes a conversation due early.
    pub segment_records: usize,
    /// Anything older than this is deleted from every tier.
    pub retention: Duration,
    /// Run passes only while this is true (in a cluster: while this node leads, so one node
    /// compacts at a time); `None`: always.
    pub only_while: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub segments: u64,
    pub messages: u64,
}

/// What one retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments: u64,
    pub sql_messages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("sql: {0}")]
    Sql(#[from] StoreError),
    #[error("object store: {0}")]
    Object(#[from] crate::cold::ColdError),
    #[error("segment: {0}")]
    Segment(#[from] crate::segment::SegmentError),
}

/// Runs passes until `stop` turns true; a failed pass is logged, counted and retried on the next
/// tick.
pub async fn run(
    store: Store,
    cold: Arc<ColdTier>,
    config: CompactorConfig,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let started = Instant::now();
        let our_turn = config
            .only_while
            .as_ref()
            .is_none_or(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        if !our_turn {
            tokio::select! {
                _ = tokio::time::sleep(config.interval) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            continue;
        }
        match compact_once(&store, &cold, &config, now_ms()).await {
            Ok(report) => {
                metrics::gauge!(m::COMPACTION_LAST_SUCCESS).set(now_ms() as f64 / 1000.0);
                if report.segments > 0 {
                    tracing::info!(
                        segments = report.segments,
                        messages = report.messages,
                        ms = started.elapsed().as_millis() as u64,
                        "compacted messages into the cold tier"
                    );
                }
            }
            Err(e) => {
                let stage = match e {
                    CompactError::Object(_) => "object",
                    _ => "sql",
                };
                metrics::counter!(m::COMPACTION_ERRORS_TOTAL, "stage" => stage).increment(1);
                tracing::warn!(error = %e, retry_in_ms = config.interval.as_millis() as u64, "compaction pass failed");
            }
        }
        metrics::histogram!(m::COMPACTION_RUN_SECONDS).record(started.elapsed().as_secs_f64());
        match expire_once(&store, &cold, config.retention, now_ms()).await {
            Ok(report) => {
                metrics::gauge!(m::RETENTION_LAST_SUCCESS).set(now_ms() as f64 / 1000.0);
                if report != RetentionReport::default() {
                    tracing::info!(
                        segments = report.segments,
                        sql_messages = report.sql_messages,
                        "retention deleted expired history"
                    );
                }
            }
            Err(e) => {
                let stage = match e {
                    CompactError::Object(_) => "retention_object",
                    _ => "retention_sql",
                };
                metrics::counter!(m::COMPACTION_ERRORS_TOTAL, "stage" => stage).increment(1);
                tracing::warn!(error = %e, "retention pass failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One pass over the conversations due for compaction at `now_ms`.
pub async fn compact_once(
    store: &Store,
    cold: &ColdTier,
    config: &CompactorConfig,
    now_ms: i64,
) -> Result<PassReport, CompactError> {
    let retention_ms = config.sql_retention.as_millis().min(i64::MAX as u128 / 4) as i64;
    let cutoff = now_ms.saturating_sub(retention_ms);
    let force_before = now_ms.saturating_sub(retention_ms.saturating_mul(2));
    let per_segment = config.segment_records.max(1);
    let candidates = store
        .compaction_candidates(
            cutoff,
            per_segment as u64,
            force_before,
            CONVERSATIONS_PER_PASS,
        )
        .await?;
    let mut report = PassReport::default();
    for (conversation, upto) in candidates {
        loop {
            let oldest = store
                .oldest_in_sql(&conversation, upto, per_segment)
                .await?;
            let Some(first) = oldest.first() else {
                break;
            };
            // A segment is a run of consecutive seqs; stop the run at a hole (the rest follows
            // in the next segment).
            let run_len = oldest
                .iter()
                .enumerate()
                .take_while(|(i, msg)| msg.seq == first.seq + *i as u64)
                .count();
            let run = &oldest[..run_len];
            let last = &run[run_len - 1];
            let bytes = segment_bytes(run).await?;
            let key = cold.segment_key(&conversation, first.seq, last.seq);
            let row = SegmentRow {
                conversation_id: conversation.clone(),
                first_seq: first.seq,
                last_seq: last.seq,
                object_key: key.clone(),
                record_count: run_len as u64,
                bytes: bytes.len() as u64,
                min_created_at_ms: run.iter().map(|m| m.created_at_ms).min().unwrap_or(0),
                max_created_at_ms: run.iter().map(|m| m.created_at_ms).max().unwrap_or(0),
                created_at_ms: now_ms,
            };
            cold.put(&key, bytes).await?;
            store.commit_segment(&row).await?;
            report.segments += 1;
            report.messages += run_len as u64;
            metrics::counter!(m::COMPACTED_SEGMENTS_TOTAL).increment(1);
            metrics::counter!(m::COMPACTED_MESSAGES_TOTAL).increment(run_len as u64);
            if oldest.len() < per_segment || last.seq >= upto {
                break;
            }
        }
    }
    Ok(report)
}

/// One retention pass: expired segments (object, then index row), then expired SQL rows.
pub async fn expire_once(
    store: &Store,
    cold: &ColdTier,
    retention: Duration,
    now_ms: i64,
) -> Result<RetentionReport, CompactError> {
    let cutoff = now_ms.saturating_sub(retention.as_millis().min(i64::MAX as u128) as i64);
    let mut report = RetentionReport::default();
    for (conversation, first, last, key) in store.expired_segments(cutoff, 1000).await? {
        store.raise_expired(&conversation, last).await?;
        cold.delete(&key).await?;
        store.forget_segment(&conversation, first, last).await?;
        report.segments += 1;
        metrics::counter!(m::RETENTION_DELETED_TOTAL, "tier" => "object")
            .increment(last - first + 1);
    }
    report.sql_messages = store.expire_sql(cutoff, CONVERSATIONS_PER_PASS).await?;
    metrics::counter!(m::RETENTION_DELETED_TOTAL, "tier" => "sql").increment(report.sql_messages);
    Ok(report)
}

/// Encodes on a blocking thread (zstd over up to a few MiB).
async fn segment_bytes(
    run: &[Arc<ferry_shards::record::Message>],
) -> Result<Vec<u8>, CompactError> {
    let run = run.to_vec();
    Ok(
        tokio::task::spawn_blocking(move || crate::segment::encode(&run))
            .await
            .map_err(|e| StoreError::Invalid(format!("segment encoder stopped: {e}")))??,
    )
}
