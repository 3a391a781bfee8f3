//! Version vectors and dots: the causal vocabulary of dynakv.
//!
//! An [`ActorId`] names one replica identity (a node in one generation of its data). A [`Dot`]
//! `(actor, counter)` names one write event made by that actor. A [`VersionVector`] maps each
//! actor to the highest counter seen from it, plus the (coordinator) wall-clock time of that
//! event for the paper's oldest-first pruning.
//!
//! Invariants:
//! - counters are >= 1; an actor absent from a vector means counter 0;
//! - a vector *covers* a dot when its counter for the dot's actor is >= the dot's counter; the
//!   dots of one actor are issued in order by that actor alone, so coverage is a prefix;
//! - `merge` is the pointwise maximum: commutative, associative, idempotent.

use std::collections::BTreeMap;
use std::fmt;

/// The identity of one replica (a node in one generation of its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorId(pub u64);

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One write event: the `counter`-th event of `actor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dot {
    pub actor: ActorId,
    pub counter: u64,
}

/// What a vector knows of one actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockEntry {
    /// Highest counter seen from the actor.
    pub counter: u64,
    /// Coordinator wall-clock time (ms since the Unix epoch) of that event; used for pruning.
    pub timestamp_ms: u64,
}

/// How two vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Equal,
    /// The left vector strictly descends from (dominates) the right.
    Descends,
    /// The right vector strictly descends from the left.
    Precedes,
    Concurrent,
}

/// A version vector with per-entry timestamps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionVector {
    entries: BTreeMap<ActorId, ClockEntry>,
}

impl VersionVector {
    /// The empty vector: has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of actors with an entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The counter for `actor` (0 when absent).
    pub fn counter(&self, actor: ActorId) -> u64 {
        self.entries.get(&actor).map_or(0, |e| e.counter)
    }

    /// The entry for `actor`, if any.
    pub fn entry(&self, actor: ActorId) -> Option<ClockEntry> {
        self.entries.get(&actor).copied()
    }

    /// Every entry, in actor order.
    pub fn entries(&self) -> impl Iterator<Item = (ActorId, ClockEntry)> + '_ {
        self.entries.iter().map(|(a, e)| (*a, *e))
    }

    /// Whether this vector has seen `dot`.
    pub fn covers(&self, dot: Dot) -> bool {
        self.counter(dot.actor) >= dot.counter
    }

    /// Raise `actor` to at least `counter`, keeping the later timestamp on ties.
    pub fn observe(&mut self, actor: ActorId, counter: u64, timestamp_ms: u64) {
        if counter == 0 {
            return;
        }
        let entry = self.entries.entry(actor).or_insert(ClockEntry {
            counter,
            timestamp_ms,
        });
        if counter > entry.counter {
            *entry = ClockEntry {
                counter,
                timestamp_ms,
            };
        } else if counter == entry.counter && timestamp_ms > entry.timestamp_ms {
            entry.timestamp_ms = timestamp_ms;
        }
    }

    /// Pointwise maximum of the two vectors (commutative, associative, idempotent).
    pub fn merge(&mut self, other: &VersionVector) {
        for (actor, entry) in &other.entries {
            self.observe(*actor, entry.counter, entry.timestamp_ms);
        }
    }

    /// `self` has seen everything `other` has.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other
            .entries
            .iter()
            .all(|(actor, entry)| self.counter(*actor) >= entry.counter)
    }

    /// Neither vector has seen everything the other has.
    pub fn concurrent(&self, other: &VersionVector) -> bool {
        !self.descends(other) && !other.descends(self)
    }

    /// How `self` relates to `other` (timestamps are ignored).
    pub fn compare(&self, other: &VersionVector) -> Ordering {
        match (self.descends(other), other.descends(self)) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Descends,
            (false, true) => Ordering::Precedes,
            (false, false) => Ordering::Concurrent,
        }
    }

    /// Remove the entry of `actor`.
    pub fn remove(&mut self, actor: ActorId) {
        self.entries.remove(&actor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for (a, c) in entries {
            v.observe(ActorId(*a), *c, 0);
        }
        v
    }

    fn arb_vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((0u64..5, 0u64..6, 0u64..100), 0..6).prop_map(|entries| {
            let mut v = VersionVector::new();
            for (a, c, t) in entries {
                v.observe(ActorId(a), c, t);
            }
            v
        })
    }

    #[test]
    fn ordering_basics() {
        let a = vv(&[(1, 2), (2, 1)]);
        let b = vv(&[(1, 1)]);
        assert_eq!(a.compare(&b), Ordering::Descends);
        assert_eq!(b.compare(&a), Ordering::Precedes);
        assert_eq!(a.compare(&a.clone()), Ordering::Equal);
        let c = vv(&[(3, 1)]);
        assert!(a.concurrent(&c));
        assert!(a.covers(Dot {
            actor: ActorId(1),
            counter: 2
        }));
        assert!(!a.covers(Dot {
            actor: ActorId(1),
            counter: 3
        }));
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(a in arb_vv(), b in arb_vv(), c in arb_vv()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut aa = a.clone(); aa.merge(&a);
            prop_assert_eq!(&aa, &a);
            prop_assert!(ab.descends(&a) && ab.descends(&b));
        }
    }
}
