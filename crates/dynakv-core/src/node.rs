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
//! too); messages are [`PeerMessage`]s; gets and puts are the [`GetCoordinator`] and
//! [`PutCoordinator`] (with [`ReplicaPlan`]), forwarding is `PutForward`/`refuse_forwarded`/
//! `forward_reply`, and each background round builds its messages with the core's functions
//! (`HintRound::route_page`, `TransitionHandoff::batch_page`, `Cleanup::add_page`,
//! `reap_candidates`, `ReapCheck`, `AaeRound`/`AaeExchange`, `FailureDetector`,
//! `ClusterState::gossip_peer`/`merge`/`plan`). What it adds is the sequencing around them:
//! which step follows which reply, timers, the request table, the transport's backoff.
//!
//! Who drives it: `dynakv-sim` runs 3 to 5 `Node`s in one thread over a simulated network.
//! The server (`dynakv-server::cluster`) still runs the same sequencing written as async
//! tasks over the same primitives; docs/architecture.md (*One node state machine*) says what
//! differs and how the server is to be moved onto this type.
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
//!   planted [`Bug`], an old rule of [`NodeConfig`] or the `last_write_wins` mode says so);
//! - a hint is deleted only after its target acknowledged it, and only if it did not change
//!   meanwhile;
//! - the Merkle tree of a partition is updated on every object write, so two nodes holding
//!   the same objects of a partition have equal roots;
//! - every outgoing request either gets a reply, a transport failure, or times out: nothing
//!   waits forever;
//! - a replica whose ring version is newer than the sender's refuses `ReplicaPut` and
//!   `HintedPut` (`StaleRing`, with its state), and a node drops a key only once the ring is
//!   settled and no longer names it (`cleanup_round`), as `cluster.rs` does.

use crate::aae_trees::AaeTrees;
use crate::anti_entropy::{AaeAsk, AaeExchange, AaeRound, AaeStep, BucketKey};
use crate::bucket::{BucketProps, Quorum};
use crate::codec::{Reader, Writer};
use crate::coordinator::{
    ForwardFailure, ForwardReply, GetCoordinator, GetStep, PutCoordinator, PutForward, PutPolicy,
    PutRoute, PutSend, PutStep, ReapAnswer, ReapCheck, ReplicaPlan, forward_reply, reap_candidates,
    reap_check_members, reaper_primaries, refuse_forwarded,
};
use crate::failure::FailureDetector;
use crate::handoff::{Batches, Cleanup, CleanupMarker, TransitionHandoff};
use crate::hints::HintRound;
use crate::keys;
use crate::limits;
use crate::membership::{BucketPropsEntry, ClusterState, MAX_CUSTOM_BUCKETS, Member, MemberStatus};
use crate::merkle::{self, Hash};
use crate::message::{HandoffEntry, PeerMessage, WireContent};
use crate::object::{Content, Object, PrunePolicy, Sibling, decode_clock, encode_clock};
use crate::replica::{Precondition, Replica, ReplicaError, WriteRequest};
use crate::ring::{NodeId, PartitionId, Ring};
use crate::rng::SeededRng;
use crate::serve::{self, HintOutcome, Reply, ServeContext, ServeError};
use crate::storage::{Durability as StoreDurability, Storage, Table};
use crate::version::{ActorId, VersionVector};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The content type of a value written without one.
const CONTENT_TYPE: &str = "application/octet-stream";
/// Consecutive timeouts after which the transport puts a peer into backoff.
pub const TIMEOUTS_BEFORE_BACKOFF: u32 = 3;
/// First transport backoff.
pub const BACKOFF_INITIAL_MS: u64 = 100;
/// Longest transport backoff.
pub const BACKOFF_MAX_MS: u64 = 5000;
/// Most keys a node keeps as hints for one target (the server's `MAX_HINTS_PER_TARGET`).
pub const MAX_HINTS_PER_TARGET: usize = 100_000;
/// Keys per handoff batch (the server's, from core's limits).
pub const HANDOFF_BATCH_KEYS: usize = limits::HANDOFF_BATCH_KEYS;
/// Keys per page of a key listing, asked of each node and answered to the client (the
/// server's `LIST_PAGE_KEYS`).
pub const LIST_PAGE_KEYS: usize = 1000;
/// Most bucket property sets a node keeps parsed (the server's `MAX_PARSED_PROPS`).
pub const MAX_PARSED_PROPS: usize = 10_000;
/// Most tombstones one reaping round checks (the server's `MAX_REAPS_PER_ROUND`).
pub const MAX_REAPS_PER_ROUND: usize = 1000;
/// Most keys listed per leaf-key exchange of anti-entropy (the server's constant).
pub const MAX_AAE_KEYS_PER_EXCHANGE: usize = 10_000;

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
}

