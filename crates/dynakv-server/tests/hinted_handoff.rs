//! Sloppy quorum and hinted handoff with in-process nodes (real sockets on 127.0.0.1, disk
//! storage so a stopped node can be restarted from its data directory).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_server::RunningServer;
use dynakv_server::config::{ServerConfig, StorageKind};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Node {
    name: String,
    dir: PathBuf,
    grace_ms: u64,
    server: Option<RunningServer>,
}

async fn start_server(name: &str, dir: &Path, join: Option<SocketAddr>) -> RunningServer {
    start_server_with(name, dir, join, GRACE_DEFAULT_MS).await
}

const GRACE_DEFAULT_MS: u64 = 3_600_000;

async fn start_server_with(
    name: &str,
    dir: &Path,
    join: Option<SocketAddr>,
    tombstone_grace_ms: u64,
) -> RunningServer {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new(name, any, any, dir.to_owned());
    config.storage = StorageKind::Disk;
    config.join = join;
    config.cluster_secret_file = Some(support::shared_secret_file());
    config.request_timeout_ms = 500;
    config.cache_size_bytes = 4 * 1024 * 1024;
    config.tombstone_grace_ms = tombstone_grace_ms;
    config.aae_interval_ms = 500;
    dynakv_server::start(config).await.unwrap()
}

impl Node {
    fn server(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }
    fn client(&self) -> Client {
        Client::new(&format!("http://{}", self.server().http_addr)).unwrap()
    }
    async fn stop(&mut self) {
        let server = self.server.take().unwrap();
        server.shutdown();
        server.wait().await.unwrap();
    }
    async fn restart(&mut self) {
        self.server = Some(start_server_with(&self.name, &self.dir, None, self.grace_ms).await);
    }
}

async fn cluster(n: usize, root: &Path) -> Vec<Node> {
    cluster_with(n, root, GRACE_DEFAULT_MS).await
}

