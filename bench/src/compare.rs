//! `compare`: qcow2d against qemu-storage-daemon on two copies of one image, with the same
//! client and the same workloads, alternating A B A B so that drift (page cache, thermal,
//! neighbours) hits both alike. Produces a table, `compare.json` and `compare.svg`.
//!
//! Every run sees the same image: after a workload that writes (or a server crash), that
//! server is stopped, its copy replaced by a fresh one and the server started again before its
//! next run. Without this, a randwrite round would turn compressed clusters into plain ones
//! and the next round's reads would measure another image (by a different amount per server,
//! since the faster one writes more).
//!
//! Each workload runs once per queue count (`--queues 1,2`: one queue, then two); both servers
//! are started with the largest count and the client uses as many as the run asks for, as a
//! guest uses some of the queues a device offers. With `--cpus N` both servers are pinned to
//! the same N CPUs. For an image of deflate-compressed clusters, libdeflate's rate on its
//! clusters is measured first (`ceiling.rs`) and each qcow2d result is set against that rate
//! times the CPUs it may use.
//!
//! Runs on the main thread; the load itself runs on `load`'s worker threads. Both servers are
//! stopped and the copies removed when the session is dropped, on success and on error.

use crate::ceiling::InflateRate;
use crate::error::{Context, Error, Result};
use crate::load::{run_load, LoadSpec, Phase, RunReport};
use crate::memory::{mib, MemorySummary, Sampler};
use crate::pattern::Pattern;
use crate::procs::{clock_ticks_per_second, CpuSet, Server, ServerSpec};
use crate::signals;
use crate::stats::{merge, LatencySummary};
use crate::svg::{self, ChartRow, ChartValues};
use crate::units::{format_size, parse_size};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const DEFAULT_WORKLOADS: &str = "randread-4k-qd32,read-4k-qd8,read-64k-qd8,randwrite-4k-qd32";

/// One named workload, `<pattern>-<bs>-qd<iodepth>` (e.g. `randread-4k-qd32`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub pattern: Pattern,
    pub block_size_bytes: u64,
    pub iodepth: usize,
}

impl Workload {
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "Invalid workload {name:?}: expected <pattern>-<bs>-qd<N>, e.g. randread-4k-qd32"
            )
        };
        let mut parts = name.trim().split('-');
        let (Some(pattern), Some(bs), Some(qd), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let pattern = Pattern::from_name(pattern)
            .ok_or_else(|| format!("{}: unknown pattern {pattern:?}", bad()))?;
        let block_size_bytes = parse_size(bs).map_err(|e| format!("{}: {e}", bad()))?;
        let iodepth = qd
            .strip_prefix("qd")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(bad)?;
        if block_size_bytes == 0 {
            return Err(format!("{}: zero block size", bad()));
        }
        Ok(Self {
            name: format!(
                "{}-{}-qd{iodepth}",
                pattern.name(),
                format_size(block_size_bytes)
            ),
            pattern,
            block_size_bytes,
            iodepth,
        })
    }
}

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub image: PathBuf,
    pub qcow2d: PathBuf,
    pub workloads: Vec<Workload>,
    pub rounds: usize,
    pub runtime: Duration,
    pub warmup: Duration,
    /// Queue counts the client uses; every workload runs with each.
    pub queues: Vec<usize>,
    /// Pin both servers to this many CPUs.
    pub cpus: Option<usize>,
    pub out: PathBuf,
    pub read_only: bool,
    /// Both servers use direct I/O (O_DIRECT) instead of the host page cache.
    pub direct: bool,
    pub seed: u64,
    pub keep_images: bool,
    /// Interval of the servers' memory timelines.
    pub mem_interval: Duration,
}

/// Index of each server in the session's arrays, in the order they run.
const QCOW2D: usize = 0;
const QSD: usize = 1;
const LABELS: [&str; 2] = ["qcow2d", "QSD"];

/// A server's copy of the image, its socket, and the process if it started.
struct Slot {
    /// `QCOW2D` or `QSD`.
    server: usize,
    image: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    process: Option<Server>,
    /// Why the server could not be started; it is not tried again.
    startup_error: Option<String>,
    /// The image copy was written to (or the server died): the next run needs a fresh copy
    /// and a fresh server, so that every run sees the same image.
    needs_reset: bool,
}

