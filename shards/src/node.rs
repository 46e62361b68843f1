//! The node: one cloneable handle over the WAL, the slot actors, the shared conversation logs,
//! the archiver queue and the memory budgets.
//!
//! Start-up order: open the WAL (recovery), rebuild a log for every conversation with unarchived
//! messages and queue those messages for the archiver, start the slot actors, start the archiver.
//! Only then does the node take traffic. Shutdown is the reverse: stop taking appends, drain and
//! sync the WAL (answering everything queued), give the archiver one last chance, stop the actors.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tokio::sync::{broadcast, watch, Notify};

use crate::actor::conversation::{AppendOutcome, AppendRequest, ConversationMsg};
use crate::actor::slot::{SlotActor, SlotArgs, SlotMsg};
use crate::actor::ConversationHandle;
use crate::archive::{Archive, ArchiveError};
use crate::gate::{GateRefusal, Gates};
use crate::ids::ConversationId;
use crate::metrics as m;
use crate::placement::slot_of;
use crate::record::{Message, Record};
use crate::ring::{ConversationLog, DedupeWindow, RingBudget};
use crate::wal::{Lsn, Recovery, Wal, WalError, WalOptions};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub slot_count: u32,
    /// Archived bytes a conversation's ring keeps for cheap catch-up reads.
    pub ring_bytes_per_conversation: usize,
    /// Node-wide ceiling for archived bytes kept in rings.
    pub ring_budget_bytes: usize,
    /// Appends that may wait in one conversation's mailbox.
    pub mailbox_capacity: usize,
    /// Idempotency keys remembered per conversation.
    pub dedupe_window: usize,
    /// A conversation idle this long, fully archived and unwatched, stops its actor.
    pub idle_timeout: Duration,
    /// Durable but unarchived bytes beyond which appends get `try_again`.
    pub archive_backlog_bytes: usize,
    /// Most messages the archiver stores in one transaction.
    pub archive_batch_records: usize,
    /// Most message bytes (as accounted in the backlog) in one archive transaction, so a batch
    /// of large messages stays small in memory: the statement holds a copy of every message.
    /// A single larger message still goes alone.
    pub archive_batch_bytes: usize,
    /// How long the archiver lets a partial batch fill before storing it. A full batch (by
    /// records or bytes) goes at once. Fewer, larger transactions cost the archive far less per
    /// message (an index page touched by a commit is written whole), and durability does not
    /// depend on it: the WAL holds every message until it is stored.
    pub archive_linger: Duration,
    /// Part of a cluster: slots are served only once the cluster hands them to this node, and
    /// only while its lease holds. A node alone serves every slot at epoch 1.
    pub clustered: bool,
    /// How long an append waits for a slot that is being handed over before `try_again`.
    pub hold_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            slot_count: crate::placement::DEFAULT_SLOT_COUNT,
            ring_bytes_per_conversation: 64 * 1024,
            ring_budget_bytes: 256 * 1024 * 1024,
            mailbox_capacity: 1024,
            dedupe_window: 1024,
            idle_timeout: Duration::from_secs(300),
            archive_backlog_bytes: 512 * 1024 * 1024,
            archive_batch_records: 10_000,
            archive_batch_bytes: 8 * 1024 * 1024,
            archive_linger: Duration::from_millis(100),
            clustered: false,
            hold_timeout: Duration::from_millis(2000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryAgainReason {
    MailboxFull,
    WalFull,
    ArchiveBacklog,
    /// The actor serving the conversation stopped before taking the append; it was not written.
    Restarting,
    /// The WAL is poisoned or closed; this node takes no more appends.
    Unavailable,
    /// The conversation's slot is being handed to another node.
    SlotMoving,
    /// The slot's owner is not reachable (its lease expired, or this node's did).
    OwnerUnavailable,
}

impl TryAgainReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TryAgainReason::MailboxFull => "mailbox_full",
            TryAgainReason::WalFull => "wal_full",
            TryAgainReason::ArchiveBacklog => "archive_backlog",
            TryAgainReason::Restarting => "restarting",
            TryAgainReason::Unavailable => "unavailable",
            TryAgainReason::SlotMoving => "slot_moving",
            TryAgainReason::OwnerUnavailable => "owner_unavailable",
        }
    }

    pub fn retry_after_ms(self) -> u64 {
        match self {
            TryAgainReason::MailboxFull | TryAgainReason::WalFull => 20,
            TryAgainReason::Restarting => 10,
            TryAgainReason::ArchiveBacklog => 500,
            TryAgainReason::Unavailable => 1000,
            TryAgainReason::SlotMoving => 50,
            TryAgainReason::OwnerUnavailable => 1000,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("conversation not found")]
    NotFound,
    #[error("overloaded ({}), retry in {retry_after_ms} ms", reason.as_str())]
    TryAgain {
        reason: TryAgainReason,
        retry_after_ms: u64,
    },
    /// The WAL is poisoned/closed or the archive cannot be read.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("wal: {0}")]
    Wal(#[from] WalError),
    #[error("archive: {0}")]
    Archive(#[from] ArchiveError),
    #[error("wal record {lsn} cannot be decoded: {reason}")]
    BadRecord { lsn: Lsn, reason: String },
    /// This node does not own the conversation's slot (any more); route to the owner.
    #[error("slot {slot} is not owned by this node")]
    NotOwner { slot: u32 },
}

impl NodeError {
    pub fn try_again(reason: TryAgainReason) -> NodeError {
        NodeError::TryAgain {
            reason,
            retry_after_ms: reason.retry_after_ms(),
        }
    }
}

/// Conversations of one slot known to this node.
#[derive(Default)]
pub struct SlotRegistry {
    /// Every live log: those of active actors and those rebuilt by WAL recovery.
    pub logs: HashMap<ConversationId, Arc<ConversationLog>>,
    pub handles: HashMap<ConversationId, ConversationHandle>,
}

struct ArchiveItem {
    lsn: Lsn,
    message: Arc<Message>,
    log: Arc<ConversationLog>,
    durable_at: Instant,
}

/// Durable messages waiting for the archiver, in LSN order. Bounded by admission: appends are
/// refused while `bytes` exceeds the configured backlog.
#[derive(Default)]
pub struct ArchiveQueue {
    items: Mutex<VecDeque<ArchiveItem>>,
    notify: Notify,
    bytes: AtomicUsize,
    /// Store what is queued now instead of letting a partial batch linger (a slot hand-over
    /// waits for its tail to be archived).
    urgent: AtomicBool,
}

impl ArchiveQueue {
    fn push(&self, item: ArchiveItem) {
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
    registries: Vec<Mutex<SlotRegistry>>,
    pub archive_queue: ArchiveQueue,
    /// Which slots this node serves, and its lease.
    pub gates: Arc<Gates>,
    stopping: AtomicBool,
    /// Every message that became durable, for node-wide watchers (inbox). Lossy by design: a
    /// lagging receiver is told so and rebuilds from the logs.
    durable_events: broadcast::Sender<DurableEvent>,
    /// Metric handles of the per-record ack path, registered once: the WAL writer thread runs
    /// `record_ack` for every record, and a registry lookup (plus a `slot.to_string()`) per
    /// record was a measurable share of its CPU.
    ack_metrics: AckMetrics,
}

struct AckMetrics {
    latency: metrics::Histogram,
    ok: metrics::Counter,
    /// Indexed by slot.
    slot_appends: Vec<metrics::Counter>,
    /// The same counts, readable here (the slot map reports them; a recorder's are write-only).
    slot_appends_seen: Vec<AtomicU64>,
    /// Catch-up reads the hot ring answered: every live delivery is one.
    ring_reads: metrics::Counter,
}

impl AckMetrics {
    /// Registers with the recorder installed now (install it before `Node::start`).
    fn register(slot_count: u32) -> AckMetrics {
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
        log.push_durable(message.clone());
        if self.durable_events.receiver_count() > 0 {
            let _ = self.durable_events.send(DurableEvent {
                conversation_id: message.conversation_id.clone(),
                seq: message.seq,
                message: message.clone(),
            });
        }
        self.archive_queue.push(ArchiveItem {
            lsn,
            message,
            log: log.clone(),
            durable_at: Instant::now(),
        });
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

/// An append in its conversation actor's mailbox; resolves once it is durable (or refused).
/// The append counts as in flight on its slot until the actor answers it, whether or not the
/// caller is awaiting the ticket at that moment.
pub struct AppendTicket {
    reply: tokio::sync::oneshot::Receiver<Result<AppendOutcome, NodeError>>,
}

impl AppendTicket {
    pub async fn outcome(self) -> Result<AppendOutcome, NodeError> {
        match self.reply.await {
            Ok(result) => result,
            // The actor stopped before handling it: nothing was written.
            Err(_) => Err(NodeError::try_again(TryAgainReason::Restarting)),
        }
    }
}

/// An append [`Node::submit`] did not take, handed back unchanged where it can be retried.
pub enum Refused {
    /// The slot is being handed over: wait for a gate change and submit again.
    Holding(AppendRequest),
    /// Not this node's slot: route it to the owner.
    NotOwner(AppendRequest),
    Failed(NodeError),
}

/// What start-up found in the WAL.
#[derive(Debug, Clone)]
pub struct StartupReport {
    pub recovered_records: usize,
    pub recovered_conversations: usize,
    pub checkpoint: Lsn,
    pub torn_tail_bytes: u64,
    pub bytes_scanned: u64,
    pub scan_duration: Duration,
}

/// The cloneable handle to a running node.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    slots: Arc<Vec<ActorRef<SlotMsg>>>,
    archiver_stop: watch::Sender<bool>,
    archiver_done: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Node {
    pub async fn start(
        config: NodeConfig,
        wal_options: WalOptions,
        archive: Arc<dyn Archive>,
    ) -> Result<(Node, StartupReport), NodeError> {
        let gates = if config.clustered {
            Gates::clustered(config.slot_count)
        } else {
            Gates::standalone(config.slot_count)
        };
        Node::start_with_gates(config, wal_options, archive, gates).await
    }

    /// Starts with gates the caller prepared: a cluster member marks the slots it owns before
    /// recovery, so that what its WAL holds for slots that went elsewhere is recognized.
    pub async fn start_with_gates(
        config: NodeConfig,
        wal_options: WalOptions,
        archive: Arc<dyn Archive>,
        gates: Arc<Gates>,
    ) -> Result<(Node, StartupReport), NodeError> {
        let (wal, recovery) = tokio::task::spawn_blocking(move || Wal::open(wal_options))
            .await
            .map_err(|e| NodeError::Unavailable(format!("wal open task: {e}")))??;
        let budget = RingBudget::new(config.ring_budget_bytes, config.ring_bytes_per_conversation);
        let registries = (0..config.slot_count)
            .map(|_| Mutex::new(SlotRegistry::default()))
            .collect();
        let ack_metrics = AckMetrics::register(config.slot_count);
        let shared = Arc::new(Shared {
            config,
            wal,
            archive,
            budget,
            registries,
            archive_queue: ArchiveQueue::default(),
            gates,
            stopping: AtomicBool::new(false),
            durable_events: broadcast::channel(4096).0,
            ack_metrics,
        });
        let repaired = recovery.repair.is_some();
        let report = adopt_recovery(&shared, recovery)?;
        if repaired {
            drop_logs_behind_archive(&shared).await?;
        }
        if shared.config.clustered {
            drop_logs_of_other_owners(&shared).await?;
        }

        let mut slots = Vec::with_capacity(shared.config.slot_count as usize);
        for slot in 0..shared.config.slot_count {
            let args = SlotArgs {
                slot,
                shared: shared.clone(),
            };
            let (actor, _) = Actor::spawn(None, SlotActor, args)
                .await
                .map_err(|e| NodeError::Unavailable(format!("slot actor: {e}")))?;
            slots.push(actor);
        }
        let (archiver_stop, stop_rx) = watch::channel(false);
        let archiver = tokio::spawn(run_archiver(shared.clone(), stop_rx));
        Ok((
            Node {
                shared,
                slots: Arc::new(slots),
                archiver_stop,
                archiver_done: Arc::new(tokio::sync::Mutex::new(Some(archiver))),
            },
            report,
        ))
    }

    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    pub fn wal(&self) -> &Wal {
        &self.shared.wal
    }

    pub fn slot_of(&self, id: &ConversationId) -> u32 {
        slot_of(id.as_str(), self.shared.config.slot_count)
    }

    /// Ready to take appends: not stopping and the WAL is healthy.
    pub fn ready(&self) -> bool {
        !self.shared.stopping.load(Ordering::Relaxed) && !self.shared.wal.poisoned()
    }

    pub fn archive_backlog(&self) -> (usize, usize) {
        (
            self.shared.archive_queue.len(),
            self.shared.archive_queue.bytes(),
        )
    }

    /// The active conversation, starting its actor if needed. Refused with `NotOwner` for a
    /// slot this node does not own: looking at another node's conversation must not start a
    /// writer here.
    pub async fn conversation(&self, id: &ConversationId) -> Result<ConversationHandle, NodeError> {
        let slot = self.slot_of(id);
        if let Some(handle) = self.shared.registry(slot).handles.get(id) {
            return Ok(handle.clone());
        }
        if self.shared.gates.owned_epoch(slot).is_none() {
            return Err(NodeError::NotOwner { slot });
        }
        ractor::call!(self.slots[slot as usize], SlotMsg::Activate, id.clone())
            .map_err(|e| NodeError::Unavailable(format!("slot {slot}: {e}")))?
    }

    /// The serving gates of this node's slots and its lease.
    pub fn gates(&self) -> &Arc<Gates> {
        &self.shared.gates
    }

    /// Hands an append to its conversation actor and returns once it is in the actor's mailbox
    /// (it then has its place in the conversation's order), without waiting for durability.
    ///
    /// **Ordering:** appends to one conversation that one caller submits one after the other
    /// (each `submit` returned before the next began) take seqs in that order. Callers that need
    /// "a socket's sends take seqs in send order" submit sequentially and await the tickets
    /// together. A refused append comes back unchanged, so the caller can wait (`Holding`) or
    /// route it to the owner (`NotOwner`) without reordering it behind later ones.
    pub async fn submit(
        &self,
        id: &ConversationId,
        mut request: AppendRequest,
    ) -> Result<AppendTicket, Refused> {
        let admitted_at = Instant::now();
        let slot = self.slot_of(id);
        let guard = match self.shared.gates.enter(slot) {
            Ok(guard) => guard,
            Err(GateRefusal::Holding) => return Err(Refused::Holding(request)),
            Err(GateRefusal::NotOwned) => return Err(Refused::NotOwner(request)),
            Err(GateRefusal::Fenced) => {
                self.shared
                    .count_try_again(TryAgainReason::OwnerUnavailable);
                return Err(Refused::Failed(NodeError::try_again(
                    TryAgainReason::OwnerUnavailable,
                )));
            }
        };
        // A handle can go stale when its actor retires or is restarted; the message comes back
        // from the failed send and is rerouted.
        let mut guard = Some(guard);
        for _ in 0..3 {
            let handle = match self.conversation(id).await {
                Ok(handle) => handle,
                Err(NodeError::NotOwner { .. }) => return Err(Refused::NotOwner(request)),
                Err(e) => return Err(Refused::Failed(e)),
            };
            if !handle.log.try_admit(self.shared.config.mailbox_capacity) {
                self.shared.count_try_again(TryAgainReason::MailboxFull);
                return Err(Refused::Failed(NodeError::try_again(
                    TryAgainReason::MailboxFull,
                )));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let Some(g) = guard.take() else { break };
            match handle.actor.send_message(ConversationMsg::Append(
                request,
                tx.into(),
                admitted_at,
                g,
            )) {
                Ok(()) => return Ok(AppendTicket { reply: rx }),
                Err(ractor::MessagingErr::SendErr(ConversationMsg::Append(back, _, _, g))) => {
                    handle.log.release_admission();
                    self.forget_handle(id, &handle);
                    request = back;
                    guard = Some(g);
                }
                Err(_) => {
                    handle.log.release_admission();
                    return Err(Refused::Failed(NodeError::try_again(
                        TryAgainReason::Restarting,
                    )));
                }
            }
        }
        Err(Refused::Failed(NodeError::try_again(
            TryAgainReason::Restarting,
        )))
    }

    /// Appends a message; answers once it is durable. While the slot is being handed over it
    /// waits up to `hold_timeout`, then answers `try_again` (`slot_moving`); a slot this node
    /// does not own is `NotOwner`.
    pub async fn append(
        &self,
        id: &ConversationId,
        mut request: AppendRequest,
    ) -> Result<AppendOutcome, NodeError> {
        let deadline = tokio::time::Instant::now() + self.shared.config.hold_timeout;
        loop {
            let mut changed = self.shared.gates.changed();
            match self.submit(id, request).await {
                Ok(ticket) => return ticket.outcome().await,
                Err(Refused::Holding(back)) => {
                    request = back;
                    if !self.wait_gate_change(&mut changed, deadline).await {
                        self.shared.count_try_again(TryAgainReason::SlotMoving);
                        return Err(NodeError::try_again(TryAgainReason::SlotMoving));
                    }
                }
                Err(Refused::NotOwner(_)) => {
                    return Err(NodeError::NotOwner {
                        slot: self.slot_of(id),
                    })
                }
                Err(Refused::Failed(e)) => return Err(e),
            }
        }
    }

    /// Waits for the next gate change (a held slot released or handed over); false once
    /// `deadline` passes first.
    pub async fn wait_gate_change(
        &self,
        changed: &mut watch::Receiver<u64>,
        deadline: tokio::time::Instant,
    ) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, changed.changed()).await,
            Ok(Ok(()))
        )
    }

    fn forget_handle(&self, id: &ConversationId, stale: &ConversationHandle) {
        let mut registry = self.shared.registry(self.slot_of(id));
        let is_stale = registry
            .handles
            .get(id)
            .is_some_and(|h| h.actor.get_id() == stale.actor.get_id());
        if is_stale {
            registry.handles.remove(id);
        }
    }

    /// Messages with `seq > after_seq`, at most `limit`, ascending: ring first, archive below it.
    pub async fn read_after(
        &self,
        handle: &ConversationHandle,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, NodeError> {
        let ring = handle.log.read_after(after_seq, limit);
        if after_seq + 1 >= ring.ring_first_seq || after_seq >= ring.durable_seq {
            self.shared.ack_metrics.ring_reads.increment(1);
            return Ok(ring.messages);
        }
        metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
        let mut out = self
            .shared
            .archive
            .read_messages(&handle.log.id, after_seq, ring.ring_first_seq, limit, false)
            .await?;
        let contiguous = out.last().map_or(after_seq, |m| m.seq) + 1 == ring.ring_first_seq;
        if out.len() < limit && contiguous {
            let room = limit - out.len();
            out.extend(ring.messages.into_iter().take(room));
        }
        Ok(out)
    }

    /// The newest messages with `seq < before_seq`, at most `limit`, ascending.
    pub async fn read_before(
        &self,
        handle: &ConversationHandle,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, NodeError> {
        let (ring_first_seq, mut from_ring) = handle.log.read_before(before_seq, limit);
        let below = before_seq.min(ring_first_seq);
        if from_ring.len() >= limit || below <= 1 {
            return Ok(from_ring);
        }
        metrics::counter!(m::CATCHUP_READS_TOTAL, "tier" => "sql").increment(1);
        let mut out = self
            .shared
            .archive
            .read_messages(&handle.log.id, 0, below, limit - from_ring.len(), true)
            .await?;
        out.append(&mut from_ring);
        Ok(out)
    }

    /// Asks the archiver to store what is queued now rather than after `archive.linger`.
    pub fn archive_now(&self) {
        self.shared
            .archive_queue
            .urgent
            .store(true, Ordering::Relaxed);
        self.shared.archive_queue.notify.notify_one();
    }

    /// Durable messages of `slot` that the archive does not hold yet.
    pub fn slot_unarchived(&self, slot: u32) -> u64 {
        self.shared
            .registry(slot)
            .logs
            .values()
            .map(|log| log.durable_seq().saturating_sub(log.archived_seq()))
            .sum()
    }

    /// Waits until everything durable in `slot` is archived (asking the archiver to hurry), at
    /// most `timeout`; true when it is.
    pub async fn wait_slot_archived(&self, slot: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.slot_unarchived(slot) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.archive_now();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Lets go of a slot that now belongs to another node at `epoch`: its appends are refused
    /// with `NotOwner` from now on, its conversation actors stop, and readers of its logs are
    /// told to follow the conversations to the new owner. Call only once nothing of the slot is
    /// in flight or unarchived.
    pub fn release_slot(&self, slot: u32, epoch: u64) {
        self.shared.gates.set_not_owned(slot, epoch);
        let (handles, logs) = {
            let mut registry = self.shared.registry(slot);
            (
                std::mem::take(&mut registry.handles),
                std::mem::take(&mut registry.logs),
            )
        };
        for log in logs.values() {
            log.mark_moved();
        }
        for handle in handles.values() {
            handle.log.mark_moved();
            handle.actor.stop(Some("slot moved".into()));
        }
    }

    /// Stops taking appends, answers everything queued in the WAL, flushes the archive once, and
    /// stops the actors. Idempotent.
    pub async fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Everything accepted becomes durable (and is answered) first, so that the archiver's
        // last pass can store it; that pass advances the checkpoint, and closing the WAL then
        // persists it. After a clean stop the next start has nothing to replay, and the WAL's
        // checkpoint agrees with SQL (a repair never counts archived records as lost).
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let barrier = self.shared.wal.barrier(Box::new(move |result| {
            let _ = synced_tx.send(result);
        }));
        if barrier.is_ok() {
            let _ = synced_rx.await;
        }
        let _ = self.archiver_stop.send(true);
        if let Some(task) = self.archiver_done.lock().await.take() {
            let _ = task.await;
        }
        let wal = self.shared.wal.clone();
        let _ = tokio::task::spawn_blocking(move || wal.shutdown()).await;
        for slot in self.slots.iter() {
            slot.stop(None);
        }
    }

    /// For tests of supervision: makes the conversation's actor fail as a bug would.
    pub async fn crash_conversation_actor(&self, id: &ConversationId) -> Result<(), NodeError> {
        let handle = self.conversation(id).await?;
        handle
            .actor
            .send_message(ConversationMsg::Crash)
            .map_err(|e| NodeError::Unavailable(e.to_string()))
    }

    /// The current actor of an active conversation, if any (for tests and status).
    pub fn active_handle(&self, id: &ConversationId) -> Option<ConversationHandle> {
        self.shared
            .registry(self.slot_of(id))
            .handles
            .get(id)
            .cloned()
    }

    /// Replaces the cached description of an active conversation (after an update in SQL).
    pub fn refresh_meta(&self, meta: crate::archive::ConversationMeta) {
        if let Some(handle) = self.active_handle(&meta.id) {
            handle.set_meta(meta);
        }
    }

    /// Every message that becomes durable from now on (lossy: see `broadcast::error::RecvError`).
    pub fn subscribe_durable(&self) -> broadcast::Receiver<DurableEvent> {
        self.shared.durable_events.subscribe()
    }

    /// The in-memory log of a conversation, if this node holds one (active, or recovered from the
    /// WAL and not yet activated), without starting anything.
    pub fn peek_log(&self, id: &ConversationId) -> Option<Arc<ConversationLog>> {
        self.shared.registry(self.slot_of(id)).logs.get(id).cloned()
    }

    /// Appends acknowledged per slot since this node started.
    pub fn slot_appends(&self) -> Vec<u64> {
        self.shared
            .ack_metrics
            .slot_appends_seen
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Active conversation actors per slot.
    pub fn slot_conversations(&self) -> Vec<usize> {
        (0..self.shared.config.slot_count)
            .map(|s| self.shared.registry(s).handles.len())
            .collect()
    }
}

/// `(slot, conversation, last durable seq)` of every log held for the slots `which` selects.
fn recovered_logs(shared: &Shared, which: impl Fn(u32) -> bool) -> Vec<(u32, ConversationId, u64)> {
    (0..shared.config.slot_count)
        .filter(|slot| which(*slot))
        .flat_map(|slot| {
            shared
                .registry(slot)
                .logs
                .iter()
                .map(|(id, log)| (slot, id.clone(), log.durable_seq()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// After a repair: a recovered log that ends below the last seq SQL holds lost archived records
/// to the repair, and SQL is the complete history. Such logs are dropped before anything reads
/// them, so the conversation starts from SQL (its recovered records are still re-archived,
/// idempotently). The slot actor checks the same when it starts a conversation.
async fn drop_logs_behind_archive(shared: &Arc<Shared>) -> Result<(), NodeError> {
    for (slot, id, wal_last_seq) in recovered_logs(shared, |_| true) {
        let snapshot = shared
            .archive
            .load_conversation(&id, 0)
            .await
            .map_err(|e| {
                NodeError::Unavailable(format!(
                    "after the wal repair, conversation {id} cannot be checked against the archive: {e}"
                ))
            })?;
        let archived_last_seq = snapshot.map_or(0, |s| s.last_seq);
        if archived_last_seq > wal_last_seq {
            tracing::warn!(
                conversation = %id,
                wal_last_seq,
                archived_last_seq,
                "archive is ahead of the recovered wal log; continuing after the archive"
            );
            shared.registry(slot).logs.remove(&id);
        }
    }
    Ok(())
}

/// A clustered node's WAL can hold messages of slots that moved to other nodes since (a slot
/// leaves only once its tail is archived, but the WAL checkpoint may lag). Those logs are dropped
/// with their archive queue items: the archive has them, and this node may not write them (the
/// fenced archive would refuse). Anything the archive lacks is logged as an error with its seqs.
async fn drop_logs_of_other_owners(shared: &Arc<Shared>) -> Result<(), NodeError> {
    let foreign = recovered_logs(shared, |slot| shared.gates.owned_epoch(slot).is_none());
    if foreign.is_empty() {
        return Ok(());
    }
    let mut dropped = std::collections::HashSet::new();
    for (slot, id, wal_last_seq) in foreign {
        let archived_last_seq = shared
            .archive
            .load_conversation(&id, 0)
            .await
            .map_err(|e| {
                NodeError::Unavailable(format!(
                    "conversation {id} of slot {slot} cannot be checked against the archive: {e}"
                ))
            })?
            .map_or(0, |s| s.last_seq);
        if archived_last_seq < wal_last_seq {
            tracing::error!(
                conversation = %id,
                slot,
                wal_last_seq,
                archived_last_seq,
                "the wal holds messages of a slot another node owns that the archive lacks; they are not served"
            );
        }
        shared.registry(slot).logs.remove(&id);
        dropped.insert(id);
    }
    let mut items = shared
        .archive_queue
        .items
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut bytes = 0;
    items.retain(|item| {
        let keep = !dropped.contains(&item.message.conversation_id);
        if !keep {
            bytes += item.message.approx_bytes();
        }
        keep
    });
    shared
        .archive_queue
        .bytes
        .fetch_sub(bytes, Ordering::Relaxed);
    tracing::info!(
        conversations = dropped.len(),
        "dropped recovered logs of slots owned elsewhere"
    );
    Ok(())
}

/// Rebuilds a log for every conversation with messages above the checkpoint and queues them for
/// the archiver.
fn adopt_recovery(shared: &Arc<Shared>, recovery: Recovery) -> Result<StartupReport, NodeError> {
    let mut by_conversation: HashMap<ConversationId, Vec<(Lsn, Arc<Message>)>> = HashMap::new();
    let recovered_records = recovery.records.len();
    for record in recovery.records {
        let decoded =
            Record::decode(record.kind, &record.payload).map_err(|e| NodeError::BadRecord {
                lsn: record.lsn,
                reason: e.to_string(),
            })?;
        match decoded {
            Record::Message(message) => by_conversation
                .entry(message.conversation_id.clone())
                .or_default()
                .push((record.lsn, message)),
        }
    }
    let recovered_conversations = by_conversation.len();
    let mut items = Vec::with_capacity(recovered_records);
    for (id, entries) in by_conversation {
        let slot = slot_of(id.as_str(), shared.config.slot_count);
        let messages: Vec<Arc<Message>> = entries.iter().map(|(_, m)| m.clone()).collect();
        for pair in messages.windows(2) {
            if pair[1].seq != pair[0].seq + 1 {
                return Err(NodeError::BadRecord {
                    lsn: entries[0].0,
                    reason: format!(
                        "conversation {id} jumps from seq {} to {} in the wal",
                        pair[0].seq, pair[1].seq
                    ),
                });
            }
        }
        let log = Arc::new(ConversationLog::new(
            id.clone(),
            slot,
            0,
            messages,
            DedupeWindow::new(shared.config.dedupe_window),
            shared.budget.clone(),
        ));
        for (lsn, message) in entries {
            items.push(ArchiveItem {
                lsn,
                message,
                log: log.clone(),
                durable_at: Instant::now(),
            });
        }
        shared.registry(slot).logs.insert(id, log);
    }
    items.sort_by_key(|i| i.lsn);
    for item in items {
        shared.archive_queue.push(item);
    }
    Ok(StartupReport {
        recovered_records,
        recovered_conversations,
        checkpoint: recovery.checkpoint,
        torn_tail_bytes: recovery.torn_tail_bytes,
        bytes_scanned: recovery.bytes_scanned,
        scan_duration: recovery.scan_duration,
    })
}

/// Tails the archive queue in LSN order: stores a batch in one transaction (retrying with
/// backoff while the archive is unavailable), marks the logs archived, advances the WAL
/// checkpoint. On stop it makes one last attempt; whatever is left is replayed from the WAL on the
/// next start.
/// One archive batch: consecutive queue items, in LSN order.
type Batch = Vec<(Lsn, Arc<Message>, Arc<ConversationLog>, Instant)>;

type StoreResult = (Batch, Result<(), ArchiveError>, Duration);

/// Hands durable messages to the archive in LSN order and advances the WAL checkpoint.
///
/// Up to `Archive::max_concurrent_batches` batches are stored at once, each covering the queue
/// items after those of the batch before it. Results are taken strictly in order: a batch's
/// items leave the queue, its logs are marked archived and the checkpoint moves only after every
/// batch before it succeeded. When one fails, every later batch in flight is abandoned (one that
/// committed anyway is stored again on the retry, which the archive's idempotence makes harmless)
/// and the archiver retries from the front of the queue with backoff.
async fn run_archiver(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(50);
    let depth = shared.archive.max_concurrent_batches().max(1);
    let mut in_flight: VecDeque<tokio::task::JoinHandle<StoreResult>> = VecDeque::new();
    // Queue items (from the front) covered by the batches in flight.
    let mut dispatched = 0usize;
    loop {
        let stopping = *stop.borrow();
        // When the next batch is not full yet: the moment it is stored anyway.
        let mut linger_until = None;
        while in_flight.len() < depth {
            let batch = match next_batch(&shared, dispatched, stopping) {
                NextBatch::Ready(batch) => batch,
                NextBatch::Wait(until) => {
                    linger_until = until;
                    break;
                }
            };
            dispatched += batch.len();
            let archive = shared.archive.clone();
            in_flight.push_back(tokio::spawn(async move {
                let messages: Vec<Arc<Message>> = batch.iter().map(|b| b.1.clone()).collect();
                let started = Instant::now();
                let result = archive.store_messages(&messages).await;
                (batch, result, started.elapsed())
            }));
        }
        publish_backlog(&shared);
        let linger = async {
            match linger_until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        if in_flight.is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                _ = shared.archive_queue.notify.notified() => {}
                _ = stop.changed() => {}
                _ = linger => {}
            }
            continue;
        }
        // With room in the pipeline, new messages start another batch without waiting for the
        // oldest one to finish.
        let room = in_flight.len() < depth;
        let Some(oldest) = in_flight.front_mut() else {
            continue;
        };
        let done = if room && !stopping {
            tokio::select! {
                done = oldest => done,
                _ = shared.archive_queue.notify.notified() => continue,
                _ = stop.changed() => continue,
                _ = linger => continue,
            }
        } else {
            oldest.await
        };
        in_flight.pop_front();
        let (batch, result, took) = match done {
            Ok(done) => done,
            // The store call panicked: nothing is known about the batch; retry it.
            Err(e) => (
                Vec::new(),
                Err(ArchiveError::Unavailable(format!(
                    "archive task failed: {e}"
                ))),
                Duration::ZERO,
            ),
        };
        match result {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                metrics::histogram!(m::ARCHIVE_BATCH_SECONDS).record(took.as_secs_f64());
                metrics::counter!(m::ARCHIVE_RECORDS_TOTAL).increment(batch.len() as u64);
                let mut bytes = 0;
                {
                    let mut items = shared
                        .archive_queue
                        .items
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for (lsn, ..) in &batch {
                        let item = items.pop_front();
                        debug_assert_eq!(item.as_ref().map(|i| i.lsn), Some(*lsn));
                        if let Some(item) = item {
                            bytes += item.message.approx_bytes();
                        }
                    }
                }
                dispatched -= batch.len();
                shared
                    .archive_queue
                    .bytes
                    .fetch_sub(bytes, Ordering::Relaxed);
                let delay = metrics::histogram!(m::ARCHIVE_DELAY_SECONDS);
                let now = Instant::now();
                for (_, message, log, durable_at) in &batch {
                    log.mark_archived(message.seq);
                    delay.record(now.saturating_duration_since(*durable_at).as_secs_f64());
                }
                let last_lsn = batch.last().map_or(0, |b| b.0);
                if let Err(e) = shared.wal.checkpoint(last_lsn) {
                    tracing::error!(error = %e, lsn = last_lsn, "wal checkpoint failed");
                }
            }
            Err(e) => {
                metrics::counter!(m::ARCHIVE_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, records = batch.len(), abandoned_batches = in_flight.len(), retry_in_ms = backoff.as_millis() as u64, "archive batch failed");
                for abandoned in in_flight.drain(..) {
                    abandoned.abort();
                }
                dispatched = 0;
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum NextBatch {
    Ready(Batch),
    /// Nothing to store yet: the queue holds nothing undispatched (`None`), or a partial batch
    /// that lingers until the given moment.
    Wait(Option<Instant>),
}

/// The queue items after the first `dispatched`, as one batch of at most
/// `archive_batch_records` records and `archive_batch_bytes` bytes, once it is worth storing:
/// it is full, its oldest item has lingered `archive_linger`, or the node is stopping.
fn next_batch(shared: &Shared, dispatched: usize, stopping: bool) -> NextBatch {
    let config = &shared.config;
    let items = shared
        .archive_queue
        .items
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(oldest) = items.get(dispatched) else {
        shared.archive_queue.urgent.store(false, Ordering::Relaxed);
        return NextBatch::Wait(None);
    };
    let until = oldest.durable_at + config.archive_linger;
    let pending = || {
        items
            .iter()
            .skip(dispatched)
            .take(config.archive_batch_records)
    };
    let ready = stopping
        || shared.archive_queue.urgent.load(Ordering::Relaxed)
        || Instant::now() >= until
        || items.len() - dispatched >= config.archive_batch_records
        // Every queued byte (dispatched or not) bounds the pending ones: only when they could
        // fill a batch are the pending items counted.
        || (shared.archive_queue.bytes.load(Ordering::Relaxed) > config.archive_batch_bytes && {
            let mut bytes = 0usize;
            pending().any(|i| {
                bytes += i.message.approx_bytes();
                bytes > config.archive_batch_bytes
            })
        });
    if !ready {
        return NextBatch::Wait(Some(until));
    }
    let mut bytes = 0usize;
    let batch = pending()
        .take_while(|i| {
            let first = bytes == 0;
            bytes += i.message.approx_bytes();
            first || bytes <= config.archive_batch_bytes
        })
        .map(|i| (i.lsn, i.message.clone(), i.log.clone(), i.durable_at))
        .collect();
    NextBatch::Ready(batch)
}

fn publish_backlog(shared: &Shared) {
    let oldest = shared
        .archive_queue
        .items
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .front()
        .map(|i| i.durable_at);
    metrics::gauge!(m::ARCHIVE_BACKLOG_BYTES).set(shared.archive_queue.bytes() as f64);
    metrics::gauge!(m::ARCHIVE_BACKLOG_RECORDS).set(shared.archive_queue.len() as f64);
    metrics::gauge!(m::ARCHIVE_LAG_SECONDS).set(oldest.map_or(0.0, |t| t.elapsed().as_secs_f64()));
    metrics::gauge!(m::RING_BYTES).set(shared.budget.used() as f64);
}
