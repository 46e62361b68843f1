//! The cluster's contract at its edges (PROTOCOL.md, "Cluster"), with real processes: the
//! admin answers' shape, the node-to-node API opened by the cluster secret and nothing else (and
//! the secret opening nothing on the public listener), the cluster metrics, a drain that would
//! leave no active node refused, `ferry admin drain --wait`, and SIGTERM draining a node before
//! it exits 0.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::cluster::{wait_for, TestCluster, SECRET, SLOT_COUNT};

fn secret_header() -> (&'static str, &'static str) {
    ("x-ferry-cluster-secret", SECRET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_internal_api_auth_metrics_and_drains() {
    let Some(mut cluster) = TestCluster::start(2, &[]).await else {
        return;
    };
    cluster.wait_balanced().await;
    let n1 = cluster.node(1);
    let client = n1.client();

    // /admin/cluster has the cluster's shape.
    let view: Value = client
        .get(n1.admin_url("/admin/cluster"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["mode"], "cluster", "{view}");
    assert_eq!(view["slot_count"], SLOT_COUNT, "{view}");
    for key in ["unassigned_slots", "moving_slots", "unavailable_slots"] {
        assert_eq!(view[key], 0, "{key} in {view}");
    }
    let nodes = view["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{view}");
    for node in nodes {
        assert!(
            node["advertise_url"]
                .as_str()
                .is_some_and(|u| u.starts_with("http://")),
            "{node}"
        );
        assert!(node["last_heartbeat"].is_string(), "{node}");
        assert_eq!(node["state"], "active", "{node}");
        assert_eq!(node["ready"], true, "{node}");
    }
    let total: u64 = nodes.iter().map(|n| n["slots"].as_u64().unwrap()).sum();
    assert_eq!(total, u64::from(SLOT_COUNT));

    // The node-to-node API takes the cluster secret and nothing else.
    let read = json!({"conversation_id": "c-1", "epoch": 1, "user": null, "limit": 0});
    let anonymous = reqwest::Client::new();
    let url = n1.admin_url("/internal/v1/read");
    let no_secret = anonymous.post(&url).json(&read).send().await.unwrap();
    assert_eq!(no_secret.status(), 401);
    let api_key = client.post(&url).json(&read).send().await.unwrap();
    assert_eq!(api_key.status(), 401, "an admin API key does not open it");
    let (name, value) = secret_header();
    let wrong = anonymous
        .post(&url)
        .header(name, format!("{value}x"))
        .json(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let with_secret = anonymous
        .post(&url)
        .header(name, value)
        .json(&read)
        .send()
        .await
        .unwrap();
    assert!(
        matches!(with_secret.status().as_u16(), 404 | 421),
        "the secret opens it (an unknown conversation, or not this node's slot): {}",
        with_secret.status()
    );
    // The secret opens nothing on the public listener.
    for header in [
        ("authorization", format!("Bearer {SECRET}")),
        (name, value.to_owned()),
    ] {
        let public = anonymous
            .get(n1.url("/v1/conversations/c-1"))
            .header(header.0, header.1)
            .send()
            .await
            .unwrap();
        assert_eq!(public.status(), 401);
    }

    // Cluster metrics exist from the start.
    let metrics = n1.metrics().await;
    for series in [
        "ferry_cluster_nodes",
        "ferry_slot_moves_total",
        "ferry_forwarded_total",
        "ferry_fanout_gap_fills_total",
        "ferry_restored_messages_total",
        "ferry_lease_renew_seconds",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }

    // Draining one of two nodes works (`ferry admin drain --wait` returns once it owns none);
    // draining the last active one is refused.
    let admin = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["admin", "drain", "n2", "--wait", "--admin-url"])
        .arg(n1.admin_url(""))
        .env("FERRY_API_KEY", n1.key.as_deref().expect("admin key"))
        .output()
        .expect("run ferry admin");
    assert!(
        admin.status.success(),
        "ferry admin drain --wait: {}",
        String::from_utf8_lossy(&admin.stderr)
    );
    assert!(String::from_utf8_lossy(&admin.stdout).contains("n2 owns no slot"));
    let slots = cluster.slots(1).await;
    assert!(slots.owned_by("n2").is_empty(), "{}", slots.brief());
    let refused = client
        .post(n1.admin_url("/admin/nodes/n1/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409, "no active node would be left");
    let missing = client
        .post(n1.admin_url("/admin/nodes/n9/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let n2_ready = anonymous
        .get(cluster.node(2).url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(n2_ready.status(), 503, "a drained node is not ready");

    // Undrain: n2 takes slots again with the rebalancer.
    let undrained = client
        .post(n1.admin_url("/admin/nodes/n2/undrain"))
        .send()
        .await
        .unwrap();
    assert_eq!(undrained.status(), 200);
    cluster.wait_balanced().await;

    // SIGTERM on n1 drains it, then it exits 0; n2 owns everything and n1 reads `left`.
    let status = cluster.terminate(1);
    assert!(status.success(), "SIGTERM exit status {status:?}");
    let c = &cluster;
    wait_for(
        "n2 to own every slot",
        Duration::from_secs(20),
        || async move {
            let slots = c.try_slots(2).await?;
            if slots.owned_by("n2").len() == SLOT_COUNT as usize {
                Ok(())
            } else {
                Err(slots.brief())
            }
        },
    )
    .await;
    cluster.wait_node_state(2, 1, "left").await;
}

/// `[rate]` limits hold across the cluster (counters shared through Redis), and a key revoked
/// through one node is refused by every node within about a second, its sockets closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_cluster_wide_and_revocation_reaches_every_node() {
    const LIMIT: u64 = 20;
    let rate = LIMIT.to_string() + "/s";
    let Some(cluster) = TestCluster::start(3, &[("FERRY_RATE__APPENDS", rate.as_str())]).await
    else {
        return;
    };
    cluster.wait_balanced().await;
    let n1 = cluster.node(1);
    n1.create_conversation("limited", &["alice"]).await;

    // One principal appending through all three nodes at once, as fast as they answer: the
    // nodes together let about LIMIT per second through, not three times as many.
    let run_for = Duration::from_secs(4);
    let mut writers = Vec::new();
    for i in 1..=3 {
        let node = cluster.node(i);
        let client = node.client();
        let url = node.url("/v1/conversations/limited/messages");
        writers.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u64, 0u64);
            let start = std::time::Instant::now();
            while start.elapsed() < run_for {
                let resp = client
                    .post(&url)
                    .json(&json!({"sender": "alice", "content": "x"}))
                    .send()
                    .await
                    .unwrap();
                match resp.status().as_u16() {
                    201 => ok += 1,
                    429 => {
                        let body: Value = resp.json().await.unwrap();
                        assert_eq!(body["detail"], "rate_limited", "{body}");
                        limited += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => panic!("append answered {other}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for w in writers {
        let (o, l) = w.await.unwrap();
        ok += o;
        limited += l;
    }
    let per_node_ceiling = 3 * LIMIT * (run_for.as_secs() + 1);
    let cluster_ceiling = LIMIT * (run_for.as_secs() + 1) * 3 / 2;
    assert!(limited > 0, "nothing was limited");
    assert!(
        ok <= cluster_ceiling,
        "{ok} appends passed in {run_for:?} at {LIMIT}/s across 3 nodes \
         (per-node limits alone would allow {per_node_ceiling})"
    );
    assert!(
        ok >= LIMIT * run_for.as_secs() / 2,
        "only {ok} appends passed"
    );

    // A key used on every node, revoked through n1.
    let created: Value = n1
        .client()
        .post(n1.admin_url("/admin/keys"))
        .json(&json!({"name": "short-lived", "scope": "service"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let bearer = |node: &common::TestServer| {
        reqwest::Client::new()
            .get(node.url("/v1/conversations/limited"))
            .bearer_auth(&key)
    };
    for i in 1..=3 {
        let status = bearer(cluster.node(i)).send().await.unwrap().status();
        assert_eq!(status, 200, "the new key works on n{i}");
    }
    let url = format!(
        "ws://{}/socket/websocket?vsn=2.0.0&token={key}",
        cluster.node(3).listen
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let revoked_at = std::time::Instant::now();
    let resp = n1
        .client()
        .delete(n1.admin_url(&format!("/admin/keys/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for i in 1..=3 {
        let node = cluster.node(i);
        wait_for(
            &format!("n{i} refuses the revoked key"),
            Duration::from_secs(5),
            || async {
                match bearer(node).send().await.unwrap().status().as_u16() {
                    401 => Ok(()),
                    other => Err(format!("answered {other}")),
                }
            },
        )
        .await;
        eprintln!(
            "n{i} refused the revoked key {:?} after the revocation",
            revoked_at.elapsed()
        );
    }
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "revocation took {:?} to reach every node",
        revoked_at.elapsed()
    );
    // The socket opened with it on n3 is closed.
    use futures_util::StreamExt;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(closed, Ok(true), "the revoked key's socket is closed");
}
