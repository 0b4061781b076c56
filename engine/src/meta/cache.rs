//! A fixed-size cache of equally sized buffers keyed by `u64`, with loads in flight.
//!
//! Used for L2 tables (key: L1 index) and decompressed clusters (key: host offset of the
//! compressed extent). A slot is either loading, with a list of parts waiting for it, or
//! ready. Eviction is CLOCK over ready slots; a loading slot is never evicted, so a buffer the
//! kernel is writing into is never reused. When every slot is loading, the cache grows past its
//! capacity rather than stall (bounded by the number of requests in flight).
//!
//! A cache may draw its slots from a [`CacheBudget`] shared with other caches, as part of a
//! member of it ([`CacheShare`], [`SlotCache::with_share`]): past a floor of slots it adds one
//! only as the budget's policy allows (room in the budget, or a member below its fair share),
//! and otherwise reuses one of its own (CLOCK) as if it were full; a cache whose member holds
//! more than its fair share while the budget is over its limit also gives one more slot back
//! as it reuses one. The budget is touched only on a miss with no free slot and as the cache
//! is dropped, never on a lookup.
//!
//! Giving a slot back drops its buffer but keeps the slot, empty, under its id (a hollow
//! slot), and a hollow slot is the first to get a buffer again when the cache grows. Slot ids
//! are handed out (`u32`, to parts waiting on a load, to operations, to allocations that pin
//! a table, to a shard's per-slot tags) and must stay meaning the same slot; removing slots
//! from the vector would move others. Only a slot that CLOCK would reuse is given back (ready,
//! clean, unpinned, not referenced since the hand last passed), and an id of such a slot is
//! held by nothing: a reused slot gets a new key under the same id just as well. The cost of a
//! hollow slot is its bookkeeping (under a hundred bytes), and there are never more slots than
//! the most the cache held at once.
//!
//! A caller that can serve a miss without the cache (a whole compressed cluster inflated
//! straight into guest memory) asks [`SlotCache::admit_on_repeat`] first: keys are admitted on
//! their second miss within a recent window, so a stream that reads every key once never goes
//! through the cache while a key read again soon after is cached from then on.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use super::budget::{CacheBudget, CacheShare};

/// Ways of each set of [`SlotCache`]'s recent-miss table.
const RECENT_WAYS: usize = 4;
/// Most sets of the recent-miss table (128 KiB).
const MAX_RECENT_SETS: usize = 4096;

/// "No element" in the intrusive lists threaded through the shard's parts.
pub const NO_ID: u32 = u32::MAX;

/// Head and tail of an intrusive FIFO of part ids; the links live in the parts themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitList {
    /// First waiting part, or [`NO_ID`].
    pub head: u32,
    /// Last waiting part, or [`NO_ID`].
    pub tail: u32,
}

impl Default for WaitList {
    fn default() -> Self {
        WaitList::EMPTY
    }
}

impl WaitList {
    /// An empty list.
    pub const EMPTY: WaitList = WaitList {
        head: NO_ID,
        tail: NO_ID,
    };
}

#[derive(Debug)]
enum State {
    Free,
    Loading(WaitList),
    Ready,
}

#[derive(Debug)]
struct Slot {
    key: u64,
    state: State,
    referenced: bool,
    /// Changed in memory and not yet written by a flush: never evicted.
    dirty: bool,
    /// Chunks (see [`SlotCache::chunk_shift`]) changed since the buffer last reached the file
    /// by any write: a subset of what `dirty` covers.
    unwritten: u128,
    /// Held by an operation that will change the buffer: never evicted.
    pins: u32,
    buf: Box<[u8]>,
}

/// Result of [`SlotCache::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The buffer is valid.
    Ready(u32),
    /// A load is in flight; wait on the slot.
    Loading(u32),
    /// Not cached and not loading.
    Miss,
}

/// Hashes a `u64` key with one multiplication (keys are offsets and indices, not attacker
/// chosen in a way that matters: the map is bounded by the cache capacity).
#[derive(Default)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Unwritten runs closer than this are written as one range (see
/// [`SlotCache::take_unwritten`]).
const MERGE_GAP_BYTES: usize = 16384;

