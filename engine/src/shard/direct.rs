//! Choosing the descriptor of a data write when the export uses direct I/O.
//!
//! Reads choose with [`DataFd::read_fd`] alone (direct when aligned, else buffered). A write
//! whose memory is misaligned but whose offset and length are aligned is copied into an
//! aligned bounce buffer owned by its operation and still written directly, so that no guest
//! write dirties the page cache of a range other direct writes may have in flight. See
//! `io/direct.rs` for the alignment rules.

use super::slab::OpId;
use super::State;
use crate::io::{iov_copy_to, iov_total_len, AlignedBuf, DataFd, WriteVia};
use std::os::fd::RawFd;

impl State {
    /// The descriptor to write operation `op`'s iovecs at `offset` through. When the write
    /// is bounced, the op's iovecs are replaced by one iovec over its bounce buffer, which
    /// holds a copy of the bytes they described.
    pub(super) fn data_write_fd(&mut self, op: OpId, fd: DataFd, offset: u64) -> RawFd {
        let o = &mut self.ops[op];
        match fd.write_via(offset, &o.iov) {
            WriteVia::Fd(fd) => fd,
            WriteVia::Bounce { fd, mem_bytes } => {
                let len = iov_total_len(&o.iov) as usize;
                let mut buf = AlignedBuf::zeroed(len, mem_bytes as usize);
                // SAFETY: the op's iovecs describe memory valid for reads until the op
                // completes (the request's memory under the submit contract, the shard's zero
                // buffer, or an allocation's buffer), and `buf` is a fresh allocation.
                unsafe { iov_copy_to(&o.iov, 0, &mut buf) };
                o.iov.clear();
                o.iov.push(libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: len,
                });
                o.bounce = Some(buf);
                fd
            }
        }
    }
}
