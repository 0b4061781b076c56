//! `qcow2d serve`: opens the images, creates the sockets, runs one listener thread per export,
//! changes the set of exports at run time (control requests, SIGHUP) and stops them all on
//! SIGINT/SIGTERM or when one fails.
//!
//! Everything here runs on the main thread, the supervisor. Start-up is all-or-nothing: every
//! image is opened (for writing unless the export is read-only), every socket bound, the
//! metrics endpoint (`--metrics`) and the control socket (`--control`) listening before the
//! first "serving" line is printed. Then the main thread only waits for messages: a signal
//! (from the signal thread), the end of an export thread, or a control request (from the
//! control socket's threads, [`crate::control`]), and handles them one at a time. Exports are
//! started and stopped individually ([`Supervisor::add`], [`Supervisor::remove`]); the others
//! keep serving on their own threads meanwhile. SIGHUP re-reads the config file and applies
//! the difference ([`Supervisor::reload`]). Stopping asks every export to stop; each export
//! thread disconnects its client, drains and flushes its shards and closes its image
//! ([`Export::run`]). An export that fails to do so, or that does not finish within
//! [`STOP_TIMEOUT`] (a stuck disk), makes `serve` fail, so the process exits non-zero.
//!
//! An export that fails while serving (its thread returns an error or panics) ends alone: one
//! error line names it, it stays in the list as failed (`ctl list`), and every other export
//! keeps serving. `ctl remove` forgets it, `ctl add` (or a SIGHUP reload that still lists it)
//! replaces it. The daemon ends only when nothing is left that could serve: no export
//! serving and no control socket. One that still has a failed export when it stops exits
//! non-zero.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qcow2d_engine::{Image, OpenOptions};
use tracing::{error, info, warn};

use crate::backend::DeviceParams;
use crate::config::{ExportConfig, Origin, ServeConfig};
use crate::control::{self, Call, Request, Response};
use crate::export::{bind_socket, Export, ExportControl, ExportError, SocketError};
use crate::metrics::{ExportLabels, ExportMetrics, Metrics, Operation};
use crate::request::DeviceInfo;
use crate::sandbox::landlock::{self, FsPolicy};
use crate::sandbox::user::{self, User};
use crate::sandbox::{seccomp, Role};
use crate::signals;
use crate::throttle::{ExportThrottle, Limits, ThrottleGroup};
use crate::virtio_blk::ID_BYTES;

