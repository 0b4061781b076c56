//! The data path of one worker: from available descriptor chains to used ones.
//!
//! A connection has one worker per engine shard; queue `q` belongs to worker `q % shards`.
//! Each worker is run by one of the process's core threads ([`crate::cores`]), which serve
//! the workers of every connection, through its event set ([`crate::worker_loop`]). That
//! thread calls into its [`Worker`] (through the backend's per-worker mutex, uncontended on
//! the data path) when a queue it owns is kicked, when its engine shard's completion eventfd
//! fires, when its timer fires and when the frontend stops one of its queues
//! (GET_VRING_BASE, [`Worker::begin_stop`]: the stop ends once that queue's requests have
//! completed, [`Worker::finish_stops`]; nothing on a core thread ever waits, since the
//! thread serves other connections too). Before each event it applies a write-cache change
//! the driver made meanwhile ([`Worker::set_writethrough`]). Other threads take the mutex
//! only briefly: to quiesce the queues for a stop, to suspend the shards for a resize and to
//! finish them.
//!
//! A request in flight lives in a slot of a slab; its token is the slot index. A discard or
//! write-zeroes request with several segments becomes one engine request per segment, all with
//! the slot's token; the slot counts them and completes the chain after the last one, with
//! VIRTIO_BLK_S_IOERR if any failed. The slot holds the guest-memory snapshot that its host
//! buffers point into, so a memory-table change cannot unmap them before the engine is done:
//! the worker keeps one clone of each snapshot's `Arc` that requests in flight use, with a
//! count of those requests ([`Snapshots`]), rather than a clone per request (the `Arc`'s
//! count is shared with the connection's other workers, and two atomic writes per request
//! to a line that other cores write too cost more than the rest of the bookkeeping). The
//! slab, the scratch buffers and the completion vector are reused: the steady state
//! allocates nothing.
//!
//! Completions are returned in batches: the requests the engine finished in one reap go to
//! their used rings under one lock of each queue's state (taken again only when the queue
//! changes from one completion to the next), and give their in-flight budget back at once.
//!
//! Guest memory (buffers and rings alike) is reached through the connection's atomic pointer
//! the worker was given, which the request handler publishes a table in only once the regions
//! the frontend could cut short are guarded (`crate::sigbus`, `BlkBackend::guard_and_publish`).
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
//! chains behind (`starved`), and when its own completions give budget back it goes round
//! its ready queues again through the same resume path as the timer
//! ([`Worker::resume_queues`]), whether or not the guest kicks again. Completions are reaped
//! at the end of every turn, whatever event started it (a kick, the engine's completion
//! eventfd, the timer), and reaping drains that eventfd: so the check for budget given back
//! follows every reap ([`Worker::settle`]), never only the completion event. Budget of the
//! connection given back by another worker, or by a queue being stopped on the frontend's
//! thread, wakes it through its timer ([`Worker::process_timer`]).
//!
//! A broken available ring (an index more than the queue size ahead of the device's, or an
//! entry that cannot be read: a hostile driver, or a frontend that truncated the memory the
//! ring lies in) stops its queue: no chain is taken from it until the frontend stops it
//! (GET_VRING_BASE) and sets it up again, with one error line. The worker must not spin on
//! it: a worker that never returns to its core thread holds up every connection of that
//! core, and its own could never end.
//!
//! When the connection is gone, the thread tearing it down calls [`Worker::finish`] (once
//! the worker is off its core thread): it waits for what is still in flight and
//! makes every write durable before the shard is dropped. `Drop` does the same if that was
//! skipped.
//!
//! This file holds the worker's state and its entry points (queue kicks, completions, the
//! timer, stop and quiesce: the gate and resume logic); `chains.rs` the request path they
//! share (taking chains, submitting them, completing and returning them, the in-flight area,
//! draining and finishing).

use std::sync::Arc;
use std::time::Instant;

use tracing::{error, warn};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::block_io::{BlockIo, CacheStats, Done};
use crate::budget::{ConnectionBudget, Gate, Limits};
use crate::inflight::{InflightShared, QueueTracker};
use crate::metrics::{Operation, ShardMetrics};
use crate::request::{DeviceInfo, Scratch};
use crate::throttle::WorkerThrottle;
use crate::timer::Timer;
use crate::virtio_blk::MAX_QUEUES;

