//! State shared by the node handle, the slot actors and the conversation actors: the per-slot
//! registries of logs and actors, the archive queue, and the admission and acknowledgement
//! bookkeeping every append passes through. It holds no task of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{broadcast, Notify};

use super::{Activation, NodeConfig, NodeError, TryAgainReason};
use crate::actor::conversation::{AppendOutcome, AppendReply};
use crate::actor::ConversationHandle;
use crate::archive::Archive;
use crate::conversation_log::{ConversationLog, RingBudget};
use crate::gate::GateGuard;
use crate::gate::Gates;
use crate::ids::ConversationId;
use crate::metrics as m;
use crate::record::Message;
use crate::wal::{Lsn, Wal};

/// Conversations of one slot known to this node.
#[derive(Default)]
pub struct SlotRegistry {
    /// Every live log: those of active actors and those rebuilt by WAL recovery.
    pub logs: HashMap<ConversationId, Arc<ConversationLog>>,
    pub handles: HashMap<ConversationId, ConversationHandle>,
    /// Conversations whose actor is starting: one entry per conversation, which every caller
    /// that needs its handle meanwhile waits on. Never both here and in `handles`.
    pub activating: HashMap<ConversationId, Activation>,
}

pub(super) struct ArchiveItem {
    pub(super) lsn: Lsn,
    pub(super) message: Arc<Message>,
    pub(super) log: Arc<ConversationLog>,
    pub(super) durable_at: Instant,
    /// With `ack_after_archive`: the append's answer, given once the batch holding it is
    /// committed. `None`: answered already.
    pub(super) ack: Option<PendingAck>,
    /// Not visible to readers yet (`ack_after_archive`): made visible once committed.
    pub(super) hidden: bool,
}

impl ArchiveItem {
    /// A record durable now, answered and visible already.
    pub(super) fn durable(lsn: Lsn, message: Arc<Message>, log: Arc<ConversationLog>) -> Self {
        ArchiveItem {
            lsn,
            message,
            log,
            durable_at: Instant::now(),
            ack: None,
            hidden: false,
        }
    }
}

/// An append that is durable in the WAL and waits for its archive commit to be answered.
pub struct PendingAck {
    pub reply: AppendReply,
    pub outcome: AppendOutcome,
    pub admitted_at: Instant,
    /// Keeps the append in flight on its slot (a hand-over waits for it) until answered.
    pub guard: GateGuard,
}

/// Durable messages waiting for the archiver, in LSN order. Bounded by admission: appends are
/// refused while `bytes` exceeds the configured backlog.
#[derive(Default)]
pub struct ArchiveQueue {
    pub(super) items: Mutex<VecDeque<ArchiveItem>>,
    pub(super) notify: Notify,
    pub(super) bytes: AtomicUsize,
    /// Store what is queued now instead of letting a partial batch linger (a slot hand-over
    /// waits for its tail to be archived).
    pub(super) urgent: AtomicBool,
}

