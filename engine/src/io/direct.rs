//! Direct I/O (O_DIRECT): opening a second descriptor on a data file, finding the alignment
//! the kernel demands of it, choosing per operation between it and the buffered descriptor,
//! and aligned buffers.
//!
//! Called at open time (by `image.rs`, off the data path) to open descriptors, and on the
//! shard threads to choose a descriptor for each data operation ([`DataFd`]). The buffered
//! descriptor stays open next to the direct one: metadata and compressed clusters are read and
//! written through it, and so is any data operation whose file offset, length or memory does
//! not meet the alignment. Linux keeps one inode's page cache coherent with direct I/O (a
//! direct read writes dirty cached pages of its range back first, a direct write drops them),
//! so a byte written one way reads back the other way.

use libc::iovec;
use std::alloc::Layout;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::ptr::NonNull;

/// The alignment assumed when neither statx nor a probe tells: every logical block size Linux
/// supports divides it, and memory aligned to it is aligned for any DMA engine.
pub const SAFE_DIO_ALIGN: u32 = 4096;

/// What direct I/O on one file demands: file offsets and lengths (and every iovec's length)
/// multiples of `offset_bytes`, every iovec's base a multiple of `mem_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Alignment of buffer addresses in memory (a power of two).
    pub mem_bytes: u32,
    /// Alignment of file offsets and of lengths (a power of two).
    pub offset_bytes: u32,
}

/// Where a [`DioAlign`] came from, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DioAlignSource {
    /// `statx(STATX_DIOALIGN)` (Linux 6.1 and later, on file systems that report it).
    Statx,
    /// A direct read of the file's first bytes succeeded at this alignment.
    Probed,
    /// Nothing told: [`SAFE_DIO_ALIGN`].
    Assumed,
}

impl std::fmt::Display for DioAlignSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DioAlignSource::Statx => "statx",
            DioAlignSource::Probed => "probed",
            DioAlignSource::Assumed => "assumed",
        })
    }
}

impl DioAlign {
    /// Whether a transfer of `len` bytes at file offset `offset` is aligned.
    pub fn range_ok(&self, offset: u64, len: u64) -> bool {
        let m = u64::from(self.offset_bytes) - 1;
        len > 0 && offset & m == 0 && len & m == 0
    }

    /// Whether every iovec's base meets the memory alignment and its length the length
    /// alignment. Only addresses are looked at.
    pub fn iov_ok(&self, iov: &[iovec]) -> bool {
        let mm = self.mem_bytes as usize - 1;
        let lm = self.offset_bytes as usize - 1;
        iov.iter()
            .all(|v| v.iov_base as usize & mm == 0 && v.iov_len & lm == 0)
    }

    /// Whether `iov` can be transferred at `offset` with direct I/O as it is.
    pub fn allows(&self, offset: u64, iov: &[iovec]) -> bool {
        self.range_ok(offset, super::iov_total_len(iov)) && self.iov_ok(iov)
    }

    fn valid(mem: u32, offset: u32) -> Option<DioAlign> {
        (mem.is_power_of_two() && offset.is_power_of_two()).then_some(DioAlign {
            mem_bytes: mem,
            offset_bytes: offset,
        })
    }
}

/// The descriptors guest data of one file is read and written through: the buffered one, and
/// the direct one with its alignment when the export uses direct I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataFd {
    /// Opened without O_DIRECT; also used for metadata.
    pub buffered: RawFd,
    /// Opened with O_DIRECT.
    pub direct: Option<(RawFd, DioAlign)>,
}

/// How a data write is submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteVia {
    /// Through this descriptor, from the memory as it is.
    Fd(RawFd),
    /// Through the direct descriptor, after copying the memory into a buffer aligned to
    /// `mem_bytes` (the offset and length are aligned, the memory is not).
    Bounce { fd: RawFd, mem_bytes: u32 },
}

impl DataFd {
    /// A file served through its page cache only.
    pub fn buffered(fd: RawFd) -> DataFd {
        DataFd {
            buffered: fd,
            direct: None,
        }
    }

    /// The descriptor for a read of `iov` at `offset`: direct when everything is aligned,
    /// otherwise buffered (a read never dirties the page cache, so a buffered read next to
    /// direct writes is always safe).
    pub fn read_fd(&self, offset: u64, iov: &[iovec]) -> RawFd {
        match self.direct {
            Some((fd, a)) if a.allows(offset, iov) => fd,
            _ => self.buffered,
        }
    }

