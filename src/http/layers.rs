//! Middleware of the public API: CORS for browser pages on the origins `http.cors_origins` lists
//! (none by default), and `limits.request_timeout` for requests that are not streams.
//!
//! A request the timeout cuts off is answered like any other overload, `try_again` (503) with
//! `retry_after_ms` and `Retry-After`: its work may still finish (an append may still be
//! stored), which is why appends carry idempotency keys. SSE streams and WebSocket upgrades are
//! not wrapped; they are long-lived by design and have `write_timeout` instead.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderName, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};
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
                super::IDEMPOTENCY_KEY,
                HeaderName::from_static("last-event-id"),
            ])
            // So a page can honour `try_again` the way the protocol asks.
            .expose_headers([RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// Answers `try_again` when the handler has not answered within `limit`: a tower layer over
/// each route, whose future wraps the route's own (no boxed future, no copy of the route per
/// request).
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer {
    pub limit: Duration,
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout {
            inner,
            limit: self.limit,
        }
    }
}

/// See [`RequestTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Service<Request> for RequestTimeout<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Kept for the log line only: cloning the method and URI shares their bytes, no copy.
        let (method, uri) = (request.method().clone(), request.uri().clone());
        TimeoutFuture {
            inner: tokio::time::timeout(self.limit, self.inner.call(request)),
            method,
            uri,
            limit: self.limit,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`RequestTimeout`].
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        method: Method,
        uri: Uri,
        limit: Duration,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for TimeoutFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match ready!(this.inner.poll(cx)) {
            Ok(answered) => Poll::Ready(answered),
            Err(_) => {
                let (method, path, limit) = (&*this.method, this.uri.path(), *this.limit);
                tracing::warn!(%method, path, timeout = %format_duration(limit), "request timed out");
                let mut e = ApiError::unavailable(format!(
                    "the request was not answered within {}; retry (appends with the same \
                     idempotency key)",
                    format_duration(limit)
                ));
                e.reason = Some("timeout");
                Poll::Ready(Ok(e.into_response()))
            }
        }
    }
}
