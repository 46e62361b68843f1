//! Membership: this node's lease, and its view of the cluster's tables.
//!
//! - [`run_lease`] renews the lease every `cluster.heartbeat`. After each successful renewal the
//!   node may acknowledge until `sent + lease - margin` by its own monotonic clock (`sent` is
//!   when the renewal left, so a slow answer only shortens the window). The database marks the
//!   node dead at `now() + lease` measured when the renewal ran, which is later: the node stops
//!   acknowledging before anyone else may consider it dead (self-fencing). A node that regains
//!   its lease after a lapse reclaims its slots at a new epoch before acknowledging again.
//! - [`run_view`] re-reads `nodes` and `slot_owners` every heartbeat, keeps this node's slot gates
//!   in step with them, and follows its own state when an operator changes it on another node.
//! - [`record_archive_durability`]: a node configured `durability = "archive"` is stored `local`
//!   until its archive backlog has been empty once (what its log recovered may have been
//!   acknowledged under `local`); then its row says `archive`, and its slots may be failed over
//!   without reserved seqs.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use ferry_shards::gate::{GateState, Gates};
use ferry_shards::ownership::NodeState;

use super::db::{ClusterDb, Durability};
use super::{Cluster, View};
use crate::metrics as m;

/// How much of the lease the node gives up as a safety margin (a quarter).
pub fn lease_margin(lease: Duration) -> Duration {
    lease / 4
}

/// Renews this node's lease until `stop`; see the module docs.
pub async fn run_lease(
    db: ClusterDb,
    gates: std::sync::Arc<Gates>,
    node_id: String,
    incarnation: u64,
    heartbeat: Duration,
    lease: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let margin = lease_margin(lease);
    let mut lapsed = false;
    loop {
        let sent = Instant::now();
        let valid_before = gates.lease_valid();
        if !valid_before && !lapsed {
            lapsed = true;
            tracing::warn!(node = %node_id, "lease ran out: no longer acknowledging appends until it is renewed");
        }
        let renewed = tokio::time::timeout(heartbeat, db.renew(&node_id, incarnation, lease)).await;
        metrics::histogram!(m::LEASE_RENEW_SECONDS).record(sent.elapsed().as_secs_f64());
        match renewed {
            Ok(Ok(true)) => {
                if lapsed {
                    // The slots may have been looked at by others meanwhile: take them back at
                    // a new epoch, so anything still in flight from before is refused by the
                    // fenced archive.
                    match db.reclaim(&node_id).await {
                        Ok(rows) => {
                            // Slots that are no longer this node's (failed over while it was
                            // away) close before the window reopens; the view lets go of what
                            // this node still holds of them.
                            for slot in gates.owned() {
                                if !rows.iter().any(|r| r.slot == slot) {
                                    tracing::warn!(slot, "slot failed over while the lease had lapsed; no longer serving it");
                                    // Taken at a later epoch: what this node wrote before may
                                    // only be restored, never archived by it.
                                    gates.mark_lost(slot, gates.epoch(slot) + 1);
                                    gates.set_not_owned(slot, gates.epoch(slot));
                                }
                            }
                            for row in &rows {
                                if gates.state(row.slot) != GateState::Holding {
                                    gates.set_serving(row.slot, row.epoch);
                                }
                            }
                            tracing::info!(node = %node_id, slots = rows.len(), "lease regained; slots reclaimed at a new epoch");
                            lapsed = false;
                            gates.extend_lease(sent + lease - margin);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "lease renewed but the slots could not be reclaimed yet");
                        }
                    }
                } else {
                    gates.extend_lease(sent + lease - margin);
                }
            }
            Ok(Ok(false)) => {
                gates.revoke_lease();
                tracing::error!(node = %node_id, incarnation, "a newer incarnation of this node id holds the membership row; this process acknowledges nothing more");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease renewal failed");
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = heartbeat.as_millis() as u64,
                    "lease renewal timed out"
                );
            }
        }
        let next = tokio::time::Instant::from_std(sent + heartbeat);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = super::stopped(&mut stop) => return,
        }
    }
}

/// Re-reads the tables every heartbeat until `stop`; see the module docs.
pub async fn run_view(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let heartbeat = cluster.config().heartbeat;
    loop {
        refresh_view(&cluster).await;
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = super::stopped(&mut stop) => return,
        }
    }
}

/// One read of `nodes` and `slot_owners`; gates and own state follow it.
pub async fn refresh_view(cluster: &Cluster) {
    let (nodes, slots) = match tokio::join!(cluster.db().nodes(), cluster.db().slots()) {
        (Ok(nodes), Ok(slots)) => (nodes, slots),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "cluster view refresh failed");
            return;
        }
    };
    for state in [
        NodeState::Joining,
        NodeState::Active,
        NodeState::Draining,
        NodeState::Drained,
        NodeState::Left,
        NodeState::Dead,
    ] {
        let n = nodes.iter().filter(|r| r.state == state).count();
        metrics::gauge!(m::CLUSTER_NODES, "state" => state.as_str()).set(n as f64);
    }
    if let Some(me) = nodes.iter().find(|n| n.id == cluster.node_id()) {
        let own = cluster.state();
        // An operator drained or undrained this node through another node's admin API.
        let follows = matches!(
            (own, me.state),
            (NodeState::Active, NodeState::Draining | NodeState::Drained)
                | (
                    NodeState::Draining | NodeState::Drained,
                    NodeState::Active | NodeState::Draining | NodeState::Drained
                )
        );
        if follows && own != me.state {
            tracing::info!(from = %own, to = %me.state, "node state changed");
            cluster.set_own_state(me.state);
        }
    }
    let view = View {
        slots,
        nodes: nodes.into_iter().map(|n| (n.id.clone(), n)).collect(),
    };
    for row in &view.slots {
        cluster.sync_gate(row);
    }
    cluster.set_view(view);
}

/// See the module docs. Polls the archive backlog every heartbeat until it is empty, then stores
/// `archive` for this incarnation; returns then, or at `stop`, or if a newer incarnation holds
/// the row. While the backlog is not empty the row keeps saying `local`, which only makes a
/// failover of this node ask for reserved seqs.
pub async fn record_archive_durability(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let heartbeat = cluster.config().heartbeat;
    loop {
        let (records, _) = cluster.node().archive_backlog();
        if records == 0 {
            match cluster
                .db()
                .set_durability(
                    cluster.node_id(),
                    cluster.incarnation(),
                    Durability::Archive,
                )
                .await
            {
                Ok(true) => {
                    tracing::info!("durability archive recorded: nothing this node acknowledged is only on its disk");
                    return;
                }
                Ok(false) => return,
                Err(e) => tracing::debug!(error = %e, "cannot record durability archive yet"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = super::stopped(&mut stop) => return,
        }
    }
}