/// Appends the byte range of chunks `first..end` of slot `id` to `out`.
fn push_range(
    out: &mut Vec<(u64, u32, usize, usize)>,
    (id, slot): (u32, &Slot),
    chunk: usize,
    (first, end): (usize, usize),
) {
    let offset = first * chunk;
    let len = ((end - first) * chunk).min(slot.buf.len().saturating_sub(offset));
    if len > 0 {
        out.push((slot.key, id, offset, len));
    }
}

/// See the module documentation.
pub struct SlotCache {
    map: HashMap<u64, u32, BuildHasherDefault<U64Hasher>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    capacity: usize,
    hand: usize,
    buf_bytes: usize,
    /// Slots whose `unwritten` is not empty, each once.
    unwritten: Vec<u32>,
    /// log2 of the granularity of `unwritten`: a 512-byte sector, or 1/128 of a buffer when
    /// that is larger.
    chunk_shift: u32,
    hits: u64,
    misses: u64,
    /// Keys that recently missed and bypassed the cache, in sets of [`RECENT_WAYS`] (0 =
    /// empty; set-associative, so a few keys that hash alike do not keep pushing each other
    /// out); about twice the capacity, allocated on first use.
    recent: Vec<[u64; RECENT_WAYS]>,
    /// The budget member the slots are drawn from, and the slots the cache may hold whatever
    /// the budget's state (see [`SlotCache::with_share`]).
    budget: Option<(CacheShare, usize)>,
    /// Slots whose buffers were given back to the budget (empty, free, in no other list),
    /// each once; given a buffer again before a slot is added.
    hollow: Vec<u32>,
}

impl SlotCache {
    /// A cache of at most `capacity` buffers (at least 1) of `buf_bytes` each; buffers are
    /// allocated on first use.
    pub fn new(capacity: usize, buf_bytes: usize) -> SlotCache {
        SlotCache {
            map: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            capacity: capacity.max(1),
            hand: 0,
            buf_bytes,
            unwritten: Vec::new(),
            chunk_shift: (buf_bytes.max(1).next_power_of_two().trailing_zeros())
                .saturating_sub(7)
                .max(9),
            hits: 0,
            misses: 0,
            recent: Vec::new(),
            budget: None,
            hollow: Vec::new(),
        }
    }

    /// Draws the buffers from `budget` as a member of its own (see
    /// [`SlotCache::with_share`]).
    pub fn with_budget(self, budget: CacheBudget, floor: usize) -> SlotCache {
        self.with_share(budget.share(), floor)
    }

    /// Draws the buffers from the budget of `share`, a member that other caches (those of the
    /// same shard) may draw on too (before the first buffer is allocated): up to `floor`
    /// slots (at least 1) are taken whatever the budget holds, more only as the budget's
    /// policy allows (see [`CacheBudget`]); past that the cache reuses its own slots as if it
    /// were full, and gives one more back on such a miss while its member holds more than its
    /// fair share of a budget over its limit. Its bytes go back when the cache is dropped.
    /// `capacity` stays the most it holds.
    pub fn with_share(mut self, share: CacheShare, floor: usize) -> SlotCache {
        assert!(self.slots.is_empty(), "a budget is given before any slot");
        self.budget = Some((share, floor.max(1)));
        self
    }

    /// Slots that hold a buffer (every slot but the hollow ones).
    fn held_slots(&self) -> usize {
        self.slots.len() - self.hollow.len()
    }

    /// Bytes of the buffers allocated now.
    pub fn allocated_bytes(&self) -> u64 {
        (self.held_slots() as u64).saturating_mul(self.buf_bytes as u64)
    }

    /// Bytes of the buffers this cache holds when full (it may grow past that only while every
    /// slot is loading).
    pub fn capacity_bytes(&self) -> u64 {
        (self.capacity as u64).saturating_mul(self.buf_bytes as u64)
    }

