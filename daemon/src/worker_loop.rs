//! The worker threads of one connection: one per engine shard, each running its own epoll
//! loop ([`WorkerLoop`]) over the kick eventfds of the queues it owns (queue `q` belongs to
//! worker `q % shards`, as its local queue `q / shards`), its shard's completion eventfd, its
//! throttle timer, an exit eventfd and a control eventfd, and calling
//! [`BlkBackend::handle_event`] for each.
//!
//! Made by the listener thread as a connection is set up ([`WorkerThreads::start`]); the
//! frontend handler on the relay thread adds and removes kick eventfds
//! ([`WorkerLoop::register_listener`]) and asks a worker to stop one of its queues
//! ([`WorkerLoop::request_stop`]: the worker stops taking chains from it, waits for its
//! requests in flight and then writes the connection's "stopped" eventfd, which the relay
//! watches before it answers GET_VRING_BASE); the thread that tears the connection down
//! stops and joins them ([`WorkerThreads::stop`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BlkBackend;
use crate::sandbox::{seccomp, Role};
use crate::vring::Vring;

/// The epoll data of the exit eventfd.
const EXIT: u64 = u64::MAX;
/// The epoll data of the control eventfd (queues to stop).
const CONTROL: u64 = u64::MAX - 1;
/// Events taken per wait.
const EVENTS: usize = 64;

/// The event loop of one worker thread (see the module documentation).
pub struct WorkerLoop {
    epoll: Epoll,
    exit: EventFd,
    control: EventFd,
    /// Local queues the frontend handler asked to stop, one bit each.
    stopping: AtomicU64,
}

impl WorkerLoop {
    /// A loop watching only its exit and control eventfds (see [`WorkerThreads::start`]).
    pub(crate) fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let control = EventFd::new(EFD_NONBLOCK)?;
        for (fd, data) in [(exit.as_raw_fd(), EXIT), (control.as_raw_fd(), CONTROL)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )?;
        }
        Ok(WorkerLoop {
            epoll,
            exit,
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
    /// Never waits: the worker does the waiting on its own thread.
    pub fn request_stop(&self, local: usize) {
        if local < 64 {
            self.stopping.fetch_or(1 << local, Ordering::SeqCst);
        }
        // A full counter is readable already: no request is lost.
        let _ = self.control.write(1);
    }

    fn run(&self, backend: &BlkBackend, vrings: &[Vring], thread: usize) {
        seccomp::enter_or_abort(Role::Worker);
        let mut events = vec![EpollEvent::default(); EVENTS];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only a broken epoll descriptor gets here.
                    error!(thread, "A worker cannot wait for events any more: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    EXIT => return,
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

/// The worker threads of one connection, stopped and joined by [`WorkerThreads::stop`] (or
/// when dropped).
pub struct WorkerThreads {
    loops: Vec<Arc<WorkerLoop>>,
    handles: Vec<JoinHandle<()>>,
}

impl WorkerThreads {
    /// Starts one worker per shard of `backend`, worker `t` serving the queues of `vrings`
    /// whose index is `t` modulo the number of shards. `name` names the threads.
    pub fn start(backend: &Arc<BlkBackend>, vrings: &[Vring], name: &str) -> io::Result<Self> {
        let threads = backend.threads();
        let loops = (0..threads)
            .map(|_| WorkerLoop::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        backend.register_completions(&loops)?;
        let mut started = WorkerThreads {
            loops,
            handles: Vec::with_capacity(threads),
        };
        for thread in 0..threads {
            let own: Vec<Vring> = vrings
                .iter()
                .enumerate()
                .filter(|(q, _)| q % threads == thread)
                .map(|(_, v)| v.clone())
                .collect();
            let event_loop = Arc::clone(&started.loops[thread]);
            let backend = Arc::clone(backend);
            // Dropping `started` on failure stops the threads already running.
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{thread}"))
                .spawn(move || event_loop.run(&backend, &own, thread))?;
            started.handles.push(handle);
        }
        Ok(started)
    }

    /// Each worker's event loop, in worker order.
    pub fn loops(&self) -> &[Arc<WorkerLoop>] {
        &self.loops
    }

    /// Stops every worker and waits until it has ended (between two events: a worker in the
    /// middle of draining a queue finishes that first).
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for event_loop in &self.loops {
            let _ = event_loop.exit.write(1);
        }
        for handle in self.handles.drain(..) {
            if handle.join().is_err() {
                error!("A worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        self.stop_all();
    }
}
