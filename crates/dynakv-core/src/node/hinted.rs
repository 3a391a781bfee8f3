//! A node's hint delivery rounds (the core's `DeliveryRound`).
//!
//! Invariant: a hint is deleted only after its destination acknowledged it and only if
//! unchanged.

use super::{
    BTreeSet, DeliveryRound, HANDOFF_BATCH_KEYS, HintEvent, HintStep, Node, NodeId, PeerMessage,
    Purpose,
};
use crate::hints;

impl Node {
    /// One delivery round (the core's `DeliveryRound`) over the
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
        let (round, steps) = DeliveryRound::start(
            &self.cluster,
            (targets, heir),
            self.anti_entropy.budget,
            limits,
        );
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
}