impl ArchiveQueue {
    pub(super) fn push(&self, item: ArchiveItem) {
        self.bytes
            .fetch_add(item.message.approx_bytes(), Ordering::Relaxed);
        self.items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(item);
        self.notify.notify_one();
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// State shared by the node handle, the slot actors and the conversation actors.
pub struct Shared {
    pub config: NodeConfig,
    pub wal: Wal,
    pub archive: Arc<dyn Archive>,
    pub budget: Arc<RingBudget>,
    pub(super) registries: Vec<Mutex<SlotRegistry>>,
    pub archive_queue: ArchiveQueue,
    /// Which slots this node serves, and its lease.
    pub gates: Arc<Gates>,
    pub(super) stopping: AtomicBool,
    /// Every message that became durable, for node-wide watchers (inbox). Lossy by design: a
    /// lagging receiver is told so and rebuilds from the logs.
    pub(super) durable_events: broadcast::Sender<DurableEvent>,
    /// Metric handles of the per-record ack path, registered once: the WAL writer thread runs
    /// `record_ack` for every record, and a registry lookup (plus a `slot.to_string()`) per
    /// record was a measurable share of its CPU.
    pub(super) ack_metrics: AckMetrics,
    /// Messages of slots this node lost while it was away, waiting to be written back into the
    /// seqs reserved for them; the WAL keeps their records until then.
    pub(super) restore: Mutex<PendingRestore>,
    /// Entries in every slot's `activating`: the node-wide count `max_activations` bounds.
    pub(super) activations: AtomicUsize,
    /// Set when a slot was taken from this node while it held records of it (see
    /// [`Shared::extract_lost_slots`]).
    pub(super) lost_slots: AtomicBool,
}

/// See [`Shared::restore`].
#[derive(Default)]
pub(super) struct PendingRestore {
    /// Per conversation, with the lowest LSN among its records.
    pub(super) batches: Vec<(RestoreBatch, Lsn)>,
    next_id: u64,
}

impl PendingRestore {
    /// Keeps `messages` (one conversation's, in seq order; `lsn` the lowest of their records)
    /// for restore.
    pub(super) fn keep(&mut self, messages: Vec<Arc<Message>>, lsn: Lsn) {
        let Some(first) = messages.first() else {
            return;
        };
        self.next_id += 1;
        let batch = RestoreBatch {
            id: self.next_id,
            conversation_id: first.conversation_id.clone(),
            slot: first.slot,
            messages,
        };
        self.batches.push((batch, lsn));
    }

    /// The WAL checkpoint stays below this LSN.
    pub(super) fn pin(&self) -> Option<Lsn> {
        self.batches.iter().map(|(_, lsn)| *lsn).min()
    }
}

/// Messages of one conversation this node acknowledged in a slot that was failed over while it
/// was away (or cut off), to be written back into the seqs reserved for them by the slot's
/// owner ([`super::Node::restore`]).
#[derive(Debug, Clone)]
pub struct RestoreBatch {
    /// Names the batch for [`super::Node::restore_done`].
    pub id: u64,
    pub conversation_id: ConversationId,
    pub slot: u32,
    /// In seq order.
    pub messages: Vec<Arc<Message>>,
}

pub(super) struct AckMetrics {
    latency: metrics::Histogram,
    ok: metrics::Counter,
    /// Indexed by slot.
    slot_appends: Vec<metrics::Counter>,
    /// The same counts, readable here (the slot map reports them; a recorder's are write-only).
    pub(super) slot_appends_seen: Vec<AtomicU64>,
    /// Catch-up reads the hot ring answered: every live delivery is one.
    pub(super) ring_reads: metrics::Counter,
}

impl AckMetrics {
    /// Registers with the recorder installed now (install it before `Node::start`).
    pub(super) fn register(slot_count: u32) -> AckMetrics {
        AckMetrics {
            latency: metrics::histogram!(m::APPEND_ACK_SECONDS),
            ok: metrics::counter!(m::APPENDS_TOTAL, "result" => "ok"),
            slot_appends: (0..slot_count)
                .map(|slot| metrics::counter!(m::SLOT_APPENDS_TOTAL, "slot" => slot.to_string()))
                .collect(),
            slot_appends_seen: (0..slot_count).map(|_| AtomicU64::new(0)).collect(),
            ring_reads: metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "ring"),
        }
    }
}

/// A message became durable.
#[derive(Debug, Clone)]
pub struct DurableEvent {
    pub conversation_id: ConversationId,
    pub seq: u64,
    pub message: Arc<Message>,
}

impl Shared {
    /// The highest LSN the WAL checkpoint may move to, given that `archived` is archived.
    pub(super) fn checkpoint_limit(&self, archived: Lsn) -> Lsn {
        match self.restore.lock().unwrap_or_else(|e| e.into_inner()).pin() {
            Some(pin) => archived.min(pin.saturating_sub(1)),
            None => archived,
        }
    }

