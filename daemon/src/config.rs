//! What to serve: the exports, from the command line or from a TOML config file, validated
//! into typed values before any image or socket is opened.
//!
//! Runs on the main thread at start-up. A config file looks like:
//!
//! ```toml
//! shards = 4              # optional: workers (engine shards) per connection
//! metrics = "127.0.0.1:9187"  # optional: serve Prometheus metrics on http://ADDR/metrics
//! control = "/run/qcow2d/control.sock"  # optional: the control socket (`qcow2d ctl`)
//! overlap_check = "cached"    # optional: default of every export (see below)
//! allow_paths = ["/var/lib/images/base"]  # optional: for every export (see below)
//! seccomp = "kill"        # optional: kill (default), trap, log or none (see crate::sandbox)
//! user = "qcow2d:kvm"     # optional: serve as this USER[:GROUP] once set up (start as root)
//! nice = -5             # optional: the daemon's threads' nice value, -20..19 (default -5)
//! cache_per_core = "256M"  # optional: L2 and decompressed-cluster cache per core thread
//!
//! [[export]]
//! image = "/var/lib/images/vm1.qcow2"
//! socket = "/run/qcow2d/vm1.sock"
//! read_only = true        # optional, default false: the image is opened for writing
//! writethrough = true     # optional, default false: every write durable before it completes
//! lazy_refcounts = true   # optional, default false: refcounts written at clean close only
//! direct = true           # optional, default false: guest data with O_DIRECT (no page cache)
//! queues = 4              # optional, default max(16, CPUs), at most 64
//! serial = "vm1-disk0"    # optional, at most 20 bytes; default: the image's file name
//! iops_total = 500        # optional I/O limits (see crate::throttle): iops_total, iops_read,
//! iops_total_max = 2000   #   iops_write, bps_total, bps_read, bps_write, each with _max
//! iops_total_max_length = 5  # (burst rate) and _max_length (burst seconds)
//! group = "tenant1"       # optional: share the limits with the group's other exports
//! overlap_check = "all"   # optional: none | constant | cached | all, default "cached"
//! allow_paths = ["/srv/templates"]  # optional, added to the top-level list
//! inflight_bytes = "256M"       # optional: data in flight per connection (bytes, or K/M/G)
//! inflight_requests = 4096      # optional: requests in flight per connection
//! shard_inflight_bytes = "64M"  # optional: data in flight per worker (shard)
//! shard_inflight_requests = 1024  # optional: requests in flight per worker
//! ```
//!
//! Files an image names (backing files at any depth, external data files) must be regular
//! files under the image's own directory or under a directory of `allow_paths`: the top-level
//! list applies to every export, an export's own list to that export in addition.
//! [`ExportConfig::allowed_roots`] holds the result for each export.
//!
//! The in-flight budgets bound what one guest can make the daemon hold: while a connection or
//! one of its workers is at its limit, no more chains are taken from the guest's queues until
//! requests complete (see `crate::budget`).
//!
//! Each worker of a connection owns one engine shard (and runs on a core thread, see
//! `crate::cores`). The caches of the shards on one core thread (L2 tables, decompressed
//! clusters) draw from one budget, `cache_per_core`, whatever the number of exports, each
//! shard entitled to an equal share of it; each shard also keeps within its own limits and
//! holds a floor of a few slots whatever the budget (see the engine's `CacheBudget`). The
//! shards of a writable image share out its L2 tables and pass each other the pieces of
//! requests they do not own (see the engine's `shard` module); those of a read-only image are
//! independent.
//!
//! Relative paths in a config file are relative to the directory of that file. Unknown keys
//! are errors, reported with their line and column.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use qcow2d_engine::OverlapCheck;
use serde::Deserialize;

use crate::budget::{Budgets, Limits as BudgetLimits};
use crate::sandbox::SeccompMode;
use crate::throttle::Limits;
use crate::virtio_blk::{ID_BYTES, MAX_QUEUES};

/// Smallest byte budget accepted.
const MIN_BUDGET_BYTES: u64 = 1 << 20;

/// Most workers (shards) an export may ask for: one per queue at most, and the engine
/// groups up to 64 shards.
const MAX_SHARDS: u64 = MAX_QUEUES as u64;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("Cannot read config file {}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or does not match the schema.
    #[error("Invalid config file {}{location}: {message}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// Where in the file.
        location: Location,
        /// What is wrong there.
        message: String,
    },
    /// The config file has no `[[export]]` (and no control socket to add one later).
    #[error("Config file {} defines no [[export]] and no control socket", path.display())]
    NoExports {
        /// The config file.
        path: PathBuf,
    },
    /// The metrics address is not an IP address and port.
    #[error(
        "{place}: invalid metrics address {value:?}: expected IP:PORT, such as 127.0.0.1:9187"
    )]
    MetricsAddress {
        /// `Command line` or `Config file <path>`.
        place: String,
        /// The value given.
        value: String,
    },
    /// The nice value is out of range.
    #[error("{place}: invalid nice {value}: expected a nice value from -20 to 19")]
    Nice {
        /// `Command line` or `Config file <path>`.
        place: String,
        /// The value given.
        value: i64,
    },
    /// The seccomp mode is not one of the known ones.
    #[error("{place}: invalid seccomp mode {value:?}: expected kill, trap, log or none")]
    SeccompMode {
        /// `Command line` or `Config file <path>`.
        place: String,
        /// The value given.
        value: String,
    },
    /// The cache size per core is not a size.
    #[error(
        "{place}: invalid cache_per_core {value:?}: expected bytes, or a size with a K, M, G \
         or T suffix"
    )]
    CacheSize {
        /// `Command line` or `Config file <path>`.
        place: String,
        /// The value given.
        value: String,
    },
    /// A value is out of range or malformed.
    #[error("{origin}: {problem}")]
    Invalid {
        /// Which export (and where it was defined).
        origin: Origin,
        /// What is wrong.
        problem: String,
    },
}

