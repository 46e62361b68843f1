//! The node: one cloneable handle over the WAL, the slot actors, the shared conversation logs,
//! the archiver queue and the memory budgets.
//!
//! Start-up order: open the WAL (recovery), rebuild a log for every conversation with unarchived
//! messages and queue those messages for the archiver, start the slot actors, start the archiver.
//! Only then does the node take traffic. Shutdown is the reverse: stop taking appends, drain and
//! sync the WAL (answering everything queued), give the archiver one last chance, stop the actors.
//!
//! ## Layout
//! - this file: the configuration, the errors and [`Node`] with its append, submit and read API;
//! - `shared.rs`: the state the node handle and the actors share (slot registries, archive queue,
//!   admission and ack accounting);
//! - `recovery.rs`: turning what WAL recovery found into conversation logs and archive work;
//! - `archiver.rs`: the task that hands durable messages to the archive and advances the WAL
//!   checkpoint;
//! - `activation.rs`: starting a conversation's actor on first use, bounded per node, with one
//!   pending activation per conversation that every caller waits on;
//! - `reader.rs`: reading a conversation without starting its writer;
//! - `slots.rs`: per-slot operations a hand-over and the status pages use.

mod activation;
mod archiver;
mod reader;
mod recovery;
mod shared;
mod slots;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tokio::sync::{broadcast, watch};

use crate::actor::conversation::{AppendOutcome, AppendRequest, ConversationMsg};
use crate::actor::slot::{SlotActor, SlotArgs, SlotMsg};
use crate::actor::ConversationHandle;
use crate::archive::{Archive, ArchiveError};
use crate::conversation_log::{ConversationLog, RingBudget};
use crate::gate::{GateRefusal, Gates};
use crate::ids::ConversationId;
use crate::placement::slot_of;
use crate::record::Message;
use crate::wal::{FsIo, Lsn, Wal, WalError, WalIo, WalOptions};

use archiver::run_archiver;
use recovery::{adopt_recovery, drop_logs_behind_archive, drop_logs_of_other_owners};
use shared::AckMetrics;

pub use activation::Activation;
pub use reader::ConversationReader;
pub use recovery::StartupReport;
pub use shared::{ArchiveQueue, DurableEvent, PendingAck, RestoreBatch, Shared, SlotRegistry};

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
    /// Acknowledge an append only once its archive batch is committed, not at the WAL's
    /// `fdatasync` (a cluster's `durability = "archive"`): nothing acknowledged then exists on
    /// one disk only. The message becomes visible to readers at the same moment.
    pub ack_after_archive: bool,
    /// Most durable-but-unarchived messages one conversation may have (`0`: no limit); past it
    /// appends get `try_again` (`archive_backlog`).
    pub max_unarchived: u64,
    /// Conversation actors starting at once on this node (each loads its state from the
    /// archive). Past it, a request that would start one more gets `try_again` (`activating`);
    /// requests for a conversation already starting wait for it without counting again.
    pub max_activations: usize,
    /// How long a caller waits for a conversation actor to start before `try_again`
    /// (`activating`), and how long the actor may take to load before its start is given up
    /// (its waiting callers then get `activating` too).
    pub activation_timeout: Duration,
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
            ack_after_archive: false,
            max_unarchived: 0,
            max_activations: 256,
            activation_timeout: Duration::from_secs(5),
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
    /// The WAL's disk is full; appends resume by themselves once space returns.
    DiskFull,
    /// The conversation's slot is being handed to another node.
    SlotMoving,
    /// The slot's owner is not reachable (its lease expired, or this node's did).
    OwnerUnavailable,
    /// Too many conversation actors are starting on this node (`max_activations`), or this
    /// conversation's did not start within `activation_timeout`; nothing was written.
    Activating,
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
            TryAgainReason::Activating => "activating",
            TryAgainReason::DiskFull => "disk_full",
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
            TryAgainReason::Activating => 50,
            TryAgainReason::DiskFull => 1000,
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

/// An append in its conversation actor's mailbox; resolves once it is durable (or refused).
/// The append counts as in flight on its slot until the actor answers it, whether or not the
/// caller is awaiting the ticket at that moment.
pub struct AppendTicket {
    reply: tokio::sync::oneshot::Receiver<Result<AppendOutcome, NodeError>>,
}

impl AppendTicket {
    pub async fn outcome(mut self) -> Result<AppendOutcome, NodeError> {
        std::future::poll_fn(|cx| self.poll_outcome(cx)).await
    }

