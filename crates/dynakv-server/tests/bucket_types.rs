//! Bucket types (issue 20), in-process over real sockets: created on one node, activated
//! only once every member has it (gossip carries each member's mark), served over HTTP's
//! `/types/T/...` paths and PB's `type` fields, their buckets apart from the default type's,
//! their properties inherited, and kept across a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::pb;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_pb::{RpbContent, RpbGetReq, RpbGetResp, RpbPutReq, code};
use prost::Message as _;
use std::time::{Duration, Instant};

async fn call(
    node: &support::Node,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let (status, _, body) = node
        .client
        .request(
            method,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_owned()),
        )
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn put(node: &support::Node, path: &str, value: &str) -> StatusCode {
    let (status, _, _) = node
        .client
        .request(
            Method::PUT,
            path,
            &[("content-type", "text/plain")],
            Bytes::from(value.to_owned()),
        )
        .await
        .unwrap();
    status
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_is_activated_when_every_member_has_it_and_its_buckets_stand_apart() {
    let pb_config = |name: &'static str, join: Option<std::net::SocketAddr>| {
        move |dir: &std::path::Path| {
            let mut config = support::memory_config(name, dir, join);
            config.pb_addr = Some("127.0.0.1:0".parse().unwrap());
            config
        }
    };
    let first = support::start_node(pb_config("t1", None)).await;
    let second = support::start_node(pb_config("t2", Some(first.server.peer_addr))).await;
    wait_for("the second node to join", async || {
        first.server.cluster.state().ring.current.nodes().len() == 2
    })
    .await;

    // A type that does not exist: its paths are 404, PB's type field an error.
    let (status, body) = call(&first, Method::GET, "/types/carts/buckets/b/keys/k", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Bad properties are refused and create nothing.
    let (status, body) = call(
        &first,
        Method::POST,
        "/admin/bucket-types/carts",
        r#"{"props":{"n_val":0}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(
        &first,
        Method::POST,
        "/admin/bucket-types/default",
        r#"{"props":{}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(
        &first,
        Method::POST,
        "/admin/bucket-types/carts",
        r#"{"props":{"n_val":2,"allow_mult":false}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(r#""status":"created""#), "{body}");
    // Created is not served.
    assert_eq!(
        put(&first, "/types/carts/buckets/b/keys/k", "typed").await,
        StatusCode::NOT_FOUND
    );
    // Activation waits until the other member has it (gossip brings its mark back).
    wait_for("the type to be ready", async || {
        call(&first, Method::GET, "/admin/bucket-types/carts", "")
            .await
            .1
            .contains(r#""status":"ready""#)
    })
    .await;
    let (status, body) = call(
        &first,
        Method::POST,
        "/admin/bucket-types/carts/activate",
        "{}",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for("the second node to serve the type", async || {
        second
            .server
            .cluster
            .state()
            .bucket_types
            .get("carts")
            .is_some_and(|t| t.active)
    })
    .await;

    // A bucket of the type, written on one node, read on the other; the default type's
    // bucket of the same name is another bucket.
    assert_eq!(
        put(&second, "/types/carts/buckets/b/keys/k", "typed").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put(&first, "/buckets/b/keys/k", "untyped").await,
        StatusCode::NO_CONTENT
    );
    let (status, body) = call(&first, Method::GET, "/types/carts/buckets/b/keys/k", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "typed"));
    let (status, body) = call(&second, Method::GET, "/types/default/buckets/b/keys/k", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "untyped"));
    // Its buckets inherit the type's properties.
    let (_, body) = call(&first, Method::GET, "/types/carts/buckets/b/props", "").await;
    assert!(
        body.contains(r#""n_val":2"#) && body.contains(r#""name":"b""#),
        "{body}"
    );
    // Listings per type.
    let (_, body) = call(&first, Method::GET, "/types/carts/buckets?buckets=true", "").await;
    assert_eq!(body, r#"{"buckets":["b"]}"#);
    let (_, body) = call(&first, Method::GET, "/buckets?buckets=true", "").await;
    assert_eq!(body, r#"{"buckets":["b"]}"#);
    let (_, body) = call(
        &first,
        Method::GET,
        "/types/carts/buckets/b/keys?keys=true",
        "",
    )
    .await;
    assert_eq!(body, r#"{"keys":["k"]}"#);
    // Over PB, the type field names the same bucket; an unknown type is an error.
    let get = |bucket_type: Option<&str>| RpbGetReq {
        bucket: Some(b"b".to_vec()),
        key: Some(b"k".to_vec()),
        r#type: bucket_type.map(|t| t.as_bytes().to_vec()),
        ..RpbGetReq::default()
    };
    let (got, body) = pb(&second, code::GET_REQ, &get(Some("carts"))).await;
    assert_eq!(got, code::GET_RESP);
    let typed = RpbGetResp::decode(body.as_slice()).unwrap();
    assert_eq!(typed.content[0].value.as_deref(), Some(b"typed".as_slice()));
    let (got, body) = pb(&second, code::GET_REQ, &get(None)).await;
    assert_eq!(got, code::GET_RESP);
    let untyped = RpbGetResp::decode(body.as_slice()).unwrap();
    assert_eq!(
        untyped.content[0].value.as_deref(),
        Some(b"untyped".as_slice())
    );
    let (got, _) = pb(&second, code::GET_REQ, &get(Some("nope"))).await;
    assert_eq!(got, code::ERROR_RESP);
    let write = RpbPutReq {
        bucket: Some(b"b".to_vec()),
        key: Some(b"pb".to_vec()),
        r#type: Some(b"carts".to_vec()),
        content: Some(RpbContent {
            value: Some(b"over pb".to_vec()),
            ..RpbContent::default()
        }),
        ..RpbPutReq::default()
    };
    assert_eq!(pb(&first, code::PUT_REQ, &write).await.0, code::PUT_RESP);
    let (status, body) = call(&second, Method::GET, "/types/carts/buckets/b/keys/pb", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "over pb"));

    // Updates after activation, except the properties Riak fixes then.
    let (status, body) = call(
        &first,
        Method::PUT,
        "/types/carts/props",
        r#"{"props":{"r":1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, body) = call(&first, Method::GET, "/types/carts/props", "").await;
    assert!(body.contains(r#""r":1"#), "{body}");
    // Its buckets without properties of their own follow it, on every node (the parse
    // cached before the update is not used after it); one that set and then reset its own
    // follows it again.
    let (status, _) = call(
        &first,
        Method::PUT,
        "/types/carts/buckets/own/props",
        r#"{"props":{"w":1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&first, Method::DELETE, "/types/carts/buckets/own/props", "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for node in [&first, &second] {
        wait_for("the update to reach the type's buckets", async || {
            let (_, b) = call(node, Method::GET, "/types/carts/buckets/b/props", "").await;
            let (_, own) = call(node, Method::GET, "/types/carts/buckets/own/props", "").await;
            b.contains(r#""r":1"#) && own.contains(r#""r":1"#) && own.contains(r#""w":"quorum""#)
        })
        .await;
    }
    let (status, body) = call(
        &first,
        Method::PUT,
        "/admin/bucket-types/carts",
        r#"{"props":{"datatype":"map"}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

/// Types are part of the persisted cluster state: a restarted node still has them, active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = |dir: &std::path::Path| {
        let mut config = support::memory_config("r1", dir, None);
        config.storage = dynakv_server::config::StorageKind::Disk;
        config
    };
    let server = dynakv_server::start(config(dir.path())).await.unwrap();
    let client = dynakv_client::Client::new(&format!("http://{}", server.http_addr)).unwrap();
    for path in [
        "/admin/bucket-types/kept",
        "/admin/bucket-types/kept/activate",
    ] {
        let (status, _, body) = client
            .request(
                Method::POST,
                path,
                &[("content-type", "application/json")],
                Bytes::from_static(b"{\"props\":{\"n_val\":1}}"),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    server.shutdown();
    server.wait().await.unwrap();
    let server = dynakv_server::start(config(dir.path())).await.unwrap();
    let state = server.cluster.state();
    let kept = state.bucket_types.get("kept").expect("the type is kept");
    assert!(kept.active);
    assert_eq!(server.cluster.bucket_props("\0kept\0b").n_val, 1);
    server.shutdown();
    server.wait().await.unwrap();
}
