//! The image file a check reads and a repair writes: positioned reads and writes on the
//! checking thread, and a repair's rehearsal, whose writes stay in memory
//! ([`Target::rehearse`]).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::MAX_REHEARSAL_MEMORY;
use crate::error::{Error, ErrorKind};
use crate::io::Role;

/// The opened image file.
///
/// Read and written with plain positioned system calls (`pread`, `pwrite`, `fdatasync`) on
/// the checking thread: a check does one I/O at a time and waits for each, so an io_uring
/// would only add a submission and a completion to every one of them, and on a file system
/// that cannot serve reads without blocking (tmpfs), a hand-off to a kernel worker thread and
/// back.
pub(super) struct Target {
    pub(super) path: String,
    file: File,
    /// Writes made so far.
    pub(super) writes: u64,
    /// A length the file is taken to have (when longer than it is) while a repair judges
    /// growing it: what lies past its end reads as zeros, as it will once grown.
    pretend_len: Option<u64>,
    /// Bytes of expected refcounts another, live analysis holds meanwhile: a counting made
    /// now takes at most [`MAX_CHECK_MEMORY`](super::MAX_CHECK_MEMORY) less these.
    pub(super) counts_held: u64,
    /// While a repair is rehearsed ([`Target::rehearse`]): what it wrote and how far it grew
    /// the file, which reads see and the file never does.
    dry: Option<DryRun>,
    /// The refcount order a repair widens the image to (see [`widening`]): analyses count
    /// references in it, and the refcount structure is rebuilt in it.
    pub(super) widen: Option<u32>,
}

/// The writes of a rehearsed repair, in [`DRY_PAGE`]-byte pages of the file, and the length
/// it grew the file to.
#[derive(Default)]
struct DryRun {
    pages: HashMap<u64, Box<[u8]>>,
    len: u64,
}

/// The page size of a [`DryRun`].
const DRY_PAGE: u64 = 4096;

impl Drop for Target {
    fn drop(&mut self) {
        // Given back now, not when the last reference to the file goes (a duplicate of the
        // descriptor may outlive the check): whoever runs `qemu-img` on the image next must
        // not find it locked.
        crate::io::unlock_file(&self.file);
    }
}

impl Target {
    /// Opens and locks the image as an open of the engine does (the same checks of the
    /// path, the same QEMU-compatible locks for readers or writers, the same errors).
    pub(super) fn open(path: &Path, write: bool) -> Result<Target, Error> {
        let name = path.display().to_string();
        let file = crate::paths::open_image(path, write)?;
        let role = if write {
            Role::Qcow2Writer
        } else {
            Role::Qcow2Reader
        };
        crate::layer::lock_file(&file, path, role)?;
        Ok(Target {
            path: name,
            file,
            writes: 0,
            pretend_len: None,
            counts_held: 0,
            dry: None,
            widen: None,
        })
    }

    pub(super) fn len(&self) -> Result<u64, Error> {
        let len = crate::layer::file_len(&self.file, Path::new(&self.path))?;
        let dry = self.dry.as_ref().map_or(0, |d| d.len);
        Ok(len.max(self.pretend_len.unwrap_or(0)).max(dry))
    }

    /// Runs `f` with every write and growth of the file kept in memory instead (reads see
    /// them), and drops them after: what a repair would leave, without writing anything.
    /// What it keeps is bounded by [`MAX_REHEARSAL_MEMORY`] (a write past that fails).
    pub(super) fn rehearse<R>(&mut self, f: impl FnOnce(&mut Target) -> R) -> R {
        let writes = self.writes;
        self.dry = Some(DryRun::default());
        let r = f(self);
        self.dry = None;
        // What was analysed since is stale again.
        self.writes = writes + 1;
        r
    }

    /// Copies what a rehearsal wrote over `buf`, read from `off`.
    pub(super) fn read_dry(&self, off: u64, buf: &mut [u8]) {
        let Some(dry) = &self.dry else {
            return;
        };
        let end = off.saturating_add(buf.len() as u64);
        for p in off / DRY_PAGE..end.div_ceil(DRY_PAGE) {
            if let Some(page) = dry.pages.get(&p) {
                let (from, to) = ((p * DRY_PAGE).max(off), ((p + 1) * DRY_PAGE).min(end));
                buf[(from - off) as usize..(to - off) as usize].copy_from_slice(
                    &page[(from - p * DRY_PAGE) as usize..(to - p * DRY_PAGE) as usize],
                );
            }
        }
    }

