//! Crash states enumerated, the way CrashMonkey and TigerBeetle test storage: every file a
//! crash could leave while a scenario's write-backs and flushes run, rebuilt and checked.
//!
//! A scenario starts from a durable file (`base`: read right after a completed FLUSH, with
//! nothing in flight). It then runs guest requests and flushes on one shard whose
//! [`WriteLog`] records every metadata write (bytes and offset) and every sync, in the order
//! submitted. Guest data writes are not logged: they are the sectors that differ between
//! `base` and the file before the logged writes that follow them, and they count as written
//! first and durable only at the first sync. Replaying everything onto `base` must give the
//! final file, byte for byte (else the log missed a write and the test fails).
//!
//! The log is a list of steps: writes submitted together (each durable when it completes, for
//! RWF_DSYNC writes), and syncs. A crash happens at a boundary `k`: steps `0..k` completed and
//! step `k` in flight. Then a write is *surely* in the file if a sync completed after it, or
//! it was a durable write that completed; every other write submitted so far (completed but
//! unsynced, or in flight) may or may not be there, each 512-byte sector of it on its own (a
//! write that spans several sectors may be torn). For each boundary the enumerator builds the
//! file for
//! - every subset of those uncertain writes when there are at most `EXHAUSTIVE` of them, else
//!   none, all, the structured subsets (every prefix and every suffix in submission order,
//!   every one alone, every one missing; a seeded sample of `SAMPLED` of them when there are
//!   more), and `SAMPLED` subsets drawn at random from a seeded generator;
//! - for each of those, `TORN` variants in which one multi-sector write of the subset lands
//!   only in part (a seeded, proper subset of its sectors).
//!
//! Set `QCOW2D_CRASH_STATES=full` for larger bounds (`EXHAUSTIVE` 12, `SAMPLED` 512, `TORN`
//! 8). Each distinct file is checked once: `qcow2d check` (the engine's `check`) and
//! `qemu-img check` find no corruption (leaks are allowed), and every sector of the disk
//! reads, through the engine, as the model of the last completed FLUSH says, or as a later
//! model (writes not covered by a completed FLUSH may or may not be there). Each scenario
//! prints how many crash states it covers and how many distinct files that made.
//!
//! What this does not cover: the file's length is taken as its final length (extensions are
//! made durable by the syncs and durable writes that follow them), and data writes are not
//! ordered against the write-back steps logged between them.

use qcow2d_engine::{
    check, Image, InflateSharing, LoggedStep, OpenOptions, Shard, ShardConfig, WriteLog,
};
use qcow2d_tests::{create_qcow2_in, qemu_img, qemu_img_cmd, qemu_io_cmd, run_ok, Rng};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SECTOR: usize = 512;

struct Bounds {
    exhaustive: usize,
    sampled: usize,
    torn: usize,
}

fn bounds() -> Bounds {
    match std::env::var("QCOW2D_CRASH_STATES").as_deref() {
        Ok("full") => Bounds {
            exhaustive: 12,
            sampled: 512,
            torn: 8,
        },
        _ => Bounds {
            exhaustive: 6,
            sampled: 16,
            torn: 1,
        },
    }
}

/// One write of the replayed history.
#[derive(Clone)]
struct Write {
    host: u64,
    bytes: Vec<u8>,
}

/// One step of the replayed history.
enum Event {
    Writes { durable: bool, writes: Vec<Write> },
    Sync,
}

/// A guest request of a scenario.
enum Op {
    Write(u64, Vec<u8>),
    Discard(u64, u64),
    Flush,
}

/// An image opened read-write with one logged shard, and the model of its disk.
struct Run {
    path: PathBuf,
    image: Option<Image>,
    shard: Option<Shard>,
    log: Arc<WriteLog>,
    model: Vec<u8>,
}

