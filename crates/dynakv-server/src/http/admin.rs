//! Liveness, resource list, statistics and metrics, and the `/admin/*` views and actions.

use super::{
    ApiError, ApiResult, AppState, Arc, Bytes, ClusterState, IntoResponse, RawPathParams, Response,
    State, StatusCode, blocking, bucket_and_key, header, json, json_response,
};

pub(super) async fn ping() -> Response {
    ([(header::CONTENT_TYPE, "text/html")], "OK").into_response()
}

pub(super) async fn list_resources() -> Response {
    let resources = [
        ("riak_kv_wm_buckets", "/buckets"),
        ("riak_kv_wm_index", "/buckets"),
        ("riak_kv_wm_bucket_type", "/types"),
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

pub(super) fn ring_members(state: &ClusterState) -> Vec<String> {
    state
        .ring
        .current
        .nodes()
        .iter()
        .map(|n| n.id.0.clone())
        .collect()
}

pub(super) async fn stats(State(state): State<AppState>) -> Response {
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

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
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

pub(super) async fn admin_status(State(state): State<AppState>) -> Response {
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
            "protocol_version": state.cluster.client().newest_version(),
            "protocol_versions_accepted": crate::transport::SUPPORTED_PROTOCOL_VERSIONS
                .into_iter()
                .filter(|v| *v <= state.cluster.client().newest_version())
                .collect::<Vec<u16>>(),
        }),
    )
}

pub(super) async fn admin_members(State(state): State<AppState>) -> Response {
    let cluster = state.cluster.state();
    let count = |ring: &dynakv_core::ring::Ring, id: &dynakv_core::ring::NodeId| {
        ring.owners().iter().filter(|owner| *owner == id).count()
    };
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
                "partitions": count(&cluster.ring.current, &m.id),
                "partitions_next": cluster.ring.next.as_ref().map(|next| count(next, &m.id)),
                "protocol": state.cluster.protocol_of(&m.id),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "members": members }))
}

/// What a client needs to route requests itself (paper 6.4): the current ring (the same
/// structure the nodes use, so the client computes the same preference lists), its version,
/// and each member's HTTP address. Data responses carry `X-Dynakv-Ring-Version`, so a client
/// sees when this is stale.
pub(super) async fn admin_routing(State(state): State<AppState>) -> Response {
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

pub(super) fn owners_json(ring: &dynakv_core::ring::Ring) -> serde_json::Value {
    json!(
        ring.owners()
            .iter()
            .map(|n| n.0.clone())
            .collect::<Vec<_>>()
    )
}

pub(super) async fn admin_ring(State(state): State<AppState>) -> Response {
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

pub(super) async fn admin_handoffs(State(state): State<AppState>) -> Response {
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

pub(super) async fn admin_aae(State(state): State<AppState>) -> Response {
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

pub(super) async fn admin_join(State(state): State<AppState>, body: Bytes) -> ApiResult {
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

pub(super) async fn admin_force_remove(State(state): State<AppState>, body: Bytes) -> ApiResult {
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("body must be {\"node\": \"NAME\"}"))?;
    let node = value
        .get("node")
        .and_then(serde_json::Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= dynakv_core::limits::MAX_ACTOR_BYTES)
        .ok_or_else(|| ApiError::bad_request("body must be {\"node\": \"NAME\"}"))?;
    state.cluster.force_remove(node).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"force_removed": node}),
    ))
}

pub(super) async fn admin_leave(State(state): State<AppState>) -> ApiResult {
    state.cluster.leave().await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"leaving": state.node_name}),
    ))
}

pub(super) async fn admin_replica(
    State(state): State<AppState>,
    params: RawPathParams,
) -> ApiResult {
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

/// Most `t` values one PBS prediction answers.
const MAX_PBS_POINTS: usize = 32;

/// `GET /admin/pbs?n=3&r=1&w=1&t=0,1,10,100`: the probability that a read issued `t` ms
/// after a write's acknowledgement returns it, predicted from this node's replica round
/// trips (`dynakv_core::pbs`), and the k-staleness closed form.
pub(super) async fn admin_pbs(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let number = |name: &str, default: usize| -> Result<usize, ApiError> {
        query.get(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name} must be a number")))
        })
    };
    let (n, r, w) = (number("n", 3)?, number("r", 1)?, number("w", 1)?);
    let t_ms: Vec<f64> = match query.get("t") {
        None => vec![0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0],
        Some(list) => list
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|t| (0.0..=600_000.0).contains(t))
            })
            .collect::<Option<Vec<f64>>>()
            .filter(|t| !t.is_empty() && t.len() <= MAX_PBS_POINTS)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "t must be 1 to {MAX_PBS_POINTS} comma-separated times in ms (0 to 600000)"
                ))
            })?,
    };
    let samples = state.cluster.pbs_samples();
    let nodes = state.cluster.state().ring.current.nodes().len().max(1);
    #[allow(clippy::cast_precision_loss)] // node counts are small
    let local = (n as f64 / nodes as f64).min(1.0);
    let (writes, reads) = samples.counts();
    // Tens of thousands of trials: off the request threads.
    let points = tokio::task::spawn_blocking(move || {
        dynakv_core::pbs::predict(&samples, (n, r, w), &t_ms, local, 0x9b5)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "n": n, "r": r, "w": w,
            "samples": {"writes": writes, "reads": reads},
            "read_coordinator_is_replica": local,
            "t_visibility": points.iter().map(|p| json!({"t_ms": p.t_ms, "probability": p.consistent})).collect::<Vec<_>>(),
            "k_staleness": (1..=3).map(|k| json!({"k": k, "probability": dynakv_core::pbs::k_staleness(n, r, w, k)})).collect::<Vec<_>>(),
            "note": "predicted from this node's own replica round trips; sloppy quorum (a write acknowledged by a fallback while a replica is down) makes reads staler than predicted",
        }),
    ))
}
