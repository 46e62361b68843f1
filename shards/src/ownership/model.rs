//! Model-based test of slot ownership under races: a simulated `slot_owners` table with
//! compare-and-swap writes, nodes whose leases lapse and come back, crashes and restarts, drains,
//! and several rebalancers that plan from stale snapshots and fail over the slots of nodes they
//! saw dead — all interleaved arbitrarily, so a dead node regularly comes back and tries to
//! reclaim slots that were failed over meanwhile.
//!
//! The store does what the SQL layer must do in one transaction: compare the row the actor read
//! with the current row, then [`apply`] the change against the membership *at write time*. A
//! checker that shares no code with [`apply`] judges every successful write and, after every step,
//! the whole table:
//! - a slot's epoch never goes back, and moves by at most one per write;
//! - every change of owner raises the epoch by exactly one, and over the whole history each
//!   `(slot, epoch)` names at most one owner; a reclaim raises it too, fencing the owner's
//!   previous incarnation;
//! - a slot is only handed to (assigned to, moved to, failed over to) or marked moving toward a
//!   node that is alive and active at the time of the write;
//! - a slot leaves an owner that is alive at the time of the write only to the target of its move
//!   (a live owner's slot is never failed over), and a slot taken from a dead owner is `active`
//!   (a failover abandons the move).
//!
//! At the end, the faults heal and a lone rebalancer must reach the desired placement. (`max_moves`
//! is only checked there: it is a cluster-wide bound because one elected rebalancer plans at a
//! time, and racing planners may together exceed it.)
//!
//! The checker is itself tested: with a deliberately broken `apply`, or a store that skips the
//! row comparison, the same generator must find a violation.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRng, TestRunner};

use super::*;

/// What a store applies a change with: [`apply`], or a broken variant to test the checker.
type ApplyFn = fn(&SlotRow, &Change, &[NodeView]) -> Result<SlotRow, Refusal>;

/// How the simulated store decides a write.
#[derive(Clone, Copy)]
struct Rules {
    apply: ApplyFn,
    /// Compare the row the actor read with the current one (the CAS). Off only to test the
    /// checker.
    compare_rows: bool,
}

const RULES: Rules = Rules {
    apply,
    compare_rows: true,
};

/// One step of the simulation. Indices are taken modulo the number of nodes or actors.
#[derive(Debug, Clone)]
enum Op {
    /// A node's lease lapses (a pause, a partition); `declare_dead` also persists `dead`.
    Expire {
        node: usize,
        declare_dead: bool,
    },
    /// The lease is renewed again; a node declared dead rejoins as `joining`.
    Renew {
        node: usize,
    },
    /// `Renew`, and the node at once reclaims every slot it owned when it last read the table
    /// (before it lapsed, typically): the race of a returning node against a failover.
    ComeBack {
        node: usize,
    },
    /// Crash and restart with the data dir: in-flight intentions are lost; the node comes back
    /// alive (a node that had left or was declared dead as `joining`) and must reclaim its slots.
    Restart {
        node: usize,
    },
    Drain {
        node: usize,
    },
    Undrain {
        node: usize,
    },
    /// A draining node that owns nothing becomes `drained`, or `left` (and stops).
    FinishDrain {
        node: usize,
        leave: bool,
    },
    /// A joining node becomes active.
    Activate {
        node: usize,
    },
    /// An actor (rebalancer or node) reads the table and the membership.
    Read {
        actor: usize,
    },
    /// An actor decides what to write from what it last read (after reading afresh if `fresh`):
    /// a rebalancer runs [`plan`], and, if bit 0 of `choices` is set, [`plan_failover`] for every
    /// node it saw dead (`failover = auto`, or an operator); a node reclaims its slots if it must,
    /// and otherwise completes (three times in four, by two `choices` bits per slot) or cancels
    /// the moves of the slots it owns.
    Decide {
        actor: usize,
        fresh: bool,
        choices: u64,
    },
    /// An actor tries its next `count` writes.
    Write {
        actor: usize,
        count: usize,
    },
    /// `Decide`, then `Write`: an actor that acts at once on what it decides.
    Act {
        actor: usize,
        fresh: bool,
        choices: u64,
        count: usize,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    node_count: usize,
    rebalancers: usize,
    slot_count: u32,
    max_moves: usize,
    vnodes: u32,
    /// Bit `i`: node `i` starts `joining` instead of `active`.
    joining: u8,
    ops: Vec<Op>,
}

/// An actor's memory: what it read, and what it means to write.
#[derive(Default)]
struct Actor {
    /// Rows and membership as of its last read, possibly long out of date.
    snapshot: Option<(Vec<SlotRow>, Vec<NodeView>)>,
    /// Decided writes not tried yet: the row as read, and the change.
    intents: VecDeque<(SlotRow, Change)>,
    /// A node that restarted or regained its lease reclaims its slots before anything else.
    reclaim_due: bool,
}

/// What happened over a run, to check that the generator reaches every path.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    assigned: usize,
    begun: usize,
    completed: usize,
    cancelled: usize,
    reclaimed: usize,
    failed_over: usize,
    /// A returning node's reclaim of a slot that had been failed over (it lost the race).
    reclaims_lost: usize,
    /// The row had changed since the actor read it.
    conflicts: usize,
    /// The row was as read, but the change no longer applied (mostly membership changed).
    refused: usize,
}

