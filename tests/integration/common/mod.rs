//! Helpers shared by the end-to-end tests: a real `lambdaflow serve` child
//! process on a temporary data directory, and small HTTP helpers.
#![allow(dead_code)]

pub mod exact;
pub mod kafka_proxy;
pub mod kinesis_proxy;
pub mod s3_proxy;
pub mod states;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_lambdaflow");

/// A data directory and the config file that points at it.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data: PathBuf,
    /// Set for every `serve` of the site (an S3 root's endpoint, say).
    pub env: Vec<(String, String)>,
    /// The storage root, when it is not the local `data` (an S3 root).
    pub storage: Option<lambdaflow::storage::Storage>,
}

impl Site {
    pub fn new(extra_config: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = dir.path().join("lambdaflow.toml");
        std::fs::write(
            &config,
            format!(
                "data = {:?}\nlisten = \"127.0.0.1:0\"\n{extra_config}",
                data.display().to_string()
            ),
        )
        .unwrap();
        Site {
            dir,
            config,
            data,
            env: Vec::new(),
            storage: None,
        }
    }

    /// A node on an object-store root (`s3://bucket/prefix`), its local
    /// files in a temporary directory; `env` configures the store.
    /// `extra_config` may hold a `[stream]` table, which gets the `dir` key.
    pub fn remote(
        root: &str,
        storage: lambdaflow::storage::Storage,
        env: Vec<(String, String)>,
        extra_config: &str,
    ) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        let config = dir.path().join("lambdaflow.toml");
        let stream_dir = format!("dir = {:?}\n", local.display().to_string());
        let extra = if extra_config.contains("[stream]\n") {
            extra_config.replacen("[stream]\n", &format!("[stream]\n{stream_dir}"), 1)
        } else {
            format!("{extra_config}[stream]\n{stream_dir}")
        };
        std::fs::write(
            &config,
            format!("data = {root:?}\nlisten = \"127.0.0.1:0\"\n{extra}"),
        )
        .unwrap();
        Site {
            dir,
            config,
            data: local,
            env,
            storage: Some(storage),
        }
    }

    /// Starts `serve`; `env` sets variables such as failpoints.
    pub fn serve(&self, env: &[(&str, &str)]) -> Server {
        self.serve_logging(env, None)
    }

    /// Starts `serve` with its log (stderr) in `log`, if given.
    pub fn serve_logging(&self, env: &[(&str, &str)], log: Option<&Path>) -> Server {
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::inherit(),
        };
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            env.push(("RUST_LOG", "warn"));
        }
        self.try_serve(&env, stderr)
            .unwrap_or_else(|status| panic!("serve must print its address, exited with {status}"))
    }

    /// Starts `serve`, or says how it ended if it exited before listening
    /// (at a failpoint during startup, say).
    pub fn try_serve(
        &self,
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Result<Server, std::process::ExitStatus> {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("lambdaflow serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        match line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        {
            Some(url) => Ok(Server {
                child,
                url: url.replace("0.0.0.0", "127.0.0.1"),
            }),
            None => Err(child.wait().unwrap()),
        }
    }
}

pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// SIGTERM; the process must exit cleanly.
    pub fn stop(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "serve must exit cleanly on SIGTERM, got {status}"
        );
    }

    /// Waits for the process to die by itself (e.g. at a failpoint).
    pub fn wait_for_crash(mut self, within: Duration) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    !status.success(),
                    "expected a crash, the server exited with {status}"
                );
                return;
            }
            assert!(
                t.elapsed() < within,
                "the server did not crash within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> Value {
        get_json(&format!("{}/v1/status", self.url))
    }

    /// `/v1/status` of a server that wants a token.
    pub fn status_with_token(&self, token: &str) -> Value {
        rt().block_on(async {
            reqwest::Client::new()
                .get(format!("{}/v1/status", self.url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }

    /// Peak resident memory of the server process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc_status("VmHWM:")
    }

    /// Resident memory of the server process now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        self.proc_status("VmRSS:")
    }

    fn proc_status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"))
            * 1024
    }

    /// Waits until every partition is archived and published up to its log end.
    pub fn wait_settled(&self, within: Duration) -> Value {
        let t = Instant::now();
        loop {
            let s = self.status();
            let parts = s["partitions"].as_array().unwrap();
            let settled = parts.iter().all(|p| {
                // The embedded log's end, or an external stream's.
                let end = if p["end"].is_null() {
                    &p["stream_end"]
                } else {
                    &p["end"]
                };
                p["archived"] == *end && p["published"] == *end
            });
            if settled {
                return s;
            }
            assert!(t.elapsed() < within, "not settled within {within:?}: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A batch of the paper's events: (zipcode, product, price, timestamp in ms).
pub fn paper_batch<S: AsRef<str>>(
    rows: impl IntoIterator<Item = (i64, S, i64, i64)>,
) -> arrow::record_batch::RecordBatch {
    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use std::sync::Arc;
    let (mut z, mut n, mut p, mut t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (zip, name, price, ts) in rows {
        z.push(zip);
        n.push(name.as_ref().to_string());
        p.push(price);
        t.push(ts);
    }
    arrow::record_batch::RecordBatch::try_new(
        lambdaflow::schema::EventSchema::paper().arrow().clone(),
        vec![
            Arc::new(Int64Array::from(z)),
            Arc::new(StringArray::from(n)),
            Arc::new(Int64Array::from(p)),
            Arc::new(TimestampMillisecondArray::from(t)),
        ],
    )
    .expect("the paper's schema")
}

/// A free TCP port on 127.0.0.1 (for a server a test starts).
/// A test CA, and a certificate for localhost and 127.0.0.1 signed by it,
/// made by openssl in `dir`: (CA, certificate, key) PEM files.
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl makes the test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=lambdaflow test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "cert.pem",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `addr`; `what` names it (and how to
/// get it) if nothing does within `within`.
pub fn wait_listening(addr: &str, within: Duration, what: &str) {
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < within,
            "{what} did not listen on {addr} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn get_text(url: &str) -> String {
    rt().block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

pub fn get_json(url: &str) -> Value {
    rt().block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

/// A GET's status and body text.
pub fn get_status(url: &str) -> (u16, String) {
    rt().block_on(async {
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// [`get_json`], or `None` if the server does not answer (it died).
pub fn get_json_opt(url: &str) -> Option<Value> {
    rt().block_on(async { reqwest::get(url).await.ok()?.json().await.ok() })
}

/// POSTs an NDJSON body: `Ok((status, reply))`, or `Err` if the server is unreachable.
pub fn post_events(url: &str, body: Vec<u8>) -> Result<(u16, Value), String> {
    rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/events"))
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let json = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, json))
    })
}

/// `POST /v1/events` as producer `producer`'s request `seq` (issue 34).
pub fn post_events_as(
    url: &str,
    body: Vec<u8>,
    producer: &str,
    seq: &str,
) -> Result<(u16, Value), String> {
    rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/events"))
            .header("Lambdaflow-Producer", producer)
            .header("Lambdaflow-Sequence", seq)
            .body(body)
            .timeout(std::time::Duration::from_secs(20))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        Ok((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
    })
}

/// Of a view answer: the sum of its `orders` column, and the number of
/// events its freshness says it covers (the sum of its realtime offsets).
pub fn orders_and_covered(answer: &Value) -> (u64, u64) {
    let orders = answer["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["orders"].as_u64().expect("orders"))
        .sum();
    let covered = answer["freshness"]["realtime"]
        .as_array()
        .expect("freshness.realtime")
        .iter()
        .map(|x| x.as_u64().expect("an offset"))
        .sum();
    (orders, covered)
}

/// Orders counted by the paper's `sales_by_product` (batch ⊕ realtime).
pub fn orders(url: &str) -> u64 {
    orders_and_covered(&get_json(&format!("{url}/v1/views/sales_by_product"))).0
}

/// The seed of a run with faults at random: the variable `var`, or new
/// each run; printed, so a failing run can be repeated.
pub fn fault_seed(var: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("fault seed {seed} ({var}={seed} repeats it)");
    seed
}

pub fn event(zip: i64, product: &str, price: i64, ts: &str) -> String {
    format!(r#"{{"zipcode":{zip},"ProductName":"{product}","price":{price},"timestamp":"{ts}"}}"#)
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Every row of the master dataset (read with the deltalake reader), as
/// (partition, offset) → event batch row, and the event columns as views read them.
pub fn master_events(
    data: &Path,
) -> (
    std::collections::BTreeMap<(u32, u64), i64>,
    Vec<arrow::array::RecordBatch>,
) {
    let uris: Vec<String> = rt().block_on(async {
        let url = deltalake::ensure_table_uri(data.join("master").to_str().unwrap()).unwrap();
        let table = deltalake::open_table(url)
            .await
            .expect("the master dataset is a Delta table");
        table.get_file_uris().unwrap().collect()
    });
    let files = uris.into_iter().map(|uri| {
        let path = url::Url::parse(&uri)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .unwrap_or_else(|| uri.clone().into());
        bytes::Bytes::from(std::fs::read(&path).unwrap())
    });
    events_of_files(files.collect())
}

/// [`master_events`] of a master dataset on an object store, its files
/// listed by the table's log.
pub fn master_events_in(
    storage: &lambdaflow::storage::Storage,
    partitions: u32,
) -> (
    std::collections::BTreeMap<(u32, u64), i64>,
    Vec<arrow::array::RecordBatch>,
) {
    let files = rt().block_on(async {
        let schema = std::sync::Arc::new(lambdaflow::schema::EventSchema::paper());
        let master = lambdaflow::master::MasterDataset::open(storage, schema, partitions)
            .await
            .expect("the master dataset opens");
        let snap = master.snapshot().await.unwrap();
        let mut files = Vec::new();
        for f in snap.files {
            files.push(storage.read_at(&f.location).await.unwrap());
        }
        files
    });
    events_of_files(files)
}

fn events_of_files(
    files: Vec<bytes::Bytes>,
) -> (
    std::collections::BTreeMap<(u32, u64), i64>,
    Vec<arrow::array::RecordBatch>,
) {
    use arrow::array::{AsArray, RecordBatch};
    use arrow::compute::cast;
    use arrow::datatypes::{DataType, Int32Type, Int64Type, TimeUnit};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let schema = lambdaflow::schema::EventSchema::paper();
    let mut rows = std::collections::BTreeMap::new();
    let mut events = Vec::new();
    for file in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let p = b
                .column_by_name("_partition")
                .unwrap()
                .as_primitive::<Int32Type>()
                .clone();
            let o = b
                .column_by_name("_offset")
                .unwrap()
                .as_primitive::<Int64Type>()
                .clone();
            let z = b
                .column_by_name("zipcode")
                .unwrap()
                .as_primitive::<Int64Type>()
                .clone();
            for i in 0..b.num_rows() {
                let key = (p.value(i) as u32, o.value(i) as u64);
                let prev = rows.insert(key, z.value(i));
                assert!(
                    prev.is_none(),
                    "event {key:?} is in the master dataset twice"
                );
            }
            let cols = schema
                .fields()
                .iter()
                .map(|f| {
                    let c = b.column_by_name(&f.name).unwrap();
                    match c.data_type() {
                        DataType::Timestamp(_, _) => {
                            cast(c, &DataType::Timestamp(TimeUnit::Millisecond, None)).unwrap()
                        }
                        _ => c.clone(),
                    }
                })
                .collect();
            events.push(RecordBatch::try_new(schema.arrow().clone(), cols).unwrap());
        }
    }
    (rows, events)
}
