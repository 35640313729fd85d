//! The merge laws of views: for random events split at random into parts,
//! merging the parts' states and finalizing equals the view's SQL run directly
//! over all the events. Also: states survive Parquet, and rollup merges groups.

use std::sync::Arc;

use arrow::array::{
    BooleanArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use lambdaflow::config::{FieldConfig, SchemaConfig, ViewConfig};
use lambdaflow::schema::{EventSchema, FieldType};
use lambdaflow::view::{View, ViewKind, compile, oracle};
use proptest::prelude::*;

const BASE_MS: i64 = 1_414_800_000_000; // 2014-11-01 00:00:00

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn def(name: &str, sql: &str) -> ViewConfig {
    ViewConfig {
        name: name.into(),
        sql: sql.into(),
        rollup: Vec::new(),
    }
}

/// Views over the paper's schema that cover every kind of state.
pub(crate) fn paper_views() -> Vec<(ViewConfig, bool)> {
    let mut v: Vec<(ViewConfig, bool)> = lambdaflow::config::Config::default()
        .views
        .into_iter()
        .map(|d| (d, false))
        .collect();
    let more = [
        (
            "distinct_and_extremes",
            "SELECT ProductName, count(DISTINCT zipcode) AS zips, min(price) AS lo, max(price) AS hi, count(price) AS n, sum(DISTINCT price) AS distinct_prices FROM events GROUP BY ProductName",
            false,
        ),
        (
            "distinct_only",
            "SELECT ProductName, count(DISTINCT zipcode) AS zips FROM events GROUP BY ProductName",
            false,
        ),
        (
            "bands",
            "SELECT CASE WHEN price >= 50 THEN 'high' ELSE 'low' END AS band, count(*) AS n, stddev(price) AS sd, var_pop(price) AS vp FROM events GROUP BY CASE WHEN price >= 50 THEN 'high' ELSE 'low' END",
            false,
        ),
        (
            "strings_and_bools",
            "SELECT upper(substr(ProductName, 1, 8)) AS p, bool_and(price > 10) AS all_big, bool_or(price > 90) AS any_huge FROM events GROUP BY upper(substr(ProductName, 1, 8))",
            false,
        ),
        (
            "quarter_hours",
            "SELECT date_bin(INTERVAL '15 minutes', timestamp, TIMESTAMP '2014-11-01 00:00:00') AS q, sum(price) AS revenue FROM events WHERE price > 20 GROUP BY date_bin(INTERVAL '15 minutes', timestamp, TIMESTAMP '2014-11-01 00:00:00') HAVING count(*) > 2",
            false,
        ),
        (
            "top3",
            "SELECT ProductName, sum(price) AS revenue FROM events GROUP BY ProductName ORDER BY revenue DESC, ProductName LIMIT 3",
            true,
        ),
        (
            "totals",
            "SELECT count(*) AS n, sum(price) AS s, avg(price) AS a FROM events",
            false,
        ),
        (
            "expensive",
            "SELECT zipcode, price FROM events WHERE price > 95",
            false,
        ),
        (
            "earliest_cheap",
            "SELECT ProductName, price, timestamp FROM events WHERE zipcode < 10003 ORDER BY timestamp, price, ProductName LIMIT 5",
            true,
        ),
        ("products", "SELECT DISTINCT ProductName FROM events", false),
        (
            "first_last",
            "SELECT ProductName, first_value(price ORDER BY timestamp) AS first_price, last_value(price ORDER BY timestamp) AS last_price FROM events GROUP BY ProductName",
            false,
        ),
        (
            "by_hour_product",
            "SELECT date_trunc('hour', timestamp) AS hour, ProductName, count(*) AS n FROM events GROUP BY date_trunc('hour', timestamp), ProductName ORDER BY hour, ProductName",
            true,
        ),
    ];
    v.extend(more.iter().map(|(n, s, o)| (def(n, s), *o)));
    v
}

/// A schema with floats, booleans and nullable fields.
fn extended_schema() -> EventSchema {
    let f = |name: &str, ty, nullable| FieldConfig {
        name: name.into(),
        ty,
        format: None,
        nullable,
    };
    let config = lambdaflow::config::Config {
        schema: SchemaConfig {
            event_time: "ts".into(),
            fields: vec![
                f("user", FieldType::Utf8, true),
                f("amount", FieldType::Float64, true),
                f("ok", FieldType::Boolean, false),
                FieldConfig {
                    format: Some("epoch_ms".into()),
                    ..f("ts", FieldType::TimestampMs, false)
                },
            ],
            unknown_fields: Default::default(),
            key: None,
        },
        ..Default::default()
    };
    config.event_schema().unwrap()
}

fn extended_views() -> Vec<(ViewConfig, bool)> {
    vec![
        (
            def(
                "per_user",
                "SELECT user, count(*) AS n, count(amount) AS n_amount, sum(amount) AS total, avg(amount) AS mean, min(amount) AS lo, max(amount) AS hi, stddev_samp(amount) AS sd, min(user) AS name FROM events GROUP BY user",
            ),
            false,
        ),
        (
            def(
                "per_flag",
                "SELECT ok, count(DISTINCT user) AS users, approx_distinct(user) AS approx_users, max(ts) AS last_seen FROM events GROUP BY ok",
            ),
            false,
        ),
    ]
}

type PaperRow = (i64, u8, i64, i64);

fn paper_batch(rows: &[PaperRow]) -> RecordBatch {
    crate::common::paper_batch(
        rows.iter()
            .map(|r| (r.0, format!("product{}", r.1), r.2, r.3)),
    )
}

type ExtRow = (Option<u8>, Option<i32>, bool, i64);

fn ext_batch(rows: &[ExtRow]) -> RecordBatch {
    RecordBatch::try_new(
        extended_schema().arrow().clone(),
        vec![
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.0.map(|u| format!("user{u}"))),
            )),
            // Quarter units: exact in binary, so sums do not depend on order.
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| r.1.map(|a| f64::from(a) / 4.0)),
            )),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.2)))),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| r.3),
            )),
        ],
    )
    .unwrap()
}

