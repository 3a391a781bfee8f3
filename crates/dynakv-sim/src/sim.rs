//! The simulation: a seeded event queue driving `SimNode`s over a faulty network, clients
//! running workloads, a fault schedule, healing, convergence and the checkers.
//!
//! Everything happens in virtual milliseconds, in one thread, in the order of a binary heap
//! keyed by `(time, sequence)`; every random choice comes from one `SimRng` seeded by the run's
//! seed (nodes get generators forked from it). So a seed replays exactly.

use crate::checker::{self, CheckReport};
use crate::history::{
    Event, EventType, History, OpKind, TtlRead, WriteRecord, decode_register, decode_set,
    encode_register, encode_set,
};
use crate::node::{
    ClientOp, ClientRequestId, ClientResult, CrashKind, Input, Message, NodeConfig, Output, PutOp,
    SimNode, Timer, member_entry, sim_config,
};
use crate::rng::SimRng;
use dynakv_core::bucket::{BucketProps, Quorum};
use dynakv_core::crdt::{Crdt, DataTypeKind, Op};
use dynakv_core::limits;
use dynakv_core::membership::{ClusterState, MemberStatus, MembershipError};
use dynakv_core::object::Object;
use dynakv_core::ring::{NodeId, RingError};
use dynakv_core::storage::Durability;
use dynakv_core::version::ActorId;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;

/// Ring partitions (Q) of the simulated cluster (a power of two; small, to keep anti-entropy
/// cheap).
pub const SIM_RING_PARTITIONS: u32 = 16;
/// Fewest and most nodes.
pub const MIN_NODES: usize = 3;
pub const MAX_NODES: usize = 5;
/// Fewest and most keys.
pub const MIN_KEYS: usize = 2;
pub const MAX_KEYS: usize = 6;
/// Fewest and most clients.
pub const MIN_CLIENTS: usize = 2;
pub const MAX_CLIENTS: usize = 5;
/// Default fewest and most operations per run.
pub const MIN_OPS: usize = 100;
pub const MAX_OPS: usize = 300;
/// Network delay bounds of one message.
pub const MIN_DELAY_MS: u64 = 1;
/// How long a node's fsync takes (`Output::Sync` to `Input::Synced`).
pub const MIN_SYNC_MS: u64 = 1;
pub const MAX_SYNC_MS: u64 = 8;
pub const MAX_DELAY_MS: u64 = 20;
/// Loss probability outside loss bursts.
pub const BASE_LOSS: f64 = 0.001;
/// Loss probability bounds during a loss burst (in percent).
pub const BURST_LOSS_PERCENT_MIN: u64 = 10;
pub const BURST_LOSS_PERCENT_MAX: u64 = 60;
/// Probability that a message is delivered twice.
pub const DUPLICATE_PROBABILITY: f64 = 0.005;
/// Client think time between operations.
pub const MIN_THINK_MS: u64 = 5;
pub const MAX_THINK_MS: u64 = 150;
/// A client gives up on a request after this long (the outcome is then indeterminate).
pub const CLIENT_TIMEOUT_MS: u64 = 5000;
/// Probability that a client moves to another node before an operation.
pub const CLIENT_SWITCH_PROBABILITY: f64 = 0.05;
/// Probability that a register write reads first (else it is blind).
pub const REGISTER_READ_PROBABILITY: f64 = 0.8;
/// Tombstone grace periods a seed picks from: shorter than a fault, about one, and longer than
/// any (the server's default is an hour; the simulation's time scale is seconds).
pub const GRACE_CHOICES_MS: [u64; 3] = [500, 3_000, 10_000];
/// Probability that a register operation is a delete (read, then delete with the context).
pub const DELETE_PROBABILITY: f64 = 0.15;
/// Healthy and faulty period bounds.
pub const MIN_HEALTHY_MS: u64 = 200;
pub const MAX_HEALTHY_MS: u64 = 1500;
pub const MIN_FAULT_MS: u64 = 300;
pub const MAX_FAULT_MS: u64 = 3000;
/// Pauses last longer: long enough for a forwarder to give up on the paused node (the
/// nemesis's SIGSTOP found a put coordinated twice that way, finding 5).
pub const MAX_PAUSE_MS: u64 = 2 * crate::node::FORWARD_TIMEOUT_MS;
/// The first fault comes no earlier than this.
pub const FIRST_FAULT_MS: u64 = 100;
/// Most crashes that lose data (power loss, wiped disk) per run: with W = 2 an acknowledged
/// write is on two nodes, so one loss never loses it; two losses before repair could.
pub const MAX_DATA_LOSS_CRASHES: usize = 1;
/// The workload is stopped (and the cluster healed) after this long regardless.
pub const WORKLOAD_BOUND_MS: u64 = 600_000;
/// After healing, replicas must converge within this much simulated time.
pub const CONVERGENCE_BOUND_MS: u64 = 120_000;
/// How often convergence is checked after healing.
pub const CONVERGENCE_CHECK_MS: u64 = 100;
/// The final reads must answer within this long.
pub const FINAL_READ_BOUND_MS: u64 = 30_000;
/// A failed final read is retried after this long.
pub const FINAL_READ_RETRY_MS: u64 = 500;
/// Probability that a run uses buffered durability (so power loss loses recent writes).
pub const BUFFERED_PROBABILITY: f64 = 0.3;
/// Probability that a run has a node join, and that it has one leave (when it has more than
/// `MIN_NODES` nodes, so N = 3 replicas remain); at most one membership change per run.
pub const JOIN_PROBABILITY: f64 = 0.3;
pub const LEAVE_PROBABILITY: f64 = 0.3;
/// When the membership change is asked for (during the workload).
pub const MIN_MEMBERSHIP_MS: u64 = 100;
pub const MAX_MEMBERSHIP_MS: u64 = 2500;
/// A leave asked of a node that is down is asked again this much later (an operator retrying).
pub const LEAVE_RETRY_MS: u64 = 500;
/// The cluster's name.
pub const CLUSTER_NAME: &str = "dynakv-sim";
/// Keys of each data type workload (with `--datatypes`).
pub const DATATYPE_KEYS: usize = 2;
/// Probability that a set data type operation is a removal (read, then remove an element).
pub const DT_REMOVE_PROBABILITY: f64 = 0.3;
/// Keys of the expiry workload (with `--expiry`).
pub const EXPIRY_KEYS: usize = 2;
/// The time to live of the expiry workload's writes, in seconds (the simulation's runs last
/// several seconds).
pub const EXPIRY_TTL_SECS: u64 = 1;
/// Probability that an expiry workload operation is a read (else a blind write with the
/// time to live).
pub const TTL_READ_PROBABILITY: f64 = 0.6;

const _: () = assert!(SIM_RING_PARTITIONS.is_power_of_two());
const _: () = assert!(MIN_NODES >= 3 && MIN_NODES <= MAX_NODES);
const _: () = assert!(MIN_KEYS >= 2 && MIN_KEYS <= MAX_KEYS);
const _: () = assert!(MIN_DELAY_MS >= 1 && MIN_DELAY_MS <= MAX_DELAY_MS);
// A forward is retried elsewhere only after a failure that is quick and certain (not sent,
// not a replica); one that times out ends the forwarding. So a client outwaits one forward
// timeout plus a coordinator's own request round.
const _: () =
    assert!(CLIENT_TIMEOUT_MS > crate::node::FORWARD_TIMEOUT_MS + crate::node::REQUEST_TIMEOUT_MS);

/// A membership change during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// A new, empty node asks a member to admit it.
    Join,
    /// A node of the initial ring asks to leave.
    Leave,
    /// A new node joins and, once its join has settled, leaves again: the nodes that handed
    /// it their ranges (and dropped them) become those ranges' replicas once more, and
    /// coordinate writes of keys whose history they dropped.
    JoinThenLeave,
}

/// One run's parameters.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches of one run
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub keys: usize,
    pub clients: usize,
    pub ops: usize,
    pub node: NodeConfig,
    /// Inject faults (partitions, loss bursts, crashes).
    pub faults: bool,
    /// Some register operations are deletes (read, then delete with the context).
    pub deletes: bool,
    /// After a crash that lost data, keep the old actor id (what a server with buffered
    /// writes does today) instead of taking a new one.
    pub keep_actor_after_loss: bool,
    /// The run's membership change, if any, and when it is asked for.
    pub membership: Option<MembershipChange>,
    pub membership_at_ms: u64,
    /// Each machine's wall clock is off the simulation's time by up to this much either way
    /// (drawn per machine from the seed; 0: no skew). Timers and timeouts are not skewed.
    pub clock_skew_ms: u64,
    /// Add the data type workloads: counters incremented and sets added to and removed from,
    /// in buckets whose type holds a counter and a set (`--datatypes`).
    pub datatypes: bool,
    /// Add the expiry workload: values written with a time to live and read back; no read
    /// issued later than the time to live plus twice the clock skew bound may return one
    /// (`--expiry`).
    pub expiry: bool,
}

