//! Metadata overlap checks of a writable image (DESIGN.md invariant 9): the modes, and the
//! map of metadata clusters built when the image is opened for writing.
//!
//! [`OverlapCheck`] is QEMU's `overlap-check` option: which structures a write is checked
//! against. At writable open ([`load`], on the opening thread) every structure of the mode's
//! classes is recorded in the image's [`MetaMap`]: the header cluster, the backing file name,
//! the active L1 table, the refcount table and blocks, the L2 tables the active L1 points at,
//! the snapshot table and each snapshot's L1 table (and, in mode `all`, the L2 tables those
//! point at, which costs a read of every snapshot's L1 table), the bitmap directory and the
//! bitmap tables. While the image is served the shards and the allocator keep the map up to
//! date (new and moved L2 tables, refcount blocks and tables) and test it before every write
//! (`shard::write`, `shard::flush`, `write::close`).

use crate::error::{Error, ErrorKind};
use crate::format::{
    self, BitmapDirEntry, BrokenBitmapDirectory, SnapshotReadError, SnapshotTable,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_HEADER_BYTES,
};
use crate::io::BlockingReader;
use crate::layer::Qcow2Layer;
use crate::meta::{class, MetaMap, Refcounts};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Which metadata every write to the image file is checked against (QEMU's `overlap-check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlapCheck {
    /// No checks.
    None,
    /// The structures whose place is known without reading tables: header, active L1 table,
    /// refcount table, snapshot table, bitmap directory.
    Constant,
    /// Those, and what is known from memory: active L2 tables, refcount blocks, snapshot L1
    /// tables, bitmap tables. QEMU's default, and qcow2d's.
    #[default]
    Cached,
    /// Those, and the L2 tables of internal snapshots (read at open).
    All,
}

impl OverlapCheck {
    /// The [`class`] bits this mode checks.
    pub fn classes(self) -> u8 {
        match self {
            OverlapCheck::None => 0,
            OverlapCheck::Constant => class::CONSTANT,
            OverlapCheck::Cached => class::CACHED,
            OverlapCheck::All => class::ALL,
        }
    }

    /// The mode's name, as the config file and the command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            OverlapCheck::None => "none",
            OverlapCheck::Constant => "constant",
            OverlapCheck::Cached => "cached",
            OverlapCheck::All => "all",
        }
    }
}

impl std::str::FromStr for OverlapCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(OverlapCheck::None),
            "constant" => Ok(OverlapCheck::Constant),
            "cached" => Ok(OverlapCheck::Cached),
            "all" => Ok(OverlapCheck::All),
            other => Err(format!(
                "unknown overlap check {other:?}: expected none, constant, cached or all"
            )),
        }
    }
}

impl std::fmt::Display for OverlapCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What an image holds of the structures recorded in [`class::FIXED`], to name them in
/// messages: (start, end, name).
pub(crate) type FixedRanges = Vec<(u64, u64, &'static str)>;

/// A write that would land on metadata.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hit {
    /// What was to be written ("guest data", "an L2 table", ...).
    pub what: &'static str,
    /// The write's host range.
    pub host: u64,
    pub len: u64,
    /// The first cluster of metadata it overlaps, and what lives there.
    pub at: u64,
    pub classes: u8,
}

impl Hit {
    /// The message logged once when the image is marked corrupt (`cs`: the cluster size).
    pub fn describe(&self, fixed: &FixedRanges, cs: u64) -> String {
        let mut names = class::names(self.classes);
        if self.classes & class::FIXED != 0 {
            let at = self.at;
            let named: Vec<&str> = fixed
                .iter()
                .filter(|(s, e, _)| *s < at.saturating_add(cs) && *e > at)
                .map(|(_, _, n)| *n)
                .collect();
            if !named.is_empty() {
                names = format!("{names} ({})", named.join(", "));
            }
        }
        format!(
            "a write of {} ({} bytes at host offset {:#x}) would overlap {names} in the cluster at {:#x}; the write was refused",
            self.what, self.len, self.host, self.at
        )
    }
}

