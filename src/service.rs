//! The service layer: what HTTP, SSE and WebSocket call once they have decoded a request, and
//! the one place that decides "this node, another node, or the archive".
//!
//! - A conversation whose slot this node owns is served by the local runtime (`Node`).
//! - One another node owns is forwarded to it over the node-to-node API, naming the epoch; an
//!   owner that answers "moved" makes the caller re-read the slot's row and route again.
//! - One whose owner is dead answers appends with `try_again` (`owner_unavailable`) and reads
//!   from the SQL archive (what it holds is everything that survives without the owner).
//!
//! **Ordering.** [`append`] serves one request. A socket's sends to one conversation go through
//! [`AppendQueue`], which keeps them in send order across holding, forwarding and moves: an
//! append is handed on (to a local actor's mailbox, or in a batch to the owner) only after
//! every earlier one was, and a batch the owner did not finish (the slot moved) is resent from
//! its first untaken append.

use std::sync::Arc;
use std::time::Duration;

use ferry_shards::actor::conversation::{AppendOutcome, AppendRequest};
use ferry_shards::actor::ConversationHandle;
use ferry_shards::archive::ConversationMeta;
use ferry_shards::ids::ConversationId;
use ferry_shards::node::{AppendTicket, ConversationReader, Refused, TryAgainReason};
use ferry_shards::record::Message;

use crate::access;
use crate::auth::Principal;
use crate::cluster::peer::{
    AppendBatch, AppendBatchReply, PeerError, ReadReply, ReadRequest, WireAppend, WireResult,
};
use crate::cluster::{Cluster, Route};
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::metrics as m;

/// Routing attempts before a request gives up with `try_again` (slots do not move that often).
const MAX_ROUTES: usize = 6;

/// The highest seq a conversation can have: the archive stores seqs as signed 64-bit integers.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// A seq a client gave as a position (`after_seq`, `before_seq`, `Last-Event-ID`, a join's
/// `after_seq`), clamped to [`MAX_SEQ`]: any position past the last message means the same
/// thing, and everything downstream may add one to it without overflowing.
pub fn clamp_seq(seq: u64) -> u64 {
    seq.min(MAX_SEQ)
}

/// The end user a request comes from, for the owner's membership check.
fn user_of(principal: &Principal) -> Option<String> {
    match principal {
        Principal::User { sub, .. } => Some(sub.to_string()),
        Principal::ApiKey { .. } => None,
    }
}

fn route(state: &AppState, id: &ConversationId) -> Route {
    match &state.cluster {
        None => Route::Local,
        Some(cluster) => cluster.route(state.node.slot_of(id)),
    }
}

async fn refresh(state: &AppState, id: &ConversationId) {
    if let Some(cluster) = &state.cluster {
        cluster.refresh_slot(state.node.slot_of(id)).await;
    }
}

fn unavailable(reason: TryAgainReason) -> ApiError {
    ApiError::try_again(reason, reason.retry_after_ms())
}

/// What a failed call to the owner means for the request: `None` to route it again, or the
/// answer. An owner that cannot be reached may simply have handed the slot over and exited
/// before this node's view caught up (a rolling restart): the slot's row is read again, and the
/// request goes where it now says; only an owner that is still the one named is unavailable.
async fn peer_failed(state: &AppState, id: &ConversationId, e: PeerError) -> Option<ApiError> {
    match e {
        PeerError::Api(e) => Some(e),
        PeerError::Moved => None,
        PeerError::Unreachable(why) => {
            tracing::debug!(conversation = %id, slot = state.node.slot_of(id), error = %why, "owner unreachable");
            let tried = route(state, id);
            refresh(state, id).await;
            if route(state, id) != tried {
                return None;
            }
            Some(unavailable(TryAgainReason::OwnerUnavailable))
        }
    }
}

/// A conversation as a request sees it: its description and last seq, and its local handle when
/// this node owns it and its actor runs (looking starts none).
pub struct Conversation {
    pub meta: Arc<ConversationMeta>,
    pub last_seq: u64,
    pub local: Option<ConversationHandle>,
}

/// Looks a conversation up (authorized for `principal`) without starting a writer anywhere.
pub async fn conversation(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
) -> Result<Conversation, ApiError> {
    find_conversation(state, principal, id)
        .await
        .map_err(|e| access::conceal(principal, e))
}

