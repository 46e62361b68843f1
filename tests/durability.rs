//! Durability of the real binary: an acknowledged append survives `kill -9` and SIGTERM, seqs
//! stay contiguous from 1, and appends after a restart continue at `last_seq + 1`.
//!
//! Runs with a 512-byte ring per conversation so reads after a restart come mostly from SQL
//! (plus whatever WAL recovery put back in the ring). Every scenario runs on the embedded SQLite
//! archive and on Postgres (`*_postgres`, a fresh database per test; see `common::pg`), where the
//! rows are also checked in SQL.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use common::pg::TestDatabase;
use common::{files_with_suffix, seq_of, Ack, ServerBuilder, TestServer};

const CONVERSATIONS: [&str; 3] = ["burst-a", "burst-b", "burst-c"];
const WRITERS: usize = 6;

fn server() -> ServerBuilder {
    TestServer::builder()
        .env("FERRY_RUNTIME__RING_BYTES_PER_CONVERSATION", "512")
        .env("FERRY_WAL__FSYNC", "always")
}

/// What the clients know: every append they tried and every one the server acknowledged.
#[derive(Default)]
struct Ledger {
    /// Content tags of every append sent (acknowledged or not).
    attempted: HashSet<String>,
    /// `(conversation, seq) → content` of every 201 answer.
    acked: BTreeMap<(String, u64), Value>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

/// Why a writer stopped.
#[derive(Debug)]
enum Stopped {
    /// The connection failed: the server is gone.
    Connection,
    /// The server answered something other than 201 or 429.
    Status(u16, String),
}

/// Appends to `conversation` until the server stops answering; records attempts and acks.
fn spawn_writer(
    server: &TestServer,
    ledger: SharedLedger,
    conversation: &'static str,
    tag_prefix: String,
) -> JoinHandle<Stopped> {
    let client = server.client();
    let url = server.url(&format!("/v1/conversations/{conversation}/messages"));
    tokio::spawn(async move {
        for i in 0u64.. {
            let tag = format!("{tag_prefix}-{i}");
            // Padding makes a handful of messages fill the 512-byte ring.
            let content = json!({ "tag": tag, "pad": "z".repeat(120) });
            ledger.lock().expect("ledger").attempted.insert(tag.clone());
            let resp = match client
                .post(&url)
                .json(&json!({ "sender": "writer", "content": content }))
                .send()
                .await
            {
                Ok(resp) => resp,
                Err(_) => return Stopped::Connection,
            };
            let status = resp.status().as_u16();
            let body = match resp.text().await {
                Ok(body) => body,
                Err(_) => return Stopped::Connection,
            };
            match status {
                201 => {
                    let ack = Ack::from_json(&serde_json::from_str(&body).expect("ack JSON"));
                    let previous = ledger
                        .lock()
                        .expect("ledger")
                        .acked
                        .insert((conversation.to_owned(), ack.seq), content);
                    assert!(
                        previous.is_none(),
                        "{conversation} seq {} acknowledged twice",
                        ack.seq
                    );
                }
                429 => continue,
                _ => return Stopped::Status(status, body),
            }
        }
        Stopped::Status(0, "writer ran out of counter values".to_owned())
    })
}

fn acked_count(ledger: &SharedLedger) -> usize {
    ledger.lock().expect("ledger").acked.len()
}

/// Waits (bounded) until the writers have `target` acknowledgements in total.
async fn wait_for_acks(ledger: &SharedLedger, target: usize, server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked_count(ledger) < target {
        assert!(
            Instant::now() < deadline,
            "writers reached only {} of {target} acks in 30s\n{}",
            acked_count(ledger),
            server.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Checks every conversation against the ledger and returns its `last_seq`.
async fn verify(server: &TestServer, ledger: &SharedLedger, when: &str) -> HashMap<String, u64> {
    // A snapshot, so no lock is held across awaits (the writers are stopped anyway).
    let (attempted, acked) = {
        let l = ledger.lock().expect("ledger");
        (l.attempted.clone(), l.acked.clone())
    };
    let mut last = HashMap::new();
    for conversation in CONVERSATIONS {
        let (messages, last_seq) = server.read_all(conversation).await;
        let seqs: Vec<u64> = messages.iter().map(seq_of).collect();
        let n = seqs.len() as u64;
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{when}: {conversation} seqs must run 1..=n without holes"
        );
        assert_eq!(last_seq, n, "{when}: {conversation} last_seq vs messages");

        let mut tags = HashSet::new();
        for m in &messages {
            let tag = m["content"]["tag"]
                .as_str()
                .unwrap_or_else(|| panic!("{when}: stored content without tag: {m}"));
            assert!(
                attempted.contains(tag),
                "{when}: {conversation} holds a message nobody sent: {m}"
            );
            assert!(
                tags.insert(tag.to_owned()),
                "{when}: {conversation} stored {tag} twice"
            );
        }
        let mut acked_here = 0;
        for ((conv, seq), content) in acked.range((conversation.to_owned(), 0)..) {
            if conv != conversation {
                break;
            }
            acked_here += 1;
            assert!(
                *seq <= n,
                "{when}: {conversation} lost acknowledged seq {seq} (last_seq {n})"
            );
            let stored = &messages[(*seq - 1) as usize];
            assert_eq!(
                &stored["content"], content,
                "{when}: {conversation} seq {seq} content differs from its ack"
            );
        }
        assert!(
            n >= acked_here,
            "{when}: {conversation} has fewer messages than acks"
        );

        let meta: Value = server
            .client()
            .get(server.url(&format!("/v1/conversations/{conversation}")))
            .send()
            .await
            .expect("GET conversation")
            .json()
            .await
            .expect("conversation JSON");
        assert_eq!(meta["last_seq"], n, "{when}: GET {conversation} last_seq");
        last.insert(conversation.to_owned(), n);
    }
    last
}

/// One append per conversation must land at `last_seq + 1`; it joins the ledger.
async fn append_after_restart(
    server: &TestServer,
    ledger: &SharedLedger,
    last: &HashMap<String, u64>,
    when: &str,
) {
    for conversation in CONVERSATIONS {
        let tag = format!("{when}-probe-{conversation}");
        let content = json!({ "tag": tag });
        let ack = server.append(conversation, "writer", content.clone()).await;
        assert_eq!(
            ack.seq,
            last[conversation] + 1,
            "{when}: {conversation} continues at last_seq + 1"
        );
        let mut ledger = ledger.lock().expect("ledger");
        ledger.attempted.insert(tag);
        ledger
            .acked
            .insert((conversation.to_owned(), ack.seq), content);
    }
}

fn start_writers(
    server: &TestServer,
    ledger: &SharedLedger,
    cycle: usize,
) -> Vec<JoinHandle<Stopped>> {
    (0..WRITERS)
        .map(|w| {
            spawn_writer(
                server,
                ledger.clone(),
                CONVERSATIONS[w % CONVERSATIONS.len()],
                format!("c{cycle}-w{w}"),
            )
        })
        .collect()
}

/// Every conversation's rows in SQL are exactly `1..=last_seq`, once each.
async fn verify_sql_rows(db: &TestDatabase, last: &HashMap<String, u64>) {
    let pool = db.pool().await;
    for (conversation, n) in last {
        let rows: Vec<(i64,)> =
            sqlx::query_as("SELECT seq FROM messages WHERE conversation_id = $1 ORDER BY seq")
                .bind(conversation)
                .fetch_all(&pool)
                .await
                .expect("select rows");
        let seqs: Vec<u64> = rows.into_iter().map(|(s,)| s as u64).collect();
        assert_eq!(
            seqs,
            (1..=*n).collect::<Vec<_>>(),
            "{conversation}: SQL rows are 1..=last_seq, once each"
        );
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_repeated_kill_9() {
    kill_9_cycles(server()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_repeated_kill_9_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let last = kill_9_cycles(server().postgres(&db)).await;
    verify_sql_rows(&db, &last).await;
}

async fn kill_9_cycles(builder: ServerBuilder) -> HashMap<String, u64> {
    const CYCLES: usize = 3;
    const ACKS_PER_CYCLE: usize = 150;
    let mut server = builder.start();
    for conversation in CONVERSATIONS {
        server.create_conversation(conversation, &["writer"]).await;
    }
    let ledger = SharedLedger::default();

    for cycle in 1..=CYCLES {
        let writers = start_writers(&server, &ledger, cycle);
        let target = acked_count(&ledger) + ACKS_PER_CYCLE;
        wait_for_acks(&ledger, target, &server).await;

        // Mid-burst: every writer has a request in flight or about to be.
        let status = server.kill9();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "killed by SIGKILL");
        for writer in writers {
            let stopped = writer.await.expect("writer task");
            assert!(
                matches!(stopped, Stopped::Connection),
                "cycle {cycle}: a writer stopped before the kill: {stopped:?}"
            );
        }

        server.restart();
        let when = format!("after kill -9 #{cycle}");
        let last = verify(&server, &ledger, &when).await;
        append_after_restart(&server, &ledger, &last, &format!("kill{cycle}")).await;
    }

    // A final clean look once the archive holds everything: same answer purely from SQL + ring.
    server.wait_archived(Duration::from_secs(20)).await;
    let last = verify(&server, &ledger, "after archiving").await;
    let stored: u64 = last.values().sum();
    let acked = acked_count(&ledger) as u64;
    assert!(
        stored - acked <= (WRITERS * CYCLES) as u64,
        "at most one unacknowledged in-flight append per writer per kill may survive \
         ({stored} stored, {acked} acked)"
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_0_and_keeps_every_ack() {
    sigterm_during_a_burst(server()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_0_and_keeps_every_ack_postgres() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let last = sigterm_during_a_burst(server().postgres(&db)).await;
    verify_sql_rows(&db, &last).await;
}

async fn sigterm_during_a_burst(builder: ServerBuilder) -> HashMap<String, u64> {
    let mut server = builder.start();
    for conversation in CONVERSATIONS {
        server.create_conversation(conversation, &["writer"]).await;
    }
    let ledger = SharedLedger::default();
    let writers = start_writers(&server, &ledger, 1);
    wait_for_acks(&ledger, 120, &server).await;

    let status = tokio::task::block_in_place(|| server.terminate());
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0, got {status}");
    for writer in writers {
        let stopped = writer.await.expect("writer task");
        match &stopped {
            Stopped::Connection => {}
            // A request that reached a draining node may be refused with try_again.
            Stopped::Status(503, body) if body.contains("try_again") => {}
            other => panic!("writer stopped with an unexpected answer: {other:?}"),
        }
    }

    server.restart();
    let last = verify(&server, &ledger, "after SIGTERM").await;
    let stored: u64 = last.values().sum();
    let acked = acked_count(&ledger) as u64;
    assert!(
        stored - acked <= WRITERS as u64,
        "at most one unacknowledged append per writer may be stored ({stored} stored, {acked} acked)"
    );
    append_after_restart(&server, &ledger, &last, "term").await;
    let last = verify(&server, &ledger, "after SIGTERM and a new append").await;
    server.wait_archived(Duration::from_secs(20)).await;
    last
}

/// A flipped byte inside one record with intact records after it is corruption, not a torn
/// tail: the node refuses to start and names the segment and the repair switch. With
/// `FERRY_REPAIR_WAL` it quarantines the segment, says so, and starts; the damaged records were
/// archived before the damage, so every message is still served and new ones follow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_wal_refuses_to_start_until_repair_is_asked_for() {
    let lost = corrupt_then_repair(false).await;
    assert!(
        lost.contains("lost=[]"),
        "a clean stop checkpoints what it archived, so nothing archived counts as lost: {lost}"
    );
}

/// The same damage when the WAL's checkpoint lags SQL (here: its file is gone, as after a crash
/// before the first checkpoint was written). Repair counts the cut-off records as lost to the
/// WAL, but SQL holds them: the node serves them and continues after SQL's last seq, never
/// handing out a seq SQL already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_repair_seqs_continue_after_what_sql_holds() {
    let lost = corrupt_then_repair(true).await;
    assert!(
        lost.contains("lost=[6..=20]"),
        "the WAL alone lost 6..=20: {lost}"
    );
}

/// Appends 20 messages, stops cleanly, flips a byte in record 6, checks the refusal, repairs
/// and checks that history and new appends are whole. Returns the `wal repaired` log line.
async fn corrupt_then_repair(forget_checkpoint: bool) -> String {
    let mut server = TestServer::start();
    server.create_conversation("c1", &["alice"]).await;
    for i in 0..20 {
        server
            .append("c1", "alice", json!(format!("marker-{i:04}")))
            .await;
    }
    // A clean stop archives everything; the live segment keeps every record.
    assert_eq!(server.terminate().code(), Some(0));
    let wal = server.data_dir().join("wal");
    if forget_checkpoint {
        std::fs::remove_file(wal.join("checkpoint")).expect("remove checkpoint");
    }
    let segments = files_with_suffix(&wal, ".wal");
    assert_eq!(segments.len(), 1, "one live segment: {segments:?}");
    let segment = &segments[0];
    let mut bytes = std::fs::read(segment).expect("read segment");
    let at = bytes
        .windows(b"marker-0005".len())
        .position(|w| w == b"marker-0005")
        .expect("record 6's content is in the segment");
    bytes[at] ^= 0x20;
    std::fs::write(segment, &bytes).expect("write segment");

    let (status, _stdout, stderr) = server.start_expecting_failure();
    assert!(!status.success(), "a corrupt WAL must stop the start");
    let name = segment.file_name().expect("name").to_string_lossy();
    assert!(
        stderr.contains(name.as_ref()),
        "names the segment {name}: {stderr}"
    );
    assert!(stderr.contains("repair"), "says how to repair: {stderr}");

    server.set_env("FERRY_REPAIR_WAL", "true");
    server.restart();
    let quarantined = files_with_suffix(&wal.join("quarantine"), "");
    assert_eq!(
        quarantined.len(),
        1,
        "the damaged segment is kept aside: {quarantined:?}"
    );
    let log = server.stderr_all();
    let repaired = log
        .lines()
        .find(|l| l.contains("wal repaired"))
        .unwrap_or_else(|| panic!("the repair is reported: {}", server.stderr_tail()))
        .to_owned();

    // Before anything starts the conversation: the inbox already sees SQL's history.
    let inbox = server.get_json("/v1/participants/alice/inbox").await;
    assert_eq!(inbox["conversations"][0]["last_seq"], 20, "{inbox}");
    let (messages, last_seq) = server.read_all("c1").await;
    assert_eq!(last_seq, 20);
    let contents: Vec<&str> = messages
        .iter()
        .map(|m| m["content"].as_str().expect("text"))
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("marker-{i:04}")).collect();
    assert_eq!(
        contents, expected,
        "every archived message is served after the repair"
    );
    assert_eq!(server.append("c1", "alice", json!("after")).await.seq, 21);
    let (messages, last_seq) = server.read_all("c1").await;
    assert_eq!(last_seq, 21);
    assert_eq!(messages.len(), 21);
    assert_eq!(messages[20]["content"], "after");
    // And the same once the new message has gone through SQL: a restart serves it from there.
    assert_eq!(server.terminate().code(), Some(0));
    server.restart();
    let (messages, _) = server.read_all("c1").await;
    assert_eq!(messages.len(), 21);
    assert_eq!(messages[5]["content"], "marker-0005");
    assert_eq!(messages[20]["content"], "after");
    repaired
}

/// Junk after the last record (a write torn by a crash leaves such bytes) is a torn tail, not
/// corruption: the node starts without being asked to repair, reports the bytes it cleared, and
/// every acknowledged message is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cleared_on_start_and_nothing_acknowledged_is_lost() {
    let mut server = TestServer::start();
    server.create_conversation("c1", &["alice"]).await;
    for i in 0..20 {
        server.append("c1", "alice", json!(i)).await;
    }
    assert_eq!(server.kill9().signal(), Some(libc::SIGKILL));
    let segments = files_with_suffix(&server.data_dir().join("wal"), ".wal");
    assert_eq!(segments.len(), 1, "one live segment: {segments:?}");
    let mut bytes = std::fs::read(&segments[0]).expect("read segment");
    let end = bytes.iter().rposition(|b| *b != 0).expect("records") + 1;
    // Half a frame's worth of junk where the next record would have gone.
    for (i, b) in bytes[end + 8..end + 8 + 40].iter_mut().enumerate() {
        *b = 0xA5 ^ i as u8;
    }
    std::fs::write(&segments[0], &bytes).expect("write segment");

    server.restart();
    let log = server.stderr_all();
    let recovered = log
        .lines()
        .rfind(|l| l.contains("wal recovered"))
        .expect("recovery is logged")
        .to_owned();
    assert!(
        !recovered.contains("torn_tail_bytes=0"),
        "the junk is reported as a torn tail: {recovered}"
    );
    let (messages, last_seq) = server.read_all("c1").await;
    assert_eq!(last_seq, 20);
    let contents: Vec<u64> = messages
        .iter()
        .map(|m| m["content"].as_u64().expect("n"))
        .collect();
    assert_eq!(contents, (0..20).collect::<Vec<u64>>());
    assert_eq!(server.append("c1", "alice", json!(20)).await.seq, 21);
}
