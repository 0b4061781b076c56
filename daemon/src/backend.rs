//! The vhost-user-blk device of one connection: features, config space, the write-cache mode,
//! the workers' per-thread state and their events.
//!
//! One [`BlkBackend`] serves one frontend connection of one export (a fresh one, with fresh
//! engine shards, per connection, so no state leaks from one client to the next; what the
//! previous client wrote was made durable before its shards were dropped). Its methods run on
//! these threads:
//! - the relay thread, which runs the connection's request handler ([`crate::handler`]:
//!   feature negotiation, config space and its `writeback` byte, memory table). It never
//!   takes a worker's mutex: a write-cache change is recorded and applied by each worker before
//!   its next event, and GET_VRING_BASE waits (held back by the relay, not blocking it) until
//!   the queue's worker has stopped the queue ([`BlkBackend::stop_queues`]: once its requests
//!   in flight have completed);
//! - the core threads ([`crate::cores`]), which run the workers of every connection, one
//!   worker per engine shard: each worker's event set ([`crate::worker_loop`]) brings
//!   [`BlkBackend::handle_event`] the kicks of the queues it owns, its shard's completion
//!   eventfd and its timer. Queue `q` is served by worker `q % shards`; the shards of a
//!   writable image form a group and pass each other the pieces of requests whose L2 tables
//!   another shard owns (see the engine's `shard/group.rs`). Nothing run there ever waits:
//!   a core thread serves other connections too;
//! - the main thread (a stop quiesces the queues, completing what is in flight itself), the
//!   control thread (a resize suspends and resumes the shards);
//! - the thread that tears the connection down, which calls [`BlkBackend::finish`] once the
//!   connection's other threads are gone.
//!
//! The relay thread ([`crate::relay`]) publishes the frontend's in-flight area in
//! [`BlkBackend::inflight`], where the workers pick it up.
//!
//! Per-worker state ([`Worker`]) sits in a `Mutex` per worker, indexed by worker id; only its
//! core thread takes it on the data path, so it is uncontended. The main and control threads
//! take one worker's mutex at a time and briefly (quiesce, resize) and never while holding
//! another lock of ours, so they cannot deadlock with the data path or hold up the other
//! connections of its core thread.
//!
//! The write-cache mode belongs to the export, not to a connection: a driver that turned the
//! cache off and reconnects (QEMU with `reconnect=1`) must not find it silently on again.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use qcow2d_engine::{CacheBudget, Image};
use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::block_io::{BlockIo, EngineIo};
use crate::budget::{Budgets, ConnectionBudget, Gate};
use crate::inflight::InflightShared;
use crate::metrics::ExportMetrics;
use crate::relay::BackendChannel;
use crate::request::DeviceInfo;
use crate::throttle::{ExportThrottle, WorkerThrottle};
use crate::timer::Timer;
use crate::virtio_blk::{
    device_features, writeback_written, BlkConfig, MAX_QUEUES, MAX_QUEUE_SIZE,
};
use crate::worker::{Vring, Worker};
use crate::worker_loop::WorkerLoop;

