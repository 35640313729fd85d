//! Views changed while serving, under load: while producers ingest and
//! readers query, a view is added, another's SQL changed, a third dropped.
//! Every answer counts exactly the events it says it covers, for the
//! version of the view it names (its fingerprint); no reader gets an error
//! or an empty answer because of the change; a crash during the build
//! (before the publish, or between the publish and the swap) resumes it at
//! the restart.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::exact::send;
use crate::common::{self, Site, orders_and_covered};

const CONFIG: &str =
    "[archive]\nchunk_events = 700\nchunk_age = \"100ms\"\n[batch]\npause = \"300ms\"\n";

const CHANGED: &str = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue, max(price) AS top FROM events GROUP BY ProductName";
pub(crate) const ADDED: &str =
    "SELECT price / 10 AS band, count(*) AS orders FROM events GROUP BY price / 10";

pub(crate) fn request(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    common::rt().block_on(async {
        let c = reqwest::Client::new();
        let r = match method {
            "POST" => c.post(url).json(&body.unwrap()),
            "DELETE" => c.delete(url),
            _ => c.get(url),
        };
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

/// Waits until every view change `status` lists is published.
pub(crate) fn wait_published(url: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let s = common::get_json(&format!("{url}/v1/status"));
        let changes = s["view_changes"]["changes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !changes.is_empty() && changes.iter().all(|c| c["state"] == "published") {
            return s;
        }
        assert!(
            changes.iter().all(|c| c["state"] != "failed"),
            "a view change failed: {}",
            s["view_changes"]
        );
        assert!(
            t.elapsed() < within,
            "view changes not published within {within:?}: {}",
            s["view_changes"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What readers saw: answers checked, and the fingerprints they named.
#[derive(Default)]
struct Seen {
    answers: u64,
    fingerprints: BTreeSet<(String, String)>,
}

/// Reads `view` until `stop`; every answer must count exactly the events it
/// covers, and name a version the view had. `gone` is set once the view's
/// drop was requested: only then may it answer 404, and then the reader stops.
fn reader(
    url: String,
    view: &'static str,
    stop: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let dropping = gone.load(Ordering::Relaxed);
            let (status, a) = request("GET", &format!("{url}/v1/views/{view}?limit=100000"), None);
            if status == 404 && dropping {
                return;
            }
            assert_eq!(
                status, 200,
                "`{view}`: no reader gets an error because of a change: {a}"
            );
            let (orders, covered) = orders_and_covered(&a);
            assert_eq!(
                orders, covered,
                "`{view}`: an answer counts exactly the events it covers: {}",
                a["freshness"]
            );
            let fp = a["freshness"]["fingerprint"].as_str().unwrap().to_string();
            assert!(!fp.is_empty(), "every answer names the view's version");
            if view == "sales_by_product" {
                let has_top = a["rows"][0].get("top").is_some();
                let mut s = seen.lock().unwrap();
                s.fingerprints.insert((format!("{view}:{has_top}"), fp));
            } else {
                seen.lock()
                    .unwrap()
                    .fingerprints
                    .insert((view.to_string(), fp));
            }
            seen.lock().unwrap().answers += 1;
        }
    })
}

#[test]
fn views_added_changed_and_dropped_under_load_stay_exact() {
    let site = Site::new(CONFIG);
    // The build waits 1.5 s: readers see the old versions all that while.
    let server = site.serve(&[("LAMBDAFLOW_FAILPOINTS", "views-building=sleep:1500")]);
    let url = server.url.clone();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (url, acked, stop) = (url.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut next = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let got = send(&url, next, next + 200).len() as u64;
                assert_eq!(got, 200, "the producer's events are acknowledged");
                acked.fetch_add(got, Ordering::Relaxed);
                next += 200;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let before = common::get_json(&format!("{url}/v1/views/sales_by_product"));
    let old_fp = before["freshness"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let dropped = Arc::new(AtomicBool::new(false));
    let never = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for view in ["sales_by_product", "sales_by_zipcode", "sales_by_product"] {
        readers.push(reader(
            url.clone(),
            view,
            stop.clone(),
            never.clone(),
            seen.clone(),
        ));
    }
    readers.push(reader(
        url.clone(),
        "sales_per_minute",
        stop.clone(),
        dropped.clone(),
        seen.clone(),
    ));
    std::thread::sleep(Duration::from_millis(300));

    // A bad view is refused as at startup, naming what is wrong.
    let (status, e) = request(
        "POST",
        &format!("{url}/v1/views"),
        Some(
            json!({"name": "bad", "sql": "SELECT nosuch, count(*) AS n FROM events GROUP BY nosuch"}),
        ),
    );
    assert_eq!(status, 400, "{e}");
    assert!(e.to_string().contains("nosuch"), "{e}");

    let (status, changed) = request(
        "POST",
        &format!("{url}/v1/views"),
        Some(json!({"name": "sales_by_product", "sql": CHANGED})),
    );
    assert_eq!(status, 202, "{changed}");
    assert_eq!(changed["change"], "change");
    let new_fp = changed["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(new_fp, old_fp);
    let (status, added) = request(
        "POST",
        &format!("{url}/v1/views"),
        Some(json!({"name": "by_price_band", "sql": ADDED})),
    );
    assert_eq!(
        (status, added["change"].as_str()),
        (202, Some("add")),
        "{added}"
    );
    dropped.store(true, Ordering::Relaxed);
    let (status, d) = request("DELETE", &format!("{url}/v1/views/sales_per_minute"), None);
    assert_eq!((status, d["change"].as_str()), (202, Some("drop")), "{d}");
    // The build is in progress: status says so, and the old version answers.
    let s = common::get_json(&format!("{url}/v1/status"));
    let states: Vec<&str> = s["view_changes"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert!(
        states.iter().all(|s| *s == "waiting" || *s == "building"),
        "{states:?}"
    );

    let s = wait_published(&url, Duration::from_secs(60));
    let build = &s["view_changes"];
    assert!(
        build["build_events_total"].as_u64() > Some(0)
            && build["build_events_done"] == build["build_events_total"],
        "status reports the build's progress: {build}"
    );
    readers.push(reader(
        url.clone(),
        "by_price_band",
        stop.clone(),
        never.clone(),
        seen.clone(),
    ));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(seen.answers > 50, "readers kept reading: {}", seen.answers);
    let fps = &seen.fingerprints;
    assert!(
        fps.contains(&("sales_by_product:false".into(), old_fp.clone())),
        "readers saw the old version while the new one was built: {fps:?}"
    );
    assert!(
        fps.contains(&("sales_by_product:true".into(), new_fp.clone())),
        "and the new one after the swap: {fps:?}"
    );
    assert!(
        !fps.iter()
            .any(|(k, f)| k.starts_with("sales_by_product")
                && (k.ends_with("true") != (*f == new_fp))),
        "every answer has the columns of the version it names: {fps:?}"
    );

    // Settled: every view counts every acknowledged event once.
    let total = acked.load(Ordering::Relaxed);
    server.wait_settled(Duration::from_secs(60));
    for view in ["sales_by_product", "sales_by_zipcode", "by_price_band"] {
        let a = common::get_json(&format!("{url}/v1/views/{view}?limit=100000"));
        assert_eq!(
            orders_and_covered(&a),
            (total, total),
            "`{view}`: {}",
            a["freshness"]
        );
    }
    let (status, _) = request("GET", &format!("{url}/v1/views/sales_per_minute"), None);
    assert_eq!(status, 404, "a dropped view is gone");
    // SQL sees the new views too.
    let (status, a) = request(
        "POST",
        &format!("{url}/v1/sql"),
        Some(json!({"sql": "SELECT sum(orders) AS n, max(top) AS top FROM sales_by_product"})),
    );
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["rows"][0]["n"].as_u64(), Some(total), "{a}");
    server.stop();

    // The changes survive a restart.
    let server = site.serve(&[]);
    let a = common::get_json(&format!(
        "{}/v1/views/by_price_band?limit=100000",
        server.url
    ));
    assert_eq!(orders_and_covered(&a), (total, total), "{}", a["freshness"]);
    let (status, _) = request(
        "GET",
        &format!("{}/v1/views/sales_per_minute", server.url),
        None,
    );
    assert_eq!(status, 404, "still dropped after a restart");
    server.stop();
}

#[test]
fn a_crash_during_a_views_build_resumes_it_at_restart() {
    let site = Site::new(CONFIG);
    let mut total = 0i64;
    for (failpoint, name) in [
        ("views-building", "late_a"),
        ("views-before-adopt", "late_b"),
    ] {
        let server = site.serve(&[("LAMBDAFLOW_FAILPOINTS", failpoint)]);
        assert_eq!(send(&server.url, total, total + 500).len(), 500);
        total += 500;
        server.wait_settled(Duration::from_secs(60));
        let (status, r) = request(
            "POST",
            &format!("{}/v1/views", server.url),
            Some(json!({"name": name, "sql": ADDED})),
        );
        assert_eq!(status, 202, "{r}");
        server.wait_for_crash(Duration::from_secs(30));
        // kill -9 at that step; the restart builds the view before serving.
        let server = site.serve(&[]);
        let a = common::get_json(&format!("{}/v1/views/{name}?limit=100000", server.url));
        assert_eq!(
            orders_and_covered(&a),
            (total as u64, total as u64),
            "`{name}` after a crash at `{failpoint}`: {}",
            a["freshness"]
        );
        server.stop();
    }
}

#[test]
fn a_config_reload_on_sighup_applies_its_views() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[]);
    assert_eq!(send(&server.url, 0, 400).len(), 400);
    server.wait_settled(Duration::from_secs(60));
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!(
            "{config}\n[[views]]\nname = \"sales_by_product\"\nsql = \"{CHANGED}\"\n\n[[views]]\nname = \"bands\"\nsql = \"{ADDED}\"\n"
        ),
    )
    .unwrap();
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let s = wait_published(&server.url, Duration::from_secs(60));
    let changes: BTreeSet<(String, String)> = s["view_changes"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["view"].as_str().unwrap().into(),
                c["change"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("bands".into(), "add".into()),
        ("sales_by_product".into(), "change".into()),
        ("sales_by_zipcode".into(), "drop".into()),
        ("sales_per_minute".into(), "drop".into()),
    ]
    .into();
    assert_eq!(changes, want, "the file's views replace the default ones");
    let a = common::get_json(&format!("{}/v1/views/bands?limit=1000", server.url));
    assert_eq!(orders_and_covered(&a), (400, 400), "{}", a["freshness"]);
    let a = common::get_json(&format!("{}/v1/views/sales_by_product", server.url));
    assert!(a["rows"][0].get("top").is_some(), "the new version: {a}");
    server.stop();
}

/// A view changed through the API overrides the config file's entry: a
/// reload says so (instead of "the views are as configured"), and
/// `DELETE /v1/views/{name}/change` returns the view to the file's
/// definition, for good (a restart keeps it).
#[test]
fn a_reload_reports_the_api_changes_that_override_the_file_and_revert_returns_to_it() {
    const BASE: &str = "SELECT ProductName, count(*) AS orders FROM events GROUP BY ProductName";
    const FILE: &str = "SELECT ProductName, count(*) AS orders, min(price) AS low FROM events GROUP BY ProductName";
    let site = Site::new(CONFIG);
    let config = std::fs::read_to_string(&site.config).unwrap();
    let with =
        |sql: &str| format!("{config}\n[[views]]\nname = \"sales_by_product\"\nsql = \"{sql}\"\n");
    std::fs::write(&site.config, with(BASE)).unwrap();
    let log = site.dir.path().join("serve.log");
    let server = site.serve_logging(&[], Some(&log));
    assert_eq!(send(&server.url, 0, 400).len(), 400);
    server.wait_settled(Duration::from_secs(60));
    let (status, reply) = request(
        "POST",
        &format!("{}/v1/views", server.url),
        Some(json!({ "name": "sales_by_product", "sql": CHANGED })),
    );
    assert_eq!(status, 202, "{reply}");
    wait_published(&server.url, Duration::from_secs(60));

    // The file's entry is edited: the saved change overrides it, and the
    // reload says which.
    std::fs::write(&site.config, with(FILE)).unwrap();
    let pid = server.child.id().to_string();
    let hup = || {
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    hup();
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("overrides the config file") && text.contains("sales_by_product") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "SIGHUP must say that the change saved through the API overrides the file's `sales_by_product`: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = common::get_json(&format!("{}/v1/views/sales_by_product", server.url));
    assert!(
        a["rows"][0].get("top").is_some(),
        "the saved change stays in force: {a}"
    );

    // Revert: back to the file's definition.
    let (status, reply) = request(
        "DELETE",
        &format!("{}/v1/views/sales_by_product/change", server.url),
        None,
    );
    assert_eq!(status, 202, "the revert is accepted and built: {reply}");
    let t = Instant::now();
    loop {
        let a = common::get_json(&format!("{}/v1/views/sales_by_product", server.url));
        if a["rows"][0].get("low").is_some() {
            assert_eq!(orders_and_covered(&a), (400, 400), "{}", a["freshness"]);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the view returns to the file's definition: {a}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, reply) = request(
        "DELETE",
        &format!("{}/v1/views/sales_by_product/change", server.url),
        None,
    );
    assert_eq!(status, 404, "nothing left to revert: {reply}");
    server.stop();
    let server = site.serve(&[]);
    let a = common::get_json(&format!("{}/v1/views/sales_by_product", server.url));
    assert!(
        a["rows"][0].get("low").is_some(),
        "a restart keeps the file's definition (the saved change is forgotten): {a}"
    );
    server.stop();
}

/// The current state of the view changes `server` lists for `view`.
fn change_states(url: &str, view: &str) -> Vec<String> {
    common::get_json(&format!("{url}/v1/status"))["view_changes"]["changes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| c["view"] == view)
        .map(|c| c["state"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Waits until `view` serves the config's `sales_by_product` again (no
/// `top`) from a run published after `after`, exactly.
fn wait_original(url: &str, after: u64, what: &str) {
    let t = Instant::now();
    loop {
        let a = common::get_json(&format!("{url}/v1/views/sales_by_product"));
        let run = a["freshness"]["run"].as_u64().unwrap_or(0);
        if run > after && a["rows"][0].get("top").is_none() {
            let (orders, covered) = orders_and_covered(&a);
            assert_eq!(orders, covered, "{what}: exact: {}", a["freshness"]);
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: the config's definition is served from a later run: {a}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `DELETE /v1/views/{name}/change` on a change still waiting cancels it
/// (before, it answered `reverted` and the change was published anyway, and
/// a failover later reverted it); on a change being built, the revert
/// follows the build.
#[test]
fn reverting_a_waiting_change_cancels_it_and_a_building_one_is_followed_by_the_revert() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[(
        "LAMBDAFLOW_FAILPOINTS",
        "batch-before-claim=sleep:1500,views-building=sleep:3000",
    )]);
    assert_eq!(send(&server.url, 0, 400).len(), 400);
    server.wait_settled(Duration::from_secs(60));
    let url = &server.url;
    let post = || {
        let (status, reply) = request(
            "POST",
            &format!("{url}/v1/views"),
            Some(json!({ "name": "sales_by_product", "sql": CHANGED })),
        );
        assert_eq!(status, 202, "{reply}");
    };
    let revert = || {
        request(
            "DELETE",
            &format!("{url}/v1/views/sales_by_product/change"),
            None,
        )
    };

    // Waiting: a run is under way, so the change waits for the next one.
    send(&server.url, 400, 450);
    let t = Instant::now();
    while common::get_json(&format!("{url}/v1/status"))["batch"]["running_since_ms"].is_null() {
        assert!(t.elapsed() < Duration::from_secs(30), "a run starts");
        std::thread::sleep(Duration::from_millis(20));
    }
    post();
    assert_eq!(change_states(url, "sales_by_product"), ["waiting"]);
    let run = common::get_json(&format!("{url}/v1/views/sales_by_product"))["freshness"]["run"]
        .as_u64()
        .unwrap();
    let (status, reply) = revert();
    assert_eq!(status, 200, "nothing to build: {reply}");
    assert_eq!(
        reply["cancelled"][0]["state"], "cancelled",
        "the waiting change is cancelled: {reply}"
    );
    send(&server.url, 450, 500);
    server.wait_settled(Duration::from_secs(60));
    wait_original(url, run, "a cancelled change");
    assert!(
        !change_states(url, "sales_by_product").contains(&"published".to_string()),
        "the cancelled change is never published"
    );

    // Building: the revert is built after it.
    post();
    let t = Instant::now();
    while !change_states(url, "sales_by_product").contains(&"building".to_string()) {
        assert!(t.elapsed() < Duration::from_secs(30), "the change builds");
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = common::get_json(&format!("{url}/v1/views/sales_by_product"))["freshness"]["run"]
        .as_u64()
        .unwrap();
    let (status, reply) = revert();
    assert_eq!(status, 202, "the revert follows the build: {reply}");
    wait_original(url, run + 1, "a change reverted while it built");
    server.stop();
}
