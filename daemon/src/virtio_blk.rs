//! virtio-blk device facts (virtio 1.2, section 5.2): feature bits, the config-space layout and
//! its one writable byte (`writeback`), the request header, discard/write-zeroes segments and
//! status codes.
//!
//! Pure data and pure functions: nothing here touches guest memory or the engine. The config
//! space is built once per connection on the export's listener thread and read and written by
//! connection's request handler on the relay thread (GET_CONFIG, SET_CONFIG); the header and segment parsers run
//! on the worker threads.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// virtio-blk addresses the disk in 512-byte sectors, whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Logical block size reported to the guest.
pub const BLK_SIZE: u32 = 512;
/// Maximum number of data segments in one request: QEMU's queue size 128 minus header and status.
pub const SEG_MAX: u32 = 126;
/// Maximum size of one data segment reported to the guest.
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data bytes one read or write may carry: SEG_MAX segments of SIZE_MAX bytes (126 MiB).
/// A request with more segments, a larger segment or more bytes fails with
/// VIRTIO_BLK_S_IOERR (Linux never builds one: it honours both limits).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most queues an export offers (one bit per queue in the worker masks).
pub const MAX_QUEUES: u16 = 64;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Size of `struct virtio_blk_outhdr`.
pub const OUTHDR_SIZE: usize = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DWZ_SEGMENT_SIZE: usize = 16;
/// Most segments one discard or write-zeroes request may carry (max_discard_seg and
/// max_write_zeroes_seg). Linux merges up to this many ranges into one request.
pub const MAX_DWZ_SEGMENTS: usize = 16;
/// Most sectors one discard or write-zeroes segment may cover: 1 GiB, a multiple of every
/// cluster size (512 B to 2 MiB), so that split requests stay cluster-aligned.
pub const MAX_DWZ_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// Byte offset of `writeback` (the write-cache enable byte) in the config space: the only byte
/// the driver may write (VIRTIO_BLK_F_CONFIG_WCE).
pub const WRITEBACK_OFFSET: u32 = 32;

/// Request completed successfully.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Request failed.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Request type not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The virtio feature bits an export offers (without the vhost-user protocol-features bit).
/// Read-only exports offer RO; writable ones DISCARD, WRITE_ZEROES and CONFIG_WCE (the driver
/// may switch the write cache off). Both offer FLUSH (a no-op when nothing is written).
pub fn device_features(read_only: bool) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_MQ)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX);
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        features |= (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE);
    }
    features
}

/// What a request asks for, from the `type` field of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read from the disk into the guest's buffers.
    In,
    /// VIRTIO_BLK_T_OUT: write the guest's buffers to the disk.
    Out,
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: return the device serial.
    GetId,
    /// VIRTIO_BLK_T_DISCARD: the ranges' contents may be dropped.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES: the ranges read as zeros afterwards.
    WriteZeroes,
    /// Anything else (answered with VIRTIO_BLK_S_UNSUPP).
    Other(u32),
}

/// `struct virtio_blk_outhdr`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// The request type.
    pub request_type: RequestType,
    /// First sector (512 bytes) the request addresses.
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the 16 little-endian header bytes: `type` (u32), `reserved` (u32), `sector` (u64).
    pub fn parse(bytes: &[u8; OUTHDR_SIZE]) -> Self {
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *bytes;
        let raw_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let request_type = match raw_type {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Other(other),
        };
        RequestHeader {
            request_type,
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        }
    }
}

/// One `struct virtio_blk_discard_write_zeroes` (the data of a discard or write-zeroes request
/// is an array of them), decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DwzSegment {
    /// First sector of the range.
    pub sector: u64,
    /// Length of the range in sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write zeroes only); the others are reserved.
    pub flags: u32,
}

impl DwzSegment {
    /// Decodes the 16 little-endian bytes: `sector` (u64), `num_sectors` (u32), `flags` (u32).
    pub fn parse(bytes: &[u8; DWZ_SEGMENT_SIZE]) -> Self {
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = *bytes;
        DwzSegment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }

    /// Whether the driver allows the range to be deallocated (write zeroes).
    pub fn unmap(&self) -> bool {
        self.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    }

    /// Whether the flags are valid for the request type: the spec asks for VIRTIO_BLK_S_UNSUPP
    /// when a reserved bit is set, and for a discard whose unmap bit is set.
    pub fn flags_supported(&self, request_type: RequestType) -> bool {
        let allowed = match request_type {
            RequestType::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            _ => 0,
        };
        self.flags & !allowed == 0
    }
}

