//! Conversation actors under supervision, on a real WAL: crashes, restarts and idle retirement
//! never lose an acknowledged message and never reuse a seq.
//!
//! Activation (starting a conversation's actor) is bounded, never holds up another conversation
//! of the slot, starts one actor per conversation however many callers race, and a read starts
//! none.
//!
//! The archive here is an in-memory implementation of the `Archive` trait, so these tests run
//! without a database; the node binary's tests run the same paths against real SQL. It can hold
//! a conversation's load until the test releases it, or fail it, and fail every store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_shards::actor::conversation::AppendRequest;
use ferry_shards::archive::{
    Archive, ArchiveError, BoxFuture, ConversationMeta, ConversationSnapshot, Restored,
};
use ferry_shards::conversation_log::DedupeEntry;
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::node::{Node, NodeConfig, NodeError, TryAgainReason};
use ferry_shards::record::Message;
use ferry_shards::wal::{FsIo, WalFile, WalIo, WalOptions};
use serde_json::value::RawValue;

#[derive(Default)]
struct MemoryArchive {
    conversations: Mutex<HashMap<ConversationId, ConversationMeta>>,
    messages: Mutex<BTreeMap<(String, u64), Arc<Message>>>,
    /// The size of every `store_messages` call, in order.
    batches: Mutex<Vec<usize>>,
    /// Loads started, per conversation.
    loads: Mutex<HashMap<String, usize>>,
    /// Conversations whose loads wait until their gate opens (`true`).
    held: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// Conversations whose loads fail.
    failing: Mutex<HashSet<String>>,
    /// Every `store_messages` fails while set.
    stores_fail: AtomicBool,
    /// Per conversation: the seqs reserved for a failed-over node (`from..=to`, node id).
    reserved: Mutex<HashMap<String, (u64, u64, String)>>,
    /// When set, a store of a message whose slot these gates do not own is refused, as the SQL
    /// archive's fence refuses a batch of a slot another node took.
    fence: Mutex<Option<Arc<ferry_shards::gate::Gates>>>,
}

impl MemoryArchive {
    fn create(&self, id: &str) -> ConversationId {
        let id = ConversationId::parse(id).unwrap();
        self.conversations.lock().unwrap().insert(
            id.clone(),
            ConversationMeta {
                id: id.clone(),
                participants: vec![ParticipantId::parse("alice").unwrap()],
                metadata: RawValue::from_string("{}".into()).unwrap(),
                created_at_ms: 0,
            },
        );
        id
    }

    /// Makes loads of `id` wait until the returned gate is opened (`send(true)`).
    fn hold(&self, id: &ConversationId) -> tokio::sync::watch::Sender<bool> {
        let (gate, held) = tokio::sync::watch::channel(false);
        self.held.lock().unwrap().insert(id.to_string(), held);
        gate
    }

    fn loads(&self, id: &ConversationId) -> usize {
        self.loads
            .lock()
            .unwrap()
            .get(id.as_str())
            .copied()
            .unwrap_or(0)
    }

    fn stored(&self, id: &ConversationId) -> Vec<Arc<Message>> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _), _)| c == id.as_str())
            .map(|(_, m)| m.clone())
            .collect()
    }
}

impl Archive for MemoryArchive {
    fn load_conversation<'a>(
        &'a self,
        id: &'a ConversationId,
        window: usize,
    ) -> BoxFuture<'a, Result<Option<ConversationSnapshot>, ArchiveError>> {
        Box::pin(async move {
            *self
                .loads
                .lock()
                .unwrap()
                .entry(id.to_string())
                .or_default() += 1;
            let held = self.held.lock().unwrap().get(id.as_str()).cloned();
            if let Some(mut held) = held {
                let _ = held.wait_for(|open| *open).await;
            }
            if self.failing.lock().unwrap().contains(id.as_str()) {
                return Err(ArchiveError::Unavailable("load refused by the test".into()));
            }
            let Some(meta) = self.conversations.lock().unwrap().get(id).cloned() else {
                return Ok(None);
            };
            let stored = self.stored(id);
            let reserved_to = self
                .reserved
                .lock()
                .unwrap()
                .get(id.as_str())
                .map_or(0, |r| r.1);
            let last_seq = stored.last().map_or(0, |m| m.seq).max(reserved_to);
            let recent_keys = stored
                .iter()
                .filter(|m| m.seq + window as u64 > last_seq)
                .filter_map(|m| {
                    m.idempotency_key.as_ref().map(|k| {
                        (
                            k.to_string(),
                            DedupeEntry {
                                seq: m.seq,
                                id: m.id,
                                created_at_ms: m.created_at_ms,
                            },
                        )
                    })
                })
                .collect();
            Ok(Some(ConversationSnapshot {
                meta,
                last_seq,
                recent_keys,
            }))
        })
    }

    fn store_messages<'a>(
        &'a self,
        messages: &'a [Arc<Message>],
    ) -> BoxFuture<'a, Result<(), ArchiveError>> {
        Box::pin(async move {
            if self.stores_fail.load(Ordering::SeqCst) {
                return Err(ArchiveError::Unavailable(
                    "store refused by the test".into(),
                ));
            }
            if let Some(gates) = self.fence.lock().unwrap().as_ref() {
                if let Some(m) = messages
                    .iter()
                    .find(|m| gates.owned_epoch(m.slot).is_none())
                {
                    return Err(ArchiveError::Unavailable(format!(
                        "fenced: slot {} is not owned by this node",
                        m.slot
                    )));
                }
            }
            self.batches.lock().unwrap().push(messages.len());
            let mut stored = self.messages.lock().unwrap();
            for m in messages {
                stored
                    .entry((m.conversation_id.to_string(), m.seq))
                    .or_insert_with(|| m.clone());
            }
            Ok(())
        })
    }

    fn restore_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        node_id: &'a str,
        messages: &'a [Arc<Message>],
        known_keys: &'a HashSet<String>,
    ) -> BoxFuture<'a, Result<Restored, ArchiveError>> {
        Box::pin(async move {
            let reserved = self.reserved.lock().unwrap().get(id.as_str()).cloned();
            let mut out = Restored::default();
            let mut stored = self.messages.lock().unwrap();
            for m in messages {
                let key = (id.to_string(), m.seq);
                match stored.get(&key) {
                    Some(held) if held.id == m.id => {
                        out.present.push(m.seq);
                        continue;
                    }
                    Some(_) => {
                        out.orphaned.push(m.seq);
                        continue;
                    }
                    None => {}
                }
                let covered = reserved
                    .as_ref()
                    .is_some_and(|(a, b, n)| n == node_id && *a <= m.seq && m.seq <= *b);
                if !covered {
                    out.orphaned.push(m.seq);
                    continue;
                }
                if let Some(k) = m.idempotency_key.as_deref() {
                    let held = stored.iter().any(|((c, _), s)| {
                        c == id.as_str() && s.idempotency_key.as_deref() == Some(k)
                    });
                    if held || known_keys.contains(k) {
                        out.duplicates.push(m.seq);
                        continue;
                    }
                }
                stored.insert(key, m.clone());
                out.restored.push(m.seq);
            }
            Ok(out)
        })
    }

    fn read_messages<'a>(
        &'a self,
        id: &'a ConversationId,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
        newest_first: bool,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ArchiveError>> {
        Box::pin(async move {
            let range: Vec<_> = self
                .stored(id)
                .into_iter()
                .filter(|m| m.seq > after_seq && m.seq < before_seq)
                .collect();
            Ok(if newest_first {
                let skip = range.len().saturating_sub(limit);
                range.into_iter().skip(skip).collect()
            } else {
                range.into_iter().take(limit).collect()
            })
        })
    }
}

