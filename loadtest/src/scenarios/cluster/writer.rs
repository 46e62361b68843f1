//! A `cluster` writer: one WebSocket on one node, joined before the clock starts to the
//! conversations it writes (conversation `c` belongs to writer `c % writers`). Every append
//! carries an idempotency key, `<run>-<send index>`; an answer `try_again` sends it again, with
//! the same key, after the answer's `retry_after_ms`, so a send ends acknowledged or failed, never
//! half-known. Its latency runs from the first attempt's scheduled time to the final ack.
//!
//! Sends are pipelined: the frame's ref is the attempt's place in the socket's send order, which
//! is also what [`Ack::sent_order`] reports to the checker (a socket's sends to one conversation
//! must take seqs in the order they left). An acknowledged send *hit a moving slot* when a
//! `try_again` `slot_moving` came back for it, when a `backpressure` push for its conversation
//! arrived while it was in flight or within that push's `retry_after_ms` before it left, or when
//! its ack took longer than the servers' move hold.
//!
//! The writer stops once its queue is closed and every send is answered, when its socket fails
//! (everything unanswered fails with it), or at the drain deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::append::{Job, Payload};
use crate::ferry::{keyed_append_body, Frame, PhxSocket, ReplyView, Text};
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
    /// conversation index -> its topic.
    topics: HashMap<usize, Topic>,
    /// topic name -> conversation index, for pushes.
    by_topic: HashMap<String, usize>,
    payload: Payload,
    /// The run id: idempotency keys are `<run>-<send index>`.
    run: String,
    move_hold: Duration,
    drain: Duration,
}

/// The writer's bookkeeping while it runs.
struct State {
    /// In flight, by ref (the attempt's place in the send order).
    pending: HashMap<u64, Send>,
    /// Refused with `try_again`, by when to send again (ties broken by the old ref).
    retries: BTreeMap<(Instant, u64), Send>,
    next_order: u64,
    out: WriterOutcome,
    start: Instant,
    live: Arc<Live>,
}

impl State {
    fn fail(&mut self, send: Send, why: impl Into<String>) {
        Live::bump(&self.live.errors);
        let at = Instant::now().saturating_duration_since(self.start);
        self.out.acks.record_error(at, why);
        // Dropping the send returns its permit.
        drop(send);
    }
}

impl Writer {
    /// Connects to `ws_url` and joins `conversations` (`(index, id)`), before the clock starts.
    pub async fn connect(
        ws_url: &str,
        heartbeat: Duration,
        conversations: Vec<(usize, String)>,
        payload: Payload,
        run: String,
        move_hold: Duration,
        drain: Duration,
    ) -> Result<Writer, LoadError> {
        let mut socket = PhxSocket::connect(ws_url, heartbeat).await?;
        let mut topics = HashMap::new();
        let mut by_topic = HashMap::new();
        for (c, id) in conversations {
            let name = format!("conversation:{id}");
            let join_ref = format!("j{c}");
            // Fresh conversations: nothing to replay.
            socket.join(&join_ref, &name, r#"{"after_seq":0}"#).await?;
            by_topic.insert(name.clone(), c);
            topics.insert(
                c,
                Topic {
                    join_ref,
                    name,
                    moving_until: None,
                },
            );
        }
        Ok(Writer {
            socket,
            topics,
            by_topic,
            payload,
            run,
            move_hold,
            drain,
        })
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Job>,
        start: Instant,
        live: Arc<Live>,
        seconds: f64,
    ) -> WriterOutcome {
        let mut st = State {
            pending: HashMap::new(),
            retries: BTreeMap::new(),
            next_order: 0,
            out: WriterOutcome {
                acks: Recorder::for_run(seconds),
                moving: Recorder::new(),
                acked: Vec::new(),
                try_again_by_detail: BTreeMap::new(),
                retries: 0,
                deduped: 0,
                backpressure: 0,
            },
            start,
            live,
        };
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let retry_timer = tokio::time::sleep_until(far);
        tokio::pin!(retry_timer);
        let drain_deadline = tokio::time::sleep_until(far);
        tokio::pin!(drain_deadline);
        let mut open = true;
        let mut broken: Option<String> = None;
        while broken.is_none() && (open || !st.pending.is_empty() || !st.retries.is_empty()) {
            tokio::select! {
                job = rx.recv(), if open => match job {
                    Some(job) => {
                        // Every send already due goes out in one write; none waits for another.
                        let mut next = Some(job);
                        while let Some(job) = next.take() {
                            let send = Send { job, attempts: 0, slot_moving: false, backpressure: false };
                            if let Err(e) = self.feed(&mut st, send).await {
                                broken = Some(e);
                                break;
                            }
                            next = rx.try_recv().ok();
                        }
                        if broken.is_none() {
                            if let Err(e) = self.socket.flush().await {
                                broken = Some(e.to_string());
                            }
                        }
                    }
                    None => {
                        open = false;
                        drain_deadline.as_mut().reset(Instant::now() + self.drain);
                    }
                },
                incoming = self.socket.next_text() => match incoming {
                    Ok(Text::Frame(text)) => {
                        if let Err(e) = self.handle(&mut st, text.as_str()) {
                            broken = Some(e);
                        }
                    }
                    Ok(Text::Closed(why)) => broken = Some(format!("writer socket lost: {why}")),
                    Err(e) => broken = Some(format!("writer socket failed: {e}")),
                },
                _ = &mut retry_timer, if !st.retries.is_empty() => {
                    let now = Instant::now();
                    while let Some(entry) = st.retries.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let send = entry.remove();
                        if let Err(e) = self.feed(&mut st, send).await {
                            broken = Some(e);
                            break;
                        }
                    }
                    if broken.is_none() {
                        if let Err(e) = self.socket.flush().await {
                            broken = Some(e.to_string());
                        }
                    }
                },
                _ = &mut drain_deadline, if !open => {
                    broken = Some(format!("no answer within the drain timeout ({:?})", self.drain));
                }
            }
            let next_retry = st.retries.keys().next().map_or(far, |(at, _)| *at);
            if retry_timer.deadline() != next_retry {
                retry_timer.as_mut().reset(next_retry);
            }
        }
        // Whatever is unanswered, waiting for a retry, or still queued for a dead socket failed.
        let why = broken.unwrap_or_default();
        let unanswered: Vec<Send> = st
            .pending
            .drain()
            .map(|(_, s)| s)
            .chain(std::mem::take(&mut st.retries).into_values())
            .collect();
        for send in unanswered {
            st.fail(send, why.clone());
        }
        rx.close();
        while let Some(job) = rx.recv().await {
            let send = Send {
                job,
                attempts: 0,
                slot_moving: false,
                backpressure: false,
            };
            st.fail(send, why.clone());
        }
        self.socket.close().await;
        st.out
    }

