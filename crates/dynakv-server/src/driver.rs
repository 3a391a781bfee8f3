//! The control plane's driver: one thread that owns core's [`Node`] and carries out what it
//! asks (issue 18's cutover; docs/architecture.md, *One node*). Like quinn's endpoint driver:
//! inputs come in over a channel (a peer's request, an administrative request, the data
//! plane's observations, the outcome of a send or a sync), timers are kept here and fired in
//! order, and after every input the node's view is published for the data plane to read.
//!
//! It runs on its own thread, not on a tokio worker, because `Node::handle` reads a page of
//! storage inline (a handoff or cleanup scan, a hint page), which may wait on the disk.
//!
//! Invariants:
//! - outputs are carried out in the order the node returned them: a `Persist` is written
//!   before the reply that follows it, so an administrative change is answered only once
//!   it is on disk;
//! - every `SetTimer` fires once, in deadline order (as the simulator fires them);
//! - a send that could not leave (`SendOutcome::NotSent`) comes back as `SendFailed`; one
//!   that was lost is left to the node's own request timeout;
//! - the inbox is bounded for what comes from outside (peers, administration, the data
//!   plane): past `DRIVER_INBOX`, a submission is refused rather than queued.

use dynakv_core::membership::{self, ClusterState};
use dynakv_core::message::PeerMessage;
use dynakv_core::node::{
    ClientOp, ClientRequestId, ClientResult, Input, Message, Node, NodeStats, Observation, Output,
    RequestId, Time, Timer,
};
use dynakv_core::ring::NodeId;
use dynakv_core::storage::Storage;
use parking_lot::RwLock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most inputs from outside (peers, administration, observations) waiting in the inbox.
pub const DRIVER_INBOX: usize = 4096;
/// Longest the driver sleeps without an input or a timer (it then re-publishes liveness).
const IDLE_WAKE: Duration = Duration::from_millis(500);

/// What became of a request the driver sent for its node.
#[derive(Debug, Clone)]
pub enum SendOutcome {
    /// The peer answered.
    Answered(Box<PeerMessage>),
    /// It was never sent (the peer is unreachable, or in backoff): fail it now.
    NotSent,
    /// Sent, and no answer came (timeout, connection lost): the node's timer fails it.
    Lost,
}

/// A reply to hand back, called once.
pub type Respond<T> = Box<dyn FnOnce(T) + Send>;

/// The world a driver runs in: how it reaches peers, makes writes durable and reads the wall
/// clock. The server's is its transport, flusher and clock; a test's is in memory.
pub trait Environment: Send + Sync + 'static {
    /// Send `body` to `to` and call `done` with what became of it (from any thread).
    fn send(&self, to: &NodeId, body: PeerMessage, done: Respond<SendOutcome>);
    /// Make every write made so far durable, then call `done` (from any thread).
    fn sync(&self, done: Respond<Result<(), String>>);
    /// The wall clock, ms since the Unix epoch.
    fn wall_ms(&self) -> u64;
}

/// An input for the driver.
pub enum DriverInput {
    /// A peer's request to the node (gossip, a join), answered through `reply`.
    Peer {
        from: NodeId,
        message: PeerMessage,
        reply: Respond<PeerMessage>,
    },
    /// An administrative request (bucket properties, leave, security), answered through
    /// `reply` once carried out (and, when it changed the cluster state, written).
    Admin {
        op: ClientOp,
        reply: Respond<ClientResult>,
    },
    /// What the data plane saw.
    Observed(Observation),
    /// What the transport's hello with a peer established (its clock offset, its key).
    Hello {
        peer: NodeId,
        offset_ms: i64,
        key: Option<[u8; 32]>,
    },
    /// The admission budget of background work.
    Budget(usize),
    // ---- the driver's own ----
    Sent {
        to: NodeId,
        id: RequestId,
        outcome: SendOutcome,
    },
    Synced {
        through: u64,
        outcome: Result<(), String>,
    },
    /// End the driver's loop.
    Stop,
}

