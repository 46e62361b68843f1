//! The append machinery every scenario publishes with: the [`Payload`], the per-target
//! [`Appender`]s, and [`Publisher`], which spreads the paced sends over `--connections`
//! workers and merges what they recorded.
//!
//! Two worker shapes share one contract (take [`Job`]s, answer each exactly once, record into a
//! private [`Recorder`]):
//! - request workers, for targets with a request/response client (Ferry HTTP, JetStream,
//!   Redis): each send is a future in the worker's `FuturesUnordered`;
//! - WebSocket workers, for Ferry `--transport ws`: one socket each, sends pipelined as `send`
//!   events keyed by ref, replies matched by ref. Conversation `c` always goes through socket
//!   `c % sockets`, which joined it before the run started.
//!
//! With several Ferry targets, client (connection or socket) `w` talks to target `w % targets`.
//!
//! The bound on outstanding sends is one semaphore for the whole run: a send that finds no
//! permit is skipped (and counted), because queueing it would hide the server's latency.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cli::{Args, Target, Targets, Transport};
use crate::cpu::{CpuReport, CpuWindow};
use crate::ferry::{append_body, FerryHttp, Frame, PhxSocket, ReplyView, Text, SENDER};
use crate::pacer::Pacer;
use crate::peers::{nats::NatsAppender, redis::RedisAppender};
use crate::progress::Live;
use crate::stats::Recorder;
use crate::LoadError;

/// How one append ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: durable, as far as the target promises on ack.
    Ok,
    /// Refused with `try_again` (overload): counted apart from errors, not retried.
    TryAgain,
    Error(String),
}

/// The message content every target stores: `{"i":<send index>,"pad":"xxx…"}`, padded to about
/// `--payload` bytes. `i` lets a subscriber find the scheduled time of what it received.
#[derive(Debug, Clone)]
pub struct Payload {
    pad: Arc<str>,
}

impl Payload {
    pub fn new(bytes: usize) -> Payload {
        // `{"i":12345,"pad":""}` is ~20 bytes; the index is usually 1–7 digits.
        let pad = "x".repeat(bytes.saturating_sub(20));
        Payload { pad: pad.into() }
    }

    pub fn content(&self, index: u64) -> String {
        format!(r#"{{"i":{index},"pad":"{}"}}"#, self.pad)
    }
}

/// Names of the run's conversations (Ferry ids, NATS subjects, Redis keys), unique per run so
/// runs against a long-lived server never read each other's messages.
#[derive(Debug, Clone)]
pub struct Names {
    pub run: String,
    pub conversations: Arc<[String]>,
}

impl Names {
    pub fn new(prefix: &str, count: usize, separator: char) -> Names {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Time plus pid: two runs started in the same nanosecond on one machine are impossible.
        let run = format!("{:x}{:x}", nanos, std::process::id());
        let conversations = (0..count)
            .map(|c| format!("{prefix}{separator}{run}{separator}{c}"))
            .collect();
        Names { run, conversations }
    }
}

/// One paced send.
pub struct Job {
    pub index: u64,
    pub conv: usize,
    pub scheduled: Instant,
    /// Returned (by dropping the job) when the send is answered.
    pub permit: OwnedSemaphorePermit,
}

/// A request/response append client. Cheap to clone; one clone per worker.
pub trait Appender: Clone + Send + Sync + 'static {
    fn append(&self, conv: usize, index: u64) -> BoxFuture<'static, Outcome>;
}

/// Ferry over HTTP.
#[derive(Clone)]
pub struct HttpAppender {
    http: FerryHttp,
    ids: Arc<[String]>,
    payload: Payload,
}

impl Appender for HttpAppender {
    fn append(&self, conv: usize, index: u64) -> BoxFuture<'static, Outcome> {
        let http = self.http.clone();
        let id = self.ids[conv].clone();
        let body = append_body(&self.payload.content(index));
        Box::pin(async move { http.append(&id, body).await })
    }
}

/// Connected workers, waiting for the start.
enum Workers {
    Http(Vec<HttpAppender>),
    Nats(Vec<NatsAppender>),
    Redis(Vec<RedisAppender>),
    Ws(Vec<WsWorker>),
}

pub struct Publisher {
    workers: Workers,
    conversations: usize,
    max_outstanding: usize,
    drain: Duration,
    server_pid: Option<u32>,
}

/// What [`Publisher::run`] measured: every answer, and the CPU both sides burned meanwhile.
pub struct Published {
    pub acks: Recorder,
    pub cpu: CpuReport,
}

