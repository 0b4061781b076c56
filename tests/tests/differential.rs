//! Differential tests: every image made by qemu-img/qemu-io reads exactly as
//! `qemu-img convert -O raw` reads it, both through `Image::read_at` and through the daemon's
//! vhost-user-blk socket (blkio client, two queues, several requests in flight).

use qcow2d_tests::*;
use std::path::{Path, PathBuf};

/// An odd virtual size: not a multiple of any cluster size above 512.
const ODD_SIZE: u64 = 20 * MIB + 3584;

/// Many qemu-io writes in one run: patterns of random length at random 512-aligned offsets
/// over the first `span` bytes, some zero writes (`write -z`, `write -z -u`) and whole-cluster
/// writes. Leaves part of the disk untouched.
fn scatter_writes(img: &Path, fmt: &str, seed: u64, span: u64, cluster: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let sectors = span / 512;
    let mut cmds = Vec::new();
    for i in 0..count {
        let s = rng.below(sectors);
        let n = (1 + rng.below(512)).min(sectors - s);
        let (off, len) = (s * 512, n * 512);
        let cmd = match i % 8 {
            5 => format!("write -z {off} {len}"),
            6 => format!("write -z -u {off} {len}"),
            7 => {
                let c = rng.below(span / cluster);
                format!(
                    "write -P {:#x} {} {}",
                    1 + rng.below(254),
                    c * cluster,
                    cluster
                )
            }
            _ => format!("write -P {:#x} {off} {len}", 1 + rng.below(254)),
        };
        cmds.push(cmd);
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(img, fmt, &refs);
}

/// A raw file of mixed data (zeros, random, text, patterns) converted to qcow2.
fn mixed_image(
    s: &Scratch,
    name: &str,
    size: u64,
    opts: &str,
    compress: bool,
    seed: u64,
) -> PathBuf {
    let raw = s.join(&format!("{name}.src.raw"));
    write_file(&raw, &mixed_bytes(seed, size as usize));
    let img = s.join(name);
    convert_raw_to_qcow2(&raw, &img, opts, compress);
    std::fs::remove_file(&raw).unwrap();
    img
}

/// qcow2 made by `create` + scattered qemu-io writes over 3/4 of the disk.
fn written_image(
    s: &Scratch,
    name: &str,
    size: u64,
    opts: &str,
    cluster: u64,
    seed: u64,
) -> PathBuf {
    let img = s.join(name);
    create_qcow2(&img, size, opts);
    scatter_writes(&img, "qcow2", seed, size / 4 * 3, cluster, 120);
    img
}

// ---- compat levels ----------------------------------------------------------------------

#[test]
fn compat_0_10() {
    let s = Scratch::new("compat_0_10");
    let opts = "compat=0.10";
    let img = mixed_image(&s, "v2.qcow2", ODD_SIZE, opts, false, 10);
    scatter_writes(&img, "qcow2", 11, ODD_SIZE, 65536, 80);
    assert_eq!(
        be32(&img, hdr::VERSION),
        2,
        "compat=0.10 must give a version 2 header"
    );
    check_image(
        &img,
        "compat=0.10 cluster_size=64k, converted mixed data + qemu-io writes",
    );
}

#[test]
fn compat_1_1() {
    let s = Scratch::new("compat_1_1");
    let opts = "compat=1.1";
    let img = mixed_image(&s, "v3.qcow2", ODD_SIZE, opts, false, 12);
    scatter_writes(&img, "qcow2", 13, ODD_SIZE, 65536, 80);
    assert_eq!(be32(&img, hdr::VERSION), 3);
    check_image(
        &img,
        "compat=1.1 cluster_size=64k, converted mixed data + qemu-io writes",
    );
}

// ---- cluster sizes ----------------------------------------------------------------------

fn cluster_case(test: &str, cluster: u64, seed: u64) {
    let s = Scratch::new(test);
    let opts = format!("cluster_size={cluster}");
    let img = mixed_image(&s, "c.qcow2", ODD_SIZE, &opts, false, seed);
    scatter_writes(&img, "qcow2", seed + 1, ODD_SIZE, cluster, 100);
    check_image(
        &img,
        &format!("compat=1.1 {opts}, converted mixed data + qemu-io writes"),
    );
    let img2 = written_image(&s, "w.qcow2", 16 * MIB, &opts, cluster, seed + 2);
    check_image(
        &img2,
        &format!("compat=1.1 {opts}, created empty + qemu-io writes"),
    );
}

#[test]
fn cluster_size_512() {
    cluster_case("cluster_512", 512, 20);
}

#[test]
fn cluster_size_4096() {
    cluster_case("cluster_4096", 4096, 30);
}

#[test]
fn cluster_size_65536() {
    cluster_case("cluster_65536", 65536, 40);
}

#[test]
fn cluster_size_2m() {
    cluster_case("cluster_2m", 2 * MIB, 50);
}

// ---- refcount widths --------------------------------------------------------------------

fn refcount_case(test: &str, bits: u32, cluster: u64, seed: u64) {
    let s = Scratch::new(test);
    let opts = format!("refcount_bits={bits},cluster_size={cluster}");
    let img = written_image(&s, "r.qcow2", ODD_SIZE, &opts, cluster, seed);
    let order = be32(&img, hdr::REFCOUNT_ORDER);
    assert_eq!(1u32 << order, bits, "refcount_order in the header");
    check_image(&img, &format!("compat=1.1 {opts}, qemu-io writes"));
}

#[test]
fn refcount_bits_1() {
    refcount_case("refcount_1", 1, 4096, 60);
}

#[test]
fn refcount_bits_16() {
    refcount_case("refcount_16", 16, 4096, 61);
}

#[test]
fn refcount_bits_64() {
    refcount_case("refcount_64", 64, 65536, 62);
}

// ---- compression ------------------------------------------------------------------------

fn compressed_case(test: &str, opts: &str, seed: u64) -> PathBuf {
    let s = Scratch::new(test);
    let img = mixed_image(&s, "z.qcow2", ODD_SIZE, opts, true, seed);
    let comp = compressed_clusters(&img);
    assert!(
        comp.len() >= 4,
        "test setup: {opts} image has only {} compressed clusters",
        comp.len()
    );
    check_image(
        &img,
        &format!("{opts}, qemu-img convert -c of mixed data (zeros, random, text)"),
    );
    // A qemu-io write over part of it: partial overwrite of compressed clusters.
    scatter_writes(&img, "qcow2", seed + 1, ODD_SIZE, 65536, 40);
    check_image(&img, &format!("{opts}, convert -c then qemu-io writes"));
    img
}

#[test]
fn zlib_cluster_64k() {
    compressed_case("zlib_64k", "compression_type=zlib", 70);
}

/// Every cluster read whole and cluster-aligned, then cluster-sized reads at unaligned offsets
/// and reads over cluster boundaries.
fn whole_cluster_plan(size: u64, cluster: u64, seed: u64) -> Vec<ReadReq> {
    let mut v: Vec<ReadReq> = (0..size.div_ceil(cluster))
        .map(|i| (i * cluster, cluster.min(size - i * cluster) as usize))
        .collect();
    let mut rng = Rng::new(seed);
    for _ in 0..24 {
        let off = rng.below((size - cluster) / 512) * 512;
        v.push((off, cluster as usize));
    }
    for _ in 0..8 {
        let k = 1 + rng.below(size / cluster - 1);
        v.push((k * cluster - cluster / 2, (2 * cluster) as usize));
    }
    v
}

/// Compressed clusters read whole: a cluster-aligned, cluster-sized request in one segment is
/// inflated straight into guest memory, in several segments or at an unaligned offset it goes
/// through the decompressed-cluster cache. Both through the engine and through the socket, the
/// same requests sent in one segment each and in uneven segments.
fn whole_cluster_case(test: &str, opts: &str, cluster: u64, seed: u64) {
    let s = Scratch::new(test);
    let img = mixed_image(&s, "w.qcow2", ODD_SIZE, opts, true, seed);
    assert!(
        compressed_clusters(&img).len() >= 4,
        "test setup: too few compressed clusters"
    );
    // Partial overwrites: some clusters become plain data next to compressed ones.
    scatter_writes(&img, "qcow2", seed + 1, ODD_SIZE, cluster, 20);
    let expected = oracle(&img);
    let plan = whole_cluster_plan(ODD_SIZE, cluster, seed);
    let settings = format!("{opts}, whole-cluster reads");
    let results = engine_read_plan(&img, &plan).unwrap_or_else(|e| panic!("engine: {e}"));
    for ((off, len), r) in plan.iter().zip(&results) {
        let data = r
            .as_ref()
            .unwrap_or_else(|e| panic!("engine: {len} at {off:#x}: {e}"));
        let want = &expected[*off as usize..*off as usize + len];
        if let Some(m) = first_difference("engine read_at", &settings, *off, want, data) {
            panic!("{m}");
        }
    }
    let sock = Scratch::new(&format!("{test}_sock"));
    let socket = sock.socket("s");
    let mut d = Daemon::start(&img, &socket);
    let plan2 = plan.clone();
    let res = blk_session(&socket, 2, READ_TIMEOUT, move |c| {
        c.set_one_segment(true);
        let one = c.read_batch(&plan2)?;
        c.set_one_segment(false);
        let uneven = c.read_batch(&plan2)?;
        Ok((one, uneven))
    })
    .unwrap_or_else(|e| panic!("daemon+blkio: {e}\ndaemon stderr:\n{}", d.stderr()));
    d.assert_alive("after whole-cluster reads");
    for (what, results) in [("one segment", res.0), ("uneven segments", res.1)] {
        for ((off, len), r) in plan.iter().zip(&results) {
            let data = r
                .as_ref()
                .unwrap_or_else(|e| panic!("daemon ({what}): {len} at {off:#x}: {e}"));
            let want = &expected[*off as usize..*off as usize + len];
            let label = format!("daemon+blkio, {what}");
            if let Some(m) = first_difference(&label, &settings, *off, want, data) {
                panic!("{m}");
            }
        }
    }
}

#[test]
fn zlib_whole_cluster_reads() {
    whole_cluster_case("zlib_whole", "compression_type=zlib", 65536, 75);
}

#[test]
fn zstd_whole_cluster_reads() {
    whole_cluster_case("zstd_whole", "compression_type=zstd", 65536, 85);
}

#[test]
fn zlib_whole_cluster_reads_4k() {
    whole_cluster_case(
        "zlib_whole_4k",
        "compression_type=zlib,cluster_size=4096",
        4096,
        76,
    );
}

#[test]
fn zlib_cluster_512() {
    compressed_case("zlib_512", "compression_type=zlib,cluster_size=512", 71);
}

#[test]
fn zlib_cluster_4k() {
    compressed_case("zlib_4k", "compression_type=zlib,cluster_size=4096", 72);
}

#[test]
fn zlib_cluster_2m() {
    compressed_case("zlib_2m", "compression_type=zlib,cluster_size=2M", 73);
}

#[test]
fn zlib_compat_0_10() {
    compressed_case("zlib_v2", "compat=0.10", 74);
}

#[test]
fn zstd_cluster_64k() {
    compressed_case("zstd_64k", "compression_type=zstd", 80);
}

#[test]
fn zstd_cluster_4k() {
    compressed_case("zstd_4k", "compression_type=zstd,cluster_size=4096", 81);
}

#[test]
fn zstd_cluster_2m() {
    compressed_case("zstd_2m", "compression_type=zstd,cluster_size=2M", 82);
}

#[test]
fn compressed_base_with_overlay() {
    let s = Scratch::new("compressed_base");
    let base = mixed_image(
        &s,
        "base.qcow2",
        ODD_SIZE,
        "compression_type=zstd",
        true,
        90,
    );
    let top = s.join("top.qcow2");
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert!(base.exists());
    scatter_writes(&top, "qcow2", 91, ODD_SIZE, 65536, 60);
    check_image(
        &top,
        "qcow2 top over a zstd-compressed qcow2 base, qemu-io writes on top",
    );
}

// ---- extended L2 ------------------------------------------------------------------------

/// 4 KiB writes at odd subcluster offsets (subclusters are 2 KiB with 64 KiB clusters).
fn subcluster_writes(img: &Path, seed: u64, span: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for _ in 0..60 {
        let cluster = rng.below(span / 65536);
        let sub = 2 * rng.below(15) + 1; // odd subcluster index
        let off = cluster * 65536 + sub * 2048;
        cmds.push(format!("write -P {:#x} {off} 4096", 1 + rng.below(254)));
    }
    // Unaligned to subclusters: copy-on-write inside a subcluster.
    cmds.push("write -P 0x44 135k 3k".into());
    // Whole cluster, then a zeroed subcluster and a partial rewrite inside it.
    cmds.push("write -P 0x11 0 64k".into());
    cmds.push("write -z 16k 2k".into());
    cmds.push("write -P 0x22 6k 4k".into());
    // Zero subclusters in an otherwise unallocated cluster.
    cmds.push(format!("write -z {} 2k", 40 * 65536 + 4096));
    cmds.push(format!("write -z -u {} 6k", 41 * 65536 + 2048));
    // Discard a written cluster and part of another.
    cmds.push(format!("write -P 0x55 {} 128k", 50 * 65536));
    cmds.push(format!("discard {} 64k", 50 * 65536));
    cmds.push(format!("discard {} 8k", 51 * 65536 + 8192));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(img, "qcow2", &refs);
    cmds
}

#[test]
fn extended_l2_subclusters() {
    let s = Scratch::new("extended_l2");
    let img = s.join("x.qcow2");
    create_qcow2(&img, 16 * MIB, "extended_l2=on,cluster_size=64k");
    assert_ne!(
        be64(&img, hdr::INCOMPATIBLE_FEATURES) & hdr::INCOMPAT_EXTENDED_L2,
        0,
        "test setup: extended_l2 bit not set"
    );
    subcluster_writes(&img, 100, 16 * MIB);
    check_image(
        &img,
        "extended_l2=on cluster_size=64k, subcluster writes, write -z, discard",
    );
}

#[test]
fn extended_l2_over_backing() {
    let s = Scratch::new("extended_l2_backing");
    let base = s.join("base.raw");
    write_file(&base, &random_bytes(110, 16 * MIB as usize));
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    let top = s.join("top.qcow2");
    subcluster_writes(&top, 111, 16 * MIB);
    check_image(
        &top,
        "extended_l2=on cluster_size=64k over a random raw backing file: unallocated \
         subclusters read the backing file",
    );
}

// ---- backing chains ---------------------------------------------------------------------

#[test]
fn backing_chain_raw_qcow2_qcow2() {
    let s = Scratch::new("chain3");
    let dir = s.join("images");
    let elsewhere = s.join("elsewhere");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    // Base: 8 MiB + 1.5 KiB of mixed data, raw.
    let base_len = 8 * MIB + 1536;
    write_file(&dir.join("base.raw"), &mixed_bytes(120, base_len as usize));
    // Middle: 12 MiB, relative backing name, created from another directory.
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_in(
        &elsewhere,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
            "12M",
        ],
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0xa1 1M 1M",
            &format!("write -P 0xa2 {} 512k", 8 * MIB - 256 * KIB), // across the base's end
            "write -P 0xa3 10M 1M",
            "write -z 3M 64k",
            "write -z -u 4M 192k",
        ],
    );
    qemu_img_in(
        &elsewhere,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            "20M",
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0xb1 1536k 64k", // over the middle's data
            &format!("write -P 0xb2 {} 1M", 12 * MIB - 512 * KIB), // across the middle's end
            "write -P 0xb3 15M 1M",
            "write -z 1M 64k",
            "write -z -u 5M 128k",
            "write -P 0xb4 6000k 3k",
        ],
    );
    assert_eq!(
        read_bytes(&top, be64(&top, hdr::BACKING_FILE_OFFSET), 9),
        b"mid.qcow2",
        "test setup: the backing name must be stored relative"
    );
    check_image(
        &top,
        "3-deep chain: raw base 8M+1.5K <- qcow2 mid 12M (64k) <- qcow2 top 20M (4k), relative \
         names, created from another cwd",
    );
    check_image(&mid, "qcow2 mid 12M over raw base 8M+1.5K");
}

