//! State of a writable image shared by its shards: refcounts and allocator, the header, and
//! whether the image has failed.
//!
//! Opening an image for writing loads every refcount block (see [`crate::meta::Refcounts`]),
//! clears the autoclear bits qcow2d does not maintain, and, with lazy refcounts, sets the dirty
//! bit, each made durable before the first guest write. The mutexes here are taken only on
//! slow paths (reserving a run of clusters, flushing, closing), never per request.

use crate::error::{Error, ErrorKind};
use crate::format::{autoclear, compat, field, incompat, Header};
use crate::io::BlockingReader;
use crate::layer::{Qcow2Layer, TopLayer};
use crate::meta::{class, MetaMap, Refcounts};
use crate::overlap::{FixedRanges, Hit, OverlapCheck};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Largest amount of refcount metadata loaded into memory.
const MAX_REFCOUNT_MEMORY_BYTES: u64 = 1 << 30;

/// The raw header and the feature bits as they are on disk now.
pub(crate) struct HeaderState {
    /// First `header_length` bytes of the file.
    pub bytes: Vec<u8>,
}

impl HeaderState {
    pub fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    pub fn put64(&mut self, at: usize, v: u64) {
        self.bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
}

/// Who holds the right to write refcount blocks, when a shard could not take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockWriter {
    /// The asking shard itself (its writes are in flight).
    Me,
    /// Another shard.
    Other,
}

/// See the module documentation.
pub(crate) struct Writable {
    pub refcounts: Mutex<Refcounts>,
    pub header: Mutex<HeaderState>,
    /// Refcounts are written only at clean close; the dirty bit is set on disk meanwhile.
    pub lazy_refcounts: bool,
    /// Set when a flush failed or corruption was found: the image takes no more writes.
    pub failed: AtomicBool,
    /// Set when corruption was found (the corrupt bit is set on disk): writes already
    /// submitted stop too.
    pub corrupt: AtomicBool,
    /// The host clusters that hold metadata, tested before every write (see `overlap`).
    pub meta: Arc<MetaMap>,
    /// The fixed structures of the map, to name them in messages.
    fixed: FixedRanges,
    /// The image's cluster size in bytes.
    cluster_size: u64,
    /// Length of the image file: clusters reserved past the old end extend it.
    pub file_len: AtomicU64,
    /// Version 3: zero flags exist.
    pub zero_flag: bool,
    /// The shard (index + 1; 0: none) whose refcount-block writes are in flight. One shard at
    /// a time writes refcount blocks: two writes of one block in flight together may land in
    /// either order, and an older copy landing last would undo newer refcounts in the file.
    /// The holder keeps it until what it wrote is durable (and, when it moved the refcount
    /// table, until the header points at the new one), so a shard that takes it knows that
    /// every block written before is durable.
    block_writer: AtomicU32,
}

fn corrupt(path: &std::path::Path, what: String) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{}: {what}", path.display()))
}

/// Loads what writing needs and updates the header for writing; see the module documentation.
pub(crate) fn open_writable(
    layer: &mut TopLayer,
    reader: &mut BlockingReader,
    lazy_refcounts: bool,
    overlap: OverlapCheck,
) -> Result<Writable, Error> {
    let path = layer.path.clone();
    let q = &mut layer.q;
    let h: &Header = &q.header;
    refuse_unwritable(&path, h, lazy_refcounts)?;
    let file_len = q
        .file
        .metadata()
        .map_err(|e| Error::io(format!("Cannot stat {}", path.display()), e))?
        .len();
    let cs = h.cluster_size();
    let (table, blocks) = load_refcount_blocks(&path, q, reader, file_len)?;
    let (meta, fixed) = crate::overlap::load(&path, q, &table, file_len, reader, overlap)?;
    let meta = Arc::new(meta);
    let h: &Header = &q.header;
    let refcounts = Refcounts::new(
        h.refcount_order,
        h.cluster_bits,
        table,
        (
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
        ),
        blocks,
        file_len,
        Arc::clone(&meta),
    );
    let header = header_for_writing(&path, q, reader, lazy_refcounts)?;
    Ok(Writable {
        refcounts: Mutex::new(refcounts),
        header: Mutex::new(header),
        lazy_refcounts,
        failed: AtomicBool::new(false),
        corrupt: AtomicBool::new(false),
        meta,
        fixed,
        cluster_size: cs,
        file_len: AtomicU64::new(file_len),
        zero_flag: q.header.version >= 3,
        block_writer: AtomicU32::new(0),
    })
}

