//! The cold tier on the real binary: messages older than `archive.sql_retention` move from SQL
//! into segment objects, and reads merge ring → SQL → segments transparently — HTTP pages in both
//! directions, SSE and WebSocket replay — on SQLite + local files and on Postgres + S3
//! (`s3s-fs`). An object store that is down makes compaction retry while the rows stay in SQL.
//! Retention deletes expired history from every tier and answers `gap`.
//!
//! Timing: `sql_retention = 2s`, `compact_interval = 100ms` and `segment_records = 50`, so a
//! conversation with 50 messages older than 2 s is compacted within a pass, and fewer are
//! compacted once they are 4 s old.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{Connection, SqliteConnection};

use common::pg::TestDatabase;
use common::s3::S3Server;
use common::{files_with_suffix, seq_of, ServerBuilder, TestServer};

const PAGE: u64 = 40;

fn cold_settings(builder: ServerBuilder) -> ServerBuilder {
    builder
        .env("FERRY_RUNTIME__RING_BYTES_PER_CONVERSATION", "512")
        .env("FERRY_ARCHIVE__SQL_RETENTION", "2s")
        .env("FERRY_ARCHIVE__COMPACT_INTERVAL", "100ms")
        .env("FERRY_ARCHIVE__SEGMENT_RECORDS", "50")
}

/// Where the test looks at SQL directly.
enum Sql<'a> {
    Sqlite,
    Postgres(&'a TestDatabase),
}

impl Sql<'_> {
    /// `(rows in messages, rows in message_segments)` for `conversation`.
    async fn counts(&self, server: &TestServer, conversation: &str) -> (i64, i64) {
        let q_messages = "SELECT COUNT(*) FROM messages WHERE conversation_id = $1";
        let q_segments = "SELECT COUNT(*) FROM message_segments WHERE conversation_id = $1";
        match self {
            Sql::Sqlite => {
                let url = format!("sqlite://{}/ferry.db", server.data_dir().display());
                let mut conn = SqliteConnection::connect(&url).await.expect("open sqlite");
                let (m,): (i64,) = sqlx::query_as(q_messages)
                    .bind(conversation)
                    .fetch_one(&mut conn)
                    .await
                    .expect("count messages");
                let (s,): (i64,) = sqlx::query_as(q_segments)
                    .bind(conversation)
                    .fetch_one(&mut conn)
                    .await
                    .expect("count segments");
                let _ = conn.close().await;
                (m, s)
            }
            Sql::Postgres(db) => {
                let pool = db.pool().await;
                let (m,): (i64,) = sqlx::query_as(q_messages)
                    .bind(conversation)
                    .fetch_one(&pool)
                    .await
                    .expect("count messages");
                let (s,): (i64,) = sqlx::query_as(q_segments)
                    .bind(conversation)
                    .fetch_one(&pool)
                    .await
                    .expect("count segments");
                pool.close().await;
                (m, s)
            }
        }
    }
}

async fn append_range(
    server: &TestServer,
    conversation: &str,
    seqs: std::ops::RangeInclusive<u64>,
) {
    for n in seqs {
        let ack = server
            .append(conversation, "p", json!({ "n": n, "pad": "x".repeat(40) }))
            .await;
        assert_eq!(ack.seq, n, "append {n}");
    }
}

/// Walks `after_seq` pages forwards and `before_seq` pages backwards; both must see 1..=n with
/// the right contents and `has_more` flags.
async fn walk_both_ways(server: &TestServer, conversation: &str, n: u64, when: &str) {
    let mut after = 0;
    let mut forward = Vec::new();
    loop {
        let page = server
            .page(conversation, &format!("after_seq={after}&limit={PAGE}"))
            .await;
        assert_eq!(page.last_seq, n, "{when}: last_seq");
        let seqs = page.seqs();
        assert_eq!(
            seqs,
            (after + 1..=(after + PAGE).min(n)).collect::<Vec<_>>(),
            "{when}: page after_seq={after}"
        );
        for m in &page.messages {
            assert_eq!(m["content"]["n"], seq_of(m), "{when}: content of seq");
        }
        after = *seqs.last().expect("non-empty page");
        forward.extend(seqs);
        assert_eq!(page.has_more, after < n, "{when}: has_more at {after}");
        if !page.has_more {
            break;
        }
    }
    assert_eq!(forward, (1..=n).collect::<Vec<_>>(), "{when}: forward walk");

    let mut before = n + 1;
    let mut backward = Vec::new();
    loop {
        let page = server
            .page(conversation, &format!("before_seq={before}&limit={PAGE}"))
            .await;
        let seqs = page.seqs();
        let expect: Vec<u64> = (before.saturating_sub(PAGE).max(1)..before).collect();
        assert_eq!(seqs, expect, "{when}: page before_seq={before}");
        for m in &page.messages {
            assert_eq!(m["content"]["n"], seq_of(m), "{when}: content of seq");
        }
        before = seqs[0];
        backward.splice(0..0, seqs);
        assert_eq!(page.has_more, before > 1, "{when}: has_more at {before}");
        if !page.has_more {
            break;
        }
    }
    assert_eq!(
        backward,
        (1..=n).collect::<Vec<_>>(),
        "{when}: backward walk"
    );
}

