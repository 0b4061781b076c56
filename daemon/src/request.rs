//! Turns one virtio-blk descriptor chain into a request the worker can act on.
//!
//! Runs on the worker thread that owns the chain's queue. It reads the chain's descriptors,
//! finds the header and the status byte, checks the request against the disk, and translates
//! the data buffers from guest-physical addresses into host `iovec`s through the guest memory
//! map; the segments of a discard or write-zeroes request are read (through the bounds-checked
//! `Bytes` API) and checked into byte ranges. Everything it checks is checked before any byte of
//! guest memory is written; an address outside the guest's regions is never dereferenced. The
//! only writes it does itself are the GET_ID answer (through the `Bytes` API). Buffers are
//! per-thread scratch vectors ([`Scratch`]) reused from request to request, so the steady state
//! does not allocate.

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::virtio_blk::{
    DwzSegment, RequestHeader, RequestType, DWZ_SEGMENT_SIZE, ID_BYTES, MAX_DWZ_SECTORS,
    MAX_DWZ_SEGMENTS, MAX_REQUEST_BYTES, OUTHDR_SIZE, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
    STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};

/// Most iovecs one request may have (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;
/// Most descriptors one chain may have before it is treated as malformed.
const MAX_DESCRIPTORS: usize = 4096;

/// What the device knows about itself when it answers a request.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Disk size in bytes.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// GET_ID answer: the serial, zero-padded.
    pub serial: [u8; ID_BYTES],
}

/// A guest-physical buffer: one descriptor (or part of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// One range of a discard or write-zeroes request, checked against the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteRange {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes (a whole number of sectors, possibly zero).
    pub len: u64,
    /// Write zeroes only: the range may be deallocated.
    pub unmap: bool,
}

/// Per-thread buffers reused for every request.
#[derive(Default)]
pub struct Scratch {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// Host buffers of the last prepared read or write.
    pub iov: Vec<libc::iovec>,
    /// Ranges of the last prepared discard or write zeroes (at most [`MAX_DWZ_SEGMENTS`]).
    pub ranges: Vec<ByteRange>,
    /// Type of the last prepared chain, `None` when its header could not be read.
    pub request_type: Option<RequestType>,
}

// SAFETY: `iov` holds raw pointers into guest memory, which make the type !Send by default.
// Scratch never dereferences them itself: they are written by `prepare` and read only by
// whoever holds the Scratch (the worker, behind its mutex) while it submits the request, all
// within one call. Moving the vector to another thread carries no access with it, and the
// memory they point into is shared (mmap'ed) memory that any thread may access.
unsafe impl Send for Scratch {}

impl Scratch {
    /// Scratch buffers sized for typical requests.
    pub fn new() -> Self {
        Scratch {
            readable: Vec::with_capacity(8),
            writable: Vec::with_capacity(130),
            iov: Vec::with_capacity(130),
            ranges: Vec::with_capacity(MAX_DWZ_SEGMENTS),
            request_type: None,
        }
    }
}

/// The outcome of looking at a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Answer now: write `status` (when the chain has a usable status byte) and return the chain
    /// with `used_len` bytes written.
    Done {
        /// The status byte and where it goes; `None` when the chain has nowhere to put it.
        status: Option<(GuestAddress, u8)>,
        /// Bytes written to the chain's device-writable buffers.
        used_len: u32,
    },
    /// Read `len` bytes at disk `offset` into `Scratch::iov`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Total length of the data buffers.
        len: u32,
        /// Guest address of the status byte.
        status: GuestAddress,
    },
    /// Write `len` bytes from `Scratch::iov` at disk `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Total length of the data buffers.
        len: u32,
        /// Guest address of the status byte.
        status: GuestAddress,
    },
    /// Flush the disk's write cache.
    Flush {
        /// Guest address of the status byte.
        status: GuestAddress,
    },
    /// Discard every range of `Scratch::ranges`.
    Discard {
        /// Guest address of the status byte.
        status: GuestAddress,
    },
    /// Write zeros over every range of `Scratch::ranges`.
    WriteZeroes {
        /// Guest address of the status byte.
        status: GuestAddress,
    },
}

/// Why a chain was refused (for the debug log; the guest only sees a status code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A device-readable descriptor follows a device-writable one.
    Misordered,
    /// Fewer than 16 device-readable bytes for the header.
    ShortHeader,
    /// The header lies outside guest memory.
    HeaderOutsideMemory,
    /// A data buffer has the wrong direction for the request type.
    WrongDirection,
    /// A data buffer lies (partly) outside guest memory.
    OutsideMemory,
    /// Data length not a multiple of 512, or larger than the most one request may carry
    /// ([`MAX_REQUEST_BYTES`]).
    BadLength,
    /// A data segment larger than the SIZE_MAX the device advertises.
    SegmentTooLarge,
    /// The request reaches past the end of the disk.
    OutOfRange,
    /// More data segments than the SEG_MAX the device advertises, too many descriptors or
    /// buffers, or more discard/write-zeroes segments than offered.
    TooManySegments,
    /// Reserved flag bits in a discard/write-zeroes segment, or unmap on a discard (answered
    /// with VIRTIO_BLK_S_UNSUPP).
    UnsupportedFlags,
    /// The descriptor chain itself is malformed (a loop, an index out of range, a bad
    /// indirect table: see [`crate::chain::ChainError`]).
    Chain,
}

