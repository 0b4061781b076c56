//! The load generator: connects to a vhost-user-blk socket with libblkio, runs one worker
//! thread per virtqueue, each keeping `iodepth` requests in flight, and measures every request.
//!
//! The coordinator (the calling thread) owns the `Blkio` instance and the I/O buffers; workers
//! own one `Blkioq` each and borrow nothing else, so a scoped thread per queue is enough. The
//! coordinator calls the caller's hook at the start and at the end of the measured window, which
//! is how `compare` samples the servers' CPU time over exactly that window.
//!
//! All of the bench's unsafe code lives here: filling the shared-memory buffers that libblkio
//! allocates, and reading the completions it writes.

use crate::error::{Context, Error, Result};
use crate::pattern::{OffsetGen, Op, OpMix, Pattern, Region};
use crate::rng::SplitMix64;
use crate::signals;
use crate::stats::{merge, new_histogram, record_latency, LatencyHistogram, LatencySummary};
use crate::units::format_size;
use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};
use serde::Serialize;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a worker waits for any completion before it declares the server hung or gone.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request the bench issues (and the largest buffer slot it allocates).
const MAX_BLOCK_SIZE_BYTES: u64 = 16 << 20;
/// Upper bound on requests in flight per queue.
const MAX_IODEPTH: usize = 4096;
/// How often the coordinator checks for an aborted run while it waits for a deadline.
const COORDINATOR_TICK: Duration = Duration::from_millis(5);

/// Everything one run needs, already parsed.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub socket: PathBuf,
    pub pattern: Pattern,
    pub block_size_bytes: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub runtime: Duration,
    pub warmup: Duration,
    pub region_start_bytes: u64,
    /// `None`: from `region_start_bytes` to the end of the disk.
    pub region_size_bytes: Option<u64>,
    pub seed: u64,
    pub rwmix_read_percent: u8,
    /// Stop all workers at the first failed request instead of running the full time.
    pub stop_on_error: bool,
}

/// Moments of a run at which the caller's hook is called, from the coordinator thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    MeasureStart,
    MeasureEnd,
}

/// What one worker measured.
struct WorkerResult {
    read_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
    /// Completions inside the measured window.
    reads: u64,
    writes: u64,
    bytes: u64,
    /// Failed requests over the whole run, warm-up included.
    errors: u64,
    first_error: Option<String>,
    /// A failure that stopped the worker (not a failed request).
    fatal: Option<String>,
}

/// The merged result of a run, and its JSON form.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub socket: String,
    pub pattern: Pattern,
    pub block_size_bytes: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub runtime_s: f64,
    pub warmup_s: f64,
    pub region_start_bytes: u64,
    pub region_size_bytes: u64,
    pub capacity_bytes: u64,
    pub seed: u64,
    pub rwmix_read_percent: u8,
    /// Completions in the measured window.
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub iops: f64,
    /// 10^6 bytes per second.
    pub mb_per_s: f64,
    pub latency: LatencySummary,
    pub read_latency: Option<LatencySummary>,
    pub write_latency: Option<LatencySummary>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub fatal_error: Option<String>,
    /// The server's resident memory over the run, when its PID is known.
    pub memory: Option<crate::memory::MemoryReport>,
    /// Merged latencies of all requests, kept for merging rounds; not serialized.
    #[serde(skip)]
    pub histogram: LatencyHistogram,
}

impl RunReport {
    /// True when every request succeeded and no worker stopped early.
    pub fn is_clean(&self) -> bool {
        self.errors == 0 && self.fatal_error.is_none()
    }

    /// Why the run is not clean, in one line.
    pub fn failure_reason(&self) -> Option<String> {
        if let Some(fatal) = &self.fatal_error {
            return Some(fatal.clone());
        }
        if self.errors > 0 {
            return Some(format!(
                "{} request(s) failed, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("unknown error")
            ));
        }
        None
    }