struct Cluster {
    rules: Rules,
    nodes: Vec<NodeView>,
    table: Vec<SlotRow>,
    /// Every `(slot, epoch)` ever written, with its owner.
    history: BTreeMap<(u32, u64), Option<String>>,
    /// Highest epoch each slot has had.
    high_water: Vec<u64>,
    stats: Stats,
}

impl Cluster {
    fn new(scenario: &Scenario, rules: Rules) -> Cluster {
        let nodes = (0..scenario.node_count)
            .map(|i| NodeView {
                id: format!("node-{i}"),
                state: if scenario.joining & (1 << i) != 0 {
                    NodeState::Joining
                } else {
                    NodeState::Active
                },
                alive: true,
            })
            .collect();
        let table: Vec<SlotRow> = (0..scenario.slot_count).map(SlotRow::unassigned).collect();
        Cluster {
            rules,
            nodes,
            history: table.iter().map(|row| ((row.slot, 0), None)).collect(),
            high_water: vec![0; table.len()],
            table,
            stats: Stats::default(),
        }
    }

    fn receives(&self, id: &str) -> bool {
        self.nodes
            .iter()
            .any(|node| node.id == id && node.alive && node.state == NodeState::Active)
    }

    /// The store's compare-and-swap. `Err` is a broken invariant; conflicts and refusals are
    /// ordinary outcomes.
    fn write(&mut self, read: &SlotRow, change: &Change) -> Result<(), String> {
        let current = &self.table[read.slot as usize];
        if self.rules.compare_rows && current != read {
            self.stats.conflicts += 1;
            if matches!(change, Change::Reclaim { node } if current.owner.as_ref() != Some(node)) {
                self.stats.reclaims_lost += 1;
            }
            return Ok(());
        }
        // Without the comparison, the row computed from a stale read overwrites whatever is there
        // (`UPDATE … WHERE slot = $s` alone).
        let old = current.clone();
        let new = match (self.rules.apply)(read, change, &self.nodes) {
            Ok(new) => new,
            Err(_) => {
                self.stats.refused += 1;
                return Ok(());
            }
        };
        self.check_write(&old, change, &new)?;
        let stat = match change {
            Change::Assign { .. } => &mut self.stats.assigned,
            Change::BeginMove { .. } => &mut self.stats.begun,
            Change::CompleteMove => &mut self.stats.completed,
            Change::CancelMove => &mut self.stats.cancelled,
            Change::Reclaim { .. } => &mut self.stats.reclaimed,
            Change::Failover { .. } => &mut self.stats.failed_over,
        };
        *stat += 1;
        self.table[old.slot as usize] = new;
        Ok(())
    }

