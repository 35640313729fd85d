//! Security against a real `serve`: loopback unless tokens are configured,
//! bearer tokens with `ingest` and `query` scopes, tokens never in the logs,
//! read-only SQL without file access, and HTTPS with rustls.

use crate::common;

use std::process::Command;

use crate::common::{BIN, Site, event};
use serde_json::Value;

const INGEST: &str = "ingest-token-5f1c9e0a7b3d";
const QUERY: &str = "query-token-8e2d4c6a1f0b";
const BOTH: &str = "admin-token-3a9f7c1e5d2b";

fn request(method: &str, url: &str, token: Option<&str>, body: Option<String>) -> (u16, Value) {
    common::rt().block_on(async {
        let client = reqwest::Client::new();
        let mut r = match method {
            "GET" => client.get(url),
            _ => client.post(url),
        };
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        if status == 401 {
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer realm=\"lambdaflow\""),
                "a 401 names the scheme"
            );
        }
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
}

#[test]
fn a_non_loopback_address_without_tokens_refuses_to_start() {
    let site = Site::new("");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&site.config)
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "serve must refuse to listen on 0.0.0.0 without tokens"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("hint:"),
        "the refusal says why and what to do: {err}"
    );

    // A token that is too short is refused too, naming the key.
    let site = Site::new("[auth]\ntokens = [{ token = \"short\", scopes = [\"query\"] }]\n");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("auth.tokens[0]") && err.contains("at least 16"),
        "{err}"
    );
    assert!(!err.contains("short\""), "the token is not echoed: {err}");
}

#[test]
fn tokens_have_scopes_are_checked_and_never_logged() {
    let site = Site::new(&format!(
        "[auth]\ntokens = [\n  {{ env = \"LF_TEST_INGEST\", scopes = [\"ingest\"] }},\n  {{ token = \"{QUERY}\", scopes = [\"query\"] }},\n  {{ token = \"{BOTH}\", scopes = [\"ingest\", \"query\"] }},\n]\n"
    ));
    // Listening on every interface is allowed now that tokens exist.
    std::fs::write(
        &site.config,
        std::fs::read_to_string(&site.config)
            .unwrap()
            .replace("127.0.0.1:0", "0.0.0.0:0"),
    )
    .unwrap();
    let log = site.dir.path().join("serve.log");
    let server = site.serve_logging(
        &[("LF_TEST_INGEST", INGEST), ("RUST_LOG", "debug")],
        Some(&log),
    );
    let url = &server.url;
    let line = event(90210, "Laptop", 700, "2014-11-01 10:00:00.000") + "\n";

    // No token, a wrong token, a malformed header: 401.
    let (s, r) = request("GET", &format!("{url}/v1/views"), None, None);
    assert_eq!(s, 401, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("requires an access token")
    );
    let (s, _) = request(
        "GET",
        &format!("{url}/v1/status"),
        Some("not-a-token-at-all"),
        None,
    );
    assert_eq!(s, 401);
    let (s, _) = request(
        "POST",
        &format!("{url}/v1/events"),
        None,
        Some(line.clone()),
    );
    assert_eq!(s, 401, "ingest needs a token too");
    let (s, _) = request("GET", &format!("{url}/metrics"), Some(&INGEST[1..]), None);
    assert_eq!(s, 401, "a part of a token is no token");

    // Scopes: ingest writes, query reads, each refuses the other with 403.
    let (s, r) = request(
        "POST",
        &format!("{url}/v1/events"),
        Some(INGEST),
        Some(line.clone()),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["accepted"], 1);
    let (s, r) = request(
        "POST",
        &format!("{url}/v1/events"),
        Some(QUERY),
        Some(line.clone()),
    );
    assert_eq!(s, 403, "a query token cannot ingest: {r}");
    assert!(
        r["error"].as_str().unwrap().contains("`ingest` scope"),
        "{r}"
    );
    for path in [
        "/v1/views",
        "/v1/views/sales_by_product",
        "/v1/status",
        "/metrics",
    ] {
        let (s, r) = request("GET", &format!("{url}{path}"), Some(INGEST), None);
        assert_eq!(s, 403, "an ingest token cannot read {path}: {r}");
        let (s, r) = request("GET", &format!("{url}{path}"), Some(QUERY), None);
        assert_eq!(s, 200, "a query token reads {path}: {r}");
    }
    let (s, _) = request(
        "POST",
        &format!("{url}/v1/sql"),
        Some(INGEST),
        Some("SELECT 1".into()),
    );
    assert_eq!(s, 403, "SQL is a read");
    let (s, _) = request("POST", &format!("{url}/v1/batch/run"), Some(QUERY), None);
    assert_eq!(s, 403, "starting a batch run is a write");
    let (s, _) = request("POST", &format!("{url}/v1/batch/run"), Some(BOTH), None);
    assert_eq!(s, 202);
    let (s, _) = request("POST", &format!("{url}/v1/events"), Some(BOTH), Some(line));
    assert_eq!(s, 200);

    // The CLI sends LAMBDAFLOW_TOKEN.
    let out = Command::new(BIN)
        .args(["status", "--url", url])
        .env("LAMBDAFLOW_TOKEN", QUERY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status with a token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["status", "--url", url])
        .env_remove("LAMBDAFLOW_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success(), "status without a token fails");

    // SQL cannot reach files: no URL tables, no file-reading functions.
    for bad in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/lambdaflow-copy.csv'",
    ] {
        let (s, r) = request(
            "POST",
            &format!("{url}/v1/sql"),
            Some(QUERY),
            Some(bad.into()),
        );
        assert!(s == 400 || s == 403, "{bad} must be refused, got {s}: {r}");
        assert!(!r.to_string().contains("root:"), "{bad} leaked a file: {r}");
    }
    assert!(!std::path::Path::new("/tmp/lambdaflow-copy.csv").exists());
    server.stop();

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.len() > 100,
        "the debug log should have something in it"
    );
    for t in [INGEST, QUERY, BOTH] {
        assert!(!logged.contains(t), "a token appeared in the server's log");
    }
}