impl Run {
    fn open(path: &Path) -> Run {
        let model = read_disk(path);
        let image = Image::open(
            path,
            &OpenOptions {
                read_only: false,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let log = Arc::new(WriteLog::default());
        let config = ShardConfig {
            write_log: Some(Arc::clone(&log)),
            // No thread hand-offs: the run is the same every time.
            inflate: InflateSharing::OnShard,
            ..ShardConfig::default()
        };
        let shard = image.new_shard(&config).unwrap();
        Run {
            path: path.to_path_buf(),
            image: Some(image),
            shard: Some(shard),
            log,
            model,
        }
    }

    /// Submits `ops` together and waits until nothing is in flight.
    fn apply(&mut self, ops: &[Op]) {
        let shard = self.shard.as_mut().unwrap();
        let mut keep = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let token = i as u64;
            match op {
                Op::Write(off, data) => {
                    let iov = [libc::iovec {
                        iov_base: data.as_ptr() as *mut libc::c_void,
                        iov_len: data.len(),
                    }];
                    // SAFETY: `data` lives in `ops`, borrowed until every request completed
                    // below; the kernel only reads it.
                    unsafe { shard.submit_write(token, *off, &iov) }.unwrap();
                    keep.push(iov);
                    self.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                }
                Op::Discard(off, len) => {
                    shard.submit_discard(token, *off, *len).unwrap();
                    self.model[*off as usize..(*off + *len) as usize].fill(0);
                }
                Op::Flush => shard.submit_flush(token).unwrap(),
            }
        }
        let mut out = Vec::new();
        while shard.in_flight() > 0 {
            shard.wait(&mut out);
        }
        assert_eq!(out.len(), ops.len());
        for c in &out {
            assert!(
                c.result.is_ok(),
                "request {} failed: {:?}",
                c.token,
                c.result
            );
        }
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    fn close(mut self) {
        let mut shard = self.shard.take().unwrap();
        shard.flush_blocking().unwrap();
        shard.release_reserved();
        drop(shard);
        self.image.take().unwrap().close().unwrap();
    }
}

/// The guest-visible bytes of the image at `path`, read through the engine.
fn read_disk(path: &Path) -> Vec<u8> {
    let img = Image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: the engine cannot open it: {e}", path.display()));
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("{}: the engine cannot read it: {e}", path.display()));
    buf
}

/// What a scenario recorded: the durable file it started from, the history after it, and
/// the models of the disk (the first is durable at `base`; model `i + 1` is the disk once the
/// `i`-th flush of the history completed; the last is the disk at the end).
struct History {
    base: Vec<u8>,
    events: Vec<Event>,
    /// For each model after the first, the number of events after which it is durable
    /// (`usize::MAX`: never, the disk at the end without a flush).
    models: Vec<(usize, Vec<u8>)>,
    final_file: Vec<u8>,
}

/// Runs `phases` (each a set of requests submitted together; a phase that is only
/// `Op::Flush` is a guest flush) on `run`, recording the history from its current, durable
/// state.
fn record(run: &mut Run, phases: Vec<Vec<Op>>) -> History {
    run.apply(&[Op::Flush]);
    run.log.take();
    let base = run.file();
    let mut events = Vec::new();
    let mut models = vec![(0, run.model.clone())];
    let mut before = base.clone();
    for ops in phases {
        let flush = ops.iter().any(|o| matches!(o, Op::Flush));
        run.apply(&ops);
        let after = run.file();
        let logged = run.log.take();
        // The data the phase wrote: what changed and no logged write explains.
        let mut covered = vec![false; after.len().div_ceil(SECTOR)];
        for step in &logged {
            if let LoggedStep::Writes { writes, .. } = step {
                for (host, bytes) in writes {
                    let (a, b) = (
                        *host as usize / SECTOR,
                        (*host as usize + bytes.len()).div_ceil(SECTOR),
                    );
                    let b = b.min(covered.len());
                    covered[a..b].iter_mut().for_each(|c| *c = true);
                }
            }
        }
        let mut data = Vec::new();
        let mut s = 0;
        while s < covered.len() {
            let differs = |s: usize| {
                let r = s * SECTOR..((s + 1) * SECTOR).min(after.len());
                let old = before
                    .get(r.clone())
                    .map_or_else(|| vec![0; r.len()], <[u8]>::to_vec);
                !covered[s] && after[r] != old[..]
            };
            if !differs(s) {
                s += 1;
                continue;
            }
            let start = s;
            while s < covered.len() && differs(s) {
                s += 1;
            }
            let end = (s * SECTOR).min(after.len());
            data.push(Write {
                host: (start * SECTOR) as u64,
                bytes: after[start * SECTOR..end].to_vec(),
            });
        }
        if !data.is_empty() {
            events.push(Event::Writes {
                durable: false,
                writes: data,
            });
        }
        for step in logged {
            match step {
                LoggedStep::Writes { durable, writes } => events.push(Event::Writes {
                    durable,
                    writes: writes
                        .into_iter()
                        .map(|(host, bytes)| Write { host, bytes })
                        .collect(),
                }),
                LoggedStep::Sync => events.push(Event::Sync),
                LoggedStep::RunStart { .. } => {}
                LoggedStep::RunEnd { ok } => assert!(ok, "a run failed"),
            }
        }
        models.push((
            if flush { events.len() } else { usize::MAX },
            run.model.clone(),
        ));
        before = after;
    }
    let final_file = run.file();
    let replayed = build(&base, final_file.len(), &events, &|_, _| true);
    if let Some(at) = replayed.iter().zip(&final_file).position(|(a, b)| a != b) {
        panic!("the log misses a write: replayed history and file differ at {at:#x}");
    }
    History {
        base,
        events,
        models,
        final_file,
    }
}

/// The file made of `base` (cut or extended to `len`) and the writes of `events` that `keep`
/// selects, sector by sector: `keep(write index, sector index within the write)`.
fn build(
    base: &[u8],
    len: usize,
    events: &[Event],
    keep: &dyn Fn(usize, usize) -> bool,
) -> Vec<u8> {
    let mut file = base.to_vec();
    file.resize(len, 0);
    let mut index = 0;
    for e in events {
        let Event::Writes { writes, .. } = e else {
            continue;
        };
        for w in writes {
            for (s, chunk) in w.bytes.chunks(SECTOR).enumerate() {
                if keep(index, s) {
                    let at = w.host as usize + s * SECTOR;
                    let end = (at + chunk.len()).min(len);
                    if at < end {
                        file[at..end].copy_from_slice(&chunk[..end - at]);
                    }
                }
            }
            index += 1;
        }
    }
    file
}

/// Per crash state: which writes are in, and which one is torn (with the sectors it keeps).
struct State {
    /// Crash after this many completed events.
    boundary: usize,
    present: Vec<bool>,
    torn: Option<(usize, Vec<bool>)>,
}

/// Every crash state of `h` within the bounds (see the module documentation).
fn enumerate(h: &History, seed: u64) -> Vec<State> {
    let b = bounds();
    let mut rng = Rng::new(seed);
    // Writes in history order: (event index, sectors).
    let mut writes: Vec<(usize, usize, bool)> = Vec::new();
    for (i, e) in h.events.iter().enumerate() {
        if let Event::Writes {
            durable,
            writes: ws,
        } = e
        {
            for w in ws {
                writes.push((i, w.bytes.len().div_ceil(SECTOR), *durable));
            }
        }
    }
    let mut states = Vec::new();
    for k in 0..=h.events.len() {
        // Surely in: completed before a completed sync, or durable writes that completed.
        let last_sync = h.events[..k].iter().rposition(|e| matches!(e, Event::Sync));
        let mut sure = vec![false; writes.len()];
        let mut unsure = Vec::new();
        for (w, &(event, _, durable)) in writes.iter().enumerate() {
            if event > k || (event == k && k == h.events.len()) {
                continue;
            }
            let synced = last_sync.is_some_and(|s| event < s);
            if event < k && (synced || durable) {
                sure[w] = true;
            } else {
                unsure.push(w);
            }
        }
        let m = unsure.len();
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if m <= b.exhaustive {
            for bits in 0u64..1 << m {
                subsets.push((0..m).map(|i| bits & 1 << i != 0).collect());
            }
        } else {
            subsets.push(vec![false; m]);
            subsets.push(vec![true; m]);
            // Structured subsets (prefixes and suffixes in submission order, one write
            // alone, one missing): all of them when few, else a seeded sample.
            let structured = 4 * m;
            let picks: Vec<usize> = if structured <= b.sampled {
                (0..structured).collect()
            } else {
                (0..b.sampled)
                    .map(|_| rng.below(structured as u64) as usize)
                    .collect()
            };
            for p in picks {
                let (kind, n) = (p / m, p % m);
                subsets.push(
                    (0..m)
                        .map(|i| match kind {
                            0 => i <= n,
                            1 => i >= n,
                            2 => i == n,
                            _ => i != n,
                        })
                        .collect(),
                );
            }
            for _ in 0..b.sampled {
                subsets.push((0..m).map(|_| rng.below(2) == 0).collect());
            }
        }
        for subset in subsets {
            let mut present = sure.clone();
            for (i, &w) in unsure.iter().enumerate() {
                present[w] = subset[i];
            }
            let multi: Vec<usize> = unsure
                .iter()
                .enumerate()
                .filter(|&(i, &w)| subset[i] && writes[w].1 > 1)
                .map(|(_, &w)| w)
                .collect();
            if !multi.is_empty() {
                for _ in 0..b.torn {
                    let w = multi[rng.below(multi.len() as u64) as usize];
                    let n = writes[w].1;
                    let mut keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
                    if keep.iter().all(|&x| x) {
                        keep[rng.below(n as u64) as usize] = false;
                    }
                    if keep.iter().all(|&x| !x) {
                        keep[rng.below(n as u64) as usize] = true;
                    }
                    states.push(State {
                        boundary: k,
                        present: present.clone(),
                        torn: Some((w, keep)),
                    });
                }
            }
            states.push(State {
                boundary: k,
                present,
                torn: None,
            });
        }
    }
    states
}

/// `qemu-img check`'s (corruptions, check errors) of `path`.
fn qemu_check(path: &Path) -> (u64, u64, String) {
    let out = qemu_img_cmd()
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img (is qemu-utils installed?): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "qemu-img check does not read {} ({e}): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    (n("corruptions"), n("check-errors"), text)
}

/// Builds and checks every crash state of `h`; returns (states, distinct files).
fn check_states(name: &str, h: &History, seed: u64, lazy: bool) -> (usize, usize) {
    let states = enumerate(h, seed);
    if std::env::var("QCOW2D_CRASH_STATES_TRACE").is_ok() {
        for e in &h.events {
            match e {
                Event::Sync => eprintln!("  sync"),
                Event::Writes { durable, writes } => eprintln!(
                    "  writes durable={durable} {:x?}",
                    writes
                        .iter()
                        .map(|w| (w.host, w.bytes.len()))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }
    // Thousands of small files, each written and read back at once: in memory when /dev/shm
    // exists.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("crash.qcow2");
    let mut seen = HashSet::new();
    let len = h.final_file.len();
    for st in &states {
        let file = build(&h.base, len, &h.events, &|w, s| match &st.torn {
            Some((t, keep)) if *t == w => keep[s],
            _ => st.present[w],
        });
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            file.hash(&mut h);
            h.finish()
        };
        if !seen.insert(key) {
            continue;
        }
        std::fs::write(&path, &file).unwrap();
        let what = format!(
            "{name}: crash after {} of {} steps, writes {:?}, torn {:?}",
            st.boundary,
            h.events.len(),
            st.present.iter().map(|&p| p as u8).collect::<Vec<_>>(),
            st.torn
        );
        if lazy {
            // A dirty image with lazy refcounts is repaired when opened (by QEMU and by
            // qcow2d): check the repaired file.
            let report = check(&path, true).unwrap_or_else(|e| panic!("{what}: {e}"));
            let again = check(&path, false).unwrap();
            assert_eq!(
                again.corruptions, 0,
                "{what}: after repair\n{report}\n{again}"
            );
        } else {
            let report = check(&path, false).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(report.corruptions, 0, "{what}: qcow2d check\n{report}");
        }
        let (corruptions, errors, text) = qemu_check(&path);
        assert_eq!(
            (corruptions, errors),
            (0, 0),
            "{what}: qemu-img check\n{text}"
        );
        let disk = read_disk(&path);
        // The model durable at this crash: the last flush whose events all completed.
        let durable = h
            .models
            .iter()
            .rposition(|(done, _)| *done <= st.boundary)
            .expect("the first model is durable from the start");
        let later = &h.models[durable + 1..];
        let durable = &h.models[durable].1;
        for (s, got) in disk.chunks(SECTOR).enumerate() {
            let r = s * SECTOR..s * SECTOR + got.len();
            if got == &durable[r.clone()] || later.iter().any(|(_, m)| got == &m[r.clone()]) {
                continue;
            }
            panic!("{what}: guest sector {s} reads as no model has it");
        }
        if st.boundary == h.events.len() && h.models.last().unwrap().0 <= st.boundary {
            assert!(
                disk == h.models.last().unwrap().1,
                "{what}: the flushed disk differs"
            );
        }
    }
    println!(
        "crash states: {name}: {} states over {} steps, {} distinct files checked",
        states.len(),
        h.events.len(),
        seen.len()
    );
    (states.len(), seen.len())
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) | 1)
        .collect()
}

#[test]
fn allocating_writes_into_an_empty_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![
            vec![
                Op::Write(0, data(1, 4096)),
                Op::Write(1 << 20, data(2, 65536 + 4096)),
                Op::Write(3 << 20, data(3, 512)),
            ],
            vec![Op::Flush],
        ],
    );
    r.close();
    check_states("allocating writes into an empty image", &h, 1, false);
}

