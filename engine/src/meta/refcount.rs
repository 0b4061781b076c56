//! The image's refcounts, held in memory, and the cluster allocator built on them.
//!
//! Every refcount block is loaded when a writable image is opened (their total size is the
//! file size divided by the cluster size, times the refcount width: 1/32768 of the file for
//! 64 KiB clusters and 16-bit refcounts), so allocation never waits for I/O. Changes mark blocks
//! dirty; the flush writes them (see `shard::flush`) before any L2 table that depends on them.
//!
//! Growth: a cluster whose refcount block does not exist gets one, placed at the first cluster
//! of the range it describes (so it describes itself); when the refcount table is full it is
//! moved to a larger one at the end of the file, after the blocks that describe it. The old
//! table is freed after the header that points to the new one is durable. The table never
//! grows past the 8 MiB an image may have (QEMU and qcow2d refuse to open a larger one): an
//! allocation that would need more fails and changes nothing.
//!
//! Owned behind a mutex in the image and taken only on slow paths: when a shard reserves a run
//! of clusters, when deferred frees are applied after a flush, and by the flush itself.
#![allow(clippy::len_without_is_empty)]

use super::overlap::{class, MetaMap};
use crate::format::{refcount_get, refcount_max, refcount_set, MAX_REFCOUNT_TABLE_BYTES};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Why a refcount change was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefcountError {
    /// The refcount would exceed the width of an entry.
    #[error("Refcount of cluster {cluster} would overflow")]
    Overflow {
        /// Cluster index.
        cluster: u64,
    },
    /// A refcount would go below zero: the metadata is inconsistent.
    #[error("Refcount of cluster {cluster} would drop below zero")]
    Underflow {
        /// Cluster index.
        cluster: u64,
    },
    /// The image would grow past what the format can address, or its refcount table past
    /// the largest one an image may have (QEMU and qcow2d refuse to open such an image).
    #[error("Image file would grow past the largest supported size")]
    TooLarge,
    /// A cluster the refcounts call free holds metadata: the refcounts are damaged.
    #[error("Cluster {cluster} holds {} but its refcount is 0", class::names(*.classes))]
    FreeMetadata {
        /// Cluster index.
        cluster: u64,
        /// What it holds ([`class`] bits).
        classes: u8,
    },
}

/// In-memory refcounts of every host cluster; see the module documentation.
pub struct Refcounts {
    order: u32,
    cluster_bits: u32,
    entries_per_block: u64,
    /// Refcount table: host offsets of blocks (0 = none), length = table capacity.
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    blocks: Vec<Option<Box<[u8]>>>,
    dirty_blocks: BTreeSet<usize>,
    /// The table was moved or entries were added: it and the header must be written.
    table_dirty: bool,
    /// Old table location to free once the header pointing at the new one is durable.
    retired_table: Option<(u64, u64)>,
    /// One past the highest cluster that holds a refcount > 0 (or the file end at open).
    end_cluster: u64,
    /// Clusters at or past this index have never held data since open: they read as zeros.
    fresh_from: u64,
    /// Lowest cluster index that may be free.
    hint: u64,
    /// The metadata clusters: never handed out, whatever their refcount says.
    meta: Arc<MetaMap>,
}

/// A table location: (host offset, clusters).
pub type TableLocation = (u64, u64);

/// The refcount table as a flush writes it; see [`Refcounts::take_table`].
#[derive(Debug)]
pub struct TableSnapshot {
    /// Where the table goes.
    pub location: TableLocation,
    /// Its content.
    pub bytes: Vec<u8>,
    /// The table it replaces, freed once the header pointing at the new one is durable.
    pub retired: Option<TableLocation>,
}

