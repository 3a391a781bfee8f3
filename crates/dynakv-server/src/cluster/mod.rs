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
use dynakv_core::anti_entropy::AaeRound;
use dynakv_core::bucket::{BucketProps, CustomBucketError, PropsCache};
use dynakv_core::context::ContextKey;
use dynakv_core::coordinator::{ReapAnswer, reap_candidates};
use dynakv_core::failure::FailureDetector;
use dynakv_core::gossip;
use dynakv_core::handoff::CleanupMarker;
use dynakv_core::keys;
use dynakv_core::membership::{self, ClusterState, Member, MemberStatus};
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
    DEFAULT_REQUEST_TIMEOUT_MS, HANDOFF_BATCH_KEYS, LIST_PAGE_KEYS, MAX_AAE_KEYS_PER_EXCHANGE,
    MAX_HINTS_PER_TARGET, MAX_REAPS_PER_ROUND, SCAN_PAGE_KEYS,
};
/// A member whose heartbeat has not moved for this long is considered down.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
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
    parsed_props: RwLock<PropsCache>,
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
    let Some(state) = membership::load_persisted(storage).map_err(ClusterError::Internal)? else {
        return Ok(None);
    };
    let legacy = storage
        .get(Table::Meta, META_SECRET)
        .map_err(internal)?
        .and_then(|secret| <[u8; 32]>::try_from(secret.as_slice()).ok());
    Ok(Some((state, legacy)))
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
    membership::store_persisted(storage, state).map_err(ClusterError::Internal)?;
    *written = seq;
    Ok(())
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
            parsed_props: RwLock::new(PropsCache::default()),
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
            let durable_change = !next.persists_as(&guard);
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

    /// Wait until the current state is on disk: an administrative change (bucket properties,
    /// security, leave) is acknowledged only then, while gossip's changes are written in the
    /// background.
    ///
    /// # Errors
    /// The write failed.
    pub async fn persisted(self: &Arc<Self>) -> Result<(), ClusterError> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.persist_now())
            .await
            .map_err(internal)?
    }

    /// A bucket's properties as the cluster knows them.
    pub fn bucket_props(&self, bucket: &str) -> BucketProps {
        let state = self.state();
        let cached = self
            .parsed_props
            .read()
            .cached(&state, bucket, &self.default_props);
        cached.unwrap_or_else(|| {
            self.parsed_props
                .write()
                .props(&state, bucket, &self.default_props)
        })
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
        let now_ms = self.now_ms();
        Ok(self.update_state(|state| {
            dynakv_core::bucket::set_props(state, bucket, props, &self.me, now_ms)
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

    /// Merge a peer's state (gossip, `StaleRing`): the core's `gossip::merge`, under the
    /// state's write lock.
    fn merge_state(&self, other: &ClusterState) -> Result<(), ClusterError> {
        let now = self.monotonic_ms();
        self.update_state(|state| {
            gossip::merge(state, &mut self.failure_detector.lock(), now, other)
        })
        .map_err(|e| ClusterError::Membership(e.to_string()))
    }

    /// A peer's gossip, answered with this node's state (the core's `gossip::on_gossip`).
    pub(super) fn on_gossip(&self, theirs: &ClusterState) -> PeerMessage {
        let now = self.monotonic_ms();
        self.update_state(|state| {
            gossip::on_gossip(state, &mut self.failure_detector.lock(), now, theirs)
        })
    }

    // ----- reads -----

    /// Merge `object` into this node's copy (`Replica::merge`), then check whether this node
    /// now holds a key it does not replicate: a read repair planned under an older ring may
    /// land after this node's cleanup.
    pub(crate) async fn merge_local(
        &self,
        bucket: &str,
        key: &str,
        object: &Object,
        props: &BucketProps,
        durability: Durability,
    ) -> Result<(), ClusterError> {
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
        self.check_orphan(bucket, key, props.n_val);
        Ok(())
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

    /// Ask the cluster at `seed` to admit this node; adopt its state and secret (the rules
    /// are the core's `gossip`: who may ask, the request, the reading of the answer).
    pub async fn join(&self, seed: SocketAddr) -> Result<(), ClusterError> {
        let holds_data = {
            let replica = Arc::clone(&self.replica);
            tokio::task::spawn_blocking(move || replica.holds_data())
                .await
                .map_err(internal)??
        };
        let state = self.state();
        gossip::check_can_join(&state, holds_data)
            .map_err(|e| ClusterError::Membership(e.to_string()))?;
        let message = gossip::join_request(&state, &self.me)
            .ok_or_else(|| ClusterError::Internal("no member entry for this node".into()))?;
        let reply = self
            .client
            .request(seed, message, self.timeouts.request)
            .await
            .map_err(|e| ClusterError::Membership(format!("cannot reach {seed}: {e}")))?;
        let state = gossip::join_answer(Some(reply))
            .map_err(|e| ClusterError::Membership(format!("{seed} {e}")))?;
        *self.state.write() = Arc::new(state);
        self.awaiting_join.store(false, Ordering::Release);
        self.persist_now()?;
        tracing::info!(%seed, "joined the cluster");
        Ok(())
    }

    /// Change the security state (users, sources, grants, enabled) here, all or nothing,
    /// stamped with this node's wall clock and name; gossip spreads it.
    pub fn change_security(
        &self,
        change: &dynakv_core::security::SecurityChange,
    ) -> Result<(), dynakv_core::security::SecurityError> {
        let now_ms = self.now_ms();
        let me = self.me.0.clone();
        self.update_state(|state| change.apply(&mut state.security, now_ms, &me))
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

    /// One gossip round: the core's `gossip::start_round` (beat, a partner among the members
    /// that have not exited: `pick`), the exchange, then `gossip::end_round` (merge the reply,
    /// plan if claimant).
    pub async fn gossip_round(&self, pick: usize) {
        let me = self.me.clone();
        let started = self.update_state(|state| gossip::start_round(state, &me, |n| pick % n));
        let mut reply = None;
        if let Some((peer, message)) = started {
            let exchanged = match self.peer_address(&peer) {
                Some(addr) => self
                    .client
                    .request(addr, message, self.timeouts.gossip)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("no address".to_owned()),
            };
            match exchanged {
                Ok(answer) => {
                    self.observe_contact(&peer);
                    reply = Some(answer);
                }
                Err(e) => tracing::debug!(%peer, error = %e, "gossip exchange failed"),
            }
        }
        let now = self.monotonic_ms();
        let (planned, refused) = self.update_state(|state| {
            gossip::end_round(
                state,
                &me,
                &mut self.failure_detector.lock(),
                now,
                reply.as_ref(),
            )
        });
        if let Some(e) = refused {
            tracing::warn!(error = %e, "gossip merge refused");
        }
        if planned {
            let s = self.state();
            tracing::info!(
                version = s.ring.version,
                transition = s.ring.next.is_some(),
                "ring plan changed"
            );
        }
    }

    /// Whether this node has left the cluster.
    pub fn has_exited(&self) -> bool {
        self.state()
            .member(&self.me)
            .is_some_and(|m| m.status == MemberStatus::Exiting)
    }
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

mod aae;
mod handoff;
mod hints;
mod peer;
mod reap;
#[cfg(test)]
mod tests;