impl Timings {
    /// The server's defaults (`request_timeout_ms` 2 s, forward 5x that, gossip every second,
    /// heartbeat timeout 5 s, hints every second, `aae_interval_ms`, `flush_interval_ms`).
    pub const SERVER: Timings = Timings {
        request_ms: 2000,
        forward_ms: 5 * 2000,
        gossip_interval_ms: 1000,
        heartbeat_timeout_ms: 5000,
        hint_interval_ms: 1000,
        aae_interval_ms: 2000,
        flush_interval_ms: 100,
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

/// A deliberately planted bug, to show the checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// After every replica-side merge (`sync`), keep only the first sibling (by dot).
    DropSiblingOnMerge,
}

/// Node settings. The old rules and the planted bug reproduce earlier findings so the
/// simulator's checkers can show they catch them; all are off by default.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches: planted bugs, old rules
pub struct NodeConfig {
    /// Properties of every bucket the cluster state sets none for (`n_val`, `r`, `w`, `pr`,
    /// `pw`, `last_write_wins`: after a put or a merge keep only the newest sibling;
    /// `durability`: `fsync`, or `buffered`: durable at the next flush, every
    /// `Timings::flush_interval_ms`).
    pub props: BucketProps,
    pub timings: Timings,
    pub bug: Option<Bug>,
    /// The server's rule, on by default: `Handoff` carries the sender's ring version, a
    /// receiver with a newer ring refuses it (`StaleRing`, as `ReplicaPut` does), and a
    /// receiver that stored a key it does not replicate asks for another cleanup
    /// (`check_orphan`), as does a local read repair. Off reproduces the finding: a hint
    /// delivered by a node with an older ring to a node that already dropped the key after a
    /// join (or a read repair of a get planned before the ring changed) stays there for good,
    /// outside the key's preference list.
    pub handoff_checks_ring: bool,
    /// A tombstone is reaped once its newest write is this old (and every primary holds it).
    pub tombstone_grace_ms: u64,
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

/// The tombstone grace period of the simulator's nodes (the server's default is an hour;
/// scaled down like the timeouts).
pub const DEFAULT_TOMBSTONE_GRACE_MS: u64 = 10_000;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            props: BucketProps::default(),
            timings: Timings::default(),
            bug: None,
            // The server's rule since the simulation found the stray-copy case (seed 154).
            handoff_checks_ring: true,
            tombstone_grace_ms: DEFAULT_TOMBSTONE_GRACE_MS,
            per_key_counters: false,
            primaries_only_reap: false,
            retry_unanswered_forward: false,
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

/// A client write (a delete is a write whose content is `deleted`: a tombstone with the
/// context), with the HTTP API's options.
#[derive(Debug, Clone)]
pub struct PutOp {
    pub bucket: String,
    pub key: String,
    pub context: Option<VersionVector>,
    pub content: WireContent,
    /// Acknowledgements required, of replicas and of primaries (`None`: the bucket's).
    pub w: Option<Quorum>,
    pub pw: Option<Quorum>,
    /// `dw` was given: the write is durable on the coordinator and on every replica counted
    /// before the answer, whatever the bucket's durability.
    pub dw_given: bool,
    pub precondition: Precondition,
}

impl PutOp {
    /// A write of `value` (`None` deletes) with the bucket's quorums and no precondition.
    pub fn new(
        bucket: &str,
        key: &str,
        context: Option<VersionVector>,
        value: Option<Vec<u8>>,
    ) -> PutOp {
        PutOp {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            context,
            content: WireContent {
                deleted: value.is_none(),
                value: value.unwrap_or_default(),
                content_type: CONTENT_TYPE.into(),
                meta: Vec::new(),
            },
            w: None,
            pw: None,
            dw_given: false,
            precondition: Precondition::None,
        }
    }
}

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
    RequestTimeout(RequestId),
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
    /// `peer`'s clock minus this node's, as measured by the transport's hello: a forwarded
    /// put's timestamp (the forwarder's clock) is converted before its age is judged.
    PeerClock {
        peer: NodeId,
        offset_ms: i64,
    },
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
    /// A durable coordinator write: replicate once it is on disk (the server's coordinator
    /// also makes its own copy durable before it sends the write on).
    Replicate {
        reply: ReplyTo,
        write: LocalWrite,
        plan: ReplicaPlan,
        planned_at: Option<u64>,
    },
    /// A cleanup pass is recorded only once its drops are durable.
    RecordCleanup(Cleanup<Vec<u8>, Hash>),
}

/// Why a reply is awaited.
#[derive(Debug, Clone)]
enum Purpose {
    GetFetch {
        coord: u64,
    },
    PutSend {
        coord: u64,
        send: PutSend,
    },
    /// Read repair and anti-entropy stores: fire and forget (the transport still counts).
    Store,
    Forward {
        client: ClientRequestId,
        forward: PutForward,
        body: Box<PeerMessage>,
    },
    /// Hints for `target`: a `Handoff` batch to it, or one hint whose target no longer
    /// replicates its key, sent to one of the key's current replicas.
    HintDelivery {
        target: NodeId,
        /// The hints' storage keys.
        hints: Vec<Vec<u8>>,
    },
    /// A batch of the ring transition's handoff.
    TransitionHandoff,
    /// A batch of keys this node no longer replicates, sent to their primaries before cleanup
    /// drops them.
    CleanupHandoff {
        /// The keys' storage keys.
        keys: Vec<Vec<u8>>,
    },
    Aae,
    /// A primary's copy of a tombstone the reaper checks.
    ReapCheck {
        reap: u64,
    },
    Gossip,
    Join,
    /// A page of keys for cursor `cursor` of listing `listing`.
    KeyPage {
        listing: u64,
        cursor: usize,
    },
    /// One node's buckets for bucket listing `listing`.
    Buckets {
        listing: u64,
    },
}

/// A page of keys and where the next one starts (`None`: the bucket is exhausted).
type KeyPage = (Vec<String>, Option<String>);

/// One node's side of a key listing: the page being merged and where the next one starts.
#[derive(Debug)]
struct ListCursor {
    node: NodeId,
    buffer: VecDeque<String>,
    next_after: Option<String>,
    more: bool,
    fetching: bool,
    /// The node did not answer: left out (its keys have other replicas).
    failed: bool,
}

/// A key listing in progress (`Cluster::list_keys`): a k-way merge of every node's pages,
/// memory one page per node plus the page being filled.
#[derive(Debug)]
struct KeyListing {
    client: ClientRequestId,
    bucket: String,
    cursors: Vec<ListCursor>,
    out: Vec<String>,
}

/// A bucket listing in progress.
#[derive(Debug)]
struct BucketListing {
    client: ClientRequestId,
    waiting: usize,
    answered: usize,
    buckets: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Pending {
    to: NodeId,
    purpose: Purpose,
}

#[derive(Debug, Clone)]
enum ReplyTo {
    Client(ClientRequestId),
    Peer(NodeId, RequestId),
}

#[derive(Debug)]
struct GetCoord {
    bucket: String,
    key: String,
    coordinator: GetCoordinator,
    reply: Option<ReplyTo>,
}

/// A coordinator's stored version of a write, and how it is to be replicated.
#[derive(Debug, Clone)]
struct LocalWrite {
    bucket: String,
    key: String,
    stored: Object,
    w: usize,
    pw: usize,
    durability: StoreDurability,
}

#[derive(Debug)]
struct PutCoord {
    write: LocalWrite,
    coordinator: PutCoordinator,
    reply: Option<ReplyTo>,
    /// First replication round: the ring version the write was planned with (a failed
    /// quorum is re-planned once when the ring changed meanwhile). `None` for the re-plan.
    planned_at: Option<u64>,
}

/// A tombstone being checked on the other primaries before it is reaped.
#[derive(Debug)]
struct ReapRun {
    bucket: String,
    key: String,
    /// The other primaries (asked to reap once the check passes).
    others: Vec<NodeId>,
    check: ReapCheck<Object>,
}

/// The anti-entropy exchange in progress: the core's `AaeExchange`, the question it waits
/// for, and the version fetches of the keys it compares.
#[derive(Debug)]
struct AaeRun {
    peer: NodeId,
    exchange: AaeExchange<BucketKey>,
    asking: Option<RequestId>,
    fetching: BTreeMap<RequestId, BucketKey>,
    /// A step failed or was answered unexpectedly: the exchange ended early.
    failed: bool,
}

/// What the anti-entropy exchanges of one partition did (the server's `admin aae`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AaeRecord {
    /// When the last exchange completed, and with whom.
    pub last_exchange_ms: Option<u64>,
    pub last_peer: Option<NodeId>,
    pub keys_repaired_last: u64,
    pub keys_repaired_total: u64,
    pub exchanges: u64,
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
#[derive(Debug, Clone, Copy, Default)]
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
    /// Keys sent by this node's transition handoffs, and keys dropped by cleanup.
    pub handoff_keys: u64,
    pub cleanup_dropped: u64,
    pub stale_ring_refusals: u64,
    /// Forwarded puts this node refused as coordinator because they arrived too late.
    pub late_forwards_refused: u64,
    pub replans: u64,
    pub tombstones_reaped: u64,
    /// Stored objects or hints that did not decode, left alone (see `Node::replica_call`).
    pub corrupt_skipped: u64,
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
    // ---- durable state ----
    cluster: ClusterState,
    /// The node's storage: objects, hints, the dot-counter lease, the anti-entropy index.
    storage: Arc<dyn Storage>,
    // ---- volatile state ----
    /// The replica over the storage: read-merge-write of objects (with the node-wide dot
    /// counter and its durable lease), the bounded hint store, tombstones. Rebuilt at every
    /// start.
    replica: Replica,
    /// The anti-entropy trees and index, rebuilt from the storage at every start.
    aae: Arc<AaeTrees>,
    /// Parsed bucket properties of the cluster state, by the entry's timestamp.
    parsed_props: RefCell<BTreeMap<String, (u64, BucketProps)>>,
    rng: SeededRng,
    next_request: RequestId,
    next_coord: u64,
    pending: BTreeMap<RequestId, Pending>,
    gets: BTreeMap<u64, GetCoord>,
    puts: BTreeMap<u64, PutCoord>,
    failure_detector: FailureDetector,
    links: BTreeMap<NodeId, Link>,
    /// Peers' clock offsets (`Input::PeerClock`), bounded by the members.
    clock_offsets: BTreeMap<NodeId, i64>,
    /// The hint delivery round in progress per target.
    hint_rounds: BTreeMap<NodeId, HintRound<Vec<u8>, Vec<u8>>>,
    /// The request being failed because it was never delivered (see `fail_unsent`).
    unsent: Option<RequestId>,
    handoff: Option<TransitionHandoff>,
    /// The ring version whose cleanup ran (volatile, as in the server).
    cleanup_marker: CleanupMarker,
    /// Until a join is accepted: the members to ask, in turn (the operator retrying).
    join_via: Vec<NodeId>,
    join_attempts: usize,
    join_pending: bool,
    /// The client request that asked for the join in progress (answered once, no retry).
    join_client: Option<ClientRequestId>,
    aae_round: usize,
    aae_plan: Option<AaeRound>,
    aae_current: Option<AaeRun>,
    /// Keys one anti-entropy round may repair (admission control: the driver lowers it while
    /// foreground latency is high).
    aae_budget: usize,
    /// Completed exchanges per partition (volatile, as in the server).
    aae_records: BTreeMap<PartitionId, AaeRecord>,
    reaps: BTreeMap<u64, ReapRun>,
    next_reap: u64,
    key_listings: BTreeMap<u64, KeyListing>,
    bucket_listings: BTreeMap<u64, BucketListing>,
    next_listing: u64,
    /// Keys cleanup is handing to their primaries: the copy sent, acknowledgements awaited,
    /// and whether all so far succeeded.
    cleanup: Option<Cleanup<Vec<u8>, Hash>>,
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
        let (replica, aae) = open_storage(&storage, actor, &cluster.ring.current)?;
        let heartbeat_timeout = config.timings.heartbeat_timeout_ms;
        let mut node = Node {
            failure_detector: FailureDetector::new(me.clone(), now, heartbeat_timeout),
            me,
            actor,
            config,
            cluster,
            storage,
            replica,
            aae,
            parsed_props: RefCell::new(BTreeMap::new()),
            rng,
            next_request: 1,
            next_coord: 1,
            pending: BTreeMap::new(),
            gets: BTreeMap::new(),
            puts: BTreeMap::new(),
            links: BTreeMap::new(),
            clock_offsets: BTreeMap::new(),
            hint_rounds: BTreeMap::new(),
            unsent: None,
            handoff: None,
            cleanup_marker: CleanupMarker::default(),
            join_via: Vec::new(),
            join_attempts: 0,
            join_pending: false,
            join_client: None,
            aae_round: 0,
            aae_plan: None,
            aae_current: None,
            aae_budget: MAX_AAE_KEYS_PER_EXCHANGE,
            aae_records: BTreeMap::new(),
            reaps: BTreeMap::new(),
            next_reap: 0,
            key_listings: BTreeMap::new(),
            bucket_listings: BTreeMap::new(),
            next_listing: 0,
            cleanup: None,
            failures: VecDeque::new(),
            outputs: Vec::new(),
            sync_issued: 0,
            sync_asked: 0,
            after_sync: VecDeque::new(),
            failed: None,
            stop_reported: false,
            stats: NodeStats::default(),
        };
        let outputs = node.start_timers(now);
        Ok((node, outputs))
    }

