//! A shard's allocating writes in flight ([`Allocations`], one part of its state): each
//! [`Alloc`] (the cluster, its new host cluster, the span written and copied, the old entry,
//! the parts waiting for it), the allocation in flight on each guest cluster, and those whose
//! copy-on-write reads have completed. Planning and running them is `write.rs`.
//!
//! Owned by one shard and used only on its thread.

use super::slab::{AllocId, PartId, Slab};
use crate::error::IoError;
use crate::meta::{U64Hasher, WaitList};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// An allocating write of one cluster in flight.
#[derive(Default)]
pub(super) struct Alloc {
    pub(super) part: PartId,
    /// Guest offset of the cluster.
    pub(super) cluster: u64,
    /// L2 slot (pinned) and entry index of the cluster.
    pub(super) slot: u32,
    pub(super) index: usize,
    /// Host cluster written, and whether it was allocated for this write.
    pub(super) host: u64,
    pub(super) new_cluster: bool,
    /// In-cluster byte range written to the host cluster.
    pub(super) span: (u64, u64),
    /// In-cluster byte range taken from the request (the rest is copied).
    pub(super) write: (u64, u64),
    pub(super) zeros: bool,
    /// The cluster lives at its guest offset in the external data file (no refcounts).
    pub(super) identity: bool,
    /// Extended L2: every subcluster is allocated afterwards (whole-cluster copy).
    pub(super) whole: bool,
    pub(super) old_raw: u64,
    pub(super) old_bitmap: Option<u64>,
    /// The span read as zeros before and the host cluster is fresh: should the entry reach
    /// the disk without the data, the span still reads as zeros, never as stale host bytes
    /// or as neither its old nor its new content.
    pub(super) survives_loss: bool,
    /// Number of the reservation `host` came from (0: not newly allocated).
    pub(super) reservation: u64,
    pub(super) buf: Option<Box<[u8]>>,
    pub(super) cow_pending: u32,
    pub(super) error: Option<IoError>,
    pub(super) expected: u64,
    pub(super) waiters: WaitList,
}

/// A shard's allocating writes in flight.
pub(super) struct Allocations {
    pub(super) allocs: Slab<AllocId, Alloc>,
    /// Guest cluster offset -> allocation in flight on it.
    pub(super) allocating: HashMap<u64, AllocId, BuildHasherDefault<U64Hasher>>,
    /// Allocations whose copy-on-write reads have all completed.
    pub(super) cow_ready: Vec<AllocId>,
}

impl Allocations {
    /// None in flight, with room for the usual load before the arenas grow.
    pub(super) fn new() -> Allocations {
        Allocations {
            allocs: Slab::with_capacity(64),
            allocating: HashMap::with_capacity_and_hasher(64, BuildHasherDefault::default()),
            cow_ready: Vec::with_capacity(64),
        }
    }
}