impl std::fmt::Debug for DriverInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriverInput::Peer { from, message, .. } => f
                .debug_struct("Peer")
                .field("from", from)
                .field("message", &message.name())
                .finish_non_exhaustive(),
            DriverInput::Admin { op, .. } => f
                .debug_struct("Admin")
                .field("op", op)
                .finish_non_exhaustive(),
            DriverInput::Observed(observation) => {
                f.debug_tuple("Observed").field(observation).finish()
            }
            DriverInput::Hello {
                peer, offset_ms, ..
            } => f
                .debug_struct("Hello")
                .field("peer", peer)
                .field("offset_ms", offset_ms)
                .finish_non_exhaustive(),
            DriverInput::Budget(budget) => f.debug_tuple("Budget").field(budget).finish(),
            DriverInput::Sent { to, id, outcome } => f
                .debug_struct("Sent")
                .field("to", to)
                .field("id", id)
                .field("outcome", outcome)
                .finish(),
            DriverInput::Synced { through, outcome } => f
                .debug_struct("Synced")
                .field("through", through)
                .field("outcome", outcome)
                .finish(),
            DriverInput::Stop => f.write_str("Stop"),
        }
    }
}

impl DriverInput {
    /// Whether it comes from outside (bounded by `DRIVER_INBOX`).
    fn external(&self) -> bool {
        !matches!(
            self,
            DriverInput::Sent { .. } | DriverInput::Synced { .. } | DriverInput::Stop
        )
    }
}

/// The node's view as the driver last published it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The cluster state, as last written (a change of heartbeats alone is not published).
    pub state: Arc<ClusterState>,
    /// The members the node's failure detector believes up (itself included).
    pub up: BTreeSet<NodeId>,
    pub stats: NodeStats,
    /// Why the node stopped (a storage failure), if it did.
    pub stopped: Option<String>,
}

/// Why the driver did not take an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the node's control plane is busy ({DRIVER_INBOX} inputs waiting)")]
    Busy,
    #[error("the node's control plane has stopped")]
    Stopped,
}

/// A handle to submit inputs to a driver (cheap to clone).
#[derive(Debug, Clone)]
pub struct DriverInbox {
    tx: mpsc::Sender<DriverInput>,
    queued: Arc<AtomicUsize>,
}

