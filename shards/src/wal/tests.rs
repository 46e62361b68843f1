//! Tests of the whole WAL: against the simulated disk (crash, corruption, faults) and, where the
//! behaviour depends on the real kernel (group commit timing, mmap, flock), against a temp dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use super::segment::segment_path;
use super::sim::{FaultOp, SimIo};
use super::*;

const DIR: &str = "/sim/wal";

fn sim_opts(segment_bytes: u64) -> WalOptions {
    let mut opts = WalOptions::new(DIR);
    opts.segment_bytes = segment_bytes;
    opts.queue_capacity = 4096;
    opts
}

fn open_sim(io: &SimIo, opts: &WalOptions) -> Result<(Wal, Recovery), WalError> {
    Wal::open_with_io(opts.clone(), Arc::new(io.clone()))
}

/// Submits one record and waits for its completion.
fn append(wal: &Wal, kind: u8, payload: &[u8]) -> Result<Lsn, WalError> {
    let (tx, rx) = mpsc::channel();
    wal.submit(
        kind,
        payload.to_vec(),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )
    .map_err(|_| WalError::Closed)?;
    rx.recv().unwrap_or(Err(WalError::Closed))
}

/// Submits a barrier (retrying while the queue is full) and waits for it.
fn barrier(wal: &Wal) -> Result<Lsn, WalError> {
    let (tx, rx) = mpsc::channel();
    loop {
        let tx = tx.clone();
        match wal.barrier(Box::new(move |r| {
            let _ = tx.send(r);
        })) {
            Ok(()) => break,
            Err(SubmitError::Full) => std::thread::yield_now(),
            Err(_) => return Err(WalError::Closed),
        }
    }
    rx.recv().unwrap_or(Err(WalError::Closed))
}

fn payload_for(lsn: Lsn, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lsn as usize * 31 + i) as u8).collect()
}

fn lsns(recovery: &Recovery) -> Vec<Lsn> {
    recovery.records.iter().map(|r| r.lsn).collect()
}

fn segments_on(io: &SimIo) -> Vec<PathBuf> {
    io.paths()
        .into_iter()
        .filter(|p| p.parent() == Some(Path::new(DIR)))
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect()
}

#[test]
fn fsync_policy_parses() {
    assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
    assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
    assert_eq!(
        "interval:5".parse(),
        Ok(FsyncPolicy::Interval(Duration::from_millis(5)))
    );
    assert!("interval:".parse::<FsyncPolicy>().is_err());
    assert!("interval:0".parse::<FsyncPolicy>().is_err());
    assert!("sometimes".parse::<FsyncPolicy>().is_err());
    assert_eq!(
        FsyncPolicy::Interval(Duration::from_millis(5)).to_string(),
        "interval:5"
    );
}

#[test]
fn records_survive_reopen_in_order() {
    let io = SimIo::new();
    let opts = sim_opts(1 << 16);
    let (wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(rec.next_lsn, 1);
    assert!(rec.records.is_empty());
    for i in 1..=50u64 {
        assert_eq!(
            append(&wal, (i % 7) as u8, &payload_for(i, i as usize * 3)).unwrap(),
            i
        );
    }
    assert_eq!(wal.durable_lsn(), 50);
    wal.shutdown();
    drop(wal);
    let (wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..=50).collect::<Vec<_>>());
    for r in &rec.records {
        assert_eq!(r.kind, (r.lsn % 7) as u8);
        assert_eq!(r.payload, payload_for(r.lsn, r.lsn as usize * 3));
    }
    assert_eq!(rec.next_lsn, 51);
    assert_eq!(rec.torn_tail_bytes, 0);
    assert_eq!(append(&wal, 1, b"next").unwrap(), 51);
}

#[test]
fn one_write_and_one_fdatasync_per_batch() {
    let io = SimIo::new();
    let (wal, _) = open_sim(&io, &sim_opts(1 << 20)).unwrap();
    let before = io.counters();
    // Queue many records while the writer is blocked on nothing: submit them all, then wait.
    let (tx, rx) = mpsc::channel();
    for i in 0..200u64 {
        let tx = tx.clone();
        wal.submit(
            1,
            payload_for(i, 100),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
    }
    let results: Vec<_> = (0..200).map(|_| rx.recv().unwrap().unwrap()).collect();
    assert_eq!(
        results,
        (1..=200).collect::<Vec<_>>(),
        "completions in lsn order"
    );
    let after = io.counters();
    let stats = wal.stats();
    assert_eq!(after.writes - before.writes, stats.batches);
    assert_eq!(after.sync_data - before.sync_data, stats.batches);
    assert_eq!(stats.fsyncs, stats.batches);
    assert_eq!(stats.records_written, 200);
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    let io = SimIo::new();
    let mut opts = sim_opts(1 << 16);
    opts.fsync = FsyncPolicy::Never;
    let (wal, _) = open_sim(&io, &opts).unwrap();
    for i in 1..=10 {
        append(&wal, 1, &payload_for(i, 200)).unwrap();
    }
    assert_eq!(barrier(&wal).unwrap(), 10);
    for i in 11..=15 {
        append(&wal, 1, &payload_for(i, 200)).unwrap();
    }
    // Keep 11 and 12 whole and half of 13: a torn frame with nothing valid after it.
    let frame = frame::frame_len(200) as u64;
    let io2 = io.crash(2 * frame + frame / 2);
    drop(wal);
    let (wal, rec) = open_sim(&io2, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..=12).collect::<Vec<_>>());
    assert_eq!(rec.torn_tail_bytes, frame / 2);
    assert_eq!(rec.next_lsn, 13);
    assert_eq!(append(&wal, 9, b"after the tear").unwrap(), 13);
    wal.shutdown();
    drop(wal);
    let (_wal, rec) = open_sim(&io2, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..=13).collect::<Vec<_>>());
    assert_eq!(rec.records[12].payload, b"after the tear");
    assert_eq!(rec.torn_tail_bytes, 0, "the tear was zeroed durably");
}

