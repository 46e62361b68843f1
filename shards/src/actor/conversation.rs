//! The conversation actor: the single writer of one conversation.
//!
//! It never waits for an fsync. For each append it checks the idempotency window, reserves the
//! next seq, encodes the record and submits it to the WAL; the completion closure runs on the WAL
//! writer thread once the record is durable, pushes the message into the shared ring (which wakes
//! subscribers), queues it for the archiver and answers the caller. One actor submits in seq order
//! and the WAL completes in submission order, so acks and visibility follow seq order.
//!
//! All state that must survive a crash of this actor lives in the shared
//! [`ConversationLog`](crate::conversation_log::ConversationLog): the last assigned seq and the
//! idempotency window. A restarted actor therefore never reuses a seq.
//!
//! Its first start loads the conversation in `pre_start` ([`Start::Load`]): the archive's
//! snapshot (description, last archived seq, recent idempotency keys) and the log WAL recovery
//! left, if the archive is not ahead of it. The slot actor that spawned it does not wait for
//! that; the result goes back through the start's reply. A restart after a failure
//! ([`Start::Resume`]) loads nothing: it takes over the failed actor's log as it is.

use std::future::{ready, Future};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::archive::{ConversationMeta, Restored};
use crate::conversation_log::{ConversationLog, DedupeEntry, DedupeWindow};
use crate::gate::GateGuard;
use crate::ids::{ConversationId, ParticipantId};
use crate::node::{NodeError, PendingAck, Shared, TryAgainReason};
use crate::record::{now_ms, Message, KIND_MESSAGE};
use crate::wal::SubmitError;

/// A validated append.
#[derive(Debug)]
pub struct AppendRequest {
    pub sender: ParticipantId,
    pub kind: Box<str>,
    pub content: Box<RawValue>,
    pub metadata: Box<RawValue>,
    pub idempotency_key: Option<Box<str>>,
}

/// The answer to an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub seq: u64,
    pub id: Uuid,
    pub created_at_ms: i64,
    /// True when the idempotency key was seen before and this is the first append's result.
    pub deduped: bool,
}

pub type AppendReply = RpcReplyPort<Result<AppendOutcome, NodeError>>;

pub enum ConversationMsg {
    /// An append, its reply, when it was admitted, and its slot's gate guard: the append counts
    /// as in flight on its slot (a hand-over waits for it) until its reply is sent.
    Append(AppendRequest, AppendReply, Instant, GateGuard),
    /// Stop if idle, quiescent (everything archived, nothing waiting) and unwatched. Decided here,
    /// between two appends, so no append can slip in between the check and the stop.
    Retire,
    /// Messages a failed-over node acknowledged, to be written into the seqs reserved for it
    /// ([`crate::node::Node::restore`]).
    Restore(RestoreRequest, RestoreReply),
    /// Makes the actor fail, as a bug would; used by tests of supervision.
    Crash,
}

/// See [`ConversationMsg::Restore`].
pub struct RestoreRequest {
    /// The node that acknowledged them.
    pub from: String,
    /// In seq order.
    pub messages: Vec<Arc<Message>>,
    /// The slot counts the restore as in flight until it is answered.
    pub guard: GateGuard,
}

pub type RestoreReply = RpcReplyPort<Result<Restored, NodeError>>;

pub struct ConversationActor;

pub struct ConversationArgs {
    pub shared: Arc<Shared>,
    pub id: ConversationId,
    pub slot: u32,
    pub start: Start,
}

/// How a conversation actor comes by its log.
pub enum Start {
    /// First start: load from the archive, adopting `recovered` (the log WAL recovery, or an
    /// actor that stopped without retiring, left in the registry) unless the archive is ahead of
    /// it. The log and description go to `loaded`, or the reason the start failed.
    Load {
        recovered: Option<Arc<ConversationLog>>,
        loaded: oneshot::Sender<Result<Loaded, NodeError>>,
    },
    /// Restart after a failure: the failed actor's log, unchanged.
    Resume { log: Arc<ConversationLog> },
}

