//! The Postgres wire protocol against a real `serve`, with real clients:
//! psql (Debian's postgresql-client, the simple protocol) and psycopg 3
//! (the extended protocol, prepared statements with parameters). Every view
//! reads as `POST /v1/sql` answers it; what is not a query is refused with a
//! SQLSTATE; tokens are the password; TLS when configured; the queries
//! Grafana and Metabase send on connect work.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{self, Server, Site, event, free_port, get_json, post_events};

fn psql_bin() -> String {
    std::env::var("LAMBDAFLOW_PSQL").unwrap_or_else(|_| "psql".into())
}

/// A Python with psycopg: `LAMBDAFLOW_PYTHON`, or the venv scripts/test
/// makes, or the PATH's.
pub(crate) fn python() -> String {
    if let Ok(p) = std::env::var("LAMBDAFLOW_PYTHON") {
        return p;
    }
    let venv = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/lambdaflow-py/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

/// psql's unaligned, tuples-only output of `sql` (or its error).
pub(crate) fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(psql_bin())
        .args([
            url,
            "-X",
            "-A",
            "-t",
            "-F",
            "\t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs (scripts/test installs postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `steps` through psycopg on one connection: one result per step.
pub(crate) fn driver(dsn: &str, steps: Value) -> Vec<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/integration/pg_client.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs (scripts/test sets LAMBDAFLOW_PYTHON to a venv with psycopg)");
    let plan = json!({ "dsn": dsn, "steps": steps });
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(plan.to_string().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pg_client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn post_sql(url: &str, sql: &str) -> Value {
    common::rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/sql"))
            .json(&json!({ "sql": sql }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{sql}");
        resp.json().await.unwrap()
    })
}

/// A JSON value as psql prints it.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.replace('T', " "),
        v => v.to_string(),
    }
}

/// The rows of an HTTP answer as psql's lines.
fn http_lines(answer: &Value) -> BTreeSet<String> {
    let cols: Vec<&str> = answer["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| text(&r[c]))
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect()
}

/// psql's lines; a timestamp with no fraction is printed as JSON has it
/// (arrow-pg writes `.000000`).
fn lines(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.replace('T', " ").replace(".000000", ""))
        .collect()
}

/// Both sides equal, or the first few rows that differ.
fn assert_same(over_pg: &BTreeSet<String>, over_http: &BTreeSet<String>, what: &str) {
    let only_pg: Vec<_> = over_pg.difference(over_http).take(5).collect();
    let only_http: Vec<_> = over_http.difference(over_pg).take(5).collect();
    assert!(
        only_pg.is_empty() && only_http.is_empty(),
        "{what}: psql and /v1/sql differ; only over psql: {only_pg:?}; only over HTTP: {only_http:?}"
    );
}

/// The introspection queries of the fixture file.
fn introspection() -> Vec<String> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pg_introspection.sql");
    std::fs::read_to_string(path)
        .unwrap()
        .split("\n-- end\n")
        .map(|s| s.trim().to_string())
        .filter(|s| {
            s.lines()
                .any(|l| !l.starts_with("--") && !l.trim().is_empty())
        })
        .collect()
}

pub(crate) fn serve_with_pg(extra: &str) -> (Site, Server, String) {
    let port = free_port();
    let site = Site::new(&format!(
        "[archive]\nchunk_age = \"100ms\"\n[batch]\npause = \"200ms\"\n[pg]\nlisten = \"127.0.0.1:{port}\"\n{extra}"
    ));
    let server = site.serve(&[]);
    (site, server, format!("127.0.0.1:{port}"))
}

#[test]
fn psql_and_a_driver_read_the_views_as_the_http_api_does() {
    let (_site, server, pg) = serve_with_pg("");
    let url = server.url.clone();
    let body: String = (0..2_000)
        .map(|i| {
            event(
                10_000 + i % 97,
                &format!("product{}", i % 7),
                1 + i % 50,
                &format!("2014-11-01 10:{:02}:00.000", i % 60),
            ) + "\n"
        })
        .collect();
    assert_eq!(post_events(&url, body.into_bytes()).unwrap().0, 200);
    server.wait_settled(Duration::from_secs(90));
    let dsn = format!("postgres://analyst@{pg}/lambdaflow");

    // psql's \d lists the views; \d VIEW its columns and types.
    let listing = psql(&dsn, "\\d").expect("\\d works");
    for v in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
        assert!(listing.contains(v), "\\d must list {v}:\n{listing}");
    }
    let columns = psql(&dsn, "\\d sales_by_zipcode").expect("\\d VIEW works");
    for c in ["zipcode\tbigint", "orders\tbigint", "revenue\tbigint"] {
        assert!(
            columns.contains(c),
            "\\d sales_by_zipcode must show {c}:\n{columns}"
        );
    }

    // Each view over psql equals the HTTP API's answer.
    let views = get_json(&format!("{url}/v1/views"));
    for v in views["views"].as_array().unwrap() {
        let sql = format!("SELECT * FROM {}", v["name"].as_str().unwrap());
        let over_pg = lines(&psql(&dsn, &sql).expect("a view reads over psql"));
        let over_http = http_lines(&post_sql(&url, &sql));
        assert!(!over_http.is_empty(), "{sql} has rows");
        assert_same(&over_pg, &over_http, &sql);
    }

    // The driver: a prepared statement with a parameter is a point read,
    // and equals GET /v1/views/{name}?zipcode=…; the status counts it.
    let before = server.status()["pg"]["point_reads"].as_u64().unwrap();
    let lookup = "SELECT * FROM sales_by_zipcode WHERE zipcode = %s";
    let steps: Vec<Value> = [10_000, 10_050, 99_999]
        .iter()
        .map(|z| json!({ "sql": lookup, "params": [z], "prepare": true }))
        .collect();
    let got = driver(&dsn, Value::Array(steps));
    for (z, r) in [10_000, 10_050, 99_999].iter().zip(&got) {
        let http = get_json(&format!("{url}/v1/views/sales_by_zipcode?zipcode={z}"));
        let want: Vec<Vec<Value>> = http["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                vec![
                    r["zipcode"].clone(),
                    r["orders"].clone(),
                    r["revenue"].clone(),
                ]
            })
            .collect();
        assert_eq!(r["rows"], json!(want), "zipcode {z}: {r}");
    }
    let after = server.status()["pg"]["point_reads"].as_u64().unwrap();
    assert_eq!(
        after - before,
        3,
        "the three lookups must go through the point-read path, not a scan"
    );

    // A timestamp key from a driver (a datetime parameter) finds its
    // minute, as `?minute=` does.
    let per_minute = get_json(&format!("{url}/v1/views/sales_per_minute?limit=1"));
    let minute = per_minute["rows"][0]["minute"]
        .as_str()
        .expect("sales_per_minute has a row")
        .to_string();
    let http = get_json(&format!(
        "{url}/v1/views/sales_per_minute?minute={minute}&limit=1000"
    ));
    let orders = |rows: &[i64]| rows.iter().sum::<i64>();
    let want: Vec<i64> = http["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["orders"].as_i64().unwrap())
        .collect();
    let got = driver(
        &dsn,
        json!([{ "sql": "SELECT orders FROM sales_per_minute WHERE minute = %s", "params": [{ "timestamp": minute }], "prepare": true }]),
    );
    let got: Vec<i64> = got[0]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("the lookup by minute runs: {}", got[0]))
        .iter()
        .map(|r| r[0].as_i64().unwrap())
        .collect();
    assert!(!want.is_empty(), "minute {minute} has rows over HTTP");
    assert_eq!(
        (got.len(), orders(&got)),
        (want.len(), orders(&want)),
        "a prepared lookup by minute {minute} with a datetime parameter finds the minute's rows, as GET ?minute= does"
    );

    // Other statements with parameters run as queries.
    let got = driver(
        &dsn,
        json!([{ "sql": "SELECT ProductName, orders FROM sales_by_product WHERE orders > %s ORDER BY ProductName", "params": [0] }]),
    );
    assert_eq!(got[0]["rows"].as_array().unwrap().len(), 7, "{}", got[0]);

    // DDL and DML are refused, with a SQLSTATE and the HTTP API's message.
    let refused = driver(
        &dsn,
        json!([
            { "sql": "CREATE TABLE t (a int)" },
            { "sql": "DROP VIEW sales_by_product" },
            { "sql": "SELECT * FROM no_such_view" },
        ]),
    );
    assert_eq!(refused[0]["error"]["sqlstate"], "25006", "{}", refused[0]);
    assert!(
        refused[0]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("only queries are allowed here"),
        "{}",
        refused[0]
    );
    assert_eq!(
        refused[0]["error"]["hint"],
        "views are read-only; send one SELECT (or WITH … SELECT)"
    );
    assert!(refused[1]["error"].is_object(), "{}", refused[1]);
    assert_eq!(refused[2]["error"]["sqlstate"], "42P01", "{}", refused[2]);
    let psql_refusal = psql(&dsn, "INSERT INTO sales_by_product VALUES ('x', 1, 1)").unwrap_err();
    assert!(
        psql_refusal.contains("only queries are allowed here"),
        "{psql_refusal}"
    );

    // The queries Grafana and Metabase send on connect, both protocols.
    let queries = introspection();
    assert!(queries.len() >= 10, "{} fixture queries", queries.len());
    for q in &queries {
        if let Err(e) = psql(&dsn, q) {
            panic!("psql could not run a client's introspection query:\n{q}\n{e}");
        }
    }
    let steps: Vec<Value> = queries.iter().map(|q| json!({ "sql": q })).collect();
    for (q, r) in queries.iter().zip(driver(&dsn, Value::Array(steps))) {
        assert!(r["error"].is_null(), "psycopg could not run:\n{q}\n{r}");
    }
    let grafana_tables = psql(&dsn, &queries[0]).unwrap();
    assert!(
        grafana_tables.contains("sales_per_minute"),
        "{grafana_tables}"
    );
    let grafana_columns = psql(&dsn, &queries[1]).unwrap();
    assert!(
        grafana_columns.contains("zipcode") && grafana_columns.contains("revenue"),
        "{grafana_columns}"
    );
    let metabase_tables = queries
        .iter()
        .find(|q| q.contains("estimated_row_count"))
        .unwrap();
    let listed = psql(&dsn, metabase_tables).unwrap();
    assert!(listed.contains("sales_by_product\tVIEW"), "{listed}");
}

