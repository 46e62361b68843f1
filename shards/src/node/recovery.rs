//! What start-up does with WAL recovery: a log for every conversation with unarchived records
//! (queued again for the archiver), and the checks that drop recovered logs SQL has overtaken
//! (after a repair) or that belong to slots another node owns. Runs before any actor starts.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::shared::{ArchiveItem, Shared};
use super::NodeError;
use crate::conversation_log::{ConversationLog, DedupeWindow};
use crate::ids::ConversationId;
use crate::placement::slot_of;
use crate::record::{Message, Record};
use crate::wal::{Lsn, Recovery};

/// What start-up found in the WAL.
#[derive(Debug, Clone)]
pub struct StartupReport {
    pub recovered_records: usize,
    pub recovered_conversations: usize,
    pub checkpoint: Lsn,
    pub torn_tail_bytes: u64,
    pub bytes_scanned: u64,
    pub scan_duration: Duration,
}

/// `(slot, conversation, last durable seq)` of every log held for the slots `which` selects.
fn recovered_logs(shared: &Shared, which: impl Fn(u32) -> bool) -> Vec<(u32, ConversationId, u64)> {
    (0..shared.config.slot_count)
        .filter(|slot| which(*slot))
        .flat_map(|slot| {
            shared
                .registry(slot)
                .logs
                .iter()
                .map(|(id, log)| (slot, id.clone(), log.durable_seq()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// After a repair: a recovered log that ends below the last seq SQL holds lost archived records
/// to the repair, and SQL is the complete history. Such logs are dropped before anything reads
/// them, so the conversation starts from SQL (its recovered records are still re-archived,
/// idempotently). The slot actor checks the same when it starts a conversation.
pub(super) async fn drop_logs_behind_archive(shared: &Arc<Shared>) -> Result<(), NodeError> {
    for (slot, id, wal_last_seq) in recovered_logs(shared, |_| true) {
        let snapshot = shared
            .archive
            .describe_conversation(&id)
            .await
            .map_err(|e| {
                NodeError::Unavailable(format!(
                    "after the wal repair, conversation {id} cannot be checked against the archive: {e}"
                ))
            })?;
        let archived_last_seq = snapshot.map_or(0, |s| s.last_seq);
        if archived_last_seq > wal_last_seq {
            tracing::warn!(
                conversation = %id,
                wal_last_seq,
                archived_last_seq,
                "archive is ahead of the recovered wal log; continuing after the archive"
            );
            shared.registry(slot).logs.remove(&id);
        }
    }
    Ok(())
}

/// A clustered node's WAL can hold messages of slots that moved to other nodes since (a slot
/// leaves only once its tail is archived, but the WAL checkpoint may lag). Those logs are dropped
/// with their archive queue items: this node may not write them (the fenced archive would
/// refuse). What the archive already holds (same seq, same id) is done with. The rest — a slot
/// failed over while this node was away, whose messages it had acknowledged and not archived —
/// is kept aside for restore ([`super::Node::pending_restore`]), and the WAL checkpoint stays
/// below its records until the restore is done.
pub(super) async fn drop_logs_of_other_owners(shared: &Arc<Shared>) -> Result<(), NodeError> {
    let foreign = recovered_logs(shared, |slot| shared.gates.owned_epoch(slot).is_none());
    if foreign.is_empty() {
        return Ok(());
    }
    let mut dropped = std::collections::HashSet::new();
    let mut unarchived: HashMap<ConversationId, Vec<Arc<Message>>> = HashMap::new();
    for (slot, id, _) in foreign {
        let Some(log) = shared.registry(slot).logs.remove(&id) else {
            continue;
        };
        let held = log.read_after(0, usize::MAX).messages;
        if let (Some(first), Some(last)) = (held.first(), held.last()) {
            let archived: HashMap<u64, uuid::Uuid> = shared
                .archive
                .read_messages(&id, first.seq - 1, last.seq + 1, held.len(), false)
                .await
                .map_err(|e| {
                    NodeError::Unavailable(format!(
                        "conversation {id} of slot {slot} cannot be checked against the archive: {e}"
                    ))
                })?
                .into_iter()
                .map(|m| (m.seq, m.id))
                .collect();
            let missing: Vec<Arc<Message>> = held
                .into_iter()
                .filter(|m| archived.get(&m.seq) != Some(&m.id))
                .collect();
            if !missing.is_empty() {
                tracing::warn!(
                    conversation = %id,
                    slot,
                    messages = missing.len(),
                    first_seq = missing[0].seq,
                    "the wal holds messages of a slot another node owns that the archive lacks; kept for restore"
                );
                unarchived.insert(id.clone(), missing);
            }
        }
        dropped.insert(id);
    }
    let mut items = shared
        .archive_queue
        .items
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut bytes = 0;
    let mut lowest: HashMap<ConversationId, Lsn> = HashMap::new();
    items.retain(|item| {
        let id = &item.message.conversation_id;
        let keep = !dropped.contains(id);
        if !keep {
            bytes += item.message.approx_bytes();
            let kept = unarchived
                .get(id)
                .is_some_and(|m| m.iter().any(|m| m.seq == item.message.seq));
            if kept {
                let lsn = lowest.entry(id.clone()).or_insert(item.lsn);
                *lsn = (*lsn).min(item.lsn);
            }
        }
        keep
    });
    drop(items);
    {
        let mut restore = shared.restore.lock().unwrap_or_else(|e| e.into_inner());
        for (id, messages) in unarchived {
            // Every kept message came from a queued record; one without is impossible, and
            // pinning the oldest record the WAL may still hold keeps it safe regardless.
            let lsn = lowest.get(&id).copied().unwrap_or(0);
            restore.keep(messages, lsn);
        }
    }
    shared
        .archive_queue
        .bytes
        .fetch_sub(bytes, Ordering::Relaxed);
    tracing::info!(
        conversations = dropped.len(),
        "dropped recovered logs of slots owned elsewhere"
    );
    Ok(())
}

/// Rebuilds a log for every conversation with messages above the checkpoint and queues them for
/// the archiver.
pub(super) fn adopt_recovery(
    shared: &Arc<Shared>,
    recovery: Recovery,
) -> Result<StartupReport, NodeError> {
    let mut by_conversation: HashMap<ConversationId, Vec<(Lsn, Arc<Message>)>> = HashMap::new();
    let recovered_records = recovery.records.len();
    for record in recovery.records {
        let decoded =
            Record::decode(record.kind, &record.payload).map_err(|e| NodeError::BadRecord {
                lsn: record.lsn,
                reason: e.to_string(),
            })?;
        match decoded {
            Record::Message(message) => by_conversation
                .entry(message.conversation_id.clone())
                .or_default()
                .push((record.lsn, message)),
        }
    }
    let recovered_conversations = by_conversation.len();
    let mut items = Vec::with_capacity(recovered_records);
    for (id, entries) in by_conversation {
        let slot = slot_of(id.as_str(), shared.config.slot_count);
        let messages: Vec<Arc<Message>> = entries.iter().map(|(_, m)| m.clone()).collect();
        for pair in messages.windows(2) {
            if pair[1].seq != pair[0].seq + 1 {
                return Err(NodeError::BadRecord {
                    lsn: entries[0].0,
                    reason: format!(
                        "conversation {id} jumps from seq {} to {} in the wal",
                        pair[0].seq, pair[1].seq
                    ),
                });
            }
        }
        let log = Arc::new(ConversationLog::new(
            id.clone(),
            slot,
            0,
            messages,
            DedupeWindow::new(shared.config.dedupe_window),
            shared.budget.clone(),
        ));
        for (lsn, message) in entries {
            items.push(ArchiveItem::durable(lsn, message, log.clone()));
        }
        shared.registry(slot).logs.insert(id, log);
    }
    items.sort_by_key(|i| i.lsn);
    for item in items {
        shared.archive_queue.push(item);
    }
    Ok(StartupReport {
        recovered_records,
        recovered_conversations,
        checkpoint: recovery.checkpoint,
        torn_tail_bytes: recovery.torn_tail_bytes,
        bytes_scanned: recovery.bytes_scanned,
        scan_duration: recovery.scan_duration,
    })
}
