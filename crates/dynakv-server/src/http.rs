//! The client HTTP API, compatible with Riak KV's HTTP interface (key/value subset).
//!
//! Every handler validates its whole input before touching storage: a bad name, quorum,
//! context, header or body is a 4xx with a one-line explanation and changes nothing. Bodies
//! are refused from `Content-Length` before they are read when too large, and read through a
//! hard limit otherwise. Storage calls run on the blocking pool.

use crate::cluster::{Cluster, ClusterError, error_status};
use crate::http_serve::HttpLimits;
use crate::load_limit::LoadLimiter;
use crate::replica::{Precondition, ReplicaError};
use crate::stats::{Op, Stats};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, RawPathParams, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dynakv_core::bucket::{BucketProps, Quorum, props_from_body};
use dynakv_core::context;
use dynakv_core::keys;
use dynakv_core::limits;
use dynakv_core::membership::ClusterState;
use dynakv_core::message::WireContent;
use dynakv_core::object::{Object, Sibling};
use dynakv_core::request::{PutOp, RequestError};
use http_body_util::BodyExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Pages buffered between the storage scan and the HTTP stream.
const LIST_STREAM_BUFFER_PAGES: usize = 4;
/// Characters left as they are when a name is put in a URL.
const URL_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
const VCLOCK_HEADER: &str = "x-riak-vclock";
const META_PREFIX: &str = "x-riak-meta-";

/// What every handler shares.
#[derive(Debug)]
pub struct ApiState {
    pub cluster: Arc<Cluster>,
    pub node_name: String,
    pub stats: Arc<Stats>,
    pub max_value_bytes: usize,
    /// Admission of client data requests (at most `max_in_flight_requests` at once, fewer
    /// while the node is overloaded; see `load_limit`).
    pub limiter: Arc<LoadLimiter>,
    /// The client port's limits and the budgets they set.
    pub http: HttpGuards,
}

/// The client port's limits ([`HttpLimits`]) and the shared state that enforces them.
#[derive(Debug)]
pub struct HttpGuards {
    pub limits: HttpLimits,
    /// Bytes of request bodies held by requests (`request_body_budget_bytes`).
    request_bodies: ByteBudget,
    /// Bytes of object responses being sent (`response_budget_bytes`).
    responses: ByteBudget,
    /// Verified client credentials (see `auth`).
    pub auth: crate::auth::AuthCache,
}

impl HttpGuards {
    pub fn new(limits: HttpLimits) -> Self {
        HttpGuards {
            request_bodies: ByteBudget::new(limits.request_body_budget_bytes),
            responses: ByteBudget::new(limits.response_budget_bytes),
            auth: crate::auth::AuthCache::default(),
            limits,
        }
    }
}

/// A budget of bytes shared by the requests of a node, counted in KiB (a tokio semaphore of
/// KiB permits): a reservation that does not fit is refused at once, never queued.
#[derive(Debug)]
struct ByteBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total_kib: u32,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BudgetRefusal {
    /// More than the whole budget: it can never fit.
    TooLarge,
    /// Not now: what others hold leaves too little.
    Exhausted,
}

impl ByteBudget {
    fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        ByteBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Reserve `bytes` (at least 1 KiB) until the permit is dropped.
    fn try_take(&self, bytes: usize) -> Result<tokio::sync::OwnedSemaphorePermit, BudgetRefusal> {
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        if kib > self.total_kib {
            return Err(BudgetRefusal::TooLarge);
        }
        Arc::clone(&self.kib)
            .try_acquire_many_owned(kib)
            .map_err(|_| BudgetRefusal::Exhausted)
    }
}

pub type AppState = Arc<ApiState>;

/// An error answered to the client: a status and a one-line reason.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Answer with `Retry-After: 1` (a refusal for load that passes).
    retry_after: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: false,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 503 with `Retry-After: 1`: refused for a load that passes.
    fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.message;
        body.push('\n');
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response();
        if self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError::from(ClusterError::from(e))
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let (status, message) = error_status(&e);
        if status >= 500 {
            tracing::warn!(error = %e, "request failed");
        }
        ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message,
        )
    }
}

