//! Faults below the process, against a real `serve`: a full disk (a small
//! tmpfs the test mounts; the tests run as root), a byte flipped in the
//! middle of a log segment, a byte flipped in a master-dataset file.

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::exact::{assert_exactly, assert_views_equal_sql, body_of, record_ack, send};
use crate::common::{Site, get_json, post_events};

/// A size-limited tmpfs, unmounted on drop.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub(crate) fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "the full-disk test mounts a {size} tmpfs on {} and needs root for it: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the filesystem refuses another byte.
pub(crate) fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for size in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
        let buf = vec![0xa5u8; size];
        while f.write_all(&buf).is_ok() {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    written
}

fn problems(status: &serde_json::Value) -> String {
    status["health"]["problems"].to_string()
}

#[test]
fn a_full_disk_answers_507_keeps_reads_and_resumes_without_a_restart() {
    let site = Site::new(
        "[archive]\nchunk_events = 500\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n",
    );
    let _fs = Tmpfs::mount(&site.data, "24m");
    let server = site.serve(&[]);
    let mut acked = send(&server.url, 0, 3000);
    assert_eq!(acked.len(), 3000);
    server.wait_settled(Duration::from_secs(60));
    let before = get_json(&format!("{}/v1/views/sales_by_product", server.url));

    let filler = site.data.join("filler");
    let filled = fill(&filler);
    eprintln!("filled the disk with {} MiB", filled >> 20);

    // Ingest: 507 with a message that says what is wrong, and Retry-After.
    let (status, reply) = post_events(&server.url, body_of(3000, 3100).into_bytes()).unwrap();
    assert_eq!(status, 507, "a full disk answers 507: {reply}");
    let msg = reply["error"].as_str().unwrap();
    assert!(
        msg.contains("full"),
        "the error says the disk is full: {msg}"
    );
    let retry = common::rt().block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/events", server.url))
            .body(body_of(3000, 3100))
            .send()
            .await
            .unwrap()
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string())
    });
    assert!(retry.is_some(), "507 carries Retry-After");
    // A bad line cannot be dead-lettered either: the whole request is refused, not half-kept.
    let (status, _) = post_events(&server.url, b"not json\n".to_vec()).unwrap();
    assert_eq!(
        status, 507,
        "a line that cannot be kept in the dead-letter store is not silently dropped"
    );

    // Reads keep working, with the same answers.
    let during = get_json(&format!("{}/v1/views/sales_by_product", server.url));
    assert_eq!(
        during["rows"], before["rows"],
        "reads are unaffected by a full disk"
    );
    let s = server.status();
    assert!(s["partitions"].is_array());

    // Space comes back: ingest resumes in the same process.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    let more = loop {
        let (status, reply) = post_events(&server.url, body_of(3000, 3100).into_bytes()).unwrap();
        if status == 200 {
            break reply;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "ingest must resume once space is back, still {status}: {reply}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = &more["offsets"][0];
    let (p, first) = (
        r["partition"].as_u64().unwrap() as u32,
        r["first"].as_u64().unwrap(),
    );
    for k in 0..100u64 {
        acked.insert((p, first + k), 13_000 + k as i64);
    }
    acked.extend(send(&server.url, 3100, 4000));
    let s = server.wait_settled(Duration::from_secs(120));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "every layer recovered by itself: {}",
        problems(&s)
    );
    server.stop();
    // Nothing acknowledged before, during or after was damaged or doubled.
    let events = assert_exactly(&acked, &site.data, "after a full disk");
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn a_corrupt_log_frame_mid_segment_is_reported_with_its_offsets_and_never_skipped() {
    // Nothing is archived or batched: a restart must replay the whole log.
    let site = Site::new(
        "[archive]\nchunk_events = 1_000_000\nchunk_age = \"1h\"\n[batch]\npause = \"1h\"\n",
    );
    let server = site.serve(&[]);
    let acked = send(&server.url, 0, 4000);
    assert_eq!(acked.len(), 4000);
    server.stop();

    let seg = site.data.join("log/p0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();

    let log = site.dir.path().join("serve.log");
    let server = site.serve_logging(&[], Some(&log));
    let s = server.status();
    let parts = s["partitions"].as_array().unwrap();
    let (p0, p1) = (&parts[0], &parts[1]);
    assert_eq!(
        p0["end"], 2000,
        "the log keeps every acknowledged offset: {s}"
    );
    assert_eq!(p1["realtime"], p1["end"], "partition 1 is unaffected: {s}");
    let problems = s["health"]["problems"].as_array().unwrap();
    let p = problems
        .iter()
        .find(|p| p["component"] == "speed/p0")
        .unwrap_or_else(|| panic!("status reports the corrupt frame: {s}"));
    let err = p["error"].as_str().unwrap();
    let range = err
        .split("offsets ")
        .nth(1)
        .and_then(|r| r.split(" cannot").next())
        .unwrap_or_else(|| panic!("the error names the offsets: {err}"));
    let (a, b) = range.split_once("..").unwrap();
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    assert_eq!(
        b - a,
        100,
        "one request's frame (100 events) is unreadable: {err}"
    );
    assert_eq!(
        p0["realtime"].as_u64().unwrap(),
        a,
        "partition 0 is served exactly up to the damage, and not beyond: {s}"
    );
    // Answers cover exactly what their offsets say: nothing skipped, nothing invented.
    let v = get_json(&format!("{}/v1/views/sales_by_product", server.url));
    let (orders, covered) = common::orders_and_covered(&v);
    assert_eq!(orders, covered, "{v}");
    assert_eq!(orders, a + 2000, "{v}");
    // The CLI and the log say it too.
    let out = Command::new(common::BIN)
        .args(["status", "--url", &server.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PROBLEM speed/p0") && text.contains(&format!("offsets {a}..{b}")),
        "{text}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("corrupt log frame"), "{logged}");
    server.stop();
}

#[test]
fn a_corrupt_master_file_is_detected_and_rewritten_from_the_log() {
    let site = Site::new(
        "[stream]\npartitions = 1\n[archive]\nchunk_events = 500\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n",
    );
    let server = site.serve(&[]);
    let mut acked = send(&server.url, 0, 2000);
    server.wait_settled(Duration::from_secs(60));
    server.stop();

    let mut files: Vec<PathBuf> = std::fs::read_dir(site.data.join("master"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let victim = files[1].clone();
    let original = std::fs::read(&victim).unwrap();
    let mut bytes = original.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();

    // The next batch run reads it, finds the checksum wrong, and rewrites it
    // from the log (which still holds those offsets).
    let server = site.serve(&[]);
    let more: BTreeMap<(u32, u64), i64> = send(&server.url, 2000, 2100);
    acked.extend(more);
    let t = Instant::now();
    loop {
        let s = server.status();
        if s["health"]["recovered"].to_string().contains("rewrote") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no repair reported: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = server.wait_settled(Duration::from_secs(60));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "{s}"
    );
    server.stop();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        original,
        "the file is byte for byte what was committed"
    );
    let events = assert_exactly(&acked, &site.data, "after the repair");
    assert_views_equal_sql(&site.data, &events);
}

/// Wakes the server's batch loop (`POST /v1/batch/run`).
fn run_batch(url: &str) {
    common::rt().block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/v1/batch/run"))
            .send()
            .await
            .unwrap()
    });
}

/// Recoveries listed under `health.recovered` whose component starts with `prefix`.
fn recovered(status: &serde_json::Value, prefix: &str) -> Vec<String> {
    status["health"]["recovered"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["component"].as_str().unwrap().starts_with(prefix))
        .map(|r| r["what"].as_str().unwrap().to_string())
        .collect()
}

/// Archives and publishes 2,000 events, stops, lets `damage` do its worst to
/// the data directory, restarts, ingests 1,000 more and checks that every
/// event of both generations is in the master dataset exactly once and in
/// the views. Returns the status after the restart.
fn survives(site: &Site, damage: impl FnOnce(&Path)) -> serde_json::Value {
    let server = site.serve(&[]);
    let mut acked = send(&server.url, 0, 2000);
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    damage(&site.data);
    let server = site.serve(&[]);
    let after = server.status();
    acked.extend(send(&server.url, 2000, 3000));
    let s = server.wait_settled(Duration::from_secs(60));
    assert!(
        s["health"]["problems"].as_array().unwrap().is_empty(),
        "{}",
        problems(&s)
    );
    server.stop();
    let events = assert_exactly(&acked, &site.data, "events of both generations");
    assert_views_equal_sql(&site.data, &events);
    after
}

const ARCHIVE_FAST: &str =
    "[archive]\nchunk_events = 500\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n";

#[test]
fn a_lost_log_restarts_at_the_archived_coverage_and_reuses_no_offset() {
    let site = Site::new(ARCHIVE_FAST);
    let s = survives(&site, |data| {
        std::fs::remove_dir_all(data.join("log")).unwrap();
    });
    let r = recovered(&s, "log/");
    assert_eq!(r.len(), 2, "each partition's restart is reported: {s}");
    assert!(
        r[0].contains("restarts at offset 1000"),
        "the report names where the log restarts: {r:?}"
    );
}

#[test]
fn a_damaged_last_frame_below_the_archived_coverage_is_reported_as_damage() {
    let site = Site::new(ARCHIVE_FAST);
    let s = survives(&site, |data| {
        let seg = data.join("log/p0/00000000000000000000.log");
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 20] ^= 0x10; // inside the last frame's Arrow payload
        std::fs::write(&seg, &bytes).unwrap();
    });
    let r = recovered(&s, "log/p0");
    assert_eq!(r.len(), 1, "{s}");
    assert!(
        r[0].contains("damaged") && r[0].contains("restarts at offset 1000"),
        "a cut below what is archived is damage, not a torn write: {r:?}"
    );
}

#[test]
fn a_missing_current_behind_retention_is_rebuilt_before_the_speed_layer_starts() {
    // Small segments, so retention deletes some below the published H.
    let site = Site::new(&format!(
        "[stream]\nsegment_bytes = \"8KiB\"\n{ARCHIVE_FAST}"
    ));
    let s = survives(&site, |data| {
        let starts: Vec<u64> = (0..2)
            .map(|p| {
                std::fs::read_dir(data.join(format!("log/p{p}")))
                    .unwrap()
                    .filter_map(|e| {
                        let n = e.unwrap().file_name().into_string().unwrap();
                        n.strip_suffix(".log")?.parse().ok()
                    })
                    .min()
                    .unwrap()
            })
            .collect();
        assert!(
            starts.iter().all(|&s| s > 0),
            "retention deleted segments below H: log starts {starts:?}"
        );
        std::fs::remove_dir_all(data.join("views")).unwrap();
    });
    let r = recovered(&s, "batch");
    assert!(
        r.iter().any(|w| w.contains("below the log's start")),
        "the rebuild is reported: {s}"
    );
}

#[test]
fn commands_refuse_a_data_directory_of_another_partition_count() {
    let site = Site::new(ARCHIVE_FAST);
    let server = site.serve(&[]);
    send(&server.url, 0, 1000);
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    let config = std::fs::read_to_string(&site.config).unwrap();
    let other = site.dir.path().join("three.toml");
    std::fs::write(&other, format!("{config}\n[stream]\npartitions = 3\n")).unwrap();
    let before = std::fs::read(site.data.join("views/CURRENT")).unwrap();
    let out = Command::new(common::BIN)
        .args(["rebuild", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has 2 partitions") && err.contains("asks for 3"),
        "rebuild with 3 partitions over a 2-partition directory is refused: {err}"
    );
    assert_eq!(
        std::fs::read(site.data.join("views/CURRENT")).unwrap(),
        before,
        "and publishes nothing"
    );
    // The server starts as before.
    let server = site.serve(&[]);
    server.wait_settled(Duration::from_secs(60));
    server.stop();
}

#[test]
fn nothing_leaves_the_log_before_the_files_of_the_run_that_covers_it_are_synced() {
    let site = Site::new(&format!(
        "[stream]\nsegment_bytes = \"8KiB\"\n{ARCHIVE_FAST}"
    ));
    let trace = site.dir.path().join("durability.trace");
    let server = site.serve(&[("LAMBDAFLOW_TRACE_DURABILITY", trace.to_str().unwrap())]);
    send(&server.url, 0, 3000);
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    let data = std::fs::canonicalize(&site.data).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let unlinks = lines.iter().filter(|l| l.starts_with("unlink ")).count();
    assert!(unlinks > 0, "retention deleted segments: {lines:?}");
    let views: Vec<String> = lambdaflow::config::Config::default()
        .views
        .iter()
        .map(|v| v.name.clone())
        .collect();
    let masters: Vec<(String, u32, u64)> = std::fs::read_dir(data.join("master"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            let rest = n.strip_prefix("part-p")?;
            let mut it = rest.split('-');
            let p = it.next()?.parse().ok()?;
            let _start: u64 = it.next()?.parse().ok()?;
            let end = it.next()?.parse().ok()?;
            Some((n, p, end))
        })
        .collect();
    let synced_before = |i: usize, path: &Path| {
        let want = format!("sync {}", path.display());
        lines[..i].contains(&want)
    };
    let mut checked = 0;
    let mut allowed: Option<usize> = None;
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("retention ") {
            allowed = Some(i);
            // "retention run=N version=V h=a,b"
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap()
                    .to_string()
            };
            let run: u64 = field("run=").parse().unwrap();
            let version: u64 = field("version=").parse().unwrap();
            let h: Vec<u64> = field("h=").split(',').map(|x| x.parse().unwrap()).collect();
            let mut need = vec![
                data.join(format!("views/runs/{run:012}.json")),
                data.join("views/runs"),
                data.join("views/CURRENT"),
                data.join("views"),
                data.join(format!("master/_delta_log/{version:020}.json")),
                data.join("master/_delta_log"),
                data.join("master"),
            ];
            for v in &views {
                // A run's directory is `<run>-<writer id>`.
                let prefix = format!("{run:012}");
                // (found in the trace: it may be gone by now, as an old run).
                let want = format!(
                    "sync {}/",
                    data.join(format!("views/{v}/{prefix}")).display()
                );
                let dir = lines[..i]
                    .iter()
                    .find_map(|l| {
                        let rest = l.strip_prefix(&want[..want.len() - 1])?;
                        let name = rest.split('/').next()?;
                        Some(data.join(format!("views/{v}/{prefix}{name}")))
                    })
                    .unwrap_or_else(|| panic!("no file of view {v}'s run {run} was synced"));
                need.push(dir.join("states.parquet"));
                need.push(dir.join("rows.tsv"));
                need.push(dir.clone());
                need.push(data.join(format!("views/{v}")));
            }
            for (name, p, end) in &masters {
                if *end <= h[*p as usize] {
                    need.push(data.join("master").join(name));
                }
            }
            for path in need {
                assert!(
                    synced_before(i, &path),
                    "retention after run {run} started before {} was fsynced",
                    path.display()
                );
            }
            checked += 1;
        } else if l.starts_with("unlink ") {
            assert!(
                allowed.is_some(),
                "a log segment was deleted with no published run covering it: {l}"
            );
        }
    }
    assert!(checked > 0, "at least one retention was checked");
}

