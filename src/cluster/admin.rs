//! The admin API for the whole cluster, from any node: status and slots (the tables from
//! Postgres, each node's own counters from that node over the node-to-node API), drain,
//! undrain and rebalance (written to the tables; the rebalancer carries them out), and failover
//! (carried out by the answering node, see [`super::failover`]).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use ferry_shards::ownership::{Change, NodeState, SlotState};
use ferry_shards::record::format_rfc3339_millis;

use super::db::NodeRecord;
use super::failover::{self, FailoverError};
use super::{slot_state_name, Cluster, View};
use crate::admin::{
    node_view, slot_views, AdminState, ClusterView, FailoverBody, NodeView, RebalanceBody,
    SlotMove, SlotView,
};
use crate::http::error::ApiError;

/// What a node says about itself (`/internal/v1/stats`).
#[derive(Serialize, Deserialize)]
pub struct NodeStats {
    pub node: NodeView,
    /// This node's view of every slot, with its counters for the slots it serves.
    pub slots: Vec<SlotView>,
}

/// This node's own counters.
pub fn local_stats(state: &AdminState) -> NodeStats {
    let slots = slot_views(state);
    NodeStats {
        node: node_view(state, &slots),
        slots,
    }
}

async fn stats_of(cluster: &Cluster, node: &NodeRecord) -> Option<NodeStats> {
    let body = serde_json::json!({});
    let call =
        cluster
            .peers()
            .post::<_, NodeStats>(&node.advertise_url, "/internal/v1/stats", &body);
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(stats)) => Some(stats),
        _ => None,
    }
}

async fn read_tables(cluster: &Cluster) -> View {
    match tokio::join!(cluster.db().nodes(), cluster.db().slots()) {
        (Ok(nodes), Ok(slots)) => View {
            slots,
            nodes: nodes.into_iter().map(|n| (n.id.clone(), n)).collect(),
        },
        // Postgres is away: what this node read last.
        _ => cluster.view(),
    }
}

