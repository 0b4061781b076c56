//! Broken, hostile and unsupported images: each gives a clear error from `Image::open`, or an
//! I/O error on the affected reads (through `read_at`, and through the socket as a failed
//! request while other reads still work). Never a panic, never a hang: every call runs under a
//! timeout. Where qemu-img refuses the image too, the test checks that first, which proves the
//! patch really broke what it meant to break.

use qcow2d_engine::{ErrorKind, Image, OpenOptions};
use qcow2d_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

// ---- expectations -----------------------------------------------------------------------

/// Opens `img` under a timeout. `Ok(None)` on success, `Ok(Some((kind, display, chain)))` on an
/// error; `Err` on a panic or a hang.
fn try_open(img: &Path, opts: OpenOptions) -> Result<Option<(ErrorKind, String, String)>, String> {
    let p = img.to_path_buf();
    try_with_timeout("Image::open", OPEN_TIMEOUT, move || {
        match Image::open(&p, &opts) {
            Ok(_) => None,
            Err(e) => Some((e.kind(), e.to_string(), error_chain(&e))),
        }
    })
}

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.to_lowercase().contains(&needle.to_lowercase())
}

/// `Image::open` must fail with one of `kinds`, its message (Display and `source()` chain, as
/// the daemon prints it) naming the file and containing every needle (one of the alternatives
/// of each group). Then `qcow2d serve` must exit non-zero without becoming ready, with a
/// message on stderr that does the same.
fn expect_open_error(img: &Path, opts: OpenOptions, kinds: &[ErrorKind], needles: &[&[&str]]) {
    let file_name = img.file_name().unwrap().to_string_lossy().into_owned();
    match try_open(img, opts) {
        Err(e) => panic!("{}: {e}", img.display()),
        Ok(None) => panic!(
            "Image::open({}) SUCCEEDED; expected an error of kind {kinds:?}",
            img.display()
        ),
        Ok(Some((kind, _display, chain))) => {
            assert!(
                kinds.contains(&kind),
                "Image::open({}) failed with kind {kind:?}, expected one of {kinds:?}: {chain}",
                img.display()
            );
            // A backing chain error may name the backing file instead of the top image.
            assert!(
                chain.contains(&file_name) || kind == ErrorKind::BackingChain,
                "error does not name the file {file_name}: {chain:?}"
            );
            for group in needles {
                assert!(
                    group.iter().any(|n| contains_ci(&chain, n)),
                    "error message lacks any of {group:?}: {chain:?}"
                );
            }
        }
    }
    expect_daemon_refuses(img, needles);
}

/// `qcow2d serve` on a bad image: exits non-zero, never prints the ready line, says why on
/// stderr (naming the file and containing the needles), does not panic.
fn expect_daemon_refuses(img: &Path, needles: &[&[&str]]) {
    let s = Scratch::new("refuse");
    let socket = s.socket("s");
    match Daemon::start_with(img, &socket, &[]) {
        Ok(mut d) => {
            d.assert_alive("");
            panic!(
                "qcow2d serve became ready on the bad image {}; stderr:\n{}",
                img.display(),
                d.stderr()
            );
        }
        Err(f) => {
            let status = f.status.unwrap_or_else(|| {
                panic!("qcow2d serve on a bad image neither became ready nor exited: {f}")
            });
            assert!(
                !status.success(),
                "qcow2d serve on the bad image exited with success: {f}"
            );
            assert!(
                !f.stderr.contains("panicked"),
                "qcow2d serve PANICKED on the bad image: {f}"
            );
            let file_name = img.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                f.stderr.contains(&file_name),
                "qcow2d serve's message does not name the image {file_name}: {f}"
            );
            for group in needles {
                assert!(
                    group.iter().any(|n| contains_ci(&f.stderr, n)),
                    "qcow2d serve's message lacks any of {group:?}: {f}"
                );
            }
        }
    }
}

/// Reads `ranges` through the engine; returns the ones that failed (with messages).
fn engine_failed_reads(img: &Path, ranges: &[ReadReq]) -> Result<Vec<(ReadReq, String)>, String> {
    let results = engine_read_plan(img, ranges)?;
    Ok(ranges
        .iter()
        .zip(results)
        .filter_map(|(r, res)| res.err().map(|e| (*r, e)))
        .collect())
}

