//! The messages of Riak's PB API that dynakv reads or writes (`riak.proto`, `riak_kv.proto`).
//! Field names and numbers are Riak's; see the crate's documentation for why every field is
//! an `Option`.

#![allow(clippy::derive_partial_eq_without_eq)]

/// Code 0.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbErrorResp {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub errmsg: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "2")]
    pub errcode: Option<u32>,
}

/// Code 4.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetClientIdResp {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub client_id: Option<Vec<u8>>,
}

/// Code 5.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbSetClientIdReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub client_id: Option<Vec<u8>>,
}

/// Code 8.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetServerInfoResp {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub node: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub server_version: Option<Vec<u8>>,
}

/// A key/value pair: user metadata and index entries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbPair {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
}

/// A Riak link (dynakv keeps none; links sent are refused).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbLink {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub tag: Option<Vec<u8>>,
}

/// One sibling's value and metadata.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbContent {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub value: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub content_type: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub charset: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub content_encoding: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub vtag: Option<Vec<u8>>,
    #[prost(message, repeated, tag = "6")]
    pub links: Vec<RpbLink>,
    #[prost(uint32, optional, tag = "7")]
    pub last_mod: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub last_mod_usecs: Option<u32>,
    #[prost(message, repeated, tag = "9")]
    pub usermeta: Vec<RpbPair>,
    #[prost(message, repeated, tag = "10")]
    pub indexes: Vec<RpbPair>,
    #[prost(bool, optional, tag = "11")]
    pub deleted: Option<bool>,
}

/// Code 9.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "3")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    pub pr: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub basic_quorum: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub notfound_ok: Option<bool>,
    #[prost(bytes = "vec", optional, tag = "7")]
    pub if_modified: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "8")]
    pub head: Option<bool>,
    #[prost(bool, optional, tag = "9")]
    pub deletedvclock: Option<bool>,
    #[prost(uint32, optional, tag = "10")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "11")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub n_val: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "13")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 10.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetResp {
    #[prost(message, repeated, tag = "1")]
    pub content: Vec<RpbContent>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub vclock: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub unchanged: Option<bool>,
}

/// Code 11.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbPutReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub vclock: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    pub content: Option<RpbContent>,
    #[prost(uint32, optional, tag = "5")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub dw: Option<u32>,
    #[prost(bool, optional, tag = "7")]
    pub return_body: Option<bool>,
    #[prost(uint32, optional, tag = "8")]
    pub pw: Option<u32>,
    #[prost(bool, optional, tag = "9")]
    pub if_not_modified: Option<bool>,
    #[prost(bool, optional, tag = "10")]
    pub if_none_match: Option<bool>,
    #[prost(bool, optional, tag = "11")]
    pub return_head: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "13")]
    pub asis: Option<bool>,
    #[prost(bool, optional, tag = "14")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "15")]
    pub n_val: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "16")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 12.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbPutResp {
    #[prost(message, repeated, tag = "1")]
    pub content: Vec<RpbContent>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub vclock: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub key: Option<Vec<u8>>,
}

/// Code 13.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbDelReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "3")]
    pub rw: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub vclock: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "5")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "7")]
    pub pr: Option<u32>,
    #[prost(uint32, optional, tag = "8")]
    pub pw: Option<u32>,
    #[prost(uint32, optional, tag = "9")]
    pub dw: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "11")]
    pub sloppy_quorum: Option<bool>,
    #[prost(uint32, optional, tag = "12")]
    pub n_val: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "13")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 15.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbListBucketsReq {
    #[prost(uint32, optional, tag = "1")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub stream: Option<bool>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 16.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbListBucketsResp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub buckets: Vec<Vec<u8>>,
    #[prost(bool, optional, tag = "2")]
    pub done: Option<bool>,
}

/// Code 17.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbListKeysReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "2")]
    pub timeout: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 18.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbListKeysResp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub keys: Vec<Vec<u8>>,
    #[prost(bool, optional, tag = "2")]
    pub done: Option<bool>,
}

/// Code 25: a secondary index query (`qtype` 0: exact `key`; 1: `range_min`..`range_max`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbIndexReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub index: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "3")]
    pub qtype: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub range_min: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "6")]
    pub range_max: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "7")]
    pub return_terms: Option<bool>,
    #[prost(bool, optional, tag = "8")]
    pub stream: Option<bool>,
    #[prost(uint32, optional, tag = "9")]
    pub max_results: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "10")]
    pub continuation: Option<Vec<u8>>,
    #[prost(uint32, optional, tag = "11")]
    pub timeout: Option<u32>,
    #[prost(bytes = "vec", optional, tag = "12")]
    pub r#type: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "13")]
    pub term_regex: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "14")]
    pub pagination_sort: Option<bool>,
    #[prost(bytes = "vec", optional, tag = "15")]
    pub cover_context: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "16")]
    pub return_body: Option<bool>,
}

