//! `qcow2d serve`: opens the images, creates the sockets, starts the one listener thread that
//! waits for the clients of every export ([`crate::listen`]), changes the set of exports at
//! run time (control requests, SIGHUP) and stops them all on SIGINT/SIGTERM or when one fails.
//!
//! Everything here runs on the main thread, the supervisor. Start-up is all-or-nothing: every
//! image is opened (for writing unless the export is read-only), every socket bound, the
//! metrics endpoint (`--metrics`) and the control socket (`--control`) listening before the
//! first "serving" line is printed. Then the main thread only waits for messages: a signal
//! (from the signal thread), the end of an export (from the listener or a connection's
//! thread), or a control request (from the control socket's threads, [`crate::control`]), and
//! handles them one at a time. Exports are started and stopped individually
//! ([`Supervisor::add`], [`Supervisor::remove`]); the others keep serving meanwhile. SIGHUP
//! re-reads the config file and applies the difference ([`Supervisor::reload`]). Stopping asks
//! every export to stop; an export with a client is disconnected, then a thread the
//! listener starts drains and flushes its shards and closes its image, an idle one is closed on a thread the
//! listener starts for it ([`Export::close`]). An export that fails to do so, or that does not
//! finish within [`STOP_TIMEOUT`] (a stuck disk), makes `serve` fail, so the process exits
//! non-zero.
//!
//! An export that fails while serving (accepting, setting up a connection, a panic) ends
//! alone: one error line names it, it stays in the list as failed (`ctl list`), and every
//! other export keeps serving. `ctl remove` forgets it, `ctl add` (or a SIGHUP reload that
//! still lists it) replaces it. The daemon ends only when nothing is left that could serve:
//! no export serving and no control socket. One that still has a failed export when it stops
//! exits non-zero.
//!
//! This file holds the start-up (`serve`) and its helpers; `supervisor.rs` the set of exports
//! and the handling of each message.

mod supervisor;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use qcow2d_engine::{Image, OpenOptions};
use tracing::{info, warn};

use crate::backend::DeviceParams;
use crate::config::{ExportConfig, ServeConfig};
use crate::control::{self, Call};
use crate::export::{bind_socket, ExportError, SocketError};
use crate::listen::Listeners;
use crate::metrics::Metrics;
use crate::request::DeviceInfo;
use crate::sandbox::landlock::{self, FsPolicy};
use crate::sandbox::user::{self, User};
use crate::sandbox::{seccomp, Role};
use crate::signals;
use crate::throttle::ExportThrottle;
use crate::virtio_blk::ID_BYTES;
use supervisor::Supervisor;

/// How long exports get to stop after a signal before the daemon gives up on them.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures of `qcow2d serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An image cannot be opened.
    #[error("Cannot open image {}", path.display())]
    OpenImage {
        /// The image path.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: qcow2d_engine::Error,
    },
    /// A socket cannot be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The metrics endpoint cannot listen.
    #[error("Cannot serve metrics on {addr}")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Signal handling cannot be set up.
    #[error("Cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    /// `--user` cannot be honoured.
    #[error("Cannot serve as user {spec:?}")]
    User {
        /// `USER[:GROUP]` as given.
        spec: String,
        /// What failed.
        #[source]
        source: user::UserError,
    },
    /// The file system cannot be confined.
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
    /// The seccomp filters cannot be built.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// A thread cannot be started.
    #[error("Cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// An export's socket cannot be watched for connections.
    #[error("Cannot wait for connections on {}", socket.display())]
    Listen {
        /// The export's socket.
        socket: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An export failed while serving.
    #[error("Export {} failed", socket.display())]
    Export {
        /// The export's socket.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        source: ExportError,
    },
    /// Exports had failed while serving and were never removed.
    #[error("{count} export(s) failed while serving")]
    Failed {
        /// How many.
        count: usize,
    },
    /// Exports did not stop in time after a stop request.
    #[error("{count} export(s) did not stop within {} s", STOP_TIMEOUT.as_secs())]
    StopTimeout {
        /// How many were still running.
        count: usize,
    },
    /// A second stop signal arrived while stopping.
    #[error("Stopped by a second {signal} before the exports finished")]
    Forced {
        /// The signal's name.
        signal: &'static str,
    },
}

pub(super) enum Event {
    Signal(libc::c_int),
    ExportFinished {
        id: u64,
        result: Result<(), ExportError>,
    },
    Control(Call),
}

fn signal_event(signal: libc::c_int) -> Event {
    Event::Signal(signal)
}

