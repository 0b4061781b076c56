//! File system confinement with Landlock: once the images are open and the sockets listen,
//! the daemon can reach only the files it serves, the directories of its sockets and the
//! allowed roots.
//!
//! Applied by the main thread during start-up, before any other thread exists, so every
//! thread inherits it (Landlock restricts the calling thread and its future children).
//! Best effort by Landlock ABI: a right the kernel does not know is not handled (and so not
//! restricted); a kernel without Landlock leaves the file system as it is, and the log says
//! which. What stays reachable ([`FsPolicy`]):
//! - every image of every export, with its backing files and external data file: read, and
//!   write and truncate for the files of a writable export;
//! - each socket's directory: make, connect to and remove unix sockets;
//! - systemd's notification socket (connect);
//! - each allowed root (`allow_paths`), for images and sockets added at run time: read, write,
//!   truncate, list, make, connect to and remove sockets.
//!
//! Everything else, directories included, is refused with EACCES, whatever the path check
//! before it decided. TCP binds and connects are refused too (the metrics endpoint is bound
//! before), and, where the kernel scopes them, signals to processes outside the sandbox.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};
use tracing::{info, warn};

/// The newest Landlock ABI this code asks for; older kernels get what they know of it.
const TARGET_ABI: ABI = ABI::V10;

/// What the daemon may still reach.
#[derive(Clone, Debug, Default)]
pub struct FsPolicy {
    /// Files read only (read-only images, backing files).
    pub read_files: Vec<PathBuf>,
    /// Files read and written (writable images and their data files).
    pub write_files: Vec<PathBuf>,
    /// Directories where unix sockets are made, connected to and removed.
    pub socket_dirs: Vec<PathBuf>,
    /// Unix sockets that may be connected to (systemd's notification socket).
    pub connect_sockets: Vec<PathBuf>,
    /// Allowed roots: everything above beneath each of them.
    pub roots: Vec<PathBuf>,
    /// Whether abstract unix sockets outside the sandbox stay reachable (systemd's
    /// notification socket may be one).
    pub abstract_unix: bool,
}

/// Failures to confine the file system (a kernel without Landlock is not one).
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// A path to allow cannot be opened.
    #[error("Cannot open {} to allow it in the file system sandbox", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// Landlock's error.
        #[source]
        source: landlock::PathFdError,
    },
    /// A path cannot be allowed.
    #[error("Cannot allow {} in the file system sandbox", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// Landlock's error.
        #[source]
        source: RulesetError,
    },
    /// The ruleset cannot be built or enforced.
    #[error("Cannot confine the file system with Landlock")]
    Ruleset(#[from] RulesetError),
}

/// How much of the confinement the kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything asked for.
    Full,
    /// What the kernel's Landlock ABI knows of it.
    Partial,
    /// Nothing: the kernel has no Landlock.
    None,
}

/// A ruleset whose paths are open, ready to be enforced (possibly after a change of user
/// that could no longer open them).
pub struct Prepared(landlock::RulesetCreated);

/// Opens every path of `policy` into a ruleset.
pub fn prepare(policy: &FsPolicy) -> Result<Prepared, LandlockError> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::ReadFile;
    let write = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let sockets = AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ResolveUnix;

    let mut scopes = BitFlags::from(Scope::Signal);
    if !policy.abstract_unix {
        scopes |= Scope::AbstractUnixSocket;
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .handle_access(AccessNet::from_all(TARGET_ABI))?
        .scope(scopes)?
        .create()?;
    let rules: [(&[PathBuf], BitFlags<AccessFs>); 5] = [
        (&policy.read_files, read.into()),
        (&policy.write_files, write),
        (&policy.socket_dirs, sockets),
        (&policy.connect_sockets, AccessFs::ResolveUnix.into()),
        (&policy.roots, write | sockets | AccessFs::ReadDir),
    ];
    for (paths, access) in rules {
        for path in paths {
            ruleset = add_path(ruleset, path, access)?;
        }
    }
    Ok(Prepared(ruleset))
}

impl Prepared {
    /// Restricts the calling thread (and the threads it starts from now on). Sets
    /// NO_NEW_PRIVS.
    pub fn enforce(self) -> Result<Enforcement, LandlockError> {
        enforce(self.0)
    }
}

fn enforce(ruleset: landlock::RulesetCreated) -> Result<Enforcement, LandlockError> {
    let status = ruleset.restrict_self()?;
    let enforcement = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    };
    match enforcement {
        Enforcement::Full => info!("Landlock: the file system is confined"),
        Enforcement::Partial => info!(
            "Landlock: the file system is confined as far as this kernel's Landlock version \
             allows"
        ),
        Enforcement::None => warn!(
            "Landlock is not available in this kernel: the file system is not confined \
             (seccomp filters still apply)"
        ),
    }
    Ok(enforcement)
}

fn add_path(
    ruleset: landlock::RulesetCreated,
    path: &Path,
    access: BitFlags<AccessFs>,
) -> Result<landlock::RulesetCreated, LandlockError> {
    let error = |source| LandlockError::Path {
        path: path.to_owned(),
        source,
    };
    let fd = PathFd::new(path).map_err(|source| LandlockError::Open {
        path: path.to_owned(),
        source,
    })?;
    // A file takes only the rights that apply to files.
    let access = match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => access & AccessFs::from_file(TARGET_ABI),
        _ => access,
    };
    ruleset
        .add_rule(PathBeneath::new(fd, access))
        .map_err(error)
}
