//! Talking to Ferry: [`FerryHttp`] for the HTTP API (conversations, appends, pages) and
//! [`PhxSocket`], a raw Phoenix Channels V2 client (`[join_ref, ref, topic, event, payload]`
//! JSON text frames) that keeps the socket alive with heartbeats while its owner reads.
//!
//! Frames are decoded only as far as the caller needs: the payload stays raw JSON until the
//! event says what it is, so a subscriber reading thousands of pushes a second parses each once.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::append::Outcome;
use crate::LoadError;

/// The participant every load message is sent as (and every conversation lists).
pub const SENDER: &str = "loadtest";

#[derive(Clone)]
pub struct FerryHttp {
    client: reqwest::Client,
    base: String,
}

/// One `GET .../messages` page, reduced to what the readers check.
#[derive(Debug, Deserialize)]
pub struct Page {
    pub messages: Vec<PageMessage>,
    pub last_seq: u64,
    pub has_more: bool,
}

#[derive(Debug, Deserialize)]
pub struct PageMessage {
    pub seq: u64,
}

/// One `GET .../messages` page as the log checker reads it: contents kept raw (someone else's
/// message may hold any JSON), and the `gaps` a failover left.
#[derive(Debug, Deserialize)]
pub struct LogPage {
    pub messages: Vec<LogMessage>,
    pub last_seq: u64,
    pub has_more: bool,
    #[serde(default)]
    pub gaps: Vec<LogGap>,
}

#[derive(Debug, Deserialize)]
pub struct LogMessage {
    pub seq: u64,
    pub content: Box<RawValue>,
}

impl LogMessage {
    /// The load tool's send index (`content.i`), `None` for anyone else's message.
    pub fn index(&self) -> Option<u64> {
        serde_json::from_str::<PushedContent>(self.content.get())
            .ok()
            .and_then(|c| c.i)
    }
}

#[derive(Debug, Deserialize)]
pub struct LogGap {
    pub from_seq: u64,
    pub to_seq: u64,
}

