//! `qcow2d-bench`: a load generator for any vhost-user-blk socket (libblkio client), a
//! side-by-side comparison of qcow2d against qemu-storage-daemon, and the maker of the images
//! both are benchmarked on. See `qcow2d-bench --help`.

mod ceiling;
mod compare;
mod density;
mod error;
mod image;
mod load;
mod memory;
mod pattern;
mod procs;
mod rng;
mod signals;
mod stats;
mod svg;
mod units;

use crate::compare::{CompareOptions, Workload, DEFAULT_WORKLOADS};
use crate::error::{Context, Error, Result};
use crate::image::{CompressionType, ImageKind};
use crate::load::{run_load, LoadSpec, Phase};
use crate::memory::Sampler;
use crate::pattern::Pattern;
use crate::units::{parse_duration, parse_size};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "qcow2d-bench",
    version,
    about = "Load generator for vhost-user-blk sockets and comparison of qcow2d against qemu-storage-daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one workload against a vhost-user-blk socket.
    Run(RunArgs),
    /// Compare qcow2d and qemu-storage-daemon on copies of one image.
    Compare(CompareArgs),
    /// Make a benchmark image with qemu-img (64 KiB clusters).
    MakeImage(MakeImageArgs),
    /// Many exports in one server, one client each: qcow2d, then qemu-storage-daemon.
    Density(DensityArgs),
}

