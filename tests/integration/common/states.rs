//! Batch layers opened in process over random master datasets, and their
//! published states compared: what the Ballista and incremental-run tests
//! check engines and run kinds against.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use lambdaflow::batch::{BatchLayer, Manifest};
use lambdaflow::chunk::ChunkRange;
use lambdaflow::config::{Config, EngineKind, ViewConfig};
use lambdaflow::stream::SourceBatch;
use lambdaflow::view::{View, oracle};

use crate::common;

/// A small deterministic generator (the cases must be reproducible).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub const BASE_MS: i64 = 1_414_800_000_000;

pub fn config(data: &Path, views: &[ViewConfig], scheduler: Option<&str>) -> Config {
    let mut c = Config {
        data: data.to_path_buf(),
        views: views.to_vec(),
        ..Config::default()
    };
    c.stream.partitions = 2;
    if let Some(s) = scheduler {
        c.batch.engine = EngineKind::Ballista;
        c.batch.scheduler = Some(s.to_string());
    }
    c
}

pub async fn open(config: &Config) -> Arc<BatchLayer> {
    let schema = config.event_schema().unwrap();
    let views = lambdaflow::view::compile_all(&config.views, &schema)
        .await
        .unwrap();
    lambdaflow::node::open_batch_in(config, config.storage().unwrap(), views)
        .await
        .unwrap()
}

/// A chunk of a random master dataset: its range and its events.
pub type Chunk = (ChunkRange, RecordBatch);

/// `n` random events of the paper's schema, in two partitions, each
/// partition cut into random chunks (one data file each), in commit order
/// per partition. Event times are `base_ms` plus up to `spread_ms`, in no
/// order: later chunks hold earlier (late) events too.
pub fn random_chunks(rng: &mut Lcg, n: usize, base_ms: i64, spread_ms: u64) -> [Vec<Chunk>; 2] {
    let mut parts: [Vec<(i64, String, i64, i64)>; 2] = Default::default();
    for i in 0..n {
        let row = (
            10_000 + rng.below(40) as i64,
            format!("product{}", rng.below(6)),
            rng.below(105) as i64 - 5,
            // Unique event times: first/last_value need a total order.
            base_ms + rng.below(spread_ms) as i64 / 1000 * 1000 + i as i64,
        );
        parts[i % 2].push(row);
    }
    let mut out: [Vec<Chunk>; 2] = Default::default();
    for (p, rows) in parts.iter().enumerate() {
        let mut cuts: Vec<usize> = (0..rng.below(6))
            .map(|_| rng.below(rows.len() as u64) as usize)
            .collect();
        cuts.push(0);
        cuts.push(rows.len());
        cuts.sort();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (start, end) = (w[0] as u64, w[1] as u64);
            let batch = common::paper_batch(rows[w[0]..w[1]].iter().cloned());
            let chunk = ChunkRange::new(p as u32, start, end, end - start).unwrap();
            out[p].push((chunk, batch));
        }
    }
    out
}

/// Commits chunks to the master dataset, one data file each.
pub async fn commit(layer: &BatchLayer, chunks: &[Chunk]) {
    for (chunk, batch) in chunks {
        let (p, start) = (chunk.partition(), chunk.start());
        layer
            .master()
            .commit_chunk(
                *chunk,
                vec![SourceBatch::dense(p, start, BASE_MS, batch.clone())],
                None,
            )
            .await
            .unwrap();
    }
}

/// A random master dataset of `n` events (see [`random_chunks`]), committed.
pub async fn random_master(layer: &BatchLayer, rng: &mut Lcg, n: usize) {
    for part in random_chunks(rng, n, BASE_MS, 3 * 3_600_000) {
        commit(layer, &part).await;
    }
}

