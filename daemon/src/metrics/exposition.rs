//! A scrape: the counters read at one moment ([`Snapshot`]) and their encoding in the
//! Prometheus text exposition format (version 0.0.4) by `prometheus-client`, which writes the
//! `# HELP`/`# TYPE` lines, escapes label values and help text, and formats the histograms
//! (cumulative `_bucket` series, `_sum`, `_count`).
//!
//! Runs on the scraper thread. Every metric is labelled by `export` (the socket path); request
//! metrics also by `op`; see README.md, "Metrics", for the list.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{ExportLabels, Operation, BUCKETS, BUCKET_BOUNDS_NS};
use crate::block_io::CacheStats;

/// The `Content-Type` of [`Snapshot::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The quantiles exported as gauges.
pub const QUANTILES: [f64; 3] = [0.5, 0.99, 0.999];
/// Their `quantile` label values.
const QUANTILE_LABELS: [&str; 3] = ["0.5", "0.99", "0.999"];

/// One operation of one export, summed over its workers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpSnapshot {
    /// Requests per latency bucket ([`BUCKET_BOUNDS_NS`], then `+Inf`), not cumulative.
    pub buckets: [u64; BUCKETS],
    /// Sum of the latencies.
    pub duration_seconds: f64,
    /// Payload bytes of the requests that succeeded.
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Latency at [`QUANTILES`] since start, in seconds; `None` before the first request.
    pub quantiles: Option<[f64; 3]>,
}

impl OpSnapshot {
    /// Requests completed.
    pub fn requests(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One worker thread (engine shard) of an export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardSnapshot {
    /// Requests in flight.
    pub in_flight: u64,
    /// Cache lookups so far.
    pub cache: CacheStats,
    /// Time requests waited under the I/O limits.
    pub throttled_seconds: f64,
    /// Requests that waited under the I/O limits.
    pub throttled: u64,
}

/// One export.
#[derive(Clone, Debug)]
pub struct ExportSnapshot {
    /// Its labels.
    pub labels: ExportLabels,
    /// Indexed by `Operation as usize`.
    pub ops: [OpSnapshot; Operation::COUNT],
    /// Indexed by worker.
    pub shards: Vec<ShardSnapshot>,
}

/// The cache budget of one core thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreSnapshot {
    /// Bytes the caches of the shards placed there hold.
    pub cache_bytes: u64,
    /// The budget they draw from.
    pub cache_limit_bytes: u64,
}

/// Every export, as read by one scrape.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// In configuration order.
    pub exports: Vec<ExportSnapshot>,
    /// Each core thread, in core order (none before they start).
    pub cores: Vec<CoreSnapshot>,
}

impl Snapshot {
    /// The Prometheus text exposition (version 0.0.4) of the snapshot.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        // Writing into a String cannot fail, and neither can the collector (it only writes).
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            tracing::error!("Cannot encode the metrics: {e}");
        }
        text
    }

    fn cache_total(export: &ExportSnapshot, f: impl Fn(&CacheStats) -> u64) -> u64 {
        export.shards.iter().map(|s| f(&s.cache)).sum()
    }
}

type Labels<'a> = [(&'static str, &'a str); 2];

fn op_labels<'a>(export: &'a ExportSnapshot, op: Operation) -> Labels<'a> {
    [("export", &export.labels.export), ("op", op.label())]
}

