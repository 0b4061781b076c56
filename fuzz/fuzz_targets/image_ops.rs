//! Random batches of reads, writes, write-zeroes, discards and flushes on a fresh writable
//! image (one of a few layouts made by `qemu-img` once per process), through one or two shards
//! of the engine's public API, checked against a flat in-memory model of the disk: every read
//! must return what the model holds. At the end the image is closed; the engine's check must
//! find no corruption and no leak, and a fresh open must read the whole disk as the model.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2d_engine::{Image, ImageInfo, OpenOptions, Shard};
use qcow2d_fuzz::{drain_all, on_shard, qemu_img, qemu_io_raw, read, scratch_dir, scratch_file};

/// Virtual size of every template.
const SIZE: u64 = 2 << 20;
const SECTORS: u64 = SIZE / 512;

/// One image layout: its file and the disk it holds.
struct Template {
    file: Vec<u8>,
    disk: Vec<u8>,
    lazy_refcounts: bool,
}

/// The layouts: (qemu-img create options, compressed pattern data, lazy refcounts).
const LAYOUTS: &[(&str, bool, bool)] = &[
    ("cluster_size=512", false, false),
    ("cluster_size=4096,refcount_bits=1", false, false),
    ("cluster_size=65536,extended_l2=on", false, false),
    ("cluster_size=4096,compat=0.10", false, false),
    ("cluster_size=4096", true, false),
    ("cluster_size=16384,extended_l2=on", true, false),
    ("cluster_size=4096,lazy_refcounts=on", false, true),
    ("cluster_size=2048,refcount_bits=64", false, false),
];

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = scratch_dir();
        LAYOUTS
            .iter()
            .enumerate()
            .map(|(i, &(opts, compressed, lazy))| {
                let image = dir.join(format!("template-{i}.qcow2"));
                let size = SIZE.to_string();
                let disk = if compressed {
                    let raw = dir.join(format!("template-{i}.raw"));
                    std::fs::write(&raw, vec![0u8; SIZE as usize]).unwrap();
                    qemu_io_raw(
                        &raw,
                        &[
                            "write -P 0x5a 0 256k",
                            "write -P 0x33 512k 300k",
                            "write -P 0xc1 1536k 64k",
                        ],
                    );
                    let p = image.to_str().unwrap();
                    qemu_img(&[
                        "convert",
                        "-q",
                        "-c",
                        "-f",
                        "raw",
                        "-O",
                        "qcow2",
                        "-o",
                        opts,
                        raw.to_str().unwrap(),
                        p,
                    ]);
                    std::fs::read(&raw).unwrap()
                } else {
                    let p = image.to_str().unwrap();
                    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p, &size]);
                    vec![0u8; SIZE as usize]
                };
                Template {
                    file: std::fs::read(&image).unwrap(),
                    disk,
                    lazy_refcounts: lazy,
                }
            })
            .collect()
    })
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { sector: u16, count: u8 },
    Write { sector: u16, count: u8, fill: u8 },
    Zero { sector: u16, count: u8, unmap: bool },
    Discard { sector: u16, count: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    layout: u8,
    two_shards: bool,
    batches: Vec<(Vec<Op>, bool)>,
}

/// Which aligned granules a discard zeroes (None: never).
fn discard_granule(info: &ImageInfo) -> Option<u64> {
    if info.data_file.is_some() {
        return None;
    }
    Some(if info.extended_l2 {
        info.cluster_size / 32
    } else {
        info.cluster_size
    })
}

/// The bytes of a write: `fill` mixed with the position, so that misplaced data shows.
fn pattern(buf: &mut [u8], offset: u64, fill: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *b = fill ^ (at >> 9) as u8 ^ (at as u8).rotate_left(3);
    }
}

/// (offset, length) of `count` sectors at `sector`, clipped to the disk; None when empty.
fn range(sector: u16, count: u64) -> Option<(u64, u64)> {
    let start = u64::from(sector) % SECTORS;
    let count = count.clamp(1, SECTORS - start);
    Some((start * 512, count * 512))
}

/// One request of a batch: the operation, its disk range, and its data (reads and writes
/// only: a write-zeroes or a discard carries none).
struct Planned {
    op: Op,
    off: u64,
    len: u64,
    buf: Vec<u8>,
}

/// What a read buffer holds before the read: bytes a read would leave unwritten show as a
/// difference from the model wherever it does not hold this value.
const POISON: u8 = 0xa5;

fn submit_all(shards: &mut [Shard], ops: &mut [Planned], flush: bool) {
    let n = shards.len();
    for (i, Planned { op, off, len, buf }) in ops.iter_mut().enumerate() {
        let shard = &mut shards[i % n];
        let token = i as u64;
        let (off, len) = (*off, *len);
        let r = match op {
            Op::Read { .. } => {
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: `buf` lives in `ops` until the batch is drained by the caller.
                unsafe { shard.submit_read(token, off, &iov) }
            }
            Op::Write { .. } => {
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: as above.
                unsafe { shard.submit_write(token, off, &iov) }
            }
            Op::Zero { unmap, .. } => shard.submit_write_zeroes(token, off, len, *unmap),
            Op::Discard { .. } => shard.submit_discard(token, off, len),
        };
        r.unwrap_or_else(|e| panic!("submitting {op:?} at {off:#x}: {e}"));
    }
    if flush {
        shards[0].submit_flush(u64::MAX).unwrap();
    }
}

