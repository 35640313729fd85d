//! The live dashboard (`GET /`) in headless Chromium (Debian's, driven by
//! playwright-core): it shows what `/v1/views` says, follows new events
//! without a reload, fetches nothing from outside the server, and fits a
//! phone's width. It saves screenshots (laptop and phone) under the test's
//! temporary target directory.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Site, event, get_json, get_text, post_events};

/// What the page must show per view: its rows and the events it covers.
fn expected(url: &str) -> Value {
    let views = get_json(&format!("{url}/v1/views"));
    let mut out = serde_json::Map::new();
    for v in views["views"].as_array().unwrap() {
        let covered: u64 = v["freshness"]["realtime"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap())
            .sum();
        out.insert(
            v["name"].as_str().unwrap().to_string(),
            json!({ "rows": v["rows"], "covered": covered }),
        );
    }
    Value::Object(out)
}

pub(crate) struct Browser {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Browser {
    pub(crate) fn open(url: &str) -> Browser {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/integration/dashboard.js");
        let mut child = Command::new("node")
            .arg(script)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs (scripts/test installs it, playwright-core and chromium)");
        let out = BufReader::new(child.stdout.take().unwrap());
        Browser { child, out }
    }

    /// Sends a command; the answer after "ok ", or a failure.
    pub(crate) fn ask(&mut self, command: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        match line.trim_end().strip_prefix("ok ") {
            Some(rest) => rest.to_string(),
            None => panic!("the page did not do `{command}`: {line}"),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "quit");
        }
        let _ = self.child.wait();
    }
}

fn produce(url: &str, from: i64, n: i64) {
    let body: String = (from..from + n)
        .map(|i| {
            event(
                20_000 + i % 211,
                &format!("product{}", i % 9),
                1 + i % 40,
                &format!("2014-11-01 1{}:{:02}:00.000", i % 3, i % 60),
            ) + "\n"
        })
        .collect();
    assert_eq!(post_events(url, body.into_bytes()).unwrap().0, 200);
}

#[test]
fn the_dashboard_shows_the_views_live_without_a_reload() {
    let site = Site::new("[archive]\nchunk_age = \"100ms\"\n[batch]\npause = \"300ms\"\n");
    let server = site.serve(&[]);
    let url = server.url.clone();

    // The page is one document from the binary, with a policy that forbids
    // loading anything from elsewhere.
    let html = get_text(&format!("{url}/"));
    assert!(
        html.contains("<title>lambdaflow</title>"),
        "GET / serves the page"
    );
    for outside in ["http://", "https://", "//cdn", "src=\""] {
        assert!(!html.contains(outside), "the page must not load {outside}…");
    }

    produce(&url, 0, 3_000);
    server.wait_settled(Duration::from_secs(90));
    let mut page = Browser::open(&url);
    let first = expected(&url);
    page.ask(&format!("expect {first}"));

    // More events: the page follows them, with no reload.
    produce(&url, 3_000, 2_500);
    server.wait_settled(Duration::from_secs(90));
    let second = expected(&url);
    assert_ne!(first, second, "the new events change the views");
    page.ask(&format!("expect {second}"));

    // A bad line shows among the dead letters, with its reason.
    let (_, reply) = post_events(&url, b"{\"zipcode\": \"x\"}\n".to_vec()).unwrap();
    assert_eq!(reply["rejected"], 1, "{reply}");

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let laptop = dir.join("dashboard.png");
    let phone = dir.join("dashboard-phone.png");
    page.ask(&format!("shot {} 1280 900", laptop.display()));
    let check: Value = serde_json::from_str(&page.ask("check")).unwrap();
    assert_eq!(
        check["reloaded"], false,
        "updates came without a reload: {check}"
    );
    assert_eq!(
        check["outside"],
        json!([]),
        "nothing fetched from elsewhere: {check}"
    );
    assert_eq!(check["errors"], json!([]), "no script errors: {check}");
    assert!(
        check["state"].as_str().unwrap().starts_with("live"),
        "the page reads the API without errors: {check}"
    );
    let views = second.as_object().unwrap().len() as u64;
    assert_eq!(check["charts"], views, "a chart per view: {check}");
    assert!(
        check["tables"].as_u64().unwrap() > views,
        "a table per view: {check}"
    );
    page.ask(&format!("shot {} 390 844", phone.display()));
    let check: Value = serde_json::from_str(&page.ask("check")).unwrap();
    assert!(
        check["overflow"].as_i64().unwrap() <= 0,
        "on a phone's width nothing overflows sideways: {check}"
    );
    assert!(std::fs::metadata(&laptop).unwrap().len() > 10_000);
    eprintln!("screenshots: {} {}", laptop.display(), phone.display());
}