/// Refuses to write an image marked corrupt or still dirty, and lazy refcounts on a version 2
/// image.
fn refuse_unwritable(path: &Path, h: &Header, lazy_refcounts: bool) -> Result<(), Error> {
    if h.incompatible_features & incompat::CORRUPT != 0 {
        return Err(corrupt(
            path,
            "the image is marked corrupt; it can only be served read-only (qemu-img check -r all repairs it)"
                .into(),
        ));
    }
    if h.incompatible_features & incompat::DIRTY != 0 {
        // Image::open repairs a dirty image before it gets here; a dirty bit now means the
        // repair could not clear it.
        return Err(corrupt(
            path,
            "the image is still marked dirty after rebuilding its refcounts".into(),
        ));
    }
    if lazy_refcounts && h.version < 3 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{}: lazy refcounts need a version 3 (compat=1.1) image",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A refcount table's entries and the blocks they point to (`None`: no block).
type RefcountBlocks = (Vec<u64>, Vec<Option<Box<[u8]>>>);

/// Reads the refcount table and every block it points to.
fn load_refcount_blocks(
    path: &Path,
    q: &Qcow2Layer,
    reader: &mut BlockingReader,
    file_len: u64,
) -> Result<RefcountBlocks, Error> {
    let h = &q.header;
    let fd = q.file.as_raw_fd();
    let cs = h.cluster_size();
    // The refcount table and every block it points to.
    let mut table_bytes = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
    reader
        .read_exact_at(fd, &mut table_bytes, h.refcount_table_offset)
        .map_err(|e| {
            Error::io(
                format!("Cannot read the refcount table of {}", path.display()),
                e,
            )
        })?;
    let table: Vec<u64> = table_bytes
        .chunks_exact(8)
        .map(|c| crate::format::be64_at(c, 0))
        .collect();
    let used = table.iter().filter(|&&e| e != 0).count() as u64;
    if used * cs > MAX_REFCOUNT_MEMORY_BYTES {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: {} MiB of refcount blocks is more than qcow2d keeps in memory",
                path.display(),
                (used * cs) >> 20
            ),
        ));
    }
    let mut blocks = Vec::with_capacity(table.len());
    for (i, &off) in table.iter().enumerate() {
        if off == 0 {
            blocks.push(None);
            continue;
        }
        if off % cs != 0 || off.checked_add(cs).is_none_or(|end| end > file_len) {
            return Err(corrupt(
                path,
                format!("refcount block {i} at {off:#x} is unaligned or past the end of the file"),
            ));
        }
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        reader.read_exact_at(fd, &mut block, off).map_err(|e| {
            Error::io(
                format!("Cannot read refcount block {i} of {}", path.display()),
                e,
            )
        })?;
        blocks.push(Some(block));
    }
    Ok((table, blocks))
}

/// The header as it is to be on disk while the image is written: autoclear bits qcow2d does
/// not maintain dropped, and with lazy refcounts the dirty bit set; written and made durable
/// before the first write when it changed.
fn header_for_writing(
    path: &Path,
    q: &Qcow2Layer,
    reader: &mut BlockingReader,
    lazy_refcounts: bool,
) -> Result<HeaderState, Error> {
    let h = &q.header;
    let fd = q.file.as_raw_fd();
    // Header: drop autoclear bits qcow2d does not maintain; set the dirty bit for lazy
    // refcounts. Both durable before the first write.
    let mut header = HeaderState {
        bytes: q.header_bytes.clone(),
    };
    if h.version >= 3 {
        let keep = if h.has_data_file() {
            autoclear::DATA_FILE_RAW
        } else {
            0
        };
        let mut changed = false;
        let ac = h.autoclear_features & keep;
        if ac != h.autoclear_features {
            header.put64(field::AUTOCLEAR, ac);
            changed = true;
        }
        if lazy_refcounts {
            header.put64(
                field::COMPATIBLE,
                h.compatible_features | compat::LAZY_REFCOUNTS,
            );
            header.put64(
                field::INCOMPATIBLE,
                h.incompatible_features | incompat::DIRTY,
            );
            changed = true;
        }
        if changed {
            reader
                .write_all_at(fd, &header.bytes, 0)
                .and_then(|()| reader.fdatasync(fd))
                .map_err(|e| {
                    Error::io(format!("Cannot update the header of {}", path.display()), e)
                })?;
        }
    }

    Ok(header)
}

