//! The topics of one socket: `conversation:{id}` and `inbox:{participant}` (PROTOCOL.md,
//! "WebSocket").
//!
//! A joined conversation has a delivery, an ephemeral subscription and, while it sends, an append
//! pipeline, all writing into the socket's one [`Outbox`]:
//! - delivery: a [`Cursor`] from the join's `after_seq`, yielding a `message` push for every seq
//!   in order, replay then live. It is a stream the socket's writer pulls from directly (see
//!   [`super::session::Delivery`]), only when the socket can take more, so a slow client falls behind and
//!   catches up from the log with one page in memory; it is never disconnected.
//! - ephemeral: `chunk`/`typing` of the other sockets (and `backpressure` when the slot moves),
//!   queued by the sender's task straight into this socket's outbox ([`JoinSink`]); a socket
//!   whose outbox is full misses them. No task or buffer per join.
//! - appends (started by the first `send`): submits this socket's `send`s in the order they
//!   arrived without waiting for each to be durable (each append's first poll hands it to the
//!   conversation actor, then it is kept in flight), and replies to each once it is durable. It
//!   ends when the topic has sent nothing for a second, and the next `send` starts it again.
//!
//! Requests that wait on the node or the database (`send`, `ack`, `read`) never block the
//! socket's reader; at most `limits.socket_in_flight` of them per socket, beyond that `try_again`.
//! Leaving a topic (or joining it again) stops its delivery and ephemeral events at once; its
//! appends still answer. Dropping [`SocketChannels`] (the socket ended) stops everything.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

use ferry_shards::actor::conversation::{AppendOutcome, AppendRequest};
use ferry_shards::ids::{ConversationId, ParticipantId};
use ferry_shards::node::TryAgainReason;

use super::echo::{OwnSends, SendTicket};
use super::frame::{self, Address, Frame};
use super::idle::IdleClock;
use super::metrics::{self, ChannelGauge, Counted};
use super::session::{AwaitedReply, Channels, Outbox};
use crate::access;
use crate::auth::Principal;
use crate::delivery::Cursor;
use crate::http::error::ApiError;
use crate::http::messages::{build_request, AppendBody};
use crate::http::{conversation_id, participant_id, AppState};
use crate::inbox::{self, EphemeralEvent, EphemeralSink, EphemeralSubscription, InboxWatch};
use crate::service::{self, AppendQueue, CursorKind, Pending};

/// Messages a delivery cursor reads per page (its memory bound).
const PAGE: usize = 256;
/// Consecutive delivery failures before the topic is errored (`phx_error`; clients rejoin).
const MAX_DELIVERY_FAILURES: u32 = 5;
/// Longest `chunk` `stream_id`, in bytes.
const MAX_STREAM_ID_BYTES: usize = 128;
/// How long a topic's append pipeline waits for its next `send` with nothing in flight before it
/// ends (the next `send` starts another).
const PIPELINE_IDLE: Duration = Duration::from_secs(1);

pub const CONVERSATION_PREFIX: &str = "conversation:";
pub const INBOX_PREFIX: &str = "inbox:";

enum Topic {
    Conversation(ConversationId),
    Inbox(ParticipantId),
}

fn parse_topic(topic: &str) -> Result<Topic, ApiError> {
    if let Some(id) = topic.strip_prefix(CONVERSATION_PREFIX) {
        Ok(Topic::Conversation(conversation_id(id)?))
    } else if let Some(p) = topic.strip_prefix(INBOX_PREFIX) {
        Ok(Topic::Inbox(participant_id(p)?))
    } else {
        Err(ApiError::not_found(format!(
            "no topic {topic:?}; topics are conversation:{{id}} and inbox:{{participant}}"
        )))
    }
}

/// An append validated on the reader, waiting for its conversation's pipeline.
struct AppendJob {
    to: Address,
    request: AppendRequest,
    /// Counts against the socket's in-flight bound until the reply is queued.
    _permit: OwnedSemaphorePermit,
    /// Tells the socket's writer a reply is coming, until it is queued.
    _awaited: AwaitedReply,
    /// On a join with `echo: false`: tells its delivery which seq this send got.
    own: Option<SendTicket>,
}

/// A topic's append queue. Jobs are boxed: a queue allocates its slots 32 at a time, and 32
/// unboxed jobs take 7 KB in every topic that ever sent.
type Appends = mpsc::Sender<Box<AppendJob>>;

