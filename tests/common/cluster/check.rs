//! The checker: what the clients were told against what the cluster stored and delivered, in
//! the Jepsen style.
//!
//! For every conversation, reading all messages through EVERY given node:
//! - each node returns seqs exactly 1..N, no page reports a gap, and every node returns the same
//!   N messages, field for field;
//! - every stored message carries a key some writer sent, to that conversation, with that content,
//!   and no key is stored at two seqs;
//! - every acknowledged key is stored at its acknowledged seq, with its content and message id,
//!   and no key was acknowledged at two different seqs;
//! - every subscriber of the conversation received exactly `(1, id1) … (N, idN)` in that order —
//!   no hole, no repeat, also across its rejoins — and no `gap` push;
//! - no writer saw a hard error.
//!
//! After a failover with reserved seqs ([`check_allowing_gaps`]) the first and fourth rules are
//! relaxed to what PROTOCOL.md promises there: seqs only ascend, and every seq below the last
//! that holds nothing lies in a `gaps` range the page reported (every node reporting the same);
//! a subscriber receives an ascending subsequence of the stored messages, misses only seqs a
//! `gap` push it got covered, and its `gap` pushes are no violation.
//!
//! [`check`] first waits (bounded) until the nodes agree and the subscribers have caught up, so a
//! message that was still in flight when the writers stopped does not read as a failure; then
//! [`verify`] judges one snapshot. `verify` is pure, so the harness tests can feed it tampered
//! snapshots and see it fail.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::subscribers::{SubscriberLog, Subscribers};
use super::workload::WriteLog;
use crate::common::TestServer;

/// How long [`check`] waits for the nodes to agree and the subscribers to catch up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Violations listed in a report (the count is always complete).
const REPORT_LIMIT: usize = 40;
const PAGE_LIMIT: u64 = 1000;

/// One conversation read through one node: its label, and all the messages or why reading
/// failed.
pub type NodeRead = (String, Result<Vec<Value>, String>);

/// Every conversation as read through every node.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Conversation → one read per node.
    pub reads: BTreeMap<String, Vec<NodeRead>>,
    /// Reserved seqs that hold nothing, as the pages reported them: (conversation, node label)
    /// → ranges. Only read (and allowed) by [`check_allowing_gaps`].
    pub gaps: BTreeMap<(String, String), Vec<(u64, u64)>>,
    pub allow_gaps: bool,
}

impl Observed {
    /// Nodes agree on every conversation and every subscriber has reached its last seq.
    fn settled(&self, subscribers: &SubscriberLog) -> bool {
        self.reads.iter().all(|(conversation, reads)| {
            let mut lens = reads.iter().map(|(_, r)| r.as_ref().map(Vec::len));
            let Some(Ok(n)) = lens.next() else {
                return false;
            };
            let last = reads
                .first()
                .and_then(|(_, r)| r.as_ref().ok())
                .and_then(|m| m.last())
                .and_then(seq_of)
                .unwrap_or(0);
            lens.all(|l| l == Ok(n))
                && subscribers.get(conversation).is_none_or(|s| {
                    if self.allow_gaps {
                        s.last_seq() >= last
                    } else {
                        s.delivered.len() >= n
                    }
                })
        })
    }

    pub fn messages(&self) -> usize {
        self.reads
            .values()
            .filter_map(|r| r.first().and_then(|(_, m)| m.as_ref().ok()))
            .map(Vec::len)
            .sum()
    }
}

/// Counts from a passing check, printed by the tests.
#[derive(Debug, Clone, Default)]
pub struct CheckSummary {
    pub conversations: usize,
    pub nodes: usize,
    pub messages: usize,
    pub acks: usize,
    pub deduped_acks: usize,
    pub abandoned: usize,
    pub errors: BTreeMap<String, u64>,
    pub subscribers: usize,
    pub deliveries: usize,
    pub backpressure: u64,
    pub rejoins: u64,
    pub reconnects: u64,
    pub subscriber_faults: BTreeMap<String, u64>,
    /// Read passes until the nodes agreed and the subscribers caught up.
    pub rounds: usize,
}

impl fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} conversations through {} nodes: {} messages stored, {} acks ({} deduped), \
             {} keys abandoned at stop; settled after {} read passes",
            self.conversations,
            self.nodes,
            self.messages,
            self.acks,
            self.deduped_acks,
            self.abandoned,
            self.rounds
        )?;
        writeln!(f, "writer retries by kind: {:?}", self.errors)?;
        write!(
            f,
            "{} subscribers: {} deliveries, {} backpressure pushes, {} rejoins, {} reconnects, \
             faults {:?}",
            self.subscribers,
            self.deliveries,
            self.backpressure,
            self.rejoins,
            self.reconnects,
            self.subscriber_faults
        )
    }
}

