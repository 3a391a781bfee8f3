//! Property tests for the laws of objects and dotted version vectors.
//!
//! Histories are generated as random operations on a few replicas (writes with contexts taken
//! from reads, syncs between replicas), so every object in a test is one a real cluster could
//! hold: a dot always names the same content everywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dynakv_core::object::{Content, Object, PrunePolicy};
use dynakv_core::version::{ActorId, VersionVector};
use proptest::prelude::*;
use std::collections::BTreeSet;

const REPLICAS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Replica `at` coordinates a write whose context is what replica `read_from` holds (or
    /// nothing).
    Write { at: usize, read_from: Option<usize> },
    /// Replica `to` merges in what replica `from` holds.
    Sync { from: usize, to: usize },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..REPLICAS, proptest::option::of(0..REPLICAS))
            .prop_map(|(at, read_from)| Op::Write { at, read_from }),
        (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Op::Sync { from, to }),
    ]
}

fn content(tag: u64, now: u64) -> Content {
    Content {
        value: tag.to_le_bytes().to_vec(),
        content_type: "application/octet-stream".into(),
        last_modified_ms: now,
        meta: vec![],
        deleted: false,
        indexes: Vec::new(),
        expires_ms: None,
    }
}

fn no_prune() -> PrunePolicy {
    PrunePolicy {
        threshold: usize::MAX,
        min_age_ms: 0,
        hard_limit: usize::MAX,
    }
}

fn run(ops: &[Op]) -> Vec<Object> {
    let mut replicas = vec![Object::new(); REPLICAS];
    for (i, op) in ops.iter().enumerate() {
        let now = i as u64;
        match op {
            Op::Write { at, read_from } => {
                let ctx =
                    read_from.map_or_else(VersionVector::new, |r| replicas[r].clock().clone());
                replicas[*at] = replicas[*at]
                    .update(
                        &ctx,
                        content(now, now),
                        ActorId(*at as u64 + 1),
                        now,
                        no_prune(),
                    )
                    .unwrap();
            }
            Op::Sync { from, to } => {
                replicas[*to] = replicas[*to].sync(&replicas[*from]);
            }
        }
    }
    replicas
}

fn values(o: &Object) -> BTreeSet<Vec<u8>> {
    o.siblings()
        .iter()
        .map(|s| s.content.value.clone())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn sync_is_commutative_associative_idempotent(ops in proptest::collection::vec(arb_op(), 0..30)) {
        let r = run(&ops);
        let (a, b, c) = (&r[0], &r[1], &r[2]);
        prop_assert_eq!(a.sync(b), b.sync(a));
        prop_assert_eq!(a.sync(b).sync(c), a.sync(&b.sync(c)));
        prop_assert_eq!(a.sync(a), a.clone());
        for o in [a.sync(b), a.sync(b).sync(c)] {
            prop_assert!(o.check_invariants().is_ok());
        }
    }

    /// `sync` keeps a sibling exactly when both sides hold it or the other side has not seen
    /// it: overwritten versions never come back, unseen ones are never dropped.
    #[test]
    fn sync_keeps_exactly_the_unseen_siblings(ops in proptest::collection::vec(arb_op(), 0..30)) {
        let r = run(&ops);
        let (a, b) = (&r[0], &r[1]);
        let merged = a.sync(b);
        let mut expected: Vec<_> = a
            .siblings()
            .iter()
            .filter(|s| b.siblings().contains(s) || !b.clock().covers(s.dot))
            .chain(b.siblings().iter().filter(|s| !a.clock().covers(s.dot)))
            .map(|s| s.dot)
            .collect();
        expected.sort();
        expected.dedup();
        let got: Vec<_> = merged.siblings().iter().map(|s| s.dot).collect();
        prop_assert_eq!(got, expected);
        let mut clock = a.clock().clone();
        clock.merge(b.clock());
        prop_assert_eq!(merged.clock(), &clock);
    }

    /// A write made with the context of a read replaces exactly the siblings that read saw.
    #[test]
    fn write_with_read_context_replaces_exactly_what_was_read(
        ops in proptest::collection::vec(arb_op(), 0..30),
        concurrent in proptest::collection::vec(arb_op(), 0..10),
        at in 0..REPLICAS,
    ) {
        let replicas = run(&ops);
        let read = replicas[at].clone();
        // Other writes and syncs may land at the coordinator between the read and the write.
        let mut all = ops.clone();
        all.extend(concurrent.iter().cloned());
        let mut later = run(&all);
        later[at] = later[at].sync(&read);
        let before = later[at].clone();
        let written = before
            .update(read.clock(), content(10_000, 10_000), ActorId(99), 10_000, no_prune())
            .unwrap();
        let read_dots: BTreeSet<_> = read.siblings().iter().map(|s| s.dot).collect();
        let expected: BTreeSet<_> = before
            .siblings()
            .iter()
            .filter(|s| !read.clock().covers(s.dot))
            .map(|s| s.dot)
            .collect();
        let got: BTreeSet<_> = written.siblings().iter().map(|s| s.dot).filter(|d| d.actor != ActorId(99)).collect();
        prop_assert_eq!(&got, &expected);
        for dot in &read_dots {
            prop_assert!(!got.contains(dot), "a sibling the read saw survived the write");
        }
        prop_assert!(written.siblings().iter().any(|s| s.content.value == 10_000u64.to_le_bytes()));
        // Nothing the read did not see is lost: every sibling of `before` the read had not
        // seen is still there.
        for s in before.siblings() {
            if !read.clock().covers(s.dot) {
                prop_assert!(written.siblings().contains(s));
            }
        }
    }

    /// Two writes with the same stale context give two siblings, not one.
    #[test]
    fn two_writes_with_same_stale_context_are_both_kept(
        ops in proptest::collection::vec(arb_op(), 0..20),
        at in 0..REPLICAS,
    ) {
        let replicas = run(&ops);
        let base = replicas[at].clone();
        let ctx = base.clock().clone();
        let actor = ActorId(at as u64 + 1);
        let first = base.update(&ctx, content(1_000_001, 1), actor, 1, no_prune()).unwrap();
        let second = first.update(&ctx, content(1_000_002, 2), actor, 2, no_prune()).unwrap();
        let vals = values(&second);
        prop_assert!(vals.contains(1_000_001u64.to_le_bytes().as_slice()));
        prop_assert!(vals.contains(1_000_002u64.to_le_bytes().as_slice()));
        prop_assert_eq!(second.siblings().len(), 2);
        prop_assert!(second.check_invariants().is_ok());
        prop_assert!(second.siblings()[0].dot != second.siblings()[1].dot);
    }

    /// Pruning never drops a sibling and keeps the invariants.
    #[test]
    fn pruning_never_drops_a_sibling(
        ops in proptest::collection::vec(arb_op(), 0..40),
        extra_actors in 0u64..30,
        threshold in 0usize..12,
        now in 0u64..100_000,
        min_age in 0u64..50_000,
        hard in 0usize..20,
    ) {
        let replicas = run(&ops);
        let mut o = replicas[0].sync(&replicas[1]).sync(&replicas[2]);
        // Widen the clock with many actors whose writes were overwritten.
        for actor in 100..100 + extra_actors {
            o = o.update(o.clock(), content(actor, actor * 100), ActorId(actor), actor * 100, no_prune()).unwrap();
        }
        let before = o.siblings().to_vec();
        o.prune(now, PrunePolicy { threshold, min_age_ms: min_age, hard_limit: hard });
        prop_assert_eq!(o.siblings(), &before[..]);
        prop_assert!(o.check_invariants().is_ok());
        if o.clock().len() > threshold.max(hard) {
            // Only entries a sibling depends on may remain above the limits.
            let needed: BTreeSet<_> = o.siblings().iter().map(|s| s.dot.actor).collect();
            prop_assert!(o.clock().len() <= needed.len().max(threshold));
        }
    }

    #[test]
    fn encoding_roundtrips(ops in proptest::collection::vec(arb_op(), 0..30)) {
        for o in run(&ops) {
            prop_assert_eq!(Object::decode(&o.encode()).unwrap(), o);
        }
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Object::decode(&bytes);
        let mut valid = run(&[Op::Write { at: 0, read_from: None }])[0].encode();
        if !bytes.is_empty() {
            let i = bytes[0] as usize % valid.len();
            valid[i] ^= 0x5a;
            prop_assert!(Object::decode(&valid).is_err() || valid[i] == valid[i]);
        }
    }
}

