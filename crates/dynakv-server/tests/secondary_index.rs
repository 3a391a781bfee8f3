//! Secondary indexes (issue 21), in-process over real sockets on a 3-node cluster: entries
//! follow their values (updates, siblings, deletes), queries cover the ring from any node and
//! page in order, a query that cannot cover every partition says so instead of answering part,
//! and hostile input is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use bytes::Bytes;

use support::{call, wait_for};

async fn cluster() -> Vec<support::Node> {
    support::three_nodes("i").await
}

async fn keys(node: &support::Node, path: &str) -> (Vec<String>, Option<String>) {
    let (status, body) = call(node, Method::GET, path, &[], "").await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    (keys, json["continuation"].as_str().map(str::to_owned))
}

async fn put(node: &support::Node, key: &str, headers: &[(&str, &str)]) -> StatusCode {
    let mut all = vec![("content-type", "text/plain")];
    all.extend_from_slice(headers);
    call(
        node,
        Method::PUT,
        &format!("/buckets/u/keys/{key}"),
        &all,
        key,
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_follow_values_and_queries_cover_the_ring() {
    let nodes = cluster().await;
    for i in 0..60 {
        let age = (i % 20).to_string();
        let team = format!("t{}", i % 4);
        let status = put(
            &nodes[i % 3],
            &format!("k{i:02}"),
            &[
                ("x-riak-index-age_int", &age),
                ("x-riak-index-team_bin", &team),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // Every node answers the same, in (term, key) order.
    let expected: Vec<String> = {
        let mut v: Vec<(i32, String)> = (0..60)
            .filter(|i| (5..=9).contains(&(i % 20)))
            .map(|i| (i % 20, format!("k{i:02}")))
            .collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    };
    for node in &nodes {
        assert_eq!(keys(node, "/buckets/u/index/age_int/5/9").await.0, expected);
    }
    // Pages of 4 in order, the same as one answer.
    let mut paged = Vec::new();
    let mut path = "/buckets/u/index/age_int/5/9?max_results=4".to_owned();
    loop {
        let (page, continuation) = keys(&nodes[1], &path).await;
        assert!(page.len() <= 4);
        paged.extend(page);
        match continuation {
            Some(c) => {
                path = format!("/buckets/u/index/age_int/5/9?max_results=4&continuation={c}");
            }
            None => break,
        }
    }
    assert_eq!(paged, expected);
    // An update that changes an entry moves the key; a delete takes its entries away.
    let (_, headers, _) = nodes[0]
        .client
        .request(Method::GET, "/buckets/u/keys/k05", &[], Bytes::new())
        .await
        .unwrap();
    let vclock = headers
        .get("x-riak-vclock")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let status = put(
        &nodes[2],
        "k05",
        &[("x-riak-index-age_int", "100"), ("x-riak-vclock", &vclock)],
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        !keys(&nodes[0], "/buckets/u/index/age_int/5")
            .await
            .0
            .contains(&"k05".to_owned())
    );
    assert_eq!(
        keys(&nodes[1], "/buckets/u/index/age_int/100").await.0,
        ["k05"]
    );
    assert!(
        !keys(&nodes[1], "/buckets/u/index/team_bin/t1")
            .await
            .0
            .contains(&"k05".to_owned())
    );
    // Two blind writes make siblings: the key answers for both values' entries.
    assert_eq!(
        put(&nodes[0], "sib", &[("x-riak-index-team_bin", "red")]).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put(&nodes[1], "sib", &[("x-riak-index-team_bin", "blue")]).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        keys(&nodes[2], "/buckets/u/index/team_bin/red").await.0,
        ["sib"]
    );
    assert_eq!(
        keys(&nodes[2], "/buckets/u/index/team_bin/blue").await.0,
        ["sib"]
    );
    let (status, _) = call(&nodes[0], Method::DELETE, "/buckets/u/keys/k06", &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        !keys(&nodes[2], "/buckets/u/index/age_int/6")
            .await
            .0
            .contains(&"k06".to_owned())
    );
    // The special indexes.
    let (all, _) = keys(&nodes[0], "/buckets/u/index/$bucket/u").await;
    assert_eq!(all.len(), 60, "{all:?}");
    assert_eq!(
        keys(&nodes[0], "/buckets/u/index/$key/k10/k12").await.0,
        ["k10", "k11", "k12"]
    );
    // return_terms: the terms with the keys.
    let (status, body) = call(
        &nodes[0],
        Method::GET,
        "/buckets/u/index/age_int/1/1?return_terms=true",
        &[],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(r#"{"1":"k01"}"#), "{body}");

    // One node down: the others hold every partition (n_val 3), the answer is whole.
    let mut nodes = nodes;
    let down = nodes.pop().unwrap();
    down.server.shutdown();
    down.server.wait().await.unwrap();
    // Until the others see it down, a query that asks it fails (503) rather than answering
    // part; then queries route around it.
    for node in &nodes {
        wait_for("queries to route around the down node", async || {
            call(node, Method::GET, "/buckets/u/index/age_int/5/9", &[], "")
                .await
                .0
                == StatusCode::OK
        })
        .await;
    }
    let remaining: Vec<String> = expected
        .iter()
        .filter(|k| *k != "k05" && *k != "k06")
        .cloned()
        .collect();
    for node in &nodes {
        assert_eq!(
            keys(node, "/buckets/u/index/age_int/5/9").await.0,
            remaining
        );
    }
    // A bucket of one replica per key: the down node's partitions are missing, and the query
    // says so rather than answering part.
    let (status, body) = call(
        &nodes[0],
        Method::PUT,
        "/buckets/one/props",
        &[("content-type", "application/json")],
        r#"{"props":{"n_val":1,"r":1,"w":1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_for(
        "a query of the one-replica bucket to be refused",
        async || {
            let (status, body) = call(
                &nodes[1],
                Method::GET,
                "/buckets/one/index/age_int/1/2",
                &[],
                "",
            )
            .await;
            status == StatusCode::SERVICE_UNAVAILABLE && body.contains("partitions")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_index_input_is_refused_and_changes_nothing() {
    let nodes = cluster().await;
    let node = &nodes[0];
    for headers in [
        vec![("x-riak-index-age", "1")],
        vec![("x-riak-index-age_int", "old")],
        vec![("x-riak-index-_int", "1")],
    ] {
        assert_eq!(
            put(node, "bad", &headers).await,
            StatusCode::BAD_REQUEST,
            "{headers:?}"
        );
    }
    let long = "x".repeat(2000);
    assert_eq!(
        put(node, "bad", &[("x-riak-index-n_bin", &long)]).await,
        StatusCode::BAD_REQUEST
    );
    let many: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let many = many.join(", ");
    assert_eq!(
        put(node, "bad", &[("x-riak-index-n_int", &many)]).await,
        StatusCode::BAD_REQUEST
    );
    let (status, _) = call(node, Method::GET, "/buckets/u/keys/bad", &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
    for path in [
        "/buckets/u/index/age/1",
        "/buckets/u/index/age_int/x",
        "/buckets/u/index/age_int/1/2?continuation=%21%21",
        "/buckets/u/index/age_int/1/2?max_results=0",
        "/buckets/u/index/age_int/1/2?max_results=999999",
        "/buckets/u/index/age_int/1/2?term_regex=.*",
        "/buckets/u/index/age_int/1/2?return_terms=maybe",
    ] {
        let (status, body) = call(node, Method::GET, path, &[], "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
}
