//! `Node`: one dynakv node as a sans-IO state machine, `handle(now, input) -> outputs`.
//!
//! This is DESIGN.md's `Node::handle(now, input) -> outputs`: inputs are client requests,
//! peer messages (requests and replies), transport failures and timers; outputs are messages
//! to send, client replies, timers to set and syncs to perform. Storage is a [`Storage`]
//! handle the node reads and writes in place, always buffered: a write that must be durable
//! asks for a sync ([`Output::Sync`]) and what depends on it (the acknowledgement of a
//! durable replica write or handoff batch, the replication of a durable coordinator write, a
//! cleanup pass's record) waits for [`Input::Synced`], so `handle` never waits on a disk (the
//! server's group commit has the same shape). Two rare writes still fsync in place: the dot
//! counter's durable lease (`Replica`, once per 100,000 dots and at the first write of a run)
//! and a peer's `Reap`. Time enters as `now` (milliseconds), randomness as a [`SeededRng`].
//!
//! What it is built from: the local store is the core's [`Replica`] and [`AaeTrees`]; every
//! replica-side peer request is answered by [`serve`] (the server's peer handler calls it
//! too); messages are [`PeerMessage`]s; client requests are the data plane's machines
//! (`crate::request`: gets, puts, forwarding; `crate::listing`), hint delivery, handoff,
//! cleanup and reaping are the core's passes (`HintRun`, `HandoffPass`, `CleanupPass`,
//! `ReapRound`) and anti-entropy rounds (`AaeRun`), and gossip and joins are the core's
//! `gossip` functions, all of which the server drives too.
//! What it adds is the scheduling around them: timers, the request table, the transport's
//! backoff, and the join's retries.
//!
//! Who drives it: `dynakv-sim` runs 3 to 5 `Node`s in one thread over a simulated network.
//! The server (`dynakv-server::cluster`) drives the same machines from async tasks, with its
//! own timers and its own place for the cluster state; docs/architecture.md (*One node:
//! control plane, data plane, driver*) says what differs and how the server is to be moved
//! onto this type.
//!
//! Buckets: any number; a bucket's properties are the cluster state's (`bucket_props`, parsed
//! as the server parses them: fields an entry lacks take the built-in defaults) or else
//! [`NodeConfig::props`].
//!
//! Storage failures: the node does not panic and does not guess. The first failed storage
//! call stops it: the outputs of the input being handled are discarded (nothing computed
//! from a failed read or write leaves the node), and [`Output::Stopped`] tells the driver,
//! which restarts it from its storage as after a crash (the server's rule for a failed sync).
//! A stopped node ignores every further input until [`Node::restart`].
//!
//! Invariants this module keeps:
//! - every object this node stores goes through `Replica::write` (as coordinator, with its
//!   own actor) or `Replica::merge` (`sync`): no sibling it did not see is dropped (unless a
//!   planted `Bug`, an old rule of `SimRules` (feature `sim`) or the `last_write_wins` mode says so);
//! - a hint is deleted only after its target acknowledged it, and only if it did not change
//!   meanwhile;
//! - the Merkle tree of a partition is updated on every object write, so two nodes holding
//!   the same objects of a partition have equal roots;
//! - every outgoing request either gets a reply, a transport failure, or times out: nothing
//!   waits forever;
//! - a replica whose ring version is newer than the sender's refuses `ReplicaPut` and
//!   `HintedPut` (`StaleRing`, with its state), and a node drops a key only once the ring is
//!   settled and no longer names it (`cleanup_round`, the core's `CleanupPass`).

use crate::aae_run::{AaeRun, AaeRunEvent, AaeRunStep};
use crate::aae_trees::AaeTrees;
pub use crate::anti_entropy::AaeRecord;
use crate::anti_entropy::AaeRound;
use crate::bucket::{BucketProps, PropsCache, Quorum};
use crate::coordinator::{ReapAnswer, reap_candidates};
use crate::expiry::{ExpiryEvent, ExpiryRound, ExpiryStep};
use crate::failure::FailureDetector;
use crate::handoff::{Cleanup, CleanupMarker, CleanupPass, HandoffPass, PassStep};
use crate::hints::{DeliveryRound, HintEvent, HintStep};
use crate::keys;
use crate::limits;
use crate::listing::{BucketListing, KeyListing, KeyPage, ListEvent, ListStep, Listing};
use crate::membership::{self, ClusterState, Member, MemberStatus};
use crate::merkle::Hash;
use crate::message::{HandoffEntry, PeerMessage};
use crate::object::Object;
use crate::reaping::{ReapEvent, ReapRound, ReapStep};
use crate::replica::{Replica, ReplicaError, WriteRequest};
use crate::request::{
    Event, GetRequest, Machine, PutRequest, Reply as RequestReply, RequestError, Step, Tag, View,
};
use crate::ring::{NodeId, PartitionId, Ring};
use crate::rng::SeededRng;
use crate::serve::{self, HintOutcome, Reply, ServeContext, ServeError};
use crate::storage::{Durability as StoreDurability, Storage};
use crate::version::ActorId;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Consecutive timeouts after which the transport puts a peer into backoff.
pub const TIMEOUTS_BEFORE_BACKOFF: u32 = 3;
/// First transport backoff.
pub const BACKOFF_INITIAL_MS: u64 = 100;
/// Longest transport backoff.
pub const BACKOFF_MAX_MS: u64 = 5000;
// The bounds the server uses too, defined once in `limits`.
pub use crate::limits::{
    HANDOFF_BATCH_BYTES, HANDOFF_BATCH_KEYS, HANDOFF_BATCHES_IN_FLIGHT, LIST_PAGE_KEYS,
    MAX_AAE_KEYS_PER_EXCHANGE, MAX_HINTS_PER_TARGET, MAX_PARSED_PROPS, MAX_REAPS_PER_ROUND,
    SCAN_PAGE_KEYS,
};

/// The node's intervals and timeouts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// One replica request (get, put, hinted put, handoff batch, anti-entropy step).
    pub request_ms: u64,
    /// A forwarded put waits this long for the remote coordinator.
    pub forward_ms: u64,
    /// Gossip (heartbeat) interval.
    pub gossip_interval_ms: u64,
    /// A member whose gossiped heartbeat has not moved for this long is believed down.
    pub heartbeat_timeout_ms: u64,
    /// Hint delivery interval.
    pub hint_interval_ms: u64,
    /// Anti-entropy (and tombstone reaping) round interval.
    pub aae_interval_ms: u64,
    /// Buffered-durability flush interval.
    pub flush_interval_ms: u64,
    /// Expiry sweep interval (`crate::expiry`).
    pub expiry_interval_ms: u64,
}

impl Timings {
    /// The server's defaults (`request_timeout_ms` 2 s, forward 5x that, gossip every second,
    /// heartbeat timeout 5 s, hints every second, `aae_interval_ms`, `flush_interval_ms`).
    pub const SERVER: Timings = Timings {
        request_ms: limits::DEFAULT_REQUEST_TIMEOUT_MS,
        forward_ms: 5 * limits::DEFAULT_REQUEST_TIMEOUT_MS,
        gossip_interval_ms: 1000,
        heartbeat_timeout_ms: 5000,
        hint_interval_ms: 1000,
        aae_interval_ms: 2000,
        flush_interval_ms: 100,
        expiry_interval_ms: 1000,
    };

    /// The simulator's: the request timeout scaled down from 2 s to 500 ms (and the forward
    /// timeout with it) so a simulated run covers many faults; the rest as the server's.
    pub const SIMULATION: Timings = Timings {
        request_ms: 500,
        forward_ms: 5 * 500,
        ..Timings::SERVER
    };
}

impl Default for Timings {
    fn default() -> Self {
        Timings::SERVER
    }
}

const _: () = assert!(Timings::SERVER.forward_ms > Timings::SERVER.request_ms);
const _: () = assert!(Timings::SIMULATION.forward_ms > Timings::SIMULATION.request_ms);

