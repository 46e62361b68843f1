//! A raw Phoenix V2 WebSocket client for the integration tests (tokio-tungstenite): frames are
//! checked to be `[join_ref, ref, topic, event, payload]`, and frames a test reads past while
//! looking for a reply are kept in order for later `next_push` calls.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::TestServer;

/// Every wait for a frame fails the test after this.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(15);

pub fn socket_url(server: &TestServer, query: &str) -> String {
    format!("ws://{}/socket/websocket?{query}", server.listen)
}

/// A raw Phoenix V2 client: frames the test has read past (while looking for a reply) are kept
/// in order for later `next_push` calls.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub pending: VecDeque<Value>,
    pub next_ref: u64,
}

impl Ws {
    pub async fn connect(server: &TestServer, token: &str) -> Ws {
        let url = socket_url(server, &format!("vsn=2.0.0&token={token}"));
        let (stream, response) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("websocket connect failed: {e}"));
        assert_eq!(response.status().as_u16(), 101);
        Ws {
            stream,
            pending: VecDeque::new(),
            next_ref: 0,
        }
    }

    pub fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::text(text))
            .await
            .expect("send frame");
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next frame from the socket itself (not the pending queue).
    pub async fn read_frame(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(FRAME_TIMEOUT, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within {FRAME_TIMEOUT:?}"))
                .unwrap_or_else(|| panic!("socket ended while waiting for a frame"))
                .unwrap_or_else(|e| panic!("socket error while waiting for a frame: {e}"));
            match message {
                Message::Text(text) => {
                    let v: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON {text:?}: {e}"));
                    assert!(
                        v.as_array().is_some_and(|a| a.len() == 5),
                        "server frame is not [join_ref, ref, topic, event, payload]: {v}"
                    );
                    return v;
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The reply to `ref_`, keeping everything read before it for `next_push`.
    pub async fn reply(&mut self, ref_: &str) -> Value {
        if let Some(i) = self
            .pending
            .iter()
            .position(|f| f[3] == "phx_reply" && f[1] == ref_)
        {
            return self.pending.remove(i).expect("index");
        }
        loop {
            let frame = self.read_frame().await;
            if frame[3] == "phx_reply" && frame[1] == ref_ {
                return frame;
            }
            self.pending.push_back(frame);
        }
    }

    /// The next frame in arrival order (pending first).
    pub async fn next_frame(&mut self) -> Value {
        match self.pending.pop_front() {
            Some(f) => f,
            None => self.read_frame().await,
        }
    }

    /// Sends `[join_ref, ref, topic, event, payload]` and returns the reply's payload.
    pub async fn call(
        &mut self,
        join_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Value {
        let r = self.make_ref();
        self.send(json!([join_ref, r, topic, event, payload])).await;
        let reply = self.reply(&r).await;
        assert_eq!(reply[0], json!(join_ref), "reply echoes join_ref: {reply}");
        assert_eq!(reply[2], topic, "reply on the request's topic: {reply}");
        reply[4].clone()
    }

    /// Joins `topic` with `payload`; returns (join_ref, reply payload).
    pub async fn join(&mut self, topic: &str, payload: Value) -> (String, Value) {
        let join_ref = self.make_ref();
        self.send(json!([join_ref, join_ref, topic, "phx_join", payload]))
            .await;
        let reply = self.reply(&join_ref).await;
        assert_eq!(reply[0], join_ref.as_str());
        (join_ref, reply[4].clone())
    }

    pub async fn join_ok(&mut self, topic: &str, payload: Value) -> (String, Value) {
        let (join_ref, reply) = self.join(topic, payload).await;
        assert_eq!(reply["status"], "ok", "join {topic}: {reply}");
        (join_ref, reply["response"].clone())
    }

    pub async fn heartbeat(&mut self) {
        let reply = self.call(None, "phoenix", "heartbeat", json!({})).await;
        assert_eq!(reply, json!({"status": "ok", "response": {}}));
    }

    /// The next frame, which must be a push of `event` on `topic`.
    pub async fn next_push(&mut self, topic: &str, event: &str) -> Value {
        let frame = self.next_frame().await;
        assert_eq!(
            (frame[2].as_str(), frame[3].as_str()),
            (Some(topic), Some(event)),
            "expected a {event} push on {topic}, got {frame}"
        );
        assert_eq!(frame[1], Value::Null, "pushes carry no ref: {frame}");
        frame
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self) -> (CloseCode, String) {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("socket not closed within {FRAME_TIMEOUT:?}"));
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code, frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                Some(Ok(Message::Text(t))) => panic!("expected a close, got {t}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error instead of a close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }
}

pub fn assert_error(reply: &Value, reason: &str, what: &str) {
    assert_eq!(reply["status"], "error", "{what}: {reply}");
    assert_eq!(reply["response"]["reason"], reason, "{what}: {reply}");
    assert!(
        reply["response"]["message"].is_string(),
        "{what}: error reply without message: {reply}"
    );
}