    /// Judges one write from the old and new rows alone.
    fn check_write(&mut self, old: &SlotRow, change: &Change, new: &SlotRow) -> Result<(), String> {
        let what = || format!("{change:?}: {old:?} → {new:?} with {:?}", self.nodes);
        if new.slot != old.slot {
            return Err(format!("the row changed slot: {}", what()));
        }
        if new.epoch < old.epoch || new.epoch - old.epoch > 1 {
            return Err(format!("the epoch moved by more than +1: {}", what()));
        }
        if matches!(change, Change::Reclaim { .. }) && new.epoch != old.epoch + 1 {
            return Err(format!(
                "a reclaim must fence the old incarnation: {}",
                what()
            ));
        }
        if new.owner != old.owner {
            if new.epoch != old.epoch + 1 {
                return Err(format!("owner changed without epoch + 1: {}", what()));
            }
            if let Some(previous) = &old.owner {
                let alive = self.nodes.iter().any(|n| &n.id == previous && n.alive);
                let moved_to_target = matches!(&old.state, SlotState::Moving { target } if Some(target) == new.owner.as_ref());
                if alive && !moved_to_target {
                    return Err(format!("a live owner's slot was taken: {}", what()));
                }
                if !alive && new.state != SlotState::Active {
                    return Err(format!(
                        "a slot taken from a dead owner kept its move: {}",
                        what()
                    ));
                }
            }
            match &new.owner {
                None => return Err(format!("the owner was removed: {}", what())),
                Some(owner) if !self.receives(owner) => {
                    return Err(format!("handed to a node that cannot receive: {}", what()))
                }
                Some(_) => {}
            }
        }
        if let SlotState::Moving { target } = &new.state {
            let began = old.state != new.state;
            if began && (!self.receives(target) || new.owner.as_ref() == Some(target)) {
                return Err(format!(
                    "moving toward a node that cannot receive: {}",
                    what()
                ));
            }
            if new.owner.is_none() {
                return Err(format!("moving without an owner: {}", what()));
            }
        }
        let key = (new.slot, new.epoch);
        match self.history.get(&key) {
            Some(owner) if *owner != new.owner => {
                return Err(format!(
                    "slot {} epoch {} had owner {owner:?}, now {:?}: {}",
                    new.slot,
                    new.epoch,
                    new.owner,
                    what()
                ))
            }
            Some(_) => {}
            None => {
                self.history.insert(key, new.owner.clone());
            }
        }
        Ok(())
    }

    /// Checks the whole table after a step.
    fn check_table(&mut self) -> Result<(), String> {
        for (row, high) in self.table.iter().zip(&mut self.high_water) {
            if row.epoch < *high {
                return Err(format!(
                    "slot {} went back to epoch {}",
                    row.slot, row.epoch
                ));
            }
            *high = row.epoch;
            if self.history.get(&(row.slot, row.epoch)) != Some(&row.owner) {
                return Err(format!("{row:?} disagrees with the history"));
            }
        }
        Ok(())
    }

    fn owns_nothing(&self, id: &str) -> bool {
        self.table
            .iter()
            .all(|row| row.owner.as_deref() != Some(id))
    }
}

/// Runs a scenario; `Err` names the first broken invariant. The stats cover the racing steps, not
/// the final healing.
fn run(scenario: &Scenario, rules: Rules) -> Result<Stats, String> {
    let mut cluster = Cluster::new(scenario, rules);
    let mut actors: Vec<Actor> = (0..scenario.rebalancers + scenario.node_count)
        .map(|_| Actor::default())
        .collect();

    for (step, op) in scenario.ops.iter().enumerate() {
        step_once(scenario, &mut cluster, &mut actors, op)
            .map_err(|violation| format!("step {step} ({op:?}): {violation}"))?;
        cluster
            .check_table()
            .map_err(|violation| format!("after step {step} ({op:?}): {violation}"))?;
    }
    let stats = cluster.stats;
    heal_and_converge(scenario, &mut cluster)?;
    Ok(stats)
}

