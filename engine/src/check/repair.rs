//! What a repair writes, apart from COPIED flags: misaligned preallocated zero entries made
//! plain zero entries, the snapshot table written again, and the refcounts made equal to the
//! expected ones, in place or as a new refcount structure appended to the file. Each step
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
    SNAPSHOT_KNOWN_EXTRA_BYTES,
};

/// Turns entries that reference a preallocated zero cluster at a misaligned offset (and hold
/// no data) into plain zero entries, as QEMU's repair does; an entry whose L2 table shares
/// its cluster with other metadata is left alone. Returns how many entries changed.
pub(super) fn fix_zero_entries(t: &mut Target, a: &Analysis, log: &mut Log) -> Result<u64, Error> {
    let g = a.g;
    let mut fixed = 0u64;
    for &(l2_off, j) in &a.zero_fixes {
        let refs = a.l2_tables.get(&l2_off).map_or(0, |u| u.refs);
        if refs == 0 || l2_off == 0 || a.expected_at(l2_off >> g.cb) != Some(refs) {
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
/// extra data version 3 requires; extra data QEMU would refuse truncated), at a cluster
/// past everything the image references or counts, then points the header at it. The old
/// table leaks and the new one has no refcount yet: the refcount repair that follows fixes
/// both. `None` (nothing written) when a reference past the end of the file starts too
/// close to where the table and a new refcount structure after it would go.
pub(super) fn rewrite_snapshots(
    t: &mut Target,
    a: &Analysis,
    table: &SnapshotTable,
    log: &mut Log,
) -> Result<Option<SnapshotTable>, Error> {
    let g = a.g;
    let bytes = crate::format::encode_snapshot_table(&table.entries, a.header.size);
    let mut stored = Stored::new(a);
    let mut end = a.g.file_clusters.max(a.counts.len);
    // Past every cluster a stored refcount claims, too.
    for b in 0..stored.table.len() as u64 {
        if let Block::At(_) = stored.read_block_of(b) {
            for c in (b * g.epb..(b + 1) * g.epb).rev() {
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
    // Never over the old table, which the header names until the new one is durable.
    let (old_start, old_end) = (
        a.header.snapshots_offset,
        a.header
            .snapshots_offset
            .saturating_add(table.size_bytes)
            .div_ceil(g.cs),
    );
    if old_start < (end + table_clusters).saturating_mul(g.cs) && old_end > end {
        end = old_end;
    }
    let at = end << g.cb;
    // The table, then the refcount structure a rebuild may append after it (less than as
    // many clusters again, plus a few), must stay clear of the references past the end of
    // the file other than the old table, or they would count: the table would then have no
    // refcounts.
    let grown = end + table_clusters;
    if a.past_eof_from_but_table
        < grown
            .saturating_mul(2)
            .saturating_add(5)
            .saturating_mul(g.cs)
    {
        log.push(format!(
            "Not writing the snapshot table again: a reference past the end of the file points at {:#x}, where the repair would write",
            a.past_eof_from_but_table
        ));
        return Ok(None);
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
/// one is broken, or a cluster with references has no valid block to hold its refcount.
pub(super) fn needs_rebuild(a: &Analysis) -> bool {
    let stored = Stored::new(a);
    a.rebuild
        || (0..a.counts.len)
            .any(|c| a.counts.get(c) != 0 && !matches!(stored.block_of(c / a.g.epb), Block::At(_)))
}

/// Makes the stored refcounts equal to the expected ones in place, when every refcount that
/// must change has a valid block (not [`needs_rebuild`]).
pub(super) fn fix_refcounts(t: &mut Target, a: Analysis, log: &mut Log) -> Result<(), Error> {
    let g = a.g;
    let stored = Stored::new(&a);

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

/// Where a rebuild puts the new refcount structure, after the end of the file: `nb` blocks
/// at clusters `start..start + nb` (block i describes the clusters of refcount block number
/// `blocks[i]`), then `nt` clusters of refcount table.
pub(super) struct Layout {
    pub(super) start: u64,
    pub(super) nb: u64,
    pub(super) nt: u64,
    pub(super) blocks: Vec<u64>,
}

impl Layout {
    /// One past the last cluster of the new structure.
    pub(super) fn end(&self) -> u64 {
        self.start + self.nb + self.nt
    }
}

/// Lays out a new refcount structure for the expected refcounts without the old structure's
/// own clusters. Only blocks that hold a non-zero refcount are written (as QEMU does), so a
/// huge sparse file gets a small structure. Nothing is written.
pub(super) fn plan_rebuild(a: &Analysis, path: &str) -> Result<Layout, Error> {
    let g = a.g;
    let mut old: HashMap<u64, u64> = HashMap::new();
    for &c in &a.refstruct {
        *old.entry(c).or_default() += 1;
    }
    let expected = |c: u64| match a.counts.get(c) {
        0 => 0,
        e => e.saturating_sub(old.get(&c).copied().unwrap_or(0)),
    };
    let start = g.file_clusters + u64::from(expected(g.file_clusters) > 0);
    // Blocks with references among the clusters counted so far.
    let used: Vec<u64> = (0..a.counts.len.div_ceil(g.epb))
        .filter(|&b| (b * g.epb..((b + 1) * g.epb).min(a.counts.len)).any(|c| expected(c) != 0))
        .collect();
    // The new blocks at `start..start + nb`, the table after them; the blocks that describe
    // those clusters are part of the structure too.
    let (mut nb, mut nt) = (0u64, 0u64);
    let mut blocks = used.clone();
    for _ in 0..64 {
        let end = start + nb + nt;
        let mut all = used.clone();
        all.extend((start / g.epb)..end.div_ceil(g.epb));
        all.sort_unstable();
        all.dedup();
        let nb2 = all.len() as u64;
        let top = all.last().map_or(0, |&b| b + 1);
        let nt2 = (top * 8).div_ceil(g.cs).max(1);
        blocks = all;
        if (nb2, nt2) == (nb, nt) {
            break;
        }
        (nb, nt) = (nb2, nt2);
    }
    let end = start + nb + nt;
    if blocks.len() as u64 != nb
        || (start / g.epb..end.div_ceil(g.epb)).any(|b| blocks.binary_search(&b).is_err())
    {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{path}: cannot lay out a new refcount structure"),
        ));
    }
    if nt * g.cs > MAX_REFCOUNT_TABLE_BYTES {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{path}: a new refcount table would need {nt} clusters, more than the 8 MiB limit"
            ),
        ));
    }
    Ok(Layout {
        start,
        nb,
        nt,
        blocks,
    })
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
    let (start, nb, nt, end) = (layout.start, layout.nb, layout.nt, layout.end());
    let blocks = &layout.blocks;

    // Block i of the new structure describes `blocks[i]` and lives at cluster start + i.
    let mut block = zeroed(g.cs, &t.path)?;
    let mut table = zeroed(nt * g.cs, &t.path)?;
    for (i, &b) in (0u64..).zip(blocks.iter()) {
        block.fill(0);
        for k in 0..g.epb {
            let c = b * g.epb + k;
            let v = if (start..end).contains(&c) {
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
        let at = (start + i) * g.cs;
        t.write(at, &block, "a new refcount block")?;
        let slot = (b * 8) as usize;
        if let Some(entry) = table.get_mut(slot..slot + 8) {
            entry.copy_from_slice(&at.to_be_bytes());
        }
    }
    t.sync()?;

    let table_off = (start + nb) * g.cs;
    t.write(table_off, &table, "the new refcount table")?;
    t.sync()?;

    let mut h = [0u8; 12];
    h[..8].copy_from_slice(&table_off.to_be_bytes());
    h[8..].copy_from_slice(&(nt as u32).to_be_bytes());
    t.write(field::REFCOUNT_TABLE_OFFSET as u64, &h, "the header")?;
    t.sync()?;
    log.push(format!(
        "Wrote a new refcount table at {table_off:#x} ({nt} clusters) and {nb} refcount blocks"
    ));
    Ok(())
}
