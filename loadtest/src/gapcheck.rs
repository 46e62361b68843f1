//! The zero-gap checker: one [`SeqChecker`] per subscriber, fed every delivered seq in arrival
//! order. The contract under test is "every seq from the first expected one through the final
//! one, each exactly once, in order". Any departure is a [`Violation`]:
//! - a **gap**: a seq arrived while earlier ones were still missing;
//! - a **reorder**: one of those missing seqs arrived late;
//! - a **repeat**: a seq arrived that had already been delivered;
//! - **short**: at the end the subscriber had not reached the final seq.
//!
//! Missing seqs are kept as ranges, so a huge gap costs one entry, not one per seq.
//!
//! [`AckLog`] extends the check from what subscribers saw to what the writers were promised
//! (`cluster`): it holds every acknowledgement of one conversation (send index, seq) and checks
//! a read of the stored log against them: seqs `1..=final` with no hole or repeat (the same
//! [`SeqChecker`]), every acknowledged send at its acknowledged seq, no send stored twice, the
//! node's `last_seq` equal to the final one. The acknowledgements themselves must agree (one
//! seq per idempotency key, one key per seq), and the sends of one socket must take seqs in the
//! order they left it.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// Expected `expected`, got `got` (seqs `expected..got` were skipped).
    Gap { expected: u64, got: u64 },
    /// `seq` arrived after later seqs had.
    Reorder { seq: u64 },
    /// `seq` arrived again.
    Repeat { seq: u64 },
    /// The server pushed an explicit `gap` event.
    ServerGap { from_seq: u64, to_seq: u64 },
    /// The subscriber ended at `reached` but the conversation's final seq is `final_seq`.
    Short { reached: u64, final_seq: u64 },
    /// Send `index` was acknowledged at `acked_seq` but the log holds it at `read_seq`.
    Misplaced {
        index: u64,
        acked_seq: u64,
        read_seq: u64,
    },
    /// Send `index` was acknowledged at `seq` and the log does not hold it.
    Lost { index: u64, seq: u64 },
    /// Send `index` is stored twice.
    Duplicate {
        index: u64,
        first_seq: u64,
        again_seq: u64,
    },
    /// Two acknowledgements disagree: one idempotency key at two seqs, or two keys at one seq.
    AckConflict { seq: u64, index: u64, other: String },
    /// A send that left its socket after the one acknowledged at `earlier_seq` took `seq`.
    SendOrder { earlier_seq: u64, seq: u64 },
    /// A node reports `last_seq` `reported` where the final seq is `final_seq`.
    Diverged { reported: u64, final_seq: u64 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Gap { expected, got } => {
                write!(f, "GAP: expected seq {expected}, got {got}")
            }
            Violation::Reorder { seq } => write!(f, "REORDER: seq {seq} arrived after later seqs"),
            Violation::Repeat { seq } => write!(f, "REPEAT: seq {seq} delivered twice"),
            Violation::ServerGap { from_seq, to_seq } => {
                write!(f, "SERVER GAP: server skipped {from_seq}..={to_seq}")
            }
            Violation::Short { reached, final_seq } => {
                write!(f, "SHORT: reached seq {reached}, final seq is {final_seq}")
            }
            Violation::Misplaced {
                index,
                acked_seq,
                read_seq,
            } => write!(
                f,
                "MISPLACED: send {index} acknowledged at seq {acked_seq}, stored at {read_seq}"
            ),
            Violation::Lost { index, seq } => {
                write!(f, "LOST: send {index} acknowledged at seq {seq}, not stored")
            }
            Violation::Duplicate {
                index,
                first_seq,
                again_seq,
            } => write!(
                f,
                "DUPLICATE: send {index} stored at seq {first_seq} and again at {again_seq}"
            ),
            Violation::AckConflict { seq, index, other } => {
                write!(f, "ACK CONFLICT: send {index} acknowledged at seq {seq}, {other}")
            }
            Violation::SendOrder { earlier_seq, seq } => write!(
                f,
                "SEND ORDER: a send took seq {seq} although an earlier send of its socket took {earlier_seq}"
            ),
            Violation::Diverged {
                reported,
                final_seq,
            } => write!(
                f,
                "DIVERGED: last_seq {reported} where the final seq is {final_seq}"
            ),
        }
    }
}

