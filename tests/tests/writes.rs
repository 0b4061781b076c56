//! Writable exports through the socket: the real `qcow2d serve` binary and an independent
//! vhost-user-blk client (`blkio`) with 2 queues.
//!
//! Model-based: each case makes an image with `qemu-img`/`qemu-io`, takes its content as
//! `qemu-img convert -O raw` reads it as a flat model, and runs a seeded random sequence of
//! batches of concurrent non-overlapping reads (checked against the model), writes of random
//! data, write-zeroes with and without unmap, discards and flushes, with random sizes and
//! 512-byte alignments. Half way the client disconnects and a second client continues on the
//! same model. Then the whole disk is read back through the socket, the daemon gets SIGTERM
//! (exit status 0), `qemu-img check` must report no errors and no leaks, and `qemu-img compare`
//! must find the image equal to the model.
//!
//! Discard is only a hint: fully covered clusters (subclusters with extended L2) read as zeros,
//! partly covered ones are unchanged, and images with an external data file or compat=0.10
//! images with a backing file ignore it (the engine's contract, as in
//! `engine/tests/write_model.rs`).
//!
//! Also: `--writethrough` (every completed write survives kill -9 without a flush),
//! `--lazy-refcounts` (dirty bit while serving, clean after SIGTERM), and interoperability
//! with QEMU in both directions.

use qcow2d_tests::*;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Limit for one client session (all its batches).
const SESSION_TIMEOUT: Duration = Duration::from_secs(120);

