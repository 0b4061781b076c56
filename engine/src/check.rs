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
//! the existing refcount blocks can hold them, otherwise as a new refcount structure appended
//! to the file), fixes COPIED flags, clears the dirty and corrupt bits once nothing is
//! corrupt, and checks again. Every value read from the file is validated before it is used as
//! an offset, a size or an index; I/O errors end the check with an [`Error`].
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, ErrorKind};
use crate::format::{
    autoclear, field, incompat, refcount_get, refcount_max, refcount_set, CompressedDescriptor,
    FormatError, Header, L2Entry, SnapshotReadError, SnapshotTable, MAX_L1_BYTES,
    MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, SNAPSHOT_HEADER_BYTES, SNAPSHOT_KNOWN_EXTRA_BYTES,
};
use crate::io::{lock_file, BlockingReader, LockError, Role};

/// Most memory the expected-refcount array of one check may take. The array holds one entry
/// of the image's refcount width per host cluster, up to the highest cluster that metadata
/// references (not the file's length: a huge sparse file costs only what it uses), as QEMU's
/// in-memory refcount table does; a check that would need more fails ("check not
/// completed").
pub const MAX_CHECK_MEMORY: u64 = 256 << 20;
/// How many mismatching clusters a report lists; the counts cover all of them.
pub const MAX_LISTED_CLUSTERS: usize = 100;
/// How many messages a report keeps; the rest are counted in one final message.
const MAX_MESSAGES: usize = 1000;

/// L1 entry: offset of the L2 table.
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry: bits that must be zero.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry: host offset.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry: bits that must be zero (bit 0 is the zero flag on standard images).
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry: offset of the refcount block.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount table entry: bits that must be zero.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Bitmap table entry: offset of the data cluster.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry: bits that must be zero.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: all bits of this cluster are set (only without an offset).
const BME_ALL_ONES: u64 = 1;
/// Largest bitmap table, in entries (QEMU's limit).
const BME_MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Largest bitmap directory, in bytes.
const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// Fixed part of a bitmap directory entry.
const BITMAP_ENTRY_BYTES: u64 = 24;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

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
        // As QEMU does: lower the count at once (what was dropped leaks, and is freed by
        // the refcount repair below).
        t.write(
            field::NB_SNAPSHOTS as u64,
            &(snapshots.entries.len() as u32).to_be_bytes(),
            "the snapshot count",
        )?;
        t.sync()?;
    }
    let mut first = analyze(&mut t, &snapshots)?;
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
    log.append(&first.log);
    if !repair {
        let mut report = first.report(false);
        report.messages = log.into_vec();
        return Ok(report);
    }

    let (first_corruptions, first_leaks) = (first.corruptions + cut, first.leaks);
    let mut snapshots = snapshots;
    if fix_zero_entries(&mut t, &first, &mut log)? > 0 {
        first = analyze(&mut t, &snapshots)?;
    }
    let rewrite =
        snapshots.extra_truncated > 0 || (first.header.version >= 3 && snapshots.incomplete() > 0);
    if rewrite && first.past_eof > 0 {
        // The new table would need refcounts only a rebuild can give it, and a rebuild is
        // refused: it would stay a corruption of its own.
        log.push(format!(
            "Not writing the snapshot table again: {} reference(s) point past the end of the file",
            first.past_eof
        ));
    } else if rewrite {
        snapshots = rewrite_snapshots(&mut t, &first, snapshots, &mut log)?;
        first = analyze(&mut t, &snapshots)?;
    }
    if first.mismatches > 0 || first.rebuild {
        // Whether the refcounts can be made right is decided before anything is written:
        // the COPIED flags are judged by the refcounts, so they change only with them.
        let layout = if needs_rebuild(&first) {
            Some(plan_rebuild(&first, &t.path)?)
        } else {
            None
        };
        let blocked = layout
            .as_ref()
            .is_some_and(|l| first.past_eof_from < (l.end() + 1).saturating_mul(first.g.cs));
        if blocked {
            // The new structure, appended to the file, would land where a reference past
            // the end of the file points (or bring it within a cluster of the end).
            log.push(format!(
                "Not rebuilding the refcount structure: a reference past the end of the file points at {:#x}, where the new one would go",
                first.past_eof_from
            ));
        } else {
            // Clearing COPIED is always safe, setting it only once the refcount is right.
            fix_copied_flags(&mut t, &mut first, FlagMode::ClearUnsafe, &mut log)?;
            match layout {
                Some(layout) => rebuild_refcounts(&mut t, first, &layout, &mut log)?,
                None => fix_refcounts(&mut t, first, &mut log)?,
            }
        }
    } else {
        drop(first);
    }

    let mut second = analyze(&mut t, &snapshots)?;
    if second.corruptions > 0 {
        if second.mismatches == 0 && !second.rebuild {
            fix_copied_flags(&mut t, &mut second, FlagMode::Fix, &mut log)?;
        } else {
            log.push("Not fixing COPIED flags: the refcounts are still inconsistent".to_owned());
        }
    }
    drop(second);

    // Header writes come before the final analysis, which must see the file as a fresh
    // check will (an L2 table may share the header's cluster).
    let header = read_header(&mut t)?;
    let unknown_autoclear = header.autoclear_features & !autoclear::KNOWN;
    if unknown_autoclear != 0 {
        // As QEMU does when it opens an image for writing: nothing maintains these bits.
        t.write(
            field::AUTOCLEAR as u64,
            &(header.autoclear_features & autoclear::KNOWN).to_be_bytes(),
            "the autoclear features",
        )?;
        t.sync()?;
        log.push(format!(
            "Cleared the unknown autoclear feature bits {unknown_autoclear:#x}"
        ));
    }
    let mut fin = analyze(&mut t, &snapshots)?;
    if fin.corruptions == 0 && fin.check_errors == 0 && fin.header.version >= 3 {
        let flags = incompat::DIRTY | incompat::CORRUPT;
        let old = fin.header.incompatible_features;
        if old & flags != 0 {
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
            fin = analyze(&mut t, &snapshots)?;
        }
    }
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
    Ok(report)
}

