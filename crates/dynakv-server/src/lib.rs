//! dynakv-server: the tokio shell around dynakv-core.
//!
//! It opens storage, loads or creates the node's identity, serves the Riak-compatible HTTP API,
//! runs the background loops (the buffered-write flusher) and shuts down cleanly: on a
//! shutdown signal it stops accepting requests, lets in-flight ones finish, flushes storage and
//! returns.

pub mod aae;
pub mod auth;
pub mod causality;
pub mod clock;
pub mod config;
pub mod datatypes;
pub mod driver;
pub mod http;
pub mod http_serve;
pub mod identity;
pub mod link;
pub mod load_limit;
pub mod pb;
pub mod replica;
pub mod requests;
pub mod secrets;
pub mod security_api;
pub mod stats;
pub mod sync_barrier;
pub mod tls;
pub mod transport;
pub mod view;

use config::{ServerConfig, StorageKind};
use dynakv_core::membership::{ClusterState, Member, MemberStatus};
use dynakv_core::message::PeerMessage;
use dynakv_core::ring::NodeId;
use dynakv_core::storage::Storage;
use dynakv_storage::{
    BufferedStorage, FaultyStorage, FjallOptions, FjallStorage, MemoryStorage, OpenError,
};
use identity::NodeIdentity;
use replica::Replica;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use transport::{PeerClient, TransportConfig};
use view::{Cluster, ClusterTimeouts};

/// The Riak KV version advertised to clients for feature detection: new-style
/// `/buckets/...` URLs, no bucket types, no datatypes.
pub const RIAK_COMPAT_VERSION: &str = "2.1.4";

/// Why a server could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot open storage in {path}: {message}")]
    Storage { path: String, message: String },
    #[error(
        "cannot open storage in {path}: {message}. The data directory is damaged and will not \
         open again. To bring this node back, move its data directory aside and start it with an \
         empty --data-dir and --join PEER_ADDR (a member's peer address): it comes back under a \
         new identity, and hinted handoff and anti-entropy restore its keys from the other \
         replicas (what only this node held is lost: hints it kept for others, writes \
         acknowledged with W=1 before they were replicated)"
    )]
    CorruptStorage { path: String, message: String },
    #[error(
        "cannot open storage in {path}: {message}. The engine's log line just before says \
         which file it could not recover: a file it does not expect in its directories (move \
         that file away and start again) or a damaged one. If a file is damaged, move the data \
         directory aside and start the node with an empty --data-dir and --join PEER_ADDR (a \
         member's peer address): it comes back under a new identity, and hinted handoff and \
         anti-entropy restore its keys from the other replicas"
    )]
    UnrecoverableStorage { path: String, message: String },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
    /// The storage engine failed while the node served (a sync of buffered writes failed:
    /// a full disk, an I/O error). What the engine holds after that is unknown, so the node
    /// stopped without marking a clean shutdown; [`supervise`] starts it again.
    #[error("storage failed while serving: {0}")]
    StorageFailed(String),
    #[error("cannot join the cluster: {0}")]
    Join(String),
    /// The cluster secret or the node key cannot be read, written, or is missing.
    #[error("{0}")]
    Secret(String),
    /// The client port's certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// A started node.
#[derive(Debug)]
pub struct RunningServer {
    /// The address the HTTP API listens on (useful with port 0).
    pub http_addr: SocketAddr,
    /// The address the peer transport listens on.
    pub peer_addr: SocketAddr,
    /// The address Riak's PB API listens on, if it was asked for.
    pub pb_addr: Option<SocketAddr>,
    pub name: String,
    pub cluster: Arc<Cluster>,
    shutdown: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Ask the node to stop; `wait` for it to finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Wait until the node has stopped.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Internal(e.to_string())),
        }
    }
}

