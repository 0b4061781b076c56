//! In-flight request tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the shared memory area in
//! which the worker records, for each queue, which descriptor chains it has taken from the
//! available ring and not yet returned, so that a daemon started after this one was killed
//! resubmits them.
//!
//! The area is a file (a sealed memfd) that the frontend asks for once (GET_INFLIGHT_FD, answered
//! by [`create_area`]), keeps, and hands to every backend it connects to (SET_INFLIGHT_FD, mapped
//! by [`InflightArea::map`]); so it outlives the daemon. The relay thread ([`crate::relay`], one
//! for every connection) creates and maps it and publishes it in the connection's
//! [`InflightShared`]; the worker threads pick it up the next time they process a queue and
//! touch only their own queues' parts of it, through [`QueueTracker`].
//!
//! Layout (vhost-user spec, "Inflight I/O tracking", split virtqueues), one part per queue, each
//! `header + 16 bytes × queue size` rounded up to 64 bytes:
//! ```text
//! header:  u64 features (0) | u16 version (1) | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc[i]: u8 inflight | 5 bytes padding | u16 next | u64 counter
//! ```
//! Every field is read and written through atomics: the area is shared with the frontend, and
//! a SIGKILL may stop this process between any two stores, so their order in the program is
//! the order in which the next daemon finds them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{compiler_fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion};

/// The layout version this module reads and writes.
pub const VERSION: u16 = 1;
/// Largest split virtqueue (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues an area may describe (vhost-user allows up to 0x8000 vrings; no device needs
/// more than this).
pub const MAX_QUEUES: u16 = 1024;
/// Largest area accepted from a frontend.
pub const MAX_AREA_BYTES: u64 = 256 << 20;

const HEADER_BYTES: u64 = 16;
const DESC_BYTES: u64 = 16;
/// Each queue's part starts on a 64-byte boundary (as libvhost-user lays it out, so that an area
/// made by one backend can be handed to another).
const QUEUE_ALIGN: u64 = 64;

// Header field offsets.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
// Descriptor-state field offsets.
const INFLIGHT_AT: usize = 0;
const COUNTER_AT: usize = 8;

