//! io_uring submission and completion, the raw memory the kernel reads into, and the other
//! system calls the engine makes (locks, opens, direct I/O, inflate workers).
//!
//! Most of the engine's unsafe code lives here: the rings (`ring.rs`), copying or zeroing
//! caller memory described by iovecs (`iov.rs`), the aligned buffers and statx call of direct
//! I/O (`direct.rs`), locks and non-blocking opens (`lock.rs`, `open.rs`), the inflate
//! workers' rings and output pointers (`inflate.rs`), a plain `pwrite` (`sys.rs`). Building a
//! submission entry (`sqe.rs`) is safe; pushing one ([`Ring::push`]) is not.
//!
//! Outside io/, unsafe code is confined to the shard (`shard/`), at the points where its
//! contract with the kernel and its callers is kept: pushing entries (`dispatch.rs`, callers
//! in `l2.rs`, `read.rs`, `write.rs`, `flush.rs`; the buffer named lives in the operation's
//! arena entry, freed only after its completion is reaped, and the ring is drained before it
//! is dropped), copying between requests' iovecs and the shard's buffers (`read.rs`,
//! `write.rs`, `direct.rs`), handing a compressed cluster to an inflate worker (`read.rs`),
//! the public `submit_read`/`submit_write` (whose callers keep their memory valid until the
//! completion), `Send` for `Shard`, the iovec pointer a piece sent to another shard carries
//! (`Send` for the message and the eventfd write that wakes the shard in `group.rs`, its
//! reading in `coordinate.rs`). format/, meta/, paths.rs, check/ and `shard/flush_plan.rs`
//! forbid unsafe code.

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
pub use inflate::{
    start_inflate_pool, ClusterInflater, InflatePool, InflatePoolConfig, InflateQueue,
    InflateSharing, Job, Output, INFLATE_FAILED,
};
pub use iov::{
    iov_contiguous, iov_copy_from, iov_copy_to, iov_fill_zero, iov_subrange, iov_total_len,
};
pub use lock::{lock_file, lock_image, unlock_file, LockError, Perm, Role};
pub use open::{clear_nonblocking, open_nonblocking};
pub use ring::{BlockingReader, Ring, POSTED};
pub use sys::pwrite_all;
