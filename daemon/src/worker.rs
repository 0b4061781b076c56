//! The data path of one worker thread: from available descriptor chains to used ones.
//!
//! vhost-user-backend runs one epoll loop per worker thread; queue `q` belongs to worker
//! `q % shards`. That thread calls into its [`Worker`] (through the backend's per-thread mutex,
//! uncontended on the data path) when a queue it owns is kicked and when its engine shard's
//! completion eventfd fires. The vhost-user frontend thread takes the same mutex only for
//! GET_VRING_BASE ([`Worker::stop_queue`]), to wait out the requests of a queue being stopped,
//! and to switch the shard between write-back and write-through ([`Worker::set_writethrough`]).
//!
//! A request in flight lives in a slot of a slab; its token is the slot index. A discard or
//! write-zeroes request with several segments becomes one engine request per segment, all with
//! the slot's token; the slot counts them and completes the chain after the last one, with
//! VIRTIO_BLK_S_IOERR if any failed. The slot keeps a clone of the `Arc` of the guest-memory
//! snapshot that its host buffers point into, so a memory-table change cannot unmap them before
//! the engine is done. The slab, the scratch buffers and the completion vector are reused: the
//! steady state allocates nothing.
//!
//! With `--metrics` the worker also records every request into its [`ShardMetrics`]: the time
//! from popping the chain to adding it to the used ring, its operation, payload bytes and
//! outcome (relaxed atomic adds, no lock, no allocation); once per turn of the event loop it
//! publishes the number of requests in flight and the shard's cache statistics there. Requests
//! still in flight when a connection ends are never returned to the guest, so never counted.
//!
//! Gate. The worker takes chains from its queues only while its gate is open
//! ([`Worker::gate_open`]). Today one thing closes it: a read or write of a limited export
//! (see [`crate::throttle`]) that must wait. That chain is held (taken from the ring and
//! accounted, not submitted) and the worker's timer is armed for the moment it may start;
//! meanwhile kicks are left alone (the chains stay in the available ring, unread). When the
//! timer fires ([`Worker::process_timer`]) the held chain is prepared again and submitted,
//! and the worker goes round its queues taking chains until the gate closes again. A queue
//! being stopped (GET_VRING_BASE) or quiesced submits its held chain at once.
//!
//! The in-flight budget ([`Gate`], `crate::budget`: bytes and requests per worker and per
//! connection) closes it too, while the worker is at its limits. Chains then stay in the
//! available ring (with EVENT_IDX, notifications stay off), the worker remembers that it left
//! chains behind (`starved`), and when its own completions give budget back
//! ([`Worker::process_completions`]) it goes round its ready queues again through the same
//! resume path as the timer ([`Worker::resume_queues`]), whether or not the guest kicks
//! again. Budget of the connection given back by another worker wakes it through its timer
//! ([`Worker::process_timer`]).
//!
//! A broken available ring (an index more than the queue size ahead of the device's, or an
//! entry that cannot be read: a hostile driver, or a frontend that truncated the memory the
//! ring lies in) stops its queue: no chain is taken from it until the frontend stops it
//! (GET_VRING_BASE) and sets it up again, with one error line. The worker must not spin on
//! it: a worker that never returns to its event loop never sees its exit event, and the
//! export could never take its next connection.
//!
//! When the connection is gone, the export's listener thread calls [`Worker::finish`] (after
//! vhost-user-backend has joined the worker thread): it waits for what is still in flight and
//! makes every write durable before the shard is dropped. `Drop` does the same if that was
//! skipped.

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, error, info, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::block_io::{BlockIo, CacheStats, Done};
use crate::budget::{ConnectionBudget, Gate, Limits};
use crate::chain::ChainWalker;
use crate::inflight::{InflightShared, QueueTracker, Recovery};
use crate::metrics::{Operation, ShardMetrics};
use crate::request::{prepare, DeviceInfo, Malformed, Prepared, Scratch};
use crate::throttle::WorkerThrottle;
use crate::timer::Timer;
use crate::virtio_blk::{MAX_QUEUES, STATUS_IOERR, STATUS_OK};

/// The vring type the backend uses.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;
/// The state behind a [`Vring`]'s lock.
type RingState = VringState<GuestMemoryAtomic<GuestMemoryMmap>>;

/// How many request failures a worker logs before it only logs every power of two.
const LOUD_ERRORS: u64 = 16;

/// One request in flight.
struct Slot {
    /// Head descriptor index of the chain, returned in the used ring.
    head: u16,
    /// Index of the queue in this worker's vrings.
    queue: u8,
    /// Guest address of the status byte.
    status: GuestAddress,
    /// Used length reported on success (data read + status byte).
    ok_len: u32,
    /// Engine requests of this chain not yet completed.
    pending: u32,
    /// Whether one of them failed (or could not be submitted).
    failed: bool,
    /// The memory the request's buffers point into; `None` while the slot is free.
    mem: Option<Arc<GuestMemoryMmap>>,
    /// For the metrics: what the request is, its payload bytes and when its chain was popped
    /// (`None` without metrics).
    op: Operation,
    bytes: u64,
    started: Option<Instant>,
    /// Bytes counted against the in-flight budget.
    budget_bytes: u64,
}

impl Slot {
    const FREE: Slot = Slot {
        head: 0,
        queue: 0,
        status: GuestAddress(0),
        ok_len: 0,
        pending: 0,
        failed: false,
        mem: None,
        op: Operation::Other,
        bytes: 0,
        started: None,
        budget_bytes: 0,
    };
}

#[derive(Clone, Copy)]
enum Op {
    Read(u64),
    Write(u64),
    Flush,
    Discard,
    WriteZeroes,
}

impl Op {
    fn operation(self) -> Operation {
        match self {
            Op::Read(_) => Operation::Read,
            Op::Write(_) => Operation::Write,
            Op::Flush => Operation::Flush,
            Op::Discard => Operation::Discard,
            Op::WriteZeroes => Operation::WriteZeroes,
        }
    }
}

/// Per-thread state of the data path.
pub struct Worker<B: BlockIo> {
    // Declared first so that, should the explicit drain in `drop` stop early, the I/O engine
    // is dropped (and waits for the kernel) before the slots release the guest memory.
    io: B,
    slots: Vec<Slot>,
    free: Vec<u32>,
    scratch: Scratch,
    done: Vec<Done<B::IoError>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// This thread's vrings, remembered from the first event so that GET_VRING_BASE (which
    /// does not get them) can complete requests.
    vrings: Vec<Vring>,
    in_flight_per_queue: [u32; MAX_QUEUES as usize],
    /// Queues (local indexes) that got used entries since they were last notified.
    dirty: u64,
    errors: u64,
    /// Where requests are counted, with `--metrics`.
    metrics: Option<Arc<ShardMetrics>>,
    /// The engine's cache statistics as last published to `metrics`.
    cache_published: CacheStats,
    /// Whether [`Worker::finish`] ran.
    finished: bool,
    /// Where the connection's in-flight area is published, with this worker's place among the
    /// connection's workers (to turn its local queue indexes into global ones).
    inflight: Option<InflightLink>,
    /// Per local queue: the in-flight bookkeeping and the area generation it was set up for.
    tracked: Vec<TrackedQueue>,
    /// The export's I/O limits and the timer that ends a wait (`None`: never limited).
    throttle: Option<(WorkerThrottle, Timer)>,
    /// The chain waiting for its turn under the limits; while there is one the gate is closed.
    held: Option<Held>,
    /// Set while the export is being resized: the gate is closed.
    paused: bool,
    /// What may be in flight; while it does not admit another chain the gate is closed.
    budget: Gate,
    /// Chains were left in a queue because the in-flight budget closed the gate.
    starved: bool,
    /// Set while the connection quiesces: no chain is taken any more.
    quiescing: bool,
    /// Local queues whose available ring the driver broke (see [`Worker::pop_requests`]): no
    /// chain is taken from them until the frontend stops the queue and sets it up again.
    broken: u64,
}

/// What the available ring of a queue offers.
enum Avail {
    /// The head index of the next chain (taken from the ring).
    Chain(u16),
    Empty,
    /// The ring cannot be right: its index is more than the queue size ahead of the device's
    /// (or not readable), or an entry it offers cannot be read.
    Broken(String),
}

/// A chain taken from its queue and accounted against the limits, waiting to start.
struct Held {
    /// Local queue index.
    queue: usize,
    head: u16,
    /// What it is checked against when it is prepared again.
    dev: DeviceInfo,
    /// When it was taken and when it may start.
    taken: Instant,
    until: Instant,
}

struct InflightLink {
    shared: Arc<InflightShared>,
    thread: usize,
    threads: usize,
}

#[derive(Default)]
struct TrackedQueue {
    /// The [`InflightShared`] generation this queue was last set up for (0: not yet, or the
    /// queue was stopped since).
    generation: u64,
    tracker: Option<QueueTracker>,
}

impl<B: BlockIo> Worker<B> {
    /// A worker that performs its I/O with `io` and reads guest memory through `mem`.
    pub fn new(io: B, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        Worker {
            io,
            slots: Vec::with_capacity(256),
            free: Vec::with_capacity(256),
            scratch: Scratch::new(),
            done: Vec::with_capacity(256),
            mem,
            vrings: Vec::new(),
            in_flight_per_queue: [0; MAX_QUEUES as usize],
            dirty: 0,
            errors: 0,
            metrics: None,
            cache_published: CacheStats::default(),
            finished: false,
            inflight: None,
            tracked: Vec::new(),
            throttle: None,
            held: None,
            paused: false,
            budget: Gate::new(
                Limits {
                    bytes: u64::MAX,
                    requests: u32::MAX,
                },
                Arc::new(ConnectionBudget::new(Limits {
                    bytes: u64::MAX,
                    requests: u32::MAX,
                })),
                0,
            ),
            starved: false,
            quiescing: false,
            broken: 0,
        }
    }

