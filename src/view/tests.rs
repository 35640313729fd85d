//! Unit tests of view compilation: what is refused, and why.

use super::*;
use crate::config::ViewConfig;

fn def(sql: &str) -> ViewConfig {
    ViewConfig {
        name: "v".into(),
        sql: sql.into(),
        rollup: Vec::new(),
    }
}

async fn refuse(sql: &str) -> String {
    match compile(&def(sql), &EventSchema::paper()).await {
        Ok(_) => panic!("view must be refused: {sql}"),
        Err(e) => crate::error::Report::of(&e).to_string(),
    }
}

#[tokio::test]
async fn the_papers_views_compile_as_written() {
    for v in crate::config::Config::default().views {
        let view = compile(&v, &EventSchema::paper())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(view.kind(), ViewKind::Aggregate);
        eprintln!("{}: states {:?}", v.name, view.state_schema());
    }
}

#[tokio::test]
async fn refused_constructs_name_themselves_and_say_why() {
    let cases = [
        (
            "SELECT ProductName, row_number() OVER (ORDER BY price) AS r FROM events",
            "view `v` cannot use window function `row_number() OVER (…)`: a window function's value",
        ),
        (
            "SELECT a.ProductName, count(*) FROM events a JOIN events b ON a.zipcode = b.zipcode GROUP BY a.ProductName",
            "view `v` cannot use a join: joining the stream with itself",
        ),
        (
            "SELECT ProductName, count(*) FROM events WHERE timestamp > now() - INTERVAL '1 hour' GROUP BY ProductName",
            "view `v` cannot use `now()`: its value depends on when or where the query runs",
        ),
        (
            "SELECT ProductName, random() AS r FROM events",
            "view `v` cannot use `random()`",
        ),
        (
            "SELECT ProductName, price FROM events LIMIT 10",
            "view `v` cannot use LIMIT without ORDER BY: it would keep arbitrary rows",
        ),
        (
            "SELECT orders, count(*) FROM (SELECT ProductName, count(*) AS orders FROM events GROUP BY ProductName) GROUP BY orders",
            "view `v` cannot use an aggregation over another aggregation",
        ),
        (
            "SELECT t.price FROM (SELECT price FROM events WHERE price > 3) t",
            "view `v` cannot use a subquery",
        ),
        (
            "SELECT ProductName, first_value(price) AS p FROM events GROUP BY ProductName",
            "view `v` cannot use `first_value` without ORDER BY",
        ),
        (
            "SELECT ProductName FROM events UNION SELECT ProductName FROM events",
            "view `v` cannot use UNION / INTERSECT / EXCEPT",
        ),
        (
            "SELECT ProductName, count(*) FROM events WHERE price > (SELECT avg(price) FROM events) GROUP BY ProductName",
            "view `v` cannot use a subquery",
        ),
        (
            "CREATE TABLE t AS SELECT * FROM events",
            "view `v` cannot use a statement that is not a query",
        ),
        (
            "SELECT 1 AS one",
            "view `v` cannot use a query that does not read `events`",
        ),
    ];
    for (sql, want) in cases {
        let got = refuse(sql).await;
        assert!(
            got.starts_with(want),
            "for {sql}\n got: {got}\nwant prefix: {want}"
        );
        assert!(
            got.contains(" because ") || got.contains(": "),
            "the message says why: {got}"
        );
    }
}

#[tokio::test]
async fn a_misspelt_column_gets_a_suggestion() {
    let got = refuse("SELECT productname, count(*) FROM events GROUP BY productname").await;
    assert!(got.contains("productname"), "{got}");
    assert!(got.contains("did you mean `ProductName`?"), "{got}");
    let got = refuse("SELECT colour FROM events").await;
    assert!(
        got.contains("the columns of `events` are: zipcode, ProductName, price, timestamp"),
        "{got}"
    );
}

#[tokio::test]
async fn count_distinct_is_planned_as_one_mergeable_aggregation() {
    let v = compile(
        &def(
            "SELECT ProductName, count(DISTINCT zipcode) AS zips FROM events GROUP BY ProductName",
        ),
        &EventSchema::paper(),
    )
    .await
    .expect("count(DISTINCT) compiles");
    let states = v.state_schema();
    assert!(
        matches!(
            states.field(1).data_type(),
            arrow::datatypes::DataType::List(_)
        ),
        "the distinct state is the value set: {states:?}"
    );
}

