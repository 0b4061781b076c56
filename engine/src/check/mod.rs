//! Consistency check and repair of a QCOW2 image's reference counts, like `qemu-img check`.
//!
//! [`check`] recomputes the reference count every host cluster of the image file should have,
//! from everything that points at it (header, L1 tables of the active state and of every
//! internal snapshot, L2 tables, data and preallocated clusters, the host clusters a compressed
//! cluster's sectors touch, the snapshot table, the refcount table and blocks, the bitmap
//! directory, tables and data, the encryption header), counting the way QEMU's
//! `qcow2_check_refcounts` does, and compares it with the stored refcounts. It also checks what
//! QEMU checks along the way: alignment and reserved bits of table entries, subcluster bitmaps,
//! compressed clusters where they are not allowed, and the COPIED flags of the active L1 and L2
//! tables against the stored refcounts. With `repair` it rewrites the refcounts (in place when
//! the existing refcount blocks can hold them, otherwise as a new refcount structure in
//! clusters nothing references, or after the end of the file), fixes COPIED flags, clears the dirty and corrupt bits once nothing is
//! corrupt, and checks again. Every value read from the file is validated before it is used as
//! an offset, a size or an index; I/O errors end the check with an [`Error`].
#![forbid(unsafe_code)]

mod copied;
mod fields;
mod repair;
mod stored;
mod tables;
mod target;
mod walk;

use std::fmt;
use std::path::Path;

use crate::error::{Error, ErrorKind};
use crate::format::{autoclear, field, incompat, FormatError, Header, SnapshotTable};
use copied::{fix_copied_flags, FlagMode};
use fields::{l1_over_reftable_fields, snapshot_table_holds_reftable_fields, UnderSnapshotL1};
use repair::{
    fix_refcounts, fix_zero_entries, grows_towards, needs_rebuild, plan_grown, plan_rebuild,
    rebuild_refcounts, rewrite_snapshots,
};
use stored::Stored;
use target::{zeroed, Target};
use walk::{read_header, read_snapshots, Analysis};

/// Most memory the expected-refcount array of one check may take. The array holds one entry
/// of the image's refcount width per host cluster, up to the highest cluster that metadata
/// references (not the file's length: a huge sparse file costs only what it uses), as QEMU's
/// in-memory refcount table does; a check that would need more fails ("check not
/// completed").
pub const MAX_CHECK_MEMORY: u64 = 256 << 20;
/// Most memory a rehearsed repair ([`Target::rehearse`]) may take for the writes it would
/// make, besides its expected refcounts: the refcount blocks of a rebuild of a 2 TiB image
/// of 64 KiB clusters with 16-bit refcounts. A rehearsal that needs more is not made, and
/// neither is the rebuild it was for.
pub const MAX_REHEARSAL_MEMORY: u64 = 64 << 20;
/// How many mismatching clusters a report lists; the counts cover all of them.
pub const MAX_LISTED_CLUSTERS: usize = 100;
/// How many messages a report keeps; the rest are counted in one final message.
const MAX_MESSAGES: usize = 1000;

