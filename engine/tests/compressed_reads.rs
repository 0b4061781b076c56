//! Reads of compressed clusters through the shard API, with every iovec layout that decides
//! between the two read paths: a whole cluster in one segment is inflated straight into the
//! caller's memory and not cached (unless it is read whole again soon); anything else (part of a cluster, a cluster split over
//! segments) goes through the decompressed-cluster cache. Both paths must return the same
//! bytes, fail the same way on bad streams, and never write outside the request's memory.
//! Images are made by the real `qemu-img`; bad streams are patched into their extents.

use qcow2d_engine::{Image, InflateSharing, OpenOptions, Shard, ShardConfig};
use qcow2d_tests::{convert_raw_to_qcow2, qemu_img_cmd, qemu_io, run_ok, Rng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const CLUSTER: usize = 65536;
/// 64 whole clusters and a 12 KiB partial one at the end.
const SIZE: usize = 64 * CLUSTER + 12288;
/// Bytes around each request's memory that must never be written.
const GUARD: usize = 4096;

/// Text-like lines: every cluster compresses, each one differently.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0;
    while v.len() < len {
        v.extend_from_slice(format!("{i}: compressed read {}\n", rng.below(100_000)).as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn make_image(dir: &Path, compression: &str, data: &[u8]) -> PathBuf {
    let raw = dir.join("src.raw");
    std::fs::write(&raw, data).unwrap();
    let img = dir.join(format!("{compression}.qcow2"));
    convert_raw_to_qcow2(&raw, &img, &format!("compression_type={compression}"), true)
}

/// (host offset, length upper bound) of the compressed extent of guest cluster `index`.
fn extent(img: &Path, index: u64) -> (u64, usize) {
    let f = std::fs::File::open(img).unwrap();
    let be64 = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(l2 + 8 * index);
    assert!(entry & (1 << 62) != 0, "cluster {index} is not compressed");
    let offset_bits = 62 - (16 - 8);
    let host = entry & ((1 << offset_bits) - 1);
    let sectors = ((entry >> offset_bits) & 0xff) + 1;
    (host, (sectors * 512 - (host % 512)) as usize)
}

fn patch(img: &Path, index: u64, stream: &[u8]) {
    let (host, len) = extent(img, index);
    assert!(
        stream.len() <= len,
        "test setup: stream of {} > extent {len}",
        stream.len()
    );
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(stream, host).unwrap();
}

/// A raw deflate stream of `data` that ends with a sync flush: no final block.
fn deflate_without_final_block(data: &[u8]) -> Vec<u8> {
    use miniz_oxide::deflate::core::{
        compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
    };
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, 0, 0));
    let mut out = vec![0u8; data.len() + 1024];
    let (status, used_in, used_out) = compress(&mut c, data, &mut out, TDEFLFlush::Sync);
    assert_eq!((status, used_in), (TDEFLStatus::Okay, data.len()));
    out.truncate(used_out);
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let mut out = vec![0u8; c.deflate_compress_bound(data.len())];
    let n = c.deflate_compress(data, &mut out).unwrap();
    out.truncate(n);
    out
}

/// Reads `offset..offset + sum(segments)` into one buffer split into `segments`, with guard
/// bytes before, between and after them. Returns the data read, or the error.
fn read(shard: &mut Shard, offset: u64, segments: &[usize]) -> Result<Vec<u8>, String> {
    let total: usize = segments.iter().sum();
    let mut mem = vec![0xA5u8; GUARD + total + GUARD * segments.len()];
    let mut iov = Vec::new();
    let mut at = GUARD;
    for &n in segments {
        iov.push(libc::iovec {
            // SAFETY: at + n + GUARD <= mem.len() by construction.
            iov_base: unsafe { mem.as_mut_ptr().add(at) }.cast(),
            iov_len: n,
        });
        at += n + GUARD;
    }
    // SAFETY: `mem` is neither moved nor touched until the completion is back (wait below
    // returns it; the shard is drained before we look).
    unsafe { shard.submit_read(1, offset, &iov) }.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while out.is_empty() {
        shard.wait(&mut out);
    }
    assert_eq!(shard.in_flight(), 0);
    let mut data = Vec::with_capacity(total);
    let mut at = GUARD;
    assert!(
        mem[..GUARD].iter().all(|&b| b == 0xA5),
        "wrote before the request"
    );
    for &n in segments {
        data.extend_from_slice(&mem[at..at + n]);
        at += n;
        assert!(
            mem[at..at + GUARD].iter().all(|&b| b == 0xA5),
            "wrote past a segment of {segments:?} at {offset:#x}"
        );
        at += GUARD;
    }
    out[0].result.map(|()| data).map_err(|e| e.to_string())
}

/// Every way a shard may inflate: its jobs shared with the pool, on the shard only, and
/// every job handed to the pool's workers (their results posted back into the shard's ring).
const SHARING: [InflateSharing; 3] = [
    InflateSharing::Shared,
    InflateSharing::OnShard,
    InflateSharing::HandOff,
];

fn shard_of(img: &Path, inflate: InflateSharing) -> Shard {
    let config = ShardConfig {
        inflate,
        ..ShardConfig::default()
    };
    Image::open(img, &OpenOptions::default())
        .unwrap()
        .new_shard(&config)
        .unwrap()
}

/// Every layout, on a worker pool and inline, checked against the data and the cache counters.
fn layouts(compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = text(7, SIZE);
    let img = make_image(dir.path(), compression, &data);
    let want = |off: usize, len: usize| data[off..off + len].to_vec();
    let c = CLUSTER;
    for sharing in SHARING {
        let mut shard = shard_of(&img, sharing);
        // Every whole cluster, one segment each: inflated in place, never cached. The last
        // whole cluster's extent runs to the end of the file.
        for i in 0..64 {
            assert_eq!(
                read(&mut shard, (i * c) as u64, &[c]).unwrap(),
                want(i * c, c)
            );
        }
        assert_eq!(shard.decompressed_cache_stats(), (0, 64), "{sharing:?}");
        // Read whole again soon after: now loaded into the cache (a part woken when its slot
        // is loaded counts a miss, then a hit), and a hit from then on.
        for hits in [1, 2] {
            let got = read(&mut shard, 3 * c as u64, &[c]).unwrap();
            assert_eq!(got, want(3 * c, c));
            assert_eq!(shard.decompressed_cache_stats(), (hits, 65));
        }
        // Partial reads fill the cache and share it; a whole-cluster read then copies from it.
        let at = 7 * c + 8192;
        assert_eq!(
            read(&mut shard, at as u64, &[4096]).unwrap(),
            want(at, 4096)
        );
        assert_eq!(
            read(&mut shard, at as u64 + 4096, &[4096]).unwrap(),
            want(at + 4096, 4096)
        );
        assert_eq!(
            read(&mut shard, 7 * c as u64, &[c]).unwrap(),
            want(7 * c, c)
        );
        assert_eq!(shard.decompressed_cache_stats(), (5, 66));
        // A whole cluster over two segments goes through the cache.
        let split = [1000, c - 1000];
        assert_eq!(
            read(&mut shard, 9 * c as u64, &split).unwrap(),
            want(9 * c, c)
        );
        assert_eq!(
            read(&mut shard, 9 * c as u64, &[512]).unwrap(),
            want(9 * c, 512)
        );
        assert_eq!(shard.decompressed_cache_stats(), (7, 67));
        // Unaligned 64 KiB: two partial clusters.
        let at = 20 * c + 32768;
        assert_eq!(read(&mut shard, at as u64, &[c]).unwrap(), want(at, c));
        // 1 MiB in one segment: sixteen whole clusters in place. Then the same range over
        // segments that split some clusters and keep others whole.
        assert_eq!(
            read(&mut shard, 32 * c as u64, &[16 * c]).unwrap(),
            want(32 * c, 16 * c)
        );
        let mixed = [3584, 61440, 131072, 512, 262144, 589824];
        assert_eq!(
            read(&mut shard, 48 * c as u64, &mixed).unwrap(),
            want(48 * c, 16 * c)
        );
        // The partial cluster at the end of the disk, alone and with the cluster before it.
        assert_eq!(
            read(&mut shard, 64 * c as u64, &[12288]).unwrap(),
            want(64 * c, 12288)
        );
        let at = 63 * c;
        assert_eq!(
            read(&mut shard, at as u64, &[c + 12288]).unwrap(),
            want(at, c + 12288)
        );
    }
}

#[test]
fn zlib_layouts() {
    layouts("zlib");
}

#[test]
fn zstd_layouts() {
    layouts("zstd");
}

/// Streams qemu-img does not write but QEMU reads (no final block, longer than a cluster),
/// and streams it refuses (too short, corrupt): each path gives the same answer.
#[test]
fn patched_streams_read_alike_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = text(9, 16 * CLUSTER);
    let img = make_image(dir.path(), "zlib", &data);
    let no_final: Vec<u8> = (0..CLUSTER).map(|i| b"no final block "[i % 15]).collect();
    patch(&img, 5, &deflate_without_final_block(&no_final));
    let long: Vec<u8> = (0..CLUSTER + 8192).map(|i| (i % 13) as u8 + b'a').collect();
    patch(&img, 6, &deflate(&long));
    let short: Vec<u8> = vec![b's'; CLUSTER - 512];
    patch(&img, 7, &deflate(&short));
    patch(&img, 8, &[0x07, 0xff, 0xff, 0xff]);
    let c = CLUSTER as u64;
    for sharing in SHARING {
        // Whole cluster first (in place), then a partial read (through the cache), on a fresh
        // shard so the first read cannot be a cache hit.
        for (whole_first, label) in [(true, "whole first"), (false, "partial first")] {
            let mut shard = shard_of(&img, sharing);
            let mut check = |index: u64, want: Option<&[u8]>| {
                let (whole, part) = if whole_first {
                    let whole = read(&mut shard, index * c, &[CLUSTER]);
                    (whole, read(&mut shard, index * c + 4096, &[8192]))
                } else {
                    let part = read(&mut shard, index * c + 4096, &[8192]);
                    (read(&mut shard, index * c, &[CLUSTER]), part)
                };
                match want {
                    Some(w) => {
                        assert_eq!(whole.unwrap(), w, "cluster {index}, {label}, {sharing:?}");
                        assert_eq!(part.unwrap(), w[4096..12288], "cluster {index}, {label}");
                    }
                    None => {
                        assert!(whole.is_err(), "cluster {index}, {label}, {sharing:?}");
                        assert!(part.is_err(), "cluster {index}, {label}, {sharing:?}");
                    }
                }
            };
            // A stream that ends early: every read that reaches its end fails. A partial read
            // before the end inflates only up to the end of the part when the cluster was not
            // seen lately, and gets the bytes the stream holds; when it was, the cluster is
            // inflated whole, and the read fails. Never other bytes.
            let mut fresh = shard_of(&img, sharing);
            let short_part = read(&mut fresh, 7 * c + 4096, &[8192]);
            assert_eq!(
                short_part.unwrap(),
                short[4096..12288],
                "{label}, {sharing:?}"
            );
            for _ in 0..3 {
                let tail = read(&mut fresh, 7 * c + c - 4096, &[4096]);
                assert!(tail.is_err(), "{label}, {sharing:?}");
                if let Ok(again) = read(&mut fresh, 7 * c + 4096, &[8192]) {
                    assert_eq!(again, short[4096..12288], "{label}, {sharing:?}");
                }
            }

            check(4, Some(&data[4 * CLUSTER..5 * CLUSTER]));
            check(5, Some(&no_final));
            check(6, Some(&long[..CLUSTER]));
            if whole_first {
                check(7, None);
            }
            check(8, None);
            check(9, Some(&data[9 * CLUSTER..10 * CLUSTER]));
        }
    }
}