impl From<ReplicaError> for ApiError {
    fn from(e: ReplicaError) -> Self {
        let status = match &e {
            ReplicaError::Storage(_) | ReplicaError::Corrupt(_) => {
                tracing::error!(error = %e, "local storage operation failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ReplicaError::Write(_) => StatusCode::CONFLICT,
            ReplicaError::Precondition(_) => StatusCode::PRECONDITION_FAILED,
        };
        ApiError::new(status, e.to_string())
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// The router of the client API.
pub fn router(state: AppState) -> Router {
    let buckets = Router::new()
        .route("/buckets", get(list_buckets))
        .route("/buckets/{bucket}/keys", get(list_keys).post(create_object))
        .route(
            "/buckets/{bucket}/keys/{key}",
            get(fetch_object)
                .put(store_object)
                .post(store_object)
                .delete(delete_object),
        )
        .route(
            "/buckets/{bucket}/keys/",
            get(missing_key)
                .put(missing_key)
                .post(missing_key)
                .delete(missing_key),
        )
        .route("/buckets/{bucket}/keys/{key}/preflist", get(preflist))
        .route(
            "/buckets/{bucket}/props",
            get(get_props).put(set_props).delete(reset_props),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            shed_load,
        ));
    // Riak's old-style paths (`/riak/B/K`, `/riak/B` for properties), which older clients
    // (the Java 1.x HTTP client among them) use.
    let legacy = Router::new()
        .route(
            "/riak/{bucket}/{key}",
            get(fetch_object)
                .put(store_object)
                .post(store_object)
                .delete(delete_object),
        )
        .route(
            "/riak/{bucket}",
            get(get_props).put(set_props).post(create_object),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            shed_load,
        ));
    Router::new()
        .route("/", get(list_resources))
        .merge(legacy)
        .route("/ping", get(ping))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/admin/status", get(admin_status))
        .route("/admin/ring", get(admin_ring))
        .route("/admin/routing", get(admin_routing))
        .route("/admin/members", get(admin_members))
        .route("/admin/handoffs", get(admin_handoffs))
        .route("/admin/aae", get(admin_aae))
        .route("/admin/join", axum::routing::post(admin_join))
        .route("/admin/leave", axum::routing::post(admin_leave))
        .route("/admin/replica/{bucket}/{key}", get(admin_replica))
        .merge(crate::security_api::routes())
        .nest("/types/default", buckets.clone())
        .merge(buckets)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            guard_request,
        ))
        .with_state(state)
}

/// The answer to a request the security checks refused (the reason is logged, not told).
fn refused(refusal: crate::auth::Refusal) -> Response {
    use crate::auth::Refusal;
    match refusal {
        Refusal::NeedsTls => ApiError::new(
            StatusCode::FORBIDDEN,
            "security is enabled on this cluster: use HTTPS, with credentials",
        )
        .into_response(),
        Refusal::Unauthenticated(reason) => {
            tracing::info!(reason, "request refused: not authenticated");
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, "authentication required").into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"dynakv\""),
            );
            response
        }
        Refusal::Forbidden { user, needed } => ApiError::new(
            StatusCode::FORBIDDEN,
            format!("user {user:?} needs {needed}"),
        )
        .into_response(),
    }
}

