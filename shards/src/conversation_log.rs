//! The shared, in-memory log of one active conversation.
//!
//! A [`ConversationLog`] outlives any one conversation actor: the actor is the only writer, but a
//! crashed actor's successor picks up the same log, so the last assigned seq and the idempotency
//! window survive an actor restart without touching disk. Readers (HTTP pages, subscriptions) read
//! it directly and wait on [`ConversationLog::watch_durable`]; they never queue work in the actor.
//!
//! Invariants:
//! - `entries` holds a contiguous run of seqs ending at `durable_seq` (or is empty).
//! - Every message with `seq > archived_seq` is in `entries` (unarchived data is never evicted);
//!   archived messages are kept only while the conversation is under its byte cap and the node is
//!   under its ring budget.
//! - `assigned_seq >= durable_seq`; seqs between them are submitted to the WAL but not yet durable.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::watch;
use uuid::Uuid;

use crate::ids::ConversationId;
use crate::record::Message;

/// Node-wide accounting of bytes held by hot rings.
#[derive(Debug)]
pub struct RingBudget {
    used: AtomicUsize,
    /// Node-wide ceiling for archived messages kept in rings.
    limit: usize,
    /// Per-conversation cap for archived messages kept in its ring.
    per_conversation: usize,
}

impl RingBudget {
    pub fn new(limit: usize, per_conversation: usize) -> Arc<RingBudget> {
        Arc::new(RingBudget {
            used: AtomicUsize::new(0),
            limit,
            per_conversation,
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }
}

/// The result an idempotency key maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeEntry {
    pub seq: u64,
    pub id: Uuid,
    pub created_at_ms: i64,
}

/// Per-conversation window of the most recent idempotency keys.
#[derive(Debug, Default)]
pub struct DedupeWindow {
    by_key: HashMap<Box<str>, DedupeEntry>,
    order: VecDeque<Box<str>>,
    capacity: usize,
}

impl DedupeWindow {
    pub fn new(capacity: usize) -> DedupeWindow {
        DedupeWindow {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, key: &str) -> Option<DedupeEntry> {
        self.by_key.get(key).copied()
    }

    /// Remembers `key`, evicting the oldest key beyond capacity. A key already present keeps its
    /// first result.
    pub fn insert(&mut self, key: &str, entry: DedupeEntry) {
        if self.by_key.contains_key(key) {
            return;
        }
        let key: Box<str> = key.into();
        self.by_key.insert(key.clone(), entry);
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.by_key.remove(&old);
            }
        }
    }

    /// The remembered keys and their results, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = (&str, DedupeEntry)> + '_ {
        self.order
            .iter()
            .filter_map(|key| self.by_key.get(key).map(|entry| (&**key, *entry)))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[derive(Debug)]
struct LogState {
    entries: VecDeque<Arc<Message>>,
    /// Bytes of `entries`, as counted against the node budget.
    bytes: usize,
    archived_seq: u64,
}

/// What a forward read found in the ring.
#[derive(Debug)]
pub struct RingRead {
    /// First seq the ring holds (`durable_seq + 1` when it is empty). Seqs below it are archived.
    pub ring_first_seq: u64,
    pub durable_seq: u64,
    /// Messages with `seq > after_seq`, at most `limit`, in seq order, all `>= ring_first_seq`.
    pub messages: Vec<Arc<Message>>,
}

#[derive(Debug)]
pub struct ConversationLog {
    pub id: ConversationId,
    pub slot: u32,
    state: RwLock<LogState>,
    durable: watch::Sender<u64>,
    assigned: AtomicU64,
    /// Appends admitted to the actor's mailbox and not yet handled: the mailbox bound.
    pending: AtomicUsize,
    /// Idempotency window; only the conversation actor touches it.
    pub dedupe: Mutex<DedupeWindow>,
    last_activity: Mutex<Instant>,
    budget: Arc<RingBudget>,
    /// The conversation's slot went to another node: this log never advances again, and its
    /// readers must follow the conversation to its new owner.
    moved: AtomicBool,
    /// Durable messages of this log waiting in the archive queue to be shown once committed
    /// (`Shared::on_durable_hidden`): while any wait, later ones wait too, so readers see seqs
    /// in order.
    hidden: AtomicUsize,
}

impl ConversationLog {
    /// A log whose seqs `1..=last_seq` are archived and whose ring holds `recovered` (unarchived
    /// messages found in the WAL, contiguous, ending at the conversation's last seq).
    pub fn new(
        id: ConversationId,
        slot: u32,
        last_archived_seq: u64,
        recovered: Vec<Arc<Message>>,
        dedupe: DedupeWindow,
        budget: Arc<RingBudget>,
    ) -> ConversationLog {
        // Recovered messages are treated as unarchived even if some reached SQL before the crash
        // (the archiver's inserts are idempotent); everything before them is archived.
        let archived_seq = recovered
            .first()
            .map_or(last_archived_seq, |m| m.seq.saturating_sub(1));
        let durable_seq = recovered.last().map_or(last_archived_seq, |m| m.seq);
        let bytes: usize = recovered.iter().map(|m| m.approx_bytes()).sum();
        budget.used.fetch_add(bytes, Ordering::Relaxed);
        let (durable, _) = watch::channel(durable_seq);
        ConversationLog {
            id,
            slot,
            state: RwLock::new(LogState {
                entries: recovered.into(),
                bytes,
                archived_seq,
            }),
            durable,
            assigned: AtomicU64::new(durable_seq),
            pending: AtomicUsize::new(0),
            dedupe: Mutex::new(dedupe),
            last_activity: Mutex::new(Instant::now()),
            budget,
            moved: AtomicBool::new(false),
            hidden: AtomicUsize::new(0),
        }
    }