/// Counts of each kind of violation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ViolationCounts {
    pub gaps: u64,
    /// Seqs that were missing at the end (inside gaps, not counting a short tail).
    pub missing: u64,
    pub reorders: u64,
    pub repeats: u64,
    pub server_gaps: u64,
    /// Server gaps accepted as seqs a failover reserved (`--reserved-gaps`): reported, not a
    /// violation.
    pub reserved_gaps: u64,
    /// Seqs those reserved gaps skipped (not delivered, and not expected to be).
    pub reserved_seqs: u64,
    pub short: u64,
    /// [`AckLog`]: acknowledged sends stored at another seq.
    pub misplaced: u64,
    /// [`AckLog`]: acknowledged sends not stored at all.
    pub lost: u64,
    /// [`AckLog`]: sends stored more than once.
    pub duplicates: u64,
    /// [`AckLog`]: acknowledgements that contradict each other.
    pub ack_conflicts: u64,
    /// [`AckLog`]: sends of one socket that took seqs out of the order they were sent in.
    pub send_order: u64,
    /// [`AckLog`]: reads whose `last_seq` is not the final seq.
    pub diverged: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.gaps
            + self.reorders
            + self.repeats
            + self.server_gaps
            + self.short
            + self.misplaced
            + self.lost
            + self.duplicates
            + self.ack_conflicts
            + self.send_order
            + self.diverged
    }

    pub fn add(&mut self, o: &ViolationCounts) {
        self.gaps += o.gaps;
        self.missing += o.missing;
        self.reorders += o.reorders;
        self.repeats += o.repeats;
        self.server_gaps += o.server_gaps;
        self.reserved_gaps += o.reserved_gaps;
        self.reserved_seqs += o.reserved_seqs;
        self.short += o.short;
        self.misplaced += o.misplaced;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.ack_conflicts += o.ack_conflicts;
        self.send_order += o.send_order;
        self.diverged += o.diverged;
    }

    /// The non-zero counts, for a one-line verdict (`"2 gaps, 1 lost"`); empty when clean.
    pub fn describe(&self) -> String {
        let parts = [
            (self.gaps, "gaps"),
            (self.repeats, "repeats"),
            (self.reorders, "reorders"),
            (self.server_gaps, "server gaps"),
            (self.short, "short"),
            (self.misplaced, "misplaced"),
            (self.lost, "lost"),
            (self.duplicates, "duplicates"),
            (self.ack_conflicts, "ack conflicts"),
            (self.send_order, "send-order violations"),
            (self.diverged, "diverged last_seq"),
        ];
        parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Violations kept verbatim per checker; beyond this they are only counted.
const MAX_KEPT: usize = 16;

#[derive(Debug, Clone)]
pub struct SeqChecker {
    /// The next seq an in-order stream must deliver.
    next: u64,
    /// Skipped seqs not yet seen: start -> end (inclusive).
    missing: BTreeMap<u64, u64>,
    delivered: u64,
    counts: ViolationCounts,
    kept: Vec<Violation>,
    /// Server gaps are seqs a failover reserved, not violations.
    reserved_gaps: bool,
}

impl SeqChecker {
    /// A subscriber that expects `first` as its first seq (1 for a join from the start).
    pub fn new(first: u64) -> SeqChecker {
        SeqChecker {
            next: first,
            missing: BTreeMap::new(),
            delivered: 0,
            counts: ViolationCounts::default(),
            kept: Vec::new(),
            reserved_gaps: false,
        }
    }

    /// Counts server gaps as seqs a failover reserved for a lost node (a run with node loss
    /// under `durability = "local"`) instead of as violations: the server names them, and the
    /// other checks (every acknowledged send at its seq, no repeat, order) still hold.
    pub fn allowing_reserved_gaps(mut self, allow: bool) -> SeqChecker {
        self.reserved_gaps = allow;
        self
    }

    fn keep(&mut self, v: Violation) {
        if self.kept.len() < MAX_KEPT {
            self.kept.push(v);
        }
    }

    /// The highest seq delivered in order so far: the `after_seq` to resume from.
    pub fn last_seen(&self) -> u64 {
        self.next - 1
    }

    /// Messages delivered, including bad ones.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    pub fn observe(&mut self, seq: u64) {
        self.delivered += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            self.counts.gaps += 1;
            self.keep(Violation::Gap {
                expected: self.next,
                got: seq,
            });
            self.missing.insert(self.next, seq - 1);
            self.next = seq + 1;
        } else if self.take_missing(seq) {
            self.counts.reorders += 1;
            self.keep(Violation::Reorder { seq });
        } else {
            self.counts.repeats += 1;
            self.keep(Violation::Repeat { seq });
        }
    }

    /// The server said `from..=to` no longer exist; the stream continues after `to`.
    pub fn observe_server_gap(&mut self, from_seq: u64, to_seq: u64) {
        if self.reserved_gaps {
            self.counts.reserved_gaps += 1;
            self.counts.reserved_seqs += (to_seq + 1).saturating_sub(self.next);
        } else {
            self.counts.server_gaps += 1;
            self.keep(Violation::ServerGap { from_seq, to_seq });
        }
        self.next = self.next.max(to_seq + 1);
    }

    /// Removes `seq` from the missing ranges; false when it was not missing.
    fn take_missing(&mut self, seq: u64) -> bool {
        let Some((&start, &end)) = self.missing.range(..=seq).next_back() else {
            return false;
        };
        if seq > end {
            return false;
        }
        self.missing.remove(&start);
        if start < seq {
            self.missing.insert(start, seq - 1);
        }
        if seq < end {
            self.missing.insert(seq + 1, end);
        }
        true
    }

    /// Ends the check against the conversation's final seq; returns the counts and the kept
    /// violations.
    pub fn finish(mut self, final_seq: u64) -> (ViolationCounts, Vec<Violation>) {
        self.counts.missing = self.missing.iter().map(|(s, e)| e - s + 1).sum();
        if self.last_seen() < final_seq {
            self.counts.short += 1;
            self.keep(Violation::Short {
                reached: self.last_seen(),
                final_seq,
            });
        }
        (self.counts, self.kept)
    }
}

