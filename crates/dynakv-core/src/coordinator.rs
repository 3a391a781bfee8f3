//! The coordinator state machines of one client request (paper 4.5 and 5): which replicas a
//! get or put goes to, what to do with each reply, when to answer, which replicas to repair,
//! which fallback stands in for a replica that fails, and which versions to keep as hints.
//!
//! Sans-IO: the server drives them with its async fan-out and the simulator with simulated
//! messages, so the sequencing the simulation checks is the sequencing the server runs. A
//! driver calls `start`, performs the returned steps, and feeds every outcome back in with
//! `on_reply`, performing what that returns, until `finished`.
//!
//! Invariants:
//! - a request is answered exactly once (`GetStep::Answer`, `PutStep::Answer`), at quorum or
//!   as soon as the quorum is impossible (or, for a put, when every send came back without a
//!   verdict);
//! - every replica that failed a put (and every down primary without a fallback) gets a
//!   `KeepHint` step: the coordinator keeps the version for it, so the write is not lost when
//!   the sloppy quorum was met without it;
//! - a primary that fails before the put is answered is replaced by the next spare (an up node
//!   past the preference list not already used), which keeps the version as a hint;
//! - read repair targets are computed only once every fetch came back (reply, failure or
//!   timeout), from the `sync` of every reply.

use crate::membership::ClusterState;
use crate::message::PeerMessage;
use crate::object::Object;
use crate::quorum::{GetQuorum, Progress, PutQuorum, QuorumFailure, Slot, sloppy_slots};
use crate::ring::{NodeId, PartitionId};
use std::collections::VecDeque;

/// The replicas of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlan {
    /// The key's primaries: the first N nodes of the extended preference list.
    pub primaries: Vec<NodeId>,
    /// The sloppy quorum: primaries that are up, and fallbacks for those that are down.
    pub slots: Vec<Slot>,
    /// Up nodes past the primaries not used as fallbacks: stand-ins for primaries that fail
    /// during a write.
    pub spares: Vec<NodeId>,
    /// Down primaries no fallback could replace (the coordinator keeps their hints).
    pub unplaced: Vec<NodeId>,
    /// The key's preference list in the next ring, during a transition.
    pub next: Option<Vec<NodeId>>,
}

impl ReplicaPlan {
    /// The plan for `partition` with `n_val` replicas under `state`, `is_up` being this node's
    /// failure detector.
    pub fn new(
        state: &ClusterState,
        partition: PartitionId,
        n_val: u32,
        is_up: impl Fn(&NodeId) -> bool,
    ) -> ReplicaPlan {
        let extended: Vec<NodeId> = state
            .ring
            .current
            .extended_preference_list(partition)
            .into_iter()
            .map(|(_, node)| node)
            .collect();
        let n = (n_val as usize).min(extended.len());
        let (slots, unplaced) = sloppy_slots(&extended, n, &is_up);
        let spares = extended[n..]
            .iter()
            .filter(|node| is_up(node) && !slots.iter().any(|s| &s.node == *node))
            .cloned()
            .collect();
        ReplicaPlan {
            primaries: extended[..n].to_vec(),
            slots,
            unplaced,
            spares,
            next: state.next_preference_list(partition, n_val),
        }
    }
}

/// What a get coordinator asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum GetStep {
    /// Answer the client: the sync of the replies, or the quorum failure. Exactly once.
    Answer(Result<Object, QuorumFailure>),
    /// Every fetch came back: write `merged` to these replicas (read repair). At most once,
    /// and only when some replica's reply differed from it.
    Repair {
        merged: Object,
        targets: Vec<NodeId>,
    },
}

/// The coordinator of one get: fetch from every slot, answer at R (and PR), repair after all.
#[derive(Debug, Clone)]
pub struct GetCoordinator {
    quorum: GetQuorum,
    outstanding: usize,
    answered: bool,
}

impl GetCoordinator {
    /// Plan a get needing `r` replies (`pr` of them from primaries), both already clamped to
    /// the key's N. Returns the coordinator and the slots to fetch from (each with the primary
    /// it stands in for, whose hint it should merge in), or the failure when fewer than `r`
    /// replicas can be asked at all.
    pub fn start(
        plan: &ReplicaPlan,
        r: usize,
        pr: usize,
    ) -> Result<(GetCoordinator, Vec<Slot>), QuorumFailure> {
        let replicas: Vec<NodeId> = plan.slots.iter().map(|s| s.node.clone()).collect();
        if replicas.len() < r.max(1) {
            return Err(QuorumFailure {
                replied: 0,
                needed: r.max(1),
                asked: replicas.len(),
                why: None,
            });
        }
        let quorum = GetQuorum::new(replicas, r).with_primaries(plan.primaries.clone(), pr);
        let coordinator = GetCoordinator {
            quorum,
            outstanding: plan.slots.len(),
            answered: false,
        };
        Ok((coordinator, plan.slots.clone()))
    }

    /// Feed one fetch's outcome: `Ok(object or none)`, or `Err(())` for a failure or timeout.
    pub fn on_reply(&mut self, from: &NodeId, reply: Result<Option<Object>, ()>) -> Vec<GetStep> {
        let mut steps = Vec::new();
        self.outstanding = self.outstanding.saturating_sub(1);
        if let Progress::Done(result) = self.quorum.on_reply(from, reply)
            && !self.answered
        {
            self.answered = true;
            steps.push(GetStep::Answer(result));
        }
        if self.outstanding == 0 {
            if !self.answered {
                // Unreachable with a well-formed plan (the quorum decides by the last reply),
                // but a request must never go unanswered.
                self.answered = true;
                steps.push(GetStep::Answer(Err(QuorumFailure {
                    replied: 0,
                    needed: self.quorum.needed(),
                    asked: self.quorum.replicas().len(),
                    why: None,
                })));
            }
            let merged = self.quorum.merged();
            let targets = self.quorum.repair_targets(&merged);
            if !targets.is_empty() {
                steps.push(GetStep::Repair { merged, targets });
            }
        }
        steps
    }