/// How long exports get to stop after a signal before the daemon gives up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The private directory of the relay's sockets cannot be made.
    #[error("Cannot make a private directory in {}", parent.display())]
    PrivateDir {
        /// Where it was to be made.
        parent: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
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

enum Event {
    Signal(libc::c_int),
    ExportFinished { id: u64 },
    Control(Call),
}

fn signal_event(signal: libc::c_int) -> Event {
    Event::Signal(signal)
}

fn control_event(call: Call) -> Event {
    Event::Control(call)
}

/// Runs `qcow2d serve` until stopped. Returns `Ok` after a clean stop on SIGINT/SIGTERM.
/// `config_path` is the config file the configuration came from, re-read on SIGHUP.
pub fn serve(config: ServeConfig, config_path: Option<PathBuf>) -> Result<(), ServeError> {
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
    let parent = std::env::temp_dir();
    let private_dir = crate::relay::make_private_dir(&parent)
        .map(RemoveOnDrop)
        .map_err(|source| ServeError::PrivateDir {
            parent: parent.clone(),
            source,
        })?;
    if let Some(user) = &user {
        give(&private_dir.0, user, 0o700)?;
    }

    // Set-up is done: give up what serving does not need, before any other thread exists.
    let policy = fs_policy(
        &config,
        config_path.as_deref(),
        &bound,
        &private_dir.0,
        &parent,
    );
    let confinement = landlock::prepare(&policy)?;
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
    // One pool of inflate workers for every export, started before any export thread (no
    // worker thread may start threads, and a pool started on a first compressed read would
    // be started by one).
    let pool = qcow2d_engine::start_inflate_pool(qcow2d_engine::InflatePoolConfig {
        threads: None,
        on_start: Some(inflate_thread_start),
    });
    info!(workers = pool.workers(), "Inflate pool started");

    let (tx, rx) = mpsc::channel();
    let mut sup = Supervisor {
        exports: Vec::new(),
        next_id: 0,
        metrics,
        groups: HashMap::new(),
        shards: config.shards,
        allow_paths: config.allow_paths.clone(),
        config_path,
        control_path: config.control.clone(),
        tx: tx.clone(),
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
            Some(Event::ExportFinished { id }) => sup.finished(id),
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

/// One export being served.
struct Running {
    id: u64,
    config: ExportConfig,
    /// Its configuration as the config file last gave it (`None`: added at run time and not
    /// in the file), which reloads compare with.
    file_config: Option<ExportConfig>,
    control: Arc<ExportControl>,
    thread: Option<JoinHandle<Result<(), ExportError>>>,
    metrics: Option<Arc<ExportMetrics>>,
    throttle: Arc<ExportThrottle>,
    size: u64,
    read_only: bool,
    /// Why the export failed while serving (its thread is gone, its socket too); `None` while
    /// it serves.
    failed: Option<String>,
}

/// The main thread's state: the exports, their throttle groups and metrics. Every change to the
/// set of exports happens here, one at a time: at start-up, on a control request, on SIGHUP.
struct Supervisor {
    exports: Vec<Running>,
    next_id: u64,
    metrics: Option<Arc<Metrics>>,
    /// Named throttle groups that still have an export.
    groups: HashMap<String, Weak<ThrottleGroup>>,
    /// The `shards` setting, for exports added later.
    shards: Option<u64>,
    /// The top-level `allow_paths`, for exports added later.
    allow_paths: Vec<PathBuf>,
    config_path: Option<PathBuf>,
    control_path: Option<PathBuf>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// Events that arrived while waiting for a particular one.
    deferred: VecDeque<Event>,
}

/// The same path, whether given relative to the daemon's directory or absolute.
fn same_path(a: &Path, b: &Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Supervisor {
    fn keep_running(&self) -> bool {
        self.exports.iter().any(|e| e.failed.is_none()) || self.control_path.is_some()
    }

    fn next_event(&mut self) -> Option<Event> {
        match self.deferred.pop_front() {
            Some(e) => Some(e),
            None => self.rx.recv().ok(),
        }
    }

    fn find(&self, socket: &Path) -> Option<usize> {
        self.exports
            .iter()
            .position(|e| same_path(&e.config.socket, socket))
    }

    /// The group an export with `group` and `limits` belongs in; sets a named group's limits
    /// when `limits` gives some.
    fn group_for(&mut self, group: Option<&str>, limits: Limits) -> Option<Arc<ThrottleGroup>> {
        match group {
            Some(name) => {
                if let Some(g) = self.groups.get(name).and_then(Weak::upgrade) {
                    if !limits.is_none() && g.limits() != limits {
                        g.set_limits(limits);
                    }
                    return Some(g);
                }
                let g = Arc::new(ThrottleGroup::new(Some(name.to_owned()), limits));
                self.groups.retain(|_, w| w.strong_count() > 0);
                self.groups.insert(name.to_owned(), Arc::downgrade(&g));
                Some(g)
            }
            None if limits.is_none() => None,
            None => Some(Arc::new(ThrottleGroup::new(None, limits))),
        }
    }

    /// Starts serving an opened image on a bound socket.
    fn start(
        &mut self,
        cfg: ExportConfig,
        image: Image,
        listener: vhost::vhost_user::Listener,
        from_file: bool,
    ) -> Result<(), ServeError> {
        let id = self.next_id;
        self.next_id += 1;
        let group = self.group_for(cfg.group.as_deref(), cfg.limits);
        let throttle = Arc::new(ExportThrottle::new(group));
        let mut params = device_params(&cfg, &image, Arc::clone(&throttle));
        let metrics = self.metrics.as_ref().map(|metrics| {
            let labels = ExportLabels {
                export: cfg.socket.display().to_string(),
                image: cfg.image.display().to_string(),
                serial: cfg.serial.clone(),
                read_only: image.is_read_only(),
            };
            metrics.add_export(labels, params.shards)
        });
        params.metrics = metrics.clone();
        let size = image.virtual_size();
        let read_only = image.is_read_only();
        let control = Arc::new(ExportControl::new(cfg.socket.clone(), image));
        let export = Export {
            params,
            image_path: cfg.image.clone(),
            listener,
            control: Arc::clone(&control),
            thread_name: format!("qcow2d-vu{id}"),
        };
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("qcow2d-export{id}"))
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| export.run()))
                        .unwrap_or(Err(ExportError::Panicked));
                let _ = tx.send(Event::ExportFinished { id });
                result
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                if let (Some(all), Some(m)) = (&self.metrics, &metrics) {
                    all.remove_export(m);
                }
                return Err(ServeError::Thread(e));
            }
        };
        self.exports.push(Running {
            id,
            file_config: from_file.then(|| cfg.clone()),
            config: cfg,
            control,
            thread: Some(thread),
            metrics,
            throttle,
            size,
            read_only,
            failed: None,
        });
        Ok(())
    }

    /// Takes an export that finished out of the list; its result.
    fn reap(&mut self, id: u64) -> Option<(Running, Result<(), ExportError>)> {
        let index = self.exports.iter().position(|e| e.id == id)?;
        let mut running = self.exports.remove(index);
        let result = match running.thread.take() {
            Some(t) => t.join().unwrap_or(Err(ExportError::Panicked)),
            None => Ok(()),
        };
        if let (Some(all), Some(m)) = (&self.metrics, &running.metrics.take()) {
            all.remove_export(m);
        }
        Some((running, result))
    }

    /// An export thread ended without being asked to. Without an error it is gone; with one
    /// it stays in the list as failed, and only it: the other exports are not touched.
    fn finished(&mut self, id: u64) {
        let Some((mut running, result)) = self.reap(id) else {
            return;
        };
        let socket = running.config.socket.display().to_string();
        match result {
            Ok(()) => warn!(socket, "Export stopped"),
            Err(source) => {
                let text = crate::error_chain_text(&source);
                error!(
                    socket,
                    image = %running.config.image.display(),
                    "Export failed, the other exports go on serving: {text}"
                );
                // Its socket went with its thread; a stale file would only be in the way. A
                // thread that panicked left the image open: its locks would keep `ctl add`
                // from serving it again.
                let _ = std::fs::remove_file(&running.config.socket);
                running.control.release_image();
                running.failed = Some(text);
                self.exports.push(running);
            }
        }
    }

    /// Forgets a failed export `index`, so that its socket can be used again.
    fn forget_failed(&mut self, index: usize) {
        let e = self.exports.remove(index);
        info!(socket = %e.config.socket.display(), "Failed export removed");
    }

    /// Waits up to `deadline` for export `id` to finish, keeping other events for later.
    fn wait_finished(&mut self, id: u64, deadline: Instant) -> bool {
        loop {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(Event::ExportFinished { id: done }) if done == id => return true,
                Ok(other) => self.deferred.push_back(other),
                Err(_) => return false,
            }
        }
    }

    /// Asks every export to stop and waits for them (see [`STOP_TIMEOUT`]). A second stop
    /// signal ends the wait at once; control requests meanwhile are refused. Sockets of
    /// exports that did not finish are removed here (those that did removed their own).
    fn stop_all(&mut self) -> Result<(), ServeError> {
        for e in self.exports.iter().filter(|e| e.failed.is_none()) {
            e.control.request_stop();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut outcome = Ok(());
        let mut pending: VecDeque<Event> = std::mem::take(&mut self.deferred);
        while self.exports.iter().any(|e| e.failed.is_none()) {
            let event = match pending.pop_front() {
                Some(e) => Ok(e),
                None => self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now())),
            };
            match event {
                Ok(Event::ExportFinished { id }) => {
                    let Some((running, result)) = self.reap(id) else {
                        continue;
                    };
                    if let Err(source) = result {
                        let socket = running.config.socket;
                        error!(
                            socket = %socket.display(),
                            "Export failed while stopping: {}",
                            crate::error_chain(&source)
                        );
                        if outcome.is_ok() {
                            outcome = Err(ServeError::Export { socket, source });
                        }
                    }
                }
                Ok(Event::Signal(libc::SIGHUP)) => {}
                Ok(Event::Signal(signal)) => {
                    outcome = Err(ServeError::Forced {
                        signal: signals::signal_name(signal),
                    });
                    break;
                }
                Ok(Event::Control(call)) => {
                    let _ = call.reply.send(Err("The daemon is stopping".into()));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    outcome = Err(ServeError::StopTimeout {
                        count: self.exports.iter().filter(|e| e.failed.is_none()).count(),
                    });
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Failed exports stay listed, for the exit status; their sockets are gone already.
        self.exports.retain(|e| {
            if e.failed.is_none() {
                let _ = std::fs::remove_file(&e.config.socket);
            }
            e.failed.is_some()
        });
        outcome
    }

    /// Answers a control request.
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::List {} => Ok(self.list()),
            Request::Add(add) => {
                let mut raw = add.into_raw()?;
                // The top-level directories first, as for the config file's exports.
                raw.allow_paths = self
                    .allow_paths
                    .iter()
                    .cloned()
                    .chain(std::mem::take(&mut raw.allow_paths))
                    .collect();
                let cfg = crate::config::validate(
                    raw,
                    self.shards,
                    crate::config::cpu_count(),
                    &Origin::Control,
                )
                .map_err(|e| e.to_string())?;
                self.add(cfg, false)?;
                Ok(serde_json::json!({}))
            }
            Request::Remove { socket, force } => {
                self.remove(&socket, force)?;
                Ok(serde_json::json!({}))
            }
            Request::Limit {
                socket,
                limits,
                group,
                none,
            } => {
                let index = self.find(&socket).ok_or_else(|| no_export(&socket))?;
                if none {
                    if limits.is_some() || group.is_some() {
                        return Err("\"none\" lifts every limit: give no limits or group".into());
                    }
                    self.exports[index].throttle.set(None);
                    info!(socket = %socket.display(), "Limits lifted");
                    return Ok(serde_json::json!({}));
                }
                let limits = match &limits {
                    Some(v) => Limits::from_json(v)?,
                    None => Limits::default(),
                };
                if let Some(g) = &group {
                    if g.is_empty() || g.len() > 64 || g.chars().any(char::is_control) {
                        return Err(format!(
                            "Group name {g:?} must be 1 to 64 bytes without control characters"
                        ));
                    }
                }
                self.set_limits(index, group.as_deref(), limits)?;
                Ok(serde_json::json!({}))
            }
            Request::Resize {
                socket,
                size,
                shrink,
            } => {
                let index = self.find(&socket).ok_or_else(|| no_export(&socket))?;
                let e = &mut self.exports[index];
                if let Some(why) = &e.failed {
                    return Err(failed_export(&socket, why));
                }
                let (old, told) = e
                    .control
                    .resize(size, shrink)
                    .map_err(|why| format!("Cannot resize {}: {why}", e.config.socket.display()))?;
                e.size = size;
                info!(
                    socket = %e.config.socket.display(),
                    old_size = old,
                    new_size = size,
                    frontend_told = told,
                    "Export resized"
                );
                Ok(serde_json::json!({"old_size": old, "size": size, "frontend_notified": told}))
            }
        }
    }

    /// Applies `limits` (and `group`) to export `index` as `ctl limit` does.
    fn set_limits(
        &mut self,
        index: usize,
        group: Option<&str>,
        limits: Limits,
    ) -> Result<(), String> {
        let current = self.exports[index].throttle.group();
        let new_group = match (group, current) {
            (Some(name), _) => self.group_for(Some(name), limits),
            (None, Some(g)) => {
                if limits.is_none() {
                    return Err("No limits given (lift them with \"none\")".into());
                }
                g.set_limits(limits);
                Some(g)
            }
            (None, None) => {
                if limits.is_none() {
                    return Err("No limits given".into());
                }
                self.group_for(None, limits)
            }
        };
        let e = &self.exports[index];
        info!(
            socket = %e.config.socket.display(),
            group = new_group.as_ref().and_then(|g| g.name()).unwrap_or(""),
            limits = %new_group.as_ref().map(|g| g.limits().to_json()).unwrap_or_default(),
            "Limits set"
        );
        e.throttle.set(new_group);
        Ok(())
    }

    /// Opens, binds and starts a new export; on failure nothing is left behind.
    fn add(&mut self, cfg: ExportConfig, from_file: bool) -> Result<(), String> {
        if let Some(i) = self.find(&cfg.socket) {
            if self.exports[i].failed.is_some() {
                // Replaced: the failed one is forgotten only once the new one serves.
                return self.replace_failed(i, cfg, from_file);
            }
            return Err(format!(
                "{} is already the socket of the export of {}",
                cfg.socket.display(),
                self.exports[i].config.image.display()
            ));
        }
        if self
            .control_path
            .as_deref()
            .is_some_and(|c| same_path(c, &cfg.socket))
        {
            return Err(format!("{} is the control socket", cfg.socket.display()));
        }
        let image = open_image(&cfg).map_err(|source| {
            crate::error_chain_text(&ServeError::OpenImage {
                path: cfg.image.clone(),
                source,
            })
        })?;
        let listener = bind_socket(&cfg.socket)
            .map_err(|e| crate::error_chain_text(&ServeError::Socket(e)))?;
        self.start(cfg.clone(), image, listener, from_file)
            .map_err(|e| crate::error_chain_text(&e))?;
        announce(std::slice::from_ref(&cfg));
        Ok(())
    }

    /// `ctl add` (or a reload) on the socket of failed export `index`: the new export is
    /// started in its place; if it cannot be, the failed one stays listed.
    fn replace_failed(
        &mut self,
        index: usize,
        cfg: ExportConfig,
        from_file: bool,
    ) -> Result<(), String> {
        let failed = self.exports.remove(index);
        match self.add(cfg, from_file) {
            Ok(()) => {
                info!(socket = %failed.config.socket.display(), "Failed export replaced");
                Ok(())
            }
            Err(e) => {
                self.exports.insert(index, failed);
                Err(e)
            }
        }
    }

    /// Stops export `socket`: it stops taking requests, completes those in flight, flushes and
    /// closes its image and removes its socket. Refused with a client connected unless
    /// `force`. A failed export is only forgotten.
    fn remove(&mut self, socket: &Path, force: bool) -> Result<(), String> {
        let index = self.find(socket).ok_or_else(|| no_export(socket))?;
        if self.exports[index].failed.is_some() {
            self.forget_failed(index);
            return Ok(());
        }
        let running = &self.exports[index];
        if let Some(pid) = running.control.client() {
            if !force {
                let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                return Err(format!(
                    "{} has a client connected{who}; use --force to disconnect it",
                    running.config.socket.display()
                ));
            }
        }
        let id = running.id;
        running.control.request_stop();
        if !self.wait_finished(id, Instant::now() + STOP_TIMEOUT) {
            return Err(format!(
                "{} did not stop within {} s; it will be removed when it does",
                socket.display(),
                STOP_TIMEOUT.as_secs()
            ));
        }
        let Some((running, result)) = self.reap(id) else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                info!(socket = %running.config.socket.display(), "Export removed");
                Ok(())
            }
            Err(e) => {
                let text = crate::error_chain_text(&e);
                error!(socket = %running.config.socket.display(), "Export removed: {text}");
                Err(format!("Export removed, but: {text}"))
            }
        }
    }

    /// `ctl list`.
    fn list(&self) -> serde_json::Value {
        let exports: Vec<_> = self.exports.iter().map(describe).collect();
        serde_json::json!({ "exports": exports })
    }

    /// SIGHUP: re-reads the config file and applies the difference (see README.md).
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            warn!("SIGHUP: no config file to reload (started without --config)");
            return;
        };
        info!(config = %path.display(), "Reloading the configuration");
        let new = match crate::config::from_file(&path) {
            Ok(c) => c,
            Err(e) => {
                error!(
                    "Not reloading: {}; the exports are unchanged",
                    crate::error_chain_text(&e)
                );
                return;
            }
        };
        if new.control != self.control_path {
            warn!("A change of the control socket takes a restart; not applied");
        }
        if new.shards != self.shards {
            self.shards = new.shards;
        }
        // Removed from the file: stopped, even with a client connected.
        let gone: Vec<PathBuf> = self
            .exports
            .iter()
            .filter(|e| e.file_config.is_some())
            .filter(|e| {
                !new.exports
                    .iter()
                    .any(|n| same_path(&n.socket, &e.config.socket))
            })
            .map(|e| e.config.socket.clone())
            .collect();
        for socket in gone {
            match self.remove(&socket, true) {
                Ok(()) => info!(socket = %socket.display(), "Reload: export removed"),
                Err(e) => error!(socket = %socket.display(), "Reload: {e}"),
            }
        }
        for cfg in new.exports {
            let Some(index) = self.find(&cfg.socket) else {
                let socket = cfg.socket.clone();
                match self.add(cfg, true) {
                    Ok(()) => info!(socket = %socket.display(), "Reload: export added"),
                    Err(e) => error!(socket = %socket.display(), "Reload: cannot add: {e}"),
                }
                continue;
            };
            if self.exports[index].failed.is_some() {
                let socket = cfg.socket.clone();
                match self.replace_failed(index, cfg, true) {
                    Ok(()) => {
                        info!(socket = %socket.display(), "Reload: failed export started again")
                    }
                    Err(e) => {
                        error!(socket = %socket.display(), "Reload: cannot start the failed export again: {e}")
                    }
                }
                continue;
            }
            let old = self.exports[index]
                .file_config
                .clone()
                .unwrap_or_else(|| self.exports[index].config.clone());
            let settings_changed = ExportConfig {
                limits: old.limits,
                group: old.group.clone(),
                ..cfg.clone()
            } != old;
            if settings_changed {
                warn!(
                    socket = %cfg.socket.display(),
                    "Reload: settings other than limits changed; remove and add the export \
                     to apply them"
                );
            }
            if old.limits != cfg.limits || old.group != cfg.group {
                let result = if cfg.limits.is_none() && cfg.group.is_none() {
                    self.exports[index].throttle.set(None);
                    Ok(())
                } else if cfg.limits.is_none() {
                    let g = self.group_for(cfg.group.as_deref(), cfg.limits);
                    self.exports[index].throttle.set(g);
                    Ok(())
                } else {
                    self.set_limits(index, cfg.group.as_deref(), cfg.limits)
                };
                if let Err(e) = result {
                    error!(socket = %cfg.socket.display(), "Reload: {e}");
                }
            }
            self.exports[index].file_config = Some(cfg);
        }
    }
}