/// One joined topic.
struct Joined {
    join_ref: Value,
    /// The conversation (`None` for an inbox).
    conversation: Option<ConversationId>,
    /// The append pipeline's queue, started by the topic's first `send` (and again by the first
    /// after the pipeline ended idle): most sockets only listen, and an idle join should cost no
    /// task and no queue.
    appends: Option<Appends>,
    /// Inbox tasks: stopped as soon as the join ends.
    tasks: Vec<AbortHandle>,
    /// A conversation's `chunk`/`typing` (and slot-move notices): ends with the join.
    _ephemeral: Option<EphemeralSubscription>,
    /// The conversation's pushes, pulled by the socket's writer: ended as soon as the join ends.
    delivery: Option<futures_util::future::AbortHandle>,
    /// The append pipeline: finishes its in-flight appends after a leave, stopped with the socket.
    pipeline: Option<JoinHandle<()>>,
    /// The join's own sends, when it asked not to get them pushed back (`echo: false`).
    own_sends: Option<Arc<OwnSends>>,
    _gauge: ChannelGauge,
}

impl Drop for Joined {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(delivery) = &self.delivery {
            delivery.abort();
        }
    }
}

/// The topics of one socket.
pub struct SocketChannels {
    state: AppState,
    principal: Principal,
    /// Process-unique; ephemeral events are not echoed to the socket that sent them.
    socket_id: u64,
    outbox: Outbox,
    /// Boxed: a map allocates four entries at its first insert, and most sockets join one topic.
    topics: HashMap<String, Box<Joined>>,
    in_flight: Arc<Semaphore>,
    /// `limits.socket_in_flight`: the permits of `in_flight`.
    in_flight_limit: usize,
    /// Pipelines of topics that were left, still answering their last appends.
    draining: Vec<AbortHandle>,
    /// `rate.ephemeral`: this socket's `chunk` and `typing` events.
    ephemeral_limit: Option<crate::rate::Limiter>,
    /// Whom the principal's limits are counted for.
    subject: String,
}

impl Drop for SocketChannels {
    fn drop(&mut self) {
        for joined in self.topics.values() {
            if let Some(p) = &joined.pipeline {
                p.abort();
            }
        }
        for p in &self.draining {
            p.abort();
        }
    }
}

impl Channels for SocketChannels {
    async fn handle(&mut self, frame: Frame<'_>) {
        let result = match &*frame.event {
            frame::JOIN => self.join(&frame).await,
            frame::LEAVE => self.leave(&frame).await,
            _ => self.event(&frame).await,
        };
        if let Err(e) = result {
            self.outbox.error(&frame.address(), &e).await;
        }
    }

    async fn expire(&mut self) {
        // Deliveries stop first, so no push follows its topic's phx_error.
        let topics: Vec<(String, Box<Joined>)> = self.topics.drain().collect();
        for (topic, joined) in topics {
            let error = frame::lifecycle(&joined.join_ref, &topic, frame::ERROR);
            self.retire(*joined);
            self.outbox.send(error).await;
        }
    }
}

fn parse_payload<T: DeserializeOwned>(payload: &str, event: &str) -> Result<T, ApiError> {
    serde_json::from_str(payload)
        .map_err(|e| ApiError::invalid(format!("invalid {event} payload: {e}")))
}

fn not_joined(topic: &str) -> ApiError {
    let mut e = ApiError::invalid(format!("join {topic:?} before sending events to it"));
    e.reason = Some("not_joined");
    e
}

fn unknown_event(topic: &str, event: &str) -> ApiError {
    let mut e = ApiError::invalid(format!("topic {topic:?} does not take event {event:?}"));
    e.reason = Some("unknown_event");
    e
}

fn too_many_in_flight(limit: usize) -> ApiError {
    ::metrics::counter!(ferry_shards::metrics::TRY_AGAIN_TOTAL, "reason" => "socket_in_flight")
        .increment(1);
    let mut e = ApiError::try_again(TryAgainReason::MailboxFull, 50);
    e.message = format!("more than {limit} requests in flight on this socket");
    e.reason = Some("socket_in_flight");
    e
}

/// The participant a user is, or the one an API key names (`participant`, or `sender`).
fn acting_participant(
    principal: &Principal,
    requested: Option<&str>,
) -> Result<ParticipantId, ApiError> {
    match (principal, requested) {
        (Principal::ApiKey { .. }, None) => Err(ApiError::invalid(
            "participant is required on a socket authenticated with an API key",
        )),
        _ => access::sender(principal, requested),
    }
}