/// What a first start loaded.
pub struct Loaded {
    pub log: Arc<ConversationLog>,
    pub meta: ConversationMeta,
}

pub struct ConversationState {
    shared: Arc<Shared>,
    log: Arc<ConversationLog>,
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationState;
    type Arguments = ConversationArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ConversationArgs,
    ) -> Result<ConversationState, ActorProcessingErr> {
        let ConversationArgs {
            shared,
            id,
            slot,
            start,
        } = args;
        let log = match start {
            Start::Resume { log } => log,
            Start::Load { recovered, loaded } => {
                let timeout = shared.config.activation_timeout;
                let result = match tokio::time::timeout(
                    timeout,
                    load(&shared, &id, slot, recovered),
                )
                .await
                {
                    Ok(result) => result,
                    // What its callers get when they stop waiting, too.
                    Err(_) => {
                        tracing::warn!(conversation = %id, slot, ?timeout, "conversation load timed out");
                        Err(NodeError::try_again(TryAgainReason::Activating))
                    }
                };
                match result {
                    // The spawning task awaits this very start: its receiver is there.
                    Ok(done) => {
                        let log = done.log.clone();
                        let _ = loaded.send(Ok(done));
                        log
                    }
                    Err(e) => {
                        let _ = loaded.send(Err(e.clone()));
                        return Err(Box::new(e));
                    }
                }
            }
        };
        Ok(ConversationState { shared, log })
    }

    /// Not an `async fn`: the actor library keeps room for this future in every actor's message
    /// loop for the actor's whole life. Appends and retires finish here, before the future is
    /// made, and a restore, which waits on the archive, is boxed. As an `async fn` it held the
    /// message twice and the restore inline, and the loop took 1,856 bytes per actor, not 608.
    fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ConversationMsg,
        state: &mut ConversationState,
    ) -> impl Future<Output = Result<(), ActorProcessingErr>> + Send {
        // What is left to wait for, or why the actor fails.
        let rest: Result<Option<_>, ActorProcessingErr> = match msg {
            ConversationMsg::Append(req, reply, admitted_at, guard) => {
                state.log.release_admission();
                append(state, req, reply, admitted_at, guard);
                Ok(None)
            }
            ConversationMsg::Retire => {
                retire(&myself, state);
                Ok(None)
            }
            ConversationMsg::Restore(request, reply) => Ok(Some(Box::pin(async move {
                let result = restore(state, request).await;
                let _ = reply.send(result);
            }))),
            ConversationMsg::Crash => Err("crash requested".into()),
        };
        async move {
            if let Some(restoring) = rest? {
                restoring.await;
            }
            Ok(())
        }
    }

    /// What the library's default does (a conversation actor supervises no one), without the
    /// default's `async` block and the room the loop keeps for it.
    fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _state: &mut ConversationState,
    ) -> impl Future<Output = Result<(), ActorProcessingErr>> + Send {
        if let SupervisionEvent::ActorTerminated(..) | SupervisionEvent::ActorFailed(..) = event {
            myself.stop(None);
        }
        ready(Ok(()))
    }
}

