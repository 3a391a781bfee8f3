//! `SimNode`: one simulated machine, the core's [`Node`] over a [`SimDisk`].
//!
//! The node itself (sequencing, coordinators, background rounds, storage rules) is
//! `dynakv_core::node::Node`; this wrapper adds what only a simulated machine has: the disk
//! it crashes (a process crash, a power loss that drops unsynced writes, a wiped disk) and
//! the restart rule that follows (a node that lost data comes back under a new actor unless
//! the run asks to reproduce the old rule). Reads used by the checkers go through here and
//! stop the run loudly on a storage error: the simulated disk never fails, so an error is a
//! bug of the simulation itself.

use crate::disk::{DiskLoss, SimDisk};
use crate::rng::SimRng;
use dynakv_core::membership::ClusterState;
use dynakv_core::object::Object;
use dynakv_core::ring::{NodeId, PartitionId};
use dynakv_core::storage::Storage;
use dynakv_core::version::ActorId;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

pub use dynakv_core::node::{
    Bug, ClientOp, ClientRequestId, ClientResult, Input, Message, Node, NodeConfig, NodeStats,
    Output, PutOp, RequestId, Time, Timer, Timings, member_entry,
};

/// The bucket of the simulation's registers and client-merged sets.
pub const BUCKET: &str = "sim";
/// The bucket of the counter workload (its type's `datatype` is `counter`), and its keys'
/// prefix.
pub const COUNTER_BUCKET: &str = "sim-counters";
pub const COUNTER_KEY_PREFIX: &str = "ctr-";
/// The bucket of the set workload (a `set` data type), and its keys' prefix.
pub const SET_BUCKET: &str = "sim-sets";
pub const SET_KEY_PREFIX: &str = "dset-";

/// The bucket of the expiry workload (values written with a time to live), and its keys'
/// prefix.
pub const TTL_BUCKET: &str = "sim-ttl";
pub const TTL_KEY_PREFIX: &str = "ttl-";

/// The bucket a simulation key lives in (from its prefix).
pub fn bucket_of(key: &str) -> &'static str {
    if key.starts_with(COUNTER_KEY_PREFIX) {
        COUNTER_BUCKET
    } else if key.starts_with(SET_KEY_PREFIX) {
        SET_BUCKET
    } else if key.starts_with(TTL_KEY_PREFIX) {
        TTL_BUCKET
    } else {
        BUCKET
    }
}
/// One replica request's timeout in the simulation.
pub const REQUEST_TIMEOUT_MS: u64 = Timings::SIMULATION.request_ms;
/// How long a forwarded put waits for its remote coordinator in the simulation.
pub const FORWARD_TIMEOUT_MS: u64 = Timings::SIMULATION.forward_ms;

/// The node settings of a simulated run: the core's defaults with the simulation's timings.
pub fn sim_config() -> NodeConfig {
    NodeConfig {
        timings: Timings::SIMULATION,
        ..NodeConfig::default()
    }
}

/// How a node comes back after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// The process dies; the disk keeps everything written (OS buffers survive).
    Process,
    /// The machine loses power: writes not yet flushed are lost (nothing with `Fsync`).
    PowerLoss,
    /// The disk is lost: the node comes back empty.
    Wipe,
}

/// One simulated machine: a core `Node` and its disk.
#[derive(Debug)]
pub struct SimNode {
    node: Node,
    disk: Arc<SimDisk>,
    /// This machine's wall clock minus the simulation's time (`--clock-skew-ms`).
    skew_ms: i64,
}

impl Deref for SimNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl DerefMut for SimNode {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

impl SimNode {
    /// A node with an empty disk, knowing `cluster`; returns it and its first timers.
    pub fn new(
        me: NodeId,
        actor: ActorId,
        cluster: ClusterState,
        config: NodeConfig,
        rng: SimRng,
        now: u64,
    ) -> Result<(SimNode, Vec<Output>), String> {
        let disk = Arc::new(SimDisk::new());
        let storage = Arc::clone(&disk) as Arc<dyn Storage>;
        let (node, outputs) =
            Node::new(me, actor, cluster, config, storage, rng, now).map_err(|e| e.to_string())?;
        Ok((
            SimNode {
                node,
                disk,
                skew_ms: 0,
            },
            outputs,
        ))
    }