#[tokio::test]
async fn rollup_needs_one_time_bucket_and_ordered_tiers() {
    use crate::config::RollupConfig;
    use std::time::Duration;
    let tier = |after: u64, bucket: &str| RollupConfig {
        after: Duration::from_secs(after),
        bucket: bucket.into(),
    };
    let schema = EventSchema::paper();
    let mut d = def("SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName");
    d.rollup = vec![tier(86_400, "1h")];
    let err = compile(&d, &schema).await.unwrap_err().to_string();
    assert!(err.contains("no timestamp GROUP BY column"), "{err}");

    let mut d = crate::config::Config::default().views[2].clone();
    d.rollup = vec![tier(86_400, "1day"), tier(3_600, "1h")];
    let err = compile(&d, &schema).await.unwrap_err().to_string();
    assert!(err.contains("tiers must be in order of age"), "{err}");

    d.rollup = vec![tier(3_600, "1h"), tier(86_400, "90min")];
    let err = compile(&d, &schema).await.unwrap_err().to_string();
    assert!(err.contains("not a multiple"), "{err}");

    d.rollup = vec![tier(3_600, "1h"), tier(86_400, "1day")];
    let v = compile(&d, &schema).await.expect("valid rollup");
    assert_eq!(v.rollup().unwrap().column(), 0);
}

#[tokio::test]
async fn the_fingerprint_ignores_layout_but_not_literals() {
    let fp = |sql: &'static str| async move {
        compile(&def(sql), &EventSchema::paper())
            .await
            .unwrap()
            .fingerprint()
            .to_string()
    };
    let a = fp("SELECT ProductName, count(*) AS n FROM events WHERE ProductName = 'a b' GROUP BY ProductName").await;
    let relaid = fp("SELECT ProductName,\n  count(*) AS n\nFROM events\nWHERE ProductName = 'a b'\nGROUP BY ProductName").await;
    let literal = fp("SELECT ProductName, count(*) AS n FROM events WHERE ProductName = 'a  b' GROUP BY ProductName").await;
    assert_eq!(
        a, relaid,
        "the same query laid out differently computes the same states: it must keep its batch views"
    );
    assert_ne!(
        a, literal,
        "a changed string literal (`'a b'` → `'a  b'`) is another view: reusing the old states would serve stale rows"
    );
}

#[tokio::test]
async fn the_fingerprint_covers_the_fields_a_view_reads_and_no_other() {
    use crate::schema::{EventField, FieldType};
    let paper = EventSchema::paper();
    let with = |name: &str, ty: FieldType| {
        let mut fields = paper.fields().to_vec();
        fields.push(EventField {
            name: name.into(),
            ty,
            nullable: true,
            time_format: None,
        });
        EventSchema::new(fields, paper.event_time_index())
    };
    let fp = |sql: &'static str, schema: EventSchema| async move {
        compile(&def(sql), &schema)
            .await
            .unwrap()
            .fingerprint()
            .to_string()
    };
    let by_product =
        "SELECT ProductName, count(*) AS n, sum(price) AS r FROM events GROUP BY ProductName";
    assert_eq!(
        fp(by_product, paper.clone()).await,
        fp(by_product, with("coupon", FieldType::Utf8)).await,
        "a nullable field the view does not read leaves its states as they are: it must keep its batch views and its past runs"
    );
    let by_coupon = "SELECT coupon, count(*) AS n FROM events GROUP BY coupon";
    assert_ne!(
        fp(by_coupon, with("coupon", FieldType::Utf8)).await,
        fp(by_coupon, with("coupon", FieldType::Int64)).await,
        "a field the view reads enters with its type: states of another type must not be merged"
    );
}

