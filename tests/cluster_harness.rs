//! Tests of the cluster test harness itself (`common::cluster`), so that a failing cluster test
//! points at the cluster and not at its instruments:
//! - the TCP proxy passes bytes, a cut drops live connections and refuses new ones, a heal lets
//!   new ones through;
//! - the private Redis stops and starts again on the same port;
//! - the HTTP and WebSocket writers, the subscribers and the checker, run against one real node
//!   (no cluster flags) through a kill -9 and a restart, find nothing wrong — and the checker
//!   does find every kind of tampering with what was recorded.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::cluster::check::{self, verify};
use common::cluster::proxy::TcpProxy;
use common::cluster::redis::{self, RedisServer};
use common::cluster::subscribers::Subscribers;
use common::cluster::workload::{WorkloadSpec, Writers};
use common::cluster::{
    blocking, ids, postgres_addr, wait_for, with_authority, Conversation, NodeBook,
};
use common::TestServer;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An upstream that echoes every byte back, on its own task.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Sends `text` and reads the echo (bounded).
async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(text).await?;
    let mut buf = vec![0u8; text.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no echo in time"))??;
    Ok(buf)
}

/// Reads until the peer closes (Ok(0)) or resets (Err); `true` if it did within the timeout.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_passes_bytes_cuts_live_connections_and_heals() {
    let upstream = echo_server().await;
    let proxy = TcpProxy::start(upstream);
    assert_eq!(proxy.upstream(), upstream);

    let mut live = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(
        round_trip(&mut live, b"hello").await.expect("echo"),
        b"hello"
    );
    let big = vec![7u8; 256 * 1024];
    assert_eq!(round_trip(&mut live, &big).await.expect("big echo"), big);

    proxy.cut();
    assert!(proxy.is_cut());
    assert!(
        closed_by_peer(&mut live).await,
        "a cut must drop the live connection"
    );
    // New connections are accepted and closed before any byte.
    let mut refused = TcpStream::connect(proxy.addr())
        .await
        .expect("the listener stays up");
    let _ = refused.write_all(b"anyone?").await;
    assert!(
        closed_by_peer(&mut refused).await,
        "a connection made while cut must be closed"
    );

    proxy.heal();
    let mut again = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(
        round_trip(&mut again, b"back").await.expect("echo"),
        b"back"
    );
    let (forwarded, refused, dropped) = proxy.counts();
    assert_eq!((forwarded, dropped), (2, 1), "counts {:?}", proxy.counts());
    assert!(refused >= 1);
}

#[test]
fn redis_server_restarts_on_the_same_port() {
    let Some(mut redis) = RedisServer::create() else {
        return;
    };
    let port = redis.port;
    assert!(redis::ping(port), "fresh server answers");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    redis.stop();
    assert!(!redis::ping(port), "stopped server does not answer");
    redis.start();
    assert!(
        redis::ping(port),
        "restarted server answers on the same port"
    );
    assert_eq!(redis.starts, 2);
}

