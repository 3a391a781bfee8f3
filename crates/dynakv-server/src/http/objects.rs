//! Objects: fetch (with siblings, multipart, conditional requests), store, create and
//! delete, run through the core's request machines (`crate::requests`).

use super::{
    ApiError, ApiResult, ApiState, AppState, Body, BodyExt, BucketProps, BudgetRefusal, Bytes,
    Duration, HashMap, HeaderMap, HeaderName, HeaderValue, Instant, IntoResponse, META_PREFIX,
    Object, Op, Precondition, PutOp, Query, RawPathParams, Response, Sibling, State, StatusCode,
    UNIX_EPOCH, URL_SAFE, VCLOCK_HEADER, WireContent, bucket_and_key, bucket_param, context,
    header, header_text, limits, parse_options, utf8_percent_encode,
};

pub(super) fn http_date(ms: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(ms))
}

pub(super) fn bucket_link(bucket: &str) -> String {
    format!("<{}>; rel=\"up\"", super::public_bucket_path(bucket))
}

pub(super) fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// Headers describing one sibling.
pub(super) fn sibling_headers(headers: &mut HeaderMap, bucket: &str, sibling: &Sibling) {
    let content = &sibling.content;
    let content_type = if content.content_type.is_empty() {
        "application/octet-stream"
    } else {
        &content.content_type
    };
    insert(headers, "content-type", content_type);
    insert(headers, "etag", &sibling.vtag());
    insert(
        headers,
        "last-modified",
        &http_date(content.last_modified_ms),
    );
    insert(headers, "link", &bucket_link(bucket));
    for (name, value) in &content.meta {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("{META_PREFIX}{name}").as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    // Index entries as Riak sends them: one header per index, its terms comma-separated.
    let mut by_name: std::collections::BTreeMap<&str, Vec<String>> =
        std::collections::BTreeMap::new();
    for (name, term) in &content.indexes {
        by_name
            .entry(name)
            .or_default()
            .push(String::from_utf8_lossy(term).into_owned());
    }
    for (name, terms) in by_name {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("{INDEX_PREFIX}{name}").as_bytes()),
            HeaderValue::from_str(&terms.join(", ")),
        ) {
            headers.append(name, value);
        }
    }
}

/// The prefix of an index entry's header (`X-Riak-Index-NAME_bin: term, term`).
const INDEX_PREFIX: &str = "x-riak-index-";

/// A write's index entries from its `X-Riak-Index-*` headers, checked.
pub(super) fn index_entries(
    headers: &HeaderMap,
) -> Result<Vec<dynakv_core::index::IndexEntry>, ApiError> {
    let mut entries = Vec::new();
    for (name, value) in headers {
        if let Some(index) = name.as_str().strip_prefix(INDEX_PREFIX) {
            let value = header_text(value, name.as_str())?;
            for term in value.split(',') {
                entries.push((index.to_owned(), term.trim().as_bytes().to_vec()));
                if entries.len() > dynakv_core::index::MAX_INDEX_ENTRIES {
                    return Err(ApiError::bad_request(
                        dynakv_core::index::IndexError::TooMany.to_string(),
                    ));
                }
            }
        }
    }
    dynakv_core::index::normalize(entries).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(super) fn accepts_multipart(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("multipart/mixed"))
}