/// The conversation's log and description, from the archive's snapshot and the log `recovered`
/// left in the registry.
async fn load(
    shared: &Shared,
    id: &ConversationId,
    slot: u32,
    recovered: Option<Arc<ConversationLog>>,
) -> Result<Loaded, NodeError> {
    let window_size = shared.config.dedupe_window;
    let snapshot = shared
        .archive
        .load_conversation(id, window_size)
        .await
        .map_err(|e| NodeError::Unavailable(e.to_string()))?
        .ok_or(NodeError::NotFound)?;

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
            // Every key the window must know, in seq order: the archive's recent ones, those of
            // the log's messages, and whatever its window holds already (an earlier actor on this
            // log may have appends in flight whose keys are nowhere else yet).
            let mut keys: Vec<(Box<str>, DedupeEntry)> = snapshot
                .recent_keys
                .iter()
                .map(|(key, entry)| (key.as_str().into(), *entry))
                .collect();
            for m in log.read_after(0, usize::MAX).messages {
                if let Some(key) = m.idempotency_key.as_deref() {
                    let entry = DedupeEntry {
                        seq: m.seq,
                        id: m.id,
                        created_at_ms: m.created_at_ms,
                    };
                    keys.push((key.into(), entry));
                }
            }
            let mut window = log.dedupe.lock().unwrap_or_else(|e| e.into_inner());
            keys.extend(window.entries().map(|(key, entry)| (key.into(), entry)));
            keys.sort_by_key(|(_, entry)| entry.seq);
            let mut dedupe = DedupeWindow::new(window_size);
            for (key, entry) in &keys {
                dedupe.insert(key, *entry);
            }
            *window = dedupe;
            drop(window);
            log
        }
        None => {
            let mut dedupe = DedupeWindow::new(window_size);
            for (key, entry) in &snapshot.recent_keys {
                dedupe.insert(key, *entry);
            }
            Arc::new(ConversationLog::new(
                id.clone(),
                slot,
                snapshot.last_seq,
                Vec::new(),
                dedupe,
                shared.budget.clone(),
            ))
        }
    };
    Ok(Loaded {
        log,
        meta: snapshot.meta,
    })
}

fn append(
    state: &ConversationState,
    req: AppendRequest,
    reply: AppendReply,
    admitted_at: Instant,
    guard: GateGuard,
) {
    let shared = &state.shared;
    let log = &state.log;
    log.touch();

    let mut window = log.dedupe.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(key) = req.idempotency_key.as_deref() {
        if let Some(first) = window.get(key) {
            drop(window);
            answer_duplicate(shared, log, first, reply, guard);
            return;
        }
    }

    if let Err(reason) = shared.admit_append() {
        shared.count_try_again(reason);
        let _ = reply.send(Err(NodeError::try_again(reason)));
        return;
    }
    let max_unarchived = shared.config.max_unarchived;
    if max_unarchived > 0 && log.assigned_seq().saturating_sub(log.archived_seq()) >= max_unarchived
    {
        shared.count_try_again(TryAgainReason::ArchiveBacklog);
        let _ = reply.send(Err(NodeError::try_again(TryAgainReason::ArchiveBacklog)));
        return;
    }

    let seq = log.assign_next();
    let message = Arc::new(Message {
        conversation_id: log.id.clone(),
        slot: log.slot,
        epoch: guard.epoch(),
        seq,
        id: Uuid::now_v7(),
        created_at_ms: now_ms(),
        sender: req.sender,
        kind: req.kind,
        content: req.content,
        metadata: req.metadata,
        idempotency_key: req.idempotency_key,
        rendered: Default::default(),
    });
    let outcome = AppendOutcome {
        seq,
        id: message.id,
        created_at_ms: message.created_at_ms,
        deduped: false,
    };
    let payload = message.encode();
    // The completion owns the reply; if the WAL refuses the record it drops the completion, so
    // keep a way to take the reply back and answer `try_again` ourselves.
    let reply = Arc::new(std::sync::Mutex::new(Some(reply)));
    let done_reply = reply.clone();
    let done_log = log.clone();
    let done_shared = shared.clone();
    let done_message = message.clone();
    let submitted = shared.wal.submit(
        KIND_MESSAGE,
        payload,
        Box::new(move |result| {
            let Some(reply) = take(&done_reply) else {
                return;
            };
            let lsn = match result {
                Ok(lsn) => lsn,
                Err(e) => {
                    let _ = reply.send(Err(NodeError::Unavailable(e.to_string())));
                    return;
                }
            };
            // Self-fencing: a node whose lease ran out while the record was syncing (a pause,
            // a stall) neither acknowledges nor shows it: the slot may already be another
            // node's. The record is durable and keeps its seq; it is shown once archived under
            // this node's epoch (and a retry with its key is answered with it then), or kept
            // for restore if the slot was taken.
            let fenced = !done_shared.gates.lease_valid();
            if fenced {
                // Queued before the answer: whoever sees the answer and takes the slot away
                // finds the record in the archive queue.
                done_shared.on_durable_hidden(lsn, done_message, &done_log, None);
                done_shared.count_try_again(TryAgainReason::OwnerUnavailable);
                let _ = reply.send(Err(NodeError::try_again(TryAgainReason::OwnerUnavailable)));
                return;
            }
            if done_shared.config.ack_after_archive || done_log.has_hidden() {
                // Answered and made visible by the archiver once its batch is committed: with
                // `ack_after_archive` always, otherwise when an earlier message of this log
                // still waits hidden (readers see seqs in order).
                let ack = PendingAck {
                    reply,
                    outcome,
                    admitted_at,
                    guard,
                };
                done_shared.on_durable_hidden(lsn, done_message, &done_log, Some(ack));
                return;
            }
            done_shared.on_durable(lsn, done_message, &done_log);
            done_shared.record_ack(admitted_at, done_log.slot);
            let _ = reply.send(Ok(outcome));
            drop(guard);
        }),
    );
    match submitted {
        Ok(()) => {
            if let Some(key) = message.idempotency_key.as_deref() {
                window.insert(
                    key,
                    DedupeEntry {
                        seq,
                        id: message.id,
                        created_at_ms: message.created_at_ms,
                    },
                );
            }
        }
        Err(e) => {
            // The record never reached the queue (and the completion, with `reply`, was dropped
            // with it): give the seq back so no hole appears.
            log.unassign(seq);
            let reason = refusal_reason(e);
            shared.count_try_again(reason);
            tracing::debug!(conversation = %log.id, ?reason, "append refused by the wal");
            if let Some(reply) = take(&reply) {
                let _ = reply.send(Err(NodeError::try_again(reason)));
            }
        }
    }
}

