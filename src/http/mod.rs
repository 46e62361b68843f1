//! The public HTTP API (PROTOCOL.md, "HTTP API"): conversations, messages, health.
//!
//! Handlers parse and validate everything themselves (bodies are read as bytes under a size
//! limit and decoded with serde) so every bad input gets its protocol code rather than a
//! framework default.

pub mod error;
mod layers;
pub mod messages;
mod participants;
mod stream;
pub mod transport;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use ferry_shards::archive::ConversationMeta;
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::node::Node;
use ferry_shards::placement::slot_of;
use ferry_shards::record::{format_rfc3339_millis, now_ms};

use crate::auth::{Auth, Principal};
use crate::config::Config;
use crate::store::Store;
use error::ApiError;

/// Everything a request handler needs, behind one `Arc`: axum clones the state for every
/// extractor of every request, and one reference count is cheaper than a dozen.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub node: Node,
    pub store: Store,
    pub auth: Arc<Auth>,
    pub config: Arc<Config>,
    pub events: crate::inbox::Events,
    /// Becomes true when the server starts shutting down: long-lived streams end on it.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// This node's cluster membership; `None` for a node that runs alone.
    pub cluster: Option<crate::cluster::Cluster>,
    /// The `[rate]` limits.
    pub rate: Arc<crate::rate::RateLimits>,
    /// WebSockets and SSE streams open per principal.
    pub sockets: Arc<crate::rate::OpenSockets>,
}

pub fn router(state: AppState) -> Router {
    let timeout = state.config.limits.request_timeout;
    let cors = layers::cors(&state.config.http.cors_origins);
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/v1/conversations/{id}",
            put(put_conversation).get(get_conversation),
        )
        .route(
            "/v1/conversations/{id}/messages",
            get(messages::list).post(messages::append),
        )
        .route(
            "/v1/conversations/{id}/read",
            axum::routing::post(participants::mark_read),
        )
        .route("/v1/participants/{id}/inbox", get(participants::inbox))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Only the routes above: streams are long-lived by design.
        .layer(layers::RequestTimeoutLayer { limit: timeout })
        .route("/v1/conversations/{id}/stream", get(stream::sse))
        .merge(crate::ws::routes())
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub(crate) async fn method_not_allowed() -> Response {
    let mut e = ApiError::invalid("method not allowed on this route");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.into_response()
}

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    readiness(&state.node, state.cluster.as_ref())
}

/// `/readyz` on either listener: 200 `{status: "ready"}`, or 503 while the node cannot append
/// (and, in a cluster, while it is not `active`: joining, draining, drained, or without a lease).
pub(crate) fn readiness(node: &Node, cluster: Option<&crate::cluster::Cluster>) -> Response {
    let ready = match cluster {
        Some(cluster) => cluster.ready(),
        None => node.ready(),
    };
    if ready {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let mut body = json!({"status": "unavailable", "wal_poisoned": node.wal().poisoned()});
        if let Some(cluster) = cluster {
            body["state"] = json!(cluster.state().as_str());
            body["lease_valid"] = json!(node.gates().lease_valid());
        }
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// The header an append's idempotency key may come in (or its body's `idempotency_key`).
pub const IDEMPOTENCY_KEY: axum::http::HeaderName =
    axum::http::HeaderName::from_static("idempotency-key");

/// The caller, authenticated from the `Authorization` header. As an extractor it runs before the
/// body is read, so a request without valid credentials is a 401 whatever its body holds.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = transport::client_ip(&parts.extensions);
        state
            .auth
            .authenticate(&parts.headers, ip.as_deref())
            .await
            .map(Caller)
    }
}

/// One path parameter, percent-decoded; a path that does not decode (say `%FF`, not UTF-8) is
/// `invalid` in the protocol's JSON, not axum's plain-text rejection. Handlers take it after
/// [`Caller`], so credentials are checked first.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| PathParam(value))
            .map_err(|e| ApiError::invalid(format!("bad path: {}", e.body_text())))
    }
}

/// A JSON body read under the configured size limit; every failure is a protocol error.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A request's body, read whole under the configured size limit.
pub async fn body_bytes(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    // Room for the JSON envelope around a maximum-size message.
    let limit = state.config.limits.max_message_bytes * 2 + 16 * 1024;
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::too_large(format!("request body larger than {limit} bytes")))
}

pub fn parse_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid("request body must be a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

pub fn conversation_id(raw: &str) -> Result<ConversationId, ApiError> {
    ConversationId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

pub fn participant_id(raw: &str) -> Result<ParticipantId, ApiError> {
    ParticipantId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

/// `metadata` must be a JSON object when given.
pub fn object_or_invalid(value: Option<Box<RawValue>>) -> Result<Option<Box<RawValue>>, ApiError> {
    match value {
        None => Ok(None),
        Some(raw) if raw.get().trim_start().starts_with('{') => Ok(Some(raw)),
        Some(raw) if raw.get().trim() == "null" => Ok(None),
        Some(_) => Err(ApiError::invalid("metadata must be a JSON object")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutConversation {
    participants: Vec<String>,
    #[serde(default)]
    metadata: Option<Box<RawValue>>,
}

fn conversation_json(meta: &ConversationMeta, slot: u32, last_seq: u64) -> serde_json::Value {
    json!({
        "id": meta.id.as_str(),
        "slot": slot,
        "last_seq": last_seq,
        "participants": meta.participants.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "metadata": meta.metadata,
        "created_at": format_rfc3339_millis(meta.created_at_ms),
    })
}

async fn put_conversation(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
    JsonBody(body): JsonBody<PutConversation>,
) -> Result<Response, ApiError> {
    crate::access::require_api_key(&principal)?;
    principal.may_write()?;
    let id = conversation_id(&raw_id)?;
    if body.participants.len() > state.config.limits.max_participants {
        return Err(ApiError::invalid(format!(
            "at most {} participants",
            state.config.limits.max_participants
        )));
    }
    let participants = body
        .participants
        .iter()
        .map(|p| participant_id(p))
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = object_or_invalid(body.metadata)?;
    if let Some(m) = &metadata {
        crate::store::check_storable_json(m.get())
            .map_err(|e| ApiError::invalid(format!("metadata: {e}")))?;
    }
    if metadata
        .as_ref()
        .is_some_and(|m| m.get().len() > state.config.limits.max_message_bytes)
    {
        return Err(ApiError::too_large("metadata too large"));
    }
    let upserted = state
        .store
        .upsert_conversation(&id, &participants, metadata.as_deref(), now_ms())
        .await?;
    state.node.refresh_meta(upserted.meta.clone());
    if !upserted.created {
        state.events.meta_changed(&id);
    }
    // Only a participant's own inbox changes, and only when it joins.
    for p in &upserted.added {
        state.events.membership_changed(p, &id);
    }
    let last_seq = crate::service::conversation(&state, &principal, &id)
        .await?
        .last_seq;
    let status = if upserted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let slot = slot_of(id.as_str(), state.config.slots.count);
    Ok((
        status,
        Json(conversation_json(&upserted.meta, slot, last_seq)),
    )
        .into_response())
}

async fn get_conversation(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = conversation_id(&raw_id)?;
    let conversation = crate::service::conversation(&state, &principal, &id).await?;
    let slot = slot_of(id.as_str(), state.config.slots.count);
    Ok(Json(conversation_json(
        &conversation.meta,
        slot,
        conversation.last_seq,
    )))
}
