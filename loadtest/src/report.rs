//! The outcome of a run: one [`Report`] (serialised as the `--json` file), a markdown table row
//! for `docs/benchmarks.md`, and a plain-text summary for the terminal. `failures` holds
//! everything that makes the run a failure (a gap, a repeat, a subscriber that never reached the
//! final seq, a socket that died): the binary exits non-zero when it is not empty.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::append::{Names, Published};
use crate::cli::{Args, Disrupt, Scenario, Targets, Transport};
use crate::cpu::CpuReport;
use crate::gapcheck::ViolationCounts;
use crate::stats::{LatencySummary, Recorder, TimelinePoint};
use crate::LoadError;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    /// The per-run part of conversation ids (`<prefix>-<run_id>-<n>`), stream names and keys.
    pub run_id: String,
    pub scenario: Scenario,
    /// `ferry`, `nats` or `redis`.
    pub system: String,
    /// Every `--target`, comma-separated.
    pub target: String,
    /// How many targets (nodes of one cluster) the clients were spread over.
    pub targets: usize,
    /// Only meaningful for Ferry.
    pub transport: Transport,
    pub rate: f64,
    pub duration_s: f64,
    pub conversations: usize,
    pub payload_bytes: usize,
    pub connections: usize,
    pub max_outstanding: usize,
    /// Seconds from the first scheduled send until the last answer (or the drain timeout).
    pub elapsed_s: f64,
    /// Sends the schedule asked for.
    pub scheduled: u64,
    pub ok: u64,
    pub try_again: u64,
    pub errors: u64,
    /// Sends not made because `max_outstanding` were in flight.
    pub skipped: u64,
    /// Acknowledged appends per second of `elapsed_s`.
    pub throughput_per_s: f64,
    /// `try_again / (sends made)`.
    pub try_again_rate: f64,
    /// Scheduled send to acknowledgement.
    pub ack_latency: LatencySummary,
    pub delivery: Option<DeliveryReport>,
    pub resume: Option<ResumeReport>,
    pub sockets: Option<SocketsReport>,
    pub reads: Option<ReadsReport>,
    pub cluster: Option<ClusterReport>,
    /// CPU of the server (`--server-pid`) and of the load tool while publishing.
    pub cpu: Option<CpuReport>,
    pub error_samples: Vec<String>,
    pub failures: Vec<String>,
    pub timeline: Vec<TimelinePoint>,
}