/// Turns entries that reference a preallocated zero cluster at a misaligned offset (and hold
/// no data) into plain zero entries, as QEMU's repair does; an entry whose L2 table shares
/// its cluster with other metadata is left alone. Returns how many entries changed.
fn fix_zero_entries(t: &mut Target, a: &Analysis, log: &mut Log) -> Result<u64, Error> {
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
            let bitmap = be64(e, 8);
            let bitmap = (bitmap | (bitmap << 32)) & 0xffff_ffff_0000_0000;
            let mut n = [0u8; 16];
            n[8..].copy_from_slice(&bitmap.to_be_bytes());
            n.to_vec()
        } else {
            ZERO.to_be_bytes().to_vec()
        };
        log.push(format!(
            "Repairing offset={:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
            be64(e, 0) & L2E_OFFSET_MASK
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
/// both.
fn rewrite_snapshots(
    t: &mut Target,
    a: &Analysis,
    table: SnapshotTable,
    log: &mut Log,
) -> Result<SnapshotTable, Error> {
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
    let at = end << g.cb;
    let mut padded = bytes.clone();
    padded.resize((bytes.len() as u64).next_multiple_of(g.cs) as usize, 0);
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
    let entries = table.entries;
    let mut reread = SnapshotTable {
        entries,
        size_bytes: bytes.len() as u64,
        extra_truncated: 0,
        dropped: 0,
    };
    for e in &mut reread.entries {
        e.extra_data_size = e.extra_data_size.max(SNAPSHOT_KNOWN_EXTRA_BYTES);
    }
    Ok(reread)
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

/// The opened image file.
struct Target {
    path: String,
    file: File,
    io: BlockingReader,
}

impl Target {
    fn open(path: &Path, write: bool) -> Result<Target, Error> {
        let name = path.display().to_string();
        let file = crate::paths::open_image(path, write)?;
        let role = if write {
            Role::Qcow2Writer
        } else {
            Role::Qcow2Reader
        };
        lock_file(&file, role).map_err(|e| match e {
            LockError::Conflict(why) => Error::new(
                ErrorKind::Locked,
                format!("{name}: {why}; is another process using the image?"),
            ),
            LockError::Os(e) => Error::io(format!("Cannot lock {name}"), e),
        })?;
        let io = BlockingReader::new()
            .map_err(|e| Error::io(format!("{name}: cannot create an io_uring"), e))?;
        Ok(Target {
            path: name,
            file,
            io,
        })
    }

    fn len(&self) -> Result<u64, Error> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(format!("Cannot stat {}", self.path), e))
    }

    /// Reads `buf.len()` bytes at `off`; what lies past the end of the file reads as zeros
    /// (as QEMU's reads do).
    fn read(&mut self, off: u64, buf: &mut [u8], what: &str) -> Result<(), Error> {
        if off > i64::MAX as u64 {
            // No file reaches there.
            buf.fill(0);
            return Ok(());
        }
        let n = self
            .io
            .read_at(self.file.as_raw_fd(), buf, off)
            .map_err(|e| Error::io(format!("{}: cannot read {what} at {off:#x}", self.path), e))?;
        if let Some(rest) = buf.get_mut(n..) {
            rest.fill(0);
        }
        Ok(())
    }

    fn write(&mut self, off: u64, buf: &[u8], what: &str) -> Result<(), Error> {
        self.io
            .write_all_at(self.file.as_raw_fd(), buf, off)
            .map_err(|e| Error::io(format!("{}: cannot write {what} at {off:#x}", self.path), e))
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.io
            .fdatasync(self.file.as_raw_fd())
            .map_err(|e| Error::io(format!("{}: fdatasync failed", self.path), e))
    }
}

/// Sizes derived from the header and the file.
#[derive(Clone, Copy, Debug)]
struct Geo {
    cb: u32,
    cs: u64,
    order: u32,
    rc_max: u64,
    extended: bool,
    data_file: bool,
    /// Bytes per L2 entry.
    esz: usize,
    file_len: u64,
    /// Host clusters the file (partly) covers. References may reach one cluster further
    /// (QEMU counts a region that ends less than a cluster past the end of the file).
    file_clusters: u64,
    /// Refcount entries per refcount block.
    epb: u64,
}

impl Geo {
    fn new(h: &Header, file_len: u64, path: &str) -> Result<Geo, Error> {
        let cs = h.cluster_size();
        let file_clusters = file_len.div_ceil(cs);
        let _ = path;
        Ok(Geo {
            cb: h.cluster_bits,
            cs,
            order: h.refcount_order,
            rc_max: refcount_max(h.refcount_order),
            extended: h.extended_l2(),
            data_file: h.has_data_file(),
            esz: if h.extended_l2() { 16 } else { 8 },
            file_len,
            file_clusters,
            epb: (cs * 8) >> h.refcount_order,
        })
    }

    /// Whether `len` bytes at `off` lie inside the file.
    fn in_file(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.file_len)
    }
}

