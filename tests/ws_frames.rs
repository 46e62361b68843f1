//! The WebSocket endpoint of the real binary, frame by frame, with a raw tokio-tungstenite client:
//! heartbeats, every kind of bad frame and its documented answer, authentication on the
//! upgrade, authorization of joins, join/send/receive, several topics on one socket, leave,
//! ephemeral events, the inbox topic, and a slow consumer that must catch up with bounded
//! server memory.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use common::ws::{assert_error, socket_url, Ws};
use common::{metric_sum, TestServer, API_KEY};

const JWT_SECRET: &str = "ws-test-secret-1b8e-at-least-32-bytes";

/// An HS256 end-user token for `sub`.
fn jwt(sub: &str) -> String {
    common::user_token(JWT_SECRET, sub)
}

fn jwt_server() -> TestServer {
    TestServer::builder()
        .env("FERRY_JWT_SECRET", JWT_SECRET)
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_bad_frames_get_their_documented_answers() {
    let server = TestServer::start();
    server.create_conversation("c1", &["alice"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.heartbeat().await;

    // Malformed JSON has no ref to answer: ignored, the socket stays up, nothing is sent.
    ws.send_text("[\"1\", \"2\", \"phoenix\", ").await;
    ws.send_text("{{{").await;
    // Wrong arity, with a ref: an invalid reply.
    ws.send_text(r#"[null, "w1", "phoenix", "heartbeat"]"#)
        .await;
    let reply = ws.next_frame().await;
    assert_eq!(
        (reply[1].as_str(), reply[3].as_str()),
        (Some("w1"), Some("phx_reply")),
        "the first frame after two malformed ones answers the wrong-arity frame: {reply}"
    );
    assert_error(&reply[4], "invalid", "wrong arity");
    // A non-string event.
    ws.send_text(r#"[null, "w2", "phoenix", 7, {}]"#).await;
    assert_error(&ws.reply("w2").await[4], "invalid", "non-string event");
    // Wrong arity without a ref: ignored.
    ws.send_text(r#"[null, null, "phoenix"]"#).await;
    // Another event on the socket topic.
    let reply = ws.call(None, "phoenix", "dance", json!({})).await;
    assert_error(&reply, "invalid", "unknown phoenix event");
    assert_eq!(reply["response"]["detail"], "unknown_event");

    // Unknown topics and ids.
    let (_, reply) = ws.join("room:lobby", json!({})).await;
    assert_error(&reply, "not_found", "unknown topic");
    let (_, reply) = ws.join("conversation:nope", json!({})).await;
    assert_error(&reply, "not_found", "unknown conversation");
    let (_, reply) = ws.join("conversation:bad id!", json!({})).await;
    assert_error(&reply, "invalid", "invalid conversation id");
    let (_, reply) = ws.join("conversation:c1", json!({"after_seq": "x"})).await;
    assert_error(&reply, "invalid", "non-numeric after_seq");

    // Events on a topic that is not joined.
    let reply = ws
        .call(
            Some("9"),
            "conversation:c1",
            "send",
            json!({"sender": "alice", "content": 1}),
        )
        .await;
    assert_error(&reply, "invalid", "send before join");
    assert_eq!(reply["response"]["detail"], "not_joined");

    // Unknown event on a joined topic; bad send payloads.
    let (join_ref, _) = ws.join_ok("conversation:c1", json!({})).await;
    let reply = ws
        .call(Some(&join_ref), "conversation:c1", "shout", json!({}))
        .await;
    assert_error(&reply, "invalid", "unknown event");
    assert_eq!(reply["response"]["detail"], "unknown_event");
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:c1",
            "send",
            json!({"content": "no sender"}),
        )
        .await;
    assert_error(&reply, "invalid", "API-key send without sender");
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:c1",
            "send",
            json!({"sender": "alice"}),
        )
        .await;
    assert_error(&reply, "invalid", "send without content");
    let big = "x".repeat(70 * 1024);
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:c1",
            "send",
            json!({"sender": "alice", "content": big}),
        )
        .await;
    assert_error(&reply, "too_large", "message above max_message_bytes");

    ws.heartbeat().await;
    let (status, body) = server
        .post_message("c1", &json!({"sender": "alice", "content": 1}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["seq"], 1,
        "none of the rejected sends was stored: {body}"
    );
    let metrics = server.metrics().await;
    assert!(
        metric_sum(&metrics, "ferry_ws_errors_total", &[("reason", "invalid")]).unwrap_or(0.0)
            >= 8.0,
        "ws errors are counted by reason"
    );
    assert!(
        metric_sum(&metrics, "ferry_ws_frames_in_total", &[]).unwrap_or(0.0) >= 15.0,
        "frames in are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_the_socket_and_the_server_keeps_serving() {
    let server = TestServer::start();

    // Valid JSON that is not a frame array.
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.send_text(r#"{"topic": "phoenix", "event": "heartbeat"}"#)
        .await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, CloseCode::Policy, "{reason}");

    // Binary frames.
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.stream
        .send(Message::binary(vec![0u8, 1, 2, 3]))
        .await
        .expect("send binary");
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, CloseCode::Unsupported, "{reason}");

    // A frame above limits.max_frame_bytes (1 MiB by default).
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.heartbeat().await;
    let pad = "p".repeat(1024 * 1024);
    let oversized = json!([null, "big", "phoenix", "heartbeat", {"pad": pad}]).to_string();
    // The server may close before the whole frame is written.
    let _ = ws.stream.send(Message::text(oversized)).await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, CloseCode::Size, "{reason}");
    assert!(
        reason.contains("1048576"),
        "close reason names the limit: {reason}"
    );

    // Other sockets were never affected.
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.heartbeat().await;
    let metrics = server.metrics().await;
    for reason in ["violation", "too_large_frame"] {
        assert!(
            metric_sum(&metrics, "ferry_ws_errors_total", &[("reason", reason)]).is_some(),
            "ws error {reason} counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_needs_credentials_and_the_v2_serializer() {
    let server = jwt_server();
    let expect_http = |result: Result<_, WsError>, status: u16, what: &str| match result {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), status, "{what}");
            let body = response.body().clone().unwrap_or_default();
            let body: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
            body
        }
        Err(e) => panic!("{what}: expected HTTP {status}, got {e}"),
        Ok(_) => panic!("{what}: the upgrade was accepted"),
    };
    let r = tokio_tungstenite::connect_async(socket_url(&server, "vsn=2.0.0")).await;
    assert_eq!(expect_http(r, 401, "no token")["error"], "unauthorized");
    let r = tokio_tungstenite::connect_async(socket_url(&server, "vsn=2.0.0&token=wrong")).await;
    assert_eq!(expect_http(r, 401, "bad api key")["error"], "unauthorized");
    let forged = format!("{}x", jwt("alice"));
    let r =
        tokio_tungstenite::connect_async(socket_url(&server, &format!("vsn=2.0.0&token={forged}")))
            .await;
    assert_eq!(
        expect_http(r, 401, "bad jwt signature")["error"],
        "unauthorized"
    );
    let r = tokio_tungstenite::connect_async(socket_url(
        &server,
        &format!("vsn=1.0.0&token={API_KEY}"),
    ))
    .await;
    assert_eq!(expect_http(r, 400, "vsn 1.0.0")["error"], "invalid");

    // The phoenix client's authToken: subprotocols ["phoenix", "base64url.bearer.phx.<b64>"],
    // standard alphabet without padding (what btoa(..).replace(/=/g, "") produces).
    let token = jwt("alice");
    let b64 = base64_unpadded(token.as_bytes());
    let mut request = socket_url(&server, "vsn=2.0.0")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("phoenix, base64url.bearer.phx.{b64}")).expect("header"),
    );
    let (stream, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("subprotocol token accepted");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("phoenix"),
        "the server answers the phoenix subprotocol"
    );
    let mut ws = Ws {
        stream,
        pending: VecDeque::new(),
        next_ref: 0,
    };
    ws.heartbeat().await;
    // The socket is alice's: her inbox is joinable, bob's is not.
    let (_, reply) = ws.join("inbox:alice", json!({})).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let (_, reply) = ws.join("inbox:bob", json!({})).await;
    assert_error(&reply, "forbidden", "another user's inbox");
}

