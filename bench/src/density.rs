//! `qcow2d-bench density`: many exports in one server, one client each, side by side with
//! qemu-storage-daemon.
//!
//! Each server serves the same image as N read-only exports (qcow2d from one config file,
//! qemu-storage-daemon with N `--blockdev` pairs and N `--export`s). Once every socket
//! accepts, its threads and own memory are read with no client (idle); then N clients
//! connect at once (libblkio, one queue each, 4 KiB random reads at the given depth) and run
//! for the same time. Reported per server: aggregate IOPS, the worst p99 of any client, the
//! threads and own memory idle and under load (threads in the middle of the measured window,
//! memory at its peak). Runs on the main thread; each client runs `load::run_load` on a
//! thread of its own.

use crate::error::{Context, Error, Result};
use crate::load::{run_load, LoadSpec, RunReport};
use crate::memory::{mib, read_rss, Sampler};
use crate::pattern::Pattern;
use crate::procs::{clock_ticks_per_second, Server};
use crate::signals;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything a density run needs, already parsed.
#[derive(Clone, Debug)]
pub struct DensityOptions {
    pub image: PathBuf,
    pub qcow2d: PathBuf,
    pub exports: usize,
    pub iodepth: usize,
    pub block_size_bytes: u64,
    pub runtime: Duration,
    pub warmup: Duration,
    pub out: PathBuf,
    pub seed: u64,
}

/// One server's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct DensityResult {
    pub server: String,
    pub exports: usize,
    pub idle_threads: u64,
    pub idle_own_kib: u64,
    pub idle_anon_kib: u64,
    pub busy_threads: u64,
    pub busy_peak_own_kib: u64,
    pub iops: f64,
    /// The server's CPU time (user and system) per request over the measured window, in
    /// microseconds: what the requests cost it, whatever share of the CPUs it got.
    pub cpu_us_per_io: Option<f64>,
    /// The highest p99 latency of any one client, in microseconds.
    pub worst_p99_us: f64,
    /// The median of the clients' p99 latencies, in microseconds.
    pub median_p99_us: f64,
    pub errors: u64,
    /// Why a client failed, if one did.
    pub failure: Option<String>,
}

/// Both servers' numbers.
#[derive(Clone, Debug, Serialize)]
pub struct DensityReport {
    pub image: String,
    pub exports: usize,
    pub block_size_bytes: u64,
    pub iodepth: usize,
    pub runtime_s: f64,
    pub warmup_s: f64,
    pub results: Vec<DensityResult>,
}

/// `Threads:` of `/proc/PID/status`.
fn threads(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("Reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::msg(format!("{path} has no Threads line")))
}

/// The qcow2d config file serving `image` read-only on every socket of `sockets`.
fn qcow2d_config(image: &Path, sockets: &[PathBuf]) -> String {
    let mut text = String::new();
    for socket in sockets {
        text.push_str(&format!(
            "[[export]]\nimage = {:?}\nsocket = {:?}\nread_only = true\nqueues = 1\n",
            image.display().to_string(),
            socket.display().to_string()
        ));
    }
    text
}

/// Runs the density workload against qcow2d, then qemu-storage-daemon; writes
/// `OUT/density.json` and prints a table.
pub fn density(options: &DensityOptions) -> Result<DensityReport> {
    if options.exports == 0 {
        return Err(Error::msg("--exports must be at least 1"));
    }
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("Creating {}", options.out.display()))?;
    // The config file names the sockets, and a relative name in it is relative to the file.
    let out = std::path::absolute(&options.out)
        .with_context(|| format!("Resolving {}", options.out.display()))?;
    let image = std::path::absolute(&options.image)
        .with_context(|| format!("Resolving {}", options.image.display()))?;
    let sockets: Vec<PathBuf> = (0..options.exports)
        .map(|i| out.join(format!("density-{i}.sock")))
        .collect();
    let mut results = Vec::new();
    for server in ["qcow2d", "qemu-storage-daemon"] {
        for socket in &sockets {
            let _ = std::fs::remove_file(socket);
        }
        let log = out.join(format!("density-{server}.log"));
        let _ = std::fs::remove_file(&log);
        let mut process = if server == "qcow2d" {
            let config = out.join("density-qcow2d.toml");
            std::fs::write(&config, qcow2d_config(&image, &sockets))
                .with_context(|| format!("Writing {}", config.display()))?;
            Server::start_qcow2d_config(&options.qcow2d, &config, &sockets, &log)?
        } else {
            Server::start_qsd_exports(&image, &sockets, &log)?
        };
        let result = measure(options, &mut process, server, &sockets);
        process.stop();
        results.push(result?);
        if signals::interrupted() {
            return Err(Error::msg("Interrupted"));
        }
    }
    let report = DensityReport {
        image: image.display().to_string(),
        exports: options.exports,
        block_size_bytes: options.block_size_bytes,
        iodepth: options.iodepth,
        runtime_s: options.runtime.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        results,
    };
    print_report(&report);
    let path = options.out.join("density.json");
    let json = serde_json::to_string_pretty(&report).context("Encoding the result as JSON")?;
    std::fs::write(&path, json + "\n").with_context(|| format!("Writing {}", path.display()))?;
    Ok(report)
}

