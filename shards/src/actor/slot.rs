//! The slot actor: supervisor and lifecycle owner of the conversations in one slot.
//!
//! It starts a conversation actor on first use (`Activate`), loading the conversation from the
//! archive and adopting any messages WAL recovery found for it; it restarts a failed conversation
//! actor with the same shared log (so no seq is reused and no idempotency key forgotten); and on
//! each `Sweep` it asks idle conversations to retire. Retirement is decided by the conversation
//! actor itself, between two appends, so an append can never slip in between the check and the
//! stop.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::conversation::{ConversationActor, ConversationArgs, ConversationMsg};
use super::ConversationHandle;
use crate::conversation_log::{ConversationLog, DedupeWindow};
use crate::ids::ConversationId;
use crate::metrics as m;
use crate::node::{NodeError, Shared};

pub enum SlotMsg {
    Activate(
        ConversationId,
        RpcReplyPort<Result<ConversationHandle, NodeError>>,
    ),
    /// Ask idle, fully archived conversations to stop.
    Sweep,
}

pub struct SlotActor;

pub struct SlotArgs {
    pub slot: u32,
    pub shared: Arc<Shared>,
}

pub struct SlotState {
    slot: u32,
    shared: Arc<Shared>,
    /// Which conversation each linked child actor serves, to restart the right one.
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
            SlotMsg::Activate(id, reply) => {
                let result = activate(&myself, state, id).await;
                let _ = reply.send(result);
            }
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
                let existing = state.shared.registry(state.slot).handles.get(&id).cloned();
                if let Some(old) = existing {
                    match spawn(&myself, state, &id, old.log.clone()).await {
                        Ok(actor) => {
                            let handle = ConversationHandle {
                                actor,
                                log: old.log,
                                meta: old.meta,
                            };
                            state.shared.registry(state.slot).handles.insert(id, handle);
                        }
                        Err(e) => {
                            // Keep the log (it may hold unarchived messages); the next
                            // activation starts a fresh actor on it.
                            tracing::error!(conversation = %id, error = %e, "conversation actor restart failed");
                            state.shared.registry(state.slot).handles.remove(&id);
                        }
                    }
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.children.remove(&cell.get_id());
            }
            _ => {}
        }
        metrics::gauge!(m::SLOT_CONVERSATIONS, "slot" => state.slot.to_string())
            .set(state.children.len() as f64);
        Ok(())
    }
}

async fn activate(
    myself: &ActorRef<SlotMsg>,
    state: &mut SlotState,
    id: ConversationId,
) -> Result<ConversationHandle, NodeError> {
    if let Some(handle) = state.shared.registry(state.slot).handles.get(&id) {
        return Ok(handle.clone());
    }
    let window = state.shared.config.dedupe_window;
    let snapshot = state
        .shared
        .archive
        .load_conversation(&id, window)
        .await
        .map_err(|e| NodeError::Unavailable(e.to_string()))?
        .ok_or(NodeError::NotFound)?;

    let recovered = state.shared.registry(state.slot).logs.get(&id).cloned();
    // A log recovered from the WAL is normally at or ahead of SQL (the archiver only stores
    // durable records). If SQL is ahead, the WAL lost records that had been archived (a repair
    // cut them off): SQL is then the complete history, and seqs continue after it — a stale
    // log would hand out seqs SQL already holds.
    let recovered = recovered.filter(|log| {
        let stale = snapshot.last_seq > log.durable_seq();
        if stale {
            tracing::warn!(
                conversation = %id,
                wal_last_seq = log.durable_seq(),
                archived_last_seq = snapshot.last_seq,
                "archive is ahead of the recovered wal log; continuing after the archive"
            );
        }
        !stale
    });
    let log = match recovered {
        Some(log) => {
            // A log recovered from the WAL: its window needs the archived keys before the
            // recovered ones.
            let mut dedupe = DedupeWindow::new(window);
            for (key, entry) in &snapshot.recent_keys {
                dedupe.insert(key, *entry);
            }
            for m in log.read_after(0, usize::MAX).messages {
                if let Some(key) = m.idempotency_key.as_deref() {
                    dedupe.insert(
                        key,
                        crate::conversation_log::DedupeEntry {
                            seq: m.seq,
                            id: m.id,
                            created_at_ms: m.created_at_ms,
                        },
                    );
                }
            }
            *log.dedupe.lock().unwrap_or_else(|e| e.into_inner()) = dedupe;
            log
        }
        None => {
            let mut dedupe = DedupeWindow::new(window);
            for (key, entry) in &snapshot.recent_keys {
                dedupe.insert(key, *entry);
            }
            Arc::new(ConversationLog::new(
                id.clone(),
                state.slot,
                snapshot.last_seq,
                Vec::new(),
                dedupe,
                state.shared.budget.clone(),
            ))
        }
    };
    let actor = spawn(myself, state, &id, log.clone())
        .await
        .map_err(|e| NodeError::Unavailable(e.to_string()))?;
    let handle = ConversationHandle {
        actor,
        log: log.clone(),
        meta: Arc::new(RwLock::new(Arc::new(snapshot.meta))),
    };
    let mut registry = state.shared.registry(state.slot);
    registry.logs.insert(id.clone(), log);
    registry.handles.insert(id, handle.clone());
    metrics::gauge!(m::SLOT_CONVERSATIONS, "slot" => state.slot.to_string())
        .set(state.children.len() as f64);
    Ok(handle)
}

async fn spawn(
    myself: &ActorRef<SlotMsg>,
    state: &mut SlotState,
    id: &ConversationId,
    log: Arc<ConversationLog>,
) -> Result<ActorRef<ConversationMsg>, ractor::SpawnErr> {
    let args = ConversationArgs {
        shared: state.shared.clone(),
        log,
    };
    let (actor, _join) =
        Actor::spawn_linked(None, ConversationActor, args, myself.get_cell()).await?;
    state.children.insert(actor.get_id(), id.clone());
    Ok(actor)
}
