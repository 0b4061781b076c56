//! Metrics: per-worker request counters and latency histograms, per-shard cache statistics,
//! the core threads' cache use, merged and formatted in the Prometheus text format when scraped.
//!
//! Ownership and threads. `serve` makes one [`ExportMetrics`] per export at start-up, kept for
//! the life of the daemon, so counters count from the start across all of the export's
//! connections. It holds one [`ShardMetrics`] per worker thread (engine shard); each
//! connection's [`crate::worker::Worker`] number `i` records into shard metrics `i`, and only
//! it does (connections of one export follow one another, their workers never overlap). The
//! scraper thread ([`http`]) reads every counter, adds them up over the workers and formats the
//! result ([`exposition`]). Nothing here takes a lock: the data path writes with relaxed atomic
//! operations on memory that no other worker writes (each `ShardMetrics` is its own cache-aligned
//! allocation), and the scraper only loads, never touching the workers' mutexes. A scrape may
//! see a request in some counters and not yet in others; every counter is monotonic and each
//! settles once the request is done. The core threads' cache gauges are loads of their cache
//! budgets' counters (`crate::cores`), which the shards change only as a cache slot is added
//! or a shard dropped.
//!
//! What a request costs the worker: a clock read when its chain is popped and one when it is
//! returned to the used ring, then [`ShardMetrics::record`]: four relaxed `fetch_add`s (latency
//! bucket, latency sum, bytes or errors, the HDR counter); about 65 ns in all (measured by
//! `cost::metrics_cost`). Gauges (requests in flight) and the cache counters are published once
//! per turn of the worker's event loop, not per request. Without `--metrics` the workers have
//! no `ShardMetrics` and skip all of it.

pub mod exposition;
pub mod hdr;
pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::block_io::CacheStats;
use crate::virtio_blk::RequestType;
use hdr::AtomicHistogram;

/// The operation of a request, as the `op` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Operation {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// An unknown request type, or a chain too malformed to have one.
    Other,
}

impl Operation {
    /// Number of operations.
    pub const COUNT: usize = 7;
    /// Every operation, in label order.
    pub const ALL: [Operation; Self::COUNT] = [
        Operation::Read,
        Operation::Write,
        Operation::Flush,
        Operation::Discard,
        Operation::WriteZeroes,
        Operation::GetId,
        Operation::Other,
    ];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Flush => "flush",
            Operation::Discard => "discard",
            Operation::WriteZeroes => "write_zeroes",
            Operation::GetId => "get_id",
            Operation::Other => "other",
        }
    }

    /// The operation of a request of type `t` (`None`: the header could not be read).
    pub fn of(t: Option<RequestType>) -> Self {
        match t {
            Some(RequestType::In) => Operation::Read,
            Some(RequestType::Out) => Operation::Write,
            Some(RequestType::Flush) => Operation::Flush,
            Some(RequestType::Discard) => Operation::Discard,
            Some(RequestType::WriteZeroes) => Operation::WriteZeroes,
            Some(RequestType::GetId) => Operation::GetId,
            Some(RequestType::Other(_)) | None => Operation::Other,
        }
    }
}

/// Upper bounds of the latency histogram's buckets in nanoseconds: 10 µs to 10 s in 1-2.5-5
/// steps. Slower requests fall in the `+Inf` bucket only.
pub const BUCKET_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Latency buckets including the last, unbounded one.
pub const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;

/// The bucket a latency of `ns` falls in: the first whose bound is >= `ns` (`le` semantics).
fn bucket_index(ns: u64) -> usize {
    BUCKET_BOUNDS_NS.partition_point(|&bound| bound < ns)
}

/// Counters of one operation on one worker.
struct OpMetrics {
    /// Requests per latency bucket, not cumulative. Their sum is the request count, so the
    /// histogram's `_count` and `qcow2d_requests_total` always agree.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the latencies.
    duration_ns: AtomicU64,
    /// Payload bytes of the requests that succeeded.
    bytes: AtomicU64,
    /// Requests that completed with a status other than VIRTIO_BLK_S_OK.
    errors: AtomicU64,
    /// The same latencies, for quantiles.
    hdr: AtomicHistogram,
}

impl OpMetrics {
    fn new() -> Self {
        OpMetrics {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            duration_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hdr: AtomicHistogram::new(),
        }
    }
}

/// The metrics one worker thread (one engine shard) records. Written by that worker only;
/// read by the scraper.
// Aligned so that two workers' counters never share a cache line.
#[repr(align(128))]
pub struct ShardMetrics {
    ops: [OpMetrics; Operation::COUNT],
    /// Chains popped and not yet returned to the used ring (published once per turn).
    in_flight: AtomicU64,
    /// Cumulative cache statistics of the shards this worker has had.
    l2_hits: AtomicU64,
    l2_misses: AtomicU64,
    decompressed_hits: AtomicU64,
    decompressed_misses: AtomicU64,
    /// Time requests waited under the export's I/O limits, and how many waited.
    throttled_ns: AtomicU64,
    throttled: AtomicU64,
}

