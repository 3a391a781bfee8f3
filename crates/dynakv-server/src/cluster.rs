//! The node's view of the cluster and the distributed operations built on it: quorum gets with
//! read repair, coordinated puts (forwarded to a replica when this node is not one), gossip,
//! join and leave, handoff of keys when the ring changes, and cleanup afterwards.
//!
//! The protocol decisions live in dynakv-core (`ClusterState::merge/plan`, the
//! `GetCoordinator` and `PutCoordinator` state machines, `Object::update/sync`); this module
//! does the I/O around them.
//!
//! Invariants:
//! - a put is coordinated only by a node of the key's current preference list, which stores
//!   the new version before sending it on, so its dots are issued in order from its own copy;
//! - a write is acknowledged only after W replicas of the current preference list (and, during
//!   a transition, W of the next one) stored it;
//! - a replica with a newer ring refuses writes coordinated from an older one (`StaleRing`), so
//!   a write can never be acknowledged by replicas that are about to drop the key;
//! - a node drops a key only after the transition that removed it from the key's preference
//!   list has completed, i.e. after every old replica handed its keys to the new ones.

use crate::aae::{AaeRecord, AaeTrees};
use crate::clock::WallClock;
use crate::replica::{Replica, ReplicaError, ReplicaRun};
use crate::sync_barrier::SyncBarrier;
use crate::transport::{PeerClient, PeerInfo, TransportError};
use dynakv_core::anti_entropy::{AaeAsk, AaeExchange, AaeRound, AaeStep, BucketKey};
use dynakv_core::bucket::{BucketProps, CustomBucketError, check_custom_bucket_room};
use dynakv_core::context::ContextKey;
use dynakv_core::coordinator::{
    ReapAnswer, ReapCheck, reap_candidates, reap_check_members, reaper_primaries,
};
use dynakv_core::failure::FailureDetector;
use dynakv_core::handoff::{Batches, Cleanup, CleanupMarker, TransitionHandoff};
use dynakv_core::hints::{HintRound, HintSend};
use dynakv_core::keys;
use dynakv_core::membership::{BucketPropsEntry, ClusterState, Member, MemberStatus};
use dynakv_core::merkle::{Hash, entry_hash};
use dynakv_core::message::{HandoffEntry, PeerMessage};
use dynakv_core::object::Object;
use dynakv_core::request::RequestError;
use dynakv_core::ring::{NodeId, PartitionId, key_hash};
use dynakv_core::serve::{self, HintOutcome, Reply, ServeContext, ServeError, StorageCall};
use dynakv_core::storage::{Durability, Storage, Table};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

use dynakv_core::limits::{
    DEFAULT_REQUEST_TIMEOUT_MS, HANDOFF_BATCH_BYTES, HANDOFF_BATCH_KEYS, LIST_PAGE_KEYS,
    MAX_AAE_KEYS_PER_EXCHANGE, MAX_HINTS_PER_TARGET, MAX_PARSED_PROPS, MAX_REAPS_PER_ROUND,
    SCAN_PAGE_KEYS,
};
/// A member whose heartbeat has not moved for this long is considered down.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// Meta-table key of the persisted cluster state.
const META_CLUSTER: &[u8] = b"cluster_state";
/// Meta-table key of the context secret of versions before `cluster.secret` (read once, to
/// upgrade; no longer written).
const META_SECRET: &[u8] = b"cluster_secret";

/// Timeouts of the cluster protocol.
#[derive(Debug, Clone, Copy)]
pub struct ClusterTimeouts {
    /// One replica request (get, put, handoff batch).
    pub request: Duration,
    /// One gossip exchange.
    pub gossip: Duration,
    /// Time between gossip rounds.
    pub gossip_interval: Duration,
}

impl ClusterTimeouts {
    /// A forwarded put (`CoordinatePut`): a coordinator that starts within one request
    /// timeout of the forward (else it refuses, see `forward_start`) answers within four more
    /// (a replica round and a spare for a failed primary, twice when a ring change makes it
    /// re-plan), so it always answers before its forwarder gives up.
    pub fn forward(&self) -> Duration {
        self.request * 5
    }

    /// How late a coordinator may start a forwarded put (by the forwarder's clock): later,
    /// it refuses, since it might not finish before the forwarder gives up and reports the
    /// outcome as unknown.
    pub fn forward_start(&self) -> Duration {
        self.request
    }
}

impl Default for ClusterTimeouts {
    fn default() -> Self {
        ClusterTimeouts {
            request: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
            gossip: Duration::from_secs(1),
            gossip_interval: Duration::from_secs(1),
        }
    }
}

/// A failed distributed operation, with the HTTP status it maps to.
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A client request failed (`RequestError::status` is its HTTP status).
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("{0}")]
    Membership(String),
    #[error("internal: {0}")]
    Internal(String),
}

#[derive(Debug, Default)]
struct HintCounters {
    stored: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    corrupt: AtomicU64,
}

/// Hinted-handoff figures for stats and admin.
#[derive(Debug, Clone)]
pub struct HintStats {
    pub stored_total: u64,
    pub delivered_total: u64,
    pub dropped_total: u64,
    /// Hints found corrupt (failed their checksum or decoding) and removed undelivered.
    pub corrupt_total: u64,
    pub per_target: Vec<(String, usize)>,
}

/// Admission control bounds of the anti-entropy budget (keys repaired per round).
const AAE_BUDGET_MIN: usize = 100;
const AAE_BUDGET_MAX: usize = 10_000;

/// Admission control of background work (paper 6.5): the anti-entropy budget halves while the
/// foreground p99 latency is above the target and doubles back while it is below.
#[derive(Debug)]
pub struct Admission {
    budget: AtomicU64,
    target_p99_us: AtomicU64,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            budget: AtomicU64::new(AAE_BUDGET_MAX as u64),
            target_p99_us: AtomicU64::new(50_000),
        }
    }
}

impl Admission {
    /// Keys anti-entropy may repair in one round.
    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed) as usize
    }

    /// Set the foreground p99 target, in microseconds.
    pub fn set_target_p99_us(&self, target: u64) {
        self.target_p99_us.store(target.max(1), Ordering::Relaxed);
    }

    /// Adjust the budget from the foreground p99 of the last interval.
    pub fn observe_p99_us(&self, p99_us: u64) -> usize {
        let budget = self.budget() as u64;
        let next = if p99_us > self.target_p99_us.load(Ordering::Relaxed) {
            (budget / 2).max(AAE_BUDGET_MIN as u64)
        } else {
            (budget * 2).min(AAE_BUDGET_MAX as u64)
        };
        self.budget.store(next, Ordering::Relaxed);
        next as usize
    }
}

/// What a `Cluster` is built from besides its identity and state.
#[derive(Debug)]
pub struct ClusterParts {
    pub replica: Arc<Replica>,
    pub storage: Arc<dyn Storage>,
    pub client: PeerClient<PeerMessage>,
    pub timeouts: ClusterTimeouts,
    pub aae: Arc<AaeTrees>,
    /// The flusher's group commit, when the engine's syncs wait on the disk: durable replica
    /// writes await it instead of syncing on a blocking thread each.
    pub syncs: Option<Arc<SyncBarrier>>,
    /// The node's wall clock (skewed only in tests).
    pub clock: WallClock,
    /// The properties of a bucket the cluster state sets none for (and of one whose entry
    /// cannot be read); anti-entropy plans its exchanges with their `n_val`.
    pub default_props: BucketProps,
}

