//! The data plane's view of its node (issue 18's cutover; docs/architecture.md, *One node*).
//!
//! The control plane is core's `Node`, owned by the driver (`crate::driver`): membership and
//! gossip, failure detection, and the background rounds (hint delivery, transition handoff,
//! cleanup, anti-entropy, tombstone reaping). The data plane (the HTTP handlers, the peer
//! handler's replica calls, the request machines of `crate::requests`) runs on any tokio
//! worker and reads what the driver publishes; what matters to the node goes to it over the
//! driver's inbox: a peer's sign of life, a replica's newer state, a stored key that may
//! stray, a hint kept, an administrative change.
//!
//! Invariants:
//! - the state read here is the one the node last wrote to disk (`Published::state`): a
//!   request never acts on a ring the node could forget in a crash;
//! - a replica's newer state (a `StaleRing` refusal) is merged by the node and published
//!   before the refused request re-plans ([`Cluster::merge_peer_state`]);
//! - an administrative change (bucket properties, security, leave, join) is answered once
//!   the node made it and wrote the state that holds it;
//! - every key stored here that may lie outside this node's preference lists is reported to
//!   the node (`dynakv_core::handoff::may_stray`), so its cleanup runs again.

use crate::aae::{AaeRecord, AaeTrees};
use crate::clock::WallClock;
use crate::driver::transport::{StopHook, TransportEnv};
use crate::driver::{ContactGate, Driver, DriverInbox, DriverInput, Respond, SubmitError};
use crate::replica::{Replica, ReplicaError, ReplicaRun};
use crate::sync_barrier::SyncBarrier;
use crate::transport::{PeerClient, PeerInfo};
use dynakv_core::bucket::{BucketProps, PropsCache};
use dynakv_core::context::ContextKey;
use dynakv_core::gossip;
use dynakv_core::keys;
use dynakv_core::membership::{self, ClusterState, Member, MemberStatus};
use dynakv_core::message::PeerMessage;
use dynakv_core::node::{
    ClientOp, ClientResult, Node, NodeConfig, NodeParts, Observation, Timings,
};
use dynakv_core::object::Object;
use dynakv_core::request::RequestError;
use dynakv_core::ring::{NodeId, PartitionId, key_hash};
use dynakv_core::rng::SeededRng;
use dynakv_core::security::SecurityChange;
use dynakv_core::serve::{self, HintOutcome, Reply, ServeContext, ServeError, StorageCall};
use dynakv_core::storage::{Durability, Storage, Table};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

use dynakv_core::limits::{
    DEFAULT_REQUEST_TIMEOUT_MS, LIST_PAGE_KEYS, MAX_AAE_KEYS_PER_EXCHANGE, MAX_HINTS_PER_TARGET,
};
/// Meta-table key of the context secret of versions before `cluster.secret` (read once, to
/// upgrade; no longer written).
const META_SECRET: &[u8] = b"cluster_secret";

/// Timeouts of the cluster protocol.
#[derive(Debug, Clone, Copy)]
pub struct ClusterTimeouts {
    /// One replica request (get, put, handoff batch).
    pub request: Duration,
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

    /// The node's timings: the server's (`Timings::SERVER`) with this request timeout and
    /// the configured anti-entropy and flush intervals.
    pub fn timings(&self, aae_interval_ms: u64, flush_interval_ms: u64) -> Timings {
        let request_ms = millis(self.request);
        Timings {
            request_ms,
            forward_ms: millis(self.forward()),
            aae_interval_ms,
            flush_interval_ms,
            ..Timings::SERVER
        }
    }
}