/// The `writeback` value a SET_CONFIG write of `buf` at `offset` stores, if the write covers
/// that byte (any non-zero value means write-back, as QEMU reads it). Every other byte of the
/// config space is read-only: writes to them are ignored.
pub fn writeback_written(offset: u32, buf: &[u8]) -> Option<bool> {
    let index = WRITEBACK_OFFSET.checked_sub(offset)?;
    let byte = buf.get(usize::try_from(index).ok()?)?;
    Some(*byte != 0)
}

/// `struct virtio_blk_config` as laid out by the virtio 1.2 spec (and Linux's uapi header),
/// including the zoned characteristics at the end. Every field is stored little endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Maximum size of one segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Maximum number of segments in a request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Legacy geometry: cylinders.
    pub cylinders: u16,
    /// Legacy geometry: heads.
    pub heads: u8,
    /// Legacy geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// log2 of logical blocks per physical block (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (VIRTIO_BLK_F_TOPOLOGY).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks (VIRTIO_BLK_F_TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks (VIRTIO_BLK_F_TOPOLOGY).
    pub opt_io_size: u32,
    /// 1: write-back cache (completed writes are durable after a flush); 0: write-through
    /// (every write is durable when it completes). Writable by the driver with
    /// VIRTIO_BLK_F_CONFIG_WCE. Called `wce` in Linux's header.
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// VIRTIO_BLK_F_DISCARD: maximum discard sectors.
    pub max_discard_sectors: u32,
    /// VIRTIO_BLK_F_DISCARD: maximum discard segments.
    pub max_discard_seg: u32,
    /// VIRTIO_BLK_F_DISCARD: discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// VIRTIO_BLK_F_WRITE_ZEROES: maximum write-zeroes sectors.
    pub max_write_zeroes_sectors: u32,
    /// VIRTIO_BLK_F_WRITE_ZEROES: maximum write-zeroes segments.
    pub max_write_zeroes_seg: u32,
    /// VIRTIO_BLK_F_WRITE_ZEROES: whether write-zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
    /// VIRTIO_BLK_F_SECURE_ERASE: maximum sectors.
    pub max_secure_erase_sectors: u32,
    /// VIRTIO_BLK_F_SECURE_ERASE: maximum segments.
    pub max_secure_erase_seg: u32,
    /// VIRTIO_BLK_F_SECURE_ERASE: alignment in sectors.
    pub secure_erase_sector_alignment: u32,
    /// VIRTIO_BLK_F_ZONED: zone size in sectors.
    pub zone_sectors: u32,
    /// VIRTIO_BLK_F_ZONED: maximum open zones.
    pub max_open_zones: u32,
    /// VIRTIO_BLK_F_ZONED: maximum active zones.
    pub max_active_zones: u32,
    /// VIRTIO_BLK_F_ZONED: maximum append sectors.
    pub max_append_sectors: u32,
    /// VIRTIO_BLK_F_ZONED: write granularity in bytes.
    pub write_granularity: u32,
    /// VIRTIO_BLK_F_ZONED: zoned model.
    pub zoned_model: u8,
    /// Padding.
    pub unused2: [u8; 3],
}

/// Size of the config space in bytes.
pub const CONFIG_SIZE: usize = 96;

// The struct must be exactly the spec's 96 bytes: any compiler-inserted padding would shift
// fields, and `ByteValued` below requires that there is none.
const _: () = assert!(std::mem::size_of::<BlkConfig>() == CONFIG_SIZE);

// SAFETY: BlkConfig is repr(C), made only of integers and integer arrays, and the assertion above
// proves it has no padding (its size equals the sum of its fields, laid out by the spec so that
// every field is naturally aligned). Any bit pattern is therefore a valid value.
unsafe impl ByteValued for BlkConfig {}

