//! Hinted handoff (paper 4.6): hints this node keeps for replicas that missed a write, and
//! their delivery once the target is reachable (the core's `HintRound` routes them).

use super::{
    Arc, Cluster, ClusterError, Durability, HANDOFF_BATCH_KEYS, HintRound, HintSend, HintStats,
    MAX_HINTS_PER_TARGET, NodeId, Object, Ordering, PeerMessage, internal, serve,
};

impl Cluster {
    /// Keep a version here as a hint for `target`, within the per-target bound.
    pub(crate) async fn keep_hint(
        &self,
        target: &NodeId,
        bucket: &str,
        key: &str,
        object: &Object,
        durability: Durability,
    ) {
        if target == &self.me {
            return;
        }
        let replica = Arc::clone(&self.replica);
        let (target_name, bucket_name, key_name, object) = (
            target.0.clone(),
            bucket.to_owned(),
            key.to_owned(),
            object.clone(),
        );
        let stored = tokio::task::spawn_blocking(move || {
            replica.store_hint(
                &target_name,
                &bucket_name,
                &key_name,
                &object,
                MAX_HINTS_PER_TARGET,
                durability,
            )
        })
        .await;
        match stored {
            Ok(Ok(true)) => {
                self.hints.stored.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(false)) => {
                self.hints.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%target, limit = MAX_HINTS_PER_TARGET, "hint store for this node is full: relying on read repair and anti-entropy");
            }
            Ok(Err(e)) => tracing::error!(%target, error = %e, "cannot store a hint"),
            Err(e) => tracing::error!(%target, error = %e, "hint task failed"),
        }
    }

    /// Deliver the hints held for nodes that are reachable again; a hint is deleted only after
    /// its destination acknowledged it (and only if it did not change meanwhile). Hints for a
    /// key whose preference list no longer names their target go to its current replicas.
    /// Returns the number of hints delivered.
    pub async fn deliver_hints(&self) -> Result<usize, ClusterError> {
        let mut delivered = 0;
        // Admission control: at most the background budget of hints per round.
        let budget = self.admission.budget();
        for (target, _) in self.replica.hint_counts() {
            let target_id = NodeId(target.clone());
            let state = self.state();
            let up = self.is_up(&target_id);
            let Some(mut round) =
                HintRound::start(&state, &target_id, up, budget.saturating_sub(delivered))
            else {
                continue;
            };
            let mut start_after: Option<Vec<u8>> = None;
            while round.wants_more() {
                let replica = Arc::clone(&self.replica);
                let (t, after) = (target.clone(), start_after.clone());
                let page = tokio::task::spawn_blocking(move || {
                    replica.hint_page(&t, after.as_deref(), HANDOFF_BATCH_KEYS)
                })
                .await
                .map_err(internal)??;
                let Some((last, _)) = page.last() else { break };
                start_after = Some(last.clone());
                let full = page.len() == HANDOFF_BATCH_KEYS;
                // Routing (the core's, shared with the simulator): one batch to the target,
                // a `ReplicaPut` per current replica of a key that moved.
                let routed = round.route_page(page, &state, |b| self.bucket_props(b).n_val);
                for (hint_key, bytes) in &routed.corrupt {
                    tracing::error!(%target, error = "checksum", "corrupt hint removed undelivered; anti-entropy repairs its key");
                    if self.drop_hint(hint_key, bytes).await? {
                        self.hints.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let mut released = Vec::new();
                for send in routed.sends {
                    let hints = send.hints.clone();
                    let ok = self.send_hint(send).await;
                    released.extend(round.on_reply(&hints, ok));
                }
                for (hint_key, bytes) in released {
                    if self.drop_hint(&hint_key, &bytes).await? {
                        delivered += 1;
                    }
                }
                if !full || routed.budget_spent {
                    break;
                }
            }
        }
        if delivered > 0 {
            self.hints
                .delivered
                .fetch_add(delivered as u64, Ordering::Relaxed);
            tracing::info!(hints = delivered, "hints delivered");
        }
        Ok(delivered)
    }

    /// Send one message of a hint delivery round; `true` when it was acknowledged. A message
    /// for this node (a moved key it now replicates) is served here, as a peer's would be.
    pub(super) async fn send_hint(&self, send: HintSend) -> bool {
        let HintSend { to, message, .. } = send;
        if to == self.me {
            let Some(call) = serve::storage_call(&message) else {
                return false;
            };
            return matches!(
                self.serve_locally(call, message).await,
                Ok(PeerMessage::Ack)
            );
        }
        let timeout = if matches!(message, PeerMessage::Handoff { .. }) {
            self.timeouts.request * 5
        } else {
            self.timeouts.request
        };
        match self.send_write_within(&to, message, timeout).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(node = %to, error = %e, "hint delivery failed; will retry");
                false
            }
        }
    }

    pub(super) async fn drop_hint(
        &self,
        hint_key: &[u8],
        delivered: &[u8],
    ) -> Result<bool, ClusterError> {
        let replica = Arc::clone(&self.replica);
        let (k, d) = (hint_key.to_vec(), delivered.to_vec());
        Ok(
            tokio::task::spawn_blocking(move || replica.delete_hint_if_unchanged(&k, &d))
                .await
                .map_err(internal)??,
        )
    }

    /// Hint counters and the hinted keys held per target.
    pub fn hint_stats(&self) -> HintStats {
        HintStats {
            stored_total: self.hints.stored.load(Ordering::Relaxed),
            delivered_total: self.hints.delivered.load(Ordering::Relaxed),
            dropped_total: self.hints.dropped.load(Ordering::Relaxed),
            corrupt_total: self.hints.corrupt.load(Ordering::Relaxed),
            per_target: self.replica.hint_counts(),
        }
    }
}
