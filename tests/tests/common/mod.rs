//! Shared helpers for the integration tests.
//!
//! - external tools (`qemu-img`, `qemu-io`) run with a timeout and fail loudly;
//! - deterministic pseudo-random data, images made at test time in a private temp dir;
//! - the oracle (`qemu-img convert -O raw`) and byte-for-byte comparison;
//! - reading through the engine (`Image::read_at`) and through the daemon's socket with a
//!   vhost-user-blk client (`blkio`), every wait bounded by a timeout;
//! - big-endian header parsing and patching for the bad-image tests;
//! - a raw vhost-user-blk frontend with its own guest memory, for hostile-frontend tests
//!   (`frontend`).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod frontend;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Limit for one run of qemu-img / qemu-io.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for reading a whole (small) image through the engine or the socket.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for the daemon to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for the daemon to exit after SIGTERM, or after failing to start.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit for opening a (possibly malicious) image.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Running things with a timeout
// ---------------------------------------------------------------------------------------------

/// Runs `f` on its own thread and waits at most `timeout` for it. A panic inside `f` is turned
/// into a test failure that says so; a timeout fails the test (the thread is left behind: the
/// test process ends soon after).
pub fn with_timeout<T, F>(what: &str, timeout: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match try_with_timeout(what, timeout, f) {
        Ok(v) => v,
        Err(msg) => panic!("{msg}"),
    }
}

/// Like [`with_timeout`], but returns the panic or timeout as `Err(message)`.
pub fn try_with_timeout<T, F>(what: &str, timeout: Duration, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("timed: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a thread");
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = handle.join();
            Ok(v)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let payload = handle.join().err();
            let msg = payload
                .as_ref()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "(no message)".into());
            Err(format!("{what}: PANICKED: {msg}"))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "{what}: HUNG: no result after {} s",
            timeout.as_secs()
        )),
    }
}

/// What a finished external command left behind.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn describe_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("   (cwd {})", dir.display()));
    }
    s
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Runs `cmd` to completion, killing it after `timeout`. Fails the test if it cannot be
/// started or times out; a non-zero exit is returned, not a failure.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let desc = describe_cmd(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
    let out = spawn_reader(child.stdout.take().unwrap());
    let err = spawn_reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{desc}` did not finish within {} s; stderr so far: {}",
                timeout.as_secs(),
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    CmdOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` and fails the test unless it exits 0. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = describe_cmd(cmd);
    let out = run_cmd(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "`{desc}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fails the test (never skips it) when a tool the tests need is missing.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    find_in_path(tool).unwrap_or_else(|| {
        panic!(
            "MISSING TOOL: `{tool}` is not in PATH; these tests need it. Install the Debian \
             package `{package}` (.ci/run does)."
        )
    })
}

/// qemu-img and qemu-io (package qemu-utils).
pub fn require_qemu_tools() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
}

