//! The zero-gap checker: one [`SeqChecker`] per subscriber, fed every delivered seq in arrival
//! order. The contract under test is "every seq from the first expected one through the final
//! one, each exactly once, in order". Any departure is a [`Violation`]:
//! - a **gap**: a seq arrived while earlier ones were still missing;
//! - a **reorder**: one of those missing seqs arrived late;
//! - a **repeat**: a seq arrived that had already been delivered;
//! - **short**: at the end the subscriber had not reached the final seq.
//!
//! Missing seqs are kept as ranges, so a huge gap costs one entry, not one per seq.

use std::collections::BTreeMap;

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
    pub short: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.gaps + self.reorders + self.repeats + self.server_gaps + self.short
    }

    pub fn add(&mut self, o: &ViolationCounts) {
        self.gaps += o.gaps;
        self.missing += o.missing;
        self.reorders += o.reorders;
        self.repeats += o.repeats;
        self.server_gaps += o.server_gaps;
        self.short += o.short;
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
        }
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
        self.counts.server_gaps += 1;
        self.keep(Violation::ServerGap { from_seq, to_seq });
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
}
