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

/// Routes "this conversation changed for this participant" to the inbox watchers that care,
/// instead of every watcher filtering every append of the node: a durable append marks the
/// conversation dirty in the watchers of its participants only, a cursor or membership change in
/// the watchers of that participant only. Each watcher holds a [`Watcher`] registration; the
/// router holds, per conversation and per participant, the watchers to tell.
#[derive(Clone, Default)]
pub struct InboxRouter {
    inner: Arc<Mutex<Routes>>,
}

#[derive(Default)]
struct Routes {
    next_id: u64,
    by_conversation: HashMap<ConversationId, HashSet<u64>>,
    by_participant: HashMap<ParticipantId, HashSet<u64>>,
    watchers: HashMap<u64, Route>,
}

struct Route {
    participant: ParticipantId,
    conversations: HashSet<ConversationId>,
    signal: Arc<Signal>,
}

/// What changed for one watcher since it last looked, and its wake-up.
#[derive(Default)]
struct Signal {
    dirty: Mutex<Dirty>,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct Dirty {
    conversations: HashSet<ConversationId>,
    /// Events were lost (a lagging subscription): re-read the memberships and every entry.
    all: bool,
}

impl Signal {
    fn mark(&self, conversation: &ConversationId) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if dirty.all || !dirty.conversations.insert(conversation.clone()) {
            return;
        }
        drop(dirty);
        self.notify.notify_one();
    }

