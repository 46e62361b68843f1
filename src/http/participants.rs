//! Read cursors and the inbox: `POST /v1/conversations/{id}/read`,
//! `GET /v1/participants/{id}/inbox`.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use ferry_shards::record::now_ms;

use super::error::ApiError;
use super::{conversation_id, participant_id, AppState, Caller, JsonBody, PathParam};
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
    let handle = state.node.conversation(&id).await?;
    let meta = handle.meta();
    access::authorize(&principal, &meta)?;
    if !meta.has_participant(participant.as_str()) {
        return Err(ApiError::invalid(format!(
            "{participant} is not a participant of {id}"
        )));
    }
    let last_seq = handle.log.durable_seq();
    if body.seq > last_seq {
        return Err(ApiError::invalid(format!(
            "seq {} is beyond last_seq {last_seq}",
            body.seq
        )));
    }
    state
        .store
        .set_cursor(&id, &participant, Some(body.seq), None, now_ms())
        .await?;
    state.events.cursor_changed(&participant, &id);
    let entry = inbox::entry(&state.node, &state.store, &participant, &id).await?;
    Ok(Json(json!({
        "participant": participant.as_str(),
        "seq": entry.read_seq,
        "unread": entry.unread,
    })))
}

pub async fn inbox(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
) -> Result<Json<serde_json::Value>, ApiError> {
    let participant = participant_id(&raw_id)?;
    access::act_for(&principal, &participant)?;
    let conversations = inbox::snapshot(&state.node, &state.store, &participant).await?;
    Ok(Json(json!({ "conversations": conversations })))
}
