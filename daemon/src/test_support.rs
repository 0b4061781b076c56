//! Helpers shared by the daemon's unit tests.

use std::path::{Path, PathBuf};

/// A fresh qcow2 image of `size` made by qemu-img at `path`, or None (the caller skips its
/// test, saying so) when qemu-img cannot make it.
pub fn qemu_img_create(path: &Path, size: &str) -> Option<PathBuf> {
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .status();
    match status {
        Ok(s) if s.success() => Some(path.to_path_buf()),
        _ => {
            eprintln!("qemu-img not available: skipped");
            None
        }
    }
}
