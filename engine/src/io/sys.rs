//! Plain system calls a shard thread makes outside its ring.

use std::io;
use std::os::fd::RawFd;

/// Writes all of `buf` at `offset` of `fd` with `pwrite`, retrying on EINTR; a write of
/// nothing is EIO.
pub fn pwrite_all(fd: RawFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live byte slice for the duration of the call; the kernel only
        // reads it. A bad `fd` is an error, not undefined behaviour.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}
