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

/// Fills the first `pct` percent of `buf` with the data of (file, offset).
#[inline]
pub fn fill(buf: &mut [u8], file: u64, offset: u64, pct: u8) {
    let len = (buf.len() * usize::from(pct) / 100) & !7;
    let mut r = Rng::new(block_seed(file, offset));
    for chunk in buf[..len].chunks_exact_mut(8) {
        chunk.copy_from_slice(&r.next_u64().to_ne_bytes());
    }
}

/// Checks that `buf` holds the data of (file, offset); returns the first bad byte index.
pub fn verify(buf: &[u8], file: u64, offset: u64) -> Result<(), usize> {
    let mut r = Rng::new(block_seed(file, offset));
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        if chunk != r.next_u64().to_ne_bytes() {
            return Err(i * 8);
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
        b[100] ^= 1;
        assert_eq!(verify(&b, 3, 8192), Err(96));
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
