//! Deferred removals (Riak's riak_dt "deferred operations"): a removal whose context has seen
//! adds this replica has not seen yet.
//!
//! A client reads a set through one replica and removes an element through another, which
//! may not have the element's add yet (replication is asynchronous past W). Refusing the
//! removal would make a correct client fail at random; dropping it would lose it. So the
//! replica removes what it has that the context covers, and keeps the removal (context and
//! target) until its clock covers the context: every merge applies the kept removals again
//! (removing the dots their contexts cover, which is idempotent) and forgets those whose
//! context the merged clock covers, by then applied for good. Merge takes the union of both
//! sides' removals, so it stays commutative, associative and idempotent.

use super::set::{decode_context, encode_context};
use super::{CrdtError, SetContext};
use crate::codec::{DecodeError, Reader, Writer};
use std::collections::{BTreeMap, BTreeSet};

/// Most removals a value keeps waiting (targets counted over every context): a removal past
/// it is refused (retry once the replica has caught up).
pub const MAX_DEFERRED: usize = 1024;
/// Most waiting removals merges keep (removals made on replicas that could not see each
/// other may together pass [`MAX_DEFERRED`]).
pub const MAX_DEFERRED_MERGED: usize = 4 * MAX_DEFERRED;

/// Removals waiting for their context, per context.
pub type Deferred<T> = BTreeMap<SetContext, BTreeSet<T>>;

/// Whether `clock` has seen everything `context` has.
pub fn dominated(context: &SetContext, clock: &SetContext) -> bool {
    context
        .iter()
        .all(|(actor, counter)| clock.get(actor).is_some_and(|c| c >= counter))
}

fn count<T>(deferred: &Deferred<T>) -> usize {
    deferred.values().map(BTreeSet::len).sum()
}

/// Keep `target`'s removal with `context` (refused past [`MAX_DEFERRED`]).
pub fn defer<T: Ord>(
    deferred: &mut Deferred<T>,
    context: &SetContext,
    target: T,
) -> Result<(), CrdtError> {
    if count(deferred) >= MAX_DEFERRED {
        return Err(CrdtError::WrongOp(format!(
            "{MAX_DEFERRED} removals already wait for updates this replica has not seen yet: \
             retry the removal later"
        )));
    }
    deferred.entry(context.clone()).or_default().insert(target);
    Ok(())
}

/// The union of both sides' waiting removals (the first [`MAX_DEFERRED_MERGED`] in order).
pub fn merge<T: Ord + Clone>(ours: &mut Deferred<T>, theirs: &Deferred<T>) {
    let mut total = count(ours);
    for (context, targets) in theirs {
        for target in targets {
            if total >= MAX_DEFERRED_MERGED {
                return;
            }
            if ours
                .entry(context.clone())
                .or_default()
                .insert(target.clone())
            {
                total += 1;
            }
        }
    }
}

/// Apply every waiting removal with `reset(context, target)`, then forget those `clock`
/// covers.
pub fn apply<T>(
    deferred: &mut Deferred<T>,
    clock: &SetContext,
    mut reset: impl FnMut(&SetContext, &T),
) {
    for (context, targets) in deferred.iter() {
        for target in targets {
            reset(context, target);
        }
    }
    deferred.retain(|context, _| !dominated(context, clock));
}

pub fn encode<T>(w: &mut Writer, deferred: &Deferred<T>, mut target: impl FnMut(&mut Writer, &T)) {
    w.varint(deferred.len() as u64);
    for (context, targets) in deferred {
        encode_context(w, context);
        w.varint(targets.len() as u64);
        for t in targets {
            target(w, t);
        }
    }
}

pub fn decode<T: Ord>(
    r: &mut Reader<'_>,
    mut target: impl FnMut(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<Deferred<T>, DecodeError> {
    let contexts = r.count(MAX_DEFERRED_MERGED, "deferred removals")?;
    let mut deferred = BTreeMap::new();
    let mut total = 0usize;
    for _ in 0..contexts {
        let context = decode_context(r)?;
        let n = r.count(MAX_DEFERRED_MERGED, "deferred removals")?;
        total = total.saturating_add(n);
        if total > MAX_DEFERRED_MERGED || n == 0 {
            return Err(DecodeError::Invalid("deferred removals out of bounds"));
        }
        let mut targets = BTreeSet::new();
        for _ in 0..n {
            targets.insert(target(r)?);
        }
        deferred.insert(context, targets);
    }
    Ok(deferred)
}
