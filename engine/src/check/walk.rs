//! The counting pass of a check: everything that points at a host cluster (the header, the
//! L1 and L2 tables and what they point at (walked in [`super::tables`]), the snapshot table,
//! the refcount table and blocks, the bitmap directory, tables and data, the encryption
//! header) is counted into an array of expected refcounts ([`Counts`], packed like a refcount
//! block), with the errors QEMU's `qcow2_check_refcounts` reports along the way (alignment
//! and reserved bits of entries, references past the end of the file). This file owns the
//! pass's result ([`Analysis`]), the image's geometry as the check sees it ([`Geo`]), reading
//! the header and the snapshot table, and the counting of everything but the L1 and L2 tables.
//!
//! This is the check's own implementation of the counting, independent of the refcount
//! bookkeeping of the allocator (`meta/`) whose results it judges: it shares only the format
//! layer's parsers. It runs on the thread that called [`super::check`].
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::tables::L2Use;
use super::{format_error, zeroed, CheckReport, Log, Target, MAX_CHECK_MEMORY};
use crate::error::{Error, ErrorKind};
use crate::format::{
    autoclear, be64_at, bitmap_directory, decode_bitmap_table_entry, refcount_get, refcount_max,
    refcount_set, BitmapDirEntry, Header, SnapshotReadError, SnapshotTable,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_TABLE_ENTRIES, MAX_SNAPSHOTS, REFT_OFFSET_MASK,
    REFT_RESERVED_MASK, SNAPSHOT_HEADER_BYTES,
};

/// How many overflowed clusters an analysis lists (see [`Analysis::overflowed`]).
const MAX_OVERFLOWED: usize = 1 << 16;

/// What [`Analysis::inc`] calls the snapshot table's region.
pub(super) const SNAPSHOT_TABLE: &str = "snapshot table";

/// Sizes derived from the header and the file.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geo {
    pub(super) cb: u32,
    pub(super) cs: u64,
    /// The refcount width (as an order) references are counted in and a new refcount
    /// structure is written in: the image's own, or a wider one a repair widens it to
    /// ([`Target::widen`](super::Target)).
    pub(super) order: u32,
    /// The refcount order of the structure the file holds, which its stored refcounts are
    /// read in ([`Geo::stored`]).
    pub(super) file_order: u32,
    pub(super) rc_max: u64,
    pub(super) extended: bool,
    pub(super) data_file: bool,
    /// Bytes per L2 entry.
    pub(super) esz: usize,
    /// The file's length as QEMU sees it: rounded up to whole 512-byte sectors (a file that
    /// ends inside a sector has a zero-filled tail there, which QEMU counts references into).
    pub(super) file_len: u64,
    /// Host clusters the file (partly) covers. References may reach one cluster further
    /// (QEMU counts a region that ends less than a cluster past the end of the file).
    pub(super) file_clusters: u64,
    /// Refcount entries per refcount block.
    pub(super) epb: u64,
}

impl Geo {
    /// The geometry of the image with header `h` in a file of `file_len` bytes, counted in
    /// refcounts of order `widen` where that is wider than the image's own.
    pub(super) fn new(h: &Header, file_len: u64, widen: Option<u32>) -> Geo {
        let cs = h.cluster_size();
        let file_len = file_len.checked_next_multiple_of(512).unwrap_or(file_len);
        let file_clusters = file_len.div_ceil(cs);
        let order = widen.map_or(h.refcount_order, |w| w.max(h.refcount_order));
        Geo {
            cb: h.cluster_bits,
            cs,
            order,
            file_order: h.refcount_order,
            rc_max: refcount_max(order),
            extended: h.extended_l2(),
            data_file: h.has_data_file(),
            esz: if h.extended_l2() { 16 } else { 8 },
            file_len,
            file_clusters,
            epb: (cs * 8) >> order,
        }
    }

    /// The geometry of the refcount structure the file holds: that of the image's own
    /// refcount width, whatever width references are counted in.
    pub(super) fn stored(self) -> Geo {
        Geo {
            order: self.file_order,
            rc_max: refcount_max(self.file_order),
            epb: (self.cs * 8) >> self.file_order,
            ..self
        }
    }

