//! Model-based tests of the write path, through the engine API.
//!
//! Each case makes an image with the real `qemu-img` (and `qemu-io`), keeps a flat in-memory
//! model of the disk, and runs a seeded random sequence of batches of concurrent,
//! non-overlapping reads, writes, write-zeroes, discards and flushes against both. Reads are
//! checked against the model as they complete; at the end the image is closed cleanly and
//! `qemu-img check` must find no errors and no leaks, and `qemu-img compare` must find the
//! image equal to the model.

use qcow2d_engine::{Image, OpenOptions, Shard, ShardConfig};
use qcow2d_tests::{
    assert_clean_and_equal, convert_raw_to_qcow2, create_qcow2_in, dirty_bit, oracle, qemu_img,
    qemu_img_cmd, qemu_io_cmd, run_ok, Rng,
};
use std::path::{Path, PathBuf};

/// How discard behaves on an image: which aligned granules it zeroes (None: never).
fn discard_granule(info: &qcow2d_engine::ImageInfo, has_backing: bool) -> Option<u64> {
    if info.data_file.is_some() || (info.version == 2 && has_backing) {
        return None;
    }
    Some(if info.extended_l2 {
        info.cluster_size / 32
    } else {
        info.cluster_size
    })
}

enum Op {
    Read(u64, Vec<u8>),
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

/// Runs `batches` random batches against `path` and its raw model `model`.
/// Waits until every shard of `shards` is idle, polling all of them (a shard of a writable
/// image served by several passes pieces of requests to the others).
fn drain_all(shards: &mut [Shard], out: &mut Vec<qcow2d_engine::Completion>) {
    if let [one] = shards {
        return one.drain(out);
    }
    let started = std::time::Instant::now();
    while shards.iter().any(|s| s.in_flight() > 0) {
        for s in shards.iter_mut() {
            s.poll(out);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "shards made no progress for a minute"
        );
        std::thread::yield_now();
    }
}

fn exercise(
    path: &Path,
    model: &mut [u8],
    seed: u64,
    batches: usize,
    hot_fraction: u64,
    count: usize,
) {
    let img = Image::open(
        path,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    let info = img.info();
    let granule = discard_granule(&info, !info.backing_chain.is_empty());
    let size = img.virtual_size();
    let hot = (size / hot_fraction).max(1 << 20).min(size);
    let mut shards = img.new_shards(&ShardConfig::default(), count).unwrap();
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for b in 0..batches {
        let mut ops: Vec<Op> = Vec::new();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        for _ in 0..rng.below(24) + 1 {
            let len = (rng.below(256) + 1) * 512;
            let off = rng.below(hot / 512) * 512;
            let len = len.min(size - off);
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            ops.push(match rng.below(20) {
                0..=9 => {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data);
                    Op::Write(off, data)
                }
                10..=12 => Op::Zero(off, len, rng.below(2) == 0),
                13..=14 => Op::Discard(off, len),
                _ => Op::Read(off, vec![0u8; len as usize]),
            });
        }
        for (i, op) in ops.iter_mut().enumerate() {
            let token = (b * 1000 + i) as u64;
            let shard = if count == 1 {
                &mut shards[0]
            } else {
                &mut shards[rng.below(count as u64) as usize]
            };
            let r = match op {
                Op::Read(off, buf) => {
                    let iov = [libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    // SAFETY: `buf` lives in `ops` until the batch is drained below.
                    unsafe { shard.submit_read(token, *off, &iov) }
                }
                Op::Write(off, buf) => {
                    let iov = [libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    // SAFETY: `buf` lives in `ops` until the batch is drained below.
                    unsafe { shard.submit_write(token, *off, &iov) }
                }
                Op::Zero(off, len, unmap) => shard.submit_write_zeroes(token, *off, *len, *unmap),
                Op::Discard(off, len) => shard.submit_discard(token, *off, *len),
            };
            r.unwrap();
        }
        if rng.below(5) == 0 {
            let at = if count == 1 {
                0
            } else {
                rng.below(count as u64) as usize
            };
            shards[at].submit_flush(u64::MAX).unwrap();
        }
        drain_all(&mut shards, &mut out);
        for c in out.drain(..) {
            assert!(
                c.result.is_ok(),
                "request {} failed: {:?}",
                c.token,
                c.result
            );
        }
        for op in &ops {
            match op {
                Op::Read(off, buf) => {
                    let want = &model[*off as usize..*off as usize + buf.len()];
                    if let Some(i) = (0..buf.len()).find(|&i| buf[i] != want[i]) {
                        panic!(
                            "{}: batch {b}: read at {off:#x} differs from the model at byte {:#x}",
                            path.display(),
                            *off as usize + i
                        );
                    }
                }
                Op::Write(off, buf) => {
                    model[*off as usize..*off as usize + buf.len()].copy_from_slice(buf)
                }
                Op::Zero(off, len, _) => model[*off as usize..(*off + *len) as usize].fill(0),
                Op::Discard(off, len) => {
                    if let Some(g) = granule {
                        let a = off.div_ceil(g) * g;
                        let e = ((off + len) / g * g).max(a);
                        let e = if off + len == size { off + len } else { e };
                        if a < e {
                            model[a as usize..e as usize].fill(0);
                        }
                    }
                }
            }
        }
    }
    for shard in &mut shards {
        shard.flush_blocking().unwrap();
        shard.release_reserved();
    }
    drop(shards);
    img.close().unwrap();
}

struct Case {
    dir: tempfile::TempDir,
    image: PathBuf,
}

fn case(setup: impl FnOnce(&Path) -> PathBuf) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let image = setup(dir.path());
    Case { dir, image }
}

fn random_raw(dir: &Path, name: &str, size: usize, seed: u64) -> PathBuf {
    let mut data = vec![0u8; size];
    let mut rng = Rng::new(seed);
    // Half random, a quarter text-like (compressible), a quarter zeros.
    rng.fill(&mut data[..size / 2]);
    for (i, b) in data[size / 2..size * 3 / 4].iter_mut().enumerate() {
        *b = b"qcow2d model test "[i % 18];
    }
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    p
}

fn run_case(c: &Case, seed: u64, batches: usize) {
    run_sharded(c, seed, batches, 1);
}

/// `run_case` with requests submitted to any of `count` shards.
fn run_sharded(c: &Case, seed: u64, batches: usize, count: usize) {
    let mut model = oracle(&c.image);
    exercise(&c.image, &mut model, seed, batches, 4, count);
    assert_clean_and_equal(&c.image, &model, c.dir.path());
}

/// An image with extended L2 entries and clusters of `cluster_size` over a raw base of
/// random data, both `mib` MiB, in `d`.
fn extended_l2_over_raw_base(d: &Path, cluster_size: &str, mib: usize, seed: u64) -> PathBuf {
    random_raw(d, "base.raw", mib << 20, seed);
    let p = d.join("e.qcow2");
    let opts = format!("extended_l2=on,cluster_size={cluster_size}");
    let size = format!("{mib}M");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "-b",
        "base.raw",
        "-F",
        "raw",
        p.to_str().unwrap(),
        &size,
    ]);
    p
}