/// A backing file with larger compressed clusters than the top image: a partial read of one of
/// its clusters inflates a prefix longer than a top-image cluster, after a partial read of the
/// top image's own compressed cluster has left a top-sized buffer in the shard's pool. Both
/// read what qemu-img wrote (the prefix buffer is one cluster of the layer it is for).
#[test]
fn backing_with_larger_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base_data = text(21, 4 * 131072);
    std::fs::write(d.join("base.raw"), &base_data).unwrap();
    let qemu_img = |args: &[&str]| run_ok(qemu_img_cmd().current_dir(d).args(args));
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=128k",
        "base.raw",
        "base.qcow2",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        "top.qcow2",
    ]);
    // One compressed 64 KiB cluster at guest offset 0 of the top image.
    qemu_io(&d.join("top.qcow2"), "qcow2", &["write -c -P 0x5a 0 64k"]);
    for sharing in SHARING {
        let opts = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let config = ShardConfig {
            inflate: sharing,
            ..ShardConfig::default()
        };
        let mut shard = Image::open(d.join("top.qcow2"), &opts)
            .unwrap()
            .new_shard(&config)
            .unwrap();
        assert_eq!(read(&mut shard, 0x1000, &[4096]).unwrap(), vec![0x5a; 4096]);
        // 64 KiB into the base's second 128 KiB cluster: a prefix of 68 KiB.
        let at = 0x20000 + 0x10000;
        assert_eq!(
            read(&mut shard, at as u64, &[4096]).unwrap(),
            base_data[at..at + 4096],
            "{sharing:?}"
        );
    }
}