/// Reads every conversation through every node until they agree and the subscribers have caught
/// up (bounded), then [`verify`]s. `Err` is a readable report of every violation.
pub async fn check(
    nodes: &[(String, &TestServer)],
    conversations: &[String],
    log: &WriteLog,
    subscribers: &Subscribers,
) -> Result<CheckSummary, String> {
    check_mode(nodes, conversations, log, subscribers, false).await
}

/// [`check`] after a failover with reserved seqs: holes are allowed where the pages report
/// `gaps`, and subscribers may have received `gap` pushes (see the module docs).
pub async fn check_allowing_gaps(
    nodes: &[(String, &TestServer)],
    conversations: &[String],
    log: &WriteLog,
    subscribers: &Subscribers,
) -> Result<CheckSummary, String> {
    check_mode(nodes, conversations, log, subscribers, true).await
}

async fn check_mode(
    nodes: &[(String, &TestServer)],
    conversations: &[String],
    log: &WriteLog,
    subscribers: &Subscribers,
    allow_gaps: bool,
) -> Result<CheckSummary, String> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let observed = collect_mode(nodes, conversations, allow_gaps).await;
        let subs = subscribers.log();
        let settled = observed.settled(&subs);
        if settled || Instant::now() >= deadline {
            let mut result = judge(&observed, log, &subs, rounds);
            if let (Err(report), false) = (&mut result, settled) {
                report.push_str(&format!(
                    "\n(nodes still disagreed or subscribers still lagged after \
                     {SETTLE_TIMEOUT:?})"
                ));
            }
            return result;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message of every conversation through every node.
pub async fn collect(nodes: &[(String, &TestServer)], conversations: &[String]) -> Observed {
    collect_mode(nodes, conversations, false).await
}

async fn collect_mode(
    nodes: &[(String, &TestServer)],
    conversations: &[String],
    allow_gaps: bool,
) -> Observed {
    let mut observed = Observed {
        allow_gaps,
        ..Observed::default()
    };
    for conversation in conversations {
        let mut reads = Vec::new();
        for (label, server) in nodes {
            let mut gaps = Vec::new();
            let read = read_all(server, conversation, allow_gaps.then_some(&mut gaps)).await;
            reads.push((label.clone(), read));
            if allow_gaps {
                observed
                    .gaps
                    .insert((conversation.clone(), label.clone()), gaps);
            }
        }
        observed.reads.insert(conversation.clone(), reads);
    }
    observed
}

/// All messages of `conversation` through `server`, walking `after_seq` pages; a non-200
/// answer is an `Err`, and so is a page that reports `gaps` unless `gaps` is given to collect
/// them in.
pub async fn read_all(
    server: &TestServer,
    conversation: &str,
    mut gaps: Option<&mut Vec<(u64, u64)>>,
) -> Result<Vec<Value>, String> {
    let client = server.client();
    let mut all = Vec::new();
    let mut after = 0;
    for _ in 0..10_000 {
        let url = server.url(&format!(
            "/v1/conversations/{conversation}/messages?after_seq={after}&limit={PAGE_LIMIT}"
        ));
        let resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET messages after_seq={after}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| format!("body: {e}"))?;
        if status != 200 {
            return Err(format!("GET messages after_seq={after}: {status} {text}"));
        }
        let page: Value =
            serde_json::from_str(&text).map_err(|e| format!("page is not JSON ({e}): {text}"))?;
        if let Some(reported) = page["gaps"].as_array().filter(|g| !g.is_empty()) {
            let Some(gaps) = gaps.as_deref_mut() else {
                return Err(format!(
                    "page after_seq={after} reports gaps: {}",
                    page["gaps"]
                ));
            };
            for g in reported {
                match (g["from_seq"].as_u64(), g["to_seq"].as_u64()) {
                    (Some(a), Some(b)) if a <= b => gaps.push((a, b)),
                    _ => return Err(format!("malformed gap {g} after_seq={after}")),
                }
            }
        }
        let messages = page["messages"]
            .as_array()
            .ok_or_else(|| format!("page without messages: {text}"))?;
        let has_more = page["has_more"].as_bool().unwrap_or(false);
        if let Some(last) = messages.last() {
            after = last["seq"]
                .as_u64()
                .ok_or_else(|| format!("message without seq: {last}"))?;
        } else if has_more {
            return Err(format!("empty page with has_more after_seq={after}"));
        }
        all.extend(messages.iter().cloned());
        if !has_more {
            return Ok(all);
        }
    }
    Err("more than 10000 pages".to_owned())
}

