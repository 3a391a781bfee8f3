//! Add-wins observed-remove set without tombstones (Riak's ORSWOT).
//!
//! State: a clock (per actor, the highest add it made that this replica has seen) and, per
//! element, the dots of the adds that are live. An add by `actor` takes the next dot of its
//! clock and becomes the element's only dot. A remove drops the element's dots that a client
//! context (the clock of the read it made) covers; dots it did not see (concurrent adds)
//! stay. Merge keeps a dot both sides have, and a dot one side has that the other's clock does
//! not cover (the other has not seen it, so did not remove it).

use super::{
    CrdtError, MAX_CRDT_ACTORS, MAX_ELEMENT_BYTES, MAX_SET_ELEMENTS, MAX_SET_ELEMENTS_MERGED,
    check_element, next_counter, shown,
};
use crate::codec::{DecodeError, Reader, Writer};
use crate::version::{ActorId, Dot};
use std::collections::{BTreeMap, BTreeSet};

/// What a client read of a set saw: the set's clock then.
pub type SetContext = BTreeMap<ActorId, u64>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrSet {
    clock: BTreeMap<ActorId, u64>,
    entries: BTreeMap<Vec<u8>, BTreeSet<Dot>>,
    /// Removals whose context has seen adds this replica has not (see `deferred`).
    deferred: super::deferred::Deferred<Vec<u8>>,
}

/// The live dots of one element after a merge: those both sides have, and those one side has
/// that the other's clock has not seen (so the other did not remove them).
pub(super) fn merge_dots(
    (ours, our_clock): (&BTreeSet<Dot>, &SetContext),
    (theirs, their_clock): (&BTreeSet<Dot>, &SetContext),
) -> BTreeSet<Dot> {
    ours.intersection(theirs)
        .copied()
        .chain(
            ours.difference(theirs)
                .filter(|d| !covers(their_clock, d))
                .copied(),
        )
        .chain(
            theirs
                .difference(ours)
                .filter(|d| !covers(our_clock, d))
                .copied(),
        )
        .collect()
}

/// The pointwise maximum of two clocks (actors past the bound are not taken).
pub(super) fn merge_clock(ours: &mut SetContext, theirs: &SetContext) {
    for (actor, counter) in theirs {
        if !ours.contains_key(actor) && ours.len() >= MAX_CRDT_ACTORS {
            continue;
        }
        let entry = ours.entry(*actor).or_insert(0);
        *entry = (*entry).max(*counter);
    }
}

/// Drop the dots of `element` that `context` covers.
fn reset_element(
    entries: &mut BTreeMap<Vec<u8>, BTreeSet<Dot>>,
    element: &[u8],
    context: &SetContext,
) {
    if let Some(dots) = entries.get_mut(element) {
        dots.retain(|d| !covers(context, d));
        if dots.is_empty() {
            entries.remove(element);
        }
    }
}

/// Whether `clock` has seen `dot`.
pub(super) fn covers(clock: &BTreeMap<ActorId, u64>, dot: &Dot) -> bool {
    clock.get(&dot.actor).is_some_and(|c| *c >= dot.counter)
}

impl OrSet {
    /// Add `element` as `actor`.
    pub fn add(&mut self, actor: ActorId, element: &[u8]) -> Result<(), CrdtError> {
        check_element(element)?;
        if !self.entries.contains_key(element) && self.entries.len() >= MAX_SET_ELEMENTS {
            return Err(CrdtError::TooManyElements);
        }
        let counter = next_counter(&mut self.clock, actor)?;
        self.entries
            .insert(element.to_vec(), BTreeSet::from([Dot { actor, counter }]));
        Ok(())
    }

    /// Whether adding every one of `elements` as `actor` would succeed (each within its
    /// size, the set within its element bound, the actor within the clock's bound).
    pub fn can_add(&self, actor: ActorId, elements: &[Vec<u8>]) -> Result<(), CrdtError> {
        let mut new = BTreeSet::new();
        for element in elements {
            check_element(element)?;
            if !self.entries.contains_key(element) {
                new.insert(element.as_slice());
            }
        }
        if self.entries.len().saturating_add(new.len()) > MAX_SET_ELEMENTS {
            return Err(CrdtError::TooManyElements);
        }
        if !self.clock.contains_key(&actor) && self.clock.len() >= MAX_CRDT_ACTORS {
            return Err(CrdtError::TooManyActors);
        }
        let counter = self.clock.get(&actor).copied().unwrap_or(0);
        counter
            .checked_add(elements.len() as u64)
            .ok_or(CrdtError::Overflow)?;
        Ok(())
    }

    /// Remove `element` as a client that read the set with `context`: the adds the read saw
    /// are undone, later or concurrent ones stay. Refused when the element is absent; when
    /// the read saw adds this replica has not seen yet, the removal is also kept until they
    /// arrive (`deferred`).
    pub fn remove(&mut self, element: &[u8], context: &SetContext) -> Result<(), CrdtError> {
        if !super::deferred::dominated(context, &self.clock) {
            check_element(element)?;
            super::deferred::defer(&mut self.deferred, context, element.to_vec())?;
            self.reset(element, context);
            return Ok(());
        }
        // Absent: nothing to remove (refused, as Riak does). Present through adds the read did
        // not see only: those win, and the removal changes nothing.
        if !self.entries.contains_key(element) {
            return Err(CrdtError::NotPresent(shown(element)));
        }
        self.reset(element, context);
        Ok(())
    }