/// Writes a failed-over node's messages into their reserved seqs (the archive decides what goes
/// where, in one transaction) and remembers the restored ones' idempotency keys. Runs between two
/// appends of this conversation: an append with one of their keys is either already in the
/// window (and the restored message is a duplicate) or comes after, and is deduped.
async fn restore(
    state: &ConversationState,
    request: RestoreRequest,
) -> Result<Restored, NodeError> {
    let RestoreRequest {
        from,
        messages,
        guard,
    } = request;
    let shared = &state.shared;
    let log = &state.log;
    if messages.iter().any(|m| m.conversation_id != log.id) {
        return Err(NodeError::Unavailable(format!(
            "a restore of conversation {} holds messages of another conversation",
            log.id
        )));
    }
    log.touch();
    // Keys this owner has handed out (appends in flight or not yet archived) to messages other
    // than the restored ones.
    let known: std::collections::HashSet<String> = {
        let window = log.dedupe.lock().unwrap_or_else(|e| e.into_inner());
        messages
            .iter()
            .filter_map(|m| {
                let key = m.idempotency_key.as_deref()?;
                let entry = window.get(key)?;
                (entry.id != m.id).then(|| key.to_owned())
            })
            .collect()
    };
    let timeout = shared.config.activation_timeout;
    let report = match tokio::time::timeout(
        timeout,
        shared
            .archive
            .restore_messages(&log.id, &from, &messages, &known),
    )
    .await
    {
        Ok(result) => result.map_err(|e| NodeError::Unavailable(e.to_string()))?,
        Err(_) => {
            return Err(NodeError::Unavailable(format!(
                "restore of {} messages timed out after {timeout:?}",
                messages.len()
            )))
        }
    };
    let mut window = log.dedupe.lock().unwrap_or_else(|e| e.into_inner());
    for m in &messages {
        let written = report.restored.contains(&m.seq) || report.present.contains(&m.seq);
        if let (true, Some(key)) = (written, m.idempotency_key.as_deref()) {
            window.insert(
                key,
                DedupeEntry {
                    seq: m.seq,
                    id: m.id,
                    created_at_ms: m.created_at_ms,
                },
            );
        }
    }
    drop(window);
    drop(guard);
    Ok(report)
}

