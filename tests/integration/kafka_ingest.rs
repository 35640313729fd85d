//! HTTP ingest into Kafka as the broker behaves: a line longer than the
//! producer sends as one record is a bad line, refused before anything is
//! sent, and the rest of its body is stored (before, the record's
//! `MessageSizeTooLarge` failed the whole request with `503` after the
//! other 99 were stored, and each resend stored them again).

use std::time::{Duration, Instant};

use crate::common::{self, Site};
use crate::kafka::Tansu;
use crate::oracle::{self, make, ndjson};

/// A node on a topic `events` of 2 partitions on a new tansu.
fn kafka_site() -> (Tansu, Site) {
    let tansu = Tansu::start();
    tansu.create_topic("events", 2);
    let site = Site::new(&format!(
        "{}[stream]\nkafka = {{ brokers = \"{}\", topic = \"events\" }}\n",
        oracle::CONFIG,
        tansu.brokers
    ));
    (tansu, site)
}

#[test]
fn a_line_over_the_kafka_record_limit_is_refused_and_the_rest_stored_once() {
    let (_tansu, site) = kafka_site();
    let server = site.serve(&[]);
    let mut lines: Vec<String> = (0..100)
        .map(|i| {
            String::from_utf8(ndjson(&[make(i)]))
                .unwrap()
                .trim_end()
                .to_string()
        })
        .collect();
    lines[50] = common::event(95126, &"x".repeat(1_200_000), 16, "2014-11-01 19:35:41.158");
    let body = (lines.join("\n") + "\n").into_bytes();
    let (status, reply) = common::post_events(&server.url, body.clone()).unwrap();
    assert_eq!(
        (
            status,
            reply["accepted"].as_u64(),
            reply["rejected"].as_u64()
        ),
        (200, Some(99), Some(1)),
        "99 stored, the line over the limit refused as a bad line: {reply}"
    );
    assert_eq!(reply["errors"][0]["line"], 51, "{reply}");
    assert!(
        reply["errors"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("message.max.bytes")),
        "the reason names the limit: {reply}"
    );
    let t = Instant::now();
    while common::orders(&server.url) != 99 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        common::orders(&server.url),
        99,
        "each stored event counted once"
    );
    server.stop();
}

/// Issue 34: a node that produces into Kafka cannot recognise a re-sent
/// request yet: a numbered request is refused with the code saying so, and
/// `lambdaflow produce` sends again without the numbers, saying it is at
/// least once.
#[test]
fn a_numbered_request_to_a_kafka_node_is_refused_and_produce_says_at_least_once() {
    let (_tansu, site) = kafka_site();
    let server = site.serve(&[]);
    let (status, reply) = common::rt().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/events", server.url))
            .header("Lambdaflow-Producer", "p")
            .header("Lambdaflow-Sequence", "1")
            .body(ndjson(&[make(1)]))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    });
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["code"], "idempotence-unsupported", "{reply}");
    let out = std::process::Command::new(common::BIN)
        .args([
            "produce",
            "--url",
            &server.url,
            "--events",
            "300",
            "--batch",
            "100",
            "--quiet",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("accepted 300"), "{said}");
    assert!(said.contains("at least once"), "{said}");
    server.stop();
}
