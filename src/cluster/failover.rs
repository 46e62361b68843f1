//! Failover: handing a dead node's slots to the live nodes, without its data. An operator asks for
//! it (`POST /admin/nodes/{id}/failover`, `ferry admin failover NODE`: [`fail_over_node`]); with
//! `cluster.failover = "auto"` the leader does it in every round ([`fail_over_pass`], called by
//! the rebalancer).
//!
//! When it is allowed ([`check`]):
//! - only a node whose lease has expired (database clock) is failed over: lease expiry is the only
//!   authority, and [`ClusterDb::failover_slot`](super::db::ClusterDb::failover_slot) checks it
//!   again, row-locked, in the transaction that takes each slot;
//! - a node that ran `durability = "archive"` acknowledged nothing that is not in SQL: its slots
//!   go as they are (no seqs reserved). A node that ran `durability = "local"` may hold
//!   acknowledged messages only on its disk: each failover of one of its slots reserves, in every
//!   conversation of the slot, the next `max_unarchived` seqs (its own setting, from its row)
//!   after the highest archived one for them (PROTOCOL, "Node loss"; `super::reserve`). Should
//!   the node come back with its data dir, it writes them there (`super::restore`).
//!
//! Each slot goes to its desired owner on the hash ring over the alive, active nodes
//! (`ownership::plan_failover`), so the next rebalance leaves it there; no data moves, so
//! `max_moves` does not apply. The receiver serves the slot at the new epoch and loads each
//! conversation from SQL; the dead node, should it come back, finds the slot owned by another
//! node at a higher epoch: its reclaim does not touch it, and what its WAL holds for it is
//! dropped at start if the archive has it, and kept for restore otherwise.

use std::time::Duration;

use serde::Serialize;

use ferry_shards::ownership::{self, Change, Refusal, SlotRow};
use ferry_shards::placement::DEFAULT_VNODES;

use super::db::{ClusterDbError, Durability, NodeRecord};
use super::Cluster;
use crate::metrics as m;

/// One slot failed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotFailover {
    pub slot: u32,
    /// The node that owns it now.
    pub to: String,
    /// Its epoch now (the dead owner's + 1).
    pub epoch: u64,
}

/// Why a node's slots are not failed over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    #[error("no node {0:?} in this cluster")]
    UnknownNode(String),
    #[error(
        "node {0:?} is alive (its lease has not expired): only a dead node's slots are failed \
         over; to move a live node's slots, drain it"
    )]
    Alive(String),
    #[error("no other alive, active node could take the slots of {0:?}")]
    NoReceiver(String),
    #[error("cluster database unavailable: {0}")]
    Unavailable(String),
}

impl FailoverError {
    /// The `detail` of the admin API's error answer: which refusal it is, for scripts.
    pub fn detail(&self) -> &'static str {
        match self {
            FailoverError::UnknownNode(_) => "unknown_node",
            FailoverError::Alive(_) => "node_alive",
            FailoverError::NoReceiver(_) => "no_receiver",
            FailoverError::Unavailable(_) => "unavailable",
        }
    }
}

/// What one pass over a dead node's slots did.
#[derive(Debug, Default)]
pub struct Pass {
    pub moves: Vec<SlotFailover>,
    /// Slots of the node that are still its own: their row changed since it was read or was
    /// locked by another session (a paused node's archive transaction), or no node could receive
    /// them. Another pass may take them.
    pub remaining: usize,
    /// The node's lease was valid again at the time of a write: it came back, and keeps what it
    /// still owns.
    pub came_back: bool,
}

/// Whether `node`'s slots may be failed over now, judged from its row (the write checks again).
pub fn check(node: &NodeRecord) -> Result<(), FailoverError> {
    if node.alive {
        return Err(FailoverError::Alive(node.id.clone()));
    }
    Ok(())
}

/// Seqs per conversation a failover of `node`'s slots reserves for what it may have
/// acknowledged: none if it ran `archive` (everything it acknowledged is in SQL), its
/// `max_unarchived` otherwise. The write refuses 0 for a node whose row says `local`, should it
/// have restarted with `local` since this read.
pub fn reserve_for(node: &NodeRecord) -> u64 {
    match node.durability {
        Durability::Archive => 0,
        Durability::Local => node.max_unarchived.max(1),
    }
}

