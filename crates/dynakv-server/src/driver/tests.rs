//! Tests of the driver: drivers of core's `Node` over memory, wired to each other's inboxes.
use super::*;
use dynakv_core::bucket::BucketProps;
use dynakv_core::membership::MemberStatus;
use dynakv_core::node::{NodeConfig, PutOp, Timings};
use dynakv_core::rng::SeededRng;
use dynakv_core::version::ActorId;
use dynakv_storage::MemoryStorage;
use parking_lot::Mutex;

/// Drivers reaching each other's inboxes in memory; a sync is immediate. A stalled node
/// takes requests and never answers (a socket that stopped reading); failing syncs fail.
#[derive(Default)]
struct Wires {
    inboxes: Mutex<HashMap<NodeId, DriverInbox>>,
    stalled: Mutex<BTreeSet<NodeId>>,
    failing_syncs: std::sync::atomic::AtomicBool,
}

struct Env {
    me: NodeId,
    wires: Arc<Wires>,
}

impl Environment for Env {
    fn send(&self, to: &NodeId, body: PeerMessage, done: Respond<SendOutcome>) {
        if self.wires.stalled.lock().contains(to) {
            drop(done); // never answered
            return;
        }
        let inbox = self.wires.inboxes.lock().get(to).cloned();
        let Some(inbox) = inbox else {
            done(SendOutcome::NotSent);
            return;
        };
        let (tx, rx) = mpsc::channel();
        let submitted = inbox.submit(DriverInput::Peer {
            from: self.me.clone(),
            message: body,
            reply: Box::new(move |reply| {
                let _ = tx.send(reply);
            }),
        });
        if submitted.is_err() {
            done(SendOutcome::NotSent);
            return;
        }
        // Wait for the answer off the sender's thread (a driver must not wait on another).
        std::thread::spawn(move || {
            done(match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(reply) => SendOutcome::Answered(Box::new(reply)),
                Err(_) => SendOutcome::Lost,
            });
        });
    }

    fn sync(&self, done: Respond<Result<(), String>>) {
        if self.wires.failing_syncs.load(Ordering::Acquire) {
            done(Err("injected sync failure".into()));
        } else {
            done(Ok(()));
        }
    }

    fn wall_ms(&self) -> u64 {
        crate::clock::WallClock::default().now_ms()
    }
}

fn config() -> NodeConfig {
    NodeConfig {
        timings: Timings {
            request_ms: 500,
            forward_ms: 2500,
            gossip_interval_ms: 50,
            heartbeat_timeout_ms: 2000,
            hint_interval_ms: 100,
            aae_interval_ms: 300,
            flush_interval_ms: 50,
            expiry_interval_ms: 300,
        },
        ..NodeConfig::default()
    }
}

fn start(wires: &Arc<Wires>, name: &str, via: Option<&str>) -> Driver {
    start_writing_to(wires, name, via, None)
}

/// `start`, the driver writing the cluster state to `persist_to` when given.
fn start_writing_to(
    wires: &Arc<Wires>,
    name: &str,
    via: Option<&str>,
    persist_to: Option<Arc<dyn Storage>>,
) -> Driver {
    let me = NodeId(name.into());
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let actor = ActorId(name.bytes().map(u64::from).sum());
    let rng = SeededRng::new(actor.0);
    let (node, first) = match via {
        None => {
            let founder = dynakv_core::node::member_entry(&me);
            let state = ClusterState::found("test", founder, 16).unwrap();
            Node::new(
                me.clone(),
                actor,
                state,
                config(),
                Arc::clone(&storage),
                rng,
                0,
            )
        }
        Some(via) => Node::joining(
            me.clone(),
            actor,
            "test",
            16,
            vec![NodeId(via.into())],
            config(),
            Arc::clone(&storage),
            rng,
            0,
        ),
    }
    .unwrap();
    let env = Arc::new(Env {
        me: me.clone(),
        wires: Arc::clone(wires),
    });
    let driver = Driver::start(node, first, persist_to.unwrap_or(storage), env).unwrap();
    wires.inboxes.lock().insert(me, driver.inbox());
    driver
}

