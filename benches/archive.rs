//! # Archive benchmarks: Postgres batch inserts and replay from the cold tier
//!
//! - `pg-insert`: what the archiver does, alone: `Archive::store_messages` of batches of
//!   `--batch` messages (default 10,000 = `archive.batch_records`), as many batches at once as
//!   the archiver keeps in flight (`Archive::max_concurrent_batches`: 3 on Postgres), into a
//!   fresh Postgres database, for `--duration` seconds. Reports messages/s and the batch latency.
//! - `cold-replay`: 10,000 messages of one conversation compacted into segment objects (local
//!   files, the embedded default), then read back in pages of 1000 through `Archive::read_messages`
//!   as a reconnecting client's replay does, with the segment cache cold (a fresh store per run).
//!   Reports the time per full replay. Runs on Postgres when a URL is given, else SQLite.
//!
//! Postgres: `--database-url URL` or `FERRY_BENCH_DATABASE_URL` / `FERRY_TEST_DATABASE_URL`
//! (a user that may `CREATE DATABASE`; a `ferry_bench_<random>` database is created and dropped).
//!
//! Usage: `cargo bench --bench archive -- [pg-insert] [cold-replay] [--duration S] [--batch N]
//! [--payload BYTES] [--database-url URL]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use uuid::Uuid;

#[path = "common/pg.rs"]
mod pg;

use ferry::cold::ColdTier;
use ferry::compactor::{self, CompactorConfig};
use ferry::store::Store;
use ferry_shards::archive::Archive;
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::record::{now_ms, Message};