/// Tests a write of `what` to `host..host + len` of the image file, holding a structure of
/// class `own` (0 for guest data), against `map`.
#[inline]
pub(crate) fn check(
    map: &MetaMap,
    what: &'static str,
    host: u64,
    len: u64,
    own: u8,
) -> Option<Hit> {
    map.conflict(host, len, own).map(|(at, classes)| Hit {
        what,
        host,
        len,
        at,
        classes,
    })
}

/// Builds the map of metadata clusters of an image opened for writing; see the module
/// documentation. `refcount_table` holds the refcount table's entries (already read).
pub(crate) fn load(
    path: &Path,
    q: &Qcow2Layer,
    refcount_table: &[u64],
    file_len: u64,
    reader: &mut BlockingReader,
    mode: OverlapCheck,
) -> Result<(MetaMap, FixedRanges), Error> {
    let h = &q.header;
    let bits = h.cluster_bits;
    let capacity = file_len
        .div_ceil(h.cluster_size())
        .max(Refcounts::max_clusters(h.refcount_order, bits))
        .min(format::MAX_VIRTUAL_SIZE >> bits);
    let mut marks = Marks {
        map: MetaMap::new(bits, capacity, mode.classes()),
        fixed: FixedRanges::new(),
    };
    if marks.map.mask() == 0 {
        return Ok((marks.map, marks.fixed));
    }
    let mut source = Source {
        path,
        fd: q.file.as_raw_fd(),
        file_len,
        reader,
    };
    marks.active(q, refcount_table);
    if h.nb_snapshots > 0 {
        marks.snapshots(q, &mut source)?;
    }
    if let Some((_, dir_size, dir_off)) = h.bitmaps {
        marks.bitmaps(dir_off, dir_size, &mut source)?;
    }
    Ok((marks.map, marks.fixed))
}

/// The metadata map being built, and the fixed ranges (header, names, tables without a class
/// of their own) found so far.
struct Marks {
    map: MetaMap,
    fixed: FixedRanges,
}

/// Where [`load`] reads the metadata that is not in memory yet.
struct Source<'a> {
    path: &'a Path,
    fd: RawFd,
    file_len: u64,
    reader: &'a mut BlockingReader,
}

impl Source<'_> {
    /// Reads `buf.len()` bytes of `what` at `offset`.
    fn read(&mut self, what: &str, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.reader
            .read_exact_at(self.fd, buf, offset)
            .map_err(|e| self.read_error(what, e))
    }

    fn read_error(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("Cannot read {what} of {}", self.path.display()), e)
    }

    /// The snapshot table, read by the format's parser (which the open already ran on it:
    /// it fails here only if the file changed since).
    fn snapshot_table(&mut self, q: &Qcow2Layer) -> Result<SnapshotTable, Error> {
        let h = &q.header;
        let (fd, reader) = (self.fd, &mut *self.reader);
        format::read_snapshot_table(
            h.snapshots_offset,
            h.nb_snapshots,
            false,
            false,
            &mut |off, buf| read_zero_filled(reader, fd, buf, off),
        )
        .map_err(|e| match e {
            SnapshotReadError::Io(e) => self.read_error("the snapshot table", e),
            SnapshotReadError::Format(e) => Error::with_source(
                ErrorKind::Corrupt,
                format!("Cannot read the snapshot table of {}", self.path.display()),
                e,
            ),
        })
    }
}

/// Fills `buf` from `offset` of `fd`, with zeros past the end of the file.
fn read_zero_filled(
    reader: &mut BlockingReader,
    fd: RawFd,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), std::io::Error> {
    let n = reader.read_at(fd, buf, offset)?;
    buf[n..].fill(0);
    Ok(())
}

impl Marks {
    /// A fixed range (`len` bytes at `start`, `name` in messages).
    fn fixed(&mut self, start: u64, len: u64, name: &'static str) {
        if len > 0 {
            self.map.set(start, len, class::FIXED);
            self.fixed.push((start, start.saturating_add(len), name));
        }
    }