    /// Whether references are counted in a wider refcount width than the image's own.
    pub(super) fn widened(&self) -> bool {
        self.order != self.file_order
    }

    /// Whether [`Analysis::inc`] counts a region of `len` bytes at `off`: it ends less than
    /// a cluster past the end of the file.
    pub(super) fn counted(&self, off: u64, len: u64) -> bool {
        off.checked_add(len)
            .is_some_and(|end| end < self.file_len.saturating_add(self.cs))
    }

    /// Whether `len` bytes at `off` lie inside the file.
    pub(super) fn in_file(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.file_len)
    }
}

pub(super) fn memory_error(path: &str, clusters: u64, order: u32) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "{path}: checking references to {clusters} host clusters needs {} MiB for reference counts, more than the limit of {} MiB",
            (clusters << order >> 3) >> 20,
            MAX_CHECK_MEMORY >> 20
        ),
    )
}

/// Expected refcounts, packed at the image's refcount width exactly like a refcount block
/// (so a block can be written straight from it), growing to the highest cluster referenced.
#[derive(Clone, Debug)]
pub(super) struct Counts {
    pub(super) order: u32,
    pub(super) bytes: Vec<u8>,
    /// Clusters the array covers.
    pub(super) len: u64,
    /// Most bytes the array may take.
    limit: u64,
}

impl Counts {
    /// An array that takes at most `limit` bytes (at most [`MAX_CHECK_MEMORY`]).
    pub(super) fn with_limit(order: u32, limit: u64) -> Counts {
        Counts {
            order,
            bytes: Vec::new(),
            len: 0,
            limit: limit.min(MAX_CHECK_MEMORY),
        }
    }

    /// Bytes the array holds.
    pub(super) fn held(&self) -> u64 {
        self.bytes.capacity() as u64
    }

    pub(super) fn get(&self, c: u64) -> u64 {
        if c >= self.len {
            return 0;
        }
        // c < len, and `bytes` holds `len` entries.
        refcount_get(&self.bytes, self.order, c as usize)
    }

    /// Makes the array cover clusters `0..clusters`; false when that needs more than its
    /// limit ([`MAX_CHECK_MEMORY`] unless less was given) or the allocation fails.
    pub(super) fn grow(&mut self, clusters: u64) -> bool {
        if clusters <= self.len {
            return true;
        }
        let Some(bytes) = clusters
            .checked_mul(1 << self.order)
            .map(|bits| bits.div_ceil(8).next_multiple_of(8))
        else {
            return false;
        };
        if bytes > self.limit {
            return false;
        }
        let Ok(n) = usize::try_from(bytes) else {
            return false;
        };
        if n > self.bytes.len() {
            // Grow geometrically (bounded by the limit) so that references found in
            // increasing order cost few reallocations.
            let want = n
                .max(self.bytes.len().saturating_mul(2))
                .min(usize::try_from(self.limit).unwrap_or(usize::MAX));
            if self
                .bytes
                .try_reserve_exact(want - self.bytes.len())
                .is_err()
                && self.bytes.try_reserve_exact(n - self.bytes.len()).is_err()
            {
                return false;
            }
            self.bytes.resize(n, 0);
        }
        self.len = clusters;
        true
    }

    /// Sets entry `c`, which the array covers, to `v`, which fits the width.
    pub(super) fn set(&mut self, c: u64, v: u64) {
        debug_assert!(c < self.len);
        let _ = refcount_set(&mut self.bytes, self.order, c as usize, v);
    }

    /// Whether every entry of `first..end` is zero: entry by entry only where a byte holds
    /// entries from outside the range, whole bytes compared in between (a repaired file
    /// may span millions of clusters).
    pub(super) fn zero_range(&self, first: u64, end: u64) -> bool {
        let end = end.min(self.len);
        if first >= end {
            return true;
        }
        let bits = 1u64 << self.order;
        // Entries per byte (1 from 8-bit entries up).
        let step = (8 / bits).max(1);
        let a = first.next_multiple_of(step).min(end);
        let b = (end / step * step).max(a);
        // `a` and `b` start whole bytes, and `b <= len`, whose bytes `bytes` holds.
        (first..a).all(|c| self.get(c) == 0)
            && (b..end).all(|c| self.get(c) == 0)
            && all_zero(&self.bytes[(a * bits / 8) as usize..(b * bits / 8) as usize])
    }
}

