//! io_uring submission and completion, and the raw memory the kernel reads into.
//!
//! All of the engine's unsafe code lives here: pushing entries whose buffers the kernel will
//! write, copying or zeroing caller memory described by iovecs, and the aligned buffers and
//! statx call of direct I/O. Callers above this layer
//! (meta, shard) handle only safe values; the one contract they carry is that a buffer passed
//! to [`Ring::push`] outlives its completion, which the shard guarantees by keeping every
//! buffer in a slot that is freed only after its completion is reaped (and by draining the
//! ring before it is dropped).

mod direct;
mod inflate;
mod iov;
mod lock;
mod open;
mod ring;
pub mod sqe;
mod sys;

pub use direct::{
    min_direct_cluster_bytes, open_direct, AlignedBuf, DataFd, DioAlign, DioAlignSource,
    DirectError, WriteVia, SAFE_DIO_ALIGN,
};
pub use inflate::{ClusterInflater, InflatePool, Output, INFLATE_FAILED};
pub use iov::{
    iov_contiguous, iov_copy_from, iov_copy_to, iov_fill_zero, iov_subrange, iov_total_len,
};
pub use lock::{lock_file, lock_image, LockError, Perm, Role};
pub use open::{clear_nonblocking, open_nonblocking};
pub use ring::{BlockingReader, Ring};
pub use sys::pwrite_all;