/// A deliberately planted bug, to show the checkers catch it (feature `sim`).
#[cfg(feature = "sim")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// After every replica-side merge (`sync`), keep only the first sibling (by dot).
    DropSiblingOnMerge,
    /// After a replica-side merge of a data type key left concurrent versions, keep only
    /// the one with the largest value (a counter's total, a set's size) instead of merging
    /// them: the "max instead of per-actor max" merge.
    DatatypeMaxMerge,
    /// Client reads answer expired values too (no `Object::unexpired` at the boundary):
    /// caught by the simulator's expiry checker (a read long after expiry returns a value).
    ExpiryUnfilteredRead,
    /// The expiry sweep drops the expired key from its own storage instead of writing a
    /// tombstone (the removal riak_kv#1649 describes): the other replicas' copies come back
    /// through anti-entropy and read repair, so the key never converges to its removal
    /// (caught by the simulator's convergence check).
    ExpiryDropLocally,
}

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Properties of every bucket the cluster state sets none for (`n_val`, `r`, `w`, `pr`,
    /// `pw`, `last_write_wins`: after a put or a merge keep only the newest sibling;
    /// `durability`: `fsync`, or `buffered`: durable at the next flush, every
    /// `Timings::flush_interval_ms`).
    pub props: BucketProps,
    pub timings: Timings,
    /// A tombstone is reaped once its newest write is this old (and every primary holds it).
    pub tombstone_grace_ms: u64,
    /// The driver makes buffered writes durable on its own schedule (the server's flusher,
    /// which also syncs the data plane's writes, with its group commit): the node sets no
    /// `Timer::Flush` and asks for a sync (`Output::Sync`) only for a write something waits
    /// on. Off (the simulator): the node's flush timer is the flusher.
    pub driver_flushes: bool,
    /// The planted bug and the old rules (feature `sim`: built only for the simulator, so no
    /// binary that ships contains them).
    #[cfg(feature = "sim")]
    pub sim: SimRules,
}

/// Simulation-only rules: the old rules and the planted bug reproduce earlier findings so the
/// simulator's checkers can show they catch them; all are off by default.
#[cfg(feature = "sim")]
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches: planted bugs, old rules
pub struct SimRules {
    pub bug: Option<Bug>,
    /// The server's rule, on by default: `Handoff` carries the sender's ring version, a
    /// receiver with a newer ring refuses it (`StaleRing`, as `ReplicaPut` does), and a
    /// receiver that stored a key it does not replicate asks for another cleanup
    /// (`check_orphan`), as does a local read repair. Off reproduces the finding: a hint
    /// delivered by a node with an older ring to a node that already dropped the key after a
    /// join (or a read repair of a get planned before the ring changed) stays there for good,
    /// outside the key's preference list.
    pub handoff_checks_ring: bool,
    /// The old rule, to reproduce the finding: a coordinator's dot counter is per key only
    /// (`Object::update`), so a key whose tombstone was reaped restarts at 1 and reissues an
    /// old dot for a new value (Riak's KV679).
    pub per_key_counters: bool,
    /// The old reaping rule, to reproduce the finding: only the primaries are checked (each
    /// must hold the same tombstone); a hint of an older version still held elsewhere comes
    /// back after the reap.
    pub primaries_only_reap: bool,
    /// The forwarding rule before finding 5, to reproduce it: a forward that timed out is
    /// retried on the next primary, and a coordinator applies a forwarded put however late
    /// it arrives (a paused primary then coordinates it too when it resumes).
    pub retry_unanswered_forward: bool,
}

#[cfg(feature = "sim")]
impl Default for SimRules {
    fn default() -> Self {
        SimRules {
            bug: None,
            // The server's rule since the simulation found the stray-copy case (seed 154).
            handoff_checks_ring: true,
            per_key_counters: false,
            primaries_only_reap: false,
            retry_unanswered_forward: false,
        }
    }
}

#[allow(clippy::unused_self)] // `self` is read only with the `sim` feature
impl NodeConfig {
    /// Whether `Handoff` is checked against the ring (always, outside the simulator's old
    /// rule).
    fn handoff_checks_ring(&self) -> bool {
        #[cfg(feature = "sim")]
        return self.sim.handoff_checks_ring;
        #[cfg(not(feature = "sim"))]
        true
    }

    /// Whether client reads leave expired values out (always, outside the simulator's
    /// planted `Bug::ExpiryUnfilteredRead`).
    fn filters_expired_reads(&self) -> bool {
        #[cfg(feature = "sim")]
        return self.sim.bug != Some(Bug::ExpiryUnfilteredRead);
        #[cfg(not(feature = "sim"))]
        true
    }

    /// Whether the expiry sweep removes a key by writing a tombstone (always, outside the
    /// simulator's planted `Bug::ExpiryDropLocally`).
    fn expiry_writes_tombstones(&self) -> bool {
        #[cfg(feature = "sim")]
        return self.sim.bug != Some(Bug::ExpiryDropLocally);
        #[cfg(not(feature = "sim"))]
        true
    }

    /// The reaping rule before the finding (simulator only).
    fn primaries_only_reap(&self) -> bool {
        #[cfg(feature = "sim")]
        return self.sim.primaries_only_reap;
        #[cfg(not(feature = "sim"))]
        false
    }

    /// The forwarding rule before finding 5 (simulator only).
    fn retry_unanswered_forward(&self) -> bool {
        #[cfg(feature = "sim")]
        return self.sim.retry_unanswered_forward;
        #[cfg(not(feature = "sim"))]
        false
    }
}

/// The tombstone grace period of the simulator's nodes (the server's default is an hour;
/// scaled down like the timeouts).
pub const DEFAULT_TOMBSTONE_GRACE_MS: u64 = 10_000;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            props: BucketProps::default(),
            timings: Timings::default(),
            tombstone_grace_ms: DEFAULT_TOMBSTONE_GRACE_MS,
            driver_flushes: false,
            #[cfg(feature = "sim")]
            sim: SimRules::default(),
        }
    }
}

/// Id of one peer request, unique per sending node.
pub type RequestId = u64;
/// Id of one client request, unique per driver.
pub type ClientRequestId = u64;

/// A peer message: `PeerMessage`s, as requests and their replies.
#[derive(Debug, Clone)]
pub enum Message {
    Request { id: RequestId, body: PeerMessage },
    Response { id: RequestId, body: PeerMessage },
}

pub use crate::request::PutOp;

/// A client request to this node. Quorums of `None` are the bucket's.
#[derive(Debug, Clone)]
pub enum ClientOp {
    Get {
        bucket: String,
        key: String,
        r: Option<Quorum>,
        pr: Option<Quorum>,
    },
    Put(PutOp),
    /// Set a bucket's properties cluster-wide (`None` resets them to the defaults); gossip
    /// spreads the change.
    SetBucketProps {
        bucket: String,
        props: Option<BucketProps>,
    },
    /// Ask the member `via` to admit this node (only a node that is alone in its cluster and
    /// holds no data may join).
    Join {
        via: NodeId,
    },
    /// Mark this node leaving; the claimant plans the ring without it and handoff moves its
    /// keys.
    Leave,
    /// Take a member that is gone for good out of the ring at once, without handoff
    /// (`ClusterState::force_remove`); never this node itself.
    ForceRemove {
        node: NodeId,
    },
    /// Change the security state (users, sources, grants, enabled), all or nothing, stamped
    /// with this node's wall clock; gossip spreads it. A refused change answers 400.
    Security(crate::security::SecurityChange),
    /// Create, activate or update a bucket type (`bucket_types::apply`), stamped with this
    /// node's wall clock; gossip spreads it.
    BucketType(crate::bucket_types::TypeChange),
    /// Every live key of a bucket across the ring's nodes, deduplicated, in key order,
    /// answered in pages (`ClientResult::Keys`, the last with `last`).
    ListKeys {
        bucket: String,
    },
    /// Every bucket holding an object on a node of the ring.
    ListBuckets,
}

/// The answer to a client request.
#[derive(Debug, Clone)]
pub enum ClientResult {
    /// A get's merged object (empty when absent).
    Got(Object),
    /// A put's stored object, as the coordinator wrote it.
    Put(Object),
    /// An administrative request (bucket properties, join, leave) was carried out.
    Done,
    /// One page of a key listing (at most `LIST_PAGE_KEYS` keys); more follow unless `last`.
    Keys { keys: Vec<String>, last: bool },
    /// A bucket listing.
    Buckets(Vec<String>),
    /// The request failed, with the HTTP status it maps to: 503 (quorum not met, no
    /// coordinator), 409 (the write was refused: sibling or clock limits), 412 (its
    /// precondition failed), 400 (a refused administrative request), 500 (the stored object
    /// cannot be read), or what a remote coordinator answered.
    Failed { status: u16, message: String },
}

