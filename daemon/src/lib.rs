//! `qcow2d`: serves QCOW2 disk images to virtual machines over vhost-user-blk.
//!
//! The binary (`main.rs`) is [`main`] alone; the library exists so that the parsers of what
//! frontends, guests and users send ([`chain`], [`request`], [`relay`], [`config`]) can be
//! fuzzed and tested from outside the crate. The main thread parses the command line, sets up
//! logging (tracing to stderr, filtered by `RUST_LOG`, default `info`) and runs the
//! subcommand; an error ends the process with a non-zero status after printing its whole cause
//! chain once. Modules:
//! - [`cli`], [`config`]: what to serve;
//! - [`serve`](mod@serve), [`export`], [`signals`], [`notify`]: threads, lifecycle, clean
//!   shutdown, systemd readiness, reload;
//! - [`control`], [`ctl`]: the control socket and its client (`qcow2d ctl`);
//! - [`throttle`], [`timer`]: I/O limits (throttle groups) and the workers' timers;
//! - [`metrics`]: per-worker counters and histograms, the Prometheus scrape endpoint;
//! - [`sandbox`]: seccomp filters per thread, file system confinement, dropping privileges;
//! - [`handler`], [`backend`], [`vring`], [`worker_loop`], [`worker`], [`request`],
//!   [`virtio_blk`], [`block_io`]: the vhost-user-blk device (its request handler, run by the
//!   relay thread; its queues; its workers, run by the core threads) and its data path onto the engine;
//! - [`budget`], [`fdcheck`], [`sigbus`]: what a guest may have in flight, the checks of the
//!   descriptors a frontend hands over, and the SIGBUS handler for guest memory cut short.

mod backend;
mod block_io;
mod budget;
pub mod chain;
mod cli;
pub mod config;
mod control;
mod cores;
mod ctl;
mod export;
mod fdcheck;
mod handler;
pub mod inflight;
mod listen;
mod metrics;
mod notify;
pub mod relay;
pub mod request;
mod sandbox;
mod serve;
mod sigbus;
mod signals;
mod throttle;
mod timer;
mod virtio_blk;
mod vring;
mod worker;
mod worker_loop;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qcow2d_engine::{Image, OpenOptions};
use tracing_subscriber::EnvFilter;

use crate::cli::{CheckArgs, Cli, Command, InfoArgs, ServeArgs};
use crate::config::{ConfigError, RawExport};
use crate::serve::ServeError;
use crate::throttle::Limits;

// The allocator the binary runs on; linked here for `mi_collect`.
extern crate mimalloc;

extern "C" {
    /// mimalloc's `mi_collect` (part of the library the allocator links).
    fn mi_collect(force: bool);
}

/// Gives the memory of freed allocations in the calling thread's heap (and in abandoned
/// ones) back to the system. A connection's shards (caches, pools, arenas) are allocated by
/// the core threads that run its workers and freed by the thread that tears it down:
/// mimalloc keeps such pages until the owning thread collects them, so a teardown calls this
/// and has every core thread call it too (`crate::cores::CorePool::release_freed_memory`).
pub fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) };
}

/// Why `qcow2d` failed.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// `qcow2d info` could not open the image.
    #[error("Cannot open image {}", path.display())]
    Info {
        /// The image.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: qcow2d_engine::Error,
    },
    /// `qcow2d info --json` could not encode the result.
    #[error("Cannot encode the image information as JSON")]
    Json(#[source] serde_json::Error),
    /// `qcow2d ctl` failed.
    #[error(transparent)]
    Ctl(#[from] ctl::CtlError),
    /// `qcow2d check` could not complete.
    #[error("Cannot check image {}", path.display())]
    Check {
        /// The image.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: qcow2d_engine::Error,
    },
}

/// The whole `qcow2d` command: parses the command line, sets up logging, runs the subcommand
/// and turns an error into its printed cause chain and a failure status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand; the exit status on success (`check` reports findings through it).
fn run(cli: Cli) -> Result<u8, Error> {
    match cli.command {
        Command::Serve(args) => serve(*args).map(|()| 0),
        Command::Info(args) => info(args).map(|()| 0),
        Command::Check(args) => check(args),
        Command::Ctl(args) => ctl::run(*args).map(|()| 0).map_err(Error::from),
    }
}

fn check(args: CheckArgs) -> Result<u8, Error> {
    let failed = |source| Error::Check {
        path: args.image.clone(),
        source,
    };
    // The check reads the image alone, but its backing chain and data file must be files the
    // image may name, as for `serve` and `info`.
    let options = OpenOptions {
        allowed_roots: args.allow.allow_path.clone(),
        ..OpenOptions::default()
    };
    qcow2d_engine::verify_named_files(&args.image, &options).map_err(failed)?;
    let report = qcow2d_engine::check(&args.image, args.repair).map_err(failed)?;
    for line in &report.messages {
        eprintln!("{line}");
    }
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(Error::Json)?;
        println!("{text}");
    } else {
        println!("{}", report.to_string().trim_end());
    }
    // exit_code() is one of 0, 1, 2 and 3.
    Ok(u8::try_from(report.exit_code()).unwrap_or(1))
}

