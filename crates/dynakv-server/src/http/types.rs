//! Bucket types over HTTP: Riak's `/types/{type}/props` (read; update is an admin's), the
//! operator's `/admin/bucket-types` (list, create, activate, update, status), and the check
//! that a `/types/{type}/...` request names an active type.

use super::{
    ApiError, ApiResult, AppState, Bytes, IntoResponse, RawPathParams, Response, State, StatusCode,
    json, json_response, path_param, props_from_body,
};
use axum::routing::{get, post};
use dynakv_core::bucket_types::{self, BucketTypeEntry, DEFAULT_TYPE, TypeChange, missing_members};
use dynakv_core::membership::ClusterState;

pub(super) fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/types/{type}/props", get(type_props).put(set_type_props))
        .route("/admin/bucket-types", get(list_types))
        .route(
            "/admin/bucket-types/{type}",
            get(type_status).post(create_type).put(update_type),
        )
        .route("/admin/bucket-types/{type}/activate", post(activate_type))
}

/// Refuse a `/types/{type}/...` data request whose type is not active (404).
pub(super) async fn require_active_type(
    State(state): State<AppState>,
    params: RawPathParams,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let bucket_type = match path_param(&params, "type") {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    if let Err(message) = state.cluster.typed_bucket(&bucket_type, "-") {
        return ApiError::new(StatusCode::NOT_FOUND, message).into_response();
    }
    next.run(request).await
}

/// One type as the status and list show it.
fn describe(state: &ClusterState, name: &str, entry: &BucketTypeEntry) -> serde_json::Value {
    let missing = missing_members(state, entry);
    let props: serde_json::Value =
        serde_json::from_str(&entry.props_json).unwrap_or(serde_json::Value::Null);
    json!({
        "name": name,
        "active": entry.active,
        "status": if entry.active { "active" } else if missing == 0 { "ready" } else { "created" },
        "members_missing": missing,
        "props": props,
    })
}

async fn list_types(State(state): State<AppState>) -> ApiResult {
    let cluster = state.cluster.state();
    let mut types = vec![json!({"name": DEFAULT_TYPE, "active": true, "status": "active"})];
    types.extend(
        cluster
            .bucket_types
            .iter()
            .map(|(name, entry)| describe(&cluster, name, entry)),
    );
    Ok(json_response(StatusCode::OK, &json!({ "types": types })))
}

async fn type_status(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let name = path_param(&params, "type")?;
    let cluster = state.cluster.state();
    if name == DEFAULT_TYPE {
        return Ok(json_response(
            StatusCode::OK,
            &json!({"name": DEFAULT_TYPE, "active": true, "status": "active"}),
        ));
    }
    let entry = cluster.bucket_types.get(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no bucket type named {name:?}"),
        )
    })?;
    Ok(json_response(
        StatusCode::OK,
        &describe(&cluster, &name, entry),
    ))
}

/// Riak's `GET /types/{type}/props`: the type's properties (an active type, or `default`).
async fn type_props(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let name = path_param(&params, "type")?;
    let defaults = state.cluster.bucket_props("-");
    let props = bucket_types::props_of(&state.cluster.state(), &name, &defaults);
    let props = props.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no bucket type named {name:?}"),
        )
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "props": props.to_json(&name) }),
    ))
}

/// Make the change, then answer with the type as it now is.
async fn change(state: &AppState, change: TypeChange) -> ApiResult {
    let name = match &change {
        TypeChange::Create { name, .. }
        | TypeChange::Activate { name }
        | TypeChange::Update { name, .. } => name.clone(),
    };
    state.cluster.change_bucket_type(change).await?;
    let cluster = state.cluster.state();
    let entry = cluster
        .bucket_types
        .get(&name)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the type is gone"))?;
    Ok(json_response(
        StatusCode::OK,
        &describe(&cluster, &name, entry),
    ))
}

fn props_body(body: &Bytes) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    props_from_body(body).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The type a request names and the properties its body carries.
type NamedProps = (String, serde_json::Map<String, serde_json::Value>);

fn named_props(params: &RawPathParams, body: &Bytes) -> Result<NamedProps, ApiError> {
    Ok((path_param(params, "type")?, props_body(body)?))
}

async fn create_type(
    State(state): State<AppState>,
    params: RawPathParams,
    body: Bytes,
) -> ApiResult {
    let (name, props) = named_props(&params, &body)?;
    change(&state, TypeChange::Create { name, props }).await
}

async fn update_type(
    State(state): State<AppState>,
    params: RawPathParams,
    body: Bytes,
) -> ApiResult {
    let (name, props) = named_props(&params, &body)?;
    change(&state, TypeChange::Update { name, props }).await
}

/// Riak's `PUT /types/{type}/props`: an update answered 204.
async fn set_type_props(state: State<AppState>, params: RawPathParams, body: Bytes) -> ApiResult {
    update_type(state, params, body).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn activate_type(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let name = path_param(&params, "type")?;
    change(&state, TypeChange::Activate { name }).await
}
