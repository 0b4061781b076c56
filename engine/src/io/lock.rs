//! Image locking compatible with QEMU's file-posix driver; called at open time on the thread
//! that opens an image.
//!
//! QEMU takes open-file-description (OFD) byte-range read locks on each file it opens: byte
//! `100 + bit` for each permission it holds, and byte `200 + bit` for each permission it does
//! not let others hold (bits: 0 consistent read, 1 write, 2 write-unchanged, 3 resize). Before
//! locking it checks that no other file description holds a conflicting byte: holding a
//! permission conflicts with someone else's "unshared" byte for it, and unsharing a permission
//! conflicts with someone else's "held" byte. The layer that owns a locked `File` gives its
//! locks back when it is dropped ([`unlock_file`]), without waiting for the kernel to let go
//! of the file description.
//!
//! Which bytes a QEMU process takes depends on the file's role under the qcow2 driver; the
//! [`Role`]s below are those qemu-storage-daemon takes (QEMU 10, read from /proc/locks while it
//! exports an image over vhost-user-blk writable, and read-only with `read-only=on` nodes).
//!
//! QEMU lets others write an external data file or a raw backing file while it uses one: an
//! image whose data file names another image's raw backing file or data file would write its
//! guest data into that other disk. qcow2d keeps that out with one lock of its own, on bytes
//! QEMU never takes (so QEMU's tools meet exactly the locks a QEMU process takes): a data file
//! written through an image holds "guest data write" ([`OWN_PERM_BASE`]), and every data file
//! and raw backing file unshares it ([`OWN_SHARED_BASE`]). Images of one daemon, and of two,
//! so never write guest data into a file another image reads or writes as guest data.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// qcow2d's own "guest data write" permission: held by an external data file written through
/// an image. Far from QEMU's bytes (100..=104, 200..=204).
const OWN_PERM_BASE: i64 = 0x7163_6400;
/// Held where "guest data write" is not shared: by every external data file and raw backing
/// file.
const OWN_SHARED_BASE: i64 = OWN_PERM_BASE + 0x100;

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

/// What a file is to the image that opens it, which decides the bytes locked on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A qcow2 file opened for writing (a writable export's image, `check --repair`): holds
    /// consistent read, write and resize (bytes 100, 101, 103) and unshares write and resize
    /// (201, 203). Readers that share writes (`qemu-img ... -U`, `qemu-io -r -U`) may open it;
    /// every writer, and every reader that does not share writes, is kept out.
    Qcow2Writer,
    /// A qcow2 file opened read-only (a read-only export, a qcow2 backing file, `check`):
    /// holds consistent read (100) and unshares write and resize (201, 203), as a qcow2 node
    /// unshares them on its metadata file even when it only reads.
    Qcow2Reader,
    /// An external data file written through its image: holds consistent read, write and
    /// resize (100, 101, 103) and unshares only resize (203); QEMU shares writes of guest data.
    DataWriter,
    /// An external data file of a read-only image: holds consistent read (100), unshares
    /// resize (203).
    DataReader,
    /// A raw backing file: holds consistent read (100) and shares everything.
    RawBacking,
}

impl Role {
    /// The permissions held, and those not shared with others.
    fn perms(self) -> (&'static [Perm], &'static [Perm]) {
        use Perm::*;
        match self {
            Role::Qcow2Writer => (&[ConsistentRead, Write, Resize], &[Write, Resize]),
            Role::Qcow2Reader => (&[ConsistentRead], &[Write, Resize]),
            Role::DataWriter => (&[ConsistentRead, Write, Resize], &[Resize]),
            Role::DataReader => (&[ConsistentRead], &[Resize]),
            Role::RawBacking => (&[ConsistentRead], &[]),
        }
    }

