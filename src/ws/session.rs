//! One WebSocket connection: a reader (this task) and a writer (a spawned task), joined by one
//! bounded outgoing queue, the [`Outbox`].
//!
//! The reader decodes frames, answers heartbeats and framing errors itself, and hands every
//! channel frame to a [`Channels`] implementation (the topics of this socket). Everything the
//! server says to the client — replies, pushes from per-topic tasks, the final close frame —
//! goes through the outbox, so frames leave in the order they were queued and a client that
//! does not read makes the senders wait (memory stays bounded) instead of growing a buffer.
//! A conversation's message pushes are the exception that keeps the same order: the outbox
//! hands the writer a [`Delivery`] stream (after the join reply), and the writer pulls pushes
//! from it itself whenever the socket can take more.
//!
//! The loop is generic over `Sink`/`Stream` of [`Message`] so it runs without a socket in tests.
//! Ending: when the reader stops (client closed, silence, a fatal frame), the channels are
//! dropped (their tasks stop), a close frame is queued and the writer gets a short grace period
//! to flush; when the writer fails (the peer is gone), the reader stops with it. A socket whose
//! credentials expire (`SessionConfig::expires_at`) first tells its topics (`phx_error` on each,
//! see [`Channels::expire`]), then closes with [`CLOSE_TOKEN_EXPIRED`].

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::stream::SelectAll;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::frame::{self, Address, Decoded, Frame};
use super::idle::IdleClock;
use super::metrics;
use crate::http::error::ApiError;

/// Close codes (RFC 6455 §7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
/// The socket's token expired. Not 1000: some phoenix clients (the JavaScript one before 1.8)
/// do not reconnect after a normal close, and this client should, with a fresh token. 4401 as
/// graphql-ws spells "unauthorized".
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;

/// Most bytes the writer hands to the socket before it flushes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A socket that sends nothing (not even a heartbeat) for this long is closed.
    pub idle_timeout: Duration,
    /// Frames the outbox holds before senders wait.
    pub outbox_frames: usize,
    /// How long the writer may take to flush and send the close frame once the session ends.
    pub close_grace: Duration,
    /// For the close reason of an oversized frame (the socket enforces the limit).
    pub max_frame_bytes: usize,
    /// When the socket's credentials expire (an end user's token); `None` for API keys.
    pub expires_at: Option<tokio::time::Instant>,
}

/// A topic's pushes, pulled by the socket's writer whenever the socket can take more: the
/// writer polls it directly (no task, no queue in between), so a push costs no hop between
/// tasks, and a client that does not read stops the pulling. It ends when the join does (it is
/// made abortable by its owner) or when delivery gives up.
pub type Delivery = Pin<Box<dyn Stream<Item = Vec<String>> + Send>>;

/// What the writer is asked to do.
pub enum Outgoing {
    Text(String),
    /// Start pulling this topic's pushes; frames queued before it go first.
    Deliver(Delivery),
    /// The close frame to end the socket with. Boxed, so the enum stays a `String`'s three
    /// words: every socket's queue allocates 32 slots at once.
    Close(Box<CloseFrame>),
}

/// The sending side of a socket's single outgoing queue; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    /// Replies the socket's requests are still waiting for (see [`Outbox::awaiting_reply`]).
    awaited: Arc<AtomicUsize>,
}

/// Counts one request as waiting for its reply until dropped (see [`Outbox::awaiting_reply`]).
pub struct AwaitedReply(Arc<AtomicUsize>);

impl Drop for AwaitedReply {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Outbox {
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let awaited = Arc::new(AtomicUsize::new(0));
        (Outbox { tx, awaited }, rx)
    }

    /// Marks a request whose reply comes later (a `send` waiting to be durable) until the guard
    /// is dropped, after its reply is queued. While any is pending the writer lets other ready
    /// tasks run once before it writes: the durable advance that makes a conversation's pushes
    /// ready also completes the sends behind them, and their replies then share the pushes'
    /// write instead of costing a second one.
    pub fn awaiting_reply(&self) -> AwaitedReply {
        self.awaited.fetch_add(1, Ordering::Relaxed);
        AwaitedReply(self.awaited.clone())
    }