    /// The header, the backing file name, the active L1 table, the refcount table and
    /// blocks, and the active L2 tables (all known from memory).
    fn active(&mut self, q: &Qcow2Layer, refcount_table: &[u64]) {
        let h = &q.header;
        let cs = h.cluster_size();
        self.fixed(0, cs, "the main header");
        if let Some(name) = &h.backing_file {
            self.fixed(
                h.backing_file_offset,
                name.len() as u64,
                "the backing file name",
            );
        }
        let map = &self.map;
        map.set(
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            class::ACTIVE_L1,
        );
        map.set(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            class::REFCOUNT_TABLE,
        );
        for &block in refcount_table.iter().filter(|&&b| b != 0) {
            map.set(block, cs, class::REFCOUNT_BLOCK);
        }
        if map.mask() & class::ACTIVE_L2 != 0 {
            for e in q.l1.iter() {
                let raw = e.load(std::sync::atomic::Ordering::Relaxed);
                if let Ok(Some(table)) = format::decode_l1_entry(raw, cs) {
                    map.set(table, cs, class::ACTIVE_L2);
                }
            }
        }
    }

    /// Snapshots: the table, each L1 table, and in mode `all` each L2 table. The entries are
    /// taken up to the first whose fixed part runs past the end of the file or past the
    /// largest table QEMU reads.
    fn snapshots(&mut self, q: &Qcow2Layer, src: &mut Source) -> Result<(), Error> {
        let h = &q.header;
        let file_len = src.file_len;
        let start = h.snapshots_offset;
        let table = src.snapshot_table(q)?;
        let mut end = start + table.size_bytes;
        let mut snapshot_l1s = Vec::new();
        for e in &table.entries {
            let fixed_end = e.offset + SNAPSHOT_HEADER_BYTES;
            if fixed_end > file_len || fixed_end - start > MAX_SNAPSHOT_TABLE_BYTES {
                end = e.offset;
                break;
            }
            let l1_size = u64::from(e.l1_size);
            if l1_size * 8 <= MAX_L1_BYTES {
                self.map
                    .set(e.l1_table_offset, l1_size * 8, class::INACTIVE_L1);
                snapshot_l1s.push((e.l1_table_offset, l1_size));
            }
        }
        self.fixed(
            start,
            end.min(file_len).saturating_sub(start),
            "the snapshot table",
        );
        if self.map.mask() & class::INACTIVE_L2 == 0 {
            return Ok(());
        }
        let cs = h.cluster_size();
        let mut buf = Vec::new();
        for (l1_off, l1_size) in snapshot_l1s {
            if !l1_off.is_multiple_of(cs) || l1_off.saturating_add(l1_size * 8) > file_len {
                continue;
            }
            buf.resize((l1_size * 8) as usize, 0);
            src.read("a snapshot's L1 table", &mut buf, l1_off)?;
            for raw in buf.chunks_exact(8).map(|c| format::be64_at(c, 0)) {
                if let Ok(Some(table)) = format::decode_l1_entry(raw, cs) {
                    self.map.set(table, cs, class::INACTIVE_L2);
                }
            }
        }
        Ok(())
    }

    /// Persistent bitmaps: the directory (`dir_size` bytes at `dir_off`) and each bitmap's
    /// table.
    fn bitmaps(&mut self, dir_off: u64, dir_size: u64, src: &mut Source) -> Result<(), Error> {
        if dir_size == 0 || dir_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Ok(());
        }
        self.fixed(dir_off, dir_size, "the bitmap directory");
        if self.map.mask() & class::BITMAP_TABLE == 0
            || dir_off
                .checked_add(dir_size)
                .is_none_or(|end| end > src.file_len)
        {
            return Ok(());
        }
        let mut dir = vec![0u8; dir_size as usize];
        src.read("the bitmap directory", &mut dir, dir_off)?;
        for entry in format::bitmap_directory(&dir) {
            // An entry whose name or extra data runs past the directory still names its
            // table; nothing after it is read.
            let (Ok(e) | Err(BrokenBitmapDirectory { cut_entry: Some(e) })) = entry else {
                break;
            };
            let BitmapDirEntry {
                table_offset,
                table_size,
            } = e;
            self.map
                .set(table_offset, table_size * 8, class::BITMAP_TABLE);
        }
        Ok(())
    }
}