/// Whole disk in 1 MiB chunks (at most the first 64 MiB).
fn chunks(size: u64) -> Vec<ReadReq> {
    let size = size.min(64 * MIB);
    (0..size.div_ceil(MIB))
        .map(|i| (i * MIB, MIB.min(size - i * MIB) as usize))
        .collect()
}

/// Either `Image::open` fails (when `open_error_ok`), or every read touching `bad` fails while
/// `good` reads back `good_data`. Then the same through the daemon: a failed request for the
/// bad range, and the next good read still succeeds with the right data.
fn expect_bad_range(
    img: &Path,
    bad: ReadReq,
    good: ReadReq,
    good_data: &[u8],
    open_error_ok: bool,
) {
    match try_open(img, OpenOptions::default()) {
        Err(e) => panic!("{}: {e}", img.display()),
        Ok(Some((kind, display, chain))) => {
            assert!(
                open_error_ok,
                "Image::open({}) failed ({kind:?}: {chain}) but the header and tables are \
                 fine: only reads of {bad:?} should fail",
                img.display()
            );
            assert!(!display.is_empty());
            expect_daemon_refuses(img, &[]);
            return;
        }
        Ok(None) => {}
    }
    let results =
        engine_read_plan(img, &[good, bad, good]).unwrap_or_else(|e| panic!("engine: {e}"));
    match &results[1] {
        Ok(_) => panic!(
            "engine: read_at of the damaged range {bad:?} SUCCEEDED; it must fail with an I/O \
             error"
        ),
        Err(e) => assert!(!e.is_empty()),
    }
    for r in [&results[0], &results[2]] {
        match r {
            Err(e) => panic!("engine: read_at of the intact range {good:?} failed: {e}"),
            Ok(d) => {
                if let Some(m) =
                    first_difference("engine read_at", "intact range", good.0, good_data, d)
                {
                    panic!("{m}");
                }
            }
        }
    }

    // Through the socket.
    let s = Scratch::new("badrange");
    let socket = s.socket("s");
    let mut d = Daemon::start(img, &socket);
    let res = blk_session(&socket, 1, READ_TIMEOUT, move |c| {
        let a = c.read_batch(&[bad])?;
        let b = c.read_batch(&[good])?;
        let e = c.read_batch(&[good, bad, good, bad])?;
        Ok((a, b, e))
    })
    .unwrap_or_else(|e| panic!("daemon+blkio: {e}\ndaemon stderr:\n{}", d.stderr()));
    d.assert_alive("after reading a damaged range");
    let (a, b, e) = res;
    assert!(
        a[0].is_err(),
        "daemon: the request for the damaged range {bad:?} SUCCEEDED; it must fail \
         (VIRTIO_BLK_S_IOERR)"
    );
    for (what, r) in [
        ("next", &b[0]),
        ("mixed batch", &e[0]),
        ("mixed batch", &e[2]),
    ] {
        match r {
            Err(err) => panic!(
                "daemon: the {what} read of the intact range {good:?} failed: {err}\nstderr:\n{}",
                d.stderr()
            ),
            Ok(data) => {
                if let Some(m) =
                    first_difference("daemon+blkio", "intact range", good.0, good_data, data)
                {
                    panic!("{m}");
                }
            }
        }
    }
    assert!(
        e[1].is_err() && e[3].is_err(),
        "daemon: damaged range read succeeded in a batch"
    );
    let st = d.terminate();
    assert!(st.success(), "qcow2d exited with {st} after SIGTERM");
}

/// Either `Image::open` fails, or at least one read inside `affected` fails. Never silently
/// returns data for a structure that is not in the file.
fn expect_open_or_read_error(img: &Path, affected: (u64, u64)) {
    match try_open(img, OpenOptions::default()) {
        Err(e) => panic!("{}: {e}", img.display()),
        Ok(Some((_, display, _))) => {
            assert!(!display.is_empty());
            expect_daemon_refuses(img, &[]);
        }
        Ok(None) => {
            let ranges: Vec<ReadReq> = chunks(affected.1)
                .into_iter()
                .filter(|(o, _)| *o >= affected.0)
                .collect();
            let failed =
                engine_failed_reads(img, &ranges).unwrap_or_else(|e| panic!("engine: {e}"));
            assert!(
                !failed.is_empty(),
                "Image::open({}) succeeded and every read of {:#x}..{:#x} succeeded, though the \
                 metadata for that range is not in the file",
                img.display(),
                affected.0,
                affected.1
            );
        }
    }
}