/// One node's cluster machinery.
#[derive(Debug)]
pub struct Cluster {
    me: NodeId,
    /// A new node waiting for its `--join` to be accepted: it answers no peer request (a
    /// member's gossip merged now would make it a member of a cluster it has not joined, and
    /// its join would then be refused).
    awaiting_join: std::sync::atomic::AtomicBool,
    state: RwLock<Arc<ClusterState>>,
    /// Bumped (under the state's write lock) at every change worth persisting: the state's
    /// persistence order.
    state_seq: AtomicU64,
    /// The `state_seq` of the state last written to disk (held while writing, so writes of
    /// the cluster state never interleave and an older one never overwrites a newer one).
    persisted_seq: Arc<Mutex<u64>>,
    /// The context MAC key (derived from the cluster secret at start; never changes).
    secret: ContextKey,
    replica: Arc<Replica>,
    storage: Arc<dyn Storage>,
    client: PeerClient<PeerMessage>,
    timeouts: ClusterTimeouts,
    /// Last heartbeat seen per member and when it last moved.
    failure_detector: Mutex<FailureDetector>,
    parsed_props: RwLock<HashMap<String, (u64, BucketProps)>>,
    hints: HintCounters,
    /// Tombstones this node reaped (its own copies, as the reaping first primary).
    tombstones_reaped: AtomicU64,
    aae: Arc<AaeTrees>,
    /// What the last anti-entropy exchange of each partition did.
    aae_records: Mutex<HashMap<PartitionId, AaeRecord>>,
    admission: Admission,
    /// The ring version whose cleanup this node finished.
    cleanup_marker: Mutex<CleanupMarker>,
    started: Instant,
    syncs: Option<Arc<SyncBarrier>>,
    clock: WallClock,
    /// See [`ClusterParts::default_props`].
    default_props: BucketProps,
}

fn internal(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Internal(e.to_string())
}

/// A persisted cluster state, and the context secret that versions before the cluster secret
/// file kept beside it (every member of such a cluster holds the same one: an upgraded node
/// takes it as its cluster secret).
pub type Persisted = (ClusterState, Option<[u8; 32]>);

/// Load the persisted cluster state, if any.
pub fn load_persisted(storage: &dyn Storage) -> Result<Option<Persisted>, ClusterError> {
    let Some(state) = storage.get(Table::Meta, META_CLUSTER).map_err(internal)? else {
        return Ok(None);
    };
    let state: ClusterState = serde_json::from_slice(&state)
        .map_err(|e| ClusterError::Internal(format!("stored cluster state: {e}")))?;
    let legacy = storage
        .get(Table::Meta, META_SECRET)
        .map_err(internal)?
        .and_then(|secret| <[u8; 32]>::try_from(secret.as_slice()).ok());
    Ok(Some((state, legacy)))
}

fn persist(storage: &dyn Storage, state: &ClusterState) -> Result<(), ClusterError> {
    let bytes = serde_json::to_vec(state).map_err(internal)?;
    storage
        .put(Table::Meta, META_CLUSTER, &bytes, Durability::Fsync)
        .map_err(internal)?;
    Ok(())
}

/// Write `state`, the one of persistence order `seq`, unless a newer one was written already
/// (`written` holds the order of the last one written; held while writing).
fn persist_if_newer(
    storage: &dyn Storage,
    written: &Mutex<u64>,
    seq: u64,
    state: &ClusterState,
) -> Result<(), ClusterError> {
    let mut written = written.lock();
    if *written > seq {
        return Ok(());
    }
    persist(storage, state)?;
    *written = seq;
    Ok(())
}

/// The state with heartbeats zeroed: what is worth persisting.
fn persistent_view(state: &ClusterState) -> ClusterState {
    let mut view = state.clone();
    for member in view.members.values_mut() {
        member.heartbeat = 0;
    }
    view
}

fn peer_addr(member: &Member) -> Option<SocketAddr> {
    member.peer_addr.parse().ok()
}

