//! The embedded log: append/read/reopen properties, crash safety at every
//! byte of a torn frame, and retention by whole segments.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, TimestampMillisecondType};
use lambdaflow::stream::{Log, LogError, LogOptions};
use proptest::prelude::*;

type Row = (i64, String, i64, i64);

fn batch(rows: &[Row]) -> RecordBatch {
    crate::common::paper_batch(rows.iter().map(|r| (r.0, &r.1, r.2, r.3)))
}

fn rows_of(b: &RecordBatch) -> Vec<Row> {
    let z = b.column(0).as_primitive::<Int64Type>();
    let n = b.column(1).as_string::<i32>();
    let p = b.column(2).as_primitive::<Int64Type>();
    let t = b.column(3).as_primitive::<TimestampMillisecondType>();
    (0..b.num_rows())
        .map(|i| (z.value(i), n.value(i).to_string(), p.value(i), t.value(i)))
        .collect()
}

fn row(i: u64) -> Row {
    (
        10_000 + (i % 90_000) as i64,
        format!("product{}", i % 13),
        (i % 100) as i64,
        1_414_800_000_000 + i as i64,
    )
}

fn small(partitions: u32, segment_bytes: u64) -> LogOptions {
    LogOptions {
        partitions,
        segment_bytes,
        index_interval_bytes: 512,
        ..LogOptions::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Everything in partition `p` from `from` to the end, as rows.
fn read_rows(log: &Log, p: u32, from: u64) -> Vec<Row> {
    let end = log.end_offset(p).unwrap();
    let mut out = Vec::new();
    let mut next = from;
    while next < end {
        let got = log.read(p, next, 7).unwrap();
        assert!(
            !got.is_empty(),
            "read from {next} below end {end} returned nothing"
        );
        for b in got {
            assert_eq!(b.first_offset, next, "batches must be contiguous");
            next += b.batch.num_rows() as u64;
            out.extend(rows_of(&b.batch));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random batches over random sessions (each a reopen): the log always
    /// holds exactly what was acknowledged, in order, readable from any offset.
    #[test]
    fn append_read_reopen(
        sessions in prop::collection::vec(
            prop::collection::vec((0u32..2, 1usize..40), 0..12), 1..5),
        probes in prop::collection::vec(0.0f64..1.0, 4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let mut model: Vec<Vec<Row>> = vec![Vec::new(), Vec::new()];
        let mut counter = 0u64;
        for appends in sessions {
            let log = Log::open(dir.path(), small(2, 4096)).unwrap();
            for p in 0..2 {
                prop_assert_eq!(log.end_offset(p).unwrap(), model[p as usize].len() as u64,
                    "reopen must find every acknowledged event of partition {}", p);
            }
            for (p, n) in appends {
                let rows: Vec<Row> = (0..n).map(|_| { counter += 1; row(counter) }).collect();
                let ack = rt.block_on(log.append(p, &batch(&rows))).unwrap();
                prop_assert_eq!(ack.first, model[p as usize].len() as u64, "offsets are dense");
                prop_assert_eq!(ack.count, n as u64);
                model[p as usize].extend(rows);
            }
            for p in 0..2u32 {
                let all = &model[p as usize];
                for &f in &probes {
                    let from = (f * all.len() as f64) as u64;
                    prop_assert_eq!(&read_rows(&log, p, from), &all[from as usize..],
                        "reading partition {} from {}", p, from);
                }
            }
        }
    }
}

/// Appends one event per frame, fsynced one by one; returns segment lengths
/// after each frame.
fn build_frames(dir: &Path, frames: u64) -> Vec<u64> {
    let rt = rt();
    let log = Log::open(dir, small(1, 1 << 30)).unwrap();
    let seg = dir.join("p0/00000000000000000000.log");
    let mut lens = vec![std::fs::metadata(&seg).unwrap().len()];
    for i in 0..frames {
        rt.block_on(log.append(0, &batch(&[row(i)]))).unwrap();
        lens.push(std::fs::metadata(&seg).unwrap().len());
    }
    lens
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn a_torn_last_frame_is_cut_at_every_byte_position() {
    let src = tempfile::tempdir().unwrap();
    let lens = build_frames(src.path(), 3);
    let (last_start, last_end) = (lens[2], lens[3]);
    let rt = rt();
    for cut in last_start..=last_end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let seg = dir.path().join("p0/00000000000000000000.log");
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(cut).unwrap();
        drop(f);

        let log = Log::open(dir.path(), small(1, 1 << 30)).unwrap();
        let complete = if cut == last_end { 3 } else { 2 };
        assert_eq!(
            log.end_offset(0).unwrap(),
            complete,
            "cut at byte {cut} of a frame spanning [{last_start}, {last_end}): the log must hold exactly the complete frames"
        );
        assert_eq!(
            read_rows(&log, 0, 0),
            (0..complete).map(row).collect::<Vec<_>>(),
            "cut at byte {cut}: the complete frames read back intact"
        );
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            lens[complete as usize],
            "cut at byte {cut}: the torn bytes are truncated"
        );
        // The log goes on from there with dense offsets.
        let ack = rt.block_on(log.append(0, &batch(&[row(99)]))).unwrap();
        assert_eq!(
            ack.first, complete,
            "cut at byte {cut}: appending resumes at the next offset"
        );
        drop(log);
        let log = Log::open(dir.path(), small(1, 1 << 30)).unwrap();
        assert_eq!(log.end_offset(0).unwrap(), complete + 1);
    }
}

#[test]
fn a_garbled_last_frame_is_cut_and_its_bytes_kept_aside() {
    let src = tempfile::tempdir().unwrap();
    let lens = build_frames(src.path(), 3);
    // Flip one byte in the middle of the last frame: its CRC fails.
    let seg = src.path().join("p0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = ((lens[2] + lens[3]) / 2) as usize;
    bytes[mid] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let log = Log::open(src.path(), small(1, 1 << 30)).unwrap();
    assert_eq!(
        log.end_offset(0).unwrap(),
        2,
        "the garbled frame is not served"
    );
    let aside: Vec<_> = std::fs::read_dir(src.path().join("p0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".truncated-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the cut bytes are kept in one .truncated file: {aside:?}"
    );
    let kept = std::fs::read(src.path().join("p0").join(&aside[0])).unwrap();
    assert_eq!(kept, bytes[lens[2] as usize..], "kept byte for byte");
}

#[test]
fn corruption_in_a_sealed_segment_is_reported_on_read_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    for i in 0..40 {
        let rows: Vec<Row> = (0..5).map(|j| row(i * 5 + j)).collect();
        rt.block_on(log.append(0, &batch(&rows))).unwrap();
    }
    assert!(
        log.stats()[0].segments > 2,
        "small segments must have rolled"
    );
    drop(log);
    let seg = dir.path().join("p0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    // Sealed segments are trusted on open (their index is intact)…
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    assert_eq!(log.end_offset(0).unwrap(), 200);
    // …and the damage is caught by the frame CRC when read, never served.
    let err = (|| {
        let mut next = 0;
        while next < 200 {
            for b in log.read(0, next, 1000)? {
                next += b.batch.num_rows() as u64;
            }
        }
        Ok::<_, LogError>(())
    })()
    .expect_err("a flipped byte must be detected");
    match err {
        LogError::Corrupt {
            first_offset,
            until,
            ..
        } => {
            assert!(
                first_offset < until && until <= 200,
                "the error names the offsets affected: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("offsets {first_offset}..{until} cannot be read")),
                "the message names the range: {msg}"
            );
        }
        other => panic!("expected a Corrupt error, got {other}"),
    }
}

#[test]
fn retention_deletes_only_whole_segments_below_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    for i in 0..60 {
        let rows: Vec<Row> = (0..5).map(|j| row(i * 5 + j)).collect();
        rt.block_on(log.append(0, &batch(&rows))).unwrap();
    }
    let bases = |d: &Path| -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(d.join("p0"))
            .unwrap()
            .filter_map(|e| {
                e.unwrap()
                    .file_name()
                    .into_string()
                    .unwrap()
                    .strip_suffix(".log")
                    .map(|s| s.parse().unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let before = bases(dir.path());
    assert!(before.len() >= 4, "need several segments, got {before:?}");

    // An offset inside the third segment: the first two go, the third stays.
    let cut = before[2] + 1;
    let start = log.delete_below(0, cut).unwrap();
    assert_eq!(
        start, before[2],
        "the segment holding offset {cut} must stay"
    );
    assert_eq!(
        bases(dir.path()),
        before[2..],
        "only whole segments below {cut} are deleted"
    );
    assert_eq!(log.start_offset(0).unwrap(), before[2]);
    assert_eq!(
        read_rows(&log, 0, start),
        (start..300).map(row).collect::<Vec<_>>()
    );
    match log.read(0, start - 1, 10) {
        Err(LogError::Trimmed { start: s, .. }) => assert_eq!(s, start),
        other => panic!("reading below the start must say it was trimmed, got {other:?}"),
    }

    // Retention never deletes the active segment, even past the end.
    log.delete_below(0, u64::MAX).unwrap();
    assert_eq!(bases(dir.path()).len(), 1, "the active segment stays");
    assert_eq!(log.end_offset(0).unwrap(), 300);
    let last = *before.last().unwrap();
    drop(log);
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    assert_eq!(
        log.start_offset(0).unwrap(),
        last,
        "the start survives a reopen"
    );
    assert_eq!(log.end_offset(0).unwrap(), 300);
    let ack = rt.block_on(log.append(0, &batch(&[row(300)]))).unwrap();
    assert_eq!(ack.first, 300);
}

#[test]
fn concurrent_appends_share_fsyncs_and_stay_dense() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let log = Arc::new(Log::open(dir.path(), small(1, 1 << 20)).unwrap());
    let acks = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let rows: Vec<Row> = (0..3).map(|j| row(i * 3 + j)).collect();
                log.append(0, &batch(&rows)).await.unwrap()
            }));
        }
        let mut acks = Vec::new();
        for t in tasks {
            acks.push(t.await.unwrap());
        }
        acks
    });
    let mut firsts: Vec<u64> = acks.iter().map(|a| a.first).collect();
    firsts.sort();
    assert_eq!(
        firsts,
        (0..200).map(|i| i * 3).collect::<Vec<_>>(),
        "every append got its own dense range"
    );
    let s = &log.stats()[0];
    assert_eq!(s.frames, 200);
    assert!(
        s.fsyncs <= s.frames,
        "one fsync per group, never more than one per frame"
    );
    assert_eq!(read_rows(&log, 0, 0).len(), 600);
}

#[test]
fn a_second_process_cannot_open_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let _log = Log::open(dir.path(), small(1, 4096)).unwrap();
    match Log::open(dir.path(), small(1, 4096)) {
        Err(LogError::Locked { .. }) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a locked log must not open twice"),
    }
}