fn request(text: &str, key: Option<&str>) -> AppendRequest {
    AppendRequest {
        sender: ParticipantId::parse("alice").unwrap(),
        kind: "text".into(),
        content: RawValue::from_string(serde_json::to_string(text).unwrap()).unwrap(),
        metadata: RawValue::from_string("{}".into()).unwrap(),
        idempotency_key: key.map(Into::into),
    }
}

fn config() -> NodeConfig {
    NodeConfig {
        slot_count: 8,
        ring_bytes_per_conversation: 512,
        ..NodeConfig::default()
    }
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Appends with an idempotency key, retrying `try_again` answers as a client would.
async fn append_retrying(node: &Node, id: &ConversationId, text: &str) -> u64 {
    loop {
        match node.append(id, request(text, Some(text))).await {
            Ok(outcome) => return outcome.seq,
            Err(NodeError::TryAgain { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_under_load_lose_nothing_and_reuse_no_seq() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("busy");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();

    let writers: Vec<_> = (0..10)
        .map(|w| {
            let node = node.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..60 {
                    let text = format!("w{w}-{i}");
                    acked.push((append_retrying(&node, &id, &text).await, text));
                }
                acked
            })
        })
        .collect();
    let crasher = {
        let node = node.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut crashes = 0;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(3)).await;
                if node.crash_conversation_actor(&id).await.is_ok() {
                    crashes += 1;
                }
            }
            crashes
        })
    };
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(crasher.await.unwrap() > 0, "no crash was injected");

    let mut seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), acked.len(), "a seq was acknowledged twice");
    assert_eq!(seqs, (1..=600).collect::<Vec<_>>(), "acked seqs have holes");

    let handle = node.conversation(&id).await.unwrap();
    assert_eq!(handle.log.durable_seq(), 600);
    let all = node.read_after(&handle, 0, 10_000).await.unwrap();
    assert_eq!(all.len(), 600);
    for (seq, text) in &acked {
        let m = &all[(*seq - 1) as usize];
        assert_eq!(m.seq, *seq);
        assert_eq!(m.content.get(), serde_json::to_string(text).unwrap());
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_wal_continues_seqs_and_remembers_keys() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("c");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    for i in 0..25 {
        append_retrying(&node, &id, &format!("m{i}")).await;
    }
    node.shutdown().await;

    // A second node on the same WAL and archive: recovery adopts whatever was not archived.
    let (node, report) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    assert!(report.recovered_records <= 25);
    let again = node.append(&id, request("m3", Some("m3"))).await.unwrap();
    assert!(again.deduped, "key forgotten across restart");
    assert_eq!(again.seq, 4);
    let next = node.append(&id, request("new", None)).await.unwrap();
    assert_eq!(next.seq, 26);
    let handle = node.conversation(&id).await.unwrap();
    let all = node.read_after(&handle, 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=26).collect::<Vec<_>>()
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_conversations_retire_and_come_back_where_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("idle");
    let config = NodeConfig {
        idle_timeout: Duration::from_millis(100),
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    for i in 0..5 {
        append_retrying(&node, &id, &format!("m{i}")).await;
    }
    eventually("the idle actor to retire", || {
        node.active_handle(&id).is_none()
    })
    .await;
    assert_eq!(archive.stored(&id).len(), 5, "retired before archiving");
    let dup = node.append(&id, request("m1", Some("m1"))).await.unwrap();
    assert!(dup.deduped);
    assert_eq!(dup.seq, 2);
    assert_eq!(append_retrying(&node, &id, "after").await, 6);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_conversations_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive)
        .await
        .unwrap();
    let id = ConversationId::parse("missing").unwrap();
    assert!(matches!(
        node.append(&id, request("x", None)).await,
        Err(NodeError::NotFound)
    ));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archiver_stores_full_batches_at_once_and_lets_partial_ones_linger() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("linger");
    // A linger far longer than the test: a partial batch is only stored by the shutdown.
    let config = NodeConfig {
        archive_batch_records: 50,
        archive_linger: Duration::from_secs(600),
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    for i in 0..60 {
        append_retrying(&node, &id, &format!("m{i}")).await;
    }
    // The 50th message completed a batch, which went without waiting for the linger.
    eventually("the full batch to be stored", || {
        archive.stored(&id).len() == 50
    })
    .await;
    assert_eq!(*archive.batches.lock().unwrap(), vec![50]);
    let handle = node.conversation(&id).await.unwrap();
    let all = node.read_after(&handle, 0, 100).await.unwrap();
    assert_eq!(
        all.len(),
        60,
        "lingering messages are readable from the ring"
    );
    node.shutdown().await;
    // Stopping stores what lingered, as one batch.
    assert_eq!(*archive.batches.lock().unwrap(), vec![50, 10]);
    assert_eq!(
        archive
            .stored(&id)
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
}

/// The ordering promise of `Node::submit`: appends one caller submits one after the other take
/// seqs in that order, even though they become durable together. A held slot refuses new
/// appends (handing them back unchanged) while the ones in flight finish, and a released slot
/// answers `NotOwner` and tells its readers it moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_appends_take_seqs_in_submission_order_and_a_held_slot_hands_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("ordered");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let mut tickets = Vec::new();
    for i in 0..200 {
        let ticket = match node.submit(&id, request(&format!("m{i}"), None)).await {
            Ok(t) => t,
            Err(_) => panic!("submit {i} refused"),
        };
        tickets.push(ticket);
    }
    let mut seqs = Vec::new();
    for ticket in tickets {
        seqs.push(ticket.outcome().await.unwrap().seq);
    }
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    let handle = node.conversation(&id).await.unwrap();
    let texts: Vec<String> = node
        .read_after(&handle, 0, 500)
        .await
        .unwrap()
        .iter()
        .map(|m| m.content.get().to_owned())
        .collect();
    let expected: Vec<String> = (0..200).map(|i| format!("\"m{i}\"")).collect();
    assert_eq!(texts, expected, "seq order is submission order");

    // Hand-over: hold, in-flight appends finish, new ones come back unchanged.
    let slot = node.slot_of(&id);
    let in_flight = match node.submit(&id, request("last before hold", None)).await {
        Ok(t) => t,
        Err(_) => panic!("submit refused"),
    };
    node.gates().hold(slot);
    match node.submit(&id, request("held", Some("k-held"))).await {
        Err(ferry_shards::node::Refused::Holding(back)) => {
            assert_eq!(back.idempotency_key.as_deref(), Some("k-held"));
        }
        _ => panic!("a held slot must hand the append back"),
    }
    // In flight until the actor answers it, whether or not its caller is awaiting the answer.
    assert!(node.gates().wait_idle(slot, Duration::from_secs(5)).await);
    assert_eq!(in_flight.outcome().await.unwrap().seq, 201);
    assert!(node.wait_slot_archived(slot, Duration::from_secs(5)).await);
    let moved = handle.log.watch_durable();
    node.release_slot(slot, 2);
    assert!(handle.log.is_moved(), "readers of the log learn it moved");
    assert!(moved.has_changed().unwrap_or(true));
    match node.append(&id, request("after release", None)).await {
        Err(NodeError::NotOwner { slot: s }) => assert_eq!(s, slot),
        other => panic!("expected NotOwner, got {other:?}"),
    }
    assert!(matches!(
        node.conversation(&id).await,
        Err(NodeError::NotOwner { .. })
    ));
    // Everything acknowledged before the release is archived.
    assert_eq!(archive.stored(&id).len(), 201);
    node.shutdown().await;
}

/// A held slot makes `Node::append` wait for the hand-over to end, then answer `try_again`
/// (`slot_moving`) once the hold outlasts `hold_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_to_a_held_slot_waits_then_answers_slot_moving() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("held");
    let config = NodeConfig {
        hold_timeout: Duration::from_millis(200),
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let slot = node.slot_of(&id);
    node.gates().hold(slot);
    // Released while the append waits: it goes through.
    let waiting = {
        let (node, id) = (node.clone(), id.clone());
        tokio::spawn(async move { node.append(&id, request("waits", None)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    node.gates().set_serving(slot, 1);
    assert_eq!(waiting.await.unwrap().unwrap().seq, 1);
    // Held past the timeout: slot_moving, and nothing written.
    node.gates().hold(slot);
    match node.append(&id, request("refused", None)).await {
        Err(NodeError::TryAgain { reason, .. }) => {
            assert_eq!(reason.as_str(), "slot_moving")
        }
        other => panic!("expected try_again, got {other:?}"),
    }
    node.gates().set_serving(slot, 1);
    assert_eq!(append_retrying(&node, &id, "next").await, 2);
    node.shutdown().await;
}

/// Every message carries the epoch its slot was served at when the append was admitted: in the
/// durable event (what fan-out publishes), in the WAL record and in what the archiver stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_the_epoch_they_were_admitted_under() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("epochs");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let slot = node.slot_of(&id);
    let mut durable = node.subscribe_durable();
    assert_eq!(append_retrying(&node, &id, "at one").await, 1);
    node.gates().set_serving(slot, 7);
    assert_eq!(append_retrying(&node, &id, "at seven").await, 2);
    for expected in [(1, 1), (2, 7)] {
        let event = durable.recv().await.unwrap();
        assert_eq!((event.message.seq, event.message.epoch), expected);
    }
    node.archive_now();
    eventually("both archived", || archive.stored(&id).len() == 2).await;
    let stored: Vec<_> = archive
        .stored(&id)
        .iter()
        .map(|m| (m.seq, m.epoch))
        .collect();
    assert_eq!(stored, vec![(1, 1), (2, 7)]);
    node.shutdown().await;
}

fn set_down(archive: &MemoryArchive, down: bool) {
    archive.stores_fail.store(down, Ordering::SeqCst);
}

/// `ack_after_archive` (a cluster's `durability = "archive"`): an append is answered only once
/// the archive holds it, and readers see it no earlier; a retry of a pending append waits for
/// the same answer; while the archive is down nothing is acknowledged or visible, and nothing
/// is lost once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_after_archive_an_append_is_answered_once_archived() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("archived-ack");
    let config = NodeConfig {
        ack_after_archive: true,
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    // Archive up: answered, and by then stored.
    let first = node.append(&id, request("one", Some("one"))).await.unwrap();
    assert_eq!(first.seq, 1);
    assert_eq!(
        archive.stored(&id).len(),
        1,
        "answered before it was archived"
    );

    set_down(&archive, true);
    let pending = {
        let (node, id) = (node.clone(), id.clone());
        tokio::spawn(async move { node.append(&id, request("two", Some("two"))).await })
    };
    let retry = {
        let (node, id) = (node.clone(), id.clone());
        tokio::spawn(async move { node.append(&id, request("two", Some("two"))).await })
    };
    let handle = node.conversation(&id).await.unwrap();
    eventually("the second append to be durable in the wal", || {
        handle.log.assigned_seq() == 2 && node.archive_backlog().0 == 1
    })
    .await;
    // Durable in the WAL but not archived: neither answered nor visible.
    assert_eq!(handle.log.durable_seq(), 1);
    assert_eq!(node.read_after(&handle, 0, 10).await.unwrap().len(), 1);
    assert!(!pending.is_finished());

    set_down(&archive, false);
    let second = pending.await.unwrap().unwrap();
    assert_eq!(second.seq, 2);
    assert_eq!(
        archive.stored(&id).len(),
        2,
        "answered before it was archived"
    );
    let again = retry.await.unwrap().unwrap();
    assert_eq!(again.seq, 2);
    assert!(
        second.deduped != again.deduped,
        "one of the two was stored, once"
    );
    assert_eq!(handle.log.durable_seq(), 2);
    node.shutdown().await;
}

/// `max_unarchived` bounds what one conversation may hold that the archive does not: past it
/// appends get `try_again` (`archive_backlog`) until the archive catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_unarchived_bounds_a_conversations_unarchived_messages() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("bounded");
    let other = archive.create("other");
    let config = NodeConfig {
        max_unarchived: 3,
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    set_down(&archive, true);
    for i in 1..=3 {
        let seq = node
            .append(&id, request(&format!("m{i}"), None))
            .await
            .unwrap()
            .seq;
        assert_eq!(seq, i);
    }
    match node.append(&id, request("m4", None)).await {
        Err(NodeError::TryAgain { reason, .. }) => assert_eq!(reason.as_str(), "archive_backlog"),
        other => panic!("expected try_again archive_backlog, got {other:?}"),
    }
    // The bound is per conversation.
    assert_eq!(
        node.append(&other, request("o1", None)).await.unwrap().seq,
        1
    );
    set_down(&archive, false);
    node.archive_now();
    eventually("the backlog to be archived", || {
        archive.stored(&id).len() == 3
    })
    .await;
    assert_eq!(append_retrying(&node, &id, "m4").await, 4);
    node.shutdown().await;
}

/// With `ack_after_archive`, appends waiting for an archive that keeps failing are answered
/// `try_again` (`owner_unavailable`) once the node's lease is gone, not left waiting; their
/// records stay queued and become visible (unacknowledged) once the node archives them after
/// all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_acks_are_refused_when_the_lease_goes_and_the_archive_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("lapsed");
    let config = NodeConfig {
        ack_after_archive: true,
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    node.gates()
        .extend_lease(Instant::now() + Duration::from_secs(3600));
    set_down(&archive, true);
    let pending = {
        let (node, id) = (node.clone(), id.clone());
        tokio::spawn(async move { node.append(&id, request("one", Some("one"))).await })
    };
    eventually("the append to wait for the archive", || {
        node.archive_backlog().0 == 1
    })
    .await;
    node.gates().revoke_lease();
    match pending.await.unwrap() {
        Err(NodeError::TryAgain { reason, .. }) => assert_eq!(reason.as_str(), "owner_unavailable"),
        other => panic!("expected try_again owner_unavailable, got {other:?}"),
    }
    let handle = node.conversation(&id).await.unwrap();
    assert_eq!(
        handle.log.durable_seq(),
        0,
        "visible before it was archived"
    );
    // The lease and the archive come back: the record is archived and shown at its seq, and a
    // retry with its key is answered with it.
    node.gates()
        .extend_lease(Instant::now() + Duration::from_secs(3600));
    set_down(&archive, false);
    node.archive_now();
    eventually("the record to be archived", || {
        archive.stored(&id).len() == 1
    })
    .await;
    let again = node.append(&id, request("one", Some("one"))).await.unwrap();
    assert_eq!((again.seq, again.deduped), (1, true));
    assert_eq!(handle.log.durable_seq(), 1);
    node.shutdown().await;
}

/// A clustered node that finds, at start, acknowledged but unarchived messages of a slot it no
/// longer owns (a failover took it while the node was away) keeps them for restore instead of
/// dropping them, and the WAL keeps their records until the restore is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unarchived_messages_of_a_lost_slot_are_kept_for_restore() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let lost = archive.create("lost");
    let kept = archive.create("kept");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let lost_slot = node.slot_of(&lost);
    let kept_slot = node.slot_of(&kept);
    assert_ne!(lost_slot, kept_slot, "pick ids in different slots");
    assert_eq!(append_retrying(&node, &lost, "archived").await, 1);
    node.archive_now();
    eventually("the first to be archived", || {
        archive.stored(&lost).len() == 1
    })
    .await;
    set_down(&archive, true);
    for text in ["a", "b", "c"] {
        append_retrying(&node, &lost, text).await;
    }
    node.shutdown().await;
    set_down(&archive, false);

    // Started again as a cluster member that owns only `kept`'s slot.
    let gates = ferry_shards::gate::Gates::clustered(config().slot_count);
    gates.extend_lease(Instant::now() + Duration::from_secs(3600));
    gates.set_serving(kept_slot, 2);
    let clustered = NodeConfig {
        clustered: true,
        ..config()
    };
    let (node, _) = Node::start_with_gates(
        clustered.clone(),
        WalOptions::new(dir.path()),
        archive.clone(),
        gates.clone(),
    )
    .await
    .unwrap();
    let pending = node.pending_restore();
    assert_eq!(pending.len(), 1);
    let seqs: Vec<u64> = pending[0].messages.iter().map(|m| m.seq).collect();
    assert_eq!(pending[0].conversation_id, lost);
    assert_eq!(pending[0].slot, lost_slot);
    assert_eq!(seqs, vec![2, 3, 4], "only what the archive lacks");
    assert_eq!(
        archive.stored(&lost).len(),
        1,
        "nothing of a lost slot is archived here"
    );
    // Other slots archive as usual; the checkpoint stays below the kept records.
    assert_eq!(append_retrying(&node, &kept, "k1").await, 1);
    node.archive_now();
    eventually("kept's message archived", || {
        archive.stored(&kept).len() == 1
    })
    .await;
    node.shutdown().await;

    // Still there after another restart: the WAL kept them.
    let (node, _) = Node::start_with_gates(
        clustered,
        WalOptions::new(dir.path()),
        archive.clone(),
        gates,
    )
    .await
    .unwrap();
    let again = node.pending_restore();
    let seqs: Vec<u64> = again[0].messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    node.restore_done(again[0].id + 1);
    assert_eq!(
        node.pending_restore().len(),
        1,
        "another batch's id leaves it"
    );
    node.restore_done(again[0].id);
    assert!(node.pending_restore().is_empty());
    node.shutdown().await;
}

fn is_activating<T>(result: &Result<T, NodeError>) -> bool {
    matches!(
        result,
        Err(NodeError::TryAgain {
            reason: TryAgainReason::Activating,
            retry_after_ms: 50,
        })
    )
}

/// Conversation ids of one slot (of `config()`'s), `n` of them.
fn same_slot(node: &Node, archive: &MemoryArchive, prefix: &str, n: usize) -> Vec<ConversationId> {
    let first = archive.create(&format!("{prefix}-0"));
    let slot = node.slot_of(&first);
    let mut ids = vec![first];
    for i in 1.. {
        if ids.len() == n {
            break;
        }
        let id = ConversationId::parse(&format!("{prefix}-{i}")).unwrap();
        if node.slot_of(&id) == slot {
            ids.push(archive.create(id.as_str()));
        }
    }
    ids
}

/// Past `max_activations` starting actors, one more first touch is refused at once with
/// `activating`; callers of a conversation already starting wait for it without counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_past_the_bound_get_activating() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let (a, b, c) = (
        archive.create("a"),
        archive.create("b"),
        archive.create("c"),
    );
    let config = NodeConfig {
        max_activations: 2,
        activation_timeout: Duration::from_secs(30),
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let (gate_a, gate_b) = (archive.hold(&a), archive.hold(&b));
    let starting: Vec<_> = [&a, &a, &b]
        .into_iter()
        .map(|id| {
            let (node, id) = (node.clone(), id.clone());
            tokio::spawn(async move { node.conversation(&id).await })
        })
        .collect();
    eventually("both loads to start", || {
        archive.loads(&a) == 1 && archive.loads(&b) == 1
    })
    .await;
    assert_eq!(node.activations_in_progress(), 2);

    assert!(is_activating(&node.conversation(&c).await));
    assert!(is_activating(&node.append(&c, request("x", None)).await));
    assert_eq!(archive.loads(&c), 0, "a refused activation loads nothing");
    // A third caller of `a` shares its pending activation.
    let also_a = {
        let (node, a) = (node.clone(), a.clone());
        tokio::spawn(async move { node.conversation(&a).await })
    };

    gate_a.send(true).unwrap();
    gate_b.send(true).unwrap();
    let mut actors = HashSet::new();
    for task in starting.into_iter().chain([also_a]) {
        let handle = task.await.unwrap().expect("activation");
        actors.insert(handle.actor.get_id());
    }
    assert_eq!(actors.len(), 2, "one actor for a, one for b");
    assert_eq!(archive.loads(&a), 1);
    assert_eq!(node.activations_in_progress(), 0);
    assert_eq!(append_retrying(&node, &c, "now").await, 1);
    node.shutdown().await;
}

/// The slot actor does not wait for a load: one conversation whose load hangs or fails holds up
/// only its own callers, not another conversation of the same slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_failing_load_does_not_hold_up_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let ids = same_slot(&node, &archive, "slot-mate", 3);
    let (slow, failing, other) = (&ids[0], &ids[1], &ids[2]);
    let gate = archive.hold(slow);
    archive.failing.lock().unwrap().insert(failing.to_string());

    let waiting = {
        let (node, slow) = (node.clone(), slow.clone());
        tokio::spawn(async move { node.append(&slow, request("slow", None)).await })
    };
    eventually("the slow load to start", || archive.loads(slow) == 1).await;

    let quick = Duration::from_secs(5);
    let failed = tokio::time::timeout(quick, node.append(failing, request("f", None)))
        .await
        .expect("a failing load answers at once");
    assert!(
        matches!(failed, Err(NodeError::Unavailable(_))),
        "{failed:?}"
    );
    let seq = tokio::time::timeout(quick, node.append(other, request("o", None)))
        .await
        .expect("another conversation of the slot starts while the slow load hangs")
        .unwrap()
        .seq;
    assert_eq!(seq, 1);
    assert!(node.active_handle(slow).is_none());
    assert!(!waiting.is_finished());

    // A failed start leaves nothing behind: once the archive answers, it starts.
    archive.failing.lock().unwrap().clear();
    assert_eq!(append_retrying(&node, failing, "f again").await, 1);
    gate.send(true).unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().seq, 1);
    assert_eq!(archive.loads(slow), 1);
    node.shutdown().await;
}

