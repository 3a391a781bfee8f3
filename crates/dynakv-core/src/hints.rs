//! Hinted handoff delivery as a state machine (paper 4.6): one round of delivering the hints a
//! node holds for one target ([`HintRound`]).
//!
//! Sans-IO: the server drives it over its hint table and peer transport, the simulator over
//! its memory and simulated messages, so where each hint goes, how many go per round and when
//! a hint may be deleted are the same code in both.
//!
//! Invariants:
//! - nothing is delivered for a target that is a member believed down (its hints wait),
//!   except by a node that is leaving: it hands them over to an heir ([`heir`]), a staying
//!   member that keeps them as hints for the same target, so that its leave does not wait
//!   for the target to come back (and never completes with hints held, see
//!   [`crate::handoff::HandoffPass::finish`]);
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
    /// To this heir, to keep as a hint for the same target (this node is leaving and the
    /// target is a member believed down).
    HandOver(NodeId),
}

/// The member a node that is leaving (or has left) hands over the hints it holds for
/// members believed down: the first in id order that stays in the cluster (`Valid`), is not
/// `me` and is believed up (`up`). `None` when `me` is not leaving, or no member qualifies
/// (the hints then wait, and so does the leave).
pub fn heir(state: &ClusterState, me: &NodeId, up: impl Fn(&NodeId) -> bool) -> Option<NodeId> {
    let leaving = state.member(me).is_some_and(|m| {
        matches!(
            m.status,
            crate::membership::MemberStatus::Leaving | crate::membership::MemberStatus::Exiting
        )
    });
    if !leaving {
        return None;
    }
    state
        .members
        .values()
        .find(|m| m.id != *me && m.status == crate::membership::MemberStatus::Valid && up(&m.id))
        .map(|m| m.id.clone())
}

/// One delivery round of the hints held for one target. `K` names a hint, `V` is what the
/// driver checks before deleting it (its bytes, or the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintRound<K, V> {
    target: NodeId,
    delivery: HintDelivery,
    /// Where the hints go instead when the target's are held and this node is leaving.
    heir: Option<NodeId>,
    acks: AckSet<K, V>,
    budget: usize,
    routed: usize,
    failed: bool,
}