/// The response for an object, as a fetch (or a store with `returnbody=true`) gives it.
pub(super) fn object_response(
    state: &ApiState,
    (bucket, key): (&str, &str),
    object: &Object,
    props: &BucketProps,
    request_headers: &HeaderMap,
    vtag: Option<&str>,
    success: StatusCode,
) -> ApiResult {
    let context = context::encode(
        state.cluster.secret(),
        bucket.as_bytes(),
        key.as_bytes(),
        object.clock(),
    );
    let mut headers = HeaderMap::new();
    if !object.clock().is_empty() {
        insert(&mut headers, VCLOCK_HEADER, &context);
    }
    insert(&mut headers, "vary", "Accept-Encoding");
    if let Some(vtag) = vtag {
        let sibling = object
            .sibling_by_vtag(vtag)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no sibling with that vtag"))?;
        sibling_headers(&mut headers, bucket, sibling);
        if sibling.content.deleted {
            insert(&mut headers, "x-riak-deleted", "true");
        }
        let body = budgeted_body(state, sibling.content.value.clone())?;
        return Ok((success, headers, body).into_response());
    }
    let live: Vec<&Sibling> = if props.allow_mult {
        object.live_siblings().collect()
    } else {
        object.newest_live_sibling().into_iter().collect()
    };
    state.stats.record_siblings(live.len());
    state.stats.causality.record_read(
        bucket,
        key,
        object.live_siblings().count(),
        object.clock().len(),
    );
    match live.as_slice() {
        [] => {
            state
                .stats
                .not_found
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !object.clock().is_empty() {
                insert(&mut headers, "x-riak-deleted", "true");
            }
            insert(&mut headers, "content-type", "text/plain");
            Ok((StatusCode::NOT_FOUND, headers, "not found\n").into_response())
        }
        [only] => {
            if not_modified(request_headers, only) {
                return Ok((StatusCode::NOT_MODIFIED, headers).into_response());
            }
            sibling_headers(&mut headers, bucket, only);
            let body = budgeted_body(state, only.content.value.clone())?;
            Ok((success, headers, body).into_response())
        }
        many if accepts_multipart(request_headers) => {
            let boundary = multipart_boundary(many);
            insert(
                &mut headers,
                "content-type",
                &format!("multipart/mixed; boundary={boundary}"),
            );
            // Reserved before the body is built: a refused request copies nothing.
            let size = many.iter().fold(0usize, |sum, s| {
                sum.saturating_add(s.content.value.len())
                    .saturating_add(MULTIPART_PART_OVERHEAD_BYTES)
            });
            let permit = reserve_response(state, size)?;
            let body = multipart_body(bucket, many, &boundary);
            Ok((
                StatusCode::MULTIPLE_CHOICES,
                headers,
                held_body(body, permit),
            )
                .into_response())
        }
        many => {
            insert(&mut headers, "content-type", "text/plain");
            let mut body = String::from("Siblings:\n");
            for sibling in many {
                body.push_str(&sibling.vtag());
                body.push('\n');
            }
            Ok((StatusCode::MULTIPLE_CHOICES, headers, body).into_response())
        }
    }
}

/// Bytes counted for one part of a multipart response beyond its value (boundary, headers).
pub(super) const MULTIPART_PART_OVERHEAD_BYTES: usize = 256;

/// Reserve `bytes` of the node's response budget (`response_budget_bytes`) for a response
/// being built and sent, or refuse it with 503 (a clear reason, `Retry-After`).
pub(crate) fn reserve_response(
    state: &ApiState,
    bytes: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let budget = state.http.limits.response_budget_bytes;
    state
        .http
        .responses
        .try_take(bytes)
        .map_err(|refusal| match refusal {
            BudgetRefusal::TooLarge => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the response would hold {bytes} bytes, more than this node sends at once \
                 ({budget}): fetch the siblings one at a time with ?vtag= and resolve them"
                ),
            ),
            BudgetRefusal::Exhausted => ApiError::overloaded(format!(
                "overloaded: responses being sent by this node hold their budget of {budget} \
             bytes; retry later"
            )),
        })
}

/// A response body counted in the response budget until it has been sent (or dropped).
pub(super) fn budgeted_body(state: &ApiState, value: Vec<u8>) -> Result<Body, ApiError> {
    let permit = reserve_response(state, value.len())?;
    Ok(held_body(value, permit))
}

/// `bytes` as a body that holds `permit` until the body is dropped: after its last byte was
/// handed to the connection, or when the connection closed.
pub(super) fn held_body(bytes: Vec<u8>, permit: tokio::sync::OwnedSemaphorePermit) -> Body {
    Body::new(HeldBody {
        data: Some(Bytes::from(bytes)),
        permit: Some(permit),
    })
}

/// One chunk of bytes and a budget permit, released when the end of the body is polled
/// (hyper polls for it once the chunk was written out) or the body is dropped. Its exact
/// size keeps `Content-Length` on the response.
pub(super) struct HeldBody {
    data: Option<Bytes>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = self
            .data
            .take()
            .map(|data| Ok(hyper::body::Frame::data(data)));
        if frame.is_none() {
            self.permit = None;
        }
        std::task::Poll::Ready(frame)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

pub(super) fn not_modified(request: &HeaderMap, sibling: &Sibling) -> bool {
    if let Some(tags) = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let vtag = sibling.vtag();
        return tags
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
            .any(|t| t == vtag || t == "*");
    }
    if let Some(since) = request
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        let modified = UNIX_EPOCH + Duration::from_millis(sibling.content.last_modified_ms);
        // HTTP dates have second resolution.
        return modified
            .duration_since(since)
            .is_ok_and(|d| d < Duration::from_secs(1))
            || modified < since;
    }
    false
}

pub(super) fn multipart_boundary(siblings: &[&Sibling]) -> String {
    loop {
        let boundary = random_token(27);
        let clash = siblings.iter().any(|s| {
            s.content
                .value
                .windows(boundary.len())
                .any(|w| w == boundary.as_bytes())
        });
        if !clash {
            return boundary;
        }
    }
}

