//! A `cluster` writer: one WebSocket, on one node at a time, joined before the clock starts to
//! the conversations it writes (conversation `c` belongs to writer `c % writers`). Every append
//! carries an idempotency key, `<run>-<send index>`; an answer `try_again` sends it again, with
//! the same key, after the answer's `retry_after_ms`, so a send ends acknowledged or failed, never
//! half-known. Its latency runs from the first attempt's scheduled time to the final ack.
//!
//! Sends are pipelined: the frame's ref is the attempt's place in the writer's send order, which
//! is also what [`Ack::sent_order`] reports to the checker (a socket's sends to one conversation
//! must take seqs in the order they left). An acknowledged send *hit a moving slot* when a
//! `try_again` `slot_moving` came back for it, when a `backpressure` push for its conversation
//! arrived while it was in flight or within that push's `retry_after_ms` before it left, or when
//! its ack took longer than the servers' move hold.
//!
//! # A lost socket
//! A node that shuts down (a rolling restart) closes its sockets with 1001 (going away). The
//! writer then opens a socket on the next node (round robin over the targets, a short pause after
//! each refusal, for at most [`Settings::reconnect_timeout`]), joins its conversations again
//! after the last seq acknowledged to it in each (every message of its conversations is its own,
//! so nothing is replayed), and sends again every send that was in flight and unanswered, in the
//! order they were first sent and under the same keys: Ferry answers a key it already stored
//! with the original seq (`deduped`), so whatever the old node did with them, each send ends
//! stored once. Sends waiting for a `try_again` retry keep their time. A re-sent send's latency
//! still runs from its first scheduled time: the client waited that long.
//!
//! A socket that ends without the 1001 (a dropped or reset connection, another close code, a
//! `phx_error` on a topic) is rejoined the same way, and judged by its node: one that refuses a
//! new socket is shutting down (a node that closes a socket it has not read to the end resets
//! it, and the reset can destroy the 1001 frame before it is read), so the loss counts as going
//! away; one that takes it is up, and the loss counts as *cut*, which fails the run (a node that
//! stays up, through slot moves too, must not cut sockets).
//!
//! The writer stops once its queue is closed and every send is answered, when no node takes its
//! socket back in time (everything unanswered fails), or at the drain deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::append::{Job, Payload};
use crate::ferry::{keyed_append_body, Closed, Frame, PhxSocket, ReplyView, Text};
use crate::gapcheck::Ack;
use crate::progress::Live;
use crate::stats::Recorder;
use crate::LoadError;

/// A send refused this many times in a row fails (each wait is the server's `retry_after_ms`).
const MAX_ATTEMPTS: u32 = 200;
/// Wait before a retry when a `try_again` names no `retry_after_ms`, and the most any retry
/// waits (a server asking for longer is still retried after this).
const DEFAULT_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Distinct `try_again` details counted by name; any beyond are counted as `other`.
const MAX_DETAILS: usize = 32;
/// After a node refused a reconnect, wait this long before asking the next.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a socket whose write failed is still read for its last frames (replies that arrived
/// before the failure, and the close frame that says why).
const SALVAGE_WAIT: Duration = Duration::from_millis(200);
/// How long a node whose socket ended without a 1001 has to take a new one before it counts as
/// going away (see [`judge`]).
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// Socket losses kept verbatim per writer for the report; the rest are only counted.
const MAX_LOSS_SAMPLES: usize = 8;

/// How a writer runs, beyond its conversations.
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat: Duration,
    pub payload: Payload,
    /// The run id: idempotency keys are `<run>-<send index>`.
    pub run: String,
    /// The servers' `cluster.move_hold`: a slower ack counts as one that hit a moving slot.
    pub move_hold: Duration,
    /// After the queue closes, how long unanswered sends may still take.
    pub drain: Duration,
    /// How long a lost socket may take to come back, on any node, before its sends fail.
    pub reconnect_timeout: Duration,
}