pub async fn snapshot(state: &AdminState, cluster: &Cluster) -> (ClusterView, Vec<SlotView>) {
    let (view, failovers, reserved) = tokio::join!(
        read_tables(cluster),
        cluster.db().last_failover_epochs(),
        cluster.db().reservation_totals()
    );
    let failovers = failovers.unwrap_or_default();
    let reserved: HashMap<u32, crate::admin::ReservedView> = reserved
        .unwrap_or_default()
        .into_iter()
        .map(|(slot, conversations, seqs, restored)| {
            let view = crate::admin::ReservedView {
                conversations,
                seqs,
                restored,
            };
            (slot, view)
        })
        .collect();
    let mut records: Vec<&NodeRecord> = view.nodes.values().collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    let stats: Vec<Option<NodeStats>> = join_all(records.iter().map(|n| async move {
        if n.id == cluster.node_id() {
            Some(local_stats(state))
        } else if n.alive {
            stats_of(cluster, n).await
        } else {
            None
        }
    }))
    .await;
    let by_node: HashMap<&str, &NodeStats> = records
        .iter()
        .zip(&stats)
        .filter_map(|(n, s)| s.as_ref().map(|s| (n.id.as_str(), s)))
        .collect();
    let slots: Vec<SlotView> = view
        .slots
        .iter()
        .map(|row| {
            let counters = row
                .owner
                .as_deref()
                .and_then(|o| by_node.get(o))
                .and_then(|s| s.slots.get(row.slot as usize));
            SlotView {
                slot: row.slot,
                owner: row.owner.clone(),
                epoch: row.epoch,
                state: slot_state_name(row, &view).into(),
                target: match &row.state {
                    SlotState::Moving { target } => Some(target.clone()),
                    SlotState::Active => None,
                },
                last_failover_epoch: failovers.get(&row.slot).copied(),
                reserved: reserved.get(&row.slot).cloned(),
                conversations: counters.map_or(0, |c| c.conversations),
                appends_total: counters.map_or(0, |c| c.appends_total),
                appends_per_sec: counters.map_or(0.0, |c| c.appends_per_sec),
            }
        })
        .collect();
    let nodes = records
        .iter()
        .map(|n| {
            let own = by_node.get(n.id.as_str());
            let owned: Vec<&SlotView> = slots
                .iter()
                .filter(|s| s.owner.as_deref() == Some(n.id.as_str()))
                .collect();
            let state = if n.alive { n.state } else { dead_or(n.state) };
            NodeView {
                id: n.id.clone(),
                state: state.as_str().into(),
                ready: n.alive && n.state == NodeState::Active && own.is_some_and(|s| s.node.ready),
                listen: own.map(|s| s.node.listen.clone()).unwrap_or_default(),
                admin: own.map(|s| s.node.admin.clone()).unwrap_or_default(),
                advertise_url: n.advertise_url.clone(),
                last_heartbeat: Some(format_rfc3339_millis(n.last_heartbeat_ms)),
                slots: owned.len(),
                conversations: owned.iter().map(|s| s.conversations).sum(),
                // `+ 0.0`: an empty f64 sum is -0.0, which prints as "-0.0".
                appends_per_sec: owned.iter().map(|s| s.appends_per_sec).sum::<f64>() + 0.0,
                archive_backlog_records: own.map_or(0, |s| s.node.archive_backlog_records),
                archive_backlog_bytes: own.map_or(0, |s| s.node.archive_backlog_bytes),
                started_at: format_rfc3339_millis(n.started_at_ms),
            }
        })
        .collect();
    let count = |name: &str| slots.iter().filter(|s| s.state == name).count();
    let cluster_view = ClusterView {
        mode: "cluster",
        node: cluster.node_id().to_owned(),
        slot_count: cluster.slot_count(),
        unassigned_slots: count("unassigned"),
        moving_slots: count("moving"),
        unavailable_slots: count("unavailable"),
        nodes,
    };
    (cluster_view, slots)
}

/// A node whose lease expired reads `dead`, unless it left or was drained on purpose.
fn dead_or(state: NodeState) -> NodeState {
    match state {
        NodeState::Left | NodeState::Drained => state,
        _ => NodeState::Dead,
    }
}