mod chains;
#[cfg(test)]
mod tests;

pub use crate::vring::Vring;
/// The state behind a [`Vring`]'s lock.
type RingState = crate::vring::VringState;

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
    /// The snapshot (in [`Worker::snapshots`]) of the memory the request's buffers point
    /// into; `None` while the slot is free.
    mem: Option<u32>,
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

/// The guest-memory snapshots that requests in flight point into, each with how many
/// requests hold it. A snapshot is dropped when its last request completes, so an old memory
/// table is unmapped as soon as no request uses it (as with a clone per request).
#[derive(Default)]
struct Snapshots {
    held: Vec<Option<(Arc<GuestMemoryMmap>, u32)>>,
}

impl Snapshots {
    /// Counts one more request in `mem`; returns the snapshot's index.
    fn hold(&mut self, mem: &Arc<GuestMemoryMmap>) -> u32 {
        let mut free = None;
        for (i, entry) in self.held.iter_mut().enumerate() {
            match entry {
                Some((m, n)) if Arc::ptr_eq(m, mem) => {
                    *n += 1;
                    return i as u32;
                }
                None if free.is_none() => free = Some(i),
                _ => {}
            }
        }
        let entry = Some((Arc::clone(mem), 1));
        // At most one entry per snapshot with requests in flight: far below u32::MAX.
        match free {
            Some(i) => {
                self.held[i] = entry;
                i as u32
            }
            None => {
                self.held.push(entry);
                (self.held.len() - 1) as u32
            }
        }
    }

    /// The snapshot at `index` (held).
    fn get(&self, index: u32) -> Option<&GuestMemoryMmap> {
        match self.held.get(index as usize) {
            Some(Some((m, _))) => Some(m),
            _ => None,
        }
    }

    /// One request of snapshot `index` is done; the last one drops it.
    fn release(&mut self, index: u32) {
        if let Some(entry) = self.held.get_mut(index as usize) {
            if let Some((_, n)) = entry {
                *n -= 1;
                if *n == 0 {
                    *entry = None;
                }
            }
        }
    }
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
    /// The guest memory the slots' requests point into.
    snapshots: Snapshots,
    free: Vec<u32>,
    scratch: Scratch,
    done: Vec<Done<B::IoError>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// This worker's vrings, remembered from the first event so that a quiesce (which
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
    /// Local queues being stopped ([`Worker::begin_stop`]), one bit each.
    stopping: u64,
}

/// Rounds of taking chains and reaping in one turn of the worker before it goes back to its
/// event loop (see [`Worker::settle`]).
const MAX_RESUME_ROUNDS: u32 = 8;

/// Rounds in a row in which a queue said it had chains and none could be taken, before the
/// worker leaves it to its timer (see [`Worker::take_chains`]).
const MAX_IDLE_ROUNDS: u32 = 4;

/// How many times in one turn the worker hands back what the engine finished before the
/// engine's next job of its own and comes back for that job at once (see
/// [`Worker::settle`]); then the engine's completion descriptor brings it back through its
/// event loop.
const MAX_HAND_BACK_ROUNDS: u32 = 8;

/// How a reap collects finished requests from the engine.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reap {
    /// Never blocks; work left makes the engine's completion descriptor readable.
    Poll,
    /// Never blocks; work left is the caller's to come back for ([`BlockIo::poll_more`]).
    PollMore,
}

/// What the available ring of a queue offers.
enum Avail {
    /// The next chain (taken from the ring): its head index, and how many chains the
    /// available index showed from this one on, this one included (at least 1).
    Chain {
        head: u16,
        shown: u16,
    },
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
            snapshots: Snapshots::default(),
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
            stopping: 0,
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

    /// Reopens the gate closed by [`Worker::pause`] and has the worker go round its
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