/// The result of [`check`]: what is inconsistent, and statistics as `qemu-img check` gives them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Errors that may corrupt data: clusters whose stored refcount is lower than the number
    /// of references, and invalid metadata (misaligned or reserved bits, wrong COPIED flags,
    /// references past the end of the file, ...).
    pub corruptions: u64,
    /// Clusters whose stored refcount is higher than the number of references.
    pub leaks: u64,
    /// The first [`MAX_LISTED_CLUSTERS`] clusters with too low a refcount, as
    /// (host offset, stored refcount, expected refcount).
    pub corrupt_clusters: Vec<(u64, u64, u64)>,
    /// The first [`MAX_LISTED_CLUSTERS`] leaked clusters, as
    /// (host offset, stored refcount, expected refcount).
    pub leaked_clusters: Vec<(u64, u64, u64)>,
    /// Corruptions the repair fixed (0 without repair).
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed (0 without repair).
    pub leaks_fixed: u64,
    /// One past the last byte of the highest host cluster that is referenced or has a
    /// non-zero refcount.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L2 tables (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Compressed guest clusters in the active L2 tables.
    pub compressed_clusters: u64,
    /// Allocated guest clusters that do not follow the previous one in the file (per L2
    /// table, as QEMU counts them; compressed clusters always count).
    pub fragmented_clusters: u64,
    /// Stored refcounts that could not be read (a misaligned refcount block), as QEMU
    /// counts them: the check is not complete (exit status 1).
    pub check_errors: u64,
    /// Whether the image was opened for repair (the counts describe the state after it).
    pub repaired: bool,
    /// What was found and done, one line each, worded like `qemu-img check`'s messages.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// The exit status `qemu-img check` would give: 1 when refcounts could not be read
    /// (check errors), else 0 when consistent, 2 when corruptions remain, 3 when only leaks
    /// remain. (A check that cannot run at all is an `Err` of [`check`], also status 1.)
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Prints the summary `qemu-img check` prints on stdout; [`CheckReport::messages`] are the
/// lines it prints on stderr and are not included.
impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.corruptions_fixed > 0 || self.leaks_fixed > 0 {
            write!(
                f,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            )?;
        }
        if self.check_errors > 0 {
            write!(
                f,
                "\n{} internal errors have occurred during the check.\n",
                self.check_errors
            )?;
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            writeln!(f, "No errors were found on the image.")?;
        } else {
            if self.corruptions > 0 {
                write!(
                    f,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                )?;
            }
            if self.leaks > 0 {
                write!(
                    f,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                )?;
            }
        }
        if self.total_clusters > 0 && self.allocated_clusters > 0 {
            let alloc = self.allocated_clusters as f64;
            writeln!(
                f,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                alloc * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / alloc,
                self.compressed_clusters as f64 * 100.0 / alloc,
            )?;
        }
        writeln!(f, "Image end offset: {}", self.image_end_offset)
    }
}

/// Checks the image at `path` and, with `repair`, repairs it.
///
/// Without `repair` the file is opened read-only with QEMU-compatible reader locks and nothing
/// is written. With `repair` it is opened read-write with writer locks; leaks and refcount
/// corruptions are fixed by rewriting refcounts, wrong COPIED flags are fixed, the dirty and
/// corrupt bits are cleared when no corruption remains, and the returned report describes the
/// image after the repair (`repaired` is set). Errors the repair cannot fix (such as
/// references past the end of the file) stay in the report's counts and messages.
///
/// `Err` means the check could not be completed: the file cannot be opened, locked, read or
/// written, its header is invalid or uses an unsupported feature, or checking it would need
/// more than [`MAX_CHECK_MEMORY`] bytes.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport, Error> {
    run(path, repair, false)
}

/// The repair a writable open runs on an image left dirty (lazy refcounts): [`check`] with
/// `repair`, except that, as QEMU refuses to open such an image when its refcounts cannot
/// all be read (check errors), it fails then, before writing anything.
pub(crate) fn repair_dirty(path: &Path) -> Result<CheckReport, Error> {
    run(path, true, true)
}