async fn node_record(
    cluster: &Cluster,
    id: &str,
) -> Result<(NodeRecord, Vec<NodeRecord>), ApiError> {
    let nodes = cluster
        .db()
        .nodes()
        .await
        .map_err(|e| ApiError::unavailable(format!("cluster database unavailable: {e}")))?;
    let node = nodes
        .iter()
        .find(|n| n.id == id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no node {id:?} in this cluster")))?;
    Ok((node, nodes))
}

async fn answer_for(state: &AdminState, cluster: &Cluster, id: &str) -> Result<NodeView, ApiError> {
    let (view, _) = snapshot(state, cluster).await;
    view.nodes
        .into_iter()
        .find(|n| n.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no node {id:?} in this cluster")))
}

/// `POST /admin/nodes/{id}/drain`: the node's slots start moving to the active nodes.
pub async fn drain(state: &AdminState, cluster: &Cluster, id: &str) -> Result<NodeView, ApiError> {
    let (node, nodes) = node_record(cluster, id).await?;
    if !matches!(node.state, NodeState::Draining | NodeState::Drained) {
        let others = nodes
            .iter()
            .any(|n| n.id != node.id && n.alive && n.state == NodeState::Active);
        if !others {
            return Err(ApiError::conflict(format!(
                "no other active node could take the slots of {id:?}"
            )));
        }
        let from = [NodeState::Active, NodeState::Joining];
        let changed = cluster
            .db()
            .set_state(id, &from, NodeState::Draining)
            .await
            .map_err(|e| ApiError::unavailable(format!("cluster database unavailable: {e}")))?;
        if !changed {
            return Err(ApiError::conflict(format!(
                "node {id:?} is {} and cannot be drained",
                node.state
            )));
        }
        tracing::info!(node = %id, "drain requested");
    }
    super::membership::refresh_view(cluster).await;
    cluster.kick();
    answer_for(state, cluster, id).await
}

/// `POST /admin/nodes/{id}/undrain`: the node takes part in placement again.
pub async fn undrain(
    state: &AdminState,
    cluster: &Cluster,
    id: &str,
) -> Result<NodeView, ApiError> {
    let (node, _) = node_record(cluster, id).await?;
    if node.state != NodeState::Active {
        let from = [NodeState::Draining, NodeState::Drained, NodeState::Left];
        let changed = cluster
            .db()
            .set_state(id, &from, NodeState::Active)
            .await
            .map_err(|e| ApiError::unavailable(format!("cluster database unavailable: {e}")))?;
        if !changed {
            return Err(ApiError::conflict(format!(
                "node {id:?} is {} and cannot be undrained",
                node.state
            )));
        }
        tracing::info!(node = %id, "undrain requested");
    }
    super::membership::refresh_view(cluster).await;
    cluster.kick();
    answer_for(state, cluster, id).await
}

/// `POST /admin/rebalance`: the moves toward the ring's placement the rebalancer starts now.
pub async fn rebalance(cluster: &Cluster) -> Result<RebalanceBody, ApiError> {
    let view = read_tables(cluster).await;
    let nodes: Vec<NodeRecord> = view.nodes.values().cloned().collect();
    let planned = super::rebalancer::planned(&view.slots, &nodes, cluster.config().max_moves);
    let moves: Vec<SlotMove> = planned
        .iter()
        .filter_map(|(slot, change)| {
            let row = view.slots.get(*slot as usize)?;
            let to = match change {
                Change::Assign { to } => to.clone(),
                Change::BeginMove { target } => target.clone(),
                _ => return None,
            };
            Some(SlotMove {
                slot: *slot,
                from: row.owner.clone(),
                to,
            })
        })
        .collect();
    cluster.kick();
    let message = if moves.is_empty() {
        "placement already matches the ring over the active nodes".to_owned()
    } else {
        format!(
            "{} slot moves toward the ring's placement (at most {} at once)",
            moves.len(),
            cluster.config().max_moves
        )
    };
    Ok(RebalanceBody { moves, message })
}

/// `POST /admin/nodes/{id}/failover`: every slot of a dead node goes to its desired owner on the
/// ring at epoch + 1 (with seqs reserved for what it may have acknowledged if it ran `local`).
pub async fn failover(cluster: &Cluster, id: &str) -> Result<FailoverBody, ApiError> {
    // A paused node's archive transaction holds a slot row until Postgres ends it (half a lease).
    let within = cluster.config().lease;
    let result = failover::fail_over_node(cluster, id, within).await;
    let (moves, remaining) = result.map_err(|e| match e {
        FailoverError::UnknownNode(_) => ApiError::not_found(e.to_string()),
        FailoverError::Alive(_) | FailoverError::NoReceiver(_) => {
            tracing::info!(node = %id, reason = %e, "failover refused");
            let mut conflict = ApiError::conflict(e.to_string());
            conflict.reason = Some(e.detail());
            conflict
        }
        FailoverError::Unavailable(_) => ApiError::unavailable(e.to_string()),
    })?;
    super::membership::refresh_view(cluster).await;
    cluster.kick();
    let message = match (moves.len(), remaining) {
        (0, 0) => format!("{id} owns no slot: nothing to fail over"),
        (n, 0) => format!("{n} slots of {id} failed over to the live nodes"),
        (n, left) => format!(
            "{n} slots of {id} failed over; {left} could not be taken now (changed or locked \
             meanwhile, or {id} came back): ask again"
        ),
    };
    tracing::info!(node = %id, slots = moves.len(), remaining, "failover requested");
    Ok(FailoverBody {
        node: id.to_owned(),
        moves,
        message,
    })
}
