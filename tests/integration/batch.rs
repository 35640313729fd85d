//! The master dataset and the batch layer, end to end against real `serve`
//! processes: crashes at the failpoints between the Parquet write, the Delta
//! commit, the publish and log retention lose nothing and count nothing twice;
//! the published views equal the view SQL run directly over the Delta table;
//! a corrupt published file is detected and rebuilt, never served.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::Site;
use crate::common::exact::{
    assert_exactly, assert_exactly_or_in_doubt, assert_views_equal_sql, send, send_in_doubt,
};
use lambdaflow::config::Config;

const CONFIG: &str =
    "[archive]\nchunk_events = 700\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n";

/// `lambdaflow rebuild ARGS` on `site`'s config.
fn rebuild(site: &Site, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::BIN)
        .arg("rebuild")
        .args(args)
        .arg("--config")
        .arg(&site.config)
        .output()
        .unwrap()
}

/// [`rebuild`], which must succeed: what it printed.
fn rebuilt(site: &Site, args: &[&str]) -> String {
    let out = rebuild(site, args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Files in `dir` whose names end with `suffix`.
fn count_files(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(suffix)
        })
        .count()
}

#[test]
fn crashes_at_every_archive_and_publish_step_lose_nothing_and_count_nothing_twice() {
    let site = Site::new(CONFIG);
    let mut acked = BTreeMap::new();
    let mut in_doubt = Vec::new();
    let mut next = 0i64;
    for failpoint in [
        "archive-after-parquet",
        "archive-after-commit",
        "batch-before-publish",
        "batch-after-publish",
    ] {
        let server = site.serve(&[("LAMBDAFLOW_FAILPOINTS", failpoint)]);
        // Keep sending until the server dies at the failpoint.
        loop {
            let (got, doubt) = send_in_doubt(&server.url, next, next + 300);
            let n = got.len() as i64;
            acked.extend(got);
            if !doubt.is_empty() {
                in_doubt.push(doubt);
            }
            next += 300;
            if n < 300 {
                break;
            }
            std::thread::sleep(Duration::from_millis(30));
            assert!(next < 200_000, "failpoint `{failpoint}` was never hit");
        }
        server.wait_for_crash(Duration::from_secs(10));
        if failpoint == "archive-after-parquet" {
            // The file was written, the commit never happened.
            let (rows, _) = common::master_events(&site.data);
            assert!(rows.is_empty(), "nothing may be committed before the crash");
            let orphans = count_files(&site.data.join("master"), ".parquet");
            assert!(
                orphans >= 1,
                "the chunk's Parquet file was written before the crash"
            );
        }
    }
    // A clean run: everything acknowledged ends up archived and published once.
    let server = site.serve(&[]);
    acked.extend(send(&server.url, next, next + 1000));
    server.wait_settled(Duration::from_secs(90));
    server.stop();
    let events = assert_exactly_or_in_doubt(
        &acked,
        &in_doubt,
        &site.data,
        "after crashes at every failpoint",
    );
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn a_corrupt_published_file_is_detected_at_startup_and_rebuilt() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[]);
    let acked = send(&server.url, 0, 2000);
    server.wait_settled(Duration::from_secs(90));
    server.stop();

    let rt = common::rt();
    let config = Config {
        data: site.data.clone(),
        ..Config::default()
    };
    let (batch, m) = rt.block_on(async {
        let batch = lambdaflow::node::open_batch(&config).await.unwrap();
        let m = batch.current().await.unwrap().unwrap();
        (batch, m)
    });
    // Flip one byte in the middle of a published states file.
    let entry = &m.views["sales_by_zipcode"];
    let path = site.data.join(&entry.states.path);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();

    let view = batch
        .views()
        .iter()
        .find(|v| v.name() == "sales_by_zipcode")
        .unwrap()
        .clone();
    let err = rt
        .block_on(batch.read_states(&m, &view))
        .expect_err("a corrupt file must never be read as states");
    assert!(err.to_string().contains("is corrupt"), "{err}");
    let health = rt.block_on(batch.check()).unwrap();
    assert_eq!(health.problems.len(), 1, "{:?}", health.problems);
    drop(batch);

    // Startup finds it and rebuilds before serving.
    let server = site.serve(&[]);
    let after = server.status();
    let run = after["batch"]["published"]["run"].as_u64().unwrap();
    let recovered = after["health"]["recovered"].to_string();
    assert!(
        recovered.contains("sales_by_zipcode") && recovered.contains("rebuilt"),
        "status reports the repair: {after}"
    );
    assert!(run > m.run, "a new run was published at startup: {after}");
    server.stop();
    let (batch, m2) = rt.block_on(async {
        let batch = lambdaflow::node::open_batch(&config).await.unwrap();
        let m = batch.current().await.unwrap().unwrap();
        (batch, m)
    });
    assert!(rt.block_on(batch.check()).unwrap().is_ok());
    assert_eq!(m2.h, m.h, "the rebuild covers the same events");
    let events = assert_exactly(&acked, &site.data, "after the rebuild");
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn rebuild_recomputes_all_views_or_one_with_a_summary() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[]);
    send(&server.url, 0, 1500);
    server.wait_settled(Duration::from_secs(90));
    server.stop();

    let stdout = rebuilt(&site, &[]);
    assert!(
        stdout.contains("published run") && stdout.contains("1,500 events"),
        "{stdout}"
    );
    for v in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
        assert!(stdout.contains(v), "{stdout}");
    }

    let stdout = rebuilt(&site, &["sales_by_product"]);
    assert!(
        stdout.contains("(kept from run"),
        "other views are kept: {stdout}"
    );

    let out = rebuild(&site, &["no_such_view"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no view named `no_such_view`") && stderr.contains("sales_by_product"),
        "{stderr}"
    );

    let (_, events) = common::master_events(&site.data);
    assert_views_equal_sql(&site.data, &events);
}