fn run(path: &Path, repair: bool, refuse_check_errors: bool) -> Result<CheckReport, Error> {
    let mut t = Target::open(path, repair)?;
    let mut log = Log::default();
    let header = read_header(&mut t)?;
    let (snapshots, cut) = read_snapshots(&mut t, &header, repair, &mut log)?;
    if cut > 0 {
        lower_snapshot_count(&mut t, &snapshots)?;
    }
    let first = analyze(&mut t, &snapshots)?;
    if refuse_check_errors && first.check_errors > 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: cannot repair the dirty image: {} refcounts cannot be read (a refcount block is misaligned); qcow2d check --repair rebuilds them",
                t.path, first.check_errors
            ),
        ));
    }
    header_notes(&first.header, &mut log);
    if repair {
        // What the repair does and why it refuses a write follows: it keeps its room.
        log.append_at_most(&first.log, MAX_MESSAGES / 2);
    } else {
        log.append(&first.log);
    }
    if !repair {
        let mut report = first.report(false);
        report.messages = log.into_vec();
        return Ok(report);
    }
    let found = (first.corruptions + cut, first.leaks);
    let (first, under) = match first.check_errors {
        0 => match fields::choose(&mut t, &snapshots, found)? {
            // `first` is counted again after the rehearsals, not held through them.
            Some((under, why)) => {
                log.push(why);
                (analyze(&mut t, &snapshots)?, under)
            }
            None => (first, UnderSnapshotL1::Keep),
        },
        _ => (first, UnderSnapshotL1::Keep),
    };
    let first = match widening(&mut t, &snapshots, &first, &mut log)? {
        Some(wide) => wide,
        None => first,
    };
    let widen = t.widen;
    let rebuild = needs_rebuild(&first);
    let rewrite = rewrites_snapshot_table(&first, &snapshots);
    // Refcounts fixed in place change how the COPIED flags are judged, and those of a table
    // the repair does not rewrite (its cluster is used by something else too) stay as they
    // are: they may be right by the stored refcount and wrong by the expected one.
    let in_place = !rebuild && !rewrite && first.mismatches > 0 && first.has_unwritable_table();
    if first.check_errors == 0 && !rebuild && !rewrite && !in_place {
        return repair_image(&mut t, first, snapshots, found, log, None, under);
    }
    // A new refcount structure (or a snapshot table written again, which may need one) is
    // rehearsed first, and made only where the repair with it leaves no more corruptions
    // than the check found. Laid out, it may grow the file over regions that ran past its
    // end, which then count: with a narrow refcount width, references to them may overflow
    // it, and COPIED flags that follow such a count may stay wrong. So are refcounts fixed in
    // place where a table the repair does not rewrite holds COPIED flags. Behind refcount
    // blocks the check cannot read, no more corruptions and leaks either: those blocks hide
    // the COPIED flags of the tables whose refcounts they hold (QEMU's check skips them); a
    // rebuild makes them readable, and the flags the repair cannot fix (in tables that share
    // their clusters with other metadata or data) count again.
    let unreadable = first.check_errors > 0;
    // With refcounts of 16 bits or more, the regions a grown file makes count cannot overflow
    // them (a cluster named 65,535 times over).
    let wide_refcounts = first.g.order >= 4;
    let rehearsed = rehearse_repair(&mut t, first, &snapshots, found, under);
    let refused = |why: String| Some(Refusal { why, in_place });
    let refusal = match rehearsed {
        Ok(r) if unreadable && (r.corruptions > found.0 || r.corruptions + r.leaks > found.0 + found.1) => refused(format!(
            "Not rebuilding the refcount structure: with the refcount blocks the check cannot read rebuilt, {} corruptions and {} leaks would remain where it found {} and {} (COPIED flags behind those blocks, in tables the repair does not rewrite)",
            r.corruptions, r.leaks, found.0, found.1
        )),
        Ok(r) if r.corruptions > found.0 => refused(if rebuild {
            format!(
                "Not rebuilding the refcount structure: rehearsed, the repair with a new one would leave {} corruptions where the check found {}",
                r.corruptions, found.0
            )
        } else if rewrite {
            format!(
                "Not writing the snapshot table again: rehearsed, the repair that writes it would leave {} corruptions where the check found {}",
                r.corruptions, found.0
            )
        } else {
            format!(
                "Not repairing the refcounts: rehearsed, the repair would leave {} corruptions where the check found {} (COPIED flags that follow the refcounts, in tables the repair does not rewrite)",
                r.corruptions, found.0
            )
        }),
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::Io => return Err(e),
        // Refcounts fixed in place without a rehearsal, as they always were (more memory
        // than a rehearsal may take, say): a dirty image needs them.
        Err(_) if in_place && !unreadable => None,
        // An image too large to rehearse whose refcount structure needs rebuilding: rebuilt
        // unrehearsed, as it always was, where the width leaves no room for overflow (a
        // refusal would leave it unrepairable); not behind unreadable blocks.
        Err(e) if e.kind() == ErrorKind::Unsupported && wide_refcounts && !unreadable => None,
        // Not known to end no worse (more memory than a rehearsal may take, or the repair
        // failed): not made.
        Err(e) => refused(format!(
            "Not rebuilding the refcount structure: the rebuild could not be rehearsed ({e})"
        )),
    };
    // The rehearsal ended the widening it made.
    t.widen = widen;
    let first = analyze(&mut t, &snapshots)?;
    repair_image(&mut t, first, snapshots, found, log, refusal, under)
}

