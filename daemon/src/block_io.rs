//! The seam between the vhost-user-blk worker and the QCOW2 engine.
//!
//! [`BlockIo`] is what a worker thread needs from the thing that performs its I/O: submit reads,
//! writes, write-zeroes, discards and flushes tagged with a token, collect completions, switch
//! between write-back and write-through, make everything durable when a connection ends, and
//! report cache statistics for the metrics.
//! [`EngineIo`] implements it with one engine [`Shard`]. Each `EngineIo` is owned by one worker
//! thread's state (behind that thread's mutex); other threads touch it only through that
//! mutex (a stop's quiesce, a resize), and the thread that tears the connection down finishes
//! it after the connection's worker threads are gone. Tests
//! implement the trait with a synchronous fake.

use std::fmt;
use std::os::fd::RawFd;

use qcow2d_engine::{CacheBudget, Completion, Image, IoError, Shard, ShardConfig};

/// One finished request: its token and whether it succeeded.
pub type Done<E> = (u64, Result<(), E>);

/// Cumulative cache lookups of one I/O engine since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// L2 table lookups served from the cache.
    pub l2_hits: u64,
    /// L2 table lookups that read the table.
    pub l2_misses: u64,
    /// Compressed-cluster reads served from the decompressed-cluster cache.
    pub decompressed_hits: u64,
    /// Compressed-cluster reads that read and inflated the cluster.
    pub decompressed_misses: u64,
}

impl CacheStats {
    /// What was counted between `earlier` and `self` (counters only grow).
    pub fn since(self, earlier: CacheStats) -> CacheStats {
        CacheStats {
            l2_hits: self.l2_hits.saturating_sub(earlier.l2_hits),
            l2_misses: self.l2_misses.saturating_sub(earlier.l2_misses),
            decompressed_hits: self
                .decompressed_hits
                .saturating_sub(earlier.decompressed_hits),
            decompressed_misses: self
                .decompressed_misses
                .saturating_sub(earlier.decompressed_misses),
        }
    }
}

/// Asynchronous block I/O, tagged by caller-chosen tokens.
pub trait BlockIo {
    /// Why a submission was refused.
    type SubmitError: fmt::Display;
    /// Why a submitted request failed.
    type IoError: fmt::Display;

    /// Queues a read of `[offset, offset + total length of iov)` into `iov`.
    ///
    /// `Ok` means exactly one completion with `token` will come out of [`BlockIo::poll`] or
    /// [`BlockIo::wait`].
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of its length until the completion for
    /// `token` has been returned, or until `self` has been dropped.
    unsafe fn submit_read(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[libc::iovec],
    ) -> Result<(), Self::SubmitError>;

    /// Queues a write of `iov` at `offset`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length until the completion for
    /// `token` has been returned, or until `self` has been dropped.
    unsafe fn submit_write(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[libc::iovec],
    ) -> Result<(), Self::SubmitError>;

    /// Queues a write of zeros over `len` bytes at `offset`; with `unmap` the range may be
    /// deallocated. Same completion contract as [`BlockIo::submit_read`].
    fn submit_write_zeroes(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Self::SubmitError>;

    /// Queues a discard of `len` bytes at `offset`. Same completion contract as
    /// [`BlockIo::submit_read`].
    fn submit_discard(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), Self::SubmitError>;

    /// Queues a flush: completes when every write completed before it is durable.
    fn submit_flush(&mut self, token: u64) -> Result<(), Self::SubmitError>;

    /// Write-through (every write durable before it completes) or write-back (durable after
    /// the next flush).
    fn set_writethrough(&mut self, on: bool);

    /// For the end of a connection, once nothing is in flight: makes every completed write and
    /// all metadata durable and gives back what was reserved but not used, so that dropping
    /// `self` loses nothing.
    fn finish(&mut self) -> Result<(), Self::SubmitError>;

    /// Submits queued work and appends finished requests to `out`, without blocking.
    fn poll(&mut self, out: &mut Vec<Done<Self::IoError>>);

    /// Like [`BlockIo::poll`], but may return finished requests with work of its own left
    /// instead of making its completion descriptor readable for that work: it returns true
    /// then, and the caller, once it has handed those requests back, must call `poll` or
    /// this again before it waits for events.
    fn poll_more(&mut self, out: &mut Vec<Done<Self::IoError>>) -> bool {
        self.poll(out);
        false
    }

    /// Like [`BlockIo::poll`] but blocks until at least one request finished (returns at once
    /// when nothing is in flight).
    fn wait(&mut self, out: &mut Vec<Done<Self::IoError>>);

    /// Requests submitted and not yet returned.
    fn in_flight(&self) -> usize;

    /// Cache lookups so far (cheap: called once per turn of the worker's loop).
    fn cache_stats(&self) -> CacheStats {
        CacheStats::default()
    }
}

/// [`BlockIo`] over one engine shard.
pub struct EngineIo {
    /// `None` only while the export is being resized: the worker takes no requests then.
    shard: Option<Shard>,
    completions: Vec<Completion>,
}

impl EngineIo {
    /// Creates the `count` shards of one connection to `image`, one per worker thread, shard
    /// `i` drawing its caches from `cache_budgets[i]` (its worker's core thread's; none when
    /// the list is empty). The shards of a writable image pass each other pieces of requests,
    /// so every one of them must be polled (on its completion eventfd) for any of them to make
    /// progress.
    pub fn for_workers(
        image: &Image,
        count: usize,
        cache_budgets: &[CacheBudget],
    ) -> Result<Vec<Self>, qcow2d_engine::Error> {
        let config = ShardConfig {
            cache_budgets: cache_budgets.to_vec(),
            ..ShardConfig::default()
        };
        Ok(image
            .new_shards(&config, count)?
            .into_iter()
            .map(|shard| EngineIo {
                shard: Some(shard),
                completions: Vec::with_capacity(256),
            })
            .collect())
    }

