//! Riak's map: named fields of counters, sets, registers, flags and maps, each merged by its
//! own rule, under the map's one clock.
//!
//! The values in a map are *causal* (a dot store, as in Almeida et al.'s delta-CRDTs and
//! Riak's embedded types): they keep no clock of their own, and everything in them is tagged
//! with the dot of the map update that made it. So a field is present while its value holds
//! a dot; removing a field (with the context of a read) drops the dots the read saw, at every
//! depth (reset-remove); and a merge keeps a dot both sides have, or one side has that the
//! other's clock has not seen. This makes the merge commutative, associative and idempotent
//! even for a field removed on one replica and updated on another.
//!
//! - counter: per actor, its latest contribution (cumulative increments and decrements),
//!   tagged with the dot of the update that made it;
//! - set: per element, the dots of the adds that are live (add wins);
//! - register: the writes no one has overwritten yet (concurrent ones all kept), read as the
//!   one with the latest `(timestamp, actor)`;
//! - flag: the dots of the enables that are live (enable wins);
//! - map: fields, recursively.

use super::set::{covers, decode_context, encode_context, merge_clock, merge_dots};
use super::{
    CrdtError, MAX_CRDT_ACTORS, MAX_ELEMENT_BYTES, MAX_REGISTER_BYTES, MAX_SET_ELEMENTS,
    MAX_SET_ELEMENTS_MERGED, SetContext, next_counter, shown,
};
use crate::codec::{DecodeError, Reader, Writer};
use crate::version::{ActorId, Dot};
use std::collections::{BTreeMap, BTreeSet};

/// Most fields a map (each nested map too) holds.
pub const MAX_MAP_FIELDS: usize = 1024;
/// Deepest nesting of maps in a map (a top-level map is depth 1).
pub const MAX_MAP_DEPTH: usize = 4;

/// A field's type: part of its name, as in Riak (`visits_counter`, `tags_set`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldKind {
    Counter,
    Set,
    Register,
    Flag,
    Map,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldKey {
    pub name: Vec<u8>,
    pub kind: FieldKind,
}

/// An operation on one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldOp {
    Increment(i64),
    Add(Vec<u8>),
    /// Needs the context of a read that saw the element.
    RemoveElement(Vec<u8>),
    Assign(Vec<u8>),
    Enable,
    /// Needs the context of a read.
    Disable,
    Update(Vec<MapOp>),
}

/// An operation on a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    Update(FieldKey, FieldOp),
    /// Needs the context of a read that saw the field.
    Remove(FieldKey),
}

/// A field's value: causal, tagged with the map clock's dots.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Counter(BTreeMap<Dot, (u64, u64)>),
    Set(BTreeMap<Vec<u8>, BTreeSet<Dot>>),
    Register(BTreeMap<Dot, (u64, Vec<u8>)>),
    Flag(BTreeSet<Dot>),
    Map(BTreeMap<FieldKey, Value>),
}

/// What a client reads of a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    Counter(i64),
    Set(Vec<Vec<u8>>),
    Register(Vec<u8>),
    Flag(bool),
    Map(BTreeMap<FieldKey, FieldValue>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrMap {
    clock: SetContext,
    fields: BTreeMap<FieldKey, Value>,
    /// Removals (of a field, a set field's element, a flag's enables) whose context has seen
    /// updates this replica has not (see `deferred`): the field's path, and the element.
    deferred: super::deferred::Deferred<Target>,
}

/// What a deferred removal removes: the field at a path, or an element of the set there.
type Target = (Vec<FieldKey>, Option<Vec<u8>>);

/// One update's removals: the update's context, whether this replica's clock covers it (else
/// the removals are deferred as well as applied), and those deferred so far.
struct Removals<'a> {
    context: Option<&'a SetContext>,
    covered: bool,
    path: Vec<FieldKey>,
    deferred: Vec<Target>,
}

/// Drop what `context` has seen of the target at `path` (a field, or an element of the set
/// there), and any field left empty on the way.
fn reset_at(
    fields: &mut BTreeMap<FieldKey, Value>,
    (path, element): (&[FieldKey], Option<&[u8]>),
    context: &SetContext,
) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(value) = fields.get_mut(first) else {
        return;
    };
    match (value, rest.is_empty(), element) {
        (Value::Map(inner), false, _) => reset_at(inner, (rest, element), context),
        (Value::Set(m), true, Some(element)) => {
            if let Some(dots) = m.get_mut(element) {
                dots.retain(|d| !covers(context, d));
                if dots.is_empty() {
                    m.remove(element);
                }
            }
        }
        (value, true, None) => value.reset(context),
        _ => {}
    }
    if fields.get(first).is_some_and(Value::is_empty) {
        fields.remove(first);
    }
}

