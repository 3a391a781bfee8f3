//! dynakv-sim: a deterministic, single-threaded simulation of a 3-5 node dynakv cluster,
//! driven by a seed, with history checkers (publish = false).
//!
//! **What it proves, and what it does not.** The nodes are the core's
//! [`dynakv_core::node::Node`], DESIGN.md's sans-IO `handle(now, input) -> Vec<Output>`
//! (ring transitions for joins and leaves included), built on the core primitives the server
//! uses too (`Object::update`/`sync`, the get and put coordinators, `Replica`, `AaeTrees`,
//! `serve`, `ClusterState`, ...). Each [`node::SimNode`] is one simulated machine: a `Node`
//! over a [`disk::SimDisk`] that can lose unsynced writes. So the simulation checks the
//! protocol's decisions and sequencing and the core's laws under faults (loss, delay,
//! reordering, duplication, partitions, crashes with and without data loss); it does not test
//! the tokio shell, the transport or the storage engines, and the server's `Cluster` still
//! runs its own async copy of the sequencing (docs/architecture.md, *One node state machine*).
//! Where `Node` deliberately differs from the server, the crate README says so.
//!
//! Parts: [`rng`] (SplitMix64, the only randomness), [`node`] (a simulated machine: the core's
//! `Node` and its disk), [`disk`] (the disk that loses unsynced writes),
//! [`sim`] (event queue, network, faults, clients, healing, convergence), [`history`] (the
//! recorded history), [`checker`] (set-add and register checkers).
//!
//! Crash model: a crash stops the node and loses its volatile state (requests in flight,
//! coordinations, liveness and transport views, anti-entropy progress; Merkle trees are
//! rebuilt from storage on restart, as the server does). What survives depends on the crash:
//! `Process` keeps every write (the OS had it); `PowerLoss` loses the writes (objects and
//! hints) made since the last flush when the bucket is `Buffered` (flush every
//! `Timings::flush_interval_ms`), nothing when it is `Fsync`; `Wipe` loses the whole disk. A node that
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
pub mod pbs;
pub mod rng;
pub mod sim;

pub use sim::{RunReport, SimConfig, Simulation, run_seed};
