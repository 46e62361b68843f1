//! Writer workloads: tasks that append through chosen nodes and record what the cluster
//! acknowledged, for [`super::check`] to hold against what it stored.
//!
//! [`Writers::http`] and [`Writers::ws`] start `writers_per_node` tasks per node
//! ([`Writers::http_via`] and [`Writers::ws_via`] on chosen nodes only). Writer `g` (numbered
//! across its nodes) appends to the conversations whose index is `g` modulo the number of
//! writers, always THROUGH its own node, so most requests land on a node that does not own the
//! conversation's slot. Every message gets a unique idempotency key and a unique content
//! `{w, i}` (writer label, counter); the key also goes into `metadata.key`, which is how the
//! checker finds which key a stored message carries.
//!
//! A writer sends one message at a time and retries it with the SAME key until it is
//! acknowledged or the workload is stopped: after `retry_after_ms` (or 50 ms) on 429/503, after
//! 50 ms on a refused or timed-out connection, after a reconnect and rejoin on a lost socket or a
//! `phx_error`. Every other answer (500, any other 4xx) is a hard error: recorded, and the writer
//! moves on to its next message. Errors are counted by kind (`http 503 try_again/owner_unavailable`,
//! `http timeout`, `ws lost`, ...).
//!
//! Addresses come from the [`NodeBook`], so writers follow a node that restarts on a new port
//! and treat a node that is down as a connection error.
//!
//! [`Writers::stop`] lets every writer finish the request it has in flight (bounded by the
//! request timeout), then joins them; dropping a [`Writers`] aborts its tasks.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::phx::{Frame, PhxSocket};
use super::{stopped, Conversation, NodeBook};
use crate::common::API_KEY;

/// Pause after a connection failure before the same message is tried again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Longest `retry_after_ms` a writer honours (keeps a test responsive to a bad hint).
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);
/// How long `stop` waits for the writers to finish their in-flight request.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// A WebSocket writer sends a heartbeat at least this often (the server closes a socket that is
/// silent for 60 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(20);

/// How hard the writers push.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub writers_per_node: usize,
    /// Time between the starts of one writer's consecutive messages (retries do not wait for it).
    pub interval: Duration,
    /// Bound on every request; a request to a paused node hangs until it.
    pub request_timeout: Duration,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            writers_per_node: 2,
            interval: Duration::from_millis(40),
            request_timeout: Duration::from_secs(3),
        }
    }
}

/// One acknowledgement, as the client received it.
#[derive(Debug, Clone)]
pub struct AckRecord {
    pub conversation: String,
    pub key: String,
    pub seq: u64,
    /// The server-assigned message id.
    pub id: String,
    pub content: Value,
    /// Writer label (`h1-0`, `w2-0`, ...).
    pub writer: String,
    /// The node (1-based) the acknowledged request went through.
    pub node: usize,
    /// `http` or `ws`.
    pub via: &'static str,
    pub deduped: bool,
    /// When the first attempt of this key was sent.
    pub first_sent: Instant,
    /// When the acknowledged attempt was sent.
    pub sent: Instant,
    /// When the acknowledgement arrived.
    pub received: Instant,
}

/// A key a writer sent at least once.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub conversation: String,
    pub content: Value,
    pub writer: String,
}

/// Everything a workload (or a test's own probes) sent and got back.
#[derive(Debug, Clone, Default)]
pub struct WriteLog {
    pub acks: Vec<AckRecord>,
    /// Every idempotency key sent, acknowledged or not.
    pub attempts: BTreeMap<String, Attempt>,
    /// Retryable failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Answers that are neither an ack nor retryable, with context.
    pub hard_errors: Vec<String>,
    /// Keys still unacknowledged when the workload stopped (they may or may not be stored).
    pub abandoned: Vec<String>,
}

