//! The shard's reservations ([`Reservations`], one part of its state): the runs of clusters
//! reserved from the image's allocator that it hands out one at a time, the durability of
//! their refcounts that entries pointing into them wait for, and the references dropped
//! whose clusters are freed once that is durable and no operation in flight still uses them
//! (the two epochs of [`Frees`]). Handing clusters out and reserving more is `allocate.rs`;
//! applying frees is `flush.rs`.
//!
//! Runs on the shard's thread.

use crate::error::IoError;

/// Clusters reserved from the image's allocator, handed out one at a time.
#[derive(Default, Clone, Copy)]
pub(super) struct Reserved {
    pub(super) next: u64,
    pub(super) remaining: u64,
    /// Clusters reserved in all.
    pub(super) size: u64,
    pub(super) fresh: bool,
    /// Numbered from 1 in the order this shard reserved them.
    pub(super) seq: u64,
}

/// A shard's reservations: the clusters it hands out, the durability of their refcounts
/// that entries pointing into them wait for, and the references dropped whose clusters are
/// freed once that is durable and no operation in flight still uses them.
#[derive(Default)]
pub(super) struct Reservations {
    /// The reservation clusters are handed out from.
    pub(super) reserved: Reserved,
    /// The next reservation, taken once half of `reserved` is used.
    pub(super) spare: Reserved,
    /// Number of the last reservation taken.
    pub(super) seq: u64,
    /// Reservations up to this number have durable refcounts.
    pub(super) durable_seq: u64,
    /// The newest reservation an unwritten entry points into (0: none that is not durable).
    pub(super) newest_referenced: u64,
    /// A reservation was taken whose refcount blocks have not been submitted for writing.
    pub(super) refcounts_to_write: bool,
    /// Durable refcount-block writes in flight, and the last reservation they cover.
    pub(super) refcount_writes: u32,
    pub(super) refcount_writes_seq: u64,
    pub(super) refcount_writes_failed: Option<IoError>,
    /// References dropped, freed after the next flush.
    pub(super) pending_frees: Vec<PendingFree>,
    /// Frees made due by flushes, waiting for data operations in flight.
    pub(super) frees: Frees,
    /// The last reservation failed (and was logged).
    pub(super) allocation_failed: bool,
}

impl Reservations {
    /// Whether anything reserved or freed waits for a flush or a release (a writable shard
    /// dropped with this loses it).
    pub(super) fn holds_anything(&self) -> bool {
        !self.pending_frees.is_empty()
            || !self.frees.due.is_empty()
            || !self.frees.draining.is_empty()
            || self.reserved.remaining > 0
            || self.spare.remaining > 0
    }

    /// The refcounts of reservations up to `seq` are durable.
    pub(super) fn made_durable(&mut self, seq: u64) {
        self.durable_seq = self.durable_seq.max(seq);
    }

    /// Whether an unwritten entry points into a reservation whose refcounts are not durable.
    pub(super) fn referenced_not_durable(&self) -> bool {
        self.newest_referenced > self.durable_seq
    }
}

/// A host range whose reference was dropped; freed after the next flush makes that durable.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingFree {
    pub(super) host: u64,
    pub(super) len: u64,
    /// Key of the decompressed-cluster cache entry to drop (compressed extents).
    pub(super) compressed: Option<u64>,
    /// The metadata class the range stops holding (an L2 table replaced by a copy), or 0.
    pub(super) meta: u8,
}

/// Frees that wait for the data operations in flight when they became due (DESIGN.md
/// invariant 10: a host cluster is freed only when no operation in flight still reads or
/// writes it). A reference dropped by a discard, write-zeroes or copy on write is due once
/// the flush that made the new entry durable completes; a read or in-place write planned
/// from the old entry may still be in the kernel then (slow with O_DIRECT), and the cluster,
/// once free, may become a new L2 table or another guest's data.
///
/// Two epochs, counted without allocation: each data operation counts in the current epoch
/// while it lives. Frees that become due wait in `due`; when no batch is draining, the
/// epochs switch and `due` becomes `draining`, which is applied once the old epoch's count
/// reaches zero: every operation in flight at the switch, and so every one that could
/// target those clusters, has completed by then.
#[derive(Default)]
pub(super) struct Frees {
    /// Data operations alive per epoch.
    pub(super) live: [u32; 2],
    /// The epoch new operations count in.
    pub(super) current: usize,
    /// Frees due, waiting for the next switch.
    pub(super) due: Vec<PendingFree>,
    /// Frees waiting for the old epoch (`1 - current`) to drain.
    pub(super) draining: Vec<PendingFree>,
}

impl Frees {
    /// Whether frees wait for the old epoch and it has drained.
    pub(super) fn drained(&self) -> bool {
        !self.draining.is_empty() && self.live[1 - self.current] == 0
    }
}
