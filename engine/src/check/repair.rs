//! What a repair writes, apart from COPIED flags: misaligned preallocated zero entries made
//! plain zero entries, the snapshot table written again, and the refcounts made equal to the
//! expected ones, in place or as a new refcount structure (placed by [`Gaps`]). Each step
//! syncs before the next; whether the refcounts can be made right is decided (a new
//! structure laid out) before anything is written. Runs on the thread that called
//! [`super::check`].
#![forbid(unsafe_code)]

use std::collections::HashMap;

use super::stored::{Block, Stored};
use super::walk::Analysis;
use super::{zeroed, Log, Target};
use crate::error::{Error, ErrorKind};
use crate::format::mask::{self, ZERO};
use crate::format::{
    be64_at, field, refcount_get, refcount_set, SnapshotTable, MAX_REFCOUNT_TABLE_BYTES,
    REFT_OFFSET_MASK, SNAPSHOT_KNOWN_EXTRA_BYTES,
};

/// Turns entries that reference a preallocated zero cluster at a misaligned offset (and hold
/// no data) into plain zero entries, as QEMU's repair does. The L2 table is written only when
/// nothing but L1 entries (as an L2 table), such entries (whose misaligned clusters hold no
/// data and are dropped here) and entries of the header's cluster walked as an L2 table
/// (which name no guest data) references its cluster; otherwise the entry is left alone.
/// Returns how many entries changed.
pub(super) fn fix_zero_entries(t: &mut Target, a: &Analysis, log: &mut Log) -> Result<u64, Error> {
    let g = a.g;
    // How many of each cluster's counted references are such entries (those of the
    // header's cluster, never written, are counted as references naming no guest data).
    let mut dropped: HashMap<u64, u64> = HashMap::new();
    for &(l2_off, _, off) in &a.zero_fixes {
        if l2_off != 0 && g.counted(off, g.cs) {
            for c in (off >> g.cb)..=((off + g.cs - 1) >> g.cb) {
                *dropped.entry(c).or_default() += 1;
            }
        }
    }
    let mut fixed = 0u64;
    let mut done = std::collections::HashSet::new();
    for &(l2_off, j, _) in &a.zero_fixes {
        if !done.insert((l2_off, j)) {
            continue; // The same entry, walked through another L1 reference.
        }
        let refs = a.l2_tables.get(&l2_off).map_or(0, |u| u.refs);
        let c = l2_off >> g.cb;
        let others = dropped.get(&c).copied().unwrap_or(0);
        if refs == 0 || l2_off == 0 || !a.only_as(c, refs + others) {
            log.push(format!(
                "Not repairing L2 table {l2_off:#x} entry {j}: the table overlaps other metadata"
            ));
            continue;
        }
        let at = l2_off + (j * g.esz) as u64;
        let mut e = [0u8; 16];
        let e = &mut e[..g.esz];
        t.read(at, e, "an L2 entry")?;
        let new = if g.extended {
            // Allocated subclusters read as zeros now; the entry holds no host cluster.
            let bitmap = be64_at(e, 8);
            let bitmap = (bitmap | (bitmap << 32)) & 0xffff_ffff_0000_0000;
            let mut n = [0u8; 16];
            n[8..].copy_from_slice(&bitmap.to_be_bytes());
            n.to_vec()
        } else {
            ZERO.to_be_bytes().to_vec()
        };
        log.push(format!(
            "Repairing offset={:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
            be64_at(e, 0) & mask::OFFSET
        ));
        t.write(at, &new, "an L2 entry")?;
        fixed += 1;
    }
    if fixed > 0 {
        t.sync()?;
    }
    Ok(fixed)
}

