//! `POST /v1/conversations/{id}/messages` (append) and `GET` (pages, forwards and backwards).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use ferry_shards::actor::conversation::{AppendOutcome, AppendRequest};
use ferry_shards::ids::ConversationId;
use ferry_shards::record::{
    push_rfc3339_millis, Message, MAX_IDEMPOTENCY_KEY_BYTES, MAX_KIND_BYTES,
};

use super::error::ApiError;
use super::{conversation_id, object_or_invalid, parse_json, AppState, Caller, PathParam};
use crate::access;
use ferry_shards::ids::ParticipantId;

/// The body of an append, over HTTP and in a WebSocket `send`.
pub use ferry_codec::send::AppendBody;

/// Validates an append the same way for every transport. `storable_checked`: `content` and
/// `metadata` were already found storable (a `send` read in one pass,
/// [`ferry_codec::send::parse_send`]), so the check is not run again.
pub fn build_request(
    body: AppendBody,
    header_key: Option<&str>,
    sender: ParticipantId,
    max_message_bytes: usize,
    storable_checked: bool,
) -> Result<AppendRequest, ApiError> {
    let content = body
        .content
        .ok_or_else(|| ApiError::invalid("content is required"))?;
    let kind = body.kind.unwrap_or_else(|| "text".to_owned());
    if kind.is_empty() || kind.len() > MAX_KIND_BYTES {
        return Err(ApiError::invalid(format!(
            "kind must be 1 to {MAX_KIND_BYTES} bytes"
        )));
    }
    let metadata = object_or_invalid(body.metadata)?
        .unwrap_or_else(|| RawValue::from_string("{}".to_owned()).expect("static json"));
    let key = body
        .idempotency_key
        .or_else(|| header_key.map(str::to_owned));
    if let Some(k) = &key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(ApiError::invalid(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )));
        }
    }
    if kind.contains('\0') || key.as_deref().is_some_and(|k| k.contains('\0')) {
        return Err(ApiError::invalid(
            "kind and idempotency_key may not contain U+0000",
        ));
    }
    if !storable_checked {
        for (field, value) in [("content", &content), ("metadata", &metadata)] {
            crate::store::check_storable_json(value.get())
                .map_err(|e| ApiError::invalid(format!("{field}: {e}")))?;
        }
    }
    let encoded = content.get().len() + metadata.get().len() + kind.len() + sender.as_str().len();
    if encoded > max_message_bytes {
        return Err(ApiError::too_large(format!(
            "message is {encoded} bytes, the limit is {max_message_bytes}"
        )));
    }
    Ok(AppendRequest {
        sender,
        kind: kind.into(),
        content,
        metadata,
        idempotency_key: key.map(Into::into),
    })
}

pub async fn append(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
    IdempotencyHeader(header_key): IdempotencyHeader,
    AppendJson {
        body,
        storable_checked,
    }: AppendJson,
) -> Result<Response, ApiError> {
    principal.may_write()?;
    state.rate.check_append(&principal.subject())?;
    let id = conversation_id(&raw_id)?;
    let header_key = header_key
        .as_ref()
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII"))
        })
        .transpose()?;
    let sender = access::sender(&principal, body.sender.as_deref())?;
    let request = build_request(
        body,
        header_key,
        sender,
        state.config.limits.max_message_bytes,
        storable_checked,
    )?;
    let outcome = crate::service::append(&state, &principal, &id, request).await?;
    Ok((
        StatusCode::CREATED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        appended_json(Some(&id), &outcome),
    )
        .into_response())
}

/// The `Idempotency-Key` header, if the request has one (checked by the handler, after the
/// credentials and the path). Only this header is taken from the request, not a copy of all.
pub struct IdempotencyHeader(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IdempotencyHeader(
            parts.headers.get(super::IDEMPOTENCY_KEY).cloned(),
        ))
    }
}