    /// Takes chains only while `budget` admits them (without, nothing limits what is in
    /// flight).
    pub fn with_budget(mut self, budget: Gate) -> Self {
        self.budget = budget;
        self
    }

    /// Limits reads and writes as the export's group says (see [`crate::throttle`]), waiting
    /// with `timer`, whose descriptor the caller watches and answers with
    /// [`Worker::process_timer`].
    pub fn with_throttle(mut self, throttle: WorkerThrottle, timer: Timer) -> Self {
        self.throttle = Some((throttle, timer));
        self
    }

    /// The descriptor of the throttle timer, if any.
    pub fn timer_fd(&self) -> Option<std::os::fd::RawFd> {
        self.throttle.as_ref().map(|(_, t)| t.as_raw_fd())
    }

    /// Whether the worker may take chains from its queues now (see the module docs).
    #[inline]
    fn gate_open(&self) -> bool {
        self.held.is_none() && !self.paused && self.budget.admits()
    }

    /// Closes the gate: no more chains are taken (a held one stays held) until
    /// [`Worker::unpause`]. Requests already taken complete as usual.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Reopens the gate closed by [`Worker::pause`] and has the worker thread go round its
    /// queues (through its timer, since kicks that came meanwhile were taken and left).
    pub fn unpause(&mut self) {
        self.paused = false;
        if let Some((_, timer)) = &mut self.throttle {
            if let Err(e) = timer.arm(std::time::Duration::from_nanos(1)) {
                warn!("Cannot wake the worker after a pause: {e}");
            }
        }
    }

    /// Chains taken and not yet returned, held ones excepted.
    pub fn chains_in_flight(&self) -> u32 {
        self.in_flight_per_queue.iter().sum()
    }

    /// The I/O engine, to swap its shard (see [`crate::block_io::EngineIo::detach`]). The
    /// cache statistics start again from the new shard's.
    pub fn io_mut(&mut self) -> &mut B {
        self.cache_published = CacheStats::default();
        &mut self.io
    }

    /// Records the chains it takes in the area published in `shared` (when the frontend shares
    /// one), as worker `thread` of `threads`: local queue `i` is queue `i * threads + thread`.
    pub fn with_inflight(
        mut self,
        shared: Arc<InflightShared>,
        thread: usize,
        threads: usize,
    ) -> Self {
        self.inflight = Some(InflightLink {
            shared,
            thread,
            threads: threads.max(1),
        });
        self
    }

    /// Records requests into `metrics` (nothing is measured without).
    pub fn with_metrics(mut self, metrics: Option<Arc<ShardMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The I/O engine.
    pub fn io(&self) -> &B {
        &self.io
    }

    /// Switches the I/O engine between write-through and write-back.
    pub fn set_writethrough(&mut self, on: bool) {
        self.io.set_writethrough(on);
    }

    /// Uses `mem` for requests popped from now on.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.mem = mem;
    }

    /// Requests in flight on local queue `index`.
    pub fn queue_in_flight(&self, index: usize) -> u32 {
        self.in_flight_per_queue.get(index).copied().unwrap_or(0)
    }

    /// The device's index of local queue `index` (for logs).
    fn global_queue(&self, index: usize) -> usize {
        self.inflight
            .as_ref()
            .map_or(index, |link| index * link.threads + link.thread)
    }

    fn remember_vrings(&mut self, vrings: &[Vring]) {
        if self.vrings.len() != vrings.len() {
            self.vrings = vrings.to_vec();
        }
    }

