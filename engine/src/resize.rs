//! Changing the virtual size of a writable image ([`Image::resize`]), as `qemu-img resize`
//! does for qcow2.
//!
//! Runs on the caller's thread with the image held alone: no shard exists (they were flushed,
//! gave back their reservations and were dropped), so nothing else reads or writes its tables.
//! Growing past what the L1 table covers allocates a larger table, writes it (old entries, then
//! zeros) and makes it durable, points the header at it (L1 size and offset in one write), makes
//! that durable, then frees the old table: a crash at any point leaves either table in use and
//! at worst leaks clusters. The new size is written into the header last. Shrinking is refused
//! unless asked for, and then only when no cluster past the new end is allocated (the L1 table
//! keeps its size; L2 tables past the end stay, empty).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, ErrorKind};
use crate::format::{field, MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use crate::image::Image;
use crate::io::BlockingReader;
use crate::layer::{Qcow2Layer, TopLayer};
use crate::meta::class;
use crate::write::{write_refcounts, Writable};

/// The bits of a standard L2 entry that say it maps something (host offset, compressed flag;
/// bit 0, the zero flag, and bit 63, COPIED, do not on their own).
const L2_MAPS: u64 = 0x7fff_ffff_ffff_fffe;

impl Image {
    /// Changes the virtual size to `new_size` bytes (a multiple of 512). Shrinking needs
    /// `shrink` and nothing allocated at or past `new_size`. The image must be writable and
    /// held alone: no shard of it may exist (see the module docs). On error the image is as
    /// it was, or, after a failed write, marked failed (it takes no more writes).
    pub fn resize(&mut self, new_size: u64, shrink: bool) -> Result<(), Error> {
        let invalid = |msg: String| Error::new(ErrorKind::InvalidArgument, msg);
        let Some(inner) = Arc::get_mut(&mut self.inner) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "The image is in use by shards; resize it with none left",
            ));
        };
        let path = inner.top.path.clone();
        let Some(w) = &inner.writable else {
            return Err(invalid(format!(
                "{} is read-only: it cannot be resized",
                path.display()
            )));
        };
        let old_size = inner.virtual_size();
        let backing_size = inner.backing.first().map(|l| l.virtual_size);
        let layer = &mut inner.top;
        check_resize(&layer.q, w, &path, old_size, new_size, backing_size)?;
        if new_size == old_size {
            return Ok(());
        }
        let mut io = BlockingReader::new()
            .map_err(|e| Error::io("Cannot create an io_uring (is io_uring enabled?)", e))?;
        if new_size < old_size {
            if !shrink {
                return Err(invalid(format!(
                    "{} is {old_size} bytes: shrinking it to {new_size} needs the shrink option",
                    path.display()
                )));
            }
            check_nothing_allocated_past(&path, &layer.q, &mut io, new_size)?;
        } else {
            grow_l1(layer, w, &mut io, new_size)?;
        }
        // The size itself, last.
        let fd = layer.q.file.as_raw_fd();
        let size_bytes = {
            let mut h = w.header.lock().unwrap_or_else(|p| p.into_inner());
            h.put64(field::SIZE, new_size);
            h.bytes[field::SIZE..field::SIZE + 8].to_vec()
        };
        io.write_all_at(fd, &size_bytes, field::SIZE as u64)
            .and_then(|()| io.fdatasync(fd))
            .map_err(|e| {
                w.failed.store(true, Ordering::Relaxed);
                Error::io(
                    format!("Cannot write the new size into {}", path.display()),
                    e,
                )
            })?;
        layer.q.header.size = new_size;
        tracing::info!(
            "{}: resized from {old_size} to {new_size} bytes",
            path.display()
        );
        Ok(())
    }
}

