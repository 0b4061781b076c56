//! Metadata: per-shard caches of L2 tables and decompressed clusters, and the planner that
//! maps a guest range to what it reads as.
//!
//! Runs on a shard thread; every structure here is owned by exactly one shard. Nothing here
//! does I/O: the shard asks the planner what a range maps to and submits the I/O itself.
#![forbid(unsafe_code)]

mod cache;
pub mod overlap;
mod plan;
mod refcount;

pub use cache::{Lookup, SlotCache, U64Hasher, WaitList, NO_ID};
pub use overlap::{class, MetaMap};
pub use plan::{resolve, Geometry, Step};
pub use refcount::{RefcountError, Refcounts, TableLocation, TableSnapshot};
