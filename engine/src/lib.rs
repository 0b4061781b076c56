//! qcow2d engine: reads and writes QCOW2 images through io_uring, one shard per core.
//!
//! Layers, from the bottom up; each imports only from layers below it (ARCHITECTURE.md has
//! the picture):
//! - [`format`](mod@format): pure parsing and encoding of on-disk structures (no I/O, no unsafe);
//! - [`error`], [`meta`] (caches, the planner, refcounts, the metadata map) and [`io`] (the
//!   io_uring ring, submission entries, raw memory handed to the kernel);
//! - `paths` (which files an image may name), `layer` (one opened file of the chain),
//!   [`check`](mod@check) (`qcow2d check` and the repair of a dirty image, a counting of its
//!   own), [`overlap`] (the overlap checks), `write` (the writable state: refcounts, header,
//!   failure) and `shared` (the state every shard shares: the chain with its qcow2 top, the
//!   writable state, opening it);
//! - [`shard`]: the per-core executor that drives requests from submission to completion;
//! - [`image`]: [`Image`], the front: opening, making shards, `info`, blocking reads and
//!   writes for tools; `resize` adds [`Image::resize`].
//!
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
pub use io::{start_inflate_pool, InflatePoolConfig, InflateSharing};
pub use meta::{CacheBudget, CacheShare};
pub use overlap::OverlapCheck;
pub use shard::{Completion, LoggedStep, Shard, ShardConfig, WriteLog};

/// Guest-visible sector size used for alignment checks.
pub const SECTOR_SIZE: u64 = 512;