/// Refuses a resize of `q` (at `path`, `old_size` bytes, over a backing file of
/// `backing_size`) to `new_size` that cannot be done: after failed writes, to a size that is
/// not a multiple of 512 or too large, with internal snapshots or an external data file, or
/// growing past a backing file larger than the image.
fn check_resize(
    q: &Qcow2Layer,
    w: &Writable,
    path: &std::path::Path,
    old_size: u64,
    new_size: u64,
    backing_size: Option<u64>,
) -> Result<(), Error> {
    let invalid = |msg: String| Error::new(ErrorKind::InvalidArgument, msg);
    if w.failed.load(Ordering::Relaxed) {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "{}: earlier writes failed; the image takes no more writes",
                path.display()
            ),
        ));
    }
    if new_size == 0 || !new_size.is_multiple_of(512) || new_size > MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "The new size must be a non-zero multiple of 512 bytes, at most {MAX_VIRTUAL_SIZE}, \
                 not {new_size}"
        )));
    }
    if q.header.nb_snapshots > 0 {
        return Err(invalid(format!(
            "{} has internal snapshots: it cannot be resized (as with qemu-img)",
            path.display()
        )));
    }
    if q.header.has_data_file() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} has an external data file: resizing it is not supported",
                path.display()
            ),
        ));
    }
    if new_size > old_size && backing_size.is_some_and(|b| b > old_size) {
        // The new area would show the backing file's data; QEMU writes zeros over it.
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: growing an image whose backing file is larger than it is not supported \
                     (the backing file's data would show in the new area)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Fails unless every L2 entry for guest bytes at or past `new_size` maps nothing.
fn check_nothing_allocated_past(
    path: &std::path::Path,
    q: &Qcow2Layer,
    io: &mut BlockingReader,
    new_size: u64,
) -> Result<(), Error> {
    let cs = q.geom.cluster_size();
    let entry_bytes = q.geom.l2_entry_bytes();
    let entries = cs / entry_bytes;
    let coverage = entries * cs;
    let fd = q.file.as_raw_fd();
    let mut table = vec![0u8; cs as usize];
    let first_l1 = new_size / coverage;
    for (i, l1) in q.l1.iter().enumerate().skip(first_l1 as usize) {
        let raw = l1.load(Ordering::Relaxed);
        let Ok(Some(l2_off)) = crate::format::decode_l1_entry(raw, cs) else {
            if raw & 0x00ff_ffff_ffff_fe00 != 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("{}: L1 entry {i} ({raw:#x}) is invalid", path.display()),
                ));
            }
            continue;
        };
        io.read_exact_at(fd, &mut table, l2_off)
            .map_err(|e| Error::io(format!("Cannot read an L2 table of {}", path.display()), e))?;
        let table_start = i as u64 * coverage;
        for e in 0..entries {
            let guest = table_start + e * cs;
            if guest + cs <= new_size {
                continue;
            }
            let at = (e * entry_bytes) as usize;
            let raw = crate::format::be64_at(&table, at);
            if raw & L2_MAPS != 0 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{}: the cluster at guest offset {guest:#x} is allocated; shrinking to \
                         {new_size} bytes would drop it",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Makes the L1 table cover `new_size`: a larger table, written and durable, then the header
/// pointing at it, then the old one freed (see the module docs).
fn grow_l1(
    layer: &mut TopLayer,
    w: &Writable,
    io: &mut BlockingReader,
    new_size: u64,
) -> Result<(), Error> {
    let path = layer.path.clone();
    let q = &layer.q;
    let cs = q.geom.cluster_size();
    let coverage = cs / q.geom.l2_entry_bytes() * cs;
    let needed = new_size.div_ceil(coverage);
    let old_entries = q.l1.len() as u64;
    if needed <= old_entries {
        return Ok(());
    }
    let bytes = needed * 8;
    if bytes > MAX_L1_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{new_size} bytes need an L1 table of {bytes} bytes, more than the {MAX_L1_BYTES} \
                 QEMU accepts"
            ),
        ));
    }
    let clusters = bytes.div_ceil(cs);
    let fd = q.file.as_raw_fd();
    let fail = |what: &str, e: std::io::Error| {
        w.failed.store(true, Ordering::Relaxed);
        Error::io(format!("Cannot {what} of {}", path.display()), e)
    };
    let new_off = allocate_contiguous(w, clusters, cs)?;
    // From now on the new table is metadata: no other write may land there.
    w.meta.set(new_off, bytes, class::ACTIVE_L1);
    let end = new_off + clusters * cs;
    if end > w.file_len.load(Ordering::Relaxed) {
        q.file
            .set_len(end)
            .map_err(|e| fail("extend the file for the new L1 table", e))?;
        w.file_len.store(end, Ordering::Relaxed);
    }
    // The refcounts of the new table durable before anything points at it.
    write_refcounts(layer, w, io, "while resizing")?;

    let q = &layer.q;
    let mut table = vec![0u8; (clusters * cs) as usize];
    for (i, e) in q.l1.iter().enumerate() {
        table[i * 8..i * 8 + 8].copy_from_slice(&e.load(Ordering::Relaxed).to_be_bytes());
    }
    w.refuse_overlap(
        layer,
        "the L1 table",
        new_off,
        table.len() as u64,
        class::ACTIVE_L1,
    )?;
    io.write_all_at(fd, &table, new_off)
        .and_then(|()| io.fdatasync(fd))
        .map_err(|e| fail("write the new L1 table", e))?;

    let old_off = q.header.l1_table_offset;
    switch_l1(layer, w, io, new_off, needed)?;

    // The old table is no longer referenced (durably): free it, and it stops being metadata.
    if old_entries > 0 {
        let old_bytes = old_entries * 8;
        let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
        rc.release(old_off, old_bytes.div_ceil(cs) * cs, class::ACTIVE_L1)
            .map_err(|e| refcount_error("Cannot free the old L1 table", e))?;
    }
    write_refcounts(layer, w, io, "while resizing")?;
    Ok(())
}