fn serve(args: ServeArgs) -> Result<(), Error> {
    let mut limits = Limits::default();
    for (key, value) in args.limits.entries() {
        limits
            .set(key, value)
            .map_err(|problem| ConfigError::Invalid {
                origin: config::Origin::CommandLine,
                problem,
            })?;
    }
    if args.config.is_some() && args.limits.any() {
        return Err(ConfigError::Invalid {
            origin: config::Origin::CommandLine,
            problem: "Limits and --group go with --image; in a config file they are keys of \
                      each [[export]]"
                .into(),
        }
        .into());
    }
    let config_path = args
        .config
        .as_deref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()));
    let mut config = match &config_path {
        Some(path) => config::from_file(path)?,
        None if args.image.is_none() && args.socket.is_none() => {
            // Only a control socket (clap requires one): exports come from `qcow2d ctl add`.
            config::ServeConfig {
                exports: Vec::new(),
                metrics: None,
                control: None,
                shards: args.shards,
                seccomp: Default::default(),
                nice: None,
                cache_per_core: None,
                user: None,
                allow_paths: args
                    .allow
                    .allow_path
                    .iter()
                    .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                    .collect(),
            }
        }
        None => {
            let raw = RawExport {
                limits,
                group: args.limits.group.clone(),
                // clap requires both unless --config is given.
                image: args.image.unwrap_or_default(),
                socket: args.socket.unwrap_or_default(),
                read_only: args.export.read_only,
                writethrough: args.export.writethrough,
                lazy_refcounts: args.export.lazy_refcounts,
                direct: args.export.direct,
                queues: args.export.queues,
                serial: args.export.serial,
                overlap_check: args.overlap_check,
                allow_paths: args.allow.allow_path,
                inflight_bytes: args.inflight_bytes,
                inflight_requests: args.inflight_requests,
                shard_inflight_bytes: args.shard_inflight_bytes,
                shard_inflight_requests: args.shard_inflight_requests,
            };
            config::from_command_line(raw, args.shards)?
        }
    };
    // The file's own settings, which a reload compares the file's next ones with (the
    // command line's overrides below are not the file's).
    let file_settings = config_path.as_ref().map(|_| config::ServeConfig {
        exports: Vec::new(),
        ..config.clone()
    });
    if let Some(value) = &args.metrics {
        config.metrics = Some(config::metrics_address(value, None)?);
    }
    if let Some(control) = args.control {
        config.control = Some(control);
    }
    if let Some(value) = &args.seccomp {
        config.seccomp = config::seccomp_mode(value, None)?;
    }
    if let Some(user) = args.user {
        config.user = Some(user);
    }
    if let Some(value) = args.nice {
        config.nice = Some(config::nice_value(value, None)?);
    }
    if let Some(value) = &args.cache_per_core {
        config.cache_per_core = Some(config::cache_per_core_value(value, None)?);
    }
    serve::serve(config, config_path.zip(file_settings))?;
    Ok(())
}

fn info(args: InfoArgs) -> Result<(), Error> {
    let options = OpenOptions {
        read_only: true,
        allowed_roots: args.allow.allow_path,
        ..OpenOptions::default()
    };
    let image = Image::open(&args.image, &options).map_err(|source| Error::Info {
        path: args.image.clone(),
        source,
    })?;
    let info = image.info();
    if args.json {
        let text = serde_json::to_string_pretty(&info).map_err(Error::Json)?;
        println!("{text}");
    } else {
        println!("{}", info.to_string().trim_end());
    }
    Ok(())
}

fn init_logging() {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, None),
        Err(e) => {
            let bad = std::env::var(EnvFilter::DEFAULT_ENV)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (v, e));
            (EnvFilter::new("info"), bad)
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some((value, e)) = bad_filter {
        tracing::warn!("Ignoring RUST_LOG={value:?} ({e}); logging at info level");
    }
}

/// Every message of the chain on one line, separated by `: ` (for control answers).
fn error_chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// `Error: <message>` then one `  caused by: <message>` line per source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = format!("Error: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_prints_every_cause_once() {
        let e = Error::Config(ConfigError::Read {
            path: "/nonexistent.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(
            error_chain(&e),
            "Error: Cannot read config file /nonexistent.toml\n  caused by: entity not found"
        );
    }
}