    /// Writes one attempt of `send` into the socket's buffer (the caller flushes). `Err` only
    /// when the socket failed; the send is then in `pending` and fails with the rest.
    async fn feed(&mut self, st: &mut State, mut send: Send) -> Result<(), String> {
        let Some(topic) = self.topics.get(&send.job.conv) else {
            let why = format!("conversation {} not joined", send.job.conv);
            st.fail(send, why);
            return Ok(());
        };
        if topic.moving_until.is_some_and(|t| Instant::now() < t) {
            send.backpressure = true;
        }
        if send.attempts > 0 {
            st.out.retries += 1;
        }
        let order = st.next_order;
        st.next_order += 1;
        let key = format!("{}-{}", self.run, send.job.index);
        let body = keyed_append_body(&self.payload.content(send.job.index), &key);
        st.pending.insert(order, send);
        self.socket
            .feed_frame(
                Some(&topic.join_ref),
                &order.to_string(),
                &topic.name,
                "send",
                &body,
            )
            .await
            .map_err(|e| format!("writer socket failed: {e}"))
    }

    /// One frame from the socket. `Err` when the writer cannot go on.
    fn handle(&mut self, st: &mut State, text: &str) -> Result<(), String> {
        // Our own messages pushed back to us are most of the traffic: skip them unread.
        if ReplyView::parse(text).is_some_and(|v| v.event() == "message") {
            return Ok(());
        }
        let frame = Frame::parse(text).map_err(|e| format!("writer socket: {e}"))?;
        match frame.event.as_str() {
            "phx_reply" => {
                // Heartbeat replies carry `r<n>` refs; sends carry their order.
                let Some(order) = frame.reference.as_deref().and_then(|r| r.parse().ok()) else {
                    return Ok(());
                };
                let Some(send) = st.pending.remove(&order) else {
                    return Ok(());
                };
                self.answered(st, order, send, frame.payload.get());
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
                return Err(format!("{} on {}", frame.event, frame.topic));
            }
            _ => {}
        }
        Ok(())
    }

    /// The reply to attempt `order` of `send`: an ack, a `try_again` (sent again later), or a
    /// failure.
    fn answered(&self, st: &mut State, order: u64, mut send: Send, payload: &str) {
        let reply = match serde_json::from_str::<SendReply>(payload) {
            Ok(r) => r,
            Err(e) => return st.fail(send, format!("send: bad reply ({e}): {payload}")),
        };
        let now = Instant::now();
        let at = now.saturating_duration_since(st.start);
        let r = reply.response;
        if reply.status == "ok" {
            let Some(seq) = r.seq else {
                return st.fail(send, format!("send: ack without seq: {payload}"));
            };
            let latency = now.saturating_duration_since(send.job.scheduled);
            Live::bump(&st.live.ok);
            st.out.acks.record_ok(at, latency);
            if send.slot_moving || send.backpressure || latency > self.move_hold {
                st.out.moving.record_ok(at, latency);
            }
            if r.deduped {
                st.out.deduped += 1;
            }
            st.out.acked.push((
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
            return st.fail(send, format!("send: {payload}"));
        }
        Live::bump(&st.live.try_again);
        st.out.acks.record_try_again(at);
        let detail = r.detail.unwrap_or_else(|| "none".to_owned());
        let counted = if st.out.try_again_by_detail.len() < MAX_DETAILS
            || st.out.try_again_by_detail.contains_key(&detail)
        {
            detail.clone()
        } else {
            "other".to_owned()
        };
        *st.out.try_again_by_detail.entry(counted).or_default() += 1;
        if detail == "slot_moving" {
            send.slot_moving = true;
        }
        send.attempts += 1;
        if send.attempts >= MAX_ATTEMPTS {
            return st.fail(
                send,
                format!("send: still try_again ({detail}) after {MAX_ATTEMPTS} attempts"),
            );
        }
        let wait = r
            .retry_after_ms
            .map_or(DEFAULT_RETRY, Duration::from_millis)
            .min(MAX_RETRY);
        st.retries.insert((now + wait, order), send);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