/// Writes the snapshot table again with every entry complete (at least the 16 bytes of
/// extra data version 3 requires; extra data QEMU would refuse truncated), into the first
/// run of clusters nothing references (see [`Gaps`]; never over the old table, which the
/// header names until the new one is durable), else past everything the image references or
/// counts, then points the header at it. The old table leaks and the new one has no refcount
/// yet: the refcount repair that follows fixes both. `None` (nothing written) when that
/// repair could not be made (a new refcount structure would have to grow the file towards a
/// reference past its end, where it would count, or write the header's refcount table fields
/// where an L1 table covers them and `under` keeps them).
pub(super) fn rewrite_snapshots(
    t: &mut Target,
    a: &Analysis,
    table: &SnapshotTable,
    under: super::UnderSnapshotL1,
    log: &mut Log,
) -> Result<Option<SnapshotTable>, Error> {
    let g = a.g;
    let bytes = crate::format::encode_snapshot_table(&table.entries, a.header.size);
    let mut stored = Stored::new(a);
    let epb = stored.g.epb;
    let mut end = a.compare_len().max(a.counts.len);
    // Past the end of the file, past every cluster a stored refcount claims too.
    for b in 0..stored.table.len() as u64 {
        if let Block::At(_) = stored.read_block_of(b) {
            for c in (b * epb..(b + 1) * epb).rev() {
                if stored.get(t, c)?.unwrap_or(0) > 0 {
                    end = end.max(c + 1);
                    break;
                }
            }
        }
    }
    let mut padded = bytes.clone();
    padded.resize((bytes.len() as u64).next_multiple_of(g.cs) as usize, 0);
    let table_clusters = padded.len() as u64 / g.cs;
    // The old table's clusters (its region may not be counted when it runs past the end of
    // the file).
    let old_start = a.header.snapshots_offset >> g.cb;
    let old_end = a
        .header
        .snapshots_offset
        .saturating_add(table.size_bytes)
        .div_ceil(g.cs);
    let old = (old_start, old_end.saturating_sub(old_start));
    let gaps = Gaps::new(a, end, vec![old]);
    let first = gaps.run(table_clusters.max(1));
    let mut at = first << g.cb;
    // The refcount repair that follows must be possible with the table there: in place when
    // every refcount it changes has a block, else a new structure laid out around it that
    // does not grow the file towards a reference past its end other than the old table.
    let extra = (first, table_clusters);
    let in_place = !needs_rebuild(a)
        && (first..first + table_clusters)
            .all(|c| matches!(stored.block_of(c / epb), Block::At(_)));
    if !in_place {
        if let Some(l1) = super::l1_over_reftable_fields(&a.header, table, under) {
            // The refcounts could not be rebuilt around the new table (see
            // `repair_refcounts`): it would stay without refcounts.
            log.push(format!(
                "Not writing the snapshot table again: {l1} covers the header's refcount table offset and size, so the refcount structure cannot be rebuilt around a new table"
            ));
            return Ok(None);
        }
    }
    let blocked_at = if in_place {
        grows_towards(a, first + table_clusters, a.past_eof_from_but_table)
    } else {
        let layout = plan_rebuild(a, &t.path, Some(extra))?;
        grows_towards(
            a,
            layout.end().max(first + table_clusters),
            a.past_eof_from_but_table,
        )
    };
    if let Some(from) = blocked_at {
        // Grown past every region that runs past its end, the file counts them all: the
        // table goes where that counting leaves room, and the refcount repair after it too.
        let place = |c: &Analysis| {
            let gaps = Gaps::new(c, end.max(c.counts.len), vec![old]);
            Some((gaps.run(table_clusters.max(1)), table_clusters))
        };
        let start = (first + table_clusters).max(g.file_clusters + 1);
        let Some(grown) = plan_grown(t, table, a, start, place)? else {
            log.push(format!(
                "Not writing the snapshot table again: a reference past the end of the file points at {from:#x}, where the repair would write"
            ));
            return Ok(None);
        };
        t.grow(grown.len)?;
        t.sync()?;
        log.push(format!(
            "Growing the file to {:#x} bytes: the regions that ran past its end count there",
            grown.len
        ));
        at = grown.extra.map_or(at, |(s, _)| s << g.cb);
    }
    t.write(at, &padded, "the new snapshot table")?;
    t.sync()?;
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&(table.entries.len() as u32).to_be_bytes());
    h[4..].copy_from_slice(&at.to_be_bytes());
    t.write(field::NB_SNAPSHOTS as u64, &h, "the header")?;
    t.sync()?;
    log.push(format!(
        "Repairing: wrote the snapshot table again at {at:#x} ({} entries)",
        table.entries.len()
    ));
    let entries = table.entries.clone();
    let mut reread = SnapshotTable {
        entries,
        size_bytes: bytes.len() as u64,
        extra_truncated: 0,
        dropped: 0,
    };
    for e in &mut reread.entries {
        e.extra_data_size = e.extra_data_size.max(SNAPSHOT_KNOWN_EXTRA_BYTES);
    }
    Ok(Some(reread))
}