    /// The human summary `run` prints.
    pub fn print_human(&self) {
        let lat = &self.latency;
        println!(
            "{} bs={} iodepth={} queues={} on {} ({} s measured after {} s warm-up)",
            self.pattern.name(),
            format_size(self.block_size_bytes),
            self.iodepth,
            self.queues,
            self.socket,
            self.runtime_s,
            self.warmup_s
        );
        println!(
            "  IOPS {:.0}   {:.1} MB/s   ({} I/Os: {} reads, {} writes)",
            self.iops, self.mb_per_s, self.ios, self.reads, self.writes
        );
        println!(
            "  latency us: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1})",
            lat.p50_us, lat.p99_us, lat.p999_us, lat.max_us, lat.mean_us
        );
        for (name, summary) in [("read", &self.read_latency), ("write", &self.write_latency)] {
            if let (Some(s), true) = (summary, self.reads > 0 && self.writes > 0) {
                println!(
                    "  {name:>5} us: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                    s.p50_us, s.p99_us, s.p999_us, s.max_us
                );
            }
        }
        if let Some(memory) = &self.memory {
            memory.print_human("  ");
            memory.print_timeline("    ");
        }
        println!("  errors: {}", self.errors);
        if let Some(reason) = self.failure_reason() {
            println!("  FAILED: {reason}");
        }
    }
}

/// Maps a libblkio error (which carries an errno and a message) into ours.
fn blkio_err(what: &str, err: blkio::Error) -> Error {
    let errno = err.errno().to_string();
    if err.message().contains(&errno) {
        Error::msg(format!("{what}: {}", err.message()))
    } else {
        Error::msg(format!("{what}: {} ({errno})", err.message()))
    }
}

