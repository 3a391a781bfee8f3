//! Checkers over a JSON-lines history and the final state (read with R = N after healing).
//!
//! - **set-add**: every acknowledged add is in the union of the key's final siblings
//!   (`lost`), and every final element was invoked by some client (`phantom`).
//!   `recovered_by_sibling` counts acknowledged adds that some read (of the workload or the
//!   final one) found in some but not all siblings: at that moment they existed only because
//!   the store kept concurrent versions as siblings.
//! - **register**: every acknowledged write is in the key's final siblings, or was
//!   overwritten by a write that landed (acknowledged, or seen by a read before a write or a
//!   delete, or in the final
//!   state) and whose read had returned it (so the write's context covered it). Final values
//!   must have been invoked (`phantom`). A delete (`f` = `delete`, with the read's context)
//!   that had seen a write overwrites it too, once it was acknowledged or may have applied.
//! - **no resurrection** (registers): no value an acknowledged write or delete had seen (its
//!   context covered it, so it was overwritten or deleted and the client was told so) is in
//!   the final state, whatever tombstone reaping, hints or anti-entropy did meanwhile.

use crate::history::{Event, EventType};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What a bucket/key holds at the end: its sibling values, each decoded into numbers (the set
/// elements, or the one register value).
pub type Finals = BTreeMap<(String, String), Vec<BTreeSet<u64>>>;

/// The verdict of the set-add checker on one bucket.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SetReport {
    pub adds_invoked: usize,
    pub adds_acknowledged: usize,
    pub adds_indeterminate: usize,
    /// Indeterminate adds present in the final state.
    pub indeterminate_present: usize,
    pub lost: Vec<(String, u64)>,
    pub phantom: Vec<(String, u64)>,
    pub recovered_by_sibling: usize,
}

/// The verdict of the register checker.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RegisterReport {
    pub writes_acknowledged: usize,
    /// Acknowledged writes present in the final state.
    pub present: usize,
    /// Acknowledged writes overwritten by a landed write that had seen them.
    pub overwritten: usize,
    pub lost: Vec<(String, u64)>,
    pub phantom: Vec<(String, u64)>,
    pub deletes_acknowledged: usize,
    /// Final values an acknowledged write or delete had overwritten: `(key, value)`.
    pub resurrected: Vec<(String, u64)>,
}

fn completions<'a>(
    history: &'a [Event],
    bucket: &'a str,
    f: &'a str,
) -> impl Iterator<Item = &'a Event> + 'a {
    history
        .iter()
        .filter(move |e| e.bucket == bucket && e.f == f && e.kind != EventType::Invoke)
}

/// Set-add checker for the keys of `bucket`.
pub fn check_sets(history: &[Event], bucket: &str, finals: &Finals) -> SetReport {
    let mut report = SetReport::default();
    let invoked: BTreeSet<(&str, u64)> = history
        .iter()
        .filter(|e| e.bucket == bucket && e.f == "add" && e.kind == EventType::Invoke)
        .map(|e| (e.key.as_str(), e.value))
        .collect();
    report.adds_invoked = invoked.len();
    let mut partial: BTreeSet<(&str, u64)> = completions(history, bucket, "add")
        .flat_map(|e| e.partial.iter().map(move |p| (e.key.as_str(), *p)))
        .collect();
    let mut unions: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for ((b, key), siblings) in finals {
        if b != bucket {
            continue;
        }
        let union: BTreeSet<u64> = siblings.iter().flatten().copied().collect();
        for element in &union {
            if !invoked.contains(&(key.as_str(), *element)) {
                report.phantom.push((key.clone(), *element));
            }
            if siblings.len() > 1 && siblings.iter().any(|s| !s.contains(element)) {
                partial.insert((key.as_str(), *element));
            }
        }
        unions.insert(key.as_str(), union);
    }
    for e in completions(history, bucket, "add") {
        let present = unions
            .get(e.key.as_str())
            .is_some_and(|u| u.contains(&e.value));
        match e.kind {
            EventType::Ok => {
                report.adds_acknowledged += 1;
                if !present {
                    report.lost.push((e.key.clone(), e.value));
                } else if partial.contains(&(e.key.as_str(), e.value)) {
                    report.recovered_by_sibling += 1;
                }
            }
            EventType::Info => {
                report.adds_indeterminate += 1;
                if present {
                    report.indeterminate_present += 1;
                }
            }
            EventType::Fail | EventType::Invoke => {}
        }
    }
    report
}