/// An append's body: read in one pass when it can be ([`ferry_codec::send::parse_send`], which
/// also finds `content` and `metadata` storable), otherwise by serde, which gives the error a
/// client sees. Both read the same fields from the same text (the codec's property tests).
pub struct AppendJson {
    pub body: AppendBody,
    /// `content` and `metadata` were found storable on the way.
    pub storable_checked: bool,
}

impl FromRequest<AppState> for AppendJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = super::body_bytes(req, state).await?;
        let one_pass = std::str::from_utf8(&bytes)
            .ok()
            .and_then(ferry_codec::send::parse_send)
            .and_then(|fields| fields.to_body());
        Ok(match one_pass {
            Some(body) => AppendJson {
                body,
                storable_checked: true,
            },
            None => AppendJson {
                body: parse_json(&bytes)?,
                storable_checked: false,
            },
        })
    }
}

/// The answer to an append, `{"conversation_id"?, "seq", "id", "created_at", "deduped"}`: over
/// HTTP with the conversation, in a WebSocket `send`'s reply without it. Written straight into
/// one string: an id never needs escaping (ids are `[A-Za-z0-9_.:@-]`), nor do the rest.
pub fn appended_json(conversation: Option<&ConversationId>, outcome: &AppendOutcome) -> String {
    let mut out = String::with_capacity(160);
    match conversation {
        Some(id) => {
            out.push_str("{\"conversation_id\":\"");
            out.push_str(id.as_str());
            out.push_str("\",\"seq\":");
        }
        None => out.push_str("{\"seq\":"),
    }
    out.push_str(itoa::Buffer::new().format(outcome.seq));
    out.push_str(",\"id\":\"");
    out.push_str(
        outcome
            .id
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    out.push_str("\",\"created_at\":\"");
    push_rfc3339_millis(&mut out, outcome.created_at_ms);
    out.push_str(if outcome.deduped {
        "\",\"deduped\":true}"
    } else {
        "\",\"deduped\":false}"
    });
    out
}

/// Keeps the messages that fit in `max_bytes` of rendered JSON (always at least one): the
/// first ones of a forward page, the last ones of a backward page (`newest`). True if any were
/// left out.
fn keep_within_bytes(messages: &mut Vec<Arc<Message>>, max_bytes: usize, newest: bool) -> bool {
    // How many fit, counted from the end the page keeps.
    let mut total = 0usize;
    let mut keep = 0usize;
    let mut count = |m: &Arc<Message>| {
        total += m.json_len() + 1;
        if keep == 0 || total <= max_bytes {
            keep += 1;
            true
        } else {
            false
        }
    };
    if newest {
        for m in messages.iter().rev() {
            if !count(m) {
                break;
            }
        }
    } else {
        for m in messages.iter() {
            if !count(m) {
                break;
            }
        }
    }
    let cut = messages.len() - keep;
    if cut == 0 {
        return false;
    }
    if newest {
        messages.drain(..cut);
    } else {
        messages.truncate(keep);
    }
    true
}

#[derive(Deserialize)]
pub struct PageQuery {
    after_seq: Option<String>,
    before_seq: Option<String>,
    limit: Option<String>,
}

fn parse_u64(name: &str, raw: Option<&str>) -> Result<Option<u64>, ApiError> {
    raw.map(|v| {
        v.parse::<u64>()
            .map_err(|_| ApiError::invalid(format!("{name} must be a non-negative integer")))
    })
    .transpose()
}

pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    PathParam(raw_id): PathParam,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = conversation_id(&raw_id)?;
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("invalid query: {e}")))?;
    let after = parse_u64("after_seq", q.after_seq.as_deref())?.map(crate::service::clamp_seq);
    let before = parse_u64("before_seq", q.before_seq.as_deref())?.map(crate::service::clamp_seq);
    let max = state.config.limits.max_page_size;
    let limit = parse_u64("limit", q.limit.as_deref())?.unwrap_or(100.min(max as u64));
    if limit == 0 || limit > max as u64 {
        return Err(ApiError::invalid(format!("limit must be 1 to {max}")));
    }
    if after.is_some() && before.is_some() {
        return Err(ApiError::invalid("give after_seq or before_seq, not both"));
    }
    let limit = limit as usize;
    // Retention deleted everything below this (the hot ring may still hold some of it; it is
    // not served either, so every tier answers alike).
    let first_available = state.store.first_available_seq(&id).await?;
    if before.is_none() && after.unwrap_or(0).saturating_add(1) < first_available {
        // Authorize first: a stranger learns nothing about retention.
        crate::service::conversation(&state, &principal, &id).await?;
        return Err(ApiError::gap(after.unwrap_or(0), first_available));
    }
    let (mut messages, last_seq) =
        crate::service::read(&state, &principal, &id, after, before, limit).await?;
    // Bounded in bytes too: a page cut short by its size ends where a full one would.
    let cut = keep_within_bytes(
        &mut messages,
        state.config.limits.max_page_bytes,
        before.is_some(),
    );
    let full = messages.len() >= limit || cut;
    // The seqs this page speaks for: a full page up to its last message (the next page goes on
    // from there), a partial one to the end of what exists in that direction.
    let (has_more, span) = match before {
        Some(before) => {
            messages.retain(|m| m.seq >= first_available);
            let low = match messages.first() {
                Some(m) if full => m.seq,
                _ => first_available.max(1),
            };
            let has_more = messages.first().is_some_and(|m| m.seq > first_available);
            (
                has_more,
                (
                    low,
                    before.min(last_seq.saturating_add(1)).saturating_sub(1),
                ),
            )
        }
        None => {
            let from = after.unwrap_or(0).saturating_add(1);
            let to = match messages.last() {
                Some(m) if full => m.seq,
                _ => last_seq,
            };
            (to < last_seq, (from, to))
        }
    };
    // Seqs a failover reserved that hold nothing are named, so a reader knows they were
    // skipped on purpose; any other hole would be a bug, and is not papered over.
    let mut gaps = Vec::new();
    if span.0 <= span.1 {
        let holes = crate::service::holes(&messages, span.0, span.1);
        if !holes.is_empty() {
            let reserved = crate::service::reserved_ranges(&state, &id).await?;
            gaps = holes
                .into_iter()
                .filter(|&(from, to)| crate::service::all_reserved(&reserved, from, to))
                .map(|(from_seq, to_seq)| Gap { from_seq, to_seq })
                .collect();
        }
    }
    let page = Page {
        messages: messages.iter().map(|m| &**m).collect(),
        last_seq,
        has_more,
        first_available_seq: first_available,
        gaps,
    };
    Ok(Json(page).into_response())
}

