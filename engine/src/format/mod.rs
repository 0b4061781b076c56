//! Pure parsing and encoding of QCOW2 on-disk structures: header, header extensions, L1/L2
//! entries, compressed-cluster descriptors and their decompression, refcount blocks and table
//! entries, the snapshot table, the bitmap directory and bitmap tables.
//!
//! Nothing here performs I/O or holds state; every function takes bytes and returns values or a
//! [`FormatError`]. Callers on any thread may use it. All integers on disk are big endian.
#![forbid(unsafe_code)]

mod bitmap;
mod compress;
mod entry;
mod header;
mod refcount;
mod snapshot;

pub use bitmap::{
    bitmap_directory, decode_bitmap_table_entry, BitmapDirEntry, BrokenBitmapDirectory,
    BITMAP_DIR_ENTRY_BYTES, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_TABLE_ENTRIES,
};
pub use compress::{inflate_cluster, InflateError, Inflater};
pub use entry::{
    decode_l1_entry, encode_l1_entry, encode_l2_entry, l1_entry_copied, mask, ClusterMapping,
    CompressedDescriptor, L2Entry, SubclusterState,
};
pub use header::{
    field, CompressionType, Extension, FeatureKind, FeatureName, Header, BACKING_FORMAT_EXT,
    BITMAPS_EXT, CRYPTO_EXT, DATA_FILE_EXT, FEATURE_NAME_TABLE_EXT, MAGIC, REFCOUNT_TABLE_FIELDS,
};
pub use refcount::{
    refcount_get, refcount_max, refcount_set, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};
pub use snapshot::{
    check_table as check_snapshot_table, encode_table as encode_snapshot_table,
    read_table as read_snapshot_table, SnapshotEntry, SnapshotReadError, SnapshotTable,
    MAX_SNAPSHOT_EXTRA_BYTES, MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_HEADER_BYTES,
    SNAPSHOT_KNOWN_EXTRA_BYTES,
};

use thiserror::Error;

/// Largest cluster size QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster size QEMU accepts (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME_BYTES: u32 = 1023;
/// Most internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest virtual disk QEMU accepts (2^63 - 512 bytes, rounded as QEMU does: 2 EiB).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// The compression type field is non-zero.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this engine understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit the format defines.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// A structure on disk that cannot be accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// The header is shorter than its fixed part.
    #[error("File too short for a QCOW2 header ({len} bytes)")]
    Truncated {
        /// How many bytes were available.
        len: usize,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("Not a QCOW2 image (bad magic {magic:#010x})")]
    BadMagic {
        /// The magic that was found.
        magic: u32,
    },
    /// A version other than 2 or 3.
    #[error("Unsupported QCOW2 version {0}")]
    UnsupportedVersion(u32),
    /// A header field is out of the range the format or QEMU allows.
    #[error("Invalid header field {field}: {reason}")]
    InvalidField {
        /// The field's name in the specification.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The image needs incompatible features this engine does not implement.
    #[error("Unsupported incompatible feature(s): {names}")]
    UnsupportedFeature {
        /// The features' names, from the image's feature name table when it has one.
        names: String,
    },
    /// The image is encrypted.
    #[error("Encrypted images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// A header extension is malformed.
    #[error("Invalid header extension {ext_type:#010x} at byte {offset}: {reason}")]
    InvalidExtension {
        /// The extension's type.
        ext_type: u32,
        /// Its byte offset in the file.
        offset: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Reads a big-endian u32 at `at`; the caller has checked the bounds.
pub(crate) fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Reads a big-endian u64 at `at`; the caller has checked the bounds.
pub fn be64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}
