//! Restore: a node whose slots were failed over while it was away (dead, or cut off past its
//! lease) writes the messages it had acknowledged and not archived back into the seqs reserved
//! for them (PROTOCOL.md "Node loss"; `super::reserve`).
//!
//! WAL recovery, or a slot taken from a running node (`Node::lose_slot`), keeps those messages
//! aside per conversation (`Node::pending_restore`) with the WAL checkpoint pinned below them.
//! [`run`] hands each conversation's batch to the owner of its slot — this node's own actor or a
//! peer's `POST /internal/v1/restore` — which writes them in one transaction through the
//! conversation's actor. Only then is the batch released (`Node::restore_done`) and the WAL may
//! drop its records; a batch that fails is tried again, with backoff, until it goes through, so
//! a restart in between loses nothing (the WAL keeps them and recovery keeps them aside again).

use std::time::Duration;

use tokio::sync::watch;

use ferry_shards::archive::Restored;
use ferry_shards::node::{NodeError, RestoreBatch};

use super::peer::{PeerError, RestoreRequest, WireMessage};
use super::{Cluster, Route};
use crate::metrics as m;

/// How often pending batches are looked for while there are none.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Backoff after a failed attempt, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Restores pending batches until `stop`.
pub async fn run(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let pending = cluster.node().pending_restore();
        let mut failed = false;
        for batch in pending {
            match restore_batch(&cluster, &batch).await {
                Ok(report) => {
                    done(&cluster, &batch, &report);
                    backoff = FIRST_BACKOFF;
                }
                Err(why) => {
                    failed = true;
                    tracing::warn!(
                        conversation = %batch.conversation_id,
                        slot = batch.slot,
                        messages = batch.messages.len(),
                        error = %why,
                        retry_in = ?backoff,
                        "restore not done yet; will retry"
                    );
                }
            }
        }
        let wait = if failed {
            let wait = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            wait
        } else {
            IDLE_POLL
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = super::stopped(&mut stop) => return,
        }
    }
}

/// Sends one batch to its slot's owner: `Ok` with what the owner did, `Err` why it must be
/// tried again.
async fn restore_batch(cluster: &Cluster, batch: &RestoreBatch) -> Result<Restored, String> {
    let from = cluster.node_id().to_owned();
    match cluster.route(batch.slot) {
        Route::Local => {
            match cluster
                .node()
                .restore(&batch.conversation_id, &from, batch.messages.clone())
                .await
            {
                Ok(report) => Ok(report),
                Err(NodeError::NotOwner { .. }) => {
                    cluster.refresh_slot(batch.slot).await;
                    Err("the slot left this node".to_owned())
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Route::Remote { node, url, epoch } => {
            let request = RestoreRequest {
                conversation_id: batch.conversation_id.to_string(),
                epoch,
                node_id: from,
                messages: batch
                    .messages
                    .iter()
                    .map(|m| WireMessage::from(&**m))
                    .collect(),
            };
            match cluster
                .peers()
                .post::<_, Restored>(&url, "/internal/v1/restore", &request)
                .await
            {
                Ok(report) => Ok(report),
                Err(PeerError::Moved) => {
                    cluster.refresh_slot(batch.slot).await;
                    Err(format!("{node} no longer owns the slot"))
                }
                Err(e) => Err(format!("{node}: {e}")),
            }
        }
        Route::Stale => {
            cluster.refresh_slot(batch.slot).await;
            Err("this node's view of the slot is stale".to_owned())
        }
        Route::Unavailable(reason) => Err(format!("the slot has no owner now ({reason:?})")),
    }
}

/// Counts, logs and releases a restored batch.
fn done(cluster: &Cluster, batch: &RestoreBatch, report: &Restored) {
    metrics::counter!(m::RESTORED_MESSAGES_TOTAL).increment(report.restored.len() as u64);
    let first_seq = batch.messages.first().map_or(0, |m| m.seq);
    let last_seq = batch.messages.last().map_or(0, |m| m.seq);
    tracing::info!(
        conversation = %batch.conversation_id,
        slot = batch.slot,
        first_seq,
        last_seq,
        restored = report.restored.len(),
        already_present = report.present.len(),
        duplicates = report.duplicates.len(),
        orphaned = report.orphaned.len(),
        never_acknowledged = report.unacknowledged.len(),
        "restored acknowledged messages into their reserved seqs"
    );
    if !report.orphaned.is_empty() {
        tracing::error!(
            conversation = %batch.conversation_id,
            slot = batch.slot,
            seqs = ?report.orphaned,
            "restore found acknowledged messages with no seq reserved for them; kept in orphaned_messages"
        );
    }
    cluster.node().restore_done(batch.id);
}
