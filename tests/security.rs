//! The hardening contract of one real node (PROTOCOL.md, "Limits, rate limits, keys and tokens"):
//! scoped API keys and their lifecycle through `/admin/keys` and `ferry admin keys`, keys stored
//! peppered, what a bad credential costs, every `[rate]` limit answered as documented and passing
//! again after its window, and the topic and socket limits.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;

use common::ws::{assert_error, socket_url, Ws};
use common::{expect_error, metric_sum, TestServer, API_KEY};

/// A client of the public and admin API with `key` as its bearer token.
fn client_with(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn create_key(server: &TestServer, name: &str, scope: &str) -> Value {
    let resp = server
        .client()
        .post(server.admin_url("/admin/keys"))
        .json(&json!({"name": name, "scope": scope}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "create {scope} key");
    let body: Value = resp.json().await.unwrap();
    for field in ["id", "name", "scope", "key", "created_at"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
    assert_eq!(body["scope"], scope);
    body
}

async fn status_of(resp: reqwest::Response) -> u16 {
    resp.status().as_u16()
}

/// Polls `probe` until it is true; fails after `timeout` naming `what`.
async fn eventually(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if probe().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status a WebSocket upgrade with `token` is answered with (101 when it is accepted).
async fn upgrade_status(server: &TestServer, token: &str) -> (u16, Option<Ws>) {
    let url = socket_url(server, &format!("vsn=2.0.0&token={token}"));
    match tokio_tungstenite::connect_async(url).await {
        Ok((stream, response)) => (
            response.status().as_u16(),
            Some(Ws {
                stream,
                pending: Default::default(),
                next_ref: 0,
            }),
        ),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            (response.status().as_u16(), None)
        }
        Err(e) => panic!("websocket connect failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_have_scopes_and_are_created_listed_revoked_and_rotated() {
    let server = TestServer::start();
    server
        .create_conversation("scoped", &["alice", "bob"])
        .await;

    // A service key: the public API for any participant, no /admin.
    let service = create_key(&server, "backend", "service").await;
    let service_client = client_with(service["key"].as_str().unwrap());
    let resp = service_client
        .post(server.url("/v1/conversations/scoped/messages"))
        .json(&json!({"sender": "alice", "content": "from service"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let resp = service_client
        .get(server.admin_url("/admin/keys"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden", "a service key on /admin").await;

    // A read key: reads, joins and streams; no send and no cursor move.
    let read = create_key(&server, "dashboard", "read").await;
    let read_key = read["key"].as_str().unwrap();
    let read_client = client_with(read_key);
    let resp = read_client
        .get(server.url("/v1/conversations/scoped/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "a read key reads");
    let resp = read_client
        .post(server.url("/v1/conversations/scoped/messages"))
        .json(&json!({"sender": "alice", "content": "no"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden", "a read key sending").await;
    let resp = read_client
        .post(server.url("/v1/conversations/scoped/read"))
        .json(&json!({"participant": "alice", "seq": 1}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden", "a read key moving a cursor").await;
    let resp = read_client
        .put(server.url("/v1/conversations/other"))
        .json(&json!({"participants": ["alice"]}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden", "a read key creating a conversation").await;
    let mut ws = Ws::connect(&server, read_key).await;
    let (join_ref, _) = ws.join_ok("conversation:scoped", json!({})).await;
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:scoped",
            "send",
            json!({"sender": "alice", "content": "no"}),
        )
        .await;
    assert_error(&reply, "forbidden", "a read key sending over the socket");
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:scoped",
            "typing",
            json!({"participant": "alice"}),
        )
        .await;
    assert_error(&reply, "forbidden", "a read key typing");

    // An admin key may use /admin.
    let admin = create_key(&server, "ops", "admin").await;
    let resp = client_with(admin["key"].as_str().unwrap())
        .get(server.admin_url("/admin/slots"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    // Bad requests get the protocol's answers.
    let resp = server
        .client()
        .post(server.admin_url("/admin/keys"))
        .json(&json!({"name": "x", "scope": "root"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid", "an unknown scope").await;
    let resp = server
        .client()
        .delete(server.admin_url("/admin/keys/key_nope"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "not_found", "revoking an unknown key").await;

    // The list shows every key without a secret, with its last use.
    let list: Value = server
        .client()
        .get(server.admin_url("/admin/keys"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = list["keys"].as_array().unwrap();
    let listed: HashSet<&str> = keys.iter().map(|k| k["id"].as_str().unwrap()).collect();
    for k in [&service, &read, &admin] {
        assert!(listed.contains(k["id"].as_str().unwrap()), "{list}");
    }
    assert!(!list.to_string().contains(service["key"].as_str().unwrap()));
    assert!(keys
        .iter()
        .all(|k| k.get("key").is_none() && k.get("key_hash").is_none()));
    let service_row = keys.iter().find(|k| k["id"] == service["id"]).unwrap();
    assert!(service_row["last_used_at"].is_string(), "{service_row}");
    assert_eq!(service_row["state"], "active");

    // Revoked: refused at once, and its open socket is closed.
    let resp = server
        .client()
        .delete(server.admin_url(&format!("/admin/keys/{}", read["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = read_client
        .get(server.url("/v1/conversations/scoped/messages"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized", "a revoked key").await;
    // (After the replay of what the socket joined to.)
    let mut frame = ws.next_frame().await;
    while frame[3] == "message" {
        frame = ws.next_frame().await;
    }
    assert_eq!(
        (frame[2].as_str(), frame[3].as_str()),
        (Some("conversation:scoped"), Some("phx_error")),
        "the revoked key's topic is told first: {frame}"
    );
    let (code, reason) = ws.expect_close().await;
    assert_eq!(u16::from(code), 4401, "{reason}");

    // Rotated with a grace: both work, then only the new one.
    let resp = server
        .client()
        .post(server.admin_url(&format!(
            "/admin/keys/{}/rotate",
            service["id"].as_str().unwrap()
        )))
        .json(&json!({"grace_s": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let rotated: Value = resp.json().await.unwrap();
    assert_eq!(rotated["replaces"], service["id"]);
    assert_eq!(rotated["scope"], "service");
    assert!(rotated["replaced_key_expires_at"].is_string(), "{rotated}");
    let new_client = client_with(rotated["key"].as_str().unwrap());
    for (client, what) in [
        (&service_client, "old key in its grace"),
        (&new_client, "new key"),
    ] {
        let resp = client
            .get(server.url("/v1/conversations/scoped"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{what}");
    }
    eventually(
        "the old key ends after its grace",
        Duration::from_secs(10),
        async || {
            status_of(
                service_client
                    .get(server.url("/v1/conversations/scoped"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
                == 401
        },
    )
    .await;
    let resp = new_client
        .get(server.url("/v1/conversations/scoped"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the new key after the grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_admin_keys_creates_lists_rotates_and_revokes() {
    let server = TestServer::start();
    let admin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("admin")
            .args(args)
            .args(["--admin-url", &format!("http://{}", server.admin)])
            .env("FERRY_API_KEY", API_KEY)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = admin(&["keys", "create", "reporting", "--scope", "read"]);
    assert!(ok, "{out}{err}");
    let field = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let id = field(&out, "id");
    let key = field(&out, "key");
    assert_eq!(field(&out, "scope"), "read");
    let resp = client_with(&key)
        .get(server.url("/v1/participants/alice/inbox"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the created read key works");

    let (ok, out, err) = admin(&["keys", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains(&id) && out.contains("reporting"), "{out}");
    assert!(!out.contains(&key), "the list never shows a secret: {out}");

    let (ok, out, err) = admin(&["keys", "rotate", &id, "--grace", "1m"]);
    assert!(ok, "{err}");
    let new_key = field(&out, "key");
    assert!(out.contains(&format!("replaces {id}")), "{out}");
    for k in [&key, &new_key] {
        let resp = client_with(k)
            .get(server.url("/v1/participants/alice/inbox"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "both keys work during the grace"
        );
    }
    let (ok, out, err) = admin(&["keys", "revoke", &id]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let resp = client_with(&key)
        .get(server.url("/v1/participants/alice/inbox"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized", "the revoked key").await;
    let (ok, _, err) = admin(&["keys", "revoke", "key_0000000000000000"]);
    assert!(!ok && err.contains("not_found"), "{err}");
    let (ok, _, err) = admin(&["keys", "rotate", &id, "--grace", "soon"]);
    assert!(!ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_peppered_and_bad_credentials_cost_no_repeated_lookup() {
    let server = TestServer::start();
    let created = create_key(&server, "peppered", "service").await;
    let key = created["key"].as_str().unwrap();

    // Neither the key nor its plain SHA-256 is in the table.
    let db = server.data_dir().join("ferry.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT key_hash, hash_version FROM api_keys WHERE id = $1")
            .bind(created["id"].as_str().unwrap())
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    use sha2::Digest;
    let plain = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    assert_ne!(rows[0].0, plain);
    assert!(!rows[0].0.contains(key));
    assert_eq!(rows[0].1, 2);
    drop(conn);

    let lookups = |text: &str, result: &str| {
        metric_sum(text, "ferry_api_key_lookups_total", &[("result", result)]).unwrap_or(0.0)
    };
    let before = server.metrics().await;
    // Malformed credentials are refused before any lookup.
    for token in ["short", "has a space in it", &"x".repeat(9000)] {
        let resp = client_with_raw(token)
            .get(server.url("/v1/conversations/c"))
            .send()
            .await
            .unwrap();
        expect_error(resp, 401, "unauthorized", "a malformed credential").await;
    }
    // An unknown key is looked up once, then remembered.
    let unknown = client_with("fk_0123456789abcdef0123456789abcdef");
    for _ in 0..5 {
        let resp = unknown
            .get(server.url("/v1/conversations/c"))
            .send()
            .await
            .unwrap();
        expect_error(resp, 401, "unauthorized", "an unknown key").await;
    }
    let after = server.metrics().await;
    assert_eq!(
        lookups(&after, "unknown") - lookups(&before, "unknown"),
        1.0,
        "{after}"
    );
    assert_eq!(
        lookups(&after, "negative_cached") - lookups(&before, "negative_cached"),
        4.0
    );
    assert!(lookups(&after, "malformed") - lookups(&before, "malformed") >= 2.0);

    // The key works after a restart (the pepper is kept in the data dir).
    let mut server = server;
    server.terminate();
    server.restart();
    let resp = client_with(key)
        .get(server.url("/v1/participants/alice/inbox"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// A client whose Authorization header is sent as given (even where `HeaderValue` would refuse a
/// typed one).
fn client_with_raw(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_bytes(format!("Bearer {token}").as_bytes()).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Asserts a 429 `try_again` / `rate_limited` answer with `Retry-After`; returns its wait.
async fn expect_rate_limited(resp: reqwest::Response, what: &str) -> Duration {
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{what}: no Retry-After"));
    assert!(retry_after >= 1, "{what}");
    let body = expect_error(resp, 429, "try_again", what).await;
    assert_eq!(body["detail"], "rate_limited", "{what}: {body}");
    let ms = body["retry_after_ms"].as_u64().unwrap();
    assert!(ms >= 1 && ms <= retry_after * 1000, "{what}: {body}");
    Duration::from_millis(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rate_limit_answers_429_and_passes_again_after_its_window() {
    let server = TestServer::builder()
        .with_rate_limits()
        .env("FERRY_RATE__APPENDS", "5/s")
        .env("FERRY_RATE__CONNECTS_PER_IP", "3/s")
        .env("FERRY_RATE__AUTH_FAILURES_PER_IP", "4/s")
        .env("FERRY_RATE__EPHEMERAL", "3/s")
        .start();
    server
        .create_conversation("limited", &["alice", "bob"])
        .await;
    let client = server.client();
    let post = || {
        client
            .post(server.url("/v1/conversations/limited/messages"))
            .json(&json!({"sender": "alice", "content": "x"}))
            .send()
    };

    // Appends, per principal, over HTTP and WebSocket together.
    let mut passed = 0;
    let wait = loop {
        let resp = post().await.unwrap();
        if resp.status().as_u16() == 429 {
            break expect_rate_limited(resp, "the append past the limit").await;
        }
        assert_eq!(resp.status().as_u16(), 201);
        passed += 1;
        assert!(passed <= 5, "more than 5 appends passed in their window");
    };
    assert!(passed >= 1, "the first appends pass");
    tokio::time::sleep(wait).await;
    assert_eq!(
        post().await.unwrap().status().as_u16(),
        201,
        "after the window"
    );

    // Ephemeral events, per socket.
    let mut ws = Ws::connect(&server, API_KEY).await;
    let (join_ref, _) = ws.join_ok("conversation:limited", json!({})).await;
    let mut refused = None;
    for _ in 0..10 {
        let reply = ws
            .call(
                Some(&join_ref),
                "conversation:limited",
                "typing",
                json!({"participant": "alice"}),
            )
            .await;
        if reply["status"] == "error" {
            refused = Some(reply);
            break;
        }
    }
    let reply = refused.expect("typing past the limit is refused");
    assert_error(&reply, "try_again", "typing past the limit");
    assert_eq!(reply["response"]["detail"], "rate_limited", "{reply}");
    let ms = reply["response"]["retry_after_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let reply = ws
        .call(
            Some(&join_ref),
            "conversation:limited",
            "typing",
            json!({"participant": "alice"}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "typing after the window: {reply}");
    drop(ws);

    // Connects, per client IP: WebSocket upgrades and SSE streams.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut open = Vec::new();
    let status = loop {
        let (status, ws) = upgrade_status(&server, API_KEY).await;
        if status != 101 {
            break status;
        }
        open.push(ws);
        assert!(
            open.len() <= 3,
            "more than 3 connects passed in their window"
        );
    };
    assert_eq!(status, 429, "an upgrade past connects_per_ip");
    let resp = client
        .get(server.url("/v1/conversations/limited/stream"))
        .send()
        .await
        .unwrap();
    expect_rate_limited(resp, "an SSE stream past connects_per_ip").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = upgrade_status(&server, API_KEY).await;
    assert_eq!(status, 101, "an upgrade after the window");

    // Authentication failures, per client IP: past them even a new credential is not looked at,
    // while a key already known keeps working.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let bad = client_with("fk_not-a-key-at-all-0000");
    let mut failures = 0;
    let wait = loop {
        let resp = bad
            .get(server.url("/v1/conversations/limited"))
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() == 429 {
            break expect_rate_limited(resp, "the auth failure past the limit").await;
        }
        expect_error(resp, 401, "unauthorized", "a bad key").await;
        failures += 1;
        assert!(failures <= 4, "more than 4 failures answered 401");
    };
    let resp = client_with("fk_another-unknown-key-1111")
        .get(server.url("/v1/conversations/limited"))
        .send()
        .await
        .unwrap();
    expect_rate_limited(resp, "a new credential from a blocked IP").await;
    let resp = client
        .get(server.url("/v1/conversations/limited"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "a known key from a blocked IP");
    tokio::time::sleep(wait).await;
    let resp = bad
        .get(server.url("/v1/conversations/limited"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized", "after the window").await;

    // Health and metrics are never limited.
    for _ in 0..20 {
        assert_eq!(
            reqwest::get(server.url("/healthz"))
                .await
                .unwrap()
                .status()
                .as_u16(),
            200
        );
    }
    let metrics = server.metrics().await;
    for limit in [
        "appends",
        "connects_per_ip",
        "auth_failures_per_ip",
        "ephemeral",
    ] {
        assert!(
            metric_sum(&metrics, "ferry_rate_limited_total", &[("limit", limit)]).unwrap_or(0.0)
                >= 1.0,
            "ferry_rate_limited_total{{limit={limit}}}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limits_are_on() {
    // 50 connects per second per IP by default: the 51st upgrade within a second is refused.
    let server = TestServer::builder().with_rate_limits().start();
    let start = Instant::now();
    let mut open = Vec::new();
    let mut refused = false;
    for _ in 0..80 {
        let (status, ws) = upgrade_status(&server, API_KEY).await;
        if status == 429 {
            refused = true;
            break;
        }
        assert_eq!(status, 101);
        open.push(ws);
    }
    if start.elapsed() < Duration::from_millis(900) {
        assert!(
            refused && open.len() <= 50,
            "{} upgrades passed",
            open.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_per_socket_and_sockets_per_principal_are_bounded() {
    let server = TestServer::builder()
        .env("FERRY_LIMITS__MAX_TOPICS_PER_SOCKET", "2")
        .env("FERRY_LIMITS__MAX_SOCKETS_PER_PRINCIPAL", "2")
        .start();
    for id in ["t1", "t2", "t3"] {
        server.create_conversation(id, &["alice"]).await;
    }
    let mut first = Ws::connect(&server, API_KEY).await;
    let (t1_ref, _) = first.join_ok("conversation:t1", json!({})).await;
    first.join_ok("conversation:t2", json!({})).await;
    // Joining a joined topic again replaces it and is not one more.
    first.join_ok("conversation:t2", json!({})).await;
    let (_, reply) = first.join("conversation:t3", json!({})).await;
    assert_error(&reply, "invalid", "a third topic");
    assert_eq!(reply["response"]["detail"], "too_many_topics", "{reply}");
    let reply = first
        .call(Some(&t1_ref), "conversation:t1", "phx_leave", json!({}))
        .await;
    assert_eq!(reply["status"], "ok");
    first.join_ok("conversation:t3", json!({})).await;

    // Two sockets per principal: a third upgrade, or an SSE stream, is refused until one closes.
    let second = Ws::connect(&server, API_KEY).await;
    let (status, _) = upgrade_status(&server, API_KEY).await;
    assert_eq!(status, 429, "a third socket");
    let resp = server
        .client()
        .get(server.url("/v1/conversations/t1/stream"))
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 429, "try_again", "an SSE stream past the limit").await;
    assert_eq!(body["detail"], "too_many_sockets");
    // Another principal is not affected.
    let other = create_key(&server, "other", "service").await;
    let (status, _) = upgrade_status(&server, other["key"].as_str().unwrap()).await;
    assert_eq!(status, 101);
    drop(second);
    eventually(
        "a closed socket frees its place",
        Duration::from_secs(10),
        async || upgrade_status(&server, API_KEY).await.0 == 101,
    )
    .await;
}

/// Milliseconds of each valid append, one started every millisecond for `for_how_long`.
async fn valid_appends(server: &TestServer, for_how_long: Duration) -> Vec<f64> {
    let client = server.client();
    let url = server.url("/v1/conversations/flooded/messages");
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let start = Instant::now();
    let mut latencies = Vec::new();
    while start.elapsed() < for_how_long {
        tick.tick().await;
        let sent = Instant::now();
        let resp = client
            .post(&url)
            .json(&json!({"sender": "alice", "content": "valid"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "a valid append during the flood"
        );
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    latencies
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_tokens_leaves_valid_appends_and_the_archive_alone() {
    // The per-IP failure limit is off here, so every random token reaches the key lookup: this is
    // what a flood from many addresses costs.
    let server = TestServer::start();
    server.create_conversation("flooded", &["alice"]).await;
    let quiet = valid_appends(&server, Duration::from_secs(2)).await;

    let flood_url = server.url("/v1/conversations/flooded");
    let flood = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut answered = 0u64;
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..32u64 {
            let client = client.clone();
            let url = flood_url.clone();
            tasks.spawn(async move {
                let mut statuses = Vec::new();
                for i in 0..(20_000 / 32) {
                    let token = format!("fk_{:016x}{:016x}{worker:08x}", rand::random::<u64>(), i);
                    let resp = client.get(&url).bearer_auth(&token).send().await.unwrap();
                    statuses.push(resp.status().as_u16());
                }
                statuses
            });
        }
        while let Some(statuses) = tasks.join_next().await {
            for status in statuses.unwrap() {
                assert_eq!(status, 401, "a random token");
                answered += 1;
            }
        }
        answered
    });
    let during = valid_appends(&server, Duration::from_secs(3)).await;
    let answered = flood.await.unwrap();
    assert!(answered >= 19_000, "{answered} flood requests answered");
    let (quiet_n, during_n) = (quiet.len(), during.len());
    eprintln!(
        "valid append p99: quiet {:.2} ms ({quiet_n} appends), during the flood {:.2} ms \
         ({during_n} appends)",
        p99(quiet),
        p99(during),
    );
    // The archive kept up: everything acknowledged reaches SQL, and no append was refused.
    server.wait_archived(Duration::from_secs(30)).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "ferry_try_again_total", &[]).unwrap_or(0.0),
        0.0,
        "no append got try_again"
    );
    let unknown = metric_sum(
        &metrics,
        "ferry_api_key_lookups_total",
        &[("result", "unknown")],
    )
    .unwrap_or(0.0);
    assert!(
        unknown >= 19_000.0,
        "each random token was looked up once: {unknown}"
    );
}
