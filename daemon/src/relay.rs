//! The vhost-user relay: sits between the frontend (QEMU) and vhost-user-backend's request
//! handler, answers the two in-flight-area messages itself and passes everything else through.
//!
//! vhost-user-backend 0.24 answers GET_INFLIGHT_FD and SET_INFLIGHT_FD with an error and takes
//! no other handler, so the export accepts the frontend's connection itself and gives
//! vhost-user-backend's daemon the other end of a private connection ([`private_connection`],
//! through a socket in the daemon's private directory, [`make_private_dir`]).
//! [`Relay`] then runs two threads per connection:
//! - frontend → backend: reads each message (header, body and attached file descriptors),
//!   answers GET_INFLIGHT_FD (a new area: [`crate::inflight::create_area`]) and
//!   SET_INFLIGHT_FD (maps the area and publishes it to the workers through the connection's
//!   [`InflightShared`]) itself, with a REPLY_ACK answer when the frontend asks for one, and
//!   forwards every other message unchanged. After forwarding SET_VRING_KICK it writes to the
//!   kick eventfd, so that a queue is processed (and what a previous daemon left in flight is
//!   resumed) even if the guest never kicks again. It keeps a copy of the socket that
//!   SET_BACKEND_REQ_FD shares ([`BackendChannel`]), to tell the frontend of a resize;
//! - backend → frontend: forwards every reply unchanged.
//!
//! Before a message with file descriptors reaches vhost-user-backend (which maps and uses them
//! as they are), the relay checks them ([`crate::fdcheck`]): each memory region of SET_MEM_TABLE
//! and ADD_MEM_REG must lie inside its file (`mmap_offset + memory_size` at most the file's
//! size) and the file must be sealed against shrinking where it can be (a memfd not sealed yet
//! is sealed here; a file that cannot be sealed, such as a memfd made without sealing, as
//! libblkio makes them, or a hugetlbfs file, is accepted with a warning); the descriptor of
//! SET_VRING_KICK, SET_VRING_CALL and SET_VRING_ERR must be an eventfd, and is made
//! non-blocking. A message that fails these checks is not forwarded: the connection ends with
//! a log line (and an error answer when the frontend asked for one), and the export goes on
//! serving other connections.
//!
//! Writes to the frontend's socket are serialised by a mutex, so a reply is never interleaved
//! with another. A message that cannot be framed (a truncated header or body, a size above
//! vhost-user's 4 KiB limit, too many file descriptors) ends the connection with a log line;
//! the content of relayed messages is left to vhost-user-backend to judge. When either side
//! closes, both sockets are shut down, so both threads end and the export sees the connection
//! end.

use std::fs::File;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::fdcheck::{self, Sealing};
use crate::inflight::{create_area, InflightArea, InflightShared};

/// Bytes of a vhost-user message header: request, flags, size (native-endian u32 each).
const HEADER_BYTES: usize = 12;
/// Header flags: protocol version 1, and the reply bit.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Bytes of the in-flight description (`VhostUserInflight`: u64, u64, u16, u16, padded to 8).
const INFLIGHT_BYTES: usize = 24;
/// SET_VRING_KICK payload: queue index bits, and the "no file descriptor" bit.
const VRING_INDEX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;

const GET_INFLIGHT_FD: u32 = FrontendReq::GET_INFLIGHT_FD as u32;
const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
const SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
/// How long a config-change message may take to reach the frontend.
const CHANNEL_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The frontend's backend request channel (the socket SET_BACKEND_REQ_FD shares), kept by the
/// relay so the daemon can tell the frontend that the config space changed (an online resize).
/// vhost-user-backend gets the message too, unchanged; it never writes to the channel.
#[derive(Default)]
pub struct BackendChannel {
    sock: Mutex<Option<UnixStream>>,
}

