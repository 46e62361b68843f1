//! The real-time HTTP surface of the real binary: JWT end users (HS256 and RS256) confined to
//! their own conversations and inbox, read cursors and unread counts (across the SQL/ring
//! boundary and kill -9), and the SSE tail (replay, live, `Last-Event-ID` resume).
//!
//! SSE is parsed here by hand from `Response::chunk()` (per the EventSource spec: `\r\n`, `\n`
//! and a lone `\r` all end a line; multi-line `data` is joined with `\n`). Every wait is bounded
//! by a deadline. To make the SQL archive lag on purpose, one test installs a trigger in the
//! server's SQLite file that makes inserts into `messages` fail (and later drops it).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};

use common::{expect_error, seq_of, TestServer, API_KEY};

const HS_SECRET: &str = "it-jwt-secret-0d5e1b7c-at-least-32-bytes";
/// How long any single expected SSE event may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

// ----- small helpers -----

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode HS256 token")
}

fn rs256(private_pem: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(private_pem).expect("RSA private key PEM"),
    )
    .expect("encode RS256 token")
}

/// Claims for `sub` valid for the next hour.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iat": now_secs(), "exp": now_secs() + 3600 })
}

/// Unpadded base64url, for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A request on the public listener carrying `Bearer <token>` (no credentials when `None`).
fn req(server: &TestServer, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
    let rb = server.anonymous_client().request(method, server.url(path));
    match token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
}

/// Sends and returns (status, JSON body); a non-JSON body fails the test with its text.
async fn send(rb: RequestBuilder, what: &str) -> (u16, Value) {
    let resp = rb.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {status} {text:?}"));
    (status, body)
}

async fn send_ok(rb: RequestBuilder, status: u16, what: &str) -> Value {
    let (got, body) = send(rb, what).await;
    assert_eq!(got, status, "{what}: {body}");
    body
}

/// One message by seq, read with the admin key.
async fn message_at(server: &TestServer, conversation: &str, seq: u64) -> Value {
    let page = server
        .page(conversation, &format!("after_seq={}&limit=1", seq - 1))
        .await;
    assert_eq!(page.seqs(), vec![seq], "message {seq} of {conversation}");
    page.messages[0].clone()
}

async fn inbox(server: &TestServer, participant: &str) -> Value {
    send_ok(
        req(
            server,
            Method::GET,
            &format!("/v1/participants/{participant}/inbox"),
            Some(API_KEY),
        ),
        200,
        &format!("inbox of {participant}"),
    )
    .await
}

/// The inbox entry for `conversation`, which must be listed exactly once.
fn entry<'a>(inbox: &'a Value, conversation: &str) -> &'a Value {
    let list = inbox["conversations"]
        .as_array()
        .unwrap_or_else(|| panic!("inbox without conversations array: {inbox}"));
    let found: Vec<&Value> = list.iter().filter(|e| e["id"] == conversation).collect();
    assert_eq!(found.len(), 1, "{conversation} once in inbox {inbox}");
    found[0]
}

fn inbox_ids(inbox: &Value) -> Vec<String> {
    let mut ids: Vec<String> = inbox["conversations"]
        .as_array()
        .unwrap_or_else(|| panic!("inbox without conversations array: {inbox}"))
        .iter()
        .map(|e| e["id"].as_str().expect("entry id").to_owned())
        .collect();
    ids.sort();
    ids
}

// ----- SSE client -----

#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: String,
}

/// A minimal EventSource-spec parser over a live response.
struct SseStream {
    resp: Response,
    buf: Vec<u8>,
    ended: bool,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl SseStream {
    /// Opens the stream (asserting 200 `text/event-stream`).
    async fn open(
        server: &TestServer,
        conversation: &str,
        query: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> SseStream {
        let path = format!("/v1/conversations/{conversation}/stream{query}");
        // No whole-request timeout: the body is read for as long as the test needs, and every
        // read below has its own deadline.
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let mut rb = client
            .get(server.url(&path))
            .bearer_auth(token)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id);
        }
        let resp = tokio::time::timeout(EVENT_TIMEOUT, rb.send())
            .await
            .unwrap_or_else(|_| panic!("GET {path}: no response headers within {EVENT_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            panic!("GET {path}: expected 200, got {status} {text}");
        }
        assert!(
            ctype.starts_with("text/event-stream"),
            "GET {path}: content-type {ctype:?}"
        );
        SseStream {
            resp,
            buf: Vec::new(),
            ended: false,
            id: None,
            event: None,
            data: None,
        }
    }

    /// The next complete line in the buffer, if its end is unambiguous.
    fn take_line(&mut self) -> Option<String> {
        let pos = self.buf.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let skip = if self.buf[pos] == b'\r' {
            match self.buf.get(pos + 1) {
                Some(b'\n') => 2,
                Some(_) => 1,
                // A `\r` at the end may be the first half of `\r\n`: wait for more.
                None if !self.ended => return None,
                None => 1,
            }
        } else {
            1
        };
        let line = String::from_utf8(self.buf[..pos].to_vec()).expect("SSE is UTF-8");
        self.buf.drain(..pos + skip);
        Some(line)
    }

    /// Feeds one line; returns an event when a blank line completes one with data.
    fn feed(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let id = self.id.take();
            let event = self.event.take();
            let data = self.data.take()?;
            return Some(SseEvent {
                id,
                event: event.unwrap_or_else(|| "message".to_owned()),
                data,
            });
        }
        if line.starts_with(':') {
            return None; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
        None
    }

    /// The next event, failing the test if none arrives by `deadline`.
    async fn next(&mut self, deadline: Instant, what: &str) -> SseEvent {
        loop {
            while let Some(line) = self.take_line() {
                if let Some(event) = self.feed(&line) {
                    return event;
                }
            }
            assert!(!self.ended, "{what}: SSE stream ended");
            let chunk = tokio::time::timeout_at(deadline.into(), self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("{what}: no SSE event before the deadline"))
                .unwrap_or_else(|e| panic!("{what}: SSE read failed: {e}"));
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => self.ended = true,
            }
        }
    }

