//! Helpers shared by the engine's integration tests (engine/tests/), run on the test's thread:
//! the one place that names `qemu-img` and `qemu-io` (a missing tool fails the test, naming it
//! and its package), images made and checked with them, and the one seeded [`Rng`].
//!
//! The integration tests of the whole product have a library of helpers, the `qcow2d-tests`
//! crate (tests/src/); the engine's tests cannot use it, because that crate depends on the
//! engine: depending on it here would make a cycle. So this small module is compiled into each
//! engine test binary, each using a part of it (hence `allow(dead_code)`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Fails the test (never skips it) when `tool` is not in PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()));
    assert!(
        found,
        "MISSING TOOL: `{tool}` is not in PATH; these tests need it. Install the Debian package \
         `qemu-utils` (.ci/run does)."
    );
}

/// A `qemu-img` command; the tool is checked first.
pub fn qemu_img_cmd() -> Command {
    require_tool("qemu-img");
    Command::new("qemu-img")
}

/// A `qemu-io` command; the tool is checked first.
pub fn qemu_io_cmd() -> Command {
    require_tool("qemu-io");
    Command::new("qemu-io")
}

/// `qemu-img` with bounded memory and time (run under `prlimit` and `timeout`): on some
/// damaged images QEMU's repair sizes its in-memory refcount table by a reference terabytes
/// past the end of the file (it then fails, which the caller reports).
pub fn qemu_img_bounded_cmd() -> Command {
    require_tool("qemu-img");
    require_tool("prlimit");
    require_tool("timeout");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--as=2147483648", "timeout", "60", "qemu-img"]);
    cmd
}

/// `qemu-io -f qcow2 -c CMD... IMAGE`, must succeed. qemu-io reports some failures only in
/// its output and still exits 0, so the output is checked as well.
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut c = qemu_io_cmd();
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(image);
    let out = run(&mut c);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?} on {}: {out}",
        image.display()
    );
}

/// Runs `cmd` and returns its standard output; panics, with its error output, if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is qemu-utils installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`, must succeed; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run(qemu_img_cmd().args(args))
}

/// `qemu-img create` run inside `dir`, so relative names (data files) land there.
pub fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    run(qemu_img_cmd().current_dir(dir).args(&args));
    dir.join(name)
}

/// The image's guest-visible bytes, through `qemu-img convert` into `out`.
pub fn raw_of(image: &Path, out: &Path) -> Vec<u8> {
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// `qemu-img check` finds no corruption and no leak, and `qemu-img compare` finds the image
/// equal to `model` (written into `dir`).
pub fn verify(image: &Path, model: &[u8], dir: &Path) {
    let json = qemu_img(&["check", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = v.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "{}: qemu-img check reports {key}: {json}",
            image.display()
        );
    }
    let model_path = dir.join("model.raw");
    std::fs::write(&model_path, model).unwrap();
    let out = qemu_img_cmd()
        .args(["compare", "-F", "raw"])
        .arg(image)
        .arg(&model_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: image differs from the model: {}",
        image.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// xorshift64*: deterministic, seedable, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
