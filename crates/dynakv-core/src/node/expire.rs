//! A node's expiry sweep (the core's `ExpiryRound`, `crate::expiry`): every
//! `Timings::expiry_interval_ms`, the keys due by this node's wall clock that it is the
//! first up primary of are read at quorum and, when every value they hold expired, deleted
//! by a tombstone with the read's context, both through the request machines a client's get
//! and put use (so the write is coordinated, replicated, hinted and read-repaired as any
//! delete).

use super::{
    ExpiryEvent, ExpiryRound, ExpiryStep, GetRequest, Machine, Node, NodeView, PutRequest,
};
use super::{Output, ReplyTo, Timer, keys};

/// Completions nested deeper than this set the round's next steps aside for a
/// `Timer::ExpiryResume` at once: a key whose read and tombstone complete locally (a bucket
/// with `n_val` 1, or R = W = 1 and buffered writes) answers inside the call that started
/// it, and a round of a thousand such keys would otherwise recurse a thousand times.
pub(super) const MAX_EXPIRY_DEPTH: u32 = 16;

impl Node {
    /// Start a round unless one is running.
    pub(super) fn expiry_round(&mut self, now: u64) {
        if self.expiry.is_some() || self.failed.is_some() {
            return;
        }
        let (round, steps) = ExpiryRound::start();
        self.expiry = Some(round);
        self.expiry_steps(now, steps);
    }

    /// Feed an outcome to the round and perform what it asks.
    pub(super) fn expiry_event(&mut self, now: u64, event: ExpiryEvent) {
        let Some(mut round) = self.expiry.take() else {
            return;
        };
        let before = round.removed();
        let wall_ms = self.wall_ms;
        let steps = round.handle(event, wall_ms, |bucket, key| {
            let primaries = self.primaries(bucket, key);
            crate::expiry::sweeps_here(&primaries, &self.me, |n| self.is_up(now, n))
        });
        self.stats.expired_removed += round.removed() - before;
        self.expiry = Some(round);
        if self.expiry_depth >= MAX_EXPIRY_DEPTH {
            self.expiry_stash.extend(steps);
            self.outputs.push(Output::SetTimer {
                at_ms: now,
                timer: Timer::ExpiryResume,
            });
            return;
        }
        self.expiry_depth += 1;
        self.expiry_steps(now, steps);
        self.expiry_depth -= 1;
    }

    /// Carry out the steps set aside by a deep chain of completions.
    pub(super) fn expiry_resume(&mut self, now: u64) {
        let steps = std::mem::take(&mut self.expiry_stash);
        if self.expiry.is_some() && !steps.is_empty() {
            self.expiry_steps(now, steps);
        }
    }

    /// Perform the round's steps: a scan is read at once and fed back; a read or a write
    /// starts a request machine whose answer comes back through `perform`.
    fn expiry_steps(&mut self, now: u64, steps: Vec<ExpiryStep>) {
        for step in steps {
            match step {
                ExpiryStep::Scan { after, limit } => {
                    let page = self
                        .replica
                        .expired_keys(self.wall_ms, after.as_deref(), limit);
                    let page = self.must(page, "scan expiry");
                    if self.failed.is_some() {
                        self.expiry = None;
                        return;
                    }
                    self.expiry_event(now, ExpiryEvent::Scanned(page));
                }
                ExpiryStep::Read { bucket, key } => {
                    let view = NodeView { node: self, now };
                    // R and PR are the bucket's.
                    let (get, steps) = GetRequest::start(&view, &bucket, &key, (None, None));
                    self.start_request(now, Machine::Get(get), ReplyTo::Expiry, steps);
                }
                ExpiryStep::Write(op) if !self.config.expiry_writes_tombstones() => {
                    // The planted bug: drop this node's copy, write nothing.
                    let storage_key = keys::object_key(op.bucket.as_bytes(), op.key.as_bytes());
                    let dropped = self.replica.remove(&storage_key);
                    let dropped = self.replica_call(dropped, "drop an expired key");
                    self.expiry_event(now, ExpiryEvent::Written(dropped.is_some()));
                }
                ExpiryStep::Write(op) => {
                    let view = NodeView { node: self, now };
                    let (put, steps) = PutRequest::start(&view, *op, self.wall_ms);
                    self.start_request(now, Machine::Put(put), ReplyTo::Expiry, steps);
                }
            }
        }
        if self.expiry.as_ref().is_some_and(ExpiryRound::finished) {
            self.expiry = None;
        }
    }
}
