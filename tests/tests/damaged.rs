//! Damaged images against QEMU: the corruption families of QEMU's qcow2 iotests (060, 061,
//! 080, 108, 138, 217, 261, 271), made the way those tests make them (`qemu-img create`,
//! `qemu-io` writes, then bytes poked into the file), and a randomized test that damages
//! metadata bytes from a seed.
//!
//! Every case runs QEMU on one copy and qcow2d on another, and compares:
//! - open: `qemu-img info` against `qcow2d info` (and the engine, and a read-only
//!   `qcow2d serve`): both open it, or both refuse;
//! - reads, 1 MiB at a time over the disk: `qemu-io -r` against the engine and the socket,
//!   chunk by chunk, failed or not, and the bytes where both succeed;
//! - `qemu-img check` against `qcow2d check`: the same exit class (0 clean, 2 corruptions,
//!   3 leaks only, 1 not completed);
//! - `qemu-img check -r all` against `qcow2d check --repair`: wherever QEMU's copy ends clean,
//!   `qemu-img check` must find qcow2d's clean too, holding the same data;
//! - `qcow2d info`, `qcow2d check` and a read-only `qcow2d serve` leave the file's bytes and
//!   mtime as they were.
//!
//! Adding a family is one row of the table. A row may name a documented deviation where
//! qcow2d is stricter than QEMU for a reason the row states.

use qcow2d_tests::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// Offsets of a fresh 64 KiB-cluster image made by `qemu-img create` (as the iotests assume).
const RT: u64 = 0x10000;
const RB: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

/// Where qcow2d is allowed to differ from QEMU, and why (said in the row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deviation {
    /// Same outcomes everywhere.
    None,
    /// qcow2d refuses at open what QEMU opens (reads are not compared).
    RefusesOpen,
    /// Reads QEMU answers fail in qcow2d (open, check and repair are compared).
    StricterReads,
    /// qcow2d refuses to open for writing what QEMU opens read-write (everything else is
    /// compared).
    RefusesWrites,
}

/// One corruption family.
struct Family {
    /// The iotest it comes from.
    iotest: &'static str,
    name: &'static str,
    /// Makes the damaged image at the path.
    build: fn(&Path),
    deviation: Deviation,
    /// Why the deviation is right (empty without one).
    why: &'static str,
}

// ---- building blocks ------------------------------------------------------------------------

fn create(img: &Path, size: &str, opts: &str) {
    let o = if opts.is_empty() {
        "compat=1.1".to_owned()
    } else {
        format!("compat=1.1,{opts}")
    };
    let _ = fs::remove_file(img);
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        o.as_str().as_ref(),
        img.as_os_str(),
        size.as_ref(),
    ]);
}

fn create_v2(img: &Path, size: &str) {
    let _ = fs::remove_file(img);
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "compat=0.10".as_ref(),
        img.as_os_str(),
        size.as_ref(),
    ]);
}

fn io(img: &Path, cmds: &[&str]) {
    qemu_io(img, "qcow2", cmds);
}

fn snapshot(img: &Path, name: &str) {
    qemu_img(&[
        "snapshot".as_ref(),
        "-c".as_ref(),
        name.as_ref(),
        img.as_os_str(),
    ]);
}

fn poke(img: &Path, off: u64, bytes: &[u8]) {
    write_bytes(img, off, bytes);
}

fn be16_at(img: &Path, off: u64) -> u16 {
    let b = read_bytes(img, off, 2);
    u16::from_be_bytes([b[0], b[1]])
}

/// Offsets of the snapshot table's entries.
fn snapshot_entries(img: &Path) -> Vec<u64> {
    let nb = be32(img, 60);
    let mut off = be64(img, 64);
    let mut v = Vec::new();
    for _ in 0..nb {
        off = off.next_multiple_of(8);
        v.push(off);
        let id = u64::from(be16_at(img, off + 12));
        let name = u64::from(be16_at(img, off + 14));
        let extra = u64::from(be32(img, off + 36));
        off += 40 + extra + id + name;
    }
    v
}

/// Rewrites the snapshot table in place with entry `k`'s extra data cut to `extra` bytes.
fn cut_snapshot_extra(img: &Path, k: usize, extra: u32) {
    let start = be64(img, 64);
    let mut out = Vec::new();
    for (i, off) in snapshot_entries(img).into_iter().enumerate() {
        out.resize(out.len().next_multiple_of(8), 0);
        let mut fixed = read_bytes(img, off, 40);
        let id = u64::from(be16_at(img, off + 12));
        let name = u64::from(be16_at(img, off + 14));
        let old = be32(img, off + 36);
        let keep = if i == k { extra.min(old) } else { old };
        fixed[36..40].copy_from_slice(&keep.to_be_bytes());
        out.extend_from_slice(&fixed);
        out.extend(read_bytes(img, off + 40, keep as usize));
        out.extend(read_bytes(
            img,
            off + 40 + u64::from(old),
            (id + name) as usize,
        ));
    }
    poke(img, start, &out);
}

// ---- the families ---------------------------------------------------------------------------

fn l2_into_l1(img: &Path) {
    create(img, "64M", "");
    poke(img, L1, &0x8000_0000_0003_0000u64.to_be_bytes());
}

fn data_into_refblock(img: &Path) {
    create(img, "64M", "");
    truncate(img, L2 + 65536);
    poke(img, L1, &0x8000_0000_0004_0000u64.to_be_bytes());
    poke(img, RB + 8, &[0, 1]);
    poke(img, L2, &0x8000_0000_0002_0000u64.to_be_bytes());
}

fn data_into_inactive_l2(img: &Path) {
    create(img, "64M", "");
    io(img, &["write -P 1 0 512"]);
    snapshot(img, "foo");
    io(img, &["write -P 2 0 512"]);
    poke(img, 0x80000, &0x8000_0000_0004_0000u64.to_be_bytes());
}

fn unallocated_header(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k"]);
    poke(img, RB, &[0, 0]);
}

fn unaligned_l1_entry(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k"]);
    poke(img, L1, &0x8000_0000_0004_2a00u64.to_be_bytes());
}

fn unaligned_l2_entry(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k"]);
    poke(img, L2, &0x8000_0000_0005_2a00u64.to_be_bytes());
}

fn unaligned_prealloc_zero(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k"]);
    poke(img, L2, &0x8000_0000_0005_2a01u64.to_be_bytes());
}

fn prealloc_zero_in_header(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k", "discard 0 64k"]);
    poke(img, L2, &0x8000_0000_0000_2a01u64.to_be_bytes());
}

fn unaligned_reftable_entry(img: &Path) {
    create(img, "64M", "");
    poke(img, RT, &0x2_2a00u64.to_be_bytes());
}

fn empty_reftable(img: &Path) {
    create(img, "64M", "");
    poke(img, RT, &[0; 8]);
}