/// A line and column in a config file (1-based), or nothing when the parser gave no position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location(pub Option<(usize, usize)>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ", line {line}, column {column}"),
            None => Ok(()),
        }
    }
}

/// Where an export was defined, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `qcow2d serve --image ... --socket ...`.
    CommandLine,
    /// The n-th (1-based) `[[export]]` of a config file.
    File {
        /// The config file.
        path: PathBuf,
        /// 1-based index of the export.
        index: usize,
    },
    /// An `add` request on the control socket.
    Control,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::CommandLine => f.write_str("Command line"),
            Origin::Control => f.write_str("Export"),
            Origin::File { path, index } => {
                write!(f, "Export {index} in config file {}", path.display())
            }
        }
    }
}

/// One validated export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// The QCOW2 image.
    pub image: PathBuf,
    /// The vhost-user unix socket to listen on.
    pub socket: PathBuf,
    /// Whether the user asked for a read-only export.
    pub read_only: bool,
    /// Whether every write is made durable before it completes (the write cache starts off;
    /// the driver may turn it on).
    pub writethrough: bool,
    /// Whether to open the image with lazy refcounts.
    pub lazy_refcounts: bool,
    /// Whether guest data bypasses the page cache (O_DIRECT).
    pub direct: bool,
    /// Number of virtqueues offered.
    pub queues: u16,
    /// Workers (engine shards) per connection: never more than `queues`.
    pub shards: usize,
    /// GET_ID answer, at most 20 bytes.
    pub serial: String,
    /// I/O limits (of the group, when `group` is set; all zero: none given here).
    pub limits: Limits,
    /// The throttle group whose limits the export shares.
    pub group: Option<String>,
    /// Which metadata every write is checked against.
    pub overlap_check: OverlapCheck,
    /// The directories the image and the files it names may lie under: the image's own
    /// directory first, then the export's `allow_paths` (or `--allow-path`) after the
    /// config file's top-level ones. Absolute, not yet resolved (the engine resolves symlinks
    /// and `..` when it opens the image).
    pub allowed_roots: Vec<PathBuf>,
    /// What one connection, and each of its workers, may have in flight.
    pub budgets: Budgets,
}

/// Everything `qcow2d serve` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// The exports, each served by its own listener thread.
    pub exports: Vec<ExportConfig>,
    /// Where to serve metrics over HTTP, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Where to listen for `qcow2d ctl`, if anywhere.
    pub control: Option<PathBuf>,
    /// The `shards` setting, for exports added at run time.
    pub shards: Option<u64>,
    /// What a system call outside a thread's seccomp filter does.
    pub seccomp: SeccompMode,
    /// `USER[:GROUP]` to serve as once set up.
    pub user: Option<String>,
    /// The config file's top-level `allow_paths` (or `--allow-path` of a daemon started with
    /// only a control socket), absolute: they apply to exports added at run time too, and
    /// are roots of the file system sandbox even when no export is configured.
    pub allow_paths: Vec<PathBuf>,
    /// The nice value the daemon's threads run at (set before it drops privileges); `None`:
    /// [`DEFAULT_NICE`] where the daemon may lower its nice value, else what it has.
    pub nice: Option<i32>,
    /// Bytes of engine cache (L2 tables and decompressed clusters) the shards on one core
    /// thread share; `None`: [`DEFAULT_CACHE_PER_CORE_BYTES`].
    pub cache_per_core: Option<u64>,
}

/// The cache each core thread's shards share unless configured: an L2 cache covering 2 TiB of
/// guest data in 64 KiB clusters, shared by every export served there.
pub const DEFAULT_CACHE_PER_CORE_BYTES: u64 = 256 << 20;

/// Checks a cache size per core (`--cache-per-core`, `cache_per_core`; `file`: the config
/// file, if from one): bytes, or a size with a K, M, G or T suffix; 0 leaves each shard its
/// floor.
pub fn cache_per_core_value(text: &str, file: Option<&Path>) -> Result<u64, ConfigError> {
    parse_size(text).ok_or_else(|| ConfigError::CacheSize {
        place: place(file),
        value: text.to_owned(),
    })
}

/// The daemon's nice value unless configured: above the guests' vCPU threads (nice 0), since
/// each core thread serves the I/O of every VM placed on it and a preempted one holds up all
/// of them.
pub const DEFAULT_NICE: i32 = -5;

/// Checks a nice value (`--nice`, `nice`; `file`: the config file, if from one).
pub fn nice_value(value: i64, file: Option<&Path>) -> Result<i32, ConfigError> {
    match i32::try_from(value) {
        Ok(v) if (-20..=19).contains(&v) => Ok(v),
        _ => Err(ConfigError::Nice {
            place: place(file),
            value,
        }),
    }
}

/// Export settings as given, before validation.
#[derive(Clone, Debug, Default)]
pub struct RawExport {
    /// Image path.
    pub image: PathBuf,
    /// Socket path.
    pub socket: PathBuf,
    /// `read_only` / `--read-only`.
    pub read_only: bool,
    /// `writethrough` / `--writethrough`.
    pub writethrough: bool,
    /// `lazy_refcounts` / `--lazy-refcounts`.
    pub lazy_refcounts: bool,
    /// `direct` / `--direct`.
    pub direct: bool,
    /// `queues` / `--queues`.
    pub queues: Option<u64>,
    /// `serial` / `--serial`.
    pub serial: Option<String>,
    /// The limit keys / flags.
    pub limits: Limits,
    /// `group` / `--group`.
    pub group: Option<String>,
    /// `overlap_check` / `--overlap-check`.
    pub overlap_check: Option<OverlapCheck>,
    /// `allow_paths` (top level, then the export's) / `--allow-path`, as given.
    pub allow_paths: Vec<PathBuf>,
    /// `inflight_bytes` / `--inflight-bytes`, as given (bytes, or with a K/M/G suffix).
    pub inflight_bytes: Option<String>,
    /// `inflight_requests` / `--inflight-requests`.
    pub inflight_requests: Option<u64>,
    /// `shard_inflight_bytes` / `--shard-inflight-bytes`.
    pub shard_inflight_bytes: Option<String>,
    /// `shard_inflight_requests` / `--shard-inflight-requests`.
    pub shard_inflight_requests: Option<u64>,
}

