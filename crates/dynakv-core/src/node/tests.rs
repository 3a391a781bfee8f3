//! Tests of `Node` over in-memory storage and an instant network.

use super::*;
use crate::handoff::TransitionHandoff;
use crate::membership::{self, BucketPropsEntry};
use crate::message::WirePrecondition;
use crate::object::{Content, PrunePolicy};
use crate::replica::Precondition;
use crate::storage::Table;
use crate::test_support::{MapStorage, id, settled_cluster};
use crate::version::{Dot, VersionVector};
use std::sync::atomic::Ordering;

/// Nodes over `MapStorage`s on a network that delivers every message at once, in order;
/// timers are not run (the tests need none).
struct Net {
    nodes: Vec<Node>,
    disks: Vec<Arc<MapStorage>>,
    /// `Output::Persist`s carried out.
    persists: usize,
    replies: BTreeMap<ClientRequestId, ClientResult>,
    stopped: Vec<String>,
    /// `Output::Sync`s carried out.
    syncs: usize,
    /// The time every input is handled at.
    now: u64,
}

impl Net {
    fn new(cluster: &ClusterState) -> Net {
        let mut net = Net {
            nodes: Vec::new(),
            disks: Vec::new(),
            persists: 0,
            replies: BTreeMap::new(),
            stopped: Vec::new(),
            syncs: 0,
            now: 1,
        };
        for (i, (node_id, _)) in cluster.members.iter().enumerate() {
            let disk = Arc::new(MapStorage::default());
            let storage = Arc::clone(&disk) as Arc<dyn Storage>;
            let config = NodeConfig {
                timings: Timings::SIMULATION,
                ..NodeConfig::default()
            };
            let rng = SeededRng::new(i as u64);
            let actor = ActorId(100 + i as u64);
            let (node, _timers) = Node::new(
                node_id.clone(),
                actor,
                cluster.clone(),
                config,
                storage,
                rng,
                0,
            )
            .unwrap();
            net.nodes.push(node);
            net.disks.push(disk);
        }
        net
    }

    fn index(&self, node: &NodeId) -> usize {
        self.nodes.iter().position(|n| n.id() == node).unwrap()
    }

    /// Feed `input` to node `at` and deliver everything that follows.
    fn run(&mut self, at: usize, input: Input) {
        let mut queue = VecDeque::from([(at, input)]);
        while let Some((i, input)) = queue.pop_front() {
            let from = self.nodes[i].id().clone();
            for output in self.nodes[i].handle(self.now, input) {
                match output {
                    Output::Send { to, message } => {
                        let t = self.index(&to);
                        match message {
                            // A stopped node's process refuses connections.
                            Message::Request { id, .. } if self.nodes[t].stopped().is_some() => {
                                queue.push_back((i, Input::SendFailed { to, id }));
                            }
                            message => {
                                let from = from.clone();
                                queue.push_back((t, Input::Message { from, message }));
                            }
                        }
                    }
                    Output::Reply { id, result } => {
                        self.replies.insert(id, result);
                    }
                    Output::SetTimer { .. } => {}
                    Output::Sync { through } => {
                        self.syncs += 1;
                        let input = match self.disks[i].sync() {
                            Ok(()) => Input::Synced { through },
                            Err(e) => Input::SyncFailed {
                                error: e.to_string(),
                            },
                        };
                        queue.push_back((i, input));
                    }
                    Output::Persist { state } => {
                        self.persists += 1;
                        membership::store_persisted(self.disks[i].as_ref(), &state).unwrap();
                    }
                    Output::Stopped { error } => self.stopped.push(error),
                }
            }
        }
    }

    fn put(&mut self, at: usize, id: ClientRequestId, bucket: &str, key: &str, value: &[u8]) {
        let op = ClientOp::Put(PutOp::new(bucket, key, None, Some(value.to_vec())));
        self.run(at, Input::Client { id, op });
    }

    fn ask(&mut self, at: usize, id: ClientRequestId, op: ClientOp) {
        self.run(at, Input::Client { id, op });
    }

    /// How many of the nodes `at` store `bucket/key`.
    fn copies_on(&self, at: &[usize], bucket: &str, key: &str) -> usize {
        let stored = |i: &usize| self.nodes[*i].object(bucket, key).unwrap().is_some();
        at.iter().filter(|i| stored(i)).count()
    }

    /// How many nodes store `bucket/key`.
    fn copies(&self, bucket: &str, key: &str) -> usize {
        let stored = |n: &Node| n.object(bucket, key).unwrap().is_some();
        self.nodes.iter().filter(|n| stored(n)).count()
    }
}

/// `result` is a failure with `status` whose message says `text`.
fn refused(result: &ClientResult, status: u16, text: &str) {
    match result {
        ClientResult::Failed {
            status: got,
            message,
        } => {
            assert_eq!(*got, status, "{message}");
            assert!(message.contains(text), "{message}");
        }
        other => panic!("expected a {status}: {other:?}"),
    }
}

fn cluster_of_three() -> ClusterState {
    settled_cluster(&["a", "b", "c"], 16)
}

/// A cluster of three whose bucket `single` has one replica per key.
fn cluster_with_single_replica_bucket() -> ClusterState {
    let mut cluster = cluster_of_three();
    cluster.bucket_props.insert(
        "single".into(),
        BucketPropsEntry {
            timestamp_ms: 1,
            node: id("a"),
            props_json: Some(r#"{"n_val":1}"#.into()),
        },
    );
    cluster
}

#[test]
fn a_forwarded_put_keeps_its_content_type_metadata_and_precondition() {
    let mut net = Net::new(&cluster_with_single_replica_bucket());
    let key = "doc";
    let primary = net.index(&net.nodes[0].primaries("single", key)[0]);
    let other = (primary + 1) % 3;
    let mut op = PutOp::new("single", key, None, Some(b"{}".to_vec()));
    op.content.content_type = "application/json".into();
    op.content.meta = vec![("x-riak-meta-color".into(), "blue".into())];
    op.precondition = Precondition::Absent;
    let first = op.clone();
    net.ask(other, 1, ClientOp::Put(first));
    assert!(
        matches!(net.replies[&1], ClientResult::Put(_)),
        "{:?}",
        net.replies[&1]
    );
    let stored = net.nodes[primary].object("single", key).unwrap().unwrap();
    let content = &stored.siblings()[0].content;
    assert_eq!(content.content_type, "application/json");
    assert_eq!(
        content.meta,
        vec![("x-riak-meta-color".to_owned(), "blue".to_owned())]
    );
    // If-None-Match: * again, through the same non-replica: the coordinator refuses it
    // and the forwarder passes its 412 on.
    net.ask(other, 2, ClientOp::Put(op));
    match &net.replies[&2] {
        ClientResult::Failed { status, .. } => assert_eq!(*status, 412),
        other => panic!("second conditional put: {other:?}"),
    }
    assert_eq!(
        net.nodes[primary]
            .object("single", key)
            .unwrap()
            .unwrap()
            .siblings()
            .len(),
        1
    );
}

fn sends(outputs: &[Output]) -> Vec<&PeerMessage> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                message: Message::Request { body, .. } | Message::Response { body, .. },
                ..
            } => Some(body),
            _ => None,
        })
        .collect()
}