/// Wait until `check` holds for every driver's published view (10 s at most).
fn eventually(drivers: &[&Driver], what: &str, check: impl Fn(&Published) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !drivers.iter().all(|d| check(&d.published())) {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn admin(driver: &Driver, op: ClientOp) -> ClientResult {
    let (tx, rx) = mpsc::channel();
    driver
        .inbox()
        .submit(DriverInput::Admin {
            op,
            reply: Box::new(move |result| {
                let _ = tx.send(result);
            }),
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

/// Durable writes of `n` keys to bucket "two" (two replicas: each replica's acknowledgement
/// waits for its sync) through `writer`, then `leaver` leaves (its handoff has keys to hand
/// over), and once `stayers` see it gone, every key reads back through `reader`.
fn write_leave_read(
    (writer, leaver, reader): (&Driver, &Driver, &Driver),
    stayers: &[&Driver],
    n: usize,
) {
    for i in 0..n {
        let op = ClientOp::Put(PutOp::new("two", &format!("k{i}"), None, Some(vec![1; 10])));
        let put = admin(writer, op);
        assert!(matches!(put, ClientResult::Put(_)), "{put:?}");
    }
    assert!(matches!(admin(leaver, ClientOp::Leave), ClientResult::Done));
    eventually(stayers, "the leaver has left", |p| {
        p.state
            .member(leaver.id())
            .is_some_and(|m| m.status == MemberStatus::Exiting)
            && p.state.ring.current.nodes().len() == 2
    });
    for i in 0..n {
        let get = ClientOp::Get {
            bucket: "two".into(),
            key: format!("k{i}"),
            r: None,
            pr: None,
        };
        match admin(reader, get) {
            ClientResult::Got(object) => assert_eq!(object.siblings().len(), 1, "k{i}"),
            other => panic!("k{i}: {other:?}"),
        }
    }
}

/// Three drivers of core's `Node`, over memory: two nodes join the first, the ring
/// settles with all three, a bucket property set at one reaches the others by gossip,
/// and a leave completes (the leaver's handoff, the claimant's plan, its exit), all by
/// the driver's timers, sends, replies and writes of the cluster state.
#[test]
fn drivers_of_nodes_join_gossip_and_leave() {
    let wires = Arc::new(Wires::default());
    let a = start(&wires, "a", None);
    let b = start(&wires, "b", Some("a"));
    let c = start(&wires, "c", Some("a"));
    let all = [&a, &b, &c];
    eventually(&all, "a settled ring of three", |p| {
        p.state.ring.next.is_none()
            && p.state.ring.current.nodes().len() == 3
            && p.state
                .members
                .values()
                .all(|m| m.status == MemberStatus::Valid)
    });
    eventually(&all, "everyone up", |p| p.up.len() == 3);

    let props = BucketProps {
        n_val: 2,
        ..BucketProps::default()
    };
    let op = ClientOp::SetBucketProps {
        bucket: "two".into(),
        props: Some(props),
    };
    assert!(matches!(admin(&b, op), ClientResult::Done));
    eventually(&all, "the bucket's properties everywhere", |p| {
        p.state.bucket_props.contains_key("two")
    });

    eventually(&all, "anti-entropy exchanges published", |p| {
        p.stats.aae_exchanges > 0 && !p.aae_records.is_empty()
    });
    write_leave_read((&a, &c, &b), &[&a, &b], 50);
    assert!(
        c.published().stats.handoff_keys > 0,
        "c handed its keys over"
    );
    a.stop();
    b.stop();
    c.stop();
}

/// Three joined drivers, each up in the others' view.
fn three(wires: &Arc<Wires>) -> [Driver; 3] {
    let a = start(wires, "a", None);
    let b = start(wires, "b", Some("a"));
    let c = start(wires, "c", Some("a"));
    eventually(&[&a, &b, &c], "a settled ring of three, all up", |p| {
        p.state.ring.next.is_none() && p.state.ring.current.nodes().len() == 3 && p.up.len() == 3
    });
    [a, b, c]
}

/// A peer that takes requests and never answers (a stalled socket) does not stall the
/// others' drivers: its requests fail by the node's own timers, it is judged down, and
/// the others go on answering and gossiping.
#[test]
fn a_stalled_peer_is_judged_down_and_stalls_nobody() {
    let wires = Arc::new(Wires::default());
    let [a, b, c] = three(&wires);
    wires.stalled.lock().insert(NodeId("c".into()));
    c.stop();
    eventually(&[&a, &b], "c judged down", |p| {
        !p.up.contains(&NodeId("c".into()))
    });
    let op = ClientOp::SetBucketProps {
        bucket: "late".into(),
        props: Some(BucketProps::default()),
    };
    assert!(matches!(admin(&a, op), ClientResult::Done));
    eventually(&[&b], "gossip goes on", |p| {
        p.state.bucket_props.contains_key("late")
    });
}

/// A failed sync stops the node: the write waiting for it is answered with a failure,
/// the stop is published, and every later request is refused at once.
#[test]
fn a_failed_sync_stops_the_node_and_answers_what_waits() {
    let wires = Arc::new(Wires::default());
    let [a, _b, _c] = three(&wires);
    wires.failing_syncs.store(true, Ordering::Release);
    let put = ClientOp::Put(PutOp::new("b", "k", None, Some(vec![1])));
    match admin(&a, put) {
        ClientResult::Failed {
            status: 503,
            message,
        } => {
            assert!(message.contains("stopped"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(a.published().stopped.is_some());
    let again = admin(&a, ClientOp::Leave);
    assert!(
        matches!(&again, ClientResult::Failed { status: 503, .. }),
        "{again:?}"
    );
}

/// A cluster state that cannot be written (a full or failing disk) turns the answer to
/// the change that made it into a failure: an administrative change is acknowledged only
/// once it is on disk.
#[test]
fn a_change_whose_state_is_not_written_is_not_acknowledged() {
    let wires = Arc::new(Wires::default());
    let disk = dynakv_storage::FaultyStorage::new(MemoryStorage::new());
    let switch = disk.switch();
    let a = start_writing_to(&wires, "a", None, Some(Arc::new(disk)));
    switch.set(dynakv_storage::FaultPoint::Put, true);
    let op = ClientOp::SetBucketProps {
        bucket: "p".into(),
        props: Some(BucketProps::default()),
    };
    match admin(&a, op) {
        ClientResult::Failed {
            status: 500,
            message,
        } => {
            assert!(message.contains("not written"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    switch.heal();
    let op = ClientOp::SetBucketProps {
        bucket: "q".into(),
        props: Some(BucketProps::default()),
    };
    assert!(matches!(admin(&a, op), ClientResult::Done));
}

/// Past `DRIVER_INBOX` waiting inputs from outside, a submission is refused; the
/// driver's own (a send's outcome) are never refused.
#[test]
fn the_inbox_is_bounded_for_outside_inputs() {
    let (tx, _rx) = mpsc::channel();
    let inbox = DriverInbox {
        tx,
        queued: Arc::new(AtomicUsize::new(0)),
    };
    for _ in 0..DRIVER_INBOX {
        inbox
            .submit(DriverInput::Budget(1))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(inbox.submit(DriverInput::Budget(1)), Err(SubmitError::Busy));
    let sent = DriverInput::Sent {
        to: NodeId("x".into()),
        id: 1,
        outcome: SendOutcome::Lost,
    };
    assert!(inbox.submit(sent).is_ok());
}

/// Three drivers over the real peer transport on 127.0.0.1 (the server's `TransportEnv`,
/// each node's transport server handing every request to its driver): two join the first
/// knowing only its address (`TransportEnv::seed_name`), the ring settles, durable writes are stored at their replicas, and a
/// leave hands keys over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_over_the_peer_transport_join_write_and_leave() {
    use crate::link::LinkKeys;
    use crate::secrets::{ClusterSecret, NodeKey};
    use crate::transport::{PeerClient, PeerInfo, TransportConfig, serve};
    use dynakv_core::node::NodeParts;

    let secret = ClusterSecret::from_bytes([9; 32]);
    let mut drivers = Vec::new();
    let mut stops = Vec::new();
    let mut seed: Option<(NodeId, std::net::SocketAddr)> = None;
    for name in ["a", "b", "c"] {
        let key = NodeKey::generate();
        let keys = LinkKeys::new(&secret, &key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = NodeId(name.into());
        let mut member = dynakv_core::node::member_entry(&me);
        member.peer_addr = addr.to_string();
        member.public_key = Some(*key.public());
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let actor = ActorId(name.bytes().map(u64::from).sum());
        let rng = SeededRng::new(actor.0);
        let parts = |state: &ClusterState| {
            NodeParts::open(Arc::clone(&storage), actor, &state.ring.current).unwrap()
        };
        let env = Arc::new(transport::TransportEnv::new(
            PeerClient::new(TransportConfig::new("test", name, keys.clone())),
            tokio::runtime::Handle::current(),
            Duration::from_secs(5),
            (None, Arc::clone(&storage)),
            crate::clock::WallClock::default(),
        ));
        let (node, first) = match &seed {
            None => {
                let state = ClusterState::found("test", member, 16).unwrap();
                let parts = parts(&state);
                Node::over(me.clone(), state, config(), parts, rng, 0).unwrap()
            }
            Some((_, seed_addr)) => {
                // Known by its address only, as `--join ADDR` knows it.
                let seed_id = transport::TransportEnv::seed_name(*seed_addr);
                env.add_seed(seed_id.clone(), *seed_addr).unwrap();
                let founded = ClusterState::found("test", member.clone(), 16).unwrap();
                Node::joining_over(
                    member,
                    ("test", 16),
                    vec![seed_id.clone()],
                    config(),
                    parts(&founded),
                    (rng, 0),
                )
                .unwrap()
            }
        };
        let driver = Driver::start(node, first, Arc::clone(&storage), env).unwrap();
        let inbox = driver.inbox();
        let handler = move |from: PeerInfo, message: PeerMessage| {
            let inbox = inbox.clone();
            async move {
                let peer = NodeId(from.node_name.clone());
                let hello = DriverInput::Hello {
                    peer: peer.clone(),
                    offset_ms: from.clock_offset_ms,
                    key: Some(from.public_key),
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let asked = DriverInput::Peer {
                    from: peer,
                    message,
                    reply: Box::new(move |reply| {
                        let _ = tx.send(reply);
                    }),
                };
                if let Err(e) = inbox.submit(hello).and_then(|()| inbox.submit(asked)) {
                    return PeerMessage::Error(e.to_string());
                }
                rx.await
                    .unwrap_or_else(|_| PeerMessage::Error("no answer".into()))
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = TransportConfig::new("test", name, keys);
        tokio::spawn(serve(listener, config, handler, async {
            let _ = stopped.await;
        }));
        stops.push(stop);
        seed.get_or_insert((me, addr));
        drivers.push(driver);
    }
    let all: Vec<&Driver> = drivers.iter().collect();
    tokio::task::block_in_place(|| {
        eventually(&all, "a settled ring of three, all up", |p| {
            p.state.ring.next.is_none()
                && p.state.ring.current.nodes().len() == 3
                && p.up.len() == 3
        });
        let op = ClientOp::SetBucketProps {
            bucket: "two".into(),
            props: Some(BucketProps {
                n_val: 2,
                ..BucketProps::default()
            }),
        };
        assert!(matches!(admin(&drivers[1], op), ClientResult::Done));
        eventually(&all, "the bucket's properties everywhere", |p| {
            p.state.bucket_props.contains_key("two")
        });
        write_leave_read((&drivers[0], &drivers[2], &drivers[1]), &all[..2], 30);
    });
    for stop in stops {
        let _ = stop.send(());
    }
    for driver in drivers {
        tokio::task::block_in_place(|| driver.stop());
    }
}

/// The data plane reports one contact per peer per interval, and a flood of names (a
/// hostile peer cycling names) keeps the gate bounded.
#[test]
fn contacts_are_thinned_per_peer_and_the_gate_stays_bounded() {
    let gate = ContactGate::default();
    let start = Instant::now();
    let (a, b) = (NodeId("a".into()), NodeId("b".into()));
    assert!(gate.report(&a, start));
    assert!(!gate.report(&a, start + Duration::from_millis(10)));
    assert!(
        gate.report(&b, start + Duration::from_millis(10)),
        "per peer"
    );
    assert!(gate.report(&a, start + CONTACT_REPORT_INTERVAL));
    for i in 0..10 * MAX_CONTACT_PEERS {
        gate.report(&NodeId(format!("ghost-{i}")), start);
    }
    assert!(gate.last.lock().len() <= MAX_CONTACT_PEERS);
}

/// A peer's newer state handed to the driver (a `StaleRing` refusal) is merged and published
/// before the answer, so the refused request re-plans on the newer state.
#[test]
fn a_merged_state_is_published_before_the_answer() {
    let wires = Arc::new(Wires::default());
    let a = start(&wires, "a", None);
    let mut newer = (*a.published().state).clone();
    let props = BucketProps {
        n_val: 1,
        ..BucketProps::default()
    };
    dynakv_core::bucket::set_props(&mut newer, "one", Some(&props), &NodeId("z".into()), 9)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    a.inbox()
        .submit(DriverInput::Merge {
            state: Box::new(newer),
            merged: Box::new(move |state| {
                let _ = tx.send(state);
            }),
        })
        .unwrap();
    let merged = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(merged.bucket_props.contains_key("one"));
    assert!(a.published().state.bucket_props.contains_key("one"));
}