    /// A fresh node that founded its own one-node cluster and asks `via` (in turn, until one
    /// accepts) to admit it (`Node::joining`).
    #[allow(clippy::too_many_arguments)] // mirrors `Node::joining`
    pub fn joining(
        me: NodeId,
        actor: ActorId,
        cluster_name: &str,
        partitions: u32,
        via: Vec<NodeId>,
        config: NodeConfig,
        rng: SimRng,
        now: u64,
    ) -> Result<(SimNode, Vec<Output>), String> {
        let disk = Arc::new(SimDisk::new());
        let storage = Arc::clone(&disk) as Arc<dyn Storage>;
        let (node, outputs) = Node::joining(
            me,
            actor,
            cluster_name,
            partitions,
            via,
            config,
            storage,
            rng,
            now,
        )
        .map_err(|e| e.to_string())?;
        Ok((
            SimNode {
                node,
                disk,
                skew_ms: 0,
            },
            outputs,
        ))
    }

    /// Crash and restart. Volatile state is gone; the disk keeps what `kind` says. Returns
    /// whether data was lost, and the new timers. `new_actor` is the identity to use when
    /// data was lost (restart safety: never reissue a dot issued before), unless
    /// `keep_actor_after_loss` reproduces the old rule.
    pub fn restart(
        &mut self,
        now: u64,
        kind: CrashKind,
        new_actor: ActorId,
        keep_actor_after_loss: bool,
        rng: SimRng,
    ) -> (bool, Vec<Output>) {
        let lost = self.disk.crash(match kind {
            CrashKind::Process => DiskLoss::Nothing,
            CrashKind::PowerLoss => DiskLoss::Unsynced,
            CrashKind::Wipe => DiskLoss::Everything,
        });
        // A new data directory is a new actor, whatever was in it.
        let actor = if kind == CrashKind::Wipe || (lost && !keep_actor_after_loss) {
            new_actor
        } else {
            self.node.actor()
        };
        let outputs = must(self.node.restart(now, actor, rng), "reopen the node");
        (lost, outputs)
    }

    /// `Node::handle`, with the machine's part of a sync: `Input::Synced` is what the driver
    /// feeds once the disk synced, so the disk syncs as the input is handled (a paused
    /// process syncs nothing until it resumes).
    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Output> {
        if matches!(input, Input::Synced { .. }) {
            must(self.disk.sync(), "sync the disk");
        }
        let time = Time {
            monotonic_ms: now,
            wall_ms: now.saturating_add_signed(self.skew_ms),
        };
        self.node.handle_at(time, input)
    }

    /// Skew this machine's wall clock by `skew_ms` against the simulation's time (its
    /// monotonic clock is not skewed: timers and timeouts run at the simulation's pace).
    pub fn set_skew(&mut self, skew_ms: i64) {
        self.skew_ms = skew_ms;
    }

    pub fn skew(&self) -> i64 {
        self.skew_ms
    }

    /// Write the node's cluster state (`Output::Persist`), as the server does.
    pub fn persist(&self, state: &ClusterState) {
        must(
            dynakv_core::membership::store_persisted(self.disk.as_ref(), state),
            "write the cluster state",
        );
    }

    /// The stored object of a simulation key (tombstones included).
    pub fn object(&self, key: &str) -> Option<Object> {
        must(self.node.object(bucket_of(key), key), "read an object")
    }

    /// Every stored object of the simulation's keys, in key order.
    pub fn objects(&self) -> Vec<(String, Object)> {
        must(self.node.objects(), "scan objects")
            .into_iter()
            .filter(|(bucket, key, _)| bucket == bucket_of(key))
            .map(|(_, key, object)| (key, object))
            .collect()
    }

    /// The key's partition.
    pub fn partition_of(&self, key: &str) -> PartitionId {
        self.node.partition_of(bucket_of(key), key)
    }

    /// The key's primaries (its preference list).
    pub fn primaries(&self, key: &str) -> Vec<NodeId> {
        self.node.primaries(bucket_of(key), key)
    }
}

/// The simulated disk never fails and nothing corrupts it: a failure here is a bug of the
/// simulation itself, and the seed stops loudly.
fn must<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("simulated storage failed to {what}: {e}"),
    }
}
