//! The core threads: one per CPU the process may run on (`qcow2d-core-N`), started once for
//! the whole process, which run the workers of every connection of every export.
//!
//! A connection has one worker per engine shard (see [`crate::worker_loop`]); each worker is
//! placed on one core thread for the life of the connection ([`CorePool::place`]: the shards
//! of one connection on distinct cores as far as there are cores, starting with the least
//! loaded one) and watched there through its own epoll set, which sits in the core thread's
//! epoll set (epoll sets nest). A core thread waits on its set; for each worker whose set is
//! ready it runs that worker's ready events ([`CoreWork::run_ready`]). So the number of
//! data-path threads is fixed, whatever the number of exports and connections, and a busy
//! connection's workers run on every core.
//!
//! Nothing a worker runs may wait: a core thread serves other connections too. A stopping
//! queue ends its stop as its requests complete (see `BlkBackend::stop_queues`); the threads
//! that quiesce, suspend or finish a connection take a worker's mutex only briefly.
//!
//! Each core thread has a cache budget ([`Core::cache_budget`]): the engine caches (L2 tables,
//! decompressed clusters) of every shard whose worker it runs draw from it, so that what many
//! exports cache is bounded per core rather than per export. A connection's workers are
//! placed before its shards are made ([`CorePool::place`]), and each shard is given the budget
//! of its worker's core.
//!
//! Workers come and go through commands to the core thread (a queue under a mutex and an
//! eventfd that wakes it): [`Core::add`] from the listener thread as a connection is set up,
//! [`Core::remove`] from the thread tearing it down, which returns once the core thread has
//! dropped the worker (between two of its events), so nothing touches the connection's shards
//! after it. A worker that panics is dropped by its core thread, its connection ended (its
//! frontend's socket shut down) and logged; the core thread and the other connections go on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use qcow2d_engine::CacheBudget;
use tracing::error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::sandbox::{seccomp, Role};

/// The epoll data of a core thread's command eventfd (worker keys are slab indexes below).
const WAKE: u64 = u64::MAX;
/// Worker sets taken per wait.
const EVENTS: usize = 64;

/// The process's core threads (see the module documentation).
pub struct CorePool {
    cores: Vec<Arc<Core>>,
}

static POOL: Mutex<Option<Arc<CorePool>>> = Mutex::new(None);

/// Starts the core threads, one per CPU the process may run on, each with a cache budget of
/// `cache_bytes_per_core`, if they are not running yet (the daemon does so at set-up, before
/// any thread has a filter; each takes the worker's); returns the running ones if they are
/// (with the budgets they were started with).
pub fn start_with(cache_bytes_per_core: u64) -> io::Result<Arc<CorePool>> {
    let mut slot = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pool) = slot.as_ref() {
        return Ok(Arc::clone(pool));
    }
    let pool = Arc::new(CorePool::new(
        crate::config::cpu_count(),
        cache_bytes_per_core,
    )?);
    *slot = Some(Arc::clone(&pool));
    Ok(pool)
}

/// [`start_with`] the default cache budget ([`crate::config::DEFAULT_CACHE_PER_CORE_BYTES`]).
pub fn start() -> io::Result<Arc<CorePool>> {
    start_with(crate::config::DEFAULT_CACHE_PER_CORE_BYTES)
}

/// The core threads, if they were started.
pub fn running() -> Option<Arc<CorePool>> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

impl CorePool {
    /// Starts `count` core threads (at least one), each with a cache budget of
    /// `cache_bytes` (see [`Core::cache_budget`]).
    fn new(count: usize, cache_bytes: u64) -> io::Result<Self> {
        let count = count.max(1);
        let mut cores = Vec::with_capacity(count);
        for index in 0..count {
            let core = Arc::new(Core::new(cache_bytes)?);
            let theirs = Arc::clone(&core);
            std::thread::Builder::new()
                .name(format!("qcow2d-core-{index}"))
                .spawn(move || theirs.run(index))?;
            cores.push(core);
        }
        Ok(CorePool { cores })
    }

    /// Picks a core thread for each of `workers` workers of one connection, and counts them
    /// there: the cores in order of their workers (the lowest index among equals), worker `t`
    /// on the `t`-th of them, round again past the last.
    pub fn place(&self, workers: usize) -> Vec<Arc<Core>> {
        // Cores whose thread ended take no more workers (unless none is left: then `add`
        // says so).
        let mut order: Vec<usize> = (0..self.cores.len())
            .filter(|&c| !self.cores[c].commands().ended)
            .collect();
        if order.is_empty() {
            order = (0..self.cores.len()).collect();
        }
        order.sort_by_key(|&c| (self.cores[c].load.load(Ordering::Relaxed), c));
        (0..workers)
            .map(|t| {
                let core = &self.cores[order[t % order.len()]];
                core.load.fetch_add(1, Ordering::Relaxed);
                Arc::clone(core)
            })
            .collect()
    }

