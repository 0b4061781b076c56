//! Operations: one io_uring submission each (an L2-table load, guest data, a compressed extent,
//! an allocation's write, a flush's write or sync, a refcount-block write, a retry timeout)
//! and the buffers it holds until its completion. Pushing, freeing and the dispatch of
//! completions are `dispatch.rs`.
//!
//! Runs on the shard's thread. Every buffer an operation hands the kernel (or an inflate
//! job) is owned by its kind ([`OpKind`]: each variant holds exactly the buffers it needs),
//! in its arena entry, which is freed only once the completion is reaped.

use super::slab::{AllocId, PartId};
use crate::io::sqe::Timespec;
use crate::io::{AlignedBuf, DataFd};
use libc::iovec;
use std::os::fd::RawFd;

/// Where the bytes of a data operation come from or go to.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Buffer {
    /// The part's range of its request's iovecs.
    #[default]
    Request,
    /// The shard's zero buffer (writes of zeros).
    Zeros,
}

/// What a data operation reads or writes: one part's range at a host offset, from or into
/// its request's memory (or the zero buffer), `done` bytes of it so far.
#[derive(Clone, Copy)]
pub(super) struct DataIo {
    pub(super) part: PartId,
    pub(super) fd: DataFd,
    pub(super) host: u64,
    pub(super) done: u64,
    pub(super) write: bool,
    pub(super) buffer: Buffer,
}

/// An operation's kind, with the buffers it hands the kernel (or an inflate job): each
/// variant owns exactly what it needs, and they go back to the shard's pools when the
/// operation is freed.
#[derive(Default)]
pub(super) enum OpKind {
    #[default]
    Idle,
    L2Load {
        layer: u16,
        slot: u32,
        host: u64,
        /// The table's L1 index.
        key: u64,
    },
    /// Guest data read into, or written from, the request (or zeros) for one part, through
    /// the op's iovecs.
    Data {
        io: DataIo,
        /// Aligned copy of a direct write's misaligned memory (see `direct.rs`).
        bounce: Option<AlignedBuf>,
    },
    /// The read of a compressed extent into `extent`.
    Compressed {
        layer: u16,
        target: Target,
        fd: RawFd,
        host: u64,
        want: u64,
        got: u64,
        extent: Box<[u8]>,
    },
    /// A compressed extent waiting to be inflated on the shard's inflate queue, or being
    /// inflated by a thief.
    Inflating {
        layer: u16,
        target: Target,
        host: u64,
        extent: Box<[u8]>,
    },
    /// The write of an allocation's new cluster, through the op's iovecs.
    AllocWrite {
        alloc: AllocId,
        /// Aligned copy of a direct write's misaligned memory (see `direct.rs`).
        bounce: Option<AlignedBuf>,
    },
    /// A metadata write of the flush in progress.
    FlushWrite { bytes: Box<[u8]> },
    /// A sync of the flush in progress (`injected`: replaced by a no-op that must be
    /// reported as failed).
    FlushSync { injected: bool },
    /// A durable (RWF_DSYNC) write of a refcount block of new reservations.
    RefcountWrite { bytes: Box<[u8]> },
    /// A short timeout: another shard holds the right to write refcount blocks; try again.
    Retry,
}

/// How long a shard waits before trying again to write refcount blocks that another shard
/// is writing.
pub(super) static RETRY_AFTER: Timespec = Timespec::new().nsec(50_000);

/// Where a compressed cluster is inflated to (which, when it fails, [`InflateTarget`] names).
pub(super) enum Target {
    /// A decompressed-cache slot of the op's layer; the parts waiting on it copy from it.
    Slot(u32),
    /// Straight into the guest memory of this part, which covers the whole cluster with one
    /// segment (`seg`); nothing is cached (`read.rs` says why).
    Part { part: PartId, seg: iovec },
    /// Only the start of the cluster up to the end of this part, into `scratch` (a cluster
    /// buffer, or the bytes inflated), from which the part is copied; nothing is cached
    /// (`read.rs` says why).
    Prefix { part: PartId, scratch: Box<[u8]> },
}

impl Target {
    /// Which slot or part the target is.
    pub(super) fn id(&self) -> InflateTarget {
        match *self {
            Target::Slot(slot) => InflateTarget::Slot(slot),
            Target::Part { part, .. } => InflateTarget::Part(part),
            Target::Prefix { part, .. } => InflateTarget::Prefix(part),
        }
    }
}

/// Which slot or part a compressed cluster is inflated for (a [`Target`] without its
/// memory).
#[derive(Clone, Copy)]
pub(super) enum InflateTarget {
    Slot(u32),
    Part(PartId),
    Prefix(PartId),
}

#[derive(Default)]
pub(super) struct Op {
    pub(super) kind: OpKind,
    /// The iovec array of a data operation or an allocation's write (kept, with its
    /// capacity, when the entry is reused).
    pub(super) iov: Vec<iovec>,
    /// A data operation on a host cluster holds its epoch (1 or 2; 0: none) until it is
    /// freed, so that no cluster is freed under it (see [`Frees`]).
    pub(super) epoch: u8,
    /// Bytes of the op's extent and prefix buffers counted in the shard's scratch in use.
    pub(super) scratch_charge: usize,
}
