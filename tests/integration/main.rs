//! lambdaflow's end-to-end and integration tests, as one binary: each
//! module below was its own test binary once, and each linked DataFusion and
//! Delta Lake again (DataFusion's `core_integration.rs` does the same).
//!
//! ```text
//!  common      a real `serve` child process on a temporary data directory,
//!              HTTP helpers, the paper's events, the exactness checks
//!  log         the durable log (in process)
//!  views       view compilation and the merge laws (proptests)
//!  golden      batch = stream = restored, against checked-in rows
//!  batch       crashes at each archive and publish step, rebuild, retention
//!  incremental incremental runs = full recomputes, the full-run policy, time travel
//!  evolve      a schema that grows: a nullable field added, old events read null
//!  live_views  views added, changed and dropped while serving, under load
//!  oracle      every answer equals the view SQL over the events it covers
//!  ingest_http producers over HTTP: offsets, keys, config errors
//!  keys        event keys: duplicates counted by no view, through restarts
//!  query_api   views, SQL, metrics and the CLI against a running server
//!  pg          the Postgres wire protocol: psql, psycopg, tokens, TLS
//!  pg_bounds   Postgres clients that try to take the server down: silent and
//!              idle connections, huge messages, SET floods, cancels; sessions
//!              as poolers expect (statement_timeout, 25P02, DISCARD ALL)
//!  dashboard   the live page in headless Chromium
//!  security    tokens and scopes, loopback, HTTPS
//!  hostile     clients that try to starve the others
//!  hostile_sql queries written to take the server down, over HTTP and Postgres
//!  http_bounds view names the layout cannot hold, bounded bodies, slow
//!              readers of large replies, one filter meaning, every error as JSON
//!  faults      lost logs, full disks, failing views, backpressure
//!  crash_loop  kills at random moments, every acknowledged event survives
//!  kafka       Kafka as the stream, against a real broker (tansu)
//!  kinesis     Kinesis as the stream, against an emulator (kinesalite)
//!  identity    the stream recorded with the master dataset: switches and re-created streams
//!  cluster_views views changed on a cluster (Kafka + S3): followers adopt
//!              them, a new driver builds the saved ones; DELETE of a waiting add
//!  s3          the root on S3 (moto): one node, a cluster, races, outages
//!  s3_faults   S3 as it behaves (a fault proxy before moto): 503s, 500s,
//!              answers lost after the write, resets; a seeded random run
//!  ballista    the batch layer on a Ballista cluster (scheduler + 2 executors)
//!  cluster_sim three nodes on one S3 root (Kafka, and the embedded log) under a
//!              seeded schedule of pauses, cuts from S3, kills, view changes
//!              and compactions by another engine: every answer exact
//! ```
//!
//! One module: `cargo test --test integration hostile::`.

mod common;

#[cfg(feature = "ballista")]
mod ballista;
mod batch;
mod cluster_sim;
mod cluster_views;
mod crash_loop;
mod dashboard;
mod evolve;
mod faults;
mod fencing;
mod golden;
mod hostile;
mod hostile_sql;
mod http_bounds;
mod identity;
mod incremental;
mod ingest_http;
mod kafka;
mod kafka_faults;
mod kafka_ingest;
mod keys;
mod keys_upstream;
mod kinesis;
mod kinesis_faults;
mod live_views;
mod log;
mod open_table;
mod oracle;
mod pg;
mod pg_bounds;
mod query_api;
mod s3;
mod s3_faults;
mod security;
mod views;