impl SimConfig {
    /// The parameters a seed picks (the same seed always picks the same).
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut rng = SimRng::new(seed ^ 0x5eed_c0f1_9000_0001);
        let nodes = rng.range(MIN_NODES as u64, MAX_NODES as u64) as usize;
        let keys = rng.range(MIN_KEYS as u64, MAX_KEYS as u64) as usize;
        let clients = rng.range(MIN_CLIENTS as u64, MAX_CLIENTS as u64) as usize;
        let ops = rng.range(MIN_OPS as u64, MAX_OPS as u64) as usize;
        let durability = if rng.chance(BUFFERED_PROBABILITY) {
            Durability::Buffered
        } else {
            Durability::Fsync
        };
        let draw = rng.next_u64() as f64 / u64::MAX as f64;
        let membership = if draw < JOIN_PROBABILITY {
            Some(MembershipChange::Join)
        } else if draw < JOIN_PROBABILITY + LEAVE_PROBABILITY && nodes > MIN_NODES {
            Some(MembershipChange::Leave)
        } else {
            None
        };
        let membership_at_ms = rng.range(MIN_MEMBERSHIP_MS, MAX_MEMBERSHIP_MS);
        let tombstone_grace_ms = GRACE_CHOICES_MS[rng.index(GRACE_CHOICES_MS.len())];
        SimConfig {
            seed,
            nodes,
            keys,
            clients,
            ops,
            node: NodeConfig {
                props: BucketProps {
                    durability,
                    ..BucketProps::default()
                },
                tombstone_grace_ms,
                ..sim_config()
            },
            faults: true,
            deletes: true,
            keep_actor_after_loss: false,
            membership,
            membership_at_ms,
            clock_skew_ms: 0,
            datatypes: false,
            expiry: false,
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p dynakv-sim -- --seed {} --ops {}",
            self.seed, self.ops
        );
        if self.node.props.last_write_wins {
            cmd.push_str(" --lww");
        }
        match self.node.sim.bug {
            Some(crate::node::Bug::DropSiblingOnMerge) => cmd.push_str(" --bug drop-sibling"),
            Some(crate::node::Bug::DatatypeMaxMerge) => cmd.push_str(" --bug datatype-max-merge"),
            Some(crate::node::Bug::ExpiryUnfilteredRead) => {
                cmd.push_str(" --bug expiry-unfiltered-read");
            }
            Some(crate::node::Bug::ExpiryDropLocally) => {
                cmd.push_str(" --bug expiry-drop-locally");
            }
            None => {}
        }
        if self.keep_actor_after_loss {
            cmd.push_str(" --keep-actor");
        }
        if !self.node.sim.handoff_checks_ring {
            cmd.push_str(" --old-rule unchecked-handoff");
        }
        if self.node.sim.per_key_counters {
            cmd.push_str(" --old-rule per-key-counters");
        }
        if self.node.sim.primaries_only_reap {
            cmd.push_str(" --old-rule primaries-only-reap");
        }
        if self.node.sim.retry_unanswered_forward {
            cmd.push_str(" --old-rule retry-unanswered-forward");
        }
        if !self.faults {
            cmd.push_str(" --no-faults");
        }
        if !self.deletes {
            cmd.push_str(" --no-deletes");
        }
        let _ = write!(cmd, " --grace-ms {}", self.node.tombstone_grace_ms);
        if self.clock_skew_ms > 0 {
            let _ = write!(cmd, " --clock-skew-ms {}", self.clock_skew_ms);
        }
        if self.datatypes {
            cmd.push_str(" --datatypes");
        }
        if self.expiry {
            cmd.push_str(" --expiry");
        }
        match self.membership {
            None => cmd.push_str(" --membership none"),
            Some(MembershipChange::Join) => cmd.push_str(" --membership join"),
            Some(MembershipChange::Leave) => cmd.push_str(" --membership leave"),
            Some(MembershipChange::JoinThenLeave) => cmd.push_str(" --membership join-leave"),
        }
        cmd.push_str(" --verbose");
        cmd
    }
}

/// What one run found.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent outcomes of one run
pub struct RunReport {
    pub config: SimConfig,
    pub history: History,
    pub check: CheckReport,
    pub ops_attempted: usize,
    pub ops_ok: usize,
    pub ops_failed: usize,
    pub ops_indeterminate: usize,
    /// Replicas equal and hints delivered after healing, within the bound.
    pub converged: bool,
    /// Simulated time from healing to convergence.
    pub convergence_ms: Option<u64>,
    pub final_read_ok: bool,
    pub max_siblings: usize,
    pub max_clock_entries: usize,
    pub bounds_ok: bool,
    /// The fault schedule as it happened.
    pub fault_log: Vec<String>,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub end_ms: u64,
    /// The final read's object per key.
    pub finals: BTreeMap<String, Object>,
    /// The membership change as it happened (empty when none).
    pub membership_log: Vec<String>,
    /// The membership change was asked for and the final ring reflects it (the joiner valid
    /// in the ring; the leaver out of it and exiting, in its own view too).
    pub membership_ok: bool,
    /// Keys stored on a node outside their preference list at the end: `(key, node)`.
    pub strays: Vec<(String, NodeId)>,
    /// Why the run did not converge (the first unmet condition).
    pub convergence_problem: Option<String>,
    /// Summed over nodes: keys sent by transition handoffs, keys dropped by cleanup,
    /// `StaleRing` refusals, puts re-planned after a ring change.
    pub handoff_keys: u64,
    pub cleanup_dropped: u64,
    pub stale_ring_refusals: u64,
    pub replans: u64,
    /// Pauses of a node (SIGSTOP) among the faults, and forwarded puts refused by their
    /// coordinator for arriving too late (a paused node resuming with queued requests).
    pub pauses: usize,
    pub late_forwards_refused: u64,
    /// Tombstones removed (summed over nodes: one reap removes up to N copies).
    pub tombstones_reaped: u64,
    /// What the data type checkers found (empty when they passed or did not run).
    pub datatype_problems: Vec<String>,
    /// The data type workloads' acknowledged operations: increments, adds, removes.
    pub datatype_ops: (usize, usize, usize),
    /// What the expiry checker found (empty when it passed or did not run).
    pub expiry_problems: Vec<String>,
    /// The expiry workload's reads checked, and those issued after a value they could
    /// have returned had expired (the reads that test the rule).
    pub expiry_reads: (usize, usize),
}

