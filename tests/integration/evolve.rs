//! A schema that grows: a nullable field added to the config of a running
//! deployment (a restart) evolves the master dataset's Delta schema; events
//! from before it — archived, or still only in the log — read the field as
//! null, in lambdaflow's views and in an independent reader (Python
//! deltalake); validation and the dead-letter store follow the new schema
//! at once; removing or retyping a field is refused with why and what to do.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::common::exact::send;
use crate::common::{self, Site};

const CONFIG: &str =
    "[archive]\nchunk_events = 700\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n";

/// The paper's schema, plus `extra` fields.
pub(crate) fn schema(extra: &str) -> String {
    format!(
        r#"[schema]
event_time = "timestamp"
fields = [
  {{ name = "zipcode", type = "int64" }},
  {{ name = "ProductName", type = "utf8" }},
  {{ name = "price", type = "{price}" }},
  {{ name = "timestamp", type = "timestamp_ms", format = "%Y-%m-%d %H:%M:%S%.3f" }},
  {extra}
]
"#,
        price = if extra.contains("RETYPE") {
            "float64"
        } else {
            "int64"
        },
        extra = extra.replace("RETYPE", "")
    )
}

const VIEWS: &str = r#"
[[views]]
name = "sales_by_product"
sql = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue FROM events GROUP BY ProductName"

[[views]]
name = "by_coupon"
sql = "SELECT coupon, count(*) AS orders FROM events GROUP BY coupon"
"#;

fn with_coupon(zip: i64, coupon: Option<&str>) -> String {
    let base = common::event(zip, "product1", 5, "2014-11-01 00:00:00.000");
    match coupon {
        Some(c) => base.replacen('{', &format!("{{\"coupon\":\"{c}\","), 1),
        None => base,
    }
}

/// Posts NDJSON lines: the reply (a 422 when every line is refused).
fn post(url: &str, lines: &[String]) -> serde_json::Value {
    let (status, reply) = common::post_events(url, (lines.join("\n") + "\n").into_bytes()).unwrap();
    assert!(status == 200 || status == 422, "{status}: {reply}");
    reply
}

