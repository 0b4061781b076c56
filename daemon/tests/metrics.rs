//! `qcow2d serve --metrics`: the numbers a scrape shows add up exactly to what a vhost-user-blk
//! client did.
//!
//! A writable image made by `qemu-img` is served with `--metrics 127.0.0.1:0` (the daemon prints
//! the port it got). A `blkio` client (driver `virtio-blk-vhost-user`) runs rounds of reads,
//! writes, flushes, discards and write-zeroes with several requests in flight on two queues,
//! while a thread scrapes `/metrics` continuously and checks every scrape for internal
//! consistency and monotonic counters; after each round the main thread checks the totals
//! exactly. A client that sends half a request and stalls must not hold up the data path.
//! Every wait is bounded.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests in flight at most, over both queues.
const SLOTS: usize = 16;
/// Largest request.
const SLOT_BYTES: usize = 64 * 1024;
const QUEUES: usize = 2;
/// Where the image has compressed clusters, and how many bytes of them.
const COMPRESSED: u64 = 32 << 20;
const COMPRESSED_LEN: usize = 4 << 20;
/// Reads of the compressed area per round.
const COMPRESSED_READS: u64 = 40;
const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "discard",
    "write_zeroes",
    "get_id",
    "other",
];

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

struct Daemon {
    child: Option<Child>,
    metrics: SocketAddr,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, image: &Path, socket: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2d"))
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(["--queues", "2", "--metrics", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run qcow2d");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            metrics: "0.0.0.0:0".parse().unwrap(),
            dir: dir.to_owned(),
        };
        let serving = format!(
            "qcow2d: serving {} on {}",
            image.display(),
            socket.display()
        );
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut metrics = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("qcow2d printed its ready lines in time");
            if let Some(url) = line.strip_prefix("qcow2d: metrics on http://") {
                let addr = url.strip_suffix("/metrics").expect("URL ends in /metrics");
                metrics = Some(addr.parse().expect("metrics address"));
            } else if line == serving {
                break;
            }
        }
        daemon.metrics = metrics.expect("the metrics line comes before the serving line");
        daemon
    }

    /// SIGTERM, then the exit status within EXIT_TIMEOUT.
    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill() with a pid we spawned and have not reaped has no memory effects.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("qcow2d did not exit within {EXIT_TIMEOUT:?} of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Scraping
// ---------------------------------------------------------------------------------------------

/// An HTTP exchange: (status code, body).
fn http(addr: SocketAddr, request: &str) -> (u32, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, body.to_owned())
}

