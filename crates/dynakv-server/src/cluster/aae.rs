//! Active anti-entropy (paper 4.7): Merkle exchanges with a peer per partition and the
//! repair of the keys that differ (the core's `AaeRound`/`AaeExchange`).

use super::{
    AaeAsk, AaeExchange, AaeRound, AaeStep, Arc, BucketKey, Cluster, ClusterError, Durability,
    Hash, MAX_AAE_KEYS_PER_EXCHANGE, NodeId, ReplicaRun, internal, partition_of,
};

impl Cluster {
    /// The keys this node stores in the given leaves of a partition, with their entry hashes.
    pub(super) async fn local_leaf_keys(
        &self,
        partition: u32,
        leaves: Vec<u16>,
    ) -> Result<(Vec<(String, String, Hash)>, bool), ClusterError> {
        let aae = Arc::clone(&self.aae);
        let leaves: std::collections::BTreeSet<u16> = leaves.into_iter().collect();
        // A scan (it may wait for the write buffer to drain): on the blocking pool.
        tokio::task::spawn_blocking(move || {
            aae.leaf_keys(partition, &leaves, MAX_AAE_KEYS_PER_EXCHANGE)
        })
        .await
        .map_err(internal)?
        .map_err(ClusterError::Internal)
    }

    /// Ask `peer` one anti-entropy question of an exchange of `partition`.
    /// Ask `peer` one anti-entropy question of `exchange` and feed its answer to the core's
    /// `AaeExchange::on_answer` (as the simulator does).
    pub(super) async fn aae_step(
        &self,
        peer: &NodeId,
        exchange: &mut AaeExchange<BucketKey>,
        ask: AaeAsk,
    ) -> Result<AaeStep<BucketKey>, ClusterError> {
        let partition = exchange.partition();
        // Listing a leaf's keys may read many index entries: more time, and our side is read
        // on the blocking pool before the answer is fed.
        let (timeout, ours) = match &ask {
            AaeAsk::Keys(leaves) => (
                self.timeouts.request * 5,
                Some(self.local_leaf_keys(partition, leaves.clone()).await?.0),
            ),
            _ => (self.timeouts.request, None),
        };
        let answer = self.send(peer, ask.message(partition), timeout).await?;
        let state = self.state();
        exchange
            .on_answer(
                &self.aae,
                answer,
                |_| ours.ok_or_else(|| "keys answered to another question".to_owned()),
                |(bucket, key)| {
                    let n_val = self.bucket_props(bucket).n_val;
                    let replicas = state.preference_list(partition_of(&state, bucket, key), n_val);
                    replicas.contains(&self.me) && replicas.contains(peer)
                },
            )
            .map_err(|e| ClusterError::Internal(format!("{peer}: {e}")))
    }

    /// Compare one partition with one peer and repair the keys that differ: both sides end
    /// with the `sync` of their versions. The steps and the budget are the core's
    /// `AaeExchange`; this performs them. Returns the number of keys repaired.
    pub(super) async fn exchange(
        &self,
        peer: &NodeId,
        mut exchange: AaeExchange<BucketKey>,
        ask: AaeAsk,
    ) -> Result<usize, ClusterError> {
        let mut step = self.aae_step(peer, &mut exchange, ask).await?;
        loop {
            step = match step {
                AaeStep::Done { repaired } => return Ok(repaired),
                AaeStep::Ask(ask) => self.aae_step(peer, &mut exchange, ask).await?,
                AaeStep::Compare(keys) => {
                    self.repair_keys(peer, &mut exchange, keys).await?;
                    exchange.finish()
                }
            };
        }
    }

    /// Read both versions of each key an exchange listed and perform its repairs.
    pub(super) async fn repair_keys(
        &self,
        peer: &NodeId,
        exchange: &mut AaeExchange<BucketKey>,
        keys: Vec<BucketKey>,
    ) -> Result<(), ClusterError> {
        let ring_version = self.state().ring.version;
        let mut stored = false;
        for bucket_key in keys {
            if exchange.compared_all() {
                break;
            }
            let (bucket, key) = &bucket_key;
            let local = self
                .fetch_replica(&self.me, bucket, key, ring_version, None)
                .await;
            let remote = self
                .fetch_replica(peer, bucket, key, ring_version, None)
                .await;
            let (Ok(local), Ok(remote)) = (local, remote) else {
                exchange.skip(&bucket_key);
                continue;
            };
            let Some(repair) = exchange.on_versions(&bucket_key, local.as_ref(), remote.as_ref())
            else {
                continue;
            };
            let props = self.bucket_props(bucket);
            let encoded = repair.merged.encode();
            for (node, wanted) in [(&self.me, repair.store_local), (peer, repair.store_remote)] {
                if wanted {
                    self.store_replica(
                        node,
                        bucket,
                        key,
                        &repair.merged,
                        &encoded,
                        &props,
                        Durability::Buffered,
                    )
                    .await?;
                    stored |= *node == self.me;
                }
            }
        }
        if stored {
            // A sync may wait on the disk: run as the engine says (the blocking pool when so).
            let storage = Arc::clone(self.replica.storage());
            self.replica
                .run(Some(Durability::Fsync), move || storage.sync())
                .await
                .map_err(internal)?
                .map_err(internal)?;
        }
        Ok(())
    }

    /// One anti-entropy round: every partition this node replicates is compared with one of
    /// its other replicas (in turn), within the admission-control budget of repaired keys
    /// (the core's `AaeRound`). Skipped during ring transitions. Returns the number of keys
    /// repaired.
    pub async fn anti_entropy_round(&self, round: usize) -> usize {
        let budget = self.admission.budget();
        let mut plan = self.aae_plan(round, budget);
        while let Some((peer, exchange, ask)) = plan.next_exchange() {
            let partition = exchange.partition();
            match self.exchange(&peer, exchange, ask).await {
                Ok(repaired) => {
                    plan.finished(repaired);
                    let now_ms = self.monotonic_ms();
                    let mut records = self.aae_records.lock();
                    let record = records.entry(partition).or_default();
                    record.completed(now_ms, &peer, repaired);
                }
                Err(e) => {
                    tracing::debug!(partition, %peer, error = %e, "anti-entropy exchange failed");
                }
            }
        }
        let repaired_total = plan.repaired();
        if repaired_total > 0 {
            tracing::info!(keys = repaired_total, budget, "anti-entropy repaired keys");
        }
        repaired_total
    }

    /// The exchanges of anti-entropy round `round` (the core's `AaeRound`, planned with the
    /// default properties' `n_val`, as `Node` plans it).
    pub(super) fn aae_plan(&self, round: usize, budget: usize) -> AaeRound {
        AaeRound::plan(
            &self.state(),
            &self.me,
            &self.default_props,
            round,
            budget,
            |n| self.is_up(n),
        )
    }
}
