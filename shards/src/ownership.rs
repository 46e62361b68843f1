//! Slot ownership: the pure state machine behind the cluster's `slot_owners` table, and the
//! rebalance planner that drives it.
//!
//! A slot row says who owns the slot (`owner`), under which `epoch`, and whether it is being
//! handed to another node (`Moving { target }`). The database row is the truth; this module only
//! decides, for a row and a requested [`Change`], what the next row is — or why the change is
//! refused ([`apply`]). The SQL layer persists a change with a compare-and-swap on the whole old
//! row (`UPDATE … WHERE slot = $s AND epoch = $e AND node_id IS NOT DISTINCT FROM $o AND state = …`),
//! so two actors acting on the same stale row cannot both succeed. It must also call [`apply`] with
//! the membership read *inside the same transaction* (node rows locked `FOR SHARE`, leases judged
//! by the database clock): a planner's snapshot of the nodes may be stale, and only the check at
//! write time keeps a slot from being handed to a node whose lease has just expired.
//!
//! | change | from | to | also requires |
//! |---|---|---|---|
//! | [`Change::Assign`] | no owner | `to`, epoch + 1, active | `to` alive and active |
//! | [`Change::BeginMove`] | owner, active | same owner and epoch, moving to `target` | owner alive; `target` ≠ owner, alive and active |
//! | [`Change::CompleteMove`] | owner, moving to `target` | `target`, epoch + 1, active | owner alive; `target` alive and active |
//! | [`Change::CancelMove`] | owner, moving | same owner and epoch, active | — |
//! | [`Change::Reclaim`] | owner `node`, any state | same owner, epoch + 1, active | `node` alive |
//! | [`Change::Failover`] | owner, any state | `to`, epoch + 1, active | owner *not* alive; `to` alive and active |
//!
//! Invariants (checked after every step by the model-based property test in `ownership/model.rs`,
//! with stale planners racing each other, lease expiry, crashes and drains):
//! - a slot's epoch never goes back;
//! - every change of owner raises the epoch by exactly one, so one `(slot, epoch)` names at most
//!   one owner over the whole history;
//! - a slot is only ever handed (assigned, moved or failed over) to a node that is alive and
//!   `active` at the time of the write;
//! - a slot leaves a live owner only by a move that owner completes: a live owner's slot is never
//!   failed over.
//!
//! `unavailable` is not a stored state: it is how a slot whose owner's lease expired reads
//! ([`slot_status`]). Only [`Change::Failover`] hands such a slot to another node, and nothing
//! completes a move whose owner's lease lapsed, because the owner may not have shipped its
//! unarchived tail. Whether a dead owner's slots *may* be failed over (it acknowledged nothing
//! that is not in SQL, or its seqs are reserved) is the caller's decision; this module only
//! guarantees that the owner is not alive at the time of the write, and the new epoch fences it
//! should it come back: its [`Change::Reclaim`] names a row that no longer exists.
//!
//! The planner ([`plan`], in `ownership/planner.rs`) proposes changes that move the table toward
//! the hash-ring [`Placement`](crate::placement::Placement) over alive, active nodes, `max_moves`
//! data moves at a time; [`plan_failover`] places a dead node's slots on the same ring.
//!
//! This module does no IO and reads no clock: liveness arrives as [`NodeView::alive`].

use std::fmt;

#[cfg(test)]
mod model;
mod planner;

pub use planner::{desired, plan, plan_failover};

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
    /// The spelling stored in the `nodes` table and shown by the admin API.
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

    /// Reads a stored state back; `None` for anything [`NodeState::as_str`] never writes.
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
    /// The node's `--node-id`: what slot rows name as owner and target.
    pub id: String,
    /// Its persisted membership state; only `Active` nodes receive slots.
    pub state: NodeState,
    /// Its lease is valid by the database clock.
    pub alive: bool,
}

/// The stored state of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Served by its owner; the normal state.
    Active,
    /// Being handed from `owner` to `target`; the owner still serves it (holding appends).
    Moving { target: String },
}

/// One row of `slot_owners`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotRow {
    /// Which slot (`0..slot_count`) this row is about; rows never change slot.
    pub slot: u32,
    /// `None`: never assigned (a fresh cluster).
    pub owner: Option<String>,
    /// Starts at 0 for an unassigned slot; the first owner gets epoch 1.
    pub epoch: u64,
    /// Whether a hand-over to another node is under way.
    pub state: SlotState,
}