impl Default for ClusterTimeouts {
    fn default() -> Self {
        ClusterTimeouts {
            request: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
    /// The node refused or failed an administrative request (its status and reason).
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error("internal: {0}")]
    Internal(String),
}

impl From<SubmitError> for ClusterError {
    fn from(e: SubmitError) -> Self {
        ClusterError::Refused {
            status: 503,
            message: e.to_string(),
        }
    }
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
    /// The node's settings: the properties of a bucket the cluster state sets none for
    /// (Riak's `default_bucket_props`), its timings and the tombstone grace period.
    pub node: NodeConfig,
    /// What to do when the node stops on a storage failure.
    pub on_stop: Option<StopHook>,
}

/// One node as its data plane sees it, over the driver of its control plane.
#[derive(Debug)]
pub struct Cluster {
    me: NodeId,
    /// The context MAC key (derived from the cluster secret at start; never changes).
    secret: ContextKey,
    replica: Arc<Replica>,
    aae: Arc<AaeTrees>,
    client: PeerClient<PeerMessage>,
    timeouts: ClusterTimeouts,
    driver: Driver,
    inbox: DriverInbox,
    env: Arc<TransportEnv>,
    contacts: ContactGate,
    parsed_props: RwLock<PropsCache>,
    admission: Admission,
    syncs: Option<Arc<SyncBarrier>>,
    clock: WallClock,
    /// The properties of a bucket the cluster state sets none for.
    default_props: BucketProps,
    /// Round trips of the data plane's replica writes and reads (`dynakv_core::pbs`).
    pbs: parking_lot::Mutex<dynakv_core::pbs::Samples>,
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ClusterError {
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

/// Ask the cluster at `seed` to admit `me`, a new node whose state is `state` (its own
/// one-node cluster); returns the cluster's state to adopt. The rules are the core's
/// `gossip` (who may ask, the request, the reading of the answer); this is `--join` at
/// startup, before the node's control plane runs (a running node joins through it:
/// [`Cluster::join`]).
///
/// # Errors
/// `Membership` when the node may not join or the cluster refused it; `Membership` starting
/// "cannot reach" when the seed could not be asked.
pub async fn join_at_start(
    client: &PeerClient<PeerMessage>,
    (state, me): (&ClusterState, &NodeId),
    holds_data: bool,
    seed: SocketAddr,
    timeout: Duration,
) -> Result<ClusterState, ClusterError> {
    gossip::check_can_join(state, holds_data)
        .map_err(|e| ClusterError::Membership(e.to_string()))?;
    let message = gossip::join_request(state, me)
        .ok_or_else(|| ClusterError::Internal("no member entry for this node".into()))?;
    let reply = client
        .request(seed, message, timeout)
        .await
        .map_err(|e| ClusterError::Membership(format!("cannot reach {seed}: {e}")))?;
    gossip::join_answer(Some(reply)).map_err(|e| ClusterError::Membership(format!("{seed} {e}")))
}

fn peer_addr(member: &Member) -> Option<SocketAddr> {
    member.peer_addr.parse().ok()
}

impl Cluster {
    /// Start the node `me` over `state` (written first) and its driver.
    ///
    /// # Errors
    /// The node could not be opened, or its thread not spawned.
    pub fn start(
        me: NodeId,
        state: ClusterState,
        secret: ContextKey,
        parts: ClusterParts,
    ) -> Result<Cluster, ClusterError> {
        let ClusterParts {
            replica,
            storage,
            client,
            timeouts,
            aae,
            syncs,
            clock,
            node,
            on_stop,
        } = parts;
        let runtime = tokio::runtime::Handle::try_current().map_err(internal)?;
        let env = Arc::new(TransportEnv::new(
            client.clone(),
            runtime,
            timeouts.forward(),
            (syncs.clone(), Arc::clone(&storage)),
            clock,
        ));
        if let Some(hook) = on_stop {
            env.on_stop(hook);
        }
        let default_props = node.props.clone();
        let node_parts = NodeParts {
            storage: Arc::clone(&storage),
            replica: Arc::clone(&replica),
            aae: Arc::clone(&aae),
        };
        let rng = SeededRng::new(rand::random());
        let (node, first) = Node::over(me.clone(), state, node, node_parts, rng, 0)
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        let driver =
            Driver::start(node, first, storage, Arc::clone(&env) as _).map_err(internal)?;
        Ok(Cluster {
            inbox: driver.inbox(),
            driver,
            me,
            secret,
            replica,
            aae,
            client,
            timeouts,
            env,
            contacts: ContactGate::default(),
            parsed_props: RwLock::new(PropsCache::default()),
            admission: Admission::default(),
            pbs: parking_lot::Mutex::new(dynakv_core::pbs::Samples::default()),
            syncs,
            clock,
            default_props,
        })
    }

    /// Stop the control plane (it gossips no more) and wait for its thread.
    pub fn stop(&self) {
        self.driver.shut_down();
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

    /// The cluster state as the node last wrote it.
    pub fn state(&self) -> Arc<ClusterState> {
        Arc::clone(&self.driver.published().state)
    }

    pub fn secret(&self) -> &ContextKey {
        &self.secret
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
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

    /// Ask the node to carry out an administrative `op`, and wait for its answer (given once
    /// the change is made and the state holding it written).
    async fn admin(&self, op: ClientOp) -> Result<(), ClusterError> {
        match self
            .ask(|reply| DriverInput::Admin { op, reply }, None)
            .await?
        {
            ClientResult::Done => Ok(()),
            ClientResult::Failed { status, message } => {
                Err(ClusterError::Refused { status, message })
            }
            other => Err(internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Set (or, with `None`, reset) a bucket's properties cluster-wide; answered once written.
    /// A change that would make one custom bucket too many is refused (400) and changes
    /// nothing (the node's `set_bucket_props`: the core's `check_custom_bucket_room`).
    ///
    /// # Errors
    /// Refused, or the state could not be written (500).
    pub async fn set_bucket_props(
        &self,
        bucket: &str,
        props: Option<&BucketProps>,
    ) -> Result<(), ClusterError> {
        self.admin(ClientOp::SetBucketProps {
            bucket: bucket.to_owned(),
            props: props.cloned(),
        })
        .await
    }

    /// Create, activate or update a bucket type cluster-wide (the core's
    /// `bucket_types::apply`); answered once written.
    ///
    /// # Errors
    /// Refused (400, 404, 409), or the state could not be written (500).
    pub async fn change_bucket_type(
        &self,
        change: dynakv_core::bucket_types::TypeChange,
    ) -> Result<(), ClusterError> {
        self.admin(ClientOp::BucketType(change)).await
    }

    /// A key's preference list on the current ring (HTTP's and PB's answer; every entry is
    /// reported primary).
    pub fn preflist(
        &self,
        bucket: &str,
        key: &str,
    ) -> Vec<(dynakv_core::ring::PartitionId, dynakv_core::ring::NodeId)> {
        let n = self
            .bucket_props(bucket)
            .n_val
            .clamp(1, dynakv_core::limits::MAX_N_VAL) as usize;
        let state = self.state();
        let ring = &state.ring.current;
        ring.preference_list(ring.partition_of(bucket.as_bytes(), key.as_bytes()), n)
    }

    /// Apply a client's properties update (`{"props":{...}}`'s inner object) to `bucket`'s
    /// current properties and set the result cluster-wide (HTTP's and PB's set); a bad
    /// update is refused with its reason and changes nothing.
    ///
    /// # Errors
    /// The update is invalid (400), or refused or not written (see `set_bucket_props`).
    pub async fn update_bucket_props(
        &self,
        bucket: &str,
        update: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ClusterError> {
        let mut props = self.bucket_props(bucket);
        let name = dynakv_core::bucket_types::split_bucket(bucket).1;
        props
            .apply_to_bucket(name, update)
            .map_err(|e| ClusterError::Refused {
                status: 400,
                message: e.to_string(),
            })?;
        self.set_bucket_props(bucket, Some(&props)).await
    }

    /// The internal name of `bucket` of `bucket_type`, when the type is active (`default`
    /// always is); else why not.
    pub fn typed_bucket(&self, bucket_type: &str, bucket: &str) -> Result<String, String> {
        use dynakv_core::bucket_types::{internal_bucket, is_active};
        if !is_active(&self.state(), bucket_type) {
            return Err(format!("no active bucket type named {bucket_type:?}"));
        }
        Ok(internal_bucket(bucket_type, bucket))
    }

    /// Change the security state (users, sources, grants, enabled), all or nothing, stamped
    /// with this node's wall clock and name; gossip spreads it. Answered once written.
    ///
    /// # Errors
    /// Refused (400), or the state could not be written (500).
    pub async fn change_security(&self, change: SecurityChange) -> Result<(), ClusterError> {
        self.admin(ClientOp::Security(change)).await
    }

    /// Ask for this node to leave the cluster. Answered once written.
    ///
    /// # Errors
    /// Refused (400), or the state could not be written (500).
    pub async fn leave(&self) -> Result<(), ClusterError> {
        self.admin(ClientOp::Leave).await
    }

    /// Take `node`, gone for good, out of the ring at once, without handoff (Riak's
    /// `force-remove`); answered once this node made the change and wrote it.
    ///
    /// # Errors
    /// Not a member, this node itself, the last node, a transition in progress (400).
    pub async fn force_remove(&self, node: &str) -> Result<(), ClusterError> {
        self.admin(ClientOp::ForceRemove {
            node: NodeId(node.to_owned()),
        })
        .await
    }

    /// Ask the cluster at `seed` to admit this running node (one attempt; the node refuses
    /// peers meanwhile and adopts the cluster's state when admitted).
    ///
    /// # Errors
    /// The node may not join, the seed refused it (400) or could not be asked (503, with
    /// the transport's reason).
    pub async fn join(&self, seed: SocketAddr) -> Result<(), ClusterError> {
        let via = TransportEnv::seed_name(seed);
        self.env
            .add_seed(via.clone(), seed)
            .map_err(ClusterError::Membership)?;
        self.admin(ClientOp::Join { via: via.clone() })
            .await
            .map_err(|e| match (e, self.env.seed_error(&via)) {
                (ClusterError::Refused { status, message }, Some(why)) => ClusterError::Refused {
                    status,
                    message: format!("{message}: {why}"),
                },
                (e, _) => e,
            })?;
        tracing::info!(%seed, "joined the cluster");
        Ok(())
    }

    /// The peer links' check of a peer's name and key (both sides, after each handshake): a
    /// name that a member holds under another key is refused while that member is up (a
    /// second process cannot take a live member's place); a member that is down may come back
    /// under a new key (a node restarted with an empty data directory), which its join then
    /// records.
    pub fn verify_peer(&self, name: &str, key: &[u8; 32]) -> Result<(), String> {
        let id = NodeId(name.to_owned());
        let state = self.state();
        if id == self.me {
            let mine = state.member(&id).and_then(|m| m.public_key);
            if mine.is_some_and(|mine| &mine != key) {
                return Err(format!("node name {name:?} is this node's own"));
            }
            return Ok(());
        }
        let known = state
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

    /// Whether a member is believed up: the node's failure detector says so (heartbeats
    /// moving, a recent sign of life, or too early to tell), and the transport is not
    /// backing off from its address.
    pub fn is_up(&self, id: &NodeId) -> bool {
        if id == &self.me {
            return true;
        }
        let published = self.driver.published();
        if let Some(addr) = published.state.member(id).and_then(peer_addr)
            && self.client.unreachable_peers().contains(&addr)
        {
            return false;
        }
        published.up.contains(id)
    }

    /// The peer protocol version this node speaks with member `id`: its own newest for
    /// itself, the version of its live connection to `id` for another (`None`: no connection
    /// open now).
    pub fn protocol_of(&self, id: &NodeId) -> Option<u16> {
        if id == &self.me {
            return Some(self.client.newest_version());
        }
        let addr = self.peer_address(id)?;
        self.client
            .protocol_versions()
            .into_iter()
            .find(|(peer, _)| *peer == addr)
            .map(|(_, version)| version)
    }

    /// Milliseconds on the node's monotonic clock (the one of the anti-entropy records).
    pub fn monotonic_ms(&self) -> u64 {
        self.driver.monotonic_ms()
    }

    /// Tell the node that `node` just answered or sent us something: it is up, whatever its
    /// gossiped heartbeat says (at most one report per peer per `CONTACT_REPORT_INTERVAL`).
    pub fn observe_contact(&self, node: &NodeId) {
        if node != &self.me && self.contacts.report(node, Instant::now()) {
            self.observe(Observation::Contact(node.clone()));
        }
    }

    fn observe(&self, observation: Observation) {
        if let Err(e) = self.inbox.submit(DriverInput::Observed(observation)) {
            tracing::warn!(error = %e, "an observation for the node was dropped");
        }
    }

    /// Have the node merge a replica's newer state (its `StaleRing` refusal); returns once
    /// the merged state is published, so the refused request re-plans on it.
    ///
    /// # Errors
    /// The node could not take it (busy or stopped).
    pub(crate) async fn merge_peer_state(&self, other: &ClusterState) -> Result<(), ClusterError> {
        let state = Box::new(other.clone());
        self.ask(|merged| DriverInput::Merge { state, merged }, None)
            .await?;
        Ok(())
    }

    /// Submit the input `input` builds around its reply, and wait for the reply (at most
    /// `within`, when given).
    ///
    /// # Errors
    /// 503: the node is busy or stopped, or did not answer in time.
    async fn ask<T: Send + 'static>(
        &self,
        input: impl FnOnce(Respond<T>) -> DriverInput,
        within: Option<Duration>,
    ) -> Result<T, ClusterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inbox.submit(input(Box::new(move |reply| {
            let _ = tx.send(reply);
        })))?;
        let answer = match within {
            Some(within) => {
                tokio::time::timeout(within, rx)
                    .await
                    .map_err(|_| ClusterError::Refused {
                        status: 503,
                        message: "the node's control plane did not answer in time".into(),
                    })?
            }
            None => rx.await,
        };
        Ok(answer.map_err(|_| SubmitError::Stopped)?)
    }

    /// A key was stored here: tell the node when it may be one this node does not replicate
    /// (a write, read repair or hint planned under an older ring), so its cleanup runs again.
    pub(crate) fn check_orphan(&self, bucket: &str, key: &str, n_val: u32) {
        let state = self.state();
        let partition = partition_of(&state, bucket, key);
        if dynakv_core::handoff::may_stray(&state, &self.me, partition, n_val) {
            self.observe(Observation::Stored {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
    }

    /// The peer address of a member.
    /// Record a replica round trip of the data plane (`dynakv_core::pbs`).
    pub(crate) fn record_round_trip(&self, kind: dynakv_core::pbs::Kind, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.pbs.lock().record(kind, us);
    }

    /// A copy of the replica round trips measured here.
    pub fn pbs_samples(&self) -> dynakv_core::pbs::Samples {
        self.pbs.lock().clone()
    }

    /// The anti-entropy trees and their index (a partition's keys: backup pages).
    pub(crate) fn aae(&self) -> &Arc<AaeTrees> {
        &self.aae
    }

    pub(crate) fn peer_address(&self, node: &NodeId) -> Option<SocketAddr> {
        self.state().member(node).and_then(peer_addr)
    }

    pub(crate) fn client(&self) -> &PeerClient<PeerMessage> {
        &self.client
    }

    pub(crate) fn timeouts(&self) -> &ClusterTimeouts {
        &self.timeouts
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

    /// Keep a hint for `target` (a put's replica that did not answer), bounded per target;
    /// the node counts it and delivers it when the target is back.
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
            Ok(Ok(kept)) => {
                if !kept {
                    tracing::warn!(%target, limit = MAX_HINTS_PER_TARGET, "hint store for this node is full: relying on read repair and anti-entropy");
                }
                self.observe(Observation::Hint { kept });
            }
            Ok(Err(e)) => tracing::error!(%target, error = %e, "cannot store a hint"),
            Err(e) => tracing::error!(%target, error = %e, "hint task failed"),
        }
    }

    /// Hint counters (the node's) and the hinted keys held per target.
    pub fn hint_stats(&self) -> HintStats {
        let stats = self.driver.published().stats;
        HintStats {
            stored_total: stats.hints_stored,
            delivered_total: stats.hints_delivered,
            dropped_total: stats.hints_dropped,
            corrupt_total: stats.hints_corrupt,
            per_target: self.replica.hint_counts(),
        }
    }

    /// Tombstones reaped by this node as the first primary of their keys.
    pub fn tombstones_reaped(&self) -> u64 {
        self.driver.published().stats.tombstones_reaped
    }

    /// The admission controller of background work.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Adjust the anti-entropy budget from the foreground p99 of the last interval, and give
    /// it to the node.
    pub fn admit(&self, p99_us: u64) -> usize {
        let budget = self.admission.observe_p99_us(p99_us);
        if let Err(e) = self.inbox.submit(DriverInput::Budget(budget)) {
            tracing::debug!(error = %e, "the anti-entropy budget was not passed on");
        }
        budget
    }

    /// Anti-entropy state per partition.
    /// Each record's `last_exchange_ms` is by [`Cluster::monotonic_ms`].
    pub fn aae_report(&self) -> Vec<(u32, u64, AaeRecord)> {
        let entries = self.aae.entries();
        let records = Arc::clone(&self.driver.published().aae_records);
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

    /// Send a message of the node's protocol (gossip, a join) to the node and wait for its
    /// answer.
    async fn ask_node(&self, from: &PeerInfo, message: PeerMessage) -> PeerMessage {
        let from = NodeId(from.node_name.clone());
        let input = |reply| DriverInput::Peer {
            from,
            message,
            reply,
        };
        self.ask(input, Some(self.timeouts.request))
            .await
            .unwrap_or_else(|e| PeerMessage::Error(e.to_string()))
    }

    /// Tell the node what a peer's link established (its clock offset, the key it proved).
    fn hello(&self, from: &PeerInfo) {
        let input = DriverInput::Hello {
            peer: NodeId(from.node_name.clone()),
            offset_ms: from.clock_offset_ms,
            key: Some(from.public_key),
        };
        if let Err(e) = self.inbox.submit(input) {
            tracing::debug!(error = %e, "a peer's hello was not passed on");
        }
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
        ClusterError::Replica(replica) => (replica.status(), e.to_string()),
        ClusterError::Internal(_) => (500, e.to_string()),
        ClusterError::Membership(_) => (400, e.to_string()),
        ClusterError::Refused { status, message } => (*status, message.clone()),
    }
}

mod peer;
#[cfg(test)]
mod tests;
