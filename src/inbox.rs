//! Inbox: per participant, each conversation's last seq, read cursor, unread count and last
//! message; plus the node-local event hub that drives live inbox updates and ephemeral
//! broadcasts (`chunk`, `typing`).
//!
//! Unread = messages after the participant's read cursor that someone else sent.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::node::Node;
use ferry_shards::record::Message;

use crate::cluster::fanout::ClusterEvent;
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::store::{Store, StoreError};

/// Deltas are pushed at most this often per watcher…
const COALESCE: Duration = Duration::from_secs(1);
/// …unless this many conversations changed meanwhile.
const COALESCE_MAX: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct InboxEntry {
    pub id: String,
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
    pub last_message: Option<Arc<Message>>,
}

/// A non-durable event fanned out to the other subscribers of a conversation on this node.
#[derive(Debug, Clone)]
pub struct EphemeralEvent {
    /// The socket that sent it (it is not echoed back).
    pub from_socket: u64,
    pub event: &'static str,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone)]
enum Change {
    /// A participant's read cursor moved in a conversation.
    Cursor(ParticipantId, ConversationId),
    /// A conversation was created or its participants changed.
    Membership(ParticipantId, ConversationId),
}

/// The node's event hub: cursor and membership changes (inbox deltas), ephemeral events, slot
/// moves (`backpressure`). In a cluster, what happens here is also published to the other nodes
/// and what they publish is applied here ([`Events::apply_remote`]). Cheap to clone.
#[derive(Clone)]
pub struct Events {
    changes: broadcast::Sender<Change>,
    ephemeral: Arc<Mutex<HashMap<ConversationId, broadcast::Sender<EphemeralEvent>>>>,
    /// `(slot, retry_after_ms)`: the slot is being handed to another node.
    moving: broadcast::Sender<(u32, u64)>,
    /// Conversations that advanced on another node (inbox watchers of this node listen).
    remote_durable: broadcast::Sender<ConversationId>,
    /// Conversations whose description changed on another node.
    meta: broadcast::Sender<ConversationId>,
    /// Where events for the other nodes go (set when the node joins a cluster).
    outbound: Arc<OnceLock<mpsc::Sender<ClusterEvent>>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            changes: broadcast::channel(1024).0,
            ephemeral: Arc::default(),
            moving: broadcast::channel(1024).0,
            remote_durable: broadcast::channel(4096).0,
            meta: broadcast::channel(256).0,
            outbound: Arc::default(),
        }
    }
}

static SOCKET_IDS: AtomicU64 = AtomicU64::new(1);

/// A process-unique id for a socket (to avoid echoing its own ephemeral events). Never 0, which
/// marks events that came from another node.
pub fn next_socket_id() -> u64 {
    SOCKET_IDS.fetch_add(1, Ordering::Relaxed)
}

impl Events {
    /// Publishes this node's events to the cluster from now on.
    pub fn set_outbound(&self, outbound: mpsc::Sender<ClusterEvent>) {
        let _ = self.outbound.set(outbound);
    }

    fn publish(&self, event: impl FnOnce() -> ClusterEvent) {
        if let Some(out) = self.outbound.get() {
            // Best effort: a full queue drops the event (inboxes still catch up on the next
            // change; ephemeral events are not worth buffering).
            let _ = out.try_send(event());
        }
    }

    pub fn cursor_changed(&self, participant: &ParticipantId, conversation: &ConversationId) {
        let _ = self
            .changes
            .send(Change::Cursor(participant.clone(), conversation.clone()));
        self.publish(|| ClusterEvent::Cursor {
            participant: participant.to_string(),
            conversation: conversation.to_string(),
        });
    }

    pub fn membership_changed(&self, participant: &ParticipantId, conversation: &ConversationId) {
        let _ = self.changes.send(Change::Membership(
            participant.clone(),
            conversation.clone(),
        ));
        self.publish(|| ClusterEvent::Membership {
            participant: participant.to_string(),
            conversation: conversation.to_string(),
        });
    }

    /// A conversation's description changed here: other nodes drop their cached copy.
    pub fn meta_changed(&self, conversation: &ConversationId) {
        self.publish(|| ClusterEvent::Meta {
            conversation: conversation.to_string(),
        });
    }

    /// Descriptions changed on other nodes.
    pub fn meta_changes(&self) -> broadcast::Receiver<ConversationId> {
        self.meta.subscribe()
    }

