//! The last line of defence against a frontend that shrinks guest memory under the daemon.
//!
//! Guest memory is a file the frontend shares (`crate::fdcheck` checks each region against its file
//! and seals the file against shrinking). A file that cannot be sealed (a memfd made without
//! MFD_ALLOW_SEALING, as libblkio makes them, or a hugetlbfs or tmpfs file) can still be truncated
//! by the frontend while the daemon maps it; the next access to a page past the new end raises
//! SIGBUS, whose default action kills the whole daemon.
//!
//! So the daemon handles SIGBUS ([`install`], once at start-up): when the faulting address lies in
//! guest memory registered here ([`Guards`], by each connection for the regions of its memory
//! tables), the page is replaced by a private zero page (`mmap` with MAP_FIXED, which is
//! async-signal-safe) and the access is retried: the guest that cut its own memory reads zeros
//! there, and its writes land in a page nobody else sees. The page replaced is one of the mapping's
//! own pages: each range is registered with its file's page size (a huge page for hugetlbfs files
//! and MFD_HUGETLB memfds, `crate::fdcheck::page_size`), and the whole page holding the fault,
//! aligned to that size, is replaced (the kernel splits a hugetlb mapping only at huge-page
//! boundaries: a 4 KiB page cannot be mapped into one). Ranges of memory tables no longer used may
//! stay registered for a while, and the address space they covered may meanwhile hold another
//! mapping: when several registered ranges hold the fault, the smallest of their page sizes is
//! used, so the handler never replaces more than the faulting mapping's own page (a size too small
//! for a hugetlb mapping makes the `mmap` fail, and the process dies as it would have, rather than
//! losing memory next to the page). Anything else is not ours to handle: the handler restores the
//! default action and returns, so the access faults again and the process dies as it would have.
//! The kernel's own accesses (io_uring reads and writes of guest memory) never raise SIGBUS: they
//! fail with EFAULT, and the request with IOERR.
//!
//! Regions whose files are sealed against shrinking cannot be cut short and are not
//! registered, unless they are of huge pages: a huge page not backed (never touched, or punched
//! out with FALLOC_FL_PUNCH_HOLE, which F_SEAL_SHRINK allows) takes a free huge page at the first
//! access and raises SIGBUS when the host has none left, so regions of huge pages are registered
//! whatever their seals, as are all unsealed ones (`BlkBackend::guard_and_publish` asks
//! `crate::fdcheck`).
//!
//! The registry takes no lock in the handler and allocates nothing there: it is a list of chunks of
//! [`CHUNK`] slots (start, end and page size of a range, and a generation that changes whenever the
//! slot is freed, atomics), grown by the threads that register ranges (under a mutex the handler
//! never takes), each chunk published with a release store once it is initialised and never freed,
//! so the handler can read every published chunk at any time. The handler scans the slots ever used
//! (up to [`HIGH`]), a linear scan: it runs only when a frontend cut its memory short, once per
//! page it then replaces; with the unsealed regions of a few connections that is a few thousand
//! atomics (microseconds, about the cost of the mmap that follows), and it stays within tens of
//! microseconds for a full registry. A sorted or hashed registry would need a lock or a copy on
//! every change, and a change is far more frequent than a fault. The registry holds at most
//! [`MAX_SLOTS`] ranges (as many as the mappings a process may have by default,
//! `vm.max_map_count`), and one connection at most [`PER_CONNECTION`], so that one frontend cannot
//! take the room of the others. A range that cannot be registered is for the caller to refuse
//! ([`Guards::set`] says which): its table is not used.
//!
//! Any thread may register and unregister ranges; the relay thread does, running each
//! connection's request handler.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Slots per chunk of the registry.
const CHUNK: usize = 1024;
/// Chunks the registry may grow to.
const MAX_CHUNKS: usize = 64;
/// Ranges that can be registered at once, for the whole process: 65536, about the default
/// `vm.max_map_count` (65530), the most mappings a process may have, each guarded range being
/// one of them.
pub const MAX_SLOTS: usize = CHUNK * MAX_CHUNKS;
/// Ranges one connection may have registered at once: a full memory table (the memory slots
/// the daemon offers) and as many again of older tables that requests in flight still hold.
pub const PER_CONNECTION: usize = 2 * crate::handler::MAX_MEM_SLOTS;