/// Failures to create or map an in-flight area.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for an area no virtqueue can have.
    #[error("Invalid in-flight area geometry: {num_queues} queues of {queue_size} descriptors")]
    Geometry {
        /// Number of queues asked for.
        num_queues: u16,
        /// Queue size asked for.
        queue_size: u16,
    },
    /// The area handed over is too small for its queues, or too large to be believable.
    #[error(
        "In-flight area of {size} bytes does not fit {num_queues} queues of {queue_size} \
         descriptors (needs {needed} bytes, at most {MAX_AREA_BYTES})"
    )]
    Size {
        /// Size given by the frontend.
        size: u64,
        /// Bytes the queues need.
        needed: u64,
        /// Number of queues.
        num_queues: u16,
        /// Queue size.
        queue_size: u16,
    },
    /// The area reaches past the end of its file (touching it would raise SIGBUS).
    #[error("In-flight area of {size} bytes at offset {offset} reaches past the end of its file ({file_len} bytes)")]
    BeyondFile {
        /// Offset in the file.
        offset: u64,
        /// Size of the area.
        size: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The file may still shrink under the mapping (no F_SEAL_SHRINK): touching the area
    /// after the frontend shrank it would raise SIGBUS.
    #[error("The in-flight area's file is not sealed against shrinking")]
    NotSealed,
    /// The file is of huge pages: a huge page not backed (punched out, which seals allow)
    /// raises SIGBUS when the host has none free, and a mapping of part of one could not be
    /// unmapped again. This daemon, QEMU and libvhost-user make areas of base pages.
    #[error("The in-flight area's file is of huge pages ({page_bytes} bytes)")]
    HugePages {
        /// The file's page size.
        page_bytes: usize,
    },
    /// The file could not be created, sized, sealed or examined.
    #[error("Cannot create or examine the in-flight area file")]
    File(#[source] io::Error),
    /// mmap failed.
    #[error("Cannot map the in-flight area")]
    Map(#[source] MmapRegionError),
}

/// Bytes of one queue's part of the area.
pub fn queue_bytes(queue_size: u16) -> u64 {
    let raw = HEADER_BYTES + DESC_BYTES * u64::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues > MAX_QUEUES || queue_size == 0 || queue_size > MAX_QUEUE_SIZE
    {
        return Err(InflightError::Geometry {
            num_queues,
            queue_size,
        });
    }
    // At most 1024 × (16 + 16 × 32768 + 63): no overflow.
    let needed = queue_bytes(queue_size) * u64::from(num_queues);
    if needed > MAX_AREA_BYTES {
        // An area this daemon would not map: neither hand one out nor take one.
        return Err(InflightError::Size {
            size: needed,
            needed,
            num_queues,
            queue_size,
        });
    }
    Ok(needed)
}

/// GET_INFLIGHT_FD: a new, zeroed area for `num_queues` queues of `queue_size` descriptors, as a
/// memfd sealed against resizing (so that nobody can make a mapping of it raise SIGBUS). Returns
/// the file and its size.
pub fn create_area(num_queues: u16, queue_size: u16) -> Result<(File, u64), InflightError> {
    let size = check_geometry(num_queues, queue_size)?;
    // SAFETY: memfd_create takes a NUL-terminated name (a C string literal) and flags; it
    // returns a new file descriptor or -1, and touches no memory of ours.
    let fd = unsafe {
        libc::memfd_create(
            c"qcow2d-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::File(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // A new memfd reads as zeros: the area is initialised (version 0) by construction.
    file.set_len(size).map_err(InflightError::File)?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a file descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(InflightError::File(io::Error::last_os_error()));
    }
    Ok((file, size))
}

/// Atomic integer types that may be laid over bytes of the area.
///
/// # Safety
///
/// Implementors must be atomic integers: valid for any bit pattern, no drop glue, and sound to
/// access concurrently from several threads and processes.
unsafe trait AreaAtomic {}
// SAFETY: an atomic integer (see the trait).
unsafe impl AreaAtomic for AtomicU8 {}
// SAFETY: an atomic integer (see the trait).
unsafe impl AreaAtomic for AtomicU16 {}
// SAFETY: an atomic integer (see the trait).
unsafe impl AreaAtomic for AtomicU64 {}

/// A mapped in-flight area (SET_INFLIGHT_FD).
pub struct InflightArea {
    /// The mapping; unmapped (and its file closed) on drop.
    map: MmapRegion<()>,
    /// Where the area starts inside the mapping (its offset was rounded down to a page).
    start: usize,
    /// Bytes of the area the queues use (`num_queues` × [`queue_bytes`]).
    len: usize,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

// SAFETY: the raw mapping is only ever accessed through atomics (`atomic`), which any thread
// may use concurrently, and it stays mapped until the area is dropped.
unsafe impl Send for InflightArea {}
// SAFETY: as for Send: shared access is through atomics only.
unsafe impl Sync for InflightArea {}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightArea {
    /// Maps `size` bytes of `file` at `offset`, holding `num_queues` queues of `queue_size`
    /// descriptors, after checking that the area covers its queues and lies inside the file.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let needed = check_geometry(num_queues, queue_size)?;
        if size < needed || size > MAX_AREA_BYTES {
            return Err(InflightError::Size {
                size,
                needed,
                num_queues,
                queue_size,
            });
        }
        if !crate::fdcheck::is_shrink_sealed(&file) {
            // Areas from this daemon, QEMU and libvhost-user are sealed memfds.
            return Err(InflightError::NotSealed);
        }
        let page_bytes = crate::fdcheck::page_size(&file).map_err(InflightError::File)?;
        if page_bytes > crate::fdcheck::base_page_size().map_err(InflightError::File)? {
            return Err(InflightError::HugePages { page_bytes });
        }
        let file_len = file.metadata().map_err(InflightError::File)?.len();
        let beyond = InflightError::BeyondFile {
            offset,
            size,
            file_len,
        };
        match offset.checked_add(size) {
            Some(end) if end <= file_len => {}
            _ => return Err(beyond),
        }
        // mmap wants a page-aligned offset: map from the page that holds the area's start.
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let start = offset % page;
        // Both fit usize: `size` is at most MAX_AREA_BYTES and `start` below a page.
        let map_len = (size + start) as usize;
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, offset - start), map_len)
            .map_err(InflightError::Map)?;
        let area = InflightArea {
            map,
            start: start as usize,
            len: needed as usize,
            num_queues,
            queue_size,
            stride: queue_bytes(queue_size) as usize,
        };
        for q in 0..usize::from(num_queues) {
            if let Some(queue) = area.queue(q) {
                queue.set_desc_num(queue_size);
            }
        }
        Ok(area)
    }

    /// Descriptors per queue.
    #[cfg(test)]
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The atomic of type `T` at byte `offset` of the area; `None` if it would not lie inside
    /// the area or would be misaligned.
    fn atomic<T: AreaAtomic>(&self, offset: usize) -> Option<&T> {
        let end = offset.checked_add(std::mem::size_of::<T>())?;
        if end > self.len {
            return None;
        }
        // In bounds of the mapping: start + len <= map.size().
        let ptr = self.map.as_ptr().wrapping_add(self.start + offset);
        if ptr.align_offset(std::mem::align_of::<T>()) != 0 {
            return None;
        }
        // SAFETY: `ptr .. ptr + size_of::<T>()` lies inside the mapping (checked above against
        // `len`, and `map` covers `start + len` bytes), which stays mapped as long as `self`
        // lives (the returned borrow cannot outlive it); it is aligned for `T` (checked); `T`
        // is an atomic integer (AreaAtomic), valid for any bytes and meant for shared mutation,
        // which is how the frontend and this process use the mapping.
        Some(unsafe { &*ptr.cast::<T>() })
    }

    /// Queue `queue`'s part of the area, if the area has it.
    pub fn queue(&self, queue: usize) -> Option<QueueArea<'_>> {
        (queue < usize::from(self.num_queues)).then(|| QueueArea {
            area: self,
            base: queue * self.stride,
            size: self.queue_size,
        })
    }
}