/// Register checker for the keys of `bucket`.
pub fn check_registers(history: &[Event], bucket: &str, finals: &Finals) -> RegisterReport {
    let mut report = RegisterReport::default();
    let invoked: BTreeSet<(&str, u64)> = history
        .iter()
        .filter(|e| e.bucket == bucket && e.f == "write" && e.kind == EventType::Invoke)
        .map(|e| (e.key.as_str(), e.value))
        .collect();
    let mut final_values: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for ((b, key), siblings) in finals {
        if b != bucket {
            continue;
        }
        let values: BTreeSet<u64> = siblings.iter().flatten().copied().collect();
        for v in &values {
            if !invoked.contains(&(key.as_str(), *v)) {
                report.phantom.push((key.clone(), *v));
            }
        }
        final_values.insert(key.as_str(), values);
    }
    let writes: Vec<&Event> = completions(history, bucket, "write").collect();
    let deletes: Vec<&Event> = completions(history, bucket, "delete").collect();
    // Values some read returned (the read before each write or delete lists them in `seen`).
    let observed: BTreeSet<(&str, u64)> = writes
        .iter()
        .chain(&deletes)
        .flat_map(|e| e.seen.iter().map(move |v| (e.key.as_str(), *v)))
        .collect();
    let in_final = |key: &str, v: u64| {
        final_values
            .get(key)
            .is_some_and(|values| values.contains(&v))
    };
    let landed = |e: &Event| {
        e.kind == EventType::Ok
            || (e.kind == EventType::Info
                && (observed.contains(&(e.key.as_str(), e.value)) || in_final(&e.key, e.value)))
    };
    for w in writes.iter().filter(|e| e.kind == EventType::Ok) {
        report.writes_acknowledged += 1;
        if in_final(&w.key, w.value) {
            report.present += 1;
            continue;
        }
        let overwritten = writes.iter().any(|x| {
            x.key == w.key && x.value != w.value && x.seen.contains(&w.value) && landed(x)
        }) || deletes.iter().any(|x| {
            x.key == w.key
                && x.seen.contains(&w.value)
                && matches!(x.kind, EventType::Ok | EventType::Info)
        });
        if overwritten {
            report.overwritten += 1;
        } else {
            report.lost.push((w.key.clone(), w.value));
        }
    }
    report.deletes_acknowledged = deletes.iter().filter(|e| e.kind == EventType::Ok).count();
    let mut resurrected: BTreeSet<(String, u64)> = BTreeSet::new();
    for x in writes
        .iter()
        .chain(&deletes)
        .filter(|e| e.kind == EventType::Ok)
    {
        for v in &x.seen {
            if *v != x.value && in_final(&x.key, *v) {
                resurrected.insert((x.key.clone(), *v));
            }
        }
    }
    report.resurrected = resurrected.into_iter().collect();
    report
}

/// The verdict of the counter checker on one bucket.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CounterReport {
    pub increments_acknowledged: usize,
    pub increments_indeterminate: usize,
    /// Counters outside `[acknowledged, acknowledged + indeterminate]`: `(key, why)`.
    pub wrong: Vec<(String, String)>,
}

/// Counter checker for the keys of `bucket` (a `counter` data type): each final value lies
/// between the increments acknowledged and those plus the indeterminate ones. The final
/// state of a counter key is its one value (none: 0).
pub fn check_counters(history: &[Event], bucket: &str, finals: &Finals) -> CounterReport {
    let mut report = CounterReport::default();
    let mut per_key: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for e in completions(history, bucket, "increment") {
        let entry = per_key.entry(e.key.as_str()).or_default();
        match e.kind {
            EventType::Ok => {
                entry.0 += 1;
                report.increments_acknowledged += 1;
            }
            EventType::Info => {
                entry.1 += 1;
                report.increments_indeterminate += 1;
            }
            EventType::Fail | EventType::Invoke => {}
        }
    }
    for ((b, key), values) in finals {
        if b != bucket {
            continue;
        }
        let value = values.iter().flatten().copied().next().unwrap_or(0);
        let (acked, unknown) = per_key.get(key.as_str()).copied().unwrap_or_default();
        if value < acked || value > acked + unknown {
            report.wrong.push((
                key.clone(),
                format!(
                    "{value}, with {acked} increments acknowledged and {unknown} indeterminate"
                ),
            ));
        }
    }
    report
}

