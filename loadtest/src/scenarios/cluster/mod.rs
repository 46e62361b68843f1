//! `cluster`: traffic over every node of a Ferry cluster while the cluster changes under it, and
//! the zero-gap check of everything afterwards.
//!
//! - `--connections` WebSocket [`writer`]s, spread over the targets round robin, append at
//!   `--rate` with idempotency keys and retry `try_again` with the same key;
//! - `--subscribers` sockets per conversation, also spread over the targets, check what they
//!   receive with the subscriber's [`SeqChecker`](crate::gapcheck::SeqChecker);
//! - meanwhile [`disrupt`] drains a node and brings it back, or rebalances, through
//!   `--admin-targets`, and times each step.
//!
//! Writers and subscribers outlive their node: a node that shuts down (closes its sockets with
//! 1001, as a rolling restart does) sends them to the next target, where they rejoin and carry
//! on, writers re-sending what was unanswered under the same keys (see [`writer`]), within
//! `--disrupt-timeout`. The tool never restarts a node itself; an operator's script does
//! (`ops/bench-cluster.sh`) while this runs with `--disrupt none`.
//!
//! After the traffic (and the disruption) the conversations' final seqs are read, the
//! subscribers catch up, and every conversation's log is read back from every target and checked
//! against the acknowledgements ([`AckLog`]). Any violation, any failed append, a subscriber
//! that missed or repeated anything, a socket lost other than by its node going away, or a
//! disruption that did not finish fails the run.

pub mod disrupt;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use self::writer::{Writer, WriterOutcome};
use super::subscriber::{self, Recorders, Spec};
use super::Endpoint;
use crate::admin::AdminClient;
use crate::append::{dispatch, Names, Payload};
use crate::cli::{Args, Disrupt, Targets, Transport};
use crate::cpu::CpuWindow;
use crate::gapcheck::{AckLog, LogRead, Stored, ViolationCounts};
use crate::pacer::Pacer;
use crate::progress::{Live, Progress};
use crate::report::{ClusterReport, DeliveryReport, DisruptionReport, LogCheckReport, Report};
use crate::stats::Recorder;
use crate::LoadError;

