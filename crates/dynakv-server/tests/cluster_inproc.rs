//! A cluster of in-process nodes (real sockets on 127.0.0.1): cluster-wide key and bucket
//! listings, bucket properties spreading by gossip, quorum failures reported as 503.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_server::RunningServer;
use dynakv_server::config::{ServerConfig, StorageKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

struct Node {
    server: RunningServer,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn start_node(name: &str, join: Option<SocketAddr>) -> Node {
    start_skewed_node(name, join, 0).await
}

/// A node whose wall clock runs `skew_ms` ahead of the system's (negative: behind).
async fn start_skewed_node(name: &str, join: Option<SocketAddr>, skew_ms: i64) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new(name, any, any, dir.path().to_owned());
    config.storage = StorageKind::Memory;
    config.join = join;
    config.cluster_secret_file = Some(support::shared_secret_file());
    config.request_timeout_ms = 500;
    config.clock_skew_ms = skew_ms;
    let server = dynakv_server::start(config).await.unwrap();
    let client = Client::new(&format!("http://{}", server.http_addr)).unwrap();
    Node {
        server,
        client,
        _dir: dir,
    }
}

async fn start_cluster(n: usize) -> Vec<Node> {
    start_skewed_cluster(&vec![0; n]).await
}

/// One node per entry of `skews_ms`, each with its clock that far off.
async fn start_skewed_cluster(skews_ms: &[i64]) -> Vec<Node> {
    let n = skews_ms.len();
    let first = start_skewed_node("n1", None, skews_ms[0]).await;
    let seed = first.server.peer_addr;
    let mut nodes = vec![first];
    for (i, skew) in skews_ms.iter().enumerate().skip(1) {
        nodes.push(start_skewed_node(&format!("n{}", i + 1), Some(seed), *skew).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let settled = nodes.iter().all(|node| {
            let state = node.server.cluster.state();
            state.settled() && state.ring.current.nodes().len() == n
        });
        if settled {
            return nodes;
        }
        assert!(Instant::now() < deadline, "ring did not settle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put(client: &Client, path: &str, value: &str) -> StatusCode {
    client
        .request(
            Method::PUT,
            path,
            &[("content-type", "text/plain")],
            Bytes::from(value.to_owned()),
        )
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_cover_every_node_and_props_spread_by_gossip() {
    let nodes = start_cluster(4).await;
    for i in 0..300 {
        let node = &nodes[i % nodes.len()];
        assert_eq!(
            put(
                &node.client,
                &format!("/buckets/listed/keys/key{i:03}"),
                "v"
            )
            .await,
            StatusCode::NO_CONTENT
        );
    }
    put(&nodes[3].client, "/buckets/other/keys/x", "v").await;
    let mut expected: Vec<String> = (0..300).map(|i| format!("key{i:03}")).collect();
    expected.sort();
    let mut union = std::collections::BTreeSet::new();
    for n in &nodes {
        let local = n
            .server
            .cluster
            .replica()
            .list_keys_page("listed", None, 10_000)
            .unwrap()
            .0;
        eprintln!("{} holds {}", n.server.name, local.len());
        union.extend(local);
    }
    eprintln!("union {}", union.len());
    for node in &nodes {
        let listed = node
            .client
            .get_json("/buckets/listed/keys?keys=true")
            .await
            .unwrap();
        let keys: Vec<String> = listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(keys, expected, "every key once, in order, through any node");
        let buckets = node.client.get_json("/buckets?buckets=true").await.unwrap();
        assert_eq!(buckets["buckets"], serde_json::json!(["listed", "other"]));
    }
    // With n_val 3 over 4 nodes, no single node holds every key: the listing really merged.
    let local_counts: Vec<usize> = nodes
        .iter()
        .map(|n| {
            let replica = n.server.cluster.replica();
            replica
                .list_keys_page("listed", None, 10_000)
                .unwrap()
                .0
                .len()
        })
        .collect();
    assert!(local_counts.iter().all(|c| *c < 300), "{local_counts:?}");

    // Props set at one node reach the others by gossip.
    let (status, _, _) = nodes[0]
        .client
        .request(
            Method::PUT,
            "/buckets/two/props",
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"props":{"n_val":2}}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let props = nodes[3]
            .client
            .get_json("/buckets/two/props")
            .await
            .unwrap();
        if props["props"]["n_val"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "props did not spread");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let preflist = nodes[3]
        .client
        .get_json("/buckets/two/keys/k/preflist")
        .await
        .unwrap();
    assert_eq!(preflist["preflist"].as_array().unwrap().len(), 2);
    for node in nodes {
        node.server.shutdown();
        node.server.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_failures_are_503_and_say_how_many_answered() {
    let mut nodes = start_cluster(3).await;
    assert_eq!(
        put(&nodes[0].client, "/buckets/q/keys/k", "v").await,
        StatusCode::NO_CONTENT
    );
    // Stop two of three nodes: R=3 / W=3 cannot be met, R=1 / W=1 can.
    for node in nodes.drain(1..) {
        node.server.shutdown();
        node.server.wait().await.unwrap();
    }
    let only = &nodes[0];
    let (status, _, body) = only
        .client
        .request(Method::GET, "/buckets/q/keys/k?r=3", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("of 3 required replicas answered"), "{body}");
    let (status, _, body) = only
        .client
        .request(
            Method::PUT,
            "/buckets/q/keys/k2?w=3",
            &[("content-type", "text/plain")],
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
    // The coordinator is n1 only if n1 is in the key's preference list; with 3 nodes and
    // n_val 3 every node is.
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, _, body) = only
        .client
        .request(Method::GET, "/buckets/q/keys/k?r=1", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"v"[..]));
    let node = nodes.pop().unwrap();
    node.server.shutdown();
    node.server.wait().await.unwrap();
}

/// Puts received over HTTP by a node (forwarded or not).
async fn http_puts(node: &Node) -> u64 {
    node.client.get_json("/stats").await.unwrap()["node_puts_total"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_routing_sends_each_request_to_a_replica_and_follows_ring_changes() {
    use dynakv_client::routing::RoutingClient;
    let mut nodes = start_cluster(3).await;
    // One replica per key, so "a replica" means exactly one node.
    let props = r#"{"props":{"n_val":1}}"#;
    let (status, _, _) = nodes[0]
        .client
        .request(
            Method::PUT,
            "/buckets/routed/props",
            &[("content-type", "application/json")],
            Bytes::from(props),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes
        .iter()
        .all(|n| n.server.cluster.bucket_props("routed").n_val == 1)
    {
        assert!(Instant::now() < deadline, "props did not spread");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let seed = vec![format!("http://{}", nodes[0].server.http_addr)];
    let routing = RoutingClient::connect(&seed, 1).await.unwrap();
    let version = nodes[0].server.cluster.state().ring.version;
    assert_eq!(routing.version(), version);
    let before: Vec<u64> = http_puts_of(&nodes).await;
    let mut expected = std::collections::HashMap::<String, u64>::new();
    let state = nodes[0].server.cluster.state();
    for i in 0..60 {
        let key = format!("k{i}");
        let path = format!("/buckets/routed/keys/{key}");
        let (status, headers, _) = routing
            .request(
                "routed",
                &key,
                Method::PUT,
                &path,
                &[("content-type", "text/plain")],
                Bytes::from("v"),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(
            headers["x-dynakv-ring-version"],
            version.to_string().as_str()
        );
        let partition = state.ring.current.partition_of(b"routed", key.as_bytes());
        let owner = state.ring.current.preference_list(partition, 1)[0]
            .1
            .clone();
        *expected.entry(owner.0).or_default() += 1;
    }
    let after: Vec<u64> = http_puts_of(&nodes).await;
    for (node, (b, a)) in nodes.iter().zip(before.iter().zip(&after)) {
        let wanted = expected.get(&node.server.name).copied().unwrap_or(0);
        assert_eq!(
            a - b,
            wanted,
            "{} received puts for keys it does not own",
            node.server.name
        );
    }
    assert!(expected.len() >= 2, "keys spread over the nodes");

    // A fourth node joins: the ring version moves on, the next answer says so, and the client
    // fetches the new table by itself.
    let seed_peer = nodes[0].server.peer_addr;
    nodes.push(start_node("n4", Some(seed_peer)).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = routing
            .request(
                "routed",
                "k1",
                Method::GET,
                "/buckets/routed/keys/k1",
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        if routing.version() > version {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client never refreshed its ring"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(routing.refreshes() >= 1);
}

async fn http_puts_of(nodes: &[Node]) -> Vec<u64> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(http_puts(node).await);
    }
    out
}

fn fsync_writes(nodes: &[Node]) -> u64 {
    nodes
        .iter()
        .map(|n| n.server.cluster.replica().fsync_writes())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_writes_get_one_durable_replica_each() {
    let nodes = start_cluster(3).await;
    let props = r#"{"props":{"durability":"buffered"}}"#;
    let (status, _, _) = nodes[0]
        .client
        .request(
            Method::PUT,
            "/buckets/buf/props",
            &[("content-type", "application/json")],
            Bytes::from(props),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes.iter().all(|n| {
        n.server.cluster.bucket_props("buf").durability
            == dynakv_core::storage::Durability::Buffered
    }) {
        assert!(Instant::now() < deadline, "props did not spread");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle = || async {
        // Replicas beyond W are written after the answer: let them land.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    settle().await;
    let before = fsync_writes(&nodes);
    for i in 0..10 {
        let status = put(
            &nodes[i % 3].client,
            &format!("/buckets/buf/keys/k{i}"),
            "v",
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    settle().await;
    assert_eq!(
        fsync_writes(&nodes) - before,
        10,
        "each buffered write is made durable on exactly one replica"
    );
    // A default (fsync) bucket makes every replica write durable.
    let before = fsync_writes(&nodes);
    for i in 0..10 {
        put(
            &nodes[0].client,
            &format!("/buckets/durable/keys/k{i}"),
            "v",
        )
        .await;
    }
    settle().await;
    assert_eq!(fsync_writes(&nodes) - before, 30);
}

/// Nodes whose wall clocks disagree by far more than a forwarded put may wait (request
/// timeout 500 ms here) still coordinate each other's forwards: the forwarder stamps the put
/// with its own clock, and the coordinator converts that by the offset it measured from the
/// forwarder's hello. Before, every put a node 10 s behind forwarded was refused as expired
/// by each primary in turn, and answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_forwarded_by_a_node_whose_clock_is_far_off_are_coordinated() {
    let nodes = start_skewed_cluster(&[0, 10_000, 0, -10_000]).await;
    for via in [3, 1] {
        let node = &nodes[via];
        let me = node.server.name.clone();
        let mut forwarded = 0;
        for i in 0..40 {
            let path = format!("/buckets/skew/keys/n{via}-{i}");
            let (_, _, body) = node
                .client
                .request(Method::GET, &format!("{path}/preflist"), &[], Bytes::new())
                .await
                .unwrap();
            let preflist: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let primary = preflist["preflist"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["node"] == me.as_str());
            if !primary {
                forwarded += 1;
            }
            assert_eq!(
                put(&node.client, &path, "v").await,
                StatusCode::NO_CONTENT,
                "put of {path} through {me} (a primary: {primary})"
            );
        }
        assert!(forwarded > 0, "no put through {me} was forwarded");
    }
    for node in nodes {
        node.server.shutdown();
        node.server.wait().await.unwrap();
    }
}
