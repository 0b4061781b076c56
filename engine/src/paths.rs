//! Which files an image may make the engine open, and opening them without blocking.
//!
//! An image names other files: its backing file and its external data file, and a backing
//! image names its own. Those names come from whoever made the image, so each named file must
//! be a regular file under an allowed root: the directory of the top image (as given, with
//! symlinks resolved), plus the directories the caller allows ([`crate::OpenOptions`]'s
//! `allowed_roots`, the daemon's `--allow-path` and `allow_paths`). A name is resolved first
//! (relative names against the directory of the image that names them, then symlinks and `..`
//! by `canonicalize`), and the resolved path must lie under a resolved root. The file's type is
//! checked before it is opened (no FIFO, device node, directory or socket is ever opened), it is
//! opened without blocking and without following a final symlink, and after the open the file
//! must still be the one checked and, as the kernel names it, still under a root.
//!
//! Called at open time, on the thread that opens an image.

#![forbid(unsafe_code)]

use std::fs::{File, Metadata};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind};

/// What a named file is to the image that names it, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NamedKind {
    /// A backing file.
    Backing,
    /// An external data file.
    DataFile,
}

impl NamedKind {
    fn as_str(self) -> &'static str {
        match self {
            NamedKind::Backing => "Backing file",
            NamedKind::DataFile => "External data file",
        }
    }
}

/// The directories files named by an image may lie under, resolved.
#[derive(Clone, Debug)]
pub(crate) struct AllowedRoots {
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// The directory of `top` (the path as given: a relative path is relative to the working
    /// directory) and every directory of `extra`, resolved. A directory that cannot be resolved
    /// is an error naming it.
    pub(crate) fn new(top: &Path, extra: &[PathBuf]) -> Result<AllowedRoots, Error> {
        let dir = match top.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut roots = vec![std::fs::canonicalize(dir).map_err(|e| {
            Error::io(
                format!(
                    "Cannot resolve {}, the directory of {}",
                    dir.display(),
                    top.display()
                ),
                e,
            )
        })?];
        for root in extra {
            let resolved = std::fs::canonicalize(root).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidArgument,
                    format!("Allowed path {} cannot be resolved", root.display()),
                    e,
                )
            })?;
            if !roots.contains(&resolved) {
                roots.push(resolved);
            }
        }
        Ok(AllowedRoots { roots })
    }

    fn contains(&self, resolved: &Path) -> bool {
        self.roots.iter().any(|r| resolved.starts_with(r))
    }

    fn list(&self) -> String {
        let v: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        v.join(", ")
    }

    /// Opens the file `path` (a name of image `by`, already resolved against `by`'s directory)
    /// for reading, and writing when `write`: it must be a regular file under a root. Returns
    /// the file, with `O_NONBLOCK` cleared, and its resolved path.
    pub(crate) fn open_named(
        &self,
        kind: NamedKind,
        path: &Path,
        by: &Path,
        write: bool,
    ) -> Result<(File, PathBuf), Error> {
        let what = kind.as_str();
        let named = || format!("{what} {} (named by {})", path.display(), by.display());
        let fail_kind = match kind {
            NamedKind::Backing => ErrorKind::BackingChain,
            NamedKind::DataFile => ErrorKind::Io,
        };
        let resolved = std::fs::canonicalize(path).map_err(|e| {
            Error::with_source(fail_kind, format!("{} cannot be opened", named()), e)
        })?;
        let outside = |real: &Path| {
            let shown = if real == path {
                named()
            } else {
                format!("{}, which resolves to {},", named(), real.display())
            };
            let dir = real.parent().unwrap_or(real);
            Error::new(
                ErrorKind::NotAllowed,
                format!(
                    "{shown} is outside the allowed directories ({}); to allow it, pass \
                     --allow-path {} (or add it to allow_paths in the config file)",
                    self.list(),
                    dir.display()
                ),
            )
        };
        if !self.contains(&resolved) {
            return Err(outside(&resolved));
        }
        // The type before any open: a FIFO would block the open, a device node's driver runs.
        let before = std::fs::metadata(&resolved).map_err(|e| {
            Error::with_source(fail_kind, format!("{} cannot be opened", named()), e)
        })?;
        if !before.file_type().is_file() {
            return Err(not_regular(&named(), &before));
        }
        let file =
            crate::io::open_nonblocking(&resolved, write, libc::O_NOFOLLOW).map_err(|e| {
                Error::with_source(fail_kind, format!("{} cannot be opened", named()), e)
            })?;
        let after = file
            .metadata()
            .map_err(|e| Error::io(format!("Cannot stat {}", resolved.display()), e))?;
        if !after.file_type().is_file() {
            return Err(not_regular(&named(), &after));
        }
        if (before.dev(), before.ino()) != (after.dev(), after.ino()) {
            return Err(Error::new(
                ErrorKind::NotAllowed,
                format!("{} was replaced while it was being opened", named()),
            ));
        }
        // A directory on the way may have been swapped for a symlink between the check and the
        // open: ask the kernel where the open file is (where /proc is mounted).
        if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            if !self.contains(&real) {
                return Err(outside(&real));
            }
        }
        crate::io::clear_nonblocking(&file)
            .map_err(|e| Error::io(format!("Cannot set up {}", resolved.display()), e))?;
        Ok((file, resolved))
    }
}

