//! Recovery: what [`super::Wal::open`] does before the writer starts.
//!
//! 1. Remove `*.tmp` leftovers; read the checkpoint `C` and the `lost-lsns` ranges.
//! 2. Scan the segments oldest first (memory mapped): every frame's CRC, and lsn continuity (+1
//!    each, across segment boundaries too). An lsn jump is accepted only over lsns that are ≤ `C`
//!    (archived, their segments may be gone) or declared lost by an earlier repair. Segments whose
//!    records are all ≤ `C` are not read at all.
//! 3. Classify the first bad spot:
//!    - **torn tail**: a bad or partial frame (or stray bytes after the end marker) in the *last*
//!      segment with no valid frame anywhere after it. The writer syncs a segment before naming its
//!      successor, so only the last one can hold unsynced data. It is zeroed on disk and synced;
//!      `torn_tail_bytes` says how much.
//!    - **corruption**: a bad frame followed by any valid frame, a bad frame in a non-last segment,
//!      an lsn discontinuity, a missing segment, or a log that starts after `C + 1` (behind what
//!      the checkpoint promised). Open refuses with a [`WalError::Corrupt`] / [`WalError::Behind`]
//!      naming the segment, offset and lsn range, unless `repair` is set.
//! 4. Repair (only with `repair`): the lost lsn range is written to `lost-lsns` *first* (so lsns
//!    are never reused even if repair is interrupted), then the damaged segment is copied to
//!    `quarantine/` and zeroed from the bad offset (its valid prefix stays), and every later
//!    segment is moved to `quarantine/`. A missing segment is only recorded as lost: nothing on
//!    disk is damaged. Then the scan runs again.
//! 5. Delete segments entirely ≤ `C`; continue in the last segment, or start a new one at
//!    `next_lsn = max(last lsn on disk, C, highest lost lsn) + 1`.
//!
//! Recovery must not guess: when it cannot tell a torn tail from corruption it calls it
//! corruption and refuses, because truncating acknowledged records silently is the worse error.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::checkpoint::{self, LostRanges};
use super::frame::{self, Decoded};
use super::io::WalIo;
use super::segment::{self, ActiveSegment, QUARANTINE_DIR};
use super::{Lsn, Recovery, WalError, WalOptions, WalRecord};

/// One damaged spot that repair dealt with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The damaged segment (for a missing segment: the one after the gap).
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
}

/// What `repair` did, precisely.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Every damaged spot found, in the order found.
    pub damage: Vec<Damage>,
    /// Files moved (or, for a segment whose valid prefix was kept, copied) into `quarantine/`.
    pub quarantined: Vec<PathBuf>,
    /// Lsns lost for good, `first..=last known`, above the checkpoint. Records below the
    /// checkpoint are archived and therefore not lost.
    pub lost: Vec<RangeInclusive<Lsn>>,
    /// The last lsn on disk after repair: every record up to it that was readable is kept.
    pub kept_through: Lsn,
    /// Set when the checkpoint file itself was unreadable and was rebuilt with this value.
    pub checkpoint_rebuilt: Option<Lsn>,
}

impl RepairReport {
    /// Total number of lost lsns.
    pub fn lost_count(&self) -> u64 {
        self.lost.iter().map(|r| r.end() - r.start() + 1).sum()
    }
}

/// Recovery's result, for `Wal::open`.
pub(super) struct Recovered {
    pub recovery: Recovery,
    /// Segments left on disk, oldest first; the last one is `active`.
    pub segments: Vec<(Lsn, PathBuf)>,
    pub active: ActiveSegment,
}

struct ScannedSegment {
    first_lsn: Lsn,
    path: PathBuf,
    /// End of valid data.
    end: u64,
    last_lsn: Option<Lsn>,
    /// Not read: every record in it is ≤ the checkpoint.
    skipped: bool,
}

impl ScannedSegment {
    /// The lsn the next frame appended to this segment would carry.
    fn continuation(&self) -> Lsn {
        self.last_lsn.map_or(self.first_lsn, |l| l + 1)
    }

    fn entirely_at_or_below(&self, checkpoint: Lsn) -> bool {
        self.continuation() <= checkpoint + 1
    }
}

