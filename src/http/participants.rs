//! Read cursors and the inbox: `POST /v1/conversations/{id}/read`,
//! `GET /v1/participants/{id}/inbox`.

use axum::extract::State;
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

pub async fn inbox(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
) -> Result<Json<serde_json::Value>, ApiError> {
    let participant = participant_id(&raw_id)?;
    access::act_for(&principal, &participant)?;
    let conversations = inbox::snapshot(&state, &participant).await?;
    Ok(Json(json!({ "conversations": conversations })))
}
