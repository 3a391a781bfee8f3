//! The data plane: one machine per client request (a get, a put coordinated here, a put
//! forwarded to a replica that coordinates it), as quinn-proto's `Connection` is one machine
//! per connection beside the `Endpoint`.
//!
//! Sans-IO, and driven the same way by the simulator's `Node` and by the server: the driver
//! calls `start`, performs the returned [`Step`]s, and feeds every outcome back with
//! `handle(view, event)`, performing what that returns, until `finished`. The machine never
//! touches storage or the network; it sees the cluster through a [`View`] the driver passes
//! with every call (the node's current ring, bucket properties and failure detector), so a
//! request that outlives a ring change sees the new ring.
//!
//! What lives here, once for both drivers: the replica plan of a key, the quorums resolved
//! against the bucket, the coordinator's own write before anything is sent, the sends and
//! hints of the core's [`PutCoordinator`], the once-only re-plan of a write whose quorum
//! failed while the ring changed, read repair, the forwarding order and when to stop it, the
//! peer messages of each of those, and the errors a client sees.
//!
//! Invariants:
//! - a request is answered exactly once ([`Step::Answer`]);
//! - a coordinated put sends nothing before its own copy is stored (and durable, for a
//!   durable write: the driver feeds [`Event::Written`] only then);
//! - a forwarded put is sent to the next candidate only when the previous one certainly did
//!   not coordinate it ([`PutForward`]);
//! - every send comes back as an event (reply, failure or timeout): `finished` becomes true.

use crate::bucket::{BucketProps, Quorum};
use crate::codec::Writer;
use crate::coordinator::{
    ForwardFailure, ForwardReply, GetCoordinator, GetStep, PutCoordinator, PutForward, PutPolicy,
    PutRoute, PutSend, PutStep, ReplicaPlan, forward_reply, forwarded_sent_at, refuse_forwarded,
};
use crate::membership::ClusterState;
use crate::message::{PeerMessage, WireContent};
use crate::object::{Object, decode_context, encode_clock};
use crate::quorum::QuorumFailure;
use crate::replica::{Precondition, ReplicaError};
use crate::ring::{NodeId, key_hash};
use crate::storage::Durability;
use crate::version::VersionVector;
use std::collections::BTreeMap;

/// The content type of a value written without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// What a request machine sees of its node: a snapshot the driver passes with every call.
pub trait View {
    /// This node.
    fn me(&self) -> &NodeId;
    /// The node's cluster state (ring, members, bucket properties).
    fn state(&self) -> &ClusterState;
    /// A bucket's properties (the cluster state's, else the node's defaults).
    fn props(&self, bucket: &str) -> BucketProps;
    /// Whether a member is believed up (this node always is).
    fn is_up(&self, node: &NodeId) -> bool;
    /// One replica request's timeout, in milliseconds.
    fn request_timeout_ms(&self) -> u64;
    /// How long a forwarder waits for the coordinator of a forwarded put, in milliseconds.
    fn forward_timeout_ms(&self) -> u64;
}

/// The replicas of `bucket/key` for a request under `view`.
pub fn replica_plan(view: &dyn View, bucket: &str, key: &str) -> ReplicaPlan {
    let state = view.state();
    let partition = state
        .ring
        .current
        .partition_of_hash(&key_hash(bucket.as_bytes(), key.as_bytes()));
    ReplicaPlan::new(state, partition, view.props(bucket).n_val, |node| {
        view.is_up(node)
    })
}

/// A replica's write of a version (`ReplicaPut`), under `state`'s ring.
pub fn replica_put(
    state: &ClusterState,
    bucket: &str,
    key: &str,
    object: &Object,
    durability: Durability,
) -> PeerMessage {
    PeerMessage::ReplicaPut {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        object: object.encode(),
        durability,
        ring_version: state.ring.version,
    }
}

/// A replica's read of a key (`ReplicaGet`), merged with the hint it holds for `hinted_for`.
pub fn replica_get(
    state: &ClusterState,
    bucket: &str,
    key: &str,
    hinted_for: Option<&NodeId>,
) -> PeerMessage {
    PeerMessage::ReplicaGet {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        ring_version: state.ring.version,
        hinted_for: hinted_for.map(|n| n.0.clone()),
    }
}

/// A client write (a delete is a write whose content is `deleted`: a tombstone with the
/// context), with the HTTP API's options.
#[derive(Debug, Clone)]
pub struct PutOp {
    pub bucket: String,
    pub key: String,
    pub context: Option<VersionVector>,
    pub content: WireContent,
    /// Acknowledgements required, of replicas and of primaries (`None`: the bucket's).
    pub w: Option<Quorum>,
    pub pw: Option<Quorum>,
    /// `dw` was given: the write is durable on the coordinator and on every replica counted
    /// before the answer, whatever the bucket's durability.
    pub dw_given: bool,
    pub precondition: Precondition,
}

impl PutOp {
    /// A write of `value` (`None` deletes) with the bucket's quorums and no precondition.
    pub fn new(
        bucket: &str,
        key: &str,
        context: Option<VersionVector>,
        value: Option<Vec<u8>>,
    ) -> PutOp {
        PutOp {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            context,
            content: WireContent {
                deleted: value.is_none(),
                value: value.unwrap_or_default(),
                content_type: DEFAULT_CONTENT_TYPE.into(),
                meta: Vec::new(),
                indexes: Vec::new(),
                ttl_secs: None,
            },
            w: None,
            pw: None,
            dw_given: false,
            precondition: Precondition::None,
        }
    }