fn sync_asked(outputs: &[Output]) -> Option<u64> {
    outputs.iter().find_map(|o| match o {
        Output::Sync { through } => Some(*through),
        _ => None,
    })
}

#[test]
fn a_durable_write_is_sent_on_and_acknowledged_only_after_its_sync() {
    let mut net = Net::new(&cluster_of_three());
    // The coordinator (fsync bucket, the default): its own copy is written and a sync
    // asked for; nothing is sent to the replicas before `Synced`.
    let op = ClientOp::Put(PutOp::new("b", "k", None, Some(b"v".to_vec())));
    let out = net.nodes[0].handle(1, Input::Client { id: 1, op });
    let through = sync_asked(&out).unwrap();
    assert!(sends(&out).is_empty(), "{out:?}");
    assert!(net.nodes[0].object("b", "k").unwrap().is_some());
    let out = net.nodes[0].handle(2, Input::Synced { through });
    let puts = sends(&out);
    assert_eq!(puts.len(), 2, "{out:?}");
    // A replica: the durable `ReplicaPut` is stored at once, acknowledged after `Synced`.
    let from = net.nodes[0].id().clone();
    let message = Message::Request {
        id: 7,
        body: puts[0].clone(),
    };
    let out = net.nodes[1].handle(3, Input::Message { from, message });
    let through = sync_asked(&out).unwrap();
    assert!(sends(&out).is_empty(), "{out:?}");
    assert!(net.nodes[1].object("b", "k").unwrap().is_some());
    let out = net.nodes[1].handle(4, Input::Synced { through });
    assert!(matches!(sends(&out)[..], [PeerMessage::Ack]), "{out:?}");
    // A buffered bucket's write is sent on at once (its durable replica waits instead).
    let op = PutOp::new("b", "k2", None, Some(b"v".to_vec()));
    net.nodes[2].config.props.durability = StoreDurability::Buffered;
    let out = net.nodes[2].handle(
        5,
        Input::Client {
            id: 2,
            op: ClientOp::Put(op),
        },
    );
    assert_eq!(sends(&out).len(), 2, "{out:?}");
}

/// A replica put a peer cannot carry (it runs the previous protocol version) fails as unsent
/// without marking the peer down, while one that could not be sent (connection refused) does
/// mark it down: a refused indexed write must not make the plain writes after it skip an old
/// replica (the rolling upgrade test saw them fail with "1 asked").
#[test]
fn a_refused_send_leaves_the_peer_up_and_a_failed_one_backs_it_off() {
    let mut net = Net::new(&cluster_of_three());
    net.nodes[0].config.props.durability = StoreDurability::Buffered;
    let requests = |out: &[Output]| -> Vec<(NodeId, RequestId)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    message: Message::Request { id, .. },
                } => Some((to.clone(), *id)),
                _ => None,
            })
            .collect()
    };
    let op = |key: &str| Input::Client {
        id: 1,
        op: ClientOp::Put(PutOp::new("b", key, None, Some(b"v".to_vec()))),
    };
    let out = net.nodes[0].handle(1, op("k1"));
    let sent = requests(&out);
    assert_eq!(sent.len(), 2, "{out:?}");
    let (to, id) = sent[0].clone();
    net.nodes[0].handle(2, Input::SendRefused { to: to.clone(), id });
    assert!(net.nodes[0].is_up(3, &to));
    // The next write still goes to that peer.
    let out = net.nodes[0].handle(3, op("k2"));
    assert!(
        requests(&out).iter().any(|(peer, _)| *peer == to),
        "{out:?}"
    );
    let (to, id) = requests(&out)[0].clone();
    net.nodes[0].handle(4, Input::SendFailed { to: to.clone(), id });
    assert!(!net.nodes[0].is_up(5, &to));
}

#[test]
fn a_failed_sync_stops_the_node_before_anything_waiting_for_it() {
    let mut net = Net::new(&cluster_of_three());
    let op = ClientOp::Put(PutOp::new("b", "k", None, Some(b"v".to_vec())));
    let out = net.nodes[0].handle(1, Input::Client { id: 1, op });
    assert!(sync_asked(&out).is_some());
    let error = "fsync: EIO".to_owned();
    let out = net.nodes[0].handle(2, Input::SyncFailed { error });
    assert!(
        matches!(&out[..], [Output::Stopped { error }] if error.contains("EIO")),
        "{out:?}"
    );
    assert!(net.nodes[0].stopped().is_some());
}

#[test]
fn a_cluster_of_nodes_completes_durable_writes_through_their_syncs() {
    let mut net = Net::new(&cluster_of_three());
    for k in 0..5u64 {
        net.put(k as usize % 3, k, "b", &format!("k{k}"), b"v");
        assert!(
            matches!(net.replies[&k], ClientResult::Put(_)),
            "{:?}",
            net.replies[&k]
        );
    }
    assert!(net.syncs >= 5, "{} syncs", net.syncs);
    assert_eq!(net.copies("b", "k4"), 3);
}

#[test]
fn bucket_props_set_at_one_node_reach_the_others_by_gossip() {
    let mut net = Net::new(&cluster_of_three());
    let props = BucketProps {
        n_val: 2,
        ..BucketProps::default()
    };
    let op = ClientOp::SetBucketProps {
        bucket: "two".into(),
        props: Some(props),
    };
    net.run(0, Input::Client { id: 1, op });
    assert!(matches!(net.replies[&1], ClientResult::Done));
    assert_eq!(net.nodes[0].props("two").n_val, 2);
    assert_eq!(net.nodes[1].props("two").n_val, 3, "not gossiped yet");
    for _ in 0..20 {
        for i in 0..3 {
            net.run(i, Input::Timer(Timer::Gossip));
        }
    }
    for node in &net.nodes {
        assert_eq!(node.props("two").n_val, 2, "{}", node.id());
    }
    // Each node wrote the change it learned (and not every heartbeat of 20 rounds).
    assert!((3..20).contains(&net.persists), "{} writes", net.persists);
    for disk in &net.disks {
        let stored = membership::load_persisted(disk.as_ref()).unwrap().unwrap();
        assert!(stored.bucket_props.contains_key("two"));
    }
    net.put(1, 2, "two", "k", b"v");
    assert!(matches!(net.replies[&2], ClientResult::Put(_)));
    assert_eq!(net.copies("two", "k"), 2);
    // A reset (`None`) brings the defaults back.
    let op = ClientOp::SetBucketProps {
        bucket: "two".into(),
        props: None,
    };
    net.run(2, Input::Client { id: 3, op });
    assert_eq!(net.nodes[2].props("two").n_val, 3);
}

