//! The per-core executor: drives guest requests from submission to completion.
//!
//! A [`Shard`] is owned by one thread. It owns an io_uring, per-layer caches of L2 tables and
//! decompressed clusters, and arenas of requests, parts and operations; nothing in it is shared
//! with other shards, so the data path takes no locks. The shards of a writable image share
//! out its L2 tables and pass each other pieces of requests through lock-free queues
//! (`group.rs`).
//!
//! A request becomes one or more *parts*: a guest range at one layer of the backing chain. The
//! planner ([`crate::meta::resolve`]) maps the start of a part to a step (zeros, data at a host
//! offset, a compressed cluster, or the next layer down); the part is split where the mapping
//! changes and each piece is served (`read.rs`). Writes are planned cluster by cluster
//! (`write.rs`): in place when the cluster is allocated and not shared, otherwise through an
//! *allocation* that copies what the write does not cover, writes the new cluster, and only
//! then points the L2 entry at it. Flushes write metadata in dependency order (`flush.rs`).
//! A part that needs an L2 table or a compressed cluster that is not cached waits on the cache
//! slot being loaded; a write to a cluster being allocated waits on that allocation; both are
//! planned again when what they wait for completes.
//!
//! One loop turn ([`Shard::poll`]) reaps completions, plans every ready part, and submits all
//! the I/O that produced with one `io_uring_enter`.

mod direct;
mod flush;
mod flush_plan;
mod group;
mod l2;
mod read;
mod slab;
mod write;

use crate::error::{Error, ErrorKind, IoError};
use crate::io::{iov_total_len, AlignedBuf, ClusterInflater, DataFd, Ring};
use crate::layer::KindRef;
use crate::meta::{SlotCache, U64Hasher, WaitList, NO_ID};
use crate::shared::ImageInner;
use flush::FlushState;
use group::Group;
use group::{forwarded_parts, Msg};
use libc::iovec;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::os::fd::RawFd;
use std::sync::Arc;

/// How a shard is set up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard's index, `0..count`.
    pub index: usize,
    /// How many shards serve the image. Several shards of a writable image are made together
    /// by [`Image::new_shards`].
    pub count: usize,
    /// Submission queue entries of the shard's io_uring.
    pub ring_entries: u32,
    /// Bytes of decompressed clusters cached, shared by the image's qcow2 layers.
    pub decompressed_cache_bytes: u64,
    /// Most bytes of scratch buffers that compressed reads in flight may hold together (a
    /// compressed extent's buffer, and a cluster prefix's); a read that would need more waits
    /// for another to give its buffers back. At least what one read needs.
    pub scratch_bytes: u64,
    /// Fault injection for tests: every fdatasync of the n-th flush of this shard (counting
    /// from 1) fails with EIO instead of reaching the kernel. `None` in production.
    #[doc(hidden)]
    pub fail_flush_number: Option<u64>,
    /// Fault injection for tests: in-place writes of guest data are held back, as if the
    /// kernel were slow to do them, until [`Shard::release_held_writes`]. `false` in
    /// production.
    #[doc(hidden)]
    pub hold_data_writes: bool,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            index: 0,
            count: 1,
            ring_entries: 256,
            decompressed_cache_bytes: 16 << 20,
            scratch_bytes: DEFAULT_SCRATCH_BYTES,
            fail_flush_number: None,
            hold_data_writes: false,
        }
    }
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token the request was submitted with.
    pub token: u64,
    /// Success, or why it failed.
    pub result: Result<(), IoError>,
}

/// Most iovecs one request may carry (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;
/// Bytes of compressed-extent and of cluster buffers kept for reuse (per kind, at least one
/// buffer); more are freed after use.
const MAX_POOLED_BYTES: usize = 4 << 20;
/// Default [`ShardConfig::scratch_bytes`]: 85 compressed reads of 64 KiB clusters in flight,
/// 5 of 2 MiB clusters.
pub const DEFAULT_SCRATCH_BYTES: u64 = 16 << 20;

/// What a request does.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
enum ReqKind {
    #[default]
    Read,
    Write,
    WriteZeroes {
        unmap: bool,
    },
    Discard,
    /// A flush sent to every shard of a group.
    Flush,
}

impl ReqKind {
    fn is_write(self) -> bool {
        matches!(
            self,
            ReqKind::Write | ReqKind::WriteZeroes { .. } | ReqKind::Discard
        )
    }
}

#[derive(Default)]
struct Req {
    token: u64,
    kind: ReqKind,
    iov: Vec<iovec>,
    /// Parts not yet finished.
    pending: u32,
    error: Option<IoError>,
    /// For a read issued by an allocation (copy on write): that allocation, else NO_ID.
    parent: u32,
    /// Some of it is served by this shard (else every piece went to other shards, which
    /// completed them the way writes complete, and nothing is left to do here).
    has_local: bool,
    /// Write-through when it was submitted (a piece served for another shard: the
    /// submitter's mode, whatever this shard's is while the modes are being switched).
    writethrough: bool,
}

#[derive(Default, Clone, Copy)]
struct Part {
    req: u32,
    layer: u16,
    guest_off: u64,
    len: u64,
    /// Byte offset of this part within the request's iovecs.
    skip: u64,
    /// Next part in the wait list this part is on.
    next: u32,
    /// A read planned with this shard's copy of another shard's table: the table's version
    /// the copy was read at (0: none). The part is redone by the owner if the version has
    /// changed when it finishes (`group.rs`).
    tag: u64,
}

/// Where the bytes of a data operation come from or go to.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Buffer {
    /// The part's range of its request's iovecs.
    #[default]
    Request,
    /// The shard's zero buffer (writes of zeros).
    Zeros,
}

