//! Merge laws (commutative, associative, idempotent) and each operation's effect, for every
//! data type; encodings round-trip and garbage does not decode into a panic.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::codec::{Reader, Writer};
use proptest::prelude::*;

const ACTORS: [ActorId; 3] = [ActorId(1), ActorId(2), ActorId(3)];

/// One step of a three-replica history: an operation at a replica, or a replica taking
/// another's state.
#[derive(Debug, Clone)]
enum Step {
    Op {
        at: usize,
        value: i64,
        element: u8,
    },
    /// A remove at `at` with the context of a read at `via` (which may have seen adds `at`
    /// has not: a deferred removal).
    Remove {
        at: usize,
        element: u8,
        via: usize,
    },
    Sync {
        from: usize,
        to: usize,
    },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            4 => (0..3usize, -5i64..10, 0..6u8).prop_map(|(at, value, element)| Step::Op { at, value, element }),
            2 => (0..3usize, 0..6u8, 0..3usize).prop_map(|(at, element, via)| Step::Remove { at, element, via }),
            2 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
        ],
        0..40,
    )
}

/// Three replicas' counters after `steps`, and the sum of every increment made.
fn counters(steps: &[Step]) -> ([PnCounter; 3], i64) {
    let mut replicas: [PnCounter; 3] = Default::default();
    let mut total = 0;
    for step in steps {
        match step {
            Step::Op { at, value, .. } => {
                replicas[*at].apply(ACTORS[*at], *value).unwrap();
                total += value;
            }
            Step::Sync { from, to } => {
                let from = replicas[*from].clone();
                replicas[*to].merge(&from);
            }
            Step::Remove { .. } => {}
        }
    }
    (replicas, total)
}

/// Three replicas' sets after `steps` (a remove uses the context of a read at `via`).
fn sets(steps: &[Step]) -> [OrSet; 3] {
    let mut replicas: [OrSet; 3] = Default::default();
    for step in steps {
        match step {
            Step::Op { at, element, .. } => replicas[*at].add(ACTORS[*at], &[*element]).unwrap(),
            Step::Remove { at, element, via } => {
                let context = replicas[*via].context();
                let _ = replicas[*at].remove(&[*element], &context);
            }
            Step::Sync { from, to } => {
                let from = replicas[*from].clone();
                replicas[*to].merge(&from);
            }
        }
    }
    replicas
}

fn merged<T: Clone>(a: &T, b: &T, merge: impl Fn(&mut T, &T)) -> T {
    let mut out = a.clone();
    merge(&mut out, b);
    out
}

/// The three laws for one type, on three states.
fn laws<T: Clone + PartialEq + std::fmt::Debug>(
    a: &T,
    b: &T,
    c: &T,
    merge: impl Fn(&mut T, &T) + Copy,
) {
    assert_eq!(merged(a, b, merge), merged(b, a, merge), "commutative");
    assert_eq!(
        merged(&merged(a, b, merge), c, merge),
        merged(a, &merged(b, c, merge), merge),
        "associative"
    );
    assert_eq!(merged(a, a, merge), *a, "idempotent");
}

