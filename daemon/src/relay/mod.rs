//! The vhost-user relay: every frontend connection's messages, and the running of each
//! connection's request handler. One thread, `qcow2d-relay`, does it for every connection of
//! the process; a connection has no thread of its own but its workers.
//!
//! The export accepts the frontend's connection and gives the relay its socket, one end of a
//! private socket pair and the connection's [`Device`] (`crate::handler`), which owns the
//! other end. The relay frames the frontend's messages, checks their descriptors, writes each
//! message whole into the private socket and runs the device's handler there and then, which
//! reads it and writes its reply; the relay passes the reply on. Nothing in that blocks (see
//! `crate::handler`); what must wait (GET_VRING_BASE, while the queue's worker completes the
//! queue's requests in flight) is held back by the relay, which serves the other connections
//! meanwhile and goes on once the device's wake-up eventfd fires ([`Device::must_wait`]).
//!
//! [`start_thread`] starts the relay thread once, when `qcow2d serve` starts up (a process
//! that never called it, such as a unit test, gets it at its first [`Relay::start`]).
//! [`Relay::start`] hands a connection's two sockets, made non-blocking, to that thread and
//! wakes it through an eventfd; [`Relay::stop`] (or dropping the [`Relay`]) takes the
//! connection away again and waits until the thread has dropped it, both sockets closed. The
//! thread waits on one epoll set holding the sockets of every connection, and per connection:
//! - in each direction it assembles one message at a time across partial reads (the 12-byte
//!   header, then the body it announces, never reading past the message, so the file
//!   descriptors that come with a message's first bytes stay with that message);
//! - in each direction at most one message is on its way out; while it is, the socket it came
//!   from is not read (the socket leaves the epoll set, or waits for EPOLLOUT only), and the
//!   frontend's socket is read only when nothing is on its way out either way (so everything
//!   it sent before was passed on, and answered, before its end is seen). A frontend that
//!   sends half a message and stops, never reads its replies or floods makes only its own
//!   connection wait, with at most [`MAX_BUFFERED_BYTES`] held for it, and a connection moves
//!   at most [`MESSAGES_PER_TURN`] messages before the others get their turn.
//!
//! Frontend → device: answers GET_INFLIGHT_FD (a new area: [`crate::inflight::create_area`])
//! and SET_INFLIGHT_FD (maps the area and publishes it to the workers through the
//! connection's [`InflightShared`]) itself, with a REPLY_ACK answer when the frontend asks for
//! one, and forwards every other message unchanged. Once SET_VRING_KICK is forwarded it writes
//! to the kick eventfd, so that a queue is processed (and what a previous daemon left in flight
//! is resumed) even if the guest never kicks again. It keeps a copy of the socket that
//! SET_BACKEND_REQ_FD shares ([`BackendChannel`]), to tell the frontend of a resize.
//! Device → frontend: every reply is forwarded unchanged. Only the relay thread writes to the
//! frontend's socket, one whole message after the other, so a reply is never interleaved with
//! another.
//!
//! Before a message with file descriptors reaches the handler (which maps and uses them as
//! they are), the relay checks them ([`crate::fdcheck`]): each memory region of SET_MEM_TABLE
//! and ADD_MEM_REG must lie inside its file (`mmap_offset + memory_size` at most the file's
//! size) and on whole pages of it (the offset a multiple of the file's page size, and the
//! size too for huge pages: `fdcheck::off_whole_pages`), and the file must be sealed against shrinking where it can be (a memfd not sealed yet
//! is sealed here; a file that cannot be sealed, such as a memfd made without sealing, as
//! libblkio makes them, or a hugetlbfs file, is accepted with a warning, and guarded by
//! `crate::sigbus` once mapped, or refused there when it cannot be); the descriptor of
//! SET_VRING_KICK, SET_VRING_CALL and SET_VRING_ERR must be an eventfd, and is made
//! non-blocking. A message that fails these checks is not forwarded: the connection ends with
//! a log line (and an error answer when the frontend asked for one), and the export goes on
//! serving other connections.
//!
//! A message that cannot be framed (a truncated header or body, a size above vhost-user's
//! 4 KiB limit, too many file descriptors) ends the connection with a log line; the content of
//! relayed messages is left to the handler to judge (a message it refuses ends the
//! connection, as do its errors). An error (or a panic) ends only its own connection. When
//! either side closes, both sockets are shut down, so the export sees the connection end; they
//! are closed (and the device dropped) when the thread tearing the connection down stops its
//! relay.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::inflight::{create_area, InflightArea, InflightShared};
use crate::sandbox::{seccomp, Role};

mod channel;
mod checks;
mod frame;

pub use channel::BackendChannel;

use checks::{check_fds, kick};
use frame::{FrameError, Message, Outgoing, Reader, Received, HEADER_BYTES};

/// Bytes of the in-flight description (`VhostUserInflight`: u64, u64, u16, u16, padded to 8).
const INFLIGHT_BYTES: usize = 24;
/// SET_VRING_KICK payload: queue index bits, and the "no file descriptor" bit.
const VRING_INDEX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;

const GET_INFLIGHT_FD: u32 = FrontendReq::GET_INFLIGHT_FD as u32;
const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
const SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
const SET_VRING_ERR: u32 = FrontendReq::SET_VRING_ERR as u32;
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
/// Bytes of one memory region description (guest address, size, user address, mmap offset).
const REGION_BYTES: usize = 32;

/// The most bytes of messages the relay holds for one connection: in each direction one
/// message being read and one being written.
pub const MAX_BUFFERED_BYTES: usize = 4 * (HEADER_BYTES + MAX_MSG_SIZE);
/// Messages one connection may move per turn of the relay thread before the other
/// connections' events are handled.
pub const MESSAGES_PER_TURN: usize = 16;
/// The relay thread's epoll token of its wake-up eventfd; a connection has the tokens
/// `3 × id` (the frontend's socket), `3 × id + 1` (the device's end of the private socket)
/// and `3 × id + 2` (its device's wake-up eventfd, [`Device::wake_fd`]).
const WAKE: u64 = u64::MAX;
/// Tokens per connection.
const TOKENS: u64 = 3;

