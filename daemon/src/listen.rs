//! The listener thread: one epoll set holding the listening socket of every export that waits
//! for a client, and an end watch for every connection being served, so neither an idle
//! export nor a connection costs a thread of its own.
//!
//! [`Listeners`] is made by the main thread at start-up; its thread (`qcow2d-listen`, the
//! `export` seccomp role, so that the threads it starts inherit what a connection needs)
//! waits on the epoll set. An export waiting for a client sits in the idle map with its
//! socket in the set (the map's key is the epoll token). When its socket is readable the
//! listener takes the export out of the map and out of the set, accepts the frontend
//! (sockets are non-blocking: a connection the peer closed meanwhile is no reason to wait)
//! and starts serving it right there ([`Export::connect`]: the shards, the workers,
//! the hand-over to the relay thread; nothing in it waits for the frontend). The
//! export then sits in the served map, and a second descriptor of the frontend's socket in
//! the set, watched for hang-up only: the socket hangs up when the frontend closes it or the
//! relay shuts it down (either side went away, a protocol error, a stop). Then a short-lived
//! thread (`qcow2d-exportN`) tears the connection down ([`Export::disconnect`]: takes
//! its workers off the core threads, drains and flushes the shards, which may take as long as
//! the disk does) and puts the export back (`put_back`), or closes it when it was
//! asked to stop. One export serves one frontend at a time, as before: while it is connected
//! its socket is out of the set and a second frontend waits in the socket's backlog.
//!
//! Stopping an idle export: [`ExportControl::request_stop`](crate::export::ExportControl)
//! marks it stopping and wakes the listener (an eventfd in the set), which takes every
//! stopping export out of the map and closes each on a thread of its own (a writable image's
//! close writes and syncs, and a slow disk must not hold up the other exports' accepts). The
//! stopping mark and the map are checked in an order that leaves no gap: a connection's
//! thread checks the mark under the map's lock before it puts its export back, and the
//! listener scans the map under the same lock after the mark was set.
//!
//! Whatever ends an export (stopped, or failed: accept, the connection's set-up, a panic)
//! reports it once through the `finished` callback, after the export's socket file is gone
//! (the listener is dropped first), so a new export on the same path is never unlinked by
//! the old one. An accept that fails because the process has no file descriptor left
//! (EMFILE, ENFILE) does not end the export: that is the whole process's state, which a
//! frontend of another export may have brought about and which passes when it leaves; nor
//! does a connection's set-up that fails for that reason (the connection is closed). A
//! connection that cannot be accepted keeps the socket readable, so the listener gives up a
//! descriptor it holds in reserve, accepts the connection, closes it at once (the frontend
//! sees it end), says so, and takes a new reserve (see `Shared::shed`).
//!
//! Test hook, in debug builds only: `QCOW2D_TEST_ONLY_FAIL_SETUP`, read once when the
//! listener is made, names listening sockets (separated by `:`) whose next connection's
//! set-up fails, once each, with an error that says so; the export then fails as it would
//! on any other set-up error. The integration tests use it to make an export fail while
//! serving (see `Shared::injected_setup_failure`).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::export::{Connection, Export, ExportError};
use crate::sandbox::{seccomp, Role};

/// The epoll token of the wake-up eventfd (export ids count up from 0).
const WAKE: u64 = u64::MAX;

/// Set in the epoll token of a served connection's end watch (the rest is the export's id).
const CONNECTED: u64 = 1 << 62;

/// Events taken from the epoll set per wait.
const EVENTS: usize = 64;

/// The test hook's environment variable (debug builds only, see the module's documentation).
#[cfg(debug_assertions)]
const FAIL_SETUP: &str = "QCOW2D_TEST_ONLY_FAIL_SETUP";

/// Called once when an export has ended, with its id and its result.
pub type Finished = Box<dyn Fn(u64, Result<(), ExportError>) + Send + Sync>;

/// Wakes the listener thread so that it looks for exports asked to stop.
#[derive(Clone)]
pub struct Waker(Arc<EventFd>);

impl Waker {
    /// Wakes the listener. Cannot fail in a way that loses the wake-up: an eventfd whose
    /// counter is full is readable already.
    pub fn wake(&self) {
        let _ = self.0.write(1);
    }
}

struct Shared {
    epoll: Epoll,
    wake: Arc<EventFd>,
    /// Exports waiting for a client, by id; each one's socket is in the epoll set.
    idle: Mutex<HashMap<u64, Export>>,
    /// Exports serving a client, by id, with their connection; each connection's end watch
    /// is in the epoll set. Only the listener thread touches it.
    served: Mutex<HashMap<u64, (Export, Connection)>>,
    finished: Finished,
    /// A descriptor held in reserve for when the process has none left (see `shed`); only
    /// the listener thread takes it.
    reserve: Mutex<Option<EventFd>>,
    /// The sockets whose next connection's set-up fails (the test hook, see the module's
    /// documentation); each is taken out when it has failed once.
    #[cfg(debug_assertions)]
    fail_setup: Mutex<Vec<String>>,
}