// ---- images -----------------------------------------------------------------------------

/// A 16 MiB v3 image with data written over its first 4 MiB.
fn plain_image(s: &Scratch, name: &str, opts: &str) -> PathBuf {
    let img = s.join(name);
    create_qcow2(&img, 16 * MIB, opts);
    qemu_io(&img, "qcow2", &["write -P 0x3c 0 4M"]);
    img
}

fn copy_as(src: &Path, name: &str) -> PathBuf {
    let dst = src.with_file_name(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

const ANY_OPEN_ERROR: &[ErrorKind] = &[
    ErrorKind::InvalidImage,
    ErrorKind::Unsupported,
    ErrorKind::Corrupt,
    ErrorKind::Io,
];

// ---- truncation -------------------------------------------------------------------------

#[test]
fn truncated_header() {
    let s = Scratch::new("trunc_header");
    let img = plain_image(&s, "t.qcow2", "");
    let header_len = u64::from(be32(&img, hdr::HEADER_LENGTH));
    for (i, cut) in [0, 3, 50, 71, 100, header_len + 4].into_iter().enumerate() {
        let t = copy_as(&img, &format!("cut{i}.qcow2"));
        truncate(&t, cut);
        expect_open_error(
            &t,
            OpenOptions::default(),
            &[ErrorKind::InvalidImage, ErrorKind::Io],
            &[],
        );
    }
}

#[test]
fn truncated_l1_table() {
    let s = Scratch::new("trunc_l1");
    let img = s.join("t.qcow2");
    create_qcow2(&img, 64 * MIB, "cluster_size=512");
    // One write per 256 KiB: every 8th L2 table allocated, on both sides of the cut.
    let cmds: Vec<String> = (0..256)
        .map(|i| format!("write -P {:#x} {} 512", 1 + i % 250, i * 256 * KIB))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &refs);
    let l1 = be64(&img, hdr::L1_TABLE_OFFSET);
    let l1_size = u64::from(be32(&img, hdr::L1_SIZE));
    assert_eq!(l1_size, 2048, "test setup: unexpected L1 size");
    // Cut in the middle of the L1 table (entries 1024.. describe 32 MiB..64 MiB).
    truncate(&img, l1 + 8 * 1024 + 4);
    expect_open_or_read_error(&img, (32 * MIB, 64 * MIB));
}

// ---- header fields ----------------------------------------------------------------------

#[test]
fn bad_magic() {
    let s = Scratch::new("bad_magic");
    let img = plain_image(&s, "m.qcow2", "");
    write_bytes(&img, 0, b"QFJ\xfb");
    expect_open_error(
        &img,
        OpenOptions::default(),
        &[ErrorKind::InvalidImage],
        &[&["magic", "not a qcow2", "not qcow2"]],
    );
}

#[test]
fn bad_version() {
    let s = Scratch::new("bad_version");
    let img = plain_image(&s, "v.qcow2", "");
    for v in [1u32, 4, 0xffff_ffff] {
        let t = copy_as(&img, &format!("v{v}.qcow2"));
        set_be32(&t, hdr::VERSION, v);
        assert_qemu_rejects(&t);
        expect_open_error(
            &t,
            OpenOptions::default(),
            &[ErrorKind::Unsupported, ErrorKind::InvalidImage],
            &[&["version"]],
        );
    }
}

#[test]
fn bad_header_length() {
    let s = Scratch::new("bad_header_length");
    let img = plain_image(&s, "h.qcow2", "");
    for (i, len) in [50u32, 0x10000 + 8].into_iter().enumerate() {
        let t = copy_as(&img, &format!("h{i}.qcow2"));
        set_be32(&t, hdr::HEADER_LENGTH, len);
        assert_qemu_rejects(&t);
        expect_open_error(&t, OpenOptions::default(), ANY_OPEN_ERROR, &[]);
    }
}

#[test]
fn unknown_incompatible_feature_unnamed() {
    let s = Scratch::new("incompat_unnamed");
    let img = plain_image(&s, "f.qcow2", "");
    // Drop the feature name table so nothing names bit 10.
    remove_header_extension(&img, hdr::EXT_FEATURE_NAMES);
    let f = be64(&img, hdr::INCOMPATIBLE_FEATURES);
    set_be64(&img, hdr::INCOMPATIBLE_FEATURES, f | 1 << 10);
    assert_qemu_rejects(&img);
    expect_open_error(
        &img,
        OpenOptions::default(),
        &[ErrorKind::Unsupported],
        &[&["10", "0x400", "400"]],
    );
}

#[test]
fn unknown_incompatible_feature_named() {
    let s = Scratch::new("incompat_named");
    let img = plain_image(&s, "f.qcow2", "");
    let ext = header_extensions(&img)
        .into_iter()
        .find(|e| e.ty == hdr::EXT_FEATURE_NAMES)
        .expect("qemu-img writes a feature name table");
    assert!(ext.len >= 48, "test setup: empty feature name table");
    // Overwrite the first entry: incompatible bit 10, with a name of our own.
    let mut entry = vec![0u8; 48];
    entry[0] = 0; // incompatible
    entry[1] = 10;
    let name = b"frobnicated clusters";
    entry[2..2 + name.len()].copy_from_slice(name);
    write_bytes(&img, ext.data_at(), &entry);
    let f = be64(&img, hdr::INCOMPATIBLE_FEATURES);
    set_be64(&img, hdr::INCOMPATIBLE_FEATURES, f | 1 << 10);
    let (rejected, qemu_msg) = qemu_rejects(&img);
    assert!(
        rejected && qemu_msg.contains("frobnicated clusters"),
        "test setup: qemu-img should refuse naming the feature: {qemu_msg}"
    );
    expect_open_error(
        &img,
        OpenOptions::default(),
        &[ErrorKind::Unsupported],
        &[&["frobnicated clusters"]],
    );
}

#[test]
fn encrypted_aes_patched() {
    let s = Scratch::new("aes");
    for compat in ["0.10", "1.1"] {
        let img = plain_image(
            &s,
            &format!("aes-{compat}.qcow2"),
            &format!("compat={compat}"),
        );
        set_be32(&img, hdr::CRYPT_METHOD, 1);
        assert_qemu_rejects(&img);
        expect_open_error(
            &img,
            OpenOptions::default(),
            &[ErrorKind::Unsupported],
            &[&["encrypt"]],
        );
    }
}

#[test]
fn encrypted_luks() {
    let s = Scratch::new("luks");
    let img = s.join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        img.to_str().unwrap(),
        "16M",
    ]);
    assert_eq!(
        be32(&img, hdr::CRYPT_METHOD),
        2,
        "test setup: not a LUKS image"
    );
    expect_open_error(
        &img,
        OpenOptions::default(),
        &[ErrorKind::Unsupported],
        &[&["encrypt", "luks"]],
    );
}