/// A caller waits for a starting actor at most `activation_timeout` (`activating`); the load is
/// cut off after it too, so the pending activation does not outlive a hung archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_load_answers_activating_and_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("hung");
    let config = NodeConfig {
        activation_timeout: Duration::from_millis(200),
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let gate = archive.hold(&id);
    let started = Instant::now();
    assert!(is_activating(&node.conversation(&id).await));
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually("the hung activation to be given up", || {
        node.activations_in_progress() == 0
    })
    .await;
    assert!(node.active_handle(&id).is_none());
    gate.send(true).unwrap();
    assert_eq!(append_retrying(&node, &id, "after").await, 1);
    node.shutdown().await;
}

/// However many callers touch a conversation first at once, one actor starts and one load runs;
/// appends among them take distinct seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_touches_share_one_actor() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("crowded");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let gate = archive.hold(&id);
    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let (node, id) = (node.clone(), id.clone());
            tokio::spawn(async move { node.conversation(&id).await })
        })
        .collect();
    let appends: Vec<_> = (0..5)
        .map(|i| {
            let (node, id) = (node.clone(), id.clone());
            tokio::spawn(async move { node.append(&id, request(&format!("m{i}"), None)).await })
        })
        .collect();
    eventually("the load to start", || archive.loads(&id) == 1).await;
    assert_eq!(node.activations_in_progress(), 1);
    gate.send(true).unwrap();

    let mut actors = HashSet::new();
    for task in lookups {
        actors.insert(task.await.unwrap().unwrap().actor.get_id());
    }
    assert_eq!(actors.len(), 1, "one actor for every caller");
    let mut seqs: Vec<u64> = Vec::new();
    for task in appends {
        seqs.push(task.await.unwrap().unwrap().seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=5).collect::<Vec<_>>());
    assert_eq!(archive.loads(&id), 1, "one load");
    assert_eq!(
        node.active_handle(&id).unwrap().actor.get_id(),
        *actors.iter().next().unwrap()
    );
    node.shutdown().await;
}

