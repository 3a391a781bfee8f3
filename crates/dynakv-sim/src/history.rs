//! The recorded history of a run: what each client invoked and how it ended, with simulated
//! timestamps, plus what the checkers need to judge it (contexts and dots of writes, values
//! observed by reads).
//!
//! Outcomes follow Jepsen: `ok` (acknowledged), `fail` (certainly not applied: the write was
//! never sent), `info` (indeterminate: the put was sent but not acknowledged; Dynamo keeps a
//! write some replicas stored even when its quorum failed, so it may still appear).

use dynakv_core::version::{Dot, VersionVector};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read, add a unique element to the set, write back with the read's context.
    SetAdd,
    /// Write a unique value (with the context of a read, or blind).
    Write,
    /// Read a register, then delete it with the read's context (a tombstone).
    Delete,
    /// Increment a counter data type by one (blind: a data type needs no read).
    Increment,
    /// Add a unique element to a set data type (blind).
    DtAdd,
    /// Read a set data type, then remove one of its elements with the read's context (the
    /// element is the write record's value once read).
    DtRemove,
    /// Write a unique value blind, with a time to live (`--expiry`).
    TtlWrite,
    /// Read a key written with a time to live, recording what it returned.
    TtlRead,
}

/// How an event ends an operation, or that it starts one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One history line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_ms: u64,
    pub client: usize,
    pub op: u64,
    pub event: EventType,
    pub kind: OpKind,
    pub key: String,
    /// The element added or the value written.
    pub value: u64,
    /// The node the client talked to, and why an operation failed.
    pub note: String,
}

/// One attempted write, for the checkers.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub kind: OpKind,
    pub key: String,
    pub value: u64,
    /// The context the put carried (`None`: blind write). Set when the put was sent.
    pub context: Option<VersionVector>,
    /// Whether the put was sent to a node (it may have been applied).
    pub sent: bool,
    /// The dot of the acknowledged write (found in the stored object the coordinator
    /// returned).
    pub acked: Option<Dot>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub events: Vec<Event>,
    pub writes: Vec<WriteRecord>,
    /// `(key, value)` seen by a successful read.
    pub observed: BTreeSet<(String, u64)>,
    /// The dots each register value was seen with (by a read or in a put's acknowledgement):
    /// a put is coordinated once, so a value with two dots was applied twice.
    pub register_dots: BTreeMap<(String, u64), BTreeSet<Dot>>,
    /// Each value written with a time to live: its key, and when its write was
    /// acknowledged (`None`: it was not, or not yet).
    pub ttl_writes: BTreeMap<u64, (String, Option<u64>)>,
    /// Each successful read of a key written with a time to live.
    pub ttl_reads: Vec<TtlRead>,
}

/// A successful read of a key written with a time to live (`--expiry`).
#[derive(Debug, Clone)]
pub struct TtlRead {
    pub key: String,
    /// When the read was invoked.
    pub invoked_ms: u64,
    /// The values it returned.
    pub values: Vec<u64>,
}

impl History {
    /// The history as text, one event per line (stable: compared byte for byte on replay).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            let event = match e.event {
                EventType::Invoke => "invoke",
                EventType::Ok => "ok",
                EventType::Fail => "fail",
                EventType::Info => "info",
            };
            let kind = match e.kind {
                OpKind::SetAdd => "add",
                OpKind::Write => "write",
                OpKind::Delete => "delete",
                OpKind::Increment => "increment",
                OpKind::DtAdd => "dt-add",
                OpKind::DtRemove => "dt-remove",
                OpKind::TtlWrite => "ttl-write",
                OpKind::TtlRead => "ttl-read",
            };
            let _ = writeln!(
                out,
                "{:>8} c{} op{} {event} {kind} {} {} {}",
                e.time_ms, e.client, e.op, e.key, e.value, e.note
            );
        }
        out
    }

    pub fn count(&self, event: EventType) -> usize {
        self.events.iter().filter(|e| e.event == event).count()
    }
}

/// A set value: sorted little-endian u64s.
pub fn encode_set(set: &BTreeSet<u64>) -> Vec<u8> {
    set.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decode a set value (trailing partial bytes are ignored; values are always whole).
pub fn decode_set(bytes: &[u8]) -> BTreeSet<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

/// A register value: one little-endian u64.
pub fn encode_register(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// Decode a register value.
pub fn decode_register(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trip() {
        let set: BTreeSet<u64> = [3, 1, u64::MAX].into_iter().collect();
        assert_eq!(decode_set(&encode_set(&set)), set);
        assert_eq!(decode_register(&encode_register(42)), Some(42));
    }
}
