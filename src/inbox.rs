//! Inbox: per participant, each conversation's last seq, read cursor, unread count and last
//! message; plus the node-local event hub that drives live inbox updates and ephemeral
//! broadcasts (`chunk`, `typing`).
//!
//! Unread = messages after the participant's read cursor that someone else sent.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;

use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::node::Node;
use ferry_shards::record::Message;

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

/// The node-local event hub. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    changes: broadcast::Sender<Change>,
    ephemeral: Arc<Mutex<HashMap<ConversationId, broadcast::Sender<EphemeralEvent>>>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            changes: broadcast::channel(1024).0,
            ephemeral: Arc::default(),
        }
    }
}

static SOCKET_IDS: AtomicU64 = AtomicU64::new(1);

/// A process-unique id for a socket (to avoid echoing its own ephemeral events).
pub fn next_socket_id() -> u64 {
    SOCKET_IDS.fetch_add(1, Ordering::Relaxed)
}

impl Events {
    pub fn cursor_changed(&self, participant: &ParticipantId, conversation: &ConversationId) {
        let _ = self
            .changes
            .send(Change::Cursor(participant.clone(), conversation.clone()));
    }

    pub fn membership_changed(&self, participant: &ParticipantId, conversation: &ConversationId) {
        let _ = self.changes.send(Change::Membership(
            participant.clone(),
            conversation.clone(),
        ));
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

/// The whole inbox of a participant.
pub async fn snapshot(
    node: &Node,
    store: &Store,
    participant: &ParticipantId,
) -> Result<Vec<InboxEntry>, StoreError> {
    let mut out = Vec::new();
    for conversation in store.conversations_of(participant).await? {
        out.push(entry(node, store, participant, &conversation).await?);
    }
    Ok(out)
}

/// Live inbox changes for one participant, coalesced.
pub struct InboxWatch {
    state: AppState,
    participant: ParticipantId,
    conversations: HashSet<ConversationId>,
    durable: broadcast::Receiver<ferry_shards::node::DurableEvent>,
    changes: broadcast::Receiver<Change>,
    last_push: Option<Instant>,
}

impl InboxWatch {
    pub async fn new(state: AppState, participant: ParticipantId) -> Result<InboxWatch, ApiError> {
        // Subscribe before listing so no change between the two is missed.
        let durable = state.node.subscribe_durable();
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
            changes,
            last_push: None,
        })
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
            tokio::select! {
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
                        self.conversations = self
                            .state
                            .store
                            .conversations_of(&self.participant)
                            .await?
                            .into_iter()
                            .collect();
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
            out.push(entry(&self.state.node, &self.state.store, &self.participant, &c).await?);
        }
        Ok(out)
    }
}
