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
//!   and published before the reply that follows it, so an administrative change is
//!   answered only once it is on disk and the data plane reads it;
//! - every `SetTimer` fires once, in deadline order (as the simulator fires them);
//! - a send that could not leave (`SendOutcome::NotSent`) comes back as `SendFailed`; one
//!   that was lost is left to the node's own request timeout;
//! - the inbox is bounded for what comes from outside (peers, administration, the data
//!   plane): past `DRIVER_INBOX`, a submission is refused rather than queued.

use dynakv_core::anti_entropy::AaeRecord;
use dynakv_core::membership::{self, ClusterState};
use dynakv_core::message::PeerMessage;
use dynakv_core::node::{
    ClientOp, ClientRequestId, ClientResult, Input, Message, Node, NodeStats, Observation, Output,
    RequestId, Time, Timer,
};
use dynakv_core::ring::{NodeId, PartitionId};
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
    /// It was never sent because the peer cannot carry it (an older protocol version): fail
    /// it now, the peer is not down.
    Refused,
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
    /// The driver published a new cluster state (at its start, then each time one is
    /// written): an environment that addresses peers by the state's member entries reads
    /// them here.
    fn state_published(&self, _state: &Arc<ClusterState>) {}
    /// The node stopped on a storage failure (`Output::Stopped`): a server stops and is
    /// started again from its disk.
    fn stopped(&self, _error: &str) {}
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
    /// A peer's newer state (a `StaleRing` refusal) to merge; `merged` gets the state as
    /// published after the merge, so that the request that was refused re-plans on it (its
    /// once-only re-plan needs the newer ring, not the one published before).
    Merge {
        state: Box<ClusterState>,
        merged: Respond<Arc<ClusterState>>,
    },
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
            DriverInput::Merge { state, .. } => f
                .debug_struct("Merge")
                .field("ring_version", &state.ring.version)
                .finish_non_exhaustive(),
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
    /// What the last completed anti-entropy exchange of each partition did (for
    /// `admin aae`), republished when an exchange completes.
    pub aae_records: Arc<BTreeMap<PartitionId, AaeRecord>>,
    /// Why the node stopped (a storage failure), if it did.
    pub stopped: Option<String>,
    /// Whether the node is part of its cluster (no join of it in progress): a joining node
    /// serves no peer.
    pub joined: bool,
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

/// How often at most the data plane tells the driver it heard from one peer
/// (`Observation::Contact`): every peer message is a sign of life, but the failure detector
/// needs one per heartbeat timeout, not one per request.
pub const CONTACT_REPORT_INTERVAL: Duration = Duration::from_millis(250);
/// Most peers a [`ContactGate`] remembers (past it, it starts over: at worst a few reports
/// too many).
const MAX_CONTACT_PEERS: usize = 2 * dynakv_core::membership::MAX_MEMBERS;

/// Thins the data plane's signs of life to one report per peer per
/// [`CONTACT_REPORT_INTERVAL`].
#[derive(Debug, Default)]
pub struct ContactGate {
    last: parking_lot::Mutex<HashMap<NodeId, Instant>>,
}

impl ContactGate {
    /// Whether a contact with `peer` at `now` should be reported.
    pub fn report(&self, peer: &NodeId, now: Instant) -> bool {
        let mut last = self.last.lock();
        if let Some(at) = last.get(peer)
            && now.saturating_duration_since(*at) < CONTACT_REPORT_INTERVAL
        {
            return false;
        }
        if last.len() >= MAX_CONTACT_PEERS && !last.contains_key(peer) {
            last.clear();
        }
        last.insert(peer.clone(), now);
        true
    }
}

/// A running driver: its thread, its inbox and what it publishes.
pub struct Driver {
    me: NodeId,
    inbox: DriverInbox,
    published: Arc<RwLock<Arc<Published>>>,
    /// The node's monotonic clock starts here.
    started: Instant,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
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
        let me = node.id().clone();
        let (tx, rx) = mpsc::channel();
        let inbox = DriverInbox {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        let state = Arc::new(node.cluster().clone());
        env.state_published(&state);
        // Liveness as the node sees it now (too early to tell: every member up), not an empty
        // set: the data plane serves requests before the node's thread first publishes, and
        // would otherwise plan them with every peer down (a restarted node failed its first
        // writes with "1 asked").
        let up: BTreeSet<NodeId> = state
            .members
            .keys()
            .filter(|id| *id == node.id() || node.is_up(0, id))
            .cloned()
            .collect();
        let published = Arc::new(RwLock::new(Arc::new(Published {
            state,
            up,
            stats: node.stats(),
            aae_records: Arc::new(node.aae_records().clone()),
            stopped: None,
            joined: node.joined(),
        })));
        let started = Instant::now();
        let mut run = Run {
            node,
            storage,
            env,
            inbox: inbox.clone(),
            published: Arc::clone(&published),
            started,
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
            me,
            inbox,
            published,
            started,
            thread: parking_lot::Mutex::new(Some(thread)),
        })
    }

    /// The node it drives.
    pub fn id(&self) -> &NodeId {
        &self.me
    }

    pub fn inbox(&self) -> DriverInbox {
        self.inbox.clone()
    }

    /// The node's view as last published.
    pub fn published(&self) -> Arc<Published> {
        Arc::clone(&self.published.read())
    }

    /// The node's monotonic clock (ms since the driver started): the clock of its timers,
    /// its failure detector and its anti-entropy records.
    pub fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Stop the driver and wait for its thread (what is still in the inbox after the stop
    /// is dropped, its replies unsent).
    pub fn stop(self) {
        self.shut_down();
    }

    /// [`Driver::stop`] through a shared handle (later calls do nothing).
    pub fn shut_down(&self) {
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
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
            DriverInput::Merge { state, merged } => {
                self.handle(Input::Observed(Observation::PeerState(state)));
                merged(Arc::clone(&self.published.read().state));
                return;
            }
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
                SendOutcome::Refused => Input::SendRefused { to, id },
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
        // A cluster state that could not be written: the changes answered after it are
        // reported failed (made, and spread by gossip, but not on this node's disk).
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
                    // Published before anything that follows it is answered: a change is
                    // visible to the data plane once acknowledged.
                    self.publish_state(Arc::new(*state));
                }
                Output::Stopped { error } => {
                    tracing::error!(%error, "the node stopped on a storage failure");
                    self.env.stopped(&error);
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
    }

    fn publish_state(&self, state: Arc<ClusterState>) {
        self.env.state_published(&state);
        let mut published = self.published.write();
        let mut next = Published::clone(&published);
        next.state = state;
        *published = Arc::new(next);
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
        let joined = self.node.joined();
        if up != published.up
            || stats != published.stats
            || self.stopped != published.stopped
            || joined != published.joined
        {
            let mut next = Published::clone(&published);
            if stats.aae_exchanges != published.stats.aae_exchanges {
                next.aae_records = Arc::new(self.node.aae_records().clone());
            }
            next.up = up;
            next.stats = stats;
            next.stopped.clone_from(&self.stopped);
            next.joined = joined;
            *published = Arc::new(next);
        }
    }
}

pub mod transport;

#[cfg(test)]
mod tests;