impl Publisher {
    /// Connects `--connections` clients (or sockets, joined to their conversations) to the
    /// target. Conversations must already exist (Ferry) or be created by the peer driver.
    pub async fn connect(
        args: &Args,
        targets: &Targets,
        names: &Names,
    ) -> Result<Publisher, LoadError> {
        let payload = Payload::new(args.payload);
        let drain = Duration::from_secs_f64(args.drain_timeout);
        let workers = match targets.first() {
            Target::Ferry { .. } => match args.transport {
                Transport::Http => {
                    let mut v = Vec::new();
                    for w in 0..args.connections {
                        let target = targets.for_client(w);
                        let Target::Ferry {
                            http_base, api_key, ..
                        } = target
                        else {
                            return Err(mixed_targets(target));
                        };
                        v.push(HttpAppender {
                            http: FerryHttp::new(http_base, api_key, drain)?,
                            ids: names.conversations.clone(),
                            payload: payload.clone(),
                        });
                    }
                    Workers::Http(v)
                }
                Transport::Ws => {
                    let heartbeat = Duration::from_secs_f64(args.heartbeat_secs);
                    let mut v = Vec::new();
                    for w in 0..args.connections {
                        let target = targets.for_client(w);
                        let Target::Ferry { ws_url, .. } = target else {
                            return Err(mixed_targets(target));
                        };
                        let mut socket = PhxSocket::connect(ws_url, heartbeat).await?;
                        let mut topics = HashMap::new();
                        for (c, id) in names.conversations.iter().enumerate() {
                            if c % args.connections != w {
                                continue;
                            }
                            let topic = format!("conversation:{id}");
                            let join_ref = format!("j{c}");
                            // Fresh conversations: nothing to replay.
                            let params = if args.echo {
                                r#"{"after_seq":0}"#
                            } else {
                                r#"{"after_seq":0,"echo":false}"#
                            };
                            socket.join(&join_ref, &topic, params).await?;
                            topics.insert(c, (join_ref, topic));
                        }
                        v.push(WsWorker {
                            socket,
                            topics,
                            payload: payload.clone(),
                        });
                    }
                    Workers::Ws(v)
                }
            },
            Target::Nats(url) => Workers::Nats(
                NatsAppender::connect_all(url, args.connections, names, payload).await?,
            ),
            Target::Redis(url) => Workers::Redis(
                RedisAppender::connect_all(url, args.connections, names, payload).await?,
            ),
        };
        Ok(Publisher {
            workers,
            conversations: names.conversations.len(),
            max_outstanding: args.max_outstanding,
            drain,
            server_pid: args.server_pid,
        })
    }

    /// Runs the schedule from `start`, waits for every answer (or the drain timeout), and
    /// returns the merged record. Send `i` goes to conversation `i % conversations`.
    pub async fn run(self, pacer: Pacer, start: Instant, live: Arc<Live>) -> Published {
        let cpu = CpuWindow::start(self.server_pid);
        let mut senders = Vec::new();
        let mut handles: Vec<JoinHandle<Recorder>> = Vec::new();
        let by_conversation = matches!(self.workers, Workers::Ws(_));
        macro_rules! spawn_requests {
            ($appenders:expr) => {
                for a in $appenders {
                    let (tx, rx) = mpsc::unbounded_channel();
                    senders.push(tx);
                    handles.push(tokio::spawn(request_worker(a, rx, start, live.clone())));
                }
            };
        }
        match self.workers {
            Workers::Http(v) => spawn_requests!(v),
            Workers::Nats(v) => spawn_requests!(v),
            Workers::Redis(v) => spawn_requests!(v),
            Workers::Ws(v) => {
                for w in v {
                    let (tx, rx) = mpsc::unbounded_channel();
                    senders.push(tx);
                    handles.push(tokio::spawn(w.run(rx, start, live.clone(), self.drain)));
                }
            }
        }

        let skipped = dispatch(
            pacer,
            start,
            self.max_outstanding,
            self.conversations,
            &senders,
            by_conversation,
            &live,
        )
        .await;
        drop(senders);

        let mut all = vec![skipped];
        for h in handles {
            match h.await {
                Ok(r) => all.push(r),
                Err(e) => {
                    let mut r = Recorder::new();
                    r.record_error(start.elapsed(), format!("worker failed: {e}"));
                    all.push(r);
                }
            }
        }
        Published {
            acks: Recorder::merged(&all),
            cpu: cpu.finish(),
        }
    }
}

