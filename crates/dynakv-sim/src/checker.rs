//! Checkers over a run's history and final state.
//!
//! - **set-add**: every acknowledged add is in the union of the final siblings (`lost` must be
//!   0), and no element appears that was never sent (`phantom` must be 0).
//! - **register**: every acknowledged write is in the final siblings, or was causally
//!   overwritten: some write that is known to have landed (acknowledged, or its value was seen
//!   by a read or is in the final state) carried a context covering the acknowledged write's
//!   dot. Final values must all have been sent (`phantom`).
//!   A delete (a tombstone written with a read's context) overwrites what its context covers;
//!   a delete counts as landed when it was sent (a delete that failed may still have been
//!   applied, and it shows no value a read could observe).
//! - **no resurrection**: no sibling of the final state has a dot covered by the context of an
//!   acknowledged write or delete, nor holds a register value whose acknowledged dot is so
//!   covered (the same put applied again under a new dot): what a client overwrote or
//!   deleted, and was told so, never comes back (through hints, anti-entropy, tombstone
//!   reaping or a forwarded put coordinated twice).
//! - **exactly once**: no register value shows up under two dots (in reads, acknowledgements
//!   or the final state): a put is coordinated once, so a second dot means it was applied
//!   twice (a forward retried elsewhere while the first candidate still held it).
//! - convergence and bounds are checked by the simulation itself (they need every replica).

use crate::history::{History, OpKind, decode_register, decode_set};
use dynakv_core::object::Object;
use dynakv_core::version::Dot;
use std::collections::{BTreeMap, BTreeSet};

/// What the history checkers found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub adds_acknowledged: usize,
    /// Acknowledged adds missing from the final state: `(key, element)`.
    pub lost_adds: Vec<(String, u64)>,
    /// Elements in the final state that were never sent.
    pub phantom_adds: Vec<(String, u64)>,
    pub writes_acknowledged: usize,
    /// Acknowledged register writes neither in the final state nor overwritten by a write
    /// whose context saw them.
    pub lost_writes: Vec<(String, u64)>,
    /// Register values in the final state that were never sent.
    pub phantom_writes: Vec<(String, u64)>,
    pub deletes_acknowledged: usize,
    /// Final siblings an acknowledged write or delete had overwritten: `(key, dot)`.
    pub resurrected: Vec<(String, Dot)>,
    /// Register values seen (in a read, an acknowledgement or the final state) with two
    /// different dots: the same put applied twice.
    pub applied_twice: Vec<(String, u64)>,
}

impl CheckReport {
    pub fn lost(&self) -> usize {
        self.lost_adds.len()
            + self.lost_writes.len()
            + self.resurrected.len()
            + self.applied_twice.len()
    }

    pub fn phantom(&self) -> usize {
        self.phantom_adds.len() + self.phantom_writes.len()
    }
}

