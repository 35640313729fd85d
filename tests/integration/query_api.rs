//! The query API and its commands against a real server: listing, point
//! reads with filters, SQL over views (and what it refuses), metrics, and the
//! `query`, `sql` and `status` commands.

use crate::common;

use std::process::Command;
use std::time::Duration;

use crate::common::{BIN, Site, event, get_json, post_events};
use serde_json::Value;

fn post_sql(url: &str, sql: &str) -> (u16, Value) {
    common::rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/sql"))
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    })
}

fn get(url: &str) -> (u16, Value) {
    common::rt().block_on(async {
        let resp = reqwest::get(url).await.unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    })
}

#[test]
fn views_sql_metrics_and_commands() {
    let site = Site::new("[archive]\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n");
    let server = site.serve(&[]);
    let url = server.url.clone();
    let body: String = (0..300)
        .map(|i| {
            event(
                10_000 + i % 30,
                &format!("product{}", i % 3),
                10,
                "2014-11-01 10:00:00.000",
            ) + "\n"
        })
        .collect();
    assert_eq!(post_events(&url, body.into_bytes()).unwrap().0, 200);
    server.wait_settled(Duration::from_secs(90));

    // GET /v1/views: names, columns, freshness.
    let list = get_json(&format!("{url}/v1/views"));
    let names: Vec<&str> = list["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["sales_by_product", "sales_by_zipcode", "sales_per_minute"]
    );
    assert_eq!(list["views"][0]["columns"][0]["name"], "ProductName");
    assert_eq!(
        list["views"][0]["freshness"]["realtime"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A point read, filtered, with freshness.
    let (status, one) = get(&format!(
        "{url}/v1/views/sales_by_product?ProductName=product1"
    ));
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        one["rows"],
        serde_json::json!([{"ProductName": "product1", "orders": 100, "revenue": 1000}])
    );
    assert!(
        one["total_rows"].is_null(),
        "a key lookup does not merge the whole view: {one}"
    );
    let f = &one["freshness"];
    assert_eq!(
        f["realtime"],
        serde_json::json!([300, 0]),
        "one request goes whole to one partition: {f}"
    );
    assert_eq!(
        f["h"], f["realtime"],
        "settled: the batch covers everything: {f}"
    );
    assert!(
        f["run"].as_u64().is_some() && f["batch_age_ms"].as_i64().is_some(),
        "{f}"
    );

    // Filters on two columns, and a limit.
    let (_, two) = get(&format!(
        "{url}/v1/views/sales_by_zipcode?zipcode=10003&orders=10"
    ));
    assert_eq!(two["rows"].as_array().unwrap().len(), 1, "{two}");
    let (_, lim) = get(&format!("{url}/v1/views/sales_by_zipcode?limit=4"));
    assert_eq!(lim["rows"].as_array().unwrap().len(), 4);
    // Pages: `next_offset` says where the next starts; together they are the view.
    let (_, all) = get(&format!("{url}/v1/views/sales_by_zipcode"));
    let total = all["total_rows"].as_u64().unwrap() as usize;
    assert_eq!(all["rows"].as_array().unwrap().len(), total, "{all}");
    assert!(all.get("next_offset").is_none(), "one page holds it all");
    let mut paged = Vec::new();
    let mut offset = 0;
    loop {
        let (_, page) = get(&format!(
            "{url}/v1/views/sales_by_zipcode?limit=3&offset={offset}"
        ));
        paged.extend(page["rows"].as_array().unwrap().iter().cloned());
        match page["next_offset"].as_u64() {
            Some(n) => offset = n,
            None => break,
        }
    }
    assert_eq!(
        paged,
        *all["rows"].as_array().unwrap(),
        "pages add up to the view"
    );

    // Mistakes get clear errors.
    let (status, err) = get(&format!("{url}/v1/views/sales_by_product?productname=x"));
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("no column `productname`"),
        "{err}"
    );
    assert_eq!(err["hint"], "did you mean `ProductName`?");
    let (status, err) = get(&format!("{url}/v1/views/nope"));
    assert_eq!(status, 404);
    assert!(
        err["error"].as_str().unwrap().contains("sales_by_product"),
        "{err}"
    );

    // SQL over the views, joined; one instant for every table.
    let (status, r) = post_sql(
        &url,
        "SELECT p.ProductName, p.orders, sum(z.orders) AS zip_orders FROM sales_by_product p CROSS JOIN sales_by_zipcode z GROUP BY p.ProductName, p.orders ORDER BY p.ProductName",
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["rows"][0],
        serde_json::json!({"ProductName": "product0", "orders": 100, "zip_orders": 300})
    );
    // Only queries.
    for bad in [
        "DROP TABLE sales_by_product",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO sales_by_product VALUES ('x', 1, 1)",
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
        "COPY sales_by_product TO '/tmp/x.csv'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let (status, r) = post_sql(&url, bad);
        assert_eq!(status, 403, "{bad} must be refused: {r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .starts_with("only queries are allowed here"),
            "{r}"
        );
    }
    let (status, r) = post_sql(&url, "SELECT nope FROM sales_by_product");
    assert_eq!(status, 400, "{r}");

    // Prometheus metrics.
    let text = common::get_text(&format!("{url}/metrics"));
    for m in [
        "lambdaflow_events_accepted_total 300",
        "lambdaflow_realtime_offset{partition=\"0\"} 300",
        "lambdaflow_batch_offset{partition=\"0\"} 300",
        "lambdaflow_micro_batch_duration_seconds_count",
        "lambdaflow_query_duration_seconds_bucket",
        "lambdaflow_batch_runs_total",
    ] {
        assert!(text.contains(m), "metrics must contain {m}:\n{text}");
    }

    // The commands.
    let out = Command::new(BIN)
        .args([
            "query",
            "sales_by_product",
            "--where",
            "ProductName=product2",
            "--url",
            &url,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("ProductName | orders | revenue"),
        "{stdout}"
    );
    assert!(stdout.contains("product2    | 100    | 1000"), "{stdout}");
    assert!(
        stdout.contains("(1 row)") && stdout.contains("batch run"),
        "{stdout}"
    );
    let out = Command::new(BIN)
        .args([
            "sql",
            "SELECT count(*) AS n FROM sales_by_zipcode",
            "--url",
            &url,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("30"), "{stdout}");
    let out = Command::new(BIN)
        .args(["sql", "DROP TABLE x", "--url", &url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("only queries") && stderr.contains("HTTP 403"),
        "{stderr}"
    );
    let out = Command::new(BIN)
        .args(["status", "--url", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("published H") && stdout.contains("batch: run"),
        "{stdout}"
    );
    server.stop();
}

#[test]
fn the_demo_tour_runs_and_finds_the_handoff_exact() {
    let out = Command::new(BIN)
        .args([
            "demo",
            "--exit",
            "--events",
            "3000",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("identical rows — nothing counted twice, nothing missed"),
        "{stdout}"
    );
    assert!(stdout.contains("accepted 1, rejected 3"), "{stdout}");
}

#[test]
fn every_command_the_demo_suggests_works_as_pasted() {
    use std::io::{BufRead, BufReader};
    let mut demo = Command::new(BIN)
        .args(["demo", "--events", "2000", "--listen", "127.0.0.1:0"])
        // As a newcomer's shell: not started by cargo (`cargo run -- demo`
        // is covered by the same code path, suggesting `cargo run --`).
        .env_remove("CARGO")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(demo.stdout.take().unwrap());
    let (mut tour, mut line) = (String::new(), String::new());
    while !tour.contains("Serving on") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the demo ended early:\n{tour}"
        );
        tour.push_str(&line);
    }
    assert!(
        tour.contains("The batch view is") && tour.contains("still empty"),
        "step 2 says plainly that the batch view is empty:\n{tour}"
    );
    assert!(tour.contains("dashboard"), "{tour}");
    // The commands after "Try it": psql, curl, and this binary as a newcomer
    // would run it (here neither on the PATH nor started by cargo: its path).
    let commands: Vec<&str> = tour
        .split("Try it")
        .nth(1)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("psql ") || l.starts_with("curl ") || l.starts_with(BIN))
        .collect();
    assert!(commands.len() >= 5, "{tour}");
    assert!(commands.iter().any(|c| c.starts_with("psql ")), "{tour}");
    for c in &commands {
        let run = Command::new("sh")
            .args(["-c", c])
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "`{c}` failed: {}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    unsafe {
        libc::kill(demo.id() as i32, libc::SIGTERM);
    }
    assert!(demo.wait().unwrap().success(), "the demo stops on SIGTERM");
}