/// Whether making the stored refcounts right needs a new refcount structure: the existing
/// one is broken, a cluster with references has no valid block to hold its refcount, or
/// the references are counted in a wider width than the image's
/// ([`Geo::widened`](super::walk::Geo::widened)).
pub(super) fn needs_rebuild(a: &Analysis) -> bool {
    let stored = Stored::new(a);
    let epb = stored.g.epb;
    a.rebuild
        || a.g.widened()
        || (0..a.counts.len)
            .any(|c| a.counts.get(c) != 0 && !matches!(stored.block_of(c / epb), Block::At(_)))
}

/// Makes the stored refcounts equal to the expected ones in place, when every refcount that
/// must change has a valid block (not [`needs_rebuild`]).
pub(super) fn fix_refcounts(t: &mut Target, a: Analysis, log: &mut Log) -> Result<(), Error> {
    let stored = Stored::new(&a);
    // The blocks the file holds, in its own width.
    let g = stored.g;

    let compare_len = a.compare_len();
    let mut block = zeroed(g.cs, &t.path)?;
    let mut written = 0u64;
    for b in 0..stored.table.len() as u64 {
        let Block::At(off) = stored.block_of(b) else {
            continue;
        };
        let first = b * g.epb;
        if first >= compare_len {
            break;
        }
        let last = (first + g.epb).min(compare_len);
        t.read(off, &mut block, "a refcount block")?;
        let mut changed = false;
        for c in first..last {
            let k = (c - first) as usize;
            let want = a.expected_at(c).unwrap_or(0);
            if refcount_get(&block, g.order, k) != want {
                refcount_set(&mut block, g.order, k, want).map_err(|v| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!("{}: refcount {v} does not fit the refcount width", t.path),
                    )
                })?;
                changed = true;
            }
        }
        if changed {
            t.write(off, &block, "a refcount block")?;
            written += 1;
        }
    }
    t.sync()?;
    log.push(format!(
        "Repairing: rewrote {written} refcount block(s) in place"
    ));
    Ok(())
}

/// Clusters a repair may write a new structure into, first fit in increasing order: the
/// clusters of the file that nothing counted references (expected refcount 0: no metadata,
/// no data, not the old refcount structure, which stays live until the header names the new
/// one; stored refcounts are not trusted for this), then every cluster from `base` on (past
/// the end of the file and whatever else the caller keeps clear). Clusters in the `taken`
/// ranges (start, count) are never used.
///
/// Also never used: every cluster an entry of the old refcount table names (reserved bits
/// and misalignment aside, as it is read: the old structure stays live until the new one
/// replaces it, even where the check did not count it) and the regions of
/// [`Analysis::keep`].
pub(super) struct Gaps<'a> {
    a: &'a Analysis,
    base: u64,
    /// Sorted, non-overlapping (first cluster, one past the last).
    taken: Vec<(u64, u64)>,
}

