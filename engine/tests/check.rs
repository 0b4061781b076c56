//! `qcow2d_engine::check` against `qemu-img check`.
//!
//! Images are made by the real `qemu-img` and `qemu-io` in every layout the engine supports.
//! Each must check clean, with the same image end offset and cluster statistics as
//! `qemu-img check --output=json`. Then refcounts are damaged by editing bytes in the file
//! (a leak, a refcount dropped to 0, a missing refcount block, a stale refcount under the dirty
//! bit): our check must count what `qemu-img check` counts, and our repair must leave an image
//! that both checks find clean and that `qemu-img compare` finds identical to a copy taken
//! before the damage. A missing tool fails the test loudly.

use qcow2d_engine::check::{check, CheckReport};
use qcow2d_engine::format::{refcount_get, refcount_set};
use qcow2d_engine::{Image, OpenOptions};
use qcow2d_tests::{convert_raw_to_qcow2, create_qcow2, qemu_img, qemu_img_cmd, qemu_io, Rng};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is qemu-utils installed?): {e}"))
}

/// What `qemu-img check --output=json` says, and its exit status.
#[derive(Debug)]
struct QemuCheck {
    exit: i32,
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    compressed_clusters: u64,
    fragmented_clusters: u64,
    json: String,
    stderr: String,
}

