//! Expiry (issue 21), in-process over real sockets on a 3-node cluster: a value past its time
//! to live (its bucket's `ttl_secs`, or its own `X-Dynakv-Ttl`) is answered as not found at
//! once, then removed by a tombstone that reaches every replica; a write made after it
//! survives; bad times to live are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use std::time::Duration;

use support::{call, wait_for};

async fn cluster() -> Vec<support::Node> {
    support::three_nodes("e").await
}

const TEXT: (&str, &str) = ("content-type", "text/plain");

/// Every replica's own copy of the key is a tombstone.
async fn tombstoned_everywhere(nodes: &[support::Node], bucket: &str, key: &str) -> bool {
    for node in nodes {
        let path = format!("/admin/replica/{bucket}/{key}");
        let (status, body) = call(node, Method::GET, &path, &[], "").await;
        if status != StatusCode::OK || !body.contains(r#""deleted":true"#) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_values_are_not_found_then_removed_and_later_writes_survive() {
    let nodes = cluster().await;
    let (status, body) = call(
        &nodes[0],
        Method::PUT,
        "/buckets/short/props",
        &[("content-type", "application/json")],
        r#"{"props":{"ttl_secs":1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_for("the props on every node", async || {
        let mut all = true;
        for node in &nodes {
            all &= call(node, Method::GET, "/buckets/short/props", &[], "")
                .await
                .1
                .contains(r#""ttl_secs":1"#);
        }
        all
    })
    .await;
    let put = |node: usize, path: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let node = &nodes[node];
        async move {
            let mut all = vec![TEXT];
            all.extend(headers);
            call(node, Method::PUT, path, &all, "v").await.0
        }
    };
    assert_eq!(
        put(0, "/buckets/short/keys/k", vec![]).await,
        StatusCode::NO_CONTENT
    );
    // Its own time to live, in a bucket without one; and a value that does not expire.
    assert_eq!(
        put(1, "/buckets/plain/keys/own", vec![("x-dynakv-ttl", "1")]).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put(2, "/buckets/plain/keys/kept", vec![]).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put(0, "/buckets/plain/keys/cond", vec![("x-dynakv-ttl", "1")]).await,
        StatusCode::NO_CONTENT
    );
    let (status, _) = call(&nodes[1], Method::GET, "/buckets/short/keys/k", &[], "").await;
    assert_eq!(status, StatusCode::OK, "found before it expires");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for node in &nodes {
        for path in ["/buckets/short/keys/k", "/buckets/plain/keys/own"] {
            let (status, _) = call(node, Method::GET, path, &[], "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path} after it expired");
        }
        let (status, _) = call(node, Method::GET, "/buckets/plain/keys/kept", &[], "").await;
        assert_eq!(status, StatusCode::OK);
    }
    // An expired value is not there for a conditional create either (whether or not the
    // sweep removed it yet).
    let (status, body) = call(
        &nodes[2],
        Method::PUT,
        "/buckets/plain/keys/cond",
        &[TEXT, ("if-none-match", "*")],
        "created",
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = call(&nodes[0], Method::GET, "/buckets/plain/keys/cond", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "created"));
    // Removed by a tombstone on every replica.
    wait_for(
        "the expired keys' tombstones on every replica",
        async || {
            tombstoned_everywhere(&nodes, "short", "k").await
                && tombstoned_everywhere(&nodes, "plain", "own").await
        },
    )
    .await;

    // A value written again after its key's old value expired survives the sweep.
    assert_eq!(
        put(0, "/buckets/plain/keys/again", vec![("x-dynakv-ttl", "1")]).await,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        put(1, "/buckets/plain/keys/again", vec![]).await,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for node in &nodes {
        let (status, body) = call(node, Method::GET, "/buckets/plain/keys/again", &[], "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "v"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_times_to_live_are_refused() {
    let nodes = cluster().await;
    for ttl in ["abc", "0", "-1", "999999999999"] {
        let (status, body) = call(
            &nodes[0],
            Method::PUT,
            "/buckets/b/keys/k",
            &[TEXT, ("x-dynakv-ttl", ttl)],
            "v",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ttl}: {body}");
    }
    for props in [
        r#"{"props":{"ttl_secs":-1}}"#,
        r#"{"props":{"ttl_secs":"x"}}"#,
    ] {
        let (status, _) = call(
            &nodes[0],
            Method::PUT,
            "/buckets/b/props",
            &[("content-type", "application/json")],
            props,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{props}");
    }
    let (status, _) = call(&nodes[0], Method::GET, "/buckets/b/keys/k", &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
}