/// The refcount order a repair widens refcounts of order `order` to, where references
/// overflow them: QEMU's default width (16 bits, which `qemu-img amend -o refcount_bits=16`
/// gives too) for narrower ones, twice the width for 16 and 32 bits; `None` for 64 bits,
/// which no count overflows.
fn wider_order(order: u32) -> Option<u32> {
    match order {
        0..=3 => Some(4),
        4 | 5 => Some(order + 1),
        _ => None,
    }
}

/// Where references overflow the image's refcount width (`first` counted them in it): the
/// analysis of the image with references counted in a wider one ([`wider_order`]), which
/// makes the repair rebuild the refcount structure in that width (the rebuild is rehearsed
/// as any other). Without it, a cluster shared more often than the width can count stays
/// counted at the maximum: with 1-bit refcounts a shared cluster takes the COPIED flag
/// (QEMU's repair sets it too) and is written in place under every reference, and with any
/// width, writes that copy it away free it while references remain.
///
/// Only version 3 images (the refcount width of version 2 ones is fixed at 16 bits) whose
/// first cluster is the header's alone: the new order is written in the header, with the
/// new table's offset and size, and nothing else may read those bytes. `None` (with
/// `t.widen` unset) where the image is not widened.
fn widening(
    t: &mut Target,
    snapshots: &SnapshotTable,
    first: &Analysis,
    log: &mut Log,
) -> Result<Option<Analysis>, Error> {
    let overflowed = first.overflowed.as_ref().is_none_or(|set| !set.is_empty());
    let order = match wider_order(first.g.order) {
        Some(order) if overflowed && first.header.version >= 3 => order,
        _ => return Ok(None),
    };
    let bits = 1u32 << order;
    t.widen = Some(order);
    // Both countings are alive meanwhile: together they stay within the check's memory.
    t.counts_held = first.counts.held();
    let wide = analyze(t, snapshots);
    t.counts_held = 0;
    let wide = match wide {
        Ok(wide) => wide,
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            t.widen = None;
            log.push(format!("Not widening the refcounts to {bits} bits: {e}"));
            return Ok(None);
        }
        Err(e) => {
            t.widen = None;
            return Err(e);
        }
    };
    if wide.expected_at(0) != Some(1) {
        t.widen = None;
        log.push(format!(
            "Not widening the refcounts to {bits} bits: the header's cluster is used by other metadata too"
        ));
        return Ok(None);
    }
    Ok(Some(wide))
}

/// Why a rehearsal ([`rehearse_repair`]) refused part of a repair: a new refcount structure
/// and the snapshot table written again, and with `in_place` the refcounts fixed in place too.
struct Refusal {
    why: String,
    in_place: bool,
}

/// Whether the repair of `a` writes the snapshot table again (entries with truncated or
/// missing extra data): the new table needs refcounts, and may need a new refcount
/// structure or a longer file.
fn rewrites_snapshot_table(a: &Analysis, snapshots: &SnapshotTable) -> bool {
    snapshots.extra_truncated > 0 || (a.header.version >= 3 && snapshots.incomplete() > 0)
}

/// As QEMU does when a repair drops snapshots off the end of the table: lowers the count in
/// the header at once (what was dropped leaks, and is freed by the refcount repair).
fn lower_snapshot_count(t: &mut Target, snapshots: &SnapshotTable) -> Result<(), Error> {
    t.write(
        field::NB_SNAPSHOTS as u64,
        &(snapshots.entries.len() as u32).to_be_bytes(),
        "the snapshot count",
    )?;
    t.sync()
}