fn no_export(socket: &Path) -> String {
    format!("No export on {}", socket.display())
}

fn failed_export(socket: &Path, why: &str) -> String {
    format!(
        "The export on {} failed ({why}); remove it, or add it again",
        socket.display()
    )
}

/// One export as `ctl list` shows it.
fn describe(e: &Running) -> serde_json::Value {
    let snapshot = e.metrics.as_ref().map(|m| m.snapshot());
    let mut ops = serde_json::Map::new();
    let mut in_flight = 0;
    let mut throttled_seconds = 0.0;
    let mut throttled = 0;
    if let Some(snap) = &snapshot {
        for op in Operation::ALL {
            let o = &snap.ops[op as usize];
            ops.insert(
                op.label().to_owned(),
                serde_json::json!({
                    "requests": o.requests(),
                    "bytes": o.bytes,
                    "errors": o.errors,
                }),
            );
        }
        for s in &snap.shards {
            in_flight += s.in_flight;
            throttled_seconds += s.throttled_seconds;
            throttled += s.throttled;
        }
    }
    let group = e.throttle.group();
    let client = match e.control.client() {
        None => serde_json::Value::Null,
        Some(pid) => serde_json::json!({ "pid": pid }),
    };
    serde_json::json!({
        "socket": e.config.socket,
        "state": if e.failed.is_some() { "failed" } else { "serving" },
        "error": e.failed,
        "image": e.config.image,
        "read_only": e.read_only,
        "writethrough": e.config.writethrough,
        "direct": e.config.direct,
        "overlap_check": e.config.overlap_check,
        "size": e.size,
        "queues": e.config.queues,
        "workers": e.config.shards,
        "serial": e.config.serial,
        "client": client,
        "in_flight": in_flight,
        "ops": ops,
        "throttled_seconds": throttled_seconds,
        "throttled_requests": throttled,
        "group": group.as_ref().and_then(|g| g.name()),
        "limits": group.map(|g| g.limits().to_json()).unwrap_or_else(|| serde_json::json!({})),
    })
}

/// What the file system sandbox leaves reachable: the files of every export, the socket
/// directories, the private directory (and removing it from its parent), systemd's socket.
/// When exports can be added at run time (a control socket, or a config file that SIGHUP
/// re-reads), the config file is readable and the allowed roots of every export (its
/// image's directory and `allow_paths`) and the socket directories are roots: files in them
/// can be read and written, sockets made.
fn fs_policy(
    config: &ServeConfig,
    config_path: Option<&Path>,
    exports: &[(ExportConfig, Image, vhost::vhost_user::Listener)],
    private_dir: &Path,
    parent: &Path,
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
    policy.socket_dirs.push(private_dir.to_path_buf());
    policy.remove_dir_in.push(parent.to_path_buf());
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
            .filter(|d| d != private_dir)
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

/// A directory removed when `serve` returns (it is empty by then).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
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
