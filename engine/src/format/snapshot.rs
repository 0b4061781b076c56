//! The internal snapshot table: reading it the way QEMU reads it, and encoding a new one.
//!
//! Entries are 8-byte aligned: a 40-byte fixed part, `extra_data_size` bytes of extra data
//! (the first 16 are the 64-bit VM state size and the disk size; version 3 requires them),
//! then the ID and the name. QEMU refuses to open an image with an entry of more than 1 KiB of
//! extra data or a table of more than 64 MiB; when it repairs an image it truncates such extra
//! data and drops the snapshots past the limit instead. [`read_table`] does both, through a
//! caller's read function (bytes past the end of the file read as zeros there, as in QEMU).
//! Pure: no I/O of its own, any thread.

use super::{be32, be64_at, FormatError, MAX_SNAPSHOTS};

/// Fixed part of an entry.
pub const SNAPSHOT_HEADER_BYTES: u64 = 40;
/// Extra data QEMU knows (VM state size, disk size); version 3 requires all of it.
pub const SNAPSHOT_KNOWN_EXTRA_BYTES: u32 = 16;
/// Most extra data QEMU accepts in one entry.
pub const MAX_SNAPSHOT_EXTRA_BYTES: u32 = 1024;
/// Largest snapshot table QEMU accepts.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Bytes fetched at a time from the caller's read function.
const WINDOW_BYTES: u64 = 64 << 10;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the entry itself (8-byte aligned).
    pub offset: u64,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Extra data size as read (after truncation to [`MAX_SNAPSHOT_EXTRA_BYTES`] when
    /// repairing).
    pub extra_data_size: u32,
    /// The fixed part as found (kept only when asked for).
    pub fixed: Vec<u8>,
    /// The extra data as found, at most [`MAX_SNAPSHOT_EXTRA_BYTES`] (kept only when asked).
    pub extra: Vec<u8>,
    /// The ID string (kept only when asked).
    pub id: Vec<u8>,
    /// The name (kept only when asked).
    pub name: Vec<u8>,
}

/// What [`read_table`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The entries kept.
    pub entries: Vec<SnapshotEntry>,
    /// Bytes from the table's offset to the end of the last entry kept.
    pub size_bytes: u64,
    /// Entries whose extra data was truncated (repair only).
    pub extra_truncated: u32,
    /// Entries dropped off the end because the table was too big or too long (repair only).
    pub dropped: u32,
}

impl SnapshotTable {
    /// Entries without the extra data version 3 requires.
    pub fn incomplete(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.extra_data_size < SNAPSHOT_KNOWN_EXTRA_BYTES)
            .count()
    }
}

/// Why [`read_table`] failed.
#[derive(Debug)]
pub enum SnapshotReadError<E> {
    /// The caller's read function failed.
    Io(E),
    /// The table cannot be used (and was not being repaired).
    Format(FormatError),
}

fn invalid<E>(reason: String) -> SnapshotReadError<E> {
    SnapshotReadError::Format(FormatError::InvalidField {
        field: "snapshot table",
        reason,
    })
}

/// The caller's read function: fills the buffer from the offset (zeros past the end of the
/// file).
pub type ReadFn<'a, E> = &'a mut dyn FnMut(u64, &mut [u8]) -> Result<(), E>;

/// Reads bytes through a window so that many small entries cost few reads.
struct Window<'a, E> {
    read: ReadFn<'a, E>,
    start: u64,
    buf: Vec<u8>,
}

impl<E> Window<'_, E> {
    fn get(&mut self, mut off: u64, out: &mut [u8]) -> Result<(), E> {
        let mut done = 0usize;
        while done < out.len() {
            let end = self.start + self.buf.len() as u64;
            if self.buf.is_empty() || off < self.start || off >= end {
                self.start = off - off % WINDOW_BYTES;
                self.buf.resize(WINDOW_BYTES as usize, 0);
                (self.read)(self.start, &mut self.buf)?;
                continue;
            }
            let at = (off - self.start) as usize;
            let n = (self.buf.len() - at).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[at..at + n]);
            done += n;
            off += n as u64;
        }
        Ok(())
    }
}

/// Reads `nb` entries at `start` as QEMU's `qcow2_do_read_snapshots` does.
///
/// Without `repair`, an entry with more than 1 KiB of extra data or a table of more than
/// 64 MiB is an error, as when QEMU opens the image; with `repair`, such extra data is
/// truncated and the entries from the one that crosses the limit on are dropped (counted in
/// the result). More than 65536 entries is an error either way (a repair first lowers the
/// count). `keep` keeps each entry's bytes, for rewriting the table. `read(off, buf)` must
/// fill `buf` from `off` (zeros past the end of the file).
pub fn read_table<E>(
    start: u64,
    nb: u32,
    repair: bool,
    keep: bool,
    read: ReadFn<'_, E>,
) -> Result<SnapshotTable, SnapshotReadError<E>> {
    let mut entries = Vec::new();
    let mut table = walk_table(
        start,
        nb,
        repair,
        keep,
        read,
        Some(&mut |e| entries.push(e)),
    )?;
    table.entries = entries;
    Ok(table)
}