/// One pass: every slot `rows` gives to `dead` (its row allowed by [`check`]) is failed over to
/// its desired owner, each by its own transaction. `nodes` and `rows` are a recent read of the
/// tables; a slot whose row changed since is left for the next pass.
pub async fn fail_over_pass(
    cluster: &Cluster,
    nodes: &[NodeRecord],
    rows: &[SlotRow],
    dead: &str,
) -> Result<Pass, FailoverError> {
    let views = super::node_views(nodes);
    let owned = rows
        .iter()
        .filter(|row| row.owner.as_deref() == Some(dead))
        .count();
    let reserve = nodes.iter().find(|n| n.id == dead).map_or(0, reserve_for);
    let plan = ownership::plan_failover(rows, &views, dead, DEFAULT_VNODES);
    let mut pass = Pass::default();
    for (slot, change) in plan {
        let Some(row) = rows.get(slot as usize) else {
            continue;
        };
        let Ok(next) = ownership::apply(row, &change, &views) else {
            continue;
        };
        match cluster.db().failover_slot(row, &next, reserve).await {
            Ok(true) => {
                let Change::Failover { to } = change else {
                    continue;
                };
                metrics::counter!(m::SLOT_MOVES_TOTAL, "result" => "failover").increment(1);
                tracing::info!(slot, from = %dead, to = %to, epoch = next.epoch, reserve, "slot failed over");
                if to == cluster.node_id() {
                    cluster.sync_gate(&next);
                }
                // The receiver starts serving it, and every other live node routes to it at
                // once instead of at its next view refresh.
                for n in nodes
                    .iter()
                    .filter(|n| n.alive && n.id != cluster.node_id())
                {
                    super::rebalancer::hint(cluster, &n.advertise_url, slot);
                }
                pass.moves.push(SlotFailover {
                    slot,
                    to,
                    epoch: next.epoch,
                });
            }
            // Changed since the read (another failover won, or the node came back and
            // reclaimed it), or locked by another session: the next pass reads it again.
            Ok(false) | Err(ClusterDbError::LockTimeout) => {}
            Err(ClusterDbError::Denied(Refusal::OwnerAlive { .. })) => {
                pass.came_back = true;
                break;
            }
            // The receiver can no longer receive: the next pass places the slot elsewhere.
            Err(ClusterDbError::Denied(refusal)) => {
                tracing::debug!(slot, error = %refusal, "failover refused at write time");
            }
            Err(ClusterDbError::Refused(why)) => {
                // The row says local now (a restart with another setting between read and write).
                tracing::info!(slot, node = %dead, reason = %why, "failover refused");
                break;
            }
            Err(e) => return Err(FailoverError::Unavailable(e.to_string())),
        }
    }
    pass.remaining = owned - pass.moves.len();
    Ok(pass)
}

/// `POST /admin/nodes/{id}/failover`: fails over every slot of `id`, if [`check`] allows it,
/// pass after pass until none is left, the node comes back, or `within` has passed (a paused
/// node's open transaction holds a slot's row until Postgres ends it, half a lease at most).
/// Returns the slots it moved and how many `id` still owns.
pub async fn fail_over_node(
    cluster: &Cluster,
    id: &str,
    within: Duration,
) -> Result<(Vec<SlotFailover>, usize), FailoverError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut moves = Vec::new();
    loop {
        let (nodes, rows) = match tokio::join!(cluster.db().nodes(), cluster.db().slots()) {
            (Ok(nodes), Ok(rows)) => (nodes, rows),
            (Err(e), _) | (_, Err(e)) => return Err(FailoverError::Unavailable(e.to_string())),
        };
        let node = nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| FailoverError::UnknownNode(id.to_owned()))?;
        let owned = rows
            .iter()
            .filter(|row| row.owner.as_deref() == Some(id))
            .count();
        if owned == 0 {
            return Ok((moves, 0));
        }
        let receiver = nodes
            .iter()
            .any(|n| n.alive && n.state == ferry_shards::ownership::NodeState::Active);
        if let Err(e) = check(node).and_then(|()| {
            receiver
                .then_some(())
                .ok_or_else(|| FailoverError::NoReceiver(id.to_owned()))
        }) {
            // Came back (or restarted with local) after some of its slots went: report those.
            if moves.is_empty() {
                return Err(e);
            }
            return Ok((moves, owned));
        }
        let pass = fail_over_pass(cluster, &nodes, &rows, id).await?;
        let progressed = !pass.moves.is_empty();
        moves.extend(pass.moves);
        if pass.remaining == 0 {
            return Ok((moves, 0));
        }
        if pass.came_back || tokio::time::Instant::now() >= deadline {
            return Ok((moves, pass.remaining));
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