#[test]
fn torn_tail_on_the_real_filesystem() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = WalOptions::new(tmp.path().join("wal"));
    opts.segment_bytes = 1 << 16;
    let (wal, _) = Wal::open(opts.clone()).unwrap();
    for i in 1..=20 {
        append(&wal, 2, &payload_for(i, 50)).unwrap();
    }
    wal.shutdown();
    drop(wal);
    // Append half a frame by hand, as a crash mid-write would leave it.
    let seg = segment::segment_path(&opts.dir, 1);
    let mut partial = Vec::new();
    frame::encode(&mut partial, 2, 21, &payload_for(21, 50));
    let end = 20 * frame::frame_len(50) as u64;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&partial[..30], end).unwrap();
    }
    let (wal, rec) = Wal::open(opts.clone()).unwrap();
    assert_eq!(rec.records.len(), 20);
    assert_eq!(rec.torn_tail_bytes, 30);
    assert_eq!(append(&wal, 2, b"x").unwrap(), 21);
    let err = Wal::open(opts.clone())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, WalError::Locked { .. }), "{err}");
    // Shutdown releases the directory even while the handle lives on.
    wal.shutdown();
    let (again, rec) = Wal::open(opts.clone()).unwrap();
    assert_eq!(rec.next_lsn, 22);
    assert!(matches!(
        wal.submit(2, b"stale".to_vec(), Box::new(|_| {})),
        Err(SubmitError::Closed)
    ));
    drop(again);
}

/// Writes `n` records of 100 bytes and shuts down.
fn write_log(io: &SimIo, opts: &WalOptions, n: u64) {
    let (wal, _) = open_sim(io, opts).unwrap();
    for i in 1..=n {
        assert_eq!(append(&wal, 3, &payload_for(i, 100)).unwrap(), i);
    }
    wal.shutdown();
}

#[test]
fn bit_flip_mid_log_refuses_then_repair_reports_the_loss() {
    let io = SimIo::new();
    let opts = sim_opts(1 << 16);
    write_log(&io, &opts, 40);
    let seg = segment_path(Path::new(DIR), 1);
    let frame = frame::frame_len(100);
    // Flip one payload bit of lsn 11 (records 12..=40 stay valid after it).
    let offset = 10 * frame + 30;
    let mut bytes = io.contents(&seg).unwrap();
    bytes[offset] ^= 0x04;
    io.corrupt(&seg, offset, &bytes[offset..offset + 1]);

    let err = open_sim(&io, &opts).err().expect("open must refuse");
    let WalError::Corrupt {
        segment,
        offset: at,
        first_lsn,
        last_known_lsn,
        ..
    } = &err
    else {
        panic!("expected Corrupt, got {err}")
    };
    assert_eq!(segment, &seg);
    assert_eq!(*at, 10 * frame as u64);
    assert_eq!((*first_lsn, *last_known_lsn), (11, Some(40)));
    let message = err.to_string();
    assert!(message.contains("00000000000000000001.wal"), "{message}");
    assert!(
        message.contains(&format!("offset {}", 10 * frame)),
        "{message}"
    );
    assert!(message.contains("11..=40"), "{message}");
    assert!(message.contains("repair"), "{message}");

    let mut repair = opts.clone();
    repair.repair = true;
    let (wal, rec) = open_sim(&io, &repair).unwrap();
    let report = rec.repair.as_ref().expect("a repair report");
    assert_eq!(report.lost, vec![11..=40]);
    assert_eq!(report.lost_count(), 30);
    assert_eq!(report.kept_through, 10);
    assert_eq!(report.quarantined.len(), 1);
    assert!(io.contents(&report.quarantined[0]).is_some());
    assert_eq!(lsns(&rec), (1..=10).collect::<Vec<_>>());
    assert_eq!(rec.next_lsn, 41, "lost lsns are never reused");
    assert_eq!(append(&wal, 3, b"after repair").unwrap(), 41);
    wal.shutdown();
    drop(wal);

    // A normal open afterwards accepts the recorded gap.
    let (_wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..=10).chain([41]).collect::<Vec<_>>());
    assert!(rec.repair.is_none());
}

#[test]
fn damage_in_a_non_last_segment_is_corruption() {
    let io = SimIo::new();
    let opts = sim_opts(4096);
    write_log(&io, &opts, 100); // ~35 frames per segment: 3 segments
    let segments = segments_on(&io);
    assert!(segments.len() >= 3, "{segments:?}");
    // Corrupt the very last frame of the first segment: nothing valid follows *in it*.
    let first = io.contents(&segments[0]).unwrap();
    let frames = first.len() / frame::frame_len(100);
    let last_offset = (frames - 1) * frame::frame_len(100);
    io.corrupt(&segments[0], last_offset + 20, &[0xFF, 0xFF]);
    let err = open_sim(&io, &opts).err().expect("refuse");
    assert!(err.to_string().contains("not the last one"), "{err}");
    let mut repair = opts.clone();
    repair.repair = true;
    let (_wal, rec) = open_sim(&io, &repair).unwrap();
    let report = rec.repair.unwrap();
    assert_eq!(report.lost, vec![(frames as u64)..=100]);
    assert_eq!(report.quarantined.len(), segments.len());
    assert_eq!(rec.next_lsn, 101);
}