/// What the repair of `first` would leave, made in memory only ([`Target::rehearse`]).
fn rehearse_repair(
    t: &mut Target,
    first: Analysis,
    snapshots: &SnapshotTable,
    found: (u64, u64),
    under: UnderSnapshotL1,
) -> Result<CheckReport, Error> {
    t.rehearse(|t| {
        repair_image(
            t,
            first,
            snapshots.clone(),
            found,
            Log::default(),
            None,
            under,
        )
    })
}

/// The repair after the first analysis (`first`; the check found `found` corruptions,
/// counting the snapshots dropped off the table, and leaks): zero entries, the snapshot
/// table, the refcounts, the COPIED flags, the header's flags, and the report of the image
/// as it is left. With `refusal` no new refcount structure is written, nor the snapshot
/// table written again (nor refcounts fixed in place, where it says so); `under` says
/// whether one is written where a snapshot's L1 table covers the header's fields.
fn repair_image(
    t: &mut Target,
    mut first: Analysis,
    mut snapshots: SnapshotTable,
    found: (u64, u64),
    mut log: Log,
    refusal: Option<Refusal>,
    under: UnderSnapshotL1,
) -> Result<CheckReport, Error> {
    let (first_corruptions, first_leaks) = found;
    // The writes made when `first` was made.
    let mut first_writes = t.writes;
    if fix_zero_entries(t, &first, &mut log)? > 0 {
        first = analyze(t, &snapshots)?;
        first_writes = t.writes;
    }
    if rewrites_snapshot_table(&first, &snapshots) {
        match &refusal {
            None => {
                if let Some(table) = rewrite_snapshots(t, &first, &snapshots, under, &mut log)? {
                    snapshots = table;
                    first = analyze(t, &snapshots)?;
                    first_writes = t.writes;
                }
            }
            // Said by the refcount repair when it is refused there.
            Some(r) if !needs_rebuild(&first) => log.push(r.why.clone()),
            Some(_) => {}
        }
    }
    let kept = if first.mismatches > 0 || first.rebuild || first.g.widened() {
        repair_refcounts(t, first, &snapshots, refusal, under, &mut log)?;
        // Widened or not, what follows counts in the width the file now has.
        t.widen = None;
        None
    } else {
        Some(Kept {
            analysis: first,
            writes: first_writes,
        })
    };
    let kept = fix_remaining_copied_flags(t, &snapshots, kept, &mut log)?;
    // Header writes come before the final analysis, which must see the file as a fresh
    // check will (an L2 table may share the header's cluster).
    clear_unknown_autoclear(t, &mut log)?;
    let fin = clear_dirty_and_corrupt(t, &snapshots, kept, &mut log)?;
    Ok(repaired_report(fin, first_corruptions, first_leaks, log))
}

