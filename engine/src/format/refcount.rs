//! Refcount blocks: entries of 1 to 64 bits, packed big endian; sub-byte widths are packed
//! starting from the least significant bit of each byte. Refcount table entries.

/// Refcount table entry: offset of the refcount block.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount table entry: bits that must be zero.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Reads entry `index` of a refcount block with entries of `1 << order` bits.
///
/// The caller guarantees `index` lies inside `block` (`index < block.len() * 8 >> order`).
pub fn refcount_get(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        _ => {
            let n = bits / 8;
            let at = index * n;
            block[at..at + n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Largest refcount an entry of `1 << order` bits holds.
pub fn refcount_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Writes `value` into entry `index`; `Err` when it does not fit the width.
pub fn refcount_set(block: &mut [u8], order: u32, index: usize, value: u64) -> Result<(), u64> {
    if value > refcount_max(order) {
        return Err(value);
    }
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | ((value as u8) << shift);
        }
        _ => {
            let n = bits / 8;
            let at = index * n;
            for (i, b) in block[at..at + n].iter_mut().enumerate() {
                *b = (value >> (8 * (n - 1 - i))) as u8;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let entries = (64 * 8) >> order;
            let max = refcount_max(order);
            for i in 0..entries {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                refcount_set(&mut block, order, i, v).unwrap();
            }
            for i in 0..entries {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(refcount_get(&block, order, i), v, "order {order} entry {i}");
            }
            if order < 6 {
                assert!(refcount_set(&mut block, order, 0, max + 1).is_err());
            }
        }
    }

    #[test]
    fn layout_matches_the_specification() {
        // 1-bit refcounts: entry 0 is the least significant bit of byte 0.
        let mut b = [0u8; 2];
        refcount_set(&mut b, 0, 0, 1).unwrap();
        refcount_set(&mut b, 0, 9, 1).unwrap();
        assert_eq!(b, [0x01, 0x02]);
        // 16-bit refcounts are big endian.
        let mut b = [0u8; 4];
        refcount_set(&mut b, 4, 1, 0x1234).unwrap();
        assert_eq!(b, [0, 0, 0x12, 0x34]);
    }
}
