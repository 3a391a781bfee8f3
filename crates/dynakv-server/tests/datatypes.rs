//! Data types (issue 21), in-process over real sockets: counters, sets and maps updated
//! concurrently through every node of a 3-node cluster converge to every acknowledged update,
//! through a node going down; removals need a context this cluster issued for that key;
//! hostile operations are refused and change nothing; PB's DtFetch/DtUpdate serve the same
//! values as HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::pb;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_pb::code;
use dynakv_pb::dt::{CounterOp, DtFetchReq, DtFetchResp, DtOp, DtUpdateReq, DtUpdateResp, SetOp};
use prost::Message as _;

async fn call(
    node: &support::Node,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    support::call(
        node,
        method,
        path,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

use support::wait_for;

fn config(
    name: &'static str,
    join: Option<std::net::SocketAddr>,
) -> impl FnOnce(&std::path::Path) -> dynakv_server::config::ServerConfig {
    move |dir: &std::path::Path| {
        let mut config = support::memory_config(name, dir, join);
        config.pb_addr = Some("127.0.0.1:0".parse().unwrap());
        config
    }
}

async fn cluster() -> Vec<support::Node> {
    let first = support::start_node(config("d1", None)).await;
    let join = Some(first.server.peer_addr);
    let second = support::start_node(config("d2", join)).await;
    let third = support::start_node(config("d3", join)).await;
    let nodes = vec![first, second, third];
    wait_for("three members", async || {
        nodes
            .iter()
            .all(|n| n.server.cluster.state().ring.current.nodes().len() == 3)
    })
    .await;
    for (name, datatype) in [
        ("counters", "counter"),
        ("sets", "set"),
        ("maps", "map"),
        ("plain", ""),
    ] {
        let props = if datatype.is_empty() {
            "{\"props\":{}}".to_owned()
        } else {
            format!("{{\"props\":{{\"datatype\":\"{datatype}\"}}}}")
        };
        let path = format!("/admin/bucket-types/{name}");
        let (status, body) = call(&nodes[0], Method::POST, &path, &props).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        wait_for("the type to be ready", async || {
            call(&nodes[0], Method::POST, &format!("{path}/activate"), "{}")
                .await
                .0
                == StatusCode::OK
        })
        .await;
        for node in &nodes {
            wait_for("every node to serve the type", async || {
                call(node, Method::GET, &format!("/types/{name}/props"), "")
                    .await
                    .0
                    == StatusCode::OK
            })
            .await;
        }
    }
    nodes
}

fn value(body: &str) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    json["value"].clone()
}

/// Increment `key` `times` times through `node`; the increments acknowledged.
async fn increments(node: &support::Node, key: &str, times: usize) -> i64 {
    let mut acked = 0;
    for _ in 0..times {
        let (status, _) = call(
            node,
            Method::POST,
            &format!("/types/counters/buckets/c/datatypes/{key}"),
            r#"{"increment":1}"#,
        )
        .await;
        if status == StatusCode::NO_CONTENT {
            acked += 1;
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_through_every_node_converge_through_a_node_going_down() {
    let mut nodes = cluster().await;

    // Three clients increment one counter at once, each through its own node (each node is a
    // primary, so each coordinates its own increments: concurrent versions meet and merge).
    let (a, b, c) = tokio::join!(
        increments(&nodes[0], "hits", 40),
        increments(&nodes[1], "hits", 40),
        increments(&nodes[2], "hits", 40)
    );
    assert_eq!(a + b + c, 120, "every increment is acknowledged");
    for node in &nodes {
        let (status, body) = call(
            node,
            Method::GET,
            "/types/counters/buckets/c/datatypes/hits?r=all",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(value(&body), serde_json::json!(120), "{body}");
    }

    // Concurrent adds of different elements to one set through different nodes: all kept.
    let add = |node: usize, element: String| {
        let node = &nodes[node];
        async move {
            let body = format!("{{\"add\":\"{element}\"}}");
            call(
                node,
                Method::POST,
                "/types/sets/buckets/s/datatypes/k",
                &body,
            )
            .await
            .0
        }
    };
    let mut adds = Vec::new();
    for i in 0..30 {
        adds.push(add(i % 3, format!("e{i}")));
    }
    for status in futures_util::future::join_all(adds).await {
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (_, body) = call(
        &nodes[1],
        Method::GET,
        "/types/sets/buckets/s/datatypes/k?r=all",
        "",
    )
    .await;
    assert_eq!(value(&body).as_array().unwrap().len(), 30, "{body}");

    // One node goes down: the other two still take increments (w = quorum), and the counter
    // holds every acknowledged one.
    let down = nodes.pop().unwrap();
    down.server.shutdown();
    down.server.wait().await.unwrap();
    let (a, b) = tokio::join!(
        increments(&nodes[0], "hits", 20),
        increments(&nodes[1], "hits", 20)
    );
    assert_eq!(a + b, 40, "the two nodes left still acknowledge increments");
    for node in &nodes {
        let (status, body) = call(
            node,
            Method::GET,
            "/types/counters/buckets/c/datatypes/hits",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(value(&body), serde_json::json!(160), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_need_a_context_and_hostile_operations_change_nothing() {
    let nodes = cluster().await;
    let node = &nodes[0];
    let set = "/types/sets/buckets/s/datatypes/k";
    let (status, body) = call(
        node,
        Method::POST,
        &format!("{set}?returnbody=true"),
        r#"{"add_all":["a","b","c"]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let read: serde_json::Value = serde_json::from_str(&body).unwrap();
    let context = read["context"].as_str().unwrap().to_owned();
    assert_eq!(read["type"], "set");

    // Add wins: an add made after the read survives a removal with that read's context.
    let (status, _) = call(&nodes[1], Method::POST, set, r#"{"add":"a"}"#).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let remove = format!("{{\"remove_all\":[\"a\",\"b\"],\"context\":\"{context}\"}}");
    let (status, body) = call(&nodes[2], Method::POST, set, &remove).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, body) = call(node, Method::GET, &format!("{set}?r=all"), "").await;
    assert_eq!(value(&body), serde_json::json!(["a", "c"]), "{body}");

    // A context made for another key, a forged one, or one that is not base64: refused.
    let other = "/types/sets/buckets/s/datatypes/other";
    let (status, _) = call(node, Method::POST, other, r#"{"add":"x"}"#).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let moved = format!("{{\"remove\":\"x\",\"context\":\"{context}\"}}");
    let mut forged = context.clone().into_bytes();
    let last = forged.len() - 3;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = format!(
        "{{\"remove\":\"c\",\"context\":\"{}\"}}",
        String::from_utf8(forged).unwrap()
    );
    let hostile: Vec<(&str, String, StatusCode)> = vec![
        (other, moved, StatusCode::BAD_REQUEST),
        (set, forged, StatusCode::BAD_REQUEST),
        (set, r#"{"remove":"c","context":"!!"}"#.into(), StatusCode::BAD_REQUEST),
        (set, r#"{"remove":"c","context":7}"#.into(), StatusCode::BAD_REQUEST),
        // Removing what the context has not seen is Riak's precondition failure.
        (
            set,
            format!("{{\"remove\":\"zz\",\"context\":\"{context}\"}}"),
            StatusCode::PRECONDITION_FAILED,
        ),
        (set, r#"{"increment":1}"#.into(), StatusCode::BAD_REQUEST),
        (set, r#"{"add":5}"#.into(), StatusCode::BAD_REQUEST),
        (set, "not json".into(), StatusCode::BAD_REQUEST),
        (set, format!("{{\"add\":\"{}\"}}", "x".repeat(2000)), StatusCode::BAD_REQUEST),
        (
            "/types/counters/buckets/c/datatypes/k",
            r#"{"increment":9223372036854775807}"#.into(),
            StatusCode::NO_CONTENT,
        ),
        (
            "/types/counters/buckets/c/datatypes/k",
            r#"{"increment":1}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/types/maps/buckets/m/datatypes/k",
            r#"{"update":{"a_bogus":1}}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/types/maps/buckets/m/datatypes/k",
            r#"{"update":{"a_map":{"update":{"b_map":{"update":{"c_map":{"update":{"d_map":{"update":{"e_counter":1}}}}}}}}}}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        // A bucket without a data type, and the default type.
        (
            "/types/plain/buckets/p/datatypes/k",
            r#"{"increment":1}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/buckets/p/datatypes/k",
            r#"{"increment":1}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (path, body, expected) in &hostile {
        let (status, answer) = call(node, Method::POST, path, body).await;
        assert_eq!(status, *expected, "{path} {body}: {answer}");
    }
    let (_, body) = call(node, Method::GET, set, "").await;
    assert_eq!(value(&body), serde_json::json!(["a", "c"]), "{body}");
    let (_, body) = call(
        node,
        Method::GET,
        "/types/counters/buckets/c/datatypes/k",
        "",
    )
    .await;
    assert_eq!(value(&body), serde_json::json!(i64::MAX), "{body}");

    // A plain put to a data type bucket is refused, and a data type read of a missing key
    // is 404 with its type (as Riak's clients expect).
    let (status, _) = call(node, Method::PUT, "/types/sets/buckets/s/keys/k2", "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = call(
        node,
        Method::GET,
        "/types/counters/buckets/c/datatypes/none",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains(r#""type":"counter""#), "{body}");

    // A generated key: 201 with its location and value.
    let (status, headers, body) = node
        .client
        .request(
            Method::POST,
            "/types/counters/buckets/c/datatypes",
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"increment":3}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let location = headers.get("location").unwrap().to_str().unwrap();
    assert!(location.starts_with("/types/counters/buckets/c/datatypes/"));
    assert_eq!(value(&String::from_utf8_lossy(&body)), serde_json::json!(3));
    let (_, body) = call(node, Method::GET, location, "").await;
    assert_eq!(value(&body), serde_json::json!(3), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pb_updates_and_fetches_what_http_serves() {
    let nodes = cluster().await;
    let update = |key: &str, op: DtOp, context: Option<Vec<u8>>| DtUpdateReq {
        bucket: Some(b"b".to_vec()),
        key: Some(key.as_bytes().to_vec()),
        r#type: Some(b"sets".to_vec()),
        context,
        op: Some(op),
        return_body: Some(true),
        ..DtUpdateReq::default()
    };
    let adds = DtOp {
        set_op: Some(SetOp {
            adds: vec![b"x".to_vec(), b"y".to_vec(), vec![0xff, 0x00]],
            removes: Vec::new(),
        }),
        ..DtOp::default()
    };
    let (answer, body) = pb(&nodes[0], code::DT_UPDATE_REQ, &update("k", adds, None)).await;
    assert_eq!(
        answer,
        code::DT_UPDATE_RESP,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let response = DtUpdateResp::decode(body.as_slice()).unwrap();
    assert_eq!(response.set_value.len(), 3);
    let context = response.context.unwrap();
    let removes = DtOp {
        set_op: Some(SetOp {
            adds: Vec::new(),
            removes: vec![b"x".to_vec()],
        }),
        ..DtOp::default()
    };
    let (answer, _) = pb(
        &nodes[1],
        code::DT_UPDATE_REQ,
        &update("k", removes.clone(), Some(context.clone())),
    )
    .await;
    assert_eq!(answer, code::DT_UPDATE_RESP);
    // The same context for another key is refused.
    let (answer, body) = pb(
        &nodes[1],
        code::DT_UPDATE_REQ,
        &update("other", removes, Some(context)),
    )
    .await;
    assert_eq!(answer, code::ERROR_RESP);
    assert!(String::from_utf8_lossy(&body).contains("context"));
    let fetch = DtFetchReq {
        bucket: Some(b"b".to_vec()),
        key: Some(b"k".to_vec()),
        r#type: Some(b"sets".to_vec()),
        ..DtFetchReq::default()
    };
    let (answer, body) = pb(&nodes[2], code::DT_FETCH_REQ, &fetch).await;
    assert_eq!(answer, code::DT_FETCH_RESP);
    let fetched = DtFetchResp::decode(body.as_slice()).unwrap();
    assert_eq!(fetched.r#type, Some(dynakv_pb::dt::data_type::SET));
    assert_eq!(
        fetched.value.unwrap().set_value,
        vec![b"y".to_vec(), vec![0xff, 0x00]]
    );
    let (_, body) = call(
        &nodes[0],
        Method::GET,
        "/types/sets/buckets/b/datatypes/k",
        "",
    )
    .await;
    assert_eq!(value(&body).as_array().unwrap().len(), 2, "{body}");

    // A counter operation on a set bucket, a bucket without a data type, no type: errors.
    let counter = DtOp {
        counter_op: Some(CounterOp { increment: Some(2) }),
        ..DtOp::default()
    };
    let (answer, _) = pb(
        &nodes[0],
        code::DT_UPDATE_REQ,
        &update("k", counter.clone(), None),
    )
    .await;
    assert_eq!(answer, code::ERROR_RESP);
    let mut plain = update("k", counter.clone(), None);
    plain.r#type = Some(b"plain".to_vec());
    let (answer, _) = pb(&nodes[0], code::DT_UPDATE_REQ, &plain).await;
    assert_eq!(answer, code::ERROR_RESP);
    plain.r#type = None;
    let (answer, _) = pb(&nodes[0], code::DT_UPDATE_REQ, &plain).await;
    assert_eq!(answer, code::ERROR_RESP);
    // A missing key fetches as its type with no value.
    let mut missing = fetch.clone();
    missing.key = Some(b"none".to_vec());
    let (answer, body) = pb(&nodes[0], code::DT_FETCH_REQ, &missing).await;
    assert_eq!(answer, code::DT_FETCH_RESP);
    let fetched = DtFetchResp::decode(body.as_slice()).unwrap();
    assert!(fetched.value.is_none());
    // Garbage never answers anything but an error.
    let (answer, _) = pb(&nodes[0], code::DT_UPDATE_REQ, &DtFetchReq::default()).await;
    assert_eq!(answer, code::ERROR_RESP);
}