/// A size in a config file: a number of bytes, or a string with a K, M or G suffix.
#[derive(Deserialize)]
#[serde(untagged)]
enum FileSize {
    Bytes(u64),
    Text(String),
}

impl FileSize {
    fn into_text(self) -> String {
        match self {
            FileSize::Bytes(n) => n.to_string(),
            FileSize::Text(t) => t,
        }
    }
}

/// Parses a size: a number of bytes, optionally followed by K, M, G or T (powers of 1024,
/// with an optional `iB` or `B`). `None` when malformed or too large.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    shards: Option<u64>,
    metrics: Option<String>,
    control: Option<PathBuf>,
    overlap_check: Option<OverlapCheck>,
    seccomp: Option<String>,
    user: Option<String>,
    nice: Option<i64>,
    cache_per_core: Option<FileSize>,
    #[serde(default)]
    allow_paths: Vec<PathBuf>,
    #[serde(default)]
    export: Vec<FileExport>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    image: PathBuf,
    socket: PathBuf,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    writethrough: bool,
    #[serde(default)]
    lazy_refcounts: bool,
    #[serde(default)]
    direct: bool,
    queues: Option<u64>,
    serial: Option<String>,
    overlap_check: Option<OverlapCheck>,
    group: Option<String>,
    #[serde(default)]
    allow_paths: Vec<PathBuf>,
    #[serde(default)]
    iops_total: u64,
    #[serde(default)]
    iops_total_max: u64,
    #[serde(default)]
    iops_total_max_length: u64,
    #[serde(default)]
    iops_read: u64,
    #[serde(default)]
    iops_read_max: u64,
    #[serde(default)]
    iops_read_max_length: u64,
    #[serde(default)]
    iops_write: u64,
    #[serde(default)]
    iops_write_max: u64,
    #[serde(default)]
    iops_write_max_length: u64,
    #[serde(default)]
    bps_total: u64,
    #[serde(default)]
    bps_total_max: u64,
    #[serde(default)]
    bps_total_max_length: u64,
    #[serde(default)]
    bps_read: u64,
    #[serde(default)]
    bps_read_max: u64,
    #[serde(default)]
    bps_read_max_length: u64,
    #[serde(default)]
    bps_write: u64,
    #[serde(default)]
    bps_write_max: u64,
    #[serde(default)]
    bps_write_max_length: u64,
    inflight_bytes: Option<FileSize>,
    inflight_requests: Option<u64>,
    shard_inflight_bytes: Option<FileSize>,
    shard_inflight_requests: Option<u64>,
}

impl FileExport {
    fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        for (key, value) in crate::throttle::limit_fields!(self) {
            // Every key of the list is one of Limits' keys.
            let _ = limits.set(key, value);
        }
        limits
    }
}

/// The machine's CPU count (at least 1).
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Default queue count: QEMU's vhost-user-blk-pci asks for one queue per vCPU, so offer at
/// least 16 and at least one per host CPU, at most 64.
pub fn default_queues(cpus: usize) -> u16 {
    let cpus = u16::try_from(cpus).unwrap_or(u16::MAX);
    cpus.clamp(16, MAX_QUEUES)
}

/// Builds the configuration of `qcow2d serve --image ... --socket ...`.
pub fn from_command_line(raw: RawExport, shards: Option<u64>) -> Result<ServeConfig, ConfigError> {
    let export = validate(raw, shards, cpu_count(), &Origin::CommandLine)?;
    Ok(ServeConfig {
        exports: vec![export],
        metrics: None,
        control: None,
        shards,
        seccomp: SeccompMode::default(),
        nice: None,
        cache_per_core: None,
        user: None,
        allow_paths: Vec::new(),
    })
}

/// Parses the metrics address of `--metrics` (`file`: `None`) or of a config file's `metrics`
/// key: an IP address and a port (port 0 picks a free one).
pub fn metrics_address(value: &str, file: Option<&Path>) -> Result<SocketAddr, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::MetricsAddress {
            place: place(file),
            value: value.to_owned(),
        })
}

/// Parses the seccomp mode of `--seccomp` (`file`: `None`) or of a config file's `seccomp`
/// key.
pub fn seccomp_mode(value: &str, file: Option<&Path>) -> Result<SeccompMode, ConfigError> {
    SeccompMode::parse(value.trim()).ok_or_else(|| ConfigError::SeccompMode {
        place: place(file),
        value: value.to_owned(),
    })
}

/// Where a top-level value came from, for its error: `Command line` or `Config file <path>`.
fn place(file: Option<&Path>) -> String {
    match file {
        Some(path) => format!("Config file {}", path.display()),
        None => "Command line".to_owned(),
    }
}

/// Reads and validates a config file.
pub fn from_file(path: &Path) -> Result<ServeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path, cpu_count())
}

