//! One anti-entropy round as a sans-IO machine, driven by the simulator's `Node` and by the
//! server: the round's plan ([`AaeRound`]: each partition this node replicates, with one
//! peer) and, one partition after another, its exchange ([`AaeExchange`]: segments, leaves,
//! keys, then both versions of each differing key and their repair). The driver performs the
//! steps (a question to the peer, this node's keys of some leaves, a fetch of the peer's copy,
//! a read of this node's copy, a repair) and feeds their outcomes back; the machine decides
//! what follows, so which step follows which reply, the timeouts, what a failed step ends and
//! what a repair writes are one piece of code for both.
//!
//! Invariants: one exchange at a time, one question of it in flight; an answer or fetch this
//! machine did not ask for (a late reply of an exchange that ended, another request's id) is
//! ignored; the keys of a `Compare` are fetched at most `AAE_FETCHES_IN_FLIGHT` at a time
//! and an exchange ends once every one has an outcome or the budget is spent; a failed or unexpected answer ends its exchange
//! without a record; a repair's remote write is `Buffered` (no client waits for it, and a
//! repair lost in a crash is found again by the next round).

use crate::aae_trees::AaeTrees;
use crate::anti_entropy::{AaeAsk, AaeExchange, AaeRound, AaeStep, BucketKey};
use crate::coordinator::KeyRepair;
use crate::limits::AAE_FETCHES_IN_FLIGHT;
use crate::membership::ClusterState;
use crate::merkle::Hash;
use crate::message::PeerMessage;
use crate::object::Object;
use crate::ring::{NodeId, PartitionId};
use crate::storage::Durability;
use std::collections::{BTreeMap, BTreeSet};

/// The durability of a repair's write to the peer (see the module doc).
pub const REPAIR_DURABILITY: Durability = Durability::Buffered;

/// Listing a leaf's keys may read many index entries: the peer gets this many request
/// timeouts to answer a key question.
pub const KEYS_TIMEOUT_FACTOR: u64 = 5;

/// What an anti-entropy round asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum AaeRunStep {
    /// Ask the exchange's peer one question; feed the answer back as [`AaeRunEvent::Answer`].
    Ask {
        id: u64,
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    },
    /// List this node's keys (with entry hashes) in these leaves of the partition (bounded by
    /// `MAX_AAE_KEYS_PER_EXCHANGE`); feed them back as [`AaeRunEvent::LeafKeys`].
    ReadLeafKeys {
        id: u64,
        partition: PartitionId,
        leaves: BTreeSet<u16>,
    },
    /// Fetch the peer's copy of a key (`ReplicaGet`); feed it back as
    /// [`AaeRunEvent::Fetched`].
    Fetch {
        id: u64,
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    },
    /// Read this node's copy of a key; feed it back as [`AaeRunEvent::Local`].
    ReadLocal {
        id: u64,
        bucket: String,
        key: String,
    },
    /// Repair one key (one that differs): merge `merged` into this node's copy when `store_local` (checking,
    /// as for any merge, that this node still replicates it), and send `remote` (a
    /// `ReplicaPut` of `merged`) to the peer, fire and forget.
    Repair {
        bucket: String,
        key: String,
        merged: Object,
        store_local: bool,
        remote: Option<(NodeId, PeerMessage, u64)>,
    },
    /// An exchange completed (the record of `admin aae`).
    Exchanged {
        partition: PartitionId,
        peer: NodeId,
        repaired: usize,
    },
    /// The round is over, having repaired `repaired` keys.
    Over { repaired: usize },
}

/// An outcome fed back to an anti-entropy round.
#[derive(Debug, Clone)]
pub enum AaeRunEvent {
    /// The peer's answer to question `id` (`None`: it failed or timed out).
    Answer {
        id: u64,
        answer: Option<PeerMessage>,
    },
    /// This node's keys of the leaves of step `id`.
    LeafKeys {
        id: u64,
        keys: Result<Vec<(String, String, Hash)>, String>,
    },
    /// The peer's copy of fetch `id`: `Some(None)` when it holds none, `None` when the fetch
    /// failed or its copy did not decode.
    Fetched {
        id: u64,
        object: Option<Option<Object>>,
    },
    /// This node's copy of read `id` (`None`: it could not be read).
    Local {
        id: u64,
        object: Option<Option<Object>>,
    },
}

