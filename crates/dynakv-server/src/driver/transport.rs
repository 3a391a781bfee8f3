//! The driver's environment over the server's own pieces: the peer transport
//! ([`PeerClient`], addressing a member by the peer address of its entry in the published
//! cluster state), the flusher's group commit ([`SyncBarrier`]) and the [`WallClock`].

use super::{Environment, Respond, SendOutcome};
use crate::clock::WallClock;
use crate::sync_barrier::SyncBarrier;
use crate::transport::{PeerClient, TransportError, WireMessage};
use dynakv_core::membership::ClusterState;
use dynakv_core::message::PeerMessage;
use dynakv_core::ring::NodeId;
use dynakv_core::storage::Storage;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Peers the driver may address before they are members (at most this many: the seeds of a
/// join).
pub const MAX_SEED_ADDRESSES: usize = 16;

/// How the driver reaches peers and the disk in a server.
#[derive(Debug)]
pub struct TransportEnv {
    client: PeerClient<PeerMessage>,
    runtime: tokio::runtime::Handle,
    /// Longest a send waits for its answer (the node's own timer fails it sooner; this only
    /// bounds the task). At least the forward timeout.
    send_timeout: Duration,
    /// The flusher's group commit; `None`: sync the storage on the blocking pool.
    syncs: Option<Arc<SyncBarrier>>,
    storage: Arc<dyn Storage>,
    clock: WallClock,
    /// Peer addresses by member, from the published state.
    members: RwLock<BTreeMap<NodeId, SocketAddr>>,
    /// Addresses of peers that are not members yet (a join's seeds), bounded.
    seeds: RwLock<BTreeMap<NodeId, SocketAddr>>,
    /// Why the last send to each seed failed (a join's error names the transport's reason:
    /// another cluster's secret, a refused name), at most one per seed.
    seed_errors: Arc<parking_lot::Mutex<BTreeMap<NodeId, String>>>,
    /// Called once when the node stops on a storage failure.
    on_stop: parking_lot::Mutex<Option<StopHook>>,
}

/// What a server does when its node stops on a storage failure.
pub struct StopHook(pub Box<dyn FnOnce(String) + Send>);

impl std::fmt::Debug for StopHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopHook")
    }
}

impl TransportEnv {
    /// The environment over `client`, spawning its sends on `runtime`.
    pub fn new(
        client: PeerClient<PeerMessage>,
        runtime: tokio::runtime::Handle,
        send_timeout: Duration,
        (syncs, storage): (Option<Arc<SyncBarrier>>, Arc<dyn Storage>),
        clock: WallClock,
    ) -> TransportEnv {
        TransportEnv {
            client,
            runtime,
            send_timeout,
            syncs,
            storage,
            clock,
            members: RwLock::new(BTreeMap::new()),
            seeds: RwLock::new(BTreeMap::new()),
            seed_errors: Arc::default(),
            on_stop: parking_lot::Mutex::new(None),
        }
    }

    /// Call `hook` when the node stops on a storage failure.
    pub fn on_stop(&self, hook: StopHook) {
        *self.on_stop.lock() = Some(hook);
    }

    /// Why the last send to the seed `peer` failed, if it did.
    pub fn seed_error(&self, peer: &NodeId) -> Option<String> {
        self.seed_errors.lock().get(peer).cloned()
    }

    /// The name a seed known only by its address goes by (`--join ADDR` names no node):
    /// the node asks it to join under this name, and learns the real names from the state
    /// it is sent.
    pub fn seed_name(addr: SocketAddr) -> NodeId {
        NodeId(format!("seed:{addr}"))
    }

    /// Address `peer` at `addr` until it is a member (a join's seed).
    ///
    /// # Errors
    /// `MAX_SEED_ADDRESSES` seeds are known already.
    pub fn add_seed(&self, peer: NodeId, addr: SocketAddr) -> Result<(), String> {
        let mut seeds = self.seeds.write();
        if seeds.len() >= MAX_SEED_ADDRESSES && !seeds.contains_key(&peer) {
            return Err(format!("at most {MAX_SEED_ADDRESSES} seeds"));
        }
        seeds.insert(peer, addr);
        Ok(())
    }

    /// A peer's address, and whether it is a seed (not a member yet).
    fn address(&self, peer: &NodeId) -> Option<(SocketAddr, bool)> {
        let member = self.members.read().get(peer).map(|addr| (*addr, false));
        member.or_else(|| self.seeds.read().get(peer).map(|addr| (*addr, true)))
    }
}

/// The peer protocol's messages, in the current version and the previous one (a peer not yet
/// upgraded): `dynakv_core::message::v3`.
impl WireMessage for PeerMessage {
    type Previous = dynakv_core::message::v3::PeerMessage;

    fn to_previous(self) -> Result<Self::Previous, String> {
        dynakv_core::message::v3::to_v3(self)
    }

    fn from_previous(previous: Self::Previous) -> Self {
        dynakv_core::message::v3::from_v3(previous)
    }
}

/// What became of a request the transport failed: never sent (try elsewhere, fail now), or
/// maybe delivered (the node's timer decides).
fn outcome_of(error: &TransportError) -> SendOutcome {
    match error {
        TransportError::Unreachable { .. }
        | TransportError::Rejected { .. }
        | TransportError::Overloaded { .. }
        | TransportError::FrameTooLarge { .. }
        | TransportError::Encode(_) => SendOutcome::NotSent,
        TransportError::OlderPeer { .. } => SendOutcome::Refused,
        _ => SendOutcome::Lost,
    }
}

impl Environment for TransportEnv {
    fn send(&self, to: &NodeId, body: PeerMessage, done: Respond<SendOutcome>) {
        let Some((addr, is_seed)) = self.address(to) else {
            done(SendOutcome::NotSent);
            return;
        };
        let client = self.client.clone();
        let timeout = self.send_timeout;
        let seed = is_seed.then(|| (to.clone(), Arc::clone(&self.seed_errors)));
        self.runtime.spawn(async move {
            let sent = client.request(addr, body, timeout).await;
            if let Some((peer, errors)) = seed {
                let mut errors = errors.lock();
                match &sent {
                    Ok(_) => errors.remove(&peer),
                    Err(e) => errors.insert(peer, e.to_string()),
                };
            }
            done(match sent {
                Ok(reply) => SendOutcome::Answered(Box::new(reply)),
                Err(e) => outcome_of(&e),
            });
        });
    }

    fn sync(&self, done: Respond<Result<(), String>>) {
        if let Some(syncs) = self.syncs.clone() {
            self.runtime.spawn(async move { done(syncs.wait().await) });
            return;
        }
        let storage = Arc::clone(&self.storage);
        self.runtime.spawn(async move {
            let synced = tokio::task::spawn_blocking(move || storage.sync()).await;
            done(match synced {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        });
    }

    fn wall_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn state_published(&self, state: &Arc<ClusterState>) {
        let members: BTreeMap<NodeId, SocketAddr> = state
            .members
            .values()
            .filter_map(|m| Some((m.id.clone(), m.peer_addr.parse().ok()?)))
            .collect();
        self.seeds.write().retain(|id, _| !members.contains_key(id));
        self.seed_errors
            .lock()
            .retain(|id, _| !members.contains_key(id));
        *self.members.write() = members;
    }

    fn stopped(&self, error: &str) {
        if let Some(StopHook(hook)) = self.on_stop.lock().take() {
            hook(error.to_owned());
        }
    }
}