    /// A durable message of this log went to the archive queue hidden.
    pub fn hide_one(&self) {
        self.hidden.fetch_add(1, Ordering::SeqCst);
    }

    /// A hidden message of this log was shown, or left the queue (its slot was lost).
    pub fn unhide_one(&self) {
        let _ = self
            .hidden
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Whether durable messages of this log still wait hidden in the archive queue.
    pub fn has_hidden(&self) -> bool {
        self.hidden.load(Ordering::SeqCst) > 0
    }

    /// Marks the log as handed over (see `moved`) and wakes every reader waiting on it.
    pub fn mark_moved(&self) {
        self.moved.store(true, Ordering::SeqCst);
        self.durable.send_modify(|_| {});
    }

    pub fn is_moved(&self) -> bool {
        self.moved.load(Ordering::SeqCst)
    }

    pub fn durable_seq(&self) -> u64 {
        *self.durable.borrow()
    }

    pub fn assigned_seq(&self) -> u64 {
        self.assigned.load(Ordering::Acquire)
    }

    /// Reserves the next seq. Only the conversation actor calls this, one append at a time.
    pub fn assign_next(&self) -> u64 {
        self.assigned.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Gives back a seq reserved by [`assign_next`](Self::assign_next) whose record never reached
    /// the WAL queue. Only valid for the most recent reservation.
    pub fn unassign(&self, seq: u64) {
        let _ = self
            .assigned
            .compare_exchange(seq, seq - 1, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn archived_seq(&self) -> u64 {
        self.read_state().archived_seq
    }

    /// A receiver that changes whenever `durable_seq` advances.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.durable.receiver_count()
    }

    /// Admits one append into the actor's mailbox if fewer than `capacity` are waiting.
    pub fn try_admit(&self, capacity: usize) -> bool {
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        if before >= capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Called by the actor when it takes an admitted append out of its mailbox.
    pub fn release_admission(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    pub fn idle_for(&self) -> std::time::Duration {
        self.last_activity
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// True when nothing is in flight or unarchived: the log can be dropped and rebuilt from the
    /// archive later without losing anything.
    pub fn quiescent(&self) -> bool {
        let durable = self.durable_seq();
        self.pending() == 0 && self.assigned_seq() == durable && self.archived_seq() >= durable
    }

    /// Appends a message that just became durable. Called in seq order (the WAL completes in
    /// submission order and one actor submits in seq order).
    pub fn push_durable(&self, message: Arc<Message>) {
        let seq = message.seq;
        {
            let mut st = self.write_state();
            let bytes = message.approx_bytes();
            st.entries.push_back(message);
            st.bytes += bytes;
            self.budget.used.fetch_add(bytes, Ordering::Relaxed);
            self.trim(&mut st);
        }
        self.durable.send_replace(seq);
    }

    /// Records that every seq `<= seq` is in the SQL archive, and trims the ring to its budget.
    pub fn mark_archived(&self, seq: u64) {
        let mut st = self.write_state();
        if seq > st.archived_seq {
            st.archived_seq = seq;
        }
        self.trim(&mut st);
    }

    fn trim(&self, st: &mut LogState) {
        while let Some(front) = st.entries.front() {
            let over_budget = st.bytes > self.budget.per_conversation || self.budget.over();
            // Keep the newest message even when archived so live readers find the tail cheaply.
            if front.seq > st.archived_seq || !over_budget || st.entries.len() == 1 {
                break;
            }
            let bytes = front.approx_bytes();
            st.entries.pop_front();
            st.bytes -= bytes;
            self.budget.used.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Messages after `after_seq`, at most `limit`, from the ring only.
    pub fn read_after(&self, after_seq: u64, limit: usize) -> RingRead {
        let st = self.read_state();
        let durable_seq = self.durable_seq();
        let ring_first_seq = st.entries.front().map_or(durable_seq + 1, |m| m.seq);
        let start = after_seq.saturating_add(1).max(ring_first_seq);
        let skip = (start - ring_first_seq) as usize;
        let messages = st.entries.iter().skip(skip).take(limit).cloned().collect();
        RingRead {
            ring_first_seq,
            durable_seq,
            messages,
        }
    }

    /// The newest messages with `seq < before_seq`, at most `limit`, in ascending seq order, from
    /// the ring only; also returns the ring's first seq.
    pub fn read_before(&self, before_seq: u64, limit: usize) -> (u64, Vec<Arc<Message>>) {
        let st = self.read_state();
        let ring_first_seq = st.entries.front().map_or(self.durable_seq() + 1, |m| m.seq);
        let mut out: Vec<Arc<Message>> = st
            .entries
            .iter()
            .rev()
            .filter(|m| m.seq < before_seq)
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        (ring_first_seq, out)
    }

    /// The newest message, if the ring holds it.
    pub fn last_message(&self) -> Option<Arc<Message>> {
        let st = self.read_state();
        st.entries
            .back()
            .filter(|m| m.seq == self.durable_seq())
            .cloned()
    }

    pub fn ring_len(&self) -> usize {
        self.read_state().entries.len()
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, LogState> {
        // A panic while holding the lock cannot leave LogState inconsistent (every mutation is a
        // push/pop paired with its byte count), so a poisoned lock is safe to keep using.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, LogState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ConversationLog {
    fn drop(&mut self) {
        let bytes = self.read_state().bytes;
        self.budget.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ParticipantId;
    use serde_json::value::RawValue;

    fn msg(seq: u64) -> Arc<Message> {
        Arc::new(Message {
            conversation_id: ConversationId::parse("c").unwrap(),
            slot: 0,
            epoch: 0,
            seq,
            id: Uuid::now_v7(),
            created_at_ms: 0,
            sender: ParticipantId::parse("a").unwrap(),
            kind: "text".into(),
            content: RawValue::from_string("\"0123456789\"".into()).unwrap(),
            metadata: RawValue::from_string("{}".into()).unwrap(),
            idempotency_key: None,
            rendered: Default::default(),
        })
    }

    #[test]
    fn unarchived_messages_are_never_evicted() {
        let budget = RingBudget::new(0, 0);
        let log = ConversationLog::new(
            ConversationId::parse("c").unwrap(),
            0,
            0,
            vec![],
            DedupeWindow::new(4),
            budget.clone(),
        );
        for seq in 1..=100 {
            log.push_durable(msg(seq));
        }
        assert_eq!(log.ring_len(), 100);
        assert_eq!(log.read_after(0, 1000).messages.len(), 100);
        log.mark_archived(60);
        let read = log.read_after(0, 1000);
        assert_eq!(read.ring_first_seq, 61);
        assert_eq!(read.messages.first().unwrap().seq, 61);
        assert_eq!(read.messages.len(), 40);
        log.mark_archived(100);
        assert_eq!(log.ring_len(), 1, "the newest message stays");
        drop(log);
        assert_eq!(budget.used(), 0, "budget released on drop");
    }

    #[test]
    fn archived_messages_stay_within_the_per_conversation_cap() {
        let budget = RingBudget::new(usize::MAX, msg(1).approx_bytes() * 10);
        let log = ConversationLog::new(
            ConversationId::parse("c").unwrap(),
            0,
            0,
            vec![],
            DedupeWindow::new(4),
            budget,
        );
        for seq in 1..=50 {
            log.push_durable(msg(seq));
            log.mark_archived(seq);
        }
        assert_eq!(log.ring_len(), 10);
        assert_eq!(log.read_after(0, 5).ring_first_seq, 41);
        let (first, before) = log.read_before(45, 3);
        assert_eq!(first, 41);
        assert_eq!(
            before.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![42, 43, 44]
        );
    }

    #[test]
    fn recovered_messages_set_durable_and_archived_positions() {
        let log = ConversationLog::new(
            ConversationId::parse("c").unwrap(),
            0,
            5,
            vec![msg(6), msg(7)],
            DedupeWindow::new(4),
            RingBudget::new(1 << 20, 1 << 16),
        );
        assert_eq!(log.durable_seq(), 7);
        assert_eq!(log.assigned_seq(), 7);
        assert_eq!(log.archived_seq(), 5);
        assert!(!log.quiescent());
        log.mark_archived(7);
        assert!(log.quiescent());
    }

    #[test]
    fn admission_is_bounded() {
        let log = ConversationLog::new(
            ConversationId::parse("c").unwrap(),
            0,
            0,
            vec![],
            DedupeWindow::new(4),
            RingBudget::new(1, 1),
        );
        assert!(log.try_admit(2));
        assert!(log.try_admit(2));
        assert!(!log.try_admit(2));
        log.release_admission();
        assert!(log.try_admit(2));
    }

    #[test]
    fn dedupe_window_is_bounded_and_keeps_first_result() {
        let mut w = DedupeWindow::new(2);
        let e = |seq| DedupeEntry {
            seq,
            id: Uuid::nil(),
            created_at_ms: 0,
        };
        w.insert("a", e(1));
        w.insert("a", e(9));
        assert_eq!(w.get("a").unwrap().seq, 1);
        w.insert("b", e(2));
        w.insert("c", e(3));
        assert!(w.get("a").is_none());
        assert_eq!(w.len(), 2);
    }
}