#[test]
fn the_partition_count_cannot_change_silently() {
    let dir = tempfile::tempdir().unwrap();
    drop(Log::open(dir.path(), small(2, 4096)).unwrap());
    let err = Log::open(dir.path(), small(3, 4096))
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("has 2 partitions") && msg.contains("asks for 3"),
        "{msg}"
    );
}

#[test]
fn readers_follow_the_durable_end() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    let mut rx = log.subscribe(0).unwrap();
    assert_eq!(*rx.borrow_and_update(), 0);
    rt.block_on(log.append(0, &batch(&[row(0), row(1)])))
        .unwrap();
    assert!(rx.has_changed().unwrap(), "an append notifies subscribers");
    assert_eq!(*rx.borrow_and_update(), 2);
    assert!(
        log.read(0, 3, 10).is_err(),
        "reading past the end is an error"
    );
    assert!(
        log.read(0, 2, 10).unwrap().is_empty(),
        "reading at the end is empty"
    );
    let got = log.read(0, 1, 10).unwrap();
    assert_eq!(got[0].first_offset, 1);
    assert_eq!(got[0].batch.num_rows(), 1);
    assert!(
        got[0].ingest_time_ms > 1_700_000_000_000,
        "frames carry their ingest time"
    );
    assert!(got[0].batch.column(0).len() == 1);
}