impl ClientResult {
    fn unavailable(message: String) -> ClientResult {
        ClientResult::Failed {
            status: 503,
            message,
        }
    }
}

/// Timers a node sets for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Gossip,
    Hints,
    Aae,
    Flush,
    /// The expiry sweep (`crate::expiry`).
    Expiry,
    /// Resume the expiry round's steps set aside so that keys whose reads and writes
    /// complete at once (local replicas only) do not recurse without bound (`expire`).
    ExpiryResume,
    RequestTimeout(RequestId),
    /// Resume paged background work (transition handoff, cleanup) that has nothing in
    /// flight to resume it: set for the current time, so a long scan goes on one page per
    /// `handle` without waiting for the next gossip round.
    Paging,
}

/// The two clocks a node reads (as TigerBeetle's `Time`): a monotonic one for timers,
/// timeouts and failure detection, and the wall clock for what is stamped with or aged by
/// the calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub monotonic_ms: u64,
    pub wall_ms: u64,
}

/// What drives a node.
#[derive(Debug, Clone)]
pub enum Input {
    Client {
        id: ClientRequestId,
        op: ClientOp,
    },
    Message {
        from: NodeId,
        message: Message,
    },
    /// A request could not be sent (the peer's process is down: connection refused).
    SendFailed {
        to: NodeId,
        id: RequestId,
    },
    /// A request was not sent because the peer cannot carry it (it runs the previous peer
    /// protocol version, during a rolling upgrade). The peer is not down: the request fails
    /// as unsent (a write tries a fallback), with no backoff, so the requests it can carry
    /// still go to it.
    SendRefused {
        to: NodeId,
        id: RequestId,
    },
    Timer(Timer),
    /// The storage sync asked for by `Output::Sync { through }` completed: every write the
    /// node made before it returned that output is durable.
    Synced {
        through: u64,
    },
    /// That sync failed: the node stops (see the module doc).
    SyncFailed {
        error: String,
    },
    /// What the transport's hello with `peer` established: its clock minus this node's (a
    /// forwarded put's timestamp, on the forwarder's clock, is converted before its age is
    /// judged), and the public key it proved it holds (`None` where links carry no keys, as
    /// in the simulator): a join request is admitted only for the member entry of that key.
    Hello {
        peer: NodeId,
        offset_ms: i64,
        key: Option<[u8; 32]>,
    },
    /// What a data plane driven beside this node (requests over the same replica) saw.
    Observed(Observation),
}

/// What a data plane running beside a node (the server's requests and replica serving, over
/// the replica the node shares: [`Node::over`]) tells the node's control plane, as quinn's
/// connections tell their endpoint (`EndpointEvent`). The node itself records the same
/// facts for the requests it runs, with the same functions.
#[derive(Debug, Clone)]
pub enum Observation {
    /// A peer asked or answered something: a sign of life for the failure detector.
    Contact(NodeId),
    /// A peer refused a write planned under an older ring and sent its state (`StaleRing`):
    /// merge it (another cluster's state is refused).
    PeerState(Box<ClusterState>),
    /// A write was stored here (replica write, hint delivery, read repair): if this node no
    /// longer replicates the key (settled ring), another cleanup must run.
    Stored { bucket: String, key: String },
    /// A hint was kept here (`true`), or dropped at the per-target bound (`false`).
    Hint { kept: bool },
}

/// What a node asks its environment to do.
#[derive(Debug, Clone)]
pub enum Output {
    Send {
        to: NodeId,
        message: Message,
    },
    Reply {
        id: ClientRequestId,
        result: ClientResult,
    },
    SetTimer {
        at_ms: u64,
        timer: Timer,
    },
    /// Make every write the node made so far durable (`Storage::sync`, or a group commit
    /// that starts after this output), then feed back `Input::Synced { through }`. The node
    /// holds back what must not happen before that: the acknowledgement of a durable replica
    /// write, the replication of a durable coordinator write, a cleanup pass's record.
    Sync {
        through: u64,
    },
    /// Write the node's cluster state (`membership::store_persisted`, fsync'd) before the
    /// outputs that follow this one are carried out, in the order asked: it changed beyond
    /// heartbeats. [`Node::restart`] reads back the last one written. (The server writes
    /// gossip's changes in the background and waits only for administrative ones.)
    Persist {
        state: Box<ClusterState>,
    },
    /// A storage call failed: the node stopped (see the module doc). The driver restarts it
    /// with [`Node::restart`] once its storage works again.
    Stopped {
        error: String,
    },
}

/// What waits for a sync (see `Output::Sync`).
#[derive(Debug)]
enum AfterSync {
    /// The acknowledgement of a durable replica write or handoff batch.
    Respond {
        to: NodeId,
        id: RequestId,
        body: PeerMessage,
    },
    /// A durable coordinator write: request `request` learns it was written (and
    /// replicates it) once it is on disk (the server's coordinator also makes its own copy
    /// durable before it sends the write on).
    Written { request: u64, stored: Object },
    /// A cleanup pass is recorded only once its drops are durable.
    RecordCleanup(Cleanup<Vec<u8>, Hash>),
}

/// Why a reply is awaited.
#[derive(Debug, Clone)]
enum Purpose {
    /// Send `tag` of client request `request` (a get's fetch, a put's replica write, a
    /// forwarded put).
    Request {
        request: u64,
        tag: Tag,
    },
    /// Read repair and anti-entropy stores: fire and forget (the transport still counts).
    Store,
    /// Hints for `target`: a `Handoff` batch to it, or one hint whose target no longer
    /// replicates its key, sent to one of the key's current replicas.
    HintDelivery {
        target: NodeId,
        /// The send of `target`'s delivery run (`HintRun`).
        tag: u64,
    },
    /// A batch of the ring transition's handoff.
    TransitionHandoff,
    /// A batch of keys this node no longer replicates, sent to their primaries before cleanup
    /// drops them.
    CleanupHandoff {
        /// The batch's send in the cleanup pass.
        tag: u64,
    },
    /// A question of the anti-entropy round's exchange (`AaeRun`).
    AaeAsk {
        id: u64,
    },
    /// A fetch of the peer's copy of a key an exchange compares.
    AaeFetch {
        id: u64,
    },
    /// A primary's copy of a tombstone the reaper checks.
    ReapCheck {
        /// The check's candidate in the reaping round.
        id: u64,
    },
    Gossip,
    Join,
    /// Send `tag` of listing `listing` (a node's page of keys, or its buckets).
    Listing {
        listing: u64,
        tag: Tag,
    },
}

/// A listing in progress (`crate::listing`) and the client it answers.
#[derive(Debug)]
struct ClientListing {
    client: ClientRequestId,
    listing: Listing,
}

#[derive(Debug, Clone)]
struct Pending {
    to: NodeId,
    purpose: Purpose,
    /// When it was sent, for a replica write or read whose round trip feeds `pbs`.
    timed: Option<(crate::pbs::Kind, u64)>,
}

#[derive(Debug, Clone)]
enum ReplyTo {
    Client(ClientRequestId),
    Peer(NodeId, RequestId),
    /// The expiry round's read or tombstone (`expire`).
    Expiry,
}

/// A client request in progress: its data-plane machine and whom to answer.
#[derive(Debug)]
struct ClientRequest {
    machine: Machine,
    reply: Option<ReplyTo>,
}

/// The node as its request machines see it: the cluster at `now`.
struct NodeView<'a> {
    node: &'a Node,
    now: u64,
}

impl View for NodeView<'_> {
    fn me(&self) -> &NodeId {
        &self.node.me
    }

    fn state(&self) -> &ClusterState {
        &self.node.cluster
    }

    fn props(&self, bucket: &str) -> BucketProps {
        self.node.props(bucket)
    }

    fn is_up(&self, node: &NodeId) -> bool {
        self.node.is_up(self.now, node)
    }

    fn request_timeout_ms(&self) -> u64 {
        self.node.config.timings.request_ms
    }

    fn forward_timeout_ms(&self) -> u64 {
        self.node.config.timings.forward_ms
    }
}