/// Every idle export's listening socket, and the thread that waits on them.
#[derive(Clone)]
pub struct Listeners(Arc<Shared>);

impl Listeners {
    /// The epoll set and its wake-up eventfd; `finished` hears of every export that ends.
    /// The thread starts with [`Listeners::spawn`].
    pub fn new(finished: Finished) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        Ok(Listeners(Arc::new(Shared {
            epoll,
            wake,
            idle: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            finished,
            reserve: Mutex::new(Some(EventFd::new(EFD_NONBLOCK)?)),
            #[cfg(debug_assertions)]
            fail_setup: Mutex::new(
                std::env::var(FAIL_SETUP)
                    .map(|v| {
                        v.split(':')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
        })))
    }

    /// Starts the listener thread.
    pub fn spawn(&self) -> std::io::Result<()> {
        let shared = Arc::clone(&self.0);
        std::thread::Builder::new()
            .name("qcow2d-listen".into())
            .spawn(move || shared.run())
            .map(drop)
    }

    /// What an export's control uses to wake the listener.
    pub fn waker(&self) -> Waker {
        Waker(Arc::clone(&self.0.wake))
    }

    /// Starts waiting for clients of `export` (its socket must be non-blocking). On failure
    /// the export is handed back with the error.
    pub fn add(&self, export: Export) -> Result<(), (Box<Export>, std::io::Error)> {
        let mut idle = self.0.idle();
        self.0.insert(&mut idle, export)
    }
}

impl Shared {
    fn idle(&self) -> MutexGuard<'_, HashMap<u64, Export>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `export` in the map and its socket in the epoll set.
    fn insert(
        &self,
        idle: &mut HashMap<u64, Export>,
        export: Export,
    ) -> Result<(), (Box<Export>, std::io::Error)> {
        let event = EpollEvent::new(EventSet::IN, export.id);
        match self
            .epoll
            .ctl(ControlOperation::Add, export.listener.as_raw_fd(), event)
        {
            Ok(()) => {
                idle.insert(export.id, export);
                Ok(())
            }
            Err(e) => Err((Box::new(export), e)),
        }
    }

    /// Takes export `id` out of the map and its socket out of the epoll set.
    fn take(&self, idle: &mut HashMap<u64, Export>, id: u64) -> Option<Export> {
        let export = idle.remove(&id)?;
        // Cannot fail for a descriptor in the set; and a socket left in it would only wake
        // the listener for a token it no longer knows, which it ignores.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            export.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(export)
    }

    /// The listener thread's loop.
    fn run(self: Arc<Self>) {
        seccomp::enter_or_abort(Role::Export);
        let mut events = vec![EpollEvent::default(); EVENTS];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only a broken epoll descriptor gets here: no export could take a
                    // client any more, which must not pass unnoticed.
                    error!("The listener cannot wait for connections any more: {e}");
                    std::process::abort();
                }
            };
            for event in &events[..n] {
                match event.data() {
                    WAKE => {
                        let _ = self.wake.read();
                        self.retire_stopping();
                    }
                    token if token & CONNECTED != 0 => self.connection_ended(token & !CONNECTED),
                    id => self.ready(id),
                }
            }
        }
    }

    /// Export `id`'s socket is readable: accept its frontend and start the connection's
    /// thread.
    fn ready(self: &Arc<Self>, id: u64) {
        let Some(export) = self.take(&mut self.idle(), id) else {
            return;
        };
        if export.control.is_stopping() {
            self.retire(export, Ok(()));
            return;
        }
        match export.listener.accept() {
            Ok(Some(frontend)) => self.start_connection(export, frontend),
            // Nothing to accept after all (the peer gave up): wait again.
            Ok(None) => {
                if let Some((export, result)) = self.put_back(export) {
                    self.retire(export, result);
                }
            }
            Err(vhost::vhost_user::Error::SocketError(e)) if out_of_descriptors(&e) => {
                self.shed(&export, &e);
                if let Some((export, result)) = self.put_back(export) {
                    self.retire(export, result);
                }
            }
            Err(e) => self.retire(export, Err(ExportError::Accept(e.to_string()))),
        }
    }

    /// The process has no file descriptor left, so the frontend waiting in `export`'s backlog
    /// cannot be accepted, and the socket stays readable: the listener gives up its reserve
    /// descriptor, accepts the frontend and closes it at once (it sees the connection end),
    /// then takes a new reserve. The export goes on; frontends that connect once descriptors
    /// are free again are served. Without a reserve (it could not be taken again), the
    /// listener waits 10 ms instead, so that it does not spin on the readable socket.
    fn shed(&self, export: &Export, e: &std::io::Error) {
        warn!(
            socket = listening_path(&export.listener),
            "Cannot accept a connection: {e}: the process has no file descriptor left, the \
             connection is closed and the export goes on"
        );
        let mut reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        if reserve.take().is_some() {
            // The reserve is closed: one descriptor for the connection, closed at once.
            if let Ok(Some(frontend)) = export.listener.accept() {
                drop(frontend);
            }
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
        *reserve = EventFd::new(EFD_NONBLOCK).ok();
    }

    /// Starts serving `frontend` on `export` (on this thread: the set-up does not wait for
    /// the frontend) and watches for the connection's end.
    fn start_connection(self: &Arc<Self>, mut export: Export, frontend: UnixStream) {
        let id = export.id;
        let connected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match self.injected_setup_failure(&export) {
                Some(e) => Err(e),
                None => export.connect(frontend),
            }
        }));
        match connected {
            Ok(Ok(Some(connection))) => {
                let fd = connection.ended_fd();
                let mut served = self.served();
                served.insert(id, (export, connection));
                let watch = EpollEvent::new(EventSet::HANG_UP | EventSet::ERROR, id | CONNECTED);
                if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, watch) {
                    // Cannot happen for a valid descriptor short of memory; without the watch
                    // the connection's end would go unseen, so it ends now.
                    error!(id, "Cannot watch a connection for its end: {e}");
                    if let Some((export, connection)) = served.remove(&id) {
                        drop(served);
                        connection.shut_down();
                        self.tear_down(export, connection);
                    }
                }
            }
            Ok(Ok(None)) => {
                if let Some((export, result)) = self.put_back(export) {
                    self.retire(export, result);
                }
            }
            // As for an accept: a connection that could not be set up for want of file
            // descriptors ends (the frontend sees it end), not the export.
            Ok(Err(e)) if chain_out_of_descriptors(&e) => {
                warn!(
                    socket = listening_path(&export.listener),
                    "Cannot set up a connection: {}: the process has no file descriptor \
                     left, the connection is closed and the export goes on",
                    crate::error_chain_text(&e)
                );
                if let Some((export, result)) = self.put_back(export) {
                    self.retire(export, result);
                }
            }
            Ok(Err(e)) => self.retire(export, Err(e)),
            Err(_) => {
                // As a panicking connection always did: the image is not closed (the
                // supervisor releases it), the socket goes with the export.
                drop(export);
                (self.finished)(id, Err(ExportError::Panicked));
            }
        }
    }

    /// The test hook (debug builds only, see the module's documentation): an error for the
    /// set-up of a connection to `export` if its socket is named in `QCOW2D_TEST_ONLY_FAIL_SETUP`
    /// and has not failed yet. It takes the place of the set-up's own result, so the export
    /// fails as it does on a real set-up error.
    #[cfg(debug_assertions)]
    fn injected_setup_failure(&self, export: &Export) -> Option<ExportError> {
        let path = listening_path(&export.listener);
        let mut sockets = self
            .fail_setup
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at = sockets.iter().position(|s| *s == path)?;
        sockets.swap_remove(at);
        Some(ExportError::Relay(std::io::Error::other(format!(
            "set-up failure injected by {FAIL_SETUP} (a test hook of debug builds)"
        ))))
    }

    /// Release builds have no test hook.
    #[cfg(not(debug_assertions))]
    fn injected_setup_failure(&self, _export: &Export) -> Option<ExportError> {
        None
    }

    fn served(&self) -> MutexGuard<'_, HashMap<u64, (Export, Connection)>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Export `id`'s connection has ended: tear it down.
    fn connection_ended(self: &Arc<Self>, id: u64) {
        let Some((export, connection)) = self.served().remove(&id) else {
            return;
        };
        // Cannot fail for a descriptor in the set; a watch left in it would only wake the
        // listener for a token it no longer knows, which it ignores.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            connection.ended_fd(),
            EpollEvent::default(),
        );
        self.tear_down(export, connection);
    }

    /// Tears `connection` down on a thread of its own (or here, if no thread can be started):
    /// it takes the connection's workers off the core threads and flushes the shards, which may take as
    /// long as the disk does. Then the export waits for its next client, or ends.
    fn tear_down(self: &Arc<Self>, export: Export, connection: Connection) {
        let shared = Arc::clone(self);
        let id = export.id;
        let slot = Arc::new(Mutex::new(Some((export, connection))));
        let theirs = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name(format!("qcow2d-export{id}"))
            .spawn(move || {
                seccomp::inherit(Role::Export);
                let taken = theirs.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some((export, connection)) = taken {
                    shared.disconnect(export, connection);
                }
            });
        if spawned.is_err() {
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some((export, connection)) = taken {
                self.disconnect(export, connection);
            }
        }
    }

    /// Tears a connection down, then puts the export back or ends it.
    fn disconnect(&self, mut export: Export, connection: Connection) {
        let id = export.id;
        let torn_down = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            export.disconnect(connection)
        }));
        match torn_down {
            Ok(()) => {
                if let Some((export, result)) = self.put_back(export) {
                    self.end(export, result);
                }
            }
            Err(_) => {
                drop(export);
                (self.finished)(id, Err(ExportError::Panicked));
            }
        }
    }

    /// Makes `export` wait for its next client, unless it was asked to stop, or its socket
    /// cannot be watched again: then it is handed back, with its result, to be ended.
    fn put_back(&self, export: Export) -> Option<(Export, Result<(), ExportError>)> {
        let mut idle = self.idle();
        if export.control.is_stopping() {
            return Some((export, Ok(())));
        }
        match self.insert(&mut idle, export) {
            Ok(()) => None,
            Err((export, e)) => Some((*export, Err(ExportError::Listen(e)))),
        }
    }

    /// Takes every export asked to stop out of the map and ends each on a thread of its own.
    fn retire_stopping(self: &Arc<Self>) {
        let stopping: Vec<Export> = {
            let mut idle = self.idle();
            let ids: Vec<u64> = idle
                .values()
                .filter(|e| e.control.is_stopping())
                .map(|e| e.id)
                .collect();
            ids.into_iter()
                .filter_map(|id| self.take(&mut idle, id))
                .collect()
        };
        for export in stopping {
            self.retire(export, Ok(()));
        }
    }

    /// Ends `export` with `result` on a thread of its own (or here, if no thread can be
    /// started): its image is closed, which may write and sync.
    fn retire(self: &Arc<Self>, export: Export, result: Result<(), ExportError>) {
        let shared = Arc::clone(self);
        let id = export.id;
        let slot = Arc::new(Mutex::new(Some((export, result))));
        let theirs = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name(format!("qcow2d-export{id}"))
            .spawn(move || {
                seccomp::inherit(Role::Export);
                let taken = theirs.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some((export, result)) = taken {
                    shared.end(export, result);
                }
            });
        if spawned.is_err() {
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some((export, result)) = taken {
                self.end(export, result);
            }
        }
    }

    /// Closes `export`'s image and reports the export's end: `result` first, else the
    /// close's. The socket file goes (with the listener) before the report.
    fn end(&self, mut export: Export, result: Result<(), ExportError>) {
        let id = export.id;
        let closed = export.close();
        drop(export);
        (self.finished)(id, result.and(closed));
    }
}

