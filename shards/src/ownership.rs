//! Slot ownership: the pure state machine behind the cluster's `slot_owners` table.
//!
//! A slot row says who owns the slot (`owner`), under which `epoch`, and whether it is being
//! handed to another node (`Moving { target }`). The database row is the truth; this module only
//! decides, for a row and a requested [`Change`], what the next row is — or why the change is
//! refused. The SQL layer persists a change with a compare-and-swap on the whole old row
//! (`UPDATE … WHERE slot = $s AND epoch = $e AND node_id IS NOT DISTINCT FROM $o AND state = …`),
//! so two actors acting on the same stale row cannot both succeed.
//!
//! Invariants (checked by the model-based property tests at the bottom):
//! - a slot's epoch never goes back;
//! - every change of owner raises the epoch by exactly one, so one `(slot, epoch)` names at most
//!   one owner over the whole history;
//! - a slot is only ever handed to a node that is alive and `active`.
//!
//! `unavailable` is not a stored state: it is how a slot whose owner's lease expired reads
//! ([`slot_status`]). Failover of such a slot is a change of its own (a later step).

use std::fmt;

/// A node's membership state, as stored in the `nodes` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Registered, recovering its log; owns no new slots yet.
    Joining,
    /// Serving; placement puts slots on it.
    Active,
    /// Its slots are moving away; nothing new is placed on it.
    Draining,
    /// Drained by an operator: owns nothing, stays out of placement until undrained.
    Drained,
    /// Drained and stopped (SIGTERM).
    Left,
    /// Its lease expired without a drain.
    Dead,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
            NodeState::Left => "left",
            NodeState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        Some(match s {
            "joining" => NodeState::Joining,
            "active" => NodeState::Active,
            "draining" => NodeState::Draining,
            "drained" => NodeState::Drained,
            "left" => NodeState::Left,
            "dead" => NodeState::Dead,
            _ => return None,
        })
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What placement and the state machine need to know of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub state: NodeState,
    /// Its lease is valid by the database clock.
    pub alive: bool,
}

/// The stored state of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotState {
    Active,
    /// Being handed from `owner` to `target`; the owner still serves it (holding appends).
    Moving { target: String },
}

/// One row of `slot_owners`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotRow {
    pub slot: u32,
    /// `None`: never assigned (a fresh cluster).
    pub owner: Option<String>,
    /// Starts at 0 for an unassigned slot; the first owner gets epoch 1.
    pub epoch: u64,
    pub state: SlotState,
}
