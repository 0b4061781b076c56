//! What the fuzz targets share: a per-process scratch directory, image templates made once by
//! `qemu-img`, and blocking helpers over the engine's shards.
//!
//! Each fuzz target runs on libFuzzer's single thread; the helpers are not meant to be shared
//! between threads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use qcow2d_engine::{Completion, InflateSharing, Shard, ShardConfig};

/// Shard settings of the fuzz targets: every cluster inflated on the shard's own thread, so
/// that a run is deterministic and starts no thread; a small ring, which costs each execution
/// less to set up and tear down and makes the full submission and completion queues that a
/// busy daemon meets common.
pub fn on_shard() -> ShardConfig {
    ShardConfig {
        inflate: InflateSharing::OnShard,
        ring_entries: 16,
        ..ShardConfig::default()
    }
}

/// The process's scratch directory, `qcow2d-fuzz-<pid>`: it holds a few small files and is
/// removed when the process exits normally, or else (a crash, a kill) by the next fuzz process
/// that finds its owner gone. In memory (`/dev/shm`, a tmpfs) where the system has one: an
/// image on a disk file system costs every execution its writeback and its flushes' real
/// `fdatasync`s, which made the image targets wait on the disk most of the time.
/// `QCOW2D_FUZZ_DIR` names another parent directory; the system temp directory is the
/// fallback.
pub fn scratch_dir() -> &'static Path {
    DIR.get_or_init(|| {
        let parent = std::env::var_os("QCOW2D_FUZZ_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                let shm = Path::new("/dev/shm");
                shm.is_dir().then(|| shm.to_path_buf())
            })
            .unwrap_or_else(std::env::temp_dir);
        remove_orphans(&parent);
        let dir = parent.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        // A directory of this name is a dead process's whose pid came back: start afresh.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create the scratch directory {dir:?}: {e}"));
        // SAFETY: registers an `extern "C"` function without arguments that reads only `DIR`
        // (and does nothing while it is unset).
        unsafe { libc::atexit(remove_scratch_dir) };
        dir
    })
}

static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_scratch_dir() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

const SCRATCH_PREFIX: &str = "qcow2d-fuzz-";

/// Removes the scratch directories in `parent` whose process is gone.
fn remove_orphans(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `bytes` written to `name` in the scratch directory (replacing what was there).
///
/// Rewritten in place and cut to length rather than truncated first: the file's pages are
/// reused from one execution to the next instead of freed and allocated again.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = scratch_dir().join(name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("cannot open a scratch file");
    file.write_all_at(bytes, 0)
        .expect("cannot write a scratch file");
    file.set_len(bytes.len() as u64)
        .expect("cannot cut a scratch file to length");
    path
}

/// Runs `qemu-img` with `args`; panics naming the tool when it is missing or fails.
pub fn qemu_img(args: &[&str]) {
    let status = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img is required by this fuzz target (Debian: qemu-utils)");
    assert!(status.success(), "qemu-img {args:?} failed: {status}");
}

/// Runs `qemu-io` on a raw file; panics naming the tool when it is missing or fails.
pub fn qemu_io_raw(path: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .arg(path)
        .output()
        .expect("qemu-io is required by this fuzz target (Debian: qemu-utils)");
    assert!(out.status.success(), "qemu-io {commands:?} failed");
}

/// Waits until every shard is idle, polling all of them (a shard of a writable image served by
/// several passes pieces of requests to the others), and sleeping on their completion eventfds
/// in between, as the daemon's workers do: every completion and every message from another
/// shard writes one of them. Nothing written to them for [`WAKE_TIMEOUT`] while requests are
/// in flight is a lost wake-up, which would hang a daemon's queue: that panics.
pub fn drain_all(shards: &mut [Shard], out: &mut Vec<Completion>) {
    if let [one] = shards {
        return one.drain(out);
    }
    let mut fds: Vec<libc::pollfd> = shards
        .iter()
        .map(|s| libc::pollfd {
            fd: s.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        for s in shards.iter_mut() {
            s.poll(out);
        }
        if shards.iter().all(|s| s.in_flight() == 0) {
            return;
        }
        let timeout_ms = WAKE_TIMEOUT.as_millis() as libc::c_int;
        // SAFETY: `fds` is a live array of `fds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
        }
        let in_flight: Vec<usize> = shards.iter().map(Shard::in_flight).collect();
        assert!(
            n != 0,
            "no shard was woken for {WAKE_TIMEOUT:?} with requests in flight {in_flight:?}: a lost wake-up"
        );
    }
}

/// How long shards with requests in flight may stay silent (their I/O is on a memory file
/// system: it completes in microseconds).
pub const WAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Reads `buf.len()` bytes at `offset` through `shard` and waits for the answer.
pub fn read(shard: &mut Shard, buf: &mut [u8], offset: u64) -> bool {
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` is exclusively borrowed until the request completes in `drain` below.
    if unsafe { shard.submit_read(0, offset, &iov) }.is_err() {
        return false;
    }
    let mut out = Vec::new();
    shard.drain(&mut out);
    out.iter().all(|c| c.result.is_ok())
}
