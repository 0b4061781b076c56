//! Metadata overlap checks: damaged refcounts and tables never make a write land on metadata.
//! Each case damages an image made by qemu-img the way a bad disk or a buggy tool would, then
//! writes through the engine: the write fails, the image is marked corrupt, the header and the
//! data written before stay as they were, and `qemu-img check` still reads the image.

use qcow2d_engine::{ErrorKind, Image, OpenOptions, OverlapCheck};
use qcow2d_tests::{
    assert_clean_and_equal, create_qcow2_in, oracle, qemu_img, qemu_img_cmd, qemu_io,
};
use std::path::Path;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Overwrites `bytes` at `at` of the file.
fn poke(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_rw(path: &Path, mode: OverlapCheck) -> Image {
    Image::open(
        path,
        &OpenOptions {
            read_only: false,
            overlap_check: mode,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A 64 MiB image (64 KiB clusters) with 64 KiB of 0xa5 at 0 and at 4 MiB.
fn image_with_data(dir: &Path) -> std::path::PathBuf {
    let p = create_qcow2_in(dir, "d.qcow2", "", "64M");
    qemu_io(&p, "qcow2", &["write -P 0xa5 0 64k"]);
    qemu_io(&p, "qcow2", &["write -P 0xa5 4M 64k"]);
    p
}

/// The write was refused and the image is what it was, marked corrupt: the header and the
/// refcount table where they were, qemu-img still checks it (reporting corruption), and
/// the data at 4 MiB reads back.
fn assert_refused_and_intact(path: &Path, header: &[u8], result: Result<(), qcow2d_engine::Error>) {
    let err = result.expect_err("a write over metadata must fail");
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"QFI\xfb", "the header is intact");
    assert_eq!(bytes[79] & 2, 2, "the corrupt bit is set");
    let mut expected = header.to_vec();
    expected[79] |= 2;
    assert_eq!(
        &bytes[..header.len()],
        &expected[..],
        "only the corrupt bit changed in the header"
    );
    let out = qemu_img_cmd()
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "qemu-img check does not read the image ({e}): {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(v.get("check-errors").is_none_or(|n| n == 0), "{text}");
    // The data written before reads back (through QEMU).
    let data = oracle(path);
    assert!(data[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0xa5));
    // The engine still reads it; writes are refused.
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 4 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));
    drop(img);
    let e = Image::open(
        path,
        &OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .err()
    .expect("a corrupt image is not opened for writing");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

fn header_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let len = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    bytes[..len].to_vec()
}

/// Writes 1 MiB at 0: its first cluster is allocated, the rest needs new clusters.
fn write_1m_at_0(img: &Image) -> Result<(), qcow2d_engine::Error> {
    img.write_at(&vec![0x5au8; 1 << 20], 0)
}

#[test]
fn zeroed_refcount_table_entry_never_lets_a_write_land_on_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = image_with_data(dir.path());
    let rt = be64(&header_bytes(&p), 48);
    assert_eq!(rt, 0x10000);
    poke(&p, rt, &[0; 8]);
    let header = header_bytes(&p);
    let img = open_rw(&p, OverlapCheck::default());
    let result = write_1m_at_0(&img);
    drop(img);
    assert_refused_and_intact(&p, &header, result);
}

#[test]
fn zeroed_refcount_block_never_lets_a_write_land_on_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = image_with_data(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    let block = be64(&bytes, be64(&bytes, 48) as usize);
    poke(&p, block, &vec![0u8; 65536]);
    let header = header_bytes(&p);
    let img = open_rw(&p, OverlapCheck::Constant);
    let result = write_1m_at_0(&img);
    drop(img);
    assert_refused_and_intact(&p, &header, result);
}

#[test]
fn unallocated_header_cluster_is_never_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = image_with_data(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    let block = be64(&bytes, be64(&bytes, 48) as usize);
    poke(&p, block, &[0, 0]); // refcount of cluster 0 (16-bit entries)
    let header = header_bytes(&p);
    let img = open_rw(&p, OverlapCheck::Cached);
    let result = write_1m_at_0(&img);
    drop(img);
    assert_refused_and_intact(&p, &header, result);
}

/// Points the active L2 entry of guest cluster 0 at host `target`, with the COPIED flag, so
/// that a guest write there goes in place onto `target`.
fn point_guest_cluster_0_at(p: &Path, target: u64) {
    let bytes = std::fs::read(p).unwrap();
    let l1 = be64(&bytes, 40) as usize;
    let l2 = be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    poke(p, l2, &((1u64 << 63) | target).to_be_bytes());
}

#[test]
fn guest_write_onto_active_metadata_fails() {
    for (mode, target_of) in [
        (OverlapCheck::Constant, "l1"),
        (OverlapCheck::Cached, "block"),
        (OverlapCheck::Cached, "l2"),
        (OverlapCheck::All, "refcount"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = image_with_data(dir.path());
        let bytes = std::fs::read(&p).unwrap();
        let l1 = be64(&bytes, 40);
        let target = match target_of {
            "l1" => l1,
            "block" => be64(&bytes, be64(&bytes, 48) as usize),
            "l2" => be64(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00,
            _ => be64(&bytes, 48),
        };
        point_guest_cluster_0_at(&p, target);
        let bytes = std::fs::read(&p).unwrap();
        let header = header_bytes(&p);
        let img = open_rw(&p, mode);
        let result = img.write_at(&[0x5a; 4096], 0);
        drop(img);
        assert_refused_and_intact(&p, &header, result);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(
            &after[target as usize..target as usize + 4096],
            &bytes[target as usize..target as usize + 4096],
            "{mode}: the {target_of} table is untouched"
        );
    }
}

/// An image with an internal snapshot: the snapshot's L1 table and the L2 table it shares
/// no longer with the active L1 (a write after the snapshot copied it).
fn image_with_snapshot(dir: &Path) -> (std::path::PathBuf, u64, u64) {
    let p = image_with_data(dir);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    qemu_io(&p, "qcow2", &["write -P 0xbb 64k 64k"]);
    let bytes = std::fs::read(&p).unwrap();
    let snapshots = be64(&bytes, 64) as usize;
    let snap_l1 = be64(&bytes, snapshots);
    let snap_l2 = be64(&bytes, snap_l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let active_l2 = be64(&bytes, be64(&bytes, 40) as usize) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(
        snap_l2, active_l2,
        "the write after the snapshot copied the table"
    );
    (p, snap_l1, snap_l2)
}

#[test]
fn guest_write_onto_a_snapshot_s_tables() {
    // A snapshot's L1 table is checked from `cached` on.
    let dir = tempfile::tempdir().unwrap();
    let (p, snap_l1, _) = image_with_snapshot(dir.path());
    point_guest_cluster_0_at(&p, snap_l1);
    let header = header_bytes(&p);
    let img = open_rw(&p, OverlapCheck::Cached);
    let result = img.write_at(&[0x5a; 4096], 0);
    drop(img);
    assert_refused_and_intact(&p, &header, result);

    // A snapshot's L2 table only in `all` (checking it means reading every snapshot's L1
    // table); `cached` lets the write through, as QEMU's `cached` does.
    let dir = tempfile::tempdir().unwrap();
    let (p, _, snap_l2) = image_with_snapshot(dir.path());
    point_guest_cluster_0_at(&p, snap_l2);
    let header = header_bytes(&p);
    let img = open_rw(&p, OverlapCheck::All);
    let result = img.write_at(&[0x5a; 4096], 0);
    drop(img);
    assert_refused_and_intact(&p, &header, result);

    let dir = tempfile::tempdir().unwrap();
    let (p, _, snap_l2) = image_with_snapshot(dir.path());
    point_guest_cluster_0_at(&p, snap_l2);
    let img = open_rw(&p, OverlapCheck::Cached);
    img.write_at(&[0x5a; 4096], 0).unwrap();
    drop(img);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        after[snap_l2 as usize], 0x5a,
        "cached does not check snapshot L2 tables"
    );
}

#[test]
fn healthy_images_take_writes_in_every_mode() {
    for mode in [
        OverlapCheck::None,
        OverlapCheck::Constant,
        OverlapCheck::Cached,
        OverlapCheck::All,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (p, _, _) = image_with_snapshot(dir.path());
        let mut model = oracle(&p);
        let img = open_rw(&p, mode);
        let data: Vec<u8> = (0..(3u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        img.write_at(&data, 1 << 20).unwrap();
        img.write_at(&data[..65536], 0).unwrap();
        img.close().unwrap();
        drop(img);
        model[1 << 20..4 << 20].copy_from_slice(&data);
        model[..65536].copy_from_slice(&data[..65536]);
        assert_clean_and_equal(&p, &model, dir.path());
    }
}
