//! Which host clusters of a writable image hold metadata, for the overlap checks made before
//! every write (DESIGN.md invariant 9).
//!
//! [`MetaMap`] keeps one byte per host cluster: a set of [`class`] bits naming the structures
//! that live there. It is shared by every shard of the image and by the allocator: a shard
//! tests a cluster before writing guest data or a table to it (three dependent loads, no lock,
//! no allocation), the owner of a structure sets its bits before the structure is first
//! written and clears them when it is freed, and the allocator refuses a cluster whose
//! refcount says free while the map says metadata.
//!
//! The bytes live in leaves of [`LEAF_CLUSTERS`] clusters under mid nodes of [`MID_LEAVES`]
//! leaves, both created on first use (only where metadata lies), so the map costs a byte per
//! cluster at most and little where tables are sparse. A cluster past the map's capacity (set
//! at open: the most clusters the refcount table can ever describe) holds no metadata.
//!
//! Only the classes of the image's overlap-check mode are ever set ([`MetaMap::mask`]): a map
//! for mode `constant` holds the header, the active L1 table, the refcount table, the snapshot
//! table and the bitmap directory; `cached` adds active L2 tables, refcount blocks, snapshot
//! L1 tables and bitmap tables; `all` adds snapshot L2 tables (QEMU's `overlap-check` modes).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Metadata classes, one bit each.
pub mod class {
    /// The main header cluster (with the header extensions and the backing file name), the
    /// snapshot table and the bitmap directory: fixed while the image is open.
    pub const FIXED: u8 = 1 << 0;
    /// The active L1 table.
    pub const ACTIVE_L1: u8 = 1 << 1;
    /// An L2 table of the active L1 table.
    pub const ACTIVE_L2: u8 = 1 << 2;
    /// The refcount table.
    pub const REFCOUNT_TABLE: u8 = 1 << 3;
    /// A refcount block.
    pub const REFCOUNT_BLOCK: u8 = 1 << 4;
    /// An internal snapshot's L1 table.
    pub const INACTIVE_L1: u8 = 1 << 5;
    /// An L2 table of an internal snapshot's L1 table.
    pub const INACTIVE_L2: u8 = 1 << 6;
    /// A bitmap table of a persistent dirty bitmap.
    pub const BITMAP_TABLE: u8 = 1 << 7;

    /// Classes whose place is known without reading tables (QEMU's `constant`).
    pub const CONSTANT: u8 = FIXED | ACTIVE_L1 | REFCOUNT_TABLE;
    /// Classes known from what is held in memory (QEMU's `cached`, QEMU's default).
    pub const CACHED: u8 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1 | BITMAP_TABLE;
    /// Every class (QEMU's `all`).
    pub const ALL: u8 = CACHED | INACTIVE_L2;

    /// Names of the classes in `bits`, for messages.
    pub fn names(bits: u8) -> String {
        const NAMES: [&str; 8] = [
            "the header, snapshot table or bitmap directory",
            "the active L1 table",
            "an active L2 table",
            "the refcount table",
            "a refcount block",
            "a snapshot's L1 table",
            "a snapshot's L2 table",
            "a bitmap table",
        ];
        let v: Vec<&str> = (0..8)
            .filter(|i| bits & (1 << i) != 0)
            .map(|i| NAMES[i])
            .collect();
        v.join(" and ")
    }
}

/// Host clusters per leaf (one byte each).
pub const LEAF_CLUSTERS: u64 = 1 << LEAF_BITS;
const LEAF_BITS: u32 = 15;
/// Leaves per mid node.
pub const MID_LEAVES: u64 = 1 << MID_BITS;
const MID_BITS: u32 = 12;

type Leaf = Box<[AtomicU8]>;
type Mid = Box<[OnceLock<Leaf>]>;

/// See the module documentation.
pub struct MetaMap {
    cluster_bits: u32,
    mask: u8,
    capacity: u64,
    top: Box<[OnceLock<Mid>]>,
}