impl Cluster {
    pub fn new(me: NodeId, state: ClusterState, secret: ContextKey, parts: ClusterParts) -> Self {
        let ClusterParts {
            replica,
            storage,
            client,
            timeouts,
            aae,
            syncs,
            clock,
            default_props,
        } = parts;
        let heartbeat_timeout_ms = u64::try_from(HEARTBEAT_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        Cluster {
            awaiting_join: std::sync::atomic::AtomicBool::new(false),
            failure_detector: Mutex::new(FailureDetector::new(me.clone(), 0, heartbeat_timeout_ms)),
            me,
            state: RwLock::new(Arc::new(state)),
            state_seq: AtomicU64::new(0),
            persisted_seq: Arc::new(Mutex::new(0)),
            secret,
            replica,
            storage,
            client,
            timeouts,
            parsed_props: RwLock::new(HashMap::new()),
            cleanup_marker: Mutex::new(CleanupMarker::default()),
            hints: HintCounters::default(),
            tombstones_reaped: AtomicU64::new(0),
            aae,
            aae_records: Mutex::new(HashMap::new()),
            admission: Admission::default(),
            started: Instant::now(),
            syncs,
            clock,
            default_props,
        }
    }

    /// This node's wall clock, ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Run a replica write asked for with `durability`; `call` gets the durability to store
    /// with. A durable write, when the engine's syncs wait on the disk, is stored buffered
    /// (inline, like every buffered write) and then awaits the flusher's next sync, which
    /// covers it ([`SyncBarrier`]); it is counted as an fsync'd write when `stored` says it
    /// stored something. Any other write runs as [`ReplicaRun::run`] decides. A call that
    /// fails does not wait.
    pub(crate) async fn run_write<V: Send + 'static, E: Send + 'static>(
        &self,
        durability: Durability,
        call: impl FnOnce(Durability) -> Result<V, E> + Send + 'static,
        stored: impl FnOnce(&V) -> bool,
    ) -> Result<Result<V, E>, ClusterError> {
        let Some(syncs) = self
            .syncs
            .as_ref()
            .filter(|_| durability == Durability::Fsync)
        else {
            return self
                .replica
                .run(Some(durability), move || call(durability))
                .await
                .map_err(internal);
        };
        let done = self
            .replica
            .run(Some(Durability::Buffered), move || {
                call(Durability::Buffered)
            })
            .await
            .map_err(internal)?;
        if let Ok(value) = &done {
            syncs.wait().await.map_err(|why| {
                ClusterError::Internal(format!("the write was not made durable: {why}"))
            })?;
            if stored(value) {
                self.replica.count_fsync_write();
            }
        }
        Ok(done)
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// A snapshot of the cluster state.
    pub fn state(&self) -> Arc<ClusterState> {
        Arc::clone(&self.state.read())
    }

    pub fn secret(&self) -> &ContextKey {
        &self.secret
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Apply `change` to the state; persist when something durable changed. The write (an
    /// fsync'd put) runs on the blocking pool, never on an async worker; writes are ordered
    /// by `state_seq`, so a newer state on disk is never overwritten by an older one (a
    /// failed write is logged; the next change writes the whole state again).
    fn update_state<T>(&self, change: impl FnOnce(&mut ClusterState) -> T) -> T {
        let (result, to_persist) = {
            let mut guard = self.state.write();
            let mut next = (**guard).clone();
            let result = change(&mut next);
            let durable_change = persistent_view(&next) != persistent_view(&guard);
            *guard = Arc::new(next);
            let seq = durable_change.then(|| self.state_seq.fetch_add(1, Ordering::AcqRel) + 1);
            (result, seq.map(|seq| (seq, Arc::clone(&guard))))
        };
        if let Some((seq, state)) = to_persist {
            self.persist_in_background(seq, state);
        }
        result
    }

    /// Write the state of order `seq` on the blocking pool (inline outside a runtime).
    fn persist_in_background(&self, seq: u64, state: Arc<ClusterState>) {
        let storage = Arc::clone(&self.storage);
        let written = Arc::clone(&self.persisted_seq);
        let write = move || {
            if let Err(e) = persist_if_newer(storage.as_ref(), &written, seq, &state) {
                tracing::error!(error = %e, "cannot persist the cluster state");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(write);
            }
            Err(_) => write(),
        }
    }

    /// Persist the current state (after startup or a join), waiting for the write.
    pub fn persist_now(&self) -> Result<(), ClusterError> {
        let (seq, state) = {
            let guard = self.state.read();
            (self.state_seq.load(Ordering::Acquire), Arc::clone(&guard))
        };
        persist_if_newer(self.storage.as_ref(), &self.persisted_seq, seq, &state)
    }

    /// A bucket's properties as the cluster knows them.
    pub fn bucket_props(&self, bucket: &str) -> BucketProps {
        let state = self.state();
        let Some(entry) = state.bucket_props.get(bucket) else {
            return self.default_props.clone();
        };
        if let Some((ts, props)) = self.parsed_props.read().get(bucket)
            && *ts == entry.timestamp_ms
        {
            return props.clone();
        }
        let props = entry
            .props_json
            .as_deref()
            .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .and_then(|value| BucketProps::from_stored(bucket, &value).ok())
            .unwrap_or_else(|| self.default_props.clone());
        let mut cache = self.parsed_props.write();
        if cache.len() >= MAX_PARSED_PROPS {
            cache.clear();
        }
        cache.insert(bucket.to_owned(), (entry.timestamp_ms, props.clone()));
        props
    }

    /// Set (or, with `None`, reset) a bucket's properties cluster-wide. A change that would
    /// make one custom bucket too many is refused (`Ok(Err(..))`) and changes nothing: the
    /// core's `check_custom_bucket_room`, as `Node::set_bucket_props`, checked on the state
    /// it changes (under its lock), so two changes at once cannot both pass it.
    pub fn set_bucket_props(
        &self,
        bucket: &str,
        props: Option<&BucketProps>,
    ) -> Result<Result<(), CustomBucketError>, ClusterError> {
        let json = props.map(|p| p.to_json(bucket).to_string());
        let me = self.me.clone();
        Ok(self.update_state(|state| {
            check_custom_bucket_room(state, bucket)?;
            let timestamp_ms = state
                .bucket_props
                .get(bucket)
                .map_or(0, |e| e.timestamp_ms + 1)
                .max(self.now_ms());
            state.bucket_props.insert(
                bucket.to_owned(),
                BucketPropsEntry {
                    timestamp_ms,
                    node: me,
                    props_json: json,
                },
            );
            Ok(())
        }))
    }

    /// The peer links' check of a peer's name and key (both sides, after each handshake): a
    /// name that a member holds under another key is refused while that member is up (a
    /// second process cannot take a live member's place); a member that is down may come back
    /// under a new key (a node restarted with an empty data directory), which its join then
    /// records.
    pub fn verify_peer(&self, name: &str, key: &[u8; 32]) -> Result<(), String> {
        let id = NodeId(name.to_owned());
        if id == self.me {
            let state = self.state();
            let mine = state.member(&id).and_then(|m| m.public_key);
            if mine.is_some_and(|mine| &mine != key) {
                return Err(format!("node name {name:?} is this node's own"));
            }
            return Ok(());
        }
        let known = self
            .state()
            .member(&id)
            .filter(|m| m.status != MemberStatus::Exiting)
            .and_then(|m| m.public_key);
        match known {
            Some(known) if &known != key => {
                if self.is_up(&id) {
                    Err(format!(
                        "node name {name:?} belongs to a live member with another key"
                    ))
                } else {
                    tracing::warn!(
                        node = name,
                        "a member that is down comes back with a new key"
                    );
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Whether a member is believed up (heartbeats moving, or too early to tell).
    pub fn is_up(&self, id: &NodeId) -> bool {
        if id == &self.me {
            return true;
        }
        let state = self.state();
        if let Some(addr) = state.member(id).and_then(peer_addr)
            && self.client.unreachable_peers().contains(&addr)
        {
            return false;
        }
        self.failure_detector.lock().is_up(id, self.monotonic_ms())
    }

    /// Milliseconds since this node started, the failure detector's clock (and the one of
    /// the anti-entropy records).
    pub fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn observe_heartbeats(&self, state: &ClusterState) {
        let now = self.monotonic_ms();
        self.failure_detector.lock().observe_state(state, now);
    }

    /// Record that `node` just answered or sent us something: it is up, whatever its gossiped
    /// heartbeat says (heartbeats reach a node only when someone gossips with it).
    pub fn observe_contact(&self, node: &NodeId) {
        let now = self.monotonic_ms();
        self.failure_detector.lock().observe_contact(node, now);
    }

    async fn send(
        &self,
        node: &NodeId,
        message: PeerMessage,
        timeout: Duration,
    ) -> Result<PeerMessage, ClusterError> {
        let addr = self
            .state()
            .member(node)
            .and_then(peer_addr)
            .ok_or_else(|| ClusterError::Internal(format!("no address for node {node}")))?;
        let reply = self
            .client
            .request(addr, message, timeout)
            .await
            .map_err(|e: TransportError| ClusterError::Internal(e.to_string()))?;
        self.observe_contact(node);
        Ok(reply)
    }

    /// Merge a peer's state into this node's (a replica's `StaleRing` answer).
    pub(crate) fn merge_peer_state(&self, other: &ClusterState) -> Result<(), ClusterError> {
        self.merge_state(other)
    }

    /// The peer address of a member.
    pub(crate) fn peer_address(&self, node: &NodeId) -> Option<SocketAddr> {
        self.state().member(node).and_then(peer_addr)
    }

    pub(crate) fn client(&self) -> &PeerClient<PeerMessage> {
        &self.client
    }

    pub(crate) fn timeouts(&self) -> &ClusterTimeouts {
        &self.timeouts
    }

    fn merge_state(&self, other: &ClusterState) -> Result<(), ClusterError> {
        if other.cluster_name != self.state().cluster_name {
            return Err(ClusterError::Membership(format!(
                "gossip from cluster {:?}",
                other.cluster_name
            )));
        }
        self.observe_heartbeats(other);
        self.update_state(|state| state.merge(other));
        Ok(())
    }

    // ----- reads -----

    async fn fetch_replica(
        &self,
        node: &NodeId,
        bucket: &str,
        key: &str,
        ring_version: u64,
        hinted_for: Option<&NodeId>,
    ) -> Result<Option<Object>, ()> {
        if node == &self.me {
            let replica = Arc::clone(&self.replica);
            let (b, k) = (bucket.to_owned(), key.to_owned());
            let hinted_for = hinted_for.map(|n| n.0.clone());
            return match self
                .replica
                .run(None, move || {
                    replica.get_with_hint(&b, &k, hinted_for.as_deref())
                })
                .await
            {
                Ok(Ok(object)) => Ok(object),
                _ => Err(()),
            };
        }
        let message = PeerMessage::ReplicaGet {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            ring_version,
            hinted_for: hinted_for.map(|n| n.0.clone()),
        };
        match self.send(node, message, self.timeouts.request).await {
            Ok(PeerMessage::ReplicaObject { object: None }) => Ok(None),
            Ok(PeerMessage::ReplicaObject {
                object: Some(bytes),
            }) => Object::decode(&bytes).map(Some).map_err(|e| {
                tracing::warn!(%node, error = %e, "replica sent an undecodable object");
            }),
            _ => Err(()),
        }
    }

    /// Merge `object` into one replica (local or remote). Returns whether it was stored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn store_replica(
        &self,
        node: &NodeId,
        bucket: &str,
        key: &str,
        object: &Object,
        encoded: &[u8],
        props: &BucketProps,
        durability: Durability,
    ) -> Result<(), ClusterError> {
        if node == &self.me {
            let replica = Arc::clone(&self.replica);
            let (b, k, o, p) = (
                bucket.to_owned(),
                key.to_owned(),
                object.clone(),
                props.clone(),
            );
            self.replica
                .run(Some(durability), move || {
                    replica.merge(&b, &k, &o, &p, durability).map(|_| ())
                })
                .await
                .map_err(internal)?
                .map_err(ClusterError::from)?;
            // A read repair planned under an older ring may land after this node's cleanup.
            self.check_orphan(bucket, key, props.n_val);
            return Ok(());
        }
        let message = PeerMessage::ReplicaPut {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            object: encoded.to_vec(),
            durability,
            ring_version: self.state().ring.version,
        };
        self.send_write(node, message).await
    }

    /// Send a replica write (`ReplicaPut`, `HintedPut`, `Handoff`) with the request timeout:
    /// see [`Cluster::send_write_within`].
    async fn send_write(&self, node: &NodeId, message: PeerMessage) -> Result<(), ClusterError> {
        self.send_write_within(node, message, self.timeouts.request)
            .await
    }

    /// Send a replica write: `Ack` is success; `StaleRing` merges the replica's newer state
    /// here and fails (the caller may re-plan).
    async fn send_write_within(
        &self,
        node: &NodeId,
        message: PeerMessage,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        match self.send(node, message, timeout).await? {
            PeerMessage::Ack => Ok(()),
            PeerMessage::StaleRing(state) => {
                self.merge_state(&state)?;
                Err(ClusterError::Internal(format!("{node} has a newer ring")))
            }
            other => Err(ClusterError::Internal(format!(
                "{node} answered {}",
                other.name()
            ))),
        }
    }

    /// Keep a version here as a hint for `target`, within the per-target bound.
    pub(crate) async fn keep_hint(
        &self,
        target: &NodeId,
        bucket: &str,
        key: &str,
        object: &Object,
        durability: Durability,
    ) {
        if target == &self.me {
            return;
        }
        let replica = Arc::clone(&self.replica);
        let (target_name, bucket_name, key_name, object) = (
            target.0.clone(),
            bucket.to_owned(),
            key.to_owned(),
            object.clone(),
        );
        let stored = tokio::task::spawn_blocking(move || {
            replica.store_hint(
                &target_name,
                &bucket_name,
                &key_name,
                &object,
                MAX_HINTS_PER_TARGET,
                durability,
            )
        })
        .await;
        match stored {
            Ok(Ok(true)) => {
                self.hints.stored.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(false)) => {
                self.hints.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%target, limit = MAX_HINTS_PER_TARGET, "hint store for this node is full: relying on read repair and anti-entropy");
            }
            Ok(Err(e)) => tracing::error!(%target, error = %e, "cannot store a hint"),
            Err(e) => tracing::error!(%target, error = %e, "hint task failed"),
        }
    }

    /// Deliver the hints held for nodes that are reachable again; a hint is deleted only after
    /// its destination acknowledged it (and only if it did not change meanwhile). Hints for a
    /// key whose preference list no longer names their target go to its current replicas.
    /// Returns the number of hints delivered.
    pub async fn deliver_hints(&self) -> Result<usize, ClusterError> {
        let mut delivered = 0;
        // Admission control: at most the background budget of hints per round.
        let budget = self.admission.budget();
        for (target, _) in self.replica.hint_counts() {
            let target_id = NodeId(target.clone());
            let state = self.state();
            let up = self.is_up(&target_id);
            let Some(mut round) =
                HintRound::start(&state, &target_id, up, budget.saturating_sub(delivered))
            else {
                continue;
            };
            let mut start_after: Option<Vec<u8>> = None;
            while round.wants_more() {
                let replica = Arc::clone(&self.replica);
                let (t, after) = (target.clone(), start_after.clone());
                let page = tokio::task::spawn_blocking(move || {
                    replica.hint_page(&t, after.as_deref(), HANDOFF_BATCH_KEYS)
                })
                .await
                .map_err(internal)??;
                let Some((last, _)) = page.last() else { break };
                start_after = Some(last.clone());
                let full = page.len() == HANDOFF_BATCH_KEYS;
                // Routing (the core's, shared with the simulator): one batch to the target,
                // a `ReplicaPut` per current replica of a key that moved.
                let routed = round.route_page(page, &state, |b| self.bucket_props(b).n_val);
                for (hint_key, bytes) in &routed.corrupt {
                    tracing::error!(%target, error = "checksum", "corrupt hint removed undelivered; anti-entropy repairs its key");
                    if self.drop_hint(hint_key, bytes).await? {
                        self.hints.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let mut released = Vec::new();
                for send in routed.sends {
                    let hints = send.hints.clone();
                    let ok = self.send_hint(send).await;
                    released.extend(round.on_reply(&hints, ok));
                }
                for (hint_key, bytes) in released {
                    if self.drop_hint(&hint_key, &bytes).await? {
                        delivered += 1;
                    }
                }
                if !full || routed.budget_spent {
                    break;
                }
            }
        }
        if delivered > 0 {
            self.hints
                .delivered
                .fetch_add(delivered as u64, Ordering::Relaxed);
            tracing::info!(hints = delivered, "hints delivered");
        }
        Ok(delivered)
    }

    /// Send one message of a hint delivery round; `true` when it was acknowledged. A message
    /// for this node (a moved key it now replicates) is served here, as a peer's would be.
    async fn send_hint(&self, send: HintSend) -> bool {
        let HintSend { to, message, .. } = send;
        if to == self.me {
            let Some(call) = serve::storage_call(&message) else {
                return false;
            };
            return matches!(
                self.serve_locally(call, message).await,
                Ok(PeerMessage::Ack)
            );
        }
        let timeout = if matches!(message, PeerMessage::Handoff { .. }) {
            self.timeouts.request * 5
        } else {
            self.timeouts.request
        };
        match self.send_write_within(&to, message, timeout).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(node = %to, error = %e, "hint delivery failed; will retry");
                false
            }
        }
    }

    async fn drop_hint(&self, hint_key: &[u8], delivered: &[u8]) -> Result<bool, ClusterError> {
        let replica = Arc::clone(&self.replica);
        let (k, d) = (hint_key.to_vec(), delivered.to_vec());
        Ok(
            tokio::task::spawn_blocking(move || replica.delete_hint_if_unchanged(&k, &d))
                .await
                .map_err(internal)??,
        )
    }

    /// Hint counters and the hinted keys held per target.
    pub fn hint_stats(&self) -> HintStats {
        HintStats {
            stored_total: self.hints.stored.load(Ordering::Relaxed),
            delivered_total: self.hints.delivered.load(Ordering::Relaxed),
            dropped_total: self.hints.dropped.load(Ordering::Relaxed),
            corrupt_total: self.hints.corrupt.load(Ordering::Relaxed),
            per_target: self.replica.hint_counts(),
        }
    }

    // ----- peer side -----

    /// Answer one peer request.
    pub async fn handle_peer(self: Arc<Self>, from: PeerInfo, message: PeerMessage) -> PeerMessage {
        self.observe_contact(&NodeId(from.node_name.clone()));
        if self.awaiting_join.load(Ordering::Acquire) {
            return PeerMessage::Error(dynakv_core::membership::AWAITING_JOIN_REFUSAL.to_owned());
        }
        match self.handle_peer_inner(&from, message).await {
            Ok(reply) => reply,
            Err(e) => PeerMessage::Error(e.to_string()),
        }
    }

    async fn handle_peer_inner(
        self: &Arc<Self>,
        from: &PeerInfo,
        message: PeerMessage,
    ) -> Result<PeerMessage, ClusterError> {
        if let Some(call) = serve::storage_call(&message) {
            return self.serve_locally(call, message).await;
        }
        match message {
            PeerMessage::Gossip(theirs) => {
                self.merge_state(&theirs)?;
                Ok(PeerMessage::Gossip(Box::new((*self.state()).clone())))
            }
            PeerMessage::JoinRequest {
                cluster_name,
                member,
            } => {
                let ours = self.state().cluster_name.clone();
                if cluster_name != ours {
                    return Ok(PeerMessage::Error(format!(
                        "cluster name mismatch: this cluster is {ours:?}, the request is for {cluster_name:?}"
                    )));
                }
                let sender = NodeId(from.node_name.clone());
                if let Err(e) =
                    ClusterState::check_join_request(&sender, Some(&from.public_key), &member)
                {
                    return Ok(PeerMessage::Error(e.to_string()));
                }
                tracing::info!(node = %member.id, via = %from.node_name, "join request");
                self.update_state(|state| state.add_joining(member))
                    .map_err(|e| ClusterError::Membership(e.to_string()))?;
                Ok(PeerMessage::JoinAccepted {
                    state: Box::new((*self.state()).clone()),
                })
            }
            message @ PeerMessage::CoordinatePut { .. } => {
                // A forward that arrives after its forwarder gave up (we were paused, or it
                // waited in a queue) is refused: the core's rule, the simulator's too.
                let limit_ms =
                    u64::try_from(self.timeouts.forward_start().as_millis()).unwrap_or(u64::MAX);
                let accepted = crate::requests::accept_forwarded(
                    self,
                    message,
                    from.clock_offset_ms,
                    limit_ms,
                );
                let (op, stamp_ms) = match accepted {
                    Ok(accepted) => accepted,
                    Err(refused) => return Ok(*refused.answer),
                };
                Ok(
                    match crate::requests::coordinate(self, op, stamp_ms).await {
                        Ok(object) => PeerMessage::Coordinated {
                            object: object.encode(),
                        },
                        Err(e) => PeerMessage::Failed {
                            status: e.status(),
                            message: e.to_string(),
                        },
                    },
                )
            }
            PeerMessage::ListBuckets => {
                let replica = Arc::clone(&self.replica);
                let buckets = tokio::task::spawn_blocking(move || replica.list_buckets())
                    .await
                    .map_err(internal)??;
                Ok(PeerMessage::Buckets(buckets))
            }
            PeerMessage::ListKeys {
                bucket,
                start_after,
                limit,
            } => {
                let (keys, next_after) = self
                    .local_key_page(&bucket, start_after.as_deref(), limit as usize)
                    .await?;
                Ok(PeerMessage::KeyPage { keys, next_after })
            }
            other => Ok(PeerMessage::Error(format!(
                "unexpected request {}",
                other.name()
            ))),
        }
    }

    /// Answer a replica-side request with the core's `serve` (the code the simulator's nodes
    /// run too), on the blocking pool when its storage call may wait on the disk.
    async fn serve_locally(
        &self,
        call: StorageCall,
        message: PeerMessage,
    ) -> Result<PeerMessage, ClusterError> {
        let state = self.state();
        let props: std::collections::BTreeMap<String, BucketProps> = serve::buckets_named(&message)
            .into_iter()
            .map(|bucket| (bucket.to_owned(), self.bucket_props(bucket)))
            .collect();
        let n_vals: HashMap<String, u32> =
            props.iter().map(|(b, p)| (b.clone(), p.n_val)).collect();
        let context = ServeContext {
            ring_version: state.ring.version,
            props,
            hint_limit: MAX_HINTS_PER_TARGET,
            hint_target_member: serve::hint_target(&message)
                .is_some_and(|target| state.is_member(target)),
            max_leaf_keys: MAX_AAE_KEYS_PER_EXCHANGE,
            aae_budget: u32::try_from(self.admission.budget()).unwrap_or(u32::MAX),
            defer_sync: false,
        };
        let (replica, aae) = (Arc::clone(&self.replica), Arc::clone(&self.aae));
        let mut message = message;
        let served = match call {
            StorageCall::None => serve::serve(&replica, &aae, &context, message),
            StorageCall::Read => self
                .replica
                .run(None, move || {
                    serve::serve(&replica, &aae, &context, message)
                })
                .await
                .map_err(internal)?,
            StorageCall::Write(durability) if message.durability_mut().is_some() => {
                self.run_write(
                    durability,
                    move |durability| {
                        if let Some(asked) = message.durability_mut() {
                            *asked = durability;
                        }
                        serve::serve(&replica, &aae, &context, message)
                    },
                    |served| {
                        !served.stored.is_empty()
                            || matches!(served.hint, Some(HintOutcome::Stored))
                    },
                )
                .await?
            }
            StorageCall::Write(durability) => self
                .replica
                .run(Some(durability), move || {
                    serve::serve(&replica, &aae, &context, message)
                })
                .await
                .map_err(internal)?,
            StorageCall::Long => {
                tokio::task::spawn_blocking(move || serve::serve(&replica, &aae, &context, message))
                    .await
                    .map_err(internal)?
            }
        }
        .map_err(|e| match e {
            ServeError::Replica(e) => ClusterError::from(e),
            other => internal(other),
        })?;
        match served.hint {
            Some(HintOutcome::Stored) => {
                self.hints.stored.fetch_add(1, Ordering::Relaxed);
            }
            Some(HintOutcome::Dropped) => {
                self.hints.dropped.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        for (bucket, key) in &served.stored {
            let n_val = n_vals
                .get(bucket)
                .copied()
                .unwrap_or_else(|| self.bucket_props(bucket).n_val);
            self.check_orphan(bucket, key, n_val);
        }
        Ok(match served.reply {
            Reply::Message(message) => message,
            Reply::StaleRing => PeerMessage::StaleRing(Box::new((*state).clone())),
        })
    }

    // ----- active anti-entropy -----

    /// The keys this node stores in the given leaves of a partition, with their entry hashes.
    async fn local_leaf_keys(
        &self,
        partition: u32,
        leaves: Vec<u16>,
    ) -> Result<(Vec<(String, String, Hash)>, bool), ClusterError> {
        let aae = Arc::clone(&self.aae);
        let leaves: std::collections::BTreeSet<u16> = leaves.into_iter().collect();
        // A scan (it may wait for the write buffer to drain): on the blocking pool.
        tokio::task::spawn_blocking(move || {
            aae.leaf_keys(partition, &leaves, MAX_AAE_KEYS_PER_EXCHANGE)
        })
        .await
        .map_err(internal)?
        .map_err(ClusterError::Internal)
    }

    /// Ask `peer` one anti-entropy question of an exchange of `partition`.
    /// Ask `peer` one anti-entropy question of `exchange` and feed its answer to the core's
    /// `AaeExchange::on_answer` (as the simulator does).
    async fn aae_step(
        &self,
        peer: &NodeId,
        exchange: &mut AaeExchange<BucketKey>,
        ask: AaeAsk,
    ) -> Result<AaeStep<BucketKey>, ClusterError> {
        let partition = exchange.partition();
        // Listing a leaf's keys may read many index entries: more time, and our side is read
        // on the blocking pool before the answer is fed.
        let (timeout, ours) = match &ask {
            AaeAsk::Keys(leaves) => (
                self.timeouts.request * 5,
                Some(self.local_leaf_keys(partition, leaves.clone()).await?.0),
            ),
            _ => (self.timeouts.request, None),
        };
        let answer = self.send(peer, ask.message(partition), timeout).await?;
        let state = self.state();
        exchange
            .on_answer(
                &self.aae,
                answer,
                |_| ours.ok_or_else(|| "keys answered to another question".to_owned()),
                |(bucket, key)| {
                    let n_val = self.bucket_props(bucket).n_val;
                    let replicas = state.preference_list(partition_of(&state, bucket, key), n_val);
                    replicas.contains(&self.me) && replicas.contains(peer)
                },
            )
            .map_err(|e| ClusterError::Internal(format!("{peer}: {e}")))
    }

    /// Compare one partition with one peer and repair the keys that differ: both sides end
    /// with the `sync` of their versions. The steps and the budget are the core's
    /// `AaeExchange`; this performs them. Returns the number of keys repaired.
    async fn exchange(
        &self,
        peer: &NodeId,
        mut exchange: AaeExchange<BucketKey>,
        ask: AaeAsk,
    ) -> Result<usize, ClusterError> {
        let mut step = self.aae_step(peer, &mut exchange, ask).await?;
        loop {
            step = match step {
                AaeStep::Done { repaired } => return Ok(repaired),
                AaeStep::Ask(ask) => self.aae_step(peer, &mut exchange, ask).await?,
                AaeStep::Compare(keys) => {
                    self.repair_keys(peer, &mut exchange, keys).await?;
                    exchange.finish()
                }
            };
        }
    }

    /// Read both versions of each key an exchange listed and perform its repairs.
    async fn repair_keys(
        &self,
        peer: &NodeId,
        exchange: &mut AaeExchange<BucketKey>,
        keys: Vec<BucketKey>,
    ) -> Result<(), ClusterError> {
        let ring_version = self.state().ring.version;
        let mut stored = false;
        for bucket_key in keys {
            if exchange.compared_all() {
                break;
            }
            let (bucket, key) = &bucket_key;
            let local = self
                .fetch_replica(&self.me, bucket, key, ring_version, None)
                .await;
            let remote = self
                .fetch_replica(peer, bucket, key, ring_version, None)
                .await;
            let (Ok(local), Ok(remote)) = (local, remote) else {
                exchange.skip(&bucket_key);
                continue;
            };
            let Some(repair) = exchange.on_versions(&bucket_key, local.as_ref(), remote.as_ref())
            else {
                continue;
            };
            let props = self.bucket_props(bucket);
            let encoded = repair.merged.encode();
            for (node, wanted) in [(&self.me, repair.store_local), (peer, repair.store_remote)] {
                if wanted {
                    self.store_replica(
                        node,
                        bucket,
                        key,
                        &repair.merged,
                        &encoded,
                        &props,
                        Durability::Buffered,
                    )
                    .await?;
                    stored |= *node == self.me;
                }
            }
        }
        if stored {
            // A sync may wait on the disk: run as the engine says (the blocking pool when so).
            let storage = Arc::clone(self.replica.storage());
            self.replica
                .run(Some(Durability::Fsync), move || storage.sync())
                .await
                .map_err(internal)?
                .map_err(internal)?;
        }
        Ok(())
    }

    /// One anti-entropy round: every partition this node replicates is compared with one of
    /// its other replicas (in turn), within the admission-control budget of repaired keys
    /// (the core's `AaeRound`). Skipped during ring transitions. Returns the number of keys
    /// repaired.
    pub async fn anti_entropy_round(&self, round: usize) -> usize {
        let budget = self.admission.budget();
        let mut plan = self.aae_plan(round, budget);
        while let Some((peer, exchange, ask)) = plan.next_exchange() {
            let partition = exchange.partition();
            match self.exchange(&peer, exchange, ask).await {
                Ok(repaired) => {
                    plan.finished(repaired);
                    let now_ms = self.monotonic_ms();
                    let mut records = self.aae_records.lock();
                    let record = records.entry(partition).or_default();
                    record.completed(now_ms, &peer, repaired);
                }
                Err(e) => {
                    tracing::debug!(partition, %peer, error = %e, "anti-entropy exchange failed");
                }
            }
        }
        let repaired_total = plan.repaired();
        if repaired_total > 0 {
            tracing::info!(keys = repaired_total, budget, "anti-entropy repaired keys");
        }
        repaired_total
    }

    /// The exchanges of anti-entropy round `round` (the core's `AaeRound`, planned with the
    /// default properties' `n_val`, as `Node` plans it).
    fn aae_plan(&self, round: usize, budget: usize) -> AaeRound {
        AaeRound::plan(
            &self.state(),
            &self.me,
            &self.default_props,
            round,
            budget,
            |n| self.is_up(n),
        )
    }

    /// Reap tombstones older than `grace_ms` that every primary holds identically: this node
    /// handles the keys it is the first primary of, checks that each of the N primaries stores
    /// exactly the same tombstone, then has each delete it (only if unchanged). Returns the
    /// number of keys reaped.
    pub async fn reap_tombstones(&self, grace_ms: u64) -> Result<usize, ClusterError> {
        let state = self.state();
        if state.ring.next.is_some() {
            return Ok(0);
        }
        let now = self.now_ms();
        let replica = Arc::clone(&self.replica);
        let candidates = tokio::task::spawn_blocking(move || {
            reap_candidates(&replica, now, grace_ms, MAX_REAPS_PER_ROUND)
        })
        .await
        .map_err(internal)??;
        let mut reaped = 0;
        for (storage_key, value) in candidates {
            let Some((bucket, key)) = key_names(&storage_key) else {
                continue;
            };
            let n_val = self.bucket_props(&bucket).n_val;
            let partition = partition_of(&state, &bucket, &key);
            let Some(primaries) = reaper_primaries(&state, &self.me, partition, n_val) else {
                continue;
            };
            // Every primary must hold exactly this tombstone, and no member may keep a hint of
            // the key or (outside the primaries) a copy of it: a hint or stray copy of an
            // older version delivered after the reap would bring the deleted value back (the
            // simulation found both). A member that does not answer blocks the reap.
            if !self
                .reap_is_safe(&state, &primaries, &bucket, &key, &value)
                .await
            {
                continue;
            }
            let expected = entry_hash(bucket.as_bytes(), key.as_bytes(), &value);
            for node in primaries.iter().filter(|n| **n != self.me) {
                let message = PeerMessage::Reap {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    expected,
                };
                if let Err(e) = self.send(node, message, self.timeouts.request).await {
                    tracing::debug!(%node, error = %e, "reap request failed; the tombstone stays there for now");
                }
            }
            let replica = Arc::clone(&self.replica);
            let removed = tokio::task::spawn_blocking(move || {
                replica.remove_if_unchanged(&storage_key, &expected)
            })
            .await
            .map_err(internal)??;
            if removed {
                reaped += 1;
            }
        }
        if reaped > 0 {
            self.tombstones_reaped
                .fetch_add(reaped as u64, Ordering::Relaxed);
            tracing::info!(keys = reaped, "tombstones reaped");
        }
        Ok(reaped)
    }

    /// The reap check of one tombstone (`value`, stored here, the first primary): every other
    /// member answers `ReapCheck`; primaries must hold exactly `value`, others nothing, and
    /// no member (this one included) may keep a hint of the key.
    async fn reap_is_safe(
        &self,
        state: &ClusterState,
        primaries: &[NodeId],
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> bool {
        let replica = Arc::clone(&self.replica);
        let (b, k) = (bucket.to_owned(), key.to_owned());
        let Ok(Ok(me_hinted)) =
            tokio::task::spawn_blocking(move || replica.holds_hint(&b, &k)).await
        else {
            return false;
        };
        let (mut check, ask) = ReapCheck::start(
            &self.me,
            reap_check_members(state),
            primaries.to_vec(),
            value.to_vec(),
            me_hinted,
        );
        for node in ask {
            let message = PeerMessage::ReapCheck {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            };
            let answer = match self.send(&node, message, self.timeouts.request).await {
                Ok(PeerMessage::ReapState { object, hinted }) => Some(ReapAnswer {
                    stored: object,
                    hinted,
                }),
                _ => None,
            };
            if let Some(verdict) = check.on_reply(&node, answer) {
                return verdict;
            }
        }
        check.verdict().unwrap_or(false)
    }

    /// Tombstones reaped by this node as the first primary of their keys.
    pub fn tombstones_reaped(&self) -> u64 {
        self.tombstones_reaped.load(Ordering::Relaxed)
    }

    /// The admission controller of background work.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Anti-entropy state per partition.
    /// Each record's `last_exchange_ms` is by [`Cluster::monotonic_ms`].
    pub fn aae_report(&self) -> Vec<(u32, u64, AaeRecord)> {
        let entries = self.aae.entries();
        let records = self.aae_records.lock();
        let mut partitions: Vec<u32> = entries.keys().chain(records.keys()).copied().collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
            .into_iter()
            .map(|p| {
                (
                    p,
                    entries.get(&p).copied().unwrap_or(0),
                    records.get(&p).cloned().unwrap_or_default(),
                )
            })
            .collect()
    }

    // ----- key listing -----

    pub(crate) async fn local_key_page(
        &self,
        bucket: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ClusterError> {
        let replica = Arc::clone(&self.replica);
        let bucket = bucket.to_owned();
        let after = start_after.map(|k| keys::object_key(bucket.as_bytes(), k.as_bytes()));
        let (keys, next) = tokio::task::spawn_blocking(move || {
            replica.list_keys_page(&bucket, after.as_deref(), limit.clamp(1, LIST_PAGE_KEYS))
        })
        .await
        .map_err(internal)??;
        let next_after = next
            .as_deref()
            .and_then(keys::split_object_key)
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned());
        Ok((keys, next_after))
    }

    // ----- membership -----

    /// Ask the cluster at `seed` to admit this node; adopt its state and secret.
    pub async fn join(&self, seed: SocketAddr) -> Result<(), ClusterError> {
        let holds_data = {
            let replica = Arc::clone(&self.replica);
            tokio::task::spawn_blocking(move || replica.holds_data())
                .await
                .map_err(internal)??
        };
        let state = self.state();
        if state.members.len() > 1 {
            return Err(ClusterError::Membership(
                "this node is already part of a cluster with other members".into(),
            ));
        }
        if holds_data {
            return Err(ClusterError::Membership(
                "this node holds data; only an empty node can join a cluster".into(),
            ));
        }
        let mut me = state
            .member(&self.me)
            .cloned()
            .ok_or_else(|| ClusterError::Internal("no member entry for this node".into()))?;
        me.status = MemberStatus::Joining;
        let message = PeerMessage::JoinRequest {
            cluster_name: state.cluster_name.clone(),
            member: me,
        };
        let reply = self
            .client
            .request(seed, message, self.timeouts.request)
            .await
            .map_err(|e| ClusterError::Membership(format!("cannot reach {seed}: {e}")))?;
        match reply {
            PeerMessage::JoinAccepted { state } => {
                *self.state.write() = Arc::new(*state);
                self.awaiting_join.store(false, Ordering::Release);
                self.persist_now()?;
                tracing::info!(%seed, "joined the cluster");
                Ok(())
            }
            PeerMessage::Error(message) => Err(ClusterError::Membership(message)),
            other => Err(ClusterError::Membership(format!(
                "unexpected reply {}",
                other.name()
            ))),
        }
    }

    /// Change the security state (users, sources, grants, enabled) here; gossip spreads it.
    /// `change` gets the state, this node's wall clock and name (for the change's stamp).
    pub fn change_security<T>(
        &self,
        change: impl FnOnce(
            &mut dynakv_core::security::SecurityState,
            u64,
            &str,
        ) -> Result<T, dynakv_core::security::SecurityError>,
    ) -> Result<Result<T, dynakv_core::security::SecurityError>, ClusterError> {
        let now_ms = self.now_ms();
        let me = self.me.0.clone();
        Ok(self.update_state(|state| {
            let mut security = state.security.clone();
            let result = change(&mut security, now_ms, &me);
            // All or nothing: a refused change leaves the state as it was.
            if result.is_ok() {
                state.security = security;
            }
            result
        }))
    }

    /// Mark a new node as waiting for its join (see `awaiting_join`); a successful
    /// [`Cluster::join`] ends it.
    pub fn set_awaiting_join(&self, waiting: bool) {
        self.awaiting_join.store(waiting, Ordering::Release);
    }

    /// Ask for this node to leave the cluster.
    pub fn leave(&self) -> Result<(), ClusterError> {
        let me = self.me.clone();
        self.update_state(|state| state.request_leave(&me))
            .map_err(|e| ClusterError::Membership(e.to_string()))
    }

    /// One gossip round: beat, exchange with a random member, plan if claimant.
    pub async fn gossip_round(&self, pick: usize) {
        let me = self.me.clone();
        self.update_state(|state| state.beat(&me));
        let state = self.state();
        if let Some(peer) = state
            .gossip_peer(&self.me, |_| pick)
            .and_then(|id| state.member(&id))
            && let Some(addr) = peer_addr(peer)
        {
            let message = PeerMessage::Gossip(Box::new((*state).clone()));
            if let Ok(PeerMessage::Gossip(theirs)) = self
                .client
                .request(addr, message, self.timeouts.gossip)
                .await
                && let Err(e) = self.merge_state(&theirs)
            {
                tracing::warn!(peer = %peer.id, error = %e, "gossip merge failed");
            }
        }
        if self.state().claimant() == Some(&self.me) && self.update_state(ClusterState::plan) {
            let s = self.state();
            tracing::info!(
                version = s.ring.version,
                transition = s.ring.next.is_some(),
                "ring plan changed"
            );
        }
    }

    /// Hand keys to the nodes that enter their preference lists in the pending transition;
    /// mark this node's handoff done when all are delivered. Returns the number of keys sent.
    pub async fn handoff_round(&self) -> Result<usize, ClusterError> {
        let state = self.state();
        let Some(mut handoff) = TransitionHandoff::start(&state, &self.me) else {
            return Ok(0);
        };
        let mut batches = Batches::new(HANDOFF_BATCH_KEYS, HANDOFF_BATCH_BYTES);
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self.scan_page(start_after.clone()).await?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            let full = TransitionHandoff::batch_page(&state, &self.me, &mut batches, page, |b| {
                self.bucket_props(b).n_val
            });
            for (node, entries) in full {
                self.handoff_batch(&mut handoff, &node, entries).await?;
            }
        }
        for (node, entries) in batches.drain() {
            self.handoff_batch(&mut handoff, &node, entries).await?;
        }
        handoff.on_scanned();
        let me = self.me.clone();
        if self.update_state(|s| handoff.finish(s, &me)) {
            tracing::info!(
                transition = handoff.transition(),
                keys = handoff.keys_sent(),
                "handoff done"
            );
        }
        Ok(handoff.keys_sent())
    }

    /// Send one batch of a transition's handoff and count its outcome.
    async fn handoff_batch(
        &self,
        handoff: &mut TransitionHandoff,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
    ) -> Result<(), ClusterError> {
        handoff.on_sent(entries.len());
        let result = self.send_handoff(node, entries).await;
        handoff.on_reply(result.is_ok());
        result
    }

    /// One `Handoff` batch under this node's ring version (five request timeouts: the
    /// receiver merges the whole batch and syncs).
    async fn send_handoff(
        &self,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
    ) -> Result<(), ClusterError> {
        let message = PeerMessage::Handoff {
            entries,
            ring_version: self.state().ring.version,
        };
        self.send_write_within(node, message, self.timeouts.request * 5)
            .await
    }

    /// One page of this node's stored objects after `start_after` (handoff, cleanup, reaping).
    async fn scan_page(
        &self,
        start_after: Option<Vec<u8>>,
    ) -> Result<Vec<dynakv_core::storage::Entry>, ClusterError> {
        let replica = Arc::clone(&self.replica);
        Ok(tokio::task::spawn_blocking(move || {
            replica.scan_objects(start_after.as_deref(), SCAN_PAGE_KEYS)
        })
        .await
        .map_err(internal)??)
    }

    /// After a transition completes, drop the keys this node no longer replicates: each goes
    /// to its current primaries first (a write that landed here after the transition's
    /// handoff may exist nowhere else) and is dropped once all of them acknowledged, if it
    /// did not change meanwhile (the core's `Cleanup`). Returns the number of keys dropped.
    pub async fn cleanup_round(&self) -> Result<usize, ClusterError> {
        let state = self.state();
        let marker = *self.cleanup_marker.lock();
        let Some(mut cleanup) = Cleanup::<Vec<u8>, Hash>::start(&state, &marker) else {
            return Ok(0);
        };
        let mut removed = 0;
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self.scan_page(start_after.clone()).await?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            // The page's batches for the primaries of every key this node no longer
            // replicates (the core's, shared with the simulator).
            let sends = cleanup.add_page(&state, &self.me, page, |b| self.bucket_props(b).n_val);
            if self.state().ring.version != cleanup.ring_version() {
                // The ring moved on while scanning: start over later with the new ring.
                return Ok(removed);
            }
            let mut refused: Vec<NodeId> = Vec::new();
            let mut droppable = Vec::new();
            for (node, batch) in sends {
                let (keys, entries): (Vec<Vec<u8>>, Vec<HandoffEntry>) = batch.into_iter().unzip();
                let ok = !refused.contains(&node)
                    && match self.send_handoff(&node, entries).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::debug!(%node, error = %e, "cleanup handoff failed; keys kept for a later round");
                            refused.push(node.clone());
                            false
                        }
                    };
                droppable.extend(cleanup.on_batch(&keys, ok));
            }
            let replica = Arc::clone(&self.replica);
            let wanted = droppable.len();
            let dropped = tokio::task::spawn_blocking(move || -> Result<usize, ClusterError> {
                let mut removed = 0;
                for (key, expected) in droppable {
                    if replica.remove_if_unchanged_with(&key, &expected, Durability::Buffered)? {
                        removed += 1;
                    }
                }
                replica.storage().sync().map_err(internal)?;
                Ok(removed)
            })
            .await
            .map_err(internal)??;
            if dropped < wanted {
                cleanup.kept_changed();
            }
            removed += dropped;
        }
        let state = self.state();
        if !cleanup.record(&state, &mut self.cleanup_marker.lock()) {
            return Ok(removed);
        }
        let version = cleanup.ring_version();
        if removed > 0 {
            tracing::info!(
                version,
                keys = removed,
                "dropped keys this node no longer replicates"
            );
        }
        Ok(removed)
    }

    /// A write stored here for a key this node no longer replicates (its ring changed while
    /// the write was under way) would outlive the cleanup of that ring: ask for another one.
    pub(crate) fn check_orphan(&self, bucket: &str, key: &str, n_val: u32) {
        let state = self.state();
        let partition = partition_of(&state, bucket, key);
        self.cleanup_marker
            .lock()
            .on_stored(&state, &self.me, partition, n_val);
    }

    /// Whether this node has left the cluster.
    pub fn has_exited(&self) -> bool {
        self.state()
            .member(&self.me)
            .is_some_and(|m| m.status == MemberStatus::Exiting)
    }
}

/// A storage key's bucket and key as text (`None` when it is not an object key).
fn key_names(storage_key: &[u8]) -> Option<(String, String)> {
    let (bucket, key) = keys::split_object_key(storage_key)?;
    Some((
        String::from_utf8_lossy(bucket).into_owned(),
        String::from_utf8_lossy(key).into_owned(),
    ))
}

/// The partition of a key in the state's current ring.
fn partition_of(state: &ClusterState, bucket: &str, key: &str) -> PartitionId {
    state
        .ring
        .current
        .partition_of_hash(&key_hash(bucket.as_bytes(), key.as_bytes()))
}

/// The HTTP status and message of a cluster error.
pub fn error_status(e: &ClusterError) -> (u16, String) {
    match e {
        ClusterError::Request(request) => (request.status(), request.to_string()),
        ClusterError::Replica(ReplicaError::Write(_)) => (409, e.to_string()),
        ClusterError::Replica(ReplicaError::Precondition(_)) => (412, e.to_string()),
        ClusterError::Replica(_) | ClusterError::Internal(_) => (500, e.to_string()),
        ClusterError::Membership(_) => (400, e.to_string()),
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
