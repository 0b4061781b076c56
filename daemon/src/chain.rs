//! Walks the descriptor chain of one head of a split virtqueue, for chains just taken from the
//! available ring and for chains resubmitted after a reconnect alike (virtio-queue can only
//! build a chain for a head it pops itself).
//!
//! Runs on the worker thread that owns the queue. Descriptors are read through the guest
//! memory's bounds-checked `Bytes` API, so a descriptor outside guest memory is an error, never
//! an access. Every step is bounded: a chain may not hold more descriptors than its table (the
//! queue, or one indirect table), so a loop ends as [`ChainError::Loop`]; a `next` beyond the
//! table, an indirect table inside an indirect table, an indirect descriptor that also has NEXT
//! and an indirect table whose length is zero or not a whole number of descriptors are errors
//! too. On an error the walk stops after the descriptors already yielded and
//! [`ChainWalker::error`] says why: the caller fails the request (VIRTIO_BLK_S_IOERR).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of one split-ring descriptor.
const DESC_BYTES: u32 = 16;
/// Most descriptors an indirect table may hold (its entries are indexed by a u16).
const MAX_INDIRECT_DESCRIPTORS: u32 = 1 << 16;

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Why a chain is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The head or a `next` field names no descriptor of its table.
    IndexOutOfRange,
    /// More descriptors than the table holds: the chain loops.
    Loop,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// An indirect descriptor that also has NEXT set.
    IndirectWithNext,
    /// An indirect table of zero bytes, not a whole number of descriptors, or too long.
    BadIndirectLength,
    /// A descriptor (or its table) lies outside guest memory.
    DescriptorOutsideMemory,
}

/// The descriptors of one chain, as `(guest address, length, device-writable)`.
pub struct ChainWalker<'a> {
    mem: &'a GuestMemoryMmap,
    table: GuestAddress,
    /// Entries in `table`.
    table_len: u32,
    next: u32,
    /// Descriptors the chain may still take from `table`.
    ttl: u32,
    indirect: bool,
    done: bool,
    error: Option<ChainError>,
}

struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl<'a> ChainWalker<'a> {
    /// The chain starting at `head` in the descriptor table at `desc_table` of a queue of
    /// `queue_size` entries.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Self {
        ChainWalker {
            mem,
            table: desc_table,
            table_len: u32::from(queue_size),
            next: u32::from(head),
            ttl: u32::from(queue_size),
            indirect: false,
            done: false,
            error: None,
        }
    }

    /// Why the walk stopped early, if it did.
    pub fn error(&self) -> Option<ChainError> {
        self.error
    }

    fn fail(&mut self, why: ChainError) -> Option<(GuestAddress, u32, bool)> {
        self.error = Some(why);
        self.done = true;
        None
    }

    fn read(&self, index: u32) -> Option<Descriptor> {
        let at = self
            .table
            .checked_add(u64::from(index) * u64::from(DESC_BYTES))?;
        let mut raw = [0u8; DESC_BYTES as usize];
        self.mem.read_slice(&mut raw, at).ok()?;
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        Some(Descriptor {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        })
    }
}

