//! `lambdaflow status`: a running server's [`Status`], as text.
//!
//! ```text
//!  GET /v1/status ──▶ Status (typed) ──▶ header · partitions table · batch
//!                                        · view changes · ingest · health
//! ```

use std::fmt::Write;

use crate::frontend::status::{PartitionStatus, Status};
use crate::produce::group;

/// The whole report, as of `now` (ms since the epoch).
pub fn render(s: &Status, now: i64) -> String {
    let mut out = String::new();
    header(&mut out, s, now);
    partitions(&mut out, &s.partitions);
    batch(&mut out, s, now);
    view_changes(&mut out, s);
    batch_progress(&mut out, s, now);
    ingest(&mut out, s);
    health(&mut out, s, now);
    out
}

fn n(v: Option<u64>) -> String {
    v.map_or("-".to_string(), group)
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The stream, its recorded identity, who drives, the Postgres endpoint.
fn header(out: &mut String, s: &Status, now: i64) {
    if let Some(stream) = &s.stream {
        let _ = writeln!(out, "stream: {stream}");
    }
    if let Some(r) = &s.stream_identity {
        let _ = writeln!(
            out,
            "stream identity: {} (recorded {}, generation {}: {})",
            r.identity, r.at, r.generation, r.how
        );
    }
    if let Some(c) = s.cluster.as_ref().filter(|c| c.lease.kind == "lease") {
        let lease = &c.lease;
        let expires = lease
            .expires_ms
            .map_or("-".to_string(), |t| format!("{:.1} s", secs(t - now)));
        let _ = if lease.held {
            writeln!(
                out,
                "storage: {} · this node drives (lease term {}, renewed, expires in {expires})",
                c.root, lease.term
            )
        } else {
            writeln!(
                out,
                "storage: {} · driven by {} (lease term {}, expires in {expires}); this node serves and follows",
                c.root,
                lease.node.as_deref().unwrap_or("nobody yet"),
                lease.term
            )
        };
    }
    if let Some(pg) = &s.pg {
        let c =
            |a: &std::sync::atomic::AtomicU64| group(a.load(std::sync::atomic::Ordering::Relaxed));
        let _ = writeln!(
            out,
            "postgres: {} connections ({} refused, {} logins denied) · {} queries, {} point reads, {} errors",
            c(&pg.connections),
            c(&pg.refused),
            c(&pg.denied),
            c(&pg.queries),
            c(&pg.point_reads),
            c(&pg.errors)
        );
    }
}

/// The partitions' marks, right-aligned, and below them the name and state
/// of each partition the stream names (a Kinesis shard).
fn partitions(out: &mut String, parts: &[PartitionStatus]) {
    let mut t = super::table::aligned([
        ("partition", 9),
        ("stream end", 14),
        ("realtime R", 14),
        ("archived", 14),
        ("published H", 14),
        ("not in batch", 12),
        ("speed lag", 10),
    ]);
    for p in parts {
        let end = p.end();
        let behind = |mark: Option<u64>| match (end, mark) {
            (Some(e), Some(m)) => group(e.saturating_sub(m)),
            (Some(e), None) => group(e),
            _ => "-".into(),
        };
        t.add_row([
            group(p.partition.into()),
            n(end),
            n(p.realtime),
            n(p.archived),
            n(p.published),
            behind(p.published),
            behind(p.realtime),
        ]);
    }
    out.push_str(&super::table::lines(&t));
    for p in parts {
        if let Some(shard) = &p.shard {
            let _ = writeln!(
                out,
                "{:>9}  {} ({})",
                p.partition,
                shard.id,
                shard.state.as_str()
            );
        }
    }
}

/// The published run, the engine, the last runs and their stages.
fn batch(out: &mut String, s: &Status, now: i64) {
    let b = s.batch.as_ref();
    let _ = match b.and_then(|b| b.published.as_ref()) {
        Some(r) => writeln!(
            out,
            "batch: run {} published {:.1} s ago (master version {}, {} events), took {:.2} s",
            group(r.run),
            secs(now - r.started_ms - r.duration_ms as i64),
            r.table_version,
            group(r.events),
            r.duration_ms as f64 / 1000.0
        ),
        None => writeln!(out, "batch: nothing published yet"),
    };
    let Some(b) = b else { return };
    let _ = match &b.scheduler {
        Some(sched) => writeln!(out, "batch: engine {}, scheduler {sched}", b.engine),
        None => writeln!(out, "batch: engine {}", b.engine),
    };
    for r in b.recent.iter().take(5) {
        let c = &r.compute;
        let stages: Vec<String> = c
            .stages
            .iter()
            .map(|x| format!("{} {} ms", x.stage, group(x.ms)))
            .collect();
        let _ = writeln!(
            out,
            "  run {:>6}  {:<8} {:>8.2} s  {}  {}",
            group(r.run),
            if c.engine.is_empty() { "-" } else { &c.engine },
            r.duration_ms as f64 / 1000.0,
            r.kinds,
            stages.join(", ")
        );
    }
}

/// Views changed while serving: what is being built, what was lately.
fn view_changes(out: &mut String, s: &Status) {
    let Some(v) = &s.view_changes else { return };
    let (done, total) = (v.build_events_done, v.build_events_total);
    for c in v.changes.iter().take(5) {
        let detail = match c.state.as_str() {
            "building" if total > 0 => format!(
                " ({} of {} events, {:.0}%)",
                group(done),
                group(total),
                100.0 * done as f64 / total as f64
            ),
            "published" => format!(" in run {}", n(c.run)),
            _ => c
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default(),
        };
        let _ = writeln!(out, "view {} `{}`: {}{detail}", c.change, c.view, c.state);
    }
}

/// A run in progress, and the last run's failure.
fn batch_progress(out: &mut String, s: &Status, now: i64) {
    let Some(b) = &s.batch else { return };
    if let Some(since) = b.running_since_ms {
        let _ = writeln!(
            out,
            "batch: a run is in progress for {:.1} s",
            secs(now - since)
        );
    }
    if let Some(e) = &b.last_error {
        let _ = writeln!(out, "batch: last run failed: {e}");
    }
}

fn ingest(out: &mut String, s: &Status) {
    let i = &s.ingest;
    let _ = writeln!(
        out,
        "ingest: {} requests, {} accepted, {} rejected (dead letters)",
        group(i.requests),
        group(i.accepted),
        group(i.rejected)
    );
    if let Some(d) = &i.idempotence {
        let _ = writeln!(
            out,
            "  numbered requests: {} · re-sent recognised {} (completed {}) · refused: changed body {}, too old {} · producers {} of {} (window {}), {} retired to make room",
            group(d.identified),
            group(d.recognised),
            group(d.completed),
            group(d.changed),
            group(d.too_old),
            group(d.producers),
            group(d.max_producers),
            group(d.window),
            group(d.retired)
        );
    }
    let keys: Vec<(u32, crate::keys::KeyStats)> = s
        .partitions
        .iter()
        .filter_map(|p| Some((p.partition, p.keys?)))
        .collect();
    if !keys.is_empty() {
        let per: Vec<String> = keys
            .iter()
            .map(|(p, k)| format!("p{p} {}", group(k.duplicates)))
            .collect();
        let (memory, disk, held): (u64, u64, u64) = keys.iter().fold((0, 0, 0), |a, (_, k)| {
            (
                a.0 + k.index.memory_bytes,
                a.1 + k.index.disk_bytes,
                a.2 + k.index.keys,
            )
        });
        let _ = writeln!(
            out,
            "  event keys: duplicates found (counted by no view) {} · index: {} keys, {} in memory, {} on disk",
            per.join(", "),
            group(held),
            bytesize::ByteSize::b(memory),
            bytesize::ByteSize::b(disk)
        );
        let strays: u64 = keys.iter().map(|(_, k)| k.strays).sum();
        if strays > 0 {
            let _ = writeln!(
                out,
                "  event keys: {} sampled keys came again in another partition (counted twice: the stream is not keyed by the event key; see health)",
                group(strays)
            );
        }
    }
}

/// Failures being retried, and repairs made.
fn health(out: &mut String, s: &Status, now: i64) {
    let (problems, recovered) = s
        .health
        .as_ref()
        .map_or((&[][..], &[][..]), |h| (&h.problems[..], &h.recovered[..]));
    if problems.is_empty() {
        let _ = writeln!(out, "health: ok");
    }
    for p in problems {
        let _ = writeln!(
            out,
            "PROBLEM {}: failing for {:.1} s ({} attempts): {}",
            p.component,
            secs(now - p.since_ms),
            group(p.count),
            p.error.replace('\n', "\n    ")
        );
    }
    for w in s.health.iter().flat_map(|h| &h.warnings) {
        let _ = writeln!(
            out,
            "WARNING {} ({} times, the latest {:.1} s ago): {}",
            w.component,
            group(w.count),
            secs(now - w.last_ms),
            w.error.replace('\n', "\n    ")
        );
    }
    for r in recovered {
        let _ = writeln!(out, "recovered {}: {}", r.component, r.what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::status::{LogStats, Shard, ShardState};

    /// A row as the hand-padded table before comfy-table wrote it.
    fn old_row(c: [&str; 7]) -> String {
        format!(
            "{:>9}  {:>14}  {:>14}  {:>14}  {:>14}  {:>12}  {:>10}\n",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6]
        )
    }

    /// A typed status renders every section from its fields: the header,
    /// the partitions table (aligned, with a shard's name), the run, the
    /// ingest counters and the problems.
    #[test]
    fn renders_a_typed_status() {
        let now = 1_000_000;
        let s: Status = serde_json::from_value(serde_json::json!({
            "stream": "kinesis stream `orders`",
            "cluster": {"root": "s3://bucket/x", "lease": {
                "kind": "lease", "holder": "a", "node": "node-a", "term": 7,
                "expires_ms": now + 2500, "held": false}},
            "partitions": [
                {"partition": 0, "start": 0, "end": 1500, "segments": 1, "bytes": 10,
                 "fsyncs": 1, "frames": 1, "archived": 1000, "published": 500, "realtime": 1500},
                {"partition": 1, "shard": {"id": "shardId-000000000001", "state": "closed"},
                 "stream_end": 20, "realtime": 20}
            ],
            "ingest": {"requests": 3, "accepted": 1500, "rejected": 2, "bytes": 9,
                "dead_letters_written": 2, "dead_letters_dropped": 0, "dead_letter_bytes": 0,
                "dead_letter_files_removed": 0, "dead_letters_recent": []},
            "batch": {"engine": "local", "published": {"run": 4, "table_version": 9,
                "h": [500], "events": 500, "as_of_ms": 0, "started_ms": now - 3000,
                "duration_ms": 1000, "engine": "local"},
                "recent": [], "running_since_ms": null, "runs": 4, "last_error": null},
            "health": {"problems": [{"component": "speed/p0", "error": "corrupt\nframe",
                "since_ms": now - 1500, "last_ms": now, "count": 3}], "recovered": [],
                "warnings": [{"component": "event keys", "error": "2 duplicates came to another partition",
                "since_ms": now - 9000, "last_ms": now - 4000, "count": 2}]}
        }))
        .expect("the status deserializes");
        assert_eq!(
            s.partitions[0].log,
            Some(LogStats {
                start: 0,
                end: 1500,
                segments: 1,
                bytes: 10,
                fsyncs: 1,
                frames: 1
            }),
            "a log partition's figures read back"
        );
        assert_eq!(
            s.partitions[1].shard,
            Some(Shard {
                id: "shardId-000000000001".into(),
                state: ShardState::Closed,
                behind_ms: None
            })
        );
        let text = render(&s, now);
        let expected: Vec<String> = vec![
            "stream: kinesis stream `orders`\n".into(),
            "storage: s3://bucket/x · driven by node-a (lease term 7, expires in 2.5 s); this node serves and follows\n".into(),
            old_row(["partition", "stream end", "realtime R", "archived", "published H", "not in batch", "speed lag"]),
            old_row(["0", "1,500", "1,500", "1,000", "500", "1,000", "0"]),
            old_row(["1", "20", "20", "-", "-", "20", "0"]),
            "        1  shardId-000000000001 (closed)\n".into(),
            "batch: run 4 published 2.0 s ago (master version 9, 500 events), took 1.00 s\n".into(),
            "batch: engine local\n".into(),
            "ingest: 3 requests, 1,500 accepted, 2 rejected (dead letters)\n".into(),
            "PROBLEM speed/p0: failing for 1.5 s (3 attempts): corrupt\n    frame\n".into(),
            "WARNING event keys (2 times, the latest 4.0 s ago): 2 duplicates came to another partition\n".into(),
        ];
        for line in &expected {
            assert!(text.contains(line), "the report has {line:?}:\n{text}");
        }
        assert!(!text.contains("health: ok"), "a problem is not ok:\n{text}");
    }
}
