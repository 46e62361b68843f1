//! Middleware of the public API: CORS for browser pages on the origins `http.cors_origins` lists
//! (none by default), and `limits.request_timeout` for requests that are not streams.
//!
//! A request the timeout cuts off is answered like any other overload, `try_again` (503) with
//! `retry_after_ms` and `Retry-After`: its work may still finish (an append may still be
//! stored), which is why appends carry idempotency keys. SSE streams and WebSocket upgrades are
//! not wrapped; they are long-lived by design and have `write_timeout` instead.
//!
//! Every route also answers `Connection: close` when it answers before reading the request's
//! whole body (a body over the size limit, a request refused for its credentials or a rate):
//! the server cannot read the next request on that connection, and without the header a client
//! would send its next request into a connection about to close.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
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

/// Marks the response `Connection: close` when the handler answered without reading the
/// request's body to its end (see the module comment).
pub async fn close_if_body_unread(request: Request, next: Next) -> Response {
    use http_body::Body as _;
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(Tracked {
            inner,
            ended: Arc::clone(&ended),
        })
    });
    let mut response = next.run(request).await;
    if !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that records when it has been read to its end.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