fn control_event(call: Call) -> Event {
    Event::Control(call)
}

/// Runs `qcow2d serve` until stopped. Returns `Ok` after a clean stop on SIGINT/SIGTERM.
/// `config_file` is the config file the configuration came from, re-read on SIGHUP, with what
/// it said (before the command line's overrides).
pub fn serve(
    config: ServeConfig,
    config_file: Option<(PathBuf, ServeConfig)>,
) -> Result<(), ServeError> {
    let (config_path, file_settings) = config_file.unzip();
    // Before any other thread exists, so that they all inherit the mask.
    let stop_signals = signals::block_stop_signals().map_err(ServeError::Signals)?;
    if let Err(e) = crate::sigbus::install() {
        warn!("Cannot handle SIGBUS: a frontend that truncates unsealed guest memory would crash the daemon: {e}");
    }

    let user = match &config.user {
        Some(spec) => {
            let found = user::check_root()
                .and_then(|()| user::lookup(spec))
                .map_err(|source| ServeError::User {
                    spec: spec.clone(),
                    source,
                })?;
            Some(found)
        }
        None => None,
    };

    // Open every image first: nothing is listening if one of them is bad.
    let mut opened = Vec::with_capacity(config.exports.len());
    for export in &config.exports {
        let image = open_image(export).map_err(|source| ServeError::OpenImage {
            path: export.image.clone(),
            source,
        })?;
        opened.push(image);
    }
    let mut bound = Vec::with_capacity(opened.len());
    for (cfg, image) in config.exports.iter().zip(opened) {
        let listener = bind_socket(&cfg.socket)?;
        if let Some(user) = &user {
            give(&cfg.socket, user, 0o660)?;
        }
        bound.push((cfg.clone(), image, listener));
    }
    // The control socket needs the counters too (`ctl list`).
    let metrics =
        (config.metrics.is_some() || config.control.is_some()).then(|| Arc::new(Metrics::new()));
    let control = config.control.as_deref().map(control::bind).transpose()?;
    if let (Some(user), Some(path)) = (&user, &config.control) {
        give(path, user, 0o600)?;
    }
    let metrics_listener = config.metrics.map(bind_metrics).transpose()?;

    // Set-up is done: give up what serving does not need, before any other thread exists.
    let policy = fs_policy(&config, config_path.as_deref(), &bound);
    let confinement = landlock::prepare(&policy)?;
    // Every thread started from here on inherits it; lowering it needs the privilege the
    // drop below gives up.
    set_nice(config.nice);
    if let Some(user) = &user {
        user::drop_to(user).map_err(|source| ServeError::User {
            spec: user.spec.clone(),
            source,
        })?;
        info!(
            user = user.spec,
            uid = user.uid,
            gid = user.gid,
            "Serving as an unprivileged user, no capabilities left"
        );
    }
    confinement.enforce()?;
    debug_open_hook();
    // From here on each thread keeps only the system calls it needs.
    seccomp::configure(config.seccomp)?;
    info!(seccomp = config.seccomp.name(), "Sandbox set up");
    // One pool of inflate workers for every export, started before the listener thread (no
    // worker thread may start threads, and a pool started on a first compressed read would
    // be started by one).
    let pool = qcow2d_engine::start_inflate_pool(qcow2d_engine::InflatePoolConfig {
        threads: None,
        on_start: Some(inflate_thread_start),
    });
    info!(workers = pool.workers(), "Inflate pool started");
    // One relay thread for every connection, started here too, before any thread has a
    // filter: it takes the relay's alone, and the connection threads' filter (inherited
    // from the listener) need not allow what relaying does.
    crate::relay::start_thread().map_err(ServeError::Thread)?;
    // The core threads, which run every connection's workers, started here for the same
    // reason: each takes the worker's filter alone.
    let cache_per_core = config
        .cache_per_core
        .unwrap_or(crate::config::DEFAULT_CACHE_PER_CORE_BYTES);
    let cores = crate::cores::start_with(cache_per_core).map_err(ServeError::Thread)?;
    info!(
        threads = cores.cores(),
        cache_per_core, "Core threads started"
    );

    let (tx, rx) = mpsc::channel();
    // One thread waits for the clients of every export.
    let finished_tx = tx.clone();
    let listeners = Listeners::new(Box::new(move |id, result| {
        let _ = finished_tx.send(Event::ExportFinished { id, result });
    }))
    .map_err(ServeError::Thread)?;
    listeners.spawn().map_err(ServeError::Thread)?;
    let mut sup = Supervisor {
        exports: Vec::new(),
        next_id: 0,
        metrics,
        groups: HashMap::new(),
        shards: config.shards,
        allow_paths: config.allow_paths.clone(),
        config_path,
        file_settings,
        control_path: config.control.clone(),
        listeners,
        rx,
        deferred: VecDeque::new(),
    };
    for (cfg, image, listener) in bound {
        if let Err(e) = sup.start(cfg, image, listener, true) {
            let _ = sup.stop_all();
            return Err(e);
        }
    }
    if let (Some(listener), Some(metrics)) = (metrics_listener, &sup.metrics) {
        if let Err(e) = serve_metrics(listener, Arc::clone(metrics)) {
            let _ = sup.stop_all();
            return Err(e);
        }
    }
    signals::spawn_signal_thread(stop_signals, tx.clone(), signal_event)
        .map_err(ServeError::Thread)?;
    if let Some(socket) = control {
        info!(socket = %socket_display(&config.control), "Listening for control requests");
        control::spawn(socket, tx.clone(), control_event).map_err(ServeError::Thread)?;
        // For scripts, as the metrics line: printed once the socket accepts requests.
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let _ = writeln!(
            out,
            "qcow2d: control on {}",
            socket_display(&config.control)
        );
        let _ = out.flush();
    }
    drop(tx);
    seccomp::enter_or_abort(Role::Main);
    announce(&config.exports);

    // Serve until a signal, or until nothing is left to serve.
    while sup.keep_running() {
        let event = sup.next_event();
        match event {
            None => break,
            Some(Event::Signal(libc::SIGHUP)) => sup.reload(),
            Some(Event::Signal(signal)) => {
                info!("Received {}, stopping", signals::signal_name(signal));
                break;
            }
            Some(Event::ExportFinished { id, result }) => sup.finished(id, result),
            Some(Event::Control(call)) => {
                let answer = sup.handle(call.request);
                let _ = call.reply.send(answer);
            }
        }
    }
    crate::notify::notify("STOPPING=1");
    let stopped = sup.stop_all();
    // The control thread keeps its socket until the process exits: the file goes now.
    if let Some(path) = &config.control {
        let _ = std::fs::remove_file(path);
    }
    let failed = sup.exports.iter().filter(|e| e.failed.is_some()).count();
    match stopped {
        Ok(()) if failed > 0 => Err(ServeError::Failed { count: failed }),
        other => other,
    }
}