    /// Every fetch came back.
    pub fn finished(&self) -> bool {
        self.outstanding == 0
    }
}

/// One replica write of a put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutSend {
    /// The node written to (never the coordinator itself: its own copy is already stored).
    pub node: NodeId,
    /// The primary this node stands in for: the write is a hint for it.
    pub stands_in_for: Option<NodeId>,
    /// The write must be fsync'd before it is acknowledged (paper 6.1: with buffered writes,
    /// one other replica is asked for a durable write).
    pub fsync: bool,
}

/// What a put coordinator asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutStep {
    /// Send the stored version to a replica and feed its outcome back.
    Send(PutSend),
    /// Keep the stored version here as a hint for `target` (it failed or is down).
    KeepHint { target: NodeId },
    /// Answer the replication round: W (and PW) acknowledged, or the quorum failure. Exactly
    /// once.
    Answer(Result<(), QuorumFailure>),
}

/// How a put is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutPolicy {
    /// Acknowledgements needed, clamped to the key's N.
    pub w: usize,
    /// Acknowledgements needed from primaries, clamped to the key's N.
    pub pw: usize,
    /// The bucket writes to buffers (not fsync'd per write): ask one other replica that is a
    /// primary of the current plan for an fsync'd write.
    pub buffered: bool,
}

/// The coordinator of one put's replication, after the coordinator stored its own copy.
#[derive(Debug, Clone)]
pub struct PutCoordinator {
    me: NodeId,
    quorum: PutQuorum,
    primaries: Vec<NodeId>,
    spares: VecDeque<NodeId>,
    durable_node: Option<NodeId>,
    outstanding: usize,
    answered: bool,
    w: usize,
}

impl PutCoordinator {
    /// Plan the replication of a version `me` stored: its own copy counts when it is one of
    /// the replicas. Returns the coordinator and the first steps (sends, hints for the
    /// unplaced primaries, and the answer when `me`'s copy alone meets the quorum).
    pub fn start(
        me: &NodeId,
        plan: ReplicaPlan,
        policy: PutPolicy,
    ) -> (PutCoordinator, Vec<PutStep>) {
        let slot_nodes: Vec<NodeId> = plan.slots.iter().map(|s| s.node.clone()).collect();
        let quorum = PutQuorum::new(slot_nodes, plan.next.clone(), policy.w)
            .with_primaries(plan.primaries.clone(), policy.pw);
        let mut sends: Vec<(NodeId, Option<NodeId>)> = plan
            .slots
            .iter()
            .map(|s| (s.node.clone(), s.stands_in_for.clone()))
            .collect();
        for node in plan.next.iter().flatten() {
            if !sends.iter().any(|(n, _)| n == node) {
                sends.push((node.clone(), None));
            }
        }
        let holds_copy = sends.iter().any(|(n, _)| n == me);
        sends.retain(|(n, _)| n != me);
        let durable_node = policy
            .buffered
            .then(|| {
                sends
                    .iter()
                    .find(|(_, stands_in_for)| stands_in_for.is_none())
                    .map(|(node, _)| node.clone())
            })
            .flatten();
        let mut coordinator = PutCoordinator {
            me: me.clone(),
            quorum,
            primaries: plan.primaries,
            spares: plan.spares.into_iter().collect(),
            durable_node,
            outstanding: sends.len(),
            answered: false,
            w: policy.w,
        };
        let mut steps: Vec<PutStep> = plan
            .unplaced
            .into_iter()
            .filter(|p| p != me)
            .map(|target| PutStep::KeepHint { target })
            .collect();
        for (node, stands_in_for) in sends {
            steps.push(coordinator.send(node, stands_in_for));
        }
        if holds_copy {
            let own = coordinator.me.clone();
            if let Progress::Done(result) = coordinator.quorum.on_reply(&own, true) {
                coordinator.answered = true;
                steps.push(PutStep::Answer(result));
            }
        }
        coordinator.answer_if_exhausted(&mut steps);
        (coordinator, steps)
    }

    fn send(&self, node: NodeId, stands_in_for: Option<NodeId>) -> PutStep {
        let fsync = self.durable_node.as_ref() == Some(&node);
        PutStep::Send(PutSend {
            node,
            stands_in_for,
            fsync,
        })
    }

    /// Feed one send's outcome (`ok`: acknowledged).
    pub fn on_reply(&mut self, send: &PutSend, ok: bool) -> Vec<PutStep> {
        let mut steps = Vec::new();
        self.outstanding = self.outstanding.saturating_sub(1);
        if !ok {
            let target = send.stands_in_for.clone().unwrap_or(send.node.clone());
            if target != self.me {
                steps.push(PutStep::KeepHint { target });
            }
        }
        if !self.answered {
            // A primary that failed during the write: a spare stands in for it.
            if !ok
                && send.stands_in_for.is_none()
                && self.primaries.contains(&send.node)
                && let Some(spare) = self.spares.pop_front()
            {
                self.quorum.substitute(&send.node, &spare);
                self.outstanding += 1;
                steps.push(self.send(spare, Some(send.node.clone())));
                return steps;
            }
            if let Progress::Done(result) = self.quorum.on_reply(&send.node, ok) {
                self.answered = true;
                steps.push(PutStep::Answer(result));
            }
        }
        self.answer_if_exhausted(&mut steps);
        steps
    }

