//! The walk of the guest-visible tables, part of a check's counting pass: the L1 tables of
//! the active state and of every internal snapshot, their L2 tables, and what each L2 entry
//! points at. Entries are classified as QEMU's `qcow2_get_cluster_type` does and checked as
//! its `qcow2_check_refcounts` does (reserved bits, alignment, subcluster bitmaps, compressed
//! clusters where they are not allowed); every host cluster they reference is counted through
//! [`Analysis::inc`]. [`super::walk`] owns the pass and the array it counts into. It runs on
//! the thread that called [`super::check`].
#![forbid(unsafe_code)]

use std::fmt;

use super::walk::{all_zero, Analysis, Geo, SNAPSHOT_TABLE};
use super::{zeroed, Target};
use crate::error::Error;
use crate::format::mask::{self, COMPRESSED, COPIED, ZERO};
use crate::format::{
    be64_at, CompressedDescriptor, L2Entry, SnapshotTable, MAX_L1_BYTES, SNAPSHOT_KNOWN_EXTRA_BYTES,
};

/// Bytes of a table [`for_each_entry`] reads at a time.
const TABLE_WINDOW: u64 = 256 << 10;

/// Bytes of entries [`for_each_entry`] compares with zeros at once.
const ZERO_RUN: usize = 512;

/// Calls `f` with the index and value of every non-zero entry of the table of `len` bytes
/// (whole 8-byte entries) at `off`, in order. The table is read [`TABLE_WINDOW`] bytes at a
/// time, up to the last entry the file holds any byte of (past the end of the file entries
/// read as zeros, and a zero entry names nothing), and runs of entries are compared with
/// zeros as a whole before any is looked at: a huge sparse image's L1 table (or a damaged
/// header's, up to 32 MiB) is mostly zeros, and a check walks it once per analysis.
pub(super) fn for_each_entry(
    t: &mut Target,
    off: u64,
    len: u64,
    what: &dyn fmt::Display,
    mut f: impl FnMut(&mut Target, usize, u64) -> Result<(), Error>,
) -> Result<(), Error> {
    let held = t
        .len()?
        .saturating_sub(off)
        .min(len)
        .next_multiple_of(8)
        .min(len);
    let mut window = zeroed(held.min(TABLE_WINDOW), &t.path)?;
    let mut done = 0u64;
    while done < held {
        let n = (held - done).min(TABLE_WINDOW) as usize;
        let buf = &mut window[..n];
        // `off + done` lies inside the file: no overflow.
        t.read_named(off + done, buf, what)?;
        let first = (done / 8) as usize;
        for (r, run) in buf.chunks(ZERO_RUN).enumerate() {
            if all_zero(run) {
                continue;
            }
            for (k, e) in run.chunks_exact(8).enumerate() {
                let raw = be64_at(e, 0);
                if raw != 0 {
                    f(t, first + r * (ZERO_RUN / 8) + k, raw)?;
                }
            }
        }
        done += n as u64;
    }
    Ok(())
}

/// The byte ranges of a table of `len` bytes, [`ZERO_RUN`] bytes each (whole entries: a
/// cluster holds whole runs), that a walk compares with zeros before it looks at any of
/// their entries: an entry that is all zeros names nothing, and a zero run is skipped.
pub(super) fn runs(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len)
        .step_by(ZERO_RUN)
        .map(move |at| at..(at + ZERO_RUN).min(len))
}

/// How the L2 tables at one host offset are referenced.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct L2Use {
    /// L1 entries (active and snapshots) pointing at it.
    pub(super) refs: u64,
    /// Whether the active L1 table points at it.
    pub(super) active: bool,
}

/// What an L2 entry is, classified as QEMU's `qcow2_get_cluster_type` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Compressed,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    Unallocated,
    /// A host cluster (data, or preallocated zeros) at this offset; 0 only in the external
    /// data file.
    Alloc(u64),
}

pub(super) fn classify(raw: u64, g: &Geo) -> Kind {
    if raw & COMPRESSED != 0 {
        return Kind::Compressed;
    }
    let off = raw & mask::OFFSET;
    if !g.extended && raw & ZERO != 0 {
        if off != 0 {
            Kind::Alloc(off)
        } else {
            Kind::ZeroPlain
        }
    } else if off == 0 {
        if g.data_file && raw & COPIED != 0 {
            Kind::Alloc(0)
        } else {
            Kind::Unallocated
        }
    } else {
        Kind::Alloc(off)
    }
}