impl RunReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.check.lost() == 0
            && self.check.phantom() == 0
            && self.converged
            && self.final_read_ok
            && self.bounds_ok
            && self.membership_ok
            && self.strays.is_empty()
            && self.datatype_problems.is_empty()
            && self.expiry_problems.is_empty()
    }

    /// One line per finding, for a failing seed.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "seed {}: nodes {} keys {} clients {} ops {} durability {:?} lww {} bug {:?} membership {:?}",
            c.seed,
            c.nodes,
            c.keys,
            c.clients,
            c.ops,
            c.node.props.durability,
            c.node.props.last_write_wins,
            c.node.sim.bug,
            c.membership
        );
        let _ = writeln!(
            out,
            "  ops ok {} fail {} info {}; adds acked {} lost {} phantom {}; writes acked {} lost {} phantom {}",
            self.ops_ok,
            self.ops_failed,
            self.ops_indeterminate,
            self.check.adds_acknowledged,
            self.check.lost_adds.len(),
            self.check.phantom_adds.len(),
            self.check.writes_acknowledged,
            self.check.lost_writes.len(),
            self.check.phantom_writes.len()
        );
        let _ = writeln!(
            out,
            "  converged {} in {:?} ms; final read ok {}; max siblings {} max clock entries {} bounds ok {}",
            self.converged,
            self.convergence_ms,
            self.final_read_ok,
            self.max_siblings,
            self.max_clock_entries,
            self.bounds_ok
        );
        if !self.check.lost_adds.is_empty() {
            let _ = writeln!(out, "  lost adds: {:?}", first(&self.check.lost_adds));
        }
        if !self.check.lost_writes.is_empty() {
            let _ = writeln!(out, "  lost writes: {:?}", first(&self.check.lost_writes));
        }
        if !self.check.applied_twice.is_empty() {
            let _ = writeln!(
                out,
                "  applied twice (one register value under two dots): {:?}",
                first(&self.check.applied_twice)
            );
        }
        if !self.check.resurrected.is_empty() {
            let _ = writeln!(
                out,
                "  resurrected (overwritten or deleted, back in the final state): {:?}",
                first(&self.check.resurrected)
            );
        }
        if self.check.phantom() > 0 {
            let _ = writeln!(
                out,
                "  phantoms: {:?} {:?}",
                first(&self.check.phantom_adds),
                first(&self.check.phantom_writes)
            );
        }
        if !self.datatype_problems.is_empty() {
            let _ = writeln!(out, "  data types: {:?}", first(&self.datatype_problems));
        }
        if !self.expiry_problems.is_empty() {
            let _ = writeln!(out, "  expiry: {:?}", first(&self.expiry_problems));
        }
        if let Some(problem) = &self.convergence_problem {
            let _ = writeln!(out, "  not converged: {problem}");
        }
        if !self.membership_log.is_empty() || !self.membership_ok {
            let _ = writeln!(
                out,
                "  membership ok {}: {}; handoff keys {} cleanup dropped {} stale-ring refusals {} re-plans {}",
                self.membership_ok,
                self.membership_log.join("; "),
                self.handoff_keys,
                self.cleanup_dropped,
                self.stale_ring_refusals,
                self.replans
            );
        }
        if !self.strays.is_empty() {
            let _ = writeln!(
                out,
                "  stored off their preference list: {:?}",
                first(&self.strays)
            );
        }
        let _ = writeln!(out, "  faults: {}", self.fault_log.join("; "));
        if !self.passed() {
            let _ = writeln!(out, "  replay: {}", c.replay_command());
        }
        out
    }
}

fn first<T: Clone>(items: &[T]) -> Vec<T> {
    items.iter().take(10).cloned().collect()
}

#[derive(Debug, Clone)]
enum Fault {
    Halves(Vec<usize>),
    Isolate(usize),
    NonTransitive(usize, usize, usize),
    Loss(f64),
    Crash(usize, CrashKind),
    /// The node's process is stopped (SIGSTOP): everything sent to it waits, its timers
    /// fire late, and it handles all of it, in order, when it resumes.
    Pause(usize),
}

#[derive(Debug)]
enum EventKind {
    Deliver {
        from: usize,
        to: usize,
        message: Message,
    },
    SendFailed {
        from: usize,
        to: usize,
        id: u64,
    },
    Timer {
        node: usize,
        incarnation: u64,
        timer: Timer,
    },
    /// A node's disk finished the sync it asked for (`Output::Sync`).
    Synced {
        node: usize,
        incarnation: u64,
        through: u64,
    },
    ClientWake {
        client: usize,
    },
    ClientReply {
        request: ClientRequestId,
        result: ClientResult,
    },
    ClientTimeout {
        client: usize,
        request: ClientRequestId,
    },
    FaultStart,
    FaultEnd {
        fault: u64,
    },
    ConvergenceCheck,
    FinalRead {
        key: String,
    },
    Membership,
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    event: EventKind,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: the heap pops the earliest event first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    Writing,
}

#[derive(Debug)]
struct Current {
    op: u64,
    kind: OpKind,
    key: String,
    value: u64,
    write: usize,
    phase: Phase,
    request: ClientRequestId,
    /// When the operation was invoked.
    invoked_ms: u64,
}

#[derive(Debug)]
struct Client {
    node: usize,
    ops_left: usize,
    current: Option<Current>,
}

/// A running simulation.
#[derive(Debug)]
pub struct Simulation {
    config: SimConfig,
    rng: SimRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    ids: Vec<NodeId>,
    nodes: Vec<SimNode>,
    up: Vec<bool>,
    /// Per node: `Some(held inputs)` while it is paused.
    paused: Vec<Option<Vec<Input>>>,
    incarnation: Vec<u64>,
    crash_kind: Vec<Option<CrashKind>>,
    blocked: BTreeSet<(usize, usize)>,
    loss: f64,
    fault_id: u64,
    active_fault: Option<Fault>,
    data_loss_crashes: usize,
    keys: Vec<(String, OpKind)>,
    clients: Vec<Client>,
    next_client_request: ClientRequestId,
    requests: BTreeMap<ClientRequestId, usize>,
    next_op: u64,
    next_value: u64,
    history: History,
    healed_at: Option<u64>,
    converged_at: Option<u64>,
    final_reads: BTreeMap<ClientRequestId, String>,
    finals: BTreeMap<String, Object>,
    final_read_failed: bool,
    fault_log: Vec<String>,
    messages_sent: u64,
    messages_dropped: u64,
    /// The membership change was asked for; the node joining or leaving.
    membership_asked: bool,
    membership_node: Option<usize>,
    membership_log: Vec<String>,
    /// Draws the machines' clock skews (`SimConfig::clock_skew_ms`).
    skew_rng: SimRng,
}