/// The transport's view of one peer.
#[derive(Debug, Clone, Copy)]
struct Link {
    consecutive_timeouts: u32,
    backoff_until: u64,
    next_backoff_ms: u64,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            consecutive_timeouts: 0,
            backoff_until: 0,
            next_backoff_ms: BACKOFF_INITIAL_MS,
        }
    }
}

/// High-water marks and counts of what a node did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub max_siblings: usize,
    pub max_clock_entries: usize,
    pub hints_stored: u64,
    pub hints_delivered: u64,
    pub hints_dropped: u64,
    /// Hints that failed their checksum, removed undelivered.
    pub hints_corrupt: u64,
    pub read_repairs: u64,
    pub aae_repairs: u64,
    /// Anti-entropy exchanges completed (each updates its partition's `aae_records` entry).
    pub aae_exchanges: u64,
    /// Keys sent by this node's transition handoffs, and keys dropped by cleanup.
    pub handoff_keys: u64,
    pub cleanup_dropped: u64,
    pub stale_ring_refusals: u64,
    /// Forwarded puts this node refused as coordinator because they arrived too late.
    pub late_forwards_refused: u64,
    pub replans: u64,
    pub tombstones_reaped: u64,
    /// Expired keys this node removed (a tombstone written by its expiry round).
    pub expired_removed: u64,
    /// Stored objects or hints that did not decode, left alone (see `Node::replica_call`).
    pub corrupt_skipped: u64,
}

/// What a node runs over: its storage, and the replica and anti-entropy trees over it (opened
/// by [`Node::new`], or by a driver that shares them with its data plane: [`Node::over`]).
#[derive(Debug, Clone)]
pub struct NodeParts {
    pub storage: Arc<dyn Storage>,
    pub replica: Arc<Replica>,
    pub aae: Arc<AaeTrees>,
}

impl NodeParts {
    /// Open the replica (as `actor`) and the anti-entropy trees of `ring` over `storage`:
    /// the trees are rebuilt and the hints counted.
    pub fn open(
        storage: Arc<dyn Storage>,
        actor: ActorId,
        ring: &Ring,
    ) -> Result<NodeParts, OpenError> {
        let (replica, aae) = open_storage(&storage, actor, ring)?;
        Ok(NodeParts {
            storage,
            replica: Arc::new(replica),
            aae,
        })
    }
}

/// What a peer's hello established (`Input::Hello`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerHello {
    offset_ms: i64,
    key: Option<[u8; 32]>,
}

/// Why a node could not be opened over its storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot open the node's storage: {0}")]
pub struct OpenError(pub String);

/// One node.
#[derive(Debug)]
pub struct Node {
    me: NodeId,
    actor: ActorId,
    config: NodeConfig,
    /// The wall clock at the input being handled (`Node::handle_at`).
    wall_ms: u64,
    // ---- durable state ----
    cluster: ClusterState,
    /// The cluster state last asked to be written (`Output::Persist`).
    persisted: ClusterState,
    /// The node's storage: objects, hints, the dot-counter lease, the anti-entropy index.
    storage: Arc<dyn Storage>,
    // ---- volatile state ----
    /// The replica over the storage: read-merge-write of objects (with the node-wide dot
    /// counter and its durable lease), the bounded hint store, tombstones. Rebuilt at every
    /// start; shared with the data plane's requests.
    replica: Arc<Replica>,
    /// The anti-entropy trees and index, rebuilt from the storage at every start.
    aae: Arc<AaeTrees>,
    /// Parsed bucket properties of the cluster state, by the entry's timestamp.
    parsed_props: RefCell<PropsCache>,
    rng: SeededRng,
    next_request: RequestId,
    next_client_request: u64,
    pending: BTreeMap<RequestId, Pending>,
    requests: BTreeMap<u64, ClientRequest>,
    failure_detector: FailureDetector,
    links: BTreeMap<NodeId, Link>,
    /// What each peer's hello established (`Input::Hello`), at most `MAX_MEMBERS` (see
    /// `note_hello`).
    hellos: BTreeMap<NodeId, PeerHello>,
    /// The hint delivery round in progress (at most one; the core's `DeliveryRound`).
    hint_round: Option<DeliveryRound>,
    /// The request being failed because it was never delivered (see `fail_unsent`), and
    /// whether the peer refused it for its protocol version (`Input::SendRefused`) rather
    /// than being unreachable.
    unsent: Option<(RequestId, bool)>,
    /// Transition handoff and cleanup (`passes`).
    passes: passes::Passes,
    /// A join in progress (`rounds`).
    joining: rounds::Joining,
    /// Anti-entropy rounds (`aae`).
    anti_entropy: aae::AntiEntropy,
    /// The reaping round in progress (at most one).
    reap: Option<ReapRound>,
    /// The expiry round in progress (at most one).
    expiry: Option<ExpiryRound>,
    /// How deep the expiry round's completions are nested right now, and its steps set
    /// aside for `Timer::ExpiryResume` once that passed `expire::MAX_EXPIRY_DEPTH`.
    expiry_depth: u32,
    expiry_stash: Vec<ExpiryStep>,
    /// Round trips of this node's replica writes and reads (`crate::pbs`).
    pbs: crate::pbs::Samples,
    listings: BTreeMap<u64, ClientListing>,
    next_listing: u64,
    /// Transport failures to process before returning (a send to a peer in backoff fails
    /// at once).
    failures: VecDeque<(NodeId, RequestId)>,
    outputs: Vec<Output>,
    /// The latest sync ticket issued (one per write that must become durable), and the
    /// latest one an `Output::Sync` asked for.
    sync_issued: u64,
    sync_asked: u64,
    /// What waits for a sync, by the ticket it needs, in ticket order.
    after_sync: VecDeque<(u64, AfterSync)>,
    /// The first storage failure: the node is stopped until `restart`.
    failed: Option<String>,
    /// Whether `Output::Stopped` was returned for `failed`.
    stop_reported: bool,
    stats: NodeStats,
}

impl Node {
    /// A node over `storage` (empty, or what a previous run of this node left), knowing
    /// `cluster`; returns it and its first timers. `actor` must be new whenever the storage
    /// may have lost writes this node's actor made (restart safety).
    pub fn new(
        me: NodeId,
        actor: ActorId,
        cluster: ClusterState,
        config: NodeConfig,
        storage: Arc<dyn Storage>,
        rng: SeededRng,
        now: u64,
    ) -> Result<(Node, Vec<Output>), OpenError> {
        let parts = NodeParts::open(storage, actor, &cluster.ring.current)?;
        Node::over(me, cluster, config, parts, rng, now)
    }

    /// A node over a replica and trees its driver opened and shares with the data plane
    /// (whose requests read and write the same objects and hints); the actor is the
    /// replica's. Returns it and its first timers.
    pub fn over(
        me: NodeId,
        cluster: ClusterState,
        config: NodeConfig,
        parts: NodeParts,
        rng: SeededRng,
        now: u64,
    ) -> Result<(Node, Vec<Output>), OpenError> {
        let NodeParts {
            storage,
            replica,
            aae,
        } = parts;
        let actor = replica.actor();
        let heartbeat_timeout = config.timings.heartbeat_timeout_ms;
        let mut node = Node {
            wall_ms: now,
            failure_detector: FailureDetector::new(me.clone(), now, heartbeat_timeout),
            me,
            actor,
            config,
            // Nothing written yet: the first `handle` (or the constructor) asks for it.
            persisted: ClusterState {
                cluster_name: String::new(),
                ..cluster.clone()
            },
            cluster,
            storage,
            replica,
            aae,
            parsed_props: RefCell::new(PropsCache::default()),
            rng,
            next_request: 1,
            next_client_request: 1,
            pending: BTreeMap::new(),
            requests: BTreeMap::new(),
            links: BTreeMap::new(),
            hellos: BTreeMap::new(),
            hint_round: None,
            unsent: None,
            passes: passes::Passes::default(),
            joining: rounds::Joining::default(),
            anti_entropy: aae::AntiEntropy::default(),
            reap: None,
            expiry: None,
            expiry_depth: 0,
            expiry_stash: Vec::new(),
            pbs: crate::pbs::Samples::default(),
            listings: BTreeMap::new(),
            next_listing: 0,
            failures: VecDeque::new(),
            outputs: Vec::new(),
            sync_issued: 0,
            sync_asked: 0,
            after_sync: VecDeque::new(),
            failed: None,
            stop_reported: false,
            stats: NodeStats::default(),
        };
        let mut outputs = node.start_timers(now);
        // As the server at startup: the state it starts from is written first.
        node.persist_if_changed();
        outputs.splice(0..0, std::mem::take(&mut node.outputs));
        Ok((node, outputs))
    }