#[derive(Default, Clone, Copy)]
enum OpKind {
    #[default]
    Idle,
    L2Load {
        layer: u16,
        slot: u32,
        host: u64,
        /// The table's L1 index.
        key: u64,
    },
    /// Guest data read into, or written from, the request (or zeros) for one part.
    Data {
        part: u32,
        fd: DataFd,
        host: u64,
        done: u64,
        write: bool,
        buffer: Buffer,
    },
    /// The read of a compressed extent into the op's buffer.
    Compressed {
        layer: u16,
        target: InflateTarget,
        fd: RawFd,
        host: u64,
        want: u64,
        got: u64,
    },
    /// A compressed extent (the op's buffer) being inflated by a worker.
    Inflating {
        layer: u16,
        target: InflateTarget,
        host: u64,
    },
    /// The write of an allocation's new cluster.
    AllocWrite { alloc: u32 },
    /// A metadata write or sync of the flush in progress (`injected`: a sync replaced by a
    /// no-op that must be reported as failed).
    Flush { injected: bool },
    /// A durable (RWF_DSYNC) write of refcount blocks of new reservations.
    RefcountWrite,
    /// A short timeout: another shard holds the right to write refcount blocks; try again.
    Retry,
}

/// How long a shard waits before trying again to write refcount blocks that another shard
/// is writing.
static RETRY_AFTER: io_uring::types::Timespec = io_uring::types::Timespec::new().nsec(50_000);

/// Where a compressed cluster is inflated to.
#[derive(Clone, Copy)]
enum InflateTarget {
    /// A decompressed-cache slot of the op's layer; the parts waiting on it copy from it.
    Slot(u32),
    /// Straight into the guest memory of this part, which covers the whole cluster with one
    /// segment (the op's one iovec); nothing is cached (`read.rs` says why).
    Part(u32),
    /// Only the start of the cluster up to the end of this part, into the op's `scratch`,
    /// from which the part is copied; nothing is cached (`read.rs` says why).
    Prefix(u32),
}

#[derive(Default)]
struct Op {
    kind: OpKind,
    iov: Vec<iovec>,
    buf: Option<Box<[u8]>>,
    /// Aligned copy of a direct write's misaligned memory (see `direct.rs`).
    bounce: Option<AlignedBuf>,
    /// Where a cluster prefix is inflated ([`InflateTarget::Prefix`]): a cluster buffer.
    scratch: Option<Box<[u8]>>,
    /// A data operation on a host cluster holds its epoch (1 or 2; 0: none) until it is
    /// freed, so that no cluster is freed under it (see [`Frees`]).
    epoch: u8,
    /// Bytes of `buf` and `scratch` counted in the shard's scratch in use.
    scratch_charge: usize,
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
struct Frees {
    /// Data operations alive per epoch.
    live: [u32; 2],
    /// The epoch new operations count in.
    current: usize,
    /// Frees due, waiting for the next switch.
    due: Vec<PendingFree>,
    /// Frees waiting for the old epoch (`1 - current`) to drain.
    draining: Vec<PendingFree>,
}

struct LayerCaches {
    l2: SlotCache,
    decompressed: SlotCache,
}

/// Clusters reserved from the image's allocator, handed out one at a time.
#[derive(Default, Clone, Copy)]
struct Reserved {
    next: u64,
    remaining: u64,
    /// Clusters reserved in all.
    size: u64,
    fresh: bool,
    /// Numbered from 1 in the order this shard reserved them.
    seq: u64,
}

/// A host range whose reference was dropped; freed after the next flush makes that durable.
#[derive(Clone, Copy, Debug)]
struct PendingFree {
    host: u64,
    len: u64,
    /// Key of the decompressed-cluster cache entry to drop (compressed extents).
    compressed: Option<u64>,
    /// The metadata class the range stops holding (an L2 table replaced by a copy), or 0.
    meta: u8,
}

/// Everything a shard mutates, apart from the ring.
struct State {
    /// This shard's index in its group (0 without one).
    index: usize,
    /// The other shards of a writable image served by several (`group.rs`).
    group: Option<Arc<Group>>,
    /// Guest bytes one L2 table of the top image maps (the unit of ownership in a group).
    l2_cover: u64,
    /// Requests and flushes served for other shards (and this shard's own piece of a group
    /// flush), not yet answered.
    forwarded_in: usize,
    /// Pieces of this shard's requests (and flushes) sent to other shards, not yet answered.
    remote_pieces: usize,
    /// Shards to wake at the end of this poll (bit per shard).
    to_wake: u64,
    /// A `Retry` timeout is in flight.
    retry_armed: bool,
    /// Per top-layer L2 cache slot holding a copy of another shard's table: the table's
    /// version the copy was read at (0: none vouches for it).
    foreign_tags: Vec<u64>,
    /// Tables of this shard whose version is odd (changes not in the file yet).
    odd_tables: Vec<u64>,
    layers: Vec<LayerCaches>,
    reqs: Slab<Req>,
    parts: Slab<Part>,
    ops: Slab<Op>,
    allocs: Slab<write::Alloc>,
    /// Guest cluster offset -> allocation in flight on it.
    allocating: HashMap<u64, u32, BuildHasherDefault<U64Hasher>>,
    /// Allocations whose copy-on-write reads have all completed.
    cow_ready: Vec<u32>,
    ready: VecDeque<u32>,
    finished: Vec<Completion>,
    cqes: Vec<(u64, i32)>,
    /// Buffers for compressed extents (2 clusters) and allocations (1 cluster).
    big_bufs: Vec<Box<[u8]>>,
    big_buf_bytes: usize,
    cluster_bufs: Vec<Box<[u8]>>,
    cluster_buf_bytes: usize,
    /// Scratch held by compressed reads in flight, its limit, the most one read takes, the
    /// highest it has been, and the parts waiting for some to be given back.
    scratch_bytes: usize,
    scratch_limit: usize,
    scratch_need: usize,
    scratch_peak: usize,
    scratch_waiters: WaitList,
    /// One cluster of zeros, aligned for direct writes.
    zeros: AlignedBuf,
    inflater: ClusterInflater,
    ops_in_kernel: usize,
    /// Guest offsets just past the last few compressed parts read (sequential streams).
    compressed_ends: [u64; 8],
    compressed_end_next: usize,
    reserved: Reserved,
    /// The next reservation, taken once half of `reserved` is used.
    spare: Reserved,
    /// Number of the last reservation taken.
    reserve_seq: u64,
    /// Reservations up to this number have durable refcounts.
    durable_seq: u64,
    /// The newest reservation an unwritten entry points into (0: none that is not durable).
    newest_referenced: u64,
    /// A reservation was taken whose refcount blocks have not been submitted for writing.
    refcounts_to_write: bool,
    /// Durable refcount-block writes in flight, and the last reservation they cover.
    refcount_writes: u32,
    refcount_writes_seq: u64,
    refcount_writes_failed: Option<IoError>,
    pending_frees: Vec<PendingFree>,
    /// Frees made due by flushes, waiting for data operations in flight.
    frees: Frees,
    /// The last reservation failed (and was logged).
    allocation_failed: bool,
    /// Test hook: hold in-place writes back ([`ShardConfig::hold_data_writes`]) and the
    /// writes held (operation, entry).
    hold_data_writes: bool,
    held: Vec<(u32, io_uring::squeue::Entry)>,
    dirty_l1: Vec<u64>,
    /// L1 entries changed since they were last written (by a flush or a metadata write-back).
    unwritten_l1: Vec<u64>,
    /// Something an unwritten L2 entry depends on (new refcounts, the file's length, data that
    /// must not be lost under the entry) is not durable yet: the next metadata write-back
    /// syncs before it writes L2 entries.
    sync_before_l2: bool,
    flush: FlushState,
    writethrough: bool,
    /// Corruption of the top image found during this turn, handled at its end.
    pending_corrupt: Option<&'static str>,
    /// A write refused because it would have landed on metadata (or a cluster the
    /// allocator found free that holds metadata) during this turn, handled at its end.
    pending_overlap: Option<crate::overlap::Hit>,
    /// Flushes started so far, and the one whose syncs fail (fault injection for tests).
    flushes: u64,
    fail_flush_number: Option<u64>,
}

/// See the module documentation.
pub struct Shard {
    // Field order is drop order; Drop waits for the kernel first anyway.
    ring: Ring,
    st: State,
    image: Arc<ImageInner>,
}

// SAFETY: the raw pointers a shard holds (iovecs into caller memory) are only dereferenced by
// the kernel and by the shard's own thread; the submit contract makes that memory valid until
// completion regardless of which thread owns the shard. Moving a shard between threads moves
// its ring with it; it is never shared (`Shard` is not `Sync`).
unsafe impl Send for Shard {}

/// L2 cache slots of each layer of `inner` (0 for raw layers) within the shard's one L2
/// cache budget: every layer gets a slot per L2 table when that fits; otherwise the budget is
/// shared in proportion to what would cover each layer, with at least 4 slots per layer.
fn l2_slots_per_layer(inner: &ImageInner) -> Vec<usize> {
    let need = |l: crate::layer::LayerRef| match l.kind {
        KindRef::Qcow2(q) => (q.l1.len() as u64).max(4) * q.geom.cluster_size(),
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
                (share / cs).clamp(4, (q.l1.len() as u64).max(4)) as usize
            }
            KindRef::Raw(_) => 1,
        })
        .collect()
}