/// Whether QEMU's open would accept the `nb` entries at `start`, as [`read_table`] without
/// `repair` decides it, but keeping nothing: an open only needs the verdict, and a table may
/// hold 65536 entries.
pub fn check_table<E>(
    start: u64,
    nb: u32,
    read: ReadFn<'_, E>,
) -> Result<(), SnapshotReadError<E>> {
    walk_table(start, nb, false, false, read, None).map(drop)
}

/// The walk of [`read_table`]: each entry kept is given to `each` (none is made without
/// one); the table returned has no entries.
fn walk_table<E>(
    start: u64,
    nb: u32,
    repair: bool,
    keep: bool,
    read: ReadFn<'_, E>,
    mut each: Option<&mut dyn FnMut(SnapshotEntry)>,
) -> Result<SnapshotTable, SnapshotReadError<E>> {
    if nb > MAX_SNAPSHOTS {
        return Err(invalid(format!(
            "{nb} snapshots exceed the limit of {MAX_SNAPSHOTS}"
        )));
    }
    let mut w = Window {
        read,
        start: 0,
        buf: Vec::new(),
    };
    let mut table = SnapshotTable::default();
    let mut off = start;
    let mut length = 0u64;
    for i in 0..nb {
        let before = off;
        length = length.next_multiple_of(8);
        off = off.next_multiple_of(8);
        let mut fixed = [0u8; SNAPSHOT_HEADER_BYTES as usize];
        w.get(off, &mut fixed).map_err(SnapshotReadError::Io)?;
        off += SNAPSHOT_HEADER_BYTES;
        let mut extra_size = be32(&fixed, 36);
        let id_size = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_size = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let mut truncate = false;
        if extra_size > MAX_SNAPSHOT_EXTRA_BYTES {
            if !repair {
                return Err(invalid(format!(
                    "too much extra metadata in snapshot table entry {i} ({extra_size} bytes, at most {MAX_SNAPSHOT_EXTRA_BYTES}; qcow2d check --repair truncates it)"
                )));
            }
            truncate = true;
            table.extra_truncated += 1;
        }
        let extra_end = off + u64::from(extra_size);
        if truncate {
            extra_size = MAX_SNAPSHOT_EXTRA_BYTES;
        }
        let mut extra = Vec::new();
        if keep {
            extra.resize(extra_size as usize, 0);
            w.get(off, &mut extra).map_err(SnapshotReadError::Io)?;
        }
        off = extra_end;
        let (mut id, mut name) = (Vec::new(), Vec::new());
        if keep {
            id.resize(id_size as usize, 0);
            w.get(off, &mut id).map_err(SnapshotReadError::Io)?;
            name.resize(name_size as usize, 0);
            w.get(off + id_size, &mut name)
                .map_err(SnapshotReadError::Io)?;
        }
        off += id_size + name_size;
        length += SNAPSHOT_HEADER_BYTES + u64::from(extra_size) + id_size + name_size;
        if length > MAX_SNAPSHOT_TABLE_BYTES || off - start > i32::MAX as u64 {
            if !repair {
                return Err(invalid(format!(
                    "the snapshot table is too big (more than {} MiB; qcow2d check --repair drops the {} overhanging snapshots)",
                    MAX_SNAPSHOT_TABLE_BYTES >> 20,
                    nb - i
                )));
            }
            table.dropped = nb - i;
            off = before;
            break;
        }
        if let Some(each) = each.as_mut() {
            each(SnapshotEntry {
                offset: before.next_multiple_of(8),
                l1_table_offset: be64_at(&fixed, 0),
                l1_size: be32(&fixed, 8),
                extra_data_size: extra_size,
                fixed: if keep { fixed.to_vec() } else { Vec::new() },
                extra,
                id,
                name,
            });
        }
    }
    table.size_bytes = off - start;
    Ok(table)
}