/// Code 26.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbIndexResp {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub keys: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    pub results: Vec<RpbPair>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub continuation: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    pub done: Option<bool>,
}

/// Code 19.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetBucketReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 20 (also the answer to code 31).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetBucketResp {
    #[prost(message, optional, tag = "1")]
    pub props: Option<RpbBucketProps>,
}

/// Code 21.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbSetBucketReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(message, optional, tag = "2")]
    pub props: Option<RpbBucketProps>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 29.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbResetBucketReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 31.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetBucketTypeReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub r#type: Option<Vec<u8>>,
}

/// Code 32.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbSetBucketTypeReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub r#type: Option<Vec<u8>>,
    #[prost(message, optional, tag = "2")]
    pub props: Option<RpbBucketProps>,
}

/// Code 33.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetBucketKeyPreflistReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub bucket: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub r#type: Option<Vec<u8>>,
}

/// One replica of a key's preference list.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbBucketKeyPreflistItem {
    #[prost(int64, optional, tag = "1")]
    pub partition: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub node: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub primary: Option<bool>,
}

/// Code 34.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbGetBucketKeyPreflistResp {
    #[prost(message, repeated, tag = "1")]
    pub preflist: Vec<RpbBucketKeyPreflistItem>,
}

/// An Erlang module and function (commit hooks, key and link functions).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbModFun {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub module: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub function: Option<Vec<u8>>,
}

/// A commit hook (dynakv runs none; only an empty list is accepted).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbCommitHook {
    #[prost(message, optional, tag = "1")]
    pub modfun: Option<RpbModFun>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub name: Option<Vec<u8>>,
}

/// Bucket (and bucket type) properties.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbBucketProps {
    #[prost(uint32, optional, tag = "1")]
    pub n_val: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub allow_mult: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    pub last_write_wins: Option<bool>,
    #[prost(message, repeated, tag = "4")]
    pub precommit: Vec<RpbCommitHook>,
    #[prost(bool, optional, tag = "5")]
    pub has_precommit: Option<bool>,
    #[prost(message, repeated, tag = "6")]
    pub postcommit: Vec<RpbCommitHook>,
    #[prost(bool, optional, tag = "7")]
    pub has_postcommit: Option<bool>,
    #[prost(message, optional, tag = "8")]
    pub chash_keyfun: Option<RpbModFun>,
    #[prost(message, optional, tag = "9")]
    pub linkfun: Option<RpbModFun>,
    #[prost(uint32, optional, tag = "10")]
    pub old_vclock: Option<u32>,
    #[prost(uint32, optional, tag = "11")]
    pub young_vclock: Option<u32>,
    #[prost(uint32, optional, tag = "12")]
    pub big_vclock: Option<u32>,
    #[prost(uint32, optional, tag = "13")]
    pub small_vclock: Option<u32>,
    #[prost(uint32, optional, tag = "14")]
    pub pr: Option<u32>,
    #[prost(uint32, optional, tag = "15")]
    pub r: Option<u32>,
    #[prost(uint32, optional, tag = "16")]
    pub w: Option<u32>,
    #[prost(uint32, optional, tag = "17")]
    pub pw: Option<u32>,
    #[prost(uint32, optional, tag = "18")]
    pub dw: Option<u32>,
    #[prost(uint32, optional, tag = "19")]
    pub rw: Option<u32>,
    #[prost(bool, optional, tag = "20")]
    pub basic_quorum: Option<bool>,
    #[prost(bool, optional, tag = "21")]
    pub notfound_ok: Option<bool>,
    #[prost(bytes = "vec", optional, tag = "22")]
    pub backend: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "23")]
    pub search: Option<bool>,
    /// `RpbReplMode`: 0 false, 1 realtime, 2 fullsync, 3 true.
    #[prost(int32, optional, tag = "24")]
    pub repl: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "25")]
    pub search_index: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "26")]
    pub datatype: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "27")]
    pub consistent: Option<bool>,
    #[prost(bool, optional, tag = "28")]
    pub write_once: Option<bool>,
    #[prost(uint32, optional, tag = "29")]
    pub hll_precision: Option<u32>,
}

/// Code 253.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpbAuthReq {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub user: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub password: Option<Vec<u8>>,
}