fn qemu_check(path: &Path) -> QemuCheck {
    let out = output(
        qemu_img_cmd()
            .args(["check", "--output=json", "-f", "qcow2"])
            .arg(path),
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // When QEMU cannot open the image it prints no JSON and exits with 1.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    // Fields that are zero are left out.
    let field = |name: &str| v.get(name).and_then(|x| x.as_u64()).unwrap_or(0);
    QemuCheck {
        exit: out.status.code().unwrap_or(-1),
        corruptions: field("corruptions"),
        leaks: field("leaks"),
        check_errors: field("check-errors"),
        image_end_offset: field("image-end-offset"),
        total_clusters: field("total-clusters"),
        allocated_clusters: field("allocated-clusters"),
        compressed_clusters: field("compressed-clusters"),
        fragmented_clusters: field("fragmented-clusters"),
        json,
        stderr,
    }
}

/// Checks without repair and asserts we agree with `qemu-img check` on every number.
fn assert_agrees(path: &Path) -> CheckReport {
    let ours = check(path, false).unwrap_or_else(|e| panic!("check {}: {e}", path.display()));
    let q = qemu_check(path);
    let ctx = format!(
        "{}\nours: {ours:?}\n{ours}\nqemu: {}{}",
        path.display(),
        q.json,
        q.stderr
    );
    assert_eq!(q.check_errors, 0, "{ctx}");
    assert_eq!(ours.corruptions, q.corruptions, "corruptions: {ctx}");
    assert_eq!(ours.leaks, q.leaks, "leaks: {ctx}");
    assert_eq!(ours.exit_code(), q.exit, "exit code: {ctx}");
    assert_eq!(ours.image_end_offset, q.image_end_offset, "end: {ctx}");
    assert_eq!(ours.total_clusters, q.total_clusters, "total: {ctx}");
    assert_eq!(
        ours.allocated_clusters, q.allocated_clusters,
        "alloc: {ctx}"
    );
    assert_eq!(
        ours.compressed_clusters, q.compressed_clusters,
        "compr: {ctx}"
    );
    assert_eq!(
        ours.fragmented_clusters, q.fragmented_clusters,
        "frag: {ctx}"
    );
    assert!(!ours.repaired);
    ours
}

fn assert_clean(path: &Path) {
    let r = assert_agrees(path);
    assert_eq!(
        (r.corruptions, r.leaks),
        (0, 0),
        "{}: {r:?}",
        path.display()
    );
    assert_eq!(r.exit_code(), 0);
    assert!(r
        .to_string()
        .starts_with("No errors were found on the image.\n"));
}

/// Repairs, then asserts that both checks find the image clean and that its contents equal
/// `reference` (a copy taken before the damage).
fn repair_and_verify(path: &Path, reference: &Path) -> CheckReport {
    let r = check(path, true).unwrap_or_else(|e| panic!("repair {}: {e}", path.display()));
    assert!(r.repaired);
    assert_eq!(
        (r.corruptions, r.leaks),
        (0, 0),
        "after repair of {}: {r:?}",
        path.display()
    );
    assert_clean(path);
    let q = qemu_check(path);
    assert_eq!(
        q.exit, 0,
        "qemu-img check after repair: {}{}",
        q.json, q.stderr
    );
    let out = output(
        qemu_img_cmd()
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(reference)
            .arg(path),
    );
    assert!(
        out.status.success(),
        "qemu-img compare after repair: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    r
}

// ---- Byte-level access to an image, for damaging it. ----

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

struct Layout {
    cluster_bits: u32,
    refcount_order: u32,
    refcount_table_offset: u64,
    l1_table_offset: u64,
    extended_l2: bool,
}

fn layout(img: &[u8]) -> Layout {
    let version = be32(img, 4);
    Layout {
        cluster_bits: be32(img, 20),
        refcount_order: if version >= 3 { be32(img, 96) } else { 4 },
        refcount_table_offset: be64(img, 48),
        l1_table_offset: be64(img, 40),
        extended_l2: version >= 3 && be64(img, 72) & (1 << 4) != 0,
    }
}

impl Layout {
    /// Byte offset of the refcount block holding cluster `c`, and `c`'s index in it.
    fn refcount_slot(&self, img: &[u8], c: u64) -> (usize, usize) {
        let epb = (8u64 << self.cluster_bits) >> self.refcount_order;
        let rt = self.refcount_table_offset as usize + (c / epb) as usize * 8;
        let block = be64(img, rt) & !0x1ff;
        assert_ne!(block, 0, "no refcount block for cluster {c}");
        (block as usize, (c % epb) as usize)
    }

    fn refcount(&self, img: &[u8], c: u64) -> u64 {
        let (block, i) = self.refcount_slot(img, c);
        let cs = 1usize << self.cluster_bits;
        refcount_get(&img[block..block + cs], self.refcount_order, i)
    }

    fn set_refcount(&self, img: &mut [u8], c: u64, v: u64) {
        let (block, i) = self.refcount_slot(img, c);
        let cs = 1usize << self.cluster_bits;
        refcount_set(&mut img[block..block + cs], self.refcount_order, i, v).unwrap();
    }

    /// Host cluster of the first L2 table of the active L1 table.
    fn first_l2_cluster(&self, img: &[u8]) -> u64 {
        let l2 = be64(img, self.l1_table_offset as usize) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "L1 entry 0 is unallocated");
        l2 >> self.cluster_bits
    }

    /// Host cluster of the first allocated, uncompressed data cluster of the first L2 table.
    fn first_data_cluster(&self, img: &[u8]) -> u64 {
        let l2 = (self.first_l2_cluster(img) << self.cluster_bits) as usize;
        let esz = if self.extended_l2 { 16 } else { 8 };
        let entries = (1usize << self.cluster_bits) / esz;
        (0..entries)
            .map(|j| be64(img, l2 + j * esz))
            .find(|e| e & (1 << 62) == 0 && e & 0x00ff_ffff_ffff_fe00 != 0)
            .map(|e| (e & 0x00ff_ffff_ffff_fe00) >> self.cluster_bits)
            .expect("no allocated data cluster in the first L2 table")
    }
}

/// The image at `path`, opened for writing through the engine.
fn open_writable(path: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn edit(path: &Path, f: impl FnOnce(&Layout, &mut Vec<u8>)) {
    let mut img = read_file(path);
    let l = layout(&img);
    f(&l, &mut img);
    std::fs::write(path, &img).unwrap();
}

// ---- Image factory. ----

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img create -f qcow2 -o <opts>` then runs `qemu-io` commands on it.
    fn image(&self, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
        let p = create_qcow2(&self.path(name), size, opts);
        if !cmds.is_empty() {
            qemu_io(&p, "qcow2", cmds);
        }
        p
    }

    /// A raw image with compressible and incompressible data, compressed into qcow2 with
    /// `qemu-img convert -c` and the given options.
    fn compressed(&self, name: &str, opts: &str) -> PathBuf {
        let raw = self.path(&format!("{name}.raw"));
        let mut data = vec![0u8; 3 << 20];
        let mut rng = Rng::new(0x1234_5678_9abc_def0);
        for (i, chunk) in data.chunks_mut(4096).enumerate() {
            match i % 5 {
                0 => chunk.fill(0x5a),
                1 => chunk.fill(0),
                _ => {
                    for b in chunk.iter_mut() {
                        let x = rng.next_u64();
                        // Half random, half text-like: compresses partly.
                        *b = if i % 2 == 0 {
                            x as u8
                        } else {
                            b'a' + (x % 7) as u8
                        };
                    }
                }
            }
        }
        std::fs::write(&raw, &data).unwrap();
        let p = self.path(name);
        convert_raw_to_qcow2(&raw, &p, opts, true);
        p
    }

    fn copy(&self, from: &Path, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::copy(from, &p).unwrap();
        p
    }
}

const WRITES: &[&str] = &[
    "write -P 1 0 100k",
    "write -P 2 1M 64k",
    "write -z 2M 128k",
    "write -P 3 3M 8k",
    "discard 1M 64k",
];

/// Every layout of image we serve, as made by QEMU, with data in it.
fn all_images(d: &Dir) -> Vec<PathBuf> {
    let snap = |p: &Path, name: &str| {
        qemu_img(&["snapshot", "-c", name, p.to_str().unwrap()]);
    };
    let mut v = vec![
        d.image("fresh.qcow2", "", "4M", &[]),
        d.image("written.qcow2", "", "8M", WRITES),
        d.compressed("compressed.qcow2", ""),
        d.compressed("zstd.qcow2", "compression_type=zstd"),
        d.image("c512.qcow2", "cluster_size=512", "4M", WRITES),
        d.image("rc1.qcow2", "refcount_bits=1", "8M", WRITES),
        d.image("rc64.qcow2", "refcount_bits=64", "8M", WRITES),
        d.image(
            "extl2.qcow2",
            "extended_l2=on,cluster_size=64k",
            "8M",
            &[
                "write -P 1 0 4k",
                "write -P 2 12k 8k",
                "write -z 64k 64k",
                "write -z 130k 2k",
                "write -P 4 1M 96k",
            ],
        ),
        d.image("v2.qcow2", "compat=0.10", "8M", WRITES),
        d.image("prealloc.qcow2", "preallocation=metadata", "4M", &[]),
        d.image(
            "lazy.qcow2",
            "lazy_refcounts=on",
            "4M",
            &["write -P 7 0 200k"],
        ),
    ];
    let data = d.path("external.data");
    v.push(d.image(
        "datafile.qcow2",
        &format!("data_file={}", data.display()),
        "4M",
        &["write -P 1 0 100k", "write -P 2 1M 64k"],
    ));

    let s = d.image("snapshots.qcow2", "", "8M", &["write -P 1 0 256k"]);
    snap(&s, "s1");
    qemu_io(&s, "qcow2", &["write -P 2 64k 64k", "write -P 3 4M 64k"]);
    snap(&s, "s2");
    qemu_io(&s, "qcow2", &["write -P 4 0 8k", "discard 4M 64k"]);
    v.push(s);

    let s = d.image("v2snap.qcow2", "compat=0.10", "4M", &["write -P 1 0 128k"]);
    snap(&s, "first");
    qemu_io(&s, "qcow2", &["write -P 9 0 64k"]);
    v.push(s);

    let c = d.compressed("csnap.qcow2", "");
    snap(&c, "s1");
    qemu_io(&c, "qcow2", &["write -P 9 64k 64k"]);
    v.push(c);

    let b = d.image("bitmaps.qcow2", "", "4M", &[]);
    qemu_img(&["bitmap", "--add", b.to_str().unwrap(), "b0"]);
    qemu_img(&["bitmap", "--add", b.to_str().unwrap(), "b1", "-g", "512k"]);
    qemu_io(&b, "qcow2", &["write -P 3 0 256k", "write -P 4 3M 64k"]);
    v.push(b);
    v
}

#[test]
fn images_made_by_qemu_check_clean_and_agree_with_qemu_img() {
    let d = Dir::new();
    for p in all_images(&d) {
        assert_clean(&p);
        // Repairing a clean image changes nothing.
        let before = read_file(&p);
        let r = check(&p, true).unwrap();
        assert!(r.repaired);
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
        assert_eq!(
            read_file(&p),
            before,
            "{}: repair of a clean image wrote",
            p.display()
        );
    }
}

/// Host clusters of the first bitmap's table and of its first data cluster, found through
/// the bitmaps header extension.
fn bitmap_clusters(img: &[u8]) -> (u64, u64) {
    let l = layout(img);
    let mut at = be32(img, 100) as usize;
    loop {
        let (ty, len) = (be32(img, at), be32(img, at + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            let dir = be64(img, at + 8 + 16) as usize;
            let table = be64(img, dir);
            let data = be64(img, table as usize) & 0x00ff_ffff_ffff_fe00;
            assert_ne!(data, 0, "the bitmap has no data cluster");
            return (table >> l.cluster_bits, data >> l.cluster_bits);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn bitmaps_are_counted() {
    let d = Dir::new();
    let b = d.image("bitmaps.qcow2", "", "4M", &[]);
    qemu_img(&["bitmap", "--add", b.to_str().unwrap(), "b0"]);
    qemu_io(&b, "qcow2", &["write -P 3 0 256k"]);
    assert_clean(&b);
    let (table, data) = bitmap_clusters(&read_file(&b));
    let r = damage_and_repair(&d, &b, "bitmap", |l, img| {
        let v = l.refcount(img, table);
        l.set_refcount(img, table, v + 1);
        l.set_refcount(img, data, 0);
    });
    assert_eq!((r.corruptions, r.leaks), (1, 1), "{r:?}");
    // The bitmap survives the repair.
    let info = qemu_img(&["info", d.path("bitmaps.qcow2.bitmap").to_str().unwrap()]);
    assert!(info.contains("name: b0"), "{info}");
}

/// Damages a copy of `src` with `damage`, compares our counts with qemu-img's, repairs and
/// verifies. Returns the report of the damaged image.
fn damage_and_repair(
    d: &Dir,
    src: &Path,
    tag: &str,
    damage: impl FnOnce(&Layout, &mut Vec<u8>),
) -> CheckReport {
    let name = src.file_name().unwrap().to_str().unwrap();
    let reference = d.copy(src, &format!("{name}.{tag}.ref"));
    let img = d.copy(src, &format!("{name}.{tag}"));
    edit(&img, damage);
    let found = assert_agrees(&img);
    assert!(
        found.corruptions + found.leaks > 0,
        "{tag} on {name}: nothing found"
    );
    let fixed = repair_and_verify(&img, &reference);
    assert_eq!(fixed.corruptions_fixed, found.corruptions, "{fixed:?}");
    assert_eq!(fixed.leaks_fixed, found.leaks, "{fixed:?}");
    found
}

#[test]
fn leaks_are_counted_like_qemu_and_repaired() {
    let d = Dir::new();
    for p in all_images(&d) {
        let img = read_file(&p);
        let l = layout(&img);
        if l.refcount_order == 0 {
            continue; // A 1-bit refcount cannot exceed 1.
        }
        // The header cluster: a plain leak.
        let r = damage_and_repair(&d, &p, "leak-header", |l, img| {
            let v = l.refcount(img, 0);
            l.set_refcount(img, 0, v + 3);
        });
        assert_eq!((r.leaks, r.corruptions), (1, 0), "{}", p.display());
        assert_eq!(r.leaked_clusters, vec![(0, 4, 1)]);
        assert!(r
            .to_string()
            .contains("1 leaked clusters were found on the image."));
        assert_eq!(r.exit_code(), 3);
        if be64(&img, l.l1_table_offset as usize) != 0 {
            // An L2 table: a leak, plus a COPIED flag that no longer matches (as QEMU says).
            damage_and_repair(&d, &p, "leak-l2", |l, img| {
                let c = l.first_l2_cluster(img);
                let v = l.refcount(img, c);
                l.set_refcount(img, c, v + 1);
            });
        }
    }
}

#[test]
fn lost_refcounts_are_counted_like_qemu_and_repaired() {
    let d = Dir::new();
    for p in all_images(&d) {
        let img = read_file(&p);
        let l = layout(&img);
        if be64(&img, l.l1_table_offset as usize) == 0 {
            continue;
        }
        let name = p.file_name().unwrap().to_str().unwrap();
        let r = damage_and_repair(&d, &p, "lost-l2", |l, img| {
            let c = l.first_l2_cluster(img);
            l.set_refcount(img, c, 0);
        });
        assert!(r.corruptions >= 1, "{name}: {r:?}");
        assert_eq!(r.exit_code(), 2);
        let c = l.first_l2_cluster(&img);
        assert_eq!(r.corrupt_clusters[0].0, c << l.cluster_bits, "{r:?}");
        if !name.starts_with("datafile")
            && !name.starts_with("compressed")
            && !name.starts_with("zstd")
            && !name.starts_with("csnap")
            && !name.starts_with("prealloc")
        {
            damage_and_repair(&d, &p, "lost-data", |l, img| {
                let c = l.first_data_cluster(img);
                l.set_refcount(img, c, 0);
            });
        }
    }
}

#[test]
fn wrong_copied_flags_are_counted_like_qemu_and_repaired() {
    let d = Dir::new();
    let flip_l2_entry = |l: &Layout, img: &mut Vec<u8>, bit: u64, compressed: bool| {
        let l2 = (l.first_l2_cluster(img) << l.cluster_bits) as usize;
        let esz = if l.extended_l2 { 16 } else { 8 };
        let j = (0..(1usize << l.cluster_bits) / esz)
            .find(|j| {
                let e = be64(img, l2 + j * esz);
                e != 0 && (e & (1 << 62) != 0) == compressed
            })
            .unwrap();
        let e = be64(img, l2 + j * esz) ^ bit;
        img[l2 + j * esz..l2 + j * esz + 8].copy_from_slice(&e.to_be_bytes());
    };
    let written = d.image("written.qcow2", "", "8M", WRITES);
    let r = damage_and_repair(&d, &written, "l2-copied", |l, img| {
        flip_l2_entry(l, img, 1 << 63, false)
    });
    assert_eq!((r.corruptions, r.leaks), (1, 0), "{r:?}");
    let r = damage_and_repair(&d, &written, "l1-copied", |l, img| {
        let at = l.l1_table_offset as usize;
        img[at] ^= 0x80;
    });
    assert_eq!((r.corruptions, r.leaks), (1, 0), "{r:?}");
    let comp = d.compressed("compressed.qcow2", "");
    let r = damage_and_repair(&d, &comp, "compressed-copied", |l, img| {
        flip_l2_entry(l, img, 1 << 63, true)
    });
    assert_eq!((r.corruptions, r.leaks), (1, 0), "{r:?}");
    // A snapshot shares the L2 table: COPIED must be clear while the refcount is 2.
    let snap = d.image("snap.qcow2", "", "8M", &["write -P 1 0 64k"]);
    qemu_img(&["snapshot", "-c", "s", snap.to_str().unwrap()]);
    let r = damage_and_repair(&d, &snap, "shared-copied", |l, img| {
        let at = l.l1_table_offset as usize;
        img[at] |= 0x80;
        flip_l2_entry(l, img, 1 << 63, false);
    });
    assert_eq!((r.corruptions, r.leaks), (2, 0), "{r:?}");
    // A shared data cluster whose refcount dropped to 1 and whose entry says COPIED: QEMU
    // sees one refcount error (the flag agrees with the stored refcount); the repair must
    // clear the flag as it raises the refcount back to 2.
    let r = damage_and_repair(&d, &snap, "shared-lost", |l, img| {
        let c = l.first_data_cluster(img);
        assert_eq!(l.refcount(img, c), 2);
        l.set_refcount(img, c, 1);
        flip_l2_entry(l, img, 1 << 63, false);
    });
    assert_eq!((r.corruptions, r.leaks), (1, 0), "{r:?}");
}

/// Two active L1 entries naming the same L2 table, one of whose data entries has lost its
/// COPIED flag: QEMU checks the table's flags once per L1 entry and counts the wrong flag
/// twice; the check counted it once.
#[test]
fn copied_flags_of_an_l2_table_named_twice_count_twice() {
    let d = Dir::new();
    let p = d.image("twice.qcow2", "cluster_size=4k", "4M", &["write -P 4 0 8k"]);
    edit(&p, |l, img| {
        let l1 = l.l1_table_offset as usize;
        assert_eq!(be64(img, l1 + 8), 0, "L1 entry 1 is unallocated");
        let first = be64(img, l1);
        img[l1 + 8..l1 + 16].copy_from_slice(&first.to_be_bytes());
        let l2 = (l.first_l2_cluster(img) << l.cluster_bits) as usize;
        let e = be64(img, l2);
        assert_ne!(e & (1 << 63), 0, "{e:#x}");
        img[l2..l2 + 8].copy_from_slice(&(e & !(1 << 63)).to_be_bytes());
    });
    let r = assert_agrees(&p);
    // The refcounts of the L2 table and of its two data clusters (1 for 2 references
    // each), and the flag once per L1 entry.
    assert_eq!((r.corruptions, r.leaks), (5, 0), "{r}\n{:#?}", r.messages);
}

#[test]
fn missing_refcount_block_is_rebuilt() {
    let d = Dir::new();
    for p in all_images(&d) {
        let r = damage_and_repair(&d, &p, "no-block", |l, img| {
            let rt = l.refcount_table_offset as usize;
            img[rt..rt + 8].fill(0);
        });
        assert!(r.corruptions > 0, "{r:?}");
        // The refcount table moved to the end of the file.
        let img = read_file(&p.with_file_name(format!(
            "{}.no-block",
            p.file_name().unwrap().to_str().unwrap()
        )));
        assert!(layout(&img).refcount_table_offset > layout(&read_file(&p)).refcount_table_offset);
    }
}

/// A refcount table too small for the file (its size field cut down) cannot hold the
/// refcounts in place: the structure is rebuilt, bigger.
#[test]
fn refcount_table_too_small_is_rebuilt() {
    let d = Dir::new();
    // 64 refcounts per 512-byte block, 64 blocks per table cluster: 2 MiB per table cluster.
    let p = d.image(
        "small-table.qcow2",
        "cluster_size=512,refcount_bits=64",
        "8M",
        &["write -P 5 0 3M"],
    );
    let clusters = be32(&read_file(&p), 56);
    assert!(clusters >= 2, "refcount table of {clusters} clusters");
    let r = damage_and_repair(&d, &p, "cut", |_, img| {
        img[56..60].copy_from_slice(&1u32.to_be_bytes());
    });
    assert!(r.corruptions > 0, "{r:?}");
    let fixed = read_file(&d.path("small-table.qcow2.cut"));
    assert!(be32(&fixed, 56) >= 2);
}

/// With 1-bit refcounts, a refcount table entry naming the active L1 table's cluster as a
/// refcount block: the block's reference overflows the width (one corruption, as QEMU counts
/// it) and the cluster's count stays at 1, so the sharing went unseen and the repair left
/// the overflow. The structure is rebuilt in clusters nothing uses, which ends the sharing
/// (QEMU's repair leaves the corruption).
#[test]
fn refcount_block_sharing_a_cluster_at_full_width_is_rebuilt() {
    let d = Dir::new();
    let src = d.image(
        "rc1.qcow2",
        "cluster_size=512,refcount_bits=1",
        "1M",
        &["write -P 9 0 4k"],
    );
    let p = d.copy(&src, "shared.qcow2");
    edit(&p, |l, img| {
        // Entry 6 covers clusters far past the end of the file: no refcount changes.
        let at = l.refcount_table_offset as usize + 6 * 8;
        assert_eq!(be64(img, at), 0);
        img[at..at + 8].copy_from_slice(&l.l1_table_offset.to_be_bytes());
    });
    let before = assert_agrees(&p);
    assert_eq!((before.corruptions, before.leaks), (1, 0), "{before}");
    let r = repair_and_verify(&p, &src);
    assert_eq!(r.corruptions_fixed, 1, "{r:?}");
}

/// With 1-bit refcounts, two L2 entries naming one data cluster: the second reference
/// overflows the width and the cluster counts 1, as if unshared. A repair by that width
/// (QEMU's) leaves the overflow and sets COPIED on both entries, so that a write through one
/// lands in place under the other; with COPIED clear, a write through one would copy the
/// cluster away and free it while the other still names it. The repair widens the refcounts
/// to 16 bits instead: the cluster counts 2, neither entry has COPIED, both checks find the
/// image clean, and a write through one reference leaves what the other reads.
#[test]
fn references_that_overflow_1_bit_refcounts_widen_them() {
    for copied in [true, false] {
        let d = Dir::new();
        let (p, shared) = two_names_for_one_cluster(&d, "", copied, false);
        let img = repair_widens(&p, (1, 16), shared, 2);
        let l = layout(&img);
        let l2 = (l.first_l2_cluster(&img) << l.cluster_bits) as usize;
        for at in [l2, l2 + 16 * 8] {
            assert_eq!(be64(&img, at), shared << l.cluster_bits, "entry at {at:#x}");
        }
        let image = open_writable(&p);
        image.write_at(&[0x33; 4096], 0).unwrap();
        let mut buf = vec![0u8; 4096];
        image.read_at(&mut buf, 64 << 10).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0x11),
            "the other reference changed"
        );
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x33));
        image.close().unwrap();
    }
}

/// An image with 1-bit refcounts (and `opts` besides) whose first L2 table names its first
/// data cluster (guest data 0x11 at 0) twice: from entry 0 and from entry 16 (guest offset
/// 64 KiB, whose own cluster leaks), with COPIED as in entry 0 or clear; `dirty` sets the
/// dirty bit. Returns the image and the shared host cluster.
fn two_names_for_one_cluster(d: &Dir, opts: &str, copied: bool, dirty: bool) -> (PathBuf, u64) {
    let p = d.image(
        "shared.qcow2",
        &format!("cluster_size=4096,refcount_bits=1{opts}"),
        "1M",
        &["write -P 0x11 0 4k", "write -P 0x22 64k 4k"],
    );
    let mut shared = 0;
    edit(&p, |l, img| {
        let l2 = (l.first_l2_cluster(img) << l.cluster_bits) as usize;
        let e = be64(img, l2);
        shared = (e & 0x00ff_ffff_ffff_fe00) >> l.cluster_bits;
        let e = if copied { e } else { e & !(1 << 63) };
        img[l2 + 16 * 8..l2 + 17 * 8].copy_from_slice(&e.to_be_bytes());
        if dirty {
            // Incompatible feature bit 0, the last byte of the big-endian field at 72.
            img[79] |= 1;
        }
    });
    (p, shared)
}

/// The same damage under the dirty bit (lazy refcounts): opening the image for writing
/// repairs it, and the repair widens its refcounts there too.
#[test]
fn a_dirty_image_whose_references_overflow_is_widened_when_opened() {
    let d = Dir::new();
    let (p, _) = two_names_for_one_cluster(&d, ",lazy_refcounts=on", true, true);
    open_writable(&p).close().unwrap();
    let img = read_file(&p);
    assert_eq!(layout(&img).refcount_order, 4);
    assert_eq!(be64(&img, 72) & 1, 0, "still dirty");
    assert_clean(&p);
    let q = qemu_check(&p);
    assert_eq!(q.exit, 0, "qemu-img check: {}{}", q.json, q.stderr);
}

/// With 16-bit refcounts, one data cluster named by 65,536 L2 entries (128 full tables): one
/// reference more than the width counts. The repair widens the refcounts to 32 bits.
#[test]
fn references_that_overflow_16_bit_refcounts_widen_them_to_32_bits() {
    let d = Dir::new();
    let writes: Vec<String> = (0..128)
        .map(|i| format!("write -P {} {}M 4k", i + 1, i * 2))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    let p = d.image("wide.qcow2", "cluster_size=4096", "256M", &writes);
    let mut shared = 0;
    edit(&p, |l, img| {
        let first = be64(img, (l.first_l2_cluster(img) << l.cluster_bits) as usize);
        shared = (first & 0x00ff_ffff_ffff_fe00) >> l.cluster_bits;
        let entry = (first & !(1 << 63)).to_be_bytes();
        for i in 0..128 {
            let l2 = be64(img, l.l1_table_offset as usize + i * 8) & 0x00ff_ffff_ffff_fe00;
            assert_ne!(l2, 0, "L1 entry {i}");
            for j in 0..512 {
                let at = l2 as usize + j * 8;
                img[at..at + 8].copy_from_slice(&entry);
            }
        }
    });
    repair_widens(&p, (16, 32), shared, 1 << 16);
}

/// Checks the damaged image at `p` (as QEMU does: the overflow is a corruption), repairs it,
/// and asserts that the repair widened its refcounts from `bits.0` to `bits.1` bits, that both
/// checks find it clean, and that cluster `shared` counts `refs`. Returns the image's bytes.
fn repair_widens(p: &Path, bits: (u32, u32), shared: u64, refs: u64) -> Vec<u8> {
    let before = assert_agrees(p);
    assert!(before.corruptions > 0, "{before}");
    let r = check(p, true).unwrap();
    let widened = format!("Widened the refcounts from {} to {} bits", bits.0, bits.1);
    assert!(
        r.messages.iter().any(|m| m.starts_with(&widened)),
        "{:?}",
        r.messages
    );
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r}");
    assert_clean(p);
    let q = qemu_check(p);
    assert_eq!(q.exit, 0, "qemu-img check: {}{}", q.json, q.stderr);
    let img = read_file(p);
    let l = layout(&img);
    assert_eq!(1 << l.refcount_order, bits.1);
    assert_eq!(l.refcount(&img, shared), refs);
    img
}

/// A refcount structure to rebuild, free clusters inside the file (discarded data), and an
/// L2 entry pointing at the cluster just past the end of the file. A new structure appended
/// to the file would land where that entry points, so the rebuild was refused and every
/// refcount error stayed; it now goes into the free clusters, as QEMU's does, and only the
/// reference past the end of the file remains. The old refcount block stays untouched even
/// where the check does not count it (its table entry has a reserved bit set): QEMU's repair
/// refuses that case (its overlap check stops it), ours places the new block elsewhere.
#[test]
fn rebuild_uses_free_clusters_when_a_reference_points_past_the_end() {
    let d = Dir::new();
    let src = d.image(
        "gap.qcow2",
        "cluster_size=512",
        "1M",
        &["write -P 7 0 8k", "discard 0 2k"],
    );
    let len = std::fs::metadata(&src).unwrap().len();
    for (tag, reserved_bit) in [("reserved", true), ("zeroed", false)] {
        let damage = |l: &Layout, img: &mut Vec<u8>| {
            let rt = l.refcount_table_offset as usize;
            if reserved_bit {
                img[rt + 7] |= 1;
            } else {
                img[rt..rt + 8].fill(0);
            }
            // An unallocated entry of the first L2 table now names the cluster at the end.
            let l2 = (l.first_l2_cluster(img) << l.cluster_bits) as usize;
            let at = l2 + 30 * 8;
            assert_eq!(be64(img, at), 0);
            let end = (img.len() as u64).next_multiple_of(1 << l.cluster_bits);
            img[at..at + 8].copy_from_slice(&end.to_be_bytes());
        };
        let ours = d.copy(&src, &format!("{tag}.ours.qcow2"));
        let theirs = d.copy(&src, &format!("{tag}.theirs.qcow2"));
        edit(&ours, damage);
        edit(&theirs, damage);
        let damaged = read_file(&ours);
        let l = layout(&damaged);
        let old_block = (be64(&read_file(&src), l.refcount_table_offset as usize)) as usize;
        let cs = 1usize << l.cluster_bits;
        let before = check(&ours, false).unwrap();
        assert!(before.corruptions + before.leaks > 1, "{tag}: {before:?}");
        let r = check(&ours, true).unwrap();
        let msgs = r.messages.join("\n");
        assert_eq!((r.corruptions, r.leaks), (1, 0), "{tag}: {r:?}\n{msgs}");
        assert!(!msgs.contains("Not rebuilding"), "{tag}: {msgs}");
        // Inside the file: it did not grow.
        let img = read_file(&ours);
        assert_eq!(img.len() as u64, len, "{tag}");
        assert!(layout(&img).refcount_table_offset < len, "{tag}");
        if reserved_bit {
            assert_eq!(
                img[old_block..old_block + cs],
                damaged[old_block..old_block + cs],
                "the old refcount block was written over"
            );
        }
        let q = qemu_check(&ours);
        assert_eq!(
            (q.corruptions, q.leaks),
            (1, 0),
            "{tag}: {}{}",
            q.json,
            q.stderr
        );
        let _ = output(
            qemu_img_cmd()
                .args(["check", "-q", "-r", "all", "-f", "qcow2"])
                .arg(&theirs),
        );
        let q = qemu_check(&theirs);
        if reserved_bit {
            assert!(
                (q.corruptions, q.leaks) > (1, 0),
                "{tag}: {}{}",
                q.json,
                q.stderr
            );
        } else {
            assert_eq!(
                (q.corruptions, q.leaks),
                (1, 0),
                "{tag}: {}{}",
                q.json,
                q.stderr
            );
        }
    }
}

/// A file cut inside its active L1 table (grown by a resize, so at the end of the file;
/// its entries past the cut are zeros), and a refcount table entry with a reserved bit set:
/// the refcount structure must be rebuilt, the file has one free cluster for it and the L1
/// table runs over every place after it. A new structure appended to the file would bring
/// the table within a cluster of the end, where it counts (and QEMU's repair, which writes
/// there, stops at its overlap check), so the rebuild was refused and every error stayed.
/// The repair now grows the file past the table's end, counts the table there, and lays the
/// new structure out around it: the image ends clean on both sides, its data unchanged.
#[test]
fn rebuild_grows_the_file_past_a_table_cut_by_its_end() {
    let d = Dir::new();
    let src = d.image("cut.qcow2", "cluster_size=512", "1M", &["write -P 7 0 64k"]);
    qemu_img(&["resize", "-q", src.to_str().unwrap(), "64M"]);
    let img = read_file(&src);
    let l = layout(&img);
    let l1_end = l.l1_table_offset + u64::from(be32(&img, 36)) * 8;
    assert_eq!(l1_end, img.len() as u64, "the resize put the L1 table last");
    let p = d.copy(&src, "cut.qcow2.damaged");
    edit(&p, |l, img| {
        img.truncate(l.l1_table_offset as usize + 1024);
        img[l.refcount_table_offset as usize + 7] |= 1;
    });
    let before = assert_agrees(&p);
    assert_eq!((before.corruptions, before.leaks), (2, 3), "{before}");
    let r = repair_and_verify(&p, &src);
    let msgs = r.messages.join("\n");
    assert!(msgs.contains("Growing the file"), "{msgs}");
    assert!(std::fs::metadata(&p).unwrap().len() >= l1_end);
}

/// An L2 entry of a preallocated zero cluster at a misaligned offset whose cluster-sized
/// region straddles the L1 table and the L2 table that holds it: both tables then count one
/// reference too many, so the repair took them for shared metadata and rewrote neither (the
/// entry, and the COPIED flags that depend on it, stayed wrong). The entry's own reference
/// holds no data and is dropped by the repair: the table is rewritten, as QEMU does, and
/// the image ends clean on both sides.
#[test]
fn misaligned_zero_entry_over_its_own_tables_is_repaired() {
    let d = Dir::new();
    let src = d.image("z.qcow2", "cluster_size=4k", "1M", &["write -P 3 0 8k"]);
    let damage = |l: &Layout, img: &mut Vec<u8>| {
        let cs = 1u64 << l.cluster_bits;
        let l2 = l.first_l2_cluster(img) << l.cluster_bits;
        assert_eq!(
            l2,
            l.l1_table_offset + cs,
            "the L2 table follows the L1 table"
        );
        let at = (l2 + 5 * 8) as usize;
        assert_eq!(be64(img, at), 0);
        // Preallocated zeros at half a cluster into the L1 table: it reaches the L2 table.
        let entry = (l.l1_table_offset + cs / 2) | 1;
        img[at..at + 8].copy_from_slice(&entry.to_be_bytes());
    };
    let ours = d.copy(&src, "ours.qcow2");
    let theirs = d.copy(&src, "theirs.qcow2");
    edit(&ours, damage);
    edit(&theirs, damage);
    let before = assert_agrees(&ours);
    assert!(before.corruptions >= 3, "{before:?}");
    let r = check(&ours, true).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks),
        (0, 0),
        "{r:?}\n{}",
        r.messages.join("\n")
    );
    assert_clean(&ours);
    let _ = output(
        qemu_img_cmd()
            .args(["check", "-q", "-r", "all", "-f", "qcow2"])
            .arg(&theirs),
    );
    let q = qemu_check(&theirs);
    assert_eq!((q.corruptions, q.leaks), (0, 0), "{}{}", q.json, q.stderr);
    let out = output(
        qemu_img_cmd()
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&src)
            .arg(&ours),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn dirty_image_with_stale_refcounts_is_repaired_and_marked_clean() {
    let d = Dir::new();
    let p = d.image(
        "lazy.qcow2",
        "lazy_refcounts=on",
        "4M",
        &["write -P 7 0 200k", "write -P 8 2M 64k"],
    );
    let reference = d.copy(&p, "lazy.ref");
    edit(&p, |l, img| {
        img[79] |= 1; // Incompatible bit 0: dirty.
        let c = l.first_data_cluster(img);
        l.set_refcount(img, c, 0);
        let last = (img.len() as u64 - 1) >> l.cluster_bits;
        let v = l.refcount(img, last);
        l.set_refcount(img, last, v + 1);
    });
    let r = assert_agrees(&p);
    assert!(r.corruptions > 0 && r.leaks == 1, "{r:?}");
    assert!(r.messages.iter().any(|m| m.contains("dirty")), "{r:?}");
    let fixed = repair_and_verify(&p, &reference);
    assert_eq!(read_file(&p)[79] & 3, 0, "dirty bit still set: {fixed:?}");
}

#[test]
fn corrupt_bit_is_cleared_by_repair() {
    let d = Dir::new();
    let p = d.image("c.qcow2", "", "4M", &["write -P 7 0 200k"]);
    let reference = d.copy(&p, "c.ref");
    edit(&p, |l, img| {
        img[79] |= 2; // Incompatible bit 1: corrupt.
        let v = l.refcount(img, 0);
        l.set_refcount(img, 0, v + 1);
    });
    // qemu-img check refuses nothing for a corrupt-marked image opened read-only.
    let r = check(&p, false).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{r:?}");
    repair_and_verify(&p, &reference);
    assert_eq!(read_file(&p)[79] & 3, 0);
}

#[test]
fn repair_refuses_an_image_in_use() {
    let d = Dir::new();
    let p = d.image("busy.qcow2", "", "4M", &["write -P 1 0 64k"]);
    let img = open_writable(&p);
    let e = check(&p, true).unwrap_err();
    assert_eq!(e.kind(), qcow2d_engine::ErrorKind::Locked, "{e}");
    drop(img);
    assert_eq!(check(&p, true).unwrap().exit_code(), 0);
}

#[test]
fn not_an_image_is_an_error() {
    let d = Dir::new();
    let p = d.path("junk");
    std::fs::write(&p, vec![7u8; 4096]).unwrap();
    assert!(check(&p, false).is_err());
    assert!(check(&p, true).is_err());
    assert!(check(&d.path("missing"), false).is_err());
}

/// Random damage to metadata: our check never panics and counts exactly what `qemu-img check`
/// counts (both refuse the same images); after our repair both checks agree again, and when
/// ours finds the image clean, so does QEMU's.
#[test]
fn random_damage_is_counted_like_qemu() {
    let d = Dir::new();
    let sources = [
        d.image(
            "snap.qcow2",
            "cluster_size=4k",
            "1M",
            &["write -P 1 0 256k"],
        ),
        d.compressed("comp.qcow2", "cluster_size=4k"),
        d.image(
            "ext.qcow2",
            "extended_l2=on,cluster_size=16k",
            "1M",
            &["write -P 1 0 100k", "write -z 300k 20k"],
        ),
    ];
    qemu_img(&["snapshot", "-c", "s", sources[0].to_str().unwrap()]);
    qemu_io(&sources[0], "qcow2", &["write -P 2 0 64k"]);
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let mut repaired_clean = 0;
    for (k, src) in sources.iter().enumerate() {
        let len = read_file(src).len() as u64;
        for round in 0..30 {
            let p = d.copy(src, &format!("fuzz-{k}-{round}"));
            edit(&p, |_, img| {
                for _ in 0..1 + next() % 8 {
                    // Metadata lives mostly in the first clusters; hit them more often.
                    let span = if next() % 2 == 0 { 64 << 10 } else { len };
                    let at = (next() % span.min(len)) as usize;
                    img[at] ^= 1 << (next() % 8);
                }
            });
            let ours = check(&p, false);
            let q = qemu_check(&p);
            let ctx = format!(
                "round {k}/{round}: ours {ours:?}\nqemu: {}{}",
                q.json, q.stderr
            );
            assert_eq!(ours.is_err(), q.exit == 1, "{ctx}");
            let Ok(ours) = ours else { continue };
            if q.check_errors == 0 {
                assert_eq!(
                    (ours.corruptions, ours.leaks, ours.image_end_offset),
                    (q.corruptions, q.leaks, q.image_end_offset),
                    "{ctx}"
                );
            }
            let r = check(&p, true).unwrap_or_else(|e| panic!("{ctx}\nrepair: {e}"));
            let after = assert_agrees(&p);
            assert_eq!((after.corruptions, after.leaks), (r.corruptions, r.leaks));
            if r.corruptions == 0 {
                repaired_clean += 1;
                assert_ne!(qemu_check(&p).exit, 2, "{ctx}");
            }
        }
    }
    assert!(
        repaired_clean > 30,
        "only {repaired_clean} images were repaired"
    );
}

/// The child of [`engine_killed_with_lazy_refcounts_is_repaired`]: writes through the engine
/// with lazy refcounts (so refcount blocks stay in memory and the dirty bit is set), says it
/// is done, and waits to be killed.
#[test]
fn lazy_writer_child() {
    let Ok(spec) = std::env::var("QCOW2D_CHECK_LAZY_CHILD") else {
        return;
    };
    let (image, ready) = spec.split_once(',').unwrap();
    let img = Image::open(
        image,
        &OpenOptions {
            read_only: false,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..24u64 {
        img.write_at(&vec![i as u8 + 1; 48 << 10], i * (300 << 10))
            .unwrap();
    }
    std::fs::write(ready, b"ok").unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What the daemon's repair is for: an image the engine was writing with lazy refcounts when
/// it was killed. Both checks see the same stale refcounts; our repair makes it clean, clears
/// the dirty bit, and keeps every guest byte (compared with a copy taken before the repair,
/// and with the same image repaired by `qemu-img check -r all`).
#[test]
fn engine_killed_with_lazy_refcounts_is_repaired() {
    let d = Dir::new();
    let p = d.image(
        "lazy-engine.qcow2",
        "lazy_refcounts=on",
        "8M",
        &["write -P 9 0 64k"],
    );
    let ready = d.path("ready");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lazy_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "QCOW2D_CHECK_LAZY_CHILD",
            format!("{},{}", p.display(), ready.display()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the writer exited before it was killed: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "writer hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(
        read_file(&p)[79] & 1,
        1,
        "the engine did not set the dirty bit"
    );
    let found = assert_agrees(&p);
    assert!(found.corruptions > 0, "{found:?}");
    let reference = d.copy(&p, "lazy-engine.ref");
    let by_qemu = d.copy(&p, "lazy-engine.qemu");
    repair_and_verify(&p, &reference);
    assert_eq!(read_file(&p)[79] & 3, 0, "dirty bit still set");

    let q = output(
        qemu_img_cmd()
            .args(["check", "-q", "-r", "all", "-f", "qcow2"])
            .arg(&by_qemu),
    );
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        by_qemu.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
}