/// Drives `pacer` from `start`, handing each due send to a worker: send `i` is for conversation
/// `i % conversations` and goes to worker `conv % workers` when workers own conversations
/// (`by_conversation`: sockets that joined them), else to worker `i % workers`. A send that finds
/// `max_outstanding` sends unanswered is skipped; one whose worker is gone is an error. Returns
/// the record of both.
pub async fn dispatch(
    pacer: Pacer,
    start: Instant,
    max_outstanding: usize,
    conversations: usize,
    senders: &[mpsc::UnboundedSender<Job>],
    by_conversation: bool,
    live: &Live,
) -> Recorder {
    let permits = Arc::new(Semaphore::new(max_outstanding));
    let mut skipped = Recorder::new();
    let workers = senders.len();
    pacer
        .drive(start, |index, scheduled| {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                skipped.record_skipped();
                return;
            };
            let conv = (index % conversations as u64) as usize;
            let w = if by_conversation {
                conv % workers
            } else {
                (index % workers as u64) as usize
            };
            Live::bump(&live.sent);
            let job = Job {
                index,
                conv,
                scheduled,
                permit,
            };
            // A worker stops taking jobs early only when its socket died.
            if senders[w].send(job).is_err() {
                Live::bump(&live.errors);
                skipped.record_error(scheduled.saturating_duration_since(start), "worker gone");
            }
        })
        .await;
    skipped
}

/// A non-Ferry target among Ferry ones ([`Targets::parse`] refuses that; kept as an error rather
/// than a panic).
fn mixed_targets(target: &Target) -> LoadError {
    LoadError::Args(format!("a {} target among Ferry targets", target.system()))
}

fn record(rec: &mut Recorder, live: &Live, start: Instant, scheduled: Instant, outcome: Outcome) {
    let now = Instant::now();
    let at = now.saturating_duration_since(start);
    match outcome {
        Outcome::Ok => {
            Live::bump(&live.ok);
            rec.record_ok(at, now.saturating_duration_since(scheduled));
        }
        Outcome::TryAgain => {
            Live::bump(&live.try_again);
            rec.record_try_again(at);
        }
        Outcome::Error(e) => {
            Live::bump(&live.errors);
            rec.record_error(at, e);
        }
    }
}

async fn request_worker<A: Appender>(
    appender: A,
    mut rx: mpsc::UnboundedReceiver<Job>,
    start: Instant,
    live: Arc<Live>,
) -> Recorder {
    let mut rec = Recorder::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            job = rx.recv(), if open => match job {
                Some(job) => {
                    let send = appender.append(job.conv, job.index);
                    in_flight.push(async move { (send.await, job) });
                }
                None => open = false,
            },
            Some((outcome, job)) = in_flight.next(), if !in_flight.is_empty() => {
                record(&mut rec, &live, start, job.scheduled, outcome);
            }
            else => break,
        }
    }
    rec
}

/// One socket of the WebSocket appender.
struct WsWorker {
    socket: PhxSocket,
    /// conversation index -> (join_ref, topic) for the conversations this socket joined.
    topics: HashMap<usize, (String, String)>,
    payload: Payload,
}

impl WsWorker {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Job>,
        start: Instant,
        live: Arc<Live>,
        drain: Duration,
    ) -> Recorder {
        let mut rec = Recorder::new();
        // Send index (the frame's ref) -> job awaiting its reply.
        let mut pending: HashMap<u64, Job> = HashMap::new();
        let mut open = true;
        let drain_deadline = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(drain_deadline);
        let mut broken: Option<String> = None;
        while broken.is_none() && (open || !pending.is_empty()) {
            tokio::select! {
                job = rx.recv(), if open => match job {
                    Some(job) => {
                        // Every send already due goes out in one write; none waits for another.
                        let mut next = Some(job);
                        while let Some(job) = next.take() {
                            let Some((join_ref, topic)) = self.topics.get(&job.conv) else {
                                record(&mut rec, &live, start, job.scheduled,
                                    Outcome::Error(format!("conversation {} not joined", job.conv)));
                                next = rx.try_recv().ok();
                                continue;
                            };
                            let body = format!(
                                r#"{{"sender":"{SENDER}","content":{}}}"#,
                                self.payload.content(job.index)
                            );
                            let fed = self
                                .socket
                                .feed_frame(Some(join_ref), &job.index.to_string(), topic, "send", &body)
                                .await;
                            if let Err(e) = fed {
                                record(&mut rec, &live, start, job.scheduled, Outcome::Error(e.to_string()));
                                broken = Some(e.to_string());
                                break;
                            }
                            pending.insert(job.index, job);
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
                        drain_deadline.as_mut().reset(Instant::now() + drain);
                    }
                },
                incoming = self.socket.next_text() => match incoming {
                    Ok(Text::Frame(text)) => {
                        let Some((index, outcome)) = reply_outcome(text.as_str()) else {
                            // Our own messages pushed back to us, heartbeat replies: not measured.
                            continue;
                        };
                        let Some(job) = pending.remove(&index) else { continue };
                        record(&mut rec, &live, start, job.scheduled, outcome);
                    }
                    Ok(Text::Closed(closed)) => broken = Some(closed.why),
                    Err(e) => broken = Some(e.to_string()),
                },
                _ = &mut drain_deadline, if !open => {
                    broken = Some(format!("no reply within the drain timeout ({drain:?})"));
                }
            }
        }
        // Whatever is still unanswered, or still queued for a dead socket, failed.
        let why = broken.unwrap_or_default();
        for (_, job) in pending.drain() {
            record(
                &mut rec,
                &live,
                start,
                job.scheduled,
                Outcome::Error(why.clone()),
            );
        }
        rx.close();
        while let Some(job) = rx.recv().await {
            record(
                &mut rec,
                &live,
                start,
                job.scheduled,
                Outcome::Error(why.clone()),
            );
        }
        self.socket.close().await;
        rec
    }
}

