//! Bucket properties over PB: `RpbBucketProps` to and from the properties HTTP reads and
//! writes. A set goes through the same `BucketProps::apply` as HTTP's JSON (so the same
//! checks); the properties Riak has and dynakv does not serve are accepted only when they
//! ask for what dynakv does, and refused otherwise with a reason.

use super::Session;
use super::kv::{Refusal, bucket_name, pb_quorum, type_name};
use dynakv_core::bucket::{BucketProps, Quorum};
use dynakv_core::bucket_types::TypeChange;
use dynakv_core::security::Permission;
use dynakv_pb::{
    RpbBucketProps, RpbGetBucketReq, RpbGetBucketResp, RpbModFun, RpbResetBucketReq,
    RpbSetBucketReq, code, encode_empty, encode_frame, quorum,
};
use prost::Message as _;
use serde_json::{Map, Value, json};

/// Riak's vector clock pruning settings, reported as Riak's defaults; dynakv's clocks are
/// per node (bounded by the cluster's size) and are not pruned.
const YOUNG_VCLOCK: u32 = 20;
const OLD_VCLOCK: u32 = 86_400;
const SMALL_VCLOCK: u32 = 50;
const BIG_VCLOCK: u32 = 50;
/// `RpbReplMode` false.
const REPL_FALSE: i32 = 0;

/// Field numbers of `RpbBucketProps` (Riak 2.x).
const KNOWN_PROPS_FIELDS: std::ops::RangeInclusive<u32> = 1..=29;

/// Refuse properties carrying a field `RpbBucketProps` does not have (a newer client's, or
/// garbage): the decoder would drop it without a word, and the client would believe it set.
fn refuse_unknown_props(request: &[u8]) -> Result<(), Refusal> {
    let fields = dynakv_pb::fields(request).ok_or("malformed request")?;
    for (_, props) in fields.into_iter().filter(|(n, _)| *n == 2) {
        let Some(props) = props else {
            return Err("props must be a message".to_owned());
        };
        match dynakv_pb::unknown_field(props, KNOWN_PROPS_FIELDS) {
            Ok(None) => {}
            Ok(Some(n)) => {
                return Err(format!(
                    "unknown bucket property: field {n} of RpbBucketProps"
                ));
            }
            Err(e) => return Err(format!("props: {e}")),
        }
    }
    Ok(())
}