impl Refcounts {
    /// Builds the in-memory refcounts from the loaded table and blocks.
    ///
    /// `blocks[i]` is the content of the block at `table[i]` (None where the entry is 0);
    /// `file_len` is the image file's length; `meta` the image's metadata clusters, which
    /// the allocator keeps up to date for the refcount table and blocks it places.
    pub fn new(
        order: u32,
        cluster_bits: u32,
        table: Vec<u64>,
        table_location: TableLocation,
        blocks: Vec<Option<Box<[u8]>>>,
        file_len: u64,
        meta: Arc<MetaMap>,
    ) -> Refcounts {
        let cs = 1u64 << cluster_bits;
        let entries_per_block = (cs * 8) >> order;
        let mut r = Refcounts {
            order,
            cluster_bits,
            entries_per_block,
            table,
            table_offset: table_location.0,
            table_clusters: table_location.1,
            blocks,
            dirty_blocks: BTreeSet::new(),
            table_dirty: false,
            retired_table: None,
            end_cluster: file_len.div_ceil(cs),
            fresh_from: file_len.div_ceil(cs),
            hint: 0,
            meta,
        };
        // The highest allocated cluster may lie past the end of the file (sparse images).
        for (b, block) in r.blocks.iter().enumerate() {
            if let Some(block) = block {
                for i in (0..entries_per_block as usize).rev() {
                    if refcount_get(block, order, i) != 0 {
                        let c = b as u64 * entries_per_block + i as u64 + 1;
                        r.end_cluster = r.end_cluster.max(c);
                        r.fresh_from = r.fresh_from.max(c);
                        break;
                    }
                }
            }
        }
        r
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount of cluster `c` (0 where no block describes it).
    pub fn get(&self, c: u64) -> u64 {
        let b = (c / self.entries_per_block) as usize;
        match self.blocks.get(b) {
            Some(Some(block)) => {
                refcount_get(block, self.order, (c % self.entries_per_block) as usize)
            }
            _ => 0,
        }
    }

    /// Sets the refcount of cluster `c`, whose block must exist.
    fn set(&mut self, c: u64, v: u64) -> Result<(), RefcountError> {
        let b = (c / self.entries_per_block) as usize;
        let order = self.order;
        let i = (c % self.entries_per_block) as usize;
        let block = self.blocks[b]
            .as_mut()
            .expect("set() is only called for clusters whose block exists");
        refcount_set(block, order, i, v).map_err(|_| RefcountError::Overflow { cluster: c })?;
        self.dirty_blocks.insert(b);
        if v > 0 {
            self.end_cluster = self.end_cluster.max(c + 1);
        }
        Ok(())
    }

    /// Adds `delta` (which may be negative) to the refcount of every cluster overlapping
    /// `host..host + len`.
    pub fn adjust_range(&mut self, host: u64, len: u64, delta: i64) -> Result<(), RefcountError> {
        if len == 0 {
            return Ok(());
        }
        let first = host >> self.cluster_bits;
        let last = (host + len - 1) >> self.cluster_bits;
        for c in first..=last {
            let old = self.get(c);
            let new = if delta >= 0 {
                old.checked_add(delta as u64)
                    .filter(|&v| v <= refcount_max(self.order))
                    .ok_or(RefcountError::Overflow { cluster: c })?
            } else {
                old.checked_sub(delta.unsigned_abs())
                    .ok_or(RefcountError::Underflow { cluster: c })?
            };
            if new > 0 {
                self.ensure_block_for(c)?;
            } else if old == 0 {
                continue;
            }
            self.set(c, new)?;
            if new == 0 && c < self.hint {
                self.hint = c;
            }
        }
        Ok(())
    }

    /// Drops one reference on every cluster overlapping `host..host + len`, which held a
    /// structure of class `classes` (0: guest data): those clusters stop being that
    /// metadata, whatever their refcount becomes.
    pub fn release(&mut self, host: u64, len: u64, classes: u8) -> Result<(), RefcountError> {
        if classes != 0 {
            self.meta.clear(host, len, classes);
        }
        self.adjust_range(host, len, -1)
    }

    /// Allocates up to `want` contiguous clusters (at least one), each with refcount 1.
    /// Returns (host offset, clusters, fresh): `fresh` when they never held data since open
    /// and so read as zeros. A cluster the refcounts call free that holds metadata is
    /// [`RefcountError::FreeMetadata`]: the refcounts are damaged and nothing is handed out.
    pub fn allocate(&mut self, want: u64) -> Result<(u64, u64, bool), RefcountError> {
        let want = want.max(1);
        loop {
            let (start, n) = self.find_free(want)?;
            // Make sure every cluster of the run has a block; creating a block may take the
            // first cluster of the run, so search again after any growth.
            let mut grew = false;
            for c in start..start + n {
                if self.block_missing(c) {
                    self.ensure_block_for(c)?;
                    grew = true;
                    break;
                }
            }
            if grew {
                continue;
            }
            for c in start..start + n {
                self.set(c, 1)?;
            }
            let fresh = start >= self.fresh_from;
            self.hint = start + n;
            if start + n > self.fresh_from && !fresh {
                // A run that straddles the fresh boundary is not fresh as a whole.
                self.fresh_from = self.fresh_from.max(start + n);
            } else if fresh {
                self.fresh_from = start + n;
            }
            return Ok((start << self.cluster_bits, n, fresh));
        }
    }

    fn block_missing(&self, c: u64) -> bool {
        let b = (c / self.entries_per_block) as usize;
        !matches!(self.blocks.get(b), Some(Some(_)))
    }

    /// Whether cluster `c`, whose refcount is 0, may be handed out: an error when it holds
    /// metadata (see [`Refcounts::allocate`]).
    fn free_to_use(&self, c: u64) -> Result<(), RefcountError> {
        match self.meta.get(c) {
            0 => Ok(()),
            classes => Err(RefcountError::FreeMetadata {
                cluster: c,
                classes,
            }),
        }
    }

    /// First run of free clusters at or after the hint: up to `want` long, shorter only when
    /// a used cluster follows. Past the end every cluster is free.
    fn find_free(&self, want: u64) -> Result<(u64, u64), RefcountError> {
        let mut c = self.hint;
        while c < self.end_cluster {
            if self.get(c) == 0 && !self.is_metadata_in_flux(c) {
                let mut n = 1;
                while n < want && c + n < self.end_cluster && self.get(c + n) == 0 {
                    n += 1;
                }
                if c + n == self.end_cluster {
                    n = want;
                }
                return self.checked_run(c, n);
            }
            c += 1;
        }
        self.checked_run(c.max(self.end_cluster), want)
    }

    /// Clusters of a retired table are not reused until it is freed explicitly.
    fn is_metadata_in_flux(&self, c: u64) -> bool {
        match self.retired_table {
            Some((off, n)) => {
                let first = off >> self.cluster_bits;
                c >= first && c < first + n
            }
            None => false,
        }
    }

    /// Run `start..start + n` after checking that none of its clusters holds metadata.
    fn checked_run(&self, start: u64, n: u64) -> Result<(u64, u64), RefcountError> {
        for c in start..start + n {
            self.free_to_use(c)?;
        }
        Ok((start, n))
    }

    /// Creates the refcount block describing cluster `c` if it does not exist.
    fn ensure_block_for(&mut self, c: u64) -> Result<(), RefcountError> {
        let b = c / self.entries_per_block;
        if !self.block_missing(c) {
            return Ok(());
        }
        if b as usize >= self.table.len() {
            self.grow_table(b as usize + 1)?;
            if !self.block_missing(c) {
                return Ok(());
            }
        }
        // The first cluster of the range the block describes is free (no block, so nothing
        // in the range is in use): the block goes there and describes itself.
        // Unless that cluster holds metadata: then the refcounts are damaged.
        let at = b * self.entries_per_block;
        let cs = self.cluster_size();
        let host = at.checked_mul(cs).ok_or(RefcountError::TooLarge)?;
        self.free_to_use(at)?;
        self.table[b as usize] = host;
        self.blocks[b as usize] = Some(vec![0u8; cs as usize].into_boxed_slice());
        self.table_dirty = true;
        self.set(at, 1)?;
        self.meta.set(host, cs, class::REFCOUNT_BLOCK);
        Ok(())
    }

    /// Most entries a refcount table may have: QEMU (and qcow2d) refuse to open an image
    /// whose table is larger.
    pub fn max_table_entries() -> u64 {
        MAX_REFCOUNT_TABLE_BYTES / 8
    }

    /// Most clusters the refcounts of an image with these parameters can ever describe.
    pub fn max_clusters(order: u32, cluster_bits: u32) -> u64 {
        let entries_per_block = ((1u64 << cluster_bits) * 8) >> order;
        Self::max_table_entries() * entries_per_block
    }

    /// Moves the refcount table to a new location at the end of the file with room for at
    /// least `entries` blocks, and blocks describing the new table. A table larger than
    /// [`Refcounts::max_table_entries`] would leave an image nobody can open:
    /// [`RefcountError::TooLarge`], with nothing changed.
    fn grow_table(&mut self, entries: usize) -> Result<(), RefcountError> {
        let cs = self.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let max_entries = Self::max_table_entries() as usize;
        if entries > max_entries {
            return Err(RefcountError::TooLarge);
        }
        let mut new_entries = entries
            .max(self.table.len() * 2)
            .next_multiple_of(per_cluster)
            .min(max_entries);
        // The new table and the blocks for its own range are placed from `start`, past
        // everything in use and at the start of a block range, so those ranges are empty:
        // first the blocks (one per range the area touches), then the table.
        let epb = self.entries_per_block;
        let start_block = self.end_cluster.div_ceil(epb);
        let start = start_block * epb;
        // Blocks for an area of `tc` table clusters and the blocks themselves.
        let blocks_for = |tc: u64| tc.div_ceil(epb - 1).max(1);
        let table_clusters = loop {
            let tc = (new_entries / per_cluster) as u64;
            if start_block + blocks_for(tc) <= new_entries as u64 {
                break tc;
            }
            new_entries = ((start_block + blocks_for(tc)) as usize).next_multiple_of(per_cluster);
            if new_entries > max_entries {
                return Err(RefcountError::TooLarge);
            }
        };
        let nb = blocks_for(table_clusters);
        let span = nb + table_clusters;
        if start
            .checked_add(span)
            .and_then(|c| c.checked_mul(cs))
            .is_none_or(|end| end > crate::format::MAX_VIRTUAL_SIZE)
        {
            return Err(RefcountError::TooLarge);
        }
        // Past everything in use: metadata there means damaged refcounts.
        self.checked_run(start, span)?;
        if (0..nb).any(|k| {
            self.blocks
                .get((start_block + k) as usize)
                .is_some_and(Option::is_some)
        }) {
            // A block for an empty range past the end (damaged or left by another tool):
            // the area is not known to be free.
            return Err(RefcountError::FreeMetadata {
                cluster: start,
                classes: class::REFCOUNT_BLOCK,
            });
        }
        self.table.resize(new_entries, 0);
        self.blocks.resize_with(new_entries, || None);
        let old = (self.table_offset, self.table_clusters);
        // Block `start_block + k` at cluster `start + k`: it lies in the range of block
        // `start_block + k / epb`, placed before it. nb * epb >= span: every cluster of the
        // area is described.
        for k in 0..nb {
            let b = (start_block + k) as usize;
            let at = start + k;
            self.table[b] = at * cs;
            self.blocks[b] = Some(vec![0u8; cs as usize].into_boxed_slice());
            self.set(at, 1)?;
            self.meta.set(at * cs, cs, class::REFCOUNT_BLOCK);
        }
        let table_offset = (start + nb) * cs;
        for t in start + nb..start + span {
            self.set(t, 1)?;
        }
        self.table_offset = table_offset;
        self.table_clusters = table_clusters;
        self.table_dirty = true;
        self.meta
            .set(table_offset, table_clusters * cs, class::REFCOUNT_TABLE);
        if self.retired_table.is_some() {
            // The table being replaced was never pointed at by a durable header (the table
            // the header points at is still waiting to be retired): nothing refers to it.
            self.release(old.0, old.1 * cs, class::REFCOUNT_TABLE)?;
        } else {
            self.retired_table = Some(old);
        }
        Ok(())
    }

    /// Where the refcount table is: (host offset, clusters).
    pub fn table_location(&self) -> TableLocation {
        (self.table_offset, self.table_clusters)
    }

    /// The table encoded for writing (big-endian entries, whole clusters).
    fn encode_table(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity((self.table_clusters * self.cluster_size()) as usize);
        for e in &self.table {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out.resize((self.table_clusters * self.cluster_size()) as usize, 0);
        out
    }

    /// Takes the set of dirty blocks as (host offset, content copy) and marks them clean.
    pub fn take_dirty_blocks(&mut self) -> Vec<(u64, Box<[u8]>)> {
        let dirty = std::mem::take(&mut self.dirty_blocks);
        dirty
            .into_iter()
            .filter_map(|b| {
                let block = self.blocks[b].as_ref()?;
                Some((self.table[b], block.clone()))
            })
            .collect()
    }

    /// Takes what must be written for the table: its location, its encoded bytes, and the
    /// table it replaces (to free once a header pointing at the new one is durable). Marks the
    /// table clean: entries added after this belong to the next flush.
    pub fn take_table(&mut self) -> Option<TableSnapshot> {
        if !self.table_dirty {
            return None;
        }
        self.table_dirty = false;
        Some(TableSnapshot {
            location: self.table_location(),
            bytes: self.encode_table(),
            retired: self.retired_table.take(),
        })
    }

    /// Whether the refcount table grew or moved since it was last taken.
    pub fn table_changed(&self) -> bool {
        self.table_dirty
    }

    /// The write of a [`TableSnapshot`] failed: the table stays dirty and the table it would
    /// have retired stays in place.
    pub fn table_write_failed(&mut self, snapshot: TableSnapshot) {
        self.table_dirty = true;
        if self.retired_table.is_none() {
            self.retired_table = snapshot.retired;
        }
    }

    /// Marks blocks dirty again after a failed write.
    pub fn mark_all_dirty(&mut self) {
        for (b, block) in self.blocks.iter().enumerate() {
            if block.is_some() {
                self.dirty_blocks.insert(b);
            }
        }
    }

    /// One past the highest cluster in use.
    pub fn end_cluster(&self) -> u64 {
        self.end_cluster
    }

    /// Entries per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        self.entries_per_block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh image like qemu-img makes with 512-byte clusters: header, table, one block,
    /// L1 table, with refcount width `order` and the image file `file_len` bytes long.
    fn image_with(order: u32, file_len: u64) -> Refcounts {
        let cs = 512u64;
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        for c in 0..4 {
            refcount_set(&mut block, order, c, 1).unwrap();
        }
        let mut table = vec![0u64; 64];
        table[0] = 2 * cs; // block at cluster 2
        let mut blocks: Vec<Option<Box<[u8]>>> = vec![None; 64];
        blocks[0] = Some(block);
        let meta = Arc::new(MetaMap::new(
            9,
            Refcounts::max_clusters(order, 9),
            class::ALL,
        ));
        meta.set(0, cs, class::FIXED);
        meta.set(cs, cs, class::REFCOUNT_TABLE);
        meta.set(2 * cs, cs, class::REFCOUNT_BLOCK);
        meta.set(3 * cs, cs, class::ACTIVE_L1);
        Refcounts::new(order, 9, table, (cs, 1), blocks, file_len, meta)
    }

    fn small_image() -> Refcounts {
        image_with(4, 4 * 512)
    }

    #[test]
    fn damaged_refcounts_never_hand_out_metadata() {
        // The header's refcount dropped to 0.
        let mut r = small_image();
        r.adjust_range(0, 512, -1).unwrap();
        assert_eq!(
            r.allocate(8),
            Err(RefcountError::FreeMetadata {
                cluster: 0,
                classes: class::FIXED
            })
        );
        // The refcount table lost its only block: every cluster looks free.
        let mut r = small_image();
        r.table[0] = 0;
        r.blocks[0] = None;
        assert!(matches!(
            r.allocate(8),
            Err(RefcountError::FreeMetadata { cluster: 0, .. })
        ));
        // A block whose range starts on metadata is not placed there.
        let mut r = small_image();
        r.meta.set(256 * 512, 512, class::ACTIVE_L2);
        let mut result = Ok((0, 0, false));
        while result.is_ok() {
            result = r.allocate(64);
        }
        assert_eq!(
            result,
            Err(RefcountError::FreeMetadata {
                cluster: 256,
                classes: class::ACTIVE_L2
            })
        );
        assert!(r.block_missing(256));
    }

    #[test]
    fn new_refcount_structures_are_recorded_as_metadata() {
        let mut r = small_image();
        let epb = r.entries_per_block();
        let target = 64 * epb + 10;
        let mut end = 0;
        while end < target {
            let (off, n, _) = r.allocate(4096).unwrap();
            end = (off >> 9) + n;
        }
        let (toff, tcl) = r.table_location();
        for k in 0..tcl {
            assert_eq!(r.meta.get((toff >> 9) + k), class::REFCOUNT_TABLE);
        }
        for off in r.table.iter().filter(|&&o| o != 0) {
            assert_eq!(
                r.meta.get(off >> 9) & class::REFCOUNT_BLOCK,
                class::REFCOUNT_BLOCK
            );
        }
        // The retired table stays metadata until it is released.
        assert_eq!(r.meta.get(1), class::REFCOUNT_TABLE);
        r.release(512, 512, class::REFCOUNT_TABLE).unwrap();
        assert_eq!((r.meta.get(1), r.get(1)), (0, 0));
    }

    #[test]
    fn table_growth_stops_where_an_image_could_no_longer_be_opened() {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, so the largest table
        // (1 Mi entries) describes 32 GiB. A sparse file of almost that much leaves no room
        // to place a larger table past its end.
        let cs = 512u64;
        let limit = Refcounts::max_clusters(6, 9);
        assert_eq!(limit, (1 << 20) * 64);
        let mut r = image_with(6, (limit - 100) * cs);
        let mut last = Ok((0, 0, false));
        let mut handed_out = Vec::new();
        while let Ok(run) = last {
            handed_out.push(run);
            last = r.allocate(64);
        }
        assert_eq!(last, Err(RefcountError::TooLarge));
        // Nothing changed: the table keeps its place and size, what was handed out stays.
        assert_eq!(r.table_location(), (cs, 1));
        assert_eq!(r.table.len(), 64);
        for &(off, n, _) in &handed_out[1..] {
            assert!((0..n).all(|k| r.get((off >> 9) + k) == 1));
        }
        // Freed clusters can still be handed out.
        let (off, _, _) = handed_out[1];
        r.adjust_range(off, cs, -1).unwrap();
        assert_eq!(r.allocate(1).unwrap(), (off, 1, false));
    }

    #[test]
    fn a_table_larger_than_a_block_range_still_finds_its_place() {
        // 512-byte clusters, 64-bit refcounts: a block describes 64 clusters, fewer than the
        // table of a 140 MiB file has; the table and its blocks go one after the other.
        let mut r = image_with(6, 4 * 512);
        let mut end = 0;
        while end < 280_000 {
            let (off, n, _) = r.allocate(4096).unwrap();
            end = (off >> 9) + n;
        }
        let (toff, tcl) = r.table_location();
        assert!(tcl > 64, "{tcl} table clusters");
        assert!(r.table.len() as u64 * 64 > end);
        for k in 0..tcl {
            assert_eq!(r.get((toff >> 9) + k), 1);
        }
        for (b, off) in r.table.iter().enumerate() {
            if *off != 0 {
                assert_eq!(r.get(off >> 9), 1, "block {b}");
            }
        }
    }

    #[test]
    fn allocates_past_the_end_and_reuses_freed() {
        let mut r = small_image();
        let (off, n, fresh) = r.allocate(3).unwrap();
        assert_eq!((off, n, fresh), (4 * 512, 3, true));
        assert_eq!(r.get(5), 1);
        r.adjust_range(5 * 512, 512, -1).unwrap();
        let (off, n, fresh) = r.allocate(1).unwrap();
        assert_eq!((off, n, fresh), (5 * 512, 1, false));
    }

    #[test]
    fn growing_past_a_block_creates_a_self_describing_block() {
        let mut r = small_image();
        let epb = r.entries_per_block(); // 256 clusters per block
                                         // Use up the first block's range.
        let mut total = 4;
        while total < epb {
            let (_, n, _) = r.allocate(epb - total).unwrap();
            total += n;
        }
        let (off, _, _) = r.allocate(1).unwrap();
        // Block 1 sits at cluster 256 and the data at 257.
        assert_eq!(off, (epb + 1) * 512);
        assert_eq!(r.get(epb), 1);
        assert_eq!(r.table[1], epb * 512);
    }

    #[test]
    fn table_growth_moves_the_table_and_retires_the_old_one() {
        let mut r = small_image();
        let epb = r.entries_per_block();
        // 64 table entries * 256 clusters: fill past that.
        let target = 64 * epb + 10;
        let mut end = 0;
        while end < target {
            let (off, n, _) = r.allocate(4096).unwrap();
            end = (off >> 9) + n;
        }
        let (toff, tcl) = r.table_location();
        assert_ne!(toff, 512);
        assert!(r.table.len() as u64 * epb > end);
        // The new table clusters are accounted for.
        for k in 0..tcl {
            assert_eq!(r.get((toff >> 9) + k), 1);
        }
        // The old table is freed only after the header is durable.
        assert_eq!(r.get(1), 1);
        let snap = r.take_table().expect("the grown table must be written");
        assert_eq!(snap.retired, Some((512, 1)));
        assert!(r.take_table().is_none(), "taken once");
        // A block created after the snapshot dirties the table again.
        let (off, n, _) = r.allocate(4 * epb).unwrap();
        assert!(off + n * 512 > end * 512);
        assert!(
            r.take_table().is_some(),
            "new entries belong to the next flush"
        );
        // Every block that exists is described by a refcount of 1.
        for (b, off) in r.table.iter().enumerate() {
            if *off != 0 {
                assert_eq!(r.get(off >> 9), 1, "block {b}");
            }
        }
    }

    #[test]
    fn underflow_and_overflow_are_errors() {
        let mut r = small_image();
        assert_eq!(
            r.adjust_range(100 * 512, 512, -1),
            Err(RefcountError::Underflow { cluster: 100 })
        );
        let mut one_bit = small_image();
        one_bit.order = 0;
        one_bit.entries_per_block = 512 * 8;
        one_bit.blocks[0] = Some(vec![0u8; 512].into_boxed_slice());
        one_bit.adjust_range(0, 512, 1).unwrap();
        assert_eq!(
            one_bit.adjust_range(0, 512, 1),
            Err(RefcountError::Overflow { cluster: 0 })
        );
    }
}
