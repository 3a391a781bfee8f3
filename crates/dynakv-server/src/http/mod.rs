//! The client HTTP API, compatible with Riak KV's HTTP interface (key/value subset).
//!
//! Every handler validates its whole input before touching storage: a bad name, quorum,
//! context, header or body is a 4xx with a one-line explanation and changes nothing. Bodies
//! are refused from `Content-Length` before they are read when too large, and read through a
//! hard limit otherwise. Storage calls run on the blocking pool.

use crate::http_serve::HttpLimits;
use crate::load_limit::LoadLimiter;
use crate::replica::{Precondition, ReplicaError};
use crate::stats::{Op, Stats};
use crate::view::{Cluster, ClusterError, error_status};
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
    /// Reserve `bytes` of the request-body budget for a PB frame being read, or say why not.
    pub(crate) fn reserve_request_body(
        &self,
        bytes: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
        self.request_bodies.try_take(bytes).map_err(|_| {
            format!(
                "overloaded: request bodies being received and served on this node hold their \
                 budget of {} bytes; retry later",
                self.limits.request_body_budget_bytes
            )
        })
    }

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
    /// The one-line reason (what a PB client is told).
    pub(crate) fn into_message(self) -> String {
        self.message
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
        let status = e.status();
        if status == 500 {
            tracing::error!(error = %e, "local storage operation failed");
        }
        ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.to_string(),
        )
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
            "/buckets/{bucket}/datatypes/{key}",
            get(datatypes::fetch).post(datatypes::update),
        )
        .route(
            "/buckets/{bucket}/datatypes",
            axum::routing::post(datatypes::create),
        )
        .route(
            "/buckets/{bucket}/index/{index}/{start}",
            get(secondary::query),
        )
        .route(
            "/buckets/{bucket}/index/{index}/{start}/{end}",
            get(secondary::query),
        )
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
        .route("/admin/pbs", get(admin::admin_pbs))
        .route("/admin/join", axum::routing::post(admin_join))
        .route("/admin/leave", axum::routing::post(admin_leave))
        .route(
            "/admin/force-remove",
            axum::routing::post(admin::admin_force_remove),
        )
        .route("/admin/backup/{partition}", get(backup::backup_page))
        .route("/console", get(console::index))
        .route("/console/app.js", get(console::script))
        .route("/console/style.css", get(console::style))
        .route("/admin/restore", axum::routing::post(backup::restore))
        .route("/admin/replica/{bucket}/{key}", get(admin_replica))
        .route("/admin/replica/{type}/{bucket}/{key}", get(admin_replica))
        .merge(crate::security_api::routes())
        .merge(types::routes())
        .nest(
            "/types/{type}",
            buckets
                .clone()
                .route_layer(axum::middleware::from_fn_with_state(
                    Arc::clone(&state),
                    types::require_active_type,
                )),
        )
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
    // A restore's body is a batch of whole stored objects (siblings and all).
    let limit = if request.uri().path() == "/admin/restore" {
        RESTORE_BODY_BYTES
    } else {
        state.max_value_bytes.max(limits::MAX_PROPS_BODY_BYTES)
    };
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

/// Largest restore request body (`POST /admin/restore`): a batch of backup records.
pub const RESTORE_BODY_BYTES: usize = 16 * 1024 * 1024;

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

/// The request's bucket: under `/types/{type}/...` the internal name of the type's bucket
/// (`require_active_type` checked the type), else the bucket's own name.
fn bucket_param(params: &RawPathParams) -> Result<String, ApiError> {
    let bucket = path_param(params, "bucket")?;
    keys::check_bucket(bucket.as_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match params.iter().find(|(name, _)| *name == "type") {
        Some(_) => {
            let bucket_type = path_param(params, "type")?;
            Ok(dynakv_core::bucket_types::internal_bucket(
                &bucket_type,
                &bucket,
            ))
        }
        None => Ok(bucket),
    }
}

/// The path of a bucket as clients name it: `/buckets/B`, or `/types/T/buckets/B`.
fn public_bucket_path(internal: &str) -> String {
    let (bucket_type, bucket) = dynakv_core::bucket_types::split_bucket(internal);
    let bucket = utf8_percent_encode(bucket, URL_SAFE);
    if bucket_type == dynakv_core::bucket_types::DEFAULT_TYPE {
        format!("/buckets/{bucket}")
    } else {
        format!(
            "/types/{}/buckets/{bucket}",
            utf8_percent_encode(bucket_type, URL_SAFE)
        )
    }
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
    rw: Option<Quorum>,
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
                let quorum = check_quorum(name, quorum, props).map_err(ApiError::bad_request)?;
                match name.as_str() {
                    "dw" => {
                        options.dw_given = !matches!(quorum, Quorum::Count(0) | Quorum::Default);
                    }
                    "r" => options.r = Some(quorum),
                    "w" => options.w = Some(quorum),
                    "pr" => options.pr = Some(quorum),
                    "pw" => options.pw = Some(quorum),
                    "rw" => options.rw = Some(quorum),
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

/// A request's quorum `name` against the bucket: a count may not exceed its n_val (HTTP's
/// and PB's rule).
pub(crate) fn check_quorum(
    name: &str,
    quorum: Quorum,
    props: &BucketProps,
) -> Result<Quorum, String> {
    if let Quorum::Count(count) = quorum
        && count > props.n_val
    {
        return Err(format!(
            "{name}={count} is more than the bucket's n_val {}",
            props.n_val
        ));
    }
    Ok(quorum)
}

fn header_text(value: &HeaderValue, what: &str) -> Result<String, ApiError> {
    value
        .to_str()
        .map(str::to_owned)
        .map_err(|_| ApiError::bad_request(format!("{what} header is not visible ASCII")))
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

mod admin;
mod backup;
mod console;
mod datatypes;
mod listings;
pub(crate) mod objects;
mod props;
mod secondary;
mod types;
use admin::{
    admin_aae, admin_handoffs, admin_join, admin_leave, admin_members, admin_replica, admin_ring,
    admin_routing, admin_status, list_resources, metrics, ping, stats,
};
use listings::{list_buckets, list_keys, preflist};
use objects::{create_object, delete_object, fetch_object, store_object};
use props::{get_props, reset_props, set_props};
