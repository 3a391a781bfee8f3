//! A data type value as a key holds it ([`Crdt`]: one of the types, with a versioned
//! encoding), and Riak's HTTP JSON for operations and values.
//!
//! Operations (the body of `POST /types/T/buckets/B/datatypes/K`), as Riak's clients send them:
//! - counter: `{"increment": 5}`, `{"decrement": 2}` (a bare number in a map field);
//! - set: `{"add": "a"}`, `{"add_all": [..]}`, `{"remove": "a"}`, `{"remove_all": [..]}`;
//! - hll and gset: `{"add": ..}`, `{"add_all": [..]}`;
//! - map: `{"update": {"name_register": {"assign": "x"} | "x", "visits_counter": {"increment":
//!   1} | 1, "tags_set": {..}, "on_flag": "enable" | "disable", "sub_map": {"update": ..}},
//!   "remove": ["old_register"], "add": ["new_counter"]}`.
//!
//! A removal needs the `context` of a read (given apart, see the server); values are read as
//! `{"type": "counter", "value": 5}` and so on, a map's fields named `NAME_TYPE`.

use super::{
    CrdtError, FieldKey, FieldKind, FieldOp, FieldValue, GSet, Hll, MapOp, OrMap, OrSet, PnCounter,
    SetContext,
};
use crate::codec::{DecodeError, Reader, Writer};
use crate::version::ActorId;
use serde_json::{Map, Value, json};

/// The encoding's version byte.
const CRDT_FORMAT: u8 = 1;

/// Which data type a bucket type holds (its `datatype` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataTypeKind {
    Counter,
    Set,
    Map,
    Hll,
    GSet,
}

impl DataTypeKind {
    pub fn parse(name: &str) -> Option<DataTypeKind> {
        Some(match name {
            "counter" => DataTypeKind::Counter,
            "set" => DataTypeKind::Set,
            "map" => DataTypeKind::Map,
            "hll" => DataTypeKind::Hll,
            "gset" => DataTypeKind::GSet,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DataTypeKind::Counter => "counter",
            DataTypeKind::Set => "set",
            DataTypeKind::Map => "map",
            DataTypeKind::Hll => "hll",
            DataTypeKind::GSet => "gset",
        }
    }
}

/// One key's data type value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crdt {
    Counter(PnCounter),
    Set(OrSet),
    Map(OrMap),
    Hll(Hll),
    GSet(GSet),
}

/// An operation parsed from Riak's JSON, for one data type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Counter(i64),
    Set {
        add: Vec<Vec<u8>>,
        remove: Vec<Vec<u8>>,
    },
    Map(Vec<MapOp>),
    Add(Vec<Vec<u8>>),
}

fn bad(what: impl Into<String>) -> CrdtError {
    CrdtError::WrongOp(what.into())
}

impl Crdt {
    pub fn new(kind: DataTypeKind) -> Crdt {
        match kind {
            DataTypeKind::Counter => Crdt::Counter(PnCounter::default()),
            DataTypeKind::Set => Crdt::Set(OrSet::default()),
            DataTypeKind::Map => Crdt::Map(OrMap::default()),
            DataTypeKind::Hll => Crdt::Hll(Hll::default()),
            DataTypeKind::GSet => Crdt::GSet(GSet::default()),
        }
    }

    pub fn kind(&self) -> DataTypeKind {
        match self {
            Crdt::Counter(_) => DataTypeKind::Counter,
            Crdt::Set(_) => DataTypeKind::Set,
            Crdt::Map(_) => DataTypeKind::Map,
            Crdt::Hll(_) => DataTypeKind::Hll,
            Crdt::GSet(_) => DataTypeKind::GSet,
        }
    }

