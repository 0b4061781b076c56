//! The header's refcount table fields (offset and size, bytes 48..60), which a rebuild of the
//! refcount structure writes, and the tables a damaged image lays over them: whether a
//! rebuild may go ahead, and, where a snapshot's L1 table covers them, which of the two
//! repairs (rebuilding through that L1 table or not) ends with fewer errors. Runs on the
//! checking thread, within [`super::check`].

use super::{analyze, rehearse_repair, Target};
use crate::error::{Error, ErrorKind};
use crate::format::{Header, SnapshotTable, REFCOUNT_TABLE_FIELDS};

/// What a rebuild of the refcount structure does with the header's refcount table fields
/// where a snapshot's L1 table covers them (see [`choose`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UnderSnapshotL1 {
    /// No rebuild there: the repair fixes what it can in place.
    Keep,
    /// The rebuild writes them, and with them that L1 table's entries 6 and 7.
    Rewrite,
}

/// Whether `len` bytes at file offset `off` overlap the header's refcount table fields,
/// which a rebuild of the refcount structure writes.
pub(super) fn covers_reftable_fields(off: u64, len: u64) -> bool {
    off < REFCOUNT_TABLE_FIELDS.end && off.saturating_add(len) > REFCOUNT_TABLE_FIELDS.start
}

fn l1_covers(off: u64, size: u32) -> bool {
    covers_reftable_fields(off, u64::from(size) * 8)
}

/// The L1 table (the active one, or, unless `under` lets a rebuild write through them, a
/// snapshot's) that covers the header's refcount table offset or size, which a rebuild of the
/// refcount structure writes; as a message's subject.
pub(super) fn l1_over_reftable_fields(
    h: &Header,
    snapshots: &SnapshotTable,
    under: UnderSnapshotL1,
) -> Option<String> {
    if l1_covers(h.l1_table_offset, h.l1_size) {
        return Some(format!("the active L1 table at {:#x}", h.l1_table_offset));
    }
    if under == UnderSnapshotL1::Rewrite {
        return None;
    }
    snapshot_l1_over_reftable_fields(snapshots)
        .map(|k| format!("the L1 table of snapshot table entry {k}"))
}

/// The first snapshot table entry whose L1 table covers the header's refcount table fields.
fn snapshot_l1_over_reftable_fields(snapshots: &SnapshotTable) -> Option<usize> {
    snapshots
        .entries
        .iter()
        .position(|e| l1_covers(e.l1_table_offset, e.l1_size))
}

/// Whether the snapshot table (as read, with entries) at `offset` covers the header's
/// refcount table offset and size, which a rebuild writes.
pub(super) fn snapshot_table_holds_reftable_fields(offset: u64, snapshots: &SnapshotTable) -> bool {
    !snapshots.entries.is_empty() && covers_reftable_fields(offset, snapshots.size_bytes)
}

