//! Metadata overlap checks through the socket: the real `qcow2d serve` binary and the `blkio`
//! client. An image whose refcounts or tables were damaged is served writable; a write that
//! would land on metadata fails with VIRTIO_BLK_S_IOERR, later writes fail too while reads go
//! on, the header keeps its content with the corrupt bit set, `qemu-img check` still reads
//! the image (and reports the damage), and what was written before reads back.

use qcow2d_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// A 64 MiB image (64 KiB clusters) with 64 KiB of 0xa5 at 0 and at 4 MiB.
fn image_with_data(s: &Scratch) -> PathBuf {
    let img = s.join("d.qcow2");
    create_qcow2(&img, 64 * MIB, "");
    write_pattern(&img, "qcow2", 0xa5, 0, 65536);
    write_pattern(&img, "qcow2", 0xa5, 4 * MIB, 65536);
    img
}

fn header(img: &Path) -> Vec<u8> {
    let len = be32(img, 100) as usize;
    read_bytes(img, 0, len)
}

/// Serves `img` writable with `extra` options; a 1 MiB write at `write_at` must fail, a
/// second write too, while the data at 4 MiB still reads back through the socket. Then the
/// image must be intact apart from the corrupt bit.
fn refused_through_the_socket(s: &Scratch, img: &Path, extra: &[&str], write_at: u64) {
    let before = header(img);
    let socket = s.socket("o.sock");
    let mut d = Daemon::start_writable(img, &socket, extra)
        .unwrap_or_else(|f| panic!("qcow2d serve {}: {f}", img.display()));
    let results = rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        let first = c.run_batch(&[BlkOp::Write {
            off: write_at,
            data: vec![0x5a; MIB as usize],
        }])?;
        let second = c.run_batch(&[BlkOp::Write {
            off: 8 * MIB,
            data: vec![0x5b; 65536],
        }])?;
        let read = c.read_range(4 * MIB, 65536)?;
        Ok((first, second, read))
    })
    .unwrap_or_else(|e| panic!("{e}\nqcow2d stderr:\n{}", d.stderr()));
    let (first, second, read) = results;
    assert!(first[0].is_err(), "a write over metadata must fail");
    assert!(second[0].is_err(), "the image takes no more writes");
    assert!(read.iter().all(|&b| b == 0xa5), "reads go on");
    d.assert_alive("after a write over metadata");
    let stderr = d.stderr();
    assert!(
        stderr.contains("would overlap") && stderr.contains("marking the image corrupt"),
        "the log names the structure: {stderr}"
    );
    let _ = d.terminate();

    let after = header(img);
    let mut expected = before.clone();
    expected[79] |= 2;
    assert_eq!(
        after, expected,
        "the header is intact, with the corrupt bit set"
    );
    assert!(corrupt_bit(img));
    let (code, report) = qemu_img_check(img, None);
    assert_eq!(
        code, 2,
        "qemu-img check reads the image and reports corruption: {report}"
    );
    let data = oracle(img);
    assert!(data[4 * MIB as usize..4 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0xa5));
    assert!(data[8 * MIB as usize..8 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn zeroed_refcount_table_entry() {
    let s = Scratch::new("ov_rt");
    let img = image_with_data(&s);
    let rt = be64(&img, 48);
    write_bytes(&img, rt, &[0; 8]);
    refused_through_the_socket(&s, &img, &[], 0);
}

#[test]
fn zeroed_refcount_block_with_overlap_check_constant() {
    let s = Scratch::new("ov_rb");
    let img = image_with_data(&s);
    let block = be64(&img, be64(&img, 48));
    write_bytes(&img, block, &[0; 65536]);
    refused_through_the_socket(&s, &img, &["--overlap-check", "constant"], 0);
}

#[test]
fn unallocated_header_cluster() {
    let s = Scratch::new("ov_hdr");
    let img = image_with_data(&s);
    let block = be64(&img, be64(&img, 48));
    write_bytes(&img, block, &[0, 0]);
    refused_through_the_socket(&s, &img, &["--overlap-check", "cached"], 0);
}

#[test]
fn guest_write_onto_a_snapshot_s_l2_table_with_overlap_check_all() {
    let s = Scratch::new("ov_snap");
    let img = image_with_data(&s);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    write_pattern(&img, "qcow2", 0xbb, 65536, 65536);
    // The snapshot's L2 table, no longer shared with the active L1 after that write; the
    // active entry of guest cluster 2 MiB... points at it with the COPIED flag.
    let snap_l1 = be64(&img, be64(&img, 64));
    let snap_l2 = be64(&img, snap_l1) & 0x00ff_ffff_ffff_fe00;
    let active_l2 = be64(&img, be64(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(snap_l2, active_l2);
    set_be64(&img, active_l2 + 8 * 32, (1 << 63) | snap_l2);
    let table = read_bytes(&img, snap_l2, 65536);
    refused_through_the_socket(&s, &img, &["--overlap-check", "all"], 2 * MIB);
    assert_eq!(
        read_bytes(&img, snap_l2, 65536),
        table,
        "the snapshot's table is intact"
    );
}
