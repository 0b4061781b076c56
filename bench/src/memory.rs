//! The server's resident memory during a run, not counting the guest memory it maps.
//!
//! The guest's RAM (here: libblkio's I/O buffers) is a memfd the server maps shared; the kernel
//! counts such pages as shared memory (`RssShmem`), apart from the server's own anonymous
//! memory (`RssAnon`: heap, stacks, caches) and its file-backed mappings (`RssFile`: the
//! executable and libraries). The server's figure is `RssAnon + RssFile`, read from
//! `/proc/PID/status`: three counters the kernel keeps anyway, cheap to read every fraction of
//! a second. `/proc/PID/smaps_rollup` is exact too but walks every page table of the process
//! under its mmap lock, guest memory included, which costs the server time on each sample;
//! it would only add proportional (PSS) figures, which do not matter for one daemon.
//!
//! A [`Sampler`] thread reads the counters every [`PEAK_INTERVAL`] for the peak and keeps one
//! sample every `interval` (plus the first and the last) for the timeline. Started and stopped
//! from the thread that runs the load.

use crate::error::{Context, Error, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the sampler reads the counters, for the peak.
pub const PEAK_INTERVAL: Duration = Duration::from_millis(200);

/// The memory counters of `/proc/PID/status`, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rss {
    pub anon_kib: u64,
    pub file_kib: u64,
    /// Shared memory: the guest memory the server maps (not the server's own).
    pub shmem_kib: u64,
}

impl Rss {
    /// The server's own resident memory: anonymous plus file-backed, without shared memory.
    pub fn own_kib(&self) -> u64 {
        self.anon_kib + self.file_kib
    }
}

/// Parses `RssAnon`, `RssFile` and `RssShmem` (in kB) out of the text of `/proc/PID/status`.
pub fn parse_status(status: &str) -> Option<Rss> {
    let mut anon = None;
    let mut file = None;
    let mut shmem = None;
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "RssAnon" => &mut anon,
            "RssFile" => &mut file,
            "RssShmem" => &mut shmem,
            _ => continue,
        };
        let mut words = value.split_whitespace();
        let number = words.next()?.parse::<u64>().ok()?;
        if words.next() != Some("kB") {
            return None;
        }
        *slot = Some(number);
    }
    Some(Rss {
        anon_kib: anon?,
        file_kib: file?,
        shmem_kib: shmem?,
    })
}

/// Reads the counters of process `pid`.
pub fn read_rss(pid: u32) -> Result<Rss> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("Reading {path}"))?;
    parse_status(&text).ok_or_else(|| {
        Error::msg(format!(
            "{path} has no RssAnon/RssFile/RssShmem lines in kB"
        ))
    })
}

/// One point of the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Milliseconds since the sampler started.
    pub at_ms: u64,
    #[serde(flatten)]
    pub rss: Rss,
    /// `anon_kib + file_kib`.
    pub own_kib: u64,
}

impl Sample {
    fn new(at: Duration, rss: Rss) -> Sample {
        Sample {
            at_ms: u64::try_from(at.as_millis()).unwrap_or(u64::MAX),
            rss,
            own_kib: rss.own_kib(),
        }
    }
}

/// What the sampler saw over one run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    pub pid: u32,
    /// Own resident memory (anon + file) when the measured window started and ended, KiB.
    pub start_kib: u64,
    pub end_kib: u64,
    /// The highest own resident memory of any sample (every 200 ms), warm-up included, KiB.
    pub peak_kib: u64,
    /// `end_kib - start_kib` (negative: shrank).
    pub growth_kib: i64,
    /// Guest memory mapped by the server at the end (shared, not counted above), KiB.
    pub shmem_end_kib: u64,
    /// One sample per interval, plus the first and the last.
    pub samples: Vec<Sample>,
    /// Why some samples are missing (the process exited, /proc unreadable).
    pub error: Option<String>,
}

impl MemoryReport {
    /// Lines for the human output.
    pub fn print_human(&self, indent: &str) {
        println!(
            "{indent}server RSS (anon+file, pid {}): start {}  end {}  peak {}  growth {:+.1} MiB  (guest memory mapped: {})",
            self.pid,
            mib(self.start_kib),
            mib(self.end_kib),
            mib(self.peak_kib),
            self.growth_kib as f64 / 1024.0,
            mib(self.shmem_end_kib)
        );
        if let Some(e) = &self.error {
            println!("{indent}  sampling error: {e}");
        }
    }