#[test]
fn fresh_image_64k() {
    run_case(&case(|d| create_qcow2_in(d, "a.qcow2", "", "64M")), 1, 150);
}

#[test]
fn compressed_zlib_and_zstd() {
    for (i, ty) in ["zlib", "zstd"].into_iter().enumerate() {
        let c = case(|d| {
            let raw = random_raw(d, "src.raw", 32 << 20, 11);
            let opts = format!("compression_type={ty}");
            convert_raw_to_qcow2(&raw, &d.join("c.qcow2"), &opts, true)
        });
        run_case(&c, 2 + i as u64, 120);
    }
}

#[test]
fn backing_chain_three_deep() {
    let c = case(|d| {
        // raw base (shorter than the top), qcow2 middle with data, qcow2 top.
        random_raw(d, "base.raw", 20 << 20, 21);
        let mid = d.join("mid.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
            "40M",
        ]);
        run_ok(qemu_io_cmd().args(["-c", "write -P 0x5a 1M 3M", mid.to_str().unwrap()]));
        let top = d.join("top.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            "48M",
        ]);
        top
    });
    run_case(&c, 3, 150);
}

#[test]
fn internal_snapshot_survives_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = random_raw(d, "src.raw", 32 << 20, 31);
    let img = convert_raw_to_qcow2(&raw, &d.join("s.qcow2"), "cluster_size=64k", false);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    run_ok(qemu_io_cmd().args(["-c", "write -P 0x44 5M 2M", img.to_str().unwrap()]));
    let c = Case {
        dir,
        image: img.clone(),
    };
    let d = c.dir.path().to_path_buf();
    run_case(&c, 4, 150);
    // The snapshot still holds what it held.
    let copy = d.join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "s1", copy.to_str().unwrap()]);
    let snap = oracle(&copy);
    assert!(
        snap == std::fs::read(&raw).unwrap(),
        "the internal snapshot changed"
    );
}

#[test]
fn extended_l2_over_backing() {
    let c = case(|d| extended_l2_over_raw_base(d, "64k", 32, 41));
    run_case(&c, 5, 150);
}

