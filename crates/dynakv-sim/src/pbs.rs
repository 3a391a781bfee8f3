//! Validating the PBS predictor (issue 22): the simulator measures true staleness and the
//! core's predictor (`dynakv_core::pbs`) predicts it from the round trips the same nodes
//! measured, side by side.
//!
//! A probe runs the core's `Node`s over the simulated network of the main simulation (each
//! message delayed 1 to 20 ms, uniformly; each fsync 1 to 8 ms), without faults. One client
//! writes a fresh key (so no siblings) through a random node with the probe's W and, when
//! the write is acknowledged at time T, reads it through a random node with the probe's R at
//! T + t for every t; a read is consistent when it returns the written value. The measured
//! probability per t is the share of consistent reads; the prediction uses the pooled
//! replica round trips of every node.

use crate::node::{
    ClientOp, ClientRequestId, ClientResult, Input, Message, NodeConfig, Output, PutOp, SimNode,
    Timer, sim_config,
};
use crate::rng::SimRng;
use crate::sim::{MAX_DELAY_MS, MAX_SYNC_MS, MIN_DELAY_MS, MIN_SYNC_MS, initial_cluster};
use dynakv_core::bucket::{BucketProps, Quorum};
use dynakv_core::pbs::{self, Point, Samples};
use dynakv_core::ring::NodeId;
use dynakv_core::storage::Durability;
use dynakv_core::version::ActorId;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// One probe's parameters.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub seed: u64,
    pub nodes: usize,
    pub r: u32,
    pub w: u32,
    pub t_ms: Vec<u64>,
    pub trials: usize,
    pub durability: Durability,
}

/// What a probe measured and predicted.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub config: ProbeConfig,
    /// Per t: consistent reads and reads answered.
    pub measured: Vec<(u64, usize, usize)>,
    pub predicted: Vec<Point>,
    pub samples: (usize, usize),
}

impl ProbeReport {
    /// The largest difference between predicted and measured probability.
    pub fn max_error(&self) -> f64 {
        self.measured
            .iter()
            .zip(&self.predicted)
            .map(|((_, hits, reads), p)| {
                (*hits as f64 / (*reads).max(1) as f64 - p.consistent).abs()
            })
            .fold(0.0, f64::max)
    }
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: usize,
        from: usize,
        message: Message,
    },
    Timer {
        node: usize,
        timer: Timer,
    },
    Synced {
        node: usize,
        through: u64,
    },
    Reply {
        id: ClientRequestId,
        result: ClientResult,
    },
    Write {
        trial: usize,
    },
    Read {
        trial: usize,
        t_index: usize,
    },
}

struct Probe {
    config: ProbeConfig,
    rng: SimRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    nodes: Vec<SimNode>,
    ids: Vec<NodeId>,
    next_request: ClientRequestId,
    /// Request id to (trial, t index): `None` for a trial's write.
    requests: BTreeMap<ClientRequestId, (usize, Option<usize>)>,
    hits: Vec<(usize, usize)>,
    /// Writes acknowledged, and reads scheduled or in flight.
    written: usize,
    open_reads: usize,
}

const BUCKET: &str = "pbs";
/// The first write comes once the nodes exchanged gossip (no data needs it, but the
/// failure detector has heard from everyone).
const START_MS: u64 = 3000;
/// A trial's next write comes this long after its last read was issued.
const GAP_MS: u64 = 50;

/// Run one probe.
///
/// # Errors
/// The cluster could not be built.
pub fn probe(config: ProbeConfig) -> Result<ProbeReport, String> {
    let ids: Vec<NodeId> = (0..config.nodes)
        .map(|i| NodeId(format!("n{}", i + 1)))
        .collect();
    let cluster = initial_cluster(&ids).map_err(|e| e.to_string())?;
    let node_config = NodeConfig {
        props: BucketProps {
            durability: config.durability,
            ..BucketProps::default()
        },
        ..sim_config()
    };
    let mut rng = SimRng::new(config.seed);
    let mut probe = Probe {
        hits: vec![(0, 0); config.t_ms.len()],
        config,
        rng: rng.fork(),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        nodes: Vec::new(),
        ids: ids.clone(),
        next_request: 1,
        requests: BTreeMap::new(),
        written: 0,
        open_reads: 0,
    };
    for (i, id) in ids.iter().enumerate() {
        let (node, outputs) = SimNode::new(
            id.clone(),
            ActorId(rng.next_u64()),
            cluster.clone(),
            node_config.clone(),
            rng.fork(),
            0,
        )?;
        probe.nodes.push(node);
        probe.apply(i, outputs);
    }
    probe.schedule(START_MS, Event::Write { trial: 0 });
    while probe.written < probe.config.trials || probe.open_reads > 0 {
        let Some(Reverse((at, _, key))) = probe.queue.pop() else {
            break;
        };
        probe.now = at;
        if let Some(event) = probe.events.remove(&key) {
            probe.dispatch(event);
        }
    }
    let mut pooled = Samples::default();
    for node in &probe.nodes {
        pooled.extend(node.pbs_samples());
    }
    let n = BucketProps::default().n_val as usize;
    let t: Vec<f64> = probe.config.t_ms.iter().map(|t| *t as f64).collect();
    let local = (n as f64 / probe.config.nodes as f64).min(1.0);
    let quorums = (n, probe.config.r as usize, probe.config.w as usize);
    let predicted =
        pbs::predict(&pooled, quorums, &t, local, probe.config.seed).map_err(|e| e.to_string())?;
    Ok(ProbeReport {
        measured: probe
            .config
            .t_ms
            .iter()
            .zip(&probe.hits)
            .map(|(t, (hits, reads))| (*t, *hits, *reads))
            .collect(),
        predicted,
        samples: pooled.counts(),
        config: probe.config,
    })
}