/// `qemu-img ARGS`, must succeed; returns stdout.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    require_qemu_tools();
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-img ARGS` run in directory `cwd`, must succeed.
pub fn qemu_img_in<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> String {
    require_qemu_tools();
    run_ok(Command::new("qemu-img").current_dir(cwd).args(args))
}

/// `qemu-img create -f qcow2 -u -b BACKING -F FMT IMG 16M` in `dir` (the backing file is not
/// opened, so it may be anything).
pub fn overlay_in(dir: &Path, img: &str, backing: &str, fmt: &str) {
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, img, "16M",
        ],
    );
}

/// A 16 MiB image `dir/top.qcow2` whose guest data lies raw in the external data file
/// `data_file` (as the image names it: relative to `dir`, or absolute). Returns its path.
pub fn data_file_image_in(dir: &Path, data_file: &str) -> PathBuf {
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data_file},data_file_raw=on"),
            "top.qcow2",
            "16M",
        ],
    );
    dir.join("top.qcow2")
}

/// `qemu-io -f FMT -c CMD... IMG`, must succeed. qemu-io reports some failures only on stdout
/// and still exits 0, so its output is checked as well.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    require_qemu_tools();
    let mut c = Command::new("qemu-io");
    c.current_dir(image_dir(img));
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(img);
    let desc = describe_cmd(&c);
    let out = run_cmd(&mut c, TOOL_TIMEOUT);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "`{desc}` failed ({}):\n{text}",
        out.status
    );
}

/// The directory of an image. QEMU resolves a relative external data file name against the
/// current directory (backing file names against the image's directory), so the tests run
/// qemu tools there, which makes both resolve the same way.
pub fn image_dir(img: &Path) -> &Path {
    img.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `qemu-img info` of an image, for failure messages (never fails).
pub fn qemu_img_info_text(img: &Path) -> String {
    let out = run_cmd(
        Command::new("qemu-img")
            .current_dir(image_dir(img))
            .arg("info")
            .arg("-U")
            .arg(img),
        TOOL_TIMEOUT,
    );
    format!("{}{}", out.stdout, out.stderr)
}

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, seeded, good enough for test data.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` seeded random (incompressible) bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// A mix of regions: all-zero, random (incompressible), text-like (compresses well), and a
/// repeating counter pattern. Region lengths run from 4 KiB to 4 MiB so that, whatever the
/// cluster size, some clusters are stored compressed, some uncompressed and some not at all.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "qcow2", "cluster", "refcount", "backing", "guest", "sector", "virtio", "queue", "lorem",
        "ipsum", "dolor", "compress", "zstd", "deflate", "\n", "  ", "0123", "L2",
    ];
    let mut rng = Rng::new(seed);
    let mut v = vec![0u8; len];
    let mut pos = 0;
    let mut kind = 0;
    while pos < len {
        let region = (4096usize << rng.below(11)).min(len - pos);
        let r = &mut v[pos..pos + region];
        match kind % 4 {
            0 => {} // zeros
            1 => rng.fill(r),
            2 => {
                let mut i = 0;
                while i < r.len() {
                    let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                    let n = w.len().min(r.len() - i);
                    r[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            _ => {
                let base = rng.next_u64();
                for (i, b) in r.iter_mut().enumerate() {
                    *b = (base as usize).wrapping_add(i / 16) as u8;
                }
            }
        }
        pos += region;
        kind += 1 + rng.below(3) as usize;
    }
    v
}

/// Writes `data` to a new raw file.
pub fn write_file(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Temp dirs and image making
// ---------------------------------------------------------------------------------------------

/// A private temp dir for one test. Kept on disk when `QCOW2D_KEEP_TEMP` is set.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        // Socket paths must stay under 108 bytes: use a short base.
        let base = std::env::var_os("QCOW2D_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("q2d-{}-", &test[..test.len().min(24)]))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", base.display()));
        let path = dir.path().to_path_buf();
        let dir = if std::env::var_os("QCOW2D_KEEP_TEMP").is_some() {
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Scratch { dir, path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    /// A socket path in this dir (short enough for sun_path).
    pub fn socket(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        assert!(
            p.as_os_str().len() < 100,
            "socket path too long for a unix socket: {}",
            p.display()
        );
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        drop(self.dir.take());
    }
}

/// `qemu-img create -f qcow2 -o OPTS IMG SIZE`.
pub fn create_qcow2(img: &Path, size: u64, opts: &str) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(img.display().to_string());
    args.push(size.to_string());
    qemu_img(&args);
}

/// `qemu-img convert -f raw -O qcow2 [-c] -o OPTS RAW IMG`.
pub fn convert_raw_to_qcow2(raw: &Path, img: &Path, opts: &str, compress: bool) {
    let mut args: Vec<String> = vec!["convert".into(), "-f".into(), "raw".into()];
    args.extend(["-O".into(), "qcow2".into()]);
    if compress {
        args.push("-c".into());
    }
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(raw.display().to_string());
    args.push(img.display().to_string());
    qemu_img(&args);
}

/// `qemu-io -c 'write -P BYTE OFF LEN'`.
pub fn write_pattern(img: &Path, fmt: &str, byte: u8, off: u64, len: u64) {
    qemu_io(img, fmt, &[&format!("write -P {byte:#x} {off} {len}")]);
}

/// The oracle: the image as `qemu-img convert -O raw` reads it.
pub fn oracle(img: &Path) -> Vec<u8> {
    let out = img.with_extension(format!(
        "oracle-{}.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    qemu_img_in(
        image_dir(img),
        &[
            OsStr::new("convert"),
            OsStr::new("-U"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            img.as_os_str(),
            out.as_os_str(),
        ],
    );
    let data = fs::read(&out).unwrap_or_else(|e| panic!("read {}: {e}", out.display()));
    let _ = fs::remove_file(&out);
    data
}

/// `qemu-img convert -f qcow2 -O raw` on a broken image: true when qemu refuses it (open or
/// read).
pub fn qemu_rejects(img: &Path) -> (bool, String) {
    require_qemu_tools();
    let out_path = img.with_extension("qemu-reject-check.raw");
    let out = run_cmd(
        Command::new("qemu-img")
            .current_dir(image_dir(img))
            .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(&out_path),
        TOOL_TIMEOUT,
    );
    let _ = fs::remove_file(&out_path);
    (!out.status.success(), out.stderr)
}

/// Asserts that qemu-img refuses the image: proves the test really broke it.
pub fn assert_qemu_rejects(img: &Path) {
    let (rejected, _) = qemu_rejects(img);
    assert!(
        rejected,
        "test setup: qemu-img still reads {} after it was broken; the patch did not break it",
        img.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Comparing against the oracle
// ---------------------------------------------------------------------------------------------

/// `None` when equal; otherwise a report of the first differing byte.
pub fn first_difference(
    what: &str,
    settings: &str,
    offset: u64,
    expected: &[u8],
    actual: &[u8],
) -> Option<String> {
    if expected == actual {
        return None;
    }
    if expected.len() != actual.len() {
        return Some(format!(
            "{what}: read at {offset:#x} returned {} bytes, expected {} [image: {settings}]",
            actual.len(),
            expected.len()
        ));
    }
    let i = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap();
    let end = (i + 16).min(expected.len());
    let ndiff = expected.iter().zip(actual).filter(|(a, b)| a != b).count();
    Some(format!(
        "{what}: MISMATCH at guest offset {:#x} (read of {} bytes at {offset:#x}, {ndiff} bytes \
         differ)\n  expected {:02x?}\n  actual   {:02x?}\n  image: {settings}",
        offset + i as u64,
        expected.len(),
        &expected[i..end],
        &actual[i..end],
    ))
}

/// One read of a plan: (guest offset, length).
pub type ReadReq = (u64, usize);

/// Whole-disk reads in 1 MiB chunks, then odd-sized reads at odd (512-aligned) offsets, reads
/// straddling cluster boundaries, the first and the last sector.
pub fn read_plan(size: u64, cluster_size: u64, seed: u64) -> Vec<ReadReq> {
    assert_eq!(
        size % 512,
        0,
        "virtual size {size} is not a multiple of 512"
    );
    let mut v = Vec::new();
    let mut off = 0;
    while off < size {
        let len = MIB.min(size - off);
        v.push((off, len as usize));
        off += len;
    }
    let sectors = size / 512;
    let mut rng = Rng::new(seed);
    for _ in 0..40 {
        let s = rng.below(sectors);
        let n = 1 + rng.below((sectors - s).min(2047));
        v.push((s * 512, (n * 512) as usize));
    }
    let clusters = size.div_ceil(cluster_size);
    for _ in 0..16 {
        let k = 1 + rng.below(clusters.max(2) - 1);
        let start = (k * cluster_size).saturating_sub(512 * (1 + rng.below(3)));
        if start < size {
            let len = (512 * (2 + rng.below(6))).min(size - start);
            v.push((start, len as usize));
        }
    }
    v.push((0, 512));
    v.push((size - 512, 512));
    v
}

/// Checks a plan's results against the oracle; the first mismatch or error.
fn check_results(
    what: &str,
    settings: &str,
    oracle: &[u8],
    plan: &[ReadReq],
    results: &[Result<Vec<u8>, String>],
) -> Result<(), String> {
    for ((off, len), r) in plan.iter().zip(results) {
        let start = *off as usize;
        match r {
            Err(e) => {
                return Err(format!(
                    "{what}: read of {len} bytes at {off:#x} FAILED: {e} [image: {settings}]"
                ))
            }
            Ok(data) => {
                if let Some(m) =
                    first_difference(what, settings, *off, &oracle[start..start + len], data)
                {
                    return Err(m);
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------------------

/// Opens the image with default options, in a thread with a timeout.
pub fn engine_open(img: &Path) -> Result<qcow2d_engine::Image, String> {
    let p = img.to_path_buf();
    try_with_timeout("Image::open", OPEN_TIMEOUT, move || {
        qcow2d_engine::Image::open(&p, &qcow2d_engine::OpenOptions::default())
            .map_err(|e| error_chain(&e))
    })?
}

/// Display of an error followed by its `source()` chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(" <- caused by: ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads `plan` with `Image::read_at`.
pub fn engine_read_plan(
    img: &Path,
    plan: &[ReadReq],
) -> Result<Vec<Result<Vec<u8>, String>>, String> {
    engine_read_plan_with(img, plan, qcow2d_engine::OpenOptions::default())
}

/// Reads `plan` with `Image::read_at`, the image opened with `opts`.
pub fn engine_read_plan_with(
    img: &Path,
    plan: &[ReadReq],
    opts: qcow2d_engine::OpenOptions,
) -> Result<Vec<Result<Vec<u8>, String>>, String> {
    let p = img.to_path_buf();
    let plan = plan.to_vec();
    try_with_timeout("engine read_at", READ_TIMEOUT, move || {
        let image = qcow2d_engine::Image::open(&p, &opts)
            .map_err(|e| format!("Image::open failed: {}", error_chain(&e)))?;
        Ok(plan
            .iter()
            .map(|&(off, len)| {
                let mut buf = vec![0u8; len];
                image
                    .read_at(&mut buf, off)
                    .map(|()| buf)
                    .map_err(|e| format!("{:?}: {}", e.kind(), error_chain(&e)))
            })
            .collect())
    })?
}

/// Opens the image with the engine and compares every read of a plan with the oracle.
pub fn check_engine(img: &Path, settings: &str, oracle: &[u8]) -> Result<(), String> {
    let (size, cluster) = {
        let image = engine_open(img).map_err(|e| format!("engine: Image::open failed: {e}"))?;
        (image.virtual_size(), image.cluster_size())
    };
    if size != oracle.len() as u64 {
        return Err(format!(
            "engine: virtual_size() = {size}, qemu-img says {} [image: {settings}]",
            oracle.len()
        ));
    }
    let plan = read_plan(size, cluster, 1);
    let results = engine_read_plan(img, &plan).map_err(|e| format!("engine: {e}"))?;
    check_results("engine read_at", settings, oracle, &plan, &results)
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The daemon binary: `$QCOW2D_BIN`, else `<target>/debug/qcow2d`. Missing: fail loudly.
pub fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QCOW2D_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "QCOW2D_BIN={} does not exist; unset it or build the daemon",
            p.display()
        );
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace_root().join(t)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    let p = target.join("debug").join("qcow2d");
    assert!(
        p.is_file(),
        "MISSING DAEMON BINARY: {} does not exist. Run `make test` (it builds the whole \
         workspace first), or `cargo build -p qcow2d`, or set QCOW2D_BIN.",
        p.display()
    );
    p
}

/// A `qcow2d` process; killed (SIGKILL) on drop unless it was stopped.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub image: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// Says (by closing) that the stderr reader has read the pipe to its end.
    stderr_done: mpsc::Receiver<()>,
    stdout_lines: mpsc::Receiver<String>,
}

/// The daemon exited (or timed out) instead of becoming ready.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub reason: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (exit status {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.reason, self.status, self.stdout, self.stderr
        )
    }
}

/// The line the daemon prints when its socket is ready.
pub fn ready_line(image: &Path, socket: &Path) -> String {
    format!(
        "qcow2d: serving {} on {}",
        image.display(),
        socket.display()
    )
}

impl Daemon {
    /// `qcow2d serve --image IMG --socket SOCK --read-only EXTRA...`, waiting for the ready line.
    pub fn start(image: &Path, socket: &Path) -> Daemon {
        Self::start_with(image, socket, &[]).unwrap_or_else(|f| panic!("qcow2d serve: {f}"))
    }

    pub fn start_with(image: &Path, socket: &Path, extra: &[&str]) -> Result<Daemon, StartFailure> {
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .arg("--read-only")
            .args(extra);
        Self::spawn(cmd, image, socket)
    }

    /// Spawns an arbitrary daemon command line and waits for the ready line for
    /// `image`/`socket`.
    pub fn spawn(mut cmd: Command, image: &Path, socket: &Path) -> Result<Daemon, StartFailure> {
        let desc = describe_cmd(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (stderr_done_tx, stderr_done) = mpsc::channel::<()>();
        {
            let stderr = stderr.clone();
            let r = child.stderr.take().unwrap();
            thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
                drop(stderr_done_tx);
            });
        }
        let (tx, rx) = mpsc::channel();
        {
            let r = child.stdout.take().unwrap();
            thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            image: image.to_path_buf(),
            stderr,
            stderr_done,
            stdout_lines: rx,
        };
        let want = ready_line(image, socket);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match d.stdout_lines.recv_timeout(left) {
                Ok(line) => {
                    if line.trim_end() == want {
                        return Ok(d);
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(d.fail(
                        seen,
                        format!(
                            "`{desc}` printed no ready line `{want}` within {} s",
                            READY_TIMEOUT.as_secs()
                        ),
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(d.fail(
                        seen,
                        format!("`{desc}` closed stdout without printing `{want}`"),
                    ))
                }
            }
        }
    }

    fn fail(&mut self, stdout: String, reason: String) -> StartFailure {
        let status = self.wait_exit(EXIT_TIMEOUT);
        if status.is_none() {
            self.kill();
        }
        // The process is gone: its stderr ends once every line is read (a busy machine may
        // take a while to schedule the reader).
        let _ = self.stderr_done.recv_timeout(EXIT_TIMEOUT);
        StartFailure {
            status,
            stdout,
            stderr: self.stderr(),
            reason,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon still owned").id() as i32
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// `Some(status)` if the daemon has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit; fails the test if it does not exit in time.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.pid();
        // SAFETY: kill(2) on the pid of a child we own and have not reaped; no memory involved.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(st) => {
                self.child = None;
                st
            }
            None => panic!(
                "qcow2d did not exit within {} s of SIGTERM; stderr:\n{}",
                EXIT_TIMEOUT.as_secs(),
                self.stderr()
            ),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails the test if the daemon has exited.
    pub fn assert_alive(&mut self, when: &str) {
        if let Some(st) = self.try_exit_status() {
            panic!("qcow2d exited ({st}) {when}; stderr:\n{}", self.stderr());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The vhost-user-blk client (blkio)
// ---------------------------------------------------------------------------------------------

/// Largest request the client submits.
pub const SLOT_BYTES: usize = MIB as usize;
/// Requests in flight at once (spread over the queues).
pub const SLOTS: usize = 8;
/// Limit for one `do_io` wait.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A vhost-user-blk client on blkio's `virtio-blk-vhost-user` driver. Not `Send`: use it inside
/// [`blk_session`].
pub struct BlkClient {
    // Field order matters: queues go before the Blkio that owns the memory region.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    max_segment_len: usize,
    max_segments: usize,
    /// Each request in as few segments as the device allows, instead of uneven ones.
    one_segment: bool,
}

fn blkio_err(what: &str, e: blkio::Error) -> String {
    format!("blkio {what}: {} (errno {})", e.message(), e.errno())
}

/// A started `virtio-blk-vhost-user` connection with `slots` request slots of memory mapped,
/// and the device's limits: what both test clients are built from.
struct Connection {
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    max_segment_len: usize,
    max_segments: usize,
    max_write_zeroes_len: u64,
    max_discard_len: u64,
    flush_needed: bool,
}

impl Connection {
    /// Connects to `socket` with `num_queues` queues of 128 descriptors.
    fn open(
        socket: &Path,
        num_queues: i32,
        read_only: bool,
        slots: usize,
    ) -> Result<Connection, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| blkio_err("new", e))?;
        b.set_str("path", &socket.display().to_string())
            .map_err(|e| blkio_err("set path", e))?;
        if read_only {
            b.set_bool("read-only", true)
                .map_err(|e| blkio_err("set read-only", e))?;
        }
        b.connect().map_err(|e| blkio_err("connect", e))?;
        b.set_i32("num-queues", num_queues)
            .map_err(|e| blkio_err("set num-queues", e))?;
        b.set_i32("queue-size", 128)
            .map_err(|e| blkio_err("set queue-size", e))?;
        let get_u64 = |b: &Blkio, name: &str| {
            b.get_u64(name)
                .map_err(|e| blkio_err(&format!("get {name}"), e))
        };
        let get_i32 = |b: &Blkio, name: &str| {
            b.get_i32(name)
                .map_err(|e| blkio_err(&format!("get {name}"), e))
        };
        let capacity = get_u64(&b, "capacity")?;
        let max_segment_len = get_i32(&b, "max-segment-len")?.max(0) as usize;
        let max_segments = get_i32(&b, "max-segments")?.max(1) as usize;
        let max_write_zeroes_len = get_u64(&b, "max-write-zeroes-len")?;
        let max_discard_len = get_u64(&b, "max-discard-len")?;
        let flush_needed = b
            .get_bool("flush-needed")
            .map_err(|e| blkio_err("get flush-needed", e))?;
        let outcome = b.start().map_err(|e| blkio_err("start", e))?;
        let region = b
            .alloc_mem_region(SLOT_BYTES * slots)
            .map_err(|e| blkio_err("alloc_mem_region", e))?;
        b.map_mem_region(&region)
            .map_err(|e| blkio_err("map_mem_region", e))?;
        Ok(Connection {
            queues: outcome.queues,
            blkio: b,
            region,
            capacity,
            max_segment_len,
            max_segments,
            max_write_zeroes_len,
            max_discard_len,
            flush_needed,
        })
    }
}

impl BlkClient {
    /// Connects to `socket`, read-only, with `num_queues` queues of 128 descriptors.
    pub fn connect(socket: &Path, num_queues: i32) -> Result<BlkClient, String> {
        let c = Connection::open(socket, num_queues, true, SLOTS)?;
        Ok(BlkClient {
            queues: c.queues,
            blkio: c.blkio,
            region: c.region,
            capacity: c.capacity,
            max_segment_len: c.max_segment_len,
            max_segments: c.max_segments,
            one_segment: false,
        })
    }

    /// Sends each request in one segment (within the device's segment size limit) instead of
    /// the default uneven ones: a whole-cluster read then reaches the server as one contiguous
    /// buffer.
    pub fn set_one_segment(&mut self, on: bool) {
        self.one_segment = on;
    }

    /// The disk size the device reports.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Splits `len` bytes at `base` into iovecs of uneven sizes (multiples of 512), or as few
    /// as the device allows with [`BlkClient::set_one_segment`].
    fn iovecs(&self, base: usize, len: usize) -> Result<Vec<libc::iovec>, String> {
        const SIZES: [usize; 5] = [3584, 61440, 131072, 512, 262144];
        let sizes: &[usize] = if self.one_segment { &[] } else { &SIZES };
        split_iovecs(base, len, self.max_segments, self.max_segment_len, sizes)
    }

    /// Reads every request of `reqs` (each at most [`SLOT_BYTES`]) with up to [`SLOTS`] in flight
    /// over all queues. Per-request result; `Err` for the whole batch on a transport failure
    /// or timeout.
    pub fn read_batch(&mut self, reqs: &[ReadReq]) -> Result<Vec<Result<Vec<u8>, String>>, String> {
        let mut results: Vec<Option<Result<Vec<u8>, String>>> = vec![None; reqs.len()];
        let mut pending: VecDeque<usize> = (0..reqs.len()).collect();
        let mut free: Vec<usize> = (0..SLOTS).rev().collect();
        // slot -> (request index, queue); iovec arrays stay alive while a request is in flight.
        let mut slot_req: Vec<Option<(usize, usize)>> = vec![None; SLOTS];
        let mut slot_iov: Vec<Vec<libc::iovec>> = vec![Vec::new(); SLOTS];
        let mut in_flight = vec![0usize; self.queues.len()];
        let mut next_queue = 0;
        let mut completions: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..SLOTS)
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        loop {
            while let (Some(&slot), Some(&idx)) = (free.last(), pending.front()) {
                free.pop();
                pending.pop_front();
                let (off, len) = reqs[idx];
                assert!(len <= SLOT_BYTES && len > 0, "bad request length {len}");
                let base = self.region.addr + slot * SLOT_BYTES;
                slot_iov[slot] = self.iovecs(base, len)?;
                let q = next_queue % self.queues.len();
                next_queue += 1;
                let iov = &slot_iov[slot];
                self.queues[q].readv(off, iov.as_ptr(), iov.len() as u32, slot, ReqFlags::empty());
                slot_req[slot] = Some((idx, q));
                in_flight[q] += 1;
            }
            if in_flight.iter().all(|&n| n == 0) {
                break;
            }
            // Kick every queue, then wait on one that has work.
            for q in 0..self.queues.len() {
                if in_flight[q] > 0 {
                    let n = self.queues[q]
                        .do_io(&mut completions, 0, None, None)
                        .map_err(|e| blkio_err("do_io", e))?;
                    self.complete(
                        &completions[..n],
                        reqs,
                        &mut results,
                        &mut slot_req,
                        &mut free,
                        &mut in_flight,
                    );
                }
            }
            if let Some(q) = (0..self.queues.len()).find(|&q| in_flight[q] > 0) {
                let mut t = IO_TIMEOUT;
                let n = self.queues[q]
                    .do_io(&mut completions, 1, Some(&mut t), None)
                    .map_err(|e| {
                        let stuck: Vec<String> = slot_req
                            .iter()
                            .flatten()
                            .map(|&(idx, q)| {
                                let (off, len) = reqs[idx];
                                format!("{len} bytes at {off:#x} on queue {q}")
                            })
                            .collect();
                        blkio_err(
                            &format!(
                                "do_io (waiting up to {} s for a completion; in flight: {})",
                                IO_TIMEOUT.as_secs(),
                                stuck.join(", ")
                            ),
                            e,
                        )
                    })?;
                self.complete(
                    &completions[..n],
                    reqs,
                    &mut results,
                    &mut slot_req,
                    &mut free,
                    &mut in_flight,
                );
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap()).collect())
    }

    fn complete(
        &self,
        done: &[std::mem::MaybeUninit<blkio::Completion>],
        reqs: &[ReadReq],
        results: &mut [Option<Result<Vec<u8>, String>>],
        slot_req: &mut [Option<(usize, usize)>],
        free: &mut Vec<usize>,
        in_flight: &mut [usize],
    ) {
        for c in done {
            // SAFETY: do_io() initialised the first n entries, and only those are passed here.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            let (idx, q) = slot_req[slot].take().expect("completion for an idle slot");
            in_flight[q] -= 1;
            free.push(slot);
            let len = reqs[idx].1;
            results[idx] = Some(if c.ret == 0 {
                let base = self.region.addr + slot * SLOT_BYTES;
                // SAFETY: the region is mapped for the client's lifetime and this slot's
                // request has completed, so nothing writes to these bytes now.
                let data = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
                Ok(data.to_vec())
            } else {
                Err(format!(
                    "request failed: {}",
                    std::io::Error::from_raw_os_error(-c.ret)
                ))
            });
        }
    }

    /// Submits up to [`SLOTS`] reads (one segment each) and returns without waiting for them:
    /// dropping the client next leaves them in flight.
    pub fn abandon_with_requests_in_flight(&mut self, reqs: &[ReadReq]) {
        for (slot, &(off, len)) in reqs.iter().take(SLOTS).enumerate() {
            let base = self.region.addr + slot * SLOT_BYTES;
            let q = slot % self.queues.len();
            self.queues[q].read(off, base as *mut u8, len, slot, ReqFlags::empty());
        }
        let mut completions: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..SLOTS)
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        for q in &mut self.queues {
            let _ = q.do_io(&mut completions, 0, None, None);
        }
    }
}

impl Drop for BlkClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Runs `f` with a client connected to `socket`, on its own thread, within `timeout`.
pub fn blk_session<T, F>(
    socket: &Path,
    num_queues: i32,
    timeout: Duration,
    f: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&mut BlkClient) -> Result<T, String> + Send + 'static,
{
    let socket = socket.to_path_buf();
    try_with_timeout("vhost-user-blk client", timeout, move || {
        let mut c = BlkClient::connect(&socket, num_queues)?;
        f(&mut c)
    })?
}

/// Serves `img` with the daemon, reads a plan through the socket with 2 queues and compares
/// every read with the oracle.
pub fn check_daemon(img: &Path, settings: &str, oracle: &[u8], cluster: u64) -> Result<(), String> {
    check_daemon_with(img, settings, oracle, cluster, &[])
}

/// [`check_daemon`] with more `qcow2d serve` options.
pub fn check_daemon_with(
    img: &Path,
    settings: &str,
    oracle: &[u8],
    cluster: u64,
    extra: &[&str],
) -> Result<(), String> {
    let sock_dir = Scratch::new("sock");
    let socket = sock_dir.socket("s");
    let mut d = Daemon::start_with(img, &socket, extra).map_err(|f| format!("daemon: {f}"))?;
    let size = oracle.len() as u64;
    let plan = read_plan(size, cluster, 2);
    let plan2 = plan.clone();
    let res = blk_session(&socket, 2, READ_TIMEOUT, move |c| {
        if c.capacity() != size {
            return Err(format!(
                "device capacity {} bytes, qemu-img says {size}",
                c.capacity()
            ));
        }
        c.read_batch(&plan2)
    });
    let exited = d
        .try_exit_status()
        .map(|st| format!("qcow2d EXITED ({st}) while or after serving the client\n"));
    let out = match res {
        Err(e) => Err(format!("daemon+blkio: {e}")),
        Ok(results) => check_results("daemon+blkio", settings, oracle, &plan, &results),
    };
    match (out, exited) {
        (Ok(()), None) => Ok(()),
        (out, exited) => Err(format!(
            "{}{}\ndaemon stderr:\n{}",
            exited.unwrap_or_default(),
            out.err().unwrap_or_default(),
            d.stderr()
        )),
    }
}

/// The whole differential check of one image: oracle, engine, daemon. Reports every failure.
pub fn check_image(img: &Path, settings: &str) {
    let oracle = oracle(img);
    let mut failures = Vec::new();
    let mut cluster = 65536;
    match engine_open(img) {
        Ok(image) => cluster = image.cluster_size(),
        Err(e) => failures.push(format!("engine: Image::open failed: {e}")),
    }
    if failures.is_empty() {
        if let Err(e) = check_engine(img, settings, &oracle) {
            failures.push(e);
        }
    }
    if let Err(e) = check_daemon(img, settings, &oracle, cluster) {
        failures.push(e);
    }
    if !failures.is_empty() {
        panic!(
            "{} ({} failure(s)):\n{}\n--- qemu-img info ---\n{}",
            img.display(),
            failures.len(),
            failures.join("\n\n"),
            qemu_img_info_text(img)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Header parsing and patching (all big endian)
// ---------------------------------------------------------------------------------------------

pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;

    pub const EXT_END: u32 = 0;
    pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
    pub const EXT_DATA_FILE: u32 = 0x4441_5441;

    pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

    pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    pub const L2E_COMPRESSED: u64 = 1 << 62;
}

pub fn read_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off)
        .unwrap_or_else(|e| panic!("read {len} bytes at {off} of {}: {e}", path.display()));
    v
}

pub fn write_bytes(path: &Path, off: u64, data: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write at {off} of {}: {e}", path.display()));
}

pub fn be32(path: &Path, off: u64) -> u32 {
    u32::from_be_bytes(read_bytes(path, off, 4).try_into().unwrap())
}

pub fn be64(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_bytes(path, off, 8).try_into().unwrap())
}

pub fn set_be32(path: &Path, off: u64, v: u32) {
    write_bytes(path, off, &v.to_be_bytes());
}

pub fn set_be64(path: &Path, off: u64, v: u64) {
    write_bytes(path, off, &v.to_be_bytes());
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

pub fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

/// One header extension: its type, the file offset of its 8-byte type/length header, and the
/// length of its data.
#[derive(Clone, Copy, Debug)]
pub struct HeaderExt {
    pub ty: u32,
    pub at: u64,
    pub len: u32,
}

impl HeaderExt {
    pub fn data_at(&self) -> u64 {
        self.at + 8
    }
}

/// The header extensions of a qcow2 file, up to the end marker.
pub fn header_extensions(path: &Path) -> Vec<HeaderExt> {
    let version = be32(path, hdr::VERSION);
    let cluster = 1u64 << be32(path, hdr::CLUSTER_BITS);
    let mut at = if version >= 3 {
        u64::from(be32(path, hdr::HEADER_LENGTH))
    } else {
        72
    };
    let mut v = Vec::new();
    while at + 8 <= cluster {
        let ty = be32(path, at);
        let len = be32(path, at + 4);
        if ty == hdr::EXT_END {
            break;
        }
        v.push(HeaderExt { ty, at, len });
        at += 8 + u64::from(len).div_ceil(8) * 8;
    }
    v
}

/// Removes one header extension, moving the ones after it forward (the backing file name,
/// which follows the extensions, stays where it is).
pub fn remove_header_extension(path: &Path, ty: u32) {
    let exts = header_extensions(path);
    let i = exts
        .iter()
        .position(|e| e.ty == ty)
        .unwrap_or_else(|| panic!("{} has no header extension {ty:#x}", path.display()));
    let start = exts[i].at;
    let next = start + 8 + u64::from(exts[i].len).div_ceil(8) * 8;
    let end = exts
        .last()
        .map(|e| e.at + 8 + u64::from(e.len).div_ceil(8) * 8)
        .unwrap();
    let tail = read_bytes(path, next, (end - next) as usize);
    write_bytes(path, start, &tail);
    // End marker and zero fill over what moved.
    let gap = (end - start) as usize - tail.len();
    write_bytes(path, start + tail.len() as u64, &vec![0u8; gap.max(8)]);
}

/// Rewrites the backing file name in place (the new name must not be longer).
pub fn set_backing_name(path: &Path, name: &str) {
    let off = be64(path, hdr::BACKING_FILE_OFFSET);
    let old = be32(path, hdr::BACKING_FILE_SIZE) as usize;
    assert!(off != 0, "{} has no backing file", path.display());
    assert!(
        name.len() <= old,
        "new backing name {name:?} longer than the old one ({old} bytes)"
    );
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize(old, 0);
    write_bytes(path, off, &bytes);
    set_be32(path, hdr::BACKING_FILE_SIZE, name.len() as u32);
}

/// Where the L2 entry for `guest_off` lives: (file offset of the entry, the entry's first 64
/// bits), or `None` when the L1 entry is empty.
pub fn l2_entry(path: &Path, guest_off: u64) -> Option<(u64, u64)> {
    let cluster_bits = be32(path, hdr::CLUSTER_BITS) as u64;
    let version = be32(path, hdr::VERSION);
    let extended =
        version >= 3 && be64(path, hdr::INCOMPATIBLE_FEATURES) & hdr::INCOMPAT_EXTENDED_L2 != 0;
    let entry_size = if extended { 16 } else { 8 };
    let l2_entries = (1u64 << cluster_bits) / entry_size;
    let cluster = guest_off >> cluster_bits;
    let l1_index = cluster / l2_entries;
    let l2_index = cluster % l2_entries;
    let l1_off = be64(path, hdr::L1_TABLE_OFFSET);
    let l1e = be64(path, l1_off + 8 * l1_index);
    let l2_off = l1e & hdr::L1E_OFFSET_MASK;
    if l2_off == 0 {
        return None;
    }
    let at = l2_off + entry_size * l2_index;
    Some((at, be64(path, at)))
}

/// A compressed cluster: guest offset, host offset of the extent, and its length bound.
#[derive(Clone, Copy, Debug)]
pub struct CompressedExtent {
    pub guest_off: u64,
    pub host_off: u64,
    pub len: u64,
}

/// Decodes a compressed-cluster descriptor (see the qcow2 spec).
pub fn compressed_extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let host = entry & ((1u64 << x) - 1);
    let sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
    let len = (sectors + 1) * 512 - (host & 511);
    (host, len)
}

/// The compressed clusters of an image (walks L1 and L2).
pub fn compressed_clusters(path: &Path) -> Vec<CompressedExtent> {
    let cluster_bits = be32(path, hdr::CLUSTER_BITS);
    let size = be64(path, hdr::SIZE);
    let cluster = 1u64 << cluster_bits;
    let mut v = Vec::new();
    let mut g = 0;
    while g < size {
        if let Some((_, e)) = l2_entry(path, g) {
            if e & hdr::L2E_COMPRESSED != 0 {
                let (host_off, len) = compressed_extent(e, cluster_bits);
                v.push(CompressedExtent {
                    guest_off: g,
                    host_off,
                    len,
                });
            }
        }
        g += cluster;
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Writable exports: starting and killing the daemon, a write-capable vhost-user-blk client,
// qemu-img check/compare, header flags, QEMU processes that hold an image open
// ---------------------------------------------------------------------------------------------

impl Daemon {
    /// `qcow2d serve --image IMG --socket SOCK EXTRA...` without `--read-only` (the export is
    /// writable unless EXTRA says otherwise), waiting for the ready line.
    pub fn start_writable(
        image: &Path,
        socket: &Path,
        extra: &[&str],
    ) -> Result<Daemon, StartFailure> {
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(extra);
        Self::spawn(cmd, image, socket)
    }

    /// SIGKILL (no chance to flush or close anything), then reaps the process.
    pub fn sigkill(mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon still owned");
        c.kill().expect("kill(SIGKILL) the daemon");
        c.wait().expect("wait for the killed daemon")
    }
}

/// Files process `pid` holds open with O_DIRECT (from /proc/PID/fdinfo).
pub fn o_direct_files(pid: i32) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & i64::from(libc::O_DIRECT) != 0)
        })
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

/// One request of [`RwClient`].
#[derive(Clone, Debug)]
pub enum BlkOp {
    /// Read `len` bytes (at most [`SLOT_BYTES`]).
    Read { off: u64, len: usize },
    /// Write `data` (at most [`SLOT_BYTES`]).
    Write { off: u64, data: Vec<u8> },
    /// Write zeroes; `unmap: false` sends BLKIO_REQ_NO_UNMAP (the device must not deallocate).
    WriteZeroes { off: u64, len: u64, unmap: bool },
    /// Discard.
    Discard { off: u64, len: u64 },
    /// Flush: makes every write completed before it was submitted durable.
    Flush,
}

impl BlkOp {
    /// For messages: `write 4096 bytes at 0x10000` and so on.
    pub fn describe(&self) -> String {
        match self {
            BlkOp::Read { off, len } => format!("read {len} bytes at {off:#x}"),
            BlkOp::Write { off, data } => format!("write {} bytes at {off:#x}", data.len()),
            BlkOp::WriteZeroes { off, len, unmap } => {
                format!("write-zeroes (unmap {unmap}) {len} bytes at {off:#x}")
            }
            BlkOp::Discard { off, len } => format!("discard {len} bytes at {off:#x}"),
            BlkOp::Flush => "flush".into(),
        }
    }

    /// The byte range the request touches (`None` for a flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            BlkOp::Read { off, len } => Some((*off, *len as u64)),
            BlkOp::Write { off, data } => Some((*off, data.len() as u64)),
            BlkOp::WriteZeroes { off, len, .. } | BlkOp::Discard { off, len } => Some((*off, *len)),
            BlkOp::Flush => None,
        }
    }
}

/// What a finished [`BlkOp`] returned: the data of a read (empty for the others) or the error.
pub type OpResult = Result<Vec<u8>, String>;

/// Data buffers of [`RwClient`] (of [`SLOT_BYTES`] each).
pub const RW_SLOTS: usize = 16;
/// Requests of [`RwClient`] in flight at once over all queues (each queue has 128 descriptors).
pub const RW_MAX_IN_FLIGHT: usize = 48;
/// Limit for [`RwClient::run_batch`] to make progress (one completion).
pub const RW_PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);

struct RwRequest {
    tag: usize,
    queue: usize,
    slot: Option<usize>,
    read_len: Option<usize>,
    /// Bytes past the slot's start where the data begins (odd iovecs only).
    shift: usize,
    // Kept alive until completion: blkio may hold the pointer in its request backlog.
    _iov: Vec<libc::iovec>,
}

/// A read-write vhost-user-blk client on blkio's `virtio-blk-vhost-user` driver: reads, writes
/// (scatter-gather, uneven segments), write zeroes, discards and flushes, several in flight over
/// all queues. Not `Send`: use it on one thread (see [`rw_session`]).
pub struct RwClient {
    // Field order matters: queues go before the Blkio that owns the memory region.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    max_segment_len: usize,
    max_segments: usize,
    max_write_zeroes_len: u64,
    max_discard_len: u64,
    flush_needed: bool,
    free_slots: Vec<usize>,
    free_ids: Vec<usize>,
    requests: Vec<Option<RwRequest>>,
    queue_load: Vec<usize>,
    next_queue: usize,
    ready: Vec<(usize, OpResult)>,
    completions: Vec<std::mem::MaybeUninit<blkio::Completion>>,
    /// Every other read and write gets misaligned memory and odd segment lengths.
    odd_iovecs: bool,
    data_requests: usize,
}

/// Segment sizes of [`RwClient`]'s requests: multiples of 512 in uneven sizes.
const EVEN_SEGMENTS: [usize; 5] = [4096, 512, 65536, 3584, 131072];
/// Segment sizes of odd requests ([`RwClient::set_odd_iovecs`]): no multiple of 512 but one.
const ODD_SEGMENTS: [usize; 5] = [1000, 511, 4097, 65536, 3583];

/// Splits `len` bytes at `base` into iovecs of the sizes `sizes` in turn (none: as large as the
/// device allows) within the device's segment limits; too many falls back to the largest.
fn split_iovecs(
    base: usize,
    len: usize,
    max_segments: usize,
    max_segment_len: usize,
    sizes: &[usize],
) -> Result<Vec<libc::iovec>, String> {
    let mut seg_sizes = Vec::new();
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let mut n = if max_segments == 1 || sizes.is_empty() {
            len - done
        } else {
            sizes[i % sizes.len()].min(len - done)
        };
        if max_segment_len > 0 {
            n = n.min(max_segment_len);
        }
        seg_sizes.push(n);
        done += n;
        i += 1;
    }
    if seg_sizes.len() > max_segments {
        let seg = if max_segment_len > 0 {
            max_segment_len
        } else {
            len
        };
        seg_sizes = (0..len.div_ceil(seg))
            .map(|k| seg.min(len - k * seg))
            .collect();
        if seg_sizes.len() > max_segments {
            return Err(format!(
                "a {len}-byte request needs {} segments, the device allows {max_segments} of at \
                 most {max_segment_len} bytes",
                seg_sizes.len()
            ));
        }
    }
    let mut at = base;
    Ok(seg_sizes
        .into_iter()
        .map(|n| {
            let v = libc::iovec {
                iov_base: at as *mut libc::c_void,
                iov_len: n,
            };
            at += n;
            v
        })
        .collect())
}

impl RwClient {
    /// Connects to `socket` read-write with `num_queues` queues of 128 descriptors.
    pub fn connect(socket: &Path, num_queues: i32) -> Result<RwClient, String> {
        let c = Connection::open(socket, num_queues, false, RW_SLOTS)?;
        let nq = c.queues.len();
        Ok(RwClient {
            queues: c.queues,
            blkio: c.blkio,
            region: c.region,
            capacity: c.capacity,
            max_segment_len: c.max_segment_len,
            max_segments: c.max_segments,
            max_write_zeroes_len: c.max_write_zeroes_len,
            max_discard_len: c.max_discard_len,
            flush_needed: c.flush_needed,
            free_slots: (0..RW_SLOTS).rev().collect(),
            free_ids: (0..RW_MAX_IN_FLIGHT).rev().collect(),
            requests: (0..RW_MAX_IN_FLIGHT).map(|_| None).collect(),
            queue_load: vec![0; nq],
            next_queue: 0,
            ready: Vec::new(),
            completions: (0..128).map(|_| std::mem::MaybeUninit::uninit()).collect(),
            odd_iovecs: false,
            data_requests: 0,
        })
    }

    /// From now on every other read and write puts its data 1 to 7 bytes past a 512-byte
    /// boundary (when it fits in its slot) in segments of odd lengths: what direct I/O cannot
    /// take as it is.
    pub fn set_odd_iovecs(&mut self, on: bool) {
        self.odd_iovecs = on;
    }

    /// Where a read or write of `len` bytes in `slot` starts, and how it is split.
    fn data_iovecs(
        &mut self,
        slot: usize,
        len: usize,
    ) -> Result<(usize, Vec<libc::iovec>), String> {
        self.data_requests += 1;
        let odd = self.odd_iovecs && self.data_requests & 1 == 0;
        let shift = if odd && len + 8 <= SLOT_BYTES {
            1 + self.data_requests / 2 % 7
        } else {
            0
        };
        let sizes: &[usize] = if odd { &ODD_SEGMENTS } else { &EVEN_SEGMENTS };
        let base = self.region.addr + slot * SLOT_BYTES + shift;
        let iov = split_iovecs(base, len, self.max_segments, self.max_segment_len, sizes)?;
        Ok((shift, iov))
    }

    /// The disk size the device reports.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Largest write-zeroes request the device accepts (0: not offered).
    pub fn max_write_zeroes_len(&self) -> u64 {
        self.max_write_zeroes_len
    }

    /// Largest discard request the device accepts (0: not offered).
    pub fn max_discard_len(&self) -> u64 {
        self.max_discard_len
    }

    /// Whether the device reports a volatile write cache (write-back: FLUSH needed).
    pub fn flush_needed(&self) -> bool {
        self.flush_needed
    }

    /// Requests submitted and not yet returned by [`RwClient::poll`].
    pub fn in_flight(&self) -> usize {
        RW_MAX_IN_FLIGHT - self.free_ids.len() + self.ready.len()
    }

    /// Whether [`RwClient::submit`] would accept `op` now.
    pub fn can_submit(&self, op: &BlkOp) -> bool {
        let needs_slot = matches!(op, BlkOp::Read { .. } | BlkOp::Write { .. });
        !self.free_ids.is_empty() && (!needs_slot || !self.free_slots.is_empty())
    }

    /// Queues `op` (tagged `tag` in its completion) and kicks the device. Fails when
    /// [`RwClient::can_submit`] is false, the request is too large, or on a transport error.
    pub fn submit(&mut self, op: &BlkOp, tag: usize) -> Result<(), String> {
        if !self.can_submit(op) {
            return Err(format!("no room to submit {}", op.describe()));
        }
        let nq = self.queues.len();
        let q = self.next_queue % nq;
        self.next_queue += 1;
        let id = self.free_ids.pop().unwrap();
        let mut req = RwRequest {
            tag,
            queue: q,
            slot: None,
            read_len: None,
            shift: 0,
            _iov: Vec::new(),
        };
        let bad_len = match op {
            BlkOp::Read { len, .. } => *len == 0 || *len > SLOT_BYTES,
            BlkOp::Write { data, .. } => data.is_empty() || data.len() > SLOT_BYTES,
            BlkOp::WriteZeroes { len, .. } | BlkOp::Discard { len, .. } => *len == 0,
            BlkOp::Flush => false,
        };
        if bad_len {
            self.free_ids.push(id);
            return Err(format!("bad request length: {}", op.describe()));
        }
        match op {
            BlkOp::Read { off, len } => {
                let slot = self.free_slots.pop().unwrap();
                req.slot = Some(slot);
                req.read_len = Some(*len);
                (req.shift, req._iov) = match self.data_iovecs(slot, *len) {
                    Ok(v) => v,
                    Err(e) => {
                        self.free_slots.push(slot);
                        self.free_ids.push(id);
                        return Err(e);
                    }
                };
                self.queues[q].readv(
                    *off,
                    req._iov.as_ptr(),
                    req._iov.len() as u32,
                    id,
                    ReqFlags::empty(),
                );
            }
            BlkOp::Write { off, data } => {
                let slot = self.free_slots.pop().unwrap();
                req.slot = Some(slot);
                (req.shift, req._iov) = match self.data_iovecs(slot, data.len()) {
                    Ok(v) => v,
                    Err(e) => {
                        self.free_slots.push(slot);
                        self.free_ids.push(id);
                        return Err(e);
                    }
                };
                let base = self.region.addr + slot * SLOT_BYTES + req.shift;
                // SAFETY: the region is mapped for the client's lifetime, this slot is free (no
                // request of ours uses it), and `data` fits in it after the shift (checked
                // above and in data_iovecs).
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), base as *mut u8, data.len())
                };
                self.queues[q].writev(
                    *off,
                    req._iov.as_ptr(),
                    req._iov.len() as u32,
                    id,
                    ReqFlags::empty(),
                );
            }
            BlkOp::WriteZeroes { off, len, unmap } => {
                let flags = if *unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.queues[q].write_zeroes(*off, *len, id, flags);
            }
            BlkOp::Discard { off, len } => {
                self.queues[q].discard(*off, *len, id, ReqFlags::empty());
            }
            BlkOp::Flush => self.queues[q].flush(id, ReqFlags::empty()),
        }
        self.requests[id] = Some(req);
        self.queue_load[q] += 1;
        self.kick(q)
    }

    /// Submits what is queued on queue `q` and collects what has completed, without waiting.
    fn kick(&mut self, q: usize) -> Result<(), String> {
        let n = self.queues[q]
            .do_io(&mut self.completions, 0, None, None)
            .map_err(|e| blkio_err("do_io", e))?;
        self.collect(n);
        Ok(())
    }

    fn collect(&mut self, n: usize) {
        for i in 0..n {
            // SAFETY: do_io() initialised the first n entries of the array.
            let c = unsafe { self.completions[i].assume_init_ref() };
            let (id, ret) = (c.user_data, c.ret);
            let req = self.requests[id]
                .take()
                .expect("completion of a request that is not in flight");
            self.queue_load[req.queue] -= 1;
            self.free_ids.push(id);
            let result = if ret == 0 {
                match (req.slot, req.read_len) {
                    (Some(slot), Some(len)) => {
                        let base = self.region.addr + slot * SLOT_BYTES + req.shift;
                        // SAFETY: the region is mapped for the client's lifetime and this slot's
                        // request has completed, so nothing writes to these bytes now.
                        let data = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
                        Ok(data.to_vec())
                    }
                    _ => Ok(Vec::new()),
                }
            } else {
                Err(format!(
                    "request failed: {}",
                    std::io::Error::from_raw_os_error(-ret)
                ))
            };
            if let Some(slot) = req.slot {
                self.free_slots.push(slot);
            }
            self.ready.push((req.tag, result));
        }
    }

    /// Returns the completions that arrived (tag, result), waiting up to `wait` for at least
    /// one when requests are in flight. An empty vector after `wait` means nothing completed.
    pub fn poll(&mut self, wait: Duration) -> Result<Vec<(usize, OpResult)>, String> {
        for q in 0..self.queues.len() {
            if self.queue_load[q] > 0 {
                self.kick(q)?;
            }
        }
        let deadline = Instant::now() + wait;
        let mut turn = 0;
        while self.ready.is_empty() && self.queue_load.iter().any(|&n| n > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Wait on one queue for a short while, then look at the others too.
            let nq = self.queues.len();
            let q = (0..nq)
                .map(|i| (turn + i) % nq)
                .find(|&q| self.queue_load[q] > 0)
                .unwrap();
            turn = q + 1;
            let mut t = left.min(Duration::from_millis(5));
            match self.queues[q].do_io(&mut self.completions, 1, Some(&mut t), None) {
                Ok(n) => self.collect(n),
                Err(e) if e.errno() == blkio::Errno::TIME => {}
                Err(e) => return Err(blkio_err("do_io (waiting)", e)),
            }
            for q in 0..nq {
                if self.queue_load[q] > 0 {
                    self.kick(q)?;
                }
            }
        }
        Ok(std::mem::take(&mut self.ready))
    }

    /// Runs every op of `ops` with as many in flight at once as the client allows (submitted in
    /// order, completing in any order) and returns the results in the order of `ops`. The
    /// caller makes sure concurrent ops do not overlap. `Err` on a transport failure or when
    /// nothing completes for [`RW_PROGRESS_TIMEOUT`].
    pub fn run_batch(&mut self, ops: &[BlkOp]) -> Result<Vec<OpResult>, String> {
        let mut results: Vec<Option<OpResult>> = vec![None; ops.len()];
        let mut next = 0;
        let mut done = 0;
        let mut last_progress = Instant::now();
        while done < ops.len() {
            while next < ops.len() && self.can_submit(&ops[next]) {
                self.submit(&ops[next], next)?;
                next += 1;
            }
            let got = self.poll(Duration::from_millis(200))?;
            if got.is_empty() {
                if last_progress.elapsed() > RW_PROGRESS_TIMEOUT {
                    let stuck: Vec<String> = results
                        .iter()
                        .enumerate()
                        .take(next)
                        .filter(|(_, r)| r.is_none())
                        .map(|(i, _)| ops[i].describe())
                        .collect();
                    return Err(format!(
                        "no completion for {} s; in flight: {}",
                        RW_PROGRESS_TIMEOUT.as_secs(),
                        stuck.join(", ")
                    ));
                }
                continue;
            }
            last_progress = Instant::now();
            for (tag, r) in got {
                assert!(results[tag].is_none(), "two completions for op {tag}");
                results[tag] = Some(r);
                done += 1;
            }
        }
        Ok(results.into_iter().map(Option::unwrap).collect())
    }

    /// Like [`RwClient::run_batch`], failing on the first request that failed.
    pub fn run_ok(&mut self, ops: &[BlkOp]) -> Result<Vec<Vec<u8>>, String> {
        let results = self.run_batch(ops)?;
        ops.iter()
            .zip(results)
            .map(|(op, r)| r.map_err(|e| format!("{}: {e}", op.describe())))
            .collect()
    }

    /// Reads `len` bytes at `off` in requests of at most 1 MiB.
    pub fn read_range(&mut self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut ops = Vec::new();
        let mut at = off;
        while at < off + len {
            let n = (SLOT_BYTES as u64).min(off + len - at);
            ops.push(BlkOp::Read {
                off: at,
                len: n as usize,
            });
            at += n;
        }
        Ok(self.run_ok(&ops)?.concat())
    }
}