impl SlotRow {
    /// The row a fresh cluster starts every slot with: no owner, epoch 0.
    pub fn unassigned(slot: u32) -> SlotRow {
        SlotRow {
            slot,
            owner: None,
            epoch: 0,
            state: SlotState::Active,
        }
    }
}

/// A requested change to one slot row; [`apply`] decides whether it is allowed and what it yields.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// Gives a never-owned slot its first owner (a fresh cluster); no data moves.
    Assign { to: String },
    /// Starts handing the slot to `target`: the owner keeps serving (holding appends) while it
    /// ships its tail.
    BeginMove { target: String },
    /// Ends a move: the target becomes the owner under a new epoch, fencing the old owner.
    CompleteMove,
    /// Abandons a move (its target went away, or the owner gave up); the owner keeps the slot.
    CancelMove,
    /// The owner serves its slot again after a restart or a lapsed lease. The new epoch fences
    /// whatever its previous incarnation may still have in flight, and a pending move is cancelled.
    Reclaim { node: String },
    /// Hands the slot of an owner whose lease expired to `to` under a new epoch, without its
    /// data: what the dead owner held only on its disk stays there. A move in progress is
    /// abandoned. The new epoch fences the old owner should it come back.
    Failover { to: String },
}

/// Why [`apply`] refused a change. Every refusal leaves the row as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("slot {slot} is already owned by {owner:?}")]
    AlreadyOwned { slot: u32, owner: String },
    #[error("slot {slot} has no owner")]
    Unowned { slot: u32 },
    #[error("slot {slot} is already moving to {target:?}")]
    AlreadyMoving { slot: u32, target: String },
    #[error("slot {slot} is not moving")]
    NotMoving { slot: u32 },
    #[error("slot {slot} is owned by {owner:?}, not by {node:?}")]
    NotOwner {
        slot: u32,
        node: String,
        owner: String,
    },
    #[error("slot {slot} is already on {node:?}")]
    AlreadyThere { slot: u32, node: String },
    #[error("node {node:?} is not a member of the cluster")]
    UnknownNode { node: String },
    #[error("node {node:?} holds no valid lease")]
    NodeNotAlive { node: String },
    #[error("node {node:?} is {state}, and only active nodes receive slots")]
    NodeNotActive { node: String, state: NodeState },
    #[error("slot {slot} is at the highest epoch and cannot change owner again")]
    EpochExhausted { slot: u32 },
    #[error("slot {slot} is served by {owner:?}, whose lease is valid: a live owner's slot is never failed over")]
    OwnerAlive { slot: u32, owner: String },
}

/// The next row after `change`, or why the change is not allowed now.
///
/// `nodes` is the membership as the writer sees it at the time of the write (see the module docs);
/// a node id missing from it is unknown and neither alive nor active. If an id appears more than
/// once, its first view counts. Pure: the caller persists the result with a compare-and-swap on
/// `row`.
pub fn apply(row: &SlotRow, change: &Change, nodes: &[NodeView]) -> Result<SlotRow, Refusal> {
    let slot = row.slot;
    match change {
        Change::Assign { to } => {
            if let Some(owner) = &row.owner {
                return Err(Refusal::AlreadyOwned {
                    slot,
                    owner: owner.clone(),
                });
            }
            require_active(to, nodes)?;
            Ok(SlotRow {
                slot,
                owner: Some(to.clone()),
                epoch: next_epoch(row)?,
                state: SlotState::Active,
            })
        }
        Change::BeginMove { target } => {
            let owner = require_owner(row)?;
            if let SlotState::Moving { target } = &row.state {
                return Err(Refusal::AlreadyMoving {
                    slot,
                    target: target.clone(),
                });
            }
            require_alive(owner, nodes)?;
            if target == owner {
                return Err(Refusal::AlreadyThere {
                    slot,
                    node: target.clone(),
                });
            }
            require_active(target, nodes)?;
            Ok(SlotRow {
                state: SlotState::Moving {
                    target: target.clone(),
                },
                ..row.clone()
            })
        }
        Change::CompleteMove => {
            let owner = require_owner(row)?;
            let SlotState::Moving { target } = &row.state else {
                return Err(Refusal::NotMoving { slot });
            };
            // A lapsed owner has stopped serving and may not have shipped its tail: handing the
            // slot on now would be a silent failover.
            require_alive(owner, nodes)?;
            require_active(target, nodes)?;
            Ok(SlotRow {
                slot,
                owner: Some(target.clone()),
                epoch: next_epoch(row)?,
                state: SlotState::Active,
            })
        }
        Change::CancelMove => {
            require_owner(row)?;
            if row.state == SlotState::Active {
                return Err(Refusal::NotMoving { slot });
            }
            Ok(SlotRow {
                state: SlotState::Active,
                ..row.clone()
            })
        }
        Change::Reclaim { node } => {
            let owner = require_owner(row)?;
            if owner != node {
                return Err(Refusal::NotOwner {
                    slot,
                    node: node.clone(),
                    owner: owner.clone(),
                });
            }
            require_alive(node, nodes)?;
            Ok(SlotRow {
                slot,
                owner: Some(node.clone()),
                epoch: next_epoch(row)?,
                state: SlotState::Active,
            })
        }
        Change::Failover { to } => {
            let owner = require_owner(row)?;
            // Only lease expiry is authoritative: a node missing from the membership is not
            // alive either.
            if node_view(owner, nodes).is_some_and(|node| node.alive) {
                return Err(Refusal::OwnerAlive {
                    slot,
                    owner: owner.clone(),
                });
            }
            require_active(to, nodes)?;
            Ok(SlotRow {
                slot,
                owner: Some(to.clone()),
                epoch: next_epoch(row)?,
                state: SlotState::Active,
            })
        }
    }
}