impl BlkConfig {
    /// The config space of a disk of `capacity_bytes` bytes served with `num_queues` queues.
    /// `cluster_size` (the image's) becomes the optimal I/O size hint and the discard alignment.
    /// Writable exports fill in the discard and write-zeroes limits and report `writeback`;
    /// read-only ones leave those fields zero (their features are not offered).
    pub fn new(
        capacity_bytes: u64,
        num_queues: u16,
        cluster_size: u64,
        read_only: bool,
        writeback: bool,
    ) -> Self {
        // Physical block: the cluster size, capped at 4 KiB (the usual host page/sector size), so
        // guests align partitions and file systems to it.
        let physical = cluster_size.clamp(SECTOR_SIZE, 4096);
        let physical_block_exp = (physical / u64::from(BLK_SIZE)).trailing_zeros() as u8;
        let opt_io_blocks = u32::try_from(cluster_size / u64::from(BLK_SIZE)).unwrap_or(u32::MAX);
        let mut config = BlkConfig {
            capacity: (capacity_bytes >> SECTOR_SHIFT).to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: SEG_MAX.to_le(),
            blk_size: BLK_SIZE.to_le(),
            physical_block_exp,
            alignment_offset: 0,
            min_io_size: 1u16.to_le(),
            opt_io_size: opt_io_blocks.to_le(),
            writeback: 0,
            num_queues: num_queues.to_le(),
            ..BlkConfig::default()
        };
        if !read_only {
            let cluster_sectors =
                u32::try_from((cluster_size >> SECTOR_SHIFT).max(1)).unwrap_or(u32::MAX);
            // Cast cannot truncate: MAX_DWZ_SEGMENTS is 16.
            let max_seg = (MAX_DWZ_SEGMENTS as u32).to_le();
            config.writeback = u8::from(writeback);
            config.max_discard_sectors = MAX_DWZ_SECTORS.to_le();
            config.max_discard_seg = max_seg;
            config.discard_sector_alignment = cluster_sectors.to_le();
            config.max_write_zeroes_sectors = MAX_DWZ_SECTORS.to_le();
            config.max_write_zeroes_seg = max_seg;
            config.write_zeroes_may_unmap = 1;
        }
        config
    }

