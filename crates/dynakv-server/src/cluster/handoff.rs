//! Ring transitions: the handoff of keys to the nodes entering their preference lists, and
//! the cleanup of keys this node no longer replicates (the core's `TransitionHandoff`,
//! `Cleanup`).

use super::{
    Arc, Batches, Cleanup, Cluster, ClusterError, Durability, HANDOFF_BATCH_BYTES,
    HANDOFF_BATCH_KEYS, HandoffEntry, Hash, NodeId, PeerMessage, SCAN_PAGE_KEYS, TransitionHandoff,
    internal, partition_of,
};

impl Cluster {
    /// Hand keys to the nodes that enter their preference lists in the pending transition;
    /// mark this node's handoff done when all are delivered. Returns the number of keys sent.
    pub async fn handoff_round(&self) -> Result<usize, ClusterError> {
        let state = self.state();
        let Some(mut handoff) = TransitionHandoff::start(&state, &self.me) else {
            return Ok(0);
        };
        let mut batches = Batches::new(HANDOFF_BATCH_KEYS, HANDOFF_BATCH_BYTES);
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self.scan_page(start_after.clone()).await?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            let full = TransitionHandoff::batch_page(&state, &self.me, &mut batches, page, |b| {
                self.bucket_props(b).n_val
            });
            for (node, entries) in full {
                self.handoff_batch(&mut handoff, &node, entries).await?;
            }
        }
        for (node, entries) in batches.drain() {
            self.handoff_batch(&mut handoff, &node, entries).await?;
        }
        handoff.on_scanned();
        let me = self.me.clone();
        if self.update_state(|s| handoff.finish(s, &me)) {
            tracing::info!(
                transition = handoff.transition(),
                keys = handoff.keys_sent(),
                "handoff done"
            );
        }
        Ok(handoff.keys_sent())
    }

    /// Send one batch of a transition's handoff and count its outcome.
    pub(super) async fn handoff_batch(
        &self,
        handoff: &mut TransitionHandoff,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
    ) -> Result<(), ClusterError> {
        handoff.on_sent(entries.len());
        let result = self.send_handoff(node, entries).await;
        handoff.on_reply(result.is_ok());
        result
    }

    /// One `Handoff` batch under this node's ring version (five request timeouts: the
    /// receiver merges the whole batch and syncs).
    pub(super) async fn send_handoff(
        &self,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
    ) -> Result<(), ClusterError> {
        let message = PeerMessage::Handoff {
            entries,
            ring_version: self.state().ring.version,
        };
        self.send_write_within(node, message, self.timeouts.request * 5)
            .await
    }

    /// One page of this node's stored objects after `start_after` (handoff, cleanup, reaping).
    pub(super) async fn scan_page(
        &self,
        start_after: Option<Vec<u8>>,
    ) -> Result<Vec<dynakv_core::storage::Entry>, ClusterError> {
        let replica = Arc::clone(&self.replica);
        Ok(tokio::task::spawn_blocking(move || {
            replica.scan_objects(start_after.as_deref(), SCAN_PAGE_KEYS)
        })
        .await
        .map_err(internal)??)
    }

    /// After a transition completes, drop the keys this node no longer replicates: each goes
    /// to its current primaries first (a write that landed here after the transition's
    /// handoff may exist nowhere else) and is dropped once all of them acknowledged, if it
    /// did not change meanwhile (the core's `Cleanup`). Returns the number of keys dropped.
    pub async fn cleanup_round(&self) -> Result<usize, ClusterError> {
        let state = self.state();
        let marker = *self.cleanup_marker.lock();
        let Some(mut cleanup) = Cleanup::<Vec<u8>, Hash>::start(&state, &marker) else {
            return Ok(0);
        };
        let mut removed = 0;
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self.scan_page(start_after.clone()).await?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            // The page's batches for the primaries of every key this node no longer
            // replicates (the core's, shared with the simulator).
            let sends = cleanup.add_page(&state, &self.me, page, |b| self.bucket_props(b).n_val);
            if self.state().ring.version != cleanup.ring_version() {
                // The ring moved on while scanning: start over later with the new ring.
                return Ok(removed);
            }
            let mut refused: Vec<NodeId> = Vec::new();
            let mut droppable = Vec::new();
            for (node, batch) in sends {
                let (keys, entries): (Vec<Vec<u8>>, Vec<HandoffEntry>) = batch.into_iter().unzip();
                let ok = !refused.contains(&node)
                    && match self.send_handoff(&node, entries).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::debug!(%node, error = %e, "cleanup handoff failed; keys kept for a later round");
                            refused.push(node.clone());
                            false
                        }
                    };
                droppable.extend(cleanup.on_batch(&keys, ok));
            }
            let replica = Arc::clone(&self.replica);
            let wanted = droppable.len();
            let dropped = tokio::task::spawn_blocking(move || -> Result<usize, ClusterError> {
                let mut removed = 0;
                for (key, expected) in droppable {
                    if replica.remove_if_unchanged_with(&key, &expected, Durability::Buffered)? {
                        removed += 1;
                    }
                }
                replica.storage().sync().map_err(internal)?;
                Ok(removed)
            })
            .await
            .map_err(internal)??;
            if dropped < wanted {
                cleanup.kept_changed();
            }
            removed += dropped;
        }
        let state = self.state();
        if !cleanup.record(&state, &mut self.cleanup_marker.lock()) {
            return Ok(removed);
        }
        let version = cleanup.ring_version();
        if removed > 0 {
            tracing::info!(
                version,
                keys = removed,
                "dropped keys this node no longer replicates"
            );
        }
        Ok(removed)
    }

    /// A write stored here for a key this node no longer replicates (its ring changed while
    /// the write was under way) would outlive the cleanup of that ring: ask for another one.
    pub(crate) fn check_orphan(&self, bucket: &str, key: &str, n_val: u32) {
        let state = self.state();
        let partition = partition_of(&state, bucket, key);
        self.cleanup_marker
            .lock()
            .on_stored(&state, &self.me, partition, n_val);
    }
}