async fn find_conversation(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
) -> Result<Conversation, ApiError> {
    for _ in 0..MAX_ROUTES {
        match route(state, id) {
            Route::Local => match state.node.peek(id).await {
                Ok(reader) => {
                    authorize_reader(state, principal, &reader).await?;
                    return Ok(Conversation {
                        meta: reader.meta(),
                        last_seq: reader.last_seq(),
                        local: reader.active().cloned(),
                    });
                }
                Err(ferry_shards::node::NodeError::NotOwner { .. }) => refresh(state, id).await,
                Err(e) => return Err(e.into()),
            },
            Route::Stale => refresh(state, id).await,
            Route::Remote { url, epoch, .. } => {
                let meta = described(state, principal, id).await?;
                let request = ReadRequest {
                    conversation_id: id.to_string(),
                    epoch,
                    user: None,
                    after_seq: None,
                    before_seq: None,
                    limit: 0,
                };
                match forward_read(state, &url, &request).await {
                    Ok(reply) => {
                        return Ok(Conversation {
                            meta,
                            last_seq: reply.last_seq,
                            local: None,
                        })
                    }
                    Err(e) => match peer_failed(state, id, e).await {
                        Some(e) if is_unreachable(&e) => {
                            return archived_conversation(state, meta, id).await
                        }
                        Some(e) => return Err(e),
                        None => refresh(state, id).await,
                    },
                }
            }
            Route::Unavailable(_) => {
                let meta = described(state, principal, id).await?;
                return archived_conversation(state, meta, id).await;
            }
        }
    }
    Err(unavailable(TryAgainReason::SlotMoving))
}

