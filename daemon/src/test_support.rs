//! Helpers shared by the daemon's unit tests (run on the test's own thread).

use std::path::{Path, PathBuf};

/// A fresh qcow2 image of `size` made by qemu-img at `path`. A missing qemu-img fails the test,
/// naming the tool and its package: a test that cannot run never passes in silence.
pub fn qemu_img_create(path: &Path, size: &str) -> PathBuf {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "MISSING TOOL: cannot run `qemu-img` ({e}); this test needs it. Install the \
                 Debian package `qemu-utils` (.ci/run does)."
            )
        });
    assert!(
        out.status.success(),
        "`qemu-img create -f qcow2 {} {size}` failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    path.to_path_buf()
}