/// The device behind a connection, run by the relay thread itself (`crate::handler`): each
/// message is written whole (with its descriptors) into the private socket, then
/// [`Device::handle`] reads it from the other end and writes its reply there, which the relay
/// passes on. Nothing it does may block (see `crate::handler`); what must wait is started by
/// [`Device::must_wait`] and ends with its wake-up eventfd readable, while the relay holds the
/// message back and serves every other connection.
pub trait Device: Send {
    /// An eventfd that becomes readable when what [`Device::must_wait`] started is done.
    fn wake_fd(&self) -> std::os::fd::RawFd;
    /// Whether the message (`request`, `body`) must wait before it is handled; if so, what it
    /// waits for has been started.
    fn must_wait(&mut self, request: u32, body: &[u8]) -> bool;
    /// Reads the wake-up eventfd; true if it was readable (what the held message waited for
    /// is done).
    fn ready(&mut self) -> bool;
    /// Handles the message just written into the private socket, writing its reply (if any)
    /// there. An error ends the connection.
    fn handle(&mut self) -> Result<(), vhost::vhost_user::Error>;
}
/// Events taken from the epoll set per wait.
const EVENTS: usize = 64;

/// What the relay thread is asked to do, in order.
enum Command {
    /// Relay for a new connection.
    Add(Box<Conn>),
    /// Drop a connection (closing its sockets), unless it ended already.
    Remove(u64),
}

struct Queue {
    commands: Vec<Command>,
    /// The relay thread has ended: nothing is queued any more.
    ended: bool,
}

/// What the relay thread shares with the connections' threads.
struct Shared {
    epoll: Epoll,
    wake: EventFd,
    queue: Mutex<Queue>,
}

/// The relay thread, once started.
static THREAD: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

/// Starts the relay thread (`qcow2d-relay`) unless it runs already. `qcow2d serve` calls it
/// at start-up, from the main thread, so that no thread that may not start threads has to.
pub fn start_thread() -> io::Result<()> {
    relay_thread().map(drop)
}

fn relay_thread() -> io::Result<Arc<Shared>> {
    let mut slot = THREAD.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = slot.as_ref() {
        return Ok(Arc::clone(shared));
    }
    let (epoll, wake) = crate::cores::epoll_with_wake(WAKE)?;
    let shared = Arc::new(Shared {
        epoll,
        wake,
        queue: Mutex::new(Queue {
            commands: Vec::new(),
            ended: false,
        }),
    });
    let theirs = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("qcow2d-relay".into())
        .spawn(move || theirs.run())?;
    *slot = Some(Arc::clone(&shared));
    Ok(shared)
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `command` and wakes the relay thread; hands it back if the thread has ended.
    fn send(&self, command: Command) -> Result<(), Command> {
        let mut queue = self.queue();
        if queue.ended {
            return Err(command);
        }
        queue.commands.push(command);
        drop(queue);
        // An eventfd whose counter is full is readable already: no wake-up is lost.
        let _ = self.wake.write(1);
        Ok(())
    }

    /// The relay thread's loop.
    fn run(self: Arc<Self>) {
        seccomp::enter_or_abort(Role::Relay);
        let mut conns: HashMap<u64, Conn> = HashMap::new();
        // However this loop ends, connections handed in later are refused, and those queued
        // or relayed are dropped (closing their sockets), so no `Relay::stop` waits forever.
        let _ended = EndedOnDrop(&self);
        let mut events = vec![EpollEvent::default(); EVENTS];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Only a broken epoll descriptor gets here: no connection could be relayed
                    // any more, which must not pass unnoticed.
                    error!("The relay thread cannot wait for messages any more: {e}");
                    std::process::abort();
                }
            };
            for event in &events[..n] {
                match event.data() {
                    WAKE => {
                        let _ = self.wake.read();
                        self.commands(&mut conns);
                    }
                    token => self.turn(&mut conns, token / TOKENS),
                }
            }
        }
    }

    /// Handles the queued commands.
    fn commands(&self, conns: &mut HashMap<u64, Conn>) {
        let commands = std::mem::take(&mut self.queue().commands);
        for command in commands {
            match command {
                Command::Add(conn) => {
                    let mut conn = *conn;
                    match conn.watch(&self.epoll) {
                        Ok(()) => {
                            conns.insert(conn.id, conn);
                        }
                        Err(e) => {
                            End::Watch(e).log(&conn.name);
                            conn.end(&self.epoll);
                            conns.insert(conn.id, conn);
                        }
                    }
                }
                Command::Remove(id) => {
                    if let Some(conn) = conns.remove(&id) {
                        debug!(connection = conn.name, "Relay stopped");
                        conn.unwatch(&self.epoll);
                    }
                }
            }
        }
    }

    /// Moves connection `id`'s messages as far as its sockets allow; a connection that ends
    /// (or whose relaying panics) is shut down, and only it.
    fn turn(&self, conns: &mut HashMap<u64, Conn>, id: u64) {
        let Some(conn) = conns.get_mut(&id) else {
            return;
        };
        if conn.ended {
            // Ended earlier in this batch of events.
            return;
        }
        let turned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            conn.turn()?;
            conn.watch(&self.epoll).map_err(End::Watch)
        }));
        let end = match turned {
            Ok(Ok(())) => return,
            Ok(Err(end)) => end,
            Err(_) => End::Panicked,
        };
        end.log(&conn.name);
        conn.end(&self.epoll);
    }
}

/// Marks the relay thread ended when its loop ends, and drops what was queued for it.
struct EndedOnDrop<'a>(&'a Shared);

impl Drop for EndedOnDrop<'_> {
    fn drop(&mut self) {
        let commands = {
            let mut queue = self.0.queue();
            queue.ended = true;
            std::mem::take(&mut queue.commands)
        };
        error!("The relay thread ended: its connections are closed");
        drop(commands);
    }
}

/// Set once the relay thread has dropped a connection (its sockets closed).
#[derive(Default)]
struct Gone {
    gone: Mutex<bool>,
    cv: Condvar,
}

/// Tells the connection's [`Relay`] that the connection was dropped, as it is dropped itself.
struct GoneOnDrop(Arc<Gone>);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        *self.0.gone.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.cv.notify_all();
    }
}

/// One connection relayed by the relay thread; stopped (and dropped, with both sockets
/// closed) by [`Relay::stop`] or when dropped.
pub struct Relay {
    id: u64,
    shared: Arc<Shared>,
    gone: Arc<Gone>,
    peak: Arc<AtomicUsize>,
}