impl BackendChannel {
    fn set(&self, fd: OwnedFd) {
        let sock = UnixStream::from(fd);
        if let Err(e) = sock.set_write_timeout(Some(CHANNEL_WRITE_TIMEOUT)) {
            warn!("Cannot bound writes to the backend request channel: {e}");
        }
        *self.sock.lock().unwrap_or_else(PoisonError::into_inner) = Some(sock);
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no reply asked for: QEMU then reads the
    /// config space again). `Ok(false)`: the frontend shared no channel.
    pub fn config_changed(&self) -> io::Result<bool> {
        let guard = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut sock) = guard.as_ref() else {
            return Ok(false);
        };
        let request: u32 = vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG.into();
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&request.to_ne_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_ne_bytes());
        sock.write_all(&header)?;
        Ok(true)
    }
}
const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
const SET_VRING_ERR: u32 = FrontendReq::SET_VRING_ERR as u32;
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
/// Bytes of one memory region description (guest address, size, user address, mmap offset).
const REGION_BYTES: usize = 32;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection in the middle of a message")]
    Truncated,
    #[error("message {request} has a {size}-byte body, above the {MAX_MSG_SIZE}-byte limit")]
    TooLarge { request: u32, size: u32 },
    #[error("more than {MAX_ATTACHED_FD_ENTRIES} file descriptors attached to a message")]
    TooManyFds,
}

/// One vhost-user message and the file descriptors that came with it.
struct Message {
    header: [u8; HEADER_BYTES],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn field(&self, i: usize) -> u32 {
        let b = &self.header[4 * i..4 * i + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    fn need_reply(&self) -> bool {
        self.flags() & FLAG_NEED_REPLY != 0
    }

    /// A reply to this message with `body` and `fds`.
    fn reply(&self, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&self.request().to_ne_bytes());
        header[4..8].copy_from_slice(&(VERSION_1 | FLAG_REPLY).to_ne_bytes());
        // Bodies we build are at most 24 bytes.
        header[8..12].copy_from_slice(&(body.len() as u32).to_ne_bytes());
        Message { header, body, fds }
    }

    fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.body.get(at..at + 8)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        let b = self.body.get(at..at + 2)?;
        Some(u16::from_ne_bytes(b.try_into().ok()?))
    }
}

/// Receives into `buf` (all of it, unless the peer closes first), taking any file descriptors
/// that come with the bytes. Returns the bytes received.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        // SAFETY: the iovec covers `rest`, a live, exclusively borrowed byte slice, which may
        // hold any bytes; `raw` is a local array the call fills with received descriptors.
        let received = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match received {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            // Too many descriptors: the library closed them all.
            Err(e) if e.errno() == libc::ENOBUFS => return Err(FrameError::TooManyFds),
            Err(e) => return Err(FrameError::Io(io::Error::from_raw_os_error(e.errno()))),
        };
        for &fd in &raw[..nfds.min(raw.len())] {
            // SAFETY: recvmsg just created this descriptor in our table for us; nothing else
            // owns it.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(FrameError::TooManyFds);
        }
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one message; `None` when the peer closed the connection between messages.
fn read_message(sock: &UnixStream) -> Result<Option<Message>, FrameError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_BYTES];
    match recv_exact(sock, &mut header, &mut fds)? {
        0 => return Ok(None),
        HEADER_BYTES => {}
        _ => return Err(FrameError::Truncated),
    }
    let mut msg = Message {
        header,
        body: Vec::new(),
        fds,
    };
    let size = msg.field(2);
    if size as usize > MAX_MSG_SIZE {
        return Err(FrameError::TooLarge {
            request: msg.request(),
            size,
        });
    }
    msg.body = vec![0u8; size as usize];
    if recv_exact(sock, &mut msg.body, &mut msg.fds)? != msg.body.len() {
        return Err(FrameError::Truncated);
    }
    Ok(Some(msg))
}