proptest! {
    #[test]
    fn counter_merges_are_lawful_and_count_every_increment(steps in steps()) {
        let ([a, b, c], total) = counters(&steps);
        laws(&a, &b, &c, PnCounter::merge);
        let all = merged(&merged(&a, &b, PnCounter::merge), &c, PnCounter::merge);
        prop_assert_eq!(all.value(), total);
    }

    #[test]
    fn set_merges_are_lawful(steps in steps()) {
        let [a, b, c] = sets(&steps);
        laws(&a, &b, &c, OrSet::merge);
        // Once every replica has met every other, no removal waits any more.
        let all = merged(&merged(&a, &b, OrSet::merge), &c, OrSet::merge);
        prop_assert_eq!(all.deferred_removals(), 0);
    }

    #[test]
    fn gset_merges_are_lawful(xs in prop::collection::vec(0..50u8, 0..30), ys in prop::collection::vec(0..50u8, 0..30)) {
        let (mut a, mut b) = (GSet::default(), GSet::default());
        for x in &xs { a.add(&[*x]).unwrap(); }
        for y in &ys { b.add(&[*y]).unwrap(); }
        let c = merged(&a, &b, GSet::merge);
        laws(&a, &b, &c, GSet::merge);
        prop_assert_eq!(c.len(), xs.iter().chain(&ys).collect::<std::collections::BTreeSet<_>>().len());
    }

    #[test]
    fn hll_merges_are_lawful(xs in prop::collection::vec(any::<u16>(), 0..200), ys in prop::collection::vec(any::<u16>(), 0..200)) {
        let (mut a, mut b) = (Hll::new(8).unwrap(), Hll::new(8).unwrap());
        for x in &xs { a.add(&x.to_le_bytes()).unwrap(); }
        for y in &ys { b.add(&y.to_le_bytes()).unwrap(); }
        let c = merged(&a, &b, Hll::merge);
        laws(&a, &b, &c, Hll::merge);
    }

    #[test]
    fn encodings_round_trip(steps in steps()) {
        let ([counter, ..], _) = counters(&steps);
        let [set, ..] = sets(&steps);
        let mut w = Writer::default();
        counter.encode(&mut w);
        set.encode(&mut w);
        let mut r = Reader::new(&w.buf);
        prop_assert_eq!(PnCounter::decode(&mut r).unwrap(), counter);
        prop_assert_eq!(OrSet::decode(&mut r).unwrap(), set);
        r.finish().unwrap();
    }

    #[test]
    fn garbage_does_not_decode_into_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = PnCounter::decode(&mut Reader::new(&bytes));
        let _ = OrSet::decode(&mut Reader::new(&bytes));
        let _ = GSet::decode(&mut Reader::new(&bytes));
        let _ = Hll::decode(&mut Reader::new(&bytes));
        let _ = OrMap::decode(&mut Reader::new(&bytes));
        // An update from a peer, and a stored value.
        let _ = Update::decode(&bytes);
        let _ = Crdt::decode(&bytes);
    }
}

proptest! {
    #[test]
    fn register_and_flag_merges_are_lawful(ops in prop::collection::vec((0..3usize, 0..3u8, 0..5u64, any::<u8>()), 0..30)) {
        let mut registers: [LwwRegister; 3] = Default::default();
        let mut flags: [EwFlag; 3] = Default::default();
        for (at, kind, time, value) in ops {
            match kind {
                0 => {
                    registers[at].set(ACTORS[at], time, &[value]).unwrap();
                    flags[at].enable(ACTORS[at]).unwrap();
                }
                1 => {
                    let context = flags[at].context();
                    flags[at].disable(&context);
                }
                _ => {
                    let (r, f) = (registers[(at + 1) % 3].clone(), flags[(at + 1) % 3].clone());
                    registers[at].merge(&r);
                    flags[at].merge(&f);
                }
            }
        }
        let [a, b, c] = registers;
        laws(&a, &b, &c, LwwRegister::merge);
        let [a, b, c] = flags;
        laws(&a, &b, &c, EwFlag::merge);
    }
}

#[test]
fn the_later_register_write_wins_and_enable_wins_over_a_concurrent_disable() {
    let mut a = LwwRegister::default();
    let mut b = LwwRegister::default();
    a.set(ACTORS[0], 10, b"old").unwrap();
    b.set(ACTORS[1], 20, b"new").unwrap();
    assert_eq!(merged(&a, &b, LwwRegister::merge).value(), b"new");
    assert_eq!(merged(&b, &a, LwwRegister::merge).value(), b"new");
    let mut on_a = EwFlag::default();
    on_a.enable(ACTORS[0]).unwrap();
    let mut on_b = on_a.clone();
    let read = on_a.context();
    on_b.enable(ACTORS[1]).unwrap();
    on_a.disable(&read);
    assert!(!on_a.enabled());
    assert!(merged(&on_a, &on_b, EwFlag::merge).enabled());
}

#[test]
fn a_remove_undoes_only_the_adds_its_read_saw() {
    let (a, b) = (ACTORS[0], ACTORS[1]);
    let mut on_a = OrSet::default();
    on_a.add(a, b"x").unwrap();
    let mut on_b = on_a.clone();
    // A client read x at a; meanwhile b adds x again (a new dot the read did not see).
    let read = on_a.context();
    on_b.add(b, b"x").unwrap();
    on_a.remove(b"x", &read).unwrap();
    assert!(!on_a.contains(b"x"));
    // Add wins: the concurrent add survives the merge, both ways.
    let ab = merged(&on_a, &on_b, OrSet::merge);
    let ba = merged(&on_b, &on_a, OrSet::merge);
    assert!(ab.contains(b"x") && ba.contains(b"x"));
    // A remove with a context that saw everything removes it everywhere, for good: merging
    // any older state does not bring it back.
    let mut done = ab.clone();
    done.remove(b"x", &ab.context()).unwrap();
    for old in [&on_a, &on_b, &ab] {
        assert!(!merged(&done, old, OrSet::merge).contains(b"x"));
    }
    // A remove of what the read did not see is refused.
    let empty = OrSet::default().context();
    assert!(matches!(
        done.clone().remove(b"y", &empty),
        Err(CrdtError::NotPresent(_))
    ));
}

