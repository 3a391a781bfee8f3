//! Objects over PB: get, put, delete, key and bucket listings, a key's preference list. Each
//! decodes its message, checks every field, and runs the same request path as HTTP
//! (`crate::requests`); only the translation to and from Riak's messages is here.

use super::{Control, Session};
use crate::http::objects::{check_user_meta, random_token, reserve_response};
use crate::stats::Op;
use dynakv_core::bucket::{BucketProps, Quorum};
use dynakv_core::message::WireContent;
use dynakv_core::object::{Object, Sibling};
use dynakv_core::replica::Precondition;
use dynakv_core::request::PutOp;
use dynakv_core::security::Permission;
use dynakv_core::version::VersionVector;
use dynakv_core::{context, keys, limits};
use dynakv_pb::{
    RpbContent, RpbDelReq, RpbGetReq, RpbGetResp, RpbListBucketsReq, RpbListBucketsResp,
    RpbListKeysReq, RpbListKeysResp, RpbPair, RpbPutReq, RpbPutResp, code, encode_empty,
    encode_error, encode_frame, quorum,
};
use prost::Message as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bucket names per frame of a streamed bucket listing.
const BUCKETS_PER_FRAME: usize = 1000;
/// Frames a listing may have ready before the connection has written them.
const LIST_FRAMES_BUFFERED: usize = 4;
/// Time limit of a listing without a `timeout` field.
const DEFAULT_LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest time limit a listing's `timeout` field may ask for.
const MAX_LIST_TIMEOUT: Duration = Duration::from_secs(600);

/// A listing's time limit: the client's `timeout` (ms), at most [`MAX_LIST_TIMEOUT`].
fn list_limit(timeout: Option<u32>) -> Duration {
    timeout
        .map_or(DEFAULT_LIST_TIMEOUT, |ms| {
            Duration::from_millis(u64::from(ms))
        })
        .min(MAX_LIST_TIMEOUT)
}

/// A request's bucket, key and bucket type fields, as sent.
type ObjectName<'a> = (Option<Vec<u8>>, Option<Vec<u8>>, Option<&'a [u8]>);

/// A request's failure: the error response's text.
pub(super) type Refusal = String;

