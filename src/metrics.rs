//! Metrics for `GET /metrics`: lock-free latency histograms, and the
//! helpers the collectors use to write families into a `prometheus-client`
//! registry, which encodes them as Prometheus text (version 0.0.4).
//!
//! ```text
//!  hot paths ──atomic adds──▶ counters, Histogram (this module)
//!                                   │ read at scrape time by
//!  frontend::http::metrics ── one Collector per layer ──▶ Registry ──▶ text
//! ```
//!
//! Nothing is copied or locked on ingest or reads: the collectors read the
//! layers' own counters and watermarks when Prometheus asks.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What `GET /metrics` answers with.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A latency histogram with fixed bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations in each bucket: at or below its bound and above the
    /// one before (the encoder sums them into Prometheus's cumulative ones).
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// 100 µs … 10 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(LATENCY_BOUNDS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn mean(&self) -> Option<Duration> {
        let n = self.count();
        (n > 0).then(|| Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed) / n))
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&b, c)| (b, c.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Writes a registry as Prometheus text (version 0.0.4, [`CONTENT_TYPE`]).
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// One counter family without labels. `name` without `_total`: the encoder
/// adds it.
pub fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeCounterValue,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// One gauge family without labels.
pub fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A gauge family with one sample per label set.
pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// A counter family with one sample per label set. `name` without `_total`.
pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// An info family (`NAME_info{…} 1`, typed gauge in the 0.0.4 text).
/// `name` without `_info`: the encoder adds it.
pub fn infos<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = L>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Info)?;
    for labels in samples {
        m.encode_info(&labels)?;
    }
    Ok(())
}

/// A histogram family without labels.
pub fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    h.encode(e.encode_descriptor(name, help, None, MetricType::Histogram)?)
}

/// Checks Prometheus text (0.0.4) the way a scraper reads it: every sample
/// belongs to the family its `# TYPE` names (with the type's suffixes),
/// every family has `# HELP` and `# TYPE` once, values are numbers, and
/// histogram buckets are cumulative. Returns the families' names.
#[cfg(test)]
pub fn check_text(text: &str) -> Result<Vec<String>, String> {
    use std::collections::BTreeSet;
    let mut families: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut helped = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !helped.insert(name.to_string()) {
                return Err(format!("two # HELP lines for {name}"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("unknown type {kind:?} for {name}"));
            }
            if !helped.contains(name) {
                return Err(format!("{name} has # TYPE without # HELP before it"));
            }
            if !seen.insert(name.to_string()) {
                return Err(format!("two families named {name}"));
            }
            families.push(name.to_string());
            current = Some((name.to_string(), kind.to_string()));
            last_bucket = None;
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| format!("a sample without a value: {line}"))?;
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| format!("not a number: {line}"))?,
            };
            let name = series.split('{').next().unwrap_or_default();
            let (family, kind) = current
                .as_ref()
                .ok_or_else(|| format!("a sample before any # TYPE: {line}"))?;
            let ok = match kind.as_str() {
                "histogram" => [
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ]
                .contains(&name.to_string()),
                _ => name == family,
            };
            if !ok {
                return Err(format!("sample {name} under the family {family} ({kind})"));
            }
            if series.contains('{') && !series.ends_with('}') {
                return Err(format!("unterminated labels: {line}"));
            }
            if name.ends_with("_bucket") {
                if let Some((f, prev)) = &last_bucket
                    && f == family
                    && v < *prev
                {
                    return Err(format!("buckets not cumulative: {line}"));
                }
                last_bucket = Some((family.clone(), v));
            }
        }
    }
    Ok(families)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[derive(Debug)]
    struct One(Histogram);

    impl Collector for One {
        fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
            histogram(&mut e, "x_seconds", "test", &self.0)?;
            counter(&mut e, "x_events", "Events.", 3u64)?;
            gauges(
                &mut e,
                "x_offset",
                "Offsets.",
                [([("partition", 0u32)], 7u64)],
            )?;
            infos(
                &mut e,
                "x_partition",
                "Names.",
                [[("partition", "0"), ("shard", "a")]],
            )
        }
    }

    #[test]
    fn renders_cumulative_buckets() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut r = Registry::default();
        r.register_collector(Box::new(One(h)));
        let out = encode(&r).unwrap();
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(
            out.contains("# TYPE x_events_total counter\nx_events_total 3\n"),
            "{out}"
        );
        assert!(out.contains("x_offset{partition=\"0\"} 7\n"), "{out}");
        assert!(
            out.contains(
                "# TYPE x_partition_info gauge\nx_partition_info{partition=\"0\",shard=\"a\"} 1\n"
            ),
            "an info family keeps the gauge name it had: {out}"
        );
        assert_eq!(
            check_text(&out),
            Ok(vec![
                "x_seconds".to_string(),
                "x_events_total".to_string(),
                "x_offset".to_string(),
                "x_partition_info".to_string()
            ]),
            "{out}"
        );
    }
}
