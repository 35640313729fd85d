//! `GET /metrics`: one `prometheus-client` collector per layer, each reading
//! that layer's counters and watermarks at scrape time.
//!
//! ```text
//!  IngestMetrics      requests, events accepted and refused, dead letters
//!  ConnectionMetrics  open HTTP connections, refused, idle-closed
//!  MemoryMetrics      heap allocated and resident (jemalloc)
//!  StreamMetrics      log and stream ends, partition names (Kinesis shards)
//!  LayerMetrics       R, archived, H, the lags, speed and batch figures
//!  ReadMetrics        read and SQL latency histograms
//!        └── registered in registry() ──▶ crate::metrics::encode ──▶ text 0.0.4
//! ```
//!
//! The collectors hold the layers' own `Arc`s and read atomics, the
//! snapshot and the status lock the handler read before; the ingest and
//! read paths are unchanged by a scrape.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::ApiState;
use crate::metrics::{counter, counters, gauge, gauges, histogram, infos};
use crate::node::Layers;
use crate::stream::Ingest;

/// The registry of a node's families, its collectors reading `state`.
pub(super) fn registry(state: &Arc<ApiState>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(IngestMetrics(state.ingest.clone())));
    if let Some(c) = &state.connections {
        r.register_collector(Box::new(ConnectionMetrics(c.clone())));
    }
    r.register_collector(Box::new(MemoryMetrics));
    r.register_collector(Box::new(StreamMetrics {
        ingest: state.ingest.clone(),
        layers: state.layers.clone(),
    }));
    if let Some(l) = &state.layers {
        r.register_collector(Box::new(LayerMetrics {
            ingest: state.ingest.clone(),
            layers: l.clone(),
        }));
    }
    r.register_collector(Box::new(ReadMetrics(state.clone())));
    r
}

/// `[("partition", p)]`.
fn partition(p: usize) -> [(&'static str, usize); 1] {
    [("partition", p)]
}

/// The embedded log's partitions (none on a node that produces into an
/// external stream), and the partitions the layers consume (which may grow).
fn partitions(
    ingest: &Ingest,
    layers: Option<&Layers>,
) -> (Vec<crate::stream::log::PartitionStats>, usize) {
    let log = if ingest.producer.is_some() {
        Vec::new()
    } else {
        ingest.log().stats()
    };
    let n = layers
        .map_or(0, |l| l.source.partitions() as usize)
        .max(log.len());
    (log, n)
}

/// `Debug` by name: the layers' state is not the collector's to print.
macro_rules! by_name {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(stringify!($t))
            }
        }
    )*};
}
by_name!(
    IngestMetrics,
    ConnectionMetrics,
    MemoryMetrics,
    StreamMetrics,
    LayerMetrics,
    ReadMetrics
);

struct IngestMetrics(Arc<Ingest>);