/// A page of messages, serialized straight from the messages (no `serde_json::Value` in
/// between, which would parse every `content` and `metadata` back into a tree first).
#[derive(Serialize)]
struct Page<'a> {
    messages: Vec<&'a Message>,
    last_seq: u64,
    has_more: bool,
    first_available_seq: u64,
    /// Reserved seqs within the page's span that hold nothing; only present when there are.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    gaps: Vec<Gap>,
}

#[derive(Serialize)]
struct Gap {
    from_seq: u64,
    to_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// Over HTTP with the conversation, in a WebSocket `send`'s reply without it.
    #[test]
    fn an_appends_answer_is_the_documented_json() {
        let id = ConversationId::parse("support-42.x:y@z_").unwrap();
        for deduped in [false, true] {
            let outcome = AppendOutcome {
                seq: u64::MAX,
                id: uuid::Uuid::now_v7(),
                created_at_ms: 1_700_000_000_123,
                deduped,
            };
            let mut expected = json!({
                "seq": u64::MAX,
                "id": outcome.id.to_string(),
                "created_at": "2023-11-14T22:13:20.123Z",
                "deduped": deduped,
            });
            let reply: Value = serde_json::from_str(&appended_json(None, &outcome)).unwrap();
            assert_eq!(reply, expected);
            expected["conversation_id"] = json!("support-42.x:y@z_");
            let answer: Value = serde_json::from_str(&appended_json(Some(&id), &outcome)).unwrap();
            assert_eq!(answer, expected);
        }
    }
}
