//! Live fan-out between nodes through Redis pub/sub.
//!
//! - Messages: the owner publishes every message once it is durable on `ferry:m:{slot}`, tagged
//!   with the slot's epoch and its seq ([`run_publisher`]). Receivers on other nodes hand it to
//!   the remote subscribers of its conversation ([`Fanout::subscribe`]). Pub/sub is lossy (a
//!   reconnect, a slow subscriber): receivers check seq continuity and fill any gap from the
//!   owner, ask the owner for its last seq periodically (a lost *last* message is no gap), and
//!   after every reconnect ([`Fanout::generation`] changes) catch every subscription up.
//! - Events on `ferry:ev`: `chunk`/`typing`, read-cursor and membership changes (inbox deltas),
//!   description changes, and "slot moving" (`backpressure` pushes). Best effort by design.
//!
//! Epochs: a message is published with the epoch it was written under, and only while the
//! publishing node's lease is valid. Receivers keep the highest epoch they know per slot (from
//! messages and from the slot rows the node reads) and drop a message from an older epoch — a
//! node that was paused or cut off and published late — counting it in
//! `ferry_fanout_stale_total`; whatever it should have carried is read from the current owner.
//!
//! Redis carries nothing the cluster needs for correctness: without it, delivery across nodes
//! falls back to the periodic check (about one second behind) and ephemeral events stay local.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use ferry_shards::gate::Gates;
use ferry_shards::ids::ConversationId;
use ferry_shards::node::{DurableEvent, Node};
use ferry_shards::record::Message;

use super::peer::WireMessage;
use crate::inbox::Events;

const MESSAGE_PREFIX: &str = "ferry:m:";
const MESSAGE_PATTERN: &str = "ferry:m:*";
const EVENT_CHANNEL: &str = "ferry:ev";
/// Events waiting to be published; past it they are dropped (they are best effort).
const OUTBOUND_CAPACITY: usize = 4096;
/// A subscriber connection that does not answer a ping within this long is replaced.
const PING_EVERY: Duration = Duration::from_secs(2);

/// A cluster-wide event (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ClusterEvent {
    Ephemeral {
        conversation: String,
        event: String,
        payload: serde_json::Value,
    },
    Cursor {
        participant: String,
        conversation: String,
    },
    Membership {
        participant: String,
        conversation: String,
    },
    Meta {
        conversation: String,
    },
    Moving {
        slot: u32,
        retry_after_ms: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct EventEnvelope {
    /// The node that sent it (a node ignores its own).
    n: String,
    #[serde(flatten)]
    event: ClusterEvent,
}

#[derive(Serialize, Deserialize)]
struct MessageEnvelope {
    n: String,
    e: u64,
    m: WireMessage,
}

/// The node's side of Redis fan-out. Cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<FanoutInner>,
}

struct FanoutInner {
    node_id: String,
    /// Live messages of other nodes, per conversation with a remote subscriber here.
    conversations: Mutex<HashMap<ConversationId, broadcast::Sender<Arc<Message>>>>,
    /// Bumped when the subscriber connection was lost (and again when it is back).
    generation: watch::Sender<u64>,
    /// The highest epoch known per slot; messages from older ones are dropped.
    epochs: Epochs,
    outbound: mpsc::Sender<ClusterEvent>,
    events: Events,
}