/// Gives the main thread, and so every thread it starts afterwards, the nice value `nice`
/// (`--nice`; unset: [`crate::config::DEFAULT_NICE`]): the core threads and the inflate
/// workers run the I/O of every VM, and one preempted by a busy vCPU thread holds up all of
/// them. Without the privilege to lower it the daemon runs at the nice value it was started
/// with: a warning if the value was configured, a note otherwise.
fn set_nice(nice: Option<i32>) {
    let value = nice.unwrap_or(crate::config::DEFAULT_NICE);
    // SAFETY: setpriority takes no pointers; PRIO_PROCESS with 0 names the calling thread,
    // whose value the threads it starts inherit.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, value) } != 0 {
        let e = std::io::Error::last_os_error();
        if nice.is_some() {
            warn!(nice = value, "Cannot run at the configured nice value: {e}");
        } else {
            info!(
                nice = value,
                "Running at the nice value the daemon was started with (lowering it: {e})"
            );
        }
    }
}

fn socket_display(path: &Option<PathBuf>) -> String {
    path.as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Opens an export's image as its configuration says.
fn open_image(export: &ExportConfig) -> Result<Image, qcow2d_engine::Error> {
    let options = OpenOptions {
        read_only: export.read_only,
        lazy_refcounts: export.lazy_refcounts,
        direct: export.direct,
        overlap_check: export.overlap_check,
        allowed_roots: export.allowed_roots.clone(),
        ..OpenOptions::default()
    };
    Image::open(&export.image, &options)
}

/// The engine's inflate workers take their filter as they start.
fn inflate_thread_start() {
    seccomp::enter_or_abort(Role::Inflate);
}

/// What the file system sandbox leaves reachable: the files of every export, the socket
/// directories, systemd's socket.
/// When exports can be added at run time (a control socket, or a config file that SIGHUP
/// re-reads), the config file is readable and the allowed roots of every export (its
/// image's directory and `allow_paths`) and the socket directories are roots: files in them
/// can be read and written, sockets made.
fn fs_policy(
    config: &ServeConfig,
    config_path: Option<&Path>,
    exports: &[(ExportConfig, Image, vhost::vhost_user::Listener)],
) -> FsPolicy {
    let dir_of = |path: &Path| match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut policy = FsPolicy::default();
    for (cfg, image, _) in exports {
        let data_file = image.data_file_path().map(Path::to_path_buf);
        for (index, file) in image.files().into_iter().enumerate() {
            let written =
                !image.is_read_only() && (index == 0 || Some(&file) == data_file.as_ref());
            if written {
                policy.write_files.push(file);
            } else {
                policy.read_files.push(file);
            }
        }
        policy.socket_dirs.push(dir_of(&cfg.socket));
    }
    if let Some(control) = &config.control {
        policy.socket_dirs.push(dir_of(control));
    }
    if let Some(notify) = std::env::var_os("NOTIFY_SOCKET") {
        if notify.as_encoded_bytes().starts_with(b"@") {
            policy.abstract_unix = true;
        } else {
            policy.connect_sockets.push(PathBuf::from(notify));
        }
    }
    if config.control.is_some() || config_path.is_some() {
        if let Some(path) = config_path {
            policy.read_files.push(path.to_path_buf());
        }
        let mut roots: Vec<PathBuf> = exports
            .iter()
            .flat_map(|(cfg, _, _)| cfg.allowed_roots.iter().cloned())
            .chain(config.allow_paths.iter().cloned())
            .chain(policy.socket_dirs.iter().cloned())
            .collect();
        roots.sort();
        roots.dedup();
        policy.roots = roots;
    }
    policy
}

fn give(path: &Path, user: &User, mode: libc::mode_t) -> Result<(), ServeError> {
    user::give(path, user, mode).map_err(|source| ServeError::User {
        spec: user.spec.clone(),
        source,
    })
}

/// Debug builds only: `QCOW2D_DEBUG_OPEN_IMAGE=PATH` opens PATH with the engine (as an export
/// added at run time would, without any path check) once the sandbox is set up, and logs
/// what happened, so tests can see the file system sandbox refuse what it must.
fn debug_open_hook() {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("QCOW2D_DEBUG_OPEN_IMAGE") {
        let path = PathBuf::from(path);
        match Image::open(&path, &OpenOptions::default()) {
            Ok(_) => warn!(path = %path.display(), "Debug hook: opened the image"),
            Err(e) => warn!(
                path = %path.display(),
                "Debug hook: cannot open the image: {}",
                crate::error_chain(&e)
            ),
        }
    }
}

fn device_params(cfg: &ExportConfig, image: &Image, throttle: Arc<ExportThrottle>) -> DeviceParams {
    let mut serial = [0u8; ID_BYTES];
    let bytes = cfg.serial.as_bytes();
    let n = bytes.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&bytes[..n]);
    DeviceParams {
        num_queues: cfg.queues,
        shards: cfg.shards,
        device: DeviceInfo {
            capacity: image.virtual_size(),
            read_only: image.is_read_only(),
            serial,
        },
        cluster_size: image.cluster_size(),
        writeback: Arc::new(AtomicBool::new(!cfg.writethrough)),
        metrics: None,
        throttle,
        budgets: cfg.budgets,
    }
}