/// How a slot reads to operators and gateways (`GET /admin/slots`): `"unassigned"`,
/// `"unavailable"` (its owner's lease expired, or the owner is not a member), `"moving"` or
/// `"active"`. An unavailable slot that was moving reads `"unavailable"`: nobody serves it.
pub fn slot_status(row: &SlotRow, nodes: &[NodeView]) -> &'static str {
    let Some(owner) = &row.owner else {
        return "unassigned";
    };
    if !node_view(owner, nodes).is_some_and(|node| node.alive) {
        return "unavailable";
    }
    match row.state {
        SlotState::Moving { .. } => "moving",
        SlotState::Active => "active",
    }
}

/// The first view of `id` in `nodes`.
fn node_view<'a>(id: &str, nodes: &'a [NodeView]) -> Option<&'a NodeView> {
    nodes.iter().find(|node| node.id == id)
}

/// Whether `id` may receive slots now: alive and active.
fn can_receive(id: &str, nodes: &[NodeView]) -> bool {
    node_view(id, nodes).is_some_and(|node| node.alive && node.state == NodeState::Active)
}

fn require_alive<'a>(id: &str, nodes: &'a [NodeView]) -> Result<&'a NodeView, Refusal> {
    let node = node_view(id, nodes).ok_or_else(|| Refusal::UnknownNode { node: id.into() })?;
    if !node.alive {
        return Err(Refusal::NodeNotAlive { node: id.into() });
    }
    Ok(node)
}

fn require_active(id: &str, nodes: &[NodeView]) -> Result<(), Refusal> {
    let node = require_alive(id, nodes)?;
    if node.state != NodeState::Active {
        return Err(Refusal::NodeNotActive {
            node: id.into(),
            state: node.state,
        });
    }
    Ok(())
}

fn require_owner(row: &SlotRow) -> Result<&String, Refusal> {
    row.owner
        .as_ref()
        .ok_or(Refusal::Unowned { slot: row.slot })
}

