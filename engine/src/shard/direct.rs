//! Choosing the descriptor of a data write when the export uses direct I/O.
//!
//! Reads choose with [`DataFd::read_fd`] alone (direct when aligned, else buffered). A write
//! whose memory is misaligned but whose offset and length are aligned is copied into an
//! aligned bounce buffer owned by its operation and still written directly, so that no guest
//! write dirties the page cache of a range other direct writes may have in flight. See
//! `io/direct.rs` for the alignment rules.

use crate::io::{iov_copy_to, iov_total_len, AlignedBuf, DataFd, WriteVia};
use libc::iovec;
use std::os::fd::RawFd;

/// The descriptor to write the memory `iov` describes at `offset` through. When the write is
/// bounced, `iov` is replaced by one iovec over the returned bounce buffer, which holds a copy
/// of the bytes it described and which the operation owns until its completion.
pub(super) fn write_fd(
    iov: &mut Vec<iovec>,
    fd: DataFd,
    offset: u64,
) -> (RawFd, Option<AlignedBuf>) {
    match fd.write_via(offset, iov) {
        WriteVia::Fd(fd) => (fd, None),
        WriteVia::Bounce { fd, mem_bytes } => {
            let len = iov_total_len(iov) as usize;
            let mut buf = AlignedBuf::zeroed(len, mem_bytes as usize);
            // SAFETY: the op's iovecs describe memory valid for reads until the op
            // completes (the request's memory under the submit contract, the shard's zero
            // buffer, or an allocation's buffer), and `buf` is a fresh allocation.
            unsafe { iov_copy_to(iov, 0, &mut buf) };
            iov.clear();
            iov.push(iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            });
            (fd, Some(buf))
        }
    }
}