#[test]
fn refcount_widths_1_and_64() {
    for (i, bits) in ["1", "64"].into_iter().enumerate() {
        run_case(
            &case(|d| create_qcow2_in(d, "r.qcow2", &format!("refcount_bits={bits}"), "32M")),
            6 + i as u64,
            100,
        );
    }
}

#[test]
fn cluster_sizes_512_and_2m() {
    run_case(
        &case(|d| create_qcow2_in(d, "small.qcow2", "cluster_size=512", "16M")),
        8,
        120,
    );
    run_case(
        &case(|d| create_qcow2_in(d, "big.qcow2", "cluster_size=2M", "64M")),
        9,
        60,
    );
}

#[test]
fn version_2_image() {
    run_case(
        &case(|d| create_qcow2_in(d, "v2.qcow2", "compat=0.10", "32M")),
        10,
        120,
    );
}

#[test]
fn external_data_file() {
    for (i, raw) in ["off", "on"].into_iter().enumerate() {
        run_case(
            &case(|d| {
                let data = d.join("x.data");
                let opts = format!("data_file={},data_file_raw={raw}", data.display());
                create_qcow2_in(d, "x.qcow2", &opts, "32M")
            }),
            12 + i as u64,
            100,
        );
    }
}

#[test]
fn lazy_refcounts_close_cleanly() {
    let c = case(|d| create_qcow2_in(d, "l.qcow2", "", "32M"));
    let mut model = oracle(&c.image);
    exercise_lazy(&c.image, &mut model, true);
    assert!(!dirty_bit(&c.image), "a clean close clears the dirty bit");
    assert_clean_and_equal(&c.image, &model, c.dir.path());
}

#[test]
fn dirty_image_is_repaired_when_opened_writable() {
    let c = case(|d| create_qcow2_in(d, "d.qcow2", "", "32M"));
    let mut model = oracle(&c.image);
    // Lazy refcounts and no clean close: refcounts on disk are stale, the dirty bit stays.
    exercise_lazy(&c.image, &mut model, false);
    assert!(
        dirty_bit(&c.image),
        "lazy refcounts leave the dirty bit without a clean close"
    );
    let img = Image::open(
        &c.image,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .expect("a dirty image is repaired and opened");
    assert!(!dirty_bit(&c.image), "the repair clears the dirty bit");
    img.close().unwrap();
    drop(img);
    assert_clean_and_equal(&c.image, &model, c.dir.path());
}

/// Writes through a lazy-refcount session; closes it cleanly when `close`, else drops it
/// with every request flushed but the refcounts left stale on disk.
fn exercise_lazy(path: &Path, model: &mut [u8], close: bool) {
    let img = Image::open(
        path,
        &OpenOptions {
            read_only: false,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        dirty_bit(path),
        "lazy refcounts set the dirty bit while open"
    );
    let mut rng = Rng::new(99);
    for i in 0..64u64 {
        let off = rng.below(img.virtual_size() / 65536) * 65536 + 512 * (i % 7);
        let mut data = vec![0u8; 8192];
        rng.fill(&mut data);
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    if close {
        img.close().unwrap();
    }
}

#[test]
fn corruption_found_while_writable_sets_the_corrupt_bit() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = create_qcow2_in(dir.path(), "c.qcow2", "", "16M");
    run_ok(qemu_io_cmd().args(["-c", "write -P 0x11 0 64k", img_path.to_str().unwrap()]));
    // Make the first L2 entry point at an unaligned host offset.
    let mut bytes = std::fs::read(&img_path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&bytes, l2) | 0x200;
    bytes[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&img_path, &bytes).unwrap();

    let img = Image::open(
        &img_path,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), qcow2d_engine::ErrorKind::Corrupt, "{err}");
    // Another cluster still reads; writes are refused from now on.
    img.read_at(&mut buf, 1 << 20).unwrap();
    let mut shard = img.new_shard(&ShardConfig::default()).unwrap();
    let e = shard
        .submit_write_zeroes(1, 1 << 20, 4096, false)
        .unwrap_err();
    assert_eq!(e.kind(), qcow2d_engine::ErrorKind::ReadOnly, "{e}");
    drop(shard);
    drop(img);
    let bytes = std::fs::read(&img_path).unwrap();
    assert!(bytes[79] & 2 != 0, "the corrupt bit is set on disk");
    let info = run_ok(qemu_img_cmd().args(["info", img_path.to_str().unwrap()]));
    assert!(info.contains("corrupt: true"), "{info}");
}

#[test]
fn failed_sync_turns_the_image_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = create_qcow2_in(dir.path(), "f.qcow2", "", "16M");
    let img = Image::open(
        &img_path,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut shard = img
        .new_shard(&ShardConfig {
            fail_flush_number: Some(2),
            ..Default::default()
        })
        .unwrap();
    let data = vec![0x42u8; 65536];
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }];
    let mut out = Vec::new();
    // The first flush succeeds. (A flush covers writes completed before it was submitted.)
    // SAFETY: `data` outlives the request: it is drained below.
    unsafe { shard.submit_write(1, 0, &iov).unwrap() };
    shard.drain(&mut out);
    shard.submit_flush(2).unwrap();
    shard.drain(&mut out);
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    out.clear();
    // The second flush's syncs fail: the flush reports it, and the image refuses writes.
    // SAFETY: as above.
    unsafe { shard.submit_write(3, 1 << 20, &iov).unwrap() };
    shard.drain(&mut out);
    shard.submit_flush(4).unwrap();
    shard.drain(&mut out);
    let flush = out.iter().find(|c| c.token == 4).unwrap();
    assert!(
        flush.result.is_err(),
        "a failed sync must fail the flush: {out:?}"
    );
    // SAFETY: as above (refused before any I/O).
    let e = unsafe { shard.submit_write(5, 0, &iov) }.unwrap_err();
    assert_eq!(e.kind(), qcow2d_engine::ErrorKind::ReadOnly, "{e}");
    shard.submit_flush(6).unwrap();
    out.clear();
    shard.drain(&mut out);
    assert!(out[0].result.is_err(), "later flushes fail too: {out:?}");
    // Reads still work.
    let mut buf = vec![0u8; 65536];
    drop(shard);
    img.read_at(&mut buf, 0).unwrap();
    let bad = buf.iter().position(|&b| b != 0x42);
    assert_eq!(bad, None, "the flushed write reads back");
}