    /// `size` bytes of the config space starting at `offset`, zero-filled past its end (a
    /// frontend may know of more fields than we do). Returns an empty vector, which the
    /// vhost-user layer reports as an error, only for a size that no valid message can carry.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        // vhost-user messages bound offset + size by 4 KiB; refuse anything larger rather than
        // allocate what a broken frontend asks for.
        const MAX_CONFIG_READ: u64 = 4096;
        let end = u64::from(offset) + u64::from(size);
        if end > MAX_CONFIG_READ {
            return Vec::new();
        }
        let bytes = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < bytes.len() {
            let n = (bytes.len() - start).min(out.len());
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn config_layout_matches_spec() {
        // virtio 1.2, 5.2.4: the offsets of struct virtio_blk_config.
        assert_eq!(offset_of!(BlkConfig, capacity), 0);
        assert_eq!(offset_of!(BlkConfig, size_max), 8);
        assert_eq!(offset_of!(BlkConfig, seg_max), 12);
        assert_eq!(offset_of!(BlkConfig, cylinders), 16);
        assert_eq!(offset_of!(BlkConfig, heads), 18);
        assert_eq!(offset_of!(BlkConfig, sectors), 19);
        assert_eq!(offset_of!(BlkConfig, blk_size), 20);
        assert_eq!(offset_of!(BlkConfig, physical_block_exp), 24);
        assert_eq!(offset_of!(BlkConfig, alignment_offset), 25);
        assert_eq!(offset_of!(BlkConfig, min_io_size), 26);
        assert_eq!(offset_of!(BlkConfig, opt_io_size), 28);
        assert_eq!(offset_of!(BlkConfig, writeback), 32);
        assert_eq!(offset_of!(BlkConfig, writeback), WRITEBACK_OFFSET as usize);
        assert_eq!(offset_of!(BlkConfig, unused0), 33);
        assert_eq!(offset_of!(BlkConfig, num_queues), 34);
        assert_eq!(offset_of!(BlkConfig, max_discard_sectors), 36);
        assert_eq!(offset_of!(BlkConfig, max_discard_seg), 40);
        assert_eq!(offset_of!(BlkConfig, discard_sector_alignment), 44);
        assert_eq!(offset_of!(BlkConfig, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(BlkConfig, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(BlkConfig, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(BlkConfig, unused1), 57);
        assert_eq!(offset_of!(BlkConfig, max_secure_erase_sectors), 60);
        assert_eq!(offset_of!(BlkConfig, max_secure_erase_seg), 64);
        assert_eq!(offset_of!(BlkConfig, secure_erase_sector_alignment), 68);
        assert_eq!(offset_of!(BlkConfig, zone_sectors), 72);
        assert_eq!(offset_of!(BlkConfig, max_open_zones), 76);
        assert_eq!(offset_of!(BlkConfig, max_active_zones), 80);
        assert_eq!(offset_of!(BlkConfig, max_append_sectors), 84);
        assert_eq!(offset_of!(BlkConfig, write_granularity), 88);
        assert_eq!(offset_of!(BlkConfig, zoned_model), 92);
        assert_eq!(std::mem::size_of::<BlkConfig>(), 96);
        // Same layout as Linux's uapi header (the generated binding).
        assert_eq!(std::mem::size_of::<virtio_blk_config>(), CONFIG_SIZE);
        for (ours, theirs) in [
            (
                offset_of!(BlkConfig, writeback),
                offset_of!(virtio_blk_config, wce),
            ),
            (
                offset_of!(BlkConfig, num_queues),
                offset_of!(virtio_blk_config, num_queues),
            ),
            (
                offset_of!(BlkConfig, max_discard_sectors),
                offset_of!(virtio_blk_config, max_discard_sectors),
            ),
            (
                offset_of!(BlkConfig, max_discard_seg),
                offset_of!(virtio_blk_config, max_discard_seg),
            ),
            (
                offset_of!(BlkConfig, discard_sector_alignment),
                offset_of!(virtio_blk_config, discard_sector_alignment),
            ),
            (
                offset_of!(BlkConfig, max_write_zeroes_sectors),
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            ),
            (
                offset_of!(BlkConfig, max_write_zeroes_seg),
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
            ),
            (
                offset_of!(BlkConfig, write_zeroes_may_unmap),
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            ),
            (
                offset_of!(BlkConfig, max_secure_erase_sectors),
                offset_of!(virtio_blk_config, max_secure_erase_sectors),
            ),
        ] {
            assert_eq!(ours, theirs);
        }
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn config_bytes_are_little_endian_at_spec_offsets() {
        let cfg = BlkConfig::new(10 << 30, 16, 65536, true, true);
        let b = cfg.read(0, CONFIG_SIZE as u32);
        assert_eq!(b.len(), CONFIG_SIZE);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        assert_eq!(u64_at(0), (10u64 << 30) / 512);
        assert_eq!(u32_at(&b, 8), SIZE_MAX);
        assert_eq!(u32_at(&b, 12), 126);
        assert_eq!(u32_at(&b, 20), 512);
        assert_eq!(b[24], 3, "4 KiB physical blocks");
        assert_eq!(u16_at(26), 1);
        assert_eq!(u32_at(&b, 28), 128, "64 KiB clusters = 128 sectors");
        assert_eq!(u16_at(34), 16);
        // Read-only: no write cache, no discard or write-zeroes limits.
        assert_eq!(b[32], 0);
        assert!(b[36..96].iter().all(|&x| x == 0));
    }

    #[test]
    fn writable_config_has_discard_and_write_zeroes_limits() {
        let cfg = BlkConfig::new(10 << 30, 4, 65536, false, true);
        let b = cfg.read(0, CONFIG_SIZE as u32);
        assert_eq!(b[32], 1, "write-back by default");
        assert_eq!(b[33], 0);
        assert_eq!(u32_at(&b, 36), 1 << 21, "max_discard_sectors: 1 GiB");
        assert_eq!(u32_at(&b, 40), MAX_DWZ_SEGMENTS as u32, "max_discard_seg");
        assert_eq!(u32_at(&b, 44), 128, "discard_sector_alignment: one cluster");
        assert_eq!(u32_at(&b, 48), 1 << 21, "max_write_zeroes_sectors");
        assert_eq!(
            u32_at(&b, 52),
            MAX_DWZ_SEGMENTS as u32,
            "max_write_zeroes_seg"
        );
        assert_eq!(b[56], 1, "write_zeroes_may_unmap");
        assert!(b[57..96].iter().all(|&x| x == 0));

        let wt = BlkConfig::new(10 << 30, 4, 2 << 20, false, false).read(0, 96);
        assert_eq!(wt[32], 0, "write-through");
        assert_eq!(u32_at(&wt, 44), 4096, "2 MiB clusters");
        // 1 GiB is a whole number of the largest clusters.
        assert_eq!(MAX_DWZ_SECTORS % 4096, 0);
        let tiny = BlkConfig::new(1 << 20, 1, 512, false, true).read(0, 96);
        assert_eq!(u32_at(&tiny, 44), 1);
    }

    #[test]
    fn writeback_byte_is_the_only_writable_one() {
        assert_eq!(writeback_written(32, &[0]), Some(false));
        assert_eq!(writeback_written(32, &[1]), Some(true));
        assert_eq!(writeback_written(32, &[7]), Some(true));
        // A wider write that covers byte 32: only that byte counts.
        let mut buf = [0xffu8; 8];
        buf[2] = 0;
        assert_eq!(writeback_written(30, &buf), Some(false));
        // Writes elsewhere are ignored.
        assert_eq!(writeback_written(0, &[1; 32]), None);
        assert_eq!(writeback_written(33, &[1]), None);
        assert_eq!(writeback_written(36, &[1; 4]), None);
        assert_eq!(writeback_written(32, &[]), None);
        assert_eq!(writeback_written(u32::MAX, &[1]), None);
    }

    #[test]
    fn config_read_honours_offset_and_size() {
        let cfg = BlkConfig::new(1 << 20, 4, 65536, true, false);
        let all = cfg.read(0, CONFIG_SIZE as u32);
        assert_eq!(cfg.read(34, 2), all[34..36].to_vec());
        assert_eq!(cfg.read(20, 4), 512u32.to_le_bytes().to_vec());
        // Past the end: zero-filled, exact size.
        let tail = cfg.read(90, 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(&tail[..6], &all[90..96]);
        assert!(tail[6..].iter().all(|&b| b == 0));
        assert_eq!(cfg.read(200, 8), vec![0; 8]);
        // Out of any valid range: no panic, empty answer.
        assert!(cfg.read(u32::MAX, 16).is_empty());
        assert!(cfg.read(0, u32::MAX).is_empty());
        assert!(cfg.read(4000, 200).is_empty());
    }

    #[test]
    fn header_parsing() {
        let mut raw = [0u8; OUTHDR_SIZE];
        raw[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        raw[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        raw[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        let h = RequestHeader::parse(&raw);
        assert_eq!(h.request_type, RequestType::In);
        assert_eq!(h.sector, 0x0102_0304_0506_0708);

        for (t, want) in [
            (VIRTIO_BLK_T_OUT, RequestType::Out),
            (VIRTIO_BLK_T_FLUSH, RequestType::Flush),
            (VIRTIO_BLK_T_GET_ID, RequestType::GetId),
            (11, RequestType::Discard),
            (13, RequestType::WriteZeroes),
            (12, RequestType::Other(12)),
            (14, RequestType::Other(14)),
        ] {
            raw[0..4].copy_from_slice(&t.to_le_bytes());
            assert_eq!(RequestHeader::parse(&raw).request_type, want);
        }
    }

    #[test]
    fn dwz_segment_parsing_and_flags() {
        let mut raw = [0u8; DWZ_SEGMENT_SIZE];
        raw[0..8].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        raw[8..12].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        raw[12..16].copy_from_slice(&1u32.to_le_bytes());
        let seg = DwzSegment::parse(&raw);
        assert_eq!(
            seg,
            DwzSegment {
                sector: 0x0102_0304_0506_0708,
                num_sectors: 0x1234_5678,
                flags: 1
            }
        );
        assert!(seg.unmap());
        // Unmap is valid for write zeroes only.
        assert!(seg.flags_supported(RequestType::WriteZeroes));
        assert!(!seg.flags_supported(RequestType::Discard));
        let plain = DwzSegment { flags: 0, ..seg };
        assert!(!plain.unmap());
        assert!(plain.flags_supported(RequestType::WriteZeroes));
        assert!(plain.flags_supported(RequestType::Discard));
        // Reserved bits: unsupported for both.
        for flags in [2, 1 << 31, 3] {
            let bad = DwzSegment { flags, ..seg };
            assert!(!bad.flags_supported(RequestType::WriteZeroes), "{flags:#x}");
            assert!(!bad.flags_supported(RequestType::Discard), "{flags:#x}");
        }
    }

    #[test]
    fn features_of_read_only_and_writable_exports() {
        let ro = device_features(true);
        let rw = device_features(false);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(ro & (1 << bit), 0, "bit {bit}");
            assert_ne!(rw & (1 << bit), 0, "bit {bit}");
        }
        for bit in [
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_CONFIG_WCE,
        ] {
            assert_eq!(ro & (1 << bit), 0, "bit {bit} on a read-only export");
            assert_ne!(rw & (1 << bit), 0, "bit {bit} missing on a writable export");
        }
        // The spec's bit numbers.
        assert_eq!(
            (
                VIRTIO_BLK_F_CONFIG_WCE,
                VIRTIO_BLK_F_DISCARD,
                VIRTIO_BLK_F_WRITE_ZEROES
            ),
            (11, 13, 14)
        );
    }
}