    /// A fresh node that founded its own one-node cluster and asks `via` (in turn, until one
    /// accepts) to admit it. Its storage should hold no data.
    #[allow(clippy::too_many_arguments, clippy::needless_pass_by_value)] // mirrors `new`
    pub fn joining(
        me: NodeId,
        actor: ActorId,
        cluster_name: &str,
        partitions: u32,
        via: Vec<NodeId>,
        config: NodeConfig,
        storage: Arc<dyn Storage>,
        rng: SeededRng,
        now: u64,
    ) -> Result<(Node, Vec<Output>), OpenError> {
        let cluster = ClusterState::found(cluster_name, member_entry(&me), partitions)
            .map_err(|e| OpenError(e.to_string()))?;
        let parts = NodeParts::open(storage, actor, &cluster.ring.current)?;
        Node::start_joining(cluster, via, config, parts, rng, now)
    }

    /// [`Node::joining`] as `member` (its addresses and key, as the cluster will know it),
    /// over parts its driver opened ([`Node::over`]).
    pub fn joining_over(
        member: Member,
        (cluster_name, partitions): (&str, u32),
        via: Vec<NodeId>,
        config: NodeConfig,
        parts: NodeParts,
        (rng, now): (SeededRng, u64),
    ) -> Result<(Node, Vec<Output>), OpenError> {
        let cluster = ClusterState::found(cluster_name, member, partitions)
            .map_err(|e| OpenError(e.to_string()))?;
        Node::start_joining(cluster, via, config, parts, rng, now)
    }

    /// A node of its own founded `cluster` that asks `via` to admit it.
    fn start_joining(
        cluster: ClusterState,
        via: Vec<NodeId>,
        config: NodeConfig,
        parts: NodeParts,
        rng: SeededRng,
        now: u64,
    ) -> Result<(Node, Vec<Output>), OpenError> {
        let me = cluster
            .members
            .keys()
            .next()
            .cloned()
            .ok_or_else(|| OpenError("a founded cluster has its founder".into()))?;
        let (mut node, mut outputs) = Node::over(me, cluster, config, parts, rng, now)?;
        node.joining.via = via;
        node.send_join(now);
        outputs.append(&mut node.outputs);
        Ok((node, outputs))
    }

    pub fn id(&self) -> &NodeId {
        &self.me
    }

    /// The replica this node runs over (shared with a data plane: [`Node::over`]).
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// What this node believes about the cluster.
    pub fn cluster(&self) -> &ClusterState {
        &self.cluster
    }

    /// Whether this node is part of the cluster (its join, if any, was accepted).
    pub fn joined(&self) -> bool {
        self.joining.via.is_empty()
    }

    /// Whether this node's own state says it has left.
    pub fn has_exited(&self) -> bool {
        self.cluster
            .member(&self.me)
            .is_some_and(|m| m.status == MemberStatus::Exiting)
    }

    /// Whether this node's cleanup ran for the ring it knows.
    pub fn cleaned_up(&self) -> bool {
        self.passes.marker.cleaned_version() >= self.cluster.ring.version
    }

    /// Whether a storage failure stopped this node (until [`Node::restart`]).
    pub fn stopped(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Mark this node leaving; gossip and the claimant do the rest. Called
    /// between inputs; returns the outputs of the change (its `Output::Persist`: a leave
    /// lost in a crash would leave the node in the ring).
    ///
    /// # Errors
    /// The membership refused it (the last node of the ring, or not a member).
    pub fn leave(&mut self) -> Result<Vec<Output>, String> {
        self.request_leave()?;
        self.persist_if_changed();
        Ok(std::mem::take(&mut self.outputs))
    }

    /// Record what the data plane saw (`Input::Observed`).
    fn observe(&mut self, now: u64, observation: Observation) {
        match observation {
            Observation::Contact(peer) => self.failure_detector.observe_contact(&peer, now),
            Observation::PeerState(state) => self.merge_state(now, &state),
            Observation::Stored { bucket, key } => self.check_orphan(&bucket, &key),
            Observation::Hint { kept: true } => {
                self.stats.hints_stored = self.stats.hints_stored.saturating_add(1);
            }
            Observation::Hint { kept: false } => {
                self.stats.hints_dropped = self.stats.hints_dropped.saturating_add(1);
            }
        }
    }

    fn request_leave(&mut self) -> Result<(), String> {
        let me = self.me.clone();
        self.cluster.request_leave(&me).map_err(|e| e.to_string())
    }

    pub fn actor(&self) -> ActorId {
        self.actor
    }

    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    /// Admission control of background work: the keys one anti-entropy round may repair
    /// (at least 1). The server's `Admission` computes it from the foreground p99.
    pub fn set_aae_budget(&mut self, budget: usize) {
        self.anti_entropy.budget = budget.max(1);
    }

    /// What anti-entropy did per partition since the node started.
    pub fn aae_records(&self) -> &BTreeMap<PartitionId, AaeRecord> {
        &self.anti_entropy.records
    }

    /// The properties of `bucket`: the cluster state's entry (a stored `{"props": ...}` as
    /// the server parses it: fields it lacks take the built-in defaults), else the config's.
    /// Parsed entries are kept by their timestamp (at most `MAX_PARSED_PROPS`).
    pub fn props(&self, bucket: &str) -> BucketProps {
        self.parsed_props
            .borrow_mut()
            .props(&self.cluster, bucket, &self.config.props)
    }

    /// The key's replica count.
    fn n_val(&self, bucket: &str) -> u32 {
        self.props(bucket).n_val
    }

    /// The stored object of a key (tombstones included).
    pub fn object(&self, bucket: &str, key: &str) -> Result<Option<Object>, String> {
        self.replica.get(bucket, key).map_err(|e| e.to_string())
    }

    /// Every stored object as `(bucket, key, object)`, in storage-key order.
    pub fn objects(&self) -> Result<Vec<(String, String, Object)>, String> {
        let mut objects = Vec::new();
        for (storage_key, bytes) in self.object_pages()?.into_iter().flatten() {
            let Some((bucket, key)) = keys::split_object_key(&storage_key) else {
                continue;
            };
            let object = Object::decode(&bytes).map_err(|e| e.to_string())?;
            objects.push((
                String::from_utf8_lossy(bucket).into_owned(),
                String::from_utf8_lossy(key).into_owned(),
                object,
            ));
        }
        Ok(objects)
    }

    /// Every stored object as pages of `(storage key, bytes)`, as the server scans them.
    fn object_pages(&self) -> Result<Vec<Vec<crate::storage::Entry>>, String> {
        let mut pages = Vec::new();
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .replica
                .scan_objects(start_after.as_deref(), SCAN_PAGE_KEYS)
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = page.last() else {
                return Ok(pages);
            };
            start_after = Some(last.clone());
            pages.push(page);
        }
    }

    /// One page of at most `SCAN_PAGE_KEYS` stored objects after `start_after`, for the
    /// node's own work (`None`: the scan failed, which stops the node).
    fn scan_page(&mut self, start_after: Option<&[u8]>) -> Option<Vec<crate::storage::Entry>> {
        let page = self.replica.scan_objects(start_after, SCAN_PAGE_KEYS);
        let page = self.must(page, "scan objects");
        self.failed.is_none().then_some(page)
    }

    /// Number of hints held.
    pub fn hint_count(&self) -> usize {
        self.replica.hint_counts().iter().map(|(_, n)| n).sum()
    }

    /// The Merkle root of one partition's tree.
    pub fn partition_root(&self, partition: PartitionId) -> Hash {
        self.aae.root(partition)
    }

