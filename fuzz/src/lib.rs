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
/// that a run is deterministic and starts no thread.
pub fn on_shard() -> ShardConfig {
    ShardConfig {
        inflate: InflateSharing::OnShard,
        ..ShardConfig::default()
    }
}

/// The process's scratch directory (removed by nobody: libFuzzer ends with `_exit`; it lives
/// under the system temp directory and holds a few small files).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("qcow2d-fuzz-")
            .tempdir()
            .expect("cannot create a scratch directory");
        dir.keep()
    })
}

/// `bytes` written to `name` in the scratch directory (replacing what was there).
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("cannot write a scratch file");
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
/// several passes pieces of requests to the others).
pub fn drain_all(shards: &mut [Shard], out: &mut Vec<Completion>) {
    if let [one] = shards {
        return one.drain(out);
    }
    let started = std::time::Instant::now();
    while shards.iter().any(|s| s.in_flight() > 0) {
        for s in shards.iter_mut() {
            s.poll(out);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "shards made no progress for a minute"
        );
        std::thread::yield_now();
    }
}

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
