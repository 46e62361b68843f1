//! The public HTTP API of the real binary: concurrent appends, idempotency (also across
//! restarts), paging across the SQL/ring boundary, every bad input's protocol code, health and
//! metrics. The tests that touch the archive also run on Postgres (`*_postgres`).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use common::pg::TestDatabase;
use common::{expect_error, metric_sum, seq_of, Ack, ServerBuilder, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_to_one_conversation_get_unique_contiguous_seqs() {
    concurrent_writers(TestServer::builder()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_to_one_conversation_get_unique_contiguous_seqs_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    concurrent_writers(TestServer::builder().postgres(&db)).await;
}

async fn concurrent_writers(builder: ServerBuilder) {
    const WRITERS: u64 = 50;
    const PER_WRITER: u64 = 20;
    const TOTAL: u64 = WRITERS * PER_WRITER;

    let server = builder.start();
    let senders: Vec<String> = (0..WRITERS).map(|w| format!("writer-{w}")).collect();
    let participants: Vec<&str> = senders.iter().map(String::as_str).collect();
    server.create_conversation("busy", &participants).await;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = server.client();
        let url = server.url("/v1/conversations/busy/messages");
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_WRITER {
                let content = json!({ "writer": w, "i": i, "text": format!("w{w} #{i}") });
                let resp = client
                    .post(&url)
                    .json(&json!({ "sender": format!("writer-{w}"), "content": content }))
                    .send()
                    .await
                    .expect("append request");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("append body");
                assert_eq!(status, 201, "writer {w} append {i}: {body}");
                let ack = Ack::from_json(&body);
                assert!(
                    !ack.deduped,
                    "no key was sent, nothing can be deduped: {body}"
                );
                acked.push((ack.seq, content));
            }
            (w, acked)
        }));
    }

    let mut by_seq: BTreeMap<u64, (u64, Value)> = BTreeMap::new();
    for task in tasks {
        let (w, acked) = task.await.expect("writer task");
        // One writer's appends are sequential, so its seqs must increase.
        let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "writer {w} got non-increasing seqs {seqs:?}"
        );
        for (seq, content) in acked {
            if let Some((other, _)) = by_seq.insert(seq, (w, content)) {
                panic!("seq {seq} acknowledged to writer {other} and writer {w}");
            }
        }
    }
    let acked: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(acked, (1..=TOTAL).collect::<Vec<_>>(), "acked seqs");

    let page = server.page("busy", "after_seq=0&limit=1000").await;
    assert_eq!(page.seqs(), (1..=TOTAL).collect::<Vec<_>>(), "stored seqs");
    assert_eq!(page.last_seq, TOTAL);
    assert!(!page.has_more, "all {TOTAL} fit in one page");
    for message in &page.messages {
        let seq = seq_of(message);
        let (w, content) = &by_seq[&seq];
        assert_eq!(&message["content"], content, "content of seq {seq}");
        assert_eq!(
            message["sender"],
            format!("writer-{w}"),
            "sender of seq {seq}"
        );
        assert_eq!(message["conversation_id"], "busy");
        assert_eq!(message["kind"], "text");
        assert_eq!(message["metadata"], json!({}));
    }
    let ids: HashSet<&str> = page
        .messages
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len() as u64, TOTAL, "message ids are unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_dedupe_also_across_restarts() {
    idempotency_across_restarts(TestServer::builder()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_dedupe_also_across_restarts_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    idempotency_across_restarts(TestServer::builder().postgres(&db)).await;
}