#[derive(Deserialize, Default)]
struct JoinParams {
    #[serde(default)]
    after_seq: Option<u64>,
    /// Alias of `after_seq`; `after_seq` wins when both are given.
    #[serde(default)]
    last_seq: Option<u64>,
    /// `false`: the join's own sends are not pushed back to it (the reply carries seq, id and
    /// time already).
    #[serde(default)]
    echo: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorBody {
    seq: u64,
    #[serde(default)]
    participant: Option<String>,
}

impl SocketChannels {
    pub fn new(
        state: AppState,
        principal: Principal,
        socket_id: u64,
        outbox: Outbox,
    ) -> SocketChannels {
        let in_flight_limit = state.config.limits.socket_in_flight.max(1);
        let state_rate_ephemeral = state.rate.ephemeral();
        let subject = principal.subject();
        SocketChannels {
            state,
            principal,
            socket_id,
            outbox,
            topics: HashMap::new(),
            in_flight: Arc::new(Semaphore::new(in_flight_limit)),
            in_flight_limit,
            draining: Vec::new(),
            ephemeral_limit: state_rate_ephemeral,
            subject,
        }
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| too_many_in_flight(self.in_flight_limit))
    }

    /// Ends a join: its tasks stop now, its append pipeline finishes what it has.
    fn retire(&mut self, mut joined: Joined) {
        self.draining.retain(|p| !p.is_finished());
        if let Some(p) = joined.pipeline.take() {
            self.draining.push(p.abort_handle());
        }
    }

    async fn join(&mut self, frame: &Frame<'_>) -> Result<(), ApiError> {
        // A second join of a joined topic replaces the first (as Phoenix does): the old join is
        // closed; the client drops its leftover pushes by their join_ref.
        if let Some(old) = self.topics.remove(&*frame.topic) {
            let close = frame::lifecycle(&old.join_ref, &frame.topic, frame::CLOSE);
            self.retire(*old);
            self.outbox.send(close).await;
        }
        let topic = parse_topic(&frame.topic)?;
        let max_topics = self.state.config.limits.max_topics_per_socket;
        if self.topics.len() >= max_topics {
            return Err(ApiError::too_many_topics(max_topics));
        }
        match topic {
            Topic::Conversation(id) => self.join_conversation(frame, id).await,
            Topic::Inbox(participant) => self.join_inbox(frame, participant).await,
        }
    }

    async fn join_conversation(
        &mut self,
        frame: &Frame<'_>,
        id: ConversationId,
    ) -> Result<(), ApiError> {
        let params: Option<JoinParams> = parse_payload(frame.payload, frame::JOIN)?;
        let params = params.unwrap_or_default();
        let conversation = service::follow(&self.state, &self.principal, &id).await?;
        let after_seq = match (params.after_seq.or(params.last_seq), &self.principal) {
            (Some(n), _) => service::clamp_seq(n),
            (None, Principal::User { sub, .. }) => self.state.store.cursor(&id, sub).await?.0,
            (None, Principal::ApiKey { .. }) => 0,
        };
        // History before `first_available` has expired: the client is told once, with a `gap`
        // push, and delivery continues at the first seq that still exists.
        let first_available = self.state.store.first_available_seq(&id).await?;
        let gap = (after_seq.saturating_add(1) < first_available).then(|| Gap {
            from_seq: after_seq + 1,
            to_seq: first_available.saturating_sub(1),
        });
        // Subscribed before the reply, so nothing sent after the client sees it is missed; what
        // comes before the reply is queued is held until it is.
        let slot = self.state.node.slot_of(&id);
        let sink = Arc::new(JoinSink {
            outbox: self.outbox.clone(),
            join_ref: frame.join_ref.clone(),
            topic: frame.topic.to_string(),
            early: std::sync::Mutex::new(Some(Vec::new())),
        });
        let ephemeral =
            self.state
                .events
                .subscribe_ephemeral(&id, slot, self.socket_id, sink.clone());
        let cursor = Cursor::new(
            self.state.clone(),
            id.clone(),
            conversation.local,
            after_seq.max(first_available.saturating_sub(1)),
            PAGE,
        );
        let last_seq = conversation.last_seq;
        let to = frame.address();
        let reply = json!({
            "conversation_id": id.as_str(),
            "last_seq": last_seq,
            "first_available_seq": first_available,
        });
        // Counted before the reply, so a client that saw the reply sees the join counted.
        let gauge = ChannelGauge::open("conversation");
        // The reply is queued before any push of this join exists.
        if !self.outbox.ok(&to, &reply).await {
            return Ok(());
        }
        tracing::debug!(topic = %frame.topic, after_seq, last_seq, "joined conversation");
        let join_ref = frame.join_ref.clone();
        let own_sends = (params.echo == Some(false)).then(|| Arc::new(OwnSends::default()));
        let (delivery, delivery_abort) = futures_util::stream::abortable(deliveries(
            gap,
            cursor,
            join_ref.clone(),
            frame.topic.to_string(),
            own_sends.clone(),
        ));
        if !self.outbox.deliver(Box::pin(delivery)).await {
            return Ok(());
        }
        sink.ready();
        self.topics.insert(
            frame.topic.to_string(),
            Box::new(Joined {
                join_ref,
                conversation: Some(id),
                appends: None,
                tasks: Vec::new(),
                _ephemeral: Some(ephemeral),
                delivery: Some(delivery_abort),
                pipeline: None,
                own_sends,
                _gauge: gauge,
            }),
        );
        Ok(())
    }