fn memory_error(path: &str, clusters: u64, order: u32) -> Error {
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
struct Counts {
    order: u32,
    bytes: Vec<u8>,
    /// Clusters the array covers.
    len: u64,
}

impl Counts {
    fn new(order: u32) -> Counts {
        Counts {
            order,
            bytes: Vec::new(),
            len: 0,
        }
    }

    fn get(&self, c: u64) -> u64 {
        if c >= self.len {
            return 0;
        }
        // c < len, and `bytes` holds `len` entries.
        refcount_get(&self.bytes, self.order, c as usize)
    }

    /// Makes the array cover clusters `0..clusters`; false when that needs more than
    /// [`MAX_CHECK_MEMORY`] or the allocation fails.
    fn grow(&mut self, clusters: u64) -> bool {
        if clusters <= self.len {
            return true;
        }
        let Some(bytes) = clusters
            .checked_mul(1 << self.order)
            .map(|bits| bits.div_ceil(8).next_multiple_of(8))
        else {
            return false;
        };
        if bytes > MAX_CHECK_MEMORY {
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
                .min(MAX_CHECK_MEMORY as usize);
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
    fn set(&mut self, c: u64, v: u64) {
        debug_assert!(c < self.len);
        let _ = refcount_set(&mut self.bytes, self.order, c as usize, v);
    }

    /// Whether every entry of `first..end` is zero.
    fn zero_range(&self, first: u64, end: u64) -> bool {
        (first..end.min(self.len)).all(|c| self.get(c) == 0)
    }
}

fn to_usize(v: u64, path: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| {
        Error::new(
            ErrorKind::Unsupported,
            format!("{path}: {v} does not fit in memory"),
        )
    })
}

fn zeroed(len: u64, path: &str) -> Result<Vec<u8>, Error> {
    let n = to_usize(len, path)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::new(
            ErrorKind::Io,
            format!("{path}: cannot allocate {len} bytes for the check"),
        )
    })?;
    v.resize(n, 0);
    Ok(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    at.checked_add(8)
        .and_then(|end| b.get(at..end))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_be_bytes)
}

fn be32(b: &[u8], at: usize) -> u32 {
    at.checked_add(4)
        .and_then(|end| b.get(at..end))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

fn be16(b: &[u8], at: usize) -> u16 {
    at.checked_add(2)
        .and_then(|end| b.get(at..end))
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map_or(0, u16::from_be_bytes)
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

    fn append(&mut self, other: &Log) {
        for line in &other.lines {
            self.push(line.clone());
        }
        self.dropped += other.dropped;
    }

    fn into_vec(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.lines
                .push(format!("... and {} more messages", self.dropped));
        }
        self.lines
    }
}

/// How the L2 tables at one host offset are referenced.
#[derive(Clone, Copy, Debug, Default)]
struct L2Use {
    /// L1 entries (active and snapshots) pointing at it.
    refs: u64,
    /// Whether the active L1 table points at it.
    active: bool,
}

/// What an L2 entry is, classified as QEMU's `qcow2_get_cluster_type` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Compressed,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    Unallocated,
    /// A host cluster (data, or preallocated zeros) at this offset; 0 only in the external
    /// data file.
    Alloc(u64),
}

fn classify(raw: u64, g: &Geo) -> Kind {
    if raw & COMPRESSED != 0 {
        return Kind::Compressed;
    }
    let off = raw & L2E_OFFSET_MASK;
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

/// What a pass over the COPIED flags does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlagMode {
    /// Count flags that disagree with the stored refcounts, as QEMU does.
    Check,
    /// Before refcounts change: clear COPIED wherever the expected refcount is not 1, so
    /// that a crash in the middle of the repair never leaves a shared cluster marked as
    /// writable in place.
    ClearUnsafe,
    /// Once the refcounts are right: make every flag match the expected refcount.
    Fix,
}

/// Everything one pass over the image found.
struct Analysis {
    header: Header,
    g: Geo,
    /// Expected refcount of every host cluster referenced.
    counts: Counts,
    /// The referenced clusters needed more than [`MAX_CHECK_MEMORY`] (the check fails).
    too_big: Option<u64>,
    /// Stored refcounts that could not be read (a misaligned refcount block): QEMU's
    /// "check errors", which make the check incomplete.
    check_errors: u64,
    /// The snapshot table as read (the header's count may have been lowered by a repair).
    snapshots: SnapshotTable,
    /// Entries that reference a preallocated zero cluster at a misaligned offset and no
    /// data: (L2 table offset, entry index), which a repair turns into plain zero entries.
    zero_fixes: Vec<(u64, usize)>,
    /// Raw refcount table entries.
    reftable: Vec<u64>,
    /// Clusters counted for the refcount table and blocks (dropped when rebuilding).
    refstruct: Vec<u64>,
    l2_tables: HashMap<u64, L2Use>,
    /// References to clusters past the end of the file (reported, not counted).
    past_eof: u64,
    /// Where the lowest of them starts (`u64::MAX` without any).
    past_eof_from: u64,
    /// The refcount structure itself is broken and must be rebuilt.
    rebuild: bool,
    corruptions: u64,
    leaks: u64,
    /// Clusters whose stored refcount differs from the expected one.
    mismatches: u64,
    corrupt_clusters: Vec<(u64, u64, u64)>,
    leaked_clusters: Vec<(u64, u64, u64)>,
    log: Log,
    allocated: u64,
    compressed: u64,
    fragmented: u64,
    image_end_offset: u64,
}

