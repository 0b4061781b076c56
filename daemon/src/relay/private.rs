//! The private connection between the relay and vhost-user-backend's request handler of one
//! connection, through a socket in a directory only the daemon's user can enter. Made on the
//! listener thread as a connection is set up.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use vhost::vhost_user::Listener;

/// The directory `qcow2d serve` makes at start-up for the private sockets
/// ([`make_private_dir`]); without one (unit tests), each connection makes its own.
static PRIVATE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Makes a new directory only the daemon's user can enter, under `parent`, for the private
/// sockets of every connection from now on, and returns it (to be removed at exit). Made
/// once at start-up, so that serving a connection creates no directory.
pub fn make_private_dir(parent: &Path) -> io::Result<PathBuf> {
    let dir = new_private_dir(parent)?;
    // A second call (tests) keeps the first directory.
    let _ = PRIVATE_DIR.set(dir.clone());
    Ok(dir)
}

fn new_private_dir(parent: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("qcow2d-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left over by a process that had our pid before: try the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A listener with one connection already waiting to be accepted, and that connection's other
/// end. The listening socket lives in a directory only this user can enter and is removed as
/// soon as the connection exists, so nobody else can connect to it.
pub fn private_connection() -> io::Result<(Listener, UnixStream)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (own_dir, path) = match PRIVATE_DIR.get() {
        Some(dir) => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            (None, dir.join(format!("c{n}")))
        }
        None => {
            let dir = new_private_dir(&std::env::temp_dir())?;
            let path = dir.join("s");
            (Some(dir), path)
        }
    };
    let connected = UnixListener::bind(&path)
        .and_then(|listener| UnixStream::connect(&path).map(|stream| (listener, stream)));
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = own_dir {
        let _ = std::fs::remove_dir(&dir);
    }
    let (listener, stream) = connected?;
    Ok((Listener::from(listener), stream))
}