    /// Whether the role holds qcow2d's own "guest data write" permission, and whether it
    /// unshares it.
    fn guest_data(self) -> (bool, bool) {
        match self {
            Role::Qcow2Writer | Role::Qcow2Reader => (false, false),
            Role::DataWriter => (true, true),
            Role::DataReader | Role::RawBacking => (false, true),
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

/// Gives back every lock `file`'s description holds, at once. Closing the file gives them
/// back too, but only when the last reference to the description goes, which an io_uring
/// being torn down or a child that another thread forked (until its `exec`) can hold for a
/// moment: a user who closes an image and starts `qemu-img` on it next must not find it
/// still locked. Errors are ignored: the close that follows releases the locks anyway.
pub fn unlock_file(file: &File) {
    let mut fl = flock_at(0, libc::F_UNLCK);
    // To the end of the file, whatever it grows to.
    fl.l_len = 0;
    // SAFETY: F_OFD_SETLK only reads the flock struct we pass, which lives on our stack.
    let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds a conflicting lock.
    Conflict(String),
    /// Another image (of this process or another) reads or writes the file as guest data,
    /// which it would then share with this one.
    GuestData(String),
    /// The lock calls failed.
    Os(io::Error),
}

/// How long a conflicting lock is given to go away before it counts. A file description can
/// outlive the process that held it for a moment: a daemon killed with requests in flight keeps
/// it open until the kernel has torn down its io_uring, and a description closed in one thread
/// lives on in a child forked by another until that child's `exec`. A real user of the image
/// holds its locks far longer.
const CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes the locks of `role` on `file`, after checking for conflicts as QEMU does. A conflict
/// is checked again until [`CONFLICT_GRACE`] has passed before it is reported.
pub fn lock_file(file: &File, role: Role) -> Result<(), LockError> {
    let (held, unshared) = role.perms();
    let (hold, unshare) = role.guest_data();
    retry_conflicts(|| {
        if hold && held_by_others(file, OWN_SHARED_BASE).map_err(LockError::Os)? {
            return Err(LockError::GuestData(
                "it is a raw backing file or external data file in use (by this image or another), whose data guest writes through this image would overwrite".to_owned(),
            ));
        }
        if unshare && held_by_others(file, OWN_PERM_BASE).map_err(LockError::Os)? {
            return Err(LockError::GuestData(
                "an image in use (this one or another) writes its guest data into it as its external data file".to_owned(),
            ));
        }
        Ok(())
    })?;
    lock_image(file, held, unshared)?;
    if hold {
        lock_byte(file, OWN_PERM_BASE).map_err(LockError::Os)?;
    }
    if unshare {
        lock_byte(file, OWN_SHARED_BASE).map_err(LockError::Os)?;
    }
    Ok(())
}

/// Takes QEMU-compatible locks on `file`: `held` permissions, and `unshared` permissions that
/// no one else may hold.
pub fn lock_image(file: &File, held: &[Perm], unshared: &[Perm]) -> Result<(), LockError> {
    retry_conflicts(|| check_conflicts(file, held, unshared))?;
    for &p in held {
        lock_byte(file, PERM_BASE + p as i64).map_err(LockError::Os)?;
    }
    for &p in unshared {
        lock_byte(file, SHARED_BASE + p as i64).map_err(LockError::Os)?;
    }
    Ok(())
}

/// Runs `check` until it finds no conflict, or reports the conflict it still finds once
/// [`CONFLICT_GRACE`] has passed.
fn retry_conflicts(check: impl Fn() -> Result<(), LockError>) -> Result<(), LockError> {
    let start = std::time::Instant::now();
    loop {
        match check() {
            Err(LockError::Conflict(_) | LockError::GuestData(_))
                if start.elapsed() < CONFLICT_GRACE =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// QEMU's check, with its messages: a held permission someone does not share, then an
/// unshared permission someone holds.
fn check_conflicts(file: &File, held: &[Perm], unshared: &[Perm]) -> Result<(), LockError> {
    for &p in held {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes another description of the same file sees locked, among 100..=104, 200..=204.
    fn locked_bytes(path: &std::path::Path) -> Vec<i64> {
        let probe = File::open(path).unwrap();
        (PERM_BASE..PERM_BASE + 5)
            .chain(SHARED_BASE..SHARED_BASE + 5)
            .filter(|&b| held_by_others(&probe, b).unwrap())
            .collect()
    }

    #[test]
    fn unlock_gives_the_locks_back_while_the_description_lives_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let f = File::options().read(true).write(true).open(&path).unwrap();
        lock_file(&f, Role::Qcow2Writer).unwrap();
        // A second reference to the description, as a forked child or a ring holds one.
        let other = f.try_clone().unwrap();
        unlock_file(&f);
        drop(f);
        assert_eq!(locked_bytes(&path), Vec::<i64>::new());
        drop(other);
    }

    #[test]
    fn each_role_locks_the_bytes_qemu_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        for (role, bytes) in [
            (Role::Qcow2Writer, vec![100, 101, 103, 201, 203]),
            (Role::Qcow2Reader, vec![100, 201, 203]),
            (Role::DataWriter, vec![100, 101, 103, 203]),
            (Role::DataReader, vec![100, 203]),
            (Role::RawBacking, vec![100]),
        ] {
            let f = File::open(&path).unwrap();
            lock_file(&f, role).unwrap();
            assert_eq!(locked_bytes(&path), bytes, "{role:?}");
        }
    }

    #[test]
    fn guest_data_is_never_written_where_another_image_reads_or_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        use Role::*;
        for (first, second, ok) in [
            (RawBacking, DataWriter, false),
            (DataReader, DataWriter, false),
            (DataWriter, DataWriter, false),
            (DataWriter, RawBacking, false),
            (DataWriter, DataReader, false),
            (RawBacking, RawBacking, true),
            (RawBacking, DataReader, true),
            (DataReader, DataReader, true),
        ] {
            let a = open();
            lock_file(&a, first).unwrap();
            let b = open();
            match lock_file(&b, second) {
                Ok(()) => assert!(ok, "{first:?} then {second:?} was allowed"),
                Err(LockError::GuestData(_)) => assert!(!ok, "{first:?} then {second:?}"),
                Err(e) => panic!("{first:?} then {second:?}: {e:?}"),
            }
            // Given back with the file, as QEMU's are.
            drop(a);
            let c = open();
            lock_file(&c, second).unwrap();
        }
    }
}
