//! Reserved seqs (`ferry::cluster::reserve`) against a real Postgres, a fresh database per test:
//! each failover of a slot reserves once per conversation, after the highest seq archived or
//! reserved before, and only for conversations that existed before it.
//!
//! The failovers themselves are written as `ClusterDb::failover_slot` writes them (one
//! `slot_failovers` row each); what is tested here is what a conversation makes of them.

mod common;

use std::time::Duration;

use ferry::cluster::db::ClusterDb;
use ferry::cluster::reserve::Reservation;
use ferry::store::Store;

use common::pg::TestDatabase;

async fn setup() -> Option<(TestDatabase, ClusterDb)> {
    let db = TestDatabase::create().await?;
    let store = Store::connect(&db.url, 1).await.expect("store");
    store.migrate().await.expect("migrate");
    store.close().await;
    let cluster = ClusterDb::connect(&db.url, 2, Duration::from_secs(30))
        .await
        .expect("connect the cluster db");
    Some((db, cluster))
}

/// A failover of `slot` from `from` at `epoch` that reserves `reserve` seqs per conversation.
async fn failover(cluster: &ClusterDb, slot: i32, epoch: i64, from: &str, reserve: i64) {
    sqlx::query(
        "INSERT INTO slot_failovers (slot, epoch, from_node, from_epoch, to_node, reserve) \
         VALUES ($1, $2, $3, $2 - 1, 'b', $4)",
    )
    .bind(slot)
    .bind(epoch)
    .bind(from)
    .bind(reserve)
    .execute(cluster.pool())
    .await
    .expect("failover row");
}

