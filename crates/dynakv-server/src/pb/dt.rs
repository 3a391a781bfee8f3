//! Data types over PB: `DtFetchReq` (80) and `DtUpdateReq` (82), answered with `DtFetchResp`
//! (81) and `DtUpdateResp` (83). Each message is translated to the operation and read back
//! from the value that HTTP uses too (`crate::datatypes`).

use super::Session;
use super::kv::{Refusal, dw_given, quorum_field, within};
use crate::datatypes::{self, Fetched, UpdateQuorums};
use crate::http::objects::random_token;
use dynakv_core::crdt::{
    Crdt, DataTypeKind, FieldKey, FieldKind, FieldOp, FieldValue, MAX_MAP_DEPTH, MapOp, Op, Update,
};
use dynakv_core::security::Permission;
use dynakv_pb::dt::{
    DtFetchReq, DtFetchResp, DtOp, DtUpdateReq, DtUpdateResp, DtValue, MapEntry, MapField,
    data_type, flag_op, map_field_type,
};
use dynakv_pb::{code, encode_frame};
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A request's bucket, key and bucket type fields, as sent.
type RequestName = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);
/// A data type request's bucket (internal name), key, properties and data type.
type Named = (
    String,
    String,
    dynakv_core::bucket::BucketProps,
    DataTypeKind,
);

fn data_type_code(kind: DataTypeKind) -> i32 {
    match kind {
        DataTypeKind::Counter => data_type::COUNTER,
        DataTypeKind::Set => data_type::SET,
        DataTypeKind::Map => data_type::MAP,
        DataTypeKind::Hll => data_type::HLL,
        DataTypeKind::GSet => data_type::GSET,
    }
}

fn field_kind(code: Option<i32>) -> Result<FieldKind, Refusal> {
    Ok(match code {
        Some(map_field_type::COUNTER) => FieldKind::Counter,
        Some(map_field_type::SET) => FieldKind::Set,
        Some(map_field_type::REGISTER) => FieldKind::Register,
        Some(map_field_type::FLAG) => FieldKind::Flag,
        Some(map_field_type::MAP) => FieldKind::Map,
        Some(other) => return Err(format!("unknown map field type {other}")),
        None => return Err("a map field needs its type".to_owned()),
    })
}

fn field_code(kind: FieldKind) -> i32 {
    match kind {
        FieldKind::Counter => map_field_type::COUNTER,
        FieldKind::Set => map_field_type::SET,
        FieldKind::Register => map_field_type::REGISTER,
        FieldKind::Flag => map_field_type::FLAG,
        FieldKind::Map => map_field_type::MAP,
    }
}

