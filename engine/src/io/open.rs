//! Opening files without blocking, for the thread that opens an image.
//!
//! Opening a FIFO blocks until a writer comes, and opening a device node can do anything the
//! driver does on open; a file named by an image may be either. Files are opened with
//! `O_NONBLOCK | O_NOCTTY` (an open that would wait returns at once, and a terminal never
//! becomes the process's controlling terminal), their type is checked with `fstat`, and only
//! then is `O_NONBLOCK` cleared: io_uring would otherwise answer `EAGAIN` where it should wait
//! for the disk.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` for reading (and writing when `write`) with `O_NONBLOCK | O_NOCTTY` and the
/// extra open `flags` (such as `O_NOFOLLOW` or `O_DIRECT`). Clear `O_NONBLOCK` with
/// [`clear_nonblocking`] once the file is known to be what it should be.
pub fn open_nonblocking(path: &Path, write: bool, flags: i32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | flags)
        .open(path)
}

/// Clears `O_NONBLOCK` on `file`.
pub fn clear_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and touches no memory of ours.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an integer argument and touches no memory of ours.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn nonblocking(file: &File) -> bool {
        // SAFETY: F_GETFL takes no argument and touches no memory of ours.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0);
        flags & libc::O_NONBLOCK != 0
    }

    #[test]
    fn a_fifo_opens_at_once_and_the_flag_clears() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK this open would wait for a writer forever.
        let f = open_nonblocking(&fifo, false, 0).unwrap();
        assert!(nonblocking(&f));
        assert!(f.metadata().unwrap().file_type().is_fifo());
        clear_nonblocking(&f).unwrap();
        assert!(!nonblocking(&f));
    }
}
