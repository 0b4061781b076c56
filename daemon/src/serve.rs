//! `qcow2d serve`: opens the images, creates the sockets, runs one listener thread per export
//! and stops them all on SIGINT/SIGTERM or when one fails.
//!
//! Everything here runs on the main thread. Start-up is all-or-nothing: every image is opened
//! (for writing unless the export is read-only), every socket bound and the metrics endpoint
//! (`--metrics`) listening before the first "serving" line is printed. Then the main thread
//! only waits for messages: a stop signal (from the signal thread) or the end of an export
//! thread. Stopping asks every export to stop; each export thread disconnects its client,
//! drains and flushes its shards and closes its image ([`Export::run`]). An export that fails
//! to do so, or that does not finish within [`STOP_TIMEOUT`] (a stuck disk), makes `serve`
//! fail, so the process exits non-zero.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2d_engine::{Image, OpenOptions};
use tracing::{error, info, warn};

use crate::backend::DeviceParams;
use crate::config::{ExportConfig, ServeConfig};
use crate::export::{bind_socket, Export, ExportControl, ExportError, SocketError};
use crate::metrics::{ExportLabels, Metrics};
use crate::request::DeviceInfo;
use crate::signals;
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
    ExportFinished {
        index: usize,
        result: Result<(), ExportError>,
    },
}

fn signal_event(signal: libc::c_int) -> Event {
    Event::Signal(signal)
}

/// Runs `qcow2d serve` until stopped. Returns `Ok` after a clean stop on SIGINT/SIGTERM.
pub fn serve(config: ServeConfig) -> Result<(), ServeError> {
    // Before any other thread exists, so that they all inherit the mask.
    let stop_signals = signals::block_stop_signals().map_err(ServeError::Signals)?;

    // Open every image first: nothing is listening if one of them is bad.
    let mut opened = Vec::with_capacity(config.exports.len());
    for export in &config.exports {
        let options = OpenOptions {
            read_only: export.read_only,
            lazy_refcounts: export.lazy_refcounts,
            direct: export.direct,
            // Inflate workers take the CPUs the shards leave; with a shard per CPU each shard
            // inflates its own clusters, which measured faster (no hand-off to another
            // thread, no more threads than CPUs).
            inflate_threads: Some(crate::config::cpu_count().saturating_sub(export.shards)),
            ..OpenOptions::default()
        };
        let image =
            Image::open(&export.image, &options).map_err(|source| ServeError::OpenImage {
                path: export.image.clone(),
                source,
            })?;
        opened.push(image);
    }

    let mut metrics = config.metrics.map(|_| Metrics::new());
    let mut exports = Vec::with_capacity(opened.len());
    for (index, (cfg, image)) in config.exports.iter().zip(opened).enumerate() {
        let listener = bind_socket(&cfg.socket)?;
        let mut params = device_params(cfg, &image);
        if let Some(metrics) = &mut metrics {
            let labels = ExportLabels {
                export: cfg.socket.display().to_string(),
                image: cfg.image.display().to_string(),
                serial: cfg.serial.clone(),
                read_only: image.is_read_only(),
            };
            params.metrics = Some(metrics.add_export(labels, params.shards));
        }
        exports.push(Export {
            params,
            image,
            image_path: cfg.image.clone(),
            listener,
            control: Arc::new(ExportControl::new(cfg.socket.clone())),
            thread_name: format!("qcow2d-vu{index}"),
        });
    }
    if let (Some(addr), Some(metrics)) = (config.metrics, metrics) {
        serve_metrics(addr, metrics)?;
    }
    announce(&config.exports);

    let (tx, rx) = mpsc::channel();
    signals::spawn_signal_thread(stop_signals, tx.clone(), signal_event)
        .map_err(ServeError::Thread)?;

    let controls: Vec<_> = exports.iter().map(|e| Arc::clone(&e.control)).collect();
    let sockets: Vec<PathBuf> = config.exports.iter().map(|e| e.socket.clone()).collect();
    let mut running = vec![false; exports.len()];
    for (index, export) in exports.into_iter().enumerate() {
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("qcow2d-export{index}"))
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| export.run()))
                        .unwrap_or(Err(ExportError::Panicked));
                let _ = tx.send(Event::ExportFinished { index, result });
            });
        match spawned {
            Ok(_) => running[index] = true,
            Err(e) => {
                stop_all(&controls);
                return wait_for_exports(
                    &rx,
                    &sockets,
                    &mut running,
                    Instant::now() + STOP_TIMEOUT,
                )
                .and(Err(ServeError::Thread(e)));
            }
        }
    }
    drop(tx);

    // Serve until a signal, or until an export fails.
    let mut first_error = None;
    while running.iter().any(|&r| r) {
        let Ok(event) = rx.recv() else { break };
        match event {
            Event::Signal(signal) => {
                info!("Received {}, stopping", signals::signal_name(signal));
                break;
            }
            Event::ExportFinished { index, result } => {
                running[index] = false;
                match result {
                    Ok(()) => warn!(socket = %sockets[index].display(), "Export stopped"),
                    Err(source) => {
                        error!(socket = %sockets[index].display(), "Export failed: {source}");
                        first_error = Some(ServeError::Export {
                            socket: sockets[index].clone(),
                            source,
                        });
                        break;
                    }
                }
            }
        }
    }
    crate::notify::notify("STOPPING=1");
    stop_all(&controls);
    let stopped = wait_for_exports(&rx, &sockets, &mut running, Instant::now() + STOP_TIMEOUT);
    match first_error {
        Some(e) => Err(e),
        None => stopped,
    }
}

fn device_params(cfg: &ExportConfig, image: &Image) -> DeviceParams {
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
    }
}

/// Starts the metrics endpoint on `addr` and prints `qcow2d: metrics on http://ADDR/metrics`
/// with the address it listens on (which tells the port when `addr` asked for port 0).
fn serve_metrics(addr: SocketAddr, metrics: Metrics) -> Result<(), ServeError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| ServeError::Metrics { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Metrics { addr, source })?;
    crate::metrics::http::spawn(listener, Arc::new(metrics)).map_err(ServeError::Thread)?;
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

fn stop_all(controls: &[Arc<ExportControl>]) {
    for c in controls {
        c.request_stop();
    }
}

/// Waits until every running export thread has finished, or the deadline passes. A second
/// stop signal ends the wait at once. Sockets of exports that did not finish are removed here
/// (those that did removed their own).
fn wait_for_exports(
    rx: &mpsc::Receiver<Event>,
    sockets: &[PathBuf],
    running: &mut [bool],
    deadline: Instant,
) -> Result<(), ServeError> {
    let mut outcome = Ok(());
    while running.iter().any(|&r| r) {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(timeout) {
            Ok(Event::ExportFinished { index, result }) => {
                running[index] = false;
                if let Err(source) = result {
                    error!(
                        socket = %sockets[index].display(),
                        "Export failed while stopping: {}",
                        crate::error_chain(&source)
                    );
                    if outcome.is_ok() {
                        outcome = Err(ServeError::Export {
                            socket: sockets[index].clone(),
                            source,
                        });
                    }
                }
            }
            Ok(Event::Signal(signal)) => {
                outcome = Err(ServeError::Forced {
                    signal: signals::signal_name(signal),
                });
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome = Err(ServeError::StopTimeout {
                    count: running.iter().filter(|&&r| r).count(),
                });
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for (socket, _) in sockets.iter().zip(running.iter()).filter(|(_, &r)| r) {
        let _ = std::fs::remove_file(socket);
    }
    outcome
}