    /// The write of a tombstone of `bucket/key` with `context` (what it deletes), with the
    /// bucket's quorums: a client's delete, and the expiry sweep's removal of an expired
    /// value (`crate::expiry`).
    pub fn tombstone(bucket: &str, key: &str, context: VersionVector) -> PutOp {
        let mut op = PutOp::new(bucket, key, Some(context), None);
        op.content.content_type.clear();
        op
    }
}

/// A forwarded put this node does not coordinate: the answer to its forwarder, and whether
/// it was refused for arriving late.
#[derive(Debug)]
pub struct ForwardRefused {
    pub answer: Box<PeerMessage>,
    pub late: bool,
}

/// A coordinator's acceptance of a forwarded put (`PeerMessage::CoordinatePut` from `from`,
/// whose clock minus this node's is `clock_offset_ms`), at `now_ms` on this node's wall clock:
/// the write to coordinate and its timestamp (when it reached its forwarder, on this node's
/// clock), or the answer refusing it and whether it was refused for arriving late.
///
/// Refused: a put that waited more than `limit_ms` since it reached its forwarder (the
/// forwarder has given up on it and told its client the outcome is unknown; applied now, its
/// context would be stale), one for a key this node does not replicate, one whose context
/// does not decode. `limit_ms` `None` is the rule before finding 5 (no expiry), kept for the
/// simulator to reproduce it.
pub fn accept_forwarded(
    view: &dyn View,
    message: PeerMessage,
    now_ms: u64,
    clock_offset_ms: i64,
    limit_ms: Option<u64>,
) -> Result<(PutOp, u64), ForwardRefused> {
    let refused = |answer: PeerMessage, late: bool| ForwardRefused {
        answer: Box::new(answer),
        late,
    };
    let PeerMessage::CoordinatePut {
        bucket,
        key,
        context,
        content,
        w,
        pw,
        dw_given,
        precondition,
        now_ms: sent_ms,
        ring_version: _,
    } = message
    else {
        let refusal = format!("unexpected request {}", message.name());
        return Err(refused(PeerMessage::Error(refusal), false));
    };
    let state = view.state();
    let partition = state
        .ring
        .current
        .partition_of_hash(&key_hash(bucket.as_bytes(), key.as_bytes()));
    let is_primary = state
        .preference_list(partition, view.props(&bucket).n_val)
        .contains(view.me());
    // The forwarder's clock converted to this node's, so that nodes whose clocks disagree
    // still take each other's forwards.
    let sent_ms = forwarded_sent_at(sent_ms, clock_offset_ms);
    let (waited_ms, limit_ms) = match limit_ms {
        Some(limit_ms) => (now_ms.saturating_sub(sent_ms), limit_ms),
        None => (0, u64::MAX),
    };
    if let Some(refusal) = refuse_forwarded(waited_ms, limit_ms, is_primary) {
        return Err(refused(refusal, waited_ms > limit_ms));
    }
    let context = match decode_context(context.as_deref()) {
        Ok(context) => context,
        Err(e) => return Err(refused(PeerMessage::Error(e.to_string()), false)),
    };
    let precondition = match precondition.decode() {
        Ok(precondition) => precondition,
        Err(e) => return Err(refused(PeerMessage::Error(e.to_string()), false)),
    };
    let op = PutOp {
        bucket,
        key,
        context,
        content: *content,
        w: w.map(Quorum::Count),
        pw: pw.map(Quorum::Count),
        dw_given,
        precondition,
    };
    // Stamped with when the client's put arrived, on this node's clock.
    Ok((op, sent_ms))
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Too few replicas answered (or could be asked).
    #[error("quorum not met: {0}")]
    Quorum(QuorumFailure),
    /// No primary of the key coordinated a forwarded put.
    #[error("no replica of this key could be reached to coordinate the write ({0})")]
    NoCoordinator(String),
    /// The coordinator's own write was refused or failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A remote coordinator refused or failed the write: its status and message.
    #[error("{message}")]
    Remote { status: u16, message: String },
    /// The cluster cannot do it now (a listing no node answered).
    #[error("{0}")]
    Unavailable(String),
    /// Something this node cannot make sense of (an undecodable reply).
    #[error("{0}")]
    Internal(String),
}

impl RequestError {
    /// The HTTP status of the failure, as a client sees it and as a coordinator reports it to
    /// the node that forwarded the put (`PeerMessage::Failed`): 503 when the cluster could not
    /// do it now, 409 a write refused by its sibling or clock limits, 412 a failed
    /// precondition, 500 a stored object or reply that cannot be read, a remote
    /// coordinator's own status otherwise.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Quorum(_)
            | RequestError::NoCoordinator(_)
            | RequestError::Unavailable(_) => 503,
            RequestError::Replica(e) => e.status(),
            RequestError::Internal(_) => 500,
            RequestError::Remote { status, .. } => *status,
        }
    }
}

/// Identifies one send of a request, for its reply.
pub type Tag = u64;

/// The outcome of one send.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The peer answered.
    Message(PeerMessage),
    /// The request was certainly never delivered (unreachable, refused, in backoff).
    NotSent(String),
    /// It was sent and no answer came in time (timeout, connection lost): it may have been
    /// applied.
    Unanswered(String),
}