/// Reads of the whole disk in one request hold scratch buffers for at most a few compressed
/// clusters at a time when the shard's scratch limit is small: the clusters that would take the
/// shard past it wait for the reads before them, and every byte still reads right. Through the
/// cache (8 KiB segments) and in place (a segment per cluster).
#[test]
fn compressed_reads_wait_for_scratch_rather_than_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let data = text(11, SIZE);
    for compression in ["zlib", "zstd"] {
        let img = make_image(dir.path(), compression, &data);
        let limit = 4 * CLUSTER as u64;
        for sharing in SHARING {
            let opts = OpenOptions::default();
            let config = ShardConfig {
                inflate: sharing,
                scratch_bytes: limit,
                // No cache to serve clusters from: every cluster is a miss.
                decompressed_cache_bytes: 0,
                ..ShardConfig::default()
            };
            let mut shard = Image::open(&img, &opts)
                .unwrap()
                .new_shard(&config)
                .unwrap();
            let small: Vec<usize> = (0..SIZE / 8192).map(|_| 8192).chain([4096]).collect();
            assert_eq!(read(&mut shard, 0, &small).unwrap(), data);
            let whole: Vec<usize> = (0..64).map(|_| CLUSTER).chain([12288]).collect();
            assert_eq!(read(&mut shard, 0, &whole).unwrap(), data);
            let peak = shard.scratch_peak_bytes();
            // One read alone may need 3 clusters (extent buffer and prefix): the limit admits
            // one, then more only while they fit.
            assert!(
                peak > 0 && peak <= limit,
                "{compression}: peak {peak} > {limit}"
            );
        }
        // The default limit lets them all go at once (what the small limit prevented).
        let mut shard = shard_of(&img, InflateSharing::OnShard);
        let small: Vec<usize> = (0..SIZE / 8192).map(|_| 8192).chain([4096]).collect();
        assert_eq!(read(&mut shard, 0, &small).unwrap(), data);
        assert!(shard.scratch_peak_bytes() > limit);
    }
}