fn next_epoch(row: &SlotRow) -> Result<u64, Refusal> {
    row.epoch
        .checked_add(1)
        .ok_or(Refusal::EpochExhausted { slot: row.slot })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: NodeState, alive: bool) -> NodeView {
        NodeView {
            id: id.into(),
            state,
            alive,
        }
    }

    /// `a` and `b` active, `d` draining, `j` joining, `x` active but its lease lapsed,
    /// `z` dead.
    fn members() -> Vec<NodeView> {
        vec![
            node("a", NodeState::Active, true),
            node("b", NodeState::Active, true),
            node("d", NodeState::Draining, true),
            node("j", NodeState::Joining, true),
            node("x", NodeState::Active, false),
            node("z", NodeState::Dead, false),
        ]
    }

    fn owned(owner: &str, epoch: u64) -> SlotRow {
        SlotRow {
            slot: 7,
            owner: Some(owner.into()),
            epoch,
            state: SlotState::Active,
        }
    }

    fn moving(owner: &str, epoch: u64, target: &str) -> SlotRow {
        SlotRow {
            state: SlotState::Moving {
                target: target.into(),
            },
            ..owned(owner, epoch)
        }
    }

    fn assign(to: &str) -> Change {
        Change::Assign { to: to.into() }
    }

    fn begin(target: &str) -> Change {
        Change::BeginMove {
            target: target.into(),
        }
    }

    fn reclaim(node: &str) -> Change {
        Change::Reclaim { node: node.into() }
    }

    fn not_active(id: &str, state: NodeState) -> Refusal {
        Refusal::NodeNotActive {
            node: id.into(),
            state,
        }
    }

    fn not_alive(id: &str) -> Refusal {
        Refusal::NodeNotAlive { node: id.into() }
    }

    fn unknown(id: &str) -> Refusal {
        Refusal::UnknownNode { node: id.into() }
    }

    #[test]
    fn assign_gives_a_fresh_slot_its_first_owner_at_epoch_one() {
        let fresh = SlotRow::unassigned(7);
        assert_eq!(apply(&fresh, &assign("a"), &members()), Ok(owned("a", 1)));
    }

    #[test]
    fn assign_is_refused_on_an_owned_slot_and_to_a_node_that_cannot_receive() {
        let nodes = members();
        let fresh = SlotRow::unassigned(7);
        assert_eq!(
            apply(&owned("a", 3), &assign("b"), &nodes),
            Err(Refusal::AlreadyOwned {
                slot: 7,
                owner: "a".into()
            })
        );
        assert_eq!(
            apply(&owned("a", 3), &assign("a"), &nodes),
            Err(Refusal::AlreadyOwned {
                slot: 7,
                owner: "a".into()
            })
        );
        assert_eq!(
            apply(&fresh, &assign("d"), &nodes),
            Err(not_active("d", NodeState::Draining))
        );
        assert_eq!(
            apply(&fresh, &assign("j"), &nodes),
            Err(not_active("j", NodeState::Joining))
        );
        assert_eq!(apply(&fresh, &assign("x"), &nodes), Err(not_alive("x")));
        assert_eq!(apply(&fresh, &assign("z"), &nodes), Err(not_alive("z")));
        assert_eq!(apply(&fresh, &assign("q"), &nodes), Err(unknown("q")));
    }

    #[test]
    fn begin_move_keeps_owner_and_epoch() {
        let nodes = members();
        assert_eq!(
            apply(&owned("a", 4), &begin("b"), &nodes),
            Ok(moving("a", 4, "b"))
        );
        // Draining is what moves exist for: a draining owner may hand its slots on.
        assert_eq!(
            apply(&owned("d", 4), &begin("a"), &nodes),
            Ok(moving("d", 4, "a"))
        );
    }

    #[test]
    fn begin_move_is_refused_unless_a_live_owner_hands_to_another_active_node() {
        let nodes = members();
        let cases = [
            (SlotRow::unassigned(7), "b", Refusal::Unowned { slot: 7 }),
            (
                moving("a", 4, "b"),
                "b",
                Refusal::AlreadyMoving {
                    slot: 7,
                    target: "b".into(),
                },
            ),
            (owned("x", 4), "a", not_alive("x")),
            (owned("z", 4), "a", not_alive("z")),
            (owned("q", 4), "a", unknown("q")),
            (
                owned("a", 4),
                "a",
                Refusal::AlreadyThere {
                    slot: 7,
                    node: "a".into(),
                },
            ),
            (owned("a", 4), "d", not_active("d", NodeState::Draining)),
            (owned("a", 4), "j", not_active("j", NodeState::Joining)),
            (owned("a", 4), "x", not_alive("x")),
            (owned("a", 4), "q", unknown("q")),
        ];
        for (row, target, refusal) in cases {
            assert_eq!(
                apply(&row, &begin(target), &nodes),
                Err(refusal),
                "{row:?} → {target}"
            );
        }
    }

    #[test]
    fn complete_move_hands_the_slot_to_the_target_at_the_next_epoch() {
        assert_eq!(
            apply(&moving("d", 4, "a"), &Change::CompleteMove, &members()),
            Ok(owned("a", 5))
        );
    }

    #[test]
    fn complete_move_is_refused_unless_moving_with_a_live_owner_and_a_receiving_target() {
        let nodes = members();
        let cases = [
            (SlotRow::unassigned(7), Refusal::Unowned { slot: 7 }),
            (owned("a", 4), Refusal::NotMoving { slot: 7 }),
            (moving("a", 4, "x"), not_alive("x")),
            (moving("a", 4, "z"), not_alive("z")),
            (moving("a", 4, "d"), not_active("d", NodeState::Draining)),
            (moving("a", 4, "q"), unknown("q")),
            // The owner's lease lapsed mid-move: it may not have shipped its tail.
            (moving("x", 4, "a"), not_alive("x")),
            (moving("q", 4, "a"), unknown("q")),
        ];
        for (row, refusal) in cases {
            assert_eq!(
                apply(&row, &Change::CompleteMove, &nodes),
                Err(refusal),
                "{row:?}"
            );
        }
    }

    #[test]
    fn cancel_move_returns_to_active_under_the_same_owner_and_epoch() {
        let nodes = members();
        assert_eq!(
            apply(&moving("a", 4, "x"), &Change::CancelMove, &nodes),
            Ok(owned("a", 4))
        );
        // Even with the owner gone: cancelling changes neither owner nor epoch.
        assert_eq!(
            apply(&moving("z", 4, "a"), &Change::CancelMove, &nodes),
            Ok(owned("z", 4))
        );
        assert_eq!(
            apply(&owned("a", 4), &Change::CancelMove, &nodes),
            Err(Refusal::NotMoving { slot: 7 })
        );
        assert_eq!(
            apply(&SlotRow::unassigned(7), &Change::CancelMove, &nodes),
            Err(Refusal::Unowned { slot: 7 })
        );
    }

    #[test]
    fn reclaim_raises_the_epoch_and_cancels_a_pending_move() {
        let nodes = members();
        assert_eq!(
            apply(&owned("a", 4), &reclaim("a"), &nodes),
            Ok(owned("a", 5))
        );
        assert_eq!(
            apply(&moving("a", 4, "b"), &reclaim("a"), &nodes),
            Ok(owned("a", 5))
        );
        // A draining node that restarts is still draining, and must serve its slots meanwhile.
        assert_eq!(
            apply(&owned("d", 4), &reclaim("d"), &nodes),
            Ok(owned("d", 5))
        );
    }

    #[test]
    fn reclaim_is_refused_to_anyone_but_a_live_owner() {
        let nodes = members();
        assert_eq!(
            apply(&owned("a", 4), &reclaim("b"), &nodes),
            Err(Refusal::NotOwner {
                slot: 7,
                node: "b".into(),
                owner: "a".into()
            })
        );
        assert_eq!(
            apply(&moving("a", 4, "b"), &reclaim("b"), &nodes),
            Err(Refusal::NotOwner {
                slot: 7,
                node: "b".into(),
                owner: "a".into()
            })
        );
        assert_eq!(
            apply(&SlotRow::unassigned(7), &reclaim("a"), &nodes),
            Err(Refusal::Unowned { slot: 7 })
        );
        assert_eq!(
            apply(&owned("x", 4), &reclaim("x"), &nodes),
            Err(not_alive("x"))
        );
    }

    fn failover(to: &str) -> Change {
        Change::Failover { to: to.into() }
    }

    #[test]
    fn failover_hands_a_dead_owners_slot_to_a_receiving_node_at_the_next_epoch() {
        let nodes = members();
        // Lapsed but still stored active (x), declared dead (z), not a member at all (q).
        for owner in ["x", "z", "q"] {
            assert_eq!(
                apply(&owned(owner, 4), &failover("a"), &nodes),
                Ok(owned("a", 5)),
                "{owner}"
            );
        }
        // A move in progress is abandoned: its target may not have got anything.
        assert_eq!(
            apply(&moving("x", 4, "b"), &failover("a"), &nodes),
            Ok(owned("a", 5))
        );
        assert_eq!(
            apply(&moving("z", 4, "a"), &failover("a"), &nodes),
            Ok(owned("a", 5))
        );
    }

    #[test]
    fn failover_is_refused_while_the_owner_lives_and_to_a_node_that_cannot_receive() {
        let nodes = members();
        let alive = |owner: &str| Refusal::OwnerAlive {
            slot: 7,
            owner: owner.into(),
        };
        let cases = [
            (owned("a", 4), "b", alive("a")),
            (moving("a", 4, "b"), "b", alive("a")),
            // Draining or joining, a node with a valid lease is alive.
            (owned("d", 4), "a", alive("d")),
            (owned("j", 4), "a", alive("j")),
            (SlotRow::unassigned(7), "a", Refusal::Unowned { slot: 7 }),
            (owned("z", 4), "d", not_active("d", NodeState::Draining)),
            (owned("z", 4), "j", not_active("j", NodeState::Joining)),
            (owned("z", 4), "x", not_alive("x")),
            (owned("z", 4), "z", not_alive("z")),
            (owned("z", 4), "q", unknown("q")),
            (
                owned("z", u64::MAX),
                "a",
                Refusal::EpochExhausted { slot: 7 },
            ),
        ];
        for (row, to, refusal) in cases {
            assert_eq!(
                apply(&row, &failover(to), &nodes),
                Err(refusal),
                "{row:?} → {to}"
            );
        }
    }

    #[test]
    fn a_failed_over_owner_that_comes_back_cannot_reclaim() {
        let mut nodes = members();
        let dead = owned("x", 4);
        let taken = apply(&dead, &failover("a"), &nodes).expect("failover");
        // x renews its lease: the row it would reclaim names another owner now.
        nodes[4].alive = true;
        assert_eq!(
            apply(&taken, &reclaim("x"), &nodes),
            Err(Refusal::NotOwner {
                slot: 7,
                node: "x".into(),
                owner: "a".into()
            })
        );
        // Its stale row still applies in isolation; only the compare-and-swap against the stored
        // row (epoch 5 now) keeps it out, which the model test checks.
        assert_eq!(apply(&dead, &reclaim("x"), &nodes), Ok(owned("x", 5)));
    }

    #[test]
    fn owner_changes_are_refused_at_the_last_epoch() {
        let nodes = members();
        let exhausted = Refusal::EpochExhausted { slot: 7 };
        assert_eq!(
            apply(&moving("a", u64::MAX, "b"), &Change::CompleteMove, &nodes),
            Err(exhausted.clone())
        );
        assert_eq!(
            apply(&owned("a", u64::MAX), &reclaim("a"), &nodes),
            Err(exhausted)
        );
        // Changes that keep the epoch still work there.
        assert_eq!(
            apply(&owned("a", u64::MAX), &begin("b"), &nodes),
            Ok(moving("a", u64::MAX, "b"))
        );
    }

    #[test]
    fn first_view_of_a_node_counts() {
        let nodes = [
            node("a", NodeState::Draining, true),
            node("a", NodeState::Active, true),
        ];
        assert_eq!(
            apply(&SlotRow::unassigned(7), &assign("a"), &nodes),
            Err(not_active("a", NodeState::Draining))
        );
    }

    #[test]
    fn slot_status_reads_unassigned_unavailable_moving_active() {
        let nodes = members();
        assert_eq!(slot_status(&SlotRow::unassigned(7), &nodes), "unassigned");
        assert_eq!(slot_status(&owned("x", 1), &nodes), "unavailable");
        assert_eq!(slot_status(&owned("z", 1), &nodes), "unavailable");
        assert_eq!(slot_status(&owned("q", 1), &nodes), "unavailable");
        assert_eq!(slot_status(&moving("x", 1, "a"), &nodes), "unavailable");
        assert_eq!(slot_status(&moving("a", 1, "x"), &nodes), "moving");
        assert_eq!(slot_status(&owned("a", 1), &nodes), "active");
        assert_eq!(slot_status(&owned("d", 1), &nodes), "active");
    }

    #[test]
    fn refusals_read_as_sentences() {
        assert_eq!(
            not_active("d", NodeState::Draining).to_string(),
            "node \"d\" is draining, and only active nodes receive slots"
        );
        assert_eq!(
            Refusal::NotOwner {
                slot: 3,
                node: "b".into(),
                owner: "a".into()
            }
            .to_string(),
            "slot 3 is owned by \"a\", not by \"b\""
        );
    }

    #[test]
    fn node_states_round_trip_through_their_stored_spelling() {
        for state in [
            NodeState::Joining,
            NodeState::Active,
            NodeState::Draining,
            NodeState::Drained,
            NodeState::Left,
            NodeState::Dead,
        ] {
            assert_eq!(NodeState::parse(state.as_str()), Some(state));
            assert_eq!(state.to_string(), state.as_str());
        }
        assert_eq!(NodeState::parse("Active"), None);
    }
}
