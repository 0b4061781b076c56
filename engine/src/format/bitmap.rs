//! The bitmaps extension's directory and bitmap tables (persistent dirty bitmaps), read
//! only to account for the clusters they use: the directory's entries and the offsets in a
//! bitmap table.

use super::{be32, be64_at};

/// Fixed part of a bitmap directory entry, in bytes.
pub const BITMAP_DIR_ENTRY_BYTES: u64 = 24;
/// Largest bitmap directory, in bytes (QEMU's limit).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// Largest bitmap table, in entries (QEMU's limit).
pub const MAX_BITMAP_TABLE_ENTRIES: u64 = 0x800_0000;

/// Bitmap table entry: offset of the data cluster.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry: bits that must be zero.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: all bits of this cluster are set (only without an offset).
const BME_ALL_ONES: u64 = 1;

/// A bitmap directory entry runs past the end of the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokenBitmapDirectory {
    /// What the entry says of its bitmap table when its fixed part lies inside the
    /// directory (its name or extra data is what runs past); `None` when the fixed part is
    /// cut short.
    pub cut_entry: Option<BitmapDirEntry>,
}

/// A bitmap table entry with reserved bits set, or an offset that is misaligned or comes
/// with the all-ones flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidBitmapTableEntry;

/// What a bitmap directory entry says of its bitmap table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u64,
}

/// The entries of a bitmap directory, in order. An entry that does not fit in what is left
/// of the directory ends it with [`BrokenBitmapDirectory`]; nothing follows that.
pub fn bitmap_directory(
    dir: &[u8],
) -> impl Iterator<Item = Result<BitmapDirEntry, BrokenBitmapDirectory>> + '_ {
    let len = dir.len() as u64;
    let mut pos = 0u64;
    let mut broken = false;
    std::iter::from_fn(move || {
        if broken || pos >= len {
            return None;
        }
        if pos + BITMAP_DIR_ENTRY_BYTES > len {
            broken = true;
            return Some(Err(BrokenBitmapDirectory { cut_entry: None }));
        }
        // pos + 24 <= len: the fixed part lies inside `dir`.
        let p = pos as usize;
        let table_offset = be64_at(dir, p);
        let table_size = u64::from(be32(dir, p + 8));
        let name_size = u64::from(u16::from_be_bytes([dir[p + 18], dir[p + 19]]));
        let extra = u64::from(be32(dir, p + 20));
        let entry = BitmapDirEntry {
            table_offset,
            table_size,
        };
        let entry_bytes = (BITMAP_DIR_ENTRY_BYTES + name_size + extra).next_multiple_of(8);
        if pos + entry_bytes > len {
            broken = true;
            return Some(Err(BrokenBitmapDirectory {
                cut_entry: Some(entry),
            }));
        }
        pos += entry_bytes;
        Some(Ok(entry))
    })
}

/// Decodes a bitmap table entry: `Ok(Some(offset))` for a data cluster, `Ok(None)` for none
/// (all zeros or all ones).
pub fn decode_bitmap_table_entry(
    raw: u64,
    cluster_size: u64,
) -> Result<Option<u64>, InvalidBitmapTableEntry> {
    let off = raw & BME_OFFSET_MASK;
    if raw & BME_RESERVED_MASK != 0
        || (off != 0 && (raw & BME_ALL_ONES != 0 || !off.is_multiple_of(cluster_size)))
    {
        return Err(InvalidBitmapTableEntry);
    }
    Ok((off != 0).then_some(off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table_offset: u64, table_size: u32, name: &[u8], extra: u32) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&table_offset.to_be_bytes()); // bitmap table offset
        e.extend_from_slice(&table_size.to_be_bytes()); // bitmap table entries
        e.extend_from_slice(&0u32.to_be_bytes()); // flags
        e.push(0); // type
        e.push(16); // granularity bits
        e.extend_from_slice(&(name.len() as u16).to_be_bytes()); // name size
        e.extend_from_slice(&extra.to_be_bytes()); // extra data size
        e.resize(e.len() + extra as usize, 0); // extra data
        e.extend_from_slice(name); // name
        e.resize(e.len().next_multiple_of(8), 0); // padding
        e
    }

    #[test]
    fn directory_entries_in_order_and_a_broken_tail() {
        let mut dir = entry(0x30000, 2, b"a", 0);
        dir.extend(entry(0x50000, 1, b"bitmap-two", 4));
        let got: Vec<_> = bitmap_directory(&dir).collect();
        assert_eq!(
            got,
            [
                Ok(BitmapDirEntry {
                    table_offset: 0x30000,
                    table_size: 2
                }),
                Ok(BitmapDirEntry {
                    table_offset: 0x50000,
                    table_size: 1
                }),
            ]
        );
        // A name that runs past the directory ends it.
        let mut cut = entry(0x30000, 2, b"a", 0);
        cut.extend(entry(0x50000, 1, b"long name", 0));
        cut.truncate(cut.len() - 8);
        let got: Vec<_> = bitmap_directory(&cut).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Err(BrokenBitmapDirectory {
                cut_entry: Some(BitmapDirEntry {
                    table_offset: 0x50000,
                    table_size: 1
                })
            })
        );
        // So does a fixed part cut short.
        let got: Vec<_> = bitmap_directory(&cut[..40]).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], Err(BrokenBitmapDirectory { cut_entry: None }));
    }

    #[test]
    fn bitmap_table_entries() {
        assert_eq!(decode_bitmap_table_entry(0, 65536), Ok(None));
        assert_eq!(decode_bitmap_table_entry(1, 65536), Ok(None));
        assert_eq!(decode_bitmap_table_entry(0x30000, 65536), Ok(Some(0x30000)));
        assert_eq!(
            decode_bitmap_table_entry(0x30001, 65536),
            Err(InvalidBitmapTableEntry)
        );
        assert_eq!(
            decode_bitmap_table_entry(0x30200, 65536),
            Err(InvalidBitmapTableEntry)
        );
        assert_eq!(
            decode_bitmap_table_entry(1 << 63, 65536),
            Err(InvalidBitmapTableEntry)
        );
    }
}
