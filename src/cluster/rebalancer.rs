//! The rebalancer: one node at a time (the holder of the `cluster_leader` row, renewed like a
//! lease; not an advisory lock) moves slots toward the hash-ring placement over the active nodes.
//!
//! Every heartbeat (or at once when kicked by a drain, an undrain or a rebalance request) the
//! leader reads the tables, marks draining nodes that own nothing as `drained`, asks
//! `ownership::plan` for the next changes, and applies them: unassigned slots are assigned
//! directly; a move is persisted as `moving` (compare-and-swap) and then carried out by the
//! owner ([`super::handover`]), which the leader asks over the node-to-node API. At most
//! `cluster.max_moves` moves run at once. A node that is not `active` never leads.
//!
//! With `cluster.failover = "auto"` each round first fails over the slots of every dead node that
//! ran `durability = "archive"` ([`super::failover`]), as soon as its lease has expired: the
//! leader sees it in its next round. A dead node that ran `local` is left alone (its slots stay
//! unavailable until it returns), which is logged once per node and lapse.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use ferry_shards::ownership::{self, Change, NodeState, SlotRow, SlotState};
use ferry_shards::placement::DEFAULT_VNODES;

use super::db::NodeRecord;
use super::peer::{MoveRequest, PeerError};
use super::Cluster;

/// Runs until `stop`; acts only while this node leads.
pub async fn run(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let in_flight: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let mut leading = false;
    // With `failover = "auto"`: when the next lease of a node that owns slots runs out, so its
    // failover starts then rather than up to a heartbeat later.
    let mut next_expiry: Option<Duration> = None;
    loop {
        let active = cluster.state() == NodeState::Active && cluster.node().gates().lease_valid();
        if active {
            match cluster
                .db()
                .try_lead(cluster.node_id(), cluster.config().lease)
                .await
            {
                Ok(lead) => {
                    if lead != leading {
                        tracing::info!(leading = lead, "rebalancer leadership changed");
                    }
                    leading = lead;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "leader row unavailable");
                    leading = false;
                }
            }
            if leading {
                match step(&cluster, &in_flight).await {
                    Ok(next) => next_expiry = next,
                    Err(e) => tracing::warn!(error = %e, "rebalance step failed"),
                }
            }
        } else if leading {
            let _ = cluster.db().resign(cluster.node_id()).await;
            leading = false;
        }
        cluster
            .inner
            .leading
            .store(leading, std::sync::atomic::Ordering::Relaxed);
        let heartbeat = cluster.config().heartbeat;
        let wait = match next_expiry.take() {
            Some(expiry) if leading => heartbeat.min(expiry + EXPIRY_MARGIN),
            _ => heartbeat,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cluster.inner.kick.notified() => {}
            _ = super::stopped(&mut stop) => {
                if leading {
                    let _ = cluster.db().resign(cluster.node_id()).await;
                }
                return;
            }
        }
    }
}

/// The changes a rebalance would make now (for the admin API's answer).
pub fn planned(rows: &[SlotRow], nodes: &[NodeRecord], max_moves: usize) -> Vec<(u32, Change)> {
    ownership::plan(rows, &super::node_views(nodes), max_moves, DEFAULT_VNODES)
}

/// How long after a lease's expiry (database clock) the leader looks at its node again.
const EXPIRY_MARGIN: Duration = Duration::from_millis(20);

