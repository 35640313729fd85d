//! Exactness checks shared by the end-to-end tests: send numbered events and
//! remember what was acknowledged; compare the master dataset and the
//! published views with that.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::RecordBatch;
use lambdaflow::config::Config;
use lambdaflow::schema::EventSchema;
use lambdaflow::view::oracle;

use super::{event, post_events};

/// The NDJSON of events `from..to` (zipcode 10000 + k).
pub fn body_of(from: i64, to: i64) -> String {
    (from..to)
        .map(|k| {
            let ts = chrono::DateTime::from_timestamp_millis(1_414_800_000_000 + k * 7_000)
                .unwrap()
                .format("%Y-%m-%d %H:%M:%S%.3f");
            event(
                10_000 + k,
                &format!("product{}", k % 7),
                k % 100,
                &ts.to_string(),
            ) + "\n"
        })
        .collect()
}

/// Records the events `from..from + n` of `body_of` that `reply` (a 200 to
/// one request of them) acknowledged, at their offsets.
pub fn record_ack(
    acked: &mut BTreeMap<(u32, u64), i64>,
    reply: &serde_json::Value,
    from: i64,
    n: i64,
) {
    let r = &reply["offsets"][0];
    let (p, first) = (
        r["partition"].as_u64().unwrap() as u32,
        r["first"].as_u64().unwrap(),
    );
    for k in 0..n {
        acked.insert((p, first + k as u64), 10_000 + from + k);
    }
}

/// Sends events `from..to` (zipcode 10000 + i) in requests of 100; returns
/// what the server acknowledged: (partition, offset) → zipcode. Stops at the
/// first request the server cannot answer (it crashed).
pub fn send(url: &str, from: i64, to: i64) -> BTreeMap<(u32, u64), i64> {
    send_in_doubt(url, from, to).0
}

/// As [`send`], and the zipcodes of the request whose answer was lost in a
/// crash: the server may or may not have stored it (whole).
pub fn send_in_doubt(url: &str, from: i64, to: i64) -> (BTreeMap<(u32, u64), i64>, Vec<i64>) {
    let mut acked = BTreeMap::new();
    let mut i = from;
    while i < to {
        let n = (to - i).min(100);
        let body = body_of(i, i + n);
        match post_events(url, body.into_bytes()) {
            Ok((200, reply)) => record_ack(&mut acked, &reply, i, n),
            Ok((status, reply)) => panic!("unexpected HTTP {status}: {reply}"),
            Err(_) => return (acked, (i..i + n).map(|k| 10_000 + k).collect()),
        }
        i += n;
    }
    (acked, Vec::new())
}

fn delta_rows(data: &Path) -> (BTreeMap<(u32, u64), i64>, Vec<RecordBatch>) {
    super::master_events(data)
}

pub fn assert_exactly(
    acked: &BTreeMap<(u32, u64), i64>,
    data: &Path,
    context: &str,
) -> Vec<RecordBatch> {
    assert_exactly_or_in_doubt(acked, &[], data, context)
}

/// Every acknowledged event is in the master dataset exactly once; besides
/// them there is nothing but whole requests whose answer a crash cut off
/// (stored durably, then the server died before replying).
pub fn assert_exactly_or_in_doubt(
    acked: &BTreeMap<(u32, u64), i64>,
    in_doubt: &[Vec<i64>],
    data: &Path,
    context: &str,
) -> Vec<RecordBatch> {
    let (rows, events) = delta_rows(data);
    for (k, z) in acked {
        match rows.get(k) {
            Some(got) => assert_eq!(got, z, "{context}: event {k:?} holds the wrong zipcode"),
            None => panic!(
                "{context}: acknowledged event {k:?} (zipcode {z}) is missing from the master dataset"
            ),
        }
    }
    let acked_zips: std::collections::BTreeSet<i64> = acked.values().copied().collect();
    let extra: std::collections::BTreeSet<i64> = rows
        .values()
        .copied()
        .filter(|z| !acked_zips.contains(z))
        .collect();
    for z in &extra {
        let req = in_doubt.iter().find(|r| r.contains(z)).unwrap_or_else(|| {
            panic!("{context}: zipcode {z} is in the master dataset but was never acknowledged nor in doubt")
        });
        assert!(
            req.iter().all(|r| extra.contains(r)),
            "{context}: a request is in the master dataset only in part"
        );
    }
    assert_eq!(
        rows.len(),
        acked.len() + extra.len(),
        "{context}: duplicates"
    );
    events
}

/// Published states of every default view, finalized, must equal the SQL
/// run directly over the events of the Delta table.
pub fn assert_views_equal_sql(data: &Path, events: &[RecordBatch]) {
    assert_views_equal_sql_in(None, data, events)
}

/// [`assert_views_equal_sql`] with the master dataset and the views on
/// `storage` (an S3 root), the node's local files in `data`.
pub fn assert_views_equal_sql_in(
    storage: Option<&lambdaflow::storage::Storage>,
    data: &Path,
    events: &[RecordBatch],
) {
    let rt = super::rt();
    rt.block_on(async {
        let mut config = Config {
            data: data.to_path_buf(),
            ..Config::default()
        };
        // Commands check the partition count against the data directory's.
        if let Some(n) = lambdaflow::stream::Log::partitions_in(data.join("log")).unwrap() {
            config.stream.partitions = n;
        }
        let batch = match storage {
            None => lambdaflow::node::open_batch(&config).await.unwrap(),
            Some(s) => {
                let schema = config.event_schema().unwrap();
                let views = lambdaflow::view::compile_all(&config.views, &schema)
                    .await
                    .unwrap();
                lambdaflow::node::open_batch_in(&config, s.clone(), views)
                    .await
                    .unwrap()
            }
        };
        let m = batch.current().await.unwrap().expect("a published run");
        let total: u64 = events.iter().map(|b| b.num_rows() as u64).sum();
        assert_eq!(m.events, total, "the run read every event of the table");
        assert_eq!(m.h.total(), total, "H covers exactly the events read");
        for view in batch.views().iter() {
            let states = batch.read_states(&m, view).await.unwrap();
            let got = view.finalize(vec![states]).await.unwrap();
            let want = oracle::run_sql(&EventSchema::paper(), view.sql(), events.to_vec())
                .await
                .unwrap();
            oracle::same_rows(&got, &want, false, 1e-12).unwrap_or_else(|d| {
                panic!("view `{}` published by the batch layer differs from its SQL over the Delta table: {d}", view.name())
            });
            let e = &m.views[view.name()];
            let rows: usize = got.iter().map(|b| b.num_rows()).sum();
            assert_eq!(e.rows, rows as u64, "view `{}`: the manifest counts its finalized rows", view.name());
            // The TSV holds the same rows; a view of more groups than
            // `[batch] tsv_max_rows` has none.
            let max = lambdaflow::config::BatchConfig::default().tsv_max_rows;
            let Some(tsv) = &e.tsv else {
                assert!(
                    e.groups > max,
                    "view `{}` of {} groups has no rows.tsv; a view of at most [batch] tsv_max_rows ({max}) groups has one",
                    view.name(),
                    e.groups
                );
                continue;
            };
            let tsv_path = &tsv.path;
            let tsv = match storage {
                None => std::fs::read_to_string(data.join(tsv_path)).unwrap(),
                Some(s) => String::from_utf8(s.get(tsv_path).await.unwrap().unwrap().to_vec()).unwrap(),
            };
            let expect = lambdaflow::view::store::to_tsv(view.output_schema(), &got);
            assert_eq!(tsv, expect, "view `{}`: rows.tsv is the finalized rows", view.name());
        }
    });
}