/// Random batches per model-based case (half per client session): 400, or
/// `$QCOW2D_WRITE_BATCHES` for longer runs.
fn batches() -> usize {
    std::env::var("QCOW2D_WRITE_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// The disk as the guest must see it, and how discard behaves on the image.
#[derive(Clone)]
struct Model {
    data: Vec<u8>,
    /// Discard zeroes fully covered aligned granules of this size; `None`: discard is ignored.
    granule: Option<u64>,
}

/// What discard does on `img`, from its header: nothing with an external data file or on a
/// compat=0.10 image with a backing file; otherwise it zeroes whole clusters (subclusters with
/// extended L2 entries).
fn discard_granule(img: &Path) -> Option<u64> {
    let version = be32(img, hdr::VERSION);
    let cluster = 1u64 << be32(img, hdr::CLUSTER_BITS);
    let has_backing = be64(img, hdr::BACKING_FILE_OFFSET) != 0;
    let incompat = if version >= 3 {
        be64(img, hdr::INCOMPATIBLE_FEATURES)
    } else {
        0
    };
    let data_file = incompat & (1 << 2) != 0;
    if data_file || (version == 2 && has_backing) {
        return None;
    }
    Some(if incompat & hdr::INCOMPAT_EXTENDED_L2 != 0 {
        cluster / 32
    } else {
        cluster
    })
}

impl Model {
    /// The image's current content (the oracle) and its discard behaviour.
    fn of(img: &Path) -> Model {
        Model {
            data: oracle(img),
            granule: discard_granule(img),
        }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn range(&self, off: u64, len: u64) -> &[u8] {
        &self.data[off as usize..(off + len) as usize]
    }

    /// Applies a completed request.
    fn apply(&mut self, op: &BlkOp) {
        match op {
            BlkOp::Read { .. } | BlkOp::Flush => {}
            BlkOp::Write { off, data } => {
                self.data[*off as usize..*off as usize + data.len()].copy_from_slice(data)
            }
            BlkOp::WriteZeroes { off, len, .. } => {
                self.data[*off as usize..(*off + *len) as usize].fill(0)
            }
            BlkOp::Discard { off, len } => {
                let Some(g) = self.granule else { return };
                let end = off + len;
                let a = off.div_ceil(g) * g;
                let e = if end == self.size() {
                    end
                } else {
                    (end / g * g).max(a)
                };
                if a < e {
                    self.data[a as usize..e as usize].fill(0);
                }
            }
        }
    }

    /// Checks the results of a batch (reads against the model as it was before the batch;
    /// every request must succeed), then applies the batch.
    fn check_and_apply(&mut self, what: &str, ops: &[BlkOp], results: &[OpResult]) {
        for (op, r) in ops.iter().zip(results) {
            let data = r
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: {} FAILED: {e}", op.describe()));
            if let BlkOp::Read { off, len } = op {
                if let Some(m) =
                    first_difference(what, "model", *off, self.range(*off, *len as u64), data)
                {
                    panic!("{m}");
                }
            }
        }
        for op in ops {
            self.apply(op);
        }
    }

    /// Writes the model to `path` (for `qemu-img compare`).
    fn save(&self, path: &Path) {
        write_file(path, &self.data);
    }
}

// ---------------------------------------------------------------------------------------------
// Random batches
// ---------------------------------------------------------------------------------------------

/// How random sequences are shaped for one image.
#[derive(Clone, Copy)]
struct Shape {
    cluster: u64,
    /// Requests land in [0, hot) so that they overlap over time.
    hot: u64,
    size: u64,
}

/// A random length in bytes (multiple of 512): mostly small, sometimes up to `max`.
fn random_len(rng: &mut Rng, max: u64) -> u64 {
    let sectors = match rng.below(10) {
        0..=5 => 1 + rng.below(16),
        6..=8 => 1 + rng.below(256),
        _ => 1 + rng.below(max / 512),
    };
    (sectors * 512).min(max)
}

/// A random 512-aligned offset in [0, hot - len]; a third of them cluster-aligned.
fn random_off(rng: &mut Rng, s: Shape, len: u64) -> u64 {
    let room = s.hot - len;
    if rng.below(3) == 0 && s.cluster <= room {
        rng.below(room / s.cluster + 1) * s.cluster
    } else {
        rng.below(room / 512 + 1) * 512
    }
}

/// One batch of up to 16 concurrent requests whose ranges do not overlap.
fn random_batch(rng: &mut Rng, s: Shape) -> Vec<BlkOp> {
    let n = 1 + rng.below(16);
    let mut ops = Vec::new();
    let mut taken: Vec<(u64, u64)> = Vec::new();
    for _ in 0..n {
        let kind = rng.below(100);
        if kind >= 92 {
            ops.push(BlkOp::Flush);
            continue;
        }
        let max = if kind < 60 {
            SLOT_BYTES as u64
        } else {
            8 * MIB
        };
        let len = random_len(rng, max.min(s.hot));
        let off = random_off(rng, s, len);
        // Sometimes end a zeroing request at the end of the disk.
        let (off, len) = if kind >= 60 && rng.below(20) == 0 {
            let len = len.min(s.size);
            (s.size - len, len)
        } else {
            (off, len)
        };
        if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
            continue;
        }
        taken.push((off, len));
        ops.push(match kind {
            0..=44 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                BlkOp::Write { off, data }
            }
            45..=59 => BlkOp::Read {
                off,
                len: len as usize,
            },
            60..=69 => BlkOp::WriteZeroes {
                off,
                len,
                unmap: true,
            },
            70..=79 => BlkOp::WriteZeroes {
                off,
                len,
                unmap: false,
            },
            _ => BlkOp::Discard { off, len },
        });
    }
    ops
}

/// Runs `batches` random batches (seeded) with a client, checking and updating the model.
fn run_batches(
    c: &mut BlkClient,
    model: &mut Model,
    s: Shape,
    rng: &mut Rng,
    batches: usize,
    what: &str,
) -> Result<(), String> {
    for b in 0..batches {
        // Now and then one request over the whole disk.
        let ops = match rng.below(150) {
            0 => vec![BlkOp::Discard {
                off: 0,
                len: s.size,
            }],
            1 => vec![BlkOp::WriteZeroes {
                off: 0,
                len: s.size,
                unmap: rng.below(2) == 0,
            }],
            _ => random_batch(rng, s),
        };
        if let Some(at) = trace_offset() {
            for op in ops
                .iter()
                .filter(|op| op.range().is_some_and(|(o, l)| o <= at && at < o + l))
            {
                eprintln!("{what}, batch {b}: {} touches {at:#x}", op.describe());
            }
        }
        let results = c.run_batch(&ops)?;
        model.check_and_apply(&format!("{what}, batch {b}"), &ops, &results);
    }
    Ok(())
}

/// `$QCOW2D_TRACE_OFFSET` (hex or decimal): print every request of the random batches that
/// touches this guest offset (for debugging a mismatch).
fn trace_offset() -> Option<u64> {
    let v = std::env::var("QCOW2D_TRACE_OFFSET").ok()?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Reads the whole disk through the client and compares it with the model.
fn check_whole_disk(c: &mut BlkClient, model: &Model, what: &str) -> Result<(), String> {
    let data = c.read_range(0, model.size())?;
    match first_difference(what, "whole disk", 0, &model.data, &data) {
        None => Ok(()),
        Some(m) => Err(m),
    }
}

// ---------------------------------------------------------------------------------------------
// Running one case
// ---------------------------------------------------------------------------------------------

/// Starts a writable daemon on `img` (with `extra` options), failing the test if it does not
/// become ready.
fn start_rw(img: &Path, socket: &Path, extra: &[&str]) -> Daemon {
    Daemon::start_writable(img, socket, extra)
        .unwrap_or_else(|f| panic!("qcow2d serve (writable) {}: {f}", img.display()))
}

/// SIGTERM, exit status 0.
fn stop_cleanly(d: Daemon, what: &str) {
    let stderr = d.stderr();
    let st = d.terminate();
    assert!(
        st.success(),
        "{what}: qcow2d exited with {st} after SIGTERM, expected 0; stderr:\n{stderr}"
    );
}

/// After the daemon stopped: no dirty or corrupt bit, `qemu-img check` clean, and the image
/// equal to the model.
fn verify_image(img: &Path, model: &Model, dir: &Path, what: &str) {
    assert!(
        !dirty_bit(img) && !corrupt_bit(img),
        "{what}: dirty/corrupt bit left set after a clean stop:\n{}",
        qemu_img_info_text(img)
    );
    assert_check_clean(img, what);
    assert_equal_to_model(img, &model.data, dir, what);
}

/// The whole model-based run on `img`: serve it writable, two client sessions of `batches / 2`
/// batches each, read back, SIGTERM, check, compare. Returns the final model.
fn model_case(s: &Scratch, img: &Path, seed: u64, batches: usize, hot: u64) -> Model {
    model_case_with(s, img, seed, batches, hot, &[], false)
}

/// [`model_case`] with more `qcow2d serve` options, and with `odd_iovecs` the second client
/// sends every other read and write with misaligned memory and odd segment lengths.
fn model_case_with(
    s: &Scratch,
    img: &Path,
    seed: u64,
    batches: usize,
    hot: u64,
    extra: &[&str],
    odd_iovecs: bool,
) -> Model {
    let what = format!("{} (seed {seed})", img.display());
    assert!(batches >= 2, "at least one batch per client session");
    let started = Instant::now();
    let mut model = Model::of(img);
    let cluster = 1u64 << be32(img, hdr::CLUSTER_BITS);
    let shape = Shape {
        cluster,
        hot: hot.min(model.size()),
        size: model.size(),
    };
    let socket = s.socket("w.sock");
    let mut d = start_rw(img, &socket, extra);
    if extra.contains(&"--direct") {
        let files = o_direct_files(d.pid());
        assert!(
            !files.is_empty(),
            "{what}: --direct, but no file is open with O_DIRECT"
        );
    }
    let mut rng = Rng::new(seed);
    for session in 0..2 {
        let w = format!("{what}, client {}", session + 1);
        let (m, r) = (model.clone(), rng.clone());
        let result = rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
            let (mut m, mut r) = (m, r);
            c.set_odd_iovecs(odd_iovecs && session == 1);
            if c.capacity() != m.size() {
                return Err(format!(
                    "{w}: device capacity {} bytes, the image has {}",
                    c.capacity(),
                    m.size()
                ));
            }
            if !c.flush_needed() {
                return Err(format!(
                    "{w}: a write-back export must report a volatile write cache"
                ));
            }
            run_batches(c, &mut m, shape, &mut r, batches / 2, &w)?;
            if session == 1 {
                check_whole_disk(c, &m, &w)?;
            }
            Ok((m, r))
        });
        match result {
            Ok((m, r)) => {
                model = m;
                rng = r;
            }
            Err(e) => panic!("{e}\n--- qcow2d stderr ---\n{}", d.stderr()),
        }
        d.assert_alive(&format!("after client {}", session + 1));
    }
    stop_cleanly(d, &what);
    verify_image(img, &model, s.path(), &what);
    eprintln!("{what}: {batches} batches in {:?}", started.elapsed());
    model
}