/// Connects, runs the workload and returns the merged result. Failed requests are part of the
/// report, not an `Err`: `Err` means the run could not be set up at all.
pub fn run_load(spec: &LoadSpec, on_phase: &mut dyn FnMut(Phase)) -> Result<RunReport> {
    if spec.iodepth == 0 || spec.iodepth > MAX_IODEPTH {
        return Err(Error::msg(format!("iodepth must be in 1..={MAX_IODEPTH}")));
    }
    if spec.queues == 0 {
        return Err(Error::msg("At least one queue is needed"));
    }
    if spec.block_size_bytes == 0 || spec.block_size_bytes > MAX_BLOCK_SIZE_BYTES {
        return Err(Error::msg(format!(
            "Block size must be in 1..={}",
            format_size(MAX_BLOCK_SIZE_BYTES)
        )));
    }
    if spec.rwmix_read_percent > 100 {
        return Err(Error::msg("rwmix-read is a percentage (0..=100)"));
    }
    let socket = spec.socket.to_str().ok_or_else(|| {
        Error::msg(format!(
            "Socket path {} is not UTF-8",
            spec.socket.display()
        ))
    })?;

    let mut blkio = Blkio::new("virtio-blk-vhost-user")
        .map_err(|e| blkio_err("Creating a libblkio instance", e))?;
    blkio
        .set_str("path", socket)
        .map_err(|e| blkio_err("Setting the socket path", e))?;
    // A read-only export refuses clients that do not promise to stay read-only.
    blkio
        .set_bool("read-only", spec.pattern.is_read_only())
        .map_err(|e| blkio_err("Setting read-only", e))?;
    blkio
        .connect()
        .map_err(|e| blkio_err(&format!("Connecting to {socket}"), e))?;

    let max_queues = blkio
        .get_i32("max-queues")
        .map_err(|e| blkio_err("Reading max-queues", e))?;
    let queues_i32 = i32::try_from(spec.queues).unwrap_or(i32::MAX);
    if queues_i32 > max_queues {
        return Err(Error::msg(format!(
            "The server offers {max_queues} queue(s), {} requested",
            spec.queues
        )));
    }
    blkio
        .set_i32("num-queues", queues_i32)
        .map_err(|e| blkio_err("Setting num-queues", e))?;
    let queue_size = blkio
        .get_i32("queue-size")
        .map_err(|e| blkio_err("Reading queue-size", e))?;
    if spec.iodepth > usize::try_from(queue_size).unwrap_or(0) {
        // A larger ring keeps every request in the ring instead of libblkio's backlog.
        let wanted = spec.iodepth.next_power_of_two();
        blkio
            .set_i32("queue-size", i32::try_from(wanted).unwrap_or(i32::MAX))
            .map_err(|e| blkio_err("Setting queue-size", e))?;
    }
    let started = blkio
        .start()
        .map_err(|e| blkio_err(&format!("Starting the device on {socket}"), e))?;

    let capacity_bytes = blkio
        .get_u64("capacity")
        .map_err(|e| blkio_err("Reading capacity", e))?;
    let request_alignment = blkio
        .get_i32("request-alignment")
        .map_err(|e| blkio_err("Reading request-alignment", e))?;
    let max_transfer = blkio
        .get_i32("max-transfer")
        .map_err(|e| blkio_err("Reading max-transfer", e))?;
    let region_alignment = blkio
        .get_u64("mem-region-alignment")
        .map_err(|e| blkio_err("Reading mem-region-alignment", e))?;

    let bs = spec.block_size_bytes;
    if request_alignment > 0 && bs % request_alignment as u64 != 0 {
        return Err(Error::msg(format!(
            "Block size {bs} is not a multiple of the device's request alignment {request_alignment}"
        )));
    }
    if max_transfer > 0 && bs > max_transfer as u64 {
        return Err(Error::msg(format!(
            "Block size {bs} exceeds the device's maximum transfer of {max_transfer} bytes"
        )));
    }
    let region_size = match spec.region_size_bytes {
        Some(size) => size,
        None => capacity_bytes
            .checked_sub(spec.region_start_bytes)
            .ok_or_else(|| {
                Error::msg(format!(
                    "Region start {} is beyond the disk's {capacity_bytes} bytes",
                    spec.region_start_bytes
                ))
            })?,
    };
    let region = Region::new(
        spec.region_start_bytes,
        region_size,
        bs,
        capacity_bytes,
        spec.queues,
    )
    .map_err(Error::msg)?;

    let queues: Vec<Blkioq> = started.queues;
    if queues.len() != spec.queues {
        return Err(Error::msg(format!(
            "libblkio started {} queue(s), {} requested",
            queues.len(),
            spec.queues
        )));
    }

    // One shared-memory region per worker, `iodepth` slots of one block each.
    let slot_bytes = usize::try_from(bs).context("Block size does not fit in memory")?;
    let buffer_bytes =
        (slot_bytes * spec.iodepth).next_multiple_of(region_alignment.max(1) as usize);
    let mut buffer_addrs = Vec::with_capacity(spec.queues);
    let mut fill_rng = SplitMix64::for_stream(spec.seed, u64::MAX);
    for _ in 0..spec.queues {
        let mem = blkio
            .alloc_mem_region(buffer_bytes)
            .map_err(|e| blkio_err("Allocating I/O buffers", e))?;
        // SAFETY: libblkio just mapped `mem.len` bytes read/write at `mem.addr` for us; the
        // mapping lives until `blkio` and every queue are dropped, which happens after this
        // slice's last use (below). No request has been submitted yet, so nothing else reads or
        // writes the memory while the slice exists.
        let buffer = unsafe { std::slice::from_raw_parts_mut(mem.addr as *mut u8, mem.len) };
        // Writes carry incompressible, non-zero data, so no server can shortcut them.
        fill_rng.fill(buffer);
        blkio
            .map_mem_region(&mem)
            .map_err(|e| blkio_err("Mapping I/O buffers for the server", e))?;
        buffer_addrs.push(mem.addr);
    }

    let read_percent = spec.pattern.read_percent(spec.rwmix_read_percent);
    let start = Instant::now();
    let clock = Clock {
        warm_end: start + spec.warmup,
        end: start + spec.warmup + spec.runtime,
    };
    let abort = AtomicBool::new(false);

    let results: Vec<WorkerResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(&buffer_addrs)
            .enumerate()
            .map(|(index, (queue, &buffer_addr))| {
                let worker = Worker {
                    queue,
                    buffer_addr,
                    slot_bytes,
                    iodepth: spec.iodepth,
                    offsets: region.offsets_for(spec.pattern, spec.seed, index, spec.queues),
                    mix: OpMix::new(read_percent, spec.seed, index),
                    clock,
                    abort: &abort,
                    stop_on_error: spec.stop_on_error,
                };
                std::thread::Builder::new()
                    .name(format!("bench-q{index}"))
                    .spawn_scoped(scope, move || worker.run())
            })
            .collect();

        wait_until(clock.warm_end, &abort);
        on_phase(Phase::MeasureStart);
        wait_until(clock.end, &abort);
        on_phase(Phase::MeasureEnd);

        handles
            .into_iter()
            .map(|handle| match handle {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| WorkerResult::fatal("worker panicked")),
                Err(e) => WorkerResult::fatal(&format!("spawning a worker thread: {e}")),
            })
            .collect()
    });
    // The queues are gone (dropped by their workers); `blkio` and with it the connection and
    // the buffers go when this function returns.

    let read_latency = merge(results.iter().map(|r| &r.read_latency))
        .context("Merging read latency histograms")?;
    let write_latency = merge(results.iter().map(|r| &r.write_latency))
        .context("Merging write latency histograms")?;
    let histogram = merge([&read_latency, &write_latency]).context("Merging latency histograms")?;
    let reads: u64 = results.iter().map(|r| r.reads).sum();
    let writes: u64 = results.iter().map(|r| r.writes).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let runtime_s = spec.runtime.as_secs_f64();
    let rate = |count: u64| {
        if runtime_s > 0.0 {
            count as f64 / runtime_s
        } else {
            0.0
        }
    };
    Ok(RunReport {
        socket: socket.to_string(),
        pattern: spec.pattern,
        block_size_bytes: bs,
        iodepth: spec.iodepth,
        queues: spec.queues,
        runtime_s,
        warmup_s: spec.warmup.as_secs_f64(),
        region_start_bytes: region.start_bytes,
        region_size_bytes: region.size_bytes,
        capacity_bytes,
        seed: spec.seed,
        rwmix_read_percent: read_percent,
        ios: reads + writes,
        reads,
        writes,
        bytes,
        iops: rate(reads + writes),
        mb_per_s: rate(bytes) / 1e6,
        latency: LatencySummary::of(&histogram),
        read_latency: (reads > 0).then(|| LatencySummary::of(&read_latency)),
        write_latency: (writes > 0).then(|| LatencySummary::of(&write_latency)),
        errors: results.iter().map(|r| r.errors).sum(),
        first_error: results.iter().find_map(|r| r.first_error.clone()),
        fatal_error: results.iter().find_map(|r| r.fatal.clone()),
        memory: None,
        histogram,
    })
}

