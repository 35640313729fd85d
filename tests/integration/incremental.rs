//! Incremental batch runs: a run that merges the files added since the
//! published run into its states publishes what a full recompute over the
//! same files does — for random events (late ones included), random run
//! boundaries, every merge-law view, a view failing on some events and a
//! view whose rollup tiers cross between runs. Also: when a run is full and
//! why (the policy, a changed view, unusable published states), and time
//! travel to every kept run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lambdaflow::batch::{AsOf, BatchLayer, Manifest, RunKind};
use lambdaflow::config::{RollupConfig, ViewConfig};
use proptest::prelude::*;

use crate::common;
use crate::common::states::{
    Chunk, Lcg, Side, assert_same_runs, commit, compared_views, config, open, random_chunks,
};

/// The views: the paper's, the merge-law views of the property tests, one
/// failing on the events of price 0, and one whose rollup tiers (seconds)
/// cross between runs a few hundred milliseconds apart.
fn views() -> (Vec<ViewConfig>, BTreeMap<String, bool>) {
    compared_views(vec![ViewConfig {
        name: "per_second_rolled".into(),
        sql: "SELECT date_trunc('second', timestamp) AS second, ProductName, count(*) AS orders, \
                  sum(price) AS revenue, min(price) AS low FROM events GROUP BY 1, 2"
            .into(),
        rollup: vec![
            RollupConfig {
                after: Duration::from_secs(1),
                bucket: "2s".into(),
            },
            RollupConfig {
                after: Duration::from_secs(3),
                bucket: "8s".into(),
            },
        ],
    }])
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A full recompute over the master dataset copied to `root` — without
/// rollup, so that the comparison rolls its states up at the incremental
/// run's own time.
async fn full_recompute(
    root: &Path,
    defs: &[ViewConfig],
) -> (std::sync::Arc<BatchLayer>, Manifest) {
    let mut defs = defs.to_vec();
    for d in &mut defs {
        d.rollup.clear();
    }
    let layer = open(&config(root, &defs, None)).await;
    let m = layer.rebuild(None, None).await.unwrap();
    (layer, m)
}

/// The chunks with `delta_ms` added to every event time.
fn shifted(chunks: Vec<Chunk>, delta_ms: i64) -> Vec<Chunk> {
    use arrow::array::{AsArray, TimestampMillisecondArray};
    use arrow::datatypes::TimestampMillisecondType;
    chunks
        .into_iter()
        .map(|(range, b)| {
            let t: TimestampMillisecondArray = b
                .column(3)
                .as_primitive::<TimestampMillisecondType>()
                .unary(|v| v + delta_ms);
            let mut cols = b.columns().to_vec();
            cols[3] = std::sync::Arc::new(t.with_data_type(b.column(3).data_type().clone()));
            (
                range,
                arrow::record_batch::RecordBatch::try_new(b.schema(), cols).unwrap(),
            )
        })
        .collect()
}

/// Each partition's chunks split into `steps` consecutive groups at random.
fn split(chunks: [Vec<Chunk>; 2], steps: usize, rng: &mut Lcg) -> Vec<Vec<Chunk>> {
    let mut out: Vec<Vec<Chunk>> = vec![Vec::new(); steps];
    for part in chunks {
        let mut cuts: Vec<usize> = (0..steps - 1)
            .map(|_| rng.below(part.len() as u64 + 1) as usize)
            .collect();
        cuts.sort();
        for (i, c) in part.into_iter().enumerate() {
            let step = cuts.iter().filter(|&&x| x <= i).count();
            out[step].push(c);
        }
    }
    out
}

fn incremental_equals_full(seed: u64, n: usize, steps: usize) {
    let (defs, ordered) = views();
    common::rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let layer = open(&config(dir.path(), &defs, None)).await;
        let mut rng = Lcg(seed);
        // Event times within 6 s before each commit (their order random,
        // so late events too), runs 150–450 ms apart: the rollup tiers
        // cross between runs.
        let chunks = random_chunks(&mut rng, n, 0, 6_000);
        let mut runs: Vec<(Manifest, tempfile::TempDir)> = Vec::new();
        let mut prev: Option<Manifest> = None;
        for (step, group) in split(chunks, steps, &mut rng).into_iter().enumerate() {
            let now = chrono::Utc::now().timestamp_millis();
            commit(&layer, &shifted(group, now - 6_000)).await;
            tokio::time::sleep(Duration::from_millis(150 + rng.below(300))).await;
            let m = layer.run(None).await.unwrap();
            let case = format!("seed {seed}, {n} events, run {} of {steps}", step + 1);
            for (name, e) in &m.views {
                match &prev {
                    None => assert_eq!(
                        e.lineage.kind,
                        RunKind::Full,
                        "{case}: `{name}`: the first run is full"
                    ),
                    Some(p) => {
                        assert_eq!(
                            e.lineage.kind,
                            RunKind::Incremental,
                            "{case}: `{name}`: a later run is incremental ({:?})",
                            e.lineage.reason
                        );
                        assert_eq!(
                            e.lineage.from.as_ref(),
                            Some(&p.h),
                            "{case}: `{name}` adds what follows the published H"
                        );
                        assert_eq!(e.lineage.base_run, Some(p.views[name].run));
                        assert_eq!(
                            e.lineage.events,
                            m.events - p.events,
                            "{case}: `{name}` reads only the new events"
                        );
                    }
                }
            }
            // The table as this run read it, for a full recompute later
            // (computing it now would space the runs too far apart).
            let copy = tempfile::tempdir().unwrap();
            copy_dir(&dir.path().join("master"), &copy.path().join("master"));
            prev = Some(m.clone());
            runs.push((m, copy));
        }
        for (i, (m, copy)) in runs.iter().enumerate() {
            let (full, f) = full_recompute(copy.path(), &defs).await;
            let case = format!("seed {seed}, {n} events, run {} of {steps}", i + 1);
            assert_same_runs(
                Side {
                    layer: &layer,
                    run: m,
                    name: "the incremental run",
                },
                Side {
                    layer: &full,
                    run: &f,
                    name: "a full recompute",
                },
                &ordered,
                &case,
            )
            .await;
            // Time travel: every run is kept, and still answers for its events.
            let past = layer.manifest_as_of(AsOf::Run(m.run)).await.unwrap();
            assert_eq!(&past, m, "run {} as it was published", m.run);
            let by_time = layer
                .manifest_as_of(AsOf::Time(m.published_ms()))
                .await
                .unwrap();
            assert_eq!(
                by_time.run, m.run,
                "the run published at its own publish time"
            );
            assert_same_runs(
                Side {
                    layer: &layer,
                    run: &past,
                    name: "the kept run",
                },
                Side {
                    layer: &full,
                    run: &f,
                    name: "a full recompute",
                },
                &ordered,
                &format!("{case}, read back later"),
            )
            .await;
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn every_incremental_run_publishes_what_a_full_recompute_does(
        seed in any::<u64>(), n in 200usize..1500, steps in 2usize..5
    ) {
        incremental_equals_full(seed, n, steps);
    }
}

#[test]
fn runs_are_full_when_the_policy_a_changed_view_or_unusable_states_say_so() {
    let defs = lambdaflow::config::Config::default().views;
    common::rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), &defs, None);
        c.batch.full_every = 2;
        let layer = open(&c).await;
        let mut rng = Lcg(11);
        let now = chrono::Utc::now().timestamp_millis();
        let groups = split(
            random_chunks(&mut rng, 900, now - 5_000, 5_000),
            6,
            &mut rng,
        );
        let kinds =
            |m: &Manifest| -> Vec<RunKind> { m.views.values().map(|e| e.lineage.kind).collect() };
        let mut seen = Vec::new();
        for g in &groups[..4] {
            commit(&layer, g).await;
            let m = layer.run(None).await.unwrap();
            seen.push(kinds(&m)[0]);
        }
        use RunKind::{Full, Incremental};
        assert_eq!(
            seen,
            [Full, Incremental, Incremental, Full],
            "full_every = 2: two incremental runs, then a full one"
        );
        let last = layer.current().await.unwrap().unwrap();
        let reason = last.views[&defs[0].name].lineage.reason.clone().unwrap();
        assert!(reason.contains("full_every = 2"), "{reason}");

        // A corrupt published states file: that view is recomputed in full.
        let victim = &last.views[&defs[1].name].states.path;
        std::fs::write(dir.path().join(victim), b"not parquet").unwrap();
        commit(&layer, &groups[4]).await;
        let m = layer.run(None).await.unwrap();
        let e = &m.views[&defs[1].name];
        assert_eq!(
            e.lineage.kind, Full,
            "unusable published states mean a full recompute"
        );
        let reason = e.lineage.reason.clone().unwrap();
        assert!(
            reason.contains("unusable") && reason.contains("is corrupt"),
            "{reason}"
        );
        assert_eq!(m.views[&defs[0].name].lineage.kind, Incremental);

        // A view whose SQL changed is recomputed in full; the others go on.
        let mut changed = defs.clone();
        changed[2].sql = changed[2]
            .sql
            .replace("count(*) AS orders", "count(price) AS orders");
        assert_ne!(changed[2].sql, defs[2].sql, "the SQL changed");
        let mut c2 = config(dir.path(), &changed, None);
        c2.batch.full_every = 2;
        let layer = open(&c2).await;
        commit(&layer, &groups[5]).await;
        let m = layer.run(None).await.unwrap();
        let e = &m.views[&changed[2].name];
        assert_eq!(e.lineage.kind, Full);
        assert!(
            e.lineage
                .reason
                .as_deref()
                .unwrap()
                .contains("the view changed"),
            "{:?}",
            e.lineage.reason
        );
        assert_eq!(m.views[&defs[0].name].lineage.kind, Incremental);
        // And `rebuild` is always from scratch.
        let m = layer.rebuild(None, None).await.unwrap();
        assert!(m.views.values().all(|e| e.lineage.kind == Full));
        // A run no longer kept is refused with what is kept.
        let e = layer.manifest_as_of(AsOf::Run(999)).await.unwrap_err();
        let hint = lambdaflow::error::Explain::hint(&e).unwrap_or_default();
        assert!(
            e.to_string().contains("no published run numbered 999"),
            "{e}"
        );
        assert!(hint.contains("are kept"), "{hint}");
    });
}
