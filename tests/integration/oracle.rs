//! The end-to-end oracle test, the project's most important test: a real
//! `serve` with short intervals; concurrent producers (with late events, hours
//! in the past) while every view is queried again and again and batch runs
//! publish. Every answer names the offsets it covers (its realtime high-water
//! marks R); it must equal the view's SQL run directly over exactly the events
//! below those offsets. Then: the same after SIGKILL and restart.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Site, event, post_events};
use arrow::array::RecordBatch;
use lambdaflow::config::Config;
use lambdaflow::schema::EventSchema;
use lambdaflow::view::oracle;
use serde_json::Value;

pub(crate) const CONFIG: &str = "[speed]\ninterval = \"10ms\"\n[archive]\nchunk_events = 1000\nchunk_age = \"200ms\"\n[batch]\npause = \"250ms\"\n";

/// One event as the test sent it.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) zipcode: i64,
    pub(crate) product: String,
    pub(crate) price: i64,
    pub(crate) ts_ms: i64,
}

pub(crate) fn make(k: i64) -> Sent {
    // Every 10th event is one to six hours late.
    let late = if k % 10 == 3 {
        3_600_000 + (k * 7919) % (5 * 3_600_000)
    } else {
        0
    };
    Sent {
        zipcode: 10_000 + k,
        product: format!("product{}", k % 6),
        price: 1 + (k * 31) % 100,
        ts_ms: 1_414_850_000_000 + k * 250 - late,
    }
}

pub(crate) fn ndjson(events: &[Sent]) -> Vec<u8> {
    events
        .iter()
        .map(|e| {
            let ts = chrono::DateTime::from_timestamp_millis(e.ts_ms)
                .unwrap()
                .format("%Y-%m-%d %H:%M:%S%.3f")
                .to_string();
            event(e.zipcode, &e.product, e.price, &ts) + "\n"
        })
        .collect::<String>()
        .into_bytes()
}

fn batch_of(events: &[&Sent]) -> RecordBatch {
    crate::common::paper_batch(
        events
            .iter()
            .map(|e| (e.zipcode, &e.product, e.price, e.ts_ms)),
    )
}

/// An answer as a reader got it.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub(crate) view: String,
    /// A key lookup (`?COL=VAL`), or the whole view.
    pub(crate) filter: Option<(String, String)>,
    pub(crate) rows: Vec<Value>,
    pub(crate) realtime: Vec<u64>,
    pub(crate) run: Option<u64>,
    /// The batch run's coverage, and the node that answered.
    pub(crate) h: Vec<u64>,
    pub(crate) url: String,
}

/// Rows as canonical strings, floats rounded (float sums differ in the last bits).
fn canonical(rows: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| {
            let obj = r.as_object().expect("rows are objects");
            let mut cells: Vec<String> = obj
                .iter()
                .map(|(k, v)| match v {
                    Value::Number(n) if n.is_f64() => format!("{k}={:.9e}", n.as_f64().unwrap()),
                    other => format!("{k}={other}"),
                })
                .collect();
            cells.sort();
            cells.join(",")
        })
        .collect();
    out.sort();
    out
}

fn oracle_rows(sql: &str, events: Vec<RecordBatch>) -> Vec<Value> {
    let rows = common::rt()
        .block_on(oracle::run_sql(&EventSchema::paper(), sql, events))
        .unwrap();
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    let refs: Vec<&RecordBatch> = rows.iter().filter(|b| b.num_rows() > 0).collect();
    w.write_batches(&refs).unwrap();
    w.finish().unwrap();
    let buf = w.into_inner();
    if buf.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice::<Vec<Value>>(&buf).unwrap()
}

/// Checks every answer against the SQL over the events below its offsets.
fn verify(answers: &[Got], known: &BTreeMap<(u32, u64), Sent>) -> usize {
    verify_positions(answers, known, true)
}

