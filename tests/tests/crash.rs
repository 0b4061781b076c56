//! Crash tests through the socket: `qcow2d serve` is killed with SIGKILL at a random moment
//! while a vhost-user-blk client (`blkio`, 2 queues) runs a write load with periodic flushes.
//!
//! The client logs every write before it submits it, every completion it sees, and for every
//! flush the writes that had completed when the flush was submitted. A killed process (unlike
//! a host crash) loses no write whose completion the client saw, flushed or not, in write-back
//! and write-through mode alike: the daemon writes the metadata a write changed into the file
//! before it completes the write. After the kill:
//! - `qemu-img check` finds no corruption (leaked clusters are allowed) and no dirty bit is left
//!   (default settings);
//! - the daemon opens the image again (writable), and every 512-byte sector read through the
//!   socket holds either the last completed write to it or a write submitted after that one
//!   (or, with no completed write, the initial content or any write submitted to it);
//! - `qemu-img convert` reads the same;
//! - after repairing the leaks (`qcow2d check --repair` when the binary has it, otherwise
//!   `qemu-img check -r leaks`) the image has no leaks and still reads the same.
//!
//! With `--lazy-refcounts` the kill leaves the dirty bit set: the test records what reopening
//! does (the engine rebuilds the refcounts of a dirty image before it opens it writable).

use qcow2d_tests::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 32 * MIB;
const SECTOR: u64 = 512;
/// Tags at or above this are flushes.
const FLUSH_TAG: usize = 1 << 40;
/// Requests the load keeps in flight.
const DEPTH: usize = 12;
/// A flush after every this many submitted writes.
const FLUSH_EVERY: usize = 16;
/// Limit for the client to connect, and for it to wind down after the kill.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One write of the load.
#[derive(Clone, Copy, Debug)]
struct WriteRec {
    off: u64,
    len: u64,
    /// Random data from this seed, or zeros (write-zeroes) when `None`.
    seed: Option<u64>,
}

impl WriteRec {
    fn content(&self) -> Vec<u8> {
        match self.seed {
            Some(seed) => random_bytes(seed, self.len as usize),
            None => vec![0u8; self.len as usize],
        }
    }
}

/// What the client saw. Entries are added before a request is submitted, and after its
/// completion was seen, so `completed` and `flushed` never claim more than happened.
#[derive(Default)]
struct Log {
    writes: Vec<WriteRec>,
    /// Write ids in the order their successful completions were seen.
    completed: Vec<usize>,
    /// For each completed flush: how many entries of `completed` it covers.
    flushed: Vec<usize>,
    /// A request failed (not judged once the daemon has been killed).
    error: Option<String>,
}

/// The load: random writes (a sixth of them write-zeroes, with and without unmap) that never
/// overlap a write still in flight, and a flush after every [`FLUSH_EVERY`] writes; runs until
/// `stop` is set or the connection fails.
fn write_load(
    socket: &Path,
    seed: u64,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    connected: mpsc::Sender<Result<(), String>>,
) {
    let mut c = match BlkClient::connect_rw(socket, 2) {
        Ok(c) => c,
        Err(e) => {
            let _ = connected.send(Err(e));
            return;
        }
    };
    let _ = connected.send(Ok(()));
    let mut rng = Rng::new(seed);
    let mut in_flight: HashMap<usize, (u64, u64)> = HashMap::new();
    let mut flush_cover: HashMap<usize, usize> = HashMap::new();
    let mut since_flush = 0;
    let mut flushes = 0;
    while !stop.load(Ordering::Relaxed) {
        while c.in_flight() < DEPTH {
            if since_flush >= FLUSH_EVERY {
                let cover = log.lock().unwrap().completed.len();
                flush_cover.insert(FLUSH_TAG + flushes, cover);
                if c.submit(&BlkOp::Flush, FLUSH_TAG + flushes).is_err() {
                    return;
                }
                flushes += 1;
                since_flush = 0;
                continue;
            }
            let len = SECTOR
                * match rng.below(8) {
                    0..=4 => 1 + rng.below(16),
                    5..=6 => 1 + rng.below(128),
                    _ => 1 + rng.below(512),
                };
            let off = if rng.below(3) == 0 {
                rng.below((SIZE - len) / 65536 + 1) * 65536
            } else {
                rng.below((SIZE - len) / SECTOR + 1) * SECTOR
            };
            if in_flight
                .values()
                .any(|&(o, l)| off < o + l && o < off + len)
            {
                continue;
            }
            let kind = rng.below(12);
            let rec = WriteRec {
                off,
                len,
                seed: (kind >= 2).then(|| rng.next_u64()),
            };
            let op = match rec.seed {
                Some(_) => BlkOp::Write {
                    off,
                    data: rec.content(),
                },
                None => BlkOp::WriteZeroes {
                    off,
                    len,
                    unmap: kind == 0,
                },
            };
            if !c.can_submit(&op) {
                break;
            }
            let id = {
                let mut l = log.lock().unwrap();
                l.writes.push(rec);
                l.writes.len() - 1
            };
            if c.submit(&op, id).is_err() {
                return;
            }
            in_flight.insert(id, (off, len));
            since_flush += 1;
        }
        let done = match c.poll(Duration::from_millis(20)) {
            Ok(d) => d,
            Err(_) => return, // the daemon is gone
        };
        let mut l = log.lock().unwrap();
        for (tag, r) in done {
            if let Err(e) = r {
                let what = if tag >= FLUSH_TAG { "flush" } else { "write" };
                l.error.get_or_insert(format!("{what} {tag} failed: {e}"));
                return;
            }
            if tag >= FLUSH_TAG {
                let cover = flush_cover.remove(&tag).unwrap();
                l.flushed.push(cover);
            } else {
                in_flight.remove(&tag);
                l.completed.push(tag);
            }
        }
    }
}

