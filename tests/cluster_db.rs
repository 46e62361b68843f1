//! The cluster's Postgres layer (`ferry::cluster::db`) against a real Postgres, a fresh database
//! per test (see `common::pg`): membership and incarnations, leases read on the database clock,
//! the fixed slot count, compare-and-swap of slot rows, reclaim, the rebalancer's election, the
//! fence archive writes check, failover (only of a dead owner, only to a live active node, one
//! winner, recorded with the change) — and a paused node's open transaction, which Postgres must
//! end before it can block a takeover.
//!
//! Nothing sleeps for a fixed time: waits for a lease to lapse poll against a deadline.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use ferry::cluster::db::{
    check_fence, ClusterDb, ClusterDbError, Durability, FailoverRecord, Fenced, Registered,
};
use ferry::store::Store;
use ferry_shards::ownership::{NodeState, Refusal, SlotRow, SlotState};

use Durability::{Archive, Local};

use common::pg::TestDatabase;

/// Long enough never to lapse during a test.
const LEASE: Duration = Duration::from_secs(30);
/// For the tests that wait for a lease to lapse.
const SHORT_LEASE: Duration = Duration::from_millis(300);
/// How long a lapse may take to show, beyond the lease itself.
const LAPSE_DEADLINE: Duration = Duration::from_secs(5);

/// A migrated fresh database and a `ClusterDb` on it; `None` when Postgres tests are skipped.
async fn setup() -> Option<(TestDatabase, ClusterDb)> {
    let db = TestDatabase::create().await?;
    let store = Store::connect(&db.url, 1).await.expect("store");
    store.migrate().await.expect("migrate");
    store.close().await;
    let cluster = ClusterDb::connect(&db.url, 4, LEASE)
        .await
        .expect("connect the cluster db");
    Some((db, cluster))
}

/// Polls `check` every 25 ms until it yields `Some`, failing the test after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn row(slot: u32, owner: Option<&str>, epoch: u64, state: SlotState) -> SlotRow {
    SlotRow {
        slot,
        owner: owner.map(str::to_owned),
        epoch,
        state,
    }
}

fn moving(target: &str) -> SlotState {
    SlotState::Moving {
        target: target.to_owned(),
    }
}

/// Registers `node` (if it is not already alive and active) and makes it `active`: only such a
/// node can be given a slot.
async fn ensure_active(cluster: &ClusterDb, node: &str) {
    let nodes = cluster.nodes().await.expect("nodes");
    if nodes
        .iter()
        .any(|n| n.id == node && n.state == NodeState::Active)
    {
        return;
    }
    cluster
        .register(node, &format!("http://{node}"), LEASE, Local, 10_000)
        .await
        .expect("register");
    assert!(cluster
        .set_state(node, &[NodeState::Joining], NodeState::Active)
        .await
        .expect("activate"));
}

