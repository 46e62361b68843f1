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