/// The sibling-explosion case: two clients each read-modify-write the same key through the
/// same coordinator, each writing with the context its own previous write returned. With
/// dotted version vectors the object never holds more than 2 siblings.
fn interleaved_rmw_max_siblings(rounds: usize) -> usize {
    let coordinator = ActorId(1);
    let mut stored = Object::new();
    let mut ctx_a = VersionVector::new();
    let mut ctx_b = VersionVector::new();
    let mut max = 0;
    for round in 0..rounds as u64 {
        stored = stored
            .update(
                &ctx_a,
                content(round * 2, round),
                coordinator,
                round,
                no_prune(),
            )
            .unwrap();
        ctx_a = stored.clock().clone();
        max = max.max(stored.siblings().len());
        stored = stored
            .update(
                &ctx_b,
                content(round * 2 + 1, round),
                coordinator,
                round,
                no_prune(),
            )
            .unwrap();
        ctx_b = stored.clock().clone();
        max = max.max(stored.siblings().len());
    }
    max
}

/// The same workload against plain server-side vector clocks (Riak before DVV): one clock
/// per object, no dots, so a write whose context does not dominate the stored clock can only
/// be added beside every existing sibling.
fn interleaved_rmw_max_siblings_plain_vclock(rounds: usize) -> usize {
    let coordinator = ActorId(1);
    let mut clock = VersionVector::new();
    let mut siblings: Vec<u64> = Vec::new();
    let (mut ctx_a, mut ctx_b) = (VersionVector::new(), VersionVector::new());
    let mut max = 0;
    for round in 0..rounds as u64 {
        for (value, ctx) in [(round * 2, &mut ctx_a), (round * 2 + 1, &mut ctx_b)] {
            if ctx.descends(&clock) {
                siblings.clear();
            }
            siblings.push(value);
            clock.merge(ctx);
            clock.observe(coordinator, clock.counter(coordinator) + 1, round);
            *ctx = clock.clone();
            max = max.max(siblings.len());
        }
    }
    max
}

proptest! {
    #[test]
    fn interleaved_read_modify_write_keeps_two_siblings(rounds in 1usize..200) {
        prop_assert!(interleaved_rmw_max_siblings(rounds) <= 2);
    }
}

#[test]
fn plain_vector_clocks_explode_on_the_same_workload() {
    // Shows the test above would catch the bug it guards against.
    assert!(interleaved_rmw_max_siblings_plain_vclock(50) > 50);
    assert_eq!(interleaved_rmw_max_siblings(50), 2);
}