pub(super) fn multipart_body(bucket: &str, siblings: &[&Sibling], boundary: &str) -> Vec<u8> {
    let size: usize = siblings.iter().map(|s| s.content.value.len() + 256).sum();
    let mut body = Vec::with_capacity(size);
    for sibling in siblings {
        body.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        let mut headers = HeaderMap::new();
        sibling_headers(&mut headers, bucket, sibling);
        for (name, value) in &headers {
            body.extend_from_slice(display_header_name(name.as_str()).as_bytes());
            body.extend_from_slice(b": ");
            body.extend_from_slice(value.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&sibling.content.value);
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// `x-riak-meta-color` -> `X-Riak-Meta-Color`, as Riak writes part headers.
pub(super) fn display_header_name(name: &str) -> String {
    match name {
        "etag" => "Etag".to_owned(),
        other => other
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect::<Vec<_>>()
            .join("-"),
    }
}

pub(crate) fn random_token(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..len)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

pub(super) fn timed(state: &ApiState, op: Op, started: Instant, result: ApiResult) -> Response {
    let ok = match &result {
        Ok(r) => !r.status().is_server_error(),
        Err(e) => !e.status.is_server_error(),
    };
    if let Err(e) = &result
        && e.status.is_client_error()
    {
        state
            .stats
            .bad_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    state.stats.record(op, started.elapsed(), ok);
    result.into_response()
}

pub(super) async fn fetch_object(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let result = fetch_inner(&state, &params, &query, &headers).await;
    timed(&state, Op::Get, started, result)
}

pub(super) async fn fetch_inner(
    state: &AppState,
    params: &RawPathParams,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiResult {
    let (bucket, key) = bucket_and_key(params)?;
    let props = state.cluster.bucket_props(&bucket);
    let options = parse_options(query, &props)?;
    let object = crate::requests::get(&state.cluster, &bucket, &key, options.r, options.pr).await?;
    object_response(
        state,
        (&bucket, &key),
        &object,
        &props,
        headers,
        options.vtag.as_deref(),
        StatusCode::OK,
    )
}

/// Read a request body through the configured value limit.
pub(super) async fn read_body(
    state: &ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("value is larger than {} bytes", state.max_value_bytes),
        )
    };
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?;
        if length > state.max_value_bytes as u64 {
            return Err(too_large());
        }
    }
    let limited = http_body_util::Limited::new(body, state.max_value_bytes);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::bad_request("could not read the request body")),
    }
}

/// The client's context, if it sent one. A malformed or forged one is an error, never
/// treated as "no context".
pub(super) fn client_context(
    state: &ApiState,
    headers: &HeaderMap,
    bucket: &str,
    key: &str,
) -> Result<Option<dynakv_core::version::VersionVector>, ApiError> {
    let Some(value) = headers.get(VCLOCK_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("X-Riak-Vclock is not ASCII"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    context::decode(
        state.cluster.secret(),
        bucket.as_bytes(),
        key.as_bytes(),
        text,
    )
    .map(Some)
    .map_err(|e| ApiError::bad_request(format!("invalid X-Riak-Vclock: {e}")))
}

pub(super) fn user_meta(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut meta = Vec::new();
    let mut bytes = 0;
    for (name, value) in headers {
        if let Some(meta_name) = name.as_str().strip_prefix(META_PREFIX) {
            if meta_name.is_empty() {
                return Err(ApiError::bad_request("empty X-Riak-Meta- header name"));
            }
            let value = header_text(value, name.as_str())?;
            bytes += meta_name.len() + value.len();
            meta.push((meta_name.to_owned(), value));
        }
    }
    check_user_meta(meta.len(), bytes).map_err(ApiError::bad_request)?;
    Ok(meta)
}

/// The user metadata entry that gives a value its time to live in seconds (HTTP's
/// `X-Riak-Meta-Dynakv-Ttl` or `X-Dynakv-Ttl`, PB's `usermeta`), taken out of the metadata.
pub(crate) const TTL_META: &str = "dynakv-ttl";

/// A write's time to live from its metadata (the entry is removed), checked.
pub(crate) fn take_ttl(meta: &mut Vec<(String, String)>) -> Result<Option<u64>, String> {
    let Some(at) = meta
        .iter()
        .position(|(name, _)| name.eq_ignore_ascii_case(TTL_META))
    else {
        return Ok(None);
    };
    let (_, value) = meta.remove(at);
    let max = dynakv_core::bucket::MAX_TTL_SECS;
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|secs| (1..=max).contains(secs))
        .map(Some)
        .ok_or_else(|| format!("{TTL_META} must be a number of seconds from 1 to {max}"))
}

/// The bounds on an object's user metadata (`entries` pairs of `bytes` names and values in
/// all), the same over HTTP and PB.
pub(crate) fn check_user_meta(entries: usize, bytes: usize) -> Result<(), String> {
    if entries > limits::MAX_META_ENTRIES || bytes > limits::MAX_META_BYTES {
        return Err(format!(
            "too much user metadata (at most {} entries and {} bytes)",
            limits::MAX_META_ENTRIES,
            limits::MAX_META_BYTES
        ));
    }
    Ok(())
}

pub(super) fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        if header_text(value, "If-None-Match")?.trim() == "*" {
            return Ok(Precondition::Absent);
        }
        return Err(ApiError::bad_request(
            "only If-None-Match: * is supported on writes",
        ));
    }
    if let Some(value) = headers.get(header::IF_MATCH) {
        let tag = header_text(value, "If-Match")?;
        return Ok(Precondition::Matches(
            tag.trim().trim_matches('"').to_owned(),
        ));
    }
    Ok(Precondition::None)
}