async fn idempotency_across_restarts(builder: ServerBuilder) {
    let mut server = builder.start();
    server.create_conversation("idem", &["alice"]).await;
    // Body field.
    let first = post(
        &server,
        json!({"sender": "alice", "content": "hello", "idempotency_key": "k-body"}),
        None,
    )
    .await;
    assert!(!first.deduped);
    let again = post(
        &server,
        json!({"sender": "alice", "content": "hello", "idempotency_key": "k-body"}),
        None,
    )
    .await;
    assert!(again.deduped, "second use of k-body must be deduped");
    assert_eq!(
        (&again.id, again.seq, &again.created_at),
        (&first.id, first.seq, &first.created_at),
        "a repeat returns the first result"
    );

    // Header.
    let h1 = post(
        &server,
        json!({"sender": "alice", "content": "via header"}),
        Some("k-header"),
    )
    .await;
    assert!(!h1.deduped);
    assert_eq!(h1.seq, first.seq + 1);
    let h2 = post(
        &server,
        json!({"sender": "alice", "content": "via header"}),
        Some("k-header"),
    )
    .await;
    assert!(h2.deduped, "second use of header key must be deduped");
    assert_eq!(
        (&h2.id, h2.seq, &h2.created_at),
        (&h1.id, h1.seq, &h1.created_at)
    );

    // The key is the key, whichever way it travels.
    let cross = post(
        &server,
        json!({"sender": "alice", "content": "hello"}),
        Some("k-body"),
    )
    .await;
    assert!(
        cross.deduped,
        "k-body sent as a header must hit the body's entry"
    );
    assert_eq!(cross.seq, first.seq);

    // A different key is a new message.
    let other = post(
        &server,
        json!({"sender": "alice", "content": "hello", "idempotency_key": "k-other"}),
        None,
    )
    .await;
    assert!(!other.deduped);
    assert_eq!(other.seq, h1.seq + 1);
    let page = server.page("idem", "after_seq=0").await;
    assert_eq!(page.seqs(), vec![1, 2, 3], "dedupes stored nothing");

    // The window survives a crash (keys come back from the WAL) ...
    server.kill9();
    server.restart();
    let after_crash = post(
        &server,
        json!({"sender": "alice", "content": "hello", "idempotency_key": "k-body"}),
        None,
    )
    .await;
    assert!(after_crash.deduped, "k-body must be deduped after kill -9");
    assert_eq!(
        (&after_crash.id, after_crash.seq, &after_crash.created_at),
        (&first.id, first.seq, &first.created_at)
    );
    let h3 = post(
        &server,
        json!({"sender": "alice", "content": "via header"}),
        Some("k-header"),
    )
    .await;
    assert!(h3.deduped, "k-header must be deduped after kill -9");
    assert_eq!((&h3.id, h3.seq), (&h1.id, h1.seq));

    // ... and a clean restart (keys come back from SQL).
    assert!(server.terminate().success());
    server.restart();
    let after_term = post(
        &server,
        json!({"sender": "alice", "content": "hello", "idempotency_key": "k-other"}),
        None,
    )
    .await;
    assert!(after_term.deduped, "k-other must be deduped after SIGTERM");
    assert_eq!(
        (&after_term.id, after_term.seq, &after_term.created_at),
        (&other.id, other.seq, &other.created_at)
    );
    let fresh = post(
        &server,
        json!({"sender": "alice", "content": "new", "idempotency_key": "k-fresh"}),
        None,
    )
    .await;
    assert!(!fresh.deduped);
    assert_eq!(
        fresh.seq, 4,
        "a new key after restarts continues at last_seq + 1"
    );
    let page = server.page("idem", "after_seq=0").await;
    assert_eq!(page.seqs(), vec![1, 2, 3, 4]);
}

/// Paging with a 512-byte ring: almost all of 250 messages live only in SQL, the newest in the
/// ring, so pages cross from one tier to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_forwards_and_backwards_across_sql_and_ring() {
    pages_walk(TestServer::builder()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_forwards_and_backwards_across_sql_and_ring_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    pages_walk(TestServer::builder().postgres(&db)).await;
}