#[test]
fn backing_format_probed_qcow2() {
    let s = Scratch::new("probe_qcow2");
    mixed_image(&s, "base.qcow2", 16 * MIB, "cluster_size=4096", false, 130);
    let top = s.join("top.qcow2");
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    scatter_writes(&top, "qcow2", 131, 16 * MIB, 65536, 40);
    remove_header_extension(&top, hdr::EXT_BACKING_FORMAT);
    let info = qemu_img_info_text(&top);
    assert!(
        info.contains("backing file: base.qcow2") && !info.contains("backing file format"),
        "test setup: backing format extension not removed:\n{info}"
    );
    check_image(
        &top,
        "qcow2 top, backing base.qcow2 with no backing format (probed)",
    );
}

#[test]
fn backing_format_probed_raw() {
    let s = Scratch::new("probe_raw");
    write_file(&s.join("base.img"), &mixed_bytes(140, 12 * MIB as usize));
    let top = s.join("top.qcow2");
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.img",
            "-F",
            "raw",
            "top.qcow2",
            "16M",
        ],
    );
    scatter_writes(&top, "qcow2", 141, 16 * MIB, 65536, 40);
    remove_header_extension(&top, hdr::EXT_BACKING_FORMAT);
    check_image(
        &top,
        "qcow2 top 16M, raw backing base.img 12M with no backing format (probed)",
    );
}