#[test]
fn counters_refuse_overflow_and_keep_their_value() {
    let mut c = PnCounter::default();
    c.apply(ACTORS[0], i64::MAX).unwrap();
    assert_eq!(c.apply(ACTORS[1], 1), Err(CrdtError::Overflow));
    assert_eq!(c.value(), i64::MAX);
    c.apply(ACTORS[1], -5).unwrap();
    assert_eq!(c.value(), i64::MAX - 5);
}

/// A counter merge that takes the larger total over all actors instead of each actor's: the
/// property test's sum catches it (the planted bug of the issue).
#[test]
fn a_max_merge_instead_of_per_actor_max_loses_increments() {
    fn wrong_merge(mine: &mut PnCounter, theirs: &PnCounter) {
        if theirs.value() > mine.value() {
            *mine = theirs.clone();
        }
    }
    let mut a = PnCounter::default();
    let mut b = PnCounter::default();
    a.apply(ACTORS[0], 3).unwrap();
    b.apply(ACTORS[1], 4).unwrap();
    let right = merged(&a, &b, PnCounter::merge);
    let wrong = merged(&a, &b, wrong_merge);
    assert_eq!(right.value(), 7);
    assert_ne!(wrong.value(), 7);
}

#[test]
fn bounds_are_refused_and_change_nothing() {
    let mut set = OrSet::default();
    assert_eq!(
        set.add(ACTORS[0], &[0u8; MAX_ELEMENT_BYTES + 1]),
        Err(CrdtError::ElementTooLarge)
    );
    assert!(set.is_empty());
    let mut g = GSet::default();
    for i in 0..MAX_SET_ELEMENTS as u32 {
        g.add(&i.to_le_bytes()).unwrap();
    }
    assert_eq!(g.add(b"one more"), Err(CrdtError::TooManyElements));
    assert_eq!(g.len(), MAX_SET_ELEMENTS);
}

#[test]
fn hll_estimates_within_its_error() {
    let mut h = Hll::default();
    for i in 0..20_000u32 {
        h.add(&i.to_le_bytes()).unwrap();
    }
    let estimate = h.estimate() as f64;
    // p = 14: standard error 0.81%; five of them.
    assert!((estimate / 20_000.0 - 1.0).abs() < 0.05, "{estimate}");
    // Small cardinalities are exact enough (linear counting).
    let mut small = Hll::default();
    for i in 0..100u32 {
        small.add(&i.to_le_bytes()).unwrap();
        small.add(&i.to_le_bytes()).unwrap();
    }
    assert!(small.estimate().abs_diff(100) <= 2, "{}", small.estimate());
    // Folding a finer estimator into a coarser one keeps the estimate.
    let mut coarse = Hll::new(10).unwrap();
    coarse.merge(&h);
    assert_eq!(coarse.precision(), 10);
    let folded = coarse.estimate() as f64;
    assert!((folded / 20_000.0 - 1.0).abs() < 0.15, "{folded}");
}

fn key(name: &str, kind: FieldKind) -> FieldKey {
    FieldKey {
        name: name.as_bytes().to_vec(),
        kind,
    }
}

