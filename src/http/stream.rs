//! `GET /v1/conversations/{id}/stream`: Server-Sent Events, one `message` event per message with
//! the seq as the event id, replay then live. Resumes from `Last-Event-ID` (what browsers send
//! on reconnect) or the `after_seq` query parameter. A position older than retention first gets
//! one `gap` event `{from_seq, to_seq}` (its id is `to_seq`, so a reconnect resumes after it),
//! then the stream continues at `first_available_seq`.
//!
//! Credentials come from `Authorization`, or from the `token` query parameter, because a
//! browser's `EventSource` cannot send headers. A stream opened with an end user's token ends
//! when the token expires, with one `error` event `{error: "unauthorized", ...}` first: the
//! client reconnects with a fresh token (and `Last-Event-ID`, so nothing is missed).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;

use super::error::ApiError;
use super::transport::ClientIp;
use super::{conversation_id, AppState, PathParam};
use crate::delivery::Cursor;

#[derive(Deserialize)]
pub struct StreamQuery {
    after_seq: Option<String>,
    /// Credentials for clients that cannot set `Authorization` (`EventSource`).
    token: Option<String>,
}

/// Messages per replay page.
const PAGE: usize = 500;

pub async fn sse(
    State(state): State<AppState>,
    headers: HeaderMap,
    ClientIp(ip): ClientIp,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    path: Result<PathParam, ApiError>,
) -> Result<Response, ApiError> {
    let query_token = query
        .as_ref()
        .ok()
        .and_then(|Query(q)| q.token.as_deref())
        .filter(|_| !headers.contains_key(axum::http::header::AUTHORIZATION));
    // Credentials first, as everywhere: a bad request without them is a 401.
    let principal = match query_token {
        Some(token) => state.auth.authenticate_from(token, ip.as_deref()).await?,
        None => state.auth.authenticate(&headers, ip.as_deref()).await?,
    };
    let PathParam(raw_id) = path?;
    let id = conversation_id(&raw_id)?;
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("invalid query: {e}")))?;
    let parse = |name: &str, v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| ApiError::invalid(format!("{name} must be a non-negative integer")))
    };
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID must be a seq"))
                .and_then(|v| parse("Last-Event-ID", v))
        })
        .transpose()?;
    let after_seq = crate::service::clamp_seq(match (last_event_id, q.after_seq.as_deref()) {
        (Some(seq), _) => seq,
        (None, Some(v)) => parse("after_seq", v)?,
        (None, None) => 0,
    });
    if let Some(ip) = ip.as_deref() {
        state.rate.check_connect(ip)?;
    }
    let place = state.sockets.open(&principal.subject())?;
    let conversation = crate::service::follow(&state, &principal, &id).await?;
    let first_available = state.store.first_available_seq(&id).await?;
    let gap = (after_seq.saturating_add(1) < first_available).then(|| {
        let to_seq = first_available.saturating_sub(1);
        let data = serde_json::json!({"from_seq": after_seq + 1, "to_seq": to_seq});
        Ok(Event::default()
            .id(to_seq.to_string())
            .event("gap")
            .data(data.to_string()))
    });
    let cursor = Cursor::new(
        state.clone(),
        id,
        conversation.local,
        after_seq.max(first_available.saturating_sub(1)),
        PAGE,
    );
    let mut shutdown = state.shutdown.clone();
    let auth = state.auth.clone();
    // A stream opened with an API key ends when the key is revoked.
    let key = principal.key_id().map(str::to_owned);
    let expires_at = principal.expires_at();
    let expired = async move {
        match expires_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let stream = stream::iter(gap)
        .chain(events(cursor))
        .take_until(expired)
        .chain(
            stream::once(async move { expiry_notice(expires_at) })
                .filter_map(|event| async move { event }),
        )
        .take_until(async move {
            // The stream's place among its principal's sockets lasts as long as the stream.
            let _place = place;
            let revoked = async {
                auth.key_ended(key.as_deref()).await;
                crate::metrics::count_revoked_close("sse");
            };
            tokio::select! {
                _ = shutdown.wait_for(|stopping| *stopping) => {}
                _ = revoked => {}
            }
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The last event of a stream that ended because its token expired (nothing when it ended
/// for another reason).
fn expiry_notice(expires_at: Option<tokio::time::Instant>) -> Option<Result<Event, Infallible>> {
    if expires_at? > tokio::time::Instant::now() {
        return None;
    }
    crate::metrics::count_token_expired_close("sse");
    let body = ApiError::unauthorized("token expired").body();
    Some(Ok(Event::default().event("error").data(body.to_string())))
}

fn events(cursor: Cursor) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some(cursor), |cursor| async move {
        let mut cursor = cursor?;
        match cursor.next_batch().await {
            Ok(batch) => {
                let gap = batch.gap.map(|(from_seq, to_seq)| {
                    let data = serde_json::json!({"from_seq": from_seq, "to_seq": to_seq});
                    Ok(Event::default()
                        .id(to_seq.to_string())
                        .event("gap")
                        .data(data.to_string()))
                });
                let events: Vec<Result<Event, Infallible>> = gap
                    .into_iter()
                    .chain(batch.messages.iter().map(|m| {
                        let data = m.to_json();
                        Ok(Event::default()
                            .id(m.seq.to_string())
                            .event("message")
                            .data(data))
                    }))
                    .collect();
                Some((stream::iter(events), Some(cursor)))
            }
            Err(e) => {
                let data = e.body().to_string();
                let events = vec![Ok(Event::default().event("error").data(data))];
                Some((stream::iter(events), None))
            }
        }
    })
    .flatten()
}