struct DamageAt {
    /// First lsn (by name) of the damaged segment.
    segment_first_lsn: Lsn,
    segment: PathBuf,
    offset: u64,
    reason: String,
    first_lsn: Lsn,
    last_known_lsn: Option<Lsn>,
    /// Segments are missing (nothing on disk is damaged).
    gap: bool,
}

enum Outcome {
    Clean,
    TornTail {
        index: usize,
        offset: u64,
        end: u64,
    },
    Behind {
        first_on_disk: Lsn,
        segment: PathBuf,
    },
    Damaged(DamageAt),
}

struct Pass {
    records: Vec<WalRecord>,
    bytes_scanned: u64,
    segments: Vec<ScannedSegment>,
    outcome: Outcome,
}

/// How the frames of one segment ended.
enum SegmentEnd {
    Clean {
        end: u64,
    },
    Bad {
        offset: u64,
        reason: String,
        /// The frame at `offset` is intact but carries this unexpected lsn.
        misplaced_lsn: Option<Lsn>,
    },
}

pub(super) fn recover(
    io: &dyn WalIo,
    opts: &WalOptions,
    spare_counter: &AtomicU64,
) -> Result<Recovered, WalError> {
    let started = Instant::now();
    let dir = opts.dir.as_path();
    segment::remove_temp_files(io, dir)?;
    let mut lost = LostRanges::read(io, dir)?;
    let mut report = RepairReport::default();
    let mut repaired = false;
    let checkpoint = match checkpoint::read_checkpoint(io, dir)? {
        None => 0,
        Some(Ok(c)) => c,
        Some(Err(reason)) if !opts.repair => {
            return Err(WalError::Corrupt {
                segment: dir.join(checkpoint::CHECKPOINT_FILE),
                offset: 0,
                reason: format!("{reason}: the archived-lsn checkpoint is unreadable"),
                first_lsn: 0,
                last_known_lsn: None,
            })
        }
        Some(Err(reason)) => {
            // Segments are only ever deleted below the checkpoint, so everything before the
            // oldest segment was archived; that is the highest checkpoint we can prove.
            let segments = segment::list_segments(io, dir)?;
            let rebuilt = segments
                .first()
                .map_or(lost.max_lsn(), |(first, _)| first - 1);
            tracing::warn!(%reason, rebuilt, "wal checkpoint file unreadable, rebuilding it");
            checkpoint::write_checkpoint(io, dir, rebuilt)?;
            report.checkpoint_rebuilt = Some(rebuilt);
            report.damage.push(Damage {
                segment: dir.join(checkpoint::CHECKPOINT_FILE),
                offset: 0,
                reason,
            });
            repaired = true;
            rebuilt
        }
    };

    let mut bytes_scanned = 0;
    let mut torn_tail_bytes = 0;
    let mut attempts = 0;
    let pass = loop {
        attempts += 1;
        let pass = scan(io, dir, checkpoint, &lost)?;
        bytes_scanned += pass.bytes_scanned;
        match &pass.outcome {
            Outcome::Clean => break pass,
            Outcome::TornTail { index, offset, end } => {
                let seg = &pass.segments[*index];
                tracing::warn!(
                    segment = %seg.path.display(),
                    offset,
                    bytes = end - offset,
                    "wal torn tail truncated"
                );
                let file = io
                    .open(&seg.path)
                    .map_err(|e| WalError::io("open", &seg.path, e))?;
                segment::zero_range(file.as_ref(), *offset, *end)
                    .map_err(|e| WalError::io("write", &seg.path, e))?;
                file.sync_data()
                    .map_err(|e| WalError::io("fdatasync", &seg.path, e))?;
                torn_tail_bytes += end - offset;
                break pass;
            }
            Outcome::Behind {
                first_on_disk,
                segment,
            } => {
                if !opts.repair || attempts > 64 {
                    return Err(WalError::Behind {
                        checkpoint,
                        first_on_disk: *first_on_disk,
                        segment: segment.clone(),
                    });
                }
                let range = (checkpoint + 1)..=(first_on_disk - 1);
                tracing::error!(
                    first = range.start(),
                    last = range.end(),
                    "wal repair: lsns missing before the oldest segment recorded as lost"
                );
                record_lost(io, dir, &mut lost, range.clone())?;
                report.lost.push(range);
                report.damage.push(Damage {
                    segment: segment.clone(),
                    offset: 0,
                    reason: "the oldest segment starts after the checkpoint".into(),
                });
                repaired = true;
            }
            Outcome::Damaged(damage) => {
                if !opts.repair || attempts > 64 {
                    tracing::error!(
                        segment = %damage.segment.display(),
                        offset = damage.offset,
                        reason = %damage.reason,
                        first_lsn = damage.first_lsn,
                        last_known_lsn = ?damage.last_known_lsn,
                        "wal corrupt, refusing to open"
                    );
                    return Err(WalError::Corrupt {
                        segment: damage.segment.clone(),
                        offset: damage.offset,
                        reason: damage.reason.clone(),
                        first_lsn: damage.first_lsn,
                        last_known_lsn: damage.last_known_lsn,
                    });
                }
                repair(io, dir, damage, checkpoint, &mut lost, &mut report)?;
                repaired = true;
            }
        }
    };

    let last_on_disk = pass.segments.last().map_or(0, |s| s.continuation() - 1);
    let next_lsn = last_on_disk.max(checkpoint).max(lost.max_lsn()) + 1;
    report.kept_through = last_on_disk;

    // Delete what the checkpoint covers; continue in the last segment if the next lsn follows it.
    let mut segments = pass.segments;
    let continue_in_last = segments
        .last()
        .is_some_and(|s| s.continuation() == next_lsn);
    let keep_from = segments
        .iter()
        .enumerate()
        .position(|(i, s)| {
            let is_last = i + 1 == segments.len();
            !(s.skipped || s.entirely_at_or_below(checkpoint)) || (is_last && continue_in_last)
        })
        .unwrap_or(segments.len());
    let deleted: Vec<ScannedSegment> = segments.drain(..keep_from).collect();
    for seg in &deleted {
        io.remove(&seg.path)
            .map_err(|e| WalError::io("remove", &seg.path, e))?;
    }
    if !deleted.is_empty() {
        io.sync_dir(dir)
            .map_err(|e| WalError::io("fsync dir", dir, e))?;
        tracing::info!(
            deleted = deleted.len(),
            checkpoint,
            "wal segments below the checkpoint deleted"
        );
    }

    // Records read from the last segment may exist only in the page cache: the process that
    // wrote them died before its `fdatasync`, or that `fdatasync` failed (a poisoned log). From
    // here on they count as durable — served, archived, answered to idempotent retries — so
    // they are made durable first. (Earlier segments were synced before their successor got a
    // name.)
    let mut last_file = match segments.last() {
        Some(last) => {
            let file = io
                .open(&last.path)
                .map_err(|e| WalError::io("open", &last.path, e))?;
            file.sync_data()
                .map_err(|e| WalError::io("fdatasync", &last.path, e))?;
            Some(file)
        }
        None => None,
    };
    let active = if continue_in_last {
        let (Some(last), Some(file)) = (segments.last(), last_file.take()) else {
            return Err(WalError::InvalidOptions(
                "internal: no segment to continue in".into(),
            ));
        };
        let capacity = file
            .size()
            .map_err(|e| WalError::io("stat", &last.path, e))?;
        ActiveSegment {
            first_lsn: last.first_lsn,
            path: last.path.clone(),
            file,
            capacity,
            offset: last.end,
        }
    } else {
        let spare = segment::prepare_spare(
            io,
            dir,
            opts.segment_bytes,
            opts.preallocate,
            spare_counter.fetch_add(1, Ordering::Relaxed),
        )?;
        segment::install_spare(io, dir, spare, next_lsn)?
    };
    let mut remaining: Vec<(Lsn, PathBuf)> = segments
        .iter()
        .map(|s| (s.first_lsn, s.path.clone()))
        .collect();
    if !continue_in_last {
        remaining.push((active.first_lsn, active.path.clone()));
    }

    if repaired {
        tracing::warn!(
            lost = ?report.lost,
            quarantined = report.quarantined.len(),
            kept_through = report.kept_through,
            "wal repaired"
        );
    }
    Ok(Recovered {
        recovery: Recovery {
            records: pass.records,
            checkpoint,
            next_lsn,
            bytes_scanned,
            scan_duration: started.elapsed(),
            torn_tail_bytes,
            segments_deleted: deleted.len(),
            repair: repaired.then_some(report),
        },
        segments: remaining,
        active,
    })
}

