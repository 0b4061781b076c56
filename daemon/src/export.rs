//! One export: its listening socket, the serving of one frontend connection, and the close.
//!
//! The socket is created on the main thread ([`bind_socket`], non-blocking); while the export
//! waits for a client it sits with every other idle export in the listener thread's epoll set
//! ([`crate::listen`]), holding no thread, shard, cache or worker. For each frontend the
//! listener accepts, [`Export::connect`] (on the listener thread) builds a fresh [`BlkBackend`]
//! (with new engine shards), its queues and workers (one per shard, placed on the core threads,
//! [`crate::worker_loop`]) and its request handler ([`crate::handler`]), and hands the
//! frontend's socket and the handler to the relay thread, which runs it; no thread waits for
//! the connection. When the frontend goes away the listener sees its socket
//! hang up and runs [`Export::disconnect`] on a short-lived thread, which tears everything
//! down (dropped from the relay; workers taken off their core threads; shards drained, flushed and their
//! reserved clusters given back, so the next client sees every write of this one).
//! When the export stops, [`Export::close`] closes the image cleanly (refcounts written, dirty
//! bit cleared) — unless a flush failed, in which case the image is left as it is on disk and
//! the export reports the failure. [`ExportControl`] is how the main thread asks it to stop,
//! whether it is waiting for a client or serving one.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use qcow2d_engine::Image;
use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BackendError, BlkBackend, DeviceParams, Handlers};
use crate::handler::{DeviceLink, FrontendHandler};
use crate::listen::Waker;
use crate::relay::Relay;
use crate::virtio_blk::MAX_QUEUE_SIZE;
use crate::vring::Vring;
use crate::worker_loop::{Placement, Workers};

/// Ends a connection from another thread: shuts the frontend's socket down, so that the relay
/// ends the connection and the listener sees it hang up.
#[derive(Clone)]
struct ShutdownHandle(Arc<UnixStream>);

impl ShutdownHandle {
    fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Failures to create an export's socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Another process serves this socket.
    #[error("{} is in use by another process", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The existing path cannot be examined or removed.
    #[error("Cannot replace the stale socket {}", path.display())]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The control socket cannot be created.
    #[error("Cannot listen on the control socket {}", path.display())]
    Control {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// bind() or listen() failed.
    #[error("Cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The vhost-user error.
        #[source]
        source: VhostUserError,
    },
}

