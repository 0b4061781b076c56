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
//!
//! The shard holds the image's shared state (`crate::shared`), never the front
//! ([`crate::Image`]). Its files are layers, each importing only from files below it
//! (`engine/tests/layers.rs` checks it; ARCHITECTURE.md draws them), top first:
//! - `mod.rs`: [`Shard`], its public API (submission, polling, blocking helpers), its
//!   creation (`new_shards`) and its drop (waiting for the kernel first);
//! - the behaviour, `impl State` blocks across parts: `read.rs` (reads, compressed clusters,
//!   the data I/O) and `write.rs` (writes, write-zeroes, discards, allocating writes); below
//!   them `l2.rs` (L2 tables: lookup, load, copy, create, entries), `flush.rs` (flush and
//!   write-back runs, durable refcount writes, frees), `plan.rs` (a request's way: start,
//!   plan, finish, complete), `dispatch.rs` (pushing, freeing and completing operations),
//!   `allocate.rs` (handing out and reserving clusters), `coordinate.rs` (the shard's side of
//!   its group: cutting, forwarding, answering, table versions);
//! - `state.rs`: the `State` that gathers the parts, and its sizing;
//! - the parts, each with the methods that need only it: `group.rs` (the group, its
//!   messages, the link), `flush_state.rs` (what is unwritten, the flush queues, the run in
//!   progress); `request.rs` (requests, parts, wait lists), `op.rs` (operations and the
//!   buffers they own), `alloc_write.rs` (allocating writes in flight), `config.rs`
//!   ([`ShardConfig`], [`Completion`]); `reserve.rs` (reservations, frees), `inflation.rs`
//!   (the inflater and its jobs), `buffers.rs` (buffer pools, scratch budget),
//!   `write_log.rs` (the test hook's log), `flush_plan.rs` (the flush as planned steps, pure),
//!   `direct.rs` (O_DIRECT bounce buffers), `slab.rs` (arenas and their typed ids).

mod alloc_write;
mod allocate;
mod buffers;
mod config;
mod coordinate;
mod direct;
mod dispatch;
mod flush;
mod flush_plan;
mod flush_state;
mod group;
mod inflation;
mod l2;
mod op;
mod plan;
mod read;
mod request;
mod reserve;
mod slab;
mod state;
mod write;
mod write_log;

use crate::error::{Error, ErrorKind, IoError};
use crate::io::{iov_total_len, Job, Ring, POSTED};

use crate::shared::ImageInner;
pub use config::{Completion, ShardConfig, DEFAULT_SCRATCH_BYTES};
use group::forwarded_parts;
use group::{Group, GroupLink};
use libc::iovec;
use request::ReqKind;
use slab::{OpId, Slab, SlabId};
use state::State;
use std::os::fd::RawFd;
use std::sync::Arc;
pub use write_log::{LoggedStep, WriteLog};