// ---- table offsets ----------------------------------------------------------------------

#[test]
fn l1_table_offset_unaligned() {
    let s = Scratch::new("l1_unaligned");
    let img = plain_image(&s, "l1.qcow2", "");
    let off = be64(&img, hdr::L1_TABLE_OFFSET);
    set_be64(&img, hdr::L1_TABLE_OFFSET, off + 8);
    assert_qemu_rejects(&img);
    expect_open_error(&img, OpenOptions::default(), ANY_OPEN_ERROR, &[&["L1"]]);
}

#[test]
fn l1_table_offset_past_eof() {
    let s = Scratch::new("l1_eof");
    let img = plain_image(&s, "l1.qcow2", "");
    let past = (file_len(&img) / 65536 + 16) * 65536;
    set_be64(&img, hdr::L1_TABLE_OFFSET, past);
    expect_open_or_read_error(&img, (0, 16 * MIB));
}

#[test]
fn refcount_table_offset_unaligned() {
    let s = Scratch::new("rt_unaligned");
    let img = plain_image(&s, "rt.qcow2", "");
    let off = be64(&img, hdr::REFCOUNT_TABLE_OFFSET);
    set_be64(&img, hdr::REFCOUNT_TABLE_OFFSET, off + 8);
    assert_qemu_rejects(&img);
    expect_open_error(
        &img,
        OpenOptions::default(),
        ANY_OPEN_ERROR,
        &[&["refcount"]],
    );
}