impl Simulation {
    /// A cluster of `config.nodes` nodes, its clients and its fault schedule; fails only for
    /// a configuration no ring can hold (no nodes, more nodes than partitions).
    /// The cluster of `config`, or why it cannot be built.
    pub fn new(config: SimConfig) -> Result<Simulation, String> {
        let mut rng = SimRng::new(config.seed);
        let ids: Vec<NodeId> = (0..config.nodes)
            .map(|i| NodeId(format!("n{}", i + 1)))
            .collect();
        let mut cluster = initial_cluster(&ids).map_err(|e| e.to_string())?;
        if config.datatypes {
            for (bucket, kind) in [
                (crate::node::COUNTER_BUCKET, DataTypeKind::Counter),
                (crate::node::SET_BUCKET, DataTypeKind::Set),
            ] {
                let props = BucketProps {
                    datatype: Some(kind),
                    allow_mult: true,
                    last_write_wins: false,
                    ..config.node.props.clone()
                };
                dynakv_core::bucket::set_props(&mut cluster, bucket, Some(&props), &ids[0], 0)
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut sim = Simulation {
            rng: rng.fork(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            ids: ids.clone(),
            nodes: Vec::new(),
            up: vec![true; config.nodes],
            paused: vec![None; config.nodes],
            incarnation: vec![0; config.nodes],
            crash_kind: vec![None; config.nodes],
            blocked: BTreeSet::new(),
            // Without faults, no message is lost either (a lost forward makes a put's
            // outcome indeterminate, which is a fault's effect).
            loss: if config.faults { BASE_LOSS } else { 0.0 },
            fault_id: 0,
            active_fault: None,
            data_loss_crashes: 0,
            keys: Vec::new(),
            clients: Vec::new(),
            next_client_request: 1,
            requests: BTreeMap::new(),
            next_op: 1,
            next_value: 1,
            history: History::default(),
            healed_at: None,
            converged_at: None,
            final_reads: BTreeMap::new(),
            finals: BTreeMap::new(),
            final_read_failed: false,
            fault_log: Vec::new(),
            messages_sent: 0,
            messages_dropped: 0,
            membership_asked: false,
            membership_node: None,
            membership_log: Vec::new(),
            // Its own stream, drawn only with skew: runs without skew stay as they were.
            skew_rng: SimRng::new(config.seed ^ 0x5cee_c10c_0000_0001),
            config,
        };
        for (i, id) in ids.iter().enumerate() {
            let actor = ActorId(rng.next_u64());
            let (node, outputs) = SimNode::new(
                id.clone(),
                actor,
                cluster.clone(),
                sim.config.node.clone(),
                rng.fork(),
                0,
            )?;
            sim.nodes.push(node);
            sim.apply_outputs(i, outputs);
        }
        for i in 0..sim.nodes.len() {
            sim.skew_clock(i, None);
        }
        let set_keys = sim.config.keys.div_ceil(2);
        for k in 0..sim.config.keys {
            if k < set_keys {
                sim.keys.push((format!("set-{k}"), OpKind::SetAdd));
            } else {
                sim.keys.push((format!("reg-{k}"), OpKind::Write));
            }
        }
        if sim.config.datatypes {
            for k in 0..DATATYPE_KEYS {
                let counter = format!("{}{k}", crate::node::COUNTER_KEY_PREFIX);
                sim.keys.push((counter, OpKind::Increment));
                sim.keys
                    .push((format!("{}{k}", crate::node::SET_KEY_PREFIX), OpKind::DtAdd));
            }
        }
        if sim.config.expiry {
            for k in 0..EXPIRY_KEYS {
                let key = format!("{}{k}", crate::node::TTL_KEY_PREFIX);
                sim.keys.push((key, OpKind::TtlWrite));
            }
        }
        let clients = sim.config.clients;
        let per_client = sim.config.ops / clients;
        for c in 0..clients {
            let extra = usize::from(c < sim.config.ops % clients);
            sim.clients.push(Client {
                node: c % sim.config.nodes,
                ops_left: per_client + extra,
                current: None,
            });
            let at = sim.rng.range(0, MAX_THINK_MS);
            sim.schedule(at, EventKind::ClientWake { client: c });
        }
        if sim.config.faults {
            sim.schedule(FIRST_FAULT_MS, EventKind::FaultStart);
        }
        if sim.config.membership.is_some() {
            sim.schedule(sim.config.membership_at_ms, EventKind::Membership);
        }
        Ok(sim)
    }

    /// Run to the end and check.
    pub fn run(mut self) -> RunReport {
        while let Some(next) = self.queue.pop() {
            debug_assert!(next.at >= self.now);
            self.now = next.at;
            self.dispatch(next.event);
            if self.healed_at.is_none()
                && (self
                    .clients
                    .iter()
                    .all(|c| c.ops_left == 0 && c.current.is_none())
                    || self.now >= WORKLOAD_BOUND_MS)
            {
                self.heal();
            }
            if let Some(healed) = self.healed_at {
                if self.converged_at.is_none() && self.now > healed + CONVERGENCE_BOUND_MS {
                    break;
                }
                if self.converged_at.is_some()
                    && (self.finals.len() == self.keys.len()
                        || self.now > healed + CONVERGENCE_BOUND_MS + FINAL_READ_BOUND_MS)
                {
                    break;
                }
            }
        }
        self.report()
    }

    fn schedule(&mut self, at: u64, event: EventKind) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn dispatch(&mut self, event: EventKind) {
        match event {
            EventKind::Deliver { from, to, message } => {
                if self.blocked.contains(&(from, to)) {
                    self.messages_dropped += 1;
                    return;
                }
                if !self.up[to] {
                    // Connection refused: the sender learns at once (if it still runs).
                    if let Message::Request { id, .. } = message
                        && self.up[from]
                    {
                        let at = self.now + self.delay();
                        self.schedule(at, EventKind::SendFailed { from, to, id });
                    }
                    return;
                }
                let input = Input::Message {
                    from: self.ids[from].clone(),
                    message,
                };
                self.node_input(to, input);
            }
            EventKind::SendFailed { from, to, id } => {
                if self.up[from] {
                    let input = Input::SendFailed {
                        to: self.ids[to].clone(),
                        id,
                    };
                    self.node_input(from, input);
                }
            }
            EventKind::Timer {
                node,
                incarnation,
                timer,
            } => {
                if self.up[node] && self.incarnation[node] == incarnation {
                    self.node_input(node, Input::Timer(timer));
                }
            }
            EventKind::Synced {
                node,
                incarnation,
                through,
            } => {
                if self.up[node] && self.incarnation[node] == incarnation {
                    self.node_input(node, Input::Synced { through });
                }
            }
            EventKind::ClientWake { client } => self.client_wake(client),
            EventKind::ClientReply { request, result } => self.client_reply(request, result),
            EventKind::ClientTimeout { client, request } => self.client_timeout(client, request),
            EventKind::FaultStart => self.fault_start(),
            EventKind::FaultEnd { fault } => {
                if fault == self.fault_id {
                    self.fault_end();
                }
            }
            EventKind::ConvergenceCheck => self.convergence_check(),
            EventKind::FinalRead { key } => self.final_read(key),
            EventKind::Membership => self.membership_event(),
        }
    }

    // ----- membership -----

    /// Whether clients may talk to node `i`: it has joined and has not left.
    fn serves(&self, i: usize) -> bool {
        self.nodes[i].joined() && !self.nodes[i].has_exited()
    }

    /// A random node clients may talk to.
    fn pick_node(&mut self) -> usize {
        let candidates: Vec<usize> = (0..self.nodes.len()).filter(|i| self.serves(*i)).collect();
        if candidates.is_empty() {
            return 0;
        }
        candidates[self.rng.index(candidates.len())]
    }

    fn membership_event(&mut self) {
        match self.config.membership {
            None => {}
            Some(MembershipChange::JoinThenLeave) if self.membership_node.is_some() => {
                self.leave_after_join();
            }
            Some(MembershipChange::Join | MembershipChange::JoinThenLeave) => {
                if self.membership_asked || self.membership_node.is_some() {
                    return;
                }
                let then_leave = self.config.membership == Some(MembershipChange::JoinThenLeave);
                let i = self.nodes.len();
                let id = NodeId(format!("n{}", i + 1));
                let members = self.config.nodes;
                let start = self.rng.index(members);
                let via: Vec<NodeId> = (0..members)
                    .map(|k| self.ids[(start + k) % members].clone())
                    .collect();
                let actor = ActorId(self.rng.next_u64());
                let rng = self.rng.fork();
                let joined = SimNode::joining(
                    id.clone(),
                    actor,
                    CLUSTER_NAME,
                    SIM_RING_PARTITIONS,
                    via.clone(),
                    self.config.node.clone(),
                    rng,
                    self.now,
                );
                // A join-then-leave is "asked" once its leave is.
                self.membership_asked = !then_leave;
                match joined {
                    Ok((node, outputs)) => {
                        self.ids.push(id.clone());
                        self.up.push(true);
                        self.paused.push(None);
                        self.incarnation.push(0);
                        self.crash_kind.push(None);
                        self.nodes.push(node);
                        self.skew_clock(i, None);
                        self.membership_node = Some(i);
                        let line = format!("{} join {id} via {}", self.now, via[0]);
                        self.fault_log.push(line.clone());
                        self.membership_log.push(line);
                        self.apply_outputs(i, outputs);
                        if then_leave {
                            self.schedule(self.now + LEAVE_RETRY_MS, EventKind::Membership);
                        }
                    }
                    Err(e) => self.membership_log.push(format!("join failed: {e}")),
                }
            }
            Some(MembershipChange::Leave) => {
                if self.membership_asked {
                    return;
                }
                let x = if let Some(x) = self.membership_node {
                    x
                } else {
                    let x = self.rng.index(self.config.nodes);
                    self.membership_node = Some(x);
                    x
                };
                if !self.up[x] {
                    // An operator cannot ask a stopped node; they try again.
                    let at = self.now + LEAVE_RETRY_MS;
                    self.schedule(at, EventKind::Membership);
                    return;
                }
                self.membership_asked = true;
                let line = match self.nodes[x].leave() {
                    Ok(outputs) => {
                        self.apply_outputs(x, outputs);
                        format!("{} leave {}", self.now, self.ids[x])
                    }
                    Err(e) => format!("{} leave {} refused: {e}", self.now, self.ids[x]),
                };
                self.fault_log.push(line.clone());
                self.membership_log.push(line);
            }
        }
    }

    /// The second half of a join-then-leave: once every serving node sees the joiner as a
    /// valid member of a settled ring, it asks to leave (checked again later until then).
    fn leave_after_join(&mut self) {
        let Some(x) = self.membership_node else {
            return;
        };
        if self.membership_asked {
            return;
        }
        let id = self.ids[x].clone();
        let settled_member = (0..self.nodes.len()).filter(|i| self.serves(*i)).all(|i| {
            let state = self.nodes[i].cluster();
            state.settled()
                && state.ring.current.nodes().iter().any(|n| n.id == id)
                && state.member(&id).map(|m| m.status) == Some(MemberStatus::Valid)
        });
        // The node itself must have rejoined too (a node wiped and restarted after its join
        // sees a ring of its own until the cluster takes it back; asked then, it would refuse
        // to leave as the last node of its ring).
        let own = self.nodes[x].cluster();
        let rejoined = own.ring.current.nodes().len() > 1
            && own.member(&id).map(|m| m.status) == Some(MemberStatus::Valid);
        if !self.up[x] || !settled_member || !rejoined {
            let at = self.now + LEAVE_RETRY_MS;
            self.schedule(at, EventKind::Membership);
            return;
        }
        self.membership_asked = true;
        let line = match self.nodes[x].leave() {
            Ok(outputs) => {
                self.apply_outputs(x, outputs);
                format!("{} leave {} (after its join)", self.now, id)
            }
            Err(e) => format!("{} leave {id} (after its join) refused: {e}", self.now),
        };
        self.fault_log.push(line.clone());
        self.membership_log.push(line);
    }

    /// Whether the final state reflects the run's membership change.
    fn membership_ok(&self) -> bool {
        let Some(change) = self.config.membership else {
            return true;
        };
        let Some(x) = self.membership_node.filter(|_| self.membership_asked) else {
            return false;
        };
        let id = &self.ids[x];
        let Some(reference) = (0..self.nodes.len()).find(|i| self.serves(*i)) else {
            return false;
        };
        let state = self.nodes[reference].cluster();
        let in_ring = state.ring.current.nodes().iter().any(|n| &n.id == id);
        let status = state.member(id).map(|m| m.status);
        match change {
            MembershipChange::Join => in_ring && status == Some(MemberStatus::Valid),
            MembershipChange::Leave | MembershipChange::JoinThenLeave => {
                !in_ring && status == Some(MemberStatus::Exiting) && self.nodes[x].has_exited()
            }
        }
    }

    fn delay(&mut self) -> u64 {
        self.rng.range(MIN_DELAY_MS, MAX_DELAY_MS)
    }

    /// Give machine `i` its wall clock's skew (`skew`, or a new draw within
    /// `clock_skew_ms`), and tell it and every other machine the offsets between their
    /// clocks, as the server's transport measures them at each hello.
    fn skew_clock(&mut self, i: usize, skew: Option<i64>) {
        let bound = self.config.clock_skew_ms;
        if bound == 0 {
            return;
        }
        let skew = skew.unwrap_or_else(|| {
            let span = bound.saturating_mul(2);
            let draw = self.skew_rng.range(0, span);
            i64::try_from(draw).unwrap_or(0) - i64::try_from(bound).unwrap_or(0)
        });
        self.nodes[i].set_skew(skew);
        for j in 0..self.nodes.len() {
            if j == i {
                continue;
            }
            let theirs = self.nodes[j].skew();
            let (me, peer) = (self.ids[i].clone(), self.ids[j].clone());
            let to_i = Input::Hello {
                peer,
                offset_ms: theirs - skew,
                key: None,
            };
            let to_j = Input::Hello {
                peer: me,
                offset_ms: skew - theirs,
                key: None,
            };
            let outputs = self.nodes[i].handle(self.now, to_i);
            self.apply_outputs(i, outputs);
            let outputs = self.nodes[j].handle(self.now, to_j);
            self.apply_outputs(j, outputs);
        }
    }

    fn node_input(&mut self, node: usize, input: Input) {
        if let Some(held) = self.paused[node].as_mut() {
            held.push(input);
            return;
        }
        let outputs = self.nodes[node].handle(self.now, input);
        self.apply_outputs(node, outputs);
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.ids.iter().position(|n| n == id)
    }

    fn apply_outputs(&mut self, node: usize, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => {
                    self.messages_sent += 1;
                    // Through the server's wire encoding (postcard), as the transport sends it.
                    let message = wire(message);
                    let Some(to) = self.index_of(&to) else {
                        // Not a member: nowhere to deliver.
                        self.messages_dropped += 1;
                        continue;
                    };
                    if self.blocked.contains(&(node, to)) || self.rng.chance(self.loss) {
                        self.messages_dropped += 1;
                        continue;
                    }
                    // TCP delivers a request once: duplicates model a peer's idempotent
                    // messages arriving twice (replica writes, hints, handoff and
                    // anti-entropy merge by causal context; replies are matched by id), never
                    // a second `CoordinatePut` (coordinating is not idempotent: each run
                    // issues a new dot, which the exactly-once check reports).
                    let coordinate = matches!(
                        message,
                        Message::Request {
                            body: dynakv_core::message::PeerMessage::CoordinatePut { .. },
                            ..
                        }
                    );
                    if !coordinate && self.rng.chance(DUPLICATE_PROBABILITY) {
                        let at = self.now + self.delay();
                        self.schedule(
                            at,
                            EventKind::Deliver {
                                from: node,
                                to,
                                message: message.clone(),
                            },
                        );
                    }
                    let at = self.now + self.delay();
                    self.schedule(
                        at,
                        EventKind::Deliver {
                            from: node,
                            to,
                            message,
                        },
                    );
                }
                Output::Reply { id, result } => {
                    self.schedule(
                        self.now,
                        EventKind::ClientReply {
                            request: id,
                            result,
                        },
                    );
                }
                Output::SetTimer { at_ms, timer } => {
                    let incarnation = self.incarnation[node];
                    self.schedule(
                        at_ms.max(self.now),
                        EventKind::Timer {
                            node,
                            incarnation,
                            timer,
                        },
                    );
                }
                // An fsync takes MIN_SYNC_MS to MAX_SYNC_MS; a crash before it ends loses
                // what it would have made durable (the incarnation changes).
                Output::Sync { through } => {
                    let incarnation = self.incarnation[node];
                    let at = self.now + self.rng.range(MIN_SYNC_MS, MAX_SYNC_MS);
                    let event = EventKind::Synced {
                        node,
                        incarnation,
                        through,
                    };
                    self.schedule(at, event);
                }
                // Written at once, durably (the fsync's time is not modelled): a restart
                // reads back the last state written.
                Output::Persist { state } => self.nodes[node].persist(&state),
                // The simulated disk never fails: a stopped node is a bug of the simulation.
                Output::Stopped { error } => {
                    panic!(
                        "node {} stopped at {} ms: {error}",
                        self.ids[node], self.now
                    )
                }
            }
        }
    }

    // ----- clients -----

    fn record(&mut self, client: usize, current: &Current, event: EventType, note: String) {
        self.history.events.push(Event {
            time_ms: self.now,
            client,
            op: current.op,
            event,
            kind: current.kind,
            key: current.key.clone(),
            value: current.value,
            note,
        });
    }

    fn client_request(&mut self, client: usize, op: ClientOp) -> ClientRequestId {
        let request = self.next_client_request;
        self.next_client_request += 1;
        self.requests.insert(request, client);
        let at = self.now + CLIENT_TIMEOUT_MS;
        self.schedule(at, EventKind::ClientTimeout { client, request });
        let node = self.clients[client].node;
        self.node_input(node, Input::Client { id: request, op });
        request
    }

    fn client_wake(&mut self, client: usize) {
        if self.healed_at.is_some() || self.clients[client].ops_left == 0 {
            return;
        }
        self.clients[client].ops_left -= 1;
        // A client moves with a small probability, and always off a node that has left (or
        // has not joined yet).
        if !self.serves(self.clients[client].node) || self.rng.chance(CLIENT_SWITCH_PROBABILITY) {
            self.clients[client].node = self.pick_node();
        }
        let (key, mut kind) = self.keys[self.rng.index(self.keys.len())].clone();
        if kind == OpKind::Write && self.config.deletes && self.rng.chance(DELETE_PROBABILITY) {
            kind = OpKind::Delete;
        }
        if kind == OpKind::DtAdd && self.rng.chance(DT_REMOVE_PROBABILITY) {
            kind = OpKind::DtRemove;
        }
        if kind == OpKind::TtlWrite && self.rng.chance(TTL_READ_PROBABILITY) {
            kind = OpKind::TtlRead;
        }
        let value = self.next_value;
        self.next_value += 1;
        let op = self.next_op;
        self.next_op += 1;
        let read_first = match kind {
            OpKind::Increment | OpKind::DtAdd | OpKind::TtlWrite => false,
            OpKind::DtRemove | OpKind::SetAdd | OpKind::Delete | OpKind::TtlRead => true,
            OpKind::Write => self.rng.chance(REGISTER_READ_PROBABILITY),
        };
        let write = self.history.writes.len();
        self.history.writes.push(WriteRecord {
            kind,
            key: key.clone(),
            value,
            context: None,
            sent: false,
            acked: None,
        });
        let node = self.clients[client].node;
        let mut current = Current {
            op,
            kind,
            key: key.clone(),
            value,
            write,
            phase: Phase::Reading,
            request: 0,
            invoked_ms: self.now,
        };
        if kind == OpKind::TtlWrite {
            self.history
                .ttl_writes
                .insert(value, (current.key.clone(), None));
        }
        self.record(
            client,
            &current,
            EventType::Invoke,
            format!("via {}", self.ids[node]),
        );
        if !self.up[node] {
            // Connection refused: certainly not applied. Try another node next time.
            self.record(client, &current, EventType::Fail, "node down".into());
            self.clients[client].node = (node + 1) % self.nodes.len();
            self.schedule_wake(client);
            return;
        }
        if read_first {
            // R and W are the bucket's (quorum).
            let op = ClientOp::Get {
                bucket: crate::node::bucket_of(&key).into(),
                key,
                r: None,
                pr: None,
            };
            current.request = self.client_request(client, op);
            self.clients[client].current = Some(current);
        } else {
            current.phase = Phase::Writing;
            self.clients[client].current = Some(current);
            let value = match kind {
                OpKind::Increment => datatype_update(Op::Counter(1), None),
                OpKind::DtAdd => datatype_update(
                    Op::Set {
                        add: vec![value.to_le_bytes().to_vec()],
                        remove: Vec::new(),
                    },
                    None,
                ),
                _ => encode_register(value),
            };
            self.send_put(client, None, Some(value));
        }
    }

    fn send_put(
        &mut self,
        client: usize,
        context: Option<dynakv_core::version::VersionVector>,
        value: Option<Vec<u8>>,
    ) {
        let Some(current) = &self.clients[client].current else {
            return;
        };
        let (key, write) = (current.key.clone(), current.write);
        self.history.writes[write].context.clone_from(&context);
        self.history.writes[write].sent = true;
        let bucket = crate::node::bucket_of(&key);
        let mut op = PutOp::new(bucket, &key, context, value);
        if bucket == crate::node::COUNTER_BUCKET || bucket == crate::node::SET_BUCKET {
            dynakv_core::crdt::DATATYPE_UPDATE_CONTENT_TYPE
                .clone_into(&mut op.content.content_type);
        }
        if bucket == crate::node::TTL_BUCKET {
            op.content.ttl_secs = Some(EXPIRY_TTL_SECS);
        }
        let request = self.client_request(client, ClientOp::Put(op));
        if let Some(current) = &mut self.clients[client].current {
            current.request = request;
        }
    }

    fn schedule_wake(&mut self, client: usize) {
        let at = self.now + self.rng.range(MIN_THINK_MS, MAX_THINK_MS);
        self.schedule(at, EventKind::ClientWake { client });
    }

    fn finish(&mut self, client: usize, event: EventType, note: String) {
        if let Some(current) = self.clients[client].current.take() {
            self.record(client, &current, event, note);
        }
        self.schedule_wake(client);
    }

    fn client_reply(&mut self, request: ClientRequestId, result: ClientResult) {
        if let Some(key) = self.final_reads.remove(&request) {
            if let ClientResult::Got(object) = result {
                self.finals.insert(key, object);
                return;
            }
            // Views of who is up may lag the heal: retry until the bound.
            let healed = self.healed_at.unwrap_or(0);
            if self.now + FINAL_READ_RETRY_MS > healed + CONVERGENCE_BOUND_MS + FINAL_READ_BOUND_MS
            {
                self.final_read_failed = true;
            } else {
                let at = self.now + FINAL_READ_RETRY_MS;
                self.schedule(at, EventKind::FinalRead { key });
            }
            return;
        }
        let Some(client) = self.requests.remove(&request) else {
            return;
        };
        let Some(current) = &self.clients[client].current else {
            return;
        };
        if current.request != request {
            return; // a late reply to a request the client gave up on
        }
        let (phase, kind, key, value, write) = (
            current.phase,
            current.kind,
            current.key.clone(),
            current.value,
            current.write,
        );
        let invoked_ms = current.invoked_ms;
        match (phase, result) {
            (Phase::Reading, ClientResult::Got(object)) if kind == OpKind::TtlRead => {
                let values = object
                    .live_siblings()
                    .filter_map(|s| decode_register(&s.content.value))
                    .collect();
                self.history.ttl_reads.push(TtlRead {
                    key,
                    invoked_ms,
                    values,
                });
                self.finish(client, EventType::Ok, String::new());
            }
            (Phase::Reading, ClientResult::Got(object)) if kind == OpKind::DtRemove => {
                let set = match dynakv_core::crdt::merged_value(&object, DataTypeKind::Set) {
                    Ok(Some(Crdt::Set(set))) => set,
                    Ok(_) => {
                        self.finish(client, EventType::Fail, "nothing to remove".into());
                        return;
                    }
                    Err(e) => {
                        self.finish(client, EventType::Fail, format!("read: {e}"));
                        return;
                    }
                };
                let elements: Vec<u64> = set.elements().filter_map(decode_register).collect();
                if elements.is_empty() {
                    self.finish(client, EventType::Fail, "nothing to remove".into());
                    return;
                }
                let element = elements[self.rng.index(elements.len())];
                self.history.writes[write].value = element;
                if let Some(current) = &mut self.clients[client].current {
                    current.phase = Phase::Writing;
                    current.value = element;
                }
                let update = datatype_update(
                    Op::Set {
                        add: Vec::new(),
                        remove: vec![element.to_le_bytes().to_vec()],
                    },
                    Some(set.context()),
                );
                self.send_put(client, None, Some(update));
            }
            (Phase::Reading, ClientResult::Got(object)) => {
                let values: Vec<Vec<u8>> = object
                    .live_siblings()
                    .map(|s| s.content.value.clone())
                    .collect();
                if kind != OpKind::SetAdd {
                    for sibling in object.live_siblings() {
                        if let Some(v) = decode_register(&sibling.content.value) {
                            self.history
                                .register_dots
                                .entry((key.clone(), v))
                                .or_default()
                                .insert(sibling.dot);
                        }
                    }
                }
                let new_value = match kind {
                    OpKind::SetAdd => {
                        let mut set: BTreeSet<u64> =
                            values.iter().flat_map(|v| decode_set(v)).collect();
                        set.insert(value);
                        encode_set(&set)
                    }
                    OpKind::Write | OpKind::Delete => {
                        for v in values.iter().filter_map(|v| decode_register(v)) {
                            self.history.observed.insert((key.clone(), v));
                        }
                        encode_register(value)
                    }
                    // Data type operations other than a removal send no read; nor do
                    // expiry writes (a read of theirs is answered above).
                    OpKind::Increment
                    | OpKind::DtAdd
                    | OpKind::DtRemove
                    | OpKind::TtlWrite
                    | OpKind::TtlRead => {
                        self.finish(client, EventType::Fail, "unexpected read".into());
                        return;
                    }
                };
                let new_value = (kind != OpKind::Delete).then_some(new_value);
                if let Some(current) = &mut self.clients[client].current {
                    current.phase = Phase::Writing;
                }
                self.send_put(client, Some(object.clock().clone()), new_value);
            }
            (Phase::Reading, ClientResult::Failed { message: e, .. }) => {
                self.finish(client, EventType::Fail, format!("read: {e}"));
            }
            (Phase::Writing, ClientResult::Put(stored)) => {
                let dot = stored
                    .siblings()
                    .iter()
                    .filter(|s| match kind {
                        OpKind::SetAdd => decode_set(&s.content.value).contains(&value),
                        OpKind::Write | OpKind::TtlWrite => {
                            decode_register(&s.content.value) == Some(value)
                        }
                        OpKind::Delete => s.content.deleted,
                        // A data type update is stored as the key's one new version.
                        OpKind::Increment | OpKind::DtAdd | OpKind::DtRemove => true,
                        OpKind::TtlRead => false,
                    })
                    .map(|s| s.dot)
                    .max();
                self.history.writes[write].acked = dot;
                if kind == OpKind::TtlWrite
                    && let Some(write) = self.history.ttl_writes.get_mut(&value)
                {
                    write.1 = Some(self.now);
                }
                if let (OpKind::Write, Some(dot)) = (kind, dot) {
                    self.history
                        .register_dots
                        .entry((key.clone(), value))
                        .or_default()
                        .insert(dot);
                }
                let note = if dot.is_some() {
                    String::new()
                } else {
                    // Only possible when last_write_wins resolved the write away at once.
                    "acknowledged, not in stored object".into()
                };
                if dot.is_none() {
                    self.history.writes[write].acked = Some(dynakv_core::version::Dot {
                        actor: ActorId(0),
                        counter: u64::MAX,
                    });
                }
                self.finish(client, EventType::Ok, note);
            }
            (Phase::Writing, ClientResult::Failed { message: e, .. }) => {
                self.finish(client, EventType::Info, format!("write: {e}"));
            }
            (_, other) => {
                self.finish(client, EventType::Info, format!("unexpected {other:?}"));
            }
        }
    }

    fn client_timeout(&mut self, client: usize, request: ClientRequestId) {
        let Some(current) = &self.clients[client].current else {
            return;
        };
        if current.request != request {
            return;
        }
        self.requests.remove(&request);
        let event = match current.phase {
            Phase::Reading => EventType::Fail,
            Phase::Writing => EventType::Info,
        };
        self.finish(client, event, "timeout".into());
    }

    // ----- faults -----

    fn fault_start(&mut self) {
        if self.healed_at.is_some() {
            return;
        }
        let n = self.nodes.len();
        let fault = match self.rng.index(12) {
            0 | 1 => {
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    let j = self.rng.index(i + 1);
                    order.swap(i, j);
                }
                let side = self.rng.range(1, (n / 2) as u64) as usize;
                Fault::Halves(order[..side].to_vec())
            }
            2 | 3 => Fault::Isolate(self.rng.index(n)),
            4 | 5 => {
                let a = self.rng.index(n);
                let b = (a + 1 + self.rng.index(n - 1)) % n;
                let mut c = self.rng.index(n);
                while c == a || c == b {
                    c = (c + 1) % n;
                }
                Fault::NonTransitive(a, b, c)
            }
            6 | 7 => Fault::Loss(
                self.rng
                    .range(BURST_LOSS_PERCENT_MIN, BURST_LOSS_PERCENT_MAX) as f64
                    / 100.0,
            ),
            8 => Fault::Crash(self.rng.index(n), CrashKind::Process),
            9 => Fault::Pause(self.rng.index(n)),
            _ => {
                let kind = if self.data_loss_crashes >= MAX_DATA_LOSS_CRASHES {
                    CrashKind::Process
                } else if self.rng.chance(0.5) {
                    CrashKind::PowerLoss
                } else {
                    CrashKind::Wipe
                };
                if kind != CrashKind::Process {
                    self.data_loss_crashes += 1;
                }
                Fault::Crash(self.rng.index(n), kind)
            }
        };
        match &fault {
            Fault::Halves(side) => {
                for a in 0..n {
                    for b in 0..n {
                        if side.contains(&a) != side.contains(&b) {
                            self.blocked.insert((a, b));
                        }
                    }
                }
            }
            Fault::Isolate(x) => {
                for o in (0..n).filter(|o| o != x) {
                    self.blocked.insert((*x, o));
                    self.blocked.insert((o, *x));
                }
            }
            Fault::NonTransitive(a, _, c) => {
                self.blocked.insert((*a, *c));
                self.blocked.insert((*c, *a));
            }
            Fault::Loss(p) => self.loss = *p,
            Fault::Crash(x, kind) => {
                self.up[*x] = false;
                self.crash_kind[*x] = Some(*kind);
            }
            Fault::Pause(x) => self.paused[*x] = Some(Vec::new()),
        }
        self.fault_log
            .push(format!("{} {}", self.now, self.describe_fault(&fault)));
        let longest = match &fault {
            Fault::Pause(_) => MAX_PAUSE_MS,
            _ => MAX_FAULT_MS,
        };
        self.active_fault = Some(fault);
        self.fault_id += 1;
        let end = self.now + self.rng.range(MIN_FAULT_MS, longest);
        self.schedule(
            end,
            EventKind::FaultEnd {
                fault: self.fault_id,
            },
        );
    }

