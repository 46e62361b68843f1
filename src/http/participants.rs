//! Read cursors and the inbox: `POST /v1/conversations/{id}/read`,
//! `GET /v1/participants/{id}/inbox`.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{conversation_id, participant_id, AppState, Caller, JsonBody, PathParam};
use crate::service::{self, CursorKind};
use crate::{access, inbox};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    #[serde(default)]
    participant: Option<String>,
    seq: u64,
}

pub async fn mark_read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
    JsonBody(body): JsonBody<ReadBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.may_write()?;
    let id = conversation_id(&raw_id)?;
    let participant = access::sender(&principal, body.participant.as_deref())
        .map_err(|_| ApiError::invalid("participant is required with an API key"))?;
    let answer = service::move_cursor(
        &state,
        &principal,
        &id,
        &participant,
        body.seq,
        CursorKind::Read,
    )
    .await?;
    Ok(Json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxQuery {
    /// Conversations with ids after this one.
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

pub async fn inbox(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
    query: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let participant = participant_id(&raw_id)?;
    access::act_for(&principal, &participant)?;
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("invalid query: {e}")))?;
    let limit = match q.limit.as_deref() {
        None => inbox::MAX_SNAPSHOT_PAGE,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= 1 => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(inbox::MAX_SNAPSHOT_PAGE),
            _ => return Err(ApiError::invalid("limit must be a positive integer")),
        },
    };
    let (conversations, has_more) =
        inbox::snapshot(&state, &participant, q.after.as_deref(), limit).await?;
    let mut body = json!({ "conversations": conversations, "has_more": has_more });
    if has_more {
        body["next_after"] = json!(conversations.last().map(|e| e.id.clone()));
    }
    Ok(Json(body))
}