/// One queue's part of an [`InflightArea`]. Out-of-range descriptor indexes read as "not in
/// flight" and are not written.
#[derive(Clone, Copy)]
pub struct QueueArea<'a> {
    area: &'a InflightArea,
    base: usize,
    size: u16,
}

impl QueueArea<'_> {
    fn header(&self, at: usize) -> Option<&AtomicU16> {
        self.area.atomic(self.base + at)
    }

    fn desc<T: AreaAtomic>(&self, index: u16, at: usize) -> Option<&T> {
        if index >= self.size {
            return None;
        }
        let offset = self.base + (HEADER_BYTES + DESC_BYTES * u64::from(index)) as usize + at;
        self.area.atomic(offset)
    }

    fn load16(&self, at: usize) -> u16 {
        self.header(at).map_or(0, |a| a.load(Ordering::Acquire))
    }

    fn store16(&self, at: usize, value: u16) {
        if let Some(a) = self.header(at) {
            a.store(value, Ordering::Release);
        }
    }

    /// Layout version; 0 for an area no backend has used yet.
    pub fn version(&self) -> u16 {
        self.load16(VERSION_AT)
    }

    fn set_version(&self, version: u16) {
        self.store16(VERSION_AT, version);
    }

    fn set_desc_num(&self, num: u16) {
        self.store16(DESC_NUM_AT, num);
    }

    /// The head last returned to the used ring.
    pub fn last_batch_head(&self) -> u16 {
        self.load16(LAST_BATCH_HEAD_AT)
    }

    /// The used index as of the last completed return.
    pub fn used_idx(&self) -> u16 {
        self.load16(USED_IDX_AT)
    }

    /// Whether chain `head` is in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc::<AtomicU8>(head, INFLIGHT_AT)
            .is_some_and(|a| a.load(Ordering::Acquire) != 0)
    }

    /// When chain `head` was taken (order of the counter).
    pub fn counter(&self, head: u16) -> u64 {
        self.desc::<AtomicU64>(head, COUNTER_AT)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    fn set_inflight(&self, head: u16, on: bool) {
        if let Some(a) = self.desc::<AtomicU8>(head, INFLIGHT_AT) {
            a.store(u8::from(on), Ordering::Release);
        }
    }

    fn set_counter(&self, head: u16, counter: u64) {
        if let Some(a) = self.desc::<AtomicU64>(head, COUNTER_AT) {
            a.store(counter, Ordering::Release);
        }
    }
}