/// Collects violations; keeps the first [`REPORT_LIMIT`] verbatim.
#[derive(Default)]
struct Violations {
    listed: Vec<String>,
    total: usize,
}

impl Violations {
    fn add(&mut self, what: String) {
        self.total += 1;
        if self.listed.len() < REPORT_LIMIT {
            self.listed.push(what);
        }
    }
}

fn key_of(message: &Value) -> Option<&str> {
    message["metadata"]["key"].as_str()
}

fn seq_of(message: &Value) -> Option<u64> {
    message["seq"].as_u64()
}

/// Judges one snapshot. `Ok` with counts when every rule in the module docs holds; `Err` with a
/// report listing the violations otherwise.
pub fn verify(
    observed: &Observed,
    log: &WriteLog,
    subscribers: &SubscriberLog,
) -> Result<CheckSummary, String> {
    judge(observed, log, subscribers, 1)
}

/// Rule 4 after a failover: `got` is an ascending subsequence of `expected`, and every stored
/// seq up to the last received one that was not received lies in a `gap` push it got.
///
/// One exception, which PROTOCOL.md ("Node loss") allows: the dead node may have shown a
/// message just before it stopped and never got its ack out; the writer's retry of the key was
/// then taken by a live node at a new seq, so the restore left the reserved seq empty. A
/// received message at a seq the pages report as an empty reserved seq is therefore allowed
/// when its key is stored at a later seq.
fn judge_gapped_subscriber(
    conversation: &str,
    sub: &super::subscribers::SubState,
    expected: &[(u64, &str)],
    got: &[(u64, &str)],
    stored_keys: &HashMap<&str, u64>,
    empty_reserved: &[(u64, u64)],
    v: &mut Violations,
) {
    let pushed: Vec<(u64, u64)> = sub
        .gaps
        .iter()
        .filter_map(|g| Some((g["from_seq"].as_u64()?, g["to_seq"].as_u64()?)))
        .collect();
    let stored: HashMap<u64, &str> = expected.iter().copied().collect();
    let mut last = 0;
    for &(seq, id) in got {
        if seq <= last {
            v.add(format!(
                "{conversation}: the subscriber via n{} received seq {seq} after seq {last}",
                sub.node
            ));
        }
        let retried_elsewhere = !stored.contains_key(&seq)
            && empty_reserved.iter().any(|&(a, b)| a <= seq && seq <= b)
            && sub
                .keys
                .get(id)
                .and_then(|key| stored_keys.get(key.as_str()))
                .is_some_and(|&at| at > seq);
        if stored.get(&seq) != Some(&id) && !retried_elsewhere {
            v.add(format!(
                "{conversation}: the subscriber via n{} received seq {seq} id {id}, stored {:?}",
                sub.node,
                stored.get(&seq)
            ));
        }
        last = last.max(seq);
    }
    let received: std::collections::HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    let missed: Vec<u64> = expected
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s <= last && !received.contains(s))
        .filter(|s| !pushed.iter().any(|&(a, b)| a <= *s && *s <= b))
        .collect();
    if !missed.is_empty() {
        v.add(format!(
            "{conversation}: the subscriber via n{} missed stored seqs {missed:?} that no gap push \
             {pushed:?} covered",
            sub.node
        ));
    }
}