impl Slot {
    fn label(&self) -> &'static str {
        LABELS[self.server]
    }

    /// Starts the server on the slot's image copy; a failure is kept in `startup_error`.
    fn start(&mut self, options: &CompareOptions, cpus: Option<CpuSet>) {
        let queues = options.queues.iter().copied().max().unwrap_or(1);
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
        // A socket left by a previous instance would pass the readiness check too early.
        let _ = std::fs::remove_file(&self.socket);
        let spec = ServerSpec {
            image: &self.image,
            socket: &self.socket,
            queues,
            read_only: options.read_only,
            direct: options.direct,
            log_path: &self.log,
            cpus,
        };
        let started = if self.server == QCOW2D {
            if options.qcow2d.is_file() {
                Server::start_qcow2d(&options.qcow2d, &spec)
            } else {
                Err(Error::msg(format!(
                    "qcow2d binary {} not found",
                    options.qcow2d.display()
                )))
            }
        } else {
            Server::start_qsd(&spec)
        };
        match started {
            Ok(process) => {
                println!(
                    "{}: pid {} serving {}",
                    self.label(),
                    process.pid(),
                    self.socket.display()
                );
                self.process = Some(process);
            }
            Err(e) => {
                println!("{}: NOT RUNNING: {}", self.label(), e.chain());
                self.startup_error = Some(e.chain());
            }
        }
    }

    /// Stops the server, replaces its image with a fresh copy and starts it again.
    fn reset(&mut self, options: &CompareOptions, cpus: Option<CpuSet>) -> Result<()> {
        println!("{}: restarting on a fresh copy of the image", self.label());
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
        copy_image(&options.image, &self.image)?;
        self.needs_reset = false;
        self.start(options, cpus);
        Ok(())
    }
}

/// Everything `compare` creates; dropping it stops the servers, then removes sockets and (unless
/// kept) the image copies.
struct Session {
    slots: [Slot; 2],
    socket_dir: PathBuf,
    keep_images: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut process) = slot.process.take() {
                process.stop();
            }
        }
        let _ = std::fs::remove_dir_all(&self.socket_dir);
        if !self.keep_images {
            for slot in &self.slots {
                let _ = std::fs::remove_file(&slot.image);
            }
        }
    }
}

/// One measured run and the server CPU time spent in its measured window.
struct Round {
    report: RunReport,
    cpu_ticks: Option<u64>,
}

/// All rounds of one workload on one server, or why it failed.
#[derive(Default)]
struct Tally {
    rounds: Vec<Round>,
    failure: Option<String>,
}

/// A server's merged result for one workload.
#[derive(Debug, Serialize)]
pub struct ServerResult {
    pub ios: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub latency: LatencySummary,
    /// Server CPU (user + system) per I/O in the measured windows, microseconds.
    pub cpu_us_per_io: Option<f64>,
    /// Server resident memory without the guest memory it maps (each round's timeline is in
    /// `rounds[].memory`).
    pub memory: Option<MemorySummary>,
    pub rounds: Vec<RunReport>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Ok(ServerResult),
    Failed { reason: String },
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    /// qcow2d IOPS / QSD IOPS: above 1 is qcow2d faster.
    pub iops: f64,
    /// qcow2d p99 / QSD p99: below 1 is qcow2d faster.
    pub p99: f64,
}

#[derive(Debug, Serialize)]
pub struct WorkloadResult {
    #[serde(flatten)]
    pub workload: Workload,
    /// Queues the client used.
    pub queues: usize,
    pub qcow2d: Outcome,
    pub qsd: Outcome,
    pub ratio_qcow2d_over_qsd: Option<Ratio>,
    /// qcow2d's compressed clusters inflated per second (reads per second, or whole clusters
    /// per second for reads of a cluster or more) over the inflate ceiling; reads only.
    pub qcow2d_share_of_ceiling: Option<f64>,
}

/// libdeflate's rate on the image's clusters, times the CPUs the servers may use.
#[derive(Debug, Serialize)]
pub struct Ceiling {
    #[serde(flatten)]
    pub rate: InflateRate,
    pub cpus: usize,
    pub clusters_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub image: String,
    pub qcow2d_binary: String,
    pub queues: Vec<usize>,
    /// The CPUs both servers were pinned to (`None`: not pinned).
    pub pinned_cpus: Option<Vec<usize>>,
    /// The inflate ceiling, for an image of deflate-compressed clusters.
    pub ceiling: Option<Ceiling>,
    pub rounds: usize,
    pub runtime_s: f64,
    pub warmup_s: f64,
    pub read_only: bool,
    /// Both servers used direct I/O (qcow2d `--direct`, qemu-storage-daemon `cache.direct=on`).
    pub direct: bool,
    pub seed: u64,
    pub clock_ticks_per_second: u64,
    /// Why qcow2d could not be started, if it could not.
    pub qcow2d_server: Option<String>,
    /// Why qemu-storage-daemon could not be started, if it could not.
    pub qsd_server: Option<String>,
    pub workloads: Vec<WorkloadResult>,
}