/// [`verify`] for a stream whose positions may have gaps (Kafka's): with
/// `dense`, the events below an answer's offsets must also number exactly
/// the sum of those offsets.
pub(crate) fn verify_positions(
    answers: &[Got],
    known: &BTreeMap<(u32, u64), Sent>,
    dense: bool,
) -> usize {
    let views: BTreeMap<String, String> = Config::default()
        .views
        .into_iter()
        .map(|v| (v.name, v.sql))
        .collect();
    // Distinct answers (the same instant is checked once), then an even
    // sample of at most 300 of them, always with the last (settled) ones.
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<&Got> = answers
        .iter()
        .filter(|a| seen.insert((a.view.clone(), a.filter.clone(), a.realtime.clone())))
        .collect();
    let step = distinct.len().div_ceil(300).max(1);
    let n = distinct.len();
    let sample = distinct
        .into_iter()
        .enumerate()
        .filter(|(k, _)| k % step == 0 || *k + 3 >= n)
        .map(|(_, a)| a);
    let mut checked = 0;
    for a in sample {
        let below: Vec<&Sent> = known
            .iter()
            .filter(|((p, o), _)| *o < a.realtime[*p as usize])
            .map(|(_, e)| e)
            .collect();
        let covered: u64 = if dense {
            a.realtime.iter().sum()
        } else {
            below.len() as u64
        };
        assert_eq!(
            below.len() as u64,
            covered,
            "view `{}` reported offsets {:?}, but the test knows only {} of those {} events",
            a.view,
            a.realtime,
            below.len(),
            covered
        );
        let mut want = oracle_rows(&views[&a.view], vec![batch_of(&below)]);
        if let Some((col, val)) = &a.filter {
            want.retain(|r| match &r[col] {
                Value::String(s) => s == val,
                v => val.as_str() == v.to_string().as_str(),
            });
        }
        let (g, w) = (canonical(&a.rows), canonical(&want));
        if g != w {
            let missing: Vec<_> = w.iter().filter(|r| !g.contains(r)).take(3).collect();
            let extra: Vec<_> = g.iter().filter(|r| !w.contains(r)).take(3).collect();
            panic!(
                "view `{}` at offsets {:?} (batch run {:?} at H {:?}, from {}) differs from its SQL over those {} events\n  missing: {missing:?}\n  extra: {extra:?}",
                a.view, a.realtime, a.run, a.h, a.url, covered
            );
        }
        checked += 1;
    }
    checked
}

