//! Views changed on a cluster: two nodes on one Kafka topic (tansu) and one
//! S3 root (moto). A view change is a cluster-wide fact: every node serves
//! the published run's view definitions, a node started while a change
//! builds starts, a new driver builds what `views/CHANGES.json` says; and
//! `DELETE` sees a change that is still waiting.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, Server, Site};
use crate::kafka::Tansu;
use crate::live_views::{request, wait_published};
use crate::oracle::{Sent, make};
use crate::s3::Moto;

/// `sales_by_product` with a column more: the changed view.
const CHANGED: &str = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue, max(price) AS top FROM events GROUP BY ProductName";

/// Moto, tansu with a topic of two partitions, and two sites on one root.
struct Cluster {
    _moto: Moto,
    tansu: Tansu,
    sites: Vec<Site>,
    sent: i64,
}

impl Cluster {
    fn start() -> Cluster {
        let moto = Moto::start();
        let root = moto.bucket("views");
        let tansu = Tansu::start();
        tansu.create_topic("events", 2);
        let config = crate::s3::cluster_config(&tansu.brokers);
        let sites = (0..2).map(|_| moto.site(&root, &config)).collect();
        Cluster {
            _moto: moto,
            tansu,
            sites,
            sent: 0,
        }
    }

    /// Produces `n` events into the topic; the last offset of each partition.
    fn produce(&mut self, n: i64) -> BTreeMap<u32, u64> {
        let producer =
            lambdaflow::stream::kafka::KafkaProducer::new(&self.tansu.config("events")).unwrap();
        let mut last = BTreeMap::new();
        for p in 0..2u32 {
            let events: Vec<Sent> = (0..n / 2).map(|i| make(self.sent + i)).collect();
            self.sent += n / 2;
            let offsets = crate::kafka::send(&producer, p, &events, &[]);
            last.insert(p, *offsets.last().unwrap());
        }
        last
    }
}

/// The published run `server` serves `sales_by_product` from, and whether
/// its rows have the changed view's column `top`.
fn served(server: &Server) -> (Option<u64>, bool) {
    let a = common::get_json(&format!("{}/v1/views/sales_by_product", server.url));
    (
        a["freshness"]["run"].as_u64(),
        a["rows"][0].get("top").is_some(),
    )
}