fn open_storage(config: &ServerConfig) -> Result<Arc<dyn Storage>, ServerError> {
    let faults = config.storage_faults.clone();
    Ok(match config.storage {
        StorageKind::Memory => match faults {
            Some(switch) => Arc::new(FaultyStorage::with_switch(MemoryStorage::new(), switch)),
            None => Arc::new(MemoryStorage::new()),
        },
        StorageKind::Disk => {
            let dir = config.data_dir.join("fjall");
            std::fs::create_dir_all(&dir).map_err(|e| ServerError::Storage {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
            let options = FjallOptions {
                cache_size_bytes: config.cache_size_bytes,
                max_memtable_size_bytes: config.memtable_size_bytes,
                worker_threads: Some(config.storage_worker_threads),
                ..FjallOptions::default()
            };
            let storage = FjallStorage::open(&dir, options).map_err(|e| {
                let (path, message) = (dir.display().to_string(), e.to_string());
                match e {
                    OpenError::Corrupt(_) => ServerError::CorruptStorage { path, message },
                    OpenError::Unrecoverable(_) => {
                        ServerError::UnrecoverableStorage { path, message }
                    }
                    _ => ServerError::Storage { path, message },
                }
            })?;
            // Writes land in an in-memory buffer the flusher drains (paper 6.1), so no
            // foreground write waits on fjall's journal lock during an fsync.
            match faults {
                Some(switch) => Arc::new(FaultyStorage::with_switch(
                    BufferedStorage::new(storage),
                    switch,
                )),
                None => Arc::new(BufferedStorage::new(storage)),
            }
        }
    })
}

/// Open storage, load or found the cluster state, bind the peer and HTTP listeners, join a
/// cluster when asked, and start serving. Returns once the node is accepting requests.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let http = http_serve::HttpLimits {
        allowed_origins: config.allowed_origins.clone(),
        ..http_serve::HttpLimits::default()
    };
    start_with_http(config, http).await
}