    /// Uses `mem` for requests popped from now on (in the daemon every worker of a
    /// connection reads the one atomic the frontend handler publishes tables in).
    #[cfg(test)]
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.mem = mem;
    }

    /// The guest memory this worker uses now.
    #[cfg(test)]
    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.mem.memory().into_inner()
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
        if index >= vrings.len() {
            warn!(index, "Event for a queue this worker does not own");
            return;
        }
        // A broken queue's kicks are left alone (see `pop_requests`); completions are still
        // returned.
        self.take_chains(vrings, index, event_idx, dev);
        self.settle(vrings, event_idx, dev);
    }

    /// Takes every available chain of local queue `index` while the gate is open (re-enabling
    /// notifications with EVENT_IDX so that no kick is lost). Reaps nothing.
    fn take_chains(&mut self, vrings: &[Vring], index: usize, event_idx: bool, dev: &DeviceInfo) {
        let Some(vring) = vrings.get(index) else {
            return;
        };
        if self.broken & (1 << index) != 0 {
            return;
        }
        let mut mem = self.mem.memory().into_inner();
        self.sync_inflight(vring, index, &mem, dev);
        let mut idle_rounds = 0;
        loop {
            if event_idx {
                if let Err(e) = vring.get_mut().get_queue_mut().disable_notification(&*mem) {
                    warn!(index, "Cannot disable queue notifications: {e}");
                }
            }
            let taken = self.pop_requests(vring, index, &mut mem, dev);
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
            let more = vring.get_mut().get_queue_mut().enable_notification(&*mem);
            match more {
                Ok(true) if taken == 0 && idle_rounds == MAX_IDLE_ROUNDS => {
                    // The ring says there is more, yet nothing could be taken: whatever the
                    // cause, never spin here (its core thread serves other workers too);
                    // come back through the timer.
                    self.wake_soon("to take chains the ring announced");
                    break;
                }
                Ok(true) => {
                    idle_rounds = if taken == 0 { idle_rounds + 1 } else { 0 };
                    // A fresh view of guest memory for the next round: the frontend may
                    // have replaced the memory table meanwhile.
                    mem = self.mem.memory().into_inner();
                    continue;
                }
                Ok(false) => break,
                Err(e) => {
                    warn!(index, "Cannot enable queue notifications: {e}");
                    break;
                }
            }
        }
    }

    /// Handles the engine's completion eventfd: returns finished requests, then, if chains
    /// were left in the rings for want of budget and the gate is open again, takes them up.
    pub fn process_completions(&mut self, vrings: &[Vring], event_idx: bool, dev: &DeviceInfo) {
        self.remember_vrings(vrings);
        self.settle(vrings, event_idx, dev);
    }

    /// The end of every turn of the worker: reaps what the engine finished and, while that
    /// gave back the budget that had left chains in the rings, takes them up (and reaps
    /// again); then notifies the guest.
    ///
    /// Every reap goes through here, whatever event started the turn: reaping drains the
    /// engine's completion eventfd, so budget given back by completions reaped during a kick
    /// or a timer turn is never announced by another event, and chains left behind would
    /// wait for a kick the guest has no reason to send. After [`MAX_RESUME_ROUNDS`] rounds
    /// the worker arms its timer instead and goes back to its event loop, so that a guest
    /// whose requests complete as fast as they are taken cannot keep it from its other
    /// events (and its core thread to the other workers).
    ///
    /// The engine returns what finished before each next job of its own (inflating a
    /// compressed cluster: tens of microseconds), so that the guest gets it at once and
    /// sends its next requests meanwhile. The worker then notifies the guest, takes the
    /// chains it sent meanwhile and reaps again, which runs that job, without a trip
    /// through its event loop (a write, a wait and a read of the engine's eventfd per job);
    /// at most [`MAX_HAND_BACK_ROUNDS`] times, then a plain reap leaves the rest to the
    /// engine's completion descriptor, so its other events are not kept waiting.
    fn settle(&mut self, vrings: &[Vring], event_idx: bool, dev: &DeviceInfo) {
        let mut rounds = 0;
        let mut handed_back = 0;
        loop {
            let how = if handed_back < MAX_HAND_BACK_ROUNDS {
                Reap::PollMore
            } else {
                Reap::Poll
            };
            if self.reap_as(vrings, how) {
                handed_back += 1;
                self.notify(vrings);
                if !self.quiescing {
                    self.resume_queues(vrings, event_idx, dev);
                }
                continue;
            }
            if !self.resumable() {
                break;
            }
            if rounds == MAX_RESUME_ROUNDS {
                self.wake_soon("to take chains left in the rings");
                break;
            }
            rounds += 1;
            self.resume_queues(vrings, event_idx, dev);
        }
        self.notify(vrings);
        self.publish_metrics();
    }

    /// Whether chains were left in the rings for want of budget and the gate is open again.
    fn resumable(&self) -> bool {
        self.starved && !self.quiescing && self.gate_open()
    }

    /// Has the worker come back through its timer ([`Worker::process_timer`]) as
    /// soon as it is back in its event loop. `why` is for the log.
    fn wake_soon(&mut self, why: &str) {
        if let Some((_, timer)) = &mut self.throttle {
            if let Err(e) = timer.arm(std::time::Duration::from_nanos(1)) {
                warn!("Cannot wake the worker {why}: {e}");
            }
        }
    }

    /// Goes round every ready queue taking chains until the gate closes (after a wait under
    /// the limits or for budget). A queue whose chains are left behind again says so
    /// (`starved`). Reaps nothing: the caller settles.
    fn resume_queues(&mut self, vrings: &[Vring], event_idx: bool, dev: &DeviceInfo) {
        if !self.gate_open() {
            return;
        }
        self.starved = false;
        for index in 0..vrings.len() {
            if !self.gate_open() {
                break;
            }
            let ready = self.broken & (1 << index) == 0 && {
                let state = vrings[index].get_ref();
                state.is_enabled() && state.get_queue().ready()
            };
            if ready {
                self.take_chains(vrings, index, event_idx, dev);
            }
        }
    }

    /// Starts stopping local queue `index` (GET_VRING_BASE): its held chain, if any, is
    /// submitted now, and the queue is stopped once its requests in flight have completed to
    /// its used ring, which [`Worker::finish_stops`] notices. Never waits: the worker's thread
    /// serves the other connections of its core meanwhile.
    pub fn begin_stop(&mut self, index: usize) {
        if self.held.as_ref().is_some_and(|h| h.queue == index) {
            self.release_held();
        }
        if index < 64 {
            self.stopping |= 1 << index;
        }
    }

    /// Whether a queue is being stopped ([`Worker::begin_stop`]).
    pub fn stops_pending(&self) -> bool {
        self.stopping != 0
    }

    /// Ends the stop of every stopping queue that has no request in flight any more (one
    /// whose requests the engine lost track of, a bug, has them failed): the guest is
    /// notified of its last completions and the queue is set up afresh whenever it starts
    /// again (the frontend may reset it, or share another area, in between). Returns how
    /// many stops ended.
    pub fn finish_stops(&mut self, vrings: &[Vring]) -> u32 {
        let mut ended = 0;
        let mut pending = self.stopping;
        while pending != 0 {
            let index = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            if self.queue_in_flight(index) > 0 {
                if self.io.in_flight() > 0 {
                    continue;
                }
                error!(
                    index,
                    "Requests still pending on a stopping queue but none in the engine"
                );
                self.abandon_queue(vrings, index);
            }
            self.stopping &= !(1 << index);
            if let Some(t) = self.tracked.get_mut(index) {
                *t = TrackedQueue::default();
            }
            self.broken &= !(1 << index);
            ended += 1;
        }
        if ended > 0 {
            self.notify(vrings);
            self.publish_metrics();
        }
        ended
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
        self.settle(vrings, event_idx, dev);
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

    /// Stops taking chains for good (the connection is about to end): the held chain, if
    /// any, is submitted now. The requests in flight complete to the used rings as usual
    /// (see [`crate::backend::BlkBackend::quiesce`]).
    pub fn quiesce(&mut self) {
        self.quiescing = true;
        self.release_held();
    }

    /// For a quiesce: returns to the used rings what the engine has finished (never
    /// waiting), and fails the requests it lost track of (a bug). Returns the chains still
    /// in flight, whether any completed, and how many queue stops ended with them (see
    /// [`Worker::finish_stops`]).
    pub fn drain_step(&mut self) -> (u32, bool, u32) {
        let vrings = std::mem::take(&mut self.vrings);
        let before = self.chains_in_flight();
        self.reap_as(&vrings, Reap::Poll);
        if self.chains_in_flight() > 0 && self.io.in_flight() == 0 {
            error!("Requests still pending on a quiescing connection but none in the engine");
            for index in 0..vrings.len() {
                self.abandon_queue(&vrings, index);
            }
        }
        self.notify(&vrings);
        let stops = if self.stops_pending() {
            self.finish_stops(&vrings)
        } else {
            0
        };
        self.vrings = vrings;
        let left = self.chains_in_flight();
        (left, left < before, stops)
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