/// The L2 and decompressed-cluster cache budgets are the shard's, shared by the layers of a
/// backing chain rather than given to each layer.
#[test]
fn cache_budgets_are_per_shard_across_the_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qemu_img = |args: &[&str]| {
        let out = qemu_img_cmd()
            .args(args)
            .current_dir(d)
            .output()
            .expect("cannot run qemu-img (is qemu-utils installed?)");
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    // 64 GiB of 64 KiB clusters: 128 L2 tables (8 MiB of them) per layer, three layers.
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64G"]);
    for (below, above) in [("base.qcow2", "mid.qcow2"), ("mid.qcow2", "top.qcow2")] {
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", below, above, "64G",
        ]);
    }
    let top = d.join("top.qcow2");
    let shard = |l2: Option<u64>, decompressed: u64| {
        let opts = OpenOptions {
            l2_cache_bytes: l2,
            ..OpenOptions::default()
        };
        let config = ShardConfig {
            decompressed_cache_bytes: decompressed,
            ..ShardConfig::default()
        };
        Image::open(&top, &opts)
            .unwrap()
            .new_shard(&config)
            .unwrap()
            .cache_capacity_bytes()
    };
    // By default the L2 cache covers the whole chain.
    let (l2, decompressed) = shard(None, 16 << 20);
    assert_eq!(l2, 3 * (8 << 20));
    // 85 clusters per layer: what fits in a third of 16 MiB.
    assert_eq!(decompressed, 3 * 85 * 65536);
    // A smaller budget is shared out, not given to each layer.
    let (l2, decompressed) = shard(Some(6 << 20), 3 << 20);
    assert_eq!(l2, 6 << 20);
    assert_eq!(decompressed, 3 << 20);
    // Down to a floor of 4 tables and 2 clusters per layer.
    assert_eq!(shard(Some(0), 0), (3 * 4 * 65536, 3 * 2 * 65536));
}

