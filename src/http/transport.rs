//! The accept loop of both listeners: hyper connections with the limits of `[limits]` that a
//! plain `axum::serve` does not apply (PROTOCOL.md "Limits"):
//!
//! - `max_connections` per listener: past it, a new connection is closed as soon as it is
//!   accepted (counted in `ferry_connections_refused_total`) while the open ones are served, so
//!   a flood of connections cannot exhaust the process's file descriptors;
//! - `header_timeout`: a request whose headers have not all arrived this long after its first
//!   byte is closed (slow-header clients hold nothing for long);
//! - `http_idle_timeout`: a connection with no request open that carries no byte either way for
//!   this long is closed;
//! - `write_timeout`: a connection whose peer accepts no byte of what it is sent for this long
//!   (a client that stopped reading its WebSocket or SSE stream) is closed; its client resumes
//!   from its cursor. A slow reader that takes some bytes is never dropped.
//!
//! Both timeouts live in [`Guarded`], a wrapper of the connection's socket that shares a little
//! state ([`ConnState`]) with the service: the service marks a request open when hyper hands it
//! the parsed head and closed when its response body ends, and a connection upgraded to a
//! WebSocket leaves both timeouts to the WebSocket session (which has its own heartbeat timeout).
//! Accept errors (EMFILE under a flood) back off instead of spinning.
//!
//! An HTTP/1 answer given before the request's body was read to its end (a body over the size
//! limit, a request refused for its credentials, a timeout) says `Connection: close`: hyper
//! cannot read the next request on that connection and closes it, and without the header a
//! client would send its next request into a connection about to close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderValue;
use axum::Router;
use futures_util::FutureExt;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::metrics as m;

/// The connection limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl ConnLimits {
    pub fn from_config(limits: &crate::config::LimitsSection) -> ConnLimits {
        ConnLimits {
            header_timeout: limits.header_timeout,
            idle_timeout: limits.http_idle_timeout,
            write_timeout: limits.write_timeout,
            max_connections: limits.max_connections,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true, then waits for the open requests to
/// finish (the caller bounds that wait). `name` labels the metrics (`public`, `admin`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    name: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    // No timer: hyper's own header-read timeout would also run on idle keep-alive connections;
    // the clocks are [`Guarded`]'s.
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refused = metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL, "listener" => name);
    let gauge = metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => name);
    let mut accept_backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    accept_backoff = Duration::from_millis(5);
                    (stream, peer)
                }
                Err(e) => {
                    // Out of descriptors (or memory): accepting again at once would spin.
                    tracing::warn!(listener = name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
            },
            _ = crate::cluster::stopped(&mut stop) => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused.increment(1);
            drop(stream);
            continue;
        };
        // Nagle off: every push, reply and response is written whole and flushed at once; with
        // Nagle on, a small segment behind an unacknowledged one waits for the peer's delayed
        // ACK (up to 40 ms on Linux), which a subscriber would see on every other push.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        let state = Arc::new(ConnState::default());
        let ip: Arc<str> = peer.ip().to_string().into();
        // The permit and the gauge go with the socket: an upgraded connection (a WebSocket)
        // leaves hyper's connection future but keeps its socket, and still counts.
        gauge.increment(1.0);
        let held = Held {
            _permit: permit,
            gauge: gauge.clone(),
        };
        let io = TokioIo::new(Guarded::new(stream, state.clone(), limits, held));
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let state = state.clone();
            let app = app.clone();
            let ip = ip.clone();
            async move {
                state.request_started();
                let tracked =
                    request.version() < hyper::Version::HTTP_2 && !request.body().is_end_stream();
                let mut request = if tracked {
                    state.body_unread.store(true, Ordering::Release);
                    let state = state.clone();
                    request.map(|body| Body::new(ReadToEnd { body, state }))
                } else {
                    request.map(Body::new)
                };
                request
                    .extensions_mut()
                    .insert(ClientAddr(peer, ip.clone()));
                let mut response = app
                    .oneshot(request)
                    .await
                    .unwrap_or_else(|never| match never {});
                if tracked && state.body_unread.load(Ordering::Acquire) {
                    response
                        .headers_mut()
                        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                }
                if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                    state.upgraded.store(true, Ordering::Release);
                }
                let (parts, body) = response.into_parts();
                let guard = OpenRequest(state);
                Ok::<_, std::convert::Infallible>(hyper::Response::from_parts(
                    parts,
                    Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    }),
                ))
            }
        });
        let connection = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        // Spawned as it is (not awaited inside an `async` block, which would reserve room for
        // the connection twice in every connection's task).
        let connection = graceful.watch(connection).map(|ended| {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        tokio::spawn(connection);
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The address a request's connection comes from, and its IP as text (rate limits per client IP
/// key on it), made once per connection rather than once per request.
#[derive(Debug, Clone)]
pub struct ClientAddr(pub std::net::SocketAddr, pub Arc<str>);

/// The client IP of a request, when it came through [`serve`].
pub fn client_ip(extensions: &axum::http::Extensions) -> Option<Arc<str>> {
    extensions.get::<ClientAddr>().map(|a| a.1.clone())
}

/// Extractor: the client IP of the request, if known.
pub struct ClientIp(pub Option<Arc<str>>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(&parts.extensions)))
    }
}

