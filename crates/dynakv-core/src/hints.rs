//! Hinted handoff delivery as a state machine (paper 4.6): one round of delivering the hints a
//! node holds for one target ([`HintRound`]).
//!
//! Sans-IO: the server drives it over its hint table and peer transport, the simulator over
//! its memory and simulated messages, so where each hint goes, how many go per round and when
//! a hint may be deleted are the same code in both.
//!
//! Invariants:
//! - nothing is delivered for a target that is a member believed down (its hints wait);
//! - a hint goes to its target when the target still replicates the key, else to each of
//!   the key's current replicas (a hint follows its key when ownership changed, or when the
//!   target left);
//! - a hint is released for deletion only once every destination acknowledged it, and the
//!   driver deletes it only if it is unchanged since it was sent (a newer hint for the same
//!   key stays); a failed destination keeps it for a later round;
//! - at most `budget` hints are routed per round (admission control, paper 6.5).

use crate::coordinator::HintDelivery;
use crate::handoff::AckSet;
use crate::membership::ClusterState;
use crate::ring::NodeId;

/// Where one hint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintRoute {
    /// To the target itself (batched into one `Handoff`).
    Target,
    /// To each of these nodes, the key's current replicas (this node may be one of them:
    /// a local merge, reported like any other destination).
    Replicas(Vec<NodeId>),
}

/// One delivery round of the hints held for one target. `K` names a hint, `V` is what the
/// driver checks before deleting it (its bytes, or the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintRound<K, V> {
    target: NodeId,
    delivery: HintDelivery,
    acks: AckSet<K, V>,
    budget: usize,
    routed: usize,
    failed: bool,
}

impl<K: Ord + Clone, V: Clone> HintRound<K, V> {
    /// The round for `target`: `None` when its hints are held (a member this node's failure
    /// detector believes down) or the budget is spent.
    pub fn start(
        state: &ClusterState,
        target: &NodeId,
        target_up: bool,
        budget: usize,
    ) -> Option<HintRound<K, V>> {
        let delivery = HintDelivery::for_target(state, target, target_up);
        if delivery == HintDelivery::Hold || budget == 0 {
            return None;
        }
        Some(HintRound {
            target: target.clone(),
            delivery,
            acks: AckSet::default(),
            budget,
            routed: 0,
            failed: false,
        })
    }

    pub fn target(&self) -> &NodeId {
        &self.target
    }

    /// Route one hint of a key whose current replicas are `preflist`; `held` is what the hint
    /// holds now. `None` when the round's budget is spent (stop reading hints).
    pub fn route(&mut self, hint: K, held: V, preflist: &[NodeId]) -> Option<HintRoute> {
        if !self.wants_more() {
            return None;
        }
        self.routed += 1;
        if self.delivery.to_target(&self.target, preflist) {
            self.acks.expect(hint, held, 1);
            return Some(HintRoute::Target);
        }
        if !preflist.is_empty() {
            // (With no replica to give it to, the hint stays: it is never released.)
            self.acks.expect(hint, held, preflist.len());
        }
        Some(HintRoute::Replicas(preflist.to_vec()))
    }

    /// One destination answered for these hints (`ok`: acknowledged). Returns the hints now
    /// released for deletion (if unchanged), with what they held when routed.
    pub fn on_reply<'a>(&mut self, hints: impl IntoIterator<Item = &'a K>, ok: bool) -> Vec<(K, V)>
    where
        K: 'a,
    {
        self.failed |= !ok;
        self.acks.on_reply(hints, ok)
    }

    /// Budget left for more hints this round, and no delivery failed (a failed target waits
    /// for the next round rather than being sent the rest now).
    pub fn wants_more(&self) -> bool {
        self.routed < self.budget && !self.failed
    }

    /// Every routed hint came back (acknowledged or not).
    pub fn settled(&self) -> bool {
        self.acks.is_empty()
    }

    /// Hints routed this round.
    pub fn routed(&self) -> usize {
        self.routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberStatus;

    use crate::test_support::{id, member};

    fn state() -> ClusterState {
        let mut state = ClusterState::found("c", member("a", MemberStatus::Valid), 8)
            .unwrap_or_else(|e| panic!("{e:?}"));
        for n in ["b", "c"] {
            state
                .add_joining(member(n, MemberStatus::Joining))
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        state
    }

    #[test]
    fn a_down_member_holds_its_hints() {
        assert!(HintRound::<u8, u8>::start(&state(), &id("b"), false, 10).is_none());
        assert!(HintRound::<u8, u8>::start(&state(), &id("b"), true, 0).is_none());
        assert!(HintRound::<u8, u8>::start(&state(), &id("b"), true, 10).is_some());
        // A node that is no member any more (it left and was removed): deliver elsewhere.
        let mut round = HintRound::<u8, u8>::start(&state(), &id("gone"), false, 10)
            .unwrap_or_else(|| panic!("hints of a non-member move on"));
        assert_eq!(
            round.route(1, 1, &[id("a"), id("c")]),
            Some(HintRoute::Replicas(vec![id("a"), id("c")]))
        );
    }

    #[test]
    fn a_hint_goes_to_its_target_and_is_released_on_its_ack() {
        let mut round =
            HintRound::start(&state(), &id("b"), true, 10).unwrap_or_else(|| panic!("b is up"));
        let pl = [id("a"), id("b"), id("c")];
        assert_eq!(round.route("k1", 1, &pl), Some(HintRoute::Target));
        assert_eq!(round.route("k2", 2, &pl), Some(HintRoute::Target));
        assert!(!round.settled());
        assert_eq!(
            round.on_reply(&["k1", "k2"], true),
            vec![("k1", 1), ("k2", 2)]
        );
        assert!(round.settled());
        // A key b no longer replicates follows the key to its replicas; released only when
        // every one of them acknowledged.
        let moved = [id("a"), id("c")];
        assert_eq!(
            round.route("k3", 3, &moved),
            Some(HintRoute::Replicas(moved.to_vec()))
        );
        assert!(round.on_reply(&["k3"], true).is_empty());
        assert_eq!(round.on_reply(&["k3"], true), vec![("k3", 3)]);
    }

    #[test]
    fn a_failed_delivery_keeps_the_hint_and_ends_the_round() {
        let mut round =
            HintRound::start(&state(), &id("b"), true, 10).unwrap_or_else(|| panic!("b is up"));
        let moved = [id("a"), id("c")];
        round.route("k", 1, &moved);
        assert!(round.on_reply(&["k"], false).is_empty());
        assert!(
            round.on_reply(&["k"], true).is_empty(),
            "one refusal keeps it"
        );
        assert!(round.settled());
        assert!(!round.wants_more());
        assert_eq!(round.route("k2", 2, &moved), None);
        // With no replica at all the hint stays.
        let mut round =
            HintRound::start(&state(), &id("gone"), true, 10).unwrap_or_else(|| panic!("moves on"));
        assert_eq!(round.route("k", 1, &[]), Some(HintRoute::Replicas(vec![])));
        assert!(round.settled());
        assert!(round.on_reply(&["k"], true).is_empty());
    }

    #[test]
    fn the_budget_bounds_a_round() {
        let mut round =
            HintRound::start(&state(), &id("b"), true, 2).unwrap_or_else(|| panic!("b is up"));
        let pl = [id("b")];
        assert!(round.route(1, 0, &pl).is_some());
        assert!(round.route(2, 0, &pl).is_some());
        assert_eq!(round.route(3, 0, &pl), None);
        assert_eq!(round.routed(), 2);
    }
}