    /// Asserts that the stream ends (EOF or a broken connection) by `deadline`, with no further
    /// event.
    async fn expect_end(&mut self, deadline: Instant, what: &str) {
        loop {
            while let Some(line) = self.take_line() {
                if let Some(event) = self.feed(&line) {
                    panic!("{what}: expected the stream to end, got {event:?}");
                }
            }
            if self.ended {
                return;
            }
            match tokio::time::timeout_at(deadline.into(), self.resp.chunk()).await {
                Err(_) => panic!("{what}: SSE stream still open at the deadline"),
                Ok(Err(_)) | Ok(Ok(None)) => self.ended = true,
                Ok(Ok(Some(bytes))) => self.buf.extend_from_slice(&bytes),
            }
        }
    }

    /// The next `message` event; asserts its shape (`id` = seq, data = message JSON).
    async fn next_message(&mut self, conversation: &str, what: &str) -> Value {
        let event = self.next(Instant::now() + EVENT_TIMEOUT, what).await;
        assert_eq!(event.event, "message", "{what}: event type of {event:?}");
        let message: Value = serde_json::from_str(&event.data)
            .unwrap_or_else(|e| panic!("{what}: data is not JSON ({e}): {event:?}"));
        assert_eq!(
            event.id.as_deref(),
            Some(seq_of(&message).to_string().as_str()),
            "{what}: SSE id must be the seq: {event:?}"
        );
        assert_eq!(message["conversation_id"], conversation, "{what}");
        message
    }

    /// Exactly the messages `seqs`, in order; returns them.
    async fn expect_seqs(
        &mut self,
        conversation: &str,
        seqs: std::ops::RangeInclusive<u64>,
        what: &str,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        for want in seqs {
            let m = self.next_message(conversation, what).await;
            assert_eq!(
                seq_of(&m),
                want,
                "{what}: expected seq {want} next (gap or repeat)"
            );
            out.push(m);
        }
        out
    }
}

// ----- 1. JWT -----