/// Page size of the read-back (the API's maximum).
const READ_PAGE: usize = 1000;
/// Conversations read back at once (per target).
const READ_CONCURRENCY: usize = 16;
/// Violation examples kept for the report.
const MAX_EXAMPLES: usize = 20;
/// Each admin request gives up after this.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: &Args, targets: &Targets) -> Result<Report, LoadError> {
    let endpoints = super::ferry_endpoints(args, targets)?;
    let admin = if args.admin_targets.is_empty() {
        None
    } else {
        Some(AdminClient::new(
            &args.admin_targets,
            args.admin_key(),
            ADMIN_TIMEOUT,
        )?)
    };
    let names = super::names(args, targets);
    super::create_conversations(&endpoints[0].http, &names).await?;
    let heartbeat = Duration::from_secs_f64(args.heartbeat_secs);
    let drain = Duration::from_secs_f64(args.drain_timeout);
    // A node going away (a restart) takes at most this long to be replaced by another.
    let reconnect_timeout = Duration::from_secs_f64(args.disrupt_timeout);
    let ws_urls: Vec<String> = endpoints.iter().map(|e| e.ws_url.clone()).collect();

    // Subscribers first, so they are joined before anything is written.
    let mut specs = Vec::new();
    for c in 0..args.conversations {
        for s in 0..args.subscribers {
            let k = c * args.subscribers + s;
            let spec = Spec {
                conv: c,
                topic: format!("conversation:{}", names.conversations[c]),
                ws_urls: subscriber::rotated(&ws_urls, k),
                heartbeat,
                reconnect: None,
                drain,
                give_up: reconnect_timeout,
                reserved_gaps: args.reserved_gaps,
            };
            specs.push(spec);
        }
    }
    let sockets: Vec<_> = subscriber::connect_all(&specs)
        .await?
        .into_iter()
        .map(|socket| (socket, Recorders::for_run(args.duration)))
        .collect();
    let writers_count = args.connections.min(args.conversations);
    let mut writers = Vec::new();
    for w in 0..writers_count {
        let conversations = names
            .conversations
            .iter()
            .enumerate()
            .filter(|(c, _)| c % writers_count == w)
            .map(|(c, id)| (c, id.clone()))
            .collect();
        let settings = writer::Settings {
            heartbeat,
            payload: Payload::new(args.payload),
            run: names.run.clone(),
            move_hold: Duration::from_secs_f64(args.move_hold),
            drain,
            reconnect_timeout,
        };
        writers.push(
            Writer::connect(subscriber::rotated(&ws_urls, w), conversations, settings).await?,
        );
    }

    let pacer = Pacer::new(args.rate, args.duration);
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), pacer.total(), !args.no_progress);
    let (finals_tx, finals_rx) = watch::channel(None);
    let cpu = CpuWindow::start(args.server_pid);
    let start = Instant::now();
    let subs = subscriber::spawn_all(
        specs.into_iter().zip(sockets),
        start,
        pacer,
        &finals_rx,
        &live,
    );
    drop(finals_rx);
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for w in writers {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        handles.push(tokio::spawn(w.run(rx, start, live.clone(), args.duration)));
    }
    let disruption = admin.map(|admin| {
        let plan = disrupt::Plan {
            kind: args.disrupt,
            node: args.drain_node.clone(),
            at: Duration::from_secs_f64(args.disrupt_at.unwrap_or(args.duration / 5.0)),
            timeout: Duration::from_secs_f64(args.disrupt_timeout),
        };
        tokio::spawn(disrupt::run(admin, plan, start))
    });

    let skipped = dispatch(
        pacer,
        start,
        args.max_outstanding,
        args.conversations,
        &senders,
        true,
        &live,
    )
    .await;
    drop(senders);
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(
            h.await
                .map_err(|e| LoadError::Setup(format!("writer failed: {e}")))?,
        );
    }
    let cpu = cpu.finish();
    let published_s = start.elapsed().as_secs_f64();
    let disruption = match disruption {
        Some(h) => h
            .await
            .map_err(|e| LoadError::Setup(format!("disruption task failed: {e}")))?,
        None => DisruptionReport::default(),
    };

    let finals = super::final_seqs(&endpoints[0].http, &names).await?;
    let _ = finals_tx.send(Some(finals.clone()));
    let mut subscribed = Vec::new();
    for r in join_all(subs).await {
        subscribed.push(r.map_err(|e| LoadError::Setup(format!("subscriber task failed: {e}")))?);
    }
    progress.finish();

    // The acknowledgements, per conversation.
    let mut logs: Vec<AckLog> = (0..args.conversations).map(|_| AckLog::new()).collect();
    for o in &outcomes {
        for &(conv, ack) in &o.acked {
            logs[conv].record(ack);
        }
    }
    let check = check_logs(&endpoints, &names, &logs, &finals, args.reserved_gaps).await;

    let mut all = vec![skipped];
    all.extend(outcomes.iter().map(|o| o.acks.clone()));
    let acks = Recorder::merged(&all);
    let mut report = Report::new(args, targets, &names, pacer.total(), &acks, published_s);
    report.transport = Transport::Ws;
    report.cpu = Some(cpu);
    add_delivery(&mut report, args, &names, &subscribed);
    if check.violations.total() > 0 {
        report.failures.push(format!(
            "log check: {} violations ({})",
            check.violations.total(),
            check.violations.describe()
        ));
        report.failures.extend(check.examples.iter().cloned());
    }
    let cuts: u64 = outcomes.iter().map(|o| o.cut).sum();
    if cuts > 0 {
        report.failures.push(format!(
            "{cuts} writer sockets cut (closed other than by a node going away)"
        ));
        report.failures.extend(
            outcomes
                .iter()
                .flat_map(|o| o.losses.iter())
                .filter(|l| l.contains(" cut: "))
                .take(4)
                .cloned(),
        );
    }
    if let Some(e) = &disruption.error {
        report.failures.push(format!("disruption: {e}"));
    }
    report.cluster = Some(cluster_report(
        args,
        &outcomes,
        &subscribed,
        disruption,
        check,
    ));
    Ok(report)
}

