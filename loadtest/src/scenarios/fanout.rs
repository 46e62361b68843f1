//! `fanout`: `--subscribers` sockets joined to each conversation before the clock starts, then
//! appends at `--rate`; measures scheduled-send-to-delivery latency on every subscriber and
//! checks each one received its conversation's whole history exactly once, in order.
//! Against Redis the subscribers are `XREAD BLOCK` loops on dedicated connections (no seq to
//! check there, only counts and latency). With several Ferry targets, subscriber `k` joins
//! through target `k % targets`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::watch;
use tokio::time::Instant;

use super::subscriber::{self, Recorders, Spec};
use crate::append::{Names, Publisher};
use crate::cli::{Args, Target, Targets};
use crate::gapcheck::ViolationCounts;
use crate::pacer::Pacer;
use crate::peers::redis::RedisSubscriber;
use crate::progress::{Live, Progress};
use crate::report::{DeliveryReport, Report, ResumeReport};
use crate::stats::Recorder;
use crate::LoadError;

pub async fn run(args: &Args, targets: &Targets) -> Result<Report, LoadError> {
    match targets.first() {
        Target::Redis(url) => return run_redis(args, targets, url).await,
        Target::Nats(_) => {
            return Err(LoadError::Unsupported {
                scenario: args.scenario.to_string(),
                target: "nats".into(),
            })
        }
        Target::Ferry { .. } => {}
    }
    run_ferry(args, targets, None).await
}

