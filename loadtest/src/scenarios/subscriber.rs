//! A WebSocket subscriber of one conversation, for `fanout`, `resume` and `cluster`. It feeds
//! every pushed seq to its [`SeqChecker`] and records scheduled-send-to-delivery latency (the
//! content's `i` names the send, and the shared pacer says when that send was scheduled). It
//! counts the `backpressure` pushes a slot move sends.
//!
//! With a reconnect schedule it drops its socket at the given times (abruptly, as a network
//! would) and rejoins with `after_seq` = the last seq it saw in order. A socket it loses any other
//! way is rejoined the same way: one the server closed with 1001 (going away: the node is shutting
//! down) on the next node of [`Spec::ws_urls`], not counted as an error; any other loss first on
//! the same node, which judges it: if the node takes the subscriber back, the socket was cut
//! (a delivery error: a node that stays up, through slot moves too, must not cut sockets); if it
//! refuses, it is shutting down (its reset can destroy the 1001 frame), and the loss counts as
//! going away. A failed reconnect moves on to the next node; after [`Spec::give_up`] of failures
//! in a row the subscriber stops (and ends short of the final seq). It stops once it has seen its conversation's final seq
//! (published on `finals` after the traffic), or when the drain timeout after that passes; it
//! never drops its socket on schedule after the final seqs are known, so the drain measures
//! catching up, not churn.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ferry::{Frame, PhxSocket, PushFields, PushView, Text};
use crate::gapcheck::{SeqChecker, Violation, ViolationCounts};
use crate::pacer::Pacer;
use crate::progress::Live;
use crate::stats::Recorder;

/// After a failed reconnect, wait this long before the next attempt.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(20);

pub struct Spec {
    pub conv: usize,
    pub topic: String,
    /// Socket URLs of the nodes to use: its own node first, then the others in the order to try
    /// when a node goes away or refuses (see [`rotated`]).
    pub ws_urls: Vec<String>,
    pub heartbeat: Duration,
    /// `(first, every)`: when to drop the socket the first time, and then how often.
    pub reconnect: Option<(Duration, Duration)>,
    pub drain: Duration,
    /// The longest reconnect attempts may keep failing in a row before the subscriber gives up.
    pub give_up: Duration,
    /// `gap` pushes name seqs a failover reserved (see `SeqChecker::allowing_reserved_gaps`).
    pub reserved_gaps: bool,
}

/// `urls` starting at `first` (mod its length) and wrapping around: client `first`'s own node,
/// then the ones to fall back to, round robin.
pub fn rotated(urls: &[String], first: usize) -> Vec<String> {
    let n = urls.len().max(1);
    (0..urls.len())
        .map(|i| urls[(first + i) % n].clone())
        .collect()
}

pub struct Outcome {
    pub delivery: Recorder,
    pub reconnect: Recorder,
    pub reconnects: u64,
    /// Sockets the server closed with 1001 (going away), each followed by a reconnect.
    pub going_away: u64,
    pub counts: ViolationCounts,
    pub violations: Vec<Violation>,
    pub delivered: u64,
    pub reached_final: bool,
    pub final_seq: u64,
    /// `backpressure` pushes received (one per move of the conversation's slot).
    pub backpressure: u64,
}

/// A subscriber's recorders, made before the clock starts (see [`Recorder::for_run`]).
pub struct Recorders {
    delivery: Recorder,
    reconnect: Recorder,
}

impl Recorders {
    pub fn for_run(seconds: f64) -> Recorders {
        Recorders {
            delivery: Recorder::for_run(seconds),
            reconnect: Recorder::new(),
        }
    }
}

/// Connects to its own node and joins from the beginning (before the clock starts).
pub async fn connect(spec: &Spec) -> Result<PhxSocket, crate::LoadError> {
    connect_to(spec, 0, 0).await
}

