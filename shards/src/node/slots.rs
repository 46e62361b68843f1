//! Per-slot operations on [`Node`]: what a slot hand-over needs (archive the tail now, wait for
//! it, let the slot go) and the per-slot counts the status pages show.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::RestoreBatch;
use super::{Node, NodeError, TryAgainReason};
use crate::actor::conversation::{ConversationMsg, RestoreRequest};
use crate::archive::Restored;
use crate::gate::GateRefusal;
use crate::ids::ConversationId;
use crate::record::Message;

impl Node {
    /// Asks the archiver to store what is queued now rather than after `archive.linger`.
    pub fn archive_now(&self) {
        self.shared
            .archive_queue
            .urgent
            .store(true, Ordering::Relaxed);
        self.shared.archive_queue.notify.notify_one();
    }

    /// Durable messages of `slot` that the archive does not hold yet.
    pub fn slot_unarchived(&self, slot: u32) -> u64 {
        self.shared
            .registry(slot)
            .logs
            .values()
            .map(|log| log.durable_seq().saturating_sub(log.archived_seq()))
            .sum()
    }

    /// Waits until everything durable in `slot` is archived (asking the archiver to hurry), at
    /// most `timeout`; true when it is.
    pub async fn wait_slot_archived(&self, slot: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.slot_unarchived(slot) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.archive_now();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Lets go of a slot that now belongs to another node at `epoch`: its appends are refused
    /// with `NotOwner` from now on, its conversation actors stop, and readers of its logs are
    /// told to follow the conversations to the new owner. Call only once nothing of the slot is
    /// in flight or unarchived.
    pub fn release_slot(&self, slot: u32, epoch: u64) {
        self.shared.gates.set_not_owned(slot, epoch);
        self.drop_slot_state(slot, "slot moved");
    }

    /// Stops the slot's conversation actors and drops its logs (readers are told to follow the
    /// conversations elsewhere); returns how many conversations it held.
    fn drop_slot_state(&self, slot: u32, why: &'static str) -> usize {
        let (handles, logs) = {
            let mut registry = self.shared.registry(slot);
            (
                std::mem::take(&mut registry.handles),
                std::mem::take(&mut registry.logs),
            )
        };
        for log in logs.values() {
            log.mark_moved();
        }
        for handle in handles.values() {
            handle.log.mark_moved();
            handle.actor.stop(Some(why.into()));
        }
        logs.len().max(handles.len())
    }

    /// The slot was taken by another node at `epoch` without a hand-over from this one (a
    /// failover while this node was paused or cut off): it is let go like a moved slot, and
    /// whatever of it this node still had queued for the archive leaves the queue — kept for
    /// restore, or dropped if it cannot have been acknowledged (see
    /// `Shared::extract_lost_slots`). Cheap when this node holds nothing of the slot.
    pub fn lose_slot(&self, slot: u32, epoch: u64) {
        let news = self.shared.gates.mark_lost(slot, epoch);
        let holds = {
            let registry = self.shared.registry(slot);
            !registry.logs.is_empty() || !registry.handles.is_empty()
        };
        let owned = self.shared.gates.owned_epoch(slot).is_some();
        if holds || owned {
            self.release_slot(slot, epoch);
        } else if !news {
            return;
        }
        self.shared.lost_slots.store(true, Ordering::Release);
        self.shared.archive_queue.notify.notify_one();
    }

    /// Before this node starts serving `slot` at `epoch` after a time it did not (it was moved
    /// or failed over here, or comes back to it): whatever it still holds of the slot from
    /// before is stale — the slot had another owner meanwhile — so its actors stop, its logs
    /// are dropped (conversations load afresh, with any seqs reserved meanwhile), and records of
    /// it written under an older epoch leave the archive queue for restore. Normally it holds
    /// nothing and this does nothing.
    pub fn serve_fresh(&self, slot: u32, epoch: u64) {
        let conversations = self.drop_slot_state(slot, "slot owned elsewhere meanwhile");
        if conversations == 0 {
            return;
        }
        tracing::warn!(
            slot,
            epoch,
            conversations,
            "this node held state of a slot another node owned meanwhile; dropped"
        );
        self.shared.gates.mark_lost(slot, epoch);
        self.shared.lost_slots.store(true, Ordering::Release);
        self.shared.archive_queue.notify.notify_one();
    }

    /// Appends acknowledged per slot since this node started.
    pub fn slot_appends(&self) -> Vec<u64> {
        self.shared
            .ack_metrics
            .slot_appends_seen
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Active conversation actors per slot.
    pub fn slot_conversations(&self) -> Vec<usize> {
        (0..self.shared.config.slot_count)
            .map(|s| self.shared.registry(s).handles.len())
            .collect()
    }
}

impl Node {
    /// Messages this node acknowledged in slots that were failed over to other nodes while it
    /// was away (or cut off), one batch per conversation: to be written back into the seqs
    /// reserved for them by the slots' owners ([`Node::restore`]). Empty when there is nothing
    /// to restore.
    pub fn pending_restore(&self) -> Vec<RestoreBatch> {
        self.shared
            .restore
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batches
            .iter()
            .map(|(batch, _)| batch.clone())
            .collect()
    }

    /// Batch `id` is restored (every message written back, found already there, a duplicate,
    /// or kept aside as orphaned): the WAL may drop its records.
    pub fn restore_done(&self, id: u64) {
        let mut restore = self
            .shared
            .restore
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        restore.batches.retain(|(batch, _)| batch.id != id);
    }

    /// On the owner of `batch`'s slot: writes the messages node `from` acknowledged before the
    /// slot was failed over into the seqs reserved for `from`, through the conversation's actor
    /// (so no append with one of their idempotency keys can slip in between the check and the
    /// write), and adds the restored keys to its idempotency window. The slot counts the
    /// restore as in flight: a hand-over waits for it.
    pub async fn restore(
        &self,
        id: &ConversationId,
        from: &str,
        messages: Vec<Arc<Message>>,
    ) -> Result<Restored, NodeError> {
        let slot = self.slot_of(id);
        let guard = match self.shared.gates.enter(slot) {
            Ok(guard) => guard,
            Err(GateRefusal::Holding) => {
                return Err(NodeError::try_again(TryAgainReason::SlotMoving))
            }
            Err(GateRefusal::NotOwned) => return Err(NodeError::NotOwner { slot }),
            Err(GateRefusal::Fenced) => {
                return Err(NodeError::try_again(TryAgainReason::OwnerUnavailable))
            }
        };
        let handle = self.conversation(id).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let restore = RestoreRequest {
            from: from.to_owned(),
            messages,
            guard,
        };
        handle
            .actor
            .send_message(ConversationMsg::Restore(restore, tx.into()))
            .map_err(|_| NodeError::try_again(TryAgainReason::Restarting))?;
        rx.await
            .map_err(|_| NodeError::try_again(TryAgainReason::Restarting))?
    }
}