/// One chunk of slots: per slot, the start (0: free, `usize::MAX`: being claimed), the end
/// (exclusive) and the page size of a guest-memory mapping, and the slot's generation (bumped
/// before the slot is freed, so a reader sees when the slot changed range under it, even to a
/// range with the same start).
struct Chunk {
    starts: [AtomicUsize; CHUNK],
    ends: [AtomicUsize; CHUNK],
    pages: [AtomicUsize; CHUNK],
    generations: [AtomicUsize; CHUNK],
}

/// The published chunks, in order (a chunk is published only after the one before it).
static CHUNKS: [AtomicPtr<Chunk>; MAX_CHUNKS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_CHUNKS];
/// One more than the highest slot ever claimed: the handler scans no further.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Held while a chunk is added (never by the handler).
static GROWING: Mutex<()> = Mutex::new(());
/// The page size, read once by [`install`] (sysconf is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// Pages replaced by zero pages since the daemon started.
static REPLACED: AtomicU64 = AtomicU64::new(0);

/// The published chunk `index`, if it is.
fn chunk(index: usize) -> Option<&'static Chunk> {
    let ptr = CHUNKS.get(index)?.load(Ordering::Acquire);
    // SAFETY: a non-null pointer in CHUNKS points to a chunk leaked by `grow` (never freed,
    // only read and written through atomics), fully initialised before it was published.
    unsafe { ptr.as_ref() }
}

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

/// The smallest page size of the registered ranges `addr` lies in, if it lies in one
/// (async-signal-safe: atomics only).
fn registered(addr: usize) -> Option<usize> {
    let mut smallest: Option<usize> = None;
    let high = HIGH.load(Ordering::Acquire);
    for index in 0..high.div_ceil(CHUNK) {
        let Some(chunk) = chunk(index) else {
            break;
        };
        let used = (high - index * CHUNK).min(CHUNK);
        for at in 0..used {
            let generation = chunk.generations[at].load(Ordering::Acquire);
            let start = chunk.starts[at].load(Ordering::Acquire);
            if start == 0 || addr < start || addr >= chunk.ends[at].load(Ordering::Acquire) {
                continue;
            }
            let page = chunk.pages[at].load(Ordering::Acquire);
            // The slot still holds the range its end and page size were read for: neither
            // freed (which bumps the generation first) nor claimed again since.
            if chunk.starts[at].load(Ordering::Acquire) == start
                && chunk.generations[at].load(Ordering::Acquire) == generation
            {
                smallest = Some(smallest.map_or(page, |s| s.min(page)));
            }
        }
    }
    smallest
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGBUS
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some(page_size) = registered(addr) {
        // The mapping's own page (a huge one for hugetlb memory), never less than the base
        // page.
        let base = PAGE.load(Ordering::Relaxed);
        let page_size = if page_size.is_power_of_two() {
            page_size.max(base)
        } else {
            base
        };
        let page = addr & !(page_size - 1);
        // SAFETY: replaces the page holding `addr` of a guest-memory mapping of ours
        // (registered, so mapped by this process with pages of `page_size`, which the range's
        // start is aligned to, and only ever accessed through raw copies and the kernel) with
        // private anonymous memory of the same size; mmap is async-signal-safe.
        if unsafe { replace_with_zeros(page, page_size) } {
            REPLACED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not guest memory (or it could not be replaced): the default action, on the retry.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Maps private anonymous memory (zeros) over `[start, start + len)`, in place and of the
/// same size; false if the mmap failed (errno says why). Async-signal-safe: one mmap.
///
/// # Safety
/// The range must be guest memory this process mapped, whole pages of that mapping, and only
/// ever accessed through raw copies and the kernel, so that no reference into it sees its
/// contents change.
pub unsafe fn replace_with_zeros(start: usize, len: usize) -> bool {
    // SAFETY: the caller promises the range is guest memory of ours in whole pages, which a
    // fixed anonymous private mapping of the same place and size may replace.
    let mapped = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    mapped != libc::MAP_FAILED
}

/// One registered range (a chunk and a slot in it); unregistered when dropped.
struct Slot(&'static Chunk, usize);

impl Drop for Slot {
    fn drop(&mut self) {
        let Slot(chunk, at) = *self;
        chunk.generations[at].fetch_add(1, Ordering::AcqRel);
        chunk.starts[at].store(0, Ordering::Release);
    }
}

/// Claims a free slot of `chunk`, marked as being claimed.
fn claim_in(index: usize, chunk: &'static Chunk) -> Option<(usize, &'static Chunk)> {
    let free = chunk.starts.iter().position(|start| {
        start.load(Ordering::Relaxed) == 0
            && start
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    })?;
    Some((index * CHUNK + free, chunk))
}

/// Claims a free slot, growing the registry by a chunk if every published one is full.
fn claim() -> Option<(usize, &'static Chunk)> {
    let published = |from: usize| {
        (from..MAX_CHUNKS)
            .map_while(|i| chunk(i).map(|c| (i, c)))
            .find_map(|(i, c)| claim_in(i, c))
    };
    if let Some(claimed) = published(0) {
        return Some(claimed);
    }
    let _growing = GROWING.lock().unwrap_or_else(PoisonError::into_inner);
    // Another thread may have grown the registry, or freed a slot, meanwhile.
    if let Some(claimed) = published(0) {
        return Some(claimed);
    }
    let index = (0..MAX_CHUNKS).find(|&i| chunk(i).is_none())?;
    let fresh: &'static Chunk = Box::leak(Box::new(Chunk {
        starts: [const { AtomicUsize::new(0) }; CHUNK],
        ends: [const { AtomicUsize::new(0) }; CHUNK],
        pages: [const { AtomicUsize::new(0) }; CHUNK],
        generations: [const { AtomicUsize::new(0) }; CHUNK],
    }));
    fresh.starts[0].store(usize::MAX, Ordering::Relaxed);
    CHUNKS[index].store(std::ptr::from_ref(fresh).cast_mut(), Ordering::Release);
    Some((index * CHUNK, fresh))
}

/// Registers `[start, start + len)`, mapped with pages of `page` bytes, or `None` when the
/// registry is full.
fn register(start: usize, len: usize, page: usize) -> Option<Slot> {
    let (slot, chunk) = claim()?;
    HIGH.fetch_max(slot + 1, Ordering::AcqRel);
    let at = slot % CHUNK;
    chunk.ends[at].store(start.saturating_add(len), Ordering::Release);
    chunk.pages[at].store(page, Ordering::Release);
    chunk.starts[at].store(start, Ordering::Release);
    Some(Slot(chunk, at))
}

/// A guest-memory mapping to guard: its host address, its length, and the size of the pages
/// it is mapped with (its file's, `crate::fdcheck::page_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Range {
    pub start: usize,
    pub len: usize,
    pub page: usize,
}