/// Parses and validates config `text` read from `path` on a machine with `cpus` CPUs.
pub fn parse(text: &str, path: &Path, cpus: usize) -> Result<ServeConfig, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        location: Location(e.span().map(|span| line_column(text, span.start))),
        message: e.message().trim_end().to_owned(),
    })?;
    // With a control socket, exports may all come later from `qcow2d ctl add`.
    if file.export.is_empty() && file.control.is_none() {
        return Err(ConfigError::NoExports {
            path: path.to_owned(),
        });
    }
    let base = path.parent().unwrap_or(Path::new(""));
    let mut exports: Vec<ExportConfig> = Vec::with_capacity(file.export.len());
    let mut sockets = HashSet::new();
    for (i, e) in file.export.into_iter().enumerate() {
        let origin = Origin::File {
            path: path.to_owned(),
            index: i + 1,
        };
        let limits = e.limits();
        let raw = RawExport {
            limits,
            group: e.group,
            image: base.join(e.image),
            socket: base.join(e.socket),
            read_only: e.read_only,
            writethrough: e.writethrough,
            lazy_refcounts: e.lazy_refcounts,
            direct: e.direct,
            queues: e.queues,
            serial: e.serial,
            overlap_check: e.overlap_check.or(file.overlap_check),
            allow_paths: file
                .allow_paths
                .iter()
                .chain(&e.allow_paths)
                // An empty path stays empty, for validation to refuse.
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        PathBuf::new()
                    } else {
                        base.join(p)
                    }
                })
                .collect(),
            inflight_bytes: e.inflight_bytes.map(FileSize::into_text),
            inflight_requests: e.inflight_requests,
            shard_inflight_bytes: e.shard_inflight_bytes.map(FileSize::into_text),
            shard_inflight_requests: e.shard_inflight_requests,
        };
        let export = validate(raw, file.shards, cpus, &origin)?;
        if !sockets.insert(export.socket.clone()) {
            return Err(ConfigError::Invalid {
                origin,
                problem: format!(
                    "Socket {} is already used by another export",
                    export.socket.display()
                ),
            });
        }
        if let Some(group) = &export.group {
            let other = exports
                .iter()
                .find(|o| o.group.as_ref() == Some(group) && !o.limits.is_none());
            if let Some(other) = other {
                if !export.limits.is_none() && other.limits != export.limits {
                    return Err(ConfigError::Invalid {
                        origin,
                        problem: format!(
                            "Group {group:?} has other limits in the export of {}",
                            other.socket.display()
                        ),
                    });
                }
            }
        }
        exports.push(export);
    }
    let metrics = file
        .metrics
        .map(|value| metrics_address(&value, Some(path)))
        .transpose()?;
    let seccomp = match file.seccomp {
        Some(value) => seccomp_mode(&value, Some(path))?,
        None => SeccompMode::default(),
    };
    let control = file.control.map(|c| base.join(c));
    if let Some(control) = &control {
        if sockets.contains(control) {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                location: Location(None),
                message: format!(
                    "the control socket {} is also an export's socket",
                    control.display()
                ),
            });
        }
    }
    let allow_paths = file
        .allow_paths
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| base.join(p))
        .collect();
    let nice = file
        .nice
        .map(|value| nice_value(value, Some(path)))
        .transpose()?;
    let cache_per_core = file
        .cache_per_core
        .map(|value| cache_per_core_value(&value.into_text(), Some(path)))
        .transpose()?;
    Ok(ServeConfig {
        exports,
        metrics,
        control,
        shards: file.shards,
        seccomp,
        user: file.user,
        allow_paths,
        nice,
        cache_per_core,
    })
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Checks one export's settings (`shards`: the top-level setting) into an [`ExportConfig`].
pub fn validate(
    raw: RawExport,
    shards: Option<u64>,
    cpus: usize,
    origin: &Origin,
) -> Result<ExportConfig, ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        origin: origin.clone(),
        problem,
    };
    if raw.image.as_os_str().is_empty() {
        return Err(invalid("The image path is empty".into()));
    }
    if raw.socket.as_os_str().is_empty() {
        return Err(invalid("The socket path is empty".into()));
    }
    if raw.read_only {
        for (set, name) in [
            (raw.writethrough, "writethrough"),
            (raw.lazy_refcounts, "lazy_refcounts"),
        ] {
            if set {
                return Err(invalid(format!(
                    "{name} applies to writable exports only, and this one is read-only"
                )));
            }
        }
    }
    let queues = match raw.queues {
        None => default_queues(cpus),
        Some(q) if (1..=u64::from(MAX_QUEUES)).contains(&q) => q as u16,
        Some(q) => {
            return Err(invalid(format!(
                "Queue count must be between 1 and {MAX_QUEUES}, not {q}"
            )))
        }
    };
    let shards = match shards {
        None => cpus,
        Some(s) if (1..=MAX_SHARDS).contains(&s) => s as usize,
        Some(s) => {
            return Err(invalid(format!(
                "Shard count must be between 1 and {MAX_SHARDS}, not {s}"
            )))
        }
    };
    // A worker without a queue would have nothing to do.
    let shards = shards.clamp(1, usize::from(queues));
    let budgets = validate_budgets(&raw, &invalid)?;
    let serial = match raw.serial {
        Some(s) => {
            if s.len() > ID_BYTES {
                return Err(invalid(format!(
                    "Serial {s:?} is {} bytes long; at most {ID_BYTES} fit",
                    s.len()
                )));
            }
            if s.contains('\0') {
                return Err(invalid("Serial contains a NUL character".into()));
            }
            s
        }
        None => default_serial(&raw.image),
    };
    raw.limits.validate().map_err(invalid)?;
    if let Some(group) = &raw.group {
        if group.is_empty() || group.len() > 64 || group.chars().any(char::is_control) {
            return Err(invalid(format!(
                "Group name {group:?} must be 1 to 64 bytes without control characters"
            )));
        }
    }
    let allowed_roots = allowed_roots(&raw.image, &raw.allow_paths).map_err(invalid)?;
    Ok(ExportConfig {
        limits: raw.limits,
        group: raw.group,
        image: raw.image,
        socket: raw.socket,
        read_only: raw.read_only,
        writethrough: raw.writethrough,
        lazy_refcounts: raw.lazy_refcounts,
        direct: raw.direct,
        queues,
        shards,
        serial,
        // QEMU's default: what is known without reading tables from the disk.
        overlap_check: raw.overlap_check.unwrap_or_default(),
        allowed_roots,
        budgets,
    })
}

