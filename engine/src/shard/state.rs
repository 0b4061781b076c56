//! Everything a shard mutates apart from its ring ([`State`]), the per-layer caches, and how a
//! new shard's state is sized from the image (the L2 cache budget shared out among layers).
//! `State` gathers owned parts, each declared with the methods that need only it in its own
//! file below this one: the requests and their parts (`request.rs`: `Requests`), the
//! operations (`op.rs`: `Op`), the group link (`group.rs`: `GroupLink`), reservations and
//! frees (`reserve.rs`: `Reservations`), allocating writes (`alloc_write.rs`: `Allocations`),
//! buffer pools and scratch (`buffers.rs`), inflation (`inflation.rs`: `Inflation`), metadata
//! not yet written with the flushes and write-backs waiting and running and the corruption
//! found this turn (`flush_state.rs`: `FlushState`). What spans several parts is an
//! `impl State` block in a file above this one, one per concern: `plan.rs`, `dispatch.rs`,
//! `allocate.rs`, `coordinate.rs`, `l2.rs`, `flush.rs`, `read.rs`, `write.rs`.
//!
//! Owned by one shard and used only on its thread.

use super::alloc_write::Allocations;
use super::buffers::{Buffers, Scratch};
use super::config::{Completion, ShardConfig};
use super::flush_state::FlushState;
use super::group::GroupLink;
use super::inflation::Inflation;
use super::op::Op;
use super::request::Requests;
use super::reserve::Reservations;
use super::slab::{OpId, Slab};

use crate::layer::KindRef;
use crate::meta::{CacheBudget, SlotCache};
use crate::shared::ImageInner;

pub(super) struct LayerCaches {
    pub(super) l2: SlotCache,
    pub(super) decompressed: SlotCache,
}

/// Everything a shard mutates, apart from the ring.
pub(super) struct State {
    /// This shard's index in its group (0 without one).
    pub(super) index: usize,
    /// The link to the other shards of a writable image served by several, with this
    /// shard's side of the coordination (`group.rs`).
    pub(super) group: Option<GroupLink>,
    /// Guest bytes one L2 table of the top image maps (the unit of ownership in a group).
    pub(super) l2_cover: u64,
    /// A `Retry` timeout is in flight.
    pub(super) retry_armed: bool,
    pub(super) layers: Vec<LayerCaches>,
    /// Requests, their parts, and the parts ready to plan (`request.rs`).
    pub(super) requests: Requests,
    pub(super) ops: Slab<OpId, Op>,
    /// Allocating writes in flight (`write.rs`).
    pub(super) allocations: Allocations,
    pub(super) finished: Vec<Completion>,
    pub(super) cqes: Vec<(u64, i32)>,
    /// Pooled buffers for compressed extents (2 clusters) and allocations and metadata (1
    /// cluster), and a cluster of zeros (`buffers.rs`).
    pub(super) buffers: Buffers,
    /// The scratch compressed reads in flight hold (`buffers.rs`).
    pub(super) scratch: Scratch,
    /// The inflater, the inflate jobs, recent compressed reads (`read.rs`).
    pub(super) inflation: Inflation,
    /// Operations whose completion has not been handled: in the kernel, or inflate jobs
    /// (queued, or run by a thief that posts their completion into the ring).
    pub(super) ops_in_kernel: usize,
    /// Clusters reserved for allocation, the durability of their refcounts, and the frees
    /// waiting for flushes and operations in flight (`reserve.rs`).
    pub(super) reservations: Reservations,
    /// Test hook: hold in-place writes back ([`ShardConfig::hold_data_writes`]) and the
    /// writes held (operation, entry).
    pub(super) hold_data_writes: bool,
    pub(super) held: Vec<(OpId, crate::io::sqe::Sqe)>,
    /// Metadata changed and not yet written, the flushes and write-backs waiting and
    /// running, the corruption found this turn (`flush.rs`).
    pub(super) flush: FlushState,
    pub(super) writethrough: bool,
}

/// L2 tables each qcow2 layer's cache holds whatever its budgets (the shard's own L2 cache
/// size, a budget shared with other shards): enough for a request across a few tables to go on.
const L2_FLOOR_SLOTS: usize = 4;
/// Decompressed clusters each qcow2 layer's cache holds whatever its budgets.
const DECOMPRESSED_FLOOR_SLOTS: usize = 2;

