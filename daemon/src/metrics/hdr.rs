//! A latency histogram that one worker records into with relaxed atomic adds and the scraper
//! reads without stopping it, laid out exactly as an `hdrhistogram::Histogram` is.
//!
//! `hdrhistogram::Histogram` is what the bench records its latencies in (1 ns to 100 s, three
//! significant digits), and the quantiles the daemon exports are computed by that same type, so
//! that both report the same numbers for the same latencies. But a `Histogram` is a plain
//! `Vec<u64>`: sharing it needs a lock, and its `sync::SyncHistogram` makes every scrape wait
//! until each worker records again (an idle worker stalls the scrape until a timeout and keeps
//! its latest samples to itself) and takes a mutex when a recorder goes idle or comes back.
//! [`AtomicHistogram`] keeps the counts in `AtomicU64`s at the same indexes `Histogram` uses
//! (index arithmetic below, checked against the crate in the tests), so a worker's record is one
//! relaxed `fetch_add`, and [`AtomicHistogram::add_to`] turns a snapshot of the counts into an
//! ordinary `Histogram` bucket for bucket, from any thread, at any time.
//!
//! The counts live in an anonymous memory mapping of their own: the kernel supplies a zeroed page
//! when a counter in it is first incremented, and latencies only ever fall in a few dozen of the
//! 56 pages of 28,672 counters, so a histogram costs tens of KiB of memory, not 224 KiB. (The
//! global allocator would hand out recycled memory that it has to clear, touching every page.)