impl Relay {
    /// Relays between `frontend` (the accepted frontend connection) and `backend` (one end of
    /// the private socket pair whose other end `device` reads, or a peer served elsewhere when
    /// `device` is `None`), running `device`'s handler, on the relay thread (started now unless it runs already, [`start_thread`]). `name` names the
    /// connection in log lines.
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        device: Option<Box<dyn Device>>,
        inflight: Arc<InflightShared>,
        channel: Arc<BackendChannel>,
        name: &str,
    ) -> io::Result<Relay> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        frontend.set_nonblocking(true)?;
        backend.set_nonblocking(true)?;
        let shared = relay_thread()?;
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let gone = Arc::new(Gone::default());
        let peak = Arc::new(AtomicUsize::new(0));
        let conn = Conn {
            id,
            ended: false,
            name: name.to_owned(),
            frontend,
            backend,
            device,
            inflight,
            channel,
            inbound: Reader::new(),
            outbound: Reader::new(),
            to_backend: None,
            to_frontend: None,
            held: None,
            frontend_events: EventSet::empty(),
            backend_events: EventSet::empty(),
            wake_events: EventSet::empty(),
            peak: Arc::clone(&peak),
            _gone: GoneOnDrop(Arc::clone(&gone)),
        };
        // Refused: the connection is dropped with the command, its sockets closed.
        shared
            .send(Command::Add(Box::new(conn)))
            .map_err(|_| io::Error::other("the relay thread has ended"))?;
        Ok(Relay {
            id,
            shared,
            gone,
            peak,
        })
    }

    /// Ends the connection (unless it ended already): waits until the relay thread has dropped
    /// it, both sockets shut down and closed.
    pub fn stop(self) {
        drop(self);
    }

    /// The most bytes of messages the relay thread has held for this connection at once
    /// (never above [`MAX_BUFFERED_BYTES`]).
    pub fn peak_buffered_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Refused only once the relay thread has ended, which dropped every connection.
        let _ = self.shared.send(Command::Remove(self.id));
        let mut gone = self
            .gone
            .gone
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !*gone {
            gone = self
                .gone
                .cv
                .wait(gone)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Why a connection ended.
enum End {
    FrontendClosed,
    BackendClosed,
    FrontendFrame(FrameError),
    BackendFrame(FrameError),
    /// A message the fd checks refused (logged as it was refused).
    Refused,
    ToBackend(io::Error),
    ToFrontend(io::Error),
    /// The device's handler refused a message (or could not answer it).
    Device(vhost::vhost_user::Error),
    Watch(io::Error),
    Panicked,
}

impl End {
    fn log(&self, connection: &str) {
        match self {
            End::FrontendClosed => debug!(connection, "The frontend closed the connection"),
            End::BackendClosed => debug!(connection, "The device closed the connection"),
            End::FrontendFrame(e) => warn!(
                connection,
                "Closing the connection: cannot read the frontend's message: {e}"
            ),
            End::BackendFrame(e) => warn!(
                connection,
                "Closing the connection: cannot read the device's reply: {e}"
            ),
            End::Refused => {}
            // The other side is gone (or going): the connection is over.
            End::ToBackend(e) => debug!(connection, "Relay to the device ended: {e}"),
            End::ToFrontend(e) => debug!(connection, "Cannot pass a reply to the frontend: {e}"),
            End::Device(
                e @ (vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage
                | vhost::vhost_user::Error::SocketBroken(_)),
            ) => debug!(connection, "The device's end of the connection closed: {e}"),
            End::Device(e) => warn!(connection, "Connection ended with an error: {e}"),
            End::Watch(e) => error!(
                connection,
                "Closing the connection: the relay cannot watch its sockets: {e}"
            ),
            End::Panicked => error!(
                connection,
                "Closing the connection: relaying its messages panicked"
            ),
        }
    }
}

/// One connection's relaying state, owned by the relay thread. When the connection ends, both
/// sockets are shut down (the peers see it end) and leave the epoll set; they are closed when
/// [`Relay::stop`] drops the connection (closing a socket whose peer sent what was not read
/// would make the peer's reads fail with ECONNRESET rather than see the end). Dropping it
/// shuts both sockets down, closes them (and the descriptors of messages still held), then
/// tells its [`Relay`].
struct Conn {
    id: u64,
    /// Shut down: nothing is relayed any more.
    ended: bool,
    name: String,
    frontend: UnixStream,
    backend: UnixStream,
    /// The device the relay runs the handler of (`None`: the backend socket's peer is served
    /// elsewhere, as in the relay's own tests).
    device: Option<Box<dyn Device>>,
    inflight: Arc<InflightShared>,
    channel: Arc<BackendChannel>,
    /// Frontend → backend, being read.
    inbound: Reader,
    /// Backend → frontend, being read.
    outbound: Reader,
    to_backend: Option<Outgoing>,
    to_frontend: Option<Outgoing>,
    /// A message the device asked to hold back ([`Device::must_wait`]) until its wake-up
    /// eventfd fires; while there is one, the frontend's socket is not read.
    held: Option<Outgoing>,
    /// What each socket (and the device's wake-up eventfd) waits for in the epoll set
    /// (empty: it is not in the set).
    frontend_events: EventSet,
    backend_events: EventSet,
    wake_events: EventSet,
    peak: Arc<AtomicUsize>,
    /// Last: dropped once the sockets are closed.
    _gone: GoneOnDrop,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Shut down, not only closed: the listener watches another descriptor of the
        // frontend's socket for this hang-up to tear the connection down. Fails only if it is
        // shut down already (or no longer connected), which is as good.
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
    }
}

impl Conn {
    /// Shuts both sockets down, takes them out of the epoll set and lets go of the messages
    /// held (closing their descriptors).
    fn end(&mut self, epoll: &Epoll) {
        self.ended = true;
        // Shut down, not only closed later: the listener watches another descriptor of the
        // frontend's socket for this hang-up to tear the connection down. Fails only if it is
        // shut down already (or no longer connected), which is as good.
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
        self.unwatch(epoll);
        self.frontend_events = EventSet::empty();
        self.backend_events = EventSet::empty();
        self.wake_events = EventSet::empty();
        self.inbound = Reader::new();
        self.outbound = Reader::new();
        self.to_backend = None;
        self.to_frontend = None;
        self.held = None;
    }