#[test]
fn backing_compat_0_10() {
    let s = Scratch::new("backing_v2");
    mixed_image(&s, "base.qcow2", 16 * MIB, "compat=0.10", true, 150);
    let top = s.join("top.qcow2");
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    scatter_writes(&top, "qcow2", 151, 16 * MIB, 65536, 60);
    check_image(
        &top,
        "compat=0.10 top over compat=0.10 zlib-compressed base",
    );
}

// ---- external data file -----------------------------------------------------------------

fn data_file_case(test: &str, raw: bool, absolute: bool, seed: u64) {
    let s = Scratch::new(test);
    let name = if absolute {
        s.join("d.data").display().to_string()
    } else {
        "d.data".to_string()
    };
    let opts = format!(
        "data_file={name},data_file_raw={}",
        if raw { "on" } else { "off" }
    );
    qemu_img_in(
        s.path(),
        &["create", "-q", "-f", "qcow2", "-o", &opts, "d.qcow2", "16M"],
    );
    let img = s.join("d.qcow2");
    scatter_writes(&img, "qcow2", seed, 12 * MIB, 65536, 100);
    assert!(s.join("d.data").exists());
    check_image(&img, &format!("compat=1.1 64k, external {opts}"));
}

#[test]
fn external_data_file() {
    data_file_case("data_file", false, true, 160);
}