/// Opens an image given by the user (the top image of a chain) for reading, and writing when
/// `write`: it must be a regular file, and the open never blocks.
pub(crate) fn open_image(path: &Path, write: bool) -> Result<File, Error> {
    let cannot = |e| Error::io(format!("Cannot open {}", path.display()), e);
    let before = std::fs::metadata(path).map_err(cannot)?;
    if !before.file_type().is_file() {
        return Err(not_regular(&format!("Image {}", path.display()), &before));
    }
    let file = crate::io::open_nonblocking(path, write, 0).map_err(cannot)?;
    let after = file.metadata().map_err(cannot)?;
    if !after.file_type().is_file() {
        return Err(not_regular(&format!("Image {}", path.display()), &after));
    }
    crate::io::clear_nonblocking(&file).map_err(cannot)?;
    Ok(file)
}

fn not_regular(named: &str, meta: &Metadata) -> Error {
    let t = meta.file_type();
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    };
    Error::new(
        ErrorKind::NotAllowed,
        format!("{named} is {kind}, not a regular file"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(top: &Path, extra: &[PathBuf]) -> AllowedRoots {
        AllowedRoots::new(top, extra).unwrap()
    }

    #[test]
    fn files_under_the_roots_open_and_others_do_not() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let top = a.path().join("top.qcow2");
        std::fs::write(&top, b"").unwrap();
        std::fs::create_dir(a.path().join("sub")).unwrap();
        std::fs::write(a.path().join("sub/base"), b"x").unwrap();
        std::fs::write(b.path().join("base"), b"x").unwrap();
        let r = roots(&top, &[]);
        let inside = a.path().join("sub/../sub/base");
        let (_, resolved) = r
            .open_named(NamedKind::Backing, &inside, &top, false)
            .unwrap();
        assert_eq!(
            resolved,
            std::fs::canonicalize(a.path().join("sub/base")).unwrap()
        );

        let outside = b.path().join("base");
        let e = r
            .open_named(NamedKind::Backing, &outside, &top, false)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed);
        assert!(e.to_string().contains("--allow-path"), "{e}");
        assert!(
            e.to_string().contains(&outside.display().to_string()),
            "{e}"
        );

        // `..` out of the root.
        let dotdot = a
            .path()
            .join("..")
            .join(b.path().file_name().unwrap())
            .join("base");
        let e = r
            .open_named(NamedKind::DataFile, &dotdot, &top, true)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed, "{e}");

        // A symlink inside pointing outside.
        let link = a.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let e = r
            .open_named(NamedKind::Backing, &link, &top, false)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAllowed);
        assert!(e.to_string().contains("resolves to"), "{e}");

        // Allowed explicitly.
        let r = roots(&top, &[b.path().to_path_buf()]);
        r.open_named(NamedKind::Backing, &link, &top, false)
            .unwrap();
        r.open_named(NamedKind::Backing, &outside, &top, false)
            .unwrap();
    }

    #[test]
    fn only_regular_files_are_opened() {
        let a = tempfile::tempdir().unwrap();
        let top = a.path().join("top.qcow2");
        std::fs::write(&top, b"").unwrap();
        let r = roots(&top, &[PathBuf::from("/dev")]);
        for (path, kind) in [
            (PathBuf::from("/dev/zero"), "character device"),
            (a.path().to_path_buf(), "directory"),
        ] {
            let e = r
                .open_named(NamedKind::DataFile, &path, &top, false)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotAllowed);
            assert!(e.to_string().contains(kind), "{e}");
        }
        let e = open_image(Path::new("/dev/zero"), false).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = AllowedRoots::new(&top, &[a.path().join("missing")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
