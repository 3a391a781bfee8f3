//! A node's transition handoff and cleanup passes (the core's `HandoffPass` and
//! `CleanupPass`, one page per step, resumed by replies or `Timer::Paging`).
//!
//! Invariants: a handoff or cleanup pass is recorded done only when it completed (and, for a
//! cleanup, once its drops are durable).

use super::{
    AfterSync, CleanupMarker, CleanupPass, HandoffEntry, HandoffPass, Node, NodeId, Output,
    PassStep, PeerMessage, Purpose, Timer,
};
use std::collections::VecDeque;

/// What a node's passes keep between steps.
#[derive(Debug, Default)]
pub(super) struct Passes {
    /// The transition handoff in progress.
    pub(super) handoff: Option<HandoffPass>,
    /// Keys cleanup is handing to their primaries: the copy sent, acknowledgements awaited,
    /// and whether all so far succeeded.
    pub(super) cleanup: Option<CleanupPass>,
    /// The ring version whose cleanup ran (volatile, as in the server).
    pub(super) marker: CleanupMarker,
    /// A `Timer::Paging` is set and not yet fired.
    pub(super) paging_timer_set: bool,
}

impl Node {
    /// The transition handoff: the core's `HandoffPass` (paged and resumable: each step
    /// scans at most one page and at most `HANDOFF_BATCHES_IN_FLIGHT` batches await replies;
    /// a reply or `Timer::Paging` takes the next step; a failed batch or a new transition
    /// ends the pass unmarked, and a later round starts over), the server's too.
    pub(super) fn handoff_round(&mut self, now: u64) {
        if self.passes.handoff.is_none() {
            let request_ms = self.config.timings.request_ms;
            let hints_held = !self.replica.hint_counts().is_empty();
            let started = HandoffPass::start(&self.cluster, &self.me, request_ms, hints_held);
            let Some(pass) = started else {
                return;
            };
            self.passes.handoff = Some(pass);
        }
        self.handoff_step(now);
    }

    /// One step of the transition handoff (see [`Node::handoff_round`]).
    pub(super) fn handoff_step(&mut self, now: u64) {
        let Some(mut pass) = self.passes.handoff.take() else {
            return;
        };
        let steps = pass.step(&self.cluster);
        self.handoff_steps(now, pass, steps);
    }

    /// A batch of the transition handoff came back (`ok`: acknowledged).
    pub(super) fn on_transition_handoff_reply(&mut self, now: u64, ok: bool) {
        let Some(mut pass) = self.passes.handoff.take() else {
            return;
        };
        let steps = pass.on_reply(&self.cluster, ok);
        self.handoff_steps(now, pass, steps);
    }

    /// Perform a handoff pass's steps (a page is read at once and fed back).
    fn handoff_steps(&mut self, now: u64, mut pass: HandoffPass, steps: Vec<PassStep>) {
        let mut queue: VecDeque<PassStep> = steps.into();
        while let Some(step) = queue.pop_front() {
            match step {
                PassStep::ScanPage { after } => {
                    let Some(page) = self.scan_page(after.as_deref()) else {
                        return; // the node stopped; never mark a handoff done from a failed scan
                    };
                    let more = pass.on_page(&self.cluster, &self.me, page, |b| self.n_val(b));
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
                    let keys = entries.len() as u64;
                    self.stats.handoff_keys = self.stats.handoff_keys.saturating_add(keys);
                    self.send_handoff(now, &to, entries, Purpose::TransitionHandoff, timeout_ms);
                }
                PassStep::Continue => self.continue_paging(now),
                PassStep::Over => {
                    let me = self.me.clone();
                    let hints_held = !self.replica.hint_counts().is_empty();
                    pass.finish(&mut self.cluster, &me, hints_held);
                    return;
                }
            }
        }
        self.passes.handoff = Some(pass);
    }

    /// Take the next step of paged background work soon (`Timer::Paging`, at most one set).
    fn continue_paging(&mut self, now: u64) {
        if !self.passes.paging_timer_set {
            self.passes.paging_timer_set = true;
            self.outputs.push(Output::SetTimer {
                at_ms: now,
                timer: Timer::Paging,
            });
        }
    }

    /// Cleanup: once the ring is settled, every key this node no longer
    /// replicates is sent to its primaries (a write that landed here after the transition's
    /// handoff may exist nowhere else) and dropped once all of them acknowledged, if
    /// unchanged: the core's `CleanupPass` (paged and resumable as the handoff; a ring that
    /// moves during the pass ends it, its keys stay), the server's too.
    pub(super) fn cleanup_round(&mut self, now: u64) {
        if self.passes.cleanup.is_none() {
            let request_ms = self.config.timings.request_ms;
            let Some(pass) = CleanupPass::start(&self.cluster, &self.passes.marker, request_ms)
            else {
                return;
            };
            self.passes.cleanup = Some(pass);
        }
        self.cleanup_step(now);
    }

    /// One step of the cleanup pass (see [`Node::cleanup_round`]).
    pub(super) fn cleanup_step(&mut self, now: u64) {
        let Some(mut pass) = self.passes.cleanup.take() else {
            return;
        };
        let steps = pass.step(&self.cluster);
        self.cleanup_steps(now, pass, steps);
    }

    /// Perform a cleanup pass's steps (a page is read at once and fed back).
    fn cleanup_steps(&mut self, now: u64, mut pass: CleanupPass, steps: Vec<PassStep>) {
        let mut queue: VecDeque<PassStep> = steps.into();
        while let Some(step) = queue.pop_front() {
            match step {
                PassStep::ScanPage { after } => {
                    let Some(page) = self.scan_page(after.as_deref()) else {
                        return; // the node stopped
                    };
                    let more = pass.on_page(&self.cluster, &self.me, page, |b| self.n_val(b));
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
                    let purpose = Purpose::CleanupHandoff { tag };
                    self.send_handoff(now, &to, entries, purpose, timeout_ms);
                }
                PassStep::Continue => self.continue_paging(now),
                PassStep::Over => {
                    // Recorded once the drops are durable (a power loss before would bring
                    // the dropped keys back with the pass recorded as done).
                    self.after_sync(AfterSync::RecordCleanup(pass.into_cleanup()));
                    return;
                }
            }
        }
        self.passes.cleanup = Some(pass);
    }

    /// One `Handoff` batch under this node's ring version.
    pub(super) fn send_handoff(
        &mut self,
        now: u64,
        node: &NodeId,
        entries: Vec<HandoffEntry>,
        purpose: Purpose,
        timeout_ms: u64,
    ) {
        let body = PeerMessage::Handoff {
            entries,
            ring_version: self.cluster.ring.version,
        };
        self.send_request(now, node, body, purpose, timeout_ms);
    }

    /// A cleanup batch came back (`ok`: acknowledged): drop the keys every primary now
    /// acknowledged, if unchanged, and take the next step.
    pub(super) fn on_cleanup_handoff(&mut self, now: u64, tag: u64, ok: bool) {
        let Some(mut pass) = self.passes.cleanup.take() else {
            return;
        };
        for (storage_key, hash) in pass.on_reply(tag, ok) {
            if self.remove_stored_if_unchanged(&storage_key, &hash, false) {
                self.stats.cleanup_dropped += 1;
            } else {
                pass.kept_changed();
            }
        }
        let steps = pass.step(&self.cluster);
        self.cleanup_steps(now, pass, steps);
    }
}
