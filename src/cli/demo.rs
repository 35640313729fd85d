//! `lambdaflow demo`: the one-command tour of the Lambda Architecture on a
//! temporary data directory.
//!
//! ```text
//!  produce 10,000 events ─▶ speed layer: merged views from realtime chunks only
//!                        ─▶ archive + one batch cycle: the same views from the batch view
//!  (the two must be equal: nothing counted twice, nothing missed at the handoff)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::DemoArgs;
use crate::config::{ArchiveConfig, BatchConfig, Config};
use crate::frontend::serve::{self, Node, ServeError};
use crate::node::Layers;
use crate::produce::{self, ProduceOptions, group};
use crate::view::store::to_tsv;

/// Waits until `done` holds, or fails after `within`.
async fn wait_for(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Every view's merged rows, as TSV (rows sorted), with its freshness line.
async fn views_now(layers: &Layers) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for (i, v) in layers.serving.live() {
        let a = layers.serving.answer(i).await?;
        let tsv = to_tsv(v.output_schema(), &a.rows);
        let mut lines: Vec<&str> = tsv.lines().collect();
        let header = lines.remove(0);
        lines.sort_unstable();
        let body = std::iter::once(header)
            .chain(lines)
            .collect::<Vec<_>>()
            .join("\n");
        let f = serde_json::to_value(&a.freshness)?;
        out.push((v.name().to_string(), body, crate::cli::render_freshness(&f)));
    }
    Ok(out)
}