#[test]
fn refcount_table_offset_past_eof() {
    let s = Scratch::new("rt_eof");
    let img = plain_image(&s, "rt.qcow2", "");
    let past = (file_len(&img) / 65536 + 16) * 65536;
    set_be64(&img, hdr::REFCOUNT_TABLE_OFFSET, past);
    // QEMU opens it (the table reads as zeros) and reads the guest data, which the refcounts
    // do not affect: so does a read-only open. Writing it is refused, naming the table.
    let want = oracle(&img);
    let what = "refcount table past the end of the file";
    check_engine(&img, what, &want).unwrap_or_else(|e| panic!("{e}"));
    check_daemon(&img, what, &want, 65536).unwrap_or_else(|e| panic!("{e}"));
    let writable = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    match try_open(&img, writable) {
        Ok(Some((_, _, chain))) => assert!(contains_ci(&chain, "refcount"), "{chain}"),
        other => panic!("a writable open of {} gave {other:?}", img.display()),
    }
}

/// Patches L1 entry 3 of a 4k-cluster image (guest 6 MiB..8 MiB) with `f(old entry)`.
fn l2_pointer_case(test: &str, f: impl Fn(u64, u64) -> u64, qemu_must_reject: bool) {
    let s = Scratch::new(test);
    let img = s.join("l2.qcow2");
    create_qcow2(&img, 16 * MIB, "cluster_size=4096");
    let cmds: Vec<String> = (0..8)
        .map(|i| format!("write -P {:#x} {} 2M", 0x10 + i, i * 2 * MIB))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &refs);
    let good_data = oracle(&img)[..MIB as usize].to_vec();
    let l1 = be64(&img, hdr::L1_TABLE_OFFSET);
    let old = be64(&img, l1 + 3 * 8);
    assert_ne!(old & hdr::L1E_OFFSET_MASK, 0, "test setup: L1[3] is empty");
    set_be64(&img, l1 + 3 * 8, f(old, file_len(&img)));
    if qemu_must_reject {
        assert_qemu_rejects(&img);
    }
    expect_bad_range(
        &img,
        (6 * MIB + 64 * KIB, 64 * KIB as usize),
        (0, MIB as usize),
        &good_data,
        true,
    );
}

#[test]
fn l2_table_offset_unaligned() {
    l2_pointer_case("l2_unaligned", |old, _| old + 512, true);
}

#[test]
fn l2_table_offset_past_eof() {
    l2_pointer_case(
        "l2_eof",
        |old, len| (old & !hdr::L1E_OFFSET_MASK) | ((len / 4096 + 100) * 4096),
        false,
    );
}

// ---- absurd sizes -----------------------------------------------------------------------

#[test]
fn cluster_bits_too_small() {
    let s = Scratch::new("cluster_bits_8");
    let img = plain_image(&s, "c8.qcow2", "");
    set_be32(&img, hdr::CLUSTER_BITS, 8);
    assert_qemu_rejects(&img);
    expect_open_error(
        &img,
        OpenOptions::default(),
        ANY_OPEN_ERROR,
        &[&["cluster"]],
    );
}

#[test]
fn cluster_bits_too_large() {
    let s = Scratch::new("cluster_bits_22");
    let img = plain_image(&s, "c22.qcow2", "");
    set_be32(&img, hdr::CLUSTER_BITS, 22);
    assert_qemu_rejects(&img);
    expect_open_error(
        &img,
        OpenOptions::default(),
        ANY_OPEN_ERROR,
        &[&["cluster"]],
    );
}