#[derive(Args, Debug)]
struct DensityArgs {
    /// The QCOW2 image every export serves, read-only.
    #[arg(long)]
    image: PathBuf,
    /// The qcow2d binary; default: `qcow2d` next to this executable.
    #[arg(long)]
    qcow2d: Option<PathBuf>,
    /// Exports in each server, and clients (one per export).
    #[arg(long, default_value_t = 16)]
    exports: usize,
    /// Requests in flight per client (one queue each).
    #[arg(long, default_value_t = 8)]
    iodepth: usize,
    /// Block size of the random reads (suffixes k, m, g).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    runtime: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Where density.json, the config file, the sockets and the server logs go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The vhost-user-blk unix socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum, default_value = "randread")]
    pattern: Pattern,
    /// Block size (suffixes k, m, g).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Virtqueues, one worker thread each.
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Measured time (s or ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    runtime: Duration,
    /// Time before measuring starts; its completions are not recorded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// First byte of the region the workload touches (a multiple of --bs).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    region_start: u64,
    /// Size of the region; default: to the end of the disk.
    #[arg(long, value_parser = parse_size)]
    region_size: Option<u64>,
    /// Seed of offsets, read/write choices and write data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmix_read: u8,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Stop at the first failed request instead of running the full time.
    #[arg(long)]
    stop_on_error: bool,
    /// PID of the server: sample its resident memory (without the guest memory it maps).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Interval of the memory timeline printed with --server-pid (the peak is sampled every
    /// 200 ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    mem_interval: Duration,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// The QCOW2 image; each server gets its own copy.
    #[arg(long)]
    image: PathBuf,
    /// The qcow2d binary; default: `qcow2d` next to this executable.
    #[arg(long)]
    qcow2d: Option<PathBuf>,
    /// Comma-separated workloads named <pattern>-<bs>-qd<iodepth>.
    #[arg(long, default_value = DEFAULT_WORKLOADS, value_delimiter = ',', value_parser = Workload::parse)]
    workloads: Vec<Workload>,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    runtime: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Comma-separated queue counts the client uses; every workload runs with each (both
    /// servers offer the largest).
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    queues: Vec<usize>,
    /// Pin both servers to the first N CPUs this process may run on (sched_setaffinity), to
    /// measure how they scale with cores. Default: not pinned.
    #[arg(long)]
    cpus: Option<usize>,
    /// Where compare.json, compare.svg, server logs and the image copies go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Export read-only from both servers.
    #[arg(long)]
    read_only: bool,
    /// Both servers bypass the host page cache for guest data: qcow2d with `--direct`,
    /// qemu-storage-daemon with `cache.direct=on` (default: both use the page cache).
    #[arg(long)]
    direct: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the two image copies in OUT/images after the run.
    #[arg(long)]
    keep_images: bool,
    /// Interval of the servers' memory timeline in compare.json (the peak is sampled every
    /// 200 ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    mem_interval: Duration,
}

#[derive(Args, Debug)]
struct MakeImageArgs {
    #[arg(long)]
    out: PathBuf,
    /// Virtual size (suffixes k, m, g).
    #[arg(long, default_value = "2g", value_parser = parse_size)]
    size: u64,
    #[arg(long, value_enum, default_value = "compressed")]
    kind: ImageKind,
    /// Compression of --kind compressed.
    #[arg(long, value_enum, default_value = "zlib")]
    compression: CompressionType,
    /// Seed of the image data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let spec = LoadSpec {
        socket: args.socket,
        pattern: args.pattern,
        block_size_bytes: args.bs,
        iodepth: args.iodepth,
        queues: args.queues,
        runtime: args.runtime,
        warmup: args.warmup,
        region_start_bytes: args.region_start,
        region_size_bytes: args.region_size,
        seed: args.seed,
        rwmix_read_percent: args.rwmix_read,
        stop_on_error: args.stop_on_error,
    };
    let mut sampler = args
        .server_pid
        .map(|pid| Sampler::start(pid, args.mem_interval))
        .transpose()
        .context("Sampling the server's memory (--server-pid)")?;
    let mut report = run_load(&spec, &mut |phase| {
        if let Some(sampler) = sampler.as_mut() {
            match phase {
                Phase::MeasureStart => sampler.mark_start(),
                Phase::MeasureEnd => sampler.mark_end(),
            }
        }
    })?;
    report.memory = sampler.map(Sampler::finish);
    report.print_human();
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("Encoding the result as JSON")?;
        std::fs::write(path, json + "\n").with_context(|| format!("Writing {}", path.display()))?;
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn default_qcow2d() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("Finding the current executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::msg("The current executable has no parent directory"))?;
    Ok(dir.join("qcow2d"))
}

fn density_cmd(args: DensityArgs) -> Result<ExitCode> {
    let qcow2d = match args.qcow2d {
        Some(path) => path,
        None => default_qcow2d()?,
    };
    let options = density::DensityOptions {
        image: args.image,
        qcow2d,
        exports: args.exports,
        iodepth: args.iodepth,
        block_size_bytes: args.bs,
        runtime: args.runtime,
        warmup: args.warmup,
        out: args.out,
        seed: args.seed,
    };
    signals::install().context("Installing signal handlers")?;
    let report = density::density(&options)?;
    let clean = report
        .results
        .iter()
        .all(|r| r.failure.is_none() && r.errors == 0);
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn compare_cmd(args: CompareArgs) -> Result<ExitCode> {
    let qcow2d = match args.qcow2d {
        Some(path) => path,
        None => default_qcow2d()?,
    };
    let options = CompareOptions {
        image: args.image,
        qcow2d,
        workloads: args.workloads,
        rounds: args.rounds,
        runtime: args.runtime,
        warmup: args.warmup,
        queues: args.queues,
        cpus: args.cpus,
        out: args.out,
        read_only: args.read_only,
        direct: args.direct,
        seed: args.seed,
        keep_images: args.keep_images,
        mem_interval: args.mem_interval,
    };
    signals::install().context("Installing signal handlers")?;
    compare::compare(&options)?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Compare(args) => compare_cmd(args),
        Cmd::Density(args) => density_cmd(args),
        Cmd::MakeImage(args) => {
            image::make_image(&args.out, args.size, args.kind, args.compression, args.seed)
                .map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("qcow2d-bench: {}", err.chain());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("qcow2d-bench").chain(args.iter().copied()))
    }

    #[test]
    fn run_arguments_parse_with_units() {
        let cli = parse(&[
            "run",
            "--socket",
            "/tmp/s",
            "--pattern",
            "randrw",
            "--bs",
            "64k",
            "--iodepth",
            "8",
            "--queues",
            "4",
            "--runtime",
            "500ms",
            "--warmup",
            "0s",
            "--region-start",
            "1m",
            "--region-size",
            "1g",
            "--seed",
            "9",
            "--rwmix-read",
            "30",
            "--json",
            "/tmp/x.json",
            "--server-pid",
            "4242",
            "--mem-interval",
            "500ms",
        ])
        .unwrap();
        let Cmd::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.pattern, Pattern::Randrw);
        assert_eq!(run.bs, 65536);
        assert_eq!(run.iodepth, 8);
        assert_eq!(run.queues, 4);
        assert_eq!(run.runtime, Duration::from_millis(500));
        assert_eq!(run.warmup, Duration::ZERO);
        assert_eq!(run.region_start, 1 << 20);
        assert_eq!(run.region_size, Some(1 << 30));
        assert_eq!(run.seed, 9);
        assert_eq!(run.rwmix_read, 30);
        assert_eq!(run.server_pid, Some(4242));
        assert_eq!(run.mem_interval, Duration::from_millis(500));
    }

    #[test]
    fn run_defaults() {
        let Cmd::Run(run) = parse(&["run", "--socket", "s"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(run.pattern, Pattern::Randread);
        assert_eq!((run.bs, run.iodepth, run.queues), (4096, 32, 2));
        assert_eq!(run.runtime, Duration::from_secs(10));
        assert_eq!(run.warmup, Duration::from_secs(2));
        assert_eq!((run.region_start, run.region_size), (0, None));
        assert_eq!(run.server_pid, None);
        assert_eq!(run.mem_interval, Duration::from_secs(10));
    }

    #[test]
    fn memory_run_of_ten_minutes_parses() {
        let Cmd::Run(run) = parse(&[
            "run",
            "--socket",
            "s",
            "--pattern",
            "randrw",
            "--runtime",
            "600s",
            "--server-pid",
            "1",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert_eq!(run.runtime, Duration::from_secs(600));
        assert!(parse(&["run", "--socket", "s", "--server-pid", "x"]).is_err());
        let Cmd::Compare(c) = parse(&["compare", "--image", "i", "--mem-interval", "30s"])
            .unwrap()
            .command
        else {
            panic!("not compare")
        };
        assert_eq!(c.mem_interval, Duration::from_secs(30));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(parse(&["run", "--socket", "s", "--bs", "4q"]).is_err());
        assert!(parse(&["run", "--socket", "s", "--runtime", "10m"]).is_err());
        assert!(parse(&["run", "--socket", "s", "--rwmix-read", "101"]).is_err());
        assert!(parse(&["run", "--socket", "s", "--pattern", "trim"]).is_err());
        assert!(parse(&["compare", "--image", "i", "--workloads", "read-4k"]).is_err());
    }

    #[test]
    fn compare_arguments_parse() {
        let Cmd::Compare(c) = parse(&["compare", "--image", "img.qcow2"]).unwrap().command else {
            panic!("not compare")
        };
        assert_eq!(c.workloads.len(), 4);
        assert_eq!(
            (c.rounds, c.queues.as_slice(), c.cpus),
            (2, &[1, 2][..], None)
        );
        assert_eq!(c.out, PathBuf::from("bench-results"));
        let Cmd::Compare(c) = parse(&[
            "compare",
            "--image",
            "i",
            "--workloads",
            "read-64k-qd4,randrw-4k-qd1",
            "--runtime",
            "2s",
            "--read-only",
            "--direct",
            "--queues",
            "2",
            "--cpus",
            "1",
        ])
        .unwrap()
        .command
        else {
            panic!("not compare")
        };
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.workloads[1].pattern, Pattern::Randrw);
        assert!(c.read_only && c.direct);
        assert_eq!((c.queues.as_slice(), c.cpus), (&[2][..], Some(1)));
        assert_eq!(c.runtime, Duration::from_secs(2));
    }

    #[test]
    fn make_image_arguments_parse() {
        let Cmd::MakeImage(m) = parse(&[
            "make-image",
            "--out",
            "x.qcow2",
            "--size",
            "256m",
            "--kind",
            "allocated",
        ])
        .unwrap()
        .command
        else {
            panic!("not make-image")
        };
        assert_eq!(m.size, 256 << 20);
        assert_eq!(m.kind, ImageKind::Allocated);
    }
}