/// A connection's in-flight area, once the frontend has shared one: set by the relay thread,
/// read by the workers. The generation changes each time a new area is set, so that a worker
/// notices with one atomic load.
#[derive(Default)]
pub struct InflightShared {
    generation: AtomicU64,
    area: Mutex<Option<Arc<InflightArea>>>,
}

impl InflightShared {
    /// Publishes `area` for the workers.
    pub fn set(&self, area: InflightArea) {
        let mut current = self.area.lock().unwrap_or_else(PoisonError::into_inner);
        *current = Some(Arc::new(area));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes each time an area is set; 0 before the first.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current area and its generation.
    pub fn current(&self) -> (u64, Option<Arc<InflightArea>>) {
        let current = self.area.lock().unwrap_or_else(PoisonError::into_inner);
        (self.generation(), current.clone())
    }
}

/// What [`QueueTracker::recover`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// A new area (version 0), now initialised: nothing to resume.
    Fresh,
    /// An area a previous backend used: start taking chains at `next_avail`, after resubmitting
    /// `resubmit` (heads, oldest first).
    Resume {
        /// The available-ring index of the first chain not taken yet.
        next_avail: u16,
        /// Chains taken and not returned, in the order they were taken.
        resubmit: Vec<u16>,
        /// Whether the previous backend died between returning a chain and recording that.
        fixed_last_batch: bool,
    },
}

/// One queue's in-flight bookkeeping, owned by the worker thread that serves the queue.
pub struct QueueTracker {
    area: Arc<InflightArea>,
    queue: usize,
    counter: u64,
}

impl QueueTracker {
    /// Tracks queue `queue` (global index) in `area`; `None` if the area has no part for it.
    pub fn new(area: Arc<InflightArea>, queue: usize) -> Option<Self> {
        area.queue(queue)?;
        Some(QueueTracker {
            area,
            queue,
            counter: 0,
        })
    }

