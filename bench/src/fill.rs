//! Block contents: fast pseudo-random data derived from (file, offset), so
//! compression and dedup cannot cheat and `--verify` can recompute it.

/// wyrand: a small, fast, statistically decent generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeds a generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform value in `0..n` (n > 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Seed of the block at `offset` of file number `file`.
#[inline]
pub fn block_seed(file: u64, offset: u64) -> u64 {
    let mut r = Rng::new(file.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ offset);
    r.next_u64()
}

/// Independent generator lanes: word `k` of a block comes from lane `k % LANES`,
/// so the lanes advance side by side in vector registers.
const LANES: usize = 8;

/// Block data generator: 8 xorshift64 lanes seeded from the block's seed. Shifts and
/// xors only, so it vectorizes (SSE2 everywhere, AVX2 where the CPU has it).
#[derive(Clone)]
struct Lanes([u64; LANES]);

impl Lanes {
    #[inline(always)]
    fn new(seed: u64) -> Self {
        let mut r = Rng::new(seed);
        // xorshift state must never be zero.
        Self(std::array::from_fn(|_| r.next_u64() | 1))
    }

    /// The next `LANES` words.
    #[inline(always)]
    fn step(&mut self) -> [u64; LANES] {
        for x in &mut self.0 {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
        }
        self.0
    }
}

#[inline(always)]
fn fill_words(buf: &mut [u8], seed: u64) {
    let mut g = Lanes::new(seed);
    let mut chunks = buf.chunks_exact_mut(LANES * 8);
    for c in &mut chunks {
        for (dst, w) in c.chunks_exact_mut(8).zip(g.step()) {
            dst.copy_from_slice(&w.to_ne_bytes());
        }
    }
    let tail = chunks.into_remainder();
    let words = g.step();
    for (dst, w) in tail.chunks_exact_mut(8).zip(words) {
        dst.copy_from_slice(&w.to_ne_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fill_words_avx2(buf: &mut [u8], seed: u64) {
    fill_words(buf, seed);
}

/// Fills the first `pct` percent of `buf` with the data of (file, offset).
#[inline]
pub fn fill(buf: &mut [u8], file: u64, offset: u64, pct: u8) {
    let len = (buf.len() * usize::from(pct) / 100) & !7;
    let seed = block_seed(file, offset);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { fill_words_avx2(&mut buf[..len], seed) };
        return;
    }
    fill_words(&mut buf[..len], seed);
}

/// The first byte of a block that differs from what was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Index of the byte within the block.
    pub byte: usize,
    /// What was written there.
    pub expected: u8,
    /// What was read back.
    pub found: u8,
}

/// Checks that `buf` holds the data of (file, offset); names the first bad byte.
pub fn verify(buf: &[u8], file: u64, offset: u64) -> Result<(), Mismatch> {
    let mut g = Lanes::new(block_seed(file, offset));
    for (i, chunk) in buf.chunks(LANES * 8).enumerate() {
        for (j, (got, want)) in chunk.chunks_exact(8).zip(g.step()).enumerate() {
            let want = want.to_ne_bytes();
            if let Some(k) = (0..8).find(|&k| got[k] != want[k]) {
                return Err(Mismatch {
                    byte: (i * LANES + j) * 8 + k,
                    expected: want[k],
                    found: got[k],
                });
            }
        }
    }
    Ok(())
}

/// Visits every block index in `0..n` once in a pseudo-random order, in O(1)
/// memory (a full-period LCG over the next power of two, skipping indexes >= n).
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    mask: u64,
    x: u64,
    mul: u64,
    add: u64,
    left: u64,
}

impl Permutation {
    /// A permutation of `0..n` chosen by `seed`.
    pub fn new(n: u64, seed: u64) -> Self {
        let m = n.max(1).next_power_of_two();
        let mut r = Rng::new(seed);
        Self {
            n,
            mask: m - 1,
            x: r.next_u64() & (m - 1),
            mul: (r.next_u64() << 2) | 1,
            add: r.next_u64() | 1,
            left: n,
        }
    }
}

impl Iterator for Permutation {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        loop {
            self.x = self.x.wrapping_mul(self.mul).wrapping_add(self.add) & self.mask;
            if self.x < self.n {
                self.left -= 1;
                return Some(self.x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_verify_agree() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 3, 8192, 100);
        assert!(verify(&b, 3, 8192).is_ok());
        assert!(verify(&b, 3, 4096).is_err());
        let expected = b[100];
        b[100] ^= 1;
        assert_eq!(
            verify(&b, 3, 8192),
            Err(Mismatch {
                byte: 100,
                expected,
                found: expected ^ 1
            })
        );
        // A partial refill writes the same words as a full one, tail included.
        let mut full = vec![0u8; 520];
        let mut part = vec![0u8; 520];
        fill(&mut full, 1, 0, 100);
        fill(&mut part, 1, 0, 50);
        assert_eq!(full[..256], part[..256]);
        assert!(verify(&full, 1, 0).is_ok());
        let mut scalar = vec![0u8; 520];
        fill_words(&mut scalar, block_seed(1, 0));
        assert_eq!(scalar, full, "the AVX2 and baseline paths agree");
    }

    #[test]
    fn block_data_does_not_compress_or_repeat() {
        let mut a = vec![0u8; 1 << 16];
        let mut b = vec![0u8; 1 << 16];
        fill(&mut a, 0, 0, 100);
        fill(&mut b, 0, 1 << 16, 100);
        assert_ne!(a, b);
        // Every byte value about equally often: no structure a compressor could use.
        let mut counts = [0u32; 256];
        a.iter().for_each(|&x| counts[usize::from(x)] += 1);
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*lo > 150 && *hi < 370, "byte histogram {lo}..{hi}");
        // No 4 KiB sector repeats within or across blocks.
        let mut sectors: Vec<&[u8]> = a.chunks(4096).chain(b.chunks(4096)).collect();
        sectors.sort_unstable();
        sectors.dedup();
        assert_eq!(sectors.len(), 32);
    }

    #[test]
    fn permutation_covers_each_block_once() {
        for n in [1u64, 2, 7, 64, 1000] {
            let mut seen: Vec<u64> = Permutation::new(n, 42).collect();
            assert_eq!(seen.len() as u64, n);
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, n);
        }
    }
}