/// Encodes `entries` (read with `keep`) as a table, each with at least the 16 bytes of extra
/// data version 3 requires (a missing disk size is `disk_size`, a missing 64-bit VM state
/// size the 32-bit one), as QEMU's `qcow2_write_snapshots` writes them.
pub fn encode_table(entries: &[SnapshotEntry], disk_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.resize(out.len().next_multiple_of(8), 0);
        let mut fixed = e.fixed.clone();
        fixed.resize(SNAPSHOT_HEADER_BYTES as usize, 0);
        let extra_size = e.extra_data_size.max(SNAPSHOT_KNOWN_EXTRA_BYTES);
        fixed[36..40].copy_from_slice(&extra_size.to_be_bytes());
        fixed[12..14].copy_from_slice(&(e.id.len() as u16).to_be_bytes());
        fixed[14..16].copy_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&fixed);
        let mut extra = e.extra.clone();
        if e.extra_data_size < 8 {
            // The 64-bit VM state size comes from the 32-bit field.
            let vm_state = u64::from(be32(&fixed, 32));
            extra.resize(8, 0);
            extra[..8].copy_from_slice(&vm_state.to_be_bytes());
        }
        if e.extra_data_size < SNAPSHOT_KNOWN_EXTRA_BYTES {
            extra.resize(16, 0);
            extra[8..16].copy_from_slice(&disk_size.to_be_bytes());
        }
        extra.resize(extra_size as usize, 0);
        out.extend_from_slice(&extra);
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(l1: u64, extra: u32, id: &[u8], name: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&l1.to_be_bytes()); // l1_table_offset
        b.extend_from_slice(&1u32.to_be_bytes()); // l1_size
        b.extend_from_slice(&(id.len() as u16).to_be_bytes()); // id_str_size
        b.extend_from_slice(&(name.len() as u16).to_be_bytes()); // name_size
        b.extend_from_slice(&[0u8; 16]); // date_sec, date_nsec, vm_clock_nsec
        b.extend_from_slice(&7u32.to_be_bytes()); // vm_state_size
        b.extend_from_slice(&extra.to_be_bytes()); // extra_data_size
        b.resize(b.len() + extra as usize, 0xee); // extra data
        b.extend_from_slice(id);
        b.extend_from_slice(name);
        b.resize(b.len().next_multiple_of(8), 0);
        b
    }

    fn reader(file: Vec<u8>) -> impl FnMut(u64, &mut [u8]) -> Result<(), ()> {
        move |off, buf| {
            buf.fill(0);
            let off = off as usize;
            if off < file.len() {
                let n = (file.len() - off).min(buf.len());
                buf[..n].copy_from_slice(&file[off..off + n]);
            }
            Ok(())
        }
    }

    #[test]
    fn reads_entries_and_counts_incomplete_ones() {
        let mut file = vec![0u8; 0x100];
        file.extend(entry(0x30000, 16, b"1", b"a"));
        file.extend(entry(0x40000, 0, b"2", b"bb"));
        check_table(0x100, 2, &mut reader(file.clone())).unwrap();
        assert!(check_table(0x100, MAX_SNAPSHOTS + 1, &mut reader(file.clone())).is_err());
        let t = read_table(0x100, 2, false, true, &mut reader(file)).unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.entries[1].l1_table_offset, 0x40000);
        assert_eq!(t.entries[1].name, b"bb");
        assert_eq!(t.incomplete(), 1);
        assert_eq!(t.size_bytes, 64 + 43);
    }

    #[test]
    fn too_much_extra_data_is_refused_or_truncated() {
        let mut file = vec![0u8; 0x100];
        file.extend(entry(0x30000, 2000, b"1", b"a"));
        let err = read_table(0x100, 1, false, false, &mut reader(file.clone())).unwrap_err();
        assert!(matches!(err, SnapshotReadError::Format(_)));
        let err = check_table(0x100, 1, &mut reader(file.clone())).unwrap_err();
        assert!(matches!(err, SnapshotReadError::Format(_)));
        let t = read_table(0x100, 1, true, true, &mut reader(file)).unwrap();
        assert_eq!(t.extra_truncated, 1);
        assert_eq!(t.entries[0].extra_data_size, MAX_SNAPSHOT_EXTRA_BYTES);
        assert_eq!(t.entries[0].id, b"1");
    }

    #[test]
    fn too_big_a_table_is_refused_or_cut() {
        // Entries of 40 + 65535 + 65535 bytes: the 513th crosses 64 MiB.
        let mut big = entry(0, 0, &[b'i'; 65535], &[b'n'; 65535]);
        big.truncate(40);
        let read = &mut |off: u64, buf: &mut [u8]| -> Result<(), ()> {
            // Every entry starts at a multiple of its padded size, 131112 bytes.
            for (k, b) in buf.iter_mut().enumerate() {
                let at = (off + k as u64) % 131112;
                *b = big.get(at as usize).copied().unwrap_or(0);
            }
            Ok(())
        };
        assert!(read_table(0, 600, false, false, read).is_err());
        assert!(check_table(0, 600, read).is_err());
        assert!(check_table(0, 511, read).is_ok());
        let t = read_table(0, 600, true, false, read).unwrap();
        assert_eq!(t.entries.len(), 511);
        assert_eq!(t.dropped, 89);
        assert!(t.size_bytes <= MAX_SNAPSHOT_TABLE_BYTES);
    }

    #[test]
    fn encoding_adds_the_required_extra_data() {
        let mut file = vec![0u8; 0x100];
        file.extend(entry(0x30000, 0, b"1", b"a"));
        let t = read_table(0x100, 1, false, true, &mut reader(file)).unwrap();
        let enc = encode_table(&t.entries, 1 << 26);
        let mut again = vec![0u8; 0x100];
        again.extend(&enc);
        let t2 = read_table(0x100, 1, false, true, &mut reader(again)).unwrap();
        assert_eq!(t2.incomplete(), 0);
        assert_eq!(t2.entries[0].extra[..8], 7u64.to_be_bytes());
        assert_eq!(t2.entries[0].extra[8..16], (1u64 << 26).to_be_bytes());
        assert_eq!(t2.entries[0].name, b"a");
    }
}