#[test]
fn unknown_header_extension_survives_header_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = create_qcow2_in(dir.path(), "x.qcow2", "", "16M");
    // Append an unknown extension (type 0x12345678, 5 bytes) where the end marker was.
    let mut bytes = std::fs::read(&img_path).unwrap();
    let hl = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut at = hl;
    loop {
        let ty = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if ty == 0 {
            break;
        }
        at += 8 + len.next_multiple_of(8);
    }
    let ext: Vec<u8> = [
        0x12u8, 0x34, 0x56, 0x78, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
    ]
    .into_iter()
    .chain([0u8; 8]) // a new end marker
    .collect();
    bytes[at..at + ext.len()].copy_from_slice(&ext);
    std::fs::write(&img_path, &bytes).unwrap();
    let before = bytes[..at + ext.len()].to_vec();

    // Lazy refcounts rewrite the header at open (dirty bit) and at close (clean).
    let img = Image::open(
        &img_path,
        &OpenOptions {
            read_only: false,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    img.write_at(&[7u8; 4096], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let after = std::fs::read(&img_path).unwrap();
    assert_eq!(
        after[hl..at + ext.len()],
        before[hl..],
        "header extensions changed"
    );
    assert!(
        after[80..88] != [0u8; 8],
        "lazy refcounts compatible bit is kept"
    );
    let json = qemu_img(&["check", "--output=json", img_path.to_str().unwrap()]);
    assert!(json.contains("\"check-errors\": 0"), "{json}");
}

/// Several shards on one writable image: requests go to any shard and cross L2 tables (small
/// clusters: a 4 KiB-cluster table maps 2 MiB, a 512-byte one 32 KiB), so pieces pass
/// between shards.
#[test]
fn several_shards_fresh_small_clusters() {
    for (count, opts, seed) in [
        (2, "cluster_size=4k", 61),
        (3, "cluster_size=4k", 62),
        (2, "cluster_size=512", 63),
    ] {
        run_sharded(
            &case(|d| create_qcow2_in(d, "m.qcow2", opts, "48M")),
            seed,
            120,
            count,
        );
    }
}

#[test]
fn several_shards_compressed_backing_and_snapshot() {
    // Compressed clusters replaced by writes.
    let c = case(|d| {
        let raw = random_raw(d, "src.raw", 24 << 20, 71);
        convert_raw_to_qcow2(&raw, &d.join("c.qcow2"), "cluster_size=4k", true)
    });
    run_sharded(&c, 72, 120, 3);
    // Extended L2 entries over a backing file.
    let c = case(|d| extended_l2_over_raw_base(d, "16k", 24, 73));
    run_sharded(&c, 74, 120, 2);
    // Tables shared with an internal snapshot are copied by their owner.
    let c = case(|d| {
        let raw = random_raw(d, "src.raw", 16 << 20, 75);
        let p = convert_raw_to_qcow2(&raw, &d.join("s.qcow2"), "cluster_size=4k", false);
        qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
        p
    });
    run_sharded(&c, 76, 120, 2);
}

/// Several shards on their own threads, as the daemon runs them: each thread owns one shard
/// and a set of 16 KiB stripes spread over every L2 table (4 KiB clusters: a table maps 2 MiB),
/// and keeps writing, discarding and reading its stripes while the others change theirs in the
/// same tables. Reads of a thread's own stripes have no concurrent writer, so they must match
/// its model exactly, whichever shard owns the table and however often its version changes
/// meanwhile. Then the image is checked and compared with the union of the models.
#[test]
fn several_shards_on_their_own_threads() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const THREADS: usize = 3;
    const STRIPE: u64 = 16 << 10;
    let dir = tempfile::tempdir().unwrap();
    let raw = random_raw(dir.path(), "src.raw", 24 << 20, 81);
    let path = convert_raw_to_qcow2(&raw, &dir.path().join("t.qcow2"), "cluster_size=4k", false);
    let model = Arc::new(Mutex::new(std::fs::read(&raw).unwrap()));
    let img = Image::open(
        &path,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    let size = img.virtual_size();
    let shards = img.new_shards(&ShardConfig::default(), THREADS).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = shards
        .into_iter()
        .enumerate()
        .map(|(me, mut shard)| {
            let (model, done) = (Arc::clone(&model), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut own = model.lock().unwrap().clone();
                let stripes: Vec<u64> = (0..size / STRIPE)
                    .filter(|s| *s as usize % THREADS == me)
                    .collect();
                let mut rng = Rng::new(0x5eed + me as u64);
                let mut out = Vec::new();
                for round in 0..1000u64 {
                    // A few requests in flight at once, each inside one of our stripes.
                    let mut bufs: Vec<(u64, Vec<u8>, u8)> = Vec::new();
                    for i in 0..8u64 {
                        let stripe = stripes[rng.below(stripes.len() as u64) as usize];
                        let len = (rng.below(8) + 1) * 2048;
                        let off = stripe * STRIPE + rng.below((STRIPE - len) / 512 + 1) * 512;
                        if bufs
                            .iter()
                            .any(|(o, b, _)| off < o + b.len() as u64 && *o < off + len)
                        {
                            continue;
                        }
                        let kind = rng.below(10) as u8;
                        let mut buf = vec![0u8; len as usize];
                        if kind < 4 {
                            rng.fill(&mut buf);
                        }
                        let token = round * 100 + i;
                        let iov = [libc::iovec {
                            iov_base: buf.as_mut_ptr().cast(),
                            iov_len: buf.len(),
                        }];
                        let submitted = match kind {
                            0..=3 => {
                                // SAFETY: each buffer lives in `bufs` until every request of
                                // this round has completed below.
                                unsafe { shard.submit_write(token, off, &iov) }
                            }
                            4 => shard.submit_write_zeroes(token, off, len, true),
                            _ => {
                                // SAFETY: as above.
                                unsafe { shard.submit_read(token, off, &iov) }
                            }
                        };
                        submitted.unwrap();
                        bufs.push((off, buf, kind));
                    }
                    if rng.below(10) == 0 {
                        shard.submit_flush(round * 100 + 99).unwrap();
                    }
                    while shard.in_flight() > 0 {
                        shard.wait(&mut out);
                    }
                    for c in out.drain(..) {
                        assert!(c.result.is_ok(), "thread {me}: {c:?}");
                    }
                    for (off, buf, kind) in &bufs {
                        let range = *off as usize..*off as usize + buf.len();
                        match kind {
                            0..=3 => own[range].copy_from_slice(buf),
                            4 => own[range].fill(0),
                            _ => assert!(
                                own[range.clone()] == buf[..],
                                "thread {me} round {round}: read at {off:#x} differs"
                            ),
                        }
                    }
                }
                // Keep serving the others' pieces until every thread is done.
                done.fetch_add(1, Ordering::SeqCst);
                while done.load(Ordering::SeqCst) < THREADS {
                    shard.poll(&mut out);
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                shard.flush_blocking().unwrap();
                shard.release_reserved();
                let mut m = model.lock().unwrap();
                for s in stripes {
                    let r = (s * STRIPE) as usize..((s + 1) * STRIPE) as usize;
                    m[r.clone()].copy_from_slice(&own[r]);
                }
                // Dropping needs nothing from the others any more.
                drop(shard);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    img.close().unwrap();
    drop(img);
    let model = model.lock().unwrap();
    assert_clean_and_equal(&path, &model, dir.path());
}
