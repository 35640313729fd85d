//! `lambdaflow demo`: the one-command tour on a temporary data directory.
//!
//! Starts the server in-process, sends the paper's 10,000 events with
//! `produce`, sends a few bad lines to show what happens to them, reads the
//! events back from the durable log, and says where the API is.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::cli::DemoArgs;
use crate::config::Config;
use crate::produce::{self, ProduceOptions, group};
use crate::serve::{self, Node, ServeError};
use crate::stream::DeadLetters;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("lambdaflow-demo-")
        .tempdir()
        .context("could not create a temporary data directory")?;
    let config = Config {
        data: dir.path().to_path_buf(),
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
    println!("lambdaflow demo");
    println!(
        "  data directory  {} (removed on exit)",
        dir.path().display()
    );
    println!("  API             {base}");
    println!();
    println!(
        "1. producing {} of the paper's events (seed 42)…",
        group(args.events)
    );
    let summary = produce::run(ProduceOptions {
        url: base.clone(),
        events: args.events,
        seed: Some(42),
        ..ProduceOptions::default()
    })
    .await?;
    println!("{summary}");

    println!();
    println!(
        "2. sending three bad lines with one good one — each bad line is refused with its reason:"
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
    println!("3. what the durable log holds now:");
    let log = node.ingest.log();
    let mut total = 0;
    for s in log.stats() {
        println!(
            "   partition {}: offsets [{}, {}) in {} segment(s), {} bytes, {} fsyncs for {} frames",
            s.partition,
            s.start,
            s.end,
            s.segments,
            group(s.bytes),
            s.fsyncs,
            s.frames
        );
        total += s.end - s.start;
    }
    println!("   {} events in all", group(total));
    let first = log.read(0, 0, 5)?;
    if let Some(b) = first.first() {
        let head = b.batch.slice(0, b.batch.num_rows().min(5));
        println!("   the first events of partition 0, as stored (typed Arrow columns):");
        for line in arrow::util::pretty::pretty_format_batches(&[head])?
            .to_string()
            .lines()
        {
            println!("   {line}");
        }
    }
    let dead = DeadLetters::read_all(node.ingest.dead_letters().dir())?;
    println!(
        "   dead-letter store: {} line(s) with their reasons in {}",
        dead.len(),
        node.ingest.dead_letters().dir().display()
    );

    println!();
    println!("Try it:");
    println!("  lambdaflow produce --url {base} --events 100000");
    println!("  curl -s {base}/v1/status");
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