impl WriteLog {
    /// Both logs in one (keys are unique across workloads, so nothing collides).
    pub fn merge(mut self, other: WriteLog) -> WriteLog {
        self.acks.extend(other.acks);
        self.attempts.extend(other.attempts);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.hard_errors.extend(other.hard_errors);
        self.abandoned.extend(other.abandoned);
        self
    }

    pub fn attempt(&mut self, key: &str, conversation: &str, content: &Value, writer: &str) {
        self.attempts.insert(
            key.to_owned(),
            Attempt {
                conversation: conversation.to_owned(),
                content: content.clone(),
                writer: writer.to_owned(),
            },
        );
    }

    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }

    /// Records a test's own acknowledged append (an HTTP 201 body or a WebSocket reply
    /// response), sent and answered just now.
    pub fn record_ack(
        &mut self,
        conversation: &str,
        key: &str,
        content: &Value,
        node: usize,
        body: &Value,
    ) -> AckRecord {
        let (seq, id, deduped) =
            ack_fields(body).unwrap_or_else(|| panic!("malformed ack for {key}: {body}"));
        if !self.attempts.contains_key(key) {
            self.attempt(key, conversation, content, "test");
        }
        let now = Instant::now();
        let record = AckRecord {
            conversation: conversation.to_owned(),
            key: key.to_owned(),
            seq,
            id,
            content: content.clone(),
            writer: "test".to_owned(),
            node,
            via: "http",
            deduped,
            first_sent: now,
            sent: now,
            received: now,
        };
        self.acks.push(record.clone());
        record
    }

    /// Errors whose kind contains `needle` (e.g. `owner_unavailable`).
    pub fn error_count(&self, needle: &str) -> u64 {
        self.errors
            .iter()
            .filter(|(k, _)| k.contains(needle))
            .map(|(_, n)| n)
            .sum()
    }
}

/// What one message of a writer is: key, content and the JSON both transports send.
#[derive(Debug, Clone)]
pub struct Msg {
    pub key: String,
    pub content: Value,
    pub sender: String,
}

impl Msg {
    /// Message `i` of writer `writer` in run `run`: key `{run}-{writer}-{i}`, content `{w, i}`.
    pub fn new(run: &str, writer: &str, i: u64) -> Msg {
        Msg {
            key: format!("{run}-{writer}-{i}"),
            content: json!({ "w": writer, "i": i }),
            sender: writer.to_owned(),
        }
    }

    /// The HTTP body and the WebSocket `send` payload (the same fields).
    pub fn body(&self) -> Value {
        json!({
            "sender": self.sender,
            "content": self.content,
            "metadata": { "key": self.key },
            "idempotency_key": self.key,
        })
    }
}

/// A random tag that keeps keys of different workloads in one test apart.
pub fn run_tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// What one attempt came to.
enum Outcome {
    Ack {
        seq: u64,
        id: String,
        deduped: bool,
    },
    /// Try the same key again after the pause.
    Retry {
        kind: String,
        pause: Duration,
    },
    /// Neither an ack nor retryable: recorded, the writer moves on.
    Hard(String),
}

/// State the writer tasks of one workload share.
struct Shared {
    log: Mutex<WriteLog>,
    acked: AtomicU64,
}

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut WriteLog) -> R) -> R {
        f(&mut self.log.lock().expect("write log"))
    }
}

/// A running set of writer tasks (HTTP or WebSocket).
pub struct Writers {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// What every writer task gets.
#[derive(Clone)]
struct WriterCtx {
    label: String,
    run: String,
    node: usize,
    conversations: Vec<String>,
    book: NodeBook,
    spec: WorkloadSpec,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

impl WriterCtx {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `pause` unless the workload stops first; `true` when stopped.
    async fn pause(&mut self, pause: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped(&mut self.stop) => return true,
        }
        self.stopped()
    }

    fn abandon(&self, msg: &Msg) {
        self.shared.with(|l| l.abandoned.push(msg.key.clone()));
    }