impl FerryHttp {
    /// A client with its own connection pool; `timeout` bounds every request.
    pub fn new(base: &str, api_key: &str, timeout: Duration) -> Result<FerryHttp, LoadError> {
        let mut headers = reqwest::header::HeaderMap::new();
        let auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {api_key}"))
            .map_err(|_| LoadError::Args("the API key is not a valid header value".into()))?;
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()?;
        Ok(FerryHttp {
            client,
            base: base.to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `PUT /v1/conversations/{id}` listing [`SENDER`].
    pub async fn create_conversation(&self, id: &str) -> Result<(), LoadError> {
        let resp = self
            .client
            .put(self.url(&format!("/v1/conversations/{id}")))
            .json(&json!({ "participants": [SENDER] }))
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(LoadError::Setup(format!(
                "PUT conversation {id}: {status} {body}"
            )));
        }
        Ok(())
    }

    /// The conversation's `last_seq` (`GET /v1/conversations/{id}`).
    pub async fn last_seq(&self, id: &str) -> Result<u64, LoadError> {
        let resp = self
            .client
            .get(self.url(&format!("/v1/conversations/{id}")))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        body["last_seq"]
            .as_u64()
            .ok_or_else(|| LoadError::Setup(format!("GET conversation {id}: {status} {body}")))
    }

    /// `POST .../messages` with a prebuilt JSON body.
    pub async fn append(&self, id: &str, body: String) -> Outcome {
        let resp = self
            .client
            .post(self.url(&format!("/v1/conversations/{id}/messages")))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Outcome::Error(format!("POST {id}: {e}")),
        };
        let status = resp.status().as_u16();
        if status == 201 {
            // The ack body is not needed (the seq is not used by HTTP appenders); skipping its
            // parse keeps the generator cheap. Reading it returns the connection to the pool.
            return match resp.bytes().await {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Error(format!("POST {id}: reading ack: {e}")),
            };
        }
        let text = resp.text().await.unwrap_or_default();
        if (status == 429 || status == 503) && text.contains("try_again") {
            Outcome::TryAgain
        } else {
            Outcome::Error(format!("POST {id}: {status} {text}"))
        }
    }

    /// `GET .../messages?{query}`.
    pub async fn page(&self, id: &str, query: &str) -> Result<Page, String> {
        self.get_page(id, query).await
    }

    /// `GET .../messages?after_seq={after_seq}&limit={limit}`, for the log checker.
    pub async fn log_page(
        &self,
        id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<LogPage, String> {
        self.get_page(id, &format!("after_seq={after_seq}&limit={limit}"))
            .await
    }

    async fn get_page<P: serde::de::DeserializeOwned>(
        &self,
        id: &str,
        query: &str,
    ) -> Result<P, String> {
        let resp = self
            .client
            .get(self.url(&format!("/v1/conversations/{id}/messages?{query}")))
            .send()
            .await
            .map_err(|e| format!("GET {id} messages?{query}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("GET {id} messages?{query}: {status} {text}"));
        }
        resp.json()
            .await
            .map_err(|e| format!("GET {id} messages?{query}: body: {e}"))
    }
}

/// The JSON body of an append of `content`.
pub fn append_body(content: &str) -> String {
    format!(r#"{{"sender":"{SENDER}","content":{content}}}"#)
}

/// The JSON body of an append of `content` under an idempotency key (made of `[A-Za-z0-9-]`,
/// so it needs no escaping).
pub fn keyed_append_body(content: &str, key: &str) -> String {
    format!(r#"{{"sender":"{SENDER}","content":{content},"idempotency_key":"{key}"}}"#)
}

/// A decoded frame; the payload is left raw.
#[derive(Debug)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub reference: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Box<RawValue>,
}

impl Frame {
    pub fn parse(text: &str) -> Result<Frame, String> {
        let (join_ref, reference, topic, event, payload): (
            Option<String>,
            Option<String>,
            String,
            String,
            Box<RawValue>,
        ) = serde_json::from_str(text).map_err(|e| format!("bad frame {text:?}: {e}"))?;
        Ok(Frame {
            join_ref,
            reference,
            topic,
            event,
            payload,
        })
    }

    /// For `phx_reply`: `Ok(response)` or `Err((reason, whole payload))`.
    pub fn reply(&self) -> Result<Value, (String, String)> {
        parse_reply(self.payload.get())
    }
}

/// A `phx_reply` payload: `Ok(response)` or `Err((reason, whole payload))`.
fn parse_reply(raw: &str) -> Result<Value, (String, String)> {
    #[derive(Deserialize)]
    struct Reply {
        status: String,
        #[serde(default)]
        response: Value,
    }
    match serde_json::from_str::<Reply>(raw) {
        Ok(r) if r.status == "ok" => Ok(r.response),
        Ok(r) => Err((
            r.response["reason"]
                .as_str()
                .unwrap_or("unknown")
                .to_owned(),
            raw.to_owned(),
        )),
        Err(e) => Err(("malformed".to_owned(), format!("{e}: {raw}"))),
    }
}

/// A frame as a publisher reads it, decoded in one borrowed pass: ref and event borrowed from
/// the text, the payload left raw and read only for a `phx_reply` (a publisher also receives
/// every message it sends as a push, and skips those). A frame this cannot borrow (a string
/// with escapes) is decoded again with [`Frame::parse`].
#[derive(Debug, Deserialize)]
pub struct ReplyView<'a>(
    IgnoredAny,
    #[serde(borrow)] Option<&'a str>,
    IgnoredAny,
    #[serde(borrow)] &'a str,
    #[serde(borrow)] &'a RawValue,
);

impl<'a> ReplyView<'a> {
    pub fn parse(text: &'a str) -> Option<ReplyView<'a>> {
        serde_json::from_str(text).ok()
    }

    pub fn reference(&self) -> Option<&'a str> {
        self.1
    }

    pub fn event(&self) -> &'a str {
        self.3
    }

    /// For `phx_reply`: `Ok` for status `ok` (its response is not read), else the reason and the
    /// whole payload, as [`Frame::reply`] gives them.
    pub fn outcome(&self) -> Result<(), (String, String)> {
        #[derive(Deserialize)]
        struct Status<'a> {
            #[serde(borrow)]
            status: &'a str,
        }
        let raw = self.4.get();
        match serde_json::from_str::<Status>(raw) {
            Ok(s) if s.status == "ok" => Ok(()),
            _ => parse_reply(raw).map(|_| ()),
        }
    }
}

/// What subscribers read out of a `message` push.
#[derive(Debug, Deserialize)]
pub struct PushedMessage {
    pub seq: u64,
    #[serde(default)]
    pub content: PushedContent,
}

/// The load tool's own content (see [`crate::append::Payload`]): `i` is the send index.
#[derive(Debug, Default, Deserialize)]
pub struct PushedContent {
    pub i: Option<u64>,
}

/// A frame decoded in one pass for the subscribers' hot path: the event borrowed from the text,
/// and of the payload only the fields of a `message` or `gap` push (everything else is skipped,
/// not kept). A frame this cannot decode (a payload that is not an object, an event with escapes)
/// is decoded again with [`Frame::parse`].
#[derive(Debug, Deserialize)]
pub struct PushView<'a>(
    IgnoredAny,
    IgnoredAny,
    IgnoredAny,
    #[serde(borrow)] &'a str,
    PushFields,
);