/// What a reader sees through `peek` and through an active handle, compared.
async fn read_both_ways(node: &Node, id: &ConversationId) -> (u64, Vec<u64>, Vec<u64>) {
    let seqs = |messages: Vec<Arc<Message>>| messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let reader = node.peek(id).await.unwrap();
    let (last, after, before) = (
        reader.last_seq(),
        seqs(reader.read_after(0, 1000).await.unwrap()),
        seqs(reader.read_before(reader.last_seq(), 5).await.unwrap()),
    );
    assert_eq!(reader.meta().id, *id);
    (last, after, before)
}

/// Reading a conversation no actor serves starts none, and sees what an actor would: from the
/// archive alone once everything is archived, from the recovered log after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_an_inactive_conversation_starts_no_writer() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let archived = archive.create("archived");
    let recovered = archive.create("recovered");
    let config = NodeConfig {
        idle_timeout: Duration::from_millis(100),
        ..config()
    };
    let (node, _) = Node::start(config.clone(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    for i in 0..30 {
        append_retrying(&node, &archived, &format!("a{i}")).await;
    }
    eventually("the idle actor to retire", || {
        node.active_handle(&archived).is_none()
    })
    .await;

    // Archived: no actor, no log; the archive answers.
    let reader = node.peek(&archived).await.unwrap();
    assert!(reader.active().is_none());
    let looked = read_both_ways(&node, &archived).await;
    assert!(
        node.active_handle(&archived).is_none(),
        "a read started a writer"
    );
    assert!(node.peek_log(&archived).is_none());
    assert_eq!(looked.0, 30);
    assert_eq!(looked.1, (1..=30).collect::<Vec<_>>());
    assert_eq!(looked.2, (25..=29).collect::<Vec<_>>());
    assert!(matches!(
        node.peek(&ConversationId::parse("nobody").unwrap()).await,
        Err(NodeError::NotFound)
    ));

    // Recovered: the archive takes nothing, so a restart finds the messages only in the WAL.
    archive.stores_fail.store(true, Ordering::SeqCst);
    for i in 0..10 {
        append_retrying(&node, &recovered, &format!("r{i}")).await;
    }
    node.shutdown().await;
    let (node, report) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    assert_eq!(report.recovered_conversations, 1);
    let reader = node.peek(&recovered).await.unwrap();
    assert!(reader.active().is_none());
    let looked_recovered = read_both_ways(&node, &recovered).await;
    assert!(
        node.active_handle(&recovered).is_none(),
        "a read started a writer"
    );
    assert_eq!(looked_recovered.0, 10, "the recovered log's last seq");
    assert_eq!(looked_recovered.1, (1..=10).collect::<Vec<_>>());
    assert_eq!(node.slot_conversations().iter().sum::<usize>(), 0);

    // After activation, the same.
    for id in [&archived, &recovered] {
        let handle = node.conversation(id).await.unwrap();
        assert!(node.peek(id).await.unwrap().active().is_some());
        let active = read_both_ways(&node, id).await;
        let expected = if id == &archived {
            looked.clone()
        } else {
            looked_recovered.clone()
        };
        assert_eq!(active, expected);
        assert_eq!(handle.log.durable_seq(), expected.0);
    }
    archive.stores_fail.store(false, Ordering::SeqCst);
    node.shutdown().await;
}

/// A conversation actor that panics is restarted on the same log: nothing is loaded again, its
/// seqs continue and its idempotency keys are remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_actor_keeps_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("phoenix");
    let (node, _) = Node::start(config(), WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    for i in 0..5 {
        append_retrying(&node, &id, &format!("k{i}")).await;
    }
    let before = node.active_handle(&id).unwrap();
    node.crash_conversation_actor(&id).await.unwrap();
    eventually("the actor to be restarted", || {
        node.active_handle(&id)
            .is_some_and(|h| h.actor.get_id() != before.actor.get_id())
    })
    .await;
    let after = node.active_handle(&id).unwrap();
    assert!(
        Arc::ptr_eq(&before.log, &after.log),
        "a new log after restart"
    );
    let dup = node.append(&id, request("k2", Some("k2"))).await.unwrap();
    assert!(dup.deduped);
    assert_eq!(dup.seq, 3);
    assert_eq!(append_retrying(&node, &id, "next").await, 6);
    assert_eq!(archive.loads(&id), 1, "a restart loads nothing");
    node.shutdown().await;
}

/// A slot taken from a running node without a hand-over (a failover while it was paused):
/// the node lets go of it, what it had queued of the slot leaves the archive queue — kept for
/// restore, since it was acknowledged — and the archiver is not stalled by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_while_running_leaves_the_archive_queue_for_restore() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let lost = archive.create("lost");
    let kept = archive.create("kept");
    let gates = ferry_shards::gate::Gates::clustered(config().slot_count);
    gates.extend_lease(Instant::now() + Duration::from_secs(3600));
    let clustered = NodeConfig {
        clustered: true,
        ..config()
    };
    let slot_of = |id: &ConversationId| ferry_shards::placement::slot_of(id.as_str(), 8);
    gates.set_serving(slot_of(&lost), 3);
    gates.set_serving(slot_of(&kept), 3);
    *archive.fence.lock().unwrap() = Some(gates.clone());
    let (node, _) = Node::start_with_gates(
        clustered,
        WalOptions::new(dir.path()),
        archive.clone(),
        gates.clone(),
    )
    .await
    .unwrap();
    set_down(&archive, true);
    for text in ["a", "b"] {
        append_retrying(&node, &lost, text).await;
    }
    // Another node took the slot at epoch 4.
    node.lose_slot(slot_of(&lost), 4);
    assert!(matches!(
        node.append(&lost, request("late", None)).await,
        Err(NodeError::NotOwner { .. })
    ));
    set_down(&archive, false);
    assert_eq!(append_retrying(&node, &kept, "k").await, 1);
    node.archive_now();
    eventually("the kept slot to archive past the lost one", || {
        archive.stored(&kept).len() == 1
    })
    .await;
    assert!(
        archive.stored(&lost).is_empty(),
        "a lost slot's records are not archived here"
    );
    let pending: Vec<u64> = node
        .pending_restore()
        .iter()
        .flat_map(|b| b.messages.iter().map(|m| m.seq))
        .collect();
    assert_eq!(pending, vec![1, 2]);
    node.shutdown().await;
}