/// A relative data file name: the engine resolves it against the image's directory (QEMU
/// uses the current directory; the test runs qemu-img there so both agree).
#[test]
fn external_data_file_raw_relative_name() {
    data_file_case("data_file_raw", true, false, 161);
}

// ---- zero clusters ----------------------------------------------------------------------

/// Data everywhere in the first 8 MiB, then zero writes of every kind over it and beyond.
fn zero_writes(img: &Path) {
    qemu_io(
        img,
        "qcow2",
        &[
            "write -P 0x5a 0 2M",
            "write -P 0x6b 2M 2M",
            "write -P 0x7c 4M 4M",
            "write -z 1M 192k",    // allocated -> zero, keeping the host cluster
            "write -z -u 2M 128k", // allocated -> zero, unmapped
            "write -z 9M 64k",     // unallocated -> zero
            "write -z 3076k 8k",   // partial cluster
            "write -z -u 4M 1M",   // a bigger unmapped range
            "write -P 0x8d 1088k 4k", // rewrite inside a zero cluster
            "write -z 12M 4M",
        ],
    );
}

#[test]
fn zero_clusters_plain() {
    let s = Scratch::new("zero_plain");
    let img = s.join("z.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    zero_writes(&img);
    check_image(&img, "compat=1.1 64k, write -z / write -z -u over data");
}

#[test]
fn zero_clusters_prealloc_metadata() {
    let s = Scratch::new("zero_prealloc_meta");
    let img = s.join("z.qcow2");
    create_qcow2(&img, 16 * MIB, "preallocation=metadata");
    zero_writes(&img);
    check_image(
        &img,
        "compat=1.1 64k preallocation=metadata, write -z over data",
    );
}

#[test]
fn zero_clusters_prealloc_full() {
    let s = Scratch::new("zero_prealloc_full");
    let img = s.join("z.qcow2");
    create_qcow2(&img, 16 * MIB, "preallocation=full,cluster_size=4096");
    zero_writes(&img);
    check_image(&img, "compat=1.1 4k preallocation=full, write -z over data");
}

#[test]
fn zero_clusters_backed() {
    let s = Scratch::new("zero_backed");
    write_file(&s.join("base.raw"), &random_bytes(170, 16 * MIB as usize));
    qemu_img_in(
        s.path(),
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "z.qcow2",
        ],
    );
    let img = s.join("z.qcow2");
    zero_writes(&img);
    check_image(
        &img,
        "compat=1.1 64k over random raw backing, write -z over backing data",
    );
}

