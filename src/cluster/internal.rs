//! The node-to-node API (server side), on the admin listener under `/internal/v1/`. It takes the
//! cluster secret (header `x-ferry-cluster-secret`) and nothing else; an API key does not open it
//! and the secret opens nothing on the public listener.
//!
//! - `append`: appends of one conversation, in order, on its owner ([`AppendQueue`] semantics:
//!   handed to the actor one after the other, awaited together); a slot that left answers the
//!   rest of the batch `not_taken`.
//! - `read`: messages after (or before) a seq and the last durable seq, from the owner's log (or,
//!   when no actor runs for the conversation, its recovered log or the archive; a read starts none).
//! - `inbox_entry`: one conversation's inbox entry, computed on its owner.
//! - `restore`: messages a failed-over node acknowledged, written by the owner into the seqs
//!   reserved for that node (see `super::restore`).
//! - `slots/move`: the rebalancer asks the owner to hand a slot over.
//! - `slots/refresh`: "look at this slot's row now" (it was just given to you).
//!
//! Every slot call names the epoch the caller believes the callee owns the slot at. A call for a
//! slot this node does not own, or naming a newer epoch than this node serves it at, makes it
//! re-read the row once (the caller may know of a hand-over before this node does); still not
//! owned: `421 Misdirected Request`.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::node::NodeError;

use super::peer::{
    AppendBatch, AppendBatchReply, InboxEntryRequest, MoveRequest, ReadReply, ReadRequest,
    RestoreRequest, SlotHint, WireError, WireInboxEntry, WireMessage, WireResult, SECRET_HEADER,
};
use super::Cluster;
use crate::auth::Principal;
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::service::{self, AppendQueue, Pending};

#[derive(Clone)]
pub struct InternalState {
    pub app: AppState,
    pub cluster: Cluster,
    pub secret: String,
    pub admin: crate::admin::AdminState,
}

pub fn router(state: InternalState) -> Router {
    Router::new()
        .route("/internal/v1/append", post(append))
        .route("/internal/v1/read", post(read))
        .route("/internal/v1/inbox_entry", post(inbox_entry))
        .route("/internal/v1/restore", post(restore))
        .route("/internal/v1/slots/move", post(move_slot))
        .route("/internal/v1/slots/refresh", post(refresh))
        .route("/internal/v1/stats", post(stats))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ))
        .with_state(state)
}

/// Constant-time comparison, so the secret cannot be guessed byte by byte from timings.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    given.len() == secret.len() && given.iter().zip(secret).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

async fn require_secret(
    State(state): State<InternalState>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !same_secret(given, state.secret.as_bytes()) {
        crate::metrics::count_auth_failure("cluster_secret");
        return error(&ApiError::unauthorized(
            "the node-to-node API needs the cluster secret",
        ));
    }
    next.run(request).await
}

fn error(e: &ApiError) -> Response {
    (e.status, Json(WireError::from(e))).into_response()
}

fn moved() -> Response {
    (
        StatusCode::MISDIRECTED_REQUEST,
        Json(serde_json::json!({"error": "moved"})),
    )
        .into_response()
}