/// A random map operation on a small set of fields (one nested map), removes with the
/// replica's own current context.
fn map_op(kind: u8, field: u8, value: u8) -> MapOp {
    let name = ["a", "b"][usize::from(field % 2)];
    match kind % 8 {
        0 => MapOp::Update(
            key(name, FieldKind::Counter),
            FieldOp::Increment(i64::from(value) - 3),
        ),
        1 => MapOp::Update(key(name, FieldKind::Set), FieldOp::Add(vec![value % 4])),
        2 => MapOp::Update(
            key(name, FieldKind::Set),
            FieldOp::RemoveElement(vec![value % 4]),
        ),
        3 => MapOp::Update(key(name, FieldKind::Register), FieldOp::Assign(vec![value])),
        4 => MapOp::Update(
            key(name, FieldKind::Flag),
            if value.is_multiple_of(2) {
                FieldOp::Enable
            } else {
                FieldOp::Disable
            },
        ),
        5 => MapOp::Update(
            key("m", FieldKind::Map),
            FieldOp::Update(vec![MapOp::Update(
                key(name, FieldKind::Counter),
                FieldOp::Increment(1),
            )]),
        ),
        6 => MapOp::Remove(key(
            name,
            [
                FieldKind::Counter,
                FieldKind::Set,
                FieldKind::Register,
                FieldKind::Flag,
            ][usize::from(value % 4)],
        )),
        _ => MapOp::Remove(key("m", FieldKind::Map)),
    }
}

proptest! {
    /// Maps built by random updates, removes (with each replica's own context) and syncs on
    /// three replicas merge lawfully, removes of fields updated elsewhere included.
    #[test]
    fn map_merges_are_lawful(ops in prop::collection::vec((0..3usize, 0..10u8, any::<u8>(), any::<u8>(), 0..3usize), 0..50)) {
        let mut replicas: [OrMap; 3] = Default::default();
        for (i, (at, kind, field, value, from)) in ops.into_iter().enumerate() {
            if kind >= 8 {
                let other = replicas[from].clone();
                replicas[at].merge(&other);
                continue;
            }
            // Half the removes carry the context of a read at another replica (which may
            // have seen updates this one has not: a deferred removal).
            let via = if i % 2 == 0 { at } else { from };
            let context = replicas[via].context();
            let _ = replicas[at].update(ACTORS[at], i as u64, &[map_op(kind, field, value)], Some(&context));
        }
        for map in &replicas {
            let mut w = Writer::default();
            map.encode(&mut w);
            let mut r = Reader::new(&w.buf);
            prop_assert_eq!(&OrMap::decode(&mut r).unwrap(), map);
            r.finish().unwrap();
        }
        let [a, b, c] = replicas;
        laws(&a, &b, &c, OrMap::merge);
        let all = merged(&merged(&a, &b, OrMap::merge), &c, OrMap::merge);
        prop_assert_eq!(all.deferred_removals(), 0);
    }
}

/// A client reads a set at one replica and removes through another that has not seen the
/// add yet: the removal is kept, and takes effect when the add arrives, in either order.
#[test]
fn a_removal_through_a_replica_that_lags_waits_for_what_it_removes() {
    let mut ahead = OrSet::default();
    ahead.add(ACTORS[0], b"x").unwrap();
    ahead.add(ACTORS[0], b"y").unwrap();
    let read = ahead.context();
    let mut behind = OrSet::default();
    behind.remove(b"x", &read).unwrap();
    assert_eq!(behind.deferred_removals(), 1);
    let ab = merged(&ahead, &behind, OrSet::merge);
    let ba = merged(&behind, &ahead, OrSet::merge);
    assert_eq!(ab, ba);
    assert!(!ab.contains(b"x") && ab.contains(b"y"));
    assert_eq!(
        ab.deferred_removals(),
        0,
        "applied for good once the add arrived"
    );
    // Through encoding too (a replica stores the waiting removal).
    let mut w = Writer::default();
    behind.encode(&mut w);
    assert_eq!(OrSet::decode(&mut Reader::new(&w.buf)).unwrap(), behind);

    // The same for a map: a field's removal and a set field's element removal.
    let counter = key("c", FieldKind::Counter);
    let tags = key("tags", FieldKind::Set);
    let mut ahead = OrMap::default();
    let ops = [
        MapOp::Update(counter.clone(), FieldOp::Increment(3)),
        MapOp::Update(tags.clone(), FieldOp::Add(b"t".to_vec())),
        MapOp::Update(tags.clone(), FieldOp::Add(b"u".to_vec())),
    ];
    ahead.update(ACTORS[0], 1, &ops, None).unwrap();
    let read = ahead.context();
    let mut behind = OrMap::default();
    let removes = [
        MapOp::Remove(counter.clone()),
        MapOp::Update(tags.clone(), FieldOp::RemoveElement(b"t".to_vec())),
    ];
    behind.update(ACTORS[1], 2, &removes, Some(&read)).unwrap();
    assert_eq!(behind.deferred_removals(), 2);
    let ab = merged(&ahead, &behind, OrMap::merge);
    assert_eq!(ab, merged(&behind, &ahead, OrMap::merge));
    assert_eq!(
        ab.read(),
        std::collections::BTreeMap::from([(tags, FieldValue::Set(vec![b"u".to_vec()]))])
    );
    assert_eq!(ab.deferred_removals(), 0);
}