/// Thousands of small compressed clusters read through a ring whose completion queue holds 64,
/// a second request submitted while the first one's reads are in the kernel, in every mode:
/// inflate jobs reserve room for their completions, and a shard whose queue is full of the
/// reservations of jobs still on its own deque would wait forever for a completion when it
/// next pushes a read. Jobs beyond a bound are inflated at once instead. (Reproduced by
/// `tests/tests/differential.rs`, `shard_many_requests_in_flight_small_compressed_clusters`,
/// which hung every time without the bound.)
#[test]
fn many_small_compressed_clusters_through_a_small_ring() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let data = text(13, size);
    let raw = dir.path().join("small.raw");
    std::fs::write(&raw, &data).unwrap();
    let img = dir.path().join("small.qcow2");
    let out = qemu_img_cmd()
        .args([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
        ])
        .arg(&raw)
        .arg(&img)
        .output()
        .expect("cannot run qemu-img (is qemu-utils installed?)");
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    let half = size / 2;
    for sharing in SHARING {
        let img = img.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let config = ShardConfig {
                inflate: sharing,
                ring_entries: 8,
                ..ShardConfig::default()
            };
            let mut shard = Image::open(&img, &OpenOptions::default())
                .unwrap()
                .new_shard(&config)
                .unwrap();
            // Out of the page cache, so that the reads complete later, not while submitted.
            let f = std::fs::File::open(&img).unwrap();
            // SAFETY: an advice call on a descriptor we own; no memory is passed.
            let r = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            assert_eq!(r, 0);
            let mut mem = vec![0u8; size];
            let (first, second) = mem.split_at_mut(half);
            let iov = |m: &mut [u8]| libc::iovec {
                iov_base: m.as_mut_ptr().cast(),
                iov_len: m.len(),
            };
            let mut out = Vec::new();
            // SAFETY: `mem` outlives the shard's use of it: both completions are waited for.
            unsafe { shard.submit_read(1, 0, &[iov(first)]) }.unwrap();
            shard.poll(&mut out);
            // SAFETY: as above.
            unsafe { shard.submit_read(2, half as u64, &[iov(second)]) }.unwrap();
            while out.len() < 2 {
                shard.wait(&mut out);
            }
            let ok = out.iter().all(|c| c.result.is_ok());
            let _ = tx.send(ok.then_some(mem));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("{sharing:?}: the reads never completed"));
        assert!(
            got.expect("a read failed") == data,
            "{sharing:?}: wrong bytes"
        );
    }
}