#[test]
fn retention_deletes_log_segments_only_below_the_published_h() {
    let site = Site::new(&format!(
        "{CONFIG}[stream]\npartitions = 1\nsegment_bytes = \"8KiB\"\n"
    ));
    let server = site.serve(&[]);
    let acked = send(&server.url, 0, 3000);
    let s = server.wait_settled(Duration::from_secs(90));
    let p = &s["partitions"][0];
    let h = p["published"].as_u64().unwrap();
    assert_eq!(h, 3000);
    // Retention ran after the publish: the log starts at a segment boundary ≤ H.
    let start = p["start"].as_u64().unwrap();
    assert!(
        start > 0 && start <= h,
        "segments below H are gone, none above: {p}"
    );
    server.stop();
    assert_exactly(&acked, &site.data, "after retention");
    assert!(site.data.join("log/p0").exists());
    let segs = count_files(&site.data.join("log/p0"), ".log");
    assert!(segs >= 1);
}

#[test]
fn a_past_run_answers_as_of_its_number_or_time_with_exactly_its_events() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[]);
    let first = send(&server.url, 0, 1500);
    let s1 = server.wait_settled(Duration::from_secs(90));
    let r1 = s1["batch"]["published"].clone();
    let run1 = r1["run"].as_u64().unwrap();
    let h1: Vec<u64> = serde_json::from_value(r1["h"].clone()).unwrap();
    send(&server.url, 1500, 3200);
    let s2 = server.wait_settled(Duration::from_secs(90));
    assert!(s2["batch"]["published"]["run"].as_u64().unwrap() > run1);
    // Every later run of this server was incremental: it read only what
    // was new.
    let kinds = &s2["batch"]["published"]["kinds"];
    assert!(
        kinds["incremental"].as_u64() == Some(3) && kinds["full"].as_u64() == Some(0),
        "{kinds}"
    );

    // What run 1 covered: exactly the acknowledged events below its H.
    let covered: std::collections::BTreeSet<i64> = first
        .iter()
        .filter(|((p, o), _)| *o < h1[*p as usize])
        .map(|(_, zip)| *zip)
        .collect();
    assert_eq!(covered.len() as u64, h1.iter().sum::<u64>());
    let check = |answer: &serde_json::Value, how: &str| {
        let f = &answer["freshness"];
        assert_eq!(f["time_travel"], true, "{how}: {f}");
        assert_eq!(f["run"].as_u64(), Some(run1), "{how}: {f}");
        assert_eq!(f["h"], r1["h"], "{how}: {f}");
        assert_eq!(f["table_version"], r1["table_version"], "{how}: {f}");
        let zips: std::collections::BTreeSet<i64> = answer["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["orders"], 1, "{how}: one event per zipcode: {r}");
                r["zipcode"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(
            zips, covered,
            "{how}: the view over exactly run {run1}'s events"
        );
    };
    let url = format!("{}/v1/views/sales_by_zipcode", server.url);
    check(
        &common::get_json(&format!("{url}?as_of={run1}&limit=100000")),
        "by run",
    );
    let published = r1["started_ms"].as_i64().unwrap() + r1["duration_ms"].as_i64().unwrap();
    let at = chrono::DateTime::from_timestamp_millis(published)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    check(
        &common::get_json(&format!("{url}?as_of={at}&limit=100000")),
        "by time",
    );
    // A filter applies to the past rows as to the present ones.
    let one = *covered.iter().next().unwrap();
    let a = common::get_json(&format!("{url}?as_of={run1}&zipcode={one}"));
    assert_eq!(a["rows"].as_array().unwrap().len(), 1, "{a}");

    // The CLI, and what is refused.
    let out = std::process::Command::new(common::BIN)
        .args(["query", "sales_by_zipcode", "--limit", "3", "--as-of"])
        .arg(run1.to_string())
        .args(["--url", &server.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("batch run {run1} alone")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = common::get_status(&format!("{url}?as_of=999999"));
    assert_eq!(status, 404, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["hint"].as_str().unwrap_or("").contains("are kept"),
        "{body}"
    );
    let (status, body) = common::get_status(&format!("{url}?as_of=last+week"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("RFC 3339"), "{body}");
    server.stop();
}

/// The run numbers whose manifests are on a local root.
fn run_manifests(data: &Path) -> Vec<u64> {
    let mut runs: Vec<u64> = std::fs::read_dir(data.join("views/runs"))
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().to_string();
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    runs.sort_unstable();
    runs
}

#[test]
fn a_run_claimed_but_never_published_is_never_answered_for() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[]);
    send(&server.url, 0, 1000);
    let s = server.wait_settled(Duration::from_secs(90));
    let run1 = s["batch"]["published"]["run"].as_u64().unwrap();
    server.stop();

    // The next run claims its number (its manifest is created) and the
    // process dies before `CURRENT` names it.
    let server = site.serve(&[("LAMBDAFLOW_FAILPOINTS", "batch-before-publish")]);
    let mut next = 1000;
    while send_in_doubt(&server.url, next, next + 200).0.len() == 200 {
        next += 200;
        std::thread::sleep(Duration::from_millis(30));
        assert!(next < 100_000, "the failpoint was never hit");
    }
    server.wait_for_crash(Duration::from_secs(10));
    let claimed = *run_manifests(&site.data).last().unwrap();
    assert!(claimed > run1, "a run was claimed past run {run1}");

    let server = site.serve(&[]);
    send(&server.url, next + 200, next + 1200);
    let s = server.wait_settled(Duration::from_secs(90));
    let published = s["batch"]["published"]["run"].as_u64().unwrap();
    assert!(published > claimed, "{s}");
    let url = format!("{}/v1/views/sales_by_zipcode", server.url);
    let (status, body) = common::get_status(&format!("{url}?as_of={claimed}"));
    assert_eq!(
        status,
        404,
        "run {claimed} was claimed but never published: time travel must not answer for it: {}",
        &body[..body.len().min(300)]
    );
    let (status, body) = common::get_status(&format!("{url}?as_of={run1}"));
    assert_eq!(status, 200, "run {run1} was published and is kept: {body}");
    assert!(
        !run_manifests(&site.data).contains(&claimed),
        "retention removes the manifest of a run the published chain passes over: {:?}",
        run_manifests(&site.data)
    );
    server.stop();
}

#[test]
fn a_dropped_views_batch_files_go_with_retention() {
    let site = Site::new(&format!("{CONFIG}keep_runs = 1\nkeep_for = \"0s\"\n"));
    let server = site.serve(&[]);
    let url = server.url.clone();
    send(&url, 0, 1000);
    server.wait_settled(Duration::from_secs(90));
    let dir = site.data.join("views/sales_per_minute");
    assert!(dir.exists(), "the view has batch files");
    let (status, d) =
        crate::live_views::request("DELETE", &format!("{url}/v1/views/sales_per_minute"), None);
    assert_eq!(status, 202, "{d}");
    crate::live_views::wait_published(&url, Duration::from_secs(60));
    // Runs past the drop: retention keeps one older run, so two more runs
    // leave no kept run naming the dropped view.
    let mut next = 1000;
    for _ in 0..3 {
        send(&url, next, next + 300);
        next += 300;
        server.wait_settled(Duration::from_secs(90));
    }
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "a dropped view's runs are removed once no kept run names them: {left:?} left in {}",
        dir.display()
    );
    server.stop();
}

/// The batch scan reads strings as `Utf8View`; `approx_distinct` hashes a
/// view otherwise than a string, so a value archived and the same value
/// still realtime once filled two HLL registers and counted twice (the red
/// team: 20 where 10 were distinct, until the next batch run covered both).
/// Such a view keeps `Utf8` in the batch layer.
/// Asks `server` for batch runs until `events` are published, within a
/// minute (else fails with `what` and the status).
fn publish(server: &common::Server, events: u64, what: &str) {
    let t = std::time::Instant::now();
    loop {
        common::rt().block_on(async {
            reqwest::Client::new()
                .post(format!("{}/v1/batch/run", server.url))
                .send()
                .await
                .unwrap()
        });
        let published: u64 = server.status()["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["published"].as_u64().unwrap_or(0))
            .sum();
        if published == events {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: {}",
            server.status()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn approx_distinct_of_a_string_counts_a_value_on_both_sides_once() {
    let site = Site::new(
        "[archive]\nchunk_age = \"200ms\"\n[batch]\npause = \"1h\"\n[[views]]\nname = \"products\"\nsql = \"SELECT approx_distinct(ProductName) AS d, count(DISTINCT ProductName) AS exact FROM events\"\n",
    );
    let server = site.serve(&[]);
    let events: String = (1..=10)
        .map(|i| {
            format!(
                "{{\"zipcode\":95126,\"ProductName\":\"product{i}\",\"price\":16,\"timestamp\":\"2014-11-01 19:35:41.158\"}}\n"
            )
        })
        .collect();
    let read = || common::get_json(&format!("{}/v1/views/products", server.url));
    let (code, _) = common::post_events(&server.url, events.clone().into_bytes()).unwrap();
    assert_eq!(code, 200);
    // Archived and published: the 10 values are in the batch layer.
    publish(&server, 10, "the first 10 events are published");
    // The same values again, realtime this time.
    let (code, _) = common::post_events(&server.url, events.into_bytes()).unwrap();
    assert_eq!(code, 200);
    let t = std::time::Instant::now();
    loop {
        let v = read();
        let realtime: u64 = v["freshness"]["realtime"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap_or(0))
            .sum();
        if realtime == 20 {
            let row = &v["rows"][0];
            assert_eq!(row["exact"], 10, "{v}");
            assert_eq!(
                row["d"], 10,
                "10 distinct product names, 10 archived and the same 10 realtime: approx_distinct merges them as one pass would: {v}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the second 10 events are read: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
}

/// A view of many groups is recomputed with its events shuffled among the
/// cores by group key, once a published run has said how many groups it
/// has (`[batch] shuffle_above_groups`); a view of more groups than
/// `[batch] tsv_max_rows` publishes its states and no `rows.tsv`, its row
/// count still exact (a HAVING finalizes to count them). Every published
/// view equals its SQL over the master dataset.
#[test]
fn a_view_of_many_groups_is_shuffled_by_key_and_writes_no_tsv_past_the_bound() {
    let views = [
        (
            "by_zip",
            "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue, avg(price) AS a, min(price) AS lo, max(price) AS hi, approx_distinct(ProductName) AS d FROM events GROUP BY zipcode, ProductName",
        ),
        (
            "busy",
            "SELECT zipcode % 13 AS z, count(*) AS n FROM events GROUP BY zipcode % 13 HAVING count(*) > 115",
        ),
        (
            "products",
            "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY ProductName",
        ),
        // Finalizing makes more rows than groups (red team: the manifest
        // said 864,842 rows where 2,000,000 were).
        (
            "spread",
            "SELECT zipcode % 13 AS z, unnest(array_agg(price)) AS p FROM events GROUP BY zipcode % 13",
        ),
    ];
    let defs: String = views
        .iter()
        .map(|(name, sql)| format!("[[views]]\nname = \"{name}\"\nsql = \"{sql}\"\n"))
        .collect();
    let site = Site::new(&format!(
        "{CONFIG}shuffle_above_groups = 5\ntsv_max_rows = 8\n{defs}"
    ));
    let server = site.serve(&[]);
    send(&server.url, 0, 1500);
    server.wait_settled(Duration::from_secs(90));
    server.stop();

    // Runs were published while serving: each view's groups are known.
    let stdout = rebuilt(&site, &[]);
    assert!(
        stdout.contains("scan+shuffle+states"),
        "views of 5 groups or more are shuffled by key once a run has counted their groups: {stdout}"
    );

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.data.join("views/CURRENT")).unwrap()).unwrap();
    let entry = |v: &str| manifest["views"][v].clone();
    for (view, groups, rows, tsv) in [
        ("by_zip", 1500, 1500, false),
        ("busy", 13, 5, false),
        ("products", 7, 7, true),
        ("spread", 13, 1500, false),
    ] {
        let e = entry(view);
        assert_eq!(e["groups"], groups, "{view}: {e}");
        assert_eq!(
            e["rows"], rows,
            "{view}: the row count is exact with or without a TSV: {e}"
        );
        assert_eq!(
            e.get("tsv").is_some(),
            tsv,
            "{view}: a rows.tsv only at most 8 groups: {e}"
        );
        let dir = e["states"]["path"]
            .as_str()
            .unwrap()
            .rsplit_once('/')
            .unwrap()
            .0
            .to_string();
        assert_eq!(
            site.data.join(&dir).join("rows.tsv").exists(),
            tsv,
            "{view}: {dir}/rows.tsv is written exactly when the manifest names it"
        );
    }

    let (_, events) = common::master_events(&site.data);
    common::rt().block_on(async {
        let config = Config::load(Some(&site.config)).unwrap();
        let batch = lambdaflow::node::open_batch(&config).await.unwrap();
        let m = batch.current().await.unwrap().expect("a published run");
        for view in batch.views().iter() {
            let states = batch.read_states(&m, view).await.unwrap();
            let got = view.finalize(vec![states]).await.unwrap();
            let want = lambdaflow::view::oracle::run_sql(
                &lambdaflow::schema::EventSchema::paper(),
                view.sql(),
                events.clone(),
            )
            .await
            .unwrap();
            lambdaflow::view::oracle::same_rows(&got, &want, false, 1e-12).unwrap_or_else(|d| {
                panic!(
                    "view `{}` shuffled by key differs from its SQL over the master dataset: {d}",
                    view.name()
                )
            });
        }
    });
}

/// A view whose rows fail to finalize on one group (a division by zero
/// where a product has exactly 3 orders) publishes its states with the
/// reason; the run goes on for every other view, and a read of the whole
/// view reports the failure. Before, the whole run failed at every cycle:
/// nothing was published again until the view changed, and the realtime
/// chunks below the archive piled up until ingest answered 503.
#[test]
fn a_view_that_fails_to_finalize_does_not_hold_up_the_runs_of_the_others() {
    let site = Site::new(
        "[archive]\nchunk_age = \"200ms\"\n[batch]\npause = \"1h\"\n\
         [[views]]\nname = \"orders\"\nsql = \"SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName\"\n\
         [[views]]\nname = \"fragile\"\nsql = \"SELECT ProductName, 10 / (count(*) - 3) AS per FROM events GROUP BY ProductName\"\n",
    );
    let server = site.serve(&[]);
    let events: String = [("p3", 3), ("p5", 5)]
        .iter()
        .flat_map(|(p, n)| (0..*n).map(move |_| p))
        .map(|p| {
            format!(
                "{{\"zipcode\":95126,\"ProductName\":\"{p}\",\"price\":16,\"timestamp\":\"2014-11-01 19:35:41.158\"}}\n"
            )
        })
        .collect();
    let (code, _) = common::post_events(&server.url, events.into_bytes()).unwrap();
    assert_eq!(code, 200);
    publish(
        &server,
        8,
        "the 8 events are published although `fragile` cannot be finalized (p3's 10 / 0)",
    );
    let orders = common::get_json(&format!("{}/v1/views/orders", server.url));
    let mut rows: Vec<(String, i64)> = orders["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["ProductName"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![("p3".to_string(), 3), ("p5".to_string(), 5)],
        "the other view is published: {orders}"
    );
    let (code, body) = common::get_status(&format!("{}/v1/views/fragile", server.url));
    assert!(
        code >= 400 && body.to_lowercase().contains("divide by zero"),
        "a read of the whole failing view reports why: {code} {body}"
    );
    let (code, body) =
        common::get_status(&format!("{}/v1/views/fragile?ProductName=p5", server.url));
    assert_eq!(code, 200, "p5's own group finalizes: {body}");
    let current: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.data.join("views/CURRENT")).expect("a published run"),
    )
    .unwrap();
    let why = current["views"]["fragile"]["unfinalized"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.to_lowercase().contains("divide by zero"),
        "the run's manifest says why `fragile` has no rows: {current}"
    );
    server.stop();
}