#[test]
fn zero_clusters_compat_0_10() {
    let s = Scratch::new("zero_v2");
    let img = s.join("z.qcow2");
    create_qcow2(&img, 16 * MIB, "compat=0.10");
    zero_writes(&img);
    check_image(&img, "compat=0.10 64k, write -z (no zero flag in v2)");
}

// ---- internal snapshots -----------------------------------------------------------------

#[test]
fn internal_snapshot_then_writes() {
    let s = Scratch::new("snapshot");
    let img = mixed_image(&s, "s.qcow2", ODD_SIZE, "", false, 180);
    let p = img.to_str().unwrap();
    qemu_img(&["snapshot", "-c", "first", p]);
    scatter_writes(&img, "qcow2", 181, ODD_SIZE, 65536, 60);
    qemu_img(&["snapshot", "-c", "second", p]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x99 0 3M", "write -z 5M 1M", "write -z -u 7M 1M"],
    );
    assert_eq!(be32(&img, hdr::NB_SNAPSHOTS), 2);
    check_image(
        &img,
        "compat=1.1 64k, 2 internal snapshots, writes after each (COW)",
    );
}

// ---- a tiny L2 cache ---------------------------------------------------------------------

/// Two 4 KiB L2 tables of cache for an image with eight: every pass evicts.
#[test]
fn l2_cache_smaller_than_the_image() {
    let s = Scratch::new("small_l2_cache");
    let img = s.join("c.qcow2");
    create_qcow2(&img, 16 * MIB, "cluster_size=4096");
    scatter_writes(&img, "qcow2", 200, 16 * MIB, 4096, 200);
    let expected = oracle(&img);
    let plan = read_plan(16 * MIB, 4096, 4);
    let opts = qcow2d_engine::OpenOptions {
        l2_cache_bytes: Some(8192),
        ..qcow2d_engine::OpenOptions::default()
    };
    let results = engine_read_plan_with(&img, &plan, opts).unwrap_or_else(|e| panic!("{e}"));
    for (&(off, len), r) in plan.iter().zip(results) {
        let data = r.unwrap_or_else(|e| panic!("read of {len} at {off:#x} failed: {e}"));
        let o = off as usize;
        if let Some(m) = first_difference(
            "engine read_at, l2_cache_bytes = 8192",
            "4k clusters, 16 MiB",
            off,
            &expected[o..o + len],
            &data,
        ) {
            panic!("{m}");
        }
    }
}

