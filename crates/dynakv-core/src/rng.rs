//! `SeededRng`: the core's only source of randomness, SplitMix64 seeded by the caller.
//!
//! The core never draws ambient randomness: a [`crate::node::Node`] gets a `SeededRng` from
//! whoever drives it (the server seeds it from the OS once; the simulator derives it from the
//! run's seed), so one seed always replays the same choices (gossip peers, and whatever else
//! a node draws).

/// SplitMix64 (Steele, Lea, Flood): tiny, fast, and good enough for protocol choices (not
/// for secrets).
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng {
            state: seed ^ 0x6a09_e667_f3bc_c908,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        debug_assert!(low <= high);
        low + self.next_u64() % (high - low + 1)
    }

    /// Uniform index in `0..len` (`len` > 0).
    pub fn index(&mut self, len: usize) -> usize {
        debug_assert!(len > 0);
        (self.next_u64() % len as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        // 53 random bits as a float in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }

    /// A new independent generator derived from this one.
    #[must_use]
    pub fn fork(&mut self) -> SeededRng {
        SeededRng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::SeededRng;

    #[test]
    fn same_seed_same_stream() {
        let mut a = SeededRng::new(7);
        let mut b = SeededRng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = SeededRng::new(8);
        assert_ne!(SeededRng::new(7).next_u64(), c.next_u64());
    }

    #[test]
    fn range_is_inclusive() {
        let mut r = SeededRng::new(1);
        let mut seen = [false; 3];
        for _ in 0..100 {
            seen[(r.range(1, 3) - 1) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