    /// A fresh node that founded its own one-node cluster and asks `via` (in turn, until one
    /// accepts) to admit it: `Cluster::join`. Its storage should hold no data.
    #[allow(clippy::too_many_arguments)] // mirrors `new` plus what a join needs
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
        let (mut node, mut outputs) = Node::new(me, actor, cluster, config, storage, rng, now)?;
        node.join_via = via;
        node.send_join(now);
        outputs.append(&mut node.outputs);
        Ok((node, outputs))
    }

    pub fn id(&self) -> &NodeId {
        &self.me
    }

    /// What this node believes about the cluster.
    pub fn cluster(&self) -> &ClusterState {
        &self.cluster
    }

    /// Whether this node is part of the cluster (its join, if any, was accepted).
    pub fn joined(&self) -> bool {
        self.join_via.is_empty()
    }

    /// Whether this node's own state says it has left (`Cluster::has_exited`).
    pub fn has_exited(&self) -> bool {
        self.cluster
            .member(&self.me)
            .is_some_and(|m| m.status == MemberStatus::Exiting)
    }

    /// Whether this node's cleanup ran for the ring it knows.
    pub fn cleaned_up(&self) -> bool {
        self.cleanup_marker.cleaned_version() >= self.cluster.ring.version
    }

    /// Whether a storage failure stopped this node (until [`Node::restart`]).
    pub fn stopped(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// `Cluster::leave`: mark this node leaving; gossip and the claimant do the rest.
    pub fn leave(&mut self) -> Result<(), String> {
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
        self.aae_budget = budget.max(1);
    }

    /// What anti-entropy did per partition since the node started.
    pub fn aae_records(&self) -> &BTreeMap<PartitionId, AaeRecord> {
        &self.aae_records
    }

    /// The properties of `bucket`: the cluster state's entry (a stored `{"props": ...}` as
    /// the server parses it: fields it lacks take the built-in defaults), else the config's.
    /// Parsed entries are kept by their timestamp (at most `MAX_PARSED_PROPS`).
    pub fn props(&self, bucket: &str) -> BucketProps {
        let Some(entry) = self.cluster.bucket_props.get(bucket) else {
            return self.config.props.clone();
        };
        let mut cache = self.parsed_props.borrow_mut();
        if let Some((ts, props)) = cache.get(bucket)
            && *ts == entry.timestamp_ms
        {
            return props.clone();
        }
        let props = parse_props(bucket, entry.props_json.as_deref())
            .unwrap_or_else(|| self.config.props.clone());
        if cache.len() >= MAX_PARSED_PROPS {
            cache.clear();
        }
        cache.insert(bucket.to_owned(), (entry.timestamp_ms, props.clone()));
        props
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
                .scan_objects(start_after.as_deref(), 1000)
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = page.last() else {
                return Ok(pages);
            };
            start_after = Some(last.clone());
            pages.push(page);
        }
    }

    /// [`Node::object_pages`] for the node's own work: a failure stops the node.
    fn scan_all(&mut self) -> Vec<Vec<crate::storage::Entry>> {
        let pages = self.object_pages();
        self.must(pages, "scan objects")
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
        ];
        // Any bucket may be buffered (its properties can change at any time): the flush runs
        // always, as the server's flusher does.
        out.push(Output::SetTimer {
            at_ms: now + timings.flush_interval_ms,
            timer: Timer::Flush,
        });
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
        // Volatile state: the replica, its hint counts and the trees come back from storage.
        let (replica, aae) = open_storage(&self.storage, self.actor, &self.cluster.ring.current)?;
        self.replica = replica;
        self.aae = aae;
        self.rng = rng;
        self.pending.clear();
        self.gets.clear();
        self.puts.clear();
        self.failure_detector = FailureDetector::new(
            self.me.clone(),
            now,
            self.config.timings.heartbeat_timeout_ms,
        );
        self.links.clear();
        self.hint_rounds.clear();
        self.handoff = None;
        self.cleanup_marker = CleanupMarker::default();
        self.join_pending = false;
        self.join_client = None;
        self.aae_plan = None;
        self.aae_current = None;
        self.aae_records.clear();
        self.reaps.clear();
        self.key_listings.clear();
        self.bucket_listings.clear();
        self.cleanup = None;
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
        if self.failed.is_some() {
            return self.stopped_outputs();
        }
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
                        self.on_response(now, id, pending, Some(body));
                    }
                }
            },
            Input::SendFailed { to, id } => {
                if self.pending.get(&id).is_some_and(|p| p.to == to) {
                    self.backoff(now, &to);
                    self.fail_unsent(now, id);
                }
            }
            Input::Timer(timer) => self.on_timer(now, timer),
            Input::Synced { through } => self.on_synced(now, through),
            Input::SyncFailed { error } => {
                self.must(Err::<(), _>(error), "sync its writes");
            }
            Input::PeerClock { peer, offset_ms } => {
                if self.cluster.member(&peer).is_some() || self.clock_offsets.contains_key(&peer) {
                    self.clock_offsets.insert(peer, offset_ms);
                }
            }
        }
        while let Some((to, id)) = self.failures.pop_front() {
            if self.failed.is_some() {
                break;
            }
            if self.pending.get(&id).is_some_and(|p| p.to == to) {
                self.fail_unsent(now, id);
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
        std::mem::take(&mut self.outputs)
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
                AfterSync::Replicate {
                    reply,
                    write,
                    plan,
                    planned_at,
                } => self.replicate(now, reply, write, plan, planned_at),
                AfterSync::RecordCleanup(cleanup) => {
                    cleanup.record(&self.cluster, &mut self.cleanup_marker);
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
        self.pending.insert(
            id,
            Pending {
                to: to.clone(),
                purpose,
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
    fn fail_unsent(&mut self, now: u64, id: RequestId) {
        self.unsent = Some(id);
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
    fn overwrite(&mut self, bucket: &str, key: &str, object: &Object) {
        let storage_key = keys::object_key(bucket.as_bytes(), key.as_bytes());
        let old = self.storage.get(Table::Objects, &storage_key);
        let old = self.must(old, "read an object");
        if self.failed.is_some() {
            return; // never write after a failed read
        }
        let new = object.encode();
        let durability = self.durability(bucket);
        let durability = self.buffered(durability);
        let put = self
            .storage
            .put(Table::Objects, &storage_key, &new, durability);
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
    ) -> Result<Object, ClientResult> {
        let content = Content {
            value: op.content.value,
            content_type: op.content.content_type,
            last_modified_ms: now,
            meta: op.content.meta,
            deleted: op.content.deleted,
        };
        let (bucket, key) = (op.bucket.as_str(), op.key.as_str());
        if self.config.per_key_counters {
            // The old rule: the dot counter continues from the key's own clock only.
            let Ok(stored) = self.read(bucket, key) else {
                return Err(ClientResult::Failed {
                    status: 500,
                    message: "the stored object cannot be read".into(),
                });
            };
            let stored = stored.unwrap_or_default();
            let context = op.context.unwrap_or_default();
            let mut updated = stored
                .update(&context, content, self.actor, now, PrunePolicy::default())
                .map_err(|e| ClientResult::Failed {
                    status: 409,
                    message: e.to_string(),
                })?;
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
        });
        // A refused write (too many siblings, a failed precondition) is the client's answer
        // (the server's statuses); a storage failure stops the node.
        let (status, error) = match written {
            Ok(updated) => {
                self.note_stored(&updated);
                return Ok(updated);
            }
            Err(e @ ReplicaError::Write(_)) => (409, e),
            Err(e @ ReplicaError::Precondition(_)) => (412, e),
            // A stored object that does not decode: the write is refused, as the server does.
            Err(e @ ReplicaError::Corrupt(_)) => {
                self.stats.corrupt_skipped += 1;
                (500, e)
            }
            Err(e @ ReplicaError::Storage(_)) => {
                let message = e.to_string();
                self.must(Err::<(), _>(e), "write an object");
                (500, ReplicaError::Storage(message))
            }
        };
        Err(ClientResult::Failed {
            status,
            message: error.to_string(),
        })
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
    fn planted_bug(&mut self, bucket: &str, key: &str, merged: &Object) -> Option<Object> {
        if self.config.bug != Some(Bug::DropSiblingOnMerge) || merged.siblings().len() < 2 {
            return None;
        }
        let first_only = with_siblings(merged.clock(), &merged.siblings()[..1])?;
        self.overwrite(bucket, key, &first_only);
        Some(first_only)
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

    /// `Cluster::keep_hint`: this node keeps a version of a coordinated write for `target`.
    fn keep_hint(&mut self, target: &NodeId, write: &LocalWrite) {
        if target != &self.me {
            let key = (write.bucket.as_str(), write.key.as_str());
            self.store_hint(target, key, &write.stored, write.durability);
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

    // ----- client requests -----

    fn replica_plan(&self, now: u64, bucket: &str, key: &str) -> ReplicaPlan {
        let partition = self.partition_of(bucket, key);
        ReplicaPlan::new(&self.cluster, partition, self.n_val(bucket), |node| {
            self.is_up(now, node)
        })
    }

    fn on_client(&mut self, now: u64, id: ClientRequestId, op: ClientOp) {
        match op {
            ClientOp::Get { bucket, key, r, pr } => {
                self.start_get(now, ReplyTo::Client(id), &bucket, &key, (r, pr));
            }
            ClientOp::SetBucketProps { bucket, props } => {
                let result = self.set_bucket_props(now, &bucket, props.as_ref());
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::Join { via } => self.join(now, id, via),
            ClientOp::ListKeys { bucket } => self.start_key_listing(now, id, bucket),
            ClientOp::ListBuckets => self.start_bucket_listing(now, id),
            ClientOp::Leave => {
                let result = match self.leave() {
                    Ok(()) => ClientResult::Done,
                    Err(message) => ClientResult::Failed {
                        status: 400,
                        message,
                    },
                };
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::Put(op) => {
                let props = self.props(&op.bucket);
                let primaries = self.replica_plan(now, &op.bucket, &op.key).primaries;
                let forward = match PutForward::route(&primaries, &self.me, |n| self.is_up(now, n))
                {
                    PutRoute::Coordinate => {
                        self.coordinate_put(now, ReplyTo::Client(id), op);
                        return;
                    }
                    PutRoute::Forward(forward) => forward,
                };
                // As the server: W and PW resolved here against the preference list.
                let n = primaries.len() as u32;
                let body = PeerMessage::CoordinatePut {
                    bucket: op.bucket,
                    key: op.key,
                    context: op.context.as_ref().map(|c| {
                        let mut writer = Writer::default();
                        encode_clock(&mut writer, c);
                        writer.buf
                    }),
                    content: op.content,
                    w: op.w.map(|w| w.resolve(n, props.w)),
                    pw: op.pw.map(|pw| pw.resolve(n, props.pw)),
                    dw_given: op.dw_given,
                    precondition: op.precondition.into(),
                    now_ms: now,
                    ring_version: self.cluster.ring.version,
                };
                self.forward(now, id, forward, body);
            }
        }
    }

    /// `Cluster::set_bucket_props`: a new entry for `bucket` in the cluster state, newer than
    /// the one it replaces (last writer wins by timestamp when gossip merges).
    fn set_bucket_props(
        &mut self,
        now: u64,
        bucket: &str,
        props: Option<&BucketProps>,
    ) -> ClientResult {
        let exists = self.cluster.bucket_props.contains_key(bucket);
        if !exists && self.cluster.bucket_props.len() >= MAX_CUSTOM_BUCKETS {
            return ClientResult::Failed {
                status: 400,
                message: format!(
                    "at most {MAX_CUSTOM_BUCKETS} buckets may have their own properties"
                ),
            };
        }
        let timestamp_ms = self
            .cluster
            .bucket_props
            .get(bucket)
            .map_or(0, |e| e.timestamp_ms + 1)
            .max(now);
        let entry = BucketPropsEntry {
            timestamp_ms,
            node: self.me.clone(),
            props_json: props.map(|p| p.to_json(bucket).to_string()),
        };
        self.cluster.bucket_props.insert(bucket.to_owned(), entry);
        ClientResult::Done
    }

    /// One page of this node's live keys of `bucket` after `start_after`, and where the next
    /// page starts.
    fn local_key_page(&mut self, bucket: &str, start_after: Option<&str>, limit: usize) -> KeyPage {
        let after = start_after.map(|k| keys::object_key(bucket.as_bytes(), k.as_bytes()));
        let limit = limit.clamp(1, LIST_PAGE_KEYS);
        let page = self.replica.list_keys_page(bucket, after.as_deref(), limit);
        let (keys, next) = self.must(page, "list keys");
        let next_after = next
            .as_deref()
            .and_then(keys::split_object_key)
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned());
        (keys, next_after)
    }

    /// The nodes of the current ring (a listing asks each).
    fn ring_nodes(&self) -> Vec<NodeId> {
        let nodes = self.cluster.ring.current.nodes();
        nodes.iter().map(|n| n.id.clone()).collect()
    }

    fn start_key_listing(&mut self, now: u64, client: ClientRequestId, bucket: String) {
        let cursors = self
            .ring_nodes()
            .into_iter()
            .map(|node| ListCursor {
                node,
                buffer: VecDeque::new(),
                next_after: None,
                more: true,
                fetching: false,
                failed: false,
            })
            .collect();
        let listing = self.next_listing;
        self.next_listing += 1;
        let run = KeyListing {
            client,
            bucket,
            cursors,
            out: Vec::new(),
        };
        self.key_listings.insert(listing, run);
        self.advance_key_listing(now, listing);
    }

    /// Ask `cursor`'s node for its next page (this node's own pages are read at once).
    fn fetch_key_page(&mut self, now: u64, listing: u64, cursor: usize) {
        let Some(run) = self.key_listings.get_mut(&listing) else {
            return;
        };
        let c = &mut run.cursors[cursor];
        c.fetching = true;
        let (node, bucket, after) = (c.node.clone(), run.bucket.clone(), c.next_after.clone());
        if node == self.me {
            let page = self.local_key_page(&bucket, after.as_deref(), LIST_PAGE_KEYS);
            self.on_key_page_only(listing, cursor, Some(page));
            return;
        }
        let body = PeerMessage::ListKeys {
            bucket,
            start_after: after,
            limit: LIST_PAGE_KEYS as u32,
        };
        let timeout = self.config.timings.request_ms * 5;
        let purpose = Purpose::KeyPage { listing, cursor };
        self.send_request(now, &node, body, purpose, timeout);
    }

    fn on_key_page(&mut self, now: u64, listing: u64, cursor: usize, page: Option<KeyPage>) {
        self.on_key_page_only(listing, cursor, page);
        self.advance_key_listing(now, listing);
    }

    /// Fill `cursor` from its page, or leave its node out when it did not answer.
    fn on_key_page_only(&mut self, listing: u64, cursor: usize, page: Option<KeyPage>) {
        let Some(run) = self.key_listings.get_mut(&listing) else {
            return;
        };
        let c = &mut run.cursors[cursor];
        c.fetching = false;
        if let Some((keys, next_after)) = page {
            c.buffer.extend(keys);
            c.more = next_after.is_some();
            c.next_after = next_after;
        } else {
            c.failed = true;
            c.more = false;
            c.buffer.clear();
        }
    }

    /// Merge as far as every node's page allows; fetch the pages that ran out; answer pages
    /// of `LIST_PAGE_KEYS` keys, and the last one when every node is exhausted.
    fn advance_key_listing(&mut self, now: u64, listing: u64) {
        loop {
            let Some(run) = self.key_listings.get_mut(&listing) else {
                return;
            };
            let empty: Vec<usize> = (0..run.cursors.len())
                .filter(|&i| {
                    let c = &run.cursors[i];
                    c.buffer.is_empty() && c.more && !c.fetching
                })
                .collect();
            if !empty.is_empty() {
                for cursor in empty {
                    self.fetch_key_page(now, listing, cursor);
                }
                continue; // local pages are in; remote ones come back as inputs
            }
            if run.cursors.iter().any(|c| c.fetching) {
                return;
            }
            if run.cursors.iter().all(|c| c.failed) {
                let client = run.client;
                self.key_listings.remove(&listing);
                let message = "key listing: no node answered".to_owned();
                let result = ClientResult::unavailable(message);
                self.outputs.push(Output::Reply { id: client, result });
                return;
            }
            let Some(smallest) = run
                .cursors
                .iter()
                .filter_map(|c| c.buffer.front())
                .min()
                .cloned()
            else {
                let (client, keys) = (run.client, std::mem::take(&mut run.out));
                self.key_listings.remove(&listing);
                let result = ClientResult::Keys { keys, last: true };
                self.outputs.push(Output::Reply { id: client, result });
                return;
            };
            for c in &mut run.cursors {
                if c.buffer.front() == Some(&smallest) {
                    c.buffer.pop_front();
                }
            }
            run.out.push(smallest);
            if run.out.len() >= LIST_PAGE_KEYS {
                let (client, keys) = (run.client, std::mem::take(&mut run.out));
                let result = ClientResult::Keys { keys, last: false };
                self.outputs.push(Output::Reply { id: client, result });
            }
        }
    }

    fn start_bucket_listing(&mut self, now: u64, client: ClientRequestId) {
        let nodes = self.ring_nodes();
        let listing = self.next_listing;
        self.next_listing += 1;
        self.bucket_listings.insert(
            listing,
            BucketListing {
                client,
                waiting: nodes.len(),
                answered: 0,
                buckets: BTreeSet::new(),
            },
        );
        let timeout = self.config.timings.request_ms * 5;
        for node in nodes {
            if node == self.me {
                let buckets = self.replica.list_buckets();
                let buckets = self.must(buckets, "list buckets");
                self.on_buckets(listing, Some(buckets));
            } else {
                let purpose = Purpose::Buckets { listing };
                self.send_request(now, &node, PeerMessage::ListBuckets, purpose, timeout);
            }
        }
    }

    /// One node's buckets (or its silence: left out); answer once every node is in.
    fn on_buckets(&mut self, listing: u64, buckets: Option<Vec<String>>) {
        let Some(run) = self.bucket_listings.get_mut(&listing) else {
            return;
        };
        run.waiting -= 1;
        if let Some(buckets) = buckets {
            run.answered += 1;
            run.buckets.extend(buckets);
        }
        if run.waiting > 0 {
            return;
        }
        let Some(run) = self.bucket_listings.remove(&listing) else {
            return;
        };
        let result = if run.answered == 0 {
            ClientResult::unavailable("bucket listing: no node answered".into())
        } else {
            ClientResult::Buckets(run.buckets.into_iter().collect())
        };
        self.outputs.push(Output::Reply {
            id: run.client,
            result,
        });
    }

    /// `Cluster::join`: a node alone in its cluster and holding no data asks `via` once.
    fn join(&mut self, now: u64, id: ClientRequestId, via: NodeId) {
        let refuse = |message: &str| ClientResult::Failed {
            status: 400,
            message: message.to_owned(),
        };
        let result = if self.cluster.members.len() > 1 {
            Some(refuse(
                "this node is already part of a cluster with other members",
            ))
        } else if self.join_pending || self.join_client.is_some() {
            Some(refuse("a join is already in progress"))
        } else {
            let first = self.replica.scan_objects(None, 1);
            let holds_data = !self.must(first, "scan objects").is_empty();
            holds_data
                .then(|| refuse("this node holds data; only an empty node can join a cluster"))
        };
        if let Some(result) = result {
            self.outputs.push(Output::Reply { id, result });
            return;
        }
        self.join_via = vec![via];
        self.join_attempts = 0;
        self.join_client = Some(id);
        self.send_join(now);
    }

    /// Forward a put to the next candidate primary (the core's `PutForward`), or answer the
    /// client when every one was tried.
    fn forward(
        &mut self,
        now: u64,
        client: ClientRequestId,
        mut forward: PutForward,
        body: PeerMessage,
    ) {
        let Some(to) = forward.next_candidate() else {
            let message = format!("no coordinator: {}", forward.last_error());
            self.outputs.push(Output::Reply {
                id: client,
                result: ClientResult::unavailable(message),
            });
            return;
        };
        let purpose = Purpose::Forward {
            client,
            forward,
            body: Box::new(body.clone()),
        };
        let timeout = self.config.timings.forward_ms;
        self.send_request(now, &to, body, purpose, timeout);
    }

    fn start_get(
        &mut self,
        now: u64,
        reply: ReplyTo,
        bucket: &str,
        key: &str,
        (r, pr): (Option<Quorum>, Option<Quorum>),
    ) {
        let props = self.props(bucket);
        let plan = self.replica_plan(now, bucket, key);
        let n = plan.primaries.len() as u32;
        let needed = r.unwrap_or(Quorum::Default).resolve(n, props.r).min(n) as usize;
        let needed_primaries = pr.unwrap_or(Quorum::Default).resolve(n, props.pr).min(n) as usize;
        let (coordinator, fetches) = match GetCoordinator::start(&plan, needed, needed_primaries) {
            Ok(started) => started,
            Err(e) => {
                let message = format!("quorum not met: {e}");
                self.answer(reply, ClientResult::unavailable(message));
                return;
            }
        };
        let coord = self.next_coord;
        self.next_coord += 1;
        self.gets.insert(
            coord,
            GetCoord {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                coordinator,
                reply: Some(reply),
            },
        );
        for slot in fetches {
            if slot.node == self.me {
                let local = self.local_with_hint(bucket, key, slot.stands_in_for.as_ref());
                self.on_get_reply(now, coord, &slot.node, local);
            } else {
                let body = self.replica_get(bucket, key, slot.stands_in_for.as_ref());
                let timeout = self.config.timings.request_ms;
                self.send_request(now, &slot.node, body, Purpose::GetFetch { coord }, timeout);
            }
        }
    }

    fn on_get_reply(
        &mut self,
        now: u64,
        coord: u64,
        from: &NodeId,
        reply: Result<Option<Object>, ()>,
    ) {
        let Some(mut get) = self.gets.remove(&coord) else {
            return;
        };
        let steps = get.coordinator.on_reply(from, reply);
        let (bucket, key) = (get.bucket.clone(), get.key.clone());
        let mut to = None;
        if steps.iter().any(|s| matches!(s, GetStep::Answer(_))) {
            to = get.reply.take();
        }
        if !get.coordinator.finished() {
            self.gets.insert(coord, get);
        }
        for step in steps {
            match step {
                GetStep::Answer(result) => {
                    if let Some(to) = to.take() {
                        let result = match result {
                            Ok(object) => ClientResult::Got(object),
                            Err(e) => ClientResult::unavailable(format!("quorum not met: {e}")),
                        };
                        self.answer(to, result);
                    }
                }
                GetStep::Repair { merged, targets } => {
                    for node in targets {
                        if self.failed.is_some() {
                            return;
                        }
                        self.stats.read_repairs += 1;
                        self.store_replica(now, &node, &bucket, &key, &merged);
                    }
                }
            }
        }
    }

    /// `Cluster::store_replica` without waiting for the outcome.
    fn store_replica(&mut self, now: u64, node: &NodeId, bucket: &str, key: &str, object: &Object) {
        if node == &self.me {
            self.merge_local(bucket, key, object);
            if self.config.handoff_checks_ring {
                // A read repair planned under an older ring may land after this node's
                // cleanup.
                self.check_orphan(bucket, key);
            }
        } else {
            let durability = self.props(bucket).durability;
            let body = self.replica_put(bucket, key, object, durability);
            let timeout = self.config.timings.request_ms;
            self.send_request(now, node, body, Purpose::Store, timeout);
        }
    }

    fn answer(&mut self, to: ReplyTo, result: ClientResult) {
        match to {
            ReplyTo::Client(id) => self.outputs.push(Output::Reply { id, result }),
            ReplyTo::Peer(peer, id) => {
                let body = match result {
                    ClientResult::Put(object) | ClientResult::Got(object) => {
                        PeerMessage::Coordinated {
                            object: object.encode(),
                        }
                    }
                    ClientResult::Failed { status, message } => {
                        PeerMessage::Failed { status, message }
                    }
                    // Only puts are coordinated for a peer.
                    ClientResult::Done | ClientResult::Keys { .. } | ClientResult::Buckets(_) => {
                        PeerMessage::Ack
                    }
                };
                self.respond(&peer, id, body);
            }
        }
    }

    /// `Cluster::coordinate_put`: store locally, replicate, and re-plan once when the quorum
    /// failed and the ring version changed meanwhile.
    fn coordinate_put(&mut self, now: u64, reply: ReplyTo, op: PutOp) {
        let props = self.props(&op.bucket);
        let plan = self.replica_plan(now, &op.bucket, &op.key);
        let n = plan.primaries.len() as u32;
        let w = op.w.unwrap_or(Quorum::Default).resolve(n, props.w).min(n) as usize;
        let pw = op.pw.unwrap_or(Quorum::Default).resolve(n, props.pw).min(n) as usize;
        let durability = if op.dw_given {
            StoreDurability::Fsync
        } else {
            props.durability
        };
        let (bucket, key) = (op.bucket.clone(), op.key.clone());
        let stored = match self.write_local(now, op, &props, StoreDurability::Buffered) {
            Ok(stored) => stored,
            Err(result) => {
                self.answer(reply, result);
                return;
            }
        };
        let planned_at = Some(self.cluster.ring.version);
        let write = LocalWrite {
            bucket,
            key,
            stored,
            w,
            pw,
            durability,
        };
        if durability == StoreDurability::Fsync {
            // As the server: the coordinator's own copy is durable before it is sent on.
            let action = AfterSync::Replicate {
                reply,
                write,
                plan,
                planned_at,
            };
            self.after_sync(action);
        } else {
            self.replicate(now, reply, write, plan, planned_at);
        }
    }

    /// `Cluster::replicate`: the core `PutCoordinator` plans the sends (the plan's slots and
    /// the next preference list), the hints and the answer (W of the current slots and W of
    /// the next list); this node performs its steps.
    fn replicate(
        &mut self,
        now: u64,
        reply: ReplyTo,
        write: LocalWrite,
        plan: ReplicaPlan,
        planned_at: Option<u64>,
    ) {
        let policy = PutPolicy {
            w: write.w,
            pw: write.pw,
            buffered: write.durability == StoreDurability::Buffered,
        };
        let (coordinator, steps) = PutCoordinator::start(&self.me, plan, policy);
        let coord = self.next_coord;
        self.next_coord += 1;
        self.puts.insert(
            coord,
            PutCoord {
                write,
                coordinator,
                reply: Some(reply),
                planned_at,
            },
        );
        self.put_steps(now, coord, steps);
    }

    /// Perform a put coordinator's steps (answers and sends first, hints after, as the
    /// server's `PutRun` does); forget the put once every send came back.
    fn put_steps(&mut self, now: u64, coord: u64, mut steps: Vec<PutStep>) {
        let Some(put) = self.puts.get(&coord) else {
            return;
        };
        let write = put.write.clone();
        let finished = put.coordinator.finished();
        steps.sort_by_key(|step| matches!(step, PutStep::KeepHint { .. }));
        for step in steps {
            match step {
                PutStep::Send(send) => self.send_put(now, coord, send, &write),
                PutStep::KeepHint { target } => {
                    self.keep_hint(&target, &write);
                }
                PutStep::Answer(result) => {
                    self.put_done(now, coord, result.map_err(|e| e.to_string()));
                }
            }
        }
        if finished {
            self.puts.remove(&coord);
        }
    }

    /// The first replication round's outcome (`coordinate_put` after `replicate` returned):
    /// check for an orphan write, re-plan once when the quorum failed under a ring that has
    /// changed since, else answer.
    fn put_done(&mut self, now: u64, coord: u64, result: Result<(), String>) {
        let Some(put) = self.puts.get_mut(&coord) else {
            return;
        };
        let Some(to) = put.reply.take() else {
            return;
        };
        let (write, planned_at) = (put.write.clone(), put.planned_at);
        if planned_at.is_some() {
            self.check_orphan(&write.bucket, &write.key);
        }
        match result {
            Err(_) if planned_at.is_some_and(|v| v != self.cluster.ring.version) => {
                // The ring changed while the write was replicated (a replica answered
                // `StaleRing`): send the same stored version again under the new plan.
                self.stats.replans += 1;
                let plan = self.replica_plan(now, &write.bucket, &write.key);
                self.replicate(now, to, write, plan, None);
            }
            Ok(()) => self.answer(to, ClientResult::Put(write.stored)),
            Err(e) => self.answer(
                to,
                ClientResult::unavailable(format!("quorum not met: {e}")),
            ),
        }
    }

    /// `Cluster::check_orphan`: a write stored here for a key this node no longer replicates
    /// (settled ring) asks for another cleanup.
    fn check_orphan(&mut self, bucket: &str, key: &str) {
        let partition = self.partition_of(bucket, key);
        let n_val = self.n_val(bucket);
        self.cleanup_marker
            .on_stored(&self.cluster, &self.me, partition, n_val);
    }

    fn send_put(&mut self, now: u64, coord: u64, send: PutSend, write: &LocalWrite) {
        let (bucket, key, object) = (&write.bucket, &write.key, &write.stored);
        let body = match &send.stands_in_for {
            None => {
                let durability = if send.fsync {
                    StoreDurability::Fsync
                } else {
                    write.durability
                };
                self.replica_put(bucket, key, object, durability)
            }
            Some(primary) => PeerMessage::HintedPut {
                target: primary.0.clone(),
                bucket: bucket.clone(),
                key: key.clone(),
                object: object.encode(),
                durability: write.durability,
                ring_version: self.cluster.ring.version,
            },
        };
        let node = send.node.clone();
        let timeout = self.config.timings.request_ms;
        self.send_request(now, &node, body, Purpose::PutSend { coord, send }, timeout);
    }

    fn on_put_reply(&mut self, now: u64, coord: u64, send: &PutSend, ok: bool) {
        let Some(put) = self.puts.get_mut(&coord) else {
            return;
        };
        let steps = put.coordinator.on_reply(send, ok);
        self.put_steps(now, coord, steps);
    }

    // ----- peer requests -----

    fn on_request(&mut self, now: u64, from: &NodeId, id: RequestId, body: PeerMessage) {
        if serve::storage_call(&body).is_some() {
            self.serve_peer(from, id, body);
            return;
        }
        match body {
            PeerMessage::CoordinatePut {
                bucket,
                key,
                context,
                content,
                w,
                pw,
                dw_given,
                precondition,
                now_ms,
                ring_version: _,
            } => {
                // As the server (the core's rule): a forwarded put that arrives after its
                // forwarder gave up is refused, not applied with a context that is stale by
                // now; so is one for a key this node does not replicate.
                let is_primary = self.primaries(&bucket, &key).contains(&self.me);
                // The forwarder's clock converted to this node's (as the server does).
                let offset = self.clock_offsets.get(from).copied().unwrap_or(0);
                let sent_ms = now_ms.saturating_add_signed(offset.saturating_neg());
                let waited_ms = if self.config.retry_unanswered_forward {
                    0
                } else {
                    now.saturating_sub(sent_ms)
                };
                let request_ms = self.config.timings.request_ms;
                if let Some(refusal) = refuse_forwarded(waited_ms, request_ms, is_primary) {
                    if waited_ms > request_ms {
                        self.stats.late_forwards_refused += 1;
                    }
                    self.respond(from, id, refusal);
                    return;
                }
                let context = match context.map(|bytes| decode_clock(&mut Reader::new(&bytes))) {
                    None => None,
                    Some(Ok(clock)) => Some(clock),
                    Some(Err(e)) => {
                        self.respond(from, id, PeerMessage::Error(e.to_string()));
                        return;
                    }
                };
                // The write is stamped with this node's clock.
                let op = PutOp {
                    bucket,
                    key,
                    context,
                    content,
                    w: w.map(Quorum::Count),
                    pw: pw.map(Quorum::Count),
                    dw_given,
                    precondition: precondition.into(),
                };
                self.coordinate_put(now, ReplyTo::Peer(from.clone(), id), op);
            }
            PeerMessage::ListKeys {
                bucket,
                start_after,
                limit,
            } => {
                let (keys, next_after) =
                    self.local_key_page(&bucket, start_after.as_deref(), limit as usize);
                self.respond(from, id, PeerMessage::KeyPage { keys, next_after });
            }
            PeerMessage::ListBuckets => {
                let buckets = self.replica.list_buckets();
                let buckets = self.must(buckets, "list buckets");
                self.respond(from, id, PeerMessage::Buckets(buckets));
            }
            PeerMessage::Gossip(theirs) => {
                if theirs.cluster_name != self.cluster.cluster_name {
                    let error = PeerMessage::Error("gossip from another cluster".into());
                    self.respond(from, id, error);
                    return;
                }
                self.merge_state(now, &theirs);
                let ours = Box::new(self.cluster.clone());
                self.respond(from, id, PeerMessage::Gossip(ours));
            }
            PeerMessage::JoinRequest {
                cluster_name,
                member,
            } => {
                if cluster_name != self.cluster.cluster_name {
                    let error = PeerMessage::Error("cluster name mismatch".into());
                    self.respond(from, id, error);
                    return;
                }
                let body = match self.cluster.add_joining(member) {
                    Ok(()) => PeerMessage::JoinAccepted {
                        state: Box::new(self.cluster.clone()),
                        // Contexts between `Node`s are not authenticated (the server's HTTP
                        // layer signs them with the cluster secret).
                        secret: [0; 32],
                    },
                    Err(e) => PeerMessage::Error(e.to_string()),
                };
                self.respond(from, id, body);
            }
            other => {
                let error = PeerMessage::Error(format!("unexpected request {}", other.name()));
                self.respond(from, id, error);
            }
        }
    }

    fn replica_get(&self, bucket: &str, key: &str, hinted_for: Option<&NodeId>) -> PeerMessage {
        PeerMessage::ReplicaGet {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            ring_version: self.cluster.ring.version,
            hinted_for: hinted_for.map(|n| n.0.clone()),
        }
    }

    fn replica_put(
        &self,
        bucket: &str,
        key: &str,
        object: &Object,
        durability: StoreDurability,
    ) -> PeerMessage {
        PeerMessage::ReplicaPut {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            object: object.encode(),
            durability,
            ring_version: self.cluster.ring.version,
        }
    }

    /// A replica-side request, answered by the core's `serve` (the server's peer handler
    /// calls the same function), then what the answer asks of the node: hint counts, stale
    /// ring refusals, and the stored keys' orphan check.
    fn serve_peer(&mut self, from: &NodeId, id: RequestId, message: PeerMessage) {
        let (body, durable) = self.serve_here(message);
        if durable {
            // A durable replica write or handoff batch is acknowledged once it is on disk.
            let to = from.clone();
            self.after_sync(AfterSync::Respond { to, id, body });
        } else {
            self.respond(from, id, body);
        }
    }

    /// [`Node::serve_peer`]'s work: the reply to send, and whether it may only be sent once
    /// the writes are durable (a write that asked for `Fsync` is made buffered here and waits
    /// for a sync instead).
    fn serve_here(&mut self, mut message: PeerMessage) -> (PeerMessage, bool) {
        let handoff = matches!(message, PeerMessage::Handoff { .. });
        let mut durable = false;
        if let Some(asked) = message.durability_mut()
            && *asked == StoreDurability::Fsync
        {
            *asked = StoreDurability::Buffered;
            durable = true;
        }
        let context = ServeContext {
            // The old rule: a handoff is merged whatever the sender's ring.
            ring_version: if handoff && !self.config.handoff_checks_ring {
                0
            } else {
                self.cluster.ring.version
            },
            props: serve::buckets_named(&message)
                .into_iter()
                .map(|bucket| (bucket.to_owned(), self.props(bucket)))
                .collect(),
            hint_limit: MAX_HINTS_PER_TARGET,
            max_leaf_keys: MAX_AAE_KEYS_PER_EXCHANGE,
            aae_budget: u32::try_from(self.aae_budget).unwrap_or(u32::MAX),
            defer_sync: true,
        };
        let served = match serve::serve(&self.replica, &self.aae, &context, message) {
            Ok(served) => served,
            // The node's own storage failed: it stops (nothing is answered).
            Err(e @ (ServeError::Storage(_) | ServeError::Replica(ReplicaError::Storage(_)))) => {
                self.must(Err::<(), _>(e), "serve a peer request");
                return (PeerMessage::Error("storage failed".into()), false);
            }
            // The sender's message (or a corrupt stored object) is refused.
            Err(e) => return (PeerMessage::Error(e.to_string()), false),
        };
        let durable = durable || served.needs_sync;
        if durable {
            self.request_sync();
        }
        match served.hint {
            Some(HintOutcome::Stored) => self.stats.hints_stored += 1,
            Some(HintOutcome::Dropped) => self.stats.hints_dropped += 1,
            None => {}
        }
        if served.reaped {
            self.stats.tombstones_reaped += 1;
        }
        for (bucket, key) in &served.stored {
            if let Ok(Some(merged)) = self.read(bucket, key)
                && self.planted_bug(bucket, key, &merged).is_none()
            {
                self.note_stored(&merged);
            }
        }
        if !handoff || self.config.handoff_checks_ring {
            for (bucket, key) in &served.stored {
                self.check_orphan(bucket, key);
            }
        }
        match served.reply {
            Reply::Message(message) => (message, durable),
            Reply::StaleRing => {
                self.stats.stale_ring_refusals += 1;
                (
                    PeerMessage::StaleRing(Box::new(self.cluster.clone())),
                    false,
                )
            }
        }
    }

    fn on_response(
        &mut self,
        now: u64,
        id: RequestId,
        pending: Pending,
        body: Option<PeerMessage>,
    ) {
        let from = pending.to;
        if let Some(PeerMessage::StaleRing(state)) = &body {
            // `store_replica`/`store_hinted`: catch up with the refusing replica's ring.
            self.merge_state(now, state);
        }
        match pending.purpose {
            Purpose::GetFetch { coord } => {
                let reply = match body {
                    Some(PeerMessage::ReplicaObject { object }) => object
                        .map(|b| Object::decode(&b))
                        .transpose()
                        .map_err(|_| ()),
                    _ => Err(()),
                };
                self.on_get_reply(now, coord, &from, reply);
            }
            Purpose::PutSend { coord, send } => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                self.on_put_reply(now, coord, &send, ok);
            }
            Purpose::Store => {}
            Purpose::Gossip => {
                if let Some(PeerMessage::Gossip(theirs)) = body {
                    self.merge_state(now, &theirs);
                }
            }
            Purpose::Forward {
                client,
                mut forward,
                body: request,
            } => match body {
                Some(reply) => match forward_reply(&from, reply) {
                    ForwardReply::Coordinated(object) => {
                        let result = match Object::decode(&object) {
                            Ok(object) => ClientResult::Put(object),
                            Err(e) => ClientResult::Failed {
                                status: 500,
                                message: format!("{from}: {e}"),
                            },
                        };
                        self.outputs.push(Output::Reply { id: client, result });
                    }
                    // A refusal that proves it did not coordinate: try the next.
                    ForwardReply::Refused(error) => {
                        forward.failed(ForwardFailure::NotAReplica, error);
                        self.forward(now, client, forward, *request);
                    }
                    ForwardReply::Failed { status, message } => self.outputs.push(Output::Reply {
                        id: client,
                        result: ClientResult::Failed { status, message },
                    }),
                },
                // Timed out: the candidate may have coordinated it, so stop; the client's
                // outcome is indeterminate.
                None if self.unsent == Some(id) => {
                    forward.failed(ForwardFailure::NotSent, format!("{from}: unreachable"));
                    self.forward(now, client, forward, *request);
                }
                None => {
                    let error = format!("{from}: no answer; the write may have been applied");
                    let failure = if self.config.retry_unanswered_forward {
                        ForwardFailure::NotSent
                    } else {
                        ForwardFailure::Unanswered
                    };
                    forward.failed(failure, error);
                    self.forward(now, client, forward, *request);
                }
            },
            Purpose::Join => {
                self.join_pending = false;
                let client = self.join_client.take();
                let result = match body {
                    Some(PeerMessage::JoinAccepted { state, .. }) if !self.join_via.is_empty() => {
                        // Adopt the cluster's state wholesale.
                        self.cluster = *state;
                        self.join_via.clear();
                        ClientResult::Done
                    }
                    Some(PeerMessage::Error(message)) => ClientResult::Failed {
                        status: 400,
                        message: format!("{from} refused the join: {message}"),
                    },
                    _ => ClientResult::unavailable(format!("{from} did not admit this node")),
                };
                if let Some(id) = client {
                    // Asked by a client: one attempt, answered (the constructor's join retries).
                    if !matches!(result, ClientResult::Done) {
                        self.join_via.clear();
                    }
                    self.outputs.push(Output::Reply { id, result });
                }
            }
            Purpose::KeyPage { listing, cursor } => {
                let page = match body {
                    Some(PeerMessage::KeyPage { keys, next_after }) => Some((keys, next_after)),
                    _ => None,
                };
                self.on_key_page(now, listing, cursor, page);
            }
            Purpose::Buckets { listing } => {
                let buckets = match body {
                    Some(PeerMessage::Buckets(buckets)) => Some(buckets),
                    _ => None,
                };
                self.on_buckets(listing, buckets);
            }
            Purpose::CleanupHandoff { keys } => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                self.on_cleanup_handoff(&keys, ok);
            }
            Purpose::TransitionHandoff => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                if let Some(mut handoff) = self.handoff.take() {
                    handoff.on_reply(ok);
                    self.finish_handoff(handoff);
                }
            }
            Purpose::HintDelivery { target, hints } => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                self.on_hint_reply(&target, &hints, ok);
            }
            Purpose::Aae => self.on_aae_response(now, id, &from, body),
            Purpose::ReapCheck { reap } => {
                let answer = match body {
                    Some(PeerMessage::ReapState { object, hinted }) => {
                        match object.map(|b| Object::decode(&b)).transpose() {
                            Ok(stored) => Some(ReapAnswer {
                                stored,
                                // The old rule looked at the primaries' copies only.
                                hinted: hinted && !self.config.primaries_only_reap,
                            }),
                            Err(_) => None,
                        }
                    }
                    _ => None,
                };
                let verdict = self
                    .reaps
                    .get_mut(&reap)
                    .and_then(|run| run.check.on_reply(&from, answer));
                if let Some(verdict) = verdict {
                    self.finish_reap(now, reap, verdict);
                }
            }
        }
    }

    // ----- timers -----

    fn on_timer(&mut self, now: u64, timer: Timer) {
        match timer {
            Timer::RequestTimeout(id) => {
                if let Some(pending) = self.pending.get(&id) {
                    let to = pending.to.clone();
                    self.on_timeout_of(now, &to);
                    self.fail_request(now, id);
                }
            }
            Timer::Gossip => {
                self.gossip_round(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.gossip_interval_ms,
                    timer: Timer::Gossip,
                });
            }
            Timer::Hints => {
                self.deliver_hints(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.hint_interval_ms,
                    timer: Timer::Hints,
                });
            }
            Timer::Aae => {
                self.anti_entropy_round(now);
                // The server reaps tombstones in its anti-entropy loop too.
                self.reap_round(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.aae_interval_ms,
                    timer: Timer::Aae,
                });
            }
            Timer::Flush => {
                self.flush();
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.flush_interval_ms,
                    timer: Timer::Flush,
                });
            }
        }
    }

    fn merge_state(&mut self, now: u64, theirs: &ClusterState) {
        self.failure_detector.observe_state(theirs, now);
        self.cluster.merge(theirs);
    }

    /// The server's one-second background loop: `gossip_round` (beat, exchange with a member
    /// that has not exited, plan when claimant), then `handoff_round` and `cleanup_round`.
    /// The claimant plans on the state merged so far (the server plans after this round's
    /// exchange: the plan here sees that exchange one round later).
    fn gossip_round(&mut self, now: u64) {
        if !self.joined() {
            self.send_join(now);
        }
        let me = self.me.clone();
        self.cluster.beat(&me);
        if self.cluster.claimant() == Some(&me) {
            self.cluster.plan();
        }
        self.handoff_round(now);
        self.cleanup_round(now);
        let rng = &mut self.rng;
        let Some(peer) = self.cluster.gossip_peer(&self.me, |n| rng.index(n)) else {
            return;
        };
        let body = PeerMessage::Gossip(Box::new(self.cluster.clone()));
        let timeout = self.config.timings.gossip_interval_ms;
        self.send_request(now, &peer, body, Purpose::Gossip, timeout);
    }

    /// `Cluster::join`: ask a member (in turn) to admit this node.
    fn send_join(&mut self, now: u64) {
        if self.join_pending || self.join_via.is_empty() {
            return;
        }
        let via = self.join_via[self.join_attempts % self.join_via.len()].clone();
        self.join_attempts += 1;
        let mut member = self
            .cluster
            .member(&self.me)
            .cloned()
            .unwrap_or_else(|| member_entry(&self.me));
        member.status = MemberStatus::Joining;
        let body = PeerMessage::JoinRequest {
            cluster_name: self.cluster.cluster_name.clone(),
            member,
        };
        self.join_pending = true;
        let timeout = self.config.timings.request_ms;
        self.send_request(now, &via, body, Purpose::Join, timeout);
    }

    /// `Cluster::handoff_round`: during a transition every stored key goes to the nodes
    /// entering its preference list (the core's `TransitionHandoff` and `Batches`); the
    /// handoff is marked done once every batch is acknowledged. (The server sends the batches
    /// one after another and stops at the first failure; here they go out together and any
    /// failure leaves the handoff for the next round.)
    fn handoff_round(&mut self, now: u64) {
        if self.handoff.is_some() {
            return;
        }
        let Some(mut handoff) = TransitionHandoff::start(&self.cluster, &self.me) else {
            return;
        };
        let pages = self.scan_all();
        if self.failed.is_some() {
            return; // never mark a handoff done from a failed scan
        }
        let mut batches = Batches::new(HANDOFF_BATCH_KEYS, usize::MAX);
        let mut sends = Vec::new();
        for page in pages {
            sends.extend(TransitionHandoff::batch_page(
                &self.cluster,
                &self.me,
                &mut batches,
                page,
                |bucket| self.n_val(bucket),
            ));
        }
        sends.extend(batches.drain());
        for (node, entries) in sends {
            self.stats.handoff_keys += entries.len() as u64;
            handoff.on_sent(entries.len());
            let purpose = Purpose::TransitionHandoff;
            let timeout = self.config.timings.request_ms * 5;
            self.send_handoff(now, &node, entries, purpose, timeout);
        }
        handoff.on_scanned();
        self.finish_handoff(handoff);
    }

    /// Keep the handoff while batches are outstanding; once all came back, mark it done if it
    /// completed (else the next round starts over).
    fn finish_handoff(&mut self, handoff: TransitionHandoff) {
        if handoff.verdict().is_none() {
            self.handoff = Some(handoff);
            return;
        }
        let me = self.me.clone();
        handoff.finish(&mut self.cluster, &me);
    }

    /// `Cluster::cleanup_round`: once the ring is settled, every key this node no longer
    /// replicates is sent to its primaries (a write that landed here after the transition's
    /// handoff may exist nowhere else) and dropped once all of them acknowledged, if
    /// unchanged (the core's `Cleanup`); otherwise a later round runs another pass.
    fn cleanup_round(&mut self, now: u64) {
        if self.cleanup.is_some() {
            return;
        }
        let Some(mut cleanup) = Cleanup::start(&self.cluster, &self.cleanup_marker) else {
            return;
        };
        let pages = self.scan_all();
        if self.failed.is_some() {
            return;
        }
        let mut sends = Vec::new();
        for page in pages {
            let n_val = |bucket: &str| self.n_val(bucket);
            sends.extend(cleanup.add_page(&self.cluster, &self.me, page, n_val));
        }
        let timeout = self.config.timings.request_ms;
        for (node, batch) in sends {
            let (keys, entries): (Vec<Vec<u8>>, Vec<HandoffEntry>) = batch.into_iter().unzip();
            let purpose = Purpose::CleanupHandoff { keys };
            self.send_handoff(now, &node, entries, purpose, timeout);
        }
        self.finish_cleanup(cleanup);
    }

    /// One `Handoff` batch under this node's ring version.
    fn send_handoff(
        &mut self,
        now: u64,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
        purpose: Purpose,
        timeout_ms: u64,
    ) {
        let body = PeerMessage::Handoff {
            entries,
            ring_version: self.cluster.ring.version,
        };
        self.send_request(now, node, body, purpose, timeout_ms);
    }

    fn on_cleanup_handoff(&mut self, keys: &[Vec<u8>], ok: bool) {
        let Some(mut cleanup) = self.cleanup.take() else {
            return;
        };
        for (storage_key, hash) in cleanup.on_batch(keys, ok) {
            if self.remove_stored_if_unchanged(&storage_key, &hash, false) {
                self.stats.cleanup_dropped += 1;
            } else {
                cleanup.kept_changed();
            }
        }
        self.finish_cleanup(cleanup);
    }

    /// Keep the pass while keys wait for acknowledgements; once settled, sync and record it.
    fn finish_cleanup(&mut self, cleanup: Cleanup<Vec<u8>, Hash>) {
        if !cleanup.settled() {
            self.cleanup = Some(cleanup);
            return;
        }
        // Recorded once the drops are durable (a power loss before would bring the dropped
        // keys back with the pass recorded as done).
        self.after_sync(AfterSync::RecordCleanup(cleanup));
    }

    /// A destination answered for hints of `target`: delete the released ones if unchanged.
    fn on_hint_reply(&mut self, target: &NodeId, hints: &[Vec<u8>], ok: bool) {
        let Some(round) = self.hint_rounds.get_mut(target) else {
            return;
        };
        let released = round.on_reply(hints, ok);
        if round.settled() {
            self.hint_rounds.remove(target);
        }
        for (hint_key, held) in released {
            let deleted = self.replica.delete_hint_if_unchanged(&hint_key, &held);
            if self.must(deleted, "delete a hint") {
                self.stats.hints_delivered += 1;
            }
        }
    }

    /// `Cluster::deliver_hints`: one batch per target per round (the core's `HintRound`), to
    /// a target that is up; a hint whose target no longer replicates its key (or has exited)
    /// goes to the key's current replicas instead.
    fn deliver_hints(&mut self, now: u64) {
        let targets: BTreeSet<NodeId> = self
            .replica
            .hint_counts()
            .into_iter()
            .map(|(t, _)| NodeId(t))
            .collect();
        for target in targets {
            if self.hint_rounds.contains_key(&target) {
                continue; // the previous round's deliveries are still out
            }
            let up = self.is_up(now, &target);
            let Some(mut round) = HintRound::start(&self.cluster, &target, up, HANDOFF_BATCH_KEYS)
            else {
                continue;
            };
            let page = self.replica.hint_page(&target.0, None, HANDOFF_BATCH_KEYS);
            let page = self.must(page, "read hints");
            if self.failed.is_some() {
                return;
            }
            // Routing (the core's, as in the server): one batch to the target, a
            // `ReplicaPut` per current replica of a key that moved.
            let routed = round.route_page(page, &self.cluster, |bucket| self.n_val(bucket));
            for (hint_key, bytes) in &routed.corrupt {
                let deleted = self.replica.delete_hint_if_unchanged(hint_key, bytes);
                if self.must(deleted, "delete a hint") {
                    self.stats.hints_corrupt += 1;
                }
            }
            self.hint_rounds.insert(target.clone(), round);
            for send in routed.sends {
                if send.to == self.me {
                    // A moved key this node now replicates: served here, as a peer's put.
                    // Its copy is written before the hint is deleted (one journal: a durable
                    // prefix that holds the deletion holds the copy), and a sync is asked for.
                    let (reply, _) = self.serve_here(send.message);
                    let ok = matches!(reply, PeerMessage::Ack);
                    self.on_hint_reply(&target, &send.hints, ok);
                } else {
                    let purpose = Purpose::HintDelivery {
                        target: target.clone(),
                        hints: send.hints,
                    };
                    let timeout = self.config.timings.request_ms;
                    self.send_request(now, &send.to, send.message, purpose, timeout);
                }
            }
            if self
                .hint_rounds
                .get(&target)
                .is_some_and(HintRound::settled)
            {
                self.hint_rounds.remove(&target);
            }
        }
    }

    // ----- anti-entropy -----

    /// `Cluster::anti_entropy_round`: each partition this node replicates is compared with
    /// one of its other replicas, in turn; partitions are exchanged one after another.
    /// `Cluster::reap_tombstones`: the tombstones this node is the first primary of, older
    /// than the grace period, are checked with every other member: each primary must hold
    /// exactly the same tombstone, and no member may hold a hint of the key or (outside the
    /// primaries) a copy of it. Only then is each primary asked to delete it (if unchanged),
    /// and this node does. Any member that does not answer blocks the reap.
    fn reap_round(&mut self, now: u64) {
        if self.cluster.ring.next.is_some() || !self.reaps.is_empty() {
            return;
        }
        let grace = self.config.tombstone_grace_ms;
        // Through the tombstone list, as the server reads it (the core's).
        let listed = reap_candidates(&self.replica, now, grace, MAX_REAPS_PER_ROUND);
        let listed = self.must(listed, "scan tombstones");
        let mut candidates = Vec::new();
        for (storage_key, bytes) in listed {
            let Some((bucket, key)) = keys::split_object_key(&storage_key) else {
                continue;
            };
            let decoded = Object::decode(&bytes);
            let object = self.must(decoded.map(Some), "decode a stored object");
            if let Some(object) = object {
                candidates.push((
                    String::from_utf8_lossy(bucket).into_owned(),
                    String::from_utf8_lossy(key).into_owned(),
                    object,
                ));
            }
        }
        if self.failed.is_some() {
            return;
        }
        for (bucket, key, object) in candidates {
            let partition = self.partition_of(&bucket, &key);
            let n_val = self.n_val(&bucket);
            let Some(primaries) = reaper_primaries(&self.cluster, &self.me, partition, n_val)
            else {
                continue;
            };
            let others: Vec<NodeId> = primaries
                .iter()
                .filter(|n| **n != self.me)
                .cloned()
                .collect();
            let (members, me_hinted): (Vec<(NodeId, bool)>, bool) =
                if self.config.primaries_only_reap {
                    (
                        primaries.iter().map(|n| (n.clone(), false)).collect(),
                        false,
                    )
                } else {
                    let hinted = self.replica.holds_hint(&bucket, &key);
                    let Some(hinted) = self.replica_call(hinted, "read hints") else {
                        if self.failed.is_some() {
                            return;
                        }
                        continue; // an unreadable hint: never reap past it
                    };
                    (reap_check_members(&self.cluster), hinted)
                };
            let (check, ask) = ReapCheck::start(&self.me, members, primaries, object, me_hinted);
            let reap = self.next_reap;
            self.next_reap += 1;
            self.reaps.insert(
                reap,
                ReapRun {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    others,
                    check,
                },
            );
            if let Some(verdict) = self.reaps.get(&reap).and_then(|r| r.check.verdict()) {
                self.finish_reap(now, reap, verdict);
                continue;
            }
            let timeout = self.config.timings.request_ms;
            for node in ask {
                let body = PeerMessage::ReapCheck {
                    bucket: bucket.clone(),
                    key: key.clone(),
                };
                self.send_request(now, &node, body, Purpose::ReapCheck { reap }, timeout);
            }
        }
    }

    /// The reap check's verdict: when clear, every other primary is asked to delete the
    /// tombstone if unchanged, and this node deletes its own.
    fn finish_reap(&mut self, now: u64, reap: u64, verdict: bool) {
        let Some(run) = self.reaps.remove(&reap) else {
            return;
        };
        if !verdict {
            return;
        }
        let object = run.check.tombstone().clone();
        let expected =
            merkle::entry_hash(run.bucket.as_bytes(), run.key.as_bytes(), &object.encode());
        let timeout = self.config.timings.request_ms;
        for node in &run.others {
            let body = PeerMessage::Reap {
                bucket: run.bucket.clone(),
                key: run.key.clone(),
                expected,
            };
            self.send_request(now, node, body, Purpose::Store, timeout);
        }
        if self.remove_if_unchanged(&run.bucket, &run.key, &expected, true) {
            self.stats.tombstones_reaped += 1;
        }
    }

    fn anti_entropy_round(&mut self, now: u64) {
        if self.aae_current.is_some() || self.aae_plan.is_some() {
            return; // the previous round is still running
        }
        self.aae_round += 1;
        let plan = AaeRound::plan(
            &self.cluster,
            &self.me,
            // One replica count for the exchange plan: the default bucket's (the server
            // plans with 3, its default).
            self.config.props.n_val,
            self.aae_round,
            self.aae_budget,
            |n| self.is_up(now, n),
        );
        self.aae_plan = Some(plan);
        self.next_exchange(now);
    }

    fn next_exchange(&mut self, now: u64) {
        self.aae_current = None;
        let Some(plan) = self.aae_plan.as_mut() else {
            return;
        };
        let Some((peer, exchange, ask)) = plan.next_exchange() else {
            self.aae_plan = None;
            return;
        };
        let request = self.send_aae_ask(now, &peer, exchange.partition(), ask);
        self.aae_current = Some(AaeRun {
            peer,
            exchange,
            asking: Some(request),
            fetching: BTreeMap::new(),
            failed: false,
        });
    }

    fn send_aae_ask(
        &mut self,
        now: u64,
        peer: &NodeId,
        partition: PartitionId,
        ask: AaeAsk,
    ) -> RequestId {
        let request_ms = self.config.timings.request_ms;
        let (body, timeout_ms) = match ask {
            AaeAsk::Segments => (PeerMessage::AaeSegments { partition }, request_ms),
            AaeAsk::Leaves(segments) => (
                PeerMessage::AaeLeaves {
                    partition,
                    segments,
                },
                request_ms,
            ),
            AaeAsk::Keys(leaves) => (PeerMessage::AaeKeys { partition, leaves }, request_ms * 5),
        };
        self.send_request(now, peer, body, Purpose::Aae, timeout_ms)
    }

    /// An answer (or failure) of a step of the current exchange, fed to the core's
    /// `AaeExchange` as `Cluster::exchange` feeds it.
    fn on_aae_response(
        &mut self,
        now: u64,
        id: RequestId,
        from: &NodeId,
        body: Option<PeerMessage>,
    ) {
        let Some(mut current) = self.aae_current.take() else {
            return;
        };
        if &current.peer != from
            || (current.asking != Some(id) && !current.fetching.contains_key(&id))
        {
            self.aae_current = Some(current);
            return;
        }
        let partition = current.exchange.partition();
        let peer = current.peer.clone();
        let step = if let Some(bucket_key) = current.fetching.remove(&id) {
            let (bucket, key) = bucket_key.clone();
            // A corrupt copy from the peer is skipped, like a failed fetch.
            let remote = match body {
                Some(PeerMessage::ReplicaObject { object }) => {
                    object.map(|b| Object::decode(&b)).transpose().ok()
                }
                _ => None,
            };
            // So is a local copy that cannot be read.
            let local = match remote {
                Some(_) => self.read(&bucket, &key).ok(),
                None => None,
            };
            match (remote, local) {
                (Some(remote), Some(local)) => {
                    if let Some(repair) =
                        current
                            .exchange
                            .on_versions(&bucket_key, local.as_ref(), remote.as_ref())
                    {
                        if repair.store_local {
                            self.merge_local(&bucket, &key, &repair.merged);
                        }
                        if repair.store_remote {
                            self.store_replica(now, &peer, &bucket, &key, &repair.merged);
                        }
                        if repair.repairs() && self.failed.is_none() {
                            self.stats.aae_repairs += 1;
                        }
                    }
                }
                _ => current.exchange.skip(&bucket_key),
            }
            if !current.exchange.compared_all() && !current.fetching.is_empty() {
                self.aae_current = Some(current);
                return;
            }
            current.exchange.finish()
        } else {
            current.asking = None;
            // The core's reading of the answer, as in the server; a failed step or an
            // unexpected answer ends this partition's exchange.
            let aae = Arc::clone(&self.aae);
            let answered = body.map(|answer| {
                current.exchange.on_answer(
                    &aae,
                    answer,
                    |leaves| {
                        aae.leaf_keys(partition, leaves, MAX_AAE_KEYS_PER_EXCHANGE)
                            .map(|(keys, _cut)| keys)
                    },
                    |(bucket, key)| {
                        let replicas = self.primaries(bucket, key);
                        replicas.contains(&self.me) && replicas.contains(&peer)
                    },
                )
            });
            if let Some(Ok(step)) = answered {
                step
            } else {
                current.failed = true;
                current.exchange.finish()
            }
        };
        match step {
            AaeStep::Ask(ask) => {
                current.asking = Some(self.send_aae_ask(now, &peer, partition, ask));
                self.aae_current = Some(current);
            }
            AaeStep::Compare(keys) => {
                let timeout = self.config.timings.request_ms;
                for key in keys {
                    let body = self.replica_get(&key.0, &key.1, None);
                    let request = self.send_request(now, &peer, body, Purpose::Aae, timeout);
                    current.fetching.insert(request, key);
                }
                self.aae_current = Some(current);
            }
            AaeStep::Done { repaired } => {
                if let Some(plan) = self.aae_plan.as_mut() {
                    plan.finished(repaired);
                }
                if !current.failed {
                    // As the server's records for `admin aae`: completed exchanges only.
                    let record = self.aae_records.entry(partition).or_default();
                    record.last_exchange_ms = Some(now);
                    record.last_peer = Some(peer.clone());
                    record.keys_repaired_last = repaired as u64;
                    record.keys_repaired_total += repaired as u64;
                    record.exchanges += 1;
                }
                self.next_exchange(now);
            }
        }
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
    }
}