async fn pages_walk(builder: ServerBuilder) {
    const N: u64 = 250;
    const PAGE: u64 = 40;
    let server = builder
        .env("FERRY_RUNTIME__RING_BYTES_PER_CONVERSATION", "512")
        .start();
    server.create_conversation("pages", &["p"]).await;
    for i in 1..=N {
        let ack = server
            .append("pages", "p", json!({ "n": i, "pad": "x".repeat(40) }))
            .await;
        assert_eq!(ack.seq, i);
    }

    // Once before and once after the archive caught up: the result must not depend on it.
    for pass in ["fresh", "archived"] {
        if pass == "archived" {
            server.wait_archived(Duration::from_secs(20)).await;
        }
        let sql_reads_before = sql_reads(&server).await;

        let mut forward = Vec::new();
        let mut after = 0;
        loop {
            let page = server
                .page("pages", &format!("after_seq={after}&limit={PAGE}"))
                .await;
            assert_eq!(page.last_seq, N);
            assert_eq!(page.first_available_seq, 1);
            let seqs = page.seqs();
            assert!(!seqs.is_empty(), "{pass}: empty page after_seq={after}");
            assert_eq!(
                seqs,
                (after + 1..=(after + PAGE).min(N)).collect::<Vec<_>>(),
                "{pass}: page after_seq={after}"
            );
            for m in &page.messages {
                assert_eq!(m["content"]["n"], seq_of(m), "{pass}: content of seq");
            }
            after = *seqs.last().expect("non-empty");
            forward.extend(seqs);
            assert_eq!(
                page.has_more,
                after < N,
                "{pass}: has_more after page ending at {after}"
            );
            if !page.has_more {
                break;
            }
        }
        assert_eq!(forward, (1..=N).collect::<Vec<_>>(), "{pass}: forward walk");

        let mut backward = Vec::new();
        let mut before = N + 1;
        loop {
            let page = server
                .page("pages", &format!("before_seq={before}&limit={PAGE}"))
                .await;
            assert_eq!(page.last_seq, N);
            let seqs = page.seqs();
            let expect: Vec<u64> = (before.saturating_sub(PAGE).max(1)..before).collect();
            assert_eq!(seqs, expect, "{pass}: page before_seq={before}");
            for m in &page.messages {
                assert_eq!(m["content"]["n"], seq_of(m), "{pass}: content of seq");
            }
            before = seqs[0];
            let more = page.has_more;
            backward.splice(0..0, seqs);
            assert_eq!(more, before > 1, "{pass}: has_more at before_seq={before}");
            if !more {
                break;
            }
        }
        assert_eq!(
            backward,
            (1..=N).collect::<Vec<_>>(),
            "{pass}: backward walk"
        );

        // Cursors past the end.
        let page = server
            .page("pages", &format!("after_seq={N}&limit={PAGE}"))
            .await;
        assert!(
            page.messages.is_empty() && !page.has_more,
            "{pass}: after the last"
        );
        let page = server
            .page("pages", &format!("before_seq={}&limit={PAGE}", N * 100))
            .await;
        assert_eq!(
            page.seqs(),
            (N - PAGE + 1..=N).collect::<Vec<_>>(),
            "{pass}: before far"
        );
        let page = server.page("pages", "before_seq=1&limit=10").await;
        assert!(
            page.messages.is_empty() && !page.has_more,
            "{pass}: before the first"
        );

        if pass == "archived" {
            let sql_reads_after = sql_reads(&server).await;
            assert!(
                sql_reads_after > sql_reads_before,
                "with a 512-byte ring the walk must read from SQL \
                 ({sql_reads_before} -> {sql_reads_after})"
            );
        }
    }
}

/// Appends to `idem`, the key in the body or (`header`) in an `Idempotency-Key` header.
async fn post(server: &TestServer, body: Value, header: Option<&str>) -> Ack {
    let mut req = server
        .client()
        .post(server.url("/v1/conversations/idem/messages"))
        .json(&body);
    if let Some(key) = header {
        req = req.header("Idempotency-Key", key);
    }
    let resp = req.send().await.expect("append");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("append body");
    assert_eq!(status, 201, "append: {body}");
    Ack::from_json(&body)
}

