//! The workers of one connection: one per engine shard, each with its own epoll set
//! ([`WorkerLoop`]) over the kick eventfds of the queues it owns (queue `q` belongs to worker
//! `q % shards`, as its local queue `q / shards`), its shard's completion eventfd, its
//! throttle timer and a control eventfd, run by one of the process's core threads
//! ([`crate::cores`]), which calls [`BlkBackend::handle_event`] for each ready event.
//!
//! Placed on the core threads by the listener thread as a connection is set up: picked
//! ([`Placement`]) before the connection's shards are made, so that each shard draws its
//! caches from its worker's core's budget, then added there ([`Workers::start`]); the
//! frontend handler on the relay thread adds and removes kick
//! eventfds ([`WorkerLoop::register_listener`]) and asks a worker to stop one of its queues
//! ([`WorkerLoop::request_stop`]: the worker stops taking chains from it and, once its
//! requests in flight have completed, writes the connection's "stopped" eventfd, which the
//! relay watches before it answers GET_VRING_BASE); the thread that tears the connection down
//! takes them off their core threads ([`Workers::stop`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2d_engine::CacheBudget;
use tracing::error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::BlkBackend;
use crate::cores::{Core, CoreWork};
use crate::vring::Vring;

/// The epoll data of the control eventfd (queues to stop).
const CONTROL: u64 = u64::MAX - 1;
/// Events taken per wait.
const EVENTS: usize = 64;

/// The event set of one worker (see the module documentation).
pub struct WorkerLoop {
    epoll: Epoll,
    control: EventFd,
    /// Local queues the frontend handler asked to stop, one bit each.
    stopping: AtomicU64,
}

impl WorkerLoop {
    /// A set watching only its control eventfd (see [`Workers::start`]).
    pub(crate) fn new() -> io::Result<Self> {
        let (epoll, control) = crate::cores::epoll_with_wake(CONTROL)?;
        Ok(WorkerLoop {
            epoll,
            control,
            stopping: AtomicU64::new(0),
        })
    }

    /// Watches `fd` for `events`; `data` comes back to [`BlkBackend::handle_event`] (local
    /// queue indexes for kicks, see `BlkBackend::completion_event` for the others).
    pub fn register_listener(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
    }

    /// Stops watching `fd`.
    pub fn unregister_listener(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::new(events, data))
    }

    /// Asks the worker to stop its local queue `local` (see the module documentation).
    /// Never waits.
    pub fn request_stop(&self, local: usize) {
        if local < 64 {
            self.stopping.fetch_or(1 << local, Ordering::SeqCst);
        }
        // A full counter is readable already: no request is lost.
        let _ = self.control.write(1);
    }

    /// Runs the events ready now (at most [`EVENTS`]; the set stays readable for the core
    /// thread if more are), never waiting: on `thread`'s core thread, for worker `thread` of
    /// `backend`, which owns `vrings`.
    pub(crate) fn run_ready(&self, backend: &BlkBackend, vrings: &[Vring], thread: usize) {
        let mut events = [EpollEvent::default(); EVENTS];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                // Only a broken epoll descriptor gets here.
                error!(thread, "A worker cannot read its events: {e}");
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                CONTROL => {
                    let _ = self.control.read();
                    let mask = self.stopping.swap(0, Ordering::SeqCst);
                    backend.stop_queues(thread, mask, vrings);
                }
                data if (data as usize) < vrings.len() => {
                    if vrings[data as usize].read_kick() {
                        backend.handle_event(data, vrings, thread);
                    }
                }
                data => backend.handle_event(data, vrings, thread),
            }
        }
    }
}

/// One worker as its core thread runs it.
struct Placed {
    event_loop: Arc<WorkerLoop>,
    backend: Arc<BlkBackend>,
    /// The queues the worker owns (queue `q` of the connection is local queue `q / shards`
    /// of worker `q % shards`).
    vrings: Vec<Vring>,
    /// The worker's index among the connection's workers.
    thread: usize,
    /// The frontend's socket: shut down to end the connection if the worker panics.
    frontend: Option<Arc<UnixStream>>,
}

impl CoreWork for Placed {
    fn ready_fd(&self) -> RawFd {
        self.event_loop.epoll.as_raw_fd()
    }