    /// The key's partition.
    pub fn partition_of(&self, bucket: &str, key: &str) -> PartitionId {
        self.cluster
            .ring
            .current
            .partition_of(bucket.as_bytes(), key.as_bytes())
    }

    /// The round trips of this node's replica writes and reads (`crate::pbs`).
    pub fn pbs_samples(&self) -> &crate::pbs::Samples {
        &self.pbs
    }

    /// The key's primaries (its preference list).
    pub fn primaries(&self, bucket: &str, key: &str) -> Vec<NodeId> {
        self.cluster
            .preference_list(self.partition_of(bucket, key), self.n_val(bucket))
    }

    fn start_timers(&mut self, now: u64) -> Vec<Output> {
        let timings = self.config.timings;
        let mut out = vec![
            Output::SetTimer {
                at_ms: now + timings.gossip_interval_ms,
                timer: Timer::Gossip,
            },
            Output::SetTimer {
                at_ms: now + timings.hint_interval_ms,
                timer: Timer::Hints,
            },
            // The first anti-entropy round comes one interval after startup, as in the server.
            Output::SetTimer {
                at_ms: now + timings.aae_interval_ms,
                timer: Timer::Aae,
            },
            Output::SetTimer {
                at_ms: now + timings.expiry_interval_ms,
                timer: Timer::Expiry,
            },
        ];
        // Any bucket may be buffered (its properties can change at any time): the flush runs
        // always, unless the driver's own flusher does it.
        if !self.config.driver_flushes {
            out.push(Output::SetTimer {
                at_ms: now + timings.flush_interval_ms,
                timer: Timer::Flush,
            });
        }
        out
    }

    /// Start again over the same storage after a crash or a storage failure (the driver
    /// decides what the storage kept, and whether `actor` is new: it must be whenever
    /// writes of the old actor may be lost). Volatile state (requests in flight,
    /// coordinations, liveness views, transport state, anti-entropy progress) is gone.
    /// Returns the new timers: the driver drops every timer and sync it holds from before
    /// (the simulator's incarnations do), or the periodic rounds would run twice.
    pub fn restart(
        &mut self,
        now: u64,
        actor: ActorId,
        rng: SeededRng,
    ) -> Result<Vec<Output>, OpenError> {
        self.actor = actor;
        // The cluster state is the one last written (a wiped disk has none: the node keeps
        // what it knew, as the operator's restart with the old state would).
        let stored = membership::load_persisted(self.storage.as_ref()).map_err(OpenError)?;
        if let Some(state) = stored {
            self.cluster = state;
        }
        self.persisted = self.cluster.clone();
        // Volatile state: the replica, its hint counts and the trees come back from storage.
        let (replica, aae) = open_storage(&self.storage, self.actor, &self.cluster.ring.current)?;
        self.replica = Arc::new(replica);
        self.aae = aae;
        self.rng = rng;
        self.pending.clear();
        self.requests.clear();
        self.failure_detector = FailureDetector::new(
            self.me.clone(),
            now,
            self.config.timings.heartbeat_timeout_ms,
        );
        self.links.clear();
        self.hint_round = None;
        self.passes = passes::Passes::default();
        self.joining.restart();
        self.anti_entropy.restart();
        self.reap = None;
        self.expiry = None;
        self.expiry_depth = 0;
        self.expiry_stash.clear();
        self.listings.clear();
        self.failures.clear();
        self.outputs.clear();
        // Tickets stay monotonic across restarts; what waited is gone with the process.
        self.sync_asked = self.sync_issued;
        self.after_sync.clear();
        self.failed = None;
        self.stop_reported = false;
        Ok(self.start_timers(now))
    }

    /// Process one input.
    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Output> {
        self.handle_at(
            Time {
                monotonic_ms: now,
                wall_ms: now,
            },
            input,
        )
    }

    /// [`Node::handle`] with the two clocks apart: timers, timeouts and failure detection
    /// run on `time.monotonic_ms`; what is stamped or aged by the calendar (a write's
    /// `Last-Modified` and clock entries, a bucket-properties entry, a tombstone's age, a
    /// forwarded put's age) on `time.wall_ms`, which may be skewed against other nodes' and
    /// may jump.
    pub fn handle_at(&mut self, time: Time, input: Input) -> Vec<Output> {
        let now = time.monotonic_ms;
        self.wall_ms = time.wall_ms;
        if self.failed.is_some() {
            return self.stopped_outputs();
        }
        // Inputs that cannot change the cluster state (a replica-side request is answered by
        // `serve`, which never sees it) skip the comparison of `persist_if_changed`, the
        // bulk of the inputs.
        let may_change_state = match &input {
            Input::Message {
                message: Message::Request { body, .. },
                ..
            } => serve::storage_call(body).is_none(),
            Input::Synced { .. }
            | Input::Hello { .. }
            | Input::Timer(Timer::Flush)
            | Input::Observed(
                Observation::Contact(_) | Observation::Stored { .. } | Observation::Hint { .. },
            ) => false,
            _ => true,
        };
        match input {
            Input::Client { id, op } => self.on_client(now, id, op),
            Input::Message { from, message } => match message {
                // As the server: any message from a peer is a sign of life.
                Message::Request { id, body } => {
                    self.failure_detector.observe_contact(&from, now);
                    self.on_request(now, &from, id, body);
                }
                Message::Response { id, body } => {
                    if let Some(pending) = self.pending.remove(&id)
                        && pending.to == from
                    {
                        self.failure_detector.observe_contact(&from, now);
                        let link = self.links.entry(from.clone()).or_default();
                        *link = Link::default();
                        if let Some((kind, sent)) = pending.timed
                            && crate::pbs::answered(kind, &body)
                        {
                            let rtt_us = now.saturating_sub(sent).saturating_mul(1000);
                            self.pbs.record(kind, rtt_us);
                        }
                        self.on_response(now, id, pending, Some(body));
                    }
                }
            },
            Input::SendFailed { to, id } => {
                if self.pending.get(&id).is_some_and(|p| p.to == to) {
                    self.backoff(now, &to);
                    self.fail_unsent(now, id, false);
                }
            }
            Input::SendRefused { to, id } => {
                if self.pending.get(&id).is_some_and(|p| p.to == to) {
                    self.fail_unsent(now, id, true);
                }
            }
            Input::Timer(timer) => self.on_timer(now, timer),
            Input::Synced { through } => self.on_synced(now, through),
            Input::SyncFailed { error } => {
                self.must(Err::<(), _>(error), "sync its writes");
            }
            Input::Hello {
                peer,
                offset_ms,
                key,
            } => self.note_hello(peer, PeerHello { offset_ms, key }),
            Input::Observed(observation) => self.observe(now, observation),
        }
        while let Some((to, id)) = self.failures.pop_front() {
            if self.failed.is_some() {
                break;
            }
            if self.pending.get(&id).is_some_and(|p| p.to == to) {
                self.fail_unsent(now, id, false);
            }
        }
        if self.failed.is_some() {
            return self.stopped_outputs();
        }
        if self.sync_issued > self.sync_asked {
            self.sync_asked = self.sync_issued;
            self.outputs.push(Output::Sync {
                through: self.sync_issued,
            });
        }
        if may_change_state {
            self.persist_if_changed();
        }
        std::mem::take(&mut self.outputs)
    }

    /// Ask for the cluster state to be written when it changed beyond heartbeats since the
    /// last write (`Output::Persist`, first among the outputs: nothing that follows from the
    /// change leaves before it is asked for).
    fn persist_if_changed(&mut self) {
        if self.cluster.persists_as(&self.persisted) {
            return;
        }
        self.persisted = self.cluster.clone();
        self.outputs.insert(
            0,
            Output::Persist {
                state: Box::new(self.cluster.clone()),
            },
        );
    }

    /// Keep a peer's clock offset (the transport measures it at each hello, before the peer
    /// may be a member here: a joiner learns of the members, and they of it, later). Bounded
    /// by `MAX_MEMBERS` entries: when full, a member's offset takes the place of one of a
    /// name that is no member, and a non-member's is not kept.
    fn note_hello(&mut self, peer: NodeId, hello: PeerHello) {
        let known = self.hellos.contains_key(&peer);
        if !known && self.hellos.len() >= membership::MAX_MEMBERS {
            if self.cluster.member(&peer).is_none() {
                return;
            }
            let stranger = self
                .hellos
                .keys()
                .find(|n| self.cluster.member(n).is_none())
                .cloned();
            let Some(stranger) = stranger else {
                return;
            };
            self.hellos.remove(&stranger);
        }
        self.hellos.insert(peer, hello);
    }