impl Prepared {
    fn status(status: GuestAddress, code: u8) -> Self {
        Prepared::Done {
            status: Some((status, code)),
            used_len: 1,
        }
    }

    /// The same request failed at once with VIRTIO_BLK_S_IOERR, for a chain found malformed
    /// after `prepare` looked at the part of it that could be read: nothing is submitted.
    pub fn into_ioerr(self) -> Self {
        match self {
            Prepared::Done {
                status: Some((status, _)),
                ..
            }
            | Prepared::Read { status, .. }
            | Prepared::Write { status, .. }
            | Prepared::Flush { status }
            | Prepared::Discard { status }
            | Prepared::WriteZeroes { status } => Prepared::status(status, STATUS_IOERR),
            Prepared::Done { status: None, .. } => Prepared::Done {
                status: None,
                used_len: 0,
            },
        }
    }
}

/// Examines one chain. `descriptors` yields the chain's descriptors as
/// `(guest address, length, device-writable)`.
///
/// On [`Prepared::Read`] and [`Prepared::Write`], `scratch.iov` holds the host buffers, each
/// checked to lie inside one region of `mem`: they stay valid as long as `mem` is alive.
pub fn prepare(
    descriptors: impl Iterator<Item = (GuestAddress, u32, bool)>,
    mem: &GuestMemoryMmap,
    dev: &DeviceInfo,
    scratch: &mut Scratch,
) -> (Prepared, Option<Malformed>) {
    scratch.readable.clear();
    scratch.writable.clear();
    scratch.iov.clear();
    scratch.ranges.clear();
    scratch.request_type = None;

    // 1. Split the chain into its device-readable part and its device-writable part.
    let mut misordered = false;
    let mut last_writable = false;
    let mut count = 0usize;
    for (addr, len, writable) in descriptors {
        count += 1;
        if count > MAX_DESCRIPTORS {
            misordered = true;
            break;
        }
        if len == 0 {
            continue;
        }
        last_writable = writable;
        let seg = Segment {
            addr,
            len: u64::from(len),
        };
        if writable {
            scratch.writable.push(seg);
        } else if scratch.writable.is_empty() {
            scratch.readable.push(seg);
        } else {
            misordered = true;
        }
    }

    // 2. The status byte is the last byte of the chain, and must be device-writable.
    let last = match scratch.writable.last_mut() {
        Some(last) if last_writable => Some(last),
        _ => None,
    };
    let Some(last) = last else {
        return (
            Prepared::Done {
                status: None,
                used_len: 0,
            },
            Some(Malformed::ShortHeader),
        );
    };
    let Some(status) = last.addr.checked_add(last.len - 1) else {
        return (
            Prepared::Done {
                status: None,
                used_len: 0,
            },
            Some(Malformed::OutsideMemory),
        );
    };
    if !mem.address_in_range(status) {
        return (
            Prepared::Done {
                status: None,
                used_len: 0,
            },
            Some(Malformed::OutsideMemory),
        );
    }
    last.len -= 1;
    if last.len == 0 {
        scratch.writable.pop();
    }

    let fail = |why: Malformed| (Prepared::status(status, STATUS_IOERR), Some(why));
    if misordered {
        return fail(Malformed::Misordered);
    }

    // 3. The header is the first 16 device-readable bytes.
    let mut raw = [0u8; OUTHDR_SIZE];
    let mut filled = 0usize;
    let mut data_start = (0usize, 0u64); // (segment index, offset in it) of the first data byte
    for (i, seg) in scratch.readable.iter().enumerate() {
        let want = (OUTHDR_SIZE - filled).min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        if mem
            .read_slice(&mut raw[filled..filled + want], seg.addr)
            .is_err()
        {
            return fail(Malformed::HeaderOutsideMemory);
        }
        filled += want;
        if filled == OUTHDR_SIZE {
            data_start = (i, want as u64);
            break;
        }
    }
    if filled < OUTHDR_SIZE {
        return fail(Malformed::ShortHeader);
    }
    let header = RequestHeader::parse(&raw);
    scratch.request_type = Some(header.request_type);

    // Device-readable bytes after the header: the data of a write.
    let (first, skip) = data_start;
    if let Some(seg) = scratch.readable.get_mut(first) {
        seg.addr = seg.addr.unchecked_add(skip);
        seg.len -= skip;
    }
    scratch.readable.drain(..first);
    if scratch.readable.first().is_some_and(|s| s.len == 0) {
        scratch.readable.remove(0);
    }
    let readable_len: u64 = scratch.readable.iter().map(|s| s.len).sum();
    let writable_len: u64 = scratch.writable.iter().map(|s| s.len).sum();

    match header.request_type {
        RequestType::In => {
            if readable_len != 0 {
                return fail(Malformed::WrongDirection);
            }
            if let Err(why) = check_segments(&scratch.writable, writable_len) {
                return fail(why);
            }
            let (offset, len) = match check_range(header.sector, writable_len, dev.capacity) {
                Ok(v) => v,
                Err(why) => return fail(why),
            };
            if len == 0 {
                return (Prepared::status(status, STATUS_OK), None);
            }
            if let Err(why) = translate(&scratch.writable, mem, &mut scratch.iov) {
                return fail(why);
            }
            (
                Prepared::Read {
                    offset,
                    len,
                    status,
                },
                None,
            )
        }
        RequestType::Out => {
            if dev.read_only {
                return (Prepared::status(status, STATUS_IOERR), None);
            }
            if writable_len != 0 {
                return fail(Malformed::WrongDirection);
            }
            if let Err(why) = check_segments(&scratch.readable, readable_len) {
                return fail(why);
            }
            let (offset, len) = match check_range(header.sector, readable_len, dev.capacity) {
                Ok(v) => v,
                Err(why) => return fail(why),
            };
            if len == 0 {
                return (Prepared::status(status, STATUS_OK), None);
            }
            if let Err(why) = translate(&scratch.readable, mem, &mut scratch.iov) {
                return fail(why);
            }
            (
                Prepared::Write {
                    offset,
                    len,
                    status,
                },
                None,
            )
        }
        RequestType::Flush => (Prepared::Flush { status }, None),
        RequestType::GetId => {
            if readable_len != 0 {
                return fail(Malformed::WrongDirection);
            }
            match write_id(&scratch.writable, mem, &dev.serial) {
                Ok(written) => (
                    Prepared::Done {
                        status: Some((status, STATUS_OK)),
                        used_len: written + 1,
                    },
                    None,
                ),
                Err(why) => fail(why),
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if dev.read_only {
                // Neither feature is offered on a read-only export.
                return (Prepared::status(status, STATUS_UNSUPP), None);
            }
            if writable_len != 0 {
                return fail(Malformed::WrongDirection);
            }
            let t = header.request_type;
            match parse_ranges(
                &scratch.readable,
                readable_len,
                mem,
                t,
                dev,
                &mut scratch.ranges,
            ) {
                Ok(()) if t == RequestType::Discard => (Prepared::Discard { status }, None),
                Ok(()) => (Prepared::WriteZeroes { status }, None),
                Err(Malformed::UnsupportedFlags) => (
                    Prepared::status(status, STATUS_UNSUPP),
                    Some(Malformed::UnsupportedFlags),
                ),
                Err(why) => fail(why),
            }
        }
        RequestType::Other(_) => (Prepared::status(status, STATUS_UNSUPP), None),
    }
}

/// Reads the `virtio_blk_discard_write_zeroes` segments of a discard or write-zeroes request
/// (`len` device-readable bytes in `segments`) into `ranges`. Every segment is checked before
/// any range is returned: reserved flags (or unmap on a discard) are
/// [`Malformed::UnsupportedFlags`]; a partial segment, no segment, or a segment longer than
/// [`MAX_DWZ_SECTORS`] is [`Malformed::BadLength`]; more than [`MAX_DWZ_SEGMENTS`] is
/// [`Malformed::TooManySegments`]; a range past the end of the disk is
/// [`Malformed::OutOfRange`].
fn parse_ranges(
    segments: &[Segment],
    len: u64,
    mem: &GuestMemoryMmap,
    request_type: RequestType,
    dev: &DeviceInfo,
    ranges: &mut Vec<ByteRange>,
) -> Result<(), Malformed> {
    const SEGMENT: u64 = DWZ_SEGMENT_SIZE as u64;
    if len == 0 || len % SEGMENT != 0 {
        return Err(Malformed::BadLength);
    }
    if len > (MAX_DWZ_SEGMENTS as u64) * SEGMENT {
        return Err(Malformed::TooManySegments);
    }
    // At most MAX_DWZ_SEGMENTS segments: gather them on the stack.
    let mut raw = [0u8; MAX_DWZ_SEGMENTS * DWZ_SEGMENT_SIZE];
    // Fits: `len` was just bounded by the buffer's size.
    let raw = &mut raw[..len as usize];
    let mut filled = 0usize;
    for seg in segments {
        let n = usize::try_from(seg.len).map_err(|_| Malformed::BadLength)?;
        let dest = raw
            .get_mut(filled..filled + n)
            .ok_or(Malformed::BadLength)?;
        mem.read_slice(dest, seg.addr)
            .map_err(|_| Malformed::OutsideMemory)?;
        filled += n;
    }
    let parsed = || {
        raw.chunks_exact(DWZ_SEGMENT_SIZE).map(|chunk| {
            let mut bytes = [0u8; DWZ_SEGMENT_SIZE];
            bytes.copy_from_slice(chunk);
            DwzSegment::parse(&bytes)
        })
    };
    // Flags first: the spec makes UNSUPP mandatory whatever else is wrong.
    if parsed().any(|seg| !seg.flags_supported(request_type)) {
        return Err(Malformed::UnsupportedFlags);
    }
    for seg in parsed() {
        if seg.num_sectors > MAX_DWZ_SECTORS {
            ranges.clear();
            return Err(Malformed::BadLength);
        }
        let checked = check_range(
            seg.sector,
            u64::from(seg.num_sectors) << SECTOR_SHIFT,
            dev.capacity,
        );
        let (offset, len) = match checked {
            Ok(v) => v,
            Err(why) => {
                ranges.clear();
                return Err(why);
            }
        };
        ranges.push(ByteRange {
            offset,
            len: u64::from(len),
            unmap: seg.unmap(),
        });
    }
    Ok(())
}

/// Checks the data segments of a read or write against what the device advertises: at most
/// [`SEG_MAX`] of them, none longer than [`SIZE_MAX`]. Together they are then at most
/// [`MAX_REQUEST_BYTES`], whatever memory they overlap: a request is bounded by the bytes it
/// asks for, not by the guest memory behind them.
fn check_segments(segments: &[Segment], total: u64) -> Result<(), Malformed> {
    if segments.len() > SEG_MAX as usize {
        return Err(Malformed::TooManySegments);
    }
    if segments.iter().any(|s| s.len > u64::from(SIZE_MAX)) {
        return Err(Malformed::SegmentTooLarge);
    }
    if total > MAX_REQUEST_BYTES {
        return Err(Malformed::BadLength);
    }
    Ok(())
}

/// Checks that `len` bytes at `sector` are a whole number of sectors inside the disk, and
/// returns (byte offset, length).
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<(u64, u32), Malformed> {
    if len % SECTOR_SIZE != 0 {
        return Err(Malformed::BadLength);
    }
    let len32 = u32::try_from(len).map_err(|_| Malformed::BadLength)?;
    let offset = sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or(Malformed::OutOfRange)?;
    let end = offset.checked_add(len).ok_or(Malformed::OutOfRange)?;
    if end > capacity {
        return Err(Malformed::OutOfRange);
    }
    Ok((offset, len32))
}

/// Appends the host buffers for `segments` to `iov`. A segment that crosses from one region of
/// guest memory into the next becomes several iovecs; contiguous host buffers are merged. Fails,
/// with `iov` in an unspecified state, if any byte lies outside guest memory.
fn translate(
    segments: &[Segment],
    mem: &GuestMemoryMmap,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), Malformed> {
    for seg in segments {
        let mut addr = seg.addr;
        let mut remaining = seg.len;
        while remaining > 0 {
            let (region, region_addr) = mem.to_region_addr(addr).ok_or(Malformed::OutsideMemory)?;
            let available = region.len() - region_addr.raw_value();
            let n = remaining.min(available);
            let host = region
                .get_host_address(region_addr)
                .map_err(|_| Malformed::OutsideMemory)?;
            let n_usize = usize::try_from(n).map_err(|_| Malformed::BadLength)?;
            match iov.last_mut() {
                Some(prev)
                    if (prev.iov_base as usize).wrapping_add(prev.iov_len) == host as usize =>
                {
                    prev.iov_len += n_usize;
                }
                _ => {
                    if iov.len() == MAX_IOVECS {
                        return Err(Malformed::TooManySegments);
                    }
                    iov.push(libc::iovec {
                        iov_base: host.cast(),
                        iov_len: n_usize,
                    });
                }
            }
            remaining -= n;
            if remaining > 0 {
                addr = addr.checked_add(n).ok_or(Malformed::OutsideMemory)?;
            }
        }
    }
    Ok(())
}

/// Writes the serial (zero-padded to 20 bytes) into the data buffers, as much as fits; returns
/// the number of bytes written.
fn write_id(
    segments: &[Segment],
    mem: &GuestMemoryMmap,
    serial: &[u8; ID_BYTES],
) -> Result<u32, Malformed> {
    let mut written = 0usize;
    for seg in segments {
        if written == ID_BYTES {
            break;
        }
        let n = (ID_BYTES - written).min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        mem.write_slice(&serial[written..written + n], seg.addr)
            .map_err(|_| Malformed::OutsideMemory)?;
        written += n;
    }
    // At most 20: the cast cannot truncate.
    Ok(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
    };

    const MIB: u64 = 1 << 20;

    /// Two adjacent 1 MiB regions at 0 and 1 MiB, then a hole, then a region at 16 MiB.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MIB as usize),
            (GuestAddress(MIB), MIB as usize),
            (GuestAddress(16 * MIB), MIB as usize),
        ])
        .unwrap()
    }

    fn dev() -> DeviceInfo {
        let mut serial = [0u8; ID_BYTES];
        serial[..6].copy_from_slice(b"disk-1");
        DeviceInfo {
            capacity: 1 << 30,
            read_only: true,
            serial,
        }
    }

    fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&t.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    fn dev_rw() -> DeviceInfo {
        DeviceInfo {
            read_only: false,
            ..dev()
        }
    }

    fn run(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
    ) -> (Prepared, Option<Malformed>, Scratch) {
        run_on(&dev(), mem, descs)
    }

    fn run_on(
        dev: &DeviceInfo,
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
    ) -> (Prepared, Option<Malformed>, Scratch) {
        let mut scratch = Scratch::new();
        let (p, m) = prepare(
            descs.iter().map(|&(a, l, w)| (GuestAddress(a), l, w)),
            mem,
            dev,
            &mut scratch,
        );
        (p, m, scratch)
    }

    /// Writes `segs` as virtio_blk_discard_write_zeroes structs at `at`.
    fn segments(mem: &GuestMemoryMmap, at: u64, segs: &[(u64, u32, u32)]) -> u32 {
        for (i, &(sector, num, flags)) in segs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num.to_le_bytes());
            raw[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(at + 16 * i as u64))
                .unwrap();
        }
        16 * segs.len() as u32
    }

    #[test]
    fn plain_read() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 8);
        let (p, m, s) = run(
            &mem,
            &[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 1, true)],
        );
        assert_eq!(m, None);
        assert_eq!(
            p,
            Prepared::Read {
                offset: 4096,
                len: 4096,
                status: GuestAddress(0x3000)
            }
        );
        assert_eq!(s.iov.len(), 1);
        assert_eq!(s.iov[0].iov_len, 4096);
        assert_eq!(
            s.iov[0].iov_base as usize,
            mem.get_host_address(GuestAddress(0x2000)).unwrap() as usize
        );
    }

    #[test]
    fn header_data_and_status_in_shared_descriptors() {
        // Any layout is legal with VERSION_1: header split over two descriptors, data and
        // status in one writable descriptor.
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (p, m, s) = run(
            &mem,
            &[(0x1000, 10, false), (0x100a, 6, false), (0x2000, 513, true)],
        );
        assert_eq!(m, None);
        assert_eq!(
            p,
            Prepared::Read {
                offset: 0,
                len: 512,
                status: GuestAddress(0x2200)
            }
        );
        assert_eq!(s.iov.len(), 1);
        assert_eq!(s.iov[0].iov_len, 512);
    }

    #[test]
    fn buffer_crossing_regions_becomes_two_iovecs() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (p, _, s) = run(
            &mem,
            &[
                (0x1000, 16, false),
                (MIB - 512, 1024, true),
                (0x3000, 1, true),
            ],
        );
        assert!(matches!(p, Prepared::Read { len: 1024, .. }));
        let total: usize = s.iov.iter().map(|v| v.iov_len).sum();
        assert_eq!(total, 1024);
        // The two regions are separate mappings, so two iovecs unless mmap put them side by side.
        assert!(!s.iov.is_empty() && s.iov.len() <= 2);
        assert_eq!(
            s.iov[0].iov_base as usize,
            mem.get_host_address(GuestAddress(MIB - 512)).unwrap() as usize
        );
    }

    #[test]
    fn data_outside_memory_is_ioerr() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        // Runs from the end of the second region into the hole.
        let (p, m, _) = run(
            &mem,
            &[
                (0x1000, 16, false),
                (2 * MIB - 512, 1024, true),
                (0x3000, 1, true),
            ],
        );
        assert_eq!(p, Prepared::status(GuestAddress(0x3000), STATUS_IOERR));
        assert_eq!(m, Some(Malformed::OutsideMemory));
        // Entirely in the hole, and wrapping the address space.
        let (p, _, _) = run(
            &mem,
            &[(0x1000, 16, false), (8 * MIB, 512, true), (0x3000, 1, true)],
        );
        assert_eq!(p, Prepared::status(GuestAddress(0x3000), STATUS_IOERR));
        let (p, _, _) = run(
            &mem,
            &[
                (0x1000, 16, false),
                (u64::MAX - 100, 512, true),
                (0x3000, 1, true),
            ],
        );
        assert_eq!(p, Prepared::status(GuestAddress(0x3000), STATUS_IOERR));
    }

    #[test]
    fn missing_or_unreachable_status_returns_chain_without_status() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let none = Prepared::Done {
            status: None,
            used_len: 0,
        };
        assert_eq!(run(&mem, &[(0x1000, 16, false)]).0, none);
        assert_eq!(
            run(&mem, &[(0x1000, 16, false), (0x3000, 1, false)]).0,
            none
        );
        // Status descriptor not writable after a writable data buffer: nothing is written.
        assert_eq!(
            run(
                &mem,
                &[(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, false)]
            )
            .0,
            none
        );
        assert_eq!(
            run(&mem, &[(0x1000, 16, false), (8 * MIB, 1, true)]).0,
            none
        );
        assert_eq!(run(&mem, &[]).0, none);
        assert_eq!(run(&mem, &[(0x1000, 16, false), (0x3000, 0, true)]).0, none);
    }

    #[test]
    fn bad_headers_and_directions_are_ioerr() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let ioerr = Prepared::status(GuestAddress(0x3000), STATUS_IOERR);
        // Header too short.
        assert_eq!(
            run(&mem, &[(0x1000, 8, false), (0x3000, 1, true)]).1,
            Some(Malformed::ShortHeader)
        );
        // Header outside memory.
        assert_eq!(
            run(&mem, &[(8 * MIB, 16, false), (0x3000, 1, true)]).0,
            ioerr
        );
        // Read with a device-readable data buffer.
        let (p, m, _) = run(
            &mem,
            &[(0x1000, 16, false), (0x2000, 512, false), (0x3000, 1, true)],
        );
        assert_eq!((p, m), (ioerr, Some(Malformed::WrongDirection)));
        // Readable descriptor after a writable one.
        let (p, m, _) = run(
            &mem,
            &[
                (0x1000, 16, false),
                (0x2000, 512, true),
                (0x2800, 8, false),
                (0x3000, 1, true),
            ],
        );
        assert_eq!((p, m), (ioerr, Some(Malformed::Misordered)));
        // Length not a multiple of 512.
        let (p, m, _) = run(
            &mem,
            &[(0x1000, 16, false), (0x2000, 100, true), (0x3000, 1, true)],
        );
        assert_eq!((p, m), (ioerr, Some(Malformed::BadLength)));
    }

    #[test]
    fn segment_limits_are_enforced_as_advertised() {
        let mem = memory();
        let ioerr = Prepared::status(GuestAddress(0x3000), STATUS_IOERR);
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let chain = |segs: usize, len: u32, writable: bool| {
            let mut d = vec![(0x1000u64, 16u32, false)];
            d.extend(std::iter::repeat_n((0x10_0000u64, len, writable), segs));
            d.push((0x3000, 1, true));
            d
        };
        // SEG_MAX segments of SIZE_MAX bytes, all over the same megabyte: served (a request is
        // bounded by the bytes it asks for, overlapping or not).
        let (p, m, s) = run(&mem, &chain(SEG_MAX as usize, SIZE_MAX, true));
        assert_eq!(m, None);
        assert_eq!(
            p,
            Prepared::Read {
                offset: 0,
                len: MAX_REQUEST_BYTES as u32,
                status: GuestAddress(0x3000)
            }
        );
        assert_eq!(s.iov.len(), SEG_MAX as usize);
        // One segment more, or one segment larger: VIRTIO_BLK_S_IOERR.
        let (p, m, _) = run(&mem, &chain(SEG_MAX as usize + 1, 4096, true));
        assert_eq!((p, m), (ioerr, Some(Malformed::TooManySegments)));
        let (p, m, _) = run(&mem, &chain(1, SIZE_MAX + 512, true));
        assert_eq!((p, m), (ioerr, Some(Malformed::SegmentTooLarge)));
        // 512 segments of 2 MiB over the same memory (a 1 GiB read): refused before anything
        // is translated.
        let (p, m, _) = run(&mem, &chain(512, 2 << 20, true));
        assert_eq!((p, m), (ioerr, Some(Malformed::TooManySegments)));
        // Writes alike.
        let dev = dev_rw();
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let (p, m, _) = run_on(&dev, &mem, &chain(SEG_MAX as usize + 1, 512, false));
        assert_eq!((p, m), (ioerr, Some(Malformed::TooManySegments)));
        let (p, m, _) = run_on(&dev, &mem, &chain(2, SIZE_MAX + 512, false));
        assert_eq!((p, m), (ioerr, Some(Malformed::SegmentTooLarge)));
        let (p, m, _) = run_on(&dev, &mem, &chain(SEG_MAX as usize, 4096, false));
        assert_eq!(m, None);
        assert!(matches!(p, Prepared::Write { len, .. } if len == SEG_MAX * 4096));
    }

    #[test]
    fn range_checks() {
        let mem = memory();
        let ioerr = Prepared::status(GuestAddress(0x3000), STATUS_IOERR);
        // Last sector is fine, one past is not.
        let last = (1u64 << 30) / 512 - 1;
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, last);
        assert!(matches!(
            run(
                &mem,
                &[(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, true)]
            )
            .0,
            Prepared::Read { .. }
        ));
        assert_eq!(
            run(
                &mem,
                &[(0x1000, 16, false), (0x2000, 1024, true), (0x3000, 1, true)]
            )
            .0,
            ioerr
        );
        // Sector whose byte offset overflows u64.
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, u64::MAX / 4);
        assert_eq!(
            run(
                &mem,
                &[(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, true)]
            )
            .1,
            Some(Malformed::OutOfRange)
        );
    }

    #[test]
    fn write_on_read_only_get_id_and_unknown() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(
                &mem,
                &[(0x1000, 16, false), (0x2000, 512, false), (0x3000, 1, true)]
            )
            .0,
            Prepared::status(GuestAddress(0x3000), STATUS_IOERR)
        );

        header(&mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xff; 32], GuestAddress(0x2000)).unwrap();
        let (p, _, _) = run(
            &mem,
            &[(0x1000, 16, false), (0x2000, 32, true), (0x3000, 1, true)],
        );
        assert_eq!(
            p,
            Prepared::Done {
                status: Some((GuestAddress(0x3000), STATUS_OK)),
                used_len: 21
            }
        );
        let mut id = [0u8; 32];
        mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id[..6], b"disk-1");
        assert!(id[6..20].iter().all(|&b| b == 0));
        assert!(
            id[20..].iter().all(|&b| b == 0xff),
            "nothing written past 20 bytes"
        );

        header(&mem, 0x1000, 99, 0);
        assert_eq!(
            run(&mem, &[(0x1000, 16, false), (0x3000, 1, true)]).0,
            Prepared::status(GuestAddress(0x3000), STATUS_UNSUPP)
        );
    }

    #[test]
    fn write_on_writable_export() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 3);
        // Header and the first data bytes share a descriptor; data continues in another one.
        let (p, m, s) = run_on(
            &dev_rw(),
            &mem,
            &[
                (0x1000, 16 + 512, false),
                (0x4000, 1024, false),
                (0x3000, 1, true),
            ],
        );
        assert_eq!(m, None);
        assert_eq!(
            p,
            Prepared::Write {
                offset: 3 * 512,
                len: 1536,
                status: GuestAddress(0x3000)
            }
        );
        let total: usize = s.iov.iter().map(|v| v.iov_len).sum();
        assert_eq!(total, 1536);
        assert_eq!(
            s.iov[0].iov_base as usize,
            mem.get_host_address(GuestAddress(0x1010)).unwrap() as usize
        );
        // A device-writable data buffer on a write is malformed.
        let (p, m, _) = run_on(
            &dev_rw(),
            &mem,
            &[(0x1000, 16, false), (0x4000, 512, true), (0x3000, 1, true)],
        );
        assert_eq!(p, Prepared::status(GuestAddress(0x3000), STATUS_IOERR));
        assert_eq!(m, Some(Malformed::WrongDirection));
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mem = memory();
        let last = (1u64 << 30) / 512;
        header(&mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let n = segments(&mem, 0x4000, &[(8, 16, 0), (last - 1, 1, 0), (100, 0, 0)]);
        // Segments split over two descriptors, in the middle of a struct.
        let (p, m, s) = run_on(
            &dev_rw(),
            &mem,
            &[
                (0x1000, 16, false),
                (0x4000, 20, false),
                (0x4014, n - 20, false),
                (0x3000, 1, true),
            ],
        );
        assert_eq!(m, None);
        assert_eq!(
            p,
            Prepared::Discard {
                status: GuestAddress(0x3000)
            }
        );
        assert_eq!(
            s.ranges,
            vec![
                ByteRange {
                    offset: 8 * 512,
                    len: 16 * 512,
                    unmap: false
                },
                ByteRange {
                    offset: (last - 1) * 512,
                    len: 512,
                    unmap: false
                },
                ByteRange {
                    offset: 100 * 512,
                    len: 0,
                    unmap: false
                },
            ]
        );

        header(&mem, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let n = segments(&mem, 0x4000, &[(0, 8, 1), (0, MAX_DWZ_SECTORS, 0)]);
        let (p, m, s) = run_on(
            &dev_rw(),
            &mem,
            &[(0x1000, 16, false), (0x4000, n, false), (0x3000, 1, true)],
        );
        assert_eq!(m, None);
        assert_eq!(
            p,
            Prepared::WriteZeroes {
                status: GuestAddress(0x3000)
            }
        );
        assert_eq!(
            s.ranges,
            vec![
                ByteRange {
                    offset: 0,
                    len: 4096,
                    unmap: true
                },
                ByteRange {
                    offset: 0,
                    len: 1 << 30,
                    unmap: false
                },
            ]
        );
        // The scratch ranges are reused: a following read leaves none behind.
        let mut scratch = s;
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let descs = [
            (0x1000u64, 16u32, false),
            (0x2000, 512, true),
            (0x3000, 1, true),
        ];
        prepare(
            descs.iter().map(|&(a, l, w)| (GuestAddress(a), l, w)),
            &mem,
            &dev_rw(),
            &mut scratch,
        );
        assert!(scratch.ranges.is_empty());
    }

    #[test]
    fn bad_discard_and_write_zeroes_requests() {
        let mem = memory();
        let dev = dev_rw();
        let ioerr = Prepared::status(GuestAddress(0x3000), STATUS_IOERR);
        let unsupp = Prepared::status(GuestAddress(0x3000), STATUS_UNSUPP);
        let go = |t: u32, segs: &[(u64, u32, u32)]| {
            header(&mem, 0x1000, t, 0);
            let n = segments(&mem, 0x4000, segs);
            let (p, m, s) = run_on(
                &dev,
                &mem,
                &[(0x1000, 16, false), (0x4000, n, false), (0x3000, 1, true)],
            );
            assert!(s.ranges.is_empty() || p != ioerr && p != unsupp);
            (p, m)
        };
        let last = (1u64 << 30) / 512;
        const D: u32 = VIRTIO_BLK_T_DISCARD;
        const WZ: u32 = VIRTIO_BLK_T_WRITE_ZEROES;
        // Unmap on a discard, reserved flags on either: UNSUPP, even next to other errors.
        assert_eq!(
            go(D, &[(0, 8, 1)]),
            (unsupp, Some(Malformed::UnsupportedFlags))
        );
        assert_eq!(
            go(D, &[(0, 8, 2)]),
            (unsupp, Some(Malformed::UnsupportedFlags))
        );
        assert_eq!(
            go(WZ, &[(0, 8, 1 << 31)]),
            (unsupp, Some(Malformed::UnsupportedFlags))
        );
        assert_eq!(
            go(WZ, &[(last, 8, 0), (0, 8, 3)]),
            (unsupp, Some(Malformed::UnsupportedFlags))
        );
        // Past the end of the disk, or overflowing.
        assert_eq!(
            go(D, &[(0, 8, 0), (last, 1, 0)]),
            (ioerr, Some(Malformed::OutOfRange))
        );
        assert_eq!(
            go(WZ, &[(last - 1, 2, 0)]),
            (ioerr, Some(Malformed::OutOfRange))
        );
        assert_eq!(
            go(D, &[(u64::MAX / 4, 1, 0)]),
            (ioerr, Some(Malformed::OutOfRange))
        );
        // One segment longer than advertised.
        assert_eq!(
            go(WZ, &[(0, MAX_DWZ_SECTORS + 1, 0)]),
            (ioerr, Some(Malformed::BadLength))
        );
        // More segments than advertised.
        let many = vec![(0u64, 1u32, 0u32); MAX_DWZ_SEGMENTS + 1];
        assert_eq!(go(D, &many), (ioerr, Some(Malformed::TooManySegments)));
        assert!(matches!(
            go(D, &many[..MAX_DWZ_SEGMENTS]).0,
            Prepared::Discard { .. }
        ));

        header(&mem, 0x1000, D, 0);
        segments(&mem, 0x4000, &[(0, 8, 0)]);
        // No segment, a partial segment.
        for len in [0u32, 15, 17] {
            let (p, m, _) = run_on(
                &dev,
                &mem,
                &[(0x1000, 16, false), (0x4000, len, false), (0x3000, 1, true)],
            );
            assert_eq!((p, m), (ioerr, Some(Malformed::BadLength)), "{len} bytes");
        }
        // Segment data device-writable.
        let (p, m, _) = run_on(
            &dev,
            &mem,
            &[(0x1000, 16, false), (0x4000, 16, true), (0x3000, 1, true)],
        );
        assert_eq!((p, m), (ioerr, Some(Malformed::WrongDirection)));
        // Segment data outside guest memory.
        let (p, m, _) = run_on(
            &dev,
            &mem,
            &[(0x1000, 16, false), (8 * MIB, 16, false), (0x3000, 1, true)],
        );
        assert_eq!((p, m), (ioerr, Some(Malformed::OutsideMemory)));
        // Read-only export: neither request type is offered.
        let (p, _, _) = run(
            &mem,
            &[(0x1000, 16, false), (0x4000, 16, false), (0x3000, 1, true)],
        );
        assert_eq!(p, unsupp);
        header(&mem, 0x1000, WZ, 0);
        let (p, _, _) = run(
            &mem,
            &[(0x1000, 16, false), (0x4000, 16, false), (0x3000, 1, true)],
        );
        assert_eq!(p, unsupp);
    }
}
