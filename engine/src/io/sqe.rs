//! The submission entries a shard pushes, one builder per operation it performs (the opcodes
//! its ring accepts: see `ring.rs`).
//!
//! Building an entry is safe: it only records addresses. Pushing it ([`super::Ring::push`]) is
//! the unsafe step, whose caller keeps the memory the entry names alive and unmoved until the
//! completion is reaped.

use io_uring::{opcode, types};
use libc::iovec;
use std::os::fd::RawFd;

pub use io_uring::squeue::Entry as Sqe;
pub use io_uring::types::Timespec;

/// Reads `buf.len()` bytes at `offset` of `fd` into `buf` (at most 4 GiB).
pub fn read(fd: RawFd, buf: &mut [u8], offset: u64) -> Sqe {
    opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len32(buf.len()))
        .offset(offset)
        .build()
}

/// Writes `buf` at `offset` of `fd`; `rw_flags` as for `pwritev2` (`RWF_DSYNC`, or 0).
pub fn write(fd: RawFd, buf: &[u8], offset: u64, rw_flags: i32) -> Sqe {
    opcode::Write::new(types::Fd(fd), buf.as_ptr(), len32(buf.len()))
        .offset(offset)
        .rw_flags(rw_flags)
        .build()
}

/// Reads at `offset` of `fd` into the memory `iov` describes.
pub fn readv(fd: RawFd, iov: &[iovec], offset: u64) -> Sqe {
    opcode::Readv::new(types::Fd(fd), iov.as_ptr(), len32(iov.len()))
        .offset(offset)
        .build()
}

/// Writes the memory `iov` describes at `offset` of `fd`.
pub fn writev(fd: RawFd, iov: &[iovec], offset: u64) -> Sqe {
    opcode::Writev::new(types::Fd(fd), iov.as_ptr(), len32(iov.len()))
        .offset(offset)
        .build()
}

/// fdatasync of `fd`.
pub fn fdatasync(fd: RawFd) -> Sqe {
    opcode::Fsync::new(types::Fd(fd))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
}

/// Does nothing (stands in for an operation left out).
pub fn nop() -> Sqe {
    opcode::Nop::new().build()
}

/// Completes (with `-ETIME`) once `after` has passed.
pub fn timeout(after: &'static Timespec) -> Sqe {
    opcode::Timeout::new(after).build()
}

/// A length the kernel takes as 32 bits; every caller's is far below (at most two clusters of
/// 2 MiB, at most `IOV_MAX` iovecs).
fn len32(len: usize) -> u32 {
    debug_assert!(
        u32::try_from(len).is_ok(),
        "an I/O of {len} bytes or iovecs"
    );
    len as u32
}