impl Collector for IngestMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.0.counters;
        let dead = self.0.dead_letters();
        counter(
            &mut e,
            "lambdaflow_ingest_requests",
            "Ingest requests received.",
            c.requests.load(Relaxed),
        )?;
        counter(
            &mut e,
            "lambdaflow_events_accepted",
            "Events accepted and durable in the log.",
            c.accepted.load(Relaxed),
        )?;
        counter(
            &mut e,
            "lambdaflow_events_rejected",
            "Lines refused and kept in the dead-letter store.",
            c.rejected.load(Relaxed),
        )?;
        counter(
            &mut e,
            "lambdaflow_dead_letters_dropped",
            "Refused lines not kept in the dead-letter store: past their request's share of it.",
            dead.counters.dropped.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "lambdaflow_dead_letter_store_bytes",
            "Bytes in the dead-letter store.",
            dead.bytes(),
        )?;
        counter(
            &mut e,
            "lambdaflow_dead_letter_files_removed",
            "Oldest dead-letter files removed to keep the store under ingest.dead_letter_max.",
            dead.counters.removed_files.load(Relaxed),
        )?;
        if let Some(l) = &self.0.ledger {
            let c = &l.counters;
            for (name, help, n) in [
                (
                    "lambdaflow_requests_identified",
                    "Ingest requests that carried a producer and a sequence.",
                    &c.identified,
                ),
                (
                    "lambdaflow_requests_resent_recognised",
                    "Re-sent requests answered with their original offsets, nothing stored again.",
                    &c.recognised,
                ),
                (
                    "lambdaflow_requests_resent_completed",
                    "Re-sent requests stored in part before, whose other parts were stored.",
                    &c.completed,
                ),
                (
                    "lambdaflow_requests_changed",
                    "Requests refused (409): another body under a stored sequence.",
                    &c.changed,
                ),
                (
                    "lambdaflow_producers_retired",
                    "Producers whose requests were dropped to make room for another (max_producers); their older numbers get 422.",
                    &c.retired,
                ),
                (
                    "lambdaflow_requests_too_old",
                    "Requests refused (422): a sequence below its producer's window.",
                    &c.too_old,
                ),
            ] {
                counter(&mut e, name, help, n.load(Relaxed))?;
            }
            gauge(
                &mut e,
                "lambdaflow_producers_known",
                "Producers the request ledger remembers.",
                l.producers() as u64,
            )?;
        }
        Ok(())
    }
}

struct ConnectionMetrics(Arc<crate::frontend::conn::Admission>);

impl Collector for ConnectionMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let conns = self.0.report();
        gauge(
            &mut e,
            "lambdaflow_http_connections",
            "Open HTTP connections.",
            conns.open,
        )?;
        counter(
            &mut e,
            "lambdaflow_http_connections_refused",
            "Connections closed at accept: every slot, or the address's share, in use.",
            conns.refused,
        )?;
        counter(
            &mut e,
            "lambdaflow_http_connections_idle_closed",
            "Connections closed because no request began before their deadline.",
            conns.idle_closed,
        )
    }
}

struct MemoryMetrics;

impl Collector for MemoryMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let Some(m) = crate::memory::report() else {
            return Ok(());
        };
        gauge(
            &mut e,
            "lambdaflow_memory_allocated_bytes",
            "Heap bytes the program holds (jemalloc stats.allocated).",
            m.allocated,
        )?;
        gauge(
            &mut e,
            "lambdaflow_memory_resident_bytes",
            "Bytes of the allocator's pages resident in memory (jemalloc stats.resident).",
            m.resident,
        )
    }
}

struct StreamMetrics {
    ingest: Arc<Ingest>,
    layers: Option<Arc<Layers>>,
}

impl Collector for StreamMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let (log, n) = partitions(&self.ingest, self.layers.as_deref());
        gauges(
            &mut e,
            "lambdaflow_log_end_offset",
            "One past the last durable offset.",
            log.iter().enumerate().map(|(p, s)| (partition(p), s.end)),
        )?;
        let Some(l) = &self.layers else {
            return Ok(());
        };
        gauges(
            &mut e,
            "lambdaflow_stream_end_offset",
            "One past the last position of the stream the layers consume (the embedded log, a Kafka partition, the records read of a Kinesis shard).",
            (0..n).filter_map(|p| Some((partition(p), l.source.end(p as u32).ok()?))),
        )?;
        let shards: Vec<[(&str, String); 3]> = (0..n)
            .filter_map(|p| {
                let i = l.source.info(p as u32)?;
                let state = serde_json::to_value(i.state).ok()?;
                Some([
                    ("partition", p.to_string()),
                    ("shard", i.id),
                    ("state", state.as_str().unwrap_or_default().to_string()),
                ])
            })
            .collect();
        if shards.is_empty() {
            return Ok(());
        }
        infos(
            &mut e,
            "lambdaflow_stream_partition",
            "The stream's name for each partition (a Kinesis shard) and its state: open, closed (ended by a split or merge) or throttled.",
            shards,
        )
    }
}