    pub fn registry(&self, slot: u32) -> MutexGuard<'_, SlotRegistry> {
        self.registries[slot as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Checks node-wide admission for one append.
    pub fn admit_append(&self) -> Result<(), TryAgainReason> {
        if self.stopping.load(Ordering::Relaxed) || self.wal.poisoned() {
            return Err(TryAgainReason::Unavailable);
        }
        if !self.gates.lease_valid() {
            return Err(TryAgainReason::OwnerUnavailable);
        }
        if self.archive_queue.bytes() > self.config.archive_backlog_bytes {
            return Err(TryAgainReason::ArchiveBacklog);
        }
        Ok(())
    }

    /// Runs on the WAL writer thread when a message is durable.
    pub fn on_durable(&self, lsn: Lsn, message: Arc<Message>, log: &Arc<ConversationLog>) {
        self.make_visible(&message, log);
        self.archive_queue
            .push(ArchiveItem::durable(lsn, message, log.clone()));
    }

    /// Shows a durable message to readers: its log's ring (which wakes subscribers) and the
    /// node-wide watchers.
    fn make_visible(&self, message: &Arc<Message>, log: &ConversationLog) {
        log.push_durable(message.clone());
        if self.durable_events.receiver_count() > 0 {
            let _ = self.durable_events.send(DurableEvent {
                conversation_id: message.conversation_id.clone(),
                seq: message.seq,
                message: message.clone(),
            });
        }
    }

    /// Answers an append that waited for its archive commit: not acknowledged (`try_again`,
    /// `owner_unavailable`).
    fn refuse_ack(&self, ack: PendingAck) {
        self.count_try_again(TryAgainReason::OwnerUnavailable);
        let _ = ack
            .reply
            .send(Err(NodeError::try_again(TryAgainReason::OwnerUnavailable)));
    }

    /// Runs on the WAL writer thread when a message is durable in the WAL but may not be shown
    /// yet: the node acknowledges only after the archive (`ack_after_archive`), its lease ran
    /// out while the record was syncing (a pause, a stall), or an earlier message of the same
    /// log waits hidden. The message goes to the archiver hidden and becomes visible once
    /// committed under this node's epoch ([`Shared::on_archived`]), with `ack` answered then;
    /// if the slot is taken meanwhile it is kept for restore and this node never shows it. So a
    /// node past its lease shows no reader what it may later have to give up.
    /// Queued items are stored at once, not lingered over: whatever queues while one batch
    /// commits goes into the next (group commit).
    pub fn on_durable_hidden(
        &self,
        lsn: Lsn,
        message: Arc<Message>,
        log: &Arc<ConversationLog>,
        ack: Option<PendingAck>,
    ) {
        log.hide_one();
        self.archive_queue.urgent.store(true, Ordering::Relaxed);
        self.archive_queue.push(ArchiveItem {
            lsn,
            message,
            log: log.clone(),
            durable_at: Instant::now(),
            ack,
            hidden: true,
        });
    }

    /// Takes every archive-queue item of a slot this node no longer owns out of the queue (the
    /// archiver calls it between batches). With `ack_after_archive` none of them was
    /// acknowledged: they are dropped, and appends still waiting on them are answered
    /// `try_again`. Otherwise they may have been acknowledged: they are kept for restore into
    /// the seqs reserved for them, and the WAL checkpoint stays below them.
    pub(super) fn extract_lost_slots(&self) {
        // Written before the slot was failed over away from this node: even if the slot came
        // back since, only a restore may write it (into its reserved seq).
        let keep = |item: &ArchiveItem| {
            let slot = item.message.slot;
            self.gates.owned_epoch(slot).is_some() && item.message.epoch >= self.gates.lost_at(slot)
        };
        let mut lost = Vec::new();
        let mut bytes = 0;
        {
            let mut items = self
                .archive_queue
                .items
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if items.iter().all(&keep) {
                return;
            }
            let mut kept = VecDeque::with_capacity(items.len());
            for item in items.drain(..) {
                if keep(&item) {
                    kept.push_back(item);
                } else {
                    bytes += item.message.approx_bytes();
                    lost.push(item);
                }
            }
            *items = kept;
        }
        if lost.is_empty() {
            return;
        }
        self.archive_queue.bytes.fetch_sub(bytes, Ordering::Relaxed);
        let mut refused = 0usize;
        let mut restore = self.restore.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_conversation: HashMap<ConversationId, (Vec<Arc<Message>>, Lsn)> = HashMap::new();
        for mut item in lost {
            if item.hidden {
                item.log.unhide_one();
            }
            if let Some(ack) = item.ack.take() {
                refused += 1;
                self.refuse_ack(ack);
            }
            if self.config.ack_after_archive {
                continue;
            }
            let entry = by_conversation
                .entry(item.message.conversation_id.clone())
                .or_insert_with(|| (Vec::new(), item.lsn));
            entry.1 = entry.1.min(item.lsn);
            entry.0.push(item.message);
        }
        let kept = by_conversation
            .values()
            .map(|(m, _)| m.len())
            .sum::<usize>();
        for (messages, lsn) in by_conversation.into_values() {
            restore.keep(messages, lsn);
        }
        tracing::warn!(
            kept_for_restore = kept,
            refused_acks = refused,
            "records of slots another node took were taken out of the archive queue"
        );
    }

    /// The archive is failing and this node's lease has run out: it can acknowledge nothing now,
    /// so the appends waiting for their archive commit are answered `try_again`
    /// (`owner_unavailable`) instead of waiting. Their records stay queued: if this node serves
    /// the slot again they are archived and become visible; if another node takes it, they are
    /// dropped unacknowledged.
    pub(super) fn refuse_pending_acks(&self) {
        let refused: Vec<PendingAck> = self
            .archive_queue
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .filter_map(|item| item.ack.take())
            .collect();
        for ack in refused {
            self.refuse_ack(ack);
        }
    }

    /// The archiver committed `message`: a hidden one becomes visible (ring, subscribers,
    /// fan-out), and a pending answer is given — unless the lease ran out
    /// meanwhile (self-fencing, as for a WAL-only ack).
    pub(super) fn on_archived(
        &self,
        message: &Arc<Message>,
        log: &Arc<ConversationLog>,
        hidden: bool,
        ack: Option<PendingAck>,
    ) {
        if hidden {
            self.make_visible(message, log);
            log.unhide_one();
        }
        log.mark_archived(message.seq);
        let Some(ack) = ack else {
            return;
        };
        if !self.gates.lease_valid() {
            return self.refuse_ack(ack);
        }
        self.record_ack(ack.admitted_at, log.slot);
        let _ = ack.reply.send(Ok(ack.outcome));
        drop(ack.guard);
    }

    pub fn record_ack(&self, admitted_at: Instant, slot: u32) {
        let metrics = &self.ack_metrics;
        metrics.latency.record(admitted_at.elapsed().as_secs_f64());
        metrics.ok.increment(1);
        if let Some(counter) = metrics.slot_appends.get(slot as usize) {
            counter.increment(1);
        }
        if let Some(seen) = metrics.slot_appends_seen.get(slot as usize) {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_try_again(&self, reason: TryAgainReason) {
        metrics::counter!(m::TRY_AGAIN_TOTAL, "reason" => reason.as_str()).increment(1);
        metrics::counter!(m::APPENDS_TOTAL, "result" => "try_again").increment(1);
    }

    pub fn count_deduped(&self) {
        metrics::counter!(m::APPENDS_TOTAL, "result" => "deduped").increment(1);
    }
}