/// Replays the conversation over SSE from `after_seq=0` and returns the event ids up to `n`.
async fn sse_replay(server: &TestServer, conversation: &str, n: u64) -> Vec<u64> {
    sse_events(server, conversation, 0, n)
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect()
}

/// SSE events `(event, id, data)` from `after_seq` until the one with id `until`.
async fn sse_events(
    server: &TestServer,
    conversation: &str,
    after_seq: u64,
    until: u64,
) -> Vec<(String, u64, String)> {
    let mut resp = server
        .client()
        .get(server.url(&format!(
            "/v1/conversations/{conversation}/stream?after_seq={after_seq}"
        )))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("open SSE");
    assert_eq!(resp.status().as_u16(), 200, "SSE status");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    let mut events: Vec<(String, u64, String)> = Vec::new();
    let (mut event, mut data, mut id) = (String::new(), String::new(), None);
    while events.last().map(|e| e.1) != Some(until) {
        let chunk = tokio::time::timeout_at(deadline.into(), resp.chunk())
            .await
            .expect("SSE replay within 30s")
            .expect("SSE chunk")
            .expect("SSE stream open");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find('\n') {
            let line = text[..end].trim_end_matches('\r').to_owned();
            text.drain(..=end);
            // Fields in any order; a blank line ends the event.
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().parse::<u64>().expect("numeric SSE id"));
            } else if line.is_empty() {
                if let Some(id) = id.take() {
                    events.push((std::mem::take(&mut event), id, std::mem::take(&mut data)));
                }
                event.clear();
                data.clear();
            }
        }
    }
    events
}

/// Joins `conversation:{id}` over the Phoenix WebSocket from `after_seq=0` and returns the seqs
/// of the `message` pushes up to `n`.
async fn ws_replay(server: &TestServer, conversation: &str, n: u64) -> Vec<u64> {
    let (_, pushes) = ws_pushes(server, conversation, 0, n).await;
    pushes
        .iter()
        .map(|(event, payload)| {
            assert_eq!(event, "message", "{payload}");
            payload["seq"].as_u64().expect("seq")
        })
        .collect()
}