/// A counter family labelled by export and operation.
fn op_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    exports: &[ExportSnapshot],
    value: impl Fn(&OpSnapshot) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for export in exports {
        for op in Operation::ALL {
            let labels = op_labels(export, op);
            ConstCounter::new(value(&export.ops[op as usize]))
                .encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A counter family labelled by export only.
fn export_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    exports: &[ExportSnapshot],
    value: impl Fn(&ExportSnapshot) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for export in exports {
        let labels = [("export", export.labels.export.as_str())];
        ConstCounter::new(value(export)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let exports = &self.exports;

        let mut family = encoder.encode_descriptor(
            "qcow2d_export",
            "Exports served: socket path (export), image, serial and read_only",
            None,
            MetricType::Info,
        )?;
        for export in exports {
            let l = &export.labels;
            let labels = [
                ("export", l.export.as_str()),
                ("image", l.image.as_str()),
                ("serial", l.serial.as_str()),
                ("read_only", if l.read_only { "true" } else { "false" }),
            ];
            family.encode_info(&labels)?;
        }

        op_counter(
            &mut encoder,
            "qcow2d_requests",
            "Requests returned to the guest, by export and operation",
            None,
            exports,
            OpSnapshot::requests,
        )?;
        op_counter(
            &mut encoder,
            "qcow2d_request",
            "Payload bytes of the requests that succeeded (data read or written, ranges discarded \
             or zeroed, serial bytes returned)",
            Some(&Unit::Bytes),
            exports,
            |op| op.bytes,
        )?;
        op_counter(
            &mut encoder,
            "qcow2d_request_errors",
            "Requests that completed with a status other than OK (I/O error or unsupported)",
            None,
            exports,
            |op| op.errors,
        )?;

        let mut family = encoder.encode_descriptor(
            "qcow2d_request_duration",
            "Time from popping a request's descriptor chain to adding it to the used ring",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for export in exports {
            for op in Operation::ALL {
                let snap = &export.ops[op as usize];
                let mut buckets = [(0.0, 0); BUCKETS];
                for (i, (bucket, &count)) in buckets.iter_mut().zip(&snap.buckets).enumerate() {
                    let bound = BUCKET_BOUNDS_NS
                        .get(i)
                        .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                    *bucket = (bound, count);
                }
                let labels = op_labels(export, op);
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        snap.duration_seconds,
                        snap.requests(),
                        &buckets,
                        None,
                    )?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "qcow2d_request_duration_quantile",
            "Request latency quantiles since start, from an HDR histogram (3 significant digits) \
             of the same latencies; absent until the operation's first request",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for export in exports {
            for op in Operation::ALL {
                let Some(values) = export.ops[op as usize].quantiles else {
                    continue;
                };
                for (value, quantile) in values.into_iter().zip(QUANTILE_LABELS) {
                    let labels = [
                        ("export", export.labels.export.as_str()),
                        ("op", op.label()),
                        ("quantile", quantile),
                    ];
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "qcow2d_requests_in_flight",
            "Requests popped from the virtqueues and not yet returned to the guest",
            None,
            MetricType::Gauge,
        )?;
        for export in exports {
            let labels = [("export", export.labels.export.as_str())];
            let n: u64 = export.shards.iter().map(|s| s.in_flight).sum();
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "qcow2d_shard_queue_depth",
            "Requests in flight on one worker thread (engine shard) of an export",
            None,
            MetricType::Gauge,
        )?;
        for export in exports {
            for (index, shard) in export.shards.iter().enumerate() {
                let index = index.to_string();
                let labels = [
                    ("export", export.labels.export.as_str()),
                    ("shard", index.as_str()),
                ];
                ConstGauge::new(shard.in_flight).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "qcow2d_throttled",
            "Time requests waited under the export's I/O limits before they started",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for export in exports {
            let labels = [("export", export.labels.export.as_str())];
            let seconds: f64 = export.shards.iter().map(|s| s.throttled_seconds).sum();
            ConstCounter::new(seconds).encode(family.encode_family(&labels)?)?;
        }
        export_counter(
            &mut encoder,
            "qcow2d_throttled_requests",
            "Requests that waited under the export's I/O limits",
            exports,
            |e| e.shards.iter().map(|s| s.throttled).sum(),
        )?;

        export_counter(
            &mut encoder,
            "qcow2d_l2_cache_hits",
            "L2 table lookups served from the shards' caches",
            exports,
            |e| Self::cache_total(e, |c| c.l2_hits),
        )?;
        export_counter(
            &mut encoder,
            "qcow2d_l2_cache_misses",
            "L2 table lookups that had to read the table from the image",
            exports,
            |e| Self::cache_total(e, |c| c.l2_misses),
        )?;
        export_counter(
            &mut encoder,
            "qcow2d_decompressed_cache_hits",
            "Compressed-cluster reads served from the shards' decompressed-cluster caches",
            exports,
            |e| Self::cache_total(e, |c| c.decompressed_hits),
        )?;
        export_counter(
            &mut encoder,
            "qcow2d_decompressed_cache_misses",
            "Compressed-cluster reads that had to read and inflate the cluster",
            exports,
            |e| Self::cache_total(e, |c| c.decompressed_misses),
        )?;

        for (name, help, value) in [
            (
                "qcow2d_core_cache",
                "Engine cache (L2 tables, decompressed clusters) held by the shards on one core \
                 thread, of every export",
                (|c| c.cache_bytes) as fn(&CoreSnapshot) -> u64,
            ),
            (
                "qcow2d_core_cache_limit",
                "The cache budget of one core thread, an equal share of it per shard (the \
                 shards hold up to twice it until those over their share miss, and a floor \
                 of a few clusters per image layer beyond it)",
                |c| c.cache_limit_bytes,
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
            for (index, core) in self.cores.iter().enumerate() {
                let index = index.to_string();
                let labels = [("core", index.as_str())];
                ConstGauge::new(value(core)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn export(name: &str) -> ExportSnapshot {
        ExportSnapshot {
            labels: ExportLabels {
                export: name.into(),
                image: "/images/vm.qcow2".into(),
                serial: "vm".into(),
                read_only: true,
            },
            ops: Default::default(),
            shards: vec![ShardSnapshot::default(); 2],
        }
    }

    /// A sample line: name, labels in order, value.
    type Sample = (String, Vec<(String, String)>, String);

    fn samples(text: &str) -> Vec<Sample> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
                    None => (series, Vec::new()),
                };
                (name.to_string(), labels, value.to_string())
            })
            .collect()
    }

    /// Parses `a="x",b="y\"z"` undoing the text format's escapes.
    fn parse_labels(mut s: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !s.is_empty() {
            let (key, rest) = s.split_once("=\"").unwrap();
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().unwrap() {
                    (_, '\\') => match chars.next().unwrap().1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            out.push((key.to_string(), value));
            s = rest[end + 1..]
                .strip_prefix(',')
                .unwrap_or(&rest[end + 1..]);
        }
        out
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> String {
        let hits: Vec<_> = samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect();
        assert_eq!(hits.len(), 1, "{name} {labels:?}: {hits:?}");
        hits[0].2.clone()
    }

    #[test]
    fn families_have_help_and_type_and_expected_names() {
        let snap = Snapshot {
            exports: vec![export("/run/a.sock")],
            cores: vec![
                CoreSnapshot {
                    cache_bytes: 65536,
                    cache_limit_bytes: 1 << 20,
                },
                CoreSnapshot::default(),
            ],
        };
        let text = snap.render();
        let types: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        let expected = [
            ("qcow2d_export_info", "gauge"),
            ("qcow2d_requests_total", "counter"),
            ("qcow2d_request_bytes_total", "counter"),
            ("qcow2d_request_errors_total", "counter"),
            ("qcow2d_request_duration_seconds", "histogram"),
            ("qcow2d_request_duration_quantile_seconds", "gauge"),
            ("qcow2d_requests_in_flight", "gauge"),
            ("qcow2d_shard_queue_depth", "gauge"),
            ("qcow2d_throttled_seconds_total", "counter"),
            ("qcow2d_throttled_requests_total", "counter"),
            ("qcow2d_l2_cache_hits_total", "counter"),
            ("qcow2d_l2_cache_misses_total", "counter"),
            ("qcow2d_decompressed_cache_hits_total", "counter"),
            ("qcow2d_decompressed_cache_misses_total", "counter"),
            ("qcow2d_core_cache_bytes", "gauge"),
            ("qcow2d_core_cache_limit_bytes", "gauge"),
        ];
        for (name, kind) in expected {
            assert_eq!(types.get(name), Some(&kind), "{name}\n{text}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has help\n{text}"
            );
        }
        assert_eq!(types.len(), expected.len(), "{text}");
        // Every sample belongs to a declared family.
        for (name, _, _) in samples(&text) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| types.get(f) == Some(&"histogram"))
                .unwrap_or(&name);
            assert!(types.contains_key(family), "undeclared {name}");
        }
        let s = samples(&text);
        for op in [
            "read",
            "write",
            "flush",
            "discard",
            "write_zeroes",
            "get_id",
            "other",
        ] {
            let l = [("export", "/run/a.sock"), ("op", op)];
            assert_eq!(value(&s, "qcow2d_requests_total", &l), "0");
            assert_eq!(value(&s, "qcow2d_request_duration_seconds_count", &l), "0");
        }
        assert!(
            !text.contains("qcow2d_request_duration_quantile_seconds{"),
            "no quantiles before the first request"
        );
        assert_eq!(
            value(&s, "qcow2d_shard_queue_depth", &[("shard", "1")]),
            "0"
        );
        assert_eq!(
            value(&s, "qcow2d_core_cache_bytes", &[("core", "0")]),
            "65536"
        );
        assert_eq!(
            value(&s, "qcow2d_core_cache_limit_bytes", &[("core", "0")]),
            "1048576"
        );
        assert_eq!(value(&s, "qcow2d_core_cache_bytes", &[("core", "1")]), "0");
        assert_eq!(
            value(
                &s,
                "qcow2d_export_info",
                &[("serial", "vm"), ("read_only", "true")]
            ),
            "1"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let nasty = "/run/q\"uo\\te\nd.sock";
        let mut e = export(nasty);
        e.labels.serial = "s\\\"".into();
        let text = Snapshot {
            exports: vec![e],
            cores: Vec::new(),
        }
        .render();
        assert!(
            text.contains(r#"export="/run/q\"uo\\te\nd.sock""#),
            "{text}"
        );
        assert!(text.contains(r#"serial="s\\\"""#), "{text}");
        // No raw newline inside a sample line: every line is a comment or a whole sample.
        for line in text.lines() {
            assert!(
                line.starts_with("# ") || line.starts_with("qcow2d_"),
                "{line:?}"
            );
        }
        let s = samples(&text);
        assert_eq!(
            value(
                &s,
                "qcow2d_requests_total",
                &[("export", nasty), ("op", "read")]
            ),
            "0"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_consistent() {
        let mut e = export("/run/a.sock");
        let read = &mut e.ops[Operation::Read as usize];
        read.buckets[0] = 5; // <= 10 µs
        read.buckets[3] = 2; // <= 100 µs
        read.buckets[BUCKETS - 1] = 1; // > 10 s
        read.duration_seconds = 12.5;
        read.bytes = 8 * 4096;
        read.errors = 1;
        read.quantiles = Some([1e-5, 1e-4, 12.0]);
        e.shards[0].in_flight = 4;
        e.shards[1].in_flight = 3;
        e.shards[1].cache.l2_misses = 9;
        e.shards[0].cache.l2_misses = 1;
        let text = Snapshot {
            exports: vec![e],
            cores: Vec::new(),
        }
        .render();
        let s = samples(&text);
        let l = [("export", "/run/a.sock"), ("op", "read")];

        let buckets: Vec<(String, u64)> = s
            .iter()
            .filter(|(n, labels, _)| {
                n == "qcow2d_request_duration_seconds_bucket"
                    && labels.iter().any(|(k, v)| k == "op" && v == "read")
            })
            .map(|(_, labels, v)| {
                let le = labels.iter().find(|(k, _)| k == "le").unwrap().1.clone();
                (le, v.parse().unwrap())
            })
            .collect();
        let les: Vec<&str> = buckets.iter().map(|(le, _)| le.as_str()).collect();
        assert_eq!(
            les,
            [
                "1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025",
                "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
                "+Inf"
            ]
        );
        let counts: Vec<u64> = buckets.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            counts,
            [5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8]
        );
        // Each `le` parses as a number, increasing, ending with +Inf.
        let bounds: Vec<f64> = les.iter().map(|le| le.parse::<f64>().unwrap()).collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{les:?}");
        assert_eq!(*bounds.last().unwrap(), f64::INFINITY);
        for (bound, ns) in bounds.iter().zip(BUCKET_BOUNDS_NS) {
            assert_eq!(*bound, ns as f64 / 1e9);
        }
        assert_eq!(value(&s, "qcow2d_request_duration_seconds_count", &l), "8");
        assert_eq!(value(&s, "qcow2d_requests_total", &l), "8");
        assert_eq!(value(&s, "qcow2d_request_duration_seconds_sum", &l), "12.5");
        assert_eq!(value(&s, "qcow2d_request_bytes_total", &l), "32768");
        assert_eq!(value(&s, "qcow2d_request_errors_total", &l), "1");
        let q = |quantile: &str| {
            let mut labels = l.to_vec();
            labels.push(("quantile", quantile));
            value(&s, "qcow2d_request_duration_quantile_seconds", &labels)
                .parse::<f64>()
                .unwrap()
        };
        assert_eq!(q("0.5"), 1e-5);
        assert_eq!(q("0.99"), 1e-4);
        assert_eq!(q("0.999"), 12.0);
        assert_eq!(
            value(
                &s,
                "qcow2d_requests_in_flight",
                &[("export", "/run/a.sock")]
            ),
            "7"
        );
        assert_eq!(
            value(&s, "qcow2d_shard_queue_depth", &[("shard", "0")]),
            "4"
        );
        assert_eq!(value(&s, "qcow2d_l2_cache_misses_total", &[]), "10");
        assert_eq!(value(&s, "qcow2d_l2_cache_hits_total", &[]), "0");
        // Other operations are still there, at zero.
        let w = [("export", "/run/a.sock"), ("op", "write")];
        assert_eq!(value(&s, "qcow2d_request_duration_seconds_count", &w), "0");
        assert_eq!(value(&s, "qcow2d_request_duration_seconds_sum", &w), "0.0");
    }

    #[test]
    fn several_exports_share_each_family() {
        let text = Snapshot {
            exports: vec![export("/run/a.sock"), export("/run/b.sock")],
            cores: Vec::new(),
        }
        .render();
        assert_eq!(
            text.matches("# TYPE qcow2d_requests_total counter").count(),
            1
        );
        let s = samples(&text);
        for sock in ["/run/a.sock", "/run/b.sock"] {
            assert_eq!(
                value(
                    &s,
                    "qcow2d_requests_total",
                    &[("export", sock), ("op", "flush")]
                ),
                "0"
            );
        }
    }
}