/// What a request machine asks its driver to do.
#[derive(Debug)]
pub enum Step {
    /// Send `message` to `to` (never this node) and feed the outcome back as
    /// [`Event::Reply`] with `tag`; `tag` `None`: fire and forget (read repair).
    Send {
        tag: Option<Tag>,
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    },
    /// Read this node's copy of the key, merged with the hint it holds for `hinted_for`, and
    /// feed it back as [`Event::Read`] with `tag`.
    ReadLocal {
        tag: Tag,
        bucket: String,
        key: String,
        hinted_for: Option<NodeId>,
    },
    /// Merge `object` into this node's copy (read repair of its own replica), then check
    /// whether it now holds a key it does not replicate (`check_orphan`).
    MergeLocal {
        bucket: String,
        key: String,
        object: Object,
    },
    /// The coordinator's own write: `Replica::write` with this node's actor, stamped
    /// `now_ms`; feed the result back as [`Event::Written`] once stored, and only once durable
    /// when `durability` is `Fsync`.
    Write {
        op: PutOp,
        durability: Durability,
        now_ms: u64,
    },
    /// Keep `object` here as a hint for `target` (it failed the write or is down).
    KeepHint {
        target: NodeId,
        bucket: String,
        key: String,
        object: Object,
        durability: Durability,
    },
    /// The first replication round of a write ended: this node may now hold a key it does
    /// not replicate (the ring moved), which asks for another cleanup.
    CheckOrphan { bucket: String, key: String },
    /// The write's quorum failed while the ring changed: it is sent again under the new plan
    /// (for the driver's counters and logs).
    Replanned,
    /// Answer the client. Exactly once.
    Answer(Result<Object, RequestError>),
}

/// An outcome fed back to a request machine.
#[derive(Debug)]
pub enum Event {
    /// The outcome of [`Step::Send`] `tag`.
    Reply { tag: Tag, reply: Reply },
    /// This node's copy for [`Step::ReadLocal`] `tag` (`Err`: the read failed).
    Read {
        tag: Tag,
        result: Result<Option<Object>, ()>,
    },
    /// The coordinator's own write ([`Step::Write`]).
    Written(Result<Object, RequestError>),
}

/// Why `node`'s reply is a failure, for a quorum failure's message (`QuorumFailure::why`).
fn failure_of(node: &NodeId, reply: &Reply) -> String {
    match reply {
        Reply::NotSent(why) | Reply::Unanswered(why) => why.clone(),
        Reply::Message(PeerMessage::Error(why)) => format!("{node}: {why}"),
        Reply::Message(other) => format!("{node}: answered {}", other.name()),
    }
}

/// The object of `node`'s `ReplicaObject` reply (`Err`: why it failed, a failure or an
/// undecodable object).
fn fetched(node: &NodeId, reply: Reply) -> Result<Option<Object>, String> {
    match reply {
        Reply::Message(PeerMessage::ReplicaObject { object }) => object
            .map(|b| Object::decode(&b))
            .transpose()
            .map_err(|_| format!("{node}: its copy does not decode")),
        other => Err(failure_of(node, &other)),
    }
}

/// One get: fetch from the key's sloppy replica set, answer at R (PR of them primaries),
/// repair the replicas that differ once every fetch came back.
#[derive(Debug)]
pub struct GetRequest {
    bucket: String,
    key: String,
    coordinator: Option<GetCoordinator>,
    /// The node each outstanding fetch went to.
    fetches: BTreeMap<Tag, NodeId>,
    /// Why the last fetch that failed did, for a quorum failure's message.
    last_failure: Option<String>,
}

impl GetRequest {
    /// Plan the get of `bucket/key` (`r`, `pr`: `None` is the bucket's).
    pub fn start(
        view: &dyn View,
        bucket: &str,
        key: &str,
        (r, pr): (Option<Quorum>, Option<Quorum>),
    ) -> (GetRequest, Vec<Step>) {
        let props = view.props(bucket);
        let plan = replica_plan(view, bucket, key);
        let n = plan.primaries.len() as u32;
        let needed = r.unwrap_or(Quorum::Default).resolve(n, props.r).min(n) as usize;
        let needed_primaries = pr.unwrap_or(Quorum::Default).resolve(n, props.pr).min(n) as usize;
        let mut request = GetRequest {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            coordinator: None,
            fetches: BTreeMap::new(),
            last_failure: None,
        };
        let (coordinator, slots) = match GetCoordinator::start(&plan, needed, needed_primaries) {
            Ok(started) => started,
            Err(e) => return (request, vec![Step::Answer(Err(RequestError::Quorum(e)))]),
        };
        request.coordinator = Some(coordinator);
        let mut steps = Vec::with_capacity(slots.len());
        for (tag, slot) in (0..).zip(slots) {
            request.fetches.insert(tag, slot.node.clone());
            if &slot.node == view.me() {
                steps.push(Step::ReadLocal {
                    tag,
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                    hinted_for: slot.stands_in_for,
                });
            } else {
                let message = replica_get(view.state(), bucket, key, slot.stands_in_for.as_ref());
                steps.push(Step::Send {
                    tag: Some(tag),
                    to: slot.node,
                    message,
                    timeout_ms: view.request_timeout_ms(),
                });
            }
        }
        (request, steps)
    }