impl<'a> Gaps<'a> {
    pub(super) fn new(a: &'a Analysis, base: u64, taken: Vec<(u64, u64)>) -> Gaps<'a> {
        let g = a.g;
        let mut ranges: Vec<(u64, u64)> = taken
            .into_iter()
            .map(|(s, n)| (s, s.saturating_add(n)))
            .chain(a.keep.iter().copied())
            .collect();
        for &raw in &a.reftable {
            let off = raw & REFT_OFFSET_MASK;
            if off != 0 {
                // A misaligned block touches two clusters.
                let end = off.saturating_add(g.cs - 1) >> g.cb;
                ranges.push((off >> g.cb, end.saturating_add(1)));
            }
        }
        ranges.retain(|&(s, e)| s < e);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Gaps {
            a,
            base: base.max(a.compare_len()),
            taken: merged,
        }
    }

    fn taken(&self, c: u64) -> bool {
        let i = self.taken.partition_point(|&(_, e)| e <= c);
        self.taken.get(i).is_some_and(|&(s, _)| s <= c)
    }

    /// One past the taken range that holds `c`, if one does.
    fn range_end(&self, c: u64) -> Option<u64> {
        let i = self.taken.partition_point(|&(_, e)| e <= c);
        self.taken.get(i).filter(|&&(s, _)| s <= c).map(|&(_, e)| e)
    }

    /// Where the first taken range after `c` (which is not taken) starts.
    fn next_taken_start(&self, c: u64) -> u64 {
        let i = self.taken.partition_point(|&(_, e)| e <= c);
        self.taken.get(i).map_or(u64::MAX, |&(s, _)| s)
    }

    fn free(&self, c: u64) -> bool {
        c != 0
            && !self.taken(c)
            && (c >= self.base
                || (c < self.a.g.file_clusters.min(self.a.uncounted_from)
                    && self.a.counts.get(c) == 0))
    }

    /// The first free cluster at or after `from`. Taken ranges are skipped whole, so a
    /// range far past the end of the file costs nothing.
    pub(super) fn next(&self, from: u64) -> u64 {
        let mut c = from.max(1);
        loop {
            if let Some(e) = self.range_end(c) {
                c = e;
            } else if c >= self.base || self.free(c) {
                return c;
            } else if c >= self.a.g.file_clusters.min(self.a.uncounted_from) {
                c = self.base; // Nothing is free from here to the base.
            } else {
                c += 1;
            }
        }
    }

    /// How many free clusters follow free cluster `s` (itself included), up to `n`.
    fn run_len(&self, s: u64, n: u64) -> u64 {
        let mut e = s;
        while e - s < n {
            if self.range_end(e).is_some() {
                break;
            }
            if e >= self.base {
                e = self.next_taken_start(e).min(s.saturating_add(n));
                break;
            }
            if !self.free(e) {
                break;
            }
            e += 1;
        }
        e - s
    }

    /// The first run of `n` free clusters.
    pub(super) fn run(&self, n: u64) -> u64 {
        let mut c = 1;
        loop {
            let s = self.next(c);
            let len = self.run_len(s, n);
            if len >= n {
                return s;
            }
            c = s + len.max(1);
        }
    }
}

/// Where a write that ends before cluster `end` would grow the file towards a reference past
/// its end that starts at `from` (u64::MAX: none): it then lands within a cluster of the new
/// end of the file, where it would count. `None` when the write stays inside the file or
/// clear of it.
pub(super) fn grows_towards(a: &Analysis, end: u64, from: u64) -> Option<u64> {
    let new_len = end.saturating_mul(a.g.cs);
    (new_len > a.g.file_len && from < new_len.saturating_add(a.g.cs)).then_some(from)
}

/// How much a repair may grow the file beyond its length so that a region running past its
/// end counts (see [`plan_grown`]).
pub(super) const MAX_REPAIR_GROWTH: u64 = 1 << 30;

/// A rebuild made possible by growing the file first: to `len` bytes, where `analysis`
/// counted everything as a check of the grown file will, and `layout` lies, around the
/// clusters `extra` (start, count) another new structure takes.
pub(super) struct Grown {
    pub(super) len: u64,
    pub(super) analysis: Analysis,
    pub(super) layout: Layout,
    pub(super) extra: Option<(u64, u64)>,
}

/// Lays out a new refcount structure for a file grown to a length (whole clusters, at least
/// `end`) where every region that starts inside it also ends inside it (or within a cluster
/// of its end): each then counts, so the new structure stays clear of it and holds its
/// refcounts. The counting is done again as if the file were that long (zeros past its
/// end, as a grown file reads) with the snapshot table `snapshots`, another new structure
/// placed by `place` in what that counting leaves free, and the refcount structure laid out
/// around it, until the length covers them all. Then nothing a check of the grown file reads
/// lies where the structure goes, and that check counts what the layout counted. `None`
/// (nothing to write) when no such length is found within [`MAX_REPAIR_GROWTH`] of the
/// file's end, or when the grown file would hold more corruptions than the counting of the
/// file as it is (`a`) found (none has been seen; the length only makes regions count).
pub(super) fn plan_grown(
    t: &mut Target,
    snapshots: &SnapshotTable,
    a: &Analysis,
    mut end: u64,
    place: impl Fn(&Analysis) -> Option<(u64, u64)>,
) -> Result<Option<Grown>, Error> {
    let g = a.g;
    let limit = g.file_len.saturating_add(MAX_REPAIR_GROWTH);
    // Each round either returns or moves `end` past something that ran past it, or doubles
    // what the file grows by: 32 rounds reach the limit from a single cluster.
    for _ in 0..32 {
        let Some(len) = end.checked_mul(g.cs).filter(|&l| l <= limit) else {
            return Ok(None);
        };
        let held = a.counts.held();
        let counted = match t.as_if_grown(len, held, |t| super::walk::count(t, snapshots)) {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::Io => return Err(e),
            Err(_) => return Ok(None), // More than the check's memory, for one.
        };
        if counted.uncounted_from < end {
            // A region still runs past the end: grow past it.
            end = end.max(counted.uncounted_end);
            continue;
        }
        if counted.walk_corruptions > a.walk_corruptions {
            return Ok(None);
        }
        let extra = place(&counted);
        let Ok(layout) = plan_rebuild(&counted, &t.path, extra) else {
            return Ok(None);
        };
        let needed = extra.map_or(0, |(s, n)| s.saturating_add(n));
        if layout.end().max(needed) > end {
            // What the file grew by is taken (clusters the image references past its end,
            // which count now, say): grow at least as much again, so that a long run of
            // them takes few rounds.
            let grown_by = end.saturating_sub(g.file_clusters).max(1);
            end = layout.end().max(needed).max(end.saturating_add(grown_by));
            continue;
        }
        return Ok(Some(Grown {
            len,
            analysis: counted,
            layout,
            extra,
        }));
    }
    Ok(None)
}

/// Where a rebuild puts the new refcount structure: refcount block number `blocks[i].0` at
/// cluster `blocks[i].1`, the table at `nt` clusters from `table`; `new` lists them all,
/// sorted.
pub(super) struct Layout {
    pub(super) table: u64,
    pub(super) nt: u64,
    pub(super) blocks: Vec<(u64, u64)>,
    pub(super) new: Vec<u64>,
}

impl Layout {
    /// One past the last cluster of the new structure.
    pub(super) fn end(&self) -> u64 {
        self.new.last().map_or(0, |&c| c + 1)
    }
}

/// Lays out a new refcount structure for the expected refcounts without the old structure's
/// own clusters (and with `extra` (start, count), clusters about to be referenced once), in
/// the [`Gaps`] of the file first. Only blocks that hold a non-zero refcount are written
/// (as QEMU does), so a huge sparse file gets a small structure. Nothing is written.
pub(super) fn plan_rebuild(
    a: &Analysis,
    path: &str,
    extra: Option<(u64, u64)>,
) -> Result<Layout, Error> {
    let g = a.g;
    let mut old: HashMap<u64, u64> = HashMap::new();
    for &c in &a.refstruct {
        *old.entry(c).or_default() += 1;
    }
    let (x_start, x_len) = extra.unwrap_or((0, 0));
    let is_extra = |c: u64| c >= x_start && c - x_start < x_len;
    let want = |c: u64| match a.counts.get(c) {
        0 => u64::from(is_extra(c)),
        e => e.saturating_sub(old.get(&c).copied().unwrap_or(0)),
    };
    let span = a.counts.len.max(x_start.saturating_add(x_len));
    // Blocks with references among the clusters counted so far.
    let mut blocks: std::collections::BTreeSet<u64> = (0..span.div_ceil(g.epb))
        .filter(|&b| {
            let (lo, hi) = (b * g.epb, ((b + 1) * g.epb).min(span));
            // Nothing counted and nothing extra: no cluster of the block is wanted.
            let extra_here = x_len > 0 && lo < x_start.saturating_add(x_len) && x_start < hi;
            (extra_here || !a.counts.zero_range(lo, hi)) && (lo..hi).any(|c| want(c) != 0)
        })
        .collect();
    let gaps = Gaps::new(a, 0, extra.into_iter().collect());
    // Place the table and the blocks, add the blocks that describe their clusters, and again
    // until nothing changes (the set of blocks only grows, so this ends).
    for _ in 0..64 {
        let top = blocks.last().map_or(0, |&b| b + 1);
        let nt = (top * 8).div_ceil(g.cs).max(1);
        if nt * g.cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{path}: a new refcount table would need {nt} clusters, more than the 8 MiB limit"
                ),
            ));
        }
        let table = gaps.run(nt);
        let in_table = |c: u64| c >= table && c - table < nt;
        let mut at = Vec::with_capacity(blocks.len());
        let mut cursor = 1;
        for &b in &blocks {
            let mut c = gaps.next(cursor);
            while in_table(c) {
                c = gaps.next(c + 1);
            }
            at.push((b, c));
            cursor = c + 1;
        }
        let mut new: Vec<u64> = (table..table + nt)
            .chain(at.iter().map(|&(_, c)| c))
            .collect();
        new.sort_unstable();
        let before = blocks.len();
        blocks.extend(new.iter().map(|&c| c / g.epb));
        let top2 = blocks.last().map_or(0, |&b| b + 1);
        if blocks.len() == before && (top2 * 8).div_ceil(g.cs).max(1) == nt {
            return Ok(Layout {
                table,
                nt,
                blocks: at,
                new,
            });
        }
    }
    Err(Error::new(
        ErrorKind::Corrupt,
        format!("{path}: cannot lay out a new refcount structure"),
    ))
}

