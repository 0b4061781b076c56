//! The planner: what a guest range reads as, given one layer's L2 table.
//!
//! [`resolve`] looks at the L2 entries covering the start of a range and returns one [`Step`]
//! for the longest prefix that reads the same way: zeros, the next layer down, contiguous host
//! data, or one compressed cluster. The shard splits the range there and plans the rest later.

use crate::format::{be64_at, ClusterMapping, CompressedDescriptor, L2Entry, SubclusterState};

/// Layout facts of one qcow2 layer the planner needs.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
    /// Guest data lives in an external data file (no compression allowed there).
    pub has_data_file: bool,
    /// A version 2 image, where an L2 entry with the zero flag is corruption (as in QEMU).
    pub version2: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Allocation granularity: a subcluster on extended-L2 images, else a cluster.
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes() * self.cluster_size()
    }
}

/// What a prefix of a guest range reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Zeros.
    Zero,
    /// Whatever the next layer down reads (zeros when there is none).
    Backing,
    /// Host data starting at this offset, contiguous for the whole prefix.
    Data {
        /// Host offset of the first byte.
        host: u64,
    },
    /// Part of one compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Decodes the L2 entry at `index` of `table`.
fn entry(geom: &Geometry, table: &[u8], index: usize) -> Result<L2Entry, &'static str> {
    let at = index * geom.l2_entry_bytes() as usize;
    let raw = be64_at(table, at);
    let bitmap = geom.extended_l2.then(|| be64_at(table, at + 8));
    let e = L2Entry::decode(raw, bitmap, geom.cluster_bits, geom.has_data_file)?;
    if geom.version2 && matches!(e.mapping, ClusterMapping::Zero { .. }) {
        return Err("zero cluster entry in a version 2 image");
    }
    Ok(e)
}

/// What the byte at `guest_off` reads as, as a step starting there.
fn step_at(geom: &Geometry, table: &[u8], guest_off: u64) -> Result<Step, &'static str> {
    let cs = geom.cluster_size();
    let index = ((guest_off % geom.l2_coverage()) / cs) as usize;
    let e = entry(geom, table, index)?;
    let in_cluster = guest_off % cs;
    let sc = (in_cluster / geom.subcluster_size()) as u32;
    Ok(match e.subcluster(sc) {
        SubclusterState::Unallocated => Step::Backing,
        SubclusterState::Zero => Step::Zero,
        SubclusterState::Data { cluster_host } => Step::Data {
            host: cluster_host + in_cluster,
        },
        SubclusterState::Compressed(d) => {
            if geom.has_data_file {
                return Err("compressed cluster in an image with an external data file");
            }
            Step::Compressed(d)
        }
    })
}

/// Resolves the longest prefix of `guest_off..guest_off + len` that reads as one [`Step`].
///
/// `table` is the L2 table covering `guest_off`; the range must not cross its end. Returns the
/// step and the prefix length (at least 1 byte, at most `len`). `Err` names the corruption.
pub fn resolve(
    geom: &Geometry,
    table: &[u8],
    guest_off: u64,
    len: u64,
) -> Result<(Step, u64), &'static str> {
    debug_assert!(len > 0);
    let first = step_at(geom, table, guest_off)?;
    let gran = geom.subcluster_size();
    let end = guest_off + len;
    let mut run_end = ((guest_off / gran + 1) * gran).min(end);
    // A compressed cluster is one unit: never merge it with the next.
    let cluster_end = (guest_off / geom.cluster_size() + 1) * geom.cluster_size();
    while run_end < end {
        let next = step_at(geom, table, run_end)?;
        let continues = match (first, next) {
            (Step::Zero, Step::Zero) | (Step::Backing, Step::Backing) => true,
            (Step::Data { host: a }, Step::Data { host: b }) => b == a + (run_end - guest_off),
            (Step::Compressed(_), Step::Compressed(_)) => run_end < cluster_end,
            _ => false,
        };
        if !continues {
            break;
        }
        run_end = (run_end + gran).min(end);
    }
    Ok((first, run_end - guest_off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(u64, u64)], extended: bool) -> Vec<u8> {
        let mut t = Vec::new();
        for &(raw, bm) in entries {
            t.extend_from_slice(&raw.to_be_bytes());
            if extended {
                t.extend_from_slice(&bm.to_be_bytes());
            }
        }
        t.resize(65536, 0);
        t
    }

    const STD: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
        has_data_file: false,
        version2: false,
    };

    #[test]
    fn zero_entries_are_corrupt_in_version_2() {
        let t = table(&[(1, 0)], false);
        assert_eq!(resolve(&STD, &t, 0, 4096).map(|r| r.0), Ok(Step::Zero));
        let v2 = Geometry {
            version2: true,
            ..STD
        };
        assert!(resolve(&v2, &t, 0, 4096).is_err());
    }

    #[test]
    fn merges_contiguous_data_and_stops_at_a_gap() {
        let t = table(&[(0x10000, 0), (0x20000, 0), (0x40000, 0)], false);
        let (s, n) = resolve(&STD, &t, 0x800, 0x30000).unwrap();
        assert_eq!(s, Step::Data { host: 0x10800 });
        assert_eq!(n, 0x20000 - 0x800);
        let (s, n) = resolve(&STD, &t, 0x20000, 0x10000).unwrap();
        assert_eq!(s, Step::Data { host: 0x40000 });
        assert_eq!(n, 0x10000);
    }

    #[test]
    fn zero_and_unallocated_runs() {
        let t = table(&[(1, 0), (1, 0), (0, 0)], false);
        assert_eq!(
            resolve(&STD, &t, 0, 0x30000).unwrap(),
            (Step::Zero, 0x20000)
        );
        assert_eq!(
            resolve(&STD, &t, 0x20000, 0x30000).unwrap(),
            (Step::Backing, 0x30000)
        );
    }

    #[test]
    fn compressed_is_one_cluster() {
        let c = (1u64 << 62) | 0x12345;
        let t = table(&[(c, 0), (c, 0)], false);
        let (s, n) = resolve(&STD, &t, 0x1000, 0x20000).unwrap();
        assert!(matches!(s, Step::Compressed(_)));
        assert_eq!(n, 0xf000);
    }

    #[test]
    fn extended_subcluster_runs() {
        let g = Geometry {
            extended_l2: true,
            ..STD
        };
        // Subclusters of 2 KiB: 0-1 allocated, 2 zero, rest unallocated.
        let t = table(&[(0x10000, 0b11 | (0b100 << 32))], true);
        assert_eq!(
            resolve(&g, &t, 0, 0x10000).unwrap(),
            (Step::Data { host: 0x10000 }, 0x1000)
        );
        assert_eq!(
            resolve(&g, &t, 0x1000, 0x10000).unwrap(),
            (Step::Zero, 0x800)
        );
        assert_eq!(
            resolve(&g, &t, 0x1800, 0x800 * 29).unwrap(),
            (Step::Backing, 0x800 * 29)
        );
        let bad = table(&[(0x10000, 1 | (1 << 32))], true);
        assert!(resolve(&g, &bad, 0, 512).is_err());
    }
}