    /// Has every core thread return to the system the memory of its heap that is free now
    /// (a connection's shards, allocated there, freed by the thread that tore it down: a
    /// thread that lives on keeps such pages until it collects them). Never waits.
    pub fn release_freed_memory(&self) {
        for core in &self.cores {
            core.send(Command::Collect);
        }
    }

    /// Number of core threads.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// Each core thread's cache budget, in core order.
    pub fn cache_budgets(&self) -> Vec<CacheBudget> {
        self.cores.iter().map(|c| c.cache.clone()).collect()
    }
}

/// What a core thread runs: one worker of a connection (`crate::worker_loop`).
pub trait CoreWork: Send {
    /// The descriptor that is readable while the worker has events ready.
    fn ready_fd(&self) -> RawFd;
    /// Runs the events ready now, never waiting.
    fn run_ready(&self);
    /// After a panic in [`CoreWork::run_ready`] (the worker is dropped then): ends what the
    /// worker served.
    fn abandon(&self);
}

enum Command {
    Add(Box<dyn CoreWork>, SyncSender<io::Result<u64>>),
    Remove(u64, SyncSender<()>),
    /// Return the memory freed (by other threads too) in this thread's heap to the system.
    Collect,
}

struct Commands {
    list: Vec<Command>,
    /// The thread has ended: no command is taken any more.
    ended: bool,
}

/// One core thread's shared end.
pub struct Core {
    epoll: Epoll,
    wake: EventFd,
    commands: Mutex<Commands>,
    /// Workers placed on this core (for [`CorePool::place`]).
    load: AtomicUsize,
    /// What the caches of the shards of the workers placed here draw from.
    cache: CacheBudget,
}

/// The workers a core thread runs: a slab. A worker's key (the epoll data of its set) is
/// its slot with the slot's generation above it, so that a key kept after its worker was
/// dropped (by a panic) never names the next worker in that slot.
struct Running {
    slots: Vec<(u32, Option<Box<dyn CoreWork>>)>,
    free: Vec<usize>,
}

impl Running {
    fn key(slot: usize, generation: u32) -> u64 {
        (u64::from(generation) << 32) | slot as u64
    }

    /// The slot of `key`, if it still holds that key's worker.
    fn slot(&self, key: u64) -> Option<usize> {
        let slot = usize::try_from(key & u64::from(u32::MAX)).ok()?;
        let (generation, worker) = self.slots.get(slot)?;
        (u64::from(*generation) == key >> 32 && worker.is_some()).then_some(slot)
    }
}

impl Core {
    fn new(cache_bytes: u64) -> io::Result<Self> {
        let (epoll, wake) = epoll_with_wake(WAKE)?;
        Ok(Core {
            epoll,
            wake,
            commands: Mutex::new(Commands {
                list: Vec::new(),
                ended: false,
            }),
            load: AtomicUsize::new(0),
            cache: CacheBudget::new(cache_bytes),
        })
    }

    /// The cache budget of this core thread: a shard whose worker is placed here is made with
    /// it, and its caches grow to its fair share of it (the budget divided by the shards
    /// here), past that only while the budget has room (beyond a floor of a few slots per
    /// image layer, see the engine's `CacheBudget`).
    pub fn cache_budget(&self) -> &CacheBudget {
        &self.cache
    }

    fn commands(&self) -> MutexGuard<'_, Commands> {
        self.commands.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `command` and wakes the thread; false if the thread has ended.
    fn send(&self, command: Command) -> bool {
        let mut commands = self.commands();
        if commands.ended {
            return false;
        }
        commands.list.push(command);
        drop(commands);
        // A full counter is readable already: the thread wakes either way.
        let _ = self.wake.write(1);
        true
    }

    /// Has the core thread run `worker` from now on; returns its key there, once its event
    /// set is in the thread's.
    pub fn add(&self, worker: Box<dyn CoreWork>) -> io::Result<u64> {
        let (tx, rx) = sync_channel(1);
        if !self.send(Command::Add(worker, tx)) {
            return Err(ended());
        }
        rx.recv().unwrap_or_else(|_| Err(ended()))
    }