#[test]
fn write_back_without_flush() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    let mut r = Run::open(&p);
    r.apply(&[Op::Write(0, data(7, 8192)), Op::Flush]);
    r.close();
    // Opened again: the L2 table exists, and the writes below take a new reservation, whose
    // refcounts the write-back makes durable before the entries that point into it.
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![
            vec![Op::Write(4096, data(8, 8192))],
            vec![Op::Write(2 << 20, data(9, 4096))],
        ],
    );
    r.close();
    check_states("a write-back without flush", &h, 2, false);
}

#[test]
fn copy_on_write_of_a_compressed_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..256 << 10].copy_from_slice(&data(5, 256 << 10));
    std::fs::write(&raw, &bytes).unwrap();
    let p = dir.path().join("c.qcow2");
    run_ok(
        qemu_img_cmd()
            .args(["convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536"])
            .arg(&raw)
            .arg(&p),
    );
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![vec![Op::Write(70 << 10, data(11, 4096))], vec![Op::Flush]],
    );
    r.close();
    check_states("copy on write of a compressed cluster", &h, 3, false);
}

#[test]
fn discard_then_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    let mut r = Run::open(&p);
    r.apply(&[Op::Write(0, data(13, 3 * 65536)), Op::Flush]);
    let h = record(
        &mut r,
        vec![
            vec![Op::Discard(65536, 65536)],
            vec![Op::Flush],
            vec![Op::Write(2 << 20, data(14, 65536))],
            vec![Op::Flush],
        ],
    );
    r.close();
    check_states("discard then write", &h, 4, false);
}

