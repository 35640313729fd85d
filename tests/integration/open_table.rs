//! The master dataset as an open table: another engine (Python deltalake)
//! appends rows of its own, compacts and vacuums the table, or a user
//! deletes a file by hand — the views stay exact, incremental runs go on,
//! and what cannot be repaired says how to restore it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;
use crate::common::exact::{assert_exactly, assert_views_equal_sql, send};
use crate::common::{Site, get_json, orders_and_covered};

const CONFIG: &str = "[stream]\npartitions = 1\n[archive]\nchunk_events = 200\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n";

/// Runs `scripts/other_engine.py` on the site's table; its file count after.
pub(crate) fn other_engine(table: &str, args: &[&str]) -> usize {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/other_engine.py");
    let out = Command::new(std::env::var("LAMBDAFLOW_PYTHON").unwrap_or("python3".into()))
        .arg(script)
        .arg(args[0])
        .arg(table)
        .args(&args[1..])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the other engine (Python deltalake) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
}

/// The published manifest (`views/CURRENT`).
fn current(data: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(data.join("views/CURRENT")).unwrap()).unwrap()
}

fn kind_of(manifest: &Value, view: &str) -> String {
    manifest["views"][view]["lineage"]["kind"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// A site whose table holds events 0..2000, archived and published, its
/// server stopped (what another engine then works on); what was acknowledged.
fn archived(config: &str) -> (Site, BTreeMap<(u32, u64), i64>) {
    let site = Site::new(config);
    let server = site.serve(&[]);
    let acked = send(&server.url, 0, 2000);
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    (site, acked)
}

/// Waits for a status that `ok` accepts.
fn wait_status(
    server: &common::Server,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let s = server.status();
        if ok(&s) {
            return s;
        }
        assert!(t.elapsed() < within, "{what} within {within:?}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rows_appended_by_another_engine_are_left_out_of_the_views_and_reported() {
    let (site, mut acked) = archived(CONFIG);

    // A copy of events 0..99 of partition 0, appended as the engine's own file.
    let master = site.data.join("master");
    other_engine(master.to_str().unwrap(), &["append-copy", "0", "100"]);

    let server = site.serve(&[]);
    acked.extend(send(&server.url, 2000, 2100));
    let s = server.wait_settled(Duration::from_secs(60));
    let (orders, covered) = orders_and_covered(&get_json(&format!(
        "{}/v1/views/sales_by_product",
        server.url
    )));
    assert_eq!(
        (orders, covered),
        (2100, 2100),
        "the views count each acknowledged event once, as their freshness says, whatever another engine appended"
    );
    let warnings = s["health"]["warnings"].to_string();
    assert!(
        warnings.contains("master-foreign") && warnings.contains("100 rows"),
        "health names the foreign file and its rows: {s}"
    );
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "left out, not a failure: {s}"
    );
    let m = current(&site.data);
    assert_eq!(
        kind_of(&m, "sales_by_product"),
        "incremental",
        "the foreign file does not force full recomputes: {m}"
    );
    assert_eq!(
        m["events"], 2100,
        "the run read the acknowledged events only: {m}"
    );
    server.stop();
}

#[test]
fn a_master_file_deleted_by_hand_is_rewritten_from_the_log() {
    let (site, mut acked) = archived(CONFIG);

    let files = parquet_files(&site.data.join("master"));
    assert!(files.len() >= 3, "{files:?}");
    let victim = files[1].clone();
    let original = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();

    let server = site.serve(&[]);
    acked.extend(send(&server.url, 2000, 2100));
    wait_status(
        &server,
        Duration::from_secs(60),
        "a rewrite of the missing file is reported",
        |s| {
            s["health"]["recovered"]
                .to_string()
                .contains("rewrote missing")
        },
    );
    let s = server.wait_settled(Duration::from_secs(60));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "{s}"
    );
    server.stop();
    assert_eq!(
        std::fs::read(&victim).ok(),
        Some(original),
        "the file is back, byte for byte what was committed"
    );
    let events = assert_exactly(&acked, &site.data, "after the rewrite");
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn a_deleted_master_file_the_log_no_longer_holds_asks_for_a_backup() {
    // Small segments: retention removes what the published run covers.
    let (site, _) = archived(&CONFIG.replace(
        "partitions = 1\n",
        "partitions = 1\nsegment_bytes = \"4KiB\"\n",
    ));

    let files = parquet_files(&site.data.join("master"));
    let victim = files[0].clone();
    std::fs::remove_file(&victim).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();

    let server = site.serve(&[]);
    send(&server.url, 2000, 2100);
    let s = wait_status(
        &server,
        Duration::from_secs(60),
        "a problem naming the file and a backup",
        |s| {
            let p = s["health"]["problems"].to_string();
            p.contains(&name) && p.contains("backup")
        },
    );
    let problems = s["health"]["problems"].to_string();
    assert!(
        problems.contains("backup")
            && problems.contains("partition 0")
            && problems.contains("offsets 0.."),
        "the problem says to restore the file (partition, offsets) from a backup: {problems}"
    );
    server.stop();
}

#[test]
fn a_table_compacted_and_vacuumed_by_another_engine_keeps_incremental_runs_and_rebuilds() {
    let (site, mut acked) = archived(CONFIG);

    let master = site.data.join("master");
    let before = parquet_files(&master).len();
    let after = other_engine(master.to_str().unwrap(), &["compact"]);
    assert!(
        after < before,
        "the compaction merged files: {before} → {after}"
    );
    assert!(
        parquet_files(&master).len() == after,
        "the vacuum removed the old files"
    );

    // `rebuild VIEW` on the published version, whose files are gone.
    let out = Command::new(common::BIN)
        .args(["rebuild", "sales_by_product", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebuild VIEW works after a compaction and vacuum: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let server = site.serve(&[]);
    acked.extend(send(&server.url, 2000, 2100));
    let s = server.wait_settled(Duration::from_secs(60));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "{s}"
    );
    assert!(
        !s["health"]["warnings"]
            .to_string()
            .contains("master-foreign"),
        "a compaction is not foreign: {s}"
    );
    let m = current(&site.data);
    for v in ["sales_by_product", "sales_by_zipcode"] {
        assert_eq!(
            kind_of(&m, v),
            "incremental",
            "a compaction keeps incremental runs ({v}): {m}"
        );
    }
    let (orders, covered) = orders_and_covered(&get_json(&format!(
        "{}/v1/views/sales_by_product",
        server.url
    )));
    assert_eq!((orders, covered), (2100, 2100));
    server.stop();
    let events = assert_exactly(&acked, &site.data, "after the compaction");
    assert_views_equal_sql(&site.data, &events);
}

/// A health entry naming a commit of lost ranges from the log.
fn recommitted(s: &Value) -> bool {
    s["health"]["recovered"]
        .to_string()
        .contains("committed partition")
}

/// Another engine appends copies of lambdaflow's rows, then compacts and
/// vacuums: the merged file holds events twice, so it is foreign, and no
/// file holds lambdaflow's events any more. They are committed again from
/// the log (before, every run failed "no file … holds partition 0's
/// offsets" for good), and the views stay exact.
#[test]
fn a_compaction_that_mixes_foreign_copies_with_lambdaflows_rows_is_repaired_from_the_log() {
    let (site, _) = archived(CONFIG);
    let master = site.data.join("master");
    other_engine(master.to_str().unwrap(), &["append-copy", "0", "100"]);
    assert_eq!(
        other_engine(master.to_str().unwrap(), &["compact"]),
        1,
        "one file holds everything now"
    );

    let server = site.serve(&[]);
    send(&server.url, 2000, 2100);
    wait_status(
        &server,
        Duration::from_secs(60),
        "the lost events committed again from the log",
        recommitted,
    );
    let s = server.wait_settled(Duration::from_secs(60));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "no run fails: {s}"
    );
    assert!(
        s["health"]["warnings"]
            .to_string()
            .contains("master-foreign"),
        "the merged file is reported as foreign: {s}"
    );
    let (orders, covered) = orders_and_covered(&get_json(&format!(
        "{}/v1/views/sales_by_product",
        server.url
    )));
    assert_eq!(
        (orders, covered),
        (2100, 2100),
        "each acknowledged event counted once, not the foreign copies"
    );
    server.stop();
}

/// The same mixed compaction once retention removed the events from the
/// log: lambdaflow cannot read its events out of the foreign file, nor from
/// the log; the problem says so and what to do (before, it read "master
/// dataset file the table is without a file for them", found by a red team).
#[test]
fn a_mixed_compaction_the_log_no_longer_holds_says_what_to_do() {
    // Small segments: retention removes what the published run covers.
    let (site, _) = archived(&CONFIG.replace(
        "partitions = 1\n",
        "partitions = 1\nsegment_bytes = \"4KiB\"\n",
    ));
    let master = site.data.join("master");
    other_engine(master.to_str().unwrap(), &["append-copy", "0", "100"]);
    other_engine(master.to_str().unwrap(), &["compact"]);

    let server = site.serve(&[]);
    send(&server.url, 2000, 2100);
    let s = wait_status(
        &server,
        Duration::from_secs(60),
        "a problem naming the offsets lost for good",
        |s| {
            s["health"]["problems"]
                .to_string()
                .contains("the log no longer holds them")
        },
    );
    let problems = s["health"]["problems"].to_string();
    assert!(
        problems.contains("partition 0's offsets 0..")
            && problems.contains("backup")
            && problems.contains("master-foreign"),
        "the problem names the offsets, a backup and the foreign file: {problems}"
    );
    server.stop();
}

/// A compaction's file (another engine's name, lambdaflow's rows) deleted by
/// hand: its events are committed again from the log and the file is removed
/// from the table, so every engine can read it again (before, the hint said
/// to restore it from a backup though the log held its events).
#[test]
fn a_compacted_file_deleted_by_hand_is_committed_again_from_the_log() {
    let (site, mut acked) = archived(CONFIG);
    let master = site.data.join("master");
    other_engine(master.to_str().unwrap(), &["compact"]);
    // lambdaflow reads the compaction once (and keeps what each file holds).
    let server = site.serve(&[]);
    acked.extend(send(&server.url, 2000, 2100));
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    let merged: Vec<PathBuf> = parquet_files(&master)
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("part-p")
        })
        .collect();
    assert_eq!(merged.len(), 1, "the compaction's file: {merged:?}");
    std::fs::remove_file(&merged[0]).unwrap();

    let server = site.serve(&[]);
    acked.extend(send(&server.url, 2100, 2200));
    wait_status(
        &server,
        Duration::from_secs(60),
        "the deleted file's events committed again from the log",
        recommitted,
    );
    let s = server.wait_settled(Duration::from_secs(60));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "no run fails: {s}"
    );
    server.stop();
    // The table names no missing file: another engine reads all of it.
    assert_eq!(
        other_engine(master.to_str().unwrap(), &["count"]),
        2200,
        "another engine reads every event once"
    );
    let events = assert_exactly(&acked, &site.data, "after the restore");
    assert_views_equal_sql(&site.data, &events);
}