    /// Gives back a place counted by [`CorePool::place`] for a worker never added.
    pub fn unplace(&self) {
        let _ = self
            .load
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Has the core thread drop the worker `key` (and its place in the count); the returned
    /// receiver answers once it has (or at once if the thread has ended).
    pub fn remove(&self, key: u64) -> Receiver<()> {
        self.unplace();
        let (tx, rx) = sync_channel(1);
        // If the thread has ended, `tx` is dropped and the receiver answers at once.
        self.send(Command::Remove(key, tx));
        rx
    }

    fn run(&self, index: usize) {
        seccomp::enter_or_abort(Role::Worker);
        // Marks the thread ended however it leaves, so that no command waits for it, and
        // ends the connections of the workers it ran: nothing serves them any more.
        struct Ended<'a> {
            core: &'a Core,
            running: Running,
        }
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                let mut commands = self.core.commands();
                commands.ended = true;
                // Answers every command left (their senders go).
                commands.list.clear();
                drop(commands);
                for worker in self.running.slots.iter().filter_map(|(_, w)| w.as_ref()) {
                    worker.abandon();
                }
            }
        }
        let mut ended = Ended {
            core: self,
            running: Running {
                slots: Vec::new(),
                free: Vec::new(),
            },
        };
        let running = &mut ended.running;
        let mut events = vec![EpollEvent::default(); EVENTS];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only a broken epoll descriptor gets here.
                    error!(
                        core = index,
                        "A core thread cannot wait for events any more: {e}"
                    );
                    return;
                }
            };
            for event in &events[..n] {
                let key = event.data();
                if key == WAKE {
                    let _ = self.wake.read();
                    let list = std::mem::take(&mut self.commands().list);
                    for command in list {
                        self.apply(command, running);
                    }
                    continue;
                }
                // A worker dropped by a command earlier in this batch is gone.
                let Some(worker) = running.slot(key).and_then(|s| running.slots[s].1.as_ref())
                else {
                    continue;
                };
                if catch_unwind(AssertUnwindSafe(|| worker.run_ready())).is_err() {
                    error!(core = index, "A worker panicked: its connection is ended");
                    worker.abandon();
                    self.drop_worker(key, running);
                }
            }
        }
    }

    fn apply(&self, command: Command, running: &mut Running) {
        match command {
            Command::Add(worker, reply) => {
                let slot = running.free.pop().unwrap_or_else(|| {
                    running.slots.push((0, None));
                    running.slots.len() - 1
                });
                let generation = running.slots[slot].0.wrapping_add(1);
                running.slots[slot].0 = generation;
                let key = Running::key(slot, generation);
                let added = self.epoll.ctl(
                    ControlOperation::Add,
                    worker.ready_fd(),
                    EpollEvent::new(EventSet::IN, key),
                );
                let answer = match added {
                    Ok(()) => {
                        running.slots[slot].1 = Some(worker);
                        Ok(key)
                    }
                    Err(e) => {
                        running.free.push(slot);
                        Err(e)
                    }
                };
                let _ = reply.send(answer);
            }
            Command::Remove(key, reply) => {
                self.drop_worker(key, running);
                let _ = reply.send(());
            }
            Command::Collect => crate::release_freed_memory(),
        }
    }

    /// Takes worker `key` out of the set and drops it (nothing of it runs here any more).
    fn drop_worker(&self, key: u64, running: &mut Running) {
        let Some(slot) = running.slot(key) else {
            return;
        };
        if let Some(worker) = running.slots[slot].1.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                worker.ready_fd(),
                EpollEvent::new(EventSet::IN, key),
            );
            running.free.push(slot);
        }
    }
}

/// An epoll set watching one non-blocking eventfd (readable, with `data`), through which
/// other threads wake the thread waiting on the set.
pub(crate) fn epoll_with_wake(data: u64) -> io::Result<(Epoll, EventFd)> {
    let epoll = Epoll::new()?;
    let wake = EventFd::new(EFD_NONBLOCK)?;
    epoll.ctl(
        ControlOperation::Add,
        wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, data),
    )?;
    Ok((epoll, wake))
}

