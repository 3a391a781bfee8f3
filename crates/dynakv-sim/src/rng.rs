//! The simulator's only source of randomness: the core's [`dynakv_core::rng::SeededRng`] (SplitMix64), seeded
//! once per run.
//!
//! Invariant: a run draws every random choice (delays, losses, faults, workload, actor ids)
//! from RNGs derived from the run's seed, in an order fixed by the event queue, so one seed
//! always replays the same run.

pub use dynakv_core::rng::SeededRng as SimRng;
