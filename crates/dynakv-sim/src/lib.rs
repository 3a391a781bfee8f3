//! dynakv-sim: a deterministic, single-threaded simulation of a 3-5 node dynakv cluster,
//! driven by a seed, with history checkers (publish = false).
//!
//! **What it proves, and what it does not.** The real node's sequencing lives in
//! `dynakv-server`'s async `Cluster` (tokio tasks, channels, timeouts). This simulator drives
//! a [`node::SimNode`] that re-states that sequencing (ring transitions for joins and leaves
//! included) as a sans-IO state machine
//! (`handle(now, input) -> Vec<Output>`) built on the very same core primitives
//! (`Object::update`/`sync`, `GetQuorum`, `PutQuorum`, `sloppy_slots`,
//! `ClusterState::preference_list`, `Ring::extended_preference_list`, `MerkleTree`). So it
//! checks the protocol's decisions and the core's laws under faults (loss, delay, reordering,
//! duplication, partitions, crashes with and without data loss); it does not test the tokio
//! shell, the transport or the storage engines. Where `SimNode` deliberately differs from
//! `cluster.rs`, [`node`] and `docs` in the crate README say so.
//!
//! Parts: [`rng`] (SplitMix64, the only randomness), [`node`] (the node state machine),
//! [`sim`] (event queue, network, faults, clients, healing, convergence), [`history`] (the
//! recorded history), [`checker`] (set-add and register checkers).
//!
//! Crash model: a crash stops the node and loses its volatile state (requests in flight,
//! coordinations, liveness and transport views, anti-entropy progress; Merkle trees are
//! rebuilt from storage on restart, as the server does). What survives depends on the crash:
//! `Process` keeps every write (the OS had it); `PowerLoss` loses the writes (objects and
//! hints) made since the last flush when the bucket is `Buffered` (flush every
//! `FLUSH_INTERVAL_MS`), nothing when it is `Fsync`; `Wipe` loses the whole disk. A node that
//! lost data comes back with a new `ActorId` (restart safety), unless
//! `keep_actor_after_loss` asks for what a buffered server does today. At most
//! `MAX_DATA_LOSS_CRASHES` data-losing crashes happen per run (W = 2 survives one).
//!
//! Run many seeds: `cargo run --release -p dynakv-sim -- --seeds 5000 [--start SEED] [--lww]
//! [--bug drop-sibling]`; replay one: `cargo run --release -p dynakv-sim -- --seed S --verbose`.

pub mod checker;
pub mod disk;
pub mod history;
pub mod node;
pub mod rng;
pub mod sim;

pub use sim::{RunReport, SimConfig, Simulation, run_seed};