impl Value {
    fn empty(kind: FieldKind) -> Value {
        match kind {
            FieldKind::Counter => Value::Counter(BTreeMap::new()),
            FieldKind::Set => Value::Set(BTreeMap::new()),
            FieldKind::Register => Value::Register(BTreeMap::new()),
            FieldKind::Flag => Value::Flag(BTreeSet::new()),
            FieldKind::Map => Value::Map(BTreeMap::new()),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Value::Counter(m) => m.is_empty(),
            Value::Set(m) => m.is_empty(),
            Value::Register(m) => m.is_empty(),
            Value::Flag(s) => s.is_empty(),
            Value::Map(m) => m.is_empty(),
        }
    }

    /// Drop every dot `context` has seen (a removal by a client that read it then).
    fn reset(&mut self, context: &SetContext) {
        match self {
            Value::Counter(m) => m.retain(|d, _| !covers(context, d)),
            Value::Set(m) => {
                for dots in m.values_mut() {
                    dots.retain(|d| !covers(context, d));
                }
                m.retain(|_, dots| !dots.is_empty());
            }
            Value::Register(m) => m.retain(|d, _| !covers(context, d)),
            Value::Flag(s) => s.retain(|d| !covers(context, d)),
            Value::Map(m) => {
                for value in m.values_mut() {
                    value.reset(context);
                }
                m.retain(|_, v| !v.is_empty());
            }
        }
    }

    /// The causal merge of two values of the same field, under their maps' clocks.
    fn merge(ours: (&Value, &SetContext), theirs: (&Value, &SetContext)) -> Value {
        let (a, ca) = ours;
        let (b, cb) = theirs;
        match (a, b) {
            (Value::Counter(x), Value::Counter(y)) => Value::Counter(merge_fun(x, ca, y, cb)),
            (Value::Register(x), Value::Register(y)) => Value::Register(merge_fun(x, ca, y, cb)),
            (Value::Flag(x), Value::Flag(y)) => Value::Flag(merge_dots((x, ca), (y, cb))),
            (Value::Set(x), Value::Set(y)) => {
                let empty = BTreeSet::new();
                let keys: BTreeSet<&Vec<u8>> = x.keys().chain(y.keys()).collect();
                let mut out = BTreeMap::new();
                for key in keys {
                    let dots = merge_dots(
                        (x.get(key).unwrap_or(&empty), ca),
                        (y.get(key).unwrap_or(&empty), cb),
                    );
                    if !dots.is_empty() {
                        out.insert(key.clone(), dots);
                    }
                }
                Value::Set(out)
            }
            (Value::Map(x), Value::Map(y)) => Value::Map(merge_fields(x, ca, y, cb)),
            // A key's kind is part of it: two values of one key are of one kind.
            (ours, _) => ours.clone(),
        }
    }

    fn read(&self) -> FieldValue {
        match self {
            Value::Counter(m) => {
                let wide: i128 = m
                    .values()
                    .map(|(inc, dec)| i128::from(*inc) - i128::from(*dec))
                    .sum();
                FieldValue::Counter(i64::try_from(wide).unwrap_or(if wide < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                }))
            }
            Value::Set(m) => FieldValue::Set(m.keys().cloned().collect()),
            Value::Register(m) => FieldValue::Register(
                m.iter()
                    .max_by_key(|(dot, (ts, value))| (*ts, dot.actor, value.clone()))
                    .map(|(_, (_, value))| value.clone())
                    .unwrap_or_default(),
            ),
            Value::Flag(s) => FieldValue::Flag(!s.is_empty()),
            Value::Map(m) => {
                FieldValue::Map(m.iter().map(|(k, v)| (k.clone(), v.read())).collect())
            }
        }
    }
}

/// Merge of dot-tagged entries: an entry both sides have, or one side has and the other's
/// clock has not seen.
fn merge_fun<T: Clone>(
    x: &BTreeMap<Dot, T>,
    cx: &SetContext,
    y: &BTreeMap<Dot, T>,
    cy: &SetContext,
) -> BTreeMap<Dot, T> {
    let mut out = BTreeMap::new();
    for (dot, value) in x {
        if y.contains_key(dot) || !covers(cy, dot) {
            out.insert(*dot, value.clone());
        }
    }
    for (dot, value) in y {
        if !x.contains_key(dot) && !covers(cx, dot) {
            out.insert(*dot, value.clone());
        }
    }
    out
}

