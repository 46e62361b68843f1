//! A WebSocket subscriber of one conversation, for `fanout` and `resume`. It feeds every pushed
//! seq to its [`SeqChecker`] and records scheduled-send-to-delivery latency (the content's `i`
//! names the send, and the shared pacer says when that send was scheduled).
//!
//! With a reconnect schedule it drops its socket at the given times (abruptly, as a network
//! would) and rejoins with `after_seq` = the last seq it saw in order. It stops once it has seen
//! its conversation's final seq (published on `finals` after the traffic), or when the drain
//! timeout after that passes; it never reconnects after the final seqs are known, so the drain
//! measures catching up, not churn.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ferry::{GapPush, Incoming, PhxSocket, PushedMessage};
use crate::gapcheck::{SeqChecker, Violation, ViolationCounts};
use crate::pacer::Pacer;
use crate::progress::Live;
use crate::stats::Recorder;

/// After a failed reconnect, wait this long before the next attempt.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(20);

pub struct Spec {
    pub conv: usize,
    pub topic: String,
    pub ws_url: String,
    pub heartbeat: Duration,
    /// `(first, every)`: when to drop the socket the first time, and then how often.
    pub reconnect: Option<(Duration, Duration)>,
    pub drain: Duration,
}

pub struct Outcome {
    pub delivery: Recorder,
    pub reconnect: Recorder,
    pub reconnects: u64,
    pub counts: ViolationCounts,
    pub violations: Vec<Violation>,
    pub delivered: u64,
    pub reached_final: bool,
    pub final_seq: u64,
}

/// Connects and joins from the beginning (before the clock starts).
pub async fn connect(spec: &Spec, after_seq: u64) -> Result<PhxSocket, crate::LoadError> {
    let mut socket = PhxSocket::connect(&spec.ws_url, spec.heartbeat).await?;
    socket
        .join("1", &spec.topic, &format!(r#"{{"after_seq":{after_seq}}}"#))
        .await?;
    Ok(socket)
}

pub async fn run(
    spec: Spec,
    mut socket: Option<PhxSocket>,
    start: Instant,
    pacer: Pacer,
    mut finals: watch::Receiver<Option<Arc<Vec<u64>>>>,
    live: Arc<Live>,
) -> Outcome {
    let mut checker = SeqChecker::new(1);
    let mut delivery = Recorder::new();
    let mut reconnect = Recorder::new();
    let mut reconnects = 0;
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
            match connect(&spec, checker.last_seen()).await {
                Ok(s) => {
                    reconnects += 1;
                    reconnect.record_ok(began.saturating_duration_since(start), began.elapsed());
                    socket = Some(s);
                }
                Err(e) => {
                    reconnect.record_error(began.saturating_duration_since(start), e.to_string());
                    tokio::time::sleep(RECONNECT_BACKOFF).await;
                }
            }
            continue;
        };
        tokio::select! {
            incoming = sock.next() => match incoming {
                Ok(Incoming::Frame(f)) if f.event == "message" => {
                    match serde_json::from_str::<PushedMessage>(f.payload.get()) {
                        Ok(m) => {
                            checker.observe(m.seq);
                            Live::bump(&live.delivered);
                            if let Some(i) = m.content.i {
                                let now = Instant::now();
                                let scheduled = start + pacer.offset(i);
                                delivery.record_ok(
                                    now.saturating_duration_since(start),
                                    now.saturating_duration_since(scheduled),
                                );
                            }
                        }
                        Err(e) => delivery.record_error(start.elapsed(), format!("bad message push: {e}")),
                    }
                }
                Ok(Incoming::Frame(f)) if f.event == "gap" => {
                    if let Ok(g) = serde_json::from_str::<GapPush>(f.payload.get()) {
                        checker.observe_server_gap(g.from_seq, g.to_seq);
                    }
                }
                Ok(Incoming::Frame(f)) if f.event == "phx_error" || f.event == "phx_close" => {
                    delivery.record_error(start.elapsed(), format!("{} on {}", f.event, spec.topic));
                    socket = None;
                }
                Ok(Incoming::Frame(_)) => {}
                Ok(Incoming::Closed(why)) => {
                    delivery.record_error(start.elapsed(), format!("socket lost: {why}"));
                    socket = None;
                }
                Err(e) => {
                    delivery.record_error(start.elapsed(), format!("socket failed: {e}"));
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
        counts,
        violations,
        delivered,
        reached_final,
        final_seq,
    }
}