/// What the service tells the socket wrapper about its connection.
#[derive(Default)]
struct ConnState {
    /// Requests whose head hyper has parsed and whose response body has not ended.
    open: AtomicUsize,
    /// When the bytes of a request that has not reached the service began to arrive.
    head_since: Mutex<Option<Instant>>,
    /// Switched protocols (a WebSocket): the timeouts are the session's business now.
    upgraded: AtomicBool,
    /// The HTTP/1 request being served has a body not yet read to its end.
    body_unread: AtomicBool,
}

impl ConnState {
    fn request_started(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
        *self.head_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Marks a request closed when its response body is dropped (ended or abandoned).
struct OpenRequest(Arc<ConnState>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/1 request body that tells its connection when it has been read to its end.
struct ReadToEnd {
    body: Incoming,
    state: Arc<ConnState>,
}

impl http_body::Body for ReadToEnd {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.state.body_unread.store(false, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that holds its request open until it is dropped.
struct GuardedBody {
    body: Body,
    _guard: OpenRequest,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What an open connection holds of its listener: a place under `max_connections`, and its
/// count in `ferry_connections_open`; both given back when the socket is dropped.
struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// The socket, closed (a read error) once the header or the idle timeout runs out.
struct Guarded {
    stream: TcpStream,
    state: Arc<ConnState>,
    limits: ConnLimits,
    last_activity: Instant,
    /// The idle or header deadline, made the first time a read waits; dropped once the
    /// connection is upgraded. A timer holds the waker of the task that last polled it: kept past
    /// the upgrade, it would keep hyper's finished connection task (about 4 KB) allocated for
    /// every WebSocket until it fired.
    timer: Option<Pin<Box<Sleep>>>,
    /// Since when a write has been waiting for the peer to take bytes.
    write_blocked_since: Option<Instant>,
    /// Armed while a write is stalled; dropped when bytes move again.
    write_timer: Option<Pin<Box<Sleep>>>,
    _held: Held,
}

impl Guarded {
    fn new(stream: TcpStream, state: Arc<ConnState>, limits: ConnLimits, held: Held) -> Guarded {
        Guarded {
            stream,
            state,
            limits,
            last_activity: Instant::now(),
            timer: None,
            write_blocked_since: None,
            write_timer: None,
            _held: held,
        }
    }

    /// After a write attempt: bytes taken end a stall; `Pending` starts one (or continues it)
    /// and turns into an error once the peer has taken nothing for `write_timeout`.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.write_blocked_since = None;
                    self.write_timer = None;
                    self.activity(false);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                let since = *self.write_blocked_since.get_or_insert_with(Instant::now);
                let deadline = since + self.limits.write_timeout;
                if armed(&mut self.write_timer, deadline).poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer accepted no byte for limits.write_timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }

    /// When this connection is due to be closed if nothing happens: the idle deadline with no
    /// request open, and the header deadline while a request's head is arriving. `None` while a
    /// request is open or after an upgrade.
    fn deadline(&self) -> Option<Instant> {
        if self.state.upgraded.load(Ordering::Acquire) {
            return None;
        }
        let head_since = *self
            .state
            .head_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(since) = head_since {
            return Some(since + self.limits.header_timeout);
        }
        if self.state.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.last_activity + self.limits.idle_timeout)
    }

    /// Bytes moved: the idle clock restarts; bytes read with no request open begin a request's
    /// head, whose clock starts now.
    fn activity(&mut self, read: bool) {
        self.last_activity = Instant::now();
        if read && self.state.open.load(Ordering::Acquire) == 0 {
            let mut since = self
                .state
                .head_since
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if since.is_none() {
                *since = Some(self.last_activity);
            }
        }
    }

    /// `Err` once the deadline has passed; otherwise the timer is armed for it.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(deadline) = self.deadline() else {
            if self.state.upgraded.load(Ordering::Acquire) {
                self.timer = None;
            }
            return Ok(());
        };
        if armed(&mut self.timer, deadline).poll(cx).is_ready() {
            let what = if self
                .state
                .head_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                "request headers not received within limits.header_timeout"
            } else {
                "connection idle for limits.http_idle_timeout"
            };
            return Err(io::Error::new(io::ErrorKind::TimedOut, what));
        }
        Ok(())
    }
}

/// The timer in `slot`, made if there is none, set to `deadline`.
fn armed(slot: &mut Option<Pin<Box<Sleep>>>, deadline: Instant) -> Pin<&mut Sleep> {
    let timer = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() != deadline {
        timer.as_mut().reset(deadline);
    }
    timer.as_mut()
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity(true);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.check_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write(cx, data);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