/// The verdict of the set data type checker on one bucket.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DtSetReport {
    pub adds_acknowledged: usize,
    pub removes_acknowledged: usize,
    /// Acknowledged adds, of elements no removal was sent for, missing at the end.
    pub lost: Vec<(String, u64)>,
    /// Elements whose removal was acknowledged, present at the end (each is added once).
    pub resurrected: Vec<(String, u64)>,
    pub phantom: Vec<(String, u64)>,
}

/// Set data type checker for the keys of `bucket`.
pub fn check_dt_sets(history: &[Event], bucket: &str, finals: &Finals) -> DtSetReport {
    let mut report = DtSetReport::default();
    let invoked: BTreeSet<(&str, u64)> = history
        .iter()
        .filter(|e| e.bucket == bucket && e.f == "dt-add" && e.kind == EventType::Invoke)
        .map(|e| (e.key.as_str(), e.value))
        .collect();
    // A removal is sent once its read found the element: any completion but a failed one
    // whose read came back empty or failed (those carry the invocation's value).
    let removals_sent: BTreeSet<(&str, u64)> = completions(history, bucket, "dt-remove")
        .filter(|e| {
            e.kind != EventType::Fail
                || e.error
                    .as_deref()
                    .is_some_and(|m| !m.starts_with("read") && m != "nothing to remove")
        })
        .map(|e| (e.key.as_str(), e.value))
        .collect();
    let finals_of = |key: &str| -> BTreeSet<u64> {
        finals
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|v| v.iter().flatten().copied().collect())
            .unwrap_or_default()
    };
    for ((b, key), values) in finals {
        if b != bucket {
            continue;
        }
        for element in values.iter().flatten() {
            if !invoked.contains(&(key.as_str(), *element)) {
                report.phantom.push((key.clone(), *element));
            }
        }
    }
    for e in completions(history, bucket, "dt-add").filter(|e| e.kind == EventType::Ok) {
        report.adds_acknowledged += 1;
        if !removals_sent.contains(&(e.key.as_str(), e.value))
            && !finals_of(&e.key).contains(&e.value)
        {
            report.lost.push((e.key.clone(), e.value));
        }
    }
    for e in completions(history, bucket, "dt-remove").filter(|e| e.kind == EventType::Ok) {
        report.removes_acknowledged += 1;
        if finals_of(&e.key).contains(&e.value) {
            report.resurrected.push((e.key.clone(), e.value));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventType, f: &str, key: &str, value: u64, seen: &[u64]) -> Event {
        Event {
            kind,
            process: 0,
            f: f.to_owned(),
            bucket: "b".to_owned(),
            key: key.to_owned(),
            value,
            node: 1,
            time: 0,
            latency_ms: None,
            seen: seen.to_vec(),
            partial: Vec::new(),
            siblings: 0,
            error: None,
        }
    }

    fn finals(key: &str, siblings: &[&[u64]]) -> Finals {
        let mut f = Finals::new();
        f.insert(
            ("b".to_owned(), key.to_owned()),
            siblings
                .iter()
                .map(|s| s.iter().copied().collect())
                .collect(),
        );
        f
    }

    #[test]
    fn set_add_finds_lost_and_phantom() {
        let h = vec![
            ev(EventType::Invoke, "add", "k", 1, &[]),
            ev(EventType::Ok, "add", "k", 1, &[]),
            ev(EventType::Invoke, "add", "k", 2, &[]),
            ev(EventType::Ok, "add", "k", 2, &[]),
            ev(EventType::Invoke, "add", "k", 3, &[]),
            ev(EventType::Info, "add", "k", 3, &[]),
        ];
        let r = check_sets(&h, "b", &finals("k", &[&[1, 3, 9]]));
        assert_eq!(r.adds_acknowledged, 2);
        assert_eq!(r.lost, vec![("k".to_owned(), 2)]);
        assert_eq!(r.phantom, vec![("k".to_owned(), 9)]);
        assert_eq!(r.indeterminate_present, 1);
        let r = check_sets(&h, "b", &finals("k", &[&[1], &[2]]));
        assert!(r.lost.is_empty());
        assert_eq!(r.recovered_by_sibling, 2);
    }

    #[test]
    fn register_accepts_overwrite_by_a_write_that_saw_it() {
        let h = vec![
            ev(EventType::Invoke, "write", "k", 1, &[]),
            ev(EventType::Ok, "write", "k", 1, &[]),
            ev(EventType::Invoke, "write", "k", 2, &[1]),
            ev(EventType::Ok, "write", "k", 2, &[1]),
            ev(EventType::Invoke, "write", "k", 3, &[]),
            ev(EventType::Ok, "write", "k", 3, &[]),
        ];
        let r = check_registers(&h, "b", &finals("k", &[&[2]]));
        assert_eq!(r.present, 1);
        assert_eq!(r.overwritten, 1);
        assert_eq!(r.lost, vec![("k".to_owned(), 3)]);
    }

    /// Nemesis seed 1 (kill of two nodes): 1 is acknowledged; 2, written with a context that
    /// saw 1, times out but lands; only a delete's read sees 2. 1 was overwritten, not lost.
    #[test]
    fn an_indeterminate_write_only_a_delete_saw_has_landed() {
        let h = vec![
            ev(EventType::Ok, "write", "k", 1, &[]),
            ev(EventType::Info, "write", "k", 2, &[1]),
            ev(EventType::Ok, "delete", "k", 3, &[2]),
            ev(EventType::Ok, "write", "k", 4, &[]),
        ];
        let r = check_registers(&h, "b", &finals("k", &[&[4]]));
        assert!(r.lost.is_empty(), "{:?}", r.lost);
        assert_eq!(r.overwritten, 1);
        // Without the delete's read, nothing shows 2 landed: 1 counts as lost.
        let r = check_registers(&h[..2], "b", &finals("k", &[&[4]]));
        assert_eq!(r.lost, vec![("k".to_owned(), 1)]);
    }

    #[test]
    fn deletes_overwrite_and_what_they_deleted_must_not_come_back() {
        let h = vec![
            ev(EventType::Ok, "write", "k", 1, &[]),
            ev(EventType::Ok, "delete", "k", 2, &[1]),
            ev(EventType::Ok, "write", "j", 3, &[]),
            ev(EventType::Ok, "delete", "j", 4, &[3]),
        ];
        let mut f = finals("k", &[]);
        f.insert(("b".to_owned(), "j".to_owned()), vec![BTreeSet::from([3])]);
        let r = check_registers(&h, "b", &f);
        assert_eq!(r.deletes_acknowledged, 2);
        assert_eq!(r.overwritten, 1, "1 was deleted");
        assert!(r.lost.is_empty());
        assert_eq!(r.resurrected, vec![("j".to_owned(), 3)]);
    }

    #[test]
    fn counters_must_hold_every_acknowledged_increment_and_no_more_than_were_sent() {
        let history = vec![
            ev(EventType::Ok, "increment", "c", 1, &[]),
            ev(EventType::Ok, "increment", "c", 2, &[]),
            ev(EventType::Info, "increment", "c", 3, &[]),
            ev(EventType::Fail, "increment", "c", 4, &[]),
        ];
        for (value, ok) in [(1, false), (2, true), (3, true), (4, false)] {
            let report = check_counters(&history, "b", &finals("c", &[&[value]]));
            assert_eq!(report.wrong.is_empty(), ok, "{value}: {report:?}");
        }
        assert_eq!(
            check_counters(&history, "b", &finals("c", &[])).wrong.len(),
            1
        );
    }

    #[test]
    fn set_data_types_find_lost_adds_removed_elements_back_and_phantoms() {
        let mut history = vec![
            ev(EventType::Invoke, "dt-add", "d", 1, &[]),
            ev(EventType::Ok, "dt-add", "d", 1, &[]),
            ev(EventType::Invoke, "dt-add", "d", 2, &[]),
            ev(EventType::Ok, "dt-add", "d", 2, &[]),
            ev(EventType::Invoke, "dt-remove", "d", 900, &[]),
            ev(EventType::Ok, "dt-remove", "d", 2, &[]),
        ];
        let good = check_dt_sets(&history, "b", &finals("d", &[&[1]]));
        assert!(good.lost.is_empty() && good.resurrected.is_empty() && good.phantom.is_empty());
        assert_eq!((good.adds_acknowledged, good.removes_acknowledged), (2, 1));
        let bad = check_dt_sets(&history, "b", &finals("d", &[&[2, 7]]));
        assert_eq!(bad.lost, vec![("d".to_owned(), 1)]);
        assert_eq!(bad.resurrected, vec![("d".to_owned(), 2)]);
        assert_eq!(bad.phantom, vec![("d".to_owned(), 7)]);
        // A removal whose read found nothing was never sent: the add it did not remove
        // must still be there.
        let mut failed = ev(EventType::Fail, "dt-remove", "d", 1, &[]);
        failed.error = Some("nothing to remove".to_owned());
        history.push(failed);
        assert_eq!(
            check_dt_sets(&history, "b", &finals("d", &[])).lost,
            vec![("d".to_owned(), 1)]
        );
    }
}

