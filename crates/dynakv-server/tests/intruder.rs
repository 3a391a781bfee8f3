//! Issue 17, the attacker's rows on a real 3-node cluster (in-process, sockets on 127.0.0.1):
//! a peer without the cluster secret (rows 1-6, 8) cannot make any node read one of its frames,
//! whatever it sends and whichever name it claims; a second process presenting a live member's
//! name with the right secret but another key is refused (row 9); a node asked to join with no
//! secret refuses to start (row 8). Nothing acknowledged is lost and the membership is unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_core::membership::{ClusterState, Member, MemberStatus};
use dynakv_core::message::PeerMessage;
use dynakv_core::object::{Content, Object, PrunePolicy};
use dynakv_core::ring::NodeId;
use dynakv_core::storage::Durability;
use dynakv_core::version::{ActorId, VersionVector};
use dynakv_server::ServerError;
use dynakv_server::config::ServerConfig;
use dynakv_server::link::LinkKeys;
use dynakv_server::secrets::{ClusterSecret, NodeKey};
use dynakv_server::transport::{PeerClient, TransportConfig, TransportError};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

use support::Node;

fn config(name: &str, dir: &std::path::Path, join: Option<SocketAddr>) -> ServerConfig {
    support::memory_config(name, dir, join)
}

async fn cluster() -> Vec<Node> {
    let first = support::start_node(|dir| config("n1", dir, None)).await;
    let seed = first.server.peer_addr;
    let mut nodes = vec![first];
    for i in 2..=3 {
        let name = format!("n{i}");
        nodes.push(support::start_node(|dir| config(&name, dir, Some(seed))).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| {
        let state = n.server.cluster.state();
        state.settled() && state.ring.current.nodes().len() == 3
    }) {
        assert!(Instant::now() < deadline, "ring did not settle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes
}

async fn value_on(node: &Node) -> (StatusCode, Bytes) {
    let (status, _, body) = node
        .client
        .request(Method::GET, "/buckets/b/keys/k?r=3", &[], Bytes::new())
        .await
        .unwrap();
    (status, body)
}

/// One member as a node sees it: name, peer address, key, status.
type MemberView = (String, String, Option<[u8; 32]>, MemberStatus);

/// What every node believes about the members.
fn membership(nodes: &[Node]) -> Vec<Vec<MemberView>> {
    nodes
        .iter()
        .map(|n| {
            n.server
                .cluster
                .state()
                .members
                .values()
                .map(|m| (m.id.0.clone(), m.peer_addr.clone(), m.public_key, m.status))
                .collect()
        })
        .collect()
}

/// The frames of the table, forged by someone who knows the protocol but not the
/// secret: a replica write with a dominating clock (row 3), hints for a ghost (row 4), a
/// gossip taking every partition for a fake member (row 6) and moving a member's address
/// (row 5), joins re-announcing a member (row 2) or adding a fake one (row 8).
fn forged_messages(state: &ClusterState) -> Vec<PeerMessage> {
    let mut takeover = state.clone();
    let fake = Member {
        id: NodeId("fake".into()),
        peer_addr: "127.0.0.1:1".into(),
        http_addr: "127.0.0.1:1".into(),
        zone: String::new(),
        status: MemberStatus::Valid,
        version: 100,
        heartbeat: 100,
        public_key: None,
    };
    takeover.members.insert(fake.id.clone(), fake.clone());
    if let Some(member) = takeover.members.get_mut(&NodeId("n2".into())) {
        member.peer_addr = "127.0.0.1:1".into();
        member.version += 100;
    }
    takeover.ring.version += 100;
    let mut rejoin = state.members[&NodeId("n2".into())].clone();
    rejoin.peer_addr = "127.0.0.1:1".into();
    // A version with a dominating clock (row 3), as hints for a ghost (row 4).
    let forged_object = Object::new()
        .update(
            &VersionVector::new(),
            Content {
                value: b"forged".to_vec(),
                content_type: "text/plain".into(),
                last_modified_ms: 1,
                meta: vec![],
                deleted: false,
                indexes: Vec::new(),
                expires_ms: None,
            },
            ActorId(u64::MAX - 7),
            1,
            PrunePolicy {
                threshold: usize::MAX,
                min_age_ms: 0,
                hard_limit: usize::MAX,
            },
        )
        .unwrap()
        .encode();
    vec![
        PeerMessage::ReplicaPut {
            bucket: "b".into(),
            key: "k".into(),
            object: forged_object.clone(),
            durability: Durability::Fsync,
            ring_version: state.ring.version,
        },
        PeerMessage::HintedPut {
            target: "ghost-1".into(),
            bucket: "b".into(),
            key: "k".into(),
            object: forged_object,
            durability: Durability::Fsync,
            ring_version: state.ring.version,
        },
        PeerMessage::Gossip(Box::new(takeover)),
        PeerMessage::JoinRequest {
            cluster_name: state.cluster_name.clone(),
            member: rejoin,
        },
        PeerMessage::JoinRequest {
            cluster_name: state.cluster_name.clone(),
            member: fake,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_changes_nothing_and_a_live_members_name_cannot_be_taken() {
    let nodes = cluster().await;
    let (status, _, _) = nodes[0]
        .client
        .request(
            Method::PUT,
            "/buckets/b/keys/k?w=3",
            &[("content-type", "text/plain")],
            Bytes::from_static(b"real"),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let before = membership(&nodes);
    let state = (*nodes[0].server.cluster.state()).clone();

    // Rows 1-6: the intruder speaks the protocol, knows the cluster name and a member's
    // name, but not the secret. Every request to every peer port is refused at the handshake.
    for claimed in ["n2", "intruder"] {
        let keys = LinkKeys::new(&ClusterSecret::from_bytes([9; 32]), &NodeKey::generate());
        let intruder: PeerClient<PeerMessage> =
            PeerClient::new(TransportConfig::new(&state.cluster_name, claimed, keys));
        for node in &nodes {
            for message in forged_messages(&state) {
                match intruder
                    .request(node.server.peer_addr, message, TIMEOUT)
                    .await
                {
                    Err(TransportError::Rejected { reason, .. }) => assert!(
                        !reason.contains(&state.cluster_name) && !reason.contains("n1"),
                        "the refusal tells something about the cluster: {reason}"
                    ),
                    // After a refusal the peer is in backoff: refused again without a connect.
                    Err(TransportError::Unreachable { reason, .. }) => {
                        assert!(reason.contains("backoff"), "{reason}");
                    }
                    other => panic!("the intruder got {other:?}"),
                }
            }
        }
    }

    // Row 9: a second process with the secret presents the live member n2's name: refused
    // (its key is not n2's), and n2 stays a member under its own key.
    let dir = tempfile::tempdir().unwrap();
    let impostor = config("n2", dir.path(), Some(nodes[0].server.peer_addr));
    let started = tokio::time::timeout(Duration::from_secs(60), dynakv_server::start(impostor))
        .await
        .expect("the impostor's start did not end");
    match started {
        Err(ServerError::Join(reason)) => {
            assert!(reason.contains("another key"), "{reason}");
        }
        Ok(_) => panic!("a second n2 was admitted"),
        Err(other) => panic!("unexpected error {other}"),
    }

    // Row 8: a node asked to join with no secret does not start, and says what it needs.
    let dir = tempfile::tempdir().unwrap();
    let mut rogue = config("rogue", dir.path(), Some(nodes[0].server.peer_addr));
    rogue.cluster_secret_file = None;
    match dynakv_server::start(rogue).await {
        Err(ServerError::Secret(reason)) => {
            assert!(reason.contains("--cluster-secret-file"), "{reason}");
        }
        Ok(_) => panic!("a node without the secret started and joined"),
        Err(other) => panic!("unexpected error {other}"),
    }

    // Nothing changed: the value on every replica, the membership on every node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        assert_eq!(
            value_on(node).await,
            (StatusCode::OK, Bytes::from_static(b"real"))
        );
    }
    assert_eq!(membership(&nodes), before);
    for node in &nodes {
        assert!(node.server.cluster.state().members.len() == 3);
    }
    for node in nodes {
        node.server.shutdown();
        node.server.wait().await.unwrap();
    }
}
