//! Direct I/O (`OpenOptions::direct`) through the engine API.
//!
//! Model-based like `write_model.rs`, but every request's memory is placed at a random
//! misalignment (page aligned, 512-byte aligned, 8 bytes off, 1 byte off) and split into
//! iovecs of uneven, sometimes odd lengths, and reads also start at odd byte offsets: aligned
//! requests go through the O_DIRECT descriptor, misaligned writes are bounced through an
//! aligned buffer, misaligned reads use the page cache. At the end `qemu-img check` must be
//! clean and `qemu-img compare` must find the image equal to the model. Also: guest data
//! written and read with aligned memory stays out of the page cache, and a file system that
//! refuses O_DIRECT makes the open fail with an error naming the file.
//!
//! Temp dirs come from `tempfile` (`$TMPDIR`, else /tmp); /tmp is on the root file system
//! here (ext4, direct I/O alignment 512 from statx). Were it on a file system without
//! O_DIRECT, the model tests would report the open error.

use qcow2d_engine::io::AlignedBuf;
use qcow2d_engine::{ErrorKind, Image, OpenOptions, ShardConfig};
use qcow2d_tests::{
    assert_clean_and_equal, convert_raw_to_qcow2, create_qcow2_in, oracle, qemu_io_cmd, run_ok, Rng,
};
use std::os::fd::AsRawFd;
use std::path::Path;

fn direct_writable() -> OpenOptions {
    OpenOptions {
        read_only: false,
        direct: true,
        ..OpenOptions::default()
    }
}

/// Descriptors of this process open on `path` with O_DIRECT.
fn direct_fds_on(path: &Path) -> usize {
    let want = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == want))
        .filter(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & i64::from(libc::O_DIRECT) != 0)
        })
        .count()
}

/// Request memory: a page-aligned arena, handed out at a chosen misalignment.
struct Arena {
    buf: AlignedBuf,
}

impl Arena {
    fn new(len: usize) -> Arena {
        Arena {
            buf: AlignedBuf::zeroed(len, 4096),
        }
    }
}

/// Splits `len` bytes at `base` into 1..=3 iovecs, with odd lengths when `odd`.
fn split(rng: &mut Rng, base: *mut u8, len: usize, odd: bool) -> Vec<libc::iovec> {
    let mut cuts = Vec::new();
    if len > 1024 {
        for _ in 0..rng.below(3) {
            let c = if odd {
                rng.below(len as u64 - 1) as usize + 1
            } else {
                (rng.below(len as u64 / 512 - 1) as usize + 1) * 512
            };
            cuts.push(c);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(len);
    let mut at = 0;
    cuts.into_iter()
        .map(|c| {
            // `c <= len`: inside the caller's range.
            let v = libc::iovec {
                iov_base: base.wrapping_add(at).cast(),
                iov_len: c - at,
            };
            at = c;
            v
        })
        .collect()
}

enum Op {
    Read { off: u64, len: usize, at: usize },
    Write { off: u64, len: usize, at: usize },
}

/// Seeded random batches of non-overlapping reads and writes with misaligned memory.
fn exercise(path: &Path, model: &mut [u8], seed: u64, batches: usize) {
    let img = Image::open(path, &direct_writable()).unwrap();
    let size = img.virtual_size();
    let mut shard = img.new_shard(&ShardConfig::default()).unwrap();
    let mut rng = Rng::new(seed);
    const SLOT: usize = 300 * 1024;
    let mut arena = Arena::new(SLOT * 16);
    let mut out = Vec::new();
    for b in 0..batches {
        let mut ops = Vec::new();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        for slot in 0..(rng.below(12) + 1) as usize {
            let write = rng.below(2) == 0;
            let sectors = rng.below(256) + 1;
            let (off, len) = if write || rng.below(3) > 0 {
                (rng.below(size / 512 - sectors) * 512, sectors * 512)
            } else {
                // Reads at any byte offset and length.
                let off = rng.below(size - 70_000);
                (off, rng.below(65_536) + 1)
            };
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            let misalign = [0usize, 512, 8, 1][rng.below(4) as usize];
            let at = slot * SLOT + misalign;
            let len = len as usize;
            if write {
                rng.fill(&mut arena.buf[at..at + len]);
                model[off as usize..off as usize + len].copy_from_slice(&arena.buf[at..at + len]);
                ops.push(Op::Write { off, len, at });
            } else {
                ops.push(Op::Read { off, len, at });
            }
        }
        let base = arena.buf.as_mut_ptr();
        let mut iovs = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let token = i as u64;
            let (Op::Read { off, len, at } | Op::Write { off, len, at }) = *op;
            let odd = rng.below(3) == 0;
            iovs.push(split(&mut rng, base.wrapping_add(at), len, odd));
            let iov = iovs.last().unwrap();
            // SAFETY: the arena outlives the batch, which is drained below; requests use
            // disjoint slots.
            let r = unsafe {
                match op {
                    Op::Read { .. } => shard.submit_read(token, off, iov),
                    Op::Write { .. } => shard.submit_write(token, off, iov),
                }
            };
            r.unwrap();
        }
        if rng.below(5) == 0 {
            shard.submit_flush(u64::MAX).unwrap();
        }
        shard.drain(&mut out);
        for c in out.drain(..) {
            assert!(
                c.result.is_ok(),
                "batch {b}: request {} failed: {:?}",
                c.token,
                c.result
            );
        }
        for op in &ops {
            if let Op::Read { off, len, at } = *op {
                let want = &model[off as usize..off as usize + len];
                let got = &arena.buf[at..at + len];
                if let Some(i) = (0..len).find(|&i| got[i] != want[i]) {
                    panic!(
                        "{}: batch {b}: read of {len} at {off:#x} differs from the model at {:#x}",
                        path.display(),
                        off as usize + i
                    );
                }
            }
        }
    }
    shard.flush_blocking().unwrap();
    shard.release_reserved();
    drop(shard);
    img.close().unwrap();
}

fn model_case(dir: &Path, image: &Path, seed: u64, batches: usize) {
    let mut model = oracle(image);
    exercise(image, &mut model, seed, batches);
    assert_clean_and_equal(image, &model, dir);
}

#[test]
fn misaligned_requests_on_a_direct_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2_in(dir.path(), "a.qcow2", "", "32M");
    run_ok(
        qemu_io_cmd()
            .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 3M"])
            .arg(&img),
    );
    {
        let opened = Image::open(&img, &direct_writable()).unwrap();
        assert!(
            direct_fds_on(&img) >= 1,
            "no O_DIRECT descriptor on {}",
            img.display()
        );
        drop(opened);
    }
    model_case(dir.path(), &img, 1, 120);
}