/// A new driver on an S3 root (a restart, or a failover) does not read the
/// master dataset's files again before its first publish — only what
/// changed — and damage done to a file after it was verified is still found
/// and rewritten from the log.
#[test]
fn the_first_run_after_a_restart_reads_no_verified_file_and_damage_is_still_found() {
    use crate::common::s3_proxy::S3Proxy;
    use crate::s3::Moto;
    let moto = Moto::start();
    let root = moto.bucket("verified");
    let proxy = S3Proxy::start(&moto.endpoint);
    let direct = moto.storage(&root);
    let site = Site::remote(&root, moto.storage(&root), proxy.env(moto.env()), CONFIG);
    let server = site.serve(&[]);
    let mut acked = send(&server.url, 0, 3000);
    server.wait_settled(Duration::from_secs(90));
    server.stop();

    let rt = common::rt();
    let mut old: Vec<String> = rt
        .block_on(direct.list_files("master"))
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    old.sort();
    assert!(old.len() >= 5, "{old:?}");
    let before = proxy.passed_matching("GET", "/master/part-").len();

    let t = Instant::now();
    let server = site.serve(&[]);
    acked.extend(send(&server.url, 3000, 3100));
    server.wait_settled(Duration::from_secs(90));
    let first_publish = t.elapsed();
    let read: std::collections::BTreeSet<String> = proxy.passed_matching("GET", "/master/part-")
        [before..]
        .iter()
        .filter_map(|t| old.iter().find(|n| t.contains(n.as_str())).cloned())
        .collect();
    eprintln!(
        "first publish after the restart: {first_publish:?}; old files read: {} of {}",
        read.len(),
        old.len()
    );
    assert!(
        read.len() <= 1,
        "the new driver reads none of the {} verified files before it publishes (one at most, re-read in turn): {read:?}",
        old.len()
    );

    // A byte flipped in a verified file: found by the re-reading in turn.
    let victim = format!("master/{}", old[2]);
    let mut bytes = rt.block_on(direct.get(&victim)).unwrap().unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    rt.block_on(direct.put(&victim, bytes.into())).unwrap();
    wait_status(
        &server,
        Duration::from_secs(90),
        "the damage is found and repaired",
        |s| {
            s["health"]["recovered"]
                .to_string()
                .contains("rewrote corrupt")
        },
    );
    server.stop();
    let fixed = rt.block_on(direct.get(&victim)).unwrap().unwrap();
    let name = old[2].clone();
    let crc = name.split('-').nth(4).unwrap();
    assert_eq!(
        format!("{:08x}", crc32c::crc32c(&fixed)),
        crc,
        "the file is rewritten as committed"
    );
    let rows = common::master_events_in(&direct, 1).0;
    assert_eq!(
        rows, acked,
        "every acknowledged event is in the master dataset once"
    );
}