/// The in-flight budgets of an export: the defaults, or what was given (a byte budget of at
/// least 1 MiB; a request larger than the budget is still served, alone).
fn validate_budgets(
    raw: &RawExport,
    invalid: &dyn Fn(String) -> ConfigError,
) -> Result<Budgets, ConfigError> {
    let defaults = Budgets::default();
    let bytes = |value: &Option<String>, name: &str, default: u64| match value {
        None => Ok(default),
        Some(text) => match parse_size(text) {
            Some(n) if n >= MIN_BUDGET_BYTES => Ok(n),
            Some(n) => Err(invalid(format!(
                "{name} must be at least 1M, not {n} bytes"
            ))),
            None => Err(invalid(format!(
                "{name} {text:?} is not a size (bytes, or a number with K, M or G)"
            ))),
        },
    };
    let requests = |value: Option<u64>, name: &str, default: u32| match value {
        None => Ok(default),
        Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(format!(
            "{name} must be between 1 and {}, not {n}",
            u32::MAX
        ))),
    };
    Ok(Budgets {
        connection: BudgetLimits {
            bytes: bytes(
                &raw.inflight_bytes,
                "inflight_bytes",
                defaults.connection.bytes,
            )?,
            requests: requests(
                raw.inflight_requests,
                "inflight_requests",
                defaults.connection.requests,
            )?,
        },
        shard: BudgetLimits {
            bytes: bytes(
                &raw.shard_inflight_bytes,
                "shard_inflight_bytes",
                defaults.shard.bytes,
            )?,
            requests: requests(
                raw.shard_inflight_requests,
                "shard_inflight_requests",
                defaults.shard.requests,
            )?,
        },
    })
}

/// The image's directory and `allow_paths`, made absolute (relative paths are relative to the
/// working directory; a config file's were already joined to its directory).
fn allowed_roots(image: &Path, allow_paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let absolute = |p: &Path| {
        std::path::absolute(p).map_err(|e| format!("Cannot make {} absolute: {e}", p.display()))
    };
    let image = absolute(image)?;
    let mut roots = vec![image.parent().unwrap_or(Path::new("/")).to_path_buf()];
    for p in allow_paths {
        if p.as_os_str().is_empty() {
            return Err("An allowed path is empty".into());
        }
        let p = absolute(p)?;
        if !roots.contains(&p) {
            roots.push(p);
        }
    }
    Ok(roots)
}