#[test]
fn https_with_a_pem_certificate() {
    let site = Site::new("");
    let dir = site.dir.path();
    let (ca, cert, key) = common::test_certificates(dir);
    let mut config = std::fs::read_to_string(&site.config).unwrap();
    config.push_str(&format!(
        "[http]\nheader_timeout = \"1s\"\ntls = {{ cert = {:?}, key = {:?} }}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    std::fs::write(&site.config, config).unwrap();
    let server = site.serve(&[]);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let https = server.url.replace("127.0.0.1", "localhost");

    let pem = std::fs::read(&ca).unwrap();
    let (status, alpn_h2, plain) = common::rt().block_on(async {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        let body = event(1, "Laptop", 5, "2014-11-01 10:00:00.000");
        let r = client
            .post(format!("{https}/v1/events"))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let h2 = r.version() == reqwest::Version::HTTP_2;
        // Plain HTTP to the TLS port gets no answer, and trips nothing.
        let plain = reqwest::get(server.url.replace("https://", "http://") + "/v1/status")
            .await
            .is_ok();
        (status, h2, plain)
    });
    assert_eq!(status, 200, "ingest over HTTPS");
    assert!(alpn_h2, "HTTP/2 is negotiated over TLS");
    assert!(!plain, "plain HTTP to the TLS listener must fail");
    // An untrusted client refuses the self-signed certificate.
    let untrusted =
        common::rt().block_on(async { reqwest::get(format!("{https}/v1/status")).await.is_ok() });
    assert!(!untrusted);
    // The CLI trusts it through LAMBDAFLOW_CA_CERT.
    let out = Command::new(BIN)
        .args(["status", "--url", &https])
        .env("LAMBDAFLOW_CA_CERT", &ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A TLS client that completes its handshake and then sends nothing is
    // closed by the first-request deadline (http.header_timeout, 1 s here).
    let mut idle = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(server.url.trim_start_matches("https://"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let closed = loop {
        if idle.try_wait().unwrap().is_some() {
            break true;
        }
        if t.elapsed() > std::time::Duration::from_secs(8) {
            let _ = idle.kill();
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        closed,
        "an idle TLS connection must be closed by the server (still open after 8 s)"
    );
    eprintln!("idle TLS connection closed after {:?}", t.elapsed());
    server.stop();
}
