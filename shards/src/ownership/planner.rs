//! The rebalance planner: from a snapshot of `slot_owners` and of the membership, the changes that
//! move the table one step toward the desired placement.
//!
//! The desired owner of a slot is the hash-ring [`Placement`] over the nodes that are alive and
//! active — a pure function of that id set, so every node computes the same one. A plan:
//! - assigns every unassigned slot to its desired owner (no data moves, so not limited);
//! - cancels moves whose target is no longer alive and active;
//! - begins moves of slots whose (alive) owner is not their desired owner, slots of owners that
//!   are not active (draining, drained, left, joining) first, then by slot number, so that at most
//!   `max_moves` slots are moving once the plan is applied — moves already under way count.
//!
//! It never touches a slot whose owner is not alive (that slot is unavailable; handing it to
//! another node is failover, a step of its own), never targets a node that is not alive and active,
//! and proposes at most one change per slot, each valid by [`apply`](super::apply) against the
//! same snapshot. Completing a move is not the planner's business: the owner does it once it has
//! handed over its tail.
//!
//! [`plan_failover`] is that other step, for one dead node at a time (whether its slots may be
//! failed over at all is the caller's decision): each of its slots goes to the slot's desired owner
//! on the same ring, so the next [`plan`] leaves it there. It is not bounded by `max_moves`, since
//! a failover moves no data.
//!
//! The plan is only a proposal: the caller persists each change with a compare-and-swap against
//! the row it read, re-checked against the membership at write time, and drops what no longer
//! applies. `max_moves` bounds the moves cluster-wide only because one elected rebalancer plans at a
//! time; two planners racing on stale snapshots stay safe (the CAS sees to that) but may together
//! start more moves.

use std::collections::BTreeSet;

use super::{can_receive, node_view, Change, NodeView, SlotRow, SlotState};
use crate::placement::Placement;

/// The changes that bring `rows` one step closer to the placement over alive, active `nodes`, in
/// slot order; empty when the table is where it should be. Deterministic: the same rows and nodes,
/// in any order, give the same plan. `rows` hold one row per slot; `vnodes` is the ring's virtual
/// node count ([`DEFAULT_VNODES`](crate::placement::DEFAULT_VNODES) in a cluster).
///
/// With no node alive and active there is nowhere to assign or move a slot; the plan then only
/// cancels moves stranded on a target that went away, so their owners serve them again.
pub fn plan(
    rows: &[SlotRow],
    nodes: &[NodeView],
    max_moves: usize,
    vnodes: u32,
) -> Vec<(u32, Change)> {
    let placement = receiving_placement(nodes, vnodes);
    let mut rows: Vec<&SlotRow> = rows.iter().collect();
    rows.sort_by_key(|row| row.slot);

    let moving = rows
        .iter()
        .filter(|row| matches!(row.state, SlotState::Moving { .. }))
        .count();
    let mut changes = Vec::new();
    // (owner is active, slot, desired owner): `false` sorts first, so inactive owners go first.
    let mut misplaced: Vec<(bool, u32, &str)> = Vec::new();
    for row in rows {
        let desired = placement.owner(row.slot);
        let Some(owner) = &row.owner else {
            if let Some(to) = desired {
                changes.push((row.slot, Change::Assign { to: to.into() }));
            }
            continue;
        };
        let Some(owner_view) = node_view(owner, nodes).filter(|node| node.alive) else {
            continue;
        };
        match &row.state {
            SlotState::Moving { target } => {
                if !can_receive(target, nodes) {
                    changes.push((row.slot, Change::CancelMove));
                }
            }
            SlotState::Active => {
                if let Some(desired) = desired.filter(|desired| desired != owner) {
                    let owner_active = owner_view.state == super::NodeState::Active;
                    misplaced.push((owner_active, row.slot, desired));
                }
            }
        }
    }

    misplaced.sort_unstable();
    let budget = max_moves.saturating_sub(moving);
    changes.extend(misplaced.into_iter().take(budget).map(|(_, slot, target)| {
        (
            slot,
            Change::BeginMove {
                target: target.into(),
            },
        )
    }));
    changes.sort_by_key(|(slot, _)| *slot);
    changes
}