/// Makes the refcounts right (`first` found mismatches, or refcounts that cannot be fixed in
/// place): in place, or as a new refcount structure, unless where that would go is where a
/// reference past the end of the file points.
fn repair_refcounts(
    t: &mut Target,
    mut first: Analysis,
    snapshots: &SnapshotTable,
    refusal: Option<Refusal>,
    under: UnderSnapshotL1,
    log: &mut Log,
) -> Result<(), Error> {
    if let Some(r) = refusal.filter(|r| r.in_place || needs_rebuild(&first)) {
        log.push(r.why);
        return Ok(());
    }
    // Whether the refcounts can be made right is decided before anything is written: the
    // COPIED flags are judged by the refcounts, so they change only with them.
    let layout = if needs_rebuild(&first) {
        Some(plan_rebuild(&first, &t.path, None)?)
    } else {
        None
    };
    if layout.is_some()
        && snapshot_table_holds_reftable_fields(first.header.snapshots_offset, snapshots)
    {
        // The rebuild points the header at the new table: those bytes are a snapshot
        // table entry's too, which the repair never writes over.
        log.push(
            "Not rebuilding the refcount structure: the snapshot table holds the header's refcount table fields"
                .to_owned(),
        );
        return Ok(());
    }
    if layout.is_some() {
        if let Some(table) = l1_over_reftable_fields(&first.header, snapshots, under) {
            // The header's refcount table offset is an entry of that L1 table: the new table
            // is an L2 table too, its entries data clusters, and each new refcount block
            // referenced twice. No structure is consistent there; a rebuild would only
            // move the corruptions.
            log.push(format!(
                "Not rebuilding the refcount structure: {table} covers the header's refcount table offset and size, which a new structure would change"
            ));
            return Ok(());
        }
    }
    let blocked = layout
        .as_ref()
        .and_then(|l| grows_towards(&first, l.end(), first.past_eof_from).map(|f| (f, l.end())));
    let mut grown = None;
    if let Some((from, end)) = blocked {
        // The new structure, where the file has no room for it, would grow the file to
        // where a reference past its end points (or within a cluster of it), which would
        // then count. Grown past every such region, the file counts them all.
        grown = plan_grown(t, snapshots, &first, end, |_| None)?;
        if grown.is_none() {
            log.push(format!(
                "Not rebuilding the refcount structure: a reference past the end of the file points at {from:#x}, where the new one would go"
            ));
            return Ok(());
        }
    }
    // Clearing COPIED is always safe, setting it only once the refcount is right.
    fix_copied_flags(t, &mut first, FlagMode::ClearUnsafe, log)?;
    if let Some(g) = grown {
        t.grow(g.len)?;
        t.sync()?;
        log.push(format!(
            "Growing the file to {:#x} bytes: the regions that ran past its end count there",
            g.len
        ));
        rebuild_refcounts(t, g.analysis, &g.layout, log)?;
    } else {
        let Some(layout) = layout else {
            return fix_refcounts(t, first, log);
        };
        rebuild_refcounts(t, first, &layout, log)?;
    }
    // The header names the new table now: where its cluster is also walked as an L2 table
    // (an L1 entry without an offset), that moved a reference. Count again and fix what
    // moved in place, as QEMU's second pass after a rebuild does.
    let mut again = analyze(t, snapshots)?;
    if again.mismatches > 0 && !needs_rebuild(&again) {
        fix_copied_flags(t, &mut again, FlagMode::ClearUnsafe, log)?;
        fix_refcounts(t, again, log)?;
    }
    Ok(())
}

/// An analysis, and how many writes the repair had made when it was made.
struct Kept {
    analysis: Analysis,
    writes: u64,
}

impl Kept {
    /// `analysis`, made since the last write.
    fn now(t: &Target, analysis: Analysis) -> Kept {
        Kept {
            analysis,
            writes: t.writes,
        }
    }
}

/// The analysis of the file as it is now: `kept` when nothing was written since it was
/// made (an analysis depends only on the file and the snapshot table, so a new one would
/// find the same), else a new one. A repair that finds nothing to write analyses once.
fn analysis_now(
    t: &mut Target,
    snapshots: &SnapshotTable,
    kept: Option<Kept>,
) -> Result<Analysis, Error> {
    match kept {
        Some(k) if k.writes == t.writes => Ok(k.analysis),
        _ => analyze(t, snapshots),
    }
}

/// After the refcount repair: fixes the COPIED flags still wrong, by the refcounts when they
/// are consistent now, else by the stored ones without ever setting a flag on a cluster that
/// may be shared. Returns the analysis when it found nothing to fix.
fn fix_remaining_copied_flags(
    t: &mut Target,
    snapshots: &SnapshotTable,
    kept: Option<Kept>,
    log: &mut Log,
) -> Result<Option<Kept>, Error> {
    let mut second = analysis_now(t, snapshots, kept)?;
    if second.corruptions == 0 {
        return Ok(Some(Kept::now(t, second)));
    }
    if second.mismatches == 0 && !second.rebuild {
        fix_copied_flags(t, &mut second, FlagMode::Fix, log)?;
    } else {
        log.push(
            "Fixing COPIED flags by the stored refcounts, never setting one on a cluster that may be shared: the refcounts are still inconsistent"
                .to_owned(),
        );
        fix_copied_flags(t, &mut second, FlagMode::FixStored, log)?;
    }
    Ok(None)
}