/// [`verify`] of the snapshot taken after `rounds` read passes.
fn judge(
    observed: &Observed,
    log: &WriteLog,
    subscribers: &SubscriberLog,
    rounds: usize,
) -> Result<CheckSummary, String> {
    let mut v = Violations::default();

    for what in &log.hard_errors {
        v.add(format!("writer hard error: {what}"));
    }

    let mut acks_by_conversation: HashMap<&str, Vec<_>> = HashMap::new();
    for ack in &log.acks {
        if !observed.reads.contains_key(&ack.conversation) {
            v.add(format!(
                "ack of {} for {}, a conversation the check was not given",
                ack.key, ack.conversation
            ));
        }
        acks_by_conversation
            .entry(ack.conversation.as_str())
            .or_default()
            .push(ack);
    }

    for (conversation, reads) in &observed.reads {
        // 1. Every node: seqs 1..N, and the same messages as the first node that answered.
        let mut reference: Option<(&str, &Vec<Value>)> = None;
        for (label, read) in reads {
            let messages = match read {
                Ok(m) => m,
                Err(e) => {
                    v.add(format!(
                        "{conversation}: reading through {label} failed: {e}"
                    ));
                    continue;
                }
            };
            if observed.allow_gaps {
                let gaps = observed
                    .gaps
                    .get(&(conversation.clone(), label.clone()))
                    .map_or(&[][..], Vec::as_slice);
                let in_gap = |seq: u64| gaps.iter().any(|&(a, b)| a <= seq && seq <= b);
                let mut expected = 1;
                for m in messages {
                    let Some(seq) = seq_of(m) else {
                        v.add(format!("{conversation} through {label}: no seq in {m}"));
                        break;
                    };
                    if seq < expected {
                        v.add(format!(
                            "{conversation} through {label}: seq {seq} after seq {}",
                            expected - 1
                        ));
                        break;
                    }
                    if let Some(hole) = (expected..seq).find(|s| !in_gap(*s)) {
                        v.add(format!(
                            "{conversation} through {label}: seq {hole} holds nothing and no \
                             page reported it as a gap (gaps {gaps:?})"
                        ));
                    }
                    if in_gap(seq) {
                        v.add(format!(
                            "{conversation} through {label}: seq {seq} holds a message inside \
                             a reported gap {gaps:?}"
                        ));
                    }
                    expected = seq + 1;
                }
                if let Some((ref_label, _)) = reference {
                    let theirs = observed
                        .gaps
                        .get(&(conversation.clone(), ref_label.to_owned()));
                    if theirs.map(Vec::as_slice) != Some(gaps) {
                        v.add(format!(
                            "{conversation}: {ref_label} reports gaps {theirs:?}, {label} {gaps:?}"
                        ));
                    }
                }
            } else if let Some((i, m)) = messages
                .iter()
                .enumerate()
                .find(|(i, m)| seq_of(m) != Some(*i as u64 + 1))
            {
                v.add(format!(
                    "{conversation} through {label}: seqs are not 1..{}: position {} holds seq \
                     {:?} (seqs around it: {:?})",
                    messages.len(),
                    i + 1,
                    seq_of(m),
                    messages[i.saturating_sub(2)..(i + 3).min(messages.len())]
                        .iter()
                        .map(seq_of)
                        .collect::<Vec<_>>()
                ));
            }
            match reference {
                None => reference = Some((label, messages)),
                Some((ref_label, ref_messages)) => {
                    if messages.len() != ref_messages.len() {
                        v.add(format!(
                            "{conversation}: {ref_label} returns {} messages, {label} returns {}",
                            ref_messages.len(),
                            messages.len()
                        ));
                    }
                    if let Some((a, b)) = ref_messages.iter().zip(messages).find(|(a, b)| a != b) {
                        v.add(format!(
                            "{conversation}: {ref_label} and {label} disagree: {a} vs {b}"
                        ));
                    }
                }
            }
        }
        let Some((ref_label, stored)) = reference else {
            continue;
        };
        let by_seq: BTreeMap<u64, &Value> = stored
            .iter()
            .filter_map(|m| seq_of(m).map(|s| (s, m)))
            .collect();
        let n = stored.len() as u64;

        // 2. Every stored message: a key we sent, here, with its content; each key once.
        let mut seqs_of_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (&seq, message) in &by_seq {
            let Some(key) = key_of(message) else {
                v.add(format!(
                    "{conversation} seq {seq} holds a message without metadata.key: {message}"
                ));
                continue;
            };
            seqs_of_key.entry(key).or_default().push(seq);
            match log.attempts.get(key) {
                None => v.add(format!(
                    "{conversation} seq {seq} holds key {key}, which no writer sent: {message}"
                )),
                Some(attempt) => {
                    if attempt.conversation != *conversation {
                        v.add(format!(
                            "{conversation} seq {seq} holds key {key}, which was sent to {}",
                            attempt.conversation
                        ));
                    }
                    if message["content"] != attempt.content {
                        v.add(format!(
                            "{conversation} seq {seq} key {key}: stored content {} but {} sent {}",
                            message["content"], attempt.writer, attempt.content
                        ));
                    }
                }
            }
        }
        for (key, seqs) in &seqs_of_key {
            if seqs.len() > 1 {
                v.add(format!(
                    "{conversation}: idempotency key {key} is stored at seqs {seqs:?}"
                ));
            }
        }

        // 3. Every ack: its key at its seq, with its content and id; one seq per key.
        let mut acked_seq_of_key: HashMap<&str, u64> = HashMap::new();
        for ack in acks_by_conversation
            .get(conversation.as_str())
            .into_iter()
            .flatten()
        {
            let what = format!(
                "{conversation}: ack of {} at seq {} (via n{} {}, writer {})",
                ack.key, ack.seq, ack.node, ack.via, ack.writer
            );
            if let Some(other) = acked_seq_of_key.insert(&ack.key, ack.seq) {
                if other != ack.seq {
                    v.add(format!(
                        "{what}: the same key was also acked at seq {other}"
                    ));
                }
            }
            match by_seq.get(&ack.seq) {
                None => v.add(format!(
                    "{what}: nothing stored there (the conversation has {n} messages \
                     through {ref_label}) — an acknowledged message is lost"
                )),
                Some(message) => {
                    if key_of(message) != Some(ack.key.as_str()) {
                        v.add(format!(
                            "{what}: seq {} holds key {:?} instead",
                            ack.seq,
                            key_of(message)
                        ));
                    } else {
                        if message["content"] != ack.content {
                            v.add(format!(
                                "{what}: stored content {} differs from the acked {}",
                                message["content"], ack.content
                            ));
                        }
                        if message["id"].as_str() != Some(ack.id.as_str()) {
                            v.add(format!(
                                "{what}: stored id {} differs from the acked {}",
                                message["id"], ack.id
                            ));
                        }
                    }
                }
            }
        }

        // 4. Its subscriber: exactly (1, id1) … (N, idN), in order, no gap push.
        if let Some(sub) = subscribers.get(conversation) {
            let expected: Vec<(u64, &str)> = by_seq
                .iter()
                .map(|(s, m)| (*s, m["id"].as_str().unwrap_or("")))
                .collect();
            let got: Vec<(u64, &str)> = sub
                .delivered
                .iter()
                .map(|(s, id)| (*s, id.as_str()))
                .collect();
            if observed.allow_gaps {
                let stored_keys: HashMap<&str, u64> = by_seq
                    .iter()
                    .filter_map(|(s, m)| Some((key_of(m)?, *s)))
                    .collect();
                let empty_reserved = observed
                    .gaps
                    .get(&(conversation.clone(), ref_label.to_owned()))
                    .map_or(&[][..], Vec::as_slice);
                judge_gapped_subscriber(
                    conversation,
                    sub,
                    &expected,
                    &got,
                    &stored_keys,
                    empty_reserved,
                    &mut v,
                );
                continue;
            }
            let first_diff =
                (0..expected.len().max(got.len())).find(|&i| expected.get(i) != got.get(i));
            if let Some(i) = first_diff {
                let window = |xs: &[(u64, &str)]| -> Vec<u64> {
                    xs[i.saturating_sub(3).min(xs.len())..(i + 4).min(xs.len())]
                        .iter()
                        .map(|(s, _)| *s)
                        .collect()
                };
                v.add(format!(
                    "{conversation}: the subscriber via n{} received {} pushes for {} stored \
                     messages; delivery #{} is {:?}, expected {:?} (received seqs around it \
                     {:?}, stored {:?}; {} joins, {} connects, faults {:?})",
                    sub.node,
                    got.len(),
                    expected.len(),
                    i + 1,
                    got.get(i),
                    expected.get(i),
                    window(&got),
                    window(&expected),
                    sub.joins,
                    sub.connects,
                    sub.faults
                ));
            }
            for gap in &sub.gaps {
                v.add(format!(
                    "{conversation}: the subscriber via n{} got a gap push {gap}",
                    sub.node
                ));
            }
        }
    }

    let summary = CheckSummary {
        conversations: observed.reads.len(),
        nodes: observed.reads.values().map(Vec::len).max().unwrap_or(0),
        messages: observed.messages(),
        acks: log.acks.len(),
        deduped_acks: log.acks.iter().filter(|a| a.deduped).count(),
        abandoned: log.abandoned.len(),
        errors: log.errors.clone(),
        subscribers: subscribers.len(),
        deliveries: subscribers.values().map(|s| s.delivered.len()).sum(),
        backpressure: subscribers.values().map(|s| s.backpressure).sum(),
        rejoins: subscribers
            .values()
            .map(|s| s.joins.saturating_sub(1))
            .sum(),
        reconnects: subscribers
            .values()
            .map(|s| s.connects.saturating_sub(1))
            .sum(),
        subscriber_faults: subscribers.values().fold(BTreeMap::new(), |mut all, s| {
            for (k, n) in &s.faults {
                *all.entry(k.clone()).or_default() += n;
            }
            all
        }),
        rounds,
    };
    if v.total == 0 {
        return Ok(summary);
    }
    let mut report = format!("check failed: {} violations", v.total);
    if v.total > v.listed.len() {
        report.push_str(&format!(" (first {} listed)", v.listed.len()));
    }
    report.push('\n');
    for line in &v.listed {
        report.push_str("  - ");
        report.push_str(line);
        report.push('\n');
    }
    report.push_str(&summary.to_string());
    Err(report)
}
