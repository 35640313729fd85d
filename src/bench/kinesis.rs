//! `lambdaflow bench kinesis`: consumption from a Kinesis stream into views,
//! and freshness over Kinesis (PutRecords' acknowledgement → visible in a
//! merged answer). Meant for an emulator on this machine (kinesalite): on
//! AWS the shard budget (1 MB/s in, 2 MB/s out per shard) sets the figures.
//!
//! ```text
//!  PutRecords N events ──▶ stream ──▶ node (in process): shard pollers ─▶ speed layer ─▶ serving
//!                                             time until R covers all N = consumption rate
//!  then one event at a time: put ─▶ poll the serving snapshot until R passes it
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;

use crate::config::Config;
use crate::node::Node;
use crate::produce::{Generator, group};
use crate::stream::kinesis::{KinesisConfig, KinesisProducer};

#[derive(Debug, Args, Clone)]
pub struct KinesisBenchArgs {
    /// The Kinesis endpoint to measure against (an emulator); credentials
    /// and region from the usual AWS chain.
    #[arg(long, default_value = "http://127.0.0.1:4567")]
    pub endpoint: String,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Events put before the node starts, then consumed into views.
    #[arg(long, short = 'n', default_value_t = 200_000)]
    pub events: u64,
    /// Shards of the (new) stream.
    #[arg(long, default_value_t = 2)]
    pub shards: i32,
    /// Single events put one by one for the freshness measurement.
    #[arg(long, default_value_t = 200)]
    pub probes: usize,
    /// How often each shard is polled when idle.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub poll: Duration,
}

pub fn kinesis(args: KinesisBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: KinesisBenchArgs) -> anyhow::Result<()> {
    println!("## bench kinesis");
    println!();
    let stream = format!("lambdaflow-bench-{}", std::process::id());
    let config = KinesisConfig {
        stream: stream.clone(),
        region: Some(args.region.clone()),
        endpoint: Some(args.endpoint.clone()),
        poll: args.poll,
    };
    let client = config.client().await;
    client
        .create_stream()
        .stream_name(&stream)
        .shard_count(args.shards)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", aws_sdk_kinesis::error::DisplayErrorContext(e)))
        .with_context(|| format!("could not create stream {stream} at {}", args.endpoint))?;
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_kinesis::error::DisplayErrorContext(e)))?;
        if d.stream_description_summary()
            .is_some_and(|s| s.stream_status().as_str() == "ACTIVE")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Produce: the paper's events, one record each, each under its own key.
    let producer = KinesisProducer::new(&config).await;
    let generator = Generator::new(7, Some(1_414_800_000_000), 10, 0.0).with_zipcodes(90_000);
    let t = Instant::now();
    let chunk = 5_000u64;
    let mut sent = 0u64;
    let mut buf = Vec::new();
    while sent < args.events {
        let n = chunk.min(args.events - sent);
        buf.clear();
        generator.write(sent, n, &mut buf);
        let records: Vec<(String, Bytes)> = buf
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| ((sent + i as u64).to_string(), Bytes::copy_from_slice(l)))
            .collect();
        producer.send(&records).await?;
        sent += n;
    }
    let produce_s = t.elapsed().as_secs_f64();
    println!(
        "produce (this process, PutRecords of 500): {} events in {:.2} s, {} events/s",
        group(sent),
        produce_s,
        group((sent as f64 / produce_s) as u64)
    );

    // Consume: a node on the stream, from the shards' start, until R covers them all.
    let dir = tempfile::Builder::new()
        .prefix("lambdaflow-bench-kinesis-")
        .tempdir()?;
    let node_config = Config {
        data: dir.path().join("data"),
        stream: crate::config::StreamConfig {
            kinesis: Some(config.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = Instant::now();
    let node = Node::open(node_config).await?;
    let layers = node.layers();
    // Positions are dense ordinals: R summed over the shards counts the events in.
    let consumed = || -> u64 { layers.serving.snapshot().realtime_end.iter().sum() };
    while consumed() < sent {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let consume_s = t.elapsed().as_secs_f64();
    println!(
        "consume into views (a node opened on the stream, reading every shard from its start with the three default views; opening included): {} events in {:.2} s, {} events/s",
        group(sent),
        consume_s,
        group((sent as f64 / consume_s) as u64),
    );

    // Freshness: one event at a time; stored → in the serving snapshot.
    let mut lat = Vec::with_capacity(args.probes);
    let mut line = Vec::new();
    for k in 0..args.probes as u64 {
        line.clear();
        generator.write(args.events + k, 1, &mut line);
        let body = Bytes::copy_from_slice(line.strip_suffix(b"\n").unwrap_or(&line));
        producer.send(&[(k.to_string(), body)]).await?;
        let acked = Instant::now();
        while consumed() < sent + k + 1 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(acked.elapsed());
    }
    lat.sort();
    let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
    println!(
        "freshness ({} single events, put acknowledged → visible in the merged answer; shards polled every {:?}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        args.poll,
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        lat.last().expect("probes").as_secs_f64() * 1e3
    );
    node.shutdown().await;
    Ok(())
}