    /// Feed one fetch's outcome.
    pub fn handle(&mut self, view: &dyn View, event: Event) -> Vec<Step> {
        let (tag, reply) = match event {
            Event::Reply { tag, reply } => match self.fetches.get(&tag) {
                Some(node) => (tag, fetched(node, reply)),
                None => return Vec::new(),
            },
            Event::Read { tag, result } => (
                tag,
                result.map_err(|()| format!("{}: its own copy could not be read", view.me())),
            ),
            Event::Written(_) => return Vec::new(),
        };
        let reply = reply.map_err(|why| self.last_failure = Some(why));
        let (Some(from), Some(coordinator)) =
            (self.fetches.remove(&tag), self.coordinator.as_mut())
        else {
            return Vec::new();
        };
        let mut steps = Vec::new();
        for step in coordinator.on_reply(&from, reply) {
            match step {
                GetStep::Answer(result) => {
                    let result = result.map_err(|mut failure| {
                        failure.why.clone_from(&self.last_failure);
                        RequestError::Quorum(failure)
                    });
                    steps.push(Step::Answer(result));
                }
                GetStep::Repair { merged, targets } => {
                    let durability = view.props(&self.bucket).durability;
                    for node in targets {
                        if &node == view.me() {
                            steps.push(Step::MergeLocal {
                                bucket: self.bucket.clone(),
                                key: self.key.clone(),
                                object: merged.clone(),
                            });
                        } else {
                            let message = replica_put(
                                view.state(),
                                &self.bucket,
                                &self.key,
                                &merged,
                                durability,
                            );
                            steps.push(Step::Send {
                                tag: None,
                                to: node,
                                message,
                                timeout_ms: view.request_timeout_ms(),
                            });
                        }
                    }
                }
            }
        }
        steps
    }

    /// Every fetch came back (or the get failed before any was sent).
    pub fn finished(&self) -> bool {
        self.coordinator
            .as_ref()
            .is_none_or(GetCoordinator::finished)
    }
}

/// A put's replication rounds: the first under the plan of its start, a second (at most)
/// under the plan of a newer ring.
#[derive(Debug)]
struct Replication {
    stored: Object,
    /// `stored` encoded once for every send.
    encoded: Vec<u8>,
    policy: PutPolicy,
    durability: Durability,
    rounds: Vec<PutCoordinator>,
    /// The round and send of each outstanding send.
    sends: BTreeMap<Tag, (usize, PutSend)>,
    /// Why the last replica write that failed did, for a quorum failure's message.
    last_failure: Option<String>,
}

#[derive(Debug)]
enum PutPhase {
    /// Waiting for the coordinator's own write, with the plan made before it.
    Writing {
        plan: ReplicaPlan,
        policy: PutPolicy,
        durability: Durability,
    },
    Replicating(Replication),
    Forwarding {
        forward: PutForward,
        message: Box<PeerMessage>,
        /// The candidate the outstanding forward went to.
        to: NodeId,
    },
    Done,
}

/// One put: coordinated here when this node is a primary of the key (its own write first,
/// then the core's [`PutCoordinator`]), else forwarded to the primaries in turn.
#[derive(Debug)]
pub struct PutRequest {
    bucket: String,
    key: String,
    phase: PutPhase,
    /// The ring version the write was planned under (a failed quorum is re-planned once when
    /// the ring changed since).
    planned_at: u64,
    answered: bool,
    next_tag: Tag,
}

impl PutRequest {
    /// A client's put at this node: coordinated here or forwarded.
    pub fn start(view: &dyn View, op: PutOp, now_ms: u64) -> (PutRequest, Vec<Step>) {
        let plan = replica_plan(view, &op.bucket, &op.key);
        let forward = match PutForward::route(&plan.primaries, view.me(), |n| view.is_up(n)) {
            PutRoute::Coordinate => return Self::coordinate_planned(view, op, now_ms, plan),
            PutRoute::Forward(forward) => forward,
        };
        let props = view.props(&op.bucket);
        // W and PW resolved here, against the preference list.
        let n = plan.primaries.len() as u32;
        let message = PeerMessage::CoordinatePut {
            bucket: op.bucket.clone(),
            key: op.key.clone(),
            context: op.context.as_ref().map(|c| {
                let mut writer = Writer::default();
                encode_clock(&mut writer, c);
                writer.buf
            }),
            content: Box::new(op.content),
            w: op.w.map(|w| w.resolve(n, props.w)),
            pw: op.pw.map(|pw| pw.resolve(n, props.pw)),
            dw_given: op.dw_given,
            precondition: op.precondition.into(),
            now_ms,
            ring_version: view.state().ring.version,
        };
        let mut request = PutRequest {
            bucket: op.bucket,
            key: op.key,
            phase: PutPhase::Done,
            planned_at: view.state().ring.version,
            answered: false,
            next_tag: 0,
        };
        let mut steps = Vec::new();
        request.forward_next(view, forward, Box::new(message), &mut steps);
        (request, steps)
    }

    /// A put this node coordinates (it is a primary of the key: a client's, or one a peer
    /// forwarded and [`crate::coordinator::refuse_forwarded`] let through).
    pub fn coordinate(view: &dyn View, op: PutOp, now_ms: u64) -> (PutRequest, Vec<Step>) {
        let plan = replica_plan(view, &op.bucket, &op.key);
        Self::coordinate_planned(view, op, now_ms, plan)
    }

    fn coordinate_planned(
        view: &dyn View,
        op: PutOp,
        now_ms: u64,
        plan: ReplicaPlan,
    ) -> (PutRequest, Vec<Step>) {
        let props = view.props(&op.bucket);
        let n = plan.primaries.len() as u32;
        let w = op.w.unwrap_or(Quorum::Default).resolve(n, props.w).min(n) as usize;
        let pw = op.pw.unwrap_or(Quorum::Default).resolve(n, props.pw).min(n) as usize;
        let durability = if op.dw_given {
            Durability::Fsync
        } else {
            props.durability
        };
        let policy = PutPolicy {
            w,
            pw,
            buffered: durability == Durability::Buffered,
        };
        let request = PutRequest {
            bucket: op.bucket.clone(),
            key: op.key.clone(),
            phase: PutPhase::Writing {
                plan,
                policy,
                durability,
            },
            planned_at: view.state().ring.version,
            answered: false,
            next_tag: 0,
        };
        let step = Step::Write {
            op,
            durability,
            now_ms,
        };
        (request, vec![step])
    }