// ---- the shard API directly -------------------------------------------------------------

/// Many reads in flight on one shard (up to 48), each split over three iovecs.
fn shard_case(img: &Path, settings: &'static str, cluster: u64) {
    let expected = oracle(img);
    let plan = read_plan(ODD_SIZE, cluster, 3);
    let p = img.to_path_buf();
    let plan2 = plan.clone();
    let results = with_timeout(
        "shard reads (48 in flight)",
        READ_TIMEOUT,
        move || -> Result<_, String> {
            use qcow2d_engine::{Image, OpenOptions, ShardConfig};
            let image = Image::open(&p, &OpenOptions::default()).map_err(|e| error_chain(&e))?;
            let mut shard = image
                .new_shard(&ShardConfig::default())
                .map_err(|e| error_chain(&e))?;
            let mut bufs: Vec<Vec<u8>> = plan2.iter().map(|&(_, len)| vec![0u8; len]).collect();
            let mut results: Vec<Option<Result<(), String>>> = vec![None; plan2.len()];
            let mut out = Vec::new();
            let mut next = 0;
            const MAX_IN_FLIGHT: usize = 48;
            while next < plan2.len() || shard.in_flight() > 0 {
                // Submit a batch, then poll, as the API asks.
                let mut batch = 0;
                while next < plan2.len() && shard.in_flight() < MAX_IN_FLIGHT && batch < 16 {
                    let (off, len) = plan2[next];
                    let a = (len / 512 / 3) * 512;
                    let b = (len / 512 / 2) * 512;
                    let base = bufs[next].as_mut_ptr();
                    let iov: Vec<libc::iovec> = [(0, a), (a, b - a), (b, len - b)]
                        .into_iter()
                        .filter(|&(_, n)| n > 0)
                        .map(|(o, n)| libc::iovec {
                            // SAFETY: o + n <= len, inside the buffer of this request.
                            iov_base: unsafe { base.add(o) }.cast(),
                            iov_len: n,
                        })
                        .collect();
                    // SAFETY: bufs[next] is neither moved nor touched until its completion comes
                    // back (the outer Vec is never resized), and the shard is dropped only after
                    // every request completed.
                    let r = unsafe { shard.submit_read(next as u64, off, &iov) };
                    if let Err(e) = r {
                        results[next] =
                            Some(Err(format!("submit_read rejected: {}", error_chain(&e))));
                    }
                    next += 1;
                    batch += 1;
                }
                out.clear();
                if shard.in_flight() > 0 && batch == 0 {
                    shard.wait(&mut out);
                } else {
                    shard.poll(&mut out);
                }
                for c in out.drain(..) {
                    let i = c.token as usize;
                    if results[i].is_some() {
                        return Err(format!("token {i} completed twice"));
                    }
                    results[i] = Some(c.result.map_err(|e| e.to_string()));
                }
            }
            Ok((results, bufs))
        },
    );
    let (results, bufs) = results.unwrap_or_else(|e| panic!("shard: {e}"));
    for (i, (&(off, len), r)) in plan.iter().zip(&results).enumerate() {
        match r {
            None => panic!("shard: request {i} ({len} bytes at {off:#x}) never completed"),
            Some(Err(e)) => panic!("shard: request {i} ({len} bytes at {off:#x}) failed: {e}"),
            Some(Ok(())) => {
                if let Some(m) = first_difference(
                    "shard submit_read",
                    settings,
                    off,
                    &expected[off as usize..off as usize + len],
                    &bufs[i],
                ) {
                    panic!("{m}");
                }
            }
        }
    }
}