async fn sql_reads(server: &TestServer) -> f64 {
    let text = server.metrics().await;
    metric_sum(&text, "ferry_catchup_reads_total", &[("tier", "sql")]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_their_protocol_codes_never_500() {
    let server = TestServer::start();
    server.create_conversation("c1", &["alice"]).await;
    let client = server.client();
    let messages = server.url("/v1/conversations/c1/messages");

    let raw_post = |url: String, body: &'static str| {
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    // Bodies.
    for (body, what) in [
        (r#"{"sender": "alice", "content": "#, "malformed JSON"),
        ("not json at all", "not JSON"),
        ("", "empty body"),
        ("[1, 2, 3]", "JSON array"),
        (r#""a string""#, "JSON string"),
        ("42", "JSON number"),
        (r#"{"sender": "alice"}"#, "missing content"),
        (r#"{"content": "hi"}"#, "missing sender"),
        (r#"{"sender": "", "content": "hi"}"#, "empty sender"),
        (
            r#"{"sender": "bad sender", "content": "hi"}"#,
            "bad sender id",
        ),
        (
            r#"{"sender": "alice", "content": "hi", "metadata": [1]}"#,
            "metadata array",
        ),
        (
            r#"{"sender": "alice", "content": "hi", "metadata": "x"}"#,
            "metadata string",
        ),
        (
            r#"{"sender": "alice", "content": "hi", "metadata": 7}"#,
            "metadata number",
        ),
        (
            r#"{"sender": "alice", "content": "hi", "kind": ""}"#,
            "empty kind",
        ),
        (
            r#"{"sender": "alice", "content": "hi", "idempotency_key": ""}"#,
            "empty key",
        ),
        (r#"{"sender": 5, "content": "hi"}"#, "sender not a string"),
    ] {
        let resp = raw_post(messages.clone(), body).await.expect(what);
        expect_error(resp, 400, "invalid", &format!("POST {what}")).await;
    }

    // Conversation ids, on every route that takes one.
    let long_id = "c".repeat(129);
    // (`%FF` does not even decode to UTF-8.)
    for id in ["a%20b", long_id.as_str(), "a%2Fb", "caf%C3%A9", "a%FFb"] {
        let path = format!("/v1/conversations/{id}");
        let resp = client
            .put(server.url(&path))
            .json(&json!({"participants": ["alice"]}))
            .send()
            .await
            .expect("put");
        expect_error(resp, 400, "invalid", &format!("PUT conversation {id:.20}")).await;
        let resp = client
            .post(server.url(&format!("{path}/messages")))
            .json(&json!({"sender": "alice", "content": "x"}))
            .send()
            .await
            .expect("post");
        expect_error(resp, 400, "invalid", &format!("POST to {id:.20}")).await;
        let resp = client
            .get(server.url(&format!("{path}/messages")))
            .send()
            .await
            .expect("get");
        expect_error(resp, 400, "invalid", &format!("GET messages of {id:.20}")).await;
    }
    // …and without credentials that is still a 401 first.
    let resp = server
        .anonymous_client()
        .get(server.url("/v1/conversations/a%FFb/messages"))
        .send()
        .await
        .expect("get");
    expect_error(resp, 401, "unauthorized", "undecodable id without a key").await;
    let resp = client
        .get(server.url("/v1/participants/a%FFb/inbox"))
        .send()
        .await
        .expect("get");
    expect_error(resp, 400, "invalid", "undecodable participant id").await;
    // 128 characters is still fine.
    server
        .create_conversation(&"c".repeat(128), &["alice"])
        .await;

    // PUT bodies.
    let put_url = server.url("/v1/conversations/c2");
    for (body, what) in [
        (
            json!({"participants": ["alice", "bad id"]}),
            "participant with space",
        ),
        (json!({"participants": [""]}), "empty participant"),
        (
            json!({"participants": ["p".repeat(129)]}),
            "129-char participant",
        ),
        (json!({"participants": [5]}), "participant not a string"),
        (json!({"participants": "alice"}), "participants not a list"),
        (json!({}), "missing participants"),
        (
            json!({"participants": ["alice"], "metadata": [1]}),
            "metadata array",
        ),
        (
            json!({"participants": ["alice"], "metadata": "m"}),
            "metadata string",
        ),
        (json!(["alice"]), "body not an object"),
    ] {
        let resp = client.put(&put_url).json(&body).send().await.expect(what);
        expect_error(resp, 400, "invalid", &format!("PUT {what}")).await;
    }
    let resp = client
        .put(&put_url)
        .header("content-type", "application/json")
        .body("{\"participants\": [")
        .send()
        .await
        .expect("put");
    expect_error(resp, 400, "invalid", "PUT malformed JSON").await;
    // None of those created c2.
    let resp = client
        .get(server.url("/v1/conversations/c2"))
        .send()
        .await
        .expect("get c2");
    expect_error(resp, 404, "not_found", "GET c2 after rejected PUTs").await;

    // Size: just over the 64 KiB message limit, and far over the body limit.
    for size in [64 * 1024 + 1, 300 * 1024] {
        let resp = client
            .post(&messages)
            .json(&json!({"sender": "alice", "content": "x".repeat(size)}))
            .send()
            .await
            .expect("big post");
        // Past the body limit the server answers before reading the whole body, so it cannot
        // read another request on this connection: it says so, and the client opens a new one
        // for the next request. Under it, the body was read and the connection stays.
        let close = (size > 200 * 1024).then_some(&b"close"[..]);
        assert_eq!(
            resp.headers().get("connection").map(|v| v.as_bytes()),
            close,
            "{size}-byte content: only an answer before the body's end closes the connection"
        );
        expect_error(resp, 413, "too_large", &format!("{size}-byte content")).await;
    }
    let resp = client
        .post(&messages)
        .json(&json!({"sender": "alice", "content": "x".repeat(60 * 1024)}))
        .send()
        .await
        .expect("60k post");
    assert_eq!(
        resp.status().as_u16(),
        201,
        "60 KiB content is under the limit"
    );
    assert!(
        resp.headers().get("connection").is_none(),
        "a request whose body was read keeps its connection"
    );

    // Credentials.
    let anon = server.anonymous_client();
    let resp = anon
        .post(&messages)
        .json(&json!({"sender": "alice", "content": "x"}))
        .send()
        .await
        .expect("anon post");
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "credentials are refused before the body is read, so the connection closes"
    );
    expect_error(resp, 401, "unauthorized", "append without a key").await;
    let resp = anon.get(&messages).send().await.expect("anon get");
    assert!(
        resp.headers().get("connection").is_none(),
        "a request without a body keeps its connection"
    );
    expect_error(resp, 401, "unauthorized", "read without a key").await;
    let resp = anon
        .put(server.url("/v1/conversations/c3"))
        .json(&json!({"participants": ["alice"]}))
        .send()
        .await
        .expect("anon put");
    expect_error(resp, 401, "unauthorized", "PUT without a key").await;
    for auth in [
        "Bearer wrong-key",
        "Bearer ",
        "Basic Zm9vOmJhcg==",
        "it-admin-key-7f3c9a",
    ] {
        let resp = anon
            .post(&messages)
            .header("authorization", auth)
            .json(&json!({"sender": "alice", "content": "x"}))
            .send()
            .await
            .expect("bad key post");
        expect_error(resp, 401, "unauthorized", &format!("Authorization: {auth}")).await;
    }
    // Credentials come first: without them a bad or oversized body is still a 401.
    let huge = "x".repeat(300 * 1024);
    for (method, path, body) in [
        ("POST", "/v1/conversations/c1/messages", "not json"),
        ("POST", "/v1/conversations/c1/messages", ""),
        ("POST", "/v1/conversations/c1/messages", huge.as_str()),
        ("PUT", "/v1/conversations/c9", "{"),
        ("POST", "/v1/conversations/c1/read", ""),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        // A fresh connection each: the server answers 401 before reading the body and then
        // closes a connection whose body it did not read, which a pooled client could reuse.
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let resp = fresh
            .request(method.clone(), server.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("anon bad body");
        let what = format!("{method} {path} without a key, body {:.10}", body);
        expect_error(resp, 401, "unauthorized", &what).await;
    }

    // Nesting: as deep as MAX_JSON_DEPTH (64) is stored and served back; deeper is invalid,
    // in content and in metadata, and nothing of it is stored.
    let nested = |depth: usize| {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        serde_json::from_str::<Value>(&text).expect("nested JSON")
    };
    let resp = client
        .post(&messages)
        .json(&json!({"sender": "alice", "content": nested(65)}))
        .send()
        .await
        .expect("too deep content");
    expect_error(resp, 400, "invalid", "content nested 65 deep").await;
    let resp = client
        .post(&messages)
        .json(&json!({"sender": "alice", "content": "x", "metadata": {"a": nested(64)}}))
        .send()
        .await
        .expect("too deep metadata");
    expect_error(resp, 400, "invalid", "metadata nested 65 deep").await;
    let resp = client
        .put(server.url("/v1/conversations/deep"))
        .json(&json!({"participants": ["alice"], "metadata": {"a": nested(64)}}))
        .send()
        .await
        .expect("too deep conversation metadata");
    expect_error(resp, 400, "invalid", "conversation metadata nested 65 deep").await;
    let resp = client
        .get(server.url("/v1/conversations/deep"))
        .send()
        .await
        .expect("get deep");
    expect_error(
        resp,
        404,
        "not_found",
        "the refused conversation was not created",
    )
    .await;
    server.create_conversation("deep-ok", &["alice"]).await;
    server.append("deep-ok", "alice", nested(64)).await;
    let page = server.get_json("/v1/conversations/deep-ok/messages").await;
    assert_eq!(
        page["messages"][0]["content"],
        nested(64),
        "64 deep reads back"
    );
    // The inbox holds the 64-deep message and still answers 200.
    server.get_json("/v1/participants/alice/inbox").await;

    // Unknown conversations.
    let resp = client
        .post(server.url("/v1/conversations/nobody/messages"))
        .json(&json!({"sender": "alice", "content": "x"}))
        .send()
        .await
        .expect("post unknown");
    expect_error(resp, 404, "not_found", "append to unknown conversation").await;
    let resp = client
        .get(server.url("/v1/conversations/nobody/messages"))
        .send()
        .await
        .expect("get unknown");
    expect_error(resp, 404, "not_found", "read unknown conversation").await;
    let resp = client
        .get(server.url("/v1/conversations/nobody"))
        .send()
        .await
        .expect("get unknown meta");
    expect_error(resp, 404, "not_found", "GET unknown conversation").await;

    // Query parameters.
    for query in [
        "after_seq=-1",
        "after_seq=abc",
        "after_seq=1.5",
        "before_seq=-1",
        "before_seq=abc",
        "limit=0",
        "limit=1001",
        "limit=-5",
        "limit=abc",
        "after_seq=1&before_seq=5",
    ] {
        let resp = client
            .get(format!("{messages}?{query}"))
            .send()
            .await
            .expect(query);
        expect_error(resp, 400, "invalid", &format!("GET ?{query}")).await;
    }
    // The bounds themselves are fine.
    for query in ["limit=1", "limit=1000", "after_seq=0", "after_seq=999999"] {
        server.page("c1", query).await;
    }

    // Unknown routes and methods are protocol errors too.
    let resp = client
        .get(server.url("/v1/nothing/here"))
        .send()
        .await
        .expect("unknown route");
    expect_error(resp, 404, "not_found", "unknown route").await;
    let resp = client
        .delete(server.url("/v1/conversations/c1"))
        .send()
        .await
        .expect("DELETE");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("405 body is JSON");
    assert!(
        status == 405 && body["error"].is_string(),
        "DELETE on a conversation: {status} {body}"
    );

    // Still serving after all of that, and nothing was stored by the rejected appends.
    let resp = client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(resp.status().as_u16(), 200);
    let ack = server.append("c1", "alice", json!("still here")).await;
    assert_eq!(ack.seq, 2, "only the 60 KiB append was stored before");
    let text = server.metrics().await;
    assert!(
        metric_sum(&text, "ferry_http_errors_total", &[("code", "invalid")]).unwrap_or(0.0) > 0.0,
        "errors are counted by code"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_endpoints() {
    let server = TestServer::start();
    let anon = server.anonymous_client();
    for url in [
        server.url("/healthz"),
        server.url("/readyz"),
        server.admin_url("/healthz"),
        server.admin_url("/readyz"),
    ] {
        let resp = anon.get(&url).send().await.expect(&url);
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        let body: Value = resp.json().await.expect("JSON body");
        let expected = if url.ends_with("/healthz") {
            "ok"
        } else {
            "ready"
        };
        assert_eq!(
            body["status"], expected,
            "GET {url}: both listeners answer alike"
        );
    }

    server.create_conversation("m", &["a"]).await;
    for i in 0..3 {
        server.append("m", "a", json!(i)).await;
    }
    let text = server.metrics().await;
    let appends = metric_sum(&text, "ferry_appends_total", &[("result", "ok")]);
    assert!(
        appends.is_some_and(|n| n >= 3.0),
        "ferry_appends_total{{result=\"ok\"}} should count 3 appends, got {appends:?}\n{text}"
    );
    let fsyncs = metric_sum(&text, "ferry_wal_fsync_seconds_count", &[]);
    assert!(
        fsyncs.is_some_and(|n| n >= 1.0),
        "ferry_wal_fsync_seconds should have observations, got {fsyncs:?}\n{text}"
    );
    assert!(
        text.contains("ferry_wal_fsync_seconds_bucket"),
        "fsync is a histogram"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_round_trip_with_the_protocol_shape() {
    round_trip(TestServer::builder()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_round_trip_with_the_protocol_shape_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    round_trip(TestServer::builder().postgres(&db)).await;
}

async fn round_trip(builder: ServerBuilder) {
    let mut server = builder.start();
    let created = server.create_conversation("shape", &["alice", "bob"]).await;
    assert_eq!(created["id"], "shape");
    assert_eq!(created["last_seq"], 0);
    assert_eq!(created["participants"], json!(["alice", "bob"]));
    assert_eq!(created["metadata"], json!({}));
    // A second PUT is 200, not 201.
    let resp = server
        .client()
        .put(server.url("/v1/conversations/shape"))
        .json(&json!({"participants": ["alice"]}))
        .send()
        .await
        .expect("second PUT");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "PUT of an existing conversation"
    );

    // `content` is any JSON value (null: see `null_content_is_a_valid_value`).
    let contents = [
        json!(0),
        json!(-1.5),
        json!(true),
        json!("text"),
        json!([1, "two", {"three": 3}]),
        json!({"nested": {"list": [], "empty": {}}}),
    ];
    let mut acks = Vec::new();
    for content in &contents {
        let (status, body) = server
            .post_message(
                "shape",
                &json!({
                    "sender": "bob",
                    "kind": "event",
                    "content": content,
                    "metadata": {"source": "it"},
                }),
            )
            .await;
        assert_eq!(status, 201, "content {content} must be accepted: {body}");
        acks.push(Ack::from_json(&body));
    }
    let page = server.page("shape", "after_seq=0").await;
    assert_eq!(page.messages.len(), contents.len());
    for ((message, content), ack) in page.messages.iter().zip(&contents).zip(&acks) {
        assert_eq!(&message["content"], content);
        assert_eq!(message["seq"], ack.seq);
        assert_eq!(message["id"], ack.id.as_str());
        assert_eq!(message["created_at"], ack.created_at.as_str());
        assert_eq!(message["sender"], "bob");
        assert_eq!(message["kind"], "event");
        assert_eq!(message["metadata"], json!({"source": "it"}));
        assert_eq!(message["conversation_id"], "shape");
        // UUIDv7: version nibble 7 at position 14 of the hyphenated form.
        let id = ack.id.as_str();
        assert_eq!(id.len(), 36, "uuid {id}");
        assert_eq!(&id[14..15], "7", "id {id} is not a UUIDv7");
        // RFC 3339 UTC with milliseconds: 2024-01-02T03:04:05.678Z
        let ts = ack.created_at.as_bytes();
        assert!(
            ts.len() == 24 && ts[10] == b'T' && ts[19] == b'.' && ts[23] == b'Z',
            "created_at {} is not RFC 3339 UTC with milliseconds",
            ack.created_at
        );
    }

    // The same answer from the archive alone: after a clean restart nothing is in the ring.
    assert!(server.terminate().success(), "SIGTERM exits 0");
    server.restart();
    let archived = server.page("shape", "after_seq=0").await;
    assert_eq!(archived.messages, page.messages, "read back from SQL");
}

/// PROTOCOL.md: `content` is any JSON value. An explicit `null` is a value, unlike an absent
/// field (which is `invalid`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_content_is_a_valid_value() {
    let server = TestServer::start();
    server.create_conversation("nulls", &["a"]).await;
    let (status, body) = server
        .post_message("nulls", &json!({"sender": "a", "content": null}))
        .await;
    assert_eq!(
        status, 201,
        "explicit null content must be accepted: {body}"
    );
    let page = server.page("nulls", "after_seq=0").await;
    assert_eq!(page.messages.len(), 1);
    assert!(page.messages[0]["content"].is_null());
    assert_eq!(page.messages[0].get("content"), Some(&json!(null)));
}

/// Many clients retrying the same key at once (the first not yet durable) store one message and
/// all get its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_of_one_key_store_one_message() {
    let server = TestServer::start();
    server.create_conversation("race", &["a"]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = server.client();
        let url = server.url("/v1/conversations/race/messages");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&json!({"sender": "a", "content": i, "idempotency_key": "same"}))
                .send()
                .await
                .expect("append");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("body");
            assert_eq!(status, 201, "{body}");
            Ack::from_json(&body)
        }));
    }
    let mut acks = Vec::new();
    for t in tasks {
        acks.push(t.await.expect("task"));
    }
    let fresh: Vec<&Ack> = acks.iter().filter(|a| !a.deduped).collect();
    assert_eq!(
        fresh.len(),
        1,
        "exactly one append is not deduped: {acks:?}"
    );
    for a in &acks {
        assert_eq!(
            (a.seq, &a.id, &a.created_at),
            (fresh[0].seq, &fresh[0].id, &fresh[0].created_at),
            "every repeat returns the first result"
        );
    }
    let page = server.page("race", "after_seq=0").await;
    assert_eq!(page.seqs(), vec![1], "one message stored");
}

/// A reader following `after_seq` while writers append and the archiver evicts from a tiny ring
/// sees every seq exactly once, in order, with no holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_following_live_appends_sees_no_holes() {
    const WRITERS: u64 = 8;
    const PER_WRITER: u64 = 30;
    const TOTAL: u64 = WRITERS * PER_WRITER;
    let server = TestServer::builder()
        .env("FERRY_RUNTIME__RING_BYTES_PER_CONVERSATION", "512")
        .start();
    server.create_conversation("live", &["w"]).await;

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = server.client();
        let url = server.url("/v1/conversations/live/messages");
        writers.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let resp = client
                    .post(&url)
                    .json(
                        &json!({"sender": "w", "content": {"w": w, "i": i, "pad": "p".repeat(64)}}),
                    )
                    .send()
                    .await
                    .expect("append");
                assert_eq!(resp.status().as_u16(), 201);
            }
        }));
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut after = 0;
    while after < TOTAL {
        assert!(
            std::time::Instant::now() < deadline,
            "reader stuck at {after}"
        );
        let page = server
            .page("live", &format!("after_seq={after}&limit=7"))
            .await;
        let seqs = page.seqs();
        let expect: Vec<u64> = (after + 1..=after + seqs.len() as u64).collect();
        assert_eq!(
            seqs, expect,
            "page after_seq={after} must continue without holes"
        );
        assert!(page.last_seq >= after + seqs.len() as u64);
        if let Some(&last) = seqs.last() {
            after = last;
        } else {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen.extend(seqs);
    }
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>());
}

/// `limits.max_page_bytes` bounds a page in bytes as well as count: a page stops before the
/// message that would cross it (but always holds one), says `has_more`, and walking pages in
/// either direction still gives every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_in_bytes_as_well_as_count() {
    let server = TestServer::builder()
        .env("FERRY_LIMITS__MAX_PAGE_BYTES", "1000")
        .start();
    server.create_conversation("big", &["alice"]).await;
    let text = "x".repeat(280);
    for i in 0..10 {
        server
            .append("big", "alice", json!({ "i": i, "text": text }))
            .await;
    }
    // One message alone is larger than the page budget's remainder after three.
    server
        .append("big", "alice", json!({ "text": "y".repeat(2000) }))
        .await;
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = server
            .page("big", &format!("after_seq={after}&limit=100"))
            .await;
        assert!(!page.messages.is_empty());
        let bytes: usize = page.messages.iter().map(|m| m.to_string().len()).sum();
        assert!(
            page.messages.len() == 1 || bytes <= 1000,
            "{} messages, {bytes} bytes",
            page.messages.len()
        );
        seen.extend(page.seqs());
        after = *seen.last().unwrap();
        if !page.has_more {
            break;
        }
        assert!(page.messages.len() < 11, "cut short by bytes, not count");
    }
    assert_eq!(seen, (1..=11).collect::<Vec<u64>>());
    // Backwards: the newest that fit, then older pages.
    let page = server.page("big", "before_seq=11&limit=100").await;
    assert!(page.has_more && page.messages.len() < 10);
    assert_eq!(page.seqs().last(), Some(&10));
    let page = server.page("big", "before_seq=12&limit=100").await;
    assert_eq!(
        page.seqs(),
        vec![11],
        "a message over the budget comes alone"
    );
    assert!(page.has_more);
}

