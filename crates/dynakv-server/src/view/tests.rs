//! Unit tests of the data plane's `Cluster` over a running node (its driver and core's
//! `Node`) on an in-memory storage, with peers that are never reached.
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

/// The `Cluster` of the state's first member over `storage`, running.
fn cluster_over(storage: Arc<dyn Storage>, state: ClusterState) -> Cluster {
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
    let timeouts = ClusterTimeouts::default();
    let parts = ClusterParts {
        replica,
        storage,
        client: PeerClient::new(transport),
        timeouts,
        aae,
        syncs: None,
        clock: WallClock::default(),
        node: NodeConfig {
            timings: timeouts.timings(2000, 100),
            ..NodeConfig::default()
        },
        on_stop: None,
    };
    Cluster::start(me, state, ContextKey::from_bytes([7; 32]), parts).unwrap()
}

fn memory() -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::new())
}

fn props(n_val: u32) -> BucketProps {
    BucketProps {
        n_val,
        ..BucketProps::default()
    }
}

/// Drift 1: a change past `MAX_CUSTOM_BUCKETS` is refused with 400 (the node's
/// `set_bucket_props`, the core's `check_custom_bucket_room`) and changes nothing; a bucket
/// that has its own properties may still change them, and the change is read back at once.
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
    let refused = cluster.set_bucket_props("one-more", Some(&props(1))).await;
    assert!(
        matches!(refused, Err(ClusterError::Refused { status: 400, .. })),
        "{refused:?}"
    );
    assert!(cluster.set_bucket_props("one-more", None).await.is_err());
    let state = cluster.state();
    assert_eq!(state.bucket_props.len(), MAX_CUSTOM_BUCKETS);
    assert!(!state.bucket_props.contains_key("one-more"));
    assert_eq!(cluster.bucket_props("one-more").n_val, 3);
    cluster
        .set_bucket_props("custom7", Some(&props(1)))
        .await
        .unwrap();
    assert_eq!(cluster.bucket_props("custom7").n_val, 1);
    cluster.stop();
}

/// Drift 3: the request timeout of the server's configuration and of the core's
/// `Timings::SERVER` (what the simulator scales from) is one constant, and the node's
/// timings are the server's with the configured intervals.
#[test]
fn the_server_shares_the_cores_timings() {
    let timeouts = ClusterTimeouts::default();
    assert_eq!(millis(timeouts.request), Timings::SERVER.request_ms);
    assert_eq!(millis(timeouts.forward()), Timings::SERVER.forward_ms);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = crate::config::ServerConfig::new("a", any, any, std::path::PathBuf::new());
    assert_eq!(config.request_timeout_ms, Timings::SERVER.request_ms);
    let timings = timeouts.timings(config.aae_interval_ms, config.flush_interval_ms);
    assert_eq!(
        timings,
        Timings {
            aae_interval_ms: config.aae_interval_ms,
            flush_interval_ms: config.flush_interval_ms,
            ..Timings::SERVER
        }
    );
    let slower = ClusterTimeouts {
        request: Duration::from_secs(3),
    };
    let timings = slower.timings(1, 1);
    assert_eq!((timings.request_ms, timings.forward_ms), (3000, 15_000));
}

/// An administrative change is on disk, and read back by the data plane, once it is
/// answered (the HTTP handlers of bucket properties, security and leave answer then).
#[tokio::test]
async fn an_administrative_change_is_on_disk_and_visible_when_answered() {
    let storage = memory();
    let cluster = cluster_over(Arc::clone(&storage), settled(&["a", "b", "c"]));
    for i in 0..20 {
        let bucket = format!("b{i}");
        cluster
            .set_bucket_props(&bucket, Some(&props(2)))
            .await
            .unwrap();
        assert_eq!(cluster.bucket_props(&bucket).n_val, 2);
        let (stored, _) = load_persisted(storage.as_ref()).unwrap().unwrap();
        assert!(
            stored.bucket_props.contains_key(&bucket),
            "{bucket} is on disk"
        );
    }
    cluster
        .change_security(SecurityChange::PutUser {
            name: "alice".into(),
            password_hash: None,
        })
        .await
        .unwrap();
    assert!(cluster.state().security.users.contains_key("alice"));
    let refused = cluster
        .change_security(SecurityChange::RemoveUser {
            name: "mallory".into(),
        })
        .await;
    assert!(
        matches!(refused, Err(ClusterError::Refused { status: 404, .. })),
        "{refused:?}"
    );
    cluster.stop();
}