/// Makes `count` shards of `image` (see [`Image::new_shards`](crate::Image::new_shards)); the
/// shards of a writable image served by several form a group.
pub(crate) fn new_shards(
    image: &Arc<ImageInner>,
    config: &ShardConfig,
    count: usize,
) -> Result<Vec<Shard>, Error> {
    let grouped = image.writable.is_some() && count > 1;
    let mut shards = (0..count)
        .map(|index| {
            let c = ShardConfig {
                index,
                count,
                ..config.clone()
            };
            Shard::new(Arc::clone(image), &c, grouped)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if grouped {
        let wakes = shards
            .iter()
            .map(|s| {
                // SAFETY: the shard's eventfd is open for as long as the shard, which
                // outlives this borrow.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(s.completion_fd()) }
                    .try_clone_to_owned()
                    .map_err(|e| Error::io("Cannot duplicate a shard's eventfd", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let group = Arc::new(Group::new(wakes, image.top.q.l1.len()));
        for s in &mut shards {
            s.join(Arc::clone(&group));
        }
    }
    Ok(shards)
}

fn os_error(e: &std::io::Error) -> IoError {
    IoError::Os {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl Shard {
    pub(crate) fn new(
        image: Arc<ImageInner>,
        config: &ShardConfig,
        grouped: bool,
    ) -> Result<Shard, Error> {
        let inner = &image;
        if inner.writable.is_some() && config.count > 1 && !grouped {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Several shards of a writable image are made together, by Image::new_shards",
            ));
        }
        let ring = Ring::new(config.ring_entries)
            .map_err(|e| Error::io("Cannot create an io_uring (is io_uring enabled?)", e))?;
        let mut layers = Vec::with_capacity(inner.layer_count());
        let mut big_buf_bytes = 0usize;
        let mut top_cluster = 512usize;
        let qcow2_layers = inner
            .layers()
            .filter(|l| matches!(l.kind, KindRef::Qcow2(_)))
            .count()
            .max(1) as u64;
        let l2_slots = l2_slots_per_layer(inner);
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
                    LayerCaches {
                        l2: SlotCache::new(l2_slots[i], cs as usize),
                        decompressed: SlotCache::new(decompressed.max(2) as usize, cs as usize),
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
        Ok(Shard {
            ring,
            st: State {
                index: if grouped { config.index } else { 0 },
                group: None,
                l2_cover,
                forwarded_in: 0,
                remote_pieces: 0,
                to_wake: 0,
                retry_armed: false,
                foreign_tags: Vec::new(),
                odd_tables: Vec::new(),
                layers,
                reqs: Slab::with_capacity(256),
                parts: Slab::with_capacity(512),
                ops: Slab::with_capacity(512),
                allocs: Slab::with_capacity(64),
                allocating: HashMap::with_capacity_and_hasher(64, BuildHasherDefault::default()),
                cow_ready: Vec::with_capacity(64),
                ready: VecDeque::with_capacity(512),
                finished: Vec::with_capacity(256),
                cqes: Vec::with_capacity(512),
                big_bufs: Vec::new(),
                big_buf_bytes,
                cluster_bufs: Vec::new(),
                cluster_buf_bytes: top_cluster,
                scratch_bytes: 0,
                scratch_limit: usize::try_from(config.scratch_bytes).unwrap_or(usize::MAX),
                // An extent buffer and a prefix of the largest cluster.
                scratch_need: big_buf_bytes + big_buf_bytes / 2,
                scratch_peak: 0,
                scratch_waiters: WaitList::EMPTY,
                zeros: AlignedBuf::zeroed(
                    if writable { top_cluster } else { 0 },
                    crate::io::SAFE_DIO_ALIGN as usize,
                ),
                inflater: ClusterInflater::new(),
                ops_in_kernel: 0,
                compressed_ends: [u64::MAX; 8],
                compressed_end_next: 0,
                reserved: Reserved::default(),
                spare: Reserved::default(),
                reserve_seq: 0,
                durable_seq: 0,
                newest_referenced: 0,
                refcounts_to_write: false,
                refcount_writes: 0,
                refcount_writes_seq: 0,
                refcount_writes_failed: None,
                pending_frees: Vec::new(),
                frees: Frees::default(),
                allocation_failed: false,
                hold_data_writes: config.hold_data_writes,
                held: Vec::new(),
                dirty_l1: Vec::new(),
                unwritten_l1: Vec::new(),
                sync_before_l2: false,
                flush: FlushState::default(),
                writethrough: false,
                pending_corrupt: None,
                pending_overlap: None,
                flushes: 0,
                fail_flush_number: config.fail_flush_number,
            },
            image,
        })
    }

    /// An eventfd that becomes readable when the kernel has posted completions.
    pub fn completion_fd(&self) -> RawFd {
        self.ring.event_fd()
    }

    /// Requests submitted and not yet returned as completions, plus one while this shard
    /// holds the right to write refcount blocks (`Writable::take_block_writes`): its durable
    /// refcount writes may outlive every request, and another shard's flush waits for the
    /// right until this shard, polled, sees them complete. A caller that drives several
    /// shards polls each until this is 0 before it blocks on any one of them.
    pub fn in_flight(&self) -> usize {
        let requests = self.st.reqs.live() + self.st.flush.waiting() - self.st.forwarded_in;
        let holds_blocks = self
            .image
            .writable
            .as_ref()
            .is_some_and(|w| w.writes_blocks(self.st.index));
        requests + usize::from(holds_blocks)
    }

    /// Joins the group of shards serving one writable image (`Image::new_shards`).
    pub(crate) fn join(&mut self, group: Arc<Group>) {
        self.st.group = Some(group);
    }

    /// L2 cache (hits, misses) summed over the layers.
    pub fn l2_cache_stats(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(h, m), l| {
            let (a, b) = l.l2.stats();
            (h + a, m + b)
        })
    }

    /// Bytes the shard's caches hold when full, summed over the layers: (L2 tables,
    /// decompressed clusters). Each is within its one budget for the shard (the image's L2
    /// cache size, [`ShardConfig::decompressed_cache_bytes`]), but for a floor of a few slots
    /// per layer.
    pub fn cache_capacity_bytes(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(l2, d), l| {
            (
                l2 + l.l2.capacity_bytes(),
                d + l.decompressed.capacity_bytes(),
            )
        })
    }

    /// The most scratch (compressed-extent and prefix buffers) that this shard's compressed
    /// reads have held at once; at most [`ShardConfig::scratch_bytes`], or what one read needs
    /// when that is more. A compressed read may take its buffers while no other holds any, or
    /// while they fit under the limit; otherwise it waits for a read to give some back.
    pub fn scratch_peak_bytes(&self) -> u64 {
        self.st.scratch_peak as u64
    }

    /// Decompressed-cluster cache (hits, misses) summed over the layers.
    pub fn decompressed_cache_stats(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(h, m), l| {
            let (a, b) = l.decompressed.stats();
            (h + a, m + b)
        })
    }

    /// In write-through mode every write is durable before it completes (the guest turned
    /// its write cache off); in write-back mode (the default) only flushes make writes durable.
    pub fn set_writethrough(&mut self, on: bool) {
        self.st.writethrough = on;
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), Error> {
        let size = self.image.virtual_size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{what} of {len} bytes at {offset:#x} is beyond the disk size of {size} bytes"
                ),
            ));
        }
        Ok(())
    }

    fn check_writable(&self, what: &str) -> Result<(), Error> {
        match &self.image.writable {
            None => Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{what} to a read-only image"),
            )),
            Some(w) if w.failed.load(std::sync::atomic::Ordering::Relaxed) => Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{what} refused: a flush failed earlier, the image takes no more writes"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Creates a request with one part covering it (or completes it at once when empty); in a
    /// group, one piece per L2 table, the pieces other shards own sent to them.
    fn start_request(&mut self, token: u64, kind: ReqKind, offset: u64, len: u64, iov: &[iovec]) {
        let st = &mut self.st;
        if len == 0 {
            st.finished.push(Completion {
                token,
                result: Ok(()),
            });
            return;
        }
        match st.group.take() {
            None => st.start_request(token, kind, NO_ID, offset, len, iov),
            Some(group) => {
                st.start_split_request(&group, token, kind, offset, len, iov);
                st.group = Some(group);
            }
        }
    }

    /// Refuses tokens the engine keeps for itself.
    fn check_token(&self, token: u64) -> Result<(), Error> {
        if forwarded_parts(token).is_some() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Token {token:#x} is in the range the engine keeps for itself"),
            ));
        }
        Ok(())
    }

    /// Queues a read of the guest range `offset..offset + total iov length` into `iov`.
    ///
    /// `Err` means the request was rejected before any I/O (out of range, too many
    /// segments); `Ok` means exactly one [`Completion`] with `token` will come out of
    /// [`Shard::poll`] or [`Shard::wait`].
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of its length, not otherwise accessed,
    /// until the completion for `token` has been returned or the shard has been dropped.
    pub unsafe fn submit_read(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[iovec],
    ) -> Result<(), Error> {
        let len = iov_total_len(iov);
        self.check_token(token)?;
        self.check_range("Read", offset, len)?;
        check_iov_count(iov)?;
        self.start_request(token, ReqKind::Read, offset, len, iov);
        Ok(())
    }

    /// Queues a write of `iov` to the guest range at `offset`. Same contract as
    /// [`Shard::submit_read`]; read-only images refuse with [`ErrorKind::ReadOnly`].
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length, not written by anyone
    /// else, until the completion for `token` has been returned or the shard has been dropped.
    pub unsafe fn submit_write(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[iovec],
    ) -> Result<(), Error> {
        let len = iov_total_len(iov);
        self.check_token(token)?;
        self.check_writable("Write")?;
        self.check_range("Write", offset, len)?;
        check_iov_count(iov)?;
        self.start_request(token, ReqKind::Write, offset, len, iov);
        Ok(())
    }

    /// Queues a write of zeros over `offset..offset + len`; with `unmap` the clusters may be
    /// deallocated. Afterwards the range reads as zeros, whatever the backing file holds.
    pub fn submit_write_zeroes(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Error> {
        self.check_token(token)?;
        self.check_writable("Write zeroes")?;
        self.check_range("Write zeroes", offset, len)?;
        self.start_request(token, ReqKind::WriteZeroes { unmap }, offset, len, &[]);
        Ok(())
    }

    /// Queues a discard: the range's clusters may be deallocated (without exposing backing
    /// data); partly covered clusters are left as they are.
    pub fn submit_discard(&mut self, token: u64, offset: u64, len: u64) -> Result<(), Error> {
        self.check_token(token)?;
        self.check_writable("Discard")?;
        self.check_range("Discard", offset, len)?;
        self.start_request(token, ReqKind::Discard, offset, len, &[]);
        Ok(())
    }

    /// Queues a flush: completes when every write completed before it is durable.
    pub fn submit_flush(&mut self, token: u64) -> Result<(), Error> {
        self.check_token(token)?;
        if let Some(group) = self.st.group.take() {
            self.st.start_group_flush(&group, token);
            self.st.group = Some(group);
            return Ok(());
        }
        self.local_flush(token)
    }

    /// Queues a flush of what this shard alone holds.
    fn local_flush(&mut self, token: u64) -> Result<(), Error> {
        if self.image.writable.is_none() {
            // Nothing is ever written: nothing to make durable.
            self.st.finished.push(Completion {
                token,
                result: Ok(()),
            });
            return Ok(());
        }
        self.st.flush.enqueue(token);
        Ok(())
    }

    /// Reaps kernel completions, plans every ready part, submits the new I/O with one
    /// `io_uring_enter`, and appends finished requests to `out`. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<Completion>) {
        self.ring.drain_eventfd();
        loop {
            self.turn();
            if let Err(e) = self.ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
                break;
            }
            // Reads served from the page cache complete during the submit: finish them in
            // this call rather than after another wake-up.
            if !self.ring.has_completions()
                && self.st.ready.is_empty()
                && !self.ring.has_unsubmitted()
                && !self.st.has_mail()
            {
                break;
            }
        }
        if self.st.to_wake != 0 {
            if let Some(group) = &self.st.group {
                let mut bits = std::mem::take(&mut self.st.to_wake);
                while bits != 0 {
                    group.wake(bits.trailing_zeros() as usize);
                    bits &= bits - 1;
                }
            }
        }
        out.append(&mut self.st.finished);
    }

    /// Like [`Shard::poll`], but blocks until at least one completion has been appended, or
    /// returns at once when nothing is in flight.
    pub fn wait(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        loop {
            self.poll(out);
            if out.len() > before || (self.in_flight() == 0 && self.st.ops_in_kernel == 0) {
                return;
            }
            if self.st.group.is_some() {
                // Other shards answer through the eventfd, not through this ring.
                if let Err(e) = self.ring.submit().and_then(|()| self.ring.wait_eventfd()) {
                    tracing::error!("io_uring wait failed: {e}");
                    return;
                }
            } else if let Err(e) = self.ring.submit_and_wait() {
                tracing::error!("io_uring wait failed: {e}");
                return;
            }
        }
    }

    /// Waits until every request submitted so far has completed, appending them to `out`. In
    /// a group, pieces served by other shards only complete while those shards are polled.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        while self.in_flight() > 0 || self.st.ops_in_kernel > 0 {
            let before = out.len();
            self.wait(out);
            if out.len() == before
                && self.st.ops_in_kernel == 0
                && self.st.ready.is_empty()
                && self.st.remote_pieces == 0
            {
                break;
            }
        }
    }

    /// Flushes and waits: for shutdown. Completions drained meanwhile are discarded; the
    /// tokens `u64::MAX - 2 ..= u64::MAX` are reserved for this and the other blocking helpers.
    pub fn flush_blocking(&mut self) -> Result<(), Error> {
        const TOKEN: u64 = u64::MAX - 1;
        let mut out = Vec::new();
        self.drain(&mut out);
        // Only this shard's metadata: at shutdown every shard of a group flushes itself.
        self.local_flush(TOKEN)?;
        let mut result = Ok(());
        loop {
            let before = out.len();
            self.wait(&mut out);
            if let Some(c) = out[before..].iter().find(|c| c.token == TOKEN) {
                result = c.result;
                break;
            }
            if out.len() == before && self.in_flight() == 0 {
                break;
            }
        }
        result.map_err(|e| Error::with_source(ErrorKind::Io, "Flush failed", e))
    }

    /// Gives the clusters this shard reserved but did not use back to the image (for a clean
    /// close, after [`Shard::flush_blocking`]).
    pub fn release_reserved(&mut self) {
        let Some(w) = &self.image.writable else {
            return;
        };
        let cs = self.image.cluster_size();
        for r in [&mut self.st.reserved, &mut self.st.spare] {
            if r.remaining == 0 {
                continue;
            }
            let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = rc.adjust_range(r.next, r.remaining * cs, -1) {
                tracing::warn!("Cannot release reserved clusters: {e}");
            }
            r.remaining = 0;
        }
    }

    /// Test hook: submits the in-place writes held back by
    /// [`ShardConfig::hold_data_writes`] (call [`Shard::poll`] afterwards).
    #[doc(hidden)]
    pub fn release_held_writes(&mut self) {
        self.st.release_held_writes(&mut self.ring);
    }

    /// Writes `buf` at `offset` and waits for it.
    pub(crate) fn write_blocking(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let iov = [iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        const TOKEN: u64 = u64::MAX - 2;
        // SAFETY: `buf` is borrowed for this whole call and we drain below until the request
        // has completed; the kernel only reads from it.
        unsafe { self.submit_write(TOKEN, offset, &iov)? };
        let mut out = Vec::new();
        self.drain(&mut out);
        match out.iter().find(|c| c.token == TOKEN) {
            Some(c) => c.result.map_err(|e| {
                Error::with_source(
                    ErrorKind::Io,
                    format!("Write of {} bytes at {offset:#x} failed", buf.len()),
                    e,
                )
            }),
            None => Err(Error::new(ErrorKind::Io, "Write lost by the shard")),
        }
    }

    /// Reads `buf.len()` bytes at `offset` and waits for them.
    pub(crate) fn read_blocking(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let iov = [iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        const TOKEN: u64 = u64::MAX;
        // SAFETY: `buf` is borrowed mutably for this whole call and we wait below until the
        // request's completion has been returned; if waiting fails, the shard (a local of the
        // caller) is dropped before `buf`'s borrow ends, and Drop waits for the kernel.
        unsafe { self.submit_read(TOKEN, offset, &iov)? };
        let mut out = Vec::with_capacity(1);
        loop {
            self.wait(&mut out);
            if !out.is_empty() {
                break;
            }
            if self.in_flight() == 0 {
                return Err(Error::new(ErrorKind::Io, "Read lost by the shard"));
            }
        }
        out[0].result.map_err(|e| {
            let kind = match e {
                IoError::Os { .. } => ErrorKind::Io,
                IoError::Corrupt { .. } | IoError::BadCompressedCluster { .. } => {
                    ErrorKind::Corrupt
                }
                IoError::ReadOnly => ErrorKind::ReadOnly,
            };
            Error::with_source(
                kind,
                format!("Read of {} bytes at {offset:#x} failed", buf.len()),
                e,
            )
        })
    }

    /// One pass: handle every available completion, then plan every ready part, then start a
    /// flush if one is due.
    fn turn(&mut self) {
        let Shard { ring, st, image } = self;
        let img = &**image;
        st.cqes.clear();
        ring.reap_into(&mut st.cqes);
        for i in 0..st.cqes.len() {
            let (op, res) = st.cqes[i];
            st.ops_in_kernel -= 1;
            st.complete_op(ring, img, op as u32, res);
        }
        if !st.frees.draining.is_empty() && st.frees.live[1 - st.frees.current] == 0 {
            st.apply_frees(img);
        }
        st.receive();
        loop {
            while let Some(p) = st.ready.pop_front() {
                st.plan(ring, img, p);
            }
            if st.cow_ready.is_empty() {
                break;
            }
            st.run_cow_ready(ring, img);
        }
        st.report_corruption(img);
        // A flush first: it waits for refcount writes in flight, and starting new ones first
        // could keep it waiting for as long as clusters are being allocated.
        st.maybe_start_flush(ring, img);
        st.start_refcount_writes(ring, img);
        st.report_corruption(img);
        st.route_finished();
    }
}

fn check_iov_count(iov: &[iovec]) -> Result<(), Error> {
    if iov.len() > MAX_IOVECS {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("Request with {} segments (at most {MAX_IOVECS})", iov.len()),
        ));
    }
    Ok(())
}