    fn held_bytes(&self) -> usize {
        self.inbound.held_bytes()
            + self.outbound.held_bytes()
            + self.to_backend.as_ref().map_or(0, Outgoing::len)
            + self.to_frontend.as_ref().map_or(0, Outgoing::len)
            + self.held.as_ref().map_or(0, Outgoing::len)
    }

    /// Sends what is on its way out and reads what may be read now, until nothing moves or
    /// [`MESSAGES_PER_TURN`] messages were read.
    fn turn(&mut self) -> Result<(), End> {
        let mut moved = 0;
        // Read whatever woke the device's eventfd, held message or not, so that it does not
        // fire again.
        let woke = self.device.as_mut().is_some_and(|d| d.ready());
        if woke {
            if let Some(out) = self.held.take() {
                self.to_backend = Some(out);
            }
        }
        loop {
            let before = moved;
            if let Some(out) = &mut self.to_frontend {
                if out.send(&self.frontend).map_err(End::ToFrontend)? {
                    self.to_frontend = None;
                }
            }
            if let Some(out) = &mut self.to_backend {
                if out.send(&self.backend).map_err(End::ToBackend)? {
                    if out.kick {
                        kick(&out.msg);
                    }
                    self.to_backend = None;
                    // The whole message, descriptors included, is in the private socket, and
                    // the socket held nothing else (its previous reply was read before this
                    // message was): the handler reads it without waiting and writes at most
                    // one reply of at most 4 KiB into an empty socket buffer.
                    if let Some(device) = &mut self.device {
                        device.handle().map_err(End::Device)?;
                    }
                }
            }
            if moved >= MESSAGES_PER_TURN {
                break;
            }
            if self.to_backend.is_none() && self.to_frontend.is_none() && self.held.is_none() {
                match self
                    .inbound
                    .read(&self.frontend)
                    .map_err(End::FrontendFrame)?
                {
                    Received::Message(msg) => {
                        moved += 1;
                        tracing::trace!(
                            connection = self.name,
                            request = msg.request(),
                            flags = msg.flags(),
                            len = msg.body.len(),
                            fds = msg.fds.len(),
                            "From the frontend"
                        );
                        self.inbound_message(msg)?;
                    }
                    Received::WouldBlock => {}
                    Received::Closed => return Err(End::FrontendClosed),
                }
            }
            if self.to_frontend.is_none() {
                match self
                    .outbound
                    .read(&self.backend)
                    .map_err(End::BackendFrame)?
                {
                    Received::Message(msg) => {
                        moved += 1;
                        tracing::trace!(
                            connection = self.name,
                            request = msg.request(),
                            len = msg.body.len(),
                            "Reply"
                        );
                        self.to_frontend = Some(Outgoing::new(msg));
                    }
                    Received::WouldBlock => {}
                    Received::Closed => return Err(End::BackendClosed),
                }
            }
            self.peak.fetch_max(self.held_bytes(), Ordering::Relaxed);
            if moved == before {
                break;
            }
        }
        Ok(())
    }

    /// Puts each socket in the epoll set for what the connection waits for now: the frontend's
    /// for reading when nothing is on its way out, and for writing while a reply is on its way
    /// to it; the private socket for reading unless a reply is on its way to the frontend,
    /// and for writing while a message is on its way to it. A socket waiting for nothing
    /// leaves the set (its peer hanging up would otherwise wake the thread again and again).
    fn watch(&mut self, epoll: &Epoll) -> io::Result<()> {
        let mut frontend = EventSet::empty();
        if self.to_backend.is_none() && self.to_frontend.is_none() && self.held.is_none() {
            frontend |= EventSet::IN;
        }
        if self.to_frontend.is_some() {
            frontend |= EventSet::OUT;
        }
        let mut backend = EventSet::empty();
        if self.to_frontend.is_none() {
            backend |= EventSet::IN;
        }
        if self.to_backend.is_some() {
            backend |= EventSet::OUT;
        }
        let token = TOKENS * self.id;
        interest(
            epoll,
            self.frontend.as_raw_fd(),
            &mut self.frontend_events,
            frontend,
            token,
        )?;
        interest(
            epoll,
            self.backend.as_raw_fd(),
            &mut self.backend_events,
            backend,
            token + 1,
        )?;
        if let Some(device) = &self.device {
            interest(
                epoll,
                device.wake_fd(),
                &mut self.wake_events,
                EventSet::IN,
                token + 2,
            )?;
        }
        Ok(())
    }

