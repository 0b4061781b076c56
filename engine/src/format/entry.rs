//! L1 and L2 table entries, decoded into enums.
//!
//! An L2 entry (64-bit standard or 128-bit extended) is decoded into a [`L2Entry`] once; the
//! planner then asks it what one subcluster maps to ([`SubclusterState`]). Invalid combinations
//! of bits are reported as corruption, never guessed at.

/// The bits of L1 and L2 entries, for code that inspects raw entries (the checker, which
/// reports what the decoders below ignore).
pub mod mask {
    /// Host offset in L1 entries and in L2 entries of standard clusters (bits 9..=55).
    pub const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    /// Bit 63: the refcount is exactly one (COPIED), in L1 and L2 entries.
    pub const COPIED: u64 = 1 << 63;
    /// Bit 62 of an L2 entry: the cluster is compressed.
    pub const COMPRESSED: u64 = 1 << 62;
    /// Bit 0 of a standard L2 entry: the cluster reads as zeros.
    pub const ZERO: u64 = 1;
    /// Bits of an L1 entry that must be zero.
    pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
    /// Bits of a standard (not compressed) L2 entry that must be zero, bit 0 aside (the zero
    /// flag; reserved with extended L2 entries, where QEMU's check does not report it).
    pub const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
}

use mask::{COMPRESSED, COPIED, OFFSET as OFFSET_MASK, ZERO};

/// Decodes an L1 entry into the host offset of its L2 table (`None` when unallocated).
///
/// Reserved bits are ignored, as QEMU's read path ignores them (`qemu-img check` reports them).
/// Returns `Err` with a reason when the offset is not cluster aligned.
pub fn decode_l1_entry(raw: u64, cluster_size: u64) -> Result<Option<u64>, &'static str> {
    let off = raw & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if !off.is_multiple_of(cluster_size) {
        return Err("L2 table offset not cluster aligned");
    }
    Ok(Some(off))
}

/// Where a compressed cluster's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed stream (not aligned).
    pub host_offset: u64,
    /// Upper bound of the stream's length in bytes; the extent may end before it at EOF.
    pub max_len: u64,
}

impl CompressedDescriptor {
    /// Decodes the low 62 bits of a compressed L2 entry.
    pub fn decode(raw: u64, cluster_bits: u32) -> CompressedDescriptor {
        let x = 62 - (cluster_bits - 8);
        let host_offset = raw & ((1u64 << x) - 1);
        let sectors = (raw >> x) & ((1u64 << (62 - x)) - 1);
        CompressedDescriptor {
            host_offset,
            max_len: (sectors + 1) * 512 - (host_offset & 511),
        }
    }
}

/// What a whole cluster maps to, from the first 64 bits of its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not allocated in this image.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster when non-zero.
    Zero {
        /// Host offset of the preallocated cluster, if any.
        host: Option<u64>,
    },
    /// Allocated at this host offset (cluster aligned).
    Normal {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Compressed.
    Compressed(CompressedDescriptor),
}

/// A decoded L2 entry: the cluster mapping and, for extended L2 entries, the subcluster bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Entry {
    /// The cluster-level mapping.
    pub mapping: ClusterMapping,
    /// Subcluster bitmap (extended L2 only): bits 0..31 allocated, 32..63 reads as zero.
    pub bitmap: Option<u64>,
    /// The COPIED flag (refcount is exactly one).
    pub copied: bool,
}

/// What one subcluster (or, on standard images, one cluster) reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubclusterState {
    /// Read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at this host offset of the subcluster's start.
    Data {
        /// Host offset of the cluster (not the subcluster).
        cluster_host: u64,
    },
    /// Compressed cluster.
    Compressed(CompressedDescriptor),
}

