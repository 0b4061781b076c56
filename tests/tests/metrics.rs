//! `qcow2d serve --metrics`: the numbers a scrape shows add up exactly to what a vhost-user-blk
//! client did.
//!
//! A writable image made by `qemu-img` is served with `--metrics 127.0.0.1:0` (the daemon prints
//! the port it got). The shared `blkio` client ([`BlkClient`], two queues, each read and write in
//! one buffer) runs rounds of reads, writes, flushes, discards and write-zeroes with several
//! requests in flight, while a thread scrapes `/metrics` continuously and checks every scrape
//! for internal consistency and monotonic counters; after each round the main thread checks the
//! totals exactly. A client that sends half a request and stalls must not hold up the data path.
//! Every wait is bounded.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qcow2d_tests::*;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const QUEUES: i32 = 2;
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

/// The metrics endpoint the daemon announced before its ready line.
fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    let line = daemon
        .startup_stdout()
        .lines()
        .find_map(|l| l.strip_prefix("qcow2d: metrics on http://"))
        .unwrap_or_else(|| {
            panic!(
                "the metrics line comes before the serving line; stdout:\n{}",
                daemon.startup_stdout()
            )
        });
    let addr = line.strip_suffix("/metrics").expect("URL ends in /metrics");
    addr.parse().expect("metrics address")
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
                sum >= 0.0 && sum <= (count + RW_MAX_IN_FLIGHT as f64) * 10.0,
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
        assert!(self.in_flight(export) <= RW_MAX_IN_FLIGHT as u64);
    }

    /// Whether the quantile gauges of `op` are there.
    fn has_quantiles(&self, export: &str, op: &str) -> bool {
        ["0.5", "0.99", "0.999"].iter().all(|quantile| {
            self.0.contains_key(&key(
                "qcow2d_request_duration_quantile_seconds",
                &[("export", export), ("op", op), ("quantile", quantile)],
            ))
        })
    }

    /// Counters never go down between two scrapes.
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
// The client's requests
// ---------------------------------------------------------------------------------------------

/// The `op` label the daemon counts `op` under.
fn op_name(op: &BlkOp) -> &'static str {
    match op {
        BlkOp::Read { .. } => "read",
        BlkOp::Write { .. } => "write",
        BlkOp::Flush => "flush",
        BlkOp::Discard { .. } => "discard",
        BlkOp::WriteZeroes { .. } => "write_zeroes",
    }
}

/// Runs `reqs` with several in flight over both queues; every one must succeed.
fn run(client: &mut BlkClient, reqs: &[BlkOp]) {
    if let Err(e) = client.run_ok(reqs) {
        panic!("blkio: {e}");
    }
}

/// Round `round`'s requests: reads and writes of several sizes, a few flushes, discards and
/// write-zeroes, interleaved.
fn round(round: u64) -> Vec<BlkOp> {
    const SIZES: [usize; 5] = [4096, 512, 16384, 65536, 3 * 512];
    let mut reqs = Vec::new();
    for i in 0..40u64 {
        let size = SIZES[(i as usize + round as usize) % SIZES.len()];
        let off = ((round * 40 + i) * 64 * 1024) % (48 << 20);
        reqs.push(BlkOp::Write {
            off,
            data: vec![(round * 40 + i) as u8; size],
        });
        reqs.push(BlkOp::Read { off, len: size });
        reqs.push(BlkOp::Read {
            off: (i * 7 + 3) * 4096,
            len: 4096,
        });
        reqs.push(BlkOp::Read {
            off: COMPRESSED + (round * 40 + i) * 4096,
            len: 4096,
        });
        if i % 10 == 9 {
            reqs.push(BlkOp::Flush);
        }
        if i % 8 == 3 {
            reqs.push(BlkOp::Discard {
                off: (56 << 20) + i * 65536,
                len: 65536,
            });
        }
        if i % 13 == 5 {
            reqs.push(BlkOp::WriteZeroes {
                off: (60 << 20) + i * 8192,
                len: 8192,
                unmap: true,
            });
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
    let scratch = Scratch::new("metrics");
    let image = scratch.join("disk.qcow2");
    let socket = scratch.socket("disk.sock");
    // 64 MiB with compressed data at COMPRESSED (so that reads there go through the
    // decompressed-cluster cache and the L2 table exists on disk), the rest unallocated.
    let raw = scratch.join("disk.raw");
    {
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(64 << 20).unwrap();
        let text: Vec<u8> = (0..COMPRESSED_LEN)
            .map(|i| b"qcow2d metrics "[i % 15])
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &text, COMPRESSED).unwrap();
    }
    convert_raw_to_qcow2(&raw, &image, "", true);
    let daemon = Daemon::start_writable(
        &image,
        &socket,
        &["--queues", "2", "--metrics", "127.0.0.1:0"],
    )
    .unwrap_or_else(|f| panic!("qcow2d serve: {f}"));
    let addr = metrics_addr(&daemon);
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

    let mut client = BlkClient::connect_rw(&socket, QUEUES).expect("blkio client");
    // Each read and write in one buffer, as a guest's simplest request.
    client.set_one_segment(true);
    let mut expected: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut previous = scrape(addr);
    for r in 0..4 {
        let reqs = round(r);
        run(&mut client, &reqs);
        for req in &reqs {
            let e = expected.entry(op_name(req)).or_default();
            e.0 += 1;
            e.1 += req.range().map_or(0, |(_, len)| len);
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

    // A scraper that sends half a request and stalls holds the endpoint, never the disk: the
    // reads complete while it is still connected (were the data path waiting for the
    // endpoint, they would not complete until it is dropped, below).
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(b"GET /metr").unwrap();
    thread::sleep(Duration::from_millis(50));
    let reqs: Vec<BlkOp> = (0..64)
        .map(|i| BlkOp::Read {
            off: i * 4096,
            len: 4096,
        })
        .collect();
    run(&mut client, &reqs);
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

    let stderr = daemon.stderr();
    let status = daemon.terminate();
    assert!(
        status.success(),
        "qcow2d exited with {status}; stderr:\n{stderr}"
    );
}