impl Drop for Shard {
    fn drop(&mut self) {
        if self.image.writable.is_some()
            && (!self.st.pending_frees.is_empty()
                || !self.st.frees.due.is_empty()
                || !self.st.frees.draining.is_empty()
                || !self.st.dirty_l1.is_empty()
                || self.st.reserved.remaining > 0
                || self.st.spare.remaining > 0
                || self.st.reqs.live() > 0)
        {
            tracing::warn!(
                "A writable shard is dropped without flush_blocking() and release_reserved(): \
                 writes since the last flush are lost and reserved clusters leak"
            );
        }
        // The kernel may still write into caller memory and our buffers: wait until it is done.
        while self.st.ops_in_kernel > 0 {
            if let Err(e) = self.ring.submit_and_wait() {
                tracing::error!(
                    "io_uring failed while draining {} operations: {e}; leaking their buffers",
                    self.st.ops_in_kernel
                );
                std::mem::forget(std::mem::take(&mut self.st.layers));
                std::mem::forget(std::mem::replace(&mut self.st.ops, Slab::with_capacity(0)));
                return;
            }
            self.st.cqes.clear();
            self.ring.reap_into(&mut self.st.cqes);
            self.st.ops_in_kernel -= self.st.cqes.len();
        }
        if let Some(w) = &self.image.writable {
            // A shard dropped with its refcount writes in flight (their completions are not
            // handled here) still gives the right back.
            if w.writes_blocks(self.st.index) {
                w.end_block_writes(self.st.index);
            }
        }
        // Other shards may still be serving pieces of our requests, in the caller's memory:
        // wait for their answers (the daemon drives every shard until idle before dropping
        // any, so this only waits when something went wrong). Pieces they send meanwhile are
        // answered with an error, so that they do not wait for this shard either.
        let Some(group) = self.st.group.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            group.looking(self.st.index);
            while let Some(msg) = group.receive(self.st.index) {
                let (from, req) = match msg {
                    Msg::Done { .. } => {
                        self.st.remote_pieces -= 1;
                        continue;
                    }
                    Msg::Part { from, req, .. } | Msg::Flush { from, req } => (from, req),
                };
                let result = Err(IoError::Os { errno: libc::EIO });
                group.send(usize::from(from), Msg::Done { req, result });
                group.wake(usize::from(from));
            }
            if self.st.remote_pieces == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                tracing::error!(
                    "A shard is dropped while {} pieces of its requests are still served by \
                     other shards",
                    self.st.remote_pieces
                );
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        group.close(self.st.index);
    }
}