fn merge_fields(
    x: &BTreeMap<FieldKey, Value>,
    cx: &SetContext,
    y: &BTreeMap<FieldKey, Value>,
    cy: &SetContext,
) -> BTreeMap<FieldKey, Value> {
    let keys: BTreeSet<&FieldKey> = x.keys().chain(y.keys()).collect();
    let mut out = BTreeMap::new();
    for key in keys {
        let empty = Value::empty(key.kind);
        let merged = Value::merge(
            (x.get(key).unwrap_or(&empty), cx),
            (y.get(key).unwrap_or(&empty), cy),
        );
        if !merged.is_empty() {
            out.insert(key.clone(), merged);
        }
    }
    out
}

/// Apply `ops` to `fields` with `dot` (the update's), at nesting `depth`; removals whose
/// context this replica has not caught up with are also added to `removals.deferred`.
fn apply(
    fields: &mut BTreeMap<FieldKey, Value>,
    ops: &[MapOp],
    dot: Dot,
    (now_ms, depth): (u64, usize),
    removals: &mut Removals<'_>,
) -> Result<(), CrdtError> {
    let context = removals.context;
    let need_context = |what: &[u8]| context.ok_or_else(|| CrdtError::NotPresent(shown(what)));
    for op in ops {
        match op {
            MapOp::Remove(key) => {
                let context = need_context(&key.name)?;
                if !removals.covered {
                    let mut path = removals.path.clone();
                    path.push(key.clone());
                    reset_at(fields, (&path[path.len() - 1..], None), context);
                    removals.deferred.push((path, None));
                    continue;
                }
                // Absent: refused; present through updates the read did not see only: those
                // win, and the removal changes nothing.
                let value = fields
                    .get_mut(key)
                    .ok_or_else(|| CrdtError::NotPresent(shown(&key.name)))?;
                value.reset(context);
                if value.is_empty() {
                    fields.remove(key);
                }
            }
            MapOp::Update(key, op) => {
                if key.name.len() > MAX_ELEMENT_BYTES {
                    return Err(CrdtError::ElementTooLarge);
                }
                if !fields.contains_key(key) && fields.len() >= MAX_MAP_FIELDS {
                    return Err(CrdtError::TooManyElements);
                }
                let value = fields
                    .entry(key.clone())
                    .or_insert_with(|| Value::empty(key.kind));
                match (value, op) {
                    (Value::Counter(m), FieldOp::Increment(delta)) => {
                        let (inc, dec) = m
                            .iter()
                            .filter(|(d, _)| d.actor == dot.actor)
                            .map(|(_, t)| *t)
                            .fold((0u64, 0u64), |a, t| (a.0.max(t.0), a.1.max(t.1)));
                        let (inc, dec) = if *delta >= 0 {
                            (
                                inc.checked_add(delta.unsigned_abs())
                                    .ok_or(CrdtError::Overflow)?,
                                dec,
                            )
                        } else {
                            (
                                inc,
                                dec.checked_add(delta.unsigned_abs())
                                    .ok_or(CrdtError::Overflow)?,
                            )
                        };
                        m.retain(|d, _| d.actor != dot.actor);
                        m.insert(dot, (inc, dec));
                    }
                    (Value::Set(m), FieldOp::Add(element)) => {
                        super::check_element(element)?;
                        if !m.contains_key(element) && m.len() >= MAX_SET_ELEMENTS {
                            return Err(CrdtError::TooManyElements);
                        }
                        m.insert(element.clone(), BTreeSet::from([dot]));
                    }
                    (Value::Set(m), FieldOp::RemoveElement(element)) => {
                        let context = need_context(element)?;
                        if !removals.covered {
                            super::check_element(element)?;
                            if let Some(dots) = m.get_mut(element) {
                                dots.retain(|d| !covers(context, d));
                                if dots.is_empty() {
                                    m.remove(element);
                                }
                            }
                            let mut path = removals.path.clone();
                            path.push(key.clone());
                            removals.deferred.push((path, Some(element.clone())));
                            continue;
                        }
                        let dots = m
                            .get_mut(element)
                            .ok_or_else(|| CrdtError::NotPresent(shown(element)))?;
                        dots.retain(|d| !covers(context, d));
                        if dots.is_empty() {
                            m.remove(element);
                        }
                    }
                    (Value::Register(m), FieldOp::Assign(bytes)) => {
                        if bytes.len() > super::MAX_REGISTER_BYTES {
                            return Err(CrdtError::ElementTooLarge);
                        }
                        m.clear();
                        m.insert(dot, (now_ms, bytes.clone()));
                    }
                    (Value::Flag(s), FieldOp::Enable) => *s = BTreeSet::from([dot]),
                    (Value::Flag(s), FieldOp::Disable) => {
                        let context = need_context(&key.name)?;
                        s.retain(|d| !covers(context, d));
                        if !removals.covered {
                            let mut path = removals.path.clone();
                            path.push(key.clone());
                            removals.deferred.push((path, None));
                        }
                    }
                    (Value::Map(m), FieldOp::Update(inner)) => {
                        if depth >= MAX_MAP_DEPTH {
                            return Err(CrdtError::TooDeep);
                        }
                        removals.path.push(key.clone());
                        let applied = apply(m, inner, dot, (now_ms, depth + 1), removals);
                        removals.path.pop();
                        applied?;
                    }
                    (_, op) => {
                        return Err(CrdtError::WrongOp(format!(
                            "{op:?} on the {:?} field {:?}",
                            key.kind,
                            shown(&key.name)
                        )));
                    }
                }
            }
        }
    }
    fields.retain(|_, v| !v.is_empty());
    Ok(())
}