/// What every request passes before its handler (and before load shedding):
/// - a state-changing request (not GET, HEAD, OPTIONS or TRACE) carrying an `Origin` header
///   that `HttpLimits::allowed_origins` does not list is refused with 403 (a web page's
///   cross-site request: a `text/plain` POST needs no CORS preflight);
/// - a request with a body has it read in full here, through the largest body any route
///   takes, within `body_read_timeout` (else 408 and the connection is closed) and within
///   the node's budget of request-body bytes (else 503). So a request that enters load
///   shedding holds its whole body already: a client that never finishes its body never
///   holds an in-flight permit, and the bytes bodies hold are bounded.
async fn guard_request(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::body::HttpBody as _;
    if let Err(refusal) = crate::auth::check(
        &state.cluster.state().security,
        &state.http.auth,
        request
            .extensions()
            .get::<crate::http_serve::ClientConnection>(),
        request.method(),
        request.uri().path(),
        request.headers(),
    )
    .await
    {
        return refused(refusal);
    }
    if let Err(e) = check_origin(
        &state.http.limits.allowed_origins,
        request.method(),
        request.headers(),
    ) {
        return e.into_response();
    }
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let limit = state.max_value_bytes.max(limits::MAX_PROPS_BODY_BYTES);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
        .into_response()
    };
    let declared = request.body().size_hint().exact();
    if declared.is_some_and(|length| length > limit as u64) {
        return too_large();
    }
    // A body of unknown length (chunked) reserves the most it may be.
    let reserve = declared.map_or(limit, |length| length as usize);
    let Ok(_reserved) = state.http.request_bodies.try_take(reserve) else {
        return ApiError::overloaded(format!(
            "overloaded: request bodies being received and served on this node hold their \
             budget of {} bytes; retry later",
            state.http.limits.request_body_budget_bytes
        ))
        .into_response();
    };
    let (parts, body) = request.into_parts();
    let collected = tokio::time::timeout(
        state.http.limits.body_read_timeout,
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await;
    let bytes = match collected {
        Err(_elapsed) => {
            return (
                StatusCode::REQUEST_TIMEOUT,
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::CONNECTION, "close"),
                ],
                format!(
                    "the request body did not arrive within {} ms\n",
                    state.http.limits.body_read_timeout.as_millis()
                ),
            )
                .into_response();
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(_)) => {
            return ApiError::bad_request("could not read the request body").into_response();
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Methods that change nothing on this API.
fn safe_method(method: &axum::http::Method) -> bool {
    use axum::http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method)
}

/// Refuse a state-changing request from a web page whose origin is not allowed (see
/// [`guard_request`]).
fn check_origin(
    allowed: &[String],
    method: &axum::http::Method,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    if safe_method(method) {
        return Ok(());
    }
    for origin in headers.get_all(header::ORIGIN) {
        let text = origin.to_str().unwrap_or("(not ASCII)");
        if !allowed.iter().any(|a| a == text) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "cross-site request refused: {method} from a web page of origin {text:?}, \
                     which this node does not allow (clients other than browsers send no \
                     Origin header; allowed origins are HttpLimits::allowed_origins)"
                ),
            ));
        }
    }
    Ok(())
}

/// Load shedding: a data request that finds the in-flight limit reached (`max_in_flight_requests`,
/// or less while the node is saturated and its p99 is above `overload_latency_target_ms`) is
/// answered 503 at once (with `Retry-After`) instead of queueing, so the latency of accepted
/// requests stays bounded when clients offer more than the node can serve. The permit is
/// taken once the request's body has arrived ([`guard_request`] reads it first), and held
/// until the handler returns. Ping, stats and admin requests are not counted, so an
/// overloaded node can still be observed.
async fn shed_load(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(_permit) = state.limiter.try_admit() else {
        state
            .stats
            .requests_shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return ApiError::overloaded(format!(
            "overloaded: {} requests already in flight on this node (limit {} of at most {}); retry later",
            state.limiter.in_flight(),
            state.limiter.limit(),
            state.limiter.ceiling()
        ))
        .into_response();
    };
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        RING_VERSION_HEADER,
        header::HeaderValue::from(state.cluster.state().ring.version),
    );
    response
}

/// The ring version a data response was served under (for client-side routing).
const RING_VERSION_HEADER: &str = "x-dynakv-ring-version";

async fn missing_key() -> ApiError {
    ApiError::bad_request("key is empty")
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such resource")
}

/// Decode one path segment as Riak does: `+` is a space, then percent-decoding; must be UTF-8.
fn decode_segment(raw: &str, what: &str) -> Result<String, ApiError> {
    let plus = raw.replace('+', " ");
    percent_decode_str(&plus)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ApiError::bad_request(format!("{what} is not valid UTF-8 after URL decoding")))
}

fn path_param(params: &RawPathParams, name: &str) -> Result<String, ApiError> {
    let raw = params
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::bad_request(format!("missing {name}")))?;
    decode_segment(raw, name)
}

