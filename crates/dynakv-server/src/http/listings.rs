//! Key and bucket listings (streamed), and a key's preference list.

use super::{
    ApiError, ApiResult, AppState, Arc, Body, Bytes, HashMap, IntoResponse,
    LIST_STREAM_BUFFER_PAGES, Query, RawPathParams, State, StatusCode, bucket_and_key,
    bucket_param, header, json, json_response,
};

pub(super) async fn list_keys(
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

pub(super) fn tokio_stream<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

pub(super) async fn list_buckets(
    State(state): State<AppState>,
    params: RawPathParams,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let bucket_type = match params.iter().find(|(name, _)| *name == "type") {
        Some(_) => super::path_param(&params, "type")?,
        None => dynakv_core::bucket_types::DEFAULT_TYPE.to_owned(),
    };
    match query.get("buckets").map(String::as_str) {
        Some("true" | "stream") => {}
        _ => {
            return Err(ApiError::bad_request(
                "list buckets with ?buckets=true or ?buckets=stream",
            ));
        }
    }
    let buckets = crate::requests::list_buckets(&state.cluster).await?;
    let buckets = dynakv_core::bucket_types::buckets_of(&bucket_type, buckets);
    Ok(json_response(
        StatusCode::OK,
        &json!({ "buckets": buckets }),
    ))
}

pub(super) async fn preflist(State(state): State<AppState>, params: RawPathParams) -> ApiResult {
    let (bucket, key) = bucket_and_key(&params)?;
    let list: Vec<_> = state
        .cluster
        .preflist(&bucket, &key)
        .into_iter()
        .map(|(partition, node)| json!({"partition": partition, "node": node.0, "primary": true}))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "preflist": list })))
}