/// HS256 end users: confined to the conversations that list them, always send as themselves,
/// cannot create conversations or read others' inboxes; bad tokens are 401; API keys keep
/// working for everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_hs256_users_are_confined_to_their_conversations() {
    let server = TestServer::builder()
        .env("FERRY_JWT_SECRET", HS_SECRET)
        .start();
    let key = Some(API_KEY);
    server
        .create_conversation("conv-x", &["alice", "carol"])
        .await;
    server.create_conversation("conv-y", &["bob"]).await;
    server.append("conv-x", "carol", json!("hi alice")).await;
    server.append("conv-y", "bob", json!("bob alone")).await;

    let alice = hs256(HS_SECRET, &claims("alice"));
    let a = Some(alice.as_str());

    // Allowed in X.
    let conv = send_ok(
        req(&server, Method::GET, "/v1/conversations/conv-x", a),
        200,
        "GET X",
    )
    .await;
    assert_eq!(conv["id"], "conv-x");
    assert_eq!(conv["last_seq"], 1);
    let page = send_ok(
        req(&server, Method::GET, "/v1/conversations/conv-x/messages", a),
        200,
        "GET X messages",
    )
    .await;
    assert_eq!(page["messages"][0]["content"], "hi alice");
    let ack = send_ok(
        req(
            &server,
            Method::POST,
            "/v1/conversations/conv-x/messages",
            a,
        )
        .json(&json!({ "sender": "carol", "content": "I am not carol" })),
        201,
        "alice posts naming carol",
    )
    .await;
    assert_eq!(ack["seq"], 2);
    assert_eq!(
        message_at(&server, "conv-x", 2).await["sender"],
        "alice",
        "a JWT user always sends as its sub"
    );
    let ack = send_ok(
        req(
            &server,
            Method::POST,
            "/v1/conversations/conv-x/messages",
            a,
        )
        .json(&json!({ "content": "no sender given" })),
        201,
        "alice posts without sender",
    )
    .await;
    assert_eq!(ack["seq"], 3);
    assert_eq!(message_at(&server, "conv-x", 3).await["sender"], "alice");

    let read = send_ok(
        req(&server, Method::POST, "/v1/conversations/conv-x/read", a)
            .json(&json!({ "participant": "carol", "seq": 1 })),
        200,
        "alice marks read naming carol",
    )
    .await;
    assert_eq!(
        read,
        json!({ "participant": "alice", "seq": 1, "unread": 0 }),
        "a JWT user's cursor is its own"
    );
    let carol = inbox(&server, "carol").await;
    assert_eq!(
        entry(&carol, "conv-x")["read_seq"],
        0,
        "carol's cursor must not move: {carol}"
    );
    assert_eq!(entry(&carol, "conv-x")["unread"], 2, "alice's 2 messages");

    let mut sse = SseStream::open(&server, "conv-x", "?after_seq=0", &alice, None).await;
    sse.expect_seqs("conv-x", 1..=3, "alice's SSE on X").await;
    drop(sse);

    // Forbidden in Y, on every route.
    let y_attempts: Vec<(&str, RequestBuilder)> = vec![
        (
            "GET Y",
            req(&server, Method::GET, "/v1/conversations/conv-y", a),
        ),
        (
            "GET Y messages",
            req(&server, Method::GET, "/v1/conversations/conv-y/messages", a),
        ),
        (
            "GET Y messages backwards",
            req(
                &server,
                Method::GET,
                "/v1/conversations/conv-y/messages?before_seq=10",
                a,
            ),
        ),
        (
            "POST Y messages",
            req(
                &server,
                Method::POST,
                "/v1/conversations/conv-y/messages",
                a,
            )
            .json(&json!({ "content": "intrusion" })),
        ),
        (
            "POST Y messages as bob",
            req(
                &server,
                Method::POST,
                "/v1/conversations/conv-y/messages",
                a,
            )
            .json(&json!({ "sender": "bob", "content": "intrusion" })),
        ),
        (
            "SSE Y",
            req(
                &server,
                Method::GET,
                "/v1/conversations/conv-y/stream?after_seq=0",
                a,
            ),
        ),
        (
            "POST Y read",
            req(&server, Method::POST, "/v1/conversations/conv-y/read", a)
                .json(&json!({ "seq": 1 })),
        ),
        (
            "POST Y read as bob",
            req(&server, Method::POST, "/v1/conversations/conv-y/read", a)
                .json(&json!({ "participant": "bob", "seq": 1 })),
        ),
    ];
    for (what, rb) in y_attempts {
        let resp = rb.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        expect_error(resp, 403, "forbidden", &format!("alice: {what}")).await;
    }
    let y = server.page("conv-y", "after_seq=0").await;
    assert_eq!(y.last_seq, 1, "nothing was appended to Y by alice");
    let bob_inbox = inbox(&server, "bob").await;
    assert_eq!(entry(&bob_inbox, "conv-y")["read_seq"], 0, "{bob_inbox}");

    // Users cannot create or change conversations.
    for (path, what) in [
        ("/v1/conversations/conv-y", "PUT existing Y"),
        ("/v1/conversations/conv-x", "PUT own X"),
        ("/v1/conversations/conv-new", "PUT new"),
    ] {
        let resp = req(&server, Method::PUT, path, a)
            .json(&json!({ "participants": ["alice", "bob"] }))
            .send()
            .await
            .expect(what);
        expect_error(resp, 403, "forbidden", &format!("alice: {what}")).await;
    }
    let resp = req(&server, Method::GET, "/v1/conversations/conv-new", key)
        .send()
        .await
        .expect("GET conv-new");
    expect_error(resp, 404, "not_found", "conv-new must not exist").await;
    let y_meta = send_ok(
        req(&server, Method::GET, "/v1/conversations/conv-y", key),
        200,
        "Y",
    )
    .await;
    assert_eq!(y_meta["participants"], json!(["bob"]), "Y unchanged");

    // Inboxes: only its own.
    let resp = req(&server, Method::GET, "/v1/participants/bob/inbox", a)
        .send()
        .await
        .expect("bob inbox");
    expect_error(resp, 403, "forbidden", "alice reads bob's inbox").await;
    let own = send_ok(
        req(&server, Method::GET, "/v1/participants/alice/inbox", a),
        200,
        "alice's own inbox",
    )
    .await;
    assert_eq!(inbox_ids(&own), vec!["conv-x"], "{own}");
    assert_eq!(entry(&own, "conv-x")["read_seq"], 1);
    assert_eq!(
        entry(&own, "conv-x")["unread"],
        0,
        "own messages are not unread"
    );

    // Tokens that must not authenticate.
    let now = now_secs();
    let valid_parts: Vec<&str> = alice.split('.').collect();
    let bob_forged = hs256("some-other-secret", &claims("bob"));
    let bob_payload = bob_forged.split('.').nth(1).expect("payload");
    let none_header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let alice_payload = b64url(claims("alice").to_string().as_bytes());
    let bad_tokens: Vec<(String, &str)> = vec![
        (
            hs256(HS_SECRET, &json!({ "sub": "alice", "exp": now - 3600 })),
            "expired",
        ),
        (
            hs256(
                HS_SECRET,
                &json!({ "sub": "alice", "nbf": now + 3600, "exp": now + 7200 }),
            ),
            "not yet valid",
        ),
        (hs256("some-other-secret", &claims("alice")), "wrong secret"),
        (
            format!("{}.{}.{}", valid_parts[0], bob_payload, valid_parts[2]),
            "payload swapped under alice's signature",
        ),
        (format!("{none_header}.{alice_payload}."), "alg none"),
        (
            format!("{none_header}.{alice_payload}.{}", valid_parts[2]),
            "alg none with a signature",
        ),
        (hs256(HS_SECRET, &json!({ "exp": now + 3600 })), "no sub"),
        (
            hs256(HS_SECRET, &json!({ "sub": "bad sub!", "exp": now + 3600 })),
            "invalid sub",
        ),
        (
            hs256(HS_SECRET, &json!({ "sub": "", "exp": now + 3600 })),
            "empty sub",
        ),
        ("aaa.bbb.ccc".to_owned(), "garbage with dots"),
        (format!("{alice}x"), "truncated/extended signature"),
        ("not-a-key".to_owned(), "unknown api key"),
    ];
    for (token, what) in &bad_tokens {
        for (method, path) in [
            (Method::GET, "/v1/conversations/conv-x/messages"),
            (Method::GET, "/v1/conversations/conv-x/stream"),
            (Method::GET, "/v1/participants/alice/inbox"),
        ] {
            let resp = req(&server, method.clone(), path, Some(token))
                .send()
                .await
                .expect(what);
            expect_error(
                resp,
                401,
                "unauthorized",
                &format!("{what}: {method} {path}"),
            )
            .await;
        }
        let resp = req(
            &server,
            Method::POST,
            "/v1/conversations/conv-x/messages",
            Some(token),
        )
        .json(&json!({ "content": "should not land" }))
        .send()
        .await
        .expect(what);
        expect_error(resp, 401, "unauthorized", &format!("{what}: POST message")).await;
    }
    let resp = req(
        &server,
        Method::GET,
        "/v1/conversations/conv-x/stream",
        None,
    )
    .send()
    .await
    .expect("anonymous SSE");
    expect_error(resp, 401, "unauthorized", "SSE without credentials").await;
    assert_eq!(
        server.page("conv-x", "after_seq=0").await.last_seq,
        3,
        "no rejected token appended anything"
    );

    // API keys keep working for everything while JWTs are enabled.
    let resp = req(&server, Method::PUT, "/v1/conversations/conv-z", key)
        .json(&json!({ "participants": ["bob", "dave"] }))
        .send()
        .await
        .expect("PUT Z");
    assert_eq!(resp.status().as_u16(), 201, "API key creates Z");
    for (conv, sender) in [("conv-y", "bob"), ("conv-x", "carol"), ("conv-z", "dave")] {
        let ack = send_ok(
            req(
                &server,
                Method::POST,
                &format!("/v1/conversations/{conv}/messages"),
                key,
            )
            .json(&json!({ "sender": sender, "content": "via key" })),
            201,
            "API key append",
        )
        .await;
        let seq = ack["seq"].as_u64().expect("seq");
        assert_eq!(message_at(&server, conv, seq).await["sender"], sender);
    }
    let y = send_ok(
        req(&server, Method::GET, "/v1/conversations/conv-y", key),
        200,
        "GET Y",
    )
    .await;
    assert_eq!(y["last_seq"], 2);
    let read = send_ok(
        req(&server, Method::POST, "/v1/conversations/conv-y/read", key)
            .json(&json!({ "participant": "bob", "seq": 1 })),
        200,
        "API key marks bob's read",
    )
    .await;
    assert_eq!(read, json!({ "participant": "bob", "seq": 1, "unread": 0 }));
    let bob_inbox = inbox(&server, "bob").await;
    assert_eq!(inbox_ids(&bob_inbox), vec!["conv-y", "conv-z"]);
    assert_eq!(entry(&bob_inbox, "conv-z")["unread"], 1, "{bob_inbox}");
    let mut sse = SseStream::open(&server, "conv-y", "?after_seq=0", API_KEY, None).await;
    sse.expect_seqs("conv-y", 1..=2, "API key SSE on Y").await;

    // Adding alice to Y takes effect at once (no stale membership), and Y joins her inbox.
    server.create_conversation("conv-y", &["alice"]).await;
    let page = send_ok(
        req(&server, Method::GET, "/v1/conversations/conv-y/messages", a),
        200,
        "alice reads Y once added",
    )
    .await;
    assert_eq!(page["last_seq"], 2);
    let own = send_ok(
        req(&server, Method::GET, "/v1/participants/alice/inbox", a),
        200,
        "alice's inbox after being added to Y",
    )
    .await;
    assert_eq!(inbox_ids(&own), vec!["conv-x", "conv-y"], "{own}");
    assert_eq!(entry(&own, "conv-y")["unread"], 2, "{own}");
    let mut sse = SseStream::open(&server, "conv-y", "?after_seq=1", &alice, None).await;
    sse.expect_seqs("conv-y", 2..=2, "alice's SSE on Y once added")
        .await;
    drop(sse);

    // Unknown and invalid inbox owners.
    let zed = inbox(&server, "zed").await;
    assert_eq!(zed, json!({ "conversations": [], "has_more": false }));
    let resp = req(&server, Method::GET, "/v1/participants/bad%20id/inbox", key)
        .send()
        .await
        .expect("bad inbox id");
    expect_error(resp, 400, "invalid", "inbox of an invalid participant id").await;

    // And bob, with his own token, is allowed where alice was not.
    let bob = hs256(HS_SECRET, &claims("bob"));
    let b = Some(bob.as_str());
    send_ok(
        req(&server, Method::GET, "/v1/conversations/conv-y/messages", b),
        200,
        "bob Y",
    )
    .await;
    let resp = req(&server, Method::GET, "/v1/conversations/conv-x/messages", b)
        .send()
        .await
        .expect("bob X");
    expect_error(resp, 403, "forbidden", "bob reads X").await;
}