#[test]
fn shard_many_requests_in_flight() {
    let s = Scratch::new("shard");
    let img = mixed_image(&s, "c.qcow2", ODD_SIZE, "compression_type=zstd", true, 190);
    scatter_writes(&img, "qcow2", 191, ODD_SIZE, 65536, 40);
    shard_case(&img, "zstd-compressed 64k + qemu-io writes", 65536);
}

#[test]
fn shard_many_requests_in_flight_small_compressed_clusters() {
    let s = Scratch::new("shard512");
    let img = mixed_image(&s, "c.qcow2", ODD_SIZE, "cluster_size=512", true, 192);
    shard_case(&img, "zlib-compressed, 512-byte clusters", 512);
}

/// Drives a shard the way an event loop does: submit, `poll()`, then call `poll()` again only
/// when `completion_fd()` becomes readable (never `wait()`). Reads that need more
/// sub-operations than the ring holds (1 MiB of 512-byte compressed clusters) must still finish.
#[test]
fn shard_completion_fd_drives_progress() {
    let s = Scratch::new("shard_fd");
    let img = mixed_image(&s, "c.qcow2", ODD_SIZE, "cluster_size=512", true, 193);
    let expected = oracle(&img);
    let reqs: Vec<ReadReq> = (0..8).map(|i| (i * MIB, MIB as usize)).collect();
    let p = img.clone();
    let reqs2 = reqs.clone();
    let res = with_timeout(
        "event-driven shard",
        READ_TIMEOUT,
        move || -> Result<_, String> {
            use qcow2d_engine::{Image, OpenOptions, ShardConfig};
            let image = Image::open(&p, &OpenOptions::default()).map_err(|e| error_chain(&e))?;
            let mut shard = image
                .new_shard(&ShardConfig::default())
                .map_err(|e| error_chain(&e))?;
            let mut bufs: Vec<Vec<u8>> = reqs2.iter().map(|&(_, len)| vec![0u8; len]).collect();
            let mut results: Vec<Option<Result<(), String>>> = vec![None; reqs2.len()];
            for (i, &(off, len)) in reqs2.iter().enumerate() {
                let iov = [libc::iovec {
                    iov_base: bufs[i].as_mut_ptr().cast(),
                    iov_len: len,
                }];
                // SAFETY: bufs[i] is not touched until its completion is returned, and the shard
                // is dropped (waiting for the kernel) before bufs.
                unsafe { shard.submit_read(i as u64, off, &iov) }
                    .map_err(|e| format!("submit_read: {}", error_chain(&e)))?;
            }
            let mut out = Vec::new();
            shard.poll(&mut out);
            loop {
                for c in out.drain(..) {
                    results[c.token as usize] = Some(c.result.map_err(|e| e.to_string()));
                }
                if shard.in_flight() == 0 {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd: shard.completion_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
                if n == 0 {
                    return Err(format!(
                    "STALLED: {} request(s) in flight and completion_fd() not readable for 10 s \
                     (an event loop calling poll() only when the fd is readable never finishes)",
                    shard.in_flight()
                ));
                }
                shard.poll(&mut out);
            }
            Ok((results, bufs))
        },
    );
    let (results, bufs) = res.unwrap_or_else(|e| panic!("{e}"));
    for (i, &(off, len)) in reqs.iter().enumerate() {
        match &results[i] {
            None => panic!("request {i} never completed"),
            Some(Err(e)) => panic!("read of {len} at {off:#x} failed: {e}"),
            Some(Ok(())) => {
                let o = off as usize;
                if let Some(m) = first_difference(
                    "shard (event-driven)",
                    "zlib 512-byte clusters",
                    off,
                    &expected[o..o + len],
                    &bufs[i],
                ) {
                    panic!("{m}");
                }
            }
        }
    }
}

// ---- direct I/O -------------------------------------------------------------------------

/// The daemon with `--direct` (read-only export): aligned data reads go through O_DIRECT, the
/// rest (compressed clusters, metadata, backing files) through the page cache.
fn check_direct(img: &Path, settings: &str) {
    let oracle = oracle(img);
    let cluster = engine_open(img)
        .unwrap_or_else(|e| panic!("{}: {e}", img.display()))
        .cluster_size();
    if let Err(e) = check_daemon_with(img, settings, &oracle, cluster, &["--direct"]) {
        panic!("{} ({settings}):\n{e}", img.display());
    }
}

#[test]
fn direct_reads() {
    let s = Scratch::new("direct_reads");
    let img = mixed_image(&s, "m.qcow2", ODD_SIZE, "", false, 90);
    scatter_writes(&img, "qcow2", 91, ODD_SIZE, 65536, 80);
    check_direct(&img, "--direct, mixed data + qemu-io writes, odd size");
    let z = mixed_image(&s, "z.qcow2", ODD_SIZE, "compression_type=zlib", true, 92);
    check_direct(&z, "--direct, qemu-img convert -c");
    let w = written_image(&s, "w.qcow2", 16 * MIB, "cluster_size=4096", 4096, 93);
    check_direct(
        &w,
        "--direct, cluster_size=4k, created empty + qemu-io writes",
    );
    let top = s.join("top.qcow2");
    create_qcow2(
        &top,
        ODD_SIZE,
        &format!("backing_file={},backing_fmt=qcow2", img.display()),
    );
    scatter_writes(&top, "qcow2", 94, ODD_SIZE / 2, 65536, 40);
    check_direct(&top, "--direct, overlay over the mixed image");
}
