//! Tombstone reaping: a tombstone every primary (and every hint) holds identically, older
//! than the grace period, is removed everywhere: the core's `ReapRound` (over `ReapCheck`),
//! the simulator's too.

use super::{
    Arc, Cluster, ClusterError, Duration, MAX_REAPS_PER_ROUND, Ordering, PeerMessage, ReapAnswer,
    internal, reap_candidates,
};
use dynakv_core::keys;
use dynakv_core::reaping::{ReapEvent, ReapRound, ReapStep};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;

impl Cluster {
    /// Reap tombstones older than `grace_ms` that every primary holds identically: this node
    /// handles the keys it is the first primary of, checks that each of the N primaries stores
    /// exactly the same tombstone and that no member keeps a hint of the key or (outside the
    /// primaries) a copy (a hint or stray copy of an older version delivered after the reap
    /// would bring the deleted value back; a member that does not answer blocks the reap),
    /// then has each delete it (only if unchanged). Returns the number of keys reaped here.
    pub async fn reap_tombstones(&self, grace_ms: u64) -> Result<usize, ClusterError> {
        if self.state().ring.next.is_some() {
            return Ok(0);
        }
        let now = self.now_ms();
        let replica = Arc::clone(&self.replica);
        let candidates = tokio::task::spawn_blocking(move || {
            reap_candidates(&replica, now, grace_ms, MAX_REAPS_PER_ROUND)
        })
        .await
        .map_err(internal)??;
        let request_ms = u64::try_from(self.timeouts.request.as_millis()).unwrap_or(u64::MAX);
        let state = self.state();
        let (mut round, steps) = ReapRound::start(
            &state,
            &self.me,
            candidates,
            |b| self.bucket_props(b).n_val,
            (false, request_ms),
        );
        let mut reaped = 0;
        let mut queue: VecDeque<ReapStep> = steps.into();
        let mut sends = FuturesUnordered::new();
        loop {
            while let Some(step) = queue.pop_front() {
                match step {
                    ReapStep::ReadHinted { id, bucket, key } => {
                        let replica = Arc::clone(&self.replica);
                        let hinted =
                            tokio::task::spawn_blocking(move || replica.holds_hint(&bucket, &key))
                                .await;
                        let hinted = match hinted {
                            Ok(Ok(hinted)) => Some(hinted),
                            _ => None,
                        };
                        let event = ReapEvent::Hinted { id, hinted };
                        let more = round.handle(&self.state(), &self.me, event);
                        for step in more.into_iter().rev() {
                            queue.push_front(step);
                        }
                    }
                    step @ (ReapStep::Check { .. } | ReapStep::Reap { .. }) => {
                        sends.push(self.reap_send(step));
                    }
                    ReapStep::RemoveLocal {
                        bucket,
                        key,
                        expected,
                    } => {
                        let replica = Arc::clone(&self.replica);
                        let storage_key = keys::object_key(bucket.as_bytes(), key.as_bytes());
                        let removed = tokio::task::spawn_blocking(move || {
                            replica.remove_if_unchanged(&storage_key, &expected)
                        })
                        .await
                        .map_err(internal)??;
                        if removed {
                            reaped += 1;
                        }
                    }
                }
            }
            let Some(event) = sends.next().await else {
                break;
            };
            if let Some(event) = event {
                queue.extend(round.handle(&self.state(), &self.me, event));
            }
        }
        if reaped > 0 {
            self.tombstones_reaped
                .fetch_add(reaped as u64, Ordering::Relaxed);
            tracing::info!(keys = reaped, "tombstones reaped");
        }
        Ok(reaped)
    }

    /// Send a check (its answer is the event to feed back) or a reap (fire and forget).
    async fn reap_send(&self, step: ReapStep) -> Option<ReapEvent> {
        match step {
            ReapStep::Check {
                id,
                to,
                message,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                let answer = match self.send(&to, message, timeout).await {
                    Ok(PeerMessage::ReapState { object, hinted }) => Some(ReapAnswer {
                        stored: object,
                        hinted,
                    }),
                    _ => None,
                };
                Some(ReapEvent::Reply {
                    id,
                    from: to,
                    answer,
                })
            }
            ReapStep::Reap {
                to,
                message,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                if let Err(e) = self.send(&to, message, timeout).await {
                    tracing::debug!(node = %to, error = %e, "reap request failed; the tombstone stays there for now");
                }
                None
            }
            ReapStep::ReadHinted { .. } | ReapStep::RemoveLocal { .. } => None,
        }
    }
}
