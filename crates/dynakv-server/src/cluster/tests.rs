//! Unit tests of `Cluster` over an in-memory storage, with peers that are never reached.
#![allow(clippy::unwrap_used)]

use super::*;
use dynakv_core::membership::{BucketPropsEntry, MAX_CUSTOM_BUCKETS};
use dynakv_storage::MemoryStorage;

fn member(name: &str, port: u16) -> Member {
    Member {
        id: NodeId(name.to_owned()),
        peer_addr: format!("127.0.0.1:{port}"),
        http_addr: format!("127.0.0.1:{port}"),
        zone: String::new(),
        status: MemberStatus::Joining,
        version: 1,
        heartbeat: 0,
        public_key: None,
    }
}

/// A settled cluster of `names` (the first founds it) over 16 partitions.
fn settled(names: &[&str]) -> ClusterState {
    let mut state = ClusterState::found("c", member(names[0], 1), 16).unwrap();
    for (i, name) in names.iter().enumerate().skip(1) {
        state
            .add_joining(member(name, u16::try_from(i + 1).unwrap()))
            .unwrap();
    }
    state.plan();
    while state.ring.next.is_some() {
        for n in state.ring.current.nodes().to_vec() {
            state.mark_handoff_done(&n.id);
        }
        state.plan();
    }
    state
}

/// The `Cluster` of the state's first member over `storage`, with the default properties.
fn cluster_over(storage: Arc<dyn Storage>, state: ClusterState) -> Cluster {
    cluster_with(storage, state, BucketProps::default())
}

/// The `Cluster` of the state's first member over `storage`, whose buckets default to
/// `default_props`.
fn cluster_with(
    storage: Arc<dyn Storage>,
    state: ClusterState,
    default_props: BucketProps,
) -> Cluster {
    let me = state.members.keys().next().cloned().unwrap();
    let replica = Arc::new(Replica::new(
        Arc::clone(&storage),
        dynakv_core::version::ActorId(1),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    ));
    let aae = Arc::new(AaeTrees::new(
        state.ring.current.clone(),
        Arc::clone(&storage),
    ));
    let keys = crate::link::LinkKeys::new(
        &crate::secrets::ClusterSecret::generate(),
        &crate::secrets::NodeKey::generate(),
    );
    let transport = crate::transport::TransportConfig::new("c", &me.0, keys);
    let parts = ClusterParts {
        replica,
        storage,
        client: PeerClient::new(transport),
        timeouts: ClusterTimeouts::default(),
        aae,
        syncs: None,
        clock: WallClock::default(),
        default_props,
    };
    Cluster::new(me, state, ContextKey::from_bytes([7; 32]), parts)
}

fn memory() -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::new())
}

