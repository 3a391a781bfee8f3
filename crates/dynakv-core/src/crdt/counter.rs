//! PN-counter: two grow-only maps of per-actor totals (increments, decrements).

use super::{CrdtError, MAX_CRDT_ACTORS};
use crate::codec::{DecodeError, Reader, Writer};
use crate::version::ActorId;
use std::collections::BTreeMap;

/// A counter that goes up and down; its value is the increments minus the decrements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PnCounter {
    inc: BTreeMap<ActorId, u64>,
    dec: BTreeMap<ActorId, u64>,
}

impl PnCounter {
    /// Add `delta` (negative: subtract) as `actor`.
    pub fn apply(&mut self, actor: ActorId, delta: i64) -> Result<(), CrdtError> {
        let side = if delta >= 0 {
            &mut self.inc
        } else {
            &mut self.dec
        };
        if !side.contains_key(&actor) && side.len() >= MAX_CRDT_ACTORS {
            return Err(CrdtError::TooManyActors);
        }
        let total = side
            .get(&actor)
            .copied()
            .unwrap_or(0)
            .checked_add(delta.unsigned_abs())
            .ok_or(CrdtError::Overflow)?;
        let mut next = self.clone();
        let side = if delta >= 0 {
            &mut next.inc
        } else {
            &mut next.dec
        };
        side.insert(actor, total);
        // The value must stay within an i64, as Riak's counters are.
        i64::try_from(next.value_wide()).map_err(|_| CrdtError::Overflow)?;
        *self = next;
        Ok(())
    }

    /// The increments minus the decrements, in full.
    fn value_wide(&self) -> i128 {
        let sum = |m: &BTreeMap<ActorId, u64>| m.values().map(|v| i128::from(*v)).sum::<i128>();
        sum(&self.inc) - sum(&self.dec)
    }

    /// The counter's value (saturated at the bounds of an i64).
    pub fn value(&self) -> i64 {
        let wide = self.value_wide();
        i64::try_from(wide).unwrap_or(if wide < 0 { i64::MIN } else { i64::MAX })
    }

    /// Take each actor's larger totals.
    pub fn merge(&mut self, other: &PnCounter) {
        for (mine, theirs) in [(&mut self.inc, &other.inc), (&mut self.dec, &other.dec)] {
            for (actor, total) in theirs {
                let entry = mine.entry(*actor).or_insert(0);
                *entry = (*entry).max(*total);
            }
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        for side in [&self.inc, &self.dec] {
            w.varint(side.len() as u64);
            for (actor, total) in side {
                w.u64_fixed(actor.0);
                w.varint(*total);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<PnCounter, DecodeError> {
        let mut counter = PnCounter::default();
        for side in [&mut counter.inc, &mut counter.dec] {
            let count = r.count(MAX_CRDT_ACTORS, "counter actors")?;
            let mut previous = None;
            for _ in 0..count {
                let actor = ActorId(r.u64_fixed()?);
                if previous.is_some_and(|p| p >= actor) {
                    return Err(DecodeError::Invalid("counter actors out of order"));
                }
                previous = Some(actor);
                side.insert(actor, r.varint()?);
            }
        }
        Ok(counter)
    }
}