#[test]
fn missing_segment_refuses_and_repair_records_only_the_gap() {
    let io = SimIo::new();
    let opts = sim_opts(4096);
    write_log(&io, &opts, 100);
    let segments = segments_on(&io);
    assert!(segments.len() >= 3);
    let second_first = segment::parse_segment_name(segments[1].file_name().unwrap()).unwrap();
    let third_first = segment::parse_segment_name(segments[2].file_name().unwrap()).unwrap();
    assert!(io.delete_durably(&segments[1]));
    let err = open_sim(&io, &opts).err().expect("refuse");
    let text = err.to_string();
    assert!(text.contains("missing segment"), "{text}");
    assert!(
        text.contains(&format!("{second_first}..={}", third_first - 1)),
        "{text}"
    );
    let mut repair = opts.clone();
    repair.repair = true;
    let (_wal, rec) = open_sim(&io, &repair).unwrap();
    let report = rec.repair.as_ref().unwrap();
    assert_eq!(report.lost, vec![second_first..=third_first - 1]);
    assert!(report.quarantined.is_empty());
    let expected: Vec<Lsn> = (1..second_first).chain(third_first..=100).collect();
    assert_eq!(lsns(&rec), expected);
}

#[test]
fn log_behind_its_checkpoint_refuses() {
    let io = SimIo::new();
    let opts = sim_opts(4096);
    write_log(&io, &opts, 100);
    let segments = segments_on(&io);
    // Checkpoint at 5, but the first segment (lsns 1..) vanishes.
    checkpoint::write_checkpoint(&io, Path::new(DIR), 5).unwrap();
    assert!(io.delete_durably(&segments[0]));
    let err = open_sim(&io, &opts).err().expect("refuse");
    assert!(
        matches!(err, WalError::Behind { checkpoint: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn lsn_discontinuity_is_corruption() {
    let io = SimIo::new();
    let opts = sim_opts(1 << 16);
    write_log(&io, &opts, 5);
    // Append a well-formed frame with lsn 7 (6 is missing) by hand.
    let seg = segment_path(Path::new(DIR), 1);
    let mut frame_bytes = Vec::new();
    frame::encode(&mut frame_bytes, 3, 7, b"skipped one");
    io.corrupt(&seg, 5 * frame::frame_len(100), &frame_bytes);
    let err = open_sim(&io, &opts).err().expect("refuse");
    assert!(
        err.to_string().contains("expected lsn 6, found lsn 7"),
        "{err}"
    );
}

#[test]
fn fdatasync_failure_poisons() {
    let io = SimIo::new();
    let (wal, _) = open_sim(&io, &sim_opts(1 << 16)).unwrap();
    assert_eq!(append(&wal, 1, b"fine").unwrap(), 1);
    io.fail_next(FaultOp::SyncData);
    let err = append(&wal, 1, b"doomed").unwrap_err();
    assert!(matches!(err, WalError::Poisoned { .. }), "{err}");
    assert!(wal.poisoned());
    assert!(wal.stats().poisoned);
    assert_eq!(wal.durable_lsn(), 1);
    let refused = wal.submit(1, b"later".to_vec(), Box::new(|_| panic!("must not run")));
    assert!(matches!(refused, Err(SubmitError::Poisoned)));
    assert!(matches!(barrier(&wal), Err(WalError::Closed)));
    // The failed sync is not retried: exactly one sync_data failed and nothing else synced.
    let syncs = io.counters().sync_data;
    wal.shutdown();
    assert_eq!(io.counters().sync_data, syncs);
}

#[test]
fn write_failure_poisons_and_later_queued_records_fail_too() {
    let io = SimIo::new();
    let (wal, _) = open_sim(&io, &sim_opts(1 << 16)).unwrap();
    assert_eq!(append(&wal, 1, b"fine").unwrap(), 1);
    io.fail_next(FaultOp::Write);
    let results = Arc::new(Mutex::new(Vec::new()));
    for i in 0..20 {
        let results = results.clone();
        let _ = wal.submit(
            1,
            vec![i],
            Box::new(move |r| results.lock().unwrap().push(r)),
        );
    }
    wal.shutdown();
    let results = results.lock().unwrap();
    assert!(!results.is_empty());
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(WalError::Poisoned { .. }))),
        "{results:?}"
    );
    assert!(wal.poisoned());
}

#[test]
fn completions_that_never_reach_the_writer_get_closed() {
    let io = SimIo::new();
    let (wal, _) = open_sim(&io, &sim_opts(1 << 16)).unwrap();
    wal.shutdown();
    wal.shutdown(); // idempotent
    let refused = wal.submit(1, b"late".to_vec(), Box::new(|_| panic!("must not run")));
    assert!(matches!(refused, Err(SubmitError::Closed)));
}

#[test]
fn full_queue_is_refused_without_blocking() {
    let io = SimIo::new();
    let mut opts = sim_opts(1 << 16);
    opts.queue_capacity = 2;
    let (wal, _) = open_sim(&io, &opts).unwrap();
    // Hold the writer inside a completion so the queue fills up.
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    wal.submit(
        1,
        b"a".to_vec(),
        Box::new(move |_| {
            let _ = entered_tx.send(());
            let _ = hold_rx.recv();
        }),
    )
    .unwrap();
    entered_rx.recv().unwrap();
    wal.submit(1, b"b".to_vec(), Box::new(|_| {})).unwrap();
    wal.submit(1, b"c".to_vec(), Box::new(|_| {})).unwrap();
    assert_eq!(wal.queued(), 2);
    let refused = wal.submit(1, b"d".to_vec(), Box::new(|_| panic!("must not run")));
    assert!(matches!(refused, Err(SubmitError::Full)));
    hold_tx.send(()).unwrap();
    assert_eq!(barrier(&wal).unwrap(), 3);
    assert_eq!(wal.queued(), 0);
}

#[test]
fn oversized_record_is_rejected_in_order_without_an_lsn() {
    let io = SimIo::new();
    let (wal, _) = open_sim(&io, &sim_opts(4096)).unwrap();
    let err = append(&wal, 1, &vec![0; 5000]).unwrap_err();
    assert!(matches!(err, WalError::RecordTooLarge { .. }), "{err}");
    assert_eq!(append(&wal, 1, b"ok").unwrap(), 1);
}

#[test]
fn interval_policy_completes_after_write_and_syncs_later() {
    let io = SimIo::new();
    let mut opts = sim_opts(1 << 16);
    opts.fsync = FsyncPolicy::Interval(Duration::from_millis(300));
    let opened = std::time::Instant::now();
    let (wal, _) = open_sim(&io, &opts).unwrap();
    let syncs_before = io.counters().sync_data;
    append(&wal, 1, b"one").unwrap();
    assert_eq!(wal.written_lsn(), 1);
    if opened.elapsed() < Duration::from_millis(250) {
        // Completed after the write, before any fdatasync (the interval has not passed yet).
        assert_eq!(wal.durable_lsn(), 0);
        assert_eq!(io.counters().sync_data, syncs_before);
        assert!(io.unsynced_bytes() > 0);
    }
    // Within a bounded time the writer syncs on its own, without any new request.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while wal.durable_lsn() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "interval sync never happened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(io.unsynced_bytes(), 0);
}

#[test]
fn segments_roll_and_are_deleted_below_the_checkpoint() {
    let io = SimIo::new();
    let opts = sim_opts(4096);
    let (wal, _) = open_sim(&io, &opts).unwrap();
    for i in 1..=200 {
        append(&wal, 1, &payload_for(i, 100)).unwrap();
    }
    let stats = wal.stats();
    assert!(stats.segment_rolls >= 5, "{stats:?}");
    assert_eq!(stats.segments, segments_on(&io).len());
    let before = stats.segments;
    wal.checkpoint(150).unwrap();
    assert_eq!(wal.flush_checkpoint().unwrap(), 150);
    let after = wal.stats();
    assert!(after.segments < before, "{after:?}");
    assert!(after.segments_deleted > 0);
    assert!(matches!(
        wal.checkpoint(10_000),
        Err(WalError::CheckpointAhead { .. })
    ));
    wal.checkpoint(100).unwrap(); // lower: ignored
    assert_eq!(wal.checkpoint_lsn(), 150);
    wal.shutdown();
    drop(wal);
    let (wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(rec.checkpoint, 150);
    assert_eq!(lsns(&rec), (151..=200).collect::<Vec<_>>());
    // Archive everything, roll past it, and reopen with every old segment gone.
    wal.checkpoint(200).unwrap();
    for i in 201..=260 {
        append(&wal, 1, &payload_for(i, 100)).unwrap();
    }
    wal.checkpoint(260).unwrap();
    wal.flush_checkpoint().unwrap();
    assert_eq!(wal.stats().segments, 1, "only the active segment is left");
    wal.shutdown();
    drop(wal);
    // Delete even the active segment (as an operator cleaning an archived node would).
    for seg in segments_on(&io) {
        io.delete_durably(&seg);
    }
    let (wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(rec.checkpoint, 260);
    assert!(rec.records.is_empty());
    assert_eq!(
        rec.next_lsn, 261,
        "lsns continue after every segment was deleted"
    );
    assert_eq!(append(&wal, 1, b"next").unwrap(), 261);
}

#[test]
fn larger_segments_after_a_config_change_replace_an_empty_small_one() {
    let io = SimIo::new();
    let small = sim_opts(4096);
    let (wal, _) = open_sim(&io, &small).unwrap();
    wal.shutdown();
    drop(wal);
    let big = sim_opts(1 << 16);
    let (wal, _) = open_sim(&io, &big).unwrap();
    assert_eq!(append(&wal, 1, &payload_for(1, 5000)).unwrap(), 1);
    assert_eq!(wal.stats().segments, 1);
    assert_eq!(append(&wal, 1, b"two").unwrap(), 2);
    wal.checkpoint(1).unwrap();
    wal.flush_checkpoint().unwrap();
    wal.shutdown();
    drop(wal);
    let (_wal, rec) = open_sim(&io, &big).unwrap();
    assert_eq!(lsns(&rec), vec![2]);
    assert_eq!(segments_on(&io).len(), 1);
}

#[test]
fn group_commit_batches_concurrent_submitters() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions::new(tmp.path().join("wal"));
    let mut opts = opts;
    opts.segment_bytes = 8 << 20;
    let (wal, _) = Wal::open(opts).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let (tx, rx) = mpsc::channel();
                for i in 0..250u64 {
                    let tx = tx.clone();
                    loop {
                        let tx = tx.clone();
                        match wal.submit(
                            t,
                            payload_for(i, 200),
                            Box::new(move |r| {
                                let _ = tx.send(r);
                            }),
                        ) {
                            Ok(()) => break,
                            Err(SubmitError::Full) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                drop(tx);
                let got: Vec<Lsn> = rx.iter().map(|r| r.unwrap()).collect();
                assert_eq!(got.len(), 250);
                assert!(got.windows(2).all(|w| w[0] < w[1]), "per-submitter order");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = wal.stats();
    assert_eq!(stats.records_written, 2000);
    assert!(stats.max_batch_records > 1, "{stats:?}");
    assert!(stats.batches < 2000, "{stats:?}");
    assert_eq!(stats.fsyncs, stats.batches);
}

#[test]
fn corrupt_checkpoint_refuses_and_repair_rebuilds_it() {
    let io = SimIo::new();
    let opts = sim_opts(4096);
    let (wal, _) = open_sim(&io, &opts).unwrap();
    for i in 1..=100 {
        append(&wal, 1, &payload_for(i, 100)).unwrap();
    }
    wal.checkpoint(80).unwrap();
    wal.flush_checkpoint().unwrap();
    wal.shutdown();
    drop(wal);
    let ck = Path::new(DIR).join(checkpoint::CHECKPOINT_FILE);
    io.corrupt(&ck, 5, &[0xEE]);
    let err = open_sim(&io, &opts).err().expect("refuse");
    assert!(err.to_string().contains("checkpoint"), "{err}");
    let mut repair = opts.clone();
    repair.repair = true;
    let (_wal, rec) = open_sim(&io, &repair).unwrap();
    let report = rec.repair.unwrap();
    let rebuilt = report.checkpoint_rebuilt.unwrap();
    assert!(rebuilt <= 80, "never claims more than was archived");
    assert_eq!(rec.checkpoint, rebuilt);
    assert_eq!(rec.next_lsn, 101);
}

// ---------------------------------------------------------------------------------------------
// Model-based property test.

#[derive(Clone, Debug)]
enum Op {
    Append {
        kind: u8,
        payload: Vec<u8>,
    },
    Barrier,
    Checkpoint(u16),
    FlushCheckpoint,
    Crash(u64),
    Reopen,
    /// The next write fails with `EIO`: the log is poisoned.
    FailWrite,
    /// The next `fdatasync` fails: the log is poisoned.
    FailSync,
    /// The next write fails for lack of space after writing half its bytes: retried.
    ShortWrite,
    /// The disk has this many bytes free from now on (a segment is 4 KiB or more).
    DiskFull(u16),
    /// Space returns.
    FreeSpace,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..2000))
            .prop_map(|(kind, payload)| Op::Append { kind, payload }),
        3 => Just(Op::Barrier),
        2 => any::<u16>().prop_map(Op::Checkpoint),
        1 => Just(Op::FlushCheckpoint),
        2 => any::<u64>().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
        1 => Just(Op::FailWrite),
        1 => Just(Op::FailSync),
        1 => Just(Op::ShortWrite),
        1 => any::<u16>().prop_map(Op::DiskFull),
        2 => Just(Op::FreeSpace),
    ]
}

/// What the test knows must be, may be, and cannot be on disk.
struct Model {
    /// Every record submitted since the last open that could be on disk, by lsn.
    log: BTreeMap<Lsn, (u8, Vec<u8>)>,
    /// The lsn the next submitted record gets.
    next_lsn: Lsn,
    /// Every lsn ≤ this was reported durable (Always ack, or a barrier).
    durable: Lsn,
    /// Highest checkpoint requested / known flushed.
    checkpoint_requested: Lsn,
    checkpoint_flushed: Lsn,
    /// An `EIO` was injected since the last open: the log may be poisoned.
    may_poison: bool,
    /// The disk is limited (or a short write was injected): new work may be refused `DiskFull`,
    /// and a barrier could wait for space that never comes.
    space_short: bool,
    /// Any fault since the last open: a shutdown may not write everything.
    faulted: bool,
}

type Results = Arc<Mutex<Vec<(Lsn, Result<Lsn, WalError>)>>>;

fn check_recovery(model: &mut Model, rec: &Recovery, clean: bool) -> Result<(), TestCaseError> {
    let c = rec.checkpoint;
    prop_assert!(
        model.checkpoint_flushed <= c && c <= model.checkpoint_requested,
        "checkpoint {} outside [{}, {}]",
        c,
        model.checkpoint_flushed,
        model.checkpoint_requested
    );
    let expected: Vec<Lsn> = (c + 1..rec.next_lsn).collect();
    prop_assert_eq!(
        lsns(rec),
        expected,
        "records are exactly checkpoint+1..next_lsn"
    );
    for r in &rec.records {
        let Some((kind, payload)) = model.log.get(&r.lsn) else {
            return Err(TestCaseError::fail(format!(
                "lsn {} was never submitted",
                r.lsn
            )));
        };
        prop_assert_eq!(r.kind, *kind, "kind of lsn {}", r.lsn);
        prop_assert!(&r.payload == payload, "payload of lsn {} differs", r.lsn);
    }
    prop_assert!(
        rec.next_lsn > model.durable.max(c),
        "durable lsn {} lost (next_lsn {})",
        model.durable,
        rec.next_lsn
    );
    if clean {
        prop_assert_eq!(
            rec.next_lsn,
            model.next_lsn,
            "a clean shutdown keeps everything"
        );
        prop_assert_eq!(rec.torn_tail_bytes, 0);
    }
    prop_assert!(rec.repair.is_none());
    // Unacknowledged records past the end are gone; their lsns will be assigned again.
    model.log.retain(|lsn, _| *lsn < rec.next_lsn);
    model.next_lsn = rec.next_lsn;
    model.durable = rec.next_lsn - 1;
    model.checkpoint_requested = c;
    model.checkpoint_flushed = c;
    model.may_poison = false;
    model.space_short = false;
    model.faulted = false;
    Ok(())
}

fn run_model(
    ops: Vec<Op>,
    interval: bool,
    segment_bytes: u64,
    max_batch_bytes: usize,
) -> Result<(), TestCaseError> {
    let mut io = SimIo::new();
    let mut opts = sim_opts(segment_bytes);
    opts.max_batch_bytes = max_batch_bytes;
    opts.disk_full_retry = Duration::from_millis(2);
    if interval {
        // Never syncs on its own during a test: only barriers, rolls and shutdown do.
        opts.fsync = FsyncPolicy::Interval(Duration::from_secs(3600));
    }
    let (mut wal, rec) = open_sim(&io, &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut model = Model {
        log: BTreeMap::new(),
        next_lsn: 1,
        durable: 0,
        checkpoint_requested: 0,
        checkpoint_flushed: 0,
        may_poison: false,
        space_short: false,
        faulted: false,
    };
    check_recovery(&mut model, &rec, true)?;
    let mut results: Results = Arc::new(Mutex::new(Vec::new()));

    // Folds completion results into the model; every Ok must carry the lsn the model expects.
    // An error is only allowed for a reason the test caused: an injected `EIO` (poisoned), or a
    // shutdown while the writer waited for space (closed).
    let absorb =
        |model: &mut Model, results: &Results, shut_down: bool| -> Result<(), TestCaseError> {
            for (expected, result) in results.lock().unwrap().drain(..) {
                match result {
                    Ok(lsn) => {
                        prop_assert_eq!(lsn, expected, "completion lsn");
                        if !interval {
                            model.durable = model.durable.max(lsn);
                        }
                    }
                    Err(WalError::Poisoned { .. }) if model.may_poison => {}
                    Err(WalError::Closed) if shut_down && model.faulted => {}
                    Err(e) => return Err(TestCaseError::fail(format!("lsn {expected}: {e}"))),
                }
            }
            Ok(())
        };

    for op in ops {
        match op {
            Op::Append { kind, payload } => {
                let lsn = model.next_lsn;
                model.next_lsn += 1;
                model.log.insert(lsn, (kind, payload.clone()));
                let results = results.clone();
                let submitted = wal.submit(
                    kind,
                    payload,
                    Box::new(move |r| results.lock().unwrap().push((lsn, r))),
                );
                match submitted {
                    Ok(()) => {}
                    // Refused: it never got an lsn, the next record takes this one.
                    Err(SubmitError::DiskFull) if model.space_short => {
                        model.log.remove(&lsn);
                        model.next_lsn = lsn;
                    }
                    Err(SubmitError::Poisoned) if model.may_poison => {
                        model.log.remove(&lsn);
                        model.next_lsn = lsn;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("submit: {e}"))),
                }
            }
            // With the disk full a barrier would wait for space that only a later op returns.
            Op::Barrier if model.space_short => {}
            Op::Barrier => match barrier(&wal) {
                Ok(durable) => {
                    absorb(&mut model, &results, false)?;
                    if !model.may_poison {
                        prop_assert_eq!(
                            durable,
                            model.next_lsn - 1,
                            "barrier covers everything before it"
                        );
                    }
                    model.durable = model.durable.max(durable);
                }
                Err(_) if model.may_poison => absorb(&mut model, &results, false)?,
                Err(e) => return Err(TestCaseError::fail(format!("barrier: {e}"))),
            },
            Op::FailWrite => {
                io.fail_next(FaultOp::Write);
                model.may_poison = true;
                model.faulted = true;
            }
            Op::FailSync => {
                io.fail_next(FaultOp::SyncData);
                model.may_poison = true;
                model.faulted = true;
            }
            Op::ShortWrite => {
                io.fail_next_no_space(FaultOp::Write);
                model.space_short = true;
                model.faulted = true;
            }
            Op::DiskFull(free) => {
                io.set_capacity(Some(io.used_bytes() + u64::from(free) % 8192));
                model.space_short = true;
                model.faulted = true;
            }
            Op::FreeSpace => {
                io.set_capacity(None);
            }
            Op::Checkpoint(fraction) => {
                absorb(&mut model, &results, false)?;
                let target = model.durable * u64::from(fraction) / u64::from(u16::MAX);
                wal.checkpoint(target)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.checkpoint_requested = model.checkpoint_requested.max(target);
            }
            Op::FlushCheckpoint => match wal.flush_checkpoint() {
                Ok(flushed) => {
                    prop_assert_eq!(flushed, model.checkpoint_requested);
                    model.checkpoint_flushed = flushed;
                }
                // The checkpoint file is written too: an injected fault or a full disk may
                // hit it (the housekeeper tries again on the next request).
                Err(_) if model.faulted => {}
                Err(e) => return Err(TestCaseError::fail(format!("flush: {e}"))),
            },
            Op::Crash(keep) => {
                let crashed = io.crash(keep);
                // Completions that said Ok before the crash are durable; the old WAL's threads
                // fail from here on (their handles are dead) and are stopped by the drop.
                absorb_before_crash(&mut model, &results, interval)?;
                drop(wal);
                results = Arc::new(Mutex::new(Vec::new()));
                io = crashed;
                let (w, rec) =
                    open_sim(&io, &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_recovery(&mut model, &rec, false)?;
                wal = w;
            }
            Op::Reopen => {
                wal.shutdown();
                absorb(&mut model, &results, true)?;
                drop(wal);
                let clean = !model.faulted;
                io.heal();
                let (w, rec) =
                    open_sim(&io, &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_recovery(&mut model, &rec, clean)?;
                wal = w;
            }
        }
    }
    wal.shutdown();
    absorb(&mut model, &results, true)?;
    drop(wal);
    let clean = !model.faulted;
    io.heal();
    let (_wal, rec) = open_sim(&io, &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_recovery(&mut model, &rec, clean)
}

/// At a crash only the Ok results that already arrived count; errors are expected (dead disk).
fn absorb_before_crash(
    model: &mut Model,
    results: &Results,
    interval: bool,
) -> Result<(), TestCaseError> {
    for (expected, result) in results.lock().unwrap().drain(..) {
        if let Ok(lsn) = result {
            prop_assert_eq!(lsn, expected, "completion lsn");
            if !interval {
                model.durable = model.durable.max(lsn);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_model(
        ops in proptest::collection::vec(op(), 1..60),
        interval in any::<bool>(),
        segment_bytes in prop_oneof![Just(4096u64), Just(8192), Just(1 << 16)],
        max_batch_bytes in prop_oneof![Just(2048usize), Just(1 << 20)],
    ) {
        run_model(ops, interval, segment_bytes, max_batch_bytes)?;
    }
}

/// `(offset, encoded length, lsn)` of one frame in a segment.
type FrameAt = (usize, usize, Lsn);

/// Writes `sizes.len()` records and returns, per segment, its path and frames.
fn write_and_map(io: &SimIo, opts: &WalOptions, sizes: &[usize]) -> Vec<(PathBuf, Vec<FrameAt>)> {
    let (wal, _) = open_sim(io, opts).unwrap();
    for (i, size) in sizes.iter().enumerate() {
        let lsn = i as Lsn + 1;
        assert_eq!(append(&wal, 5, &payload_for(lsn, *size)).unwrap(), lsn);
    }
    wal.shutdown();
    drop(wal);
    segments_on(io)
        .into_iter()
        .map(|path| {
            let bytes = io.contents(&path).unwrap();
            let mut frames = Vec::new();
            let mut offset = 0;
            while let frame::Decoded::Frame(f) = frame::decode(&bytes, offset) {
                frames.push((offset, f.encoded_len, f.lsn));
                offset += f.encoded_len;
            }
            (path, frames)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any single bit flip inside written data: mid-log it refuses with the exact lsn range and
    /// repair loses exactly that range; in the very last frame it is a torn tail.
    #[test]
    fn bit_flips_are_never_silently_accepted(
        sizes in proptest::collection::vec(0usize..300, 20..60),
        pick in any::<u64>(),
        bit in 0u8..8,
    ) {
        let io = SimIo::new();
        let opts = sim_opts(4096);
        let layout = write_and_map(&io, &opts, &sizes);
        let total = sizes.len() as Lsn;
        let all: Vec<(usize, usize, usize, Lsn)> = layout
            .iter()
            .enumerate()
            .flat_map(|(s, (_, frames))| frames.iter().map(move |(o, l, lsn)| (s, *o, *l, *lsn)))
            .collect();
        prop_assert_eq!(all.len() as Lsn, total);
        let (seg, offset, len, lsn) = all[(pick % total) as usize];
        let at = offset + (pick / total) as usize % len;
        let path = &layout[seg].0;
        let byte = io.contents(path).unwrap()[at] ^ (1 << bit);
        io.corrupt(path, at, &[byte]);

        match open_sim(&io, &opts) {
            Ok((_wal, rec)) => {
                prop_assert_eq!(lsn, total, "only a flip in the last frame may open cleanly");
                prop_assert!(rec.torn_tail_bytes > 0);
                prop_assert_eq!(lsns(&rec), (1..total).collect::<Vec<_>>());
            }
            Err(WalError::Corrupt { first_lsn, last_known_lsn, segment, .. }) => {
                prop_assert!(lsn < total);
                prop_assert_eq!(first_lsn, lsn);
                prop_assert_eq!(last_known_lsn, Some(total));
                prop_assert_eq!(&segment, path);
                let mut repair = opts.clone();
                repair.repair = true;
                let (wal, rec) = open_sim(&io, &repair).unwrap();
                let report = rec.repair.as_ref().unwrap();
                prop_assert_eq!(&report.lost, &vec![lsn..=total]);
                prop_assert_eq!(lsns(&rec), (1..lsn).collect::<Vec<_>>());
                prop_assert_eq!(append(&wal, 1, b"x").unwrap(), total + 1);
            }
            Err(other) => return Err(TestCaseError::fail(format!("unexpected error: {other}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A full disk: held, refused, resumed; never poisoned, never a hole, never a torn record.

fn full_disk_opts() -> WalOptions {
    let mut opts = sim_opts(4096);
    opts.disk_full_retry = Duration::from_millis(5);
    opts
}

/// Polls `condition` until it holds; fails the test after 10 s.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

type Done = mpsc::Receiver<(Lsn, Result<Lsn, WalError>)>;

/// Submits records of 100 bytes with the lsns `lsns` expects, until the WAL refuses one for a
/// full disk; returns how many it took.
fn submit_range(
    wal: &Wal,
    lsns: std::ops::RangeInclusive<Lsn>,
    tx: &mpsc::Sender<(Lsn, Result<Lsn, WalError>)>,
) -> u64 {
    let mut taken = 0;
    for lsn in lsns {
        let tx = tx.clone();
        let submitted = wal.submit(
            3,
            payload_for(lsn, 100),
            Box::new(move |r| {
                let _ = tx.send((lsn, r));
            }),
        );
        match submitted {
            Ok(()) => taken += 1,
            Err(SubmitError::DiskFull) => break,
            Err(e) => panic!("submit of lsn {lsn}: {e}"),
        }
    }
    taken
}

fn tmp_files(io: &SimIo) -> usize {
    io.paths()
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .count()
}

/// Fills the active segment on a disk with no room for the next one: the record that needs the
/// roll is held. Returns the receiver, the lsn of the first held record and how many are held.
fn fill_until_held(io: &SimIo, wal: &Wal) -> (Done, Lsn, Lsn) {
    io.set_capacity(Some(io.used_bytes()));
    let per_segment = 4096 / frame::frame_len(100) as Lsn;
    let (tx, rx) = mpsc::channel();
    assert_eq!(submit_range(wal, 1..=per_segment, &tx), per_segment);
    for _ in 1..=per_segment {
        let (lsn, r) = rx.recv().unwrap();
        assert_eq!(r.unwrap(), lsn, "records that fit are acknowledged");
    }
    assert!(!wal.disk_full());
    let held = per_segment + 1;
    let taken = submit_range(wal, held..=held + 4, &tx);
    assert!(taken >= 1);
    wait_until("the writer finds the disk full", || wal.disk_full());
    (rx, held, taken)
}

#[test]
fn full_disk_at_segment_creation_refuses_new_work_and_resumes_when_space_returns() {
    let io = SimIo::new();
    let opts = full_disk_opts();
    let (wal, _) = open_sim(&io, &opts).unwrap();
    let (rx, held, taken) = fill_until_held(&io, &wal);
    let last = held + taken - 1;

    // New work is refused at once; what was taken waits, neither acknowledged nor failed.
    let refused = wal.submit(3, b"new".to_vec(), Box::new(|_| panic!("must not run")));
    assert!(matches!(refused, Err(SubmitError::DiskFull)), "{refused:?}");
    let refused = wal.barrier(Box::new(|_| panic!("must not run")));
    assert!(matches!(refused, Err(SubmitError::DiskFull)), "{refused:?}");
    assert!(rx.try_recv().is_err(), "held records are not answered");
    assert!(!wal.poisoned());
    assert_eq!(wal.durable_lsn(), held - 1);
    let stats = wal.stats();
    assert!(
        stats.disk_full && stats.disk_full_episodes == 1,
        "{stats:?}"
    );
    // The housekeeper's attempt may still be on its way out.
    wait_until("failed spares are removed", || tmp_files(&io) == 0);

    io.set_capacity(None);
    for lsn in held..=last {
        let (expected, r) = rx.recv().unwrap();
        assert_eq!(
            (expected, r.unwrap()),
            (lsn, lsn),
            "held records complete in order"
        );
    }
    assert!(!wal.disk_full());
    // Some of the five may have been refused once the writer found the disk full: the next
    // record follows the last one taken.
    assert_eq!(
        append(&wal, 3, &payload_for(last + 1, 100)).unwrap(),
        last + 1
    );
    assert_eq!(wal.stats().disk_full_episodes, 1);
    wal.shutdown();
    drop(wal);
    let (_wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..=last + 1).collect::<Vec<_>>());
    for r in &rec.records {
        assert_eq!(r.payload, payload_for(r.lsn, 100));
    }
}

#[test]
fn shutdown_while_the_disk_is_full_answers_closed_without_poisoning() {
    let io = SimIo::new();
    let opts = full_disk_opts();
    let (wal, _) = open_sim(&io, &opts).unwrap();
    let (rx, held, taken) = fill_until_held(&io, &wal);
    wal.shutdown();
    for _ in 0..taken {
        let (_, r) = rx.recv().unwrap();
        assert!(matches!(r, Err(WalError::Closed)), "{r:?}");
    }
    assert!(!wal.poisoned());
    drop(wal);
    io.set_capacity(None);
    let (wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..held).collect::<Vec<_>>());
    assert_eq!(rec.torn_tail_bytes, 0);
    assert_eq!(append(&wal, 3, b"after").unwrap(), held);
}

#[test]
fn a_short_write_for_lack_of_space_is_written_again_at_the_same_offset() {
    let io = SimIo::new();
    let opts = full_disk_opts();
    let (wal, _) = open_sim(&io, &opts).unwrap();
    assert_eq!(append(&wal, 3, &payload_for(1, 100)).unwrap(), 1);
    io.fail_next_no_space(FaultOp::Write);
    io.fail_next_no_space(FaultOp::Write);
    assert_eq!(append(&wal, 3, &payload_for(2, 100)).unwrap(), 2);
    assert_eq!(append(&wal, 3, &payload_for(3, 100)).unwrap(), 3);
    assert!(!wal.poisoned() && !wal.disk_full());
    assert_eq!(wal.stats().disk_full_episodes, 1);
    wal.shutdown();
    drop(wal);
    let (_wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(lsns(&rec), vec![1, 2, 3]);
    assert_eq!(rec.records[1].payload, payload_for(2, 100));
    assert_eq!(rec.torn_tail_bytes, 0);
}

#[test]
fn a_crash_during_short_writes_never_replays_a_torn_or_unsubmitted_record() {
    for keep in [0u64, 1, 37, 80, 150, 400, 10_000] {
        let io = SimIo::new();
        let opts = full_disk_opts();
        let (wal, _) = open_sim(&io, &opts).unwrap();
        for lsn in 1..=3 {
            assert_eq!(append(&wal, 3, &payload_for(lsn, 100)).unwrap(), lsn);
        }
        // Every attempt writes half a batch and fails: the page cache holds torn frames.
        for _ in 0..10_000 {
            io.fail_next_no_space(FaultOp::Write);
        }
        let (tx, rx) = mpsc::channel();
        assert!(submit_range(&wal, 4..=6, &tx) >= 1);
        wait_until("the writer finds the disk full", || wal.disk_full());
        let io = io.crash(keep);
        drop(wal);
        for (_, r) in rx.try_iter() {
            assert!(r.is_err(), "nothing held is acknowledged: {r:?}");
        }
        let (_wal, rec) = open_sim(&io, &opts).unwrap();
        let got = lsns(&rec);
        assert!(got.starts_with(&[1, 2, 3]), "keep {keep}: {got:?}");
        assert_eq!(got, (1..rec.next_lsn).collect::<Vec<_>>());
        for r in &rec.records {
            assert_eq!(
                r.payload,
                payload_for(r.lsn, 100),
                "keep {keep}: lsn {}",
                r.lsn
            );
        }
    }
}

#[test]
fn no_space_from_fdatasync_poisons() {
    let io = SimIo::new();
    let (wal, _) = open_sim(&io, &full_disk_opts()).unwrap();
    assert_eq!(append(&wal, 1, b"fine").unwrap(), 1);
    io.fail_next_no_space(FaultOp::SyncData);
    let err = append(&wal, 1, b"doomed").unwrap_err();
    assert!(matches!(err, WalError::Poisoned { .. }), "{err}");
    assert!(wal.poisoned() && !wal.disk_full());
}

#[test]
fn no_space_at_the_segment_rename_is_retried() {
    let io = SimIo::new();
    let opts = full_disk_opts();
    let (wal, _) = open_sim(&io, &opts).unwrap();
    io.fail_next_no_space(FaultOp::Rename);
    for lsn in 1..=100 {
        assert_eq!(append(&wal, 3, &payload_for(lsn, 100)).unwrap(), lsn);
    }
    assert!(wal.stats().segment_rolls >= 2);
    assert_eq!(wal.stats().disk_full_episodes, 1);
    assert!(!wal.poisoned());
    wal.shutdown();
    drop(wal);
    let (_wal, rec) = open_sim(&io, &opts).unwrap();
    assert_eq!(lsns(&rec), (1..=100).collect::<Vec<_>>());
}
