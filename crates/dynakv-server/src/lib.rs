//! dynakv-server: the tokio shell around dynakv-core.
//!
//! It opens storage, loads or creates the node's identity, serves the Riak-compatible HTTP API,
//! runs the background loops (the buffered-write flusher) and shuts down cleanly: on a
//! shutdown signal it stops accepting requests, lets in-flight ones finish, flushes storage and
//! returns.

pub mod config;
pub mod http;
pub mod identity;
pub mod replica;
pub mod stats;

use config::{ServerConfig, StorageKind};
use dynakv_core::storage::Storage;
use dynakv_storage::{FjallOptions, FjallStorage, MemoryStorage};
use identity::NodeIdentity;
use replica::Replica;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;

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
    #[error(
        "joining a cluster (--join) is not available in this build yet: start without --join to found a one-node cluster"
    )]
    JoinUnsupported,
}

/// A started node.
#[derive(Debug)]
pub struct RunningServer {
    /// The address the HTTP API listens on (useful with port 0).
    pub http_addr: SocketAddr,
    pub name: String,
    shutdown: watch::Sender<bool>,
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
    match config.storage {
        StorageKind::Memory => Ok(Arc::new(MemoryStorage::new())),
        StorageKind::Disk => {
            let dir = config.data_dir.join("fjall");
            std::fs::create_dir_all(&dir).map_err(|e| ServerError::Storage {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
            let options = FjallOptions {
                cache_size_bytes: config.cache_size_bytes,
                ..FjallOptions::default()
            };
            let storage = FjallStorage::open(&dir, options).map_err(|e| ServerError::Storage {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
            Ok(Arc::new(storage))
        }
    }
}

/// Open storage, bind the API and start serving. Returns once the node is accepting requests.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    config.validate()?;
    if config.join.is_some() {
        return Err(ServerError::JoinUnsupported);
    }
    let storage = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_storage(&config))
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))??
    };
    let identity = {
        let storage = Arc::clone(&storage);
        let (name, zone, partitions) = (
            config.name.clone(),
            config.zone.clone(),
            config.ring_partitions,
        );
        tokio::task::spawn_blocking(move || {
            NodeIdentity::load_or_create(storage.as_ref(), &name, &zone, partitions)
        })
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))??
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.http_addr,
            source,
        })?;
    let http_addr = listener.local_addr()?;
    let stats = Arc::new(stats::Stats::new().map_err(|e| ServerError::Internal(e.to_string()))?);
    let unflushed = Arc::new(AtomicBool::new(false));
    let replica = Arc::new(Replica::new(Arc::clone(&storage), identity.actor));
    let state = Arc::new(http::ApiState {
        replica,
        secret: identity.secret.clone(),
        ring: identity.ring.clone(),
        node_name: identity.name.clone(),
        stats,
        max_value_bytes: config.max_value_bytes,
        unflushed: Arc::clone(&unflushed),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tracing::info!(node = %config.name, http = %http_addr, data_dir = %config.data_dir.display(), engine = storage.engine_name(), "node started");
    let task = tokio::spawn(serve(
        listener,
        state,
        storage,
        unflushed,
        config.flush_interval_ms,
        shutdown_rx,
    ));
    Ok(RunningServer {
        http_addr,
        name: config.name,
        shutdown: shutdown_tx,
        task,
    })
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
    state: Arc<http::ApiState>,
    storage: Arc<dyn Storage>,
    unflushed: Arc<AtomicBool>,
    flush_interval_ms: u64,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let flusher = tokio::spawn(flush_loop(
        Arc::clone(&storage),
        Arc::clone(&unflushed),
        flush_interval_ms,
        shutdown.clone(),
    ));
    let app = http::router(state);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(wait_for_shutdown(shutdown))
        .await;
    let _ = flusher.await;
    // Whatever was buffered becomes durable before the process exits.
    let synced = tokio::task::spawn_blocking(move || storage.sync())
        .await
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    if let Err(e) = synced {
        tracing::error!(error = %e, "final flush failed");
        return Err(ServerError::Internal(e.to_string()));
    }
    tracing::info!("node stopped");
    served.map_err(ServerError::Io)
}

/// Make buffered writes durable every `interval_ms` (paper 6.1's writer thread).
async fn flush_loop(
    storage: Arc<dyn Storage>,
    unflushed: Arc<AtomicBool>,
    interval_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if unflushed.swap(false, Ordering::AcqRel) {
            let storage = Arc::clone(&storage);
            match tokio::task::spawn_blocking(move || storage.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "flush of buffered writes failed");
                    unflushed.store(true, Ordering::Release);
                }
                Err(e) => tracing::error!(error = %e, "flush task failed"),
            }
        }
    }
}
