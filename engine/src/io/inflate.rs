//! Inflating compressed clusters on every core: one process-wide pool of inflate workers
//! that steal from the shards' own queues.
//!
//! Inflating a 64 KiB cluster costs tens of microseconds, far more than anything else a read
//! does. A shard that has read a compressed extent makes it a [`Job`] (the extent, where the
//! cluster goes, and which ring and operation its result belongs to) and pushes it onto its
//! own deque ([`InflateQueue`], crossbeam's work-stealing deque). At the end of its turn the
//! shard inflates its own jobs itself, oldest first, handing the requests that finished
//! back before each next one; meanwhile the pool's workers and other shards with nothing
//! to do may steal from the same end. Oldest first for everyone: new requests come in
//! between the owner's jobs, and with the newest first an old job could wait as long as
//! new ones kept coming. A job run by its own shard completes
//! there and then; a stolen one is posted as a completion into the owner's io_uring
//! (`IORING_OP_MSG_RING`), so it arrives like any other completion: the owner's eventfd
//! fires and a shard blocked waiting for its ring wakes up.
//!
//! Handing a cluster to another thread costs a wake-up and a completion posted across rings,
//! which measured more than it spread when every cluster went to a worker. So a shard only
//! wakes a worker when it has at least two jobs queued (one for itself, one to give away), a
//! worker is asleep, and fewer engine threads are busy than the process has CPUs: busy
//! shards (those that have queued a job, while they poll and for as long as they have
//! requests in flight) and awake workers are counted in one atomic. A shard that never reads a compressed cluster never touches the pool.
//!
//! The pool is process-wide ([`start_inflate_pool`]): a daemon with many exports has at most
//! one worker per CPU, minus one (the shard that queued the work is busy itself), whatever
//! the number of images, exports or shards.
//!
//! A cluster goes either into a decompressed-cache slot (engine memory), or the start of one
//! into a prefix buffer, or, when a read covers the whole cluster with one segment of guest
//! memory, straight into that guest memory ([`Output::Guest`]), whoever runs the job. Guest
//! memory is shared with a guest that may change it while we inflate: [`ClusterInflater`]
//! writes only inside the segment and never makes a decision on what it finds there.
//! libdeflate gets the segment as a raw pointer (no Rust reference to memory another process
//! writes); its match copies read back earlier output, but a changed byte only changes which
//! bytes land in the segment, never where they go. Streams libdeflate refuses (no final
//! block, longer than a cluster) and zstd streams are decoded into the inflater's own scratch
//! cluster and copied: the rare paths keep one copy. Tests:
//! `tests::guest_changing_its_memory_meanwhile` (a thread scribbling over the segment, guard
//! bytes around it), `tests::stolen_jobs_complete_on_their_owners_ring` and
//! `engine/tests/compressed_reads.rs` (inline, shared and handed-off jobs give the same
//! bytes).
//!
//! Threads: the workers (`qcow2d-inflate-N`) run [`worker`]; everything else here runs on the
//! shard thread that owns the queue.

use crate::format::{CompressionType, InflateError, Inflater};
use crossbeam::deque::{Steal, Stealer, Worker};
use crossbeam::sync::{Parker, Unparker};
use io_uring::{opcode, types, IoUring};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Where an inflated cluster goes.
#[derive(Clone, Copy, Debug)]
pub enum Output {
    /// Engine memory (a cache slot) that nobody else reads or writes meanwhile.
    Engine {
        /// First byte.
        ptr: *mut u8,
        /// Bytes: one cluster.
        len: usize,
    },
    /// Guest memory: written only, never read back as trusted; the guest may change it while
    /// we write.
    Guest {
        /// First byte.
        ptr: *mut u8,
        /// Bytes: one cluster.
        len: usize,
    },
    /// Engine memory that nobody else reads or writes meanwhile, for only the first `len`
    /// bytes of a deflate cluster ([`Inflater::inflate_deflate_prefix`]).
    Prefix {
        /// First byte.
        ptr: *mut u8,
        /// Bytes: at most one cluster.
        len: usize,
    },
}

/// One cluster to inflate, and the ring and operation its result belongs to.
pub struct Job {
    kind: CompressionType,
    input: *const u8,
    input_len: usize,
    out: Output,
    ring_fd: RawFd,
    user_data: u64,
}

// SAFETY: a job's pointers refer to buffers its submitter keeps valid until the completion
// for `user_data` has been reaped from `ring_fd` (or the job was taken back by its owner): the
// input unchanged, engine and prefix output untouched by anyone else, guest output valid for
// writes (the `Job::new` contract), so whichever thread runs the job may use them meanwhile.
unsafe impl Send for Job {}

/// Result code of a job whose stream did not inflate to a full cluster.
pub const INFLATE_FAILED: i32 = -libc::EBADMSG;