    /// The timeline, one line per sample.
    pub fn print_timeline(&self, indent: &str) {
        println!(
            "{indent}{:>8} {:>10} {:>10} {:>10} {:>10}",
            "t s", "own MiB", "anon MiB", "file MiB", "shmem MiB"
        );
        for s in &self.samples {
            println!(
                "{indent}{:>8.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                s.at_ms as f64 / 1000.0,
                s.own_kib as f64 / 1024.0,
                s.rss.anon_kib as f64 / 1024.0,
                s.rss.file_kib as f64 / 1024.0,
                s.rss.shmem_kib as f64 / 1024.0
            );
        }
    }
}

/// One server's memory over all rounds of a workload (the server may have been restarted
/// between rounds on a fresh image copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemorySummary {
    /// At the start of the first round's measured window, KiB.
    pub start_kib: u64,
    /// At the end of the last round's measured window, KiB.
    pub end_kib: u64,
    /// Highest of all rounds, KiB.
    pub peak_kib: u64,
    /// Largest end-minus-start of one round, KiB.
    pub max_round_growth_kib: i64,
}

impl MemorySummary {
    /// Summarizes rounds in order; `None` without any memory report.
    pub fn of<'a>(reports: impl IntoIterator<Item = &'a MemoryReport>) -> Option<MemorySummary> {
        let mut summary: Option<MemorySummary> = None;
        for r in reports {
            let s = summary.get_or_insert(MemorySummary {
                start_kib: r.start_kib,
                end_kib: r.end_kib,
                peak_kib: r.peak_kib,
                max_round_growth_kib: r.growth_kib,
            });
            s.end_kib = r.end_kib;
            s.peak_kib = s.peak_kib.max(r.peak_kib);
            s.max_round_growth_kib = s.max_round_growth_kib.max(r.growth_kib);
        }
        summary
    }
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// State the sampler thread fills in.
#[derive(Default)]
struct Collected {
    samples: Vec<Sample>,
    peak_kib: u64,
    last: Option<Sample>,
    error: Option<String>,
}

impl Collected {
    fn record(&mut self, started: Instant, interval: Duration, rss: Result<Rss>) {
        let rss = match rss {
            Ok(rss) => rss,
            Err(e) => {
                self.error.get_or_insert_with(|| e.chain());
                return;
            }
        };
        let sample = Sample::new(started.elapsed(), rss);
        self.peak_kib = self.peak_kib.max(sample.own_kib);
        let due = match self.samples.last() {
            None => true,
            Some(prev) => sample.at_ms >= prev.at_ms + interval.as_millis() as u64,
        };
        if due {
            self.samples.push(sample);
        }
        self.last = Some(sample);
    }
}

/// A thread sampling one process until stopped; see the module documentation.
pub struct Sampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Collected>>,
    start: Option<Rss>,
    end: Option<Rss>,
}