impl OrMap {
    /// Apply `ops` as one update by `actor` at `now_ms` (one dot for all of them); removes
    /// need `context`, the map's clock as a read saw it. All or nothing.
    pub fn update(
        &mut self,
        actor: ActorId,
        now_ms: u64,
        ops: &[MapOp],
        context: Option<&SetContext>,
    ) -> Result<(), CrdtError> {
        let mut next = self.clone();
        let covered = context.is_none_or(|c| super::deferred::dominated(c, &self.clock));
        let counter = next_counter(&mut next.clock, actor)?;
        let dot = Dot { actor, counter };
        let mut removals = Removals {
            context,
            covered,
            path: Vec::new(),
            deferred: Vec::new(),
        };
        apply(&mut next.fields, ops, dot, (now_ms, 1), &mut removals)?;
        if let Some(context) = context {
            for target in removals.deferred {
                super::deferred::defer(&mut next.deferred, context, target)?;
            }
        }
        *self = next;
        Ok(())
    }

    /// The fields and their values.
    pub fn read(&self) -> BTreeMap<FieldKey, FieldValue> {
        self.fields
            .iter()
            .map(|(k, v)| (k.clone(), v.read()))
            .collect()
    }

    /// The context a client keeps from a read, for later removes.
    pub fn context(&self) -> SetContext {
        self.clock.clone()
    }

    pub fn merge(&mut self, other: &OrMap) {
        self.fields = merge_fields(&self.fields, &self.clock, &other.fields, &other.clock);
        merge_clock(&mut self.clock, &other.clock);
        super::deferred::merge(&mut self.deferred, &other.deferred);
        let fields = &mut self.fields;
        super::deferred::apply(
            &mut self.deferred,
            &self.clock,
            |context, (path, element)| {
                reset_at(fields, (path, element.as_deref()), context);
            },
        );
    }

    /// Removals still waiting for updates this replica has not seen.
    pub fn deferred_removals(&self) -> usize {
        self.deferred.values().map(BTreeSet::len).sum()
    }
}

impl FieldKind {
    pub(super) fn code(self) -> u8 {
        match self {
            FieldKind::Counter => 0,
            FieldKind::Set => 1,
            FieldKind::Register => 2,
            FieldKind::Flag => 3,
            FieldKind::Map => 4,
        }
    }

    pub(super) fn of_code(code: u8) -> Result<FieldKind, DecodeError> {
        Ok(match code {
            0 => FieldKind::Counter,
            1 => FieldKind::Set,
            2 => FieldKind::Register,
            3 => FieldKind::Flag,
            4 => FieldKind::Map,
            _ => return Err(DecodeError::Invalid("unknown map field kind")),
        })
    }
}

fn encode_dot(w: &mut Writer, dot: &Dot) {
    w.u64_fixed(dot.actor.0);
    w.varint(dot.counter);
}

/// A dot the map's clock covers (anything else was not made by this map's updates).
fn decode_dot(r: &mut Reader<'_>, clock: &SetContext) -> Result<Dot, DecodeError> {
    let dot = Dot {
        actor: ActorId(r.u64_fixed()?),
        counter: r.varint()?,
    };
    if dot.counter == 0 || !covers(clock, &dot) {
        return Err(DecodeError::Invalid("a map dot its clock does not cover"));
    }
    Ok(dot)
}

fn encode_dots(w: &mut Writer, dots: &BTreeSet<Dot>) {
    w.varint(dots.len() as u64);
    for dot in dots {
        encode_dot(w, dot);
    }
}

fn decode_dots(r: &mut Reader<'_>, clock: &SetContext) -> Result<BTreeSet<Dot>, DecodeError> {
    let count = r.count(MAX_CRDT_ACTORS, "map dots")?;
    (0..count).map(|_| decode_dot(r, clock)).collect()
}

