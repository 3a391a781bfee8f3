//! dynakv-core: the sans-IO heart of dynakv.
//!
//! No tokio, no wall clock, no ambient randomness: time and randomness enter as arguments, so
//! every protocol step is a plain function call that a test (or the simulator) can replay.
//!
//! Modules: [`replica`] (a node's local objects and hints: read-merge-write over a `Storage`),
//! [`aae_trees`] (its Merkle trees and their storage index), [`serve`] (the replica side of
//! the peer protocol, answered from that storage), [`version`] (version vectors, dots), [`object`] (sibling sets with dotted version
//! vectors), [`context`] (the authenticated client context), [`ring`] (consistent hashing,
//! claim, preference lists), [`coordinator`] (the get and put coordinator state machines,
//! forwarding, reaping), [`anti_entropy`] (anti-entropy rounds and exchanges), [`handoff`]
//! (transition handoff, cleanup), [`hints`] (hint delivery rounds), [`failure`] (the failure
//! detector), [`membership`] (cluster state, gossip merge, ring plans), [`bucket`] (bucket properties), [`keys`] (storage key layout),
//! [`storage`] (the `Storage` trait), [`limits`] (every bound), [`codec`] (binary encoding),
//! [`node`] (the whole node as one state machine, `Node::handle(now, input) -> outputs`, which
//! the simulator drives), [`rng`] (the seeded RNG a driver passes in).

pub mod aae_run;
pub mod aae_trees;
pub mod anti_entropy;
pub mod backup;
pub mod bucket;
pub mod bucket_types;
pub mod codec;
pub mod context;
pub mod coordinator;
pub mod crdt;
pub mod expiry;
pub mod failure;
pub mod gossip;
pub mod handoff;
pub mod hints;
pub mod index;
pub mod keys;
pub mod limits;
pub mod listing;
pub mod membership;
pub mod merkle;
pub mod message;
pub mod node;
pub mod object;
pub mod pbs;
pub mod quorum;
pub mod reaping;
pub mod replica;
pub mod request;
pub mod ring;
pub mod rng;
pub mod security;
pub mod serve;
pub mod storage;
#[cfg(test)]
mod test_support;
pub mod version;

pub use storage::{Durability, Storage, Table};