struct LayerMetrics {
    ingest: Arc<Ingest>,
    layers: Arc<Layers>,
}

impl Collector for LayerMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let l = &*self.layers;
        let (_, n) = partitions(&self.ingest, Some(l));
        let snap = l.serving.snapshot();
        let h = snap.h();
        let archived = l.master.coverage().h;
        let now = chrono::Utc::now().timestamp_millis();
        let end = |p: usize| l.source.end(p as u32).ok();
        let realtime = |p: usize| snap.realtime_end.get(p).copied();
        gauges(
            &mut e,
            "lambdaflow_speed_lag_seconds",
            "How far the speed layer is behind the stream in time: now minus the stream time of the last record consumed, while records wait; 0 when caught up.",
            (0..n).filter_map(|p| {
                let waiting = end(p)?.saturating_sub(realtime(p)?);
                Some((
                    partition(p),
                    l.speed.lag_ms(p, waiting, now) as f64 / 1000.0,
                ))
            }),
        )?;
        gauges(
            &mut e,
            "lambdaflow_realtime_offset",
            "Realtime high-water mark R: events below it are in answers.",
            (0..n).filter_map(|p| Some((partition(p), realtime(p)?))),
        )?;
        gauges(
            &mut e,
            "lambdaflow_archived_offset",
            "End of the last chunk committed to the master dataset.",
            (0..n).filter_map(|p| Some((partition(p), archived.listed(p as u32)?))),
        )?;
        gauges(
            &mut e,
            "lambdaflow_batch_offset",
            "Published batch coverage H.",
            (0..n).filter_map(|p| Some((partition(p), h.listed(p as u32)?))),
        )?;
        gauges(
            &mut e,
            "lambdaflow_speed_lag_events",
            "Durable events not yet in the realtime view (positions, on a stream with gaps).",
            (0..n).filter_map(|p| Some((partition(p), end(p)?.saturating_sub(realtime(p)?)))),
        )?;
        gauges(
            &mut e,
            "lambdaflow_batch_lag_events",
            "Durable events not yet in a batch view (positions, on a stream with gaps).",
            (0..n).filter_map(|p| Some((partition(p), end(p)?.saturating_sub(h.get(p as u32))))),
        )?;
        if let Some(keys) = l.speed.keys.lock().expect("speed metrics").clone() {
            counters(
                &mut e,
                "lambdaflow_duplicates_found",
                "Events whose key their partition saw within the horizon ([schema] key): counted by no view. Since the process started.",
                keys.iter()
                    .enumerate()
                    .map(|(p, k)| (partition(p), k.duplicates)),
            )?;
            counters(
                &mut e,
                "lambdaflow_duplicates_strayed",
                "Sampled keys (one in 16) that came to this partition after another partition had them within the horizon: duplicates counted again, because the stream is not keyed by the event key. Since the process started.",
                keys.iter()
                    .enumerate()
                    .map(|(p, k)| (partition(p), k.strays)),
            )?;
            gauges(
                &mut e,
                "lambdaflow_key_index_keys",
                "Keys within the horizon in the index of keys seen (below the published coverage).",
                keys.iter()
                    .enumerate()
                    .map(|(p, k)| (partition(p), k.index.keys)),
            )?;
            gauges(
                &mut e,
                "lambdaflow_key_index_memory_bytes",
                "Memory of the index of keys seen: its filter, fences and in-memory tail.",
                keys.iter()
                    .enumerate()
                    .map(|(p, k)| (partition(p), k.index.memory_bytes)),
            )?;
            gauges(
                &mut e,
                "lambdaflow_key_index_disk_bytes",
                "Bytes of the index's runs on the node's disk.",
                keys.iter()
                    .enumerate()
                    .map(|(p, k)| (partition(p), k.index.disk_bytes)),
            )?;
        }
        counter(
            &mut e,
            "lambdaflow_speed_events",
            "Events through the view plans of the speed layer.",
            l.speed.events.load(Relaxed),
        )?;
        histogram(
            &mut e,
            "lambdaflow_micro_batch_duration_seconds",
            "Time to turn one micro-batch into states for every view.",
            &l.speed.micro,
        )?;
        let excluded = l.batch.failures().report();
        if !excluded.is_empty() {
            counters(
                &mut e,
                "lambdaflow_view_excluded_events",
                "Events left out of a view because its expressions fail on them.",
                excluded.into_iter().map(|(v, x)| ([("view", v)], x.events)),
            )?;
        }
        let b = l.batch_status.lock().expect("status lock").clone();
        counter(
            &mut e,
            "lambdaflow_batch_runs",
            "Batch runs published.",
            b.runs,
        )?;
        if let Some(r) = &b.published {
            gauge(
                &mut e,
                "lambdaflow_batch_run_duration_seconds",
                "Duration of the published batch run.",
                r.duration_ms as f64 / 1000.0,
            )?;
        }
        Ok(())
    }
}