/// A message node `n-old` acknowledged at `seq` before its slot was failed over.
fn lost_message(id: &ConversationId, slot: u32, seq: u64, key: Option<&str>) -> Arc<Message> {
    Arc::new(Message {
        conversation_id: id.clone(),
        slot,
        epoch: 3,
        seq,
        id: uuid::Uuid::now_v7(),
        created_at_ms: 1_790_000_000_000 + seq as i64,
        sender: ParticipantId::parse("alice").unwrap(),
        kind: "text".into(),
        content: RawValue::from_string(format!("\"lost {seq}\"")).unwrap(),
        metadata: RawValue::from_string("{}".into()).unwrap(),
        idempotency_key: key.map(Into::into),
        rendered: Default::default(),
    })
}

/// The owner writes a failed-over node's messages into the seqs reserved for it, through the
/// conversation's actor: never a seq outside the reservation, never a key the conversation
/// already holds (in the archive or only in the owner's window), again harmlessly; the
/// restored keys dedupe later appends; a node that does not own the slot refuses.
#[tokio::test]
async fn restore_writes_only_reserved_seqs_and_its_keys_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let c = archive.create("restored");
    archive
        .reserved
        .lock()
        .unwrap()
        .insert("restored".into(), (3, 12, "n-old".into()));
    let gates = ferry_shards::gate::Gates::clustered(config().slot_count);
    gates.extend_lease(Instant::now() + Duration::from_secs(3600));
    let slot = ferry_shards::placement::slot_of(c.as_str(), config().slot_count);
    gates.set_serving(slot, 4);
    let (node, _) = Node::start_with_gates(
        NodeConfig {
            clustered: true,
            ..config()
        },
        WalOptions::new(dir.path()),
        archive.clone(),
        gates.clone(),
    )
    .await
    .unwrap();
    // New appends continue after the reservation; one holds a key that is not archived yet.
    set_down(&archive, true);
    let first = node
        .append(&c, request("new", Some("k-new")))
        .await
        .unwrap();
    assert_eq!(first.seq, 13);

    let lost = vec![
        lost_message(&c, slot, 3, Some("k-1")),
        lost_message(&c, slot, 4, Some("k-new")),
        lost_message(&c, slot, 5, None),
        lost_message(&c, slot, 20, Some("k-20")),
    ];
    let report = node.restore(&c, "n-old", lost.clone()).await.unwrap();
    assert_eq!(report.restored, vec![3, 5]);
    assert_eq!(
        report.duplicates,
        vec![4],
        "k-new is only in the owner's window"
    );
    assert_eq!(report.orphaned, vec![20], "20 is not reserved");
    assert!(report.present.is_empty());
    let stored: Vec<u64> = archive.stored(&c).iter().map(|m| m.seq).collect();
    assert_eq!(stored, vec![3, 5]);

    // A retry of the restored key is answered with its restored seq and id.
    let retry = node
        .append(&c, request("again", Some("k-1")))
        .await
        .unwrap();
    assert!(retry.deduped);
    assert_eq!((retry.seq, retry.id), (3, lost[0].id));
    // Restoring again changes nothing.
    let again = node.restore(&c, "n-old", lost.clone()).await.unwrap();
    assert_eq!(again.present, vec![3, 5]);
    assert_eq!(again.duplicates, vec![4]);
    assert_eq!(again.orphaned, vec![20]);
    // Only for the node the seqs are reserved for.
    let other = node
        .restore(&c, "n-other", vec![lost_message(&c, slot, 6, None)])
        .await
        .unwrap();
    assert_eq!(other.orphaned, vec![6]);
    set_down(&archive, false);

    // A node that does not own the slot refuses, so the caller finds the owner.
    gates.set_not_owned(slot, 5);
    assert!(matches!(
        node.restore(&c, "n-old", lost).await,
        Err(NodeError::NotOwner { .. })
    ));
    node.shutdown().await;
}