fn encode_fields(w: &mut Writer, fields: &BTreeMap<FieldKey, Value>) {
    w.varint(fields.len() as u64);
    for (key, value) in fields {
        w.bytes(&key.name);
        w.u8(key.kind.code());
        match value {
            Value::Counter(m) => {
                w.varint(m.len() as u64);
                for (dot, (inc, dec)) in m {
                    encode_dot(w, dot);
                    w.varint(*inc);
                    w.varint(*dec);
                }
            }
            Value::Set(m) => {
                w.varint(m.len() as u64);
                for (element, dots) in m {
                    w.bytes(element);
                    encode_dots(w, dots);
                }
            }
            Value::Register(m) => {
                w.varint(m.len() as u64);
                for (dot, (ts, bytes)) in m {
                    encode_dot(w, dot);
                    w.varint(*ts);
                    w.bytes(bytes);
                }
            }
            Value::Flag(s) => encode_dots(w, s),
            Value::Map(m) => encode_fields(w, m),
        }
    }
}

fn decode_fields(
    r: &mut Reader<'_>,
    clock: &SetContext,
    depth: usize,
) -> Result<BTreeMap<FieldKey, Value>, DecodeError> {
    if depth > MAX_MAP_DEPTH {
        return Err(DecodeError::Invalid("maps nested too deep"));
    }
    let count = r.count(MAX_MAP_FIELDS, "map fields")?;
    let mut fields = BTreeMap::new();
    for _ in 0..count {
        let name = r.bytes(MAX_ELEMENT_BYTES, "map field name")?.to_vec();
        let kind = FieldKind::of_code(r.u8()?)?;
        let value = match kind {
            FieldKind::Counter => {
                let n = r.count(MAX_CRDT_ACTORS, "counter contributions")?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let dot = decode_dot(r, clock)?;
                    m.insert(dot, (r.varint()?, r.varint()?));
                }
                Value::Counter(m)
            }
            FieldKind::Set => {
                let n = r.count(MAX_SET_ELEMENTS_MERGED, "map set elements")?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let element = r.bytes(MAX_ELEMENT_BYTES, "map set element")?.to_vec();
                    m.insert(element, decode_dots(r, clock)?);
                }
                Value::Set(m)
            }
            FieldKind::Register => {
                let n = r.count(MAX_CRDT_ACTORS, "register writes")?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let dot = decode_dot(r, clock)?;
                    let ts = r.varint()?;
                    m.insert(
                        dot,
                        (ts, r.bytes(MAX_REGISTER_BYTES, "register value")?.to_vec()),
                    );
                }
                Value::Register(m)
            }
            FieldKind::Flag => Value::Flag(decode_dots(r, clock)?),
            FieldKind::Map => Value::Map(decode_fields(r, clock, depth + 1)?),
        };
        if value.is_empty() || matches!(&value, Value::Set(m) if m.values().any(BTreeSet::is_empty))
        {
            return Err(DecodeError::Invalid("an empty map field"));
        }
        fields.insert(FieldKey { name, kind }, value);
    }
    Ok(fields)
}

impl OrMap {
    pub fn encode(&self, w: &mut Writer) {
        encode_context(w, &self.clock);
        encode_fields(w, &self.fields);
        super::deferred::encode(w, &self.deferred, |w, (path, element)| {
            w.varint(path.len() as u64);
            for key in path {
                w.bytes(&key.name);
                w.u8(key.kind.code());
            }
            match element {
                None => w.u8(0),
                Some(element) => {
                    w.u8(1);
                    w.bytes(element);
                }
            }
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<OrMap, DecodeError> {
        let clock = decode_context(r)?;
        let fields = decode_fields(r, &clock, 1)?;
        let deferred = super::deferred::decode(r, |r| {
            let depth = r.count(MAX_MAP_DEPTH, "deferred removal path")?;
            let mut path = Vec::with_capacity(depth);
            for _ in 0..depth {
                let name = r.bytes(MAX_ELEMENT_BYTES, "map field name")?.to_vec();
                path.push(FieldKey {
                    name,
                    kind: FieldKind::of_code(r.u8()?)?,
                });
            }
            let element = match r.u8()? {
                0 => None,
                1 => Some(r.bytes(MAX_ELEMENT_BYTES, "deferred element")?.to_vec()),
                _ => return Err(DecodeError::Invalid("bad deferred removal")),
            };
            Ok((path, element))
        })?;
        Ok(OrMap {
            clock,
            fields,
            deferred,
        })
    }
}