/// One acknowledged append, as its writer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The send index: the content's `i`, and what the idempotency key is made of.
    pub index: u64,
    pub seq: u64,
    /// When the accepted attempt left its socket, as a count of that socket's sends; sends of
    /// one socket to one conversation must take seqs in this order.
    pub sent_order: u64,
    /// The server answered a repeat of a key it already held (the first attempt's seq).
    pub deduped: bool,
}

/// One message of a read of the stored log: its seq and, for the load tool's own messages, the
/// send index in its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub index: Option<u64>,
}

/// A read of one conversation's log from one node, walked from seq 1 to its end.
#[derive(Debug, Clone, Default)]
pub struct LogRead {
    /// Every message in the order the pages gave them.
    pub messages: Vec<Stored>,
    /// `gaps` ranges the pages reported (seqs a failover reserved and nobody filled).
    pub gaps: Vec<(u64, u64)>,
    /// The node's `last_seq` for the conversation.
    pub last_seq: u64,
}

/// The acknowledgements of one conversation, checked as they come in and then against reads of
/// the log. See the module docs for the contract.
#[derive(Debug, Clone, Default)]
pub struct AckLog {
    /// send index -> acknowledged seq.
    by_index: HashMap<u64, u64>,
    /// acknowledged seq -> send index.
    by_seq: HashMap<u64, u64>,
    /// `(sent_order, seq)` of acknowledgements that stored a message (not deduped).
    sent: Vec<(u64, u64)>,
    counts: ViolationCounts,
    kept: Vec<Violation>,
}

impl AckLog {
    pub fn new() -> AckLog {
        AckLog::default()
    }

    fn keep(&mut self, v: Violation) {
        if self.kept.len() < MAX_KEPT {
            self.kept.push(v);
        }
    }

    /// Acknowledged sends (distinct keys).
    pub fn acked(&self) -> u64 {
        self.by_index.len() as u64
    }

    /// The highest acknowledged seq (0 when nothing was).
    pub fn max_seq(&self) -> u64 {
        self.by_seq.keys().copied().max().unwrap_or(0)
    }

    pub fn record(&mut self, ack: Ack) {
        match self.by_index.get(&ack.index) {
            Some(&seq) if seq != ack.seq => {
                self.counts.ack_conflicts += 1;
                self.keep(Violation::AckConflict {
                    seq: ack.seq,
                    index: ack.index,
                    other: format!("and before at seq {seq}"),
                });
                return;
            }
            Some(_) => return,
            None => {}
        }
        if let Some(&other) = self.by_seq.get(&ack.seq) {
            self.counts.ack_conflicts += 1;
            self.keep(Violation::AckConflict {
                seq: ack.seq,
                index: ack.index,
                other: format!("the seq of send {other} too"),
            });
            return;
        }
        self.by_index.insert(ack.index, ack.seq);
        self.by_seq.insert(ack.seq, ack.index);
        if !ack.deduped {
            self.sent.push((ack.sent_order, ack.seq));
        }
    }