impl Writable {
    /// Takes the right to write refcount blocks for shard `shard` (see `block_writer`).
    pub(crate) fn take_block_writes(&self, shard: usize) -> Result<(), BlockWriter> {
        match self.block_writer.compare_exchange(
            0,
            shard as u32 + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(()),
            Err(holder) if holder == shard as u32 + 1 => Err(BlockWriter::Me),
            Err(_) => Err(BlockWriter::Other),
        }
    }

    /// Gives back what [`Writable::take_block_writes`] took; a no-op for a shard that does
    /// not hold it.
    pub(crate) fn end_block_writes(&self, shard: usize) {
        let held = self.block_writer.compare_exchange(
            shard as u32 + 1,
            0,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        debug_assert!(held.is_ok(), "refcount block writes ended by another shard");
    }

    /// Whether shard `shard` holds the right to write refcount blocks.
    pub(crate) fn writes_blocks(&self, shard: usize) -> bool {
        self.block_writer.load(Ordering::Acquire) == shard as u32 + 1
    }

    /// A write would have landed on metadata (and was refused): marks the image corrupt,
    /// logging which structure and where.
    pub(crate) fn overlap_found(&self, layer: &TopLayer, hit: &Hit) {
        if self.corrupt.load(Ordering::Relaxed) {
            return;
        }
        self.mark_corrupt(layer, &hit.describe(&self.fixed, self.cluster_size));
    }

    /// Like [`Writable::overlap`], for the blocking writes of a clean close: an overlap marks
    /// the image corrupt and is an error.
    pub(crate) fn refuse_overlap(
        &self,
        layer: &TopLayer,
        what: &'static str,
        host: u64,
        len: u64,
        own: u8,
    ) -> Result<(), Error> {
        match self.overlap(what, host, len, own) {
            None => Ok(()),
            Some(hit) => {
                self.overlap_found(layer, &hit);
                Err(corrupt(
                    &layer.path,
                    hit.describe(&self.fixed, self.cluster_size),
                ))
            }
        }
    }

    /// Tests a write of `what` (a structure of class `own`, or 0 for guest data) to
    /// `host..host + len` of the image file against the metadata map.
    #[inline]
    pub(crate) fn overlap(&self, what: &'static str, host: u64, len: u64, own: u8) -> Option<Hit> {
        crate::overlap::check(&self.meta, what, host, len, own)
    }

    /// Records that the image's metadata is corrupt: sets the corrupt bit on disk (so neither
    /// qcow2d nor QEMU writes it again before a repair) and refuses further writes.
    pub(crate) fn mark_corrupt(&self, layer: &TopLayer, why: &str) {
        if self.corrupt.swap(true, Ordering::Relaxed) {
            return;
        }
        self.failed.store(true, Ordering::Relaxed);
        tracing::error!(
            "{}: corrupt metadata ({why}); marking the image corrupt, it takes no more writes",
            layer.path.display()
        );
        let q = &layer.q;
        if q.header.version < 3 {
            return;
        }
        let mut h = self.header.lock().unwrap_or_else(|p| p.into_inner());
        let bits = crate::format::be64_at(&h.bytes, field::INCOMPATIBLE);
        h.put64(field::INCOMPATIBLE, bits | incompat::CORRUPT);
        // Plain pwrite and fdatasync on the calling shard thread: rare, and a shard thread
        // may not create an io_uring (a confined daemon keeps that to set-up).
        let result = std::os::unix::fs::FileExt::write_all_at(
            &q.file,
            &h.bytes[..field::INCOMPATIBLE + 8],
            0,
        )
        .and_then(|()| q.file.sync_data());
        if let Err(e) = result {
            tracing::error!("{}: cannot set the corrupt bit: {e}", layer.path.display());
        }
    }
}

/// Writes what a clean close needs: refcount blocks still in memory (all of them with lazy
/// refcounts), a grown refcount table and its header fields, then clears the dirty bit. Every
/// shard must have flushed and released its reservation first.
pub(crate) fn close(layer: &TopLayer, w: &Writable) -> Result<(), Error> {
    let q = &layer.q;
    if w.failed.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "{}: not closed cleanly: a flush failed or corruption was found earlier",
                layer.path.display()
            ),
        ));
    }
    let fd = q.file.as_raw_fd();
    let io_err = |what: &str, e: std::io::Error| {
        w.failed.store(true, std::sync::atomic::Ordering::Relaxed);
        Error::io(
            format!("Cannot {what} of {} at close", layer.path.display()),
            e,
        )
    };
    let mut io = BlockingReader::new().map_err(|e| io_err("create an io_uring", e))?;
    write_refcounts(layer, w, &mut io, "at close")?;
    if w.lazy_refcounts {
        let mut h = w.header.lock().unwrap_or_else(|p| p.into_inner());
        let incompat_bits = crate::format::be64_at(&h.bytes, field::INCOMPATIBLE);
        h.put64(field::INCOMPATIBLE, incompat_bits & !incompat::DIRTY);
        io.write_all_at(fd, &h.bytes, 0)
            .and_then(|()| io.fdatasync(fd))
            .map_err(|e| io_err("clear the dirty bit", e))?;
    }
    Ok(())
}

