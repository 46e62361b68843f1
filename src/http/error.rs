//! The one place errors become protocol answers: `{error: CODE, message, ...}` with the status
//! PROTOCOL.md assigns to CODE. Nothing a client or the disk can cause becomes a 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use ferry_shards::node::{NodeError, TryAgainReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Invalid,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    TryAgain,
    Gap,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Invalid => "invalid",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::TooLarge => "too_large",
            Code::TryAgain => "try_again",
            Code::Gap => "gap",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Code,
    pub status: StatusCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    pub reason: Option<&'static str>,
    pub first_available_seq: Option<u64>,
}

impl ApiError {
    fn new(code: Code, status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            status,
            message: message.into(),
            retry_after_ms: None,
            reason: None,
            first_available_seq: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Invalid, StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Unauthorized, StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Forbidden, StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::NotFound, StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Conflict, StatusCode::CONFLICT, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::TooLarge, StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// 410: the cursor is older than retention; history resumes at `first_available_seq`.
    pub fn gap(after_seq: u64, first_available_seq: u64) -> ApiError {
        let mut e = ApiError::new(
            Code::Gap,
            StatusCode::GONE,
            format!(
                "messages after seq {after_seq} up to {} expired; history starts at seq {first_available_seq}",
                first_available_seq - 1
            ),
        );
        e.first_available_seq = Some(first_available_seq);
        e
    }

    /// Rebuilds an error another node answered with (see `cluster::peer::WireError`).
    pub fn from_parts(
        code: &str,
        status: StatusCode,
        message: String,
        retry_after_ms: Option<u64>,
        reason: Option<&str>,
        first_available_seq: Option<u64>,
    ) -> ApiError {
        let code = match code {
            "invalid" => Code::Invalid,
            "unauthorized" => Code::Unauthorized,
            "forbidden" => Code::Forbidden,
            "not_found" => Code::NotFound,
            "conflict" => Code::Conflict,
            "too_large" => Code::TooLarge,
            "gap" => Code::Gap,
            _ => Code::TryAgain,
        };
        ApiError {
            code,
            status,
            message,
            retry_after_ms,
            reason: reason.and_then(known_reason),
            first_available_seq,
        }
    }

    /// 429 for overload the caller can wait out, 503 when this node cannot serve at all.
    pub fn try_again(reason: TryAgainReason, retry_after_ms: u64) -> ApiError {
        let status = match reason {
            TryAgainReason::Unavailable
            | TryAgainReason::ArchiveBacklog
            | TryAgainReason::OwnerUnavailable
            | TryAgainReason::DiskFull => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut e = ApiError::new(
            Code::TryAgain,
            status,
            format!("overloaded ({}), retry later", reason.as_str()),
        );
        e.retry_after_ms = Some(retry_after_ms);
        e.reason = Some(reason.as_str());
        e
    }

    /// 429 past a `[rate]` limit (`limit` names it in the message; `detail` is `rate_limited`).
    pub fn rate_limited(limit: &str, retry_after_ms: u64) -> ApiError {
        let mut e = ApiError::new(
            Code::TryAgain,
            StatusCode::TOO_MANY_REQUESTS,
            format!("rate limited ({limit}), retry later"),
        );
        e.retry_after_ms = Some(retry_after_ms);
        e.reason = Some("rate_limited");
        e
    }

    /// 429: the principal has `max` sockets open on this node already.
    pub fn too_many_sockets(max: usize) -> ApiError {
        let mut e = ApiError::new(
            Code::TryAgain,
            StatusCode::TOO_MANY_REQUESTS,
            format!("at most {max} sockets and streams may be open per principal"),
        );
        e.retry_after_ms = Some(1000);
        e.reason = Some("too_many_sockets");
        e
    }

    /// A socket joining more topics than `limits.max_topics_per_socket`.
    pub fn too_many_topics(max: usize) -> ApiError {
        let mut e = ApiError::invalid(format!("a socket may join at most {max} topics"));
        e.reason = Some("too_many_topics");
        e
    }

    /// A failure inside the node (database, peer, disk): its detail goes to the log with
    /// `context`, the client gets a generic `try_again` (503).
    pub fn internal(context: &'static str, detail: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %detail, "request failed: {context}");
        ApiError::unavailable(format!("{context}, retry later"))
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::try_again(TryAgainReason::Unavailable, 1000);
        e.message = message.into();
        e
    }

    /// The JSON body (also the `response` of a WebSocket error reply, with `reason` = code).
    pub fn body(&self) -> serde_json::Value {
        let mut body = json!({ "error": self.code.as_str(), "message": self.message });
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = json!(ms);
        }
        if let Some(reason) = self.reason {
            body["detail"] = json!(reason);
        }
        if let Some(seq) = self.first_available_seq {
            body["first_available_seq"] = json!(seq);
        }
        body
    }
}

/// The `detail` values this node can send, as static strings (an error crossing from another node
/// names one of them).
fn known_reason(reason: &str) -> Option<&'static str> {
    const REASONS: &[&str] = &[
        "mailbox_full",
        "wal_full",
        "archive_backlog",
        "restarting",
        "unavailable",
        "slot_moving",
        "owner_unavailable",
        "socket_in_flight",
        "not_joined",
        "unknown_event",
        "activating",
        "rate_limited",
        "too_many_topics",
        "too_many_sockets",
        "disk_full",
        "timeout",
    ];
    REASONS.iter().find(|r| **r == reason).copied()
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> ApiError {
        match e {
            NodeError::NotFound => ApiError::not_found("conversation not found"),
            NodeError::TryAgain {
                reason,
                retry_after_ms,
            } => ApiError::try_again(reason, retry_after_ms),
            // Only reaches a client when routing gave up (the slot kept moving).
            NodeError::NotOwner { .. } => ApiError::try_again(
                TryAgainReason::SlotMoving,
                TryAgainReason::SlotMoving.retry_after_ms(),
            ),
            // WAL, archive and decoding errors name files, SQL and OS errors: the operator's log
            // gets them, the client a code it can act on.
            other => {
                tracing::warn!(error = %other, "request failed: node unavailable");
                ApiError::unavailable("this node cannot serve the request now, retry later")
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        // The detail (SQL, database names, file paths) stays in the log.
        tracing::warn!(error = %e, "request failed: database unavailable");
        ApiError::unavailable("database unavailable, retry later")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::count_http_error(self.code.as_str());
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Internal detail — file paths, OS errors, SQL — is logged, never sent.
    #[test]
    fn internal_errors_reach_clients_without_their_detail() {
        let secrets = ["/var/lib/ferry", "No space left", "SELECT", "ferry_test_db"];
        let node = NodeError::Unavailable(
            "wal io error: write /var/lib/ferry/wal/00000000000000000001.wal: No space left on device"
                .into(),
        );
        let store = crate::store::StoreError::Db(sqlx::Error::Protocol(
            "SELECT seq FROM messages WHERE conversation_id = $1 (database ferry_test_db)".into(),
        ));
        for e in [ApiError::from(node), ApiError::from(store)] {
            let body = e.body().to_string();
            assert_eq!(e.code, Code::TryAgain, "{body}");
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(e.retry_after_ms.is_some(), "{body}");
            for secret in secrets {
                assert!(!body.contains(secret), "{secret:?} leaked: {body}");
            }
        }
    }

    #[test]
    fn a_full_disk_is_try_again_503_with_its_reason() {
        let e = ApiError::from(NodeError::try_again(TryAgainReason::DiskFull));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = e.body();
        assert_eq!(body["error"], "try_again");
        assert_eq!(body["detail"], "disk_full");
        assert_eq!(body["retry_after_ms"], 1000);
        assert_eq!(known_reason("disk_full"), Some("disk_full"));
    }
}