/// Failures while building a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The engine could not create a shard.
    #[error("Cannot create engine shard {index}")]
    Shard {
        /// Index of the shard.
        index: usize,
        /// The engine's error.
        #[source]
        source: qcow2d_engine::Error,
    },
    /// A worker's throttle timer could not be created.
    #[error("Cannot create the throttle timer of worker {index}")]
    Timer {
        /// Index of the worker.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The eventfd that tells the relay a queue stopped could not be created.
    #[error("Cannot create the queue-stopped eventfd")]
    Stopped(#[source] io::Error),
    /// A worker's timer could not be duplicated to wake it.
    #[error("Cannot duplicate the timer of a worker")]
    Wakers(#[source] io::Error),
    /// A worker's completion eventfd could not be added to its epoll loop.
    #[error("Cannot watch the completions of shard {index}")]
    RegisterCompletions {
        /// Index of the shard.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What a backend is built from (fixed for the life of an export).
#[derive(Clone, Debug)]
pub struct DeviceParams {
    /// Queues offered to the guest (1..=64).
    pub num_queues: u16,
    /// Workers, each with one engine shard (1..=num_queues).
    pub shards: usize,
    /// What requests are checked against.
    pub device: DeviceInfo,
    /// The image's cluster size (optimal I/O size hint, discard alignment).
    pub cluster_size: u64,
    /// Write-back (true) or write-through: starts as `!writethrough` from the configuration,
    /// changed by the driver through the config space, kept across the export's connections.
    pub writeback: Arc<AtomicBool>,
    /// Where the workers count requests (`--metrics`), kept across the export's connections:
    /// worker `i` of every connection records into shard metrics `i`.
    pub metrics: Option<Arc<ExportMetrics>>,
    /// The export's I/O limits (its throttle group), kept across connections and changed at
    /// run time by the supervisor.
    pub throttle: Arc<ExportThrottle>,
    /// What one connection, and each of its workers, may have in flight.
    pub budgets: Budgets,
}

impl DeviceParams {
    /// Workers (and shards) of a connection: `shards`, within 1 and the number of queues.
    pub fn workers(&self) -> usize {
        let num_queues = usize::from(self.num_queues.clamp(1, MAX_QUEUES));
        self.shards.clamp(1, num_queues)
    }
}

/// The event sets of a connection's workers, in worker order.
pub type Handlers = Vec<Arc<WorkerLoop>>;

/// How long a quiesce or the end of a connection waits for the engine when it completes
/// nothing.
const ENGINE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a resize waits for the requests in flight to complete.
const SUSPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The vhost-user-blk backend of one connection.
pub struct BlkBackend {
    num_queues: usize,
    /// What requests are checked against; its capacity is `capacity`'s.
    device: DeviceInfo,
    /// The disk size in bytes now (changed by an online resize).
    capacity: std::sync::atomic::AtomicU64,
    config: ConfigSpace,
    workers: Vec<Mutex<Worker<EngineIo>>>,
    /// The cache budget of each worker's core thread, in worker order (shards made again
    /// after a resize draw from them too).
    cache_budgets: Vec<CacheBudget>,
    /// Bumped whenever the write-cache mode may have changed; each worker applies the mode
    /// before its next event once it sees a generation it has not applied
    /// (`cache_applied[thread]`, changed only under that worker's lock), so that the relay
    /// thread never waits for a worker's lock.
    cache_generation: std::sync::atomic::AtomicU64,
    cache_applied: Vec<std::sync::atomic::AtomicU64>,
    /// Written by a worker once it has stopped the queues the relay asked it to stop
    /// (GET_VRING_BASE); the relay watches it.
    stopped: EventFd,
    event_idx: AtomicBool,
    /// Set by [`BlkBackend::quiesce`]: queue kicks are no longer processed, so requests the
    /// guest adds stay in the available ring for whoever serves it next.
    quiescing: AtomicBool,
    /// The connection's in-flight area, once the frontend shares one (through the relay,
    /// [`crate::relay`]).
    inflight: Arc<InflightShared>,
    /// The frontend's backend request channel, once it shares one (through the relay).
    channel: Arc<BackendChannel>,
    /// The regions of this connection's memory tables guarded against truncation
    /// (`crate::sigbus`), and the pages the handler had replaced when the connection began.
    guards: Mutex<MemoryGuards>,
    replaced_before: u64,
}

use crate::sigbus::Range as HostRange;

/// What a connection registered with the SIGBUS handler: the regions of its memory tables
/// that may fault under the daemon ([`MemoryGuards::update`] says which), each table's for as
/// long as something holds it (the current one, and older ones that requests
/// in flight still use; a region several tables share is registered once).
#[derive(Default)]
struct MemoryGuards {
    tables: Vec<(Weak<GuestMemoryMmap>, Vec<HostRange>)>,
    registered: crate::sigbus::Guards,
}

impl MemoryGuards {
    /// Registers the regions of `table`, the connection's new memory table, that may fault
    /// under the daemon, each with its file's page size, and lets go of those no table holds
    /// any more. A region may fault when its file is not sealed against shrinking (the
    /// frontend may cut it short), or when its file is of huge pages, sealed or not: a huge
    /// page that is not backed (never touched, or punched out with FALLOC_FL_PUNCH_HOLE,
    /// which F_SEAL_SHRINK allows) takes a free huge page at the first access, and raises
    /// SIGBUS when the host has none left. A sealed file of base pages cannot fault. A region
    /// that cannot be registered (the connection's share of the registry, or the registry,
    /// is full, or its file's page size cannot be learnt) is taken out of use:
    /// private zero memory is mapped over it, so nothing the frontend does to its file can
    /// fault there, and the error refuses the table (the request handler then ends the
    /// connection).
    fn update(&mut self, table: &Arc<GuestMemoryMmap>) -> io::Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut unknown = Vec::new();
        let mut faulting = Vec::new();
        let base = crate::fdcheck::base_page_size().unwrap_or(4096);
        for region in table.iter() {
            let Some(file) = region.file_offset().map(|f| f.file()) else {
                continue;
            };
            let page = crate::fdcheck::page_size(file);
            let huge = matches!(page, Ok(page) if page > base);
            if !huge && crate::fdcheck::is_shrink_sealed(file) {
                continue;
            }
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let Ok(len) = usize::try_from(region.len()) else {
                continue;
            };
            match page {
                Ok(page) => faulting.push(HostRange {
                    start: host as usize,
                    len,
                    page,
                }),
                Err(e) => {
                    error!("Cannot learn the page size of a guest memory file: {e}");
                    unknown.push(HostRange {
                        start: host as usize,
                        len,
                        page: 0,
                    });
                }
            }
        }
        self.tables.retain(|(held, _)| held.strong_count() > 0);
        self.tables.push((Arc::downgrade(table), faulting));
        let wanted = self
            .tables
            .iter()
            .flat_map(|(_, ranges)| ranges.iter().copied())
            .collect::<std::collections::HashSet<_>>();
        let mut refused = self.registered.set(&wanted);
        if refused.is_empty() && unknown.is_empty() {
            return Ok(());
        }
        let guards_full = refused.len();
        refused.append(&mut unknown);
        for &HostRange { start, len, page } in &refused {
            // The whole mapping: a hugetlb one reaches to the end of its last huge page, and
            // can only be split at a huge-page boundary. (A range whose page size is unknown
            // is taken as of base pages: if that fails, it is logged below.)
            let len = if page.is_power_of_two() {
                len.next_multiple_of(page)
            } else {
                len
            };
            // SAFETY: `[start, start + len)` is a region of `table`, mapped by
            // vm-memory (up to the end of its last page); an anonymous private mapping
            // replaces it at the same place and size, which vm-memory unmaps with the table
            // as it would have its own. Guest memory is only ever accessed through raw copies
            // and the kernel, so no reference into it sees the contents change.
            if !unsafe { crate::sigbus::replace_with_zeros(start, len) } {
                error!(
                    "Cannot take unguarded guest memory out of use: {}",
                    io::Error::last_os_error()
                );
            }
        }
        let why = if guards_full > 0 {
            format!(
                "{guards_full} regions of the memory table are in files that cannot be sealed \
                 against shrinking or are of huge pages, and the daemon cannot guard more of \
                 them against faults (at most {} per connection, {} in the process; {} registered by \
                 this connection): the table is refused",
                crate::sigbus::PER_CONNECTION,
                crate::sigbus::MAX_SLOTS,
                self.registered.count(),
            )
        } else {
            format!(
                "{} regions of the memory table are in files that cannot be sealed against \
                 shrinking and whose page size cannot be learnt, so the daemon cannot guard \
                 them against truncation: the table is refused",
                refused.len()
            )
        };
        error!("{why}");
        Err(io::Error::other(why))
    }

    /// The table [`MemoryGuards::update`] registered last is held as `table` now (the same
    /// regions, published): its guards last as long as `table` does.
    fn now_held_by(&mut self, table: &Arc<GuestMemoryMmap>) {
        if let Some((held, _)) = self.tables.last_mut() {
            *held = Arc::downgrade(table);
        }
    }
}

/// The config space of one connection and the write-cache mode behind its `writeback` byte.
struct ConfigSpace {
    /// Everything but `writeback` and the capacity, fixed for the connection.
    base: BlkConfig,
    /// The capacity in 512-byte sectors (changed by an online resize).
    sectors: std::sync::atomic::AtomicU64,
    read_only: bool,
    /// The export's write-cache mode (see [`DeviceParams::writeback`]).
    writeback: Arc<AtomicBool>,
    /// Whether the driver accepted VIRTIO_BLK_F_FLUSH (assumed until it says otherwise): a
    /// driver that cannot flush gets write-through whatever `writeback` says.
    flush_acked: AtomicBool,
}

impl ConfigSpace {
    fn new(base: BlkConfig, read_only: bool, writeback: Arc<AtomicBool>) -> Self {
        ConfigSpace {
            sectors: std::sync::atomic::AtomicU64::new(u64::from_le(base.capacity)),
            base,
            read_only,
            writeback,
            flush_acked: AtomicBool::new(true),
        }
    }

    /// Whether completed writes may sit in a cache until the next flush.
    fn writeback(&self) -> bool {
        !self.read_only
            && self.writeback.load(Ordering::Relaxed)
            && self.flush_acked.load(Ordering::Relaxed)
    }

    /// GET_CONFIG.
    fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = self.base;
        config.capacity = self.sectors.load(Ordering::Relaxed).to_le();
        config.writeback = u8::from(self.writeback());
        config.read(offset, size)
    }

    /// SET_CONFIG: only the `writeback` byte of a writable export is writable, everything else
    /// is ignored. Returns the new mode when the write was to that byte.
    fn write(&self, offset: u32, buf: &[u8]) -> Option<bool> {
        if self.read_only {
            return None;
        }
        let writeback = writeback_written(offset, buf)?;
        self.writeback.store(writeback, Ordering::Relaxed);
        Some(writeback)
    }

    /// The driver's features: without FLUSH it cannot ask for durability, so every write must
    /// be durable when it completes.
    fn ack_features(&self, features: u64) {
        self.flush_acked
            .store(features & (1 << VIRTIO_BLK_F_FLUSH) != 0, Ordering::Relaxed);
    }
}

impl BlkBackend {
    /// Creates the backend and one engine shard per worker thread ([`DeviceParams::workers`]),
    /// shard `i` drawing its caches from `cache_budgets[i]` (its worker's core thread's; none
    /// when the list is empty). `mem` must be the guest memory the connection's request
    /// handler publishes memory tables in.
    pub fn new(
        image: &Image,
        params: &DeviceParams,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        cache_budgets: &[CacheBudget],
    ) -> Result<Self, BackendError> {
        let num_queues = usize::from(params.num_queues.clamp(1, MAX_QUEUES));
        let shards = params.workers();
        let inflight = Arc::new(InflightShared::default());
        let budget = Arc::new(ConnectionBudget::new(params.budgets.connection));
        let workers = EngineIo::for_workers(image, shards, cache_budgets)
            .map_err(|source| BackendError::Shard { index: 0, source })?
            .into_iter()
            .enumerate()
            .map(|(index, io)| {
                let metrics = params.metrics.as_ref().and_then(|m| m.shard(index));
                let timer = Timer::new().map_err(|source| BackendError::Timer { index, source })?;
                Ok(Mutex::new(
                    Worker::new(io, mem.clone())
                        .with_metrics(metrics)
                        .with_inflight(Arc::clone(&inflight), index, shards)
                        .with_throttle(WorkerThrottle::new(Arc::clone(&params.throttle)), timer)
                        .with_budget(Gate::new(params.budgets.shard, Arc::clone(&budget), index)),
                ))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        // A worker stopped by the connection's budget is woken through its timer (on its
        // epoll loop, and the same whatever shard it serves, unlike the completion eventfd).
        let wakers = workers
            .iter()
            .filter_map(|w| w.lock().unwrap_or_else(PoisonError::into_inner).timer_fd())
            .map(|fd| {
                // SAFETY: the worker's timer owns this descriptor and keeps it open while the
                // worker lives, which is for the length of this borrow; it is only duplicated.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(BackendError::Wakers)?;
        budget.set_wakers(wakers);
        let stopped = EventFd::new(EFD_NONBLOCK).map_err(BackendError::Stopped)?;
        let cache_applied = (0..shards)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        // The image's size now: an online resize may have changed it since the export began.
        let capacity = image.virtual_size();
        let backend = BlkBackend {
            num_queues,
            device: DeviceInfo {
                capacity,
                ..params.device.clone()
            },
            capacity: std::sync::atomic::AtomicU64::new(capacity),
            config: ConfigSpace::new(
                BlkConfig::new(
                    capacity,
                    num_queues as u16,
                    params.cluster_size,
                    params.device.read_only,
                    false,
                ),
                params.device.read_only,
                Arc::clone(&params.writeback),
            ),
            workers,
            cache_budgets: cache_budgets.to_vec(),
            cache_generation: std::sync::atomic::AtomicU64::new(0),
            cache_applied,
            stopped,
            event_idx: AtomicBool::new(false),
            quiescing: AtomicBool::new(false),
            inflight,
            channel: Arc::new(BackendChannel::default()),
            guards: Mutex::new(MemoryGuards::default()),
            replaced_before: crate::sigbus::replaced_pages(),
        };
        backend.apply_cache_mode();
        Ok(backend)
    }

    /// Tells every shard whether to make each write durable before completing it: now,
    /// taking each worker's lock (set-up, resume).
    fn apply_cache_mode(&self) {
        if self.device.read_only {
            return;
        }
        let writethrough = !self.config.writeback();
        for thread in 0..self.workers.len() {
            self.lock(thread).set_writethrough(writethrough);
        }
    }

    /// Has every worker apply the write-cache mode before it handles its next event (from the
    /// relay thread, which must not wait for a worker's lock: a worker holds it while it
    /// drains a queue). Requests already in flight keep the mode they were submitted with,
    /// as they did when the mode was applied between two events.
    fn request_cache_mode(&self) {
        self.cache_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// On worker `thread`, under its lock: applies a mode change it has not applied yet.
    fn catch_up_cache_mode(&self, thread: usize, worker: &mut Worker<EngineIo>) {
        let generation = self.cache_generation.load(Ordering::SeqCst);
        let applied = &self.cache_applied[thread];
        if applied.load(Ordering::Relaxed) != generation {
            applied.store(generation, Ordering::Relaxed);
            if !self.device.read_only {
                worker.set_writethrough(!self.config.writeback());
            }
        }
    }

    /// The eventfd a worker writes once it has stopped the queues the relay asked it to stop.
    pub fn stopped_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.stopped.as_raw_fd()
    }

    /// Reads [`BlkBackend::stopped_fd`]; true if a stop had completed since the last read.
    pub fn clear_stopped(&self) -> bool {
        self.stopped.read().is_ok()
    }

    /// On worker `thread`'s core thread: stops each local queue of `mask` (GET_VRING_BASE):
    /// no chain is taken from it any more, and once the requests it has in flight have
    /// completed to its used ring (now, or as the engine completes them: see
    /// [`BlkBackend::handle_event`]), the relay is told through [`BlkBackend::stopped_fd`].
    pub fn stop_queues(&self, thread: usize, mask: u64, vrings: &[Vring]) {
        if mask == 0 || thread >= self.workers.len() {
            // Nothing to wait for: the relay must not wait either.
            let _ = self.stopped.write(1);
            return;
        }
        if (0..vrings.len().min(64)).all(|l| mask & (1 << l) == 0) {
            // No queue of this worker: nothing to wait for either.
            let _ = self.stopped.write(1);
            return;
        }
        let mut worker = self.lock(thread);
        for local in (0..vrings.len().min(64)).filter(|l| mask & (1 << l) != 0) {
            vrings[local].set_queue_ready(false);
            let pending = worker.queue_in_flight(local);
            if pending > 0 {
                info!(
                    queue = local * self.workers.len() + thread,
                    pending, "Waiting for requests in flight on a stopping queue"
                );
            }
            worker.begin_stop(local);
        }
        self.end_stops(&mut worker, vrings);
    }

    /// Ends the stops of `worker`'s queues that have nothing in flight any more, and tells
    /// the relay if any ended.
    fn end_stops(&self, worker: &mut Worker<EngineIo>, vrings: &[Vring]) {
        if worker.stops_pending() && worker.finish_stops(vrings) > 0 {
            // A full counter is readable already: the relay sees it either way.
            let _ = self.stopped.write(1);
        }
    }

    /// Once the connection's workers are off their core threads (and the relay has dropped its handler):
    /// waits for every request still in flight, then flushes every shard and returns what it
    /// reserved. Every
    /// worker is finished even if one fails; the first error is returned (for the caller to
    /// report), later ones are logged here.
    pub fn finish(&self) -> Result<(), qcow2d_engine::Error> {
        self.settle();
        let mut result = Ok(());
        for thread in 0..self.workers.len() {
            let mut worker = self.lock(thread);
            // A shard still waiting for the engine after `settle` gave up would wait for it
            // again in its flush, perhaps for a piece another shard holds: left unflushed.
            let finished = match worker.io().in_flight() {
                0 => worker.finish(),
                stuck => {
                    worker.abandon();
                    Err(qcow2d_engine::Error::new(
                        qcow2d_engine::ErrorKind::Io,
                        format!("{stuck} requests never completed: shard {thread} not flushed"),
                    ))
                }
            };
            if let Err(e) = finished {
                if result.is_ok() {
                    result = Err(e);
                } else {
                    error!(thread, "Another shard could not flush either: {e}");
                }
            }
        }
        result
    }

    /// Polls every shard until none has requests in flight (or none completed one for
    /// [`ENGINE_STALL`]). The shards of a writable image serve pieces of each other's
    /// requests, so with the workers off their core threads one thread must drive them all:
    /// a shard waiting on its own could wait for a shard nobody polls.
    fn settle(&self) {
        if let Some(in_flight) = self.drive_until_idle(|w| w.pump()) {
            error!(
                in_flight,
                "The engine stopped completing requests; flushing the shards that are idle"
            );
        }
    }

    /// Calls `step` on every worker in turn (under its lock, taken briefly each time) until
    /// all say nothing is left, or none made progress for [`ENGINE_STALL`]: then returns what
    /// is left. `step` returns what is left of the worker's and whether it made progress.
    fn drive_until_idle(
        &self,
        mut step: impl FnMut(&mut Worker<EngineIo>) -> (usize, bool),
    ) -> Option<usize> {
        let mut last_progress = std::time::Instant::now();
        loop {
            let mut left = 0;
            for thread in 0..self.workers.len() {
                let (rest, moved) = step(&mut self.lock(thread));
                left += rest;
                if moved {
                    last_progress = std::time::Instant::now();
                }
            }
            if left == 0 {
                return None;
            }
            if last_progress.elapsed() > ENGINE_STALL {
                return Some(left);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Where the relay publishes the in-flight area the frontend shares.
    pub fn inflight(&self) -> Arc<InflightShared> {
        Arc::clone(&self.inflight)
    }

    /// Where the relay keeps the frontend's backend request channel.
    pub fn channel(&self) -> Arc<BackendChannel> {
        Arc::clone(&self.channel)
    }

    /// For an online resize: stops taking requests, waits for those in flight (the worker
    /// threads complete them as usual), flushes every shard, gives back its reservation and
    /// drops it, so that nothing holds the image. Chains the guest adds meanwhile wait in the
    /// rings. On failure the workers take requests again and the shards stay.
    pub fn suspend(&self, handlers: &Handlers) -> Result<(), String> {
        for thread in 0..self.workers.len() {
            self.lock(thread).pause();
        }
        let deadline = std::time::Instant::now() + SUSPEND_TIMEOUT;
        loop {
            let busy = (0..self.workers.len()).any(|t| {
                let w = self.lock(t);
                w.chains_in_flight() > 0 || w.io().in_flight() > 0
            });
            if !busy {
                break;
            }
            if std::time::Instant::now() > deadline {
                self.unpause();
                return Err(format!(
                    "requests in flight did not complete within {} s",
                    SUSPEND_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The shards leave their workers first, then are flushed from this thread: a flush
        // waits for the disk, and the core threads that run these workers serve other
        // connections meanwhile, which a worker locked for that long would hold up.
        let mut detached = Vec::with_capacity(self.workers.len());
        for (thread, handler) in handlers.iter().enumerate().take(self.workers.len()) {
            let mut worker = self.lock(thread);
            if let Some(fd) = worker.io().completion_fd() {
                if let Err(e) =
                    handler.unregister_listener(fd, EventSet::IN, self.completion_event(thread))
                {
                    warn!(thread, "Cannot stop watching a shard's completions: {e}");
                }
            }
            detached.push(worker.io_mut().detach());
        }
        if let Err(e) = detached.iter_mut().try_for_each(EngineIo::finish) {
            // The shards go back as they were (the engine refuses writes after a failed
            // flush); the export goes on at its old size.
            let back = self.attach(detached, handlers);
            self.unpause();
            back.map_err(|b| format!("cannot flush the export's writes: {e}; {b}"))?;
            return Err(format!("cannot flush the export's writes: {e}"));
        }
        // Every shard of the group goes at once, with nothing in flight.
        drop(detached);
        Ok(())
    }

    /// After [`BlkBackend::suspend`]: new shards of `image` (whose size is now `capacity`
    /// bytes) for the workers, watched by their epoll loops, and requests are taken again.
    pub fn resume(&self, image: &Image, handlers: &Handlers) -> Result<(), BackendError> {
        let capacity = image.virtual_size();
        self.capacity.store(capacity, Ordering::Relaxed);
        self.config.sectors.store(
            capacity >> crate::virtio_blk::SECTOR_SHIFT,
            Ordering::Relaxed,
        );
        let ios = EngineIo::for_workers(image, self.workers.len(), &self.cache_budgets)
            .map_err(|source| BackendError::Shard { index: 0, source })?;
        self.attach(ios, handlers)?;
        self.apply_cache_mode();
        self.unpause();
        Ok(())
    }

    /// Gives each worker its shard of `ios` and watches the shard's completions in the
    /// worker's epoll loop.
    fn attach(&self, ios: Vec<EngineIo>, handlers: &Handlers) -> Result<(), BackendError> {
        for (thread, io) in ios.into_iter().enumerate() {
            let mut worker = self.lock(thread);
            worker.io_mut().attach(io);
            if let (Some(fd), Some(handler)) = (worker.io().completion_fd(), handlers.get(thread)) {
                handler
                    .register_listener(fd, EventSet::IN, self.completion_event(thread))
                    .map_err(|source| BackendError::RegisterCompletions {
                        index: thread,
                        source,
                    })?;
            }
        }
        Ok(())
    }

    fn unpause(&self) {
        for thread in 0..self.workers.len() {
            self.lock(thread).unpause();
        }
    }

    /// Number of workers (and shards).
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// The epoll data of worker `thread`'s completion eventfd: above the range of the queues'
    /// kicks (local queue indexes, below `num_queues`).
    fn completion_event(&self, thread: usize) -> u64 {
        (self.num_queues + 1 + thread) as u64
    }

    /// The epoll data of worker `thread`'s throttle timer: after the completion events.
    fn timer_event(&self, thread: usize) -> u64 {
        (self.num_queues + 1 + self.workers.len() + thread) as u64
    }

    /// Adds each worker's shard completion eventfd and throttle timer to that worker's epoll
    /// loop.
    pub fn register_completions(&self, handlers: &[Arc<WorkerLoop>]) -> io::Result<()> {
        for (index, handler) in handlers.iter().enumerate() {
            let (fd, timer): (Option<RawFd>, Option<RawFd>) = {
                let worker = self.lock(index);
                (worker.io().completion_fd(), worker.timer_fd())
            };
            if let Some(fd) = fd {
                handler.register_listener(fd, EventSet::IN, self.completion_event(index))?;
            }
            if let Some(timer) = timer {
                handler.register_listener(timer, EventSet::IN, self.timer_event(index))?;
            }
        }
        Ok(())
    }

    /// Stops taking requests from the guest and completes every request in flight to the
    /// used rings, so that a frontend that reconnects (to this daemon or the next one) resumes
    /// exactly after the last request it got back. Called before a shutdown disconnects. It
    /// waits (on the caller's thread, which also returns what the engine finished, so it needs
    /// no core thread) until nothing is in flight, or until nothing completed for
    /// [`ENGINE_STALL`].
    pub fn quiesce(&self) {
        self.quiescing.store(true, Ordering::SeqCst);
        for thread in 0..self.workers.len() {
            self.lock(thread).quiesce();
        }
        let stalled = self.drive_until_idle(|w| {
            let (chains, moved, stops) = w.drain_step();
            if stops > 0 {
                // A GET_VRING_BASE waiting for this queue is answered.
                let _ = self.stopped.write(1);
            }
            (chains as usize, moved)
        });
        if let Some(left) = stalled {
            error!(
                left,
                "The engine stopped completing requests; disconnecting with requests in flight"
            );
        }
    }

    fn lock(&self, thread: usize) -> MutexGuard<'_, Worker<EngineIo>> {
        // A worker that panicked left its state as it was between two requests at worst; the
        // panic is already reported, and refusing to go on would wedge the connection.
        self.workers[thread]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        let replaced = crate::sigbus::replaced_pages().saturating_sub(self.replaced_before);
        if replaced > 0 {
            warn!(
                pages = replaced,
                "The frontend cut guest memory short under the daemon: those pages read as \
                 zeros (its memory could not be sealed)"
            );
        }
    }
}

/// What the frontend handler (`crate::handler`, on the relay thread) asks of the device, and
/// the workers' event handling. None of these waits for a worker's lock but
/// [`BlkBackend::handle_event`] and [`BlkBackend::stop_queues`], which run on the worker.
impl BlkBackend {
    /// Queues offered to the guest.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// The largest queue the frontend may set up.
    pub fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    /// The virtio features offered, with the vhost-user protocol bit.
    pub fn features(&self) -> u64 {
        device_features(self.device.read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The driver's features (SET_FEATURES).
    pub fn acked_features(&self, features: u64) {
        debug!("Guest acknowledged features {features:#x}");
        self.config.ack_features(features);
        // QEMU first acknowledges only the vhost-user protocol bit; a driver's own set always
        // has VIRTIO_F_VERSION_1 (bit 32), the one feature every modern driver takes.
        let from_driver = features & (1 << 32) != 0;
        if from_driver && features & (1 << VIRTIO_BLK_F_FLUSH) == 0 && !self.device.read_only {
            info!("The driver cannot flush: every write is made durable before it completes");
        }
        self.request_cache_mode();
    }

    /// The vhost-user protocol features offered (vhost's request handler adds REPLY_ACK).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // Answered by the relay (see crate::relay).
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // The channel the daemon tells the frontend of a resize on.
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// GET_CONFIG.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    /// SET_CONFIG: only the write-cache byte of a writable export changes anything.
    pub fn set_config(&self, offset: u32, buf: &[u8]) {
        match self.config.write(offset, buf) {
            Some(writeback) => {
                self.request_cache_mode();
                info!(
                    "The driver set the write cache to {}",
                    if writeback {
                        "write-back"
                    } else {
                        "write-through"
                    }
                );
            }
            None => debug!(offset, len = buf.len(), "Ignoring a config-space write"),
        }
    }

    /// Guards the regions of `mem`, the connection's new memory table, that may fault
    /// (unsealed ones, and those of huge pages: [`MemoryGuards::update`]) for as long as something holds it, then has `publish` make it the one the
    /// workers and queues read (the connection's atomic) and return what it published. The
    /// table reaches them only once its regions are guarded: a worker reading a region the
    /// frontend had cut short before its guard was registered would kill the daemon. An error
    /// refuses the table, which is never published (the request handler ends the
    /// connection).
    pub fn guard_and_publish(
        &self,
        mem: GuestMemoryMmap,
        publish: impl FnOnce(GuestMemoryMmap) -> Arc<GuestMemoryMmap>,
    ) -> io::Result<()> {
        let mut guards = self.guards.lock().unwrap_or_else(PoisonError::into_inner);
        let candidate = Arc::new(mem);
        guards.update(&candidate)?;
        // Nothing else holds the candidate: the table itself is published (no copy).
        let mem =
            Arc::try_unwrap(candidate).unwrap_or_else(|shared| GuestMemoryMmap::clone(&shared));
        let published = publish(mem);
        // Under the same lock: no other update saw the candidate's entry without a holder.
        guards.now_held_by(&published);
        Ok(())
    }

    /// One event of worker `thread`'s loop: a kick of its local queue `event` (below the
    /// number of its queues), its shard's completions or its timer.
    pub fn handle_event(&self, event: u64, vrings: &[Vring], thread_id: usize) {
        if thread_id >= self.workers.len() {
            warn!(thread_id, "Event for an unknown worker thread");
            return;
        }
        let event = usize::try_from(event).unwrap_or(usize::MAX);
        let mut worker = self.lock(thread_id);
        self.catch_up_cache_mode(thread_id, &mut worker);
        // The size may change at run time (an online resize); the rest is fixed.
        let device = DeviceInfo {
            capacity: self.capacity.load(Ordering::Relaxed),
            ..self.device.clone()
        };
        if event < vrings.len() && self.quiescing.load(Ordering::SeqCst) {
            // Left in the available ring for the next connection.
        } else if event < vrings.len() {
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            worker.process_queue(vrings, event, event_idx, &device);
        } else if event as u64 == self.completion_event(thread_id) {
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            worker.process_completions(vrings, event_idx, &self.device);
        } else if event as u64 == self.timer_event(thread_id) {
            if self.quiescing.load(Ordering::SeqCst) {
                // The held chain was submitted by the quiesce; nothing more is taken.
                worker.clear_timer();
            } else {
                let event_idx = self.event_idx.load(Ordering::Relaxed);
                worker.process_timer(vrings, event_idx, &device);
            }
        } else {
            warn!(thread_id, event, "Unexpected event");
        }
        self.end_stops(&mut worker, vrings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_blk::{ID_BYTES, WRITEBACK_OFFSET};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    };

    fn space(read_only: bool, writeback: bool) -> (ConfigSpace, Arc<AtomicBool>) {
        let shared = Arc::new(AtomicBool::new(writeback));
        let base = BlkConfig::new(1 << 30, 4, 65536, read_only, false);
        (
            ConfigSpace::new(base, read_only, Arc::clone(&shared)),
            shared,
        )
    }

    #[test]
    fn set_config_writes_only_the_writeback_byte() {
        let (cfg, shared) = space(false, true);
        let before = cfg.read(0, 96);
        assert_eq!(before[32], 1);
        // The driver turns the cache off: reflected at once, and kept for the export.
        assert_eq!(cfg.write(WRITEBACK_OFFSET, &[0]), Some(false));
        assert_eq!(cfg.read(WRITEBACK_OFFSET, 1), vec![0]);
        assert!(!shared.load(Ordering::Relaxed));
        assert!(!cfg.writeback());
        let after = cfg.read(0, 96);
        assert_eq!(after[..32], before[..32]);
        assert_eq!(after[33..], before[33..]);
        // Writes elsewhere change nothing, even those that would change capacity.
        assert_eq!(cfg.write(0, &[0xff; 32]), None);
        assert_eq!(cfg.write(36, &[0; 8]), None);
        assert_eq!(cfg.read(0, 96), after);
        // A wide write covering byte 32: only that byte is taken.
        let mut wide = [0u8; 16];
        wide[32 - 24] = 1;
        assert_eq!(cfg.write(24, &wide), Some(true));
        assert_eq!(cfg.read(0, 96), before);
        // A new connection of the same export starts from the driver's choice.
        cfg.write(WRITEBACK_OFFSET, &[0]);
        let next = ConfigSpace::new(cfg.base, false, Arc::clone(&shared));
        assert_eq!(next.read(WRITEBACK_OFFSET, 1), vec![0]);
    }

    #[test]
    fn writethrough_without_flush_and_on_read_only_exports() {
        let (cfg, _) = space(false, false);
        assert_eq!(cfg.read(WRITEBACK_OFFSET, 1), vec![0], "--writethrough");
        let (cfg, _) = space(false, true);
        // A driver without FLUSH cannot make writes durable: write-through, reported as such.
        cfg.ack_features(1 << VIRTIO_BLK_F_CONFIG_WCE);
        assert!(!cfg.writeback());
        assert_eq!(cfg.read(WRITEBACK_OFFSET, 1), vec![0]);
        cfg.ack_features((1 << VIRTIO_BLK_F_CONFIG_WCE) | (1 << VIRTIO_BLK_F_FLUSH));
        assert!(cfg.writeback());

        let (ro, shared) = space(true, true);
        assert_eq!(ro.read(WRITEBACK_OFFSET, 1), vec![0]);
        assert_eq!(ro.write(WRITEBACK_OFFSET, &[1]), None);
        assert_eq!(ro.write(WRITEBACK_OFFSET, &[0]), None);
        assert!(shared.load(Ordering::Relaxed), "unchanged");
    }

    /// A fresh qcow2 image made by qemu-img (missing: the test fails, naming it).
    fn qemu_img_create(name: &str, size: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("qcow2d-backend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        qcow2d_tests::create_qcow2_in(&dir, name, "", size)
    }

    fn params(image: &Image, queues: u16, shards: usize) -> DeviceParams {
        DeviceParams {
            num_queues: queues,
            shards,
            device: DeviceInfo {
                capacity: image.virtual_size(),
                read_only: image.is_read_only(),
                serial: [0; ID_BYTES],
            },
            cluster_size: image.cluster_size(),
            writeback: Arc::new(AtomicBool::new(true)),
            metrics: None,
            throttle: Arc::new(ExportThrottle::default()),
            budgets: Budgets::default(),
        }
    }

    #[test]
    fn backend_over_a_real_image() {
        let path = qemu_img_create("rw.qcow2", "64M");
        let options = qcow2d_engine::OpenOptions {
            read_only: false,
            ..qcow2d_engine::OpenOptions::default()
        };
        let image = Image::open(&path, &options).unwrap();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(&image, &params(&image, 8, 1), &mem, &[]).unwrap();
        assert_eq!(backend.threads(), 1);
        let features = backend.features();
        for bit in [
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_CONFIG_WCE,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(backend.get_config(WRITEBACK_OFFSET, 1), vec![1]);
        backend.set_config(WRITEBACK_OFFSET, &[0]);
        assert_eq!(backend.get_config(WRITEBACK_OFFSET, 1), vec![0]);
        backend.set_config(WRITEBACK_OFFSET, &[1]);
        assert_eq!(backend.get_config(WRITEBACK_OFFSET, 1), vec![1]);
        backend.finish().unwrap();
        drop(backend);
        image.close().unwrap();
        drop(image);

        // Read-only: RO and several shards.
        let image = Image::open(&path, &qcow2d_engine::OpenOptions::default()).unwrap();
        let backend = BlkBackend::new(&image, &params(&image, 8, 2), &mem, &[]).unwrap();
        assert_eq!(backend.threads(), 2);
        let features = backend.features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        backend.set_config(WRITEBACK_OFFSET, &[1]);
        assert_eq!(backend.get_config(WRITEBACK_OFFSET, 1), vec![0]);
        backend.finish().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// A memfd of `len` bytes, each byte `fill`, sealed against shrinking or not sealable.
    fn memfd(len: u64, fill: u8, sealed: bool) -> std::fs::File {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
        // SAFETY: memfd_create with a C string literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"backend-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(&vec![fill; len as usize]).unwrap();
        let sealing = crate::fdcheck::seal_against_shrinking(&file);
        assert_eq!(sealing == crate::fdcheck::Sealing::Unsealable, !sealed);
        file
    }

    /// `count` regions of one page at guest addresses `first << 20`, `(first + 1) << 20`...,
    /// each mapping the start of `file`.
    fn table(file: &std::fs::File, first: u64, count: u64) -> Arc<GuestMemoryMmap> {
        let ranges = (first..first + count).map(|i| {
            let offset = vm_memory::FileOffset::new(file.try_clone().unwrap(), 0);
            (vm_memory::GuestAddress(i << 20), 4096, Some(offset))
        });
        Arc::new(GuestMemoryMmap::from_ranges_with_files(ranges).unwrap())
    }

    #[test]
    fn unsealed_memory_past_what_can_be_guarded_is_refused_and_taken_out_of_use() {
        use vm_memory::{Bytes, GuestAddress};
        crate::sigbus::install().unwrap();
        let unsealed = memfd(4096, 1, false);
        let sealed = memfd(4096, 2, true);
        let half = (crate::sigbus::PER_CONNECTION / 2) as u64;
        let mut guards = MemoryGuards::default();
        // A table, and a newer one of as many fresh regions while requests in flight still
        // hold the first: the connection's whole share.
        let old = table(&unsealed, 0, half);
        guards.update(&old).unwrap();
        let newer = table(&unsealed, half, half);
        guards.update(&newer).unwrap();
        // Sealed regions need no guard and take none.
        let sealed_table = table(&sealed, 2 * half, 8);
        guards.update(&sealed_table).unwrap();
        assert_eq!(guards.registered.count(), 2 * half as usize);
        // One unsealed region more cannot be guarded: refused, and no longer the file.
        let last_file = memfd(4096, 7, false);
        let last = table(&last_file, 3 * half, 1);
        let err = guards.update(&last).unwrap_err();
        assert!(err.to_string().contains("the table is refused"), "{err}");
        let at = GuestAddress((3 * half) << 20);
        assert_eq!(
            last.read_obj::<u8>(at).unwrap(),
            0,
            "still the file's memory"
        );
        // Cut short, it still cannot fault (nothing registered it).
        last_file.set_len(0).unwrap();
        assert_eq!(last.read_obj::<u8>(at).unwrap(), 0);
        // The guarded regions are the file's, and the sealed ones too.
        assert_eq!(old.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
        assert_eq!(
            sealed_table
                .read_obj::<u8>(GuestAddress((2 * half) << 20))
                .unwrap(),
            2
        );
        // Once the older tables are gone, their room is the connection's again.
        drop((old, newer, last));
        let again = table(&memfd(4096, 3, false), 4 * half, 1);
        guards.update(&again).unwrap();
        assert_eq!(guards.registered.count(), 1);
    }

    /// Guest memory of huge pages (2 MiB and 1 GiB) is guarded even when sealed against
    /// shrinking (a page not backed faults when the host has no huge page left), sealed
    /// memory of base pages is not. (Nothing touches the huge pages: none needs reserving.)
    #[test]
    fn sealed_memory_on_huge_pages_is_guarded_all_the_same() {
        use vm_memory::{FileOffset, GuestAddress};
        for page in [2usize << 20, 1 << 30] {
            let Some(huge) =
                crate::fdcheck::tests::huge_memfd(page, page as u64, libc::MFD_ALLOW_SEALING)
            else {
                continue;
            };
            assert_eq!(
                crate::fdcheck::seal_against_shrinking(&huge),
                crate::fdcheck::Sealing::SealedNow
            );
            let small = memfd(4096, 2, true);
            let regions = [
                (GuestAddress(0), page, Some(FileOffset::new(huge, 0))),
                (
                    GuestAddress(page as u64),
                    4096,
                    Some(FileOffset::new(small, 0)),
                ),
            ];
            let table = Arc::new(GuestMemoryMmap::from_ranges_with_files(regions).unwrap());
            let mut guards = MemoryGuards::default();
            guards.update(&table).unwrap();
            assert_eq!(guards.registered.count(), 1, "{page}-byte pages");
            let (_, ranges) = guards.tables.last().unwrap();
            assert_eq!(ranges.len(), 1);
            assert_eq!((ranges[0].len, ranges[0].page), (page, page));
        }
    }

    /// The workers get a memory table only once its regions are guarded: a table refused
    /// for want of room is never published (the request handler then ends the connection),
    /// and the guards of a published table last as long as something holds that table.
    #[test]
    fn a_refused_memory_table_never_reaches_the_workers() {
        use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
        crate::sigbus::install().unwrap();
        let dir = std::env::temp_dir().join(format!("qcow2d-tables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = qcow2d_tests::create_qcow2_in(&dir, "tables.qcow2", "", "64M");
        let image = Image::open(&path, &qcow2d_engine::OpenOptions::default()).unwrap();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(&image, &params(&image, 2, 2), &mem, &[]).unwrap();
        // As the request handler publishes a table.
        let publish = |table: GuestMemoryMmap| {
            mem.lock().unwrap().replace(table);
            mem.memory().into_inner()
        };
        let unsealed = memfd(4096, 1, false);
        let half = (crate::sigbus::PER_CONNECTION / 2) as u64;
        // Two tables of fresh regions, the first still held by requests in flight (here,
        // the test): the connection's whole share.
        let mut held = Vec::new();
        for first in [0, half] {
            let given = table(&unsealed, first, half);
            backend
                .guard_and_publish(GuestMemoryMmap::clone(&given), publish)
                .unwrap();
            let seen = backend.lock(1).memory();
            assert!(Arc::ptr_eq(&seen, &mem.memory().into_inner()));
            assert_eq!(seen.num_regions(), half as usize);
            held.push(seen);
        }
        let refused = table(&memfd(4096, 7, false), 2 * half, 1);
        let err = backend
            .guard_and_publish(GuestMemoryMmap::clone(&refused), publish)
            .unwrap_err();
        assert!(err.to_string().contains("the table is refused"), "{err}");
        for thread in 0..2 {
            assert!(
                Arc::ptr_eq(&backend.lock(thread).memory(), &held[1]),
                "the refused table reached the workers"
            );
        }
        drop(held);
        backend.finish().unwrap();
        drop(backend);
        image.close().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