/// The subscribers' side, judged as `fanout` judges it: every seq `1..final` exactly once, in
/// order, on every subscriber, and no socket lost.
fn add_delivery(report: &mut Report, args: &Args, names: &Names, subs: &[subscriber::Outcome]) {
    let delivery = Recorder::merged(subs.iter().map(|o| &o.delivery));
    let mut counts = ViolationCounts::default();
    let mut examples = Vec::new();
    for (k, o) in subs.iter().enumerate() {
        counts.add(&o.counts);
        for v in &o.violations {
            if examples.len() < MAX_EXAMPLES {
                examples.push(format!(
                    "subscriber {k} of {}: {v}",
                    names.conversations[k / args.subscribers.max(1)]
                ));
            }
        }
    }
    // Seqs a failover reserved that a `gap` push skipped are not expected (`--reserved-gaps`).
    let expected: u64 = subs
        .iter()
        .map(|o| o.final_seq)
        .sum::<u64>()
        .saturating_sub(counts.reserved_seqs);
    let delivered: u64 = subs.iter().map(|o| o.delivered).sum();
    if counts.total() > 0 {
        report.failures.push(format!(
            "subscribers: {} violations ({})",
            counts.total(),
            counts.describe()
        ));
        report.failures.extend(examples);
    }
    if delivered != expected {
        report.failures.push(format!(
            "subscribers: delivered {delivered} messages, expected {expected}"
        ));
    }
    if delivery.errors > 0 {
        report.failures.push(format!(
            "{} subscriber socket errors (only a node going away may close a socket)",
            delivery.errors
        ));
    }
    report
        .error_samples
        .extend(delivery.error_samples.iter().take(4).cloned());
    report.delivery = Some(DeliveryReport {
        subscribers: subs.len(),
        expected,
        delivered,
        latency: delivery.summary(),
        violations: Some(counts),
    });
}

fn cluster_report(
    args: &Args,
    writers: &[WriterOutcome],
    subs: &[subscriber::Outcome],
    disruption: DisruptionReport,
    check: LogCheckReport,
) -> ClusterReport {
    let moving = Recorder::merged(writers.iter().map(|o| &o.moving));
    let reconnect = Recorder::merged(writers.iter().map(|o| &o.reconnect));
    let mut try_again_by_detail = std::collections::BTreeMap::new();
    for o in writers {
        for (detail, n) in &o.try_again_by_detail {
            *try_again_by_detail.entry(detail.clone()).or_default() += n;
        }
    }
    ClusterReport {
        disrupt: if args.admin_targets.is_empty() {
            Disrupt::None
        } else {
            args.disrupt
        },
        writers: writers.len(),
        subscribers: subs.len(),
        moving_appends: moving.ok,
        moving_ack_latency: moving.summary(),
        try_again_by_detail,
        retries: writers.iter().map(|o| o.retries).sum(),
        deduped: writers.iter().map(|o| o.deduped).sum(),
        backpressure_writers: writers.iter().map(|o| o.backpressure).sum(),
        backpressure_subscribers: subs.iter().map(|o| o.backpressure).sum(),
        subscriber_socket_losses: subs.iter().map(|o| o.delivery.errors).sum(),
        subscriber_going_away: subs.iter().map(|o| o.going_away).sum(),
        subscriber_reconnects: subs.iter().map(|o| o.reconnects).sum(),
        writer_reconnects: writers.iter().map(|o| o.reconnects).sum(),
        writer_going_away: writers.iter().map(|o| o.going_away).sum(),
        writer_socket_cuts: writers.iter().map(|o| o.cut).sum(),
        writer_reconnect_latency: reconnect.summary(),
        resent: writers.iter().map(|o| o.resent).sum(),
        writer_losses: writers
            .iter()
            .flat_map(|o| o.losses.iter().cloned())
            .take(MAX_EXAMPLES)
            .collect(),
        disruption,
        check,
    }
}