/// Samples of one scrape, keyed by `name{k="v",...}` with labels sorted.
#[derive(Clone, Debug, Default)]
struct Scrape(HashMap<String, f64>);

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let sorted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let inner: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn parse(text: &str) -> Scrape {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        let (name, labels) = series.split_once('{').expect("labelled series");
        let labels = labels.strip_suffix('}').expect("closing brace");
        // Test labels contain no escapes: split on the quotes.
        let pairs: Vec<(&str, &str)> = labels
            .split("\",")
            .map(|kv| {
                let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                (k, v.trim_end_matches('"'))
            })
            .collect();
        let previous = samples.insert(key(name, &pairs), value);
        assert!(previous.is_none(), "duplicate series {line:?}");
    }
    Scrape(samples)
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let k = key(name, labels);
        *self.0.get(&k).unwrap_or_else(|| panic!("no sample {k}"))
    }

    fn op(&self, name: &str, export: &str, op: &str) -> f64 {
        self.get(name, &[("export", export), ("op", op)])
    }

    fn requests(&self, export: &str, op: &str) -> u64 {
        self.op("qcow2d_requests_total", export, op) as u64
    }

    fn in_flight(&self, export: &str) -> u64 {
        self.get("qcow2d_requests_in_flight", &[("export", export)]) as u64
    }

    /// What must hold in any scrape, even one taken in the middle of the load.
    fn check_consistent(&self, export: &str) {
        for op in OPS {
            let count = self.op("qcow2d_request_duration_seconds_count", export, op);
            assert_eq!(
                count,
                self.op("qcow2d_requests_total", export, op),
                "{op}: histogram count and requests_total come from the same counters"
            );
            let buckets: Vec<(f64, f64)> = self
                .0
                .iter()
                .filter_map(|(k, v)| {
                    let rest = k.strip_prefix("qcow2d_request_duration_seconds_bucket{")?;
                    if !rest.contains(&format!("op={op:?}")) {
                        return None;
                    }
                    let le = rest.split("le=\"").nth(1)?.split('"').next()?;
                    Some((le.parse::<f64>().ok()?, *v))
                })
                .collect();
            let mut buckets = buckets;
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert_eq!(buckets.len(), 20, "{op}: 19 bounds and +Inf");
            assert_eq!(buckets[0].0, 1e-5);
            assert_eq!(buckets[18].0, 10.0);
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{op}: cumulative"
            );
            assert_eq!(buckets[19], (f64::INFINITY, count), "{op}: +Inf == _count");
            // Read a moment apart from the buckets: a request or two may be in one, not the other.
            let sum = self.op("qcow2d_request_duration_seconds_sum", export, op);
            assert!(
                sum >= 0.0 && sum <= (count + SLOTS as f64) * 10.0,
                "{op}: sum {sum}"
            );
            let q = |quantile: &str| {
                self.0
                    .get(&key(
                        "qcow2d_request_duration_quantile_seconds",
                        &[("export", export), ("op", op), ("quantile", quantile)],
                    ))
                    .copied()
            };
            // The quantiles appear with the first request of the operation (the very first
            // one may be in the buckets a moment before it is in the HDR histogram).
            match (q("0.5"), q("0.99"), q("0.999")) {
                (Some(p50), Some(p99), Some(p999)) => {
                    assert!(
                        0.0 < p50 && p50 <= p99 && p99 <= p999,
                        "{op}: {p50} {p99} {p999}"
                    );
                }
                (None, None, None) => {}
                other => panic!("{op}: some quantiles missing: {other:?}"),
            }
        }
        // Every request is counted by the shard it was submitted to, whichever shards serve
        // its pieces: the depths add up to the export's in-flight requests.
        let depths: Vec<f64> = (0..64)
            .map_while(|shard| {
                let shard = shard.to_string();
                self.0
                    .get(&key(
                        "qcow2d_shard_queue_depth",
                        &[("export", export), ("shard", &shard)],
                    ))
                    .copied()
            })
            .collect();
        assert!(!depths.is_empty(), "no shard queue depth for {export}");
        assert_eq!(
            depths.iter().sum::<f64>() as u64,
            self.in_flight(export),
            "the shards' depths add up to the export's in-flight requests"
        );
        assert!(self.in_flight(export) <= SLOTS as u64);
    }

    /// Counters never go down between two scrapes.
    /// Whether the quantile gauges of `op` are there.
    fn has_quantiles(&self, export: &str, op: &str) -> bool {
        ["0.5", "0.99", "0.999"].iter().all(|quantile| {
            self.0.contains_key(&key(
                "qcow2d_request_duration_quantile_seconds",
                &[("export", export), ("op", op), ("quantile", quantile)],
            ))
        })
    }

    fn check_monotonic(&self, earlier: &Scrape) {
        for (k, v) in &earlier.0 {
            let counter = k.contains("_total{")
                || k.contains("_bucket{")
                || k.contains("_count{")
                || k.contains("_sum{");
            if counter {
                assert!(self.0[k] >= *v, "{k} went from {v} to {}", self.0[k]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Req {
    Read(u64, usize),
    Write(u64, usize),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64),
}

impl Req {
    fn op(self) -> &'static str {
        match self {
            Req::Read(..) => "read",
            Req::Write(..) => "write",
            Req::Flush => "flush",
            Req::Discard(..) => "discard",
            Req::WriteZeroes(..) => "write_zeroes",
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Req::Read(_, n) | Req::Write(_, n) => n as u64,
            Req::Flush => 0,
            Req::Discard(_, n) | Req::WriteZeroes(_, n) => n,
        }
    }
}

struct Client {
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
}

fn check(what: &str, r: Result<(), blkio::Error>) {
    if let Err(e) = r {
        panic!("blkio {what}: {} (errno {})", e.message(), e.errno());
    }
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
        check("path", b.set_str("path", &socket.display().to_string()));
        check("connect", b.connect());
        check("num-queues", b.set_i32("num-queues", QUEUES as i32));
        check("queue-size", b.set_i32("queue-size", 128));
        let outcome = b.start().expect("blkio start");
        let region = b
            .alloc_mem_region(SLOTS * SLOT_BYTES)
            .expect("alloc_mem_region");
        check("map_mem_region", b.map_mem_region(&region));
        Client {
            queues: outcome.queues,
            blkio: b,
            region,
        }
    }

    /// Runs `reqs` with up to SLOTS in flight, spread over the queues; every one must succeed.
    fn run(&mut self, reqs: &[Req]) {
        let mut next = 0;
        let mut free: Vec<usize> = (0..SLOTS).collect();
        let mut in_flight = vec![0usize; self.queues.len()];
        let mut completions: Vec<MaybeUninit<blkio::Completion>> =
            (0..SLOTS).map(|_| MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + IO_TIMEOUT;
        while next < reqs.len() || in_flight.iter().any(|&n| n > 0) {
            assert!(Instant::now() < deadline, "I/O did not finish in time");
            while next < reqs.len() {
                let Some(slot) = free.pop() else { break };
                let q = next % self.queues.len();
                let buf = self.region.addr + slot * SLOT_BYTES;
                let queue = &mut self.queues[q];
                match reqs[next] {
                    Req::Read(off, len) => {
                        assert!(len <= SLOT_BYTES);
                        queue.read(off, buf as *mut u8, len, slot, ReqFlags::empty());
                    }
                    Req::Write(off, len) => {
                        assert!(len <= SLOT_BYTES);
                        queue.write(off, buf as *const u8, len, slot, ReqFlags::empty());
                    }
                    Req::Flush => queue.flush(slot, ReqFlags::empty()),
                    Req::Discard(off, len) => queue.discard(off, len, slot, ReqFlags::empty()),
                    Req::WriteZeroes(off, len) => {
                        queue.write_zeroes(off, len, slot, ReqFlags::empty())
                    }
                }
                in_flight[q] += 1;
                next += 1;
            }
            let mut reaped = 0;
            for (queue, n_in_flight) in self.queues.iter_mut().zip(in_flight.iter_mut()) {
                if *n_in_flight > 0 {
                    reaped += reap(queue, &mut completions, 0, &mut free, n_in_flight);
                }
            }
            let can_submit = next < reqs.len() && !free.is_empty();
            if reaped == 0 && !can_submit {
                // Nothing to do but wait: block (briefly) on a queue with requests in flight.
                if let Some((queue, n_in_flight)) = self
                    .queues
                    .iter_mut()
                    .zip(in_flight.iter_mut())
                    .find(|(_, n)| **n > 0)
                {
                    reap(queue, &mut completions, 1, &mut free, n_in_flight);
                }
            }
        }
    }
}

/// Collects completions from `queue` (waiting up to 10 ms for `min` of them); every request
/// must have succeeded. Returns how many completed.
fn reap(
    queue: &mut Blkioq,
    completions: &mut [MaybeUninit<blkio::Completion>],
    min: usize,
    free: &mut Vec<usize>,
    in_flight: &mut usize,
) -> usize {
    let mut timeout = Duration::from_millis(10);
    let n = match queue.do_io(completions, min, Some(&mut timeout), None) {
        Ok(n) => n,
        Err(e) if e.errno() == blkio::Errno::TIME => 0,
        Err(e) => panic!("do_io: {} (errno {})", e.message(), e.errno()),
    };
    for c in &completions[..n] {
        // SAFETY: do_io() initialised the first n entries.
        let c = unsafe { c.assume_init_ref() };
        assert_eq!(c.ret, 0, "request failed: errno {}", -c.ret);
        free.push(c.user_data);
        *in_flight -= 1;
    }
    n
}

impl Drop for Client {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Round `round`'s requests: reads and writes of several sizes, a few flushes, discards and
/// write-zeroes, interleaved.
fn round(round: u64) -> Vec<Req> {
    const SIZES: [usize; 5] = [4096, 512, 16384, 65536, 3 * 512];
    let mut reqs = Vec::new();
    for i in 0..40u64 {
        let size = SIZES[(i as usize + round as usize) % SIZES.len()];
        let off = ((round * 40 + i) * 64 * 1024) % (48 << 20);
        reqs.push(Req::Write(off, size));
        reqs.push(Req::Read(off, size));
        reqs.push(Req::Read((i * 7 + 3) * 4096, 4096));
        reqs.push(Req::Read(COMPRESSED + (round * 40 + i) * 4096, 4096));
        if i % 10 == 9 {
            reqs.push(Req::Flush);
        }
        if i % 8 == 3 {
            reqs.push(Req::Discard((56 << 20) + i * 65536, 65536));
        }
        if i % 13 == 5 {
            reqs.push(Req::WriteZeroes((60 << 20) + i * 8192, 8192));
        }
    }
    reqs
}

/// Scrapes until `done` holds (the worker records a request just after the client can see it
/// complete, so the last few may lag a scrape behind) or SETTLE_TIMEOUT passes.
fn settled(addr: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let s = scrape(addr);
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn metrics_add_up_to_what_the_client_did() {
    let qemu_img = Command::new("qemu-img").arg("--version").output();
    assert!(
        qemu_img.is_ok_and(|o| o.status.success()),
        "qemu-img is needed (Debian package qemu-utils)"
    );
    let dir = std::env::temp_dir().join(format!("qcow2d-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.qcow2");
    let socket = dir.join("disk.sock");
    // 64 MiB with compressed data at COMPRESSED (so that reads there go through the
    // decompressed-cluster cache and the L2 table exists on disk), the rest unallocated.
    let raw = dir.join("disk.raw");
    {
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(64 << 20).unwrap();
        let text: Vec<u8> = (0..COMPRESSED_LEN)
            .map(|i| b"qcow2d metrics "[i % 15])
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &text, COMPRESSED).unwrap();
    }
    let converted = Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image)
        .status()
        .unwrap();
    assert!(converted.success(), "qemu-img convert");
    let daemon = Daemon::start(&dir, &image, &socket);
    let addr = daemon.metrics;
    let export = socket.display().to_string();

    // Before any client: everything at zero, the endpoint's 404.
    let s = scrape(addr);
    s.check_consistent(&export);
    for op in OPS {
        assert_eq!(s.requests(&export, op), 0, "{op}");
    }
    assert_eq!(s.in_flight(&export), 0);
    let (status, _) = http(addr, "GET /nothing-here HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    let (status, _) = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 404);

    // A scraper that keeps going during the load.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let stop = Arc::clone(&stop);
        let export = export.clone();
        thread::spawn(move || {
            let mut previous = scrape(addr);
            let mut scrapes = 1u32;
            while !stop.load(Ordering::Relaxed) {
                let s = scrape(addr);
                s.check_consistent(&export);
                s.check_monotonic(&previous);
                previous = s;
                scrapes += 1;
                thread::sleep(Duration::from_millis(2));
            }
            scrapes
        })
    };

    let mut client = Client::connect(&socket);
    let mut expected: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut previous = scrape(addr);
    for r in 0..4 {
        let reqs = round(r);
        client.run(&reqs);
        for req in &reqs {
            let e = expected.entry(req.op()).or_default();
            e.0 += 1;
            e.1 += req.bytes();
        }
        let s = settled(addr, |s| {
            expected
                .iter()
                .all(|(op, (n, _))| s.requests(&export, op) == *n)
                && s.in_flight(&export) == 0
        });
        s.check_consistent(&export);
        s.check_monotonic(&previous);
        for op in OPS {
            let (n, bytes) = expected.get(op).copied().unwrap_or_default();
            assert_eq!(s.requests(&export, op), n, "round {r}: {op} requests");
            assert_eq!(
                s.op("qcow2d_request_bytes_total", &export, op) as u64,
                bytes,
                "round {r}: {op} bytes"
            );
            assert_eq!(
                s.op("qcow2d_request_errors_total", &export, op),
                0.0,
                "round {r}: {op} errors"
            );
        }
        assert_eq!(s.in_flight(&export), 0, "round {r}: nothing left in flight");
        previous = s;
    }

    // A scraper that sends half a request and stalls holds the endpoint, never the disk.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(b"GET /metr").unwrap();
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let reqs: Vec<Req> = (0..64).map(|i| Req::Read(i * 4096, 4096)).collect();
    client.run(&reqs);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "I/O took {took:?} behind a stalled scraper"
    );
    expected.entry("read").or_default().0 += 64;
    expected.entry("read").or_default().1 += 64 * 4096;
    drop(stalled);

    stop.store(true, Ordering::Relaxed);
    let scrapes = background.join().expect("background scraper");
    assert!(scrapes >= 2, "the background scraper ran");

    drop(client);
    let s = settled(addr, |s| s.requests(&export, "read") == expected["read"].0);
    s.check_consistent(&export);
    s.check_monotonic(&previous);
    for (op, (n, bytes)) in &expected {
        assert_eq!(s.requests(&export, op), *n, "{op} requests");
        assert_eq!(
            s.op("qcow2d_request_bytes_total", &export, op) as u64,
            *bytes,
            "{op} bytes"
        );
        assert_eq!(
            s.op("qcow2d_request_duration_seconds_count", &export, op) as u64,
            *n
        );
        assert!(s.has_quantiles(&export, op), "{op}: quantiles");
    }
    for op in ["get_id", "other"] {
        assert_eq!(s.requests(&export, op), 0, "{op}: the client sends none");
    }
    assert_eq!(s.in_flight(&export), 0);
    let hits = s.get("qcow2d_l2_cache_hits_total", &[("export", &export)]);
    let misses = s.get("qcow2d_l2_cache_misses_total", &[("export", &export)]);
    assert!(misses >= 1.0, "the first access to the L2 table misses");
    assert!(
        hits >= 100.0,
        "later accesses hit ({hits} hits, {misses} misses)"
    );
    // 160 reads of 4 KiB over 10 compressed clusters of 64 KiB: the first read of each
    // cluster misses and inflates only what it needs, the second misses and loads the
    // cluster, later ones hit (a read that waited for the cluster to load looks it up again),
    // so hits and misses depend on timing but stay within these bounds. Each shard has its
    // own cache and reads any table, so each may miss a cluster twice.
    let shards = (0..64)
        .take_while(|i| {
            s.0.contains_key(&key(
                "qcow2d_shard_queue_depth",
                &[("export", &export), ("shard", &i.to_string())],
            ))
        })
        .count() as f64;
    assert!(shards >= 1.0, "no shard queue depth in the scrape");
    let reads = (4 * COMPRESSED_READS) as f64;
    let clusters = reads * 4096.0 / 65536.0 * shards;
    let hits = s.get(
        "qcow2d_decompressed_cache_hits_total",
        &[("export", &export)],
    );
    let misses = s.get(
        "qcow2d_decompressed_cache_misses_total",
        &[("export", &export)],
    );
    assert!(
        (1.0..=2.0 * clusters).contains(&misses)
            && hits >= reads - 2.0 * clusters
            && hits <= 2.0 * reads,
        "decompressed cache: {hits} hits, {misses} misses"
    );
    assert_eq!(
        s.get(
            "qcow2d_export_info",
            &[
                ("export", &export),
                ("image", &image.display().to_string()),
                ("serial", "disk"),
                ("read_only", "false"),
            ]
        ),
        1.0
    );

    let status = daemon.terminate();
    assert!(status.success(), "qcow2d exited with {status}");
}