impl Drop for RwClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Runs `f` with a read-write client connected to `socket`, on its own thread, within
/// `timeout`.
pub fn rw_session<T, F>(
    socket: &Path,
    num_queues: i32,
    timeout: Duration,
    f: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&mut RwClient) -> Result<T, String> + Send + 'static,
{
    let socket = socket.to_path_buf();
    try_with_timeout("vhost-user-blk read-write client", timeout, move || {
        let mut c = RwClient::connect(&socket, num_queues)?;
        f(&mut c)
    })?
}

/// `qemu-img check --output=json IMG`: (exit code, parsed report). Exit codes: 0 clean,
/// 1 check could not run, 2 corruptions, 3 leaks only.
pub fn qemu_img_check(img: &Path, repair: Option<&str>) -> (i32, serde_json::Value) {
    require_qemu_tools();
    let mut c = Command::new("qemu-img");
    c.current_dir(image_dir(img))
        .args(["check", "--output=json"]);
    if let Some(r) = repair {
        c.args(["-r", r]);
    }
    c.arg(img);
    let desc = describe_cmd(&c);
    // A daemon killed a moment ago can still hold its image locks while the kernel tears
    // down its io_uring (requests in flight keep the file open): give that a few seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = run_cmd(&mut c, TOOL_TIMEOUT);
        if out.status.code() == Some(1) && out.stderr.contains("lock") && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        break out;
    };
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`{desc}` ({}) printed no JSON report ({e}):\nstdout: {}\nstderr: {}",
            out.status, out.stdout, out.stderr
        )
    });
    (code, v)
}

