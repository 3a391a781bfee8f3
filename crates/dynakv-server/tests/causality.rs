//! Causality observability (issue 22), in-process over real sockets on a 3-node cluster:
//! reads feed per-bucket histograms of siblings and clock entries in `/stats` and
//! `/metrics`, the keys with most siblings are listed, and a key past 25 siblings is counted
//! as a warning; a write with the read's context resolves it and takes it off the list.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use support::call;

const TEXT: (&str, &str) = ("content-type", "text/plain");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sibling_histograms_top_keys_and_the_warning() {
    let nodes = support::three_nodes("c").await;
    // 30 writers that never send a context: 30 siblings.
    for i in 0..30 {
        let (status, body) = call(
            &nodes[i % 3],
            Method::PUT,
            "/buckets/carts/keys/hot",
            &[TEXT],
            &format!("v{i}"),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    call(
        &nodes[0],
        Method::PUT,
        "/buckets/carts/keys/calm",
        &[TEXT],
        "one",
    )
    .await;
    for key in ["hot", "calm", "calm"] {
        let path = format!("/buckets/carts/keys/{key}");
        let (status, _) = call(
            &nodes[0],
            Method::GET,
            &path,
            &[("accept", "multipart/mixed")],
            "",
        )
        .await;
        assert!(
            status.is_success() || status == StatusCode::MULTIPLE_CHOICES,
            "{key}: {status}"
        );
    }
    let (_, stats) = call(&nodes[0], Method::GET, "/stats", &[], "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let causality = &stats["causality"];
    let carts = &causality["per_bucket"]["carts"];
    assert_eq!(carts["siblings"]["count"], 3, "{causality}");
    assert_eq!(carts["siblings"]["le"]["1"], 2, "{causality}");
    assert_eq!(carts["siblings"]["le"]["16"], 2, "{causality}");
    assert_eq!(carts["siblings"]["le"]["32"], 3, "{causality}");
    assert_eq!(carts["siblings"]["sum"], 32, "{causality}");
    assert!(
        carts["clock_entries"]["sum"].as_u64() >= Some(3),
        "{causality}"
    );
    assert_eq!(
        causality["reads_over_sibling_warning_total"], 1,
        "{causality}"
    );
    let top = causality["top_keys_by_siblings"].as_array().unwrap();
    assert_eq!(top.len(), 1, "{causality}");
    assert_eq!(
        (top[0]["key"].as_str(), top[0]["siblings"].as_u64()),
        (Some("hot"), Some(30))
    );

    let (_, metrics) = call(&nodes[0], Method::GET, "/metrics", &[], "").await;
    for line in [
        "dynakv_read_siblings_bucket{bucket=\"carts\",le=\"32\"} 3",
        "dynakv_read_siblings_count{bucket=\"carts\"} 3",
        "dynakv_reads_over_sibling_warning_total 1",
        "dynakv_top_key_siblings{bucket=\"carts\",key=\"hot\"} 30",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }

    // Resolved with the read's context: one value, off the list.
    let (status, headers, _) = nodes[0]
        .client
        .request(
            Method::GET,
            "/buckets/carts/keys/hot",
            &[("accept", "multipart/mixed")],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::MULTIPLE_CHOICES);
    let context = headers["x-riak-vclock"].to_str().unwrap().to_owned();
    let (status, body) = call(
        &nodes[1],
        Method::PUT,
        "/buckets/carts/keys/hot",
        &[TEXT, ("x-riak-vclock", &context)],
        "merged",
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = call(&nodes[0], Method::GET, "/buckets/carts/keys/hot", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "merged"));
    let (_, stats) = call(&nodes[0], Method::GET, "/stats", &[], "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["causality"]["top_keys_by_siblings"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "{stats}"
    );
}

/// `GET /admin/pbs`: a prediction from the round trips this node measured of its own
/// replica requests (none before traffic: a clear 400), strict quorums always consistent,
/// and bad quorums or times refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbs_predicts_from_measured_round_trips_and_refuses_bad_input() {
    let nodes = support::three_nodes("p").await;
    let (status, body) = call(&nodes[0], Method::GET, "/admin/pbs", &[], "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("no replica round trips"), "{body}");
    for i in 0..30 {
        let path = format!("/buckets/pbs/keys/k{i}");
        let (status, _) = call(&nodes[0], Method::PUT, &path, &[TEXT], "v").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = call(&nodes[0], Method::GET, &path, &[], "").await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = call(&nodes[0], Method::GET, "/admin/pbs?t=0,1,50", &[], "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(answer["samples"]["writes"].as_u64() >= Some(30), "{answer}");
    assert!(answer["samples"]["reads"].as_u64() >= Some(30), "{answer}");
    let p: Vec<f64> = answer["t_visibility"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .collect();
    assert_eq!(p.len(), 3);
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "{answer}");
    assert!(p.iter().all(|x| (0.0..=1.0).contains(x)), "{answer}");
    let k1 = answer["k_staleness"][0]["probability"].as_f64().unwrap();
    assert!((k1 - 1.0 / 3.0).abs() < 1e-9, "{answer}");
    let (_, body) = call(&nodes[0], Method::GET, "/admin/pbs?r=2&w=2&t=0", &[], "").await;
    let strict: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(strict["t_visibility"][0]["probability"], 1.0, "{strict}");
    let many = vec!["1"; 33].join(",");
    for query in [
        "r=4",
        "w=0",
        "n=17",
        "t=abc",
        "t=-1",
        "t=",
        &format!("t={many}"),
    ] {
        let (status, body) = call(
            &nodes[0],
            Method::GET,
            &format!("/admin/pbs?{query}"),
            &[],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
}