    /// Every send came back and the quorum could neither be met nor ruled out: report the
    /// failure rather than wait forever.
    fn answer_if_exhausted(&mut self, steps: &mut Vec<PutStep>) {
        if self.outstanding == 0 && !self.answered {
            self.answered = true;
            steps.push(PutStep::Answer(Err(QuorumFailure {
                replied: 0,
                needed: self.w,
                asked: self.primaries.len(),
                why: None,
            })));
        }
    }

    /// The request was answered.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Every send came back.
    pub fn finished(&self) -> bool {
        self.outstanding == 0
    }
}

/// Where the hints held for one target go in a delivery round (paper 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintDelivery {
    /// The target is a member believed down: keep its hints for a later round.
    Hold,
    /// Deliver: to the target for the keys it still replicates, to each key's current
    /// replicas otherwise. `target_replicates` is false when the target left (or is leaving)
    /// the cluster, so every hint follows its key's current replicas.
    Deliver { target_is_member: bool },
}

impl HintDelivery {
    /// The round's decision for `target` under `state`, `target_up` being this node's failure
    /// detector's verdict.
    pub fn for_target(state: &ClusterState, target: &NodeId, target_up: bool) -> HintDelivery {
        let target_is_member = state
            .member(target)
            .is_some_and(|m| m.status != crate::membership::MemberStatus::Exiting);
        if target_is_member && !target_up {
            HintDelivery::Hold
        } else {
            HintDelivery::Deliver { target_is_member }
        }
    }

    /// Whether one hinted key goes to the target itself (`true`) or to `preflist`, the key's
    /// current replicas (`false`): a hint follows its key when the target no longer
    /// replicates it.
    pub fn to_target(self, target: &NodeId, preflist: &[NodeId]) -> bool {
        matches!(
            self,
            HintDelivery::Deliver {
                target_is_member: true
            }
        ) && preflist.contains(target)
    }
}

/// Where a put goes first (paper 4.5: a put is coordinated by a node of the key's
/// preference list; any other node forwards it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutRoute {
    /// This node is a primary of the key: it coordinates.
    Coordinate,
    /// Forward to the primaries in this order.
    Forward(PutForward),
}

/// A put forwarded to the key's primaries: those believed up first, then the others. The next
/// is tried only when the last one certainly did not coordinate the put (the request was never
/// delivered, or it answered that it is not a replica); when it may have (no answer in time,
/// the connection lost after sending), forwarding stops and the put's outcome is
/// indeterminate. Retrying then would coordinate the same write twice: a primary that was
/// paused coordinates the first request when it resumes, with the client's old context, and
/// that second version is concurrent with every write made since, so a value that later writes
/// overwrote comes back as a sibling (the nemesis found this with a SIGSTOPped primary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutForward {
    candidates: VecDeque<NodeId>,
    last_error: String,
}

/// Why a forwarded put did not come back coordinated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFailure {
    /// Not delivered (unreachable, in backoff, refused before sending): try the next.
    NotSent,
    /// The candidate answered that it is not a replica (its ring moved): try the next.
    NotAReplica,
    /// Sent, and no answer in time (timeout, connection lost): the candidate may coordinate
    /// it, now or later. Stop: the outcome is indeterminate.
    Unanswered,
}

/// The start of a coordinator's refusal of a forwarded put that arrived too late (a paused
/// node resuming with queued requests): the forwarder may try the next candidate.
pub const FORWARD_EXPIRED: &str = "forwarded put expired";
/// The start of a coordinator's refusal of a forwarded put for a key it does not replicate.
pub const NOT_A_REPLICA: &str = "not a replica of this key";

/// When a forwarded put was sent, on this node's clock: `sent_ms` is the forwarder's clock
/// (`CoordinatePut::now_ms`), `offset_ms` the forwarder's clock minus ours (from its hello).
pub fn forwarded_sent_at(sent_ms: u64, offset_ms: i64) -> u64 {
    sent_ms.saturating_add_signed(offset_ms.saturating_neg())
}

/// A coordinator's check of a forwarded `CoordinatePut` before applying it: the refusal to
/// send when it waited more than `limit_ms` since the put arrived at its forwarder (the
/// forwarder has given up on it by now, and its context may be stale), or when this node is
/// not one of the key's primaries. `None`: coordinate it.
pub fn refuse_forwarded(waited_ms: u64, limit_ms: u64, is_primary: bool) -> Option<PeerMessage> {
    if waited_ms > limit_ms {
        return Some(PeerMessage::Failed {
            status: 503,
            message: format!(
                "{FORWARD_EXPIRED}: it arrived {waited_ms} ms after the put, more than {limit_ms} ms"
            ),
        });
    }
    if !is_primary {
        return Some(PeerMessage::Failed {
            status: 503,
            message: NOT_A_REPLICA.into(),
        });
    }
    None
}

/// What a forwarder makes of a candidate's answer to `CoordinatePut`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardReply {
    /// It coordinated the write: the stored object's bytes.
    Coordinated(Vec<u8>),
    /// It did not apply the write (not a replica, expired, or an answer that is no
    /// coordination at all): try the next candidate ([`ForwardFailure::NotAReplica`]).
    Refused(String),
    /// It coordinated and the write failed: the status and message for the client.
    Failed { status: u16, message: String },
}

/// Classify `from`'s answer to a forwarded put.
pub fn forward_reply(from: &NodeId, reply: PeerMessage) -> ForwardReply {
    match reply {
        PeerMessage::Coordinated { object } => ForwardReply::Coordinated(object),
        PeerMessage::Failed { status, message }
            if status == 503
                && (message.starts_with(NOT_A_REPLICA) || message.starts_with(FORWARD_EXPIRED)) =>
        {
            ForwardReply::Refused(message)
        }
        PeerMessage::Failed { status, message } => ForwardReply::Failed { status, message },
        // An older or confused peer answered without coordinating: it stored nothing.
        other => ForwardReply::Refused(format!("{from} answered {}", other.name())),
    }
}