    /// Feed one outcome.
    pub fn handle(&mut self, view: &dyn View, event: Event) -> Vec<Step> {
        let mut steps = Vec::new();
        match (std::mem::replace(&mut self.phase, PutPhase::Done), event) {
            (
                PutPhase::Writing {
                    plan,
                    policy,
                    durability,
                },
                Event::Written(written),
            ) => match written {
                Ok(stored) => {
                    let mut replication = Replication {
                        encoded: stored.encode(),
                        stored,
                        policy,
                        durability,
                        rounds: Vec::new(),
                        sends: BTreeMap::new(),
                        last_failure: None,
                    };
                    self.start_round(view, &mut replication, plan, &mut steps);
                    self.phase = PutPhase::Replicating(replication);
                }
                Err(e) => self.answer(Err(e), &mut steps),
            },
            (PutPhase::Replicating(mut replication), Event::Reply { tag, reply }) => {
                if let Some((round, send)) = replication.sends.remove(&tag) {
                    let ok = matches!(reply, Reply::Message(PeerMessage::Ack));
                    if !ok {
                        replication.last_failure = Some(failure_of(&send.node, &reply));
                    }
                    let round_steps = match replication.rounds.get_mut(round) {
                        Some(coordinator) => coordinator.on_reply(&send, ok),
                        None => Vec::new(),
                    };
                    self.perform(view, &mut replication, round, round_steps, &mut steps);
                }
                self.phase = PutPhase::Replicating(replication);
            }
            (
                PutPhase::Forwarding {
                    mut forward,
                    message,
                    to,
                },
                Event::Reply { reply, .. },
            ) => match reply {
                Reply::Message(reply) => match forward_reply(&to, reply) {
                    ForwardReply::Coordinated(object) => {
                        let result = Object::decode(&object)
                            .map_err(|e| RequestError::Internal(format!("{to}: {e}")));
                        self.answer(result, &mut steps);
                    }
                    // A refusal that proves it did not coordinate: try the next.
                    ForwardReply::Refused(error) => {
                        forward.failed(ForwardFailure::NotAReplica, error);
                        self.forward_next(view, forward, message, &mut steps);
                    }
                    ForwardReply::Failed { status, message } => {
                        self.answer(Err(RequestError::Remote { status, message }), &mut steps);
                    }
                },
                Reply::NotSent(error) => {
                    forward.failed(ForwardFailure::NotSent, error);
                    self.forward_next(view, forward, message, &mut steps);
                }
                // It may coordinate it, now or later: stop, the outcome is indeterminate.
                Reply::Unanswered(error) => {
                    forward.failed(ForwardFailure::Unanswered, error);
                    self.forward_next(view, forward, message, &mut steps);
                }
            },
            (phase, _) => self.phase = phase,
        }
        steps
    }

    /// Every send came back and the client was answered.
    pub fn finished(&self) -> bool {
        match &self.phase {
            PutPhase::Done => true,
            PutPhase::Writing { .. } | PutPhase::Forwarding { .. } => false,
            PutPhase::Replicating(replication) => {
                self.answered && replication.rounds.iter().all(PutCoordinator::finished)
            }
        }
    }

    fn answer(&mut self, result: Result<Object, RequestError>, steps: &mut Vec<Step>) {
        if !self.answered {
            self.answered = true;
            steps.push(Step::Answer(result));
        }
    }

    /// Forward to the next candidate, or answer when none is left.
    fn forward_next(
        &mut self,
        view: &dyn View,
        mut forward: PutForward,
        message: Box<PeerMessage>,
        steps: &mut Vec<Step>,
    ) {
        let Some(to) = forward.next_candidate() else {
            let error = RequestError::NoCoordinator(forward.last_error().to_owned());
            self.answer(Err(error), steps);
            return;
        };
        let tag = self.tag();
        steps.push(Step::Send {
            tag: Some(tag),
            to: to.clone(),
            message: (*message).clone(),
            timeout_ms: view.forward_timeout_ms(),
        });
        self.phase = PutPhase::Forwarding {
            forward,
            message,
            to,
        };
    }

    fn tag(&mut self) -> Tag {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        tag
    }

    /// Start a replication round of the stored version under `plan`.
    fn start_round(
        &mut self,
        view: &dyn View,
        replication: &mut Replication,
        plan: ReplicaPlan,
        steps: &mut Vec<Step>,
    ) {
        let (coordinator, round_steps) = PutCoordinator::start(view.me(), plan, replication.policy);
        replication.rounds.push(coordinator);
        let round = replication.rounds.len() - 1;
        self.perform(view, replication, round, round_steps, steps);
    }

