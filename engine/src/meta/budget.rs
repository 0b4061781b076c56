//! A byte budget that several caches draw their slots from ([`CacheBudget`]), and a member's
//! fair share of it ([`CacheShare`]).
//!
//! A daemon serving many images runs the shards of many connections on one thread; their
//! caches ([`super::SlotCache`]) draw from one budget of that thread instead of each growing
//! to its own limit. Each shard joins the budget as one member ([`CacheBudget::share`]), and
//! its caches (an L2 and a decompressed-cluster cache per image layer) draw on that member's
//! fair share together: the limit divided by the members there are now.
//!
//! The counters are touched only when a cache adds a slot, misses while full, gives a slot
//! back or is dropped, never on a lookup that hits: a hit costs nothing more, and the shards
//! of one thread never contend for them (other threads only read them, or give bytes back as
//! they drop a shard).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of cache slots that the caches given this budget may hold together (cheap to clone:
/// an `Arc` inside; `Send + Sync`), shared out fairly among its members ([`CacheShare`], one
/// per shard).
///
/// The policy, for a cache past its floor (a few slots per layer of the image, so every shard
/// always makes progress) that misses with no free slot:
/// - it adds a slot while the budget has room (what all members hold stays within the limit);
/// - it adds a slot anyway while its member holds less than its fair share (`limit / members`)
///   and the budget holds less than twice its limit: a member that joins when others took the
///   whole budget still grows to its share;
/// - otherwise it reuses one of its own slots (CLOCK), and when its member holds more than its
///   fair share while the budget is over its limit, it also gives one more slot back (a clean,
///   ready, unpinned one), so that a member that took much while it was alone shrinks toward
///   its share as it goes on missing, and the budget back under its limit.
///
/// So what the members hold stays within `2 × limit_bytes()` plus every cache's floor, plus
/// the slots a cache adds while every slot it has is loading or holds changes not flushed yet
/// (it grows rather than stall). Over the limit itself it stays only while members that hold
/// more than their share do not miss (a cache that only hits keeps what it holds: the hit path
/// never looks at the budget). A cache gives its bytes back when it is dropped (with its
/// shard), and a member leaves the budget when its last cache is dropped.
#[derive(Clone, Debug)]
pub struct CacheBudget {
    inner: Arc<Counter>,
}

#[derive(Debug)]
struct Counter {
    limit_bytes: u64,
    used_bytes: AtomicU64,
    /// Live [`CacheShare`]s (one per shard).
    members: AtomicU64,
}

impl CacheBudget {
    /// A budget of `limit_bytes`, none of it used.
    pub fn new(limit_bytes: u64) -> CacheBudget {
        CacheBudget {
            inner: Arc::new(Counter {
                limit_bytes,
                used_bytes: AtomicU64::new(0),
                members: AtomicU64::new(0),
            }),
        }
    }

    /// The limit it was made with.
    pub fn limit_bytes(&self) -> u64 {
        self.inner.limit_bytes
    }

    /// Bytes of the slots that the caches drawing from it hold now (may exceed the limit, see
    /// the type's documentation).
    pub fn used_bytes(&self) -> u64 {
        self.inner.used_bytes.load(Ordering::Relaxed)
    }

    /// How many members draw from it now.
    pub fn members(&self) -> u64 {
        self.inner.members.load(Ordering::Relaxed)
    }

    /// What each member may hold whatever the others took: the limit divided by the members
    /// (the whole limit when there are none).
    pub fn fair_share_bytes(&self) -> u64 {
        self.limit_bytes() / self.members().max(1)
    }

    /// Joins the budget as a new member: the caches given clones of the result (those of one
    /// shard) draw on one fair share. The member leaves when the last clone is dropped.
    pub fn share(&self) -> CacheShare {
        self.inner.members.fetch_add(1, Ordering::Relaxed);
        CacheShare {
            inner: Arc::new(Member {
                budget: self.clone(),
                held_bytes: AtomicU64::new(0),
            }),
        }
    }

    /// Takes `bytes` if the budget then holds at most `ceiling`; false (nothing taken) if not.
    fn try_take_within(&self, bytes: u64, ceiling: u64) -> bool {
        self.inner
            .used_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&after| after <= ceiling)
            })
            .is_ok()
    }
}

/// One member of a [`CacheBudget`] (cheap to clone: an `Arc` inside; `Send + Sync`): the
/// caches of one shard, which together may hold the budget's fair share whatever the other
/// members took (see [`CacheBudget`]). Made by [`CacheBudget::share`].
#[derive(Clone, Debug)]
pub struct CacheShare {
    inner: Arc<Member>,
}