fn field_key(field: Option<MapField>) -> Result<FieldKey, Refusal> {
    let field = field.ok_or("a map update needs its field")?;
    Ok(FieldKey {
        name: field.name.ok_or("a map field needs its name")?,
        kind: field_kind(field.r#type)?,
    })
}

/// A PB map operation as the core's (removes first, then updates, as Riak applies them).
fn map_ops(op: dynakv_pb::dt::MapOp, depth: usize) -> Result<Vec<MapOp>, Refusal> {
    if depth > MAX_MAP_DEPTH {
        return Err(format!("maps nest at most {MAX_MAP_DEPTH} deep"));
    }
    let mut ops = Vec::new();
    for field in op.removes {
        ops.push(MapOp::Remove(field_key(Some(field))?));
    }
    for update in op.updates {
        let key = field_key(update.field)?;
        let mismatch = || format!("the update of a {:?} field does not fit its type", key.kind);
        match key.kind {
            FieldKind::Counter => {
                let counter = update.counter_op.ok_or_else(mismatch)?;
                let delta = counter.increment.unwrap_or(1);
                ops.push(MapOp::Update(key, FieldOp::Increment(delta)));
            }
            FieldKind::Set => {
                let set = update.set_op.ok_or_else(mismatch)?;
                for element in set.removes {
                    ops.push(MapOp::Update(key.clone(), FieldOp::RemoveElement(element)));
                }
                for element in set.adds {
                    ops.push(MapOp::Update(key.clone(), FieldOp::Add(element)));
                }
            }
            FieldKind::Register => {
                let value = update.register_op.ok_or_else(mismatch)?;
                ops.push(MapOp::Update(key, FieldOp::Assign(value)));
            }
            FieldKind::Flag => {
                let op = match update.flag_op {
                    Some(flag_op::ENABLE) => FieldOp::Enable,
                    Some(flag_op::DISABLE) => FieldOp::Disable,
                    _ => return Err(mismatch()),
                };
                ops.push(MapOp::Update(key, op));
            }
            FieldKind::Map => {
                let inner = update.map_op.ok_or_else(mismatch)?;
                let inner = map_ops(*inner, depth + 1)?;
                ops.push(MapOp::Update(key, FieldOp::Update(inner)));
            }
        }
    }
    Ok(ops)
}

/// A `DtOp` as the core's operation on a `kind`.
fn operation(kind: DataTypeKind, op: DtOp) -> Result<Op, Refusal> {
    let wrong = || format!("the operation does not fit a {} bucket", kind.name());
    Ok(match kind {
        DataTypeKind::Counter => {
            Op::Counter(op.counter_op.ok_or_else(wrong)?.increment.unwrap_or(1))
        }
        DataTypeKind::Set => {
            let set = op.set_op.ok_or_else(wrong)?;
            Op::Set {
                add: set.adds,
                remove: set.removes,
            }
        }
        DataTypeKind::Map => Op::Map(map_ops(op.map_op.ok_or_else(wrong)?, 1)?),
        DataTypeKind::Hll => Op::Add(op.hll_op.ok_or_else(wrong)?.adds),
        DataTypeKind::GSet => Op::Add(op.gset_op.ok_or_else(wrong)?.adds),
    })
}

fn map_entries(fields: BTreeMap<FieldKey, FieldValue>) -> Vec<MapEntry> {
    fields
        .into_iter()
        .map(|(key, value)| {
            let mut entry = MapEntry {
                field: Some(MapField {
                    name: Some(key.name),
                    r#type: Some(field_code(key.kind)),
                }),
                ..MapEntry::default()
            };
            match value {
                FieldValue::Counter(n) => entry.counter_value = Some(n),
                FieldValue::Set(elements) => entry.set_value = elements,
                FieldValue::Register(bytes) => entry.register_value = Some(bytes),
                FieldValue::Flag(on) => entry.flag_value = Some(on),
                FieldValue::Map(inner) => entry.map_value = map_entries(inner),
            }
            entry
        })
        .collect()
}

fn value_of(value: &Crdt) -> DtValue {
    let mut out = DtValue::default();
    match value {
        Crdt::Counter(c) => out.counter_value = Some(c.value()),
        Crdt::Set(s) => out.set_value = s.elements().map(<[u8]>::to_vec).collect(),
        Crdt::Map(m) => out.map_value = map_entries(m.read()),
        Crdt::Hll(h) => out.hll_value = Some(h.estimate()),
        Crdt::GSet(g) => out.gset_value = g.elements().map(<[u8]>::to_vec).collect(),
    }
    out
}

impl Session {
    /// A request's data type bucket, key and properties (the type must hold one).
    fn datatype_object(
        &self,
        (bucket, key, bucket_type): RequestName,
        permission: Permission,
        n_val: Option<u32>,
        sloppy_quorum: Option<bool>,
    ) -> Result<Named, Refusal> {
        if bucket_type.is_none() {
            return Err("data types need a bucket type (the type field)".to_owned());
        }
        let (bucket, key, props) = self.object(
            (bucket, key, bucket_type.as_deref()),
            permission,
            (n_val, sloppy_quorum),
        )?;
        let kind = datatypes::kind_of(&props, &bucket)?;
        Ok((bucket, key, props, kind))
    }

    pub(super) async fn dt_fetch(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let request = DtFetchReq::decode(body).map_err(|e| format!("malformed DtFetchReq: {e}"))?;
        let (bucket, key, props, kind) = self.datatype_object(
            (request.bucket, request.key, request.r#type),
            Permission::Get,
            request.n_val,
            request.sloppy_quorum,
        )?;
        let r = quorum_field("r", request.r, &props)?;
        let pr = quorum_field("pr", request.pr, &props)?;
        let include_context = request.include_context.unwrap_or(true);
        let cluster = Arc::clone(&self.state.cluster);
        let fetched = within(request.timeout, async {
            datatypes::fetch(&cluster, (&bucket, &key), kind, (r, pr), include_context).await
        })
        .await??;
        let response = DtFetchResp {
            context: fetched.context.map(String::into_bytes),
            r#type: Some(data_type_code(kind)),
            value: fetched.value.as_ref().map(value_of),
        };
        encode_frame(out, code::DT_FETCH_RESP, &response);
        Ok(())
    }

    pub(super) async fn dt_update(
        &mut self,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let request =
            DtUpdateReq::decode(body).map_err(|e| format!("malformed DtUpdateReq: {e}"))?;
        let generated = request.key.is_none();
        let key = request.key.unwrap_or_else(|| random_token(22).into_bytes());
        let (bucket, key, props, kind) = self.datatype_object(
            (request.bucket, Some(key), request.r#type),
            Permission::Put,
            request.n_val,
            request.sloppy_quorum,
        )?;
        let op = operation(kind, request.op.ok_or("DtUpdateReq needs its op")?)?;
        let context = match request.context.filter(|c| !c.is_empty()) {
            None => None,
            Some(bytes) => {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| "invalid context: not one this cluster issued".to_owned())?;
                Some(datatypes::client_context(
                    &self.state.cluster,
                    &bucket,
                    &key,
                    text,
                )?)
            }
        };
        let update = Update { kind, op, context };
        let quorums = UpdateQuorums {
            w: quorum_field("w", request.w, &props)?,
            pw: quorum_field("pw", request.pw, &props)?,
            dw_given: dw_given(quorum_field("dw", request.dw, &props)?),
        };
        let include_context = request.include_context.unwrap_or(true);
        let cluster = Arc::clone(&self.state.cluster);
        let fetched: Fetched = within(request.timeout, async {
            datatypes::update(&cluster, (&bucket, &key), &update, quorums, include_context).await
        })
        .await??;
        let mut response = DtUpdateResp {
            key: generated.then(|| key.into_bytes()),
            ..DtUpdateResp::default()
        };
        if request.return_body == Some(true) {
            response.context = fetched.context.map(String::into_bytes);
            if let Some(value) = fetched.value.as_ref() {
                let value = value_of(value);
                response.counter_value = value.counter_value;
                response.set_value = value.set_value;
                response.map_value = value.map_value;
                response.hll_value = value.hll_value;
                response.gset_value = value.gset_value;
            }
        }
        encode_frame(out, code::DT_UPDATE_RESP, &response);
        Ok(())
    }
}