impl PutForward {
    /// The route of a put whose current primaries are `primaries`.
    pub fn route(primaries: &[NodeId], me: &NodeId, is_up: impl Fn(&NodeId) -> bool) -> PutRoute {
        if primaries.contains(me) {
            return PutRoute::Coordinate;
        }
        let mut candidates = primaries.to_vec();
        // Stable: the preference list's order among the up ones, then among the others.
        candidates.sort_by_key(|n| !is_up(n));
        PutRoute::Forward(PutForward {
            candidates: candidates.into(),
            last_error: String::from("no replicas"),
        })
    }

    /// The next primary to forward to; `None` when there is none left to try (answer
    /// [`Self::last_error`]).
    pub fn next_candidate(&mut self) -> Option<NodeId> {
        self.candidates.pop_front()
    }

    /// The last candidate did not coordinate the put, for `why`. Returns whether to try the
    /// next one; `false` for [`ForwardFailure::Unanswered`] (no other candidate is tried).
    pub fn failed(&mut self, why: ForwardFailure, error: String) -> bool {
        self.last_error = error;
        if why == ForwardFailure::Unanswered {
            self.candidates.clear();
            return false;
        }
        true
    }

    /// Why the last candidate failed.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }
}

/// The primaries of a tombstone's key when this node is the one that reaps it: its first
/// primary, with a full preference list of `n_val` nodes (with fewer nodes than `n_val`, a
/// tombstone is never reaped: "all N replicas hold it" cannot be shown).
pub fn reaper_primaries(
    state: &ClusterState,
    me: &NodeId,
    partition: PartitionId,
    n_val: u32,
) -> Option<Vec<NodeId>> {
    let primaries = state.preference_list(partition, n_val);
    (primaries.first() == Some(me) && primaries.len() >= n_val as usize).then_some(primaries)
}

/// The tombstones this node may reap now (at most `max`, in storage-key order), read through
/// the replica's tombstone list: `(storage key, stored bytes)` of every stored object that is
/// a [`reap_candidate`]. Undecodable entries are skipped (never reaped).
///
/// # Errors
/// Storage failed.
pub fn reap_candidates(
    replica: &crate::replica::Replica,
    now_ms: u64,
    grace_ms: u64,
    max: usize,
) -> Result<Vec<crate::storage::Entry>, crate::replica::ReplicaError> {
    /// Tombstone-list entries read per scan.
    const PAGE: usize = 1000;
    let mut candidates = Vec::new();
    let mut start_after: Option<Vec<u8>> = None;
    while candidates.len() < max {
        let (page, last_listed) = replica.scan_tombstones(start_after.as_deref(), PAGE)?;
        for (storage_key, value) in page {
            if candidates.len() >= max {
                break;
            }
            if !Object::encoded_is_deleted(&value).unwrap_or(false) {
                continue;
            }
            if Object::decode(&value).is_ok_and(|o| reap_candidate(&o, now_ms, grace_ms)) {
                candidates.push((storage_key, value));
            }
        }
        // Continue after the last listed key even when its object is gone.
        match last_listed {
            Some(last) => start_after = Some(last),
            None => break,
        }
    }
    Ok(candidates)
}

/// A stored object a reaper may consider: all tombstones, and its newest write (sibling or
/// clock entry) at least `grace_ms` before `now_ms`. It is reaped only if, besides, every
/// primary holds exactly the same object.
pub fn reap_candidate(object: &Object, now_ms: u64, grace_ms: u64) -> bool {
    if object.is_empty() || !object.is_deleted() {
        return false;
    }
    let newest = object
        .siblings()
        .iter()
        .map(|s| s.content.last_modified_ms)
        .chain(object.clock().entries().map(|(_, e)| e.timestamp_ms))
        .max()
        .unwrap_or(0);
    now_ms.saturating_sub(newest) >= grace_ms
}

/// One member's answer to a reap check: its stored copy of the key (`T`: the encoded bytes in
/// the server, the object in the simulator) and whether it keeps a hint of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapAnswer<T> {
    pub stored: Option<T>,
    pub hinted: bool,
}

/// The check before a tombstone is reaped, run by the key's first primary: every other member
/// is asked; each primary must hold exactly the tombstone, no member may keep a hint of the key,
/// and no non-primary a copy (a hint or stray copy of an older version arriving after the reap
/// would bring the deleted value back). A member that fails to answer blocks the reap.
#[derive(Debug, Clone)]
pub struct ReapCheck<T> {
    tombstone: T,
    primaries: Vec<NodeId>,
    waiting: Vec<NodeId>,
    departed: Vec<NodeId>,
    verdict: Option<bool>,
}

/// The members a reap check asks, each with whether it has left the cluster (`Exiting`). A
/// member that left and does not answer counts as clear: it owns nothing, and once shut down it
/// can deliver nothing (waiting for it would block reaping for good after any leave); one that
/// left but still runs answers like any other, so the hints it still holds block the reap.
pub fn reap_check_members(state: &ClusterState) -> Vec<(NodeId, bool)> {
    state
        .members
        .values()
        .map(|m| {
            (
                m.id.clone(),
                m.status == crate::membership::MemberStatus::Exiting,
            )
        })
        .collect()
}

