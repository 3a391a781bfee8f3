//! A data type key as the object machinery stores it, and an update as it travels to the
//! replica that applies it.
//!
//! A data type value is stored as an ordinary [`Object`] whose siblings each hold a
//! [`Crdt::encode`] (content type [`DATATYPE_CONTENT_TYPE`]). Replication, read repair, hinted
//! handoff and anti-entropy move and `sync` these objects as they do any other, so every
//! mechanism that keeps a plain value keeps a data type. The value of the key is the CRDT merge
//! of its live siblings ([`merged_value`]): two updates coordinated concurrently on two replicas
//! become two siblings, which readers merge and the next update replaces by their merge (its
//! context is the whole clock the coordinator holds). No client ever sees a sibling.
//!
//! A sibling's dot names one content, whatever replica holds it: a merge of siblings is only
//! ever stored under a new dot (an update), never under an existing one, so `Object::sync`
//! (which keeps one copy of a dot) loses nothing.
//!
//! An update ([`Update`]) travels from the client's node to the coordinating replica as the
//! content of an ordinary put, typed [`DATATYPE_UPDATE_CONTENT_TYPE`]; the replica reads its
//! stored value, applies the operation as its actor, and stores the result
//! ([`apply_update`]), all under its write lock.

use super::{
    Crdt, CrdtError, DataTypeKind, FieldKey, FieldKind, FieldOp, MapOp, Op, SetContext,
    decode_context, encode_context,
};
use crate::codec::{DecodeError, Reader, Writer};
use crate::object::Object;
use crate::version::ActorId;

/// The content type of a stored data type value.
pub const DATATYPE_CONTENT_TYPE: &str = "application/x-dynakv-datatype";
/// The content type of an update on its way to the coordinating replica.
pub const DATATYPE_UPDATE_CONTENT_TYPE: &str = "application/x-dynakv-datatype-update";
/// Most operations one update carries (map field operations counted one by one, nested ones
/// included).
pub const MAX_UPDATE_OPS: usize = 4096;

const UPDATE_FORMAT: u8 = 1;

/// One client update of a data type key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub kind: DataTypeKind,
    pub op: Op,
    /// The context of the read the client made (needed by removals).
    pub context: Option<SetContext>,
}

pub(super) fn kind_code(kind: DataTypeKind) -> u8 {
    match kind {
        DataTypeKind::Counter => 0,
        DataTypeKind::Set => 1,
        DataTypeKind::Map => 2,
        DataTypeKind::Hll => 3,
        DataTypeKind::GSet => 4,
    }
}

pub(super) fn kind_of_code(code: u8) -> Result<DataTypeKind, DecodeError> {
    Ok(match code {
        0 => DataTypeKind::Counter,
        1 => DataTypeKind::Set,
        2 => DataTypeKind::Map,
        3 => DataTypeKind::Hll,
        4 => DataTypeKind::GSet,
        _ => return Err(DecodeError::Invalid("unknown data type")),
    })
}

fn encode_elements(w: &mut Writer, elements: &[Vec<u8>]) {
    w.varint(elements.len() as u64);
    for element in elements {
        w.bytes(element);
    }
}

/// Elements of one list, counted against the update's `budget` of operations.
fn decode_elements(r: &mut Reader<'_>, budget: &mut usize) -> Result<Vec<Vec<u8>>, DecodeError> {
    let count = r.count(*budget, "update operations")?;
    *budget -= count;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(r.bytes(super::MAX_ELEMENT_BYTES, "element")?.to_vec());
    }
    Ok(out)
}