/// Measures a new driver's first publish over a large table on moto
/// (`LAMBDAFLOW_MEASURE_MB`, default 200): ingest events of ~3 KB of
/// incompressible text until the table holds that much, stop, start again,
/// send a few events, and time their publish — with the verified files
/// recorded (now), and with the record removed (what every first run did
/// before: read every file). `cargo test --test integration -- --ignored measure_first_publish --nocapture`.
#[test]
#[ignore]
fn measure_first_publish_after_a_restart_over_a_large_table() {
    use crate::common::s3_proxy::S3Proxy;
    use crate::s3::Moto;
    let mb: u64 = std::env::var("LAMBDAFLOW_MEASURE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let moto = Moto::start();
    let root = moto.bucket("large");
    let proxy = S3Proxy::start(&moto.endpoint);
    let direct = moto.storage(&root);
    let config = "[stream]\npartitions = 2\n[archive]\nchunk_events = 20000\nchunk_age = \"2s\"\n[batch]\npause = \"1s\"\n";
    let site = Site::remote(&root, moto.storage(&root), proxy.env(moto.env()), config);
    let rt = common::rt();
    let table_bytes = || -> u64 {
        rt.block_on(async {
            use futures::TryStreamExt;
            let prefix = direct.path("master");
            let l: Vec<object_store::ObjectMeta> = direct
                .store()
                .list(Some(&prefix))
                .try_collect()
                .await
                .unwrap();
            l.iter()
                .filter(|o| o.location.as_ref().ends_with(".parquet"))
                .map(|o| o.size)
                .sum()
        })
    };
    let server = site.serve(&[]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let alphabet: Vec<char> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(['_', '.'])
        .collect();
    let t = Instant::now();
    let mut sent = 0i64;
    let mut last_check = Instant::now();
    loop {
        let mut body = String::new();
        for _ in 0..200 {
            let name: String = (0..3000)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    alphabet[(seed >> 58) as usize]
                })
                .collect();
            body.push_str(&common::event(
                10_000 + sent,
                &name,
                1,
                "2026-12-06 10:00:00.000",
            ));
            body.push('\n');
            sent += 1;
        }
        let (status, reply) = common::post_events(&server.url, body.into_bytes()).unwrap();
        assert!(status == 200 || status == 503, "{status} {reply}");
        if last_check.elapsed() > Duration::from_secs(10) {
            last_check = Instant::now();
            let b = table_bytes();
            eprintln!(
                "{:?}: {sent} events sent, table {} MB",
                t.elapsed(),
                b >> 20
            );
            if b >= mb << 20 {
                break;
            }
        }
    }
    server.wait_settled(Duration::from_secs(600));
    server.stop();
    let size = table_bytes();
    let files = rt.block_on(direct.list_files("master")).unwrap().len();
    eprintln!(
        "table: {} MB in {files} files, filled in {:?}",
        size >> 20,
        t.elapsed()
    );

    let first_publish = |label: &str| {
        let gets = proxy.passed_matching("GET", "/master/part-").len();
        let t = Instant::now();
        let server = site.serve(&[]);
        let up = t.elapsed();
        send(&server.url, 1_000_000, 1_000_100);
        server.wait_settled(Duration::from_secs(900));
        let took = t.elapsed();
        let read = proxy.passed_matching("GET", "/master/part-").len() - gets;
        eprintln!(
            "MEASURE {label}: table {} MB in {files} files: serving after {up:?}, first publish after {took:?}, {read} GETs of master files",
            size >> 20
        );
        server.stop();
    };
    first_publish("verified files recorded (this change)");
    rt.block_on(direct.delete("master_index/verified.json"))
        .unwrap();
    first_publish("no record: every file read (as before)");
}