    /// Handles a kick of local queue `index`: takes every available chain, answers what can be
    /// answered at once, submits the rest, then reaps whatever the engine already finished and
    /// notifies the guest as needed.
    pub fn process_queue(
        &mut self,
        vrings: &[Vring],
        index: usize,
        event_idx: bool,
        dev: &DeviceInfo,
    ) {
        self.remember_vrings(vrings);
        let Some(vring) = vrings.get(index) else {
            warn!(index, "Event for a queue this worker does not own");
            return;
        };
        if self.broken & (1 << index) != 0 {
            // Its kicks are left alone (see `pop_requests`); completions are still returned.
            self.reap(vrings, false);
            self.notify(vrings);
            return;
        }
        let mem = self.mem.memory().into_inner();
        self.sync_inflight(vring, index, &mem, dev);
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    warn!(index, "Cannot disable queue notifications: {e}");
                }
            }
            self.pop_requests(vring, index, &mem, dev);
            if self.broken & (1 << index) != 0 {
                break;
            }
            if !self.gate_open() {
                // With the gate closed, chains stay in the ring (and notifications off, with
                // EVENT_IDX) until the gate reopens and the worker comes back for them.
                self.starved |= self.held.is_none();
                break;
            }
            if !event_idx {
                break;
            }
            // Re-enable notifications; if the driver added chains meanwhile, go round again
            // so that no kick is lost.
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(index, "Cannot enable queue notifications: {e}");
                    break;
                }
            }
        }
        self.reap(vrings, false);
        self.notify(vrings);
        self.publish_metrics();
    }

    /// Handles the engine's completion eventfd: returns finished requests, then, if chains
    /// were left in the rings for want of budget and the gate is open again, takes them up.
    pub fn process_completions(&mut self, vrings: &[Vring], event_idx: bool, dev: &DeviceInfo) {
        self.remember_vrings(vrings);
        self.reap(vrings, false);
        if self.starved && !self.quiescing && self.gate_open() {
            self.starved = false;
            self.resume_queues(vrings, event_idx, dev);
        }
        self.notify(vrings);
        self.publish_metrics();
    }

    /// Goes round every ready queue taking chains until the gate closes (after a wait under
    /// the limits or for budget).
    fn resume_queues(&mut self, vrings: &[Vring], event_idx: bool, dev: &DeviceInfo) {
        for index in 0..vrings.len() {
            if !self.gate_open() {
                break;
            }
            let ready = self.broken & (1 << index) == 0 && {
                let state = vrings[index].get_ref();
                state.is_enabled() && state.get_queue().ready()
            };
            if ready {
                self.process_queue(vrings, index, event_idx, dev);
            }
        }
    }

    /// Blocks until every request in flight on local queue `index` has completed to the used
    /// ring (GET_VRING_BASE). Requests of this thread's other queues that finish meanwhile are
    /// completed too.
    pub fn stop_queue(&mut self, index: usize) {
        if self.held.as_ref().is_some_and(|h| h.queue == index) {
            self.release_held();
        }
        let vrings = std::mem::take(&mut self.vrings);
        while self.queue_in_flight(index) > 0 {
            if self.io.in_flight() == 0 {
                error!(
                    index,
                    "Requests still pending on a stopping queue but none in the engine"
                );
                self.abandon_queue(&vrings, index);
                break;
            }
            self.reap(&vrings, true);
        }
        self.notify(&vrings);
        self.vrings = vrings;
        self.publish_metrics();
        // Whenever the queue starts again it is set up afresh (the frontend may reset it, or
        // share another area, in between).
        if let Some(t) = self.tracked.get_mut(index) {
            *t = TrackedQueue::default();
        }
        if index < 64 {
            self.broken &= !(1 << index);
        }
    }

    /// Handles the throttle timer: submits the held chain once its time has come, then takes
    /// chains from every ready queue again until the gate closes.
    pub fn process_timer(&mut self, vrings: &[Vring], event_idx: bool, dev: &DeviceInfo) {
        self.remember_vrings(vrings);
        if let Some((_, timer)) = &mut self.throttle {
            timer.clear();
        }
        if self.paused {
            return;
        }
        if let Some(held) = &self.held {
            let now = Instant::now();
            if now < held.until {
                // Early (a timer armed for an older wait): wait for the rest.
                let rest = held.until - now;
                if let Some((_, timer)) = &mut self.throttle {
                    if timer.arm(rest).is_ok() {
                        return;
                    }
                }
            }
            self.release_held();
        }
        self.resume_queues(vrings, event_idx, dev);
        self.reap(vrings, false);
        self.notify(vrings);
        self.publish_metrics();
    }

    /// Reads the throttle timer's expiry, so that its descriptor stops firing.
    pub fn clear_timer(&mut self) {
        if let Some((_, timer)) = &mut self.throttle {
            timer.clear();
        }
    }

    /// Submits the held chain now and counts the time it waited.
    fn release_held(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let waited = held.taken.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.add_throttled(waited);
        }
        let Some(vring) = self.vrings.get(held.queue).cloned() else {
            warn!(queue = held.queue, "A held request's queue is gone");
            return;
        };
        let mem = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        self.start_chain(&mut state, held.queue, held.head, &mem, &held.dev, true);
    }

    /// Completes every request in flight on every queue of this worker to the used rings and
    /// notifies the guest (see [`crate::backend::BlkBackend::quiesce`]).
    pub fn quiesce(&mut self) {
        self.quiescing = true;
        if let Some(queue) = self.held.as_ref().map(|h| h.queue) {
            self.stop_queue(queue);
        }
        for index in 0..self.in_flight_per_queue.len() {
            if self.queue_in_flight(index) > 0 {
                self.stop_queue(index);
            }
        }
    }

    /// Once per turn: publishes the requests in flight and what the engine's caches counted
    /// since the last turn.
    fn publish_metrics(&mut self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let in_flight =
            self.in_flight_per_queue.iter().sum::<u32>() + u32::from(self.held.is_some());
        metrics.set_in_flight(u64::from(in_flight));
        let stats = self.io.cache_stats();
        if stats != self.cache_published {
            metrics.add_cache(stats.since(self.cache_published));
            self.cache_published = stats;
        }
    }

    /// Counts a request returned to the used ring just now.
    fn record(&self, started: Option<Instant>, op: Operation, ok: bool, bytes: u64) {
        if let (Some(metrics), Some(started)) = (&self.metrics, started) {
            metrics.record(op, ok, bytes, started.elapsed());
        }
    }

    fn pop_requests(
        &mut self,
        vring: &Vring,
        index: usize,
        mem: &Arc<GuestMemoryMmap>,
        dev: &DeviceInfo,
    ) {
        let mut state = vring.get_mut();
        while self.gate_open() && self.broken & (1 << index) == 0 {
            let head = match next_avail(&mut state, mem) {
                Avail::Chain(head) => head,
                Avail::Empty => break,
                Avail::Broken(why) => {
                    // Taking nothing more from this ring is the only way not to spin on it:
                    // the ring keeps saying it has chains, and none can be taken.
                    self.broken |= 1 << index;
                    error!(
                        queue = self.global_queue(index),
                        "The driver broke the available ring ({why}): the queue takes no more \
                         requests until the frontend sets it up again"
                    );
                    break;
                }
            };
            // Recorded before the request has any effect, so that if this process dies from
            // here on, the next one resubmits the chain.
            if let Some(tracker) = self.tracker_mut(index) {
                tracker.taken(head);
            }
            self.start_chain(&mut state, index, head, mem, dev, false);
        }
    }

    /// Prepares the chain of `head` on local queue `index` and submits it, or answers it at
    /// once, or holds it when the export's limits say it must wait (unless `admitted`: it
    /// waited already, or is resubmitted after a reconnect). For chains just taken from the
    /// available ring and for chains resubmitted after a reconnect alike.
    fn start_chain(
        &mut self,
        state: &mut RingState,
        index: usize,
        head: u16,
        mem: &Arc<GuestMemoryMmap>,
        dev: &DeviceInfo,
        admitted: bool,
    ) {
        let started = self.metrics.is_some().then(Instant::now);
        let queue = state.get_queue();
        let mut walker =
            ChainWalker::new(mem, GuestAddress(queue.desc_table()), queue.size(), head);
        let (mut prepared, mut malformed) = prepare(&mut walker, mem, dev, &mut self.scratch);
        if let Some(why) = walker.error() {
            debug!(index, head, ?why, "Malformed descriptor chain");
            prepared = prepared.into_ioerr();
            malformed = Some(Malformed::Chain);
        }
        if let Some(why) = malformed {
            debug!(index, head, ?why, "Malformed request");
        }
        let (op, ok_len, status, bytes) = match prepared {
            Prepared::Done { status, used_len } => {
                if let Some((addr, code)) = status {
                    write_status(mem, addr, code);
                }
                self.return_chain(state, index, head, used_len);
                let ok = matches!(status, Some((_, STATUS_OK)));
                // On success everything written but the status byte is payload (GET_ID).
                let bytes = u64::from(used_len.saturating_sub(1));
                let op = Operation::of(self.scratch.request_type);
                self.record(started, op, ok, bytes);
                return;
            }
            Prepared::Read {
                offset,
                len,
                status,
            } => (Op::Read(offset), len + 1, status, u64::from(len)),
            Prepared::Write {
                offset,
                len,
                status,
            } => (Op::Write(offset), 1, status, u64::from(len)),
            Prepared::Flush { status } => (Op::Flush, 1, status, 0),
            Prepared::Discard { status } => (Op::Discard, 1, status, self.ranges_bytes()),
            Prepared::WriteZeroes { status } => (Op::WriteZeroes, 1, status, self.ranges_bytes()),
        };
        if !admitted {
            if let Some((throttle, timer)) = &mut self.throttle {
                let wait_ns = match op {
                    Op::Read(_) => throttle.admit(false, bytes),
                    Op::Write(_) | Op::WriteZeroes => throttle.admit(true, bytes),
                    Op::Flush | Op::Discard => 0,
                };
                if wait_ns > 0 {
                    let now = Instant::now();
                    let wait = std::time::Duration::from_nanos(wait_ns);
                    match timer.arm(wait) {
                        Ok(()) => {
                            self.held = Some(Held {
                                queue: index,
                                head,
                                dev: dev.clone(),
                                taken: now,
                                until: now + wait,
                            });
                            return;
                        }
                        // Without a timer the request cannot wait: it goes now.
                        Err(e) => warn!("Cannot arm the throttle timer: {e}"),
                    }
                }
            }
        }

        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                // Bounded by the sum of this thread's queue sizes (each chain is in flight at
                // most once), far below u32::MAX.
                self.slots.push(Slot::FREE);
                (self.slots.len() - 1) as u32
            }
        };
        let token = u64::from(slot);
        self.slots[slot as usize] = Slot {
            head,
            // Local queue indexes are below MAX_QUEUES (64).
            queue: index as u8,
            status,
            ok_len,
            pending: 0,
            failed: false,
            mem: Some(Arc::clone(mem)),
            op: op.operation(),
            bytes,
            started,
            // The data a read or write asks for; the others carry none.
            budget_bytes: match op {
                Op::Read(_) | Op::Write(_) => bytes,
                _ => 0,
            },
        };
        let (submitted, refused) = self.submit(op, token);
        if let Some(e) = &refused {
            // Refusals are the guest's doing (or a read-only export) and can come at request
            // rate: not worth more than a debug line each.
            debug!(index, head, "Request refused by the engine: {e}");
        }
        let slot_state = &mut self.slots[slot as usize];
        slot_state.pending = submitted;
        slot_state.failed = refused.is_some();
        if submitted > 0 {
            if let Some(n) = self.in_flight_per_queue.get_mut(index) {
                *n += 1;
            }
            let budget_bytes = slot_state.budget_bytes;
            self.budget.take(budget_bytes);
            return;
        }
        // Nothing reached the engine: answer now.
        slot_state.mem = None;
        self.free.push(slot);
        write_status(mem, status, STATUS_IOERR);
        self.return_chain(state, index, head, 1);
        self.record(started, op.operation(), false, bytes);
    }

    /// Adds chain `head` of local queue `index` to its used ring, recording it in the
    /// in-flight area in libvhost-user's order: the head about to be returned, the used
    /// element and index (virtio-queue stores the index with release ordering), then the
    /// chain's flag cleared and the new index copied.
    fn return_chain(&mut self, state: &mut RingState, index: usize, head: u16, len: u32) {
        let tracker = self.tracked.get(index).and_then(|t| t.tracker.as_ref());
        if let Some(t) = tracker {
            t.returning(head);
        }
        match state.add_used(head, len) {
            Ok(()) => {
                if let Some(t) = tracker {
                    t.returned(head, state.get_queue().next_used());
                }
            }
            Err(e) => warn!(index, head, "Cannot return a request to the guest: {e}"),
        }
        self.dirty |= 1 << index;
    }

    fn tracker_mut(&mut self, index: usize) -> Option<&mut QueueTracker> {
        self.tracked.get_mut(index).and_then(|t| t.tracker.as_mut())
    }

    /// Before local queue `index` is processed: when the connection's in-flight area is new
    /// to this queue, sets the queue up with it. A new area is initialised; one a previous
    /// backend used is recovered from (libvhost-user's `vu_check_queue_inflights`): the queue
    /// resumes taking chains after the ones that backend had taken (whatever SET_VRING_BASE
    /// said), and the chains it left in flight are resubmitted, oldest first.
    fn sync_inflight(
        &mut self,
        vring: &Vring,
        index: usize,
        mem: &Arc<GuestMemoryMmap>,
        dev: &DeviceInfo,
    ) {
        let Some(link) = &self.inflight else {
            return;
        };
        let generation = link.shared.generation();
        if self.tracked.get(index).map_or(0, |t| t.generation) == generation {
            return;
        }
        let (generation, area) = link.shared.current();
        let global = index * link.threads + link.thread;
        if self.tracked.len() <= index {
            self.tracked.resize_with(index + 1, TrackedQueue::default);
        }
        self.tracked[index] = TrackedQueue {
            generation,
            tracker: None,
        };
        let Some(area) = area else {
            return;
        };
        let Some(mut tracker) = QueueTracker::new(area, global) else {
            warn!(
                queue = global,
                "The in-flight area has no room for this queue: its requests are not tracked"
            );
            return;
        };
        if self.queue_in_flight(index) > 0 {
            // Not something QEMU does (it shares the area before it starts the queues): the
            // requests in flight are not in the new area, which cannot describe the queue
            // until it is stopped and started again.
            warn!(
                queue = global,
                "In-flight area shared while requests are in flight: not tracked until the \
                 queue restarts"
            );
            return;
        }
        let mut state = vring.get_mut();
        let queue = state.get_queue();
        let used = match queue.used_idx(&**mem, std::sync::atomic::Ordering::Acquire) {
            Ok(used) => used.0,
            Err(e) => {
                warn!(
                    queue = global,
                    "Cannot read the used index: requests not tracked: {e}"
                );
                return;
            }
        };
        let avail = queue
            .avail_idx(&**mem, std::sync::atomic::Ordering::Acquire)
            .map_or(used, |a| a.0);
        let recovery = tracker.recover(used, queue.size());
        let Recovery::Resume {
            next_avail,
            resubmit,
            fixed_last_batch,
        } = recovery
        else {
            self.tracked[index].tracker = Some(tracker);
            return;
        };
        // The chains in flight are among those the driver made available and the device has
        // not returned: more than that, and the area does not describe this ring.
        let available = avail.wrapping_sub(used);
        if resubmit.len() > usize::from(available) {
            error!(
                queue = global,
                in_flight = resubmit.len(),
                available,
                "The in-flight area does not match the ring: its requests are not resubmitted"
            );
            tracker.reset(used);
            self.tracked[index].tracker = Some(tracker);
            return;
        }
        self.tracked[index].tracker = Some(tracker);
        let set_base = state.get_queue().next_avail();
        if !resubmit.is_empty() || next_avail != set_base || fixed_last_batch {
            info!(
                queue = global,
                used,
                resubmitted = resubmit.len(),
                next_avail,
                "Resuming the requests a previous daemon left in flight"
            );
        }
        state.get_queue_mut().set_next_avail(next_avail);
        for head in resubmit {
            self.start_chain(&mut state, index, head, mem, dev, true);
        }
        drop(state);
        // In case the previous daemon died between returning a chain and notifying the guest.
        if let Err(e) = vring.signal_used_queue() {
            warn!(queue = global, "Cannot notify the guest: {e}");
        }
    }

    /// Bytes covered by the ranges of the discard or write-zeroes request just prepared.
    fn ranges_bytes(&self) -> u64 {
        self.scratch.ranges.iter().map(|r| r.len).sum()
    }

    /// Submits the engine requests of the chain prepared in `self.scratch` with `token`.
    /// Returns how many were accepted and, if one was refused, why (the ones after it are not
    /// submitted).
    fn submit(&mut self, op: Op, token: u64) -> (u32, Option<B::SubmitError>) {
        let one = |r: Result<(), B::SubmitError>| match r {
            Ok(()) => (1, None),
            Err(e) => (0, Some(e)),
        };
        match op {
            Op::Read(offset) => {
                // SAFETY: `prepare` built the iovecs from regions of the memory snapshot whose
                // Arc the slot of `token` holds; that clone lives until the completion for
                // `token` is processed (or, if the worker is dropped first, until the I/O
                // engine has been drained), so the mapping outlives the I/O. They are the
                // chain's device-writable buffers, which the driver does not touch while the
                // request is in flight (if a broken driver does, it only garbles its own data:
                // the memory is a shared mapping, accessed by the kernel and raw copies).
                one(unsafe { self.io.submit_read(token, offset, &self.scratch.iov) })
            }
            Op::Write(offset) => {
                // SAFETY: as for reads: the mapping outlives the I/O; the buffers are the
                // chain's device-readable ones and are only read.
                one(unsafe { self.io.submit_write(token, offset, &self.scratch.iov) })
            }
            Op::Flush => one(self.io.submit_flush(token)),
            Op::Discard | Op::WriteZeroes => {
                let mut submitted = 0;
                for r in &self.scratch.ranges {
                    let result = match op {
                        Op::Discard => self.io.submit_discard(token, r.offset, r.len),
                        _ => self.io.submit_write_zeroes(token, r.offset, r.len, r.unmap),
                    };
                    match result {
                        Ok(()) => submitted += 1,
                        Err(e) => return (submitted, Some(e)),
                    }
                }
                (submitted, None)
            }
        }
    }

    /// Collects finished requests from the engine (blocking for at least one if `block`) and
    /// returns them to their queues.
    fn reap(&mut self, vrings: &[Vring], block: bool) {
        let mut done = std::mem::take(&mut self.done);
        if block {
            self.io.wait(&mut done);
        } else {
            self.io.poll(&mut done);
        }
        for (token, result) in done.drain(..) {
            let ok = match result {
                Ok(()) => true,
                Err(e) => {
                    if self.note_error() {
                        warn!(token, "Request failed: {e}");
                    }
                    false
                }
            };
            self.complete(vrings, token, ok);
        }
        self.done = done;
    }

    fn complete(&mut self, vrings: &[Vring], token: u64, ok: bool) {
        let Some(slot) = usize::try_from(token)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            error!(token, "Completion for an unknown request");
            return;
        };
        if slot.mem.is_none() || slot.pending == 0 {
            error!(token, "Completion for a request that is not in flight");
            return;
        }
        slot.failed |= !ok;
        slot.pending -= 1;
        if slot.pending > 0 {
            // More segments of the same chain to come.
            return;
        }
        let Some(mem) = slot.mem.take() else {
            return;
        };
        let (code, len) = if !slot.failed {
            (STATUS_OK, slot.ok_len)
        } else {
            (STATUS_IOERR, 1)
        };
        write_status(&mem, slot.status, code);
        let (queue, head) = (usize::from(slot.queue), slot.head);
        let (op, bytes, started, ok) = (slot.op, slot.bytes, slot.started, !slot.failed);
        let budget_bytes = slot.budget_bytes;
        drop(mem);
        self.budget.give(budget_bytes);
        // In range: `token` indexed `slots`, whose length fits u32 (see `pop_requests`).
        self.free.push(token as u32);
        if let Some(n) = self.in_flight_per_queue.get_mut(queue) {
            *n = n.saturating_sub(1);
        }
        match vrings.get(queue) {
            Some(vring) => {
                self.return_chain(&mut vring.get_mut(), queue, head, len);
                self.record(started, op, ok, bytes);
            }
            None => error!(queue, "Completion for a queue this worker does not know"),
        }
    }

    /// Fails every request still recorded on local queue `index` (used only when the engine
    /// lost track of them, which is a bug).
    fn abandon_queue(&mut self, vrings: &[Vring], index: usize) {
        let stuck: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mem.is_some() && usize::from(s.queue) == index)
            .map(|(i, _)| i as u64)
            .collect();
        for token in stuck {
            if let Some(slot) = self.slots.get_mut(token as usize) {
                slot.pending = 1;
            }
            self.complete(vrings, token, false);
        }
    }

    /// For a connection whose threads are gone: polls the engine once, dropping what completed
    /// (nobody reads the rings any more; see [`Worker::finish`]). Returns the requests still in
    /// flight and whether any completed.
    pub fn pump(&mut self) -> (usize, bool) {
        self.io.poll(&mut self.done);
        let moved = !self.done.is_empty();
        self.done.clear();
        (self.io.in_flight(), moved)
    }

    /// Ends this worker's part of a connection whose threads are gone: waits for every request
    /// still in flight (their chains are not returned: nobody reads the rings any more), then
    /// makes every completed write durable and gives back the engine's reservations
    /// ([`BlockIo::finish`]). Idempotent: a second call finds nothing to do but flush again.
    pub fn finish(&mut self) -> Result<(), B::SubmitError> {
        self.finished = true;
        while self.io.in_flight() > 0 {
            let before = self.io.in_flight();
            self.io.wait(&mut self.done);
            let progressed = !self.done.is_empty() || self.io.in_flight() < before;
            self.done.clear();
            if !progressed {
                error!(
                    in_flight = self.io.in_flight(),
                    "The engine stopped completing requests; flushing what completed"
                );
                break;
            }
        }
        let finished = self.io.finish();
        self.publish_metrics();
        if let Some(metrics) = &self.metrics {
            // Whatever was still in flight will never be returned to the guest.
            metrics.set_in_flight(0);
        }
        finished
    }

    /// Gives this worker's part of a connection up without waiting or flushing (its engine
    /// stopped completing requests): dropping it then does not wait either.
    pub fn abandon(&mut self) {
        self.finished = true;
        if let Some(metrics) = &self.metrics {
            metrics.set_in_flight(0);
        }
    }

    /// Signals every queue that got used entries, when the driver asked for it.
    fn notify(&mut self, vrings: &[Vring]) {
        while self.dirty != 0 {
            let queue = self.dirty.trailing_zeros() as usize;
            self.dirty &= self.dirty - 1;
            let Some(vring) = vrings.get(queue) else {
                continue;
            };
            let needed = vring.needs_notification().unwrap_or_else(|e| {
                warn!(queue, "Cannot read the driver's notification index: {e}");
                true
            });
            if needed {
                if let Err(e) = vring.signal_used_queue() {
                    warn!(queue, "Cannot notify the guest: {e}");
                }
            }
        }
    }

    /// Counts a failed request; true if it should be logged (the first few, then every power
    /// of two), so a broken disk cannot flood the log.
    fn note_error(&mut self) -> bool {
        self.errors += 1;
        self.errors <= LOUD_ERRORS || self.errors.is_power_of_two()
    }
}

