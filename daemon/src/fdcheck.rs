//! Checks of the file descriptors a frontend hands over, before anything of ours maps, reads
//! or writes them.
//!
//! A frontend is not trusted (a compromised QEMU is a process of another VM). A file mapped
//! as guest memory or as the in-flight area that is shorter than the mapping, or that the
//! frontend shrinks later, makes the first access past its end raise SIGBUS, which kills the
//! whole daemon. So a mapped file must cover what is mapped, and must be sealed against
//! shrinking ([`seal_against_shrinking`]): a memfd that is not sealed yet is sealed here
//! (F_SEAL_SHRINK; QEMU's memory-backend-memfd seals it itself). A file that cannot be
//! sealed (a hugetlbfs or tmpfs file of memory-backend-file, a memfd created without
//! MFD_ALLOW_SEALING, as libblkio creates them) is for the caller to refuse or accept.
//!
//! A file on huge pages (a hugetlbfs file, a memfd made with MFD_HUGETLB, of 2 MiB or 1 GiB
//! pages) is mapped with pages of its file system's block size, which [`page_size`] tells
//! (the SIGBUS handler replaces a page of that size). Its size is always a multiple of the
//! huge page (the kernel refuses any other), so the size check holds as for any file; a
//! mapping of it must lie on whole pages ([`off_whole_pages`]): mmap refuses an offset inside
//! a huge page, and a size that ends inside one is mapped to the page's end, which munmap
//! with the mapping's own size cannot undo (a hugetlb mapping splits only at its page
//! boundaries): the mapping, and the file's pages, would stay in the daemon. A hugetlb memfd
//! made with MFD_ALLOW_SEALING is sealed like any other memfd.
//!
//! Queue kick and call descriptors must be eventfds ([`is_eventfd`]), and are made
//! non-blocking ([`set_nonblocking`]): a pipe, or an eventfd whose counter the frontend filled,
//! could otherwise block the thread that writes to it forever.
//!
//! Pure functions over descriptors, called by the relay thread (`crate::relay`), by
//! `crate::inflight` when it maps an area, and by a connection's frontend thread when it
//! guards a memory table (`BlkBackend::guard_and_publish`: [`is_shrink_sealed`], [`page_size`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// What [`seal_against_shrinking`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealing {
    /// The file was sealed against shrinking already.
    Sealed,
    /// The file was not, and now is (F_SEAL_SHRINK added here).
    SealedNow,
    /// The file cannot be sealed: its file system has no seals (a regular or hugetlbfs file),
    /// or its seals are sealed (F_SEAL_SEAL) without F_SEAL_SHRINK.
    Unsealable,
}

/// Whether `file` is sealed against shrinking.
pub fn is_shrink_sealed(file: &File) -> bool {
    // SAFETY: fcntl(F_GET_SEALS) on a descriptor we own, with no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Makes sure `file` cannot shrink: already sealed, sealed now, or [`Sealing::Unsealable`].
pub fn seal_against_shrinking(file: &File) -> Sealing {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(F_GET_SEALS) on a descriptor we own, with no argument.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        // EINVAL: a file system without seals.
        return Sealing::Unsealable;
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        return Sealing::Sealed;
    }
    if seals & libc::F_SEAL_SEAL != 0 {
        return Sealing::Unsealable;
    }
    // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
        return Sealing::Unsealable;
    }
    if is_shrink_sealed(file) {
        Sealing::SealedNow
    } else {
        Sealing::Unsealable
    }
}

/// The size of the pages a shared mapping of `file` is made of: the huge page size of a file
/// on hugetlbfs (the file system's block size), else the base page size.
pub fn page_size(file: &File) -> io::Result<usize> {
    // SAFETY: a zeroed statfs is a valid value for fstatfs to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a descriptor we own, into a statfs of ours.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let base = base_page_size()?;
    if fs.f_type != libc::HUGETLBFS_MAGIC {
        return Ok(base);
    }
    match usize::try_from(fs.f_bsize) {
        Ok(huge) if huge.is_power_of_two() && huge >= base => Ok(huge),
        _ => Err(io::Error::other(format!(
            "a hugetlbfs file of {}-byte blocks",
            fs.f_bsize
        ))),
    }
}

/// The base page size.
pub fn base_page_size() -> io::Result<usize> {
    // SAFETY: sysconf has no memory-safety preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .ok_or_else(|| io::Error::other("the page size is unknown"))
}

/// Why a shared mapping of `size` bytes at `offset` of a file of `page`-byte pages
/// ([`page_size`]) could not be made and unmapped again like any other, if it could not:
/// mmap takes only an offset on a page boundary, and a mapping of huge pages covers whole
/// pages, which munmap frees only whole (the kernel splits a hugetlb mapping at its page
/// boundaries alone), so one whose size ends inside a page would stay mapped, holding its
/// file, once unmapped with its own size.
pub fn off_whole_pages(offset: u64, size: u64, page: usize, base: usize) -> Option<String> {
    let page_bytes = page as u64;
    if offset % page_bytes != 0 {
        return Some(format!(
            "the offset {offset} is not a multiple of the file's page size ({page} bytes)"
        ));
    }
    if page > base && size % page_bytes != 0 {
        return Some(format!(
            "the size {size} is not a multiple of the file's page size ({page} bytes: huge \
             pages are unmapped only whole)"
        ));
    }
    None
}

/// What `/proc/self/fd/N` says `fd` is (`anon_inode:[eventfd]`, `/memfd:name (deleted)`, a
/// path), or `None` when it cannot be read.
pub fn describe(fd: BorrowedFd<'_>) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Whether `fd` is an eventfd.
pub fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    describe(fd).as_deref() == Some("anon_inode:[eventfd]")
}