struct Args {
    scenarios: Vec<String>,
    duration: Duration,
    batch: usize,
    payload: usize,
    database_url: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        scenarios: Vec::new(),
        duration: Duration::from_secs(10),
        batch: 10_000,
        payload: 200,
        database_url: std::env::var("FERRY_BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("FERRY_TEST_DATABASE_URL"))
            .ok(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => a.duration = Duration::from_secs(value().parse().expect("seconds")),
            "--batch" => a.batch = value().parse().expect("count"),
            "--payload" => a.payload = value().parse().expect("bytes"),
            "--database-url" => a.database_url = Some(value()),
            "--bench" => {}
            s if s.starts_with("--") => panic!("unknown option {s}"),
            s => a.scenarios.push(s.to_owned()),
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios = vec!["pg-insert".into(), "cold-replay".into()];
    }
    a
}

fn message(conversation: &ConversationId, seq: u64, payload: usize, at_ms: i64) -> Arc<Message> {
    Arc::new(Message {
        conversation_id: conversation.clone(),
        slot: 1,
        epoch: 0,
        seq,
        id: Uuid::now_v7(),
        created_at_ms: at_ms,
        sender: ParticipantId::parse("bench").expect("id"),
        kind: "text".into(),
        content: RawValue::from_string(format!(
            "{{\"text\":\"{}\",\"n\":{seq}}}",
            "x".repeat(payload)
        ))
        .expect("json"),
        metadata: RawValue::from_string("{}".into()).expect("json"),
        idempotency_key: None,
        rendered: Default::default(),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn pg_insert(a: &Args) {
    let Some(admin) = a.database_url.as_deref() else {
        println!("pg-insert: skipped (no Postgres URL)");
        return;
    };
    let (name, url) = pg::create_database(admin).await;
    let store = Store::connect(&url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    // As the archiver does: this many batches in flight at once, each on its own connection.
    let streams = store.max_concurrent_batches();
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|stream| {
            let store = store.clone();
            let (duration, batch_len, payload) = (a.duration, a.batch, a.payload);
            tokio::spawn(async move {
                let conversations: Vec<ConversationId> = (0..100)
                    .map(|i| ConversationId::parse(&format!("bench-{stream}-{i}")).expect("id"))
                    .collect();
                let mut next_seq = vec![1u64; conversations.len()];
                let mut batches = Vec::new();
                let mut stored = 0u64;
                while started.elapsed() < duration {
                    let now = now_ms();
                    let batch: Vec<Arc<Message>> = (0..batch_len)
                        .map(|i| {
                            let c = i % conversations.len();
                            let seq = next_seq[c];
                            next_seq[c] += 1;
                            message(&conversations[c], seq, payload, now)
                        })
                        .collect();
                    let t = Instant::now();
                    store.store_messages(&batch).await.expect("store batch");
                    batches.push(t.elapsed());
                    stored += batch.len() as u64;
                }
                (stored, batches)
            })
        })
        .collect();
    let mut stored = 0u64;
    let mut batches = Vec::new();
    for task in tasks {
        let (n, b) = task.await.expect("insert task");
        stored += n;
        batches.extend(b);
    }
    println!("pg-insert: {streams} batches in flight at once (Archive::max_concurrent_batches)");
    let elapsed = started.elapsed();
    batches.sort();
    println!(
        "pg-insert: {stored} messages ({} B content) in {:.1} s = {:.0} messages/s; batch of {}: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        a.payload,
        elapsed.as_secs_f64(),
        stored as f64 / elapsed.as_secs_f64(),
        a.batch,
        percentile(&batches, 0.5).as_secs_f64() * 1e3,
        percentile(&batches, 0.99).as_secs_f64() * 1e3,
        batches.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    store.close().await;
    pg::drop_database(admin, &name).await;
}

async fn cold_replay(a: &Args) {
    const N: u64 = 10_000;
    const PAGE: usize = 1000;
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, pg) = match a.database_url.as_deref() {
        Some(admin) => {
            let (name, url) = pg::create_database(admin).await;
            (url, Some((admin.to_owned(), name)))
        }
        None => (format!("sqlite://{}/ferry.db", dir.path().display()), None),
    };
    let objects = format!("file://{}/objects", dir.path().display());
    let cold = Arc::new(ColdTier::open(&objects).expect("object store"));
    let store = Store::connect(&url, 4)
        .await
        .expect("connect")
        .with_cold_tier(cold.clone());
    store.migrate().await.expect("migrate");
    let id = ConversationId::parse("replay").expect("id");
    store
        .upsert_conversation(&id, &[], None, now_ms())
        .await
        .expect("conversation");
    let old = now_ms() - 86_400_000;
    let all: Vec<Arc<Message>> = (1..=N).map(|s| message(&id, s, a.payload, old)).collect();
    for chunk in all.chunks(2000) {
        store.store_messages(chunk).await.expect("store");
    }
    let config = CompactorConfig {
        sql_retention: Duration::from_secs(3600),
        interval: Duration::from_secs(60),
        segment_records: 4096,
        retention: Duration::from_secs(30 * 86_400),
        only_while: None,
    };
    let report = compactor::compact_once(&store, &cold, &config, now_ms())
        .await
        .expect("compact");
    assert_eq!(report.messages, N, "everything compacted");
    let mut runs = Vec::new();
    for _ in 0..7 {
        // A fresh cold tier: nothing decoded in memory, objects read from disk (page cache warm).
        let fresh = Arc::new(ColdTier::open(&objects).expect("object store"));
        let reader = Store::connect(&url, 4)
            .await
            .expect("connect")
            .with_cold_tier(fresh);
        let t = Instant::now();
        let mut after = 0;
        let mut got = 0;
        loop {
            let page = reader
                .read_messages(&id, after, u64::MAX, PAGE, false)
                .await
                .expect("read");
            let Some(last) = page.last() else {
                break;
            };
            after = last.seq;
            got += page.len() as u64;
            // What a client receives: the JSON of each message.
            for m in &page {
                std::hint::black_box(serde_json::to_vec(&**m).expect("json"));
            }
        }
        runs.push(t.elapsed());
        assert_eq!(got, N);
        reader.close().await;
    }
    runs.sort();
    println!(
        "cold-replay: {N} messages from {} segments ({}), pages of {PAGE}, cold cache: \
         median {:.1} ms, min {:.1} ms, max {:.1} ms",
        report.segments,
        if pg.is_some() {
            "postgres index"
        } else {
            "sqlite index"
        },
        percentile(&runs, 0.5).as_secs_f64() * 1e3,
        runs[0].as_secs_f64() * 1e3,
        runs[runs.len() - 1].as_secs_f64() * 1e3,
    );
    store.close().await;
    if let Some((admin, name)) = pg {
        pg::drop_database(&admin, &name).await;
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for s in &a.scenarios {
            match s.as_str() {
                "pg-insert" => pg_insert(&a).await,
                "cold-replay" => cold_replay(&a).await,
                other => panic!("unknown scenario {other}"),
            }
        }
    });
}