/// Binds the metrics endpoint's socket (before the sandbox refuses TCP binds).
fn bind_metrics(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| ServeError::Metrics { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Metrics { addr, source })?;
    Ok((listener, local))
}

/// Starts the metrics endpoint and prints `qcow2d: metrics on http://ADDR/metrics` with the
/// address it listens on (which tells the port when the configured address asked for port 0).
fn serve_metrics(
    (listener, local): (TcpListener, SocketAddr),
    metrics: Arc<Metrics>,
) -> Result<(), ServeError> {
    crate::metrics::http::spawn(listener, metrics).map_err(ServeError::Thread)?;
    info!(address = %local, "Serving metrics on /metrics");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "qcow2d: metrics on http://{local}/metrics");
    let _ = out.flush();
    Ok(())
}

/// The one line per export that scripts wait for.
fn announce(exports: &[ExportConfig]) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for e in exports {
        info!(
            image = %e.image.display(),
            socket = %e.socket.display(),
            queues = e.queues,
            workers = e.shards,
            direct = e.direct,
            overlap_check = %e.overlap_check,
            "Export ready"
        );
        let _ = writeln!(
            out,
            "qcow2d: serving {} on {}",
            e.image.display(),
            e.socket.display()
        );
    }
    let _ = out.flush();
    crate::notify::notify("READY=1");
}