/// One round of the leader's work. Returns, with `failover = "auto"`, how long until the next
/// lease of a live node that owns slots runs out.
async fn step(
    cluster: &Cluster,
    in_flight: &Arc<Mutex<HashSet<u32>>>,
) -> Result<Option<Duration>, String> {
    let db = cluster.db();
    let nodes = db.nodes().await.map_err(|e| e.to_string())?;
    let mut rows = db.slots().await.map_err(|e| e.to_string())?;
    if cluster.config().auto_failover() && auto_failover(cluster, &nodes, &rows).await? {
        rows = db.slots().await.map_err(|e| e.to_string())?;
    }
    // Draining nodes that own nothing any more are drained.
    for n in nodes.iter().filter(|n| n.state == NodeState::Draining) {
        if !rows
            .iter()
            .any(|r| r.owner.as_deref() == Some(n.id.as_str()))
        {
            match db
                .set_state(&n.id, &[NodeState::Draining], NodeState::Drained)
                .await
            {
                Ok(true) => tracing::info!(node = %n.id, "node drained"),
                Ok(false) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    let views = super::node_views(&nodes);
    // Moves persisted earlier whose owner is not working on them for us (this leader restarted,
    // or a previous leader asked): ask again; the owner ignores a move it is already running.
    for row in &rows {
        if let (Some(owner), SlotState::Moving { target }) = (&row.owner, &row.state) {
            let owner_alive = views.iter().any(|v| &v.id == owner && v.alive);
            let target_ok = views
                .iter()
                .any(|v| &v.id == target && v.alive && v.state == NodeState::Active);
            if owner_alive && target_ok {
                request_move(
                    cluster, &nodes, in_flight, row.slot, row.epoch, owner, target,
                );
            }
        }
    }
    let plan = ownership::plan(&rows, &views, cluster.config().max_moves, DEFAULT_VNODES);
    for (slot, change) in plan {
        let Some(row) = rows.get(slot as usize) else {
            continue;
        };
        let next = match ownership::apply(row, &change, &views) {
            Ok(next) => next,
            Err(e) => {
                tracing::debug!(slot, error = %e, "planned change refused");
                continue;
            }
        };
        if !db.cas_slot(row, &next).await.map_err(|e| e.to_string())? {
            continue;
        }
        match (&change, &next.owner) {
            (Change::BeginMove { target }, Some(owner)) => {
                request_move(cluster, &nodes, in_flight, slot, next.epoch, owner, target);
            }
            (Change::Assign { to }, _) => {
                tracing::debug!(slot, node = %to, epoch = next.epoch, "slot assigned");
                if to == cluster.node_id() {
                    cluster.sync_gate(&next);
                } else if let Some(n) = nodes.iter().find(|n| &n.id == to) {
                    hint(cluster, &n.advertise_url, slot);
                }
            }
            _ => {}
        }
    }
    Ok(cluster
        .config()
        .auto_failover()
        .then(|| next_lease_expiry(&nodes, &rows))
        .flatten())
}

/// How long until the first lease of a live node that owns slots runs out (by the database
/// clock at the read).
fn next_lease_expiry(nodes: &[NodeRecord], rows: &[SlotRow]) -> Option<Duration> {
    nodes
        .iter()
        .filter(|n| n.alive)
        .filter(|n| {
            rows.iter()
                .any(|r| r.owner.as_deref() == Some(n.id.as_str()))
        })
        .map(|n| Duration::from_millis(u64::try_from(n.lease_remaining_ms).unwrap_or(0)))
        .min()
}

/// `failover = "auto"`: one failover pass over every dead node that owns slots (with seqs
/// reserved for what it may have acknowledged if it ran `local`). True if some slot changed
/// owner.
async fn auto_failover(
    cluster: &Cluster,
    nodes: &[NodeRecord],
    rows: &[SlotRow],
) -> Result<bool, String> {
    let dead = nodes.iter().filter(|n| !n.alive).filter(|n| {
        rows.iter()
            .any(|r| r.owner.as_deref() == Some(n.id.as_str()))
    });
    let mut changed = false;
    for node in dead {
        let pass = super::failover::fail_over_pass(cluster, nodes, rows, &node.id)
            .await
            .map_err(|e| e.to_string())?;
        if !pass.moves.is_empty() {
            tracing::info!(
                node = %node.id,
                slots = pass.moves.len(),
                remaining = pass.remaining,
                durability = %node.durability,
                reserve = super::failover::reserve_for(node),
                "failed over the slots of a dead node (failover = auto)"
            );
            changed = true;
        }
    }
    Ok(changed)
}

/// Asks `owner` to carry out the move of `slot` (persisted as moving) unless we already did.
fn request_move(
    cluster: &Cluster,
    nodes: &[NodeRecord],
    in_flight: &Arc<Mutex<HashSet<u32>>>,
    slot: u32,
    epoch: u64,
    owner: &str,
    target: &str,
) {
    if !in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(slot)
    {
        return;
    }
    let Some(url) = nodes
        .iter()
        .find(|n| n.id == owner)
        .map(|n| n.advertise_url.clone())
    else {
        in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
        return;
    };
    let cluster = cluster.clone();
    let in_flight = in_flight.clone();
    let request = MoveRequest {
        slot,
        epoch,
        target: target.to_owned(),
    };
    tokio::spawn(async move {
        let result: Result<serde_json::Value, PeerError> = if request_is_local(&cluster, &url) {
            super::handover::move_slot(&cluster, slot, epoch, &request.target)
                .await
                .map(|()| serde_json::Value::Null)
                .map_err(PeerError::Unreachable)
        } else {
            cluster
                .peers()
                .post(&url, "/internal/v1/slots/move", &request)
                .await
        };
        if let Err(e) = result {
            tracing::debug!(slot, error = %e, "slot move request failed");
        }
        in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
        cluster.kick();
    });
}

fn request_is_local(cluster: &Cluster, url: &str) -> bool {
    url == cluster.advertise_url()
}

/// Tells a node to re-read a slot it was just given.
pub(super) fn hint(cluster: &Cluster, url: &str, slot: u32) {
    let peers = cluster.peers().clone();
    let url = url.to_owned();
    tokio::spawn(async move {
        let _ = peers
            .post::<_, serde_json::Value>(
                &url,
                "/internal/v1/slots/refresh",
                &super::peer::SlotHint { slot },
            )
            .await;
    });
}