/// Sets O_NONBLOCK on `fd`'s open file description (shared with the frontend, which uses its
/// kick and call eventfds non-blocking anyway).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) on a valid descriptor, with no argument.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: fcntl(F_SETFL) on a valid descriptor, with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd};

    fn memfd(flags: libc::c_uint) -> File {
        // SAFETY: memfd_create with a C string literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fdcheck-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(1 << 20).unwrap();
        file
    }

    #[test]
    fn memfds_are_sealed_against_shrinking_when_they_can_be() {
        let open = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        assert!(describe(open.as_fd())
            .unwrap()
            .starts_with("/memfd:fdcheck-test"));
        assert!(!is_shrink_sealed(&open));
        assert_eq!(seal_against_shrinking(&open), Sealing::SealedNow);
        assert!(is_shrink_sealed(&open));
        assert!(open.set_len(4096).is_err(), "cannot shrink any more");
        assert_eq!(seal_against_shrinking(&open), Sealing::Sealed);
        // Without MFD_ALLOW_SEALING the seals are sealed from the start.
        let closed = memfd(libc::MFD_CLOEXEC);
        assert_eq!(seal_against_shrinking(&closed), Sealing::Unsealable);
        // A regular file has no seals.
        let dir = std::env::temp_dir().join(format!("qcow2d-fdcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = File::create(dir.join("ram")).unwrap();
        assert_eq!(seal_against_shrinking(&file), Sealing::Unsealable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Huge-page memfds, of 2 MiB and of 1 GiB pages: their page size is the huge page's,
    /// they are sized in whole pages, sealable ones are sealed, the others cannot be. (Sizing
    /// and sealing them needs no huge page reserved.)
    #[test]
    fn huge_page_memfds_have_huge_pages_and_seal_as_other_memfds() {
        let base = base_page_size().unwrap();
        assert_eq!(page_size(&memfd(libc::MFD_CLOEXEC)).unwrap(), base);
        for page in [2 << 20, 1 << 30] {
            let len = 2 * page as u64;
            let Some(closed) = huge_memfd(page, len, 0) else {
                continue;
            };
            assert!(closed.set_len(len + 4096).is_err(), "whole huge pages only");
            assert_eq!(page_size(&closed).unwrap(), page);
            assert_eq!(seal_against_shrinking(&closed), Sealing::Unsealable);
            let Some(open) = huge_memfd(page, len, libc::MFD_ALLOW_SEALING) else {
                continue;
            };
            assert_eq!(page_size(&open).unwrap(), page);
            assert_eq!(seal_against_shrinking(&open), Sealing::SealedNow);
            assert!(open.set_len(page as u64).is_err(), "cannot shrink any more");
        }
    }

    /// A huge-page memfd of `page` bytes per page and `len` bytes, made with `flags` and the
    /// size's MFD_HUGE_* flag, not mapped; `None`, said loudly, when the kernel has no pages
    /// of that size.
    pub(crate) fn huge_memfd(page: usize, len: u64, flags: libc::c_uint) -> Option<File> {
        let flags = libc::MFD_CLOEXEC
            | libc::MFD_HUGETLB
            | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT)
            | flags;
        // SAFETY: memfd_create with a C string literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fdcheck-huge".as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let knob = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page >> 10);
            assert!(
                e.raw_os_error() == Some(libc::EINVAL) && !std::path::Path::new(&knob).exists(),
                "memfd_create(MFD_HUGETLB) of {page}-byte pages: {e}"
            );
            eprintln!(
                "\n!!!!!!!! NOT TESTED: huge pages of {page} bytes, which this kernel does not \
                 have ({knob} does not exist) !!!!!!!!\n"
            );
            return None;
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        Some(file)
    }

    /// Offsets on the file's pages, and for huge pages sizes of whole pages too; a size of
    /// base pages may end anywhere (munmap rounds it up to its page).
    #[test]
    fn mappings_lie_on_whole_pages_of_their_file() {
        const BASE: usize = 4096;
        const HUGE: usize = 2 << 20;
        const GIGANTIC: usize = 1 << 30;
        let g = GIGANTIC as u64;
        // (offset, size, page size, refused)
        for (offset, size, page, refused) in [
            (0, 100, BASE, false),
            (8192, 4096 * 3 + 1, BASE, false),
            (100, 4096, BASE, true),
            (4 << 20, 2 << 20, HUGE, false),
            (4096, 2 << 20, HUGE, true),
            (0, 4096, HUGE, true),
            (0, (2 << 20) + 4096, HUGE, true),
            (g, 3 * g, GIGANTIC, false),
            (2 << 20, g, GIGANTIC, true),
            (g / 2, g, GIGANTIC, true),
            (0, 2 << 20, GIGANTIC, true),
            (g, g + 4096, GIGANTIC, true),
        ] {
            let why = off_whole_pages(offset, size, page, BASE);
            assert_eq!(
                why.is_some(),
                refused,
                "{size} bytes at {offset} of {page}: {why:?}"
            );
            if let Some(why) = why {
                assert!(why.contains(&format!("page size ({page} bytes")), "{why}");
            }
        }
    }

    #[test]
    fn only_eventfds_are_eventfds() {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let event = unsafe { File::from_raw_fd(fd) };
        assert!(is_eventfd(event.as_fd()));
        set_nonblocking(event.as_fd()).unwrap();
        // SAFETY: F_GETFL on a valid descriptor.
        let flags = unsafe { libc::fcntl(event.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors nothing else owns.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        assert!(!is_eventfd(r.as_fd()) && !is_eventfd(w.as_fd()));
        assert!(!is_eventfd(memfd(libc::MFD_CLOEXEC).as_fd()));
    }
}
