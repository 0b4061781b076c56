//! A small seeded pseudo-random generator (SplitMix64) so that offsets, read/write mixes and
//! image contents are reproducible from `--seed` without another dependency. Not for anything
//! that needs to be unpredictable. Each worker thread owns its own generator.

/// SplitMix64: a 64-bit counter pushed through an avalanche function. Passes BigCrush, which is
/// far more than picking block offsets needs.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for the `stream`-th independent user of `seed` (one per worker thread), so
    /// that two threads with the same seed do not draw the same sequence.
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        let mut mixer = Self::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        Self::new(mixer.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound > 0`), by widening multiplication. The bias is at most
    /// `bound / 2^64`, invisible for block counts.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below() needs a non-empty range");
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn streams_differ() {
        let mut a = SplitMix64::for_stream(7, 0);
        let mut b = SplitMix64::for_stream(7, 1);
        let a_values: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let b_values: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_ne!(a_values, b_values);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(1);
        let mut seen = [false; 10];
        for _ in 0..10_000 {
            let value = rng.below(10);
            assert!(value < 10);
            seen[value as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "all of 0..10 drawn in 10k tries");
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn fill_handles_odd_lengths() {
        let mut rng = SplitMix64::new(3);
        let mut buf = [0u8; 13];
        rng.fill(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
    }
}
