//! Latency histograms and the summaries printed and written as JSON. Each worker thread records
//! into its own histogram; the coordinator merges them after the threads are joined.
//! The histogram type is the same `hdrhistogram` the daemon's metrics use, in nanoseconds.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in nanoseconds.
pub type LatencyHistogram = Histogram<u64>;

/// Highest latency kept exactly: anything slower is recorded as this (100 s).
const MAX_TRACKED_LATENCY_NS: u64 = 100_000_000_000;
/// Three significant digits: 0.1 % resolution at every scale.
const SIGNIFICANT_DIGITS: u8 = 3;

pub fn new_histogram() -> LatencyHistogram {
    // Cannot fail: low = 1 >= 1, high >= 2 * low, and 3 significant digits is within 0..=5.
    Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Records one latency, clamped into the tracked range.
pub fn record_latency(histogram: &mut LatencyHistogram, latency_ns: u64) {
    histogram.saturating_record(latency_ns.clamp(1, MAX_TRACKED_LATENCY_NS));
}

/// Merges per-thread (or per-round) histograms into one.
pub fn merge<'a>(
    histograms: impl IntoIterator<Item = &'a LatencyHistogram>,
) -> Result<LatencyHistogram, hdrhistogram::AdditionError> {
    let mut merged = new_histogram();
    for histogram in histograms {
        merged.add(histogram)?;
    }
    Ok(merged)
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LatencySummary {
    pub samples: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl LatencySummary {
    pub fn of(histogram: &LatencyHistogram) -> Self {
        if histogram.is_empty() {
            return Self {
                samples: 0,
                min_us: 0.0,
                mean_us: 0.0,
                p50_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                max_us: 0.0,
            };
        }
        Self {
            samples: histogram.len(),
            min_us: ns_to_us(histogram.min()),
            mean_us: histogram.mean() / 1000.0,
            p50_us: ns_to_us(histogram.value_at_quantile(0.50)),
            p99_us: ns_to_us(histogram.value_at_quantile(0.99)),
            p999_us: ns_to_us(histogram.value_at_quantile(0.999)),
            max_us: ns_to_us(histogram.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for latency_ns in 1..=1000u64 {
            record_latency(&mut a, latency_ns * 1000); // 1..=1000 µs
        }
        for _ in 0..1000 {
            record_latency(&mut b, 5_000_000); // 5 ms
        }
        let merged = merge([&a, &b]).unwrap();
        assert_eq!(merged.len(), 2000);
        assert!(merged.equivalent(merged.min(), 1000));
        assert!(merged.equivalent(merged.max(), 5_000_000));
        // Half the samples are <= 1 ms, so the median sits at the top of `a`.
        let p50 = merged.value_at_quantile(0.5);
        assert!(merged.equivalent(p50, 1_000_000), "p50 {p50}");
        let p99 = merged.value_at_quantile(0.99);
        assert!(merged.equivalent(p99, 5_000_000), "p99 {p99}");
    }

    #[test]
    fn merge_of_nothing_is_empty() {
        let merged = merge(std::iter::empty()).unwrap();
        assert!(merged.is_empty());
        assert_eq!(LatencySummary::of(&merged).samples, 0);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut parts = vec![new_histogram(), new_histogram(), new_histogram()];
        let mut whole = new_histogram();
        for i in 0..30_000u64 {
            let latency_ns = 1 + (i * 7919) % 2_000_000;
            record_latency(&mut parts[(i % 3) as usize], latency_ns);
            record_latency(&mut whole, latency_ns);
        }
        let merged = merge(&parts).unwrap();
        assert_eq!(LatencySummary::of(&merged), LatencySummary::of(&whole));
    }

    #[test]
    fn out_of_range_latencies_are_clamped() {
        let mut h = new_histogram();
        record_latency(&mut h, 0);
        record_latency(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.equivalent(h.max(), MAX_TRACKED_LATENCY_NS));
    }

    #[test]
    fn summary_is_in_microseconds() {
        let mut h = new_histogram();
        record_latency(&mut h, 250_000);
        let s = LatencySummary::of(&h);
        assert!((s.p50_us - 250.0).abs() < 0.5, "{}", s.p50_us);
        assert!((s.max_us - 250.0).abs() < 0.5);
    }
}
