//! Ring transitions: the handoff of keys to the nodes entering their preference lists, and
//! the cleanup of keys this node no longer replicates (the core's `TransitionHandoff`,
//! `Cleanup`).

use super::{
    Arc, Cluster, ClusterError, Durability, Duration, HandoffEntry, NodeId, PeerMessage,
    SCAN_PAGE_KEYS, internal, partition_of,
};
use dynakv_core::handoff::{CleanupPass, HandoffPass, PassStep};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Cluster {
    /// Hand keys to the nodes that enter their preference lists in the pending transition;
    /// mark this node's handoff done when all are delivered: the core's `HandoffPass` (the
    /// simulator's too: pages, batches, at most `HANDOFF_BATCHES_IN_FLIGHT` in flight, the
    /// first failed batch ends the pass). Returns the number of keys sent.
    pub async fn handoff_round(&self) -> Result<usize, ClusterError> {
        let request_ms = millis(self.timeouts.request);
        let hints_held = !self.replica.hint_counts().is_empty();
        let started = HandoffPass::start(&self.state(), &self.me, request_ms, hints_held);
        let Some(mut pass) = started else {
            return Ok(0);
        };
        let mut queue: VecDeque<PassStep> = pass.step(&self.state()).into();
        let mut sends = FuturesUnordered::new();
        loop {
            while let Some(step) = queue.pop_front() {
                match step {
                    PassStep::ScanPage { after } => {
                        let page = self.scan_page(after).await?;
                        let state = self.state();
                        let more =
                            pass.on_page(&state, &self.me, page, |b| self.bucket_props(b).n_val);
                        for step in more.into_iter().rev() {
                            queue.push_front(step);
                        }
                    }
                    PassStep::Send {
                        to,
                        entries,
                        timeout_ms,
                        ..
                    } => {
                        let timeout = Duration::from_millis(timeout_ms);
                        sends.push(async move { self.send_handoff(&to, entries, timeout).await });
                    }
                    PassStep::Continue => queue.extend(pass.step(&self.state())),
                    PassStep::Over => {
                        let me = self.me.clone();
                        let hints_held = !self.replica.hint_counts().is_empty();
                        if self.update_state(|s| pass.finish(s, &me, hints_held)) {
                            tracing::info!(
                                transition = pass.transition(),
                                keys = pass.keys_sent(),
                                "handoff done"
                            );
                        }
                        return Ok(pass.keys_sent());
                    }
                }
            }
            let Some(result) = sends.next().await else {
                break;
            };
            if let Err(e) = &result {
                tracing::debug!(error = %e, "handoff batch failed; a later round starts over");
            }
            queue.extend(pass.on_reply(&self.state(), result.is_ok()));
        }
        Ok(pass.keys_sent())
    }

    /// One `Handoff` batch under this node's ring version.
    pub(super) async fn send_handoff(
        &self,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let message = PeerMessage::Handoff {
            entries,
            ring_version: self.state().ring.version,
        };
        self.send_write_within(node, message, timeout).await
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
    /// did not change meanwhile: the core's `CleanupPass` (the simulator's too). The pass is
    /// recorded only after a sync made its drops durable. Returns the number of keys dropped.
    pub async fn cleanup_round(&self) -> Result<usize, ClusterError> {
        let marker = *self.cleanup_marker.lock();
        let request_ms = millis(self.timeouts.request);
        let Some(mut pass) = CleanupPass::start(&self.state(), &marker, request_ms) else {
            return Ok(0);
        };
        let mut removed = 0;
        let mut queue: VecDeque<PassStep> = pass.step(&self.state()).into();
        let mut sends = FuturesUnordered::new();
        loop {
            while let Some(step) = queue.pop_front() {
                match step {
                    PassStep::ScanPage { after } => {
                        let page = self.scan_page(after).await?;
                        let state = self.state();
                        let more =
                            pass.on_page(&state, &self.me, page, |b| self.bucket_props(b).n_val);
                        for step in more.into_iter().rev() {
                            queue.push_front(step);
                        }
                    }
                    PassStep::Send {
                        tag,
                        to,
                        entries,
                        timeout_ms,
                    } => {
                        let timeout = Duration::from_millis(timeout_ms);
                        sends.push(async move {
                            let result = self.send_handoff(&to, entries, timeout).await;
                            if let Err(e) = &result {
                                tracing::debug!(node = %to, error = %e, "cleanup handoff failed; keys kept for a later round");
                            }
                            (tag, result.is_ok())
                        });
                    }
                    PassStep::Continue => queue.extend(pass.step(&self.state())),
                    PassStep::Over => {
                        // Recorded once the drops are durable: a power loss before would
                        // bring the dropped keys back with the pass recorded as done.
                        let storage = Arc::clone(&self.storage);
                        tokio::task::spawn_blocking(move || storage.sync())
                            .await
                            .map_err(internal)?
                            .map_err(internal)?;
                        let cleanup = pass.into_cleanup();
                        let recorded =
                            cleanup.record(&self.state(), &mut self.cleanup_marker.lock());
                        if recorded && removed > 0 {
                            tracing::info!(
                                version = cleanup.ring_version(),
                                keys = removed,
                                "dropped keys this node no longer replicates"
                            );
                        }
                        return Ok(removed);
                    }
                }
            }
            let Some((tag, ok)) = sends.next().await else {
                break;
            };
            let droppable = pass.on_reply(tag, ok);
            if !droppable.is_empty() {
                let replica = Arc::clone(&self.replica);
                let wanted = droppable.len();
                let dropped =
                    tokio::task::spawn_blocking(move || -> Result<usize, ClusterError> {
                        let mut dropped = 0;
                        for (key, expected) in droppable {
                            if replica.remove_if_unchanged_with(
                                &key,
                                &expected,
                                Durability::Buffered,
                            )? {
                                dropped += 1;
                            }
                        }
                        Ok(dropped)
                    })
                    .await
                    .map_err(internal)??;
                if dropped < wanted {
                    pass.kept_changed();
                }
                removed += dropped;
            }
            queue.extend(pass.step(&self.state()));
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