fn bucket_param(params: &RawPathParams) -> Result<String, ApiError> {
    let bucket = path_param(params, "bucket")?;
    keys::check_bucket(bucket.as_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(bucket)
}

fn bucket_and_key(params: &RawPathParams) -> Result<(String, String), ApiError> {
    let bucket = bucket_param(params)?;
    let key = path_param(params, "key")?;
    keys::check_key(key.as_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((bucket, key))
}

/// Run a storage call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "storage task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error in a storage task",
            ))
        }
    }
}

/// Request options shared by fetch, store and delete.
#[derive(Debug, Default)]
struct RequestOptions {
    return_body: bool,
    vtag: Option<String>,
    dw_given: bool,
    r: Option<Quorum>,
    w: Option<Quorum>,
    pr: Option<Quorum>,
    pw: Option<Quorum>,
}

/// Check the quorum and flag parameters against the bucket; unknown parameters are ignored
/// as Riak does (clients send `timeout`, `props`, ...), known ones must be well formed.
fn parse_options(
    query: &HashMap<String, String>,
    props: &BucketProps,
) -> Result<RequestOptions, ApiError> {
    let mut options = RequestOptions::default();
    for (name, value) in query {
        match name.as_str() {
            "r" | "w" | "dw" | "pr" | "pw" | "rw" => {
                let quorum = Quorum::parse(value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid {name} {value:?}: expected a number or one, quorum, all, default"
                    ))
                })?;
                if let Quorum::Count(count) = quorum
                    && count > props.n_val
                {
                    return Err(ApiError::bad_request(format!(
                        "{name}={count} is more than the bucket's n_val {}",
                        props.n_val
                    )));
                }
                match name.as_str() {
                    "dw" => {
                        options.dw_given = !matches!(quorum, Quorum::Count(0) | Quorum::Default);
                    }
                    "r" => options.r = Some(quorum),
                    "w" => options.w = Some(quorum),
                    "pr" => options.pr = Some(quorum),
                    "pw" => options.pw = Some(quorum),
                    _ => {}
                }
            }
            "returnbody" => match value.as_str() {
                "true" => options.return_body = true,
                "false" => options.return_body = false,
                _ => {
                    return Err(ApiError::bad_request("returnbody must be true or false"));
                }
            },
            "basic_quorum" | "notfound_ok" | "asis" if value != "true" && value != "false" => {
                return Err(ApiError::bad_request(format!(
                    "{name} must be true or false"
                )));
            }
            "timeout" => {
                value.parse::<u64>().map_err(|_| {
                    ApiError::bad_request("timeout must be a number of milliseconds")
                })?;
            }
            "vtag" => options.vtag = Some(value.clone()),
            _ => {}
        }
    }
    Ok(options)
}

fn header_text(value: &HeaderValue, what: &str) -> Result<String, ApiError> {
    value
        .to_str()
        .map(str::to_owned)
        .map_err(|_| ApiError::bad_request(format!("{what} header is not visible ASCII")))
}

fn http_date(ms: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(ms))
}

fn bucket_link(bucket: &str) -> String {
    format!(
        "</buckets/{}>; rel=\"up\"",
        utf8_percent_encode(bucket, URL_SAFE)
    )
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// Headers describing one sibling.
fn sibling_headers(headers: &mut HeaderMap, bucket: &str, sibling: &Sibling) {
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
}

fn accepts_multipart(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("multipart/mixed"))
}