fn empty_reftable_with_data(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k"]);
    poke(img, RT, &[0; 8]);
}

fn empty_refblock(img: &Path) {
    create(img, "64M", "");
    poke(img, RB, &[0; 8]);
}

fn zero_reftable_clusters(img: &Path) {
    create(img, "64M", "");
    poke(img, 56, &[0; 4]);
}

fn reftable_offset_zero(img: &Path) {
    create(img, "64M", "");
    poke(img, 48, &[0; 8]);
}

fn dirty_unaligned_refblock(img: &Path) {
    create(img, "64M", "");
    poke(img, RT, &0xffff_2a00u64.to_be_bytes());
    poke(img, 72, &1u64.to_be_bytes());
}

fn unaligned_refblock_with_data(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 128k"]);
    poke(img, RT, &0x2a00u64.to_be_bytes());
}

fn refblock_out_of_bounds(img: &Path) {
    create(img, "64M", "");
    poke(img, RT + 8, &0x00ff_ffff_0000_0000u64.to_be_bytes());
}

fn refblock_not_covered(img: &Path) {
    create(img, "64M", "refcount_bits=1");
    poke(img, RT + 8, &0x10_0000_0000u64.to_be_bytes());
}

fn refblock_covered_by_unaligned(img: &Path) {
    create(img, "64M", "refcount_bits=1");
    poke(img, RT + 8, &0x10_0000_0000u64.to_be_bytes());
    poke(img, RT + 16, &0x200u64.to_be_bytes());
}

fn huge_header_length(img: &Path) {
    create(img, "64M", "");
    poke(img, 100, &[0xff; 4]);
}

fn huge_unknown_extension(img: &Path) {
    create(img, "64M", "");
    poke(img, 8, &[0xff; 8]);
    poke(img, 104, &[0x12, 0x34, 0x56, 0x78]);
    poke(img, 108, &[0x7f, 0xff, 0xff, 0xff]);
}

fn huge_reftable_clusters(img: &Path) {
    create(img, "64M", "");
    poke(img, 56, &[0x00, 0x02, 0x00, 0x01]);
}

fn misaligned_reftable(img: &Path) {
    create(img, "64M", "");
    poke(img, 48, &0x1234_5678_90ab_cdefu64.to_be_bytes());
}

fn huge_reftable_offset(img: &Path) {
    create(img, "64M", "");
    poke(img, 48, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    poke(img, 56, &0x7fu32.to_be_bytes());
}

fn too_many_snapshots_in_header(img: &Path) {
    create(img, "64M", "");
    poke(img, 60, &[0x7f, 0xff, 0xff, 0xff]);
}

fn snapshot_offset_huge(img: &Path) {
    create(img, "64M", "");
    poke(img, 64, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    poke(img, 60, &0xffffu32.to_be_bytes());
}

fn snapshot_offset_misaligned_empty(img: &Path) {
    create(img, "64M", "");
    poke(img, 64, &0x1234_5678_90ab_cdefu64.to_be_bytes());
}

fn snapshot_table_past_eof(img: &Path) {
    create(img, "64M", "");
    poke(img, 64, &0x100_0000u64.to_be_bytes());
    poke(img, 60, &0x1_0000u32.to_be_bytes());
}

fn l1_size_huge(img: &Path) {
    create(img, "64M", "");
    poke(img, 36, &[0x7f, 0xff, 0xff, 0xff]);
}

fn l1_offset_huge(img: &Path) {
    create(img, "64M", "");
    poke(img, 40, &0x7fff_ffff_ffff_0000u64.to_be_bytes());
    poke(img, 36, &0xffffu32.to_be_bytes());
}

fn l1_size_zero_with_snapshot(img: &Path) {
    create(img, "64M", "");
    snapshot(img, "foo");
    poke(img, 36, &[0; 4]);
}

fn backing_name_too_long(img: &Path) {
    create(img, "64M", "");
    poke(img, 8, &0x1000u64.to_be_bytes());
    poke(img, 16, &[0xff; 4]);
}

fn l2_entry_huge_offset(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 512"]);
    poke(img, L2, &0x8000_00ff_ffff_0000u64.to_be_bytes());
}

fn l2_entry_compressed_huge(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 512"]);
    poke(img, L2, &0xbfff_ffff_ffff_0000u64.to_be_bytes());
}

fn snapshot_l1_misaligned(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 512"]);
    snapshot(img, "test");
    let e = snapshot_entries(img)[0];
    poke(img, e, &0x40_0200u64.to_be_bytes());
}

fn snapshot_l1_too_large(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 512"]);
    snapshot(img, "test");
    let e = snapshot_entries(img)[0];
    poke(img, e + 8, &0x1000_0000u32.to_be_bytes());
}

fn l1_past_eof(img: &Path) {
    create(img, "64M", "");
    poke(img, 40, &0x1000_0000u64.to_be_bytes());
}

fn reftable_past_eof(img: &Path) {
    create(img, "64M", "");
    poke(img, 48, &0x1000_0000u64.to_be_bytes());
}

fn v2_snapshots_as_v3(img: &Path) {
    create_v2(img, "64M");
    snapshot(img, "sn0");
    snapshot(img, "sn1");
    poke(img, 4, &3u32.to_be_bytes());
    poke(img, 96, &4u32.to_be_bytes());
    poke(img, 100, &0x68u32.to_be_bytes());
    // v3 needs 16 bytes of extra data in every entry: sn0 has none now.
    cut_snapshot_extra(img, 0, 0);
}

fn v3_snapshot_partial_extra(img: &Path) {
    create(img, "64M", "");
    snapshot(img, "sn0");
    snapshot(img, "sn1");
    cut_snapshot_extra(img, 1, 8);
}

fn snapshot_too_much_extra(img: &Path) {
    create(img, "64M", "");
    snapshot(img, "sn0");
    snapshot(img, "sn1");
    let e = snapshot_entries(img)[1];
    poke(img, e + 36, &0x1_0000u32.to_be_bytes());
}

fn too_many_snapshots(img: &Path) {
    create_v2(img, "64M");
    poke(img, 64, &0x10_0000u64.to_be_bytes());
    poke(img, 60, &0x2_0000u32.to_be_bytes());
    // 40-byte all-zero entries are valid in version 2.
    truncate(img, 0x10_0000 + 40 * 0x2_0000);
}

fn snapshot_table_misaligned(img: &Path) {
    create(img, "64M", "");
    snapshot(img, "sn0");
    let off = be64(img, 64);
    poke(img, 64, &(off + 8).to_be_bytes());
}

fn leak_after_snapshot_delete(img: &Path) {
    create(img, "64M", "");
    io(img, &["write 0 64k"]);
    snapshot(img, "foo");
    let conf = img.with_extension("blkdebug.conf");
    fs::write(
        &conf,
        "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n",
    )
    .unwrap();
    // The deletion fails to free the clusters (leaks), as the iotest injects.
    let _ = run_cmd(
        qemu_img_cmd()
            .current_dir(image_dir(img))
            .args(["snapshot", "-d", "foo"])
            .arg(format!("blkdebug:{}:{}", conf.display(), img.display())),
        TOOL_TIMEOUT,
    );
    let _ = fs::remove_file(conf);
}

fn no_reftable_at_all(img: &Path) {
    create(img, "64M", "");
    io(img, &["write -P 42 0 64k"]);
    poke(img, 48, &[0; 8]);
    poke(img, 56, &[0; 4]);
}

fn unreferenced_cluster_in_new_refblock_area(img: &Path) {
    create(img, "64M", "cluster_size=512");
    io(img, &["write 0 0x1b200"]);
    poke(img, 0x1ccc8, &0x8000_0000_0002_0000u64.to_be_bytes());
    truncate(img, 0x20200);
}

fn refblock_beyond_end_counted(img: &Path) {
    create(img, "64M", "");
    poke(img, RT + 8, &0x10_0000u64.to_be_bytes());
    poke(img, RB + 0x20, &[0, 1]);
}

fn refblock_beyond_end(img: &Path) {
    create(img, "64M", "");
    poke(img, RT + 8, &0x10_0000u64.to_be_bytes());
}

fn refblock_signed_overflow(img: &Path) {
    create(img, "64M", "");
    poke(img, RT + 8, &0x7fff_ffff_ffff_0000u64.to_be_bytes());
}

fn refblock_unsigned_overflow(img: &Path) {
    create(img, "64M", "");
    poke(img, RT + 8, &0xffff_ffff_ffff_0000u64.to_be_bytes());
}

fn refcount_overflow_cluster_2_32(img: &Path) {
    create(img, "512", "cluster_size=512");
    io(img, &["write 0 512"]);
    poke(img, 2048, &0x8080_0000_0000_0000u64.to_be_bytes());
}

fn ext_zero_flag_in_standard_part(img: &Path) {
    create(img, "1M", "extended_l2=on");
    io(img, &["write -q -P 0x11 0 2k"]);
    poke(img, L2 + 7, &[1]);
}

fn ext_allocated_and_zero(img: &Path) {
    create(img, "1M", "extended_l2=on");
    io(img, &["write -q 32k 128k"]);
    poke(img, L2 + 24, &1u32.to_be_bytes());
}

fn ext_unallocated_with_alloc_bit(img: &Path) {
    create(img, "1M", "extended_l2=on");
    io(img, &["write -q 256k 1k"]);
    poke(img, L2 + 15, &[1]);
}

fn ext_unallocated_both_bits(img: &Path) {
    create(img, "1M", "extended_l2=on");
    io(img, &["write -q 256k 1k"]);
    poke(img, L2 + 24, &((1u64 << 32) | 1).to_be_bytes());
}

fn ext_compressed_with_bitmap(img: &Path) {
    create(img, "1M", "extended_l2=on");
    io(img, &["write -q -P 11 -c 0 64k"]);
    poke(img, L2 + 11, &[0x01, 0x80]);
}

fn ext_base(img: &Path) -> PathBuf {
    let base = img.with_extension("base.raw");
    let _ = fs::remove_file(&base);
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        base.as_os_str(),
        "128k".as_ref(),
    ]);
    qemu_io(&base, "raw", &["write -q -P 0xff 0 128k"]);
    base
}

