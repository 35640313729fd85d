//! Faults below the process, against a real `serve`: a full disk (a small
//! tmpfs the test mounts; the tests run as root), a byte flipped in the
//! middle of a log segment, a byte flipped in a master-dataset file.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::exact::{assert_exactly, assert_views_equal_sql, body_of, send};
use common::{Site, get_json, post_events};

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
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
fn fill(path: &Path) -> u64 {
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
