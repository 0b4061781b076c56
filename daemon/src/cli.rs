//! The command line (clap derive): `qcow2d serve ...` and `qcow2d info ...`.
//!
//! Parsed once on the main thread; `serve` options become a validated
//! [`crate::config::ServeConfig`] in [`crate::config`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Serve QCOW2 images to virtual machines over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(name = "qcow2d", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one image (--image/--socket) or the exports of a config file (--config).
    Serve(Box<ServeArgs>),
    /// Print what an image is made of.
    Info(InfoArgs),
    /// Check an image's refcounts and metadata like `qemu-img check` (exit status 0: clean,
    /// 2: corruptions, 3: leaked clusters only, 1: the check could not complete).
    Check(CheckArgs),
    /// Talk to a running daemon through its control socket (`serve --control SOCK`).
    Ctl(Box<CtlArgs>),
}

/// I/O limits (QEMU throttle group semantics): rates per second, each with an optional burst
/// rate (`-max`) and burst length in seconds (`-max-length`).
#[derive(Debug, Default, Args)]
pub struct LimitArgs {
    /// Operations per second, reads and writes together.
    #[arg(long, value_name = "N")]
    pub iops_total: Option<u64>,
    /// Burst rate of --iops-total.
    #[arg(long, value_name = "N")]
    pub iops_total_max: Option<u64>,
    /// Seconds a burst of --iops-total-max may last [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub iops_total_max_length: Option<u64>,
    /// Read operations per second.
    #[arg(long, value_name = "N")]
    pub iops_read: Option<u64>,
    /// Burst rate of --iops-read.
    #[arg(long, value_name = "N")]
    pub iops_read_max: Option<u64>,
    /// Seconds a burst of --iops-read-max may last [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub iops_read_max_length: Option<u64>,
    /// Write operations per second.
    #[arg(long, value_name = "N")]
    pub iops_write: Option<u64>,
    /// Burst rate of --iops-write.
    #[arg(long, value_name = "N")]
    pub iops_write_max: Option<u64>,
    /// Seconds a burst of --iops-write-max may last [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub iops_write_max_length: Option<u64>,
    /// Bytes per second, reads and writes together.
    #[arg(long, value_name = "N")]
    pub bps_total: Option<u64>,
    /// Burst rate of --bps-total.
    #[arg(long, value_name = "N")]
    pub bps_total_max: Option<u64>,
    /// Seconds a burst of --bps-total-max may last [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub bps_total_max_length: Option<u64>,
    /// Bytes read per second.
    #[arg(long, value_name = "N")]
    pub bps_read: Option<u64>,
    /// Burst rate of --bps-read.
    #[arg(long, value_name = "N")]
    pub bps_read_max: Option<u64>,
    /// Seconds a burst of --bps-read-max may last [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub bps_read_max_length: Option<u64>,
    /// Bytes written per second.
    #[arg(long, value_name = "N")]
    pub bps_write: Option<u64>,
    /// Burst rate of --bps-write.
    #[arg(long, value_name = "N")]
    pub bps_write_max: Option<u64>,
    /// Seconds a burst of --bps-write-max may last [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub bps_write_max_length: Option<u64>,
    /// Share the limits with every export of this throttle group (the group's limits are the
    /// ones given last).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
}