/// The response for an object, as a fetch (or a store with `returnbody=true`) gives it.
fn object_response(
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
const MULTIPART_PART_OVERHEAD_BYTES: usize = 256;

/// Reserve `bytes` of the node's response budget (`response_budget_bytes`) for a response
/// being built and sent, or refuse it with 503 (a clear reason, `Retry-After`).
fn reserve_response(
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
fn budgeted_body(state: &ApiState, value: Vec<u8>) -> Result<Body, ApiError> {
    let permit = reserve_response(state, value.len())?;
    Ok(held_body(value, permit))
}

/// `bytes` as a body that holds `permit` until the body is dropped: after its last byte was
/// handed to the connection, or when the connection closed.
fn held_body(bytes: Vec<u8>, permit: tokio::sync::OwnedSemaphorePermit) -> Body {
    Body::new(HeldBody {
        data: Some(Bytes::from(bytes)),
        permit: Some(permit),
    })
}

/// One chunk of bytes and a budget permit, released when the end of the body is polled
/// (hyper polls for it once the chunk was written out) or the body is dropped. Its exact
/// size keeps `Content-Length` on the response.
struct HeldBody {
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

fn not_modified(request: &HeaderMap, sibling: &Sibling) -> bool {
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

fn multipart_boundary(siblings: &[&Sibling]) -> String {
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

fn multipart_body(bucket: &str, siblings: &[&Sibling], boundary: &str) -> Vec<u8> {
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
fn display_header_name(name: &str) -> String {
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

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..len)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

fn timed(state: &ApiState, op: Op, started: Instant, result: ApiResult) -> Response {
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

async fn fetch_object(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let result = fetch_inner(&state, &params, &query, &headers).await;
    timed(&state, Op::Get, started, result)
}

async fn fetch_inner(
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
async fn read_body(state: &ApiState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
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
fn client_context(
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

fn user_meta(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
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
    if meta.len() > limits::MAX_META_ENTRIES || bytes > limits::MAX_META_BYTES {
        return Err(ApiError::bad_request(format!(
            "too much user metadata (at most {} entries and {} bytes)",
            limits::MAX_META_ENTRIES,
            limits::MAX_META_BYTES
        )));
    }
    Ok(meta)
}

fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
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

async fn store_object(
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

async fn create_object(
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

async fn store_inner(
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
    let meta = user_meta(headers)?;
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
        },
        w: options.w,
        pw: options.pw,
        dw_given: options.dw_given,
        precondition,
    };
    let stored = crate::requests::put(&state.cluster, op, now).await?;
    let location = format!(
        "/buckets/{}/keys/{}",
        utf8_percent_encode(&bucket, URL_SAFE),
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

async fn delete_object(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let result = delete_inner(&state, &params, &query, &headers).await;
    timed(&state, Op::Delete, started, result)
}

async fn delete_inner(
    state: &AppState,
    params: &RawPathParams,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiResult {
    let (bucket, key) = bucket_and_key(params)?;
    let props = state.cluster.bucket_props(&bucket);
    let options = parse_options(query, &props)?;
    let context = client_context(state, headers, &bucket, &key)?;
    let existing =
        crate::requests::get(&state.cluster, &bucket, &key, options.r, options.pr).await?;
    if existing.is_deleted() {
        return Ok(ApiError::new(StatusCode::NOT_FOUND, "not found").into_response());
    }
    // Without a context, delete what the replicas hold now (as Riak does).
    let context = context.unwrap_or_else(|| existing.clock().clone());
    let now = state.cluster.now_ms();
    let op = PutOp {
        bucket,
        key,
        context: Some(context),
        content: WireContent {
            value: Vec::new(),
            content_type: String::new(),
            meta: Vec::new(),
            deleted: true,
        },
        w: options.w,
        pw: options.pw,
        dw_given: options.dw_given,
        precondition: Precondition::None,
    };
    crate::requests::put(&state.cluster, op, now).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn get_props(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let bucket = bucket_param(&params)?;
    let props = state.cluster.bucket_props(&bucket);
    Ok(json_response(
        StatusCode::OK,
        &json!({ "props": props.to_json(&bucket) }),
    ))
}

async fn set_props(
    State(state): State<AppState>,
    params: RawPathParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let bucket = bucket_param(&params)?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE)
        && !header_text(ct, "Content-Type")?.starts_with("application/json")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bucket properties must be sent as application/json",
        ));
    }
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len > limits::MAX_PROPS_BODY_BYTES)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bucket properties body too large",
        ));
    }
    let body = http_body_util::Limited::new(body, limits::MAX_PROPS_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bucket properties body too large",
            )
        })?
        .to_bytes();
    let update = props_from_body(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut props = state.cluster.bucket_props(&bucket);
    props
        .apply(&bucket, &update)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    change_props(&state, &bucket, Some(&props))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reset_props(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let bucket = bucket_param(&params)?;
    change_props(&state, &bucket, None)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Set (`Some`) or reset (`None`) a bucket's properties, refused with 400 when the bucket
/// would be one custom bucket too many (`Cluster::set_bucket_props` checks it with the core's
/// `check_custom_bucket_room`): past the limit gossip would not carry the change, and it
/// would stay on this node alone.
fn change_props(
    state: &ApiState,
    bucket: &str,
    props: Option<&BucketProps>,
) -> Result<(), ApiError> {
    state
        .cluster
        .set_bucket_props(bucket, props)?
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn list_keys(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let bucket = bucket_param(&params)?;
    let stream = match query.get("keys").map(String::as_str) {
        Some("true") => false,
        Some("stream") => true,
        _ => {
            return Err(ApiError::bad_request(
                "list keys with ?keys=true or ?keys=stream",
            ));
        }
    };
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(LIST_STREAM_BUFFER_PAGES);
    let (pages_tx, mut pages_rx) = tokio::sync::mpsc::channel::<Vec<String>>(1);
    let cluster = Arc::clone(&state.cluster);
    let listing =
        tokio::spawn(async move { crate::requests::list_keys(&cluster, &bucket, pages_tx).await });
    tokio::spawn(async move {
        if !stream
            && sender
                .send(Ok(Bytes::from_static(b"{\"keys\":[")))
                .await
                .is_err()
        {
            return;
        }
        let mut first = true;
        while let Some(keys) = pages_rx.recv().await {
            let chunk = if stream {
                json!({ "keys": keys }).to_string()
            } else {
                let mut chunk = String::new();
                for key in &keys {
                    if !first {
                        chunk.push(',');
                    }
                    first = false;
                    chunk.push_str(&json!(key).to_string());
                }
                chunk
            };
            if sender.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
        }
        match listing.await {
            Ok(Ok(())) => {
                let end: &'static [u8] = if stream { b"{\"keys\":[]}" } else { b"]}" };
                let _ = sender.send(Ok(Bytes::from_static(end))).await;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "key listing failed");
                let _ = sender.send(Err(std::io::Error::other(e.to_string()))).await;
            }
            Err(e) => {
                let _ = sender.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
    });
    let body = Body::from_stream(tokio_stream(receiver));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn tokio_stream<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

async fn list_buckets(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    match query.get("buckets").map(String::as_str) {
        Some("true" | "stream") => {}
        _ => {
            return Err(ApiError::bad_request(
                "list buckets with ?buckets=true or ?buckets=stream",
            ));
        }
    }
    let buckets = crate::requests::list_buckets(&state.cluster).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "buckets": buckets }),
    ))
}

async fn preflist(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let (bucket, key) = bucket_and_key(&params)?;
    let props = state.cluster.bucket_props(&bucket);
    let cluster = state.cluster.state();
    let partition = cluster
        .ring
        .current
        .partition_of(bucket.as_bytes(), key.as_bytes());
    let list: Vec<_> = cluster
        .ring
        .current
        .preference_list(partition, props.n_val.clamp(1, limits::MAX_N_VAL) as usize)
        .into_iter()
        .map(|(partition, node)| json!({"partition": partition, "node": node.0, "primary": true}))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "preflist": list })))
}

async fn ping() -> Response {
    ([(header::CONTENT_TYPE, "text/html")], "OK").into_response()
}

async fn list_resources() -> Response {
    let resources = [
        ("riak_kv_wm_buckets", "/buckets"),
        ("riak_kv_wm_ping", "/ping"),
        ("riak_kv_wm_stats", "/stats"),
        ("riak_kv_wm_preflist", "/buckets"),
        ("riak_kv_wm_raw", "/riak"),
    ];
    let body: serde_json::Map<String, serde_json::Value> = resources
        .iter()
        .map(|(name, path)| ((*name).to_owned(), json!(path)))
        .collect();
    let link = resources
        .iter()
        .map(|(name, path)| format!("<{path}>; rel=\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ");
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LINK, link),
        ],
        serde_json::Value::Object(body).to_string(),
    )
        .into_response()
}