fn refcount_error(what: &str, e: crate::meta::RefcountError) -> Error {
    Error::with_source(ErrorKind::Corrupt, what.to_owned(), e)
}

/// Allocates `clusters` contiguous clusters (of `cs` bytes) and returns the first one's
/// offset; shorter runs found on the way are given back.
fn allocate_contiguous(w: &Writable, clusters: u64, cs: u64) -> Result<u64, Error> {
    let mut rc = w.refcounts.lock().unwrap_or_else(|p| p.into_inner());
    let mut short = Vec::new();
    let found = loop {
        let (off, n, _) = rc
            .allocate(clusters)
            .map_err(|e| refcount_error("Cannot allocate the new L1 table", e))?;
        if n >= clusters {
            if n > clusters {
                short.push((off + clusters * cs, n - clusters));
            }
            break off;
        }
        short.push((off, n));
    };
    for (off, n) in short {
        rc.release(off, n * cs, 0)
            .map_err(|e| refcount_error("Cannot give back clusters", e))?;
    }
    Ok(found)
}

/// Points the header at the new L1 table (`entries` entries at `new_off`, written and
/// durable), durably, then makes it the table in memory.
fn switch_l1(
    layer: &mut TopLayer,
    w: &Writable,
    io: &mut BlockingReader,
    new_off: u64,
    entries: u64,
) -> Result<(), Error> {
    let fd = layer.q.file.as_raw_fd();
    // L1 size and offset are adjacent: one write moves the header to the new table.
    let fields = {
        let mut h = w.header.lock().unwrap_or_else(|p| p.into_inner());
        h.put32(field::L1_SIZE, entries as u32);
        h.put64(field::L1_TABLE_OFFSET, new_off);
        h.bytes[field::L1_SIZE..field::L1_TABLE_OFFSET + 8].to_vec()
    };
    io.write_all_at(fd, &fields, field::L1_SIZE as u64)
        .and_then(|()| io.fdatasync(fd))
        .map_err(|e| {
            w.failed.store(true, Ordering::Relaxed);
            Error::io(
                format!(
                    "Cannot point the header at the new L1 table of {}",
                    layer.path.display()
                ),
                e,
            )
        })?;
    let q = &mut layer.q;
    q.header.l1_size = entries as u32;
    q.header.l1_table_offset = new_off;
    let mut l1: Vec<AtomicU64> =
        q.l1.iter()
            .map(|e| AtomicU64::new(e.load(Ordering::Relaxed)))
            .collect();
    l1.resize_with(entries as usize, || AtomicU64::new(0));
    q.l1 = l1.into_boxed_slice();
    Ok(())
}