/// The host ranges one connection has registered, each once however many of its memory
/// tables hold it, at most [`PER_CONNECTION`]; unregistered when dropped.
#[derive(Default)]
pub struct Guards {
    held: HashMap<Range, Slot>,
}

impl Guards {
    /// Makes the registered ranges `wanted`: a range held and still wanted stays registered,
    /// the others held are unregistered, the new ones registered. Returns the new ranges
    /// that could not be (past [`PER_CONNECTION`], or the registry full); the ranges that
    /// were registered before and are still wanted are never among them.
    pub fn set(&mut self, wanted: &HashSet<Range>) -> Vec<Range> {
        self.held.retain(|range, _| wanted.contains(range));
        let mut refused = Vec::new();
        for &range in wanted {
            if range.start == 0 || range.len == 0 || self.held.contains_key(&range) {
                continue;
            }
            let slot = (self.held.len() < PER_CONNECTION)
                .then(|| register(range.start, range.len, range.page))
                .flatten();
            match slot {
                Some(slot) => {
                    self.held.insert(range, slot);
                }
                None => refused.push(range),
            }
        }
        refused
    }

    /// Ranges registered.
    pub fn count(&self) -> usize {
        self.held.len()
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

    /// `count` fake ranges of one page, `tag` apart from those of other tests (nothing is
    /// mapped there; only the registry sees them).
    fn fake_ranges(tag: usize, count: usize) -> HashSet<Range> {
        (0..count)
            .map(|i| Range {
                start: (0x7000_0000_0000 + (tag << 32)) + (i << 16),
                len: 4096,
                page: 4096,
            })
            .collect()
    }

    /// The first `len` bytes of `file` mapped shared, read and write (`MAP_FAILED` if the
    /// mmap failed: the caller checks).
    fn map_shared(file: &std::fs::File, len: usize) -> *mut libc::c_void {
        // SAFETY: a new shared mapping of a file the caller owns, at an address the kernel
        // picks: nothing of ours is replaced.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        }
    }
    #[test]
    fn a_truncated_guest_mapping_reads_as_zeros_instead_of_killing_the_process() {
        let _one = TRUNCATING.lock().unwrap_or_else(PoisonError::into_inner);
        install().unwrap();
        // More ranges than one chunk holds are registered already: the mapping's lands in a
        // chunk the registry grew.
        let mut others = [Guards::default(), Guards::default()];
        for (tag, guards) in others.iter_mut().enumerate() {
            assert!(guards.set(&fake_ranges(tag + 1, CHUNK - 100)).is_empty());
        }
        assert!(HIGH.load(Ordering::Relaxed) > CHUNK);
        // SAFETY: memfd_create with a C string literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let len = 4 * PAGE.load(Ordering::Relaxed);
        file.set_len(len as u64).unwrap();
        let ptr = map_shared(&file, len);
        assert_ne!(ptr, libc::MAP_FAILED);
        let bytes = ptr.cast::<u8>();
        // SAFETY: within the mapping, and the file covers it.
        unsafe { bytes.add(len - 1).write_volatile(7) };
        let mut guards = Guards::default();
        let range = Range {
            start: ptr as usize,
            len,
            page: crate::fdcheck::page_size(&file).unwrap(),
        };
        assert_eq!(range.page, PAGE.load(Ordering::Relaxed));
        assert!(guards.set(&HashSet::from([range])).is_empty());
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
        drop(guards);
        assert!(registered(ptr as usize).is_none());
        // SAFETY: unmaps what was mapped above.
        unsafe { libc::munmap(ptr, len) };
    }

    /// Held by the tests that truncate a mapping and count the pages replaced.
    static TRUNCATING: Mutex<()> = Mutex::new(());

    /// Guest memory on `pages` huge pages of `page` bytes, registered, then truncated to all
    /// but its last page, which is read and written: the whole last page is replaced by zeros
    /// (one page replaced), the others keep their contents. Needs `pages` huge pages of that
    /// size reserved: without them it says loudly, naming the knob, that it cannot run.
    fn truncated_huge_pages_read_as_zeros(page: usize, pages: usize) {
        let knob = format!(
            "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
            page >> 10
        );
        let reserved: usize = std::fs::read_to_string(&knob)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if reserved < pages {
            eprintln!(
                "\n!!!!!!!! NOT TESTED: the replacement of a truncated huge page of {page} \
                 bytes needs {pages} such pages reserved (as root: `echo {pages} > {knob}`); \
                 {reserved} are !!!!!!!!\n"
            );
            return;
        }
        let _one = TRUNCATING.lock().unwrap_or_else(PoisonError::into_inner);
        install().unwrap();
        let len = page * pages;
        let Some(file) = crate::fdcheck::tests::huge_memfd(page, len as u64, 0) else {
            return;
        };
        let ptr = map_shared(&file, len);
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap of {pages} huge pages of {page} bytes ({knob} is {reserved}): {}",
            io::Error::last_os_error()
        );
        let bytes = ptr.cast::<u8>();
        for p in 0..pages {
            // SAFETY: within the mapping, and the file covers it.
            unsafe { bytes.add(p * page + page - 1).write_volatile(7) };
        }
        let mut guards = Guards::default();
        let range = Range {
            start: ptr as usize,
            len,
            page: crate::fdcheck::page_size(&file).unwrap(),
        };
        assert_eq!(range.page, page);
        assert!(guards.set(&HashSet::from([range])).is_empty());
        file.set_len(((pages - 1) * page) as u64).unwrap();
        let before = replaced_pages();
        let last = (pages - 1) * page;
        // SAFETY: within the mapping; the page past the end of the file raises SIGBUS, which
        // the handler turns into a zero page of the mapping's own size.
        let read = unsafe { bytes.add(len - 1).read_volatile() };
        assert_eq!(read, 0);
        // SAFETY: as above: the writes land in the private page, its first and last bytes.
        unsafe {
            bytes.add(last).write_volatile(9);
            bytes.add(len - 2).write_volatile(9);
        }
        // SAFETY: as above.
        assert_eq!(unsafe { bytes.add(last).read_volatile() }, 9);
        assert_eq!(
            replaced_pages(),
            before + 1,
            "one page of {page} bytes replaced"
        );
        for p in 0..pages - 1 {
            // SAFETY: within the mapping, on a page the file still covers.
            let kept = unsafe { bytes.add(p * page + page - 1).read_volatile() };
            assert_eq!(kept, 7, "page {p} of {page} bytes kept its contents");
        }
        drop(guards);
        // SAFETY: unmaps what was mapped above (whole pages).
        assert_eq!(unsafe { libc::munmap(ptr, len) }, 0);
    }