    fn describe_fault(&self, fault: &Fault) -> String {
        let name = |i: &usize| self.ids[*i].0.clone();
        match fault {
            Fault::Halves(side) => format!(
                "partition {:?} | rest",
                side.iter().map(name).collect::<Vec<_>>()
            ),
            Fault::Isolate(x) => format!("isolate {}", name(x)),
            Fault::NonTransitive(a, b, c) => format!(
                "non-transitive {}-{} ok, {}-{} ok, {}-{} cut",
                name(a),
                name(b),
                name(b),
                name(c),
                name(a),
                name(c)
            ),
            Fault::Loss(p) => format!("loss {p:.2}"),
            Fault::Crash(x, kind) => format!("crash {} ({kind:?})", name(x)),
            Fault::Pause(x) => format!("pause {}", name(x)),
        }
    }

    fn end_active_fault(&mut self) {
        let Some(fault) = self.active_fault.take() else {
            return;
        };
        self.blocked.clear();
        self.loss = BASE_LOSS;
        match fault {
            Fault::Crash(x, _) => self.restart(x),
            Fault::Pause(x) => {
                // Resumed: it handles what arrived meanwhile, in order, at the current time.
                for input in self.paused[x].take().unwrap_or_default() {
                    self.node_input(x, input);
                }
            }
            _ => {}
        }
        self.fault_log.push(format!("{} heal", self.now));
    }