fn reservation(from_seq: u64, to_seq: u64, epoch: u64, node: &str) -> Reservation {
    Reservation {
        from_seq,
        to_seq,
        epoch,
        node_id: node.into(),
        restored: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failover_reserves_once_after_what_was_archived_or_reserved() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    // No failover: nothing reserved, appends continue after the archive.
    assert_eq!(cluster.ensure_reservations("c", 3, 7).await.unwrap(), 7);
    assert!(cluster.reservations("c").await.unwrap().is_empty());

    failover(&cluster, 3, 5, "a", 100).await;
    assert_eq!(cluster.ensure_reservations("c", 3, 7).await.unwrap(), 107);
    // Once per (conversation, failover): asking again reserves nothing more.
    assert_eq!(cluster.ensure_reservations("c", 3, 7).await.unwrap(), 107);
    assert_eq!(
        cluster.reservations("c").await.unwrap(),
        vec![reservation(8, 107, 5, "a")]
    );

    // The new owner wrote up to 120 and died too: the next failover reserves after that.
    failover(&cluster, 3, 6, "b", 50).await;
    assert_eq!(cluster.ensure_reservations("c", 3, 120).await.unwrap(), 170);
    // A failover that reserves nothing (the lost node acknowledged only what SQL holds).
    failover(&cluster, 3, 7, "d", 0).await;
    assert_eq!(cluster.ensure_reservations("c", 3, 170).await.unwrap(), 170);
    assert_eq!(
        cluster.reservations("c").await.unwrap(),
        vec![reservation(8, 107, 5, "a"), reservation(121, 170, 6, "b")]
    );

    // Another slot's failovers are not this conversation's; another conversation of slot 3
    // that never started gets its own reservations, after its own archive.
    assert_eq!(cluster.ensure_reservations("other", 4, 2).await.unwrap(), 2);
    assert_eq!(cluster.ensure_reservations("d", 3, 0).await.unwrap(), 150);
    assert_eq!(
        cluster.reservations("d").await.unwrap(),
        vec![reservation(1, 100, 5, "a"), reservation(101, 150, 6, "b")]
    );
    let totals = cluster.reservation_totals().await.unwrap();
    assert_eq!(totals, vec![(3, 2, 300, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_created_after_a_failover_reserves_nothing_for_it() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    failover(&cluster, 1, 2, "a", 100).await;
    cluster.mark_created("new", 1).await.unwrap();
    assert_eq!(cluster.ensure_reservations("new", 1, 0).await.unwrap(), 0);
    assert!(cluster.reservations("new").await.unwrap().is_empty());
    // A later failover does reserve in it.
    failover(&cluster, 1, 3, "b", 10).await;
    assert_eq!(cluster.ensure_reservations("new", 1, 4).await.unwrap(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_of_one_conversation_reserve_once() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    failover(&cluster, 2, 4, "a", 1000).await;
    let runs = (0..8).map(|_| {
        let cluster = cluster.clone();
        tokio::spawn(async move { cluster.ensure_reservations("c", 2, 5).await.unwrap() })
    });
    for run in runs {
        assert_eq!(run.await.unwrap(), 1005);
    }
    assert_eq!(
        cluster.reservations("c").await.unwrap(),
        vec![reservation(6, 1005, 4, "a")]
    );
}

fn message(
    conversation: &str,
    seq: u64,
    key: Option<&str>,
) -> std::sync::Arc<ferry_shards::record::Message> {
    use ferry_shards::ids::{ConversationId, ParticipantId};
    use serde_json::value::RawValue;
    std::sync::Arc::new(ferry_shards::record::Message {
        conversation_id: ConversationId::parse(conversation).unwrap(),
        slot: 3,
        epoch: 4,
        seq,
        id: uuid::Uuid::now_v7(),
        created_at_ms: 1_790_000_000_000 + seq as i64,
        sender: ParticipantId::parse("alice").unwrap(),
        kind: "text".into(),
        content: RawValue::from_string(format!("{{\"n\":{seq}}}")).unwrap(),
        metadata: RawValue::from_string("{}".into()).unwrap(),
        idempotency_key: key.map(Into::into),
        rendered: Default::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_writes_only_into_seqs_reserved_for_that_node() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    failover(&cluster, 3, 5, "a", 10).await;
    // Archived up to 4; seqs 5..=14 are a's; the new owner appended 15 with key "k15".
    assert_eq!(cluster.ensure_reservations("c", 3, 4).await.unwrap(), 14);
    let none = std::collections::HashSet::new();
    let live = message("c", 15, Some("k15"));
    let stored = cluster
        .restore_messages("c", "b-is-not-a", &[], &none)
        .await
        .unwrap();
    assert_eq!(stored, Default::default());
    // (The new owner's own message, written as the archiver would: a restore must not touch it.)
    sqlx::query(
        "INSERT INTO messages (conversation_id, seq, id, sender, kind, content, metadata, \
         created_at, created_at_ms, idempotency_key, slot) \
         VALUES ('c', 15, CAST($1 AS UUID), 'alice', 'text', '{}', '{}', now(), 0, 'k15', 3)",
    )
    .bind(live.id.to_string())
    .execute(cluster.pool())
    .await
    .unwrap();

    let back = [
        message("c", 5, Some("k5")),
        message("c", 6, Some("k15")), // retried, and taken by the new owner as seq 15
        message("c", 7, None),
        message("c", 8, Some("held-in-memory")),
        message("c", 15, None), // not reserved for a: another message holds it
        message("c", 16, None), // beyond every reservation
    ];
    let in_memory = std::collections::HashSet::from(["held-in-memory".to_owned()]);
    let done = cluster
        .restore_messages("c", "a", &back, &in_memory)
        .await
        .unwrap();
    assert_eq!(done.restored, vec![5, 7]);
    assert_eq!(done.duplicates, vec![6, 8]);
    assert_eq!(done.orphaned, vec![15, 16]);
    assert!(done.present.is_empty());

    // Again (a restore interrupted and run once more): nothing is written twice.
    let again = cluster
        .restore_messages("c", "a", &back[..1], &none)
        .await
        .unwrap();
    assert_eq!(again.present, vec![5]);
    let reservations = cluster.reservations("c").await.unwrap();
    assert_eq!(reservations[0].restored, 2);
    let orphans: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orphaned_messages")
        .fetch_one(cluster.pool())
        .await
        .unwrap();
    assert_eq!(orphans.0, 2);
    // Seq 5 reads back with the restored message's id and content.
    let (id, content): (String, String) = sqlx::query_as(
        "SELECT CAST(id AS TEXT), CAST(content AS TEXT) FROM messages \
         WHERE conversation_id = 'c' AND seq = 5",
    )
    .fetch_one(cluster.pool())
    .await
    .unwrap();
    assert_eq!(id, back[0].id.to_string());
    assert_eq!(content, r#"{"n": 5}"#);

    // A reserved seq whose range has since moved to cold storage is never written: no read
    // would look at SQL there.
    sqlx::query(
        "INSERT INTO message_segments (conversation_id, first_seq, last_seq, object_key, \
         record_count, bytes, min_created_at_ms, max_created_at_ms, created_at_ms) \
         VALUES ('c', 1, 10, 'c/1', 6, 100, 0, 0, 0)",
    )
    .execute(cluster.pool())
    .await
    .unwrap();
    let cold = cluster
        .restore_messages(
            "c",
            "a",
            &[message("c", 9, None), message("c", 11, None)],
            &none,
        )
        .await
        .unwrap();
    assert_eq!((cold.orphaned, cold.restored), (vec![9], vec![11]));
}

/// A node whose slot was failed over without reserved seqs ran `durability = "archive"`: what
/// SQL lacks of its messages was never acknowledged, so a restore stores none of it and keeps
/// none of it as orphaned, whether or not the new owner reused the seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_a_node_that_ran_archive_drops_what_was_never_acknowledged() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    failover(&cluster, 3, 5, "z", 0).await;
    assert_eq!(cluster.ensure_reservations("c", 3, 4).await.unwrap(), 4);
    // The new owner's seq 5 (z's unacknowledged seq 5 too).
    sqlx::query(
        "INSERT INTO messages (conversation_id, seq, id, sender, kind, content, metadata, \
         created_at, created_at_ms, slot) \
         VALUES ('c', 5, CAST($1 AS UUID), 'alice', 'text', '{}', '{}', now(), 0, 3)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .execute(cluster.pool())
    .await
    .unwrap();
    let none = std::collections::HashSet::new();
    let done = cluster
        .restore_messages(
            "c",
            "z",
            &[message("c", 5, None), message("c", 6, None)],
            &none,
        )
        .await
        .unwrap();
    assert_eq!(done.unacknowledged, vec![5, 6]);
    assert!(
        done.restored.is_empty() && done.orphaned.is_empty(),
        "{done:?}"
    );
    let orphans: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orphaned_messages")
        .fetch_one(cluster.pool())
        .await
        .unwrap();
    assert_eq!(orphans.0, 0);
}