#[test]
fn a_field_removed_on_one_replica_and_updated_on_another_converges() {
    let counter = key("visits", FieldKind::Counter);
    let mut a = OrMap::default();
    a.update(
        ACTORS[0],
        1,
        &[MapOp::Update(counter.clone(), FieldOp::Increment(5))],
        None,
    )
    .unwrap();
    let mut b = a.clone();
    let mut c = a.clone();
    // b removes the field it read; c increments it concurrently; a increments again.
    let read = b.context();
    b.update(ACTORS[1], 2, &[MapOp::Remove(counter.clone())], Some(&read))
        .unwrap();
    assert!(b.read().is_empty());
    c.update(
        ACTORS[2],
        2,
        &[MapOp::Update(counter.clone(), FieldOp::Increment(2))],
        None,
    )
    .unwrap();
    a.update(
        ACTORS[0],
        3,
        &[MapOp::Update(counter.clone(), FieldOp::Increment(1))],
        None,
    )
    .unwrap();
    // Every order of merging gives the same map: the field is back (the updates the remove
    // had not seen win) with c's 2 and a's contribution, 6: a counter's contribution is
    // cumulative per actor and a's later increment re-tagged all of it (as Riak's embedded
    // counter does); the remove dropped only what it saw of each actor.
    let orders = [
        merged(&merged(&a, &b, OrMap::merge), &c, OrMap::merge),
        merged(&a, &merged(&b, &c, OrMap::merge), OrMap::merge),
        merged(&merged(&c, &a, OrMap::merge), &b, OrMap::merge),
    ];
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
    let fields = orders[0].read();
    assert_eq!(fields.get(&counter), Some(&FieldValue::Counter(8)));
    // A remove needs a context that saw the field; a wrong operation for a field's type is
    // refused; all or nothing.
    let mut d = OrMap::default();
    assert!(matches!(
        d.update(
            ACTORS[0],
            1,
            &[MapOp::Remove(counter.clone())],
            Some(&d.context())
        ),
        Err(CrdtError::NotPresent(_))
    ));
    let wrong = [
        MapOp::Update(key("ok", FieldKind::Flag), FieldOp::Enable),
        MapOp::Update(counter.clone(), FieldOp::Add(b"x".to_vec())),
    ];
    assert!(matches!(
        d.update(ACTORS[0], 1, &wrong, None),
        Err(CrdtError::WrongOp(_))
    ));
    assert!(d.read().is_empty(), "nothing of a refused update stays");
}

#[test]
fn maps_nest_up_to_their_depth_and_fields_are_bounded() {
    fn nested(depth: usize) -> MapOp {
        let leaf = MapOp::Update(key("f", FieldKind::Flag), FieldOp::Enable);
        (0..depth).fold(leaf, |inner, _| {
            MapOp::Update(key("m", FieldKind::Map), FieldOp::Update(vec![inner]))
        })
    }
    let mut m = OrMap::default();
    m.update(ACTORS[0], 1, &[nested(MAX_MAP_DEPTH - 1)], None)
        .unwrap();
    assert_eq!(
        m.update(ACTORS[0], 2, &[nested(MAX_MAP_DEPTH)], None),
        Err(CrdtError::TooDeep)
    );
    let many: Vec<MapOp> = (0..=MAX_MAP_FIELDS)
        .map(|i| MapOp::Update(key(&format!("f{i}"), FieldKind::Flag), FieldOp::Enable))
        .collect();
    assert_eq!(
        OrMap::default().update(ACTORS[0], 1, &many, None),
        Err(CrdtError::TooManyElements)
    );
}

