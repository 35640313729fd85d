//! Golden tests in the spirit of Arroyo's: each default view over a fixed
//! event file gives the checked-in rows — computed in one batch, as 100
//! micro-batches merged as the speed layer merges them, and after a round trip
//! of the states through Parquet (as restored from a stored batch view).
//!
//! `UPDATE_GOLDEN=1 cargo test --test integration golden::` rewrites the expected files;
//! review the diff before committing it.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use lambdaflow::config::Config;
use lambdaflow::schema::EventSchema;
use lambdaflow::stream::{Decoder, Partitioning};
use lambdaflow::view::{View, compile, oracle, store::to_tsv};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The rows as sorted TSV (views without ORDER BY have no row order).
fn render(view: &View, batches: &[RecordBatch]) -> String {
    let tsv = to_tsv(view.output_schema(), batches);
    let mut lines: Vec<&str> = tsv.lines().collect();
    let header = lines.remove(0);
    if !view.sql().to_ascii_uppercase().contains("ORDER BY") {
        lines.sort_unstable();
    }
    let mut out = String::from(header);
    for l in lines {
        out.push('\n');
        out.push_str(l);
    }
    out.push('\n');
    out
}

#[tokio::test]
async fn default_views_match_their_golden_rows_in_batch_stream_and_restored() {
    let body = std::fs::read(golden_dir().join("events.ndjson")).expect("golden events");
    let schema = Arc::new(EventSchema::paper());
    let decoded = Decoder::new(schema.clone(), Partitioning::RoundRobin).decode(&body, 0);
    assert!(decoded.rejects.is_empty(), "{:?}", decoded.rejects.first());
    let all = decoded.batches[0].1.clone();
    assert_eq!(all.num_rows(), 2000);

    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for def in Config::default().views {
        let view = compile(&def, &schema).await.unwrap();

        // Batch: one pass over all events.
        let s = view.states(vec![all.clone()]).await.unwrap();
        let batch = render(&view, &view.finalize(vec![s.clone()]).await.unwrap());

        // The golden rows are right, not only stable: they equal plain SQL.
        let direct = oracle::run_sql(&schema, view.sql(), vec![all.clone()])
            .await
            .unwrap();
        let one = view.finalize(vec![s.clone()]).await.unwrap();
        oracle::same_rows(&one, &direct, view.sql().contains("ORDER BY"), 1e-12).unwrap_or_else(
            |d| {
                panic!(
                    "view `{}` differs from its SQL run directly: {d}",
                    view.name()
                )
            },
        );

        // Stream: 100 micro-batches of 20 events, each merged into the running states.
        let mut acc = view.states(Vec::new()).await.unwrap();
        for k in 0..100 {
            let micro = view.states(vec![all.slice(k * 20, 20)]).await.unwrap();
            acc = view.merge(vec![acc, micro]).await.unwrap();
        }
        let stream = render(&view, &view.finalize(vec![acc]).await.unwrap());

        // Restored: the batch states through Parquet and back.
        let restored_states = view
            .states_from_parquet(view.states_to_parquet(&s).unwrap().into())
            .unwrap();
        let restored = render(&view, &view.finalize(vec![restored_states]).await.unwrap());

        let path = golden_dir().join(format!("{}.tsv", view.name()));
        if update {
            std::fs::write(&path, &batch).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "missing {}: run with UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert_eq!(
            batch,
            want,
            "view `{}` in one batch differs from {}",
            view.name(),
            path.display()
        );
        assert_eq!(
            stream,
            want,
            "view `{}` as 100 merged micro-batches differs from {}",
            view.name(),
            path.display()
        );
        assert_eq!(
            restored,
            want,
            "view `{}` restored from Parquet differs from {}",
            view.name(),
            path.display()
        );
    }
}
