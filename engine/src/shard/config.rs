//! How a shard is set up ([`ShardConfig`]) and what it hands back ([`Completion`]): the
//! public types of the shard's API that its parts are sized from and its requests end in.

use super::write_log::WriteLog;
use crate::error::IoError;
use crate::io::InflateSharing;
use crate::meta::CacheBudget;
use std::sync::Arc;

/// How a shard is set up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard's index, `0..count`.
    pub index: usize,
    /// How many shards serve the image. Several shards of a writable image are made together
    /// by [`Image::new_shards`](crate::Image::new_shards).
    pub count: usize,
    /// Submission queue entries of the shard's io_uring.
    pub ring_entries: u32,
    /// Bytes of decompressed clusters cached, shared by the image's qcow2 layers.
    pub decompressed_cache_bytes: u64,
    /// Budgets shared with other shards that the caches (L2 tables and decompressed
    /// clusters) draw their memory from: shard `index` draws from
    /// `cache_budgets[index % len]`, so that [`Image::new_shards`](crate::Image::new_shards)
    /// can give each shard the budget of the thread that will run it. Each shard is one
    /// member of its budget: its caches may hold the budget's fair share (the limit divided
    /// by the shards drawing from it) whatever the others took, more only while the budget
    /// has room, and give slots back as they miss while the shard holds more than its share
    /// of a budget over its limit. Within a budget each cache keeps its own limit (the
    /// image's L2 cache size, `decompressed_cache_bytes`) and a floor of a few slots per
    /// layer (see [`CacheBudget`]). Empty (the default): no shared budget, each cache grows
    /// to its own limit.
    pub cache_budgets: Vec<CacheBudget>,
    /// Most bytes of scratch buffers that compressed reads in flight may hold together (a
    /// compressed extent's buffer, and a cluster prefix's); a read that would need more waits
    /// for another to give its buffers back. At least what one read needs.
    pub scratch_bytes: u64,
    /// Whether compressed clusters may be inflated by other threads (the process-wide
    /// inflate pool's workers, other shards with nothing to do) when this shard is busy.
    pub inflate: InflateSharing,
    /// Fault injection for tests: every fdatasync of the n-th flush of this shard (counting
    /// from 1) fails with EIO instead of reaching the kernel. `None` in production.
    #[doc(hidden)]
    pub fail_flush_number: Option<u64>,
    /// Fault injection for tests: in-place writes of guest data are held back, as if the
    /// kernel were slow to do them, until `Shard::release_held_writes`. `false` in
    /// production.
    #[doc(hidden)]
    pub hold_data_writes: bool,
    /// Test hook: every metadata write of a flush or write-back (and every durable refcount
    /// write) is recorded here with its bytes, and every sync, in the order submitted (see
    /// [`WriteLog`]). `None` in production.
    #[doc(hidden)]
    pub write_log: Option<Arc<WriteLog>>,
}

impl ShardConfig {
    /// The budget shard `index` draws from (see [`ShardConfig::cache_budgets`]).
    pub(crate) fn cache_budget(&self) -> Option<&CacheBudget> {
        match self.cache_budgets.len() {
            0 => None,
            n => self.cache_budgets.get(self.index % n),
        }
    }
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            index: 0,
            count: 1,
            ring_entries: 256,
            decompressed_cache_bytes: 16 << 20,
            cache_budgets: Vec::new(),
            scratch_bytes: DEFAULT_SCRATCH_BYTES,
            inflate: InflateSharing::Shared,
            fail_flush_number: None,
            hold_data_writes: false,
            write_log: None,
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

/// Default [`ShardConfig::scratch_bytes`]: 85 compressed reads of 64 KiB clusters in flight,
/// 5 of 2 MiB clusters.
pub const DEFAULT_SCRATCH_BYTES: u64 = 16 << 20;