    fn fault_end(&mut self) {
        self.end_active_fault();
        if self.healed_at.is_none() {
            let at = self.now + self.rng.range(MIN_HEALTHY_MS, MAX_HEALTHY_MS);
            self.schedule(at, EventKind::FaultStart);
        }
    }

    fn restart(&mut self, x: usize) {
        let kind = self.crash_kind[x].take().unwrap_or(CrashKind::Process);
        self.up[x] = true;
        self.incarnation[x] += 1;
        let new_actor = ActorId(self.rng.next_u64());
        let rng = self.rng.fork();
        let me = self.ids[x].clone();
        let valid = self.nodes[x].joined()
            && self.nodes[x]
                .cluster()
                .member(&me)
                .is_some_and(|m| m.status == MemberStatus::Valid);
        if kind == CrashKind::Wipe && valid {
            // The operator's procedure for a lost disk (as the process tests do): an empty
            // data directory started with --join. The node founds nothing of its own: it
            // asks the members, in turn, to admit it, adopts their state (its own membership
            // included) and gets its keys back by hinted handoff and anti-entropy.
            let start = self.rng.index(self.ids.len());
            let via: Vec<NodeId> = (0..self.ids.len())
                .map(|k| self.ids[(start + k) % self.ids.len()].clone())
                .filter(|id| *id != me)
                .collect();
            let joined = SimNode::joining(
                me.clone(),
                new_actor,
                CLUSTER_NAME,
                SIM_RING_PARTITIONS,
                via,
                self.config.node.clone(),
                rng,
                self.now,
            );
            match joined {
                Ok((node, outputs)) => {
                    // The same machine: its clock keeps its skew.
                    let skew = self.nodes[x].skew();
                    self.nodes[x] = node;
                    self.skew_clock(x, Some(skew));
                    self.fault_log.push(format!(
                        "{} restart {} wiped, rejoining with actor {}",
                        self.now, me, new_actor
                    ));
                    self.apply_outputs(x, outputs);
                }
                Err(e) => panic!("seed {}: cannot restart {me} empty: {e}", self.config.seed),
            }
            return;
        }
        let (lost, outputs) = self.nodes[x].restart(
            self.now,
            kind,
            new_actor,
            self.config.keep_actor_after_loss,
            rng,
        );
        self.fault_log.push(format!(
            "{} restart {} lost data {lost} actor {}",
            self.now,
            self.ids[x],
            self.nodes[x].actor()
        ));
        self.apply_outputs(x, outputs);
    }