fn ext_unaligned_allocated(img: &Path) {
    let base = ext_base(img);
    let opts = format!(
        "extended_l2=on,backing_file={},backing_fmt=raw",
        base.file_name().unwrap().to_string_lossy()
    );
    create(img, "128k", &opts);
    io(img, &["write -q -P 1 4k 2k"]);
    poke(img, L2 + 6, &[0x02]);
}

fn ext_unaligned_no_allocated(img: &Path) {
    let base = ext_base(img);
    let opts = format!(
        "extended_l2=on,backing_file={},backing_fmt=raw",
        base.file_name().unwrap().to_string_lossy()
    );
    create(img, "128k", &opts);
    io(img, &["write -q -P 1 4k 2k", "write -q -z 4k 2k"]);
    poke(img, L2 + 6, &[0x02]);
}

fn dirty_lazy_refcounts(img: &Path) {
    create(img, "64M", "lazy_refcounts=on");
    io(img, &["write -P 7 0 256k"]);
    // Refcounts left stale, as after a crash with lazy refcounts.
    poke(img, RB + 8, &[0; 8]);
    poke(img, 72, &1u64.to_be_bytes());
}

fn corrupt_bit_set(img: &Path) {
    create(img, "64M", "");
    io(img, &["write -P 5 0 64k"]);
    poke(img, 72, &2u64.to_be_bytes());
}

/// A row with no deviation.
const fn row(iotest: &'static str, name: &'static str, build: fn(&Path)) -> Family {
    Family {
        iotest,
        name,
        build,
        deviation: Deviation::None,
        why: "",
    }
}

/// A row where qcow2d refuses to open for writing what QEMU opens read-write.
const fn refuses_writes(
    iotest: &'static str,
    name: &'static str,
    build: fn(&Path),
    why: &'static str,
) -> Family {
    Family {
        iotest,
        name,
        build,
        deviation: Deviation::RefusesWrites,
        why,
    }
}

/// Why qcow2d refuses to write an image with an unusable refcount block.
const BAD_REFBLOCK: &str = "qcow2d loads every refcount block when it opens an image for \
     writing and refuses one whose refcount table names a block it cannot use (misaligned, or \
     past the end of the file), pointing at qcow2d check --repair; QEMU opens it and fails or \
     marks it corrupt at the first allocation that needs the block";
/// Why qcow2d refuses to write an image whose refcount table is not in the file.
const REFTABLE_PAST_EOF: &str = "QEMU opens an image whose refcount table lies past the end of \
     the file and reads zeros for it; qcow2d serves it read-only and refuses to write it, \
     pointing at qcow2d check --repair, rather than allocate without knowing what is free";