impl Sampler {
    /// Starts sampling `pid`, keeping one timeline sample per `interval`.
    pub fn start(pid: u32, interval: Duration) -> Result<Sampler> {
        // Fails early (and clearly) on a wrong PID.
        read_rss(pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("bench-rss".into())
            .spawn(move || {
                let started = Instant::now();
                let mut collected = Collected::default();
                loop {
                    collected.record(started, interval, read_rss(pid));
                    // Sleep in small steps so that stop() returns quickly.
                    let wake = Instant::now() + PEAK_INTERVAL;
                    while Instant::now() < wake {
                        if stop2.load(Ordering::Relaxed) {
                            collected.record(started, interval, read_rss(pid));
                            return collected;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .context("Starting the RSS sampler thread")?;
        Ok(Sampler {
            pid,
            stop,
            thread: Some(thread),
            start: None,
            end: None,
        })
    }

    /// Reads the counters now as the start of the measured window.
    pub fn mark_start(&mut self) {
        self.start = read_rss(self.pid).ok();
    }

    /// Reads the counters now as the end of the measured window.
    pub fn mark_end(&mut self) {
        self.end = read_rss(self.pid).ok();
    }

    /// Stops the thread and returns what it saw.
    pub fn finish(mut self) -> MemoryReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut collected = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(c)) => c,
            _ => Collected {
                error: Some("the sampler thread panicked".into()),
                ..Collected::default()
            },
        };
        // The last sample always ends the timeline.
        if let Some(last) = collected.last {
            if collected.samples.last() != Some(&last) {
                collected.samples.push(last);
            }
        }
        let first = collected.samples.first().map(|s| s.rss);
        let start = self.start.or(first).unwrap_or_default();
        let end = self
            .end
            .or(collected.last.map(|s| s.rss))
            .unwrap_or_default();
        let peak_kib = collected.peak_kib.max(start.own_kib()).max(end.own_kib());
        MemoryReport {
            pid: self.pid,
            start_kib: start.own_kib(),
            end_kib: end.own_kib(),
            peak_kib,
            growth_kib: end.own_kib() as i64 - start.own_kib() as i64,
            shmem_end_kib: end.shmem_kib,
            samples: collected.samples,
            error: collected.error,
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tqcow2d\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t 2254784 kB\n\
        VmRSS:\t  1069828 kB\nRssAnon:\t   21000 kB\nRssFile:\t    9000 kB\nRssShmem:\t 1039828 kB\n\
        VmData:\t  300000 kB\nThreads:\t7\n";

    #[test]
    fn status_counters_parse() {
        let rss = parse_status(STATUS).unwrap();
        assert_eq!(
            rss,
            Rss {
                anon_kib: 21000,
                file_kib: 9000,
                shmem_kib: 1039828
            }
        );
        assert_eq!(
            rss.own_kib(),
            30000,
            "guest memory (shmem) is not the server's own"
        );
    }

    #[test]
    fn incomplete_or_odd_status_is_refused() {
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("RssAnon:\t1 kB\nRssFile:\t2 kB\n"), None);
        assert_eq!(
            parse_status("RssAnon:\t1 MB\nRssFile:\t2 kB\nRssShmem:\t3 kB\n"),
            None
        );
        assert_eq!(
            parse_status("RssAnon:\tx kB\nRssFile:\t2 kB\nRssShmem:\t3 kB\n"),
            None
        );
        // Other keys that merely start alike are ignored.
        let rss =
            parse_status("RssAnonX:\t9 kB\nRssAnon:\t1 kB\nRssFile:\t2 kB\nRssShmem:\t3 kB\n");
        assert_eq!(rss.map(|r| r.own_kib()), Some(3));
    }

    #[test]
    fn own_process_is_readable() {
        let rss = read_rss(std::process::id()).unwrap();
        assert!(rss.anon_kib > 0);
    }

    #[test]
    fn timeline_keeps_one_sample_per_interval_and_the_peak() {
        let t0 = Instant::now() - Duration::from_secs(100);
        let mut c = Collected::default();
        let rss = |kib| {
            Ok(Rss {
                anon_kib: kib,
                file_kib: 0,
                shmem_kib: 7,
            })
        };
        c.record(t0, Duration::from_secs(10), rss(100));
        // Within the same interval: counts for the peak only.
        c.record(t0, Duration::from_secs(10), rss(500));
        c.record(t0, Duration::from_secs(10), Err(Error::msg("gone")));
        assert_eq!(c.samples.len(), 1);
        assert_eq!(c.peak_kib, 500);
        assert_eq!(c.last.unwrap().own_kib, 500);
        assert_eq!(c.error.as_deref(), Some("gone"));
    }

    #[test]
    fn rounds_summarize() {
        let round = |start, end, peak| MemoryReport {
            pid: 1,
            start_kib: start,
            end_kib: end,
            peak_kib: peak,
            growth_kib: end as i64 - start as i64,
            shmem_end_kib: 0,
            samples: Vec::new(),
            error: None,
        };
        assert_eq!(MemorySummary::of(&[]), None);
        let rounds = [round(100, 140, 150), round(90, 95, 300)];
        assert_eq!(
            MemorySummary::of(&rounds),
            Some(MemorySummary {
                start_kib: 100,
                end_kib: 95,
                peak_kib: 300,
                max_round_growth_kib: 40
            })
        );
    }

    #[test]
    fn sampler_reports_start_end_and_timeline() {
        let mut s = Sampler::start(std::process::id(), Duration::from_millis(100)).unwrap();
        s.mark_start();
        std::thread::sleep(Duration::from_millis(450));
        s.mark_end();
        let r = s.finish();
        assert!(r.start_kib > 0 && r.end_kib > 0);
        assert!(r.peak_kib >= r.start_kib.max(r.end_kib));
        assert!(r.samples.len() >= 2, "{:?}", r.samples);
        assert!(r.samples.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        assert_eq!(r.growth_kib, r.end_kib as i64 - r.start_kib as i64);
        assert!(r.error.is_none());
    }
}
