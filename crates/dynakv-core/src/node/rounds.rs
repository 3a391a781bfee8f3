//! The timer-driven work of a `Node`: the timers' dispatch, gossip and joins. Each
//! background round has its own module: `passes` (transition handoff, cleanup), `hinted`
//! (hint delivery), `reap` (tombstone reaping), `expire` (the expiry sweep), `aae`
//! (anti-entropy).

use super::{ClientRequestId, ClusterState, Node, NodeId, Output, PeerMessage, Purpose, Timer};
use crate::gossip;

/// A join in progress.
#[derive(Debug, Default)]
pub(super) struct Joining {
    /// Until a join is accepted: the members to ask, in turn (the operator retrying).
    pub(super) via: Vec<NodeId>,
    pub(super) attempts: usize,
    /// A join request is out.
    pub(super) pending: bool,
    /// The client request that asked for the join in progress (answered once, no retry).
    pub(super) client: Option<ClientRequestId>,
}

impl Joining {
    /// After a restart: no request out, no client waiting (whom to ask stays).
    pub(super) fn restart(&mut self) {
        self.pending = false;
        self.client = None;
    }
}

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
                self.passes.paging_timer_set = false;
                self.handoff_step(now);
                self.cleanup_step(now);
            }
            Timer::Expiry => {
                self.expiry_round(now);
                self.outputs.push(Output::SetTimer {
                    at_ms: now + self.config.timings.expiry_interval_ms,
                    timer: Timer::Expiry,
                });
            }
            Timer::ExpiryResume => self.expiry_resume(now),
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

    /// The one-second background round: `handoff_round` and `cleanup_round`, then gossip
    /// (beat, exchange with a member that has not exited, then plan when claimant). The
    /// claimant plans once this round's exchange is over (its reply merged, or failed:
    /// [`Node::after_gossip_exchange`]): the plan then
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
        // This node has the bucket types its state holds: say so (activation waits for every
        // member's mark).
        crate::bucket_types::acknowledge(&mut self.cluster, &self.me);
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

    /// Ask a member (in turn) to admit this node.
    pub(super) fn send_join(&mut self, now: u64) {
        if self.joining.pending || self.joining.via.is_empty() {
            return;
        }
        // A node founds its own cluster with its entry (`Node::joining`).
        let Some(body) = gossip::join_request(&self.cluster, &self.me) else {
            return;
        };
        let via = self.joining.via[self.joining.attempts % self.joining.via.len()].clone();
        self.joining.attempts += 1;
        self.joining.pending = true;
        let timeout = self.config.timings.request_ms;
        self.send_request(now, &via, body, Purpose::Join, timeout);
    }
}