/// `qemu-img create -f qcow2 -o OPTS NAME SIZE` in the scratch dir.
fn create(s: &Scratch, name: &str, opts: &str, size: u64) -> PathBuf {
    let img = s.join(name);
    create_qcow2(&img, size, opts);
    img
}

/// A compressed image (`qemu-img convert -c`) of mixed data.
fn compressed(s: &Scratch, ty: &str, size: u64) -> PathBuf {
    let raw = s.join("src.raw");
    write_file(&raw, &mixed_bytes(77, size as usize));
    let img = s.join("c.qcow2");
    convert_raw_to_qcow2(&raw, &img, &format!("compression_type={ty}"), true);
    img
}

// ---------------------------------------------------------------------------------------------
// The image kinds
// ---------------------------------------------------------------------------------------------

#[test]
fn fresh_image_64k_clusters() {
    let s = Scratch::new("w_fresh");
    let img = create(&s, "f.qcow2", "", 64 * MIB);
    model_case(&s, &img, 1, batches(), 24 * MIB);
}

#[test]
fn zlib_compressed_image() {
    let s = Scratch::new("w_zlib");
    let img = compressed(&s, "zlib", 24 * MIB);
    model_case(&s, &img, 2, batches(), 24 * MIB);
}

#[test]
fn zstd_compressed_image() {
    let s = Scratch::new("w_zstd");
    let img = compressed(&s, "zstd", 24 * MIB);
    model_case(&s, &img, 3, batches(), 24 * MIB);
}

#[test]
fn backing_chain_three_deep() {
    let s = Scratch::new("w_chain");
    let d = s.path();
    // raw base (shorter than the top), qcow2 middle with its own data, qcow2 top.
    write_file(&s.join("base.raw"), &mixed_bytes(21, (20 * MIB) as usize));
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "40M",
        ],
    );
    qemu_io(
        &s.join("mid.qcow2"),
        "qcow2",
        &[
            "write -P 0x5a 1M 3M",
            "write -z 8M 1M",
            "write -P 0x5b 19M 2M",
        ],
    );
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "48M",
        ],
    );
    let top = s.join("top.qcow2");
    qemu_io(&top, "qcow2", &["write -P 0x6c 2M 64k"]);
    model_case(&s, &top, 4, batches(), 48 * MIB);
}