/// Cuts `n` rows at the given fractions into contiguous parts.
fn cut(n: usize, fractions: &[f64]) -> Vec<std::ops::Range<usize>> {
    let mut points: Vec<usize> = fractions.iter().map(|f| (f * n as f64) as usize).collect();
    points.push(0);
    points.push(n);
    points.sort();
    points.windows(2).map(|w| w[0]..w[1]).collect()
}

/// merge(states(parts)) → finalize, with parts as the batch and speed layers
/// would make them: some parts merged first (a batch view), some further cut
/// into micro-batches.
async fn merged(view: &View, parts: &[RecordBatch]) -> Vec<RecordBatch> {
    // The parts are consecutive: one partition, offsets counted across them
    // (views with ordered aggregates read them).
    let input = |b: RecordBatch, first: usize| {
        if view.needs_offsets() {
            lambdaflow::view::input::with_offsets(&b, 0, first as u64).unwrap()
        } else {
            b
        }
    };
    let mut states = Vec::new();
    let mut first = 0;
    for (i, p) in parts.iter().enumerate() {
        if i % 2 == 1 && p.num_rows() > 1 {
            // A micro-batch stream: two slices, their states compacted.
            let half = p.num_rows() / 2;
            let a = view
                .states(vec![input(p.slice(0, half), first)])
                .await
                .unwrap();
            let b = view
                .states(vec![input(
                    p.slice(half, p.num_rows() - half),
                    first + half,
                )])
                .await
                .unwrap();
            states.push(view.merge(vec![a, b]).await.unwrap());
        } else {
            states.push(view.states(vec![input(p.clone(), first)]).await.unwrap());
        }
        first += p.num_rows();
    }
    // Half the states round-trip through Parquet, as stored batch views do.
    let mut restored = Vec::new();
    for (i, s) in states.into_iter().enumerate() {
        if i % 2 == 0 {
            let bytes = view.states_to_parquet(&s).unwrap();
            restored.push(view.states_from_parquet(bytes.into()).unwrap());
        } else {
            restored.push(s);
        }
    }
    view.finalize(restored).await.unwrap()
}