/// L2 cache slots of each layer of `inner` (1 for raw layers) within the shard's one L2
/// cache budget: every layer gets a slot per L2 table when that fits; otherwise the budget is
/// shared in proportion to what would cover each layer, with at least [`L2_FLOOR_SLOTS`] per
/// layer.
pub(super) fn l2_slots_per_layer(inner: &ImageInner) -> Vec<usize> {
    let floor = L2_FLOOR_SLOTS as u64;
    let need = |l: crate::layer::LayerRef| match l.kind {
        KindRef::Qcow2(q) => (q.l1.len() as u64).max(floor) * q.geom.cluster_size(),
        KindRef::Raw(_) => 0,
    };
    let total: u64 = inner.layers().map(need).sum();
    let budget = inner.l2_cache_bytes;
    inner
        .layers()
        .map(|l| match l.kind {
            KindRef::Qcow2(q) => {
                let cs = q.geom.cluster_size();
                let share = if total <= budget {
                    need(l)
                } else {
                    // At most `budget`: fits u64.
                    (u128::from(budget) * u128::from(need(l)) / u128::from(total)) as u64
                };
                (share / cs).clamp(floor, (q.l1.len() as u64).max(floor)) as usize
            }
            KindRef::Raw(_) => 1,
        })
        .collect()
}

impl State {
    /// A shard's state for `image`: per-layer caches within the shard's budgets (drawn from
    /// the budget shared with other shards, if it has one), empty arenas.
    pub(super) fn new(image: &ImageInner, config: &ShardConfig, grouped: bool) -> State {
        let inner = image;
        let mut layers = Vec::with_capacity(inner.layer_count());
        let mut big_buf_bytes = 0usize;
        let mut top_cluster = 512usize;
        let qcow2_layers = inner
            .layers()
            .filter(|l| matches!(l.kind, KindRef::Qcow2(_)))
            .count()
            .max(1) as u64;
        let l2_slots = l2_slots_per_layer(inner);
        // The shard is one member of the shared budget: its caches (two per qcow2 layer) draw
        // on one fair share, so a shard's share does not depend on its image's chain.
        let share = config.cache_budget().map(CacheBudget::share);
        let shared = |cache: SlotCache, floor: usize| match &share {
            Some(share) => cache.with_share(share.clone(), floor),
            None => cache,
        };
        for (i, layer) in inner.layers().enumerate() {
            let caches = match layer.kind {
                KindRef::Qcow2(q) => {
                    let cs = q.geom.cluster_size();
                    if i == 0 {
                        top_cluster = cs as usize;
                    }
                    big_buf_bytes = big_buf_bytes.max(2 * cs as usize);
                    // The shard's decompressed-cluster budget, shared by its qcow2 layers.
                    let decompressed = config.decompressed_cache_bytes / qcow2_layers / cs;
                    let decompressed = usize::try_from(decompressed)
                        .unwrap_or(usize::MAX)
                        .max(DECOMPRESSED_FLOOR_SLOTS);
                    LayerCaches {
                        l2: shared(SlotCache::new(l2_slots[i], cs as usize), L2_FLOOR_SLOTS),
                        decompressed: shared(
                            SlotCache::new(decompressed, cs as usize),
                            DECOMPRESSED_FLOOR_SLOTS,
                        ),
                    }
                }
                KindRef::Raw(_) => LayerCaches {
                    l2: SlotCache::new(1, 0),
                    decompressed: SlotCache::new(1, 0),
                },
            };
            layers.push(caches);
        }
        let writable = inner.writable.is_some();
        let l2_cover = inner.top.q.geom.l2_coverage();
        State {
            index: if grouped { config.index } else { 0 },
            group: None,
            l2_cover,
            retry_armed: false,
            layers,
            requests: Requests::new(),
            ops: Slab::with_capacity(512),
            allocations: Allocations::new(),
            finished: Vec::with_capacity(256),
            cqes: Vec::with_capacity(512),
            buffers: Buffers::new(
                big_buf_bytes,
                top_cluster,
                if writable { top_cluster } else { 0 },
            ),
            scratch: Scratch::new(
                usize::try_from(config.scratch_bytes).unwrap_or(usize::MAX),
                // An extent buffer and a prefix of the largest cluster.
                big_buf_bytes + big_buf_bytes / 2,
            ),
            inflation: Inflation::new(config.inflate),
            ops_in_kernel: 0,
            reservations: Reservations::default(),
            hold_data_writes: config.hold_data_writes,
            held: Vec::new(),
            flush: FlushState::new(config),
            writethrough: false,
        }
    }
}