#[test]
fn refcount_table_that_has_to_move() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters and 64-bit refcounts: a block describes 64 clusters, the one-cluster
    // table 64 blocks, so 2 MiB of file; the writes below take the file past that.
    let p = create_qcow2_in(
        dir.path(),
        "t.qcow2",
        "cluster_size=512,refcount_bits=64",
        "4M",
    );
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![
            vec![
                Op::Write(0, data(17, 2 << 20)),
                Op::Write(3 << 20, data(18, 4096)),
            ],
            vec![Op::Flush],
        ],
    );
    r.close();
    let header = |f: &[u8]| u64::from_be_bytes(f[48..56].try_into().unwrap());
    assert_ne!(
        header(&h.base),
        header(&h.final_file),
        "the refcount table did not move"
    );
    check_states("a refcount table that has to move", &h, 5, false);
}

#[test]
fn lazy_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(
        dir.path(),
        "l.qcow2",
        "cluster_size=65536,lazy_refcounts=on",
        "4M",
    );
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![
            vec![
                Op::Write(0, data(21, 4096)),
                Op::Write(2 << 20, data(22, 70000 / 512 * 512)),
            ],
            vec![Op::Flush],
        ],
    );
    r.close();
    check_states("lazy refcounts", &h, 6, true);
}