/// Whether every byte of `bytes` is zero, compared a few KiB at a time.
pub(super) fn all_zero(bytes: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    bytes.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// Everything one pass over the image found.
pub(super) struct Analysis {
    pub(super) header: Header,
    pub(super) g: Geo,
    /// Expected refcount of every host cluster referenced.
    pub(super) counts: Counts,
    /// The referenced clusters needed more than [`MAX_CHECK_MEMORY`] (the check fails).
    pub(super) too_big: Option<u64>,
    /// Stored refcounts that could not be read (a misaligned refcount block): QEMU's
    /// "check errors", which make the check incomplete.
    pub(super) check_errors: u64,
    /// Entries that reference a preallocated zero cluster at a misaligned offset and no
    /// data: (L2 table offset, entry index, host offset), which a repair turns into plain
    /// zero entries. An entry appears once per time its table was walked (once per L1
    /// reference), as its host clusters were counted once each time.
    pub(super) zero_fixes: Vec<(u64, usize, u64)>,
    /// Raw refcount table entries.
    pub(super) reftable: Vec<u64>,
    /// Clusters counted for the refcount table and blocks (dropped when rebuilding).
    pub(super) refstruct: Vec<u64>,
    pub(super) l2_tables: HashMap<u64, L2Use>,
    /// References counted from the entries of the header's cluster walked as an L2 table
    /// (an L1 entry with flags and no offset names it), by cluster. Reads take such an L1
    /// entry as unallocated, so nothing reads a guest cluster through them: a cluster they
    /// point at holds no guest data for them.
    pub(super) header_l2_refs: HashMap<u64, u64>,
    /// Whether the walk is in the header's cluster as an L2 table now.
    pub(super) in_header_l2: bool,
    /// Clusters with more references than the refcount width holds: their expected
    /// refcount stopped at the maximum, and says nothing of who else uses them. `None` once
    /// more than [`MAX_OVERFLOWED`] did (then any cluster may have).
    pub(super) overflowed: Option<HashSet<u64>>,
    /// References to clusters past the end of the file (reported, not counted).
    pub(super) past_eof: u64,
    /// Where the lowest of them starts (`u64::MAX` without any).
    pub(super) past_eof_from: u64,
    /// Where the lowest of them starts, the snapshot table's own region aside (a repair that
    /// writes the table again stops referencing that region).
    pub(super) past_eof_from_but_table: u64,
    /// The lowest cluster of the file that a region not counted (it runs a cluster or more
    /// past the end of the file) covers: from there to the end of the file, clusters may
    /// hold live metadata nothing counted (an L1 table, the refcount table), and a repair
    /// writes nothing new there. `u64::MAX` without such a region.
    pub(super) uncounted_from: u64,
    /// One past the last cluster such a region (one that starts inside the file) covers, 0
    /// without one: a file grown to there counts them.
    pub(super) uncounted_end: u64,
    /// Regions (first cluster, one past the last) named as metadata but not counted (a
    /// snapshot's L1 table the walk could not follow): a repair writes nothing new there.
    pub(super) keep: Vec<(u64, u64)>,
    /// The refcount structure itself is broken and must be rebuilt.
    pub(super) rebuild: bool,
    pub(super) corruptions: u64,
    /// The corruptions the counting pass found, before the stored refcounts and the COPIED
    /// flags are compared.
    pub(super) walk_corruptions: u64,
    pub(super) leaks: u64,
    /// Clusters whose stored refcount differs from the expected one.
    pub(super) mismatches: u64,
    pub(super) corrupt_clusters: Vec<(u64, u64, u64)>,
    pub(super) leaked_clusters: Vec<(u64, u64, u64)>,
    pub(super) log: Log,
    pub(super) allocated: u64,
    pub(super) compressed: u64,
    pub(super) fragmented: u64,
    pub(super) image_end_offset: u64,
}

/// Reads and parses the header as QEMU does when it opens an image for checking.
pub(super) fn read_header(t: &mut Target) -> Result<Header, Error> {
    let file_len = t.len()?;
    let first = (Header::FIRST_READ_BYTES as u64).min(file_len);
    let mut buf = zeroed(first, &t.path)?;
    t.read(0, &mut buf, "the header")?;
    let need = Header::bytes_needed(&buf, file_len);
    if need > first {
        buf.resize(need as usize, 0);
        t.read(first, &mut buf[first as usize..], "the header")?;
    }
    Header::parse_for_check(&buf, file_len).map_err(|e| format_error(&t.path, e))
}

/// Reads the snapshot table as QEMU's check does: with `repair`, too many snapshots, too
/// much extra data and a table too big are cut back (the header's count is lowered at once,
/// which leaks what was dropped; the rest is rewritten later); without it they make the
/// check fail, as a misaligned table does.
pub(super) fn read_snapshots(
    t: &mut Target,
    h: &Header,
    repair: bool,
    log: &mut Log,
) -> Result<(SnapshotTable, u64), Error> {
    let mut nb = h.nb_snapshots;
    let mut cut = 0u64;
    if nb > MAX_SNAPSHOTS && repair {
        log.push(format!(
            "Discarding {} overhanging snapshots",
            nb - MAX_SNAPSHOTS
        ));
        cut += u64::from(nb - MAX_SNAPSHOTS);
        nb = MAX_SNAPSHOTS;
    }
    let cs = h.cluster_size();
    if nb > MAX_SNAPSHOTS
        || !h.snapshots_offset.is_multiple_of(cs)
        || h.snapshots_offset
            .checked_add(u64::from(nb) * SNAPSHOT_HEADER_BYTES)
            .is_none_or(|end| end > i64::MAX as u64)
    {
        let why = if nb > MAX_SNAPSHOTS {
            format!(
                "the snapshot table is too large ({nb} snapshots; qcow2d check --repair drops the {} overhanging ones)",
                nb - MAX_SNAPSHOTS
            )
        } else {
            format!(
                "the snapshot table offset {:#x} is invalid",
                h.snapshots_offset
            )
        };
        return Err(Error::new(ErrorKind::Corrupt, format!("{}: {why}", t.path)));
    }
    let path = t.path.clone();
    let table = crate::format::read_snapshot_table(
        h.snapshots_offset,
        nb,
        repair,
        repair,
        &mut |off, buf| t.read(off, buf, "the snapshot table"),
    )
    .map_err(|e| match e {
        SnapshotReadError::Io(e) => e,
        SnapshotReadError::Format(e) => Error::with_source(
            ErrorKind::Corrupt,
            format!("{path}: cannot read the snapshot table"),
            e,
        ),
    })?;
    if table.extra_truncated > 0 {
        log.push(format!(
            "Discarding too much extra metadata in {} snapshot table entries",
            table.extra_truncated
        ));
    }
    if table.dropped > 0 {
        log.push(format!(
            "Discarding {} overhanging snapshots (snapshot table is too big)",
            table.dropped
        ));
        cut += u64::from(table.dropped);
    }
    Ok((table, cut))
}

/// Counts the references every host cluster should have (the expected refcounts), from
/// everything that points at it; [`super::analyze`] then compares them with the stored ones.
pub(super) fn count(t: &mut Target, snapshots: &SnapshotTable) -> Result<Analysis, Error> {
    let header = read_header(t)?;
    let file_len = t.len()?;
    let g = Geo::new(&header, file_len, t.widen);

    let mut a = Analysis {
        header,
        g,
        // Another counting may be alive (a repair judging a grown file): both stay within
        // the limit.
        counts: Counts::with_limit(g.order, MAX_CHECK_MEMORY.saturating_sub(t.counts_held)),
        too_big: None,
        check_errors: 0,
        zero_fixes: Vec::new(),
        reftable: Vec::new(),
        refstruct: Vec::new(),
        l2_tables: HashMap::new(),
        header_l2_refs: HashMap::new(),
        in_header_l2: false,
        overflowed: Some(HashSet::new()),
        past_eof: 0,
        past_eof_from: u64::MAX,
        past_eof_from_but_table: u64::MAX,
        uncounted_from: u64::MAX,
        uncounted_end: 0,
        keep: Vec::new(),
        rebuild: false,
        corruptions: 0,
        walk_corruptions: 0,
        leaks: 0,
        mismatches: 0,
        corrupt_clusters: Vec::new(),
        leaked_clusters: Vec::new(),
        log: Log::default(),
        allocated: 0,
        compressed: 0,
        fragmented: 0,
        image_end_offset: 0,
    };
    let h = a.header.clone();

    // QEMU counts the first cluster for the header, its extensions and the backing file name.
    a.inc(0, g.cs, "header", false);
    // One buffer for every L2 table the walk reads.
    let mut l2 = Vec::new();
    a.walk_l1(t, h.l1_table_offset, h.l1_size, true, &"active", &mut l2)?;
    a.walk_snapshots(t, snapshots, &mut l2)?;
    drop(l2);
    if let Some(clusters) = a.too_big {
        return Err(memory_error(&t.path, clusters, g.order));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * g.cs;
    a.inc(h.refcount_table_offset, rt_bytes, "refcount table", true);
    if let Some((off, len)) = h.crypto_header {
        a.inc(off, len, "encryption header", false);
    }
    a.count_bitmaps(t)?;

    // Entries past the end of the file are zero, as missing ones are (no block).
    let rt = t.read_entries(h.refcount_table_offset, rt_bytes, "the refcount table")?;
    a.reftable = rt.chunks_exact(8).map(|c| be64_at(c, 0)).collect();
    drop(rt);
    a.check_refblocks();

    if let Some(clusters) = a.too_big {
        return Err(memory_error(&t.path, clusters, g.order));
    }
    a.walk_corruptions = a.corruptions;
    Ok(a)
}

impl Analysis {
    /// Counts a corruption; its message is formatted only when the log keeps it (a damaged
    /// image may hold millions of bad entries, and each analysis of a repair finds them).
    pub(super) fn corrupt(&mut self, msg: fmt::Arguments<'_>) {
        self.corruptions += 1;
        self.log.push_fmt(msg);
    }

    /// Adds one reference to every host cluster that `len` bytes at `off` touch. As in QEMU,
    /// a region ending a cluster or more past the end of the file is a corruption and is not
    /// counted; returns whether it was counted.
    pub(super) fn inc(&mut self, off: u64, len: u64, what: &str, refstruct: bool) -> bool {
        self.inc_named(off, len, &what, refstruct)
    }

    /// [`Analysis::inc`] with the region's name formatted only for a message: the name of a
    /// snapshot's table is built from its entry, and a table may have 65536 of them.
    pub(super) fn inc_named(
        &mut self,
        off: u64,
        len: u64,
        what: &dyn fmt::Display,
        refstruct: bool,
    ) -> bool {
        if len == 0 {
            return true;
        }
        let end = match off.checked_add(len) {
            Some(end) if self.g.counted(off, len) => end,
            _ => {
                if off < self.g.file_len {
                    self.uncounted_from = self.uncounted_from.min(off >> self.g.cb);
                    let end = off.saturating_add(len).div_ceil(self.g.cs);
                    self.uncounted_end = self.uncounted_end.max(end);
                }
                // The refcount structure itself is replaced by a rebuild: it does not stop one.
                let what = what.to_string();
                if !refstruct {
                    self.past_eof += 1;
                    self.past_eof_from = self.past_eof_from.min(off);
                    if what != SNAPSHOT_TABLE {
                        self.past_eof_from_but_table = self.past_eof_from_but_table.min(off);
                    }
                }
                self.corrupt(format_args!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x} ({what})"
                ));
                return false;
            }
        };
        let (first, last) = (off >> self.g.cb, (end - 1) >> self.g.cb);
        // `end < file_len + cluster size`, so `last <= file_clusters`.
        if !self.counts.grow(last + 1) {
            self.too_big = Some(last + 1);
            return false;
        }
        for c in first..=last {
            let e = self.counts.get(c);
            if e >= self.g.rc_max {
                if let Some(set) = self.overflowed.as_mut() {
                    set.insert(c);
                    if set.len() > MAX_OVERFLOWED {
                        self.overflowed = None;
                    }
                }
                self.corrupt(format_args!(
                    "ERROR: overflow cluster offset={:#x}: more references than {}-bit refcounts hold",
                    c << self.g.cb,
                    self.header.refcount_bits()
                ));
                continue;
            }
            self.counts.set(c, e + 1);
            if refstruct {
                self.refstruct.push(c);
            }
            if self.in_header_l2 {
                *self.header_l2_refs.entry(c).or_default() += 1;
            }
        }
        true
    }

    /// Clusters whose refcounts are compared: those of the file, and the one after it when a
    /// region reaching into it is referenced (as QEMU's array grows to hold it).
    pub(super) fn compare_len(&self) -> u64 {
        let extra = self.expected_at(self.g.file_clusters).unwrap_or(0) > 0;
        self.g.file_clusters + u64::from(extra)
    }

    /// The expected refcount of a cluster of the file (or of the one after it); `None`
    /// past that.
    pub(super) fn expected_at(&self, c: u64) -> Option<u64> {
        (c <= self.g.file_clusters).then(|| self.counts.get(c))
    }

    /// Counts the bitmap directory, bitmap tables and bitmap data clusters, when the bitmaps
    /// extension is consistent (autoclear bit 0 set), as QEMU does.
    pub(super) fn count_bitmaps(&mut self, t: &mut Target) -> Result<(), Error> {
        let g = self.g;
        let Some((nb, dir_size, dir_off)) = self.header.bitmaps else {
            return Ok(());
        };
        if self.header.autoclear_features & autoclear::BITMAPS == 0 {
            self.log.push(
                "The bitmaps extension is inconsistent (autoclear bit 0 is clear): its clusters are not counted, as QEMU ignores them"
                    .to_owned(),
            );
            return Ok(());
        }
        if nb == 0 {
            return Ok(());
        }
        self.inc(dir_off, dir_size, "bitmap directory", false);
        if dir_size == 0
            || dir_size > MAX_BITMAP_DIRECTORY_BYTES
            || !dir_off.is_multiple_of(g.cs)
            || !g.in_file(dir_off, dir_size)
        {
            self.corrupt(format_args!(
                "ERROR bitmap directory at {dir_off:#x} of {dir_size} bytes is invalid"
            ));
            return Ok(());
        }
        let mut dir = zeroed(dir_size, &t.path)?;
        t.read(dir_off, &mut dir, "the bitmap directory")?;
        let mut count = 0u32;
        let mut table = zeroed(g.cs, &t.path)?;
        for entry in bitmap_directory(&dir) {
            let Ok(BitmapDirEntry {
                table_offset: table_off,
                table_size,
            }) = entry
            else {
                self.corrupt(format_args!("ERROR broken bitmap directory"));
                return Ok(());
            };
            count += 1;
            if table_off == 0
                || !table_off.is_multiple_of(g.cs)
                || table_size == 0
                || table_size > MAX_BITMAP_TABLE_ENTRIES
            {
                self.corrupt(format_args!(
                    "ERROR bitmap {count}: invalid bitmap table at {table_off:#x} of {table_size} entries"
                ));
                continue;
            }
            let table_bytes = table_size * 8;
            self.inc(table_off, table_bytes, "bitmap table", false);
            if !g.in_file(table_off, table_bytes) {
                continue; // Reported by inc() as past the end of the file.
            }
            let mut done = 0u64;
            while done < table_bytes {
                let chunk = (table_bytes - done).min(g.cs);
                let buf = &mut table[..chunk as usize];
                t.read(table_off + done, buf, "a bitmap table")?;
                for raw in buf.chunks_exact(8).map(|c| be64_at(c, 0)) {
                    match decode_bitmap_table_entry(raw, g.cs) {
                        Err(_) => self.corrupt(format_args!(
                            "ERROR bitmap {count}: invalid bitmap table entry {raw:#x}"
                        )),
                        Ok(Some(off)) => {
                            self.inc(off, g.cs, "bitmap data cluster", false);
                        }
                        Ok(None) => {}
                    }
                }
                done += chunk;
            }
        }
        if count != nb {
            self.corrupt(format_args!(
                "ERROR the bitmap directory holds {count} bitmaps, the header extension says {nb}"
            ));
        }
        Ok(())
    }

    /// Counts the refcount blocks; each must be referenced exactly once (by the table).
    pub(super) fn check_refblocks(&mut self) {
        let g = self.g;
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            if raw & REFT_RESERVED_MASK != 0 {
                self.corrupt(format_args!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            let off = raw & REFT_OFFSET_MASK;
            if !off.is_multiple_of(g.cs) {
                self.corrupt(format_args!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if off == 0 {
                continue;
            }
            // Outside the clusters counted so far, as QEMU judges it: the file's, and the one
            // after it when a reference reaches into it. A block in that one is counted (a
            // reference past the end of the file) and compared as any other.
            if off >> g.cb >= self.compare_len() {
                self.corrupt(format_args!("ERROR refcount block {i} is outside image"));
                self.rebuild = true;
                continue;
            }
            if off >> g.cb >= g.file_clusters {
                self.rebuild = true;
            }
            // A cluster already at the refcount width's maximum: the block's own reference
            // overflows (reported by inc()) and its count stays at that maximum, which is 1
            // with 1-bit refcounts, so the test below does not see the sharing.
            let shared = self.expected_at(off >> g.cb).unwrap_or(0) >= g.rc_max;
            self.inc(off, g.cs, "refcount block", true);
            let refs = self.expected_at(off >> g.cb).unwrap_or(0);
            if refs != 1 {
                self.corrupt(format_args!("ERROR refcount block {i} refcount={refs}"));
                self.rebuild = true;
            } else if shared {
                // Counted as the overflow already, as QEMU counts it; a new structure in
                // clusters nothing uses ends the sharing.
                self.log.push(format!(
                    "Refcount block {i} shares its cluster with other metadata"
                ));
                self.rebuild = true;
            }
        }
    }

    pub(super) fn report(&self, repaired: bool) -> CheckReport {
        CheckReport {
            corruptions: self.corruptions,
            leaks: self.leaks,
            corrupt_clusters: self.corrupt_clusters.clone(),
            leaked_clusters: self.leaked_clusters.clone(),
            corruptions_fixed: 0,
            leaks_fixed: 0,
            image_end_offset: self.image_end_offset,
            total_clusters: self.header.size.div_ceil(self.g.cs),
            allocated_clusters: self.allocated,
            compressed_clusters: self.compressed,
            fragmented_clusters: self.fragmented,
            check_errors: self.check_errors,
            repaired,
            messages: self.log.clone().into_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_range_agrees_with_every_entry() {
        let points = [0u64, 1, 3, 7, 8, 9, 63, 64, 65, 150, 4095, 4096, 4097, 9000];
        for order in 0..=6 {
            for set in points {
                let mut c = Counts::with_limit(order, MAX_CHECK_MEMORY);
                assert!(c.grow(9001));
                c.set(set, 1);
                for first in points {
                    for end in points.iter().map(|e| e + 1).chain([9001, 10_000]) {
                        let each = (first..end.min(c.len)).all(|k| c.get(k) == 0);
                        assert_eq!(
                            c.zero_range(first, end),
                            each,
                            "order {order}, entry {set} set, range {first}..{end}"
                        );
                    }
                }
            }
        }
        assert!(all_zero(&[0; 10_000]));
        let mut b = [0u8; 10_000];
        b[9_999] = 1;
        assert!(!all_zero(&b));
    }
}
