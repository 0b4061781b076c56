//! The engine caches of every export drawn from one budget per core thread
//! (`cache_per_core`), through the real daemon: several exports, each with a client reading
//! over more distinct L2 tables than the budget holds, all connected at once. Every read is
//! right; the cache the core threads report (`qcow2d_core_cache_bytes`) stays within twice the
//! budget (shards that connect after the budget is used up still grow to their fair share)
//! and a floor per shard, and the daemon's anonymous memory grows by about that, where a
//! budget that holds every table lets it grow by every export's tables.

use qcow2d_tests::frontend::rss_kib;
use qcow2d_tests::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Exports served at once, each with its own client.
const EXPORTS: usize = 4;
/// L2 tables each client reads through: 64 KiB each, so 32 MiB of tables per export.
const TABLES: u64 = 512;
/// Guest bytes one L2 table maps (64 KiB clusters: 8192 entries of 64 KiB).
const TABLE_COVER: u64 = 8192 * 65536;
/// The bounded run's budget per core thread.
const SMALL_BUDGET: u64 = 4 * MIB;
/// What each shard's caches hold whatever the budget: 4 L2 tables and 2 decompressed clusters
/// of 64 KiB (one layer).
const FLOOR_BYTES: u64 = 6 * 65536;

/// The byte written at the start of table `k`'s range.
fn pattern(k: u64) -> u8 {
    (k % 250) as u8 + 1
}

/// One image with 4 KiB of data at the start of each of [`TABLES`] L2 tables' ranges.
fn image(s: &Scratch) -> PathBuf {
    let img = s.join("wide.qcow2");
    create_qcow2(&img, TABLES * TABLE_COVER, "cluster_size=65536");
    let writes: Vec<String> = (0..TABLES)
        .map(|k| format!("write -P {} {} 4096", pattern(k), k * TABLE_COVER))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &writes);
    img
}

/// The metrics endpoint the daemon announced before its ready line.
fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    daemon
        .startup_stdout()
        .lines()
        .find_map(|l| l.strip_prefix("qcow2d: metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics line: {}", daemon.startup_stdout()))
}

/// The sum over the cores of a `core`-labelled gauge, and the number of cores.
fn core_gauge(addr: SocketAddr, name: &str) -> (u64, usize) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: qcow2d\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let prefix = format!("{name}{{core=\"");
    let values: Vec<u64> = answer
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(!values.is_empty(), "no {name} in:\n{answer}");
    (values.iter().sum(), values.len())
}

/// What one run measured, with every client connected and done reading.
struct Measured {
    /// RssAnon growth from the idle daemon, in KiB.
    anon_growth_kib: u64,
    /// `qcow2d_core_cache_bytes`, summed over the cores.
    cache_bytes: u64,
    /// `qcow2d_core_cache_limit_bytes`, summed over the cores.
    limit_bytes: u64,
}

