//! `--user USER[:GROUP]`: set up as root, then serve as an unprivileged user with no
//! capabilities left.
//!
//! Runs on the main thread during start-up. [`lookup`] resolves the names (or numbers) before
//! anything is opened; the sockets are then made with that
//! owner ([`give`]); [`drop_to`] runs once everything that needs root is done and before any
//! other thread exists (glibc would otherwise have to change every thread's ids behind their
//! seccomp filters): it empties the capability bounding set and the ambient set, sets the
//! supplementary groups to the one group, then the group and user ids (real, effective and
//! saved), and checks in `/proc/self/status` that no capability is left.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The user (and group) to serve as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// As given on the command line or in the config file.
    pub spec: String,
    /// User id.
    pub uid: libc::uid_t,
    /// Group id: the named group, else the user's primary group.
    pub gid: libc::gid_t,
}

/// Failures to find or become the user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user.
    #[error("No user {0:?}")]
    NoUser(String),
    /// No such group.
    #[error("No group {0:?}")]
    NoGroup(String),
    /// Changing ids needs root.
    #[error("--user needs the daemon to start as root (it runs as uid {0})")]
    NotRoot(libc::uid_t),
    /// Threads already run, which would keep their ids.
    #[error("Cannot change user: {0} threads are already running")]
    Threads(usize),
    /// A system call failed.
    #[error("Cannot {what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something survived the drop.
    #[error("Privileges remain after changing user: {0}")]
    Remains(String),
}

fn os(what: &'static str) -> UserError {
    UserError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// Resolves `USER[:GROUP]` (names or numeric ids).
pub fn lookup(spec: &str) -> Result<User, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = passwd_entry(user)?;
    let gid = match group {
        Some(g) => group_id(g)?,
        None => primary_gid,
    };
    Ok(User {
        spec: spec.to_owned(),
        uid,
        gid,
    })
}

fn passwd_entry(user: &str) -> Result<(libc::uid_t, libc::gid_t), UserError> {
    let no_user = || UserError::NoUser(user.to_owned());
    let name = CString::new(user).map_err(|_| no_user())?;
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r/getpwuid_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = match user.parse::<libc::uid_t>() {
        // SAFETY: every pointer is valid for the call; buf's length is passed.
        Ok(uid) => unsafe {
            libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result)
        },
        // SAFETY: as above, with a NUL-terminated name.
        Err(_) => unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        },
    };
    if rc != 0 || result.is_null() {
        return Err(no_user());
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

fn group_id(group: &str) -> Result<libc::gid_t, UserError> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let no_group = || UserError::NoGroup(group.to_owned());
    let name = CString::new(group).map_err(|_| no_group())?;
    // SAFETY: an all-zero group is a valid value for getgrnam_r to fill.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 65536];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(no_group());
    }
    Ok(grp.gr_gid)
}

/// Gives `path` (a socket or a directory made during set-up) to `user`, with `mode`.
pub fn give(path: &Path, user: &User, mode: libc::mode_t) -> Result<(), UserError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| UserError::Os {
        what: "give a path with a NUL byte to the user",
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // The mode first, while the path is still root's (no CAP_FOWNER needed).
    // SAFETY: a NUL-terminated path; chmod and lchown take no other pointers.
    if unsafe { libc::chmod(c.as_ptr(), mode) } != 0 {
        return Err(os("change the mode of a socket or directory"));
    }
    // SAFETY: as above.
    if unsafe { libc::lchown(c.as_ptr(), user.uid, user.gid) } != 0 {
        return Err(os("change the owner of a socket or directory"));
    }
    Ok(())
}

/// Checks that `--user` can work: the daemon runs as root.
pub fn check_root() -> Result<(), UserError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(UserError::NotRoot(euid));
    }
    Ok(())
}

/// Becomes `user` with no capabilities left. The process must have one thread.
pub fn drop_to(user: &User) -> Result<(), UserError> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(UserError::Threads(threads));
    }
    // The bounding set first (it needs CAP_SETPCAP): no capability can ever come back, even
    // through a file with capabilities (NO_NEW_PRIVS forbids that too).
    let mut cap = 0;
    // SAFETY: PR_CAPBSET_DROP takes a capability number; EINVAL past the last one ends it.
    while unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } == 0 {
        cap += 1;
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) || cap == 0 {
        return Err(os("empty the capability bounding set"));
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let groups = [user.gid];
    // SAFETY: one gid from a valid array.
    if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
        return Err(os("set the supplementary groups"));
    }
    // SAFETY: plain ids.
    if unsafe { libc::setresgid(user.gid, user.gid, user.gid) } != 0 {
        return Err(os("change the group id"));
    }
    // SAFETY: plain ids. Leaving uid 0 clears the permitted and effective capabilities
    // (no PR_SET_KEEPCAPS).
    if unsafe { libc::setresuid(user.uid, user.uid, user.uid) } != 0 {
        return Err(os("change the user id"));
    }
    verify(user)
}

/// Checks ids and capabilities after the drop.
fn verify(user: &User) -> Result<(), UserError> {
    // SAFETY: getters without preconditions.
    let (uid, euid, gid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    if (uid, euid, gid, egid) != (user.uid, user.uid, user.gid, user.gid) {
        return Err(UserError::Remains(format!(
            "uid {uid}, euid {euid}, gid {gid}, egid {egid}"
        )));
    }
    if user.uid != 0 {
        // SAFETY: plain id; must fail now.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(UserError::Remains("setuid(0) succeeded".into()));
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| UserError::Os {
        what: "read /proc/self/status",
        source,
    })?;
    let left: Vec<&str> = capability_lines(&status)
        // Root keeps its permitted and effective set (only the bounding set is gone).
        .filter(|(name, value)| {
            *value != 0 && (user.uid != 0 || matches!(*name, "CapBnd" | "CapAmb"))
        })
        .map(|(name, _)| name)
        .collect();
    if !left.is_empty() {
        return Err(UserError::Remains(format!("{} not empty", left.join(", "))));
    }
    Ok(())
}

/// The `CapEff`, `CapPrm`, `CapBnd` and `CapAmb` lines of a `/proc/PID/status`.
pub fn capability_lines(status: &str) -> impl Iterator<Item = (&str, u64)> {
    status.lines().filter_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !matches!(name, "CapEff" | "CapPrm" | "CapBnd" | "CapAmb") {
            return None;
        }
        Some((name, u64::from_str_radix(value.trim(), 16).ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_names_and_numbers() {
        let root = lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup("0:0").unwrap().uid, 0);
        let nobody = lookup("nobody:0").unwrap();
        assert_ne!(nobody.uid, 0);
        assert_eq!(nobody.gid, 0);
        assert!(matches!(
            lookup("no-such-user-qcow2d"),
            Err(UserError::NoUser(_))
        ));
        assert!(matches!(
            lookup("root:no-such-group-qcow2d"),
            Err(UserError::NoGroup(_))
        ));
    }

    #[test]
    fn reads_capability_lines() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                      CapEff:\t0000000000000001\nCapBnd:\t000001ffffffffff\nCapAmb:\t0\n";
        let caps: Vec<_> = capability_lines(status).collect();
        assert_eq!(
            caps,
            [
                ("CapPrm", 0),
                ("CapEff", 1),
                ("CapBnd", 0x1ff_ffff_ffff),
                ("CapAmb", 0)
            ]
        );
    }
}
