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
use crate::keys;
use crate::membership::ClusterState;
use crate::message::{HandoffEntry, PeerMessage};
use crate::object::Object;
use crate::ring::NodeId;
use crate::storage::{Durability, Entry};

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

/// A hint as read from the hint table: its storage key and the bytes it held.
pub type HeldHint = (Vec<u8>, Vec<u8>);

/// One message of a delivery round and the hints (storage keys) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintSend {
    pub to: NodeId,
    pub message: PeerMessage,
    pub hints: Vec<Vec<u8>>,
}

/// A page of hints routed: what to send, and what cannot be sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HintPage {
    /// One `Handoff` batch to the target (the hints whose key it still replicates), and one
    /// fsync'd `ReplicaPut` per current replica of each other hint's key.
    pub sends: Vec<HintSend>,
    /// Hints that fail their checksum: the driver deletes them (if unchanged) and counts
    /// them. They cannot be delivered, and in a batch they would make the target refuse all
    /// of it, every round; the write they held is on the replicas that acknowledged it.
    pub corrupt: Vec<HeldHint>,
    /// The round's budget ran out within this page: read no further.
    pub budget_spent: bool,
}

impl HintRound<Vec<u8>, Vec<u8>> {
    /// Route one page of the target's hints (`(hint key, bytes)` from the hint table) under
    /// `state`; `n_val` gives a bucket's replica count. Pure: the driver reads the page,
    /// sends, feeds each answer to [`HintRound::on_reply`] and deletes what it releases.
    pub fn route_page(
        &mut self,
        page: Vec<Entry>,
        state: &ClusterState,
        n_val: impl Fn(&str) -> u32,
    ) -> HintPage {
        let mut out = HintPage::default();
        let (mut batch, mut batch_hints) = (Vec::new(), Vec::new());
        for (hint_key, bytes) in page {
            let Some((_, bucket, key)) = keys::split_hint_key(&hint_key) else {
                continue;
            };
            let (bucket, key) = (
                String::from_utf8_lossy(bucket).into_owned(),
                String::from_utf8_lossy(key).into_owned(),
            );
            if Object::decode(&bytes).is_err() {
                out.corrupt.push((hint_key, bytes));
                continue;
            }
            let partition = state
                .ring
                .current
                .partition_of(bucket.as_bytes(), key.as_bytes());
            let preflist = state.preference_list(partition, n_val(&bucket));
            match self.route(hint_key.clone(), bytes.clone(), &preflist) {
                None => {
                    out.budget_spent = true;
                    break;
                }
                Some(HintRoute::Target) => {
                    batch.push(HandoffEntry {
                        bucket,
                        key,
                        object: bytes,
                    });
                    batch_hints.push(hint_key);
                }
                // The key moved: its current replicas get the hint instead (fsync'd).
                Some(HintRoute::Replicas(nodes)) => {
                    for node in nodes {
                        out.sends.push(HintSend {
                            to: node,
                            message: PeerMessage::ReplicaPut {
                                bucket: bucket.clone(),
                                key: key.clone(),
                                object: bytes.clone(),
                                durability: Durability::Fsync,
                                ring_version: state.ring.version,
                            },
                            hints: vec![hint_key.clone()],
                        });
                    }
                }
            }
        }
        if !batch.is_empty() {
            out.sends.insert(
                0,
                HintSend {
                    to: self.target.clone(),
                    message: PeerMessage::Handoff {
                        entries: batch,
                        ring_version: state.ring.version,
                    },
                    hints: batch_hints,
                },
            );
        }
        out
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

    /// A page of hints for b: those b still replicates go in one `Handoff` to b, the others
    /// as fsync'd `ReplicaPut`s to each current replica, a corrupt one is set aside, and the
    /// round stops reading at its budget.
    #[test]
    fn a_page_of_hints_becomes_one_batch_and_the_moves() {
        let state = crate::test_support::settled_cluster(&["a", "b", "c", "d"], 8);
        let object = |v: &str| {
            crate::object::Object::default()
                .update(
                    &crate::version::VersionVector::new(),
                    crate::object::Content {
                        value: v.as_bytes().to_vec(),
                        ..crate::object::Content::default()
                    },
                    crate::version::ActorId(1),
                    1,
                    crate::object::PrunePolicy::default(),
                )
                .unwrap_or_else(|e| panic!("{e:?}"))
                .encode()
        };
        let mut page: Vec<Entry> = (0..20)
            .map(|i| {
                let key = format!("k{i}");
                (keys::hint_key("b", b"x", key.as_bytes()), object(&key))
            })
            .collect();
        page.push((keys::hint_key("b", b"x", b"bad"), vec![1, 0, 0xde, 0xad]));
        page.sort();
        let preflist = |key: &str| {
            state.preference_list(state.ring.current.partition_of(b"x", key.as_bytes()), 2)
        };
        let mut round =
            HintRound::start(&state, &id("b"), true, 100).unwrap_or_else(|| panic!("b is up"));
        let routed = round.route_page(page.clone(), &state, |_| 2);
        assert!(!routed.budget_spent);
        assert_eq!(routed.corrupt.len(), 1);
        let mut to_b = 0;
        let mut moved = std::collections::BTreeMap::<String, Vec<NodeId>>::new();
        for send in &routed.sends {
            match &send.message {
                PeerMessage::Handoff { entries, .. } => {
                    assert_eq!(send.to, id("b"));
                    for e in entries {
                        assert!(preflist(&e.key).contains(&id("b")), "{}", e.key);
                    }
                    to_b += entries.len();
                }
                PeerMessage::ReplicaPut {
                    key, durability, ..
                } => {
                    assert_eq!(*durability, Durability::Fsync);
                    moved.entry(key.clone()).or_default().push(send.to.clone());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        for (key, nodes) in &moved {
            assert_eq!(*nodes, preflist(key), "{key} goes to its current replicas");
        }
        assert_eq!(to_b + moved.len(), 20, "every sound hint is routed once");
        assert!(to_b > 0 && !moved.is_empty(), "both routes taken: {to_b}");
        // A smaller budget stops the page.
        let mut small =
            HintRound::start(&state, &id("b"), true, 5).unwrap_or_else(|| panic!("b is up"));
        let routed = small.route_page(page, &state, |_| 2);
        assert!(routed.budget_spent);
        assert_eq!(small.routed(), 5);
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