    #[test]
    fn a_truncated_huge_page_reads_as_zeros() {
        truncated_huge_pages_read_as_zeros(2 << 20, 2);
    }

    /// As [`a_truncated_huge_page_reads_as_zeros`], on a gigantic page of 1 GiB: one page
    /// (a machine may have only one reserved), cut off whole.
    #[test]
    fn a_truncated_gigantic_page_reads_as_zeros() {
        truncated_huge_pages_read_as_zeros(1 << 30, 1);
    }

    #[test]
    fn overlapping_ranges_with_different_page_sizes_replace_the_smallest_page() {
        const HUGE: usize = 2 << 20;
        let start = 0x7000_0000_0000 + (20 << 32);
        let huge = Range {
            start,
            len: 4 * HUGE,
            page: HUGE,
        };
        let small = Range {
            start: start + HUGE,
            len: 4096 * 16,
            page: 4096,
        };
        // Either order of registration: the smaller page size wins where both hold the address.
        for (first, second) in [(huge, small), (small, huge)] {
            let mut older = Guards::default();
            assert!(older.set(&HashSet::from([first])).is_empty());
            let mut newer = Guards::default();
            assert!(newer.set(&HashSet::from([second])).is_empty());
            assert_eq!(registered(start + HUGE + 100), Some(4096));
            assert_eq!(registered(start + 100), Some(HUGE));
            assert_eq!(registered(start + 3 * HUGE), Some(HUGE));
            // The same start registered again with another page size, after being freed.
            drop(older);
            drop(newer);
            assert_eq!(registered(start + HUGE + 100), None);
        }
        let mut again = Guards::default();
        let small_at_start = Range {
            start,
            len: 4096,
            page: 4096,
        };
        assert!(again.set(&HashSet::from([small_at_start])).is_empty());
        assert_eq!(registered(start + 100), Some(4096));
        assert_eq!(registered(start + HUGE), None);
    }

