//! The WebSocket gateway: Phoenix Channels V2 JSON at `GET /socket/websocket?vsn=2.0.0&token=…`
//! (PROTOCOL.md, "WebSocket"), so the official `phoenix` clients connect unchanged.
//!
//! - [`routes`] (this file): the upgrade. It checks `vsn`, authenticates *before* upgrading
//!   (missing or invalid credentials are an HTTP 401 with the usual JSON error body; the phoenix
//!   client treats that like any failed connect and retries with backoff), answers the `phoenix`
//!   subprotocol, and bounds frame sizes at `limits.max_frame_bytes`.
//! - [`session`]: one connection: reader, writer, the single bounded outgoing queue, heartbeats,
//!   idle timeout, framing errors, closing with 1001 when the server shuts down. Generic over
//!   `Sink`/`Stream`, tested without a socket.
//! - [`channels`]: the topics (`conversation:{id}`, `inbox:{participant}`) and their tasks.
//! - [`frame`]: `[join_ref, ref, topic, event, payload]` decoding and encoding.
//! - [`metrics`]: metric names of this gateway.
//!
//! Invariants: every frame to a client goes through its one bounded outbox, in queue order; a
//! join's reply is queued before any of its pushes; a slow client is never disconnected for
//! being slow and never costs more than a bounded amount of memory (outbox + one page per
//! cursor); nothing here touches the log except through `Node::append` and `delivery::Cursor`.

pub mod channels;
mod echo;
pub mod frame;
mod idle;
pub mod metrics;
pub mod session;

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use tracing::Instrument;

use crate::auth::Principal;
use crate::http::error::ApiError;
use crate::http::transport::ClientIp;
use crate::http::AppState;
use channels::SocketChannels;
use session::SessionConfig;

/// Where the phoenix clients connect (`new Socket(".../socket")` appends `/websocket`).
pub const PATH: &str = "/socket/websocket";
/// The only serializer version spoken.
pub const VSN: &str = "2.0.0";
/// The subprotocol answered when offered (the phoenix client's `authToken` option offers it).
pub const SUBPROTOCOL: &str = "phoenix";
/// How the phoenix client passes a token as a subprotocol: this prefix + base64(token).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "base64url.bearer.phx.";
/// A socket that sends nothing for this long is closed (phoenix clients heartbeat every 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Frames queued for a socket before its senders wait.
pub const OUTBOX_FRAMES: usize = 128;
/// How long a closing socket may take to flush and send its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Socket read buffer and read chunk; small so many idle sockets stay cheap (it grows for large
/// frames). 8 KiB → 2 KiB took 10,000 idle joined sockets from 22.5 to 16.4 KB each.
const READ_BUFFER_BYTES: usize = 2 * 1024;
/// Bytes the socket collects before it writes (the writer flushes after each batch anyway).
const WRITE_BUFFER_BYTES: usize = 32 * 1024;

/// The router with the WebSocket endpoint, to be merged into the public router.
pub fn routes() -> Router<AppState> {
    Router::new().route(PATH, get(upgrade))
}

async fn upgrade(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match accept(state, ip, query, ws).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn accept(
    state: AppState,
    ip: Option<std::sync::Arc<str>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| {
        metrics::rejected("query");
        ApiError::invalid(format!("invalid query: {e}"))
    })?;
    // Absent means the current version (for hand-written clients); anything else is refused.
    if let Some(vsn) = params.get("vsn").filter(|v| v.as_str() != VSN) {
        metrics::rejected("vsn");
        return Err(ApiError::invalid(format!(
            "unsupported vsn {vsn:?}; this server speaks {VSN}"
        )));
    }
    let ws = ws.map_err(|e| {
        metrics::rejected("not_websocket");
        ApiError::invalid(format!("expected a WebSocket upgrade: {e}"))
    })?;
    if let Some(ip) = ip.as_deref() {
        state.rate.check_connect(ip).inspect_err(|_| {
            metrics::rejected("rate_limited");
        })?;
    }
    let token = token(&params, ws.requested_protocols()).unwrap_or_default();
    let principal = state
        .auth
        .authenticate_from(&token, ip.as_deref())
        .await
        .inspect_err(|_| {
            metrics::rejected("unauthorized");
        })?;
    let place = state
        .sockets
        .open(&principal.subject())
        .inspect_err(|_| metrics::rejected("too_many_sockets"))?;
    let max_frame = state.config.limits.max_frame_bytes;
    Ok(ws
        .protocols([SUBPROTOCOL])
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| serve(state, principal, socket, place)))
}

