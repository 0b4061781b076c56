//! What each worker asks for next: the access pattern, the offsets it produces inside the
//! benchmark region, and the read/write choice for mixed patterns. Pure and deterministic for a
//! given seed; one [`OffsetGen`] and one [`OpMix`] per worker thread.

use crate::rng::SplitMix64;
use serde::Serialize;

/// The access pattern of a run, as named on the command line (fio's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Uniformly random reads and writes, `--rwmix-read` percent reads.
    Randrw,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Randrw => "randrw",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Pattern::Read,
            Pattern::Write,
            Pattern::Randread,
            Pattern::Randwrite,
            Pattern::Randrw,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }

    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }

    /// True when the pattern issues no writes, so the client may attach read-only.
    pub fn is_read_only(self) -> bool {
        matches!(self, Pattern::Read | Pattern::Randread)
    }

    /// The share of reads in percent; `rwmix_read_percent` only matters for `randrw`.
    pub fn read_percent(self, rwmix_read_percent: u8) -> u8 {
        match self {
            Pattern::Read | Pattern::Randread => 100,
            Pattern::Write | Pattern::Randwrite => 0,
            Pattern::Randrw => rwmix_read_percent,
        }
    }
}

/// The part of the disk a run touches, validated against the block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub block_size_bytes: u64,
}

impl Region {
    /// Checks that the region holds at least one block per queue, starts on a block boundary
    /// and ends inside a disk of `capacity_bytes`.
    pub fn new(
        start_bytes: u64,
        size_bytes: u64,
        block_size_bytes: u64,
        capacity_bytes: u64,
        queues: usize,
    ) -> Result<Self, String> {
        if block_size_bytes == 0 {
            return Err("Block size must not be zero".into());
        }
        if start_bytes % block_size_bytes != 0 {
            return Err(format!(
                "Region start {start_bytes} is not a multiple of the block size {block_size_bytes}"
            ));
        }
        let end_bytes = start_bytes
            .checked_add(size_bytes)
            .ok_or_else(|| "Region end overflows".to_string())?;
        if end_bytes > capacity_bytes {
            return Err(format!(
                "Region {start_bytes}..{end_bytes} ends beyond the disk's {capacity_bytes} bytes"
            ));
        }
        let region = Self {
            start_bytes,
            size_bytes,
            block_size_bytes,
        };
        if region.blocks() < queues as u64 {
            return Err(format!(
                "Region of {size_bytes} bytes holds {} blocks of {block_size_bytes} bytes, \
                 fewer than the {queues} queues",
                region.blocks()
            ));
        }
        Ok(region)
    }

    /// Whole blocks in the region; a partial block at the end is never touched.
    pub fn blocks(&self) -> u64 {
        self.size_bytes / self.block_size_bytes
    }

    /// The offset generator of worker `index` out of `workers`: for sequential patterns its own
    /// contiguous slice of the region, for random patterns the whole region.
    pub fn offsets_for(
        &self,
        pattern: Pattern,
        seed: u64,
        index: usize,
        workers: usize,
    ) -> OffsetGen {
        let bs = self.block_size_bytes;
        if pattern.is_random() {
            OffsetGen::Random {
                start_bytes: self.start_bytes,
                blocks: self.blocks(),
                block_size_bytes: bs,
                rng: SplitMix64::for_stream(seed, 2 * index as u64),
            }
        } else {
            let blocks_per_worker = self.blocks() / workers as u64;
            let slice_start = self.start_bytes + index as u64 * blocks_per_worker * bs;
            OffsetGen::Sequential {
                start_bytes: slice_start,
                blocks: blocks_per_worker,
                block_size_bytes: bs,
                next_block: 0,
            }
        }
    }
}

/// Produces the offset of each request a worker submits.
#[derive(Clone, Debug)]
pub enum OffsetGen {
    /// Streams through `blocks` blocks from `start_bytes`, wrapping around at the end.
    Sequential {
        start_bytes: u64,
        blocks: u64,
        block_size_bytes: u64,
        next_block: u64,
    },
    /// Uniformly random blocks among `blocks` blocks from `start_bytes`.
    Random {
        start_bytes: u64,
        blocks: u64,
        block_size_bytes: u64,
        rng: SplitMix64,
    },
}

impl OffsetGen {
    pub fn next_offset(&mut self) -> u64 {
        match self {
            OffsetGen::Sequential {
                start_bytes,
                blocks,
                block_size_bytes,
                next_block,
            } => {
                let offset = *start_bytes + *next_block * *block_size_bytes;
                *next_block += 1;
                if *next_block == *blocks {
                    *next_block = 0;
                }
                offset
            }
            OffsetGen::Random {
                start_bytes,
                blocks,
                block_size_bytes,
                rng,
            } => *start_bytes + rng.below(*blocks) * *block_size_bytes,
        }
    }
}