    /// A round's steps: answers and sends first, hints after (a hint write must not delay
    /// them).
    fn perform(
        &mut self,
        view: &dyn View,
        replication: &mut Replication,
        round: usize,
        mut round_steps: Vec<PutStep>,
        steps: &mut Vec<Step>,
    ) {
        round_steps.sort_by_key(|step| matches!(step, PutStep::KeepHint { .. }));
        for step in round_steps {
            match step {
                PutStep::Send(send) => {
                    let message = self.put_message(view, replication, &send);
                    let tag = self.tag();
                    let to = send.node.clone();
                    replication.sends.insert(tag, (round, send));
                    steps.push(Step::Send {
                        tag: Some(tag),
                        to,
                        message,
                        timeout_ms: view.request_timeout_ms(),
                    });
                }
                PutStep::KeepHint { target } => {
                    if &target != view.me() {
                        steps.push(Step::KeepHint {
                            target,
                            bucket: self.bucket.clone(),
                            key: self.key.clone(),
                            object: replication.stored.clone(),
                            durability: replication.durability,
                        });
                    }
                }
                PutStep::Answer(result) => {
                    let result = result.map_err(|mut failure| {
                        failure.why.clone_from(&replication.last_failure);
                        failure
                    });
                    if round > 0 {
                        let result = result
                            .map(|()| replication.stored.clone())
                            .map_err(RequestError::Quorum);
                        self.answer(result, steps);
                        continue;
                    }
                    // The first round's outcome.
                    steps.push(Step::CheckOrphan {
                        bucket: self.bucket.clone(),
                        key: self.key.clone(),
                    });
                    match result {
                        Err(_) if view.state().ring.version != self.planned_at => {
                            // The ring changed while the write was replicated (a replica
                            // answered `StaleRing`): send the same stored version again under
                            // the new ring's plan.
                            steps.push(Step::Replanned);
                            let plan = replica_plan(view, &self.bucket, &self.key);
                            self.start_round(view, replication, plan, steps);
                        }
                        Ok(()) => self.answer(Ok(replication.stored.clone()), steps),
                        Err(e) => self.answer(Err(RequestError::Quorum(e)), steps),
                    }
                }
            }
        }
    }

    /// The message of one replica write: the stored version, or a hint for the primary the
    /// node stands in for.
    fn put_message(
        &self,
        view: &dyn View,
        replication: &Replication,
        send: &PutSend,
    ) -> PeerMessage {
        let (bucket, key) = (&self.bucket, &self.key);
        match &send.stands_in_for {
            None => PeerMessage::ReplicaPut {
                bucket: bucket.clone(),
                key: key.clone(),
                object: replication.encoded.clone(),
                durability: if send.fsync {
                    Durability::Fsync
                } else {
                    replication.durability
                },
                ring_version: view.state().ring.version,
            },
            Some(primary) => PeerMessage::HintedPut {
                target: primary.0.clone(),
                bucket: bucket.clone(),
                key: key.clone(),
                object: replication.encoded.clone(),
                durability: replication.durability,
                ring_version: view.state().ring.version,
            },
        }
    }
}

/// One client request's machine, for a driver that keeps gets and puts in one table.
#[derive(Debug)]
pub enum Machine {
    Get(GetRequest),
    Put(PutRequest),
}

impl Machine {
    /// Feed one outcome ([`GetRequest::handle`], [`PutRequest::handle`]).
    pub fn handle(&mut self, view: &dyn View, event: Event) -> Vec<Step> {
        match self {
            Machine::Get(get) => get.handle(view, event),
            Machine::Put(put) => put.handle(view, event),
        }
    }

    /// Every send came back and the client was answered.
    pub fn finished(&self) -> bool {
        match self {
            Machine::Get(get) => get.finished(),
            Machine::Put(put) => put.finished(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::test_support::{TestView, id};

    fn view(me: &str, names: &[&str]) -> TestView {
        TestView::new(me, names)
    }

    /// A key of which `view`'s node is (`primary`) or is not a primary.
    fn key_where(view: &TestView, primary: bool) -> String {
        (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| replica_plan(view, "b", k).primaries.contains(view.me()) == primary)
            .unwrap()
    }

    fn sends(steps: &[Step]) -> Vec<(Option<Tag>, NodeId, &PeerMessage)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Send {
                    tag, to, message, ..
                } => Some((*tag, to.clone(), message)),
                _ => None,
            })
            .collect()
    }

    fn answer(steps: &[Step]) -> Option<&Result<Object, RequestError>> {
        steps.iter().find_map(|s| match s {
            Step::Answer(result) => Some(result),
            _ => None,
        })
    }

    fn written(value: &[u8]) -> Object {
        let mut op = PutOp::new("b", "k", None, Some(value.to_vec()));
        op.content.content_type = "text/plain".into();
        Object::default()
            .update(
                &VersionVector::default(),
                crate::object::Content {
                    value: op.content.value,
                    content_type: op.content.content_type,
                    last_modified_ms: 1,
                    meta: Vec::new(),
                    deleted: false,
                    indexes: Vec::new(),
                    expires_ms: None,
                },
                crate::version::ActorId(7),
                1,
                crate::object::PrunePolicy::default(),
            )
            .unwrap()
    }

    fn ack(tag: Tag) -> Event {
        Event::Reply {
            tag,
            reply: Reply::Message(PeerMessage::Ack),
        }
    }

    fn fail(tag: Tag) -> Event {
        Event::Reply {
            tag,
            reply: Reply::Unanswered("timeout".into()),
        }
    }

