//! The batch layer on a real Ballista cluster: a scheduler and two executors
//! (`lambdaflow ballista scheduler|executor`, Ballista's own code) as child
//! processes on 127.0.0.1. The states it publishes must be the local
//! engine's; the oracle must hold with it as the batch engine; a killed
//! executor is Ballista's to retry; a scheduler that is down is a health
//! problem that leaves the published views as they were.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lambdaflow::batch::{BatchLayer, Manifest};
use lambdaflow::config::Config;

use crate::common::states::{
    Lcg, Side, assert_same_runs, compared_views, config, open, random_master,
};
use crate::common::{self, BIN, Site, free_port, wait_listening};

/// A Ballista run `b` of `dist` publishes what the local engine's run `a`
/// of `local` does.
async fn assert_ballista_is_local(
    local: &BatchLayer,
    a: &Manifest,
    dist: &BatchLayer,
    b: &Manifest,
    ordered: &BTreeMap<String, bool>,
    case: &str,
) {
    let local = Side {
        layer: local,
        run: a,
        name: "the local engine",
    };
    let dist = Side {
        layer: dist,
        run: b,
        name: "Ballista",
    };
    assert_same_runs(local, dist, ordered, case).await;
}

/// A Ballista cluster of child processes; all are killed on drop.
pub(crate) struct Cluster {
    /// `df://127.0.0.1:<port>`, for `[batch] scheduler`.
    pub(crate) url: String,
    port: u16,
    scheduler: Option<Child>,
    executors: Vec<Option<Child>>,
    /// The executors' environment (an S3 endpoint and credentials).
    env: Vec<(String, String)>,
    pub(crate) dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start(executors: usize) -> Cluster {
        Cluster::start_with_env(executors, Vec::new())
    }

    pub(crate) fn start_with_env(executors: usize, env: Vec<(String, String)>) -> Cluster {
        let port = free_port();
        let mut c = Cluster {
            url: format!("df://127.0.0.1:{port}"),
            port,
            scheduler: None,
            executors: Vec::new(),
            env,
            dir: tempfile::tempdir().unwrap(),
        };
        c.start_scheduler();
        for i in 0..executors {
            let child = c.spawn_executor(i);
            c.executors.push(Some(child));
        }
        c
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .unwrap()
    }