impl Fanout {
    /// Starts the publisher and the subscriber tasks; they run until `stop`.
    pub fn start(
        redis_url: &str,
        node_id: String,
        node: Node,
        events: Events,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Fanout> {
        let client = redis::Client::open(redis_url)?;
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        events.set_outbound(outbound.clone());
        let fanout = Fanout {
            inner: Arc::new(FanoutInner {
                node_id,
                conversations: Mutex::new(HashMap::new()),
                generation: watch::channel(0).0,
                epochs: Epochs::new(node.gates().slot_count()),
                outbound,
                events,
            }),
        };
        tokio::spawn(run_publisher(
            client.clone(),
            fanout.clone(),
            node.subscribe_durable(),
            node.gates().clone(),
            outbound_rx,
            stop.clone(),
        ));
        tokio::spawn(run_subscriber(client, fanout.clone(), stop));
        Ok(fanout)
    }

    /// Live messages of `conversation` published by other nodes.
    pub fn subscribe(&self, conversation: &ConversationId) -> broadcast::Receiver<Arc<Message>> {
        let mut map = self
            .inner
            .conversations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.len() > 1024 {
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        map.entry(conversation.clone())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    /// Changes whenever live messages may have been missed (Redis connection lost or back).
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Publishes an event to the other nodes (dropped when the queue is full: best effort).
    pub fn publish(&self, event: ClusterEvent) {
        let _ = self.inner.outbound.try_send(event);
    }

    /// Tells every node's sockets joined to the slot's conversations to back off.
    pub fn slot_moving(&self, slot: u32, retry_after_ms: u64) {
        self.inner.events.slot_moving(slot, retry_after_ms);
        self.publish(ClusterEvent::Moving {
            slot,
            retry_after_ms,
        });
    }

    /// Records that `slot` is owned at `epoch` or later (from a slot row this node read).
    pub fn observe_epoch(&self, slot: u32, epoch: u64) {
        // Older than what a message already showed is fine: the row read may simply be old.
        let _ = self.inner.epochs.admit(slot, epoch);
    }

    fn bump_generation(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    fn deliver_message(&self, envelope: MessageEnvelope) {
        if envelope.n == self.inner.node_id {
            return;
        }
        let slot = envelope.m.slot;
        if let Err(known) = self.inner.epochs.admit(slot, envelope.e) {
            tracing::debug!(
                slot,
                epoch = envelope.e,
                current_epoch = known,
                from = %envelope.n,
                "dropped a fan-out message from an older epoch"
            );
            metrics::counter!(crate::metrics::FANOUT_STALE_TOTAL).increment(1);
            return;
        }
        let message = match envelope.m.into_message() {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable message on the fan-out channel");
                return;
            }
        };
        self.inner.events.remote_durable(&message.conversation_id);
        let sender = self
            .inner
            .conversations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&message.conversation_id)
            .cloned();
        if let Some(sender) = sender {
            let _ = sender.send(message);
        }
    }

    fn deliver_event(&self, envelope: EventEnvelope) {
        if envelope.n == self.inner.node_id {
            return;
        }
        self.inner.events.apply_remote(envelope.event);
    }
}

/// The highest epoch known per slot.
struct Epochs(Vec<AtomicU64>);

impl Epochs {
    fn new(slot_count: u32) -> Epochs {
        Epochs((0..slot_count).map(|_| AtomicU64::new(0)).collect())
    }

    /// Notes `epoch` for `slot`; `Err(known)` when a newer epoch `known` is already known there.
    fn admit(&self, slot: u32, epoch: u64) -> Result<(), u64> {
        let Some(known) = self.0.get(slot as usize) else {
            return Ok(());
        };
        let known = known.fetch_max(epoch, Ordering::SeqCst);
        if epoch < known {
            Err(known)
        } else {
            Ok(())
        }
    }
}

/// Publishes this node's durable messages (tagged with their slot's epoch) and its events.
async fn run_publisher(
    client: redis::Client,
    fanout: Fanout,
    mut durable: broadcast::Receiver<DurableEvent>,
    gates: Arc<Gates>,
    mut outbound: mpsc::Receiver<ClusterEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        // Wait for something to publish.
        let mut pipe = redis::pipe();
        let mut count = 0usize;
        tokio::select! {
            event = durable.recv() => match event {
                Ok(e) => { add_message(&mut pipe, &fanout, &gates, &e); count += 1; }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "fan-out publisher lagged; receivers fill the gap from the owner");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            event = outbound.recv() => match event {
                Some(e) => { add_event(&mut pipe, &fanout, e); count += 1; }
                None => return,
            },
            _ = super::stopped(&mut stop) => return,
        }
        // Everything else already waiting goes in the same round trip.
        while count < 512 {
            match durable.try_recv() {
                Ok(e) => add_message(&mut pipe, &fanout, &gates, &e),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
            count += 1;
        }
        while count < 1024 {
            match outbound.try_recv() {
                Ok(e) => add_event(&mut pipe, &fanout, e),
                Err(_) => break,
            }
            count += 1;
        }
        if connection.is_none() {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => {
                    connection = Some(c);
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis unavailable for publishing");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let Some(conn) = connection.as_mut() else {
            continue;
        };
        let sent: redis::RedisResult<()> =
            tokio::time::timeout(Duration::from_secs(2), pipe.query_async(conn))
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "publish timed out",
                    )))
                });
        if let Err(e) = sent {
            tracing::debug!(error = %e, "redis publish failed; receivers fill the gap from the owner");
            connection = None;
        }
    }
}