/// One joined conversation.
struct Topic {
    join_ref: String,
    name: String,
    /// Until when a `backpressure` push says the conversation's slot is moving.
    moving_until: Option<Instant>,
}

/// A send between its first attempt and its final answer.
struct Send {
    job: Job,
    /// `try_again` answers so far.
    attempts: u32,
    /// A `try_again` `slot_moving` came back for it.
    slot_moving: bool,
    /// A `backpressure` push for its conversation came while it was in flight, or just before.
    backpressure: bool,
}

impl Send {
    fn new(job: Job) -> Send {
        Send {
            job,
            attempts: 0,
            slot_moving: false,
            backpressure: false,
        }
    }
}

/// One attempt of a send, ready to write.
struct SendFrame {
    conv: usize,
    /// Its ref: the attempt's place in the send order.
    order: u64,
    body: String,
}

/// Why an attempt of a send is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    /// After a `try_again`.
    Retry,
    /// On a new socket, the old one having gone before the answer.
    Resend,
}

/// What one writer measured and was promised.
pub struct WriterOutcome {
    /// Every answer: acks (latency from the first scheduled time), `try_again`s, failures.
    pub acks: Recorder,
    /// The acks of sends that hit a moving slot.
    pub moving: Recorder,
    /// `(conversation, ack)` for every acknowledged send.
    pub acked: Vec<(usize, Ack)>,
    pub try_again_by_detail: BTreeMap<String, u64>,
    pub retries: u64,
    pub deduped: u64,
    pub backpressure: u64,
    /// Sockets lost and opened again on another node.
    pub reconnects: u64,
    /// Socket lost → joined again on another node with every unanswered send re-sent.
    pub reconnect: Recorder,
    /// Losses the server announced with 1001 (going away).
    pub going_away: u64,
    /// Losses of any other kind (they fail the run).
    pub cut: u64,
    /// Sends made again, same key, on a new socket.
    pub resent: u64,
    /// The first losses, `"<t>s <node URL>: <why>"`.
    pub losses: Vec<String>,
}

/// `phx_reply` payload of a `send`.
#[derive(Deserialize)]
struct SendReply {
    status: String,
    #[serde(default)]
    response: SendResponse,
}

#[derive(Deserialize, Default)]
struct SendResponse {
    seq: Option<u64>,
    #[serde(default)]
    deduped: bool,
    reason: Option<String>,
    detail: Option<String>,
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
struct BackpressurePush {
    retry_after_ms: Option<u64>,
}

pub struct Writer {
    socket: PhxSocket,
    /// Socket URLs of the nodes: its own first, then the ones to fall back to, round robin.
    ws_urls: Vec<String>,
    /// The node (index into `ws_urls`) the socket is on.
    at: usize,
    /// conversation index -> its topic.
    topics: HashMap<usize, Topic>,
    /// topic name -> conversation index, for pushes.
    by_topic: HashMap<String, usize>,
    settings: Settings,
}

/// The writer's bookkeeping while it runs, apart from its socket: what is in flight, what waits
/// for a retry, what was promised. IO-free, so the tests drive it directly.
struct State {
    /// In flight, by ref (the attempt's place in the send order).
    pending: HashMap<u64, Send>,
    /// Refused with `try_again`, by when to send again (ties broken by the old ref).
    retries: BTreeMap<(Instant, u64), Send>,
    next_order: u64,
    /// conversation -> the highest seq acknowledged to this writer: where a rejoin resumes.
    acked_seq: HashMap<usize, u64>,
    run: String,
    payload: Payload,
    move_hold: Duration,
    out: WriterOutcome,
    start: Instant,
    live: Arc<Live>,
}

impl State {
    fn new(settings: &Settings, start: Instant, live: Arc<Live>, seconds: f64) -> State {
        State {
            pending: HashMap::new(),
            retries: BTreeMap::new(),
            next_order: 0,
            acked_seq: HashMap::new(),
            run: settings.run.clone(),
            payload: settings.payload.clone(),
            move_hold: settings.move_hold,
            out: WriterOutcome {
                acks: Recorder::for_run(seconds),
                moving: Recorder::new(),
                acked: Vec::new(),
                try_again_by_detail: BTreeMap::new(),
                retries: 0,
                deduped: 0,
                backpressure: 0,
                reconnects: 0,
                reconnect: Recorder::new(),
                going_away: 0,
                cut: 0,
                resent: 0,
                losses: Vec::new(),
            },
            start,
            live,
        }
    }