const FAMILIES: &[Family] = &[
    // 060: overlapping metadata, unaligned entries, broken refcount structures.
    Family {
        iotest: "060",
        name: "l2_reference_into_l1",
        build: l2_into_l1,
        deviation: Deviation::StricterReads,
        why: "the L2 table the L1 entry names lies mostly past the end of the file: QEMU \
              reads zeros for its missing entries, qcow2d fails those reads rather than return \
              zeros for mappings the file lost",
    },
    row("060", "data_reference_into_refblock", data_into_refblock),
    row(
        "060",
        "data_reference_into_inactive_l2",
        data_into_inactive_l2,
    ),
    row("060", "unallocated_header", unallocated_header),
    row("060", "unaligned_l1_entry", unaligned_l1_entry),
    row("060", "unaligned_l2_entry", unaligned_l2_entry),
    row(
        "060",
        "unaligned_preallocated_zero",
        unaligned_prealloc_zero,
    ),
    row(
        "060",
        "preallocated_zero_in_header",
        prealloc_zero_in_header,
    ),
    refuses_writes(
        "060",
        "unaligned_reftable_entry",
        unaligned_reftable_entry,
        BAD_REFBLOCK,
    ),
    row("060", "empty_reftable", empty_reftable),
    row("060", "empty_reftable_with_data", empty_reftable_with_data),
    row("060", "empty_refblock", empty_refblock),
    row("060", "zero_reftable_clusters", zero_reftable_clusters),
    refuses_writes(
        "060",
        "reftable_offset_zero",
        reftable_offset_zero,
        BAD_REFBLOCK,
    ),
    row("060", "dirty_unaligned_refblock", dirty_unaligned_refblock),
    refuses_writes(
        "060",
        "unaligned_refblock_with_data",
        unaligned_refblock_with_data,
        BAD_REFBLOCK,
    ),
    refuses_writes(
        "060",
        "refblock_out_of_bounds",
        refblock_out_of_bounds,
        BAD_REFBLOCK,
    ),
    refuses_writes(
        "060",
        "refblock_not_covered",
        refblock_not_covered,
        BAD_REFBLOCK,
    ),
    refuses_writes(
        "060",
        "refblock_covered_by_unaligned",
        refblock_covered_by_unaligned,
        BAD_REFBLOCK,
    ),
    // 061: the dirty and corrupt bits.
    row("061", "dirty_lazy_refcounts", dirty_lazy_refcounts),
    row("061", "corrupt_bit_set", corrupt_bit_set),
    // 080: header and table validation at open.
    row("080", "huge_header_length", huge_header_length),
    row("080", "huge_unknown_extension", huge_unknown_extension),
    row("080", "huge_reftable_clusters", huge_reftable_clusters),
    row("080", "misaligned_reftable", misaligned_reftable),
    row("080", "huge_reftable_offset", huge_reftable_offset),
    row(
        "080",
        "too_many_snapshots_in_header",
        too_many_snapshots_in_header,
    ),
    row("080", "snapshot_offset_huge", snapshot_offset_huge),
    row(
        "080",
        "snapshot_offset_misaligned_empty",
        snapshot_offset_misaligned_empty,
    ),
    row("080", "snapshot_table_past_eof", snapshot_table_past_eof),
    row("080", "l1_size_huge", l1_size_huge),
    row("080", "l1_offset_huge", l1_offset_huge),
    row(
        "080",
        "l1_size_zero_with_snapshot",
        l1_size_zero_with_snapshot,
    ),
    row("080", "backing_name_too_long", backing_name_too_long),
    row("080", "l2_entry_huge_offset", l2_entry_huge_offset),
    row("080", "l2_entry_compressed_huge", l2_entry_compressed_huge),
    row("080", "snapshot_l1_misaligned", snapshot_l1_misaligned),
    row("080", "snapshot_l1_too_large", snapshot_l1_too_large),
    Family {
        iotest: "080",
        name: "l1_table_past_eof",
        build: l1_past_eof,
        deviation: Deviation::RefusesOpen,
        why: "QEMU answers every read of a disk whose L1 table is missing with zeros; qcow2d \
              refuses the image rather than return zeros for data the file lost",
    },
    refuses_writes(
        "080",
        "reftable_past_eof",
        reftable_past_eof,
        REFTABLE_PAST_EOF,
    ),
    // 108: repairs that need a new refcount structure.
    row("108", "no_reftable_at_all", no_reftable_at_all),
    row(
        "108",
        "unreferenced_cluster_in_new_refblock_area",
        unreferenced_cluster_in_new_refblock_area,
    ),
    refuses_writes(
        "108",
        "refblock_beyond_end_counted",
        refblock_beyond_end_counted,
        BAD_REFBLOCK,
    ),
    refuses_writes(
        "108",
        "refblock_beyond_end",
        refblock_beyond_end,
        BAD_REFBLOCK,
    ),
    refuses_writes(
        "108",
        "refblock_signed_overflow",
        refblock_signed_overflow,
        BAD_REFBLOCK,
    ),
    refuses_writes(
        "108",
        "refblock_unsigned_overflow",
        refblock_unsigned_overflow,
        BAD_REFBLOCK,
    ),
    // 138: a data cluster 32 PiB into the file.
    row("138", "cluster_at_32_pib", refcount_overflow_cluster_2_32),
    // 217: leaks only.
    row(
        "217",
        "leak_after_snapshot_delete",
        leak_after_snapshot_delete,
    ),
    // 261: snapshot tables.
    row("261", "v2_snapshots_as_v3", v2_snapshots_as_v3),
    row(
        "261",
        "v3_snapshot_partial_extra",
        v3_snapshot_partial_extra,
    ),
    row("261", "snapshot_too_much_extra", snapshot_too_much_extra),
    row("261", "too_many_snapshots", too_many_snapshots),
    row(
        "261",
        "snapshot_table_misaligned",
        snapshot_table_misaligned,
    ),
    // 271: extended L2 entries.
    row(
        "271",
        "ext_zero_flag_in_standard_part",
        ext_zero_flag_in_standard_part,
    ),
    row("271", "ext_allocated_and_zero", ext_allocated_and_zero),
    row(
        "271",
        "ext_unallocated_with_alloc_bit",
        ext_unallocated_with_alloc_bit,
    ),
    row(
        "271",
        "ext_unallocated_both_bits",
        ext_unallocated_both_bits,
    ),
    row(
        "271",
        "ext_compressed_with_bitmap",
        ext_compressed_with_bitmap,
    ),
    row("271", "ext_unaligned_allocated", ext_unaligned_allocated),
    row(
        "271",
        "ext_unaligned_no_allocated",
        ext_unaligned_no_allocated,
    ),
];

// ---- running one case -----------------------------------------------------------------------

/// Bytes, length and mtime of a file, to prove it was not modified.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    len: u64,
    mtime: SystemTime,
    digest: u64,
}

fn file_state(p: &Path) -> FileState {
    let meta = fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    let data = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    // FNV-1a: enough to notice any change.
    let digest = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    FileState {
        len: meta.len(),
        mtime: meta.modified().unwrap(),
        digest,
    }
}

fn copy_to(img: &Path, name: &str) -> PathBuf {
    let p = img.with_file_name(name);
    fs::copy(img, &p).unwrap_or_else(|e| panic!("copy {}: {e}", img.display()));
    p
}

fn exit_code(out: &CmdOutput) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn qemu(args: &[&str], img: &Path) -> CmdOutput {
    require_qemu_tools();
    run_cmd(
        qemu_img_cmd()
            .current_dir(image_dir(img))
            .args(args)
            .arg(img),
        TOOL_TIMEOUT,
    )
}