fn parse_conversation(raw: &str) -> Result<ConversationId, ApiError> {
    ConversationId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

/// True when this node owns the conversation's slot. It re-reads the slot's row first when it
/// does not, or when the caller names a newer epoch than this node serves the slot at (this
/// node's view is then the stale one, and the row decides).
async fn owns(state: &InternalState, id: &ConversationId, epoch: u64) -> bool {
    let slot = state.app.node.slot_of(id);
    let gates = state.app.node.gates();
    if gates.owned_epoch(slot).is_some_and(|mine| mine >= epoch) {
        return true;
    }
    state.cluster.refresh_slot(slot).await;
    state.app.node.gates().owned_epoch(slot).is_some()
}

fn principal_of(user: &Option<String>) -> Result<Principal, ApiError> {
    match user {
        None => Ok(Principal::node()),
        Some(sub) => ParticipantId::parse(sub)
            // The forwarding node checked the token (and ends its own sockets at expiry).
            .map(|sub| Principal::User {
                sub,
                expires_at_ms: i64::MAX,
            })
            .map_err(|e| ApiError::invalid(e.to_string())),
    }
}

async fn append(State(state): State<InternalState>, Json(batch): Json<AppendBatch>) -> Response {
    let id = match parse_conversation(&batch.conversation_id) {
        Ok(id) => id,
        Err(e) => return error(&e),
    };
    if !owns(&state, &id, batch.epoch).await {
        return moved();
    }
    let principal = match principal_of(&batch.user) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let mut requests = Vec::with_capacity(batch.appends.len());
    for append in batch.appends {
        match append.into_request() {
            Ok(r) => requests.push(r),
            Err(e) => return error(&e),
        }
    }
    let total = requests.len();
    // Handed on in order; a slot that leaves mid-batch is re-routed by the queue, which would
    // forward from here: answer `not_taken` for those instead, so the caller keeps the order.
    let mut queue = AppendQueue::local_only(state.app.clone(), principal, id);
    let pending = match queue.submit_batch(&mut requests).await {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let mut results = Vec::with_capacity(total);
    for p in pending {
        results.push(match p {
            Pending::NotTaken => WireResult::NotTaken,
            p => match p.outcome().await {
                Ok(outcome) => WireResult::from(&outcome),
                Err(e) => WireResult::Err {
                    error: WireError::from(&e),
                },
            },
        });
    }
    Json(AppendBatchReply { results }).into_response()
}

async fn read(State(state): State<InternalState>, Json(request): Json<ReadRequest>) -> Response {
    let id = match parse_conversation(&request.conversation_id) {
        Ok(id) => id,
        Err(e) => return error(&e),
    };
    if !owns(&state, &id, request.epoch).await {
        return moved();
    }
    let principal = match principal_of(&request.user) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    // A read starts no writer: a conversation without an active actor is read from its
    // recovered log or the archive.
    let reader = match state.app.node.peek(&id).await {
        Ok(reader) => reader,
        Err(NodeError::NotOwner { .. }) => return moved(),
        Err(e) => return error(&e.into()),
    };
    if let Err(e) = service::authorize_reader(&state.app, &principal, &reader).await {
        return error(&e);
    }
    let limit = request
        .limit
        .min(state.app.config.limits.max_page_size.max(1000));
    match service::read_local(&reader, request.after_seq, request.before_seq, limit).await {
        Ok((messages, last_seq)) => Json(ReadReply {
            messages: messages.iter().map(|m| WireMessage::from(&**m)).collect(),
            last_seq,
        })
        .into_response(),
        Err(e) => error(&e),
    }
}

async fn inbox_entry(
    State(state): State<InternalState>,
    Json(request): Json<InboxEntryRequest>,
) -> Response {
    let id = match parse_conversation(&request.conversation_id) {
        Ok(id) => id,
        Err(e) => return error(&e),
    };
    let participant = match ParticipantId::parse(&request.participant) {
        Ok(p) => p,
        Err(e) => return error(&ApiError::invalid(e.to_string())),
    };
    if !owns(&state, &id, request.epoch).await {
        return moved();
    }
    match crate::inbox::entry(&state.app.node, &state.app.store, &participant, &id).await {
        Ok(entry) => Json(WireInboxEntry::from(&entry)).into_response(),
        Err(e) => error(&e.into()),
    }
}

async fn restore(
    State(state): State<InternalState>,
    Json(request): Json<RestoreRequest>,
) -> Response {
    let id = match parse_conversation(&request.conversation_id) {
        Ok(id) => id,
        Err(e) => return error(&e),
    };
    let mut messages = Vec::with_capacity(request.messages.len());
    for m in request.messages {
        match m.into_message() {
            Ok(m) if m.conversation_id == id => messages.push(std::sync::Arc::new(m)),
            Ok(m) => {
                return error(&ApiError::invalid(format!(
                    "a restore of {id} holds a message of {}",
                    m.conversation_id
                )))
            }
            Err(e) => return error(&ApiError::invalid(e)),
        }
    }
    if !owns(&state, &id, request.epoch).await {
        return moved();
    }
    match state
        .app
        .node
        .restore(&id, &request.node_id, messages)
        .await
    {
        Ok(report) => Json(report).into_response(),
        Err(NodeError::NotOwner { .. }) => moved(),
        Err(e) => error(&e.into()),
    }
}

async fn move_slot(
    State(state): State<InternalState>,
    Json(request): Json<MoveRequest>,
) -> Response {
    match super::handover::move_slot(&state.cluster, request.slot, request.epoch, &request.target)
        .await
    {
        Ok(()) => Json(serde_json::json!({"slot": request.slot, "moved_to": request.target}))
            .into_response(),
        Err(why) => error(&ApiError::conflict(why)),
    }
}

async fn refresh(State(state): State<InternalState>, Json(hint): Json<SlotHint>) -> Response {
    if hint.slot < state.cluster.slot_count() {
        state.cluster.refresh_slot(hint.slot).await;
    }
    Json(serde_json::json!({})).into_response()
}

async fn stats(State(state): State<InternalState>) -> Response {
    Json(super::admin::local_stats(&state.admin)).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn the_secret_must_match_exactly() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3creT", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }
}
