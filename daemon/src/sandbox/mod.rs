//! Confinement of `qcow2d serve`: what the daemon gives up once its images are open and its
//! sockets listen.
//!
//! - [`user`]: `--user`, dropping to an unprivileged user with no capabilities;
//! - [`landlock`]: the file system limited to the files served, the socket directories and
//!   the allowed roots;
//! - [`seccomp`]: a seccomp-BPF filter per thread, with only the system calls its role needs;
//! - the engine restricts each io_uring to the opcodes it uses (seccomp cannot see them).
//!
//! The main thread applies what is process-wide during start-up, before any other thread
//! exists; each thread then installs its own seccomp filter (see [`seccomp`]).

pub mod landlock;
pub mod seccomp;
pub mod user;

pub use seccomp::{Role, SeccompMode};