/// One thread per default view, each querying it every 20 ms into
/// `answers` until `done`.
pub(crate) fn view_readers(
    url: &str,
    answers: &Arc<Mutex<Vec<Got>>>,
    done: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    ["sales_by_product", "sales_by_zipcode", "sales_per_minute"]
        .into_iter()
        .map(|view| {
            let (url, answers, done) = (url.to_string(), answers.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some(g) = query(&url, view) {
                        answers.lock().unwrap().push(g);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect()
}

/// Every default view's answer now (after the layers settled).
pub(crate) fn settled_answers(url: &str) -> Vec<Got> {
    ["sales_by_product", "sales_by_zipcode", "sales_per_minute"]
        .into_iter()
        .map(|v| query(url, v).expect("a settled view answers"))
        .collect()
}

/// Takes `server`'s settled answers, stops it, and checks that the answers
/// and the master dataset under `data` hold exactly `known`, once each.
pub(crate) fn assert_settled_exact(
    server: common::Server,
    data: &std::path::Path,
    known: &BTreeMap<(u32, u64), Sent>,
    dense: bool,
) {
    let answers = settled_answers(&server.url);
    server.stop();
    verify_positions(&answers, known, dense);
    assert_master_holds(data, known);
}

/// The master dataset under `data` holds each of `known` once, where it
/// was sent, and nothing else.
pub(crate) fn assert_master_holds(data: &std::path::Path, known: &BTreeMap<(u32, u64), Sent>) {
    assert_rows_are(&common::master_events(data).0, known);
}

/// The master dataset's rows (`(partition, offset)` → zipcode) are each of
/// `known` once, and nothing else.
pub(crate) fn assert_rows_are(
    rows: &BTreeMap<(u32, u64), i64>,
    known: &BTreeMap<(u32, u64), Sent>,
) {
    assert_eq!(
        rows.len(),
        known.len(),
        "the master dataset holds every event once"
    );
    for at in rows.keys() {
        assert!(known.contains_key(at), "an event at {at:?} nobody sent");
    }
}

pub(crate) fn query(url: &str, view: &str) -> Option<Got> {
    query_filtered(url, view, None)
}

fn query_filtered(url: &str, view: &str, filter: Option<(&str, String)>) -> Option<Got> {
    // The whole view: past the default page of 10,000 rows.
    let q = filter
        .as_ref()
        .map_or("?limit=100000000".to_string(), |(c, v)| {
            format!("?{c}={v}&limit=100000000")
        });
    let v = common::rt().block_on(async {
        reqwest::get(format!("{url}/v1/views/{view}{q}"))
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()
    })?;
    Some(Got {
        view: view.to_string(),
        filter: filter.map(|(c, v)| (c.to_string(), v)),
        rows: v["rows"].as_array()?.clone(),
        realtime: v["freshness"]["realtime"]
            .as_array()?
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect(),
        run: v["freshness"]["run"].as_u64(),
        h: v["freshness"]["h"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default(),
        url: url.to_string(),
    })
}

#[test]
fn every_answer_equals_the_view_sql_over_the_events_below_its_offsets() {
    every_answer_is_exact_on(&Site::new(CONFIG));
}

/// The oracle test on `site` (a local data directory, or an S3 root): three
/// producers over HTTP while every view is read, whole and by key.
pub(crate) fn every_answer_is_exact_on(site: &Site) -> BTreeMap<(u32, u64), Sent> {
    let server = site.serve(&[]);
    let url = server.url.clone();
    let known: Arc<Mutex<BTreeMap<(u32, u64), Sent>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    // Three producers, 50-event requests, interleaved ids.
    let producers: Vec<_> = (0..3i64)
        .map(|t| {
            let (url, known) = (url.clone(), known.clone());
            std::thread::spawn(move || {
                for r in 0..80i64 {
                    let events: Vec<Sent> = (0..50).map(|i| make((r * 3 + t) * 50 + i)).collect();
                    let (status, reply) = post_events(&url, ndjson(&events)).expect("server up");
                    assert_eq!(status, 200, "{reply}");
                    let range = &reply["offsets"][0];
                    let (p, first) = (
                        range["partition"].as_u64().unwrap() as u32,
                        range["first"].as_u64().unwrap(),
                    );
                    let mut k = known.lock().unwrap();
                    for (i, e) in events.into_iter().enumerate() {
                        k.insert((p, first + i as u64), e);
                    }
                    drop(k);
                    std::thread::sleep(Duration::from_millis(15));
                }
            })
        })
        .collect();

    // Readers: every view, again and again, until producers finish and ≥ 3 runs published.
    let answers: Arc<Mutex<Vec<Got>>> = Arc::default();
    let readers = view_readers(&url, &answers, &done);
    // Point readers: key lookups that read one group, never the whole view.
    let points: Vec<_> = [
        ("sales_by_product", "ProductName"),
        ("sales_by_zipcode", "zipcode"),
    ]
    .into_iter()
    .map(|(view, col)| {
        let (url, answers, done) = (url.clone(), answers.clone(), done.clone());
        std::thread::spawn(move || {
            let mut k = 0i64;
            while !done.load(Ordering::Relaxed) {
                let val = if col == "zipcode" {
                    (10_000 + (k * 37) % 12_000).to_string()
                } else {
                    format!("product{}", k % 6)
                };
                if let Some(g) = query_filtered(&url, view, Some((col, val))) {
                    answers.lock().unwrap().push(g);
                }
                k += 1;
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    })
    .collect();
    for p in producers {
        p.join().unwrap();
    }
    let t_settle = Instant::now();
    let settled = server.wait_settled(Duration::from_secs(90));
    eprintln!("settled in {:?}", t_settle.elapsed());
    // A last round of answers at the settled state.
    for view in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
        answers.lock().unwrap().push(query(&url, view).unwrap());
    }
    done.store(true, Ordering::Relaxed);
    for r in readers.into_iter().chain(points) {
        r.join().unwrap();
    }
    let runs = settled["batch"]["runs"].as_u64().unwrap();
    let answers = answers.lock().unwrap().clone();
    let distinct_runs: std::collections::BTreeSet<u64> =
        answers.iter().filter_map(|a| a.run).collect();
    assert!(
        distinct_runs.len() >= 3,
        "answers must span at least three batch publishes, saw runs {distinct_runs:?} ({runs} published)"
    );
    let known = known.lock().unwrap().clone();
    assert_eq!(known.len(), 3 * 80 * 50);
    let t_verify = Instant::now();
    let checked = verify(&answers, &known);
    eprintln!(
        "verified {} answers in {:?}",
        answers.len(),
        t_verify.elapsed()
    );
    assert!(
        checked > 100,
        "only {checked} distinct answers were checked"
    );
    eprintln!(
        "checked {checked} distinct answers over {} batch runs",
        distinct_runs.len()
    );
    server.stop();
    known
}

#[test]
fn after_sigkill_and_restart_answers_are_exact_and_complete() {
    let site = Site::new(CONFIG);
    let server = site.serve(&[]);
    let mut k = 0i64;
    let mut send_some = |url: &str, n: i64| {
        for _ in 0..n {
            let events: Vec<Sent> = (0..50).map(|i| make(k + i)).collect();
            let _ = post_events(url, ndjson(&events));
            k += 50;
        }
    };
    send_some(&server.url, 30);
    // SIGKILL mid-stream: a producer thread is still sending.
    let url = server.url.clone();
    let t = std::thread::spawn(move || {
        for r in 0..200 {
            let events: Vec<Sent> = (0..50).map(|i| make(1_000_000 + r * 50 + i)).collect();
            if post_events(&url, ndjson(&events)).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(150));
    drop(server); // kill -9
    t.join().unwrap();

    let server = site.serve(&[]);
    send_some(&server.url, 20);
    server.wait_settled(Duration::from_secs(90));
    let answers: Vec<Got> = ["sales_by_product", "sales_by_zipcode", "sales_per_minute"]
        .into_iter()
        .map(|v| query(&server.url, v).unwrap())
        .collect();
    server.stop();

    // The truth: what the master dataset holds, each event exactly once.
    let (rows, _) = common::master_events(&site.data);
    let mut known = BTreeMap::new();
    for ((p, o), zip) in rows {
        let k = zip - 10_000;
        known.insert((p, o), make(k));
    }
    for a in &answers {
        let total: u64 = a.realtime.iter().sum();
        assert_eq!(
            total,
            known.len() as u64,
            "the settled answer covers every stored event"
        );
    }
    let t = Instant::now();
    verify(&answers, &known);
    assert!(t.elapsed() < Duration::from_secs(60));
}
