//! The supervisor: the set of exports being served and every change to it.
//!
//! Runs on the main thread only. [`Supervisor`] owns each export's [`ExportControl`], metrics
//! and throttle, and handles one message at a time (see [`super::serve`]): starting an export
//! ([`Supervisor::add`], at start-up and for `ctl add`), stopping one ([`Supervisor::remove`]),
//! an export that ended by itself ([`Supervisor::finished`]: an error keeps it listed
//! as failed), control requests ([`Supervisor::handle`]: `list`, `limit`, `resize`), a SIGHUP
//! reload ([`Supervisor::reload`]) and the final stop ([`Supervisor::stop_all`]).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};
use std::time::Instant;

use qcow2d_engine::Image;
use tracing::{error, info, warn};

use super::{announce, device_params, open_image, Event, ServeError, STOP_TIMEOUT};
use crate::config::{ExportConfig, Origin, ServeConfig};
use crate::control::{Request, Response};
use crate::export::{bind_socket, Export, ExportControl, ExportError};
use crate::listen::Listeners;
use crate::metrics::{ExportLabels, ExportMetrics, Metrics, Operation};
use crate::signals;
use crate::throttle::{ExportThrottle, Limits, ThrottleGroup};

/// One export being served.
pub(super) struct Running {
    id: u64,
    config: ExportConfig,
    /// Its configuration as the config file last gave it (`None`: added at run time and not
    /// in the file), which reloads compare with.
    file_config: Option<ExportConfig>,
    control: Arc<ExportControl>,
    metrics: Option<Arc<ExportMetrics>>,
    throttle: Arc<ExportThrottle>,
    size: u64,
    read_only: bool,
    /// Why the export failed while serving (its thread is gone, its socket too); `None` while
    /// it serves.
    pub(super) failed: Option<String>,
}

/// The main thread's state: the exports, their throttle groups and metrics. Every change to the
/// set of exports happens here, one at a time: at start-up, on a control request, on SIGHUP.
pub(super) struct Supervisor {
    pub(super) exports: Vec<Running>,
    pub(super) next_id: u64,
    pub(super) metrics: Option<Arc<Metrics>>,
    /// Named throttle groups that still have an export.
    pub(super) groups: HashMap<String, Weak<ThrottleGroup>>,
    /// The `shards` setting, for exports added later.
    pub(super) shards: Option<u64>,
    /// The top-level `allow_paths`, for exports added later.
    pub(super) allow_paths: Vec<PathBuf>,
    pub(super) config_path: Option<PathBuf>,
    /// What the config file said when last read (at start-up, or by a reload), for the next
    /// reload to tell which of its daemon-wide settings changed.
    pub(super) file_settings: Option<ServeConfig>,
    pub(super) control_path: Option<PathBuf>,
    /// The listener thread, which holds every idle export.
    pub(super) listeners: Listeners,
    pub(super) rx: mpsc::Receiver<Event>,
    /// Events that arrived while waiting for a particular one.
    pub(super) deferred: VecDeque<Event>,
}

/// The same path, whether given relative to the daemon's directory or absolute.
fn same_path(a: &Path, b: &Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Supervisor {
    pub(super) fn keep_running(&self) -> bool {
        self.exports.iter().any(|e| e.failed.is_none()) || self.control_path.is_some()
    }

    pub(super) fn next_event(&mut self) -> Option<Event> {
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
    pub(super) fn start(
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
        let control = Arc::new(ExportControl::new(
            cfg.socket.clone(),
            image,
            self.listeners.waker(),
        ));
        let export = Export::new(
            id,
            cfg.image.clone(),
            params,
            listener,
            Arc::clone(&control),
        );
        if let Err((export, source)) = self.listeners.add(export) {
            // The socket file and the image go with it.
            drop(export);
            if let (Some(all), Some(m)) = (&self.metrics, &metrics) {
                all.remove_export(m);
            }
            return Err(ServeError::Listen {
                socket: cfg.socket.clone(),
                source,
            });
        }
        self.exports.push(Running {
            id,
            file_config: from_file.then(|| cfg.clone()),
            config: cfg,
            control,
            metrics,
            throttle,
            size,
            read_only,
            failed: None,
        });
        Ok(())
    }

    /// Takes an export that finished out of the list.
    fn reap(&mut self, id: u64) -> Option<Running> {
        let index = self.exports.iter().position(|e| e.id == id)?;
        let mut running = self.exports.remove(index);
        if let (Some(all), Some(m)) = (&self.metrics, &running.metrics.take()) {
            all.remove_export(m);
        }
        Some(running)
    }

    /// An export ended without being asked to. Without an error it is gone; with one
    /// it stays in the list as failed, and only it: the other exports are not touched.
    pub(super) fn finished(&mut self, id: u64, result: Result<(), ExportError>) {
        let Some(mut running) = self.reap(id) else {
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

    /// Waits up to `deadline` for export `id` to finish, keeping other events for later; its
    /// result, or `None` if it did not finish in time.
    fn wait_finished(&mut self, id: u64, deadline: Instant) -> Option<Result<(), ExportError>> {
        loop {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(Event::ExportFinished { id: done, result }) if done == id => {
                    return Some(result)
                }
                Ok(other) => self.deferred.push_back(other),
                Err(_) => return None,
            }
        }
    }

    /// Asks every export to stop and waits for them (see [`STOP_TIMEOUT`]). A second stop
    /// signal ends the wait at once; control requests meanwhile are refused. Sockets of
    /// exports that did not finish are removed here (those that did removed their own).
    pub(super) fn stop_all(&mut self) -> Result<(), ServeError> {
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
                Ok(Event::ExportFinished { id, result }) => {
                    let Some(running) = self.reap(id) else {
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
    pub(super) fn handle(&mut self, request: Request) -> Response {
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
        let Some(result) = self.wait_finished(id, Instant::now() + STOP_TIMEOUT) else {
            return Err(format!(
                "{} did not stop within {} s; it will be removed when it does",
                socket.display(),
                STOP_TIMEOUT.as_secs()
            ));
        };
        let Some(running) = self.reap(id) else {
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
    pub(super) fn reload(&mut self) {
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
        if let Some(old) = &self.file_settings {
            let changed = restart_settings_changed(old, &new);
            if !changed.is_empty() {
                warn!(
                    "Reload: a change of {} takes a restart; not applied",
                    changed.join(", ")
                );
            }
        }
        self.file_settings = Some(ServeConfig {
            exports: Vec::new(),
            ..new.clone()
        });
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

/// The config file's keys, among the daemon-wide settings fixed at start-up (threads, sandbox,
/// sockets), whose values differ between `old` and `new`.
fn restart_settings_changed(old: &ServeConfig, new: &ServeConfig) -> Vec<&'static str> {
    [
        ("metrics", old.metrics != new.metrics),
        ("control", old.control != new.control),
        ("seccomp", old.seccomp != new.seccomp),
        ("user", old.user != new.user),
        ("allow_paths", old.allow_paths != new.allow_paths),
        ("nice", old.nice != new.nice),
        ("cache_per_core", old.cache_per_core != new.cache_per_core),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
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
