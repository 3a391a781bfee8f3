//! Data types (counters, sets, maps, hlls, gsets) for HTTP and PB: a fetch is a quorum read of
//! the key's object whose live versions are merged (`crdt::merged_value`); an update is a put
//! whose content is the operation (`crdt::Update`), applied by the coordinating replica to
//! what it holds (`Replica::write`). Only the translation to and from each API's messages is
//! in `http::datatypes` and `pb::dt`.

use crate::view::Cluster;
use dynakv_core::bucket::{BucketProps, Quorum};
use dynakv_core::crdt::{self, Crdt, DataTypeKind, SetContext, Update};
use dynakv_core::message::WireContent;
use dynakv_core::object::Object;
use dynakv_core::replica::{Precondition, ReplicaError};
use dynakv_core::request::{PutOp, RequestError};
use std::sync::Arc;

/// A data type key as a client reads it.
#[derive(Debug)]
pub struct Fetched {
    pub kind: DataTypeKind,
    /// `None`: not found (never written, or deleted).
    pub value: Option<Crdt>,
    /// The context for later removals (sets and maps), when asked for.
    pub context: Option<String>,
}

/// The data type a bucket holds, or why a data type request cannot be made to it.
///
/// # Errors
/// The bucket's type has no `datatype`.
pub fn kind_of(props: &BucketProps, bucket: &str) -> Result<DataTypeKind, String> {
    props.datatype.ok_or_else(|| {
        let (bucket_type, name) = dynakv_core::bucket_types::split_bucket(bucket);
        format!(
            "bucket {name:?} of type {bucket_type:?} holds no data type: create a bucket type \
             with a datatype property (counter, set, map, hll or gset) and use its buckets"
        )
    })
}

/// A client's context of `bucket/key`, checked.
///
/// # Errors
/// The context was not issued by this cluster for this key, or is malformed.
pub fn client_context(
    cluster: &Cluster,
    bucket: &str,
    key: &str,
    text: &str,
) -> Result<SetContext, String> {
    dynakv_core::context::decode_datatype(cluster.secret(), bucket.as_bytes(), key.as_bytes(), text)
        .map_err(|e| format!("invalid context: {e}"))
}

fn read(
    cluster: &Cluster,
    (bucket, key): (&str, &str),
    kind: DataTypeKind,
    object: &Object,
    include_context: bool,
) -> Result<Fetched, RequestError> {
    let value = crdt::merged_value(object, kind)
        .map_err(|e| RequestError::Replica(ReplicaError::DataType(e)))?;
    let context = match (&value, include_context) {
        (Some(value), true) => value.context().map(|clock| {
            dynakv_core::context::encode_datatype(
                cluster.secret(),
                bucket.as_bytes(),
                key.as_bytes(),
                &clock,
            )
        }),
        _ => None,
    };
    Ok(Fetched {
        kind,
        value,
        context,
    })
}

/// A quorum read of a data type key (`r`, `pr`: `None` is the bucket's).
///
/// # Errors
/// The read failed, or a stored version is not a value of the bucket's type.
pub async fn fetch(
    cluster: &Arc<Cluster>,
    (bucket, key): (&str, &str),
    kind: DataTypeKind,
    (r, pr): (Option<Quorum>, Option<Quorum>),
    include_context: bool,
) -> Result<Fetched, RequestError> {
    let object = crate::requests::get(cluster, bucket, key, r, pr).await?;
    read(cluster, (bucket, key), kind, &object, include_context)
}

/// The quorums of an update (`None`: the bucket's).
#[derive(Debug, Clone, Copy, Default)]
pub struct UpdateQuorums {
    pub w: Option<Quorum>,
    pub pw: Option<Quorum>,
    pub dw_given: bool,
}

/// Apply `update` to `bucket/key` through a coordinating replica, and read back the value it
/// stored.
///
/// # Errors
/// The update was refused (a bound, a removal of what the context has not seen), or the
/// write failed.
pub async fn update(
    cluster: &Arc<Cluster>,
    (bucket, key): (&str, &str),
    update: &Update,
    quorums: UpdateQuorums,
    include_context: bool,
) -> Result<Fetched, RequestError> {
    update
        .check()
        .map_err(|e| RequestError::Replica(ReplicaError::DataType(e)))?;
    let op = PutOp {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        context: None,
        content: WireContent {
            value: update.encode(),
            content_type: crdt::DATATYPE_UPDATE_CONTENT_TYPE.to_owned(),
            meta: Vec::new(),
            deleted: false,
            indexes: Vec::new(),
            ttl_secs: None,
        },
        w: quorums.w,
        pw: quorums.pw,
        dw_given: quorums.dw_given,
        precondition: Precondition::None,
    };
    let stored = crate::requests::put(cluster, op, cluster.now_ms()).await?;
    read(
        cluster,
        (bucket, key),
        update.kind,
        &stored,
        include_context,
    )
}