    /// A new sync ticket: the writes made so far must become durable.
    fn request_sync(&mut self) -> u64 {
        self.sync_issued += 1;
        self.sync_issued
    }

    /// Hold `action` until the writes made so far are durable.
    fn after_sync(&mut self, action: AfterSync) {
        let ticket = self.request_sync();
        self.after_sync.push_back((ticket, action));
    }

    /// The durability a storage call inside `handle` uses: never a synchronous fsync. A write
    /// that must be durable is buffered and asks for a sync (`Output::Sync`); what depends on
    /// it waits for `Input::Synced` (`after_sync`).
    fn buffered(&mut self, durability: StoreDurability) -> StoreDurability {
        if durability == StoreDurability::Fsync {
            self.request_sync();
        }
        StoreDurability::Buffered
    }

    /// A sync completed: what waited for it happens now, in order.
    fn on_synced(&mut self, now: u64, through: u64) {
        while self.after_sync.front().is_some_and(|(t, _)| *t <= through) {
            let Some((_, action)) = self.after_sync.pop_front() else {
                break;
            };
            match action {
                AfterSync::Respond { to, id, body } => self.respond(&to, id, body),
                AfterSync::Written { request, stored } => {
                    self.request_event(now, request, Event::Written(Ok(stored)));
                }
                AfterSync::RecordCleanup(cleanup) => {
                    cleanup.record(&self.cluster, &mut self.passes.marker);
                }
            }
        }
    }

    /// A stopped node's outputs: nothing of the failed step, `Stopped` once.
    fn stopped_outputs(&mut self) -> Vec<Output> {
        self.outputs.clear();
        if self.stop_reported {
            return Vec::new();
        }
        self.stop_reported = true;
        let error = self.failed.clone().unwrap_or_default();
        vec![Output::Stopped { error }]
    }

    /// The value of a storage call; a failure stops the node (see the module doc) and
    /// yields `T::default()`, which nothing outside the node ever sees.
    fn must<T: Default, E: std::fmt::Display>(&mut self, result: Result<T, E>, what: &str) -> T {
        match result {
            Ok(value) => value,
            Err(e) => {
                if self.failed.is_none() {
                    self.failed = Some(format!("storage failed to {what}: {e}"));
                }
                T::default()
            }
        }
    }

    // ----- liveness and transport -----

    /// Whether a member is believed up: not in transport backoff, and its gossiped heartbeat
    /// moved recently (or it is too early to tell).
    pub fn is_up(&self, now: u64, id: &NodeId) -> bool {
        if id == &self.me {
            return true;
        }
        if self.links.get(id).is_some_and(|l| l.backoff_until > now) {
            return false;
        }
        self.failure_detector.is_up(id, now)
    }

    fn backoff(&mut self, now: u64, peer: &NodeId) {
        let link = self.links.entry(peer.clone()).or_default();
        link.consecutive_timeouts = 0;
        link.backoff_until = now + link.next_backoff_ms;
        link.next_backoff_ms = (link.next_backoff_ms * 2).min(BACKOFF_MAX_MS);
    }

    fn on_timeout_of(&mut self, now: u64, peer: &NodeId) {
        let link = self.links.entry(peer.clone()).or_default();
        link.consecutive_timeouts += 1;
        if link.consecutive_timeouts >= TIMEOUTS_BEFORE_BACKOFF {
            self.backoff(now, peer);
        }
    }

    fn send_request(
        &mut self,
        now: u64,
        to: &NodeId,
        body: PeerMessage,
        purpose: Purpose,
        timeout_ms: u64,
    ) -> RequestId {
        let id = self.next_request;
        self.next_request += 1;
        let timed = crate::pbs::kind_of(&body).map(|kind| (kind, now));
        self.pending.insert(
            id,
            Pending {
                to: to.clone(),
                purpose,
                timed,
            },
        );
        if self.links.get(to).is_some_and(|l| l.backoff_until > now) {
            // The transport fails requests to a peer in backoff at once.
            self.failures.push_back((to.clone(), id));
            return id;
        }
        self.outputs.push(Output::Send {
            to: to.clone(),
            message: Message::Request { id, body },
        });
        self.outputs.push(Output::SetTimer {
            at_ms: now + timeout_ms,
            timer: Timer::RequestTimeout(id),
        });
        id
    }

    fn respond(&mut self, to: &NodeId, id: RequestId, body: PeerMessage) {
        self.outputs.push(Output::Send {
            to: to.clone(),
            message: Message::Response { id, body },
        });
    }

    /// A request the transport never delivered (connect refused, peer in backoff): failed, and
    /// known not to have reached the peer.
    fn fail_unsent(&mut self, now: u64, id: RequestId, refused: bool) {
        self.unsent = Some((id, refused));
        self.fail_request(now, id);
        self.unsent = None;
    }

    fn fail_request(&mut self, now: u64, id: RequestId) {
        if let Some(pending) = self.pending.remove(&id) {
            self.on_response(now, id, pending, None);
        }
    }

    // ----- local storage -----

    /// The durability of a write to `bucket` that is not part of a client's write (merges,
    /// hints, repairs): the bucket's.
    fn durability(&self, bucket: &str) -> StoreDurability {
        self.props(bucket).durability
    }

    fn note_stored(&mut self, object: &Object) {
        self.stats.max_siblings = self.stats.max_siblings.max(object.siblings().len());
        self.stats.max_clock_entries = self.stats.max_clock_entries.max(object.clock().len());
    }