fn retire(myself: &ActorRef<ConversationMsg>, state: &ConversationState) {
    let log = &state.log;
    if !(log.quiescent()
        && log.subscribers() == 0
        && log.idle_for() >= state.shared.config.idle_timeout)
    {
        return;
    }
    {
        let mut registry = state.shared.registry(log.slot);
        let is_current = registry
            .handles
            .get(&log.id)
            .is_some_and(|h| h.actor.get_id() == myself.get_id());
        if is_current {
            registry.handles.remove(&log.id);
            registry.logs.remove(&log.id);
        }
    }
    tracing::debug!(conversation = %log.id, slot = log.slot, "conversation retired");
    myself.stop(Some("idle".into()));
}

fn take(reply: &std::sync::Mutex<Option<AppendReply>>) -> Option<AppendReply> {
    reply.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Answers a repeated idempotency key with the first result, but only once that first append is
/// durable: a barrier completes after everything queued before it.
fn answer_duplicate(
    shared: &Arc<Shared>,
    log: &Arc<ConversationLog>,
    first: DedupeEntry,
    reply: AppendReply,
    guard: GateGuard,
) {
    let outcome = AppendOutcome {
        seq: first.seq,
        id: first.id,
        created_at_ms: first.created_at_ms,
        deduped: true,
    };
    shared.count_deduped();
    if log.durable_seq() >= first.seq {
        let _ = reply.send(Ok(outcome));
        return;
    }
    if shared.config.ack_after_archive || log.has_hidden() {
        // The first append is answered once archived, and becomes visible then: answer the
        // retry at the same moment (or never, if the log is dropped first).
        let mut visible = log.watch_durable();
        tokio::spawn(async move {
            let answer = match visible.wait_for(|seq| *seq >= first.seq).await {
                Ok(_) => Ok(outcome),
                Err(_) => Err(NodeError::try_again(TryAgainReason::Restarting)),
            };
            let _ = reply.send(answer);
            drop(guard);
        });
        return;
    }
    let reply = Arc::new(std::sync::Mutex::new(Some(reply)));
    let done_reply = reply.clone();
    let done_log = log.clone();
    let barrier = shared.wal.barrier(Box::new(move |result| {
        if let Some(reply) = take(&done_reply) {
            let answer = match result {
                // The first append went to the archiver hidden (its node's lease ran out while
                // it synced): not shown, so not acknowledged yet; a later retry finds it shown.
                Ok(_) if done_log.durable_seq() < first.seq => {
                    Err(NodeError::try_again(TryAgainReason::OwnerUnavailable))
                }
                Ok(_) => Ok(outcome),
                Err(e) => Err(NodeError::Unavailable(e.to_string())),
            };
            let _ = reply.send(answer);
        }
        drop(guard);
    }));
    if let Err(e) = barrier {
        if let Some(reply) = take(&reply) {
            let _ = reply.send(Err(NodeError::try_again(refusal_reason(e))));
        }
    }
}

/// What a client is told when the WAL refuses a request outright (nothing was written).
fn refusal_reason(e: SubmitError) -> TryAgainReason {
    match e {
        SubmitError::Full => TryAgainReason::WalFull,
        SubmitError::DiskFull => TryAgainReason::DiskFull,
        SubmitError::Poisoned | SubmitError::Closed => TryAgainReason::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Handler<M, F> = fn(
        &'static ConversationActor,
        ActorRef<ConversationMsg>,
        M,
        &'static mut ConversationState,
    ) -> F;

    fn future_size<M, F: Future>(_: Handler<M, F>) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_handlers_keep_no_room_in_the_message_loop() {
        // The actor library keeps room for both futures in every actor's loop for the actor's
        // whole life, so they hold no message and no restore.
        let handle = future_size(<ConversationActor as Actor>::handle);
        let supervise = future_size(<ConversationActor as Actor>::handle_supervisor_evt);
        println!("handle: {handle} bytes, handle_supervisor_evt: {supervise} bytes");
        assert!(handle <= 64, "handle's future grew to {handle} bytes");
        assert!(
            supervise <= 64,
            "handle_supervisor_evt's future grew to {supervise} bytes"
        );
    }
}