async fn cluster_with(n: usize, root: &Path, grace_ms: u64) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=n {
        let name = format!("n{i}");
        let dir = root.join(&name);
        let join = nodes.first().map(|f| f.server().peer_addr);
        let server = start_server_with(&name, &dir, join, grace_ms).await;
        nodes.push(Node {
            name,
            dir,
            grace_ms,
            server: Some(server),
        });
    }
    wait_until("ring settled", Duration::from_secs(30), || {
        nodes.iter().all(|node| {
            let state = node.server().cluster.state();
            state.settled() && state.ring.current.nodes().len() == n
        })
    })
    .await;
    nodes
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put(client: &Client, path: &str, value: &str) -> (StatusCode, String) {
    let (status, _, body) = client
        .request(
            Method::PUT,
            path,
            &[("content-type", "text/plain")],
            Bytes::from(value.to_owned()),
        )
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn holds(node: &Node, bucket: &str, key: &str, value: &str) -> bool {
    node.server()
        .cluster
        .replica()
        .get(bucket, key)
        .unwrap()
        .is_some_and(|o| {
            o.live_siblings()
                .any(|s| s.content.value == value.as_bytes())
        })
}

fn hints_held(node: &Node) -> usize {
    node.server()
        .cluster
        .hint_stats()
        .per_target
        .iter()
        .map(|(_, c)| c)
        .sum()
}

/// Kill one node of three, write 1,000 keys with W=2, restart it: hinted handoff brings it
/// every key within a bounded time, and the hint stores drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_receives_every_missed_write_by_hinted_handoff() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, root.path()).await;
    nodes[2].stop().await;
    let (c1, c2) = (nodes[0].client(), nodes[1].client());
    for i in 0..1000 {
        let client = if i % 2 == 0 { &c1 } else { &c2 };
        let (status, body) = put(
            client,
            &format!("/buckets/h/keys/k{i}?w=2"),
            &format!("v{i}"),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "k{i}: {body}");
    }
    let held = hints_held(&nodes[0]) + hints_held(&nodes[1]);
    assert_eq!(held, 1000, "every write to the down replica left a hint");
    let started = Instant::now();
    nodes[2].restart().await;
    wait_until("hints delivered", Duration::from_secs(60), || {
        hints_held(&nodes[0]) + hints_held(&nodes[1]) == 0
    })
    .await;
    let missing: Vec<usize> = (0..1000)
        .filter(|i| !holds(&nodes[2], "h", &format!("k{i}"), &format!("v{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} keys missing on the restarted node: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    eprintln!(
        "1000 hinted keys delivered {:.1?} after the restart",
        started.elapsed()
    );
    for node in &mut nodes {
        node.stop().await;
    }
}

/// With four nodes and one down, W=3 is met by a fallback standing in for the down primary
/// (sloppy quorum), PW=3 is refused, and the fallback's hint reaches the primary when it is
/// back; a read through the fallback sees the hinted write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sloppy_quorum_uses_a_fallback_and_pw_counts_primaries() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(4, root.path()).await;
    // A key whose primaries include n4 and exclude n1 (so n1 can coordinate or forward).
    let state = nodes[0].server().cluster.state();
    let key = (0..1000)
        .map(|i| format!("s{i}"))
        .find(|k| {
            let p = state.ring.current.partition_of(b"s", k.as_bytes());
            let list: Vec<String> = state
                .preference_list(p, 3)
                .into_iter()
                .map(|n| n.0)
                .collect();
            list.contains(&"n4".to_owned())
        })
        .unwrap();
    nodes[3].stop().await;
    let client = nodes[0].client();
    // Wait until n1 sees n4 as down (transport backoff or heartbeat timeout).
    let n4 = dynakv_core::ring::NodeId("n4".into());
    wait_until("n4 seen down", Duration::from_secs(15), || {
        !nodes[0].server().cluster.is_up(&n4)
    })
    .await;
    let (status, body) = put(
        &client,
        &format!("/buckets/s/keys/{key}?w=3&pw=3"),
        "strict",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = put(&client, &format!("/buckets/s/keys/{key}?w=3"), "sloppy").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _, body) = client
        .request(
            Method::GET,
            &format!("/buckets/s/keys/{key}?r=3"),
            &[("accept", "multipart/mixed")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert!(
        status == StatusCode::OK || status == StatusCode::MULTIPLE_CHOICES,
        "{status}"
    );
    assert!(String::from_utf8_lossy(&body).contains("sloppy"));
    nodes[3].restart().await;
    wait_until("n4 holds the sloppy write", Duration::from_secs(60), || {
        holds(&nodes[3], "s", &key, "sloppy")
    })
    .await;
    wait_until("hints drained", Duration::from_secs(30), || {
        nodes.iter().all(|n| hints_held(n) == 0)
    })
    .await;
    for node in &mut nodes {
        node.stop().await;
    }
}

/// Wipe a node's data directory and restart it (rejoining through a seed): anti-entropy
/// restores every key it replicates, and it comes back as a new causal actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_restores_a_wiped_node() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, root.path()).await;
    let client = nodes[0].client();
    for i in 0..1000 {
        let (status, body) = put(
            &client,
            &format!("/buckets/w/keys/k{i}?w=3"),
            &format!("v{i}"),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let old_actor = nodes[2].server().cluster.replica().actor();
    nodes[2].stop().await;
    std::fs::remove_dir_all(&nodes[2].dir).unwrap();
    let seed = nodes[0].server().peer_addr;
    nodes[2].server = Some(start_server("n3", &nodes[2].dir, Some(seed)).await);
    assert_ne!(
        nodes[2].server().cluster.replica().actor(),
        old_actor,
        "a wiped node is a new actor"
    );
    let started = Instant::now();
    wait_until(
        "anti-entropy restored every key",
        Duration::from_secs(90),
        || (0..1000).all(|i| holds(&nodes[2], "w", &format!("k{i}"), &format!("v{i}"))),
    )
    .await;
    eprintln!(
        "anti-entropy restored 1000 keys in {:.1?}",
        started.elapsed()
    );
    let report = nodes[2].server().cluster.aae_report();
    let repaired: u64 = report.iter().map(|(_, _, r)| r.keys_repaired_total).sum();
    assert!(
        repaired > 0,
        "the keys came back through anti-entropy exchanges"
    );
    for node in &mut nodes {
        node.stop().await;
    }
}

fn stored(node: &Node, bucket: &str, key: &str) -> bool {
    node.server()
        .cluster
        .replica()
        .get(bucket, key)
        .unwrap()
        .is_some()
}

/// A tombstone is reaped only once every primary holds it and the grace period has passed: not
/// while a primary is down (it would miss the delete), and then everywhere once it is back and
/// hinted handoff gave it the tombstone. A write after the reap starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_reaped_only_when_every_primary_holds_them() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster_with(3, root.path(), 200).await;
    let client = nodes[0].client();
    for key in ["a", "b"] {
        let (status, _) = put(&client, &format!("/buckets/t/keys/{key}?w=3"), "v").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // Delete "a" with every node up: reaped everywhere.
    let (status, _, _) = client
        .request(Method::DELETE, "/buckets/t/keys/a?w=3", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_until(
        "tombstone of a reaped on every node",
        Duration::from_secs(30),
        || nodes.iter().all(|n| !stored(n, "t", "a")),
    )
    .await;
    // Delete "b" while n3 is down: n1 and n2 keep the tombstone.
    nodes[2].stop().await;
    let (status, _, _) = client
        .request(Method::DELETE, "/buckets/t/keys/b?w=2", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        stored(&nodes[0], "t", "b") && stored(&nodes[1], "t", "b"),
        "kept while a primary lacks it"
    );
    nodes[2].restart().await;
    wait_until(
        "tombstone of b reaped after n3 got it",
        Duration::from_secs(60),
        || nodes.iter().all(|n| !stored(n, "t", "b")) && nodes.iter().all(|n| hints_held(n) == 0),
    )
    .await;
    let (status, headers, _) = client
        .request(Method::GET, "/buckets/t/keys/b", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        headers.get("x-riak-vclock").is_none(),
        "nothing left once reaped"
    );
    let (status, _) = put(&client, "/buckets/t/keys/b", "again").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for node in &mut nodes {
        node.stop().await;
    }
}

/// A hint that fails its checksum is removed undelivered (and counted) instead of blocking
/// the delivery of its target's other hints; anti-entropy brings its key to the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_hint_does_not_block_the_others() {
    use dynakv_core::storage::{Durability, Table};
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, root.path()).await;
    nodes[2].stop().await;
    let client = nodes[0].client();
    for i in 0..20 {
        let (status, body) = put(
            &client,
            &format!("/buckets/c/keys/k{i}?w=2"),
            &format!("v{i}"),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "k{i}: {body}");
    }
    // Corrupt one of the hints the first node keeps for n3.
    let holder = usize::from(hints_held(&nodes[0]) == 0);
    let replica = nodes[holder].server().cluster.replica();
    let page = replica.hint_page("n3", None, 1).unwrap();
    let (hint_key, _) = page.first().expect("a hint for n3");
    replica
        .storage()
        .put(
            Table::Hints,
            hint_key,
            b"\x01\x00not an object",
            Durability::Fsync,
        )
        .unwrap();
    nodes[2].restart().await;
    wait_until("hints drained", Duration::from_secs(30), || {
        hints_held(&nodes[0]) + hints_held(&nodes[1]) == 0
    })
    .await;
    assert_eq!(nodes[holder].server().cluster.hint_stats().corrupt_total, 1);
    // Every key reaches n3: by hint, or by anti-entropy for the corrupted one.
    wait_until("every key on n3", Duration::from_secs(30), || {
        (0..20).all(|i| holds(&nodes[2], "c", &format!("k{i}"), &format!("v{i}")))
    })
    .await;
    for node in &mut nodes {
        node.stop().await;
    }
}