/// Ferry fanout, and with `reconnect_per_min` the `resume` scenario.
pub async fn run_ferry(
    args: &Args,
    targets: &Targets,
    reconnects_per_min: Option<f64>,
) -> Result<Report, LoadError> {
    let endpoints = super::ferry_endpoints(args, targets)?;
    let http = endpoints[0].http.clone();
    let names = super::names(args, targets);
    super::create_conversations(&http, &names).await?;

    let total_subs = args.conversations * args.subscribers;
    // Spread the reconnects evenly: each subscriber drops every `every`, staggered so that the
    // whole population produces `reconnects_per_min` drops per minute.
    let reconnect_every = reconnects_per_min
        .filter(|r| *r > 0.0 && total_subs > 0)
        .map(|r| Duration::from_secs_f64(60.0 * total_subs as f64 / r));
    let ws_urls: Vec<String> = endpoints.iter().map(|e| e.ws_url.clone()).collect();
    let mut specs = Vec::new();
    for c in 0..args.conversations {
        for s in 0..args.subscribers {
            let k = c * args.subscribers + s;
            let spec = Spec {
                conv: c,
                topic: format!("conversation:{}", names.conversations[c]),
                ws_urls: subscriber::rotated(&ws_urls, k),
                heartbeat: Duration::from_secs_f64(args.heartbeat_secs),
                reconnect: reconnect_every
                    .map(|every| (every.mul_f64((k as f64 + 0.5) / total_subs as f64), every)),
                drain: Duration::from_secs_f64(args.drain_timeout),
                give_up: Duration::from_secs_f64(args.drain_timeout),
                reserved_gaps: false,
            };
            specs.push(spec);
        }
    }
    let sockets: Vec<_> = subscriber::connect_all(&specs)
        .await?
        .into_iter()
        .map(|socket| (socket, Recorders::for_run(args.duration)))
        .collect();

    let publisher = Publisher::connect(args, targets, &names).await?;
    let pacer = Pacer::new(args.rate, args.duration);
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), pacer.total(), !args.no_progress);
    let (finals_tx, finals_rx) = watch::channel(None);
    let start = Instant::now();
    let subs = subscriber::spawn_all(
        specs.into_iter().zip(sockets),
        start,
        pacer,
        &finals_rx,
        &live,
    );
    drop(finals_rx);

    let published = publisher.run(pacer, start, live).await;
    let finals = super::final_seqs(&http, &names).await?;
    let _ = finals_tx.send(Some(finals.clone()));
    let mut outcomes = Vec::new();
    for r in join_all(subs).await {
        outcomes.push(r.map_err(|e| LoadError::Setup(format!("subscriber task failed: {e}")))?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.finish();

    let mut report = Report::published(args, targets, &names, pacer.total(), published, elapsed);
    let delivery = Recorder::merged(outcomes.iter().map(|o| &o.delivery));
    let reconnect = Recorder::merged(outcomes.iter().map(|o| &o.reconnect));
    let mut counts = ViolationCounts::default();
    let mut examples = Vec::new();
    for (k, o) in outcomes.iter().enumerate() {
        counts.add(&o.counts);
        for v in &o.violations {
            if examples.len() < 20 {
                examples.push(format!(
                    "subscriber {k} of {}: {v}",
                    names.conversations[k / args.subscribers.max(1)]
                ));
            }
        }
    }
    let expected: u64 = outcomes.iter().map(|o| o.final_seq).sum();
    let delivered: u64 = outcomes.iter().map(|o| o.delivered).sum();
    let reached = outcomes.iter().filter(|o| o.reached_final).count();
    if counts.total() > 0 {
        report.failures.push(format!(
            "{} ordering violations: {} gaps, {} repeats, {} reorders, {} server gaps, {} short",
            counts.total(),
            counts.gaps,
            counts.repeats,
            counts.reorders,
            counts.server_gaps,
            counts.short
        ));
    }
    if delivered != expected {
        report.failures.push(format!(
            "delivered {delivered} messages, expected {expected}"
        ));
    }
    // Without reconnects a lost socket is a failure of its own; with them, losing the
    // connection is the point and only the checker's verdict counts.
    if reconnects_per_min.is_none() && delivery.errors > 0 {
        report
            .failures
            .push(format!("{} subscriber socket errors", delivery.errors));
    }
    report
        .error_samples
        .extend(delivery.error_samples.iter().take(4).cloned());
    report.delivery = Some(DeliveryReport {
        subscribers: outcomes.len(),
        expected,
        delivered,
        latency: delivery.summary(),
        violations: Some(counts),
    });
    if reconnects_per_min.is_some() {
        report.resume = Some(ResumeReport {
            reconnects: outcomes.iter().map(|o| o.reconnects).sum(),
            reconnect_failures: reconnect.errors,
            reconnect_latency: reconnect.summary(),
            subscribers_reached_final: reached,
            examples,
        });
    } else if !examples.is_empty() {
        report.failures.extend(examples);
    }
    Ok(report)
}

async fn run_redis(args: &Args, targets: &Targets, url: &str) -> Result<Report, LoadError> {
    let names: Names = super::names(args, targets);
    let mut subs = Vec::new();
    for c in 0..args.conversations {
        for _ in 0..args.subscribers {
            subs.push((
                c,
                RedisSubscriber::connect(url, &names.conversations[c]).await?,
                Recorder::for_run(args.duration),
            ));
        }
    }
    let publisher = Publisher::connect(args, targets, &names).await?;
    let pacer = Pacer::new(args.rate, args.duration);
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), pacer.total(), !args.no_progress);
    let (finals_tx, finals_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let drain = Duration::from_secs_f64(args.drain_timeout);
    let start = Instant::now();
    let handles: Vec<_> = subs
        .into_iter()
        .map(|(c, mut sub, mut rec)| {
            let mut finals = finals_rx.clone();
            let live = live.clone();
            tokio::spawn(async move {
                let mut seen = 0u64;
                let mut deadline: Option<Instant> = None;
                loop {
                    let target = finals.borrow_and_update().as_ref().map(|f| f[c]);
                    if let Some(t) = target {
                        let d = *deadline.get_or_insert_with(|| Instant::now() + drain);
                        if seen >= t || Instant::now() >= d {
                            return (rec, seen, target.unwrap_or(0));
                        }
                    }
                    match sub.read().await {
                        Ok(entries) => {
                            let now = Instant::now();
                            for e in entries {
                                seen += 1;
                                Live::bump(&live.delivered);
                                if let Some(i) = e.index {
                                    rec.record_ok(
                                        now.saturating_duration_since(start),
                                        now.saturating_duration_since(start + pacer.offset(i)),
                                    );
                                }
                            }
                        }
                        Err(e) => {
                            rec.record_error(start.elapsed(), e.to_string());
                            tokio::time::sleep(RedisSubscriber::block()).await;
                        }
                    }
                }
            })
        })
        .collect();
    let published = publisher.run(pacer, start, live).await;
    // The stream length is the number of acknowledged XADDs (fresh keys per run).
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut finals = Vec::new();
    for key in names.conversations.iter() {
        let len: u64 = redis::cmd("XLEN").arg(key).query_async(&mut conn).await?;
        finals.push(len);
    }
    let _ = finals_tx.send(Some(Arc::new(finals)));
    let mut recs = Vec::new();
    let (mut delivered, mut expected) = (0, 0);
    for h in join_all(handles).await {
        let (rec, seen, t) =
            h.map_err(|e| LoadError::Setup(format!("subscriber task failed: {e}")))?;
        delivered += seen;
        expected += t;
        recs.push(rec);
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.finish();
    let delivery = Recorder::merged(&recs);
    let mut report = Report::published(args, targets, &names, pacer.total(), published, elapsed);
    if delivered != expected {
        report.failures.push(format!(
            "delivered {delivered} messages, expected {expected}"
        ));
    }
    report.delivery = Some(DeliveryReport {
        subscribers: recs.len(),
        expected,
        delivered,
        latency: delivery.summary(),
        violations: None,
    });
    Ok(report)
}