/// [`start`] with the client HTTP port's limits given (timeouts, connection cap, budgets,
/// allowed origins; see [`http_serve::HttpLimits`]).
pub async fn start_with_http(
    config: ServerConfig,
    http_limits: http_serve::HttpLimits,
) -> Result<RunningServer, ServerError> {
    config.validate()?;
    // Before anything else starts: a certificate that cannot be used stops the node here.
    let tls = tls::optional_server_config(
        config.tls_cert_file.as_deref(),
        config.tls_key_file.as_deref(),
        config.tls_client_ca_file.as_deref(),
    )?;
    let storage = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_storage(&config))
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))??
    };
    let identity = {
        let storage = Arc::clone(&storage);
        let name = config.name.clone();
        tokio::task::spawn_blocking(move || NodeIdentity::load_or_create(storage.as_ref(), &name))
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))??
    };
    let peer_listener = tokio::net::TcpListener::bind(config.peer_addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.peer_addr,
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.http_addr,
            source,
        })?;
    let http_addr = listener.local_addr()?;
    let peer_addr = peer_listener.local_addr()?;
    let (pb_listener, pb_addr) = pb::bind(config.pb_addr).await?;
    let me = NodeId(identity.name.clone());
    let persisted = view::load_persisted(storage.as_ref()).map_err(cluster_error)?;
    let (cluster_secret, node_key) = {
        let config = config.clone();
        let legacy = persisted.as_ref().and_then(|(_, legacy)| *legacy);
        let joining = persisted.is_none() && config.join.is_some();
        tokio::task::spawn_blocking(move || load_secrets(&config, joining, legacy))
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))??
    };
    let member = Member {
        id: me.clone(),
        peer_addr: peer_addr.to_string(),
        http_addr: http_addr.to_string(),
        zone: config.zone.clone(),
        status: MemberStatus::Valid,
        version: 1,
        heartbeat: 0,
        public_key: Some(*node_key.public()),
    };
    let (state, fresh) = if let Some((mut state, _)) = persisted {
        // Addresses may change between runs (port 0, new flags), and a state from before node
        // keys has none: announce what is new.
        if let Some(known) = state.members.get_mut(&me)
            && (known.peer_addr != member.peer_addr
                || known.http_addr != member.http_addr
                || known.public_key != member.public_key)
        {
            known.peer_addr.clone_from(&member.peer_addr);
            known.http_addr.clone_from(&member.http_addr);
            known.public_key = member.public_key;
            known.version += 1;
        }
        (state, false)
    } else {
        let state = ClusterState::found(&config.cluster_name, member, config.ring_partitions)
            .map_err(|e| ServerError::Internal(e.to_string()))?;
        (state, true)
    };
    let public = !http_addr.ip().is_loopback() || pb_addr.is_some_and(|a| !a.ip().is_loopback());
    if !config.insecure && public && !state.security.enabled() {
        return Err(ServerError::Config(config::ConfigError::Invalid(format!(
            "the client port {http_addr} is reachable from other hosts and this cluster's \
             security is disabled: anyone who reaches it could read, write and reconfigure \
             everything. Bind it to a loopback address, enable security (see docs/SECURITY.md), \
             or start with --insecure"
        ))));
    }
    let secret = cluster_secret.context_key();
    let clock = clock::WallClock::skewed(config.clock_skew_ms);
    let mut transport_config = TransportConfig::new(
        &state.cluster_name,
        &identity.name,
        link::LinkKeys::new(&cluster_secret, &node_key),
    );
    transport_config.clock = clock;
    // The links check peers against the membership once the cluster exists (before, only
    // this node's own join runs, and any holder of the secret is accepted).
    let verifier_target: Arc<std::sync::OnceLock<std::sync::Weak<Cluster>>> = Arc::default();
    {
        let target = Arc::clone(&verifier_target);
        transport_config.verifier =
            Some(transport::PeerVerifier::new(move |name, key| match target
                .get()
                .and_then(std::sync::Weak::upgrade)
            {
                Some(cluster) => cluster.verify_peer(name, key),
                None => Ok(()),
            }));
    }
    let client = PeerClient::new(transport_config.clone());
    let unflushed = Arc::new(AtomicBool::new(false));
    // Durable writes wait for the flusher's group commit when a sync waits on the disk.
    let syncs = storage
        .may_wait_for_disk(Some(dynakv_core::storage::Durability::Fsync))
        .then(|| Arc::new(sync_barrier::SyncBarrier::default()));
    let replica = Arc::new(Replica::new(
        Arc::clone(&storage),
        identity.actor,
        Arc::clone(&unflushed),
    ));
    {
        let replica = Arc::clone(&replica);
        tokio::task::spawn_blocking(move || replica.load_hint_counts())
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))?
            .map_err(|e| ServerError::Internal(e.to_string()))?;
    }
    let timeouts = ClusterTimeouts {
        request: Duration::from_millis(config.request_timeout_ms),
    };
    let aae = Arc::new(aae::AaeTrees::new(
        state.ring.current.clone(),
        Arc::clone(&storage),
    ));
    {
        let (aae, replica) = (Arc::clone(&aae), Arc::clone(&replica));
        let trust_index = !identity.new_generation;
        let started = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            let report = aae.rebuild(trust_index);
            replica.attach_aae(aae);
            report
        })
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))?
        .map_err(ServerError::Internal)?;
        tracing::info!(
            entries = report.entries,
            from_index = report.from_index,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "anti-entropy trees built"
        );
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    // The node, once it runs: until then (a new node's `--join` in progress) peers are
    // refused (members that reach its address, say after it was wiped and restarted, would
    // otherwise gossip their state into it and its join would be refused).
    let node_slot: Arc<std::sync::OnceLock<Arc<Cluster>>> = Arc::default();
    let peer_task = {
        let slot = Arc::clone(&node_slot);
        let shutdown = wait_for_shutdown(shutdown_rx.clone());
        tokio::spawn(async move {
            let handler = move |from: transport::PeerInfo, message: PeerMessage| {
                let node = slot.get().cloned();
                async move {
                    match node {
                        Some(cluster) => cluster.handle_peer(from, message).await,
                        None => PeerMessage::Error(
                            dynakv_core::membership::AWAITING_JOIN_REFUSAL.to_owned(),
                        ),
                    }
                }
            };
            if let Err(e) =
                transport::serve(peer_listener, transport_config, handler, shutdown).await
            {
                tracing::error!(error = %e, "peer listener failed");
            }
        })
    };
    let state = match config.join {
        Some(seed) if fresh => {
            let joined =
                join_with_retries(&client, (&state, &me), &replica, seed, timeouts.request).await?;
            tracing::info!(%seed, "joined the cluster");
            joined
        }
        Some(_) => {
            tracing::info!("already a member of a cluster: --join ignored");
            state
        }
        None => state,
    };
    {
        // Written before anything is served (the node writes it again when it starts).
        let (storage, state) = (Arc::clone(&storage), state.clone());
        tokio::task::spawn_blocking(move || {
            dynakv_core::membership::store_persisted(storage.as_ref(), &state)
        })
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))?
        .map_err(ServerError::Internal)?;
    }
    let failure = StorageFailure {
        reason: Arc::new(std::sync::OnceLock::new()),
        stop_node: Arc::downgrade(&shutdown_tx),
    };
    let on_stop = {
        let (failure, syncs) = (failure.clone(), syncs.clone());
        driver::transport::StopHook(Box::new(move |error: String| {
            failure.engine_failed(&error, syncs.as_deref());
        }))
    };
    // The update is needed when the workspace builds the simulator too: feature unification
    // then gives `NodeConfig` its `sim` field.
    #[allow(clippy::needless_update)]
    let node_config = dynakv_core::node::NodeConfig {
        // No setting changes the default properties (Riak's `default_bucket_props`).
        props: dynakv_core::bucket::BucketProps::default(),
        timings: timeouts.timings(config.aae_interval_ms, config.flush_interval_ms),
        tombstone_grace_ms: config.tombstone_grace_ms,
        // The flusher below makes buffered writes durable, the node's and the data plane's.
        driver_flushes: true,
        ..dynakv_core::node::NodeConfig::default()
    };
    let cluster = Arc::new(
        Cluster::start(
            me,
            state,
            secret,
            view::ClusterParts {
                replica: Arc::clone(&replica),
                storage: Arc::clone(&storage),
                client,
                timeouts,
                aae,
                syncs: syncs.clone(),
                clock,
                node: node_config,
                on_stop: Some(on_stop),
            },
        )
        .map_err(cluster_error)?,
    );
    let _ = verifier_target.set(Arc::downgrade(&cluster));
    let _ = node_slot.set(Arc::clone(&cluster));
    cluster
        .admission()
        .set_target_p99_us(config.aae_latency_target_ms.saturating_mul(1000));
    let stats = Arc::new(stats::Stats::new().map_err(|e| ServerError::Internal(e.to_string()))?);
    let state = Arc::new(http::ApiState {
        cluster: Arc::clone(&cluster),
        node_name: identity.name.clone(),
        stats,
        max_value_bytes: config.max_value_bytes,
        limiter: Arc::new(
            load_limit::LoadLimiter::new(
                config.max_in_flight_requests,
                config.overload_latency_target_ms,
            )
            .map_err(|e| ServerError::Internal(e.to_string()))?,
        ),
        http: http::HttpGuards::new(http_limits),
    });
    if identity.new_generation {
        tracing::warn!(actor = %identity.actor, "the last run did not stop cleanly: this node writes under a new causal identity");
    }
    tracing::info!(node = %config.name, http = %http_addr, tls = tls.is_some(), peer = %peer_addr, pb = ?pb_addr, data_dir = %config.data_dir.display(), engine = storage.engine_name(), "node started");
    let limits = tokio::spawn(limit_loop(Arc::clone(&state.limiter), shutdown_rx.clone()));
    let admission = tokio::spawn(admission_loop(
        Arc::clone(&cluster),
        Arc::clone(&state.stats),
        config.aae_interval_ms,
        shutdown_rx.clone(),
    ));
    let flusher = Flusher {
        storage: Arc::clone(&storage),
        replica: Arc::clone(&replica),
        unflushed,
        interval_ms: config.flush_interval_ms,
        syncs,
        window: Duration::from_millis(config.group_commit_window_ms),
        stats: Arc::clone(&state.stats),
        failure,
    };
    let pb_task = pb_listener.map(|l| {
        tokio::spawn(pb::serve(
            l,
            Arc::clone(&state),
            tls.clone(),
            shutdown_rx.clone(),
        ))
    });
    let task = tokio::spawn(serve(
        listener,
        tls,
        state,
        storage,
        flusher,
        shutdown_rx,
        [peer_task, admission, limits]
            .into_iter()
            .chain(pb_task)
            .collect(),
    ));
    Ok(RunningServer {
        http_addr,
        peer_addr,
        pb_addr,
        name: config.name,
        cluster,
        shutdown: shutdown_tx,
        task,
    })
}