pub(super) async fn store_object(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = match bucket_and_key(&params) {
        Ok((bucket, key)) => store_inner(&state, bucket, key, &query, &headers, body, false).await,
        Err(e) => Err(e),
    };
    timed(&state, Op::Put, started, result)
}

pub(super) async fn create_object(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = match bucket_param(&params) {
        Ok(bucket) => {
            let key = random_token(22);
            store_inner(&state, bucket, key, &query, &headers, body, true).await
        }
        Err(e) => Err(e),
    };
    timed(&state, Op::Put, started, result)
}

pub(super) async fn store_inner(
    state: &AppState,
    bucket: String,
    key: String,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
    created: bool,
) -> ApiResult {
    let props = state.cluster.bucket_props(&bucket);
    let options = parse_options(query, &props)?;
    let context = client_context(state, headers, &bucket, &key)?;
    let mut meta = user_meta(headers)?;
    if let Some(value) = headers.get("x-dynakv-ttl") {
        meta.push((TTL_META.to_owned(), header_text(value, "X-Dynakv-Ttl")?));
    }
    let ttl_secs = take_ttl(&mut meta).map_err(ApiError::bad_request)?;
    let indexes = index_entries(headers)?;
    let precondition = precondition(headers)?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(value) => header_text(value, "Content-Type")?,
        None => "application/octet-stream".to_owned(),
    };
    if content_type.len() > limits::MAX_CONTENT_TYPE_BYTES {
        return Err(ApiError::bad_request("Content-Type is too long"));
    }
    let value = read_body(state, headers, body).await?;
    let now = state.cluster.now_ms();
    state
        .stats
        .bytes_written
        .fetch_add(value.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let op = PutOp {
        bucket: bucket.clone(),
        key: key.clone(),
        context,
        content: WireContent {
            value: value.to_vec(),
            content_type,
            meta,
            deleted: false,
            indexes,
            ttl_secs,
        },
        w: options.w,
        pw: options.pw,
        dw_given: options.dw_given,
        precondition,
    };
    let stored = crate::requests::put(&state.cluster, op, now).await?;
    let location = format!(
        "{}/keys/{}",
        super::public_bucket_path(&bucket),
        utf8_percent_encode(&key, URL_SAFE)
    );
    if options.return_body {
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let mut response = object_response(
            state,
            (&bucket, &key),
            &stored,
            &props,
            headers,
            None,
            status,
        )?;
        if created && let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        return Ok(response);
    }
    if created {
        return Ok((StatusCode::CREATED, [(header::LOCATION, location)]).into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn delete_object(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let result = delete_inner(&state, &params, &query, &headers).await;
    timed(&state, Op::Delete, started, result)
}

pub(super) async fn delete_inner(
    state: &AppState,
    params: &RawPathParams,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiResult {
    let (bucket, key) = bucket_and_key(params)?;
    let props = state.cluster.bucket_props(&bucket);
    let options = parse_options(query, &props)?;
    let context = client_context(state, headers, &bucket, &key)?;
    let quorums = crate::requests::DeleteQuorums {
        r: options.r,
        pr: options.pr,
        w: options.w,
        pw: options.pw,
        rw: options.rw,
        dw_given: options.dw_given,
    };
    if !crate::requests::delete(&state.cluster, (bucket, key), context, quorums).await? {
        return Ok(ApiError::new(StatusCode::NOT_FOUND, "not found").into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