/// Reads every conversation's log back from every target and checks it against its
/// acknowledgements and final seq (with `reserved_gaps`, the pages' `gaps` are seqs a failover
/// reserved).
async fn check_logs(
    endpoints: &[Endpoint],
    names: &Names,
    logs: &[AckLog],
    finals: &[u64],
    reserved_gaps: bool,
) -> LogCheckReport {
    let mut report = LogCheckReport {
        conversations: logs.len(),
        targets_read: endpoints.len(),
        acked_keys: logs.iter().map(AckLog::acked).sum(),
        final_seqs: finals.iter().sum(),
        ..LogCheckReport::default()
    };
    for (c, log) in logs.iter().enumerate() {
        let (counts, kept) = log.check_acks();
        report.violations.add(&counts);
        for v in kept {
            if report.examples.len() < MAX_EXAMPLES {
                report
                    .examples
                    .push(format!("acks of {}: {v}", names.conversations[c]));
            }
        }
    }
    let reads = stream::iter(
        endpoints
            .iter()
            .flat_map(|e| (0..logs.len()).map(move |c| (e, c))),
    )
    .map(|(endpoint, c)| async move {
        let read = read_log(endpoint, &names.conversations[c], finals[c]).await;
        (endpoint, c, read)
    })
    .buffer_unordered(READ_CONCURRENCY);
    let reads: Vec<_> = reads.collect().await;
    for (endpoint, c, read) in reads {
        let id = &names.conversations[c];
        match read {
            Ok(read) => {
                report.messages_read += read.messages.len() as u64;
                let (counts, kept) = logs[c].check_read(&read, finals[c], reserved_gaps);
                report.violations.add(&counts);
                for v in kept {
                    if report.examples.len() < MAX_EXAMPLES {
                        report
                            .examples
                            .push(format!("{id} read from {}: {v}", endpoint.base));
                    }
                }
            }
            Err(e) => {
                // An unreadable log cannot be shown whole: it counts as short.
                report.violations.short += 1;
                if report.examples.len() < MAX_EXAMPLES {
                    report
                        .examples
                        .push(format!("{id} read from {}: {e}", endpoint.base));
                }
            }
        }
    }
    report
}

/// Walks `id`'s log on one node from seq 1, `after_seq` pages, until the node says there is no
/// more. Bounded: every page must advance (or the walk stops with an error), so a log of
/// `final_seq` messages takes at most `final_seq + 1` pages even when pages come back short.
async fn read_log(endpoint: &Endpoint, id: &str, final_seq: u64) -> Result<LogRead, String> {
    let mut read = LogRead::default();
    let mut after = 0;
    let max_pages = final_seq + 2;
    for _ in 0..max_pages {
        let page = endpoint.http.log_page(id, after, READ_PAGE).await?;
        read.last_seq = page.last_seq;
        read.gaps
            .extend(page.gaps.iter().map(|g| (g.from_seq, g.to_seq)));
        let advanced = page.messages.last().map(|m| m.seq);
        read.messages.extend(page.messages.iter().map(|m| Stored {
            seq: m.seq,
            index: m.index(),
        }));
        let reserved_end = page.gaps.iter().map(|g| g.to_seq).max();
        let next = advanced.max(reserved_end);
        if !page.has_more {
            return Ok(read);
        }
        match next {
            Some(n) if n > after => after = n,
            _ => {
                return Err(format!(
                    "page after_seq={after} has more but does not advance"
                ))
            }
        }
    }
    Err(format!("still has_more after {max_pages} pages"))
}