/// The cluster secret and this node's key, from the data directory, `--cluster-secret-file`,
/// or made new (see [`secrets`]). `joining`: a node with no cluster state asked to join, which
/// needs the secret of the cluster it joins. `legacy`: the context secret a data directory of
/// an earlier version kept (the same on every member), taken as the cluster secret once.
fn load_secrets(
    config: &ServerConfig,
    joining: bool,
    legacy: Option<[u8; 32]>,
) -> Result<(secrets::ClusterSecret, secrets::NodeKey), ServerError> {
    use secrets::{CLUSTER_SECRET_FILE, ClusterSecret, NodeKey};
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        ServerError::Secret(format!("cannot create {}: {e}", config.data_dir.display()))
    })?;
    let secret_error = |e: secrets::SecretError| ServerError::Secret(e.to_string());
    let node_key = NodeKey::load_or_create(&config.data_dir).map_err(secret_error)?;
    let own = config.data_dir.join(CLUSTER_SECRET_FILE);
    let stored = if own.exists() {
        Some(ClusterSecret::read(&own).map_err(secret_error)?)
    } else {
        None
    };
    let given = match &config.cluster_secret_file {
        Some(path) => Some(ClusterSecret::read(path).map_err(secret_error)?),
        None => None,
    };
    let secret = match (stored, given) {
        (Some(stored), Some(given)) if stored != given => {
            return Err(ServerError::Secret(format!(
                "{} holds another cluster's secret than {}: this data directory belongs to another cluster",
                own.display(),
                config
                    .cluster_secret_file
                    .as_deref()
                    .unwrap_or(own.as_path())
                    .display()
            )));
        }
        (Some(stored), _) => return Ok((stored, node_key)),
        (None, Some(given)) => given,
        (None, None) if joining => {
            return Err(ServerError::Secret(format!(
                "joining a cluster needs its secret: give --cluster-secret-file FILE, a copy of \
                 the {CLUSTER_SECRET_FILE} file in a member's data directory"
            )));
        }
        (None, None) => {
            if let Some(legacy) = legacy {
                tracing::warn!(
                    "this data directory predates cluster.secret: its context secret becomes the cluster secret (rotate it, see docs/SECURITY.md)"
                );
                ClusterSecret::from_bytes(legacy)
            } else {
                ClusterSecret::generate()
            }
        }
    };
    secret.write(&own).map_err(secret_error)?;
    Ok((secret, node_key))
}