impl Job {
    /// A job that inflates `input` into `out`, its result going to the ring `ring_fd` as a
    /// completion with `user_data` (result 0 or [`INFLATE_FAILED`]) when another thread runs
    /// it.
    ///
    /// # Safety
    /// `input` must stay valid and unchanged, and `out` valid for writes (and, for
    /// [`Output::Engine`] and [`Output::Prefix`], untouched by anyone else), until the job has
    /// been run by its owner, or until that completion has been reaped from `ring_fd`, which
    /// must stay open until then.
    pub unsafe fn new(
        kind: CompressionType,
        input: &[u8],
        out: Output,
        ring_fd: RawFd,
        user_data: u64,
    ) -> Job {
        Job {
            kind,
            input: input.as_ptr(),
            input_len: input.len(),
            out,
            ring_fd,
            user_data,
        }
    }

    /// The operation the job's result belongs to.
    pub fn user_data(&self) -> u64 {
        self.user_data
    }

    /// The ring the result of a stolen job is posted to.
    pub fn ring_fd(&self) -> RawFd {
        self.ring_fd
    }

    /// Posts `result`, this job's result, into its owner's ring through `ring`, a shard's
    /// own, trying again while the kernel refuses for a moment ([`deliver`]).
    pub fn post_result(&self, ring: &mut super::Ring, result: i32) {
        deliver("Shard", || {
            ring.post_to(self.ring_fd, result, self.user_data)
        });
    }

    /// Inflates; returns 0 or [`INFLATE_FAILED`].
    pub fn run(&self, inflater: &mut ClusterInflater) -> i32 {
        // SAFETY: the submitter keeps the input alive and unchanged until the job's result has
        // been taken (Job::new contract), which is not before this returns.
        let input = unsafe { std::slice::from_raw_parts(self.input, self.input_len) };
        // SAFETY: the output stays valid for writes, and engine memory untouched by anyone
        // else, until then (Job::new contract).
        match unsafe { inflater.inflate(self.kind, input, self.out) } {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!("Inflate job: {e}");
                INFLATE_FAILED
            }
        }
    }
}

/// How a shard shares its inflate work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InflateSharing {
    /// Jobs go onto the shard's own deque: the shard runs them at the end of its turn, idle
    /// workers (woken when a CPU is free) and idle shards steal them. The default.
    #[default]
    Shared,
    /// The shard inflates every cluster itself, as its compressed read completes, and takes
    /// no jobs from others (no thread hand-offs at all: for fuzzing and comparisons).
    OnShard,
    /// Test hook: every job is left to the pool's workers (woken at once), never run by its
    /// shard, so that the hand-off path is exercised whatever the load. Behaves as `Shared`
    /// when the pool has no worker.
    #[doc(hidden)]
    HandOff,
}

/// How the process-wide pool is set up ([`start_inflate_pool`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct InflatePoolConfig {
    /// Worker threads; `None`: one per CPU this process may run on, minus one (the shard
    /// that queued the work keeps a CPU busy itself), at least one. `Some(0)`: no worker;
    /// shards still take each other's jobs.
    pub threads: Option<usize>,
    /// Called first thing on each worker thread, once its io_uring exists (a caller that
    /// confines its threads installs the worker's filter here).
    pub on_start: Option<fn()>,
}

/// The process-wide pool: the workers, the deques they steal from, and the counts that
/// decide when a worker is woken.
pub struct InflatePool {
    shared: Arc<Shared>,
}

struct Shared {
    /// Every shard deque that has held a job, with its registration id.
    queues: Mutex<Vec<(u64, Stealer<Job>)>>,
    /// Bumped whenever `queues` changes, so that thieves refresh their copies.
    generation: AtomicU64,
    next_id: AtomicU64,
    /// Workers asleep (their indexes), and how many (read without the lock).
    idle: Mutex<Vec<usize>>,
    sleeping: AtomicUsize,
    unparkers: Vec<Unparker>,
    /// Engine threads busy with compressed reads: shards that have queued jobs, while they
    /// poll or have requests in flight, and workers awake.
    busy: AtomicUsize,
    /// CPUs this process may run on.
    cpus: usize,
    /// Cross-ring completions work on this kernel (Linux 5.18), so jobs may change threads.
    msg_ring: bool,
}

static POOL: OnceLock<InflatePool> = OnceLock::new();

/// Starts the process-wide inflate pool now (the first call wins; later calls return the pool
/// already started). Without a call, the pool starts with the defaults on the first
/// compressed read of a shard that shares its work, from that shard's thread: a caller that
/// confines its threads calls this during set-up.
pub fn start_inflate_pool(config: InflatePoolConfig) -> &'static InflatePool {
    POOL.get_or_init(|| InflatePool::start(config))
}

/// The process-wide pool, started with the defaults if nobody started it.
pub(crate) fn inflate_pool() -> &'static InflatePool {
    start_inflate_pool(InflatePoolConfig::default())
}

