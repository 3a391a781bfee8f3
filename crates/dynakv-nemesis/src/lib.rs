//! dynakv-nemesis: a Jepsen-style test of real `dynakv server` processes, each in its own
//! Linux network namespace on a bridge, with faults made by nftables drop rules and signals
//! (publish = false; needs root).
//!
//! Parts: [`net`] (namespaces, bridge, nftables, cleanup), [`cluster`] (the server
//! processes and admin views), [`nemesis`] (the fault schedule from a seed and the faults),
//! [`workload`] (set-add and register clients), [`history`] (the JSON-lines history), [`intruder`] (the `intruder` fault's attacker),
//! [`checker`] (set-add and register checkers), [`run`] (one seed end to end and its report).
//! See `docs/RELIABILITY.md`.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod http;
pub mod intruder;
pub mod nemesis;
pub mod net;
pub mod run;
pub mod workload;