impl ShardMetrics {
    /// Zeroed metrics.
    pub fn new() -> Self {
        ShardMetrics {
            ops: std::array::from_fn(|_| OpMetrics::new()),
            in_flight: AtomicU64::new(0),
            l2_hits: AtomicU64::new(0),
            l2_misses: AtomicU64::new(0),
            decompressed_hits: AtomicU64::new(0),
            decompressed_misses: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        }
    }

    /// Counts a request that waited `waited` under the I/O limits before it started.
    pub fn add_throttled(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.throttled_ns.fetch_add(ns, Ordering::Relaxed);
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request returned to the guest: its operation, whether it succeeded, its
    /// payload bytes (counted only on success) and how long it took.
    pub fn record(&self, op: Operation, ok: bool, bytes: u64, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let m = &self.ops[op as usize];
        m.buckets[bucket_index(ns)].fetch_add(1, Ordering::Relaxed);
        m.duration_ns.fetch_add(ns, Ordering::Relaxed);
        if ok {
            m.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        m.hdr.record(ns);
    }

    /// Publishes the number of requests in flight on this worker.
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    /// Adds cache lookups counted since the last call.
    pub fn add_cache(&self, delta: CacheStats) {
        for (counter, n) in [
            (&self.l2_hits, delta.l2_hits),
            (&self.l2_misses, delta.l2_misses),
            (&self.decompressed_hits, delta.decompressed_hits),
            (&self.decompressed_misses, delta.decompressed_misses),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What identifies an export in the metrics.
#[derive(Clone, Debug)]
pub struct ExportLabels {
    /// The `export` label: the socket path.
    pub export: String,
    /// The image path.
    pub image: String,
    /// The serial the guest sees.
    pub serial: String,
    /// Whether the export is read-only.
    pub read_only: bool,
}

/// The metrics of one export: one [`ShardMetrics`] per worker thread.
pub struct ExportMetrics {
    labels: ExportLabels,
    shards: Vec<Arc<ShardMetrics>>,
}

impl std::fmt::Debug for ExportMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportMetrics")
            .field("labels", &self.labels)
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl ExportMetrics {
    /// Metrics for an export served by `shards` worker threads.
    pub fn new(labels: ExportLabels, shards: usize) -> Self {
        ExportMetrics {
            labels,
            shards: (0..shards.max(1))
                .map(|_| Arc::new(ShardMetrics::new()))
                .collect(),
        }
    }

    /// The metrics worker `index` records into (`None` past the configured worker count).
    pub fn shard(&self, index: usize) -> Option<Arc<ShardMetrics>> {
        self.shards.get(index).cloned()
    }

    /// Reads every counter of this export now.
    pub fn snapshot(&self) -> exposition::ExportSnapshot {
        snapshot_export(self)
    }
}

/// Every export's metrics: what a scrape reads. Exports come and go at run time (the control
/// socket, a reload); the list is behind a mutex that only the supervisor (adding, removing)
/// and the scraper take, never a worker.
#[derive(Default)]
pub struct Metrics {
    exports: Mutex<Vec<Arc<ExportMetrics>>>,
}

impl Metrics {
    /// No exports yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<ExportMetrics>>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an export; returns its metrics for its workers.
    pub fn add_export(&self, labels: ExportLabels, shards: usize) -> Arc<ExportMetrics> {
        let export = Arc::new(ExportMetrics::new(labels, shards));
        self.list().push(Arc::clone(&export));
        export
    }

    /// Removes an export's metrics (it stopped).
    pub fn remove_export(&self, export: &Arc<ExportMetrics>) {
        self.list().retain(|e| !Arc::ptr_eq(e, export));
    }

    /// Reads every counter now.
    pub fn snapshot(&self) -> exposition::Snapshot {
        let exports = self.list().clone();
        let cores = crate::cores::running()
            .map(|pool| {
                pool.cache_budgets()
                    .iter()
                    .map(|b| exposition::CoreSnapshot {
                        cache_bytes: b.used_bytes(),
                        cache_limit_bytes: b.limit_bytes(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        exposition::Snapshot {
            exports: exports.iter().map(|e| snapshot_export(e)).collect(),
            cores,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        self.snapshot().render()
    }
}

fn snapshot_export(export: &ExportMetrics) -> exposition::ExportSnapshot {
    let ops = Operation::ALL.map(|op| {
        let mut snap = exposition::OpSnapshot::default();
        let mut histogram = hdr::new_histogram();
        let mut duration_ns = 0u64;
        for shard in &export.shards {
            let m = &shard.ops[op as usize];
            for (total, bucket) in snap.buckets.iter_mut().zip(&m.buckets) {
                *total += bucket.load(Ordering::Relaxed);
            }
            duration_ns = duration_ns.wrapping_add(m.duration_ns.load(Ordering::Relaxed));
            snap.bytes += m.bytes.load(Ordering::Relaxed);
            snap.errors += m.errors.load(Ordering::Relaxed);
            if m.buckets.iter().any(|b| b.load(Ordering::Relaxed) > 0) {
                m.hdr.add_to(&mut histogram);
            }
        }
        snap.duration_seconds = duration_ns as f64 / 1e9;
        if !histogram.is_empty() {
            snap.quantiles =
                Some(exposition::QUANTILES.map(|q| histogram.value_at_quantile(q) as f64 / 1e9));
        }
        snap
    });
    let shards = export
        .shards
        .iter()
        .map(|s| exposition::ShardSnapshot {
            in_flight: s.in_flight.load(Ordering::Relaxed),
            cache: CacheStats {
                l2_hits: s.l2_hits.load(Ordering::Relaxed),
                l2_misses: s.l2_misses.load(Ordering::Relaxed),
                decompressed_hits: s.decompressed_hits.load(Ordering::Relaxed),
                decompressed_misses: s.decompressed_misses.load(Ordering::Relaxed),
            },
            throttled_seconds: s.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9,
            throttled: s.throttled.load(Ordering::Relaxed),
        })
        .collect();
    exposition::ExportSnapshot {
        labels: export.labels.clone(),
        ops,
        shards,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_have_le_semantics() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(10_000), 0, "le=\"1e-05\" includes 10 µs");
        assert_eq!(bucket_index(10_001), 1);
        assert_eq!(bucket_index(25_000), 1);
        assert_eq!(bucket_index(10_000_000_000), BUCKETS - 2);
        assert_eq!(bucket_index(10_000_000_001), BUCKETS - 1, "+Inf only");
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        assert!(BUCKET_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn operations_are_in_label_order() {
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        assert_eq!(Operation::of(Some(RequestType::In)), Operation::Read);
        assert_eq!(
            Operation::of(Some(RequestType::Other(77))),
            Operation::Other
        );
        assert_eq!(Operation::of(None), Operation::Other);
    }

    #[test]
    fn records_merge_over_workers() {
        let metrics = Metrics::new();
        let export = metrics.add_export(
            ExportLabels {
                export: "/run/a.sock".into(),
                image: "/img/a.qcow2".into(),
                serial: "a".into(),
                read_only: false,
            },
            2,
        );
        let (w0, w1) = (export.shard(0).unwrap(), export.shard(1).unwrap());
        assert!(export.shard(2).is_none());
        w0.record(Operation::Read, true, 4096, Duration::from_micros(20));
        w1.record(Operation::Read, true, 512, Duration::from_micros(5));
        w1.record(Operation::Read, false, 4096, Duration::from_millis(3));
        w1.record(Operation::Flush, true, 0, Duration::from_secs(20));
        w0.set_in_flight(3);
        w1.set_in_flight(1);
        w0.add_cache(CacheStats {
            l2_hits: 5,
            l2_misses: 1,
            decompressed_hits: 0,
            decompressed_misses: 2,
        });
        let snap = metrics.snapshot();
        let e = &snap.exports[0];
        let read = &e.ops[Operation::Read as usize];
        assert_eq!(read.requests(), 3);
        assert_eq!(read.bytes, 4096 + 512, "failed requests move no bytes");
        assert_eq!(read.errors, 1);
        assert_eq!(read.buckets[0], 1);
        assert_eq!(read.buckets[1], 1);
        assert_eq!(read.buckets[bucket_index(3_000_000)], 1);
        assert!((read.duration_seconds - 0.003_025).abs() < 1e-12);
        let [p50, p99, p999] = read.quantiles.unwrap();
        assert!((20e-6..20.1e-6).contains(&p50), "{p50}");
        assert!((3e-3..3.01e-3).contains(&p99), "{p99}");
        assert_eq!(p99, p999);
        let flush = &e.ops[Operation::Flush as usize];
        assert_eq!(flush.buckets[BUCKETS - 1], 1);
        assert!(e.ops[Operation::Write as usize].quantiles.is_none());
        assert_eq!(e.shards[0].in_flight, 3);
        assert_eq!(e.shards[1].in_flight, 1);
        assert_eq!(e.shards[0].cache.l2_hits, 5);
        assert_eq!(e.shards[0].cache.decompressed_misses, 2);
    }
}

/// How the cost per request quoted in README.md was measured:
/// `cargo test --release -p qcow2d --bins -- --ignored --nocapture metrics_cost`.
#[cfg(test)]
mod cost {
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn metrics_cost() {
        let m = ShardMetrics::new();
        let n = 20_000_000u64;
        let t = Instant::now();
        for i in 0..n {
            m.record(
                black_box(Operation::Read),
                black_box(true),
                4096,
                Duration::from_nanos(black_box(20_000 + (i & 4095))),
            );
        }
        let record_ns = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            black_box(Instant::now());
        }
        let clock_ns = t.elapsed().as_nanos() as f64 / n as f64;
        eprintln!(
            "record {record_ns:.1} ns + 2 clock reads of {clock_ns:.1} ns = {:.1} ns per request",
            record_ns + 2.0 * clock_ns
        );
    }
}