#[test]
fn l2_table_shared_with_an_internal_snapshot_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(dir.path(), "s.qcow2", "cluster_size=65536", "4M");
    run_ok(qemu_io_cmd().args(["-c", "write -P 0x33 0 128k"]).arg(&p));
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![vec![Op::Write(4096, data(25, 4096))], vec![Op::Flush]],
    );
    r.close();
    check_states(
        "an L2 table shared with an internal snapshot, copied",
        &h,
        7,
        false,
    );
}

/// The enumerator can fail: the history of the first scenario with its refcount-block writes
/// moved after everything else (and not durable) leaves crash states in which an entry points
/// at a cluster whose refcount is 0, and the checks find one.
#[test]
fn a_history_in_the_wrong_order_has_a_corrupt_crash_state() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    let mut r = Run::open(&p);
    let h = record(
        &mut r,
        vec![vec![Op::Write(1 << 20, data(2, 4096))], vec![Op::Flush]],
    );
    r.close();
    let mut blocks = Vec::new();
    let mut events = Vec::new();
    for e in h.events {
        match e {
            Event::Writes {
                durable: true,
                writes,
            } => blocks.extend(writes),
            Event::Writes { writes, .. } => events.push(Event::Writes {
                durable: false,
                writes,
            }),
            Event::Sync => events.push(Event::Sync),
        }
    }
    assert!(
        !blocks.is_empty(),
        "the history writes refcount blocks durably"
    );
    events.push(Event::Writes {
        durable: false,
        writes: blocks,
    });
    let wrong = History { events, ..h };
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_states("the wrong order", &wrong, 8, false)
    }));
    let message = found.expect_err("no crash state of the wrong order was found corrupt");
    let text = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(text.contains("check"), "{text}");
}