/// The cluster state is written when it changes beyond heartbeats, before the reply to the
/// change, and not for a heartbeat alone; a restart reads back what was written.
#[test]
fn the_cluster_state_is_persisted_when_it_changes_and_read_back_at_restart() {
    let cluster = cluster_of_three();
    let storage = Arc::new(MapStorage::default());
    let (mut node, first) = Node::new(
        id("a"),
        ActorId(1),
        cluster.clone(),
        NodeConfig::default(),
        Arc::clone(&storage) as Arc<dyn Storage>,
        SeededRng::new(1),
        0,
    )
    .unwrap();
    assert!(
        matches!(first.first(), Some(Output::Persist { state }) if **state == cluster),
        "the state it starts from is written first"
    );
    // A gossip round beats (a heartbeat is not worth a write).
    let beat = node.handle(10, Input::Timer(Timer::Gossip));
    assert!(
        !beat.iter().any(|o| matches!(o, Output::Persist { .. })),
        "{beat:?}"
    );
    let op = ClientOp::SetBucketProps {
        bucket: "two".into(),
        props: Some(BucketProps {
            n_val: 2,
            ..BucketProps::default()
        }),
    };
    let outputs = node.handle(20, Input::Client { id: 7, op });
    let Some(Output::Persist { state }) = outputs.first() else {
        panic!("not persisted first: {outputs:?}")
    };
    assert!(state.bucket_props.contains_key("two"));
    let replied = outputs
        .iter()
        .position(|o| matches!(o, Output::Reply { .. }));
    assert!(replied.is_some_and(|at| at > 0));
    // A leave asked between inputs is written too (found by the simulator: a leave followed
    // by a crash before the next state-changing input came back without it).
    let left = node.leave().unwrap();
    assert!(
        matches!(left.as_slice(), [Output::Persist { state }]
            if state.member(&id("a")).map(|m| m.status) == Some(MemberStatus::Leaving)),
        "{left:?}"
    );
    // What the disk holds is what a restart starts from (here: the state before the change,
    // as if its write had not happened before a crash).
    membership::store_persisted(storage.as_ref(), &cluster).unwrap();
    node.restart(30, ActorId(2), SeededRng::new(2)).unwrap();
    assert!(node.cluster().persists_as(&cluster));
    assert!(!node.cluster().bucket_props.contains_key("two"));
    // A stored state that does not read (a damaged disk, a newer format) stops the restart
    // with an error instead of starting from a guess.
    storage
        .put(
            Table::Meta,
            membership::PERSISTED_STATE_KEY,
            b"{\"format\": 99, \"state\": {}}",
            StoreDurability::Fsync,
        )
        .unwrap();
    assert!(node.restart(40, ActorId(3), SeededRng::new(3)).is_err());
    storage
        .put(
            Table::Meta,
            membership::PERSISTED_STATE_KEY,
            b"\xff\x00",
            StoreDurability::Fsync,
        )
        .unwrap();
    assert!(node.restart(50, ActorId(4), SeededRng::new(4)).is_err());
}

#[test]
fn a_client_joins_a_lone_empty_node_once_and_a_member_or_a_node_with_data_is_refused() {
    let mut net = Net::new(&cluster_of_three());
    let disk = Arc::new(MapStorage::default());
    let storage = Arc::clone(&disk) as Arc<dyn Storage>;
    let alone = ClusterState::found("c", member_entry(&id("d")), 16).unwrap();
    let config = NodeConfig {
        timings: Timings::SIMULATION,
        ..NodeConfig::default()
    };
    let (d, _) = Node::new(
        id("d"),
        ActorId(7),
        alone,
        config,
        storage,
        SeededRng::new(4),
        0,
    )
    .unwrap();
    net.nodes.push(d);
    net.disks.push(disk);
    // A member of a three-node cluster cannot join elsewhere.
    net.ask(1, 1, ClientOp::Join { via: id("d") });
    refused(&net.replies[&1], 400, "already part of a cluster");
    // The lone empty node is admitted.
    net.ask(3, 2, ClientOp::Join { via: id("a") });
    assert!(
        matches!(net.replies[&2], ClientResult::Done),
        "{:?}",
        net.replies[&2]
    );
    assert!(net.nodes[3].joined());
    assert_eq!(net.nodes[3].cluster().members.len(), 4);
    assert!(net.nodes[0].cluster().member(&id("d")).is_some());
    // Leave: the node marks itself leaving.
    net.ask(3, 3, ClientOp::Leave);
    assert!(matches!(net.replies[&3], ClientResult::Done));
    let status = net.nodes[3].cluster().member(&id("d")).map(|m| m.status);
    assert_eq!(status, Some(MemberStatus::Leaving));
}

#[test]
fn a_lone_node_that_holds_data_may_not_join() {
    let alone = ClusterState::found("c", member_entry(&id("e")), 16).unwrap();
    let mut net = Net::new(&alone);
    net.put(0, 1, "b", "k", b"v");
    assert!(matches!(net.replies[&1], ClientResult::Put(_)));
    net.ask(0, 2, ClientOp::Join { via: id("a") });
    refused(&net.replies[&2], 400, "holds data");
}

/// The pages a key listing through node `at` answered, in order.
fn list(net: &mut Net, at: usize, id: ClientRequestId, bucket: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut queue = VecDeque::from([(
        at,
        Input::Client {
            id,
            op: ClientOp::ListKeys {
                bucket: bucket.into(),
            },
        },
    )]);
    // As `Net::run`, keeping every reply of the request (a listing answers several).
    while let Some((i, input)) = queue.pop_front() {
        let from = net.nodes[i].id().clone();
        for output in net.nodes[i].handle(1, input) {
            match output {
                Output::Send { to, message } => {
                    let t = net.index(&to);
                    if let Message::Request { id, .. } = &message
                        && net.nodes[t].stopped().is_some()
                    {
                        queue.push_back((i, Input::SendFailed { to, id: *id }));
                        continue;
                    }
                    queue.push_back((
                        t,
                        Input::Message {
                            from: from.clone(),
                            message,
                        },
                    ));
                }
                Output::Reply { id: got, result } => {
                    assert_eq!(got, id);
                    match result {
                        ClientResult::Keys { keys, last } => {
                            pages.push(keys);
                            if last {
                                return pages;
                            }
                        }
                        other => panic!("listing: {other:?}"),
                    }
                }
                Output::Sync { through } => queue.push_back((i, Input::Synced { through })),
                Output::SetTimer { .. } | Output::Stopped { .. } | Output::Persist { .. } => {}
            }
        }
    }
    panic!(
        "the listing never sent its last page ({} pages)",
        pages.len()
    );
}