/// Check the history against the final object of every key (the result of a final read with
/// R = N after healing and convergence).
pub fn check(history: &History, finals: &BTreeMap<String, Object>) -> CheckReport {
    let mut report = CheckReport::default();
    let final_values = |key: &str| -> Vec<Vec<u8>> {
        finals.get(key).map_or_else(Vec::new, |o| {
            o.live_siblings().map(|s| s.content.value.clone()).collect()
        })
    };

    // ---- set-add ----
    let sent_adds: BTreeSet<(&str, u64)> = history
        .writes
        .iter()
        .filter(|w| w.kind == OpKind::SetAdd && w.sent)
        .map(|w| (w.key.as_str(), w.value))
        .collect();
    let set_keys: BTreeSet<&str> = history
        .writes
        .iter()
        .filter(|w| w.kind == OpKind::SetAdd)
        .map(|w| w.key.as_str())
        .collect();
    let mut final_sets: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for key in &set_keys {
        let union: BTreeSet<u64> = final_values(key)
            .iter()
            .flat_map(|v| decode_set(v))
            .collect();
        for element in &union {
            if !sent_adds.contains(&(*key, *element)) {
                report.phantom_adds.push(((*key).to_owned(), *element));
            }
        }
        final_sets.insert(key, union);
    }
    for w in history
        .writes
        .iter()
        .filter(|w| w.kind == OpKind::SetAdd && w.acked.is_some())
    {
        report.adds_acknowledged += 1;
        if !final_sets
            .get(w.key.as_str())
            .is_some_and(|s| s.contains(&w.value))
        {
            report.lost_adds.push((w.key.clone(), w.value));
        }
    }

    // ---- register ----
    let registers: Vec<_> = history
        .writes
        .iter()
        .filter(|w| w.kind == OpKind::Write)
        .collect();
    let mut final_registers: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for key in registers.iter().map(|w| w.key.as_str()) {
        final_registers.entry(key).or_insert_with(|| {
            final_values(key)
                .iter()
                .filter_map(|v| decode_register(v))
                .collect()
        });
    }
    for (key, values) in &final_registers {
        for value in values {
            if !registers
                .iter()
                .any(|w| w.sent && w.key == *key && w.value == *value)
            {
                report.phantom_writes.push(((*key).to_owned(), *value));
            }
        }
    }
    let overwriters: Vec<_> = history
        .writes
        .iter()
        .filter(|w| matches!(w.kind, OpKind::Write | OpKind::Delete))
        .collect();
    let landed = |key: &str, value: u64, acked: bool| {
        acked
            || history.observed.contains(&(key.to_owned(), value))
            || final_registers
                .get(key)
                .is_some_and(|values| values.contains(&value))
    };
    for w in registers.iter().filter(|w| w.acked.is_some()) {
        report.writes_acknowledged += 1;
        let Some(dot) = w.acked else { continue };
        if final_registers
            .get(w.key.as_str())
            .is_some_and(|values| values.contains(&w.value))
        {
            continue;
        }
        let overwritten = overwriters.iter().any(|x| {
            x.key == w.key
                && x.value != w.value
                && x.sent
                && x.context.as_ref().is_some_and(|c| c.covers(dot))
                && (x.kind == OpKind::Delete || landed(&x.key, x.value, x.acked.is_some()))
        });
        if !overwritten {
            report.lost_writes.push((w.key.clone(), w.value));
        }
    }

    // ---- no resurrection ----
    report.deletes_acknowledged = history
        .writes
        .iter()
        .filter(|w| w.kind == OpKind::Delete && w.acked.is_some())
        .count();
    // The dot each register value was acknowledged with: a value stored again under another
    // dot (a put coordinated twice, the second time with a stale context) is still the value
    // the client overwrote.
    let acked_dot: BTreeMap<(&str, u64), Dot> = registers
        .iter()
        .filter_map(|w| w.acked.map(|dot| ((w.key.as_str(), w.value), dot)))
        .collect();
    for (key, object) in finals {
        for sibling in object.live_siblings() {
            let first = decode_register(&sibling.content.value)
                .and_then(|v| acked_dot.get(&(key.as_str(), v)).copied());
            let superseded = history.writes.iter().any(|x| {
                &x.key == key
                    && x.acked.is_some()
                    && x.context.as_ref().is_some_and(|c| {
                        c.covers(sibling.dot) || first.is_some_and(|d| c.covers(d))
                    })
            });
            if superseded {
                report.resurrected.push((key.clone(), sibling.dot));
            }
        }
    }
    // ---- exactly once ----
    let mut dots = history.register_dots.clone();
    for (key, object) in finals {
        for sibling in object.live_siblings() {
            if registers.iter().any(|w| &w.key == key)
                && let Some(v) = decode_register(&sibling.content.value)
            {
                dots.entry((key.clone(), v))
                    .or_default()
                    .insert(sibling.dot);
            }
        }
    }
    report.applied_twice = dots
        .into_iter()
        .filter(|(_, dots)| dots.len() > 1)
        .map(|(key_value, _)| key_value)
        .collect();
    report
}