/// Clears the autoclear bits nothing maintains, as QEMU does when it opens an image for
/// writing.
fn clear_unknown_autoclear(t: &mut Target, log: &mut Log) -> Result<(), Error> {
    let header = read_header(t)?;
    let unknown_autoclear = header.autoclear_features & !autoclear::KNOWN;
    if unknown_autoclear == 0 {
        return Ok(());
    }
    t.write(
        field::AUTOCLEAR as u64,
        &(header.autoclear_features & autoclear::KNOWN).to_be_bytes(),
        "the autoclear features",
    )?;
    t.sync()?;
    log.push(format!(
        "Cleared the unknown autoclear feature bits {unknown_autoclear:#x}"
    ));
    Ok(())
}

/// The final analysis, of the snapshot table the file holds now (as a fresh check reads it);
/// when it finds the image consistent (version 3), the dirty and corrupt bits are cleared and
/// the image analysed again.
fn clear_dirty_and_corrupt(
    t: &mut Target,
    snapshots: &SnapshotTable,
    kept: Option<Kept>,
    log: &mut Log,
) -> Result<Analysis, Error> {
    let now = snapshots_now(t)?;
    // An analysis made with the table the repair held counts what a fresh check will only
    // when the file still holds that table.
    let kept = kept.filter(|_| now == *snapshots);
    let fin = analysis_now(t, &now, kept)?;
    if fin.corruptions != 0 || fin.check_errors != 0 || fin.header.version < 3 {
        return Ok(fin);
    }
    let flags = incompat::DIRTY | incompat::CORRUPT;
    let old = fin.header.incompatible_features;
    if old & flags == 0 {
        return Ok(fin);
    }
    t.write(
        field::INCOMPATIBLE as u64,
        &(old & !flags).to_be_bytes(),
        "the incompatible features",
    )?;
    t.sync()?;
    log.push(format!(
        "Cleared the {} in the header",
        fin.header
            .feature_list(crate::format::FeatureKind::Incompatible, old & flags)
    ));
    // The header's cluster may hold part of the table too.
    let now = snapshots_now(t)?;
    analyze(t, &now)
}

/// The snapshot table as a fresh check reads it from the file now, for the double check: the
/// repair keeps the table it read (or wrote) at the start, but its later writes (a COPIED
/// flag, a refcount, the header) land in clusters a damaged image's table may share with an
/// L2 table, a refcount block or the header.
fn snapshots_now(t: &mut Target) -> Result<SnapshotTable, Error> {
    let header = read_header(t)?;
    let (table, _) = read_snapshots(t, &header, false, &mut Log::default())?;
    Ok(table)
}

/// The report of a repair: the final analysis (`fin`), what was fixed since the first one
/// found `first_corruptions` and `first_leaks`, what the repair did (`log`), then what the
/// double check still finds.
fn repaired_report(
    fin: Analysis,
    first_corruptions: u64,
    first_leaks: u64,
    log: Log,
) -> CheckReport {
    let mut report = fin.report(true);
    let mut still = Log::default();
    if fin.corruptions > 0 {
        header_notes(&fin.header, &mut still);
    }
    still.append(&fin.log);
    report.messages = still.into_vec();
    report.corruptions_fixed = first_corruptions.saturating_sub(report.corruptions);
    report.leaks_fixed = first_leaks.saturating_sub(report.leaks);
    let mut messages = log.into_vec();
    if !report.messages.is_empty() {
        messages.push("Double checking the fixed image now...".to_owned());
        messages.append(&mut report.messages);
    }
    report.messages = messages;
    report
}

/// One analysis of the image: the expected refcounts counted (`walk.rs`), compared with the
/// stored ones (`stored.rs`), and the COPIED flags checked against them (`copied.rs`).
fn analyze(t: &mut Target, snapshots: &SnapshotTable) -> Result<Analysis, Error> {
    let mut a = walk::count(t, snapshots)?;
    let mut stored = Stored::new(&a);
    a.compare(t, &mut stored)?;
    let mut unused = Log::default();
    a.copied_pass(t, &mut stored, FlagMode::Check, &mut unused)?;
    Ok(a)
}

