//! Subscribers: one WebSocket per conversation, joined through a chosen node, recording every
//! `message` push in arrival order for [`super::check`].
//!
//! A subscriber behaves like the Phoenix JavaScript client: it ignores pushes that carry the
//! join_ref of an earlier join of its topic (a stale channel), rejoins with `after_seq` = the last
//! seq it delivered when the server errors or closes the topic, and reconnects (then rejoins the
//! same way) when the socket ends. It records everything else as it arrives and dedupes nothing:
//! a repeat or a hole is for the checker to find. It also counts `backpressure` pushes, keeps
//! every `gap` push, and counts its faults by kind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::phx::PhxSocket;
use super::{stopped, NodeBook};
use crate::common::API_KEY;

/// How long a join may go unanswered before the socket is dropped and opened again.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before reconnecting after a failed connect or a lost socket.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Pause before a rejoin after an error reply that carries no `retry_after_ms`.
const REJOIN_PAUSE: Duration = Duration::from_millis(200);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(20);

/// What one subscriber saw.
#[derive(Debug, Clone, Default)]
pub struct SubState {
    /// The node (1-based) it connects through.
    pub node: usize,
    /// `(seq, message id)` of every `message` push of its current joins, in arrival order.
    pub delivered: Vec<(u64, String)>,
    /// Message id → `metadata.key` of every message pushed to it.
    pub keys: std::collections::HashMap<String, String>,
    /// Successful joins (the first one and every rejoin).
    pub joins: u64,
    /// Sockets opened.
    pub connects: u64,
    pub backpressure: u64,
    /// Payloads of `gap` pushes (none are expected without a failover).
    pub gaps: Vec<Value>,
    /// Pushes of an earlier join, ignored as a Phoenix client ignores them.
    pub stale_pushes: u64,
    /// Connect failures, lost sockets, errored topics, refused joins, by kind.
    pub faults: BTreeMap<String, u64>,
}

impl SubState {
    pub fn last_seq(&self) -> u64 {
        self.delivered.last().map(|(s, _)| *s).unwrap_or(0)
    }
}

/// Conversation id → what its subscriber saw.
pub type SubscriberLog = BTreeMap<String, SubState>;

pub struct Subscribers {
    state: Arc<Mutex<SubscriberLog>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Subscribers {
    /// One subscriber per `(conversation, node)`, joined from `after_seq` 0.
    pub fn start(book: &NodeBook, targets: &[(String, usize)]) -> Subscribers {
        let (stop, stop_rx) = watch::channel(false);
        let mut state = SubscriberLog::new();
        for (conversation, node) in targets {
            let previous = state.insert(
                conversation.clone(),
                SubState {
                    node: *node,
                    ..SubState::default()
                },
            );
            assert!(previous.is_none(), "two subscribers for {conversation}");
        }
        let state = Arc::new(Mutex::new(state));
        let mut tasks = JoinSet::new();
        for (conversation, node) in targets {
            tasks.spawn(subscriber(
                conversation.clone(),
                *node,
                book.clone(),
                state.clone(),
                stop_rx.clone(),
            ));
        }
        Subscribers { state, stop, tasks }
    }

    /// An empty set (for checks of a workload without subscribers).
    pub fn none() -> Subscribers {
        Subscribers::start(&NodeBook::empty(), &[])
    }

    /// A copy of what every subscriber saw so far.
    pub fn log(&self) -> SubscriberLog {
        self.state.lock().expect("subscriber state").clone()
    }

    /// Waits (bounded) until every subscriber has been joined at least once.
    pub async fn wait_joined(&self, timeout: Duration) {
        super::wait_for("every subscriber joined", timeout, || async {
            let log = self.log();
            let waiting: Vec<_> = log
                .iter()
                .filter(|(_, s)| s.joins == 0)
                .map(|(c, s)| format!("{c} via n{} faults {:?}", s.node, s.faults))
                .collect();
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!("{} not joined: {waiting:?}", waiting.len()))
            }
        })
        .await
    }

    /// Total `backpressure` pushes of the given conversations' subscribers.
    pub fn backpressure(&self, conversations: &[String]) -> u64 {
        let log = self.log();
        conversations
            .iter()
            .filter_map(|c| log.get(c))
            .map(|s| s.backpressure)
            .sum()
    }

    /// Stops every subscriber (they hold no request in flight) and returns what they saw.
    pub async fn stop(mut self) -> SubscriberLog {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        self.log()
    }
}