#[test]
fn tokens_are_the_password_and_tls_is_required_when_configured() {
    const QUERY: &str = "pg-query-token-41d9c2";
    const INGEST: &str = "pg-ingest-token-7ab3e0";
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::test_certificates(tmp.path());
    let (_site, server, pg) = serve_with_pg(&format!(
        "tls = {{ cert = {:?}, key = {:?} }}\n[auth]\ntokens = [{{ token = \"{QUERY}\", scopes = [\"query\"] }}, {{ token = \"{INGEST}\", scopes = [\"ingest\"] }}]\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    let _ = server;
    let ca = ca.display().to_string();
    let dsn = |password: &str, ssl: &str| {
        format!(
            "postgres://anyone:{password}@localhost:{}/lambdaflow?sslmode={ssl}&sslrootcert={ca}",
            pg.rsplit(':').next().unwrap()
        )
    };

    // The query token over TLS, the certificate verified.
    let ok = psql(
        &dsn(QUERY, "verify-full"),
        "SELECT count(*) FROM sales_by_product",
    )
    .expect("the query token logs in over TLS");
    assert_eq!(ok.trim(), "0");
    let got = driver(
        &dsn(QUERY, "verify-full"),
        json!([{ "sql": "SELECT 1 AS one" }]),
    );
    assert_eq!(got[0]["rows"], json!([[1]]));

    // A wrong token, a token without the query scope, no TLS.
    let bad = driver(&dsn("not-a-token", "require"), json!([]));
    assert!(
        bad[0]["connect_error"]["text"]
            .as_str()
            .unwrap()
            .contains("the access token is not valid"),
        "{bad:?}"
    );
    let ingest_only = driver(&dsn(INGEST, "require"), json!([]));
    assert!(
        ingest_only[0]["connect_error"]["text"]
            .as_str()
            .unwrap()
            .contains("does not have the `query` scope"),
        "{ingest_only:?}"
    );
    let plain = psql(&dsn(QUERY, "disable"), "SELECT 1").unwrap_err();
    assert!(plain.contains("this endpoint requires TLS"), "{plain}");
    let status = server.status_with_token(QUERY);
    assert!(
        status["pg"]["denied"].as_u64().unwrap() >= 3,
        "{}",
        status["pg"]
    );
}
