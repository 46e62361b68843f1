//! The slot actor: supervisor and lifecycle owner of the conversations in one slot.
//!
//! It starts a conversation actor when asked (`Activate`, sent by the one caller that registered
//! the conversation's pending activation, see `node/activation.rs`) without waiting for it: the
//! child is spawned from a task, loads its state in its own `pre_start`, and the task reports
//! back (`Started`); only then does the slot actor register the child and answer the waiting
//! callers. A slow or failing archive load therefore holds up that conversation's callers and no
//! other activation of the slot. It restarts a failed conversation actor with the same shared log
//! (so no seq is reused and no idempotency key forgotten); a restart loads nothing. On each
//! `Sweep` it asks idle conversations to retire. Retirement is decided by the conversation actor
//! itself, between two appends, so an append can never slip in between the check and the stop.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

use super::conversation::{ConversationActor, ConversationArgs, ConversationMsg, Loaded, Start};
use super::ConversationHandle;
use crate::ids::ConversationId;
use crate::metrics as m;
use crate::node::{NodeError, Shared};

pub enum SlotMsg {
    /// Start the conversation's actor for its pending activation, begun while this node owned
    /// the slot at the given epoch. Answered through that activation, never here.
    Activate(ConversationId, u64),
    /// A child spawned for an activation has started (or could not): register it and answer
    /// the activation.
    Started(ConversationId, u64, Result<Child, NodeError>),
    /// Ask idle, fully archived conversations to stop.
    Sweep,
}

/// A conversation actor that has loaded its state and runs.
pub struct Child {
    actor: ActorRef<ConversationMsg>,
    loaded: Loaded,
}

pub struct SlotActor;

pub struct SlotArgs {
    pub slot: u32,
    pub shared: Arc<Shared>,
}

pub struct SlotState {
    slot: u32,
    shared: Arc<Shared>,
    /// Which conversation each linked child actor serves, to restart the right one. A child is
    /// entered when it is registered; nobody can reach it (so it cannot fail) before that.
    children: HashMap<ActorId, ConversationId>,
}