impl<T: PartialEq> ReapCheck<T> {
    /// Start the check of `tombstone`, stored at `me`, the first of `primaries`; `members` is
    /// the cluster's member list with whether each left ([`reap_check_members`]) and
    /// `me_hinted` whether `me` keeps a hint of the key. Returns the check and the members to
    /// ask (none when the verdict is already known).
    pub fn start(
        me: &NodeId,
        members: impl IntoIterator<Item = (NodeId, bool)>,
        primaries: Vec<NodeId>,
        tombstone: T,
        me_hinted: bool,
    ) -> (ReapCheck<T>, Vec<NodeId>) {
        let (mut waiting, mut departed) = (Vec::new(), Vec::new());
        for (node, left) in members {
            if &node == me {
                continue;
            }
            if left {
                departed.push(node.clone());
            }
            waiting.push(node);
        }
        let verdict = if me_hinted {
            Some(false)
        } else if waiting.is_empty() {
            Some(true)
        } else {
            None
        };
        let ask = if verdict.is_some() {
            Vec::new()
        } else {
            waiting.clone()
        };
        let check = ReapCheck {
            tombstone,
            primaries,
            waiting,
            departed,
            verdict,
        };
        (check, ask)
    }

    /// Feed one member's answer (`None`: it failed or timed out). Returns the verdict once it
    /// is known (exactly once): `true` when the tombstone may be reaped.
    pub fn on_reply(&mut self, from: &NodeId, answer: Option<ReapAnswer<T>>) -> Option<bool> {
        if self.verdict.is_some() || !self.waiting.contains(from) {
            return None;
        }
        self.waiting.retain(|n| n != from);
        let departed = self.departed.contains(from);
        let clear = answer.map_or(departed, |a| {
            !a.hinted
                && if self.primaries.contains(from) {
                    a.stored.as_ref() == Some(&self.tombstone)
                } else {
                    a.stored.is_none()
                }
        });
        if !clear {
            self.verdict = Some(false);
        } else if self.waiting.is_empty() {
            self.verdict = Some(true);
        }
        self.verdict
    }

    /// The verdict, once known.
    pub fn verdict(&self) -> Option<bool> {
        self.verdict
    }

    /// The tombstone being checked.
    pub fn tombstone(&self) -> &T {
        &self.tombstone
    }
}

/// What an anti-entropy exchange does with one key whose hashes differed: both replicas end
/// with the `sync` of their versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRepair {
    pub merged: Object,
    /// This node's copy differs from `merged`: merge it in here.
    pub store_local: bool,
    /// The peer's copy differs from `merged`: send it there.
    pub store_remote: bool,
}

impl KeyRepair {
    /// The repair of one key from both sides' copies; `None` when neither holds it.
    pub fn of(local: Option<&Object>, remote: Option<&Object>) -> Option<KeyRepair> {
        let merged = match (local, remote) {
            (Some(a), Some(b)) => a.sync(b),
            (Some(a), None) => a.clone(),
            (None, Some(b)) => b.clone(),
            (None, None) => return None,
        };
        Some(KeyRepair {
            store_local: local != Some(&merged),
            store_remote: remote != Some(&merged),
            merged,
        })
    }