impl State {
    /// Marks the image corrupt for what this turn found (a write refused by the overlap
    /// checks, metadata that does not decode).
    fn report_corruption(&mut self, img: &ImageInner) {
        let Some(w) = &img.writable else {
            return;
        };
        if let Some(why) = self.pending_corrupt.take() {
            w.mark_corrupt(&img.top, why);
        }
        if let Some(hit) = self.pending_overlap.take() {
            w.overlap_found(&img.top, &hit);
        }
    }

    /// Starts a request of `len` (> 0) bytes at `offset` as one ready part; `parent` is the
    /// allocation an internal copy-on-write read belongs to, or `NO_ID`.
    fn start_request(
        &mut self,
        token: u64,
        kind: ReqKind,
        parent: u32,
        offset: u64,
        len: u64,
        iov: &[iovec],
    ) {
        let r = self.new_req(token, kind, parent, iov, true);
        self.new_part(r, offset, len, 0);
    }

    /// Takes a request entry and sets it up, with no pieces yet.
    fn new_req(
        &mut self,
        token: u64,
        kind: ReqKind,
        parent: u32,
        iov: &[iovec],
        has_local: bool,
    ) -> u32 {
        let r = self.reqs.alloc();
        let req = &mut self.reqs[r];
        req.token = token;
        req.kind = kind;
        req.iov.clear();
        req.iov.extend_from_slice(iov);
        req.error = None;
        req.parent = parent;
        req.has_local = has_local;
        req.writethrough = self.writethrough;
        req.pending = 0;
        r
    }