impl LimitArgs {
    /// The values given, by config key (`iops_total_max`, ...).
    pub fn entries(&self) -> Vec<(&'static str, u64)> {
        crate::throttle::limit_fields!(self)
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    /// Whether any limit or a group was given.
    pub fn any(&self) -> bool {
        self.group.is_some() || !self.entries().is_empty()
    }
}

/// `qcow2d ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "SOCK")]
    pub control: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `qcow2d ctl` commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List the exports, their settings, clients, counters and limits.
    List {
        /// Print the daemon's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Open an image and serve it on a new socket, beside the running exports.
    Add(CtlAddArgs),
    /// Stop serving an export: requests in flight complete, the image is flushed and closed.
    Remove {
        /// The export's socket.
        #[arg(value_name = "SOCK")]
        socket: PathBuf,
        /// Remove it even with a client connected (the client is disconnected).
        #[arg(long)]
        force: bool,
    },
    /// Set (or with --none, lift) an export's I/O limits.
    Limit {
        /// The export's socket.
        #[arg(value_name = "SOCK")]
        socket: PathBuf,
        /// Lift every limit (and leave the group).
        #[arg(long, conflicts_with = "group")]
        none: bool,
        /// The limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Grow (or with --shrink, shrink) an export's image; a connected guest is told.
    Resize {
        /// The export's socket.
        #[arg(value_name = "SOCK")]
        socket: PathBuf,
        /// The new virtual size: bytes, or with a suffix K, M, G, T (powers of 1024).
        #[arg(value_name = "SIZE")]
        size: String,
        /// Allow a smaller size (refused if anything is allocated past it).
        #[arg(long)]
        shrink: bool,
    },
}

/// `qcow2d ctl add`.
#[derive(Debug, Args)]
pub struct CtlAddArgs {
    /// QCOW2 image to serve.
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// vhost-user unix socket to listen on.
    #[arg(long, value_name = "SOCK")]
    pub socket: PathBuf,
    /// How it is served.
    #[command(flatten)]
    pub export: ExportArgs,
    /// I/O limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub allow: AllowArgs,
    /// Which metadata every write is checked against, as `serve --overlap-check` (none,
    /// constant, cached, all) [default: cached].
    #[arg(long, value_name = "MODE")]
    pub overlap_check: Option<qcow2d_engine::OverlapCheck>,
}

/// `qcow2d serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file listing the exports ([[export]] tables with image, socket, read_only,
    /// writethrough, lazy_refcounts, direct, queues, serial, overlap_check, allow_paths,
    /// inflight_bytes, inflight_requests, shard_inflight_bytes, shard_inflight_requests;
    /// optional top-level shards, metrics, overlap_check and allow_paths).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "image", "socket", "read_only", "writethrough", "lazy_refcounts", "direct", "queues",
            "shards", "serial", "overlap_check", "allow_path", "inflight_bytes",
            "inflight_requests", "shard_inflight_bytes", "shard_inflight_requests",
        ]
    )]
    pub config: Option<PathBuf>,

    /// QCOW2 image to serve.
    #[arg(
        long,
        value_name = "IMG",
        required_unless_present_any = ["config", "control"],
        requires = "socket"
    )]
    pub image: Option<PathBuf>,

    /// vhost-user unix socket to listen on.
    #[arg(
        long,
        value_name = "SOCK",
        required_unless_present_any = ["config", "control"],
        requires = "image"
    )]
    pub socket: Option<PathBuf>,

    /// How the export given with --image is served.
    #[command(flatten)]
    pub export: ExportArgs,

    /// Workers of a connection, each with its own engine shard, run by the core threads
    /// [default: CPUs, at most --queues]
    #[arg(long, value_name = "N")]
    pub shards: Option<u64>,

    /// Which metadata every write is checked against before it reaches the image (QEMU's
    /// overlap-check): none, constant (header, L1 and refcount tables, snapshot table, bitmap
    /// directory), cached (also L2 tables, refcount blocks, snapshot L1 and bitmap tables)
    /// or all (also snapshot L2 tables, read at open). A write that would land on metadata
    /// fails and the image is marked corrupt [default: cached].
    #[arg(long, value_name = "MODE")]
    pub overlap_check: Option<qcow2d_engine::OverlapCheck>,
    /// Data in flight per connection: no more requests are taken from the guest's queues
    /// while its requests in flight ask for this many bytes (a number, or with K, M or G;
    /// at least 1M) [default: 256M].
    #[arg(long, value_name = "SIZE")]
    pub inflight_bytes: Option<String>,

    /// Requests in flight per connection [default: 4096].
    #[arg(long, value_name = "N")]
    pub inflight_requests: Option<u64>,

    /// Data in flight per worker thread (shard) [default: 64M].
    #[arg(long, value_name = "SIZE")]
    pub shard_inflight_bytes: Option<String>,

    /// Requests in flight per worker thread (shard) [default: 1024].
    #[arg(long, value_name = "N")]
    pub shard_inflight_requests: Option<u64>,

    #[command(flatten)]
    pub allow: AllowArgs,

    /// Serve Prometheus metrics on http://ADDR/metrics (ADDR is IP:PORT, e.g. 127.0.0.1:9187;
    /// port 0 picks a free port). Overrides a config file's `metrics`.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Listen for `qcow2d ctl` on this unix socket (mode 0600). Overrides a config file's
    /// `control`.
    #[arg(long, value_name = "SOCK")]
    pub control: Option<PathBuf>,

    /// I/O limits of the export given with --image (in a config file: per export keys).
    #[command(flatten)]
    pub limits: LimitArgs,

    /// What a system call outside a thread's seccomp filter does: kill the process, trap
    /// (print the thread and the call to stderr, then kill), log (let it through; the kernel
    /// logs it) or none (no filters). Overrides a config file's `seccomp` [default: kill]
    #[arg(long, value_name = "MODE")]
    pub seccomp: Option<String>,

    /// Once the images are open and the sockets listen (made with this owner, mode 0660),
    /// serve as USER (and GROUP, default the user's) with no capabilities left. Needs root.
    /// Overrides a config file's `user`.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// The nice value the daemon's threads run at: its core threads run every connection's
    /// I/O (-20 to 19; a value below 0 needs root or a RLIMIT_NICE allowing it, and is set
    /// before --user drops root). Overrides a config file's `nice` [default: -5]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub nice: Option<i64>,

    /// Engine cache (L2 tables and decompressed clusters) that the shards on one core thread
    /// share, whatever the number of exports (bytes, or with a K/M/G/T suffix), each shard
    /// entitled to an equal share; each shard keeps a floor of a few clusters per image layer
    /// beyond it. Overrides a config file's
    /// `cache_per_core` [default: 256M]
    #[arg(long, value_name = "SIZE")]
    pub cache_per_core: Option<String>,
}