/// `fanout` and `resume`: what the subscribers received.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    pub subscribers: usize,
    /// Sum over subscribers of their conversation's final seq (what each should have seen).
    pub expected: u64,
    pub delivered: u64,
    /// Scheduled send to delivery on the subscriber.
    pub latency: LatencySummary,
    /// `None` where there is no seq to check order by (Redis entries carry none).
    pub violations: Option<ViolationCounts>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResumeReport {
    pub reconnects: u64,
    pub reconnect_failures: u64,
    /// Socket connect + join reply, per reconnect.
    pub reconnect_latency: LatencySummary,
    pub subscribers_reached_final: usize,
    /// The first violations, verbatim.
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketsReport {
    pub requested: usize,
    pub opened: u64,
    pub failed: u64,
    /// Sockets that still answered a heartbeat at the end of the hold.
    pub alive_at_end: u64,
    /// Scheduled open to join reply.
    pub connect_latency: LatencySummary,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    pub rss_per_socket_bytes: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReadsReport {
    pub forward_pages: LatencySummary,
    pub backward_pages: LatencySummary,
    /// Join with `after_seq=0` until the join's `last_seq` has been pushed.
    pub replays: LatencySummary,
    pub messages_read: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

/// `cluster`: what the disruption did, what the writers met, and the verdict of the log check.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub disrupt: Disrupt,
    /// WebSocket writers (`--connections`) and subscribers, over all targets.
    pub writers: usize,
    pub subscribers: usize,
    /// Acknowledged appends that hit a moving slot: a `try_again` `slot_moving` came first, a
    /// `backpressure` push for their conversation arrived while they were in flight (or just
    /// before they were sent), or the ack took longer than `--move-hold`.
    pub moving_appends: u64,
    /// Scheduled send to ack of those appends (retries included).
    pub moving_ack_latency: LatencySummary,
    /// `try_again` answers by their `detail` (`slot_moving`, `socket_in_flight`, ...).
    pub try_again_by_detail: BTreeMap<String, u64>,
    /// Sends made again with the same idempotency key after a `try_again`.
    pub retries: u64,
    /// Acknowledgements of a repeated key (`deduped: true`).
    pub deduped: u64,
    /// `backpressure` pushes the writers' and the subscribers' sockets received.
    pub backpressure_writers: u64,
    pub backpressure_subscribers: u64,
    /// Subscriber sockets lost (and resumed) during the run, other than by a node going away.
    pub subscriber_socket_losses: u64,
    /// Subscriber sockets a node closed with 1001 (going away), each resumed on the next node.
    pub subscriber_going_away: u64,
    /// Subscriber sockets opened again (after any loss).
    pub subscriber_reconnects: u64,
    /// Writer sockets lost and opened again on the next node.
    pub writer_reconnects: u64,
    /// Of the writers' losses, those a node announced with 1001 (going away)…
    pub writer_going_away: u64,
    /// …and those it did not (a cut socket: a failure).
    pub writer_socket_cuts: u64,
    /// Writer socket lost → joined again elsewhere with every unanswered send re-sent.
    pub writer_reconnect_latency: LatencySummary,
    /// Sends made again, under the same key, on a writer's new socket.
    pub resent: u64,
    /// The first writer socket losses, verbatim (`"12.31s ws://… going away: …"`).
    pub writer_losses: Vec<String>,
    pub disruption: DisruptionReport,
    pub check: LogCheckReport,
}

/// The admin side of a `cluster` run. Times are seconds since the first scheduled send.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DisruptionReport {
    /// The drained node.
    pub node: Option<String>,
    /// Slots the node owned when its drain was requested.
    pub node_slots_before: Option<usize>,
    pub drain_requested_at_s: Option<f64>,
    /// Drain request until the node owned no slot.
    pub drain_to_empty_ms: Option<f64>,
    pub rebalance_requested_at_s: Option<f64>,
    /// Moves the first `POST /admin/rebalance` answered.
    pub rebalance_moves: Option<usize>,
    /// Rebalance request until no slot was moving and a rebalance planned no more moves.
    pub rebalance_to_settled_ms: Option<f64>,
    /// Slots the node owned once settled.
    pub node_slots_after: Option<usize>,
    /// The most slots seen moving at once.
    pub max_moving_slots: usize,
    /// What happened, in order (`"1.00s drain n2 requested (171 slots)"`).
    pub steps: Vec<String>,
    /// Why the disruption did not finish, when it did not.
    pub error: Option<String>,
}

/// The zero-gap check of every conversation's stored log against the acknowledgements.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogCheckReport {
    pub conversations: usize,
    /// Nodes every conversation was read back from.
    pub targets_read: usize,
    pub messages_read: u64,
    /// Distinct idempotency keys acknowledged.
    pub acked_keys: u64,
    /// Sum over conversations of the final seq.
    pub final_seqs: u64,
    pub violations: ViolationCounts,
    /// The first violations, verbatim.
    pub examples: Vec<String>,
}

impl Report {
    /// The common part of every report, from the appenders' merged record.
    /// The report of a run that published: [`Report::new`] from its acks, with its CPU.
    pub fn published(
        args: &Args,
        targets: &Targets,
        names: &Names,
        scheduled: u64,
        published: Published,
        elapsed_s: f64,
    ) -> Report {
        let mut report = Report::new(args, targets, names, scheduled, &published.acks, elapsed_s);
        report.cpu = Some(published.cpu);
        report
    }

    pub fn new(
        args: &Args,
        targets: &Targets,
        names: &Names,
        scheduled: u64,
        acks: &Recorder,
        elapsed_s: f64,
    ) -> Report {
        let made = scheduled.saturating_sub(acks.skipped);
        let mut failures = Vec::new();
        if acks.errors > 0 {
            failures.push(format!("{} appends failed", acks.errors));
        }
        Report {
            label: args.label(targets),
            run_id: names.run.clone(),
            scenario: args.scenario,
            system: targets.first().system().to_owned(),
            target: args.targets.join(","),
            targets: targets.len(),
            transport: args.transport,
            rate: args.rate,
            duration_s: args.duration,
            conversations: args.conversations,
            payload_bytes: args.payload,
            connections: args.connections,
            max_outstanding: args.max_outstanding,
            elapsed_s,
            scheduled,
            ok: acks.ok,
            try_again: acks.try_again,
            errors: acks.errors,
            skipped: acks.skipped,
            throughput_per_s: if elapsed_s > 0.0 {
                acks.ok as f64 / elapsed_s
            } else {
                0.0
            },
            try_again_rate: if made > 0 {
                acks.try_again as f64 / made as f64
            } else {
                0.0
            },
            ack_latency: acks.summary(),
            delivery: None,
            resume: None,
            sockets: None,
            cpu: None,
            reads: None,
            cluster: None,
            error_samples: acks.error_samples.clone(),
            failures,
            timeline: acks.timeline_points(),
        }
    }

