//! Smoke runs of every `ferry-loadtest` scenario against the real binary, through the library
//! API, at a low rate for a second or two. They assert on the report: every append acknowledged,
//! every subscriber saw every seq exactly once in order (also across reconnects), every socket
//! still alive, RSS measured, reads consistent, outputs written. Redis Streams and JetStream get
//! the same `append` run when their servers are installed (each test starts its own on a
//! private port); without them those two tests say so and pass.
//!
//! The `cluster` scenario runs against a real three-node cluster: a fresh Postgres database
//! (`FERRY_TEST_DATABASE_URL`, see `common::pg`), a private `redis-server` on a free port, and
//! three `ferry serve` processes with a short heartbeat and lease and 16 slots, drained and
//! brought back while the traffic runs; then, under a second run, one node is stopped with
//! SIGTERM and started again (a rolling restart of one node), and the tool's sockets on it must
//! move to another node and lose nothing.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_loadtest::{Args, Report};

use common::pg::TestDatabase;
use common::{free_port, TestServer, API_KEY};

fn args(target: &str, scenario: &str, extra: &[&str]) -> Args {
    let mut argv = vec![
        "ferry-loadtest",
        scenario,
        "--target",
        target,
        "--api-key",
        API_KEY,
        "--no-progress",
        "--drain-timeout",
        "20",
    ];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).unwrap_or_else(|e| panic!("bad test arguments: {e}"))
}

async fn run(args: &Args) -> Report {
    let report = ferry_loadtest::run(args)
        .await
        .unwrap_or_else(|e| panic!("{} run failed: {e}", args.scenario));
    eprintln!("{}", report.text());
    report
}

