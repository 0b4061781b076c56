//! Deterministic pseudo-random data: one seeded generator for every test.

/// splitmix64: small, seeded, good enough for test data.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` seeded random (incompressible) bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// A mix of regions: all-zero, random (incompressible), text-like (compresses well), and a
/// repeating counter pattern. Region lengths run from 4 KiB to 4 MiB so that, whatever the
/// cluster size, some clusters are stored compressed, some uncompressed and some not at all.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "qcow2", "cluster", "refcount", "backing", "guest", "sector", "virtio", "queue", "lorem",
        "ipsum", "dolor", "compress", "zstd", "deflate", "\n", "  ", "0123", "L2",
    ];
    let mut rng = Rng::new(seed);
    let mut v = vec![0u8; len];
    let mut pos = 0;
    let mut kind = 0;
    while pos < len {
        let region = (4096usize << rng.below(11)).min(len - pos);
        let r = &mut v[pos..pos + region];
        match kind % 4 {
            0 => {} // zeros
            1 => rng.fill(r),
            2 => {
                let mut i = 0;
                while i < r.len() {
                    let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                    let n = w.len().min(r.len() - i);
                    r[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            _ => {
                let base = rng.next_u64();
                for (i, b) in r.iter_mut().enumerate() {
                    *b = (base as usize).wrapping_add(i / 16) as u8;
                }
            }
        }
        pos += region;
        kind += 1 + rng.below(3) as usize;
    }
    v
}