    fn fail(&mut self, send: Send, why: impl Into<String>) {
        Live::bump(&self.live.errors);
        let at = Instant::now().saturating_duration_since(self.start);
        self.out.acks.record_error(at, why);
        // Dropping the send returns its permit.
        drop(send);
    }

    /// Makes `send` the next attempt in the send order: puts it in flight and returns its ref
    /// and the `send` payload, whose idempotency key is the same on every attempt.
    fn attempt(&mut self, send: Send, why: Attempt) -> (u64, String) {
        match why {
            Attempt::First => {}
            Attempt::Retry => self.out.retries += 1,
            Attempt::Resend => self.out.resent += 1,
        }
        let order = self.next_order;
        self.next_order += 1;
        let key = format!("{}-{}", self.run, send.job.index);
        let body = keyed_append_body(&self.payload.content(send.job.index), &key);
        self.pending.insert(order, send);
        (order, body)
    }

    /// Every send in flight, taken out, in the order its attempt left: what a new socket sends
    /// again. Sends waiting for a retry stay where they are.
    fn take_unanswered(&mut self) -> Vec<Send> {
        let mut unanswered: Vec<(u64, Send)> = self.pending.drain().collect();
        unanswered.sort_unstable_by_key(|(order, _)| *order);
        unanswered.into_iter().map(|(_, send)| send).collect()
    }

    /// The reply to attempt `order`: an ack, a `try_again` (sent again later), or a failure. A
    /// reply to no attempt in flight (a heartbeat's) is ignored.
    fn answered(&mut self, order: u64, payload: &str) {
        let Some(mut send) = self.pending.remove(&order) else {
            return;
        };
        let reply = match serde_json::from_str::<SendReply>(payload) {
            Ok(r) => r,
            Err(e) => return self.fail(send, format!("send: bad reply ({e}): {payload}")),
        };
        let now = Instant::now();
        let at = now.saturating_duration_since(self.start);
        let r = reply.response;
        if reply.status == "ok" {
            let Some(seq) = r.seq else {
                return self.fail(send, format!("send: ack without seq: {payload}"));
            };
            let latency = now.saturating_duration_since(send.job.scheduled);
            Live::bump(&self.live.ok);
            self.out.acks.record_ok(at, latency);
            if send.slot_moving || send.backpressure || latency > self.move_hold {
                self.out.moving.record_ok(at, latency);
            }
            if r.deduped {
                self.out.deduped += 1;
            }
            let acked = self.acked_seq.entry(send.job.conv).or_default();
            *acked = (*acked).max(seq);
            self.out.acked.push((
                send.job.conv,
                Ack {
                    index: send.job.index,
                    seq,
                    sent_order: order,
                    deduped: r.deduped,
                },
            ));
            return;
        }
        if r.reason.as_deref() != Some("try_again") {
            return self.fail(send, format!("send: {payload}"));
        }
        Live::bump(&self.live.try_again);
        self.out.acks.record_try_again(at);
        let detail = r.detail.unwrap_or_else(|| "none".to_owned());
        let counted = if self.out.try_again_by_detail.len() < MAX_DETAILS
            || self.out.try_again_by_detail.contains_key(&detail)
        {
            detail.clone()
        } else {
            "other".to_owned()
        };
        *self.out.try_again_by_detail.entry(counted).or_default() += 1;
        if detail == "slot_moving" {
            send.slot_moving = true;
        }
        send.attempts += 1;
        if send.attempts >= MAX_ATTEMPTS {
            return self.fail(
                send,
                format!("send: still try_again ({detail}) after {MAX_ATTEMPTS} attempts"),
            );
        }
        let wait = r
            .retry_after_ms
            .map_or(DEFAULT_RETRY, Duration::from_millis)
            .min(MAX_RETRY);
        self.retries.insert((now + wait, order), send);
    }