impl Actor for SlotActor {
    type Msg = SlotMsg;
    type State = SlotState;
    type Arguments = SlotArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SlotMsg>,
        args: SlotArgs,
    ) -> Result<SlotState, ActorProcessingErr> {
        let period = args.shared.config.idle_timeout / 2;
        myself.send_interval(period.max(std::time::Duration::from_millis(50)), || {
            SlotMsg::Sweep
        });
        Ok(SlotState {
            slot: args.slot,
            shared: args.shared,
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SlotMsg>,
        msg: SlotMsg,
        state: &mut SlotState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SlotMsg::Activate(id, epoch) => activate(&myself, state, id, epoch),
            SlotMsg::Started(id, epoch, result) => started(state, id, epoch, result),
            SlotMsg::Sweep => {
                let idle = state.shared.config.idle_timeout;
                let registry = state.shared.registry(state.slot);
                for handle in registry.handles.values() {
                    if handle.log.idle_for() >= idle && handle.log.quiescent() {
                        let _ = handle.actor.send_message(ConversationMsg::Retire);
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SlotMsg>,
        evt: SupervisionEvent,
        state: &mut SlotState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(id) = state.children.remove(&cell.get_id()) else {
                    return Ok(());
                };
                tracing::warn!(conversation = %id, slot = state.slot, error = %err, "conversation actor failed, restarting");
                metrics::counter!(m::ACTOR_RESTARTS_TOTAL).increment(1);
                // Only the registered actor is restarted: if the failed one was already replaced
                // (a caller found it dead and a new activation took over its log), a second
                // writer on that log must not appear.
                let existing = state
                    .shared
                    .registry(state.slot)
                    .handles
                    .get(&id)
                    .filter(|h| h.actor.get_id() == cell.get_id())
                    .cloned();
                if let Some(old) = existing {
                    restart(&myself, state, id, old).await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.children.remove(&cell.get_id());
            }
            _ => {}
        }
        publish_count(state);
        Ok(())
    }
}

/// Spawns the child for a pending activation from a task: its `pre_start` loads from the
/// archive, and this actor must stay free for the slot's other conversations meanwhile.
fn activate(myself: &ActorRef<SlotMsg>, state: &SlotState, id: ConversationId, epoch: u64) {
    let recovered = state.shared.registry(state.slot).logs.get(&id).cloned();
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let args = ConversationArgs {
        shared: state.shared.clone(),
        id: id.clone(),
        slot: state.slot,
        start: Start::Load {
            recovered,
            loaded: loaded_tx,
        },
    };
    let supervisor = myself.clone();
    let (shared, slot) = (state.shared.clone(), state.slot);
    tokio::spawn(async move {
        let result = spawn_loading(args, loaded_rx, supervisor.get_cell()).await;
        let spawned = result.as_ref().ok().map(|child| child.actor.clone());
        if supervisor
            .send_message(SlotMsg::Started(id.clone(), epoch, result))
            .is_err()
        {
            // The slot actor stopped (the node is shutting down): nobody supervises the child.
            if let Some(actor) = spawned {
                actor.stop(Some("slot stopped".into()));
            }
            let stopped = NodeError::Unavailable(format!("slot {slot} is stopped"));
            shared.finish_activation(slot, &id, Err(stopped));
        }
    });
}

async fn spawn_loading(
    args: ConversationArgs,
    loaded: oneshot::Receiver<Result<Loaded, NodeError>>,
    supervisor: ActorCell,
) -> Result<Child, NodeError> {
    let id = args.id.clone();
    let spawned = Actor::spawn_linked(None, ConversationActor, args, supervisor).await;
    // The child sends what it loaded (or why it could not) before its `pre_start` returns.
    let loaded = loaded.await.unwrap_or_else(|_| {
        Err(NodeError::Unavailable(format!(
            "conversation {id} failed while starting"
        )))
    });
    match (spawned, loaded) {
        (Ok((actor, _)), Ok(loaded)) => Ok(Child { actor, loaded }),
        (Ok((actor, _)), Err(e)) => {
            actor.stop(None);
            Err(e)
        }
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(NodeError::Unavailable(format!(
            "conversation {id} could not start: {e}"
        ))),
    }
}

/// Registers a child that started for an activation and answers the activation's callers.
fn started(
    state: &mut SlotState,
    id: ConversationId,
    epoch: u64,
    result: Result<Child, NodeError>,
) {
    let result = match result {
        // The slot changed hands while the child loaded: what it loaded may be stale (another
        // owner may have written since), and it must not write here. The callers route again.
        Ok(child) if state.shared.gates.owned_epoch(state.slot) != Some(epoch) => {
            child.actor.stop(Some("slot moved".into()));
            Err(NodeError::NotOwner { slot: state.slot })
        }
        Ok(Child { actor, loaded }) => {
            state.children.insert(actor.get_id(), id.clone());
            Ok(ConversationHandle {
                actor,
                log: loaded.log,
                meta: Arc::new(RwLock::new(Arc::new(loaded.meta))),
            })
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        tracing::debug!(conversation = %id, slot = state.slot, error = %e, "conversation actor did not start");
    }
    state.shared.finish_activation(state.slot, &id, result);
    publish_count(state);
}

/// Starts a new actor on a failed one's log and description; nothing is loaded.
async fn restart(
    myself: &ActorRef<SlotMsg>,
    state: &mut SlotState,
    id: ConversationId,
    old: ConversationHandle,
) {
    let args = ConversationArgs {
        shared: state.shared.clone(),
        id: id.clone(),
        slot: state.slot,
        start: Start::Resume {
            log: old.log.clone(),
        },
    };
    match Actor::spawn_linked(None, ConversationActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            state.children.insert(actor.get_id(), id.clone());
            let handle = ConversationHandle {
                actor,
                log: old.log,
                meta: old.meta,
            };
            state.shared.registry(state.slot).handles.insert(id, handle);
        }
        Err(e) => {
            // Keep the log (it may hold unarchived messages); the next activation starts a
            // fresh actor on it.
            tracing::error!(conversation = %id, error = %e, "conversation actor restart failed");
            state.shared.registry(state.slot).handles.remove(&id);
        }
    }
}

fn publish_count(state: &SlotState) {
    metrics::gauge!(m::SLOT_CONVERSATIONS, "slot" => state.slot.to_string())
        .set(state.children.len() as f64);
}