    async fn join_inbox(
        &mut self,
        frame: &Frame<'_>,
        participant: ParticipantId,
    ) -> Result<(), ApiError> {
        access::act_for(&self.principal, &participant)?;
        // Watching starts before the snapshot is read, so no change falls between the two.
        let watch = InboxWatch::new(self.state.clone(), participant.clone()).await?;
        let (conversations, has_more) =
            inbox::snapshot(&self.state, &participant, None, inbox::MAX_SNAPSHOT_PAGE).await?;
        let to = frame.address();
        let gauge = ChannelGauge::open("inbox");
        if !self
            .outbox
            .ok(
                &to,
                &json!({ "conversations": conversations, "has_more": has_more }),
            )
            .await
        {
            return Ok(());
        }
        let join_ref = frame.join_ref.clone();
        let task = tokio::spawn(push_inbox(
            watch,
            self.outbox.clone(),
            join_ref.clone(),
            frame.topic.to_string(),
        ));
        self.topics.insert(
            frame.topic.to_string(),
            Box::new(Joined {
                join_ref,
                conversation: None,
                appends: None,
                tasks: vec![task.abort_handle()],
                _ephemeral: None,
                delivery: None,
                pipeline: None,
                own_sends: None,
                _gauge: gauge,
            }),
        );
        Ok(())
    }

    async fn leave(&mut self, frame: &Frame<'_>) -> Result<(), ApiError> {
        let joined = self
            .topics
            .remove(&*frame.topic)
            .ok_or_else(|| not_joined(&frame.topic))?;
        let join_ref = joined.join_ref.clone();
        self.retire(*joined);
        self.outbox.ok(&frame.address(), &json!({})).await;
        self.outbox
            .send(frame::lifecycle(&join_ref, &frame.topic, frame::CLOSE))
            .await;
        Ok(())
    }

    async fn event(&mut self, frame: &Frame<'_>) -> Result<(), ApiError> {
        let joined = self
            .topics
            .get(&*frame.topic)
            .ok_or_else(|| not_joined(&frame.topic))?;
        let Some(id) = joined.conversation.clone() else {
            return Err(unknown_event(&frame.topic, &frame.event));
        };
        match &*frame.event {
            "send" => self.send(frame, &id),
            "ack" => self.cursor(frame, id, CursorKind::Ack),
            "read" => self.cursor(frame, id, CursorKind::Read),
            "chunk" => self.ephemeral(frame, &id, "chunk").await,
            "typing" => self.ephemeral(frame, &id, "typing").await,
            _ => Err(unknown_event(&frame.topic, &frame.event)),
        }
    }

    /// Validates on the reader (errors are answered at once) and queues the append.
    fn send(&mut self, frame: &Frame<'_>, id: &ConversationId) -> Result<(), ApiError> {
        self.principal.may_write()?;
        self.state.rate.check_append(&self.subject)?;
        // Read in one pass with the frame when it could be; otherwise serde says what is wrong.
        let (body, storable_checked) = match frame
            .send
            .as_ref()
            .and_then(ferry_codec::send::SendFields::to_body)
        {
            Some(body) => (body, true),
            None => (parse_payload::<AppendBody>(frame.payload, "send")?, false),
        };
        let sender = access::sender(&self.principal, body.sender.as_deref())?;
        let request = build_request(
            body,
            None,
            sender,
            self.state.config.limits.max_message_bytes,
            storable_checked,
        )?;
        let permit = self.permit()?;
        let limit = self.in_flight_limit;
        let awaited = self.outbox.awaiting_reply();
        let joined = self
            .topics
            .get_mut(&*frame.topic)
            .ok_or_else(|| not_joined(&frame.topic))?;
        let job = Box::new(AppendJob {
            to: frame.address(),
            request,
            _permit: permit,
            _awaited: awaited,
            own: joined.own_sends.as_ref().map(OwnSends::submit),
        });
        // Never full: the queue has room for every permit. Closed when the pipeline just ended
        // idle: the job goes to the next one, as it does when the topic has none yet.
        let job = match &joined.appends {
            Some(appends) => match appends.try_send(job) {
                Err(mpsc::error::TrySendError::Closed(job)) => job,
                sent => return sent.map_err(|_| too_many_in_flight(limit)),
            },
            None => job,
        };
        self.start_pipeline(&frame.topic, id)?
            .try_send(job)
            .map_err(|_| too_many_in_flight(limit))
    }

