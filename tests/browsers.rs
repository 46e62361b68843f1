//! What browsers meet, against the real binary: CORS only for the origins `http.cors_origins`
//! lists (preflight included), SSE authenticated by `?token=` (what `EventSource` can do) and
//! ended with an `error` event when the token expires, the admin listener's framing and content
//! policies, and `limits.request_timeout` answering `try_again` (503) for requests but leaving
//! streams alone.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::TestServer;

const ALLOWED: &str = "https://app.example.com";
const SECRET: &str = "browsers-it-secret-8a1c-at-least-32-bytes";
const WAIT: Duration = Duration::from_secs(30);

fn user_token(sub: &str, exp_in_secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": sub, "exp": now + exp_in_secs}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_the_listed_origins() {
    let server = TestServer::builder()
        .env(
            "FERRY_HTTP__CORS_ORIGINS",
            &format!("{ALLOWED}, https://other.example.com"),
        )
        .start();
    server.create_conversation("c1", &["alice"]).await;
    let http = server.anonymous_client();
    let key = server.key.clone().expect("admin key");
    let url = server.url("/v1/conversations/c1/messages");

    // A simple request from a listed origin: allowed, and caches know the answer varies.
    let resp = http
        .get(&url)
        .bearer_auth(&key)
        .header("origin", ALLOWED)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(ALLOWED));
    assert!(
        header(&resp, "access-control-expose-headers")
            .is_some_and(|h| h.to_ascii_lowercase().contains("retry-after")),
        "{:?}",
        resp.headers()
    );
    assert!(resp.headers().get_all("vary").iter().any(|v| v
        .to_str()
        .unwrap_or("")
        .to_ascii_lowercase()
        .contains("origin")));
    // Another origin gets no CORS headers: the browser keeps its page out.
    let resp = http
        .get(&url)
        .bearer_auth(&key)
        .header("origin", "https://evil.example.net")
        .send()
        .await
        .expect("GET");
    assert_eq!(header(&resp, "access-control-allow-origin"), None);

    // The preflight of an append with the headers the protocol uses.
    let preflight = |origin: &str| {
        http.request(Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,idempotency-key",
            )
            .send()
    };
    let resp = preflight(ALLOWED).await.expect("preflight");
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(ALLOWED));
    let methods = header(&resp, "access-control-allow-methods").unwrap_or("");
    assert!(methods.contains("POST"), "{methods}");
    let allowed = header(&resp, "access-control-allow-headers")
        .unwrap_or("")
        .to_ascii_lowercase();
    for h in [
        "authorization",
        "content-type",
        "idempotency-key",
        "last-event-id",
    ] {
        assert!(allowed.contains(h), "{h} in {allowed}");
    }
    let resp = preflight("https://evil.example.net")
        .await
        .expect("preflight");
    // Without Allow-Origin the browser refuses the request, whatever else the answer lists.
    assert_eq!(header(&resp, "access-control-allow-origin"), None);

    // The append itself, from the listed origin.
    let resp = http
        .post(&url)
        .bearer_auth(&key)
        .header("origin", ALLOWED)
        .header("idempotency-key", "k1")
        .json(&json!({"sender": "alice", "content": "from a page"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(ALLOWED));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cors_origins_no_origin_is_allowed_and_admin_pages_forbid_framing() {
    let server = TestServer::start();
    let resp = server
        .anonymous_client()
        .request(Method::OPTIONS, server.url("/v1/conversations/c1/messages"))
        .header("origin", ALLOWED)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(header(&resp, "access-control-allow-origin"), None);

    let admin = server.anonymous_client();
    for path in [
        "/dashboard",
        "/metrics",
        "/healthz",
        "/admin/cluster",
        "/nope",
    ] {
        let resp = admin
            .get(server.admin_url(path))
            .send()
            .await
            .expect("admin GET");
        assert_eq!(header(&resp, "x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            header(&resp, "x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        let csp = header(&resp, "content-security-policy").unwrap_or("");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        if path == "/dashboard" {
            // Its one inline script is allowed by hash, nothing inline beyond it.
            assert!(csp.contains("script-src 'sha256-"), "{csp}");
            assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
            assert!(csp.contains("connect-src 'self'"), "{csp}");
            assert_eq!(resp.status(), StatusCode::OK);
        }
    }
}

/// One server-sent event: (event, id, data).
type SseEvent = (String, Option<String>, String);

/// Reads events off an SSE response; `None` once the stream has ended.
struct Sse {
    body: reqwest::Response,
    buffer: String,
}

impl Sse {
    fn new(body: reqwest::Response) -> Sse {
        Sse {
            body,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = ("message".to_owned(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() && id.is_none() {
                    continue; // a keep-alive comment
                }
                return Some((event, id, data));
            }
            match tokio::time::timeout(WAIT, self.body.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no SSE event within {WAIT:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_takes_a_query_token_and_ends_when_it_expires() {
    let server = TestServer::builder()
        .env("FERRY_JWT_SECRET", SECRET)
        .env("FERRY_AUTH__JWT_LEEWAY", "0")
        .start();
    server.create_conversation("s1", &["alice"]).await;
    server.create_conversation("s2", &["bob"]).await;
    server.append("s1", "bob", json!("one")).await;
    let http = server.anonymous_client();
    let stream_url = |conversation: &str, token: &str| {
        server.url(&format!(
            "/v1/conversations/{conversation}/stream?token={token}"
        ))
    };

    // A bad or foreign token in the query is refused like one in the header.
    let resp = http
        .get(stream_url("s1", "not-a-token"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http
        .get(stream_url("s2", &user_token("alice", 600)))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // A token that expires in a few seconds: replay, live, then one error event and the end.
    let resp = http
        .get(stream_url("s1", &user_token("alice", 6)))
        .send()
        .await
        .expect("GET stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = Sse::new(resp);
    let first = sse.next().await.expect("replayed message");
    assert_eq!(
        (first.0.as_str(), first.1.as_deref()),
        ("message", Some("1"))
    );
    server.append("s1", "bob", json!("two")).await;
    let second = sse.next().await.expect("live message");
    assert_eq!(second.1.as_deref(), Some("2"));
    let last = sse.next().await.expect("an event at expiry");
    assert_eq!(last.0, "error", "{last:?}");
    let body: Value = serde_json::from_str(&last.2).expect("JSON");
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(body["message"], "token expired");
    assert!(sse.next().await.is_none(), "the stream ends after it");
    server
        .wait_metric(
            "ferry_token_expired_closes_total",
            &[("transport", "sse")],
            1.0,
            WAIT,
        )
        .await;
}

/// Sends `head` and the start of a body that never completes; returns the raw answer.
async fn stalled_upload(server: &TestServer, path: &str) -> String {
    let key = server.key.clone().expect("admin key");
    let mut socket = tokio::net::TcpStream::connect(server.listen)
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: ferry\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"sender\":"
    );
    socket.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is complete once its JSON body has arrived (the server may keep the
    // connection open, waiting for the rest of the upload).
    loop {
        let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .expect("an answer within WAIT")
            .expect("read");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if n == 0
            || text
                .split_once("\r\n\r\n")
                .is_some_and(|(_, b)| b.ends_with('}'))
        {
            return text.into_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_answered_in_time_is_try_again_but_streams_are_not_cut() {
    let server = TestServer::builder()
        .env("FERRY_LIMITS__REQUEST_TIMEOUT", "500ms")
        .start();
    server.create_conversation("t1", &["alice"]).await;
    let key = server.key.clone().expect("admin key");

    // A stream opened before the slow request, outliving its timeout.
    let resp = server
        .anonymous_client()
        .get(server.url("/v1/conversations/t1/stream"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("GET stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = Sse::new(resp);

    let answer = stalled_upload(&server, "/v1/conversations/t1/messages").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(body["error"], "try_again", "{body}");
    assert_eq!(body["detail"], "timeout", "{body}");
    assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");

    // The stream, older than the timed-out request, still delivers.
    server
        .append("t1", "alice", json!("after the timeout"))
        .await;
    let event = sse.next().await.expect("the stream is still open");
    assert_eq!(
        (event.0.as_str(), event.1.as_deref()),
        ("message", Some("1"))
    );
}