    /// The value of a replica call for the node's own work. A storage failure stops the node;
    /// a stored object or hint that does not decode is left alone and counted
    /// (`NodeStats::corrupt_skipped`): the damage stays on disk, so stopping for it would stop
    /// the node again at every restart. `None` either way: the caller does nothing more with
    /// that key.
    fn replica_call<T>(&mut self, result: Result<T, ReplicaError>, what: &str) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e @ ReplicaError::Storage(_)) => {
                self.must(Err::<(), _>(e), what);
                None
            }
            Err(_) => {
                self.stats.corrupt_skipped += 1;
                None
            }
        }
    }

    /// The stored object of a key, for the node's own work (`Err`: the read failed, see
    /// [`Node::replica_call`]).
    fn read(&mut self, bucket: &str, key: &str) -> Result<Option<Object>, ()> {
        let read = self.replica.get(bucket, key);
        self.replica_call(read, "read an object").ok_or(())
    }

    /// Store an object bypassing the replica's rules: only the planted bug and the old
    /// per-key-counter rule, which reproduce findings, write this way.
    #[cfg(feature = "sim")]
    fn overwrite(&mut self, bucket: &str, key: &str, object: &Object) {
        let storage_key = keys::object_key(bucket.as_bytes(), key.as_bytes());
        let old = self
            .storage
            .get(crate::storage::Table::Objects, &storage_key);
        let old = self.must(old, "read an object");
        if self.failed.is_some() {
            return; // never write after a failed read
        }
        let new = object.encode();
        let durability = self.durability(bucket);
        let durability = self.buffered(durability);
        let put = self.storage.put(
            crate::storage::Table::Objects,
            &storage_key,
            &new,
            durability,
        );
        self.must(put, "write an object");
        self.aae.observe(&storage_key, old.as_deref(), Some(&new));
        self.note_stored(object);
    }

    /// Remove a key's object if its stored bytes still hash to `expected` (cleanup and
    /// reaping: `Replica::remove_if_unchanged_with`). Returns whether it was removed.
    fn remove_if_unchanged(
        &mut self,
        bucket: &str,
        key: &str,
        expected: &Hash,
        fsync: bool,
    ) -> bool {
        let storage_key = keys::object_key(bucket.as_bytes(), key.as_bytes());
        self.remove_stored_if_unchanged(&storage_key, expected, fsync)
    }

    /// [`Node::remove_if_unchanged`] by storage key.
    fn remove_stored_if_unchanged(
        &mut self,
        storage_key: &[u8],
        expected: &Hash,
        fsync: bool,
    ) -> bool {
        let durability = if fsync {
            StoreDurability::Fsync
        } else {
            StoreDurability::Buffered
        };
        let durability = self.buffered(durability);
        let removed = self
            .replica
            .remove_if_unchanged_with(storage_key, expected, durability);
        self.must(removed, "remove an object")
    }

    /// The coordinator's write: `Replica::write` with this node's actor. A refusal is the
    /// client's answer.
    fn write_local(
        &mut self,
        now: u64,
        op: PutOp,
        props: &BucketProps,
        durability: StoreDurability,
    ) -> Result<Object, RequestError> {
        let content = op.content.into_content(now, self.wall_ms);
        let (bucket, key) = (op.bucket.as_str(), op.key.as_str());
        #[cfg(feature = "sim")]
        if self.config.sim.per_key_counters {
            // The old rule: the dot counter continues from the key's own clock only.
            let Ok(stored) = self.read(bucket, key) else {
                return Err(RequestError::Internal(
                    "the stored object cannot be read".into(),
                ));
            };
            let stored = stored.unwrap_or_default();
            let context = op.context.unwrap_or_default();
            let mut updated = stored
                .update(
                    &context,
                    content,
                    self.actor,
                    now,
                    crate::object::PrunePolicy::default(),
                )
                .map_err(|e| RequestError::Replica(ReplicaError::Write(e)))?;
            if props.last_write_wins {
                updated.resolve_last_write_wins();
            }
            self.overwrite(bucket, key, &updated);
            return Ok(updated);
        }
        let written = self.replica.write(WriteRequest {
            bucket,
            key,
            context: op.context,
            content,
            props,
            durability,
            precondition: op.precondition,
            now_ms: now,
            wall_ms: self.wall_ms,
        });
        // A refused write (too many siblings, a failed precondition) is the client's answer
        // (see `RequestError::status`); a storage failure stops the node.
        match written {
            Ok(updated) => {
                self.note_stored(&updated);
                Ok(updated)
            }
            // A stored object that does not decode: the write is refused, as the server does.
            Err(e @ ReplicaError::Corrupt(_)) => {
                self.stats.corrupt_skipped += 1;
                Err(RequestError::Replica(e))
            }
            Err(e @ ReplicaError::Storage(_)) => {
                let message = e.to_string();
                self.must(Err::<(), _>(e), "write an object");
                Err(RequestError::Replica(ReplicaError::Storage(message)))
            }
            Err(e) => Err(RequestError::Replica(e)),
        }
    }

    /// A replica-side merge: `Replica::merge` (`sync` with what is stored). Returns whether
    /// it was stored (see [`Node::replica_call`]).
    fn merge_local(&mut self, bucket: &str, key: &str, incoming: &Object) -> bool {
        let durability = self.durability(bucket);
        let durability = self.buffered(durability);
        let props = self.props(bucket);
        let merged = self
            .replica
            .merge(bucket, key, incoming, &props, durability);
        let Some(merged) = self.replica_call(merged, "merge an object") else {
            return false;
        };
        if self.planted_bug(bucket, key, &merged).is_none() {
            self.note_stored(&merged);
        }
        true
    }

    /// The planted bug, after a replica-side merge left `merged` under `key`: keep only its
    /// first sibling. Returns what it stored instead, if anything.
    #[cfg(feature = "sim")]
    fn planted_bug(&mut self, bucket: &str, key: &str, merged: &Object) -> Option<Object> {
        if merged.siblings().len() < 2 {
            return None;
        }
        let kept = match self.config.sim.bug {
            Some(Bug::DropSiblingOnMerge) => merged.keep_first_sibling_only(),
            Some(Bug::DatatypeMaxMerge) => {
                let size = |s: &crate::object::Sibling| match crate::crdt::Crdt::decode(
                    &s.content.value,
                ) {
                    Ok(crate::crdt::Crdt::Counter(c)) => c.value(),
                    Ok(crate::crdt::Crdt::Set(set)) => i64::try_from(set.len()).unwrap_or(i64::MAX),
                    _ => i64::MIN,
                };
                self.props(bucket).datatype?;
                let largest = merged.live_siblings().max_by_key(|s| size(s))?.dot;
                merged.keep_only(largest)
            }
            Some(Bug::ExpiryUnfilteredRead | Bug::ExpiryDropLocally) | None => {
                return None;
            }
        };
        self.overwrite(bucket, key, &kept);
        Some(kept)
    }

    /// No bug is planted outside the simulator.
    #[cfg(not(feature = "sim"))]
    #[allow(clippy::unused_self, clippy::needless_pass_by_ref_mut)]
    fn planted_bug(&mut self, _bucket: &str, _key: &str, _merged: &Object) -> Option<Object> {
        None
    }

    /// `Replica::store_hint`: merged with any hint held for the key, bounded per target,
    /// with the write's durability (a `dw` put's hint is durable too, as in the server).
    fn store_hint(
        &mut self,
        target: &NodeId,
        (bucket, key): (&str, &str),
        incoming: &Object,
        durability: StoreDurability,
    ) -> bool {
        let durability = self.buffered(durability);
        let stored = self.replica.store_hint(
            &target.0,
            bucket,
            key,
            incoming,
            MAX_HINTS_PER_TARGET,
            durability,
        );
        let stored = self.replica_call(stored, "store a hint");
        if self.failed.is_some() {
            return false;
        }
        if stored == Some(true) {
            self.stats.hints_stored += 1;
        } else {
            self.stats.hints_dropped += 1;
        }
        stored == Some(true)
    }

    /// `Step::KeepHint`: this node keeps a version of a coordinated write for `target`.
    fn keep_hint(
        &mut self,
        target: &NodeId,
        key: (&str, &str),
        object: &Object,
        durability: StoreDurability,
    ) {
        if target != &self.me {
            self.store_hint(target, key, object, durability);
        }
    }

    /// `Replica::get_with_hint`: the stored object merged with the hint held for `hinted_for`.
    fn local_with_hint(
        &mut self,
        bucket: &str,
        key: &str,
        hinted_for: Option<&NodeId>,
    ) -> Result<Option<Object>, ()> {
        let read = self
            .replica
            .get_with_hint(bucket, key, hinted_for.map(|n| n.0.as_str()));
        // A failed local read counts as a failed replica reply, as in the server.
        self.replica_call(read, "read an object").ok_or(())
    }

    /// The periodic flush of buffered writes: a sync like any other (`Output::Sync`).
    fn flush(&mut self) {
        self.request_sync();
    }
}

/// The member entry of a node whose addresses are its name (a driver that routes by id, as
/// the simulator does).
pub fn member_entry(id: &NodeId) -> Member {
    Member {
        id: id.clone(),
        peer_addr: format!("sim://{id}"),
        http_addr: format!("sim://{id}/http"),
        zone: String::new(),
        status: MemberStatus::Joining,
        version: 0,
        heartbeat: 0,
        public_key: None,
    }
}

/// The replica and trees of a node over its storage, as the server opens them at startup
/// (the index is not trusted: the node may have stopped uncleanly).
fn open_storage(
    storage: &Arc<dyn Storage>,
    actor: ActorId,
    ring: &Ring,
) -> Result<(Replica, Arc<AaeTrees>), OpenError> {
    let replica = Replica::new(Arc::clone(storage), actor, Arc::new(AtomicBool::new(false)));
    let aae = Arc::new(AaeTrees::new(ring.clone(), Arc::clone(storage)));
    aae.rebuild(false)
        .map_err(|e| OpenError(format!("rebuild the anti-entropy trees: {e}")))?;
    replica.attach_aae(Arc::clone(&aae));
    replica
        .load_hint_counts()
        .map_err(|e| OpenError(format!("count hints: {e}")))?;
    Ok((replica, aae))
}

const _: () = assert!(BACKOFF_INITIAL_MS <= BACKOFF_MAX_MS);
const _: () = assert!(limits::MAX_SIBLINGS > 1);

mod aae;
mod client;
mod expire;
mod hinted;
mod passes;
mod peer;
mod reap;
mod rounds;
#[cfg(test)]
mod tests;