fn encode_map_ops(w: &mut Writer, ops: &[MapOp]) {
    w.varint(ops.len() as u64);
    for op in ops {
        let (tag, key) = match op {
            MapOp::Remove(key) => (0, key),
            MapOp::Update(key, _) => (1, key),
        };
        w.u8(tag);
        w.u8(key.kind.code());
        w.bytes(&key.name);
        if let MapOp::Update(_, op) = op {
            match op {
                FieldOp::Increment(n) => {
                    w.u8(0);
                    w.u64_fixed(n.cast_unsigned());
                }
                FieldOp::Add(e) => {
                    w.u8(1);
                    w.bytes(e);
                }
                FieldOp::RemoveElement(e) => {
                    w.u8(2);
                    w.bytes(e);
                }
                FieldOp::Assign(v) => {
                    w.u8(3);
                    w.bytes(v);
                }
                FieldOp::Enable => w.u8(4),
                FieldOp::Disable => w.u8(5),
                FieldOp::Update(inner) => {
                    w.u8(6);
                    encode_map_ops(w, inner);
                }
            }
        }
    }
}

fn decode_map_ops(
    r: &mut Reader<'_>,
    budget: &mut usize,
    depth: usize,
) -> Result<Vec<MapOp>, DecodeError> {
    if depth > super::MAX_MAP_DEPTH {
        return Err(DecodeError::LimitExceeded("map depth"));
    }
    let count = r.count(*budget, "update operations")?;
    *budget -= count;
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let tag = r.u8()?;
        let kind = FieldKind::of_code(r.u8()?)?;
        let name = r.bytes(super::MAX_ELEMENT_BYTES, "field name")?.to_vec();
        let key = FieldKey { name, kind };
        ops.push(match tag {
            0 => MapOp::Remove(key),
            1 => {
                let op = match r.u8()? {
                    0 => FieldOp::Increment(r.u64_fixed()?.cast_signed()),
                    1 => FieldOp::Add(r.bytes(super::MAX_ELEMENT_BYTES, "element")?.to_vec()),
                    2 => FieldOp::RemoveElement(
                        r.bytes(super::MAX_ELEMENT_BYTES, "element")?.to_vec(),
                    ),
                    3 => FieldOp::Assign(r.bytes(super::MAX_REGISTER_BYTES, "register")?.to_vec()),
                    4 => FieldOp::Enable,
                    5 => FieldOp::Disable,
                    6 => FieldOp::Update(decode_map_ops(r, budget, depth + 1)?),
                    _ => return Err(DecodeError::Invalid("unknown map field operation")),
                };
                MapOp::Update(key, op)
            }
            _ => return Err(DecodeError::Invalid("unknown map operation")),
        });
    }
    Ok(ops)
}

fn check_map_ops(ops: &[MapOp], depth: usize) -> Result<(), CrdtError> {
    if depth > super::MAX_MAP_DEPTH {
        return Err(CrdtError::TooDeep);
    }
    for op in ops {
        let (MapOp::Remove(key) | MapOp::Update(key, _)) = op;
        super::check_element(&key.name)?;
        match op {
            MapOp::Update(_, FieldOp::Add(e) | FieldOp::RemoveElement(e)) => {
                super::check_element(e)?;
            }
            MapOp::Update(_, FieldOp::Assign(v)) if v.len() > super::MAX_REGISTER_BYTES => {
                return Err(CrdtError::ElementTooLarge);
            }
            MapOp::Update(_, FieldOp::Update(inner)) => check_map_ops(inner, depth + 1)?,
            _ => {}
        }
    }
    Ok(())
}

/// How many operations `ops` holds, nested ones included.
fn map_op_count(ops: &[MapOp]) -> usize {
    ops.iter()
        .map(|op| match op {
            MapOp::Update(_, FieldOp::Update(inner)) => 1usize.saturating_add(map_op_count(inner)),
            _ => 1,
        })
        .fold(0, usize::saturating_add)
}

impl Update {
    /// How many operations this update holds (each element, each map field operation).
    pub fn op_count(&self) -> usize {
        match &self.op {
            Op::Counter(_) => 1,
            Op::Set { add, remove } => add.len().saturating_add(remove.len()),
            Op::Add(elements) => elements.len(),
            Op::Map(ops) => map_op_count(ops),
        }
    }