    // ----- healing, convergence, final reads -----

    fn heal(&mut self) {
        self.healed_at = Some(self.now);
        self.end_active_fault();
        self.loss = 0.0;
        for x in 0..self.nodes.len() {
            if !self.up[x] {
                self.restart(x);
            }
        }
        self.schedule(self.now + CONVERGENCE_CHECK_MS, EventKind::ConvergenceCheck);
    }

    /// Why the cluster has not converged yet, or `None` when it has: the membership change
    /// (if any) was asked for, every node's view of the ring is the same and settled, no hint
    /// is left, every node ran its cleanup for that ring, and every key's primaries hold
    /// identical objects (Merkle roots of the key's partition first, then the objects).
    fn convergence_problem(&self) -> Option<String> {
        if self.config.membership.is_some() && !self.membership_asked {
            return Some("membership change not asked yet".into());
        }
        let Some(reference) = (0..self.nodes.len()).find(|i| self.serves(*i)) else {
            return Some("no node serves clients".into());
        };
        let state = self.nodes[reference].cluster();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.cluster().settled() {
                return Some(format!("{} sees an unsettled cluster", self.ids[i]));
            }
            if !node.cleaned_up() {
                return Some(format!("{} has not cleaned up yet", self.ids[i]));
            }
            if node.cluster().ring != state.ring {
                return Some(format!(
                    "{} has ring version {}, {} has {}",
                    self.ids[i],
                    node.cluster().ring.version,
                    self.ids[reference],
                    state.ring.version
                ));
            }
        }
        if let Some(i) = (0..self.nodes.len()).find(|i| self.nodes[*i].hint_count() > 0) {
            return Some(format!(
                "{} holds {} hints",
                self.ids[i],
                self.nodes[i].hint_count()
            ));
        }
        let node0 = &self.nodes[reference];
        for (key, _) in &self.keys {
            let primaries: Vec<usize> = node0
                .primaries(key)
                .iter()
                .filter_map(|id| self.index_of(id))
                .collect();
            let partition = node0.partition_of(key);
            let first = &self.nodes[primaries[0]];
            let root = first.partition_root(partition);
            if primaries
                .iter()
                .any(|p| self.nodes[*p].partition_root(partition) != root)
            {
                return Some(format!("{key}: replicas' Merkle roots differ"));
            }
            let object = first.object(key);
            if primaries
                .iter()
                .any(|p| self.nodes[*p].object(key) != object)
            {
                return Some(format!("{key}: replicas differ"));
            }
            // Expired values are removed: once a value expired by every machine's clock
            // (its stamp plus the skew bound), its key's replicas converge to its tombstone.
            if let Some(expired) = object.as_ref().and_then(|o| {
                o.live_siblings()
                    .filter_map(|s| s.content.expires_ms)
                    .find(|at| at.saturating_add(self.config.clock_skew_ms) <= self.now)
            }) {
                return Some(format!("{key}: holds a value that expired at {expired}"));
            }
        }
        // Keys left outside their preference list after every node's cleanup are reported by
        // `strays` (they do not hold convergence up: cleanup will not remove them).
        None
    }

    /// Keys stored on a node outside their preference list (in the view of the first node
    /// that serves clients).
    fn strays(&self) -> Vec<(String, NodeId)> {
        let Some(reference) = (0..self.nodes.len()).find(|i| self.serves(*i)) else {
            return Vec::new();
        };
        let node0 = &self.nodes[reference];
        let mut strays = Vec::new();
        for (key, _) in &self.keys {
            let primaries = node0.primaries(key);
            for (i, node) in self.nodes.iter().enumerate() {
                if !primaries.contains(&self.ids[i]) && node.object(key).is_some() {
                    strays.push((key.clone(), self.ids[i].clone()));
                }
            }
        }
        strays
    }

    fn convergence_check(&mut self) {
        if self.converged_at.is_some() {
            return;
        }
        if self.convergence_problem().is_none() {
            self.converged_at = Some(self.now);
            // Final reads, R = N, one per key, through the protocol.
            for (key, _) in self.keys.clone() {
                self.final_read(key);
            }
        } else {
            self.schedule(self.now + CONVERGENCE_CHECK_MS, EventKind::ConvergenceCheck);
        }
    }

    fn final_read(&mut self, key: String) {
        let request = self.next_client_request;
        self.next_client_request += 1;
        self.final_reads.insert(request, key.clone());
        let node = self.pick_node();
        // The final read asks every primary (R = N).
        let r = Some(Quorum::Count(self.config.node.props.n_val));
        self.node_input(
            node,
            Input::Client {
                id: request,
                op: ClientOp::Get {
                    bucket: crate::node::bucket_of(&key).into(),
                    key,
                    r,
                    pr: None,
                },
            },
        );
    }

    fn report(self) -> RunReport {
        let check = checker::check(&self.history, &self.finals);
        let (datatype_problems, datatype_ops) = if self.config.datatypes {
            checker::check_datatypes(&self.history, &self.finals, &self.keys)
        } else {
            (Vec::new(), (0, 0, 0))
        };
        let (expiry_problems, expiry_reads) = if self.config.expiry {
            let ttl_ms = EXPIRY_TTL_SECS * 1000;
            checker::check_expiry(&self.history, ttl_ms, self.config.clock_skew_ms)
        } else {
            (Vec::new(), (0, 0))
        };
        let membership_ok = self.membership_ok();
        let strays = self.strays();
        let convergence_problem = if self.converged_at.is_some() {
            None
        } else {
            self.convergence_problem()
        };
        let sum = |f: fn(crate::node::NodeStats) -> u64| -> u64 {
            self.nodes.iter().map(|n| f(n.stats())).sum()
        };
        let (handoff_keys, cleanup_dropped, stale_ring_refusals, replans) = (
            sum(|s| s.handoff_keys),
            sum(|s| s.cleanup_dropped),
            sum(|s| s.stale_ring_refusals),
            sum(|s| s.replans),
        );
        let tombstones_reaped = sum(|s| s.tombstones_reaped);
        let late_forwards_refused = sum(|s| s.late_forwards_refused);
        let pauses = self
            .fault_log
            .iter()
            .filter(|line| line.contains(" pause "))
            .count();
        let final_read_ok = self.converged_at.is_some()
            && !self.final_read_failed
            && self.finals.len() == self.keys.len();
        let finals = self.finals;
        let max_siblings = self
            .nodes
            .iter()
            .map(|n| n.stats().max_siblings)
            .max()
            .unwrap_or(0);
        let max_clock_entries = self
            .nodes
            .iter()
            .map(|n| n.stats().max_clock_entries)
            .max()
            .unwrap_or(0);
        let history = self.history;
        let ops_attempted = history.count(EventType::Invoke);
        let ops_ok = history.count(EventType::Ok);
        let ops_failed = history.count(EventType::Fail);
        let ops_indeterminate = history.count(EventType::Info);
        RunReport {
            convergence_ms: match (self.healed_at, self.converged_at) {
                (Some(h), Some(c)) => Some(c - h),
                _ => None,
            },
            converged: self.converged_at.is_some(),
            final_read_ok,
            bounds_ok: max_siblings <= limits::MAX_SIBLINGS
                && max_clock_entries <= limits::MAX_CLOCK_ENTRIES,
            max_siblings,
            max_clock_entries,
            check,
            ops_attempted,
            ops_ok,
            ops_failed,
            ops_indeterminate,
            history,
            fault_log: self.fault_log,
            messages_sent: self.messages_sent,
            messages_dropped: self.messages_dropped,
            end_ms: self.now,
            finals,
            membership_log: self.membership_log,
            membership_ok,
            strays,
            convergence_problem,
            handoff_keys,
            cleanup_dropped,
            stale_ring_refusals,
            replans,
            pauses,
            late_forwards_refused,
            tombstones_reaped,
            datatype_problems,
            datatype_ops,
            expiry_problems,
            expiry_reads,
            config: self.config,
        }
    }
}

