//! # The cluster
//!
//! Several `ferry serve` processes on one Postgres and one Redis form a cluster. Postgres holds
//! the truth — membership with leases ([`db`]: `nodes`), fenced slot ownership (`slot_owners`,
//! changed only by compare-and-swap, see `ferry_shards::ownership`) and the rebalancer's leader
//! row; Redis carries only live fan-out ([`fanout`]).
//!
//! ## Layout
//! - [`db`]: the Postgres statements (database clock only).
//! - [`membership`]: the lease loop (self-fencing), the view of nodes and slots, and keeping this
//!   node's slot gates in step with the table.
//! - [`handover`]: moving a slot this node owns to another node (hold, finish in-flight, archive
//!   the tail, compare-and-swap to the new owner at epoch + 1).
//! - [`rebalancer`]: the one leader that plans moves toward the hash-ring placement (drains,
//!   joins, rebalances) and asks owners to carry them out; with `cluster.failover = "auto"` it
//!   also fails over dead nodes.
//! - [`failover`]: handing a dead node's slots to the live nodes (when that is allowed).
//! - [`peer`] and [`internal`]: the node-to-node API (client and server) on the admin listener,
//!   authenticated with the cluster secret only.
//! - [`fanout`]: live messages and events through Redis, with gap fill from the owner.
//! - [`admin`]: the admin API's answers and actions for the whole cluster.
//!
//! ## Invariants
//! - A node takes appends for a slot only while the table says it owns the slot, its gate is
//!   serving and its lease (its own monotonic clock, minus a margin) has not run out.
//! - A slot leaves its owner only after nothing of it is in flight and its tail is archived.
//! - Every archive write checks owner and epoch inside its transaction.

pub mod admin;
pub mod db;
pub mod failover;
pub mod fanout;
pub mod handover;
pub mod internal;
pub mod membership;
pub mod peer;
pub mod rebalancer;
pub mod reserve;
pub mod restore;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

use ferry_shards::node::{Node, TryAgainReason};
use ferry_shards::ownership::{NodeState, NodeView, SlotRow, SlotState};

use crate::config::ClusterSection;
use db::{ClusterDb, NodeRecord};
use fanout::Fanout;
use peer::PeerClient;

/// Where a request for a slot goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns the slot (serving or holding it).
    Local,
    /// Another node owns it: forward to `url` naming `epoch`.
    Remote {
        node: String,
        url: String,
        epoch: u64,
    },
    /// Nobody can take appends for it now.
    Unavailable(TryAgainReason),
    /// The view says this node owns it but the gate does not (yet): refresh the slot and retry.
    Stale,
}

/// The cluster's tables as this node last read them.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub slots: Vec<SlotRow>,
    pub nodes: HashMap<String, NodeRecord>,
}

impl View {
    pub fn node_views(&self) -> Vec<NodeView> {
        node_views(self.nodes.values())
    }
}

/// What the state machine and placement need of the nodes, ordered by id.
pub fn node_views<'a>(nodes: impl IntoIterator<Item = &'a NodeRecord>) -> Vec<NodeView> {
    let mut views: Vec<NodeView> = nodes
        .into_iter()
        .map(|n| NodeView {
            id: n.id.clone(),
            state: n.state,
            alive: n.alive,
        })
        .collect();
    views.sort_by(|a, b| a.id.cmp(&b.id));
    views
}

/// The cloneable handle to this node's cluster membership.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    advertise_url: String,
    config: ClusterSection,
    slot_count: u32,
    db: ClusterDb,
    node: Node,
    peers: PeerClient,
    fanout: Fanout,
    view: RwLock<View>,
    /// This node's own membership state (what it last wrote).
    state: Mutex<NodeState>,
    incarnation: u64,
    /// Slots this node is handing over right now.
    moving: Mutex<HashSet<u32>>,
    /// This node put itself into `draining` (SIGTERM), as opposed to an operator's drain: if the
    /// drain cannot finish, it is undone on the way out, so the node comes back `active`.
    self_drained: std::sync::atomic::AtomicBool,
    /// Wakes the rebalancer at once (a drain, an undrain, a rebalance request).
    kick: Notify,
    /// This node holds the leader row (it rebalances, and it alone compacts).
    leading: Arc<std::sync::atomic::AtomicBool>,
}