/// Whether an accept failed because the process (or the system) has no file descriptor left.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether an error, or one of its sources, is an I/O error for want of file descriptors.
fn chain_out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(out_of_descriptors)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The path `listener` listens on, for log lines (empty if it cannot be read).
fn listening_path(listener: &vhost::vhost_user::Listener) -> String {
    // SAFETY: the descriptor stays open for as long as `listener` lives, which outlives this
    // borrowed copy; ManuallyDrop keeps the copy from closing it.
    let borrowed =
        std::mem::ManuallyDrop::new(unsafe { UnixListener::from_raw_fd(listener.as_raw_fd()) });
    borrowed
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;

    /// A connection's set-up that fails for want of descriptors, wherever in the set-up
    /// (the backend's eventfds, the workers' epoll sets, the relay's sockets), is
    /// known as such, so that it closes that connection and not the export; any other
    /// failure is not.
    #[test]
    fn set_up_failures_for_want_of_descriptors_are_recognised() {
        let emfile = || std::io::Error::from_raw_os_error(libc::EMFILE);
        let enfile = || std::io::Error::from_raw_os_error(libc::ENFILE);
        for e in [
            ExportError::Workers(emfile()),
            ExportError::Workers(enfile()),
            ExportError::Relay(emfile()),
            ExportError::Backend(BackendError::Stopped(emfile())),
        ] {
            assert!(chain_out_of_descriptors(&e), "{e:?}");
        }
        for e in [
            ExportError::Workers(std::io::Error::from_raw_os_error(libc::ENOMEM)),
            ExportError::Relay(std::io::Error::other("set-up failure")),
            ExportError::Queues(virtio_queue::Error::InvalidSize),
            ExportError::Panicked,
        ] {
            assert!(!chain_out_of_descriptors(&e), "{e:?}");
        }
    }
}