    #[test]
    fn a_connection_registers_each_range_once_and_no_more_than_its_share() {
        let mut guards = Guards::default();
        let table = fake_ranges(10, 300);
        assert!(guards.set(&table).is_empty());
        let first = *table.iter().next().unwrap();
        assert_eq!(registered(first.start + 100), Some(4096));
        // The same ranges again (a newer table over the same mappings): nothing new.
        assert!(guards.set(&table).is_empty());
        assert_eq!(guards.count(), 300);
        // Past the connection's share, the new ranges are refused, never the held ones.
        let mut more = table.clone();
        more.extend(fake_ranges(11, PER_CONNECTION));
        let refused = guards.set(&more);
        assert_eq!(refused.len(), 300);
        assert!(refused.iter().all(|r| !table.contains(r)));
        assert!(refused.iter().all(|r| registered(r.start).is_none()));
        assert_eq!(guards.count(), PER_CONNECTION);
        assert!(table.iter().all(|r| registered(r.start).is_some()));
        // Ranges no table holds any more are unregistered.
        assert!(guards.set(&fake_ranges(11, 10)).is_empty());
        assert_eq!(guards.count(), 10);
        assert!(registered(first.start).is_none());
        drop(guards);
        assert!(registered(fake_ranges(11, 1).into_iter().next().unwrap().start).is_none());
    }
}
