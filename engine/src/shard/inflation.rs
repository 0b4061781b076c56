//! A shard's side of inflating compressed clusters ([`Inflation`], one part of its state):
//! its inflater, its queue of inflate jobs (run by the shard or a thief, `io/inflate.rs`),
//! and the ends of the last few compressed reads (to tell sequential streams). Reading and
//! inflating compressed clusters is `read.rs`.
//!
//! Owned by one shard and used on its thread; the jobs it queues may be run by others.

use crate::io::{ClusterInflater, InflateQueue, InflateSharing};

/// A shard's side of inflating compressed clusters: its inflater, its queue of inflate jobs
/// (run by the shard or a thief, `io/inflate.rs`), and the ends of the last few compressed
/// reads (to tell sequential streams).
pub(super) struct Inflation {
    pub(super) inflater: ClusterInflater,
    /// Inflate jobs of this shard that the shard or a thief runs.
    pub(super) jobs: InflateQueue,
    /// This shard's inflate jobs not completed yet (queued, or run by a thief).
    pub(super) jobs_out: usize,
    /// Guest offsets just past the last few compressed parts read (sequential streams).
    recent_ends: [u64; 8],
    next_end: usize,
}

impl Inflation {
    /// Nothing inflated yet; jobs shared with other threads as `sharing` says.
    pub(super) fn new(sharing: InflateSharing) -> Inflation {
        Inflation {
            inflater: ClusterInflater::new(),
            jobs: InflateQueue::new(sharing),
            jobs_out: 0,
            recent_ends: [u64::MAX; 8],
            next_end: 0,
        }
    }

    /// Notes a compressed read of `len` bytes at `guest_off`; returns whether it continues
    /// one of the last few (a sequential stream).
    pub(super) fn continues_recent(&mut self, guest_off: u64, len: u64) -> bool {
        let sequential = self.recent_ends.contains(&guest_off);
        let slot = self.next_end % self.recent_ends.len();
        self.recent_ends[slot] = guest_off + len;
        self.next_end = self.next_end.wrapping_add(1);
        sequential
    }
}