impl<B: BlockIo> Drop for Worker<B> {
    fn drop(&mut self) {
        // The owner normally calls `finish` and reports its result; if it did not (an error
        // path), do it here so that nothing written is dropped, and so that the kernel is done
        // with guest buffers before the memory snapshots in the slots go.
        if !self.finished {
            if let Err(e) = self.finish() {
                error!("Cannot make the writes of a closed connection durable: {e}");
            }
        }
    }
}

/// Takes the next chain from the available ring of `state`'s queue, unless the ring is empty
/// or broken. virtio-queue's own `pop_descriptor_chain` answers `None` for both (logging an
/// error each time), while its `enable_notification` goes on reporting chains to take: a
/// worker that trusted the two would spin on a broken ring forever, never back in its event
/// loop, and the connection could never end. A driver (or a frontend that truncated the
/// memory the ring lies in, which then reads as zeros) controls the ring, so this is the
/// guest's to break, and the queue's alone to suffer.
fn next_avail(state: &mut RingState, mem: &GuestMemoryMmap) -> Avail {
    let queue = state.get_queue_mut();
    let size = queue.size();
    let next = std::num::Wrapping(queue.next_avail());
    let idx = match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx,
        Err(e) => return Avail::Broken(format!("its index cannot be read: {e}")),
    };
    if idx == next {
        return Avail::Empty;
    }
    if (idx - next).0 > size {
        return Avail::Broken(format!(
            "its index {} is more than the queue size {size} ahead of the device's {}",
            idx.0, next.0
        ));
    }
    match queue.iter(mem) {
        Ok(mut chains) => match chains.next() {
            Some(chain) => Avail::Chain(chain.head_index()),
            None => Avail::Broken(format!("its entry {} cannot be read", next.0)),
        },
        Err(e) => Avail::Broken(e.to_string()),
    }
}

fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, code: u8) {
    // `prepare` checked that the status byte is inside guest memory.
    if let Err(e) = mem.write_obj(code, addr) {
        warn!("Cannot write a request status at {:#x}: {e}", addr.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_blk::{ID_BYTES, STATUS_UNSUPP};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use crate::metrics::exposition::{ExportSnapshot, OpSnapshot};
    use crate::metrics::{ExportLabels, Metrics};

    /// What a submitted request does.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum FakeOp {
        /// Offset and buffers.
        Read(u64, Vec<(usize, usize)>),
        /// Offset and the bytes, copied at submission.
        Write(u64, Vec<u8>),
        /// Offset, length, unmap.
        Zeroes(u64, u64, bool),
        /// Offset, length.
        Discard(u64, u64),
        Flush,
    }

    impl FakeOp {
        fn offset(&self) -> Option<u64> {
            match self {
                FakeOp::Read(o, _) | FakeOp::Write(o, _) => Some(*o),
                FakeOp::Zeroes(o, _, _) | FakeOp::Discard(o, _) => Some(*o),
                FakeOp::Flush => None,
            }
        }
    }

    /// Performs requests synchronously when polled: byte i of the disk reads as `pattern(i)`.
    #[derive(Default)]
    struct FakeIo {
        pending: Vec<(u64, FakeOp)>,
        /// Every request submitted, in order.
        log: Vec<(u64, FakeOp)>,
        /// While true, `poll` finishes nothing (only `wait` does).
        hold: bool,
        /// Requests at this offset fail when they complete.
        fail_offset: Option<u64>,
        /// Requests at this offset are refused at submission.
        refuse_offset: Option<u64>,
        /// Last `set_writethrough`.
        writethrough: Option<bool>,
        /// `finish` calls: requests in flight at the time of each (shared, to be read after the
        /// worker is dropped).
        finished: Arc<std::sync::Mutex<Vec<usize>>>,
        /// What `cache_stats` reports.
        cache: CacheStats,
    }

    fn pattern(i: u64) -> u8 {
        (i % 251) as u8
    }

    impl FakeIo {
        fn complete_all(&mut self, out: &mut Vec<Done<String>>) {
            for (token, op) in self.pending.drain(..) {
                if op.offset().is_some() && op.offset() == self.fail_offset {
                    out.push((token, Err("injected failure".to_string())));
                    continue;
                }
                if let FakeOp::Read(offset, iov) = op {
                    let mut pos = offset;
                    for (base, len) in iov {
                        for i in 0..len {
                            // SAFETY: the worker guarantees the iovec is valid for writes
                            // until this completion is returned.
                            unsafe { *(base as *mut u8).add(i) = pattern(pos) };
                            pos += 1;
                        }
                    }
                }
                out.push((token, Ok(())));
            }
        }

        fn push(&mut self, token: u64, op: FakeOp) -> Result<(), String> {
            if op.offset().is_some() && op.offset() == self.refuse_offset {
                return Err("refused".into());
            }
            self.log.push((token, op.clone()));
            self.pending.push((token, op));
            Ok(())
        }
    }

    impl BlockIo for FakeIo {
        type SubmitError = String;
        type IoError = String;

        unsafe fn submit_read(
            &mut self,
            token: u64,
            offset: u64,
            iov: &[libc::iovec],
        ) -> Result<(), String> {
            let iov = iov
                .iter()
                .map(|v| (v.iov_base as usize, v.iov_len))
                .collect();
            self.push(token, FakeOp::Read(offset, iov))
        }

        unsafe fn submit_write(
            &mut self,
            token: u64,
            offset: u64,
            iov: &[libc::iovec],
        ) -> Result<(), String> {
            let mut data = Vec::new();
            for v in iov {
                // SAFETY: the worker guarantees the iovec is valid for reads of its length
                // until the completion.
                data.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                });
            }
            self.push(token, FakeOp::Write(offset, data))
        }

        fn submit_write_zeroes(
            &mut self,
            token: u64,
            offset: u64,
            len: u64,
            unmap: bool,
        ) -> Result<(), String> {
            self.push(token, FakeOp::Zeroes(offset, len, unmap))
        }

        fn submit_discard(&mut self, token: u64, offset: u64, len: u64) -> Result<(), String> {
            self.push(token, FakeOp::Discard(offset, len))
        }

        fn submit_flush(&mut self, token: u64) -> Result<(), String> {
            self.push(token, FakeOp::Flush)
        }

        fn set_writethrough(&mut self, on: bool) {
            self.writethrough = Some(on);
        }

        fn finish(&mut self) -> Result<(), String> {
            self.finished.lock().unwrap().push(self.pending.len());
            Ok(())
        }

        fn poll(&mut self, out: &mut Vec<Done<String>>) {
            if !self.hold {
                self.complete_all(out);
            }
        }

        fn wait(&mut self, out: &mut Vec<Done<String>>) {
            self.complete_all(out);
        }

        fn in_flight(&self) -> usize {
            self.pending.len()
        }

        fn cache_stats(&self) -> CacheStats {
            self.cache
        }
    }

    const QSIZE: u16 = 16;

    fn device() -> DeviceInfo {
        let mut serial = [0u8; ID_BYTES];
        serial[..4].copy_from_slice(b"test");
        DeviceInfo {
            capacity: 1 << 20,
            read_only: true,
            serial,
        }
    }

    fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = 0;
        if write {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    fn write_header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&t.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    struct Harness {
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        vring: Vring,
    }

    impl Harness {
        fn new() -> Self {
            let mem = GuestMemoryAtomic::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
            );
            let vring = <Vring as VringT<_>>::new(mem.clone(), QSIZE).unwrap();
            Harness { mem, vring }
        }

        /// Lays out the rings, writes `descs` (chains linked by their `next` fields) and makes
        /// them available; returns the queue's ring addresses for reading the used ring.
        fn queue(&self, descs: &[RawDescriptor]) -> u64 {
            let guard = self.mem.memory();
            let vq = MockSplitQueue::new(&*guard, QSIZE);
            vq.add_desc_chains(descs, 0).unwrap();
            self.vring
                .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .unwrap();
            self.vring.set_queue_size(QSIZE);
            self.vring.set_queue_ready(true);
            self.vring.set_enabled(true);
            vq.used_addr().0
        }

        /// (head, len) of used entry `i`, and the used index.
        fn used(&self, used_addr: u64, i: u64) -> (u32, u32) {
            let m = self.mem.memory();
            let at = GuestAddress(used_addr + 4 + 8 * i);
            (
                m.read_obj::<u32>(at).unwrap(),
                m.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
            )
        }

        fn used_idx(&self, used_addr: u64) -> u16 {
            self.mem
                .memory()
                .read_obj::<u16>(GuestAddress(used_addr + 2))
                .unwrap()
        }

        fn byte(&self, at: u64) -> u8 {
            self.mem.memory().read_obj::<u8>(GuestAddress(at)).unwrap()
        }
    }

    use vm_memory::Address;

    #[test]
    fn malformed_chains_get_ioerr_or_are_dropped_and_good_requests_still_complete() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        write_header(&m, 0x1100, VIRTIO_BLK_T_IN, 2);
        write_header(&m, 0x1200, 77, 0);
        for status in [0x5000u64, 0x5001, 0x5002] {
            m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        }
        let descs = [
            // 0..2: read whose data buffer lies outside guest memory -> IOERR.
            desc(0x1000, 16, false, Some(1)),
            desc(0x4000_0000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
            // 3: header only, no status byte -> dropped with len 0.
            desc(0x1000, 16, false, None),
            // 4..6: good read of sectors 2..4.
            desc(0x1100, 16, false, Some(5)),
            desc(0x8000, 1024, true, Some(6)),
            desc(0x5001, 1, true, None),
            // 7..8: unknown request type -> UNSUPP.
            desc(0x1200, 16, false, Some(8)),
            desc(0x5002, 1, true, None),
        ];
        let used_addr = h.queue(&descs);

        let mut w = Worker::new(FakeIo::default(), h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());

        assert_eq!(h.used_idx(used_addr), 4);
        // Immediate answers come first, in ring order; the read completes after the poll.
        assert_eq!(h.used(used_addr, 0), (0, 1));
        assert_eq!(h.used(used_addr, 1), (3, 0));
        assert_eq!(h.used(used_addr, 2), (7, 1));
        assert_eq!(h.used(used_addr, 3), (4, 1025));
        assert_eq!(h.byte(0x5000), STATUS_IOERR);
        assert_eq!(h.byte(0x5001), STATUS_OK);
        assert_eq!(h.byte(0x5002), STATUS_UNSUPP);
        for i in 0..1024u64 {
            assert_eq!(h.byte(0x8000 + i), pattern(1024 + i), "byte {i}");
        }
        assert_eq!(w.queue_in_flight(0), 0);
        // The slot was recycled: a second round reuses it.
        assert_eq!(w.slots.len(), 1);
        assert_eq!(w.free.len(), 1);
    }

    #[test]
    fn chains_wait_in_the_ring_while_over_budget_and_are_taken_as_requests_complete() {
        let h = Harness::new();
        let m = h.mem.memory();
        // Five reads of 4 KiB, all into the same guest buffer (the budget counts bytes asked
        // for, not distinct memory).
        let mut descs = Vec::new();
        for i in 0..5u16 {
            write_header(
                &m,
                0x1000 + 0x100 * u64::from(i),
                VIRTIO_BLK_T_IN,
                u64::from(i),
            );
            descs.push(desc(
                0x1000 + 0x100 * u64::from(i),
                16,
                false,
                Some(3 * i + 1),
            ));
            descs.push(desc(0x8000, 4096, true, Some(3 * i + 2)));
            descs.push(desc(0x5000 + u64::from(i), 1, true, None));
        }
        let used_addr = h.queue(&descs);
        let io = FakeIo {
            hold: true,
            ..FakeIo::default()
        };
        let unlimited = Limits {
            bytes: u64::MAX,
            requests: u32::MAX,
        };
        let gate = Gate::new(
            Limits {
                bytes: 8192,
                requests: 100,
            },
            Arc::new(ConnectionBudget::new(unlimited)),
            0,
        );
        let mut w = Worker::new(io, h.mem.clone()).with_budget(gate);
        let vrings = std::slice::from_ref(&h.vring);
        w.process_queue(vrings, 0, true, &device());
        assert_eq!(w.io().pending.len(), 2, "8 KiB in flight");
        assert!(w.starved);
        // Nothing kicks again: completions alone bring the rest in, two at a time.
        w.io.hold = false;
        let mut turns = 0;
        while h.used_idx(used_addr) < 5 {
            turns += 1;
            assert!(turns <= 4, "stuck at {} used", h.used_idx(used_addr));
            w.process_completions(vrings, true, &device());
            assert!(w.io().pending.len() <= 2);
            assert!(w.budget.in_flight().0 <= 8192);
        }
        assert_eq!(w.io().log.len(), 5);
        let offsets: Vec<Option<u64>> = w.io().log.iter().map(|(_, op)| op.offset()).collect();
        assert_eq!(
            offsets,
            (0..5u64).map(|i| Some(i * 512)).collect::<Vec<_>>(),
            "in ring order"
        );
        for i in 0..5 {
            assert_eq!(h.byte(0x5000 + i), STATUS_OK);
        }
        assert!(!w.starved);
        assert_eq!(w.budget.in_flight(), (0, 0));
    }

    #[test]
    fn engine_failure_becomes_ioerr() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        let descs = [
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
        ];
        let used_addr = h.queue(&descs);
        let io = FakeIo {
            fail_offset: Some(512),
            ..FakeIo::default()
        };
        let mut w = Worker::new(io, h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device());
        assert_eq!(h.used_idx(used_addr), 1);
        assert_eq!(h.used(used_addr, 0), (0, 1));
        assert_eq!(h.byte(0x5000), STATUS_IOERR);
    }

    /// A driver's available index more than the queue size ahead of the device's: with
    /// EVENT_IDX the ring would go on saying it has chains that cannot be taken. The worker
    /// returns to its loop (instead of spinning), takes nothing more from that ring, and
    /// takes chains again once the queue was stopped and set up anew.
    #[test]
    fn a_broken_available_index_stops_the_queue_instead_of_spinning() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        let descs = [
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
        ];
        let used_addr = h.queue(&descs);
        let vrings = std::slice::from_ref(&h.vring);
        let mut w = Worker::new(FakeIo::default(), h.mem.clone());
        w.process_queue(vrings, 0, true, &device());
        assert_eq!(h.used_idx(used_addr), 1);
        let avail_idx = GuestAddress(h.vring.get_ref().get_queue().avail_ring() + 2);
        // One chain taken; the index now says QSIZE + 1 more.
        m.write_obj(2 + QSIZE, avail_idx).unwrap();
        w.process_queue(vrings, 0, true, &device());
        assert_ne!(w.broken & 1, 0);
        assert_eq!(h.used_idx(used_addr), 1);
        // A plausible index again: the queue still takes nothing until it is set up anew.
        m.write_obj(2u16, avail_idx).unwrap();
        w.process_queue(vrings, 0, true, &device());
        assert_eq!(h.used_idx(used_addr), 1);
        w.stop_queue(0);
        assert_eq!(w.broken, 0);
        w.process_queue(vrings, 0, true, &device());
        assert_eq!(h.used_idx(used_addr), 2);
    }

    #[test]
    fn stop_queue_waits_for_requests_in_flight() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        write_header(&m, 0x1100, VIRTIO_BLK_T_FLUSH, 0);
        let descs = [
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
            desc(0x1100, 16, false, Some(4)),
            desc(0x5001, 1, true, None),
        ];
        let used_addr = h.queue(&descs);
        let io = FakeIo {
            hold: true,
            ..FakeIo::default()
        };
        let mut w = Worker::new(io, h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device());
        assert_eq!(h.used_idx(used_addr), 0, "nothing finished yet");
        assert_eq!(w.queue_in_flight(0), 2);

        w.stop_queue(0);
        assert_eq!(w.queue_in_flight(0), 0);
        assert_eq!(h.used_idx(used_addr), 2);
        assert_eq!(h.used(used_addr, 0), (0, 513));
        assert_eq!(h.used(used_addr, 1), (3, 1));
        assert_eq!(h.byte(0x5000), STATUS_OK);
        assert_eq!(h.byte(0x5001), STATUS_OK);
    }

    fn device_rw() -> DeviceInfo {
        DeviceInfo {
            read_only: false,
            ..device()
        }
    }

    /// Writes virtio_blk_discard_write_zeroes structs at `at`; returns their length.
    fn write_segments(mem: &GuestMemoryMmap, at: u64, segs: &[(u64, u32, u32)]) -> u32 {
        for (i, &(sector, num, flags)) in segs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num.to_le_bytes());
            raw[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(at + 16 * i as u64))
                .unwrap();
        }
        16 * segs.len() as u32
    }

    /// Queues five requests on the harness's ring: a write of 1024 bytes (0xab), a discard of
    /// three 4 KiB ranges, a write-zeroes of 4 KiB, a flush, and a discard with the unmap flag
    /// (UNSUPP); status bytes at 0x5000..0x5005 start as 0xee. Returns the used ring's address.
    fn queue_mixed_requests(h: &Harness) -> u64 {
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_OUT, 2);
        m.write_slice(&[0xab; 1024], GuestAddress(0x8000)).unwrap();
        write_header(&m, 0x1100, VIRTIO_BLK_T_DISCARD, 0);
        let d = write_segments(&m, 0x6000, &[(0, 8, 0), (16, 8, 0), (64, 8, 0)]);
        write_header(&m, 0x1200, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let z = write_segments(&m, 0x6100, &[(8, 8, 1)]);
        write_header(&m, 0x1300, VIRTIO_BLK_T_FLUSH, 0);
        write_header(&m, 0x1400, VIRTIO_BLK_T_DISCARD, 0);
        let bad = write_segments(&m, 0x6200, &[(8, 8, 1)]);
        for status in 0x5000u64..0x5005 {
            m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        }
        let descs = [
            // 0..2: write of 1024 bytes: OK.
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 1024, false, Some(2)),
            desc(0x5000, 1, true, None),
            // 3..5: discard of three 4 KiB ranges: OK.
            desc(0x1100, 16, false, Some(4)),
            desc(0x6000, d, false, Some(5)),
            desc(0x5001, 1, true, None),
            // 6..8: write zeroes, 4 KiB: OK.
            desc(0x1200, 16, false, Some(7)),
            desc(0x6100, z, false, Some(8)),
            desc(0x5002, 1, true, None),
            // 9..10: flush: OK.
            desc(0x1300, 16, false, Some(10)),
            desc(0x5003, 1, true, None),
            // 11..13: discard with unmap: UNSUPP, an error.
            desc(0x1400, 16, false, Some(12)),
            desc(0x6200, bad, false, Some(13)),
            desc(0x5004, 1, true, None),
        ];
        h.queue(&descs)
    }

    #[test]
    fn writes_discards_write_zeroes_and_flushes_reach_the_engine() {
        let h = Harness::new();
        let used_addr = queue_mixed_requests(&h);
        let mut w = Worker::new(FakeIo::default(), h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device_rw());

        let log = &w.io().log;
        let ops: Vec<&FakeOp> = log.iter().map(|(_, op)| op).collect();
        assert_eq!(
            ops,
            vec![
                &FakeOp::Write(1024, vec![0xab; 1024]),
                &FakeOp::Discard(0, 4096),
                &FakeOp::Discard(8192, 4096),
                &FakeOp::Discard(32768, 4096),
                &FakeOp::Zeroes(4096, 4096, true),
                &FakeOp::Flush,
            ]
        );
        // The segments of one chain share its token.
        assert_eq!(log[1].0, log[2].0);
        assert_eq!(log[2].0, log[3].0);
        assert_ne!(log[0].0, log[1].0);

        assert_eq!(h.used_idx(used_addr), 5);
        assert_eq!(h.used(used_addr, 0), (11, 1), "UNSUPP answered at once");
        assert_eq!(h.used(used_addr, 1), (0, 1));
        assert_eq!(h.used(used_addr, 2), (3, 1), "discard completed once");
        assert_eq!(h.used(used_addr, 3), (6, 1));
        assert_eq!(h.used(used_addr, 4), (9, 1));
        for status in 0x5000..0x5004 {
            assert_eq!(h.byte(status), STATUS_OK, "status at {status:#x}");
        }
        assert_eq!(h.byte(0x5004), STATUS_UNSUPP);
        assert_eq!(w.queue_in_flight(0), 0);
        assert_eq!(w.free.len(), w.slots.len());
    }

    #[test]
    fn a_failed_segment_fails_the_whole_chain() {
        let h = Harness::new();
        let m = h.mem.memory();
        // 1: three segments, the second fails in the engine.
        write_header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let a = write_segments(&m, 0x6000, &[(0, 8, 0), (16, 8, 0), (32, 8, 0)]);
        // 2: two segments, the second is refused at submission.
        write_header(&m, 0x1100, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let b = write_segments(&m, 0x6100, &[(100, 8, 0), (128, 8, 0)]);
        // 3: one segment, refused: answered at once.
        write_header(&m, 0x1200, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let c = write_segments(&m, 0x6200, &[(128, 8, 1)]);
        let descs = [
            desc(0x1000, 16, false, Some(1)),
            desc(0x6000, a, false, Some(2)),
            desc(0x5000, 1, true, None),
            desc(0x1100, 16, false, Some(4)),
            desc(0x6100, b, false, Some(5)),
            desc(0x5001, 1, true, None),
            desc(0x1200, 16, false, Some(7)),
            desc(0x6200, c, false, Some(8)),
            desc(0x5002, 1, true, None),
        ];
        let used_addr = h.queue(&descs);
        let io = FakeIo {
            fail_offset: Some(16 * 512),
            refuse_offset: Some(128 * 512),
            ..FakeIo::default()
        };
        let mut w = Worker::new(io, h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device_rw());
        assert_eq!(w.io().log.len(), 4, "3 + 1 segments submitted");
        assert_eq!(h.used_idx(used_addr), 3);
        assert_eq!(h.used(used_addr, 0), (6, 1));
        assert_eq!(h.used(used_addr, 1), (0, 1));
        assert_eq!(h.used(used_addr, 2), (3, 1));
        for status in [0x5000, 0x5001, 0x5002] {
            assert_eq!(h.byte(status), STATUS_IOERR, "status at {status:#x}");
        }
        assert_eq!(w.queue_in_flight(0), 0);
        assert_eq!(w.free.len(), w.slots.len());
    }

    #[test]
    fn writes_to_a_read_only_export_are_refused_before_the_engine() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        write_header(&m, 0x1100, VIRTIO_BLK_T_DISCARD, 0);
        let d = write_segments(&m, 0x6000, &[(0, 8, 0)]);
        let descs = [
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, false, Some(2)),
            desc(0x5000, 1, true, None),
            desc(0x1100, 16, false, Some(4)),
            desc(0x6000, d, false, Some(5)),
            desc(0x5001, 1, true, None),
        ];
        let used_addr = h.queue(&descs);
        let mut w = Worker::new(FakeIo::default(), h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
        assert!(w.io().log.is_empty());
        assert_eq!(h.used_idx(used_addr), 2);
        assert_eq!(h.byte(0x5000), STATUS_IOERR);
        assert_eq!(h.byte(0x5001), STATUS_UNSUPP);
    }

    #[test]
    fn finish_drains_then_flushes_once_and_drop_finishes_otherwise() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let descs = [
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, false, Some(2)),
            desc(0x5000, 1, true, None),
        ];
        let used_addr = h.queue(&descs);
        let io = FakeIo {
            hold: true,
            ..FakeIo::default()
        };
        let finished = Arc::clone(&io.finished);
        let mut w = Worker::new(io, h.mem.clone());
        w.set_writethrough(true);
        assert_eq!(w.io().writethrough, Some(true));
        w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device_rw());
        assert_eq!(w.io().in_flight(), 1);
        w.finish().unwrap();
        // Drained before the flush; the ring is left alone (the connection is gone).
        assert_eq!(*finished.lock().unwrap(), vec![0]);
        assert_eq!(h.used_idx(used_addr), 0);
        drop(w);
        assert_eq!(finished.lock().unwrap().len(), 1, "not finished twice");

        // Dropped without `finish`: the drop finishes it.
        let io = FakeIo::default();
        let finished = Arc::clone(&io.finished);
        drop(Worker::new(io, h.mem.clone()));
        assert_eq!(*finished.lock().unwrap(), vec![0]);
    }

    fn metrics() -> (Metrics, Arc<ShardMetrics>) {
        let metrics = Metrics::new();
        let export = metrics.add_export(
            ExportLabels {
                export: "/run/test.sock".into(),
                image: "test.qcow2".into(),
                serial: "test".into(),
                read_only: false,
            },
            1,
        );
        let shard = export.shard(0).unwrap();
        (metrics, shard)
    }

    fn export_snapshot(metrics: &Metrics) -> ExportSnapshot {
        metrics.snapshot().exports.remove(0)
    }

    fn op(snap: &ExportSnapshot, op: Operation) -> &OpSnapshot {
        &snap.ops[op as usize]
    }

    #[test]
    fn metrics_count_every_request_returned_to_the_guest() {
        let h = Harness::new();
        let used_addr = queue_mixed_requests(&h);
        let (metrics, shard) = metrics();
        let io = FakeIo {
            cache: CacheStats {
                l2_hits: 7,
                l2_misses: 2,
                decompressed_hits: 1,
                decompressed_misses: 3,
            },
            ..FakeIo::default()
        };
        let mut w = Worker::new(io, h.mem.clone()).with_metrics(Some(shard));
        w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device_rw());
        assert_eq!(h.used_idx(used_addr), 5);

        // More than one queue of 16 descriptors holds.
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1500, VIRTIO_BLK_T_GET_ID, 0);
        write_header(&m, 0x1600, 77, 0);
        write_header(&m, 0x1700, VIRTIO_BLK_T_IN, 4);
        let descs = [
            // 0..2: GET_ID: 20 bytes.
            desc(0x1500, 16, false, Some(1)),
            desc(0x9000, 32, true, Some(2)),
            desc(0x5005, 1, true, None),
            // 3..4: unknown type: UNSUPP, "other".
            desc(0x1600, 16, false, Some(4)),
            desc(0x5006, 1, true, None),
            // 5..7: read of 2048 bytes: OK.
            desc(0x1700, 16, false, Some(6)),
            desc(0xa000, 2048, true, Some(7)),
            desc(0x5007, 1, true, None),
            // 8..10: read into memory the guest does not have: IOERR.
            desc(0x1700, 16, false, Some(9)),
            desc(0x4000_0000, 512, true, Some(10)),
            desc(0x5008, 1, true, None),
            // 11: no status byte: dropped, "other", an error.
            desc(0x1700, 16, false, None),
        ];
        let used_addr = h.queue(&descs);
        w.set_memory(h.mem.clone());
        w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device_rw());
        assert_eq!(h.used_idx(used_addr), 5);

        let snap = export_snapshot(&metrics);
        let expect = [
            // (operation, requests, bytes, errors)
            (Operation::Read, 2, 2048, 1),
            (Operation::Write, 1, 1024, 0),
            (Operation::Flush, 1, 0, 0),
            (Operation::Discard, 2, 3 * 4096, 1),
            (Operation::WriteZeroes, 1, 4096, 0),
            (Operation::GetId, 1, 20, 0),
            (Operation::Other, 2, 0, 2),
        ];
        for (o, requests, bytes, errors) in expect {
            let s = op(&snap, o);
            assert_eq!(
                (s.requests(), s.bytes, s.errors),
                (requests, bytes, errors),
                "{o:?}"
            );
            assert!(s.quantiles.is_some(), "{o:?}");
            assert!(s.duration_seconds > 0.0, "{o:?}");
        }
        assert_eq!(snap.shards[0].in_flight, 0);
        assert_eq!(snap.shards[0].cache, w.io().cache);

        // Held requests are in flight until they complete; cache counters only grow by what
        // the engine counted since the last turn.
        let h2 = Harness::new();
        let m2 = h2.mem.memory();
        write_header(&m2, 0x1000, VIRTIO_BLK_T_IN, 0);
        write_header(&m2, 0x1100, VIRTIO_BLK_T_FLUSH, 0);
        let used_addr = h2.queue(&[
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 4096, true, Some(2)),
            desc(0x5000, 1, true, None),
            desc(0x1100, 16, false, Some(4)),
            desc(0x5001, 1, true, None),
        ]);
        w.set_memory(h2.mem.clone());
        w.io.hold = true;
        w.io.cache.l2_hits += 5;
        w.process_queue(std::slice::from_ref(&h2.vring), 0, true, &device_rw());
        let snap = export_snapshot(&metrics);
        assert_eq!(snap.shards[0].in_flight, 2);
        assert_eq!(snap.shards[0].cache.l2_hits, 12);
        assert_eq!(
            op(&snap, Operation::Read).requests(),
            2,
            "not counted before it completes"
        );
        w.io.hold = false;
        w.process_completions(std::slice::from_ref(&h2.vring), true, &device_rw());
        assert_eq!(h2.used_idx(used_addr), 2);
        let snap = export_snapshot(&metrics);
        assert_eq!(snap.shards[0].in_flight, 0);
        assert_eq!(op(&snap, Operation::Read).requests(), 3);
        assert_eq!(op(&snap, Operation::Read).bytes, 2048 + 4096);
        assert_eq!(op(&snap, Operation::Flush).requests(), 2);
        let [p50, p99, p999] = op(&snap, Operation::Read).quantiles.unwrap();
        assert!(p50 <= p99 && p99 <= p999);

        // A request still in flight when the connection ends is never returned, never
        // counted, and no longer in flight.
        let h3 = Harness::new();
        let m3 = h3.mem.memory();
        write_header(&m3, 0x1000, VIRTIO_BLK_T_IN, 0);
        h3.queue(&[
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
        ]);
        w.set_memory(h3.mem.clone());
        w.io.hold = true;
        w.process_queue(std::slice::from_ref(&h3.vring), 0, true, &device_rw());
        assert_eq!(export_snapshot(&metrics).shards[0].in_flight, 1);
        w.finish().unwrap();
        let snap = export_snapshot(&metrics);
        assert_eq!(snap.shards[0].in_flight, 0);
        assert_eq!(op(&snap, Operation::Read).requests(), 3);
    }

    #[test]
    fn without_metrics_nothing_is_timed() {
        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        h.queue(&[
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
        ]);
        let mut w = Worker::new(
            FakeIo {
                hold: true,
                ..FakeIo::default()
            },
            h.mem.clone(),
        );
        w.process_queue(std::slice::from_ref(&h.vring), 0, true, &device());
        assert!(w.slots.iter().all(|s| s.started.is_none()));
        w.stop_queue(0);
    }

    /// A vring of a new connection over the rings of `vq`, as vhost-user-backend sets it up:
    /// SET_VRING_BASE to `base` and the used index read from guest memory.
    fn reconnected_vring(
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        base: u16,
    ) -> Vring {
        let vring = <Vring as VringT<_>>::new(mem.clone(), QSIZE).unwrap();
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_next_avail(base);
        let used = vring.queue_used_idx().unwrap();
        vring.set_queue_next_used(used);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    #[test]
    fn chains_left_in_flight_by_a_killed_worker_are_resubmitted_in_order() {
        use crate::inflight::{create_area, InflightArea, InflightShared};

        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let m = mem.memory();
        let vq = MockSplitQueue::new(&*m, QSIZE);
        // Four reads of one sector each (sectors 1..=4), heads 0, 3, 6, 9.
        let mut descs = Vec::new();
        for i in 0..4u64 {
            write_header(&m, 0x1000 + 0x100 * i, VIRTIO_BLK_T_IN, 1 + i);
            let next = 3 * i as u16;
            descs.push(desc(0x1000 + 0x100 * i, 16, false, Some(next + 1)));
            descs.push(desc(0x8000 + 0x1000 * i, 512, true, Some(next + 2)));
            descs.push(desc(0x5000 + i, 1, true, None));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        // The driver has made only the first three available so far.
        let avail_idx = vq.avail_addr().unchecked_add(2);
        m.write_obj(3u16, avail_idx).unwrap();

        let (file, size) = create_area(1, QSIZE).unwrap();
        let area = || InflightArea::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap();

        // First daemon: takes the three chains, completes the second, and is killed.
        let shared = Arc::new(InflightShared::default());
        shared.set(area());
        let vring = reconnected_vring(&mem, &vq, 0);
        let io = FakeIo {
            hold: true,
            ..FakeIo::default()
        };
        let mut w = Worker::new(io, mem.clone()).with_inflight(shared, 0, 1);
        w.process_queue(std::slice::from_ref(&vring), 0, false, &device());
        assert_eq!(w.io().log.len(), 3);
        let token_of_head_3 = w.slots.iter().position(|s| s.head == 3).unwrap() as u64;
        w.io.pending.retain(|(t, _)| *t != token_of_head_3);
        w.complete(std::slice::from_ref(&vring), token_of_head_3, true);
        let used_at = vq.used_addr().0;
        let used_idx = |m: &GuestMemoryMmap| m.read_obj::<u16>(GuestAddress(used_at + 2)).unwrap();
        assert_eq!(used_idx(&m), 1);
        // Killed: what is still in flight never reaches the used ring.
        w.finish().unwrap();
        drop(w);
        assert_eq!(used_idx(&m), 1);

        // Meanwhile the driver adds the fourth chain; QEMU reconnects and sets the ring base to
        // the used index (it could not get the avail index from the dead daemon).
        m.write_obj(4u16, avail_idx).unwrap();
        let shared = Arc::new(InflightShared::default());
        shared.set(area());
        let vring = reconnected_vring(&mem, &vq, 1);
        let mut w = Worker::new(FakeIo::default(), mem.clone()).with_inflight(shared.clone(), 0, 1);
        w.process_queue(std::slice::from_ref(&vring), 0, false, &device());

        // Heads 0 and 6 resubmitted, oldest first, then head 9 taken; head 3 not redone.
        let offsets: Vec<Option<u64>> = w.io().log.iter().map(|(_, op)| op.offset()).collect();
        assert_eq!(offsets, vec![Some(512), Some(3 * 512), Some(4 * 512)]);
        assert_eq!(used_idx(&m), 4);
        let used: Vec<u32> = (1..4)
            .map(|i| {
                m.read_obj::<u32>(GuestAddress(used_at + 4 + 8 * i))
                    .unwrap()
            })
            .collect();
        assert_eq!(used, vec![0, 6, 9]);
        for (i, sector) in [(0u64, 1u64), (2, 3), (3, 4)] {
            let at = GuestAddress(0x8000 + 0x1000 * i);
            assert_eq!(m.read_obj::<u8>(at).unwrap(), pattern(sector * 512));
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(0x5000 + i)).unwrap(),
                STATUS_OK
            );
        }
        // The area is clean again, and records the used index.
        let (_, area) = shared.current();
        let area = area.unwrap();
        let part = area.queue(0).unwrap();
        assert!((0..QSIZE).all(|h| !part.is_inflight(h)));
        assert_eq!(part.used_idx(), 4);
        assert_eq!(part.last_batch_head(), 9);
        assert_eq!(vring.queue_next_avail(), 4);
    }

    #[test]
    fn a_malformed_chain_from_the_area_fails_with_ioerr_and_is_returned() {
        use crate::inflight::{create_area, InflightArea, InflightShared, QueueTracker};

        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        // A read that would be well formed but for its status descriptor's `next`, which
        // points outside the table: only the walker's error keeps it from being served (the
        // walk stops on the status descriptor, so there is a status byte to fail).
        let used_at = h.queue(&[
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, Some(QSIZE)),
        ]);
        m.write_obj(0xeeu8, GuestAddress(0x5000)).unwrap();
        let (file, size) = create_area(1, QSIZE).unwrap();
        let area =
            Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap());
        // A previous daemon took head 0.
        let mut t = QueueTracker::new(area.clone(), 0).unwrap();
        t.recover(0, QSIZE);
        t.taken(0);
        let shared = Arc::new(InflightShared::default());
        shared.set(InflightArea::map(file, 0, size, 1, QSIZE).unwrap());
        let mut w = Worker::new(FakeIo::default(), h.mem.clone()).with_inflight(shared, 0, 1);
        w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
        assert!(w.io().log.is_empty(), "nothing submitted");
        assert_eq!(h.used_idx(used_at), 1);
        assert_eq!(h.used(used_at, 0), (0, 1));
        assert_eq!(h.byte(0x5000), STATUS_IOERR);
        assert!(!area.queue(0).unwrap().is_inflight(0));
    }

    #[test]
    fn an_area_that_does_not_match_the_ring_is_started_over() {
        use crate::inflight::{create_area, InflightArea, InflightShared, QueueTracker};

        let h = Harness::new();
        let m = h.mem.memory();
        write_header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let used_at = h.queue(&[
            desc(0x1000, 16, false, Some(1)),
            desc(0x8000, 512, true, Some(2)),
            desc(0x5000, 1, true, None),
        ]);
        let (file, size) = create_area(1, QSIZE).unwrap();
        let area =
            Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap());
        // The area claims two chains in flight; the driver made one available.
        let mut t = QueueTracker::new(area.clone(), 0).unwrap();
        t.recover(0, QSIZE);
        t.taken(4);
        t.taken(7);
        let shared = Arc::new(InflightShared::default());
        shared.set(InflightArea::map(file, 0, size, 1, QSIZE).unwrap());
        let mut w = Worker::new(FakeIo::default(), h.mem.clone()).with_inflight(shared, 0, 1);
        w.process_queue(std::slice::from_ref(&h.vring), 0, false, &device());
        // Only the available chain was read, once.
        assert_eq!(w.io().log.len(), 1);
        assert_eq!(h.used_idx(used_at), 1);
        assert_eq!(h.used(used_at, 0), (0, 513));
        let part = area.queue(0).unwrap();
        assert!((0..QSIZE).all(|head| !part.is_inflight(head)));
        assert_eq!(part.used_idx(), 1);
    }
}