/// Everything scheduled was sent and acknowledged, nothing else happened.
fn assert_all_acked(r: &Report) {
    assert!(r.scheduled > 0, "nothing scheduled");
    assert_eq!(
        (r.ok, r.try_again, r.errors, r.skipped),
        (r.scheduled, 0, 0, 0),
        "not every append was acknowledged: {:?}",
        r.error_samples
    );
    assert_eq!(r.ack_latency.count, r.ok);
    assert!(r.ack_latency.p50_ms > 0.0 && r.ack_latency.max_ms >= r.ack_latency.p99_ms);
    assert!(r.passed(), "failures: {:?}", r.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_over_http_acknowledges_every_scheduled_send_and_writes_outputs() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let md = dir.path().join("table.md");
    let svg = dir.path().join("plot.svg");
    let mut a = args(
        &server.url(""),
        "append",
        &["--rate", "200", "--duration", "1", "--conversations", "4"],
    );
    a.connections = 2;
    a.json = Some(json.clone());
    a.markdown = Some(md.clone());
    a.plot = Some(svg.clone());
    let r = run(&a).await;
    assert_eq!(r.scheduled, 200);
    assert_all_acked(&r);
    // Exactly the acknowledged messages are stored, spread evenly over the conversations.
    for c in 0..4 {
        let (messages, last_seq) = server.read_all(&format!("lt-{}-{c}", r.run_id)).await;
        assert_eq!((messages.len(), last_seq), (50, 50), "conversation {c}");
    }

    ferry_loadtest::report::write_outputs(&a, &r).expect("write outputs");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("json parses");
    assert_eq!(parsed["ok"], 200);
    assert_eq!(parsed["scenario"], "append");
    assert!(parsed["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    // A second run appends a row under the same header.
    ferry_loadtest::report::write_outputs(&a, &r).expect("write outputs again");
    let table = std::fs::read_to_string(&md).expect("markdown");
    assert_eq!(table.matches("| run | scenario |").count(), 1, "{table}");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("| ferry http |"))
            .count(),
        2,
        "{table}"
    );
    let plot = std::fs::read_to_string(&svg).expect("svg");
    assert!(
        plot.starts_with("<svg") && plot.contains("<polyline"),
        "not an svg plot"
    );
    assert!(
        plot.contains("ack latency"),
        "caption missing from the plot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_over_websocket_acknowledges_every_scheduled_send() {
    let server = TestServer::start();
    let a = args(
        &server.url(""),
        "append",
        &[
            "--transport",
            "ws",
            "--rate",
            "200",
            "--duration",
            "1",
            "--conversations",
            "5",
            "--connections",
            "2",
        ],
    );
    let r = run(&a).await;
    assert_eq!(r.scheduled, 200);
    assert_all_acked(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_to_every_subscriber_once() {
    let server = TestServer::start();
    let a = args(
        &server.url(""),
        "fanout",
        &[
            "--rate",
            "100",
            "--duration",
            "1",
            "--conversations",
            "2",
            "--subscribers",
            "3",
        ],
    );
    let r = run(&a).await;
    assert_all_acked(&r);
    let d = r.delivery.as_ref().expect("delivery section");
    assert_eq!(d.subscribers, 6);
    assert_eq!(d.expected, r.ok * 3, "final seqs disagree with the acks");
    assert_eq!(d.delivered, d.expected);
    assert_eq!(d.latency.count, d.delivered);
    let checked = d.violations.as_ref().expect("Ferry's order is checked");
    assert_eq!(checked.total(), 0, "{checked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_rejoins_without_gaps_or_repeats() {
    let server = TestServer::start();
    // 4 subscribers, 600 drops/min in total: each drops every 0.4 s, ~5 times in 2 s.
    let a = args(
        &server.url(""),
        "resume",
        &[
            "--rate",
            "200",
            "--duration",
            "2",
            "--conversations",
            "2",
            "--subscribers",
            "2",
            "--reconnects-per-min",
            "600",
        ],
    );
    let r = run(&a).await;
    assert_all_acked(&r);
    let d = r.delivery.as_ref().expect("delivery section");
    let resume = r.resume.as_ref().expect("resume section");
    assert!(
        resume.reconnects >= 8,
        "only {} reconnects",
        resume.reconnects
    );
    assert_eq!(resume.subscribers_reached_final, 4);
    let checked = d.violations.as_ref().expect("Ferry's order is checked");
    assert_eq!(checked.total(), 0, "{:?}", resume.examples);
    assert_eq!(d.expected, r.ok * 2);
    assert_eq!(
        d.delivered, d.expected,
        "a resume lost or repeated messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_holds_idle_sockets_and_measures_server_rss() {
    let server = TestServer::start();
    let pid = server.pid().to_string();
    let a = args(
        &server.url(""),
        "connections",
        &[
            "--sockets",
            "60",
            "--rate",
            "200",
            "--duration",
            "0.5",
            "--conversations",
            "3",
            "--server-pid",
            &pid,
        ],
    );
    let r = run(&a).await;
    assert!(
        r.passed(),
        "failures: {:?} {:?}",
        r.failures,
        r.error_samples
    );
    let s = r.sockets.as_ref().expect("sockets section");
    assert_eq!((s.opened, s.failed, s.alive_at_end), (60, 0, 60));
    assert_eq!(s.connect_latency.count, 60);
    assert!(s.rss_before_kb.is_some_and(|v| v > 0));
    assert!(s.rss_after_kb.is_some_and(|v| v > 0));
    assert!(s.rss_per_socket_bytes.is_some());
    let metrics = server.metrics().await;
    assert!(
        common::metric_sum(&metrics, "ferry_ws_connections", &[]).is_some(),
        "server exports no ferry_ws_connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_reads_pages_and_replays_consistently_while_appending() {
    let server = TestServer::start();
    let a = args(
        &server.url(""),
        "mixed",
        &[
            "--rate",
            "150",
            "--duration",
            "1.5",
            "--conversations",
            "2",
            "--readers",
            "2",
            "--page-size",
            "20",
        ],
    );
    let r = run(&a).await;
    assert_all_acked(&r);
    let reads = r.reads.as_ref().expect("reads section");
    assert_eq!(reads.errors, 0, "{:?}", reads.error_samples);
    assert!(reads.forward_pages.count > 0 && reads.backward_pages.count > 0);
    assert!(reads.replays.count > 0);
    assert!(reads.messages_read > 0);
}

/// A peer server started for one test; killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the peer server binary is here. Missing is a skip, unless `FERRY_REQUIRE_PEERS` is
/// set (`ops/test.sh` installs both and sets it), then it is a failure.
fn peer_available(binary: &str) -> bool {
    if installed(binary) {
        return true;
    }
    assert!(
        std::env::var_os("FERRY_REQUIRE_PEERS").is_none(),
        "{binary} is required (FERRY_REQUIRE_PEERS) but not installed"
    );
    eprintln!("{binary} not installed: skipping");
    false
}

fn installed(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Polls until `port` accepts TCP connections (the peer is up), failing after 15 s.
fn wait_listening(port: u16, peer: &mut Peer) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = peer.0.try_wait() {
            panic!("peer exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "peer not listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_and_fanout_against_redis_streams() {
    if !peer_available("redis-server") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut peer = Peer(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );
    wait_listening(port, &mut peer);
    let target = format!("redis://127.0.0.1:{port}");
    let r = run(&args(
        &target,
        "append",
        &["--rate", "200", "--duration", "1"],
    ))
    .await;
    assert_eq!(r.system, "redis");
    assert_all_acked(&r);
    let r = run(&args(
        &target,
        "fanout",
        &[
            "--rate",
            "100",
            "--duration",
            "1",
            "--conversations",
            "2",
            "--subscribers",
            "2",
        ],
    ))
    .await;
    assert_all_acked(&r);
    let d = r.delivery.as_ref().expect("delivery section");
    assert_eq!((d.expected, d.delivered), (r.ok * 2, r.ok * 2));
    assert!(
        d.violations.is_none(),
        "Redis entries carry no seq to check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_against_nats_jetstream() {
    if !peer_available("nats-server") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut peer = Peer(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    wait_listening(port, &mut peer);
    let r = run(&args(
        &format!("nats://127.0.0.1:{port}"),
        "append",
        &["--rate", "200", "--duration", "1"],
    ))
    .await;
    assert_eq!(r.system, "nats");
    assert_all_acked(&r);
    assert!(Path::new(dir.path()).exists());
}

/// Polls the cluster's status through `node`'s admin API until every node is active and owns a
/// slot, every slot has an owner and none is moving (the rebalancer has spread the slots over
/// the nodes that joined); fails after `timeout`.
async fn wait_balanced(node: &TestServer, nodes: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        let resp = node
            .client()
            .get(node.admin_url("/admin/cluster"))
            .send()
            .await;
        if let Ok(resp) = resp {
            if let Ok(body) = resp.json::<serde_json::Value>().await {
                let listed = body["nodes"].as_array().cloned().unwrap_or_default();
                let balanced = listed.len() == nodes
                    && listed
                        .iter()
                        .all(|n| n["state"] == "active" && n["slots"].as_u64() > Some(0))
                    && body["unassigned_slots"] == 0
                    && body["moving_slots"] == 0;
                if balanced {
                    return;
                }
                last = body;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cluster did not spread its slots within {timeout:?}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_drain_and_restart_keep_every_acknowledged_append_in_place_on_every_node() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    if !peer_available("redis-server") {
        return;
    }
    let redis_dir = tempfile::tempdir().expect("tempdir");
    let redis_port = free_port();
    let mut redis = Peer(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(redis_dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );
    wait_listening(redis_port, &mut redis);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    // Fixed ports, so a node started again is where the load tool's targets say it is.
    let mut nodes: Vec<TestServer> = (1..=3)
        .map(|k| {
            TestServer::builder()
                .without_listen_flags()
                .arg("--listen")
                .arg(&format!("127.0.0.1:{}", free_port()))
                .arg("--admin-listen")
                .arg(&format!("127.0.0.1:{}", free_port()))
                .postgres(&db)
                .arg("--node-id")
                .arg(&format!("n{k}"))
                .arg("--redis-url")
                .arg(&redis_url)
                .arg("--cluster-secret")
                .arg("loadtest-smoke-secret")
                .env("FERRY_CLUSTER__HEARTBEAT", "200ms")
                .env("FERRY_CLUSTER__LEASE", "1500ms")
                .env("FERRY_SLOTS__COUNT", "16")
                .start()
        })
        .collect();
    wait_balanced(&nodes[0], 3, Duration::from_secs(60)).await;

    let targets: Vec<String> = nodes.iter().map(|n| n.url("")).collect();
    let admins: Vec<String> = nodes.iter().map(|n| n.admin_url("")).collect();
    let (targets, admins) = (targets.join(","), admins.join(","));
    let a = args(
        &targets,
        "cluster",
        &[
            "--admin-targets",
            &admins,
            "--disrupt",
            "drain",
            "--disrupt-at",
            "1",
            "--disrupt-timeout",
            "30",
            "--rate",
            "100",
            "--duration",
            "5",
            "--conversations",
            "8",
            "--connections",
            "3",
            "--subscribers",
            "1",
        ],
    );
    let r = run(&a).await;
    assert!(
        r.passed(),
        "failures: {:?}\nerrors: {:?}",
        r.failures,
        r.error_samples
    );
    assert_eq!(r.targets, 3);
    assert_eq!(r.scheduled, 500);
    // try_again answers are retried with the same key until acknowledged.
    assert_eq!(
        (r.ok, r.errors, r.skipped),
        (500, 0, 0),
        "{:?}",
        r.error_samples
    );
    let c = r.cluster.as_ref().expect("cluster section");
    let d = &c.disruption;
    assert!(d.error.is_none(), "{:?}", d.steps);
    let drained = d.node.as_deref().expect("a node was drained");
    assert!(
        d.node_slots_before.is_some_and(|n| n > 0),
        "{drained} owned no slot before its drain: {:?}",
        d.steps
    );
    assert!(d.drain_to_empty_ms.is_some() && d.rebalance_to_settled_ms.is_some());
    assert!(
        d.node_slots_after.is_some_and(|n| n > 0),
        "{drained} got no slot back: {:?}",
        d.steps
    );
    assert_eq!((c.writers, c.subscribers), (3, 8));
    assert_eq!(c.check.targets_read, 3);
    assert_eq!(c.check.acked_keys, 500);
    assert_eq!(c.check.final_seqs, 500, "every ack is one message, no more");
    assert_eq!(
        c.check.messages_read,
        3 * 500,
        "each node reads back every message"
    );
    assert_eq!(c.check.violations.total(), 0, "{:?}", c.check.examples);
    let delivery = r.delivery.as_ref().expect("delivery section");
    assert_eq!((delivery.expected, delivery.delivered), (500, 500));

    // A rolling restart of one node under the same traffic: n2 is stopped with SIGTERM (it
    // drains, closes its sockets with 1001 and exits) and started again on its data dir and
    // ports, while the tool's writers and subscribers on it move to n3 and carry on.
    let appends = |texts: &[String]| -> f64 {
        texts
            .iter()
            .map(|t| common::metric_sum(t, "ferry_appends_total", &[]).unwrap_or(0.0))
            .sum()
    };
    let mut before = Vec::new();
    for n in &nodes {
        before.push(n.metrics().await);
    }
    let before = appends(&before);
    let a = args(
        &targets,
        "cluster",
        &[
            "--disrupt",
            "none",
            "--disrupt-timeout",
            "30",
            "--rate",
            "100",
            "--duration",
            "8",
            "--conversations",
            "8",
            "--connections",
            "3",
            "--subscribers",
            "1",
            "--label",
            "restart n2",
        ],
    );
    // n2 moves into the restart (its blocking steps run on a blocking thread, so the load
    // tool's own task keeps its pace) and comes back out of it.
    let mut n2 = nodes.remove(1);
    let restart = async {
        // Restart once the traffic runs (a second of it has been appended).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut now = vec![n2.metrics().await];
            for n in &nodes {
                now.push(n.metrics().await);
            }
            if appends(&now) >= before + 100.0 {
                break;
            }
            assert!(Instant::now() < deadline, "the second run appended nothing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (n2, status) = tokio::task::spawn_blocking(move || {
            let status = n2.terminate();
            n2.restart();
            (n2, status)
        })
        .await
        .expect("restart of n2");
        assert!(status.success(), "n2 exits 0 after its drain: {status}");
        wait_balanced(&nodes[0], 3, Duration::from_secs(30)).await;
        (n2, Instant::now())
    };
    let traffic = async {
        let r = ferry_loadtest::run(&a)
            .await
            .unwrap_or_else(|e| panic!("cluster run failed: {e}"));
        (r, Instant::now())
    };
    let ((r, traffic_done), (n2, restarted)) = tokio::join!(traffic, restart);
    nodes.insert(1, n2);
    assert!(
        restarted < traffic_done,
        "the restart outlasted the traffic: lengthen the run"
    );
    eprintln!("{}", r.text());
    assert!(
        r.passed(),
        "failures: {:?}\nerrors: {:?}",
        r.failures,
        r.error_samples
    );
    assert_eq!(
        (r.scheduled, r.ok, r.errors, r.skipped),
        (800, 800, 0, 0),
        "{:?}",
        r.error_samples
    );
    let c = r.cluster.as_ref().expect("cluster section");
    // Writer 1 and subscribers 1, 4 and 7 were on n2.
    assert!(
        c.writer_going_away >= 1 && c.writer_reconnects >= 1,
        "{:?}",
        c.writer_losses
    );
    assert_eq!(c.writer_socket_cuts, 0, "{:?}", c.writer_losses);
    assert!(c.subscriber_going_away >= 3 && c.subscriber_reconnects >= 3);
    assert_eq!(c.subscriber_socket_losses, 0);
    assert_eq!(c.check.acked_keys, 800);
    assert_eq!(c.check.final_seqs, 800, "every ack is one message, no more");
    assert_eq!(c.check.messages_read, 3 * 800);
    assert_eq!(c.check.violations.total(), 0, "{:?}", c.check.examples);
    let delivery = r.delivery.as_ref().expect("delivery section");
    assert_eq!((delivery.expected, delivery.delivered), (800, 800));
    drop(nodes);
    drop(redis);
}
