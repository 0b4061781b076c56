//! The stored refcounts, read through the image's refcount table as QEMU reads them, and
//! their comparison with the expected ones the walk counted (leaks, corruptions, and check
//! errors where a refcount block cannot be read). Runs on the thread that called
//! [`super::check`].
#![forbid(unsafe_code)]

use super::walk::{all_zero, Analysis, Geo};
use super::{zeroed, Target, MAX_LISTED_CLUSTERS};
use crate::error::Error;
use crate::format::{refcount_get, REFT_OFFSET_MASK, REFT_RESERVED_MASK};

/// What a refcount table entry points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Block {
    /// No block: every refcount it would hold is 0.
    Missing,
    /// The entry is invalid: the refcounts cannot be read.
    Invalid,
    /// A block at this offset.
    At(u64),
}

/// Reads stored refcounts through the refcount table, one block cached.
pub(super) struct Stored {
    pub(super) table: Vec<u64>,
    /// The geometry of the stored structure: in the image's own refcount width.
    pub(super) g: Geo,
    pub(super) cached: Option<u64>,
    pub(super) block: Vec<u8>,
    pub(super) state: Block,
}

impl Stored {
    pub(super) fn new(a: &Analysis) -> Stored {
        Stored {
            table: a.reftable.clone(),
            g: a.g.stored(),
            cached: None,
            block: Vec::new(),
            state: Block::Missing,
        }
    }

    pub(super) fn block_of(&self, b: u64) -> Block {
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
    pub(super) fn read_block_of(&self, b: u64) -> Block {
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

    /// Whether block `b` is read from the file and holds only zeros.
    pub(super) fn block_is_zero(&mut self, t: &mut Target, b: u64) -> Result<bool, Error> {
        self.get(t, b.saturating_mul(self.g.epb))?;
        Ok(matches!(self.state, Block::At(_)) && all_zero(&self.block))
    }

    /// The stored refcount of host cluster `c`; `None` when its refcount block cannot be
    /// read (it is misaligned).
    pub(super) fn get(&mut self, t: &mut Target, c: u64) -> Result<Option<u64>, Error> {
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

impl Analysis {
    /// Compares stored and expected refcounts of every host cluster of the file. A stored
    /// refcount that cannot be read is a check error, as in QEMU. Ranges with neither a
    /// refcount block nor a reference are skipped whole, so a huge sparse file costs time
    /// only where it has refcounts or references.
    pub(super) fn compare(&mut self, t: &mut Target, stored: &mut Stored) -> Result<(), Error> {
        // Walked block by block of the stored structure.
        let g = stored.g;
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
            // A block of zeros where nothing is referenced: every cluster agrees.
            if matches!(state, Block::At(_))
                && self.counts.zero_range(c, block_end)
                && stored.block_is_zero(t, c / g.epb)?
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
}