/// First wait before a node stopped by a storage failure is started again.
pub const RESTART_DELAY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between attempts to start it again (the delay doubles per failed attempt).
pub const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// A node that served at least this long before its storage failed starts again after
/// `RESTART_DELAY_MIN`, not after the delay its previous restarts reached.
const STABLE_RUN: Duration = Duration::from_secs(60);

/// Serve with `server` (started from `config`) until `stop` turns true, then shut it down
/// cleanly. When its storage fails while it serves (a sync of buffered writes failed: a full
/// disk, an I/O error), the node stops itself without a clean-shutdown mark (see
/// [`ServerError::StorageFailed`]); this starts it again from `config` after
/// `RESTART_DELAY_MIN`, doubling the delay up to `RESTART_DELAY_MAX` while starting fails
/// (the engine's files still locked, the disk still full), so the node recovers from its
/// journal under a new causal identity once the disk works, without an operator. Returns the
/// node's error when it stops for any other reason, or a start fails for a reason retrying
/// cannot fix (configuration, join).
pub async fn supervise(
    server: RunningServer,
    config: ServerConfig,
    stop: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let mut server = server;
    // A restarted node listens where this one does (port 0 in the configuration would
    // otherwise move it).
    let mut config = config;
    config.http_addr = server.http_addr;
    config.peer_addr = server.peer_addr;
    config.pb_addr = server.pb_addr;
    let mut delay = RESTART_DELAY_MIN;
    loop {
        let started = std::time::Instant::now();
        let ended = tokio::select! {
            ended = &mut server.task => ended,
            () = wait_for_shutdown(stop.clone()) => {
                server.shutdown();
                return server.wait().await;
            }
        };
        let reason = match ended {
            Ok(Err(ServerError::StorageFailed(reason))) => reason,
            Ok(other) => return other,
            Err(e) => return Err(ServerError::Internal(e.to_string())),
        };
        if started.elapsed() >= STABLE_RUN {
            delay = RESTART_DELAY_MIN;
        }
        // The old node's engine must be closed before it is opened again: dropping the last
        // handle closes it; until then opening fails (fjall's lock) and is retried.
        drop(server);
        server = loop {
            tracing::warn!(
                node = %config.name,
                error = %reason,
                delay_ms = delay.as_millis() as u64,
                "restarting the node after a storage failure"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = wait_for_shutdown(stop.clone()) => return Ok(()),
            }
            delay = (delay * 2).min(RESTART_DELAY_MAX);
            let started = tokio::select! {
                started = start(config.clone()) => started,
                // Recovery can take long (a journal replay, the anti-entropy index rebuilt
                // under the new identity): a stop request does not wait for it.
                () = wait_for_shutdown(stop.clone()) => return Ok(()),
            };
            match started {
                Ok(server) => break server,
                Err(e @ (ServerError::Config(_) | ServerError::Join(_))) => return Err(e),
                Err(e) => tracing::error!(node = %config.name, error = %e, "restart failed"),
            }
        };
    }
}

