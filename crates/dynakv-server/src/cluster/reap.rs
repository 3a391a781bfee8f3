//! Tombstone reaping: a tombstone every primary (and every hint) holds identically, older
//! than the grace period, is removed everywhere (the core's `ReapCheck`).

use super::{
    Arc, Cluster, ClusterError, ClusterState, MAX_REAPS_PER_ROUND, NodeId, Ordering, PeerMessage,
    ReapAnswer, ReapCheck, entry_hash, internal, key_names, partition_of, reap_candidates,
    reap_check_members, reaper_primaries,
};

impl Cluster {
    /// Reap tombstones older than `grace_ms` that every primary holds identically: this node
    /// handles the keys it is the first primary of, checks that each of the N primaries stores
    /// exactly the same tombstone, then has each delete it (only if unchanged). Returns the
    /// number of keys reaped.
    pub async fn reap_tombstones(&self, grace_ms: u64) -> Result<usize, ClusterError> {
        let state = self.state();
        if state.ring.next.is_some() {
            return Ok(0);
        }
        let now = self.now_ms();
        let replica = Arc::clone(&self.replica);
        let candidates = tokio::task::spawn_blocking(move || {
            reap_candidates(&replica, now, grace_ms, MAX_REAPS_PER_ROUND)
        })
        .await
        .map_err(internal)??;
        let mut reaped = 0;
        for (storage_key, value) in candidates {
            let Some((bucket, key)) = key_names(&storage_key) else {
                continue;
            };
            let n_val = self.bucket_props(&bucket).n_val;
            let partition = partition_of(&state, &bucket, &key);
            let Some(primaries) = reaper_primaries(&state, &self.me, partition, n_val) else {
                continue;
            };
            // Every primary must hold exactly this tombstone, and no member may keep a hint of
            // the key or (outside the primaries) a copy of it: a hint or stray copy of an
            // older version delivered after the reap would bring the deleted value back (the
            // simulation found both). A member that does not answer blocks the reap.
            if !self
                .reap_is_safe(&state, &primaries, &bucket, &key, &value)
                .await
            {
                continue;
            }
            let expected = entry_hash(bucket.as_bytes(), key.as_bytes(), &value);
            for node in primaries.iter().filter(|n| **n != self.me) {
                let message = PeerMessage::Reap {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    expected,
                };
                if let Err(e) = self.send(node, message, self.timeouts.request).await {
                    tracing::debug!(%node, error = %e, "reap request failed; the tombstone stays there for now");
                }
            }
            let replica = Arc::clone(&self.replica);
            let removed = tokio::task::spawn_blocking(move || {
                replica.remove_if_unchanged(&storage_key, &expected)
            })
            .await
            .map_err(internal)??;
            if removed {
                reaped += 1;
            }
        }
        if reaped > 0 {
            self.tombstones_reaped
                .fetch_add(reaped as u64, Ordering::Relaxed);
            tracing::info!(keys = reaped, "tombstones reaped");
        }
        Ok(reaped)
    }

    /// The reap check of one tombstone (`value`, stored here, the first primary): every other
    /// member answers `ReapCheck`; primaries must hold exactly `value`, others nothing, and
    /// no member (this one included) may keep a hint of the key.
    pub(super) async fn reap_is_safe(
        &self,
        state: &ClusterState,
        primaries: &[NodeId],
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> bool {
        let replica = Arc::clone(&self.replica);
        let (b, k) = (bucket.to_owned(), key.to_owned());
        let Ok(Ok(me_hinted)) =
            tokio::task::spawn_blocking(move || replica.holds_hint(&b, &k)).await
        else {
            return false;
        };
        let (mut check, ask) = ReapCheck::start(
            &self.me,
            reap_check_members(state),
            primaries.to_vec(),
            value.to_vec(),
            me_hinted,
        );
        for node in ask {
            let message = PeerMessage::ReapCheck {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            };
            let answer = match self.send(&node, message, self.timeouts.request).await {
                Ok(PeerMessage::ReapState { object, hinted }) => Some(ReapAnswer {
                    stored: object,
                    hinted,
                }),
                _ => None,
            };
            if let Some(verdict) = check.on_reply(&node, answer) {
                return verdict;
            }
        }
        check.verdict().unwrap_or(false)
    }
}
