//! `lambdaflow bench kafka`: consumption from a Kafka topic into views, and
//! freshness over Kafka (the broker's acknowledgement → visible in a merged
//! answer).
//!
//! ```text
//!  produce N events (acks=all) ──▶ topic ──▶ node (in process): speed layer ─▶ serving
//!                                                      time until R covers all N = consumption rate
//!  then one event at a time: ack ─▶ poll the serving snapshot until R passes its offset
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::config::Config;
use crate::node::Node;
use crate::produce::{Generator, group};
use crate::stream::kafka::{KafkaConfig, KafkaProducer};

#[derive(Debug, Args, Clone)]
pub struct KafkaBenchArgs {
    /// Bootstrap servers of the broker to measure against.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Events produced before the node starts, then consumed into views.
    #[arg(long, short = 'n', default_value_t = 1_000_000)]
    pub events: u64,
    /// Partitions of the (new) topic.
    #[arg(long, default_value_t = 2)]
    pub partitions: i32,
    /// Single events sent one by one for the freshness measurement.
    #[arg(long, default_value_t = 500)]
    pub probes: usize,
    /// librdkafka properties for the node's consumers, `KEY=VALUE` (repeat).
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,
}

pub fn kafka(args: KafkaBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: KafkaBenchArgs) -> anyhow::Result<()> {
    println!("## bench kafka");
    println!();
    let topic = format!("lambdaflow-bench-{}", std::process::id());
    let config = KafkaConfig {
        brokers: args.brokers.clone(),
        topic: topic.clone(),
        options: Default::default(),
    };
    let mut options = std::collections::BTreeMap::new();
    for o in &args.options {
        let (k, v) = o
            .split_once('=')
            .with_context(|| format!("--option {o:?}: expected KEY=VALUE"))?;
        options.insert(k.to_string(), v.to_string());
    }
    let admin: AdminClient<DefaultClientContext> = config.client().create()?;
    for r in admin
        .create_topics(
            [&NewTopic::new(
                &topic,
                args.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("could not create the topic")?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("could not create topic {t}: {e}"))?;
    }

    // Produce: the paper's events, one record each, spread over partitions.
    let producer = KafkaProducer::new(&config)?;
    let generator = Generator::new(7, Some(1_414_800_000_000), 10, 0.0).with_zipcodes(90_000);
    let t = Instant::now();
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let chunk = 50_000u64;
    let mut sent = 0u64;
    let mut buf = Vec::new();
    while sent < args.events {
        let n = chunk.min(args.events - sent);
        buf.clear();
        generator.write(sent, n, &mut buf);
        let parts = args.partitions as u64;
        let acks = producer
            .send(
                buf.split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .enumerate()
                    .map(|(i, l)| (Some(((sent + i as u64) % parts) as u32), None, l)),
            )
            .await?;
        for (p, o) in acks {
            let e = last.entry(p).or_default();
            *e = (*e).max(o);
        }
        sent += n;
    }
    let produce_s = t.elapsed().as_secs_f64();
    println!(
        "produce (this process, acks=all, idempotent): {} events in {:.2} s, {} events/s",
        group(sent),
        produce_s,
        group((sent as f64 / produce_s) as u64)
    );

    // Consume: a node on the topic, from offset 0, until R covers them all.
    let dir = tempfile::Builder::new()
        .prefix("lambdaflow-bench-kafka-")
        .tempdir()?;
    let node_config = Config {
        data: dir.path().join("data"),
        stream: crate::config::StreamConfig {
            kafka: Some(KafkaConfig {
                options,
                ..config.clone()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = Instant::now();
    let node = Node::open(node_config).await?;
    let layers = node.layers();
    let covered = |last: &BTreeMap<u32, u64>| {
        let r = layers.serving.snapshot().realtime_end.clone();
        last.iter()
            .all(|(&p, &o)| r.get(p as usize).is_some_and(|&e| e > o))
    };
    while !covered(&last) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let consume_s = t.elapsed().as_secs_f64();
    println!(
        "consume into views (a node opened on the topic, catching up from offset 0 with the three default views; opening included): {} events in {:.2} s, {} events/s",
        group(sent),
        consume_s,
        group((sent as f64 / consume_s) as u64),
    );

    // Freshness: one event at a time; acknowledged → in the serving snapshot.
    let mut lat = Vec::with_capacity(args.probes);
    let mut line = Vec::new();
    for k in 0..args.probes as u64 {
        line.clear();
        generator.write(args.events + k, 1, &mut line);
        let body = line.strip_suffix(b"\n").unwrap_or(&line).to_vec();
        let p = (k % args.partitions as u64) as u32;
        let acks = producer.send([(Some(p), None, body.as_slice())]).await?;
        let acked = Instant::now();
        let (p, o) = acks[0];
        let want = BTreeMap::from([(p, o)]);
        while !covered(&want) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(acked.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lat.sort();
    let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
    println!(
        "freshness ({} single events, broker ack → visible in the merged answer): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        lat.last().expect("probes").as_secs_f64() * 1e3
    );
    node.shutdown().await;
    Ok(())
}