impl Session {
    pub(super) async fn bucket_request(
        &mut self,
        code: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        match code {
            code::GET_BUCKET_REQ => {
                let request = RpbGetBucketReq::decode(body)
                    .map_err(|e| format!("malformed RpbGetBucketReq: {e}"))?;
                let bucket = bucket_name(
                    &self.state.cluster,
                    request.bucket,
                    request.r#type.as_deref(),
                )?;
                self.permitted(Permission::GetBucket, Some(&bucket))?;
                let props = self.state.cluster.bucket_props(&bucket);
                let response = RpbGetBucketResp {
                    props: Some(to_pb(&props)),
                };
                encode_frame(out, code::GET_BUCKET_RESP, &response);
            }
            code::SET_BUCKET_REQ => {
                let request = RpbSetBucketReq::decode(body)
                    .map_err(|e| format!("malformed RpbSetBucketReq: {e}"))?;
                refuse_unknown_props(body)?;
                let bucket = bucket_name(
                    &self.state.cluster,
                    request.bucket,
                    request.r#type.as_deref(),
                )?;
                self.permitted(Permission::SetBucket, Some(&bucket))?;
                let update = request
                    .props
                    .ok_or("RpbSetBucketReq needs props (its required field 2)")?;
                let update = to_json(&update)?;
                self.state
                    .cluster
                    .update_bucket_props(&bucket, &update)
                    .await
                    .map_err(|e| crate::view::error_status(&e).1)?;
                encode_empty(out, code::SET_BUCKET_RESP);
            }
            code::RESET_BUCKET_REQ => {
                let request = RpbResetBucketReq::decode(body)
                    .map_err(|e| format!("malformed RpbResetBucketReq: {e}"))?;
                let bucket = bucket_name(
                    &self.state.cluster,
                    request.bucket,
                    request.r#type.as_deref(),
                )?;
                self.permitted(Permission::SetBucket, Some(&bucket))?;
                self.state
                    .cluster
                    .set_bucket_props(&bucket, None)
                    .await
                    .map_err(|e| e.to_string())?;
                encode_empty(out, code::RESET_BUCKET_RESP);
            }
            code::GET_BUCKET_TYPE_REQ => {
                let request = dynakv_pb::RpbGetBucketTypeReq::decode(body)
                    .map_err(|e| format!("malformed RpbGetBucketTypeReq: {e}"))?;
                let bucket_type = request.r#type.ok_or("the bucket type is required")?;
                let bucket_type = type_name(Some(&bucket_type))?;
                self.permitted(Permission::GetBucket, None)?;
                let defaults = self.state.cluster.bucket_props("-");
                let props = dynakv_core::bucket_types::props_of(
                    &self.state.cluster.state(),
                    bucket_type,
                    &defaults,
                )
                .ok_or_else(|| format!("Invalid bucket type: {bucket_type:?}"))?;
                let response = RpbGetBucketResp {
                    props: Some(to_pb(&props)),
                };
                encode_frame(out, code::GET_BUCKET_RESP, &response);
            }
            _ => {
                let request = dynakv_pb::RpbSetBucketTypeReq::decode(body)
                    .map_err(|e| format!("malformed RpbSetBucketTypeReq: {e}"))?;
                refuse_unknown_props(body)?;
                let bucket_type = request.r#type.ok_or("the bucket type is required")?;
                let name = type_name(Some(&bucket_type))?.to_owned();
                self.permitted(Permission::Admin, None)?;
                let update = request
                    .props
                    .ok_or("RpbSetBucketTypeReq needs props (its required field 2)")?;
                let props = to_json(&update)?;
                self.state
                    .cluster
                    .change_bucket_type(TypeChange::Update { name, props })
                    .await
                    .map_err(|e| e.to_string())?;
                encode_empty(out, code::SET_BUCKET_RESP);
            }
        }
        Ok(())
    }
}

/// The PB encoding of a quorum.
fn quorum_to_pb(q: Quorum) -> u32 {
    match q {
        Quorum::One => quorum::ONE,
        Quorum::Quorum => quorum::QUORUM,
        Quorum::All => quorum::ALL,
        Quorum::Default => quorum::DEFAULT,
        Quorum::Count(n) => n,
    }
}

/// A bucket's properties as Riak's clients read them.
pub(super) fn to_pb(props: &BucketProps) -> RpbBucketProps {
    let modfun = |module: &str, function: &str| RpbModFun {
        module: Some(module.as_bytes().to_vec()),
        function: Some(function.as_bytes().to_vec()),
    };
    RpbBucketProps {
        n_val: Some(props.n_val),
        allow_mult: Some(props.allow_mult),
        last_write_wins: Some(props.last_write_wins),
        precommit: Vec::new(),
        has_precommit: Some(false),
        postcommit: Vec::new(),
        has_postcommit: Some(false),
        chash_keyfun: Some(modfun("riak_core_util", "chash_std_keyfun")),
        linkfun: Some(modfun("riak_kv_wm_link_walker", "mapreduce_linkfun")),
        old_vclock: Some(OLD_VCLOCK),
        young_vclock: Some(YOUNG_VCLOCK),
        big_vclock: Some(BIG_VCLOCK),
        small_vclock: Some(SMALL_VCLOCK),
        pr: Some(quorum_to_pb(props.pr)),
        r: Some(quorum_to_pb(props.r)),
        w: Some(quorum_to_pb(props.w)),
        pw: Some(quorum_to_pb(props.pw)),
        dw: Some(quorum_to_pb(props.dw)),
        rw: Some(quorum_to_pb(props.rw)),
        basic_quorum: Some(props.basic_quorum),
        notfound_ok: Some(props.notfound_ok),
        backend: None,
        search: Some(false),
        repl: Some(REPL_FALSE),
        search_index: None,
        datatype: props.datatype.map(|kind| kind.name().as_bytes().to_vec()),
        consistent: Some(false),
        write_once: Some(false),
        hll_precision: None,
    }
}