/// A count of a `qemu-img check` JSON report (absent: 0).
pub fn check_count(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Fails unless `qemu-img check` finds no corruption, no leak and no check error.
pub fn assert_check_clean(img: &Path, what: &str) {
    let (code, v) = qemu_img_check(img, None);
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            check_count(&v, key),
            0,
            "{what}: qemu-img check of {} reports {key}: {v}",
            img.display()
        );
    }
    assert_eq!(code, 0, "{what}: qemu-img check exit code {code}: {v}");
}

/// `qemu-img compare -f qcow2 -F raw IMG RAW`: `Err` with qemu-img's output when they differ.
pub fn qemu_img_compare_raw(img: &Path, raw: &Path) -> Result<(), String> {
    require_qemu_tools();
    let mut c = Command::new("qemu-img");
    c.current_dir(image_dir(img))
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(img)
        .arg(raw);
    let desc = describe_cmd(&c);
    let out = run_cmd(&mut c, TOOL_TIMEOUT);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{desc}` ({}): {}{}",
            out.status, out.stdout, out.stderr
        ))
    }
}

/// The incompatible feature bits of a qcow2 file (version 2 has none).
pub fn incompatible_features(img: &Path) -> u64 {
    if be32(img, hdr::VERSION) >= 3 {
        be64(img, hdr::INCOMPATIBLE_FEATURES)
    } else {
        0
    }
}

/// Incompatible feature bit 0 (dirty: refcounts may be stale) as stored in the file.
pub fn dirty_bit(img: &Path) -> bool {
    incompatible_features(img) & 1 != 0
}

/// Incompatible feature bit 1 (corrupt) as stored in the file.
pub fn corrupt_bit(img: &Path) -> bool {
    incompatible_features(img) & 2 != 0
}

/// Runs `qcow2d ARGS` to completion.
pub fn run_daemon_cmd(args: &[&OsStr]) -> CmdOutput {
    run_cmd(Command::new(daemon_bin()).args(args), TOOL_TIMEOUT)
}

/// A `qemu-io` process that holds an image open (read-write, or read-only with `-r`) until it
/// is dropped: started without `-c`, its commands come from a pipe the test holds.
pub struct QemuIoHolder {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    output: Arc<Mutex<String>>,
}

impl QemuIoHolder {
    /// Starts `qemu-io [-r] -f qcow2 IMG` and waits until it has read the first sector (so the
    /// image is open and locked). `Err` with its output when it fails to open the image.
    pub fn open(img: &Path, read_only: bool) -> Result<QemuIoHolder, String> {
        use std::io::Write;
        require_qemu_tools();
        let mut c = Command::new("qemu-io");
        c.current_dir(image_dir(img));
        if read_only {
            c.arg("-r");
        }
        c.args(["-f", "qcow2"]).arg(img);
        let desc = describe_cmd(&c);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            thread::spawn(move || {
                let mut r = r;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut stdin = child.stdin.take().unwrap();
        let mut h = QemuIoHolder {
            child: Some(child),
            stdin: None,
            output,
        };
        // A failed open makes qemu-io exit; the write may then fail with EPIPE.
        let _ = stdin
            .write_all(b"read 0 512\n")
            .and_then(|()| stdin.flush());
        h.stdin = Some(stdin);
        let deadline = Instant::now() + TOOL_TIMEOUT;
        loop {
            if h.output().contains("read 512/512 bytes at offset 0") {
                return Ok(h);
            }
            let exited = h.child.as_mut().unwrap().try_wait().ok().flatten();
            if let Some(st) = exited {
                thread::sleep(Duration::from_millis(50));
                return Err(format!("`{desc}` exited ({st}): {}", h.output()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "`{desc}` did not read its first sector within {} s: {}",
                    TOOL_TIMEOUT.as_secs(),
                    h.output()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything qemu-io printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Closes qemu-io's stdin (it exits at end of input) and waits for it; kills it after
    /// [`EXIT_TIMEOUT`].
    pub fn close(mut self) -> Option<ExitStatus> {
        self.finish()
    }

    fn finish(&mut self) -> Option<ExitStatus> {
        drop(self.stdin.take());
        let mut child = self.child.take()?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        self.finish();
    }
}