/// Where a snapshot's L1 table covers the header's refcount table fields, which of the two
/// repairs is made: both are rehearsed ([`Target::rehearse`]), and the rebuild through that
/// table is made only when it ends with fewer corruptions than the repair without it (or as
/// many and fewer leaks), and with no more corruptions, nor corruptions and leaks, than the
/// check found (`found`). `None` where no snapshot's L1 table covers them; else the choice,
/// and a message that says why.
///
/// Such a table starts in the header's cluster: entry 0 is the header's magic (reserved
/// bits set, so it names nothing), entry 6 the refcount table's offset (that table walked
/// as an L2 table, the refcount blocks as data clusters), entry 7 its size and the snapshot
/// count. What the snapshot reads through them is the image's own metadata, never guest
/// data, which the repair already writes there (the snapshot count, the dirty bit, the
/// snapshot table's offset). A rebuild leaves the new refcount blocks referenced twice,
/// though (as blocks and as that snapshot's data), which may end worse: QEMU's repair always
/// rebuilds there, and sometimes adds corruptions.
pub(super) fn choose(
    t: &mut Target,
    snapshots: &SnapshotTable,
    found: (u64, u64),
) -> Result<Option<(UnderSnapshotL1, String)>, Error> {
    let Some(k) = snapshot_l1_over_reftable_fields(snapshots) else {
        return Ok(None);
    };
    let rehearse = |t: &mut Target, under| -> Result<Option<(u64, u64)>, Error> {
        let first = analyze(t, snapshots)?;
        match rehearse_repair(t, first, snapshots, found, under) {
            Ok(r) => Ok(Some((r.corruptions, r.leaks))),
            Err(e) if e.kind() == ErrorKind::Io => Err(e),
            // Not known to end no worse (more memory than a rehearsal may take, or the
            // repair failed).
            Err(_) => Ok(None),
        }
    };
    let Some(through) = rehearse(t, UnderSnapshotL1::Rewrite)? else {
        return Ok(Some((
            UnderSnapshotL1::Keep,
            format!("The L1 table of snapshot table entry {k} covers the header's refcount table offset and size, and a rebuild through it could not be rehearsed"),
        )));
    };
    let kept = rehearse(t, UnderSnapshotL1::Keep)?;
    let under = decide(through, kept, found);
    let without = kept.map_or_else(
        || "could not be rehearsed".to_owned(),
        |(c, l)| format!("{c} and {l}"),
    );
    let done = match under {
        UnderSnapshotL1::Rewrite => "rebuilding through it",
        UnderSnapshotL1::Keep => "not rebuilding through it",
    };
    Ok(Some((
        under,
        format!(
            "The L1 table of snapshot table entry {k} covers the header's refcount table offset and size: rehearsed, a rebuild through it leaves {} corruptions and {} leaks, the repair without it {without} (the check found {} and {}); {done}",
            through.0, through.1, found.0, found.1
        ),
    )))
}

/// The choice of [`choose`] from the (corruptions, leaks) the rehearsed rebuild through the
/// snapshot's L1 table leaves (`through`), those the repair without it leaves (`kept`, `None`
/// when it could not be rehearsed), and those the check found.
fn decide(through: (u64, u64), kept: Option<(u64, u64)>, found: (u64, u64)) -> UnderSnapshotL1 {
    // `a` is no worse than `b` when it has no more corruptions, nor corruptions and leaks.
    let no_worse = |a: (u64, u64), b: (u64, u64)| a.0 <= b.0 && a.0 + a.1 <= b.0 + b.1;
    if no_worse(through, found) && kept.is_none_or(|k| no_worse(through, k) && through != k) {
        UnderSnapshotL1::Rewrite
    } else {
        UnderSnapshotL1::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refcount table's fields are header bytes 48..60: a table ending at 48 or starting
    /// at 60 leaves them alone, one byte into them covers them.
    #[test]
    fn the_refcount_table_fields_are_header_bytes_48_to_60() {
        assert_eq!(REFCOUNT_TABLE_FIELDS, 48..60);
        assert!(!covers_reftable_fields(40, 8));
        assert!(covers_reftable_fields(40, 9));
        assert!(covers_reftable_fields(59, 1));
        assert!(!covers_reftable_fields(60, 8));
        assert!(covers_reftable_fields(0, 1 << 16));
        assert!(!covers_reftable_fields(u64::MAX - 4, 8));
    }

    /// The rebuild through a snapshot's L1 table is made only when it ends better than the
    /// repair without it and no worse than what the check found.
    #[test]
    fn a_rebuild_through_a_snapshot_l1_table_is_made_only_where_it_ends_better() {
        use UnderSnapshotL1::{Keep, Rewrite};
        let found = (116, 11);
        // Fewer corruptions, and fewer corruptions and leaks, than either.
        assert_eq!(decide((75, 2), Some((116, 11)), found), Rewrite);
        // As many corruptions, fewer leaks.
        assert_eq!(decide((116, 2), Some((116, 11)), found), Rewrite);
        // Exactly what the repair without it leaves: not made.
        assert_eq!(decide((80, 1), Some((80, 1)), found), Keep);
        // Fewer corruptions, more corruptions and leaks.
        assert_eq!(decide((100, 40), Some((110, 11)), found), Keep);
        // More corruptions than the repair without it.
        assert_eq!(decide((90, 0), Some((80, 20)), found), Keep);
        // More than the check found, although the repair without it is worse still.
        assert_eq!(decide((120, 0), Some((130, 0)), found), Keep);
        // The repair without it could not be rehearsed: judged against what was found.
        assert_eq!(decide((75, 2), None, found), Rewrite);
        assert_eq!(decide((117, 0), None, found), Keep);
    }
}