    /// The ephemeral channel of a conversation (created on first use; unused ones are pruned).
    pub fn ephemeral(&self, conversation: &ConversationId) -> broadcast::Sender<EphemeralEvent> {
        let mut map = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 1024 {
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        map.entry(conversation.clone())
            .or_insert_with(|| broadcast::channel(256).0)
            .clone()
    }

    /// Sends an ephemeral event to the conversation's other sockets, on every node.
    pub fn send_ephemeral(&self, conversation: &ConversationId, event: EphemeralEvent) {
        self.publish(|| ClusterEvent::Ephemeral {
            conversation: conversation.to_string(),
            event: event.event.to_owned(),
            payload: event.payload.clone(),
        });
        // No receivers (nobody else here) is not an error: ephemeral events are best effort.
        let _ = self.ephemeral(conversation).send(event);
    }

    /// Slot moves, as `(slot, retry_after_ms)`.
    pub fn moving(&self) -> broadcast::Receiver<(u32, u64)> {
        self.moving.subscribe()
    }

    /// This node is handing `slot` over.
    pub fn slot_moving(&self, slot: u32, retry_after_ms: u64) {
        let _ = self.moving.send((slot, retry_after_ms));
    }

    /// A conversation advanced on another node.
    pub fn remote_durable(&self, conversation: &ConversationId) {
        if self.remote_durable.receiver_count() > 0 {
            let _ = self.remote_durable.send(conversation.clone());
        }
    }

    /// A cursor or membership change another node published, for this node's inbox watchers.
    fn apply_change(
        &self,
        participant: &str,
        conversation: &str,
        change: fn(ParticipantId, ConversationId) -> Change,
    ) {
        if let (Ok(p), Ok(c)) = (
            ParticipantId::parse(participant),
            ConversationId::parse(conversation),
        ) {
            let _ = self.changes.send(change(p, c));
        }
    }

    /// Applies an event another node published.
    pub fn apply_remote(&self, event: ClusterEvent) {
        let conversation_of = |c: &str| ConversationId::parse(c).ok();
        match event {
            ClusterEvent::Ephemeral {
                conversation,
                event,
                payload,
            } => {
                let name = match event.as_str() {
                    "chunk" => "chunk",
                    "typing" => "typing",
                    _ => return,
                };
                if let Some(c) = conversation_of(&conversation) {
                    let sender = self
                        .ephemeral
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&c)
                        .cloned();
                    if let Some(sender) = sender {
                        let _ = sender.send(EphemeralEvent {
                            from_socket: 0,
                            event: name,
                            payload,
                        });
                    }
                }
            }
            ClusterEvent::Cursor {
                participant,
                conversation,
            } => self.apply_change(&participant, &conversation, Change::Cursor),
            ClusterEvent::Membership {
                participant,
                conversation,
            } => self.apply_change(&participant, &conversation, Change::Membership),
            ClusterEvent::Meta { conversation } => {
                if let Some(c) = conversation_of(&conversation) {
                    let _ = self.meta.send(c);
                }
            }
            ClusterEvent::Moving {
                slot,
                retry_after_ms,
            } => {
                let _ = self.moving.send((slot, retry_after_ms));
            }
        }
    }
}

/// One conversation's inbox entry for a participant.
pub async fn entry(
    node: &Node,
    store: &Store,
    participant: &ParticipantId,
    conversation: &ConversationId,
) -> Result<InboxEntry, StoreError> {
    let (read_seq, _) = store.cursor(conversation, participant).await?;
    let (last_seq, ring, newest) = match node.peek_log(conversation) {
        Some(log) => {
            let ring = log.read_after(read_seq, usize::MAX);
            // The ring always keeps the newest message, archived or not.
            (log.durable_seq(), Some(ring), log.last_message())
        }
        None => (store.last_seq(conversation).await?, None, None),
    };
    let read_seq = read_seq.min(last_seq);
    // What retention deleted is neither unread nor the last message, even while the hot ring
    // still holds it (pages do not serve it either).
    let first_available = store.first_available_seq(conversation).await?;
    let counted_after = read_seq.max(first_available.saturating_sub(1));
    let (unread, last_message) = match ring {
        Some(ring) => {
            let from_ring = ring
                .messages
                .iter()
                .filter(|m| m.seq > counted_after && m.sender != *participant)
                .count() as u64;
            let below = store
                .count_unread(
                    conversation,
                    participant,
                    counted_after,
                    ring.ring_first_seq,
                )
                .await?;
            let last = match newest {
                Some(m) => Some(m),
                None => store.last_message(conversation).await?,
            };
            (below + from_ring, last)
        }
        None => (
            store
                .count_unread(conversation, participant, counted_after, u64::MAX)
                .await?,
            store.last_message(conversation).await?,
        ),
    };
    let last_message = last_message.filter(|m| m.seq >= first_available);
    Ok(InboxEntry {
        id: conversation.to_string(),
        last_seq,
        read_seq,
        unread,
        last_message,
    })
}