/// Reads and parses the header as QEMU does when it opens an image for checking.
fn read_header(t: &mut Target) -> Result<Header, Error> {
    let file_len = t.len()?;
    let probe = (Header::PROBE_BYTES as u64).min(file_len);
    let mut buf = zeroed(probe, &t.path)?;
    t.read(0, &mut buf, "the header")?;
    Header::parse_for_check(&buf, file_len).map_err(|e| format_error(&t.path, e))
}

/// Reads the snapshot table as QEMU's check does: with `repair`, too many snapshots, too
/// much extra data and a table too big are cut back (the header's count is lowered at once,
/// which leaks what was dropped; the rest is rewritten later); without it they make the
/// check fail, as a misaligned table does.
fn read_snapshots(
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

fn analyze(t: &mut Target, snapshots: &SnapshotTable) -> Result<Analysis, Error> {
    let header = read_header(t)?;
    let file_len = t.len()?;
    let g = Geo::new(&header, file_len, &t.path)?;

    let mut a = Analysis {
        header,
        g,
        counts: Counts::new(g.order),
        too_big: None,
        check_errors: 0,
        snapshots: snapshots.clone(),
        zero_fixes: Vec::new(),
        reftable: Vec::new(),
        refstruct: Vec::new(),
        l2_tables: HashMap::new(),
        past_eof: 0,
        past_eof_from: u64::MAX,
        rebuild: false,
        corruptions: 0,
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
    a.walk_l1(t, h.l1_table_offset, h.l1_size, true, "active")?;
    a.walk_snapshots(t)?;
    if let Some(clusters) = a.too_big {
        return Err(memory_error(&t.path, clusters, g.order));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * g.cs;
    a.inc(h.refcount_table_offset, rt_bytes, "refcount table", true);
    if let Some((off, len)) = h.crypto_header {
        a.inc(off, len, "encryption header", false);
    }
    a.count_bitmaps(t)?;

    let mut rt = zeroed(rt_bytes, &t.path)?;
    t.read(h.refcount_table_offset, &mut rt, "the refcount table")?;
    a.reftable = rt.chunks_exact(8).map(|c| be64(c, 0)).collect();
    drop(rt);
    a.check_refblocks();

    if let Some(clusters) = a.too_big {
        return Err(memory_error(&t.path, clusters, g.order));
    }
    let mut stored = Stored::new(&a);
    a.compare(t, &mut stored)?;
    let mut unused = Log::default();
    a.copied_pass(t, &mut stored, FlagMode::Check, &mut unused)?;
    Ok(a)
}

impl Analysis {
    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.log.push(msg);
    }

    /// Adds one reference to every host cluster that `len` bytes at `off` touch. As in QEMU,
    /// a region ending a cluster or more past the end of the file is a corruption and is not
    /// counted; returns whether it was counted.
    fn inc(&mut self, off: u64, len: u64, what: &str, refstruct: bool) -> bool {
        if len == 0 {
            return true;
        }
        let limit = self.g.file_len.saturating_add(self.g.cs);
        let end = match off.checked_add(len) {
            Some(end) if end < limit => end,
            _ => {
                // The refcount structure itself is replaced by a rebuild: it does not stop one.
                if !refstruct {
                    self.past_eof += 1;
                    self.past_eof_from = self.past_eof_from.min(off);
                }
                self.corrupt(format!(
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
                self.corrupt(format!(
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
        }
        true
    }

    /// Clusters whose refcounts are compared: those of the file, and the one after it when a
    /// region reaching into it is referenced (as QEMU's array grows to hold it).
    fn compare_len(&self) -> u64 {
        let extra = self.expected_at(self.g.file_clusters).unwrap_or(0) > 0;
        self.g.file_clusters + u64::from(extra)
    }

    /// The expected refcount of a cluster of the file (or of the one after it); `None`
    /// past that.
    fn expected_at(&self, c: u64) -> Option<u64> {
        (c <= self.g.file_clusters).then(|| self.counts.get(c))
    }

    /// Counts an L1 table, its L2 tables and their clusters.
    fn walk_l1(
        &mut self,
        t: &mut Target,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        label: &str,
    ) -> Result<(), Error> {
        let g = self.g;
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_off, bytes, &format!("{label} L1 table"), false);
        if bytes == 0 {
            return Ok(());
        }
        let mut l1 = zeroed(bytes, &t.path)?;
        t.read(l1_off, &mut l1, &format!("the {label} L1 table"))?;
        let mut l2 = zeroed(g.cs, &t.path)?;
        for chunk in l1.chunks_exact(8) {
            let raw = be64(chunk, 0);
            if raw == 0 {
                continue;
            }
            if raw & L1E_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "ERROR found L1 entry with reserved bits set: {raw:x}"
                ));
            }
            // An entry with flags but no offset names the first cluster, which QEMU then
            // counts and checks as an L2 table (its reads treat the entry as unallocated).
            let l2_off = raw & L1E_OFFSET_MASK;
            // Like QEMU, an unaligned table is reported, then counted and read where it
            // points (it is never written back).
            let counted = self.inc(l2_off, g.cs, "L2 table", false);
            let aligned = l2_off.is_multiple_of(g.cs);
            if !aligned {
                self.corrupt(format!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            if !counted {
                continue; // Past the end of the file: it would read as zeros.
            }
            if aligned {
                let u = self.l2_tables.entry(l2_off).or_default();
                u.refs += 1;
                u.active |= active;
            }
            t.read(l2_off, &mut l2, "an L2 table")?;
            self.walk_l2(&l2, l2_off, active);
        }
        Ok(())
    }

    /// Counts the clusters one L2 table points at.
    fn walk_l2(&mut self, table: &[u8], l2_off: u64, active: bool) {
        let g = self.g;
        let mut next_contiguous = 0u64;
        for (j, e) in table.chunks_exact(g.esz).enumerate() {
            let raw = be64(e, 0);
            let bitmap = if g.extended { be64(e, 8) } else { 0 };
            let before = self.corruptions;
            let kind = classify(raw, &g);
            if kind != Kind::Compressed && raw & L2E_STD_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "ERROR found l2 entry with reserved bits set: {raw:x}"
                ));
            }
            match kind {
                Kind::Compressed => {
                    if raw & COPIED != 0 {
                        self.corrupt(format!(
                            "ERROR: L2 table {l2_off:#x} entry {j}: copied flag must never be set for compressed clusters (entry {raw:#x})"
                        ));
                    }
                    if g.data_file {
                        self.corrupt(format!(
                            "ERROR compressed cluster {j} with data file, entry=0x{raw:x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.corrupt(format!(
                            "ERROR compressed cluster {j} with non-zero subcluster allocation bitmap, entry=0x{raw:x}"
                        ));
                        continue;
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
                Kind::Alloc(off) => {
                    if g.extended && (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
                        self.corrupt(format!(
                            "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !off.is_multiple_of(g.cs) {
                        // Without data (a preallocated zero cluster, or no allocated
                        // subcluster) a repair can make it a plain zero entry, as QEMU does.
                        let data = if g.extended {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            raw & ZERO == 0
                        };
                        if data {
                            self.corrupt(format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        } else {
                            self.corrupt(format!(
                                "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            if l2_off.is_multiple_of(g.cs) {
                                self.zero_fixes.push((l2_off, j));
                            }
                        }
                    }
                    if active {
                        self.allocated += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.fragmented += 1;
                        }
                        next_contiguous = off.saturating_add(g.cs);
                    }
                    if !g.data_file {
                        // Unaligned offsets touch two clusters, as QEMU counts them.
                        self.inc(off, g.cs, "data cluster", false);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if g.extended && bitmap & 0xffff_ffff != 0 {
                        self.corrupt(format!(
                            "ERROR: L2 table {l2_off:#x} entry {j}: Unallocated cluster has non-zero subcluster allocation map"
                        ));
                    }
                }
            }
            // QEMU's check judges a compressed descriptor only by the flags above.
            if self.corruptions == before && kind != Kind::Compressed {
                let bm = g.extended.then_some(bitmap);
                if let Err(why) = L2Entry::decode(raw, bm, g.cb, g.data_file) {
                    self.corrupt(format!(
                        "ERROR L2 table {l2_off:#x} entry {j} ({raw:#x}): {why}"
                    ));
                }
            }
        }
    }

    /// Counts every snapshot's L1 table (and what it points at) and the snapshot table, from
    /// the table [`read_snapshots`] read; in a version 3 image an entry without the 16 bytes
    /// of extra data is a corruption (a repair rewrites the table).
    fn walk_snapshots(&mut self, t: &mut Target) -> Result<(), Error> {
        let g = self.g;
        let entries = std::mem::take(&mut self.snapshots.entries);
        let nb = entries.len();
        if nb > 0 && g.data_file {
            self.corrupt(format!("ERROR {nb} snapshots in image with data file"));
        }
        for (k, e) in entries.iter().enumerate() {
            let label = format!(
                "snapshot {} ({})",
                String::from_utf8_lossy(&e.id),
                String::from_utf8_lossy(&e.name)
            );
            if self.header.version >= 3 && e.extra_data_size < SNAPSHOT_KNOWN_EXTRA_BYTES {
                self.corrupt(format!("ERROR snapshot table entry {k} is incomplete"));
            }
            let (l1_off, l1_size) = (e.l1_table_offset, e.l1_size);
            if !l1_off.is_multiple_of(g.cs) {
                self.corrupt(format!(
                    "ERROR {label} l1_offset={l1_off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"
                ));
                continue;
            }
            let l1_bytes = u64::from(l1_size) * 8;
            if l1_bytes > MAX_L1_BYTES {
                self.corrupt(format!(
                    "ERROR {label} l1_size={l1_size:#x}: L1 table is too large; snapshot table entry corrupted"
                ));
                continue;
            }
            // Past the end of the file the table reads as zeros (and walk_l1 reports a
            // table that lies a cluster or more past it).
            self.walk_l1(t, l1_off, l1_size, false, &label)?;
        }
        self.snapshots.entries = entries;
        let (start, size) = (self.header.snapshots_offset, self.snapshots.size_bytes);
        self.inc(start, size, "snapshot table", false);
        Ok(())
    }

    /// Counts the bitmap directory, bitmap tables and bitmap data clusters, when the bitmaps
    /// extension is consistent (autoclear bit 0 set), as QEMU does.
    fn count_bitmaps(&mut self, t: &mut Target) -> Result<(), Error> {
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
            self.corrupt(format!(
                "ERROR bitmap directory at {dir_off:#x} of {dir_size} bytes is invalid"
            ));
            return Ok(());
        }
        let mut dir = zeroed(dir_size, &t.path)?;
        t.read(dir_off, &mut dir, "the bitmap directory")?;
        let mut pos = 0u64;
        let mut count = 0u32;
        let mut table = zeroed(g.cs, &t.path)?;
        while pos < dir_size {
            let p = pos as usize;
            if pos + BITMAP_ENTRY_BYTES > dir_size {
                self.corrupt("ERROR broken bitmap directory".to_owned());
                return Ok(());
            }
            let table_off = be64(&dir, p);
            let table_size = u64::from(be32(&dir, p + 8));
            let name_size = u64::from(be16(&dir, p + 18));
            let extra = u64::from(be32(&dir, p + 20));
            let entry = (BITMAP_ENTRY_BYTES + name_size + extra).next_multiple_of(8);
            if pos + entry > dir_size {
                self.corrupt("ERROR broken bitmap directory".to_owned());
                return Ok(());
            }
            pos += entry;
            count += 1;
            if table_off == 0
                || !table_off.is_multiple_of(g.cs)
                || table_size == 0
                || table_size > BME_MAX_TABLE_ENTRIES
            {
                self.corrupt(format!(
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
                for raw in buf.chunks_exact(8).map(|c| be64(c, 0)) {
                    let off = raw & BME_OFFSET_MASK;
                    if raw & BME_RESERVED_MASK != 0
                        || (off != 0 && (raw & BME_ALL_ONES != 0 || !off.is_multiple_of(g.cs)))
                    {
                        self.corrupt(format!(
                            "ERROR bitmap {count}: invalid bitmap table entry {raw:#x}"
                        ));
                        continue;
                    }
                    if off != 0 {
                        self.inc(off, g.cs, "bitmap data cluster", false);
                    }
                }
                done += chunk;
            }
        }
        if count != nb {
            self.corrupt(format!(
                "ERROR the bitmap directory holds {count} bitmaps, the header extension says {nb}"
            ));
        }
        Ok(())
    }

    /// Counts the refcount blocks; each must be referenced exactly once (by the table).
    fn check_refblocks(&mut self) {
        let g = self.g;
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            if raw & REFT_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            let off = raw & REFT_OFFSET_MASK;
            if !off.is_multiple_of(g.cs) {
                self.corrupt(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if off == 0 {
                continue;
            }
            if off >> g.cb >= g.file_clusters {
                self.corrupt(format!("ERROR refcount block {i} is outside image"));
                self.rebuild = true;
                continue;
            }
            self.inc(off, g.cs, "refcount block", true);
            let refs = self.expected_at(off >> g.cb).unwrap_or(0);
            if refs != 1 {
                self.corrupt(format!("ERROR refcount block {i} refcount={refs}"));
                self.rebuild = true;
            }
        }
    }

    /// Compares stored and expected refcounts of every host cluster of the file. A stored
    /// refcount that cannot be read is a check error, as in QEMU. Ranges with neither a
    /// refcount block nor a reference are skipped whole, so a huge sparse file costs time
    /// only where it has refcounts or references.
    fn compare(&mut self, t: &mut Target, stored: &mut Stored) -> Result<(), Error> {
        let g = self.g;
        let mut highest = 0u64;
        let len = self.compare_len();
        let mut c = 0u64;
        while c < len {
            let block_end = (c / g.epb + 1).saturating_mul(g.epb).min(len);
            let state = stored.read_block_of(c / g.epb);
            if matches!(state, Block::Missing | Block::Invalid)
                && self.counts.zero_range(c, block_end)
            {
                c = block_end;
                continue;
            }
            if state == Block::Invalid {
                // QEMU cannot read these refcounts and counts an error for each cluster.
                self.check_errors += block_end - c;
                self.log.push(format!(
                    "Can't get refcount for clusters {c}..{block_end}: refcount block is not cluster aligned"
                ));
                for k in c..block_end {
                    if self.counts.get(k) > 0 {
                        highest = k;
                    }
                }
                c = block_end;
                continue;
            }
            let Some(s) = stored.get(t, c)? else {
                c += 1;
                continue;
            };
            let e = self.expected_at(c).unwrap_or(0);
            let cur = c;
            c += 1;
            let c = cur;
            if s > 0 || e > 0 {
                highest = c;
            }
            if s == e {
                continue;
            }
            self.mismatches += 1;
            let entry = (c << g.cb, s, e);
            if s < e {
                self.corruptions += 1;
                self.log
                    .push(format!("ERROR cluster {c} refcount={s} reference={e}"));
                if self.corrupt_clusters.len() < MAX_LISTED_CLUSTERS {
                    self.corrupt_clusters.push(entry);
                }
            } else {
                self.leaks += 1;
                self.log
                    .push(format!("Leaked cluster {c} refcount={s} reference={e}"));
                if self.leaked_clusters.len() < MAX_LISTED_CLUSTERS {
                    self.leaked_clusters.push(entry);
                }
            }
        }
        self.image_end_offset = (highest + 1) << g.cb;
        Ok(())
    }

    /// The refcount a COPIED flag is judged by: the stored one when checking (as QEMU's
    /// `check_oflag_copied` does), the expected one when repairing a cluster whose refcount
    /// the repair compares (and so makes the stored one), the stored one past those (a
    /// reference past the end of the file is not counted, and its stored refcount stays).
    /// `None`: not judged.
    fn flag_refcount(
        &self,
        t: &mut Target,
        stored: &mut Stored,
        mode: FlagMode,
        c: u64,
    ) -> Result<Option<u64>, Error> {
        match mode {
            FlagMode::Check => stored.get(t, c),
            FlagMode::ClearUnsafe | FlagMode::Fix if c < self.compare_len() => {
                Ok(self.expected_at(c))
            }
            FlagMode::ClearUnsafe | FlagMode::Fix => stored.get(t, c),
        }
    }

    /// Checks or fixes the COPIED flags of the active L1 table and of the L2 tables it points
    /// at, as QEMU's `check_oflag_copied` does; fixing also clears COPIED on compressed
    /// clusters of every L2 table. `log` receives what was repaired (unused when checking,
    /// where mismatches are counted as corruptions). Returns how many entries changed.
    fn copied_pass(
        &mut self,
        t: &mut Target,
        stored: &mut Stored,
        mode: FlagMode,
        log: &mut Log,
    ) -> Result<u64, Error> {
        let g = self.g;
        let fixing = mode != FlagMode::Check;
        let verb = if fixing { "Repairing" } else { "ERROR" };
        let (l1_off, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        let mut l1 = zeroed(u64::from(l1_size) * 8, &t.path)?;
        t.read(l1_off, &mut l1, "the active L1 table")?;
        let mut l2 = zeroed(g.cs, &t.path)?;
        let mut fixed = 0u64;
        let mut done_tables = HashSet::new();
        for (i, chunk) in l1.chunks_exact(8).enumerate() {
            let raw = be64(chunk, 0);
            let l2_off = raw & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            // Invalid tables were reported by the counting pass; QEMU still checks their
            // flags (reading zeros past the end of the file), but they are never rewritten.
            let valid = l2_off.is_multiple_of(g.cs) && l2_off >> g.cb < g.file_clusters;
            if fixing && !valid {
                continue;
            }
            let Some(rc) = self.flag_refcount(t, stored, mode, l2_off >> g.cb)? else {
                continue;
            };
            let copied = raw & COPIED != 0;
            if (rc == 1) != copied && (mode != FlagMode::ClearUnsafe || copied) {
                let msg = format!(
                    "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={raw:x} refcount={rc}"
                );
                let entry_off = l1_off + (i as u64) * 8;
                if !fixing {
                    self.corrupt(msg);
                } else if self.expected_at(entry_off >> g.cb) != Some(1) {
                    log.push(format!(
                        "Not repairing L1 entry {i}: the L1 table overlaps other metadata"
                    ));
                } else {
                    log.push(msg);
                    let new = if rc == 1 { raw | COPIED } else { raw & !COPIED };
                    t.write(entry_off, &new.to_be_bytes(), "an L1 entry")?;
                    fixed += 1;
                }
            }
            if !done_tables.insert(l2_off) {
                continue;
            }
            t.read(l2_off, &mut l2, "an L2 table")?;
            let mut dirty = false;
            for j in 0..l2.len() / g.esz {
                let at = j * g.esz;
                let e = be64(&l2, at);
                let copied = e & COPIED != 0;
                let want = match classify(e, &g) {
                    Kind::Alloc(off) => {
                        let rc = if g.data_file {
                            1
                        } else {
                            match self.flag_refcount(t, stored, mode, off >> g.cb)? {
                                Some(rc) => rc,
                                None => continue,
                            }
                        };
                        if (rc == 1) == copied || (mode == FlagMode::ClearUnsafe && !copied) {
                            continue;
                        }
                        let msg = format!(
                            "{verb} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                        );
                        if !fixing {
                            self.corrupt(msg);
                            continue;
                        }
                        log.push(msg);
                        e ^ COPIED
                    }
                    Kind::Compressed if copied && fixing => e & !COPIED,
                    _ => continue,
                };
                if let Some(slot) = l2.get_mut(at..at + 8) {
                    slot.copy_from_slice(&want.to_be_bytes());
                    dirty = true;
                    fixed += 1;
                }
            }
            if dirty {
                self.write_l2(t, l2_off, &l2, log)?;
            }
        }
        if !fixing {
            return Ok(fixed);
        }
        // Compressed clusters with COPIED in L2 tables only snapshots point at.
        let mut others: Vec<u64> = self
            .l2_tables
            .iter()
            .filter(|(&off, u)| !u.active && off != 0)
            .map(|(&off, _)| off)
            .collect();
        others.sort_unstable();
        for l2_off in others {
            t.read(l2_off, &mut l2, "an L2 table")?;
            let mut dirty = false;
            for j in 0..l2.len() / g.esz {
                let at = j * g.esz;
                let e = be64(&l2, at);
                if e & COMPRESSED != 0 && e & COPIED != 0 {
                    if let Some(slot) = l2.get_mut(at..at + 8) {
                        slot.copy_from_slice(&(e & !COPIED).to_be_bytes());
                        dirty = true;
                        fixed += 1;
                    }
                }
            }
            if dirty {
                self.write_l2(t, l2_off, &l2, log)?;
            }
        }
        Ok(fixed)
    }

    /// Writes back an L2 table whose flags were fixed, unless its cluster is also used as
    /// something other than an L2 table.
    fn write_l2(
        &self,
        t: &mut Target,
        l2_off: u64,
        table: &[u8],
        log: &mut Log,
    ) -> Result<(), Error> {
        let refs = self.l2_tables.get(&l2_off).map_or(0, |u| u.refs);
        if self.expected_at(l2_off >> self.g.cb) != Some(refs) {
            log.push(format!(
                "Not rewriting the L2 table at {l2_off:#x}: its cluster is also used by other metadata"
            ));
            return Ok(());
        }
        t.write(l2_off, table, "an L2 table")
    }

    fn report(&self, repaired: bool) -> CheckReport {
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

/// What a refcount table entry points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// No block: every refcount it would hold is 0.
    Missing,
    /// The entry is invalid: the refcounts cannot be read.
    Invalid,
    /// A block at this offset.
    At(u64),
}

/// Reads stored refcounts through the refcount table, one block cached.
struct Stored {
    table: Vec<u64>,
    g: Geo,
    cached: Option<u64>,
    block: Vec<u8>,
    state: Block,
}

impl Stored {
    fn new(a: &Analysis) -> Stored {
        Stored {
            table: a.reftable.clone(),
            g: a.g,
            cached: None,
            block: Vec::new(),
            state: Block::Missing,
        }
    }

    fn block_of(&self, b: u64) -> Block {
        let Some(&raw) = usize::try_from(b).ok().and_then(|i| self.table.get(i)) else {
            return Block::Missing;
        };
        let off = raw & REFT_OFFSET_MASK;
        if raw & REFT_RESERVED_MASK != 0 || !off.is_multiple_of(self.g.cs) {
            Block::Invalid
        } else if off == 0 {
            Block::Missing
        } else if off >> self.g.cb >= self.g.file_clusters {
            Block::Invalid
        } else {
            Block::At(off)
        }
    }

    /// Where the stored refcounts of block `b` are read from, as QEMU reads them: the
    /// reserved bits of the entry are ignored, a block past the end of the file reads as
    /// zeros, and only a misaligned block cannot be read.
    fn read_block_of(&self, b: u64) -> Block {
        let Some(&raw) = usize::try_from(b).ok().and_then(|i| self.table.get(i)) else {
            return Block::Missing;
        };
        let off = raw & REFT_OFFSET_MASK;
        if !off.is_multiple_of(self.g.cs) || off > i64::MAX as u64 - self.g.cs {
            Block::Invalid
        } else if off == 0 {
            Block::Missing
        } else {
            Block::At(off)
        }
    }

    /// The stored refcount of host cluster `c`; `None` when its refcount block cannot be
    /// read (it is misaligned).
    fn get(&mut self, t: &mut Target, c: u64) -> Result<Option<u64>, Error> {
        let (b, i) = (c / self.g.epb, c % self.g.epb);
        if self.cached != Some(b) {
            self.state = self.read_block_of(b);
            if let Block::At(off) = self.state {
                if self.block.is_empty() {
                    self.block = zeroed(self.g.cs, &t.path)?;
                }
                t.read(off, &mut self.block, "a refcount block")?;
            }
            self.cached = Some(b);
        }
        Ok(match self.state {
            Block::Missing => Some(0),
            Block::Invalid => None,
            // i < epb, so the entry lies inside the block.
            Block::At(_) => Some(refcount_get(&self.block, self.g.order, i as usize)),
        })
    }
}

/// Whether making the stored refcounts right needs a new refcount structure: the existing
/// one is broken, or a cluster with references has no valid block to hold its refcount.
fn needs_rebuild(a: &Analysis) -> bool {
    let stored = Stored::new(a);
    a.rebuild
        || (0..a.counts.len)
            .any(|c| a.counts.get(c) != 0 && !matches!(stored.block_of(c / a.g.epb), Block::At(_)))
}

/// Makes the stored refcounts equal to the expected ones in place, when every refcount that
/// must change has a valid block (not [`needs_rebuild`]).
fn fix_refcounts(t: &mut Target, a: Analysis, log: &mut Log) -> Result<(), Error> {
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
struct Layout {
    start: u64,
    nb: u64,
    nt: u64,
    blocks: Vec<u64>,
}

impl Layout {
    /// One past the last cluster of the new structure.
    fn end(&self) -> u64 {
        self.start + self.nb + self.nt
    }
}

/// Lays out a new refcount structure for the expected refcounts without the old structure's
/// own clusters. Only blocks that hold a non-zero refcount are written (as QEMU does), so a
/// huge sparse file gets a small structure. Nothing is written.
fn plan_rebuild(a: &Analysis, path: &str) -> Result<Layout, Error> {
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
fn rebuild_refcounts(
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

/// Rewrites COPIED flags according to the expected refcounts (see [`FlagMode`]).
fn fix_copied_flags(
    t: &mut Target,
    a: &mut Analysis,
    mode: FlagMode,
    log: &mut Log,
) -> Result<(), Error> {
    let mut stored = Stored::new(a);
    let fixed = a.copied_pass(t, &mut stored, mode, log)?;
    if fixed > 0 {
        t.sync()?;
    }
    Ok(())
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

    #[test]
    fn big_endian_helpers_never_panic() {
        let b = [1u8, 2, 3];
        assert_eq!(be64(&b, 0), 0);
        assert_eq!(be32(&b, usize::MAX), 0);
        assert_eq!(be16(&b, 1), 0x0203);
    }

    #[test]
    fn classification_matches_qemu() {
        let g = Geo {
            cb: 16,
            cs: 65536,
            order: 4,
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