    /// Starts the topic's append pipeline (its first, or the next after one ended idle): its
    /// queue.
    fn start_pipeline(&mut self, topic: &str, id: &ConversationId) -> Result<&Appends, ApiError> {
        let joined = self
            .topics
            .get_mut(topic)
            .ok_or_else(|| not_joined(topic))?;
        let (appends, jobs) = mpsc::channel(self.in_flight_limit);
        let previous = joined.pipeline.take();
        // Boxed: a task's memory lives as long as its `JoinHandle`, which stays in the join
        // after the pipeline ended idle. Unboxed, every topic that ever sent kept its pipeline's
        // whole future (about 1.9 KB) for the rest of the join; boxed, the future is freed when
        // the pipeline ends and the handle keeps only the task's header.
        joined.pipeline = Some(tokio::spawn(Box::pin(run_appends(
            self.state.clone(),
            self.principal.clone(),
            id.clone(),
            jobs,
            self.outbox.clone(),
            previous,
        ))));
        Ok(joined.appends.insert(appends))
    }

    /// `ack` / `read`: moves a cursor (never backwards) in a task of its own.
    fn cursor(
        &self,
        frame: &Frame<'_>,
        id: ConversationId,
        kind: CursorKind,
    ) -> Result<(), ApiError> {
        let event = if kind == CursorKind::Read {
            "read"
        } else {
            "ack"
        };
        self.principal.may_write()?;
        let body: CursorBody = parse_payload(frame.payload, event)?;
        let participant = acting_participant(&self.principal, body.participant.as_deref())?;
        let permit = self.permit()?;
        let state = self.state.clone();
        let principal = self.principal.clone();
        let outbox = self.outbox.clone();
        let to = frame.address();
        tokio::spawn(async move {
            let result =
                service::move_cursor(&state, &principal, &id, &participant, body.seq, kind).await;
            match result {
                Ok(response) => outbox.ok(&to, &response).await,
                Err(e) => outbox.error(&to, &e).await,
            };
            drop(permit);
        });
        Ok(())
    }

    /// `chunk` / `typing`: fanned out to the conversation's other sockets on this node; never
    /// stored.
    async fn ephemeral(
        &self,
        frame: &Frame<'_>,
        id: &ConversationId,
        event: &'static str,
    ) -> Result<(), ApiError> {
        self.principal.may_write()?;
        if let Some(limit) = &self.ephemeral_limit {
            limit.check("", crate::rate::unix_ms())?;
        }
        let max = self.state.config.limits.max_message_bytes;
        if frame.payload.len() > max {
            return Err(ApiError::too_large(format!(
                "{event} payload is larger than {max} bytes"
            )));
        }
        let mut payload: Map<String, Value> = parse_payload(frame.payload, event)?;
        let requested = match payload.remove("participant") {
            Some(Value::String(p)) => Some(p),
            Some(_) => return Err(ApiError::invalid("participant must be a string")),
            None => None,
        };
        let participant = acting_participant(&self.principal, requested.as_deref())?;
        let payload = if event == "chunk" {
            match payload.get("stream_id") {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_STREAM_ID_BYTES => {}
                _ => {
                    return Err(ApiError::invalid(format!(
                        "chunk needs stream_id: a string of 1 to {MAX_STREAM_ID_BYTES} bytes"
                    )))
                }
            }
            if !payload.contains_key("delta") {
                return Err(ApiError::invalid("chunk needs delta"));
            }
            if payload.get("done").is_some_and(|d| !d.is_boolean()) {
                return Err(ApiError::invalid("chunk done must be a boolean"));
            }
            payload.insert("participant".into(), participant.as_str().into());
            Value::Object(payload)
        } else {
            json!({ "participant": participant.as_str() })
        };
        self.state.events.send_ephemeral(
            id,
            EphemeralEvent {
                from_socket: self.socket_id,
                event,
                payload,
            },
        );
        self.outbox.ok(&frame.address(), &json!({})).await;
        Ok(())
    }
}