    /// Counts a lost socket and keeps the first few for the report.
    fn lost(&mut self, node: &str, closed: &Closed) {
        if closed.going_away {
            self.out.going_away += 1;
        } else {
            self.out.cut += 1;
        }
        if self.out.losses.len() < MAX_LOSS_SAMPLES {
            let at = self.start.elapsed().as_secs_f64();
            let kind = if closed.going_away {
                "going away"
            } else {
                "cut"
            };
            self.out
                .losses
                .push(format!("{at:.2}s {node} {kind}: {closed}"));
        }
    }
}

/// Opens a socket on `url` and joins every topic with `after_seq` = the highest seq acknowledged
/// in it so far (0 before the first).
async fn open(
    url: &str,
    heartbeat: Duration,
    topics: &HashMap<usize, Topic>,
    acked_seq: &HashMap<usize, u64>,
) -> Result<PhxSocket, LoadError> {
    let mut socket = PhxSocket::connect(url, heartbeat).await?;
    let mut convs: Vec<&usize> = topics.keys().collect();
    convs.sort_unstable();
    for c in convs {
        let topic = &topics[c];
        let after = acked_seq.get(c).copied().unwrap_or(0);
        socket
            .join(
                &topic.join_ref,
                &topic.name,
                &format!(r#"{{"after_seq":{after}}}"#),
            )
            .await?;
    }
    Ok(socket)
}

/// A socket that ended without a 1001: asks its node (`url`) for a new one. A node that refuses
/// (or does not answer within [`PROBE_WAIT`]) is shutting down, and the loss counts as going
/// away: a node that closes a socket it has not read to the end resets it, and the reset can
/// destroy the 1001 frame before the client reads it. A node that takes the new socket is up, and
/// the loss was a cut.
async fn judge(url: &str, heartbeat: Duration, closed: Closed) -> Closed {
    match tokio::time::timeout(PROBE_WAIT, PhxSocket::connect(url, heartbeat)).await {
        // Dropped unused: the node only had to take it.
        Ok(Ok(_socket)) => closed,
        Ok(Err(e)) => Closed {
            why: format!("{closed}; the node refuses new sockets ({e})"),
            going_away: true,
        },
        Err(_) => Closed {
            why: format!("{closed}; the node takes no new socket within {PROBE_WAIT:?}"),
            going_away: true,
        },
    }
}

impl Writer {
    /// Connects to the first of `ws_urls` and joins `conversations` (`(index, id)`), before the
    /// clock starts.
    pub async fn connect(
        ws_urls: Vec<String>,
        conversations: Vec<(usize, String)>,
        settings: Settings,
    ) -> Result<Writer, LoadError> {
        if ws_urls.is_empty() {
            return Err(LoadError::Args("a writer needs a target".into()));
        }
        let mut topics = HashMap::new();
        let mut by_topic = HashMap::new();
        for (c, id) in conversations {
            let name = format!("conversation:{id}");
            by_topic.insert(name.clone(), c);
            topics.insert(
                c,
                Topic {
                    join_ref: format!("j{c}"),
                    name,
                    moving_until: None,
                },
            );
        }
        // Fresh conversations: nothing to replay.
        let socket = open(&ws_urls[0], settings.heartbeat, &topics, &HashMap::new()).await?;
        Ok(Writer {
            socket,
            ws_urls,
            at: 0,
            topics,
            by_topic,
            settings,
        })
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Job>,
        start: Instant,
        live: Arc<Live>,
        seconds: f64,
    ) -> WriterOutcome {
        let mut st = State::new(&self.settings, start, live, seconds);
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let retry_timer = tokio::time::sleep_until(far);
        tokio::pin!(retry_timer);
        let drain_deadline = tokio::time::sleep_until(far);
        tokio::pin!(drain_deadline);
        let mut open = true;
        let mut broken: Option<String> = None;
        while open || !st.pending.is_empty() || !st.retries.is_empty() {
            let mut lost: Option<Closed> = None;
            tokio::select! {
                job = rx.recv(), if open => match job {
                    Some(job) => {
                        // Every send already due goes out in one write; none waits for another.
                        let mut next = Some(job);
                        while let Some(job) = next.take() {
                            if let Err(e) = self.feed(&mut st, Send::new(job), Attempt::First).await {
                                lost = Some(e);
                                break;
                            }
                            next = rx.try_recv().ok();
                        }
                        if lost.is_none() {
                            lost = self.flush(&mut st).await.err();
                        }
                    }
                    None => {
                        open = false;
                        drain_deadline.as_mut().reset(Instant::now() + self.settings.drain);
                    }
                },
                incoming = self.socket.next_text() => match incoming {
                    Ok(Text::Frame(text)) => lost = self.handle(&mut st, text.as_str()).err(),
                    Ok(Text::Closed(closed)) => lost = Some(closed),
                    Err(e) => lost = Some(Closed::dropped(format!("writer socket failed: {e}"))),
                },
                _ = &mut retry_timer, if !st.retries.is_empty() => {
                    let now = Instant::now();
                    while let Some(entry) = st.retries.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let send = entry.remove();
                        if let Err(e) = self.feed(&mut st, send, Attempt::Retry).await {
                            lost = Some(e);
                            break;
                        }
                    }
                    if lost.is_none() {
                        lost = self.flush(&mut st).await.err();
                    }
                },
                _ = &mut drain_deadline, if !open => {
                    broken = Some(format!(
                        "no answer within the drain timeout ({:?})",
                        self.settings.drain
                    ));
                }
            }
            if let Some(closed) = lost {
                if let Err(e) = self.reconnect(&mut st, closed).await {
                    broken = Some(e);
                }
            }
            if broken.is_some() {
                break;
            }
            let next_retry = st.retries.keys().next().map_or(far, |(at, _)| *at);
            if retry_timer.deadline() != next_retry {
                retry_timer.as_mut().reset(next_retry);
            }
        }
        // Whatever is unanswered, waiting for a retry, or still queued for a dead socket failed.
        let why = broken.unwrap_or_default();
        let unanswered: Vec<Send> = st
            .take_unanswered()
            .into_iter()
            .chain(std::mem::take(&mut st.retries).into_values())
            .collect();
        for send in unanswered {
            st.fail(send, why.clone());
        }
        rx.close();
        while let Some(job) = rx.recv().await {
            st.fail(Send::new(job), why.clone());
        }
        self.socket.close().await;
        st.out
    }

    /// Writes one attempt of `send` into the socket's buffer (the caller flushes). `Err` only
    /// when the socket failed; the send is then in flight and goes again on the next socket.
    async fn feed(&mut self, st: &mut State, send: Send, why: Attempt) -> Result<(), Closed> {
        match self.prepare(st, send, why) {
            Some(frame) => self.write(st, frame).await,
            None => Ok(()),
        }
    }

    /// Puts one attempt of `send` in flight and returns its frame (`None`: the send failed).
    fn prepare(&self, st: &mut State, mut send: Send, why: Attempt) -> Option<SendFrame> {
        let Some(topic) = self.topics.get(&send.job.conv) else {
            let why = format!("conversation {} not joined", send.job.conv);
            st.fail(send, why);
            return None;
        };
        if topic.moving_until.is_some_and(|t| Instant::now() < t) {
            send.backpressure = true;
        }
        let conv = send.job.conv;
        let (order, body) = st.attempt(send, why);
        Some(SendFrame { conv, order, body })
    }

    /// Writes one prepared frame into the socket's buffer; on failure, says how the socket ended.
    async fn write(&mut self, st: &mut State, frame: SendFrame) -> Result<(), Closed> {
        let topic = &self.topics[&frame.conv];
        let written = self
            .socket
            .feed_frame(
                Some(&topic.join_ref),
                &frame.order.to_string(),
                &topic.name,
                "send",
                &frame.body,
            )
            .await;
        match written {
            Ok(()) => Ok(()),
            Err(e) => Err(self.salvage(st, format!("writer socket failed: {e}")).await),
        }
    }

    /// Writes what [`Writer::feed`] buffered.
    async fn flush(&mut self, st: &mut State) -> Result<(), Closed> {
        match self.socket.flush().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.salvage(st, format!("writer socket failed: {e}")).await),
        }
    }

    /// A write failed: reads what the socket still holds (replies that came before, and the
    /// close frame that says whether the node is going away), briefly, and says how it ended.
    async fn salvage(&mut self, st: &mut State, failed: String) -> Closed {
        let deadline = Instant::now() + SALVAGE_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next_text()).await {
                Ok(Ok(Text::Frame(text))) => {
                    if let Err(closed) = self.handle(st, text.as_str()) {
                        return closed;
                    }
                }
                Ok(Ok(Text::Closed(closed))) if closed.going_away => return closed,
                Ok(Ok(Text::Closed(closed))) => {
                    return Closed::dropped(format!("{failed} ({closed})"))
                }
                Ok(Err(_)) | Err(_) => return Closed::dropped(failed),
            }
        }
    }

    /// One frame from the socket. `Err` when the socket cannot go on.
    fn handle(&mut self, st: &mut State, text: &str) -> Result<(), Closed> {
        // Our own messages pushed back to us are most of the traffic: skip them unread.
        if ReplyView::parse(text).is_some_and(|v| v.event() == "message") {
            return Ok(());
        }
        let frame =
            Frame::parse(text).map_err(|e| Closed::dropped(format!("writer socket: {e}")))?;
        match frame.event.as_str() {
            "phx_reply" => {
                // Heartbeat replies carry `r<n>` refs; sends carry their order.
                if let Some(order) = frame.reference.as_deref().and_then(|r| r.parse().ok()) {
                    st.answered(order, frame.payload.get());
                }
            }
            "backpressure" => {
                let Some(&conv) = self.by_topic.get(&frame.topic) else {
                    return Ok(());
                };
                st.out.backpressure += 1;
                let wait = serde_json::from_str::<BackpressurePush>(frame.payload.get())
                    .ok()
                    .and_then(|p| p.retry_after_ms)
                    .map_or(DEFAULT_RETRY, Duration::from_millis)
                    .min(MAX_RETRY);
                if let Some(topic) = self.topics.get_mut(&conv) {
                    topic.moving_until = Some(Instant::now() + wait);
                }
                for send in st.pending.values_mut().filter(|s| s.job.conv == conv) {
                    send.backpressure = true;
                }
            }
            "phx_error" | "phx_close" if self.by_topic.contains_key(&frame.topic) => {
                return Err(Closed::dropped(format!(
                    "{} on {}",
                    frame.event, frame.topic
                )));
            }
            _ => {}
        }
        Ok(())
    }

    /// The socket is gone: opens one on the next node (round robin), joins again and re-sends
    /// everything unanswered, for at most the reconnect timeout. `Err` when no node took it.
    async fn reconnect(&mut self, st: &mut State, closed: Closed) -> Result<(), String> {
        let closed = if closed.going_away {
            closed
        } else {
            judge(&self.ws_urls[self.at], self.settings.heartbeat, closed).await
        };
        st.lost(&self.ws_urls[self.at], &closed);
        let began = Instant::now();
        let deadline = began + self.settings.reconnect_timeout;
        loop {
            self.at = (self.at + 1) % self.ws_urls.len();
            let error = match tokio::time::timeout_at(deadline, self.rejoin(st)).await {
                Ok(Ok(())) => {
                    st.out.reconnects += 1;
                    st.out
                        .reconnect
                        .record_ok(began.saturating_duration_since(st.start), began.elapsed());
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_owned(),
            };
            st.out
                .reconnect
                .record_error(Instant::now().saturating_duration_since(st.start), &error);
            if Instant::now() >= deadline {
                return Err(format!(
                    "writer socket lost ({closed}) and no node took it back within {:?} (last: {error})",
                    self.settings.reconnect_timeout
                ));
            }
            tokio::time::sleep(RECONNECT_BACKOFF.min(deadline - Instant::now())).await;
        }
    }

    /// Opens a socket on node `at`, joins every topic where its acks left off, and sends again
    /// every unanswered send, in the order they left, under their keys. A failure leaves them all
    /// in flight, still in that order, for the next attempt.
    async fn rejoin(&mut self, st: &mut State) -> Result<(), String> {
        let socket = open(
            &self.ws_urls[self.at],
            self.settings.heartbeat,
            &self.topics,
            &st.acked_seq,
        )
        .await
        .map_err(|e| format!("{}: {e}", self.ws_urls[self.at]))?;
        // The old socket is gone already: dropped without a close handshake.
        drop(std::mem::replace(&mut self.socket, socket));
        // Every attempt is in flight, in order, before the first write, so a write that fails
        // leaves none of them behind.
        let frames: Vec<SendFrame> = st
            .take_unanswered()
            .into_iter()
            .filter_map(|send| self.prepare(st, send, Attempt::Resend))
            .collect();
        for frame in frames {
            self.write(st, frame).await.map_err(|c| c.why)?;
        }
        self.flush(st).await.map_err(|c| c.why)
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;

    fn state() -> State {
        let settings = Settings {
            heartbeat: Duration::from_secs(30),
            payload: Payload::new(40),
            run: "run".to_owned(),
            move_hold: Duration::from_secs(2),
            drain: Duration::from_secs(1),
            reconnect_timeout: Duration::from_secs(1),
        };
        State::new(&settings, Instant::now(), Arc::new(Live::default()), 1.0)
    }

    fn send(permits: &Arc<Semaphore>, index: u64, conv: usize) -> Send {
        Send::new(Job {
            index,
            conv,
            scheduled: Instant::now(),
            permit: permits.clone().try_acquire_owned().expect("a permit"),
        })
    }

    fn ok(seq: u64, deduped: bool) -> String {
        format!(
            r#"{{"status":"ok","response":{{"seq":{seq},"id":"x","created_at":"t","deduped":{deduped}}}}}"#
        )
    }

    fn key_of(body: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(body).expect("a send body");
        v["idempotency_key"].as_str().expect("a key").to_owned()
    }

    #[tokio::test]
    async fn a_new_socket_gets_every_unanswered_send_again_in_order_under_its_key() {
        let permits = Arc::new(Semaphore::new(16));
        let mut st = state();
        // Sends 10..15 leave in that order, to conversations 0 and 1 in turn.
        let first: Vec<(u64, String)> = (10..15)
            .map(|i| st.attempt(send(&permits, i, (i % 2) as usize), Attempt::First))
            .collect();
        let orders: Vec<u64> = first.iter().map(|(o, _)| *o).collect();
        assert_eq!(orders, [0, 1, 2, 3, 4]);
        // 11 and 13 are acknowledged, 14 is refused and waits for a retry; 10 and 12 are
        // unanswered when the socket goes.
        st.answered(1, &ok(1, false));
        st.answered(3, &ok(2, false));
        st.answered(
            4,
            r#"{"status":"error","response":{"reason":"try_again","detail":"slot_moving","retry_after_ms":50}}"#,
        );
        assert_eq!(st.retries.len(), 1);

        let again = st.take_unanswered();
        let indexes: Vec<u64> = again.iter().map(|s| s.job.index).collect();
        assert_eq!(
            indexes,
            [10, 12],
            "only the unanswered, in the order they left"
        );
        assert!(st.pending.is_empty());
        let resent: Vec<(u64, String)> = again
            .into_iter()
            .map(|s| st.attempt(s, Attempt::Resend))
            .collect();
        // New refs after every earlier one, in the same order; the same key and content.
        assert_eq!(resent[0].0, 5);
        assert_eq!(resent[1].0, 6);
        assert_eq!(resent[0].1, first[0].1);
        assert_eq!(resent[1].1, first[2].1);
        assert_eq!(
            (key_of(&resent[0].1), key_of(&resent[1].1)),
            ("run-10".to_owned(), "run-12".to_owned())
        );
        assert_eq!((st.out.resent, st.out.retries), (2, 0));
        // The retry keeps its place in the retry queue, not among the re-sent.
        assert_eq!(st.retries.values().next().map(|s| s.job.index), Some(14));

        // A late reply to an attempt of the old socket matches nothing.
        st.answered(0, &ok(9, false));
        assert_eq!(st.out.acked.len(), 2);
        // The old node had stored 10 (the reply was lost): the new socket gets its seq back.
        st.answered(5, &ok(3, true));
        st.answered(6, &ok(4, false));
        let acked: Vec<(usize, u64, u64, u64, bool)> = st
            .out
            .acked
            .iter()
            .map(|(c, a)| (*c, a.index, a.seq, a.sent_order, a.deduped))
            .collect();
        assert_eq!(
            acked,
            [
                (1, 11, 1, 1, false),
                (1, 13, 2, 3, false),
                (0, 10, 3, 5, true),
                (0, 12, 4, 6, false)
            ]
        );
        assert_eq!((st.out.acks.ok, st.out.deduped), (4, 1));
        // A rejoin resumes each conversation after the last seq acknowledged in it.
        assert_eq!(
            (st.acked_seq.get(&0), st.acked_seq.get(&1)),
            (Some(&4), Some(&2))
        );
        assert!(st.pending.is_empty());
    }

    #[tokio::test]
    async fn a_loss_without_1001_is_a_cut_only_when_the_node_takes_a_new_socket() {
        let reset = || Closed::dropped("connection reset");
        let heartbeat = Duration::from_secs(30);
        // A node that is up: it accepts the WebSocket.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let _ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        });
        let judged = judge(&format!("ws://{up}/socket/websocket"), heartbeat, reset()).await;
        assert!(!judged.going_away, "{judged}");
        server.await.expect("server");
        // A node that is gone: nothing listens on its port any more.
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        let judged = judge(&format!("ws://{gone}/socket/websocket"), heartbeat, reset()).await;
        assert!(judged.going_away, "{judged}");
        assert!(judged.why.starts_with("connection reset; the node refuses"));
    }

    #[tokio::test]
    async fn losses_count_going_away_apart_from_cuts() {
        let mut st = state();
        let away = Closed {
            why: "closed by server: 1001 \"shutting down\"".to_owned(),
            going_away: true,
        };
        st.lost("ws://a", &away);
        st.lost("ws://b", &Closed::dropped("connection reset"));
        assert_eq!((st.out.going_away, st.out.cut), (1, 1));
        assert!(st.out.losses[0].contains("ws://a going away: "));
        assert!(st.out.losses[1].contains("ws://b cut: connection reset"));
    }

    #[test]
    fn send_replies_decode_acks_and_refusals() {
        let ok: SendReply = serde_json::from_str(
            r#"{"status":"ok","response":{"seq":7,"id":"x","created_at":"t","deduped":true}}"#,
        )
        .expect("ok reply");
        assert_eq!(
            (ok.status.as_str(), ok.response.seq, ok.response.deduped),
            ("ok", Some(7), true)
        );
        let busy: SendReply = serde_json::from_str(
            r#"{"status":"error","response":{"reason":"try_again","message":"m","detail":"slot_moving","retry_after_ms":250}}"#,
        )
        .expect("error reply");
        let r = busy.response;
        assert_eq!(
            (r.reason.as_deref(), r.detail.as_deref(), r.retry_after_ms),
            (Some("try_again"), Some("slot_moving"), Some(250))
        );
        let bare: SendReply = serde_json::from_str(r#"{"status":"error"}"#).expect("bare");
        assert!(bare.response.reason.is_none());
    }
}