/// Tokens from real identity providers carry `iss` and `aud` (and `iat`, `jti`, ...). No
/// audience is configured, so a correctly signed, unexpired token with a valid `sub` must be
/// accepted whatever its `aud` says (PROTOCOL.md: 401 only for missing, unknown, expired or
/// badly signed credentials).
/// With JWTs enabled, a token of three dot-separated parts that is no valid JWT may still be an
/// API key; one that is neither stays a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_shaped_like_a_jwt_still_work_when_jwts_are_enabled() {
    const DOTTED: &str = "it.dotted.admin-key";
    let server = TestServer::builder()
        .env("FERRY_JWT_SECRET", HS_SECRET)
        .bootstrap_key(DOTTED)
        .start();
    let conv = send_ok(
        req(&server, Method::PUT, "/v1/conversations/dots", Some(DOTTED))
            .json(&json!({"participants": ["alice"]})),
        201,
        "PUT with the dotted key",
    )
    .await;
    assert_eq!(conv["id"], "dots");
    let alice = hs256(HS_SECRET, &claims("alice"));
    send_ok(
        req(&server, Method::GET, "/v1/conversations/dots", Some(&alice)),
        200,
        "a JWT user next to it",
    )
    .await;
    let (status, body) = send(
        req(
            &server,
            Method::GET,
            "/v1/conversations/dots",
            Some("it.other.key"),
        ),
        "neither a JWT nor a key",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_with_standard_iss_and_aud_claims_is_accepted() {
    let server = TestServer::builder()
        .env("FERRY_JWT_SECRET", HS_SECRET)
        .start();
    server.create_conversation("idp", &["alice"]).await;
    let now = now_secs();
    for (claims, what) in [
        (
            json!({ "sub": "alice", "iss": "https://idp.example.com/", "iat": now, "exp": now + 600,
                    "jti": "abc123" }),
            "iss, iat, jti",
        ),
        (
            json!({ "sub": "alice", "aud": "ferry", "exp": now + 600 }),
            "aud string",
        ),
        (
            json!({ "sub": "alice", "aud": ["ferry", "https://api.example.com"],
                    "iss": "https://idp.example.com/", "exp": now + 600 }),
            "aud array",
        ),
    ] {
        let token = hs256(HS_SECRET, &claims);
        let (status, body) = send(
            req(
                &server,
                Method::GET,
                "/v1/conversations/idp/messages",
                Some(&token),
            ),
            what,
        )
        .await;
        assert_eq!(
            status, 200,
            "a valid token with {what} ({claims}) must be accepted: {body}"
        );
    }
}

/// Generates an RSA key pair with `openssl` into `dir`: (private PEM, public PEM).
fn rsa_key_pair(dir: &Path, name: &str) -> (Vec<u8>, String) {
    let private = dir.join(format!("{name}.key.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("RS256 coverage needs the `openssl` command on PATH to generate keys: {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = private.to_str().expect("utf-8 path");
    run(&["genrsa", "-out", p, "2048"]);
    run(&[
        "rsa",
        "-in",
        p,
        "-pubout",
        "-out",
        public.to_str().expect("utf-8 path"),
    ]);
    (
        std::fs::read(&private).expect("read private key"),
        std::fs::read_to_string(&public).expect("read public key"),
    )
}

/// RS256 end users via `FERRY_JWT_PUBLIC_KEY` (PEM text): a token from the matching private key
/// works with the same confinement; one from another key, or an HS256 token (also one keyed
/// with the public PEM: algorithm confusion), is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_rs256_public_key_verifies_tokens() {
    let keys = tempfile::Builder::new()
        .prefix("ferry-it-rsa-")
        .tempdir()
        .expect("temp dir");
    let (private, public) = rsa_key_pair(keys.path(), "server");
    let (other_private, _) = rsa_key_pair(keys.path(), "other");
    assert!(public.starts_with("-----BEGIN"), "PEM text: {public}");

    let server = TestServer::builder()
        .env("FERRY_JWT_PUBLIC_KEY", &public)
        .start();
    server.create_conversation("rx", &["alice"]).await;
    server.create_conversation("ry", &["bob"]).await;

    let alice = rs256(&private, &claims("alice"));
    let a = Some(alice.as_str());
    let ack = send_ok(
        req(&server, Method::POST, "/v1/conversations/rx/messages", a)
            .json(&json!({ "sender": "bob", "content": "signed with RS256" })),
        201,
        "RS256 alice posts",
    )
    .await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(message_at(&server, "rx", 1).await["sender"], "alice");
    let page = send_ok(
        req(&server, Method::GET, "/v1/conversations/rx/messages", a),
        200,
        "rx",
    )
    .await;
    assert_eq!(page["messages"][0]["content"], "signed with RS256");
    let own = send_ok(
        req(&server, Method::GET, "/v1/participants/alice/inbox", a),
        200,
        "RS256 own inbox",
    )
    .await;
    assert_eq!(inbox_ids(&own), vec!["rx"]);
    let mut sse = SseStream::open(&server, "rx", "", &alice, None).await;
    sse.expect_seqs("rx", 1..=1, "RS256 SSE").await;
    drop(sse);
    for (method, path) in [
        (Method::GET, "/v1/conversations/ry/messages"),
        (Method::GET, "/v1/conversations/ry"),
        (Method::GET, "/v1/participants/bob/inbox"),
    ] {
        let resp = req(&server, method.clone(), path, a)
            .send()
            .await
            .expect(path);
        expect_error(
            resp,
            403,
            "forbidden",
            &format!("RS256 alice {method} {path}"),
        )
        .await;
    }

    let now = now_secs();
    let bad_tokens: Vec<(String, &str)> = vec![
        (
            rs256(&other_private, &claims("alice")),
            "signed with another key",
        ),
        (
            rs256(&private, &json!({ "sub": "alice", "exp": now - 3600 })),
            "expired",
        ),
        (hs256(HS_SECRET, &claims("alice")), "HS256 token"),
        (
            hs256(&public, &claims("alice")),
            "HS256 keyed with the public PEM (algorithm confusion)",
        ),
    ];
    for (token, what) in &bad_tokens {
        let resp = req(
            &server,
            Method::GET,
            "/v1/conversations/rx/messages",
            Some(token),
        )
        .send()
        .await
        .expect(what);
        expect_error(resp, 401, "unauthorized", &format!("RS256 server: {what}")).await;
        let resp = req(
            &server,
            Method::POST,
            "/v1/conversations/rx/messages",
            Some(token),
        )
        .json(&json!({ "content": "nope" }))
        .send()
        .await
        .expect(what);
        expect_error(
            resp,
            401,
            "unauthorized",
            &format!("RS256 server POST: {what}"),
        )
        .await;
    }
    assert_eq!(server.page("rx", "after_seq=0").await.last_seq, 1);

    // The API key still works.
    server.append("ry", "bob", json!("key still works")).await;
    let resp = req(&server, Method::PUT, "/v1/conversations/rz", Some(API_KEY))
        .json(&json!({ "participants": ["alice"] }))
        .send()
        .await
        .expect("PUT rz");
    assert_eq!(resp.status().as_u16(), 201);
}

// ----- 2. Inbox and read cursors -----

/// Who sends message `seq` (1-based) after the first five (alice ×3, bob ×2).
fn sender_of(seq: u64) -> &'static str {
    match seq {
        1 | 2 | 4 => "alice",
        3 | 5 => "bob",
        s if s % 3 == 0 || s % 7 == 0 => "bob",
        _ => "alice",
    }
}

/// Messages after `read_seq` that `participant` did not send.
fn expected_unread(senders: &[&str], participant: &str, read_seq: u64) -> u64 {
    senders
        .iter()
        .skip(read_seq as usize)
        .filter(|s| **s != participant)
        .count() as u64
}

async fn mark_read(server: &TestServer, participant: &str, seq: u64) -> Value {
    send_ok(
        req(
            server,
            Method::POST,
            "/v1/conversations/chat/read",
            Some(API_KEY),
        )
        .json(&json!({ "participant": participant, "seq": seq })),
        200,
        &format!("{participant} reads chat up to {seq}"),
    )
    .await
}

/// Asserts the `chat` entry of `participant`'s inbox against the test's own bookkeeping.
async fn check_chat_entry(
    server: &TestServer,
    participant: &str,
    senders: &[&str],
    read_seq: u64,
    what: &str,
) -> Value {
    let inbox = inbox(server, participant).await;
    let e = entry(&inbox, "chat");
    let last_seq = senders.len() as u64;
    assert_eq!(
        (
            e["last_seq"].as_u64(),
            e["read_seq"].as_u64(),
            e["unread"].as_u64()
        ),
        (
            Some(last_seq),
            Some(read_seq),
            Some(expected_unread(senders, participant, read_seq))
        ),
        "{what}: {participant}'s chat entry (last_seq, read_seq, unread): {e}"
    );
    if last_seq == 0 {
        assert!(e["last_message"].is_null(), "{what}: {e}");
    } else {
        let newest = message_at(server, "chat", last_seq).await;
        assert_eq!(
            e["last_message"], newest,
            "{what}: last_message must be the newest message"
        );
    }
    inbox
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_unread_counts_and_read_cursors_across_sql_ring_and_kill9() {
    const N: u64 = 60;
    let mut server = TestServer::builder()
        .env("FERRY_RUNTIME__RING_BYTES_PER_CONVERSATION", "512")
        .start();
    server.create_conversation("chat", &["alice", "bob"]).await;
    server.create_conversation("quiet", &["bob", "carol"]).await;
    let mut senders: Vec<&str> = Vec::new();

    // Empty conversations.
    let bob = check_chat_entry(&server, "bob", &senders, 0, "empty").await;
    assert_eq!(inbox_ids(&bob), vec!["chat", "quiet"]);
    let quiet = entry(&bob, "quiet");
    assert_eq!(
        (&quiet["last_seq"], &quiet["read_seq"], &quiet["unread"]),
        (&json!(0), &json!(0), &json!(0)),
        "{quiet}"
    );
    assert!(quiet["last_message"].is_null(), "{quiet}");
    assert_eq!(inbox_ids(&inbox(&server, "alice").await), vec!["chat"]);
    let resp = req(
        &server,
        Method::POST,
        "/v1/conversations/chat/read",
        Some(API_KEY),
    )
    .json(&json!({ "participant": "bob", "seq": 1 }))
    .send()
    .await
    .expect("read empty");
    expect_error(resp, 400, "invalid", "read beyond last_seq 0").await;

    // alice ×3, bob ×2.
    for seq in 1..=5 {
        let s = sender_of(seq);
        senders.push(s);
        let ack = server
            .append("chat", s, json!({ "n": seq, "pad": "p".repeat(60) }))
            .await;
        assert_eq!(ack.seq, seq);
    }
    assert_eq!(senders, ["alice", "alice", "bob", "alice", "bob"]);
    let bob = inbox(&server, "bob").await;
    assert_eq!(entry(&bob, "chat")["unread"], 3, "bob: alice's 3: {bob}");
    let alice = inbox(&server, "alice").await;
    assert_eq!(
        entry(&alice, "chat")["unread"],
        2,
        "alice: bob's 2: {alice}"
    );
    check_chat_entry(&server, "bob", &senders, 0, "after 5").await;
    check_chat_entry(&server, "alice", &senders, 0, "after 5").await;

    for seq in 6..=N {
        let s = sender_of(seq);
        senders.push(s);
        let ack = server
            .append("chat", s, json!({ "n": seq, "pad": "p".repeat(60) }))
            .await;
        assert_eq!(ack.seq, seq);
    }
    // Before the archive necessarily caught up, and after (the ring is then trimmed to ~3
    // messages, so counting must add SQL and ring).
    check_chat_entry(&server, "bob", &senders, 0, "fresh").await;
    server.wait_archived(Duration::from_secs(20)).await;
    check_chat_entry(&server, "bob", &senders, 0, "archived").await;
    check_chat_entry(&server, "alice", &senders, 0, "archived").await;

    // bob reads up to 2.
    let read = mark_read(&server, "bob", 2).await;
    assert_eq!(
        read,
        json!({ "participant": "bob", "seq": 2, "unread": expected_unread(&senders, "bob", 2) }),
        "read response"
    );
    check_chat_entry(&server, "bob", &senders, 2, "bob read 2").await;
    // Never backwards.
    for back in [1, 0, 2] {
        let read = mark_read(&server, "bob", back).await;
        assert_eq!(
            read,
            json!({ "participant": "bob", "seq": 2, "unread": expected_unread(&senders, "bob", 2) }),
            "read seq={back} after 2 must keep 2"
        );
    }
    // Beyond the end, and other bad reads.
    for (body, what) in [
        (
            json!({ "participant": "bob", "seq": N + 1 }),
            "seq beyond last_seq",
        ),
        (
            json!({ "participant": "bob", "seq": u64::MAX }),
            "seq u64::MAX",
        ),
        (json!({ "participant": "bob", "seq": -1 }), "negative seq"),
        (json!({ "participant": "bob" }), "no seq"),
        (json!({ "seq": 1 }), "API key without participant"),
        (
            json!({ "participant": "carol", "seq": 1 }),
            "not a participant",
        ),
        (
            json!({ "participant": "bad id!", "seq": 1 }),
            "invalid participant",
        ),
    ] {
        let resp = req(
            &server,
            Method::POST,
            "/v1/conversations/chat/read",
            Some(API_KEY),
        )
        .json(&body)
        .send()
        .await
        .expect(what);
        expect_error(resp, 400, "invalid", what).await;
    }
    let resp = req(
        &server,
        Method::POST,
        "/v1/conversations/nope/read",
        Some(API_KEY),
    )
    .json(&json!({ "participant": "bob", "seq": 0 }))
    .send()
    .await
    .expect("read unknown conversation");
    expect_error(resp, 404, "not_found", "read in unknown conversation").await;
    check_chat_entry(&server, "bob", &senders, 2, "after rejected reads").await;
    let carol = inbox(&server, "carol").await;
    assert_eq!(inbox_ids(&carol), vec!["quiet"], "{carol}");

    // alice reads to a point whose unread spans the SQL tier and the ring.
    let alice_read = N - 15;
    let read = mark_read(&server, "alice", alice_read).await;
    assert_eq!(
        read,
        json!({
            "participant": "alice",
            "seq": alice_read,
            "unread": expected_unread(&senders, "alice", alice_read),
        })
    );
    let bob_before = check_chat_entry(&server, "bob", &senders, 2, "before kill").await;
    let alice_before =
        check_chat_entry(&server, "alice", &senders, alice_read, "before kill").await;

    // kill -9 with everything archived: same cursors, counts and last message.
    server.kill9();
    server.restart();
    assert_eq!(
        inbox(&server, "bob").await,
        bob_before,
        "bob's inbox after kill -9"
    );
    assert_eq!(
        inbox(&server, "alice").await,
        alice_before,
        "alice's inbox after kill -9"
    );
    check_chat_entry(&server, "bob", &senders, 2, "after restart").await;

    // kill -9 right after more appends (some may be only in the WAL).
    for seq in N + 1..=N + 7 {
        let s = sender_of(seq);
        senders.push(s);
        let ack = server
            .append("chat", s, json!({ "n": seq, "pad": "p".repeat(60) }))
            .await;
        assert_eq!(ack.seq, seq);
    }
    server.kill9();
    server.restart();
    check_chat_entry(&server, "bob", &senders, 2, "after second kill -9").await;
    check_chat_entry(
        &server,
        "alice",
        &senders,
        alice_read,
        "after second kill -9",
    )
    .await;
    let bob = inbox(&server, "bob").await;
    assert_eq!(entry(&bob, "quiet")["last_seq"], 0, "{bob}");

    // Reading everything leaves nothing unread; reading back does not resurrect any. (Archive
    // first: a read-all while the archive lags is its own test, below.)
    server.wait_archived(Duration::from_secs(20)).await;
    let last = senders.len() as u64;
    let read = mark_read(&server, "bob", last).await;
    assert_eq!(
        read,
        json!({ "participant": "bob", "seq": last, "unread": 0 })
    );
    let read = mark_read(&server, "bob", 10).await;
    assert_eq!(
        read,
        json!({ "participant": "bob", "seq": last, "unread": 0 })
    );
    check_chat_entry(&server, "bob", &senders, last, "read all").await;
}

// ----- 3. SSE -----

/// Replay from `after_seq`, then live in order; resume with `Last-Event-ID` (which wins over
/// `after_seq`) with no gap or repeat; multi-line data survives; bad cursors are `invalid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replays_then_streams_live_and_resumes_from_last_event_id() {
    let server = TestServer::start();
    server.create_conversation("tail", &["alice", "bob"]).await;
    for i in 1..=5 {
        server.append("tail", "alice", json!({ "n": i })).await;
    }

    let mut sse = SseStream::open(&server, "tail", "?after_seq=2", API_KEY, None).await;
    let replay = sse.expect_seqs("tail", 3..=5, "replay after 2").await;
    for m in &replay {
        assert_eq!(
            m,
            &message_at(&server, "tail", seq_of(m)).await,
            "SSE data is the message JSON"
        );
    }

    // Live, in order, while connected.
    for i in 6..=10 {
        server.append("tail", "bob", json!({ "n": i })).await;
    }
    let live = sse.expect_seqs("tail", 6..=10, "live 6..=10").await;
    for m in &live {
        assert_eq!(m, &message_at(&server, "tail", seq_of(m)).await);
        assert_eq!(m["content"]["n"], seq_of(m));
    }

    // Content whose raw JSON has CR, LF and CRLF whitespace (multi-line SSE data) and escaped
    // newlines inside strings.
    let raw = "{\"sender\":\"alice\",\"content\":{\r\n  \"text\": \"line1\\nline2\\r\\n\",\r  \"n\": [1,\n 2]\r\n}}";
    let resp = req(
        &server,
        Method::POST,
        "/v1/conversations/tail/messages",
        Some(API_KEY),
    )
    .header("content-type", "application/json")
    .body(raw)
    .send()
    .await
    .expect("multi-line append");
    assert_eq!(resp.status().as_u16(), 201, "multi-line append");
    let m = sse.next_message("tail", "multi-line message").await;
    assert_eq!(seq_of(&m), 11);
    assert_eq!(
        m["content"],
        json!({ "text": "line1\nline2\r\n", "n": [1, 2] }),
        "content survives SSE framing"
    );
    server.append("tail", "bob", json!({ "n": 12 })).await;
    assert_eq!(
        seq_of(&sse.next_message("tail", "after multi-line").await),
        12,
        "the stream continues in step after a multi-line event"
    );
    drop(sse);

    // Resume: Last-Event-ID wins over after_seq; exactly K+1.. then live, nothing twice.
    let mut resumed = SseStream::open(&server, "tail", "?after_seq=2", API_KEY, Some("7")).await;
    resumed.expect_seqs("tail", 8..=12, "resume from 7").await;
    server.append("tail", "alice", json!({ "n": 13 })).await;
    resumed
        .expect_seqs("tail", 13..=13, "live after resume")
        .await;

    // Last-Event-ID alone, and at the end (only new messages arrive).
    let mut at_end = SseStream::open(&server, "tail", "", API_KEY, Some("13")).await;
    let mut fresh = SseStream::open(&server, "tail", "", API_KEY, None).await;
    fresh
        .expect_seqs("tail", 1..=13, "no cursor = from the start")
        .await;
    server.append("tail", "bob", json!({ "n": 14 })).await;
    at_end
        .expect_seqs("tail", 14..=14, "resume at the end")
        .await;
    fresh
        .expect_seqs("tail", 14..=14, "fresh stream goes live")
        .await;
    resumed
        .expect_seqs("tail", 14..=14, "resumed stream still live")
        .await;

    // kill -9 under open streams: they end (never hang); after restart a resume from the last
    // id seen continues exactly.
    let mut server = server;
    server.kill9();
    for (s, what) in [
        (&mut resumed, "resumed"),
        (&mut at_end, "at_end"),
        (&mut fresh, "fresh"),
    ] {
        s.expect_end(Instant::now() + EVENT_TIMEOUT, what).await;
    }
    server.restart();
    server.append("tail", "alice", json!({ "n": 15 })).await;
    let mut after_crash = SseStream::open(&server, "tail", "", API_KEY, Some("14")).await;
    after_crash
        .expect_seqs("tail", 15..=15, "resume after kill -9")
        .await;
    server.append("tail", "bob", json!({ "n": 16 })).await;
    after_crash
        .expect_seqs("tail", 16..=16, "live after kill -9")
        .await;

    for (query, last_event_id, what) in [
        ("?after_seq=abc", None, "after_seq not a number"),
        ("?after_seq=-1", None, "after_seq negative"),
        ("", Some("abc"), "Last-Event-ID not a number"),
        ("?after_seq=1", Some("-3"), "Last-Event-ID negative"),
    ] {
        let mut rb = req(
            &server,
            Method::GET,
            &format!("/v1/conversations/tail/stream{query}"),
            Some(API_KEY),
        );
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id);
        }
        let resp = rb.send().await.expect(what);
        expect_error(resp, 400, "invalid", what).await;
    }
    let resp = req(
        &server,
        Method::GET,
        "/v1/conversations/nope/stream",
        Some(API_KEY),
    )
    .send()
    .await
    .expect("unknown conversation");
    expect_error(resp, 404, "not_found", "SSE on unknown conversation").await;
}