/// The `gap` push: seqs `from_seq..=to_seq` expired before the client read them, or were
/// reserved by a failover and hold nothing.
#[derive(Serialize)]
struct Gap {
    from_seq: u64,
    to_seq: u64,
}

/// Most rendered bytes one pull of a delivery yields (at least one message): the writer holds
/// what it pulled until it is written, so this bounds a socket's rendered-but-unsent pushes.
const PULL_BYTES: usize = 64 * 1024;

/// Where a delivery stands between two pulls.
struct Delivering {
    gap: Option<Gap>,
    cursor: Cursor,
    /// Read from the cursor, not rendered yet (shared with the ring: no copy).
    pending: std::collections::VecDeque<Arc<ferry_shards::record::Message>>,
    head: String,
    join_ref: Value,
    topic: String,
    /// A join with `echo: false`: its own messages are skipped.
    own_sends: Option<Arc<OwnSends>>,
    failures: u32,
    done: bool,
}

/// The `gap` push (if the join's position has expired), then a `message` push for every message
/// after the cursor (but the join's own, with `echo: false`), in order, for as long as the join
/// lasts; pulled by the socket's writer.
fn deliveries(
    gap: Option<Gap>,
    cursor: Cursor,
    join_ref: Value,
    topic: String,
    own_sends: Option<Arc<OwnSends>>,
) -> impl futures_util::Stream<Item = Vec<String>> + Send {
    let state = Delivering {
        gap,
        cursor,
        pending: Default::default(),
        head: frame::push_head(&join_ref, &topic, "message"),
        join_ref,
        topic,
        own_sends,
        failures: 0,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(gap) = st.gap.take() {
            let push = frame::push(&st.join_ref, &st.topic, "gap", &gap);
            return Some((vec![push], st));
        }
        loop {
            while st.pending.is_empty() {
                match st.cursor.next_batch().await {
                    Ok(batch) => {
                        st.failures = 0;
                        st.pending.extend(batch.messages);
                        if let Some((from_seq, to_seq)) = batch.gap {
                            // Reserved seqs that hold nothing, before the batch's messages.
                            let gap = Gap { from_seq, to_seq };
                            let push = frame::push(&st.join_ref, &st.topic, "gap", &gap);
                            return Some((vec![push], st));
                        }
                    }
                    Err(e) => {
                        st.failures += 1;
                        tracing::warn!(
                            topic = %st.topic,
                            position = st.cursor.position(),
                            failures = st.failures,
                            error = %e.message,
                            "ws delivery read failed"
                        );
                        if st.failures >= MAX_DELIVERY_FAILURES {
                            // The client rejoins from its last seq (phoenix clients do so on their own).
                            metrics::error("delivery");
                            st.done = true;
                            let push = frame::lifecycle(&st.join_ref, &st.topic, frame::ERROR);
                            return Some((vec![push], st));
                        }
                        let wait = e.retry_after_ms.unwrap_or(100).clamp(10, 2000)
                            * u64::from(st.failures);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                }
            }
            let mut pushes = Vec::new();
            let mut bytes = 0;
            while let Some(message) = st.pending.front() {
                if let Some(own) = &st.own_sends {
                    if own.is_own(message.seq).await {
                        st.pending.pop_front();
                        continue;
                    }
                }
                let len = st.head.len() + message.json_len() + 1;
                if !pushes.is_empty() && bytes + len > PULL_BYTES {
                    break;
                }
                bytes += len;
                pushes.push(frame::push_with_head(&st.head, &message.json_parts()));
                st.pending.pop_front();
            }
            if !pushes.is_empty() {
                return Some((pushes, st));
            }
            // Every message read was the join's own: read on.
        }
    })
}

/// Frames of ephemeral events a join holds while its reply is not queued yet.
const EARLY_EVENTS: usize = 64;

/// A joined conversation's end of its ephemeral events ([`EphemeralSink`]): each event becomes a
/// push queued into the socket's outbox without waiting. When the outbox is full the event is
/// missed (counted in `ferry_ws_ephemeral_dropped_total`; messages are never lost this way:
/// they have a log); a `backpressure` notice waits for room instead.
struct JoinSink {
    outbox: Outbox,
    join_ref: Value,
    topic: String,
    /// Pushes that came before the join's reply was queued, in order (`None` once it was).
    early: std::sync::Mutex<Option<Vec<String>>>,
}

