//! The node-to-node API's wire types and its client.
//!
//! Nodes call each other on the admin listener under `/internal/v1/…` with the cluster secret in
//! [`SECRET_HEADER`] (and nothing else opens these routes). Bodies are JSON. Every call that acts
//! on a slot names the epoch the caller believes the callee owns it at; a callee that does not
//! own the slot answers `421 Misdirected Request`, and the caller refreshes its view of the slot
//! and routes again.
//!
//! The client keeps HTTP/1.1 connections alive per peer (reqwest's pool), so a forwarded append
//! costs one request on an open connection.

use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use ferry_shards::actor::conversation::{AppendOutcome, AppendRequest};
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::record::Message;

use crate::http::error::ApiError;

/// Carries the cluster secret on node-to-node calls.
pub const SECRET_HEADER: &str = "x-ferry-cluster-secret";

/// A message as nodes exchange it (the public JSON plus what a receiver needs to rebuild it).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireMessage {
    pub conversation_id: String,
    pub slot: u32,
    /// The epoch the owner wrote it under (`0`: not known).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    pub seq: u64,
    pub id: Uuid,
    pub created_at_ms: i64,
    pub sender: String,
    pub kind: String,
    pub content: Box<RawValue>,
    pub metadata: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl From<&Message> for WireMessage {
    fn from(m: &Message) -> WireMessage {
        WireMessage {
            conversation_id: m.conversation_id.to_string(),
            slot: m.slot,
            epoch: m.epoch,
            seq: m.seq,
            id: m.id,
            created_at_ms: m.created_at_ms,
            sender: m.sender.to_string(),
            kind: m.kind.to_string(),
            content: m.content.clone(),
            metadata: m.metadata.clone(),
            idempotency_key: m.idempotency_key.as_deref().map(str::to_owned),
        }
    }
}

impl WireMessage {
    pub fn into_message(self) -> Result<Message, String> {
        Ok(Message {
            conversation_id: ConversationId::parse(&self.conversation_id)
                .map_err(|e| e.to_string())?,
            slot: self.slot,
            epoch: self.epoch,
            seq: self.seq,
            id: self.id,
            created_at_ms: self.created_at_ms,
            sender: ParticipantId::parse(&self.sender).map_err(|e| e.to_string())?,
            kind: self.kind.into(),
            content: self.content,
            metadata: self.metadata,
            idempotency_key: self.idempotency_key.map(Into::into),
            rendered: Default::default(),
        })
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One validated append, forwarded to the owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireAppend {
    pub sender: String,
    pub kind: String,
    pub content: Box<RawValue>,
    pub metadata: Box<RawValue>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl From<&AppendRequest> for WireAppend {
    fn from(r: &AppendRequest) -> WireAppend {
        WireAppend {
            sender: r.sender.to_string(),
            kind: r.kind.to_string(),
            content: r.content.clone(),
            metadata: r.metadata.clone(),
            idempotency_key: r.idempotency_key.as_deref().map(str::to_owned),
        }
    }
}

impl WireAppend {
    pub fn into_request(self) -> Result<AppendRequest, ApiError> {
        Ok(AppendRequest {
            sender: ParticipantId::parse(&self.sender)
                .map_err(|e| ApiError::invalid(e.to_string()))?,
            kind: self.kind.into(),
            content: self.content,
            metadata: self.metadata,
            idempotency_key: self.idempotency_key.map(Into::into),
        })
    }
}

/// Appends of one conversation, in the order the caller's client sent them.
#[derive(Debug, Serialize, Deserialize)]
pub struct AppendBatch {
    pub conversation_id: String,
    pub epoch: u64,
    /// The end user the appends come from (the owner checks membership); `None` for an API key.
    pub user: Option<String>,
    pub appends: Vec<WireAppend>,
}

/// The answer to each append of a batch, in order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum WireResult {
    Ok {
        seq: u64,
        id: Uuid,
        created_at_ms: i64,
        deduped: bool,
    },
    Err {
        error: WireError,
    },
    /// The slot left the callee before this append was taken: send it (and every later one) to
    /// the new owner.
    NotTaken,
}

impl From<&AppendOutcome> for WireResult {
    fn from(o: &AppendOutcome) -> WireResult {
        WireResult::Ok {
            seq: o.seq,
            id: o.id,
            created_at_ms: o.created_at_ms,
            deduped: o.deduped,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AppendBatchReply {
    pub results: Vec<WireResult>,
}

/// An [`ApiError`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub status: u16,
    pub message: String,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub first_available_seq: Option<u64>,
}

impl From<&ApiError> for WireError {
    fn from(e: &ApiError) -> WireError {
        WireError {
            code: e.code.as_str().to_owned(),
            status: e.status.as_u16(),
            message: e.message.clone(),
            retry_after_ms: e.retry_after_ms,
            reason: e.reason.map(str::to_owned),
            first_available_seq: e.first_available_seq,
        }
    }
}

impl From<WireError> for ApiError {
    fn from(w: WireError) -> ApiError {
        ApiError::from_parts(
            &w.code,
            StatusCode::from_u16(w.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            w.message,
            w.retry_after_ms,
            w.reason.as_deref(),
            w.first_available_seq,
        )
    }
}

/// A read of a conversation's log on its owner: messages after `after_seq` (or before
/// `before_seq`), and the owner's last durable seq. `limit = 0` asks for `last_seq` only.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReadRequest {
    pub conversation_id: String,
    pub epoch: u64,
    pub user: Option<String>,
    #[serde(default)]
    pub after_seq: Option<u64>,
    #[serde(default)]
    pub before_seq: Option<u64>,
    pub limit: usize,
}

/// `POST /internal/v1/restore`: messages `node_id` acknowledged in the conversation before its
/// slot was failed over, for the owner to write into the seqs reserved for them. The answer is
/// a [`Restored`](ferry_shards::archive::Restored).
#[derive(Debug, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub conversation_id: String,
    pub epoch: u64,
    pub node_id: String,
    pub messages: Vec<WireMessage>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReadReply {
    pub messages: Vec<WireMessage>,
    pub last_seq: u64,
}

/// Asks the owner of a slot to hand it to `target` (the rebalancer has marked it moving).
#[derive(Debug, Serialize, Deserialize)]
pub struct MoveRequest {
    pub slot: u32,
    pub epoch: u64,
    pub target: String,
}

/// Tells a node to re-read a slot's row now (it was just handed to it).
#[derive(Debug, Serialize, Deserialize)]
pub struct SlotHint {
    pub slot: u32,
}

/// An inbox entry computed by the conversation's owner.
#[derive(Debug, Serialize, Deserialize)]
pub struct InboxEntryRequest {
    pub participant: String,
    pub conversation_id: String,
    pub epoch: u64,
}

/// An inbox entry on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireInboxEntry {
    pub id: String,
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
    pub last_message: Option<WireMessage>,
}

impl From<&crate::inbox::InboxEntry> for WireInboxEntry {
    fn from(e: &crate::inbox::InboxEntry) -> WireInboxEntry {
        WireInboxEntry {
            id: e.id.clone(),
            last_seq: e.last_seq,
            read_seq: e.read_seq,
            unread: e.unread,
            last_message: e.last_message.as_deref().map(WireMessage::from),
        }
    }
}

impl WireInboxEntry {
    pub fn into_entry(self) -> Result<crate::inbox::InboxEntry, String> {
        Ok(crate::inbox::InboxEntry {
            id: self.id,
            last_seq: self.last_seq,
            read_seq: self.read_seq,
            unread: self.unread,
            last_message: self
                .last_message
                .map(|m| m.into_message().map(std::sync::Arc::new))
                .transpose()?,
        })
    }
}

/// Why a node-to-node call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The callee does not own the slot (any more).
    #[error("the peer does not own the slot")]
    Moved,
    /// The callee answered with a protocol error (to be passed on to the client).
    #[error("{}", .0.message)]
    Api(ApiError),
    /// No answer: connection refused or reset, timeout, undecodable answer.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
}

/// The client side of the node-to-node API.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    secret: String,
}

impl PeerClient {
    pub fn new(secret: String, timeout: Duration) -> PeerClient {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            // Below the peers' `limits.http_idle_timeout` (60 s by default), so a pooled connection
            // is dropped here before the peer closes it under a request.
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        PeerClient { http, secret }
    }