impl L2Entry {
    /// Decodes a standard (64-bit) or extended (`bitmap` = second word) L2 entry.
    ///
    /// `external_data` says the image keeps guest data in an external data file, where host
    /// offset 0 with the COPIED flag is a valid allocated cluster. `Err` carries the reason for
    /// corruption.
    pub fn decode(
        raw: u64,
        bitmap: Option<u64>,
        cluster_bits: u32,
        external_data: bool,
    ) -> Result<L2Entry, &'static str> {
        let cluster_size = 1u64 << cluster_bits;
        let copied = raw & COPIED != 0;
        if raw & COMPRESSED != 0 {
            let desc = CompressedDescriptor::decode(raw & !(COPIED | COMPRESSED), cluster_bits);
            if desc.host_offset == 0 {
                return Err("compressed cluster at host offset 0");
            }
            return Ok(L2Entry {
                mapping: ClusterMapping::Compressed(desc),
                bitmap,
                copied,
            });
        }
        // Reserved bits are ignored, as in QEMU's read path; with extended entries bit 0 is
        // reserved too.
        let extended = bitmap.is_some();
        let host = raw & OFFSET_MASK;
        if !host.is_multiple_of(cluster_size) {
            return Err("data cluster offset not cluster aligned");
        }
        let allocated = host != 0 || (external_data && copied);
        let mapping = if !extended && raw & ZERO != 0 {
            ClusterMapping::Zero {
                host: allocated.then_some(host),
            }
        } else if !allocated {
            ClusterMapping::Unallocated
        } else {
            ClusterMapping::Normal { host }
        };
        if let Some(bm) = bitmap {
            let alloc = bm & 0xffff_ffff;
            let zero = bm >> 32;
            if alloc & zero != 0 {
                return Err("subcluster both allocated and zero");
            }
            if !allocated && alloc != 0 {
                return Err("allocated subclusters in an unallocated cluster");
            }
        }
        Ok(L2Entry {
            mapping,
            bitmap,
            copied,
        })
    }

    /// What subcluster `index` (0..32; always 0 on standard images) reads as.
    pub fn subcluster(&self, index: u32) -> SubclusterState {
        match (self.mapping, self.bitmap) {
            (ClusterMapping::Compressed(d), _) => SubclusterState::Compressed(d),
            (ClusterMapping::Unallocated, None) => SubclusterState::Unallocated,
            (ClusterMapping::Zero { .. }, _) => SubclusterState::Zero,
            (ClusterMapping::Normal { host }, None) => SubclusterState::Data { cluster_host: host },
            (mapping, Some(bm)) => {
                if bm & (1u64 << (32 + index)) != 0 {
                    SubclusterState::Zero
                } else if bm & (1u64 << index) != 0 {
                    match mapping {
                        ClusterMapping::Normal { host } => {
                            SubclusterState::Data { cluster_host: host }
                        }
                        // decode() refuses allocated subclusters without a host cluster.
                        _ => SubclusterState::Unallocated,
                    }
                } else {
                    SubclusterState::Unallocated
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_from_design_notes() {
        let e = L2Entry::decode(0x4AC0_0000_003D_9750, None, 16, false).unwrap();
        let ClusterMapping::Compressed(d) = e.mapping else {
            panic!("not compressed: {e:?}");
        };
        assert_eq!(d.host_offset, 0x3D9750);
        assert_eq!(d.max_len, 22192);
        assert_eq!(d.host_offset + d.max_len, 0x3DEE00);
    }

    #[test]
    fn standard_entries() {
        assert_eq!(
            L2Entry::decode(0, None, 16, false).unwrap().mapping,
            ClusterMapping::Unallocated
        );
        assert_eq!(
            L2Entry::decode(1, None, 16, false).unwrap().mapping,
            ClusterMapping::Zero { host: None }
        );
        assert_eq!(
            L2Entry::decode(COPIED | 0x50000 | 1, None, 16, false)
                .unwrap()
                .mapping,
            ClusterMapping::Zero {
                host: Some(0x50000)
            }
        );
        let e = L2Entry::decode(COPIED | 0x50000, None, 16, false).unwrap();
        assert_eq!(e.mapping, ClusterMapping::Normal { host: 0x50000 });
        assert!(e.copied);
        assert!(L2Entry::decode(0x50200, None, 16, false).is_err());
    }

    #[test]
    fn external_data_cluster_at_offset_zero() {
        let e = L2Entry::decode(COPIED, None, 16, true).unwrap();
        assert_eq!(e.mapping, ClusterMapping::Normal { host: 0 });
        assert_eq!(
            L2Entry::decode(COPIED, None, 16, false).unwrap().mapping,
            ClusterMapping::Unallocated
        );
        assert_eq!(
            L2Entry::decode(0, None, 16, true).unwrap().mapping,
            ClusterMapping::Unallocated
        );
    }

    #[test]
    fn extended_entries() {
        // Subcluster 0 allocated, 1 zero, 2 unallocated.
        let e = L2Entry::decode(0x50000, Some(1 | (1 << 33)), 16, false).unwrap();
        assert_eq!(
            e.subcluster(0),
            SubclusterState::Data {
                cluster_host: 0x50000
            }
        );
        assert_eq!(e.subcluster(1), SubclusterState::Zero);
        assert_eq!(e.subcluster(2), SubclusterState::Unallocated);
        // Allocated and zero at once.
        assert!(L2Entry::decode(0x50000, Some(1 | (1 << 32)), 16, false).is_err());
        // Allocated without a host cluster.
        assert!(L2Entry::decode(0, Some(1), 16, false).is_err());
        // Zero subclusters without a host cluster are fine.
        let e = L2Entry::decode(0, Some(1 << 40), 16, false).unwrap();
        assert_eq!(e.subcluster(8), SubclusterState::Zero);
        assert_eq!(e.subcluster(7), SubclusterState::Unallocated);
        // Bit 0 is not a zero flag with extended entries.
        let e = L2Entry::decode(0x50000 | 1, Some(1), 16, false).unwrap();
        assert_eq!(
            e.subcluster(0),
            SubclusterState::Data {
                cluster_host: 0x50000
            }
        );
    }

    #[test]
    fn l1_entries() {
        assert_eq!(decode_l1_entry(0, 65536), Ok(None));
        assert_eq!(decode_l1_entry(COPIED | 0x30000, 65536), Ok(Some(0x30000)));
        assert!(decode_l1_entry(0x30200, 65536).is_err());
    }
}

/// Encodes an L1 entry pointing at an L2 table whose refcount is exactly one.
pub fn encode_l1_entry(l2_host: u64) -> u64 {
    debug_assert_eq!(l2_host & !OFFSET_MASK, 0);
    l2_host | COPIED
}

/// Whether an L1 entry's COPIED flag is set (its L2 table may be written in place).
pub fn l1_entry_copied(raw: u64) -> bool {
    raw & COPIED != 0
}

/// Encodes the first word of a standard or extended L2 entry for an uncompressed cluster.
///
/// `zero` sets the all-zeros flag; it must be false for extended entries, whose zero state
/// lives in the bitmap.
pub fn encode_l2_entry(host: Option<u64>, zero: bool, copied: bool) -> u64 {
    let mut raw = host.unwrap_or(0);
    debug_assert_eq!(raw & !OFFSET_MASK, 0);
    if zero {
        raw |= ZERO;
    }
    if copied && host.is_some() {
        raw |= COPIED;
    }
    raw
}

impl CompressedDescriptor {
    /// The host byte range QEMU counts as used by this compressed cluster: from the sector
    /// holding its first byte, for the number of sectors in the descriptor. Every host
    /// cluster this range touches holds one reference for it.
    pub fn host_range(&self) -> (u64, u64) {
        let start = self.host_offset & !511;
        (start, self.max_len + (self.host_offset & 511))
    }
}

#[cfg(test)]
mod encode_tests {
    use super::*;

    #[test]
    fn encode_round_trips_through_decode() {
        let raw = encode_l2_entry(Some(0x70000), false, true);
        let e = L2Entry::decode(raw, None, 16, false).unwrap();
        assert_eq!(e.mapping, ClusterMapping::Normal { host: 0x70000 });
        assert!(e.copied);
        let raw = encode_l2_entry(None, true, false);
        assert_eq!(
            L2Entry::decode(raw, None, 16, false).unwrap().mapping,
            ClusterMapping::Zero { host: None }
        );
        assert_eq!(
            decode_l1_entry(encode_l1_entry(0x30000), 65536),
            Ok(Some(0x30000))
        );
        assert!(l1_entry_copied(encode_l1_entry(0x30000)));
    }

    #[test]
    fn compressed_host_range_covers_whole_sectors() {
        let d = CompressedDescriptor::decode(0x2B << 54 | 0x3D9750, 16);
        assert_eq!(d.host_range(), (0x3D9600, 44 * 512));
    }
}