/// Gives `slot` (unassigned, epoch 0) to `owner` at epoch 1.
async fn assign(cluster: &ClusterDb, slot: u32, owner: &str) -> SlotRow {
    ensure_active(cluster, owner).await;
    let old = cluster.slot(slot).await.expect("slot").expect("slot row");
    let new = row(slot, Some(owner), old.epoch + 1, SlotState::Active);
    assert!(
        cluster.cas_slot(&old, &new).await.expect("cas"),
        "assign {slot}"
    );
    new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_is_a_new_incarnation_and_a_drain_survives_it() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    let first = cluster
        .register("b", "http://b:1", LEASE, Local, 10_000)
        .await
        .expect("register");
    assert_eq!(
        first,
        Registered {
            incarnation: 1,
            state: NodeState::Joining,
            durability: Local,
        }
    );
    cluster
        .register("a", "http://a:1", LEASE, Local, 10_000)
        .await
        .expect("register a");
    let again = cluster
        .register("b", "http://b:2", LEASE, Local, 10_000)
        .await
        .expect("register again");
    assert_eq!(again.incarnation, 2);

    // The replaced incarnation can no longer renew; the new one can.
    assert!(!cluster.renew("b", 1, LEASE).await.expect("renew"));
    assert!(cluster.renew("b", 2, LEASE).await.expect("renew"));
    assert!(!cluster.renew("nobody", 1, LEASE).await.expect("renew"));

    let nodes = cluster.nodes().await.expect("nodes");
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "ordered by id");
    let b = &nodes[1];
    assert_eq!(
        (b.incarnation, b.advertise_url.as_str(), b.state, b.alive),
        (2, "http://b:2", NodeState::Joining, true)
    );
    assert!(b.started_at_ms <= b.last_heartbeat_ms && b.last_heartbeat_ms < b.lease_until_ms);

    // State changes are a compare-and-swap on the stored state.
    use NodeState::*;
    assert!(cluster
        .set_state("b", &[Joining], Active)
        .await
        .expect("cas"));
    assert!(!cluster
        .set_state("b", &[Joining], Draining)
        .await
        .expect("cas"));
    assert!(!cluster
        .set_state("nobody", &[Joining], Active)
        .await
        .expect("cas"));
    assert!(cluster
        .set_state("b", &[Active, Joining], Draining)
        .await
        .expect("cas"));
    assert!(matches!(
        cluster.set_state("b", &[Draining], Dead).await,
        Err(ClusterDbError::Refused(_))
    ));

    // An operator's drain survives restarts; anything else starts over as joining.
    let r = cluster
        .register("b", "http://b:2", LEASE, Local, 10_000)
        .await
        .expect("register");
    assert_eq!((r.incarnation, r.state), (3, Draining));
    assert!(cluster
        .set_state("b", &[Draining], Drained)
        .await
        .expect("cas"));
    let r = cluster
        .register("b", "http://b:2", LEASE, Local, 10_000)
        .await
        .expect("register");
    assert_eq!((r.incarnation, r.state), (4, Drained));
    assert!(cluster.set_state("b", &[Drained], Left).await.expect("cas"));
    let r = cluster
        .register("b", "http://b:2", LEASE, Local, 10_000)
        .await
        .expect("register");
    assert_eq!((r.incarnation, r.state), (5, Joining));
    let node = cluster.node("b").await.expect("node").expect("b exists");
    assert_eq!((node.incarnation, node.state), (5, Joining));
    assert_eq!(cluster.node("nobody").await.expect("node"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_reads_dead_until_renewed() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    let a = cluster
        .register("a", "http://a", SHORT_LEASE, Local, 10_000)
        .await
        .expect("register a");
    cluster
        .register("d", "http://d", SHORT_LEASE, Local, 10_000)
        .await
        .expect("register d");
    assert!(cluster
        .set_state("d", &[NodeState::Joining], NodeState::Drained)
        .await
        .expect("drain d"));
    cluster
        .register("z", "http://z", LEASE, Local, 10_000)
        .await
        .expect("register z");
    assert!(cluster
        .set_state("z", &[NodeState::Joining], NodeState::Active)
        .await
        .expect("activate z"));

    // d registered a moment after a: wait for both short leases to lapse.
    let nodes = eventually(
        "a's and d's leases lapse",
        SHORT_LEASE + LAPSE_DEADLINE,
        || async {
            let nodes = cluster.nodes().await.expect("nodes");
            (!nodes[0].alive && !nodes[1].alive).then_some(nodes)
        },
    )
    .await;
    let read: Vec<(&str, NodeState, bool)> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.state, n.alive))
        .collect();
    assert_eq!(
        read,
        [
            ("a", NodeState::Dead, false),
            // Drained: owns nothing, needs no failover, so it does not read dead.
            ("d", NodeState::Drained, false),
            ("z", NodeState::Active, true),
        ]
    );
    assert!(!nodes[0].view().alive);

    // Renewing after the lapse makes it alive again (what its slots' epochs say is reclaim's job).
    assert!(cluster
        .renew("a", a.incarnation, LEASE)
        .await
        .expect("renew"));
    let back = cluster.node("a").await.expect("node").expect("a");
    assert_eq!((back.state, back.alive), (NodeState::Joining, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_count_is_set_once_by_whoever_starts_first() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    assert_eq!(cluster.slot_count().await.expect("count"), None);
    // Several nodes starting at once.
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let cluster = cluster.clone();
            tokio::spawn(async move { cluster.init_slots(16).await })
        })
        .collect();
    for start in starts {
        start.await.expect("join").expect("init_slots");
    }
    cluster.init_slots(16).await.expect("init_slots again");
    assert_eq!(cluster.slot_count().await.expect("count"), Some(16));
    let slots = cluster.slots().await.expect("slots");
    assert_eq!(slots.len(), 16);
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(*slot, row(i as u32, None, 0, SlotState::Active));
    }

    let err = cluster
        .init_slots(32)
        .await
        .expect_err("another slot count");
    assert!(
        matches!(
            err,
            ClusterDbError::SlotCountMismatch {
                stored: 16,
                requested: 32
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("16") && message.contains("32"),
        "{message}"
    );
    assert!(matches!(
        cluster.init_slots(0).await,
        Err(ClusterDbError::Refused(_))
    ));
    assert_eq!(cluster.slots().await.expect("slots").len(), 16);
    assert_eq!(cluster.slot(16).await.expect("slot"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_changes_only_by_compare_and_swap_and_its_epoch_never_goes_back() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    cluster.init_slots(4).await.expect("init");
    ensure_active(&cluster, "a").await;
    ensure_active(&cluster, "b").await;
    let fresh = cluster.slot(1).await.expect("slot").expect("row");
    let owned = row(1, Some("a"), 1, SlotState::Active);
    assert!(cluster.cas_slot(&fresh, &owned).await.expect("first cas"));
    // The same stale row cannot win twice.
    assert!(!cluster.cas_slot(&fresh, &owned).await.expect("second cas"));
    // Nor can a rival that read the same row and wants the slot for itself.
    let rival = row(1, Some("b"), 1, SlotState::Active);
    assert!(!cluster.cas_slot(&fresh, &rival).await.expect("rival cas"));
    assert_eq!(cluster.slot(1).await.expect("slot"), Some(owned.clone()));

    // Only a node that is alive and active can be given a slot or be a move's target, checked
    // when the change is written (the planner's view may be older).
    cluster
        .register("d", "http://d", LEASE, Local, 10_000)
        .await
        .expect("register d");
    assert!(!cluster
        .cas_slot(&owned, &row(1, Some("a"), 1, moving("d")))
        .await
        .expect("joining target"));
    assert!(cluster
        .set_state("d", &[NodeState::Joining], NodeState::Active)
        .await
        .expect("activate d"));
    assert!(cluster
        .set_state("d", &[NodeState::Active], NodeState::Draining)
        .await
        .expect("drain d"));
    assert!(!cluster
        .cas_slot(&owned, &row(1, Some("a"), 1, moving("d")))
        .await
        .expect("draining target"));
    assert!(!cluster
        .cas_slot(&owned, &row(1, Some("d"), 2, SlotState::Active))
        .await
        .expect("draining owner"));
    assert!(!cluster
        .cas_slot(&owned, &row(1, Some("nobody"), 2, SlotState::Active))
        .await
        .expect("unknown owner"));
    assert_eq!(cluster.slot(1).await.expect("slot"), Some(owned.clone()));

    // A move: a marks it moving to b, then hands it over at epoch + 1.
    let marked = row(1, Some("a"), 1, moving("b"));
    assert!(cluster.cas_slot(&owned, &marked).await.expect("mark"));
    assert!(!cluster.cas_slot(&owned, &marked).await.expect("stale mark"));
    let handed = row(1, Some("b"), 2, SlotState::Active);
    assert!(cluster.cas_slot(&marked, &handed).await.expect("hand over"));
    assert_eq!(cluster.slot(1).await.expect("slot"), Some(handed.clone()));

    // Refused without writing: an epoch going back, an owner change at the same epoch, another slot.
    let back = row(1, Some("a"), 1, SlotState::Active);
    let err = cluster
        .cas_slot(&handed, &back)
        .await
        .expect_err("epoch back");
    assert!(matches!(err, ClusterDbError::Refused(_)), "{err:?}");
    let same_epoch = row(1, Some("c"), 2, SlotState::Active);
    assert!(matches!(
        cluster.cas_slot(&handed, &same_epoch).await,
        Err(ClusterDbError::Refused(_))
    ));
    let elsewhere = row(2, Some("b"), 3, SlotState::Active);
    assert!(matches!(
        cluster.cas_slot(&handed, &elsewhere).await,
        Err(ClusterDbError::Refused(_))
    ));
    assert_eq!(cluster.slot(1).await.expect("slot"), Some(handed));
    assert_eq!(
        cluster.slot(2).await.expect("slot"),
        Some(row(2, None, 0, SlotState::Active))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_bumps_the_epochs_of_that_nodes_slots_only() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    cluster.init_slots(5).await.expect("init");
    assign(&cluster, 0, "a").await;
    let one = assign(&cluster, 1, "a").await;
    ensure_active(&cluster, "b").await;
    assert!(cluster
        .cas_slot(&one, &row(1, Some("a"), 1, moving("b")))
        .await
        .expect("mark moving"));
    assign(&cluster, 2, "b").await;
    assign(&cluster, 4, "a").await;

    let reclaimed = cluster.reclaim("a").await.expect("reclaim");
    assert_eq!(
        reclaimed,
        [
            row(0, Some("a"), 2, SlotState::Active),
            // The move it had started is abandoned: the slot is plainly its own again.
            row(1, Some("a"), 2, SlotState::Active),
            row(4, Some("a"), 2, SlotState::Active),
        ]
    );
    assert_eq!(
        cluster.slots().await.expect("slots"),
        [
            row(0, Some("a"), 2, SlotState::Active),
            row(1, Some("a"), 2, SlotState::Active),
            row(2, Some("b"), 1, SlotState::Active),
            row(3, None, 0, SlotState::Active),
            row(4, Some("a"), 2, SlotState::Active),
        ]
    );
    assert_eq!(cluster.reclaim("nobody").await.expect("reclaim"), []);
}

/// Registers `id` with `lease`, `active`, storing `durability` as it would be once recorded.
async fn member(cluster: &ClusterDb, id: &str, lease: Duration, durability: Durability) -> u64 {
    let r = cluster
        .register(id, &format!("http://{id}"), lease, durability, 10_000)
        .await
        .expect("register");
    assert!(cluster
        .set_state(id, &[NodeState::Joining], NodeState::Active)
        .await
        .expect("activate"));
    assert!(cluster
        .set_durability(id, r.incarnation, durability)
        .await
        .expect("set durability"));
    r.incarnation
}

/// Waits until none of `ids` is alive on the database clock.
async fn wait_dead(cluster: &ClusterDb, ids: &[&str]) {
    eventually(
        &format!("{ids:?} lapse"),
        SHORT_LEASE + LAPSE_DEADLINE,
        || async {
            let nodes = cluster.nodes().await.expect("nodes");
            nodes
                .iter()
                .filter(|n| ids.contains(&n.id.as_str()))
                .all(|n| !n.alive)
                .then_some(())
        },
    )
    .await;
}

fn failed_over(slot: u32, to: &str, epoch: u64) -> SlotRow {
    row(slot, Some(to), epoch, SlotState::Active)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_durability_is_stored_only_once_the_node_says_so() {
    let Some((_db, cluster)) = setup().await else {
        return;
    };
    // A node never seen, configured archive: its log may hold what an earlier run acknowledged
    // under local, so the row says local until the node records archive itself.
    let r = cluster
        .register("a", "http://a", LEASE, Archive, 10_000)
        .await
        .expect("register");
    assert_eq!(r.durability, Local);
    assert!(!cluster
        .set_durability("a", r.incarnation + 1, Archive)
        .await
        .expect("a later incarnation"));
    assert!(cluster
        .set_durability("a", r.incarnation, Archive)
        .await
        .expect("record archive"));
    assert_eq!(
        cluster.node("a").await.unwrap().unwrap().durability,
        Archive
    );
    // It ran archive: a restart with archive keeps it.
    let r = cluster
        .register("a", "http://a", LEASE, Archive, 10_000)
        .await
        .expect("register");
    assert_eq!(r.durability, Archive);
    // A restart with local is local at once, and back to archive needs recording again.
    let r = cluster
        .register("a", "http://a", LEASE, Local, 10_000)
        .await
        .expect("register");
    assert_eq!(r.durability, Local);
    let r = cluster
        .register("a", "http://a", LEASE, Archive, 10_000)
        .await
        .expect("register");
    assert_eq!(r.durability, Local);
    assert_eq!(cluster.node("a").await.unwrap().unwrap().durability, Local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_takes_a_dead_owners_slot_to_a_live_active_node_and_records_it() {
    let Some((db, cluster)) = setup().await else {
        return;
    };
    cluster.init_slots(6).await.expect("init");
    member(&cluster, "a", LEASE, Archive).await;
    cluster
        .register("j", "http://j", LEASE, Local, 10_000)
        .await
        .expect("register j");
    let x = member(&cluster, "x", SHORT_LEASE, Archive).await;
    member(&cluster, "l", SHORT_LEASE, Local).await;
    let r = member(&cluster, "r", SHORT_LEASE, Archive).await;
    let x0 = assign(&cluster, 0, "x").await;
    assign(&cluster, 1, "x").await;
    let x2 = assign(&cluster, 2, "x").await;
    let x2 = {
        let marked = row(2, Some("x"), 1, moving("a"));
        assert!(cluster.cas_slot(&x2, &marked).await.expect("mark moving"));
        marked
    };
    let l3 = assign(&cluster, 3, "l").await;
    let r4 = assign(&cluster, 4, "r").await;

    // While the owner's lease is valid: refused, with the reason.
    let err = cluster
        .failover_slot(&x0, &failed_over(0, "a", 2), 0)
        .await
        .expect_err("x is alive");
    assert!(
        matches!(&err, ClusterDbError::Denied(Refusal::OwnerAlive { slot: 0, owner }) if owner == "x"),
        "{err:?}"
    );

    wait_dead(&cluster, &["x", "l", "r"]).await;
    // r comes back before anyone fails it over: alive again, refused again.
    assert!(cluster.renew("r", r, LEASE).await.expect("renew r"));
    let err = cluster
        .failover_slot(&r4, &failed_over(4, "a", 2), 0)
        .await
        .expect_err("r is back");
    assert!(
        matches!(err, ClusterDbError::Denied(Refusal::OwnerAlive { .. })),
        "{err:?}"
    );

    // The receiver must be alive and active at the write: not joining, not a stranger.
    let err = cluster
        .failover_slot(&x0, &failed_over(0, "j", 2), 0)
        .await
        .expect_err("j is joining");
    assert!(
        matches!(
            err,
            ClusterDbError::Denied(Refusal::NodeNotActive {
                state: NodeState::Joining,
                ..
            })
        ),
        "{err:?}"
    );
    let err = cluster
        .failover_slot(&x0, &failed_over(0, "nobody", 2), 0)
        .await
        .expect_err("no such node");
    assert!(
        matches!(err, ClusterDbError::Denied(Refusal::UnknownNode { .. })),
        "{err:?}"
    );
    // Nor to the dead node itself, nor skipping an epoch.
    assert!(matches!(
        cluster.failover_slot(&x0, &failed_over(0, "x", 2), 0).await,
        Err(ClusterDbError::Denied(Refusal::NodeNotAlive { .. }))
    ));
    assert!(matches!(
        cluster.failover_slot(&x0, &failed_over(0, "a", 3), 0).await,
        Err(ClusterDbError::Refused(_))
    ));
    // A node that ran local may have acknowledged what only its disk holds: not without a
    // reservation.
    let err = cluster
        .failover_slot(&l3, &failed_over(3, "a", 2), 0)
        .await
        .expect_err("l ran local");
    assert!(
        matches!(&err, ClusterDbError::Refused(why) if why.contains("durability=local")),
        "{err:?}"
    );
    assert!(cluster.failovers().await.expect("failovers").is_empty());
    assert_eq!(
        cluster.slots().await.expect("slots")[..5],
        [
            x0.clone(),
            row(1, Some("x"), 1, SlotState::Active),
            x2.clone(),
            l3.clone(),
            r4.clone(),
        ]
    );

    // x's archive transaction, still open (a paused x), holds the slot row: the failover fails
    // fast, before it has locked any node row.
    let taker = ClusterDb::connect(&db.url, 1, Duration::from_secs(1))
        .await
        .expect("connect");
    let mut zombie = cluster.pool().begin().await.expect("begin");
    check_fence(&mut zombie, "x", &[(0, 1)])
        .await
        .expect("x still owns 0");
    let err = taker
        .failover_slot(&x0, &failed_over(0, "a", 2), 0)
        .await
        .expect_err("the slot row is locked");
    assert!(matches!(err, ClusterDbError::LockTimeout), "{err:?}");
    zombie.rollback().await.expect("rollback");
    taker.close().await;

    // Now it goes through, a move in progress abandoned; the stale row cannot win twice.
    assert!(cluster
        .failover_slot(&x0, &failed_over(0, "a", 2), 0)
        .await
        .expect("failover 0"));
    assert!(!cluster
        .failover_slot(&x0, &failed_over(0, "a", 2), 0)
        .await
        .expect("again"));
    assert!(cluster
        .failover_slot(&x2, &failed_over(2, "a", 2), 0)
        .await
        .expect("failover 2"));
    // With a reservation, a local node's slot can go (the hook for reserved seqs).
    assert!(cluster
        .failover_slot(&l3, &failed_over(3, "a", 2), 10_000)
        .await
        .expect("failover 3"));

    let failovers = cluster.failovers().await.expect("failovers");
    let summary: Vec<(u32, u64, String, u64, String, u64)> = failovers
        .iter()
        .map(|f: &FailoverRecord| {
            (
                f.slot,
                f.epoch,
                f.from_node.clone(),
                f.from_epoch,
                f.to_node.clone(),
                f.reserve,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0, 2, "x".into(), 1, "a".into(), 0),
            (2, 2, "x".into(), 1, "a".into(), 0),
            (3, 2, "l".into(), 1, "a".into(), 10_000),
        ]
    );
    assert!(failovers.iter().all(|f| f.at_ms > 0));
    let last = cluster.last_failover_epochs().await.expect("last");
    assert_eq!(last.len(), 3);
    assert_eq!((last[&0], last[&2], last[&3]), (2, 2, 2));

    // x comes back: it reclaims only the slot it still owns; the others stay failed over.
    assert!(cluster.renew("x", x, LEASE).await.expect("renew x"));
    assert_eq!(
        cluster.reclaim("x").await.expect("reclaim"),
        [row(1, Some("x"), 2, SlotState::Active)]
    );
    assert_eq!(
        cluster.slots().await.expect("slots")[..4],
        [
            failed_over(0, "a", 2),
            row(1, Some("x"), 2, SlotState::Active),
            failed_over(2, "a", 2),
            failed_over(3, "a", 2),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_racing_failovers_one_wins() {
    let Some((db, cluster)) = setup().await else {
        return;
    };
    cluster.init_slots(8).await.expect("init");
    member(&cluster, "a", LEASE, Archive).await;
    member(&cluster, "b", LEASE, Archive).await;
    member(&cluster, "x", SHORT_LEASE, Archive).await;
    let mut owned = Vec::new();
    for slot in 0..8 {
        owned.push(assign(&cluster, slot, "x").await);
    }
    wait_dead(&cluster, &["x"]).await;

    // Two failers (an operator and the leader, say) on their own pools, from the same rows.
    let racer = |to: &'static str| {
        let url = db.url.clone();
        let owned = owned.clone();
        tokio::spawn(async move {
            let cluster = ClusterDb::connect(&url, 1, LEASE).await.expect("connect");
            let mut won = Vec::new();
            for old in &owned {
                let new = failed_over(old.slot, to, old.epoch + 1);
                // A lock held by the rival's open transaction: retry.
                loop {
                    match cluster.failover_slot(old, &new, 0).await {
                        Ok(true) => {
                            won.push(old.slot);
                            break;
                        }
                        Ok(false) => break,
                        Err(ClusterDbError::LockTimeout) => continue,
                        Err(e) => panic!("failover of {} to {to}: {e}", old.slot),
                    }
                }
            }
            cluster.close().await;
            won
        })
    };
    let (a, b) = (racer("a"), racer("b"));
    let (a, b) = (a.await.expect("join a"), b.await.expect("join b"));
    let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..8).collect::<Vec<_>>(), "a won {a:?}, b won {b:?}");

    let slots = cluster.slots().await.expect("slots");
    let failovers = cluster.failovers().await.expect("failovers");
    assert_eq!(failovers.len(), 8, "{failovers:?}");
    for (slot, record) in slots.iter().zip(&failovers) {
        let winner = if a.contains(&slot.slot) { "a" } else { "b" };
        assert_eq!(*slot, failed_over(slot.slot, winner, 2));
        assert_eq!(
            (record.slot, record.epoch, record.to_node.as_str()),
            (slot.slot, 2, winner)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_lapsed_one_is_replaced() {
    let Some((db, cluster)) = setup().await else {
        return;
    };
    assert_eq!(cluster.leader().await.expect("leader"), None);
    // Eight nodes race for an empty seat, each on its own pool: exactly one wins.
    let mut races = Vec::new();
    for i in 0..8 {
        let url = db.url.clone();
        races.push(tokio::spawn(async move {
            let cluster = ClusterDb::connect(&url, 1, LEASE).await.expect("connect");
            let won = cluster
                .try_lead(&format!("n{i}"), LEASE)
                .await
                .expect("try_lead");
            cluster.close().await;
            won.then_some(format!("n{i}"))
        }));
    }
    let mut winners = Vec::new();
    for race in races {
        winners.extend(race.await.expect("join"));
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert!(cluster.resign(&winners[0]).await.expect("resign"));

    assert!(cluster.try_lead("a", SHORT_LEASE).await.expect("a leads"));
    assert!(!cluster.try_lead("b", SHORT_LEASE).await.expect("b waits"));
    assert!(cluster.try_lead("a", SHORT_LEASE).await.expect("a renews"));
    let leader = cluster.leader().await.expect("leader").expect("a row");
    assert_eq!((leader.node_id.as_str(), leader.alive), ("a", true));

    // a stops renewing; once its lease lapsed on the database clock, b takes over.
    eventually(
        "b takes the lapsed lead",
        SHORT_LEASE + LAPSE_DEADLINE,
        || async {
            cluster
                .try_lead("b", LEASE)
                .await
                .expect("try_lead")
                .then_some(())
        },
    )
    .await;
    assert!(!cluster.try_lead("a", LEASE).await.expect("a is out"));
    assert_eq!(
        cluster.leader().await.expect("leader").map(|l| l.node_id),
        Some("b".to_owned())
    );

    // Resigning frees the seat at once; only the leader can resign.
    assert!(!cluster.resign("a").await.expect("resign"));
    assert!(cluster.resign("b").await.expect("resign"));
    assert_eq!(cluster.leader().await.expect("leader"), None);
    assert!(cluster.try_lead("a", LEASE).await.expect("a leads again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_passes_the_owner_at_its_epoch_only() {
    let Some((db, cluster)) = setup().await else {
        return;
    };
    cluster.init_slots(4).await.expect("init");
    assign(&cluster, 0, "a").await;
    let one = assign(&cluster, 1, "a").await;
    ensure_active(&cluster, "b").await;
    assert!(cluster
        .cas_slot(&one, &row(1, Some("b"), 2, SlotState::Active))
        .await
        .expect("move 1 to b"));

    let fence = |node: &'static str, slots: Vec<(u32, u64)>| {
        let pool = cluster.pool().clone();
        async move {
            let mut tx = pool.begin().await.expect("begin");
            let result = check_fence(&mut tx, node, &slots).await;
            tx.rollback().await.expect("rollback");
            result
        }
    };
    fence("a", vec![(0, 1)]).await.expect("a owns 0 at 1");
    fence("b", vec![(1, 2)]).await.expect("b owns 1 at 2");
    fence("a", vec![]).await.expect("nothing to check");
    fence("b", vec![(1, 2), (1, 2)])
        .await
        .expect("listed twice");

    let fenced = |result: Result<(), ClusterDbError>| match result {
        Err(ClusterDbError::Fenced(f)) => f,
        other => panic!("expected Fenced, got {other:?}"),
    };
    // A stale epoch: a still thinks it owns slot 1 at epoch 1.
    assert_eq!(
        fenced(fence("a", vec![(0, 1), (1, 1)]).await),
        Fenced {
            slot: 1,
            expected_epoch: 1,
            found_owner: Some("b".into()),
            found_epoch: Some(2),
        }
    );
    // The right epoch but the wrong owner.
    assert_eq!(
        fenced(fence("b", vec![(0, 1)]).await),
        Fenced {
            slot: 0,
            expected_epoch: 1,
            found_owner: Some("a".into()),
            found_epoch: Some(1),
        }
    );
    // A future epoch is as wrong as a past one.
    assert_eq!(fenced(fence("a", vec![(0, 2)]).await).found_epoch, Some(1));
    // Unassigned, and no such slot.
    assert_eq!(
        fenced(fence("a", vec![(3, 0)]).await),
        Fenced {
            slot: 3,
            expected_epoch: 0,
            found_owner: None,
            found_epoch: Some(0),
        }
    );
    assert_eq!(
        fenced(fence("a", vec![(99, 1)]).await),
        Fenced {
            slot: 99,
            expected_epoch: 1,
            found_owner: None,
            found_epoch: None,
        }
    );

    // The fence holds until the transaction ends: a handover cannot commit in between, and once
    // it has, the old owner's next transaction is fenced.
    // (The handover runs with a short lease, hence a short lock_timeout.)
    let taker = ClusterDb::connect(&db.url, 1, Duration::from_secs(1))
        .await
        .expect("connect");
    let mut tx = cluster.pool().begin().await.expect("begin");
    check_fence(&mut tx, "a", &[(0, 1)])
        .await
        .expect("a owns 0");
    let owned = row(0, Some("a"), 1, SlotState::Active);
    let handed = row(0, Some("b"), 2, SlotState::Active);
    let err = taker
        .cas_slot(&owned, &handed)
        .await
        .expect_err("handover meets the fence's lock");
    assert!(matches!(err, ClusterDbError::LockTimeout), "{err:?}");
    tx.commit().await.expect("the fenced write commits");
    assert!(taker.cas_slot(&owned, &handed).await.expect("handover"));
    assert_eq!(fenced(fence("a", vec![(0, 1)]).await).found_epoch, Some(2));
}

/// DESIGN.md § 6, "a paused node holds its locks": a node stopped in the middle of an archive
/// transaction keeps its `FOR SHARE` on the slot row. Postgres must end that transaction
/// (`idle_in_transaction_session_timeout`) so the takeover goes through, and the takeover must
/// fail fast (`lock_timeout`) rather than hang while the lock is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_nodes_open_transaction_cannot_block_a_takeover() {
    let Some((db, _cluster)) = setup().await else {
        return;
    };
    let lease = Duration::from_secs(4);
    let paused = ClusterDb::connect(&db.url, 1, lease)
        .await
        .expect("connect a");
    let taker = ClusterDb::connect(&db.url, 2, lease)
        .await
        .expect("connect b");
    let timeouts = paused.timeouts();
    assert_eq!(timeouts.idle_in_transaction, Duration::from_secs(2));
    assert_eq!(taker.timeouts().lock, Duration::from_secs(1));
    taker.init_slots(2).await.expect("init");
    let owned = assign(&taker, 0, "a").await;
    ensure_active(&taker, "b").await;

    // a is inside its archive transaction, holding the fence, and then stops dead.
    let mut zombie = paused.pool().begin().await.expect("begin");
    check_fence(&mut zombie, "a", &[(0, 1)])
        .await
        .expect("a owns 0");
    let idle_since = Instant::now();

    // b's takeover while the lock is held: an error after lock_timeout, not a hang.
    let handed = row(0, Some("b"), 2, SlotState::Active);
    let started = Instant::now();
    let err = taker
        .cas_slot(&owned, &handed)
        .await
        .expect_err("the zombie still holds the row");
    let waited = started.elapsed();
    assert!(matches!(err, ClusterDbError::LockTimeout), "{err:?}");
    assert!(
        waited < timeouts.idle_in_transaction,
        "a takeover waited {waited:?} on a held lock"
    );

    // Retrying, the takeover goes through once Postgres has ended the zombie's transaction.
    let deadline = timeouts.idle_in_transaction + taker.timeouts().lock + Duration::from_secs(2);
    loop {
        match taker.cas_slot(&owned, &handed).await {
            Ok(true) => break,
            Ok(false) => panic!("the slot row changed under the zombie"),
            Err(ClusterDbError::LockTimeout) => {}
            Err(e) => panic!("takeover: {e}"),
        }
        assert!(
            idle_since.elapsed() < deadline,
            "the zombie's transaction still blocks the takeover after {deadline:?}"
        );
    }
    let took = idle_since.elapsed();
    assert!(
        took + Duration::from_millis(100) >= timeouts.idle_in_transaction,
        "the takeover went through after {took:?}, before the zombie could have been ended"
    );
    assert_eq!(taker.slot(0).await.expect("slot"), Some(handed));

    // When a wakes up, its transaction is gone: nothing it writes under the old epoch commits.
    let woke = sqlx::query("SELECT 1").execute(&mut *zombie).await;
    assert!(woke.is_err(), "the zombie's session survived: {woke:?}");
    drop(zombie);
    // And its pool recovers with a fresh connection, which the fence now refuses.
    let mut tx = paused.pool().begin().await.expect("begin after the pause");
    let fenced = check_fence(&mut tx, "a", &[(0, 1)]).await;
    assert!(
        matches!(fenced, Err(ClusterDbError::Fenced(_))),
        "{fenced:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_unavailable_not_a_hang() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let started = Instant::now();
    let result = ClusterDb::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        1,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        matches!(result, Err(ClusterDbError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