/// The read latencies `ApiState` observes.
struct ReadMetrics(Arc<ApiState>);

impl Collector for ReadMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        histogram(
            &mut e,
            "lambdaflow_query_duration_seconds",
            "Latency of GET /v1/views/{name}.",
            &self.0.query_latency,
        )?;
        histogram(
            &mut e,
            "lambdaflow_sql_duration_seconds",
            "Latency of POST /v1/sql.",
            &self.0.sql_latency,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's registry (ingest, memory, log, reads; no layers) encodes as
    /// Prometheus text a scraper accepts, with the families the README,
    /// RELIABILITY.md and the tests name.
    #[test]
    fn the_registry_encodes_valid_prometheus_text() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            crate::stream::Log::open(
                dir.path().join("log"),
                crate::stream::LogOptions {
                    partitions: 2,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let dead = Arc::new(
            crate::stream::deadletter::DeadLetters::open(dir.path().join("dead")).unwrap(),
        );
        let decoder = crate::stream::decode::Decoder::new(
            Arc::new(crate::schema::EventSchema::paper()),
            crate::stream::decode::Partitioning::RoundRobin,
        );
        let ingest = Arc::new(Ingest::new(decoder, log, dead));
        ingest.counters.accepted.fetch_add(300, Relaxed);
        let state = Arc::new(ApiState::new(ingest, 1 << 20, 4, None));
        state
            .query_latency
            .observe(std::time::Duration::from_millis(3));
        let text = crate::metrics::encode(&registry(&state)).unwrap();
        let families = crate::metrics::check_text(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        for f in [
            "lambdaflow_ingest_requests_total",
            "lambdaflow_events_accepted_total",
            "lambdaflow_events_rejected_total",
            "lambdaflow_dead_letters_dropped_total",
            "lambdaflow_dead_letter_store_bytes",
            "lambdaflow_dead_letter_files_removed_total",
            "lambdaflow_log_end_offset",
            "lambdaflow_query_duration_seconds",
            "lambdaflow_sql_duration_seconds",
        ] {
            assert!(
                families.iter().any(|x| x == f),
                "the family {f} is exposed:\n{text}"
            );
        }
        for s in [
            "lambdaflow_events_accepted_total 300\n",
            "lambdaflow_log_end_offset{partition=\"1\"} 0\n",
            "lambdaflow_query_duration_seconds_bucket{le=\"0.0025\"} 0\n",
            "lambdaflow_query_duration_seconds_bucket{le=\"0.005\"} 1\n",
            "lambdaflow_query_duration_seconds_count 1\n",
            "# HELP lambdaflow_events_accepted_total Events accepted and durable in the log.\n",
        ] {
            assert!(text.contains(s), "the text has {s:?}:\n{text}");
        }
    }
}