/// [`conversation`] for a subscriber (an SSE stream, a joined topic). On the owner it starts the
/// conversation's actor if none runs: a subscriber waits on the live log, which only an active
/// conversation keeps, and a conversation that cannot start should fail the subscription now
/// rather than its stream later.
pub async fn follow(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
) -> Result<Conversation, ApiError> {
    let mut conversation = conversation(state, principal, id).await?;
    if conversation.local.is_none() && matches!(route(state, id), Route::Local) {
        match state.node.conversation(id).await {
            Ok(handle) => {
                conversation.last_seq = handle.log.durable_seq();
                conversation.local = Some(handle);
            }
            // The slot left meanwhile: the cursor follows the conversation to its owner.
            Err(ferry_shards::node::NodeError::NotOwner { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(conversation)
}

fn is_unreachable(e: &ApiError) -> bool {
    e.reason == Some(TryAgainReason::OwnerUnavailable.as_str())
}

/// Authorizes against the owner's cached description; a refusal is checked once more against
/// SQL (a participant added through another node may not have reached this cache yet).
pub async fn authorize_fresh(
    state: &AppState,
    principal: &Principal,
    handle: &ConversationHandle,
) -> Result<(), ApiError> {
    if access::authorize(principal, &handle.meta()).is_ok() {
        return Ok(());
    }
    if let Some(meta) = state.store.conversation(&handle.log.id).await? {
        state.node.refresh_meta(meta);
    }
    access::authorize(principal, &handle.meta())
}

/// Authorizes a reader: against the active actor's cached description (checked again against
/// SQL, see [`authorize_fresh`]), or against the one it just read from SQL.
pub async fn authorize_reader(
    state: &AppState,
    principal: &Principal,
    reader: &ConversationReader,
) -> Result<(), ApiError> {
    match reader.active() {
        Some(handle) => authorize_fresh(state, principal, handle).await,
        None => access::authorize(principal, &reader.meta()),
    }
}

/// The description from SQL, authorized.
async fn described(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
) -> Result<Arc<ConversationMeta>, ApiError> {
    let meta = state
        .store
        .conversation(id)
        .await?
        .ok_or_else(|| ApiError::not_found("conversation not found"))?;
    access::authorize(principal, &meta)?;
    Ok(Arc::new(meta))
}

/// What the archive knows of a conversation whose owner cannot answer.
async fn archived_conversation(
    state: &AppState,
    meta: Arc<ConversationMeta>,
    id: &ConversationId,
) -> Result<Conversation, ApiError> {
    Ok(Conversation {
        meta,
        last_seq: state.store.last_seq(id).await?,
        local: None,
    })
}

async fn forward_read(
    state: &AppState,
    url: &str,
    request: &ReadRequest,
) -> Result<ReadReply, PeerError> {
    let cluster = state
        .cluster
        .as_ref()
        .expect("remote routes exist only in a cluster");
    metrics::counter!(m::FORWARDED_TOTAL, "op" => "read").increment(1);
    cluster
        .peers()
        .post(url, "/internal/v1/read", request)
        .await
}

/// Messages an owner sent, rebuilt.
fn decode_messages(
    wire: Vec<crate::cluster::peer::WireMessage>,
) -> Result<Vec<Arc<Message>>, ApiError> {
    wire.into_iter()
        .map(|m| {
            m.into_message()
                .map(Arc::new)
                .map_err(|e| ApiError::internal("the owner sent a bad message", e))
        })
        .collect()
}

/// Appends one message (HTTP); answers once it is durable on the owner.
pub async fn append(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
    request: AppendRequest,
) -> Result<AppendOutcome, ApiError> {
    let mut queue = AppendQueue::new(state.clone(), principal.clone(), id.clone());
    let ticket = queue.submit(request).await?;
    ticket.outcome().await
}

/// An append handed on in order; resolves to its outcome.
pub enum Pending {
    Local(AppendTicket),
    Done(Result<AppendOutcome, ApiError>),
    /// Not handed on: the slot is not here (only from a queue that does not forward).
    NotTaken,
}

impl Pending {
    pub async fn outcome(mut self) -> Result<AppendOutcome, ApiError> {
        std::future::poll_fn(|cx| self.poll_outcome(cx)).await
    }

    /// The outcome once it is known, without taking the `Pending` (so a caller can wait on the
    /// oldest of several in place). Polling again after `Ready` is not allowed; dropping the
    /// poll's future before then loses nothing.
    pub fn poll_outcome(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<AppendOutcome, ApiError>> {
        if let Pending::Local(ticket) = self {
            return ticket.poll_outcome(cx).map_err(Into::into);
        }
        std::task::Poll::Ready(match std::mem::replace(self, Pending::NotTaken) {
            Pending::Done(result) => result,
            _ => Err(unavailable(TryAgainReason::SlotMoving)),
        })
    }
}

/// One ordering owner per (socket, conversation): see the module docs.
pub struct AppendQueue {
    state: AppState,
    principal: Principal,
    id: ConversationId,
    /// Forward to the owner when the slot is elsewhere (false on the owner's side of a
    /// forwarded batch: there the rest is answered `NotTaken`, and the caller re-routes it).
    forward: bool,
    /// The conversation's actor, kept from the last local submit (see `Node::submit_via`).
    handle: Option<ConversationHandle>,
}

impl AppendQueue {
    pub fn new(state: AppState, principal: Principal, id: ConversationId) -> AppendQueue {
        AppendQueue {
            state,
            principal,
            id,
            forward: true,
            handle: None,
        }
    }

    /// A queue that serves only what this node owns (the node-to-node API's side).
    pub fn local_only(state: AppState, principal: Principal, id: ConversationId) -> AppendQueue {
        AppendQueue {
            forward: false,
            ..AppendQueue::new(state, principal, id)
        }
    }

    /// Hands one append on; returns once it has its place in the conversation's order (a
    /// forwarded append: once the owner answered it).
    pub async fn submit(&mut self, request: AppendRequest) -> Result<Pending, ApiError> {
        let mut batch = vec![request];
        let mut results = self.submit_batch(&mut batch).await?;
        Ok(results
            .pop()
            .unwrap_or_else(|| Pending::Done(Err(unavailable(TryAgainReason::Restarting)))))
    }

    /// Hands several appends on, in order; one result per append, in order.
    pub async fn submit_batch(
        &mut self,
        requests: &mut Vec<AppendRequest>,
    ) -> Result<Vec<Pending>, ApiError> {
        let hold = self
            .state
            .cluster
            .as_ref()
            .map_or(self.state.node.config().hold_timeout, |c| {
                c.config().move_hold
            });
        let deadline = tokio::time::Instant::now() + hold;
        let mut out: Vec<Pending> = Vec::with_capacity(requests.len());
        let mut rest: std::collections::VecDeque<AppendRequest> = requests.drain(..).collect();
        let mut routes = 0;
        while !rest.is_empty() {
            if routes > MAX_ROUTES {
                out.extend(
                    rest.drain(..)
                        .map(|_| Pending::Done(Err(unavailable(TryAgainReason::SlotMoving)))),
                );
                break;
            }
            let here = route(&self.state, &self.id);
            if !self.forward && !matches!(here, Route::Local | Route::Stale) {
                out.extend(rest.drain(..).map(|_| Pending::NotTaken));
                break;
            }
            match here {
                Route::Local => {
                    let Some(request) = rest.pop_front() else {
                        break;
                    };
                    if let Principal::User { .. } = self.principal {
                        // Membership can change after a join. Checked without starting the
                        // conversation: a caller not allowed in it never activates it.
                        match self.state.node.peek(&self.id).await {
                            Ok(reader) => {
                                if let Err(e) =
                                    authorize_reader(&self.state, &self.principal, &reader).await
                                {
                                    out.push(Pending::Done(Err(e)));
                                    continue;
                                }
                            }
                            Err(ferry_shards::node::NodeError::NotOwner { .. }) => {
                                rest.push_front(request);
                                routes += 1;
                                refresh(&self.state, &self.id).await;
                                continue;
                            }
                            Err(e) => {
                                out.push(Pending::Done(Err(access::conceal(
                                    &self.principal,
                                    e.into(),
                                ))));
                                continue;
                            }
                        }
                    }
                    let mut changed = self.state.node.gates().changed();
                    match self
                        .state
                        .node
                        .submit_via(&self.id, &mut self.handle, request)
                        .await
                    {
                        Ok(ticket) => out.push(Pending::Local(ticket)),
                        Err(Refused::Holding(back)) => {
                            rest.push_front(back);
                            if !self
                                .state
                                .node
                                .wait_gate_change(&mut changed, deadline)
                                .await
                            {
                                metrics::counter!(ferry_shards::metrics::TRY_AGAIN_TOTAL, "reason" => "slot_moving").increment(1);
                                out.extend(rest.drain(..).map(|_| {
                                    Pending::Done(Err(unavailable(TryAgainReason::SlotMoving)))
                                }));
                            }
                        }
                        Err(Refused::NotOwner(back)) => {
                            rest.push_front(back);
                            routes += 1;
                            refresh(&self.state, &self.id).await;
                        }
                        Err(Refused::Failed(e)) => out.push(Pending::Done(Err(e.into()))),
                    }
                }
                Route::Stale => {
                    routes += 1;
                    refresh(&self.state, &self.id).await;
                }
                Route::Unavailable(reason) => {
                    out.extend(
                        rest.drain(..)
                            .map(|_| Pending::Done(Err(unavailable(reason)))),
                    );
                }
                Route::Remote { url, epoch, .. } => {
                    let batch = AppendBatch {
                        conversation_id: self.id.to_string(),
                        epoch,
                        user: user_of(&self.principal),
                        appends: rest.iter().map(WireAppend::from).collect(),
                    };
                    let cluster = self
                        .state
                        .cluster
                        .as_ref()
                        .expect("remote routes exist only in a cluster");
                    metrics::counter!(m::FORWARDED_TOTAL, "op" => "append")
                        .increment(batch.appends.len() as u64);
                    let answer: Result<AppendBatchReply, PeerError> = cluster
                        .peers()
                        .post(&url, "/internal/v1/append", &batch)
                        .await;
                    match answer {
                        Ok(reply) => {
                            let mut taken = 0;
                            for result in reply.results {
                                match result {
                                    WireResult::NotTaken => break,
                                    WireResult::Ok {
                                        seq,
                                        id,
                                        created_at_ms,
                                        deduped,
                                    } => {
                                        out.push(Pending::Done(Ok(AppendOutcome {
                                            seq,
                                            id,
                                            created_at_ms,
                                            deduped,
                                        })));
                                    }
                                    WireResult::Err { error } => {
                                        out.push(Pending::Done(Err(error.into())))
                                    }
                                }
                                taken += 1;
                            }
                            rest.drain(..taken.min(rest.len()));
                            if !rest.is_empty() {
                                routes += 1;
                                refresh(&self.state, &self.id).await;
                            }
                        }
                        Err(e) => match peer_failed(&self.state, &self.id, e).await {
                            Some(e) => {
                                out.extend(rest.drain(..).map(|_| Pending::Done(Err(e.clone()))));
                            }
                            None => {
                                routes += 1;
                                refresh(&self.state, &self.id).await;
                            }
                        },
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Messages after `after_seq` (or the newest before `before_seq`), ascending, and the last seq,
/// wherever the conversation lives. Authorized for `principal`.
pub async fn read(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
    after_seq: Option<u64>,
    before_seq: Option<u64>,
    limit: usize,
) -> Result<(Vec<Arc<Message>>, u64), ApiError> {
    read_routed(state, principal, id, after_seq, before_seq, limit)
        .await
        .map_err(|e| access::conceal(principal, e))
}

async fn read_routed(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
    after_seq: Option<u64>,
    before_seq: Option<u64>,
    limit: usize,
) -> Result<(Vec<Arc<Message>>, u64), ApiError> {
    for _ in 0..MAX_ROUTES {
        match route(state, id) {
            Route::Local => {
                let reader = match state.node.peek(id).await {
                    Ok(reader) => reader,
                    Err(ferry_shards::node::NodeError::NotOwner { .. }) => {
                        refresh(state, id).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                authorize_reader(state, principal, &reader).await?;
                return read_local(&reader, after_seq, before_seq, limit).await;
            }
            Route::Stale => refresh(state, id).await,
            Route::Remote { url, epoch, .. } => {
                let request = ReadRequest {
                    conversation_id: id.to_string(),
                    epoch,
                    user: user_of(principal),
                    after_seq,
                    before_seq,
                    limit,
                };
                match forward_read(state, &url, &request).await {
                    Ok(reply) => return Ok((decode_messages(reply.messages)?, reply.last_seq)),
                    Err(e) => match peer_failed(state, id, e).await {
                        Some(e) if is_unreachable(&e) => {
                            return read_archived(
                                state, principal, id, after_seq, before_seq, limit,
                            )
                            .await
                        }
                        Some(e) => return Err(e),
                        None => refresh(state, id).await,
                    },
                }
            }
            Route::Unavailable(_) => {
                return read_archived(state, principal, id, after_seq, before_seq, limit).await
            }
        }
    }
    Err(unavailable(TryAgainReason::SlotMoving))
}

/// A read on the owner; starts no writer.
pub async fn read_local(
    reader: &ConversationReader,
    after_seq: Option<u64>,
    before_seq: Option<u64>,
    limit: usize,
) -> Result<(Vec<Arc<Message>>, u64), ApiError> {
    let last_seq = reader.last_seq();
    if limit == 0 {
        return Ok((Vec::new(), last_seq));
    }
    let messages = match before_seq {
        Some(before) => reader.read_before(before, limit).await?,
        None => reader.read_after(after_seq.unwrap_or(0), limit).await?,
    };
    let newest = messages.last().map_or(0, |m| m.seq);
    Ok((messages, last_seq.max(newest)))
}

/// A read of what the archive holds (the owner is gone).
async fn read_archived(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
    after_seq: Option<u64>,
    before_seq: Option<u64>,
    limit: usize,
) -> Result<(Vec<Arc<Message>>, u64), ApiError> {
    use ferry_shards::archive::Archive;
    described(state, principal, id).await?;
    let last_seq = state.store.last_seq(id).await?;
    if limit == 0 {
        return Ok((Vec::new(), last_seq));
    }
    metrics::counter!(ferry_shards::metrics::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
    let messages = match before_seq {
        Some(before) => state.store.read_messages(id, 0, before, limit, true).await,
        None => {
            state
                .store
                .read_messages(id, after_seq.unwrap_or(0), u64::MAX, limit, false)
                .await
        }
    }
    .map_err(|e| ApiError::internal("history unavailable", e))?;
    Ok((messages, last_seq))
}

/// The last seq of a conversation, wherever it lives (the caller has authorized).
pub async fn last_seq(state: &AppState, id: &ConversationId) -> Result<u64, ApiError> {
    let principal = Principal::node();
    conversation(state, &principal, id)
        .await
        .map(|c| c.last_seq)
}

/// The interval at which a remote subscriber asks the owner for its last seq even without a
/// live notification: a lost *last* message shows up as no gap at all.
pub const TOP_SEQ_CHECK: Duration = Duration::from_secs(1);

/// The seq ranges (`from..=to`) failovers reserved in the conversation for a lost node's
/// messages, ascending; none outside a cluster.
pub async fn reserved_ranges(
    state: &AppState,
    id: &ConversationId,
) -> Result<Vec<(u64, u64)>, ApiError> {
    let Some(cluster) = cluster(state) else {
        return Ok(Vec::new());
    };
    let reservations = cluster
        .db()
        .reservations(id.as_str())
        .await
        .map_err(|e| ApiError::internal("history unavailable", e))?;
    Ok(reservations
        .into_iter()
        .map(|r| (r.from_seq, r.to_seq))
        .collect())
}

/// Whether every seq of `from..=to` lies in one of `ranges` (ascending, as
/// [`reserved_ranges`] gives them).
pub fn all_reserved(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    let mut next = from;
    for &(a, b) in ranges {
        if next > to {
            break;
        }
        if a > next {
            return false;
        }
        if b >= next {
            next = b.saturating_add(1);
        }
    }
    next > to
}

/// The runs of seqs in `from..=to` that none of `messages` (ascending) holds.
pub fn holes(messages: &[Arc<Message>], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = from;
    for m in messages {
        if m.seq > to {
            break;
        }
        if m.seq > next {
            out.push((next, m.seq - 1));
        }
        next = next.max(m.seq.saturating_add(1));
    }
    if next <= to {
        out.push((next, to));
    }
    out
}

/// For cluster-aware callers that need the cluster handle.
pub fn cluster(state: &AppState) -> Option<&Cluster> {
    state.cluster.as_ref()
}

/// Which cursor a participant moves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CursorKind {
    /// Delivered up to here (`ack`).
    Ack,
    /// Read up to here (`read`; drives unread counts).
    Read,
}

/// Moves a participant's cursor (never backwards) and answers `{participant, seq}`, plus
/// `unread` for a read cursor. The same for HTTP and WebSocket.
pub async fn move_cursor(
    state: &AppState,
    principal: &Principal,
    id: &ConversationId,
    participant: &ferry_shards::ids::ParticipantId,
    seq: u64,
    kind: CursorKind,
) -> Result<serde_json::Value, ApiError> {
    let conversation = conversation(state, principal, id).await?;
    if !conversation.meta.has_participant(participant.as_str()) {
        return Err(ApiError::invalid(format!(
            "{participant} is not a participant of {id}"
        )));
    }
    if seq > conversation.last_seq {
        return Err(ApiError::invalid(format!(
            "seq {seq} is beyond last_seq {}",
            conversation.last_seq
        )));
    }
    let now = ferry_shards::record::now_ms();
    match kind {
        CursorKind::Ack => {
            state
                .store
                .set_cursor(id, participant, None, Some(seq), now)
                .await?;
            Ok(serde_json::json!({ "participant": participant.as_str(), "seq": seq }))
        }
        CursorKind::Read => {
            state
                .store
                .set_cursor(id, participant, Some(seq), None, now)
                .await?;
            state.events.cursor_changed(participant, id);
            let entry = inbox_entry(state, participant, id).await?;
            Ok(serde_json::json!({
                "participant": participant.as_str(),
                "seq": entry.read_seq,
                "unread": entry.unread,
            }))
        }
    }
}

/// One inbox entry, computed where the conversation's newest messages are: on its owner.
pub async fn inbox_entry(
    state: &AppState,
    participant: &ferry_shards::ids::ParticipantId,
    id: &ConversationId,
) -> Result<crate::inbox::InboxEntry, ApiError> {
    for _ in 0..MAX_ROUTES {
        match route(state, id) {
            Route::Local | Route::Unavailable(_) => {
                return Ok(crate::inbox::entry(&state.node, &state.store, participant, id).await?)
            }
            Route::Stale => refresh(state, id).await,
            Route::Remote { url, epoch, .. } => {
                let cluster = state
                    .cluster
                    .as_ref()
                    .expect("remote routes exist only in a cluster");
                let request = crate::cluster::peer::InboxEntryRequest {
                    participant: participant.to_string(),
                    conversation_id: id.to_string(),
                    epoch,
                };
                metrics::counter!(m::FORWARDED_TOTAL, "op" => "inbox").increment(1);
                let answer: Result<crate::cluster::peer::WireInboxEntry, PeerError> = cluster
                    .peers()
                    .post(&url, "/internal/v1/inbox_entry", &request)
                    .await;
                match answer {
                    Ok(entry) => return entry.into_entry().map_err(ApiError::unavailable),
                    Err(e) => match peer_failed(state, id, e).await {
                        Some(e) if is_unreachable(&e) => {
                            return Ok(crate::inbox::entry(
                                &state.node,
                                &state.store,
                                participant,
                                id,
                            )
                            .await?)
                        }
                        Some(e) => return Err(e),
                        None => refresh(state, id).await,
                    },
                }
            }
        }
    }
    Err(unavailable(TryAgainReason::SlotMoving))
}

/// What a cursor following a conversation on another node reads next.
pub enum Fetched {
    /// The slot is here now: read the local log.
    Local(ConversationHandle),
    /// Messages after the position (possibly none), from the owner or, while it is unavailable,
    /// from the archive.
    Messages(Vec<Arc<Message>>),
}

/// The next page after `after_seq` for a cursor (authorized when it was opened).
pub async fn fetch_after(
    state: &AppState,
    id: &ConversationId,
    after_seq: u64,
    limit: usize,
) -> Result<Fetched, ApiError> {
    use ferry_shards::archive::Archive;
    for _ in 0..MAX_ROUTES {
        match route(state, id) {
            Route::Local => match state.node.conversation(id).await {
                Ok(handle) => return Ok(Fetched::Local(handle)),
                Err(ferry_shards::node::NodeError::NotOwner { .. }) => refresh(state, id).await,
                Err(e) => return Err(e.into()),
            },
            Route::Stale => refresh(state, id).await,
            Route::Remote { url, epoch, .. } => {
                let request = ReadRequest {
                    conversation_id: id.to_string(),
                    epoch,
                    user: None,
                    after_seq: Some(after_seq),
                    before_seq: None,
                    limit,
                };
                match forward_read(state, &url, &request).await {
                    Ok(reply) => return Ok(Fetched::Messages(decode_messages(reply.messages)?)),
                    Err(e) => match peer_failed(state, id, e).await {
                        Some(e) if is_unreachable(&e) => break,
                        Some(e) => return Err(e),
                        None => refresh(state, id).await,
                    },
                }
            }
            Route::Unavailable(_) => break,
        }
    }
    // Nobody can answer for the slot now: what the archive holds.
    let messages = state
        .store
        .read_messages(id, after_seq, u64::MAX, limit, false)
        .await
        .map_err(|e| ApiError::internal("history unavailable", e))?;
    Ok(Fetched::Messages(messages))
}

#[cfg(test)]
mod reservation_tests {
    use super::{all_reserved, holes};

    #[test]
    fn reserved_ranges_cover_runs_across_adjacent_reservations() {
        let ranges = [(11, 20), (21, 30), (41, 50)];
        assert!(all_reserved(&ranges, 11, 30));
        assert!(all_reserved(&ranges, 15, 25));
        assert!(!all_reserved(&ranges, 10, 12));
        assert!(!all_reserved(&ranges, 25, 41));
        assert!(all_reserved(&ranges, 45, 45));
        assert!(!all_reserved(&[], 1, 1));
    }

    #[test]
    fn holes_are_the_runs_no_message_holds() {
        use ferry_shards::ids::{ConversationId, ParticipantId};
        use serde_json::value::RawValue;
        let m = |seq: u64| {
            std::sync::Arc::new(ferry_shards::record::Message {
                conversation_id: ConversationId::parse("c").unwrap(),
                slot: 0,
                epoch: 0,
                seq,
                id: uuid::Uuid::now_v7(),
                created_at_ms: 0,
                sender: ParticipantId::parse("a").unwrap(),
                kind: "text".into(),
                content: RawValue::from_string("1".into()).unwrap(),
                metadata: RawValue::from_string("{}".into()).unwrap(),
                idempotency_key: None,
                rendered: Default::default(),
            })
        };
        let page = [m(3), m(4), m(9)];
        assert_eq!(holes(&page, 1, 12), vec![(1, 2), (5, 8), (10, 12)]);
        assert_eq!(holes(&page, 3, 9), vec![(5, 8)]);
        assert_eq!(holes(&[], 5, 7), vec![(5, 7)]);
        assert!(holes(&page, 3, 4).is_empty());
    }
}