/// Writes the new refcount table and blocks [`plan_rebuild`] laid out, counting themselves,
/// then points the header at them. The old structure's clusters become free.
pub(super) fn rebuild_refcounts(
    t: &mut Target,
    mut a: Analysis,
    layout: &Layout,
    log: &mut Log,
) -> Result<(), Error> {
    let g = a.g;
    log.push("Rebuilding refcount structure".to_owned());
    for c in std::mem::take(&mut a.refstruct) {
        let e = a.counts.get(c);
        a.counts.set(c, e.saturating_sub(1));
    }
    let (nt, nb) = (layout.nt, layout.blocks.len());

    let mut block = zeroed(g.cs, &t.path)?;
    let mut table = zeroed(nt * g.cs, &t.path)?;
    for &(b, cluster) in &layout.blocks {
        block.fill(0);
        for k in 0..g.epb {
            let c = b * g.epb + k;
            let v = if layout.new.binary_search(&c).is_ok() {
                1
            } else {
                a.counts.get(c)
            };
            if v != 0 {
                refcount_set(&mut block, g.order, k as usize, v).map_err(|v| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!("{}: refcount {v} does not fit the refcount width", t.path),
                    )
                })?;
            }
        }
        let at = cluster * g.cs;
        t.write(at, &block, "a new refcount block")?;
        let slot = (b * 8) as usize;
        if let Some(entry) = table.get_mut(slot..slot + 8) {
            entry.copy_from_slice(&at.to_be_bytes());
        }
    }
    t.sync()?;

    let table_off = layout.table * g.cs;
    t.write(table_off, &table, "the new refcount table")?;
    t.sync()?;

    // The table's offset and size, and with a wider width its order too, in one write of
    // the header's first sector: the old structure stays in use until it lands, whole.
    let from = field::REFCOUNT_TABLE_OFFSET;
    let to = if g.widened() {
        field::REFCOUNT_ORDER + 4
    } else {
        field::REFCOUNT_TABLE_CLUSTERS + 4
    };
    let mut h = vec![0u8; to - from];
    t.read(from as u64, &mut h, "the header")?;
    h[..8].copy_from_slice(&table_off.to_be_bytes());
    h[8..12].copy_from_slice(&(nt as u32).to_be_bytes());
    if g.widened() {
        let at = field::REFCOUNT_ORDER - from;
        h[at..].copy_from_slice(&g.order.to_be_bytes());
    }
    t.write(from as u64, &h, "the header")?;
    t.sync()?;
    log.push(format!(
        "Wrote a new refcount table at {table_off:#x} ({nt} clusters) and {nb} refcount blocks"
    ));
    if g.widened() {
        log.push(format!(
            "Widened the refcounts from {} to {} bits: a cluster is referenced more often than {}-bit refcounts can count, and a shared cluster counted as unshared would be written in place or freed while still in use",
            1u32 << g.file_order,
            1u32 << g.order,
            1u32 << g.file_order
        ));
    }
    Ok(())
}