    fn reset(&mut self, element: &[u8], context: &SetContext) {
        reset_element(&mut self.entries, element, context);
    }

    /// Removals still waiting for adds this replica has not seen.
    pub fn deferred_removals(&self) -> usize {
        self.deferred.values().map(BTreeSet::len).sum()
    }

    pub fn contains(&self, element: &[u8]) -> bool {
        self.entries.contains_key(element)
    }

    /// The elements, in byte order.
    pub fn elements(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.keys().map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The context a client keeps from a read, for a later remove.
    pub fn context(&self) -> SetContext {
        self.clock.clone()
    }

    pub fn merge(&mut self, other: &OrSet) {
        let keys: BTreeSet<Vec<u8>> = self
            .entries
            .keys()
            .chain(other.entries.keys())
            .cloned()
            .collect();
        let mut entries = BTreeMap::new();
        let empty = BTreeSet::new();
        for key in keys {
            let ours = self.entries.get(&key).unwrap_or(&empty);
            let theirs = other.entries.get(&key).unwrap_or(&empty);
            let kept = merge_dots((ours, &self.clock), (theirs, &other.clock));
            if !kept.is_empty() && entries.len() < MAX_SET_ELEMENTS_MERGED {
                entries.insert(key, kept);
            }
        }
        merge_clock(&mut self.clock, &other.clock);
        self.entries = entries;
        super::deferred::merge(&mut self.deferred, &other.deferred);
        let entries = &mut self.entries;
        super::deferred::apply(&mut self.deferred, &self.clock, |context, element| {
            reset_element(entries, element, context);
        });
    }

    pub fn encode(&self, w: &mut Writer) {
        encode_context(w, &self.clock);
        // A dot's actor is written as its position in the clock (one byte for up to 128
        // actors, instead of eight).
        let position: BTreeMap<ActorId, u64> = self
            .clock
            .keys()
            .enumerate()
            .map(|(i, actor)| (*actor, i as u64))
            .collect();
        w.varint(self.entries.len() as u64);
        for (element, dots) in &self.entries {
            w.bytes(element);
            w.varint(dots.len() as u64);
            for dot in dots {
                w.varint(position.get(&dot.actor).copied().unwrap_or(u64::MAX));
                w.varint(dot.counter);
            }
        }
        super::deferred::encode(w, &self.deferred, |w, element| w.bytes(element));
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<OrSet, DecodeError> {
        let clock = decode_context(r)?;
        let actors: Vec<ActorId> = clock.keys().copied().collect();
        let count = r.count(MAX_SET_ELEMENTS_MERGED, "set elements")?;
        let mut entries = BTreeMap::new();
        for _ in 0..count {
            let element = r.bytes(MAX_ELEMENT_BYTES, "set element")?.to_vec();
            let dots_count = r.count(MAX_CRDT_ACTORS, "element dots")?;
            if dots_count == 0 {
                return Err(DecodeError::Invalid("a set element without dots"));
            }
            let mut dots = BTreeSet::new();
            for _ in 0..dots_count {
                let actor = usize::try_from(r.varint()?)
                    .ok()
                    .and_then(|i| actors.get(i))
                    .copied()
                    .ok_or(DecodeError::Invalid(
                        "a set dot's actor is not in its clock",
                    ))?;
                let dot = Dot {
                    actor,
                    counter: r.varint()?,
                };
                if dot.counter == 0 || !covers(&clock, &dot) {
                    return Err(DecodeError::Invalid("a set dot its clock does not cover"));
                }
                dots.insert(dot);
            }
            entries.insert(element, dots);
        }
        let deferred = super::deferred::decode(r, |r| {
            Ok(r.bytes(MAX_ELEMENT_BYTES, "deferred element")?.to_vec())
        })?;
        Ok(OrSet {
            clock,
            entries,
            deferred,
        })
    }
}

/// Encode a set's clock (also a client's context).
pub fn encode_context(w: &mut Writer, clock: &SetContext) {
    w.varint(clock.len() as u64);
    for (actor, counter) in clock {
        w.u64_fixed(actor.0);
        w.varint(*counter);
    }
}

/// Decode what [`encode_context`] wrote: actors in order, counters non-zero.
pub fn decode_context(r: &mut Reader<'_>) -> Result<SetContext, DecodeError> {
    let count = r.count(MAX_CRDT_ACTORS, "set clock actors")?;
    let mut clock = BTreeMap::new();
    let mut previous = None;
    for _ in 0..count {
        let actor = ActorId(r.u64_fixed()?);
        if previous.is_some_and(|p| p >= actor) {
            return Err(DecodeError::Invalid("set clock actors out of order"));
        }
        previous = Some(actor);
        let counter = r.varint()?;
        if counter == 0 {
            return Err(DecodeError::Invalid("zero counter in a set clock"));
        }
        clock.insert(actor, counter);
    }
    Ok(clock)
}
