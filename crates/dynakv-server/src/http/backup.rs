//! Backup and restore (issue 22): `GET /admin/backup/{partition}` pages this node's stored
//! objects of one partition as backup records (`dynakv_core::backup`: clocks, siblings and
//! tombstones as stored); `POST /admin/restore` merges a body of records into their keys'
//! primaries (`requests::restore_object`: causal merges, never replacing newer data). Both
//! need the `admin` permission when security is on (every `/admin` path does).

use super::{ApiError, ApiResult, AppState, Bytes, IntoResponse, State, StatusCode, header};
use axum::extract::{Path, Query};
use dynakv_core::backup::{self, Reader};
use dynakv_core::object::Object;
use dynakv_core::replica::ReplicaError;
use dynakv_core::storage::Table;
use futures_util::StreamExt as _;
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// Keys per backup page unless asked for fewer.
const DEFAULT_PAGE_KEYS: usize = 1000;
/// Most keys per backup page.
const MAX_PAGE_KEYS: usize = 10_000;
/// A page stops once it holds this many bytes (one larger object still goes whole).
const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// A restore body's records are restored this many at a time.
const RESTORE_CONCURRENCY: usize = 16;
/// Failed records named in a restore's answer (the rest are counted).
const MAX_FAILURES_LISTED: usize = 100;
/// The header naming where the next page starts (hex of this page's last index key).
pub const NEXT_HEADER: &str = "x-dynakv-next";

/// One page of this node's objects of a partition.
pub(super) async fn backup_page(
    State(state): State<AppState>,
    Path(partition): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let partitions = state.cluster.state().ring.current.partition_count();
    let partition: u32 = partition
        .parse()
        .ok()
        .filter(|p| *p < partitions)
        .ok_or_else(|| {
            ApiError::bad_request(format!("partition must be a number below {partitions}"))
        })?;
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE_KEYS,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_PAGE_KEYS).contains(l))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE_KEYS}")))?,
    };
    let after = match query.get("after") {
        None => None,
        Some(hex) => Some(
            decode_hex(hex)
                .filter(|k| k.starts_with(&partition.to_be_bytes()))
                .ok_or_else(|| ApiError::bad_request("after must be a cursor of this partition"))?,
        ),
    };
    let aae = Arc::clone(state.cluster.aae());
    let storage = Arc::clone(state.cluster.replica().storage());
    let (body, next) = super::blocking(move || {
        let page = aae
            .partition_page(partition, after.as_deref(), limit)
            .map_err(ReplicaError::Storage)?;
        let full = page.len() == limit;
        let mut body = Vec::new();
        let mut last = None;
        for (index_key, object_key) in page {
            let stored = storage
                .get(Table::Objects, &object_key)
                .map_err(|e| ReplicaError::Storage(e.to_string()))?;
            last = Some(index_key);
            let Some(bytes) = stored else {
                continue; // indexed but gone since: nothing to back up
            };
            let Some((bucket, key)) = dynakv_core::keys::split_object_key(&object_key) else {
                continue;
            };
            let (Ok(bucket), Ok(key)) = (std::str::from_utf8(bucket), std::str::from_utf8(key))
            else {
                continue;
            };
            if let Some(record) = backup::encode_record(bucket, key, &bytes) {
                body.extend(record);
            } else {
                tracing::warn!(
                    bucket,
                    key,
                    "a stored object too large for a backup record: left out"
                );
            }
            if body.len() >= PAGE_BYTES {
                return Ok((body, last));
            }
        }
        Ok((body, if full { last } else { None }))
    })
    .await?;
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    if let Some(next) = next
        && let Ok(value) = header::HeaderValue::from_str(&encode_hex(&next))
    {
        response.headers_mut().insert(NEXT_HEADER, value);
    }
    Ok(response)
}

/// Merge a body of backup records into the cluster.
pub(super) async fn restore(State(state): State<AppState>, body: Bytes) -> ApiResult {
    let mut reader = Reader::records(body.as_ref());
    let mut records = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Some(record)) => records.push(record),
            Ok(None) => break,
            Err(e) => return Err(ApiError::bad_request(format!("not backup records: {e}"))),
        }
    }
    let cluster = &state.cluster;
    let restored = futures_util::stream::iter(records.into_iter().map(|record| async move {
        let outcome = match Object::decode(&record.object) {
            Ok(object) => {
                crate::requests::restore_object(cluster, &record.bucket, &record.key, &object).await
            }
            Err(e) => Err(e.to_string()),
        };
        (record.bucket, record.key, outcome)
    }))
    .buffer_unordered(RESTORE_CONCURRENCY);
    let outcomes: Vec<_> = restored.collect().await;
    let stored = outcomes.iter().filter(|(_, _, o)| o.is_ok()).count();
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|(bucket, key, outcome)| {
            let error = outcome.as_ref().err()?;
            let (bucket_type, bucket) = dynakv_core::bucket_types::split_bucket(bucket);
            Some(json!({"type": bucket_type, "bucket": bucket, "key": key, "error": error}))
        })
        .take(MAX_FAILURES_LISTED)
        .collect();
    Ok(super::json_response(
        StatusCode::OK,
        &json!({
            "records": outcomes.len(),
            "restored": stored,
            "failed": outcomes.len() - stored,
            "failures": failed,
        }),
    ))
}

fn encode_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2)
        || text.len() > 2 * (6 + 2 * dynakv_core::limits::MAX_KEY_BYTES)
    {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
