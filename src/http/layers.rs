//! Middleware of the public API: CORS for browser pages on the origins `http.cors_origins` lists
//! (none by default), and `limits.request_timeout` for requests that are not streams.
//!
//! A request the timeout cuts off is answered like any other overload, `try_again` (503) with
//! `retry_after_ms` and `Retry-After`: its work may still finish (an append may still be
//! stored), which is why appends carry idempotency keys. SSE streams and WebSocket upgrades are
//! not wrapped; they are long-lived by design and have `write_timeout` instead.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::ApiError;
use crate::config::format_duration;

/// How long a browser may reuse a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `origins`, or `None` when no origin is allowed (no CORS headers at all).
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins
        .iter()
        // Browsers send the scheme and host in lower case.
        .filter_map(|o| HeaderValue::from_str(&o.to_ascii_lowercase()).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT])
            .allow_headers([
                AUTHORIZATION,
                CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
            ])
            // So a page can honour `try_again` the way the protocol asks.
            .expose_headers([RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// Answers `try_again` when the handler has not answered within `limit`.
pub async fn request_timeout(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    // Kept for the log line only: cloning the method and URI shares their bytes, no copy.
    let (method, uri) = (request.method().clone(), request.uri().clone());
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let path = uri.path();
            tracing::warn!(%method, path, timeout = %format_duration(limit), "request timed out");
            let mut e = ApiError::unavailable(format!(
                "the request was not answered within {}; retry (appends with the same \
                 idempotency key)",
                format_duration(limit)
            ));
            e.reason = Some("timeout");
            e.into_response()
        }
    }
}