impl JoinSink {
    /// The join's reply is queued: what came before it follows it.
    fn ready(&self) {
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        for push in early.take().unwrap_or_default() {
            self.queue(push, false);
        }
    }

    /// Queues `push` now, or holds it while the join's reply is not queued yet (at most
    /// [`EARLY_EVENTS`] events; notices are always held). `wait`: when the outbox is full, wait
    /// for room (a notice) instead of missing it (an event).
    fn offer(&self, push: String, wait: bool) {
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        match early.as_mut() {
            Some(held) if wait || held.len() < EARLY_EVENTS => held.push(push),
            Some(_) => metrics::ephemeral_dropped(),
            None => self.queue(push, wait),
        }
    }

    fn queue(&self, push: String, wait: bool) {
        if let Err(mpsc::error::TrySendError::Full(push)) = self.outbox.try_send(push) {
            if wait {
                let outbox = self.outbox.clone();
                tokio::spawn(async move { outbox.send_outgoing(push).await });
            } else {
                metrics::ephemeral_dropped();
            }
        }
    }
}

impl EphemeralSink for JoinSink {
    fn event(&self, event: &EphemeralEvent) {
        let push = frame::push(&self.join_ref, &self.topic, event.event, &event.payload);
        self.offer(push, false);
    }

    fn slot_moving(&self, retry_after_ms: u64) {
        let push = frame::push(
            &self.join_ref,
            &self.topic,
            "backpressure",
            &json!({"reason": "slot_moving", "retry_after_ms": retry_after_ms}),
        );
        self.offer(push, true);
    }
}

async fn push_inbox(mut watch: InboxWatch, outbox: Outbox, join_ref: Value, topic: String) {
    loop {
        match watch.next_delta().await {
            Ok(entries) if entries.is_empty() => {}
            Ok(entries) => {
                let push = frame::push(
                    &join_ref,
                    &topic,
                    "inbox_delta",
                    &json!({ "conversations": entries }),
                );
                if !outbox.send(push).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e.message, "ws inbox watch failed");
                metrics::error("delivery");
                outbox
                    .send(frame::lifecycle(&join_ref, &topic, frame::ERROR))
                    .await;
                return;
            }
        }
    }
}

/// Submits a topic's appends in arrival order and keeps them in flight together. The
/// [`AppendQueue`] hands each on only after the one before it (to the local actor's mailbox, or
/// in one batch to the owner with whatever else is waiting), so the socket's sends take seqs in
/// the order they were sent, across forwarding and slot moves.
///
/// A pipeline with nothing in flight that gets no job for [`PIPELINE_IDLE`] closes its queue,
/// answers what was queued before the close and ends: a topic that sends now and then holds no
/// task between its sends. The next `send` starts a new pipeline, which hands nothing on before
/// `previous` (the one that ended) has finished, so order holds across the two.
async fn run_appends(
    state: AppState,
    principal: Principal,
    id: ConversationId,
    mut jobs: mpsc::Receiver<Box<AppendJob>>,
    outbox: Outbox,
    previous: Option<JoinHandle<()>>,
) {
    let _gauge = Counted::open(metrics::APPEND_PIPELINES);
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let mut queue = AppendQueue::new(state, principal, id);
    // Handed on, oldest first. One conversation's appends become durable in the order they were
    // handed on, so waiting on the oldest only is enough: whatever became durable with it is
    // answered right after, without a waker or a task of its own.
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    // A topic that sends now and then finds its pipeline idle at every send: going idle only
    // touches the clock.
    let (mut idle_clock, idle_timer) = IdleClock::start(PIPELINE_IDLE);
    tokio::pin!(idle_timer);
    loop {
        let idle = in_flight.is_empty();
        // Biased (no random pick per turn): what became durable is answered first, which also
        // frees the socket's in-flight permits; new jobs are taken when nothing is ready.
        tokio::select! {
            biased;
            // Cancel-safe: the oldest stays in the queue until its outcome is taken.
            result = std::future::poll_fn(|cx| oldest_outcome(&mut in_flight, cx)), if !idle => {
                if let Some(done) = in_flight.pop_front() {
                    done.answer(&outbox, result).await;
                }
                if in_flight.is_empty() {
                    idle_clock.touch();
                }
            }
            job = jobs.recv() => {
                let Some(job) = job else { break };
                let mut batch = vec![job];
                while let Ok(job) = jobs.try_recv() {
                    batch.push(job);
                }
                let mut requests = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                for job in batch {
                    let AppendJob { to, request, _permit: permit, _awaited: awaited, own } = *job;
                    requests.push(request);
                    replies.push((to, permit, awaited, own));
                }
                let pending = match queue.submit_batch(&mut requests).await {
                    Ok(pending) => pending,
                    Err(e) => replies.iter().map(|_| Pending::Done(Err(e.clone()))).collect(),
                };
                in_flight.extend(replies.into_iter().zip(pending).map(
                    |((to, permit, awaited, own), pending)| InFlight {
                        pending,
                        to,
                        own,
                        _permit: permit,
                        _awaited: awaited,
                    },
                ));
            }
            // Jobs queued before the close are still received; then `recv` ends the loop.
            () = &mut idle_timer, if idle => {
                if idle_clock.expired(idle_timer.as_mut()) {
                    jobs.close();
                }
            }
        }
    }
    while let Some(mut done) = in_flight.pop_front() {
        let result = std::future::poll_fn(|cx| done.pending.poll_outcome(cx)).await;
        done.answer(&outbox, result).await;
    }
}