/// Failures that end an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The backend of a new connection could not be built.
    #[error("Cannot set up the device for a new connection")]
    Backend(#[from] BackendError),
    /// The connection's queues could not be made.
    #[error("Cannot create the connection's queues")]
    Queues(#[source] virtio_queue::Error),
    /// The connection's workers (their epoll sets and eventfds, their places on the core
    /// threads) could not
    /// be started.
    #[error("Cannot start the connection's workers")]
    Workers(#[source] std::io::Error),
    /// Accepting a connection failed.
    #[error("Cannot accept a connection: {0}")]
    Accept(String),
    /// The connection between the frontend and the device could not be set up.
    #[error("Cannot connect the frontend to the device")]
    Relay(#[source] std::io::Error),
    /// Serving the export panicked.
    #[error("The export panicked while serving a connection")]
    Panicked,
    /// The socket could not be watched for the next connection.
    #[error("Cannot wait for the next connection")]
    Listen(#[source] std::io::Error),
    /// A connection's writes could not be made durable; the image was not closed cleanly.
    #[error(
        "Writes could not be made durable, so the image was not closed cleanly (check it with qemu-img check)"
    )]
    Flush(#[source] qcow2d_engine::Error),
    /// Closing the image failed.
    #[error("Cannot close the image cleanly")]
    Close(#[source] qcow2d_engine::Error),
}

/// Creates the listening socket at `path`, non-blocking (the listener thread accepts on it
/// when epoll says it is readable). A stale socket left by a previous run (nobody listening)
/// is replaced; a live one, or anything that is not a socket, is an error.
pub fn bind_socket(path: &Path) -> Result<Listener, SocketError> {
    clear_stale_socket(path)?;
    let bind = |source| SocketError::Bind {
        path: path.to_owned(),
        source,
    };
    // The listener removes the socket file when it is dropped.
    let listener = Listener::new(path, false).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    Ok(listener)
}

/// Makes room for a socket at `path`: nothing there is fine, a stale socket (nobody listening)
/// is removed, a live one or anything that is not a socket is an error.
pub fn clear_stale_socket(path: &Path) -> Result<(), SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotASocket {
                    path: path.to_owned(),
                });
            }
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|source| SocketError::Stale {
                        path: path.to_owned(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(SocketError::Stale {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Stale {
                path: path.to_owned(),
                source,
            })
        }
    }
    Ok(())
}

/// The process id of the peer of a unix socket (SO_PEERCRED), if the kernel tells.
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the descriptor is
    // borrowed from a live stream.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

#[derive(Default)]
struct ControlState {
    stopping: bool,
    connection: Option<(ShutdownHandle, Arc<BlkBackend>)>,
    /// The process id of the frontend connected now, if any and known.
    client: Option<Option<i32>>,
}

/// The export's image and the backend built on it (for the next or the current connection),
/// with its workers' epoll handlers. Whoever changes the image (a resize) or the backend (the
/// listener thread, between connections) holds this lock.
#[derive(Default)]
struct ImageState {
    image: Option<Image>,
    backend: Option<(Arc<BlkBackend>, Handlers)>,
}

/// Shared between the main thread and an export's listener thread: the stop request, the
/// handle of the connection being served, and the image with the backend that uses it.
pub struct ExportControl {
    socket: PathBuf,
    /// Wakes the listener thread to end the export while it waits for a client.
    waker: Waker,
    state: Mutex<ControlState>,
    image: Mutex<ImageState>,
}

impl ExportControl {
    /// Control for the export of `image` listening on `socket`, whose listener thread
    /// `waker` wakes.
    pub fn new(socket: PathBuf, image: Image, waker: Waker) -> Self {
        ExportControl {
            socket,
            waker,
            state: Mutex::new(ControlState::default()),
            image: Mutex::new(ImageState {
                image: Some(image),
                backend: None,
            }),
        }
    }

    fn image_state(&self) -> MutexGuard<'_, ImageState> {
        self.image.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the image's virtual size to `new_size` bytes (see `Image::resize`): the
    /// backend's workers stop taking requests, those in flight complete, the shards are
    /// flushed and dropped, the image is resized, new shards are made and requests are taken
    /// again; then a connected frontend is told (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG).
    /// Returns the old size, and whether the frontend was told.
    pub fn resize(&self, new_size: u64, shrink: bool) -> Result<(u64, bool), String> {
        let mut st = self.image_state();
        let ImageState { image, backend } = &mut *st;
        let Some(image) = image.as_mut() else {
            return Err("The export is stopping".into());
        };
        if image.is_read_only() {
            return Err("The export is read-only: its image cannot be resized".into());
        }
        let old = image.virtual_size();
        if let Some((b, handlers)) = backend.as_ref() {
            b.suspend(handlers)
                .map_err(|e| format!("Cannot pause the export: {e}"))?;
        }
        let resized = image
            .resize(new_size, shrink)
            .map_err(|e| crate::error_chain_text(&e));
        let mut told = false;
        if let Some((b, handlers)) = backend.as_ref() {
            if let Err(e) = b.resume(image, handlers) {
                let text = crate::error_chain_text(&e);
                error!(socket = %self.socket.display(), "Cannot resume the export: {text}");
                // The connection cannot go on without shards: end it.
                if let Some((handle, _)) = &self.lock().connection {
                    handle.shutdown();
                }
                return Err(format!("Cannot resume the export after the resize: {text}"));
            }
            if resized.is_ok() {
                match b.channel().config_changed() {
                    Ok(sent) => told = sent,
                    Err(e) => warn!(
                        socket = %self.socket.display(),
                        "Cannot tell the frontend of the new size: {e}"
                    ),
                }
            }
        }
        resized.map(|()| (old, told))
    }

    /// Drops what the export still holds of its image (after its thread ended with an error
    /// or a panic): its locks are released, so the image can be served again. Nothing is
    /// written: an export whose thread ended normally has closed its image already.
    pub fn release_image(&self) {
        let mut st = self.image_state();
        st.backend = None;
        st.image = None;
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the export to stop: completes the client's requests in flight and disconnects
    /// it (the thread that tears the connection down then closes the export), or wakes the
    /// listener thread,
    /// which closes an export waiting for a client.
    pub fn request_stop(&self) {
        let connection = {
            let mut state = self.lock();
            state.stopping = true;
            state.connection.clone()
        };
        let waiting_for_client = match connection {
            Some((handle, backend)) => {
                // Requests the guest sees completed before the disconnect are not resubmitted
                // after it reconnects; requests left unpopped are.
                backend.quiesce();
                handle.shutdown();
                false
            }
            None => true,
        };
        if waiting_for_client {
            // Marked stopping before the wake-up: the listener (or a teardown thread about to
            // put the export back) sees the mark.
            self.waker.wake();
        }
    }

    /// Whether the export was asked to stop.
    pub fn is_stopping(&self) -> bool {
        self.lock().stopping
    }

    /// The frontend connected now: `Some(pid)` (the pid if the kernel told it), or `None`.
    pub fn client(&self) -> Option<Option<i32>> {
        self.lock().client
    }

    /// Records the connection being served; if a stop was requested meanwhile, ends it now.
    fn connected(
        &self,
        handle: Option<ShutdownHandle>,
        backend: &Arc<BlkBackend>,
        pid: Option<i32>,
    ) {
        let mut state = self.lock();
        state.client = Some(pid);
        if state.stopping {
            if let Some(h) = &handle {
                h.shutdown();
            }
        }
        state.connection = handle.map(|h| (h, backend.clone()));
    }

    fn disconnected(&self) {
        let mut state = self.lock();
        state.connection = None;
        state.client = None;
    }
}

/// An export ready to serve: its device parameters and bound socket (its image is in
/// `control`). Owned by the listener thread while it waits for a client, by the connection's
/// thread while it serves one.
pub struct Export {
    /// The export's id (the supervisor's; the listener's epoll token).
    pub id: u64,
    /// Image path (for logs).
    image_path: PathBuf,
    /// The device the guest sees.
    params: DeviceParams,
    /// The bound, non-blocking socket.
    pub listener: Listener,
    /// Stop requests from the main thread.
    pub control: Arc<ExportControl>,
    /// The name of the export's connections in log lines.
    thread_name: String,
    /// The first failure to make a connection's writes durable: the export goes on serving
    /// (the engine refuses writes from then on) and reports it when it closes.
    flush_error: Option<qcow2d_engine::Error>,
}

impl Export {
    /// Export `id` of the image at `image_path` (opened in `control`) on `listener`.
    pub fn new(
        id: u64,
        image_path: PathBuf,
        params: DeviceParams,
        listener: Listener,
        control: Arc<ExportControl>,
    ) -> Self {
        Export {
            id,
            image_path,
            params,
            listener,
            control,
            thread_name: format!("qcow2d-vu{id}"),
            flush_error: None,
        }
    }

    /// Closes a writable image cleanly once every shard has been flushed and dropped, unless
    /// one of those flushes failed: then nothing more is written (the engine has turned the
    /// image read-only) and that failure is the result.
    pub fn close(&mut self) -> Result<(), ExportError> {
        let flush_error = self.flush_error.take();
        // The backend still built for a next connection goes first (its shards flush and give
        // back their reservations as they are dropped); the image goes with this function:
        // its locks are released when it is dropped.
        let img = {
            let mut st = self.control.image_state();
            st.backend = None;
            st.image.take()
        };
        let Some(img) = img else {
            return Ok(());
        };
        if img.is_read_only() {
            return Ok(());
        }
        let image = self.image_path.display();
        if let Some(e) = flush_error {
            error!(%image, "Not closing the image cleanly: a flush failed ({e})");
            return Err(ExportError::Flush(e));
        }
        match img.close() {
            Ok(()) => {
                info!(%image, "Image closed cleanly");
                Ok(())
            }
            Err(e) => {
                error!(%image, "Cannot close the image cleanly: {e}");
                Err(ExportError::Close(e))
            }
        }
    }

    /// Starts serving `frontend`: builds the connection's backend (fresh shards), its queues
    /// and workers (one per shard, on the core threads), and hands the frontend's socket with the
    /// connection's request handler to the relay thread, which runs it. Runs on the listener
    /// thread and returns at once; `None` when there is nothing to serve (the export is
    /// stopping, or its image is gone). The connection ends when [`Connection::ended_fd`]
    /// hangs up; then [`Export::disconnect`] tears it down.
    pub fn connect(&mut self, frontend: UnixStream) -> Result<Option<Connection>, ExportError> {
        if self.control.is_stopping() {
            return Ok(None);
        }
        // Watches the frontend's socket for the end of the connection: the socket hangs up
        // when the frontend closes it or when the relay shuts it down (either side ended).
        let ended = frontend.try_clone().map_err(ExportError::Relay)?;
        let stopper = ShutdownHandle(Arc::new(frontend.try_clone().map_err(ExportError::Relay)?));
        // Built for this client only: an export waiting for one holds no shard, cache or
        // worker thread.
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let (backend, workers, vrings) = {
            let mut st = self.control.image_state();
            let Some(image) = st.image.as_ref() else {
                return Ok(None);
            };
            // The core threads first: each shard draws its caches from its worker's core.
            let placement = Placement::new(self.params.workers()).map_err(ExportError::Workers)?;
            let backend = Arc::new(BlkBackend::new(
                image,
                &self.params,
                &mem,
                &placement.cache_budgets(),
            )?);
            let vrings = (0..backend.num_queues())
                .map(|_| Vring::new(mem.clone(), MAX_QUEUE_SIZE as u16))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ExportError::Queues)?;
            let workers =
                Workers::start(placement, &backend, &vrings, Some(Arc::clone(&stopper.0)))
                    .map_err(ExportError::Workers)?;
            st.backend = Some((Arc::clone(&backend), workers.loops().to_vec()));
            (backend, workers, vrings)
        };
        // The relay thread writes each message into one end of a private socket pair and
        // runs the handler, which reads it from the other end (see crate::handler).
        let (relay_end, device_end) = UnixStream::pair().map_err(ExportError::Relay)?;
        let handler =
            FrontendHandler::new(Arc::clone(&backend), vrings, mem, workers.loops().to_vec());
        let device = DeviceLink::new(handler, device_end).map_err(ExportError::Relay)?;
        let pid = peer_pid(&frontend);
        let relay = Relay::start(
            frontend,
            relay_end,
            Some(Box::new(device)),
            backend.inflight(),
            backend.channel(),
            &self.thread_name,
        )
        .map_err(ExportError::Relay)?;
        // If a stop was requested meanwhile, this ends the connection at once.
        self.control.connected(Some(stopper), &backend, pid);
        let stopped_at_once = self.control.is_stopping();
        if !stopped_at_once {
            info!(
                socket = %self.control.socket.display(),
                image = %self.image_path.display(),
                workers = backend.threads(),
                "Client connected"
            );
        }
        Ok(Some(Connection {
            backend,
            workers,
            relay,
            stopped_at_once,
            ended,
        }))
    }

    /// Tears down a connection that has ended (its [`Connection::ended_fd`] hung up): drops
    /// it from the relay, takes its workers off the core threads, then drains and flushes the shards so that
    /// the next client sees every write of this one. Runs on a thread of its own, since a
    /// flush may take as long as the disk does. A failure to make the connection's writes
    /// durable is kept for [`Export::close`]; the export goes on serving.
    pub fn disconnect(&mut self, connection: Connection) {
        let Connection {
            backend,
            workers,
            relay,
            stopped_at_once,
            ended: _,
        } = connection;
        let socket = self.control.socket.display().to_string();
        // Returns once the relay thread has dropped the connection (and its handler), both
        // sockets closed; why it ended was logged there.
        relay.stop();
        self.control.disconnected();
        if !stopped_at_once {
            if self.control.is_stopping() {
                info!(socket, "Connection closed for shutdown");
            } else {
                info!(socket, "Client disconnected");
            }
        }
        // Takes the workers off their core threads: nothing else touches the shards. Finishing them waits
        // for the requests still in flight and makes every write durable before they are
        // dropped. Under the image lock: a resize does not change the shards meanwhile.
        workers.stop();
        let mut st = self.control.image_state();
        st.backend = None;
        if let Err(e) = backend.finish() {
            error!(socket, "The client's writes could not be made durable: {e}");
            self.flush_error.get_or_insert(e);
        }
        drop(backend);
        drop(st);
        crate::release_freed_memory();
        if let Some(cores) = crate::cores::running() {
            cores.release_freed_memory();
        }
    }
}

/// A frontend being served: what [`Export::connect`] built and [`Export::disconnect`] tears
/// down. While it lasts, it holds no thread of its own but its workers (one per shard): the
/// relay thread relays its messages and runs its request handler, and the listener thread
/// watches for its end.
pub struct Connection {
    backend: Arc<BlkBackend>,
    workers: Workers,
    relay: Relay,
    /// A stop was requested while the connection was being made: it ends at once, quietly.
    stopped_at_once: bool,
    /// A second descriptor of the frontend's socket.
    ended: UnixStream,
}

impl Connection {
    /// A descriptor that hangs up (EPOLLHUP) once the connection has ended: the frontend
    /// closed its socket, or the relay shut it down because either side went away or broke
    /// the protocol, or the export was asked to stop.
    pub fn ended_fd(&self) -> RawFd {
        self.ended.as_raw_fd()
    }

    /// Ends the connection now: the frontend's socket is shut down, so the relay ends it.
    pub fn shut_down(&self) {
        let _ = self.ended.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::atomic::AtomicBool;

    use vhost::vhost_user::message::{
        VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    };
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

    use super::*;
    use crate::request::DeviceInfo;
    use crate::virtio_blk::ID_BYTES;

    fn memfd(size: u64) -> std::fs::File {
        // SAFETY: memfd_create with a C string literal and flags; returns a new descriptor.
        let fd = unsafe { libc::memfd_create(c"test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }

    /// The export through its relay, driven by vhost's own frontend: messages and file
    /// descriptors reach the request handler and its replies come back; GET_INFLIGHT_FD and
    /// SET_INFLIGHT_FD are answered by the relay (with REPLY_ACK); malformed requests get an
    /// error answer or end the connection, and the export goes on serving.
    #[test]
    fn the_relay_passes_messages_and_answers_the_inflight_ones() {
        let dir = std::env::temp_dir().join(format!("qcow2d-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = qcow2d_tests::create_qcow2_in(&dir, "disk.qcow2", "", "16M");
        let options = qcow2d_engine::OpenOptions {
            read_only: false,
            ..qcow2d_engine::OpenOptions::default()
        };
        let image = Image::open(&path, &options).unwrap();
        let socket = dir.join("vhost.sock");
        let params = DeviceParams {
            num_queues: 2,
            shards: 1,
            device: DeviceInfo {
                capacity: image.virtual_size(),
                read_only: false,
                serial: [0; ID_BYTES],
            },
            cluster_size: image.cluster_size(),
            writeback: Arc::new(AtomicBool::new(true)),
            metrics: None,
            throttle: Arc::new(crate::throttle::ExportThrottle::default()),
            budgets: crate::budget::Budgets::default(),
        };
        let (done_tx, done) = std::sync::mpsc::channel();
        let listeners = crate::listen::Listeners::new(Box::new(move |id, result| {
            let _ = done_tx.send((id, result));
        }))
        .unwrap();
        listeners.spawn().unwrap();
        let control = Arc::new(ExportControl::new(socket.clone(), image, listeners.waker()));
        let export = Export::new(
            7,
            path.clone(),
            params,
            bind_socket(&socket).unwrap(),
            Arc::clone(&control),
        );
        listeners.add(export).map_err(|(_, e)| e).unwrap();

        let mut frontend = Frontend::connect(&socket, 2).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert!(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        frontend.set_protocol_features(protocol).unwrap();
        // Every request from now on asks for an answer (REPLY_ACK), relayed or not.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(frontend.get_queue_num().unwrap(), 2);
        // A memory table with its file descriptor reaches the handler (acknowledged).
        let ram = memfd(1 << 20);
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                userspace_addr: 0x7f00_0000_0000,
                mmap_offset: 0,
                mmap_handle: ram.as_raw_fd(),
            }])
            .unwrap();

        // GET_INFLIGHT_FD: a zeroed, usable area of the spec's size.
        let ask = VhostUserInflight::new(0, 0, 2, 128);
        let (info, mut area) = frontend.get_inflight_fd(&ask).unwrap();
        assert_eq!(
            (
                info.mmap_size,
                info.mmap_offset,
                info.num_queues,
                info.queue_size
            ),
            (2 * 2112, 0, 2, 128)
        );
        assert_eq!(area.metadata().unwrap().len(), 2 * 2112);
        let mut bytes = Vec::new();
        area.read_to_end(&mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| b == 0));
        // SET_INFLIGHT_FD, acknowledged (REPLY_ACK is on).
        frontend.set_inflight_fd(&info, area.as_raw_fd()).unwrap();
        // The area the relay mapped: desc_num was written for each queue.
        let mut header = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&area, &mut header, 2112).unwrap();
        assert_eq!(u16::from_ne_bytes([header[10], header[11]]), 128);
        // An area the frontend claims is larger than its file: refused with an error answer.
        let short = memfd(4096);
        let lie = VhostUserInflight::new(2 * 2112, 0, 2, 128);
        assert!(frontend.set_inflight_fd(&lie, short.as_raw_fd()).is_err());
        // An impossible geometry: the answer has no file descriptor.
        assert!(frontend
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 0, 128))
            .is_err());
        // The connection is still good.
        assert_eq!(frontend.get_features().unwrap(), features);
        drop(frontend);

        // A message above the 4 KiB limit ends that connection, not the export.
        let mut raw = UnixStream::connect(&socket).unwrap();
        let mut header = Vec::new();
        for v in [1u32, 1, 0x10000] {
            header.extend_from_slice(&v.to_ne_bytes());
        }
        raw.write_all(&header).unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without an answer");
        // A truncated message, then the peer goes away.
        let mut raw = UnixStream::connect(&socket).unwrap();
        raw.write_all(&header[..5]).unwrap();
        drop(raw);

        let frontend = Frontend::connect(&socket, 2).unwrap();
        assert_eq!(frontend.get_features().unwrap(), features);
        drop(frontend);

        control.request_stop();
        let (id, result) = done.recv().unwrap();
        assert_eq!(id, 7);
        result.unwrap();
        assert!(!socket.exists(), "the socket file went with the export");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