/// A deep expression is refused with the bounds of `POST /v1/sql`, before
/// anything recurses on it (a 2,000-term OR in `POST /v1/views` overflowed
/// the stack and aborted the server).
#[tokio::test]
async fn a_view_too_deep_to_plan_is_refused_before_it_is_parsed() {
    let terms: Vec<String> = (0..2000).map(|i| format!("price = {i}")).collect();
    let sql = format!(
        "SELECT count(*) AS n FROM events WHERE {}",
        terms.join(" OR ")
    );
    let e = refuse(&sql).await;
    assert!(
        e.contains("view `v`") && e.contains("deep"),
        "refused for its depth, naming the view: {e}"
    );
}

/// Events of the paper's fields and a nullable `coupon`, with strings of
/// every kind a view may group, aggregate or transform: short (inline in a
/// string view) and long, multi-byte, empty, null; in three batches.
fn mixed_events() -> (EventSchema, Vec<RecordBatch>) {
    use crate::schema::{EventField, FieldType};
    use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMillisecondArray};
    let paper = EventSchema::paper();
    let mut fields = paper.fields().to_vec();
    fields.push(EventField {
        name: "coupon".into(),
        ty: FieldType::Utf8,
        nullable: true,
        time_format: None,
    });
    let schema = EventSchema::new(fields, paper.event_time_index());
    let names = [
        "product1",
        "a product name longer than twelve bytes",
        "",
        "Ærøskøbing-ø",
        "product1 ",
        "PRODUCT1",
    ];
    let batch = |seed: u64, n: usize| {
        let h = |i: usize| (seed ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| 10_000 + (h(i) % 7) as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| names[(h(i) >> 8) as usize % names.len()]),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| 1 + (h(i) >> 16) as i64 % 100),
            )),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                (0..n).map(|i| 1_414_800_000_000 + 7_000 * i as i64),
            )),
            Arc::new(StringArray::from_iter((0..n).map(|i| {
                match (h(i) >> 24) % 4 {
                    0 => None,
                    1 => Some("SPRING-SALE-2014-FIFTY"),
                    2 => Some("x"),
                    _ => Some(names[(h(i) >> 28) as usize % names.len()]),
                }
            }))),
        ];
        RecordBatch::try_new(schema.arrow().clone(), columns).unwrap()
    };
    let events = vec![batch(1, 3000), batch(2, 1000), batch(3, 2500)];
    (schema, events)
}

/// Views over [`mixed_events`] of every shape the batch layer plans apart.
const MIXED_SQLS: &[&str] = &[
    "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY ProductName",
    "SELECT zipcode, ProductName, price % 10 AS band, count(*) AS n FROM events GROUP BY zipcode, ProductName, price % 10",
    "SELECT coupon, count(*) AS n, min(ProductName) AS lo, max(ProductName) AS hi FROM events GROUP BY coupon",
    "SELECT upper(ProductName) AS p, length(coupon) AS l, count(*) AS n FROM events GROUP BY upper(ProductName), length(coupon)",
    "SELECT zipcode, count(DISTINCT ProductName) AS products, approx_distinct(coupon) AS coupons FROM events GROUP BY zipcode",
    "SELECT date_trunc('minute', timestamp) AS minute, ProductName, avg(price) AS a FROM events WHERE ProductName LIKE 'prod%' OR coupon = 'x' GROUP BY date_trunc('minute', timestamp), ProductName",
    "SELECT concat(ProductName, '/', coupon) AS pc, count(*) AS n FROM events GROUP BY concat(ProductName, '/', coupon)",
    "SELECT ProductName, first_value(coupon ORDER BY timestamp) AS first_coupon FROM events GROUP BY ProductName",
    "SELECT count(*) AS n, sum(price) AS s FROM events WHERE coupon IS NOT NULL",
];

/// `events` as `view` reads them: with `_partition`/`_offset` (all of
/// partition 0, numbered in order) when its ordered aggregates break ties
/// by them.
fn view_input(view: &View, events: &[RecordBatch]) -> Vec<RecordBatch> {
    if !view.needs_offsets() {
        return events.to_vec();
    }
    let mut first = 0u64;
    events
        .iter()
        .map(|b| {
            let out = crate::view::input::with_offsets(b, 0, first).unwrap();
            first += b.num_rows() as u64;
            out
        })
        .collect()
}

