//! Image locking compatible with QEMU's file-posix driver.
//!
//! QEMU takes open-file-description (OFD) byte-range read locks on each image file: byte
//! `100 + bit` for each permission it holds, and byte `200 + bit` for each permission it does
//! not let others hold (bits: 0 consistent read, 1 write, 2 write-unchanged, 3 resize). Before
//! locking it checks that no other file description holds a conflicting byte: holding a
//! permission conflicts with someone else's "unshared" byte for it, and unsharing a permission
//! conflicts with someone else's "held" byte. Locks vanish when the file is closed, so they
//! live exactly as long as the `File` that took them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits, as byte offsets from the two bases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// Bit 0: reads see consistent data.
    ConsistentRead = 0,
    /// Bit 1: writes that change data.
    Write = 1,
    /// Bit 2: writes that leave the data unchanged.
    WriteUnchanged = 2,
    /// Bit 3: resizing the file.
    Resize = 3,
}

impl Perm {
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

fn flock_at(byte: i64, lock_type: i32) -> libc::flock {
    // SAFETY: flock is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = lock_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Whether another file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass, which lives on our stack.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

fn lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(byte, libc::F_RDLCK);
    // SAFETY: F_OFD_SETLK only reads the flock struct we pass, which lives on our stack.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds a conflicting lock.
    Conflict(String),
    /// The lock calls failed.
    Os(io::Error),
}

/// How long a conflicting lock is given to go away before it counts. A file description can
/// outlive the process that held it for a moment: a daemon killed with requests in flight keeps
/// it open until the kernel has torn down its io_uring, and a description closed in one thread
/// lives on in a child forked by another until that child's `exec`. A real user of the image
/// holds its locks far longer.
const CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes QEMU-compatible locks on `file`: `held` permissions, and `unshared` permissions that
/// no one else may hold. Checks for conflicts first, as QEMU does; `needs_shared` are
/// permissions that others must share although we do not take them.
pub fn lock_image(
    file: &File,
    held: &[Perm],
    unshared: &[Perm],
    needs_shared: &[Perm],
) -> Result<(), LockError> {
    let start = std::time::Instant::now();
    loop {
        match check_conflicts(file, held, unshared, needs_shared) {
            Err(LockError::Conflict(_)) if start.elapsed() < CONFLICT_GRACE => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e),
            Ok(()) => break,
        }
    }
    for &p in held {
        lock_byte(file, PERM_BASE + p as i64).map_err(LockError::Os)?;
    }
    for &p in unshared {
        lock_byte(file, SHARED_BASE + p as i64).map_err(LockError::Os)?;
    }
    Ok(())
}

fn check_conflicts(
    file: &File,
    held: &[Perm],
    unshared: &[Perm],
    needs_shared: &[Perm],
) -> Result<(), LockError> {
    for &p in held.iter().chain(needs_shared) {
        if held_by_others(file, SHARED_BASE + p as i64).map_err(LockError::Os)? {
            return Err(LockError::Conflict(format!(
                "Failed to get \"{}\" lock: another process does not share it",
                p.name()
            )));
        }
    }
    for &p in unshared {
        if held_by_others(file, PERM_BASE + p as i64).map_err(LockError::Os)? {
            return Err(LockError::Conflict(format!(
                "Failed to get shared \"{}\" lock: another process holds it",
                p.name()
            )));
        }
    }
    Ok(())
}

/// The locks for a writer. It holds consistent reads and unshares consistent reads, write and
/// resize: QEMU cannot open the image for writing, nor for reading with I/O (it would see
/// metadata in the middle of changing), while `qemu-img info`, which opens without I/O
/// permissions, still works. It does not hold the write byte itself (QEMU's `qemu-img info`
/// checks it), and refuses an image whose users do not share writes.
pub fn lock_writer(file: &File) -> Result<(), LockError> {
    lock_image(
        file,
        &[Perm::ConsistentRead],
        &[Perm::ConsistentRead, Perm::Write, Perm::Resize],
        &[Perm::Write],
    )
}

/// The locks QEMU takes for a read-only user: consistent reads, and no writer or resizer
/// elsewhere.
pub fn lock_reader(file: &File) -> Result<(), LockError> {
    lock_image(
        file,
        &[Perm::ConsistentRead],
        &[Perm::Write, Perm::Resize],
        &[],
    )
}
