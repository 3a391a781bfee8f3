//! Bucket properties: read, set and reset (a cluster-state change gossip spreads).

use super::{
    ApiError, ApiResult, ApiState, AppState, Body, BodyExt, BucketProps, HeaderMap, IntoResponse,
    RawPathParams, State, StatusCode, bucket_param, header, header_text, json, json_response,
    limits, props_from_body,
};

pub(super) async fn get_props(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let bucket = bucket_param(&params)?;
    let props = state.cluster.bucket_props(&bucket);
    let name = dynakv_core::bucket_types::split_bucket(&bucket).1;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "props": props.to_json(name) }),
    ))
}

pub(super) async fn set_props(
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
    state.cluster.update_bucket_props(&bucket, &update).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn reset_props(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let bucket = bucket_param(&params)?;
    change_props(&state, &bucket, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Set (`Some`) or reset (`None`) a bucket's properties, answered once the node wrote the
/// change; refused with 400 when the bucket would be one custom bucket too many (the node
/// checks it with the core's `check_custom_bucket_room`): past the limit gossip would not
/// carry the change, and it would stay on this node alone.
pub(super) async fn change_props(
    state: &ApiState,
    bucket: &str,
    props: Option<&BucketProps>,
) -> Result<(), ApiError> {
    Ok(state.cluster.set_bucket_props(bucket, props).await?)
}