/// An append handed on, waiting to be answered.
struct InFlight {
    pending: Pending,
    to: Address,
    own: Option<SendTicket>,
    /// Held until the reply is queued (see [`AppendJob`]).
    _permit: OwnedSemaphorePermit,
    _awaited: AwaitedReply,
}

impl InFlight {
    async fn answer(self, outbox: &Outbox, result: Result<AppendOutcome, ApiError>) {
        // Before the reply: the delivery may be waiting to know this seq.
        if let Some(own) = self.own {
            own.resolve(result.as_ref().ok().filter(|o| !o.deduped).map(|o| o.seq));
        }
        reply_to_send(outbox, &self.to, result).await;
    }
}

fn oldest_outcome(
    in_flight: &mut VecDeque<InFlight>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<AppendOutcome, ApiError>> {
    match in_flight.front_mut() {
        Some(oldest) => oldest.pending.poll_outcome(cx),
        None => std::task::Poll::Pending,
    }
}

async fn reply_to_send(outbox: &Outbox, to: &Address, result: Result<AppendOutcome, ApiError>) {
    match result {
        Ok(outcome) => {
            outbox
                .send(frame::reply_ok_json(
                    to,
                    &crate::http::messages::appended_json(None, &outcome),
                ))
                .await
        }
        Err(e) => outbox.error(to, &e).await,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_to_validated_ids() {
        assert!(matches!(
            parse_topic("conversation:c-1.x@y"),
            Ok(Topic::Conversation(id)) if id.as_str() == "c-1.x@y"
        ));
        assert!(matches!(
            parse_topic("inbox:alice"),
            Ok(Topic::Inbox(p)) if p.as_str() == "alice"
        ));
        assert_eq!(
            parse_topic("conversation:").err().map(|e| e.code.as_str()),
            Some("invalid")
        );
        assert_eq!(
            parse_topic("conversation:bad id")
                .err()
                .map(|e| e.code.as_str()),
            Some("invalid")
        );
        assert_eq!(
            parse_topic("room:lobby").err().map(|e| e.code.as_str()),
            Some("not_found")
        );
    }

    #[test]
    fn api_keys_must_name_the_participant_users_are_themselves() {
        let key = Principal::node();
        assert_eq!(
            acting_participant(&key, None).unwrap_err().code.as_str(),
            "invalid"
        );
        assert_eq!(
            acting_participant(&key, Some("bot")).unwrap().as_str(),
            "bot"
        );
        let user = Principal::User {
            sub: ParticipantId::parse("alice").unwrap(),
            expires_at_ms: i64::MAX,
        };
        assert_eq!(acting_participant(&user, None).unwrap().as_str(), "alice");
        assert_eq!(
            acting_participant(&user, Some("mallory")).unwrap().as_str(),
            "alice"
        );
    }

    #[test]
    fn join_params_take_after_seq_or_its_alias() {
        let p: Option<JoinParams> = serde_json::from_str(r#"{"last_seq": 7, "x": 1}"#).unwrap();
        let p = p.unwrap();
        assert_eq!(p.after_seq.or(p.last_seq), Some(7));
        let p: Option<JoinParams> = serde_json::from_str("null").unwrap();
        assert!(p.is_none());
        assert!(serde_json::from_str::<Option<JoinParams>>(r#"{"after_seq": -1}"#).is_err());
    }
}