#[test]
fn a_key_listing_merges_every_nodes_pages_without_deleted_keys_or_duplicates() {
    let mut net = Net::new(&cluster_with_single_replica_bucket());
    let mut expected = BTreeSet::new();
    for k in 0..2500u64 {
        let key = format!("k{k:05}");
        net.put((k % 3) as usize, k, "single", &key, b"v");
        net.put((k % 3) as usize, 10_000 + k, "default", &key, b"v");
        expected.insert(key);
    }
    // Deleted keys (a tombstone with the context) are not listed.
    for k in (0..2500u64).step_by(7) {
        let key = format!("k{k:05}");
        for bucket in ["single", "default"] {
            let at = net.index(&net.nodes[0].primaries(bucket, &key)[0]);
            let clock = net.nodes[at]
                .object(bucket, &key)
                .unwrap()
                .unwrap()
                .clock()
                .clone();
            let op = PutOp::new(bucket, &key, Some(clock), None);
            net.ask(at, 20_000 + k, ClientOp::Put(op));
        }
        expected.remove(&key);
    }
    let expected: Vec<String> = expected.into_iter().collect();
    for bucket in ["single", "default"] {
        let pages = list(&mut net, 1, 50_000, bucket);
        assert!(pages.len() >= 3, "{bucket}: {} pages", pages.len());
        assert!(pages.iter().all(|p| p.len() <= LIST_PAGE_KEYS));
        let keys: Vec<String> = pages.concat();
        assert_eq!(keys, expected, "{bucket}");
    }
    // With one node stopped, the three-replica bucket is still listed whole.
    net.disks[2].failing.store(true, Ordering::SeqCst);
    net.put(2, 60_000, "default", "k00001", b"w");
    assert!(net.nodes[2].stopped().is_some());
    assert_eq!(list(&mut net, 0, 60_001, "default").concat(), expected);
    net.ask(0, 60_002, ClientOp::ListBuckets);
    match &net.replies[&60_002] {
        ClientResult::Buckets(buckets) => assert_eq!(buckets, &["default", "single"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn anti_entropy_repairs_a_key_a_restarted_replica_missed_and_records_it() {
    let mut net = Net::new(&cluster_of_three());
    net.disks[2].failing.store(true, Ordering::SeqCst);
    net.put(2, 1, "b", "first", b"v");
    assert!(net.nodes[2].stopped().is_some());
    net.put(0, 2, "b", "missed", b"v");
    assert!(matches!(net.replies[&2], ClientResult::Put(_)));
    net.disks[2].failing.store(false, Ordering::SeqCst);
    assert_eq!(net.copies_on(&[2], "b", "missed"), 0);
    net.nodes[2]
        .restart(net.now, ActorId(55), SeededRng::new(5))
        .unwrap();
    // Past the transport's backoff; the failure detector was fed by the puts' traffic.
    net.now += 10_000;
    for i in 0..3 {
        net.run(i, Input::Timer(Timer::Gossip));
    }
    for round in 0..30 {
        net.now += 2_000;
        net.run(round % 3, Input::Timer(Timer::Aae));
        if net.copies_on(&[2], "b", "missed") == 1 {
            break;
        }
    }
    assert_eq!(
        net.copies_on(&[2], "b", "missed"),
        1,
        "anti-entropy repaired it"
    );
    let repaired: u64 = net
        .nodes
        .iter()
        .flat_map(|n| n.aae_records().values())
        .map(|r| r.keys_repaired_total)
        .sum();
    assert!(repaired >= 1, "the exchange that repaired it is recorded");
}

#[test]
fn a_forward_from_a_node_whose_clock_is_behind_is_judged_on_this_nodes_clock() {
    let mut net = Net::new(&cluster_with_single_replica_bucket());
    let key = "late";
    let primary = net.index(&net.nodes[0].primaries("single", key)[0]);
    let forwarder = (primary + 1) % 3;
    let from = net.nodes[forwarder].id().clone();
    let forward = |now_ms: u64| PeerMessage::CoordinatePut {
        bucket: "single".into(),
        key: key.into(),
        context: None,
        content: Box::new(PutOp::new("single", key, None, Some(b"v".to_vec())).content),
        w: None,
        pw: None,
        dw_given: false,
        precondition: WirePrecondition::None,
        now_ms,
        ring_version: 0,
    };
    let now = 100_000;
    net.now = now;
    // The forwarder's clock is 10 s behind: unconverted, its fresh forward looks 10 s old.
    let message = Message::Request {
        id: 1,
        body: forward(now - 10_000),
    };
    let out = net.nodes[primary].handle(
        now,
        Input::Message {
            from: from.clone(),
            message,
        },
    );
    assert!(
        matches!(sends(&out)[..], [PeerMessage::Failed { .. }]),
        "refused as late: {out:?}"
    );
    let clock = Input::Hello {
        peer: from.clone(),
        offset_ms: -10_000,
        key: None,
    };
    net.nodes[primary].handle(now, clock);
    let message = Message::Request {
        id: 2,
        body: forward(now - 10_000),
    };
    net.run(primary, Input::Message { from, message });
    assert!(
        net.nodes[primary].object("single", key).unwrap().is_some(),
        "coordinated"
    );
}

#[test]
fn a_stored_object_that_does_not_decode_fails_its_requests_but_does_not_stop_the_node() {
    let mut net = Net::new(&cluster_of_three());
    net.put(0, 1, "b", "bad", b"v");
    let storage_key = keys::object_key(b"b", b"bad");
    net.disks[0]
        .put(
            Table::Objects,
            &storage_key,
            b"not an object",
            StoreDurability::Fsync,
        )
        .unwrap();
    // A write coordinated over it is refused (500), as in the server.
    let op = PutOp::new("b", "bad", None, Some(b"w".to_vec()));
    net.ask(0, 2, ClientOp::Put(op));
    refused(&net.replies[&2], 500, "corrupt");
    // A get through the node counts its own copy as a failed reply; the others answer.
    let get = ClientOp::Get {
        bucket: "b".into(),
        key: "bad".into(),
        r: Some(Quorum::Count(2)),
        pr: None,
    };
    net.ask(0, 3, get);
    assert!(
        matches!(net.replies[&3], ClientResult::Got(_)),
        "{:?}",
        net.replies[&3]
    );
    // Anti-entropy rounds skip it. The node never stopped, and serves other keys.
    net.now += 10_000;
    for _ in 0..5 {
        net.now += 2_000;
        net.run(0, Input::Timer(Timer::Aae));
    }
    assert!(net.nodes[0].stopped().is_none());
    assert!(net.stopped.is_empty(), "{:?}", net.stopped);
    assert!(net.nodes[0].stats().corrupt_skipped >= 2);
    for i in 0..3 {
        net.run(i, Input::Timer(Timer::Gossip)); // heartbeats after the time jump
    }
    net.put(0, 4, "b", "good", b"v");
    assert!(
        matches!(net.replies[&4], ClientResult::Put(_)),
        "{:?}",
        net.replies[&4]
    );
}

#[test]
fn pr_larger_than_the_primaries_up_fails_the_get_at_once() {
    let mut net = Net::new(&cluster_of_three());
    net.put(0, 1, "b", "k", b"v");
    // Node "a" stops (its process refuses connections): asked with PR = 3, a get
    // through "b" cannot count three primaries and answers 503; PR = 1 is met.
    net.disks[0].failing.store(true, Ordering::SeqCst);
    net.put(0, 2, "b", "k2", b"v");
    assert!(net.nodes[0].stopped().is_some());
    let get_k = |pr| ClientOp::Get {
        bucket: "b".into(),
        key: "k".into(),
        r: Some(Quorum::One),
        pr: Some(pr),
    };
    net.run(
        1,
        Input::Client {
            id: 3,
            op: get_k(Quorum::All),
        },
    );
    match net.replies.get(&3) {
        Some(ClientResult::Failed { status, message }) => {
            assert_eq!(*status, 503, "{message}");
        }
        other => panic!("get with PR = all: {other:?}"),
    }
    net.run(
        1,
        Input::Client {
            id: 4,
            op: get_k(Quorum::One),
        },
    );
    assert!(matches!(net.replies.get(&4), Some(ClientResult::Got(_))));
}

#[test]
fn each_bucket_is_replicated_by_its_own_properties() {
    let mut net = Net::new(&cluster_with_single_replica_bucket());
    for k in 0..10 {
        let key = format!("k{k}");
        net.put(k % 3, 2 * k as u64, "default", &key, b"x");
        net.put(k % 3, 2 * k as u64 + 1, "single", &key, b"y");
        assert!(matches!(net.replies[&(2 * k as u64)], ClientResult::Put(_)));
        assert!(matches!(
            net.replies[&(2 * k as u64 + 1)],
            ClientResult::Put(_)
        ));
        assert_eq!(net.copies("default", &key), 3, "n_val 3 for {key}");
        assert_eq!(net.copies("single", &key), 1, "n_val 1 for {key}");
        let primary = net.index(&net.nodes[0].primaries("single", &key)[0]);
        assert!(net.nodes[primary].object("single", &key).unwrap().is_some());
    }
    // A get through any node merges what the bucket's replicas hold.
    let op = ClientOp::Get {
        bucket: "single".into(),
        key: "k4".into(),
        r: None,
        pr: None,
    };
    net.run(2, Input::Client { id: 99, op });
    match &net.replies[&99] {
        ClientResult::Got(object) => assert_eq!(object.siblings()[0].content.value, b"y"),
        other => panic!("get: {other:?}"),
    }
    assert!(net.stopped.is_empty());
}

#[test]
fn a_failed_storage_call_stops_the_node_and_nothing_of_that_step_leaves_it() {
    let cluster = cluster_of_three();
    let mut net = Net::new(&cluster);
    // A key node "a" coordinates (it is a primary of every key with n_val 3 of 3 nodes).
    net.put(0, 1, "b", "before", b"v1");
    assert!(matches!(net.replies[&1], ClientResult::Put(_)));
    net.disks[0].failing.store(true, Ordering::SeqCst);
    net.put(0, 2, "b", "during", b"v2");
    // No reply, no replica write sent, one `Stopped`.
    assert!(!net.replies.contains_key(&2));
    assert_eq!(net.copies_on(&[1, 2], "b", "during"), 0);
    assert_eq!(net.stopped.len(), 1, "{:?}", net.stopped);
    assert!(
        net.stopped[0].contains("storage failed"),
        "{}",
        net.stopped[0]
    );
    assert!(net.nodes[0].stopped().is_some());
    // A stopped node ignores input and says `Stopped` only once.
    net.put(0, 3, "b", "later", b"v3");
    assert!(!net.replies.contains_key(&3));
    assert_eq!(net.stopped.len(), 1);
    // The disk heals; the driver restarts the node under a new actor: it serves again
    // and kept what it stored before.
    net.disks[0].failing.store(false, Ordering::SeqCst);
    let timers = net.nodes[0]
        .restart(5, ActorId(999), SeededRng::new(9))
        .unwrap();
    assert!(!timers.is_empty());
    assert_eq!(net.nodes[0].actor(), ActorId(999));
    assert!(net.nodes[0].object("b", "before").unwrap().is_some());
    net.put(0, 4, "b", "after", b"v4");
    assert!(matches!(net.replies[&4], ClientResult::Put(_)));
    assert_eq!(net.copies("b", "after"), 3);
}

#[test]
fn a_replica_whose_storage_fails_does_not_acknowledge() {
    let cluster = cluster_of_three();
    let mut net = Net::new(&cluster);
    net.disks[1].failing.store(true, Ordering::SeqCst);
    net.disks[2].failing.store(true, Ordering::SeqCst);
    net.put(0, 1, "b", "k", b"v");
    // Both other replicas stopped without answering: W = 2 is not met by "a" alone
    // (the request timeouts, not run here, would fail it; no success is ever sent).
    assert!(!matches!(net.replies.get(&1), Some(ClientResult::Put(_))));
    assert_eq!(net.stopped.len(), 2, "{:?}", net.stopped);
}

#[test]
fn keeping_the_first_sibling_keeps_the_clock() {
    let a = Object::new()
        .update(
            &VersionVector::new(),
            Content {
                value: b"x".to_vec(),
                ..Content::default()
            },
            ActorId(1),
            1,
            PrunePolicy::default(),
        )
        .unwrap();
    let b = Object::new()
        .update(
            &VersionVector::new(),
            Content {
                value: b"y".to_vec(),
                ..Content::default()
            },
            ActorId(2),
            2,
            PrunePolicy::default(),
        )
        .unwrap();
    let merged = a.sync(&b);
    assert_eq!(merged.siblings().len(), 2);
    let one = merged.keep_first_sibling_only();
    assert_eq!(one.siblings().len(), 1);
    assert_eq!(
        one.siblings()[0].dot,
        Dot {
            actor: ActorId(1),
            counter: 1
        }
    );
    assert_eq!(one.clock(), merged.clock());
}

/// Node `a` of a settled a, b, c ring that d is joining (the claimant planned the transition),
/// over `storage`: `a` hands keys to d.
fn handing_off_to_d(storage: Arc<dyn Storage>) -> Node {
    let mut state = settled_cluster(&["a", "b", "c"], 16);
    state
        .add_joining(crate::test_support::member("d", MemberStatus::Joining))
        .unwrap();
    state.plan();
    assert!(state.ring.next.is_some());
    let config = NodeConfig {
        timings: Timings::SIMULATION,
        ..NodeConfig::default()
    };
    let rng = SeededRng::new(1);
    Node::new(id("a"), ActorId(1), state, config, storage, rng, 0)
        .unwrap()
        .0
}

/// Store `value` under `bucket`/`key` on `node` (as a coordinator would, without replicating).
fn store(node: &Node, bucket: &str, key: &str, value: Vec<u8>) {
    node.replica
        .write(WriteRequest {
            bucket,
            key,
            context: None,
            content: Content {
                value,
                ..Content::default()
            },
            props: &BucketProps::default(),
            durability: StoreDurability::Buffered,
            precondition: Precondition::None,
            now_ms: 1,
            wall_ms: 1,
        })
        .unwrap();
}

/// The `Handoff` requests among `outputs`: id, destination, entries.
fn handoff_sends(outputs: &[Output]) -> Vec<(RequestId, NodeId, Vec<HandoffEntry>)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send {
                to,
                message:
                    Message::Request {
                        id,
                        body: PeerMessage::Handoff { entries, .. },
                    },
            } => Some((*id, to.clone(), entries.clone())),
            _ => None,
        })
        .collect()
}

/// Drift 4: a node's transition handoff is paged and resumable, as the server's: no `handle`
/// scans the whole store or sends everything at once. Each one sends at most
/// `HANDOFF_BATCHES_IN_FLIGHT` batches, each of at most `HANDOFF_BATCH_KEYS` keys and (soft,
/// as the server's) `HANDOFF_BATCH_BYTES` bytes: within the bound before its last entry. The
/// next batch goes once the previous one is acknowledged (or `Timer::Paging` resumes a scan
/// that found nothing to send), and the handoff is marked done once every key that moves
/// went to d. (Before: one `handle` scanned the store and sent batches of unbounded bytes all
/// at once.)
#[test]
fn a_transition_handoff_is_paged_and_each_step_is_bounded() {
    let disk = Arc::new(MapStorage::default());
    let node = handing_off_to_d(Arc::clone(&disk) as Arc<dyn Storage>);
    // Large values first ("big" sorts before "small"), then three pages of small ones.
    for i in 0..120 {
        store(&node, "big", &format!("k{i}"), vec![7; 100 * 1024]);
    }
    for i in 0..3 * SCAN_PAGE_KEYS {
        store(&node, "small", &format!("k{i}"), vec![1; 16]);
    }
    let d = id("d");
    let mut expected = BTreeSet::new();
    for (bucket, key, _) in node.objects().unwrap() {
        let partition = node.partition_of(&bucket, &key);
        if TransitionHandoff::destinations(node.cluster(), &id("a"), partition, 3).contains(&d) {
            expected.insert((bucket, key));
        }
    }
    assert!(
        expected.len() > 2 * HANDOFF_BATCH_KEYS,
        "{}",
        expected.len()
    );
    let mut node = node;

    let mut outputs = node.handle(1, Input::Timer(Timer::Gossip));
    let mut sent = BTreeSet::new();
    let mut in_flight: VecDeque<RequestId> = VecDeque::new();
    let (mut handles, mut closed_by_bytes) = (0, false);
    loop {
        handles += 1;
        assert!(handles < 10_000, "the handoff does not end");
        let sends = handoff_sends(&outputs);
        in_flight.extend(sends.iter().map(|(id, _, _)| *id));
        assert!(
            in_flight.len() <= HANDOFF_BATCHES_IN_FLIGHT,
            "{} batches in flight",
            in_flight.len()
        );
        for (_, to, entries) in &sends {
            assert_eq!(*to, d);
            assert!(!entries.is_empty() && entries.len() <= HANDOFF_BATCH_KEYS);
            let bytes: usize = entries.iter().map(|e| e.object.len()).sum();
            let last = entries.last().map_or(0, |e| e.object.len());
            assert!(bytes - last < HANDOFF_BATCH_BYTES, "{bytes} bytes");
            closed_by_bytes |= entries.len() < HANDOFF_BATCH_KEYS && bytes >= HANDOFF_BATCH_BYTES;
            for e in entries {
                assert!(sent.insert((e.bucket.clone(), e.key.clone())), "sent twice");
            }
        }
        let paging = outputs.iter().any(|o| {
            matches!(
                o,
                Output::SetTimer {
                    timer: Timer::Paging,
                    ..
                }
            )
        });
        outputs = if let Some(id) = in_flight.pop_front() {
            let message = Message::Response {
                id,
                body: PeerMessage::Ack,
            };
            node.handle(
                1,
                Input::Message {
                    from: d.clone(),
                    message,
                },
            )
        } else if paging {
            node.handle(1, Input::Timer(Timer::Paging))
        } else {
            break;
        };
    }
    assert!(closed_by_bytes, "a batch closed at the byte bound");
    assert!(handles > 3, "one handle per batch or page");
    assert_eq!(sent, expected);
    assert!(node.cluster().handoff_done(&id("a")));
}

/// The first failed batch ends the round's handoff unmarked, and the next round starts over.
#[test]
fn a_failed_handoff_batch_ends_the_run_and_a_later_round_starts_over() {
    let disk = Arc::new(MapStorage::default());
    let mut node = handing_off_to_d(Arc::clone(&disk) as Arc<dyn Storage>);
    for i in 0..2 * SCAN_PAGE_KEYS {
        store(&node, "small", &format!("k{i}"), vec![1; 16]);
    }
    let outputs = node.handle(1, Input::Timer(Timer::Gossip));
    let sends = handoff_sends(&outputs);
    assert!(!sends.is_empty() && sends.len() <= HANDOFF_BATCHES_IN_FLIGHT);
    for (i, (request, _, _)) in sends.iter().enumerate() {
        let body = if i == 0 {
            PeerMessage::Error("refused".into())
        } else {
            PeerMessage::Ack
        };
        let message = Message::Response { id: *request, body };
        let outputs = node.handle(
            1,
            Input::Message {
                from: id("d"),
                message,
            },
        );
        assert!(
            handoff_sends(&outputs).is_empty(),
            "nothing more this round"
        );
    }
    assert!(!node.cluster().handoff_done(&id("a")));
    let outputs = node.handle(2, Input::Timer(Timer::Gossip));
    let again = handoff_sends(&outputs);
    assert!(!again.is_empty());
    assert_eq!(again[0].2[0].key, sends[0].2[0].key, "from the start again");
}

/// Drift 5: the claimant plans after its round's gossip exchange, as the server does, so a
/// join it learns in that exchange is planned in the same round (before: it planned first,
/// on the state of the round before, and the join waited a round).
#[test]
fn the_claimant_plans_on_the_state_its_gossip_exchange_just_merged() {
    let cluster = settled_cluster(&["a", "b"], 16);
    assert_eq!(cluster.claimant(), Some(&id("a")));
    let mut net = Net::new(&cluster);
    let b = net.index(&id("b"));
    net.nodes[b]
        .cluster
        .add_joining(crate::test_support::member("d", MemberStatus::Joining))
        .unwrap();
    let a = net.index(&id("a"));
    net.run(a, Input::Timer(Timer::Gossip));
    let ring = &net.nodes[a].cluster().ring;
    let next = ring.next.as_ref().expect("the join is planned this round");
    assert!(next.nodes().iter().any(|n| n.id == id("d")));
}

/// Attacker: clock offsets for thousands of names that are no members (a peer cycling names
/// at hello) are bounded, and do not keep a member's offset out: a forward from that member,
/// whose clock is 10 s behind, is still judged on the converted clock.
#[test]
fn strangers_clock_offsets_are_bounded_and_do_not_crowd_out_a_member() {
    let mut net = Net::new(&cluster_with_single_replica_bucket());
    let key = "late";
    let primary = net.index(&net.nodes[0].primaries("single", key)[0]);
    let from = net.nodes[(primary + 1) % 3].id().clone();
    let now = 100_000;
    net.now = now;
    for i in 0..3 * membership::MAX_MEMBERS {
        let stranger = Input::Hello {
            peer: id(&format!("ghost-{i}")),
            offset_ms: i64::MAX,
            key: None,
        };
        net.nodes[primary].handle(now, stranger);
    }
    assert!(net.nodes[primary].hellos.len() <= membership::MAX_MEMBERS);
    let clock = Input::Hello {
        peer: from.clone(),
        offset_ms: -10_000,
        key: None,
    };
    net.nodes[primary].handle(now, clock);
    assert_eq!(
        net.nodes[primary].hellos.get(&from).map(|h| h.offset_ms),
        Some(-10_000)
    );
    assert!(net.nodes[primary].hellos.len() <= membership::MAX_MEMBERS);
    let message = Message::Request {
        id: 2,
        body: PeerMessage::CoordinatePut {
            bucket: "single".into(),
            key: key.into(),
            context: None,
            content: Box::new(PutOp::new("single", key, None, Some(b"v".to_vec())).content),
            w: None,
            pw: None,
            dw_given: false,
            precondition: WirePrecondition::None,
            now_ms: now - 10_000,
            ring_version: 0,
        },
    };
    net.run(primary, Input::Message { from, message });
    assert!(net.nodes[primary].object("single", key).unwrap().is_some());
}

/// A node over a replica shared with a data plane (`Node::over`) runs its control plane over
/// what the data plane wrote: a hint the data plane kept for b is delivered by the node's
/// hint round, and the data plane's count of it reaches the node's stats.
#[test]
fn a_node_over_a_shared_replica_delivers_the_data_planes_hints() {
    let cluster = cluster_of_three();
    let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
    let parts = NodeParts::open(storage, ActorId(7), &cluster.ring.current).unwrap();
    let data_plane = Arc::clone(&parts.replica);
    let config = NodeConfig {
        timings: Timings::SIMULATION,
        ..NodeConfig::default()
    };
    let (mut node, _) = Node::over(id("a"), cluster, config, parts, SeededRng::new(1), 0).unwrap();
    assert_eq!(node.actor(), ActorId(7), "the replica's actor");
    let object = crate::test_support::version(b"v", 9);
    let kept = data_plane
        .store_hint("b", "x", "k", &object, 10, StoreDurability::Buffered)
        .unwrap();
    assert!(kept);
    node.handle(1, Input::Observed(Observation::Hint { kept }));
    assert_eq!(node.stats().hints_stored, 1);
    // b was heard from: its hints go out with the next round.
    node.handle(2, Input::Observed(Observation::Contact(id("b"))));
    let outputs = node.handle(3, Input::Timer(Timer::Hints));
    let delivered = outputs.iter().any(|o| {
        matches!(o, Output::Send { to, message: Message::Request { body: PeerMessage::Handoff { entries, .. }, .. } }
            if *to == id("b") && entries.iter().any(|e| e.key == "k"))
    });
    assert!(delivered, "{outputs:?}");
}

/// What the data plane saw reaches the control plane: a contact revives a peer in the failure
/// detector, a peer's newer state (a `StaleRing` refusal) is merged (and persisted), and a
/// write stored for a key this node does not replicate asks for another cleanup.
#[test]
fn the_data_planes_observations_reach_the_control_plane() {
    let mut net = Net::new(&cluster_of_three());
    let late = net.nodes[0].config.timings.heartbeat_timeout_ms * 3;
    assert!(
        !net.nodes[0].is_up(late, &id("b")),
        "b was never heard from since"
    );
    net.nodes[0].handle(late, Input::Observed(Observation::Contact(id("b"))));
    assert!(net.nodes[0].is_up(late, &id("b")));

    let mut newer = net.nodes[1].cluster().clone();
    let props = BucketProps {
        n_val: 2,
        ..BucketProps::default()
    };
    crate::bucket::set_props(&mut newer, "two", Some(&props), &id("b"), 5).unwrap();
    let outputs = net.nodes[0].handle(
        late,
        Input::Observed(Observation::PeerState(Box::new(newer))),
    );
    assert_eq!(net.nodes[0].props("two").n_val, 2);
    assert!(
        outputs.iter().any(|o| matches!(o, Output::Persist { .. })),
        "{outputs:?}"
    );

    // A key of bucket "one" (n_val 1) that a does not replicate, stored here by a peer.
    let one = BucketProps {
        n_val: 1,
        ..BucketProps::default()
    };
    net.ask(
        0,
        1,
        ClientOp::SetBucketProps {
            bucket: "one".into(),
            props: Some(one),
        },
    );
    let state = net.nodes[0].cluster().clone();
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let partition = state.ring.current.partition_of(b"one", k.as_bytes());
            !state.preference_list(partition, 1).contains(&id("a"))
        })
        .unwrap();
    while !net.nodes[0].cleaned_up() {
        net.run(0, Input::Timer(Timer::Gossip));
        net.run(0, Input::Timer(Timer::Paging));
    }
    net.nodes[0].handle(
        late,
        Input::Observed(Observation::Stored {
            bucket: "one".into(),
            key,
        }),
    );
    assert!(!net.nodes[0].cleaned_up(), "another cleanup is due");
}