    /// Merge another replica's value of the same key; values of different types are not
    /// merged (a bucket's data type is fixed when its type is activated).
    pub fn merge(&mut self, other: &Crdt) -> Result<(), CrdtError> {
        match (self, other) {
            (Crdt::Counter(a), Crdt::Counter(b)) => a.merge(b),
            (Crdt::Set(a), Crdt::Set(b)) => a.merge(b),
            (Crdt::Map(a), Crdt::Map(b)) => a.merge(b),
            (Crdt::Hll(a), Crdt::Hll(b)) => a.merge(b),
            (Crdt::GSet(a), Crdt::GSet(b)) => a.merge(b),
            (a, b) => {
                return Err(bad(format!(
                    "a {} cannot merge with a {}",
                    a.kind().name(),
                    b.kind().name()
                )));
            }
        }
        Ok(())
    }

    /// Apply `op` as `actor` at `now_ms`; removals need `context`. All or nothing.
    pub fn apply(
        &mut self,
        actor: ActorId,
        now_ms: u64,
        op: &Op,
        context: Option<&SetContext>,
    ) -> Result<(), CrdtError> {
        // The common adds to a set are checked whole and applied in place, without the copy
        // that makes other operations all or nothing (a large set's copy costs as much as
        // its update).
        if let (Crdt::Set(set), Op::Set { add, remove }) = (&mut *self, op)
            && remove.is_empty()
            && set.can_add(actor, add).is_ok()
        {
            for element in add {
                set.add(actor, element)?;
            }
            return Ok(());
        }
        let mut next = self.clone();
        match (&mut next, op) {
            (Crdt::Counter(c), Op::Counter(delta)) => c.apply(actor, *delta)?,
            (Crdt::Set(s), Op::Set { add, remove }) => {
                if !remove.is_empty() {
                    let context = context.ok_or_else(|| {
                        CrdtError::NotPresent(String::from_utf8_lossy(&remove[0]).into_owned())
                    })?;
                    for element in remove {
                        s.remove(element, context)?;
                    }
                }
                for element in add {
                    s.add(actor, element)?;
                }
            }
            (Crdt::Map(m), Op::Map(ops)) => m.update(actor, now_ms, ops, context)?,
            (Crdt::Hll(h), Op::Add(elements)) => {
                for element in elements {
                    h.add(element)?;
                }
            }
            (Crdt::GSet(g), Op::Add(elements)) => {
                for element in elements {
                    g.add(element)?;
                }
            }
            (value, op) => {
                return Err(bad(format!("{op:?} on a {}", value.kind().name())));
            }
        }
        *self = next;
        Ok(())
    }

    /// The context a read gives for later removes (sets and maps; others have none).
    pub fn context(&self) -> Option<SetContext> {
        match self {
            Crdt::Set(s) => Some(s.context()),
            Crdt::Map(m) => Some(m.context()),
            _ => None,
        }
    }