#[test]
fn l1_size_huge() {
    let s = Scratch::new("l1_huge");
    let img = plain_image(&s, "l1.qcow2", "");
    for (i, n) in [0x7fff_ffffu32, 0xffff_ffff, 4 * 1024 * 1024 + 1]
        .into_iter()
        .enumerate()
    {
        let t = copy_as(&img, &format!("l1-{i}.qcow2"));
        set_be32(&t, hdr::L1_SIZE, n);
        assert_qemu_rejects(&t);
        expect_open_error(&t, OpenOptions::default(), ANY_OPEN_ERROR, &[&["L1"]]);
    }
}

#[test]
fn l1_size_too_small_for_virtual_size() {
    let s = Scratch::new("l1_small");
    let img = s.join("l1.qcow2");
    create_qcow2(&img, 64 * MIB, "cluster_size=4096");
    qemu_io(&img, "qcow2", &["write -P 0x42 0 64M"]);
    // 64 MiB with 4 KiB clusters needs 32 L1 entries; claim 1 GiB virtual size instead.
    set_be64(&img, hdr::SIZE, 1 << 30);
    assert_qemu_rejects(&img);
    expect_open_error(&img, OpenOptions::default(), ANY_OPEN_ERROR, &[&["L1"]]);
}

#[test]
fn refcount_table_clusters_huge() {
    let s = Scratch::new("rt_huge");
    let img = plain_image(&s, "rt.qcow2", "");
    set_be32(&img, hdr::REFCOUNT_TABLE_CLUSTERS, 0x00ff_ffff);
    assert_qemu_rejects(&img);
    expect_open_error(
        &img,
        OpenOptions::default(),
        ANY_OPEN_ERROR,
        &[&["refcount"]],
    );
}

#[test]
fn virtual_size_overflows_l1() {
    let s = Scratch::new("size_overflow");
    let img = s.join("o.qcow2");
    create_qcow2(&img, 16 * MIB, "cluster_size=512");
    for (i, size) in [(1u64 << 63) - 512, !511u64, 1 << 62]
        .into_iter()
        .enumerate()
    {
        let t = copy_as(&img, &format!("o{i}.qcow2"));
        set_be64(&t, hdr::SIZE, size);
        assert_qemu_rejects(&t);
        expect_open_error(&t, OpenOptions::default(), ANY_OPEN_ERROR, &[]);
    }
}

// ---- corrupt data ------------------------------------------------------------------------

/// Text-like data (every cluster compresses well) converted with `-c`.
fn compressed_image(s: &Scratch, name: &str, compression: &str) -> (PathBuf, Vec<u8>) {
    let mut data = Vec::new();
    let mut rng = Rng::new(300);
    let mut i = 0u64;
    while data.len() < 4 * MIB as usize {
        data.extend_from_slice(
            format!(
                "line {i}: qcow2d corrupt-cluster test {}\n",
                rng.below(1000)
            )
            .as_bytes(),
        );
        i += 1;
    }
    data.truncate(4 * MIB as usize);
    let raw = s.join(&format!("{name}.raw"));
    write_file(&raw, &data);
    let img = s.join(name);
    convert_raw_to_qcow2(&raw, &img, &format!("compression_type={compression}"), true);
    (img, data)
}

/// The compressed extent of guest cluster 5 (64 KiB clusters).
fn extent_of_cluster5(img: &Path) -> CompressedExtent {
    let all = compressed_clusters(img);
    assert!(
        all.len() >= 60,
        "test setup: only {} compressed clusters",
        all.len()
    );
    let e = *all
        .iter()
        .find(|e| e.guest_off == 5 * 65536)
        .expect("cluster 5 is compressed");
    assert!(
        e.len >= 200,
        "test setup: compressed extent too short: {e:?}"
    );
    e
}