/// The verdict of the expiry checker on one bucket.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TtlReport {
    pub writes_acknowledged: usize,
    pub reads: usize,
    /// Reads issued after some acknowledged value of their key had expired (those the rule
    /// tests).
    pub reads_after_an_expiry: usize,
    /// Reads that returned a value past its expiry: `(key, why)`.
    pub expired_reads: Vec<(String, String)>,
}

/// Expiry checker for the keys of `bucket`, written with a time to live of `ttl_ms`: a value
/// is stamped by its coordinator before its write is acknowledged, and a read leaves out
/// what expired by the clock of the node answering it. The nodes share the host's clock
/// except while a `clock-skew` fault runs a node up to `max_skew_ms` off (`skewed`: those
/// faults' windows; a value stamped during one keeps its shifted expiry). So a read invoked
/// `ttl_ms + slack` after a value's acknowledgement must not return it, with `slack` twice
/// the skew when the write or the read overlaps a skewed window, else `slop_ms`.
pub fn check_ttl(
    history: &[Event],
    bucket: &str,
    ttl_ms: u64,
    (skewed, max_skew_ms, slop_ms): (&[(u64, u64)], u64, u64),
) -> TtlReport {
    let mut report = TtlReport::default();
    let overlaps = |from: u64, to: u64| skewed.iter().any(|(s, e)| from <= *e && to >= *s);
    let span = |e: &Event| (e.time.saturating_sub(e.latency_ms.unwrap_or(0)), e.time);
    // Each acknowledged value: its key, acknowledgement and whether it was stamped skewed.
    let acked: BTreeMap<u64, (&str, u64, bool)> = history
        .iter()
        .filter(|e| e.bucket == bucket && e.f == "ttl-write" && e.kind == EventType::Ok)
        .map(|e| {
            let (from, to) = span(e);
            (e.value, (e.key.as_str(), e.time, overlaps(from, to)))
        })
        .collect();
    report.writes_acknowledged = acked.len();
    for read in history
        .iter()
        .filter(|e| e.bucket == bucket && e.f == "ttl-read" && e.kind == EventType::Ok)
    {
        report.reads += 1;
        let (invoked, done) = span(read);
        let read_skewed = overlaps(invoked, done);
        let deadline = |ack: u64, write_skewed: bool| {
            let slack = if write_skewed || read_skewed {
                2 * max_skew_ms
            } else {
                slop_ms
            };
            ack + ttl_ms + slack
        };
        if acked
            .values()
            .any(|(key, ack, skew)| *key == read.key && invoked >= deadline(*ack, *skew))
        {
            report.reads_after_an_expiry += 1;
        }
        for value in &read.seen {
            if let Some((key, ack, skew)) = acked.get(value)
                && *key == read.key
                && invoked >= deadline(*ack, *skew)
            {
                report.expired_reads.push((
                    read.key.clone(),
                    format!(
                        "read invoked at {invoked} ms returned {value}, acknowledged at {ack} ms \
                         with a time to live of {ttl_ms} ms"
                    ),
                ));
            }
        }
    }
    report
}