fn base64_unpadded(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..=chunk.len() {
            out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_send_and_receive_own_message_then_replay_from_after_seq() {
    let server = TestServer::start();
    server.create_conversation("c1", &["alice", "bob"]).await;
    server.append("c1", "bob", json!("before the join")).await;

    let mut ws = Ws::connect(&server, API_KEY).await;
    let (join_ref, response) = ws.join_ok("conversation:c1", json!({})).await;
    assert_eq!(
        response,
        json!({"conversation_id": "c1", "last_seq": 1, "first_available_seq": 1})
    );
    // Replay starts at seq 1 for an API key without after_seq.
    let push = ws.next_push("conversation:c1", "message").await;
    assert_eq!(push[0], join_ref.as_str(), "pushes carry the join_ref");
    assert_eq!(push[4]["seq"], 1);
    assert_eq!(push[4]["content"], "before the join");

    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:c1",
            "send",
            json!({"sender": "alice", "content": {"text": "hi", "n": 1.50}, "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let ack = &reply["response"];
    assert_eq!(ack["seq"], 2);
    assert_eq!(ack["deduped"], false);
    assert!(
        ack["id"].is_string() && ack["created_at"].is_string(),
        "{ack}"
    );
    let push = ws.next_push("conversation:c1", "message").await;
    let message = &push[4];
    assert_eq!(message["seq"], 2);
    assert_eq!(message["id"], ack["id"]);
    assert_eq!(message["sender"], "alice");
    assert_eq!(message["kind"], "text");
    assert_eq!(message["content"], json!({"text": "hi", "n": 1.50}));
    assert_eq!(message["conversation_id"], "c1");
    assert_eq!(message["created_at"], ack["created_at"]);

    // A repeated key is acknowledged with the first result and not pushed again.
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:c1",
            "send",
            json!({"sender": "alice", "content": "dup", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(reply["response"]["seq"], 2, "{reply}");
    assert_eq!(reply["response"]["deduped"], true, "{reply}");
    server.append("c1", "bob", json!("live")).await;
    let push = ws.next_push("conversation:c1", "message").await;
    assert_eq!(
        push[4]["seq"], 3,
        "no repeat of seq 2, then the live message"
    );

    // Pipelined sends from one socket are stored in the order they were sent.
    let refs: Vec<String> = (0..50).map(|_| ws.make_ref()).collect();
    for (i, r) in refs.iter().enumerate() {
        ws.send(json!([join_ref, r, "conversation:c1", "send", {"sender": "bob", "content": i}]))
            .await;
    }
    for (i, r) in refs.iter().enumerate() {
        let reply = ws.reply(r).await;
        assert_eq!(reply[4]["response"]["seq"], 4 + i as u64, "{reply}");
    }
    for i in 0..50u64 {
        let push = ws.next_push("conversation:c1", "message").await;
        assert_eq!(push[4]["seq"], 4 + i);
        assert_eq!(push[4]["content"], i);
    }

    // A second socket resuming from after_seq (and the last_seq alias) gets exactly the rest.
    for params in [json!({"after_seq": 51}), json!({"last_seq": 51})] {
        let mut other = Ws::connect(&server, API_KEY).await;
        let (_, response) = other.join_ok("conversation:c1", params).await;
        assert_eq!(response["last_seq"], 53);
        for seq in 52..=53 {
            let push = other.next_push("conversation:c1", "message").await;
            assert_eq!(push[4]["seq"], seq);
        }
        other.heartbeat().await;
        assert!(
            other.pending.is_empty(),
            "nothing after seq 53: {:?}",
            other.pending
        );
    }
}

/// A `send` is read in one pass when it can be and the serde way otherwise; either way it must
/// get the answer the same body gets over HTTP: the same stored message, or the same error code
/// and message (after the transport's own prefix for malformed JSON).
#[tokio::test]
async fn a_send_is_answered_as_the_same_body_over_http() {
    let server = TestServer::start();
    server.create_conversation("c1", &["alice", "bob"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    let (join_ref, _) = ws.join_ok("conversation:c1", json!({})).await;
    let deep = format!("{}1{}", "[".repeat(65), "]".repeat(65));
    let bodies = [
        r#"{"sender":"alice","content":{"t":"a\"b\\c\u00e9\ud83d\ude00 /"},"kind":"note","metadata":{"m":[1,-2.5e3,true,null]}}"#.to_owned(),
        r#"{"sender":"al\u0069ce","content":1,"idempotency_key":null}"#.to_owned(),
        r#"{"sender":"alice","content":null,"metadata":null,"kind":null}"#.to_owned(),
        r#" { "sender" : "bob" , "content" : [ 1 , 2 ] } "#.to_owned(),
        r#"["bob","text",{"a":1}]"#.to_owned(),
        r#"{"sender":"carol","content":1}"#.to_owned(),
        r#"{"sender":"alice","content":"x","cont\u0065nt":"y"}"#.to_owned(),
        r#"{"sender":"alice","content":1,"content":2}"#.to_owned(),
        r#"{"sender":"alice","content":1,"extra":2}"#.to_owned(),
        r#"{"sender":"alice","content":"a\u0000b"}"#.to_owned(),
        r#"{"sender":"alice","content":"\ud800"}"#.to_owned(),
        r#"{"sender":"alice","content":1e131072}"#.to_owned(),
        r#"{"sender":"alice","content":1,"metadata":{"k":"\u0000"}}"#.to_owned(),
        r#"{"sender":"alice","content":1,"metadata":5}"#.to_owned(),
        r#"{"sender":"alice","metadata":{}}"#.to_owned(),
        r#"{"sender":5,"content":1}"#.to_owned(),
        r#"{"sender":"alice","content":1,"kind":""}"#.to_owned(),
        format!(r#"{{"sender":"alice","content":{deep}}}"#),
    ];
    let mut stored = 0;
    for body in &bodies {
        let resp = server
            .client()
            .post(server.url("/v1/conversations/c1/messages"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        let http: Value = resp.json().await.expect("JSON answer");
        let r = ws.make_ref();
        ws.send_text(&format!(
            r#"["{join_ref}","{r}","conversation:c1","send",{body}]"#
        ))
        .await;
        let reply = ws.reply(&r).await;
        let answer = &reply[4]["response"];
        if status == 201 {
            stored += 1;
            assert_eq!(reply[4]["status"], "ok", "{body}: {reply}");
            let query =
                |seq: &Value| format!("after_seq={}&limit=1", seq.as_u64().expect("seq") - 1);
            let over_http = server.page("c1", &query(&http["seq"])).await;
            let over_ws = server.page("c1", &query(&answer["seq"])).await;
            let fields = |m: &Value| {
                json!([
                    m["sender"],
                    m["kind"],
                    m["content"],
                    m["metadata"],
                    m["idempotency_key"]
                ])
            };
            assert_eq!(
                fields(&over_ws.messages[0]),
                fields(&over_http.messages[0]),
                "{body}"
            );
        } else {
            assert_eq!(reply[4]["status"], "error", "{body}: {reply}");
            assert_eq!(answer["reason"], http["error"], "{body}: {reply} / {http}");
            let tail = |m: &Value| {
                let m = m.as_str().unwrap_or_default().to_owned();
                for prefix in ["invalid JSON body: ", "invalid send payload: "] {
                    if let Some(rest) = m.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                m
            };
            assert_eq!(tail(&answer["message"]), tail(&http["message"]), "{body}");
        }
    }
    // The first six are stored (the array is read by position; an API key may name any
    // sender), the rest refused.
    assert_eq!(stored, 6, "bodies stored over both transports");
}

/// Waits until the server's `ferry_ws_append_pipelines` gauge reads `n`.
async fn wait_for_pipelines(server: &TestServer, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = server.metrics().await;
        let running = metric_sum(&metrics, "ferry_ws_append_pipelines", &[]).unwrap_or(0.0);
        if running == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{running} append pipelines running, waiting for {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A topic's append pipeline ends once the topic stops sending, and its next `send` starts
/// another: every send is answered, in order, with nothing lost or repeated across the restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_topics_append_pipeline_ends_and_the_next_send_starts_another() {
    let server = TestServer::start();
    server.create_conversation("c1", &["alice"]).await;
    server.create_conversation("c2", &["alice"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    let (ref_1, _) = ws.join_ok("conversation:c1", json!({"echo": false})).await;
    let (ref_2, _) = ws.join_ok("conversation:c2", json!({"echo": false})).await;
    wait_for_pipelines(&server, 0.0).await;

    let mut next_seq = 1;
    for round in 0..3 {
        // A burst on c1 (and one send on c2): pipelined, answered in send order.
        let refs: Vec<String> = (0..20).map(|_| ws.make_ref()).collect();
        for (i, r) in refs.iter().enumerate() {
            ws.send(json!([ref_1, r, "conversation:c1", "send",
                {"sender": "alice", "content": format!("{round}-{i}")}]))
                .await;
        }
        let other = ws.make_ref();
        ws.send(
            json!([ref_2, other, "conversation:c2", "send", {"sender": "alice", "content": round}]),
        )
        .await;
        // Joined without echo, the socket gets replies only: c1's arrive in send order.
        let mut c1_replies = Vec::new();
        for _ in 0..=refs.len() {
            let reply = ws.next_frame().await;
            assert_eq!(reply[3], "phx_reply", "{reply}");
            if reply[1] == other.as_str() {
                assert_eq!(reply[4]["response"]["seq"], round + 1, "{reply}");
            } else {
                c1_replies.push(reply);
            }
        }
        for (r, reply) in refs.iter().zip(&c1_replies) {
            assert_eq!(
                reply[1],
                r.as_str(),
                "c1's replies out of send order: {reply}"
            );
            assert_eq!(reply[4]["response"]["seq"], next_seq, "{reply}");
            next_seq += 1;
        }
        // Both topics go quiet: both pipelines end, the socket and its joins stay.
        wait_for_pipelines(&server, 0.0).await;
    }
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "ferry_ws_channels", &[("kind", "conversation")]),
        Some(2.0)
    );

    let (messages, last_seq) = server.read_all("c1").await;
    assert_eq!(last_seq, next_seq - 1);
    let stored: Vec<(u64, String)> = messages
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = (0..3)
        .flat_map(|round| (0..20).map(move |i| format!("{round}-{i}")))
        .zip(1..)
        .map(|(content, seq)| (seq, content))
        .collect();
    assert_eq!(stored, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_without_echo_gets_every_message_but_its_own() {
    let server = TestServer::start();
    server.create_conversation("c1", &["alice", "bob"]).await;
    server.append("c1", "bob", json!("before")).await;

    let mut ws = Ws::connect(&server, API_KEY).await;
    let (_, bad) = ws.join("conversation:c1", json!({"echo": "no"})).await;
    assert_error(&bad, "invalid", "echo must be a boolean");
    let (join_ref, _) = ws
        .join_ok("conversation:c1", json!({"after_seq": 0, "echo": false}))
        .await;
    // History is not the join's own: it is replayed.
    let push = ws.next_push("conversation:c1", "message").await;
    assert_eq!(push[4]["seq"], 1);

    // A listener with the default echo, to compare against.
    let mut listener = Ws::connect(&server, API_KEY).await;
    listener
        .join_ok("conversation:c1", json!({"after_seq": 1}))
        .await;

    // 200 pipelined sends on the socket while another client appends over HTTP at the same time.
    let refs: Vec<String> = (0..200).map(|_| ws.make_ref()).collect();
    let sends = async {
        for (i, r) in refs.iter().enumerate() {
            ws.send(
                json!([join_ref, r, "conversation:c1", "send", {"sender": "alice", "content": i}]),
            )
            .await;
        }
        let mut own = Vec::new();
        for r in &refs {
            let reply = ws.reply(r).await;
            assert_eq!(reply[4]["status"], "ok", "{reply}");
            own.push(reply[4]["response"]["seq"].as_u64().unwrap());
        }
        own
    };
    let others = async {
        let mut seqs = Vec::new();
        for i in 0..40 {
            seqs.push(server.append("c1", "bob", json!({"http": i})).await.seq);
        }
        seqs
    };
    let (own, others) = tokio::join!(sends, others);
    let last = server.append("c1", "bob", json!("end")).await.seq;
    assert_eq!(
        own.len() + others.len() + 2,
        last as usize,
        "every seq taken once"
    );

    // The publisher gets exactly the other client's messages, in order, and none of its own.
    let mut pushed = Vec::new();
    loop {
        let push = ws.next_push("conversation:c1", "message").await;
        let seq = push[4]["seq"].as_u64().unwrap();
        pushed.push(seq);
        if seq == last {
            break;
        }
    }
    let mut expected = others.clone();
    expected.push(last);
    assert_eq!(pushed, expected, "own seqs {own:?}");
    ws.heartbeat().await;
    assert!(ws.pending.is_empty(), "nothing else: {:?}", ws.pending);

    // The listener's default join gets them all.
    for seq in 2..=last {
        let push = listener.next_push("conversation:c1", "message").await;
        assert_eq!(push[4]["seq"], seq);
    }

    // A repeated key is not the join's own message unless the join stored it.
    let keyed = json!({"sender": "alice", "content": "keyed", "idempotency_key": "k-echo"});
    let mut replies = Vec::new();
    for _ in 0..2 {
        let to = (Some(join_ref.as_str()), "conversation:c1");
        replies.push(ws.call(to.0, to.1, "send", keyed.clone()).await);
    }
    let keyed = replies[0]["response"]["seq"].as_u64().unwrap();
    assert_eq!(replies[1]["response"]["deduped"], true, "{replies:?}");
    let after = server.append("c1", "bob", json!("after")).await.seq;
    let push = ws.next_push("conversation:c1", "message").await;
    assert_eq!(
        push[4]["seq"], after,
        "own seq {keyed} skipped once, not echoed"
    );

    // Joining again with the default echo replays everything, its own messages included.
    let (_, response) = ws.join_ok("conversation:c1", json!({"after_seq": 1})).await;
    assert_eq!(response["last_seq"], after);
    loop {
        let frame = ws.next_frame().await;
        if frame[3] == "phx_close" {
            continue;
        }
        assert_eq!(frame[3], "message", "{frame}");
        assert_eq!(frame[4]["seq"], 2, "replay starts at the first own message");
        break;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_users_join_only_their_conversations_and_act_as_themselves() {
    let server = jwt_server();
    server.create_conversation("c1", &["alice", "bob"]).await;
    for i in 1..=3 {
        server.append("c1", "bob", json!(i)).await;
    }

    let mut mallory = Ws::connect(&server, &jwt("mallory")).await;
    let (_, reply) = mallory.join("conversation:c1", json!({})).await;
    assert_error(&reply, "forbidden", "a user not listed joins");
    mallory.heartbeat().await;

    let mut alice = Ws::connect(&server, &jwt("alice")).await;
    let (join_ref, _) = alice
        .join_ok("conversation:c1", json!({"after_seq": 3}))
        .await;
    // A user's sender is always its sub, whatever it names.
    let reply = alice
        .call(
            Some(&join_ref),
            "conversation:c1",
            "send",
            json!({"sender": "bob", "content": "me"}),
        )
        .await;
    assert_eq!(reply["response"]["seq"], 4, "{reply}");
    let push = alice.next_push("conversation:c1", "message").await;
    assert_eq!(push[4]["sender"], "alice");

    // read moves alice's read cursor; ack her delivered cursor.
    let reply = alice
        .call(
            Some(&join_ref),
            "conversation:c1",
            "read",
            json!({"seq": 2}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["response"]["participant"], "alice");
    assert_eq!(reply["response"]["seq"], 2);
    assert_eq!(
        reply["response"]["unread"], 1,
        "seq 3 from bob is unread: {reply}"
    );
    let reply = alice
        .call(Some(&join_ref), "conversation:c1", "ack", json!({"seq": 4}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let reply = alice
        .call(
            Some(&join_ref),
            "conversation:c1",
            "read",
            json!({"seq": 99}),
        )
        .await;
    assert_error(&reply, "invalid", "read beyond last_seq");

    // Without after_seq a user resumes after its read cursor.
    let mut again = Ws::connect(&server, &jwt("alice")).await;
    again.join_ok("conversation:c1", json!({})).await;
    let push = again.next_push("conversation:c1", "message").await;
    assert_eq!(push[4]["seq"], 3, "first push after read cursor 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_topics_on_one_socket_leave_and_rejoin() {
    let server = TestServer::start();
    server.create_conversation("a", &["alice"]).await;
    server.create_conversation("b", &["alice"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    let (ref_a, _) = ws.join_ok("conversation:a", json!({})).await;
    let (ref_b, _) = ws.join_ok("conversation:b", json!({})).await;
    assert_ne!(ref_a, ref_b);

    server.append("a", "alice", json!("to a")).await;
    let push = ws.next_push("conversation:a", "message").await;
    assert_eq!(
        (push[0].as_str(), push[4]["content"].as_str()),
        (Some(ref_a.as_str()), Some("to a"))
    );
    server.append("b", "alice", json!("to b")).await;
    let push = ws.next_push("conversation:b", "message").await;
    assert_eq!(
        (push[0].as_str(), push[4]["content"].as_str()),
        (Some(ref_b.as_str()), Some("to b"))
    );

    // Leave: reply ok, then phx_close with the join_ref; no more pushes on that topic.
    let leave_ref = ws.make_ref();
    ws.send(json!([ref_a, leave_ref, "conversation:a", "phx_leave", {}]))
        .await;
    let reply = ws.next_frame().await;
    assert_eq!(
        reply,
        json!([ref_a, leave_ref, "conversation:a", "phx_reply", {"status": "ok", "response": {}}])
    );
    let close = ws.next_frame().await;
    assert_eq!(
        close,
        json!([ref_a, ref_a, "conversation:a", "phx_close", {}])
    );
    server.append("a", "alice", json!("after leave")).await;
    server.append("b", "alice", json!("b again")).await;
    let push = ws.next_push("conversation:b", "message").await;
    assert_eq!(
        push[4]["content"], "b again",
        "the left topic pushed nothing in between"
    );
    let reply = ws
        .call(
            Some(&ref_a),
            "conversation:a",
            "send",
            json!({"sender": "alice", "content": 1}),
        )
        .await;
    assert_eq!(reply["response"]["detail"], "not_joined", "{reply}");

    // Joining a joined topic again replaces the join: the old one is closed first.
    let (ref_b2, _) = ws.join_ok("conversation:b", json!({"after_seq": 1})).await;
    assert!(
        ws.pending
            .iter()
            .any(|f| *f == json!([ref_b, ref_b, "conversation:b", "phx_close", {}])),
        "old join of b closed: {:?}",
        ws.pending
    );
    ws.pending.retain(|f| f[3] != "phx_close");
    let push = ws.next_push("conversation:b", "message").await;
    assert_eq!(
        (push[0].as_str(), push[4]["seq"].as_u64()),
        (Some(ref_b2.as_str()), Some(2))
    );

    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "ferry_ws_channels", &[("kind", "conversation")]),
        Some(1.0),
        "one conversation channel is joined"
    );
    assert_eq!(metric_sum(&metrics, "ferry_ws_connections", &[]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_and_typing_reach_the_other_sockets_and_the_inbox_gets_deltas() {
    let server = jwt_server();
    server.create_conversation("c1", &["alice", "agent"]).await;
    let mut alice = Ws::connect(&server, &jwt("alice")).await;
    let (alice_ref, _) = alice.join_ok("conversation:c1", json!({})).await;
    let (inbox_ref, snapshot) = alice.join_ok("inbox:alice", json!({})).await;
    assert_eq!(snapshot["conversations"][0]["id"], "c1", "{snapshot}");
    assert_eq!(snapshot["conversations"][0]["unread"], 0, "{snapshot}");
    let mut agent = Ws::connect(&server, API_KEY).await;
    let (agent_ref, _) = agent.join_ok("conversation:c1", json!({})).await;

    let reply = agent
        .call(
            Some(&agent_ref),
            "conversation:c1",
            "chunk",
            json!({"participant": "agent", "stream_id": "s1", "delta": "Hel"}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let push = alice.next_push("conversation:c1", "chunk").await;
    assert_eq!(push[0], alice_ref.as_str());
    assert_eq!(
        push[4],
        json!({"participant": "agent", "stream_id": "s1", "delta": "Hel"})
    );
    let reply = agent
        .call(
            Some(&agent_ref),
            "conversation:c1",
            "chunk",
            json!({"participant": "agent", "delta": "x"}),
        )
        .await;
    assert_error(&reply, "invalid", "chunk without stream_id");
    let reply = alice
        .call(Some(&alice_ref), "conversation:c1", "typing", json!({}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let push = agent.next_push("conversation:c1", "typing").await;
    assert_eq!(push[4], json!({"participant": "alice"}));
    // Never echoed to the sender, never stored.
    alice.heartbeat().await;
    agent.heartbeat().await;
    assert!(alice.pending.is_empty(), "alice got {:?}", alice.pending);
    assert!(agent.pending.is_empty(), "agent got {:?}", agent.pending);
    assert_eq!(server.page("c1", "after_seq=0").await.last_seq, 0);

    // Changing only c1's metadata changes no inbox; joining c2 changes alice's. Deltas are
    // coalesced, so had the first PUT counted, c1 would be in this delta or in one before it.
    let resp = server
        .client()
        .put(server.url("/v1/conversations/c1"))
        .json(&json!({"participants": ["alice", "agent"], "metadata": {"topic": "billing"}}))
        .send()
        .await
        .expect("metadata PUT");
    assert_eq!(resp.status().as_u16(), 200);
    server.create_conversation("c2", &["alice"]).await;
    let delta = alice.next_push("inbox:alice", "inbox_delta").await;
    let ids: Vec<&str> = delta[4]["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, ["c2"], "{delta}");

    // A stored message shows in alice's inbox as a delta.
    let reply = agent
        .call(
            Some(&agent_ref),
            "conversation:c1",
            "send",
            json!({"sender": "agent", "content": "done"}),
        )
        .await;
    assert_eq!(reply["response"]["seq"], 1, "{reply}");
    // The message and the inbox delta come from different tasks: either may be first.
    let (first, second) = (alice.next_frame().await, alice.next_frame().await);
    let (push, delta) = if first[3] == "message" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(push[3], "message", "{push}");
    assert_eq!(push[4]["content"], "done");
    assert_eq!(
        (delta[2].as_str(), delta[3].as_str()),
        (Some("inbox:alice"), Some("inbox_delta")),
        "{delta}"
    );
    assert_eq!(delta[0], inbox_ref.as_str());
    let entry = &delta[4]["conversations"][0];
    assert_eq!(
        (
            entry["id"].as_str(),
            entry["last_seq"].as_u64(),
            entry["unread"].as_u64()
        ),
        (Some("c1"), Some(1), Some(1)),
        "{delta}"
    );
}

/// VmRSS of a process, in bytes.
/// Past `limits.socket_in_flight` unanswered requests a socket's sends are refused with
/// `try_again` (`socket_in_flight`), counted by reason, and never written: every send gets exactly
/// one reply, and the accepted ones are exactly the conversation's seqs, in order.
#[tokio::test]
async fn sends_past_the_socket_in_flight_bound_get_try_again_and_are_not_written() {
    const SENDS: usize = 500;
    let server = TestServer::builder()
        .env("FERRY_LIMITS__SOCKET_IN_FLIGHT", "1")
        .start();
    server.create_conversation("c1", &["alice"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    let (join_ref, _) = ws.join_ok("conversation:c1", json!({"after_seq": 0})).await;

    // One burst: the reader takes the next send while the one before waits for its fsync.
    let mut refs = Vec::with_capacity(SENDS);
    for i in 0..SENDS {
        let r = ws.make_ref();
        let frame = json!([join_ref, r, "conversation:c1", "send",
            {"sender": "alice", "content": {"i": i}}]);
        ws.stream
            .feed(Message::text(frame.to_string()))
            .await
            .expect("queue frame");
        refs.push(r);
    }
    ws.stream.flush().await.expect("send burst");

    let mut accepted = Vec::new();
    let mut refused = 0;
    for (i, r) in refs.iter().enumerate() {
        let reply = ws.reply(r).await;
        let payload = &reply[4];
        if payload["status"] == "ok" {
            accepted.push((payload["response"]["seq"].as_u64().expect("seq"), i));
        } else {
            assert_error(payload, "try_again", "send past the bound");
            assert_eq!(payload["response"]["detail"], "socket_in_flight", "{reply}");
            assert_eq!(payload["response"]["retry_after_ms"], 50, "{reply}");
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "a burst of {SENDS} sends never exceeded one in flight"
    );
    assert_eq!(accepted.len() + refused, SENDS);
    // Accepted sends got seqs 1.. in the order they were sent, with nothing in between.
    for (n, (seq, _)) in accepted.iter().enumerate() {
        assert_eq!(*seq, n as u64 + 1, "accepted sends: {accepted:?}");
    }
    assert!(accepted.windows(2).all(|w| w[0].1 < w[1].1), "{accepted:?}");
    // The pushes are exactly the accepted messages (ws.pending keeps them in arrival order).
    for (seq, i) in &accepted {
        let push = ws.next_push("conversation:c1", "message").await;
        assert_eq!(push[4]["seq"], *seq);
        assert_eq!(push[4]["content"]["i"], *i);
    }
    let conversation = server.get_json("/v1/conversations/c1").await;
    assert_eq!(conversation["last_seq"], accepted.len());
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "ferry_try_again_total",
            &[("reason", "socket_in_flight")]
        ),
        Some(refused as f64),
        "refusals are counted by reason"
    );
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_catches_up_in_order_with_bounded_server_memory() {
    const MESSAGES: u64 = 10_000;
    const WRITERS: u64 = 16;
    const CONTENT_BYTES: usize = 8 * 1024;
    const MAX_GROWTH: u64 = 100 * 1024 * 1024;

    let server = TestServer::start();
    server.create_conversation("firehose", &["writer"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.join_ok("conversation:firehose", json!({})).await;
    let pid = server.pid();
    let rss_before = rss_bytes(pid);

    // The client reads nothing while everything is appended.
    let filler = "f".repeat(CONTENT_BYTES);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = server.client();
        let url = server.url("/v1/conversations/firehose/messages");
        let filler = filler.clone();
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while i < MESSAGES {
                let body = json!({"sender": "writer", "content": {"i": i, "pad": filler}});
                let resp = client.post(&url).json(&body).send().await.expect("append");
                assert_eq!(resp.status().as_u16(), 201, "append {i}");
                i += WRITERS;
            }
        }));
    }
    let mut rss_peak = rss_before;
    loop {
        rss_peak = rss_peak.max(rss_bytes(pid));
        if writers.iter().all(|w| w.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in writers {
        w.await.expect("writer");
    }
    rss_peak = rss_peak.max(rss_bytes(pid));
    // The server could not write everything to a client that reads nothing: it waited.
    let frames_out =
        metric_sum(&server.metrics().await, "ferry_ws_frames_out_total", &[]).unwrap_or(0.0) as u64;
    assert!(
        frames_out < MESSAGES / 2,
        "the server wrote {frames_out} frames to a client that read none: it is not waiting for \
         the client"
    );

    let mut next = 1;
    while next <= MESSAGES {
        let frame = ws.read_frame().await;
        assert_eq!(frame[3], "message", "{frame}");
        assert_eq!(frame[4]["seq"], next, "seq order, exactly once");
        next += 1;
        if next % 1000 == 0 {
            rss_peak = rss_peak.max(rss_bytes(pid));
        }
    }
    ws.heartbeat().await;
    assert!(
        ws.pending.is_empty(),
        "nothing after the last message: {:?}",
        ws.pending.front()
    );
    let growth = rss_peak.saturating_sub(rss_before);
    assert!(
        growth < MAX_GROWTH,
        "server RSS grew {} MiB while a client stalled (from {} MiB)",
        growth >> 20,
        rss_before >> 20
    );
    eprintln!(
        "slow consumer: rss {} MiB → peak {} MiB, {frames_out} frames written during the stall",
        rss_before >> 20,
        rss_peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_open_sockets_with_going_away() {
    let mut server = TestServer::start();
    server.create_conversation("c1", &["alice"]).await;
    let mut ws = Ws::connect(&server, API_KEY).await;
    ws.join_ok("conversation:c1", json!({})).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?} with a socket open",
        started.elapsed()
    );
    // The socket was told to go away (and reconnect elsewhere or later), not just dropped.
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, CloseCode::Away, "{reason}");
}