fn step_once(
    scenario: &Scenario,
    cluster: &mut Cluster,
    actors: &mut [Actor],
    op: &Op,
) -> Result<(), String> {
    let node_index = |node: usize| node % scenario.node_count;
    let node_actor = |node: usize| scenario.rebalancers + node;
    match *op {
        Op::Expire { node, declare_dead } => {
            let view = &mut cluster.nodes[node_index(node)];
            view.alive = false;
            if declare_dead && view.state != NodeState::Left {
                view.state = NodeState::Dead;
            }
        }
        Op::Renew { node } => {
            let node = node_index(node);
            let view = &mut cluster.nodes[node];
            if !view.alive && view.state != NodeState::Left {
                view.alive = true;
                if view.state == NodeState::Dead {
                    view.state = NodeState::Joining;
                }
                actors[node_actor(node)].reclaim_due = true;
            }
        }
        Op::ComeBack { node } => {
            let actor = scenario.rebalancers + node_index(node);
            step_once(scenario, cluster, actors, &Op::Renew { node })?;
            if !actors[actor].reclaim_due {
                // It had not lapsed: nothing to come back from.
                return Ok(());
            }
            let decide = Op::Decide {
                actor,
                fresh: false,
                choices: 0,
            };
            step_once(scenario, cluster, actors, &decide)?;
            let count = scenario.slot_count as usize;
            step_once(scenario, cluster, actors, &Op::Write { actor, count })?;
        }
        Op::Restart { node } => {
            let node = node_index(node);
            let view = &mut cluster.nodes[node];
            view.alive = true;
            if matches!(view.state, NodeState::Dead | NodeState::Left) {
                view.state = NodeState::Joining;
            }
            actors[node_actor(node)] = Actor {
                reclaim_due: true,
                ..Actor::default()
            };
        }
        Op::Drain { node } => {
            let view = &mut cluster.nodes[node_index(node)];
            if view.state == NodeState::Active {
                view.state = NodeState::Draining;
            }
        }
        Op::Undrain { node } => {
            let view = &mut cluster.nodes[node_index(node)];
            if matches!(view.state, NodeState::Draining | NodeState::Drained) {
                view.state = NodeState::Active;
            }
        }
        Op::FinishDrain { node, leave } => {
            let node = node_index(node);
            let id = cluster.nodes[node].id.clone();
            if cluster.nodes[node].state == NodeState::Draining && cluster.owns_nothing(&id) {
                let view = &mut cluster.nodes[node];
                if leave {
                    view.state = NodeState::Left;
                    view.alive = false;
                } else {
                    view.state = NodeState::Drained;
                }
            }
        }
        Op::Activate { node } => {
            let view = &mut cluster.nodes[node_index(node)];
            if view.state == NodeState::Joining {
                view.state = NodeState::Active;
            }
        }
        Op::Read { actor } => {
            let actor = &mut actors[actor % actors.len()];
            actor.snapshot = Some((cluster.table.clone(), cluster.nodes.clone()));
        }
        Op::Decide {
            actor,
            fresh,
            choices,
        } => {
            let index = actor % actors.len();
            let actor = &mut actors[index];
            if fresh {
                actor.snapshot = Some((cluster.table.clone(), cluster.nodes.clone()));
            }
            let Some((rows, nodes)) = &actor.snapshot else {
                return Ok(());
            };
            if index < scenario.rebalancers {
                let mut plan = plan(rows, nodes, scenario.max_moves, scenario.vnodes);
                if choices & 1 == 1 {
                    // `plan` never touches a dead owner's slots, so the two never meet on a slot.
                    for dead in nodes.iter().filter(|node| !node.alive) {
                        plan.extend(plan_failover(rows, nodes, &dead.id, scenario.vnodes));
                    }
                }
                actor.intents = plan
                    .into_iter()
                    .map(|(slot, change)| (rows[slot as usize].clone(), change))
                    .collect();
            } else {
                let id = &cluster.nodes[index - scenario.rebalancers].id;
                let mine = rows.iter().filter(|row| row.owner.as_ref() == Some(id));
                let reclaim = std::mem::take(&mut actor.reclaim_due);
                actor.intents = mine
                    .filter_map(|row| {
                        let change = if reclaim {
                            Change::Reclaim { node: id.clone() }
                        } else if row.state == SlotState::Active {
                            return None;
                        } else if (choices >> (2 * (row.slot % 32))) & 0b11 != 0 {
                            Change::CompleteMove
                        } else {
                            Change::CancelMove
                        };
                        Some((row.clone(), change))
                    })
                    .collect();
            }
        }
        Op::Write { actor, count } => {
            let actor = &mut actors[actor % actors.len()];
            for _ in 0..count {
                let Some((read, change)) = actor.intents.pop_front() else {
                    break;
                };
                cluster.write(&read, &change)?;
            }
        }
        Op::Act {
            actor,
            fresh,
            choices,
            count,
        } => {
            let decide = Op::Decide {
                actor,
                fresh,
                choices,
            };
            step_once(scenario, cluster, actors, &decide)?;
            step_once(scenario, cluster, actors, &Op::Write { actor, count })?;
        }
    }
    Ok(())
}