fn corrupt_compressed_case(test: &str, compression: &str, patch: &[u8]) {
    let s = Scratch::new(test);
    let (img, data) = compressed_image(&s, "c.qcow2", compression);
    let e = extent_of_cluster5(&img);
    write_bytes(&img, e.host_off, patch);
    assert_qemu_rejects(&img);
    expect_bad_range(
        &img,
        (5 * 65536 + 4096, 8192),
        (0, 256 * KIB as usize),
        &data[..256 * KIB as usize],
        false,
    );
    // The whole cluster, which the engine inflates straight into the request's memory when
    // the request gives it one segment.
    expect_bad_range(
        &img,
        (5 * 65536, 65536),
        (4 * 65536, 65536),
        &data[4 * 65536..5 * 65536],
        false,
    );
    let s = Scratch::new(&format!("{test}_one_segment"));
    let socket = s.socket("s");
    let mut d = Daemon::start(&img, &socket);
    let res = blk_session(&socket, 1, READ_TIMEOUT, move |c| {
        c.set_one_segment(true);
        c.read_batch(&[(4 * 65536, 65536), (5 * 65536, 65536), (6 * 65536, 65536)])
    })
    .unwrap_or_else(|e| panic!("daemon+blkio: {e}\ndaemon stderr:\n{}", d.stderr()));
    d.assert_alive("after a one-segment read of a damaged cluster");
    assert!(
        res[1].is_err(),
        "daemon: a one-segment read of the damaged cluster SUCCEEDED"
    );
    for (i, r) in [(4usize, &res[0]), (6, &res[2])] {
        let got = r
            .as_ref()
            .unwrap_or_else(|e| panic!("daemon: cluster {i}: {e}"));
        assert!(
            got[..] == data[i * 65536..(i + 1) * 65536],
            "daemon: cluster {i} next to the damaged one reads wrong"
        );
    }
}

#[test]
fn compressed_zlib_invalid_block() {
    // BFINAL=1, BTYPE=11 (reserved): inflate fails at once.
    corrupt_compressed_case("zlib_bad_block", "zlib", &[0x07, 0xff, 0xff, 0xff]);
}

#[test]
fn compressed_zlib_short_stream() {
    // A valid deflate stream (one final stored block) that inflates to only 100 bytes.
    let mut patch = vec![0x01, 100, 0, !100u8, 0xff];
    patch.extend_from_slice(&[b'A'; 100]);
    corrupt_compressed_case("zlib_short", "zlib", &patch);
}

#[test]
fn compressed_zstd_bad_frame() {
    corrupt_compressed_case("zstd_bad_frame", "zstd", &[0, 0, 0, 0]);
}

#[test]
fn l2_entry_data_offset_unaligned() {
    let s = Scratch::new("l2e_unaligned");
    let img = s.join("u.qcow2");
    create_qcow2(&img, 16 * MIB, "");
    qemu_io(&img, "qcow2", &["write -P 0x21 0 256k"]);
    let good = oracle(&img)[..64 * KIB as usize].to_vec();
    let (at, e) = l2_entry(&img, 3 * 65536).expect("cluster 3 mapped");
    set_be64(&img, at, e + 512);
    assert_qemu_rejects(&img);
    expect_bad_range(
        &img,
        (3 * 65536, 4096),
        (0, 64 * KIB as usize),
        &good,
        false,
    );
}

#[test]
fn extended_l2_invalid_subcluster_bitmap() {
    let s = Scratch::new("xl2_bitmap");
    let img = s.join("x.qcow2");
    create_qcow2(&img, 16 * MIB, "extended_l2=on,cluster_size=64k");
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x31 0 64k", "write -P 0x32 128k 64k"],
    );
    let good = oracle(&img)[..64 * KIB as usize].to_vec();
    let (at, _) = l2_entry(&img, 2 * 65536).expect("cluster 2 mapped");
    // Subcluster 0 both allocated (bit 0) and reading as zeros (bit 32): invalid.
    set_be64(&img, at + 8, 0xffff_ffff | 1 << 32);
    assert_qemu_rejects(&img);
    expect_bad_range(
        &img,
        (2 * 65536, 2048),
        (0, 64 * KIB as usize),
        &good,
        false,
    );
}

// ---- backing chains ---------------------------------------------------------------------

#[test]
fn backing_loop_two_images() {
    let s = Scratch::new("loop2");
    for (img, backing) in [("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")] {
        qemu_img_in(
            s.path(),
            &[
                "create", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", img, "16M",
            ],
        );
    }
    expect_open_error(
        &s.join("a.qcow2"),
        OpenOptions::default(),
        &[ErrorKind::BackingChain],
        &[&["loop", "cycle", "recurs"]],
    );
}