/// Sends `msg` whole, its descriptors with its first byte.
fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut bytes = Vec::with_capacity(HEADER_BYTES + msg.body.len());
    bytes.extend_from_slice(&msg.header);
    bytes.extend_from_slice(&msg.body);
    let mut sent = 0;
    while sent < bytes.len() {
        let attach: &[RawFd] = if sent == 0 { &fds } else { &[] };
        match sock.send_with_fds(&[&bytes[sent..]], attach) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
    Ok(())
}

/// The directory `qcow2d serve` makes at start-up for the private sockets
/// ([`make_private_dir`]); without one (unit tests), each connection makes its own.
static PRIVATE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Makes a new directory only the daemon's user can enter, under `parent`, for the private
/// sockets of every connection from now on, and returns it (to be removed at exit). Made
/// once at start-up, so that serving a connection creates no directory.
pub fn make_private_dir(parent: &Path) -> io::Result<PathBuf> {
    let dir = new_private_dir(parent)?;
    // A second call (tests) keeps the first directory.
    let _ = PRIVATE_DIR.set(dir.clone());
    Ok(dir)
}

fn new_private_dir(parent: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("qcow2d-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left over by a process that had our pid before: try the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A listener with one connection already waiting to be accepted, and that connection's other
/// end. The listening socket lives in a directory only this user can enter and is removed as
/// soon as the connection exists, so nobody else can connect to it.
pub fn private_connection() -> io::Result<(Listener, UnixStream)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (own_dir, path) = match PRIVATE_DIR.get() {
        Some(dir) => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            (None, dir.join(format!("c{n}")))
        }
        None => {
            let dir = new_private_dir(&std::env::temp_dir())?;
            let path = dir.join("s");
            (Some(dir), path)
        }
    };
    let connected = UnixListener::bind(&path)
        .and_then(|listener| UnixStream::connect(&path).map(|stream| (listener, stream)));
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = own_dir {
        let _ = std::fs::remove_dir(&dir);
    }
    let (listener, stream) = connected?;
    Ok((Listener::from(listener), stream))
}