#[test]
fn internal_snapshot_survives_writes() {
    let s = Scratch::new("w_snap");
    let raw = s.join("src.raw");
    let before = mixed_bytes(31, (24 * MIB) as usize);
    write_file(&raw, &before);
    let img = s.join("s.qcow2");
    convert_raw_to_qcow2(&raw, &img, "", false);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    // Writes after the snapshot (by QEMU) and then by qcow2d.
    qemu_io(&img, "qcow2", &["write -P 0x44 5M 2M", "write -z 9M 256k"]);
    model_case(&s, &img, 5, batches(), 24 * MIB);
    // The snapshot, applied to a copy, still holds what it held.
    let copy = s.join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "s1", copy.to_str().unwrap()]);
    let snap = oracle(&copy);
    if let Some(m) = first_difference("snapshot s1", "applied to a copy", 0, &before, &snap) {
        panic!("the internal snapshot changed: {m}");
    }
    assert_check_clean(&copy, "copy with snapshot s1 applied");
}

#[test]
fn extended_l2_over_backing() {
    let s = Scratch::new("w_extl2");
    write_file(&s.join("base.raw"), &mixed_bytes(41, (24 * MIB) as usize));
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
            "e.qcow2",
            "24M",
        ],
    );
    let img = s.join("e.qcow2");
    qemu_io(&img, "qcow2", &["write -P 0x17 4k 6k", "write -z 70k 2k"]);
    model_case(&s, &img, 6, batches(), 24 * MIB);
}

#[test]
fn refcount_bits_1() {
    let s = Scratch::new("w_rc1");
    let img = create(&s, "r1.qcow2", "refcount_bits=1", 32 * MIB);
    model_case(&s, &img, 7, batches(), 32 * MIB);
}

#[test]
fn refcount_bits_64() {
    let s = Scratch::new("w_rc64");
    let img = create(&s, "r64.qcow2", "refcount_bits=64", 32 * MIB);
    model_case(&s, &img, 8, batches(), 32 * MIB);
}

/// 4 KiB clusters with 64-bit refcounts: many L2 tables (2 MiB each) and refcount blocks
/// (512 clusters each), so requests cross table boundaries and the file outgrows blocks.
#[test]
fn cluster_size_4k_refcount_bits_64() {
    let s = Scratch::new("w_c4k");
    let img = create(
        &s,
        "c4k.qcow2",
        "cluster_size=4k,refcount_bits=64",
        32 * MIB,
    );
    model_case(&s, &img, 14, batches(), 32 * MIB);
}

#[test]
fn cluster_size_512() {
    let s = Scratch::new("w_c512");
    let img = create(&s, "c512.qcow2", "cluster_size=512", 8 * MIB);
    model_case(&s, &img, 9, batches(), 8 * MIB);
}

#[test]
fn cluster_size_2m() {
    let s = Scratch::new("w_c2m");
    let img = create(&s, "c2m.qcow2", "cluster_size=2M", 64 * MIB);
    model_case(&s, &img, 10, batches(), 64 * MIB);
}

/// Compressed clusters with extended L2 entries (QEMU allows them; a write must replace the
/// whole cluster). A discard that covers whole subclusters but not the whole cluster must make
/// them read as zeros, through a copy of the cluster (see
/// `discard_whole_subclusters_of_compressed_and_shared_clusters`).
#[test]
fn extended_l2_compressed() {
    let s = Scratch::new("w_extc");
    let raw = s.join("src.raw");
    write_file(&raw, &mixed_bytes(15, (16 * MIB) as usize));
    let img = s.join("ec.qcow2");
    convert_raw_to_qcow2(&raw, &img, "extended_l2=on,cluster_size=128k", true);
    model_case(&s, &img, 15, batches(), 16 * MIB);
}