/// What the disk may hold after the crash, sector by sector: every sector must equal one of
/// its candidates. Returns a description of the first sector that does not.
fn judge(initial: &[u8], disk: &[u8], log: &Log) -> Result<JudgeStats, String> {
    let mut durable = vec![false; log.writes.len()];
    for &id in &log.completed {
        durable[id] = true;
    }
    let sectors = (SIZE / SECTOR) as usize;
    // Writes touching each sector, in submission order (overlapping writes are never in
    // flight together, so that is also the order they took effect).
    let mut touching: Vec<Vec<usize>> = vec![Vec::new(); sectors];
    for (id, w) in log.writes.iter().enumerate() {
        for s in w.off / SECTOR..(w.off + w.len) / SECTOR {
            touching[s as usize].push(id);
        }
    }
    let mut cache: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut stats = JudgeStats::default();
    for (s, list) in touching.iter().enumerate() {
        let at = s * SECTOR as usize;
        let actual = &disk[at..at + SECTOR as usize];
        let last_durable = list.iter().rposition(|&id| durable[id]);
        let candidates = match last_durable {
            Some(i) => {
                stats.durable_sectors += 1;
                &list[i..]
            }
            None => {
                if actual == &initial[at..at + SECTOR as usize] {
                    continue;
                }
                &list[..]
            }
        };
        let ok = candidates.iter().any(|&id| {
            let w = log.writes[id];
            let data = cache.entry(id).or_insert_with(|| w.content());
            let o = at - w.off as usize;
            &data[o..o + SECTOR as usize] == actual
        });
        if !ok {
            let want = match last_durable {
                Some(i) => format!(
                    "the durable write {} ({:?}) or one of the {} submitted after it",
                    list[i],
                    log.writes[list[i]],
                    list.len() - i - 1
                ),
                None => format!(
                    "the initial content or one of the {} writes submitted to it (none durable)",
                    list.len()
                ),
            };
            return Err(format!(
                "sector at {at:#x} holds {:02x?}... which is not {want}",
                &actual[..16]
            ));
        }
    }
    Ok(stats)
}

/// How the daemon is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGKILL.
    Kill,
    /// SIGTERM: it must drain, flush, close the image and exit 0.
    Term,
}

#[derive(Default, Debug)]
struct JudgeStats {
    durable_sectors: usize,
}

/// Image kinds the rounds rotate through.
const KINDS: u64 = 6;