/// The two relay threads of one connection.
pub struct Relay {
    frontend: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` (the accepted frontend connection) and `backend` (the end of
    /// the private connection whose other end vhost-user-backend's daemon accepted). `name`
    /// prefixes the thread names.
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        inflight: Arc<InflightShared>,
        channel: Arc<BackendChannel>,
        name: &str,
    ) -> io::Result<Relay> {
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let inbound = Inbound {
            frontend: frontend.try_clone()?,
            backend: backend.try_clone()?,
            to_frontend: Arc::clone(&to_frontend),
            inflight,
            channel,
        };
        let outbound = Outbound {
            backend: backend.try_clone()?,
            to_frontend,
        };
        let mut threads = Vec::with_capacity(2);
        threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-in"))
                .spawn(move || {
                    crate::sandbox::seccomp::enter_or_abort(crate::sandbox::Role::Relay);
                    inbound.run()
                })?,
        );
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-out"))
            .spawn(move || {
                crate::sandbox::seccomp::enter_or_abort(crate::sandbox::Role::Relay);
                outbound.run()
            });
        let relay = Relay {
            frontend,
            backend,
            threads,
        };
        match spawned {
            Ok(t) => {
                let mut relay = relay;
                relay.threads.push(t);
                Ok(relay)
            }
            Err(e) => {
                relay.stop();
                Err(e)
            }
        }
    }

    /// Closes both connections and waits for the threads.
    pub fn stop(mut self) {
        shut(&self.frontend);
        shut(&self.backend);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("A vhost-user relay thread panicked");
            }
        }
    }
}

fn shut(sock: &UnixStream) {
    // Fails only if it is shut down already (or no longer connected), which is as good.
    let _ = sock.shutdown(Shutdown::Both);
}

fn send_to_frontend(to_frontend: &Mutex<UnixStream>, msg: &Message) -> io::Result<()> {
    let sock = to_frontend.lock().unwrap_or_else(PoisonError::into_inner);
    write_message(&sock, msg)
}

/// Frontend → backend.
struct Inbound {
    frontend: UnixStream,
    backend: UnixStream,
    to_frontend: Arc<Mutex<UnixStream>>,
    inflight: Arc<InflightShared>,
    channel: Arc<BackendChannel>,
}

impl Inbound {
    fn run(self) {
        loop {
            let msg = match read_message(&self.frontend) {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    debug!("The frontend closed the connection");
                    break;
                }
                Err(e) => {
                    warn!("Closing the connection: cannot read the frontend's message: {e}");
                    break;
                }
            };
            let mut msg = msg;
            if let Err(why) = check_fds(&msg) {
                error!(
                    request = msg.request(),
                    "Closing the connection: the frontend's message is refused: {why}"
                );
                if msg.need_reply() {
                    let status = 1u64.to_ne_bytes().to_vec();
                    let _ = send_to_frontend(&self.to_frontend, &msg.reply(status, Vec::new()));
                }
                break;
            }
            let result = match msg.request() {
                GET_INFLIGHT_FD => {
                    let reply = self.get_inflight_fd(&msg);
                    send_to_frontend(&self.to_frontend, &reply)
                }
                SET_INFLIGHT_FD => {
                    let ok = self.set_inflight_fd(&mut msg);
                    if msg.need_reply() {
                        let status = u64::from(!ok).to_ne_bytes().to_vec();
                        send_to_frontend(&self.to_frontend, &msg.reply(status, Vec::new()))
                    } else {
                        Ok(())
                    }
                }
                SET_BACKEND_REQ_FD => {
                    match msg.fds.first().map(|fd| fd.try_clone()) {
                        Some(Ok(fd)) => self.channel.set(fd),
                        Some(Err(e)) => warn!("Cannot keep the backend request channel: {e}"),
                        None => debug!("SET_BACKEND_REQ_FD without a file descriptor"),
                    }
                    write_message(&self.backend, &msg)
                }
                SET_VRING_KICK => {
                    let sent = write_message(&self.backend, &msg);
                    if sent.is_ok() {
                        kick(&msg);
                    }
                    sent
                }
                _ => write_message(&self.backend, &msg),
            };
            if let Err(e) = result {
                // The other side is gone (or going): the connection is over.
                debug!("Relay to the device ended: {e}");
                break;
            }
        }
        shut(&self.backend);
        shut(&self.frontend);
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

/// Checks the file descriptors of a message before it is forwarded (see the module
/// documentation); the error says why it is refused.
fn check_fds(msg: &Message) -> Result<(), String> {
    match msg.request() {
        SET_MEM_TABLE => {
            let count = msg.body.get(0..4).map_or(0, |b| {
                u32::from_ne_bytes(b.try_into().unwrap_or([0; 4])) as usize
            });
            check_regions(msg, 8, count)
        }
        ADD_MEM_REG => check_regions(msg, 8, 1),
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => check_vring_fd(msg),
        _ => Ok(()),
    }
}

/// Checks the `count` memory regions described from byte `at` of the body, each against its
/// file descriptor: the file covers the region and cannot shrink.
fn check_regions(msg: &Message, at: usize, count: usize) -> Result<(), String> {
    if msg.body.len() != at + count * REGION_BYTES {
        return Err(format!(
            "{count} memory regions in a {}-byte message",
            msg.body.len()
        ));
    }
    if msg.fds.len() != count {
        return Err(format!(
            "{count} memory regions with {} file descriptors",
            msg.fds.len()
        ));
    }
    for (i, fd) in msg.fds.iter().enumerate() {
        let base = at + i * REGION_BYTES;
        let (Some(guest), Some(size), Some(offset)) = (
            msg.u64_at(base),
            msg.u64_at(base + 8),
            msg.u64_at(base + 24),
        ) else {
            return Err(format!("memory region {i} is cut short"));
        };
        let file = fd
            .try_clone()
            .map(File::from)
            .map_err(|e| format!("cannot examine the file of memory region {i}: {e}"))?;
        let file_len = file
            .metadata()
            .map_err(|e| format!("cannot examine the file of memory region {i}: {e}"))?
            .len();
        let inside = matches!(offset.checked_add(size), Some(end) if end <= file_len);
        if !inside {
            return Err(format!(
                "memory region {i} (guest address {guest:#x}) maps {size} bytes at offset \
                 {offset} of a file of {file_len} bytes"
            ));
        }
        match fdcheck::seal_against_shrinking(&file) {
            Sealing::Sealed => {}
            Sealing::SealedNow => debug!(region = i, "Sealed guest memory against shrinking"),
            Sealing::Unsealable => warn!(
                region = i,
                file = fdcheck::describe(fd.as_fd()).unwrap_or_default(),
                "Guest memory in a file that cannot be sealed against shrinking (a memfd made \
                 without MFD_ALLOW_SEALING, as libblkio makes them, or a file system without \
                 seals): if the frontend truncates it, the pages cut off read as zeros"
            ),
        }
    }
    Ok(())
}

/// Checks the descriptor of SET_VRING_KICK, SET_VRING_CALL or SET_VRING_ERR: none when the
/// payload says so, else one eventfd, made non-blocking.
fn check_vring_fd(msg: &Message) -> Result<(), String> {
    let Some(payload) = msg.u64_at(0) else {
        return Err(format!("a {}-byte vring message", msg.body.len()));
    };
    let queue = payload & VRING_INDEX_MASK;
    if payload & VRING_NOFD != 0 {
        return match msg.fds.len() {
            0 => Ok(()),
            n => Err(format!(
                "queue {queue}: {n} file descriptors with the no-fd flag"
            )),
        };
    }
    let [fd] = msg.fds.as_slice() else {
        return Err(format!(
            "queue {queue}: {} file descriptors instead of one eventfd",
            msg.fds.len()
        ));
    };
    if !fdcheck::is_eventfd(fd.as_fd()) {
        return Err(format!(
            "queue {queue}: the descriptor is not an eventfd but {}",
            fdcheck::describe(fd.as_fd()).unwrap_or_else(|| "unknown".into())
        ));
    }
    fdcheck::set_nonblocking(fd.as_fd())
        .map_err(|e| format!("queue {queue}: cannot make the eventfd non-blocking: {e}"))
}

/// Writes to the kick eventfd of a SET_VRING_KICK message (after it was forwarded): the worker
/// then processes the queue once it is started and enabled, whether or not the guest kicks.
fn kick(msg: &Message) {
    let Some(payload) = msg.u64_at(0) else {
        return;
    };
    if payload & VRING_NOFD != 0 {
        return;
    }
    let Some(fd) = msg.fds.first() else {
        return;
    };
    let queue = payload & VRING_INDEX_MASK;
    match fd.try_clone().map(File::from) {
        Ok(mut eventfd) => {
            if let Err(e) = eventfd.write_all(&1u64.to_ne_bytes()) {
                debug!(queue, "Cannot kick the queue: {e}");
            }
        }
        Err(e) => debug!(queue, "Cannot kick the queue: {e}"),
    }
}

/// Backend → frontend.
struct Outbound {
    backend: UnixStream,
    to_frontend: Arc<Mutex<UnixStream>>,
}

impl Outbound {
    fn run(self) {
        loop {
            match read_message(&self.backend) {
                Ok(Some(msg)) => {
                    if let Err(e) = send_to_frontend(&self.to_frontend, &msg) {
                        debug!("Cannot pass a reply to the frontend: {e}");
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("Closing the connection: cannot read the device's reply: {e}");
                    break;
                }
            }
        }
        let frontend = self
            .to_frontend
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shut(&frontend);
        shut(&self.backend);
    }
}