#[test]
fn compressed_image_and_backing_file_with_direct_top() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 8 << 20];
    Rng::new(5).fill(&mut data[..4 << 20]);
    for (i, b) in data[4 << 20..6 << 20].iter_mut().enumerate() {
        *b = b"direct io "[i % 10];
    }
    std::fs::write(&raw, &data).unwrap();
    let base = dir.path().join("base.qcow2");
    convert_raw_to_qcow2(&raw, &base, "", true);
    let top = create_qcow2_in(
        dir.path(),
        "top.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "8M",
    );
    model_case(dir.path(), &top, 2, 80);
}

#[test]
fn external_data_file_is_direct() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("x.data");
    let opts = format!("data_file={},data_file_raw=on", data.display());
    let img = create_qcow2_in(dir.path(), "x.qcow2", &opts, "16M");
    {
        let _opened = Image::open(&img, &direct_writable()).unwrap();
        assert!(direct_fds_on(&data) >= 1);
    }
    model_case(dir.path(), &img, 3, 80);
}

/// Clusters smaller than a page share pages with metadata: data stays buffered (a warning
/// says so), and everything still reads and writes correctly.
#[test]
fn small_clusters_stay_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_qcow2_in(dir.path(), "s.qcow2", "cluster_size=512", "4M");
    {
        let _opened = Image::open(&img, &direct_writable()).unwrap();
        assert_eq!(direct_fds_on(&img), 0);
    }
    model_case(dir.path(), &img, 4, 60);
}

/// Pages of `path` in the page cache (bytes).
fn cached_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared mapping of a file we keep open for the call; only its
    // residency is queried, nothing is read through it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` is a mapping of `len` bytes; `vec` has one byte per page.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    // SAFETY: unmaps what was mapped above.
    unsafe { libc::munmap(map, len) };
    assert_eq!(rc, 0);
    vec.iter().filter(|&&v| v & 1 != 0).count() as u64 * 4096
}

fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain syscall on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// 8 MiB written and read back with page-aligned memory leave (almost) nothing in the page
/// cache with direct I/O, and all of it without.
#[test]
fn aligned_guest_data_bypasses_the_page_cache() {
    const DATA: usize = 8 << 20;
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = create_qcow2_in(dir.path(), "p.qcow2", "", "64M");
        drop_cache(&img);
        let opts = OpenOptions {
            direct,
            ..direct_writable()
        };
        let image = Image::open(&img, &opts).unwrap();
        let mut buf = AlignedBuf::zeroed(DATA, 4096);
        Rng::new(9).fill(&mut buf);
        image.write_at(&buf, 16 << 20).unwrap();
        let mut back = AlignedBuf::zeroed(DATA, 4096);
        image.read_at(&mut back, 16 << 20).unwrap();
        assert!(
            back[..] == buf[..],
            "direct={direct}: data read back differs"
        );
        image.close().unwrap();
        let cached = cached_bytes(&img);
        if direct {
            assert!(
                cached < 1 << 20,
                "direct: {cached} bytes of the image are cached"
            );
        } else {
            assert!(
                cached >= DATA as u64,
                "buffered: only {cached} bytes cached"
            );
        }
    }
}

/// A file system that refuses O_DIRECT (procfs here: an external data file named
/// /proc/self/status, under an allowed /proc) makes the open fail with Unsupported, naming the file; the same image
/// opens without direct I/O.
#[test]
fn file_system_without_o_direct_is_refused_by_name() {
    const NAME: &str = "/proc/self/status";
    let dir = tempfile::tempdir().unwrap();
    let placeholder = "p".repeat(NAME.len());
    let img = create_qcow2_in(
        dir.path(),
        "e.qcow2",
        &format!("data_file={placeholder}"),
        "1M",
    );
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_bytes())
        .expect("data file name in the header");
    bytes[at..at + NAME.len()].copy_from_slice(NAME.as_bytes());
    std::fs::write(&img, &bytes).unwrap();

    // The data file lies outside the image's directory: allowed explicitly.
    let ro = OpenOptions {
        allowed_roots: vec!["/proc".into()],
        ..OpenOptions::default()
    };
    Image::open(&img, &ro).expect("opens without direct I/O");
    let err = Image::open(&img, &OpenOptions { direct: true, ..ro })
        .err()
        .expect("direct I/O on procfs is refused");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let text = err.to_string();
    assert!(text.contains(NAME) && text.contains("O_DIRECT"), "{text}");
}
