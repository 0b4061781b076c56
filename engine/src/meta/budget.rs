//! A byte budget that several caches draw their slots from ([`CacheBudget`]).
//!
//! A daemon serving many images runs the shards of many connections on one thread; their
//! caches ([`super::SlotCache`]) draw from one budget of that thread instead of each growing
//! to its own limit. The counter is touched only when a cache adds a slot or is dropped, never
//! on a lookup: a hit costs nothing more, and the shards of one thread never contend for it
//! (other threads only read it, or give bytes back as they drop a shard).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of cache slots that the caches given this budget may hold together (cheap to clone:
/// an `Arc` inside; `Send + Sync`).
///
/// A cache whose next slot would take the budget past its limit reuses one of its own slots
/// instead, as long as it holds its floor (a few slots per layer of the image, so every shard
/// always makes progress); slots of the floor are counted too and may take the budget past its
/// limit. So what the caches of `shards` shards hold stays within `limit_bytes() + floor bytes
/// × shards`, plus the slots a cache adds while every slot it has is loading or holds changes
/// not flushed yet (it grows rather than stall). A cache gives its bytes back when it is
/// dropped (with its shard).
#[derive(Clone, Debug)]
pub struct CacheBudget {
    inner: Arc<Counter>,
}

#[derive(Debug)]
struct Counter {
    limit_bytes: u64,
    used_bytes: AtomicU64,
}

impl CacheBudget {
    /// A budget of `limit_bytes`, none of it used.
    pub fn new(limit_bytes: u64) -> CacheBudget {
        CacheBudget {
            inner: Arc::new(Counter {
                limit_bytes,
                used_bytes: AtomicU64::new(0),
            }),
        }
    }

    /// The limit it was made with.
    pub fn limit_bytes(&self) -> u64 {
        self.inner.limit_bytes
    }

    /// Bytes of the slots that the caches drawing from it hold now (may exceed the limit by
    /// their floors, see the type's documentation).
    pub fn used_bytes(&self) -> u64 {
        self.inner.used_bytes.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the limit; false (nothing taken) if not.
    pub(crate) fn try_take(&self, bytes: u64) -> bool {
        let limit = self.inner.limit_bytes;
        self.inner
            .used_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&after| after <= limit)
            })
            .is_ok()
    }

    /// Takes `bytes` whatever the limit (a cache's floor, or a slot added rather than stall).
    pub(crate) fn take(&self, bytes: u64) {
        self.inner.used_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back `bytes` taken before.
    pub(crate) fn give_back(&self, bytes: u64) {
        let before = self.inner.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(
            before >= bytes,
            "a cache budget gets back more than it gave"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_within_the_limit_and_past_it_only_when_forced() {
        let b = CacheBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert_eq!(b.used_bytes(), 60);
        assert!(b.try_take(40));
        b.take(10);
        assert_eq!(b.used_bytes(), 110);
        assert!(!b.try_take(1));
        b.give_back(110);
        assert_eq!(b.used_bytes(), 0);
        assert_eq!(b.clone().limit_bytes(), 100);
    }
}