impl Session {
    /// Object and listing requests: admitted under the node's in-flight limit (as HTTP's
    /// data requests), timed in the node's statistics.
    pub(super) async fn data_request(
        &mut self,
        code: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Control {
        let Some(_permit) = self.state.limiter.try_admit() else {
            self.state
                .stats
                .requests_shed
                .fetch_add(1, Ordering::Relaxed);
            encode_error(
                out,
                &format!(
                    "overloaded: {} requests already in flight on this node (limit {}); retry later",
                    self.state.limiter.in_flight(),
                    self.state.limiter.limit()
                ),
            );
            return Control::Continue;
        };
        let started = Instant::now();
        let (op, result) = match code {
            code::GET_REQ => (
                Op::Get,
                self.get(body, out).await.map(|()| Control::Continue),
            ),
            code::PUT_REQ => (
                Op::Put,
                self.put(body, out).await.map(|()| Control::Continue),
            ),
            code::DEL_REQ => (
                Op::Delete,
                self.delete(body, out).await.map(|()| Control::Continue),
            ),
            code::LIST_KEYS_REQ => (Op::Get, self.list_keys(body)),
            code::LIST_BUCKETS_REQ => (
                Op::Get,
                self.list_buckets(body, out)
                    .await
                    .map(|()| Control::Continue),
            ),
            code::INDEX_REQ => (
                Op::Get,
                self.index_query(body, out)
                    .await
                    .map(|()| Control::Continue),
            ),
            code::DT_FETCH_REQ => (
                Op::Get,
                self.dt_fetch(body, out).await.map(|()| Control::Continue),
            ),
            code::DT_UPDATE_REQ => (
                Op::Put,
                self.dt_update(body, out).await.map(|()| Control::Continue),
            ),
            _ => (
                Op::Get,
                self.preflist(body, out).map(|()| Control::Continue),
            ),
        };
        let ok = result.is_ok();
        if matches!(
            code,
            code::GET_REQ
                | code::PUT_REQ
                | code::DEL_REQ
                | code::DT_FETCH_REQ
                | code::DT_UPDATE_REQ
        ) {
            self.state.stats.record(op, started.elapsed(), ok);
        }
        result.unwrap_or_else(|message| {
            self.state
                .stats
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
            encode_error(out, &message);
            Control::Continue
        })
    }

    async fn get(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let request = RpbGetReq::decode(body).map_err(|e| format!("malformed RpbGetReq: {e}"))?;
        let (bucket, key, props) = self.object(
            (request.bucket, request.key, request.r#type.as_deref()),
            Permission::Get,
            (request.n_val, request.sloppy_quorum),
        )?;
        let r = quorum_field("r", request.r, &props)?;
        let pr = quorum_field("pr", request.pr, &props)?;
        let if_modified = request
            .if_modified
            .map(|vclock| self.decode_vclock(&bucket, &key, &vclock))
            .transpose()?;
        let cluster = Arc::clone(&self.state.cluster);
        let object = within(request.timeout, async {
            crate::requests::get(&cluster, &bucket, &key, r, pr).await
        })
        .await??;
        // Unchanged: the clock the client holds, of a value that is there (a tombstone is
        // answered as not found, as Riak does).
        if if_modified.as_ref() == Some(object.clock()) && !object.is_deleted() {
            let unchanged = RpbGetResp {
                unchanged: Some(true),
                ..RpbGetResp::default()
            };
            encode_frame(out, code::GET_RESP, &unchanged);
            return Ok(());
        }
        let live = live_siblings(&object, &props);
        self.state.stats.record_siblings(live.len());
        self.state.stats.causality.record_read(
            &bucket,
            &key,
            object.live_siblings().count(),
            object.clock().len(),
        );
        let mut response = RpbGetResp::default();
        if live.is_empty() {
            self.state.stats.not_found.fetch_add(1, Ordering::Relaxed);
            // Not found: no content, and the tombstone's clock only when asked for.
            if request.deletedvclock == Some(true) && !object.clock().is_empty() {
                response.vclock = Some(self.vclock(&bucket, &key, object.clock()));
            }
            encode_frame(out, code::GET_RESP, &response);
            return Ok(());
        }
        let head = request.head == Some(true);
        self.reserve(&live, head)?;
        response.content = live.iter().map(|s| content_of(s, head)).collect();
        response.vclock = Some(self.vclock(&bucket, &key, object.clock()));
        encode_frame(out, code::GET_RESP, &response);
        Ok(())
    }

    async fn put(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let request = RpbPutReq::decode(body).map_err(|e| format!("malformed RpbPutReq: {e}"))?;
        let generated = request.key.is_none();
        let key = request.key.unwrap_or_else(|| random_token(22).into_bytes());
        let (bucket, key, props) = self.object(
            (request.bucket, Some(key), request.r#type.as_deref()),
            Permission::Put,
            (request.n_val, request.sloppy_quorum),
        )?;
        if request.asis == Some(true) {
            return Err("asis is not supported: dynakv coordinates every write itself".to_owned());
        }
        let content = request
            .content
            .ok_or("RpbPutReq needs content (its required field 4)")?;
        let content = wire_content(content, self.state.max_value_bytes)?;
        let context = request
            .vclock
            .map(|vclock| self.decode_vclock(&bucket, &key, &vclock))
            .transpose()?;
        let precondition = match (request.if_none_match, request.if_not_modified) {
            (Some(true), Some(true)) => {
                return Err("if_none_match and if_not_modified cannot both be set".to_owned());
            }
            (Some(true), _) => Precondition::Absent,
            (_, Some(true)) => Precondition::Unmodified(
                context
                    .clone()
                    .ok_or("if_not_modified needs the vclock the object must still have")?,
            ),
            _ => Precondition::None,
        };
        let w = quorum_field("w", request.w, &props)?;
        let pw = quorum_field("pw", request.pw, &props)?;
        let dw = quorum_field("dw", request.dw, &props)?;
        self.state
            .stats
            .bytes_written
            .fetch_add(content.value.len() as u64, Ordering::Relaxed);
        let op = PutOp {
            bucket: bucket.clone(),
            key: key.clone(),
            context,
            content,
            w,
            pw,
            dw_given: dw_given(dw),
            precondition,
        };
        let cluster = Arc::clone(&self.state.cluster);
        let now = cluster.now_ms();
        let stored = within(request.timeout, async {
            crate::requests::put(&cluster, op, now).await
        })
        .await??;
        let mut response = RpbPutResp {
            key: generated.then(|| key.as_bytes().to_vec()),
            ..RpbPutResp::default()
        };
        let head = request.return_head == Some(true);
        if request.return_body == Some(true) || head {
            let live = live_siblings(&stored, &props);
            self.reserve(&live, head)?;
            response.content = live.iter().map(|s| content_of(s, head)).collect();
            response.vclock = Some(self.vclock(&bucket, &key, stored.clock()));
        }
        encode_frame(out, code::PUT_RESP, &response);
        Ok(())
    }

    async fn delete(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let request = RpbDelReq::decode(body).map_err(|e| format!("malformed RpbDelReq: {e}"))?;
        let (bucket, key, props) = self.object(
            (request.bucket, request.key, request.r#type.as_deref()),
            Permission::Delete,
            (request.n_val, request.sloppy_quorum),
        )?;
        let context = request
            .vclock
            .map(|vclock| self.decode_vclock(&bucket, &key, &vclock))
            .transpose()?;
        let dw = quorum_field("dw", request.dw, &props)?;
        let quorums = crate::requests::DeleteQuorums {
            r: quorum_field("r", request.r, &props)?,
            pr: quorum_field("pr", request.pr, &props)?,
            w: quorum_field("w", request.w, &props)?,
            pw: quorum_field("pw", request.pw, &props)?,
            rw: quorum_field("rw", request.rw, &props)?,
            dw_given: dw_given(dw),
        };
        let cluster = Arc::clone(&self.state.cluster);
        // Deleting a key that is not there is not an error (Riak answers RpbDelResp too).
        within(request.timeout, async {
            crate::requests::delete(&cluster, (bucket, key), context, quorums).await
        })
        .await??;
        encode_empty(out, code::DEL_RESP);
        Ok(())
    }

    /// Keys stream in frames as the listing finds them, the last with `done`.
    fn list_keys(&mut self, body: &[u8]) -> Result<Control, Refusal> {
        let request =
            RpbListKeysReq::decode(body).map_err(|e| format!("malformed RpbListKeysReq: {e}"))?;
        let bucket = bucket_name(
            &self.state.cluster,
            request.bucket,
            request.r#type.as_deref(),
        )?;
        self.permitted(Permission::ListKeys, Some(&bucket))?;
        let limit = list_limit(request.timeout);
        let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(LIST_FRAMES_BUFFERED);
        let (pages_tx, mut pages_rx) = tokio::sync::mpsc::channel::<Vec<String>>(1);
        let cluster = Arc::clone(&self.state.cluster);
        tokio::spawn(async move {
            let listing = tokio::spawn(async move {
                crate::requests::list_keys(&cluster, &bucket, pages_tx).await
            });
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                let page = tokio::time::timeout_at(deadline, pages_rx.recv()).await;
                let mut frame = Vec::new();
                match page {
                    Ok(Some(keys)) => {
                        let response = RpbListKeysResp {
                            keys: keys.into_iter().map(String::into_bytes).collect(),
                            done: None,
                        };
                        encode_frame(&mut frame, code::LIST_KEYS_RESP, &response);
                    }
                    Ok(None) => {
                        match listing.await {
                            Ok(Ok(())) => {
                                let done = RpbListKeysResp {
                                    keys: Vec::new(),
                                    done: Some(true),
                                };
                                encode_frame(&mut frame, code::LIST_KEYS_RESP, &done);
                            }
                            Ok(Err(e)) => encode_error(&mut frame, &e.to_string()),
                            Err(e) => encode_error(&mut frame, &format!("key listing failed: {e}")),
                        }
                        let _ = frames_tx.send(frame).await;
                        return;
                    }
                    Err(_) => {
                        listing.abort();
                        encode_error(&mut frame, "timeout");
                        let _ = frames_tx.send(frame).await;
                        return;
                    }
                }
                if frames_tx.send(frame).await.is_err() {
                    // The client went away: stop the listing.
                    listing.abort();
                    return;
                }
            }
        });
        Ok(Control::Stream(frames_rx))
    }

    async fn list_buckets(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let request = RpbListBucketsReq::decode(body)
            .map_err(|e| format!("malformed RpbListBucketsReq: {e}"))?;
        let bucket_type = type_name(request.r#type.as_deref())?.to_owned();
        self.state.cluster.typed_bucket(&bucket_type, "-")?;
        self.permitted(Permission::ListBuckets, None)?;
        let limit = list_limit(request.timeout);
        let buckets =
            tokio::time::timeout(limit, crate::requests::list_buckets(&self.state.cluster))
                .await
                .map_err(|_| "timeout".to_owned())?
                .map_err(|e| e.to_string())?;
        let buckets: Vec<Vec<u8>> = dynakv_core::bucket_types::buckets_of(&bucket_type, buckets)
            .into_iter()
            .map(String::into_bytes)
            .collect();
        if request.stream != Some(true) {
            let response = RpbListBucketsResp {
                buckets,
                done: None,
            };
            encode_frame(out, code::LIST_BUCKETS_RESP, &response);
            return Ok(());
        }
        for chunk in buckets.chunks(BUCKETS_PER_FRAME) {
            let response = RpbListBucketsResp {
                buckets: chunk.to_vec(),
                done: None,
            };
            encode_frame(out, code::LIST_BUCKETS_RESP, &response);
        }
        let done = RpbListBucketsResp {
            buckets: Vec::new(),
            done: Some(true),
        };
        encode_frame(out, code::LIST_BUCKETS_RESP, &done);
        Ok(())
    }

    fn preflist(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let request = dynakv_pb::RpbGetBucketKeyPreflistReq::decode(body)
            .map_err(|e| format!("malformed RpbGetBucketKeyPreflistReq: {e}"))?;
        let (bucket, key) = object_name(
            &self.state.cluster,
            request.bucket,
            request.key,
            request.r#type.as_deref(),
        )?;
        self.permitted(Permission::Get, Some(&bucket))?;
        let preflist = self
            .state
            .cluster
            .preflist(&bucket, &key)
            .into_iter()
            .map(|(partition, node)| dynakv_pb::RpbBucketKeyPreflistItem {
                partition: Some(i64::from(partition)),
                node: Some(node.0.into_bytes()),
                primary: Some(true),
            })
            .collect();
        let response = dynakv_pb::RpbGetBucketKeyPreflistResp { preflist };
        encode_frame(out, code::GET_BUCKET_KEY_PREFLIST_RESP, &response);
        Ok(())
    }

    /// An object request's bucket (internal name), key and the bucket's properties, once the
    /// names are valid, the type active, the grant held and the request's fields possible.
    pub(super) fn object(
        &self,
        (bucket, key, bucket_type): ObjectName<'_>,
        permission: Permission,
        (n_val, sloppy_quorum): (Option<u32>, Option<bool>),
    ) -> Result<(String, String, BucketProps), Refusal> {
        let (bucket, key) = object_name(&self.state.cluster, bucket, key, bucket_type)?;
        self.permitted(permission, Some(&bucket))?;
        let props = self.state.cluster.bucket_props(&bucket);
        check_request_fields(&props, n_val, sloppy_quorum)?;
        Ok((bucket, key, props))
    }

    /// The context of `bucket/key` as a PB vclock (the same authenticated bytes HTTP's
    /// `X-Riak-Vclock` carries).
    fn vclock(&self, bucket: &str, key: &str, clock: &VersionVector) -> Vec<u8> {
        context::encode(
            self.state.cluster.secret(),
            bucket.as_bytes(),
            key.as_bytes(),
            clock,
        )
        .into_bytes()
    }

    fn decode_vclock(
        &self,
        bucket: &str,
        key: &str,
        vclock: &[u8],
    ) -> Result<VersionVector, Refusal> {
        let text = std::str::from_utf8(vclock)
            .map_err(|_| "invalid vclock: not a vclock this cluster issued".to_owned())?;
        context::decode(
            self.state.cluster.secret(),
            bucket.as_bytes(),
            key.as_bytes(),
            text,
        )
        .map_err(|e| format!("invalid vclock: {e}"))
    }

    /// Reserve the node's response budget for the values about to be sent.
    fn reserve(&mut self, siblings: &[&Sibling], head: bool) -> Result<(), Refusal> {
        if head {
            return Ok(());
        }
        let size = siblings.iter().fold(0usize, |sum, s| {
            sum.saturating_add(s.content.value.len())
                .saturating_add(limits::MAX_META_BYTES.min(1024))
        });
        let permit =
            reserve_response(&self.state, size).map_err(crate::http::ApiError::into_message)?;
        self.held.push(permit);
        Ok(())
    }
}

/// Run a request within the client's `timeout` (ms), when it gave one.
pub(super) async fn within<T, E: ToString>(
    timeout: Option<u32>,
    request: impl Future<Output = Result<T, E>>,
) -> Result<Result<T, Refusal>, Refusal> {
    let result = match timeout {
        Some(ms) => tokio::time::timeout(Duration::from_millis(u64::from(ms)), request)
            .await
            .map_err(|_| "timeout".to_owned())?,
        None => request.await,
    };
    Ok(result.map_err(|e| e.to_string()))
}

/// A `dw` that asks for durability (as HTTP's `dw` parameter: not 0, not the default).
pub(super) fn dw_given(dw: Option<Quorum>) -> bool {
    !matches!(dw, None | Some(Quorum::Count(0) | Quorum::Default))
}

/// The siblings a client is given: all live ones, or with `allow_mult` false the newest.
fn live_siblings<'a>(object: &'a Object, props: &BucketProps) -> Vec<&'a Sibling> {
    if props.allow_mult {
        object.live_siblings().collect()
    } else {
        object.newest_live_sibling().into_iter().collect()
    }
}

/// A request's bucket type: absent is `default`; UTF-8.
pub(super) fn type_name(bucket_type: Option<&[u8]>) -> Result<&str, Refusal> {
    match bucket_type {
        None => Ok(dynakv_core::bucket_types::DEFAULT_TYPE),
        Some(t) => std::str::from_utf8(t).map_err(|_| "the bucket type is not UTF-8".to_owned()),
    }
}

/// A request's bucket: required, UTF-8, within the name limits, of an active type (its
/// internal name for a type other than `default`).
pub(super) fn bucket_name(
    cluster: &crate::view::Cluster,
    bucket: Option<Vec<u8>>,
    bucket_type: Option<&[u8]>,
) -> Result<String, Refusal> {
    let bucket_type = type_name(bucket_type)?;
    let bucket = bucket.ok_or("the bucket is required")?;
    keys::check_bucket(&bucket).map_err(|e| e.to_string())?;
    let bucket =
        String::from_utf8(bucket).map_err(|_| "the bucket name is not UTF-8".to_owned())?;
    cluster.typed_bucket(bucket_type, &bucket)
}

fn object_name(
    cluster: &crate::view::Cluster,
    bucket: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    bucket_type: Option<&[u8]>,
) -> Result<(String, String), Refusal> {
    let bucket = bucket_name(cluster, bucket, bucket_type)?;
    let key = key.ok_or("the key is required")?;
    keys::check_key(&key).map_err(|e| e.to_string())?;
    let key = String::from_utf8(key).map_err(|_| "the key is not UTF-8".to_owned())?;
    Ok((bucket, key))
}

/// A PB quorum field: Riak's special values or a count, checked against the bucket.
pub(super) fn quorum_field(
    name: &str,
    value: Option<u32>,
    props: &BucketProps,
) -> Result<Option<Quorum>, Refusal> {
    let Some(value) = value else {
        return Ok(None);
    };
    let quorum = pb_quorum(value)?;
    crate::http::check_quorum(name, quorum, props).map(Some)
}

/// Riak's PB encoding of a quorum.
pub(super) fn pb_quorum(value: u32) -> Result<Quorum, Refusal> {
    Ok(match value {
        quorum::ONE => Quorum::One,
        quorum::QUORUM => Quorum::Quorum,
        quorum::ALL => Quorum::All,
        quorum::DEFAULT => Quorum::Default,
        n if n <= limits::MAX_N_VAL => Quorum::Count(n),
        other => return Err(format!("invalid quorum {other}")),
    })
}

/// The fields a request may carry that dynakv serves one way only: they are accepted when
/// they ask for what dynakv does.
fn check_request_fields(
    props: &BucketProps,
    n_val: Option<u32>,
    sloppy_quorum: Option<bool>,
) -> Result<(), Refusal> {
    if let Some(n) = n_val
        && n != props.n_val
    {
        return Err(format!(
            "n_val {n} differs from the bucket's ({}): set it on the bucket",
            props.n_val
        ));
    }
    if sloppy_quorum == Some(false) {
        return Err(
            "sloppy_quorum false is not supported: dynakv counts fallback replicas toward w and \
             r (use pw and pr to require primaries)"
                .to_owned(),
        );
    }
    Ok(())
}

/// A put's content, checked: the value within the node's limit, UTF-8 metadata within the
/// limits HTTP applies, index entries checked (`index::normalize`); links are refused.
fn wire_content(content: RpbContent, max_value_bytes: usize) -> Result<WireContent, Refusal> {
    let value = content
        .value
        .ok_or("RpbContent needs a value (its required field 1)")?;
    if value.len() > max_value_bytes {
        return Err(format!("value is larger than {max_value_bytes} bytes"));
    }
    if !content.links.is_empty() {
        return Err("links are not supported by dynakv".to_owned());
    }
    if content.indexes.len() > dynakv_core::index::MAX_INDEX_ENTRIES {
        return Err(dynakv_core::index::IndexError::TooMany.to_string());
    }
    let indexes = dynakv_core::index::normalize(
        content
            .indexes
            .into_iter()
            .map(|RpbPair { key, value }| {
                (
                    String::from_utf8_lossy(&key.unwrap_or_default()).into_owned(),
                    value.unwrap_or_default(),
                )
            })
            .collect(),
    )
    .map_err(|e| e.to_string())?;
    if content
        .content_encoding
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != b"identity")
    {
        return Err("content_encoding is not kept by dynakv: send the value decoded".to_owned());
    }
    let text = |bytes: Vec<u8>, what: &str| {
        String::from_utf8(bytes).map_err(|_| format!("{what} is not UTF-8"))
    };
    let mut content_type = match content.content_type {
        Some(bytes) if !bytes.is_empty() => text(bytes, "content_type")?,
        _ => "application/octet-stream".to_owned(),
    };
    if let Some(charset) = content.charset.filter(|c| !c.is_empty()) {
        // Kept as HTTP keeps it: a parameter of the content type.
        content_type = format!("{content_type}; charset={}", text(charset, "charset")?);
    }
    if content_type.len() > limits::MAX_CONTENT_TYPE_BYTES
        || content_type.chars().any(char::is_control)
    {
        return Err("content_type is too long or has control characters".to_owned());
    }
    let mut meta = Vec::with_capacity(content.usermeta.len());
    let mut bytes = 0usize;
    for RpbPair { key, value } in content.usermeta {
        let name = text(key.unwrap_or_default(), "a usermeta key")?;
        let value = text(value.unwrap_or_default(), "a usermeta value")?;
        if name.is_empty()
            || name.chars().any(char::is_control)
            || value.chars().any(char::is_control)
        {
            return Err(
                "a usermeta key is empty, or a key or value has control characters".to_owned(),
            );
        }
        bytes = bytes.saturating_add(name.len()).saturating_add(value.len());
        meta.push((name, value));
    }
    check_user_meta(meta.len(), bytes)?;
    let ttl_secs = crate::http::objects::take_ttl(&mut meta)?;
    Ok(WireContent {
        value,
        content_type,
        meta,
        deleted: false,
        indexes,
        ttl_secs,
    })
}

/// One sibling as `RpbContent` (`head`: without its value).
fn content_of(sibling: &Sibling, head: bool) -> RpbContent {
    let content = &sibling.content;
    let (content_type, charset) = match content.content_type.split_once("; charset=") {
        Some((content_type, charset)) => (content_type, Some(charset)),
        None => (content.content_type.as_str(), None),
    };
    let ms = content.last_modified_ms;
    RpbContent {
        value: Some(if head {
            Vec::new()
        } else {
            content.value.clone()
        }),
        content_type: Some(content_type.as_bytes().to_vec()),
        charset: charset.map(|c| c.as_bytes().to_vec()),
        content_encoding: None,
        vtag: Some(sibling.vtag().into_bytes()),
        links: Vec::new(),
        last_mod: Some(u32::try_from(ms / 1000).unwrap_or(u32::MAX)),
        last_mod_usecs: Some(((ms % 1000) * 1000) as u32),
        usermeta: content
            .meta
            .iter()
            .map(|(k, v)| RpbPair {
                key: Some(k.as_bytes().to_vec()),
                value: Some(v.as_bytes().to_vec()),
            })
            .collect(),
        indexes: content
            .indexes
            .iter()
            .map(|(name, term)| RpbPair {
                key: Some(name.as_bytes().to_vec()),
                value: Some(term.clone()),
            })
            .collect(),
        deleted: content.deleted.then_some(true),
    }
}