    /// Adds a ready part of request `req` at layer 0: `len` bytes at `guest_off`, at `skip`
    /// within the request's iovecs.
    fn new_part(&mut self, req: u32, guest_off: u64, len: u64, skip: u64) {
        self.reqs[req].pending += 1;
        let p = self.parts.alloc();
        self.parts[p] = Part {
            req,
            layer: 0,
            guest_off,
            len,
            skip,
            next: NO_ID,
            tag: 0,
        };
        self.ready.push_back(p);
    }

    /// Splits part `pid` at `at` bytes; the tail becomes a new ready part.
    fn split(&mut self, pid: u32, at: u64) {
        let p = self.parts[pid];
        debug_assert!(at > 0 && at < p.len);
        let t = self.parts.alloc();
        self.parts[t] = Part {
            guest_off: p.guest_off + at,
            len: p.len - at,
            skip: p.skip + at,
            next: NO_ID,
            ..p
        };
        self.parts[pid].len = at;
        self.reqs[p.req].pending += 1;
        self.ready.push_back(t);
    }

    fn finish_part(&mut self, pid: u32, result: Result<(), IoError>) {
        let p = self.parts[pid];
        if p.tag != 0
            && self
                .group
                .as_ref()
                .is_some_and(|g| g.version(p.guest_off / self.l2_cover) != p.tag)
        {
            // Planned with a copy of another shard's table that changed meanwhile: what it
            // read may be stale (even from a cluster freed and reused since). Its owner
            // serves it again.
            return self.forward_part(pid);
        }
        let req_id = self.parts[pid].req;
        self.parts.free(pid);
        self.piece_done(req_id, result);
    }

