//! Hinted handoff (paper 4.6): hints this node keeps for replicas that missed a write, and
//! their delivery once the target is reachable (the core's `HintRound` routes them).

use super::{
    Arc, Cluster, ClusterError, Durability, Duration, HANDOFF_BATCH_KEYS, HintStats,
    MAX_HINTS_PER_TARGET, NodeId, Object, Ordering, PeerMessage, internal, serve,
};
use dynakv_core::hints::{DeliveryRound, HintEvent, HintStep};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;

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

    /// Deliver the hints held for nodes that are reachable again: one round of the core's
    /// `DeliveryRound` (the simulator's too) over the targets, one after another, within the
    /// admission-control budget of hints; a hint is deleted only after its destination
    /// acknowledged it (and only if it did not change meanwhile). Hints for a key whose
    /// preference list no longer names their target go to its current replicas. Returns the
    /// number of hints delivered.
    pub async fn deliver_hints(&self) -> Result<usize, ClusterError> {
        let mut delivered = 0;
        let budget = self.admission.budget();
        let request_ms = u64::try_from(self.timeouts.request.as_millis()).unwrap_or(u64::MAX);
        let targets = self
            .replica
            .hint_counts()
            .into_iter()
            .map(|(target, _)| {
                let target = NodeId(target);
                let up = self.is_up(&target);
                (target, up)
            })
            .collect();
        let state = self.state();
        let heir = dynakv_core::hints::heir(&state, &self.me, |n| self.is_up(n));
        let limits = (HANDOFF_BATCH_KEYS, request_ms);
        let (mut round, steps) = DeliveryRound::start(&state, (targets, heir), budget, limits);
        let mut queue: VecDeque<(NodeId, HintStep)> = steps.into();
        let mut sends = FuturesUnordered::new();
        loop {
            while let Some((target, step)) = queue.pop_front() {
                let event = match step {
                    HintStep::ReadPage { after, limit } => {
                        let replica = Arc::clone(&self.replica);
                        let t = target.0.clone();
                        let page = tokio::task::spawn_blocking(move || {
                            replica.hint_page(&t, after.as_deref(), limit)
                        })
                        .await
                        .map_err(internal)??;
                        Some(HintEvent::Page(page))
                    }
                    HintStep::Send {
                        tag,
                        to,
                        message,
                        timeout_ms,
                    } => {
                        let timeout = Duration::from_millis(timeout_ms);
                        let target = target.clone();
                        sends.push(async move {
                            let ok = self.send_hint(to, *message, timeout).await;
                            (target, tag, ok)
                        });
                        None
                    }
                    HintStep::Delete {
                        hint_key,
                        held,
                        corrupt,
                    } => {
                        if corrupt {
                            tracing::error!(%target, error = "checksum", "corrupt hint removed undelivered; anti-entropy repairs its key");
                        }
                        if self.drop_hint(&hint_key, &held).await? {
                            if corrupt {
                                self.hints.corrupt.fetch_add(1, Ordering::Relaxed);
                            } else {
                                delivered += 1;
                            }
                        }
                        None
                    }
                };
                if let Some(event) = event {
                    let steps = self.hint_handle(&mut round, &target, event);
                    for step in steps.into_iter().rev() {
                        queue.push_front(step);
                    }
                }
            }
            let Some((target, tag, ok)) = sends.next().await else {
                break;
            };
            let event = HintEvent::Reply { tag, ok };
            queue.extend(self.hint_handle(&mut round, &target, event));
        }
        if delivered > 0 {
            self.hints
                .delivered
                .fetch_add(delivered as u64, Ordering::Relaxed);
            tracing::info!(hints = delivered, "hints delivered");
        }
        Ok(delivered)
    }

    fn hint_handle(
        &self,
        round: &mut DeliveryRound,
        target: &NodeId,
        event: HintEvent,
    ) -> Vec<(NodeId, HintStep)> {
        let state = self.state();
        round.handle(&state, |b| self.bucket_props(b).n_val, target, event)
    }

    /// Send one message of a hint delivery run; `true` when it was acknowledged. A message
    /// for this node (a moved key it now replicates) is served here, as a peer's would be.
    pub(super) async fn send_hint(
        &self,
        to: NodeId,
        message: PeerMessage,
        timeout: Duration,
    ) -> bool {
        if to == self.me {
            let Some(call) = serve::storage_call(&message) else {
                return false;
            };
            return matches!(
                self.serve_locally(call, message).await,
                Ok(PeerMessage::Ack)
            );
        }
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