/// A security change applies all or nothing, answers the error's status when refused (404:
/// a grant to a user that does not exist, as the server's admin API answers), and is
/// persisted before its answer when it changed the state.
#[test]
fn security_changes_apply_all_or_nothing_and_are_persisted() {
    use crate::security::{Permission, Scope, SecurityChange};
    let mut net = Net::new(&cluster_of_three());
    let grant = ClientOp::Security(SecurityChange::Grants {
        users: vec!["ann".into()],
        scope: Scope::Any,
        permissions: [Permission::Get].into_iter().collect(),
        add: true,
    });
    net.ask(0, 1, grant.clone());
    refused(&net.replies[&1], 404, "ann");
    assert!(net.nodes[0].cluster().security.user("ann").is_none());
    let persists = net.persists;
    let user = ClientOp::Security(SecurityChange::PutUser {
        name: "ann".into(),
        password_hash: None,
    });
    net.ask(0, 2, user);
    assert!(matches!(net.replies[&2], ClientResult::Done));
    assert!(net.nodes[0].cluster().security.user("ann").is_some());
    assert_eq!(net.persists, persists + 1);
    net.ask(0, 3, grant);
    assert!(matches!(net.replies[&3], ClientResult::Done));
    let stored = membership::load_persisted(net.disks[0].as_ref())
        .unwrap()
        .unwrap();
    assert!(stored.security.user("ann").is_some());
}