/// `serve`'s exit and stderr, for a config it must refuse.
fn refused(site: &Site) -> String {
    let out = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve must refuse the schema");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_nullable_field_added_reads_as_null_for_older_events_everywhere() {
    let site = Site::new(CONFIG);
    let original = std::fs::read_to_string(&site.config).unwrap();
    let server = site.serve(&[]);
    send(&server.url, 0, 1000);
    server.wait_settled(Duration::from_secs(90));
    // Before the change, the field is unknown: the event is refused, and
    // kept in the dead-letter store.
    let reply = post(&server.url, &[with_coupon(1, Some("X"))]);
    assert_eq!(reply["accepted"], 0, "{reply}");
    assert!(reply["errors"][0]["field"] == "coupon", "{reply}");
    // Events the log holds but the master dataset may not yet: written
    // under the old schema, replayed under the new one.
    send(&server.url, 1000, 1200);
    server.stop();

    std::fs::write(
        &site.config,
        format!(
            "{original}{}{VIEWS}",
            schema(r#"{ name = "coupon", type = "utf8", nullable = true },"#)
        ),
    )
    .unwrap();
    let server = site.serve(&[]);
    let mut lines: Vec<String> = (0..300)
        .map(|i| with_coupon(20_000 + i, Some(if i % 3 == 0 { "A" } else { "B" })))
        .collect();
    lines.extend((300..400).map(|i| with_coupon(20_000 + i, None)));
    let reply = post(&server.url, &lines);
    assert_eq!(reply["accepted"], 400, "{reply}");
    // Validation follows the new schema at once: a number is not a coupon.
    let bad = common::event(7, "product1", 5, "2014-11-01 00:00:00.000").replacen(
        '{',
        "{\"coupon\":5,",
        1,
    );
    let reply = post(&server.url, &[bad]);
    assert_eq!(reply["accepted"], 0, "{reply}");
    let message = reply["errors"][0]["message"].as_str().unwrap();
    assert!(
        reply["errors"][0]["field"] == "coupon" && message.contains("field `coupon`"),
        "the error names the field: {reply}"
    );
    server.wait_settled(Duration::from_secs(90));

    let a = common::get_json(&format!("{}/v1/views/by_coupon", server.url));
    let counts: BTreeMap<String, u64> = a["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["coupon"].as_str().unwrap_or("null").to_string(),
                r["orders"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect: BTreeMap<String, u64> = [
        ("A".into(), 100),
        ("B".into(), 200),
        ("null".into(), 1200 + 100),
    ]
    .into();
    assert_eq!(counts, expect, "old and new events in one view: {a}");
    assert!(a["freshness"]["run"].is_u64(), "{a}");
    let p = common::get_json(&format!("{}/v1/views/sales_by_product", server.url));
    let (orders, covered) = common::orders_and_covered(&p);
    assert_eq!((orders, covered), (1600, 1600), "{p}");
    server.stop();

    // An independent reader sees the evolved table: nulls for older rows.
    let out = Command::new(std::env::var("LAMBDAFLOW_PYTHON").unwrap_or("python3".into()))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/read_delta.py"
        ))
        .arg(site.data.join("master"))
        .args(["", "coupon"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the deltalake Python reader failed (scripts/test installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_coupon: BTreeMap<String, u64> = BTreeMap::new();
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        let coupon = l.rsplit(' ').next().unwrap().to_string();
        *by_coupon.entry(coupon).or_default() += 1;
    }
    assert_eq!(by_coupon, expect, "Python deltalake reads the table so");

    // Removing or retyping a field is refused, with why and what to do.
    std::fs::write(&site.config, format!("{original}{}", schema(""))).unwrap();
    let e = refused(&site);
    assert!(
        e.contains("cannot remove field `coupon`") && e.contains("immutable"),
        "{e}"
    );
    std::fs::write(
        &site.config,
        format!(
            "{original}{}{VIEWS}",
            schema(r#"{ name = "coupon", type = "utf8", nullable = true }, RETYPE"#)
        ),
    )
    .unwrap();
    let e = refused(&site);
    assert!(
        e.contains("cannot retype field `price`") && e.contains("price_v2"),
        "{e}"
    );
}

/// A nullable field added is a metadata-only change for the views that do
/// not read it: their fingerprints stay, so the node serves the published
/// run at once (no rebuild before serving) and earlier runs still answer
/// `?as_of=`.
#[test]
fn a_nullable_field_added_keeps_the_views_that_do_not_read_it() {
    let site = Site::new(CONFIG);
    let original = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(&site.config, format!("{original}{}", schema(""))).unwrap();
    let server = site.serve(&[]);
    send(&server.url, 0, 500);
    let s = server.wait_settled(Duration::from_secs(90));
    let first = s["batch"]["published"]["run"].as_u64().unwrap();
    send(&server.url, 500, 1000);
    let s = server.wait_settled(Duration::from_secs(90));
    let last = s["batch"]["published"]["run"].as_u64().unwrap();
    assert!(last > first, "two runs: {first}, {last}");
    server.stop();

    std::fs::write(
        &site.config,
        format!(
            "{original}{}",
            schema(r#"{ name = "coupon", type = "utf8", nullable = true },"#)
        ),
    )
    .unwrap();
    let server = site.serve(&[]);
    let s = server.status();
    assert_eq!(
        s["batch"]["published"]["run"].as_u64(),
        Some(last),
        "no view reads `coupon`: the node serves the published run, with no rebuild: {}",
        s["health"]
    );
    for view in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
        let (status, body) = common::get_status(&format!(
            "{}/v1/views/{view}?as_of={first}&limit=1",
            server.url
        ));
        assert_eq!(
            status, 200,
            "`{view}` as of run {first}, before the field was added: {body}"
        );
    }
    server.stop();
}