impl AaeRunEvent {
    /// The outcome of fetch `id` from the peer's reply (`None`: it failed or timed out); a
    /// copy that does not decode, or another answer, counts as a failed fetch.
    pub fn fetched(id: u64, reply: Option<PeerMessage>) -> AaeRunEvent {
        let object = match reply {
            Some(PeerMessage::ReplicaObject { object }) => {
                object.map(|b| Object::decode(&b)).transpose().ok()
            }
            _ => None,
        };
        AaeRunEvent::Fetched { id, object }
    }
}

/// The exchange in progress.
#[derive(Debug)]
struct Current {
    peer: NodeId,
    exchange: AaeExchange<BucketKey>,
    /// The question in flight, and a key answer held until this node's keys are read.
    asking: Option<u64>,
    held: Option<(u64, PeerMessage)>,
    /// Keys of the comparison not fetched yet (at most `AAE_FETCHES_IN_FLIGHT` are out).
    queued: std::collections::VecDeque<BucketKey>,
    /// Keys whose peer copy is being fetched.
    fetching: BTreeMap<u64, BucketKey>,
    /// Keys whose peer copy arrived and whose local copy is being read.
    reading: BTreeMap<u64, (BucketKey, Option<Object>)>,
    /// A step failed or was answered unexpectedly: the exchange ended early.
    failed: bool,
}

impl Current {
    /// The exchange's next step after the peer's answer was read (`Err`: the step failed,
    /// or the answer was not one to the question: the exchange ends).
    fn read(&mut self, step: Result<AaeStep<BucketKey>, String>) -> AaeStep<BucketKey> {
        step.unwrap_or_else(|_| {
            self.failed = true;
            self.exchange.finish()
        })
    }

    /// After a key's outcome: the exchange's end when every key has one or the budget is
    /// spent, else `None` (more outcomes to wait for).
    fn compared(&mut self) -> Option<AaeStep<BucketKey>> {
        if !self.exchange.compared_all()
            && (!self.fetching.is_empty() || !self.reading.is_empty() || !self.queued.is_empty())
        {
            return None;
        }
        self.queued.clear();
        self.fetching.clear();
        self.reading.clear();
        Some(self.exchange.finish())
    }
}

/// One anti-entropy round.
#[derive(Debug)]
pub struct AaeRun {
    plan: AaeRound,
    current: Option<Current>,
    next_id: u64,
    request_ms: u64,
    over: bool,
}

impl AaeRun {
    /// Start the round `plan` (the core's `AaeRound::plan`); `request_ms` is one request's
    /// timeout.
    pub fn start(plan: AaeRound, request_ms: u64) -> (AaeRun, Vec<AaeRunStep>) {
        let mut run = AaeRun {
            plan,
            current: None,
            next_id: 0,
            request_ms,
            over: false,
        };
        let mut steps = Vec::new();
        run.next_exchange(&mut steps);
        (run, steps)
    }

    /// Whether the round is over ([`AaeRunStep::Over`] was returned).
    pub fn finished(&self) -> bool {
        self.over
    }

