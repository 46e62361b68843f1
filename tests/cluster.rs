//! The cluster, as real `ferry serve` processes sharing one Postgres and one Redis (see
//! `common::cluster`): a fresh cluster balances itself and serves every conversation from every
//! node; a drain, a rolling restart, a kill -9, a node cut off from Postgres, a paused node and
//! Redis faults, each under HTTP and WebSocket load with subscribers joined through non-owners,
//! lose nothing acknowledged, give no seq twice and deliver every seq exactly once in order; and
//! failover of a dead node (refused while it lives or when it ran `durability = "local"`).
//!
//! Each test ends with the checker (`common::cluster::check`), which reads every conversation
//! through every node and holds it against every acknowledgement and every subscriber.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::cluster::subscribers::Subscribers;
use common::cluster::workload::{AckRecord, WorkloadSpec, WriteLog, Writers};
use common::cluster::{ids, wait_for, Conversation, SlotMap, TestCluster, LEASE, SLOT_COUNT};

/// Bound for waiting on the writers' progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP writers (2 per node) and WebSocket writers (1 per node) on 20+ conversations, and one
/// subscriber per conversation joined through a node that does not own it.
struct Load {
    conversations: Vec<Conversation>,
    http: Writers,
    ws: Writers,
    subscribers: Subscribers,
}

impl Load {
    async fn start(cluster: &TestCluster, prefix: &str, spec: WorkloadSpec) -> Load {
        let conversations = cluster.create_spread_conversations(prefix, 20, 2).await;
        let book = cluster.book();
        let targets = cluster.subscriber_targets(&conversations).await;
        let subscribers = Subscribers::start(&book, &targets);
        subscribers.wait_joined(Duration::from_secs(20)).await;
        let http = Writers::http(&book, &conversations, spec.clone());
        let ws = Writers::ws(
            &book,
            &conversations,
            WorkloadSpec {
                writers_per_node: 1,
                ..spec
            },
        );
        Load {
            conversations,
            http,
            ws,
            subscribers,
        }
    }

    fn acked(&self) -> u64 {
        self.http.acked() + self.ws.acked()
    }

    /// Acks of `conversations` that arrived after `since`.
    fn acked_since(&self, conversations: &[Conversation], since: Instant) -> usize {
        let ids = ids(conversations);
        self.http.acked_since(&ids, since) + self.ws.acked_since(&ids, since)
    }

    /// Waits until the writers have `more` acknowledgements than now.
    async fn wait_acks(&self, more: u64, what: &str) {
        let target = self.acked() + more;
        wait_for(what, PROGRESS_TIMEOUT, || async {
            let now = self.acked();
            if now >= target {
                Ok(())
            } else {
                Err(format!(
                    "{now} of {target} acks; http retries {:?}; ws retries {:?}",
                    self.http.log().errors,
                    self.ws.log().errors
                ))
            }
        })
        .await
    }

    /// Waits until `conversations` got `n` acks after `since` (service resumed on them).
    async fn wait_acks_on(
        &self,
        conversations: &[Conversation],
        since: Instant,
        n: usize,
        what: &str,
    ) {
        wait_for(what, PROGRESS_TIMEOUT, || async {
            let got = self.acked_since(conversations, since);
            if got >= n {
                Ok(())
            } else {
                Err(format!(
                    "{got} of {n} acks; http retries {:?}; ws retries {:?}",
                    self.http.log().errors,
                    self.ws.log().errors
                ))
            }
        })
        .await
    }

    /// Waits until every subscriber has received a message it had not at the call.
    async fn wait_every_subscriber_advances(&self, what: &str) {
        let start = self.subscribers.log();
        wait_for(what, PROGRESS_TIMEOUT, || async {
            let now = self.subscribers.log();
            let behind: Vec<String> = now
                .iter()
                .filter(|(c, s)| s.delivered.len() <= start[*c].delivered.len())
                .map(|(c, s)| {
                    format!(
                        "{c} via n{} at {} faults {:?}",
                        s.node,
                        s.last_seq(),
                        s.faults
                    )
                })
                .collect();
            if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("{} subscribers stalled: {behind:?}", behind.len()))
            }
        })
        .await
    }

    /// Stops the writers; returns their merged log (the subscribers keep running for the check).
    async fn stop_writers(self) -> (WriteLog, Subscribers, Vec<Conversation>) {
        let log = self.http.stop().await.merge(self.ws.stop().await);
        (log, self.subscribers, self.conversations)
    }
}

/// The checker through every node that is up; panics with its report.
async fn assert_check(
    cluster: &TestCluster,
    conversations: &[Conversation],
    log: &WriteLog,
    subscribers: &Subscribers,
) {
    match cluster.check(conversations, log, subscribers).await {
        Ok(summary) => eprintln!("check passed:\n{summary}"),
        Err(report) => panic!("{report}"),
    }
}

/// [`assert_check`] after a failover with reserved seqs (see `check::check_allowing_gaps`).
async fn assert_check_allowing_gaps(
    cluster: &TestCluster,
    conversations: &[Conversation],
    log: &WriteLog,
    subscribers: &Subscribers,
) {
    match cluster
        .check_allowing_gaps(conversations, log, subscribers)
        .await
    {
        Ok(summary) => eprintln!("check passed:\n{summary}"),
        Err(report) => panic!("{report}"),
    }
}

fn spec() -> WorkloadSpec {
    WorkloadSpec {
        writers_per_node: 2,
        interval: Duration::from_millis(40),
        request_timeout: Duration::from_secs(3),
    }
}

/// The reason of a `try_again` answer (`detail` over HTTP).
fn reason(body: &Value) -> &str {
    body["detail"]
        .as_str()
        .or_else(|| body["reason"].as_str())
        .unwrap_or("-")
}