#[cfg(test)]
mod ttl_tests {
    use super::*;

    fn done(f: &str, value: u64, time: u64, latency: u64, seen: &[u64]) -> Event {
        Event {
            kind: EventType::Ok,
            process: 0,
            f: f.to_owned(),
            bucket: "t".to_owned(),
            key: "k".to_owned(),
            value,
            node: 1,
            time,
            latency_ms: Some(latency),
            seen: seen.to_vec(),
            partial: Vec::new(),
            siblings: 0,
            error: None,
        }
    }

    #[test]
    fn a_read_past_expiry_that_returns_the_value_is_caught_unless_a_clock_was_skewed() {
        let history = vec![
            done("ttl-write", 7, 1_000, 10, &[]),
            // Within the time to live: fine.
            done("ttl-read", 0, 2_500, 10, &[7]),
            // Invoked 2.5 s after the acknowledgement of a 2 s value: expired.
            done("ttl-read", 0, 3_510, 10, &[7]),
            // Not returned: fine, and counted as a read the rule tests.
            done("ttl-read", 0, 3_600, 10, &[]),
        ];
        let report = check_ttl(&history, "t", 2_000, (&[], 30_000, 250));
        assert_eq!((report.writes_acknowledged, report.reads), (1, 3));
        assert_eq!(report.reads_after_an_expiry, 2);
        assert_eq!(report.expired_reads.len(), 1, "{report:?}");
        // The same read while a node's clock was skewed is allowed.
        let skewed = check_ttl(&history, "t", 2_000, (&[(3_000, 4_000)], 30_000, 250));
        assert!(skewed.expired_reads.is_empty(), "{skewed:?}");
    }
}