/// Reads every segment once (skipping those entirely ≤ the checkpoint) and stops at the first
/// bad spot.
fn scan(io: &dyn WalIo, dir: &Path, checkpoint: Lsn, lost: &LostRanges) -> Result<Pass, WalError> {
    let listed = segment::list_segments(io, dir)?;
    let mut pass = Pass {
        records: Vec::new(),
        bytes_scanned: 0,
        segments: Vec::with_capacity(listed.len()),
        outcome: Outcome::Clean,
    };
    let mut expected: Option<Lsn> = None;
    for (index, (first_lsn, path)) in listed.iter().enumerate() {
        let first_lsn = *first_lsn;
        let next_first = listed.get(index + 1).map(|n| n.0);
        if let Some(next_first) = next_first {
            if expected.is_none() && next_first.saturating_sub(1) <= checkpoint {
                pass.segments.push(ScannedSegment {
                    first_lsn,
                    path: path.clone(),
                    end: 0,
                    last_lsn: Some(next_first.saturating_sub(1)),
                    skipped: true,
                });
                continue;
            }
        }
        // Where this segment must start.
        match expected {
            None => {
                if first_lsn > checkpoint + 1
                    && !lost.covers(checkpoint + 1, first_lsn - 1, checkpoint)
                {
                    pass.outcome = Outcome::Behind {
                        first_on_disk: first_lsn,
                        segment: path.clone(),
                    };
                    return Ok(pass);
                }
            }
            Some(e) if first_lsn < e => {
                let last_known = last_known_after(io, &listed[index..], e, &mut pass)?;
                pass.outcome = Outcome::Damaged(DamageAt {
                    segment_first_lsn: first_lsn,
                    segment: path.clone(),
                    offset: 0,
                    reason: format!(
                        "segment starts at lsn {first_lsn} but the previous segment already reached lsn {}",
                        e - 1
                    ),
                    first_lsn: e,
                    last_known_lsn: last_known,
                    gap: false,
                });
                return Ok(pass);
            }
            Some(e) if first_lsn > e && !lost.covers(e, first_lsn - 1, checkpoint) => {
                pass.outcome = Outcome::Damaged(DamageAt {
                    segment_first_lsn: first_lsn,
                    segment: path.clone(),
                    offset: 0,
                    reason: format!(
                        "missing segment: no file holds lsns {e}..={} (the previous segment ends at lsn {})",
                        first_lsn - 1,
                        e - 1
                    ),
                    first_lsn: e,
                    last_known_lsn: Some(first_lsn - 1),
                    gap: true,
                });
                return Ok(pass);
            }
            Some(_) => {}
        }
        let buf = io.read(path).map_err(|e| WalError::io("read", path, e))?;
        let bytes: &[u8] = (*buf).as_ref();
        pass.bytes_scanned += bytes.len() as u64;
        let mut next = first_lsn;
        let mut last_lsn = None;
        let end = scan_frames(
            bytes,
            &mut next,
            &mut last_lsn,
            checkpoint,
            lost,
            &mut pass.records,
        );
        pass.segments.push(ScannedSegment {
            first_lsn,
            path: path.clone(),
            end: match end {
                SegmentEnd::Clean { end } => end,
                SegmentEnd::Bad { offset, .. } => offset,
            },
            last_lsn,
            skipped: false,
        });
        expected = Some(next);
        if let SegmentEnd::Bad {
            offset,
            reason,
            misplaced_lsn,
        } = end
        {
            let (any_later, mut later) = valid_frames_after(bytes, offset as usize + 1, next);
            if let Some(m) = misplaced_lsn.filter(|m| *m >= next) {
                later = Some(later.map_or(m, |l| l.max(m)));
            }
            let is_last = index + 1 == listed.len();
            if is_last && !any_later && misplaced_lsn.is_none() {
                let end = bytes
                    .iter()
                    .rposition(|b| *b != 0)
                    .map_or(offset, |p| (p as u64 + 1).max(offset));
                pass.outcome = Outcome::TornTail { index, offset, end };
                return Ok(pass);
            }
            drop(buf);
            let after = last_known_after(io, &listed[index + 1..], next, &mut pass)?;
            let last_known = match (later, after) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let reason = if any_later {
                format!("{reason}, followed by valid records")
            } else if !is_last {
                format!("{reason}, in a segment that is not the last one")
            } else {
                reason
            };
            pass.outcome = Outcome::Damaged(DamageAt {
                segment_first_lsn: first_lsn,
                segment: path.clone(),
                offset,
                reason,
                first_lsn: next,
                last_known_lsn: last_known,
                gap: false,
            });
            return Ok(pass);
        }
    }
    Ok(pass)
}