fn qcow2d(args: &[&str], img: &Path) -> CmdOutput {
    run_cmd(
        Command::new(daemon_bin())
            .current_dir(image_dir(img))
            .args(args)
            .arg(img),
        TOOL_TIMEOUT,
    )
}

/// The virtual size `qemu-img info` reports.
fn qemu_virtual_size(img: &Path) -> Option<u64> {
    let out = qemu(&["info", "--output=json"], img);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    v.get("virtual-size")?.as_u64()
}

/// Reads of at most 64 MiB of the disk, 1 MiB at a time.
fn chunks(size: u64) -> Vec<ReadReq> {
    let size = size.min(64 * MIB);
    (0..size.div_ceil(MIB))
        .map(|i| (i * MIB, (size - i * MIB).min(MIB) as usize))
        .collect()
}

/// Which chunks `qemu-io -r` reads successfully, and their bytes. qemu-io stops at the first
/// command that fails, so it runs again from the chunk after each failure.
fn qemu_reads(img: &Path, plan: &[ReadReq]) -> Option<Vec<Option<Vec<u8>>>> {
    let mut ok = vec![false; plan.len()];
    let mut from = 0;
    while from < plan.len() {
        let mut c = qemu_io_cmd();
        c.current_dir(image_dir(img)).args(["-r", "-f", "qcow2"]);
        for (off, len) in &plan[from..] {
            c.arg("-c").arg(format!("read {off} {len}"));
        }
        c.arg(img);
        let out = run_cmd(&mut c, TOOL_TIMEOUT);
        let text = format!("{}{}", out.stdout, out.stderr);
        if text.contains("can't open device") {
            // `qemu-img info` opens without I/O and skips checks a real open makes (a
            // raw-external-data bit without a data file): nothing to compare reads with.
            return None;
        }
        let mut next = plan.len();
        for (i, (off, len)) in plan.iter().enumerate().skip(from) {
            if text.contains(&format!("read {len}/{len} bytes at offset {off}\n")) {
                ok[i] = true;
            } else {
                next = i + 1;
                break;
            }
        }
        from = next;
    }
    if !ok.iter().any(|&b| b) {
        return Some(vec![None; plan.len()]);
    }
    if ok.iter().all(|&b| b) {
        let all = oracle(img);
        return Some(
            plan.iter()
                .map(|&(off, len)| {
                    all.get(off as usize..off as usize + len)
                        .map(<[u8]>::to_vec)
                })
                .collect(),
        );
    }
    // Some chunks fail, so convert would: dump the good ones one by one.
    let raw = img.with_extension("qemu-read.raw");
    let reads = plan
        .iter()
        .zip(ok)
        .map(|(&(off, len), good)| {
            if !good {
                return None;
            }
            let _ = fs::remove_file(&raw);
            let out = run_cmd(
                qemu_img_cmd()
                    .current_dir(image_dir(img))
                    .args(["dd", "-f", "qcow2", "-O", "raw", "bs=65536"])
                    .arg(format!("skip={}", off / 65536))
                    // qemu-img dd counts from the start of the input, skipped blocks too.
                    .arg(format!("count={}", (off + len as u64).div_ceil(65536)))
                    .arg(format!("if={}", img.display()))
                    .arg(format!("of={}", raw.display())),
                TOOL_TIMEOUT,
            );
            let data = fs::read(&raw).ok().filter(|_| out.status.success())?;
            let _ = fs::remove_file(&raw);
            data.get(..len).map(<[u8]>::to_vec)
        })
        .collect();
    Some(reads)
}

/// What QEMU and qcow2d did with one image.
#[derive(Debug, Default)]
struct Outcome {
    q_open: bool,
    d_open: bool,
    q_check: i32,
    d_check: i32,
    q_repaired: i32,
    d_repaired: i32,
    read_mismatches: Vec<String>,
}

