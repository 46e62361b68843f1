//! Activation: starting a conversation's writer on first use, without letting one slow start
//! hold up anything but its own callers.
//!
//! A caller that needs a conversation's actor and finds none registers a pending activation in
//! the slot's registry and asks the slot actor to start one. The slot actor spawns the child from
//! a task of its own and does not wait for it; the child loads its state (the archive's snapshot,
//! the log WAL recovery left) in its `pre_start`. Once the child has started, or failed to, the
//! slot actor registers it and the result reaches every caller waiting on the pending entry.
//!
//! Bounds:
//! - one pending activation per conversation: later callers wait on the first one's result, so
//!   concurrent first touches start one actor;
//! - at most `max_activations` pending activations per node; past it a caller that would add one
//!   gets `try_again` (`activating`) at once;
//! - a caller waits at most `activation_timeout`, then gets `try_again` (`activating`) while the
//!   activation goes on; the child's load is cut off after `activation_timeout` as well (its
//!   callers get `activating` too), so a pending entry does not outlive a hung archive.
//!
//! A child that fails later is restarted by the slot actor on the same log and description,
//! loading nothing (see `actor/slot.rs`); a restart is not an activation.

use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::{Node, NodeError, Shared, TryAgainReason};
use crate::actor::slot::SlotMsg;
use crate::actor::ConversationHandle;
use crate::ids::ConversationId;
use crate::metrics as m;

/// A pending activation: set once to the conversation's handle or the reason it did not start.
pub type Activation = watch::Sender<Option<Result<ConversationHandle, NodeError>>>;

impl Node {
    /// The active conversation, starting its actor if needed. Refused with `NotOwner` for a
    /// slot this node does not own: looking at another node's conversation must not start a
    /// writer here. Readers that only look use [`Node::peek`], which starts nothing.
    pub async fn conversation(&self, id: &ConversationId) -> Result<ConversationHandle, NodeError> {
        let slot = self.slot_of(id);
        let (mut pending, first) = {
            let mut registry = self.shared.registry(slot);
            if let Some(handle) = registry.handles.get(id) {
                return Ok(handle.clone());
            }
            let Some(epoch) = self.shared.gates.owned_epoch(slot) else {
                return Err(NodeError::NotOwner { slot });
            };
            match registry.activating.get(id) {
                Some(activation) => (activation.subscribe(), None),
                None => {
                    if !self.shared.begin_activation() {
                        drop(registry);
                        return Err(refuse_activation());
                    }
                    let (activation, pending) = watch::channel(None);
                    registry.activating.insert(id.clone(), activation);
                    (pending, Some(epoch))
                }
            }
        };
        if let Some(epoch) = first {
            self.request_activation(slot, id, epoch);
        }
        let timeout = self.shared.config.activation_timeout;
        let waited = tokio::time::timeout(timeout, async {
            pending
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|result| result.clone())
        })
        .await;
        match waited {
            Ok(Some(result)) => result,
            // The entry went away without a result; nothing was started for this caller.
            Ok(None) => Err(refuse_activation()),
            Err(_) => {
                tracing::debug!(conversation = %id, slot, "conversation actor still starting; caller told to retry");
                Err(refuse_activation())
            }
        }
    }

    /// Asks the slot actor to start the actor of a pending activation begun at `epoch`.
    fn request_activation(&self, slot: u32, id: &ConversationId, epoch: u64) {
        let sent = self.slots[slot as usize].send_message(SlotMsg::Activate(id.clone(), epoch));
        if sent.is_err() {
            let stopped = NodeError::Unavailable(format!("slot {slot} is stopped"));
            self.shared.finish_activation(slot, id, Err(stopped));
        }
    }

    /// Conversation actors starting on this node now (for status and tests).
    pub fn activations_in_progress(&self) -> usize {
        self.shared.activations.load(Ordering::Acquire)
    }
}

fn refuse_activation() -> NodeError {
    metrics::counter!(m::TRY_AGAIN_TOTAL, "reason" => TryAgainReason::Activating.as_str())
        .increment(1);
    NodeError::try_again(TryAgainReason::Activating)
}

impl Shared {
    /// Counts one more pending activation if the node has room for it.
    fn begin_activation(&self) -> bool {
        let before = self.activations.fetch_add(1, Ordering::AcqRel);
        if before >= self.config.max_activations {
            self.activations.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Ends the pending activation of `id`: registers the handle when the actor started, and
    /// answers everyone waiting. Called by the slot actor (or, when that is gone, by whoever
    /// finds it gone).
    pub(crate) fn finish_activation(
        &self,
        slot: u32,
        id: &ConversationId,
        result: Result<ConversationHandle, NodeError>,
    ) {
        let activation = {
            let mut registry = self.registry(slot);
            if let Ok(handle) = &result {
                registry.logs.insert(id.clone(), handle.log.clone());
                registry.handles.insert(id.clone(), handle.clone());
            }
            registry.activating.remove(id)
        };
        if let Some(activation) = activation {
            self.activations.fetch_sub(1, Ordering::AcqRel);
            activation.send_replace(Some(result));
        }
    }
}