const INVERSE_VIEW: &str = "[[views]]\nname = \"inverse\"\nsql = \"SELECT ProductName, sum(100 / price) AS s, count(*) AS n FROM events GROUP BY ProductName\"\n";

/// `inverse` over events `0..n` of `body_of`, leaving out the `price = 0` rows.
fn inverse_expected(n: i64) -> BTreeMap<String, (i64, i64)> {
    let mut want = BTreeMap::new();
    for k in 0..n {
        let price = k % 100;
        if price == 0 {
            continue;
        }
        let e = want.entry(format!("product{}", k % 7)).or_insert((0, 0));
        e.0 += 100 / price;
        e.1 += 1;
    }
    want
}

fn inverse_answer(url: &str) -> BTreeMap<String, (i64, i64)> {
    let v = get_json(&format!("{url}/v1/views/inverse"));
    v["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("the view answers: {v}"))
        .iter()
        .map(|r| {
            (
                r["ProductName"].as_str().unwrap().to_string(),
                (r["s"].as_i64().unwrap(), r["n"].as_i64().unwrap()),
            )
        })
        .collect()
}

fn default_views_and(extra: &str) -> String {
    let mut views = String::new();
    for v in lambdaflow::config::Config::default().views {
        views.push_str(&format!(
            "[[views]]\nname = {:?}\nsql = {:?}\n",
            v.name, v.sql
        ));
    }
    format!("{views}{extra}")
}

#[test]
fn a_view_that_fails_on_some_events_leaves_them_out_and_nothing_stops() {
    let site = Site::new(&format!(
        "{ARCHIVE_FAST}{}",
        default_views_and(INVERSE_VIEW)
    ));
    let server = site.serve(&[]);
    // Events 0, 100, 200, … have price 0: `100 / price` fails on them.
    let acked = send(&server.url, 0, 2000);
    let s = server.wait_settled(Duration::from_secs(60));
    assert_eq!(
        inverse_answer(&server.url),
        inverse_expected(2000),
        "the view answers over the events it accepts"
    );
    let x = &s["views_excluded"]["inverse"];
    assert_eq!(x["events"], 20, "20 events with price 0 are left out: {s}");
    let last = &x["last"];
    assert!(
        last["error"].as_str().unwrap().contains("Divide by zero"),
        "the error is named: {x}"
    );
    let (p, o) = (
        last["partition"].as_u64().unwrap() as u32,
        last["offset"].as_u64().unwrap(),
    );
    assert_eq!(
        acked[&(p, o)] % 100,
        10_000 % 100,
        "the reported offset holds an event with price 0: {x}"
    );
    let listed =
        std::fs::read_to_string(site.data.join("deadletter/views/inverse.ndjson")).unwrap();
    assert_eq!(
        listed.lines().count(),
        20,
        "each failing event listed once: {listed}"
    );
    assert!(
        s["health"]["problems"].to_string().contains("view/inverse"),
        "health says so: {s}"
    );
    server.stop();
    // The other views are exact, the master dataset holds every event.
    let events = assert_exactly(&acked, &site.data, "with a failing view");
    let _ = events;
}

#[test]
fn a_view_added_over_failing_history_starts_and_serves() {
    let site = Site::new(ARCHIVE_FAST);
    let server = site.serve(&[]);
    let mut acked = send(&server.url, 0, 2000);
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    // The failing events are in the master dataset when the view arrives.
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!("{config}{}", default_views_and(INVERSE_VIEW)),
    )
    .unwrap();
    let server = site.serve(&[]);
    acked.extend(send(&server.url, 2000, 3000));
    let s = server.wait_settled(Duration::from_secs(60));
    assert_eq!(inverse_answer(&server.url), inverse_expected(3000));
    assert_eq!(
        s["views_excluded"]["inverse"]["events"], 30,
        "the batch layer's 20 and the speed layer's 10, each once: {s}"
    );
    server.stop();
    let events = assert_exactly(&acked, &site.data, "view added over failing history");
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn a_batch_layer_that_does_not_publish_slows_ingest_down_instead_of_filling_memory() {
    // The batch loop runs once at startup, then not for an hour: the realtime
    // window only grows, until its bound.
    let site = Site::new(
        "[ingest]\nmax_unpublished = 1500\n[archive]\nchunk_events = 500\nchunk_age = \"100ms\"\n[batch]\npause = \"1h\"\n",
    );
    let server = site.serve(&[]);
    let mut acked = BTreeMap::new();
    let mut refused = None;
    for i in 0..40 {
        let from = i * 100;
        let (status, reply) =
            post_events(&server.url, body_of(from, from + 100).into_bytes()).unwrap();
        if status == 503 {
            refused = Some((from, reply));
            break;
        }
        assert_eq!(status, 200, "{reply}");
        record_ack(&mut acked, &reply, from, 100);
        // Let the speed layer measure the window.
        std::thread::sleep(Duration::from_millis(100));
    }
    let (from, reply) = refused.expect("ingest is refused once 1,500 events wait for a batch run");
    assert!(
        (1500..=2000).contains(&(acked.len() as i64)),
        "refused at the bound, not long after: {} accepted",
        acked.len()
    );
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("realtime window is full"),
        "the refusal says why: {reply}"
    );
    let s = server.status();
    assert!(
        problems(&s).contains("backlog"),
        "health names the backlog: {s}"
    );
    // Reads go on meanwhile.
    let v = get_json(&format!("{}/v1/views/sales_by_product", server.url));
    let (orders, covered) = common::orders_and_covered(&v);
    assert_eq!(orders, covered, "{v}");
    // A batch run publishes; ingest resumes by itself.
    run_batch(&server.url);
    let t = Instant::now();
    loop {
        let (status, reply) =
            post_events(&server.url, body_of(from, from + 100).into_bytes()).unwrap();
        if status == 200 {
            record_ack(&mut acked, &reply, from, 100);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "ingest must resume: {reply}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = server.status();
    assert!(!problems(&s).contains("backlog"), "{s}");
    // Archive and publish the rest, then check nothing was lost.
    let t = Instant::now();
    loop {
        run_batch(&server.url);
        let s = server.status();
        let parts = s["partitions"].as_array().unwrap();
        if parts.iter().all(|p| p["published"] == p["end"]) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "not settled: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    server.stop();
    let events = assert_exactly(&acked, &site.data, "after backpressure");
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn first_and_last_value_answer_the_same_before_and_after_a_batch_run() {
    let view = "[[views]]\nname = \"first_last\"\nsql = \"SELECT ProductName, first_value(zipcode ORDER BY timestamp) AS f, last_value(zipcode ORDER BY timestamp) AS l FROM events GROUP BY ProductName\"\n";
    let site = Site::new(&format!(
        "[archive]\nchunk_events = 300\nchunk_age = \"100ms\"\n[batch]\npause = \"1h\"\n{view}"
    ));
    let server = site.serve(&[]);
    // Every event at one millisecond: the tie is broken by (partition, offset).
    let mut acked: BTreeMap<(u32, u64), (i64, String)> = BTreeMap::new();
    for r in 0..10 {
        let body: String = (0..100)
            .map(|i| {
                let k = r * 100 + i;
                common::event(
                    10_000 + k,
                    &format!("product{}", k % 3),
                    5,
                    "2014-11-01 00:00:00.000",
                ) + "\n"
            })
            .collect();
        let (status, reply) = post_events(&server.url, body.into_bytes()).unwrap();
        assert_eq!(status, 200, "{reply}");
        let o = &reply["offsets"][0];
        let (p, first) = (
            o["partition"].as_u64().unwrap() as u32,
            o["first"].as_u64().unwrap(),
        );
        for i in 0..100 {
            let k = r * 100 + i;
            acked.insert(
                (p, first + i as u64),
                (10_000 + k, format!("product{}", k % 3)),
            );
        }
    }
    let answer = || {
        let v = get_json(&format!("{}/v1/views/first_last", server.url));
        let rows: BTreeMap<String, (i64, i64)> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["ProductName"].as_str().unwrap().to_string(),
                    (r["f"].as_i64().unwrap(), r["l"].as_i64().unwrap()),
                )
            })
            .collect();
        (rows, v["freshness"]["batch"].clone())
    };
    let t = Instant::now();
    while server.status()["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["realtime"] != p["end"])
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (before, _) = answer();
    run_batch(&server.url);
    let after = loop {
        let s = server.status();
        if s["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["published"] == p["end"])
        {
            break answer().0;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{s}");
        std::thread::sleep(Duration::from_millis(100));
        run_batch(&server.url);
    };
    assert_eq!(
        before, after,
        "the answer must not change when the batch run is installed"
    );
    let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (z, product) in acked.values() {
        // In (partition, offset) order: the first seen is first, the last seen last.
        want.entry(product.clone())
            .and_modify(|e| e.1 = *z)
            .or_insert((*z, *z));
    }
    assert_eq!(
        after, want,
        "ties go to the lowest (partition, offset) first"
    );
    server.stop();
}