impl MetaMap {
    /// A map of up to `capacity` clusters of `1 << cluster_bits` bytes that records the
    /// classes in `mask` (0: records nothing).
    pub fn new(cluster_bits: u32, capacity: u64, mask: u8) -> MetaMap {
        let per_top = LEAF_CLUSTERS * MID_LEAVES;
        let tops = if mask == 0 {
            0
        } else {
            capacity.div_ceil(per_top)
        };
        MetaMap {
            cluster_bits,
            mask,
            capacity: if mask == 0 { 0 } else { capacity },
            top: (0..tops).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The classes this map records.
    pub fn mask(&self) -> u8 {
        self.mask
    }

    /// The byte of cluster `c`, if the map has created its leaf.
    fn slot(&self, c: u64) -> Option<&AtomicU8> {
        let leaf = c >> LEAF_BITS;
        let mid = self.top.get((leaf >> MID_BITS) as usize)?.get()?;
        let leaf = mid[(leaf & (MID_LEAVES - 1)) as usize].get()?;
        Some(&leaf[(c & (LEAF_CLUSTERS - 1)) as usize])
    }

    /// The byte of cluster `c` (< capacity), creating its leaf.
    fn slot_or_create(&self, c: u64) -> &AtomicU8 {
        let leaf = c >> LEAF_BITS;
        let mid = self.top[(leaf >> MID_BITS) as usize]
            .get_or_init(|| (0..MID_LEAVES).map(|_| OnceLock::new()).collect());
        let leaf = mid[(leaf & (MID_LEAVES - 1)) as usize]
            .get_or_init(|| (0..LEAF_CLUSTERS).map(|_| AtomicU8::new(0)).collect());
        &leaf[(c & (LEAF_CLUSTERS - 1)) as usize]
    }

    /// The classes recorded for host cluster `c`.
    #[inline]
    pub fn get(&self, c: u64) -> u8 {
        self.slot(c).map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Clusters overlapping `host..host + len` (none when `len` is 0), clamped to capacity.
    fn clusters(&self, host: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = host >> self.cluster_bits;
        let last = (host.saturating_add(len - 1) >> self.cluster_bits).saturating_add(1);
        first.min(self.capacity)..last.min(self.capacity)
    }

    /// Records `classes` (those of the mask) for every cluster overlapping `host..host + len`.
    pub fn set(&self, host: u64, len: u64, classes: u8) {
        let classes = classes & self.mask;
        if classes == 0 {
            return;
        }
        for c in self.clusters(host, len) {
            self.slot_or_create(c).fetch_or(classes, Ordering::AcqRel);
        }
    }

    /// Forgets `classes` for every cluster overlapping `host..host + len`.
    pub fn clear(&self, host: u64, len: u64, classes: u8) {
        if classes & self.mask == 0 {
            return;
        }
        for c in self.clusters(host, len) {
            if let Some(s) = self.slot(c) {
                s.fetch_and(!classes, Ordering::AcqRel);
            }
        }
    }

    /// The first cluster overlapping `host..host + len` that holds metadata other than
    /// `own` (the class of the structure being written there, 0 for guest data), with the
    /// classes found there.
    #[inline]
    pub fn conflict(&self, host: u64, len: u64, own: u8) -> Option<(u64, u8)> {
        if self.mask == 0 {
            return None;
        }
        self.clusters(host, len).find_map(|c| {
            let found = self.get(c) & !own;
            (found != 0).then_some((c << self.cluster_bits, found))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_forgets_classes_per_cluster() {
        let m = MetaMap::new(16, 1 << 30, class::CACHED);
        assert_eq!(m.get(5), 0);
        m.set(5 << 16, 1, class::ACTIVE_L2);
        m.set(5 << 16, 1 << 16, class::REFCOUNT_BLOCK);
        assert_eq!(m.get(5), class::ACTIVE_L2 | class::REFCOUNT_BLOCK);
        assert_eq!(m.get(4), 0);
        assert_eq!(m.get(6), 0);
        assert_eq!(
            m.conflict(5 << 16, 4096, class::ACTIVE_L2),
            Some((5 << 16, class::REFCOUNT_BLOCK))
        );
        m.clear(5 << 16, 1 << 16, class::REFCOUNT_BLOCK);
        assert_eq!(m.conflict(5 << 16, 4096, class::ACTIVE_L2), None);
        assert_eq!(
            m.conflict((4 << 16) + 512, 1 << 16, 0),
            Some((5 << 16, class::ACTIVE_L2))
        );
        // Leaves far apart are created independently.
        let far = 3 * LEAF_CLUSTERS * MID_LEAVES + 7;
        m.set(far << 16, 3 << 16, class::REFCOUNT_TABLE);
        assert_eq!(m.get(far + 2), class::REFCOUNT_TABLE);
        assert_eq!(m.get(far + 3), 0);
    }

    #[test]
    fn only_the_mode_s_classes_are_recorded() {
        let m = MetaMap::new(9, 1 << 20, class::CONSTANT);
        m.set(0, 512, class::FIXED | class::ACTIVE_L2);
        m.set(1024, 512, class::INACTIVE_L2);
        assert_eq!(m.get(0), class::FIXED);
        assert_eq!(m.get(2), 0);
        let none = MetaMap::new(9, 1 << 20, 0);
        none.set(0, 512, class::ALL);
        assert_eq!(none.conflict(0, 512, 0), None);
    }

    /// What one check costs on the data path (`cargo test --release -p qcow2d-engine --lib
    /// -- --ignored --nocapture overlap_check_cost`): a map of a 1 TiB image with an L2 table
    /// every 8192 clusters, tested at random clusters.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn overlap_check_cost() {
        let clusters = 1u64 << 24;
        let m = MetaMap::new(16, clusters, class::CACHED);
        for c in (0..clusters).step_by(8192) {
            m.set(c << 16, 1 << 16, class::ACTIVE_L2);
        }
        let n = 50_000_000u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut hits = 0u64;
        let t = std::time::Instant::now();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let host = (x % clusters) << 16;
            hits += u64::from(m.conflict(host, 4096, 0).is_some());
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("{ns:.2} ns per check ({hits} of {n} on metadata)");
    }

    #[test]
    fn past_the_capacity_nothing_is_metadata() {
        let m = MetaMap::new(16, 100, class::ALL);
        m.set(99 << 16, 2 << 16, class::FIXED);
        assert_eq!(m.get(99), class::FIXED);
        assert_eq!(m.get(100), 0);
        assert_eq!(m.conflict(u64::MAX - 10, 10, 0), None);
        assert_eq!(m.conflict(1000 << 16, 1, 0), None);
    }
}
