//! Serving gates: whether this node may take appends for a slot right now, and whether its
//! cluster lease still lets it acknowledge anything at all.
//!
//! Every append passes its slot's gate before it reaches a conversation actor and holds a
//! [`GateGuard`] until it is answered. A slot is:
//! - `Serving` at some epoch: this node owns it and takes appends;
//! - `Holding`: this node owns it but is handing it to another node; new appends wait (briefly)
//!   and in-flight ones finish, so the hand-over can wait for "nothing in flight" and then archive
//!   the tail;
//! - `NotOwned`: another node (or none) owns it; the caller must route elsewhere.
//!
//! The guard protocol (increment in-flight, then read the state; the mover sets `Holding`, then
//! waits for in-flight to reach zero) guarantees that once [`Gates::wait_idle`] returns after
//! [`Gates::hold`], no append of that slot is in flight and none can start.
//!
//! The lease deadline is the node's self-fencing: the cluster's membership task moves it forward
//! after every successful renewal (its own monotonic clock, minus a safety margin), and nothing is
//! admitted or acknowledged past it. A node that runs alone has no deadline.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Serving,
    Holding,
    NotOwned,
}

const SERVING: u8 = 0;
const HOLDING: u8 = 1;
const NOT_OWNED: u8 = 2;

impl GateState {
    fn from_u8(v: u8) -> GateState {
        match v {
            SERVING => GateState::Serving,
            HOLDING => GateState::Holding,
            _ => GateState::NotOwned,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GateState::Serving => "serving",
            GateState::Holding => "holding",
            GateState::NotOwned => "not_owned",
        }
    }
}

struct SlotGate {
    state: AtomicU8,
    /// The epoch under which this node owns (or last owned) the slot.
    epoch: AtomicU64,
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    idle: Notify,
    /// Another node took the slot at this epoch without a hand-over from this one (a
    /// failover): records this node wrote under an older epoch may not be archived by it.
    lost_at: AtomicU64,
}

/// Why an append did not pass its gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// The slot is being handed over; wait for [`Gates::changed`] and try again.
    Holding,
    /// Not this node's slot (any more).
    NotOwned,
    /// The node's lease lapsed: it must not acknowledge anything.
    Fenced,
}

/// The gates of every slot plus the lease deadline. Shared by the node and the cluster tasks.
pub struct Gates {
    slots: Vec<SlotGate>,
    /// Base of `lease_deadline_ns`.
    base: Instant,
    /// Nanoseconds after `base` past which nothing is admitted or acknowledged; `u64::MAX`: none.
    lease_deadline_ns: AtomicU64,
    /// Bumped on every state change, so waiters can subscribe, re-check and wait.
    changes: watch::Sender<u64>,
    /// Bumped whenever a slot's `lost_at` rises.
    losses: AtomicU64,
}

impl Gates {
    /// A node that runs alone: every slot served at epoch 1, no lease.
    pub fn standalone(slot_count: u32) -> Arc<Gates> {
        Gates::new(slot_count, SERVING, 1, u64::MAX)
    }

    /// A cluster member before it knows anything: no slot, lease lapsed.
    pub fn clustered(slot_count: u32) -> Arc<Gates> {
        Gates::new(slot_count, NOT_OWNED, 0, 0)
    }

    fn new(slot_count: u32, state: u8, epoch: u64, deadline: u64) -> Arc<Gates> {
        Arc::new(Gates {
            slots: (0..slot_count)
                .map(|_| SlotGate {
                    state: AtomicU8::new(state),
                    epoch: AtomicU64::new(epoch),
                    in_flight: AtomicUsize::new(0),
                    idle: Notify::new(),
                    lost_at: AtomicU64::new(0),
                })
                .collect(),
            base: Instant::now(),
            lease_deadline_ns: AtomicU64::new(deadline),
            changes: watch::channel(0).0,
            losses: AtomicU64::new(0),
        })
    }

    /// Records that another node took `slot` at `epoch` without a hand-over from this one;
    /// true if that is news (the epoch is higher than any recorded before).
    pub fn mark_lost(&self, slot: u32, epoch: u64) -> bool {
        let before = self.gate(slot).lost_at.fetch_max(epoch, Ordering::SeqCst);
        let news = epoch > before;
        if news {
            self.losses.fetch_add(1, Ordering::SeqCst);
        }
        news
    }

    /// The epoch of the latest failover of `slot` away from this node (0: none known). Records of
    /// the slot written under an older epoch are kept for restore, never archived by this node.
    pub fn lost_at(&self, slot: u32) -> u64 {
        self.gate(slot).lost_at.load(Ordering::SeqCst)
    }

    /// Grows by one with every [`Gates::mark_lost`] that was news.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::SeqCst)
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    fn gate(&self, slot: u32) -> &SlotGate {
        &self.slots[slot as usize % self.slots.len()]
    }

    /// Admits one append of `slot`; the guard must live until the append is answered.
    pub fn enter(self: &Arc<Self>, slot: u32) -> Result<GateGuard, GateRefusal> {
        let gate = self.gate(slot);
        gate.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = GateGuard {
            gates: self.clone(),
            slot,
            epoch: gate.epoch.load(Ordering::SeqCst),
        };
        match GateState::from_u8(gate.state.load(Ordering::SeqCst)) {
            GateState::Serving if self.lease_valid() => Ok(guard),
            GateState::Serving => Err(GateRefusal::Fenced),
            GateState::Holding => Err(GateRefusal::Holding),
            GateState::NotOwned => Err(GateRefusal::NotOwned),
        }
    }

