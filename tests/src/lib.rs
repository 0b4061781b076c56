//! The workspace's test helpers: the library every test binary of tests/tests/ links, so each
//! binary uses what it needs and nothing is compiled eight times under `allow(dead_code)`. The
//! engine's integration tests (engine/tests/) and the daemon's unit tests link it too, as a
//! dev-dependency. No other test code wraps the tools, draws test data or runs a blkio client
//! (the fuzz targets, a workspace of their own, keep the two qemu helpers they need; the
//! bench's load generator and image maker are the product's own).
//!
//! - [`process`]: time limits; running a closure or a command under a limit;
//! - [`tools`]: `qemu-img`, `qemu-io` and `qemu-storage-daemon`, found once (a missing tool
//!   fails the test, naming it and its package) and wrapped once: making images, the oracle
//!   (`qemu-img convert -O raw`), `qemu-img check` / `compare`, a `qemu-io` holding an image open;
//! - [`rng`]: the one seeded pseudo-random generator and the test data made from it;
//! - [`scratch`]: a private temp dir per test;
//! - [`compare`]: read plans, the oracle comparison, reading through the engine;
//! - [`daemon`]: the `qcow2d` process (start, ready line, stop, kill, subcommands);
//! - [`blk`]: the vhost-user-blk client on blkio (read and read-write), every wait bounded;
//! - [`header`]: big-endian header parsing and patching for the bad-image tests;
//! - [`frontend`]: a raw vhost-user-blk frontend with its own guest memory, and raw messages
//!   of any shape on its socket, for tests that play a hostile frontend.
//!
//! Everything but [`frontend`] is re-exported at the root: a test says `use qcow2d_tests::*;`.
//! Every helper runs on the calling test's thread unless its doc says otherwise.

pub mod blk;
pub mod compare;
pub mod daemon;
pub mod frontend;
pub mod header;
pub mod process;
pub mod rng;
pub mod scratch;
pub mod tools;

pub use blk::*;
pub use compare::*;
pub use daemon::*;
pub use header::*;
pub use process::*;
pub use rng::*;
pub use scratch::*;
pub use tools::*;