/// The changes that hand every slot of `dead` to its desired owner on the ring over alive, active
/// `nodes`, in slot order: one [`Change::Failover`] per slot, each valid by
/// [`apply`](super::apply) against the same snapshot. Empty when `dead` is alive (it is not dead),
/// owns nothing, or no node could receive. `vnodes` as for [`plan`].
pub fn plan_failover(
    rows: &[SlotRow],
    nodes: &[NodeView],
    dead: &str,
    vnodes: u32,
) -> Vec<(u32, Change)> {
    if node_view(dead, nodes).is_some_and(|node| node.alive) {
        return Vec::new();
    }
    let placement = receiving_placement(nodes, vnodes);
    let mut changes: Vec<(u32, Change)> = rows
        .iter()
        .filter(|row| row.owner.as_deref() == Some(dead))
        .filter_map(|row| {
            let to = placement.owner(row.slot)?;
            Some((row.slot, Change::Failover { to: to.into() }))
        })
        .collect();
    changes.sort_by_key(|(slot, _)| *slot);
    changes
}

/// The desired owner of every slot in `0..slot_count` (index = slot): what [`plan`] moves toward,
/// and what the admin `rebalance` answer shows. All `None` when no node is alive and active.
pub fn desired(nodes: &[NodeView], slot_count: u32, vnodes: u32) -> Vec<Option<String>> {
    let placement = receiving_placement(nodes, vnodes);
    (0..slot_count)
        .map(|slot| placement.owner(slot).map(str::to_owned))
        .collect()
}