fn run(input: Input) {
    let templates = templates();
    let layout = usize::from(input.layout) % templates.len();
    let t = &templates[layout];
    let path = scratch_file("ops.qcow2", &t.file);
    MODELS.with_borrow_mut(|models| {
        if models.is_empty() {
            models.extend(templates.iter().map(|t| Model {
                disk: t.disk.clone(),
                changed: Vec::new(),
            }));
        }
        let model = &mut models[layout];
        // Back to the template's disk: the ranges the last execution on this layout changed
        // are copied from it again (the whole 2 MiB would cost every execution a copy).
        for (at, len) in model.changed.drain(..) {
            model.disk[at..at + len].copy_from_slice(&t.disk[at..at + len]);
        }
        debug_assert!(model.disk == t.disk);
        run_on(input, t, &path, model);
    });
}

/// The flat model of one layout's disk, and the byte ranges (offset, length) the current
/// execution changed in it.
struct Model {
    disk: Vec<u8>,
    changed: Vec<(usize, usize)>,
}

thread_local! {
    /// One model per layout, made once and brought back to the template's disk by its
    /// changed ranges; and the buffer the reopened disk is read into, allocated once (a fresh
    /// 2 MiB buffer costs every execution its page faults).
    static MODELS: std::cell::RefCell<Vec<Model>> = const { std::cell::RefCell::new(Vec::new()) };
    static DISK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn run_on(input: Input, t: &Template, path: &Path, m: &mut Model) {
    let options = OpenOptions {
        read_only: false,
        lazy_refcounts: t.lazy_refcounts,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &options).expect("a fresh image must open");
    let granule = discard_granule(&image.info());
    let count = if input.two_shards { 2 } else { 1 };
    let mut shards = image.new_shards(&on_shard(), count).unwrap();
    let mut out = Vec::new();
    for (b, (batch, flush)) in input.batches.into_iter().take(16).enumerate() {
        // Requests in flight together never overlap (a guest gets no ordering between them).
        let mut ops: Vec<Planned> = Vec::new();
        for op in batch.into_iter().take(24) {
            let r = match &op {
                Op::Read { sector, count } => range(*sector, u64::from(*count)),
                Op::Write { sector, count, .. } => range(*sector, u64::from(*count)),
                Op::Zero { sector, count, .. } => range(*sector, u64::from(*count)),
                Op::Discard { sector, count } => range(*sector, u64::from(*count)),
            };
            let Some((off, len)) = r else { continue };
            if ops.iter().any(|p| off < p.off + p.len && p.off < off + len) {
                continue;
            }
            let buf = match &op {
                Op::Read { .. } => vec![POISON; len as usize],
                Op::Write { fill, .. } => {
                    let mut buf = vec![0u8; len as usize];
                    pattern(&mut buf, off, *fill);
                    buf
                }
                Op::Zero { .. } | Op::Discard { .. } => Vec::new(),
            };
            ops.push(Planned { op, off, len, buf });
        }
        submit_all(&mut shards, &mut ops, flush);
        drain_all(&mut shards, &mut out);
        for c in out.drain(..) {
            assert!(
                c.result.is_ok(),
                "batch {b}: request {} failed: {:?}",
                c.token,
                c.result
            );
        }
        for Planned { op, off, len, buf } in &ops {
            let (at, len) = (*off as usize, *len as usize);
            let model = &mut m.disk;
            if !matches!(op, Op::Read { .. }) {
                m.changed.push((at, len));
            }
            match op {
                Op::Read { .. } => {
                    // A slice comparison (memcmp) first: a loop is instrumented byte by byte.
                    if buf[..] != model[at..at + len] {
                        let i = (0..len).find(|&i| buf[i] != model[at + i]).unwrap_or(0);
                        panic!(
                            "batch {b}: read at {off:#x} differs from the model at {:#x}",
                            at + i
                        );
                    }
                }
                Op::Write { .. } => model[at..at + len].copy_from_slice(buf),
                Op::Zero { .. } => model[at..at + len].fill(0),
                Op::Discard { .. } => {
                    if let Some(g) = granule {
                        let end = off + len as u64;
                        let a = off.div_ceil(g) * g;
                        let e = if end == SIZE {
                            end
                        } else {
                            (end / g * g).max(a)
                        };
                        if a < e {
                            model[a as usize..e as usize].fill(0);
                        }
                    }
                }
            }
        }
    }
    for shard in &mut shards {
        shard.flush_blocking().expect("final flush");
        shard.release_reserved();
    }
    drop(shards);
    image.close().expect("clean close");
    drop(image);
    verify(path, &m.disk);
}

/// The closed image is consistent and holds the model.
fn verify(path: &Path, model: &[u8]) {
    let report = qcow2d_engine::check(path, false).expect("check after close");
    assert!(
        report.exit_code() == 0,
        "check after close: {} corruptions, {} leaks, {} check errors\n{report}",
        report.corruptions,
        report.leaks,
        report.check_errors
    );
    let image = Image::open(path, &OpenOptions::default()).expect("reopen");
    let mut shard = image.new_shard(&on_shard()).unwrap();
    DISK.with_borrow_mut(|buf| {
        // Poisoned, so that bytes a read would leave unwritten cannot pass for the model's.
        buf.clear();
        buf.resize(SIZE as usize, POISON);
        assert!(read(&mut shard, buf, 0), "reading the reopened image");
        if buf[..] != model[..] {
            let i = (0..buf.len()).find(|&i| buf[i] != model[i]).unwrap_or(0);
            panic!("after reopening, the disk differs from the model at {i:#x}");
        }
    });
}

fuzz_target!(|input: Input| run(input));
