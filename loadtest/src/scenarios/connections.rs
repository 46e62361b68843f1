//! `connections`: opens `--sockets` WebSockets at `--rate` per second, each joined to one of
//! `--conversations` topics, holds them idle (heartbeating) for `--duration` seconds, and
//! reports the server's resident memory (`VmRSS` of `--server-pid`) before the ramp and at the
//! end of the hold, and the difference per socket. At the end every socket must still answer a
//! heartbeat. With several targets, socket `i` opens on target `i % targets` (`--server-pid`
//! still names one process).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::cli::{Args, Targets};
use crate::ferry::{Incoming, PhxSocket};
use crate::pacer::Pacer;
use crate::progress::{Live, Progress};
use crate::report::{Report, SocketsReport};
use crate::stats::Recorder;
use crate::LoadError;

/// How long a socket may take to answer the final heartbeat.
const HEARTBEAT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// `VmRSS` of `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kb(pid: u32) -> Result<u64, LoadError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| LoadError::Setup(format!("no VmRSS in /proc/{pid}/status")))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

enum Opened {
    Ok(Duration),
    Failed(String),
}

pub async fn run(args: &Args, targets: &Targets) -> Result<Report, LoadError> {
    let endpoints = super::ferry_endpoints(args, targets)?;
    let names = super::names(args, targets);
    super::create_conversations(&endpoints[0].http, &names).await?;
    let rss_before = args.server_pid.map(rss_kb).transpose()?;

    let ramp = Pacer::new(args.rate, args.sockets as f64 / args.rate);
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), ramp.total(), !args.no_progress);
    let heartbeat = Duration::from_secs_f64(args.heartbeat_secs);
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut holders = Vec::new();
    let start = Instant::now();
    ramp.drive(start, |i, scheduled| {
        let url = endpoints[i as usize % endpoints.len()].ws_url.clone();
        let topic = format!(
            "conversation:{}",
            names.conversations[i as usize % names.conversations.len()]
        );
        let opened = opened_tx.clone();
        let mut stop = stop_rx.clone();
        let live = live.clone();
        Live::bump(&live.sent);
        holders.push(tokio::spawn(async move {
            let joined = async {
                let mut s = PhxSocket::connect(&url, heartbeat).await?;
                s.join("1", &topic, r#"{"after_seq":0}"#).await?;
                Ok::<_, LoadError>(s)
            }
            .await;
            let mut socket = match joined {
                Ok(s) => {
                    Live::bump(&live.ok);
                    let _ = opened.send(Opened::Ok(scheduled.elapsed()));
                    s
                }
                Err(e) => {
                    Live::bump(&live.errors);
                    let _ = opened.send(Opened::Failed(e.to_string()));
                    return false;
                }
            };
            // Idle until told to stop; `next` keeps the heartbeats going meanwhile.
            loop {
                tokio::select! {
                    incoming = socket.next() => match incoming {
                        Ok(Incoming::Frame(_)) => {}
                        _ => return false,
                    },
                    _ = stop.changed() => break,
                }
            }
            // Alive means: a heartbeat sent now is answered.
            let alive = async {
                let r = socket.heartbeat().await.ok()?;
                loop {
                    match socket.next().await.ok()? {
                        Incoming::Frame(f) if f.reference.as_deref() == Some(r.as_str()) => {
                            return Some(f.reply().is_ok());
                        }
                        Incoming::Frame(_) => {}
                        Incoming::Closed(_) => return None,
                    }
                }
            };
            let alive = tokio::time::timeout(HEARTBEAT_REPLY_TIMEOUT, alive)
                .await
                .ok()
                .flatten()
                .unwrap_or(false);
            socket.close().await;
            alive
        }));
    })
    .await;
    drop(opened_tx);

    // Every socket reports once (open or failed) before the hold starts.
    let mut connect = Recorder::new();
    let mut opened = 0;
    // (Counted, not read to the end: the holders keep their senders until they stop.)
    for _ in 0..ramp.total() {
        let Some(o) = opened_rx.recv().await else {
            break;
        };
        match o {
            Opened::Ok(latency) => {
                opened += 1;
                connect.record_ok(start.elapsed(), latency);
            }
            Opened::Failed(e) => connect.record_error(start.elapsed(), e),
        }
    }
    // The hold is the measurement itself: idle sockets, heartbeats only.
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let rss_after = args.server_pid.map(rss_kb).transpose()?;
    let _ = stop_tx.send(true);
    let mut alive = 0;
    for h in holders {
        if matches!(h.await, Ok(true)) {
            alive += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.finish();

    let mut report = Report::new(
        args,
        targets,
        &names,
        ramp.total(),
        &Recorder::new(),
        elapsed,
    );
    report.error_samples = connect.error_samples.clone();
    report.timeline = connect.timeline_points();
    let failed = connect.errors;
    if failed > 0 {
        report
            .failures
            .push(format!("{failed} sockets failed to open"));
    }
    if alive < opened {
        report
            .failures
            .push(format!("only {alive} of {opened} sockets alive at the end"));
    }
    let per_socket = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) * 1024.0 / opened as f64),
        _ => None,
    };
    report.sockets = Some(SocketsReport {
        requested: args.sockets,
        opened,
        failed,
        alive_at_end: alive,
        connect_latency: connect.summary(),
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        rss_per_socket_bytes: per_socket,
    });
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_from_proc_status() {
        let status = "Name:\tferry\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        let own = rss_kb(std::process::id()).expect("own status");
        assert!(own > 0);
    }
}