/// The image's file name without its extension, cut to 20 bytes on a character boundary.
pub fn default_serial(image: &Path) -> String {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().replace('\0', ""))
        .unwrap_or_default();
    let mut end = stem.len().min(ID_BYTES);
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    let serial = &stem[..end];
    if serial.is_empty() {
        "qcow2d".to_owned()
    } else {
        serial.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> ServeConfig {
        parse(text, Path::new("/etc/qcow2d/test.toml"), 8).unwrap()
    }

    fn parse_err(text: &str) -> ConfigError {
        parse(text, Path::new("/etc/qcow2d/test.toml"), 8).unwrap_err()
    }

    #[test]
    fn good_config() {
        let cfg = parse_ok(
            r#"
shards = 2

[[export]]
image = "/images/a.qcow2"
socket = "/run/a.sock"
read_only = true
queues = 4
serial = "disk-a"

[[export]]
image = "b.qcow2"
socket = "sockets/b.sock"
"#,
        );
        assert_eq!(cfg.exports.len(), 2);
        assert_eq!(
            cfg.exports[0],
            ExportConfig {
                image: "/images/a.qcow2".into(),
                socket: "/run/a.sock".into(),
                read_only: true,
                writethrough: false,
                lazy_refcounts: false,
                direct: false,
                queues: 4,
                shards: 2,
                serial: "disk-a".into(),
                limits: Limits::default(),
                group: None,
                overlap_check: OverlapCheck::Cached,
                allowed_roots: vec!["/images".into()],
                budgets: Budgets::default(),
            }
        );
        let b = &cfg.exports[1];
        assert_eq!(b.image, PathBuf::from("/etc/qcow2d/b.qcow2"));
        assert_eq!(b.socket, PathBuf::from("/etc/qcow2d/sockets/b.sock"));
        assert!(!b.read_only);
        assert!(!b.writethrough);
        assert!(!b.lazy_refcounts);
        assert_eq!(b.queues, 16);
        assert_eq!(
            b.shards, 2,
            "the file's shard count applies to writable exports too"
        );
        assert_eq!(b.serial, "b");
        assert_eq!(b.allowed_roots, [PathBuf::from("/etc/qcow2d")]);
    }

    #[test]
    fn allow_paths_top_level_and_per_export() {
        let cfg = parse_ok(
            r#"
allow_paths = ["/base", "templates"]

[[export]]
image = "/images/a.qcow2"
socket = "/run/a.sock"
allow_paths = ["/srv/a"]

[[export]]
image = "/images/b.qcow2"
socket = "/run/b.sock"
"#,
        );
        let roots = |i: usize| cfg.exports[i].allowed_roots.clone();
        assert_eq!(
            roots(0),
            ["/images", "/base", "/etc/qcow2d/templates", "/srv/a"].map(PathBuf::from)
        );
        assert_eq!(
            roots(1),
            ["/images", "/base", "/etc/qcow2d/templates"].map(PathBuf::from)
        );
        // A list of strings, nothing else.
        for text in [
            "allow_paths = \"/x\"\n[[export]]\nimage = \"a\"\nsocket = \"s\"\n",
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nallow_paths = [1]\n",
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nallow_path = [\"/x\"]\n",
        ] {
            assert!(
                matches!(parse_err(text), ConfigError::Parse { .. }),
                "{text}"
            );
        }
        let err = parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nallow_paths = [\"\"]\n");
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn write_options() {
        let cfg = parse_ok(
            "shards = 4\n[[export]]\nimage = \"a\"\nsocket = \"s\"\nwritethrough = true\nlazy_refcounts = true\n",
        );
        let e = &cfg.exports[0];
        assert!(e.writethrough && e.lazy_refcounts && !e.read_only);
        assert_eq!(e.shards, 4);
        let cfg = parse_ok(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nwritethrough = false\nlazy_refcounts = false\n",
        );
        assert!(!cfg.exports[0].writethrough && !cfg.exports[0].lazy_refcounts);
        // Wrong types are refused with their position.
        let err = parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nwritethrough = \"yes\"\n");
        assert!(err.to_string().contains("line 4"), "{err}");
        let err = parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nlazy_refcounts = 1\n");
        assert!(err.to_string().contains("line 4"), "{err}");
        // Near misses are unknown keys, not silently ignored.
        for key in ["write_through", "lazy-refcounts", "cache"] {
            let err = parse_err(&format!(
                "[[export]]\nimage = \"a\"\nsocket = \"s\"\n{key} = true\n"
            ));
            match &err {
                ConfigError::Parse { message, .. } => assert!(message.contains(key), "{message}"),
                other => panic!("{key}: unexpected {other:?}"),
            }
        }
        // Meaningless on a read-only export.
        let err = parse_err(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nread_only = true\nwritethrough = true\n",
        );
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("writethrough"), "{err}");
        let err = parse_err(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nread_only = true\nlazy_refcounts = true\n",
        );
        assert!(err.to_string().contains("lazy_refcounts"), "{err}");
        // At the top level too.
        assert!(matches!(
            parse_err("writethrough = true\n[[export]]\nimage = \"a\"\nsocket = \"s\"\n"),
            ConfigError::Parse { .. }
        ));
    }

    #[test]
    fn inflight_budgets() {
        let e = &parse_ok("[[export]]\nimage = \"a\"\nsocket = \"s\"\n").exports[0];
        assert_eq!(e.budgets, Budgets::default());
        let cfg = parse_ok(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\ninflight_bytes = \"512M\"\n\
             inflight_requests = 100\nshard_inflight_bytes = 4194304\n\
             shard_inflight_requests = 10\n",
        );
        let b = cfg.exports[0].budgets;
        assert_eq!(b.connection.bytes, 512 << 20);
        assert_eq!(b.connection.requests, 100);
        assert_eq!(b.shard.bytes, 4 << 20);
        assert_eq!(b.shard.requests, 10);
        for (key, value) in [
            ("inflight_bytes", "\"12 parsecs\""),
            ("inflight_bytes", "\"512\""),
            ("shard_inflight_bytes", "0"),
            ("inflight_requests", "0"),
            ("shard_inflight_requests", "5000000000"),
        ] {
            let err = parse_err(&format!(
                "[[export]]\nimage = \"a\"\nsocket = \"s\"\n{key} = {value}\n"
            ));
            assert!(matches!(err, ConfigError::Invalid { .. }), "{key}: {err}");
            assert!(err.to_string().contains(key), "{err}");
        }
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size("M"), None);
    }

    #[test]
    fn direct_option() {
        let cfg = parse_ok("[[export]]\nimage = \"a\"\nsocket = \"s\"\ndirect = true\n");
        assert!(cfg.exports[0].direct);
        // With a read-only export too: reads bypass the page cache as well.
        let cfg = parse_ok(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nread_only = true\ndirect = true\n",
        );
        assert!(cfg.exports[0].direct && cfg.exports[0].read_only);
        assert!(!parse_ok("[[export]]\nimage = \"a\"\nsocket = \"s\"\n").exports[0].direct);
        let err = parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\ndirect = \"on\"\n");
        assert!(err.to_string().contains("line 4"), "{err}");
        // Near misses are unknown keys; the key is per export, not top level.
        for text in [
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\no_direct = true\n",
            "direct = true\n[[export]]\nimage = \"a\"\nsocket = \"s\"\n",
        ] {
            assert!(
                matches!(parse_err(text), ConfigError::Parse { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn overlap_check_option() {
        let cfg = parse_ok("[[export]]\nimage = \"a\"\nsocket = \"s\"\n");
        assert_eq!(
            cfg.exports[0].overlap_check,
            OverlapCheck::Cached,
            "QEMU's default"
        );
        // Top level: the default of every export; an export's own key wins.
        let cfg = parse_ok(
            "overlap_check = \"all\"\n[[export]]\nimage = \"a\"\nsocket = \"s\"\n\
             [[export]]\nimage = \"b\"\nsocket = \"t\"\noverlap_check = \"none\"\n\
             [[export]]\nimage = \"c\"\nsocket = \"u\"\noverlap_check = \"constant\"\n",
        );
        let modes: Vec<OverlapCheck> = cfg.exports.iter().map(|e| e.overlap_check).collect();
        assert_eq!(
            modes,
            [
                OverlapCheck::All,
                OverlapCheck::None,
                OverlapCheck::Constant
            ]
        );
        let err =
            parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\noverlap_check = \"some\"\n");
        assert!(err.to_string().contains("line 4"), "{err}");
        assert!(err.to_string().contains("cached"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let err =
            parse_err("[[export]]\nimage = \"a.qcow2\"\nsocket = \"a.sock\"\ncache = \"none\"\n");
        match &err {
            ConfigError::Parse {
                location, message, ..
            } => {
                assert_eq!(location.0, Some((4, 1)));
                assert!(message.contains("cache"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("/etc/qcow2d/test.toml"), "{text}");
        assert!(text.contains("line 4, column 1"), "{text}");

        let err = parse_err("shards = 1\nbogus = 2\n[[export]]\nimage = \"a\"\nsocket = \"b\"\n");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        let err = parse_err("[[export]]\nimage = \"a.qcow2\nsocket = \"s\"\n");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nqueues = \"four\"\n");
        assert!(err.to_string().contains("line 4"), "{err}");
        let err = parse_err("[[export]]\nimage = \"a\"\n");
        assert!(err.to_string().contains("socket"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        let err = parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nqueues = 65\n");
        assert_eq!(
            err.to_string(),
            "Export 1 in config file /etc/qcow2d/test.toml: Queue count must be between 1 and 64, not 65"
        );
        assert!(matches!(
            parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nqueues = 0\n"),
            ConfigError::Invalid { .. }
        ));
        assert!(matches!(
            parse_err("[[export]]\nimage = \"a\"\nsocket = \"s\"\nqueues = -1\n"),
            ConfigError::Parse { .. }
        ));
        assert!(matches!(
            parse_err("shards = 0\n[[export]]\nimage = \"a\"\nsocket = \"s\"\n"),
            ConfigError::Invalid { .. }
        ));
        let err = parse_err(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\nserial = \"123456789012345678901\"\n",
        );
        assert!(err.to_string().contains("at most 20"), "{err}");
        assert!(matches!(parse_err(""), ConfigError::NoExports { .. }));
        let err = parse_err(
            "[[export]]\nimage = \"a\"\nsocket = \"s\"\n[[export]]\nimage = \"b\"\nsocket = \"s\"\n",
        );
        assert!(err.to_string().starts_with("Export 2 in"), "{err}");
    }

    #[test]
    fn shards_never_exceed_queues() {
        let ro = "read_only = true\n";
        let cfg = parse_ok(&format!(
            "shards = 32\n[[export]]\nimage = \"a\"\nsocket = \"s\"\nqueues = 4\n{ro}"
        ));
        assert_eq!(cfg.exports[0].shards, 4);
        // Default shards: one per CPU (8 here).
        let cfg = parse_ok(&format!("[[export]]\nimage = \"a\"\nsocket = \"s\"\n{ro}"));
        assert_eq!(cfg.exports[0].shards, 8);
        // Writable: the same.
        let cfg = parse_ok("shards = 32\n[[export]]\nimage = \"a\"\nsocket = \"s\"\nqueues = 4\n");
        assert_eq!(cfg.exports[0].shards, 4);
    }

    #[test]
    fn cache_per_core_takes_a_size() {
        assert_eq!(parse_ok(EXPORT).cache_per_core, None);
        assert_eq!(
            parse_ok(&format!("cache_per_core = \"64M\"\n{EXPORT}")).cache_per_core,
            Some(64 << 20)
        );
        assert_eq!(
            parse_ok(&format!("cache_per_core = 4096\n{EXPORT}")).cache_per_core,
            Some(4096)
        );
        let err = parse_err(&format!("cache_per_core = \"lots\"\n{EXPORT}"));
        assert_eq!(
            err.to_string(),
            "Config file /etc/qcow2d/test.toml: invalid cache_per_core \"lots\": expected bytes, \
             or a size with a K, M, G or T suffix"
        );
        assert!(cache_per_core_value("1x", None)
            .unwrap_err()
            .to_string()
            .starts_with("Command line: invalid cache_per_core"));
    }

    #[test]
    fn nice_is_unset_by_default_and_takes_a_nice_value() {
        assert_eq!(parse_ok(EXPORT).nice, None);
        assert_eq!(parse_ok(&format!("nice = 5\n{EXPORT}")).nice, Some(5));
        assert_eq!(parse_ok(&format!("nice = -20\n{EXPORT}")).nice, Some(-20));
        let err = parse_err(&format!("nice = 20\n{EXPORT}"));
        assert_eq!(
            err.to_string(),
            "Config file /etc/qcow2d/test.toml: invalid nice 20: expected a nice value \
             from -20 to 19"
        );
        assert!(nice_value(-21, None)
            .unwrap_err()
            .to_string()
            .starts_with("Command line: invalid nice -21"));
    }

    /// The smallest export section.
    const EXPORT: &str = "[[export]]\nimage = \"a\"\nsocket = \"s\"\n";

    #[test]
    fn seccomp_and_user() {
        let cfg = parse_ok(EXPORT);
        assert_eq!((cfg.seccomp, cfg.user), (SeccompMode::Kill, None));
        let cfg = parse_ok(&format!(
            "seccomp = \"trap\"\nuser = \"qcow2d:kvm\"\n{EXPORT}"
        ));
        assert_eq!(cfg.seccomp, SeccompMode::Trap);
        assert_eq!(cfg.user.as_deref(), Some("qcow2d:kvm"));
        assert_eq!(
            parse_ok(&format!("seccomp = \"none\"\n{EXPORT}")).seccomp,
            SeccompMode::None
        );
        let err = parse_err(&format!("seccomp = \"off\"\n{EXPORT}"));
        assert_eq!(
            err.to_string(),
            "Config file /etc/qcow2d/test.toml: invalid seccomp mode \"off\": expected kill, \
             trap, log or none"
        );
        assert_eq!(seccomp_mode("log", None).unwrap(), SeccompMode::Log);
        assert!(seccomp_mode("KILL", None)
            .unwrap_err()
            .to_string()
            .starts_with("Command line: invalid seccomp mode"));
    }

    #[test]
    fn metrics_address() {
        const EXPORT: &str = "[[export]]\nimage = \"a\"\nsocket = \"s\"\n";
        assert_eq!(parse_ok(EXPORT).metrics, None);
        let cfg = parse_ok(&format!("metrics = \"127.0.0.1:9187\"\n{EXPORT}"));
        assert_eq!(cfg.metrics, Some("127.0.0.1:9187".parse().unwrap()));
        let cfg = parse_ok(&format!("metrics = \"[::1]:0\"\n{EXPORT}"));
        assert_eq!(cfg.metrics, Some("[::1]:0".parse().unwrap()));
        let err = parse_err(&format!("metrics = \"localhost\"\n{EXPORT}"));
        assert_eq!(
            err.to_string(),
            "Config file /etc/qcow2d/test.toml: invalid metrics address \"localhost\": expected \
             IP:PORT, such as 127.0.0.1:9187"
        );
        // Top level only, and a string.
        assert!(matches!(
            parse_err(&format!("metrics = 9187\n{EXPORT}")),
            ConfigError::Parse { .. }
        ));
        assert!(matches!(
            parse_err(&format!("{EXPORT}metrics = \"127.0.0.1:1\"\n")),
            ConfigError::Parse { .. }
        ));
        assert_eq!(
            super::metrics_address("0.0.0.0:9187", None).unwrap(),
            "0.0.0.0:9187".parse().unwrap()
        );
        let err = super::metrics_address(":9187", None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Command line: invalid metrics address"),
            "{err}"
        );
    }

    #[test]
    fn defaults() {
        assert_eq!(default_queues(1), 16);
        assert_eq!(default_queues(32), 32);
        assert_eq!(default_queues(500), 64);
        assert_eq!(default_serial(Path::new("/x/vm-disk.qcow2")), "vm-disk");
        assert_eq!(
            default_serial(Path::new("/x/a-very-long-image-name-indeed.qcow2")),
            "a-very-long-image-na"
        );
        // Cut on a character boundary: 19 ASCII bytes then a 2-byte character.
        assert_eq!(
            default_serial(Path::new("abcdefghijklmnopqrsé.img")),
            "abcdefghijklmnopqrs"
        );
        assert_eq!(default_serial(Path::new("/")), "qcow2d");
    }

    #[test]
    fn limits_groups_and_the_control_socket() {
        let cfg = parse_ok(
            r#"
control = "ctl.sock"
[[export]]
image = "a.qcow2"
socket = "a.sock"
iops_total = 500
iops_total_max = 1000
iops_total_max_length = 2
bps_read = 1048576
group = "g"
[[export]]
image = "b.qcow2"
socket = "b.sock"
group = "g"
"#,
        );
        assert_eq!(cfg.control, Some(PathBuf::from("/etc/qcow2d/ctl.sock")));
        let a = &cfg.exports[0];
        assert_eq!(a.group.as_deref(), Some("g"));
        assert_eq!(
            a.limits.entries(),
            vec![
                ("bps_read".to_owned(), 1048576),
                ("iops_total".to_owned(), 500),
                ("iops_total_max".to_owned(), 1000),
                ("iops_total_max_length".to_owned(), 2),
            ]
        );
        assert!(cfg.exports[1].limits.is_none());
        // Only a control socket: exports come later.
        assert!(parse_ok("control = \"/run/c.sock\"\n").exports.is_empty());
        for (bad, want) in [
            (
                "[[export]]\nimage = \"a\"\nsocket = \"a.sock\"\niops_total = 5\niops_read = 5\n",
                "cannot be used together",
            ),
            (
                "[[export]]\nimage = \"a\"\nsocket = \"a.sock\"\niops_totl = 5\n",
                "unknown field",
            ),
            (
                "[[export]]\nimage = \"a\"\nsocket = \"a.sock\"\ngroup = \"g\"\niops_total = 5\n\
                 [[export]]\nimage = \"b\"\nsocket = \"b.sock\"\ngroup = \"g\"\niops_total = 6\n",
                "Group \"g\" has other limits",
            ),
            (
                "control = \"a.sock\"\n[[export]]\nimage = \"a\"\nsocket = \"a.sock\"\n",
                "also an export's socket",
            ),
            (
                "[[export]]\nimage = \"a\"\nsocket = \"a.sock\"\ngroup = \"\"\n",
                "Group name",
            ),
        ] {
            let e = parse_err(bad).to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn command_line() {
        let cfg = from_command_line(
            RawExport {
                image: "img.qcow2".into(),
                socket: "s.sock".into(),
                read_only: true,
                queues: Some(2),
                serial: None,
                ..RawExport::default()
            },
            Some(8),
        )
        .unwrap();
        assert_eq!(cfg.exports[0].queues, 2);
        assert_eq!(cfg.exports[0].shards, 2);
        assert_eq!(cfg.exports[0].serial, "img");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(cfg.exports[0].allowed_roots, std::slice::from_ref(&cwd));
        let cfg = from_command_line(
            RawExport {
                image: "img.qcow2".into(),
                socket: "s.sock".into(),
                writethrough: true,
                lazy_refcounts: true,
                allow_paths: vec!["/a".into(), "b".into(), "/a".into()],
                ..RawExport::default()
            },
            Some(8),
        )
        .unwrap();
        assert_eq!(
            cfg.exports[0].allowed_roots,
            [cwd.clone(), "/a".into(), cwd.join("b")]
        );
        let e = &cfg.exports[0];
        assert!(!e.read_only && e.writethrough && e.lazy_refcounts);
        assert_eq!(e.shards, 8);
        let err = from_command_line(
            RawExport {
                image: "img.qcow2".into(),
                socket: "s.sock".into(),
                queues: Some(100),
                ..RawExport::default()
            },
            None,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Command line: "), "{err}");
    }
}