fn add_message(pipe: &mut redis::Pipeline, fanout: &Fanout, gates: &Gates, e: &DurableEvent) {
    // A node whose lease lapsed acknowledges nothing and must not announce anything either:
    // receivers read it from whoever owns the slot once it is settled.
    if !gates.lease_valid() {
        return;
    }
    let slot = e.message.slot;
    let envelope = MessageEnvelope {
        n: fanout.inner.node_id.clone(),
        e: e.message.epoch,
        m: WireMessage::from(&*e.message),
    };
    if let Ok(payload) = serde_json::to_vec(&envelope) {
        pipe.cmd("PUBLISH")
            .arg(format!("{MESSAGE_PREFIX}{slot}"))
            .arg(payload)
            .ignore();
    }
}

fn add_event(pipe: &mut redis::Pipeline, fanout: &Fanout, event: ClusterEvent) {
    let envelope = EventEnvelope {
        n: fanout.inner.node_id.clone(),
        event,
    };
    if let Ok(payload) = serde_json::to_vec(&envelope) {
        pipe.cmd("PUBLISH").arg(EVENT_CHANNEL).arg(payload).ignore();
    }
}

/// Receives the other nodes' messages and events; reconnects (with backoff) whenever the
/// connection is lost or stops answering pings, bumping the generation both times.
async fn run_subscriber(client: redis::Client, fanout: Fanout, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(MESSAGE_PATTERN).await?;
            pubsub.subscribe(EVENT_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            c = tokio::time::timeout(Duration::from_secs(2), connected) => c,
            _ = super::stopped(&mut stop) => return,
        };
        let pubsub = match pubsub {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis subscribe failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // Subscribed: anything published while we were away must be read from the owners.
        fanout.bump_generation();
        tracing::info!("subscribed to cluster fan-out");
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    let channel = msg.get_channel_name();
                    let payload = msg.get_payload_bytes();
                    if channel == EVENT_CHANNEL {
                        match serde_json::from_slice::<EventEnvelope>(payload) {
                            Ok(e) => fanout.deliver_event(e),
                            Err(e) => tracing::debug!(error = %e, "undecodable cluster event"),
                        }
                    } else if channel.starts_with(MESSAGE_PREFIX) {
                        match serde_json::from_slice::<MessageEnvelope>(payload) {
                            Ok(m) => fanout.deliver_message(m),
                            Err(e) => tracing::debug!(error = %e, "undecodable fan-out message"),
                        }
                    }
                }
                _ = ping.tick() => {
                    let alive: bool = matches!(
                        tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>()).await,
                        Ok(Ok(_))
                    );
                    if !alive {
                        break;
                    }
                }
                _ = super::stopped(&mut stop) => return,
            }
        }
        tracing::warn!("lost the cluster fan-out subscription; reconnecting");
        fanout.bump_generation();
    }
}

#[cfg(test)]
mod tests {
    use super::Epochs;

    #[test]
    fn a_publication_from_an_older_epoch_is_refused_once_a_newer_one_is_known() {
        let epochs = Epochs::new(4);
        assert_eq!(epochs.admit(1, 3), Ok(()));
        assert_eq!(epochs.admit(1, 3), Ok(()), "the same epoch again");
        // The slot row says it moved on (or the new owner published first).
        assert_eq!(epochs.admit(1, 4), Ok(()));
        assert_eq!(epochs.admit(1, 3), Err(4), "the old owner, late");
        assert_eq!(epochs.admit(2, 1), Ok(()), "other slots are not affected");
        assert_eq!(
            epochs.admit(9, 0),
            Ok(()),
            "a slot out of range is not judged"
        );
    }
}