fn ring_members(state: &ClusterState) -> Vec<String> {
    state
        .ring
        .current
        .nodes()
        .iter()
        .map(|n| n.id.0.clone())
        .collect()
}

async fn stats(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    let members = ring_members(&cluster);
    let mut body = state.stats.to_json(
        &state.node_name,
        &members,
        cluster.ring.current.partition_count(),
    );
    let hints = state.cluster.hint_stats();
    if let Some(map) = body.as_object_mut() {
        map.insert("ring_version".into(), json!(cluster.ring.version));
        map.insert("in_flight_limit".into(), json!(state.limiter.limit()));
        map.insert(
            "hints_held".into(),
            json!(hints.per_target.iter().map(|(_, c)| c).sum::<usize>()),
        );
        map.insert("hints_stored_total".into(), json!(hints.stored_total));
        map.insert("hints_delivered_total".into(), json!(hints.delivered_total));
        map.insert("hints_dropped_total".into(), json!(hints.dropped_total));
        map.insert("hints_corrupt_total".into(), json!(hints.corrupt_total));
        map.insert(
            "tombstones_reaped_total".into(),
            json!(state.cluster.tombstones_reaped()),
        );
    }
    json_response(StatusCode::OK, &body)
}

async fn metrics(State(state): State<AppState>) -> Response {
    use std::fmt::Write as _;
    let mut text = state.stats.to_prometheus();
    let hints = state.cluster.hint_stats();
    let _ = writeln!(text, "# TYPE dynakv_in_flight_limit gauge");
    let _ = writeln!(text, "dynakv_in_flight_limit {}", state.limiter.limit());
    let _ = writeln!(text, "# TYPE dynakv_hints_held gauge");
    for (target, count) in &hints.per_target {
        let _ = writeln!(text, "dynakv_hints_held{{target=\"{target}\"}} {count}");
    }
    for (name, value) in [
        ("dynakv_hints_stored_total", hints.stored_total),
        ("dynakv_hints_delivered_total", hints.delivered_total),
        ("dynakv_hints_dropped_total", hints.dropped_total),
        ("dynakv_hints_corrupt_total", hints.corrupt_total),
        (
            "dynakv_tombstones_reaped_total",
            state.cluster.tombstones_reaped(),
        ),
    ] {
        let _ = writeln!(text, "# TYPE {name} counter");
        let _ = writeln!(text, "{name} {value}");
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

async fn admin_status(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    json_response(
        StatusCode::OK,
        &json!({
            "node": state.node_name,
            "actor": state.cluster.replica().actor().to_string(),
            "cluster": cluster.cluster_name,
            "storage_engine": state.cluster.replica().storage().engine_name(),
            "ring_partitions": cluster.ring.current.partition_count(),
            "ring_version": cluster.ring.version,
            "settled": cluster.settled(),
            "members": ring_members(&cluster),
            "max_value_bytes": state.max_value_bytes,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    )
}

async fn admin_members(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    let members: Vec<_> = cluster
        .members
        .values()
        .map(|m| {
            json!({
                "name": m.id.0,
                "zone": m.zone,
                "status": m.status.as_str(),
                "peer_addr": m.peer_addr,
                "http_addr": m.http_addr,
                "up": state.cluster.is_up(&m.id),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "members": members }))
}

/// What a client needs to route requests itself (paper 6.4): the current ring (the same
/// structure the nodes use, so the client computes the same preference lists), its version,
/// and each member's HTTP address. Data responses carry `X-Dynakv-Ring-Version`, so a client
/// sees when this is stale.
async fn admin_routing(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    let members: serde_json::Map<String, serde_json::Value> = cluster
        .members
        .values()
        .map(|m| {
            (
                m.id.0.clone(),
                json!({"http_addr": m.http_addr, "up": state.cluster.is_up(&m.id)}),
            )
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "version": cluster.ring.version,
            "transition": cluster.ring.next.is_some(),
            "ring": cluster.ring.current,
            "members": members,
        }),
    )
}

fn owners_json(ring: &dynakv_core::ring::Ring) -> serde_json::Value {
    json!(
        ring.owners()
            .iter()
            .map(|n| n.0.clone())
            .collect::<Vec<_>>()
    )
}

async fn admin_ring(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    let ownership: Vec<_> = cluster
        .ring
        .current
        .ownership_counts()
        .into_iter()
        .map(|(node, count)| json!({"node": node.0, "partitions": count}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "partitions": cluster.ring.current.partition_count(),
            "version": cluster.ring.version,
            "settled": cluster.settled(),
            "claimant": cluster.claimant().map(|c| c.0.clone()),
            "ownership": ownership,
            "owners": owners_json(&cluster.ring.current),
            "next_owners": cluster.ring.next.as_ref().map(owners_json),
        }),
    )
}

async fn admin_handoffs(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    let moving: Vec<_> = match &cluster.ring.next {
        None => Vec::new(),
        Some(next) => cluster
            .ring
            .current
            .owners()
            .iter()
            .zip(next.owners())
            .enumerate()
            .filter(|(_, (from, to))| from != to)
            .map(|(partition, (from, to))| json!({"partition": partition, "from": from.0, "to": to.0}))
            .collect(),
    };
    let participants: Vec<_> = if cluster.ring.next.is_some() {
        cluster
            .transition_participants()
            .iter()
            .map(|n| json!({"node": n.0, "done": cluster.handoff_done(n)}))
            .collect()
    } else {
        Vec::new()
    };
    let hints = state.cluster.hint_stats();
    json_response(
        StatusCode::OK,
        &json!({
            "in_progress": cluster.ring.next.is_some(),
            "transition": cluster.ring.transition,
            "partitions_moving": moving,
            "nodes": participants,
            "hints": {
                "held_per_target": hints.per_target.iter().map(|(t, c)| json!({"target": t, "keys": c})).collect::<Vec<_>>(),
                "stored_total": hints.stored_total,
                "delivered_total": hints.delivered_total,
                "dropped_total": hints.dropped_total,
                "corrupt_total": hints.corrupt_total,
            },
        }),
    )
}

async fn admin_aae(State(state): State<AppState>) -> Response {
    let now_ms = state.cluster.monotonic_ms();
    let partitions: Vec<_> = state
        .cluster
        .aae_report()
        .into_iter()
        .map(|(partition, keys, record)| {
            let ago_ms = record.last_exchange_ms.map(|t| now_ms.saturating_sub(t));
            json!({
                "partition": partition,
                "keys": keys,
                "exchanges": record.exchanges,
                "last_exchange_seconds_ago": ago_ms.map(|ms| ms as f64 / 1000.0),
                "last_peer": record.last_peer.as_ref().map_or("", |p| p.0.as_str()),
                "keys_repaired_last": record.keys_repaired_last,
                "keys_repaired_total": record.keys_repaired_total,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "budget_keys_per_round": state.cluster.admission().budget(),
            "partitions": partitions,
        }),
    )
}

async fn admin_join(State(state): State<AppState>, body: Bytes) -> ApiResult {
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("body must be {\"peer\": \"HOST:PORT\"}"))?;
    let peer: std::net::SocketAddr = value
        .get("peer")
        .and_then(serde_json::Value::as_str)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| ApiError::bad_request("body must be {\"peer\": \"HOST:PORT\"}"))?;
    state.cluster.join(peer).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"joined": peer.to_string()}),
    ))
}

async fn admin_leave(State(state): State<AppState>) -> ApiResult {
    state.cluster.leave()?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"leaving": state.node_name}),
    ))
}

async fn admin_replica(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let (bucket, key) = bucket_and_key(&params)?;
    let replica = Arc::clone(state.cluster.replica());
    let object = blocking(move || replica.get(&bucket, &key)).await?;
    let body = match object {
        None => json!({"exists": false, "deleted": false, "values": []}),
        Some(object) => json!({
            "exists": true,
            "deleted": object.is_deleted(),
            "values": object
                .live_siblings()
                .map(|s| String::from_utf8_lossy(&s.content.value).into_owned())
                .collect::<Vec<_>>(),
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}