#[test]
fn postgres_urls_are_pointed_at_the_proxy() {
    let proxy: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
    assert_eq!(
        with_authority(
            "postgres://postgres@127.0.0.1:5432/ferry_test_1?sslmode=disable",
            proxy
        ),
        "postgres://postgres@127.0.0.1:40001/ferry_test_1?sslmode=disable"
    );
    assert_eq!(
        with_authority("postgres://u:p@db.example:5433/x", proxy),
        "postgres://u:p@127.0.0.1:40001/x"
    );
    assert_eq!(
        postgres_addr("postgres://postgres@127.0.0.1/postgres"),
        "127.0.0.1:5432".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(
        postgres_addr("postgres://postgres@127.0.0.1:5499/postgres"),
        "127.0.0.1:5499".parse::<SocketAddr>().expect("addr")
    );
}

/// Creates `n` conversations on a single node; their slots come from the PUT answer.
async fn conversations(server: &TestServer, n: usize) -> Vec<Conversation> {
    let mut out = Vec::new();
    for k in 0..n {
        let id = format!("h-{k:02}");
        let body = server.create_conversation(&id, &["alice", "bob"]).await;
        out.push(Conversation {
            id,
            slot: body["slot"].as_u64().expect("slot") as u32,
        });
    }
    out
}

async fn wait_acks(writers: &[&Writers], more: u64, what: &str) {
    let total = || writers.iter().map(|w| w.acked()).sum::<u64>();
    let target = total() + more;
    wait_for(what, Duration::from_secs(30), || async {
        let now = total();
        if now >= target {
            Ok(())
        } else {
            let errors: Vec<_> = writers.iter().map(|w| w.log().errors).collect();
            Err(format!("{now} of {target} acks; retries {errors:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_and_checker_agree_with_one_node_across_a_kill9_and_catch_tampering() {
    let mut server = TestServer::start();
    let book = NodeBook::of(&[&server]);
    let conversations = conversations(&server, 6).await;
    let targets: Vec<(String, usize)> = conversations.iter().map(|c| (c.id.clone(), 1)).collect();
    let subscribers = Subscribers::start(&book, &targets);
    subscribers.wait_joined(Duration::from_secs(20)).await;
    let spec = WorkloadSpec {
        writers_per_node: 2,
        interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(3),
    };
    let http = Writers::http(&book, &conversations, spec.clone());
    let ws = Writers::ws(&book, &conversations, spec);
    wait_acks(&[&http, &ws], 150, "acks before the kill").await;

    // kill -9 and restart on new ports: writers retry the same keys, sockets reconnect, and
    // subscribers rejoin after their last seq.
    book.down(1);
    server.kill9();
    let restarted_at = Instant::now();
    blocking(|| server.restart());
    book.up(1, &server);
    wait_acks(&[&http, &ws], 150, "acks after the restart").await;
    let after_restart = http.acked_since(&ids(&conversations), restarted_at);
    assert!(
        after_restart > 0,
        "HTTP writers acked nothing after the restart"
    );

    let log = http.stop().await.merge(ws.stop().await);
    let nodes = [("n1".to_owned(), &server)];
    let summary = check::check(&nodes, &ids(&conversations), &log, &subscribers)
        .await
        .unwrap_or_else(|report| panic!("{report}"));
    eprintln!("{summary}");
    assert!(summary.messages >= 300 && summary.acks >= 300, "{summary}");
    assert!(
        summary.reconnects >= conversations.len() as u64,
        "every subscriber reconnected after the kill: {summary}"
    );
    assert!(
        log.acks.iter().any(|a| a.via == "ws") && log.acks.iter().any(|a| a.via == "http"),
        "both transports acked"
    );

    // One snapshot, then the same snapshot tampered with in every way the checker must catch.
    let observed = check::collect(&nodes, &ids(&conversations)).await;
    let seen = subscribers.stop().await;
    verify(&observed, &log, &seen).unwrap_or_else(|report| panic!("untampered: {report}"));
    let must_fail = |what: &str, result: Result<check::CheckSummary, String>, needle: &str| {
        let report = result.expect_err(&format!("the checker missed: {what}"));
        assert!(
            report.contains(needle),
            "{what}: the report does not mention {needle:?}:\n{report}"
        );
        eprintln!("caught {what}: {}", report.lines().nth(1).unwrap_or(""));
    };

    let ack = log
        .acks
        .iter()
        .find(|a| !a.deduped)
        .expect("an ack")
        .clone();

    let mut moved = log.clone();
    moved
        .acks
        .iter_mut()
        .find(|a| a.key == ack.key)
        .expect("ack")
        .seq += 1;
    must_fail(
        "an ack at the wrong seq",
        verify(&observed, &moved, &seen),
        &ack.key,
    );

    let mut changed = log.clone();
    changed
        .acks
        .iter_mut()
        .find(|a| a.key == ack.key)
        .expect("ack")
        .content = json!({ "w": "someone-else", "i": 0 });
    must_fail(
        "acked content that differs",
        verify(&observed, &changed, &seen),
        "content",
    );

    let mut lost = log.clone();
    let mut beyond = ack.clone();
    beyond.key = "never-stored".to_owned();
    beyond.seq = 1_000_000;
    lost.attempt(&beyond.key, &beyond.conversation, &beyond.content, "test");
    lost.acks.push(beyond);
    must_fail(
        "an acked message that is lost",
        verify(&observed, &lost, &seen),
        "lost",
    );

    let mut phantom = log.clone();
    phantom.attempts.remove(&ack.key);
    must_fail(
        "a message nobody sent",
        verify(&observed, &phantom, &seen),
        "no writer sent",
    );

    let mut hard = log.clone();
    hard.hard_errors.push("500 boom".to_owned());
    must_fail(
        "a writer's hard error",
        verify(&observed, &hard, &seen),
        "500 boom",
    );

    let conversation = &ack.conversation;
    let mut repeated = seen.clone();
    let sub = repeated.get_mut(conversation).expect("subscriber");
    let again = sub.delivered[2].clone();
    sub.delivered.insert(3, again);
    must_fail(
        "a repeated delivery",
        verify(&observed, &log, &repeated),
        "subscriber",
    );

    let mut holed = seen.clone();
    holed
        .get_mut(conversation)
        .expect("subscriber")
        .delivered
        .remove(1);
    must_fail(
        "a delivery hole",
        verify(&observed, &log, &holed),
        "subscriber",
    );

    let mut twice = observed.clone();
    let messages = twice.reads.get_mut(conversation).expect("reads")[0]
        .1
        .as_mut()
        .expect("read ok");
    let first_key = messages[0]["metadata"]["key"].clone();
    messages[1]["metadata"]["key"] = first_key;
    must_fail(
        "a key stored twice",
        verify(&twice, &log, &seen),
        "stored at seqs",
    );

    let mut forked = observed.clone();
    let reads = forked.reads.get_mut(conversation).expect("reads");
    let mut other = reads[0].clone();
    other.0 = "n2".to_owned();
    other.1.as_mut().expect("read ok")[4]["content"] = json!("forked");
    reads.push(other);
    must_fail(
        "two nodes that disagree",
        verify(&forked, &log, &seen),
        "disagree",
    );

    let mut holey = observed.clone();
    holey.reads.get_mut(conversation).expect("reads")[0]
        .1
        .as_mut()
        .expect("read ok")
        .remove(5);
    must_fail(
        "a seq hole in storage",
        verify(&holey, &log, &seen),
        "seqs are not",
    );

    // After a failover (gaps allowed): the subscriber received a message at a reserved seq
    // that the restore left empty. Allowed only when the message's key is stored at a later
    // seq (the writer's retry was taken by a live node), as PROTOCOL.md "Node loss" says.
    let stored = observed.reads[conversation][0].1.as_ref().expect("read ok");
    let (shown, later) = (&stored[3], &stored[6]);
    let shown_seq = shown["seq"].as_u64().expect("seq");
    let shown_id = shown["id"].as_str().expect("id").to_owned();
    let mut emptied = observed.clone();
    emptied.allow_gaps = true;
    emptied.reads.get_mut(conversation).expect("reads")[0]
        .1
        .as_mut()
        .expect("read ok")
        .retain(|m| m["seq"].as_u64() != Some(shown_seq));
    emptied.gaps.insert(
        (conversation.clone(), "n1".to_owned()),
        vec![(shown_seq, shown_seq)],
    );
    let mut unacked = log.clone();
    let shown_key = shown["metadata"]["key"].as_str().expect("key");
    unacked.acks.retain(|a| a.key != shown_key);
    must_fail(
        "a received message the restore left out, its key stored nowhere",
        verify(&emptied, &unacked, &seen),
        "stored None",
    );
    let mut retried = seen.clone();
    let later_key = later["metadata"]["key"].as_str().expect("key").to_owned();
    retried
        .get_mut(conversation)
        .expect("subscriber")
        .keys
        .insert(shown_id.clone(), later_key);
    verify(&emptied, &unacked, &retried)
        .unwrap_or_else(|report| panic!("a retry taken at a later seq: {report}"));
    let mut earlier = seen.clone();
    let earlier_key = stored[1]["metadata"]["key"]
        .as_str()
        .expect("key")
        .to_owned();
    earlier
        .get_mut(conversation)
        .expect("subscriber")
        .keys
        .insert(shown_id, earlier_key);
    must_fail(
        "a received message the restore left out, its key stored at an earlier seq",
        verify(&emptied, &unacked, &earlier),
        "stored None",
    );
}