/// Most inflate jobs of other shards one poll runs.
const MAX_STEALS_PER_POLL: usize = 4;
/// Own inflate jobs queued from which finished requests wait for one more job before they
/// go back (see [`Shard::poll_more`]).
const HOLD_FINISHED_FROM_JOBS: usize = 3;
/// Most completions one poll handles and own inflate jobs it runs, together (a completed
/// compressed read may be inflated as it is handled: tens of microseconds each): then it
/// returns, saying that work is left, so that the thread polling it (which may serve other
/// shards, of other images) gets to its other work. A request of a GiB is thousands of
/// clusters.
const MAX_WORK_PER_POLL: usize = 32;
/// Most iovecs one request may carry (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;
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
                s.ring
                    .dup_event_fd()
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
        let st = State::new(inner, config, grouped);
        Ok(Shard { ring, st, image })
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
        let forwarded_in = self.st.group.as_ref().map_or(0, GroupLink::forwarded_in);
        let requests = self.st.requests.reqs.live() + self.st.flush.waiting() - forwarded_in;
        let holds_blocks = self
            .image
            .writable
            .as_ref()
            .is_some_and(|w| w.writes_blocks(self.st.index));
        requests + usize::from(holds_blocks)
    }

    /// Joins the group of shards serving one writable image (`Image::new_shards`).
    pub(crate) fn join(&mut self, group: Arc<Group>) {
        self.st.group = Some(GroupLink::new(group, self.st.index));
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
    /// per layer; a budget shared with other shards ([`ShardConfig::cache_budgets`]) may hold
    /// them to less.
    pub fn cache_capacity_bytes(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(l2, d), l| {
            (
                l2 + l.l2.capacity_bytes(),
                d + l.decompressed.capacity_bytes(),
            )
        })
    }

    /// Bytes the shard's caches hold now (their buffers are allocated as they are first
    /// used), summed over the layers: (L2 tables, decompressed clusters).
    pub fn cache_bytes(&self) -> (u64, u64) {
        self.st.layers.iter().fold((0, 0), |(l2, d), l| {
            (
                l2 + l.l2.allocated_bytes(),
                d + l.decompressed.allocated_bytes(),
            )
        })
    }

    /// The most scratch (compressed-extent and prefix buffers) that this shard's compressed
    /// reads have held at once; at most [`ShardConfig::scratch_bytes`], or what one read needs
    /// when that is more. A compressed read may take its buffers while no other holds any, or
    /// while they fit under the limit; otherwise it waits for a read to give some back.
    pub fn scratch_peak_bytes(&self) -> u64 {
        self.st.scratch.peak as u64
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
        st.start_caller_request(token, kind, offset, len, iov);
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
        if self.st.start_group_flush(token) {
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
    /// `io_uring_enter`, inflates the compressed clusters read meanwhile (those no other
    /// thread took), and appends finished requests to `out`. Finished requests are returned
    /// before another of this shard's inflate jobs is run (after one more when at least
    /// `HOLD_FINISHED_FROM_JOBS` are queued), and at most `MAX_WORK_PER_POLL` completions
    /// and jobs are handled: a poll that returns with jobs of its own left makes the eventfd readable,
    /// so that a caller waiting on it comes back at once. With nothing else to do, it inflates a few clusters of other shards that are
    /// waiting. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<Completion>) {
        if self.poll_more(out) {
            self.ring.signal_eventfd();
        }
    }

    /// Like [`Shard::poll`], but a poll that returns with jobs of its own left says so
    /// (true) instead of making the eventfd readable: a caller that hands the
    /// requests back and then calls `poll` or this again at once saves the trip through its
    /// event loop (a write, a wait and a read of the eventfd per job). A caller that goes
    /// back to waiting instead must call [`Shard::poll`] first, or the jobs wait for
    /// whatever wakes it next.
    pub fn poll_more(&mut self, out: &mut Vec<Completion>) -> bool {
        self.ring.drain_eventfd();
        let mut more = false;
        self.st.inflation.jobs.enter();
        let mut stolen = 0;
        let mut work = 0;
        let mut held = false;
        loop {
            work += self.turn(MAX_WORK_PER_POLL.saturating_sub(work).max(1));
            // Idle workers may take some of the jobs this turn queued.
            self.st.inflation.jobs.offer();
            if let Err(e) = self.ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
                break;
            }
            // Requests that finished go back before the next job of this shard's own (tens of
            // microseconds each): the guest waiting for them sends its next requests
            // meanwhile, which keeps work coming for the other cores. The caller comes back
            // at once for the jobs left (see `poll`).
            //
            // Unless the queue is deep: with at least `HOLD_FINISHED_FROM_JOBS` jobs queued,
            // requests the guest sends now wait behind two jobs or more (one for each core
            // inflating) and there is work for the other cores meanwhile, so handing back
            // now buys nothing and costs a notification (and a wake-up of the guest's
            // thread, which takes a core from an inflation) per request. Those requests go
            // back after one more job, together with any that finish meanwhile: never
            // later than that.
            if !self.st.finished.is_empty() && self.st.inflation.jobs.has_own() {
                if held || self.st.inflation.jobs.own_len() < HOLD_FINISHED_FROM_JOBS {
                    more = true;
                    break;
                }
                held = true;
            }
            // This shard's own jobs, oldest first, one per turn: each may make parts ready.
            if work >= MAX_WORK_PER_POLL
                && (self.st.inflation.jobs.has_own() || self.ring.has_completions())
            {
                more = true;
                break;
            }
            if let Some(job) = self.st.inflation.jobs.pop_own() {
                self.run_own_job(&job);
                work += 1;
                continue;
            }
            // Reads served from the page cache complete during the submit: finish them in
            // this call rather than after another wake-up.
            if !self.ring.has_completions()
                && self.st.requests.ready.is_empty()
                && !self.ring.has_unsubmitted()
                && !self.st.has_mail()
            {
                // Nothing else to do (and nothing finished to hand back first): help a busy
                // shard, a few clusters at most, so that work arriving on this thread's own
                // queues (which it cannot see from here) waits for little.
                // A stolen job's result is posted into its owner's ring through this one,
                // which waits for the post: only with room for it here, so that the post
                // never waits behind this ring's own operations.
                if stolen == MAX_STEALS_PER_POLL
                    || !self.st.finished.is_empty()
                    || !self.ring.has_room()
                {
                    break;
                }
                match self.st.inflation.jobs.steal() {
                    Some(job) => {
                        self.run_stolen_job(&job);
                        stolen += 1;
                    }
                    None => break,
                }
            }
        }
        let requests_in_flight = self.in_flight() > 0;
        self.st.inflation.jobs.leave(requests_in_flight);
        if let Some(link) = &mut self.st.group {
            link.wake_others();
        }
        out.append(&mut self.st.finished);
        more
    }

    /// Like [`Shard::poll`], but blocks until at least one completion has been appended, or
    /// returns at once when nothing is in flight.
    pub fn wait(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        loop {
            let more = self.poll_more(out);
            if out.len() > before || (self.in_flight() == 0 && self.st.ops_in_kernel == 0) {
                if more {
                    self.ring.signal_eventfd();
                }
                return;
            }
            if more {
                // Work of its own left (a poll does a bounded share): no completion to wait
                // for may ever come before it is done.
                continue;
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
                && self.st.requests.ready.is_empty()
                && self
                    .st
                    .group
                    .as_ref()
                    .is_none_or(|g| g.remote_pieces() == 0)
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
        for r in [
            &mut self.st.reservations.reserved,
            &mut self.st.reservations.spare,
        ] {
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

    /// Runs one of this shard's own inflate jobs, taken back from its queue.
    fn run_own_job(&mut self, job: &Job) {
        let Shard { ring, st, image } = self;
        // Its completion will not come through the ring.
        ring.cancel_external_completion();
        st.ops_in_kernel -= 1;
        let result = job.run(&mut st.inflation.inflater);
        // The user data is an operation index (a u32) of this shard.
        let op = OpId::from_index(job.user_data() as u32);
        st.complete_inflating(ring, image, op, result);
    }

    /// Runs another shard's inflate job and posts its result into that shard's ring.
    fn run_stolen_job(&mut self, job: &Job) {
        let result = job.run(&mut self.st.inflation.inflater);
        job.post_result(&mut self.ring, result);
    }

    /// One pass: handle up to `max_completions` available completions, then plan every ready
    /// part, then start a flush if one is due. Returns the completions handled.
    fn turn(&mut self, max_completions: usize) -> usize {
        let Shard { ring, st, image } = self;
        let img = &**image;
        st.cqes.clear();
        ring.reap_at_most(&mut st.cqes, max_completions);
        for i in 0..st.cqes.len() {
            let (op, res) = st.cqes[i];
            if op == POSTED {
                // Only a post whose wait failed (this ring failing) completes here; posting
                // already gave up on it and said why.
                continue;
            }
            st.ops_in_kernel -= 1;
            st.complete_op(ring, img, OpId::from_index(op as u32), res);
        }
        if st.reservations.frees.drained() {
            st.apply_frees(img);
        }
        st.receive();
        loop {
            while let Some(p) = st.requests.ready.pop_front() {
                st.plan(ring, img, p);
            }
            if st.allocations.cow_ready.is_empty() {
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
        st.cqes.len()
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
            && (self.st.reservations.holds_anything()
                || self.st.flush.has_dirty_l1()
                || self.st.requests.reqs.live() > 0)
        {
            tracing::warn!(
                "A writable shard is dropped without flush_blocking() and release_reserved(): \
                 writes since the last flush are lost and reserved clusters leak"
            );
        }
        // Inflate jobs nobody took are dropped undone: nothing will read what they produce.
        for _ in self.st.inflation.jobs.take_all() {
            self.ring.cancel_external_completion();
            self.st.ops_in_kernel -= 1;
        }
        // The kernel, and threads running jobs they stole, may still write into caller memory
        // and our buffers: wait until they are done.
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
            let posted = self.st.cqes.iter().filter(|(op, _)| *op == POSTED).count();
            self.st.ops_in_kernel -= self.st.cqes.len() - posted;
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
        if let Some(link) = self.st.group.take() {
            link.leave();
        }
    }
}