    /// Queues a frame, waiting while the queue is full. False once the socket is gone.
    pub async fn send(&self, text: String) -> bool {
        self.tx.send(Outgoing::Text(text)).await.is_ok()
    }

    /// Queues a frame if there is room now; a full queue hands it back.
    pub fn try_send(&self, text: String) -> Result<(), mpsc::error::TrySendError<Outgoing>> {
        self.tx.try_send(Outgoing::Text(text))
    }

    /// Queues what [`Outbox::try_send`] handed back, waiting while the queue is full.
    pub async fn send_outgoing(&self, outgoing: Outgoing) -> bool {
        self.tx.send(outgoing).await.is_ok()
    }

    /// Replies `ok` with `response`.
    pub async fn ok(&self, to: &Address, response: &impl serde::Serialize) -> bool {
        self.send(frame::reply_ok(to, response)).await
    }

    /// Replies `error` with the protocol code of `error`, and counts it.
    pub async fn error(&self, to: &Address, error: &ApiError) -> bool {
        metrics::error(error.code.as_str());
        tracing::debug!(
            topic = %to.topic,
            reason = error.code.as_str(),
            message = %error.message,
            "ws error reply"
        );
        self.send(frame::reply_error(to, error)).await
    }

    /// Hands a topic's pushes to the writer. False once the socket is gone.
    pub async fn deliver(&self, delivery: Delivery) -> bool {
        self.tx.send(Outgoing::Deliver(delivery)).await.is_ok()
    }

    async fn close(&self, code: u16, reason: String) -> bool {
        let close = Box::new(CloseFrame {
            code,
            reason: reason.into(),
        });
        self.tx.send(Outgoing::Close(close)).await.is_ok()
    }
}

