//! Metadata: per-shard caches of L2 tables and decompressed clusters (and the budget several
//! may share), the planner that maps a guest range to what it reads as, a writable image's
//! refcounts and its metadata map.
//!
//! The caches and the planner run on a shard thread, each cache owned by one shard. The
//! refcounts ([`Refcounts`]) and the metadata map ([`MetaMap`]) belong to a writable image and
//! are shared by its shards: the refcounts behind the image's mutex (`write.rs`, slow paths
//! only), the map through an `Arc` of atomics. Nothing here does I/O: the shard asks the
//! planner what a range maps to and submits the I/O itself.
#![forbid(unsafe_code)]

mod budget;
mod cache;
pub mod overlap;
mod plan;
mod refcount;

pub use budget::{CacheBudget, CacheShare};
pub use cache::{Lookup, SlotCache, U64Hasher, WaitList, NO_ID};
pub use overlap::{class, MetaMap};
pub use plan::{resolve, Geometry, Step};
pub use refcount::{RefcountError, Refcounts, TableLocation, TableSnapshot};