    /// The outcome once it is known. Polling again after `Ready` is not allowed; dropping the
    /// poll's future before then loses nothing.
    pub fn poll_outcome(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<AppendOutcome, NodeError>> {
        std::future::Future::poll(std::pin::Pin::new(&mut self.reply), cx).map(|received| {
            match received {
                Ok(result) => result,
                // The actor stopped before handling it: nothing was written.
                Err(_) => Err(NodeError::try_again(TryAgainReason::Restarting)),
            }
        })
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
        Node::start_with_io(config, wal_options, Arc::new(FsIo), archive, gates).await
    }

    /// [`Node::start_with_gates`] with the WAL's files behind `io` (fault injection in tests).
    pub async fn start_with_io(
        config: NodeConfig,
        wal_options: WalOptions,
        io: Arc<dyn WalIo>,
        archive: Arc<dyn Archive>,
        gates: Arc<Gates>,
    ) -> Result<(Node, StartupReport), NodeError> {
        let (wal, recovery) =
            tokio::task::spawn_blocking(move || Wal::open_with_io(wal_options, io))
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
            restore: Default::default(),
            activations: AtomicUsize::new(0),
            lost_slots: AtomicBool::new(false),
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
        if shared.config.ack_after_archive {
            archive_recovered(&shared).await;
        }
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
        request: AppendRequest,
    ) -> Result<AppendTicket, Refused> {
        self.submit_via(id, &mut None, request).await
    }

    /// [`Node::submit`] for a caller that submits to one conversation again and again: `handle`
    /// keeps the conversation's actor between calls, so a submit skips the registry's lookup.
    ///
    /// Safe to keep across slot moves and retirements: the slot's gate is entered first, as on
    /// every submit; a handle whose log was handed over is dropped unused; and one whose actor
    /// stopped (retired, restarted or let go) fails the send, which sends the append to the
    /// registry's current actor.
    pub async fn submit_via(
        &self,
        id: &ConversationId,
        handle: &mut Option<ConversationHandle>,
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
            let current = match handle.take().filter(|kept| !kept.log.is_moved()) {
                Some(kept) => kept,
                None => match self.conversation(id).await {
                    Ok(current) => current,
                    Err(NodeError::NotOwner { .. }) => return Err(Refused::NotOwner(request)),
                    Err(e) => return Err(Refused::Failed(e)),
                },
            };
            if !current.log.try_admit(self.shared.config.mailbox_capacity) {
                self.shared.count_try_again(TryAgainReason::MailboxFull);
                *handle = Some(current);
                return Err(Refused::Failed(NodeError::try_again(
                    TryAgainReason::MailboxFull,
                )));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let Some(g) = guard.take() else { break };
            match current.actor.send_message(ConversationMsg::Append(
                request,
                tx.into(),
                admitted_at,
                g,
            )) {
                Ok(()) => {
                    *handle = Some(current);
                    return Ok(AppendTicket { reply: rx });
                }
                Err(ractor::MessagingErr::SendErr(ConversationMsg::Append(back, _, _, g))) => {
                    current.log.release_admission();
                    self.forget_handle(id, &current);
                    request = back;
                    guard = Some(g);
                }
                Err(_) => {
                    current.log.release_admission();
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
        reader::read_log_after(&self.shared, &handle.log, after_seq, limit).await
    }

    /// The newest messages with `seq < before_seq`, at most `limit`, ascending.
    pub async fn read_before(
        &self,
        handle: &ConversationHandle,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>, NodeError> {
        reader::read_log_before(&self.shared, &handle.log, before_seq, limit).await
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
}

/// With `ack_after_archive`, a message is visible only once archived. Records recovered from
/// the WAL were never acknowledged (their archive commit had not happened), so they are
/// archived before the node serves anything: nothing becomes visible that SQL does not hold.
async fn archive_recovered(shared: &Arc<Shared>) {
    let records = shared.archive_queue.len();
    if records == 0 {
        return;
    }
    tracing::info!(
        records,
        "archiving recovered records before serving (durability = archive)"
    );
    let started = Instant::now();
    let mut last_report = Instant::now();
    while !shared.archive_queue.is_empty() {
        shared.archive_queue.urgent.store(true, Ordering::Relaxed);
        shared.archive_queue.notify.notify_one();
        tokio::time::sleep(Duration::from_millis(5)).await;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::warn!(
                left = shared.archive_queue.len(),
                waited_ms = started.elapsed().as_millis() as u64,
                "still archiving recovered records before serving"
            );
        }
    }
}