fn print_views(views: &[(String, String, String)]) {
    for (name, tsv, freshness) in views {
        let lines: Vec<Vec<&str>> = tsv.lines().map(|l| l.split('\t').collect()).collect();
        println!(
            "   {name}: {} rows — {freshness}",
            group(lines.len() as u64 - 1)
        );
        let shown = &lines[..lines.len().min(6)];
        let widths: Vec<usize> = (0..shown[0].len())
            .map(|c| {
                shown
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.len()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in shown {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("     {}", cells.join(" │ ").trim_end());
        }
        if lines.len() > 6 {
            println!("     …");
        }
    }
}

/// How a newcomer runs this binary from their shell: `lambdaflow` if that
/// is on the PATH and is this program, `cargo run --` when cargo started
/// it (after `cargo run -- demo` the binary is not on the PATH), else its
/// path.
fn invocation() -> String {
    let me = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("lambdaflow"))
            .find(|p| p.is_file())
    });
    let same = |a: &std::path::Path, b: &std::path::Path| {
        std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
    };
    match (&me, &on_path) {
        (Some(me), Some(p)) if same(me, p) => "lambdaflow".into(),
        _ if std::env::var_os("CARGO").is_some() => "cargo run --".into(),
        (Some(me), _) => me.display().to_string(),
        _ => "lambdaflow".into(),
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("lambdaflow-demo-")
        .tempdir()
        .context("could not create a temporary data directory")?;
    let config = Config {
        data: dir.path().to_path_buf(),
        // Short chunks, and a batch loop that waits for the tour to call it.
        archive: ArchiveConfig {
            chunk_age: Duration::from_millis(500),
            ..ArchiveConfig::default()
        },
        batch: BatchConfig {
            pause: Duration::from_secs(3600),
            ..BatchConfig::default()
        },
        // Postgres clients on a free port: 5432 may be a real Postgres.
        pg: crate::config::PgConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..crate::config::PgConfig::default()
        },
        ..Config::default()
    };
    let node = Node::open(config).await?;
    let wanted = args.listen.unwrap_or(node.config.listen);
    let server = match serve::start(&node, wanted).await {
        Ok(s) => s,
        Err(ServeError::Bind { .. }) if args.listen.is_none() => {
            serve::start(&node, SocketAddr::from(([127, 0, 0, 1], 0))).await?
        }
        Err(e) => return Err(e.into()),
    };
    let base = format!("http://{}", server.addr);
    let layers: Arc<Layers> = node.layers();
    let log = node.ingest.log().clone();
    println!("lambdaflow demo — the Lambda Architecture on one machine");
    println!(
        "  data directory  {} (removed on exit)",
        dir.path().display()
    );
    println!("  API             {base}");
    println!("  dashboard       {base}/");
    if let Some(pg) = &server.pg {
        println!("  Postgres        {}", pg.url());
    }
    println!();

    println!(
        "1. The producer sends {} of the paper's events (seed 42, 5% of them hours late) to POST /v1/events:",
        group(args.events)
    );
    let summary = produce::run(ProduceOptions {
        url: base.clone(),
        events: args.events,
        seed: Some(42),
        late: 0.05,
        ..ProduceOptions::default()
    })
    .await?;
    println!("{summary}");
    if summary.failed > 0 {
        bail!("the producer failed: {:?}", summary.first_error);
    }
    println!();

    let ends = |log: &crate::stream::Log| -> Vec<u64> {
        (0..log.partitions())
            .map(|p| log.end_offset(p).unwrap_or(0))
            .collect()
    };
    let target = ends(&log);
    wait_for("the speed layer", Duration::from_secs(30), || {
        layers.serving.snapshot().realtime_end == target
    })
    .await?;
    println!("2. The speed layer has every event (high-water marks {target:?}). The batch view is");
    println!("   still empty: its run covers no events yet (H = 0 on every partition below).");
    println!("   The merged views, all from realtime chunks:");
    let before = views_now(&layers).await?;
    print_views(&before);
    println!();

    println!(
        "3. The speed layer closes its chunks; the archiver commits them to the master dataset"
    );
    println!(
        "   (a Delta Lake table); one batch cycle recomputes every view from it and publishes."
    );
    wait_for("the archiver", Duration::from_secs(60), || {
        layers.master.coverage().h.ends() == target.as_slice()
    })
    .await?;
    let t = Instant::now();
    layers.batch_now.notify_one();
    wait_for("the batch run", Duration::from_secs(120), || {
        layers.serving.snapshot().h().ends() == target.as_slice()
    })
    .await?;
    let m = layers.batch.current().await?.context("a published run")?;
    println!(
        "   batch run {} published in {:.2} s: H = {:?}, {} events, master dataset version {}",
        m.run,
        t.elapsed().as_secs_f64(),
        m.h,
        group(m.events),
        m.table_version
    );
    println!("   The merged views now, all from the batch view:");
    let after = views_now(&layers).await?;
    print_views(&after);
    let same = before.iter().zip(&after).all(|(a, b)| a.1 == b.1);
    println!();
    if same {
        println!(
            "   Before and after the batch run: identical rows — nothing counted twice, nothing missed."
        );
    } else {
        bail!(
            "the views changed across the batch/realtime handoff; this is a bug, please report it"
        );
    }
    println!();

    println!(
        "4. Bad lines are refused with a reason and kept in the dead-letter store; good ones stay:"
    );
    let bad = concat!(
        "{\"zipcode\":95126,\"ProductName\":\"product2\",\"price\":\"abc\",\"timestamp\":\"2014-11-01 19:35:41.158\"}\n",
        "{\"zipcode\":95126,\"ProductName\":\"product2\",\"price\":16,\"timestamp\":\"2014-11-01 25:00:00.000\"}\n",
        "{\"zipcode\":95126,\"productname\":\"product2\",\"price\":16,\"timestamp\":\"2014-11-01 19:35:41.158\"}\n",
        "{\"zipcode\":95126,\"ProductName\":\"product2\",\"price\":16,\"timestamp\":\"2014-11-01 19:35:41.158\"}\n",
    );
    let reply = reqwest::Client::new()
        .post(format!("{base}/v1/events"))
        .body(bad)
        .send()
        .await
        .context("sending the bad lines")?;
    let body: serde_json::Value = reply.json().await.context("reading the reply")?;
    println!(
        "   accepted {}, rejected {}",
        body["accepted"], body["rejected"]
    );
    for e in body["errors"].as_array().into_iter().flatten() {
        println!("   {}", e["message"].as_str().unwrap_or_default());
    }
    println!();

    let me = invocation();
    println!("Try it, while this runs (in another terminal, from this directory):");
    println!("  open {base}/ in a browser: the live dashboard");
    if let Some(pg) = &server.pg {
        println!(
            "  psql \"{}\" -c \"SELECT * FROM sales_by_product ORDER BY revenue DESC LIMIT 3\"",
            pg.url()
        );
    }
    println!("  curl -s '{base}/v1/views/sales_by_product?ProductName=product2'");
    println!(
        "  {me} sql --url {base} \"SELECT * FROM sales_by_product ORDER BY revenue DESC LIMIT 3\""
    );
    println!("  {me} produce --url {base} --events 100000 --late 0.1");
    println!("  {me} status --url {base}");
    if me != "lambdaflow" {
        println!(
            "  (or install the binary once with `cargo install --path .`, then `lambdaflow …`)"
        );
    }
    if args.exit {
        server.stop().await?;
    } else {
        println!("Serving on {base} — Ctrl-C to stop.");
        serve::shutdown_signal().await;
        tokio::time::timeout(Duration::from_secs(10), server.stop())
            .await
            .context("the server did not stop within 10 s")??;
    }
    node.shutdown().await;
    Ok(())
}