#[test]
fn riaks_json_operations_apply_and_read_back() {
    let op = |kind, text: &str| parse_op(kind, &serde_json::from_str(text).unwrap());
    let mut counter = Crdt::new(DataTypeKind::Counter);
    counter
        .apply(
            ACTORS[0],
            1,
            &op(DataTypeKind::Counter, r#"{"increment":5}"#).unwrap(),
            None,
        )
        .unwrap();
    counter
        .apply(
            ACTORS[1],
            2,
            &op(DataTypeKind::Counter, r#"{"decrement":2}"#).unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(
        counter.to_json(),
        serde_json::json!({"type":"counter","value":3})
    );

    let mut set = Crdt::new(DataTypeKind::Set);
    set.apply(
        ACTORS[0],
        1,
        &op(DataTypeKind::Set, r#"{"add_all":["a","b"],"add":"c"}"#).unwrap(),
        None,
    )
    .unwrap();
    let context = set.context();
    // A remove without a context is refused; with the read's, it goes.
    let remove = op(
        DataTypeKind::Set,
        r#"{"remove":"a","context":"ignored here"}"#,
    )
    .unwrap();
    assert!(set.clone().apply(ACTORS[0], 2, &remove, None).is_err());
    set.apply(ACTORS[0], 2, &remove, context.as_ref()).unwrap();
    assert_eq!(
        set.to_json(),
        serde_json::json!({"type":"set","value":["b","c"]})
    );

    let mut map = Crdt::new(DataTypeKind::Map);
    let update = op(
        DataTypeKind::Map,
        r#"{"update":{"name_register":"x","visits_counter":1,"tags_set":{"add_all":["t"]},
            "on_flag":"enable","inner_map":{"update":{"n_counter":{"increment":2}}}}}"#,
    )
    .unwrap();
    map.apply(ACTORS[0], 1, &update, None).unwrap();
    assert_eq!(
        map.to_json(),
        serde_json::json!({"type":"map","value":{
            "inner_map":{"n_counter":2},"name_register":"x","on_flag":true,
            "tags_set":["t"],"visits_counter":1}})
    );
    let context = map.context();
    let remove = op(
        DataTypeKind::Map,
        r#"{"remove":["name_register"],"update":{"on_flag":"disable"}}"#,
    )
    .unwrap();
    map.apply(ACTORS[0], 2, &remove, context.as_ref()).unwrap();
    let read = map.to_json();
    assert!(
        read["value"].get("name_register").is_none() && read["value"].get("on_flag").is_none(),
        "{read}"
    );

    let mut hll = Crdt::new(DataTypeKind::Hll);
    hll.apply(
        ACTORS[0],
        1,
        &op(DataTypeKind::Hll, r#"{"add_all":["a","b","a"]}"#).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(hll.to_json(), serde_json::json!({"type":"hll","value":2}));

    // Encodings round-trip; another type does not merge; bad operations are refused.
    for value in [&counter, &set, &map, &hll] {
        assert_eq!(&Crdt::decode(&value.encode()).unwrap(), value);
    }
    assert!(counter.clone().merge(&set).is_err());
    for (kind, text) in [
        (DataTypeKind::Counter, r#"{"increment":"five"}"#),
        (DataTypeKind::Counter, r#"{"add":1}"#),
        (DataTypeKind::Set, r#"{"add_all":"a"}"#),
        (DataTypeKind::Set, r#"{"append":"a"}"#),
        (DataTypeKind::Map, r#"{"update":{"nosuffix":1}}"#),
        (DataTypeKind::Map, r#"{"update":{"x_widget":1}}"#),
        (DataTypeKind::Map, r#"{"update":{"f_flag":"maybe"}}"#),
        (DataTypeKind::Map, "[1]"),
    ] {
        assert!(op(kind, text).is_err(), "{text}");
    }
    assert!(Crdt::decode(&[9, 0]).is_err());
}

/// What a 10,000-element set costs (docs/BENCHMARKS.md): its encoding (what a replica stores
/// and every update ships to the other replicas) stays within 16 bytes per element of 8
/// bytes, once written by one actor or by three.
#[test]
fn a_ten_thousand_element_set_encodes_compactly() {
    for actors in [1usize, 3] {
        let mut set = OrSet::default();
        for i in 0..10_000u64 {
            set.add(ACTORS[i as usize % actors], &i.to_be_bytes())
                .unwrap();
        }
        let bytes = Crdt::Set(set).encode().len();
        println!("10,000 elements of 8 bytes, {actors} actor(s): {bytes} bytes encoded");
        assert!(bytes <= 10_000 * 16, "{bytes}");
    }
}