    /// The eventfd that becomes readable when the shard has completions to reap.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.shard.as_ref().map(Shard::completion_fd)
    }

    /// Gives up the shard, as an `EngineIo` of its own (to flush and drop it: the image is to
    /// be resized). Requests submitted until [`EngineIo::attach`] fail; nothing completes.
    pub fn detach(&mut self) -> EngineIo {
        EngineIo {
            shard: self.shard.take(),
            completions: Vec::new(),
        }
    }

    /// Takes the shard of `other` (made from the resized image).
    pub fn attach(&mut self, other: EngineIo) {
        self.shard = other.shard;
    }

    fn shard(&mut self) -> Result<&mut Shard, qcow2d_engine::Error> {
        self.shard.as_mut().ok_or_else(|| {
            qcow2d_engine::Error::new(
                qcow2d_engine::ErrorKind::Io,
                "The export is being resized: no request is taken now",
            )
        })
    }

    fn move_completions(&mut self, out: &mut Vec<Done<IoError>>) {
        out.extend(self.completions.drain(..).map(|c| (c.token, c.result)));
    }
}

impl BlockIo for EngineIo {
    type SubmitError = qcow2d_engine::Error;
    type IoError = IoError;

    unsafe fn submit_read(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[libc::iovec],
    ) -> Result<(), Self::SubmitError> {
        // SAFETY: the caller guarantees the buffers stay valid for writes until the completion
        // (or until the shard, owned by `self`, is dropped), which is the shard's contract.
        unsafe { self.shard()?.submit_read(token, offset, iov) }
    }

    unsafe fn submit_write(
        &mut self,
        token: u64,
        offset: u64,
        iov: &[libc::iovec],
    ) -> Result<(), Self::SubmitError> {
        // SAFETY: the caller guarantees the buffers stay valid for reads until the completion
        // (or until the shard, owned by `self`, is dropped), which is the shard's contract.
        unsafe { self.shard()?.submit_write(token, offset, iov) }
    }

    fn submit_write_zeroes(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Self::SubmitError> {
        self.shard()?.submit_write_zeroes(token, offset, len, unmap)
    }

    fn submit_discard(
        &mut self,
        token: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), Self::SubmitError> {
        self.shard()?.submit_discard(token, offset, len)
    }

    fn submit_flush(&mut self, token: u64) -> Result<(), Self::SubmitError> {
        self.shard()?.submit_flush(token)
    }

    fn set_writethrough(&mut self, on: bool) {
        if let Some(shard) = &mut self.shard {
            shard.set_writethrough(on);
        }
    }

    fn finish(&mut self) -> Result<(), Self::SubmitError> {
        // flush_blocking drains whatever is still queued first. The reservation goes back even
        // if the flush failed: it only changes in-memory refcounts, and a failed image is never
        // closed (see `Export::close`).
        let Some(shard) = &mut self.shard else {
            return Ok(());
        };
        let flushed = shard.flush_blocking();
        shard.release_reserved();
        flushed
    }

    fn poll(&mut self, out: &mut Vec<Done<IoError>>) {
        if let Some(shard) = &mut self.shard {
            shard.poll(&mut self.completions);
            self.move_completions(out);
        }
    }

    fn poll_more(&mut self, out: &mut Vec<Done<IoError>>) -> bool {
        let Some(shard) = &mut self.shard else {
            return false;
        };
        let more = shard.poll_more(&mut self.completions);
        self.move_completions(out);
        more
    }

    fn wait(&mut self, out: &mut Vec<Done<IoError>>) {
        if let Some(shard) = &mut self.shard {
            shard.wait(&mut self.completions);
            self.move_completions(out);
        }
    }

    fn in_flight(&self) -> usize {
        self.shard.as_ref().map_or(0, Shard::in_flight)
    }

    fn cache_stats(&self) -> CacheStats {
        let Some(shard) = &self.shard else {
            return CacheStats::default();
        };
        let (l2_hits, l2_misses) = shard.l2_cache_stats();
        let (decompressed_hits, decompressed_misses) = shard.decompressed_cache_stats();
        CacheStats {
            l2_hits,
            l2_misses,
            decompressed_hits,
            decompressed_misses,
        }
    }
}