    /// The checks of the acknowledgements alone: conflicts seen while recording, and send order.
    pub fn check_acks(&self) -> (ViolationCounts, Vec<Violation>) {
        let mut counts = self.counts;
        let mut kept = self.kept.clone();
        let mut sent = self.sent.clone();
        sent.sort_unstable();
        for w in sent.windows(2) {
            let ((_, earlier_seq), (_, seq)) = (w[0], w[1]);
            if seq <= earlier_seq {
                counts.send_order += 1;
                if kept.len() < MAX_KEPT {
                    kept.push(Violation::SendOrder { earlier_seq, seq });
                }
            }
        }
        (counts, kept)
    }

    /// Checks one node's read of the log against the acknowledgements and `final_seq`, the
    /// conversation's last seq as the run settled it.
    /// With `reserved_gaps`, the pages' `gaps` are seqs a failover reserved, not violations.
    pub fn check_read(
        &self,
        read: &LogRead,
        final_seq: u64,
        reserved_gaps: bool,
    ) -> (ViolationCounts, Vec<Violation>) {
        let mut seqs = SeqChecker::new(1).allowing_reserved_gaps(reserved_gaps);
        let mut counts = ViolationCounts::default();
        let mut kept = Vec::new();
        fn keep(kept: &mut Vec<Violation>, v: Violation) {
            if kept.len() < MAX_KEPT {
                kept.push(v);
            }
        }
        // Gaps in seq order among the messages: each before the first message after it.
        let mut gaps = read.gaps.clone();
        gaps.sort_unstable();
        let mut gaps = gaps.into_iter().peekable();
        // Where each send index was found, to tell a duplicate and a misplaced send apart.
        let mut found: HashMap<u64, u64> = HashMap::with_capacity(self.by_index.len());
        for m in &read.messages {
            while let Some((from_seq, to_seq)) = gaps.next_if(|&(from_seq, _)| from_seq < m.seq) {
                seqs.observe_server_gap(from_seq, to_seq);
            }
            seqs.observe(m.seq);
            let Some(index) = m.index else { continue };
            if let Some(&first_seq) = found.get(&index) {
                counts.duplicates += 1;
                keep(
                    &mut kept,
                    Violation::Duplicate {
                        index,
                        first_seq,
                        again_seq: m.seq,
                    },
                );
                continue;
            }
            found.insert(index, m.seq);
            if let Some(&acked_seq) = self.by_index.get(&index) {
                if acked_seq != m.seq {
                    counts.misplaced += 1;
                    keep(
                        &mut kept,
                        Violation::Misplaced {
                            index,
                            acked_seq,
                            read_seq: m.seq,
                        },
                    );
                }
            }
        }
        for (from_seq, to_seq) in gaps {
            seqs.observe_server_gap(from_seq, to_seq);
        }
        let mut lost: Vec<(u64, u64)> = self
            .by_index
            .iter()
            .filter(|(index, _)| !found.contains_key(index))
            .map(|(&index, &seq)| (seq, index))
            .collect();
        lost.sort_unstable();
        counts.lost += lost.len() as u64;
        for (seq, index) in lost {
            keep(&mut kept, Violation::Lost { index, seq });
        }
        if read.last_seq != final_seq {
            counts.diverged += 1;
            keep(
                &mut kept,
                Violation::Diverged {
                    reported: read.last_seq,
                    final_seq,
                },
            );
        }
        let (seq_counts, seq_kept) = seqs.finish(final_seq);
        counts.add(&seq_counts);
        for v in seq_kept {
            keep(&mut kept, v);
        }
        (counts, kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(seqs: &[u64], final_seq: u64) -> (ViolationCounts, Vec<Violation>) {
        let mut c = SeqChecker::new(1);
        for &s in seqs {
            c.observe(s);
        }
        c.finish(final_seq)
    }

    #[test]
    fn a_clean_stream_has_no_violations() {
        let seqs: Vec<u64> = (1..=1000).collect();
        let (counts, kept) = check(&seqs, 1000);
        assert_eq!(counts.total(), 0);
        assert!(kept.is_empty());
    }

    #[test]
    fn catches_an_injected_gap() {
        let seqs: Vec<u64> = (1..=100).filter(|&s| s != 42).collect();
        let (counts, kept) = check(&seqs, 100);
        assert_eq!((counts.gaps, counts.missing, counts.total()), (1, 1, 1));
        assert_eq!(
            kept,
            vec![Violation::Gap {
                expected: 42,
                got: 43
            }]
        );
    }

    #[test]
    fn catches_an_injected_repeat() {
        let mut seqs: Vec<u64> = (1..=100).collect();
        seqs.insert(50, 50); // 50 delivered twice in a row
        seqs.push(7); // and an old one at the end
        let (counts, kept) = check(&seqs, 100);
        assert_eq!((counts.repeats, counts.total()), (2, 2));
        assert_eq!(
            kept,
            vec![Violation::Repeat { seq: 50 }, Violation::Repeat { seq: 7 }]
        );
    }

    #[test]
    fn catches_reordering_and_tells_it_from_a_repeat() {
        // 1 2 4 3 5: 3 was missing when 4 came (a gap), then arrives late (a reorder).
        let (counts, kept) = check(&[1, 2, 4, 3, 5], 5);
        assert_eq!((counts.gaps, counts.reorders, counts.repeats), (1, 1, 0));
        assert_eq!(counts.missing, 0, "3 eventually arrived");
        assert_eq!(
            kept,
            vec![
                Violation::Gap {
                    expected: 3,
                    got: 4
                },
                Violation::Reorder { seq: 3 }
            ]
        );
        // The same seq a second time after being filled in is a repeat.
        let (counts, _) = check(&[1, 4, 2, 3, 2, 5], 5);
        assert_eq!((counts.gaps, counts.reorders, counts.repeats), (1, 2, 1));
    }

    #[test]
    fn a_stream_that_stops_early_is_short() {
        let (counts, kept) = check(&[1, 2, 3], 5);
        assert_eq!((counts.short, counts.total()), (1, 1));
        assert_eq!(
            kept,
            vec![Violation::Short {
                reached: 3,
                final_seq: 5
            }]
        );
        // An empty conversation and a subscriber that saw nothing: fine.
        assert_eq!(check(&[], 0).0.total(), 0);
    }

    #[test]
    fn resuming_from_a_cursor_and_server_gaps() {
        let mut c = SeqChecker::new(11);
        for s in 11..=20 {
            c.observe(s);
        }
        assert_eq!(c.last_seen(), 20);
        c.observe_server_gap(21, 30);
        c.observe(31);
        let (counts, _) = c.finish(31);
        assert_eq!((counts.server_gaps, counts.total()), (1, 1));
    }

    #[test]
    fn a_wide_gap_is_one_range_and_filling_its_middle_splits_it() {
        let mut c = SeqChecker::new(1);
        c.observe(1);
        c.observe(1_000_001);
        c.observe(500);
        let (counts, _) = c.finish(1_000_001);
        assert_eq!((counts.gaps, counts.reorders), (1, 1));
        assert_eq!(counts.missing, 999_998);
    }

    fn ack(index: u64, seq: u64, sent_order: u64) -> Ack {
        Ack {
            index,
            seq,
            sent_order,
            deduped: false,
        }
    }

    /// A read holding send `i` at seq `i + 1` for every seq in `seqs`.
    fn read(seqs: &[u64]) -> LogRead {
        LogRead {
            messages: seqs
                .iter()
                .map(|&seq| Stored {
                    seq,
                    index: Some(seq - 1),
                })
                .collect(),
            gaps: Vec::new(),
            last_seq: seqs.iter().copied().max().unwrap_or(0),
        }
    }

    fn acked(n: u64) -> AckLog {
        let mut log = AckLog::new();
        for i in 0..n {
            log.record(ack(i, i + 1, i));
        }
        log
    }

    #[test]
    fn a_log_that_holds_every_ack_in_place_is_clean() {
        let log = acked(100);
        assert_eq!((log.acked(), log.max_seq()), (100, 100));
        assert_eq!(log.check_acks().0.total(), 0);
        let seqs: Vec<u64> = (1..=100).collect();
        let (counts, kept) = log.check_read(&read(&seqs), 100, false);
        assert_eq!(counts.total(), 0, "{kept:?}");
        // Messages nobody acknowledged (a send that failed at the client but was stored, or
        // someone else's) are fine as long as the seqs stay whole.
        let mut more = read(&(1..=101).collect::<Vec<_>>());
        more.messages[100].index = None;
        assert_eq!(log.check_read(&more, 101, false).0.total(), 0);
    }

    #[test]
    fn catches_a_lost_a_misplaced_and_a_duplicated_send() {
        let log = acked(10);
        // Send 4 (seq 5) is missing: a hole and a lost ack.
        let (c, kept) = log.check_read(&read(&[1, 2, 3, 4, 6, 7, 8, 9, 10]), 10, false);
        assert_eq!((c.gaps, c.lost, c.total()), (1, 1, 2), "{kept:?}");
        assert!(kept.contains(&Violation::Lost { index: 4, seq: 5 }));
        // Sends 2 and 3 swapped places.
        let mut swapped = read(&(1..=10).collect::<Vec<_>>());
        swapped.messages[2].index = Some(3);
        swapped.messages[3].index = Some(2);
        let (c, _) = log.check_read(&swapped, 10, false);
        assert_eq!((c.misplaced, c.total()), (2, 2));
        // Send 9 stored again at seq 11 (a retry that was not deduplicated).
        let mut twice = read(&(1..=11).collect::<Vec<_>>());
        twice.messages[10].index = Some(9);
        let (c, kept) = log.check_read(&twice, 11, false);
        assert_eq!((c.duplicates, c.total()), (1, 1));
        assert_eq!(
            kept,
            vec![Violation::Duplicate {
                index: 9,
                first_seq: 10,
                again_seq: 11
            }]
        );
    }

    #[test]
    fn a_node_that_disagrees_on_the_end_or_skips_is_caught() {
        let log = acked(5);
        // Stops early: the node's last_seq is 4 while the final seq is 5.
        let (c, _) = log.check_read(&read(&[1, 2, 3, 4]), 5, false);
        assert_eq!((c.diverged, c.short, c.lost), (1, 1, 1));
        // A repeated seq in the pages.
        let (c, _) = log.check_read(&read(&[1, 2, 3, 3, 4, 5]), 5, false);
        assert_eq!((c.repeats, c.duplicates), (1, 1));
        // A reserved range reported as a gap is a violation in a run without failover.
        let mut gapped = read(&[1, 2, 3, 4, 5]);
        gapped.gaps.push((6, 9));
        let (c, _) = log.check_read(&gapped, 5, false);
        assert_eq!(c.server_gaps, 1);
    }

    #[test]
    fn reserved_gaps_are_checked_in_seq_order_and_allowed_when_asked() {
        // Seqs 4..=8 were reserved by a failover; 4 and 5 were restored, 6..=8 stayed empty.
        let log = acked(3);
        let mut after_failover = read(&[1, 2, 3, 4, 5, 9, 10]);
        after_failover.last_seq = 10;
        after_failover.gaps.push((6, 8));
        let (c, kept) = log.check_read(&after_failover, 10, true);
        assert_eq!((c.total(), c.reserved_gaps), (0, 1), "{kept:?}");
        // Without failover the same gap is a violation, and only that: no repeat.
        let (c, _) = log.check_read(&after_failover, 10, false);
        assert_eq!((c.server_gaps, c.repeats, c.gaps, c.total()), (1, 0, 0, 1));
        // A hole no page names is a gap either way.
        let mut holed = read(&[1, 2, 3, 5, 9, 10]);
        holed.last_seq = 10;
        holed.gaps.push((6, 8));
        let (c, _) = log.check_read(&holed, 10, true);
        assert_eq!((c.gaps, c.reserved_gaps), (1, 1));
    }

    #[test]
    fn acknowledgements_must_agree_and_follow_send_order() {
        let mut log = AckLog::new();
        log.record(ack(0, 1, 0));
        log.record(ack(1, 3, 1));
        // Send 3 left after send 1 but took a lower seq: out of order.
        log.record(ack(3, 2, 2));
        // Send 2 was refused with try_again and went again last: its higher seq is right.
        log.record(ack(2, 4, 3));
        // A deduplicated repeat of send 0 at its own seq agrees; its send order is not checked.
        log.record(Ack {
            index: 0,
            seq: 1,
            sent_order: 9,
            deduped: true,
        });
        let (c, kept) = log.check_acks();
        assert_eq!(
            c.send_order, 1,
            "send 1 left before send 3 but took a later seq"
        );
        assert_eq!(
            kept,
            vec![Violation::SendOrder {
                earlier_seq: 3,
                seq: 2
            }]
        );
        // One key at two seqs, two keys at one seq.
        log.record(ack(0, 7, 10));
        log.record(ack(5, 4, 11));
        let (c, _) = log.check_acks();
        assert_eq!(c.ack_conflicts, 2);
        assert_eq!(c.describe(), "2 ack conflicts, 1 send-order violations");
    }
}
