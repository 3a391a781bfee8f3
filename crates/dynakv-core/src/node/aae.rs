//! A node's anti-entropy rounds (the core's `AaeRun`).

use super::{
    AaeRecord, AaeRound, AaeRun, AaeRunEvent, AaeRunStep, Arc, BTreeMap, MAX_AAE_KEYS_PER_EXCHANGE,
    Node, PartitionId, Purpose,
};

/// What a node's anti-entropy keeps between rounds.
#[derive(Debug)]
pub(super) struct AntiEntropy {
    /// Rounds started (which partitions a round exchanges turns with it).
    pub(super) round: usize,
    /// The round in progress (at most one).
    pub(super) run: Option<AaeRun>,
    /// Keys one round may repair (admission control: the driver lowers it while foreground
    /// latency is high).
    pub(super) budget: usize,
    /// Completed exchanges per partition (volatile, as in the server).
    pub(super) records: BTreeMap<PartitionId, AaeRecord>,
}

impl Default for AntiEntropy {
    fn default() -> Self {
        AntiEntropy {
            round: 0,
            run: None,
            budget: MAX_AAE_KEYS_PER_EXCHANGE,
            records: BTreeMap::new(),
        }
    }
}

impl AntiEntropy {
    /// After a restart: no round in progress, no records (the round count and the budget
    /// stay).
    pub(super) fn restart(&mut self) {
        self.run = None;
        self.records.clear();
    }
}

impl Node {
    /// One anti-entropy round: each partition this node replicates is compared with
    /// one of its other replicas, in turn; partitions are exchanged one after another.
    pub(super) fn anti_entropy_round(&mut self, now: u64) {
        if self.anti_entropy.run.is_some() {
            return; // the previous round is still running
        }
        self.anti_entropy.round += 1;
        let plan = AaeRound::plan(
            &self.cluster,
            &self.me,
            // The exchange plan's replica count is the default properties' (as the server's).
            &self.config.props,
            self.anti_entropy.round,
            self.anti_entropy.budget,
            |n| self.is_up(now, n),
        );
        let (run, steps) = AaeRun::start(plan, self.config.timings.request_ms);
        self.anti_entropy.run = Some(run);
        self.aae_steps(now, steps);
    }

    /// Feed an outcome to the anti-entropy round (the core's `AaeRun`) and perform what it
    /// asks.
    pub(super) fn aae_event(&mut self, now: u64, event: AaeRunEvent) {
        let Some(mut run) = self.anti_entropy.run.take() else {
            return;
        };
        let aae = Arc::clone(&self.aae);
        let steps = run.handle(&aae, &self.cluster, &self.me, |b| self.n_val(b), event);
        self.anti_entropy.run = Some(run);
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
                    let record = self.anti_entropy.records.entry(partition).or_default();
                    record.completed(now, &peer, repaired);
                    self.stats.aae_exchanges = self.stats.aae_exchanges.saturating_add(1);
                }
                AaeRunStep::Over { .. } => self.anti_entropy.run = None,
            }
        }
    }
}