/// How one export is served: `serve --image` and `ctl add`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Export the image read-only (without it the image is opened for writing).
    #[arg(long)]
    pub read_only: bool,

    /// Make every write durable before it completes (reports the write cache off; the guest
    /// may turn it on). Default: write-back, writes durable at the guest's flushes.
    #[arg(long, conflicts_with = "read_only")]
    pub writethrough: bool,

    /// Keep refcount updates in memory until a clean shutdown (faster allocating writes; after
    /// a crash the image needs `qemu-img check -r all`).
    #[arg(long, conflicts_with = "read_only")]
    pub lazy_refcounts: bool,

    /// Read and write guest data with O_DIRECT, bypassing the host page cache (metadata stays
    /// cached; unaligned requests go through the page cache). Fails if the image's file
    /// system does not support O_DIRECT. Flushes still sync.
    #[arg(long)]
    pub direct: bool,

    /// Number of virtqueues [default: max(16, CPUs), at most 64].
    #[arg(long, value_name = "N")]
    pub queues: Option<u64>,

    /// Serial number reported to the guest (at most 20 bytes) [default: image file name].
    #[arg(long, value_name = "STR")]
    pub serial: Option<String>,
}

/// Where files named by an image may lie, for every subcommand that opens one.
#[derive(Debug, Args)]
pub struct AllowArgs {
    /// Also allow backing files and external data files under DIR (repeatable). By default
    /// the files an image names must be regular files under the image's own directory.
    #[arg(long = "allow-path", value_name = "DIR", requires = "image")]
    pub allow_path: Vec<PathBuf>,
}

/// `qcow2d info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The image.
    #[arg(value_name = "IMG")]
    pub image: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub allow: AllowArgs,
}