    /// How to submit a write of `iov` at `offset`. Aligned memory goes direct; misaligned
    /// memory at an aligned offset and length is bounced through an aligned buffer and still
    /// goes direct, so that a guest's odd iovecs never dirty the page cache under direct
    /// writes in flight; only a misaligned offset or length goes through the page cache.
    pub fn write_via(&self, offset: u64, iov: &[iovec]) -> WriteVia {
        match self.direct {
            Some((fd, a)) if a.range_ok(offset, super::iov_total_len(iov)) => {
                if a.iov_ok(iov) {
                    WriteVia::Fd(fd)
                } else {
                    WriteVia::Bounce {
                        fd,
                        mem_bytes: a.mem_bytes.max(a.offset_bytes),
                    }
                }
            }
            _ => WriteVia::Fd(self.buffered),
        }
    }
}

/// Why a direct descriptor could not be had.
#[derive(Debug)]
pub enum DirectError {
    /// The file system refuses O_DIRECT on this file (EINVAL at open, or statx says so).
    Unsupported(io::Error),
    /// Another failure of the OS.
    Os(io::Error),
    /// The path names another file than the descriptor already open.
    Replaced,
}

/// Opens `path` again with O_DIRECT (read-only unless `writable`) and finds its alignment.
/// `buffered` is the descriptor already open on it: the new one must be the same file.
pub fn open_direct(
    path: &Path,
    buffered: &File,
    writable: bool,
) -> Result<(File, DioAlign, DioAlignSource), DirectError> {
    // Without blocking: the path may have been replaced by a FIFO since `buffered` was opened.
    let file = super::open_nonblocking(path, writable, libc::O_DIRECT).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::EINVAL) => DirectError::Unsupported(e),
            _ => DirectError::Os(e),
        }
    })?;
    let (a, b) = (
        file.metadata().map_err(DirectError::Os)?,
        buffered.metadata().map_err(DirectError::Os)?,
    );
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(DirectError::Replaced);
    }
    super::clear_nonblocking(&file).map_err(DirectError::Os)?;
    let (align, source) = match statx_dio_align(&file) {
        Ok(Some(Some(align))) => (align, DioAlignSource::Statx),
        Ok(Some(None)) => {
            return Err(DirectError::Unsupported(io::Error::other(
                "statx reports no direct I/O support for this file",
            )))
        }
        // Kernel before 6.1, or a file system that does not report it.
        Ok(None) | Err(_) => probe_dio_align(&file).map_err(DirectError::Os)?,
    };
    Ok((file, align, source))
}

/// `statx(STATX_DIOALIGN)`: `None` when the kernel or file system does not report it,
/// `Some(None)` when it reports that direct I/O is not supported.
fn statx_dio_align(file: &File) -> io::Result<Option<Option<DioAlign>>> {
    // SAFETY: statx is plain data; all zeros is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty: &CStr = c"";
    // SAFETY: `empty` is a NUL-terminated string and `stx` a valid, writable statx struct that
    // outlives the call; AT_EMPTY_PATH makes the call describe `file` itself.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    if stx.stx_dio_offset_align == 0 {
        return Ok(Some(None));
    }
    Ok(Some(DioAlign::valid(
        stx.stx_dio_mem_align.max(1),
        stx.stx_dio_offset_align,
    )))
}