    /// Riak's JSON of the value: `{"type": .., "value": ..}` (the context is the server's).
    pub fn to_json(&self) -> Value {
        let strings = |items: &mut dyn Iterator<Item = &[u8]>| -> Vec<Value> {
            items.map(|e| json!(String::from_utf8_lossy(e))).collect()
        };
        let value = match self {
            Crdt::Counter(c) => json!(c.value()),
            Crdt::Set(s) => json!(strings(&mut s.elements())),
            Crdt::GSet(g) => json!(strings(&mut g.elements())),
            Crdt::Hll(h) => json!(h.estimate()),
            Crdt::Map(m) => map_json(&m.read()),
        };
        json!({ "type": self.kind().name(), "value": value })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(CRDT_FORMAT);
        w.u8(super::update::kind_code(self.kind()));
        match self {
            Crdt::Counter(c) => c.encode(&mut w),
            Crdt::Set(s) => s.encode(&mut w),
            Crdt::Map(m) => m.encode(&mut w),
            Crdt::Hll(h) => h.encode(&mut w),
            Crdt::GSet(g) => g.encode(&mut w),
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Crdt, CrdtError> {
        let mut r = Reader::new(bytes);
        let format = r.u8()?;
        if format != CRDT_FORMAT {
            return Err(DecodeError::UnknownVersion(format).into());
        }
        let value = match super::update::kind_of_code(r.u8()?)? {
            DataTypeKind::Counter => Crdt::Counter(PnCounter::decode(&mut r)?),
            DataTypeKind::Set => Crdt::Set(OrSet::decode(&mut r)?),
            DataTypeKind::Map => Crdt::Map(OrMap::decode(&mut r)?),
            DataTypeKind::Hll => Crdt::Hll(Hll::decode(&mut r)?),
            DataTypeKind::GSet => Crdt::GSet(GSet::decode(&mut r)?),
        };
        r.finish()?;
        Ok(value)
    }
}

fn kind_suffix(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Counter => "counter",
        FieldKind::Set => "set",
        FieldKind::Register => "register",
        FieldKind::Flag => "flag",
        FieldKind::Map => "map",
    }
}

fn map_json(fields: &std::collections::BTreeMap<FieldKey, FieldValue>) -> Value {
    let mut out = Map::new();
    for (key, value) in fields {
        let name = format!(
            "{}_{}",
            String::from_utf8_lossy(&key.name),
            kind_suffix(key.kind)
        );
        let value = match value {
            FieldValue::Counter(n) => json!(n),
            FieldValue::Set(elements) => json!(
                elements
                    .iter()
                    .map(|e| String::from_utf8_lossy(e).into_owned())
                    .collect::<Vec<_>>()
            ),
            FieldValue::Register(bytes) => json!(String::from_utf8_lossy(bytes)),
            FieldValue::Flag(on) => json!(on),
            FieldValue::Map(inner) => map_json(inner),
        };
        out.insert(name, value);
    }
    Value::Object(out)
}

/// A map field's key from Riak's `NAME_TYPE`.
fn field_key(name: &str) -> Result<FieldKey, CrdtError> {
    let (field, kind) = name
        .rsplit_once('_')
        .ok_or_else(|| bad(format!("map field {name:?} has no _TYPE suffix")))?;
    let kind = match kind {
        "counter" => FieldKind::Counter,
        "set" => FieldKind::Set,
        "register" => FieldKind::Register,
        "flag" => FieldKind::Flag,
        "map" => FieldKind::Map,
        other => return Err(bad(format!("unknown map field type {other:?} in {name:?}"))),
    };
    Ok(FieldKey {
        name: field.as_bytes().to_vec(),
        kind,
    })
}

/// The strings of `"add"`/`"add_all"` (or the remove pair) in `body`.
fn elements(body: &Map<String, Value>, one: &str, all: &str) -> Result<Vec<Vec<u8>>, CrdtError> {
    let mut out = Vec::new();
    if let Some(value) = body.get(one) {
        let text = value
            .as_str()
            .ok_or_else(|| bad(format!("{one} takes a string")))?;
        out.push(text.as_bytes().to_vec());
    }
    if let Some(value) = body.get(all) {
        let items = value
            .as_array()
            .ok_or_else(|| bad(format!("{all} takes a list of strings")))?;
        for item in items {
            let text = item
                .as_str()
                .ok_or_else(|| bad(format!("{all} takes a list of strings")))?;
            out.push(text.as_bytes().to_vec());
        }
    }
    Ok(out)
}

/// Refuse keys of an operation object other than `allowed` (so a typo is not ignored).
fn only(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), CrdtError> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown operation {k:?} (expected one of {allowed:?})"
        ))),
        None => Ok(()),
    }
}

fn counter_delta(value: &Value) -> Result<i64, CrdtError> {
    if let Some(n) = value.as_i64() {
        return Ok(n);
    }
    let body = value
        .as_object()
        .ok_or_else(|| bad("a counter takes {\"increment\": N} or {\"decrement\": N}"))?;
    only(body, &["increment", "decrement"])?;
    let get = |k: &str| {
        body.get(k).map(|v| {
            v.as_i64()
                .ok_or_else(|| bad(format!("{k} takes an integer")))
        })
    };
    match (get("increment"), get("decrement")) {
        (Some(n), None) => n,
        (None, Some(n)) => n?.checked_neg().ok_or(CrdtError::Overflow),
        _ => Err(bad("a counter takes one of increment or decrement")),
    }
}