/// `batches` cast to `read`, the types a batch scan reads (strings as views).
fn as_scanned(read: &SchemaRef, batches: &[RecordBatch]) -> Vec<RecordBatch> {
    batches
        .iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .zip(read.fields())
                .map(|(c, f)| arrow::compute::cast(c, f.data_type()).unwrap())
                .collect::<Vec<_>>();
            RecordBatch::try_new(read.clone(), columns).unwrap()
        })
        .collect()
}

/// Rows as sorted lines, to compare answers whose order is not defined.
fn sorted_lines(batches: Vec<RecordBatch>) -> Vec<String> {
    let mut rows: Vec<String> = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string()
        .lines()
        .map(String::from)
        .collect();
    rows.sort();
    rows
}

/// The batch layer scans string columns as `Utf8View` (see
/// `compile::string_view_states`); the states it computes must finalize to
/// exactly what the plan over `Utf8` gives, for every kind of string a
/// view may group, aggregate or transform: short (inline in the view) and
/// long, multi-byte, empty, null.
#[tokio::test]
async fn states_over_string_views_equal_states_over_strings() {
    let (schema, events) = mixed_events();
    let sorted = sorted_lines;
    for &sql in MIXED_SQLS {
        let view = compile(&def(sql), &schema)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let read = view.scan_schema().clone();
        // approx_distinct hashes a view otherwise than a string: its HLL
        // states would not merge with the speed layer's, so it keeps Utf8.
        let over_views = !sql.contains("approx_distinct(coupon)");
        assert_eq!(
            read.fields()
                .iter()
                .any(|f| f.data_type() == &arrow::datatypes::DataType::Utf8View),
            over_views,
            "{sql}: the batch scan reads its strings as views unless an aggregate's state depends on their type"
        );
        let input = view_input(&view, &events);
        let expected = view
            .finalize(vec![view.states(input.clone()).await.unwrap()])
            .await
            .unwrap();
        // The same events as the scan reads them: strings as views.
        let viewed = as_scanned(&read, &input);
        let scan = |batches: Vec<RecordBatch>| {
            let leaf = datafusion::datasource::memory::MemorySourceConfig::try_new_exec(
                &[batches],
                read.clone(),
                view.leaf_projection().cloned(),
            )
            .unwrap();
            let view = &view;
            async move {
                view.run_states_plan(view.scan_states_plan_over(leaf).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
        };
        // Split between the layers: the first batch realtime (strings), the
        // rest archived (the scan's types), merged as a read merges them.
        // Values on both sides must count once.
        let realtime = view.states(vec![input[0].clone()]).await.unwrap();
        let archived = scan(viewed[1..].to_vec()).await;
        let merged = view
            .finalize(vec![realtime, archived, scan(viewed[..1].to_vec()).await])
            .await
            .unwrap();
        let twice = view
            .finalize(vec![
                view.states(input.clone()).await.unwrap(),
                view.states(vec![input[0].clone()]).await.unwrap(),
            ])
            .await
            .unwrap();
        assert_eq!(
            sorted(merged),
            sorted(twice),
            "{sql}: batch states over views merge with realtime states over strings as states over strings do"
        );
        let states = scan(viewed).await;
        assert_eq!(
            states.schema(),
            view.state_schema().clone(),
            "{sql}: states over views carry the state schema"
        );
        let got = view.finalize(vec![states]).await.unwrap();
        assert_eq!(
            sorted(got),
            sorted(expected),
            "{sql}: the view's rows over string views equal those over strings"
        );
    }
}

/// A view of many groups is computed with its events shuffled among the
/// cores by group key (`View::shuffled_states_plan`): each partition's
/// states then hold groups no other holds, and together they are the
/// merged states — every group once, finalizing to what one pass gives and
/// merging with the speed layer's states as any states do. Views whose
/// groups cannot be split by key (none, grouping sets) are not shuffled.
#[tokio::test]
async fn states_shuffled_by_group_key_are_the_merged_states() {
    let (schema, events) = mixed_events();
    let mut sqls = MIXED_SQLS.to_vec();
    sqls.push("SELECT ProductName, zipcode, count(*) AS n FROM events GROUP BY ROLLUP(ProductName, zipcode)");
    sqls.push("SELECT zipcode, count(*) AS n FROM events GROUP BY zipcode HAVING count(*) > 850");
    for sql in sqls {
        let view = match compile(&def(sql), &schema).await {
            Ok(v) => v,
            // A shape views do not take is not this test's business.
            Err(e) if sql.contains("ROLLUP") => {
                eprintln!("{sql}: {e}");
                continue;
            }
            Err(e) => panic!("{sql}: {e}"),
        };
        // Ordered aggregates break ties by `_partition`/`_offset`, which a
        // scan reads beside the events.
        let input = view_input(&view, &events);
        let read = view.scan_schema().clone();
        let viewed = as_scanned(&read, &input);
        // Three scans (file groups), shuffled into two partitions.
        let leaf = datafusion::datasource::memory::MemorySourceConfig::try_new_exec(
            &[
                vec![viewed[0].clone()],
                vec![viewed[1].clone()],
                vec![viewed[2].clone()],
            ],
            read.clone(),
            view.leaf_projection().cloned(),
        )
        .unwrap();
        let plan = view.shuffled_states_plan(leaf, 2).unwrap();
        let plain_keys = view.group_columns() > 0 && !sql.contains("ROLLUP");
        assert_eq!(
            plan.is_some(),
            plain_keys,
            "{sql}: shuffled exactly when the view groups by plain keys"
        );
        let Some(plan) = plan else { continue };
        assert_eq!(
            plan.properties().output_partitioning().partition_count(),
            2,
            "{sql}: the states come out of two partitions"
        );
        let shuffled = view
            .run_states_plan(plan)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let merged = view.states(input.clone()).await.unwrap();
        assert_eq!(
            shuffled.schema(),
            view.state_schema().clone(),
            "{sql}: shuffled states carry the state schema"
        );
        assert_eq!(
            shuffled.num_rows(),
            merged.num_rows(),
            "{sql}: every group once, as merged states hold it"
        );
        let expected = view.finalize(vec![merged.clone()]).await.unwrap();
        let got = view.finalize(vec![shuffled.clone()]).await.unwrap();
        assert_eq!(
            sorted_lines(got),
            sorted_lines(expected),
            "{sql}: shuffled states finalize to the view's rows"
        );
        // Merged with realtime states over the first batch again: as the
        // merged states are.
        let realtime = view.states(vec![input[0].clone()]).await.unwrap();
        let a = view
            .finalize(vec![shuffled, realtime.clone()])
            .await
            .unwrap();
        let b = view.finalize(vec![merged, realtime]).await.unwrap();
        assert_eq!(
            sorted_lines(a),
            sorted_lines(b),
            "{sql}: shuffled states merge with the speed layer's as merged states do"
        );
    }
}

/// A view's row count is its group count only when finalizing keeps every
/// group as one row and cannot fail: what lets a large view's run skip
/// finalizing when it writes no TSV. `unnest` makes rows (red team: 864,842
/// rows published where 2,000,000 were); HAVING and LIMIT drop them; an
/// expression over the aggregates may fail, and a failure must not depend
/// on the view's size (red team: a division by zero failed the batch run
/// of a small view and published a large one).
#[tokio::test]
async fn a_view_counts_its_rows_as_groups_only_when_finalizing_keeps_each() {
    let schema = EventSchema::paper();
    for (sql, keeps) in [
        (
            "SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName",
            true,
        ),
        (
            "SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName ORDER BY n DESC",
            true,
        ),
        (
            "SELECT ProductName, avg(price) AS a, min(zipcode) AS z FROM events GROUP BY ProductName",
            true,
        ),
        // An expression over the aggregates may fail (a division by zero):
        // finalized in every run, whatever the view's size.
        (
            "SELECT ProductName, sum(price) / count(*) AS a FROM events GROUP BY ProductName",
            false,
        ),
        ("SELECT zipcode, price FROM events WHERE price > 3", true),
        (
            "SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName HAVING count(*) > 2",
            false,
        ),
        (
            "SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName ORDER BY n DESC LIMIT 3",
            false,
        ),
        (
            "SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName ORDER BY ProductName LIMIT 3 OFFSET 1",
            false,
        ),
        (
            "SELECT zipcode, unnest(array_agg(price)) AS p FROM events GROUP BY zipcode",
            false,
        ),
    ] {
        let view = compile(&def(sql), &schema)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(
            view.every_group_a_row(),
            keeps,
            "{sql}: whether finalizing gives one row per group"
        );
    }
}

/// A point read finalizes a few groups' states directly (see
/// `view::direct`): for every view shape, and for any subset of groups,
/// that gives exactly the rows the final plan gives.
#[tokio::test]
async fn a_few_groups_finalize_directly_as_the_final_plan_finalizes_them() {
    let (schema, events) = mixed_events();
    let mut sqls = MIXED_SQLS.to_vec();
    sqls.extend([
        "SELECT zipcode, count(*) AS n FROM events GROUP BY zipcode HAVING count(*) > 850",
        "SELECT ProductName, sum(price) / count(*) AS mean, CASE WHEN max(price) > 90 THEN 'high' ELSE 'low' END AS top FROM events GROUP BY ProductName",
        "SELECT ProductName, stddev(price) AS sd, var_pop(price) AS v, median(price) AS m, bool_and(price > 1) AS b FROM events GROUP BY ProductName",
        "SELECT coupon, string_agg(ProductName, ',') AS names, array_agg(DISTINCT zipcode) AS zips FROM events GROUP BY coupon HAVING count(*) > 1",
        "SELECT zipcode, sum(price) AS s FROM events GROUP BY zipcode ORDER BY s DESC",
        "SELECT zipcode, sum(price) AS s FROM events GROUP BY zipcode ORDER BY s DESC LIMIT 3",
        "SELECT ProductName, zipcode, count(*) AS n FROM events GROUP BY ROLLUP(ProductName, zipcode)",
    ]);
    let mut direct = 0;
    for sql in sqls {
        let view = match compile(&def(sql), &schema).await {
            Ok(v) => v,
            // A shape views do not take is not this test's business.
            Err(e) => {
                eprintln!("{sql}: {e}");
                continue;
            }
        };
        let Some(d) = &view.direct else {
            assert!(
                view.group_columns() == 0 || sql.contains("ORDER BY") || sql.contains("ROLLUP"),
                "{sql}: a view whose final plan is an aggregation with projections and filters above it finalizes a few groups directly"
            );
            continue;
        };
        direct += 1;
        // One state batch per event batch: a group's rows come from several,
        // as a point read's come from the run and each realtime batch.
        let input = view_input(&view, &events);
        let mut parts = Vec::new();
        for b in &input {
            parts.push(view.states(vec![b.clone()]).await.unwrap());
        }
        // Every group; the groups of one key value; a few rows; nothing.
        let key = |b: &RecordBatch| {
            let first = b.column(0).slice(0, 1);
            let mask =
                arrow::compute::kernels::cmp::eq(b.column(0), &arrow::array::Scalar::new(first))
                    .unwrap();
            arrow::compute::filter_record_batch(b, &mask).unwrap()
        };
        let subsets: Vec<(&str, Vec<RecordBatch>)> = vec![
            ("every group", parts.clone()),
            ("one key", parts.iter().map(key).collect()),
            (
                "a few rows",
                parts
                    .iter()
                    .map(|b| b.slice(0, b.num_rows().min(3)))
                    .collect(),
            ),
            ("nothing", vec![parts[0].slice(0, 0)]),
            ("no batch", Vec::new()),
        ];
        for (what, subset) in subsets {
            let planned = view.finalize(subset.clone()).await.unwrap();
            let direct = d
                .run(&subset)
                .unwrap_or_else(|e| panic!("{sql}, {what}: the direct path failed: {e}"));
            assert_eq!(
                direct.schema(),
                planned
                    .first()
                    .map_or_else(|| view.output_schema().clone(), |b| b.schema()),
                "{sql}, {what}: the plan's schema"
            );
            let rows: usize = planned.iter().map(|b| b.num_rows()).sum();
            assert_eq!(direct.num_rows(), rows, "{sql}, {what}: as many rows");
            if rows > 0 {
                assert_eq!(
                    sorted_lines(vec![direct]),
                    sorted_lines(planned),
                    "{sql}, {what}: the direct rows are the final plan's"
                );
            }
        }
    }
    eprintln!("{direct} views took the direct path");
    assert!(direct >= 10, "only {direct} views took the direct path");
}