    /// True when nothing in the run broke a guarantee.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub const MARKDOWN_HEADER: &'static str = "| run | scenario | rate/s | acked/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | try_again | errors | skipped | notes |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";

    /// One row of the benchmark table; scenario-specific numbers go in `notes`.
    pub fn markdown_row(&self) -> String {
        let l = &self.ack_latency;
        format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |\n",
            self.label,
            self.scenario,
            self.rate,
            self.throughput_per_s,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            self.try_again,
            self.errors,
            self.skipped,
            self.notes().join("; ")
        )
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(d) = &self.delivery {
            notes.push(format!(
                "delivered {}/{} to {} subscribers, deliver p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                d.delivered,
                d.expected,
                d.subscribers,
                d.latency.p50_ms,
                d.latency.p99_ms,
                d.latency.max_ms
            ));
            notes.push(match &d.violations {
                Some(v) => format!(
                    "gaps {} repeats {} reorders {}",
                    v.gaps, v.repeats, v.reorders
                ),
                None => "order not checked (no seq)".to_owned(),
            });
        }
        if let Some(r) = &self.resume {
            notes.push(format!(
                "{} reconnects (p99 {:.2} ms), {} subscribers reached the final seq",
                r.reconnects, r.reconnect_latency.p99_ms, r.subscribers_reached_final
            ));
        }
        if let Some(s) = &self.sockets {
            notes.push(format!(
                "{} sockets open ({} alive at end), RSS {} → {} KiB, {} bytes/socket",
                s.opened,
                s.alive_at_end,
                s.rss_before_kb.map_or("?".into(), |v| v.to_string()),
                s.rss_after_kb.map_or("?".into(), |v| v.to_string()),
                s.rss_per_socket_bytes
                    .map_or("?".into(), |v| format!("{v:.0}"))
            ));
        }
        if let Some(c) = &self.cpu {
            let mut parts = Vec::new();
            match (c.server_cores, c.server_us_per(self.ok)) {
                (Some(cores), Some(us)) => {
                    parts.push(format!("server {cores:.2} cores ({us:.1} µs per ack)"))
                }
                (Some(cores), None) => parts.push(format!("server {cores:.2} cores")),
                // Without --server-pid there is nothing to say about the server.
                (None, _) => {}
            }
            if let Some(cores) = c.loadtest_cores {
                parts.push(format!("load tool {cores:.2} cores"));
            }
            if !parts.is_empty() {
                notes.push(format!("cpu: {}", parts.join(", ")));
            }
        }
        if let Some(r) = &self.reads {
            notes.push(format!(
                "reads: {} messages, page p99 fwd {:.2} ms back {:.2} ms, replay p99 {:.2} ms, {} errors",
                r.messages_read, r.forward_pages.p99_ms, r.backward_pages.p99_ms, r.replays.p99_ms, r.errors
            ));
        }
        if let Some(c) = &self.cluster {
            notes.extend(c.notes());
        }
        if !self.failures.is_empty() {
            notes.push(format!("FAILED: {}", self.failures.join(", ")));
        }
        notes
    }

    /// `against URL` or `against 3 targets (URL, URL, URL)`.
    fn against(&self) -> String {
        if self.targets > 1 {
            format!(
                "{} targets ({})",
                self.targets,
                self.target.replace(',', ", ")
            )
        } else {
            self.target.clone()
        }
    }

    /// The terminal summary.
    pub fn text(&self) -> String {
        if self.scenario == Scenario::Connections {
            let mut s = format!(
                "{} ({}) against {}\n",
                self.label,
                self.scenario,
                self.against()
            );
            if let Some(c) = &self.sockets {
                let l = &c.connect_latency;
                s.push_str(&format!(
                    "  connect+join ms: p50 {:.2}  p99 {:.2}  max {:.2}\n",
                    l.p50_ms, l.p99_ms, l.max_ms
                ));
            }
            for note in self.notes() {
                s.push_str(&format!("  {note}\n"));
            }
            for e in &self.error_samples {
                s.push_str(&format!("  error: {e}\n"));
            }
            return s;
        }
        let l = &self.ack_latency;
        let mut s = format!(
            "{} ({}) against {}\n  scheduled {}  ok {}  try_again {} ({:.2}%)  errors {}  skipped {}\n  \
             throughput {:.0}/s over {:.2}s\n  ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.label,
            self.scenario,
            self.against(),
            self.scheduled,
            self.ok,
            self.try_again,
            self.try_again_rate * 100.0,
            self.errors,
            self.skipped,
            self.throughput_per_s,
            self.elapsed_s,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        );
        for note in self.notes() {
            s.push_str("  ");
            s.push_str(&note);
            s.push('\n');
        }
        for e in &self.error_samples {
            s.push_str(&format!("  error: {e}\n"));
        }
        s
    }
}