    /// Refuse an update past [`MAX_UPDATE_OPS`], or with an element, a field name or a
    /// register past its bound (before it is sent anywhere).
    pub fn check(&self) -> Result<(), CrdtError> {
        if self.op_count() > MAX_UPDATE_OPS {
            return Err(CrdtError::WrongOp(format!(
                "an update carries at most {MAX_UPDATE_OPS} operations"
            )));
        }
        match &self.op {
            Op::Counter(_) => Ok(()),
            Op::Set { add, remove } => add
                .iter()
                .chain(remove)
                .try_for_each(|e| super::check_element(e)),
            Op::Add(elements) => elements.iter().try_for_each(|e| super::check_element(e)),
            Op::Map(ops) => check_map_ops(ops, 1),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(UPDATE_FORMAT);
        w.u8(kind_code(self.kind));
        match &self.context {
            None => w.u8(0),
            Some(context) => {
                w.u8(1);
                encode_context(&mut w, context);
            }
        }
        match &self.op {
            Op::Counter(n) => {
                w.u8(0);
                w.u64_fixed(n.cast_unsigned());
            }
            Op::Set { add, remove } => {
                w.u8(1);
                encode_elements(&mut w, add);
                encode_elements(&mut w, remove);
            }
            Op::Map(ops) => {
                w.u8(2);
                encode_map_ops(&mut w, ops);
            }
            Op::Add(elements) => {
                w.u8(3);
                encode_elements(&mut w, elements);
            }
        }
        w.buf
    }

    /// Decode what [`Update::encode`] wrote (from a peer: bounded, never panics).
    pub fn decode(bytes: &[u8]) -> Result<Update, CrdtError> {
        let mut r = Reader::new(bytes);
        let format = r.u8()?;
        if format != UPDATE_FORMAT {
            return Err(DecodeError::UnknownVersion(format).into());
        }
        let kind = kind_of_code(r.u8()?)?;
        let context = match r.u8()? {
            0 => None,
            1 => Some(decode_context(&mut r)?),
            _ => return Err(DecodeError::Invalid("bad context flag").into()),
        };
        let mut budget = MAX_UPDATE_OPS;
        let op = match r.u8()? {
            0 => Op::Counter(r.u64_fixed()?.cast_signed()),
            1 => Op::Set {
                add: decode_elements(&mut r, &mut budget)?,
                remove: decode_elements(&mut r, &mut budget)?,
            },
            2 => Op::Map(decode_map_ops(&mut r, &mut budget, 1)?),
            3 => Op::Add(decode_elements(&mut r, &mut budget)?),
            _ => return Err(DecodeError::Invalid("unknown data type operation").into()),
        };
        r.finish()?;
        Ok(Update { kind, op, context })
    }
}

/// The value of a data type key: the merge of its live siblings (`None` when it has none:
/// never written, or deleted). A sibling that is not a value of `kind` is an error, not
/// skipped: a reader must not be shown part of a value.
pub fn merged_value(object: &Object, kind: DataTypeKind) -> Result<Option<Crdt>, CrdtError> {
    let mut value: Option<Crdt> = None;
    for sibling in object.live_siblings() {
        let crdt = Crdt::decode(&sibling.content.value)?;
        if crdt.kind() != kind {
            return Err(CrdtError::WrongOp(format!(
                "the key holds a {}, not a {}",
                crdt.kind().name(),
                kind.name()
            )));
        }
        match &mut value {
            None => value = Some(crdt),
            Some(merged) => merged.merge(&crdt)?,
        }
    }
    Ok(value)
}

/// The value `update` makes of `stored` when applied by `actor` at `now_ms` (all or nothing;
/// a removal of what the context has not seen is refused with [`CrdtError::NotPresent`]).
pub fn apply_update(
    stored: &Object,
    update: &Update,
    actor: ActorId,
    now_ms: u64,
) -> Result<Crdt, CrdtError> {
    update.check()?;
    let mut value = merged_value(stored, update.kind)?.unwrap_or_else(|| Crdt::new(update.kind));
    // Without a context, a removal removes what this replica has seen (as Riak does); the
    // context of a client's read is safer, since it removes only what that client saw.
    let context = update.context.clone().or_else(|| value.context());
    value.apply(actor, now_ms, &update.op, context.as_ref())?;
    Ok(value)
}
