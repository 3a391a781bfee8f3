//! The failure detector's gossip half (paper 4.8): a member is believed up while its gossiped
//! heartbeat keeps moving or it keeps talking to this node, and down once neither happened
//! for `timeout_ms`. Local and cheap: each node keeps its own view. (The transport's backoff
//! after failed requests is the other half, kept by each driver's transport.)
//!
//! Time enters as milliseconds on the driver's monotonic clock; nothing here reads a clock.
//!
//! Invariants:
//! - a member never heard of counts as up for `timeout_ms` after the detector started (a
//!   node that just started has not gossiped yet), then down until it is heard of;
//! - a heartbeat counts only when it is higher than the highest seen (an old state relayed
//!   by a third node does not revive a dead member);
//! - this node itself is always up;
//! - at most `MAX_TRACKED` peers are tracked (any name that reaches the node adds one): past
//!   it, the stalest entry makes room (a peer not heard of for the longest, which is down
//!   or soon heard of again).

use crate::membership::{ClusterState, MAX_MEMBERS};
use crate::ring::NodeId;
use std::collections::BTreeMap;

/// Most peers a failure detector tracks: every member twice over (members that left, peers
/// that are joining).
pub const MAX_TRACKED: usize = 2 * MAX_MEMBERS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureDetector {
    me: NodeId,
    started_ms: u64,
    timeout_ms: u64,
    /// Per member: the highest heartbeat seen, and when it last moved or the member was last
    /// heard from.
    peers: BTreeMap<NodeId, (u64, u64)>,
}

impl FailureDetector {
    pub fn new(me: NodeId, now_ms: u64, timeout_ms: u64) -> Self {
        FailureDetector {
            me,
            started_ms: now_ms,
            timeout_ms,
            peers: BTreeMap::new(),
        }
    }

    /// Take the heartbeats of a cluster state (received by gossip, or this node's own).
    pub fn observe_state(&mut self, state: &ClusterState, now_ms: u64) {
        for member in state.members.values() {
            if let Some((beat, moved)) = self.peers.get_mut(&member.id) {
                if member.heartbeat > *beat {
                    *beat = member.heartbeat;
                    *moved = now_ms;
                }
            } else {
                self.make_room();
                self.peers
                    .insert(member.id.clone(), (member.heartbeat, now_ms));
            }
        }
    }

    /// `node` just answered or sent something: it is up, whatever its heartbeat says
    /// (heartbeats reach a node only when someone gossips with it).
    pub fn observe_contact(&mut self, node: &NodeId, now_ms: u64) {
        if *node == self.me {
            return;
        }
        if !self.peers.contains_key(node) {
            self.make_room();
        }
        let entry = self.peers.entry(node.clone()).or_insert((0, now_ms));
        entry.1 = entry.1.max(now_ms);
    }

    /// Before a new peer is tracked: when `MAX_TRACKED` are, forget the stalest.
    fn make_room(&mut self) {
        if self.peers.len() < MAX_TRACKED {
            return;
        }
        let stalest = self
            .peers
            .iter()
            .min_by_key(|(_, (_, moved))| *moved)
            .map(|(id, _)| id.clone());
        if let Some(id) = stalest {
            self.peers.remove(&id);
        }
    }

    /// How many peers are tracked.
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }

    /// Whether `node` is believed up at `now_ms`.
    pub fn is_up(&self, node: &NodeId, now_ms: u64) -> bool {
        if *node == self.me {
            return true;
        }
        let since = self
            .peers
            .get(node)
            .map_or(self.started_ms, |(_, moved)| *moved);
        now_ms.saturating_sub(since) < self.timeout_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberStatus;
    use crate::test_support::{id, member};

    fn state_with_beats(beats: &[(&str, u64)]) -> ClusterState {
        let mut state = ClusterState::found("c", member("a", MemberStatus::Valid), 8)
            .unwrap_or_else(|e| panic!("{e:?}"));
        for (name, _) in beats {
            if *name != "a" {
                state
                    .add_joining(member(name, MemberStatus::Joining))
                    .unwrap_or_else(|e| panic!("{e:?}"));
            }
        }
        for (name, beat) in beats {
            if let Some(m) = state.members.get_mut(&id(name)) {
                m.heartbeat = *beat;
            }
        }
        state
    }

    /// A flood of names (any peer that completes a handshake is heard from) cannot grow the
    /// detector past `MAX_TRACKED`; the member heard from recently stays tracked and up.
    #[test]
    fn a_flood_of_peer_names_is_bounded_and_keeps_the_live_member() {
        let mut fd = FailureDetector::new(id("a"), 0, 5000);
        for i in 0..(3 * MAX_TRACKED) {
            let now = 10_000 + i as u64;
            fd.observe_contact(&id("b"), now);
            fd.observe_contact(&id(&format!("intruder{i}")), now);
            assert!(fd.tracked() <= MAX_TRACKED);
        }
        assert_eq!(fd.tracked(), MAX_TRACKED);
        assert!(fd.is_up(&id("b"), 10_000 + 3 * MAX_TRACKED as u64));
    }

    #[test]
    fn a_member_is_up_while_its_heartbeat_moves() {
        let mut fd = FailureDetector::new(id("a"), 0, 5000);
        assert!(
            fd.is_up(&id("b"), 4999),
            "unknown members are up right after the start"
        );
        assert!(!fd.is_up(&id("b"), 5000));
        fd.observe_state(&state_with_beats(&[("b", 1)]), 1000);
        assert!(fd.is_up(&id("b"), 5999));
        assert!(!fd.is_up(&id("b"), 6000), "its heartbeat did not move");
        fd.observe_state(&state_with_beats(&[("b", 2)]), 5500);
        assert!(fd.is_up(&id("b"), 10_499));
        // An old state relayed later does not revive it.
        fd.observe_state(&state_with_beats(&[("b", 2)]), 9000);
        fd.observe_state(&state_with_beats(&[("b", 1)]), 9000);
        assert!(!fd.is_up(&id("b"), 10_500));
        assert!(
            fd.is_up(&id("a"), u64::MAX),
            "a node is always up to itself"
        );
    }

    #[test]
    fn contact_counts_as_a_sign_of_life() {
        let mut fd = FailureDetector::new(id("a"), 0, 5000);
        fd.observe_state(&state_with_beats(&[("b", 7)]), 0);
        assert!(!fd.is_up(&id("b"), 5000));
        fd.observe_contact(&id("b"), 6000);
        assert!(fd.is_up(&id("b"), 10_999));
        // A late-processed older contact does not move the clock back.
        fd.observe_contact(&id("b"), 1000);
        assert!(fd.is_up(&id("b"), 10_999));
        // A contact before any gossip makes the member known.
        fd.observe_contact(&id("c"), 20_000);
        assert!(fd.is_up(&id("c"), 24_999));
        assert!(!fd.is_up(&id("c"), 25_000));
    }
}