impl ClusterReport {
    fn notes(&self) -> Vec<String> {
        let d = &self.disruption;
        let ms = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0} ms"));
        let mut notes = Vec::new();
        match self.disrupt {
            Disrupt::Drain => notes.push(format!(
                "drain {}: {} slots gone in {}; rebalance {} moves, settled in {}; {} slots back",
                d.node.as_deref().unwrap_or("?"),
                d.node_slots_before.map_or("?".into(), |v| v.to_string()),
                ms(d.drain_to_empty_ms),
                d.rebalance_moves.map_or("?".into(), |v| v.to_string()),
                ms(d.rebalance_to_settled_ms),
                d.node_slots_after.map_or("?".into(), |v| v.to_string()),
            )),
            Disrupt::Rebalance => notes.push(format!(
                "rebalance: {} moves, settled in {}",
                d.rebalance_moves.map_or("?".into(), |v| v.to_string()),
                ms(d.rebalance_to_settled_ms),
            )),
            Disrupt::None => notes.push("no disruption by the load tool".to_owned()),
        }
        let l = &self.moving_ack_latency;
        notes.push(format!(
            "{} appends hit a moving slot: ack p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            self.moving_appends, l.p50_ms, l.p99_ms, l.max_ms
        ));
        let by_detail = if self.try_again_by_detail.is_empty() {
            "none".to_owned()
        } else {
            self.try_again_by_detail
                .iter()
                .map(|(detail, n)| format!("{detail} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        notes.push(format!(
            "try_again by detail: {by_detail}; {} retries, {} deduped; backpressure pushes: {} to writers, {} to subscribers",
            self.retries, self.deduped, self.backpressure_writers, self.backpressure_subscribers
        ));
        let c = &self.check;
        let verdict = if c.violations.total() == 0 {
            "clean".to_owned()
        } else {
            c.violations.describe()
        };
        notes.push(format!(
            "log check: {} conversations read back from {} targets ({} messages, {} acknowledged keys, final seqs sum {}): {verdict}",
            c.conversations, c.targets_read, c.messages_read, c.acked_keys, c.final_seqs
        ));
        if self.writer_reconnects + self.writer_socket_cuts > 0 {
            let l = &self.writer_reconnect_latency;
            notes.push(format!(
                "writer reconnects: {} ({} going away, {} cut), rejoined in p50 {:.0} ms max {:.0} ms, {} sends re-sent",
                self.writer_reconnects,
                self.writer_going_away,
                self.writer_socket_cuts,
                l.p50_ms,
                l.max_ms,
                self.resent
            ));
        }
        if self.subscriber_reconnects > 0 {
            notes.push(format!(
                "subscriber reconnects: {} ({} going away)",
                self.subscriber_reconnects, self.subscriber_going_away
            ));
        }
        if self.subscriber_socket_losses > 0 {
            notes.push(format!(
                "{} subscriber sockets lost",
                self.subscriber_socket_losses
            ));
        }
        if let Some(e) = &d.error {
            notes.push(format!("disruption failed: {e}"));
        }
        notes
    }
}

/// Writes whichever of `--json`, `--markdown`, `--plot` were asked for.
pub fn write_outputs(args: &Args, report: &Report) -> Result<(), LoadError> {
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| LoadError::Io(std::io::Error::other(e)))?;
        std::fs::write(path, text + "\n")?;
    }
    if let Some(path) = &args.markdown {
        append_markdown(path, report)?;
    }
    if let Some(path) = &args.plot {
        crate::plot::write_svg(path, report)?;
    }
    Ok(())
}

/// Appends the row, writing the header first when the file is new or empty, so several runs
/// build one table.
fn append_markdown(path: &Path, report: &Report) -> Result<(), LoadError> {
    let fresh = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if fresh {
        f.write_all(Report::MARKDOWN_HEADER.as_bytes())?;
    }
    f.write_all(report.markdown_row().as_bytes())?;
    Ok(())
}