/// What the index queries of every node found once the run ended (`IndexFinals::of` each
/// node): the values of the keys its queries of every client's group found, and those its
/// query of the whole integer index found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct IndexFinals {
    pub by_group: BTreeMap<usize, BTreeSet<u64>>,
    pub by_number: BTreeMap<usize, BTreeSet<u64>>,
}

/// The verdict of the secondary index checker on one bucket.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct IndexReport {
    pub writes_acknowledged: usize,
    pub deletes_acknowledged: usize,
    pub queries: usize,
    /// Keys a query found that no write ever carried: `(where, value)`.
    pub phantom: Vec<(String, u64)>,
    /// Acknowledged writes (no delete of them sent) a node's final queries did not find:
    /// `(node, value)`.
    pub missing: Vec<(usize, u64)>,
    /// Acknowledged deletes a node's final queries still found: `(node, value)`.
    pub undeleted: Vec<(usize, u64)>,
    /// Nodes whose group queries and integer range query disagreed at the end.
    pub disagreeing: Vec<usize>,
}

/// Secondary index checker: a write `ix-write` of value `v` makes key `x{v}` with the index
/// entries of its client's group and of `v`; `ix-delete` deletes one with a read's context.
/// Queries may miss or keep keys while replicas disagree (a query asks one replica per
/// partition), so the rules are: no query ever finds a key no write carried; once the run has
/// converged, every node's queries find every acknowledged write whose delete was never
/// sent (a delete that failed before it was sent leaves the key), none of the acknowledged
/// deletes, and the same keys by the group index as by the integer index.
pub fn check_index(history: &[Event], bucket: &str, finals: &IndexFinals) -> IndexReport {
    let mut report = IndexReport::default();
    let ours = |e: &&Event| e.bucket == bucket;
    let written: BTreeSet<u64> = history
        .iter()
        .filter(ours)
        .filter(|e| e.f == "ix-write" && e.kind == EventType::Invoke)
        .map(|e| e.value)
        .collect();
    let acked: BTreeSet<u64> = history
        .iter()
        .filter(ours)
        .filter(|e| e.f == "ix-write" && e.kind == EventType::Ok)
        .map(|e| e.value)
        .collect();
    // A delete that was sent (acknowledged or not): its key may or may not be there.
    let delete_sent: BTreeSet<u64> = history
        .iter()
        .filter(ours)
        .filter(|e| e.f == "ix-delete" && matches!(e.kind, EventType::Ok | EventType::Info))
        .map(|e| e.value)
        .collect();
    let deleted: BTreeSet<u64> = history
        .iter()
        .filter(ours)
        .filter(|e| e.f == "ix-delete" && e.kind == EventType::Ok)
        .map(|e| e.value)
        .collect();
    report.writes_acknowledged = acked.len();
    report.deletes_acknowledged = deleted.len();
    for query in history
        .iter()
        .filter(ours)
        .filter(|e| e.f == "ix-query" && e.kind == EventType::Ok)
    {
        report.queries += 1;
        for value in query.seen.iter().filter(|v| !written.contains(v)) {
            let at = format!(
                "query of {} at {} ms on n{}",
                query.key, query.time, query.node
            );
            report.phantom.push((at, *value));
        }
    }
    for (node, found) in &finals.by_group {
        for value in found.iter().filter(|v| !written.contains(v)) {
            report
                .phantom
                .push((format!("final query on n{node}"), *value));
        }
        for value in acked.difference(&delete_sent) {
            if !found.contains(value) {
                report.missing.push((*node, *value));
            }
        }
        for value in &deleted {
            if found.contains(value) {
                report.undeleted.push((*node, *value));
            }
        }
        if finals.by_number.get(node) != Some(found) {
            report.disagreeing.push(*node);
        }
    }
    report
}

