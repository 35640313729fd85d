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