/// A state set's rows as sorted text: equal exactly when the two sets hold
/// the same groups with the same states, in whatever order.
pub fn canonical(b: &RecordBatch) -> Vec<String> {
    let opts = FormatOptions::default().with_null("∅");
    let cols: Vec<ArrayFormatter> = b
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
        .collect();
    let mut rows: Vec<String> = (0..b.num_rows())
        .map(|r| {
            cols.iter()
                .map(|c| c.value(r).to_string())
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect();
    rows.sort();
    rows
}

/// Whether a state set compares exactly as text: no float (its last bits
/// depend on the order partial states merge in) and no list (a distinct
/// set's members come in arrival order).
pub fn exact_states(view: &View) -> bool {
    view.state_schema().fields().iter().all(|f| {
        !matches!(
            f.data_type(),
            DataType::Float16
                | DataType::Float32
                | DataType::Float64
                | DataType::List(_)
                | DataType::LargeList(_)
                | DataType::Binary
                | DataType::Struct(_)
        )
    })
}

/// Two layers' runs and what to call them in a failure.
pub struct Side<'a> {
    pub layer: &'a BatchLayer,
    pub run: &'a Manifest,
    /// "the local engine", "Ballista", "the incremental run", …
    pub name: &'a str,
}

/// The published states of every view of two runs: same groups, same
/// finalized rows; same states where states compare exactly. A view that
/// rolls up on `a` but not on `b` has `b`'s states rolled up at `a`'s time
/// (exactly what `a` must hold); one that rolls up on both has both rolled
/// up at the later run's time (runs at different times of the same events).
pub async fn assert_same_runs(
    a: Side<'_>,
    b: Side<'_>,
    ordered: &BTreeMap<String, bool>,
    case: &str,
) {
    let (na, nb) = (a.name, b.name);
    assert_eq!(a.run.h, b.run.h, "{case}: both runs cover the same events");
    assert_eq!(a.run.events, b.run.events);
    let at = a.run.as_of_ms.max(b.run.as_of_ms);
    for view in a.layer.views().iter() {
        let name = view.name();
        let (ea, eb) = (&a.run.views[name], &b.run.views[name]);
        assert_eq!(
            ea.excluded, eb.excluded,
            "{case}: view `{name}`: {na} and {nb} leave out the same events"
        );
        let vb = b
            .layer
            .views()
            .iter()
            .find(|v| v.name() == name)
            .unwrap()
            .clone();
        let mut sa = a.layer.read_states(a.run, view).await.unwrap();
        let mut sb = b.layer.read_states(b.run, &vb).await.unwrap();
        match (view.rollup(), vb.rollup()) {
            (Some(_), None) => sb = view.roll_up(sb, a.run.as_of_ms).await.unwrap(),
            (Some(_), Some(_)) => {
                sa = view.roll_up(sa, at).await.unwrap();
                sb = view.roll_up(sb, at).await.unwrap();
            }
            _ => {}
        }
        assert_eq!(
            sa.num_rows(),
            sb.num_rows(),
            "{case}: view `{name}`: {na} published {} groups, {nb} {}",
            sa.num_rows(),
            sb.num_rows()
        );
        if exact_states(view) {
            assert_eq!(
                canonical(&sa),
                canonical(&sb),
                "{case}: view `{name}`: the states of {na} differ from those of {nb}"
            );
        }
        let ra = view.finalize(vec![sa]).await.unwrap();
        let rb = view.finalize(vec![sb]).await.unwrap();
        let ordered = ordered.get(name).copied().unwrap_or(false);
        if let Err(diff) = oracle::same_rows(&rb, &ra, ordered, 1e-9) {
            panic!("{case}: view `{name}`: the rows of {na} differ from those of {nb}: {diff}");
        }
    }
}

/// The views engines and run kinds are compared on: the paper's three, the
/// merge-law views of the property tests, one that fails on the events of
/// price 0 (`inverse`), and `extra`; names unique, sorted. Returns the
/// definitions and, per name, whether its rows compare in order.
pub fn compared_views(extra: Vec<ViewConfig>) -> (Vec<ViewConfig>, BTreeMap<String, bool>) {
    let mut views: Vec<(ViewConfig, bool)> = Config::default()
        .views
        .into_iter()
        .map(|v| (v, false))
        .collect();
    views.extend(crate::views::paper_views());
    views.push((
        ViewConfig {
            name: "inverse".into(),
            sql: "SELECT ProductName, sum(100 / price) AS inv FROM events GROUP BY ProductName"
                .into(),
            rollup: Vec::new(),
        },
        false,
    ));
    views.extend(extra.into_iter().map(|v| (v, false)));
    views.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    views.dedup_by(|a, b| a.0.name == b.0.name);
    let ordered = views.iter().map(|(v, o)| (v.name.clone(), *o)).collect();
    (views.into_iter().map(|(v, _)| v).collect(), ordered)
}