/// Every fault heals; one rebalancer plans from fresh reads and owners complete every move, until
/// the plan is empty. Alone, the rebalancer is never refused and keeps within `max_moves` (racing
/// ones may have overshot it: it then starts nothing new). Every slot must end, active, on its
/// desired owner.
fn heal_and_converge(scenario: &Scenario, cluster: &mut Cluster) -> Result<(), String> {
    for view in &mut cluster.nodes {
        view.alive = true;
        if !matches!(view.state, NodeState::Draining | NodeState::Drained) {
            view.state = NodeState::Active;
        }
    }
    if !cluster.nodes.iter().any(|n| n.state == NodeState::Active) {
        cluster.nodes[0].state = NodeState::Active;
    }
    for _round in 0..2 * scenario.slot_count + 4 {
        let rows = cluster.table.clone();
        let plan = plan(&rows, &cluster.nodes, scenario.max_moves, scenario.vnodes);
        let settled = rows.iter().all(|row| row.state == SlotState::Active);
        if plan.is_empty() && settled {
            let desired = desired(&cluster.nodes, scenario.slot_count, scenario.vnodes);
            for row in &cluster.table {
                if row.owner != desired[row.slot as usize] {
                    return Err(format!("settled off the placement: {row:?}"));
                }
            }
            return Ok(());
        }
        let refused_before = cluster.stats.refused + cluster.stats.conflicts;
        for (slot, change) in &plan {
            cluster.write(&rows[*slot as usize], change)?;
        }
        let moving: Vec<SlotRow> = cluster
            .table
            .iter()
            .filter(|row| row.state != SlotState::Active)
            .cloned()
            .collect();
        let began = plan
            .iter()
            .any(|(_, change)| matches!(change, Change::BeginMove { .. }));
        if began && moving.len() > scenario.max_moves {
            return Err(format!(
                "{} slots moving, max_moves {}",
                moving.len(),
                scenario.max_moves
            ));
        }
        for row in &moving {
            cluster.write(row, &Change::CompleteMove)?;
        }
        if cluster.stats.refused + cluster.stats.conflicts != refused_before {
            return Err(format!(
                "a lone rebalancer was refused; table {:?}",
                cluster.table
            ));
        }
        cluster.check_table()?;
    }
    Err(format!("no fixed point; table {:?}", cluster.table))
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0usize..5;
    let actor = 0usize..8;
    prop_oneof![
        1 => (node.clone(), any::<bool>())
            .prop_map(|(node, declare_dead)| Op::Expire { node, declare_dead }),
        2 => node.clone().prop_map(|node| Op::Renew { node }),
        2 => node.clone().prop_map(|node| Op::ComeBack { node }),
        1 => node.clone().prop_map(|node| Op::Restart { node }),
        1 => node.clone().prop_map(|node| Op::Drain { node }),
        1 => node.clone().prop_map(|node| Op::Undrain { node }),
        1 => (node.clone(), any::<bool>())
            .prop_map(|(node, leave)| Op::FinishDrain { node, leave }),
        2 => node.prop_map(|node| Op::Activate { node }),
        3 => actor.clone().prop_map(|actor| Op::Read { actor }),
        4 => (actor.clone(), any::<bool>(), any::<u64>())
            .prop_map(|(actor, fresh, choices)| Op::Decide { actor, fresh, choices }),
        6 => (actor.clone(), 1usize..=8).prop_map(|(actor, count)| Op::Write { actor, count }),
        8 => (actor, any::<bool>(), any::<u64>(), 1usize..=8).prop_map(
            |(actor, fresh, choices, count)| Op::Act { actor, fresh, choices, count }
        ),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        3usize..=5,
        2usize..=3,
        4u32..=40,
        1usize..=6,
        4u32..=32,
        any::<u8>(),
        prop::collection::vec(op(), 1..150),
    )
        .prop_map(
            |(node_count, rebalancers, slot_count, max_moves, vnodes, joining, ops)| Scenario {
                node_count,
                rebalancers,
                slot_count,
                max_moves,
                vnodes,
                // Most runs start fully active; some with a node or two still joining.
                joining: joining & joining.rotate_left(3) & joining.rotate_left(5),
                ops,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ownership_stays_fenced_under_stale_planners_crashes_and_lease_loss(scenario in scenario()) {
        if let Err(violation) = run(&scenario, RULES) {
            prop_assert!(false, "{}", violation);
        }
    }
}

/// Runs the generator deterministically (so the test cannot flake) against `rules` and returns
/// the first violation found, if any, plus the summed stats of the runs without one.
fn search(rules: Rules, cases: u32) -> (Option<String>, Stats) {
    let config = Config {
        cases,
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let total = std::cell::Cell::new(Stats::default());
    let outcome = runner.run(&scenario(), |scenario| {
        let stats = run(&scenario, rules).map_err(TestCaseError::fail)?;
        let sum = total.get();
        total.set(Stats {
            assigned: sum.assigned + stats.assigned,
            begun: sum.begun + stats.begun,
            completed: sum.completed + stats.completed,
            cancelled: sum.cancelled + stats.cancelled,
            reclaimed: sum.reclaimed + stats.reclaimed,
            failed_over: sum.failed_over + stats.failed_over,
            reclaims_lost: sum.reclaims_lost + stats.reclaims_lost,
            conflicts: sum.conflicts + stats.conflicts,
            refused: sum.refused + stats.refused,
        });
        Ok(())
    });
    (outcome.err().map(|e| e.to_string()), total.get())
}

#[test]
fn the_generator_reaches_every_transition_and_race() {
    let (violation, stats) = search(RULES, 128);
    assert_eq!(violation, None);
    let Stats {
        assigned,
        begun,
        completed,
        cancelled,
        reclaimed,
        failed_over,
        reclaims_lost,
        conflicts,
        refused,
    } = stats;
    for (what, count) in [
        ("assigned", assigned),
        ("begun", begun),
        ("completed", completed),
        ("cancelled", cancelled),
        ("reclaimed", reclaimed),
        ("failed_over", failed_over),
        ("reclaims_lost", reclaims_lost),
        ("conflicts", conflicts),
        ("refused", refused),
    ] {
        assert!(count >= 20, "only {count} {what} in 128 runs: {stats:?}");
    }
}

/// The race spelled out: a node is failed over while dead, comes back, and reclaims from what it
/// read before it died. Every reclaim loses its compare-and-swap; the slots stay with the nodes
/// that took them, at the failover's epoch.
#[test]
fn a_dead_node_that_comes_back_loses_its_slots_to_the_failover() {
    let rebalancers = 1;
    let victim = 2;
    let victim_actor = rebalancers + victim;
    let scenario = Scenario {
        node_count: 3,
        rebalancers,
        slot_count: 24,
        max_moves: 4,
        vnodes: 16,
        joining: 0,
        ops: vec![
            Op::Act {
                actor: 0,
                fresh: true,
                choices: 0,
                count: 24,
            },
            Op::Read {
                actor: victim_actor,
            },
            Op::Expire {
                node: victim,
                declare_dead: true,
            },
            Op::Act {
                actor: 0,
                fresh: true,
                choices: 1,
                count: 24,
            },
            Op::Renew { node: victim },
            Op::Act {
                actor: victim_actor,
                fresh: false,
                choices: 0,
                count: 24,
            },
        ],
    };
    let mut cluster = Cluster::new(&scenario, RULES);
    let mut actors: Vec<Actor> = (0..scenario.rebalancers + scenario.node_count)
        .map(|_| Actor::default())
        .collect();
    let mut owned_by_victim = 0;
    for (step, op) in scenario.ops.iter().enumerate() {
        step_once(&scenario, &mut cluster, &mut actors, op).unwrap();
        cluster.check_table().unwrap();
        if step == 0 {
            owned_by_victim = cluster
                .table
                .iter()
                .filter(|row| row.owner.as_deref() == Some("node-2"))
                .count();
        }
    }
    assert!(
        owned_by_victim > 0,
        "node-2 owned nothing: {:?}",
        cluster.table
    );
    let stats = cluster.stats;
    assert_eq!(stats.failed_over, owned_by_victim, "{stats:?}");
    assert_eq!(stats.reclaimed, 0, "{stats:?}");
    assert_eq!(stats.reclaims_lost, owned_by_victim, "{stats:?}");
    for row in &cluster.table {
        assert_ne!(row.owner.as_deref(), Some("node-2"), "{row:?}");
        assert!(row.epoch <= 2, "{row:?}");
    }
    // And run as a whole, the faults healed, it settles on the placement.
    run(&scenario, RULES).unwrap();
}

/// Each broken rule must be caught by the checker within the same budget of runs as the property.
fn assert_caught(rules: Rules, expected: &str) {
    let (violation, _) = search(rules, 512);
    let violation = violation.expect("the broken rule went unnoticed");
    assert!(violation.contains(expected), "{violation}");
}

#[test]
fn a_complete_move_that_keeps_the_epoch_is_caught() {
    fn keeps_epoch(row: &SlotRow, change: &Change, nodes: &[NodeView]) -> Result<SlotRow, Refusal> {
        let next = apply(row, change, nodes)?;
        Ok(match change {
            Change::CompleteMove => SlotRow {
                epoch: row.epoch,
                ..next
            },
            _ => next,
        })
    }
    assert_caught(
        Rules {
            apply: keeps_epoch,
            compare_rows: true,
        },
        "owner changed without epoch + 1",
    );
}

#[test]
fn a_complete_move_to_a_lapsed_or_draining_target_is_caught() {
    fn ignores_target(
        row: &SlotRow,
        change: &Change,
        nodes: &[NodeView],
    ) -> Result<SlotRow, Refusal> {
        match (change, &row.state, &row.owner) {
            (Change::CompleteMove, SlotState::Moving { target }, Some(_)) => Ok(SlotRow {
                slot: row.slot,
                owner: Some(target.clone()),
                epoch: row.epoch + 1,
                state: SlotState::Active,
            }),
            _ => apply(row, change, nodes),
        }
    }
    assert_caught(
        Rules {
            apply: ignores_target,
            compare_rows: true,
        },
        "handed to a node that cannot receive",
    );
}

#[test]
fn a_failover_of_a_live_owner_is_caught() {
    // Judging liveness from the failing-over actor's stale snapshot instead of at write time.
    fn ignores_liveness(
        row: &SlotRow,
        change: &Change,
        nodes: &[NodeView],
    ) -> Result<SlotRow, Refusal> {
        match change {
            Change::Failover { to } if row.owner.is_some() => {
                require_active(to, nodes)?;
                Ok(SlotRow {
                    slot: row.slot,
                    owner: Some(to.clone()),
                    epoch: row.epoch + 1,
                    state: SlotState::Active,
                })
            }
            _ => apply(row, change, nodes),
        }
    }
    assert_caught(
        Rules {
            apply: ignores_liveness,
            compare_rows: true,
        },
        "a live owner's slot was taken",
    );
}

#[test]
fn a_store_without_compare_and_swap_is_caught() {
    // Stale planners then apply their changes to rows they never read.
    assert_caught(
        Rules {
            apply,
            compare_rows: false,
        },
        "",
    );
}
