//! A node's tombstone reaping rounds (the core's `ReapRound`).

use super::{MAX_REAPS_PER_ROUND, Node, Purpose, ReapEvent, ReapRound, ReapStep, reap_candidates};

impl Node {
    /// Reaping: the tombstones this node is the first primary of, older
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
}