/// A full disk: an administrative change whose state cannot be written is reported as a
/// failure (500), not acknowledged; once the disk works again the next change writes the
/// whole state, the earlier change included.
#[tokio::test]
async fn an_administrative_change_the_disk_refuses_is_not_acknowledged() {
    use dynakv_storage::{FaultPoint, FaultyStorage};
    let faulty = Arc::new(FaultyStorage::new(MemoryStorage::new()));
    let switch = faulty.switch();
    let storage: Arc<dyn Storage> = faulty;
    let cluster = cluster_over(Arc::clone(&storage), settled(&["a", "b", "c"]));
    // Let the node write its starting state first.
    cluster.set_bucket_props("first", None).await.unwrap();
    switch.set(FaultPoint::Put, true);
    let refused = cluster.set_bucket_props("full", Some(&props(2))).await;
    assert!(
        matches!(refused, Err(ClusterError::Refused { status: 500, .. })),
        "a refused write is an error: {refused:?}"
    );
    switch.heal();
    cluster
        .set_bucket_props("after", Some(&props(2)))
        .await
        .unwrap();
    let (stored, _) = load_persisted(storage.as_ref()).unwrap().unwrap();
    assert!(stored.bucket_props.contains_key("full") && stored.bucket_props.contains_key("after"));
    cluster.stop();
}

/// A replica's newer state (its `StaleRing` refusal) is merged by the node and published
/// before `merge_peer_state` returns: the refused request re-plans on the newer ring.
#[tokio::test]
async fn a_newer_ring_is_read_back_once_merged() {
    let state = settled(&["a", "b"]);
    let cluster = cluster_over(memory(), state.clone());
    let mut newer = state;
    newer.add_joining(member("c", 3)).unwrap();
    assert!(newer.plan());
    assert!(newer.ring.version > cluster.state().ring.version);
    cluster.merge_peer_state(&newer).await.unwrap();
    assert_eq!(cluster.state().ring.version, newer.ring.version);
    assert!(cluster.state().is_member("c"));
    cluster.stop();
}

fn peer(name: &str) -> PeerInfo {
    PeerInfo {
        node_name: name.into(),
        public_key: [0; 32],
        remote_addr: "127.0.0.1:9".parse().unwrap(),
        clock_offset_ms: 0,
        protocol_version: crate::transport::PROTOCOL_VERSION,
    }
}

/// A peer's gossip is answered by the node (with its state); once the control plane has
/// stopped, no gossip is answered (a stopped node sends no heartbeat), while the data
/// plane's replica calls still are until the server stops.
#[tokio::test]
async fn gossip_goes_to_the_node_and_stops_with_it() {
    let state = settled(&["a", "b"]);
    let cluster = Arc::new(cluster_over(memory(), state.clone()));
    let reply = Arc::clone(&cluster)
        .handle_peer(peer("b"), PeerMessage::Gossip(Box::new(state.clone())))
        .await;
    let PeerMessage::Gossip(theirs) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(theirs.ring.version, state.ring.version);
    cluster.stop();
    let reply = Arc::clone(&cluster)
        .handle_peer(peer("b"), PeerMessage::Gossip(Box::new(state)))
        .await;
    assert!(matches!(reply, PeerMessage::Error(_)), "{reply:?}");
}

/// Every replica call's future is as large as the largest branch of the peer handler, and the
/// runtime copies it when it spawns and polls it: the rare branches (a forwarded put's whole
/// coordination, the node's gossip, listings) are boxed so that a replica call's future stays
/// small. The bounds hold in debug builds, whose futures are the larger.
#[tokio::test]
async fn a_replica_calls_future_is_not_sized_by_the_rare_requests() {
    let cluster = Arc::new(cluster_over(memory(), settled(&["a", "b"])));
    let from = peer("b");
    let message = PeerMessage::ListBuckets;
    let handling = Arc::clone(&cluster).handle_peer(from.clone(), message.clone());
    let peer_size = std::mem::size_of_val(&handling);
    drop(handling);
    let get = crate::requests::get(&cluster, "b", "k", None, None);
    let get_size = std::mem::size_of_val(&get);
    drop(get);
    // Debug build: 3,688 bytes with the rare branches inline, 2,432 boxed.
    assert!(
        peer_size <= 3072,
        "handle_peer's future is {peer_size} bytes"
    );
    assert!(get_size <= 3072, "a get's future is {get_size} bytes");
}