/// With a 512-byte ring, 300 messages live almost entirely in SQL: a stream from 0 returns
/// exactly 1..=300; so does a stream opened before the appends that was not read while they
/// happened; a resume from the middle returns exactly the rest; all then go live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replays_300_messages_across_sql_and_ring_exactly_once() {
    const N: u64 = 300;
    let server = TestServer::builder()
        .env("FERRY_RUNTIME__RING_BYTES_PER_CONVERSATION", "512")
        .start();
    server.create_conversation("long", &["w"]).await;

    // Opened on the empty conversation, then left unread while 300 messages go by.
    let mut early = SseStream::open(&server, "long", "?after_seq=0", API_KEY, None).await;
    server.append("long", "w", json!({ "n": 1 })).await;
    early
        .expect_seqs("long", 1..=1, "early stream, first")
        .await;

    // Four concurrent writers: seqs are the server's, content is checked against GET.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let client = server.client();
        let url = server.url("/v1/conversations/long/messages");
        tasks.push(tokio::spawn(async move {
            for i in 0..(N - 1) / 4 + 1 {
                let n = 2 + w + 4 * i;
                if n > N {
                    break;
                }
                let resp = client
                    .post(&url)
                    .json(&json!({ "sender": "w", "content": { "n": n, "pad": "x".repeat(40) } }))
                    .send()
                    .await
                    .expect("append");
                assert_eq!(resp.status().as_u16(), 201, "append {n}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    server.wait_archived(Duration::from_secs(20)).await;
    let (stored, last_seq) = server.read_all("long").await;
    assert_eq!(last_seq, N);
    assert_eq!(stored.len() as u64, N);

    let mut full = SseStream::open(&server, "long", "?after_seq=0", API_KEY, None).await;
    let got = full.expect_seqs("long", 1..=N, "full replay").await;
    assert_eq!(got, stored, "replayed messages equal the stored ones");

    let mut mid = SseStream::open(&server, "long", "?after_seq=5", API_KEY, Some("123")).await;
    let got = mid.expect_seqs("long", 124..=N, "resume from 123").await;
    assert_eq!(got, stored[123..].to_vec());

    let got = early.expect_seqs("long", 2..=N, "early stream, rest").await;
    assert_eq!(got, stored[1..].to_vec());

    server.append("long", "w", json!({ "n": N + 1 })).await;
    for (s, what) in [
        (&mut full, "full"),
        (&mut mid, "mid"),
        (&mut early, "early"),
    ] {
        let m = s.next_message("long", what).await;
        assert_eq!(
            seq_of(&m),
            N + 1,
            "{what}: next after {N} (no repeat, no gap)"
        );
        assert_eq!(m["content"]["n"], N + 1);
    }
}

/// Runs one SQL statement against the server's SQLite archive (operator-side fault injection).
async fn sql(server: &TestServer, statement: &str) {
    let url = format!("sqlite://{}", server.data_dir().join("ferry.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    sqlx::query(statement)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    pool.close().await;
}

/// While the SQL archive is refusing writes (the newest messages live only in the WAL and the
/// ring, also across kill -9), unread counts and SSE must be right, and a participant who has
/// read everything must still see the newest message as its inbox `last_message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_last_message_is_newest_while_the_archive_lags() {
    let mut server = TestServer::start();
    server.create_conversation("chat", &["alice", "bob"]).await;
    let mut senders = Vec::new();
    for n in 1..=3u64 {
        server.append("chat", "alice", json!({ "n": n })).await;
        senders.push("alice");
    }
    server.wait_archived(Duration::from_secs(20)).await;
    sql(
        &server,
        "CREATE TRIGGER it_block_archive BEFORE INSERT ON messages \
         BEGIN SELECT RAISE(ABORT, 'archive blocked by test'); END",
    )
    .await;
    for n in 4..=6u64 {
        let ack = server.append("chat", "alice", json!({ "n": n })).await;
        assert_eq!(ack.seq, n);
        senders.push("alice");
    }
    // Messages 4..=6 are durable but not archived.
    let page = server.page("chat", "after_seq=0").await;
    assert_eq!(page.seqs(), vec![1, 2, 3, 4, 5, 6], "reads serve the ring");

    let read = mark_read(&server, "bob", 4).await;
    assert_eq!(read, json!({ "participant": "bob", "seq": 4, "unread": 2 }));
    check_chat_entry(&server, "bob", &senders, 4, "archive blocked, read 4").await;
    check_chat_entry(&server, "alice", &senders, 0, "archive blocked, alice").await;
    let mut sse = SseStream::open(&server, "chat", "?after_seq=0", API_KEY, None).await;
    sse.expect_seqs("chat", 1..=6, "SSE while the archive is blocked")
        .await;
    drop(sse);

    // kill -9 while 4..=6 exist only in the WAL (the archive still refuses them).
    server.kill9();
    server.restart();
    check_chat_entry(&server, "bob", &senders, 4, "blocked, after kill -9").await;
    check_chat_entry(&server, "alice", &senders, 0, "blocked, after kill -9").await;
    let mut sse = SseStream::open(&server, "chat", "", API_KEY, Some("2")).await;
    sse.expect_seqs("chat", 3..=6, "SSE after kill -9, archive blocked")
        .await;
    drop(sse);

    let read = mark_read(&server, "bob", 6).await;
    assert_eq!(read, json!({ "participant": "bob", "seq": 6, "unread": 0 }));
    check_chat_entry(&server, "bob", &senders, 6, "archive blocked, read all").await;

    sql(&server, "DROP TRIGGER it_block_archive").await;
    server.wait_archived(Duration::from_secs(20)).await;
    check_chat_entry(&server, "bob", &senders, 6, "archive caught up, read all").await;
}