    fn mark_all(&self) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.all = true;
        dirty.conversations.clear();
        drop(dirty);
        self.notify.notify_one();
    }

    fn take(&self) -> Dirty {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl InboxRouter {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a watcher of `participant` in `conversations`.
    fn register(
        &self,
        participant: ParticipantId,
        conversations: HashSet<ConversationId>,
    ) -> Watcher {
        let signal = Arc::new(Signal::default());
        let mut routes = self.routes();
        routes.next_id += 1;
        let id = routes.next_id;
        for c in &conversations {
            routes
                .by_conversation
                .entry(c.clone())
                .or_default()
                .insert(id);
        }
        routes
            .by_participant
            .entry(participant.clone())
            .or_default()
            .insert(id);
        routes.watchers.insert(
            id,
            Route {
                participant,
                conversations,
                signal: signal.clone(),
            },
        );
        Watcher {
            router: self.clone(),
            id,
            signal,
        }
    }

    /// A conversation advanced (a durable append here, or on another node).
    pub fn advanced(&self, conversation: &ConversationId) {
        let routes = self.routes();
        let Some(ids) = routes.by_conversation.get(conversation) else {
            return;
        };
        for id in ids {
            if let Some(route) = routes.watchers.get(id) {
                route.signal.mark(conversation);
            }
        }
    }

    /// Events were lost: every watcher re-reads everything.
    pub fn all_advanced(&self) {
        for route in self.routes().watchers.values() {
            route.signal.mark_all();
        }
    }

    /// A participant's read cursor moved.
    pub fn cursor(&self, participant: &ParticipantId, conversation: &ConversationId) {
        let routes = self.routes();
        for id in routes.by_participant.get(participant).into_iter().flatten() {
            if let Some(route) = routes.watchers.get(id) {
                route.signal.mark(conversation);
            }
        }
    }

    /// A participant joined a conversation (or the conversation was created with it).
    pub fn membership(&self, participant: &ParticipantId, conversation: &ConversationId) {
        let mut routes = self.routes();
        let ids: Vec<u64> = routes
            .by_participant
            .get(participant)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for id in ids {
            routes
                .by_conversation
                .entry(conversation.clone())
                .or_default()
                .insert(id);
            if let Some(route) = routes.watchers.get_mut(&id) {
                route.conversations.insert(conversation.clone());
                route.signal.mark(conversation);
            }
        }
    }

    fn set_conversations(&self, id: u64, conversations: HashSet<ConversationId>) {
        let mut routes = self.routes();
        let Some(route) = routes.watchers.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut route.conversations, conversations.clone());
        for c in old.difference(&conversations) {
            if let Some(ids) = routes.by_conversation.get_mut(c) {
                ids.remove(&id);
                if ids.is_empty() {
                    routes.by_conversation.remove(c);
                }
            }
        }
        for c in conversations {
            routes.by_conversation.entry(c).or_default().insert(id);
        }
    }

    #[cfg(test)]
    fn conversations_of(&self, id: u64) -> Vec<ConversationId> {
        self.routes()
            .watchers
            .get(&id)
            .map(|r| r.conversations.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn unregister(&self, id: u64) {
        let mut routes = self.routes();
        let Some(route) = routes.watchers.remove(&id) else {
            return;
        };
        for c in &route.conversations {
            if let Some(ids) = routes.by_conversation.get_mut(c) {
                ids.remove(&id);
                if ids.is_empty() {
                    routes.by_conversation.remove(c);
                }
            }
        }
        if let Some(ids) = routes.by_participant.get_mut(&route.participant) {
            ids.remove(&id);
            if ids.is_empty() {
                routes.by_participant.remove(&route.participant);
            }
        }
    }

    /// Routes this node's durable appends until the node stops.
    pub async fn route_durable(self, node: Node) {
        let mut durable = node.subscribe_durable();
        loop {
            match durable.recv().await {
                Ok(event) => self.advanced(&event.conversation_id),
                Err(broadcast::error::RecvError::Lagged(_)) => self.all_advanced(),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// One inbox watcher's place in the [`InboxRouter`]; unregisters when dropped.
struct Watcher {
    router: InboxRouter,
    id: u64,
    signal: Arc<Signal>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.router.unregister(self.id);
    }
}

/// The node's event hub: cursor and membership changes (inbox deltas), ephemeral events, slot
/// moves (`backpressure`). In a cluster, what happens here is also published to the other nodes
/// and what they publish is applied here ([`Events::apply_remote`]). Cheap to clone.
#[derive(Clone)]
pub struct Events {
    /// Inbox watchers, by conversation and participant.
    pub router: InboxRouter,
    /// Where ephemeral events and slot-move notices go: one subscriber per joined topic.
    ephemeral: Arc<Mutex<EphemeralSubscribers>>,
    /// Conversations whose description changed on another node.
    meta: broadcast::Sender<ConversationId>,
    /// Where events for the other nodes go (set when the node joins a cluster).
    outbound: Arc<OnceLock<mpsc::Sender<ClusterEvent>>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            router: InboxRouter::default(),
            ephemeral: Arc::default(),
            meta: broadcast::channel(256).0,
            outbound: Arc::default(),
        }
    }
}

/// One joined topic's end of the conversation's ephemeral events: the events are handed to it
/// on the sender's task, without waiting (no task or buffer per subscriber, none per
/// conversation), so a subscriber that cannot take one at once misses it.
pub trait EphemeralSink: Send + Sync {
    /// A `chunk`/`typing` event of another socket.
    fn event(&self, event: &EphemeralEvent);
    /// The conversation's slot is being handed to another node.
    fn slot_moving(&self, retry_after_ms: u64);
}

#[derive(Clone)]
struct EphemeralSubscriber {
    key: u64,
    socket_id: u64,
    slot: u32,
    sink: Arc<dyn EphemeralSink>,
}

/// The ephemeral subscribers of the conversations with joined sockets on this node. A list is
/// replaced, not changed, on a join or leave, so an event clones one pointer under the lock and
/// fans out after it.
#[derive(Default)]
struct EphemeralSubscribers {
    by_conversation: HashMap<ConversationId, Arc<[EphemeralSubscriber]>>,
    next_key: u64,
}

/// A joined topic's registration for ephemeral events: ends when dropped.
pub struct EphemeralSubscription {
    subscribers: Arc<Mutex<EphemeralSubscribers>>,
    conversation: ConversationId,
    key: u64,
}

impl Drop for EphemeralSubscription {
    fn drop(&mut self) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = subscribers.by_conversation.get_mut(&self.conversation) else {
            return;
        };
        let rest: Arc<[EphemeralSubscriber]> =
            list.iter().filter(|s| s.key != self.key).cloned().collect();
        if rest.is_empty() {
            subscribers.by_conversation.remove(&self.conversation);
        } else {
            *list = rest;
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
        self.router.cursor(participant, conversation);
        self.publish(|| ClusterEvent::Cursor {
            participant: participant.to_string(),
            conversation: conversation.to_string(),
        });
    }

    pub fn membership_changed(&self, participant: &ParticipantId, conversation: &ConversationId) {
        self.router.membership(participant, conversation);
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

    /// Registers a joined topic of socket `socket_id` for the conversation's ephemeral events
    /// (except the socket's own) and for notices that its `slot` is moving, until the returned
    /// subscription is dropped.
    pub fn subscribe_ephemeral(
        &self,
        conversation: &ConversationId,
        slot: u32,
        socket_id: u64,
        sink: Arc<dyn EphemeralSink>,
    ) -> EphemeralSubscription {
        let mut subscribers = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.next_key += 1;
        let key = subscribers.next_key;
        let subscriber = EphemeralSubscriber {
            key,
            socket_id,
            slot,
            sink,
        };
        let list = subscribers
            .by_conversation
            .entry(conversation.clone())
            .or_insert_with(|| Arc::new([]));
        *list = list
            .iter()
            .cloned()
            .chain(std::iter::once(subscriber))
            .collect();
        EphemeralSubscription {
            subscribers: self.ephemeral.clone(),
            conversation: conversation.clone(),
            key,
        }
    }

    /// Hands `event` to the conversation's sockets on this node other than its sender's.
    fn deliver_ephemeral(&self, conversation: &ConversationId, event: EphemeralEvent) {
        let list = self
            .ephemeral
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_conversation
            .get(conversation)
            .cloned();
        for subscriber in list.iter().flat_map(|l| l.iter()) {
            if subscriber.socket_id != event.from_socket {
                subscriber.sink.event(&event);
            }
        }
    }

    /// Sends an ephemeral event to the conversation's other sockets, on every node.
    pub fn send_ephemeral(&self, conversation: &ConversationId, event: EphemeralEvent) {
        self.publish(|| ClusterEvent::Ephemeral {
            conversation: conversation.to_string(),
            event: event.event.to_owned(),
            payload: event.payload.clone(),
        });
        self.deliver_ephemeral(conversation, event);
    }

    /// `slot` is being handed over (by this node, or by another one of the cluster): the
    /// topics joined here to its conversations are told.
    pub fn slot_moving(&self, slot: u32, retry_after_ms: u64) {
        let sinks: Vec<Arc<dyn EphemeralSink>> = self
            .ephemeral
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_conversation
            .values()
            .flat_map(|list| list.iter())
            .filter(|s| s.slot == slot)
            .map(|s| s.sink.clone())
            .collect();
        for sink in sinks {
            sink.slot_moving(retry_after_ms);
        }
    }

    /// A conversation advanced on another node.
    pub fn remote_durable(&self, conversation: &ConversationId) {
        self.router.advanced(conversation);
    }

    /// A cursor or membership change another node published, for this node's inbox watchers.
    fn apply_change(
        &self,
        participant: &str,
        conversation: &str,
        change: fn(&InboxRouter, &ParticipantId, &ConversationId),
    ) {
        if let (Ok(p), Ok(c)) = (
            ParticipantId::parse(participant),
            ConversationId::parse(conversation),
        ) {
            change(&self.router, &p, &c);
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
                    self.deliver_ephemeral(
                        &c,
                        EphemeralEvent {
                            from_socket: 0,
                            event: name,
                            payload,
                        },
                    );
                }
            }
            ClusterEvent::Cursor {
                participant,
                conversation,
            } => self.apply_change(&participant, &conversation, InboxRouter::cursor),
            ClusterEvent::Membership {
                participant,
                conversation,
            } => self.apply_change(&participant, &conversation, InboxRouter::membership),
            ClusterEvent::Meta { conversation } => {
                if let Some(c) = conversation_of(&conversation) {
                    let _ = self.meta.send(c);
                }
            }
            ClusterEvent::Moving {
                slot,
                retry_after_ms,
            } => self.slot_moving(slot, retry_after_ms),
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

/// Most inbox entries one snapshot page holds.
pub const MAX_SNAPSHOT_PAGE: usize = 1000;

/// One page of a participant's inbox: conversations in id order after `after`, at most `limit`;
/// each entry from the conversation's owner. `true` when more follow.
pub async fn snapshot(
    state: &AppState,
    participant: &ParticipantId,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<InboxEntry>, bool), ApiError> {
    let mut ids = state.store.conversations_of(participant).await?;
    ids.sort();
    let start = match after {
        Some(after) => ids.partition_point(|c| c.as_str() <= after),
        None => 0,
    };
    let limit = limit.clamp(1, MAX_SNAPSHOT_PAGE);
    let page = &ids[start..];
    let has_more = page.len() > limit;
    let mut out = Vec::with_capacity(page.len().min(limit));
    for conversation in page.iter().take(limit) {
        out.push(crate::service::inbox_entry(state, participant, conversation).await?);
    }
    Ok((out, has_more))
}

/// Live inbox changes for one participant, coalesced. Told by the [`InboxRouter`] which of its
/// conversations changed; it never looks at another participant's traffic.
pub struct InboxWatch {
    state: AppState,
    participant: ParticipantId,
    watcher: Watcher,
    /// Changes when the cluster's Redis subscription was lost or came back: what other nodes
    /// published meanwhile is gone, so every conversation is re-read.
    reconnected: Option<tokio::sync::watch::Receiver<u64>>,
    last_push: Option<Instant>,
}

impl InboxWatch {
    pub async fn new(state: AppState, participant: ParticipantId) -> Result<InboxWatch, ApiError> {
        let reconnected = state.cluster.as_ref().map(|c| c.fanout().generation());
        // Registered before listing so no change between the two is missed (a conversation the
        // participant joins meanwhile is added by its membership change).
        let watcher = state
            .events
            .router
            .register(participant.clone(), HashSet::new());
        let conversations = state
            .store
            .conversations_of(&participant)
            .await?
            .into_iter()
            .collect();
        state
            .events
            .router
            .set_conversations(watcher.id, conversations);
        Ok(InboxWatch {
            state,
            participant,
            watcher,
            reconnected,
            last_push: None,
        })
    }

    /// Re-reads which conversations the participant is in (after missing some changes).
    async fn relist(&mut self) -> Result<Vec<ConversationId>, ApiError> {
        let conversations: HashSet<ConversationId> = self
            .state
            .store
            .conversations_of(&self.participant)
            .await?
            .into_iter()
            .collect();
        let all = conversations.iter().cloned().collect();
        self.state
            .events
            .router
            .set_conversations(self.watcher.id, conversations);
        Ok(all)
    }

    /// Waits for changes and returns the changed entries, at most one batch per second (sooner
    /// when many conversations changed).
    pub async fn next_delta(&mut self) -> Result<Vec<InboxEntry>, ApiError> {
        let mut dirty: HashSet<ConversationId> = HashSet::new();
        loop {
            let taken = self.watcher.signal.take();
            if taken.all {
                dirty.extend(self.relist().await?);
            }
            dirty.extend(taken.conversations);
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
                        dirty.extend(self.relist().await?);
                    } else {
                        self.reconnected = None;
                    }
                }
                _ = self.watcher.signal.notify.notified() => {}
                _ = sleep => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ParticipantId {
        ParticipantId::parse(s).unwrap()
    }

    fn c(s: &str) -> ConversationId {
        ConversationId::parse(s).unwrap()
    }

    /// What a test subscriber was handed: `(event, from_socket)` and slot-move notices.
    #[derive(Default)]
    struct Recorded {
        events: Mutex<Vec<(&'static str, u64)>>,
        moves: Mutex<Vec<u64>>,
    }

    impl EphemeralSink for Recorded {
        fn event(&self, event: &EphemeralEvent) {
            self.events
                .lock()
                .unwrap()
                .push((event.event, event.from_socket));
        }
        fn slot_moving(&self, retry_after_ms: u64) {
            self.moves.lock().unwrap().push(retry_after_ms);
        }
    }

    #[test]
    fn ephemeral_events_reach_the_other_subscribers_of_the_conversation_only() {
        let events = Events::default();
        let typing = |from_socket| EphemeralEvent {
            from_socket,
            event: "typing",
            payload: serde_json::json!({"participant": "alice"}),
        };
        // Nobody here: nothing is kept for the conversation.
        events.send_ephemeral(&c("quiet"), typing(1));
        assert!(events.ephemeral.lock().unwrap().by_conversation.is_empty());

        let (a, b, other) = (
            Arc::new(Recorded::default()),
            Arc::new(Recorded::default()),
            Arc::new(Recorded::default()),
        );
        let sub_a = events.subscribe_ephemeral(&c("busy"), 3, 1, a.clone());
        let sub_b = events.subscribe_ephemeral(&c("busy"), 3, 2, b.clone());
        let sub_other = events.subscribe_ephemeral(&c("other"), 4, 2, other.clone());
        events.send_ephemeral(&c("busy"), typing(1));
        events.send_ephemeral(&c("busy"), typing(2));
        events.send_ephemeral(&c("busy"), typing(9));
        assert_eq!(
            *a.events.lock().unwrap(),
            vec![("typing", 2), ("typing", 9)]
        );
        assert_eq!(
            *b.events.lock().unwrap(),
            vec![("typing", 1), ("typing", 9)]
        );
        assert!(other.events.lock().unwrap().is_empty());

        // A slot move reaches the subscribers of that slot's conversations, from any node.
        events.slot_moving(3, 250);
        events.apply_remote(ClusterEvent::Moving {
            slot: 4,
            retry_after_ms: 100,
        });
        assert_eq!(*a.moves.lock().unwrap(), vec![250]);
        assert_eq!(*b.moves.lock().unwrap(), vec![250]);
        assert_eq!(*other.moves.lock().unwrap(), vec![100]);

        // A subscription ends when dropped; the conversation's entry goes with its last one.
        drop(sub_a);
        events.send_ephemeral(&c("busy"), typing(9));
        assert_eq!(a.events.lock().unwrap().len(), 2);
        assert_eq!(b.events.lock().unwrap().len(), 3);
        drop((sub_b, sub_other));
        assert!(events.ephemeral.lock().unwrap().by_conversation.is_empty());
    }

    fn dirty_of(w: &Watcher) -> Vec<String> {
        let mut v: Vec<String> = w
            .signal
            .take()
            .conversations
            .iter()
            .map(|c| c.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn changes_reach_only_the_watchers_that_care() {
        let router = InboxRouter::default();
        let alice = router.register(p("alice"), [c("a1"), c("shared")].into_iter().collect());
        let bob = router.register(p("bob"), [c("shared")].into_iter().collect());
        router.advanced(&c("a1"));
        router.advanced(&c("shared"));
        router.advanced(&c("nobody"));
        assert_eq!(dirty_of(&alice), ["a1", "shared"]);
        assert_eq!(dirty_of(&bob), ["shared"]);

        // Cursor moves reach the participant's watchers only.
        router.cursor(&p("bob"), &c("shared"));
        assert!(dirty_of(&alice).is_empty());
        assert_eq!(dirty_of(&bob), ["shared"]);

        // A new membership adds the conversation to the participant's watchers.
        router.membership(&p("bob"), &c("b2"));
        assert_eq!(dirty_of(&bob), ["b2"]);
        router.advanced(&c("b2"));
        assert_eq!(dirty_of(&bob), ["b2"]);
        assert!(dirty_of(&alice).is_empty());

        // Lost events: everyone re-reads everything.
        router.all_advanced();
        assert!(alice.signal.take().all && bob.signal.take().all);

        // A dropped watcher leaves nothing behind.
        drop(alice);
        drop(bob);
        let routes = router.routes();
        assert!(routes.watchers.is_empty());
        assert!(routes.by_conversation.is_empty());
        assert!(routes.by_participant.is_empty());
    }

    #[test]
    fn relisting_replaces_the_conversations() {
        let router = InboxRouter::default();
        let w = router.register(p("alice"), [c("old")].into_iter().collect());
        router.set_conversations(w.id, [c("new")].into_iter().collect());
        router.advanced(&c("old"));
        assert!(dirty_of(&w).is_empty());
        router.advanced(&c("new"));
        assert_eq!(dirty_of(&w), ["new"]);
        assert_eq!(router.conversations_of(w.id), vec![c("new")]);
    }
}