    /// POSTs `body` to `base_url` + `path` and decodes the answer.
    pub async fn post<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        base_url: &str,
        path: &str,
        body: &Req,
    ) -> Result<Resp, PeerError> {
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        let response = self
            .http
            .post(&url)
            .header(SECRET_HEADER, &self.secret)
            .json(body)
            .send()
            .await
            .map_err(|e| PeerError::Unreachable(format!("{url}: {e}")))?;
        let status = response.status();
        if status == reqwest::StatusCode::MISDIRECTED_REQUEST {
            return Err(PeerError::Moved);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| PeerError::Unreachable(format!("{url}: {e}")))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| PeerError::Unreachable(format!("{url}: bad answer: {e}")));
        }
        match serde_json::from_slice::<WireError>(&bytes) {
            Ok(error) => Err(PeerError::Api(error.into())),
            Err(_) => Err(PeerError::Unreachable(format!(
                "{url}: status {status} without a protocol error"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_the_wire_unchanged() {
        let e = ApiError::try_again(
            ferry_shards::node::TryAgainReason::SlotMoving,
            ferry_shards::node::TryAgainReason::SlotMoving.retry_after_ms(),
        );
        let back: ApiError = WireError::from(&e).into();
        assert_eq!(back.code, e.code);
        assert_eq!(back.status, e.status);
        assert_eq!(back.reason, Some("slot_moving"));
        assert_eq!(back.retry_after_ms, e.retry_after_ms);
        let g = ApiError::gap(3, 10);
        let back: ApiError = WireError::from(&g).into();
        assert_eq!(back.first_available_seq, Some(10));
        assert_eq!(back.body(), g.body());
    }

    #[test]
    fn messages_cross_the_wire_unchanged() {
        let m = Message {
            conversation_id: ConversationId::parse("c-1").unwrap(),
            slot: 7,
            epoch: 0,
            seq: 42,
            id: Uuid::now_v7(),
            created_at_ms: 1_790_000_000_123,
            sender: ParticipantId::parse("alice").unwrap(),
            kind: "text".into(),
            content: RawValue::from_string(r#"{"t":"hi"}"#.into()).unwrap(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
            idempotency_key: Some("k-1".into()),
            rendered: Default::default(),
        };
        let text = serde_json::to_string(&WireMessage::from(&m)).unwrap();
        let back = serde_json::from_str::<WireMessage>(&text)
            .unwrap()
            .into_message()
            .unwrap();
        assert_eq!(back.to_json(), m.to_json());
        assert_eq!(back.idempotency_key, m.idempotency_key);
        assert_eq!(back.slot, 7);
    }
}
