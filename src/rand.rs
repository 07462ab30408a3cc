//! The one pseudo-random generator of the crate (load balancing, backoff jitter, test data) and
//! the one place a seed is drawn from the outside world. Not for anything secret.

/// xorshift64* (Vigna): a 64-bit state, full period over non-zero states, good low bits.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// Any seed works (zero is mapped to a non-zero state).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0); the modulo bias is below 2^-40 for the `n` used here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index into a slice of `n` (> 0) items.
    pub fn index(&mut self, n: usize) -> usize {
        // `n` fits a u64 and the result is below `n`: both conversions are exact.
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }
}

/// A seed from the clock and the process id, mixed with `salt` so that generators seeded in the
/// same instant (one per thread or per resource) still differ.
pub fn seed(salt: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // The low 64 bits of the nanoseconds are the part that varies.
    #[allow(clippy::cast_possible_truncation)]
    let nanos = nanos as u64;
    mix(nanos ^ u64::from(std::process::id()).rotate_left(32), salt)
}

/// `base` mixed with `salt` (a golden-ratio multiple), for seeds derived from one given seed.
pub fn mix(base: u64, salt: u64) -> u64 {
    base ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_seed_is_usable_and_values_spread() {
        let mut r = XorShift::new(0);
        let mut seen = [0u32; 8];
        for _ in 0..8000 {
            seen[usize::try_from(r.below(8)).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn seeds_with_different_salts_differ() {
        assert_ne!(seed(1), seed(2));
    }
}