/// The whole inbox of a participant; each entry from the conversation's owner.
pub async fn snapshot(
    state: &AppState,
    participant: &ParticipantId,
) -> Result<Vec<InboxEntry>, ApiError> {
    let mut out = Vec::new();
    for conversation in state.store.conversations_of(participant).await? {
        out.push(crate::service::inbox_entry(state, participant, &conversation).await?);
    }
    Ok(out)
}

/// Live inbox changes for one participant, coalesced.
pub struct InboxWatch {
    state: AppState,
    participant: ParticipantId,
    conversations: HashSet<ConversationId>,
    durable: broadcast::Receiver<ferry_shards::node::DurableEvent>,
    /// Conversations that advanced on other nodes of the cluster.
    remote: broadcast::Receiver<ConversationId>,
    /// Changes when the cluster's Redis subscription was lost or came back: what other nodes
    /// published meanwhile is gone, so every conversation is re-read.
    reconnected: Option<tokio::sync::watch::Receiver<u64>>,
    changes: broadcast::Receiver<Change>,
    last_push: Option<Instant>,
}

impl InboxWatch {
    pub async fn new(state: AppState, participant: ParticipantId) -> Result<InboxWatch, ApiError> {
        // Subscribe before listing so no change between the two is missed.
        let durable = state.node.subscribe_durable();
        let remote = state.events.remote_durable.subscribe();
        let reconnected = state.cluster.as_ref().map(|c| c.fanout().generation());
        let changes = state.events.changes.subscribe();
        let conversations = state
            .store
            .conversations_of(&participant)
            .await?
            .into_iter()
            .collect();
        Ok(InboxWatch {
            state,
            participant,
            conversations,
            durable,
            remote,
            reconnected,
            changes,
            last_push: None,
        })
    }

    /// Re-reads which conversations the participant is in (after missing some changes).
    async fn relist(&mut self) -> Result<(), ApiError> {
        self.conversations = self
            .state
            .store
            .conversations_of(&self.participant)
            .await?
            .into_iter()
            .collect();
        Ok(())
    }

    /// Waits for changes and returns the changed entries, at most one batch per second (sooner
    /// when many conversations changed).
    pub async fn next_delta(&mut self) -> Result<Vec<InboxEntry>, ApiError> {
        let mut dirty: HashSet<ConversationId> = HashSet::new();
        loop {
            let deadline = match (dirty.is_empty(), self.last_push) {
                (true, _) => None,
                (false, Some(t)) if dirty.len() < COALESCE_MAX => Some(t + COALESCE),
                (false, _) => Some(Instant::now()),
            };
            if let Some(deadline) = deadline {
                if Instant::now() >= deadline {
                    break;
                }
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let reconnected = async {
                match self.reconnected.as_mut() {
                    Some(g) => g.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ok = reconnected => {
                    if ok {
                        // Memberships may have changed unseen too.
                        self.relist().await?;
                        dirty.extend(self.conversations.iter().cloned());
                    } else {
                        self.reconnected = None;
                    }
                }
                event = self.durable.recv() => match event {
                    Ok(e) if self.conversations.contains(&e.conversation_id) => {
                        dirty.insert(e.conversation_id);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        dirty.extend(self.conversations.iter().cloned());
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ApiError::unavailable("node stopping"));
                    }
                },
                advanced = self.remote.recv() => match advanced {
                    Ok(c) if self.conversations.contains(&c) => {
                        dirty.insert(c);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        dirty.extend(self.conversations.iter().cloned());
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ApiError::unavailable("node stopping"));
                    }
                },
                change = self.changes.recv() => match change {
                    Ok(Change::Cursor(p, c)) if p == self.participant => {
                        dirty.insert(c);
                    }
                    Ok(Change::Membership(p, c)) if p == self.participant => {
                        self.conversations.insert(c.clone());
                        dirty.insert(c);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.relist().await?;
                        dirty.extend(self.conversations.iter().cloned());
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ApiError::unavailable("node stopping"));
                    }
                },
                _ = sleep => break,
            }
        }
        self.last_push = Some(Instant::now());
        let mut ids: Vec<_> = dirty.into_iter().collect();
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for c in ids {
            out.push(crate::service::inbox_entry(&self.state, &self.participant, &c).await?);
        }
        Ok(out)
    }
}