impl Probe {
    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        let key = usize::try_from(self.seq).unwrap_or(usize::MAX);
        self.events.insert(key, event);
        self.queue.push(Reverse((at, self.seq, key)));
    }

    fn delay(&mut self) -> u64 {
        self.rng.range(MIN_DELAY_MS, MAX_DELAY_MS)
    }

    fn input(&mut self, node: usize, input: Input) {
        let outputs = self.nodes[node].handle(self.now, input);
        self.apply(node, outputs);
    }

    fn apply(&mut self, node: usize, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => {
                    if let Some(to) = self.ids.iter().position(|id| *id == to) {
                        let at = self.now + self.delay();
                        self.schedule(
                            at,
                            Event::Deliver {
                                to,
                                from: node,
                                message,
                            },
                        );
                    }
                }
                Output::Reply { id, result } => {
                    self.schedule(self.now, Event::Reply { id, result });
                }
                Output::SetTimer { at_ms, timer } => {
                    self.schedule(at_ms.max(self.now), Event::Timer { node, timer });
                }
                Output::Sync { through } => {
                    let at = self.now + self.rng.range(MIN_SYNC_MS, MAX_SYNC_MS);
                    self.schedule(at, Event::Synced { node, through });
                }
                Output::Persist { state } => self.nodes[node].persist(&state),
                Output::Stopped { error } => panic!("node {} stopped: {error}", self.ids[node]),
            }
        }
    }

    fn request(&mut self, op: ClientOp, tag: (usize, Option<usize>)) {
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, tag);
        let node = self.rng.index(self.nodes.len());
        self.input(node, Input::Client { id, op });
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Deliver { to, from, message } => {
                let from = self.ids[from].clone();
                self.input(to, Input::Message { from, message });
            }
            Event::Timer { node, timer } => self.input(node, Input::Timer(timer)),
            Event::Synced { node, through } => self.input(node, Input::Synced { through }),
            Event::Write { trial } => {
                let key = format!("p{trial}");
                let mut op = PutOp::new(BUCKET, &key, None, Some(trial.to_le_bytes().to_vec()));
                op.w = Some(Quorum::Count(self.config.w));
                self.request(ClientOp::Put(op), (trial, None));
            }
            Event::Read { trial, t_index } => {
                let op = ClientOp::Get {
                    bucket: BUCKET.into(),
                    key: format!("p{trial}"),
                    r: Some(Quorum::Count(self.config.r)),
                    pr: None,
                };
                self.request(op, (trial, Some(t_index)));
            }
            Event::Reply { id, result } => self.reply(id, result),
        }
    }

    fn reply(&mut self, id: ClientRequestId, result: ClientResult) {
        let Some((trial, t_index)) = self.requests.remove(&id) else {
            return;
        };
        match (t_index, result) {
            (None, ClientResult::Put(_)) => {
                self.written += 1;
                for (i, t) in self.config.t_ms.clone().into_iter().enumerate() {
                    self.open_reads += 1;
                    self.schedule(self.now + t, Event::Read { trial, t_index: i });
                }
                if self.written < self.config.trials {
                    let last = self.config.t_ms.iter().max().copied().unwrap_or(0);
                    self.schedule(self.now + last + GAP_MS, Event::Write { trial: trial + 1 });
                }
            }
            // A write that failed (it cannot without faults) is retried as the next trial.
            (None, _) => self.schedule(self.now + GAP_MS, Event::Write { trial: trial + 1 }),
            (Some(i), result) => {
                self.open_reads -= 1;
                let value = trial.to_le_bytes();
                match result {
                    ClientResult::Got(object) => {
                        let fresh = object.live_siblings().any(|s| s.content.value == value);
                        self.hits[i].0 += usize::from(fresh);
                        self.hits[i].1 += 1;
                    }
                    // Not found is an answer: no replica the read heard from had the write.
                    ClientResult::Failed { status: 404, .. } => self.hits[i].1 += 1,
                    _ => {}
                }
            }
        }
    }
}