/// The ring over the nodes that may receive slots now.
fn receiving_placement(nodes: &[NodeView], vnodes: u32) -> Placement {
    let ids: BTreeSet<&str> = nodes
        .iter()
        .map(|node| node.id.as_str())
        .filter(|id| can_receive(id, nodes))
        .collect();
    Placement::new(ids, vnodes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::ownership::{apply, slot_status, NodeState};
    use crate::placement::{DEFAULT_SLOT_COUNT, DEFAULT_VNODES};

    fn node(id: &str, state: NodeState, alive: bool) -> NodeView {
        NodeView {
            id: id.into(),
            state,
            alive,
        }
    }

    fn active(ids: &[&str]) -> Vec<NodeView> {
        ids.iter()
            .map(|id| node(id, NodeState::Active, true))
            .collect()
    }

    fn set_state(nodes: &mut [NodeView], id: &str, state: NodeState, alive: bool) {
        let view = nodes.iter_mut().find(|node| node.id == id).unwrap();
        view.state = state;
        view.alive = alive;
    }

    fn fresh(slot_count: u32) -> Vec<SlotRow> {
        (0..slot_count).map(SlotRow::unassigned).collect()
    }

    /// Every slot on `owner` at epoch 1, as after a one-node bootstrap.
    fn all_on(owner: &str, slot_count: u32) -> Vec<SlotRow> {
        (0..slot_count)
            .map(|slot| SlotRow {
                slot,
                owner: Some(owner.into()),
                epoch: 1,
                state: SlotState::Active,
            })
            .collect()
    }

    fn moving_count(rows: &[SlotRow]) -> usize {
        rows.iter()
            .filter(|row| matches!(row.state, SlotState::Moving { .. }))
            .count()
    }

    fn owned_counts(rows: &[SlotRow]) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for owner in rows.iter().filter_map(|row| row.owner.clone()) {
            *counts.entry(owner).or_insert(0) += 1;
        }
        counts
    }

    /// Applies a plan the way the rebalancer would, with nothing racing it: every change must apply.
    fn apply_plan(rows: &mut [SlotRow], plan: &[(u32, Change)], nodes: &[NodeView]) {
        for (slot, change) in plan {
            let row = &mut rows[*slot as usize];
            *row = apply(row, change, nodes)
                .unwrap_or_else(|refusal| panic!("{change:?} on {row:?}: {refusal}"));
        }
    }

    /// Owners complete moves, lowest slots first, at most `limit` of them.
    fn complete_moves(rows: &mut [SlotRow], nodes: &[NodeView], limit: usize) -> usize {
        let mut completed = 0;
        for row in rows.iter_mut() {
            if completed == limit {
                break;
            }
            if let Ok(next) = apply(row, &Change::CompleteMove, nodes) {
                *row = next;
                completed += 1;
            }
        }
        completed
    }

    fn begin_moves(plan: &[(u32, Change)]) -> Vec<(u32, &str)> {
        plan.iter()
            .filter_map(|(slot, change)| match change {
                Change::BeginMove { target } => Some((*slot, target.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Plans, applies, and lets owners complete up to `completions` moves per round until the plan
    /// is empty and nothing moves, checking `max_moves` after every plan. Returns the number of
    /// moves begun.
    fn rebalance_until_settled(
        rows: &mut [SlotRow],
        nodes: &[NodeView],
        max_moves: usize,
        completions: usize,
    ) -> usize {
        let mut begun = 0;
        for _round in 0..2 * rows.len() + 8 {
            let plan = plan(rows, nodes, max_moves, DEFAULT_VNODES);
            if plan.is_empty() && moving_count(rows) == 0 {
                return begun;
            }
            begun += begin_moves(&plan).len();
            apply_plan(rows, &plan, nodes);
            assert!(
                moving_count(rows) <= max_moves,
                "{} slots moving, max_moves {max_moves}",
                moving_count(rows)
            );
            complete_moves(rows, nodes, completions);
        }
        panic!("no fixed point: {:?}", owned_counts(rows));
    }

    fn assert_on_desired_owners(rows: &[SlotRow], nodes: &[NodeView]) {
        let desired = desired(nodes, rows.len() as u32, DEFAULT_VNODES);
        for row in rows {
            assert_eq!(row.owner, desired[row.slot as usize], "{row:?}");
            assert_eq!(row.state, SlotState::Active, "{row:?}");
        }
    }

    #[test]
    fn a_fresh_cluster_assigns_every_slot_to_the_ring_and_is_balanced() {
        let nodes = active(&["node-a", "node-b", "node-c"]);
        let mut rows = fresh(DEFAULT_SLOT_COUNT);
        // max_moves does not limit assignments: they move no data.
        let plan = plan(&rows, &nodes, 0, DEFAULT_VNODES);
        assert_eq!(plan.len(), DEFAULT_SLOT_COUNT as usize);
        assert!(plan
            .iter()
            .all(|(_, change)| matches!(change, Change::Assign { .. })));
        apply_plan(&mut rows, &plan, &nodes);

        let ring = Placement::new(["node-a", "node-b", "node-c"], DEFAULT_VNODES)
            .assignments(DEFAULT_SLOT_COUNT);
        for row in &rows {
            assert_eq!(row.owner.as_deref(), Some(ring[row.slot as usize].as_str()));
            assert_eq!(row.epoch, 1);
        }
        // The balance band of `placement`'s tests, [1 - 5σ, 1 + 6σ] × S/N with
        // σ = sqrt(1/V + (N-1)/S): [0.46, 1.65] at N = 3.
        let sigma = (1.0 / f64::from(DEFAULT_VNODES) + 2.0 / f64::from(DEFAULT_SLOT_COUNT)).sqrt();
        let fair = f64::from(DEFAULT_SLOT_COUNT) / 3.0;
        let counts = owned_counts(&rows);
        assert_eq!(counts.len(), 3, "{counts:?}");
        for (owner, count) in &counts {
            let load = *count as f64 / fair;
            assert!(
                (1.0 - 5.0 * sigma..=1.0 + 6.0 * sigma).contains(&load),
                "{owner} owns {load:.2}× its share: {counts:?}"
            );
        }
        assert!(super::plan(&rows, &nodes, 16, DEFAULT_VNODES).is_empty());
    }

    #[test]
    fn a_draining_node_hands_over_every_slot_within_max_moves() {
        let mut nodes = active(&["node-a", "node-b", "node-c"]);
        let mut rows = fresh(DEFAULT_SLOT_COUNT);
        let bootstrap = plan(&rows, &nodes, 0, DEFAULT_VNODES);
        apply_plan(&mut rows, &bootstrap, &nodes);
        let owned_by_b = owned_counts(&rows)["node-b"];
        let before = rows.clone();

        set_state(&mut nodes, "node-b", NodeState::Draining, true);
        // Owners complete 5 of at most 16 moves per round, so moves pile up against max_moves.
        let begun = rebalance_until_settled(&mut rows, &nodes, 16, 5);

        // Removing a node from the ring moves only its slots, each once.
        assert_eq!(begun, owned_by_b);
        assert!(!owned_counts(&rows).contains_key("node-b"));
        for (old, new) in before.iter().zip(&rows) {
            if old.owner.as_deref() == Some("node-b") {
                assert_eq!(new.epoch, old.epoch + 1, "{new:?}");
            } else {
                assert_eq!(new, old);
            }
        }
        assert_on_desired_owners(&rows, &nodes);
    }

    #[test]
    fn moves_already_under_way_count_against_max_moves() {
        let nodes = active(&["a", "b"]);
        let mut rows = all_on("a", 64);
        let first = plan(&rows, &nodes, 3, DEFAULT_VNODES);
        assert_eq!(begin_moves(&first).len(), 3);
        apply_plan(&mut rows, &first, &nodes);
        assert!(plan(&rows, &nodes, 3, DEFAULT_VNODES).is_empty());
        assert_eq!(
            begin_moves(&plan(&rows, &nodes, 5, DEFAULT_VNODES)).len(),
            2
        );
        complete_moves(&mut rows, &nodes, 1);
        assert_eq!(
            begin_moves(&plan(&rows, &nodes, 3, DEFAULT_VNODES)).len(),
            1
        );
        // More moving than allowed (max_moves lowered): nothing new, nothing cancelled.
        assert!(plan(&rows, &nodes, 1, DEFAULT_VNODES).is_empty());
    }

    #[test]
    fn slots_of_inactive_owners_move_first_then_by_slot() {
        let mut nodes = active(&["a", "b", "c"]);
        nodes.push(node("d", NodeState::Draining, true));
        let mut rows = all_on("a", 64);
        for row in &mut rows[40..] {
            row.owner = Some("d".into());
        }
        let plan = plan(&rows, &nodes, 4, DEFAULT_VNODES);
        let slots: Vec<u32> = begin_moves(&plan).iter().map(|(slot, _)| *slot).collect();
        assert_eq!(slots, [40, 41, 42, 43]);

        // With room for 30 moves: all 24 of d's slots, then a's 6 lowest misplaced ones.
        let with_room = super::plan(&rows, &nodes, 30, DEFAULT_VNODES);
        let slots: Vec<u32> = begin_moves(&with_room)
            .iter()
            .map(|(slot, _)| *slot)
            .collect();
        let desired = desired(&nodes, 64, DEFAULT_VNODES);
        let misplaced_on_a: Vec<u32> = (0..40)
            .filter(|slot| desired[*slot as usize].as_deref() != Some("a"))
            .take(6)
            .collect();
        let expected: Vec<u32> = misplaced_on_a.into_iter().chain(40..64).collect();
        assert_eq!(slots, expected);
    }

    #[test]
    fn slots_of_dead_owners_are_never_touched() {
        let mut nodes = active(&["a", "b", "c"]);
        set_state(&mut nodes, "c", NodeState::Active, false);
        nodes.push(node("z", NodeState::Dead, false));
        let mut rows = all_on("a", 48);
        for row in &mut rows[0..10] {
            row.owner = Some("c".into());
        }
        rows[10].owner = Some("z".into());
        rows[11].owner = Some("gone".into());
        // A dead owner's move to a dead target is stranded, but it is failover's to resolve.
        rows[3].state = SlotState::Moving { target: "z".into() };
        rows[4].state = SlotState::Moving { target: "a".into() };
        let untouched = rows[..12].to_vec();

        rebalance_until_settled_ignoring_unavailable(&mut rows, &nodes);
        assert_eq!(&rows[..12], &untouched[..]);
        for row in &rows[..12] {
            assert_eq!(slot_status(row, &nodes), "unavailable");
        }
        let desired = desired(&nodes, 48, DEFAULT_VNODES);
        for row in &rows[12..] {
            assert_eq!(row.owner, desired[row.slot as usize]);
        }
    }

    /// Like [`rebalance_until_settled`], but stops when the plan is empty, since stranded moves of
    /// unavailable slots never settle.
    fn rebalance_until_settled_ignoring_unavailable(rows: &mut [SlotRow], nodes: &[NodeView]) {
        for _round in 0..2 * rows.len() {
            let plan = plan(rows, nodes, 4, DEFAULT_VNODES);
            for (slot, _) in &plan {
                let row = &rows[*slot as usize];
                assert_ne!(slot_status(row, nodes), "unavailable", "{row:?}");
            }
            apply_plan(rows, &plan, nodes);
            let completed = complete_moves(rows, nodes, usize::MAX);
            if plan.is_empty() && completed == 0 {
                return;
            }
        }
        panic!("no fixed point");
    }

    #[test]
    fn a_failover_puts_the_dead_nodes_slots_where_the_next_rebalance_leaves_them() {
        let mut nodes = active(&["a", "b", "c", "d"]);
        let mut rows = fresh(DEFAULT_SLOT_COUNT);
        let bootstrap = plan(&rows, &nodes, 0, DEFAULT_VNODES);
        apply_plan(&mut rows, &bootstrap, &nodes);
        let before = rows.clone();
        let owned_by_c = owned_counts(&rows)["c"];
        // One of c's slots was moving when c died.
        let moving_slot = rows
            .iter()
            .position(|row| row.owner.as_deref() == Some("c"))
            .unwrap();
        rows[moving_slot].state = SlotState::Moving { target: "a".into() };

        set_state(&mut nodes, "c", NodeState::Active, false);
        // Alive nodes are never failed over, and a dead one is not rebalanced.
        assert!(plan_failover(&rows, &nodes, "a", DEFAULT_VNODES).is_empty());
        assert!(plan(&rows, &nodes, 16, DEFAULT_VNODES).is_empty());

        // max_moves does not bound it: every one of c's slots at once.
        let failover = plan_failover(&rows, &nodes, "c", DEFAULT_VNODES);
        assert_eq!(failover.len(), owned_by_c);
        assert!(failover
            .iter()
            .all(|(_, change)| matches!(change, Change::Failover { to } if to != "c")));
        apply_plan(&mut rows, &failover, &nodes);

        // The ring without c puts them there already: removing a node moves only its slots,
        // each exactly once, and nothing is left for a rebalance.
        assert!(plan(&rows, &nodes, 16, DEFAULT_VNODES).is_empty());
        assert!(plan_failover(&rows, &nodes, "c", DEFAULT_VNODES).is_empty());
        assert_on_desired_owners(&rows, &nodes);
        for (old, new) in before.iter().zip(&rows) {
            if old.owner.as_deref() == Some("c") {
                assert_eq!(new.epoch, old.epoch + 1, "{new:?}");
            } else {
                assert_eq!(new, old);
            }
        }
    }

    #[test]
    fn a_failover_needs_a_receiving_node_and_a_dead_owner() {
        let mut nodes = active(&["a", "b"]);
        set_state(&mut nodes, "b", NodeState::Draining, false);
        let rows = all_on("b", 8);
        // b is dead, but a is the only node and it is draining: nowhere to put the slots.
        set_state(&mut nodes, "a", NodeState::Draining, true);
        assert!(plan_failover(&rows, &nodes, "b", DEFAULT_VNODES).is_empty());
        set_state(&mut nodes, "a", NodeState::Active, true);
        assert_eq!(
            plan_failover(&rows, &nodes, "b", DEFAULT_VNODES),
            (0..8)
                .map(|slot| (slot, Change::Failover { to: "a".into() }))
                .collect::<Vec<_>>()
        );
        // A node id that is not a member is not alive either: its slots can be failed over.
        let strays = all_on("gone", 3);
        assert_eq!(
            plan_failover(&strays, &nodes, "gone", DEFAULT_VNODES).len(),
            3
        );
        assert!(plan_failover(&rows, &nodes, "nobody", DEFAULT_VNODES).is_empty());
    }

    #[test]
    fn moves_to_a_node_that_can_no_longer_receive_are_cancelled() {
        let mut nodes = active(&["a", "b", "c", "d", "x"]);
        set_state(&mut nodes, "c", NodeState::Draining, true);
        set_state(&mut nodes, "d", NodeState::Joining, true);
        set_state(&mut nodes, "x", NodeState::Active, false);
        let mut rows = all_on("a", 5);
        for (row, target) in rows.iter_mut().zip(["b", "c", "d", "x", "gone"]) {
            row.state = SlotState::Moving {
                target: target.into(),
            };
        }
        let plan = plan(&rows, &nodes, 16, DEFAULT_VNODES);
        assert_eq!(
            plan,
            [1, 2, 3, 4].map(|slot| (slot, Change::CancelMove)),
            "the move to b, alive and active, goes on"
        );

        // With nobody left to receive, stranded moves are still cancelled, and nothing else.
        for id in ["a", "b"] {
            set_state(&mut nodes, id, NodeState::Draining, true);
        }
        assert_eq!(
            super::plan(&rows, &nodes, 16, DEFAULT_VNODES),
            [0, 1, 2, 3, 4].map(|slot| (slot, Change::CancelMove))
        );
    }

    #[test]
    fn without_a_receiving_node_there_is_nothing_to_plan() {
        let nodes = vec![
            node("a", NodeState::Draining, true),
            node("j", NodeState::Joining, true),
            node("x", NodeState::Active, false),
        ];
        assert!(plan(&fresh(32), &nodes, 16, DEFAULT_VNODES).is_empty());
        assert!(plan(&all_on("a", 32), &nodes, 16, DEFAULT_VNODES).is_empty());
        assert!(plan(&fresh(32), &[], 16, DEFAULT_VNODES).is_empty());
        assert_eq!(desired(&nodes, 4, DEFAULT_VNODES), [None, None, None, None]);
    }

    #[test]
    fn joining_and_draining_nodes_receive_nothing() {
        let mut nodes = active(&["a", "b"]);
        nodes.push(node("j", NodeState::Joining, true));
        nodes.push(node("d", NodeState::Draining, true));
        let desired = desired(&nodes, DEFAULT_SLOT_COUNT, DEFAULT_VNODES);
        assert_eq!(
            desired,
            Placement::new(["a", "b"], DEFAULT_VNODES)
                .assignments(DEFAULT_SLOT_COUNT)
                .into_iter()
                .map(Some)
                .collect::<Vec<_>>()
        );
        let mut rows = fresh(DEFAULT_SLOT_COUNT);
        rebalance_until_settled(&mut rows, &nodes, 16, usize::MAX);
        let counts = owned_counts(&rows);
        assert_eq!(counts.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn scaling_out_converges_with_each_slot_moved_at_most_once() {
        let mut nodes = active(&["a"]);
        let mut rows = fresh(DEFAULT_SLOT_COUNT);
        rebalance_until_settled(&mut rows, &nodes, 16, usize::MAX);
        assert_eq!(owned_counts(&rows)["a"], DEFAULT_SLOT_COUNT as usize);

        nodes.extend(active(&["b", "c", "d"]));
        let leaving_a = desired(&nodes, DEFAULT_SLOT_COUNT, DEFAULT_VNODES)
            .iter()
            .filter(|owner| owner.as_deref() != Some("a"))
            .count();
        let begun = rebalance_until_settled(&mut rows, &nodes, 16, usize::MAX);
        assert_eq!(begun, leaving_a);
        assert_on_desired_owners(&rows, &nodes);
        assert!(rows.iter().all(|row| row.epoch <= 2));
    }

    #[test]
    fn the_plan_ignores_the_order_of_rows_and_nodes() {
        let mut nodes = active(&["a", "b", "c", "d"]);
        set_state(&mut nodes, "b", NodeState::Draining, true);
        let mut rows = all_on("b", 128);
        for row in rows.iter_mut().step_by(3) {
            row.owner = Some("a".into());
        }
        rows[5].state = SlotState::Moving { target: "b".into() };
        rows[6] = SlotRow::unassigned(6);
        let expected = plan(&rows, &nodes, 8, DEFAULT_VNODES);
        assert!(!expected.is_empty());

        rows.reverse();
        rows.rotate_left(37);
        nodes.reverse();
        assert_eq!(plan(&rows, &nodes, 8, DEFAULT_VNODES), expected);
    }

    // ---- properties over arbitrary tables ---------------------------------------------------

    const IDS: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];

    fn node_state() -> impl Strategy<Value = NodeState> {
        prop_oneof![
            4 => Just(NodeState::Active),
            1 => Just(NodeState::Joining),
            1 => Just(NodeState::Draining),
            1 => Just(NodeState::Drained),
            1 => Just(NodeState::Left),
            1 => Just(NodeState::Dead),
        ]
    }

    fn nodes() -> impl Strategy<Value = Vec<NodeView>> {
        prop::collection::vec((node_state(), prop::bool::weighted(0.8)), IDS.len()).prop_map(
            |views| {
                IDS.iter()
                    .zip(views)
                    .map(|(id, (state, alive))| node(id, state, alive))
                    .collect()
            },
        )
    }

    /// A node id, sometimes one that is not a member.
    fn some_id() -> impl Strategy<Value = String> {
        prop_oneof![
            9 => prop::sample::select(&IDS[..]).prop_map(String::from),
            1 => Just("stranger".to_string()),
        ]
    }

    fn rows() -> impl Strategy<Value = Vec<SlotRow>> {
        let row = (
            prop::option::weighted(0.8, some_id()),
            0u64..5,
            prop::option::weighted(0.2, some_id()),
        );
        prop::collection::vec(row, 1..64).prop_map(|rows| {
            (0u32..)
                .zip(rows)
                .map(|(slot, (owner, epoch, target))| SlotRow {
                    slot,
                    epoch: if owner.is_some() { epoch + 1 } else { 0 },
                    state: match (&owner, target) {
                        (Some(owner), Some(target)) if *owner != target => {
                            SlotState::Moving { target }
                        }
                        _ => SlotState::Active,
                    },
                    owner,
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the table, a plan is safe to apply as it stands: one valid change per slot, no
        /// slot of an absent owner, no target that cannot receive, and within `max_moves`.
        #[test]
        fn every_plan_applies_to_its_own_snapshot(
            rows in rows(),
            nodes in nodes(),
            max_moves in 0usize..8,
            vnodes in 1u32..=32,
        ) {
            let plan = plan(&rows, &nodes, max_moves, vnodes);
            let slots: Vec<u32> = plan.iter().map(|(slot, _)| *slot).collect();
            prop_assert!(slots.windows(2).all(|w| w[0] < w[1]), "not one change per slot in order: {:?}", slots);

            let moving = moving_count(&rows);
            let begun = begin_moves(&plan).len();
            prop_assert!(begun == 0 || moving + begun <= max_moves, "{} moving + {} begun > {}", moving, begun, max_moves);

            let desired = desired(&nodes, rows.len() as u32, vnodes);
            for (slot, change) in &plan {
                let row = &rows[*slot as usize];
                let next = apply(row, change, &nodes);
                prop_assert!(next.is_ok(), "{:?} on {:?}: {:?}", change, row, next);
                if row.owner.is_some() {
                    prop_assert_eq!(slot_status(row, &nodes), if matches!(row.state, SlotState::Moving { .. }) { "moving" } else { "active" });
                }
                match change {
                    Change::Assign { to } | Change::BeginMove { target: to } => {
                        prop_assert_eq!(Some(to), desired[*slot as usize].as_ref());
                    }
                    Change::CancelMove => {}
                    Change::CompleteMove | Change::Reclaim { .. } | Change::Failover { .. } => {
                        prop_assert!(false, "the planner proposed {:?}", change);
                    }
                }
            }
        }

        /// A failover plan applies to its own snapshot, touches the dead node's slots only, all
        /// of them when some node can receive, each to its desired owner.
        #[test]
        fn every_failover_plan_applies_to_its_own_snapshot(
            rows in rows(),
            nodes in nodes(),
            dead in some_id(),
            vnodes in 1u32..=32,
        ) {
            let plan = plan_failover(&rows, &nodes, &dead, vnodes);
            let slots: Vec<u32> = plan.iter().map(|(slot, _)| *slot).collect();
            prop_assert!(slots.windows(2).all(|w| w[0] < w[1]), "not one change per slot in order: {:?}", slots);
            let desired = desired(&nodes, rows.len() as u32, vnodes);
            let alive = nodes.iter().any(|node| node.id == dead && node.alive);
            let owned: Vec<u32> = rows
                .iter()
                .filter(|row| row.owner.as_deref() == Some(dead.as_str()))
                .map(|row| row.slot)
                .collect();
            if alive || desired.iter().all(Option::is_none) {
                prop_assert!(plan.is_empty(), "{:?}", plan);
            } else {
                prop_assert_eq!(&slots, &owned);
            }
            for (slot, change) in &plan {
                let row = &rows[*slot as usize];
                let next = apply(row, change, &nodes);
                prop_assert!(next.is_ok(), "{:?} on {:?}: {:?}", change, row, next);
                let Change::Failover { to } = change else {
                    return Err(TestCaseError::fail(format!("not a failover: {change:?}")));
                };
                prop_assert_eq!(Some(to), desired[*slot as usize].as_ref());
            }
        }
    }
}