/// Connects and joins every spec's socket, [`super::SETUP_CONCURRENCY`] at a time, in the specs'
/// order. One at a time, 10,000 subscribers took long enough that the first ones, not yet read
/// (so sending no heartbeats), passed the server's 60 s idle limit before the run began.
pub async fn connect_all(specs: &[Spec]) -> Result<Vec<PhxSocket>, crate::LoadError> {
    stream::iter(specs)
        .map(connect)
        .buffered(super::SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// Connects to node `at` of the spec's URLs and joins with `after_seq`.
async fn connect_to(spec: &Spec, at: usize, after_seq: u64) -> Result<PhxSocket, crate::LoadError> {
    let url = &spec.ws_urls[at % spec.ws_urls.len()];
    let mut socket = PhxSocket::connect(url, spec.heartbeat).await?;
    socket
        .join("1", &spec.topic, &format!(r#"{{"after_seq":{after_seq}}}"#))
        .await?;
    Ok(socket)
}

/// Starts one [`run`] task per subscriber (spec and its joined socket), all against the same
/// clock, pacer and final seqs.
pub fn spawn_all(
    subscribers: impl IntoIterator<Item = (Spec, (PhxSocket, Recorders))>,
    start: Instant,
    pacer: Pacer,
    finals: &watch::Receiver<Option<Arc<Vec<u64>>>>,
    live: &Arc<Live>,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    subscribers
        .into_iter()
        .map(|(spec, (socket, recorders))| {
            tokio::spawn(run(
                spec,
                Some(socket),
                start,
                pacer,
                finals.clone(),
                live.clone(),
                recorders,
            ))
        })
        .collect()
}

pub async fn run(
    spec: Spec,
    mut socket: Option<PhxSocket>,
    start: Instant,
    pacer: Pacer,
    mut finals: watch::Receiver<Option<Arc<Vec<u64>>>>,
    live: Arc<Live>,
    recorders: Recorders,
) -> Outcome {
    let mut checker = SeqChecker::new(1).allowing_reserved_gaps(spec.reserved_gaps);
    let Recorders {
        mut delivery,
        mut reconnect,
    } = recorders;
    let mut reconnects = 0;
    let mut going_away = 0;
    // The node (index into `ws_urls`) the socket is on, or goes to next.
    let mut at = 0;
    // Since when reconnecting has failed without a break.
    let mut failing_since: Option<Instant> = None;
    // A loss without a 1001, judged by whether its node takes the subscriber back.
    let mut unjudged: Option<String> = None;
    let mut backpressure = 0;
    let mut final_seq: Option<u64> = None;
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut next_drop = spec.reconnect.map_or(far, |(first, _)| start + first);
    let mut deadline = far;
    // One timer for the whole run, moved when the schedule moves: a fresh `sleep_until` per
    // received frame would register and cancel a timer for every message.
    let drop_timer = tokio::time::sleep_until(next_drop);
    tokio::pin!(drop_timer);

    loop {
        if let Some(f) = final_seq {
            if checker.last_seen() >= f || Instant::now() >= deadline {
                break;
            }
        }
        let Some(sock) = socket.as_mut() else {
            // Reconnect (after a scheduled drop or a lost connection) until it works or the
            // drain deadline passes.
            if Instant::now() >= deadline {
                break;
            }
            let began = Instant::now();
            let failing = *failing_since.get_or_insert(began);
            let attempt = tokio::time::timeout_at(
                failing + spec.give_up,
                connect_to(&spec, at, checker.last_seen()),
            )
            .await
            .unwrap_or_else(|_| Err(crate::LoadError::Setup("reconnect timed out".into())));
            match attempt {
                Ok(s) => {
                    if let Some(lost) = unjudged.take() {
                        // Its node is up and took the subscriber back: the socket was cut.
                        delivery.record_error(began.saturating_duration_since(start), lost);
                    }
                    reconnects += 1;
                    failing_since = None;
                    reconnect.record_ok(began.saturating_duration_since(start), began.elapsed());
                    socket = Some(s);
                }
                Err(e) => {
                    reconnect.record_error(began.saturating_duration_since(start), e.to_string());
                    if unjudged.take().is_some() {
                        // Its node refuses: it is going away.
                        going_away += 1;
                    }
                    if Instant::now() >= failing + spec.give_up {
                        delivery.record_error(
                            start.elapsed(),
                            format!(
                                "{}: no node took the subscriber back within {:?}: {e}",
                                spec.topic, spec.give_up
                            ),
                        );
                        break;
                    }
                    // This node refuses: try the next one after a short pause.
                    at = (at + 1) % spec.ws_urls.len();
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                }
            }
            continue;
        };
        tokio::select! {
            incoming = sock.next_text() => match incoming {
                Ok(Text::Frame(text)) => match Seen::of(text.as_str()) {
                    Seen::Message { seq, i } => {
                        checker.observe(seq);
                        Live::bump(&live.delivered);
                        if let Some(i) = i {
                            let now = Instant::now();
                            let scheduled = start + pacer.offset(i);
                            delivery.record_ok(
                                now.saturating_duration_since(start),
                                now.saturating_duration_since(scheduled),
                            );
                        }
                    }
                    Seen::Gap { from_seq, to_seq } => checker.observe_server_gap(from_seq, to_seq),
                    Seen::Backpressure => backpressure += 1,
                    Seen::Lost(event) => {
                        delivery.record_error(start.elapsed(), format!("{event} on {}", spec.topic));
                        socket = None;
                    }
                    Seen::BadPush(e) => delivery.record_error(start.elapsed(), e),
                    Seen::BadFrame(e) => {
                        delivery.record_error(start.elapsed(), format!("socket failed: {e}"));
                        socket = None;
                    }
                    Seen::Other => {}
                },
                Ok(Text::Closed(closed)) if closed.going_away => {
                    // The node shuts down: resume on the next one.
                    going_away += 1;
                    at = (at + 1) % spec.ws_urls.len();
                    socket = None;
                }
                Ok(Text::Closed(closed)) => {
                    unjudged = Some(format!("{}: socket lost: {closed}", spec.topic));
                    socket = None;
                }
                Err(e) => {
                    unjudged = Some(format!("{}: socket failed: {e}", spec.topic));
                    socket = None;
                }
            },
            _ = &mut drop_timer, if final_seq.is_none() => {
                // Dropped without a close frame: the server sees the connection vanish.
                socket = None;
                next_drop = match spec.reconnect {
                    Some((_, every)) => next_drop + every,
                    None => far,
                };
                drop_timer.as_mut().reset(next_drop);
            }
            changed = finals.changed(), if final_seq.is_none() => {
                match changed {
                    Ok(()) => {
                        if let Some(all) = finals.borrow_and_update().as_ref() {
                            final_seq = Some(all[spec.conv]);
                            deadline = Instant::now() + spec.drain;
                        }
                    }
                    // The run gave up before publishing finals: stop now.
                    Err(_) => break,
                }
            }
            _ = tokio::time::sleep_until(deadline), if final_seq.is_some() => break,
        }
    }
    if let Some(s) = socket {
        s.close().await;
    }
    let final_seq = final_seq.unwrap_or(0);
    let delivered = checker.delivered();
    let reached_final = checker.last_seen() >= final_seq;
    let (counts, violations) = checker.finish(final_seq);
    Outcome {
        delivery,
        reconnect,
        reconnects,
        going_away,
        counts,
        violations,
        delivered,
        reached_final,
        final_seq,
        backpressure,
    }
}

/// What one frame means to a subscriber.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Message {
        seq: u64,
        i: Option<u64>,
    },
    Gap {
        from_seq: u64,
        to_seq: u64,
    },
    /// The conversation's slot is moving.
    Backpressure,
    /// `phx_error` or `phx_close`: the join is gone.
    Lost(String),
    /// A `message` push without a readable seq.
    BadPush(String),
    /// Not a Phoenix frame at all.
    BadFrame(String),
    Other,
}

impl Seen {
    /// Decodes a frame in one borrowed pass ([`PushView`]); what that cannot read is decoded
    /// again the general way, so an unusual frame is judged the same either way.
    fn of(text: &str) -> Seen {
        if let Some(view) = PushView::parse(text) {
            return Seen::from_fields(view.event(), view.fields());
        }
        let frame = match Frame::parse(text) {
            Ok(frame) => frame,
            Err(e) => return Seen::BadFrame(e),
        };
        match serde_json::from_str::<PushFields>(frame.payload.get()) {
            Ok(fields) => Seen::from_fields(&frame.event, &fields),
            Err(e) if frame.event == "message" => Seen::BadPush(format!("bad message push: {e}")),
            Err(_) => Seen::from_fields(&frame.event, &PushFields::default()),
        }
    }

    fn from_fields(event: &str, fields: &PushFields) -> Seen {
        match event {
            "message" => match fields.seq {
                Some(seq) => Seen::Message {
                    seq,
                    i: fields.content.i,
                },
                None => Seen::BadPush("message push without seq".into()),
            },
            "gap" => match (fields.from_seq, fields.to_seq) {
                (Some(from_seq), Some(to_seq)) => Seen::Gap { from_seq, to_seq },
                _ => Seen::Other,
            },
            "backpressure" => Seen::Backpressure,
            "phx_error" | "phx_close" => Seen::Lost(event.to_owned()),
            _ => Seen::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{rotated, Seen};

    #[test]
    fn nodes_are_tried_from_the_clients_own_round_robin() {
        let urls: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(rotated(&urls, 0), ["a", "b", "c"]);
        assert_eq!(rotated(&urls, 4), ["b", "c", "a"]);
        assert!(rotated(&[], 3).is_empty());
    }

    #[test]
    fn frames_decode_the_same_through_the_fast_and_the_general_path() {
        let message = r#"["1",null,"conversation:c-0","message",{"conversation_id":"c-0","seq":7,"id":"x","sender":"loadtest","kind":"text","content":{"i":41,"pad":"a\"b"},"metadata":{},"created_at":"t"}]"#;
        assert_eq!(
            Seen::of(message),
            Seen::Message {
                seq: 7,
                i: Some(41)
            }
        );
        // An escape in the topic changes nothing.
        let escaped = r#"["1",null,"conversation:c\u002d0","message",{"seq":8,"content":{"i":1}}]"#;
        assert_eq!(Seen::of(escaped), Seen::Message { seq: 8, i: Some(1) });
        // Someone else's content: the seq still counts, there is no send index.
        let foreign =
            r#"["1",null,"conversation:c-0","message",{"seq":9,"content":{"text":"hi"}}]"#;
        assert_eq!(Seen::of(foreign), Seen::Message { seq: 9, i: None });
        let gap = r#"["1",null,"conversation:c-0","gap",{"from_seq":1,"to_seq":5}]"#;
        assert_eq!(
            Seen::of(gap),
            Seen::Gap {
                from_seq: 1,
                to_seq: 5
            }
        );
        let moving = r#"["1",null,"conversation:c-0","backpressure",{"reason":"slot_moving","retry_after_ms":1000}]"#;
        assert_eq!(Seen::of(moving), Seen::Backpressure);
        let close = r#"["1","2","conversation:c-0","phx_close",{}]"#;
        assert_eq!(Seen::of(close), Seen::Lost("phx_close".into()));
        let reply = r#"[null,"3","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(Seen::of(reply), Seen::Other);
        assert!(matches!(
            Seen::of(r#"["1",null,"conversation:c-0","message",{"seq":"x"}]"#),
            Seen::BadPush(_)
        ));
        assert!(matches!(
            Seen::of(r#"["1",null,"conversation:c-0","message",{"content":"text"}]"#),
            Seen::BadPush(_)
        ));
        assert!(matches!(Seen::of("{not a frame"), Seen::BadFrame(_)));
    }
}