    fn ack(
        &self,
        conversation: &str,
        msg: &Msg,
        outcome: (u64, String, bool),
        via: &'static str,
        first_sent: Instant,
        sent: Instant,
    ) {
        let (seq, id, deduped) = outcome;
        let record = AckRecord {
            conversation: conversation.to_owned(),
            key: msg.key.clone(),
            seq,
            id,
            content: msg.content.clone(),
            writer: self.label.clone(),
            node: self.node,
            via,
            deduped,
            first_sent,
            sent,
            received: Instant::now(),
        };
        self.shared.with(|l| l.acks.push(record));
        self.shared.acked.fetch_add(1, Ordering::Relaxed);
    }
}

impl Writers {
    /// `spec.writers_per_node` HTTP writers on every node of `book`.
    pub fn http(book: &NodeBook, conversations: &[Conversation], spec: WorkloadSpec) -> Writers {
        let nodes: Vec<usize> = (1..=book.len()).collect();
        Writers::http_via(book, &nodes, conversations, spec, "h")
    }

    /// `spec.writers_per_node` WebSocket writers (one socket each) on every node of `book`.
    pub fn ws(book: &NodeBook, conversations: &[Conversation], spec: WorkloadSpec) -> Writers {
        let nodes: Vec<usize> = (1..=book.len()).collect();
        Writers::ws_via(book, &nodes, conversations, spec, "w")
    }

    /// HTTP writers on the given nodes only; labels start with `prefix` (keep it unique among
    /// the workloads of a test).
    pub fn http_via(
        book: &NodeBook,
        nodes: &[usize],
        conversations: &[Conversation],
        spec: WorkloadSpec,
        prefix: &str,
    ) -> Writers {
        Writers::start(book, nodes, conversations, spec, prefix, |ctx, tasks| {
            let client = reqwest::Client::builder()
                .timeout(ctx.spec.request_timeout)
                .connect_timeout(ctx.spec.request_timeout)
                .default_headers(super::auth_headers())
                .build()
                .expect("http client");
            tasks.spawn(http_writer(ctx, client));
        })
    }

    /// WebSocket writers on the given nodes only (see [`Writers::http_via`]).
    pub fn ws_via(
        book: &NodeBook,
        nodes: &[usize],
        conversations: &[Conversation],
        spec: WorkloadSpec,
        prefix: &str,
    ) -> Writers {
        Writers::start(book, nodes, conversations, spec, prefix, |ctx, tasks| {
            tasks.spawn(ws_writer(ctx));
        })
    }