/// Drift 1: the server's own `set_bucket_props` refuses a change past `MAX_CUSTOM_BUCKETS`
/// (the core's `check_custom_bucket_room`, as `Node` does) and changes nothing; it used to
/// accept it, and only the HTTP handler checked first. A bucket that has its own properties
/// may still change them.
#[tokio::test]
async fn set_bucket_props_refuses_one_custom_bucket_too_many() {
    let mut state = settled(&["a", "b"]);
    for i in 0..MAX_CUSTOM_BUCKETS {
        state.bucket_props.insert(
            format!("custom{i}"),
            BucketPropsEntry {
                timestamp_ms: 1,
                node: NodeId("b".into()),
                props_json: Some(r#"{"n_val":2}"#.into()),
            },
        );
    }
    let cluster = cluster_over(memory(), state);
    let props = BucketProps {
        n_val: 1,
        ..BucketProps::default()
    };
    let refused = cluster.set_bucket_props("one-more", Some(&props)).unwrap();
    assert!(
        matches!(refused, Err(CustomBucketError::TooMany { .. })),
        "{refused:?}"
    );
    assert!(cluster.set_bucket_props("one-more", None).unwrap().is_err());
    let state = cluster.state();
    assert_eq!(state.bucket_props.len(), MAX_CUSTOM_BUCKETS);
    assert!(!state.bucket_props.contains_key("one-more"));
    assert_eq!(cluster.bucket_props("one-more").n_val, 3);
    cluster
        .set_bucket_props("custom7", Some(&props))
        .unwrap()
        .unwrap();
    assert_eq!(cluster.bucket_props("custom7").n_val, 1);
}

/// Drift 2: anti-entropy plans with the default properties' `n_val` (the server planned with
/// a literal 3 whatever its defaults): with one replica per key there is no other replica to
/// compare with, with two each partition of this node has one peer, with three two.
#[tokio::test]
async fn the_anti_entropy_plan_uses_the_default_n_val() {
    let state = settled(&["a", "b", "c", "d"]);
    let mine = |n_val: u32| {
        (0..state.ring.current.partition_count())
            .filter(|p| {
                state
                    .preference_list(*p, n_val)
                    .contains(&NodeId("a".into()))
            })
            .count()
    };
    for n_val in [1, 2, 3] {
        let props = BucketProps {
            n_val,
            ..BucketProps::default()
        };
        let cluster = cluster_with(memory(), state.clone(), props);
        let plan = cluster.aae_plan(0, 100);
        let expected = if n_val == 1 { 0 } else { mine(n_val) };
        assert_eq!(plan.remaining(), expected, "n_val {n_val}");
        assert_eq!(cluster.bucket_props("any").n_val, n_val);
    }
    assert_ne!(mine(2), mine(3), "the test tells the two apart");
}

/// Drift 3: the request timeout of the server's cluster, of its configuration and of the
/// core's `Timings::SERVER` (what the simulator scales from) is one constant; the server's
/// anti-entropy records are the core's `AaeRecord`, timed by the cluster's monotonic clock.
#[tokio::test]
async fn the_server_shares_the_cores_bounds_and_records() {
    use dynakv_core::node::Timings;
    let request_ms = u64::try_from(ClusterTimeouts::default().request.as_millis()).unwrap();
    assert_eq!(request_ms, Timings::SERVER.request_ms);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = crate::config::ServerConfig::new("a", any, any, std::path::PathBuf::new());
    assert_eq!(config.request_timeout_ms, Timings::SERVER.request_ms);
    assert_eq!(
        u64::try_from(ClusterTimeouts::default().forward().as_millis()).unwrap(),
        Timings::SERVER.forward_ms
    );

    let cluster = cluster_over(memory(), settled(&["a", "b"]));
    let before = cluster.monotonic_ms();
    cluster.aae_records.lock().entry(3).or_default().completed(
        cluster.monotonic_ms(),
        &NodeId("b".into()),
        2,
    );
    let report = cluster.aae_report();
    let (_, _, record) = report.iter().find(|(p, _, _)| *p == 3).unwrap();
    assert_eq!(record.last_peer, Some(NodeId("b".into())));
    assert_eq!((record.exchanges, record.keys_repaired_total), (1, 2));
    assert!(record.last_exchange_ms.unwrap() >= before);
}

/// Drift 6: a gossip-driven change persists the cluster state off the async worker, and what
/// it wrote survives a restart (a new `Cluster` loads it); an older state written after a
/// newer one never replaces it on disk.
#[tokio::test]
async fn the_cluster_state_is_persisted_in_order_and_survives_a_restart() {
    let storage = memory();
    let cluster = cluster_over(Arc::clone(&storage), settled(&["a", "b"]));
    cluster.persist_now().unwrap();
    let props = BucketProps {
        n_val: 2,
        ..BucketProps::default()
    };
    cluster
        .set_bucket_props("kept", Some(&props))
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let loaded = loop {
        let (state, _) = load_persisted(storage.as_ref()).unwrap().unwrap();
        if state.bucket_props.contains_key("kept") {
            break state;
        }
        assert!(Instant::now() < deadline, "the change was never persisted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let restarted = cluster_over(Arc::clone(&storage), loaded);
    assert_eq!(restarted.bucket_props("kept").n_val, 2);

    // Order: the state of order 5 is on disk; one of order 4 arriving late is not written.
    let newer = (*cluster.state()).clone();
    let mut older = newer.clone();
    older.bucket_props.clear();
    let written = Mutex::new(0);
    persist_if_newer(storage.as_ref(), &written, 5, &newer).unwrap();
    persist_if_newer(storage.as_ref(), &written, 4, &older).unwrap();
    let (on_disk, _) = load_persisted(storage.as_ref()).unwrap().unwrap();
    assert!(on_disk.bucket_props.contains_key("kept"));
    assert_eq!(*written.lock(), 5);
}

/// An administrative change is on disk once `persisted` returns (the HTTP handlers of bucket
/// properties, security and leave await it before they answer).
#[tokio::test]
async fn an_administrative_change_is_on_disk_when_persisted_returns() {
    let storage = memory();
    let cluster = Arc::new(cluster_over(
        Arc::clone(&storage),
        settled(&["a", "b", "c"]),
    ));
    let props = BucketProps {
        n_val: 2,
        ..BucketProps::default()
    };
    for i in 0..20 {
        let bucket = format!("b{i}");
        cluster
            .set_bucket_props(&bucket, Some(&props))
            .unwrap()
            .unwrap();
        cluster.persisted().await.unwrap();
        let (stored, _) = load_persisted(storage.as_ref()).unwrap().unwrap();
        assert!(
            stored.bucket_props.contains_key(&bucket),
            "{bucket} is on disk"
        );
    }
}

/// A full disk: an administrative change whose state cannot be written is reported as a
/// failure (the HTTP handler answers 500), not acknowledged; once the disk works again the
/// next change writes the whole state, the earlier change included.
#[tokio::test]
async fn an_administrative_change_the_disk_refuses_is_not_acknowledged() {
    use dynakv_storage::{FaultPoint, FaultyStorage};
    let faulty = Arc::new(FaultyStorage::new(MemoryStorage::new()));
    let switch = faulty.switch();
    let storage: Arc<dyn Storage> = faulty;
    let cluster = Arc::new(cluster_over(
        Arc::clone(&storage),
        settled(&["a", "b", "c"]),
    ));
    let props = BucketProps {
        n_val: 2,
        ..BucketProps::default()
    };
    switch.set(FaultPoint::Put, true);
    cluster
        .set_bucket_props("full", Some(&props))
        .unwrap()
        .unwrap();
    assert!(
        cluster.persisted().await.is_err(),
        "a refused write is an error"
    );
    switch.heal();
    cluster
        .set_bucket_props("after", Some(&props))
        .unwrap()
        .unwrap();
    cluster.persisted().await.unwrap();
    let (stored, _) = load_persisted(storage.as_ref()).unwrap().unwrap();
    assert!(stored.bucket_props.contains_key("full") && stored.bucket_props.contains_key("after"));
}