    /// Keys repaired so far in this round.
    pub fn repaired(&self) -> usize {
        self.plan.repaired()
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn next_exchange(&mut self, steps: &mut Vec<AaeRunStep>) {
        self.current = None;
        let Some((peer, exchange, ask)) = self.plan.next_exchange() else {
            if !self.over {
                self.over = true;
                steps.push(AaeRunStep::Over {
                    repaired: self.plan.repaired(),
                });
            }
            return;
        };
        let mut current = Current {
            peer,
            exchange,
            asking: None,
            held: None,
            queued: std::collections::VecDeque::new(),
            fetching: BTreeMap::new(),
            reading: BTreeMap::new(),
            failed: false,
        };
        self.ask(&mut current, ask, steps);
        self.current = Some(current);
    }

    fn ask(&mut self, current: &mut Current, ask: AaeAsk, steps: &mut Vec<AaeRunStep>) {
        let timeout_ms = match ask {
            AaeAsk::Keys(_) => self.request_ms.saturating_mul(KEYS_TIMEOUT_FACTOR),
            AaeAsk::Segments | AaeAsk::Leaves(_) => self.request_ms,
        };
        let id = self.id();
        current.asking = Some(id);
        steps.push(AaeRunStep::Ask {
            id,
            to: current.peer.clone(),
            message: ask.message(current.exchange.partition()),
            timeout_ms,
        });
    }

    /// Feed an outcome. `trees` are this node's anti-entropy trees (its side of a segment or
    /// leaf comparison), `state` its cluster state and `n_val` a bucket's replica count (a
    /// key is compared only when both nodes replicate it).
    pub fn handle(
        &mut self,
        trees: &AaeTrees,
        state: &ClusterState,
        me: &NodeId,
        n_val: impl Fn(&str) -> u32,
        event: AaeRunEvent,
    ) -> Vec<AaeRunStep> {
        let mut steps = Vec::new();
        let Some(mut current) = self.current.take() else {
            return steps;
        };
        let peer = current.peer.clone();
        let shared = |(bucket, key): &BucketKey| {
            let partition = state
                .ring
                .current
                .partition_of(bucket.as_bytes(), key.as_bytes());
            let replicas = state.preference_list(partition, n_val(bucket));
            replicas.contains(me) && replicas.contains(&peer)
        };
        let step = match event {
            AaeRunEvent::Answer { id, answer } => {
                if current.asking != Some(id) {
                    self.current = Some(current);
                    return steps;
                }
                current.asking = None;
                match answer {
                    Some(answer @ PeerMessage::AaeKeyHashes { .. }) => {
                        // This node's side is read now, once the peer answered.
                        let leaves = current.exchange.leaves_asked().iter().copied().collect();
                        let read = self.id();
                        current.held = Some((read, answer));
                        steps.push(AaeRunStep::ReadLeafKeys {
                            id: read,
                            partition: current.exchange.partition(),
                            leaves,
                        });
                        self.current = Some(current);
                        return steps;
                    }
                    Some(answer) => {
                        let unexpected = |_: &BTreeSet<u16>| Err("keys not asked".to_owned());
                        let step = current
                            .exchange
                            .on_answer(trees, answer, unexpected, shared);
                        current.read(step)
                    }
                    None => current.read(Err(String::new())),
                }
            }
            AaeRunEvent::LeafKeys { id, keys } => {
                let Some((held_id, answer)) = current.held.take() else {
                    self.current = Some(current);
                    return steps;
                };
                if held_id != id {
                    current.held = Some((held_id, answer));
                    self.current = Some(current);
                    return steps;
                }
                let step = current.exchange.on_answer(trees, answer, |_| keys, shared);
                current.read(step)
            }
            AaeRunEvent::Fetched { id, object } => {
                let Some(bucket_key) = current.fetching.remove(&id) else {
                    self.current = Some(current);
                    return steps;
                };
                match object {
                    Some(remote) => {
                        steps.push(AaeRunStep::ReadLocal {
                            id,
                            bucket: bucket_key.0.clone(),
                            key: bucket_key.1.clone(),
                        });
                        current.reading.insert(id, (bucket_key, remote));
                        self.current = Some(current);
                        return steps;
                    }
                    None => current.exchange.skip(&bucket_key),
                }
                return self.after_key(state, current, steps);
            }
            AaeRunEvent::Local { id, object } => {
                let Some((bucket_key, remote)) = current.reading.remove(&id) else {
                    self.current = Some(current);
                    return steps;
                };
                match object {
                    Some(local) => {
                        if let Some(repair) = current.exchange.on_versions(
                            &bucket_key,
                            local.as_ref(),
                            remote.as_ref(),
                        ) && repair.repairs()
                        {
                            steps.push(repair_step(
                                state,
                                &peer,
                                bucket_key,
                                repair,
                                self.request_ms,
                            ));
                        }
                    }
                    None => current.exchange.skip(&bucket_key),
                }
                return self.after_key(state, current, steps);
            }
        };
        self.on_step(state, current, step, &mut steps);
        steps
    }

    /// After one key's outcome: fetch the next queued keys while the budget lasts, then end
    /// the exchange if every key has an outcome (or the budget is spent), else wait.
    fn after_key(
        &mut self,
        state: &ClusterState,
        mut current: Current,
        mut steps: Vec<AaeRunStep>,
    ) -> Vec<AaeRunStep> {
        if !current.exchange.compared_all() {
            self.fetch_more(state, &mut current, &mut steps);
        }
        match current.compared() {
            Some(step) => self.on_step(state, current, step, &mut steps),
            None => self.current = Some(current),
        }
        steps
    }

    /// Fetch the next queued keys, up to `AAE_FETCHES_IN_FLIGHT` outstanding.
    fn fetch_more(
        &mut self,
        state: &ClusterState,
        current: &mut Current,
        steps: &mut Vec<AaeRunStep>,
    ) {
        while current.fetching.len() + current.reading.len() < AAE_FETCHES_IN_FLIGHT {
            let Some(bucket_key) = current.queued.pop_front() else {
                return;
            };
            let id = self.id();
            steps.push(AaeRunStep::Fetch {
                id,
                to: current.peer.clone(),
                message: crate::request::replica_get(state, &bucket_key.0, &bucket_key.1, None),
                timeout_ms: self.request_ms,
            });
            current.fetching.insert(id, bucket_key);
        }
    }

    fn on_step(
        &mut self,
        state: &ClusterState,
        mut current: Current,
        step: AaeStep<BucketKey>,
        steps: &mut Vec<AaeRunStep>,
    ) {
        match step {
            AaeStep::Ask(ask) => {
                self.ask(&mut current, ask, steps);
                self.current = Some(current);
            }
            AaeStep::Compare(keys) => {
                current.queued.extend(keys);
                self.fetch_more(state, &mut current, steps);
                self.current = Some(current);
            }
            AaeStep::Done { repaired } => {
                self.plan.finished(repaired);
                if !current.failed {
                    steps.push(AaeRunStep::Exchanged {
                        partition: current.exchange.partition(),
                        peer: current.peer.clone(),
                        repaired,
                    });
                }
                self.next_exchange(steps);
            }
        }
    }
}

/// The step that performs one key's repair.
fn repair_step(
    state: &ClusterState,
    peer: &NodeId,
    (bucket, key): BucketKey,
    repair: KeyRepair,
    timeout_ms: u64,
) -> AaeRunStep {
    let remote = repair.store_remote.then(|| {
        let message =
            crate::request::replica_put(state, &bucket, &key, &repair.merged, REPAIR_DURABILITY);
        (peer.clone(), message, timeout_ms)
    });
    AaeRunStep::Repair {
        bucket,
        key,
        merged: repair.merged,
        store_local: repair.store_local,
        remote,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{AaeRun, AaeRunEvent, AaeRunStep, REPAIR_DURABILITY};
    use crate::aae_trees::AaeTrees;
    use crate::anti_entropy::AaeRound;
    use crate::bucket::BucketProps;
    use crate::membership::ClusterState;
    use crate::message::PeerMessage;
    use crate::object::{Content, Object, PrunePolicy};
    use crate::replica::Replica;
    use crate::ring::NodeId;
    use crate::serve::{Reply, ServeContext, serve};
    use crate::storage::{Durability, Storage};
    use crate::test_support::{MapStorage, id, settled_cluster};
    use crate::version::{ActorId, VersionVector};
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// One node's store: a replica and its trees.
    struct Side {
        replica: Replica,
        aae: Arc<AaeTrees>,
    }

    fn side(state: &ClusterState, actor: u64) -> Side {
        let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
        let replica = Replica::new(
            Arc::clone(&storage),
            ActorId(actor),
            Arc::new(AtomicBool::new(false)),
        );
        let aae = Arc::new(AaeTrees::new(state.ring.current.clone(), storage));
        replica.attach_aae(Arc::clone(&aae));
        Side { replica, aae }
    }

    fn version(value: &str, actor: u64) -> Object {
        let content = Content {
            value: value.as_bytes().to_vec(),
            last_modified_ms: 1,
            ..Content::default()
        };
        Object::default()
            .update(
                &VersionVector::new(),
                content,
                ActorId(actor),
                1,
                PrunePolicy::default(),
            )
            .unwrap()
    }

    fn store(side: &Side, key: &str, object: &Object) {
        side.replica
            .merge(
                "b",
                key,
                object,
                &BucketProps::default(),
                Durability::Buffered,
            )
            .unwrap();
    }

    fn context(state: &ClusterState) -> ServeContext {
        ServeContext {
            ring_version: state.ring.version,
            props: BTreeMap::new(),
            hint_limit: 10,
            hint_target_member: true,
            max_leaf_keys: 1000,
            aae_budget: 1000,
            defer_sync: false,
        }
    }

    /// The peer's answer to a request, as its `serve` gives it.
    fn ask(peer: &Side, state: &ClusterState, message: PeerMessage) -> PeerMessage {
        match serve(&peer.replica, &peer.aae, &context(state), message)
            .unwrap()
            .reply
        {
            Reply::Message(m) => m,
            Reply::StaleRing => panic!("stale ring"),
        }
    }

    /// Drive a round between `a` (this node) and `b` (every exchange's peer) to its end;
    /// `fail` says which of the requests sent (by their order) get no answer. Returns every
    /// step the round asked for.
    fn drive(
        a: &Side,
        b: &Side,
        state: &ClusterState,
        budget: usize,
        fail: impl Fn(usize, &AaeRunStep) -> bool,
    ) -> Vec<AaeRunStep> {
        let me = id("a");
        let plan = AaeRound::plan(state, &me, &BucketProps::default(), 0, budget, |_| true);
        let (mut run, steps) = AaeRun::start(plan, 100);
        let mut queue: VecDeque<AaeRunStep> = steps.into();
        let mut seen = Vec::new();
        let mut sent = 0;
        while let Some(step) = queue.pop_front() {
            seen.push(step.clone());
            let event = match step {
                AaeRunStep::Ask { id, message, .. } => {
                    sent += 1;
                    let answer =
                        (!fail(sent - 1, &seen[seen.len() - 1])).then(|| ask(b, state, message));
                    Some(AaeRunEvent::Answer { id, answer })
                }
                AaeRunStep::Fetch { id, message, .. } => {
                    sent += 1;
                    let object = if fail(sent - 1, &seen[seen.len() - 1]) {
                        None
                    } else {
                        match ask(b, state, message) {
                            PeerMessage::ReplicaObject { object } => {
                                Some(object.map(|o| Object::decode(&o).unwrap()))
                            }
                            other => panic!("{other:?}"),
                        }
                    };
                    Some(AaeRunEvent::Fetched { id, object })
                }
                AaeRunStep::ReadLeafKeys {
                    id,
                    partition,
                    leaves,
                } => Some(AaeRunEvent::LeafKeys {
                    id,
                    keys: a
                        .aae
                        .leaf_keys(partition, &leaves, 1000)
                        .map(|(keys, _)| keys),
                }),
                AaeRunStep::ReadLocal { id, bucket, key } => Some(AaeRunEvent::Local {
                    id,
                    object: Some(a.replica.get(&bucket, &key).unwrap()),
                }),
                AaeRunStep::Repair {
                    bucket,
                    key,
                    merged,
                    store_local,
                    remote,
                } => {
                    if store_local {
                        a.replica
                            .merge(
                                &bucket,
                                &key,
                                &merged,
                                &BucketProps::default(),
                                Durability::Buffered,
                            )
                            .unwrap();
                    }
                    if let Some((to, message, _)) = remote {
                        assert_eq!(to, id("b"));
                        assert_eq!(ask(b, state, message), PeerMessage::Ack);
                    }
                    None
                }
                AaeRunStep::Exchanged { .. } | AaeRunStep::Over { .. } => None,
            };
            if let Some(event) = event {
                let more = run.handle(&a.aae, state, &me, |_| 3, event);
                for step in more.into_iter().rev() {
                    queue.push_front(step);
                }
            }
        }
        assert!(run.finished(), "the round ended: {seen:?}");
        seen
    }

    fn two_nodes() -> (ClusterState, Side, Side) {
        let state = settled_cluster(&["a", "b"], 8);
        let (a, b) = (side(&state, 1), side(&state, 2));
        (state, a, b)
    }

    fn partition(state: &ClusterState, key: &str) -> u32 {
        state.ring.current.partition_of(b"b", key.as_bytes())
    }

    /// A round repairs both ways: a key only the peer holds comes here, a key only this node
    /// holds goes there (as a buffered `ReplicaPut`), and concurrent versions end as their
    /// `sync` on both; every partition's exchange is recorded, then the round is over.
    #[test]
    fn a_round_repairs_what_differs_on_both_sides() {
        let (state, a, b) = two_nodes();
        store(&a, "mine", &version("a", 1));
        store(&b, "theirs", &version("b", 2));
        store(&a, "both", &version("x", 1));
        store(&b, "both", &version("y", 2));
        let steps = drive(&a, &b, &state, 100, |_, _| false);
        for key in ["mine", "theirs", "both"] {
            let ours = a.replica.get("b", key).unwrap().unwrap();
            assert_eq!(
                Some(&ours),
                b.replica.get("b", key).unwrap().as_ref(),
                "{key}"
            );
        }
        assert_eq!(
            a.replica
                .get("b", "both")
                .unwrap()
                .unwrap()
                .siblings()
                .len(),
            2
        );
        for partition in 0..8 {
            assert_eq!(a.aae.root(partition), b.aae.root(partition));
        }
        let remote_writes: Vec<_> = steps
            .iter()
            .filter_map(|s| match s {
                AaeRunStep::Repair {
                    remote:
                        Some((
                            _,
                            PeerMessage::ReplicaPut {
                                key, durability, ..
                            },
                            _,
                        )),
                    ..
                } => Some((key.clone(), *durability)),
                _ => None,
            })
            .collect();
        assert!(remote_writes.contains(&("mine".to_owned(), REPAIR_DURABILITY)));
        assert!(remote_writes.contains(&("both".to_owned(), REPAIR_DURABILITY)));
        let exchanged = steps
            .iter()
            .filter(|s| matches!(s, AaeRunStep::Exchanged { .. }))
            .count();
        assert_eq!(exchanged, 8, "every partition is exchanged with b");
        assert_eq!(steps.last(), Some(&AaeRunStep::Over { repaired: 3 }));
        // The peer's key listing was answered before this node read its own keys.
        let keys_asked = steps.iter().position(|s| {
            matches!(
                s,
                AaeRunStep::Ask {
                    message: PeerMessage::AaeKeys { .. },
                    ..
                }
            )
        });
        let keys_read = steps
            .iter()
            .position(|s| matches!(s, AaeRunStep::ReadLeafKeys { .. }));
        assert!(keys_asked.unwrap() < keys_read.unwrap());
    }

    /// A question that fails ends its exchange with no record, and the round goes on with
    /// the next partition; a late answer to it changes nothing.
    #[test]
    fn a_failed_question_ends_its_exchange_unrecorded() {
        let (state, a, b) = two_nodes();
        store(&b, "theirs", &version("b", 2));
        let steps = drive(&a, &b, &state, 100, |n, _| n == 0);
        let exchanged: Vec<u32> = steps
            .iter()
            .filter_map(|s| match s {
                AaeRunStep::Exchanged { partition, .. } => Some(*partition),
                _ => None,
            })
            .collect();
        assert_eq!(exchanged.len(), 7, "{exchanged:?}");
        let first = match &steps[0] {
            AaeRunStep::Ask {
                message: PeerMessage::AaeSegments { partition },
                ..
            } => *partition,
            other => panic!("{other:?}"),
        };
        assert!(!exchanged.contains(&first));

        // A late answer, after the round moved on, is ignored.
        let me = id("a");
        let plan = AaeRound::plan(&state, &me, &BucketProps::default(), 0, 100, |_| true);
        let (mut run, steps) = AaeRun::start(plan, 100);
        let AaeRunStep::Ask { id: asked, .. } = steps[0] else {
            panic!("{steps:?}")
        };
        let next = run.handle(
            &a.aae,
            &state,
            &me,
            |_| 3,
            AaeRunEvent::Answer {
                id: asked,
                answer: None,
            },
        );
        assert!(matches!(next[..], [AaeRunStep::Ask { id, .. }] if id != asked));
        let late = run.handle(
            &a.aae,
            &state,
            &me,
            |_| 3,
            AaeRunEvent::Answer {
                id: asked,
                answer: Some(PeerMessage::Ack),
            },
        );
        assert!(late.is_empty(), "{late:?}");
        let unknown = run.handle(
            &a.aae,
            &state,
            &me,
            |_| 3,
            AaeRunEvent::Fetched {
                id: 999,
                object: Some(None),
            },
        );
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    /// The keys of one comparison are fetched together; a failed fetch skips its key (left
    /// for a later round) and the exchange ends once every key has an outcome.
    #[test]
    fn a_failed_fetch_skips_its_key_and_the_others_are_repaired() {
        let (state, a, b) = two_nodes();
        // Two keys of one partition, both only at the peer.
        let first = "k0".to_owned();
        let second = (1..1000)
            .map(|i| format!("k{i}"))
            .find(|k| partition(&state, k) == partition(&state, &first))
            .unwrap();
        store(&b, &first, &version("1", 2));
        store(&b, &second, &version("2", 2));
        let fetch_of_first = |_: usize, step: &AaeRunStep| matches!(step, AaeRunStep::Fetch { message: PeerMessage::ReplicaGet { key, .. }, .. } if *key == "k0");
        let steps = drive(&a, &b, &state, 100, fetch_of_first);
        let fetches: Vec<usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, AaeRunStep::Fetch { .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(fetches.len(), 2);
        assert_eq!(fetches[1], fetches[0] + 1, "fetched together: {steps:?}");
        assert_eq!(a.replica.get("b", &first).unwrap(), None, "skipped");
        assert!(a.replica.get("b", &second).unwrap().is_some(), "repaired");
        assert!(steps.contains(&AaeRunStep::Exchanged {
            partition: partition(&state, &first),
            peer: NodeId("b".into()),
            repaired: 1,
        }));
        assert_eq!(steps.last(), Some(&AaeRunStep::Over { repaired: 1 }));
    }

    /// The keys of one comparison are fetched a few at a time: never more than
    /// `AAE_FETCHES_IN_FLIGHT` outstanding, and every key is compared in the end.
    #[test]
    fn a_comparison_keeps_a_bounded_number_of_fetches_in_flight() {
        let (state, a, b) = two_nodes();
        let target = partition(&state, "k0");
        let keys: Vec<String> = (0..2000)
            .map(|i| format!("k{i}"))
            .filter(|k| partition(&state, k) == target)
            .take(3 * crate::limits::AAE_FETCHES_IN_FLIGHT)
            .collect();
        for key in &keys {
            store(&b, key, &version(key, 2));
        }
        // Drive by hand: answer fetches last in, first out, counting those outstanding.
        let me = id("a");
        let plan = AaeRound::plan(&state, &me, &BucketProps::default(), 0, 1000, |_| true);
        let (mut run, steps) = AaeRun::start(plan, 100);
        let mut queue: VecDeque<AaeRunStep> = steps.into();
        let mut out: Vec<(u64, PeerMessage)> = Vec::new();
        let mut most = 0;
        loop {
            while let Some(step) = queue.pop_front() {
                let event = match step {
                    AaeRunStep::Ask { id, message, .. } => Some(AaeRunEvent::Answer {
                        id,
                        answer: Some(ask(&b, &state, message)),
                    }),
                    AaeRunStep::Fetch { id, message, .. } => {
                        out.push((id, message));
                        most = most.max(out.len());
                        None
                    }
                    AaeRunStep::ReadLeafKeys {
                        id,
                        partition,
                        leaves,
                    } => Some(AaeRunEvent::LeafKeys {
                        id,
                        keys: a.aae.leaf_keys(partition, &leaves, 1000).map(|(k, _)| k),
                    }),
                    AaeRunStep::ReadLocal { id, bucket, key } => Some(AaeRunEvent::Local {
                        id,
                        object: Some(a.replica.get(&bucket, &key).unwrap()),
                    }),
                    AaeRunStep::Repair {
                        bucket,
                        key,
                        merged,
                        store_local,
                        ..
                    } => {
                        if store_local {
                            store(&a, &key, &merged);
                            assert_eq!(bucket, "b");
                        }
                        None
                    }
                    AaeRunStep::Exchanged { .. } | AaeRunStep::Over { .. } => None,
                };
                if let Some(event) = event {
                    let more = run.handle(&a.aae, &state, &me, |_| 3, event);
                    queue.extend(more);
                }
            }
            let Some((id, message)) = out.pop() else {
                break;
            };
            let PeerMessage::ReplicaObject { object } = ask(&b, &state, message) else {
                panic!("not an object")
            };
            let object = Some(object.map(|o| Object::decode(&o).unwrap()));
            queue.extend(run.handle(
                &a.aae,
                &state,
                &me,
                |_| 3,
                AaeRunEvent::Fetched { id, object },
            ));
        }
        assert!(run.finished());
        assert_eq!(
            most,
            crate::limits::AAE_FETCHES_IN_FLIGHT,
            "fetches in flight"
        );
        for key in &keys {
            assert!(a.replica.get("b", key).unwrap().is_some(), "{key} repaired");
        }
    }

    /// Attacker: a peer that answers the segment question with keys nobody asked for ends
    /// that exchange with nothing fetched or repaired (an out-of-order answer, as the core's
    /// `AaeExchange` reads it), and one that answers with something that is no anti-entropy
    /// answer at all ends the next exchange unrecorded.
    #[test]
    fn a_wrong_answer_ends_the_exchange_unrecorded() {
        let (state, a, _b) = two_nodes();
        let me = id("a");
        let plan = AaeRound::plan(&state, &me, &BucketProps::default(), 0, 100, |_| true);
        let (mut run, steps) = AaeRun::start(plan, 100);
        let AaeRunStep::Ask { id: asked, .. } = steps[0] else {
            panic!("{steps:?}")
        };
        let hostile = PeerMessage::AaeKeyHashes {
            entries: vec![("b".into(), "planted".into(), [7; 16])],
            truncated: false,
        };
        let next = run.handle(
            &a.aae,
            &state,
            &me,
            |_| 3,
            AaeRunEvent::Answer {
                id: asked,
                answer: Some(hostile),
            },
        );
        // This node's side is read (no leaves were asked), then the exchange ends.
        let AaeRunStep::ReadLeafKeys { id: read, .. } = &next[0] else {
            panic!("{next:?}")
        };
        let next = run.handle(
            &a.aae,
            &state,
            &me,
            |_| 3,
            AaeRunEvent::LeafKeys {
                id: *read,
                keys: Ok(Vec::new()),
            },
        );
        let fetched =
            |s: &AaeRunStep| matches!(s, AaeRunStep::Fetch { .. } | AaeRunStep::Repair { .. });
        assert!(!next.iter().any(fetched), "{next:?}");
        let AaeRunStep::Ask { id: second, .. } = next.last().cloned().unwrap() else {
            panic!("the next exchange starts: {next:?}")
        };
        let next = run.handle(
            &a.aae,
            &state,
            &me,
            |_| 3,
            AaeRunEvent::Answer {
                id: second,
                answer: Some(PeerMessage::Ack),
            },
        );
        assert!(
            !next
                .iter()
                .any(|s| matches!(s, AaeRunStep::Exchanged { .. })),
            "a wrong answer is not a completed exchange: {next:?}"
        );
    }
}