/// Sleeps unless stopped first; `true` when stopped.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stopped(stop) => return true,
    }
    *stop.borrow()
}

async fn subscriber(
    conversation: String,
    node: usize,
    book: NodeBook,
    state: Arc<Mutex<SubscriberLog>>,
    mut stop: watch::Receiver<bool>,
) {
    let topic = format!("conversation:{conversation}");
    let with = |f: &mut dyn FnMut(&mut SubState)| {
        let mut all = state.lock().expect("subscriber state");
        f(all.get_mut(&conversation).expect("subscriber registered"));
    };
    let fault = |kind: &str| {
        with(&mut |s| *s.faults.entry(kind.to_owned()).or_default() += 1);
    };
    let last_seq = || {
        let all = state.lock().expect("subscriber state");
        all[&conversation].last_seq()
    };

    'connect: loop {
        if *stop.borrow() {
            return;
        }
        let Some(addr) = book.listen(node) else {
            fault("node_down");
            if pause(RECONNECT_PAUSE, &mut stop).await {
                return;
            }
            continue;
        };
        let mut sock = match PhxSocket::connect(addr, API_KEY).await {
            Ok(sock) => sock,
            Err(_) => {
                fault("connect");
                if pause(RECONNECT_PAUSE, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        with(&mut |s| s.connects += 1);
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.tick().await;

        'join: loop {
            let Ok(join_ref) = sock.join(&topic, json!({ "after_seq": last_seq() })).await else {
                fault("lost");
                continue 'connect;
            };
            let mut joined = false;
            let join_deadline = tokio::time::sleep(JOIN_TIMEOUT);
            tokio::pin!(join_deadline);
            loop {
                let frame = tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = heartbeat.tick() => {
                        if sock.heartbeat().await.is_err() {
                            fault("lost");
                            continue 'connect;
                        }
                        continue;
                    }
                    _ = &mut join_deadline, if !joined => {
                        fault("join timeout");
                        continue 'connect;
                    }
                    frame = sock.recv() => frame,
                };
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(_) => {
                        fault("lost");
                        if pause(RECONNECT_PAUSE, &mut stop).await {
                            return;
                        }
                        continue 'connect;
                    }
                };
                if frame.topic != topic {
                    continue;
                }
                let current = frame.join_ref.as_deref() == Some(join_ref.as_str());
                match frame.event.as_str() {
                    "phx_reply" if frame.ref_.as_deref() == Some(join_ref.as_str()) => {
                        if frame.status() == Some("ok") {
                            joined = true;
                            with(&mut |s| s.joins += 1);
                            continue;
                        }
                        let response = frame.response();
                        let reason = response["reason"].as_str().unwrap_or("-");
                        let detail = response["detail"].as_str().unwrap_or("-");
                        fault(&format!("join {reason}/{detail}"));
                        let wait = response["retry_after_ms"]
                            .as_u64()
                            .map(Duration::from_millis)
                            .unwrap_or(REJOIN_PAUSE)
                            .min(Duration::from_secs(2));
                        if pause(wait, &mut stop).await {
                            return;
                        }
                        continue 'join;
                    }
                    "message" if current => {
                        let seq = frame.payload["seq"].as_u64().unwrap_or(0);
                        let id = frame.payload["id"].as_str().unwrap_or("").to_owned();
                        let key = frame.payload["metadata"]["key"].as_str().map(str::to_owned);
                        with(&mut |s| {
                            s.delivered.push((seq, id.clone()));
                            if let Some(key) = &key {
                                s.keys.insert(id.clone(), key.clone());
                            }
                        });
                    }
                    "message" => with(&mut |s| s.stale_pushes += 1),
                    "backpressure" if current => with(&mut |s| s.backpressure += 1),
                    "gap" if current => {
                        let payload = frame.payload.clone();
                        with(&mut |s| s.gaps.push(payload.clone()));
                    }
                    "phx_error" | "phx_close" if current => {
                        fault(&frame.event);
                        if pause(RECONNECT_PAUSE, &mut stop).await {
                            return;
                        }
                        continue 'join;
                    }
                    _ => {}
                }
            }
        }
    }
}
