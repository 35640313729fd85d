//! The oracle over Kafka with a broker's faults at random (seeded;
//! `LAMBDAFLOW_FAULT_SEED` repeats a run): every client reaches tansu
//! through the Kafka fault proxy (`common::kafka_proxy`), which resets a
//! reader's connection right after a Fetch or ListOffsets reached the
//! broker, or holds the broker's answers back for up to 1.5 s — what a
//! broker restart or a failing network path does to a consumer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lambdaflow::stream::kafka::{KafkaConfig, KafkaProducer};

use crate::common::kafka_proxy::KafkaProxy;
use crate::common::{self, Site};
use crate::kafka::{Tansu, send, wait_settled};
use crate::oracle::{self, Sent, make};

#[test]
fn the_oracle_over_kafka_holds_with_a_brokers_faults_at_random() {
    let seed = common::fault_seed("LAMBDAFLOW_FAULT_SEED");
    let proxy_port = common::free_port();
    let tansu = Tansu::start_advertising(common::free_port(), proxy_port);
    let proxy = KafkaProxy::start(proxy_port, &tansu.brokers, seed, 40, 80);
    let brokers = format!("127.0.0.1:{proxy_port}");
    tansu.create_topic("events", 2);
    let config = KafkaConfig {
        brokers: brokers.clone(),
        topic: "events".into(),
        options: Default::default(),
    };
    let site = Site::new(&format!(
        "{}[stream]\nkafka = {{ brokers = \"{brokers}\", topic = \"events\" }}\n",
        oracle::CONFIG
    ));
    let server = site.serve(&[]);
    let url = server.url.clone();
    let known: Arc<Mutex<BTreeMap<(u32, u64), Sent>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<oracle::Got>>> = Arc::default();
    let readers = oracle::view_readers(&url, &answers, &done);
    let producers: Vec<_> = (0..2i64)
        .map(|t| {
            let (known, config) = (known.clone(), config.clone());
            std::thread::spawn(move || {
                let producer = KafkaProducer::new(&config).unwrap();
                for r in 0..80i64 {
                    let events: Vec<Sent> = (0..50).map(|i| make((r * 2 + t) * 50 + i)).collect();
                    let p = ((r + t) % 2) as u32;
                    let offsets = send(&producer, p, &events, &[]);
                    let mut k = known.lock().unwrap();
                    for (o, e) in offsets.into_iter().zip(events) {
                        k.insert((p, o), e);
                    }
                    drop(k);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let known = known.lock().unwrap().clone();
    assert_eq!(
        known.len(),
        2 * 80 * 50,
        "every event acknowledged (seed {seed})"
    );
    let mut last = BTreeMap::new();
    for &(p, o) in known.keys() {
        last.insert(p, o);
    }
    wait_settled(&server, &last, Duration::from_secs(180));
    for view in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
        answers
            .lock()
            .unwrap()
            .push(oracle::query(&url, view).unwrap());
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let (resets, stalls, reads) = (
        proxy.counts.resets.load(Ordering::Relaxed),
        proxy.counts.stalls.load(Ordering::Relaxed),
        proxy.counts.reads.load(Ordering::Relaxed),
    );
    assert!(
        resets + stalls > 0,
        "the proxy injected faults (seed {seed}): {resets} resets, {stalls} stalls in {reads} reads"
    );
    let answers = answers.lock().unwrap().clone();
    let checked = oracle::verify_positions(&answers, &known, false);
    eprintln!(
        "seed {seed}: {resets} resets and {stalls} stalls in {reads} reads; {checked} answers checked"
    );
    server.stop();
    oracle::assert_master_holds(&site.data, &known);
}