/// Probes append (fresh keys, recorded as attempts in `probes`) to `conversation` through node
/// `via` until one answers 429/503 `try_again` with reason `want`. A 201 fails the test: the
/// owner of the conversation cannot acknowledge anything now.
async fn wait_refused(
    cluster: &TestCluster,
    probes: &std::sync::Mutex<WriteLog>,
    via: usize,
    conversation: &str,
    want: &str,
    timeout: Duration,
) {
    let what = format!("appends to {conversation} via n{via} to answer try_again {want}");
    let counter = std::sync::atomic::AtomicU64::new(0);
    wait_for(&what, timeout, || async {
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("probe-n{via}-{conversation}-{i}");
        let content = json!({ "w": format!("probe-n{via}"), "i": i });
        probes
            .lock()
            .expect("probes")
            .attempt(&key, conversation, &content, "probe");
        let (status, body) = cluster
            .try_append(via, conversation, &key, &content)
            .await?;
        match status {
            429 | 503 if body["error"] == "try_again" && reason(&body) == want => Ok(()),
            201 => panic!("{what}: acknowledged while its owner cannot serve: {body}"),
            _ => Err(format!("{status} {body}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_cluster_balances_and_serves_from_any_node() {
    let Some(cluster) = TestCluster::start(3, &[]).await else {
        return;
    };
    // Every node gets slots with nobody asking; then the placement settles on the ring's.
    cluster.wait_spread().await;
    let slots = cluster.wait_balanced().await;
    for i in 1..=3 {
        let view = cluster.cluster_view(i).await;
        assert_eq!(view.mode, "cluster", "n{i}: {}", view.brief());
        assert_eq!(view.node, format!("n{i}"));
        assert_eq!(view.slot_count, SLOT_COUNT);
        assert_eq!(
            (
                view.unassigned_slots,
                view.moving_slots,
                view.unavailable_slots
            ),
            (0, 0, 0),
            "n{i}: {}",
            view.brief()
        );
        assert_eq!(view.nodes.len(), 3, "n{i}: {}", view.brief());
        for node in &view.nodes {
            assert_eq!(node.state, "active", "n{i}: {}", view.brief());
            assert!(node.ready, "n{i} reports {} not ready", node.id);
            assert!(
                node.advertise_url.is_some(),
                "{} has no advertise_url",
                node.id
            );
            assert!(
                node.last_heartbeat.is_some(),
                "{} has no last_heartbeat",
                node.id
            );
            assert_eq!(
                node.slots,
                slots.owned_by(&node.id).len(),
                "{}",
                view.brief()
            );
        }
        assert_eq!(cluster.readyz(i).await, 200, "n{i} /readyz");
    }

    let conversations = cluster.create_conversations("fresh", 9).await;
    let subscribers = Subscribers::start(
        &cluster.book(),
        &cluster.subscriber_targets(&conversations).await,
    );
    subscribers.wait_joined(Duration::from_secs(20)).await;

    // Every conversation gets appends through every node, owners and non-owners alike.
    let mut log = WriteLog::default();
    for round in 0..3 {
        for c in &conversations {
            for i in 1..=3 {
                let key = format!("fresh-{}-{round}-n{i}", c.id);
                let content = json!({ "w": format!("n{i}"), "i": round, "c": c.id });
                let body = cluster.append(i, &c.id, &key, &content).await;
                log.record_ack(&c.id, &key, &content, i, &body);
            }
        }
    }
    // An idempotency key is honoured wherever the retry lands.
    let firsts: Vec<AckRecord> = log.acks.iter().take(6).cloned().collect();
    for first in &firsts {
        for i in (1..=3).filter(|&i| i != first.node) {
            let body = cluster
                .append(i, &first.conversation, &first.key, &first.content)
                .await;
            assert_eq!(
                (body["seq"].as_u64(), body["deduped"].as_bool()),
                (Some(first.seq), Some(true)),
                "retry of {} through n{i}: {body}",
                first.key
            );
        }
    }
    assert_check(&cluster, &conversations, &log, &subscribers).await;
    // Three rounds through three nodes: nine messages each, the deduped retries added none.
    for c in &conversations {
        for i in 1..=3 {
            let body = cluster
                .node(i)
                .get_json(&format!("/v1/conversations/{}", c.id))
                .await;
            assert_eq!(body["last_seq"].as_u64(), Some(9), "{} via n{i}", c.id);
            assert_eq!(body["slot"].as_u64(), Some(u64::from(c.slot)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load() {
    let Some(cluster) = TestCluster::start(3, &[]).await else {
        return;
    };
    cluster.wait_balanced().await;
    let load = Load::start(&cluster, "drain", spec()).await;
    load.wait_acks(500, "a few seconds of load before the drain")
        .await;

    let before = cluster.slots(1).await;
    let moved = TestCluster::conversations_of(&before, 2, &load.conversations);
    assert!(!moved.is_empty(), "n2 owns none of the conversations");
    cluster.drain(1, 2).await;
    let drained_at = Instant::now();
    let c = &cluster;
    let after = wait_for(
        "n2 to own no slot, none moving",
        Duration::from_secs(45),
        || async move {
            let slots = c.try_slots(1).await?;
            if slots.owned_by("n2").is_empty() && slots.in_state("moving").is_empty() {
                Ok(slots)
            } else {
                Err(slots.brief())
            }
        },
    )
    .await;
    assert!(
        after.in_state("unavailable").is_empty(),
        "{}",
        after.brief()
    );
    load.wait_acks_on(
        &moved,
        drained_at,
        20,
        "appends to n2's former conversations after the drain",
    )
    .await;
    load.wait_acks(100, "load after the drain").await;
    let (log, subscribers, conversations) = load.stop_writers().await;
    assert_check(&cluster, &conversations, &log, &subscribers).await;

    assert_eq!(cluster.readyz(2).await, 503, "a drained node is not ready");
    for i in 1..=3 {
        let view = cluster.cluster_view(i).await;
        assert_eq!(
            view.state_of("n2"),
            Some("drained"),
            "via n{i}: {}",
            view.brief()
        );
        assert_eq!(
            view.node("n2").map(|n| n.slots),
            Some(0),
            "{}",
            view.brief()
        );
        assert!(cluster.slots(i).await.owned_by("n2").is_empty());
    }
    // Sockets joined to a moving slot's conversations are told so once.
    let quiet: Vec<&str> = moved
        .iter()
        .filter(|c| subscribers.backpressure(std::slice::from_ref(&c.id)) == 0)
        .map(|c| c.id.as_str())
        .collect();
    assert!(
        quiet.is_empty(),
        "subscribers of moved conversations without a backpressure push: {quiet:?}"
    );
}

/// Epoch growth per slot between two slot maps; panics if an epoch went back.
fn epoch_growth(before: &SlotMap, after: &SlotMap) -> Vec<(u32, u64)> {
    let after = after.epochs();
    before
        .epochs()
        .into_iter()
        .map(|(slot, old)| {
            let new = after[&slot];
            assert!(
                new >= old,
                "slot {slot}: epoch went back from {old} to {new}"
            );
            (slot, new - old)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load() {
    let Some(mut cluster) = TestCluster::start(3, &[]).await else {
        return;
    };
    cluster.wait_balanced().await;
    let load = Load::start(&cluster, "rolling", spec()).await;
    load.wait_acks(150, "load before the rolling restart").await;

    for i in 1..=3 {
        let observer = if i == 1 { 2 } else { 1 };
        let id = TestCluster::id(i);
        let before = cluster.wait_balanced().await;
        let owned = before.owned_by(&id);

        let status = cluster.terminate(i);
        assert_eq!(status.code(), Some(0), "SIGTERM of {id}: {status}");
        let stopped = cluster.slots(observer).await;
        assert!(
            stopped.owned_by(&id).is_empty(),
            "{id} exited still owning slots: {}",
            stopped.brief()
        );
        let view = cluster.cluster_view(observer).await;
        assert_eq!(view.state_of(&id), Some("left"), "{}", view.brief());
        load.wait_acks(50, &format!("load while {id} is down"))
            .await;

        cluster.restart(i);
        cluster.wait_node_state(observer, i, "active").await;
        let moves = cluster.rebalance(observer).await;
        let after = cluster.wait_balanced().await;
        let growth = epoch_growth(&before, &after);
        let too_many: Vec<_> = growth.iter().filter(|(_, g)| *g > 2).collect();
        assert!(
            too_many.is_empty(),
            "restarting {id} moved slots more than away and back: {too_many:?}"
        );
        let total: u64 = growth.iter().map(|(_, g)| g).sum();
        eprintln!(
            "restart of {id}: it owned {} slots, {total} ownership changes, rebalance planned {} moves",
            owned.len(),
            moves.len()
        );
        assert!(
            total >= 2 * owned.len() as u64,
            "{id}'s {} slots should have moved away and back, epochs grew by {total}",
            owned.len()
        );
        load.wait_acks(50, &format!("load after {id} restarted"))
            .await;
    }
    let (log, subscribers, conversations) = load.stop_writers().await;
    assert_check(&cluster, &conversations, &log, &subscribers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_keeps_everything() {
    let Some(mut cluster) = TestCluster::start(3, &[]).await else {
        return;
    };
    cluster.wait_balanced().await;
    let load = Load::start(&cluster, "kill9", spec()).await;
    load.wait_acks(200, "load before the kill").await;
    let slots = cluster.slots(1).await;
    let victims = TestCluster::conversations_of(&slots, 3, &load.conversations);
    assert!(!victims.is_empty(), "n3 owns none of the conversations");

    cluster.kill9(3);
    let probes = std::sync::Mutex::new(WriteLog::default());
    for via in [1, 2] {
        wait_refused(
            &cluster,
            &probes,
            via,
            &victims[0].id,
            "owner_unavailable",
            LEASE + Duration::from_secs(20),
        )
        .await;
    }
    // Archived history of its conversations still reads through the others.
    for c in &victims {
        for via in [1, 2] {
            let page = cluster
                .node(via)
                .page(&c.id, "after_seq=0&limit=1000")
                .await;
            let seqs = page.seqs();
            assert!(
                seqs.iter().enumerate().all(|(k, s)| *s == k as u64 + 1),
                "{} via n{via} while n3 is down: seqs {seqs:?}",
                c.id
            );
        }
    }
    load.wait_acks(50, "load on the other nodes while n3 is down")
        .await;

    cluster.restart(3);
    let restarted_at = Instant::now();
    cluster.wait_node_state(1, 3, "active").await;
    cluster.wait_balanced().await;
    load.wait_acks_on(
        &victims,
        restarted_at,
        20,
        "appends to n3's conversations after its restart",
    )
    .await;
    let (log, subscribers, conversations) = load.stop_writers().await;
    assert!(
        log.error_count("owner_unavailable") > 0,
        "writers never saw owner_unavailable while n3 was down: {:?}",
        log.errors
    );
    let log = log.merge(probes.into_inner().expect("probes"));
    assert_check(&cluster, &conversations, &log, &subscribers).await;
}

/// How the victim is cut off in a fencing test.
#[derive(Debug, Clone, Copy)]
enum Isolation {
    CutFromPostgres,
    Paused,
}

const SHORT_HEARTBEAT: Duration = Duration::from_millis(200);
const SHORT_LEASE: Duration = Duration::from_millis(1500);

/// Node n3 is isolated under load: no ack for its slots arrives once its lease can have expired,
/// the others report its slots unavailable only after the lease, and after the fault heals it
/// rejoins and nothing is lost or repeated.
async fn fenced(isolation: Isolation) {
    let Some(mut cluster) = TestCluster::start(
        3,
        &[
            ("FERRY_CLUSTER__HEARTBEAT", "200ms"),
            ("FERRY_CLUSTER__LEASE", "1500ms"),
        ],
    )
    .await
    else {
        return;
    };
    cluster.wait_balanced().await;
    let load = Load::start(
        &cluster,
        "fenced",
        WorkloadSpec {
            request_timeout: Duration::from_secs(2),
            ..spec()
        },
    )
    .await;
    load.wait_acks(150, "load before the fault").await;
    let slots = cluster.slots(1).await;
    let victim_slots = slots.owned_by("n3");
    let victims = TestCluster::conversations_of(&slots, 3, &load.conversations);
    assert!(!victims.is_empty(), "n3 owns none of the conversations");
    // Besides the load, writers that append to n3's own conversations directly through n3 and
    // through n1.
    let direct_writers = Writers::http_via(
        &cluster.book(),
        &[3, 1],
        &victims,
        WorkloadSpec {
            writers_per_node: 1,
            interval: Duration::from_millis(50),
            request_timeout: Duration::from_secs(2),
        },
        "d",
    );
    wait_for(
        "the direct writers to be acknowledged",
        PROGRESS_TIMEOUT,
        || async {
            match direct_writers.acked() {
                n if n >= 10 => Ok(()),
                n => Err(format!(
                    "{n} acks; retries {:?}",
                    direct_writers.log().errors
                )),
            }
        },
    )
    .await;

    let faulted_at = Instant::now();
    match isolation {
        Isolation::CutFromPostgres => cluster.cut_postgres(3),
        Isolation::Paused => cluster.pause(3),
    }
    // The lease ran from n3's last renewal, at most one heartbeat before the fault.
    let earliest_expiry = faulted_at + SHORT_LEASE - SHORT_HEARTBEAT;
    let fence_deadline = faulted_at + SHORT_LEASE;

    let c = &cluster;
    let vs = &victim_slots;
    let first_seen = wait_for(
        "n1 to report a slot of n3 unavailable",
        SHORT_LEASE + Duration::from_secs(20),
        || async move {
            let slots = c.try_slots(1).await?;
            if vs.iter().any(|s| slots.in_state("unavailable").contains(s)) {
                Ok(Instant::now())
            } else {
                Err(slots.brief())
            }
        },
    )
    .await;
    assert!(
        first_seen >= earliest_expiry,
        "n3's slots read unavailable {:?} after the fault, before its lease ({SHORT_LEASE:?}) \
         could have expired",
        first_seen - faulted_at
    );
    for via in [1, 2] {
        wait_for(
            &format!("n{via} to report every slot of n3 unavailable"),
            Duration::from_secs(10),
            || async move {
                let slots = c.try_slots(via).await?;
                let unavailable = slots.in_state("unavailable");
                if vs.iter().all(|s| unavailable.contains(s)) {
                    Ok(())
                } else {
                    Err(slots.brief())
                }
            },
        )
        .await;
    }
    let probes = std::sync::Mutex::new(WriteLog::default());
    for via in [1, 2] {
        wait_refused(
            &cluster,
            &probes,
            via,
            &victims[0].id,
            "owner_unavailable",
            Duration::from_secs(10),
        )
        .await;
    }
    // Directly on n3: a refusal (cut off) or no answer at all (paused) — never an ack.
    let key = "probe-direct-n3";
    let content = json!({ "w": "probe-direct", "i": 0 });
    probes
        .lock()
        .expect("probes")
        .attempt(key, &victims[0].id, &content, "probe");
    let direct = tokio::time::timeout(
        Duration::from_secs(2),
        cluster.try_append(3, &victims[0].id, key, &content),
    )
    .await;
    match (isolation, direct) {
        (Isolation::CutFromPostgres, Ok(Ok((status, body)))) => assert!(
            matches!(status, 429 | 503) && body["error"] == "try_again",
            "n3 cut off from Postgres answered an append to its own slot with {status} {body}"
        ),
        (Isolation::CutFromPostgres, other) => {
            panic!("n3 cut off from Postgres should refuse appends, got {other:?}")
        }
        (Isolation::Paused, Ok(Ok((201, body)))) => panic!("a paused node acknowledged: {body}"),
        (Isolation::Paused, _) => {}
    }
    load.wait_acks(100, "load on the other nodes while n3 is fenced")
        .await;

    let healed_at = Instant::now();
    match isolation {
        Isolation::CutFromPostgres => cluster.heal_postgres(3),
        Isolation::Paused => cluster.resume(3),
    }
    cluster.wait_node_state(1, 3, "active").await;
    cluster.wait_balanced().await;
    load.wait_acks_on(
        &victims,
        healed_at,
        20,
        "appends to n3's conversations after it rejoined",
    )
    .await;
    let direct = direct_writers.stop().await;
    let direct_through_n3_refused: u64 = direct.errors.values().sum();
    assert!(
        direct_through_n3_refused > 0,
        "the direct writers never saw n3 refuse or hang"
    );
    let (log, subscribers, conversations) = load.stop_writers().await;
    let log = log.merge(direct);
    if let Isolation::CutFromPostgres = isolation {
        let (_, _, dropped) = cluster.postgres_proxy_counts(3);
        assert!(
            dropped > 0,
            "the cut dropped none of n3's Postgres connections"
        );
    }

    let victim_ids = ids(&victims);
    let late: Vec<String> = log
        .acks
        .iter()
        .filter(|a| {
            victim_ids.contains(&a.conversation)
                && a.received >= fence_deadline
                && a.received < healed_at
        })
        .map(|a| {
            format!(
                "{} seq {} key {} via n{} {} acked {:?} after the fault",
                a.conversation,
                a.seq,
                a.key,
                a.node,
                a.via,
                a.received - faulted_at
            )
        })
        .collect();
    assert!(
        late.is_empty(),
        "n3's slots were acknowledged after its lease ({SHORT_LEASE:?}) ran out: {late:#?}"
    );
    let after_heal_sent_before = log
        .acks
        .iter()
        .filter(|a| {
            victim_ids.contains(&a.conversation) && a.received >= healed_at && a.sent < healed_at
        })
        .count();
    let last_before_fence = log
        .acks
        .iter()
        .filter(|a| victim_ids.contains(&a.conversation) && a.received < fence_deadline)
        .map(|a| a.received)
        .max()
        .filter(|t| *t >= faulted_at)
        .map(|t| t - faulted_at);
    eprintln!(
        "{isolation:?}: last ack of n3's conversations {last_before_fence:?} after the fault \
         (None: before it); first unavailable {:?} after the fault; \
         {after_heal_sent_before} acks of n3's conversations for requests sent before the heal \
         arrived after it; direct writers' retries {:?}",
        first_seen - faulted_at,
        log.errors
            .iter()
            .filter(|(k, _)| k.starts_with("http"))
            .collect::<Vec<_>>()
    );
    let log = log.merge(probes.into_inner().expect("probes"));
    assert_check(&cluster, &conversations, &log, &subscribers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_when_cut_off_from_postgres() {
    fenced(Isolation::CutFromPostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_when_paused() {
    fenced(Isolation::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_faults_do_not_lose_or_repeat_deliveries() {
    let Some(mut cluster) = TestCluster::start(3, &[]).await else {
        return;
    };
    cluster.wait_balanced().await;
    let load = Load::start(&cluster, "redis", spec()).await;
    load.wait_acks(150, "load before the Redis faults").await;
    load.wait_every_subscriber_advances("deliveries before the Redis faults")
        .await;

    // The shared Redis dies and comes back empty on the same port.
    cluster.stop_redis();
    load.wait_acks(50, "appends while Redis is down").await;
    cluster.start_redis();
    load.wait_acks(100, "load after the Redis restart").await;
    load.wait_every_subscriber_advances("deliveries after the Redis restart")
        .await;

    // One node alone loses Redis: its subscribers must still get everything, in order.
    cluster.cut_redis(2);
    load.wait_acks(100, "load while n2 is cut off from Redis")
        .await;
    cluster.heal_redis(2);
    let (_, _, dropped) = cluster.redis_proxy_counts(2);
    assert!(
        dropped > 0,
        "the cut dropped none of n2's Redis connections"
    );
    load.wait_acks(100, "load after n2's Redis came back").await;
    load.wait_every_subscriber_advances("deliveries after n2's Redis came back")
        .await;

    // Short flaps of each owner's Redis: the publications in flight are lost while the other
    // nodes stay subscribed, so they see later seqs arrive live past a hole, sooner than the
    // periodic top-seq check would notice; they must fill it, not skip it.
    for node in [1, 2, 3, 1, 2, 3] {
        cluster.cut_redis(node);
        load.wait_acks(20, &format!("load while n{node}'s Redis flaps"))
            .await;
        cluster.heal_redis(node);
        load.wait_acks(60, &format!("load after n{node}'s Redis flapped"))
            .await;
    }
    load.wait_every_subscriber_advances("deliveries after the flaps")
        .await;

    let (log, subscribers, conversations) = load.stop_writers().await;
    assert_check(&cluster, &conversations, &log, &subscribers).await;
    let mut gap_fills = 0.0;
    for i in 1..=3 {
        let metrics = cluster.node(i).metrics().await;
        gap_fills +=
            common::metric_sum(&metrics, "ferry_fanout_gap_fills_total", &[]).unwrap_or(0.0);
    }
    eprintln!("fan-out gap fills across the nodes: {gap_fills}");
}

// ----- failover -----

/// `POST /admin/nodes/n{node}/failover` through node `via`.
async fn post_failover(cluster: &TestCluster, via: usize, node: &str) -> (u16, Value) {
    cluster
        .admin_post(via, &format!("/admin/nodes/{node}/failover"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `ferry admin failover NODE` against node `via`: `(success, stdout, stderr)`.
fn admin_cli_failover(cluster: &TestCluster, via: usize, node: &str) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["admin", "failover", node, "--admin-url"])
        .arg(format!("http://{}", cluster.node(via).admin))
        .env("FERRY_API_KEY", common::API_KEY)
        .output()
        .expect("run ferry admin failover");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reserved seqs in n3's conversations as `/admin/slots` reports them: (conversations, seqs,
/// restored), summed over its former slots.
async fn reserved_totals(cluster: &TestCluster, via: usize, slots: &[u32]) -> (u64, u64, u64) {
    let body = cluster.admin_get(via, "/admin/slots").await.expect("slots");
    let mut sum = (0, 0, 0);
    for slot in body["slots"].as_array().expect("slots") {
        if !slots.contains(&(slot["slot"].as_u64().unwrap() as u32)) {
            continue;
        }
        let r = &slot["reserved"];
        sum.0 += r["conversations"].as_u64().unwrap_or(0);
        sum.1 += r["seqs"].as_u64().unwrap_or(0);
        sum.2 += r["restored"].as_u64().unwrap_or(0);
    }
    sum
}

/// `ferry_restored_messages_total` of node `i`.
async fn restored_by(cluster: &TestCluster, i: usize) -> f64 {
    let text = cluster.node(i).metrics().await;
    common::metric_sum(&text, "ferry_restored_messages_total", &[]).unwrap_or(0.0)
}

/// Waits until the slot map's `reserved.restored` over `slots` equals n3's
/// `ferry_restored_messages_total` (n3 has written back everything it kept for restore, which
/// may be more than what it acknowledged); returns that count.
async fn wait_restore_counted(cluster: &TestCluster, slots: &[u32]) -> f64 {
    wait_for(
        "the slot map to count what n3 restored",
        PROGRESS_TIMEOUT,
        || async {
            let metric = restored_by(cluster, 3).await;
            let (_, _, restored) = reserved_totals(cluster, 1, slots).await;
            if restored as f64 == metric {
                Ok(metric)
            } else {
                Err(format!("slot map {restored}, n3 {metric}"))
            }
        },
    )
    .await
}

/// Acks of `conversations` received before `t`: what the dead node had acknowledged.
fn acks_before<'a>(
    log: &'a WriteLog,
    conversations: &[Conversation],
    t: Instant,
) -> Vec<&'a AckRecord> {
    let ids = ids(conversations);
    log.acks
        .iter()
        .filter(|a| ids.contains(&a.conversation) && a.received < t)
        .collect()
}

const RESERVE: u64 = 1000;

/// `durability = "local"` and manual failover, with real processes under load. The archive
/// lingers (10 s), so n3 holds acknowledged messages nobody else has when it is killed. Its
/// slots answer `owner_unavailable`; failing it over is refused while it lives; `ferry admin
/// failover` makes them writable again at epoch + 1 (a second call is harmless); in each of its
/// conversations the next `max_unarchived` seqs are reserved and new appends continue after
/// them; pages report the reserved seqs as `gaps` and subscribers get a `gap` push. n3 restarts
/// with its data dir, serves none of its old slots, and writes every message it acknowledged
/// back at exactly its acknowledged seq: none elsewhere, none twice, the gaps shrink to seqs
/// never assigned, and it counts them in `ferry_restored_messages_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_durability_failover_reserves_seqs_and_the_node_restores_them() {
    let reserve = RESERVE.to_string();
    let Some(mut cluster) = TestCluster::start(
        3,
        &[
            ("FERRY_ARCHIVE__LINGER", "10s"),
            ("FERRY_CLUSTER__MAX_UNARCHIVED", reserve.as_str()),
        ],
    )
    .await
    else {
        return;
    };
    cluster.wait_balanced().await;
    let metrics = cluster.node(1).metrics().await;
    for (name, labels) in [
        ("ferry_slot_moves_total", &[("result", "failover")][..]),
        ("ferry_restored_messages_total", &[][..]),
    ] {
        assert_eq!(
            common::metric_sum(&metrics, name, labels),
            Some(0.0),
            "{name} is registered at zero"
        );
    }
    let (status, body) = post_failover(&cluster, 1, "n3").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        (body["error"].as_str(), body["detail"].as_str()),
        (Some("conflict"), Some("node_alive")),
        "{body}"
    );
    let (status, body) = post_failover(&cluster, 1, "n9").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    let load = Load::start(&cluster, "lfo", spec()).await;
    load.wait_acks(200, "load before the kill").await;
    let before = cluster.slots(1).await;
    let owned = before.owned_by("n3");
    let victims = TestCluster::conversations_of(&before, 3, &load.conversations);
    assert!(!victims.is_empty(), "n3 owns none of the conversations");
    load.wait_acks_on(&victims, Instant::now(), 20, "acks from n3")
        .await;

    cluster.kill9(3);
    let killed_at = Instant::now();
    let probes = std::sync::Mutex::new(WriteLog::default());
    wait_refused(
        &cluster,
        &probes,
        1,
        &victims[0].id,
        "owner_unavailable",
        LEASE + Duration::from_secs(20),
    )
    .await;
    cluster.wait_node_state(1, 3, "dead").await;

    let commanded_at = Instant::now();
    let (ok, stdout, stderr) = admin_cli_failover(&cluster, 2, "n3");
    assert!(ok, "ferry admin failover n3: {stdout} {stderr}");
    // Writable again: the first acknowledged append to one of n3's conversations.
    let c = &cluster;
    let n = std::sync::atomic::AtomicU64::new(0);
    let probes_ref = &probes;
    let first = wait_for(
        "an append to n3's conversation after the failover",
        Duration::from_secs(10),
        || async {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let key = format!("after-failover-{i}");
            let content = json!({ "w": "after-failover", "i": i });
            probes_ref
                .lock()
                .expect("probes")
                .attempt(&key, &victims[0].id, &content, "probe");
            match c.try_append(1, &victims[0].id, &key, &content).await? {
                (201, body) => {
                    probes_ref.lock().expect("probes").record_ack(
                        &victims[0].id,
                        &key,
                        &content,
                        1,
                        &body,
                    );
                    Ok(body)
                }
                (status, body) => Err(format!("{status} {body}")),
            }
        },
    )
    .await;
    let writable_after = commanded_at.elapsed();
    eprintln!(
        "failover of {} slots: first append acknowledged {writable_after:?} after the command \
         ({:?} after the kill)",
        owned.len(),
        killed_at.elapsed()
    );
    let after = cluster.slots(1).await;
    let epochs = before.epochs();
    for slot in &owned {
        let entry = after.0.iter().find(|s| s.slot == *slot).expect("slot");
        assert_eq!(entry.epoch, epochs[slot] + 1, "{entry:?}");
        assert_ne!(after.owner_of(*slot), Some("n3"));
    }
    assert!(cluster.rebalance(1).await.is_empty(), "placed on the ring");
    let counted = common::metric_sum(
        &cluster.node(2).metrics().await,
        "ferry_slot_moves_total",
        &[("result", "failover")],
    );
    assert_eq!(counted, Some(owned.len() as f64));
    let (ok, stdout, stderr) = admin_cli_failover(&cluster, 1, "n3");
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("n3 owns no slot"),
        "a second failover is harmless: {stdout}"
    );

    // New seqs continue after the reserved range; pages name the reserved seqs as a gap.
    let page = cluster
        .node(2)
        .page(&victims[0].id, "after_seq=0&limit=1000")
        .await;
    assert_eq!(page.gaps.len(), 1, "{:?}", page.gaps);
    let (from, to) = page.gaps[0];
    assert_eq!(to - from + 1, RESERVE, "{:?}", page.gaps);
    assert!(
        first["seq"].as_u64().unwrap() > to,
        "first seq after the failover {} is inside or before the reserved {from}..={to}",
        first["seq"]
    );
    assert!(page.seqs().iter().all(|s| *s < from || *s > to));
    load.wait_acks_on(
        &victims,
        commanded_at,
        20,
        "appends to n3's conversations after the failover",
    )
    .await;
    // The inbox counts messages, not seqs: empty reserved seqs are never unread.
    let inbox: Value = cluster
        .node(1)
        .client()
        .get(cluster.node(1).url("/v1/participants/bob/inbox"))
        .send()
        .await
        .expect("GET inbox")
        .json()
        .await
        .expect("inbox JSON");
    let entry = inbox["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .find(|e| e["id"] == victims[0].id.as_str())
        .unwrap_or_else(|| panic!("{} not in bob's inbox: {inbox}", victims[0].id))
        .clone();
    let last_seq = entry["last_seq"].as_u64().expect("last_seq");
    let page = cluster
        .node(1)
        .page(&victims[0].id, "after_seq=0&limit=1000")
        .await;
    let stored = page.seqs().iter().filter(|s| **s <= last_seq).count() as u64;
    assert_eq!(
        entry["unread"].as_u64(),
        Some(stored),
        "bob's unread in {} (last_seq {last_seq}, gaps {:?}): {entry}",
        victims[0].id,
        page.gaps
    );
    assert!(stored + RESERVE <= last_seq, "{entry}");

    wait_for(
        "a gap push to a subscriber of n3's conversations",
        PROGRESS_TIMEOUT,
        || async {
            let log = load.subscribers.log();
            let told = victims
                .iter()
                .filter(|v| log.get(&v.id).is_some_and(|s| !s.gaps.is_empty()))
                .count();
            (told > 0)
                .then_some(())
                .ok_or_else(|| "none yet".to_owned())
        },
    )
    .await;
    // Reserved when first used after the failover: the writers reach every one of them.
    let c = &cluster;
    let owned_slots = &owned;
    let n_victims = victims.len() as u64;
    let (conversations_reserved, seqs_reserved, restored) = wait_for(
        "every conversation of n3 to have its reservation",
        PROGRESS_TIMEOUT,
        || async move {
            let totals = reserved_totals(c, 1, owned_slots).await;
            if totals.0 >= n_victims {
                Ok(totals)
            } else {
                Err(format!("{totals:?}"))
            }
        },
    )
    .await;
    assert_eq!(seqs_reserved, conversations_reserved * RESERVE);
    assert_eq!(restored, 0);

    // n3 comes back with its data dir: it serves none of its old slots and restores.
    cluster.restart(3);
    cluster.wait_node_state(1, 3, "active").await;
    let acked_by_n3: Vec<(String, u64, String)> = {
        let log = load.http.log().merge(load.ws.log());
        acks_before(&log, &victims, killed_at)
            .into_iter()
            .map(|a| (a.conversation.clone(), a.seq, a.id.clone()))
            .collect()
    };
    assert!(wait_restored(&cluster, &acked_by_n3).await > 0.0);
    // n3 may still be writing back messages it made durable but never acknowledged; once done,
    // the slot map and n3's counter agree.
    let restored_metric = wait_restore_counted(&cluster, &owned).await;
    let n3_log = cluster.node(3).stderr_all();
    assert!(n3_log.contains("restored acknowledged messages into their reserved seqs"));
    assert!(
        !n3_log.contains("with no seq reserved for them"),
        "orphaned messages: see n3's log"
    );
    // The gap shrank by what n3 had acknowledged in it (and keeps only seqs it never assigned,
    // or whose key a retry on a live node took: the checker holds every ack to its seq).
    let page = cluster
        .node(2)
        .page(&victims[0].id, "after_seq=0&limit=1000")
        .await;
    let acked_in_gap = acked_by_n3
        .iter()
        .filter(|(c, s, _)| *c == victims[0].id && from <= *s && *s <= to)
        .count() as u64;
    let gap_now: u64 = page.gaps.iter().map(|(a, b)| b - a + 1).sum();
    eprintln!(
        "n3 restored {restored_metric} messages; {} of {} in the reserved {from}..={to}, \
         whose gaps are now {:?}",
        acked_in_gap, victims[0].id, page.gaps
    );
    assert!(
        gap_now <= RESERVE - acked_in_gap,
        "gaps {:?} after n3 restored {acked_in_gap} acknowledged messages into {from}..={to}",
        page.gaps
    );

    cluster.wait_balanced().await;
    load.wait_acks(50, "load after n3 is back").await;
    let (log, subscribers, conversations) = load.stop_writers().await;
    assert!(log.error_count("owner_unavailable") > 0, "{:?}", log.errors);
    let log = log.merge(probes.into_inner().expect("probes"));
    assert_check_allowing_gaps(&cluster, &conversations, &log, &subscribers).await;
}

/// Waits until n3's slots (`owned`) have other owners and none is unavailable; returns when.
async fn wait_failed_over(cluster: &TestCluster, owned: &[u32], within: Duration) -> Instant {
    wait_for("n3's slots failed over", within, || async move {
        let slots = cluster.try_slots(1).await?;
        let left = owned
            .iter()
            .all(|s| slots.owner_of(*s).is_some_and(|o| o != "n3"));
        if left && slots.in_state("unavailable").is_empty() {
            Ok(Instant::now())
        } else {
            Err(slots.brief())
        }
    })
    .await
}

/// Waits until n3 has written back every message of `acked` (conversation, seq, id): each
/// reads at its acknowledged seq, with its id, through n1. Returns n3's
/// `ferry_restored_messages_total`.
async fn wait_restored(cluster: &TestCluster, acked: &[(String, u64, String)]) -> f64 {
    wait_for(
        "n3 to restore what it acknowledged",
        PROGRESS_TIMEOUT,
        || async {
            let restored = restored_by(cluster, 3).await;
            for (conversation, seq, id) in acked {
                let page = cluster
                    .node(1)
                    .page(conversation, &format!("after_seq={}&limit=1", seq - 1))
                    .await;
                if page.messages.first().and_then(|m| m["id"].as_str()) != Some(id.as_str()) {
                    return Err(format!(
                        "{conversation} seq {seq} not back yet; restored {restored}"
                    ));
                }
            }
            Ok(restored)
        },
    )
    .await
}

/// A balanced 3-node cluster with a short lease (200 ms heartbeat, 1.5 s lease),
/// `max_unarchived = RESERVE` and `extra` settings, under load (2 s request timeout) that has
/// been acknowledged 150 times; `None` where the test's services are missing.
async fn short_lease_cluster_under_load(
    prefix: &str,
    extra: &[(&str, &str)],
) -> Option<(TestCluster, Load)> {
    let reserve = RESERVE.to_string();
    let mut env = vec![
        ("FERRY_CLUSTER__HEARTBEAT", "200ms"),
        ("FERRY_CLUSTER__LEASE", "1500ms"),
        ("FERRY_CLUSTER__MAX_UNARCHIVED", reserve.as_str()),
    ];
    env.extend_from_slice(extra);
    let cluster = TestCluster::start(3, &env).await?;
    cluster.wait_balanced().await;
    let load = Load::start(
        &cluster,
        prefix,
        WorkloadSpec {
            request_timeout: Duration::from_secs(2),
            ..spec()
        },
    )
    .await;
    load.wait_acks(150, &format!("{prefix}: load before the fault"))
        .await;
    Some((cluster, load))
}

/// `failover = "auto"` with `durability = "local"`, and n3 partitioned from Postgres (alive,
/// serving, but unable to renew its lease or archive) under load, with writers going straight
/// to n3. After its lease the leader fails its slots over with seqs reserved; n3 acknowledges
/// nothing after its lease; when the partition heals n3 finds its slots taken, lets them go and
/// writes what it had acknowledged into the reserved seqs: nothing acknowledged is lost, no seq
/// holds two messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_node_failed_over_writes_nothing_after_its_lease_and_restores_on_heal() {
    let Some((cluster, load)) =
        short_lease_cluster_under_load("part", &[("FERRY_CLUSTER__FAILOVER", "auto")]).await
    else {
        return;
    };
    let before = cluster.slots(1).await;
    let owned = before.owned_by("n3");
    let victims = TestCluster::conversations_of(&before, 3, &load.conversations);
    assert!(!victims.is_empty(), "n3 owns none of the conversations");
    let direct = Writers::http_via(
        &cluster.book(),
        &[3],
        &victims,
        WorkloadSpec {
            writers_per_node: 1,
            interval: Duration::from_millis(30),
            request_timeout: Duration::from_secs(2),
        },
        "d",
    );
    wait_for(
        "writers straight to n3 to be acknowledged",
        PROGRESS_TIMEOUT,
        || async {
            match direct.acked() {
                n if n >= 10 => Ok(()),
                n => Err(format!("{n} acks")),
            }
        },
    )
    .await;

    let faulted_at = Instant::now();
    cluster.cut_postgres(3);
    let fence_deadline = faulted_at + SHORT_LEASE;
    let failed_over_at =
        wait_failed_over(&cluster, &owned, SHORT_LEASE + Duration::from_secs(20)).await;
    eprintln!(
        "auto failover of {} slots {:?} after n3 was cut off (lease {SHORT_LEASE:?})",
        owned.len(),
        failed_over_at - faulted_at
    );
    load.wait_acks_on(
        &victims,
        failed_over_at,
        20,
        "appends to n3's conversations after the failover",
    )
    .await;

    let healed_at = Instant::now();
    cluster.heal_postgres(3);
    cluster.wait_node_state(1, 3, "active").await;
    let acked: Vec<(String, u64, String)> = {
        let log = load.http.log().merge(load.ws.log()).merge(direct.log());
        acks_before(&log, &victims, fence_deadline)
            .into_iter()
            .map(|a| (a.conversation.clone(), a.seq, a.id.clone()))
            .collect()
    };
    let restored = wait_restored(&cluster, &acked).await;
    assert!(
        restored > 0.0,
        "n3 could archive nothing while cut off, yet restored nothing"
    );
    eprintln!(
        "n3 restored {restored} messages; {} acknowledged in its conversations before its \
         lease ran out all read back at their seqs",
        acked.len()
    );
    assert!(
        !cluster
            .node(3)
            .stderr_all()
            .contains("with no seq reserved for them"),
        "see n3's log"
    );
    cluster.wait_balanced().await;
    load.wait_acks(50, "load after the heal").await;

    let direct = direct.stop().await;
    let (log, subscribers, conversations) = load.stop_writers().await;
    let log = log.merge(direct);
    let victim_ids = ids(&victims);
    let late: Vec<String> = log
        .acks
        .iter()
        .filter(|a| {
            victim_ids.contains(&a.conversation)
                && a.node == 3
                && a.received >= fence_deadline
                && a.received < healed_at
        })
        .map(|a| {
            format!(
                "{} seq {} key {} acked {:?} after the cut",
                a.conversation,
                a.seq,
                a.key,
                a.received - faulted_at
            )
        })
        .collect();
    assert!(
        late.is_empty(),
        "n3 acknowledged after its lease ran out: {late:#?}"
    );
    assert_check_allowing_gaps(&cluster, &conversations, &log, &subscribers).await;
}

/// The race, three times: n3 is paused until it is dead, then a failover and n3's return
/// (SIGCONT) run at once, under load. Whichever wins each slot, no seq holds two
/// messages, nothing acknowledged is lost, and what n3 lost it restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_racing_the_dead_nodes_return_never_gives_a_seq_twice() {
    let Some((mut cluster, load)) = short_lease_cluster_under_load("race", &[]).await else {
        return;
    };
    let victims = TestCluster::conversations_of(&cluster.slots(1).await, 3, &load.conversations);
    assert!(!victims.is_empty(), "n3 owns none of the conversations");
    let all_slots: Vec<u32> = (0..SLOT_COUNT).collect();
    // n3 wakes up while the failover is taking its slots one transaction at a time; the offsets
    // vary who wins (n3 every slot, the failover every slot, or a split), which is not asserted.
    for offset_ms in [0u64, 8, 40] {
        cluster.pause(3);
        cluster.wait_node_state(1, 3, "dead").await;
        let (failover, ()) = tokio::join!(post_failover(&cluster, 1, "n3"), async {
            tokio::time::sleep(Duration::from_millis(offset_ms)).await;
            cluster.node(3).signal(libc::SIGCONT);
        });
        cluster.resume(3);
        let (status, body) = failover;
        let moved = body["moves"].as_array().map_or(0, Vec::len);
        eprintln!(
            "failover racing n3's return {offset_ms} ms later: {status}, {moved} slots moved"
        );
        assert!(
            status == 200 || (status == 409 && body["detail"] == "node_alive"),
            "{status} {body}"
        );
        cluster.wait_node_state(1, 3, "active").await;
        cluster.wait_balanced().await;
        load.wait_acks_on(
            &victims,
            Instant::now(),
            20,
            "appends to n3's former conversations",
        )
        .await;
        // Whatever n3 had to restore it has written back.
        wait_restore_counted(&cluster, &all_slots).await;
    }
    let (log, subscribers, conversations) = load.stop_writers().await;
    assert_check_allowing_gaps(&cluster, &conversations, &log, &subscribers).await;
}

/// `cluster.durability = "archive"` with `failover = "auto"`: under load, n3 is killed; as soon
/// as its lease has expired the leader hands its slots to n1 and n2, appends to its conversations
/// resume without it, and nothing acknowledged is lost (everything acknowledged was in SQL). n3
/// comes back with its data dir, owns nothing of what was failed over, and gets its share back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_failover_under_load_with_archive_durability() {
    let Some(mut cluster) = TestCluster::start(
        3,
        &[
            ("FERRY_CLUSTER__DURABILITY", "archive"),
            ("FERRY_CLUSTER__FAILOVER", "auto"),
        ],
    )
    .await
    else {
        return;
    };
    cluster.wait_balanced().await;
    let load = Load::start(&cluster, "auto", spec()).await;
    load.wait_acks(200, "load before the kill").await;
    let before = cluster.slots(1).await;
    let owned = before.owned_by("n3");
    let victims = TestCluster::conversations_of(&before, 3, &load.conversations);
    assert!(!victims.is_empty(), "n3 owns none of the conversations");

    cluster.kill9(3);
    let killed_at = Instant::now();
    let c = &cluster;
    let after = wait_for(
        "n3's slots failed over to n1 and n2",
        LEASE + Duration::from_secs(15),
        || async move {
            let slots = c.try_slots(1).await?;
            if slots.owned_by("n3").is_empty() && slots.in_state("unavailable").is_empty() {
                Ok(slots)
            } else {
                Err(slots.brief())
            }
        },
    )
    .await;
    let took = killed_at.elapsed();
    eprintln!("failed over {} slots {took:?} after the kill", owned.len());
    let epochs = before.epochs();
    for slot in &owned {
        let entry = after.0.iter().find(|s| s.slot == *slot).expect("slot");
        assert_eq!(entry.epoch, epochs[slot] + 1, "{entry:?}");
    }
    let mut failovers = 0.0;
    for i in [1, 2] {
        let text = cluster.node(i).metrics().await;
        failovers += common::metric_sum(&text, "ferry_slot_moves_total", &[("result", "failover")])
            .unwrap_or(0.0);
    }
    assert_eq!(failovers, owned.len() as f64, "counted by the leader");
    load.wait_acks_on(
        &victims,
        killed_at,
        20,
        "appends to n3's conversations after the failover",
    )
    .await;

    cluster.restart(3);
    cluster.wait_node_state(1, 3, "active").await;
    cluster.wait_balanced().await;
    load.wait_acks(100, "load after n3 is back").await;
    // What n3's WAL held of the lost slots beyond SQL was never acknowledged (it ran archive):
    // handed to the owners, none of it is stored or kept as orphaned.
    let c = &cluster;
    wait_for(
        "n3 to settle what it kept aside",
        PROGRESS_TIMEOUT,
        || async move {
            let log = c.node(3).stderr_all();
            let kept = log.contains("kept for restore");
            let settled = log.contains("restored acknowledged messages into their reserved seqs");
            (!kept || settled)
                .then_some(())
                .ok_or_else(|| "not yet".to_owned())
        },
    )
    .await;
    let n3_log = cluster.node(3).stderr_all();
    eprintln!(
        "n3 after its return: {}",
        n3_log
            .lines()
            .filter(|l| l.contains("restored acknowledged messages"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !n3_log.contains("with no seq reserved for them"),
        "n3 reported unacknowledged records as orphaned"
    );
    assert_eq!(restored_by(&cluster, 3).await, 0.0);
    let (log, subscribers, conversations) = load.stop_writers().await;
    assert_check(&cluster, &conversations, &log, &subscribers).await;
}
