//! Secondary index queries over HTTP, as Riak's: `GET /buckets/B/index/NAME/TERM` (exact)
//! and `/buckets/B/index/NAME/START/END` (range, inclusive), also under `/types/T/`, with
//! `max_results` and `continuation` (pagination), `return_terms` and `stream`. The special
//! indexes `$bucket` (every key) and `$key` (a key range). The query itself is
//! `crate::requests::index_page`'s.

use super::{
    ApiError, ApiResult, AppState, Body, HashMap, IntoResponse, Query, RawPathParams, StatusCode,
    bucket_param, header, json, path_param,
};
use dynakv_core::index::{self, Hit};
use std::time::Instant;

/// What a query asks for besides its terms.
struct Options {
    max_results: Option<usize>,
    continuation: Option<String>,
    return_terms: bool,
    stream: bool,
}

fn flag(query: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match query.get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} must be true or false"
        ))),
    }
}

fn options(query: &HashMap<String, String>) -> Result<Options, ApiError> {
    let max_results = match query.get("max_results") {
        None => None,
        Some(text) => Some(
            text.parse::<usize>()
                .ok()
                .filter(|n| (1..=index::MAX_PAGE_RESULTS).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "max_results must be a number from 1 to {}",
                        index::MAX_PAGE_RESULTS
                    ))
                })?,
        ),
    };
    if query.contains_key("term_regex") {
        return Err(ApiError::bad_request(
            "term_regex is not supported by dynakv",
        ));
    }
    Ok(Options {
        max_results,
        continuation: query.get("continuation").filter(|c| !c.is_empty()).cloned(),
        return_terms: flag(query, "return_terms")?,
        stream: flag(query, "stream")?,
    })
}

/// A result as JSON: the key, or `{"term": "key"}` with `return_terms`.
fn results_json(name: &str, hits: &[Hit], return_terms: bool) -> serde_json::Value {
    if return_terms {
        let results: Vec<serde_json::Value> = hits
            .iter()
            .map(|(term, key)| {
                let term = String::from_utf8_lossy(&index::unsortable(name, term)).into_owned();
                json!({ term: key })
            })
            .collect();
        json!({ "results": results })
    } else {
        json!({ "keys": hits.iter().map(|(_, key)| key).collect::<Vec<_>>() })
    }
}

pub(super) async fn query(
    axum::extract::State(state): axum::extract::State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
) -> axum::response::Response {
    let started = Instant::now();
    let result = run(&state, &params, &query).await;
    super::objects::timed(&state, crate::stats::Op::Get, started, result)
}

async fn run(
    state: &AppState,
    params: &RawPathParams,
    query: &HashMap<String, String>,
) -> ApiResult {
    let bucket = bucket_param(params)?;
    let name = path_param(params, "index")?;
    let start = path_param(params, "start")?;
    let end = params
        .iter()
        .any(|(n, _)| n == "end")
        .then(|| path_param(params, "end"))
        .transpose()?;
    let options = options(query)?;
    let limit = options.max_results.unwrap_or(index::INDEX_PAGE_RESULTS);
    let mut q = index::Query::new(
        &bucket,
        &name,
        (start.as_bytes(), end.as_deref().map(str::as_bytes)),
        options.continuation.as_deref(),
        limit,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let name = q.index.clone();
    if options.stream {
        return Ok(stream(
            state,
            q,
            (options.return_terms, options.max_results.is_some()),
        ));
    }
    let mut all = Vec::new();
    loop {
        let (hits, more) = crate::requests::index_page(&state.cluster, &q).await?;
        let last = hits.last().cloned();
        all.extend(hits);
        if options.max_results.is_some() || !more {
            let mut body = results_json(&name, &all, options.return_terms);
            if options.max_results.is_some()
                && more
                && let (Some(last), Some(map)) = (last, body.as_object_mut())
            {
                map.insert(
                    "continuation".into(),
                    json!(index::encode_continuation(&last)),
                );
            }
            return Ok(super::json_response(StatusCode::OK, &body));
        }
        if all.len() >= index::MAX_INDEX_RESULTS {
            return Err(ApiError::bad_request(format!(
                "the query has more than {} results: ask for pages (max_results, \
                 continuation) or stream them (stream=true)",
                index::MAX_INDEX_RESULTS
            )));
        }
        q.after = last;
    }
}

/// `stream=true`: `multipart/mixed` parts of results as they are found, then the
/// continuation (with `max_results`), as Riak streams them.
fn stream(
    state: &AppState,
    mut q: index::Query,
    (return_terms, paginated): (bool, bool),
) -> axum::response::Response {
    let boundary = super::objects::random_token(24);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(4);
    let cluster = std::sync::Arc::clone(&state.cluster);
    let part_boundary = boundary.clone();
    tokio::spawn(async move {
        let part = |value: &serde_json::Value| {
            axum::body::Bytes::from(format!(
                "\r\n--{part_boundary}\r\nContent-Type: application/json\r\n\r\n{value}"
            ))
        };
        let name = q.index.clone();
        loop {
            match crate::requests::index_page(&cluster, &q).await {
                Ok((hits, more)) => {
                    let last = hits.last().cloned();
                    if !hits.is_empty()
                        && tx
                            .send(Ok(part(&results_json(&name, &hits, return_terms))))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    if !more || last.is_none() {
                        break;
                    }
                    if paginated {
                        if let Some(last) = &last {
                            let continuation =
                                json!({ "continuation": index::encode_continuation(last) });
                            let _ = tx.send(Ok(part(&continuation))).await;
                        }
                        break;
                    }
                    q.after = last;
                }
                Err(e) => {
                    let _ = tx.send(Ok(part(&json!({ "error": e.to_string() })))).await;
                    break;
                }
            }
        }
        let _ = tx
            .send(Ok(axum::body::Bytes::from(format!(
                "\r\n--{part_boundary}--\r\n"
            ))))
            .await;
    });
    let body = Body::from_stream(super::listings::tokio_stream(rx));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            format!("multipart/mixed; boundary={boundary}"),
        )],
        body,
    )
        .into_response()
}