/// Writes every refcount block changed in memory and a moved refcount table (then the header
/// fields that point at it, then frees the old table), each step durable before the next. The
/// caller makes sure no shard writes refcount blocks meanwhile (at close, or while the image is
/// held alone). `when` names the occasion in errors.
pub(crate) fn write_refcounts(
    layer: &TopLayer,
    w: &Writable,
    io: &mut BlockingReader,
    when: &str,
) -> Result<(), Error> {
    let q = &layer.q;
    let path = &layer.path;
    let fd = q.file.as_raw_fd();
    let cs = q.geom.cluster_size();
    let io_err = |what: &str, e: std::io::Error| {
        w.failed.store(true, std::sync::atomic::Ordering::Relaxed);
        Error::io(format!("Cannot {what} of {} {when}", path.display()), e)
    };
    let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
    // Freeing a retired table dirties blocks again: at most a few rounds.
    for _ in 0..4 {
        let blocks = rc.take_dirty_blocks();
        for (host, buf) in &blocks {
            w.refuse_overlap(
                layer,
                "a refcount block",
                *host,
                buf.len() as u64,
                class::REFCOUNT_BLOCK,
            )?;
            io.write_all_at(fd, buf, *host)
                .map_err(|e| io_err("write refcount blocks", e))?;
        }
        io.fdatasync(fd).map_err(|e| io_err("sync", e))?;
        let Some(table) = rc.take_table() else {
            if blocks.is_empty() {
                break;
            }
            continue;
        };
        let (toff, tclusters) = table.location;
        w.refuse_overlap(
            layer,
            "the refcount table",
            toff,
            table.bytes.len() as u64,
            class::REFCOUNT_TABLE,
        )?;
        io.write_all_at(fd, &table.bytes, toff)
            .and_then(|()| io.fdatasync(fd))
            .map_err(|e| io_err("write the refcount table", e))?;
        let header = {
            let mut h = w.header.lock().unwrap_or_else(|p| p.into_inner());
            h.put64(field::REFCOUNT_TABLE_OFFSET, toff);
            h.put32(field::REFCOUNT_TABLE_CLUSTERS, tclusters as u32);
            h.bytes.clone()
        };
        io.write_all_at(fd, &header, 0)
            .and_then(|()| io.fdatasync(fd))
            .map_err(|e| io_err("write the header", e))?;
        if let Some((off, n)) = table.retired {
            rc.release(off, n * cs, class::REFCOUNT_TABLE)
                .map_err(|e| {
                    Error::with_source(ErrorKind::Corrupt, "Cannot free the old refcount table", e)
                })?;
        }
    }
    Ok(())
}