/// A join request is admitted only for the member entry of the key the sender proved in its
/// hello (the server's rule, now `Node`'s): a sender whose entry names another key, or that
/// asks for another node, is refused; the key it holds is admitted.
#[test]
fn a_join_request_is_admitted_only_for_the_key_the_sender_proved() {
    let mut net = Net::new(&cluster_of_three());
    let key = [7u8; 32];
    net.nodes[0].handle(
        1,
        Input::Hello {
            peer: id("d"),
            offset_ms: 0,
            key: Some(key),
        },
    );
    let ask = |node: &mut Node, member_key: [u8; 32], id_asked: &str, request: RequestId| {
        let mut member = member_entry(&crate::test_support::id(id_asked));
        member.public_key = Some(member_key);
        let body = PeerMessage::JoinRequest {
            cluster_name: node.cluster().cluster_name.clone(),
            member,
        };
        let message = Message::Request { id: request, body };
        node.handle(
            2,
            Input::Message {
                from: id("d"),
                message,
            },
        )
        .into_iter()
        .find_map(|o| match o {
            Output::Send {
                message: Message::Response { body, .. },
                ..
            } => Some(body),
            _ => None,
        })
        .unwrap()
    };
    let other_key = ask(&mut net.nodes[0], [8u8; 32], "d", 1);
    assert!(matches!(other_key, PeerMessage::Error(_)), "{other_key:?}");
    let other_node = ask(&mut net.nodes[0], key, "e", 2);
    assert!(
        matches!(other_node, PeerMessage::Error(_)),
        "{other_node:?}"
    );
    assert!(net.nodes[0].cluster().member(&id("d")).is_none());
    let admitted = ask(&mut net.nodes[0], key, "d", 3);
    assert!(
        matches!(admitted, PeerMessage::JoinAccepted { .. }),
        "{admitted:?}"
    );
    assert!(net.nodes[0].cluster().member(&id("d")).is_some());
}