fn check_all(
    schema: &EventSchema,
    views: &[(View, bool)],
    all: &RecordBatch,
    parts: &[RecordBatch],
) -> Result<(), TestCaseError> {
    let rt = rt();
    for (view, ordered) in views {
        let got = rt.block_on(merged(view, parts));
        let want = rt
            .block_on(oracle::run_sql(schema, view.sql(), vec![all.clone()]))
            .unwrap();
        if let Err(diff) = oracle::same_rows(&got, &want, *ordered, 1e-9) {
            return Err(TestCaseError::fail(format!(
                "view `{}`: merged states differ from the SQL over all {} events split into {} parts: {diff}",
                view.name(),
                all.num_rows(),
                parts.len()
            )));
        }
    }
    Ok(())
}

fn compiled(schema: &EventSchema, defs: Vec<(ViewConfig, bool)>) -> Vec<(View, bool)> {
    let rt = rt();
    defs.into_iter()
        .map(|(d, o)| {
            let v = rt
                .block_on(compile(&d, schema))
                .unwrap_or_else(|e| panic!("{}: {e}", d.name));
            (v, o)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn merged_parts_equal_the_view_over_all_paper_events(
        raw in prop::collection::vec((0i64..12, 0u8..6, -5i64..100, 0i64..3 * 3_600_000), 0..300),
        fractions in prop::collection::vec(0.0f64..1.0, 0..6),
    ) {
        thread_local! {
            static VIEWS: Vec<(View, bool)> = compiled(&EventSchema::paper(), paper_views());
        }
        // Unique event times (first/last_value need a total order), in random order.
        let rows: Vec<PaperRow> = raw
            .iter()
            .enumerate()
            .map(|(i, r)| (10_000 + r.0, r.1, r.2, BASE_MS + r.3 - r.3 % 1000 + i as i64))
            .collect();
        let all = paper_batch(&rows);
        let parts: Vec<RecordBatch> = cut(rows.len(), &fractions)
            .into_iter()
            .map(|r| paper_batch(&rows[r]))
            .collect();
        VIEWS.with(|views| check_all(&EventSchema::paper(), views, &all, &parts))?;
    }

    #[test]
    fn merged_parts_equal_the_view_over_all_events_with_nulls_and_floats(
        rows in prop::collection::vec(
            (prop::option::of(0u8..5), prop::option::of(-400i32..400), any::<bool>(), 0i64..86_400_000),
            0..300),
        fractions in prop::collection::vec(0.0f64..1.0, 0..6),
    ) {
        thread_local! {
            static VIEWS: Vec<(View, bool)> = compiled(&extended_schema(), extended_views());
        }
        let all = ext_batch(&rows);
        let parts: Vec<RecordBatch> = cut(rows.len(), &fractions)
            .into_iter()
            .map(|r| ext_batch(&rows[r]))
            .collect();
        VIEWS.with(|views| check_all(&extended_schema(), views, &all, &parts))?;
    }
}

#[test]
fn approx_percentile_merges_within_its_documented_error() {
    let rt = rt();
    let view = rt
        .block_on(compile(
            &def(
                "median",
                "SELECT ProductName, approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY price) AS median FROM events GROUP BY ProductName",
            ),
            &EventSchema::paper(),
        ))
        .expect("approx_percentile_cont compiles");
    // 20,000 events, prices 0..1000, cut into 50 parts.
    let rows: Vec<PaperRow> = (0..20_000i64)
        .map(|i| (10_000, (i % 3) as u8, (i * 7919) % 1000, BASE_MS + i))
        .collect();
    let all = paper_batch(&rows);
    let parts: Vec<RecordBatch> = (0..50).map(|k| all.slice(k * 400, 400)).collect();
    let got = rt.block_on(merged(&view, &parts));
    let want = rt
        .block_on(oracle::run_sql(
            &EventSchema::paper(),
            view.sql(),
            vec![all],
        ))
        .unwrap();
    // t-digest merges are approximate: within 1% of the value range here.
    let g = oracle::rows(&got);
    let w = oracle::rows(&want);
    assert_eq!(g.len(), 3);
    let find = |rows: &[Vec<oracle::Cell>], name: &str| -> f64 {
        let r = rows
            .iter()
            .find(|r| r[0] == oracle::Cell::Text(name.into()))
            .unwrap();
        match &r[1] {
            oracle::Cell::Float(f) => *f,
            oracle::Cell::Text(t) => t.parse().unwrap(),
            oracle::Cell::Null => panic!("null median"),
        }
    };
    for p in ["product0", "product1", "product2"] {
        let (a, b) = (find(&g, p), find(&w, p));
        assert!(
            (a - b).abs() <= 10.0,
            "{p}: merged median {a}, all-at-once {b}"
        );
    }
}

#[test]
fn approx_distinct_merges_exactly_like_one_pass() {
    // HLL registers merge by max: the merged estimate is the one-pass estimate.
    let rt = rt();
    let view = rt
        .block_on(compile(
            &def("zips", "SELECT ProductName, approx_distinct(zipcode) AS zips FROM events GROUP BY ProductName"),
            &EventSchema::paper(),
        ))
        .unwrap();
    let rows: Vec<PaperRow> = (0..50_000i64)
        .map(|i| (10_000 + (i * 7919) % 40_000, (i % 4) as u8, 1, BASE_MS + i))
        .collect();
    let all = paper_batch(&rows);
    let parts: Vec<RecordBatch> = (0..25).map(|k| all.slice(k * 2000, 2000)).collect();
    let got = rt.block_on(merged(&view, &parts));
    let one = rt.block_on(async {
        let s = view.states(vec![all.clone()]).await.unwrap();
        view.finalize(vec![s]).await.unwrap()
    });
    oracle::same_rows(&got, &one, false, 0.0).expect("HLL merge is exact");
}

#[test]
fn union_views_merge_by_union() {
    let rt = rt();
    let view = rt
        .block_on(compile(
            &def(
                "cheap",
                "SELECT ProductName, price FROM events WHERE price < 3",
            ),
            &EventSchema::paper(),
        ))
        .unwrap();
    assert_eq!(view.kind(), ViewKind::Union);
    let rows: Vec<PaperRow> = (0..100).map(|i| (10_000, 0, i % 10, BASE_MS + i)).collect();
    let a = rt
        .block_on(view.states(vec![paper_batch(&rows[..50])]))
        .unwrap();
    let b = rt
        .block_on(view.states(vec![paper_batch(&rows[50..])]))
        .unwrap();
    let merged = rt.block_on(view.merge(vec![a, b])).unwrap();
    assert_eq!(merged.num_rows(), 30, "prices 0, 1, 2 of 100 events");
}

#[test]
fn rollup_coarsens_old_buckets_and_merges_their_groups() {
    use lambdaflow::config::RollupConfig;
    use std::time::Duration;
    let rt = rt();
    let mut d = lambdaflow::config::Config::default().views[2].clone(); // sales_per_minute
    d.rollup = vec![
        RollupConfig {
            after: Duration::from_secs(3600),
            bucket: "1h".into(),
        },
        RollupConfig {
            after: Duration::from_secs(86_400),
            bucket: "1day".into(),
        },
    ];
    let view = rt.block_on(compile(&d, &EventSchema::paper())).unwrap();
    // Two days of events, one a minute, one product.
    let rows: Vec<PaperRow> = (0..2 * 1440)
        .map(|i| (10_000 + i % 7, 0, 1, BASE_MS + i * 60_000))
        .collect();
    let as_of = BASE_MS + 2 * 86_400_000;
    let states = rt.block_on(view.states(vec![paper_batch(&rows)])).unwrap();
    assert_eq!(states.num_rows(), 2880, "one group a minute before rollup");
    let rolled = rt.block_on(view.roll_up(states, as_of)).unwrap();
    // Day 1 (≥ 1 day old): 1 row. Day 2: 23 hourly rows older than 1 h, and
    // the last hour's 60 minutes stay.
    assert_eq!(rolled.num_rows(), 1 + 23 + 60, "rolled-up groups");
    let out = rt.block_on(view.finalize(vec![rolled])).unwrap();
    let total: i64 = oracle::rows(&out)
        .iter()
        .map(|r| match &r[2] {
            oracle::Cell::Text(t) => t.parse::<i64>().unwrap(),
            c => panic!("orders is an integer, got {c:?}"),
        })
        .sum();
    assert_eq!(total, 2880, "no event lost or counted twice by the rollup");
}

#[test]
fn states_of_another_view_are_refused() {
    let rt = rt();
    let views = compiled(&EventSchema::paper(), paper_views());
    let (a, b) = (&views[0].0, &views[1].0);
    let s = rt
        .block_on(a.states(vec![paper_batch(&[(10_000, 1, 5, BASE_MS)])]))
        .unwrap();
    let bytes = a.states_to_parquet(&s).unwrap();
    let err = b.states_from_parquet(bytes.into()).unwrap_err().to_string();
    assert!(err.contains("stored states do not match"), "{err}");
}

#[test]
fn ordered_aggregates_break_ties_by_partition_and_offset_in_every_merge_order() {
    use lambdaflow::view::input::with_offsets;
    let rt = rt();
    let view = rt
        .block_on(compile(
            &def(
                "first_last",
                "SELECT ProductName, first_value(zipcode ORDER BY timestamp) AS f, last_value(zipcode ORDER BY timestamp) AS l FROM events GROUP BY ProductName",
            ),
            &EventSchema::paper(),
        ))
        .unwrap();
    // Every event at the same millisecond: only (partition, offset) can order them.
    let p0: Vec<PaperRow> = (0..6).map(|i| (20_000 + i, 0, 1, BASE_MS)).collect();
    let p1: Vec<PaperRow> = (0..6).map(|i| (30_000 + i, 0, 1, BASE_MS)).collect();
    let part = |rows: &[PaperRow], p: u32, first: u64| {
        if view.needs_offsets() {
            with_offsets(&paper_batch(rows), p, first).unwrap()
        } else {
            paper_batch(rows)
        }
    };
    let states = |batches: Vec<RecordBatch>| rt.block_on(view.states(batches)).unwrap();
    let answer = |parts: Vec<RecordBatch>| {
        let out = rt.block_on(view.finalize(parts)).unwrap();
        oracle::rows(&out)
    };
    // The batch layer: files in name order (p0 before p1).
    let batch = states(vec![part(&p0, 0, 0), part(&p1, 1, 0)]);
    // A read before the swap: batch states of p1 [0, 6) and p0 [0, 3), then
    // realtime chunks p0 [3, 6): another merge order.
    let read = vec![
        states(vec![part(&p1, 1, 0), part(&p0[..3], 0, 0)]),
        states(vec![part(&p0[3..], 0, 3)]),
    ];
    let reversed = vec![
        states(vec![part(&p0[3..], 0, 3)]),
        states(vec![part(&p1[3..], 1, 3)]),
        states(vec![part(&p1[..3], 1, 0), part(&p0[..3], 0, 0)]),
    ];
    let want = answer(vec![batch]);
    assert_eq!(
        answer(read),
        want,
        "the answer must not flip when a batch run is installed"
    );
    assert_eq!(answer(reversed), want, "nor in any other merge order");
    let text = format!("{want:?}");
    assert!(
        text.contains("20000") && text.contains("30005"),
        "first is partition 0 offset 0, last is partition 1 offset 5: {text}"
    );
    assert!(
        view.needs_offsets(),
        "an ordered aggregate reads the offsets"
    );
}
