//! qcow2d engine: reads (and later writes) QCOW2 images through io_uring, one shard per core.
//!
//! Layers, from the bottom up:
//! - [`format`]: pure parsing and encoding of on-disk structures (no I/O, no unsafe);
//! - [`meta`]: L2 caches and the planner that maps a guest range to host operations;
//! - [`io`]: the io_uring ring and the raw buffers handed to the kernel (all the ring's unsafe);
//! - [`shard`]: the per-core executor that drives requests from submission to completion.
//!
//! [`Image`] is the opened image (header, backing chain, files), shared read-only by all shards.
//! Each thread that serves requests owns one [`Shard`] made by [`Image::new_shards`]; the
//! frontend (the daemon's vhost-user-blk code, or a test) submits requests to it and polls it
//! for completions. Nothing here knows about virtio.

pub mod check;
pub mod error;
pub mod format;
pub mod image;
pub mod io;
mod layer;
pub mod meta;
pub mod overlap;
mod paths;
mod resize;
pub mod shard;
mod shared;
mod write;

pub use check::{check, CheckReport};
pub use error::{Error, ErrorKind, IoError};
pub use image::{verify_named_files, Image, ImageInfo, OpenOptions};
pub use overlap::OverlapCheck;
pub use shard::{Completion, Shard, ShardConfig};

/// Guest-visible sector size used for alignment checks.
pub const SECTOR_SIZE: u64 = 512;