#[test]
fn backing_loop_self() {
    let s = Scratch::new("loop1");
    qemu_img_in(
        s.path(),
        &[
            "create", "-q", "-u", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "a.qcow2", "16M",
        ],
    );
    let img = s.join("a.qcow2");
    set_backing_name(&img, "a.qcow2");
    expect_open_error(
        &img,
        OpenOptions::default(),
        &[ErrorKind::BackingChain],
        &[&["loop", "cycle", "recurs", "itself"]],
    );
}

#[test]
fn backing_file_missing() {
    let s = Scratch::new("missing_backing");
    qemu_img_in(
        s.path(),
        &[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "16M",
        ],
    );
    expect_open_error(
        &s.join("a.qcow2"),
        OpenOptions::default(),
        &[ErrorKind::BackingChain, ErrorKind::Io],
        &[&["gone.qcow2"]],
    );
}

/// c0 (base, with data) <- c1 <- ... <- cN, each writing its own 64 KiB.
fn chain(s: &Scratch, n: usize) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for i in 0..=n {
        let name = format!("c{i}.qcow2");
        if i == 0 {
            qemu_img_in(s.path(), &["create", "-q", "-f", "qcow2", &name, "4M"]);
        } else {
            let b = format!("c{}.qcow2", i - 1);
            qemu_img_in(
                s.path(),
                &[
                    "create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &name,
                ],
            );
        }
        let p = s.join(&name);
        write_pattern(&p, "qcow2", i as u8 + 1, i as u64 * 65536, 65536);
        v.push(p);
    }
    v
}

#[test]
fn backing_chain_deeper_than_default_limit() {
    let s = Scratch::new("deep");
    let c = chain(&s, 17);
    // 16 backing files: accepted, reads right.
    let sixteen = &c[16];
    let expected = oracle(sixteen);
    check_engine(sixteen, "chain with 16 backing files", &expected)
        .unwrap_or_else(|e| panic!("{e}"));
    // 17 backing files: deeper than the default limit of 16.
    expect_open_error(
        &c[17],
        OpenOptions::default(),
        &[ErrorKind::BackingChain],
        &[&["deep", "depth", "limit", "too many", "16"]],
    );
}

#[test]
fn backing_chain_deeper_than_configured_limit() {
    let s = Scratch::new("deep_custom");
    let c = chain(&s, 3);
    let opts = OpenOptions {
        max_backing_depth: 2,
        ..OpenOptions::default()
    };
    assert!(
        try_open(&c[2], opts.clone()).unwrap().is_none(),
        "a chain of 2 backing files must open with max_backing_depth = 2"
    );
    match try_open(&c[3], opts).unwrap() {
        None => panic!("a chain of 3 backing files opened with max_backing_depth = 2"),
        Some((kind, _, chain)) => assert_eq!(kind, ErrorKind::BackingChain, "{chain}"),
    }
}

#[test]
fn backing_name_too_long() {
    let s = Scratch::new("backing_name_long");
    let img = plain_image(&s, "b.qcow2", "");
    // A backing name of 4000 bytes "stored" in the header cluster.
    set_be64(&img, hdr::BACKING_FILE_OFFSET, 512);
    set_be32(&img, hdr::BACKING_FILE_SIZE, 4000);
    write_bytes(&img, 512, &[b'x'; 4000]);
    assert_qemu_rejects(&img);
    expect_open_error(
        &img,
        OpenOptions::default(),
        &[
            ErrorKind::InvalidImage,
            ErrorKind::BackingChain,
            ErrorKind::Unsupported,
        ],
        &[],
    );
}

/// The timeouts above are generous: an absurd L1 size must also be refused quickly, without
/// allocating or reading gigabytes first.
#[test]
fn huge_l1_size_is_refused_quickly() {
    let s = Scratch::new("fast");
    let img = plain_image(&s, "f.qcow2", "");
    set_be32(&img, hdr::L1_SIZE, 0x7fff_ffff);
    let t = std::time::Instant::now();
    let _ = try_open(&img, OpenOptions::default()).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "Image::open of an image claiming a 16 GiB L1 table took {:?}",
        t.elapsed()
    );
}