/// An image for round `round`: the kinds rotate (fresh 64 KiB clusters, zlib-compressed data,
/// raw backing file with 16 KiB clusters, extended L2 over a backing file, 512-byte clusters
/// with 64-bit refcounts (the refcount table keeps growing), 2 MiB clusters). Returns the
/// image and its initial content.
fn make_image(s: &Scratch, round: u64) -> (PathBuf, Vec<u8>) {
    let img = s.join("crash.qcow2");
    match round % KINDS {
        0 => {
            create_qcow2(&img, SIZE, "");
        }
        4 => {
            create_qcow2(&img, SIZE, "cluster_size=512,refcount_bits=64");
        }
        5 => {
            create_qcow2(&img, SIZE, "cluster_size=2M");
        }
        1 => {
            let raw = s.join("src.raw");
            write_file(&raw, &mixed_bytes(round, SIZE as usize));
            convert_raw_to_qcow2(&raw, &img, "compression_type=zlib", true);
        }
        _ => {
            write_file(
                &s.join("base.raw"),
                &mixed_bytes(round, (SIZE / 2) as usize),
            );
            let opts = if round % KINDS == 3 {
                "extended_l2=on,cluster_size=64k"
            } else {
                "cluster_size=16k"
            };
            qemu_img_in(
                s.path(),
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    opts,
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                    "crash.qcow2",
                    &SIZE.to_string(),
                ],
            );
        }
    }
    let initial = oracle(&img);
    (img, initial)
}