/// Parse Riak's JSON operation for a value of `kind` (the top-level `context` key, if any,
/// is the caller's).
pub fn parse_op(kind: DataTypeKind, body: &Value) -> Result<Op, CrdtError> {
    let object = body.as_object();
    let strip = |allowed: &[&str]| -> Result<Map<String, Value>, CrdtError> {
        let mut object = object
            .cloned()
            .ok_or_else(|| bad("the operation is a JSON object"))?;
        object.remove("context");
        only(&object, allowed)?;
        Ok(object)
    };
    Ok(match kind {
        DataTypeKind::Counter => {
            let mut object = object
                .cloned()
                .ok_or_else(|| bad("the operation is a JSON object"))?;
            object.remove("context");
            Op::Counter(counter_delta(&Value::Object(object))?)
        }
        DataTypeKind::Set => {
            let body = strip(&["add", "add_all", "remove", "remove_all"])?;
            Op::Set {
                add: elements(&body, "add", "add_all")?,
                remove: elements(&body, "remove", "remove_all")?,
            }
        }
        DataTypeKind::Hll | DataTypeKind::GSet => {
            let body = strip(&["add", "add_all"])?;
            Op::Add(elements(&body, "add", "add_all")?)
        }
        DataTypeKind::Map => Op::Map(map_ops(&strip(&["update", "remove", "add"])?)?),
    })
}

fn map_ops(body: &Map<String, Value>) -> Result<Vec<MapOp>, CrdtError> {
    let mut ops = Vec::new();
    for listed in ["remove", "add"] {
        if let Some(value) = body.get(listed) {
            let names = value
                .as_array()
                .ok_or_else(|| bad(format!("{listed} takes a list of field names")))?;
            for name in names {
                let name = name
                    .as_str()
                    .ok_or_else(|| bad(format!("{listed} takes a list of field names")))?;
                let key = field_key(name)?;
                if listed == "remove" {
                    ops.push(MapOp::Remove(key));
                } else if key.kind == FieldKind::Counter {
                    // Riak's "add" makes an empty field; of the empty fields only a counter
                    // (at 0) holds something a map keeps, the others appear once updated.
                    ops.push(MapOp::Update(key, FieldOp::Increment(0)));
                }
            }
        }
    }
    if let Some(update) = body.get("update") {
        let fields = update
            .as_object()
            .ok_or_else(|| bad("update takes an object of fields"))?;
        for (name, op) in fields {
            let key = field_key(name)?;
            let op = match key.kind {
                FieldKind::Counter => FieldOp::Increment(counter_delta(op)?),
                FieldKind::Register => match op {
                    Value::String(s) => FieldOp::Assign(s.as_bytes().to_vec()),
                    Value::Object(o) => {
                        only(o, &["assign"])?;
                        let s = o
                            .get("assign")
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad("a register takes {\"assign\": \"...\"}"))?;
                        FieldOp::Assign(s.as_bytes().to_vec())
                    }
                    _ => return Err(bad("a register takes a string")),
                },
                FieldKind::Flag => match op.as_str() {
                    Some("enable") => FieldOp::Enable,
                    Some("disable") => FieldOp::Disable,
                    _ => return Err(bad("a flag takes \"enable\" or \"disable\"")),
                },
                FieldKind::Set => {
                    let body = op
                        .as_object()
                        .ok_or_else(|| bad("a set field takes an object of operations"))?;
                    only(body, &["add", "add_all", "remove", "remove_all"])?;
                    let mut pushed = false;
                    for element in elements(body, "remove", "remove_all")? {
                        ops.push(MapOp::Update(key.clone(), FieldOp::RemoveElement(element)));
                        pushed = true;
                    }
                    for element in elements(body, "add", "add_all")? {
                        ops.push(MapOp::Update(key.clone(), FieldOp::Add(element)));
                        pushed = true;
                    }
                    if !pushed {
                        return Err(bad("a set field update adds or removes something"));
                    }
                    continue;
                }
                FieldKind::Map => {
                    let body = op
                        .as_object()
                        .ok_or_else(|| bad("a map field takes an object of operations"))?;
                    only(body, &["update", "remove", "add"])?;
                    FieldOp::Update(map_ops(body)?)
                }
            };
            ops.push(MapOp::Update(key, op));
        }
    }
    Ok(ops)
}