/// A node whose driver flushes (the server's flusher) sets no flush timer, so it asks for no
/// sync of its own every flush interval (the server measured those extra group commits on
/// fsync workloads); one without (the simulator) does. A sync something waits for (here the
/// first cleanup pass's record) is asked for either way.
#[test]
fn a_node_whose_driver_flushes_sets_no_flush_timer() {
    let cluster = settled_cluster(&["a", "b"], 8);
    let run = |driver_flushes: bool| {
        let config = NodeConfig {
            driver_flushes,
            ..NodeConfig::default()
        };
        let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
        let (mut node, first) = Node::new(
            id("a"),
            ActorId(1),
            cluster.clone(),
            config,
            storage,
            SeededRng::new(1),
            0,
        )
        .unwrap();
        let timers = first
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::SetTimer {
                        timer: Timer::Flush,
                        ..
                    }
                )
            })
            .count();
        let later = node.handle(1000, Input::Timer(Timer::Gossip));
        let syncs = later
            .iter()
            .filter(|o| matches!(o, Output::Sync { .. }))
            .count();
        (timers, syncs)
    };
    let (driver, own) = (run(true), run(false));
    assert_eq!((driver.0, own.0), (0, 1));
    assert_eq!(driver.1, own.1);
}

/// A round of expired keys whose reads and tombstones all complete locally (one node, a
/// buffered `n_val` 1 bucket: every step answers inside the call that started it) does not
/// recurse once per key: past `MAX_EXPIRY_DEPTH` the round's next steps wait for a
/// `Timer::ExpiryResume`, and every key is still removed. Without the limit, a thousand such
/// keys overflow the stack.
#[test]
fn a_round_of_local_expiries_does_not_recurse_per_key() {
    const KEYS: usize = 1000;
    let mut cluster = settled_cluster(&["a"], 16);
    cluster.bucket_props.insert(
        "cache".into(),
        BucketPropsEntry {
            timestamp_ms: 1,
            node: id("a"),
            props_json: Some(r#"{"n_val":1,"durability":"buffered","ttl_secs":1}"#.into()),
        },
    );
    let mut net = Net::new(&cluster);
    for i in 0..KEYS {
        net.put(0, i as u64, "cache", &format!("k{i}"), b"v");
    }
    assert!(
        (0..KEYS as u64).all(|i| matches!(net.replies.get(&i), Some(ClientResult::Put(_)))),
        "every put acknowledged"
    );
    net.now += 2_000;
    // Run in a thread with a small stack, as a node's driver thread might have.
    let removed = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || {
            net.run(0, Input::Timer(Timer::Expiry));
            for _ in 0..KEYS {
                if net.nodes[0].stats().expired_removed as usize == KEYS {
                    break;
                }
                net.run(0, Input::Timer(Timer::ExpiryResume));
            }
            let tombstoned = (0..KEYS)
                .filter(|i| {
                    net.nodes[0]
                        .object("cache", &format!("k{i}"))
                        .unwrap()
                        .is_some_and(|o| o.is_deleted())
                })
                .count();
            (net.nodes[0].stats().expired_removed, tombstoned)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(removed, (KEYS as u64, KEYS));
}