fn ended() -> io::Error {
    io::Error::other("the core thread has ended")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    /// A worker whose events are an eventfd's: each run reads it and counts; it panics on
    /// its run while `panic` is set.
    struct Fake {
        fd: Arc<EventFd>,
        runs: Arc<AtomicUsize>,
        panic: Arc<AtomicBool>,
        abandoned: Arc<AtomicBool>,
    }

    impl CoreWork for Fake {
        fn ready_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
        fn run_ready(&self) {
            let _ = self.fd.read();
            self.runs.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panic.load(Ordering::SeqCst), "a worker's bug");
        }
        fn abandon(&self) {
            self.abandoned.store(true, Ordering::SeqCst);
        }
    }

    struct Handle {
        fd: Arc<EventFd>,
        runs: Arc<AtomicUsize>,
        panic: Arc<AtomicBool>,
        abandoned: Arc<AtomicBool>,
    }

    fn fake() -> (Box<dyn CoreWork>, Handle) {
        let h = Handle {
            fd: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            runs: Arc::new(AtomicUsize::new(0)),
            panic: Arc::new(AtomicBool::new(false)),
            abandoned: Arc::new(AtomicBool::new(false)),
        };
        let work = Fake {
            fd: Arc::clone(&h.fd),
            runs: Arc::clone(&h.runs),
            panic: Arc::clone(&h.panic),
            abandoned: Arc::clone(&h.abandoned),
        };
        (Box::new(work), h)
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_connections_workers_go_to_distinct_cores_starting_with_the_least_loaded() {
        let pool = CorePool::new(3, 0).unwrap();
        let index = |c: &Arc<Core>| pool.cores.iter().position(|p| Arc::ptr_eq(p, c)).unwrap();
        let first: Vec<usize> = pool.place(2).iter().map(index).collect();
        assert_eq!(first, [0, 1]);
        let second: Vec<usize> = pool.place(1).iter().map(index).collect();
        assert_eq!(second, [2]);
        // More workers than cores: round the cores again.
        let third: Vec<usize> = pool.place(4).iter().map(index).collect();
        assert_eq!(third, [0, 1, 2, 0]);
        pool.cores[1].unplace();
        pool.cores[1].unplace();
        let fourth: Vec<usize> = pool.place(1).iter().map(index).collect();
        assert_eq!(fourth, [1]);
        // Loads 3, 1, 2: the two least loaded, not the one after the least loaded.
        let fifth: Vec<usize> = pool.place(2).iter().map(index).collect();
        assert_eq!(fifth, [1, 2]);
    }

    #[test]
    fn each_core_has_a_cache_budget_of_its_own() {
        use qcow2d_engine::meta::SlotCache;
        let pool = CorePool::new(2, 1 << 20).unwrap();
        let placed = pool.place(2);
        assert!(placed
            .iter()
            .all(|c| c.cache_budget().limit_bytes() == 1 << 20));
        // A cache drawing from the first worker's core counts there, and only there.
        let mut cache = SlotCache::new(4, 4096).with_budget(placed[0].cache_budget().clone(), 1);
        cache.start_load(1);
        let used: Vec<u64> = pool
            .cache_budgets()
            .iter()
            .map(|b| b.used_bytes())
            .collect();
        assert_eq!(used, [4096, 0]);
        drop(cache);
        assert_eq!(placed[0].cache_budget().used_bytes(), 0);
    }

    #[test]
    fn a_worker_runs_while_added_and_never_after_its_removal_returned() {
        let pool = CorePool::new(1, 0).unwrap();
        let core = &pool.place(1)[0];
        let (work, h) = fake();
        let key = core.add(work).unwrap();
        h.fd.write(1).unwrap();
        wait_for("a run", || h.runs.load(Ordering::SeqCst) == 1);
        core.remove(key).recv().unwrap();
        let runs = h.runs.load(Ordering::SeqCst);
        h.fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.runs.load(Ordering::SeqCst), runs);
        assert_eq!(core.load.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_panicking_worker_is_dropped_and_abandoned_while_the_others_go_on() {
        let pool = CorePool::new(1, 0).unwrap();
        let core = Arc::clone(&pool.cores[0]);
        let (bad, b) = fake();
        let (good, g) = fake();
        let bad_key = core.add(bad).unwrap();
        let good_key = core.add(good).unwrap();
        b.panic.store(true, Ordering::SeqCst);
        b.fd.write(1).unwrap();
        wait_for("the abandon", || b.abandoned.load(Ordering::SeqCst));
        g.fd.write(1).unwrap();
        wait_for("the other's run", || g.runs.load(Ordering::SeqCst) == 1);
        // The panicked worker's slot goes to the next worker; removing the old key later
        // (its connection's teardown) leaves that one alone.
        let (next, n) = fake();
        let next_key = core.add(next).unwrap();
        assert_ne!(next_key, bad_key);
        core.remove(bad_key).recv().unwrap();
        n.fd.write(1).unwrap();
        wait_for("the next one's run", || n.runs.load(Ordering::SeqCst) == 1);
        b.fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.runs.load(Ordering::SeqCst), 1);
        core.remove(good_key).recv().unwrap();
        core.remove(next_key).recv().unwrap();
    }
}
