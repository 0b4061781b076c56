//! The last line of defence against a frontend that shrinks guest memory under the daemon.
//!
//! Guest memory is a file the frontend shares (`crate::fdcheck` checks each region against its
//! file and seals the file against shrinking). A file that cannot be sealed (a memfd made
//! without MFD_ALLOW_SEALING, as libblkio makes them, or a hugetlbfs or tmpfs file) can still
//! be truncated by the frontend while the daemon maps it; the next access to a page past the
//! new end raises SIGBUS, whose default action kills the whole daemon.
//!
//! So the daemon handles SIGBUS ([`install`], once at start-up): when the faulting address
//! lies in guest memory registered here ([`guard`], by each connection for the regions of its
//! memory table), the page is replaced by a private zero page (`mmap` with MAP_FIXED, which is
//! async-signal-safe) and the access is retried: the guest that cut its own memory reads
//! zeros there, and its writes land in a page nobody else sees. Anything else is not ours to
//! handle: the handler restores the default action and returns, so the access faults again
//! and the process dies as it would have. The kernel's own accesses (io_uring reads and
//! writes of guest memory) never raise SIGBUS: they fail with EFAULT, and the request with
//! IOERR.
//!
//! The registry is a fixed array of atomics, so the handler takes no lock and allocates
//! nothing. Any thread may register and unregister ranges.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Ranges that can be registered at once (regions of every connection's memory tables).
const SLOTS: usize = 1024;

/// Per slot: start (0: free) and end (exclusive) of a guest-memory mapping.
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// The page size, read once by [`install`] (sysconf is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// Pages replaced by zero pages since the daemon started.
static REPLACED: AtomicU64 = AtomicU64::new(0);

/// Installs the SIGBUS handler for the whole process.
pub fn install() -> io::Result<()> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if let Ok(page) = usize::try_from(page) {
        if page.is_power_of_two() {
            PAGE.store(page, Ordering::Relaxed);
        }
    }
    // SAFETY: a zeroed sigaction is a valid starting point; every field we rely on is set
    // below, and sigemptyset initialises the mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a sigset_t owned by `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only uses async-signal-safe operations (atomics, mmap,
    // signal); the old action is not wanted.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGBUS
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page_size = PAGE.load(Ordering::Relaxed);
    for i in 0..SLOTS {
        let start = STARTS[i].load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= ENDS[i].load(Ordering::Acquire) {
            continue;
        }
        let page = addr & !(page_size - 1);
        // SAFETY: replaces one page of a guest-memory mapping of ours (registered, so mapped
        // by this process and only ever accessed through raw copies and the kernel) with a
        // private anonymous page; mmap is async-signal-safe.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            REPLACED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        break;
    }
    // Not guest memory (or it could not be replaced): the default action, on the retry.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Guest-memory ranges registered with the handler; unregistered when dropped.
#[derive(Default)]
pub struct Guard {
    slots: Vec<usize>,
}

/// Registers the `(start, length)` host ranges of guest memory. Ranges beyond the registry's
/// room are not protected (a warning says so).
pub fn guard(ranges: impl IntoIterator<Item = (usize, usize)>) -> Guard {
    let mut g = Guard::default();
    for (start, len) in ranges {
        if start == 0 || len == 0 {
            continue;
        }
        let claimed = (0..SLOTS).find(|&i| {
            // Claimed with a placeholder start, then the range written.
            STARTS[i]
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        let Some(i) = claimed else {
            tracing::warn!("Too many guest-memory regions to guard against truncation");
            break;
        };
        ENDS[i].store(start.saturating_add(len), Ordering::Release);
        STARTS[i].store(start, Ordering::Release);
        g.slots.push(i);
    }
    g
}

impl Drop for Guard {
    fn drop(&mut self) {
        for &i in &self.slots {
            STARTS[i].store(0, Ordering::Release);
        }
    }
}

/// Pages replaced by zero pages since the daemon started.
pub fn replaced_pages() -> u64 {
    REPLACED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn a_truncated_guest_mapping_reads_as_zeros_instead_of_killing_the_process() {
        install().unwrap();
        // SAFETY: memfd_create with a C string literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let len = 4 * PAGE.load(Ordering::Relaxed);
        file.set_len(len as u64).unwrap();
        // SAFETY: maps the whole file, shared; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let bytes = ptr.cast::<u8>();
        // SAFETY: within the mapping, and the file covers it.
        unsafe { bytes.add(len - 1).write_volatile(7) };
        let guard = guard([(ptr as usize, len)]);
        // The frontend cuts the file to one page.
        file.set_len(PAGE.load(Ordering::Relaxed) as u64).unwrap();
        let before = replaced_pages();
        // SAFETY: within the mapping; the page past the end of the file raises SIGBUS, which
        // the handler turns into a zero page.
        let read = unsafe { bytes.add(len - 1).read_volatile() };
        assert_eq!(read, 0);
        // SAFETY: as above: the write lands in the private page.
        unsafe { bytes.add(len - 2).write_volatile(9) };
        assert_eq!(replaced_pages(), before + 1);
        drop(guard);
        // SAFETY: unmaps what was mapped above.
        unsafe { libc::munmap(ptr, len) };
    }
}