/// Serves `img` with `extra` options, runs the load, stops the daemon after `run_for`, and
/// returns the client's log.
fn run_and_stop(
    img: &Path,
    socket: &Path,
    extra: &[&str],
    seed: u64,
    run_for: Duration,
    how: Stop,
) -> Log {
    let d = Daemon::start_writable(img, socket, extra)
        .unwrap_or_else(|f| panic!("qcow2d serve {}: {f}", img.display()));
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let client = {
        let (socket, log, stop) = (socket.to_path_buf(), log.clone(), stop.clone());
        std::thread::spawn(move || write_load(&socket, seed, log, stop, tx))
    };
    match rx.recv_timeout(CLIENT_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("client: {e}\nqcow2d stderr:\n{}", d.stderr()),
        Err(_) => panic!(
            "client: not connected within {} s",
            CLIENT_TIMEOUT.as_secs()
        ),
    }
    std::thread::sleep(run_for);
    // On a loaded machine the first writes may not have completed yet: the stop comes once
    // the client has seen at least one, so every round judges some completed writes.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let started_writing = || {
        let l = log.lock().unwrap();
        !l.completed.is_empty() || l.error.is_some()
    };
    while !started_writing() {
        assert!(
            Instant::now() < deadline,
            "no write completed within {} s\nqcow2d stderr:\n{}",
            CLIENT_TIMEOUT.as_secs(),
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A request that failed while the daemon was alive is a bug; look before the kill.
    let early_error = log.lock().unwrap().error.clone();
    let stderr = d.stderr();
    match how {
        Stop::Kill => {
            let st = d.sigkill();
            assert!(
                st.code().is_none(),
                "qcow2d exited ({st}) before it was killed; stderr:\n{stderr}"
            );
        }
        Stop::Term => {
            let st = d.terminate();
            assert!(
                st.success(),
                "SIGTERM under load: qcow2d exited with {st}, expected 0; stderr:\n{stderr}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(e) = early_error {
        panic!("a request failed while the daemon ran: {e}\nqcow2d stderr:\n{stderr}");
    }
    with_timeout("crash client winding down", CLIENT_TIMEOUT, move || {
        client.join().unwrap()
    });
    Arc::try_unwrap(log)
        .ok()
        .expect("the client thread has ended")
        .into_inner()
        .unwrap()
}

/// Restarts the daemon on `img` and reads the whole disk through the socket.
fn read_back(img: &Path, socket: &Path) -> Vec<u8> {
    let d = Daemon::start_writable(img, socket, &[]).unwrap_or_else(|f| {
        panic!(
            "the daemon must open the image again after the crash: {f}\n{}",
            qemu_img_info_text(img)
        )
    });
    let disk = rw_session(socket, 2, READ_TIMEOUT, |c| c.read_range(0, SIZE))
        .unwrap_or_else(|e| panic!("reading back: {e}\nqcow2d stderr:\n{}", d.stderr()));
    let stderr = d.stderr();
    let st = d.terminate();
    assert!(
        st.success(),
        "qcow2d exited with {st} after SIGTERM:\n{stderr}"
    );
    disk
}

/// Reads the whole disk of a read-only export (1 MiB requests, read-only client).
fn read_read_only(socket: &Path) -> Result<Vec<u8>, String> {
    let plan: Vec<ReadReq> = (0..SIZE / MIB).map(|i| (i * MIB, MIB as usize)).collect();
    let results = blk_session(socket, 2, READ_TIMEOUT, move |c| c.read_batch(&plan))?;
    let mut disk = Vec::with_capacity(SIZE as usize);
    for r in results {
        disk.extend_from_slice(&r?);
    }
    Ok(disk)
}

/// Repairs leaks with `qcow2d check --repair`; returns what ran.
fn repair_leaks(img: &Path) -> &'static str {
    let out = run_daemon_cmd(&["check".as_ref(), img.as_os_str(), "--repair".as_ref()]);
    assert!(
        out.status.success(),
        "qcow2d check --repair {} ({}):\n{}{}",
        img.display(),
        out.status,
        out.stdout,
        out.stderr
    );
    "qcow2d check --repair"
}

/// One round: returns whether a flush had completed before the kill (so durability was
/// judged), and the time it took.
fn one_round(round: u64) -> bool {
    let started = Instant::now();
    let s = Scratch::new("crash");
    let (img, initial) = make_image(&s, round);
    let seed = 0xc0ff_ee00 + round;
    let run_for = Duration::from_millis(150 + Rng::new(seed).below(600));
    let socket = s.socket("c.sock");
    let log = run_and_stop(&img, &socket, &[], seed, run_for, Stop::Kill);
    let what = format!(
        "round {round} ({} after {run_for:?}: {} writes submitted, {} completed, {} flushes \
         completed)",
        img.display(),
        log.writes.len(),
        log.completed.len(),
        log.flushed.len()
    );

    assert!(
        !dirty_bit(&img) && !corrupt_bit(&img),
        "{what}: kill -9 left the dirty or corrupt bit without lazy refcounts:\n{}",
        qemu_img_info_text(&img)
    );
    let (code, v) = qemu_img_check(&img, None);
    assert!(
        check_count(&v, "corruptions") == 0
            && check_count(&v, "check-errors") == 0
            && (code == 0 || code == 3),
        "{what}: qemu-img check after the crash (exit {code}): {v}"
    );
    let leaks = check_count(&v, "leaks");

    let disk = read_back(&img, &socket);
    // A killed process loses no write it completed: the metadata of every completed write was
    // in the file (if not yet durable) before the completion.
    let stats = judge(&initial, &disk, &log).unwrap_or_else(|e| panic!("{what}: {e}"));
    let qemu_view = oracle(&img);
    if let Some(m) = first_difference("qemu-img convert", &what, 0, &disk, &qemu_view) {
        panic!("qemu-img reads the crashed image differently from qcow2d: {m}");
    }

    let how = repair_leaks(&img);
    assert_check_clean(&img, &format!("{what}, after {how}"));
    let repaired = oracle(&img);
    if let Some(m) = first_difference("after repair", &what, 0, &disk, &repaired) {
        panic!("{how} changed the data: {m}");
    }
    eprintln!(
        "{what}: {leaks} leaked clusters, {} sectors judged durable, repaired with {how}, {:?}",
        stats.durable_sectors,
        started.elapsed()
    );
    !log.flushed.is_empty()
}

#[test]
fn kill_9_at_random_moments_keeps_image_consistent_and_completed_writes() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    // QCOW2D_CRASH_ROUNDS=N runs N rounds; QCOW2D_CRASH_FIRST_ROUND=K starts at round K (each
    // round's image kind, seed and kill time derive from its number).
    let rounds = env("QCOW2D_CRASH_ROUNDS").unwrap_or(3 * KINDS);
    let first = env("QCOW2D_CRASH_FIRST_ROUND").unwrap_or(0);
    let started = Instant::now();
    let mut judged = 0;
    for round in first..first + rounds {
        if one_round(round) {
            judged += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash rounds take too long: {round} rounds in {:?}",
            started.elapsed()
        );
    }
    // Without completed flushes only consistency would have been judged.
    assert!(
        judged * 2 >= rounds,
        "only {judged} of {rounds} rounds had a completed flush before the kill"
    );
}

/// With `--lazy-refcounts`, kill -9 leaves the dirty bit; the next writable open rebuilds the
/// refcounts (as QEMU does) and everything flushed is still there.
#[test]
fn kill_9_with_lazy_refcounts_leaves_dirty_bit_and_reopen_rebuilds() {
    let s = Scratch::new("crash_lazy");
    let (img, initial) = make_image(&s, 0);
    let socket = s.socket("c.sock");
    let log = run_and_stop(
        &img,
        &socket,
        &["--lazy-refcounts"],
        0x1a2e_0001,
        Duration::from_millis(500),
        Stop::Kill,
    );
    assert!(
        !log.flushed.is_empty(),
        "no flush completed in 500 ms: nothing to judge"
    );
    assert!(
        dirty_bit(&img),
        "kill -9 of a --lazy-refcounts export must leave the dirty bit:\n{}",
        qemu_img_info_text(&img)
    );
    // Read-only exports do not need the refcounts: one opens the dirty image as it is.
    let ro = Daemon::start_with(&img, &socket, &[]);
    let disk_ro = match ro {
        Ok(d) => {
            let disk = read_read_only(&socket)
                .unwrap_or_else(|e| panic!("read-only export of the dirty image: {e}"));
            let st = d.terminate();
            assert!(st.success(), "read-only export: exit {st}");
            disk
        }
        Err(f) => panic!("a read-only export of a dirty image must open: {f}"),
    };
    assert!(
        dirty_bit(&img),
        "a read-only export must not touch the dirty bit"
    );
    judge(&initial, &disk_ro, &log)
        .unwrap_or_else(|e| panic!("read-only export of the dirty image: {e}"));

    // A writable open rebuilds the refcounts (the image must not stay dirty).
    let disk = read_back(&img, &socket);
    assert!(
        !dirty_bit(&img),
        "reopening writable must clear the dirty bit"
    );
    judge(&initial, &disk, &log).unwrap_or_else(|e| panic!("after the rebuild: {e}"));
    assert_check_clean(
        &img,
        "lazy refcounts: after the rebuild at open and a clean stop",
    );
    if let Some(m) = first_difference("qemu-img convert", "lazy", 0, &disk, &oracle(&img)) {
        panic!("qemu-img reads the rebuilt image differently: {m}");
    }
}

/// `--writethrough`: kill -9 at random moments; every write whose completion the client saw is
/// in the image, flushed or not.
#[test]
fn kill_9_writethrough_keeps_every_completed_write() {
    for round in 0..3u64 {
        let s = Scratch::new("crash_wt");
        let (img, initial) = make_image(&s, round);
        let seed = 0x7a11_0000 + round;
        let run_for = Duration::from_millis(150 + Rng::new(seed).below(400));
        let socket = s.socket("c.sock");
        let log = run_and_stop(
            &img,
            &socket,
            &["--writethrough"],
            seed,
            run_for,
            Stop::Kill,
        );
        let what = format!(
            "writethrough round {round} ({} writes completed before kill -9 after {run_for:?})",
            log.completed.len()
        );
        assert!(!log.completed.is_empty(), "{what}: nothing completed");
        let (code, v) = qemu_img_check(&img, None);
        assert!(
            check_count(&v, "corruptions") == 0 && (code == 0 || code == 3),
            "{what}: qemu-img check (exit {code}): {v}"
        );
        let disk = read_back(&img, &socket);
        judge(&initial, &disk, &log).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// SIGTERM while the client is writing: the daemon drains, flushes and closes the image (exit
/// 0); every write whose completion the client saw is there, and the image has no leaks.
#[test]
fn sigterm_under_write_load_is_clean() {
    // Fresh 64 KiB clusters, and 512-byte clusters with 64-bit refcounts (a new refcount block
    // every 64 clusters, so blocks are created while flushes run: several rounds).
    for round in [0, 4, 10, 16u64] {
        let s = Scratch::new("crash_term");
        let (img, initial) = make_image(&s, round);
        let seed = 0x7e21_0000 + round;
        let socket = s.socket("c.sock");
        let log = run_and_stop(
            &img,
            &socket,
            &[],
            seed,
            Duration::from_millis(300),
            Stop::Term,
        );
        let what = format!(
            "SIGTERM round {round} ({} writes completed, {} submitted)",
            log.completed.len(),
            log.writes.len()
        );
        assert!(!dirty_bit(&img), "{what}: dirty bit after SIGTERM");
        assert_check_clean(&img, &what);
        let disk = oracle(&img);
        judge(&initial, &disk, &log).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}