    /// For a miss of `key` that the caller could serve without the cache: true when `key`
    /// already missed that way recently (load it into the cache now), false the first time
    /// (it is remembered; serve it without the cache).
    pub fn admit_on_repeat(&mut self, key: u64) -> bool {
        if key == 0 {
            // 0 marks an empty entry (and is no valid extent offset anyway): just cache it.
            return true;
        }
        if self.recent.is_empty() {
            // Twice the cache's capacity in keys, but bounded: the capacity comes from an
            // option divided by the image's cluster size.
            let sets = (2 * self.capacity)
                .div_ceil(RECENT_WAYS)
                .clamp(1, MAX_RECENT_SETS)
                .next_power_of_two();
            self.recent = vec![[0; RECENT_WAYS]; sets];
        }
        let mut h = U64Hasher::default();
        h.write_u64(key);
        let sets = self.recent.len();
        let set = &mut self.recent[(h.finish() >> 32) as usize & (sets - 1)];
        if let Some(way) = set.iter().position(|&k| k == key) {
            set[way] = 0;
            return true;
        }
        // Newest first; the oldest of the set is forgotten.
        set.rotate_right(1);
        set[0] = key;
        false
    }

    /// Looks `key` up and marks it recently used.
    pub fn lookup(&mut self, key: u64) -> Lookup {
        match self.map.get(&key) {
            Some(&id) => {
                let slot = &mut self.slots[id as usize];
                slot.referenced = true;
                match slot.state {
                    State::Ready => {
                        self.hits += 1;
                        Lookup::Ready(id)
                    }
                    State::Loading(_) => Lookup::Loading(id),
                    State::Free => unreachable!("a mapped slot is never free"),
                }
            }
            None => {
                self.misses += 1;
                Lookup::Miss
            }
        }
    }

    /// Claims a slot for `key` (which must not be cached) and marks it loading; the caller
    /// starts the read into [`SlotCache::buf_mut`].
    pub fn start_load(&mut self, key: u64) -> u32 {
        debug_assert!(!self.map.contains_key(&key));
        let id = self.take_slot();
        let slot = &mut self.slots[id as usize];
        slot.key = key;
        slot.state = State::Loading(WaitList::EMPTY);
        slot.referenced = true;
        slot.dirty = false;
        slot.unwritten = 0;
        self.map.insert(key, id);
        id
    }