    pub fn state(&self, slot: u32) -> GateState {
        GateState::from_u8(self.gate(slot).state.load(Ordering::SeqCst))
    }

    pub fn epoch(&self, slot: u32) -> u64 {
        self.gate(slot).epoch.load(Ordering::SeqCst)
    }

    /// The epoch of a slot this node serves or holds; `None` when it does not own it.
    pub fn owned_epoch(&self, slot: u32) -> Option<u64> {
        match self.state(slot) {
            GateState::NotOwned => None,
            _ => Some(self.epoch(slot)),
        }
    }

    pub fn in_flight(&self, slot: u32) -> usize {
        self.gate(slot).in_flight.load(Ordering::SeqCst)
    }

    /// Slots this node owns (serving or holding).
    pub fn owned(&self) -> Vec<u32> {
        (0..self.slot_count())
            .filter(|s| self.state(*s) != GateState::NotOwned)
            .collect()
    }

    pub fn set_serving(&self, slot: u32, epoch: u64) {
        let gate = self.gate(slot);
        gate.epoch.store(epoch, Ordering::SeqCst);
        gate.state.store(SERVING, Ordering::SeqCst);
        self.bump();
    }

    /// Starts handing the slot over: new appends wait, in-flight ones finish.
    pub fn hold(&self, slot: u32) {
        self.gate(slot).state.store(HOLDING, Ordering::SeqCst);
        self.bump();
    }

    pub fn set_not_owned(&self, slot: u32, epoch: u64) {
        let gate = self.gate(slot);
        gate.epoch.store(epoch, Ordering::SeqCst);
        gate.state.store(NOT_OWNED, Ordering::SeqCst);
        self.bump();
    }

    /// Waits until no append of `slot` is in flight, at most `timeout`; true when idle.
    pub async fn wait_idle(&self, slot: u32, timeout: Duration) -> bool {
        let gate = self.gate(slot);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = gate.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if gate.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return gate.in_flight.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// A receiver that sees every later gate change: subscribe, re-check, then wait.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Lets the node acknowledge until `deadline` (after a lease renewal).
    pub fn extend_lease(&self, deadline: Instant) {
        let ns = deadline.saturating_duration_since(self.base).as_nanos() as u64;
        self.lease_deadline_ns.fetch_max(ns, Ordering::SeqCst);
        self.bump();
    }

    /// Ends the lease now (the node lost its membership row or is stopping).
    pub fn revoke_lease(&self) {
        self.lease_deadline_ns.store(0, Ordering::SeqCst);
        self.bump();
    }

    pub fn lease_valid(&self) -> bool {
        let deadline = self.lease_deadline_ns.load(Ordering::SeqCst);
        deadline == u64::MAX || (self.base.elapsed().as_nanos() as u64) < deadline
    }

    /// How long the lease still runs (`None`: no lease, a node alone).
    pub fn lease_remaining(&self) -> Option<Duration> {
        let deadline = self.lease_deadline_ns.load(Ordering::SeqCst);
        if deadline == u64::MAX {
            return None;
        }
        Some(Duration::from_nanos(
            deadline.saturating_sub(self.base.elapsed().as_nanos() as u64),
        ))
    }
}

/// One admitted append; counts as in flight until dropped.
pub struct GateGuard {
    gates: Arc<Gates>,
    slot: u32,
    epoch: u64,
}

impl GateGuard {
    /// The slot's epoch when the append was admitted: the one its WAL record carries.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        let gate = self.gates.gate(self.slot);
        if gate.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            gate.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_slot_waits_for_in_flight_appends_and_admits_none() {
        let gates = Gates::standalone(4);
        let first = gates.enter(1).expect("serving");
        gates.hold(1);
        assert_eq!(gates.enter(1).err(), Some(GateRefusal::Holding));
        assert!(!gates.wait_idle(1, Duration::from_millis(20)).await);
        let waiter = {
            let gates = gates.clone();
            tokio::spawn(async move { gates.wait_idle(1, Duration::from_secs(5)).await })
        };
        drop(first);
        assert!(waiter.await.unwrap());
        gates.set_not_owned(1, 2);
        assert_eq!(gates.enter(1).err(), Some(GateRefusal::NotOwned));
        assert_eq!(gates.in_flight(1), 0);
        assert_eq!(gates.owned_epoch(1), None);
        assert_eq!(gates.owned_epoch(0), Some(1));
    }

    #[test]
    fn a_clustered_node_admits_nothing_until_it_owns_and_holds_a_lease() {
        let gates = Gates::clustered(2);
        assert_eq!(gates.enter(0).err(), Some(GateRefusal::NotOwned));
        gates.set_serving(0, 3);
        assert_eq!(gates.enter(0).err(), Some(GateRefusal::Fenced));
        gates.extend_lease(Instant::now() + Duration::from_secs(60));
        assert!(gates.enter(0).is_ok());
        gates.revoke_lease();
        assert_eq!(gates.enter(0).err(), Some(GateRefusal::Fenced));
        assert!(!gates.lease_valid());
    }
}