/// A snapshot as messages name it: "snapshot ID (NAME)".
struct SnapshotLabel<'a>(&'a crate::format::SnapshotEntry);

impl fmt::Display for SnapshotLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot {} ({})",
            String::from_utf8_lossy(&self.0.id),
            String::from_utf8_lossy(&self.0.name)
        )
    }
}

/// A name after a prefix, formatted only when shown.
struct Prefixed<'a>(&'static str, &'a dyn fmt::Display);

impl fmt::Display for Prefixed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}

/// A name followed by a suffix, formatted only when shown.
struct Suffixed<'a>(&'a dyn fmt::Display, &'static str);

impl fmt::Display for Suffixed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}

impl Analysis {
    /// Counts an L1 table, its L2 tables and their clusters; `l2` is a buffer to read the L2
    /// tables into (allocated here at the cluster size when it is not yet: one for all the
    /// tables of a check, whose snapshots may be 65536).
    pub(super) fn walk_l1(
        &mut self,
        t: &mut Target,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        label: &dyn fmt::Display,
        l2: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let g = self.g;
        let bytes = u64::from(l1_size) * 8;
        if bytes == 0 {
            return Ok(()); // Nothing to count.
        }
        self.inc_named(l1_off, bytes, &Suffixed(label, " L1 table"), false);
        let what = Prefixed("the ", &Suffixed(label, " L1 table"));
        for_each_entry(t, l1_off, bytes, &what, |t, _, raw| {
            if raw & mask::L1_RESERVED != 0 {
                self.corrupt(format_args!(
                    "ERROR found L1 entry with reserved bits set: {raw:x}"
                ));
            }
            // An entry with flags but no offset names the first cluster, which QEMU then
            // counts and checks as an L2 table (its reads treat the entry as unallocated).
            let l2_off = raw & mask::OFFSET;
            // Like QEMU, an unaligned table is reported, then counted and read where it
            // points (it is never written back).
            let counted = self.inc(l2_off, g.cs, "L2 table", false);
            let aligned = l2_off.is_multiple_of(g.cs);
            if !aligned {
                self.corrupt(format_args!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            if !counted {
                return Ok(()); // Past the end of the file: it would read as zeros.
            }
            if aligned {
                let u = self.l2_tables.entry(l2_off).or_default();
                u.refs += 1;
                u.active |= active;
            }
            if l2.len() as u64 != g.cs {
                *l2 = zeroed(g.cs, &t.path)?;
            }
            t.read(l2_off, l2, "an L2 table")?;
            self.in_header_l2 = l2_off == 0;
            self.walk_l2(l2, l2_off, active);
            self.in_header_l2 = false;
            Ok(())
        })
    }

    /// Counts the clusters one L2 table points at.
    pub(super) fn walk_l2(&mut self, table: &[u8], l2_off: u64, active: bool) {
        let g = self.g;
        let mut next_contiguous = 0u64;
        // A zero entry is unallocated and correct: runs of them are skipped as a whole.
        let nonzero = runs(table.len()).filter(|run| !all_zero(&table[run.clone()]));
        for at in nonzero.flat_map(|run| run.step_by(g.esz)) {
            let (j, e) = (at / g.esz, &table[at..at + g.esz]);
            let raw = be64_at(e, 0);
            let bitmap = if g.extended { be64_at(e, 8) } else { 0 };
            let before = self.corruptions;
            let kind = classify(raw, &g);
            if kind != Kind::Compressed && raw & mask::L2_STD_RESERVED != 0 {
                self.corrupt(format_args!(
                    "ERROR found l2 entry with reserved bits set: {raw:x}"
                ));
            }
            let at = EntryAt { l2_off, j, raw };
            match kind {
                Kind::Compressed => self.walk_compressed(at, bitmap, active),
                Kind::Alloc(off) => {
                    self.walk_allocated(at, bitmap, off, active);
                    if active {
                        if next_contiguous != 0 && off != next_contiguous {
                            self.fragmented += 1;
                        }
                        next_contiguous = off.saturating_add(g.cs);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if g.extended && bitmap & 0xffff_ffff != 0 {
                        self.corrupt(format_args!(
                            "ERROR: L2 table {l2_off:#x} entry {j}: Unallocated cluster has non-zero subcluster allocation map"
                        ));
                    }
                }
            }
            // QEMU's check judges a compressed descriptor only by the flags above.
            if self.corruptions == before && kind != Kind::Compressed {
                let bm = g.extended.then_some(bitmap);
                if let Err(why) = L2Entry::decode(raw, bm, g.cb, g.data_file) {
                    self.corrupt(format_args!(
                        "ERROR L2 table {l2_off:#x} entry {j} ({raw:#x}): {why}"
                    ));
                }
            }
        }
    }

    /// Checks and counts a compressed cluster's L2 entry (its subcluster `bitmap` with
    /// extended L2 entries).
    fn walk_compressed(&mut self, at: EntryAt, bitmap: u64, active: bool) {
        let g = self.g;
        let EntryAt { l2_off, j, raw } = at;
        if raw & COPIED != 0 {
            self.corrupt(format_args!(
                "ERROR: L2 table {l2_off:#x} entry {j}: copied flag must never be set for compressed clusters (entry {raw:#x})"
            ));
        }
        if g.data_file {
            self.corrupt(format_args!(
                "ERROR compressed cluster {j} with data file, entry=0x{raw:x}"
            ));
            return;
        }
        if bitmap != 0 {
            self.corrupt(format_args!(
                "ERROR compressed cluster {j} with non-zero subcluster allocation bitmap, entry=0x{raw:x}"
            ));
            return;
        }
        // Counted wherever it points, the first cluster too, as QEMU counts it.
        let d = CompressedDescriptor::decode(raw & !(COPIED | COMPRESSED), g.cb);
        let (start, len) = d.host_range();
        self.inc(start, len, "compressed cluster", false);
        if active {
            self.allocated += 1;
            self.compressed += 1;
            // Neighbouring compressed clusters share sectors: always fragmented.
            self.fragmented += 1;
        }
    }

    /// Checks and counts the L2 entry of a cluster allocated at `off` (its subcluster
    /// `bitmap` with extended L2 entries); the caller counts fragmentation.
    fn walk_allocated(&mut self, at: EntryAt, bitmap: u64, off: u64, active: bool) {
        let g = self.g;
        let EntryAt { l2_off, j, raw } = at;
        if g.extended && (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
            self.corrupt(format_args!(
                "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ));
        }
        if !off.is_multiple_of(g.cs) {
            // Without data (a preallocated zero cluster, or no allocated subcluster) a
            // repair can make it a plain zero entry, as QEMU does.
            let data = if g.extended {
                bitmap & 0xffff_ffff != 0
            } else {
                raw & ZERO == 0
            };
            if data {
                self.corrupt(format_args!(
                    "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
            } else {
                self.corrupt(format_args!(
                    "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
                if l2_off.is_multiple_of(g.cs) {
                    self.zero_fixes.push((l2_off, j, off));
                }
            }
        }
        if active {
            self.allocated += 1;
        }
        if !g.data_file {
            // Unaligned offsets touch two clusters, as QEMU counts them.
            self.inc(off, g.cs, "data cluster", false);
        }
    }

    /// Counts every snapshot's L1 table (and what it points at) and the snapshot table, from
    /// the table [`read_snapshots`] read; in a version 3 image an entry without the 16 bytes
    /// of extra data is a corruption (a repair rewrites the table).
    pub(super) fn walk_snapshots(
        &mut self,
        t: &mut Target,
        snapshots: &SnapshotTable,
        l2: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let g = self.g;
        let entries = &snapshots.entries;
        let nb = entries.len();
        if nb > 0 && g.data_file {
            self.corrupt(format_args!("ERROR {nb} snapshots in image with data file"));
        }
        for (k, e) in entries.iter().enumerate() {
            let label = SnapshotLabel(e);
            if self.header.version >= 3 && e.extra_data_size < SNAPSHOT_KNOWN_EXTRA_BYTES {
                self.corrupt(format_args!("ERROR snapshot table entry {k} is incomplete"));
            }
            let (l1_off, l1_size) = (e.l1_table_offset, e.l1_size);
            let l1_end = l1_off
                .saturating_add(u64::from(l1_size) * 8)
                .div_ceil(g.cs)
                .min(g.file_clusters);
            if !l1_off.is_multiple_of(g.cs) || u64::from(l1_size) * 8 > MAX_L1_BYTES {
                self.keep.push((l1_off >> g.cb, l1_end));
            }
            if !l1_off.is_multiple_of(g.cs) {
                self.corrupt(format_args!(
                    "ERROR {label} l1_offset={l1_off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"
                ));
                continue;
            }
            let l1_bytes = u64::from(l1_size) * 8;
            if l1_bytes > MAX_L1_BYTES {
                self.corrupt(format_args!(
                    "ERROR {label} l1_size={l1_size:#x}: L1 table is too large; snapshot table entry corrupted"
                ));
                continue;
            }
            // Past the end of the file the table reads as zeros (and walk_l1 reports a
            // table that lies a cluster or more past it).
            self.walk_l1(t, l1_off, l1_size, false, &label, l2)?;
        }
        let (start, size) = (self.header.snapshots_offset, snapshots.size_bytes);
        self.inc(start, size, SNAPSHOT_TABLE, false);
        Ok(())
    }
}

/// Where an L2 entry was found, for messages and repairs: the table's host offset, the
/// entry's index in it, and the entry.
#[derive(Clone, Copy)]
struct EntryAt {
    l2_off: u64,
    j: usize,
    raw: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every non-zero entry, and only those, in order with its index: at the edges of the
    /// zero runs and of the windows, in a table that ends past the end of the file (an entry
    /// the file holds only part of reads with zeros after it, the rest is not read).
    #[test]
    fn every_nonzero_entry_is_visited_once_across_runs_and_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table");
        let window = TABLE_WINDOW as usize / 8;
        let run = ZERO_RUN / 8;
        let at = [
            0,
            1,
            run - 1,
            run,
            3 * run + 5,
            window - 1,
            window,
            window + run,
            2 * window + 7,
        ];
        let entries = 2 * window + 40; // The file holds these and 3 bytes of one more.
        let off = 4096u64;
        let mut bytes = vec![0u8; off as usize + entries * 8 + 3];
        let value = |i: usize| 0x1_0000_0000u64 + i as u64;
        for &i in &at {
            let e = off as usize + i * 8;
            bytes[e..e + 8].copy_from_slice(&value(i).to_be_bytes());
        }
        let last = off as usize + entries * 8;
        bytes[last..last + 3].copy_from_slice(&[0x12, 0x34, 0x56]);
        std::fs::write(&path, &bytes).unwrap();
        let mut t = Target::open(&path, false).unwrap();
        let mut seen = Vec::new();
        // Declared far longer than the file.
        let len = (3 * window as u64 + 100) * 8;
        for_each_entry(&mut t, off, len, &"a table", |_, i, raw| {
            seen.push((i, raw));
            Ok(())
        })
        .unwrap();
        let mut want: Vec<(usize, u64)> = at.iter().map(|&i| (i, value(i))).collect();
        want.push((entries, 0x1234_5600_0000_0000));
        assert_eq!(seen, want);
        // A table wholly past the end of the file has no entries to read.
        let mut none = 0;
        for_each_entry(&mut t, 1 << 40, 1 << 20, &"a table", |_, _, _| {
            none += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(none, 0);
    }

    #[test]
    fn classification_matches_qemu() {
        let g = Geo {
            cb: 16,
            cs: 65536,
            order: 4,
            file_order: 4,
            rc_max: 65535,
            extended: false,
            data_file: false,
            esz: 8,
            file_len: 1 << 20,
            file_clusters: 16,
            epb: 32768,
        };
        assert_eq!(classify(0, &g), Kind::Unallocated);
        assert_eq!(classify(1, &g), Kind::ZeroPlain);
        assert_eq!(classify(0x50000 | 1, &g), Kind::Alloc(0x50000));
        assert_eq!(classify(COPIED | 0x50000, &g), Kind::Alloc(0x50000));
        assert_eq!(classify(COMPRESSED | 0x1234, &g), Kind::Compressed);
        assert_eq!(classify(COPIED, &g), Kind::Unallocated);
        let ext = Geo {
            extended: true,
            data_file: true,
            ..g
        };
        assert_eq!(classify(1, &ext), Kind::Unallocated);
        assert_eq!(classify(COPIED, &ext), Kind::Alloc(0));
    }
}