/// A message as the peer receives it: encoded and decoded with postcard, the transport's
/// payload format. The encoding never fails for a value the node built; if it did, that is a
/// bug of the wire format and the run stops loudly.
fn wire(message: Message) -> Message {
    let round_trip = |body: &dynakv_core::message::PeerMessage| {
        postcard::to_allocvec(body)
            .and_then(|bytes| postcard::from_bytes(&bytes))
            .unwrap_or_else(|e| {
                panic!(
                    "peer message {} does not survive the wire: {e}",
                    body.name()
                )
            })
    };
    match message {
        Message::Request { id, body } => Message::Request {
            id,
            body: round_trip(&body),
        },
        Message::Response { id, body } => Message::Response {
            id,
            body: round_trip(&body),
        },
    }
}

/// The cluster every node starts with, built as the server builds it: the first node founds
/// it, the others are admitted (`add_joining`), and the claimant's `plan` settles the ring
/// (no data yet, so every handoff is done at once).
pub(crate) fn initial_cluster(ids: &[NodeId]) -> Result<ClusterState, MembershipError> {
    let (first, rest) = ids.split_first().ok_or(RingError::NoNodes)?;
    let mut state = ClusterState::found(CLUSTER_NAME, member_entry(first), SIM_RING_PARTITIONS)?;
    for id in rest {
        state.add_joining(member_entry(id))?;
    }
    for _ in 0..4 {
        if state.settled() {
            break;
        }
        state.plan();
        for node in state.transition_participants() {
            state.mark_handoff_done(&node);
        }
    }
    debug_assert!(state.settled());
    Ok(state)
}

/// A data type update's bytes, as the client API sends them on.
fn datatype_update(op: Op, context: Option<dynakv_core::crdt::SetContext>) -> Vec<u8> {
    let kind = match op {
        Op::Counter(_) => DataTypeKind::Counter,
        _ => DataTypeKind::Set,
    };
    dynakv_core::crdt::Update { kind, op, context }.encode()
}

/// Run one seed with the given modifications of its configuration.
pub fn run_seed(seed: u64, adjust: impl FnOnce(&mut SimConfig)) -> Result<RunReport, String> {
    let mut config = SimConfig::from_seed(seed);
    adjust(&mut config);
    Ok(Simulation::new(config)?.run())
}