#[derive(Debug)]
struct Member {
    budget: CacheBudget,
    /// Bytes the caches of this member hold (counted in the budget's `used_bytes` too).
    held_bytes: AtomicU64,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.budget.inner.members.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CacheShare {
    /// The budget this member draws from.
    pub fn budget(&self) -> &CacheBudget {
        &self.inner.budget
    }

    /// Bytes the caches of this member hold now.
    pub fn held_bytes(&self) -> u64 {
        self.inner.held_bytes.load(Ordering::Relaxed)
    }

    /// Takes `bytes` for one more slot past a cache's floor if the policy allows it (see
    /// [`CacheBudget`]): while the budget has room, or while the member holds less than its
    /// fair share and the budget less than twice its limit. False (nothing taken) if not.
    pub(crate) fn try_grow(&self, bytes: u64) -> bool {
        let budget = self.budget();
        let limit = budget.limit_bytes();
        let taken = budget.try_take_within(bytes, limit)
            || (self.held_bytes().saturating_add(bytes) <= budget.fair_share_bytes()
                && budget.try_take_within(bytes, limit.saturating_mul(2)));
        if taken {
            self.inner.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        taken
    }

    /// Takes `bytes` whatever the budget holds (a cache's floor, or a slot added rather than
    /// stall).
    pub(crate) fn take(&self, bytes: u64) {
        self.budget()
            .inner
            .used_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.inner.held_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back `bytes` taken before.
    pub(crate) fn give_back(&self, bytes: u64) {
        let held = self.inner.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let used = self
            .budget()
            .inner
            .used_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(
            held >= bytes && used >= bytes,
            "a cache budget gets back more than it gave"
        );
    }

    /// Whether a cache of this member that misses should give a slot back: the budget is over
    /// its limit and the member holds more than its fair share. One load while the budget is
    /// within its limit, three past it.
    pub(crate) fn over_share(&self) -> bool {
        let budget = self.budget();
        budget.used_bytes() > budget.limit_bytes() && self.held_bytes() > budget.fair_share_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_within_the_limit_and_past_it_only_when_forced() {
        let b = CacheBudget::new(100);
        let s = b.share();
        assert!(s.try_grow(60));
        // Alone, its fair share is the whole limit: nothing past it.
        assert!(!s.try_grow(41));
        assert_eq!(b.used_bytes(), 60);
        assert!(s.try_grow(40));
        s.take(10);
        assert_eq!(b.used_bytes(), 110);
        assert_eq!(s.held_bytes(), 110);
        assert!(!s.try_grow(1));
        // Over the limit and over its share.
        assert!(s.over_share());
        s.give_back(110);
        assert_eq!(b.used_bytes(), 0);
        assert_eq!(b.clone().limit_bytes(), 100);
    }

    #[test]
    fn a_member_grows_to_its_fair_share_past_a_used_up_budget() {
        let b = CacheBudget::new(100);
        let first = b.share();
        assert!(first.try_grow(100));
        assert_eq!(b.members(), 1);
        // The budget is used up, but `second` holds less than half of it.
        let second = b.clone().share();
        assert_eq!(b.members(), 2);
        assert_eq!(b.fair_share_bytes(), 50);
        assert!(second.try_grow(50));
        assert!(!second.try_grow(1));
        assert_eq!(b.used_bytes(), 150);
        // The first member is over its share while the budget is over its limit.
        assert!(first.over_share());
        assert!(!second.over_share());
        // Members that join while the others keep what they hold grow to their shares until
        // the budget holds twice its limit.
        let third = b.share();
        assert!(third.try_grow(33));
        assert!(!third.try_grow(1));
        let fourth = b.share();
        assert!(fourth.try_grow(17));
        assert!(!fourth.try_grow(1), "twice the limit reached");
        assert_eq!(b.used_bytes(), 200);
        // Members now hold 100, 50, 33 and 17 of shares of 25: all but the last are over.
        assert!(first.over_share() && second.over_share() && third.over_share());
        assert!(!fourth.over_share());
        // A member leaves when its last clone is dropped.
        third.give_back(33);
        let clone = third.clone();
        drop(third);
        assert_eq!(b.members(), 4);
        drop(clone);
        assert_eq!(b.members(), 3);
        assert_eq!(b.fair_share_bytes(), 33);
        assert!(fourth.try_grow(16));
        assert!(!fourth.try_grow(1));
    }
}