/// Waits until `server` serves the changed `sales_by_product` (with `top`).
fn wait_changed(server: &Server, within: Duration, what: &str) {
    let t = Instant::now();
    loop {
        if served(server).1 {
            return;
        }
        assert!(
            t.elapsed() < within,
            "{what}: {} does not serve the changed view within {within:?}; status: {}",
            server.url,
            server.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn problem(server: &Server, component: &str) -> Option<String> {
    server.status()["health"]["problems"]
        .as_array()?
        .iter()
        .find(|p| p["component"] == component)
        .map(|p| p["error"].to_string())
}

/// The definitions `views/CURRENT` publishes, by name.
fn published_sql(site: &Site) -> BTreeMap<String, String> {
    let storage = site.storage.as_ref().unwrap();
    let bytes = common::rt()
        .block_on(storage.get("views/CURRENT"))
        .unwrap()
        .expect("a published run");
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    m["definitions"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|v| {
                    (
                        v["name"].as_str().unwrap().to_string(),
                        v["sql"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Node 0 drives, with `env`, and has published a run of some events.
fn driving(cluster: &mut Cluster, env: &[(&str, &str)]) -> Server {
    let a = cluster.sites[0].serve(env);
    let last = cluster.produce(200);
    crate::kafka::wait_settled(&a, &last, Duration::from_secs(60));
    assert_eq!(
        a.status()["cluster"]["lease"]["held"],
        true,
        "the first node drives"
    );
    a
}

fn post_change(driver: &Server) {
    let (status, reply) = request(
        "POST",
        &format!("{}/v1/views", driver.url),
        Some(json!({ "name": "sales_by_product", "sql": CHANGED })),
    );
    assert_eq!(status, 202, "the change is accepted: {reply}");
}

/// 2a: a node started while a change builds on the driver starts (it
/// serves the published run's definition until the change is published),
/// then serves the change.
#[test]
fn a_node_started_while_a_view_change_builds_starts_and_serves_the_published_views() {
    let mut cluster = Cluster::start();
    let a = driving(
        &mut cluster,
        &[("LAMBDAFLOW_FAILPOINTS", "views-building=sleep:6000")],
    );
    post_change(&a);
    std::thread::sleep(Duration::from_millis(500));
    let b = cluster.sites[1]
        .try_serve(&[("RUST_LOG", "warn")], std::process::Stdio::inherit())
        .unwrap_or_else(|status| {
            panic!("a node started while a view change builds must start (it follows the published run), exited with {status}")
        });
    assert_eq!(
        b.status()["cluster"]["lease"]["held"],
        false,
        "the second node follows"
    );
    assert!(
        !served(&b).1,
        "until the change is published, a follower serves the published definition"
    );
    wait_published(&a.url, Duration::from_secs(60));
    wait_changed(&b, Duration::from_secs(30), "once published");
    assert_eq!(problem(&b, "follow"), None, "the follower follows");
}

/// 2b: after a change is published, every node serves the new run with the
/// new definition (a follower does not stay on the old run).
#[test]
fn a_follower_adopts_the_views_the_driver_publishes() {
    let mut cluster = Cluster::start();
    let a = driving(&mut cluster, &[]);
    let b = cluster.sites[1].serve(&[]);
    let before = served(&b);
    assert!(!before.1, "the config's view to begin with");
    post_change(&a);
    wait_published(&a.url, Duration::from_secs(60));
    wait_changed(&b, Duration::from_secs(30), "after the publish");
    // And it keeps following: the next runs too.
    let last = cluster.produce(200);
    crate::kafka::wait_settled(&b, &last, Duration::from_secs(60));
    let (run_a, _) = served(&a);
    let (run_b, changed) = served(&b);
    assert!(changed, "the follower serves the changed view");
    assert!(
        run_b >= before.0 && run_a.is_some() && run_b.is_some(),
        "the follower follows the driver's runs: {run_b:?} vs {run_a:?}"
    );
    assert_eq!(problem(&b, "follow"), None, "no `follow` problem");
    let (orders, covered) = common::orders_and_covered(&common::get_json(&format!(
        "{}/v1/views/sales_by_product?limit=100000",
        b.url
    )));
    assert_eq!(orders, covered, "the adopted view is exact on the follower");
}

/// 2c: the driver killed while a change builds: the follower takes over
/// and builds the change saved in `views/CHANGES.json`, not the config's
/// old SQL.
#[test]
fn a_new_driver_builds_the_saved_view_changes_instead_of_reverting_them() {
    let mut cluster = Cluster::start();
    let a = driving(
        &mut cluster,
        &[("LAMBDAFLOW_FAILPOINTS", "views-building=sleep:30000")],
    );
    let b = cluster.sites[1].serve(&[]);
    post_change(&a);
    std::thread::sleep(Duration::from_secs(1));
    drop(a); // SIGKILL, mid-build
    let t = Instant::now();
    while b.status()["cluster"]["lease"]["held"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the follower takes over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.produce(100);
    wait_changed(
        &b,
        Duration::from_secs(60),
        "the new driver builds what views/CHANGES.json says",
    );
    let sql = published_sql(&cluster.sites[1]);
    assert_eq!(
        sql.get("sales_by_product").map(String::as_str),
        Some(CHANGED),
        "the published run holds the saved change, not the config's old SQL"
    );
}

/// Two changes waiting together, the second putting back the config's
/// SQL (a change undone before it built): the driver builds them and runs
/// on. The view equal to the one computed keeps its object; a fresh one had
/// no object store to read the table on S3 from, and every later run failed
/// "No suitable object store found for s3://…" (found by the seeded cluster
/// test).
#[test]
fn a_change_undone_before_it_builds_leaves_the_views_readable_on_s3() {
    let mut cluster = Cluster::start();
    let a = driving(
        &mut cluster,
        &[("LAMBDAFLOW_FAILPOINTS", "batch-before-claim=sleep:2000")],
    );
    cluster.produce(100);
    // Both requests land while a run is under way, so they wait together.
    let t = Instant::now();
    while a.status()["batch"]["running_since_ms"].as_i64().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "a run starts");
        std::thread::sleep(Duration::from_millis(20));
    }
    let original = lambdaflow::config::Config::default()
        .views
        .into_iter()
        .find(|v| v.name == "sales_by_product")
        .expect("the paper's views")
        .sql;
    post_change(&a);
    let (status, reply) = request(
        "POST",
        &format!("{}/v1/views", a.url),
        Some(json!({ "name": "sales_by_product", "sql": original })),
    );
    assert_eq!(status, 202, "the change back is accepted: {reply}");
    let run = served(&a).0.unwrap_or(0);
    let last = cluster.produce(200);
    crate::kafka::wait_settled(&a, &last, Duration::from_secs(90));
    assert_eq!(
        problem(&a, "batch"),
        None,
        "the driver's runs succeed after a change and its undoing"
    );
    let (now, changed) = served(&a);
    assert!(
        now > Some(run),
        "the driver publishes runs: {now:?} after {run}"
    );
    assert!(!changed, "the config's SQL is served again");
    let (orders, covered) = common::orders_and_covered(&common::get_json(&format!(
        "{}/v1/views/sales_by_product?limit=100000",
        a.url
    )));
    assert_eq!(orders, covered, "the view is exact");
}

/// A driver's config file edited and reloaded (SIGHUP) on that node only:
/// at a failover the new driver builds its own file's definitions, and says
/// so in `health` (before, it logged "building a view change saved in
/// views/CHANGES.json", which was empty, and nothing warned).
#[test]
fn a_new_driver_whose_config_differs_from_the_published_run_says_so() {
    let mut cluster = Cluster::start();
    let a = driving(&mut cluster, &[]);
    let b = cluster.sites[1].serve(&[]);
    let config = std::fs::read_to_string(&cluster.sites[0].config).unwrap();
    std::fs::write(
        &cluster.sites[0].config,
        format!("{config}\n[[views]]\nname = \"sales_by_product\"\nsql = \"{CHANGED}\"\n"),
    )
    .unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &a.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_published(&a.url, Duration::from_secs(60));
    wait_changed(&b, Duration::from_secs(30), "the follower adopts the run");
    drop(a);
    let t = Instant::now();
    loop {
        let s = b.status();
        let warnings = s["health"]["warnings"].to_string();
        if warnings.contains("view_changes/config") {
            assert!(
                warnings.contains("sales_by_product") && warnings.contains("same config file"),
                "the warning names the view and what to do: {warnings}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the new driver warns that its config file differs from the published run: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 9: `DELETE` right after `POST` added a view sees the waiting add: it
/// cancels it (the view never appears), or drops it right after its build.
#[test]
fn deleting_a_view_just_added_cancels_the_waiting_add() {
    let site = Site::new(crate::oracle::CONFIG);
    // The batch loop holds a build 3 s: a second add waits behind it.
    let server = site.serve(&[("LAMBDAFLOW_FAILPOINTS", "views-building=sleep:3000")]);
    crate::common::exact::send(&server.url, 0, 300);
    let add = |name: &str| {
        request(
            "POST",
            &format!("{}/v1/views", server.url),
            Some(json!({ "name": name, "sql": crate::live_views::ADDED })),
        )
    };
    let (s1, r1) = add("first");
    assert_eq!(s1, 202, "{r1}");
    // `first` builds now; `second` waits for the next cycle.
    let t = Instant::now();
    while !server.status()["view_changes"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["view"] == "first" && c["state"] == "building")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "first builds");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s2, r2) = add("second");
    assert_eq!(s2, 202, "{r2}");
    let (status, reply) = request("DELETE", &format!("{}/v1/views/second", server.url), None);
    assert_eq!(
        (status, reply["state"].as_str()),
        (200, Some("cancelled")),
        "a waiting add is cancelled, not answered 404: {reply}"
    );
    // `first` is being built: its drop follows the build.
    let (status, reply) = request("DELETE", &format!("{}/v1/views/first", server.url), None);
    assert_eq!(
        (status, reply["change"].as_str()),
        (202, Some("drop")),
        "a building add is dropped after its build, not answered 404: {reply}"
    );
    let t = Instant::now();
    loop {
        let changes = server.status()["view_changes"]["changes"].clone();
        let done = changes
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] != "waiting" && c["state"] != "building");
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the changes finish: {changes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    for name in ["first", "second"] {
        let (status, a) = common::get_status(&format!("{}/v1/views/{name}", server.url));
        assert_eq!(status, 404, "`{name}` was deleted; it must not appear: {a}");
    }
    let saved: Value =
        serde_json::from_slice(&std::fs::read(site.data.join("views/CHANGES.json")).unwrap())
            .unwrap();
    assert!(
        saved["put"].as_array().unwrap().is_empty(),
        "no deleted view is saved to come back at a restart: {saved}"
    );
    server.stop();
}

/// A rolling schema change: a nullable field added to each node's config,
/// one node restarted at a time. No view reads the field, so no view
/// changes: the node restarted first starts and follows the driver not
/// yet restarted, and then the other way round — nobody stalls.
#[test]
fn a_rolling_schema_change_stalls_no_follower() {
    let mut cluster = Cluster::start();
    let old = crate::evolve::schema("");
    let new = crate::evolve::schema(r#"{ name = "coupon", type = "utf8", nullable = true },"#);
    for site in &cluster.sites {
        let config = std::fs::read_to_string(&site.config).unwrap();
        std::fs::write(&site.config, format!("{config}{old}")).unwrap();
    }
    let with_new = |site: &Site| {
        let config = std::fs::read_to_string(&site.config).unwrap();
        std::fs::write(&site.config, config.replace(&old, &new)).unwrap();
    };
    let a = driving(&mut cluster, &[]);
    let b = cluster.sites[1].serve(&[]);
    let last = cluster.produce(100);
    crate::kafka::wait_settled(&b, &last, Duration::from_secs(60));

    // The follower first: it starts with the new field, and follows.
    b.stop();
    with_new(&cluster.sites[1]);
    let b = cluster.sites[1]
        .try_serve(&[("RUST_LOG", "warn")], std::process::Stdio::inherit())
        .unwrap_or_else(|status| {
            panic!(
                "a follower restarted with a nullable field added must start, exited with {status}"
            )
        });
    let last = cluster.produce(100);
    crate::kafka::wait_settled(&b, &last, Duration::from_secs(60));
    assert_eq!(
        problem(&b, "follow"),
        None,
        "the restarted follower follows"
    );

    // Then the driver: the other node takes over, and the restarted one
    // follows it.
    a.stop();
    with_new(&cluster.sites[0]);
    let t = Instant::now();
    while b.status()["cluster"]["lease"]["held"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the other node takes over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = cluster.sites[0].serve(&[]);
    let last = cluster.produce(100);
    crate::kafka::wait_settled(&b, &last, Duration::from_secs(60));
    crate::kafka::wait_settled(&a, &last, Duration::from_secs(60));
    assert_eq!(
        problem(&a, "follow"),
        None,
        "the node restarted last follows"
    );
    let (run_a, _) = served(&a);
    let (run_b, _) = served(&b);
    assert_eq!(run_a, run_b, "both nodes serve the driver's run");
    let (orders, covered) = common::orders_and_covered(&common::get_json(&format!(
        "{}/v1/views/sales_by_product?limit=100000",
        a.url
    )));
    assert_eq!(
        (orders, covered),
        (500, 500),
        "every event, once, on the follower"
    );
    a.stop();
    b.stop();
}