/// `qcow2d check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image.
    #[arg(value_name = "IMG")]
    pub image: PathBuf,

    /// Rebuild refcounts, fix COPIED flags, and clear the dirty and corrupt bits when the image
    /// is consistent afterwards (the image must not be in use).
    #[arg(long)]
    pub repair: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub allow: AllowArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `qcow2d serve ARGS`, parsed.
    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let all = ["qcow2d", "serve"].iter().chain(args).copied();
        Cli::try_parse_from(all).map(|cli| match cli.command {
            Command::Serve(args) => *args,
            Command::Info(_) | Command::Check(_) | Command::Ctl(_) => panic!("not serve"),
        })
    }

    /// `qcow2d serve --image a --socket s ARGS`, parsed.
    fn serve_image(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let all: Vec<&str> = ["--image", "a", "--socket", "s"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        serve(&all)
    }

    /// `qcow2d ctl --control c.sock ARGS`, parsed.
    fn ctl(args: &[&str]) -> Result<CtlCommand, clap::Error> {
        let all = ["qcow2d", "ctl", "--control", "c.sock"]
            .iter()
            .chain(args)
            .copied();
        Cli::try_parse_from(all).map(|cli| match cli.command {
            Command::Ctl(args) => args.command,
            _ => panic!("not ctl"),
        })
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cache_per_core_takes_a_size() {
        assert_eq!(
            serve_image(&["--cache-per-core", "64M"])
                .unwrap()
                .cache_per_core
                .as_deref(),
            Some("64M")
        );
        assert_eq!(serve_image(&[]).unwrap().cache_per_core, None);
    }

    #[test]
    fn nice_takes_a_negative_value() {
        assert_eq!(serve_image(&["--nice", "-5"]).unwrap().nice, Some(-5));
        assert_eq!(serve_image(&["--nice", "3"]).unwrap().nice, Some(3));
    }

    #[test]
    fn serve_needs_image_and_socket_or_config() {
        assert!(serve(&["--image", "a"]).is_err());
        assert!(serve_image(&[]).is_ok());
        assert!(serve(&["--config", "c.toml"]).is_ok());
        assert!(serve(&["--config", "c", "--image", "a"]).is_err());
        let args = serve_image(&[
            "--read-only",
            "--queues",
            "4",
            "--shards",
            "2",
            "--serial",
            "x",
        ])
        .unwrap();
        assert!(args.export.read_only);
        assert!(!args.export.writethrough && !args.export.lazy_refcounts);
        assert_eq!(args.metrics, None);
        assert_eq!(args.export.queues, Some(4));
        assert_eq!(args.shards, Some(2));
        assert_eq!(args.export.serial.as_deref(), Some("x"));
    }

    #[test]
    fn check_takes_an_image_and_repair() {
        let cli = Cli::try_parse_from(["qcow2d", "check", "--repair", "x.qcow2"]).unwrap();
        let Command::Check(args) = cli.command else {
            panic!("not check");
        };
        assert!(args.repair && !args.json);
        assert_eq!(args.image, PathBuf::from("x.qcow2"));
        assert!(Cli::try_parse_from(["qcow2d", "check"]).is_err());
    }

    #[test]
    fn write_options() {
        let args = serve_image(&["--writethrough", "--lazy-refcounts"]).unwrap();
        let e = &args.export;
        assert!(e.writethrough && e.lazy_refcounts && !e.read_only);
        let args = serve_image(&[]).unwrap();
        let e = &args.export;
        assert!(!e.writethrough && !e.lazy_refcounts && !e.read_only && !e.direct);
        assert!(serve_image(&["--direct"]).unwrap().export.direct);
        assert!(
            serve_image(&["--direct", "--read-only"])
                .unwrap()
                .export
                .direct
        );
        assert!(serve(&["--config", "c", "--direct"]).is_err());
        assert_eq!(serve_image(&[]).unwrap().overlap_check, None);
        assert_eq!(
            serve_image(&["--overlap-check", "all"])
                .unwrap()
                .overlap_check,
            Some(qcow2d_engine::OverlapCheck::All)
        );
        assert!(serve_image(&["--overlap-check", "some"]).is_err());
        assert!(serve(&["--config", "c", "--overlap-check", "none"]).is_err());
        // Meaningless on a read-only export, and not with a config file.
        assert!(serve_image(&["--read-only", "--writethrough"]).is_err());
        assert!(serve_image(&["--read-only", "--lazy-refcounts"]).is_err());
        assert!(serve(&["--config", "c", "--writethrough"]).is_err());
        assert!(serve(&["--config", "c", "--lazy-refcounts"]).is_err());
    }

    #[test]
    fn metrics_goes_with_either_form() {
        for args in [
            serve_image(&["--metrics", "127.0.0.1:9187"]),
            serve(&["--config", "c.toml", "--metrics", "127.0.0.1:9187"]),
        ] {
            assert_eq!(args.unwrap().metrics.as_deref(), Some("127.0.0.1:9187"));
        }
    }

    #[test]
    fn ctl_commands() {
        assert!(matches!(
            ctl(&["list", "--json"]).unwrap(),
            CtlCommand::List { json: true }
        ));
        let CtlCommand::Add(add) = ctl(&[
            "add",
            "--image",
            "a.qcow2",
            "--socket",
            "a.sock",
            "--queues",
            "2",
            "--iops-total",
            "500",
            "--iops-total-max",
            "1000",
            "--group",
            "g",
        ])
        .unwrap() else {
            panic!("not add")
        };
        assert_eq!(add.export.queues, Some(2));
        assert_eq!(
            add.limits.entries(),
            vec![("iops_total", 500), ("iops_total_max", 1000)]
        );
        assert_eq!(add.limits.group.as_deref(), Some("g"));
        assert!(ctl(&["remove", "a.sock", "--force"]).is_ok());
        assert!(ctl(&["limit", "a.sock", "--none"]).is_ok());
        assert!(ctl(&["limit", "a.sock", "--none", "--group", "g"]).is_err());
        assert!(ctl(&["resize", "a.sock", "2G", "--shrink"]).is_ok());
        assert!(ctl(&["add", "--image", "a"]).is_err());
        assert!(Cli::try_parse_from(["qcow2d", "ctl", "list"]).is_err());
    }

    #[test]
    fn allow_path_repeats_and_not_with_a_config_file() {
        let args = serve_image(&["--allow-path", "/x", "--allow-path", "y"]).unwrap();
        assert_eq!(
            args.allow.allow_path,
            [PathBuf::from("/x"), PathBuf::from("y")]
        );
        for other in [["--config", "c.toml"], ["--control", "c.sock"]] {
            let mut args = vec!["--allow-path", "/x"];
            args.extend(other);
            assert!(serve(&args).is_err(), "{other:?}");
        }
        for sub in ["info", "check"] {
            let cli =
                Cli::try_parse_from(["qcow2d", sub, "i.qcow2", "--allow-path", "/a"]).unwrap();
            let allow = match cli.command {
                Command::Info(a) => a.allow,
                Command::Check(a) => a.allow,
                _ => panic!("not {sub}"),
            };
            assert_eq!(allow.allow_path, [PathBuf::from("/a")]);
        }
        let CtlCommand::Add(add) =
            ctl(&["add", "--image", "a", "--socket", "s", "--allow-path", "/b"]).unwrap()
        else {
            panic!("not add")
        };
        assert_eq!(add.allow.allow_path, [PathBuf::from("/b")]);
    }

    #[test]
    fn sandbox_options_go_with_either_form() {
        for form in [
            &["--image", "a", "--socket", "s"][..],
            &["--config", "c.toml"],
        ] {
            let args: Vec<&str> = ["qcow2d", "serve"]
                .iter()
                .chain(form)
                .chain(&["--seccomp", "trap", "--user", "qcow2d:kvm"])
                .copied()
                .collect();
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("not serve")
            };
            assert_eq!(args.seccomp.as_deref(), Some("trap"));
            assert_eq!(args.user.as_deref(), Some("qcow2d:kvm"));
            assert_eq!(args.nice, None);
        }
    }

    #[test]
    fn info_args() {
        let cli = Cli::try_parse_from(["qcow2d", "info", "img.qcow2", "--json"]).unwrap();
        let Command::Info(args) = cli.command else {
            panic!("not info")
        };
        assert_eq!(args.image, PathBuf::from("img.qcow2"));
        assert!(args.json);
    }
}