impl Iterator for ChainWalker<'_> {
    type Item = (GuestAddress, u32, bool);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if self.next >= self.table_len {
                return self.fail(ChainError::IndexOutOfRange);
            }
            if self.ttl == 0 {
                return self.fail(ChainError::Loop);
            }
            self.ttl -= 1;
            let Some(desc) = self.read(self.next) else {
                return self.fail(ChainError::DescriptorOutsideMemory);
            };
            if desc.flags & F_INDIRECT != 0 {
                if self.indirect {
                    return self.fail(ChainError::NestedIndirect);
                }
                if desc.flags & F_NEXT != 0 {
                    return self.fail(ChainError::IndirectWithNext);
                }
                let entries = desc.len / DESC_BYTES;
                if desc.len == 0 || desc.len % DESC_BYTES != 0 || entries > MAX_INDIRECT_DESCRIPTORS
                {
                    return self.fail(ChainError::BadIndirectLength);
                }
                self.table = GuestAddress(desc.addr);
                self.table_len = entries;
                self.next = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            if desc.flags & F_NEXT != 0 {
                self.next = u32::from(desc.next);
            } else {
                self.done = true;
            }
            return Some((GuestAddress(desc.addr), desc.len, desc.flags & F_WRITE != 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: u64 = 0x1000;
    const QSIZE: u16 = 8;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Writes descriptor `index` of the table at `table`: (addr, len, flags, next).
    fn put(mem: &GuestMemoryMmap, table: u64, index: u64, d: (u64, u32, u16, u16)) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.0.to_le_bytes());
        raw[8..12].copy_from_slice(&d.1.to_le_bytes());
        raw[12..14].copy_from_slice(&d.2.to_le_bytes());
        raw[14..16].copy_from_slice(&d.3.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * index))
            .unwrap();
    }

    fn walk(mem: &GuestMemoryMmap, head: u16) -> (Vec<(u64, u32, bool)>, Option<ChainError>) {
        let mut w = ChainWalker::new(mem, GuestAddress(TABLE), QSIZE, head);
        let descs = w.by_ref().map(|(a, l, wr)| (a.0, l, wr)).collect();
        (descs, w.error())
    }

    #[test]
    fn direct_and_indirect_chains() {
        let m = memory();
        // 2 -> 5 -> 0: header, data (write), status (write).
        put(&m, TABLE, 2, (0x2000, 16, F_NEXT, 5));
        put(&m, TABLE, 5, (0x3000, 512, F_NEXT | F_WRITE, 0));
        put(&m, TABLE, 0, (0x4000, 1, F_WRITE, 0));
        assert_eq!(
            walk(&m, 2),
            (
                vec![(0x2000, 16, false), (0x3000, 512, true), (0x4000, 1, true)],
                None
            )
        );
        // A direct descriptor, then an indirect table of three.
        put(&m, TABLE, 3, (0x2100, 16, F_NEXT, 4));
        put(&m, TABLE, 4, (0x8000, 48, F_INDIRECT, 0));
        put(&m, 0x8000, 0, (0x5000, 8, F_NEXT, 2));
        put(&m, 0x8000, 2, (0x5100, 8, F_NEXT, 1));
        put(&m, 0x8000, 1, (0x5200, 1, F_WRITE, 0));
        assert_eq!(
            walk(&m, 3),
            (
                vec![
                    (0x2100, 16, false),
                    (0x5000, 8, false),
                    (0x5100, 8, false),
                    (0x5200, 1, true)
                ],
                None
            )
        );
        // A single descriptor; the last entry of the table.
        put(&m, TABLE, 7, (0x6000, 4, 0, 0));
        assert_eq!(walk(&m, 7), (vec![(0x6000, 4, false)], None));
    }

    #[test]
    fn malformed_chains_stop_with_a_reason() {
        let m = memory();
        // Head beyond the queue.
        assert_eq!(walk(&m, QSIZE), (vec![], Some(ChainError::IndexOutOfRange)));
        assert_eq!(
            walk(&m, u16::MAX),
            (vec![], Some(ChainError::IndexOutOfRange))
        );
        // `next` beyond the queue.
        put(&m, TABLE, 0, (0x2000, 16, F_NEXT, QSIZE));
        assert_eq!(
            walk(&m, 0),
            (vec![(0x2000, 16, false)], Some(ChainError::IndexOutOfRange))
        );
        // A loop 1 -> 2 -> 1: bounded by the queue size.
        put(&m, TABLE, 1, (0x2000, 16, F_NEXT, 2));
        put(&m, TABLE, 2, (0x3000, 1, F_NEXT | F_WRITE, 1));
        let (descs, error) = walk(&m, 1);
        assert_eq!(descs.len(), usize::from(QSIZE));
        assert_eq!(error, Some(ChainError::Loop));
        // A descriptor pointing to itself.
        put(&m, TABLE, 3, (0x2000, 16, F_NEXT, 3));
        assert_eq!(walk(&m, 3).1, Some(ChainError::Loop));
        // An indirect table inside an indirect table.
        put(&m, TABLE, 4, (0x8000, 32, F_INDIRECT, 0));
        put(&m, 0x8000, 0, (0x2000, 16, F_NEXT, 1));
        put(&m, 0x8000, 1, (0x9000, 16, F_INDIRECT, 0));
        assert_eq!(
            walk(&m, 4),
            (vec![(0x2000, 16, false)], Some(ChainError::NestedIndirect))
        );
        // Zero-length and ragged indirect tables.
        put(&m, TABLE, 5, (0x8000, 0, F_INDIRECT, 0));
        assert_eq!(walk(&m, 5), (vec![], Some(ChainError::BadIndirectLength)));
        put(&m, TABLE, 5, (0x8000, 24, F_INDIRECT, 0));
        assert_eq!(walk(&m, 5), (vec![], Some(ChainError::BadIndirectLength)));
        // Indirect with NEXT.
        put(&m, TABLE, 5, (0x8000, 32, F_INDIRECT | F_NEXT, 6));
        assert_eq!(walk(&m, 5), (vec![], Some(ChainError::IndirectWithNext)));
        // A loop inside an indirect table is bounded by the table.
        put(&m, TABLE, 6, (0xa000, 32, F_INDIRECT, 0));
        put(&m, 0xa000, 0, (0x2000, 16, F_NEXT, 1));
        put(&m, 0xa000, 1, (0x3000, 1, F_NEXT | F_WRITE, 0));
        let (descs, error) = walk(&m, 6);
        assert_eq!((descs.len(), error), (2, Some(ChainError::Loop)));
        // An indirect `next` beyond its table.
        put(&m, 0xa000, 1, (0x3000, 1, F_NEXT | F_WRITE, 2));
        assert_eq!(walk(&m, 6).1, Some(ChainError::IndexOutOfRange));
        // Tables outside guest memory, or whose end overflows the address space.
        put(&m, TABLE, 7, (0x4000_0000, 32, F_INDIRECT, 0));
        assert_eq!(
            walk(&m, 7),
            (vec![], Some(ChainError::DescriptorOutsideMemory))
        );
        put(&m, TABLE, 7, (u64::MAX - 8, 32, F_INDIRECT, 0));
        assert_eq!(walk(&m, 7).1, Some(ChainError::DescriptorOutsideMemory));
        let mut w = ChainWalker::new(&m, GuestAddress(u64::MAX - 16), QSIZE, 3);
        assert_eq!(w.next(), None);
        assert_eq!(w.error(), Some(ChainError::DescriptorOutsideMemory));
        // Once stopped, it stays stopped.
        assert_eq!(w.next(), None);
    }
}
