//! A last-write-wins register (a map's `register` field): the value with the largest
//! `(timestamp, actor)`; and an enable-wins flag (a map's `flag` field), an observed-remove
//! set of one element: enabling adds a dot, disabling drops the dots a read saw, so an enable
//! concurrent with a disable wins.

use super::set::{covers, merge_clock, merge_dots};
use super::{CrdtError, MAX_CRDT_ACTORS, MAX_ELEMENT_BYTES, next_counter};
use crate::codec::{DecodeError, Reader, Writer};
use crate::version::{ActorId, Dot};
use std::collections::{BTreeMap, BTreeSet};

/// Longest register value, in bytes.
pub const MAX_REGISTER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LwwRegister {
    /// `(timestamp ms, actor)` of the write that set `value`.
    stamp: (u64, ActorId),
    value: Vec<u8>,
}

impl Default for LwwRegister {
    /// Empty, stamped before any write.
    fn default() -> Self {
        LwwRegister {
            stamp: (0, ActorId(0)),
            value: Vec::new(),
        }
    }
}

impl LwwRegister {
    /// Set the value, stamped with the writer's wall clock and actor. A write stamped before
    /// the current one loses (as it would in a merge).
    pub fn set(&mut self, actor: ActorId, now_ms: u64, value: &[u8]) -> Result<(), CrdtError> {
        if value.len() > MAX_REGISTER_BYTES {
            return Err(CrdtError::ElementTooLarge);
        }
        let candidate = LwwRegister {
            stamp: (now_ms, actor),
            value: value.to_vec(),
        };
        self.merge(&candidate);
        Ok(())
    }

    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The later write; equal stamps (one writer, one instant) keep the larger value, so the
    /// merge is still commutative.
    pub fn merge(&mut self, other: &LwwRegister) {
        if (other.stamp, &other.value) > (self.stamp, &self.value) {
            *self = other.clone();
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.stamp.0);
        w.u64_fixed(self.stamp.1.0);
        w.bytes(&self.value);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<LwwRegister, DecodeError> {
        let timestamp = r.varint()?;
        let actor = ActorId(r.u64_fixed()?);
        let value = r.bytes(MAX_REGISTER_BYTES, "register value")?.to_vec();
        Ok(LwwRegister {
            stamp: (timestamp, actor),
            value,
        })
    }
}

/// An enable-wins flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EwFlag {
    clock: BTreeMap<ActorId, u64>,
    dots: BTreeSet<Dot>,
}

impl EwFlag {
    pub fn enable(&mut self, actor: ActorId) -> Result<(), CrdtError> {
        let counter = next_counter(&mut self.clock, actor)?;
        self.dots = BTreeSet::from([Dot { actor, counter }]);
        Ok(())
    }

    /// Disable as a client whose read had `context` (the flag's clock then).
    pub fn disable(&mut self, context: &BTreeMap<ActorId, u64>) {
        self.dots.retain(|d| !covers(context, d));
    }

    pub fn enabled(&self) -> bool {
        !self.dots.is_empty()
    }

    pub fn context(&self) -> BTreeMap<ActorId, u64> {
        self.clock.clone()
    }

    pub fn merge(&mut self, other: &EwFlag) {
        self.dots = merge_dots((&self.dots, &self.clock), (&other.dots, &other.clock));
        merge_clock(&mut self.clock, &other.clock);
    }

    pub fn encode(&self, w: &mut Writer) {
        super::set::encode_context(w, &self.clock);
        w.varint(self.dots.len() as u64);
        for dot in &self.dots {
            w.u64_fixed(dot.actor.0);
            w.varint(dot.counter);
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<EwFlag, DecodeError> {
        let clock = super::set::decode_context(r)?;
        let count = r.count(MAX_CRDT_ACTORS, "flag dots")?;
        let mut dots = BTreeSet::new();
        for _ in 0..count {
            let dot = Dot {
                actor: ActorId(r.u64_fixed()?),
                counter: r.varint()?,
            };
            if dot.counter == 0 || !covers(&clock, &dot) {
                return Err(DecodeError::Invalid("a flag dot its clock does not cover"));
            }
            dots.insert(dot);
        }
        Ok(EwFlag { clock, dots })
    }
}

// Element bound shared with sets (a register's own is larger).
const _: () = assert!(MAX_REGISTER_BYTES >= MAX_ELEMENT_BYTES);