    /// A rehearsal's write of `buf` at `off`. A write past the end of the file makes it
    /// longer, as the write itself would.
    pub(super) fn write_dry(&mut self, off: u64, buf: &[u8], what: &str) -> Result<(), Error> {
        let end = off.saturating_add(buf.len() as u64);
        for p in off / DRY_PAGE..end.div_ceil(DRY_PAGE) {
            let held = self.dry.as_ref().is_none_or(|d| d.pages.contains_key(&p));
            if !held {
                if self.dry.as_ref().map_or(0, |d| d.pages.len() as u64) * DRY_PAGE
                    >= MAX_REHEARSAL_MEMORY
                {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{}: rehearsing the repair would hold more than {} MiB",
                            self.path,
                            MAX_REHEARSAL_MEMORY >> 20
                        ),
                    ));
                }
                let mut page = vec![0u8; DRY_PAGE as usize].into_boxed_slice();
                self.read(p * DRY_PAGE, &mut page, what)?;
                if let Some(d) = self.dry.as_mut() {
                    d.pages.insert(p, page);
                }
            }
            let (from, to) = ((p * DRY_PAGE).max(off), ((p + 1) * DRY_PAGE).min(end));
            if let Some(page) = self.dry.as_mut().and_then(|d| d.pages.get_mut(&p)) {
                page[(from - p * DRY_PAGE) as usize..(to - p * DRY_PAGE) as usize]
                    .copy_from_slice(&buf[(from - off) as usize..(to - off) as usize]);
            }
        }
        if let Some(d) = self.dry.as_mut() {
            d.len = d.len.max(end);
        }
        Ok(())
    }

    /// Runs `f` on the file as if it were `len` bytes long (zeros past its end), writing
    /// nothing, while another analysis holds `held` bytes of expected refcounts.
    pub(super) fn as_if_grown<R>(
        &mut self,
        len: u64,
        held: u64,
        f: impl FnOnce(&mut Target) -> R,
    ) -> R {
        self.pretend_len = Some(len);
        self.counts_held = held;
        let r = f(self);
        self.pretend_len = None;
        self.counts_held = 0;
        r
    }

    /// Grows the file to `len` bytes (zeros).
    pub(super) fn grow(&mut self, len: u64) -> Result<(), Error> {
        self.writes += 1;
        if let Some(dry) = self.dry.as_mut() {
            dry.len = dry.len.max(len);
            return Ok(());
        }
        self.file.set_len(len).map_err(|e| {
            Error::io(
                format!("{}: cannot grow the file to {len} bytes", self.path),
                e,
            )
        })
    }

    /// Reads `buf.len()` bytes at `off`; what lies past the end of the file reads as zeros
    /// (as QEMU's reads do).
    pub(super) fn read(&mut self, off: u64, buf: &mut [u8], what: &str) -> Result<(), Error> {
        self.read_named(off, buf, &what)
    }

    /// [`Target::read`] with what is read formatted only for an error message (a table's
    /// name is built from a snapshot's entry, and a table may have 65536 of them).
    pub(super) fn read_named(
        &mut self,
        off: u64,
        buf: &mut [u8],
        what: &dyn fmt::Display,
    ) -> Result<(), Error> {
        if off > i64::MAX as u64 {
            // No file reaches there.
            buf.fill(0);
            self.read_dry(off, buf);
            return Ok(());
        }
        let n = read_up_to(&self.file, buf, off)
            .map_err(|e| Error::io(format!("{}: cannot read {what} at {off:#x}", self.path), e))?;
        if let Some(rest) = buf.get_mut(n..) {
            rest.fill(0);
        }
        self.read_dry(off, buf);
        Ok(())
    }

    /// The entries of a table of `len` bytes (whole 8-byte entries) at `off`, up to the last
    /// one the file holds any byte of. What lies past the end of the file reads as zeros and
    /// a zero entry names nothing, so the entries past it are left out instead of being
    /// allocated, zeroed and walked: a damaged header may declare tables of many MiB in a
    /// file of a few KiB.
    pub(super) fn read_entries(
        &mut self,
        off: u64,
        len: u64,
        what: &str,
    ) -> Result<Vec<u8>, Error> {
        let held = self
            .len()?
            .saturating_sub(off)
            .min(len)
            .next_multiple_of(8)
            .min(len);
        let mut buf = zeroed(held, &self.path)?;
        self.read(off, &mut buf, what)?;
        Ok(buf)
    }

    pub(super) fn write(&mut self, off: u64, buf: &[u8], what: &str) -> Result<(), Error> {
        self.writes += 1;
        if self.dry.is_some() {
            return self.write_dry(off, buf, what);
        }
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io(format!("{}: cannot write {what} at {off:#x}", self.path), e))
    }

    pub(super) fn sync(&mut self) -> Result<(), Error> {
        if self.dry.is_some() {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("{}: fdatasync failed", self.path), e))
    }
}

/// Reads up to `buf.len()` bytes of `file` at `off`; returns how many were read (fewer only
/// where the file ends).
fn read_up_to(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub(super) fn to_usize(v: u64, path: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| {
        Error::new(
            ErrorKind::Unsupported,
            format!("{path}: {v} does not fit in memory"),
        )
    })
}

pub(super) fn zeroed(len: u64, path: &str) -> Result<Vec<u8>, Error> {
    let n = to_usize(len, path)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::new(
            ErrorKind::Io,
            format!("{path}: cannot allocate {len} bytes for the check"),
        )
    })?;
    v.resize(n, 0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A check gives its image's locks back as it ends, even while something else (a
    /// duplicate of its descriptor) still holds the file: whoever runs `qemu-img` on the image
    /// next finds it free.
    #[test]
    fn a_check_gives_its_locks_back_as_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.qcow2");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let t = Target::open(&path, true).unwrap();
        let held = t.file.try_clone().unwrap();
        drop(t);
        let next = File::options().read(true).write(true).open(&path).unwrap();
        crate::io::lock_file(&next, Role::Qcow2Writer).expect("the image is still locked");
        drop(held);
    }
}
