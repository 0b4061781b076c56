//! Files and private temp dirs: one [`Scratch`] dir per test, kept when `QCOW2D_KEEP_TEMP` is
//! set.

use std::fs;
use std::path::{Path, PathBuf};

/// Writes `data` to a new raw file.
pub fn write_file(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Temp dirs
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