impl InflatePool {
    fn start(config: InflatePoolConfig) -> InflatePool {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let msg_ring = super::ring::msg_ring_supported();
        let wanted = if msg_ring {
            config.threads.unwrap_or(cpus.saturating_sub(1).max(1))
        } else {
            0
        };
        let parkers: Vec<Parker> = (0..wanted).map(|_| Parker::new()).collect();
        let shared = Arc::new(Shared {
            queues: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            idle: Mutex::new(Vec::with_capacity(wanted)),
            sleeping: AtomicUsize::new(0),
            unparkers: parkers.iter().map(|p| p.unparker().clone()).collect(),
            busy: AtomicUsize::new(0),
            cpus,
            msg_ring,
        });
        // Each worker says when it has run `on_start` (or given up): the pool is returned only
        // then, so that a caller that confines its threads has no worker running unconfined
        // once set-up is done.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let mut spawned = 0;
        for (i, parker) in parkers.into_iter().enumerate() {
            let s = Arc::clone(&shared);
            let started = started_tx.clone();
            // Counted awake until it parks.
            shared.busy.fetch_add(1, Ordering::Relaxed);
            let thread = std::thread::Builder::new()
                .name(format!("qcow2d-inflate-{i}"))
                .spawn(move || worker(&s, i, parker, config.on_start, started));
            match thread {
                Ok(_) => spawned += 1,
                Err(e) => {
                    shared.busy.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!("Cannot start an inflate worker: {e}");
                    break;
                }
            }
        }
        drop(started_tx);
        for _ in 0..spawned {
            if started_rx.recv().is_err() {
                break;
            }
        }
        InflatePool { shared }
    }

    /// Worker threads started.
    pub fn workers(&self) -> usize {
        self.shared.unparkers.len()
    }
}