    /// Takes both sockets out of the epoll set.
    fn unwatch(&self, epoll: &Epoll) {
        let wake = self.device.as_ref().map(|d| d.wake_fd());
        for (fd, events) in [
            (Some(self.frontend.as_raw_fd()), self.frontend_events),
            (Some(self.backend.as_raw_fd()), self.backend_events),
            (wake, self.wake_events),
        ] {
            if let (Some(fd), false) = (fd, events.is_empty()) {
                // Cannot fail for a descriptor in the set; closing it takes it out anyway.
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }

    /// A whole message from the frontend, when nothing is on its way out either way.
    fn inbound_message(&mut self, mut msg: Message) -> Result<(), End> {
        if let Err(why) = check_fds(&msg) {
            error!(
                connection = self.name,
                request = msg.request(),
                "Closing the connection: the frontend's message is refused: {why}"
            );
            if msg.need_reply() {
                // Nothing else is on its way to the frontend; the connection ends now, so the
                // answer gets what room the socket has.
                let status = 1u64.to_ne_bytes().to_vec();
                let _ = Outgoing::new(msg.reply(status, Vec::new())).send(&self.frontend);
            }
            return Err(End::Refused);
        }
        match msg.request() {
            GET_INFLIGHT_FD => {
                let reply = self.get_inflight_fd(&msg);
                self.to_frontend = Some(Outgoing::new(reply));
            }
            SET_INFLIGHT_FD => {
                let ok = self.set_inflight_fd(&mut msg);
                if msg.need_reply() {
                    let status = u64::from(!ok).to_ne_bytes().to_vec();
                    self.to_frontend = Some(Outgoing::new(msg.reply(status, Vec::new())));
                }
            }
            SET_BACKEND_REQ_FD => {
                match msg.fds.first().map(|fd| fd.try_clone()) {
                    Some(Ok(fd)) => self.channel.set(fd),
                    Some(Err(e)) => warn!(
                        connection = self.name,
                        "Cannot keep the backend request channel: {e}"
                    ),
                    None => debug!(
                        connection = self.name,
                        "SET_BACKEND_REQ_FD without a file descriptor"
                    ),
                }
                self.forward(Outgoing::new(msg));
            }
            SET_VRING_KICK => {
                let mut out = Outgoing::new(msg);
                out.kick = true;
                self.forward(out);
            }
            _ => self.forward(Outgoing::new(msg)),
        }
        Ok(())
    }

    /// Sends `out` on to the device, or holds it back while the device starts what it must
    /// wait for ([`Device::must_wait`]).
    fn forward(&mut self, out: Outgoing) {
        let wait = match &mut self.device {
            Some(device) => device.must_wait(out.msg.request(), &out.msg.body),
            None => false,
        };
        if wait {
            self.held = Some(out);
        } else {
            self.to_backend = Some(out);
        }
    }

    /// GET_INFLIGHT_FD: a new zeroed area sized for the frontend's queues. On failure the
    /// reply has size 0 and no file descriptor, which QEMU takes as "no in-flight tracking".
    fn get_inflight_fd(&self, msg: &Message) -> Message {
        let geometry = (msg.body.len() == INFLIGHT_BYTES)
            .then(|| msg.u16_at(16).zip(msg.u16_at(18)))
            .flatten();
        let created = match geometry {
            Some((num_queues, queue_size)) => create_area(num_queues, queue_size)
                .map(|(file, size)| (file, size, num_queues, queue_size))
                .map_err(|e| e.to_string()),
            None => Err(format!("malformed request of {} bytes", msg.body.len())),
        };
        let mut body = vec![0u8; INFLIGHT_BYTES];
        match created {
            Ok((file, size, num_queues, queue_size)) => {
                debug!(num_queues, queue_size, size, "New in-flight area");
                body[0..8].copy_from_slice(&size.to_ne_bytes());
                body[16..18].copy_from_slice(&num_queues.to_ne_bytes());
                body[18..20].copy_from_slice(&queue_size.to_ne_bytes());
                msg.reply(body, vec![OwnedFd::from(file)])
            }
            Err(e) => {
                error!("Cannot give the frontend an in-flight area: {e}");
                msg.reply(body, Vec::new())
            }
        }
    }

    /// SET_INFLIGHT_FD: maps the frontend's area and hands it to the workers. Returns whether
    /// it worked; when it did not, requests are not tracked on this connection.
    fn set_inflight_fd(&self, msg: &mut Message) -> bool {
        let fields = (msg.body.len() == INFLIGHT_BYTES)
            .then(|| {
                Some((
                    msg.u64_at(0)?,
                    msg.u64_at(8)?,
                    msg.u16_at(16)?,
                    msg.u16_at(18)?,
                ))
            })
            .flatten();
        let Some((size, offset, num_queues, queue_size)) = fields else {
            error!(
                len = msg.body.len(),
                "Malformed SET_INFLIGHT_FD: requests in flight are not tracked"
            );
            return false;
        };
        let fds = std::mem::take(&mut msg.fds);
        let count = fds.len();
        let Ok([fd]) = <[OwnedFd; 1]>::try_from(fds) else {
            error!(
                fds = count,
                "SET_INFLIGHT_FD without exactly one file descriptor: requests in flight are \
                 not tracked"
            );
            return false;
        };
        match InflightArea::map(File::from(fd), offset, size, num_queues, queue_size) {
            Ok(area) => {
                info!(
                    num_queues,
                    queue_size, "The frontend shared its in-flight area"
                );
                self.inflight.set(area);
                true
            }
            Err(e) => {
                error!(
                    "Cannot use the frontend's in-flight area ({e}): requests in flight are not \
                     tracked"
                );
                false
            }
        }
    }
}

/// Changes what `sock` waits for in the epoll set from `current` to `wanted` (empty: out of
/// the set).
fn interest(
    epoll: &Epoll,
    fd: std::os::fd::RawFd,
    current: &mut EventSet,
    wanted: EventSet,
    token: u64,
) -> io::Result<()> {
    if *current == wanted {
        return Ok(());
    }
    let operation = if current.is_empty() {
        ControlOperation::Add
    } else if wanted.is_empty() {
        ControlOperation::Delete
    } else {
        ControlOperation::Modify
    };
    epoll.ctl(operation, fd, EpollEvent::new(wanted, token))?;
    *current = wanted;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, RawFd};
    use std::time::{Duration, Instant};

    use vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::frame::{FLAG_NEED_REPLY, FLAG_REPLY, VERSION_1};
    use crate::fdcheck;

    use super::*;

    /// GET_FEATURES: forwarded as it is, whatever its body.
    const PLAIN: u32 = 1;

    /// How long a test waits for the relay before it fails (never reached when it works).
    const PATIENCE: Duration = Duration::from_secs(60);

    fn message_bytes(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
        bytes.extend_from_slice(&request.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: valid flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd failed");
        // SAFETY: `fd` was just created and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn memfd() -> OwnedFd {
        // SAFETY: a C string literal and valid flags; the result is checked before use.
        let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` was just created and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Sends all of `bytes`, `fds` with the first byte (on a blocking socket).
    fn send(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut sent = 0;
        while sent < bytes.len() {
            let attach: &[RawFd] = if sent == 0 { &raw } else { &[] };
            match sock.send_with_fds(&[&bytes[sent..]], attach) {
                Ok(n) => sent += n,
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
        Ok(())
    }

    /// The next message on a blocking socket (with a read timeout so that a test fails
    /// rather than hangs); `None` when the peer closed it.
    fn receive(sock: &UnixStream) -> Option<Message> {
        sock.set_read_timeout(Some(PATIENCE)).unwrap();
        match Reader::new().read(sock).unwrap() {
            Received::Message(msg) => Some(msg),
            Received::Closed => None,
            Received::WouldBlock => panic!("nothing came from the relay"),
        }
    }

    fn bytes_of(msg: &Message) -> Vec<u8> {
        let mut bytes = msg.header.to_vec();
        bytes.extend_from_slice(&msg.body);
        bytes
    }

    /// A relay between two socket pairs: (frontend side, backend side, relay).
    fn connected() -> (UnixStream, UnixStream, Relay) {
        let (frontend, relay_frontend) = UnixStream::pair().unwrap();
        let (backend, relay_backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(
            relay_frontend,
            relay_backend,
            None,
            Arc::new(InflightShared::default()),
            Arc::new(BackendChannel::default()),
            "test",
        )
        .unwrap();
        (frontend, backend, relay)
    }

    /// Waits until `done` holds, failing the test if it never does.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < PATIENCE, "the relay never {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A message cut at any byte (inside the header, at its end, inside the body) is
    /// assembled whole once the rest comes, with the descriptors that came with its first
    /// part; until then the reader has nothing to give.
    #[test]
    fn a_message_split_at_every_byte_is_assembled_whole() {
        let body: Vec<u8> = (0..40).collect();
        let bytes = message_bytes(PLAIN, VERSION_1, &body);
        for split in 1..bytes.len() {
            let (peer, sock) = UnixStream::pair().unwrap();
            sock.set_nonblocking(true).unwrap();
            send(&peer, &bytes[..split], &[eventfd(), memfd()]).unwrap();
            let mut reader = Reader::new();
            assert!(
                matches!(reader.read(&sock).unwrap(), Received::WouldBlock),
                "split at {split}"
            );
            assert!(reader.held_bytes() > 0);
            send(&peer, &bytes[split..], &[]).unwrap();
            let Received::Message(msg) = reader.read(&sock).unwrap() else {
                panic!("no message after the split at {split}");
            };
            assert_eq!(bytes_of(&msg), bytes, "split at {split}");
            assert_eq!(msg.fds.len(), 2, "split at {split}");
            assert!(fdcheck::is_eventfd(msg.fds[0].as_fd()));
            assert!(!fdcheck::is_eventfd(msg.fds[1].as_fd()));
            assert_eq!(reader.held_bytes(), 0);
            assert!(matches!(reader.read(&sock).unwrap(), Received::WouldBlock));
            drop(peer);
            assert!(matches!(reader.read(&sock).unwrap(), Received::Closed));
        }
    }

    /// A message sent one byte at a time, its descriptor with the first byte, then a second
    /// message with a descriptor of its own: each message keeps its own descriptors.
    #[test]
    fn descriptors_stay_with_the_message_whose_first_byte_they_came_with() {
        let first = message_bytes(PLAIN, VERSION_1, &[7; 16]);
        let second = message_bytes(PLAIN + 1, VERSION_1, &[9; 8]);
        let (peer, sock) = UnixStream::pair().unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut reader = Reader::new();
        for (i, byte) in first.iter().enumerate() {
            let fds = if i == 0 { vec![eventfd()] } else { Vec::new() };
            send(&peer, std::slice::from_ref(byte), &fds).unwrap();
            if i + 1 < first.len() {
                assert!(matches!(reader.read(&sock).unwrap(), Received::WouldBlock));
            }
        }
        send(&peer, &second, &[memfd()]).unwrap();
        let Received::Message(one) = reader.read(&sock).unwrap() else {
            panic!("the first message is not whole");
        };
        let Received::Message(two) = reader.read(&sock).unwrap() else {
            panic!("the second message is not whole");
        };
        assert_eq!(bytes_of(&one), first);
        assert_eq!(bytes_of(&two), second);
        assert_eq!((one.fds.len(), two.fds.len()), (1, 1));
        assert!(fdcheck::is_eventfd(one.fds[0].as_fd()));
        assert!(!fdcheck::is_eventfd(two.fds[0].as_fd()));
    }

    /// What cannot be framed: a body over the limit, a message cut by the peer's end, more
    /// descriptors than a message may carry.
    #[test]
    fn messages_that_cannot_be_framed_are_errors() {
        let (peer, sock) = UnixStream::pair().unwrap();
        send(&peer, &message_bytes(PLAIN, VERSION_1, &[]), &[]).unwrap();
        let mut header = message_bytes(PLAIN, VERSION_1, &[]);
        header[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_ne_bytes());
        send(&peer, &header, &[]).unwrap();
        let mut reader = Reader::new();
        assert!(matches!(reader.read(&sock), Ok(Received::Message(_))));
        assert!(matches!(
            reader.read(&sock),
            Err(FrameError::TooLarge { request: PLAIN, .. })
        ));

        let (peer, sock) = UnixStream::pair().unwrap();
        send(&peer, &message_bytes(PLAIN, VERSION_1, &[1; 8])[..15], &[]).unwrap();
        drop(peer);
        assert!(matches!(
            Reader::new().read(&sock),
            Err(FrameError::Truncated)
        ));

        let (peer, sock) = UnixStream::pair().unwrap();
        let fds: Vec<OwnedFd> = (0..=MAX_ATTACHED_FD_ENTRIES).map(|_| eventfd()).collect();
        send(&peer, &message_bytes(PLAIN, VERSION_1, &[]), &fds).unwrap();
        assert!(matches!(
            Reader::new().read(&sock),
            Err(FrameError::TooManyFds)
        ));
    }

    /// Through the relay thread: a message cut at every byte reaches the backend whole, with
    /// its descriptor, after the relay has read (and held) the first part.
    #[test]
    fn the_relay_passes_a_message_cut_at_every_byte() {
        let body: Vec<u8> = (0..24).collect();
        let bytes = message_bytes(PLAIN, VERSION_1, &body);
        for split in 1..bytes.len() {
            let (frontend, backend, relay) = connected();
            send(&frontend, &bytes[..split], &[eventfd()]).unwrap();
            wait_for("read the first part", || relay.peak_buffered_bytes() > 0);
            send(&frontend, &bytes[split..], &[]).unwrap();
            let msg = receive(&backend).expect("the message reached the backend");
            assert_eq!(bytes_of(&msg), bytes, "split at {split}");
            assert_eq!(msg.fds.len(), 1, "split at {split}");
            assert!(fdcheck::is_eventfd(msg.fds[0].as_fd()));
            // Replies come back the same way.
            let reply = message_bytes(PLAIN, VERSION_1 | FLAG_REPLY, &[5; 8]);
            send(&backend, &reply, &[]).unwrap();
            assert_eq!(bytes_of(&receive(&frontend).unwrap()), reply);
            relay.stop();
            // Stopping closed both sockets.
            assert!(receive(&frontend).is_none());
            assert!(receive(&backend).is_none());
        }
    }

    /// GET_INFLIGHT_FD and SET_INFLIGHT_FD are answered by the relay, not passed on; a
    /// refused descriptor ends the connection with an error answer, and both sides see the
    /// end.
    #[test]
    fn the_relay_answers_the_inflight_messages_and_ends_on_a_refused_descriptor() {
        let (frontend, backend, relay) = connected();
        let mut ask = vec![0u8; INFLIGHT_BYTES];
        ask[16..18].copy_from_slice(&1u16.to_ne_bytes());
        ask[18..20].copy_from_slice(&128u16.to_ne_bytes());
        send(
            &frontend,
            &message_bytes(GET_INFLIGHT_FD, VERSION_1, &ask),
            &[],
        )
        .unwrap();
        let answer = receive(&frontend).unwrap();
        assert_eq!(answer.request(), GET_INFLIGHT_FD);
        assert_eq!(answer.flags(), VERSION_1 | FLAG_REPLY);
        assert_eq!(answer.body.len(), INFLIGHT_BYTES);
        assert_eq!(answer.fds.len(), 1);
        let size = answer.u64_at(0).unwrap();
        let mut set = answer.body.clone();
        set[0..8].copy_from_slice(&size.to_ne_bytes());
        let area = answer.fds.into_iter().next().unwrap();
        send(
            &frontend,
            &message_bytes(SET_INFLIGHT_FD, VERSION_1 | FLAG_NEED_REPLY, &set),
            &[area],
        )
        .unwrap();
        let ack = receive(&frontend).unwrap();
        assert_eq!(ack.request(), SET_INFLIGHT_FD);
        assert_eq!(ack.u64_at(0), Some(0), "the area was taken");

        // A kick descriptor that is no eventfd.
        let kick = message_bytes(SET_VRING_KICK, VERSION_1 | FLAG_NEED_REPLY, &[0; 8]);
        send(&frontend, &kick, &[memfd()]).unwrap();
        let refused = receive(&frontend).unwrap();
        assert_eq!(refused.request(), SET_VRING_KICK);
        assert_eq!(refused.u64_at(0), Some(1));
        assert!(receive(&frontend).is_none(), "the frontend sees the end");
        assert!(
            receive(&backend).is_none(),
            "the backend got nothing, and sees the end"
        );
        relay.stop();
    }

    /// When the frontend leaves, the backend sees the connection end (and the other way).
    #[test]
    fn either_side_leaving_ends_both() {
        let (frontend, backend, relay) = connected();
        let msg = message_bytes(PLAIN, VERSION_1, &[1; 8]);
        send(&frontend, &msg, &[]).unwrap();
        drop(frontend);
        assert_eq!(bytes_of(&receive(&backend).unwrap()), msg);
        assert!(receive(&backend).is_none());
        relay.stop();

        let (frontend, backend, relay) = connected();
        drop(backend);
        assert!(receive(&frontend).is_none());
        relay.stop();
    }

    /// A message that cannot be framed, followed by bytes the relay never reads: both peers
    /// see the connection end (EOF, not a reset) until the relay is stopped.
    #[test]
    fn a_connection_ended_with_unread_bytes_ends_cleanly_for_both_peers() {
        let (frontend, backend, relay) = connected();
        let mut bad = message_bytes(PLAIN, VERSION_1, &[]);
        bad[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_ne_bytes());
        bad.extend_from_slice(&[0xee; 512]);
        send(&frontend, &bad, &[]).unwrap();
        assert!(receive(&frontend).is_none());
        assert!(receive(&backend).is_none());
        relay.stop();
    }

    /// Sends `msg` on `sock` (blocking) until it fails, `limit` times at most; returns how
    /// many went.
    fn flood(sock: UnixStream, msg: Vec<u8>, limit: usize) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut sent = 0;
            while sent < limit && send(&sock, &msg, &[]).is_ok() {
                sent += 1;
            }
            sent
        })
    }

    /// A frontend that floods requests and never reads the replies (its backend answering
    /// every one with 4 KiB) stalls only its own connection: another connection is relayed
    /// meanwhile, the flooder is held back by its socket rather than buffered for, and the
    /// relay holds at most [`MAX_BUFFERED_BYTES`] for it.
    #[test]
    fn a_frontend_that_never_reads_replies_blocks_only_itself() {
        let (stuck, stuck_backend, stuck_relay) = connected();
        let echo = std::thread::spawn(move || {
            let reply = message_bytes(PLAIN, VERSION_1 | FLAG_REPLY, &[3; MAX_MSG_SIZE]);
            let mut reader = Reader::new();
            while let Ok(Received::Message(_)) = reader.read(&stuck_backend) {
                if send(&stuck_backend, &reply, &[]).is_err() {
                    break;
                }
            }
        });
        // 80 MiB of replies if they were all relayed.
        const REQUESTS: usize = 20_000;
        let flooder = flood(
            stuck.try_clone().unwrap(),
            message_bytes(PLAIN, VERSION_1 | FLAG_NEED_REPLY, &[1; 64]),
            REQUESTS,
        );

        // Another connection, served while the first one is stuck.
        let (frontend, backend, relay) = connected();
        for i in 0..200u32 {
            let msg = message_bytes(PLAIN, VERSION_1, &i.to_ne_bytes());
            send(&frontend, &msg, &[]).unwrap();
            assert_eq!(bytes_of(&receive(&backend).unwrap()), msg);
            let reply = message_bytes(PLAIN, VERSION_1 | FLAG_REPLY, &i.to_ne_bytes());
            send(&backend, &reply, &[]).unwrap();
            assert_eq!(bytes_of(&receive(&frontend).unwrap()), reply);
        }
        relay.stop();
        // The flooder's relay keeps one message buffered at most; on a busy machine it may
        // not have got that far yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stuck_relay.peak_buffered_bytes() < HEADER_BYTES + MAX_MSG_SIZE
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        assert!(
            !flooder.is_finished(),
            "the flooder was held back by its socket"
        );
        assert!(stuck_relay.peak_buffered_bytes() <= MAX_BUFFERED_BYTES);
        assert!(stuck_relay.peak_buffered_bytes() >= HEADER_BYTES + MAX_MSG_SIZE);
        stuck_relay.stop();
        // Its sockets closed, the flooder's and the echo's writes fail.
        assert!(flooder.join().unwrap() < REQUESTS);
        echo.join().unwrap();
    }

    /// A frontend that floods messages while the backend side reads none: the relay stops
    /// reading once one message waits to go out, so the flood stays in the flooder's socket.
    #[test]
    fn a_flood_is_held_back_with_bounded_memory() {
        let (frontend, backend, relay) = connected();
        const MESSAGES: usize = 50_000;
        let msg = message_bytes(PLAIN, VERSION_1, &[6; MAX_MSG_SIZE]);
        // Without a bound the relay would take all 200 MiB; the socket blocks much earlier.
        frontend
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let flooder = flood(frontend.try_clone().unwrap(), msg.clone(), MESSAGES);
        let sent = flooder.join().unwrap();
        assert!(sent < MESSAGES, "the relay took every message");
        let peak = relay.peak_buffered_bytes();
        assert!(
            (HEADER_BYTES + MAX_MSG_SIZE..=MAX_BUFFERED_BYTES).contains(&peak),
            "held {peak} bytes"
        );
        // What was taken reaches the backend whole and in order once it reads.
        backend.set_nonblocking(true).unwrap();
        let mut reader = Reader::new();
        let mut passed = 0;
        loop {
            match reader.read(&backend).unwrap() {
                Received::Message(m) => {
                    assert_eq!(bytes_of(&m), msg);
                    passed += 1;
                }
                Received::WouldBlock if passed >= sent => break,
                Received::WouldBlock => std::thread::yield_now(),
                Received::Closed => panic!("the relay closed the connection"),
            }
        }
        assert_eq!(passed, sent);
        relay.stop();
    }

    /// A device over the far end of a private socket pair, as `crate::handler`'s: it answers
    /// every message with an 8-byte reply; GET_VRING_BASE must wait until the test writes
    /// its wake-up eventfd (a queue whose drain is slow).
    struct SlowDevice {
        sock: UnixStream,
        wake: Arc<EventFd>,
        reader: Reader,
        waits: Arc<AtomicUsize>,
    }

    const GET_VRING_BASE: u32 = FrontendReq::GET_VRING_BASE as u32;

    impl Device for SlowDevice {
        fn wake_fd(&self) -> std::os::fd::RawFd {
            self.wake.as_raw_fd()
        }

        fn must_wait(&mut self, request: u32, _body: &[u8]) -> bool {
            let wait = request == GET_VRING_BASE;
            if wait {
                self.waits.fetch_add(1, Ordering::SeqCst);
            }
            wait
        }

        fn ready(&mut self) -> bool {
            self.wake.read().is_ok()
        }

        fn handle(&mut self) -> Result<(), vhost::vhost_user::Error> {
            // The message is whole in the socket: a non-blocking read gets all of it.
            match self.reader.read(&self.sock) {
                Ok(Received::Message(msg)) => {
                    let reply = msg.reply(msg.body.clone(), Vec::new());
                    assert!(
                        Outgoing::new(reply).send(&self.sock).unwrap(),
                        "reply sent whole"
                    );
                    Ok(())
                }
                _ => Err(vhost::vhost_user::Error::PartialMessage),
            }
        }
    }

    /// A connection whose device runs on the relay thread; returns the frontend's end, the
    /// device's wake-up eventfd, how many messages it held back, and the relay.
    fn with_slow_device() -> (UnixStream, Arc<EventFd>, Arc<AtomicUsize>, Relay) {
        let (frontend, relay_frontend) = UnixStream::pair().unwrap();
        let (relay_end, device_end) = UnixStream::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        let wake = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let waits = Arc::new(AtomicUsize::new(0));
        let device = SlowDevice {
            sock: device_end,
            wake: Arc::clone(&wake),
            reader: Reader::new(),
            waits: Arc::clone(&waits),
        };
        let relay = Relay::start(
            relay_frontend,
            relay_end,
            Some(Box::new(device)),
            Arc::new(InflightShared::default()),
            Arc::new(BackendChannel::default()),
            "slow",
        )
        .unwrap();
        (frontend, wake, waits, relay)
    }

    /// One connection's GET_VRING_BASE waits for its queue to stop (a slow drain, here
    /// forever until the test says so): the relay thread holds that message back and goes on
    /// serving another connection's messages, each handled and answered; once the drain is
    /// done, the held message is handled and answered, and the connection goes on.
    #[test]
    fn a_queue_stopping_slowly_does_not_stall_other_connections() {
        let (stuck, stuck_wake, stuck_waits, stuck_relay) = with_slow_device();
        let mut ask = vec![0u8; 8];
        ask[0..4].copy_from_slice(&1u32.to_ne_bytes());
        let get_base = message_bytes(GET_VRING_BASE, VERSION_1, &ask);
        send(&stuck, &get_base, &[]).unwrap();
        // A message sent after it waits behind it.
        let after = message_bytes(PLAIN, VERSION_1, &[2; 8]);
        send(&stuck, &after, &[]).unwrap();
        wait_for("held the message back", || {
            stuck_waits.load(Ordering::SeqCst) == 1
        });

        let (other, _other_wake, other_waits, other_relay) = with_slow_device();
        for i in 0..100u64 {
            let msg = message_bytes(PLAIN, VERSION_1, &i.to_ne_bytes());
            send(&other, &msg, &[]).unwrap();
            let reply = receive(&other).expect("the other connection is answered");
            assert_eq!(reply.flags(), VERSION_1 | FLAG_REPLY);
            assert_eq!(reply.u64_at(0), Some(i));
        }
        assert_eq!(other_waits.load(Ordering::SeqCst), 0);
        other_relay.stop();

        // Nothing came back on the stuck connection meanwhile.
        stuck.set_nonblocking(true).unwrap();
        let mut peek = [0u8; 1];
        assert!(
            matches!(
                std::io::Read::read(&mut &stuck, &mut peek),
                Err(ref e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            "GET_VRING_BASE was answered before its queue stopped"
        );
        stuck.set_nonblocking(false).unwrap();
        // The drain is done: the held message is answered, then the one behind it.
        stuck_wake.write(1).unwrap();
        let answer = receive(&stuck).expect("GET_VRING_BASE answered");
        assert_eq!(answer.request(), GET_VRING_BASE);
        assert_eq!(answer.body, ask);
        let next = receive(&stuck).expect("the next message answered");
        assert_eq!(next.request(), PLAIN);
        stuck_relay.stop();
    }
}
