//! The timer-driven work of a `Node`: gossip and joins, transition handoff and cleanup, hint
//! delivery, tombstone reaping and anti-entropy exchanges.
//!
//! Invariants: a handoff or cleanup pass is recorded done only when it completed (and, for a
//! cleanup, once its drops are durable); a hint is deleted only after its destination
//! acknowledged it and only if unchanged.

use super::{
    AaeRound, AaeRun, AaeRunEvent, AaeRunStep, AfterSync, Arc, BTreeSet, CleanupPass, ClusterState,
    DeliveryRound, HANDOFF_BATCH_KEYS, HandoffEntry, HandoffPass, HintEvent, HintStep,
    MAX_AAE_KEYS_PER_EXCHANGE, MAX_REAPS_PER_ROUND, Node, NodeId, Output, PassStep, PeerMessage,
    Purpose, ReapEvent, ReapRound, ReapStep, Timer, reap_candidates,
};
use crate::{gossip, hints};
use std::collections::VecDeque;

impl Node {
    // ----- timers -----

    pub(super) fn on_timer(&mut self, now: u64, timer: Timer) {
        match timer {
            Timer::RequestTimeout(id) => {
                if let Some(pending) = self.pending.get(&id) {
                    let to = pending.to.clone();
                    self.on_timeout_of(now, &to);
                    self.fail_request(now, id);
                }
            }
            Timer::Gossip => {
                self.gossip_round(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.gossip_interval_ms,
                    timer: Timer::Gossip,
                });
            }
            Timer::Hints => {
                self.deliver_hints(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.hint_interval_ms,
                    timer: Timer::Hints,
                });
            }
            Timer::Aae => {
                self.anti_entropy_round(now);
                // The server reaps tombstones in its anti-entropy loop too.
                self.reap_round(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.aae_interval_ms,
                    timer: Timer::Aae,
                });
            }
            Timer::Paging => {
                self.paging_timer_set = false;
                self.handoff_step(now);
                self.cleanup_step(now);
            }
            Timer::Flush => {
                self.flush();
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.flush_interval_ms,
                    timer: Timer::Flush,
                });
            }
        }
    }

    /// Merge a peer's state (gossip, `StaleRing`): the core's `gossip::merge` (another
    /// cluster's state is refused).
    pub(super) fn merge_state(&mut self, now: u64, theirs: &ClusterState) {
        let _refused = gossip::merge(&mut self.cluster, &mut self.failure_detector, now, theirs);
    }

    /// The server's one-second background loop: `gossip_round` (beat, exchange with a member
    /// that has not exited, then plan when claimant), then `handoff_round` and
    /// `cleanup_round`. The claimant plans once this round's exchange is over (its reply
    /// merged, or failed: [`Node::after_gossip_exchange`]), as the server does: the plan then
    /// reads the freshest merged state (a handoff-done mark, a join or leave, or a newer ring
    /// planned by a previous claimant that this exchange brought), instead of planning a ring
    /// from a state one round staler and spreading it before the merge that would have
    /// changed it.
    pub(super) fn gossip_round(&mut self, now: u64) {
        if !self.joined() {
            self.send_join(now);
        }
        self.handoff_round(now);
        self.cleanup_round(now);
        let rng = &mut self.rng;
        let Some((peer, body)) = gossip::start_round(&mut self.cluster, &self.me, |n| rng.index(n))
        else {
            // No one to exchange with: plan on what this node knows.
            self.after_gossip_exchange(now, None);
            return;
        };
        let timeout = self.config.timings.gossip_interval_ms;
        self.send_request(now, &peer, body, Purpose::Gossip, timeout);
    }

    /// This round's gossip exchange is over (`theirs`: the peer's state, when it answered):
    /// merge it, then plan when claimant.
    pub(super) fn after_gossip_exchange(&mut self, now: u64, reply: Option<&PeerMessage>) {
        let detector = &mut self.failure_detector;
        let _ = gossip::end_round(&mut self.cluster, &self.me, detector, now, reply);
    }

    /// `Cluster::join`: ask a member (in turn) to admit this node.
    pub(super) fn send_join(&mut self, now: u64) {
        if self.join_pending || self.join_via.is_empty() {
            return;
        }
        // A node founds its own cluster with its entry (`Node::joining`).
        let Some(body) = gossip::join_request(&self.cluster, &self.me) else {
            return;
        };
        let via = self.join_via[self.join_attempts % self.join_via.len()].clone();
        self.join_attempts += 1;
        self.join_pending = true;
        let timeout = self.config.timings.request_ms;
        self.send_request(now, &via, body, Purpose::Join, timeout);
    }

    /// `Cluster::handoff_round`: the core's `HandoffPass` (paged and resumable: each step
    /// scans at most one page and at most `HANDOFF_BATCHES_IN_FLIGHT` batches await replies;
    /// a reply or `Timer::Paging` takes the next step; a failed batch or a new transition
    /// ends the pass unmarked, and a later round starts over), the server's too.
    pub(super) fn handoff_round(&mut self, now: u64) {
        if self.handoff.is_none() {
            let request_ms = self.config.timings.request_ms;
            let Some(pass) = HandoffPass::start(&self.cluster, &self.me, request_ms) else {
                return;
            };
            self.handoff = Some(pass);
        }
        self.handoff_step(now);
    }

    /// One step of the transition handoff (see [`Node::handoff_round`]).
    pub(super) fn handoff_step(&mut self, now: u64) {
        let Some(mut pass) = self.handoff.take() else {
            return;
        };
        let steps = pass.step(&self.cluster);
        self.handoff_steps(now, pass, steps);
    }

    /// A batch of the transition handoff came back (`ok`: acknowledged).
    pub(super) fn on_transition_handoff_reply(&mut self, now: u64, ok: bool) {
        let Some(mut pass) = self.handoff.take() else {
            return;
        };
        let steps = pass.on_reply(&self.cluster, ok);
        self.handoff_steps(now, pass, steps);
    }

    /// Perform a handoff pass's steps (a page is read at once and fed back).
    fn handoff_steps(&mut self, now: u64, mut pass: HandoffPass, steps: Vec<PassStep>) {
        let mut queue: VecDeque<PassStep> = steps.into();
        while let Some(step) = queue.pop_front() {
            match step {
                PassStep::ScanPage { after } => {
                    let Some(page) = self.scan_page(after.as_deref()) else {
                        return; // the node stopped; never mark a handoff done from a failed scan
                    };
                    let more = pass.on_page(&self.cluster, &self.me, page, |b| self.n_val(b));
                    for step in more.into_iter().rev() {
                        queue.push_front(step);
                    }
                }
                PassStep::Send {
                    to,
                    entries,
                    timeout_ms,
                    ..
                } => {
                    let keys = entries.len() as u64;
                    self.stats.handoff_keys = self.stats.handoff_keys.saturating_add(keys);
                    self.send_handoff(now, &to, entries, Purpose::TransitionHandoff, timeout_ms);
                }
                PassStep::Continue => self.continue_paging(now),
                PassStep::Over => {
                    let me = self.me.clone();
                    let hints_held = !self.replica.hint_counts().is_empty();
                    pass.finish(&mut self.cluster, &me, hints_held);
                    return;
                }
            }
        }
        self.handoff = Some(pass);
    }

    /// Take the next step of paged background work soon (`Timer::Paging`, at most one set).
    fn continue_paging(&mut self, now: u64) {
        if !self.paging_timer_set {
            self.paging_timer_set = true;
            self.outputs.push(Output::SetTimer {
                at_ms: now,
                timer: Timer::Paging,
            });
        }
    }

    /// `Cluster::cleanup_round`: once the ring is settled, every key this node no longer
    /// replicates is sent to its primaries (a write that landed here after the transition's
    /// handoff may exist nowhere else) and dropped once all of them acknowledged, if
    /// unchanged: the core's `CleanupPass` (paged and resumable as the handoff; a ring that
    /// moves during the pass ends it, its keys stay), the server's too.
    pub(super) fn cleanup_round(&mut self, now: u64) {
        if self.cleanup.is_none() {
            let request_ms = self.config.timings.request_ms;
            let Some(pass) = CleanupPass::start(&self.cluster, &self.cleanup_marker, request_ms)
            else {
                return;
            };
            self.cleanup = Some(pass);
        }
        self.cleanup_step(now);
    }

    /// One step of the cleanup pass (see [`Node::cleanup_round`]).
    pub(super) fn cleanup_step(&mut self, now: u64) {
        let Some(mut pass) = self.cleanup.take() else {
            return;
        };
        let steps = pass.step(&self.cluster);
        self.cleanup_steps(now, pass, steps);
    }

    /// Perform a cleanup pass's steps (a page is read at once and fed back).
    fn cleanup_steps(&mut self, now: u64, mut pass: CleanupPass, steps: Vec<PassStep>) {
        let mut queue: VecDeque<PassStep> = steps.into();
        while let Some(step) = queue.pop_front() {
            match step {
                PassStep::ScanPage { after } => {
                    let Some(page) = self.scan_page(after.as_deref()) else {
                        return; // the node stopped
                    };
                    let more = pass.on_page(&self.cluster, &self.me, page, |b| self.n_val(b));
                    for step in more.into_iter().rev() {
                        queue.push_front(step);
                    }
                }
                PassStep::Send {
                    tag,
                    to,
                    entries,
                    timeout_ms,
                } => {
                    let purpose = Purpose::CleanupHandoff { tag };
                    self.send_handoff(now, &to, entries, purpose, timeout_ms);
                }
                PassStep::Continue => self.continue_paging(now),
                PassStep::Over => {
                    // Recorded once the drops are durable (a power loss before would bring
                    // the dropped keys back with the pass recorded as done).
                    self.after_sync(AfterSync::RecordCleanup(pass.into_cleanup()));
                    return;
                }
            }
        }
        self.cleanup = Some(pass);
    }

    /// One `Handoff` batch under this node's ring version.
    pub(super) fn send_handoff(
        &mut self,
        now: u64,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
        purpose: Purpose,
        timeout_ms: u64,
    ) {
        let body = PeerMessage::Handoff {
            entries,
            ring_version: self.cluster.ring.version,
        };
        self.send_request(now, node, body, purpose, timeout_ms);
    }

    /// A cleanup batch came back (`ok`: acknowledged): drop the keys every primary now
    /// acknowledged, if unchanged, and take the next step.
    pub(super) fn on_cleanup_handoff(&mut self, now: u64, tag: u64, ok: bool) {
        let Some(mut pass) = self.cleanup.take() else {
            return;
        };
        for (storage_key, hash) in pass.on_reply(tag, ok) {
            if self.remove_stored_if_unchanged(&storage_key, &hash, false) {
                self.stats.cleanup_dropped += 1;
            } else {
                pass.kept_changed();
            }
        }
        let steps = pass.step(&self.cluster);
        self.cleanup_steps(now, pass, steps);
    }

    /// `Cluster::deliver_hints`: one delivery round (the core's `DeliveryRound`) over the
    /// targets this node holds hints for, one after another within the admission budget
    /// (`set_aae_budget`), unless the previous round is still out; a target that is down
    /// keeps its hints, and a hint whose target no longer replicates its key (or has exited)
    /// goes to the key's current replicas instead.
    pub(super) fn deliver_hints(&mut self, now: u64) {
        if self.hint_round.is_some() {
            return; // the previous round's deliveries are still out
        }
        let targets: BTreeSet<NodeId> = self
            .replica
            .hint_counts()
            .into_iter()
            .map(|(t, _)| NodeId(t))
            .collect();
        let targets = targets
            .into_iter()
            .map(|t| {
                let up = self.is_up(now, &t);
                (t, up)
            })
            .collect();
        let heir = hints::heir(&self.cluster, &self.me, |n| self.is_up(now, n));
        let limits = (HANDOFF_BATCH_KEYS, self.config.timings.request_ms);
        let (round, steps) =
            DeliveryRound::start(&self.cluster, (targets, heir), self.aae_budget, limits);
        self.hint_round = Some(round);
        self.hint_steps(now, steps);
    }

    /// Feed an outcome of `target`'s delivery to the round and perform what it asks.
    pub(super) fn hint_event(&mut self, now: u64, target: &NodeId, event: HintEvent) {
        let Some(mut round) = self.hint_round.take() else {
            return;
        };
        let steps = round.handle(&self.cluster, |bucket| self.n_val(bucket), target, event);
        self.hint_round = Some(round);
        self.hint_steps(now, steps);
    }

    /// Perform a delivery round's steps; a local step's outcome is fed back at once.
    fn hint_steps(&mut self, now: u64, steps: Vec<(NodeId, HintStep)>) {
        for (target, step) in steps {
            let event = match step {
                HintStep::ReadPage { after, limit } => {
                    let page = self.replica.hint_page(&target.0, after.as_deref(), limit);
                    let page = self.must(page, "read hints");
                    if self.failed.is_some() {
                        return;
                    }
                    Some(HintEvent::Page(page))
                }
                HintStep::Send {
                    tag,
                    to,
                    message,
                    timeout_ms,
                } => {
                    if to == self.me {
                        // A moved key this node now replicates: served here, as a peer's put.
                        // Its copy is written before the hint is deleted (one journal: a
                        // durable prefix that holds the deletion holds the copy), and a sync
                        // is asked for.
                        let (reply, _) = self.serve_here(*message);
                        let ok = matches!(reply, PeerMessage::Ack);
                        Some(HintEvent::Reply { tag, ok })
                    } else {
                        let purpose = Purpose::HintDelivery {
                            target: target.clone(),
                            tag,
                        };
                        self.send_request(now, &to, *message, purpose, timeout_ms);
                        None
                    }
                }
                HintStep::Delete {
                    hint_key,
                    held,
                    corrupt,
                } => {
                    let deleted = self.replica.delete_hint_if_unchanged(&hint_key, &held);
                    if self.must(deleted, "delete a hint") {
                        if corrupt {
                            self.stats.hints_corrupt += 1;
                        } else {
                            self.stats.hints_delivered += 1;
                        }
                    }
                    None
                }
            };
            if let Some(event) = event {
                self.hint_event(now, &target, event);
            }
        }
        if self
            .hint_round
            .as_ref()
            .is_some_and(DeliveryRound::finished)
        {
            self.hint_round = None;
        }
    }

    // ----- anti-entropy -----

    /// `Cluster::anti_entropy_round`: each partition this node replicates is compared with
    /// one of its other replicas, in turn; partitions are exchanged one after another.
    /// `Cluster::reap_tombstones`: the tombstones this node is the first primary of, older
    /// than the grace period, are checked with every other member: each primary must hold
    /// exactly the same tombstone, and no member may hold a hint of the key or (outside the
    /// primaries) a copy of it. Only then is each primary asked to delete it (if unchanged),
    /// and this node does. Any member that does not answer blocks the reap.
    pub(super) fn reap_round(&mut self, now: u64) {
        if self.cluster.ring.next.is_some() || self.reap.is_some() {
            return;
        }
        let grace = self.config.tombstone_grace_ms;
        // Through the tombstone list, as the server reads it (the core's).
        // A tombstone's age is by the wall clock (its writes' stamps).
        let wall_ms = self.wall_ms;
        let listed = reap_candidates(&self.replica, wall_ms, grace, MAX_REAPS_PER_ROUND);
        let listed = self.must(listed, "scan tombstones");
        if self.failed.is_some() {
            return;
        }
        let rules = (
            self.config.primaries_only_reap(),
            self.config.timings.request_ms,
        );
        let (round, steps) =
            ReapRound::start(&self.cluster, &self.me, listed, |b| self.n_val(b), rules);
        self.reap = Some(round);
        self.reap_steps(now, steps);
    }

    /// Feed an outcome to the reaping round and perform what it asks.
    pub(super) fn reap_event(&mut self, now: u64, event: ReapEvent) {
        let Some(mut round) = self.reap.take() else {
            return;
        };
        let steps = round.handle(&self.cluster, &self.me, event);
        self.reap = Some(round);
        self.reap_steps(now, steps);
    }

    /// Perform a reaping round's steps; a local read is fed back at once.
    fn reap_steps(&mut self, now: u64, steps: Vec<ReapStep>) {
        for step in steps {
            match step {
                ReapStep::ReadHinted { id, bucket, key } => {
                    let hinted = self.replica.holds_hint(&bucket, &key);
                    let hinted = self.replica_call(hinted, "read hints");
                    if self.failed.is_some() {
                        return;
                    }
                    self.reap_event(now, ReapEvent::Hinted { id, hinted });
                }
                ReapStep::Check {
                    id,
                    to,
                    message,
                    timeout_ms,
                } => {
                    self.send_request(now, &to, message, Purpose::ReapCheck { id }, timeout_ms);
                }
                ReapStep::Reap {
                    to,
                    message,
                    timeout_ms,
                } => {
                    self.send_request(now, &to, message, Purpose::Store, timeout_ms);
                }
                ReapStep::RemoveLocal {
                    bucket,
                    key,
                    expected,
                } => {
                    if self.remove_if_unchanged(&bucket, &key, &expected, true) {
                        self.stats.tombstones_reaped += 1;
                    }
                }
            }
        }
        if self.reap.as_ref().is_some_and(ReapRound::finished) {
            self.reap = None;
        }
    }

    pub(super) fn anti_entropy_round(&mut self, now: u64) {
        if self.aae_run.is_some() {
            return; // the previous round is still running
        }
        self.aae_round += 1;
        let plan = AaeRound::plan(
            &self.cluster,
            &self.me,
            // The exchange plan's replica count is the default properties' (as the server's).
            &self.config.props,
            self.aae_round,
            self.aae_budget,
            |n| self.is_up(now, n),
        );
        let (run, steps) = AaeRun::start(plan, self.config.timings.request_ms);
        self.aae_run = Some(run);
        self.aae_steps(now, steps);
    }

    /// Feed an outcome to the anti-entropy round (the core's `AaeRun`) and perform what it
    /// asks.
    pub(super) fn aae_event(&mut self, now: u64, event: AaeRunEvent) {
        let Some(mut run) = self.aae_run.take() else {
            return;
        };
        let aae = Arc::clone(&self.aae);
        let steps = run.handle(&aae, &self.cluster, &self.me, |b| self.n_val(b), event);
        self.aae_run = Some(run);
        self.aae_steps(now, steps);
    }

    /// Perform an anti-entropy round's steps; a local read is fed back at once.
    fn aae_steps(&mut self, now: u64, steps: Vec<AaeRunStep>) {
        for step in steps {
            if self.failed.is_some() {
                return;
            }
            match step {
                AaeRunStep::Ask {
                    id,
                    to,
                    message,
                    timeout_ms,
                } => {
                    self.send_request(now, &to, message, Purpose::AaeAsk { id }, timeout_ms);
                }
                AaeRunStep::Fetch {
                    id,
                    to,
                    message,
                    timeout_ms,
                } => {
                    self.send_request(now, &to, message, Purpose::AaeFetch { id }, timeout_ms);
                }
                AaeRunStep::ReadLeafKeys {
                    id,
                    partition,
                    leaves,
                } => {
                    let keys = self
                        .aae
                        .leaf_keys(partition, &leaves, MAX_AAE_KEYS_PER_EXCHANGE)
                        .map(|(keys, _cut)| keys);
                    self.aae_event(now, AaeRunEvent::LeafKeys { id, keys });
                }
                AaeRunStep::ReadLocal { id, bucket, key } => {
                    // A local copy that cannot be read is skipped, like a failed fetch.
                    let object = self.read(&bucket, &key).ok();
                    self.aae_event(now, AaeRunEvent::Local { id, object });
                }
                AaeRunStep::Repair {
                    bucket,
                    key,
                    merged,
                    store_local,
                    remote,
                } => {
                    if store_local {
                        let me = self.me.clone();
                        self.store_replica(now, &me, &bucket, &key, &merged);
                    }
                    if let Some((to, message, timeout_ms)) = remote {
                        self.send_request(now, &to, message, Purpose::Store, timeout_ms);
                    }
                    if self.failed.is_none() {
                        self.stats.aae_repairs += 1;
                    }
                }
                AaeRunStep::Exchanged {
                    partition,
                    peer,
                    repaired,
                } => {
                    // As the server's records for `admin aae`: completed exchanges only.
                    let record = self.aae_records.entry(partition).or_default();
                    record.completed(now, &peer, repaired);
                    self.stats.aae_exchanges = self.stats.aae_exchanges.saturating_add(1);
                }
                AaeRunStep::Over { .. } => self.aae_run = None,
            }
        }
    }
}
