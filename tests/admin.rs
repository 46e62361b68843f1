//! The admin listener's operator surface on a node that runs alone: `/admin/cluster`,
//! `/admin/slots`, drain / undrain / rebalance / failover, the `/dashboard` slot map, and the
//! `ferry admin` CLI against the real binary.

mod common;

use std::process::{Command, Output};

use serde_json::{json, Value};

use common::{expect_error, TestServer, API_KEY};

const JWT_SECRET: &str = "admin-test-secret-5d21-at-least-32-bytes";
/// `conversation-1` hashes to slot 316 of 512 (the placement's check value).
const SLOT_OF_CONVERSATION_1: usize = 316;

/// An HS256 end-user token for `sub`.
fn jwt(sub: &str) -> String {
    common::user_token(JWT_SECRET, sub)
}

async fn admin_get(server: &TestServer, path: &str) -> Value {
    let resp = server
        .client()
        .get(server.admin_url(path))
        .send()
        .await
        .expect("admin request");
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().await.expect("json body")
}

async fn admin_post(server: &TestServer, path: &str) -> reqwest::Response {
    server
        .client()
        .post(server.admin_url(path))
        .send()
        .await
        .expect("admin request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_an_admin_key() {
    let server = TestServer::builder()
        .env("FERRY_JWT_SECRET", JWT_SECRET)
        .start();
    let anonymous = server.anonymous_client();
    let user = jwt("alice");
    let node = server.node.clone();
    let routes = [
        ("GET", "/admin/cluster".to_owned()),
        ("GET", "/admin/slots".to_owned()),
        ("POST", format!("/admin/nodes/{node}/drain")),
        ("POST", format!("/admin/nodes/{node}/undrain")),
        ("POST", format!("/admin/nodes/{node}/failover")),
        ("POST", "/admin/rebalance".to_owned()),
    ];
    let callers = [
        (None, 401, "unauthorized", "without a key"),
        (Some("not-a-key"), 401, "unauthorized", "with a bad key"),
        (Some(user.as_str()), 403, "forbidden", "as a user"),
    ];
    for (method, path) in &routes {
        let method: reqwest::Method = method.parse().expect("method");
        for (token, status, code, who) in callers {
            let mut request = anonymous.request(method.clone(), server.admin_url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let resp = request.send().await.expect("request");
            expect_error(resp, status, code, &format!("{method} {path} {who}")).await;
        }
    }
    // A path that does not decode is `invalid` JSON, after the credentials are checked.
    let resp = anonymous
        .post(server.admin_url("/admin/nodes/%FF/drain"))
        .send()
        .await
        .expect("request");
    expect_error(
        resp,
        401,
        "unauthorized",
        "undecodable node id without a key",
    )
    .await;
    let resp = admin_post(&server, "/admin/nodes/%FF/drain").await;
    expect_error(resp, 400, "invalid", "undecodable node id").await;
    // The admin API is not on the public listener.
    let resp = server
        .client()
        .get(server.url("/admin/slots"))
        .send()
        .await
        .expect("request");
    expect_error(resp, 404, "not_found", "/admin on the public listener").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_and_slots_describe_the_node_that_owns_every_slot() {
    let server = TestServer::start();
    server
        .create_conversation("conversation-1", &["alice"])
        .await;
    for i in 0..3 {
        server.append("conversation-1", "alice", json!(i)).await;
    }

    let cluster = admin_get(&server, "/admin/cluster").await;
    assert_eq!(cluster["mode"], "single", "{cluster}");
    assert_eq!(cluster["node"], server.node.as_str());
    assert_eq!(cluster["slot_count"], 512);
    assert_eq!(cluster["unassigned_slots"], 0);
    let nodes = cluster["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{cluster}");
    let node = &nodes[0];
    assert_eq!(node["id"], server.node.as_str());
    assert_eq!(node["state"], "active");
    assert_eq!(node["ready"], true);
    assert_eq!(node["slots"], 512);
    assert_eq!(node["conversations"], 1, "{node}");
    assert_eq!(node["listen"], server.listen.to_string());
    assert_eq!(node["admin"], server.admin.to_string());
    assert!(
        node["started_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{node}"
    );

    let body = admin_get(&server, "/admin/slots").await;
    let slots = body["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 512);
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(slot["slot"], i, "{slot}");
        assert_eq!(slot["owner"], server.node.as_str(), "{slot}");
        assert_eq!(slot["epoch"], 1, "{slot}");
        assert_eq!(slot["state"], "active", "{slot}");
        let (conversations, appends) = if i == SLOT_OF_CONVERSATION_1 {
            (1, 3)
        } else {
            (0, 0)
        };
        assert_eq!(slot["conversations"], conversations, "{slot}");
        assert_eq!(slot["appends_total"], appends, "{slot}");
        assert!(slot["appends_per_sec"].as_f64().is_some(), "{slot}");
    }
}

/// Looking is not owning: reading a conversation (its description, its pages) starts no
/// conversation actor, neither before nor after a restart; an append does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_start_no_conversation_actor() {
    let mut server = TestServer::start();
    async fn active(server: &TestServer) -> Value {
        admin_get(server, "/admin/cluster").await["nodes"][0]["conversations"].clone()
    }
    server
        .create_conversation("conversation-1", &["alice"])
        .await;
    let described = server.get_json("/v1/conversations/conversation-1").await;
    assert_eq!(described["last_seq"], 0, "{described}");
    assert!(server.page("conversation-1", "").await.messages.is_empty());
    assert_eq!(active(&server).await, 0, "a read started a writer");
    for i in 0..3 {
        server.append("conversation-1", "alice", json!(i)).await;
    }
    assert_eq!(active(&server).await, 1);

    server.terminate();
    server.restart();
    let described = server.get_json("/v1/conversations/conversation-1").await;
    assert_eq!(described["last_seq"], 3, "{described}");
    let (messages, last_seq) = server.read_all("conversation-1").await;
    assert_eq!(messages.len(), 3);
    assert_eq!(last_seq, 3);
    let newest = server.page("conversation-1", "before_seq=4&limit=2").await;
    assert_eq!(newest.messages.len(), 2);
    assert!(newest.has_more);
    assert_eq!(active(&server).await, 0, "a read started a writer");
    assert_eq!(
        server.append("conversation-1", "alice", json!(3)).await.seq,
        4
    );
    assert_eq!(active(&server).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_alone_refuses_to_drain_and_has_nothing_to_rebalance() {
    let server = TestServer::builder().arg("--node-id").arg("solo-1").start();
    assert_eq!(server.node, "solo-1");
    server.create_conversation("c1", &["alice"]).await;

    let resp = admin_post(&server, "/admin/nodes/solo-1/drain").await;
    let body = expect_error(resp, 409, "conflict", "draining the only node").await;
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("only node")),
        "{body}"
    );
    let resp = admin_post(&server, "/admin/nodes/other/drain").await;
    expect_error(resp, 404, "not_found", "draining an unknown node").await;
    let resp = admin_post(&server, "/admin/nodes/other/undrain").await;
    expect_error(resp, 404, "not_found", "undraining an unknown node").await;
    // The only node is alive: nothing to fail over, and nobody to take its slots.
    let resp = admin_post(&server, "/admin/nodes/solo-1/failover").await;
    let body = expect_error(resp, 409, "conflict", "failing over the only node").await;
    assert_eq!(body["detail"], "node_alive", "{body}");
    let resp = admin_post(&server, "/admin/nodes/other/failover").await;
    expect_error(resp, 404, "not_found", "failing over an unknown node").await;

    // The refused drain changed nothing: the node still owns its slots and takes appends.
    let resp = admin_post(&server, "/admin/nodes/solo-1/undrain").await;
    assert_eq!(resp.status().as_u16(), 200);
    let node: Value = resp.json().await.expect("json");
    assert_eq!(
        (node["id"].as_str(), node["state"].as_str()),
        (Some("solo-1"), Some("active"))
    );
    assert_eq!(node["slots"], 512);
    assert_eq!(
        server.append("c1", "alice", json!("still here")).await.seq,
        1
    );

    let resp = admin_post(&server, "/admin/rebalance").await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["moves"], json!([]), "{body}");
    let slots = admin_get(&server, "/admin/slots").await;
    assert!(
        slots["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .all(|s| s["owner"] == "solo-1" && s["epoch"] == 1),
        "a rebalance of one node moves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_a_slot_map_served_without_a_key() {
    let server = TestServer::builder()
        .env("FERRY_SLOTS__COUNT", "64")
        .start();
    let resp = server
        .anonymous_client()
        .get(server.admin_url("/dashboard"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let html = resp.text().await.expect("body");
    assert_eq!(
        html.matches("data-slot=\"").count(),
        64,
        "one cell per slot"
    );
    assert!(html.contains(&server.node), "names the node");
    assert!(!html.contains("{{"), "no unfilled placeholder");

    let resp = server
        .anonymous_client()
        .get(server.admin_url("/dashboard/slots.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let data: Value = resp.json().await.expect("json");
    assert_eq!(data["slots"].as_array().map(Vec::len), Some(64));
    assert_eq!(data["cluster"]["slot_count"], 64);
}

/// Runs `ferry admin ARGS` against `server` with a clean environment plus `env`.
fn ferry_admin(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.arg("admin").args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("FERRY_") {
            cmd.env_remove(key);
        }
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("run ferry admin")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_reports_and_refuses_like_the_api() {
    let server = TestServer::start();
    server
        .create_conversation("conversation-1", &["alice"])
        .await;
    server.append("conversation-1", "alice", json!("x")).await;
    let url = format!("http://{}", server.admin);
    let key = [("FERRY_API_KEY", API_KEY)];

    let out = ferry_admin(&["status", "--admin-url", &url], &key);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("cluster: single node, 1 node, 512 slots"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(&server.node))
        .unwrap_or_else(|| panic!("no row for {}: {text}", server.node));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..5], ["active", "yes", "512", "1"], "{row}");

    // The admin URL from FERRY_ADMIN_URL, the key from FERRY_BOOTSTRAP_API_KEY.
    let out = ferry_admin(
        &["slots"],
        &[
            ("FERRY_ADMIN_URL", &url),
            ("FERRY_BOOTSTRAP_API_KEY", API_KEY),
        ],
    );
    assert!(out.status.success(), "slots: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 513, "a header and one row per slot");
    assert!(lines[0].starts_with("SLOT"), "{}", lines[0]);
    let cells: Vec<&str> = lines[1 + SLOT_OF_CONVERSATION_1]
        .split_whitespace()
        .collect();
    assert_eq!(
        &cells[..6],
        ["316", server.node.as_str(), "1", "active", "1", "1"],
        "slot, owner, epoch, state, conversations, appends"
    );

    let out = ferry_admin(&["slots", "--json", "--admin-url", &url], &key);
    assert!(out.status.success(), "{}", stderr(&out));
    let body: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(body["slots"].as_array().map(Vec::len), Some(512));

    let out = ferry_admin(&["drain", &server.node, "--admin-url", &url], &key);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("conflict: "), "{}", stderr(&out));

    let out = ferry_admin(&["failover", &server.node, "--admin-url", &url], &key);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("conflict: ") && stderr(&out).contains("alive"),
        "{}",
        stderr(&out)
    );

    let out = ferry_admin(&["undrain", &server.node, "--admin-url", &url], &key);
    assert!(out.status.success(), "undrain: {}", stderr(&out));
    assert!(stdout(&out).contains("active"), "{}", stdout(&out));

    let out = ferry_admin(&["rebalance", "--admin-url", &url], &key);
    assert!(out.status.success(), "rebalance: {}", stderr(&out));
    assert!(
        stdout(&out).starts_with("0 slot moves started."),
        "{}",
        stdout(&out)
    );

    // No key: said before anything is sent; a wrong one: the node's answer.
    let out = ferry_admin(&["status", "--admin-url", &url], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no admin API key"),
        "{}",
        stderr(&out)
    );
    let out = ferry_admin(&["status", "--admin-url", &url, "--api-key", "wrong"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unauthorized: "), "{}", stderr(&out));

    // An empty FERRY_ADMIN_URL counts as unset: FERRY_ADMIN_LISTEN names the listener.
    let admin = server.admin.to_string();
    let out = ferry_admin(
        &["status", "--json"],
        &[
            ("FERRY_ADMIN_URL", ""),
            ("FERRY_ADMIN_LISTEN", &admin),
            key[0],
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let body: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(body["node"], server.node.as_str());
    // A URL without a host is refused before any key is sent anywhere.
    let out = ferry_admin(&["status", "--admin-url", "http://"], &key);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid admin URL"),
        "{}",
        stderr(&out)
    );

    // Nothing listens on port 1.
    let out = ferry_admin(&["status", "--admin-url", "http://127.0.0.1:1"], &key);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the admin listener"),
        "{}",
        stderr(&out)
    );
}