/// The payload fields a subscriber reads: `seq` and `content.i` of a `message`, `from_seq` and
/// `to_seq` of a `gap`.
#[derive(Debug, Default, Deserialize)]
pub struct PushFields {
    pub seq: Option<u64>,
    #[serde(default)]
    pub content: PushedContent,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
}

impl<'a> PushView<'a> {
    pub fn parse(text: &'a str) -> Option<PushView<'a>> {
        serde_json::from_str(text).ok()
    }

    pub fn event(&self) -> &'a str {
        self.3
    }

    pub fn fields(&self) -> &PushFields {
        &self.4
    }
}

pub struct PhxSocket {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    heartbeat: tokio::time::Interval,
    next_ref: u64,
}

/// Bytes a socket reads at once (replies and pushes are a few hundred bytes each).
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// What [`PhxSocket::next`] hands back.
pub enum Incoming {
    Frame(Frame),
    /// The server closed the socket (or the connection dropped).
    Closed(Closed),
}

/// What [`PhxSocket::next_text`] hands back.
pub enum Text {
    Frame(Utf8Bytes),
    /// The server closed the socket (or the connection dropped).
    Closed(Closed),
}

/// How a socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub why: String,
    /// The server closed it with 1001 (going away): the node is shutting down, and a client
    /// reconnects to another node and resumes. Any other end (another code, a dropped
    /// connection) is a socket the server should not have cut.
    pub going_away: bool,
}

impl Closed {
    /// A socket that ended without a close frame from the server (or failed).
    pub fn dropped(why: impl Into<String>) -> Closed {
        Closed {
            why: why.into(),
            going_away: false,
        }
    }

