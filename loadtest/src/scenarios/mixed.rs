//! `mixed`: appends at `--rate` (as in `append`) while `--readers` closed-loop readers walk the
//! same conversations: a forward walk (`after_seq` pages), a backward walk (`before_seq` pages)
//! and a WebSocket replay join (`after_seq=0` until the join's `last_seq` has been pushed), in
//! turn. Each page is checked to hold consecutive seqs; each replay to arrive without gaps.
//! Readers measure each request from when they made it (they are closed loop: their latency is
//! a service time, unlike the appends'). With several targets, reader `r` reads through target
//! `r % targets`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::append::Publisher;
use crate::cli::{Args, Targets};
use crate::ferry::{FerryHttp, Incoming, PhxSocket, PushedMessage};
use crate::gapcheck::SeqChecker;
use crate::pacer::Pacer;
use crate::progress::{Live, Progress};
use crate::report::{ReadsReport, Report};
use crate::stats::Recorder;
use crate::LoadError;

/// A walk stops after this many pages so every reader keeps rotating through its operations.
const MAX_PAGES_PER_WALK: usize = 20;

#[derive(Default)]
struct ReaderRecord {
    forward: Recorder,
    backward: Recorder,
    replay: Recorder,
    messages: u64,
}

pub async fn run(args: &Args, targets: &Targets) -> Result<Report, LoadError> {
    let endpoints = super::ferry_endpoints(args, targets)?;
    let names = super::names(args, targets);
    super::create_conversations(&endpoints[0].http, &names).await?;
    let publisher = Publisher::connect(args, targets, &names).await?;
    let pacer = Pacer::new(args.rate, args.duration);
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), pacer.total(), !args.no_progress);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let readers: Vec<_> = (0..args.readers)
        .map(|r| {
            let endpoint = &endpoints[r % endpoints.len()];
            let ctx = ReaderCtx {
                http: endpoint.http.clone(),
                ws_url: endpoint.ws_url.clone(),
                ids: names.conversations.clone(),
                page_size: args.page_size,
                heartbeat: Duration::from_secs_f64(args.heartbeat_secs),
                timeout: Duration::from_secs_f64(args.drain_timeout),
                start,
            };
            tokio::spawn(reader(ctx, r, stop.clone()))
        })
        .collect();
    let published = publisher.run(pacer, start, live).await;
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for r in readers {
        records.push(
            r.await
                .map_err(|e| LoadError::Setup(format!("reader failed: {e}")))?,
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.finish();

    let mut report = Report::published(args, targets, &names, pacer.total(), published, elapsed);
    let forward = Recorder::merged(records.iter().map(|r| &r.forward));
    let backward = Recorder::merged(records.iter().map(|r| &r.backward));
    let replay = Recorder::merged(records.iter().map(|r| &r.replay));
    let errors = forward.errors + backward.errors + replay.errors;
    if errors > 0 {
        report.failures.push(format!("{errors} reads failed"));
    }
    let mut samples = forward.error_samples.clone();
    samples.extend(backward.error_samples.iter().cloned());
    samples.extend(replay.error_samples.iter().cloned());
    report.reads = Some(ReadsReport {
        forward_pages: forward.summary(),
        backward_pages: backward.summary(),
        replays: replay.summary(),
        messages_read: records.iter().map(|r| r.messages).sum(),
        errors,
        error_samples: samples,
    });
    Ok(report)
}

struct ReaderCtx {
    http: FerryHttp,
    ws_url: String,
    ids: Arc<[String]>,
    page_size: usize,
    heartbeat: Duration,
    timeout: Duration,
    start: Instant,
}

async fn reader(ctx: ReaderCtx, index: usize, stop: Arc<AtomicBool>) -> ReaderRecord {
    let mut rec = ReaderRecord::default();
    let mut round = 0usize;
    // At least one full rotation, even when the appends finish first.
    while round < 3 || !stop.load(Ordering::Relaxed) {
        let id = &ctx.ids[(index + round / 3) % ctx.ids.len()];
        let result = match round % 3 {
            0 => forward_walk(&ctx, id, &mut rec).await,
            1 => backward_walk(&ctx, id, &mut rec).await,
            _ => {
                let began = Instant::now();
                match tokio::time::timeout(ctx.timeout, replay(&ctx, id)).await {
                    Ok(Ok(n)) => {
                        rec.messages += n;
                        rec.replay.record_ok(ctx.start.elapsed(), began.elapsed());
                        Ok(())
                    }
                    Ok(Err(e)) => Err((2, e)),
                    Err(_) => Err((2, format!("replay of {id} timed out"))),
                }
            }
        };
        if let Err((kind, e)) = result {
            let at = ctx.start.elapsed();
            match kind {
                0 => rec.forward.record_error(at, e),
                1 => rec.backward.record_error(at, e),
                _ => rec.replay.record_error(at, e),
            }
        }
        round += 1;
    }
    rec
}

/// Checks that a page's seqs are consecutive; returns (first, last).
fn consecutive(seqs: &[u64]) -> Result<Option<(u64, u64)>, String> {
    for w in seqs.windows(2) {
        if w[1] != w[0] + 1 {
            return Err(format!("page not consecutive: {} then {}", w[0], w[1]));
        }
    }
    Ok(seqs.first().zip(seqs.last()).map(|(a, b)| (*a, *b)))
}

async fn forward_walk(
    ctx: &ReaderCtx,
    id: &str,
    rec: &mut ReaderRecord,
) -> Result<(), (u8, String)> {
    let mut after = 0;
    for _ in 0..MAX_PAGES_PER_WALK {
        let began = Instant::now();
        let page = ctx
            .http
            .page(id, &format!("after_seq={after}&limit={}", ctx.page_size))
            .await
            .map_err(|e| (0, e))?;
        rec.forward.record_ok(ctx.start.elapsed(), began.elapsed());
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        rec.messages += seqs.len() as u64;
        match consecutive(&seqs).map_err(|e| (0, e))? {
            Some((first, last)) if first == after + 1 => after = last,
            Some((first, _)) => {
                return Err((0, format!("{id}: after_seq={after} began at {first}")))
            }
            None => break,
        }
        if !page.has_more {
            break;
        }
    }
    Ok(())
}

async fn backward_walk(
    ctx: &ReaderCtx,
    id: &str,
    rec: &mut ReaderRecord,
) -> Result<(), (u8, String)> {
    let last = ctx
        .http
        .last_seq(id)
        .await
        .map_err(|e| (1, e.to_string()))?;
    let mut before = last + 1;
    for _ in 0..MAX_PAGES_PER_WALK {
        if before <= 1 {
            break;
        }
        let began = Instant::now();
        let page = ctx
            .http
            .page(id, &format!("before_seq={before}&limit={}", ctx.page_size))
            .await
            .map_err(|e| (1, e))?;
        rec.backward.record_ok(ctx.start.elapsed(), began.elapsed());
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        rec.messages += seqs.len() as u64;
        match consecutive(&seqs).map_err(|e| (1, e))? {
            Some((first, last)) if last + 1 == before => before = first,
            Some((_, last)) => {
                return Err((1, format!("{id}: before_seq={before} ended at {last}")))
            }
            None => break,
        }
        if !page.has_more {
            break;
        }
    }
    Ok(())
}

/// Joins from the start and reads pushes until the join's `last_seq`; returns messages read.
async fn replay(ctx: &ReaderCtx, id: &str) -> Result<u64, String> {
    let mut socket = PhxSocket::connect(&ctx.ws_url, ctx.heartbeat)
        .await
        .map_err(|e| e.to_string())?;
    let topic = format!("conversation:{id}");
    let reply = socket
        .join("1", &topic, r#"{"after_seq":0}"#)
        .await
        .map_err(|e| e.to_string())?;
    let target = reply["last_seq"]
        .as_u64()
        .ok_or("join reply without last_seq")?;
    let mut checker = SeqChecker::new(1);
    while checker.last_seen() < target {
        match socket.next().await.map_err(|e| e.to_string())? {
            Incoming::Frame(f) if f.event == "message" => {
                let m: PushedMessage =
                    serde_json::from_str(f.payload.get()).map_err(|e| e.to_string())?;
                checker.observe(m.seq);
            }
            Incoming::Frame(_) => {}
            Incoming::Closed(why) => return Err(format!("replay of {id}: socket closed: {why}")),
        }
    }
    socket.close().await;
    let n = checker.delivered();
    let (counts, violations) = checker.finish(target);
    if counts.total() > 0 {
        return Err(format!("replay of {id}: {:?}", violations.first()));
    }
    Ok(n)
}