#[allow(clippy::needless_pass_by_value)] // used as map_err(cluster_error)
fn cluster_error(e: view::ClusterError) -> ServerError {
    ServerError::Internal(e.to_string())
}

/// Number of attempts to reach the seed of `--join`.
const JOIN_ATTEMPTS: u32 = 30;
/// Attempts while the seed refuses this node's name as a live member's: a node restarted
/// with an empty data directory (a new key) is admitted once the cluster sees its old
/// process down (a few heartbeat timeouts); a second process beside a live member never is.
const JOIN_NAME_TAKEN_ATTEMPTS: u32 = 12;

/// `--join` of a new node (its own one-node cluster `state` as `me`): ask `seed` until it
/// answers; returns the cluster's state to adopt.
async fn join_with_retries(
    client: &PeerClient<PeerMessage>,
    (state, me): (&ClusterState, &NodeId),
    replica: &Arc<Replica>,
    seed: SocketAddr,
    timeout: Duration,
) -> Result<ClusterState, ServerError> {
    let holds_data = {
        let replica = Arc::clone(replica);
        tokio::task::spawn_blocking(move || replica.holds_data())
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))?
            .map_err(|e| ServerError::Internal(e.to_string()))?
    };
    let mut last = String::new();
    let mut name_taken = 0_u32;
    for attempt in 1..=JOIN_ATTEMPTS {
        match view::join_at_start(client, (state, me), holds_data, seed, timeout).await {
            Ok(state) => return Ok(state),
            Err(view::ClusterError::Membership(message))
                if !message.starts_with("cannot reach") =>
            {
                return Err(ServerError::Join(message));
            }
            // Another secret never becomes the right one.
            Err(e) if e.to_string().contains("cluster's secret") => {
                return Err(ServerError::Join(format!(
                    "{e}: --cluster-secret-file must be a copy of a member's cluster.secret"
                )));
            }
            Err(e) => {
                last = e.to_string();
                if last.contains("another key") {
                    name_taken += 1;
                    if name_taken >= JOIN_NAME_TAKEN_ATTEMPTS {
                        break;
                    }
                }
                tracing::warn!(attempt, error = %last, "join attempt failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Err(ServerError::Join(last))
}

/// The in-flight limit's adjustment, every `LIMIT_WINDOW_MS`, until shutdown.
async fn limit_loop(limiter: Arc<load_limit::LoadLimiter>, mut shutdown: watch::Receiver<bool>) {
    let period = Duration::from_millis(load_limit::LIMIT_WINDOW_MS);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = limiter.limit();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let adjustment = limiter.adjust();
        if adjustment.limit != last {
            tracing::debug!(
                limit = adjustment.limit,
                p99_us = adjustment.p99_us,
                samples = adjustment.samples,
                saturated = adjustment.saturated,
                "in-flight limit adjusted"
            );
            last = adjustment.limit;
        }
    }
}

/// Admission control of background work (paper 6.5): every anti-entropy interval, the
/// budget of the node's next rounds from the foreground p99 of the last interval.
async fn admission_loop(
    cluster: Arc<Cluster>,
    stats: Arc<stats::Stats>,
    interval_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = Duration::from_millis(interval_ms.max(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let p99_us = stats.take_recent_p99_us();
        let budget = cluster.admit(p99_us);
        tracing::trace!(p99_us, budget, "anti-entropy admission");
    }
}

async fn wait_for_shutdown(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<http::ApiState>,
    storage: Arc<dyn Storage>,
    flusher: Flusher,
    shutdown: watch::Receiver<bool>,
    others: Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), ServerError> {
    // The flusher outlives the request handlers (durable writes wait for it): it stops after
    // the HTTP server and the other tasks have.
    let (stop_flusher, flusher_stop) = watch::channel(false);
    let failed = Arc::clone(&flusher.failure.reason);
    let flusher = tokio::spawn(flush_loop(flusher, flusher_stop));
    let limits = state.http.limits.clone();
    let cluster = Arc::clone(&state.cluster);
    let app = http::router(state);
    http_serve::serve(listener, app, &limits, tls, wait_for_shutdown(shutdown)).await;
    for task in others {
        let _ = task.await;
    }
    // The control plane stops before the flusher: it gossips and hands off no more.
    let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
    let _ = stop_flusher.send(true);
    let _ = flusher.await;
    if let Some(reason) = failed.get() {
        // No final flush (the engine refuses writes) and no clean-shutdown mark: the next
        // start recovers from the engine's journal and takes a new causal identity.
        tracing::error!(error = %reason, "node stopped after a storage failure");
        return Err(ServerError::StorageFailed(reason.clone()));
    }
    // Whatever was buffered becomes durable before the process exits.
    let marker_storage = Arc::clone(&storage);
    let synced = tokio::task::spawn_blocking(move || storage.sync())
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    if let Err(e) = synced {
        tracing::error!(error = %e, "final flush failed");
        return Err(ServerError::Internal(e.to_string()));
    }
    let marked = tokio::task::spawn_blocking(move || {
        NodeIdentity::mark_clean_shutdown(marker_storage.as_ref())
    })
    .await
    .map_err(|e| ServerError::Internal(e.to_string()))?;
    if let Err(e) = marked {
        tracing::error!(error = %e, "cannot record the clean shutdown");
    }
    tracing::info!("node stopped");
    Ok(())
}

/// A flush (fsync) this slow is logged.
const SLOW_FLUSH: Duration = Duration::from_millis(20);
/// At most one slow-flush warning per this interval.
const SLOW_FLUSH_WARN_EVERY: Duration = Duration::from_secs(10);

/// Sync the engine once on the blocking pool and tell the durable writes it covered (every
/// ticket taken before it started).
async fn sync_and_publish(
    storage: &Arc<dyn Storage>,
    syncs: Option<&sync_barrier::SyncBarrier>,
) -> Result<Result<(), dynakv_core::storage::SyncError>, tokio::task::JoinError> {
    let through = syncs.map_or(0, sync_barrier::SyncBarrier::newest_ticket);
    let storage = Arc::clone(storage);
    let synced = tokio::task::spawn_blocking(move || storage.sync()).await;
    if let Some(syncs) = syncs {
        syncs.publish(
            through,
            match &synced {
                Ok(result) => result.as_ref().copied().map_err(ToString::to_string),
                Err(e) => Err(e.to_string()),
            },
        );
    }
    synced
}

/// What the flusher works on.
struct Flusher {
    storage: Arc<dyn Storage>,
    replica: Arc<Replica>,
    /// Set by every buffered write.
    unflushed: Arc<AtomicBool>,
    interval_ms: u64,
    /// Durable writes waiting for a sync (see [`sync_barrier`]).
    syncs: Option<Arc<sync_barrier::SyncBarrier>>,
    /// A sync starts at least this long after the previous one ended (group commit window).
    window: Duration,
    stats: Arc<stats::Stats>,
    failure: StorageFailure,
}

/// How the flusher stops the node when the engine fails.
#[derive(Clone)]
struct StorageFailure {
    /// Why, once a sync failed (read by `serve` after the node stopped).
    reason: Arc<std::sync::OnceLock<String>>,
    /// The node's own shutdown signal (weak: dropping the `RunningServer` still stops it).
    stop_node: std::sync::Weak<watch::Sender<bool>>,
}

impl StorageFailure {
    /// A sync failed: after that the engine's state is unknown (fjall poisons itself and
    /// refuses every later write; and after a failed fsync the kernel may have dropped the
    /// very pages it could not write, so retrying proves nothing). Stop the node, without
    /// a clean-shutdown mark, so that it comes back (see `supervise`) from what is on disk
    /// and under a new causal identity, as after a crash. Until then the other replicas and
    /// their hints serve its keys.
    ///
    /// `syncs` (the flusher's group commit) is closed, so no durable write waits for a sync
    /// that will not come.
    fn engine_failed(&self, error: &str, syncs: Option<&sync_barrier::SyncBarrier>) {
        if self.reason.set(error.to_owned()).is_ok() {
            tracing::error!(
                error,
                "a sync of buffered writes failed: stopping the node to restart it from disk"
            );
        }
        if let Some(syncs) = syncs {
            syncs.close(&format!("the write was not made durable: {error}"));
        }
        if let Some(stop) = self.stop_node.upgrade() {
            let _ = stop.send(true);
        }
    }

    fn failed(&self) -> bool {
        self.reason.get().is_some()
    }
}

/// Make buffered writes durable every `interval_ms` (paper 6.1's writer thread), and at once
/// when a durable write waits for it (group commit: one sync covers every write made before
/// it started); renew the replica's dot-counter lease before client writes run out of it.
///
/// Group commit window: a sync starts no sooner than `group_commit_window_ms` after the
/// previous one ended. Without it, durable writes arriving all the time (one per put with
/// buffered writes) made the flusher sync back to back, about 600 syncs per second per node
/// in the 3-node benchmark, each with its drain into the engine, its journal write and its
/// fsync, and that work took CPU and disk from everything else. A durable write waits at most
/// the window longer; one that finds the flusher idle for longer than the window waits for
/// no window at all.
async fn flush_loop(flusher: Flusher, mut stop: watch::Receiver<bool>) {
    let Flusher {
        storage,
        replica,
        unflushed,
        interval_ms,
        syncs,
        window,
        stats,
        failure,
    } = flusher;
    let mut last_sync_end: Option<tokio::time::Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Slow syncs since the last warning (count, slowest); the warning is rate-limited, as
    // syncs run back to back while durable writes keep arriving.
    let mut slow = (0u64, Duration::ZERO);
    let mut last_warned: Option<std::time::Instant> = None;
    let requested = async |syncs: &Option<Arc<sync_barrier::SyncBarrier>>| match syncs {
        Some(syncs) => syncs.requested().await,
        None => std::future::pending().await,
    };
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            () = requested(&syncs) => false,
            _ = stop.changed() => true,
        };
        if stopping {
            // Answer any durable write still waiting (the final flush follows), then every
            // later one: no sync follows this one.
            if let Some(barrier) = &syncs {
                if !failure.failed() {
                    match sync_and_publish(&storage, syncs.as_deref()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failure.engine_failed(&e.to_string(), Some(barrier.as_ref())),
                        Err(e) => failure.engine_failed(&e.to_string(), Some(barrier.as_ref())),
                    }
                }
                barrier.close("the node stopped before the write was synced");
            }
            return;
        }
        if failure.failed() {
            // The engine is in an unknown state: no more syncs (their success would prove
            // nothing); the node is stopping.
            continue;
        }
        if replica.counter_lease_low() {
            let renewing = Arc::clone(&replica);
            match tokio::task::spawn_blocking(move || renewing.renew_counter_lease()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the dot counter lease"),
                Err(e) => tracing::error!(error = %e, "lease renewal task failed"),
            }
        }
        if let Some(end) = last_sync_end {
            // Writes made while the window runs share the sync that ends it.
            tokio::time::sleep_until(end + window).await;
        }
        let waiting = syncs.as_ref().is_some_and(|s| s.waiting());
        if unflushed.swap(false, Ordering::AcqRel) || waiting {
            let started = std::time::Instant::now();
            let synced = sync_and_publish(&storage, syncs.as_deref()).await;
            last_sync_end = Some(tokio::time::Instant::now());
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            match synced {
                Ok(Ok(())) => {
                    let took = started.elapsed();
                    if took >= SLOW_FLUSH {
                        slow.0 += 1;
                        slow.1 = slow.1.max(took);
                        if last_warned.is_none_or(|at| at.elapsed() >= SLOW_FLUSH_WARN_EVERY) {
                            // Durable writes wait for these syncs: it is foreground latency.
                            tracing::warn!(
                                slow_flushes = slow.0,
                                slowest_ms = slow.1.as_millis() as u64,
                                "slow flushes of buffered writes since the last warning"
                            );
                            slow = (0, Duration::ZERO);
                            last_warned = Some(std::time::Instant::now());
                        }
                    }
                }
                Ok(Err(e)) => {
                    unflushed.store(true, Ordering::Release);
                    failure.engine_failed(&e.to_string(), syncs.as_deref());
                }
                Err(e) => tracing::error!(error = %e, "flush task failed"),
            }
        }
    }
}
