//! QCOW2 headers as bytes (all big endian): field offsets, reading and patching fields,
//! header extensions, backing names, L2 entries and compressed extents, feature bits. For the
//! bad-image tests, which damage files on purpose.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;

    pub const EXT_END: u32 = 0;
    pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
    pub const EXT_DATA_FILE: u32 = 0x4441_5441;

    pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

    pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    pub const L2E_COMPRESSED: u64 = 1 << 62;
}

pub fn read_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off)
        .unwrap_or_else(|e| panic!("read {len} bytes at {off} of {}: {e}", path.display()));
    v
}

pub fn write_bytes(path: &Path, off: u64, data: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write at {off} of {}: {e}", path.display()));
}

pub fn be32(path: &Path, off: u64) -> u32 {
    u32::from_be_bytes(read_bytes(path, off, 4).try_into().unwrap())
}

pub fn be64(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_bytes(path, off, 8).try_into().unwrap())
}

pub fn set_be32(path: &Path, off: u64, v: u32) {
    write_bytes(path, off, &v.to_be_bytes());
}

pub fn set_be64(path: &Path, off: u64, v: u64) {
    write_bytes(path, off, &v.to_be_bytes());
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

pub fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

/// One header extension: its type, the file offset of its 8-byte type/length header, and the
/// length of its data.
#[derive(Clone, Copy, Debug)]
pub struct HeaderExt {
    pub ty: u32,
    pub at: u64,
    pub len: u32,
}

impl HeaderExt {
    pub fn data_at(&self) -> u64 {
        self.at + 8
    }
}

/// The header extensions of a qcow2 file, up to the end marker.
pub fn header_extensions(path: &Path) -> Vec<HeaderExt> {
    let version = be32(path, hdr::VERSION);
    let cluster = 1u64 << be32(path, hdr::CLUSTER_BITS);
    let mut at = if version >= 3 {
        u64::from(be32(path, hdr::HEADER_LENGTH))
    } else {
        72
    };
    let mut v = Vec::new();
    while at + 8 <= cluster {
        let ty = be32(path, at);
        let len = be32(path, at + 4);
        if ty == hdr::EXT_END {
            break;
        }
        v.push(HeaderExt { ty, at, len });
        at += 8 + u64::from(len).div_ceil(8) * 8;
    }
    v
}

/// Removes one header extension, moving the ones after it forward (the backing file name,
/// which follows the extensions, stays where it is).
pub fn remove_header_extension(path: &Path, ty: u32) {
    let exts = header_extensions(path);
    let i = exts
        .iter()
        .position(|e| e.ty == ty)
        .unwrap_or_else(|| panic!("{} has no header extension {ty:#x}", path.display()));
    let start = exts[i].at;
    let next = start + 8 + u64::from(exts[i].len).div_ceil(8) * 8;
    let end = exts
        .last()
        .map(|e| e.at + 8 + u64::from(e.len).div_ceil(8) * 8)
        .unwrap();
    let tail = read_bytes(path, next, (end - next) as usize);
    write_bytes(path, start, &tail);
    // End marker and zero fill over what moved.
    let gap = (end - start) as usize - tail.len();
    write_bytes(path, start + tail.len() as u64, &vec![0u8; gap.max(8)]);
}

/// Rewrites the backing file name in place (the new name must not be longer).
pub fn set_backing_name(path: &Path, name: &str) {
    let off = be64(path, hdr::BACKING_FILE_OFFSET);
    let old = be32(path, hdr::BACKING_FILE_SIZE) as usize;
    assert!(off != 0, "{} has no backing file", path.display());
    assert!(
        name.len() <= old,
        "new backing name {name:?} longer than the old one ({old} bytes)"
    );
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize(old, 0);
    write_bytes(path, off, &bytes);
    set_be32(path, hdr::BACKING_FILE_SIZE, name.len() as u32);
}

/// Where the L2 entry for `guest_off` lives: (file offset of the entry, the entry's first 64
/// bits), or `None` when the L1 entry is empty.
pub fn l2_entry(path: &Path, guest_off: u64) -> Option<(u64, u64)> {
    let cluster_bits = be32(path, hdr::CLUSTER_BITS) as u64;
    let version = be32(path, hdr::VERSION);
    let extended =
        version >= 3 && be64(path, hdr::INCOMPATIBLE_FEATURES) & hdr::INCOMPAT_EXTENDED_L2 != 0;
    let entry_size = if extended { 16 } else { 8 };
    let l2_entries = (1u64 << cluster_bits) / entry_size;
    let cluster = guest_off >> cluster_bits;
    let l1_index = cluster / l2_entries;
    let l2_index = cluster % l2_entries;
    let l1_off = be64(path, hdr::L1_TABLE_OFFSET);
    let l1e = be64(path, l1_off + 8 * l1_index);
    let l2_off = l1e & hdr::L1E_OFFSET_MASK;
    if l2_off == 0 {
        return None;
    }
    let at = l2_off + entry_size * l2_index;
    Some((at, be64(path, at)))
}

/// A compressed cluster: guest offset, host offset of the extent, and its length bound.
#[derive(Clone, Copy, Debug)]
pub struct CompressedExtent {
    pub guest_off: u64,
    pub host_off: u64,
    pub len: u64,
}

/// Decodes a compressed-cluster descriptor (see the qcow2 spec).
pub fn compressed_extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let host = entry & ((1u64 << x) - 1);
    let sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
    let len = (sectors + 1) * 512 - (host & 511);
    (host, len)
}

/// The compressed clusters of an image (walks L1 and L2).
pub fn compressed_clusters(path: &Path) -> Vec<CompressedExtent> {
    let cluster_bits = be32(path, hdr::CLUSTER_BITS);
    let size = be64(path, hdr::SIZE);
    let cluster = 1u64 << cluster_bits;
    let mut v = Vec::new();
    let mut g = 0;
    while g < size {
        if let Some((_, e)) = l2_entry(path, g) {
            if e & hdr::L2E_COMPRESSED != 0 {
                let (host_off, len) = compressed_extent(e, cluster_bits);
                v.push(CompressedExtent {
                    guest_off: g,
                    host_off,
                    len,
                });
            }
        }
        g += cluster;
    }
    v
}

/// The incompatible feature bits of a qcow2 file (version 2 has none).
pub fn incompatible_features(img: &Path) -> u64 {
    if be32(img, hdr::VERSION) >= 3 {
        be64(img, hdr::INCOMPATIBLE_FEATURES)
    } else {
        0
    }
}

/// Incompatible feature bit 0 (dirty: refcounts may be stale) as stored in the file.
pub fn dirty_bit(img: &Path) -> bool {
    incompatible_features(img) & 1 != 0
}

/// Incompatible feature bit 1 (corrupt) as stored in the file.
pub fn corrupt_bit(img: &Path) -> bool {
    incompatible_features(img) & 2 != 0
}