    /// One piece (a part of this shard, or a piece another shard served) of request `req_id`
    /// is done; completes the request after its last.
    fn piece_done(&mut self, req_id: u32, result: Result<(), IoError>) {
        let req = &mut self.reqs[req_id];
        if let Err(e) = result {
            req.error.get_or_insert(e);
        }
        req.pending -= 1;
        if req.pending > 0 {
            return;
        }
        let result = req.error.map_or(Ok(()), Err);
        let (token, kind, parent) = (req.token, req.kind, req.parent);
        let (has_local, writethrough) = (req.has_local, req.writethrough);
        self.reqs.free(req_id);
        if parent != NO_ID {
            self.cow_read_done(parent, result);
        } else if !has_local {
            self.finished.push(Completion { token, result });
        } else if kind.is_write() && writethrough && result.is_ok() {
            self.flush.enqueue(token);
        } else if kind.is_write() && result.is_ok() && self.metadata_unwritten() {
            // Write-back: the write completes once the metadata it changed is in the file
            // (not yet durable), so that losing this process loses nothing it acknowledged.
            self.flush.enqueue_writeback(token);
        } else {
            self.finished.push(Completion { token, result });
        }
    }

    fn fail_waiters(&mut self, mut list: WaitList, err: IoError) {
        while list.head != NO_ID {
            let next = self.parts[list.head].next;
            self.finish_part(list.head, Err(err));
            list.head = next;
        }
    }