/// An `RpbSetBucketReq`'s properties as the JSON update HTTP takes (the properties dynakv
/// keeps), after checking the ones it does not keep ask for what it does.
fn to_json(props: &RpbBucketProps) -> Result<Map<String, Value>, Refusal> {
    let mut update = Map::new();
    let quorum = |value: u32| -> Result<Value, Refusal> {
        Ok(match pb_quorum(value)? {
            Quorum::Count(n) => json!(n),
            other => other.to_json(),
        })
    };
    if let Some(n) = props.n_val {
        update.insert("n_val".into(), json!(n));
    }
    for (name, value) in [
        ("allow_mult", props.allow_mult),
        ("last_write_wins", props.last_write_wins),
        ("basic_quorum", props.basic_quorum),
        ("notfound_ok", props.notfound_ok),
    ] {
        if let Some(value) = value {
            update.insert(name.into(), json!(value));
        }
    }
    for (name, value) in [
        ("r", props.r),
        ("w", props.w),
        ("dw", props.dw),
        ("rw", props.rw),
        ("pr", props.pr),
        ("pw", props.pw),
    ] {
        if let Some(value) = value {
            update.insert(name.into(), quorum(value)?);
        }
    }
    let refuse = |name: &str, why: &str| Err(format!("bucket property {name}: {why}"));
    if !props.precommit.is_empty() || props.has_precommit == Some(true) {
        return refuse("precommit", "commit hooks are not supported by dynakv");
    }
    if !props.postcommit.is_empty() || props.has_postcommit == Some(true) {
        return refuse("postcommit", "commit hooks are not supported by dynakv");
    }
    let is = |f: &Option<RpbModFun>, module: &str, function: &str| {
        f.as_ref().is_none_or(|f| {
            f.module.as_deref() == Some(module.as_bytes())
                && f.function.as_deref() == Some(function.as_bytes())
        })
    };
    if !is(&props.chash_keyfun, "riak_core_util", "chash_std_keyfun") {
        return refuse(
            "chash_keyfun",
            "only riak_core_util:chash_std_keyfun is served",
        );
    }
    if !is(
        &props.linkfun,
        "riak_kv_wm_link_walker",
        "mapreduce_linkfun",
    ) {
        return refuse("linkfun", "links are not supported by dynakv");
    }
    for (name, value, default) in [
        ("old_vclock", props.old_vclock, OLD_VCLOCK),
        ("young_vclock", props.young_vclock, YOUNG_VCLOCK),
        ("big_vclock", props.big_vclock, BIG_VCLOCK),
        ("small_vclock", props.small_vclock, SMALL_VCLOCK),
    ] {
        if value.is_some_and(|v| v != default) {
            return Err(format!(
                "bucket property {name}: dynakv does not prune clocks (they hold one entry per \
                 node); only {default} is accepted"
            ));
        }
    }
    if props.backend.as_ref().is_some_and(|b| !b.is_empty()) {
        return refuse("backend", "every bucket uses the node's storage engine");
    }
    if props.search == Some(true) || props.search_index.as_ref().is_some_and(|s| !s.is_empty()) {
        return refuse("search", "Riak Search is not supported by dynakv");
    }
    if props.repl.is_some_and(|r| r != REPL_FALSE) {
        return refuse(
            "repl",
            "multi-datacenter replication is not supported by dynakv",
        );
    }
    if let Some(datatype) = props.datatype.as_ref().filter(|d| !d.is_empty()) {
        update.insert(
            "datatype".into(),
            json!(String::from_utf8_lossy(datatype).into_owned()),
        );
    }
    if props
        .hll_precision
        .is_some_and(|p| p != u32::from(dynakv_core::crdt::DEFAULT_HLL_PRECISION))
    {
        return refuse(
            "hll_precision",
            "every hll of dynakv has the default precision",
        );
    }
    if props.consistent == Some(true) {
        return refuse(
            "consistent",
            "strongly consistent buckets are not supported by dynakv",
        );
    }
    if props.write_once == Some(true) {
        return refuse(
            "write_once",
            "write-once buckets are not supported by dynakv",
        );
    }
    Ok(update)
}