/// Copies `from` to `to`, sharing extents when the file system can.
fn copy_image(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("--reflink=auto")
        .arg("--sparse=always")
        .arg("--")
        .arg(from)
        .arg(to)
        .status()
        .context("Running cp")?;
    if !status.success() {
        return Err(Error::msg(format!(
            "cp {} {} failed ({status})",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}

pub fn compare(options: &CompareOptions) -> Result<CompareReport> {
    if !options.image.is_file() {
        return Err(Error::msg(format!(
            "Image {} not found",
            options.image.display()
        )));
    }
    if options.rounds == 0 {
        return Err(Error::msg("At least one round is needed"));
    }
    if options.queues.is_empty() || options.queues.contains(&0) {
        return Err(Error::msg("Queue counts must be at least 1"));
    }
    let cpus = options.cpus.map(CpuSet::first).transpose()?;
    let cores = match &cpus {
        Some(set) => set.list().len(),
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let ceiling = match crate::ceiling::measure(&options.image) {
        Ok(rate) => rate.map(|rate| Ceiling {
            rate,
            cpus: cores,
            clusters_per_s: rate.clusters_per_s_per_core * cores as f64,
        }),
        Err(e) => {
            println!("inflate ceiling not measured: {}", e.chain());
            None
        }
    };
    if let Some(c) = &ceiling {
        println!(
            "inflate ceiling: libdeflate {:.0} clusters/s per core on this image ({} clusters sampled) x {} CPUs = {:.0} clusters/s",
            c.rate.clusters_per_s_per_core, c.rate.sample_clusters, c.cpus, c.clusters_per_s
        );
    }
    let cases: Vec<(&Workload, usize)> = options
        .workloads
        .iter()
        .flat_map(|w| options.queues.iter().map(move |&q| (w, q)))
        .collect();
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("Creating {}", options.out.display()))?;
    let images_dir = options.out.join("images");
    std::fs::create_dir_all(&images_dir)
        .with_context(|| format!("Creating {}", images_dir.display()))?;
    // Unix socket paths are limited to 108 bytes, so sockets go to a short temporary path.
    let socket_dir = std::env::temp_dir().join(format!("qcow2d-bench-{}", std::process::id()));
    std::fs::create_dir_all(&socket_dir)
        .with_context(|| format!("Creating {}", socket_dir.display()))?;

    let slot = |server: usize, name: &str, log: &str| Slot {
        server,
        image: images_dir.join(format!("{name}.qcow2")),
        socket: socket_dir.join(format!("{name}.sock")),
        log: options.out.join(log),
        process: None,
        startup_error: None,
        needs_reset: false,
    };
    let mut session = Session {
        slots: [
            slot(QCOW2D, "a-qcow2d", "qcow2d.log"),
            slot(QSD, "b-qsd", "qsd.log"),
        ],
        socket_dir,
        keep_images: options.keep_images,
    };

    for s in &mut session.slots {
        if signals::interrupted() {
            return Err(Error::msg("Interrupted"));
        }
        // Logs are appended to across restarts, so start them empty.
        let _ = std::fs::remove_file(&s.log);
        println!(
            "copying {} -> {}",
            options.image.display(),
            s.image.display()
        );
        copy_image(&options.image, &s.image)?;
        s.start(options, cpus);
    }
    if session.slots.iter().all(|s| s.process.is_none()) {
        return Err(Error::msg("Neither server started; nothing to compare"));
    }

    let mut tallies: Vec<[Tally; 2]> = cases.iter().map(|_| Default::default()).collect();
    for round in 1..=options.rounds {
        for (&(workload, queues), tally) in cases.iter().zip(&mut tallies) {
            for server in [QCOW2D, QSD] {
                if tally[server].failure.is_some() {
                    continue;
                }
                if signals::interrupted() {
                    return Err(Error::msg("Interrupted; servers stopped"));
                }
                let slot = &mut session.slots[server];
                if slot.needs_reset && slot.startup_error.is_none() {
                    slot.reset(options, cpus)?;
                }
                if let Some(reason) = &slot.startup_error {
                    tally[server].failure = Some(reason.clone());
                    continue;
                }
                print!(
                    "round {round}/{} {:<24} {:<7} ",
                    options.rounds,
                    case_name(workload, queues),
                    LABELS[server]
                );
                flush_stdout();
                let outcome = run_one(slot, workload, queues, options);
                if signals::interrupted() {
                    println!("interrupted");
                    return Err(Error::msg("Interrupted; servers stopped"));
                }
                match outcome {
                    Ok(round) => {
                        println!(
                            "{:>9.0} IOPS  p99 {:>8.1} us",
                            round.report.iops, round.report.latency.p99_us
                        );
                        tally[server].rounds.push(round);
                    }
                    Err(reason) => {
                        println!("FAILED: {reason}");
                        tally[server].failure = Some(reason);
                    }
                }
            }
        }
    }

    let ticks_per_second = clock_ticks_per_second();
    let workloads = cases
        .iter()
        .zip(tallies)
        .map(|(&(workload, queues), [a, b])| {
            let qcow2d = aggregate(a, ticks_per_second)?;
            let qsd = aggregate(b, ticks_per_second)?;
            let ratio = match (&qcow2d, &qsd) {
                (Outcome::Ok(a), Outcome::Ok(b)) if b.iops > 0.0 && b.latency.p99_us > 0.0 => {
                    Some(Ratio {
                        iops: a.iops / b.iops,
                        p99: a.latency.p99_us / b.latency.p99_us,
                    })
                }
                _ => None,
            };
            let share = match (&qcow2d, &ceiling) {
                (Outcome::Ok(r), Some(c))
                    if workload.pattern == Pattern::Read
                        || workload.pattern == Pattern::Randread =>
                {
                    // A read of n whole clusters inflates n; a smaller one at most one.
                    let per_read = (workload.block_size_bytes / c.rate.cluster_size_bytes).max(1);
                    Some(r.iops * per_read as f64 / c.clusters_per_s)
                }
                _ => None,
            };
            Ok(WorkloadResult {
                workload: workload.clone(),
                queues,
                qcow2d,
                qsd,
                ratio_qcow2d_over_qsd: ratio,
                qcow2d_share_of_ceiling: share,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let [qcow2d_slot, qsd_slot] = &session.slots;
    let report = CompareReport {
        image: options.image.display().to_string(),
        qcow2d_binary: options.qcow2d.display().to_string(),
        queues: options.queues.clone(),
        pinned_cpus: cpus.map(|c| c.list()),
        ceiling,
        rounds: options.rounds,
        runtime_s: options.runtime.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        read_only: options.read_only,
        direct: options.direct,
        seed: options.seed,
        clock_ticks_per_second: ticks_per_second,
        qcow2d_server: qcow2d_slot.startup_error.clone(),
        qsd_server: qsd_slot.startup_error.clone(),
        workloads,
    };
    drop(session);

    let json_path = options.out.join("compare.json");
    let json = serde_json::to_string_pretty(&report).context("Encoding compare.json")?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("Writing {}", json_path.display()))?;
    let svg_path = options.out.join("compare.svg");
    std::fs::write(
        &svg_path,
        svg::render(&chart_rows(&report), &chart_title(&report)),
    )
    .with_context(|| format!("Writing {}", svg_path.display()))?;
    print_table(&report);
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(report)
}

/// `<workload> q<queues>`, as the table and the chart name a run.
fn case_name(workload: &Workload, queues: usize) -> String {
    format!("{} q{queues}", workload.name)
}

fn flush_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Runs one workload against one server, sampling its CPU time around the measured window.
/// `Err` carries the reason the workload failed on this server.
fn run_one(
    slot: &mut Slot,
    workload: &Workload,
    queues: usize,
    options: &CompareOptions,
) -> std::result::Result<Round, String> {
    let Some(process) = slot.process.as_mut() else {
        return Err("server not running".into());
    };
    if let Err(reason) = process.check_running() {
        slot.needs_reset = true;
        return Err(reason);
    }
    let spec = LoadSpec {
        socket: slot.socket.clone(),
        pattern: workload.pattern,
        block_size_bytes: workload.block_size_bytes,
        iodepth: workload.iodepth,
        queues,
        runtime: options.runtime,
        warmup: options.warmup,
        region_start_bytes: 0,
        region_size_bytes: None,
        seed: options.seed,
        rwmix_read_percent: 70,
        stop_on_error: true,
    };
    let mut start_ticks = None;
    let mut end_ticks = None;
    // A server whose memory cannot be read is still measured for speed.
    let mut sampler = Sampler::start(process.pid(), options.mem_interval).ok();
    let result = {
        let process: &Server = process;
        run_load(&spec, &mut |phase| {
            let ticks = process.cpu_ticks().ok();
            match phase {
                Phase::MeasureStart => {
                    start_ticks = ticks;
                    if let Some(s) = sampler.as_mut() {
                        s.mark_start();
                    }
                }
                Phase::MeasureEnd => {
                    end_ticks = ticks;
                    if let Some(s) = sampler.as_mut() {
                        s.mark_end();
                    }
                }
            }
        })
    };
    let memory = sampler.map(Sampler::finish);
    // A server that died during the run explains any error better than the client's view.
    if let Err(reason) = process.check_running() {
        slot.needs_reset = true;
        return Err(reason);
    }
    // Writes change the image, so whatever runs next gets a fresh copy. (A run that failed to
    // set up submitted nothing.)
    let mut report = result.map_err(|e| e.chain())?;
    report.memory = memory;
    if !workload.pattern.is_read_only() {
        slot.needs_reset = true;
    }
    if let Some(reason) = report.failure_reason() {
        return Err(reason);
    }
    let cpu_ticks = match (start_ticks, end_ticks) {
        (Some(start), Some(end)) => end.checked_sub(start),
        _ => None,
    };
    Ok(Round { report, cpu_ticks })
}

/// Merges the rounds of one workload on one server.
fn aggregate(tally: Tally, ticks_per_second: u64) -> Result<Outcome> {
    if let Some(reason) = tally.failure {
        return Ok(Outcome::Failed { reason });
    }
    if tally.rounds.is_empty() {
        return Ok(Outcome::Failed {
            reason: "no run completed".into(),
        });
    }
    let histogram = merge(tally.rounds.iter().map(|r| &r.report.histogram))
        .context("Merging latency histograms of the rounds")?;
    let ios: u64 = tally.rounds.iter().map(|r| r.report.ios).sum();
    let bytes: u64 = tally.rounds.iter().map(|r| r.report.bytes).sum();
    let seconds: f64 = tally.rounds.iter().map(|r| r.report.runtime_s).sum();
    let cpu_ticks: Option<u64> = tally.rounds.iter().map(|r| r.cpu_ticks).sum();
    let cpu_us_per_io = cpu_ticks
        .filter(|_| ios > 0)
        .map(|ticks| ticks as f64 * 1e6 / ticks_per_second as f64 / ios as f64);
    let rate = |count: u64| {
        if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        }
    };
    Ok(Outcome::Ok(ServerResult {
        ios,
        iops: rate(ios),
        mb_per_s: rate(bytes) / 1e6,
        latency: LatencySummary::of(&histogram),
        cpu_us_per_io,
        memory: MemorySummary::of(tally.rounds.iter().filter_map(|r| r.report.memory.as_ref())),
        rounds: tally.rounds.into_iter().map(|r| r.report).collect(),
    }))
}

fn print_table(report: &CompareReport) {
    println!();
    if let Some(cpus) = &report.pinned_cpus {
        println!("both servers pinned to CPUs {cpus:?}");
    }
    if let Some(c) = &report.ceiling {
        println!(
            "inflate ceiling: {:.0} clusters/s per core x {} CPUs = {:.0} clusters/s",
            c.rate.clusters_per_s_per_core, c.cpus, c.clusters_per_s
        );
    }
    println!(
        "cache mode: {}",
        if report.direct {
            "direct I/O (qcow2d --direct, qemu-storage-daemon cache.direct=on)"
        } else {
            "host page cache (qcow2d default, qemu-storage-daemon cache.direct=off)"
        }
    );
    println!(
        "{:<24} {:<7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "workload", "server", "IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "CPU us/IO"
    );
    for w in &report.workloads {
        for (label, outcome) in [(LABELS[QCOW2D], &w.qcow2d), (LABELS[QSD], &w.qsd)] {
            let name = if label == LABELS[QCOW2D] {
                case_name(&w.workload, w.queues)
            } else {
                String::new()
            };
            match outcome {
                Outcome::Ok(r) => println!(
                    "{name:<24} {label:<7} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10}",
                    r.iops,
                    r.mb_per_s,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.latency.p999_us,
                    r.cpu_us_per_io
                        .map_or_else(|| "-".to_string(), |c| format!("{c:.1}"))
                ),
                Outcome::Failed { reason } => {
                    println!("{name:<24} {label:<7} FAILED: {reason}")
                }
            }
        }
        if let Some(ratio) = &w.ratio_qcow2d_over_qsd {
            println!(
                "{:<24} qcow2d/QSD: IOPS x{:.2}, p99 x{:.2}",
                "", ratio.iops, ratio.p99
            );
        }
        if let Some(share) = w.qcow2d_share_of_ceiling {
            println!(
                "{:<24} qcow2d at {:.0} % of the inflate ceiling",
                "",
                share * 100.0
            );
        }
    }
    println!();
    println!("server resident memory, anon+file (guest memory it maps not counted):");
    println!(
        "{:<24} {:<7} {:>12} {:>12} {:>12} {:>14}",
        "workload", "server", "start", "end", "peak", "round growth"
    );
    for w in &report.workloads {
        for (label, outcome) in [(LABELS[QCOW2D], &w.qcow2d), (LABELS[QSD], &w.qsd)] {
            let name = if label == LABELS[QCOW2D] {
                case_name(&w.workload, w.queues)
            } else {
                String::new()
            };
            if let Outcome::Ok(ServerResult {
                memory: Some(m), ..
            }) = outcome
            {
                println!(
                    "{name:<24} {label:<7} {:>12} {:>12} {:>12} {:>+10.1} MiB",
                    mib(m.start_kib),
                    mib(m.end_kib),
                    mib(m.peak_kib),
                    m.max_round_growth_kib as f64 / 1024.0
                );
            } else {
                println!("{name:<24} {label:<7} {:>12}", "-");
            }
        }
    }
    println!();
}

fn chart_title(report: &CompareReport) -> String {
    let image = Path::new(&report.image).file_name().map_or_else(
        || report.image.clone(),
        |n| n.to_string_lossy().into_owned(),
    );
    format!(
        "qcow2d vs qemu-storage-daemon: {image}, {} queue(s), {} round(s) x {} s, {}{}",
        report
            .queues
            .iter()
            .map(|q| q.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        report.rounds,
        report.runtime_s,
        if report.direct {
            "direct I/O"
        } else {
            "page cache"
        },
        report
            .pinned_cpus
            .as_ref()
            .map_or_else(String::new, |c| format!(", {} CPU(s)", c.len()))
    )
}

fn chart_rows(report: &CompareReport) -> Vec<ChartRow> {
    let values = |outcome: &Outcome| match outcome {
        Outcome::Ok(r) => Ok(ChartValues {
            p50_us: r.latency.p50_us,
            p99_us: r.latency.p99_us,
            p999_us: r.latency.p999_us,
            iops: r.iops,
        }),
        Outcome::Failed { reason } => Err(reason.clone()),
    };
    report
        .workloads
        .iter()
        .map(|w| ChartRow {
            name: case_name(&w.workload, w.queues),
            servers: [values(&w.qcow2d), values(&w.qsd)],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_parse() {
        let w = Workload::parse("randread-4k-qd32").unwrap();
        assert_eq!(w.pattern, Pattern::Randread);
        assert_eq!(w.block_size_bytes, 4096);
        assert_eq!(w.iodepth, 32);
        assert_eq!(w.name, "randread-4k-qd32");
        let w = Workload::parse("read-64K-qd8").unwrap();
        assert_eq!((w.block_size_bytes, w.iodepth), (65536, 8));
        assert_eq!(w.name, "read-64k-qd8", "names are normalized");
        for bad in [
            "randread-4k",
            "randread-4k-32",
            "rand-4k-qd32",
            "read-4x-qd1",
            "read-4k-qd0",
            "read-0-qd1",
            "a-b-c-d",
        ] {
            assert!(Workload::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_workloads_parse() {
        let list: Vec<Workload> = DEFAULT_WORKLOADS
            .split(',')
            .map(|name| Workload::parse(name).unwrap())
            .collect();
        let names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "randread-4k-qd32",
                "read-4k-qd8",
                "read-64k-qd8",
                "randwrite-4k-qd32"
            ]
        );
    }
}