/// The credential: query `token`, else the phoenix client's token subprotocol.
fn token<'a>(
    params: &HashMap<String, String>,
    protocols: impl Iterator<Item = &'a HeaderValue>,
) -> Option<String> {
    if let Some(t) = params.get("token").filter(|t| !t.is_empty()) {
        return Some(t.clone());
    }
    protocols
        .filter_map(|p| p.to_str().ok())
        .find_map(|p| p.trim().strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        .and_then(decode_base64)
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// Base64 as the phoenix client writes it (`btoa` without `=`), also accepting the URL-safe
/// alphabet and padding, since the prefix promises base64url.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// A socket's whole life, as the future its task runs: one per open socket, so its size is
/// memory every idle socket holds (1.9 KB in a release build). An async block or `async fn`
/// keeps what it captures or takes for its whole life, beside whatever that value was later
/// moved into. So this is not an `async fn`, the socket is split before the block captures its
/// halves, and the stop future is boxed; kept inline, the socket and three copies of the stop
/// future made the task 5.7 KB.
fn serve(
    state: AppState,
    principal: Principal,
    socket: WebSocket,
    place: crate::rate::SocketPlace,
) -> impl std::future::Future<Output = ()> + Send {
    let socket_id = crate::inbox::next_socket_id();
    let (auth, participant) = match &principal {
        Principal::ApiKey { .. } => ("api_key", None),
        Principal::User { sub, .. } => ("user", Some(sub.to_string())),
    };
    let span = tracing::info_span!("ws", socket = socket_id, auth, participant);
    let (sink, stream) = socket.split();
    async move {
        let _connection = metrics::Counted::open(metrics::CONNECTIONS);
        tracing::info!("websocket connected");
        let config = SessionConfig {
            idle_timeout: IDLE_TIMEOUT,
            outbox_frames: OUTBOX_FRAMES,
            close_grace: CLOSE_GRACE,
            max_frame_bytes: state.config.limits.max_frame_bytes,
            expires_at: principal.expires_at(),
        };
        let mut stopping = state.shutdown.clone();
        let auth = state.auth.clone();
        let key = principal.key_id().map(str::to_owned);
        // Boxed: about 0.6 KB that would otherwise sit in this future, and again in `run`'s.
        let stop = Box::pin(async move {
            let shutdown = async {
                // A dropped sender is not a shutdown signal.
                if stopping.wait_for(|stopping| *stopping).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = shutdown => session::End::Shutdown,
                _ = auth.key_ended(key.as_deref()) => session::End::Revoked,
            }
        });
        let end = session::run(
            sink,
            stream,
            |outbox| SocketChannels::new(state, principal, socket_id, outbox),
            stop,
            config,
        )
        .await;
        match end {
            session::End::Expired => crate::metrics::count_token_expired_close("websocket"),
            session::End::Revoked => crate::metrics::count_revoked_close("websocket"),
            _ => {}
        }
        tracing::info!(end = ?end, "websocket closed");
        // The socket's place under `max_sockets_per_principal` is given back now.
        drop(place);
    }
    .instrument(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future a function returns, without calling it.
    fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_socket_task_keeps_no_room_for_rare_work() {
        // Every open socket holds this future for its whole life. Answering a frame and closing
        // are boxed: inline they made it 2,288 bytes, against 1,232.
        let size = future_size(serve);
        println!("socket future: {size} bytes");
        assert!(size <= 1536, "the socket future grew to {size} bytes");
    }

    fn b64(bytes: &[u8]) -> String {
        // Reference encoder (standard alphabet, no padding), as `btoa(..).replace(/=/g, "")`.
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.len();
            let v = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..=n {
                out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn base64_round_trips_every_length_and_both_alphabets() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 251) as u8).collect();
            let enc = b64(&data);
            assert_eq!(decode_base64(&enc).as_deref(), Some(&data[..]), "{enc}");
            let url = enc.replace('+', "-").replace('/', "_");
            assert_eq!(decode_base64(&url).as_deref(), Some(&data[..]));
            let padded = format!("{enc}{}", "=".repeat((4 - enc.len() % 4) % 4));
            assert_eq!(decode_base64(&padded).as_deref(), Some(&data[..]));
        }
        assert_eq!(decode_base64("a"), None);
        assert_eq!(decode_base64("ab$d"), None);
    }

    #[test]
    fn token_comes_from_the_query_or_the_subprotocol() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig-_x";
        let proto = HeaderValue::from_str(&format!(
            "{TOKEN_SUBPROTOCOL_PREFIX}{}",
            b64(jwt.as_bytes())
        ))
        .unwrap();
        let phoenix = HeaderValue::from_static("phoenix");
        let none = HashMap::new();
        assert_eq!(
            token(&none, [&phoenix, &proto].into_iter()).as_deref(),
            Some(jwt)
        );
        let query = HashMap::from([("token".to_owned(), "fk_1".to_owned())]);
        assert_eq!(
            token(&query, [&phoenix, &proto].into_iter()).as_deref(),
            Some("fk_1")
        );
        assert_eq!(token(&none, [&phoenix].into_iter()), None);
    }
}