    fn run_ready(&self) {
        self.event_loop
            .run_ready(&self.backend, &self.vrings, self.thread);
    }

    fn abandon(&self) {
        if let Some(frontend) = &self.frontend {
            let _ = frontend.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
impl WorkerLoop {
    /// The epoll data of the events ready now, without waiting and without running them.
    pub(crate) fn ready_now(&self) -> Vec<u64> {
        let mut events = vec![EpollEvent::default(); EVENTS];
        let n = self.epoll.wait(0, &mut events).unwrap();
        events[..n].iter().map(EpollEvent::data).collect()
    }
}

/// The core threads picked for the workers of one connection, counted there, before its
/// shards are made ([`Placement::cache_budgets`]); [`Workers::start`] adds the workers there.
/// Dropped before that, it gives the places back.
pub struct Placement {
    cores: Vec<Arc<Core>>,
}

impl Placement {
    /// Picks a core thread for each of `workers` workers (see `CorePool::place`), starting
    /// the core threads if they are not running yet.
    pub fn new(workers: usize) -> io::Result<Self> {
        let pool = crate::cores::start()?;
        Ok(Placement {
            cores: pool.place(workers),
        })
    }

    /// The cache budget of each worker's core thread, in worker order: the budgets the
    /// connection's shards draw from.
    pub fn cache_budgets(&self) -> Vec<CacheBudget> {
        self.cores
            .iter()
            .map(|c| c.cache_budget().clone())
            .collect()
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        for core in self.cores.drain(..) {
            core.unplace();
        }
    }
}

/// The workers of one connection, placed on the core threads; taken off them by
/// [`Workers::stop`] (or when dropped).
pub struct Workers {
    loops: Vec<Arc<WorkerLoop>>,
    /// Each worker's core thread and its key there.
    placed: Vec<(Arc<Core>, u64)>,
}

impl Workers {
    /// Adds one worker per shard of `backend` to the core threads of `placement` (worker `t`
    /// to its `t`-th), worker `t` serving the queues of `vrings` whose index is `t` modulo the
    /// number of shards. A worker that panics ends the connection by shutting `frontend` down.
    pub fn start(
        mut placement: Placement,
        backend: &Arc<BlkBackend>,
        vrings: &[Vring],
        frontend: Option<Arc<UnixStream>>,
    ) -> io::Result<Self> {
        let threads = backend.threads();
        if placement.cores.len() != threads {
            return Err(io::Error::other(format!(
                "{threads} workers and {} core threads picked for them",
                placement.cores.len()
            )));
        }
        let loops = (0..threads)
            .map(|_| WorkerLoop::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        backend.register_completions(&loops)?;
        // Each is counted by `place` until it is added or given back below.
        let cores = std::mem::take(&mut placement.cores);
        let mut started = Workers {
            loops,
            placed: Vec::with_capacity(threads),
        };
        let mut cores = cores.into_iter();
        for thread in 0..threads {
            let Some(core) = cores.next() else { break };
            let own: Vec<Vring> = vrings
                .iter()
                .enumerate()
                .filter(|(q, _)| q % threads == thread)
                .map(|(_, v)| v.clone())
                .collect();
            let placed = Placed {
                event_loop: Arc::clone(&started.loops[thread]),
                backend: Arc::clone(backend),
                vrings: own,
                thread,
                frontend: frontend.clone(),
            };
            match core.add(Box::new(placed)) {
                Ok(key) => started.placed.push((core, key)),
                Err(e) => {
                    // Counted by `place`: uncounted here (and the rest of `cores` below);
                    // dropping `started` takes the workers already placed off their cores.
                    core.unplace();
                    for rest in cores {
                        rest.unplace();
                    }
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    /// Each worker's event set, in worker order.
    pub fn loops(&self) -> &[Arc<WorkerLoop>] {
        &self.loops
    }

    /// Takes every worker off its core thread and returns once none runs any more (a worker
    /// in the middle of its events finishes them first).
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let answers: Vec<_> = self
            .placed
            .drain(..)
            .map(|(core, key)| core.remove(key))
            .collect();
        for answer in answers {
            // An error means the core thread has ended: nothing runs there either.
            let _ = answer.recv();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_all();
    }
}