/// A bucket's stored properties, parsed (`None` when the entry resets them or is unreadable:
/// the config's apply).
fn parse_props(bucket: &str, json: Option<&str>) -> Option<BucketProps> {
    let value = serde_json::from_str::<serde_json::Value>(json?).ok()?;
    BucketProps::from_stored(bucket, &value).ok()
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

/// An object with the given clock and siblings, built through the documented encoding (the
/// core offers no way to drop a sibling; only the planted bug needs one).
fn with_siblings(clock: &VersionVector, siblings: &[Sibling]) -> Option<Object> {
    let mut body = Writer::default();
    encode_clock(&mut body, clock);
    body.varint(siblings.len() as u64);
    for sibling in siblings {
        let c = &sibling.content;
        body.u64_fixed(sibling.dot.actor.0);
        body.varint(sibling.dot.counter);
        body.varint(c.last_modified_ms);
        body.u8(u8::from(c.deleted));
        body.bytes(c.content_type.as_bytes());
        body.varint(c.meta.len() as u64);
        for (name, value) in &c.meta {
            body.bytes(name.as_bytes());
            body.bytes(value.as_bytes());
        }
        body.bytes(&c.value);
    }
    let all_deleted = siblings.iter().all(|s| s.content.deleted);
    let mut bytes = vec![1u8, u8::from(all_deleted)];
    bytes.extend_from_slice(&crc32fast::hash(&body.buf).to_le_bytes());
    bytes.extend_from_slice(&body.buf);
    Object::decode(&bytes).ok()
}

const _: () = assert!(BACKOFF_INITIAL_MS <= BACKOFF_MAX_MS);
const _: () = assert!(MAX_HINTS_PER_TARGET > 0 && HANDOFF_BATCH_KEYS > 0);
const _: () = assert!(limits::MAX_SIBLINGS > 1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::WirePrecondition;
    use crate::test_support::{MapStorage, id, settled_cluster};
    use crate::version::Dot;
    use std::sync::atomic::Ordering;

    /// Nodes over `MapStorage`s on a network that delivers every message at once, in order;
    /// timers are not run (the tests need none).
    struct Net {
        nodes: Vec<Node>,
        disks: Vec<Arc<MapStorage>>,
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
                                Message::Request { id, .. }
                                    if self.nodes[t].stopped().is_some() =>
                                {
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
                    Output::SetTimer { .. } | Output::Stopped { .. } => {}
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
            content: PutOp::new("single", key, None, Some(b"v".to_vec())).content,
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
        let clock = Input::PeerClock {
            peer: from.clone(),
            offset_ms: -10_000,
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
    fn with_siblings_keeps_the_first() {
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
        let one = with_siblings(merged.clock(), &merged.siblings()[..1]).unwrap();
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
}