    fn by_server(frame: Option<CloseFrame>) -> Closed {
        match frame {
            Some(f) => Closed {
                going_away: f.code == CloseCode::Away,
                why: format!(
                    "closed by server: {} {:?}",
                    u16::from(f.code),
                    f.reason.as_str()
                ),
            },
            None => Closed::dropped("closed by server without a code"),
        }
    }
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl PhxSocket {
    pub async fn connect(url: &str, heartbeat: Duration) -> Result<PhxSocket, LoadError> {
        // Nagle off: pipelined small frames would otherwise wait on delayed ACKs (tens of ms).
        // A small read buffer: tungstenite zero-fills the whole buffer's spare room before every
        // read, which with its 128 KiB default cost a third of this tool's CPU per frame.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES);
        let (stream, _response) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        let mut heartbeat = tokio::time::interval(heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick of an interval is immediate; a fresh socket needs no heartbeat yet.
        heartbeat.reset();
        Ok(PhxSocket {
            stream,
            heartbeat,
            next_ref: 0,
        })
    }

    /// A fresh ref for a request. Callers that key replies by their own refs (the WS appender
    /// uses send indexes) pass those to [`PhxSocket::send_frame`] instead.
    pub fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        format!("r{}", self.next_ref)
    }

    pub async fn send_frame(
        &mut self,
        join_ref: Option<&str>,
        reference: &str,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> Result<(), LoadError> {
        self.feed_frame(join_ref, reference, topic, event, payload)
            .await?;
        self.flush().await
    }

    /// Like [`PhxSocket::send_frame`], but the frame waits in the socket's write buffer for
    /// [`PhxSocket::flush`] (or for the buffer to fill), so frames due together leave in one write.
    pub async fn feed_frame(
        &mut self,
        join_ref: Option<&str>,
        reference: &str,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> Result<(), LoadError> {
        let join_ref = match join_ref {
            Some(j) => format!("\"{j}\""),
            None => "null".to_owned(),
        };
        let text = format!(r#"[{join_ref},"{reference}","{topic}","{event}",{payload}]"#);
        self.stream.feed(Message::text(text)).await?;
        Ok(())
    }

    /// Writes whatever [`PhxSocket::feed_frame`] buffered.
    pub async fn flush(&mut self) -> Result<(), LoadError> {
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends a heartbeat now; its reply arrives as a `phx_reply` on topic `phoenix`.
    pub async fn heartbeat(&mut self) -> Result<String, LoadError> {
        let r = self.make_ref();
        self.send_frame(None, &r, "phoenix", "heartbeat", "{}")
            .await?;
        Ok(r)
    }

    /// The next frame, sending heartbeats on schedule while waiting. Heartbeat replies are
    /// passed through like any other frame (they are `phx_reply` on topic `phoenix`).
    pub async fn next(&mut self) -> Result<Incoming, LoadError> {
        match self.next_text().await? {
            Text::Frame(text) => Frame::parse(text.as_str())
                .map(Incoming::Frame)
                .map_err(LoadError::Setup),
            Text::Closed(why) => Ok(Incoming::Closed(why)),
        }
    }

    /// Like [`PhxSocket::next`], but the frame's text is left undecoded (for [`PushView`]).
    pub async fn next_text(&mut self) -> Result<Text, LoadError> {
        loop {
            tokio::select! {
                msg = self.stream.next() => {
                    let msg = match msg {
                        None => return Ok(Text::Closed(Closed::dropped("connection ended"))),
                        Some(Err(e)) => return Ok(Text::Closed(Closed::dropped(e.to_string()))),
                        Some(Ok(m)) => m,
                    };
                    match msg {
                        Message::Text(text) => return Ok(Text::Frame(text)),
                        Message::Close(frame) => {
                            return Ok(Text::Closed(Closed::by_server(frame)));
                        }
                        // Pings are answered by tungstenite itself; nothing else is expected.
                        _ => continue,
                    }
                }
                _ = self.heartbeat.tick() => {
                    self.heartbeat().await?;
                }
            }
        }
    }

    /// Joins `topic` and waits for its reply (pushes of *other* topics that arrive meanwhile are
    /// dropped: callers join before traffic starts, or on a socket of their own).
    pub async fn join(
        &mut self,
        join_ref: &str,
        topic: &str,
        payload: &str,
    ) -> Result<Value, LoadError> {
        self.send_frame(Some(join_ref), join_ref, topic, "phx_join", payload)
            .await?;
        loop {
            match self.next().await? {
                Incoming::Closed(why) => {
                    return Err(LoadError::Setup(format!(
                        "join {topic}: socket closed: {why}"
                    )))
                }
                Incoming::Frame(f)
                    if f.event == "phx_reply" && f.reference.as_deref() == Some(join_ref) =>
                {
                    return f.reply().map_err(|(reason, raw)| {
                        LoadError::Setup(format!("join {topic}: {reason}: {raw}"))
                    });
                }
                Incoming::Frame(_) => continue,
            }
        }
    }

    /// Closes the socket politely (close frame); errors are irrelevant at that point.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_1001_close_is_a_node_going_away() {
        let away = Closed::by_server(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "shutting down".into(),
        }));
        assert!(away.going_away);
        assert_eq!(away.why, r#"closed by server: 1001 "shutting down""#);
        let policy = Closed::by_server(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "".into(),
        }));
        assert!(!policy.going_away);
        assert!(!Closed::by_server(None).going_away);
        assert!(!Closed::dropped("connection reset").going_away);
    }
}