    #[test]
    fn a_get_reads_locally_answers_at_r_and_repairs_the_stale_replica_after_every_reply() {
        let v = view("a", &["a", "b", "c"]);
        let (mut get, steps) = GetRequest::start(&v, "b", "k", (None, None));
        let local = steps
            .iter()
            .find_map(|s| match s {
                Step::ReadLocal { tag, .. } => Some(*tag),
                _ => None,
            })
            .expect("this node's copy is read locally, not sent to itself");
        let remote = sends(&steps);
        assert_eq!(remote.len(), 2);
        assert!(remote.iter().all(|(_, to, _)| to != &id("a")));
        let object = written(b"v");
        let out = get.handle(
            &v,
            Event::Read {
                tag: local,
                result: Ok(Some(object.clone())),
            },
        );
        assert!(answer(&out).is_none(), "one reply of r = 2");
        let reply = Reply::Message(PeerMessage::ReplicaObject {
            object: Some(object.encode()),
        });
        let (first, _, _) = remote[0].clone();
        let out = get.handle(
            &v,
            Event::Reply {
                tag: first.unwrap(),
                reply,
            },
        );
        assert!(matches!(answer(&out), Some(Ok(o)) if *o == object));
        assert!(!get.finished());
        // The last replica has nothing: repaired once every fetch is back.
        let (last, stale, _) = remote[1].clone();
        let reply = Reply::Message(PeerMessage::ReplicaObject { object: None });
        let out = get.handle(
            &v,
            Event::Reply {
                tag: last.unwrap(),
                reply,
            },
        );
        assert!(answer(&out).is_none(), "answered once");
        let repairs = sends(&out);
        assert_eq!(repairs.len(), 1);
        assert_eq!(repairs[0].0, None, "read repair is fire and forget");
        assert_eq!(repairs[0].1, stale);
        assert!(matches!(repairs[0].2, PeerMessage::ReplicaPut { .. }));
        assert!(get.finished());
    }

    #[test]
    fn a_get_that_cannot_reach_r_replicas_fails_before_sending() {
        let mut v = view("a", &["a", "b", "c"]);
        v.down = [id("b"), id("c")].into();
        let (get, steps) = GetRequest::start(&v, "b", "k", (Some(Quorum::Count(3)), None));
        assert!(
            matches!(answer(&steps), Some(Err(e @ RequestError::Quorum(_))) if e.status() == 503)
        );
        assert!(sends(&steps).is_empty());
        assert!(get.finished());
    }

    #[test]
    fn a_put_sends_nothing_before_its_own_write_then_answers_at_w_and_hints_a_failure() {
        let v = view("a", &["a", "b", "c"]);
        let key = key_where(&v, true);
        let (mut put, steps) =
            PutRequest::start(&v, PutOp::new("b", &key, None, Some(b"v".to_vec())), 5);
        assert!(matches!(steps.as_slice(), [Step::Write { now_ms: 5, .. }]));
        let stored = written(b"v");
        let steps = put.handle(&v, Event::Written(Ok(stored.clone())));
        let out = sends(&steps);
        assert_eq!(out.len(), 2, "the other two primaries");
        assert!(answer(&steps).is_none());
        let (ok, failed) = (out[0].0.unwrap(), out[1].0.unwrap());
        let steps = put.handle(&v, ack(ok));
        assert!(
            matches!(answer(&steps), Some(Ok(o)) if *o == stored),
            "own copy + one = w 2"
        );
        assert!(!put.finished());
        let steps = put.handle(&v, fail(failed));
        assert!(
            steps
                .iter()
                .any(|s| matches!(s, Step::KeepHint { target, .. } if target == &out[1].1)),
            "the failed replica's version is kept as a hint: {steps:?}"
        );
        assert!(put.finished());
    }

    #[test]
    fn a_refused_own_write_is_the_answer_and_nothing_is_sent() {
        let v = view("a", &["a", "b", "c"]);
        let (mut put, _) = PutRequest::coordinate(&v, PutOp::new("b", "k", None, None), 1);
        let refused = RequestError::Replica(ReplicaError::Precondition("if-none-match"));
        let steps = put.handle(&v, Event::Written(Err(refused)));
        assert!(sends(&steps).is_empty());
        assert!(matches!(answer(&steps), Some(Err(e)) if e.status() == 412));
        assert!(put.finished());
    }