/// Serves [`EXPORTS`] read-only exports of `img` (one worker each) with `cache_per_core`, has
/// one client per export read the start of every table's range and check it, and measures
/// while they all stay connected.
fn run(s: &Scratch, img: &Path, cache_per_core: &str) -> Measured {
    let sockets: Vec<PathBuf> = (0..EXPORTS)
        .map(|i| s.socket(&format!("{cache_per_core}-{i}.sock")))
        .collect();
    let config = s.join(&format!("{cache_per_core}.toml"));
    let mut text = format!("metrics = \"127.0.0.1:0\"\ncache_per_core = \"{cache_per_core}\"\n");
    for socket in &sockets {
        text.push_str(&format!(
            "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\nread_only = true\nqueues = 1\n",
            img.display(),
            socket.display()
        ));
    }
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve").arg("--config").arg(&config);
    let mut d = Daemon::spawn(cmd, img, &sockets[0]).unwrap_or_else(|f| panic!("{f}"));
    let metrics = metrics_addr(&d);
    thread::sleep(Duration::from_millis(200));
    let (_, anon_idle) = rss_kib(d.pid());

    let (done_tx, done_rx) = mpsc::channel();
    let mut releases = Vec::new();
    let mut clients = Vec::new();
    for socket in &sockets {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        releases.push(release_tx);
        let done_tx = done_tx.clone();
        let socket = socket.clone();
        clients.push(thread::spawn(move || {
            blk_session(&socket, 1, READ_TIMEOUT, move |c| {
                for k in 0..TABLES {
                    let data = c.read_range(k * TABLE_COVER, 8192)?;
                    let want = pattern(k);
                    if data[..4096].iter().any(|&b| b != want)
                        || data[4096..].iter().any(|&b| b != 0)
                    {
                        return Err(format!("wrong bytes in table {k}"));
                    }
                }
                let _ = done_tx.send(());
                // Connected (its shard and caches alive) until the measurement is taken.
                let _ = release_rx.recv_timeout(READ_TIMEOUT);
                Ok(())
            })
        }));
    }
    drop(done_tx);
    let deadline = Instant::now() + READ_TIMEOUT;
    for _ in 0..EXPORTS {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            // A client failed (its error comes out of its join below) or took too long.
            break;
        }
    }
    let (_, anon_busy) = rss_kib(d.pid());
    let (cache_bytes, cores) = core_gauge(metrics, "qcow2d_core_cache_bytes");
    let (limit_bytes, limit_cores) = core_gauge(metrics, "qcow2d_core_cache_limit_bytes");
    assert_eq!(cores, limit_cores);
    for release in releases {
        let _ = release.send(());
    }
    for client in clients {
        client.join().unwrap().unwrap();
    }
    d.assert_alive("after the reads");
    // Once the clients are gone, their shards give their cache back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while core_gauge(metrics, "qcow2d_core_cache_bytes").0 != 0 {
        assert!(Instant::now() < deadline, "the cache was not given back");
        thread::sleep(Duration::from_millis(20));
    }
    d.terminate();
    Measured {
        anon_growth_kib: anon_busy.saturating_sub(anon_idle),
        cache_bytes,
        limit_bytes,
    }
}

#[test]
fn exports_on_one_daemon_share_a_cache_budget_per_core() {
    require_qemu_tools();
    let s = Scratch::new("cache-budget");
    let img = image(&s);
    let tables_bytes = EXPORTS as u64 * TABLES * 65536;

    let small = run(&s, &img, "4M");
    let cores = small.limit_bytes / SMALL_BUDGET;
    assert_eq!(small.limit_bytes, cores * SMALL_BUDGET);
    // Within twice the budget and a floor per shard (one per export), and far below what
    // every export's tables take.
    assert!(
        small.cache_bytes <= 2 * small.limit_bytes + EXPORTS as u64 * FLOOR_BYTES,
        "{} bytes cached with budgets of {} in all",
        small.cache_bytes,
        small.limit_bytes
    );
    assert!(small.cache_bytes < tables_bytes / 4);

    // A budget that holds every table: each export caches all of its own.
    let large = run(&s, &img, "1G");
    assert_eq!(large.cache_bytes, tables_bytes);

    // The daemon's memory follows: the bounded run grows by at most its budget and what a
    // connection costs besides, the other by every export's tables.
    let saved_kib = (tables_bytes - small.cache_bytes) / 1024;
    assert!(
        small.anon_growth_kib + saved_kib / 2 < large.anon_growth_kib,
        "anonymous memory grew by {} KiB with a budget of {} bytes, by {} KiB with every \
         table cached",
        small.anon_growth_kib,
        small.limit_bytes,
        large.anon_growth_kib
    );
    eprintln!(
        "cache {} KiB (limit {} KiB on {cores} cores), anon +{} KiB; every table: cache {} \
         KiB, anon +{} KiB",
        small.cache_bytes / 1024,
        small.limit_bytes / 1024,
        small.anon_growth_kib,
        large.cache_bytes / 1024,
        large.anon_growth_kib
    );
}