/// Decodes frames from offset 0, checking lsn continuity; collects records above the checkpoint.
fn scan_frames(
    bytes: &[u8],
    next: &mut Lsn,
    last_lsn: &mut Option<Lsn>,
    checkpoint: Lsn,
    lost: &LostRanges,
    records: &mut Vec<WalRecord>,
) -> SegmentEnd {
    let mut offset = 0usize;
    loop {
        match frame::decode(bytes, offset) {
            Decoded::Frame(f) => {
                if f.lsn != *next {
                    let jump_ok = f.lsn > *next && lost.covers(*next, f.lsn - 1, checkpoint);
                    if !jump_ok {
                        return SegmentEnd::Bad {
                            offset: offset as u64,
                            reason: format!(
                                "lsn discontinuity: expected lsn {}, found lsn {}",
                                *next, f.lsn
                            ),
                            misplaced_lsn: Some(f.lsn),
                        };
                    }
                }
                if f.lsn > checkpoint {
                    records.push(WalRecord {
                        lsn: f.lsn,
                        kind: f.kind,
                        payload: f.payload.to_vec(),
                    });
                }
                *last_lsn = Some(f.lsn);
                *next = f.lsn + 1;
                offset += f.encoded_len;
            }
            Decoded::End => {
                let rest = bytes.get(offset..).unwrap_or_default();
                if rest.iter().all(|b| *b == 0) {
                    return SegmentEnd::Clean { end: offset as u64 };
                }
                return SegmentEnd::Bad {
                    offset: offset as u64,
                    reason: "non-zero bytes after the end-of-data marker".into(),
                    misplaced_lsn: None,
                };
            }
            Decoded::Bad(bad) => {
                return SegmentEnd::Bad {
                    offset: offset as u64,
                    reason: bad.to_string(),
                    misplaced_lsn: None,
                }
            }
        }
    }
}