    /// Either side changes.
    pub fn repairs(&self) -> bool {
        self.store_local || self.store_remote
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberStatus;
    use crate::object::{Content, Object, PrunePolicy};
    use crate::version::{ActorId, VersionVector};

    use crate::test_support::{id, member};

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| id(n)).collect()
    }

    fn slot(node: &str, for_: Option<&str>) -> Slot {
        Slot {
            node: id(node),
            stands_in_for: for_.map(id),
        }
    }

    /// A cluster founded by `a`.
    fn cluster_of_a() -> ClusterState {
        ClusterState::found("c", member("a", MemberStatus::Valid), 8).unwrap()
    }

    fn plan(slots: Vec<Slot>, primaries: &[&str], spares: &[&str]) -> ReplicaPlan {
        ReplicaPlan {
            primaries: ids(primaries),
            slots,
            spares: ids(spares),
            unplaced: Vec::new(),
            next: None,
        }
    }

    fn policy(w: usize) -> PutPolicy {
        PutPolicy {
            w,
            pw: 0,
            buffered: false,
        }
    }

    fn sends(steps: &[PutStep]) -> Vec<PutSend> {
        steps
            .iter()
            .filter_map(|s| match s {
                PutStep::Send(send) => Some(send.clone()),
                _ => None,
            })
            .collect()
    }

    fn answers(steps: &[PutStep]) -> Vec<Result<(), QuorumFailure>> {
        steps
            .iter()
            .filter_map(|s| match s {
                PutStep::Answer(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn object(value: &[u8], actor: u8) -> Object {
        Object::new()
            .update(
                &VersionVector::default(),
                Content {
                    value: value.to_vec(),
                    ..Content::default()
                },
                ActorId(u64::from(actor)),
                0,
                PrunePolicy::default(),
            )
            .unwrap()
    }

    #[test]
    fn put_counts_own_copy_and_answers_at_w() {
        let p = plan(
            vec![slot("a", None), slot("b", None), slot("c", None)],
            &["a", "b", "c"],
            &[],
        );
        let (mut coord, steps) = PutCoordinator::start(&id("a"), p, policy(2));
        let first = sends(&steps);
        assert_eq!(
            first.iter().map(|s| s.node.clone()).collect::<Vec<_>>(),
            ids(&["b", "c"])
        );
        assert!(answers(&steps).is_empty());
        let steps = coord.on_reply(&first[0], true);
        assert_eq!(answers(&steps), vec![Ok(())]);
        assert!(coord.answered() && !coord.finished());
        // A late failure after the answer: no second answer, but a hint is kept for it.
        let steps = coord.on_reply(&first[1], false);
        assert_eq!(steps, vec![PutStep::KeepHint { target: id("c") }]);
        assert!(coord.finished());
    }

    #[test]
    fn failed_primary_is_replaced_by_a_spare_that_keeps_a_hint() {
        let p = plan(
            vec![slot("a", None), slot("b", None), slot("c", None)],
            &["a", "b", "c"],
            &["d"],
        );
        let (mut coord, steps) = PutCoordinator::start(&id("a"), p, policy(3));
        let first = sends(&steps);
        let steps = coord.on_reply(&first[0], false);
        assert_eq!(
            steps,
            vec![
                PutStep::KeepHint { target: id("b") },
                PutStep::Send(PutSend {
                    node: id("d"),
                    stands_in_for: Some(id("b")),
                    fsync: false
                })
            ]
        );
        assert!(answers(&coord.on_reply(&first[1], true)).is_empty());
        let spare = sends(&steps)[0].clone();
        assert_eq!(answers(&coord.on_reply(&spare, true)), vec![Ok(())]);
        assert!(coord.finished());
    }

    #[test]
    fn put_fails_once_quorum_is_impossible_and_keeps_hints() {
        let p = plan(
            vec![slot("a", None), slot("b", None), slot("c", None)],
            &["a", "b", "c"],
            &[],
        );
        let (mut coord, steps) = PutCoordinator::start(&id("a"), p, policy(3));
        let first = sends(&steps);
        let steps = coord.on_reply(&first[0], false);
        assert!(steps.contains(&PutStep::KeepHint { target: id("b") }));
        let failure = answers(&steps);
        assert_eq!(failure.len(), 1);
        assert!(failure[0].is_err());
        let steps = coord.on_reply(&first[1], true);
        assert!(answers(&steps).is_empty(), "answered twice");
    }

    #[test]
    fn unplaced_primaries_get_hints_and_a_lone_coordinator_answers_at_once() {
        let mut p = plan(vec![slot("a", None)], &["a", "b"], &[]);
        p.unplaced = ids(&["b"]);
        let (coord, steps) = PutCoordinator::start(&id("a"), p, policy(1));
        assert_eq!(
            steps,
            vec![
                PutStep::KeepHint { target: id("b") },
                PutStep::Answer(Ok(()))
            ]
        );
        assert!(coord.finished());
    }

    #[test]
    fn a_coordinator_outside_the_plan_with_nothing_to_send_fails_rather_than_hangs() {
        let mut p = plan(Vec::new(), &["b"], &[]);
        p.unplaced = ids(&["b"]);
        let (coord, steps) = PutCoordinator::start(&id("a"), p, policy(1));
        assert!(steps.contains(&PutStep::KeepHint { target: id("b") }));
        assert_eq!(answers(&steps).len(), 1);
        assert!(answers(&steps)[0].is_err());
        assert!(coord.answered());
    }

    #[test]
    fn buffered_put_asks_exactly_one_other_primary_for_fsync() {
        let p = plan(
            vec![slot("a", None), slot("d", Some("b")), slot("c", None)],
            &["a", "b", "c"],
            &[],
        );
        let (_, steps) = PutCoordinator::start(
            &id("a"),
            p,
            PutPolicy {
                w: 2,
                pw: 0,
                buffered: true,
            },
        );
        let durable: Vec<NodeId> = sends(&steps)
            .into_iter()
            .filter(|s| s.fsync)
            .map(|s| s.node)
            .collect();
        // Not the fallback standing in for b: a replica that keeps the key as its own.
        assert_eq!(durable, ids(&["c"]));
    }

    #[test]
    fn transition_sends_to_the_next_list_too() {
        let mut p = plan(vec![slot("a", None), slot("b", None)], &["a", "b"], &[]);
        p.next = Some(ids(&["a", "c"]));
        let (mut coord, steps) = PutCoordinator::start(&id("a"), p, policy(2));
        let first = sends(&steps);
        assert_eq!(
            first.iter().map(|s| s.node.clone()).collect::<Vec<_>>(),
            ids(&["b", "c"])
        );
        // W of the current list is met by b, but the next list still needs c.
        assert!(answers(&coord.on_reply(&first[0], true)).is_empty());
        assert_eq!(answers(&coord.on_reply(&first[1], true)), vec![Ok(())]);
    }

    #[test]
    fn get_answers_at_r_and_repairs_after_all_replies() {
        let p = plan(
            vec![slot("a", None), slot("b", None), slot("c", None)],
            &["a", "b", "c"],
            &[],
        );
        let (mut coord, fetches) = GetCoordinator::start(&p, 2, 0).unwrap();
        assert_eq!(fetches.len(), 3);
        let newer = object(b"v1", 1);
        assert!(coord.on_reply(&id("a"), Ok(Some(newer.clone()))).is_empty());
        let steps = coord.on_reply(&id("b"), Ok(None));
        assert_eq!(steps, vec![GetStep::Answer(Ok(newer.clone()))]);
        // c failed: it is not a repair target (it did not answer), b is.
        let steps = coord.on_reply(&id("c"), Err(()));
        assert_eq!(
            steps,
            vec![GetStep::Repair {
                merged: newer,
                targets: ids(&["b"])
            }]
        );
        assert!(coord.finished());
    }

    #[test]
    fn key_repair_stores_only_on_the_sides_that_differ() {
        let a = object(b"a", 1);
        let b = object(b"b", 2);
        let both = a.sync(&b);
        let r = KeyRepair::of(Some(&a), Some(&b)).unwrap();
        assert_eq!(r.merged, both);
        assert!(r.store_local && r.store_remote);
        let r = KeyRepair::of(Some(&both), Some(&a)).unwrap();
        assert!(!r.store_local && r.store_remote);
        let r = KeyRepair::of(None, Some(&a)).unwrap();
        assert!(r.store_local && !r.store_remote);
        assert!(!KeyRepair::of(Some(&a), Some(&a)).unwrap().repairs());
        assert_eq!(KeyRepair::of(None, None), None);
    }

    #[test]
    fn hints_wait_for_a_down_member_and_follow_their_key_otherwise() {
        let mut state = cluster_of_a();
        for (name, status) in [("b", MemberStatus::Valid), ("x", MemberStatus::Exiting)] {
            state.members.insert(id(name), member(name, status));
        }
        assert_eq!(
            HintDelivery::for_target(&state, &id("b"), false),
            HintDelivery::Hold
        );
        let up = HintDelivery::for_target(&state, &id("b"), true);
        assert!(up.to_target(&id("b"), &ids(&["a", "b"])));
        // The key moved off b: the hint goes to its current replicas.
        assert!(!up.to_target(&id("b"), &ids(&["a", "c"])));
        // A node that left is not waited for: its hints follow their keys.
        let gone = HintDelivery::for_target(&state, &id("x"), false);
        assert_eq!(
            gone,
            HintDelivery::Deliver {
                target_is_member: false
            }
        );
        assert!(!gone.to_target(&id("x"), &ids(&["x", "a"])));
        let unknown = HintDelivery::for_target(&state, &id("y"), false);
        assert!(!unknown.to_target(&id("y"), &ids(&["y"])));
    }

    #[test]
    fn a_put_is_coordinated_by_a_primary_and_forwarded_up_first_otherwise() {
        let primaries = ids(&["a", "b", "c"]);
        assert_eq!(
            PutForward::route(&primaries, &id("b"), |_| true),
            PutRoute::Coordinate
        );
        let PutRoute::Forward(mut forward) =
            PutForward::route(&primaries, &id("d"), |n| *n != id("a"))
        else {
            panic!("d is no primary");
        };
        assert_eq!(forward.next_candidate(), Some(id("b")));
        assert!(forward.failed(ForwardFailure::NotSent, "b: unreachable".into()));
        assert_eq!(forward.next_candidate(), Some(id("c")));
        assert!(forward.failed(ForwardFailure::NotAReplica, "not a replica".into()));
        assert_eq!(forward.next_candidate(), Some(id("a")), "the down one last");
        assert!(forward.failed(ForwardFailure::NotSent, "a: unreachable".into()));
        assert_eq!(forward.next_candidate(), None);
        assert_eq!(forward.last_error(), "a: unreachable");
    }

    #[test]
    fn a_forward_that_may_have_been_coordinated_is_never_sent_again() {
        let primaries = ids(&["a", "b", "c"]);
        let PutRoute::Forward(mut forward) = PutForward::route(&primaries, &id("d"), |_| true)
        else {
            panic!("d is no primary");
        };
        assert_eq!(forward.next_candidate(), Some(id("a")));
        // a was paused: the request sits in its socket and a coordinates it when it resumes.
        assert!(!forward.failed(ForwardFailure::Unanswered, "a: timed out".into()));
        assert_eq!(forward.next_candidate(), None, "b and c are not asked");
        assert_eq!(forward.last_error(), "a: timed out");
    }

    #[test]
    fn a_forwarded_put_is_refused_late_or_off_its_replicas_and_the_forwarder_tries_the_next() {
        assert_eq!(refuse_forwarded(100, 100, true), None);
        let late = refuse_forwarded(101, 100, true).unwrap();
        let off = refuse_forwarded(0, 100, false).unwrap();
        for refusal in [late, off] {
            // The refusals prove nothing was applied: the next candidate is asked.
            assert!(matches!(
                forward_reply(&id("a"), refusal),
                ForwardReply::Refused(_)
            ));
        }
        // A coordination that failed is the client's answer, not a reason to retry.
        let failed = PeerMessage::Failed {
            status: 503,
            message: "quorum not met: 1 of 2 replicas".into(),
        };
        assert_eq!(
            forward_reply(&id("a"), failed),
            ForwardReply::Failed {
                status: 503,
                message: "quorum not met: 1 of 2 replicas".into()
            }
        );
        let done = PeerMessage::Coordinated { object: vec![7] };
        assert_eq!(
            forward_reply(&id("a"), done),
            ForwardReply::Coordinated(vec![7])
        );
        // An answer that is no coordination stored nothing.
        assert_eq!(
            forward_reply(&id("a"), PeerMessage::Ack),
            ForwardReply::Refused("a answered Ack".into())
        );
    }

    #[test]
    fn only_the_first_primary_of_a_full_preference_list_reaps() {
        let state = crate::test_support::settled_cluster(&["a", "b", "c"], 8);
        for partition in 0..8 {
            let primaries = state.preference_list(partition, 3);
            for n in ["a", "b", "c"] {
                let reaper = reaper_primaries(&state, &id(n), partition, 3);
                assert_eq!(reaper.is_some(), primaries[0] == id(n));
            }
            // Four replicas asked of three nodes: nobody can show all of them hold it.
            assert!(reaper_primaries(&state, &primaries[0], partition, 4).is_none());
        }
    }

    /// The reaper reads candidates through the tombstone list: old tombstones only, live
    /// values and recent tombstones stay, and at most `max` come back.
    #[test]
    fn reap_candidates_are_the_old_tombstones_in_the_list() {
        use crate::replica::{Precondition, Replica, WriteRequest};
        use std::sync::Arc;
        let storage: Arc<dyn crate::storage::Storage> =
            Arc::new(crate::test_support::MapStorage::default());
        let replica = Replica::new(
            Arc::clone(&storage),
            ActorId(1),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let ring = crate::ring::Ring::new(
            8,
            crate::ring::RingNode {
                id: id("a"),
                zone: String::new(),
            },
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        replica.attach_aae(Arc::new(crate::aae_trees::AaeTrees::new(ring, storage)));
        let props = crate::bucket::BucketProps::default();
        let write = |key: &str, deleted: bool, at: u64| {
            let content = if deleted {
                Content::tombstone(at)
            } else {
                Content {
                    value: b"v".to_vec(),
                    last_modified_ms: at,
                    ..Content::default()
                }
            };
            replica
                .write(WriteRequest {
                    bucket: "b",
                    key,
                    context: None,
                    content,
                    props: &props,
                    durability: crate::storage::Durability::Fsync,
                    precondition: Precondition::None,
                    now_ms: at,
                    wall_ms: at,
                })
                .unwrap_or_else(|e| panic!("{e:?}"));
        };
        for i in 0..5 {
            write(&format!("old{i}"), false, 10);
            write(&format!("old{i}"), true, 100);
        }
        write("live", false, 100);
        write("recent", false, 100);
        write("recent", true, 9_500);
        let names = |entries: Vec<crate::storage::Entry>| -> Vec<String> {
            entries
                .iter()
                .filter_map(|(k, _)| crate::keys::split_object_key(k))
                .map(|(_, k)| String::from_utf8_lossy(k).into_owned())
                .collect()
        };
        let all = reap_candidates(&replica, 10_000, 1_000, 100).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(names(all), ["old0", "old1", "old2", "old3", "old4"]);
        let some = reap_candidates(&replica, 10_000, 1_000, 2).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(some.len(), 2);
    }

    #[test]
    fn only_old_tombstones_are_reap_candidates() {
        let live = object(b"v", 1);
        assert!(!reap_candidate(&live, 1_000_000, 0));
        assert!(!reap_candidate(&Object::new(), 1_000_000, 0));
        let tombstone = live
            .update(
                live.clock(),
                Content {
                    deleted: true,
                    last_modified_ms: 100,
                    ..Content::default()
                },
                ActorId(2),
                100,
                PrunePolicy::default(),
            )
            .unwrap();
        assert!(tombstone.is_deleted());
        assert!(
            !reap_candidate(&tombstone, 150, 100),
            "within the grace period"
        );
        assert!(reap_candidate(&tombstone, 200, 100));
    }

    #[test]
    fn reap_check_needs_every_member_clear() {
        let answer = |stored: Option<&str>, hinted| {
            Some(ReapAnswer {
                stored: stored.map(str::to_owned),
                hinted,
            })
        };
        let start = |me_hinted| {
            ReapCheck::start(
                &id("a"),
                ids(&["a", "b", "c", "d"]).into_iter().map(|n| (n, false)),
                ids(&["a", "b", "c"]),
                "T".to_owned(),
                me_hinted,
            )
        };
        let (mut check, ask) = start(false);
        assert_eq!(ask, ids(&["b", "c", "d"]));
        assert_eq!(check.on_reply(&id("b"), answer(Some("T"), false)), None);
        assert_eq!(check.on_reply(&id("d"), answer(None, false)), None);
        assert_eq!(
            check.on_reply(&id("c"), answer(Some("T"), false)),
            Some(true)
        );
        // Each way to block: a primary with another copy, a hint anywhere, a stray copy, no answer.
        for (node, reply) in [
            ("b", answer(Some("older"), false)),
            ("b", answer(Some("T"), true)),
            ("d", answer(None, true)),
            ("d", answer(Some("T"), false)),
            ("c", None),
        ] {
            let (mut check, _) = start(false);
            assert_eq!(check.on_reply(&id(node), reply), Some(false), "{node}");
            assert_eq!(check.on_reply(&id("b"), answer(Some("T"), false)), None);
        }
        let (check, ask) = start(true);
        assert!(ask.is_empty());
        assert_eq!(check.verdict(), Some(false));
        let (check, ask) = ReapCheck::start(&id("a"), [(id("a"), false)], ids(&["a"]), 1, false);
        assert!(ask.is_empty());
        assert_eq!(check.verdict(), Some(true));
        // A member that left: its silence is clear, its hint is not.
        let members = [(id("a"), false), (id("x"), true)];
        let (mut check, ask) = ReapCheck::start(&id("a"), members.clone(), ids(&["a"]), 1, false);
        assert_eq!(ask, ids(&["x"]));
        assert_eq!(check.on_reply(&id("x"), None), Some(true));
        let (mut check, _) = ReapCheck::start(&id("a"), members, ids(&["a"]), 1, false);
        let hinted = Some(ReapAnswer {
            stored: None,
            hinted: true,
        });
        assert_eq!(check.on_reply(&id("x"), hinted), Some(false));
        let (check, ask) = ReapCheck::start(&id("a"), [(id("a"), false)], ids(&["a"]), 1, false);
        assert!(ask.is_empty());
        assert_eq!(check.verdict(), Some(true));
    }

    #[test]
    fn reap_check_marks_members_that_left() {
        let mut state = cluster_of_a();
        state
            .members
            .insert(id("b"), member("b", MemberStatus::Joining));
        state
            .members
            .insert(id("x"), member("x", MemberStatus::Exiting));
        assert_eq!(
            reap_check_members(&state),
            vec![(id("a"), false), (id("b"), false), (id("x"), true)]
        );
    }

    #[test]
    fn get_with_too_few_slots_fails_before_sending() {
        let p = plan(vec![slot("a", None)], &["a", "b", "c"], &[]);
        let failure = GetCoordinator::start(&p, 2, 0).unwrap_err();
        assert_eq!((failure.needed, failure.asked), (2, 1));
    }

    #[test]
    fn get_fails_when_r_replies_cannot_arrive() {
        let p = plan(
            vec![slot("a", None), slot("b", None), slot("c", None)],
            &["a", "b", "c"],
            &[],
        );
        let (mut coord, _) = GetCoordinator::start(&p, 3, 0).unwrap();
        let steps = coord.on_reply(&id("a"), Err(()));
        assert!(matches!(steps.as_slice(), [GetStep::Answer(Err(_))]));
        assert!(coord.on_reply(&id("b"), Ok(None)).is_empty());
        assert!(coord.on_reply(&id("c"), Ok(None)).is_empty());
    }
}