/// Sleeps until `deadline`, or until a worker aborts the run.
fn wait_until(deadline: Instant, abort: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= deadline || abort.load(Ordering::Relaxed) || signals::interrupted() {
            return;
        }
        std::thread::sleep(COORDINATOR_TICK.min(deadline - now));
    }
}

/// The run's time line, shared by all workers.
#[derive(Clone, Copy, Debug)]
struct Clock {
    /// Completions before this are warm-up and not recorded.
    warm_end: Instant,
    /// No request is submitted after this, and completions after it are not recorded.
    end: Instant,
}

impl Clock {
    fn in_window(&self, at: Instant) -> bool {
        at >= self.warm_end && at < self.end
    }
}

/// One queue's worker: submits, reaps and measures.
struct Worker<'a> {
    queue: Blkioq,
    /// Start of this worker's `iodepth * slot_bytes` bytes of shared memory, mapped for the
    /// server; slot `i` is used by exactly one request at a time.
    buffer_addr: usize,
    slot_bytes: usize,
    iodepth: usize,
    offsets: OffsetGen,
    mix: OpMix,
    clock: Clock,
    abort: &'a AtomicBool,
    stop_on_error: bool,
}

/// The request occupying a buffer slot.
#[derive(Clone, Copy)]
struct InFlight {
    op: Op,
    submitted_at: Instant,
}

impl WorkerResult {
    fn empty() -> Self {
        Self {
            read_latency: new_histogram(),
            write_latency: new_histogram(),
            reads: 0,
            writes: 0,
            bytes: 0,
            errors: 0,
            first_error: None,
            fatal: None,
        }
    }

    fn fatal(reason: &str) -> Self {
        Self {
            fatal: Some(reason.to_string()),
            ..Self::empty()
        }
    }
}