/// Whether any intact frame starts at or after `from`, and the highest lsn ≥ `min_lsn` among
/// them, trying every offset (frames after damage are not aligned to anything we know).
fn valid_frames_after(bytes: &[u8], from: usize, min_lsn: Lsn) -> (bool, Option<Lsn>) {
    let mut any = false;
    let mut best = None;
    let mut offset = from;
    while offset + frame::FRAME_OVERHEAD <= bytes.len() {
        // Fast path over zeros (the preallocated remainder).
        if bytes[offset..offset + 4] == [0, 0, 0, 0] {
            offset += 1;
            continue;
        }
        match frame::decode(bytes, offset) {
            Decoded::Frame(f) => {
                any = true;
                if f.lsn >= min_lsn {
                    best = Some(best.map_or(f.lsn, |b: Lsn| b.max(f.lsn)));
                }
                offset += f.encoded_len;
            }
            Decoded::End | Decoded::Bad(_) => offset += 1,
        }
    }
    (any, best)
}

/// The highest lsn known to have existed in `segments` (by name or by an intact frame).
fn last_known_after(
    io: &dyn WalIo,
    segments: &[(Lsn, PathBuf)],
    min_lsn: Lsn,
    pass: &mut Pass,
) -> Result<Option<Lsn>, WalError> {
    let mut best: Option<Lsn> = None;
    for (first_lsn, path) in segments {
        // A segment named N exists only once lsn N - 1 was written.
        let by_name = first_lsn.saturating_sub(1);
        if by_name >= min_lsn {
            best = Some(best.map_or(by_name, |b| b.max(by_name)));
        }
        let buf = io.read(path).map_err(|e| WalError::io("read", path, e))?;
        let bytes: &[u8] = (*buf).as_ref();
        pass.bytes_scanned += bytes.len() as u64;
        if let Some(l) = valid_frames_after(bytes, 0, min_lsn).1 {
            best = Some(best.map_or(l, |b| b.max(l)));
        }
    }
    Ok(best)
}