#[cfg(test)]
mod index_tests {
    use super::*;

    fn ev(kind: EventType, f: &str, value: u64, seen: &[u64]) -> Event {
        Event {
            kind,
            process: 0,
            f: f.to_owned(),
            bucket: "x".to_owned(),
            key: format!("x{value}"),
            value,
            node: 1,
            time: 0,
            latency_ms: Some(1),
            seen: seen.to_vec(),
            partial: Vec::new(),
            siblings: 0,
            error: None,
        }
    }

    fn finals(found: &[u64]) -> IndexFinals {
        let set: BTreeSet<u64> = found.iter().copied().collect();
        IndexFinals {
            by_group: [(1, set.clone())].into_iter().collect(),
            by_number: [(1, set)].into_iter().collect(),
        }
    }

    #[test]
    fn lost_resurrected_and_phantom_index_entries_are_caught() {
        use EventType::{Fail, Info, Invoke, Ok};
        let mut history = Vec::new();
        for (value, outcome) in [(1, Ok), (2, Ok), (3, Info), (4, Ok), (5, Ok)] {
            history.push(ev(Invoke, "ix-write", value, &[]));
            history.push(ev(outcome, "ix-write", value, &[]));
        }
        // 2 deleted (acknowledged), 4's delete indeterminate, 5's failed before it was sent.
        history.push(ev(Ok, "ix-delete", 2, &[]));
        history.push(ev(Info, "ix-delete", 4, &[]));
        history.push(ev(Fail, "ix-delete", 5, &[]));
        history.push(ev(Ok, "ix-query", 0, &[1, 2, 3]));
        // Right: 1 and 5 there, 2 gone, 3 and 4 either way.
        let good = check_index(&history, "x", &finals(&[1, 3, 5]));
        assert_eq!(
            (good.writes_acknowledged, good.deletes_acknowledged),
            (4, 1)
        );
        assert_eq!(good.queries, 1);
        assert!(
            good.phantom.is_empty()
                && good.missing.is_empty()
                && good.undeleted.is_empty()
                && good.disagreeing.is_empty(),
            "{good:?}"
        );
        // Wrong: 1 lost, 2 back, 9 never written (also in a query during the run), and the
        // two indexes disagree.
        history.push(ev(Ok, "ix-query", 0, &[9]));
        let mut bad_finals = finals(&[2, 4, 5, 9]);
        bad_finals.by_number.insert(1, [2, 4].into_iter().collect());
        let bad = check_index(&history, "x", &bad_finals);
        assert_eq!(bad.missing, vec![(1, 1)]);
        assert_eq!(bad.undeleted, vec![(1, 2)]);
        assert_eq!(bad.phantom.len(), 2, "{bad:?}");
        assert_eq!(bad.disagreeing, vec![1]);
    }
}