/// The send index (the ref) and outcome of a reply to a `send`; `None` for any other frame
/// (pushes, heartbeat replies). Read in one borrowed pass ([`ReplyView`]); what that cannot
/// read goes through [`Frame::parse`].
fn reply_outcome(text: &str) -> Option<(u64, Outcome)> {
    let (index, reply) = match ReplyView::parse(text) {
        Some(view) if view.event() != "phx_reply" => return None,
        Some(view) => (view.reference()?.parse().ok()?, view.outcome()),
        None => {
            let frame = Frame::parse(text).ok()?;
            if frame.event != "phx_reply" {
                return None;
            }
            let index = frame.reference.as_deref()?.parse().ok()?;
            (index, frame.reply().map(|_| ()))
        }
    };
    let outcome = match reply {
        Ok(()) => Outcome::Ok,
        Err((reason, _)) if reason == "try_again" => Outcome::TryAgain,
        Err((reason, raw)) => Outcome::Error(format!("send: {reason}: {raw}")),
    };
    Some((index, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_about_the_requested_size_and_carries_the_index() {
        let p = Payload::new(200);
        let c = p.content(123_456);
        assert!((195..=210).contains(&c.len()), "len {}", c.len());
        let v: serde_json::Value = serde_json::from_str(&c).expect("valid json");
        assert_eq!(v["i"], 123_456);
        assert_eq!(Payload::new(0).content(1), r#"{"i":1,"pad":""}"#);
    }

    #[test]
    fn names_are_distinct_per_conversation() {
        let n = Names::new("lt", 3, '-');
        assert_eq!(n.conversations.len(), 3);
        assert!(n.conversations[2].starts_with("lt-") && n.conversations[2].ends_with("-2"));
        assert_ne!(n.conversations[0], n.conversations[1]);
    }

    #[test]
    fn replies_to_sends_are_read_and_everything_else_is_skipped() {
        let ok = r#"["1","42","conversation:a","phx_reply",{"status":"ok","response":{"seq":7,"id":"x","created_at":"t","deduped":false}}]"#;
        assert_eq!(reply_outcome(ok), Some((42, Outcome::Ok)));
        let busy = r#"["1","43","conversation:a","phx_reply",{"status":"error","response":{"reason":"try_again","retry_after_ms":50}}]"#;
        assert_eq!(reply_outcome(busy), Some((43, Outcome::TryAgain)));
        let refused = r#"["1","44","conversation:a","phx_reply",{"status":"error","response":{"reason":"forbidden"}}]"#;
        let Some((44, Outcome::Error(e))) = reply_outcome(refused) else {
            panic!("an error reply is an error");
        };
        assert!(e.starts_with("send: forbidden: {"), "{e}");
        // Our own message pushed back, and a heartbeat reply (its ref is not a send index).
        let push = r#"["1",null,"conversation:a","message",{"seq":7,"content":{"i":42}}]"#;
        assert_eq!(reply_outcome(push), None);
        let heartbeat = r#"[null,"r3","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(reply_outcome(heartbeat), None);
        // A string with an escape cannot be borrowed: the general decoder reads the frame.
        let escaped = r#"["1","44","conversation:a\u0021","phx_reply",{"status":"error","response":{"reason":"invalid"}}]"#;
        assert!(
            ReplyView::parse(escaped).is_some(),
            "the topic is ignored, not borrowed"
        );
        let escaped =
            r#"["1","4\u0035","conversation:a","phx_reply",{"status":"ok","response":{}}]"#;
        assert!(ReplyView::parse(escaped).is_none());
        assert_eq!(reply_outcome(escaped), Some((45, Outcome::Ok)));
    }
}