    fn take_slot(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            return id;
        }
        if self.held_slots() < self.capacity && self.may_grow() {
            return self.add_slot();
        }
        let Some(id) = self.evict() else {
            // Every slot is loading, dirty or pinned: grow rather than stall (past the budget
            // too).
            if let Some((share, _)) = &self.budget {
                share.take(self.buf_bytes as u64);
            }
            return self.add_slot();
        };
        if self.should_shrink() {
            if let Some(victim) = self.evict() {
                self.release(victim);
            }
        }
        id
    }

    /// CLOCK over ready, clean, unpinned slots, at most two sweeps: the slot found is unmapped
    /// and free (in no list: the caller takes it).
    fn evict(&mut self) -> Option<u32> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let slot = &mut self.slots[i];
            if !matches!(slot.state, State::Ready) || slot.dirty || slot.pins > 0 {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            self.map.remove(&slot.key);
            slot.state = State::Free;
            return Some(i as u32);
        }
        None
    }

    /// Whether one more slot may be added, taking its bytes from the budget if so: always
    /// below the floor, past it as the budget's policy allows.
    fn may_grow(&self) -> bool {
        let Some((share, floor)) = &self.budget else {
            return true;
        };
        let bytes = self.buf_bytes as u64;
        if self.held_slots() < *floor {
            share.take(bytes);
            true
        } else {
            share.try_grow(bytes)
        }
    }

    /// Whether the cache, missing while full, gives a slot back besides the one it reuses:
    /// while it holds more than its floor and its member more than its fair share of a budget
    /// over its limit.
    fn should_shrink(&self) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|(share, floor)| self.held_slots() > *floor && share.over_share())
    }

    /// Drops the buffer of slot `id`, just evicted (so free, clean, unpinned and in no list),
    /// and gives its bytes back to the budget; the slot stays, hollow, under its id.
    fn release(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        debug_assert!(matches!(slot.state, State::Free) && !slot.dirty && slot.pins == 0);
        slot.buf = Box::default();
        self.hollow.push(id);
        if let Some((share, _)) = &self.budget {
            share.give_back(self.buf_bytes as u64);
        }
    }

    /// Adds a slot, a hollow one first (its bytes already taken from the budget, if any).
    fn add_slot(&mut self) -> u32 {
        if let Some(id) = self.hollow.pop() {
            self.slots[id as usize].buf = vec![0u8; self.buf_bytes].into_boxed_slice();
            return id;
        }
        self.slots.push(Slot {
            key: 0,
            state: State::Free,
            referenced: false,
            dirty: false,
            unwritten: 0,
            pins: 0,
            buf: vec![0u8; self.buf_bytes].into_boxed_slice(),
        });
        (self.slots.len() - 1) as u32
    }

    /// The wait list of a loading slot.
    pub fn waiters_mut(&mut self, id: u32) -> &mut WaitList {
        match &mut self.slots[id as usize].state {
            State::Loading(w) => w,
            other => panic!("slot {id} is not loading: {other:?}"),
        }
    }

    /// Marks a loading slot ready and returns the parts that waited for it.
    pub fn finish_load(&mut self, id: u32) -> WaitList {
        let slot = &mut self.slots[id as usize];
        match std::mem::replace(&mut slot.state, State::Ready) {
            State::Loading(w) => w,
            other => panic!("slot {id} was not loading: {other:?}"),
        }
    }

    /// Drops a failed load and returns the parts that waited for it.
    pub fn fail_load(&mut self, id: u32) -> WaitList {
        let slot = &mut self.slots[id as usize];
        let w = match std::mem::replace(&mut slot.state, State::Free) {
            State::Loading(w) => w,
            other => panic!("slot {id} was not loading: {other:?}"),
        };
        self.map.remove(&slot.key);
        self.free.push(id);
        w
    }

    /// Drops `key` if it is cached, ready, clean and unpinned (a cached extent was freed or
    /// rewritten, a copy went stale); returns whether it did.
    pub fn invalidate(&mut self, key: u64) -> bool {
        let Some(&id) = self.map.get(&key) else {
            return false;
        };
        let slot = &self.slots[id as usize];
        if !matches!(slot.state, State::Ready) || slot.dirty || slot.pins > 0 {
            return false;
        }
        self.map.remove(&key);
        self.slots[id as usize].state = State::Free;
        self.free.push(id);
        true
    }

    /// Inserts `key` as a ready slot without loading it (a newly allocated table); the caller
    /// fills the buffer, which starts zeroed.
    pub fn insert_new(&mut self, key: u64) -> u32 {
        let id = self.start_load(key);
        self.slots[id as usize].buf.fill(0);
        self.slots[id as usize].state = State::Ready;
        id
    }

    /// Keeps a ready slot from being evicted until [`SlotCache::unpin`].
    pub fn pin(&mut self, id: u32) {
        self.slots[id as usize].pins += 1;
    }

    /// Releases one [`SlotCache::pin`].
    pub fn unpin(&mut self, id: u32) {
        self.slots[id as usize].pins -= 1;
    }

    /// Marks bytes `range` of a ready slot changed in memory: dirty until the next
    /// [`SlotCache::take_dirty`], unwritten until the next [`SlotCache::take_unwritten`] or
    /// `take_dirty`.
    pub fn mark_dirty(&mut self, id: u32, range: Range<usize>) {
        let bits = self.chunk_mask(range);
        let slot = &mut self.slots[id as usize];
        slot.dirty = true;
        if slot.unwritten == 0 && bits != 0 {
            self.unwritten.push(id);
        }
        slot.unwritten |= bits;
    }

    /// Marks the whole buffer of a ready slot changed (a new or copied table).
    pub fn mark_all_dirty(&mut self, id: u32) {
        self.mark_dirty(id, 0..self.buf_bytes);
    }

    /// The `unwritten` bits covering `range`.
    fn chunk_mask(&self, range: Range<usize>) -> u128 {
        if range.is_empty() {
            return 0;
        }
        let first = range.start >> self.chunk_shift;
        let last = ((range.end - 1) >> self.chunk_shift).min(127);
        let high = if last == 127 {
            u128::MAX
        } else {
            (1u128 << (last + 1)) - 1
        };
        high & !((1u128 << first.min(127)) - 1)
    }

    /// Appends (key, slot) of every dirty slot to `out` and marks them clean (and written: the
    /// caller writes their whole buffers).
    pub fn take_dirty(&mut self, out: &mut Vec<(u64, u32)>) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.dirty {
                slot.dirty = false;
                slot.unwritten = 0;
                out.push((slot.key, i as u32));
            }
        }
        // Every unwritten slot is dirty.
        self.unwritten.clear();
    }

    /// Appends (key, slot, byte offset, length) of the unwritten bytes to `out` and marks them
    /// written; the slots stay dirty for the next [`SlotCache::take_dirty`]. Runs separated
    /// by less than [`MERGE_GAP_BYTES`] go out as one range: copying a few clean bytes costs
    /// less than another write.
    pub fn take_unwritten(&mut self, out: &mut Vec<(u64, u32, usize, usize)>) {
        let chunk = 1usize << self.chunk_shift;
        let gap = (MERGE_GAP_BYTES / chunk).max(1) as u32;
        for id in self.unwritten.drain(..) {
            let slot = &mut self.slots[id as usize];
            let mut bits = std::mem::take(&mut slot.unwritten);
            let mut range: Option<(usize, usize)> = None;
            while bits != 0 {
                let start = bits.trailing_zeros();
                let run = (bits >> start).trailing_ones();
                let end = start + run;
                bits = if end == 128 {
                    0
                } else {
                    bits & (u128::MAX << end)
                };
                range = match range {
                    Some((s, e)) if start as usize - e < gap as usize => Some((s, end as usize)),
                    Some((s, e)) => {
                        push_range(out, (id, slot), chunk, (s, e));
                        Some((start as usize, end as usize))
                    }
                    None => Some((start as usize, end as usize)),
                };
            }
            if let Some((s, e)) = range {
                push_range(out, (id, slot), chunk, (s, e));
            }
        }
    }

    /// Whether some slot has changes not written by any write yet.
    pub fn has_unwritten(&self) -> bool {
        !self.unwritten.is_empty()
    }

    /// Whether the slot of `key` has bytes changed in memory and not written since.
    pub fn is_unwritten(&self, key: u64) -> bool {
        self.map
            .get(&key)
            .is_some_and(|&id| self.slots[id as usize].unwritten != 0)
    }

    /// Marks a slot dirty (and wholly unwritten) again after its write failed.
    pub fn remark_dirty(&mut self, key: u64) {
        if let Some(&id) = self.map.get(&key) {
            self.mark_all_dirty(id);
        }
    }

    /// The buffer of a slot.
    pub fn buf(&self, id: u32) -> &[u8] {
        &self.slots[id as usize].buf
    }

    /// The buffer of a slot, for loading into.
    pub fn buf_mut(&mut self, id: u32) -> &mut [u8] {
        &mut self.slots[id as usize].buf
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

impl Drop for SlotCache {
    fn drop(&mut self) {
        if let Some((share, _)) = &self.budget {
            share.give_back(self.allocated_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_chunks_and_merged_ranges() {
        // 64 KiB buffers: 512-byte chunks.
        let mut c = SlotCache::new(4, 65536);
        let a = c.insert_new(3);
        assert!(!c.has_unwritten());
        c.mark_dirty(a, 8..16);
        c.mark_dirty(a, 600..616);
        // More than 4 KiB further on: a range of its own.
        c.mark_dirty(a, 20000..20008);
        // The last chunk.
        c.mark_dirty(a, 65528..65536);
        assert!(c.has_unwritten());
        let mut out = Vec::new();
        c.take_unwritten(&mut out);
        assert_eq!(
            out,
            vec![(3, a, 0, 1024), (3, a, 19968, 512), (3, a, 65024, 512)]
        );
        assert!(!c.has_unwritten());
        // Still dirty for the next flush, which takes everything.
        let mut dirty = Vec::new();
        c.take_dirty(&mut dirty);
        assert_eq!(dirty, vec![(3, a)]);
        // A whole-table change; a flush's take_dirty also clears what is unwritten.
        c.mark_all_dirty(a);
        out.clear();
        c.take_unwritten(&mut out);
        assert_eq!(out, vec![(3, a, 0, 65536)]);
        c.mark_dirty(a, 0..8);
        dirty.clear();
        c.take_dirty(&mut dirty);
        assert!(!c.has_unwritten());
        out.clear();
        c.take_unwritten(&mut out);
        assert!(out.is_empty());
        // A failed write marks the whole slot again.
        c.remark_dirty(3);
        c.take_unwritten(&mut out);
        assert_eq!(out, vec![(3, a, 0, 65536)]);

        // 2 MiB buffers: 16 KiB chunks, so 128 of them.
        let mut big = SlotCache::new(1, 2 << 20);
        let b = big.insert_new(9);
        big.mark_dirty(b, (2 << 20) - 8..2 << 20);
        out.clear();
        big.take_unwritten(&mut out);
        assert_eq!(out, vec![(9, b, (2 << 20) - 16384, 16384)]);
    }

    #[test]
    fn load_hit_evict() {
        let mut c = SlotCache::new(2, 16);
        assert_eq!(c.lookup(7), Lookup::Miss);
        let a = c.start_load(7);
        assert_eq!(c.lookup(7), Lookup::Loading(a));
        c.waiters_mut(a).head = 3;
        assert_eq!(c.finish_load(a).head, 3);
        assert_eq!(c.lookup(7), Lookup::Ready(a));
        let b = c.start_load(8);
        c.finish_load(b);
        // Third key evicts one of the two ready slots.
        let d = c.start_load(9);
        assert!(d == a || d == b);
        assert_eq!(c.slots.len(), 2);
    }

    #[test]
    fn admitted_on_the_second_miss() {
        let mut c = SlotCache::new(4, 16);
        // A stream of distinct keys is never admitted.
        for k in 1..=100u64 {
            assert!(!c.admit_on_repeat(k * 65536));
        }
        assert_eq!(c.recent.len(), 2);
        // A key seen again soon is admitted, once; then it starts over.
        assert!(!c.admit_on_repeat(7));
        assert!(c.admit_on_repeat(7));
        assert!(!c.admit_on_repeat(7));
    }

    #[test]
    fn a_cycle_over_fewer_keys_than_the_cache_is_admitted_in_two_rounds() {
        let mut c = SlotCache::new(256, 16);
        let keys: Vec<u64> = (1..=128u64).map(|k| k * 65536 + 77).collect();
        assert!(keys.iter().all(|&k| !c.admit_on_repeat(k)));
        assert!(keys.iter().all(|&k| c.admit_on_repeat(k)));
    }

    /// Loads `key` into `c` and marks it ready; returns its slot.
    fn load(c: &mut SlotCache, key: u64) -> u32 {
        let id = c.start_load(key);
        c.finish_load(id);
        id
    }

    /// Whether `key` is cached and ready in `c`.
    fn ready(c: &mut SlotCache, key: u64) -> bool {
        matches!(c.lookup(key), Lookup::Ready(_))
    }

    #[test]
    fn a_cache_made_later_grows_to_its_fair_share_and_the_first_shrinks_toward_it() {
        // Room for 8 slots of 16 bytes; each cache could hold 16, its floor is 2.
        let budget = CacheBudget::new(8 * 16);
        let mut a = SlotCache::new(16, 16).with_budget(budget.clone(), 2);
        // Alone, `a` takes the whole budget, and no more.
        let first: Vec<u32> = (1..=20).map(|key| load(&mut a, key)).collect();
        assert_eq!(a.held_slots(), 8);
        assert_eq!(budget.used_bytes(), 8 * 16);
        assert!(first.iter().all(|&id| id < 8), "{first:?}");

        // `b` joins a used-up budget: its fair share is half of it, and it grows that far
        // (its floor, then two slots past the limit), then reuses its own slots.
        let mut b = SlotCache::new(16, 16).with_budget(budget.clone(), 2);
        assert_eq!(budget.members(), 2);
        assert_eq!(budget.fair_share_bytes(), 4 * 16);
        for key in 101..=120 {
            load(&mut b, key);
        }
        assert_eq!(b.held_slots(), 4);
        assert_eq!(budget.used_bytes(), 12 * 16);
        assert!((117..=120).all(|key| ready(&mut b, key)));
        assert!(!ready(&mut b, 116));

        // Hits leave everything as it is: `a` keeps its 8 slots while it only hits.
        assert!((13..=20).all(|key| ready(&mut a, key)));
        assert_eq!(a.held_slots(), 8);
        assert_eq!(budget.used_bytes(), 12 * 16);

        // As `a` misses while over its share of a budget over its limit, each miss reuses a
        // slot and gives one more back, down to its share, where the budget is within its
        // limit again.
        for (n, key) in (21..=24).enumerate() {
            load(&mut a, key);
            assert_eq!(a.held_slots(), 7 - n);
        }
        assert_eq!(budget.used_bytes(), 8 * 16);
        // There it stays: reusing its own slots, giving none back.
        for key in 25..=40 {
            load(&mut a, key);
        }
        assert_eq!(a.held_slots(), 4);
        assert!((37..=40).all(|key| ready(&mut a, key)));
        for key in 121..=140 {
            load(&mut b, key);
        }
        assert_eq!(b.held_slots(), 4);
        assert_eq!(budget.used_bytes(), 8 * 16);
        // The slots given back keep their ids (hollow), nothing past them was added.
        assert_eq!(a.slots.len(), 8);
        assert_eq!(a.hollow.len(), 4);
        assert!(a.hollow.iter().all(|&id| a.buf(id).is_empty()));

        // Dropping `b` gives its bytes back and leaves `a` alone: it grows again, into its
        // hollow slots first.
        drop(b);
        assert_eq!(budget.members(), 1);
        assert_eq!(budget.used_bytes(), 4 * 16);
        let again: Vec<u32> = (41..=60).map(|key| load(&mut a, key)).collect();
        assert!(again.iter().all(|&id| id < 8), "{again:?}");
        assert_eq!(a.slots.len(), 8);
        assert!(a.hollow.is_empty());
        assert!((0..8).all(|id| a.buf(id).len() == 16));
        assert_eq!(budget.used_bytes(), 8 * 16);
        drop(a);
        assert_eq!(budget.used_bytes(), 0);
        assert_eq!(budget.members(), 0);
    }

    #[test]
    fn caches_of_one_member_draw_on_one_fair_share() {
        let budget = CacheBudget::new(8 * 16);
        let mut other = SlotCache::new(16, 16).with_budget(budget.clone(), 1);
        for key in 1..=8 {
            load(&mut other, key);
        }
        // Two caches of one shard: one member, half the budget between them.
        let share = budget.share();
        let mut l2 = SlotCache::new(16, 16).with_share(share.clone(), 1);
        let mut decompressed = SlotCache::new(16, 16).with_share(share.clone(), 1);
        drop(share);
        assert_eq!(budget.members(), 2);
        for key in 1..=10 {
            load(&mut l2, key);
        }
        assert_eq!(l2.held_slots(), 4);
        // The other cache of the member has its floor, and no more.
        for key in 1..=10 {
            load(&mut decompressed, key);
        }
        assert_eq!(decompressed.held_slots(), 1);
        assert_eq!(budget.used_bytes(), 13 * 16);
        drop(l2);
        drop(decompressed);
        assert_eq!(budget.members(), 1);
        assert_eq!(budget.used_bytes(), 8 * 16);
    }

    #[test]
    fn only_ready_clean_unpinned_slots_are_given_back() {
        let budget = CacheBudget::new(4 * 16);
        let mut a = SlotCache::new(8, 16).with_budget(budget.clone(), 1);
        // A changed table, a pinned one, two clean ones: the whole budget.
        let dirty = a.insert_new(1);
        a.mark_all_dirty(dirty);
        let pinned = load(&mut a, 2);
        a.pin(pinned);
        load(&mut a, 3);
        load(&mut a, 4);
        let mut b = SlotCache::new(8, 16).with_budget(budget.clone(), 1);
        load(&mut b, 100);
        load(&mut b, 101);
        assert_eq!(budget.used_bytes(), 6 * 16);

        // `a` is over its share: a miss reuses one clean slot and gives the other back.
        let loading = a.start_load(5);
        assert_eq!(a.held_slots(), 3);
        assert!(!ready(&mut a, 3) && !ready(&mut a, 4));
        assert!(ready(&mut a, 1) && ready(&mut a, 2));
        assert_eq!(a.lookup(5), Lookup::Loading(loading));
        assert_eq!(a.buf(dirty).len(), 16);
        assert_eq!(a.buf(pinned).len(), 16);
        assert_eq!(a.buf(loading).len(), 16);
        // Every slot it holds is dirty, pinned or loading: it grows rather than stall, into
        // the hollow slot.
        let grown = a.start_load(6);
        assert_eq!(a.held_slots(), 4);
        assert_eq!(a.buf(grown).len(), 16);
        assert!(a.hollow.is_empty());

        // Once the table is flushed, the pin released and the loads done, those slots are
        // clean and ready: the next misses reuse and give back down to its share.
        let mut flushed = Vec::new();
        a.take_dirty(&mut flushed);
        assert_eq!(flushed, vec![(1, dirty)]);
        a.unpin(pinned);
        a.finish_load(loading);
        a.finish_load(grown);
        load(&mut a, 7);
        load(&mut a, 8);
        assert_eq!(a.held_slots(), 2);
        assert_eq!(budget.used_bytes(), 4 * 16);
        drop(a);
        drop(b);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn a_cache_whose_slots_are_all_busy_grows_past_its_budget_rather_than_stall() {
        let budget = CacheBudget::new(0);
        let mut c = SlotCache::new(8, 16).with_budget(budget.clone(), 1);
        let a = c.start_load(1);
        // The floor is taken, then every slot is loading: one more slot anyway.
        let b = c.start_load(2);
        assert_ne!(a, b);
        assert_eq!(budget.used_bytes(), 2 * 16);
        // Once they are ready, one is reused instead, and the other given back: the cache is
        // past its floor and its share of a budget over its limit.
        c.finish_load(a);
        c.finish_load(b);
        let d = c.start_load(3);
        assert!(d == a || d == b);
        assert_eq!(budget.used_bytes(), 16);
        // A freed slot is reused before anything else, and stays counted.
        c.fail_load(d);
        assert_eq!(c.start_load(4), d);
        assert_eq!(budget.used_bytes(), 16);
        drop(c);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn a_cache_never_holds_more_than_its_own_capacity_within_a_large_budget() {
        let budget = CacheBudget::new(1 << 20);
        let mut c = SlotCache::new(3, 16).with_budget(budget.clone(), 2);
        for key in 1..=10 {
            load(&mut c, key);
        }
        assert_eq!(c.slots.len(), 3);
        assert_eq!(budget.used_bytes(), 3 * 16);
    }

    #[test]
    fn loading_slots_are_never_evicted() {
        let mut c = SlotCache::new(1, 16);
        let a = c.start_load(1);
        let b = c.start_load(2);
        assert_ne!(a, b);
        assert_eq!(c.lookup(1), Lookup::Loading(a));
        c.fail_load(a);
        assert_eq!(c.lookup(1), Lookup::Miss);
        assert_eq!(c.start_load(3), a);
    }
}