fn measure(
    options: &DensityOptions,
    server: &mut Server,
    name: &str,
    sockets: &[PathBuf],
) -> Result<DensityResult> {
    let pid = server.pid();
    // Settled: the threads of the probe connections are gone (the count holds for a second,
    // or 20 s passed).
    let mut idle_threads = threads(pid)?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(1));
        let now = threads(pid)?;
        if now == idle_threads {
            break;
        }
        idle_threads = now;
    }
    let idle = read_rss(pid)?;
    let sampler = Sampler::start(pid, options.runtime + options.warmup)?;
    let clients: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(i, socket)| {
            let spec = LoadSpec {
                socket: socket.clone(),
                pattern: Pattern::Randread,
                block_size_bytes: options.block_size_bytes,
                iodepth: options.iodepth,
                queues: 1,
                runtime: options.runtime,
                warmup: options.warmup,
                region_start_bytes: 0,
                region_size_bytes: None,
                seed: options.seed.wrapping_add(i as u64),
                rwmix_read_percent: 100,
                stop_on_error: false,
            };
            std::thread::Builder::new()
                .name(format!("density-{i}"))
                .spawn(move || run_load(&spec, &mut |_| {}))
                .context("Starting a client thread")
        })
        .collect::<Result<_>>()?;
    // The server's CPU time over (about) the measured window: from the end of the warm-up
    // to the end of the run, the clients' measured window.
    std::thread::sleep(options.warmup);
    let ticks_start = server.cpu_ticks().ok();
    std::thread::sleep(options.runtime / 2);
    let busy_threads = threads(pid).unwrap_or(0);
    std::thread::sleep(options.runtime - options.runtime / 2);
    let ticks_end = server.cpu_ticks().ok();
    let mut reports: Vec<RunReport> = Vec::with_capacity(clients.len());
    let mut failure = None;
    for client in clients {
        match client.join() {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(e)) => {
                failure.get_or_insert(e.chain());
            }
            Err(_) => {
                failure.get_or_insert("a client thread panicked".into());
            }
        }
    }
    let memory = sampler.finish();
    if let Err(reason) = server.check_running() {
        failure.get_or_insert(reason);
    }
    let mut p99s: Vec<f64> = reports.iter().map(|r| r.latency.p99_us).collect();
    p99s.sort_by(f64::total_cmp);
    for r in &reports {
        if let Some(reason) = r.failure_reason() {
            failure.get_or_insert(reason);
        }
    }
    let iops: f64 = reports.iter().map(|r| r.iops).sum();
    let cpu_us_per_io = match (ticks_start, ticks_end) {
        (Some(a), Some(b)) if iops > 0.0 => Some(
            b.saturating_sub(a) as f64 / clock_ticks_per_second() as f64 * 1e6
                / (iops * options.runtime.as_secs_f64()),
        ),
        _ => None,
    };
    Ok(DensityResult {
        server: name.to_owned(),
        exports: sockets.len(),
        idle_threads,
        idle_own_kib: idle.own_kib(),
        idle_anon_kib: idle.anon_kib,
        busy_threads,
        busy_peak_own_kib: memory.peak_kib,
        iops,
        cpu_us_per_io,
        worst_p99_us: p99s.last().copied().unwrap_or(0.0),
        median_p99_us: p99s.get(p99s.len() / 2).copied().unwrap_or(0.0),
        errors: reports.iter().map(|r| r.errors).sum(),
        failure,
    })
}

fn print_report(report: &DensityReport) {
    println!(
        "density: {} exports of {}, one client each (1 queue, QD{}, {} B random reads, {} s \
         after {} s warm-up)",
        report.exports,
        report.image,
        report.iodepth,
        report.block_size_bytes,
        report.runtime_s,
        report.warmup_s
    );
    println!(
        "  {:<20} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12} {:>12} {:>13}",
        "server",
        "IOPS",
        "CPU/IO",
        "worst p99",
        "median p99",
        "threads",
        "own idle",
        "threads busy",
        "own busy peak"
    );
    for r in &report.results {
        println!(
            "  {:<20} {:>10.0} {:>7} us {:>9.1} us {:>9.1} us {:>10} {:>12} {:>12} {:>13}",
            r.server,
            r.iops,
            r.cpu_us_per_io
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
            r.worst_p99_us,
            r.median_p99_us,
            r.idle_threads,
            mib(r.idle_own_kib),
            r.busy_threads,
            mib(r.busy_peak_own_kib)
        );
        if let Some(why) = &r.failure {
            println!("    FAILED: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_has_one_read_only_single_queue_export_per_socket() {
        let sockets = [PathBuf::from("/run/a.sock"), PathBuf::from("/run/b.sock")];
        let text = qcow2d_config(Path::new("/img/x.qcow2"), &sockets);
        assert_eq!(text.matches("[[export]]").count(), 2);
        assert_eq!(text.matches("image = \"/img/x.qcow2\"").count(), 2);
        assert!(text.contains("socket = \"/run/b.sock\""));
        assert_eq!(text.matches("read_only = true").count(), 2);
        assert_eq!(text.matches("queues = 1").count(), 2);
    }
}
