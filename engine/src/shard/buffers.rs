//! A shard's buffers: the pools of compressed-extent buffers (two clusters of the largest
//! layer) and cluster buffers (one cluster of the top image) that operations and allocations
//! borrow and give back, the cluster of zeros writes of zeros point at, and the scratch
//! budget that compressed reads in flight hold their buffers within.
//!
//! Owned by one shard and used only on its thread.

use crate::io::{AlignedBuf, SAFE_DIO_ALIGN};
use crate::meta::WaitList;

/// Bytes of compressed-extent and of cluster buffers kept for reuse (per kind, at least one
/// buffer); more are freed after use.
const MAX_POOLED_BYTES: usize = 4 << 20;

/// See the module documentation.
pub(super) struct Buffers {
    extents: Vec<Box<[u8]>>,
    extent_bytes: usize,
    clusters: Vec<Box<[u8]>>,
    cluster_bytes: usize,
    /// One cluster of zeros (none for a read-only image), aligned for direct writes.
    pub(super) zeros: AlignedBuf,
}

impl Buffers {
    /// Empty pools of `extent_bytes` and `cluster_bytes` buffers, and `zeros_bytes` of zeros.
    pub(super) fn new(extent_bytes: usize, cluster_bytes: usize, zeros_bytes: usize) -> Buffers {
        Buffers {
            extents: Vec::new(),
            extent_bytes,
            clusters: Vec::new(),
            cluster_bytes,
            zeros: AlignedBuf::zeroed(zeros_bytes, SAFE_DIO_ALIGN as usize),
        }
    }

    /// A buffer for a compressed extent (of whatever content).
    pub(super) fn extent(&mut self) -> Box<[u8]> {
        let bytes = self.extent_bytes;
        self.extents
            .pop()
            .unwrap_or_else(|| vec![0u8; bytes].into_boxed_slice())
    }

    /// A buffer of one cluster of the top image (of whatever content).
    pub(super) fn cluster(&mut self) -> Box<[u8]> {
        let bytes = self.cluster_bytes;
        self.clusters
            .pop()
            .unwrap_or_else(|| vec![0u8; bytes].into_boxed_slice())
    }

    /// A pooled cluster buffer, when clusters of `cluster_bytes` are the pool's size (a
    /// backing file's clusters may be larger than the top image's).
    pub(super) fn pooled_cluster(&mut self, cluster_bytes: usize) -> Option<Box<[u8]>> {
        (cluster_bytes == self.cluster_bytes)
            .then(|| self.clusters.pop())
            .flatten()
    }

    /// Bytes of a cluster of the top image.
    pub(super) fn cluster_bytes(&self) -> usize {
        self.cluster_bytes
    }

    /// Returns a compressed-extent or cluster buffer to its pool (other sizes are dropped).
    pub(super) fn recycle(&mut self, buf: Box<[u8]>) {
        let pool = if buf.len() == self.extent_bytes {
            &mut self.extents
        } else if buf.len() == self.cluster_bytes {
            &mut self.clusters
        } else {
            return;
        };
        if pool.is_empty() || (pool.len() + 1) * buf.len() <= MAX_POOLED_BYTES {
            pool.push(buf);
        }
    }
}

/// Scratch held by compressed reads in flight (their extent and prefix buffers), its limit,
/// the most one read takes, the highest it has been, and the parts waiting for some to be
/// given back.
pub(super) struct Scratch {
    pub(super) bytes: usize,
    pub(super) limit: usize,
    pub(super) need: usize,
    pub(super) peak: usize,
    pub(super) waiters: WaitList,
}

impl Scratch {
    /// None held yet, at most `limit` bytes, `need` for one read.
    pub(super) fn new(limit: usize, need: usize) -> Scratch {
        Scratch {
            bytes: 0,
            limit,
            need,
            peak: 0,
            waiters: WaitList::EMPTY,
        }
    }

    /// Whether a new read must wait for scratch to be given back: it would take the shard
    /// past its limit (a read always goes when none is held).
    pub(super) fn full(&self) -> bool {
        self.bytes > 0 && self.bytes + self.need > self.limit
    }
}