impl Shared {
    /// Wakes one sleeping worker, counting it busy at once (so that another shard does not
    /// wake one more than the CPUs allow).
    fn wake_one(&self) {
        let woken = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let w = idle.pop();
            if w.is_some() {
                self.sleeping.fetch_sub(1, Ordering::Relaxed);
                self.busy.fetch_add(1, Ordering::Relaxed);
            }
            w
        };
        if let Some(w) = woken {
            self.unparkers[w].unpark();
        }
    }

    /// Takes worker `index` off the idle list if it is still there (it found work itself, or
    /// woke spuriously); whoever takes it off counts it busy.
    fn unidle(&self, index: usize) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = idle.iter().position(|&w| w == index) {
            idle.swap_remove(at);
            self.sleeping.fetch_sub(1, Ordering::Relaxed);
            self.busy.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A thief's copy of the registered deques, refreshed when they change.
#[derive(Default)]
struct Thief {
    stealers: Vec<(u64, Stealer<Job>)>,
    generation: u64,
    /// Where the next search starts (round robin over the deques).
    next: usize,
}

impl Thief {
    /// Steals the oldest job of some deque other than `own` (registration id; 0: none).
    fn steal(&mut self, shared: &Shared, own: u64) -> Option<Job> {
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            let queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            self.stealers.clone_from(&queues);
            self.generation = generation;
        }
        let n = self.stealers.len();
        loop {
            let mut retry = false;
            for i in 0..n {
                let at = (self.next + i) % n;
                let (id, stealer) = &self.stealers[at];
                if *id == own {
                    continue;
                }
                match stealer.steal() {
                    Steal::Success(job) => {
                        self.next = at;
                        return Some(job);
                    }
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
            }
            if !retry {
                return None;
            }
        }
    }
}

/// A shard's own deque of inflate jobs and its view of the pool. Used by the shard's thread
/// only (whichever thread holds the shard).
pub struct InflateQueue {
    local: Worker<Job>,
    /// The process-wide pool, looked up (and started with the defaults if nobody started it)
    /// on the first compressed read.
    pool: Option<&'static InflatePool>,
    sharing: InflateSharing,
    /// Registration with the pool (0: not registered yet, before the first job).
    id: u64,
    /// Counted in the pool's busy threads (from `enter` to a `leave` with nothing in flight).
    counted: bool,
    thief: Thief,
}

impl InflateQueue {
    /// An empty queue; `sharing` says whether its jobs may change threads.
    pub fn new(sharing: InflateSharing) -> InflateQueue {
        InflateQueue {
            local: Worker::new_fifo(),
            pool: None,
            sharing,
            id: 0,
            counted: false,
            thief: Thief::default(),
        }
    }

    /// Whether jobs go onto the deque (else the shard inflates as its reads complete).
    pub fn shares(&mut self) -> bool {
        if self.sharing == InflateSharing::OnShard {
            return false;
        }
        let pool = *self.pool.get_or_insert_with(inflate_pool);
        if !pool.shared.msg_ring {
            // Results cannot be posted across rings on this kernel.
            self.sharing = InflateSharing::OnShard;
            return false;
        }
        true
    }

    /// Queues a job for the shard itself or a thief (only after [`InflateQueue::shares`]
    /// said yes).
    pub fn push(&mut self, job: Job) {
        if self.id == 0 {
            self.register();
        }
        self.local.push(job);
    }

    /// Makes the deque one that thieves look at, and the shard one that steals.
    fn register(&mut self) {
        let pool = *self.pool.get_or_insert_with(inflate_pool);
        let shared = &pool.shared;
        self.id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.push((self.id, self.local.stealer()));
        shared.generation.fetch_add(1, Ordering::Release);
        drop(queues);
        // Counted busy from now on while polling; this poll started uncounted.
        if !self.counted {
            shared.busy.fetch_add(1, Ordering::Relaxed);
            self.counted = true;
        }
    }

    /// A poll begins: a shard that shares compressed work counts as a busy CPU.
    pub fn enter(&mut self) {
        if let (Some(pool), false) = (self.pool.filter(|_| self.id != 0), self.counted) {
            pool.shared.busy.fetch_add(1, Ordering::Relaxed);
            self.counted = true;
        }
    }

    /// The poll ends. A shard with requests still in flight stays counted: its thread is
    /// back in a moment (handing completions to its frontend, taking new requests), so it
    /// keeps its CPU busy between polls, and waking a worker for it would put one thread more
    /// than CPUs on the run queue.
    pub fn leave(&mut self, requests_in_flight: bool) {
        if !requests_in_flight {
            self.uncount();
        }
    }

    fn uncount(&mut self) {
        if let (Some(pool), true) = (self.pool, self.counted) {
            pool.shared.busy.fetch_sub(1, Ordering::Relaxed);
            self.counted = false;
        }
    }

    /// Wakes a worker when this shard has work to give away and a CPU is free for it.
    pub fn offer(&self) {
        let Some(pool) = self.pool.filter(|_| self.id != 0) else {
            return;
        };
        let queued = self.local.len();
        if queued == 0 {
            return;
        }
        let shared = &pool.shared;
        if shared.sleeping.load(Ordering::Relaxed) == 0 {
            return;
        }
        let wake = match self.sharing {
            InflateSharing::HandOff => true,
            _ => queued >= 2 && shared.busy.load(Ordering::Relaxed) < shared.cpus,
        };
        if wake {
            shared.wake_one();
        }
    }

    /// The oldest job of the shard's own deque, for the shard to run (none are handed back
    /// in hand-off mode while the pool has workers).
    pub fn pop_own(&mut self) -> Option<Job> {
        // A shard that never queued a job (a plain image) touches nothing shared.
        if self.id == 0 {
            return None;
        }
        if self.sharing == InflateSharing::HandOff && self.pool.is_some_and(|p| p.workers() > 0) {
            return None;
        }
        self.local.pop()
    }

    /// Whether [`InflateQueue::pop_own`] has a job for the shard.
    pub fn has_own(&self) -> bool {
        self.id != 0
            && !(self.sharing == InflateSharing::HandOff
                && self.pool.is_some_and(|p| p.workers() > 0))
            && !self.local.is_empty()
    }

    /// Jobs on the shard's own deque (not yet run by the shard or taken by a thief).
    pub fn own_len(&self) -> usize {
        self.local.len()
    }

    /// Every job still on the deque (for a shard being dropped).
    pub fn take_all(&mut self) -> Vec<Job> {
        std::iter::from_fn(|| self.local.pop()).collect()
    }

    /// The oldest job of another shard's deque, for a shard with nothing else to do. Only a
    /// shard that shares compressed work itself looks.
    pub fn steal(&mut self) -> Option<Job> {
        let pool = self.pool.filter(|_| self.id != 0)?;
        if self.sharing != InflateSharing::Shared {
            return None;
        }
        self.thief.steal(&pool.shared, self.id)
    }
}

impl Drop for InflateQueue {
    fn drop(&mut self) {
        self.uncount();
        if let Some(pool) = self.pool.filter(|_| self.id != 0) {
            let shared = &pool.shared;
            let mut queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            queues.retain(|(id, _)| *id != self.id);
            shared.generation.fetch_add(1, Ordering::Release);
        }
    }
}

/// A pool worker: steals jobs from the shards' deques, runs them and posts each result into
/// its owner's ring; sleeps when there is nothing to steal.
fn worker(
    shared: &Shared,
    index: usize,
    parker: Parker,
    on_start: Option<fn()>,
    started: std::sync::mpsc::Sender<()>,
) {
    let ring = super::ring::build_restricted(
        &mut IoUring::builder(),
        8,
        &super::ring::MSG_RING_OPS,
        &[],
        |_| Ok(()),
    );
    let mut ring = match ring {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("Inflate worker cannot create an io_uring: {e}");
            shared.busy.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    if let Some(on_start) = on_start {
        on_start();
    }
    let _ = started.send(());
    drop(started);
    let mut inflater = ClusterInflater::new();
    let mut thief = Thief {
        next: index,
        ..Thief::default()
    };
    loop {
        if let Some(job) = thief.steal(shared, 0) {
            let result = job.run(&mut inflater);
            post(&mut ring, &job, result);
            continue;
        }
        // Nothing to do: go on the idle list, look once more (a shard that pushed meanwhile
        // may have seen nobody asleep), then sleep until a shard wakes us.
        {
            let mut idle = shared.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.push(index);
            shared.sleeping.fetch_add(1, Ordering::Relaxed);
            shared.busy.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(job) = thief.steal(shared, 0) {
            shared.unidle(index);
            let result = job.run(&mut inflater);
            post(&mut ring, &job, result);
            continue;
        }
        parker.park();
        shared.unidle(index);
    }
}

/// Posts a stolen job's result from a pool worker's ring into its owner's ring
/// ([`deliver`] tries again as long as the kernel refuses for a moment).
fn post(ring: &mut IoUring, job: &Job, result: i32) {
    let entry =
        opcode::MsgRingData::new(types::Fd(job.ring_fd), result, job.user_data, None).build();
    deliver("Inflate worker", || {
        // SAFETY: a MSG_RING entry points at no memory of ours.
        let pushed = unsafe { ring.submission().push(&entry).is_ok() };
        if !pushed {
            return Err(std::io::Error::other("submission queue full"));
        }
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        // One post in flight at a time: its completion is the only one.
        let refused = ring
            .completion()
            .map(|cqe| cqe.result())
            .filter(|&r| r < 0)
            .last();
        Ok(refused.unwrap_or(0))
    });
}

/// How long a thread whose post was refused waits before it tries again.
const POST_RETRY_AFTER: std::time::Duration = std::time::Duration::from_micros(50);

/// How a stolen job's result ended up ([`deliver`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The owner's ring has it.
    Posted,
    /// The owner's ring is gone (EBADF, EBADFD).
    OwnerGone,
    /// The poster's own ring failed.
    Failed,
}

/// Posts a stolen job's result into its owner's ring through `attempt` (one post, waited
/// for: the post's own result, or an error of the poster's ring), until it lands. Used by
/// the pool's workers and by shards that run other shards' jobs, so that both treat a
/// refused post alike.
///
/// The owner waits for this result and has no other way to learn it, so a post the kernel
/// refuses for a moment (the owner's completion queue full, EOVERFLOW, or EAGAIN) is tried
/// again after [`POST_RETRY_AFTER`] until it lands. Only a ring that is gone (EBADF, EBADFD:
/// its shard was dropped, which waits for its stolen jobs, so never seen) or a failure of
/// the poster's own ring gives up. `who` names the poster in the log.
pub(crate) fn deliver(who: &str, mut attempt: impl FnMut() -> std::io::Result<i32>) -> Delivery {
    let mut logged = false;
    loop {
        match attempt() {
            Err(e) => {
                tracing::error!("{who} cannot post an inflated cluster's result: {e}");
                return Delivery::Failed;
            }
            Ok(r) if r >= 0 => return Delivery::Posted,
            Ok(r) if matches!(-r, libc::EBADF | libc::EBADFD) => {
                tracing::error!(
                    "{who}: the ring of an inflated cluster's shard is gone: {}",
                    std::io::Error::from_raw_os_error(-r)
                );
                return Delivery::OwnerGone;
            }
            Ok(r) => {
                if !logged {
                    tracing::warn!(
                        "{who}: posting an inflated cluster's result was refused, trying again: {}",
                        std::io::Error::from_raw_os_error(-r)
                    );
                    logged = true;
                }
                std::thread::sleep(POST_RETRY_AFTER);
            }
        }
    }
}

/// Decodes compressed clusters into engine or guest memory; one per worker thread and one per
/// shard (for inline inflation). Wraps the format layer's [`Inflater`] and adds libdeflate
/// driven through raw pointers for guest memory.
pub struct ClusterInflater {
    /// libdeflate's decompressor, for guest memory.
    raw: NonNull<libdeflate_sys::libdeflate_decompressor>,
    inflater: Inflater,
    /// One cluster, allocated on first use: where the fallback paths decode guest clusters.
    scratch: Vec<u8>,
}

// SAFETY: the libdeflate decompressor is plain heap memory with no thread affinity, used
// through `&mut self` only, so by one thread at a time.
unsafe impl Send for ClusterInflater {}

impl Default for ClusterInflater {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterInflater {
    /// Allocates the decompressors.
    pub fn new() -> Self {
        // SAFETY: no preconditions; returns a new decompressor or null.
        let raw = unsafe { libdeflate_sys::libdeflate_alloc_decompressor() };
        // As for any allocation, running out of memory here is not recoverable (libdeflater's
        // own constructor panics the same way).
        let raw = NonNull::new(raw).expect("libdeflate_alloc_decompressor: out of memory");
        ClusterInflater {
            raw,
            inflater: Inflater::new(),
            scratch: Vec::new(),
        }
    }

    /// Decodes `input` into exactly one cluster at `out`, with the same acceptance rules as
    /// [`Inflater::inflate`] (the result is identical for engine and guest memory), or, for
    /// [`Output::Prefix`], only the first bytes of the cluster.
    ///
    /// On error the bytes at `out` are unspecified (never outside it).
    ///
    /// # Safety
    /// `out` must be valid for writes of its length until this returns; [`Output::Engine`]
    /// and [`Output::Prefix`] memory must not be accessed by anyone else meanwhile.
    /// [`Output::Guest`] memory may be changed by others meanwhile: it is only written.
    pub unsafe fn inflate(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: Output,
    ) -> Result<(), InflateError> {
        match out {
            Output::Engine { ptr, len } => {
                // SAFETY: the caller makes `ptr..ptr + len` valid and exclusively ours until we
                // return.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                self.inflater.inflate(kind, input, out)
            }
            // SAFETY: forwarded from the caller.
            Output::Guest { ptr, len } => unsafe { self.inflate_guest(kind, input, ptr, len) },
            Output::Prefix { ptr, len } => {
                // SAFETY: as for engine memory.
                let out = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                match kind {
                    CompressionType::Zlib => self.inflater.inflate_deflate_prefix(input, out),
                    // Not used for zstd (the shard inflates whole zstd clusters).
                    CompressionType::Zstd => Err(InflateError::BadDeflate),
                }
            }
        }
    }

    /// [`ClusterInflater::inflate`] into guest memory.
    ///
    /// # Safety
    /// `out..out + len` must be valid for writes until this returns.
    unsafe fn inflate_guest(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: *mut u8,
        len: usize,
    ) -> Result<(), InflateError> {
        if kind == CompressionType::Zlib {
            let mut produced = 0usize;
            // SAFETY: `self.raw` is our live decompressor; `input` is a valid slice; `out` is
            // valid for writes of `len` bytes (the caller's contract) and libdeflate never
            // writes past `out + len`; `produced` is a valid local.
            let result = unsafe {
                libdeflate_sys::libdeflate_deflate_decompress(
                    self.raw.as_ptr(),
                    input.as_ptr().cast(),
                    input.len(),
                    out.cast(),
                    len,
                    &mut produced,
                )
            };
            if result == libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS {
                return if produced == len {
                    Ok(())
                } else {
                    Err(InflateError::Short {
                        produced,
                        expected: len,
                    })
                };
            }
            // No final block, longer than a cluster, or corrupt: the streaming fallback
            // decides, as for engine memory.
        }
        self.scratch.resize(len, 0);
        self.inflater.inflate(kind, input, &mut self.scratch)?;
        // SAFETY: `out` is valid for writes of `len` bytes (the caller's contract) and cannot
        // overlap `scratch`, our own allocation of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.scratch.as_ptr(), out, len) };
        Ok(())
    }
}

impl Drop for ClusterInflater {
    fn drop(&mut self) {
        // SAFETY: `raw` came from libdeflate_alloc_decompressor and is freed once, here.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

    const CLUSTER: usize = 65536;
    /// Bytes around the "guest segment" that must never be written.
    const GUARD: usize = 4096;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut out = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(data, &mut out).unwrap();
        out.truncate(n);
        out
    }

    /// Non-final stored blocks only: libdeflate refuses it, QEMU (and the fallback) accept it.
    fn stored_without_final_block(data: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        for chunk in data.chunks(32768) {
            s.push(0b000); // BFINAL=0, BTYPE=00, padded to the byte boundary
            s.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
            s.extend_from_slice(&(!(chunk.len() as u16)).to_le_bytes());
            s.extend_from_slice(chunk);
        }
        s
    }

    /// Inflates into the middle of a guarded buffer as guest memory, and into a plain buffer as
    /// engine memory; both must agree, and the guards must be untouched.
    fn both_ways(kind: CompressionType, input: &[u8]) -> Result<Vec<u8>, InflateError> {
        let mut inflater = ClusterInflater::new();
        let mut guest = vec![0xA5u8; GUARD + CLUSTER + GUARD];
        // SAFETY: the segment lies inside `guest`, which nobody else touches.
        let g = unsafe {
            let ptr = guest.as_mut_ptr().add(GUARD);
            inflater.inflate(kind, input, Output::Guest { ptr, len: CLUSTER })
        };
        assert!(guest[..GUARD].iter().all(|&b| b == 0xA5), "wrote before");
        assert!(
            guest[GUARD + CLUSTER..].iter().all(|&b| b == 0xA5),
            "wrote after"
        );
        let mut engine = vec![0u8; CLUSTER];
        let out = Output::Engine {
            ptr: engine.as_mut_ptr(),
            len: CLUSTER,
        };
        // SAFETY: `engine` is ours alone for the call.
        let e = unsafe { inflater.inflate(kind, input, out) };
        assert_eq!(g, e, "guest and engine memory disagree on the result");
        g.map(|()| {
            assert_eq!(&guest[GUARD..GUARD + CLUSTER], &engine[..]);
            engine
        })
    }

    #[test]
    fn deflate_into_guest_memory_with_trailing_bytes() {
        let data = pattern(CLUSTER);
        let mut comp = deflate(&data);
        // The extent read from disk runs on to the end of its last sector.
        comp.extend_from_slice(&[0x5A; 511]);
        assert_eq!(both_ways(CompressionType::Zlib, &comp).unwrap(), data);
    }

    #[test]
    fn stream_without_final_block_takes_the_fallback() {
        let data = pattern(CLUSTER);
        let s = stored_without_final_block(&data);
        assert_eq!(both_ways(CompressionType::Zlib, &s).unwrap(), data);
    }

    #[test]
    fn zstd_frames_into_guest_memory() {
        let data = pattern(CLUSTER);
        let mut comp = zstd::bulk::compress(&data[..20000], 3).unwrap();
        comp.extend(zstd::bulk::compress(&data[20000..], 3).unwrap());
        comp.extend_from_slice(&[0u8; 100]);
        assert_eq!(both_ways(CompressionType::Zstd, &comp).unwrap(), data);
        let short = zstd::bulk::compress(&data[..20000], 3).unwrap();
        assert!(both_ways(CompressionType::Zstd, &short).is_err());
    }

    #[test]
    fn short_long_and_corrupt_streams() {
        let data = pattern(2 * CLUSTER);
        // Less than a cluster: an error, whichever decoder sees it.
        assert_eq!(
            both_ways(CompressionType::Zlib, &deflate(&data[..CLUSTER - 1])),
            Err(InflateError::Short {
                produced: CLUSTER - 1,
                expected: CLUSTER
            })
        );
        let s = stored_without_final_block(&data[..CLUSTER - 512]);
        assert!(both_ways(CompressionType::Zlib, &s).is_err());
        // More than a cluster: the first cluster, as QEMU reads it (and as the cached path
        // does), never a byte past the segment (both_ways checks the guard).
        let long = both_ways(CompressionType::Zlib, &deflate(&data[..CLUSTER + 4096])).unwrap();
        assert_eq!(long, data[..CLUSTER]);
        for bad in [&[][..], &[0xff; 64][..], &[0x07, 0xff, 0xff, 0xff][..]] {
            assert!(both_ways(CompressionType::Zlib, bad).is_err());
            assert!(both_ways(CompressionType::Zstd, bad).is_err());
        }
    }

    fn reap_one(ring: &mut crate::io::Ring) -> (u64, i32) {
        let mut cqes = Vec::new();
        while cqes.is_empty() {
            ring.submit_and_wait().unwrap();
            ring.reap_into(&mut cqes);
        }
        assert_eq!(cqes.len(), 1, "{cqes:?}");
        cqes[0]
    }

    /// A job handed to the pool's workers is inflated by one of them into the engine memory it
    /// names, and its result arrives on the owner's ring with the owner's user data; a stream
    /// that does not inflate arrives as INFLATE_FAILED.
    #[test]
    fn stolen_jobs_complete_on_their_owners_ring() {
        let data = pattern(CLUSTER);
        let good = deflate(&data);
        let bad = vec![0xffu8; 64];
        let mut ring = crate::io::Ring::new(8).unwrap();
        let mut queue = InflateQueue::new(InflateSharing::HandOff);
        assert!(
            queue.shares(),
            "this kernel cannot post across rings (MSG_RING)"
        );
        assert!(inflate_pool().workers() > 0);
        for (input, want) in [(&good, 0), (&bad, INFLATE_FAILED)] {
            let mut out = vec![0u8; CLUSTER];
            let dest = Output::Engine {
                ptr: out.as_mut_ptr(),
                len: CLUSTER,
            };
            assert!(ring.try_expect_external_completion());
            // SAFETY: `input` and `out` outlive the completion reaped below.
            let job = unsafe { Job::new(CompressionType::Zlib, input, dest, ring.ring_fd(), 77) };
            queue.push(job);
            // In hand-off mode the shard never runs its own jobs while workers exist.
            assert!(queue.pop_own().is_none());
            queue.offer();
            assert_eq!(reap_one(&mut ring), (77, want));
            if want == 0 {
                assert_eq!(out, data);
            }
        }
    }

    /// A shard stays counted among the busy threads between polls while it has requests in
    /// flight (a worker woken for it then would be one thread more than CPUs), and only
    /// then; entering a poll while counted does not count it twice.
    #[test]
    fn a_shard_with_requests_in_flight_stays_busy_between_polls() {
        let mut queue = InflateQueue::new(InflateSharing::Shared);
        assert!(queue.shares());
        queue.enter();
        assert!(!queue.counted, "counted before it ever had compressed work");
        queue.register();
        assert!(queue.counted);
        queue.leave(true);
        assert!(queue.counted);
        queue.enter();
        queue.leave(false);
        assert!(!queue.counted);
        queue.leave(false);
        queue.enter();
        assert!(queue.counted);
    }

    /// A shard with nothing to do takes the oldest job of another shard's queue, inflates it
    /// into the memory the owner named and posts the result into the owner's ring through its
    /// own (taking the post's own completion there and then). A pool worker still awake from
    /// another test may take a job first: that job arrives all the same, and over several
    /// rounds the thief takes some.
    #[test]
    fn an_idle_shard_steals_from_a_busy_one() {
        let data = pattern(CLUSTER);
        let input = deflate(&data);
        let mut owner_ring = crate::io::Ring::new(8).unwrap();
        let mut thief_ring = crate::io::Ring::new(8).unwrap();
        let mut owner = InflateQueue::new(InflateSharing::Shared);
        let mut thief = InflateQueue::new(InflateSharing::Shared);
        assert!(owner.shares() && thief.shares());
        thief.register();
        let mut inflater = ClusterInflater::new();
        let mut stolen = 0;
        for _ in 0..20 {
            let mut outs: Vec<Vec<u8>> = (0..2).map(|_| vec![0u8; CLUSTER]).collect();
            for (i, out) in outs.iter_mut().enumerate() {
                let dest = Output::Engine {
                    ptr: out.as_mut_ptr(),
                    len: CLUSTER,
                };
                assert!(owner_ring.try_expect_external_completion());
                // SAFETY: `input` and the outputs outlive the completions reaped below.
                let job = unsafe {
                    Job::new(
                        CompressionType::Zlib,
                        &input,
                        dest,
                        owner_ring.ring_fd(),
                        i as u64,
                    )
                };
                owner.push(job);
            }
            let mut done = Vec::new();
            if let Some(job) = thief.steal() {
                let result = job.run(&mut inflater);
                job.post_result(&mut thief_ring, result);
                assert!(
                    !thief_ring.has_completions(),
                    "the post's completion is taken"
                );
                stolen += 1;
            }
            if let Some(job) = owner.pop_own() {
                assert_eq!(job.run(&mut inflater), 0);
                owner_ring.cancel_external_completion();
                done.push(job.user_data());
            }
            while done.len() < 2 {
                let mut cqes = Vec::new();
                owner_ring.submit_and_wait().unwrap();
                owner_ring.reap_into(&mut cqes);
                for (user_data, result) in cqes {
                    assert_eq!(result, 0);
                    done.push(user_data);
                }
            }
            done.sort_unstable();
            assert_eq!(done, [0, 1]);
            assert!(outs.iter().all(|o| *o == data));
        }
        assert!(stolen > 0);
    }

    /// A post the kernel refuses for a moment (the owner's completion queue full, or EAGAIN)
    /// is tried again until it lands; a post to a ring that is gone, or a poster whose own
    /// ring fails, gives up at once.
    #[test]
    fn a_refused_post_is_tried_again_until_it_lands() {
        let mut answers = vec![Ok(0), Ok(-libc::EAGAIN), Ok(-libc::EOVERFLOW)];
        let mut attempts = 0;
        let delivery = deliver("Test", || {
            attempts += 1;
            answers.pop().unwrap()
        });
        assert_eq!((delivery, attempts), (Delivery::Posted, 3));
        for (answer, want) in [
            (Ok(-libc::EBADF), Delivery::OwnerGone),
            (Ok(-libc::EBADFD), Delivery::OwnerGone),
            (
                Err(std::io::Error::from_raw_os_error(libc::EIO)),
                Delivery::Failed,
            ),
        ] {
            let mut answer = Some(answer);
            let mut attempts = 0;
            let delivery = deliver("Test", || {
                attempts += 1;
                answer.take().expect("tried again after giving up")
            });
            assert_eq!((delivery, attempts), (want, 1));
        }
    }

    /// A guest that scribbles over the segment while we inflate gets garbage in its own
    /// segment, never a write outside it, and no crash.
    #[test]
    fn guest_changing_its_memory_meanwhile() {
        let data = pattern(CLUSTER);
        let inputs = [
            (CompressionType::Zlib, deflate(&data)),
            (CompressionType::Zlib, stored_without_final_block(&data)),
            (
                CompressionType::Zstd,
                zstd::bulk::compress(&data, 1).unwrap(),
            ),
        ];
        let mem: Vec<AtomicU8> = (0..GUARD + CLUSTER + GUARD)
            .map(|_| AtomicU8::new(0xA5))
            .collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    mem[GUARD + i % CLUSTER].store(i as u8, Ordering::Relaxed);
                    i = i.wrapping_add(4099);
                }
            });
            let mut inflater = ClusterInflater::new();
            for _ in 0..20 {
                for (kind, input) in &inputs {
                    let ptr = mem[GUARD].as_ptr();
                    // SAFETY: the segment lies inside `mem`, which outlives the call; the other
                    // thread changes it concurrently, as a guest may.
                    let r = unsafe {
                        inflater.inflate(*kind, input, Output::Guest { ptr, len: CLUSTER })
                    };
                    assert!(r.is_ok(), "{kind:?}: {r:?}");
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let outside = mem[..GUARD].iter().chain(&mem[GUARD + CLUSTER..]);
        assert!(outside
            .into_iter()
            .all(|b| b.load(Ordering::Relaxed) == 0xA5));
    }
}
