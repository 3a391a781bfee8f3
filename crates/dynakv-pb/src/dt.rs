//! The data type messages of Riak's PB API (`riak_dt.proto`): fetch and update of counters,
//! sets, maps, hlls and gsets (codes 80-83). Every field is an `Option` or a `Vec`, as in
//! `messages`; a required one missing is answered with an error by the server.

#![allow(clippy::derive_partial_eq_without_eq)]

/// `MapField.MapFieldType`.
pub mod map_field_type {
    pub const COUNTER: i32 = 1;
    pub const SET: i32 = 2;
    pub const REGISTER: i32 = 3;
    pub const FLAG: i32 = 4;
    pub const MAP: i32 = 5;
}

/// `DtFetchResp.DataType`.
pub mod data_type {
    pub const COUNTER: i32 = 1;
    pub const SET: i32 = 2;
    pub const MAP: i32 = 3;
    pub const HLL: i32 = 4;
    pub const GSET: i32 = 5;
}

/// `MapUpdate.FlagOp`.
pub mod flag_op {
    pub const ENABLE: i32 = 1;
    pub const DISABLE: i32 = 2;
}

/// A map field's name and type.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MapField {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub name: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "2")]
    pub r#type: Option<i32>,
}

/// A map field and its value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MapEntry {
    #[prost(message, optional, tag = "1")]
    pub field: Option<MapField>,
    #[prost(sint64, optional, tag = "2")]
    pub counter_value: Option<i64>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub set_value: Vec<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub register_value: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "5")]
    pub flag_value: Option<bool>,
    #[prost(message, repeated, tag = "6")]
    pub map_value: Vec<MapEntry>,
}

/// Code 80.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DtFetchReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "4")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "5")]
    pub pr: Option<u32>,
    #[prost(bool, optional, tag = "6")]
    pub basic_quorum: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub notfound_ok: Option<bool>,
    #[prost(uint32, optional, tag = "8")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "9")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "10")]
    pub n_val: Option<u32>,
    #[prost(bool, optional, tag = "11")]
    pub include_context: Option<bool>,
}

/// A data type's value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DtValue {
    #[prost(sint64, optional, tag = "1")]
    pub counter_value: Option<i64>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub set_value: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "3")]
    pub map_value: Vec<MapEntry>,
    #[prost(uint64, optional, tag = "4")]
    pub hll_value: Option<u64>,
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub gset_value: Vec<Vec<u8>>,
}

/// Code 81.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DtFetchResp {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub context: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "2")]
    pub r#type: Option<i32>,
    #[prost(message, optional, tag = "3")]
    pub value: Option<DtValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CounterOp {
    #[prost(sint64, optional, tag = "1")]
    pub increment: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetOp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub adds: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub removes: Vec<Vec<u8>>,
}

/// An hll's or a gset's adds (`HllOp`, `GSetOp`: the same one field).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddsOp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub adds: Vec<Vec<u8>>,
}

/// One field's update in a map.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MapUpdate {
    #[prost(message, optional, tag = "1")]
    pub field: Option<MapField>,
    #[prost(message, optional, tag = "2")]
    pub counter_op: Option<CounterOp>,
    #[prost(message, optional, tag = "3")]
    pub set_op: Option<SetOp>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub register_op: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "5")]
    pub flag_op: Option<i32>,
    #[prost(message, optional, boxed, tag = "6")]
    pub map_op: Option<Box<MapOp>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MapOp {
    #[prost(message, repeated, tag = "1")]
    pub removes: Vec<MapField>,
    #[prost(message, repeated, tag = "2")]
    pub updates: Vec<MapUpdate>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DtOp {
    #[prost(message, optional, tag = "1")]
    pub counter_op: Option<CounterOp>,
    #[prost(message, optional, tag = "2")]
    pub set_op: Option<SetOp>,
    #[prost(message, optional, tag = "3")]
    pub map_op: Option<MapOp>,
    #[prost(message, optional, tag = "4")]
    pub hll_op: Option<AddsOp>,
    #[prost(message, optional, tag = "5")]
    pub gset_op: Option<AddsOp>,
}

/// Code 82.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DtUpdateReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub context: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub op: Option<DtOp>,
    #[prost(uint32, optional, tag = "6")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "7")]
    pub dw: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub pw: Option<u32>,
    #[prost(bool, optional, tag = "9")]
    pub return_body: Option<bool>,
    #[prost(uint32, optional, tag = "10")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "11")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub n_val: Option<u32>,
    #[prost(bool, optional, tag = "13")]
    pub include_context: Option<bool>,
}

/// Code 83.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DtUpdateResp {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub context: Option<Vec<u8>>,
    #[prost(sint64, optional, tag = "3")]
    pub counter_value: Option<i64>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub set_value: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "5")]
    pub map_value: Vec<MapEntry>,
    #[prost(uint64, optional, tag = "6")]
    pub hll_value: Option<u64>,
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub gset_value: Vec<Vec<u8>>,
}