/// Notes on the header's dirty and corrupt bits (not counted as errors, as in QEMU).
fn header_notes(h: &Header, log: &mut Log) {
    if h.incompatible_features & incompat::DIRTY != 0 {
        log.push(
            "The image is marked dirty: its refcounts may be stale (lazy refcounts)".to_owned(),
        );
    }
    if h.incompatible_features & incompat::CORRUPT != 0 {
        log.push("The image is marked corrupt".to_owned());
    }
}

fn format_error(path: &str, e: FormatError) -> Error {
    let kind = match e {
        FormatError::UnsupportedFeature { .. }
        | FormatError::Encrypted(_)
        | FormatError::UnsupportedVersion(_) => ErrorKind::Unsupported,
        _ => ErrorKind::InvalidImage,
    };
    Error::with_source(kind, format!("Cannot check {path}"), e)
}

/// Messages, bounded so that a garbage image cannot make the report unbounded.
#[derive(Clone, Debug, Default)]
struct Log {
    lines: Vec<String>,
    dropped: u64,
}

impl Log {
    fn push(&mut self, line: String) {
        if self.lines.len() < MAX_MESSAGES {
            self.lines.push(line);
        } else {
            self.dropped += 1;
        }
    }

    /// [`Log::push`] of a message formatted only when it is kept.
    fn push_fmt(&mut self, line: fmt::Arguments<'_>) {
        if self.lines.len() < MAX_MESSAGES {
            self.lines.push(line.to_string());
        } else {
            self.dropped += 1;
        }
    }

    fn append(&mut self, other: &Log) {
        for line in &other.lines {
            self.push(line.clone());
        }
        self.dropped += other.dropped;
    }

    /// Appends at most `max` of `other`'s lines, and counts the rest in one line at once.
    fn append_at_most(&mut self, other: &Log, max: usize) {
        let kept = other.lines.len().min(max);
        for line in &other.lines[..kept] {
            self.push(line.clone());
        }
        let dropped = other.dropped + (other.lines.len() - kept) as u64;
        if dropped > 0 && self.lines.len() < MAX_MESSAGES {
            self.push(format!("... and {dropped} more messages"));
        } else {
            self.dropped += dropped; // Counted in the final line.
        }
    }

    fn into_vec(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.lines
                .push(format!("... and {} more messages", self.dropped));
        }
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(corruptions: u64, leaks: u64) -> CheckReport {
        CheckReport {
            corruptions,
            leaks,
            image_end_offset: 327680,
            total_clusters: 64,
            allocated_clusters: 2,
            ..CheckReport::default()
        }
    }

    #[test]
    fn a_bounded_append_leaves_room_and_counts_what_it_drops() {
        let mut found = Log::default();
        for i in 0..MAX_MESSAGES + 5 {
            found.push(format!("found {i}"));
        }
        let mut log = Log::default();
        log.append_at_most(&found, 10);
        log.push("did".to_owned());
        let v = log.into_vec();
        assert_eq!(v.len(), 12, "{v:?}");
        assert_eq!(v[9], "found 9");
        assert_eq!(v[10], format!("... and {} more messages", MAX_MESSAGES - 5));
        assert_eq!(v[11], "did");
        let mut log = Log::default();
        log.append_at_most(&found, MAX_MESSAGES * 2);
        assert_eq!(log.lines.len(), MAX_MESSAGES);
        assert_eq!(log.dropped, 5);
    }

    #[test]
    fn display_and_exit_code_follow_qemu_img() {
        let r = report(0, 0);
        assert_eq!(r.exit_code(), 0);
        assert_eq!(
            r.to_string(),
            "No errors were found on the image.\n2/64 = 3.12% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 327680\n"
        );
        let r = report(0, 3);
        assert_eq!(r.exit_code(), 3);
        assert!(r
            .to_string()
            .contains("\n3 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"));
        let r = report(2, 3);
        assert_eq!(r.exit_code(), 2);
        let s = r.to_string();
        assert!(s.contains("\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"), "{s}");
        assert!(s.ends_with("Image end offset: 327680\n"));
    }
}