/// Runs everything on copies of `img`; returns the outcome and the failures.
fn run_case(img: &Path, label: &str, deviation: Deviation) -> (Outcome, Vec<String>) {
    let mut o = Outcome::default();
    let mut fails = Vec::new();
    let stem = img.file_name().unwrap().to_string_lossy().into_owned();

    // Open.
    let qa = copy_to(img, &format!("{stem}.q"));
    let da = copy_to(img, &format!("{stem}.d"));
    let q_info = qemu(&["info"], &qa);
    o.q_open = q_info.status.success();
    let before = file_state(&da);
    let d_info = qcow2d(&["info"], &da);
    o.d_open = d_info.status.success();
    if file_state(&da) != before {
        fails.push(format!("{label}: qcow2d info MODIFIED the file"));
    }
    if d_info.stderr.contains("panicked") {
        fails.push(format!("{label}: qcow2d info PANICKED: {}", d_info.stderr));
    }
    if !o.d_open && d_info.stderr.trim().is_empty() {
        fails.push(format!("{label}: qcow2d info refused without a message"));
    }
    match (o.q_open, o.d_open, deviation) {
        (true, false, Deviation::RefusesOpen) => {}
        (q, d, _) if q != d => fails.push(format!(
            "{label}: open differs: qemu-img info {} ({}), qcow2d info {} ({})",
            if q { "opens" } else { "refuses" },
            q_info.stderr.trim(),
            if d { "opens" } else { "refuses" },
            d_info.stderr.trim()
        )),
        _ => {}
    }

    // A writable open (what `qcow2d serve` does without --read-only) against QEMU's
    // read-write open; both may change the file (a dirty image is repaired).
    let qw = copy_to(img, &format!("{stem}.qw"));
    let dw = copy_to(img, &format!("{stem}.dw"));
    let q_rw = run_cmd(
        qemu_io_cmd()
            .current_dir(image_dir(img))
            .args(["-f", "qcow2", "-c", "read 0 512"])
            .arg(&qw),
        TOOL_TIMEOUT,
    );
    let q_rw_open = !q_rw.stderr.contains("can't open device");
    let d_rw = {
        let p = dw.clone();
        try_with_timeout("writable Image::open", OPEN_TIMEOUT, move || {
            qcow2d_engine::Image::open(
                &p,
                &qcow2d_engine::OpenOptions {
                    read_only: false,
                    ..qcow2d_engine::OpenOptions::default()
                },
            )
            .map(|img| {
                let _ = img.close();
            })
            .map_err(|e| error_chain(&e))
        })
    };
    match (&d_rw, q_rw_open) {
        (Err(e), _) => fails.push(format!("{label}: writable open: {e}")),
        (Ok(Ok(())), false) => fails.push(format!(
            "{label}: QEMU refuses a read-write open ({}), qcow2d opens it for writing",
            q_rw.stderr.trim()
        )),
        (Ok(Err(e)), true)
            if !matches!(deviation, Deviation::RefusesWrites | Deviation::RefusesOpen) =>
        {
            fails.push(format!(
                "{label}: QEMU opens it read-write, qcow2d refuses a writable open: {e}"
            ))
        }
        _ => {}
    }

    // Reads: engine and socket against qemu-io, chunk by chunk.
    if o.q_open && o.d_open {
        let size = qemu_virtual_size(&qa).unwrap_or(0);
        let plan = chunks(size);
        let want = qemu_reads(&qa, &plan).unwrap_or_else(|| {
            fails.push(format!("{label}: qemu-img info opens it, qemu-io cannot"));
            Vec::new()
        });
        let engine = engine_read_plan(&da, &plan);
        let before = file_state(&da);
        let sock_dir = Scratch::new("damaged-sock");
        let socket = sock_dir.socket("s");
        let socket_reads = match Daemon::start_with(&da, &socket, &[]) {
            Err(f) => Err(format!("read-only qcow2d serve refused it: {f}")),
            Ok(mut d) => {
                let p = plan.clone();
                let r = blk_session(&socket, 1, READ_TIMEOUT, move |c| c.read_batch(&p));
                d.assert_alive(label);
                let _ = d.terminate();
                r
            }
        };
        if file_state(&da) != before {
            fails.push(format!(
                "{label}: a read-only qcow2d serve MODIFIED the file"
            ));
        }
        for (who, got) in [("engine", engine), ("socket", socket_reads)] {
            let got = match got {
                Ok(g) => g,
                Err(e) => {
                    fails.push(format!("{label}: {who}: {e}"));
                    continue;
                }
            };
            for ((&(off, _), w), g) in plan.iter().zip(&want).zip(&got) {
                let mismatch = match (w, g) {
                    (Some(w), Ok(g)) if w != g => Some("different bytes".to_owned()),
                    (Some(_), Err(e)) if deviation != Deviation::StricterReads => {
                        Some(format!("qemu reads it, qcow2d fails: {e}"))
                    }
                    (None, Ok(_)) => Some("qemu fails, qcow2d reads it".to_owned()),
                    _ => None,
                };
                if let Some(m) = mismatch {
                    o.read_mismatches.push(format!("{who} {off:#x}: {m}"));
                }
            }
        }
        if !o.read_mismatches.is_empty() {
            fails.push(format!(
                "{label}: reads differ from qemu-io: {:?}",
                &o.read_mismatches[..o.read_mismatches.len().min(4)]
            ));
        }
    }

    // Check.
    let q_check = qemu(&["check"], &qa);
    o.q_check = exit_code(&q_check);
    let before = file_state(&da);
    let d_check = qcow2d(&["check"], &da);
    o.d_check = exit_code(&d_check);
    if file_state(&da) != before {
        fails.push(format!("{label}: qcow2d check MODIFIED the file"));
    }
    if d_check.stderr.contains("panicked") {
        fails.push(format!(
            "{label}: qcow2d check PANICKED: {}",
            d_check.stderr
        ));
    }
    let d_refused = deviation == Deviation::RefusesOpen && !o.d_open;
    if o.q_check != o.d_check && !d_refused {
        fails.push(format!(
            "{label}: check exit class differs: qemu-img check {} ({}), qcow2d check {} ({})",
            o.q_check,
            q_check.stderr.lines().next().unwrap_or(""),
            o.d_check,
            d_check.stderr.lines().last().unwrap_or("")
        ));
    }

    // Repair.
    let qb = copy_to(img, &format!("{stem}.qr"));
    let db = copy_to(img, &format!("{stem}.dr"));
    let _ = qemu(&["check", "-r", "all"], &qb);
    o.q_repaired = exit_code(&qemu(&["check"], &qb));
    let d_repair = qcow2d(&["check", "--repair"], &db);
    if d_repair.stderr.contains("panicked") {
        fails.push(format!(
            "{label}: qcow2d check --repair PANICKED: {}",
            d_repair.stderr
        ));
    }
    o.d_repaired = exit_code(&qemu(&["check"], &db));
    if o.q_repaired == 0 && o.d_repaired != 0 {
        fails.push(format!(
            "{label}: qemu-img check -r all made QEMU's copy clean, qcow2d check --repair did \
             not (qemu-img check exits {}); qcow2d said: {}",
            o.d_repaired,
            d_repair
                .stderr
                .lines()
                .rev()
                .take(6)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    if o.q_repaired == 0 && o.d_repaired == 0 {
        let out = run_cmd(
            qemu_img_cmd()
                .current_dir(image_dir(img))
                .args(["compare", "-f", "qcow2", "-F", "qcow2"])
                .arg(&qb)
                .arg(&db),
            TOOL_TIMEOUT,
        );
        if !out.status.success() {
            fails.push(format!(
                "{label}: the repaired copies hold different data: {}{}",
                out.stdout.trim(),
                out.stderr.trim()
            ));
        }
    }
    (o, fails)
}

fn run_families(iotest: &str) {
    require_qemu_tools();
    let s = Scratch::new(&format!("damaged-{iotest}"));
    let mut fails = Vec::new();
    let mut ran = 0;
    for f in FAMILIES.iter().filter(|f| f.iotest == iotest) {
        let img = s.join(&format!("{}.qcow2", f.name));
        (f.build)(&img);
        let label = format!("{}/{}", f.iotest, f.name);
        let (o, mut fl) = run_case(&img, &label, f.deviation);
        eprintln!(
            "{label}: open qemu={} qcow2d={} | check qemu={} qcow2d={} | after repair qemu={} qcow2d={}{}",
            o.q_open,
            o.d_open,
            o.q_check,
            o.d_check,
            o.q_repaired,
            o.d_repaired,
            if f.why.is_empty() { String::new() } else { format!(" | deviation: {}", f.why) }
        );
        fails.append(&mut fl);
        ran += 1;
    }
    assert!(ran > 0, "no family for iotest {iotest}");
    assert!(
        fails.is_empty(),
        "{} failure(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

#[test]
fn iotest_060_overlaps_and_broken_refcounts() {
    run_families("060");
}

#[test]
fn iotest_061_dirty_and_corrupt_bits() {
    run_families("061");
}

#[test]
fn iotest_080_header_validation() {
    run_families("080");
}

#[test]
fn iotest_108_refcount_rebuild() {
    run_families("108");
}

#[test]
fn iotest_138_cluster_far_away() {
    run_families("138");
}

#[test]
fn iotest_217_leaks() {
    run_families("217");
}

#[test]
fn iotest_261_snapshot_tables() {
    run_families("261");
}

#[test]
fn iotest_271_extended_l2() {
    run_families("271");
}

// ---- random damage --------------------------------------------------------------------------

/// The metadata regions of an image: (what, offset, length).
fn regions(img: &Path) -> Vec<(&'static str, u64, u64)> {
    let cs = 1u64 << be32(img, 20);
    let hl = if be32(img, 4) >= 3 {
        u64::from(be32(img, 100))
    } else {
        72
    };
    let mut v = vec![("header", 0, hl + 64)];
    let l1 = be64(img, 40);
    let l1_len = u64::from(be32(img, 36)) * 8;
    v.push(("L1 table", l1, l1_len.min(512)));
    let l2 = be64(img, l1) & 0x00ff_ffff_ffff_fe00;
    if l2 != 0 {
        v.push(("L2 table", l2, 512));
    }
    let rt = be64(img, 48);
    v.push(("refcount table", rt, 64));
    let rb = be64(img, rt);
    if rb != 0 {
        v.push(("refcount block", rb, 256));
    }
    if be32(img, 60) > 0 {
        v.push(("snapshot table", be64(img, 64), 256));
    }
    let _ = cs;
    v
}

/// Damages `img` from `rng`; returns what was done.
fn damage(img: &Path, rng: &mut Rng) -> String {
    let regions = regions(img);
    let (what, start, len) = regions[rng.below(regions.len() as u64) as usize];
    let mut done = Vec::new();
    for _ in 0..=rng.below(2) {
        if what == "header" {
            // A field of the fixed header (or the first extension).
            const FIELDS: &[(u64, usize)] = &[
                (4, 4),
                (8, 8),
                (16, 4),
                (20, 4),
                (24, 8),
                (32, 4),
                (36, 4),
                (40, 8),
                (48, 8),
                (56, 4),
                (60, 4),
                (64, 8),
                (72, 8),
                (80, 8),
                (88, 8),
                (96, 4),
                (100, 4),
                (104, 8),
                (112, 8),
            ];
            let (off, width) = FIELDS[rng.below(FIELDS.len() as u64) as usize];
            let mut b = read_bytes(img, off, width);
            match rng.below(3) {
                0 => {
                    let bit = rng.below(width as u64 * 8) as usize;
                    b[bit / 8] ^= 1 << (bit % 8);
                }
                1 => rng.fill(&mut b),
                _ => {
                    let last = b.len() - 1;
                    b[last] = b[last].wrapping_add(rng.below(16) as u8 + 1);
                }
            }
            poke(img, off, &b);
            done.push(format!("header field at {off}: {b:02x?}"));
        } else {
            let entry = start + rng.below(len / 8) * 8;
            let mut b = read_bytes(img, entry, 8);
            match rng.below(4) {
                0 => {
                    let bit = rng.below(64) as usize;
                    b[bit / 8] ^= 1 << (bit % 8);
                }
                1 => rng.fill(&mut b),
                2 => b = vec![0; 8],
                _ => {
                    let i = rng.below(8) as usize;
                    b[i] = rng.next_u64() as u8;
                }
            }
            poke(img, entry, &b);
            done.push(format!("{what} at {entry:#x}: {b:02x?}"));
        }
    }
    done.join("; ")
}

/// The images random damage starts from: a v3 image with data, a snapshot and a compressed
/// cluster; a v2 image with a snapshot; an extended L2 image; 1-bit refcounts.
fn random_bases(s: &Scratch) -> Vec<PathBuf> {
    let a = s.join("base-v3.qcow2");
    create(&a, "64M", "");
    io(&a, &["write -P 1 0 192k", "write -P 2 5M 64k"]);
    snapshot(&a, "one");
    io(&a, &["write -P 3 64k 64k", "write -c -P 4 1M 64k"]);
    let b = s.join("base-v2.qcow2");
    create_v2(&b, "32M");
    io(&b, &["write -P 5 0 128k"]);
    snapshot(&b, "two");
    io(&b, &["write -P 6 0 64k"]);
    let c = s.join("base-ext.qcow2");
    create(&c, "16M", "extended_l2=on");
    io(
        &c,
        &["write -P 7 4k 8k", "write -z 64k 32k", "write -P 8 1M 64k"],
    );
    let d = s.join("base-rc1.qcow2");
    create(&d, "16M", "refcount_bits=1");
    io(&d, &["write -P 9 0 256k"]);
    vec![a, b, c, d]
}

fn random_damage(seeds: std::ops::Range<u64>) {
    require_qemu_tools();
    let s = Scratch::new("damaged-random");
    let bases = random_bases(&s);
    let mut fails = Vec::new();
    for seed in seeds {
        let mut rng = Rng::new(seed);
        let base = &bases[rng.below(bases.len() as u64) as usize];
        let img = s.join(&format!("r{seed}.qcow2"));
        fs::copy(base, &img).unwrap();
        let what = damage(&img, &mut rng);
        let label = format!(
            "seed {seed} ({}: {what})",
            base.file_name().unwrap().to_string_lossy()
        );

        let stem = format!("r{seed}");
        let da = copy_to(&img, &format!("{stem}.d"));
        let before = file_state(&da);
        let d_info = qcow2d(&["info"], &da);
        let d_check = qcow2d(&["check"], &da);
        if file_state(&da) != before {
            fails.push(format!("{label}: qcow2d info or check MODIFIED the file"));
        }
        let qa = copy_to(&img, &format!("{stem}.q"));
        let q_info = qemu(&["info"], &qa);
        // The one documented difference: an L1 table past the end of the file.
        let l1_past_eof = d_info.stderr.contains("the L1 table at");
        // `qemu-img info` opens without I/O, skipping what a real open checks about the
        // external data file; qcow2d info judges as a real open (qemu-io) does.
        let q_real_open_refuses = || {
            let out = run_cmd(
                qemu_io_cmd()
                    .current_dir(image_dir(&qa))
                    .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
                    .arg(&qa),
                TOOL_TIMEOUT,
            );
            out.stderr.contains("can't open device")
        };
        if q_info.status.success() != d_info.status.success()
            && !(q_info.status.success() && (l1_past_eof || q_real_open_refuses()))
        {
            fails.push(format!(
                "{label}: open differs: qemu-img info {} ({}), qcow2d info {} ({})",
                q_info.status,
                q_info.stderr.trim(),
                d_info.status,
                d_info.stderr.lines().last().unwrap_or("")
            ));
        }
        // Reads of the first 8 MiB, chunk by chunk, where both open it.
        if q_info.status.success() && d_info.status.success() {
            let plan = chunks(qemu_virtual_size(&qa).unwrap_or(0).min(8 * MIB));
            match (qemu_reads(&qa, &plan), engine_read_plan(&da, &plan)) {
                (_, Err(e)) => fails.push(format!("{label}: engine: {e}")),
                (None, Ok(_)) => {}
                (Some(want), Ok(got)) => {
                    for ((&(off, _), w), g) in plan.iter().zip(&want).zip(&got) {
                        let bad = match (w, g) {
                            (Some(w), Ok(g)) => (w != g).then(|| "different bytes".to_owned()),
                            // The documented difference: a table past the end of the file.
                            (Some(_), Err(e)) if past_eof(e, file_len(&da)) => None,
                            (Some(_), Err(e)) => Some(format!("qemu reads it, qcow2d fails: {e}")),
                            (None, Ok(_)) => Some("qemu fails, qcow2d reads it".to_owned()),
                            (None, Err(_)) => None,
                        };
                        if let Some(b) = bad {
                            fails.push(format!("{label}: read at {off:#x}: {b}"));
                        }
                    }
                }
            }
        }
        let q_check = qemu(&["check"], &qa);
        let q_opened = !q_check.stderr.contains("Could not open");
        let (q, d) = (exit_code(&q_check), exit_code(&d_check));
        if q_opened && q != d {
            fails.push(format!(
                "{label}: check exit class differs: qemu-img {q} ({}), qcow2d {d} ({})",
                q_check.stderr.lines().next().unwrap_or(""),
                d_check.stderr.lines().last().unwrap_or("")
            ));
        }
        let qb = copy_to(&img, &format!("{stem}.qr"));
        let db = copy_to(&img, &format!("{stem}.dr"));
        let _ = qemu(&["check", "-r", "all"], &qb);
        let q_after = exit_code(&qemu(&["check"], &qb));
        let d_repair = qcow2d(&["check", "--repair"], &db);
        let d_after = exit_code(&qemu(&["check"], &db));
        for (cmd, out) in [
            ("info", &d_info),
            ("check", &d_check),
            ("check --repair", &d_repair),
        ] {
            if out.stderr.contains("panicked") {
                fails.push(format!("{label}: qcow2d {cmd} PANICKED: {}", out.stderr));
            }
        }
        eprintln!(
            "{label}: check qemu={q} qcow2d={d} | after repair qemu={q_after} qcow2d={d_after}"
        );
        // QEMU opens an image to repair it without reading its snapshots; when unknown
        // autoclear bits make it rewrite the header, it writes no snapshot table at all. Its
        // copy is then clean because every snapshot is gone, which qcow2d does not do.
        let q_dropped_snapshots = be32(&img, 60) != 0
            && be32(&qb, 60) == 0
            && be32(&img, 4) >= 3
            && be64(&img, 88) & !3 != 0;
        if q_after == 0 && d_after != 0 && !q_dropped_snapshots {
            fails.push(format!(
                "{label}: qemu-img check -r all made QEMU's copy clean, qcow2d check --repair \
                 did not (qemu-img check exits {d_after}); qcow2d said: {}",
                d_repair
                    .stderr
                    .lines()
                    .rev()
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        for p in [&img, &da, &qa, &qb, &db] {
            let _ = fs::remove_file(p);
        }
    }
    assert!(
        fails.is_empty(),
        "{} failure(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// Whether a failed read names metadata at a host offset past the end of the file (an L2
/// table QEMU would read as zeros).
fn past_eof(err: &str, file_len: u64) -> bool {
    err.split("host offset 0x")
        .nth(1)
        .and_then(|h| {
            let hex: String = h.chars().take_while(char::is_ascii_hexdigit).collect();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|off| off >= file_len)
}

/// Seeds from `QCOW2D_DAMAGE_SEEDS` (`FIRST..END`), else the given range.
fn seeds(default: std::ops::Range<u64>) -> std::ops::Range<u64> {
    std::env::var("QCOW2D_DAMAGE_SEEDS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(default)
}

#[test]
fn random_metadata_damage_a() {
    random_damage(seeds(0..60));
}

#[test]
fn random_metadata_damage_b() {
    random_damage(seeds(1000..1060));
}

// ---- a huge sparse image ---------------------------------------------------------------------

/// Runs `qcow2d ARGS IMG` to completion; returns its exit code, stderr and peak resident
/// memory in bytes (from wait4's rusage of that one process).
// The child is reaped by wait4, which Child::wait cannot do with its rusage.
#[allow(clippy::zombie_processes)]
fn qcow2d_peak_rss(args: &[&str], img: &Path) -> (i32, String, u64) {
    use std::io::Read;
    let mut child = Command::new(daemon_bin())
        .args(args)
        .arg(img)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qcow2d");
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for (Child::wait is never called for it);
    // `status` and `usage` are valid for writes for the duration of the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // ru_maxrss is in KiB on Linux.
    (
        code,
        reader.join().unwrap_or_default(),
        usage.ru_maxrss as u64 * 1024,
    )
}

/// The peak resident memory of a running process.
fn vm_hwm(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        * 1024
}

/// A dirty image whose file was extended to 4 TiB (sparse), with stale refcounts: the repair
/// (`check --repair`, and the one a writable open runs) costs memory for what the metadata
/// references, not for the 64 Mi clusters the file spans (8 bytes each, 512 MiB, before).
#[test]
fn huge_sparse_image_repairs_in_bounded_memory() {
    require_qemu_tools();
    const LIMIT: u64 = 64 * MIB;
    let s = Scratch::new("damaged-sparse");
    let img = s.join("sparse.qcow2");
    create(&img, "1T", "lazy_refcounts=on");
    io(&img, &["write -P 7 0 1M", "write -P 8 100G 1M"]);
    let make_dirty = |img: &Path| {
        // Stale refcounts (clusters 4..7 say free) and the dirty bit, as after a crash.
        poke(img, RB + 8, &[0; 8]);
        poke(img, 72, &1u64.to_be_bytes());
        truncate(img, 4 << 40);
    };
    make_dirty(&img);
    let (code, err, peak) = qcow2d_peak_rss(&["check", "--repair"], &img);
    assert_eq!(code, 0, "qcow2d check --repair exited {code}: {err}");
    eprintln!(
        "check --repair of a 4 TiB sparse file: peak RSS {} KiB",
        peak / 1024
    );
    assert!(
        peak < LIMIT,
        "check --repair of a 4 TiB sparse image peaked at {} MiB",
        peak >> 20
    );
    assert_check_clean(&img, "after qcow2d check --repair");
    qemu_io(&img, "qcow2", &["read -P 7 0 1M", "read -P 8 100G 1M"]);

    // The repair a writable open runs on a dirty image.
    make_dirty(&img);
    let sock = s.socket("s");
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(&img)
        .arg("--socket")
        .arg(&sock)
        .args(["--shards", "1", "--queues", "1"]);
    let d = Daemon::spawn(cmd, &img, &sock).unwrap_or_else(|f| panic!("serve: {f}"));
    let peak = vm_hwm(d.pid());
    eprintln!(
        "serve of a dirty 4 TiB sparse file: peak RSS {} KiB",
        peak / 1024
    );
    assert!(
        peak < LIMIT,
        "serve of a dirty 4 TiB sparse image peaked at {} MiB",
        peak >> 20
    );
    let st = d.terminate();
    assert!(st.success(), "qcow2d serve exited {st}");
    assert_check_clean(&img, "after the repair at open");
    qemu_io(&img, "qcow2", &["read -P 7 0 1M", "read -P 8 100G 1M"]);
}