    /// Makes every part of `list` ready to be planned again.
    fn wake_waiters(&mut self, mut list: WaitList) {
        while list.head != NO_ID {
            let next = self.parts[list.head].next;
            self.ready.push_back(list.head);
            list.head = next;
        }
    }

    /// Appends part `pid` to a wait list.
    fn enqueue_waiter(parts: &mut Slab<Part>, list: &mut WaitList, pid: u32) {
        parts[pid].next = NO_ID;
        if list.tail == NO_ID {
            list.head = pid;
        } else {
            parts[list.tail].next = pid;
        }
        list.tail = pid;
    }

    /// Pushes `entry` for operation `op`; on failure the operation is freed and its error
    /// returned.
    ///
    /// # Safety
    /// The buffers `entry` points to must stay valid until the operation's completion.
    unsafe fn push(
        &mut self,
        ring: &mut Ring,
        op: u32,
        entry: io_uring::squeue::Entry,
    ) -> Result<(), IoError> {
        // SAFETY: forwarded from the caller.
        match unsafe { ring.push(&entry.user_data(u64::from(op))) } {
            Ok(()) => {
                self.ops_in_kernel += 1;
                Ok(())
            }
            Err(e) => {
                self.free_op(op);
                Err(os_error(&e))
            }
        }
    }

    fn free_op(&mut self, op: u32) {
        let o = &mut self.ops[op];
        o.kind = OpKind::Idle;
        o.bounce = None;
        if o.epoch != 0 {
            self.frees.live[usize::from(o.epoch - 1)] -= 1;
            o.epoch = 0;
        }
        let charge = std::mem::take(&mut o.scratch_charge);
        let scratch = o.scratch.take();
        if let Some(buf) = o.buf.take() {
            self.recycle(buf);
        }
        if let Some(buf) = scratch {
            self.recycle(buf);
        }
        self.ops.free(op);
        if charge > 0 {
            self.scratch_bytes -= charge;
            self.wake_scratch_waiters();
        }
    }

    /// Takes `charge` bytes of scratch for operation `op`.
    fn charge_scratch(&mut self, op: u32, charge: usize) {
        self.ops[op].scratch_charge += charge;
        self.scratch_bytes += charge;
        self.scratch_peak = self.scratch_peak.max(self.scratch_bytes);
    }

    /// Makes ready as many of the parts waiting for scratch, oldest first, as the scratch
    /// given back can serve.
    fn wake_scratch_waiters(&mut self) {
        let mut room = self.scratch_limit.saturating_sub(self.scratch_bytes);
        let mut first = self.scratch_bytes == 0;
        while self.scratch_waiters.head != NO_ID && (first || room >= self.scratch_need) {
            first = false;
            room = room.saturating_sub(self.scratch_need);
            let pid = self.scratch_waiters.head;
            self.scratch_waiters.head = self.parts[pid].next;
            if self.scratch_waiters.head == NO_ID {
                self.scratch_waiters.tail = NO_ID;
            }
            self.ready.push_back(pid);
        }
    }

    /// Returns a compressed-extent or cluster buffer to its pool (other sizes are dropped).
    fn recycle(&mut self, buf: Box<[u8]>) {
        let pool = if buf.len() == self.big_buf_bytes {
            &mut self.big_bufs
        } else if buf.len() == self.cluster_buf_bytes {
            &mut self.cluster_bufs
        } else {
            return;
        };
        if pool.is_empty() || (pool.len() + 1) * buf.len() <= MAX_POOLED_BYTES {
            pool.push(buf);
        }
    }

    /// Plans part `pid`: reads by the read planner, the rest by the write planner.
    fn plan(&mut self, ring: &mut Ring, img: &ImageInner, pid: u32) {
        let kind = self.reqs[self.parts[pid].req].kind;
        if kind.is_write() {
            self.plan_write(ring, img, pid, kind);
        } else {
            self.plan_read(ring, img, pid);
        }
    }

    /// Handles the completion of operation `op` with result `res`.
    fn complete_op(&mut self, ring: &mut Ring, img: &ImageInner, op: u32, res: i32) {
        match self.ops[op].kind {
            OpKind::Idle => unreachable!("completion for idle op {op}"),
            OpKind::Data { .. } => self.complete_data(ring, op, res),
            OpKind::L2Load { .. } => self.complete_l2_load(ring, img, op, res),
            OpKind::Compressed { .. } => self.complete_compressed(ring, img, op, res),
            OpKind::Inflating { .. } => self.complete_inflating(ring, img, op, res),
            OpKind::AllocWrite { alloc } => {
                self.free_op(op);
                self.alloc_written(img, alloc, res);
            }
            OpKind::RefcountWrite => {
                self.free_op(op);
                self.refcount_write_done(img, res);
            }
            OpKind::Flush { injected } => {
                self.free_op(op);
                self.flush_op_done(ring, img, if injected { -libc::EIO } else { res });
            }
            OpKind::Retry => {
                self.free_op(op);
                self.retry_armed = false;
            }
        }
    }

    /// Wakes this shard again shortly (another shard holds something this one waits for).
    fn retry_later(&mut self, ring: &mut Ring) {
        if self.retry_armed {
            return;
        }
        let entry = io_uring::opcode::Timeout::new(&RETRY_AFTER).build();
        let op = self.ops.alloc();
        self.ops[op].kind = OpKind::Retry;
        // SAFETY: the timeout points at a static.
        match unsafe { self.push(ring, op, entry) } {
            Ok(()) => self.retry_armed = true,
            Err(e) => tracing::error!("Cannot arm a retry timeout: {e}"),
        }
    }
}