    pub(crate) fn start_scheduler(&mut self) {
        let child = Command::new(BIN)
            .args(["ballista", "scheduler", "--bind"])
            .arg(format!("127.0.0.1:{}", self.port))
            // Executors heartbeat every second: one silent for 3 s is dead.
            .args(["--executor-timeout", "3s"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(self.log("scheduler.log"))
            .stderr(self.log("scheduler.log"))
            .spawn()
            .unwrap();
        self.scheduler = Some(child);
        wait_listening(
            &format!("127.0.0.1:{}", self.port),
            Duration::from_secs(30),
            "the Ballista scheduler (lambdaflow ballista scheduler)",
        );
    }

    fn spawn_executor(&self, i: usize) -> Child {
        let flight = free_port();
        let grpc = free_port();
        let work = self.dir.path().join(format!("executor-{i}"));
        std::fs::create_dir_all(&work).unwrap();
        let child = Command::new(BIN)
            .args(["ballista", "executor", "--scheduler", &self.url, "--bind"])
            .arg(format!("127.0.0.1:{flight}"))
            .args(["--grpc-port", &grpc.to_string()])
            .args(["--concurrent-tasks", "2", "--heartbeat", "1s", "--work-dir"])
            .arg(&work)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdout(self.log(&format!("executor-{i}.log")))
            .stderr(self.log(&format!("executor-{i}.log")))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(
            &format!("127.0.0.1:{flight}"),
            Duration::from_secs(30),
            "a Ballista executor (lambdaflow ballista executor)",
        );
        child
    }

    pub(crate) fn kill_executor(&mut self, i: usize) {
        if let Some(mut c) = self.executors[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn kill_scheduler(&mut self) {
        if let Some(mut c) = self.scheduler.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A whole new cluster on the same scheduler address (executors of the
    /// old scheduler do not re-register with a new one).
    pub(crate) fn restart(&mut self) {
        self.kill_scheduler();
        for i in 0..self.executors.len() {
            self.kill_executor(i);
        }
        self.start_scheduler();
        for i in 0..self.executors.len() {
            let child = self.spawn_executor(i);
            self.executors[i] = Some(child);
        }
    }

    pub(crate) fn scheduler_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scheduler.log")).unwrap_or_default()
    }

    /// Jobs the scheduler accepted so far.
    pub(crate) fn jobs(&self) -> usize {
        self.scheduler_log()
            .matches("Submitting execution graph")
            .count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_scheduler();
        for i in 0..self.executors.len() {
            self.kill_executor(i);
        }
        if std::thread::panicking() {
            // The cluster's side of a failure.
            for f in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
                if f.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("--- {} (last lines)", f.path().display());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

#[test]
fn ballista_publishes_the_local_engines_states_for_every_view() {
    let cluster = Cluster::start(2);
    // `inverse` fails on the events of price 0: the cluster's job fails,
    // and the rows are found and left out as the local engine leaves them out.
    let (defs, ordered) = compared_views(Vec::new());
    common::rt().block_on(async {
        for seed in [1u64, 7, 42] {
            let dir = tempfile::tempdir().unwrap();
            let mut rng = Lcg(seed);
            let local = open(&config(dir.path(), &defs, None)).await;
            let n = 1500 + rng.below(1500) as usize;
            random_master(&local, &mut rng, n).await;
            let a = local.run(None).await.unwrap();
            let jobs = cluster.jobs();
            let dist = open(&config(dir.path(), &defs, Some(&cluster.url))).await;
            let b = dist.rebuild(None, None).await.unwrap();
            assert_eq!(b.compute.engine, "ballista", "the second run is Ballista's");
            assert_eq!(
                cluster.jobs() - jobs,
                defs.len(),
                "one Ballista job per view"
            );
            assert!(
                b.compute
                    .stages
                    .iter()
                    .any(|s| s.stage.starts_with("stage ")),
                "the run records the cluster's stages: {:?}",
                b.compute.stages
            );
            let case = format!("seed {seed} ({} events)", a.events);
            assert!(
                a.views["inverse"].excluded > 0,
                "{case}: some events have price 0"
            );
            assert_ballista_is_local(&local, &a, &dist, &b, &ordered, &case).await;
        }
    });
}

#[test]
fn the_oracle_holds_with_ballista_as_the_batch_engine() {
    let cluster = Cluster::start(2);
    let site = Site::new(&format!(
        "{}engine = \"ballista\"\nscheduler = \"{}\"\n",
        crate::oracle::CONFIG,
        cluster.url
    ));
    crate::oracle::every_answer_is_exact_on(&site);
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.data.join("views/CURRENT")).unwrap()).unwrap();
    assert_eq!(
        current["compute"]["engine"], "ballista",
        "the published run was computed by the cluster: {current}"
    );
    assert!(cluster.jobs() >= 3, "the cluster ran the views' jobs");
}

#[test]
fn an_executor_killed_mid_run_is_retried_by_ballista_and_the_run_is_exact() {
    let mut cluster = Cluster::start(2);
    let defs = Config::default().views;
    common::rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Lcg(3);
        let local = open(&config(dir.path(), &defs, None)).await;
        // Enough events that each view's job runs for a while.
        random_master(&local, &mut rng, 240_000).await;
        let a = local.run(None).await.unwrap();
        let dist = open(&config(dir.path(), &defs, Some(&cluster.url))).await;
        let jobs = cluster.jobs();
        let run = tokio::spawn({
            let dist = dist.clone();
            async move { dist.rebuild(None, None).await }
        });
        // Kill an executor once the first job is on the cluster.
        let t = Instant::now();
        while cluster.jobs() == jobs {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no job was submitted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.kill_executor(0);
        let b = tokio::time::timeout(Duration::from_secs(180), run)
            .await
            .expect("the run ends")
            .unwrap()
            .unwrap_or_else(|e| {
                panic!(
                    "the run must survive a lost executor: {}",
                    lambdaflow::error::Report::of(&e)
                )
            });
        // Ballista saw the executor go while the run had tasks for it: it
        // removed it, and put what it was running elsewhere.
        let log = cluster.scheduler_log();
        assert!(
            log.contains("Removing executor"),
            "the kill must land while the run's jobs are on the cluster; scheduler log:\n{log}"
        );
        assert_ballista_is_local(&local, &a, &dist, &b, &BTreeMap::new(), "a lost executor").await;
    });
}

#[test]
fn a_scheduler_that_is_down_is_a_health_problem_and_the_views_stay_published() {
    let mut cluster = Cluster::start(2);
    let site = Site::new(&fast_on(&cluster.url));
    let server = site.serve(&[]);
    let url = server.url.clone();
    post_range(&url, 0..500);
    let published = wait_for(
        &url,
        Duration::from_secs(60),
        "a run of all 500 events",
        |s| s["batch"]["published"]["events"].as_u64() == Some(500),
    );
    assert_eq!(published["batch"]["engine"], "ballista");
    assert_eq!(published["batch"]["scheduler"], cluster.url.as_str());
    assert_eq!(
        published["batch"]["published"]["compute"]["engine"],
        "ballista"
    );
    let run = published["batch"]["published"]["run"].as_u64().unwrap();

    cluster.kill_scheduler();
    post_range(&url, 500..800);
    let down = wait_for(
        &url,
        Duration::from_secs(60),
        "a health problem naming the scheduler",
        |s| {
            s["health"]["problems"].as_array().is_some_and(|p| {
                p.iter().any(|x| {
                    x["component"] == "batch"
                        && x["error"]
                            .as_str()
                            .is_some_and(|e| e.contains(&cluster.url))
                })
            })
        },
    );
    // A run that had its states before the kill may still have published;
    // from the first failure on, nothing is.
    let stuck = down["batch"]["published"]["run"].as_u64().unwrap();
    assert!(stuck <= run + 1, "at most the run in flight published");
    std::thread::sleep(Duration::from_secs(2));
    let later = common::get_json(&format!("{url}/v1/status"));
    assert_eq!(
        later["batch"]["published"]["run"].as_u64(),
        Some(stuck),
        "nothing is published while the scheduler is down: {later}"
    );
    assert!(
        later["health"]["problems"]
            .to_string()
            .contains(&cluster.url),
        "the problem stays while the scheduler is down: {}",
        later["health"]
    );
    // The views still answer exactly: the speed layer covers what the batch
    // layer has not reached.
    for answer in crate::oracle::settled_answers(&url) {
        assert_eq!(answer.run, Some(stuck), "served from the published run");
    }
    let (orders, _) = common::orders_and_covered(&common::get_json(&format!(
        "{url}/v1/views/sales_by_product"
    )));
    assert_eq!(orders, 800, "every event is counted, none twice");

    cluster.restart();
    let back = wait_for(
        &url,
        Duration::from_secs(90),
        "a run of all 800 events after the scheduler came back",
        |s| s["batch"]["published"]["events"].as_u64() == Some(800),
    );
    assert!(
        back["health"]["problems"]
            .as_array()
            .is_some_and(|p| p.iter().all(|x| x["component"] != "batch")),
        "the problem clears when a run succeeds: {}",
        back["health"]
    );
    server.stop();
}

/// Short chunks and batch pauses, the batch layer on `scheduler`.
fn fast_on(scheduler: &str) -> String {
    format!(
        "[archive]\nchunk_age = \"200ms\"\n[batch]\npause = \"300ms\"\nengine = \"ballista\"\nscheduler = \"{scheduler}\"\n"
    )
}

/// Sends the oracle's events `range` (the same events for the same range).
fn post_range(url: &str, range: std::ops::Range<i64>) {
    let events: Vec<_> = range.map(crate::oracle::make).collect();
    common::post_events(url, crate::oracle::ndjson(&events)).unwrap();
}

fn wait_for(
    url: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = common::get_json(&format!("{url}/v1/status"));
        if ok(&s) {
            return s;
        }
        assert!(
            t.elapsed() < within,
            "no {what} within {within:?}; status: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn executors_read_a_master_dataset_on_s3() {
    let moto = crate::s3::Moto::start();
    let root = moto.bucket("ballista");
    // The executors reach S3 as the paper's EMR nodes do: from their own
    // AWS environment.
    let cluster = Cluster::start_with_env(2, moto.env());
    let site = moto.site(&root, &fast_on(&cluster.url));
    let server = site.serve(&[]);
    let url = server.url.clone();
    post_range(&url, 0..700);
    let s = wait_for(
        &url,
        Duration::from_secs(90),
        "a Ballista run of all 700 events on S3",
        |s| {
            s["batch"]["published"]["events"].as_u64() == Some(700)
                && s["batch"]["published"]["compute"]["engine"] == "ballista"
        },
    );
    assert!(
        s["cluster"]["root"]
            .as_str()
            .is_some_and(|r| r.starts_with("s3://")),
        "{s}"
    );
    // Every event in the published run, each once: the batch side alone
    // (nothing is left for the speed layer) holds all 700.
    let answer = common::get_json(&format!("{url}/v1/views/sales_by_product"));
    let rows = answer["rows"].as_array().unwrap();
    let orders: u64 = rows.iter().map(|r| r["orders"].as_u64().unwrap()).sum();
    let revenue: i64 = rows.iter().map(|r| r["revenue"].as_i64().unwrap()).sum();
    let want: i64 = (0..700).map(|k| crate::oracle::make(k).price).sum();
    assert_eq!((orders, revenue), (700, want), "{answer}");
    assert_eq!(
        answer["freshness"]["run"].as_u64(),
        s["batch"]["published"]["run"].as_u64()
    );
    server.stop();
}

#[test]
fn a_repair_needed_before_serving_is_computed_here_when_the_scheduler_is_down() {
    let site = Site::new("[archive]\nchunk_age = \"200ms\"\n[batch]\npause = \"300ms\"\n");
    let server = site.serve(&[]);
    post_range(&server.url, 0..400);
    wait_for(
        &server.url,
        Duration::from_secs(60),
        "a run of all 400 events",
        |s| s["batch"]["published"]["events"].as_u64() == Some(400),
    );
    server.stop();
    // Damage a published states file, and point the node at a scheduler
    // that is not there.
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.data.join("views/CURRENT")).unwrap()).unwrap();
    let path = site.data.join(
        current["views"]["sales_by_product"]["states"]["path"]
            .as_str()
            .unwrap(),
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let nowhere = format!("df://127.0.0.1:{}", free_port());
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        config.replace(
            "pause = \"300ms\"\n",
            &format!("pause = \"300ms\"\nengine = \"ballista\"\nscheduler = \"{nowhere}\"\n"),
        ),
    )
    .unwrap();

    // The node starts and serves: the repair ran here, and health says why.
    let server = site.serve(&[]);
    let s = server.status();
    let recovered = s["health"]["recovered"].to_string();
    assert!(
        recovered.contains("computed with the local engine before serving")
            && recovered.contains(&nowhere),
        "status names the fallback and its reason: {s}"
    );
    assert_eq!(s["batch"]["published"]["compute"]["engine"], "local", "{s}");
    let (orders, _) = common::orders_and_covered(&common::get_json(&format!(
        "{}/v1/views/sales_by_product",
        server.url
    )));
    assert_eq!(orders, 400, "every event counted once after the repair");
    // Later runs are the cluster's: while it is down, a health problem.
    post_range(&server.url, 400..500);
    wait_for(
        &server.url,
        Duration::from_secs(30),
        "a batch problem naming the scheduler",
        |s| s["health"]["problems"].to_string().contains(&nowhere),
    );
    server.stop();
}