    #[test]
    fn a_quorum_failed_under_a_changed_ring_is_replanned_once() {
        let mut v = view("a", &["a", "b", "c"]);
        let (mut put, _) =
            PutRequest::coordinate(&v, PutOp::new("b", "k", None, Some(b"v".to_vec())), 1);
        let steps = put.handle(&v, Event::Written(Ok(written(b"v"))));
        let first: Vec<Tag> = sends(&steps).iter().map(|s| s.0.unwrap()).collect();
        // A replica answered StaleRing: the ring moved on meanwhile.
        v.state.ring.version += 1;
        let steps = put.handle(&v, fail(first[0]));
        assert!(answer(&steps).is_none());
        let steps = put.handle(&v, fail(first[1]));
        assert!(steps.iter().any(|s| matches!(s, Step::Replanned)));
        assert!(steps.iter().any(|s| matches!(s, Step::CheckOrphan { .. })));
        assert!(answer(&steps).is_none(), "re-planned, not answered");
        let second: Vec<Tag> = sends(&steps).iter().map(|s| s.0.unwrap()).collect();
        assert_eq!(second.len(), 2);
        v.state.ring.version += 1;
        put.handle(&v, fail(second[0]));
        let steps = put.handle(&v, fail(second[1]));
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Replanned)),
            "only once"
        );
        assert!(matches!(answer(&steps), Some(Err(RequestError::Quorum(_)))));
        assert!(put.finished());
    }

    /// A put that fails its quorum says why the last replica failed: during a rolling
    /// upgrade, that an old replica could not carry the write (the operator's next step).
    #[test]
    fn a_quorum_failure_says_why_the_last_replica_failed() {
        let v = view("a", &["a", "b", "c"]);
        let (mut put, _) =
            PutRequest::coordinate(&v, PutOp::new("b", "k", None, Some(b"v".to_vec())), 1);
        let steps = put.handle(&v, Event::Written(Ok(written(b"v"))));
        let tags: Vec<Tag> = sends(&steps).iter().map(|s| s.0.unwrap()).collect();
        put.handle(&v, fail(tags[0]));
        let refused = Event::Reply {
            tag: tags[1],
            reply: Reply::NotSent("c: runs the previous peer protocol version".into()),
        };
        let steps = put.handle(&v, refused);
        match answer(&steps) {
            Some(Err(e @ RequestError::Quorum(_))) => assert_eq!(
                e.to_string(),
                "quorum not met: 1 of 2 required replicas answered (3 asked; \
                 c: runs the previous peer protocol version)"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// A get that fails its quorum says why too.
    #[test]
    fn a_get_quorum_failure_says_why_the_last_replica_failed() {
        let v = view("a", &["a", "b", "c"]);
        let (mut get, steps) = GetRequest::start(&v, "b", "k", (None, None));
        let tags: Vec<Tag> = sends(&steps).iter().map(|s| s.0.unwrap()).collect();
        assert_eq!(tags.len(), 2, "{steps:?}");
        get.handle(&v, fail(tags[0]));
        let refused = Event::Reply {
            tag: tags[1],
            reply: Reply::Message(PeerMessage::Error("disk on fire".into())),
        };
        let steps = get.handle(&v, refused);
        let answer = steps.iter().find_map(|s| match s {
            Step::Answer(result) => Some(result),
            _ => None,
        });
        match answer {
            Some(Err(e @ RequestError::Quorum(_))) => {
                let text = e.to_string();
                assert!(text.ends_with(": disk on fire)"), "{text}");
                assert!(text.starts_with("quorum not met: "), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// The one tracked send of `steps`.
    fn one_send(steps: &[Step]) -> (Tag, NodeId, PeerMessage) {
        let out = sends(steps);
        assert_eq!(out.len(), 1, "{steps:?}");
        let (tag, to, message) = out[0].clone();
        (tag.unwrap(), to, message.clone())
    }

    #[test]
    fn a_forward_tries_the_next_primary_only_when_the_last_certainly_did_not_coordinate() {
        let v = view("d", &["a", "b", "c", "d"]);
        let key = key_where(&v, false);
        let op = PutOp::new("b", &key, None, Some(b"v".to_vec()));
        let (mut put, steps) = PutRequest::start(&v, op, 9);
        let (tag, first, message) = one_send(&steps);
        assert!(matches!(
            message,
            PeerMessage::CoordinatePut { now_ms: 9, .. }
        ));
        let reply = Reply::NotSent("refused".into());
        let steps = put.handle(&v, Event::Reply { tag, reply });
        let (tag, second, _) = one_send(&steps);
        assert_ne!(first, second);
        let refusal = crate::coordinator::refuse_forwarded(0, 1, false).unwrap();
        let reply = Reply::Message(refusal);
        let steps = put.handle(&v, Event::Reply { tag, reply });
        let (tag, third, _) = one_send(&steps);
        assert!(third != first && third != second);
        let reply = Reply::Unanswered("timeout".into());
        let steps = put.handle(&v, Event::Reply { tag, reply });
        assert!(
            sends(&steps).is_empty(),
            "it may have coordinated it: no retry"
        );
        assert!(
            matches!(answer(&steps), Some(Err(RequestError::NoCoordinator(m))) if m == "timeout")
        );
        assert!(put.finished());
    }

    #[test]
    fn a_coordinator_failure_reaches_the_client_with_its_status() {
        let v = view("d", &["a", "b", "c", "d"]);
        let key = key_where(&v, false);
        let (mut put, steps) = PutRequest::start(&v, PutOp::new("b", &key, None, None), 1);
        let tag = sends(&steps)[0].0.unwrap();
        let failed = PeerMessage::Failed {
            status: 409,
            message: "too many siblings".into(),
        };
        let steps = put.handle(
            &v,
            Event::Reply {
                tag,
                reply: Reply::Message(failed),
            },
        );
        assert!(sends(&steps).is_empty());
        assert!(
            matches!(answer(&steps), Some(Err(e)) if e.status() == 409 && e.to_string() == "too many siblings")
        );
    }

    #[test]
    fn a_forwarded_put_is_stamped_when_it_reached_its_forwarder_and_refused_late() {
        let v = view("a", &["a", "b", "c"]);
        let forward = |sent_ms: u64| {
            let op = PutOp::new("b", "k", None, Some(b"v".to_vec()));
            PeerMessage::CoordinatePut {
                bucket: op.bucket,
                key: op.key,
                context: None,
                content: Box::new(op.content),
                w: None,
                pw: None,
                dw_given: false,
                precondition: op.precondition.into(),
                now_ms: sent_ms,
                ring_version: 1,
            }
        };
        // The forwarder's clock is 1,000 ms ahead of ours: it sent at 11,000 its time, 10,000
        // ours, and we look at it at 10,400.
        let (op, stamp) = accept_forwarded(&v, forward(11_000), 10_400, 1_000, Some(500)).unwrap();
        assert_eq!((op.key.as_str(), stamp), ("k", 10_000));
        let late = accept_forwarded(&v, forward(11_000), 10_600, 1_000, Some(500)).unwrap_err();
        assert!(late.late);
        assert!(matches!(
            *late.answer,
            PeerMessage::Failed { status: 503, .. }
        ));
        // The old rule (no expiry), for the simulator.
        assert!(accept_forwarded(&v, forward(0), 10_600, 0, None).is_ok());
    }
}