impl Worker<'_> {
    fn run(mut self) -> WorkerResult {
        let mut result = WorkerResult::empty();
        let mut slots: Vec<InFlight> = Vec::with_capacity(self.iodepth);
        for slot in 0..self.iodepth {
            slots.push(self.submit(slot));
        }
        let mut in_flight = self.iodepth;
        let mut completions: Vec<MaybeUninit<Completion>> = Vec::with_capacity(self.iodepth);
        completions.resize_with(self.iodepth, MaybeUninit::uninit);

        while in_flight > 0 {
            let mut timeout = COMPLETION_TIMEOUT;
            let reaped = match self
                .queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
            {
                Ok(reaped) => reaped,
                Err(err) if err.errno() == Errno::INTR => continue,
                Err(err) if err.errno() == Errno::TIME => {
                    result.fatal = Some(format!(
                        "No completion for {} s with {in_flight} request(s) in flight: \
                         server hung or gone",
                        COMPLETION_TIMEOUT.as_secs()
                    ));
                    self.abort.store(true, Ordering::Relaxed);
                    break;
                }
                Err(err) => {
                    result.fatal = Some(format!(
                        "Waiting for completions: {} ({})",
                        err.message(),
                        err.errno()
                    ));
                    self.abort.store(true, Ordering::Relaxed);
                    break;
                }
            };
            let now = Instant::now();
            let keep_going = now < self.clock.end
                && !self.abort.load(Ordering::Relaxed)
                && !signals::interrupted();
            for completion in &completions[..reaped.min(completions.len())] {
                // SAFETY: do_io() returned `reaped` and documents that it initialized that many
                // leading elements of `completions`; `Completion` is plain data (no Drop), so
                // reading it out by value leaves nothing to double-free.
                let completion = unsafe { completion.assume_init_read() };
                in_flight -= 1;
                let slot = completion.user_data;
                let Some(request) = slots.get(slot).copied() else {
                    result.fatal = Some(format!("Completion for unknown request {slot}"));
                    self.abort.store(true, Ordering::Relaxed);
                    continue;
                };
                if completion.ret < 0 {
                    result.errors += 1;
                    if result.first_error.is_none() {
                        result.first_error = Some(describe_failure(request.op, &completion));
                    }
                    if self.stop_on_error {
                        self.abort.store(true, Ordering::Relaxed);
                    }
                } else if self.clock.in_window(now) {
                    let latency_ns =
                        u64::try_from((now - request.submitted_at).as_nanos()).unwrap_or(u64::MAX);
                    match request.op {
                        Op::Read => {
                            record_latency(&mut result.read_latency, latency_ns);
                            result.reads += 1;
                        }
                        Op::Write => {
                            record_latency(&mut result.write_latency, latency_ns);
                            result.writes += 1;
                        }
                    }
                    result.bytes += self.slot_bytes as u64;
                }
                if keep_going && !(self.stop_on_error && result.errors > 0) {
                    slots[slot] = self.submit(slot);
                    in_flight += 1;
                }
            }
        }
        result
    }

    /// Queues the next request into buffer slot `slot` and returns what it is.
    fn submit(&mut self, slot: usize) -> InFlight {
        let offset = self.offsets.next_offset();
        let op = self.mix.next_op();
        // The slot lies inside this worker's mapped region (slot < iodepth) and no other
        // request uses it until this one completes, so the pointer stays valid and unshared for
        // the whole life of the request.
        let buf = (self.buffer_addr + slot * self.slot_bytes) as *mut u8;
        let submitted_at = Instant::now();
        match op {
            Op::Read => self
                .queue
                .read(offset, buf, self.slot_bytes, slot, ReqFlags::empty()),
            Op::Write => self
                .queue
                .write(offset, buf, self.slot_bytes, slot, ReqFlags::empty()),
        }
        InFlight { op, submitted_at }
    }
}

/// One line for a failed request: the operation, errno and libblkio's message if it gave one.
fn describe_failure(op: Op, completion: &Completion) -> String {
    let errno = std::io::Error::from_raw_os_error(completion.ret.saturating_neg());
    let op = match op {
        Op::Read => "read",
        Op::Write => "write",
    };
    if completion.error_msg.is_null() {
        return format!("{op}: {errno}");
    }
    // SAFETY: libblkio sets `error_msg` either to null (checked above) or to a `&'static CStr`
    // (`Completion::for_failed_req` takes one), so it is a valid NUL-terminated string forever.
    let message = unsafe { CStr::from_ptr(completion.error_msg) };
    format!("{op}: {errno} ({})", message.to_string_lossy())
}