impl DriverInbox {
    /// Submit `input`; refused when `DRIVER_INBOX` inputs from outside are waiting.
    ///
    /// # Errors
    /// `Busy` or `Stopped`.
    pub fn submit(&self, input: DriverInput) -> Result<(), SubmitError> {
        let external = input.external();
        if external {
            let queued = self.queued.fetch_add(1, Ordering::AcqRel);
            if queued >= DRIVER_INBOX {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(SubmitError::Busy);
            }
        }
        self.tx.send(input).map_err(|_| {
            if external {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            SubmitError::Stopped
        })
    }
}

/// A running driver: its thread, its inbox and what it publishes.
pub struct Driver {
    inbox: DriverInbox,
    published: Arc<RwLock<Arc<Published>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("published", &self.published())
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Start driving `node` (with `first`, the outputs its constructor returned), writing its
    /// cluster state to `storage`, in `env`. The node's monotonic clock is the driver's: ms
    /// since this call, so `node` must have been built at time 0.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        node: Node,
        first: Vec<Output>,
        storage: Arc<dyn Storage>,
        env: Arc<dyn Environment>,
    ) -> std::io::Result<Driver> {
        let (tx, rx) = mpsc::channel();
        let inbox = DriverInbox {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        let published = Arc::new(RwLock::new(Arc::new(Published {
            state: Arc::new(node.cluster().clone()),
            up: BTreeSet::new(),
            stats: node.stats(),
            stopped: None,
        })));
        let mut run = Run {
            node,
            storage,
            env,
            inbox: inbox.clone(),
            published: Arc::clone(&published),
            started: Instant::now(),
            timers: BTreeMap::new(),
            next_timer: 0,
            inbound: HashMap::new(),
            next_inbound: 0,
            admin: HashMap::new(),
            next_admin: 0,
            stopped: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("dynakv-node-{}", run.node.id()))
            .spawn(move || {
                run.carry_out(first);
                run.publish(run.now());
                run.run(&rx);
            })?;
        Ok(Driver {
            inbox,
            published,
            thread: Some(thread),
        })
    }

    pub fn inbox(&self) -> DriverInbox {
        self.inbox.clone()
    }

    /// The node's view as last published.
    pub fn published(&self) -> Arc<Published> {
        Arc::clone(&self.published.read())
    }

    /// Stop the driver and wait for its thread (what is still in the inbox after the stop
    /// is dropped, its replies unsent).
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.inbox.tx.send(DriverInput::Stop);
            let _ = thread.join();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The driver thread's state.
struct Run {
    node: Node,
    storage: Arc<dyn Storage>,
    env: Arc<dyn Environment>,
    inbox: DriverInbox,
    published: Arc<RwLock<Arc<Published>>>,
    started: Instant,
    /// Timers by (deadline, order set), each fired once.
    timers: BTreeMap<(u64, u64), Timer>,
    next_timer: u64,
    /// Peers' requests awaiting the node's response, by the id given to the node.
    inbound: HashMap<RequestId, Respond<PeerMessage>>,
    next_inbound: RequestId,
    /// Administrative requests awaiting the node's reply.
    admin: HashMap<ClientRequestId, Respond<ClientResult>>,
    next_admin: ClientRequestId,
    stopped: Option<String>,
}

impl Run {
    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn run(&mut self, rx: &mpsc::Receiver<DriverInput>) {
        loop {
            let now = self.now();
            while let Some((&(at, seq), _)) = self.timers.first_key_value() {
                if at > now {
                    break;
                }
                if let Some(timer) = self.timers.remove(&(at, seq)) {
                    self.handle(Input::Timer(timer));
                }
            }
            let wait = self
                .timers
                .first_key_value()
                .map_or(IDLE_WAKE, |(&(at, _), _)| {
                    Duration::from_millis(at.saturating_sub(self.now())).min(IDLE_WAKE)
                });
            match rx.recv_timeout(wait) {
                Ok(DriverInput::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(input) => {
                    if input.external() {
                        self.inbox.queued.fetch_sub(1, Ordering::AcqRel);
                    }
                    self.take(input);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.publish(self.now()),
            }
        }
    }

    fn take(&mut self, input: DriverInput) {
        let input = match input {
            DriverInput::Peer {
                from,
                message,
                reply,
            } => {
                if let Some(error) = &self.stopped {
                    reply(PeerMessage::Error(format!("the node stopped: {error}")));
                    return;
                }
                if self.inbound.len() >= DRIVER_INBOX {
                    reply(PeerMessage::Error(SubmitError::Busy.to_string()));
                    return;
                }
                // Answered when the node sends its response: at once, or once a sync the
                // answer waits for completed (a durable replica write, a handoff batch).
                let id = self.next_inbound;
                self.next_inbound = self.next_inbound.wrapping_add(1);
                self.inbound.insert(id, reply);
                Input::Message {
                    from,
                    message: Message::Request { id, body: message },
                }
            }
            DriverInput::Admin { op, reply } => {
                if let Some(error) = &self.stopped {
                    reply(ClientResult::Failed {
                        status: 503,
                        message: format!("the node stopped: {error}"),
                    });
                    return;
                }
                let id = self.next_admin;
                self.next_admin = self.next_admin.wrapping_add(1);
                self.admin.insert(id, reply);
                Input::Client { id, op }
            }
            DriverInput::Observed(observation) => Input::Observed(observation),
            DriverInput::Hello {
                peer,
                offset_ms,
                key,
            } => Input::Hello {
                peer,
                offset_ms,
                key,
            },
            DriverInput::Budget(budget) => {
                self.node.set_aae_budget(budget);
                return;
            }
            DriverInput::Sent { to, id, outcome } => match outcome {
                SendOutcome::Answered(body) => Input::Message {
                    from: to,
                    message: Message::Response { id, body: *body },
                },
                SendOutcome::NotSent => Input::SendFailed { to, id },
                SendOutcome::Lost => return,
            },
            DriverInput::Synced { through, outcome } => match outcome {
                Ok(()) => Input::Synced { through },
                Err(error) => Input::SyncFailed { error },
            },
            DriverInput::Stop => return,
        };
        self.handle(input);
    }

    fn handle(&mut self, input: Input) {
        let time = Time {
            monotonic_ms: self.now(),
            wall_ms: self.env.wall_ms(),
        };
        let outputs = self.node.handle_at(time, input);
        self.carry_out(outputs);
        self.publish(time.monotonic_ms);
    }

    fn carry_out(&mut self, outputs: Vec<Output>) {
        let mut new_state = None;
        // A cluster state that could not be written: the changes answered after it are
        // reported failed (made, and spread by gossip, but not on this node's disk), as the
        // server's `Cluster::persisted` does.
        let mut unwritten: Option<String> = None;
        for output in outputs {
            match output {
                Output::Send {
                    to,
                    message: Message::Request { id, body },
                } => {
                    let inbox = self.inbox.clone();
                    let peer = to.clone();
                    self.env.send(
                        &to,
                        body,
                        Box::new(move |outcome| {
                            let _ = inbox.submit(DriverInput::Sent {
                                to: peer,
                                id,
                                outcome,
                            });
                        }),
                    );
                }
                Output::Send {
                    message: Message::Response { id, body },
                    ..
                } => {
                    if let Some(reply) = self.inbound.remove(&id) {
                        reply(body);
                    }
                }
                Output::Reply { id, result } => {
                    let result = match (&unwritten, result) {
                        (Some(why), ClientResult::Done) => ClientResult::Failed {
                            status: 500,
                            message: format!(
                                "the change was made but the cluster state was not written: {why}"
                            ),
                        },
                        (_, result) => result,
                    };
                    if let Some(reply) = self.admin.remove(&id) {
                        reply(result);
                    }
                }
                Output::SetTimer { at_ms, timer } => {
                    self.timers.insert((at_ms, self.next_timer), timer);
                    self.next_timer = self.next_timer.wrapping_add(1);
                }
                Output::Sync { through } => {
                    let inbox = self.inbox.clone();
                    self.env.sync(Box::new(move |outcome| {
                        let _ = inbox.submit(DriverInput::Synced { through, outcome });
                    }));
                }
                Output::Persist { state } => {
                    // Written before anything that follows it is carried out.
                    if let Err(e) = membership::store_persisted(self.storage.as_ref(), &state) {
                        tracing::error!(error = %e, "cannot write the cluster state");
                        unwritten = Some(e);
                    }
                    new_state = Some(Arc::new(*state));
                }
                Output::Stopped { error } => {
                    tracing::error!(%error, "the node stopped on a storage failure");
                    // The stop is published before anyone is told of it.
                    self.stopped = Some(error.clone());
                    self.publish(self.now());
                    // Nothing it was asked is answered any more.
                    for (_, reply) in self.inbound.drain() {
                        reply(PeerMessage::Error(format!("the node stopped: {error}")));
                    }
                    for (_, reply) in self.admin.drain() {
                        reply(ClientResult::Failed {
                            status: 503,
                            message: format!("the node stopped: {error}"),
                        });
                    }
                }
            }
        }
        if let Some(state) = new_state {
            let mut published = self.published.write();
            let mut next = Published::clone(&published);
            next.state = state;
            *published = Arc::new(next);
        }
    }

    /// Publish liveness, stats and a stop (the state is published when written).
    fn publish(&mut self, now: u64) {
        let mut published = self.published.write();
        let up: BTreeSet<NodeId> = published
            .state
            .members
            .keys()
            .filter(|id| *id == self.node.id() || self.node.is_up(now, id))
            .cloned()
            .collect();
        let stats = self.node.stats();
        if up != published.up || stats != published.stats || self.stopped != published.stopped {
            let mut next = Published::clone(&published);
            next.up = up;
            next.stats = stats;
            next.stopped.clone_from(&self.stopped);
            *published = Arc::new(next);
        }
    }
}

#[cfg(test)]
mod tests {
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

        // Writes (durable: each replica's acknowledgement waits for its sync) before the
        // leave, to a bucket of two replicas so that c's handoff has keys to hand over.
        for i in 0..50 {
            let op = ClientOp::Put(PutOp::new("two", &format!("k{i}"), None, Some(vec![1; 10])));
            let put = admin(&a, op);
            assert!(matches!(put, ClientResult::Put(_)), "{put:?}");
        }
        assert!(matches!(admin(&c, ClientOp::Leave), ClientResult::Done));
        eventually(&[&a, &b], "c has left", |p| {
            p.state
                .member(&NodeId("c".into()))
                .is_some_and(|m| m.status == MemberStatus::Exiting)
                && p.state.ring.current.nodes().len() == 2
        });
        for i in 0..50 {
            let get = ClientOp::Get {
                bucket: "two".into(),
                key: format!("k{i}"),
                r: None,
                pr: None,
            };
            match admin(&b, get) {
                ClientResult::Got(object) => assert_eq!(object.siblings().len(), 1, "k{i}"),
                other => panic!("k{i}: {other:?}"),
            }
        }
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
            p.state.ring.next.is_none()
                && p.state.ring.current.nodes().len() == 3
                && p.up.len() == 3
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
}