/// The real filesystem, except that syncs can be held: the WAL writer then waits between a
/// record's write and its sync, as it would across a pause of the process or a stalled disk.
#[derive(Default)]
struct SyncHold {
    held: Mutex<bool>,
    released: std::sync::Condvar,
    /// Syncs waiting now.
    waiting: std::sync::atomic::AtomicUsize,
}

impl SyncHold {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.released.notify_all();
    }

    fn pass(&self) {
        let mut held = self.held.lock().unwrap();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *held {
            held = self.released.wait(held).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

struct HoldableIo(Arc<SyncHold>);
struct HoldableFile(Box<dyn WalFile>, Arc<SyncHold>);

impl WalFile for HoldableFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.1.pass();
        self.0.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.1.pass();
        self.0.sync_all()
    }
    fn preallocate(&self, len: u64, how: ferry_shards::wal::Preallocate) -> std::io::Result<()> {
        self.0.preallocate(len, how)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
}

impl WalIo for HoldableIo {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        FsIo.create_dir_all(dir)
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<std::ffi::OsString>> {
        FsIo.list(dir)
    }
    fn create(&self, path: &std::path::Path) -> std::io::Result<Box<dyn WalFile>> {
        Ok(Box::new(HoldableFile(FsIo.create(path)?, self.0.clone())))
    }
    fn open(&self, path: &std::path::Path) -> std::io::Result<Box<dyn WalFile>> {
        Ok(Box::new(HoldableFile(FsIo.open(path)?, self.0.clone())))
    }
    fn read(&self, path: &std::path::Path) -> std::io::Result<ferry_shards::wal::io::ReadBuf> {
        FsIo.read(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        FsIo.rename(from, to)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        FsIo.remove(path)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        FsIo.sync_dir(dir)
    }
    fn lock_dir(
        &self,
        dir: &std::path::Path,
    ) -> std::io::Result<Box<dyn std::any::Any + Send + Sync>> {
        FsIo.lock_dir(dir)
    }
}

/// A node whose WAL syncs can be held, serving every slot under a lease of an hour, with one
/// message appended to `id` and archived.
async fn node_with_held_syncs(
    dir: &std::path::Path,
    archive: Arc<MemoryArchive>,
    id: &ConversationId,
    clustered: bool,
) -> (Node, Arc<SyncHold>) {
    let hold = Arc::new(SyncHold::default());
    let gates = ferry_shards::gate::Gates::clustered(config().slot_count);
    for slot in 0..config().slot_count {
        gates.set_serving(slot, 1);
    }
    gates.extend_lease(Instant::now() + Duration::from_secs(3600));
    *archive.fence.lock().unwrap() = Some(gates.clone());
    let config = NodeConfig {
        clustered,
        ..config()
    };
    let (node, _) = Node::start_with_io(
        config,
        WalOptions::new(dir),
        Arc::new(HoldableIo(hold.clone())),
        archive.clone(),
        gates,
    )
    .await
    .unwrap();
    assert_eq!(append_retrying(&node, id, "first").await, 1);
    node.archive_now();
    eventually("the first to be archived", || archive.stored(id).len() == 1).await;
    (node, hold)
}

/// Appends `text` (with key `text`) while the WAL's syncs are held, lets the lease lapse while
/// the record waits for its sync, then releases the sync: the answer is `try_again`.
async fn append_across_a_lapsed_lease(
    node: &Node,
    hold: &SyncHold,
    id: &ConversationId,
    text: &str,
) {
    hold.set(true);
    let pending = {
        let (node, id, text) = (node.clone(), id.clone(), text.to_owned());
        tokio::spawn(async move { node.append(&id, request(&text, Some(&text))).await })
    };
    eventually("the record to wait for its sync", || {
        hold.waiting.load(Ordering::SeqCst) > 0
    })
    .await;
    node.gates().revoke_lease();
    hold.set(false);
    match pending.await.unwrap() {
        Err(NodeError::TryAgain { reason, .. }) => assert_eq!(reason.as_str(), "owner_unavailable"),
        other => panic!("expected try_again owner_unavailable, got {other:?}"),
    }
}

/// A record whose sync finishes after the node's lease lapsed (a pause, a stalled disk) is not
/// acknowledged and not shown: no reader or subscriber sees it while the slot may already be
/// another node's. When the lease is back it is shown once archived, a retry with its key gets
/// it, and appends after it wait behind it so readers see seqs in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_synced_past_the_lease_is_shown_only_once_archived() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("fenced");
    let (node, hold) = node_with_held_syncs(dir.path(), archive.clone(), &id, false).await;
    let handle = node.conversation(&id).await.unwrap();
    let mut visible = handle.log.watch_durable();
    visible.mark_unchanged();

    set_down(&archive, true);
    append_across_a_lapsed_lease(&node, &hold, &id, "fenced").await;
    assert_eq!(handle.log.durable_seq(), 1, "shown past the lease");
    assert!(!visible.has_changed().unwrap(), "a subscriber was woken");
    let (_, seqs, _) = read_both_ways(&node, &id).await;
    assert_eq!(seqs, vec![1]);

    // The lease is back but the archive is down: neither a retry of the key nor a new append
    // (which waits behind the hidden record) is answered before the record is shown.
    node.gates()
        .extend_lease(Instant::now() + Duration::from_secs(3600));
    let spawn_append = |text: &'static str| {
        let (node, id) = (node.clone(), id.clone());
        tokio::spawn(async move { node.append(&id, request(text, Some(text))).await })
    };
    let retry = spawn_append("fenced");
    let behind = spawn_append("behind");
    eventually("the later append to queue for the archive", || {
        node.archive_backlog().0 == 2
    })
    .await;
    tokio::task::yield_now().await;
    assert!(
        !retry.is_finished(),
        "a retry answered before its record was shown"
    );
    assert!(
        !behind.is_finished(),
        "acknowledged before the record before it was shown"
    );
    assert_eq!(handle.log.durable_seq(), 1);

    set_down(&archive, false);
    node.archive_now();
    let behind = behind.await.unwrap().unwrap();
    assert_eq!((behind.seq, behind.deduped), (3, false));
    let retry = retry.await.unwrap().unwrap();
    assert_eq!((retry.seq, retry.deduped), (2, true));
    assert_eq!(handle.log.durable_seq(), 3);
    let stored: Vec<u64> = archive.stored(&id).iter().map(|m| m.seq).collect();
    assert_eq!(stored, vec![1, 2, 3]);
    let (_, seqs, _) = read_both_ways(&node, &id).await;
    assert_eq!(seqs, vec![1, 2, 3]);

    // Nothing waits hidden any more: appends are shown at once again.
    assert_eq!(append_retrying(&node, &id, "after").await, 4);
    assert_eq!(handle.log.durable_seq(), 4);
    node.shutdown().await;
}