/// Joins `conversation:{id}` with `after_seq` and returns the join reply's response and every
/// push (event, payload) up to the `message` with seq `n`.
async fn ws_pushes(
    server: &TestServer,
    conversation: &str,
    after_seq: u64,
    n: u64,
) -> (serde_json::Value, Vec<(String, serde_json::Value)>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let url = format!(
        "ws://{}/socket/websocket?vsn=2.0.0&token={}",
        server.listen,
        server.key.as_deref().expect("api key")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connect");
    let topic = format!("conversation:{conversation}");
    let join = json!(["1", "1", topic, "phx_join", {"after_seq": after_seq}]);
    ws.send(WsMessage::text(join.to_string()))
        .await
        .expect("send join");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reply = serde_json::Value::Null;
    let mut pushes: Vec<(String, serde_json::Value)> = Vec::new();
    while pushes.last().map(|(_, p)| p["seq"].as_u64()) != Some(Some(n)) {
        let frame = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .expect("WebSocket replay within 30s")
            .expect("socket open")
            .expect("socket frame");
        let WsMessage::Text(text) = frame else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON frame");
        match v[3].as_str() {
            Some("phx_reply") => {
                assert_eq!(v[4]["status"], "ok", "join: {v}");
                reply = v[4]["response"].clone();
            }
            Some(event @ ("message" | "gap")) => pushes.push((event.into(), v[4].clone())),
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    (reply, pushes)
}

async fn history_spans_every_tier(builder: ServerBuilder, sql: Sql<'_>) {
    let mut server = cold_settings(builder).start();
    server.create_conversation("tiers", &["p", "q"]).await;

    // 1..=200: old enough to leave SQL once 2 s pass.
    append_range(&server, "tiers", 1..=200).await;
    server
        .wait_metric(
            "ferry_compaction_messages_total",
            &[],
            200.0,
            Duration::from_secs(30),
        )
        .await;
    let (in_sql, segments) = sql.counts(&server, "tiers").await;
    assert_eq!(in_sql, 0, "1..=200 left SQL");
    assert!(
        segments >= 4,
        "200 messages in segments of at most 50: {segments}"
    );

    // 201..=240: in SQL (and the newest in the ring) while the walk runs.
    append_range(&server, "tiers", 201..=240).await;
    server.wait_archived(Duration::from_secs(20)).await;
    let (in_sql, _) = sql.counts(&server, "tiers").await;
    assert!(in_sql > 0, "the newest messages are still in SQL");
    walk_both_ways(&server, "tiers", 240, "segments + SQL + ring").await;
    let ids = sse_replay(&server, "tiers", 240).await;
    assert_eq!(
        ids,
        (1..=240).collect::<Vec<_>>(),
        "SSE replay across tiers"
    );
    // Unread counts reach into segments too (q read up to 25; p sent everything).
    let resp = server
        .client()
        .post(server.url("/v1/conversations/tiers/read"))
        .json(&json!({"participant": "q", "seq": 25}))
        .send()
        .await
        .expect("read");
    let read: serde_json::Value = resp.json().await.expect("read body");
    assert_eq!(read["unread"], 215, "{read}");
    let inbox: serde_json::Value = server
        .client()
        .get(server.url("/v1/participants/q/inbox"))
        .send()
        .await
        .expect("inbox")
        .json()
        .await
        .expect("inbox body");
    let entry = &inbox["conversations"][0];
    assert_eq!(
        (&entry["last_seq"], &entry["unread"]),
        (&json!(240), &json!(215)),
        "{inbox}"
    );
    let seqs = ws_replay(&server, "tiers", 240).await;
    assert_eq!(
        seqs,
        (1..=240).collect::<Vec<_>>(),
        "WebSocket replay across tiers"
    );
    let text = server.metrics().await;
    assert!(
        common::metric_sum(&text, "ferry_segment_reads_total", &[]).unwrap_or(0.0) > 0.0,
        "the walk read segments"
    );

    // A clean restart: nothing in the ring; the seq continues after everything stored.
    assert!(server.terminate().success());
    server.restart();
    walk_both_ways(&server, "tiers", 240, "after a restart").await;
    append_range(&server, "tiers", 241..=241).await;

    // Once everything has left SQL, a crash and restart still continue at the right seq (the
    // last seq comes from the segment index alone).
    server
        .wait_metric(
            "ferry_compaction_messages_total",
            &[],
            41.0,
            Duration::from_secs(30),
        )
        .await;
    let (in_sql, segments) = sql.counts(&server, "tiers").await;
    assert_eq!(in_sql, 0, "everything left SQL");
    assert!(segments >= 5, "segments: {segments}");
    server.kill9();
    server.restart();
    append_range(&server, "tiers", 242..=242).await;
    walk_both_ways(&server, "tiers", 242, "all in segments").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_spans_ring_sql_and_segments_on_sqlite_and_files() {
    // The default object store: file://<data_dir>/objects.
    history_spans_every_tier(TestServer::builder(), Sql::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_spans_ring_sql_and_segments_on_postgres_and_s3() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(s3) = S3Server::start() else {
        return;
    };
    let builder = s3.configure(TestServer::builder().postgres(&db));
    history_spans_every_tier(builder, Sql::Postgres(&db)).await;
    assert!(
        s3.segment_objects().len() >= 5,
        "segments are objects in the bucket: {:?}",
        s3.segment_objects()
    );
}

/// Segment objects land under `<data_dir>/objects` by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_object_store_is_files_under_the_data_dir() {
    let server = cold_settings(TestServer::builder()).start();
    server.create_conversation("files", &["p"]).await;
    append_range(&server, "files", 1..=60).await;
    server
        .wait_metric(
            "ferry_compaction_messages_total",
            &[],
            60.0,
            Duration::from_secs(30),
        )
        .await;
    let objects = files_with_suffix(&server.data_dir().join("objects"), ".seg");
    let names: Vec<String> = objects
        .iter()
        .map(|p| {
            p.strip_prefix(server.data_dir().join("objects"))
                .expect("under objects/")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names[0], "conversations/files/00000000000000000001-00000000000000000050.seg",
        "keys as docs/log-format.md describes: {names:?}"
    );
    // The objects cover 1..=60 in consecutive runs of at most 50.
    let mut next = 1;
    for name in &names {
        let file = name
            .strip_prefix("conversations/files/")
            .and_then(|f| f.strip_suffix(".seg"))
            .unwrap_or_else(|| panic!("unexpected key {name}"));
        let (first, last) = file.split_once('-').expect("first-last");
        assert_eq!(
            (first.len(), last.len()),
            (20, 20),
            "zero-padded seqs: {name}"
        );
        let (first, last): (u64, u64) = (first.parse().unwrap(), last.parse().unwrap());
        assert_eq!(first, next, "runs are consecutive: {names:?}");
        assert!(last >= first && last - first < 50, "{name}");
        next = last + 1;
    }
    assert_eq!(next, 61, "all 60 messages are in objects: {names:?}");
    let bytes = std::fs::read(&objects[0]).expect("read segment");
    assert_eq!(&bytes[..8], b"FERRYSEG");
}

/// With the object store down, compaction fails and retries while every row stays in SQL and
/// reads keep working; once it is back the rows move and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_outage_keeps_rows_in_sql_until_segments_are_durable() {
    let Some(mut s3) = S3Server::start() else {
        return;
    };
    let server = s3.configure(cold_settings(TestServer::builder())).start();
    server.create_conversation("outage", &["p"]).await;
    s3.stop();

    append_range(&server, "outage", 1..=120).await;
    server
        .wait_metric(
            "ferry_compaction_errors_total",
            &[("stage", "object")],
            3.0,
            Duration::from_secs(60),
        )
        .await;
    let (in_sql, segments) = Sql::Sqlite.counts(&server, "outage").await;
    assert_eq!(
        (in_sql, segments),
        (120, 0),
        "nothing leaves SQL while the object store is down"
    );
    walk_both_ways(&server, "outage", 120, "object store down").await;

    s3.restart();
    server
        .wait_metric(
            "ferry_compaction_messages_total",
            &[],
            120.0,
            Duration::from_secs(60),
        )
        .await;
    let (in_sql, segments) = Sql::Sqlite.counts(&server, "outage").await;
    assert_eq!(in_sql, 0, "all 120 left SQL");
    assert!(segments >= 3, "segments of at most 50: {segments}");
    assert_eq!(
        s3.segment_objects().len() as i64,
        segments,
        "one object per index row"
    );
    walk_both_ways(&server, "outage", 120, "after the object store returned").await;
}

/// Retention: history older than `retention` disappears from every tier (segments, their objects,
/// SQL, and what the ring still holds is not served); a cursor before it gets `gap` (410 with
/// `first_available_seq`; SSE: a `gap` event, then the rest); seqs continue after the expired ones
/// even when nothing is left.
async fn retention_expires_every_tier(builder: ServerBuilder, sql: Sql<'_>) {
    let mut server = cold_settings(builder).env("FERRY_RETENTION", "8s").start();
    server.create_conversation("old", &["p", "r"]).await;
    let started = Instant::now();
    append_range(&server, "old", 1..=60).await;
    server
        .wait_metric(
            "ferry_compaction_messages_total",
            &[],
            60.0,
            Duration::from_secs(30),
        )
        .await;
    // Batch B is written at least 5 s after batch A, so it outlives A by as much.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
    append_range(&server, "old", 61..=70).await;

    server
        .wait_metric(
            "ferry_retention_deleted_messages_total",
            &[("tier", "object")],
            60.0,
            Duration::from_secs(30),
        )
        .await;
    let resp = server
        .client()
        .get(server.url("/v1/conversations/old/messages?after_seq=0"))
        .send()
        .await
        .expect("page");
    let body = common::expect_error(resp, 410, "gap", "a cursor before retention").await;
    assert_eq!(body["first_available_seq"], 61, "{body}");
    let page = server.page("old", "after_seq=60&limit=100").await;
    assert_eq!(page.seqs(), (61..=70).collect::<Vec<_>>());
    assert_eq!(page.first_available_seq, 61);
    let page = server.page("old", "before_seq=1000&limit=100").await;
    assert_eq!(page.seqs(), (61..=70).collect::<Vec<_>>(), "backwards");
    assert!(!page.has_more, "nothing before the first available seq");
    let events = sse_events(&server, "old", 0, 70).await;
    assert_eq!(events[0].0, "gap", "first SSE event: {events:?}");
    assert_eq!(events[0].1, 60, "gap event id = to_seq");
    let gap: serde_json::Value = serde_json::from_str(&events[0].2).expect("gap data");
    assert_eq!(gap, json!({"from_seq": 1, "to_seq": 60}));
    assert_eq!(
        events[1..].iter().map(|e| e.1).collect::<Vec<_>>(),
        (61..=70).collect::<Vec<_>>()
    );
    let (reply, pushes) = ws_pushes(&server, "old", 0, 70).await;
    assert_eq!(reply["first_available_seq"], 61, "join reply: {reply}");
    assert_eq!(reply["last_seq"], 70, "join reply: {reply}");
    assert_eq!(
        pushes[0],
        ("gap".to_string(), json!({"from_seq": 1, "to_seq": 60})),
        "first WebSocket push"
    );
    assert_eq!(
        pushes[1..]
            .iter()
            .map(|(e, p)| (e.as_str(), p["seq"].as_u64().expect("seq")))
            .collect::<Vec<_>>(),
        (61..=70).map(|s| ("message", s)).collect::<Vec<_>>()
    );
    // A cursor inside what is left gets no gap.
    let (_, pushes) = ws_pushes(&server, "old", 65, 70).await;
    assert_eq!(
        pushes.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
        ["message"; 5]
    );
    let (_, segments) = sql.counts(&server, "old").await;
    assert!(
        segments <= 1,
        "only B may be in a segment by now: {segments}"
    );
    // r never read: only what is left is unread.
    assert_eq!(r_inbox_entry(&server).await, (10, 70, Some(70)));

    // Everything expires; a crash and restart keep the seq going.
    server
        .wait_metric(
            "ferry_retention_deleted_messages_total",
            &[],
            70.0,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        sql.counts(&server, "old").await,
        (0, 0),
        "every tier is empty"
    );
    assert_eq!(
        r_inbox_entry(&server).await,
        (0, 70, None),
        "nothing unread, no last message, though the ring may still hold them"
    );
    server.kill9();
    server.restart();
    let ack = server
        .append("old", "p", json!("after everything expired"))
        .await;
    assert_eq!(ack.seq, 71, "seqs are never reused");
    assert_eq!(r_inbox_entry(&server).await, (1, 71, Some(71)));
    let resp = server
        .client()
        .get(server.url("/v1/conversations/old/messages?after_seq=0"))
        .send()
        .await
        .expect("page");
    let body = common::expect_error(resp, 410, "gap", "after a restart").await;
    assert_eq!(body["first_available_seq"], 71, "{body}");
}

/// Participant `r`'s inbox entry for `old`: unread, last seq, and the last message's seq.
async fn r_inbox_entry(server: &TestServer) -> (u64, u64, Option<u64>) {
    let body = server.get_json("/v1/participants/r/inbox").await;
    let entry = body["conversations"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["id"] == "old"))
        .unwrap_or_else(|| panic!("old is in r's inbox: {body}"));
    (
        entry["unread"].as_u64().expect("unread"),
        entry["last_seq"].as_u64().expect("last_seq"),
        entry["last_message"]["seq"].as_u64(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_expires_every_tier_on_sqlite_and_files() {
    retention_expires_every_tier(TestServer::builder(), Sql::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_expires_every_tier_on_postgres_and_s3() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(s3) = S3Server::start() else {
        return;
    };
    retention_expires_every_tier(
        s3.configure(TestServer::builder().postgres(&db)),
        Sql::Postgres(&db),
    )
    .await;
    assert!(
        s3.segment_objects().is_empty(),
        "expired objects are deleted: {:?}",
        s3.segment_objects()
    );
}