/// The topics of one socket. `handle` gets every well-formed frame whose topic is not
/// `phoenix`; it answers through the [`Outbox`] it was built with.
pub trait Channels: Send {
    fn handle(&mut self, frame: Frame<'_>) -> impl Future<Output = ()> + Send;

    /// The socket's credentials expired and it is about to close: end every join and tell its
    /// topic (`phx_error`), so clients rejoin once they have reconnected with a fresh token.
    fn expire(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client sent a close frame.
    ClientClosed,
    /// The stream ended without a close frame.
    ClientGone,
    /// Nothing received for `idle_timeout`.
    Idle,
    /// A frame above the size limit.
    TooLarge,
    /// A frame the protocol does not allow (binary, not an array).
    Violation { code: u16, reason: String },
    /// The socket reported an error while reading.
    ReadError { code: u16, reason: String },
    /// Writing to the socket failed: the peer is gone.
    WriteFailed,
    /// The server is shutting down.
    Shutdown,
    /// The socket's credentials expired.
    Expired,
    /// The socket's API key was revoked, or its rotation grace ended.
    Revoked,
}

impl End {
    /// The close frame the server sends, if any, and the error metric reason.
    fn close(&self, config: &SessionConfig) -> Option<(u16, String, &'static str)> {
        match self {
            End::ClientClosed | End::ClientGone | End::WriteFailed => None,
            End::Shutdown => Some((CLOSE_GOING_AWAY, "server shutting down".into(), "shutdown")),
            End::Expired => Some((CLOSE_TOKEN_EXPIRED, "token expired".into(), "token_expired")),
            End::Revoked => Some((CLOSE_TOKEN_EXPIRED, "credentials revoked".into(), "revoked")),
            End::Idle => Some((
                CLOSE_NORMAL,
                format!("idle for {}s", config.idle_timeout.as_secs()),
                "idle",
            )),
            End::TooLarge => Some((
                CLOSE_TOO_BIG,
                format!("frame larger than {} bytes", config.max_frame_bytes),
                "too_large_frame",
            )),
            End::Violation { code, reason } => Some((*code, reason.clone(), "violation")),
            End::ReadError { code, reason } => Some((*code, reason.clone(), "read_error")),
        }
    }
}

/// Classifies a read error of the socket. The WebSocket library's error type is not a
/// dependency of this crate, so this reads its message: tungstenite reports an oversized
/// message as "Space limit exceeded: Message too long: …" and bad UTF-8 as "UTF-8 encoding
/// error…" (pinned by the oversized-frame integration test).
pub fn classify_read_error(message: &str) -> End {
    let lower = message.to_ascii_lowercase();
    if lower.contains("space limit exceeded") || lower.contains("message too long") {
        End::TooLarge
    } else if lower.contains("utf-8") || lower.contains("utf8") {
        End::ReadError {
            code: CLOSE_INVALID_DATA,
            reason: "text frame is not valid UTF-8".into(),
        }
    } else if lower.contains("connection reset")
        || lower.contains("connection closed")
        || lower.contains("broken pipe")
        || lower.contains("without closing handshake")
    {
        End::ClientGone
    } else {
        End::ReadError {
            code: CLOSE_PROTOCOL_ERROR,
            reason: truncate_reason(&format!("websocket error: {message}")),
        }
    }
}

/// A close reason must fit a control frame (123 bytes).
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Runs a session to its end. `make_channels` builds the socket's topics around its outbox;
/// when `stop` completes the session ends as it says: [`End::Shutdown`] closes the socket with
/// 1001 (going away) so clients reconnect, [`End::Revoked`] ends it like an expired token.
pub async fn run<S, R, E, C>(
    sink: S,
    mut stream: R,
    make_channels: impl FnOnce(Outbox) -> C,
    stop: impl Future<Output = End>,
    config: SessionConfig,
) -> End
where
    S: Sink<Message> + Unpin + Send + 'static,
    S::Error: Display,
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
    C: Channels,
{
    let (outbox, rx) = Outbox::new(config.outbox_frames);
    let mut writer = tokio::spawn(write_loop(sink, rx, outbox.awaited.clone()));
    let mut channels = make_channels(outbox.clone());
    let expiry = async {
        match config.expires_at {
            // Boxed: a timer is 112 bytes, and a socket without an expiry should not carry one.
            Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        end = read_loop(&mut stream, &mut channels, &outbox, &config) => end,
        _ = &mut writer => End::WriteFailed,
        end = stop => end,
        _ = expiry => End::Expired,
    };
    // The waits below are boxed: they come once, at the end, and inline they would be room in
    // every socket's task for its whole life.
    if matches!(end, End::Expired | End::Revoked) && !writer.is_finished() {
        // Bounded like the close itself: a client that reads nothing cannot hold the socket.
        let _ = Box::pin(tokio::time::timeout(config.close_grace, channels.expire())).await;
    }
    // Stops every per-topic task before the close frame is queued behind their pushes.
    drop(channels);
    if writer.is_finished() {
        return end;
    }
    let close = end.close(&config);
    let finish = async {
        if let Some((code, reason, metric)) = close {
            metrics::error(metric);
            tracing::info!(code, reason = %reason, "closing websocket");
            outbox.close(code, truncate_reason(&reason)).await;
        } else {
            outbox.close(CLOSE_NORMAL, String::new()).await;
        }
        drop(outbox);
        let _ = (&mut writer).await;
    };
    if Box::pin(tokio::time::timeout(config.close_grace, finish))
        .await
        .is_err()
    {
        writer.abort();
    }
    end
}

async fn read_loop<R, E, C>(
    stream: &mut R,
    channels: &mut C,
    outbox: &Outbox,
    config: &SessionConfig,
) -> End
where
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
    C: Channels,
{
    let frames_in = metrics::frames_in();
    let (mut idle, timer) = IdleClock::start(config.idle_timeout);
    tokio::pin!(timer);
    loop {
        let next = tokio::select! {
            biased;
            // Cancel-safe: a frame not yet read stays in the stream.
            next = stream.next() => next,
            () = &mut timer => {
                if idle.expired(timer.as_mut()) {
                    return End::Idle;
                }
                continue;
            }
        };
        idle.touch();
        let message = match next {
            None => return End::ClientGone,
            Some(Err(e)) => return classify_read_error(&e.to_string()),
            Some(Ok(message)) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return End::Violation {
                    code: CLOSE_UNSUPPORTED_DATA,
                    reason: "binary frames are not supported; send JSON text frames".into(),
                }
            }
            // Pings are answered by the socket itself; both count as activity.
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return End::ClientClosed,
        };
        frames_in.increment(1);
        if text.len() > config.max_frame_bytes {
            return End::TooLarge;
        }
        // Boxed: answering a frame (a join reads the store) takes many times the room of the
        // rest of this loop, and unboxed it would sit in every idle socket's task.
        if let Some(end) = Box::pin(answer(text.as_str(), channels, outbox)).await {
            return end;
        }
    }
}

/// Decodes one text frame and answers it: heartbeats here, channel frames through `channels`.
/// `Some` when the frame ends the session.
async fn answer<C: Channels>(text: &str, channels: &mut C, outbox: &Outbox) -> Option<End> {
    match frame::decode(text) {
        Decoded::Frame(frame) if frame.topic == frame::PHOENIX_TOPIC => {
            let to = frame.address();
            if frame.event == frame::HEARTBEAT {
                outbox.ok(&to, &json!({})).await;
            } else {
                let mut e = ApiError::invalid(format!(
                    "topic phoenix only takes heartbeat, not {:?}",
                    frame.event
                ));
                e.reason = Some("unknown_event");
                outbox.error(&to, &e).await;
            }
        }
        Decoded::Frame(frame) => channels.handle(frame).await,
        Decoded::Invalid { address, message } => {
            outbox.error(&address, &ApiError::invalid(message)).await;
        }
        Decoded::Unanswerable(message) => {
            metrics::error("malformed");
            tracing::info!(reason = %message, "ignoring a frame without a ref to answer");
        }
        Decoded::Violation(reason) => {
            return Some(End::Violation {
                code: CLOSE_POLICY_VIOLATION,
                reason,
            })
        }
    }
    None
}

/// What the writer does next.
enum Step {
    Item(Outgoing),
    Pushes(Vec<String>),
    /// Every outbox is gone: the session is over.
    Done,
}

/// What is ready to write right now, without waiting: queued frames first.
fn ready_now(
    rx: &mut mpsc::Receiver<Outgoing>,
    deliveries: &mut SelectAll<Delivery>,
) -> Option<Step> {
    match rx.try_recv() {
        Ok(item) => Some(Step::Item(item)),
        Err(_) if deliveries.is_empty() => None,
        Err(_) => deliveries.next().now_or_never().flatten().map(Step::Pushes),
    }
}

/// Writes queued frames and the pushes of every delivery it was handed, batching whatever is
/// ready into one flush. Queued frames (replies) go before pushes that are ready at the same time.
/// `awaited` counts replies still to come (see [`Outbox::awaiting_reply`]).
async fn write_loop<S>(mut sink: S, mut rx: mpsc::Receiver<Outgoing>, awaited: Arc<AtomicUsize>)
where
    S: Sink<Message> + Unpin,
    S::Error: Display,
{
    let frames_out = metrics::frames_out();
    let mut deliveries: SelectAll<Delivery> = SelectAll::new();
    let result: Result<(), String> = async {
        loop {
            let first = tokio::select! {
                biased;
                item = rx.recv() => item.map_or(Step::Done, Step::Item),
                Some(pushes) = deliveries.next(), if !deliveries.is_empty() => Step::Pushes(pushes),
            };
            let mut next = Some(first);
            let mut batch_bytes = 0;
            let mut written = 0;
            let mut yielded = false;
            while let Some(step) = next.take() {
                // One frame or a delivery's pushes; a lone frame needs no `Vec` of its own.
                let (text, pushes) = match step {
                    Step::Done => {
                        let _ = sink.close().await;
                        return Ok(());
                    }
                    Step::Item(Outgoing::Close(close)) => {
                        frames_out.increment(written);
                        let close = Message::Close(Some(*close));
                        // The peer may already be gone; nothing more to do either way.
                        let _ = sink.send(close).await;
                        let _ = sink.close().await;
                        return Ok(());
                    }
                    Step::Item(Outgoing::Deliver(delivery)) => {
                        deliveries.push(delivery);
                        (None, Vec::new())
                    }
                    Step::Item(Outgoing::Text(text)) => (Some(text), Vec::new()),
                    Step::Pushes(pushes) => (None, pushes),
                };
                for text in text.into_iter().chain(pushes) {
                    batch_bytes += text.len();
                    written += 1;
                    sink.feed(Message::Text(text.into()))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                if batch_bytes < WRITE_BATCH_BYTES {
                    // Only what is ready now; the select above waits for the rest.
                    next = ready_now(&mut rx, &mut deliveries);
                    if next.is_none() && !yielded && awaited.load(Ordering::Relaxed) > 0 {
                        // A reply is coming: let the tasks woken with this batch queue it first.
                        yielded = true;
                        tokio::task::yield_now().await;
                        next = ready_now(&mut rx, &mut deliveries);
                    }
                }
            }
            sink.flush().await.map_err(|e| e.to_string())?;
            frames_out.increment(written);
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "websocket write failed; the peer is gone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use serde_json::Value;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

    #[test]
    fn an_outbox_slot_is_three_words() {
        // Every socket's queue allocates 32 of them up front.
        assert_eq!(
            std::mem::size_of::<Outgoing>(),
            3 * std::mem::size_of::<usize>()
        );
    }

    /// Echoes every channel frame back as a push, to observe what reaches the channels.
    struct Echo(Outbox);

    impl Channels for Echo {
        async fn handle(&mut self, frame: Frame<'_>) {
            let payload: Value = serde_json::from_str(frame.payload).unwrap();
            self.0
                .send(frame::push(
                    &frame.join_ref,
                    &frame.topic,
                    &frame.event,
                    &payload,
                ))
                .await;
        }

        async fn expire(&mut self) {
            self.0
                .send(frame::push(&Value::Null, "room:a", "expired", &()))
                .await;
        }
    }

    fn config() -> SessionConfig {
        SessionConfig {
            idle_timeout: Duration::from_secs(60),
            outbox_frames: 8,
            close_grace: Duration::from_secs(1),
            max_frame_bytes: 1024,
            expires_at: None,
        }
    }

    /// The client end of an in-memory "socket".
    struct Client {
        /// Completing it shuts the session down.
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        to_server: UnboundedSender<Result<Message, String>>,
        from_server: UnboundedReceiver<Message>,
        session: tokio::task::JoinHandle<End>,
    }

    fn start(config: SessionConfig) -> Client {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (to_server, server_in) = unbounded_channel();
        let (server_out, from_server) = unbounded_channel::<Message>();
        let stream = Box::pin(futures_util::stream::unfold(
            server_in,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        ));
        let sink = Box::pin(futures_util::sink::unfold(
            server_out,
            |tx, message: Message| async move {
                tx.send(message).map_err(|e| e.to_string())?;
                Ok::<_, String>(tx)
            },
        ));
        let session = tokio::spawn(run(
            sink,
            stream,
            Echo,
            stop_rx.map(|_| End::Shutdown),
            config,
        ));
        Client {
            stop: Some(stop),
            to_server,
            from_server,
            session,
        }
    }

    impl Client {
        fn send(&self, text: &str) {
            self.to_server.send(Ok(Message::Text(text.into()))).unwrap();
        }

        async fn recv(&mut self) -> Message {
            tokio::time::timeout(Duration::from_secs(5), self.from_server.recv())
                .await
                .expect("a frame within 5s")
                .expect("session still writing")
        }

        async fn recv_json(&mut self) -> Value {
            match self.recv().await {
                Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                other => panic!("expected text, got {other:?}"),
            }
        }

        async fn recv_close(&mut self) -> u16 {
            match self.recv().await {
                Message::Close(Some(c)) => c.code,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn heartbeat_is_answered_and_channel_frames_reach_the_channels() {
        let mut c = start(config());
        c.send(r#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(
            c.recv_json().await,
            serde_json::json!([null, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
        );
        c.send(r#"["2","3","room:a","hello",{"x":1}]"#);
        assert_eq!(
            c.recv_json().await,
            serde_json::json!(["2", null, "room:a", "hello", {"x": 1}])
        );
    }

    #[tokio::test]
    async fn bad_frames_get_error_replies_or_are_ignored_and_the_socket_survives() {
        let mut c = start(config());
        c.send(r#"[null,"1","phoenix","heartbeat"]"#);
        let reply = c.recv_json().await;
        assert_eq!(reply[1], "1");
        assert_eq!(reply[3], "phx_reply");
        assert_eq!(reply[4]["status"], "error");
        assert_eq!(reply[4]["response"]["reason"], "invalid");
        c.send("{{{ not json");
        c.send(r#"[null,"2","phoenix","dance",{}]"#);
        let reply = c.recv_json().await;
        assert_eq!(reply[1], "2", "the unanswerable frame produced no reply");
        assert_eq!(reply[4]["response"]["detail"], "unknown_event");
        c.send(r#"[null,"3","phoenix","heartbeat",{}]"#);
        assert_eq!(c.recv_json().await[4]["status"], "ok");
    }

    #[tokio::test]
    async fn violations_close_the_socket_with_a_code() {
        let mut c = start(config());
        c.send(r#"{"event":"heartbeat"}"#);
        assert_eq!(c.recv_close().await, CLOSE_POLICY_VIOLATION);
        assert!(matches!(c.session.await.unwrap(), End::Violation { .. }));

        let mut c = start(config());
        c.to_server
            .send(Ok(Message::Binary(vec![1, 2, 3].into())))
            .unwrap();
        assert_eq!(c.recv_close().await, CLOSE_UNSUPPORTED_DATA);

        let mut c = start(config());
        c.send(&format!(
            r#"[null,"1","phoenix","heartbeat",{{"pad":"{}"}}]"#,
            "x".repeat(2000)
        ));
        assert_eq!(c.recv_close().await, CLOSE_TOO_BIG);
        assert_eq!(c.session.await.unwrap(), End::TooLarge);

        let mut c = start(config());
        c.to_server
            .send(Err(
                "Space limit exceeded: Message too long: 2000 > 1024".to_owned()
            ))
            .unwrap();
        assert_eq!(c.recv_close().await, CLOSE_TOO_BIG);
    }

    #[tokio::test]
    async fn a_silent_socket_is_closed_after_the_idle_timeout() {
        // Real time (tokio's test-util clock is not enabled in this crate): a short timeout and
        // assertions that only depend on lower bounds of elapsed time.
        let idle = Duration::from_millis(600);
        let mut c = start(SessionConfig {
            idle_timeout: idle,
            ..config()
        });
        tokio::time::sleep(idle / 2).await;
        c.send(r#"[null,"1","phoenix","heartbeat",{}]"#);
        let last_activity = std::time::Instant::now();
        assert_eq!(c.recv_json().await[4]["status"], "ok");
        let code = c.recv_close().await;
        assert!(
            last_activity.elapsed() >= idle,
            "closed {:?} after the last frame, before the idle timeout",
            last_activity.elapsed()
        );
        assert_eq!(code, CLOSE_NORMAL);
        assert_eq!(c.session.await.unwrap(), End::Idle);
    }

    #[tokio::test]
    async fn server_shutdown_closes_with_going_away() {
        let mut c = start(config());
        c.send(r#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(c.recv_json().await[4]["status"], "ok");
        c.stop.take().unwrap().send(()).unwrap();
        assert_eq!(c.recv_close().await, CLOSE_GOING_AWAY);
        assert_eq!(c.session.await.unwrap(), End::Shutdown);
    }

    #[tokio::test]
    async fn expired_credentials_tell_the_channels_then_close() {
        let mut c = start(SessionConfig {
            expires_at: Some(tokio::time::Instant::now() + Duration::from_millis(300)),
            ..config()
        });
        c.send(r#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(c.recv_json().await[4]["status"], "ok");
        assert_eq!(c.recv_json().await[3], "expired", "the channels hear first");
        assert_eq!(c.recv_close().await, CLOSE_TOKEN_EXPIRED);
        assert_eq!(c.session.await.unwrap(), End::Expired);
    }

    #[tokio::test]
    async fn a_client_that_goes_away_ends_the_session() {
        let c = start(config());
        drop(c.to_server);
        assert_eq!(c.session.await.unwrap(), End::ClientGone);
    }

    #[tokio::test]
    async fn the_writer_pulls_deliveries_after_the_frames_queued_before_them() {
        let (outbox, rx) = Outbox::new(8);
        let (server_out, mut from_server) = unbounded_channel::<Message>();
        let sink = Box::pin(futures_util::sink::unfold(
            server_out,
            |tx, message: Message| async move {
                tx.send(message).map_err(|e| e.to_string())?;
                Ok::<_, String>(tx)
            },
        ));
        let writer = tokio::spawn(write_loop(sink, rx, Arc::default()));
        // A delivery whose second pull waits until the test lets it go on.
        let (more_tx, more_rx) = tokio::sync::oneshot::channel::<()>();
        let delivery = futures_util::stream::iter([vec!["p1".to_owned(), "p2".to_owned()]]).chain(
            futures_util::stream::once(async move {
                more_rx.await.unwrap();
                vec!["p3".to_owned()]
            }),
        );
        assert!(outbox.send("reply".into()).await);
        assert!(outbox.deliver(Box::pin(delivery)).await);
        async fn text(rx: &mut UnboundedReceiver<Message>) -> String {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(Message::Text(t))) => t.to_string(),
                other => panic!("expected a text frame within 5s, got {other:?}"),
            }
        }
        for expected in ["reply", "p1", "p2"] {
            assert_eq!(text(&mut from_server).await, expected);
        }
        // A reply queued while the delivery waits is written at once.
        assert!(outbox.send("later".into()).await);
        assert_eq!(text(&mut from_server).await, "later");
        more_tx.send(()).unwrap();
        assert_eq!(text(&mut from_server).await, "p3");
        drop(outbox);
        writer.await.unwrap();
    }

    /// A sink that records what each flush wrote.
    struct Flushes {
        pending: Vec<String>,
        tx: UnboundedSender<Vec<String>>,
    }

    impl Sink<Message> for Flushes {
        type Error = String;

        fn poll_ready(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), String>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), String> {
            if let Message::Text(t) = item {
                self.pending.push(t.to_string());
            }
            Ok(())
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), String>> {
            if !self.pending.is_empty() {
                let batch = std::mem::take(&mut self.pending);
                self.tx.send(batch).map_err(|e| e.to_string())?;
            }
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), String>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn a_reply_completed_with_the_pushes_shares_their_write() {
        for awaiting in [true, false] {
            let (outbox, rx) = Outbox::new(8);
            let (tx, mut flushes) = unbounded_channel();
            let sink = Flushes {
                pending: Vec::new(),
                tx,
            };
            let writer = tokio::spawn(write_loop(sink, rx, outbox.awaited.clone()));
            let (push_tx, push_rx) = unbounded_channel::<Vec<String>>();
            let delivery = futures_util::stream::unfold(push_rx, |mut rx| async move {
                rx.recv().await.map(|p| (p, rx))
            });
            assert!(outbox.deliver(Box::pin(delivery)).await);
            let awaited = awaiting.then(|| outbox.awaiting_reply());
            // One durable advance: the pushes are ready, and the task that queues the reply is
            // woken right behind the writer (the test runtime runs tasks in wake order).
            push_tx.send(vec!["push".to_owned()]).unwrap();
            let replier = outbox.clone();
            let reply = tokio::spawn(async move {
                assert!(replier.send("reply".to_owned()).await);
                drop(awaited);
            });
            reply.await.unwrap();
            let mut written: Vec<Vec<String>> = Vec::new();
            while written.iter().map(Vec::len).sum::<usize>() < 2 {
                let batch = tokio::time::timeout(Duration::from_secs(5), flushes.recv())
                    .await
                    .expect("a flush within 5s")
                    .expect("writer running");
                written.push(batch);
            }
            let expected: Vec<Vec<String>> = if awaiting {
                vec![vec!["push".into(), "reply".into()]]
            } else {
                vec![vec!["push".into()], vec!["reply".into()]]
            };
            assert_eq!(written, expected, "awaiting a reply: {awaiting}");
            drop(outbox);
            drop(push_tx);
            writer.await.unwrap();
        }
    }

    #[test]
    fn read_errors_are_classified() {
        assert_eq!(
            classify_read_error("Space limit exceeded: Message too long: 5 > 4"),
            End::TooLarge
        );
        assert!(matches!(
            classify_read_error("UTF-8 encoding error"),
            End::ReadError {
                code: CLOSE_INVALID_DATA,
                ..
            }
        ));
        assert_eq!(
            classify_read_error("IO error: Connection reset by peer (os error 104)"),
            End::ClientGone
        );
        let End::ReadError { reason, .. } = classify_read_error(&"x".repeat(500)) else {
            panic!("unknown errors are read errors");
        };
        assert!(reason.len() <= 123);
    }
}