/// With extended L2 entries, discarding the first 16 subclusters of a compressed cluster, or of
/// a cluster shared with an internal snapshot, makes them read as zeros (docs/engine-api.md),
/// although such a cluster has no per-subcluster state: the engine writes a copy.
#[test]
fn discard_whole_subclusters_of_compressed_and_shared_clusters() {
    let s = Scratch::new("w_extd");
    let raw = s.join("src.raw");
    write_file(&raw, &vec![0x61; MIB as usize]);
    let compressed = s.join("c.qcow2");
    convert_raw_to_qcow2(&raw, &compressed, "extended_l2=on,cluster_size=128k", true);
    let shared = s.join("s.qcow2");
    convert_raw_to_qcow2(&raw, &shared, "extended_l2=on,cluster_size=128k", false);
    qemu_img(&["snapshot", "-c", "s1", shared.to_str().unwrap()]);
    let mut failures = Vec::new();
    for img in [&compressed, &shared] {
        let socket = s.socket("d.sock");
        let d = start_rw(img, &socket, &[]);
        let got = rw_session(&socket, 1, SESSION_TIMEOUT, |c| {
            // 16 whole 4 KiB subclusters of the 128 KiB cluster 0.
            c.run_ok(&[BlkOp::Discard {
                off: 0,
                len: 64 * KIB,
            }])?;
            c.read_range(0, 64 * KIB)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        stop_cleanly(d, "discard subclusters");
        assert_check_clean(img, "discard subclusters");
        if got.iter().any(|&b| b != 0) {
            failures.push(format!(
                "{}: the discarded subclusters still read {:#x}",
                img.display(),
                got[0]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Extended L2 entries with 2 MiB clusters (64 KiB subclusters), no backing file.
#[test]
fn extended_l2_2m_clusters() {
    let s = Scratch::new("w_ext2m");
    let img = create(&s, "e2m.qcow2", "extended_l2=on,cluster_size=2M", 64 * MIB);
    model_case(&s, &img, 16, batches(), 64 * MIB);
}

/// compat=0.10 over a backing file: no zero flag, so write-zeroes must write zeros or
/// allocate, and discard must not let the backing file show through (it is ignored).
#[test]
fn compat_0_10_over_backing() {
    let s = Scratch::new("w_v2b");
    write_file(&s.join("base.raw"), &mixed_bytes(17, (16 * MIB) as usize));
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
            "base.raw",
            "-F",
            "raw",
            "v2b.qcow2",
            "16M",
        ],
    );
    let img = s.join("v2b.qcow2");
    assert_eq!(discard_granule(&img), None);
    model_case(&s, &img, 17, batches(), 16 * MIB);
}

/// External data files (data_file_raw off and on): discard is ignored, write-zeroes writes
/// zeros.
#[test]
fn external_data_file() {
    for (i, raw) in ["off", "on"].into_iter().enumerate() {
        let s = Scratch::new("w_data");
        let data = s.join("x.data");
        let img = create(
            &s,
            "x.qcow2",
            &format!("data_file={},data_file_raw={raw}", data.display()),
            16 * MIB,
        );
        qemu_io(&img, "qcow2", &["write -P 0x19 1M 1M"]);
        assert_eq!(discard_granule(&img), None);
        model_case(&s, &img, 18 + i as u64, batches() / 2, 16 * MIB);
    }
}

#[test]
fn compat_0_10() {
    let s = Scratch::new("w_v2");
    let img = create(&s, "v2.qcow2", "compat=0.10", 32 * MIB);
    qemu_io(&img, "qcow2", &["write -P 0x21 0 3M"]);
    model_case(&s, &img, 11, batches(), 16 * MIB);
}

/// A client that goes away with writes in flight: the daemon finishes or drops them, each
/// 512-byte sector then holds its old or its new content, the next client continues, and the
/// image is clean after SIGTERM.
#[test]
fn client_disconnects_with_writes_in_flight() {
    let s = Scratch::new("w_abandon");
    let raw = s.join("src.raw");
    write_file(&raw, &mixed_bytes(23, (16 * MIB) as usize));
    let img = s.join("a.qcow2");
    convert_raw_to_qcow2(&raw, &img, "", true);
    let mut model = Model::of(&img);
    let socket = s.socket("w.sock");
    let mut d = start_rw(&img, &socket, &[]);
    let mut rng = Rng::new(24);
    // Non-overlapping writes, allocating and not, all left in flight.
    let mut ops = Vec::new();
    for i in 0..RW_SLOTS as u64 {
        let len = 512 * (1 + rng.below(256));
        let off = i * MIB + rng.below((MIB - len) / 512 + 1) * 512;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        ops.push(BlkOp::Write { off, data });
    }
    let o = ops.clone();
    rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        for (i, op) in o.iter().enumerate() {
            c.submit(op, i)?;
        }
        Ok(()) // dropped with the writes in flight
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let m = model.clone();
    let shape = Shape {
        cluster: 65536,
        hot: 16 * MIB,
        size: 16 * MIB,
    };
    model = rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        let mut m = m;
        let disk = c.read_range(0, m.size())?;
        for op in &ops {
            let BlkOp::Write { off, data } = op else {
                unreachable!()
            };
            for (k, new) in data.chunks(512).enumerate() {
                let at = *off as usize + k * 512;
                let (old, got) = (&m.data[at..at + 512], &disk[at..at + 512]);
                if got != old && got != new {
                    return Err(format!(
                        "sector {at:#x} of an abandoned write holds neither its old nor its new \
                         content"
                    ));
                }
            }
        }
        m.data = disk;
        let mut rng = Rng::new(25);
        run_batches(c, &mut m, shape, &mut rng, 40, "after the abandoned writes")?;
        check_whole_disk(c, &m, "after the abandoned writes")?;
        Ok(m)
    })
    .unwrap_or_else(|e| panic!("{e}\nqcow2d stderr:\n{}", d.stderr()));
    d.assert_alive("after a client left with writes in flight");
    stop_cleanly(d, "abandoned writes");
    verify_image(&img, &model, s.path(), "abandoned writes");
}

// ---------------------------------------------------------------------------------------------
// Cache modes
// ---------------------------------------------------------------------------------------------

/// `--writethrough`: the device reports no volatile write cache, and every write that
/// completed is in the image even when the daemon is killed right after, without a flush.
#[test]
fn writethrough_writes_survive_kill_9_without_flush() {
    let s = Scratch::new("w_wt");
    let img = create(&s, "wt.qcow2", "", 32 * MIB);
    let mut model = Model::of(&img);
    let socket = s.socket("w.sock");
    let d = start_rw(&img, &socket, &["--writethrough"]);
    let shape = Shape {
        cluster: 65536,
        hot: 32 * MIB,
        size: 32 * MIB,
    };
    // The client stays connected until the daemon is dead: a disconnect would let the daemon
    // flush.
    let (done_tx, done_rx) = mpsc::channel::<Result<Model, String>>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let m = model.clone();
    let sock = socket.clone();
    let client = std::thread::spawn(move || {
        let r = (|| {
            let mut c = BlkClient::connect_rw(&sock, 2)?;
            if c.flush_needed() {
                return Err(
                    "a --writethrough export must not report a volatile write cache".into(),
                );
            }
            let mut m = m;
            let mut rng = Rng::new(12);
            for b in 0..30 {
                // Writes and write-zeroes only: no flush anywhere.
                let ops: Vec<BlkOp> = random_batch(&mut rng, shape)
                    .into_iter()
                    .filter(|op| matches!(op, BlkOp::Write { .. } | BlkOp::WriteZeroes { .. }))
                    .collect();
                let results = c.run_batch(&ops)?;
                m.check_and_apply(&format!("writethrough batch {b}"), &ops, &results);
            }
            Ok((c, m))
        })();
        match r {
            Ok((c, m)) => {
                let _ = done_tx.send(Ok(m));
                let _ = release_rx.recv_timeout(Duration::from_secs(60));
                drop(c);
            }
            Err(e) => {
                let _ = done_tx.send(Err(e));
            }
        }
    });
    let result = done_rx
        .recv_timeout(SESSION_TIMEOUT)
        .unwrap_or_else(|_| panic!("writethrough client: no result within the time limit"));
    let stderr = d.stderr();
    let st = d.sigkill();
    let _ = release_tx.send(());
    model = result.unwrap_or_else(|e| panic!("writethrough client: {e}\nqcow2d stderr:\n{stderr}"));
    assert!(
        st.code().is_none(),
        "qcow2d exited ({st}) before it was killed; stderr:\n{stderr}"
    );
    with_timeout("writethrough client thread", EXIT_TIMEOUT, move || {
        client.join().unwrap()
    });

    assert!(
        !dirty_bit(&img),
        "kill -9 left the dirty bit without lazy refcounts"
    );
    let (code, v) = qemu_img_check(&img, None);
    assert_eq!(
        check_count(&v, "corruptions") + check_count(&v, "check-errors"),
        0,
        "qemu-img check after kill -9 of a writethrough export: {v}"
    );
    assert!(
        code == 0 || code == 3,
        "qemu-img check exit code {code}: {v}"
    );
    let raw = s.join("model.raw");
    model.save(&raw);
    if let Err(e) = qemu_img_compare_raw(&img, &raw) {
        panic!("completed writes of a --writethrough export lost by kill -9: {e}");
    }
    // The daemon opens the image again and reads the same.
    let d = start_rw(&img, &socket, &[]);
    let m = model.clone();
    rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        check_whole_disk(c, &m, "after restart")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    stop_cleanly(d, "writethrough restart");
}

/// `--lazy-refcounts`: the dirty bit is set while serving and cleared by SIGTERM, which leaves
/// consistent refcounts.
#[test]
fn lazy_refcounts_dirty_while_serving_clean_after_sigterm() {
    let s = Scratch::new("w_lazy");
    let img = create(&s, "lazy.qcow2", "", 32 * MIB);
    let mut model = Model::of(&img);
    let socket = s.socket("w.sock");
    let mut d = start_rw(&img, &socket, &["--lazy-refcounts"]);
    let shape = Shape {
        cluster: 65536,
        hot: 32 * MIB,
        size: 32 * MIB,
    };
    let m = model.clone();
    model = rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        let mut m = m;
        let mut rng = Rng::new(13);
        run_batches(c, &mut m, shape, &mut rng, 40, "lazy refcounts")?;
        c.run_ok(&[BlkOp::Flush])?;
        check_whole_disk(c, &m, "lazy refcounts")?;
        Ok(m)
    })
    .unwrap_or_else(|e| panic!("{e}\nqcow2d stderr:\n{}", d.stderr()));
    d.assert_alive("after the lazy-refcounts client");
    assert!(
        dirty_bit(&img),
        "--lazy-refcounts: the dirty bit must be set while serving (after writes and a flush)"
    );
    stop_cleanly(d, "lazy refcounts");
    assert!(!dirty_bit(&img), "SIGTERM must clear the dirty bit");
    verify_image(&img, &model, s.path(), "lazy refcounts");
}

// ---------------------------------------------------------------------------------------------
// Interoperability with QEMU
// ---------------------------------------------------------------------------------------------

/// `qemu-io -r -c 'read -P BYTE OFF LEN'...`: every region must hold its pattern.
fn qemu_reads_patterns(img: &Path, regions: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = regions
        .iter()
        .map(|(p, off, len)| format!("read -P {p:#x} {off} {len}"))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let mut args = vec!["-r"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    require_qemu_tools();
    let out = run_cmd(
        qemu_io_cmd()
            .current_dir(image_dir(img))
            .args(&args)
            .arg(img),
        TOOL_TIMEOUT,
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io read -P on {} ({}):\n{text}",
        img.display(),
        out.status
    );
    // qemu-io prints one "read N/N bytes at offset X" line per command that ran.
    assert_eq!(
        text.matches(" bytes at offset ").count(),
        regions.len(),
        "not every qemu-io read ran:\n{text}"
    );
}

fn w(off: u64, len: u64, byte: u8) -> BlkOp {
    BlkOp::Write {
        off,
        data: vec![byte; len as usize],
    }
}

/// An image qcow2d wrote reads identically with `qemu-io` and `qemu-img compare`.
#[test]
fn interop_qemu_reads_what_qcow2d_wrote() {
    let s = Scratch::new("w_io1");
    let img = create(&s, "a.qcow2", "", 16 * MIB);
    let mut model = Model::of(&img);
    let socket = s.socket("w.sock");
    let d = start_rw(&img, &socket, &[]);
    let batches = [
        vec![
            w(0, 64 * KIB, 0x11),
            w(64 * KIB + 512, 3 * KIB, 0x22),
            w(MIB - 4 * KIB, 12 * KIB, 0x33),
            w(2 * MIB, 256 * KIB, 0x44),
            w(4 * MIB, MIB, 0x55),
            w(7 * MIB + 1536, 100 * KIB, 0x66),
        ],
        vec![
            BlkOp::WriteZeroes {
                off: 2 * MIB + 64 * KIB,
                len: 64 * KIB,
                unmap: true,
            },
            BlkOp::WriteZeroes {
                off: 2 * MIB + 192 * KIB + 512,
                len: 7 * KIB,
                unmap: false,
            },
            BlkOp::Discard {
                off: 4 * MIB,
                len: 512 * KIB,
            },
            BlkOp::Discard {
                off: 4 * MIB + 600 * KIB,
                len: KIB,
            },
            w(7 * MIB + 4 * KIB, 8 * KIB, 0x77),
        ],
        vec![BlkOp::Flush],
    ];
    let m = model.clone();
    model = rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        let mut m = m;
        for (i, ops) in batches.iter().enumerate() {
            let r = c.run_batch(ops)?;
            m.check_and_apply(&format!("interop batch {i}"), ops, &r);
        }
        Ok(m)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    stop_cleanly(d, "interop 1");
    verify_image(
        &img,
        &model,
        s.path(),
        "interop: qcow2d wrote, qemu-img reads",
    );
    qemu_reads_patterns(
        &img,
        &[
            (0x11, 0, 64 * KIB),
            (0, 64 * KIB, 512),
            (0x22, 64 * KIB + 512, 3 * KIB),
            (0, 64 * KIB + 3584, 4 * KIB),
            (0x33, MIB - 4 * KIB, 12 * KIB),
            (0x44, 2 * MIB, 64 * KIB),
            (0, 2 * MIB + 64 * KIB, 64 * KIB),
            (0x44, 2 * MIB + 128 * KIB, 64 * KIB + 512),
            (0, 2 * MIB + 192 * KIB + 512, 7 * KIB),
            (0x44, 2 * MIB + 199 * KIB + 512, 57 * KIB - 512),
            (0, 4 * MIB, 512 * KIB),
            (0x55, 4 * MIB + 512 * KIB, 512 * KIB),
            (0x66, 7 * MIB + 1536, 4 * KIB - 1536),
            (0x77, 7 * MIB + 4 * KIB, 8 * KIB),
            (0x66, 7 * MIB + 12 * KIB, 100 * KIB + 1536 - 12 * KIB),
            (0, 8 * MIB, 8 * MIB),
        ],
    );
}

/// An image QEMU wrote (writes, write -z with and without unmap, discard, a compressed write)
/// reads identically through qcow2d; qcow2d then writes on top and QEMU reads the result
/// identically.
#[test]
fn interop_qcow2d_reads_what_qemu_wrote_then_writes_on_top() {
    let s = Scratch::new("w_io2");
    let raw = s.join("src.raw");
    let src = mixed_bytes(88, (16 * MIB) as usize);
    write_file(&raw, &src);
    let img = s.join("q.qcow2");
    convert_raw_to_qcow2(&raw, &img, "compression_type=zlib", true);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 1049088 5k",
            "write -z 2M 256k",
            "write -z -u 3M 128k",
            "discard 4M 1M",
            // Compressed writes need an unallocated cluster: the discard left some.
            "write -c -P 0x63 4352k 64k",
            "write -P 0x64 12M 3k",
        ],
    );
    // What QEMU must have made of it, independently of qemu-img convert.
    let mut expect = src;
    let mut fill = |off: u64, len: u64, b: u8| expect[off as usize..(off + len) as usize].fill(b);
    fill(0, MIB, 0x61);
    fill(MIB + 512, 5 * KIB, 0x62);
    fill(2 * MIB, 256 * KIB, 0);
    fill(3 * MIB, 128 * KIB, 0);
    fill(4 * MIB, MIB, 0);
    fill(4 * MIB + 256 * KIB, 64 * KIB, 0x63);
    fill(12 * MIB, 3 * KIB, 0x64);
    let mut model = Model::of(&img);
    if let Some(m) = first_difference("setup", "qemu-io writes", 0, &expect, &model.data) {
        panic!("test setup: qemu-img convert does not read what qemu-io wrote: {m}");
    }

    let socket = s.socket("w.sock");
    let d = start_rw(&img, &socket, &[]);
    let ops = vec![
        w(512 * KIB, 65 * KIB, 0x71),
        w(2 * MIB + 4 * KIB, 4 * KIB, 0x72),
        w(4 * MIB + 257 * KIB, KIB, 0x73),
        w(4 * MIB + 512 * KIB, 88 * KIB, 0x74),
        w(3 * MIB + 64 * KIB, 512, 0x75),
        BlkOp::WriteZeroes {
            off: MIB,
            len: 4 * KIB,
            unmap: false,
        },
        BlkOp::Discard {
            off: 8 * MIB,
            len: MIB,
        },
        w(12 * MIB + KIB, KIB, 0x76),
    ];
    let m = model.clone();
    model = rw_session(&socket, 2, SESSION_TIMEOUT, move |c| {
        let mut m = m;
        // First read everything QEMU wrote.
        check_whole_disk(c, &m, "qcow2d reading the image QEMU wrote")?;
        let r = c.run_batch(&ops)?;
        m.check_and_apply("qcow2d writes on top", &ops, &r);
        c.run_ok(&[BlkOp::Flush])?;
        check_whole_disk(c, &m, "qcow2d after its writes")?;
        Ok(m)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    stop_cleanly(d, "interop 2");
    verify_image(&img, &model, s.path(), "interop: QEMU, then qcow2d");
    qemu_reads_patterns(
        &img,
        &[
            (0x61, 0, 512 * KIB),
            (0x71, 512 * KIB, 65 * KIB),
            (0x61, 577 * KIB, MIB - 577 * KIB),
            (0, MIB, 4 * KIB),
            (0x62, MIB + 4 * KIB, 1536),
            (0, 2 * MIB, 4 * KIB),
            (0x72, 2 * MIB + 4 * KIB, 4 * KIB),
            (0, 2 * MIB + 8 * KIB, 248 * KIB),
            (0, 3 * MIB, 64 * KIB),
            (0x75, 3 * MIB + 64 * KIB, 512),
            (0, 4 * MIB, 256 * KIB),
            (0x63, 4 * MIB + 256 * KIB, KIB),
            (0x73, 4 * MIB + 257 * KIB, KIB),
            (0x63, 4 * MIB + 258 * KIB, 62 * KIB),
            (0, 4 * MIB + 320 * KIB, 192 * KIB),
            (0x74, 4 * MIB + 512 * KIB, 88 * KIB),
            (0, 4 * MIB + 600 * KIB, 424 * KIB),
            (0, 8 * MIB, MIB),
            (0x64, 12 * MIB, KIB),
            (0x76, 12 * MIB + KIB, KIB),
            (0x64, 12 * MIB + 2 * KIB, KIB),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Direct I/O (`--direct`): guest data through O_DIRECT, the second client with odd iovecs
// (misaligned memory, odd segment lengths: bounced writes, buffered reads) mixed with aligned
// ones on the same ranges
// ---------------------------------------------------------------------------------------------

#[test]
fn direct_fresh_image_64k_clusters() {
    let s = Scratch::new("w_dfresh");
    let img = create(&s, "f.qcow2", "", 64 * MIB);
    model_case_with(&s, &img, 31, batches(), 24 * MIB, &["--direct"], true);
}

#[test]
fn direct_zlib_compressed_image() {
    let s = Scratch::new("w_dzlib");
    let img = compressed(&s, "zlib", 24 * MIB);
    model_case_with(&s, &img, 32, batches(), 24 * MIB, &["--direct"], true);
}

#[test]
fn direct_over_backing_with_extended_l2() {
    let s = Scratch::new("w_dext");
    let base = create(&s, "base.qcow2", "", 32 * MIB);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x33 0 8M", "write -P 0x44 20M 4M"],
    );
    let img = create(
        &s,
        "top.qcow2",
        &format!(
            "extended_l2=on,cluster_size=128k,backing_file={},backing_fmt=qcow2",
            base.display()
        ),
        32 * MIB,
    );
    model_case_with(&s, &img, 33, batches(), 32 * MIB, &["--direct"], true);
}

#[test]
fn direct_external_data_file() {
    let s = Scratch::new("w_ddata");
    let data = s.join("x.data");
    let img = create(
        &s,
        "x.qcow2",
        &format!("data_file={},data_file_raw=on", data.display()),
        16 * MIB,
    );
    qemu_io(&img, "qcow2", &["write -P 0x19 1M 1M"]);
    model_case_with(&s, &img, 34, batches() / 2, 16 * MIB, &["--direct"], true);
}
