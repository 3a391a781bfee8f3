//! The simulator's only source of randomness: SplitMix64, seeded once per run.
//!
//! Invariant: a run draws every random choice (delays, losses, faults, workload, actor ids)
//! from RNGs derived from the run's seed, in an order fixed by the event queue, so one seed
//! always replays the same run.

/// SplitMix64 (Steele, Lea, Flood): tiny, fast, and good enough for a simulator.
#[derive(Debug, Clone)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng {
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
    pub fn fork(&mut self) -> SimRng {
        SimRng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::SimRng;

    #[test]
    fn same_seed_same_stream() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = SimRng::new(8);
        assert_ne!(SimRng::new(7).next_u64(), c.next_u64());
    }

    #[test]
    fn range_is_inclusive() {
        let mut r = SimRng::new(1);
        let mut seen = [false; 3];
        for _ in 0..100 {
            seen[(r.range(1, 3) - 1) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