impl<K: Ord + Clone, V: Clone> HintRound<K, V> {
    /// The round for `target`: `None` when its hints are held (a member this node's failure
    /// detector believes down, and no `heir`: see [`heir`]) or the budget is spent.
    pub fn start(
        state: &ClusterState,
        target: &NodeId,
        target_up: bool,
        heir: Option<&NodeId>,
        budget: usize,
    ) -> Option<HintRound<K, V>> {
        let delivery = HintDelivery::for_target(state, target, target_up);
        let heir = match delivery {
            HintDelivery::Hold => Some(heir.filter(|h| *h != target)?.clone()),
            HintDelivery::Deliver { .. } => None,
        };
        if budget == 0 {
            return None;
        }
        Some(HintRound {
            target: target.clone(),
            delivery,
            heir,
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
        if let Some(heir) = &self.heir {
            self.acks.expect(hint, held, 1);
            return Some(HintRoute::HandOver(heir.clone()));
        }
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
                // This node is leaving: the heir keeps the hint for the target (fsync'd).
                Some(HintRoute::HandOver(heir)) => out.sends.push(HintSend {
                    to: heir,
                    message: PeerMessage::HintedPut {
                        target: self.target.0.clone(),
                        bucket,
                        key,
                        object: bytes,
                        durability: Durability::Fsync,
                        ring_version: state.ring.version,
                    },
                    hints: vec![hint_key],
                }),
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

/// Bytes of hints a batch may carry per request timeout it is given: a batch to the target
/// waits one request timeout, and one more per this many bytes it carries, up to five.
const HINT_BATCH_BYTES_PER_TIMEOUT: usize = 1024 * 1024;

/// How long one send of a delivery run may take: a request timeout, longer for a large batch
/// (the same rule in the server and the simulator, whose batches are small).
fn send_timeout_ms(message: &PeerMessage, request_timeout_ms: u64) -> u64 {
    let PeerMessage::Handoff { entries, .. } = message else {
        return request_timeout_ms;
    };
    let bytes: usize = entries.iter().map(|e| e.object.len()).sum();
    let extra = (bytes / HINT_BATCH_BYTES_PER_TIMEOUT).min(4) as u64;
    request_timeout_ms.saturating_mul(1 + extra)
}

/// What a hint delivery run asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintStep {
    /// Read the next page of the target's hints (`(hint key, bytes)`, in key order, after
    /// `after`, at most `limit`) and feed it back as [`HintEvent::Page`].
    ReadPage {
        after: Option<Vec<u8>>,
        limit: usize,
    },
    /// Send `message` to `to` (this node itself for a moved key it now replicates: served
    /// here as a peer's would be) and feed the outcome back as [`HintEvent::Reply`].
    Send {
        tag: u64,
        to: NodeId,
        message: Box<PeerMessage>,
        timeout_ms: u64,
    },
    /// Delete the hint if it still holds `held`: delivered (`corrupt` false) or failing its
    /// checksum (`corrupt` true); count it when it was deleted.
    Delete {
        hint_key: Vec<u8>,
        held: Vec<u8>,
        corrupt: bool,
    },
}

/// An outcome fed back to a hint delivery run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintEvent {
    /// The page asked for by [`HintStep::ReadPage`].
    Page(Vec<Entry>),
    /// The outcome of [`HintStep::Send`] `tag` (`ok`: acknowledged).
    Reply { tag: u64, ok: bool },
}

/// One delivery run of the hints held for one target, paged (a page of `page_keys` hints
/// read, routed by [`HintRound::route_page`], its sends out, the next page only once every
/// send of this one came back), up to the round's budget, and ending at the first failed
/// delivery. The server and the simulator both drive it (before, each sequenced the pages
/// itself: the server read pages until the budget, the simulator one page per round).
#[derive(Debug)]
pub struct HintRun {
    round: HintRound<Vec<u8>, Vec<u8>>,
    page_keys: usize,
    request_timeout_ms: u64,
    after: Option<Vec<u8>>,
    reading: bool,
    /// Sends awaiting their reply, and the hints each carries.
    outstanding: std::collections::BTreeMap<u64, Vec<Vec<u8>>>,
    next_tag: u64,
    /// No further page: the last was short, or the budget is spent.
    last_page: bool,
}

impl HintRun {
    /// The run for `target` (`None` when its hints are held or the budget is 0): its first
    /// step reads a page. `heir`: see [`HintRound::start`].
    pub fn start(
        state: &ClusterState,
        (target, target_up): (&NodeId, bool),
        heir: Option<&NodeId>,
        budget: usize,
        (page_keys, request_timeout_ms): (usize, u64),
    ) -> Option<(HintRun, Vec<HintStep>)> {
        let round = HintRound::start(state, target, target_up, heir, budget)?;
        let page_keys = page_keys.max(1);
        let run = HintRun {
            round,
            page_keys,
            request_timeout_ms,
            after: None,
            reading: true,
            outstanding: std::collections::BTreeMap::new(),
            next_tag: 0,
            last_page: false,
        };
        let read = HintStep::ReadPage {
            after: None,
            limit: page_keys,
        };
        Some((run, vec![read]))
    }

    /// The hints' target.
    pub fn target(&self) -> &NodeId {
        self.round.target()
    }

    /// Feed one outcome; `state` is the node's cluster state now, `n_val` a bucket's replica
    /// count.
    pub fn handle(
        &mut self,
        state: &ClusterState,
        n_val: impl Fn(&str) -> u32,
        event: HintEvent,
    ) -> Vec<HintStep> {
        let mut steps = Vec::new();
        match event {
            HintEvent::Page(page) => {
                if !self.reading {
                    return steps;
                }
                self.reading = false;
                self.after = page.last().map(|(key, _)| key.clone());
                let full = page.len() >= self.page_keys;
                let routed = self.round.route_page(page, state, n_val);
                self.last_page = !full || routed.budget_spent;
                for (hint_key, held) in routed.corrupt {
                    steps.push(HintStep::Delete {
                        hint_key,
                        held,
                        corrupt: true,
                    });
                }
                for send in routed.sends {
                    let tag = self.next_tag;
                    self.next_tag = self.next_tag.wrapping_add(1);
                    let timeout_ms = send_timeout_ms(&send.message, self.request_timeout_ms);
                    self.outstanding.insert(tag, send.hints);
                    steps.push(HintStep::Send {
                        tag,
                        to: send.to,
                        message: Box::new(send.message),
                        timeout_ms,
                    });
                }
            }
            HintEvent::Reply { tag, ok } => {
                let Some(hints) = self.outstanding.remove(&tag) else {
                    return steps;
                };
                for (hint_key, held) in self.round.on_reply(&hints, ok) {
                    steps.push(HintStep::Delete {
                        hint_key,
                        held,
                        corrupt: false,
                    });
                }
            }
        }
        if !self.reading
            && self.outstanding.is_empty()
            && !self.last_page
            && self.round.wants_more()
        {
            self.reading = true;
            steps.push(HintStep::ReadPage {
                after: self.after.clone(),
                limit: self.page_keys,
            });
        }
        steps
    }

    /// Nothing is read or sent any more.
    pub fn finished(&self) -> bool {
        !self.reading && self.outstanding.is_empty()
    }

    /// Hints routed so far (what the run spent of its budget).
    pub fn routed(&self) -> usize {
        self.round.routed()
    }
}

/// One delivery round over every target this node holds hints for: one target after another
/// (each a [`HintRun`]), within one budget of hints for the whole round (admission control:
/// a target's run gets what the runs before it left). The server and the simulator both
/// drive it (before, the server ran targets in turn within the budget and the simulator all
/// targets at once, each with a page's worth).
#[derive(Debug)]
pub struct DeliveryRound {
    /// Targets not started yet, each with whether it is believed up.
    targets: std::collections::VecDeque<(NodeId, bool)>,
    /// Who keeps the hints held for members believed down, when this node is leaving.
    heir: Option<NodeId>,
    budget: usize,
    spent: usize,
    limits: (usize, u64),
    current: Option<HintRun>,
}

impl DeliveryRound {
    /// The round over `targets` (each with whether this node believes it up), spending at
    /// most `budget` hints; `heir` (see [`heir`]) keeps the hints of targets believed down
    /// when this node is leaving; `limits` are a run's page size and request timeout. Its
    /// steps are each for the target named beside it.
    pub fn start(
        state: &ClusterState,
        (targets, heir): (Vec<(NodeId, bool)>, Option<NodeId>),
        budget: usize,
        limits: (usize, u64),
    ) -> (DeliveryRound, Vec<(NodeId, HintStep)>) {
        let mut round = DeliveryRound {
            targets: targets.into(),
            heir,
            budget,
            spent: 0,
            limits,
            current: None,
        };
        let steps = round.next_target(state);
        (round, steps)
    }

    /// The target whose run is in progress.
    pub fn target(&self) -> Option<&NodeId> {
        self.current.as_ref().map(HintRun::target)
    }

    /// Start the next target's run (skipping those whose hints are held), or end the round.
    fn next_target(&mut self, state: &ClusterState) -> Vec<(NodeId, HintStep)> {
        while let Some((target, up)) = self.targets.pop_front() {
            let left = self.budget.saturating_sub(self.spent);
            let heir = self.heir.as_ref();
            if let Some((run, steps)) =
                HintRun::start(state, (&target, up), heir, left, self.limits)
            {
                self.current = Some(run);
                return steps.into_iter().map(|s| (target.clone(), s)).collect();
            }
        }
        self.current = None;
        Vec::new()
    }

    /// Feed an outcome of the current target's run (`target`: the one it is for; an outcome
    /// for another is ignored).
    pub fn handle(
        &mut self,
        state: &ClusterState,
        n_val: impl Fn(&str) -> u32,
        target: &NodeId,
        event: HintEvent,
    ) -> Vec<(NodeId, HintStep)> {
        let Some(run) = self.current.as_mut() else {
            return Vec::new();
        };
        if run.target() != target {
            return Vec::new();
        }
        let mut steps: Vec<(NodeId, HintStep)> = run
            .handle(state, n_val, event)
            .into_iter()
            .map(|s| (target.clone(), s))
            .collect();
        if run.finished() {
            self.spent = self.spent.saturating_add(run.routed());
            steps.extend(self.next_target(state));
        }
        steps
    }

    /// Every target's run is over.
    pub fn finished(&self) -> bool {
        self.current.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberStatus;

    use crate::test_support::{id, member};

    /// A leaving node hands the hints it holds for a member believed down over to an heir
    /// (the first staying member believed up), which keeps them for the same target; a
    /// staying node holds them, and so does a leaver with no heir.
    #[test]
    fn a_leaver_hands_hints_for_a_down_target_over_to_an_heir() {
        let mut state = crate::test_support::settled_cluster(&["a", "b", "c", "d"], 8);
        let (a, b, c) = (id("a"), id("b"), id("c"));
        assert_eq!(heir(&state, &c, |_| true), None, "c stays");
        state.request_leave(&c).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(heir(&state, &c, |_| true), Some(a.clone()));
        assert_eq!(heir(&state, &c, |n| *n != a), Some(b.clone()), "a is down");
        assert_eq!(heir(&state, &c, |_| false), None, "nobody is up");
        // b is down: a staying node holds its hints, and so does a leaver without an heir.
        assert!(HintRound::<Vec<u8>, Vec<u8>>::start(&state, &b, false, None, 10).is_none());
        assert!(
            HintRound::<Vec<u8>, Vec<u8>>::start(&state, &b, false, Some(&b), 10).is_none(),
            "the target is not its own heir"
        );
        let mut round = HintRound::start(&state, &b, false, Some(&a), 10)
            .unwrap_or_else(|| panic!("c hands b's hints over"));
        let page = vec![(keys::hint_key("b", b"x", b"k"), encoded_object())];
        let routed = round.route_page(page.clone(), &state, |_| 3);
        assert_eq!(routed.sends.len(), 1);
        let send = &routed.sends[0];
        assert_eq!(send.to, a);
        assert!(
            matches!(&send.message, PeerMessage::HintedPut { target, key, object, .. }
                if target == "b" && key == "k" && *object == page[0].1),
            "{:?}",
            send.message
        );
        assert_eq!(
            round.on_reply(&send.hints, true).len(),
            1,
            "released once kept"
        );
    }

    /// One version of a key, encoded as a hint holds it.
    fn encoded_object() -> Vec<u8> {
        crate::test_support::version(b"", 1).encode()
    }

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
        let object = |v: &str| crate::test_support::version(v.as_bytes(), 1).encode();
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
        let mut round = HintRound::start(&state, &id("b"), true, None, 100)
            .unwrap_or_else(|| panic!("b is up"));
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
            HintRound::start(&state, &id("b"), true, None, 5).unwrap_or_else(|| panic!("b is up"));
        let routed = small.route_page(page, &state, |_| 2);
        assert!(routed.budget_spent);
        assert_eq!(small.routed(), 5);
    }

    #[test]
    fn a_down_member_holds_its_hints() {
        assert!(HintRound::<u8, u8>::start(&state(), &id("b"), false, None, 10).is_none());
        assert!(HintRound::<u8, u8>::start(&state(), &id("b"), true, None, 0).is_none());
        assert!(HintRound::<u8, u8>::start(&state(), &id("b"), true, None, 10).is_some());
        // A node that is no member any more (it left and was removed): deliver elsewhere.
        let mut round = HintRound::<u8, u8>::start(&state(), &id("gone"), false, None, 10)
            .unwrap_or_else(|| panic!("hints of a non-member move on"));
        assert_eq!(
            round.route(1, 1, &[id("a"), id("c")]),
            Some(HintRoute::Replicas(vec![id("a"), id("c")]))
        );
    }

    #[test]
    fn a_hint_goes_to_its_target_and_is_released_on_its_ack() {
        let mut round = HintRound::start(&state(), &id("b"), true, None, 10)
            .unwrap_or_else(|| panic!("b is up"));
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
        let mut round = HintRound::start(&state(), &id("b"), true, None, 10)
            .unwrap_or_else(|| panic!("b is up"));
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
        let mut round = HintRound::start(&state(), &id("gone"), true, None, 10)
            .unwrap_or_else(|| panic!("moves on"));
        assert_eq!(round.route("k", 1, &[]), Some(HintRoute::Replicas(vec![])));
        assert!(round.settled());
        assert!(round.on_reply(&["k"], true).is_empty());
    }

    #[test]
    fn the_budget_bounds_a_round() {
        let mut round = HintRound::start(&state(), &id("b"), true, None, 2)
            .unwrap_or_else(|| panic!("b is up"));
        let pl = [id("b")];
        assert!(round.route(1, 0, &pl).is_some());
        assert!(round.route(2, 0, &pl).is_some());
        assert_eq!(round.route(3, 0, &pl), None);
        assert_eq!(round.routed(), 2);
    }

    #[test]
    fn a_large_batch_gets_more_time_up_to_five_request_timeouts() {
        let batch = |bytes: usize| PeerMessage::Handoff {
            entries: vec![HandoffEntry {
                bucket: "b".into(),
                key: "k".into(),
                object: vec![0; bytes],
            }],
            ring_version: 1,
        };
        assert_eq!(send_timeout_ms(&batch(10), 100), 100);
        assert_eq!(send_timeout_ms(&batch(2 * 1024 * 1024), 100), 300);
        assert_eq!(send_timeout_ms(&batch(64 * 1024 * 1024), 100), 500);
        assert_eq!(send_timeout_ms(&PeerMessage::ListBuckets, 100), 100);
    }

    /// A run reads a page, sends it, deletes what was acknowledged, reads the next page only
    /// once every send came back, and stops at a failed delivery.
    #[test]
    fn a_hint_run_pages_one_at_a_time_and_stops_at_a_failure() {
        let state = crate::test_support::settled_cluster(&["a", "b"], 8);
        let object = encoded_object();
        let hints: Vec<Entry> = (0..10)
            .map(|i| {
                let key = format!("k{i:02}");
                (keys::hint_key("b", b"x", key.as_bytes()), object.clone())
            })
            .collect();
        let (mut run, steps) = HintRun::start(&state, (&id("b"), true), None, 100, (4, 50))
            .unwrap_or_else(|| panic!("b is up"));
        assert_eq!(
            steps,
            [HintStep::ReadPage {
                after: None,
                limit: 4
            }]
        );
        let n_val = |_: &str| 2;
        let steps = run.handle(&state, n_val, HintEvent::Page(hints[..4].to_vec()));
        let [
            HintStep::Send {
                tag,
                to,
                message,
                timeout_ms,
            },
        ] = steps.as_slice()
        else {
            panic!("one batch to b: {steps:?}");
        };
        assert_eq!(
            (to, *timeout_ms),
            (&id("b"), 50),
            "a small batch: one request timeout"
        );
        assert!(
            matches!(**message, PeerMessage::Handoff { ref entries, .. } if entries.len() == 4)
        );
        // Acknowledged: the four are deleted and the next page (after the last) is read.
        let steps = run.handle(
            &state,
            n_val,
            HintEvent::Reply {
                tag: *tag,
                ok: true,
            },
        );
        let deletes = steps
            .iter()
            .filter(|s| matches!(s, HintStep::Delete { corrupt: false, .. }))
            .count();
        assert_eq!(deletes, 4);
        let after = Some(hints[3].0.clone());
        assert!(
            steps.contains(&HintStep::ReadPage { after, limit: 4 }),
            "{steps:?}"
        );
        let steps = run.handle(&state, n_val, HintEvent::Page(hints[4..8].to_vec()));
        let [HintStep::Send { tag, .. }] = steps.as_slice() else {
            panic!("{steps:?}");
        };
        // Not acknowledged: nothing deleted, no further page, the run ends.
        let steps = run.handle(
            &state,
            n_val,
            HintEvent::Reply {
                tag: *tag,
                ok: false,
            },
        );
        assert!(steps.is_empty(), "{steps:?}");
        assert!(run.finished());
        // A held target (a member believed down) gets no run at all.
        assert!(HintRun::start(&state, (&id("b"), false), None, 100, (4, 50)).is_none());
    }

    /// A delivery round runs its targets one after another: a target that is down keeps its
    /// hints, each later target gets what the earlier ones left of the round's budget, and an
    /// outcome for another target than the current one is ignored.
    #[test]
    fn a_delivery_round_runs_targets_in_turn_within_one_budget() {
        let state = crate::test_support::settled_cluster(&["a", "b", "c", "d"], 8);
        let object = encoded_object();
        let hints = |target: &str, n: usize| -> Vec<Entry> {
            (0..n)
                .map(|i| {
                    let key = format!("k{i:02}");
                    (keys::hint_key(target, b"x", key.as_bytes()), object.clone())
                })
                .collect()
        };
        let n_val = |_: &str| 3;
        let targets = vec![(id("b"), false), (id("c"), true), (id("d"), true)];
        let (mut round, steps) = DeliveryRound::start(&state, (targets, None), 10, (100, 50));
        // b is down: c's run starts at once.
        assert_eq!(round.target(), Some(&id("c")));
        assert!(matches!(steps.as_slice(), [(t, HintStep::ReadPage { .. })] if *t == id("c")));
        // An outcome for d (not started) changes nothing.
        let ignored = round.handle(&state, n_val, &id("d"), HintEvent::Page(hints("d", 3)));
        assert!(ignored.is_empty());
        // c's page: 7 hints routed (its budget is 10), all of them to c or moved.
        let steps = round.handle(&state, n_val, &id("c"), HintEvent::Page(hints("c", 7)));
        let sends: Vec<u64> = steps
            .iter()
            .filter_map(|(_, s)| match s {
                HintStep::Send { tag, .. } => Some(*tag),
                _ => None,
            })
            .collect();
        assert!(!sends.is_empty());
        let mut next = Vec::new();
        for tag in sends {
            next = round.handle(&state, n_val, &id("c"), HintEvent::Reply { tag, ok: true });
        }
        // c is done (a short page): d's run starts with what is left, 3.
        assert_eq!(round.target(), Some(&id("d")));
        assert!(
            next.iter()
                .any(|(t, s)| *t == id("d") && matches!(s, HintStep::ReadPage { after: None, .. }))
        );
        let steps = round.handle(&state, n_val, &id("d"), HintEvent::Page(hints("d", 8)));
        let routed: usize = steps
            .iter()
            .filter_map(|(_, s)| match s {
                HintStep::Send { message, .. } => Some(match &**message {
                    PeerMessage::Handoff { entries, .. } => entries.len(),
                    _ => 1,
                }),
                _ => None,
            })
            .sum();
        assert!(
            routed >= 3,
            "three hints routed (a moved one goes to each replica)"
        );
        let keys_sent: std::collections::BTreeSet<String> = steps
            .iter()
            .filter_map(|(_, s)| match s {
                HintStep::Send { message, .. } => Some(match &**message {
                    PeerMessage::Handoff { entries, .. } => {
                        entries.iter().map(|e| e.key.clone()).collect::<Vec<_>>()
                    }
                    PeerMessage::ReplicaPut { key, .. } => vec![key.clone()],
                    _ => vec![],
                }),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(keys_sent.len(), 3, "the budget left: {keys_sent:?}");
        assert!(!round.finished());
    }
}