/// Read or write, chosen per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// Chooses reads with probability `read_percent` %.
#[derive(Clone, Debug)]
pub struct OpMix {
    read_percent: u8,
    rng: SplitMix64,
}

impl OpMix {
    pub fn new(read_percent: u8, seed: u64, index: usize) -> Self {
        Self {
            read_percent: read_percent.min(100),
            rng: SplitMix64::for_stream(seed, 2 * index as u64 + 1),
        }
    }

    pub fn next_op(&mut self) -> Op {
        match self.read_percent {
            100 => Op::Read,
            0 => Op::Write,
            percent if self.rng.below(100) < u64::from(percent) => Op::Read,
            _ => Op::Write,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn region(start: u64, size: u64, bs: u64) -> Region {
        Region::new(start, size, bs, 64 * MIB, 4).unwrap()
    }

    #[test]
    fn region_validation() {
        assert!(Region::new(0, 64 * MIB, 4096, 64 * MIB, 2).is_ok());
        assert!(
            Region::new(0, 64 * MIB + 1, 4096, 64 * MIB, 2).is_err(),
            "past the end"
        );
        assert!(
            Region::new(512, MIB, 4096, 64 * MIB, 2).is_err(),
            "unaligned start"
        );
        assert!(
            Region::new(0, 4096, 4096, 64 * MIB, 2).is_err(),
            "one block, two queues"
        );
        assert!(
            Region::new(0, MIB, 0, 64 * MIB, 1).is_err(),
            "zero block size"
        );
        assert!(
            Region::new(u64::MAX - 10, 100, 1, u64::MAX, 1).is_err(),
            "overflow"
        );
    }

    #[test]
    fn random_offsets_in_range_and_aligned() {
        let r = region(MIB, 8 * MIB + 100, 4096);
        for index in 0..4 {
            let mut gen = r.offsets_for(Pattern::Randread, 9, index, 4);
            for _ in 0..10_000 {
                let offset = gen.next_offset();
                assert_eq!(offset % 4096, 0);
                assert!(offset >= MIB);
                assert!(
                    offset + 4096 <= 9 * MIB,
                    "offset {offset} leaves the region"
                );
            }
        }
    }

    #[test]
    fn random_offsets_deterministic_with_seed() {
        let r = region(0, 16 * MIB, 65536);
        let draw = |seed: u64, index: usize| -> Vec<u64> {
            let mut gen = r.offsets_for(Pattern::Randrw, seed, index, 2);
            (0..64).map(|_| gen.next_offset()).collect()
        };
        assert_eq!(draw(5, 0), draw(5, 0));
        assert_eq!(draw(5, 1), draw(5, 1));
        assert_ne!(draw(5, 0), draw(6, 0), "another seed, another sequence");
        assert_ne!(draw(5, 0), draw(5, 1), "workers draw different sequences");
    }

    #[test]
    fn random_offsets_cover_the_region() {
        let r = region(0, 64 * 4096, 4096);
        let mut gen = r.offsets_for(Pattern::Randwrite, 1, 0, 1);
        let mut seen = [false; 64];
        for _ in 0..10_000 {
            seen[(gen.next_offset() / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn sequential_slices_are_disjoint_and_wrap() {
        // 10 blocks over 3 workers: 3 blocks each, the 10th is never touched.
        let r = Region::new(8192, 10 * 4096, 4096, MIB, 3).unwrap();
        let mut all = Vec::new();
        for index in 0..3 {
            let mut gen = r.offsets_for(Pattern::Read, 0, index, 3);
            let first: Vec<u64> = (0..3).map(|_| gen.next_offset()).collect();
            let base = 8192 + index as u64 * 3 * 4096;
            assert_eq!(first, vec![base, base + 4096, base + 8192]);
            assert_eq!(gen.next_offset(), base, "wraps to the slice start");
            all.extend(first);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 9);
        assert!(all
            .iter()
            .all(|&o| o % 4096 == 0 && o + 4096 <= 8192 + 10 * 4096));
    }

    #[test]
    fn op_mix_respects_percentages() {
        let mut reads_only = OpMix::new(100, 1, 0);
        let mut writes_only = OpMix::new(0, 1, 0);
        for _ in 0..1000 {
            assert_eq!(reads_only.next_op(), Op::Read);
            assert_eq!(writes_only.next_op(), Op::Write);
        }
        let mut mixed = OpMix::new(70, 1, 0);
        let reads = (0..100_000).filter(|_| mixed.next_op() == Op::Read).count();
        assert!((68_000..72_000).contains(&reads), "{reads} reads of 100k");
    }

    #[test]
    fn pattern_names_round_trip() {
        for p in [
            Pattern::Read,
            Pattern::Write,
            Pattern::Randread,
            Pattern::Randwrite,
            Pattern::Randrw,
        ] {
            assert_eq!(Pattern::from_name(p.name()), Some(p));
        }
        assert_eq!(Pattern::from_name("readwrite"), None);
    }
}