    fn start(
        book: &NodeBook,
        nodes: &[usize],
        conversations: &[Conversation],
        spec: WorkloadSpec,
        prefix: &str,
        spawn: impl Fn(WriterCtx, &mut JoinSet<()>),
    ) -> Writers {
        assert!(spec.writers_per_node > 0, "writers_per_node must be > 0");
        let shared = Arc::new(Shared {
            log: Mutex::new(WriteLog::default()),
            acked: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let run = run_tag();
        let total = nodes.len() * spec.writers_per_node;
        for (n, &node) in nodes.iter().enumerate() {
            assert!(
                (1..=book.len()).contains(&node),
                "no node {node} in the book"
            );
            for k in 0..spec.writers_per_node {
                let g = n * spec.writers_per_node + k;
                let mine: Vec<String> = conversations
                    .iter()
                    .enumerate()
                    .filter(|(c, _)| c % total == g)
                    .map(|(_, c)| c.id.clone())
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let ctx = WriterCtx {
                    label: format!("{prefix}{node}-{k}"),
                    run: run.clone(),
                    node,
                    conversations: mine,
                    book: book.clone(),
                    spec: spec.clone(),
                    shared: shared.clone(),
                    stop: stop_rx.clone(),
                };
                spawn(ctx, &mut tasks);
            }
        }
        Writers {
            shared,
            stop,
            tasks,
        }
    }

    /// Acknowledgements so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// A copy of the log so far (the writers keep running).
    pub fn log(&self) -> WriteLog {
        self.shared.with(|l| l.clone())
    }

    /// Acknowledgements so far of the given conversations that arrived after `since`.
    pub fn acked_since(&self, conversations: &[String], since: Instant) -> usize {
        self.shared.with(|l| {
            l.acks
                .iter()
                .filter(|a| a.received > since && conversations.contains(&a.conversation))
                .count()
        })
    }

    /// Stops every writer after its in-flight request and returns the log.
    pub async fn stop(mut self) -> WriteLog {
        self.stop.send_replace(true);
        let joined = tokio::time::timeout(STOP_TIMEOUT, async {
            while let Some(result) = self.tasks.join_next().await {
                if let Err(e) = result {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        })
        .await;
        if joined.is_err() {
            self.tasks.abort_all();
            self.shared.with(|l| {
                l.hard_errors
                    .push(format!("writers did not stop within {STOP_TIMEOUT:?}"))
            });
        }
        self.log()
    }
}

fn try_again_pause(body: &Value) -> Duration {
    body["retry_after_ms"]
        .as_u64()
        .map(Duration::from_millis)
        .unwrap_or(RECONNECT_PAUSE)
        .min(MAX_RETRY_PAUSE)
}

/// `try_again` answers carry the reason in `detail` (HTTP) or `reason`/`detail` (WebSocket).
fn try_again_reason(body: &Value) -> &str {
    body["detail"]
        .as_str()
        .or_else(|| body["reason"].as_str().filter(|r| *r != "try_again"))
        .unwrap_or("-")
}

async fn http_writer(mut ctx: WriterCtx, client: reqwest::Client) {
    let mut pace = tokio::time::interval(ctx.spec.interval);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for i in 0u64.. {
        tokio::select! {
            _ = pace.tick() => {}
            _ = stopped(&mut ctx.stop) => return,
        }
        let conversation = ctx.conversations[i as usize % ctx.conversations.len()].clone();
        let msg = Msg::new(&ctx.run, &ctx.label, i);
        ctx.shared
            .with(|l| l.attempt(&msg.key, &conversation, &msg.content, &ctx.label));
        let first_sent = Instant::now();
        loop {
            if ctx.stopped() {
                ctx.abandon(&msg);
                return;
            }
            let sent = Instant::now();
            let outcome = match ctx.book.listen(ctx.node) {
                None => Outcome::Retry {
                    kind: "http node_down".to_owned(),
                    pause: RECONNECT_PAUSE,
                },
                Some(addr) => http_attempt(&client, addr, &conversation, &msg).await,
            };
            match outcome {
                Outcome::Ack { seq, id, deduped } => {
                    ctx.ack(
                        &conversation,
                        &msg,
                        (seq, id, deduped),
                        "http",
                        first_sent,
                        sent,
                    );
                    break;
                }
                Outcome::Retry { kind, pause } => {
                    ctx.shared.with(|l| l.error(&kind));
                    if ctx.pause(pause).await {
                        ctx.abandon(&msg);
                        return;
                    }
                }
                Outcome::Hard(what) => {
                    let what = format!(
                        "{} via n{} appending {} to {conversation}: {what}",
                        ctx.label, ctx.node, msg.key
                    );
                    ctx.shared.with(|l| l.hard_errors.push(what));
                    break;
                }
            }
        }
    }
}

async fn http_attempt(
    client: &reqwest::Client,
    addr: SocketAddr,
    conversation: &str,
    msg: &Msg,
) -> Outcome {
    let url = format!("http://{addr}/v1/conversations/{conversation}/messages");
    let transport = |e: reqwest::Error| {
        let kind = if e.is_timeout() {
            "http timeout"
        } else if e.is_connect() {
            "http connect"
        } else {
            "http transport"
        };
        Outcome::Retry {
            kind: kind.to_owned(),
            pause: RECONNECT_PAUSE,
        }
    };
    let resp = match client.post(url).json(&msg.body()).send().await {
        Ok(resp) => resp,
        Err(e) => return transport(e),
    };
    let status = resp.status().as_u16();
    let text = match resp.text().await {
        Ok(text) => text,
        Err(e) => return transport(e),
    };
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match status {
        201 => match ack_fields(&body) {
            Some((seq, id, deduped)) => Outcome::Ack { seq, id, deduped },
            None => Outcome::Hard(format!("201 with a malformed ack: {text}")),
        },
        429 | 503 => Outcome::Retry {
            kind: format!(
                "http {status} {}/{}",
                body["error"].as_str().unwrap_or("-"),
                try_again_reason(&body)
            ),
            pause: try_again_pause(&body),
        },
        _ => Outcome::Hard(format!("{status} {text}")),
    }
}

/// `(seq, id, deduped)` of an ack body (HTTP 201 body or WebSocket reply response).
fn ack_fields(body: &Value) -> Option<(u64, String, bool)> {
    Some((
        body["seq"].as_u64()?,
        body["id"].as_str()?.to_owned(),
        body["deduped"].as_bool().unwrap_or(false),
    ))
}

/// A writer's socket and the topics joined on it (topic → join_ref).
struct WsConn {
    sock: PhxSocket,
    joined: HashMap<String, String>,
    last_heartbeat: Instant,
}

/// How waiting for a reply on a writer socket ended.
enum Wait {
    Reply(Frame),
    /// The topic was errored or closed by the server: rejoin, then retry the same key.
    TopicLost,
    /// The socket failed or the reply did not come in time: reconnect, then retry.
    SocketLost(String),
}

impl WsConn {
    /// Reads until the `phx_reply` to `ref_` on `topic`; drops topics the server errors or
    /// closes; notes the highest seq pushed per conversation (for rejoins).
    async fn wait_reply(
        &mut self,
        ref_: &str,
        topic: &str,
        timeout: Duration,
        seen: &mut HashMap<String, u64>,
    ) -> Wait {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.sock.recv()).await {
                Err(_) => return Wait::SocketLost("ws timeout".to_owned()),
                Ok(Err(_)) => return Wait::SocketLost("ws lost".to_owned()),
                Ok(Ok(frame)) => frame,
            };
            match frame.event.as_str() {
                "phx_reply" if frame.ref_.as_deref() == Some(ref_) && frame.topic == topic => {
                    return Wait::Reply(frame)
                }
                "message" => {
                    if let Some(seq) = frame.payload["seq"].as_u64() {
                        let top = seen.entry(frame.topic.clone()).or_default();
                        *top = (*top).max(seq);
                    }
                }
                "phx_error" | "phx_close" => {
                    let current = self.joined.get(&frame.topic);
                    if current.is_some() && current == frame.join_ref.as_ref() {
                        self.joined.remove(&frame.topic);
                        if frame.topic == topic {
                            return Wait::TopicLost;
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

async fn ws_writer(mut ctx: WriterCtx) {
    let mut pace = tokio::time::interval(ctx.spec.interval);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<WsConn> = None;
    // Highest seq seen per topic: a rejoin asks only for what came after it.
    let mut seen: HashMap<String, u64> = HashMap::new();
    for i in 0u64.. {
        tokio::select! {
            _ = pace.tick() => {}
            _ = stopped(&mut ctx.stop) => return,
        }
        let conversation = ctx.conversations[i as usize % ctx.conversations.len()].clone();
        let topic = format!("conversation:{conversation}");
        let msg = Msg::new(&ctx.run, &ctx.label, i);
        ctx.shared
            .with(|l| l.attempt(&msg.key, &conversation, &msg.content, &ctx.label));
        let first_sent = Instant::now();
        loop {
            if ctx.stopped() {
                ctx.abandon(&msg);
                return;
            }
            let sent = Instant::now();
            let outcome = ws_attempt(&ctx, &mut conn, &topic, &msg, &mut seen).await;
            match outcome {
                Outcome::Ack { seq, id, deduped } => {
                    let top = seen.entry(topic.clone()).or_default();
                    *top = (*top).max(seq);
                    ctx.ack(
                        &conversation,
                        &msg,
                        (seq, id, deduped),
                        "ws",
                        first_sent,
                        sent,
                    );
                    break;
                }
                Outcome::Retry { kind, pause } => {
                    ctx.shared.with(|l| l.error(&kind));
                    if ctx.pause(pause).await {
                        ctx.abandon(&msg);
                        return;
                    }
                }
                Outcome::Hard(what) => {
                    let what = format!(
                        "{} via n{} sending {} to {conversation}: {what}",
                        ctx.label, ctx.node, msg.key
                    );
                    ctx.shared.with(|l| l.hard_errors.push(what));
                    break;
                }
            }
        }
    }
}

/// One try of `msg` on `topic`: (re)connect and (re)join as needed, send, wait for the reply.
async fn ws_attempt(
    ctx: &WriterCtx,
    conn: &mut Option<WsConn>,
    topic: &str,
    msg: &Msg,
    seen: &mut HashMap<String, u64>,
) -> Outcome {
    let retry = |kind: &str| Outcome::Retry {
        kind: kind.to_owned(),
        pause: RECONNECT_PAUSE,
    };
    if conn.is_none() {
        let Some(addr) = ctx.book.listen(ctx.node) else {
            return retry("ws node_down");
        };
        match PhxSocket::connect(addr, API_KEY).await {
            Ok(sock) => {
                *conn = Some(WsConn {
                    sock,
                    joined: HashMap::new(),
                    last_heartbeat: Instant::now(),
                })
            }
            Err(_) => return retry("ws connect"),
        }
    }
    let c = conn.as_mut().expect("connected above");
    let timeout = ctx.spec.request_timeout;

    if c.last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
        if c.sock.heartbeat().await.is_err() {
            *conn = None;
            return retry("ws lost");
        }
        c.last_heartbeat = Instant::now();
    }

    if !c.joined.contains_key(topic) {
        let after_seq = seen.get(topic).copied().unwrap_or(0);
        let join_ref = match c.sock.join(topic, json!({ "after_seq": after_seq })).await {
            Ok(r) => r,
            Err(_) => {
                *conn = None;
                return retry("ws lost");
            }
        };
        let reply = match c.wait_reply(&join_ref, topic, timeout, seen).await {
            Wait::Reply(frame) => frame,
            Wait::TopicLost => return retry("ws join closed"),
            Wait::SocketLost(kind) => {
                *conn = None;
                return retry(&kind);
            }
        };
        match reply.status() {
            Some("ok") => {
                c.joined.insert(topic.to_owned(), join_ref);
            }
            _ => return ws_error(reply.response(), "join"),
        }
    }

    let join_ref = c.joined[topic].clone();
    let ref_ = c.sock.make_ref();
    if c.sock
        .send(Some(&join_ref), &ref_, topic, "send", msg.body())
        .await
        .is_err()
    {
        *conn = None;
        return retry("ws lost");
    }
    match c.wait_reply(&ref_, topic, timeout, seen).await {
        Wait::Reply(frame) => match frame.status() {
            Some("ok") => match ack_fields(frame.response()) {
                Some((seq, id, deduped)) => Outcome::Ack { seq, id, deduped },
                None => Outcome::Hard(format!(
                    "ok reply with a malformed ack: {:?}",
                    frame.payload
                )),
            },
            _ => ws_error(frame.response(), "send"),
        },
        Wait::TopicLost => retry("ws phx_error"),
        Wait::SocketLost(kind) => {
            *conn = None;
            retry(&kind)
        }
    }
}

/// An error reply: `try_again` is retried after its `retry_after_ms`, anything else is hard.
fn ws_error(response: &Value, what: &str) -> Outcome {
    match response["reason"].as_str() {
        Some("try_again") => Outcome::Retry {
            kind: format!("ws {what} try_again/{}", try_again_reason(response)),
            pause: try_again_pause(response),
        },
        _ => Outcome::Hard(format!("{what} refused: {response}")),
    }
}
