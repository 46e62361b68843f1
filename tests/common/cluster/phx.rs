//! A minimal Phoenix Channels V2 client over tokio-tungstenite for the workload tasks: connect
//! with `token=`, send `[join_ref, ref, topic, event, payload]` frames, read frames one by one.
//!
//! Unlike the frame-level test client in `tests/ws_frames.rs` it never panics: a workload
//! task treats every failure (refused connect, closed socket, garbage frame) as a fault to
//! count and recover from, the way a real client reconnects.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long the TCP connect plus the upgrade may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One server frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub ref_: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

impl Frame {
    fn parse(text: &str) -> Result<Frame, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("non-JSON frame {text:?}: {e}"))?;
        let parts = v
            .as_array()
            .filter(|a| a.len() == 5)
            .ok_or_else(|| format!("frame is not a 5-element array: {text}"))?;
        let opt = |v: &Value| v.as_str().map(str::to_owned);
        Ok(Frame {
            join_ref: opt(&parts[0]),
            ref_: opt(&parts[1]),
            topic: opt(&parts[2]).ok_or_else(|| format!("frame without topic: {text}"))?,
            event: opt(&parts[3]).ok_or_else(|| format!("frame without event: {text}"))?,
            payload: parts[4].clone(),
        })
    }

    /// `phx_reply` status (`ok` / `error`).
    pub fn status(&self) -> Option<&str> {
        self.payload["status"].as_str()
    }

    pub fn response(&self) -> &Value {
        &self.payload["response"]
    }
}

pub struct PhxSocket {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

impl PhxSocket {
    /// Connects to `ws://addr/socket/websocket?vsn=2.0.0&token=KEY` (bounded by
    /// [`CONNECT_TIMEOUT`]).
    pub async fn connect(addr: SocketAddr, token: &str) -> Result<PhxSocket, String> {
        let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
        let (stream, _) =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| format!("connect failed: {e}"))?;
        Ok(PhxSocket {
            stream,
            next_ref: 0,
        })
    }

    pub fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send(
        &mut self,
        join_ref: Option<&str>,
        ref_: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Result<(), String> {
        let frame = json!([join_ref, ref_, topic, event, payload]).to_string();
        self.stream
            .send(Message::text(frame))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    /// Sends `phx_join` for `topic`; returns its join_ref (also the ref of its reply).
    pub async fn join(&mut self, topic: &str, payload: Value) -> Result<String, String> {
        let join_ref = self.make_ref();
        self.send(Some(&join_ref), &join_ref, topic, "phx_join", payload)
            .await?;
        Ok(join_ref)
    }

    pub async fn heartbeat(&mut self) -> Result<(), String> {
        let r = self.make_ref();
        self.send(None, &r, "phoenix", "heartbeat", json!({})).await
    }

    /// The next frame. Cancel-safe (a `select!` may drop it). Errors when the socket ends or
    /// the server sends something that is not a Phoenix frame.
    pub async fn recv(&mut self) -> Result<Frame, String> {
        loop {
            match self.stream.next().await {
                None => return Err("socket ended".to_owned()),
                Some(Err(e)) => return Err(format!("socket error: {e}")),
                Some(Ok(Message::Text(text))) => return Frame::parse(text.as_str()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("socket closed by the server: {frame:?}"))
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}
