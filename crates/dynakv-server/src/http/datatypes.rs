//! Data types over HTTP, as Riak's: `GET /types/T/buckets/B/datatypes/K` answers
//! `{"type": .., "value": .., "context": ..}` (404 with the type when not found), `POST` to it
//! applies an operation (`{"increment": 1}`, `{"add_all": [..], "context": ..}`,
//! `{"update": {..}}`), `POST /types/T/buckets/B/datatypes` does so under a generated key
//! (201 with its `Location`). The requests themselves are `crate::datatypes`'.

use super::{
    ApiError, ApiResult, AppState, Body, HeaderMap, IntoResponse, Query, RawPathParams, Response,
    State, StatusCode, URL_SAFE, bucket_and_key, bucket_param, header, json, json_response,
    objects, parse_options,
};
use crate::datatypes::{self, Fetched, UpdateQuorums};
use crate::stats::Op;
use dynakv_core::crdt::{self, Update};
use percent_encoding::utf8_percent_encode;
use std::collections::HashMap;
use std::time::Instant;

/// `include_context` (default true), as Riak's query parameter.
fn include_context(query: &HashMap<String, String>) -> Result<bool, ApiError> {
    match query.get("include_context").map(String::as_str) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(ApiError::bad_request(
            "include_context must be true or false",
        )),
    }
}

fn body_of(fetched: &Fetched) -> serde_json::Value {
    let mut body = match &fetched.value {
        Some(value) => value.to_json(),
        None => json!({"type": fetched.kind.name()}),
    };
    if let (Some(context), Some(map)) = (&fetched.context, body.as_object_mut()) {
        map.insert("context".into(), json!(context));
    }
    body
}

pub(super) async fn fetch(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (bucket, key) = bucket_and_key(&params)?;
        let props = state.cluster.bucket_props(&bucket);
        let kind = datatypes::kind_of(&props, &bucket).map_err(ApiError::bad_request)?;
        let options = parse_options(&query, &props)?;
        let fetched = datatypes::fetch(
            &state.cluster,
            (&bucket, &key),
            kind,
            (options.r, options.pr),
            include_context(&query)?,
        )
        .await?;
        if fetched.value.is_none() {
            state
                .stats
                .not_found
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"type": kind.name(), "error": "notfound"}),
            ));
        }
        Ok(json_response(StatusCode::OK, &body_of(&fetched)))
    }
    .await;
    objects::timed(&state, Op::Get, started, result)
}

pub(super) async fn update(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = match bucket_and_key(&params) {
        Ok((bucket, key)) => {
            update_inner(&state, (bucket, key, false), &query, &headers, body).await
        }
        Err(e) => Err(e),
    };
    objects::timed(&state, Op::Put, started, result)
}

pub(super) async fn create(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = match bucket_param(&params) {
        Ok(bucket) => {
            let key = objects::random_token(22);
            update_inner(&state, (bucket, key, true), &query, &headers, body).await
        }
        Err(e) => Err(e),
    };
    objects::timed(&state, Op::Put, started, result)
}

async fn update_inner(
    state: &AppState,
    (bucket, key, created): (String, String, bool),
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult {
    let props = state.cluster.bucket_props(&bucket);
    let kind = datatypes::kind_of(&props, &bucket).map_err(ApiError::bad_request)?;
    let options = parse_options(query, &props)?;
    let include_context = include_context(query)?;
    let bytes = objects::read_body(state, headers, body).await?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the operation is not JSON: {e}")))?;
    let op = crdt::parse_op(kind, &json).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let context = match json.get("context") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(text)) if text.is_empty() => None,
        Some(serde_json::Value::String(text)) => Some(
            datatypes::client_context(&state.cluster, &bucket, &key, text)
                .map_err(ApiError::bad_request)?,
        ),
        Some(_) => return Err(ApiError::bad_request("context must be a string")),
    };
    let update = Update { kind, op, context };
    let quorums = UpdateQuorums {
        w: options.w,
        pw: options.pw,
        dw_given: options.dw_given,
    };
    let fetched = datatypes::update(
        &state.cluster,
        (&bucket, &key),
        &update,
        quorums,
        include_context,
    )
    .await?;
    if created {
        // Riak answers a created key with its value, whatever `returnbody` says.
        let location = format!(
            "{}/datatypes/{}",
            super::public_bucket_path(&bucket),
            utf8_percent_encode(&key, URL_SAFE)
        );
        let mut response = json_response(StatusCode::CREATED, &body_of(&fetched));
        if let Ok(value) = axum::http::HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        return Ok(response);
    }
    if options.return_body {
        return Ok(json_response(StatusCode::OK, &body_of(&fetched)));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