use std::alloc::{handle_alloc_error, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

/// Lowest latency told apart, in nanoseconds (the bench's).
pub const LOWEST_NS: u64 = 1;
/// Highest latency kept exactly (100 s, the bench's); slower ones are recorded as this.
pub const HIGHEST_NS: u64 = 100_000_000_000;
/// Significant decimal digits kept at every scale (the bench's): 0.1 % resolution.
pub const SIGNIFICANT_DIGITS: u8 = 3;

// The layout `Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS)` has
// (hdrhistogram 7, `new_with_bounds` and `index_for`); the test
// `layout_matches_hdrhistogram` checks each of these against the crate.

/// log2 of the smallest power of two >= 2 * 10^SIGNIFICANT_DIGITS (2048).
const SUB_BUCKET_COUNT_MAGNITUDE: u32 = 11;
/// Half of the sub-buckets: the first bucket uses all of them, the others their top half.
const SUB_BUCKET_HALF_COUNT_MAGNITUDE: u32 = SUB_BUCKET_COUNT_MAGNITUDE - 1;
const SUB_BUCKET_HALF_COUNT: usize = 1 << SUB_BUCKET_HALF_COUNT_MAGNITUDE;
/// floor(log2(LOWEST_NS)).
const UNIT_MAGNITUDE: u32 = 0;
const SUB_BUCKET_MASK: u64 = ((1 << SUB_BUCKET_COUNT_MAGNITUDE) - 1) << UNIT_MAGNITUDE;
const LEADING_ZERO_COUNT_BASE: u32 = 64 - UNIT_MAGNITUDE - SUB_BUCKET_COUNT_MAGNITUDE;
/// Buckets (powers of two) needed to reach HIGHEST_NS: 2048 << 26 > 10^11.
const BUCKET_COUNT: usize = 27;
/// Number of counters.
pub const LEN: usize = (BUCKET_COUNT + 1) * SUB_BUCKET_HALF_COUNT;
/// Size of the mapping that holds them.
const BYTES: usize = LEN * std::mem::size_of::<AtomicU64>();

/// The counters index of `ns` (already clamped into `LOWEST_NS..=HIGHEST_NS`).
fn index_for(ns: u64) -> usize {
    let bucket = LEADING_ZERO_COUNT_BASE - (ns | SUB_BUCKET_MASK).leading_zeros();
    // Below 2^SUB_BUCKET_COUNT_MAGNITUDE, so the cast cannot truncate.
    let sub_bucket = (ns >> (bucket + UNIT_MAGNITUDE)) as usize;
    ((bucket as usize + 1) << SUB_BUCKET_HALF_COUNT_MAGNITUDE) + sub_bucket - SUB_BUCKET_HALF_COUNT
}

/// The lowest value that counter `index` holds.
fn value_for(index: usize) -> u64 {
    let half = index >> SUB_BUCKET_HALF_COUNT_MAGNITUDE;
    let (bucket, sub_bucket) = match half.checked_sub(1) {
        Some(bucket) => (
            bucket,
            (index & (SUB_BUCKET_HALF_COUNT - 1)) + SUB_BUCKET_HALF_COUNT,
        ),
        // The lower half of the first bucket.
        None => (0, index & (SUB_BUCKET_HALF_COUNT - 1)),
    };
    (sub_bucket as u64) << (bucket as u32 + UNIT_MAGNITUDE)
}

/// A new empty `Histogram` with the bench's bounds and precision.
pub fn new_histogram() -> Histogram<u64> {
    // Cannot fail: LOWEST_NS >= 1, HIGHEST_NS >= 2 * LOWEST_NS, SIGNIFICANT_DIGITS <= 5.
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Latency counts, recorded by one thread and read by any.
pub struct AtomicHistogram {
    /// `LEN` counters at the start of a private anonymous mapping of `BYTES` bytes, owned by
    /// this value and unmapped when it is dropped.
    counts: NonNull<AtomicU64>,
}

// SAFETY: the mapping belongs to this value alone, and all access to it goes through
// `&[AtomicU64]` (see `counts`), which may be shared and sent between threads.
unsafe impl Send for AtomicHistogram {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for AtomicHistogram {}

impl AtomicHistogram {
    /// An empty histogram. Like any allocation, aborts the process if memory is exhausted.
    pub fn new() -> Self {
        // SAFETY: a new private anonymous mapping at an address the kernel chooses: no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let counts = if ptr == libc::MAP_FAILED {
            None
        } else {
            NonNull::new(ptr.cast::<AtomicU64>())
        };
        let Some(counts) = counts else {
            // Cannot fail: BYTES is far below isize::MAX.
            let layout = Layout::array::<AtomicU64>(LEN).expect("the counters fit in memory");
            handle_alloc_error(layout);
        };
        AtomicHistogram { counts }
    }

    fn counts(&self) -> &[AtomicU64] {
        // SAFETY: `counts` points to a live, page-aligned (so suitably aligned) mapping of
        // BYTES = LEN counters, unmapped only by `drop`, after every borrow of `self` has
        // ended. Fresh anonymous pages read as zeros, a valid `AtomicU64`, and every access is
        // atomic, so shared references to them are sound. Tested by
        // `snapshot_equals_a_directly_recorded_histogram` (every index written and read back).
        unsafe { std::slice::from_raw_parts(self.counts.as_ptr(), LEN) }
    }

    /// Counts one latency; values outside the tracked range count as its nearest end.
    pub fn record(&self, ns: u64) {
        let index = index_for(ns.clamp(LOWEST_NS, HIGHEST_NS));
        // Always in range: index_for(HIGHEST_NS) < LEN (test `layout_matches_hdrhistogram`).
        if let Some(count) = self.counts().get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds the counts as they are now to `histogram` (made by [`new_histogram`]). Counts being
    /// recorded meanwhile may or may not be included.
    pub fn add_to(&self, histogram: &mut Histogram<u64>) {
        for (index, count) in self.counts().iter().enumerate() {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                histogram.saturating_record_n(value_for(index), n);
            }
        }
    }
}

impl Drop for AtomicHistogram {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of BYTES bytes; `&mut self` means no reference
        // from `counts` is alive, and nothing uses it after this.
        let rc = unsafe { libc::munmap(self.counts.as_ptr().cast(), BYTES) };
        debug_assert_eq!(rc, 0, "munmap of a mapping we own");
    }
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across every bucket: all of the first two buckets, then the edges and a few
    /// values in between of each later one, up to the highest trackable value.
    fn sample_values() -> Vec<u64> {
        let mut values: Vec<u64> = (1..=8192).collect();
        let mut edge = 8192u64;
        while edge <= HIGHEST_NS {
            for v in [
                edge - 1,
                edge,
                edge + 1,
                edge + edge / 3,
                edge + edge / 2 + 7,
            ] {
                values.push(v.min(HIGHEST_NS));
            }
            edge *= 2;
        }
        let mut rng = qcow2d_tests::Rng::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            values.push(1 + rng.below(HIGHEST_NS));
        }
        values.push(HIGHEST_NS);
        values
    }

    #[test]
    fn layout_matches_hdrhistogram() {
        let h = new_histogram();
        assert_eq!(h.distinct_values(), LEN, "counter count");
        assert!(index_for(HIGHEST_NS) < LEN);
        for v in sample_values() {
            // Same bucket: same lowest value, and our index maps back to it.
            assert_eq!(value_for(index_for(v)), h.lowest_equivalent(v), "value {v}");
            assert_eq!(
                index_for(value_for(index_for(v))),
                index_for(v),
                "value {v}"
            );
        }
    }

    #[test]
    fn snapshot_equals_a_directly_recorded_histogram() {
        let atomic = AtomicHistogram::new();
        let mut direct = new_histogram();
        for v in sample_values() {
            atomic.record(v);
            direct.record(v).unwrap();
        }
        // Out of range: clamped, as the bench clamps.
        atomic.record(0);
        direct.record(LOWEST_NS).unwrap();
        atomic.record(u64::MAX);
        direct.record(HIGHEST_NS).unwrap();

        let mut merged = new_histogram();
        atomic.add_to(&mut merged);
        assert_eq!(merged.len(), direct.len());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                direct.value_at_quantile(q),
                "quantile {q}"
            );
        }
        assert_eq!(merged.max(), direct.max());
        assert_eq!(merged.min(), direct.min());
        assert!(merged == direct, "bucket for bucket");
    }

    #[test]
    fn several_recorders_merge() {
        let a = AtomicHistogram::new();
        let b = AtomicHistogram::new();
        for v in [1_000, 10_000, 10_000, 50_000] {
            a.record(v);
        }
        b.record(2_000_000);
        let mut merged = new_histogram();
        a.add_to(&mut merged);
        b.add_to(&mut merged);
        assert_eq!(merged.len(), 5);
        assert_eq!(
            merged.value_at_quantile(0.5),
            merged.highest_equivalent(10_000)
        );
        assert_eq!(merged.max(), merged.highest_equivalent(2_000_000));
    }
}