    fn part(&self) -> Option<QueueArea<'_>> {
        self.area.queue(self.queue)
    }

    /// Before a connection's first use of the queue: initialises a new area, or works out what
    /// a previous backend left in flight (libvhost-user's `vu_check_queue_inflights`).
    /// `used_idx` is the used ring's index as the driver sees it; `queue_size` the ring's size
    /// (heads at or above it cannot be chains and are ignored).
    pub fn recover(&mut self, used_idx: u16, queue_size: u16) -> Recovery {
        let Some(part) = self.area.queue(self.queue) else {
            return Recovery::Fresh;
        };
        if part.version() != VERSION {
            // Version 0: unused. Another version: a layout this daemon cannot read, so start
            // over.
            self.reset(used_idx);
            return Recovery::Fresh;
        }
        self.counter = 0;
        // The previous backend wrote the used index but died before clearing the returned
        // chain's flag (or recording the new index): that chain is done.
        let fixed_last_batch = part.used_idx() != used_idx;
        if fixed_last_batch {
            part.set_inflight(part.last_batch_head(), false);
            part.store16(USED_IDX_AT, used_idx);
        }
        let mut taken: Vec<(u64, u16)> = (0..part.size.min(queue_size))
            .filter(|&head| part.is_inflight(head))
            .map(|head| (part.counter(head), head))
            .collect();
        taken.sort_unstable();
        self.counter = taken.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        // At most queue_size (<= 32768) entries.
        let in_use = taken.len() as u16;
        Recovery::Resume {
            next_avail: used_idx.wrapping_add(in_use),
            resubmit: taken.into_iter().map(|(_, head)| head).collect(),
            fixed_last_batch,
        }
    }

    /// Starts the queue's part over: nothing in flight, the used ring at `used_idx`.
    pub fn reset(&mut self, used_idx: u16) {
        self.counter = 0;
        let Some(part) = self.area.queue(self.queue) else {
            return;
        };
        part.store16(LAST_BATCH_HEAD_AT, 0);
        part.store16(USED_IDX_AT, used_idx);
        for head in 0..part.size {
            part.set_inflight(head, false);
        }
        part.set_version(VERSION);
    }

    /// Records chain `head` as taken, before anything is done for it. Only a later daemon
    /// reads the record, after this process is gone, and a dead process's stores are never
    /// lost (its store buffer still drains), so program order is all that matters: a compiler
    /// fence keeps the record before the request's submission, without a CPU fence per
    /// request.
    pub fn taken(&mut self, head: u16) {
        let Some(part) = self.area.queue(self.queue) else {
            return;
        };
        part.set_counter(head, self.counter);
        self.counter = self.counter.wrapping_add(1);
        part.set_inflight(head, true);
        compiler_fence(Ordering::SeqCst);
    }

    /// Just before chain `head` is written to the used ring.
    pub fn returning(&self, head: u16) {
        if let Some(part) = self.part() {
            part.store16(LAST_BATCH_HEAD_AT, head);
        }
    }

    /// Just after chain `head` was written to the used ring, whose index is now `used_idx`.
    /// Release stores keep the order: the used index first, then the flag, then the copy of
    /// the index.
    pub fn returned(&self, head: u16, used_idx: u16) {
        if let Some(part) = self.part() {
            part.set_inflight(head, false);
            part.store16(USED_IDX_AT, used_idx);
        }
    }

    /// Whether chain `head` is recorded as in flight.
    #[cfg(test)]
    pub fn is_inflight(&self, head: u16) -> bool {
        self.part().is_some_and(|p| p.is_inflight(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(num_queues: u16, queue_size: u16) -> (File, InflightArea) {
        let (file, size) = create_area(num_queues, queue_size).unwrap();
        let area =
            InflightArea::map(file.try_clone().unwrap(), 0, size, num_queues, queue_size).unwrap();
        (file, area)
    }

    #[test]
    fn sizes_match_libvhost_user() {
        // ALIGN_UP(16 × n + 2, 64) in libvhost-user: the same numbers.
        for n in [1u16, 2, 3, 4, 5, 127, 128, 256, 1024, 32768] {
            let libvhost = (16 * u64::from(n) + 2).div_ceil(64) * 64;
            assert_eq!(queue_bytes(n), libvhost, "queue size {n}");
        }
        assert_eq!(queue_bytes(128), 2112);
        let (file, size) = create_area(2, 128).unwrap();
        assert_eq!(size, 2 * 2112);
        assert_eq!(file.metadata().unwrap().len(), size);
        // Sealed: nobody can shrink it under a mapping.
        assert!(file.set_len(16).is_err());
    }

    #[test]
    fn bad_geometry_and_short_or_foreign_areas_are_refused() {
        assert!(matches!(
            create_area(0, 128),
            Err(InflightError::Geometry { .. })
        ));
        assert!(matches!(
            create_area(1, 0),
            Err(InflightError::Geometry { .. })
        ));
        assert!(matches!(
            create_area(1, MAX_QUEUE_SIZE + 1),
            Err(InflightError::Geometry { .. })
        ));
        let (file, size) = create_area(2, 128).unwrap();
        // Too small for its queues.
        assert!(matches!(
            InflightArea::map(file.try_clone().unwrap(), 0, size - 1, 2, 128),
            Err(InflightError::Size { .. })
        ));
        // Past the end of the file.
        assert!(matches!(
            InflightArea::map(file.try_clone().unwrap(), 4096, size, 2, 128),
            Err(InflightError::BeyondFile { .. })
        ));
        assert!(matches!(
            InflightArea::map(file.try_clone().unwrap(), u64::MAX, size, 2, 128),
            Err(InflightError::BeyondFile { .. })
        ));
        // More than the frontend said it has: refused rather than trusted.
        assert!(matches!(
            InflightArea::map(file, 0, MAX_AREA_BYTES + 1, 2, 128),
            Err(InflightError::Size { .. })
        ));
        // Queues that would need more than the daemon maps: not handed out either.
        assert!(matches!(
            create_area(MAX_QUEUES, MAX_QUEUE_SIZE),
            Err(InflightError::Size { .. })
        ));
        // A file the frontend could shrink under the mapping.
        // SAFETY: memfd_create takes a C string and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let unsealed = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        unsealed.set_len(size).unwrap();
        assert!(matches!(
            InflightArea::map(unsealed, 0, size, 2, 128),
            Err(InflightError::NotSealed)
        ));
        // Sealed files of huge pages (2 MiB, 1 GiB): refused before anything maps them.
        for page in [2usize << 20, 1 << 30] {
            let Some(huge) =
                crate::fdcheck::tests::huge_memfd(page, page as u64, libc::MFD_ALLOW_SEALING)
            else {
                continue;
            };
            crate::fdcheck::seal_against_shrinking(&huge);
            assert!(crate::fdcheck::is_shrink_sealed(&huge));
            assert!(matches!(
                InflightArea::map(huge, 0, size, 2, 128),
                Err(InflightError::HugePages { page_bytes }) if page_bytes == page
            ));
        }
    }

    #[test]
    fn a_new_area_starts_fresh_and_records_in_libvhost_user_order() {
        let (file, area) = area(2, 8);
        let area = Arc::new(area);
        assert!(QueueTracker::new(area.clone(), 2).is_none());
        let mut t = QueueTracker::new(area.clone(), 1).unwrap();
        assert_eq!(t.recover(100, 8), Recovery::Fresh);
        let part = area.queue(1).unwrap();
        assert_eq!(part.version(), VERSION);
        assert_eq!(part.used_idx(), 100);
        // Queue 0 is untouched.
        assert_eq!(area.queue(0).unwrap().version(), 0);

        t.taken(3);
        t.taken(5);
        assert!(t.is_inflight(3) && t.is_inflight(5));
        assert_eq!((part.counter(3), part.counter(5)), (0, 1));
        t.returning(5);
        assert_eq!(part.last_batch_head(), 5);
        t.returned(5, 101);
        assert!(!t.is_inflight(5));
        assert_eq!(part.used_idx(), 101);
        // Out-of-range heads are ignored, never written.
        t.taken(8);
        t.taken(u16::MAX);
        assert!(!t.is_inflight(8));

        // The bytes are where the spec puts them, in the file itself.
        drop(t);
        drop(area);
        let mut raw = vec![0u8; 2 * queue_bytes(8) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).unwrap();
        let q1 = &raw[queue_bytes(8) as usize..];
        assert_eq!(u16::from_ne_bytes([q1[8], q1[9]]), 1, "version");
        assert_eq!(u16::from_ne_bytes([q1[10], q1[11]]), 8, "desc_num");
        assert_eq!(u16::from_ne_bytes([q1[12], q1[13]]), 5, "last_batch_head");
        assert_eq!(u16::from_ne_bytes([q1[14], q1[15]]), 101, "used_idx");
        let d3 = &q1[16 + 3 * 16..16 + 4 * 16];
        assert_eq!(d3[0], 1, "desc[3].inflight");
        assert_eq!(u64::from_ne_bytes(d3[8..16].try_into().unwrap()), 0);
        let d5 = &q1[16 + 5 * 16..16 + 6 * 16];
        assert_eq!(d5[0], 0, "desc[5].inflight");
        assert_eq!(u64::from_ne_bytes(d5[8..16].try_into().unwrap()), 1);
    }

    #[test]
    fn a_used_area_resumes_in_counter_order() {
        let (file, size) = create_area(1, 16).unwrap();
        // First daemon: takes 7, 2, 9, 4 (in that order), returns 2.
        {
            let area =
                Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, 16).unwrap());
            let mut t = QueueTracker::new(area, 0).unwrap();
            assert_eq!(t.recover(40, 16), Recovery::Fresh);
            for head in [7, 2, 9, 4] {
                t.taken(head);
            }
            t.returning(2);
            t.returned(2, 41);
        }
        // Second daemon, same file: used index 41 as recorded.
        let area = Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, 16).unwrap());
        let mut t = QueueTracker::new(area.clone(), 0).unwrap();
        assert_eq!(
            t.recover(41, 16),
            Recovery::Resume {
                next_avail: 44,
                resubmit: vec![7, 9, 4],
                fixed_last_batch: false,
            }
        );
        // New chains are counted after the old ones.
        t.taken(11);
        assert_eq!(area.queue(0).unwrap().counter(11), 4);

        // Heads beyond the ring's actual size are not chains.
        let mut t = QueueTracker::new(area, 0).unwrap();
        match t.recover(41, 8) {
            Recovery::Resume { resubmit, .. } => assert_eq!(resubmit, vec![7, 4]),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_death_between_used_index_and_flag_completes_the_last_chain() {
        let (file, size) = create_area(1, 8).unwrap();
        {
            let area =
                Arc::new(InflightArea::map(file.try_clone().unwrap(), 0, size, 1, 8).unwrap());
            let mut t = QueueTracker::new(area, 0).unwrap();
            t.recover(0, 8);
            t.taken(1);
            t.taken(6);
            // Killed after the used ring got head 6 (index 1) but before `returned`.
            t.returning(6);
        }
        let area = Arc::new(InflightArea::map(file, 0, size, 1, 8).unwrap());
        let mut t = QueueTracker::new(area.clone(), 0).unwrap();
        assert_eq!(
            t.recover(1, 8),
            Recovery::Resume {
                next_avail: 2,
                resubmit: vec![1],
                fixed_last_batch: true,
            }
        );
        assert_eq!(area.queue(0).unwrap().used_idx(), 1);
        assert!(!t.is_inflight(6));
        // Killed before the used index was written: the chain is resubmitted.
        t.returning(1);
        let mut t = QueueTracker::new(area, 0).unwrap();
        assert_eq!(
            t.recover(1, 8),
            Recovery::Resume {
                next_avail: 2,
                resubmit: vec![1],
                fixed_last_batch: false,
            }
        );
    }

    #[test]
    fn an_unknown_version_starts_over() {
        let (_file, area) = area(1, 4);
        let area = Arc::new(area);
        let part = area.queue(0).unwrap();
        part.set_version(7);
        part.set_inflight(2, true);
        let mut t = QueueTracker::new(area.clone(), 0).unwrap();
        assert_eq!(t.recover(9, 4), Recovery::Fresh);
        assert!(!t.is_inflight(2));
        assert_eq!(part.version(), VERSION);
    }

    #[test]
    fn the_shared_slot_counts_generations() {
        let shared = InflightShared::default();
        assert_eq!(shared.generation(), 0);
        assert!(shared.current().1.is_none());
        let (_file, a) = area(1, 4);
        shared.set(a);
        let (generation, current) = shared.current();
        assert_eq!(generation, 1);
        assert_eq!(current.unwrap().queue_size(), 4);
    }
}