/// Declares `range` lost, durably, before anything moves (a no-op if it already is).
fn record_lost(
    io: &dyn WalIo,
    dir: &Path,
    lost: &mut LostRanges,
    range: RangeInclusive<Lsn>,
) -> Result<(), WalError> {
    if range.is_empty() || lost.covers(*range.start(), *range.end(), 0) {
        return Ok(());
    }
    lost.0.push((*range.start(), *range.end()));
    lost.write(io, dir)
}

fn repair(
    io: &dyn WalIo,
    dir: &Path,
    damage: &DamageAt,
    checkpoint: Lsn,
    lost: &mut LostRanges,
    report: &mut RepairReport,
) -> Result<(), WalError> {
    let first = damage.first_lsn.max(checkpoint + 1);
    let range = damage.last_known_lsn.map(|last| first..=last);
    tracing::error!(
        segment = %damage.segment.display(),
        offset = damage.offset,
        reason = %damage.reason,
        lost = ?range,
        "wal repair: damage found"
    );
    report.damage.push(Damage {
        segment: damage.segment.clone(),
        offset: damage.offset,
        reason: damage.reason.clone(),
    });
    if let Some(range) = range.filter(|r| !r.is_empty()) {
        record_lost(io, dir, lost, range.clone())?;
        report.lost.push(range);
    }
    if damage.gap {
        return Ok(());
    }
    let quarantine = dir.join(QUARANTINE_DIR);
    io.create_dir_all(&quarantine)
        .map_err(|e| WalError::io("create dir", &quarantine, e))?;
    let listed = segment::list_segments(io, dir)?;
    let damaged_first = damage.segment_first_lsn;
    for (first_lsn, path) in listed.iter().filter(|(f, _)| *f >= damaged_first) {
        let target = quarantine_target(io, &quarantine, path)?;
        if *first_lsn == damaged_first && damage.offset > 0 {
            // Keep the valid prefix in place: copy the whole file aside, then zero the rest.
            let buf = io.read(path).map_err(|e| WalError::io("read", path, e))?;
            let bytes: &[u8] = (*buf).as_ref();
            let copy = io
                .create(&target)
                .map_err(|e| WalError::io("create", &target, e))?;
            copy.write_all_at(bytes, 0)
                .map_err(|e| WalError::io("write", &target, e))?;
            copy.sync_all()
                .map_err(|e| WalError::io("fsync", &target, e))?;
            io.sync_dir(&quarantine)
                .map_err(|e| WalError::io("fsync dir", &quarantine, e))?;
            let end = bytes.len() as u64;
            drop(buf);
            let file = io.open(path).map_err(|e| WalError::io("open", path, e))?;
            segment::zero_range(file.as_ref(), damage.offset, end)
                .map_err(|e| WalError::io("write", path, e))?;
            file.sync_data()
                .map_err(|e| WalError::io("fdatasync", path, e))?;
        } else {
            io.rename(path, &target)
                .map_err(|e| WalError::io("rename", path, e))?;
        }
        tracing::warn!(segment = %path.display(), to = %target.display(), "wal segment quarantined");
        report.quarantined.push(target);
    }
    io.sync_dir(&quarantine)
        .map_err(|e| WalError::io("fsync dir", &quarantine, e))?;
    io.sync_dir(dir)
        .map_err(|e| WalError::io("fsync dir", dir, e))?;
    Ok(())
}

/// `quarantine/<name>`, or `<name>.1`, `<name>.2`, … if an earlier repair used the name.
fn quarantine_target(io: &dyn WalIo, quarantine: &Path, path: &Path) -> Result<PathBuf, WalError> {
    let existing = io
        .list(quarantine)
        .map_err(|e| WalError::io("list", quarantine, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut candidate = name.clone();
    let mut n = 0;
    while existing.iter().any(|e| e.to_string_lossy() == candidate) {
        n += 1;
        candidate = format!("{name}.{n}");
    }
    Ok(quarantine.join(candidate))
}