/// Finds the smallest of 512 and 4096 bytes at which a direct read of the file's first bytes
/// is accepted. An empty file tells nothing (reads at its end succeed whatever the alignment):
/// then, as when both are refused, [`SAFE_DIO_ALIGN`] is assumed.
fn probe_dio_align(file: &File) -> io::Result<(DioAlign, DioAlignSource)> {
    let assumed = (
        DioAlign {
            mem_bytes: SAFE_DIO_ALIGN,
            offset_bytes: SAFE_DIO_ALIGN,
        },
        DioAlignSource::Assumed,
    );
    if file.metadata()?.len() == 0 {
        return Ok(assumed);
    }
    for align in [512u32, SAFE_DIO_ALIGN] {
        let mut buf = AlignedBuf::zeroed(align as usize, align as usize);
        // SAFETY: `buf` is valid for writes of `align` bytes for the whole call.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), align as usize, 0) };
        if n >= 0 {
            return Ok((
                DioAlign {
                    mem_bytes: align,
                    offset_bytes: align,
                },
                DioAlignSource::Probed,
            ));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Ok(assumed)
}

/// Smallest cluster size at which the data clusters of a qcow2 file may be written with direct
/// I/O: the page size (or the file system's block size, if larger). Metadata is cached and
/// written through the page cache; a smaller data cluster can share a page with metadata, and
/// a direct write beside a dirty cached page of the same file leaves a stale copy of the
/// data in that page, which writeback would later put on disk.
pub fn min_direct_cluster_bytes(file: &File) -> u64 {
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).unwrap_or(u64::from(SAFE_DIO_ALIGN));
    let block = file.metadata().map_or(0, |m| m.blksize());
    page.max(block).max(u64::from(SAFE_DIO_ALIGN))
}

/// A zeroed heap buffer whose address is a multiple of a given power of two, for direct I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads, like &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes at an address that is a multiple of `align` (a power of two).
    pub fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("buffer alignment is a power of two and the size fits in isize");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len, layout }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an initialized (zeroed) allocation of at least `len` bytes
        // owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> iovec {
        iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    const A512: DioAlign = DioAlign {
        mem_bytes: 512,
        offset_bytes: 512,
    };
    /// What ext4 on NVMe reports on recent kernels: 4-byte DMA alignment, 512-byte blocks.
    const A4_512: DioAlign = DioAlign {
        mem_bytes: 4,
        offset_bytes: 512,
    };

    #[test]
    fn alignment_decision() {
        // Everything aligned.
        assert!(A512.allows(0, &[iov(0x10000, 4096)]));
        assert!(A512.allows(512, &[iov(0x10000, 512), iov(0x20200, 3584)]));
        // File offset, total length, an iovec base, an iovec length misaligned.
        assert!(!A512.allows(256, &[iov(0x10000, 4096)]));
        assert!(!A512.allows(0, &[iov(0x10000, 4000)]));
        assert!(!A512.allows(0, &[iov(0x10008, 4096)]));
        assert!(!A512.allows(0, &[iov(0x10000, 1000), iov(0x20000, 3096)]));
        // Nothing to transfer is never direct.
        assert!(!A512.allows(0, &[]));
        // Small DMA alignment: odd bases are fine, odd segment lengths are not.
        assert!(A4_512.allows(0, &[iov(0x10004, 4096)]));
        assert!(!A4_512.allows(0, &[iov(0x10002, 4096)]));
        assert!(!A4_512.allows(0, &[iov(0x10004, 1000), iov(0x20000, 3096)]));
    }

    #[test]
    fn descriptor_choice() {
        let buffered = DataFd::buffered(3);
        assert_eq!(buffered.read_fd(0, &[iov(0x10000, 4096)]), 3);
        assert_eq!(
            buffered.write_via(0, &[iov(0x10000, 4096)]),
            WriteVia::Fd(3)
        );
        let d = DataFd {
            buffered: 3,
            direct: Some((4, A512)),
        };
        assert_eq!(d.read_fd(4096, &[iov(0x10000, 4096)]), 4);
        assert_eq!(d.read_fd(4096, &[iov(0x10001, 4096)]), 3);
        assert_eq!(d.read_fd(4097, &[iov(0x10000, 4096)]), 3);
        assert_eq!(d.write_via(4096, &[iov(0x10000, 4096)]), WriteVia::Fd(4));
        // Misaligned memory at an aligned offset and length: bounced, still direct.
        assert_eq!(
            d.write_via(4096, &[iov(0x10001, 4095), iov(0x20000, 1)]),
            WriteVia::Bounce {
                fd: 4,
                mem_bytes: 512
            }
        );
        // Misaligned offset or length: the page cache.
        assert_eq!(d.write_via(100, &[iov(0x10000, 4096)]), WriteVia::Fd(3));
        assert_eq!(d.write_via(0, &[iov(0x10000, 100)]), WriteVia::Fd(3));
    }

    #[test]
    fn aligned_buffers() {
        for align in [512usize, 4096, 65536] {
            let b = AlignedBuf::zeroed(3 * align + 7, align);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert_eq!(b.len(), 3 * align + 7);
            assert!(b.iter().all(|&x| x == 0));
        }
        assert!(AlignedBuf::zeroed(0, 4096).is_empty());
    }

    #[test]
    fn statx_or_probe_on_the_temp_dir() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("qcow2d-dio-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let buffered = File::open(&path).unwrap();
        let result = open_direct(&path, &buffered, false);
        let _ = std::fs::remove_file(&path);
        match result {
            Ok((_, a, source)) => {
                assert!(a.mem_bytes.is_power_of_two() && a.offset_bytes.is_power_of_two());
                assert!(a.offset_bytes <= SAFE_DIO_ALIGN, "{a:?} from {source}");
            }
            // A temp dir on a file system without O_DIRECT.
            Err(DirectError::Unsupported(_)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
}