/// The data type checkers, over the keys of the data type workloads (`--datatypes`):
/// - **counter**: each counter's final value is at least the increments acknowledged and at
///   most those plus the indeterminate ones (sent, not acknowledged);
/// - **set**: every acknowledged add whose element no removal was sent for is in the final
///   set; no element whose removal was acknowledged is (each element is added once, so none
///   has a later add); every element in it was sent.
///
/// Returns the problems found, and the acknowledged increments, adds and removes.
pub fn check_datatypes(
    history: &History,
    finals: &BTreeMap<String, Object>,
    keys: &[(String, OpKind)],
) -> (Vec<String>, (usize, usize, usize)) {
    use dynakv_core::crdt::{Crdt, DataTypeKind, merged_value};
    let mut problems = Vec::new();
    let mut acked_ops = (0, 0, 0);
    for (key, kind) in keys {
        let writes = || {
            history
                .writes
                .iter()
                .filter(move |w| &w.key == key && w.sent)
        };
        match kind {
            OpKind::Increment => {
                let acked = writes().filter(|w| w.acked.is_some()).count();
                let unknown = writes().filter(|w| w.acked.is_none()).count();
                acked_ops.0 += acked;
                let value = match finals
                    .get(key)
                    .map(|o| merged_value(o, DataTypeKind::Counter))
                {
                    None | Some(Ok(None)) => 0,
                    Some(Ok(Some(Crdt::Counter(c)))) => c.value(),
                    Some(other) => {
                        problems.push(format!("{key}: final value {other:?}"));
                        continue;
                    }
                };
                let low = i64::try_from(acked).unwrap_or(i64::MAX);
                let high = i64::try_from(acked + unknown).unwrap_or(i64::MAX);
                if value < low || value > high {
                    problems.push(format!(
                        "{key}: counter {value}, {acked} increments acknowledged and {unknown} \
                         indeterminate"
                    ));
                }
            }
            OpKind::DtAdd => {
                let set: BTreeSet<u64> =
                    match finals.get(key).map(|o| merged_value(o, DataTypeKind::Set)) {
                        None | Some(Ok(None)) => BTreeSet::new(),
                        Some(Ok(Some(Crdt::Set(s)))) => {
                            s.elements().filter_map(decode_register).collect()
                        }
                        Some(other) => {
                            problems.push(format!("{key}: final value {other:?}"));
                            continue;
                        }
                    };
                let sent_adds: BTreeSet<u64> = writes()
                    .filter(|w| w.kind == OpKind::DtAdd)
                    .map(|w| w.value)
                    .collect();
                let removes_sent: BTreeSet<u64> = writes()
                    .filter(|w| w.kind == OpKind::DtRemove)
                    .map(|w| w.value)
                    .collect();
                for w in writes().filter(|w| w.acked.is_some()) {
                    match w.kind {
                        OpKind::DtAdd => {
                            acked_ops.1 += 1;
                            if !removes_sent.contains(&w.value) && !set.contains(&w.value) {
                                problems.push(format!("{key}: acknowledged add {} lost", w.value));
                            }
                        }
                        OpKind::DtRemove => {
                            acked_ops.2 += 1;
                            if set.contains(&w.value) {
                                problems.push(format!(
                                    "{key}: {} came back after its acknowledged removal",
                                    w.value
                                ));
                            }
                        }
                        _ => {}
                    }
                }
                for element in set.difference(&sent_adds) {
                    problems.push(format!("{key}: phantom element {element}"));
                }
            }
            _ => {}
        }
    }
    (problems, acked_ops)
}

/// The expiry checker (`--expiry`): a value written with a time to live of `ttl_ms` is
/// stamped by its coordinator before the write is acknowledged, by a clock within `skew_ms`
/// of true time, and a read leaves out what expired by the clock of the machine that answers
/// it, also within `skew_ms`. So no read invoked `ttl_ms + 2 * skew_ms` or more after a
/// value's write was acknowledged may return it. (A write that was never acknowledged has no
/// such bound from outside: a paused coordinator stamps it when it resumes. That expired
/// values are also removed from storage is checked at convergence: a key's replicas must
/// converge to its tombstone.)
///
/// Returns the problems found, and the reads checked and those that came late enough after
/// an acknowledged write of their key for the rule to bite.
pub fn check_expiry(history: &History, ttl_ms: u64, skew_ms: u64) -> (Vec<String>, (usize, usize)) {
    let bound = ttl_ms.saturating_add(skew_ms.saturating_mul(2));
    let mut problems = Vec::new();
    let mut biting = 0;
    for read in &history.ttl_reads {
        let expired_before = history.ttl_writes.values().any(|(key, acked)| {
            key == &read.key && acked.is_some_and(|at| at.saturating_add(bound) <= read.invoked_ms)
        });
        biting += usize::from(expired_before);
        for value in &read.values {
            match history.ttl_writes.get(value) {
                None => problems.push(format!(
                    "{}: read at {} ms returned {value}, never written",
                    read.key, read.invoked_ms
                )),
                Some((key, _)) if key != &read.key => problems.push(format!(
                    "{}: read at {} ms returned {value}, written to {key}",
                    read.key, read.invoked_ms
                )),
                Some((_, Some(acked))) if acked.saturating_add(bound) <= read.invoked_ms => {
                    problems.push(format!(
                        "{}: read at {} ms returned {value}, acknowledged at {acked} ms with a \
                         time to live of {ttl_ms} ms (skew bound {skew_ms} ms)",
                        read.key, read.invoked_ms
                    ));
                }
                Some(_) => {}
            }
        }
    }
    (problems, (history.ttl_reads.len(), biting))
}