impl Cluster {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: String,
        advertise_url: String,
        secret: String,
        config: ClusterSection,
        slot_count: u32,
        db: ClusterDb,
        node: Node,
        fanout: Fanout,
        incarnation: u64,
        state: NodeState,
    ) -> Cluster {
        let peers = PeerClient::new(secret, config.move_hold + Duration::from_secs(10));
        Cluster {
            inner: Arc::new(Inner {
                node_id,
                advertise_url,
                config,
                slot_count,
                db,
                node,
                peers,
                fanout,
                view: RwLock::new(View::default()),
                state: Mutex::new(state),
                incarnation,
                moving: Mutex::new(HashSet::new()),
                self_drained: std::sync::atomic::AtomicBool::new(false),
                kick: Notify::new(),
                leading: Arc::default(),
            }),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn advertise_url(&self) -> &str {
        &self.inner.advertise_url
    }

    pub fn config(&self) -> &ClusterSection {
        &self.inner.config
    }

    pub fn slot_count(&self) -> u32 {
        self.inner.slot_count
    }

    pub fn db(&self) -> &ClusterDb {
        &self.inner.db
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub fn peers(&self) -> &PeerClient {
        &self.inner.peers
    }

    pub fn fanout(&self) -> &Fanout {
        &self.inner.fanout
    }

    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    pub fn view(&self) -> View {
        self.inner
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_view(&self, view: View) {
        *self.inner.view.write().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// This node's membership state as it last wrote it.
    pub fn state(&self) -> NodeState {
        *self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_own_state(&self, state: NodeState) {
        *self.inner.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// True while this node leads (see `rebalancer`).
    pub fn leading_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.inner.leading.clone()
    }

    /// Wakes the rebalancer now instead of at its next tick.
    pub fn kick(&self) {
        self.inner.kick.notify_one();
    }

    /// Where a request for `slot` goes now.
    pub fn route(&self, slot: u32) -> Route {
        if self.inner.node.gates().owned_epoch(slot).is_some() {
            return Route::Local;
        }
        let view = self.inner.view.read().unwrap_or_else(|e| e.into_inner());
        let Some(row) = view.slots.get(slot as usize) else {
            return Route::Unavailable(TryAgainReason::OwnerUnavailable);
        };
        match &row.owner {
            None => Route::Unavailable(TryAgainReason::OwnerUnavailable),
            Some(owner) if *owner == self.inner.node_id => Route::Stale,
            Some(owner) => match view.nodes.get(owner) {
                Some(n) if n.alive => Route::Remote {
                    node: owner.clone(),
                    url: n.advertise_url.clone(),
                    epoch: row.epoch,
                },
                _ => Route::Unavailable(TryAgainReason::OwnerUnavailable),
            },
        }
    }

    /// Re-reads one slot's row (and the nodes) and brings this node's gate in step with it.
    /// Used when a peer said "moved", or when a peer hands this node a slot.
    pub async fn refresh_slot(&self, slot: u32) {
        let row = match self.inner.db.slot(slot).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(slot, error = %e, "slot refresh failed");
                return;
            }
        };
        let nodes = self.inner.db.nodes().await.ok();
        {
            let mut view = self.inner.view.write().unwrap_or_else(|e| e.into_inner());
            if let Some(current) = view.slots.get_mut(slot as usize) {
                // Never step back to an older row read earlier by a slower refresh.
                if row.epoch >= current.epoch {
                    *current = row.clone();
                }
            }
            if let Some(nodes) = nodes {
                view.nodes = nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
            }
        }
        self.sync_gate(&row);
    }

    /// Brings the gate of `row.slot` in step with the row, unless a hand-over of that slot is in
    /// progress here (the hand-over owns the gate until it ends).
    fn sync_gate(&self, row: &SlotRow) {
        let gates = self.inner.node.gates();
        let slot = row.slot;
        self.inner.fanout.observe_epoch(slot, row.epoch);
        if self.is_moving(slot) {
            return;
        }
        let mine = row.owner.as_deref() == Some(self.inner.node_id.as_str());
        match (mine, gates.owned_epoch(slot)) {
            (true, Some(epoch)) if epoch == row.epoch => {}
            (true, serving) => {
                if row.epoch >= gates.epoch(slot) {
                    // Not serving it, or the slot was lost since the epoch it is served at:
                    // another node owned it meanwhile, and what this node still holds of it
                    // is stale.
                    if serving.is_none_or(|e| gates.lost_at(slot) > e) {
                        self.inner.node.serve_fresh(slot, row.epoch);
                    }
                    tracing::info!(slot, epoch = row.epoch, "serving slot");
                    gates.set_serving(slot, row.epoch);
                }
            }
            (false, Some(epoch)) => {
                // Another node owns a slot this node still serves: only possible if the slot was
                // taken without this node (a failover, while this node's lease had lapsed). Stop
                // serving it at once; what it still had queued of the slot leaves the archive
                // queue (kept for restore where it may have been acknowledged).
                if row.epoch > epoch {
                    tracing::warn!(slot, epoch, new_owner = ?row.owner, new_epoch = row.epoch, "slot taken by another node; no longer serving it");
                    self.inner.node.lose_slot(slot, row.epoch);
                }
            }
            (false, None) => {
                if row.epoch > gates.epoch(slot) {
                    gates.set_not_owned(slot, row.epoch);
                }
                // Closed when the lease came back without this slot (see `run_lease`): let go
                // of what this node still holds of it.
                self.inner.node.lose_slot(slot, row.epoch);
            }
        }
    }

    fn is_moving(&self, slot: u32) -> bool {
        self.inner
            .moving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&slot)
    }

    /// Marks a hand-over of `slot` as running here; false if one already is.
    fn begin_moving(&self, slot: u32) -> bool {
        self.inner
            .moving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot)
    }

    fn end_moving(&self, slot: u32) {
        self.inner
            .moving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
    }

    /// Slots the last read of the table gives to `node`.
    pub fn slots_of(&self, node: &str) -> usize {
        self.inner
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .slots
            .iter()
            .filter(|r| r.owner.as_deref() == Some(node))
            .count()
    }

    /// The slot's row as last read.
    pub fn slot_row(&self, slot: u32) -> Option<SlotRow> {
        self.inner
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .slots
            .get(slot as usize)
            .cloned()
    }

    /// Turns a joining node `active` (a draining or drained one keeps its state: an operator's
    /// drain survives restarts).
    pub async fn activate(&self) {
        if self.state() != NodeState::Joining {
            tracing::info!(state = %self.state(), "rejoined the cluster; state kept");
            return;
        }
        let mut attempt = 0u32;
        loop {
            match self
                .inner
                .db
                .set_state(
                    &self.inner.node_id,
                    &[NodeState::Joining],
                    NodeState::Active,
                )
                .await
            {
                Ok(_) => {
                    self.set_own_state(NodeState::Active);
                    self.kick();
                    tracing::info!("node active");
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cannot mark this node active yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// SIGTERM: drains this node (its slots move to the other active nodes), waiting up to
    /// `cluster.drain_timeout`. Returns at once when no other active node could take them.
    pub async fn leave(&self) {
        let db = &self.inner.db;
        let me = self.inner.node_id.clone();
        let from = [NodeState::Active, NodeState::Joining];
        match db.set_state(&me, &from, NodeState::Draining).await {
            Ok(changed) => {
                self.inner
                    .self_drained
                    .store(changed, std::sync::atomic::Ordering::SeqCst);
                self.set_own_state(NodeState::Draining);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark this node draining; stopping without a drain");
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.drain_timeout;
        tracing::info!(
            timeout_ms = self.inner.config.drain_timeout.as_millis() as u64,
            "draining: handing this node's slots to the others"
        );
        loop {
            membership::refresh_view(self).await;
            let view = self.view();
            let owned = view
                .slots
                .iter()
                .filter(|r| r.owner.as_deref() == Some(me.as_str()))
                .count();
            if owned == 0 {
                tracing::info!("drained: this node owns no slot");
                return;
            }
            let others = view
                .nodes
                .values()
                .any(|n| n.id != me && n.alive && n.state == NodeState::Active);
            if !others {
                tracing::warn!(slots = owned, "no other active node can take this node's slots; stopping with them (they are unavailable until it returns)");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(slots = owned, "drain timed out; stopping with the slots left (unavailable until this node returns)");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After the node stopped: `left` if it owns nothing (it takes part in placement again when
    /// it starts). A drain of its own that could not finish is undone (the node keeps its slots
    /// and comes back `active`; its lease runs out meanwhile and its slots read unavailable).
    pub async fn left(&self) {
        let me = self.inner.node_id.as_str();
        if let Ok(slots) = self.inner.db.slots().await {
            if slots.iter().any(|r| r.owner.as_deref() == Some(me)) {
                if self
                    .inner
                    .self_drained
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    let _ = self
                        .inner
                        .db
                        .set_state(me, &[NodeState::Draining], NodeState::Active)
                        .await;
                }
                let _ = self.inner.db.resign(me).await;
                return;
            }
            let from = [NodeState::Draining, NodeState::Drained];
            if let Ok(true) = self.inner.db.set_state(me, &from, NodeState::Left).await {
                tracing::info!("left the cluster");
            }
        }
        let _ = self.inner.db.resign(me).await;
    }

    /// Ready for traffic: active, lease valid, WAL healthy.
    pub fn ready(&self) -> bool {
        self.state() == NodeState::Active
            && self.inner.node.gates().lease_valid()
            && self.inner.node.ready()
    }
}

/// Resolves once `stop` turns true (or its sender is gone); holds no borrow across awaits.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The `state` a slot shows in `/admin/slots`.
pub fn slot_state_name(row: &SlotRow, view: &View) -> &'static str {
    let owner_alive = row
        .owner
        .as_ref()
        .and_then(|o| view.nodes.get(o))
        .is_some_and(|n| n.alive);
    match (&row.owner, &row.state) {
        (None, _) => "unassigned",
        (Some(_), _) if !owner_alive => "unavailable",
        (Some(_), SlotState::Moving { .. }) => "moving",
        (Some(_), SlotState::Active) => "active",
    }
}
