//! Active anti-entropy (paper 4.7): one round of Merkle exchanges with a peer per partition
//! and the repair of the keys that differ, as the core's `AaeRun` says (the simulator's
//! `Node` drives the same machine); this performs its steps.

use super::{
    AaeRound, Arc, Cluster, Duration, MAX_AAE_KEYS_PER_EXCHANGE, NodeId, PeerMessage, ReplicaRun,
};
use dynakv_core::aae_run::{AaeRun, AaeRunEvent, AaeRunStep};
use dynakv_core::storage::Durability;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;

/// What a request of the round was.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Ask(u64),
    Fetch(u64),
    /// A repair's write to the peer: fire and forget.
    Store,
}

impl Cluster {
    /// One anti-entropy round: every partition this node replicates is compared with one of
    /// its other replicas (in turn), within the admission-control budget of repaired keys
    /// (the core's `AaeRound`, run by `AaeRun`). Skipped during ring transitions. Returns the
    /// number of keys repaired.
    pub async fn anti_entropy_round(&self, round: usize) -> usize {
        let budget = self.admission.budget();
        let plan = self.aae_plan(round, budget);
        let request_ms = u64::try_from(self.timeouts.request.as_millis()).unwrap_or(u64::MAX);
        let (mut run, steps) = AaeRun::start(plan, request_ms);
        let mut queue: VecDeque<AaeRunStep> = steps.into();
        let mut sends = FuturesUnordered::new();
        loop {
            while let Some(step) = queue.pop_front() {
                let event = match step {
                    AaeRunStep::Ask {
                        id,
                        to,
                        message,
                        timeout_ms,
                    } => {
                        sends.push(self.aae_send(Sent::Ask(id), to, message, timeout_ms));
                        None
                    }
                    AaeRunStep::Fetch {
                        id,
                        to,
                        message,
                        timeout_ms,
                    } => {
                        sends.push(self.aae_send(Sent::Fetch(id), to, message, timeout_ms));
                        None
                    }
                    AaeRunStep::ReadLeafKeys {
                        id,
                        partition,
                        leaves,
                    } => {
                        // A scan (it may wait for the write buffer to drain): on the blocking
                        // pool.
                        let aae = Arc::clone(&self.aae);
                        let keys = tokio::task::spawn_blocking(move || {
                            aae.leaf_keys(partition, &leaves, MAX_AAE_KEYS_PER_EXCHANGE)
                                .map(|(keys, _cut)| keys)
                        })
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()));
                        Some(AaeRunEvent::LeafKeys { id, keys })
                    }
                    AaeRunStep::ReadLocal { id, bucket, key } => {
                        let replica = Arc::clone(&self.replica);
                        let object = match self
                            .replica
                            .run(None, move || replica.get(&bucket, &key))
                            .await
                        {
                            Ok(Ok(object)) => Some(object),
                            _ => None, // skipped, like a failed fetch
                        };
                        Some(AaeRunEvent::Local { id, object })
                    }
                    AaeRunStep::Repair {
                        bucket,
                        key,
                        merged,
                        store_local,
                        remote,
                    } => {
                        if store_local {
                            let props = self.bucket_props(&bucket);
                            let merged = self
                                .merge_local(&bucket, &key, &merged, &props, Durability::Buffered)
                                .await;
                            if let Err(e) = merged {
                                tracing::debug!(%bucket, %key, error = %e, "anti-entropy repair of the local copy failed");
                            }
                        }
                        if let Some((to, message, timeout_ms)) = remote {
                            sends.push(self.aae_send(Sent::Store, to, message, timeout_ms));
                        }
                        None
                    }
                    AaeRunStep::Exchanged {
                        partition,
                        peer,
                        repaired,
                    } => {
                        let now_ms = self.monotonic_ms();
                        let mut records = self.aae_records.lock();
                        let record = records.entry(partition).or_default();
                        record.completed(now_ms, &peer, repaired);
                        None
                    }
                    AaeRunStep::Over { repaired } => {
                        if repaired > 0 {
                            tracing::info!(keys = repaired, budget, "anti-entropy repaired keys");
                        }
                        None
                    }
                };
                if let Some(event) = event {
                    let more = self.aae_handle(&mut run, event);
                    for step in more.into_iter().rev() {
                        queue.push_front(step);
                    }
                }
            }
            if run.finished() {
                break;
            }
            let Some(event) = sends.next().await else {
                break;
            };
            if let Some(event) = event {
                queue.extend(self.aae_handle(&mut run, event));
            }
        }
        // What is still in flight (repairs' writes, fetches of an exchange that ended at its
        // budget) finishes within its timeout; the round ends after it.
        while sends.next().await.is_some() {}
        run.repaired()
    }

    fn aae_handle(&self, run: &mut AaeRun, event: AaeRunEvent) -> Vec<AaeRunStep> {
        let state = self.state();
        run.handle(
            &self.aae,
            &state,
            &self.me,
            |b| self.bucket_props(b).n_val,
            event,
        )
    }

    /// Send one request of the round and turn its reply into the event to feed back.
    async fn aae_send(
        &self,
        sent: Sent,
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    ) -> Option<AaeRunEvent> {
        let reply = self
            .send(&to, message, Duration::from_millis(timeout_ms))
            .await;
        if let Err(e) = &reply {
            tracing::debug!(peer = %to, error = %e, "anti-entropy request failed");
        }
        match sent {
            Sent::Ask(id) => Some(AaeRunEvent::Answer {
                id,
                answer: reply.ok(),
            }),
            Sent::Fetch(id) => Some(AaeRunEvent::fetched(id, reply.ok())),
            Sent::Store => None,
        }
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