#[test]
fn corruption_in_the_middle_of_the_active_segment_is_not_taken_for_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let log = Log::open(dir.path(), small(1, 1 << 30)).unwrap();
    let mut frame_ends = Vec::new();
    for i in 0..20 {
        let rows: Vec<Row> = (0..5).map(|j| row(i * 5 + j)).collect();
        rt.block_on(log.append(0, &batch(&rows))).unwrap();
        frame_ends.push(
            std::fs::metadata(dir.path().join("p0/00000000000000000000.log"))
                .unwrap()
                .len(),
        );
    }
    drop(log);
    // Damage frame 7 (offsets 35..40) in the middle of the one, active segment.
    let seg = dir.path().join("p0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = (frame_ends[6] + frame_ends[7]) / 2;
    bytes[at as usize] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let log = Log::open(dir.path(), small(1, 1 << 30)).unwrap();
    assert_eq!(
        log.end_offset(0).unwrap(),
        100,
        "the 60 acknowledged events after the damage must not be cut off as a torn tail"
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "the segment is left as it is"
    );
    let err = log
        .read(0, 0, 1000)
        .and_then(|_| log.read(0, 35, 1000))
        .expect_err("the damaged frame must not be read");
    match &err {
        LogError::Corrupt {
            first_offset,
            until,
            ..
        } => {
            assert_eq!(
                (*first_offset, *until),
                (35, 40),
                "exactly the damaged frame's offsets: {err}"
            )
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let before: u64 = log
        .read(0, 0, 35)
        .unwrap()
        .iter()
        .map(|b| b.batch.num_rows() as u64)
        .sum();
    assert_eq!(before, 35, "everything before the damage reads");
    let after: Vec<Row> = log
        .read(0, 40, 1000)
        .unwrap()
        .iter()
        .flat_map(|b| rows_of(&b.batch))
        .collect();
    assert_eq!(
        after,
        (40..100).map(row).collect::<Vec<_>>(),
        "everything after it reads"
    );
    // And the log goes on.
    let ack = rt.block_on(log.append(0, &batch(&[row(100)]))).unwrap();
    assert_eq!(ack.first, 100);
}

#[test]
fn a_log_behind_its_floor_restarts_there_and_never_reuses_an_offset() {
    let rt = rt();
    let floored = |floor: u64| LogOptions {
        floors: vec![floor],
        ..small(1, 1 << 30)
    };
    // Lost whole: a new log starts at the floor.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), floored(7)).unwrap();
    assert_eq!(
        (log.start_offset(0).unwrap(), log.end_offset(0).unwrap()),
        (7, 7),
        "a new log for a master dataset that holds [0, 7) starts at 7"
    );
    assert_eq!(log.recoveries().len(), 1, "and says so");
    let ack = rt.block_on(log.append(0, &batch(&[row(7)]))).unwrap();
    assert_eq!(ack.first, 7, "offsets 0..7 belong to archived events");
    drop(log);

    // Damaged at its tail after archiving: the cut is damage, not a torn write.
    let src = tempfile::tempdir().unwrap();
    let lens = build_frames(src.path(), 3);
    let seg = src.path().join("p0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[((lens[2] + lens[3]) / 2) as usize] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let log = Log::open(src.path(), floored(3)).unwrap();
    assert_eq!(
        log.end_offset(0).unwrap(),
        3,
        "the log was cut to 2, below the archived 3: it restarts at 3"
    );
    let r = &log.recoveries()[0];
    assert_eq!((r.log_end, r.floor), (2, 3));
    assert!(
        r.damage.is_some(),
        "a cut below the archived coverage is reported as damage: {r}"
    );
    let moved = r.moved_to.clone().expect("the old segments are kept aside");
    assert!(moved.join("00000000000000000000.log").exists());
    let ack = rt.block_on(log.append(0, &batch(&[row(3)]))).unwrap();
    assert_eq!(ack.first, 3);
    drop(log);
    // Reopened: the restart holds, and nothing is reported again.
    let log = Log::open(src.path(), floored(3)).unwrap();
    assert_eq!(log.end_offset(0).unwrap(), 4);
    assert!(log.recoveries().is_empty(), "{:?}", log.recoveries());
    assert_eq!(read_rows(&log, 0, 3), vec![row(3)]);

    // At or above its floor, a log is left as it is.
    let dir = tempfile::tempdir().unwrap();
    build_frames(dir.path(), 3);
    let log = Log::open(dir.path(), floored(3)).unwrap();
    assert_eq!(
        (log.start_offset(0).unwrap(), log.end_offset(0).unwrap()),
        (0, 3)
    );
    assert!(log.recoveries().is_empty());
}

#[test]
fn a_roll_that_failed_after_creating_its_segment_does_not_block_later_rolls() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    let rows: Vec<Row> = (0..200).map(row).collect();
    let ack = rt.block_on(log.append(0, &batch(&rows))).unwrap();
    let next = ack.first + ack.count;
    // What a roll that created its file and then failed (EMFILE) leaves behind.
    std::fs::File::create(dir.path().join(format!("p0/{next:020}.log"))).unwrap();
    let ack = rt
        .block_on(log.append(0, &batch(&rows)))
        .expect("the next roll takes over the empty segment file a failed roll left");
    assert_eq!(ack.first, next);
    drop(log);
    let log = Log::open(dir.path(), small(1, 4096)).unwrap();
    assert_eq!(log.end_offset(0).unwrap(), 400);
    assert_eq!(read_rows(&log, 0, 0).len(), 400);
}

#[test]
fn reading_a_range_past_the_log_end_fails_instead_of_spinning() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), small(1, 1 << 30)).unwrap());
    let rows: Vec<Row> = (0..10).map(row).collect();
    rt.block_on(log.append(0, &batch(&rows))).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let read = rt.block_on(lambdaflow::stream::source::read_exact(l.as_ref(), 0, 5, 20));
        let _ = tx.send(read.map(|b| b.len()));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("read_exact must return when the log ends inside the range, not loop forever");
    assert!(
        matches!(
            got,
            Err(lambdaflow::stream::SourceError::EndsInside { end: 10, .. })
        ),
        "an error that says the range runs past the end (10): {got:?}"
    );
}