/// A record synced past the lease whose slot another node took meanwhile is kept for restore
/// and never shown by this node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_synced_past_the_lease_of_a_lost_slot_goes_to_restore_unseen() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("taken");
    let (node, hold) = node_with_held_syncs(dir.path(), archive.clone(), &id, true).await;
    let handle = node.conversation(&id).await.unwrap();

    set_down(&archive, true);
    append_across_a_lapsed_lease(&node, &hold, &id, "late").await;
    node.lose_slot(node.slot_of(&id), 2);
    set_down(&archive, false);
    node.archive_now();
    eventually("the record to be kept for restore", || {
        !node.pending_restore().is_empty()
    })
    .await;
    let pending: Vec<u64> = node
        .pending_restore()
        .iter()
        .flat_map(|b| b.messages.iter().map(|m| m.seq))
        .collect();
    assert_eq!(pending, vec![2]);
    assert_eq!(
        handle.log.durable_seq(),
        1,
        "shown by a node that lost the slot"
    );
    assert_eq!(archive.stored(&id).len(), 1);
    node.shutdown().await;
}

/// Submits through a kept handle, retrying `try_again` answers as a client would; returns the
/// seq the append was acknowledged with.
async fn submit_kept(
    node: &Node,
    id: &ConversationId,
    kept: &mut Option<ferry_shards::actor::ConversationHandle>,
    text: &str,
) -> u64 {
    loop {
        let ticket = match node.submit_via(id, kept, request(text, Some(text))).await {
            Ok(ticket) => ticket,
            Err(ferry_shards::node::Refused::Failed(NodeError::TryAgain { .. })) => {
                tokio::task::yield_now().await;
                continue;
            }
            Err(_) => panic!("submit of {text:?} refused"),
        };
        match ticket.outcome().await {
            Ok(outcome) => return outcome.seq,
            Err(NodeError::TryAgain { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("append of {text:?} failed: {e}"),
        }
    }
}

/// A caller that keeps the conversation's actor between submits follows it when the actor is
/// restarted, retires, or the slot goes and comes back: no append goes to a stopped actor or a
/// handed-over log, and seqs go on without a gap or a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_handle_follows_restarts_retirements_and_slot_moves() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(MemoryArchive::default());
    let id = archive.create("kept");
    let config = NodeConfig {
        idle_timeout: Duration::from_millis(100),
        ..config()
    };
    let (node, _) = Node::start(config, WalOptions::new(dir.path()), archive.clone())
        .await
        .unwrap();
    let slot = node.slot_of(&id);
    let mut kept = None;
    assert_eq!(submit_kept(&node, &id, &mut kept, "first").await, 1);
    let first = kept.clone().expect("the handle is kept");
    assert_eq!(submit_kept(&node, &id, &mut kept, "second").await, 2);
    assert_eq!(
        kept.as_ref().map(|h| h.actor.get_id()),
        Some(first.actor.get_id()),
        "the same actor serves the next submit"
    );

    // Restarted after a crash: the kept actor is gone, the next submit finds the new one.
    node.crash_conversation_actor(&id).await.unwrap();
    eventually("the actor to be restarted", || {
        node.active_handle(&id)
            .is_some_and(|h| h.actor.get_id() != first.actor.get_id())
    })
    .await;
    assert_eq!(submit_kept(&node, &id, &mut kept, "after crash").await, 3);
    let restarted = node.active_handle(&id).unwrap();
    assert_eq!(
        kept.as_ref().map(|h| h.actor.get_id()),
        Some(restarted.actor.get_id())
    );

    // Retired while idle: the next submit starts the conversation again.
    eventually("the idle actor to retire", || {
        node.active_handle(&id).is_none()
    })
    .await;
    assert_eq!(submit_kept(&node, &id, &mut kept, "after retire").await, 4);
    assert_ne!(
        kept.as_ref().map(|h| h.actor.get_id()),
        Some(restarted.actor.get_id())
    );

    // The slot goes: refused at its gate, kept handle or not.
    node.archive_now();
    assert!(node.wait_slot_archived(slot, Duration::from_secs(5)).await);
    node.release_slot(slot, 2);
    assert!(matches!(
        node.submit_via(&id, &mut kept, request("gone", None)).await,
        Err(ferry_shards::node::Refused::NotOwner(_))
    ));
    // And comes back at a later epoch: the kept handle's log was handed over, so it is not used;
    // the conversation loads afresh from the archive and goes on from there.
    node.serve_fresh(slot, 3);
    node.gates().set_serving(slot, 3);
    assert_eq!(submit_kept(&node, &id, &mut kept, "back").await, 5);
    assert!(!kept.as_ref().unwrap().log.is_moved());
    assert_eq!(
        submit_kept(&node, &id, &mut kept, "after crash").await,
        3,
        "a key from before the move is still known"
    );
    let handle = node.conversation(&id).await.unwrap();
    let all = node.read_after(&handle, 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|m| (m.seq, m.epoch)).collect::<Vec<_>>(),
        vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 3)]
    );
    node.shutdown().await;
}