/// Every number a client supplies — positions, limits, cursor seqs — at and past the edges of
/// u64: a clear `invalid`, or clamped to "past the end", never a panic, a wrap or a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_numbers_are_invalid_or_clamped_never_500() {
    let server = TestServer::start();
    server.create_conversation("edge", &["alice"]).await;
    for i in 0..3 {
        server.append("edge", "alice", json!(i)).await;
    }
    let client = server.client();
    let max = u64::MAX.to_string();
    let past = "18446744073709551616";

    // Positions past the end read as "nothing after it"; from the end backwards, everything.
    for query in [
        format!("after_seq={max}"),
        format!("after_seq={}", i64::MAX),
    ] {
        let page = server.page("edge", &query).await;
        assert!(page.messages.is_empty() && !page.has_more, "{query}");
        assert_eq!(page.last_seq, 3, "{query}");
    }
    let page = server.page("edge", &format!("before_seq={max}")).await;
    assert_eq!(page.seqs(), vec![1, 2, 3]);

    for query in [
        format!("after_seq={past}"),
        "after_seq=-1".into(),
        "after_seq=1.5".into(),
        "after_seq=1e3".into(),
        "after_seq=abc".into(),
        format!("before_seq={past}"),
        "before_seq=-3".into(),
        format!("limit={max}"),
        format!("limit={past}"),
        "limit=-1".into(),
        "limit=0".into(),
    ] {
        let resp = client
            .get(server.url(&format!("/v1/conversations/edge/messages?{query}")))
            .send()
            .await
            .expect("GET");
        expect_error(resp, 400, "invalid", &query).await;
    }

    // The stream: a huge position (query or Last-Event-ID) is the live end; garbage is invalid.
    for (query, header) in [
        (format!("?after_seq={max}"), None),
        (String::new(), Some(max.clone())),
    ] {
        let mut request = client.get(server.url(&format!("/v1/conversations/edge/stream{query}")));
        if let Some(h) = &header {
            request = request.header("last-event-id", h);
        }
        let resp = request.send().await.expect("GET stream");
        assert_eq!(resp.status().as_u16(), 200, "{query} {header:?}");
    }
    for (query, header) in [
        (format!("?after_seq={past}"), None),
        ("?after_seq=-1".to_owned(), None),
        (String::new(), Some(past.to_owned())),
        (String::new(), Some("-7".to_owned())),
    ] {
        let mut request = client.get(server.url(&format!("/v1/conversations/edge/stream{query}")));
        if let Some(h) = &header {
            request = request.header("last-event-id", h);
        }
        let resp = request.send().await.expect("GET stream");
        expect_error(resp, 400, "invalid", &format!("stream {query} {header:?}")).await;
    }

    // Cursor seqs: beyond the last message, negative, fractional, too large or not a number.
    let read = server.url("/v1/conversations/edge/read");
    for body in [
        format!(r#"{{"participant": "alice", "seq": {max}}}"#),
        format!(r#"{{"participant": "alice", "seq": {past}}}"#),
        r#"{"participant": "alice", "seq": -1}"#.to_owned(),
        r#"{"participant": "alice", "seq": 1.5}"#.to_owned(),
        r#"{"participant": "alice", "seq": 1e300}"#.to_owned(),
        r#"{"participant": "alice", "seq": "2"}"#.to_owned(),
    ] {
        let resp = client
            .post(&read)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("POST read");
        expect_error(resp, 400, "invalid", &body).await;
    }
    // The node is unharmed.
    assert_eq!(server.append("edge", "alice", json!("after")).await.seq, 4);
}