/// Descriptors of `.log` files under `dir` this process holds open.
fn open_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(&dir) && t.extension().is_some_and(|x| x == "log"))
        .collect()
}

#[test]
fn open_descriptors_do_not_grow_with_the_number_of_segments() {
    // A backlog of small segments (the archive behind ingest) once held a
    // descriptor per segment until the process ran out of them.
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small(2, 4096)).unwrap();
    for i in 0..400u64 {
        let rows: Vec<Row> = (0..5).map(|j| row(i * 5 + j)).collect();
        rt.block_on(log.append((i % 2) as u32, &batch(&rows)))
            .unwrap();
    }
    let segments: usize = log.stats().iter().map(|s| s.segments).sum();
    assert!(
        segments >= 40,
        "the test needs many segments, got {segments}"
    );
    for p in 0..2 {
        assert_eq!(read_rows(&log, p, 0).len(), 1000);
    }
    let held = open_segments(dir.path());
    // The active segment of each partition: its writer's and its readers' handle.
    assert!(
        held.len() <= 4,
        "{segments} segments must not keep {} descriptors open (two per partition's active segment): {:?}…",
        held.len(),
        &held[..held.len().min(4)]
    );
    drop(log);
    let log = Log::open(dir.path(), small(2, 4096)).unwrap();
    let held = open_segments(dir.path());
    assert!(
        held.len() <= 4,
        "after a reopen the sealed segments are closed again: {held:?}"
    );
    assert_eq!(
        read_rows(&log, 1, 0).len(),
        1000,
        "sealed segments still read back"
    );
}
