//! Active anti-entropy as state machines (paper 4.7): which partitions a node compares in a
//! round and with whom ([`AaeRound`]), and the steps of one partition's exchange with one peer
//! ([`AaeExchange`]): segment hashes, then the leaves of differing segments, then the keys of
//! differing leaves, then both versions of each differing key, repaired to their `sync`.
//!
//! Sans-IO: the server drives these with its peer transport and storage, the simulator with
//! simulated messages and memory, so the order of the steps, what is compared, when an
//! exchange ends and how the repair budget is spent are the same code in both. A driver calls
//! `start`, sends the returned [`AaeAsk`] to the peer, and feeds the answer (with its own side
//! of the comparison) to the matching `on_*` method, until [`AaeStep::Done`].
//!
//! Invariants:
//! - an exchange descends only into what differs: leaves only of differing segments, keys
//!   only of differing leaves;
//! - at most `budget` keys are repaired (the smaller of this node's and the peer's budget,
//!   paper 6.5's admission control); keys are compared in key order, so a later round
//!   resumes where the budget stopped;
//! - an answer out of order (a step the exchange is not at) or a failed step ends the
//!   exchange with what was repaired so far; it never repairs a key twice.

use crate::aae_trees::AaeTrees;
use crate::bucket::BucketProps;
use crate::coordinator::KeyRepair;
use crate::membership::ClusterState;
use crate::merkle::{self, Hash};
use crate::message::PeerMessage;
use crate::object::Object;
use crate::ring::{NodeId, PartitionId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the anti-entropy exchanges of one partition did (the server's `admin aae`): the
/// server and `Node` keep one per partition, for completed exchanges only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AaeRecord {
    /// When the last exchange completed (the node's monotonic clock, in ms), and with whom.
    pub last_exchange_ms: Option<u64>,
    pub last_peer: Option<NodeId>,
    pub keys_repaired_last: u64,
    pub keys_repaired_total: u64,
    pub exchanges: u64,
}

impl AaeRecord {
    /// An exchange with `peer` completed at `now_ms`, having repaired `repaired` keys.
    pub fn completed(&mut self, now_ms: u64, peer: &NodeId, repaired: usize) {
        let repaired = u64::try_from(repaired).unwrap_or(u64::MAX);
        self.last_exchange_ms = Some(now_ms);
        self.last_peer = Some(peer.clone());
        self.keys_repaired_last = repaired;
        self.keys_repaired_total = self.keys_repaired_total.saturating_add(repaired);
        self.exchanges = self.exchanges.saturating_add(1);
    }
}

/// The partitions a node compares in one round, each with the peer it compares it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AaeRound {
    exchanges: VecDeque<(PartitionId, NodeId)>,
    budget: usize,
    repaired: usize,
}

impl AaeRound {
    /// The round numbered `round`: every partition whose preference list (for the `n_val`
    /// of `default_props`, the properties of a bucket that sets none: the node's configured
    /// defaults) names `me` is compared with one of its other replicas believed up, taken in
    /// turn (`round` modulo their number), so over successive rounds every pair is compared.
    /// Nothing is compared during a ring transition (handoff moves the keys then). `budget`
    /// bounds the keys repaired over the whole round. (The replica count is taken from the
    /// default properties here, in one place, for the server and `Node` alike.)
    pub fn plan(
        state: &ClusterState,
        me: &NodeId,
        default_props: &BucketProps,
        round: usize,
        budget: usize,
        is_up: impl Fn(&NodeId) -> bool,
    ) -> AaeRound {
        let n_val = default_props.n_val;
        let mut exchanges = VecDeque::new();
        if state.ring.next.is_none() {
            for partition in 0..state.ring.current.partition_count() {
                let replicas = state.preference_list(partition, n_val);
                if !replicas.contains(me) {
                    continue;
                }
                let peers: Vec<&NodeId> =
                    replicas.iter().filter(|n| *n != me && is_up(n)).collect();
                if peers.is_empty() {
                    continue;
                }
                exchanges.push_back((partition, peers[round % peers.len()].clone()));
            }
        }
        AaeRound {
            exchanges,
            budget,
            repaired: 0,
        }
    }

    /// The next exchange of the round (with what is left of the budget), or `None` when the
    /// round is over: every partition done, or the budget spent.
    pub fn next_exchange<K: Ord + Clone>(&mut self) -> Option<(NodeId, AaeExchange<K>, AaeAsk)> {
        if self.repaired >= self.budget {
            self.exchanges.clear();
            return None;
        }
        let (partition, peer) = self.exchanges.pop_front()?;
        let (exchange, ask) = AaeExchange::start(partition, self.budget - self.repaired);
        Some((peer, exchange, ask))
    }

    /// Count the keys an exchange repaired against the round's budget.
    pub fn finished(&mut self, repaired: usize) {
        self.repaired += repaired;
    }

    /// Keys repaired so far in this round.
    pub fn repaired(&self) -> usize {
        self.repaired
    }

    /// The round's budget of repaired keys.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Exchanges not started yet.
    pub fn remaining(&self) -> usize {
        self.exchanges.len()
    }
}

/// What to ask the peer for next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AaeAsk {
    /// The partition's segment hashes (and the peer's repair budget).
    Segments,
    /// The leaf hashes of these segments.
    Leaves(Vec<u16>),
    /// The keys, with entry hashes, of these leaves.
    Keys(Vec<u16>),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AaeStep<K> {
    /// Send this to the peer; feed its answer to the matching `on_*` method.
    Ask(AaeAsk),
    /// Read this node's and the peer's version of each key, in order, and feed each pair to
    /// [`AaeExchange::on_versions`] (stop early when it says the budget is spent).
    Compare(Vec<K>),
    /// The exchange is over.
    Done { repaired: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Segments,
    Leaves(Vec<u16>),
    Keys(Vec<u16>),
    Comparing,
    Done,
}

/// One partition's exchange with one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AaeExchange<K> {
    partition: PartitionId,
    budget: usize,
    repaired: usize,
    stage: Stage,
    comparing: BTreeSet<K>,
}

impl<K: Ord + Clone> AaeExchange<K> {
    /// Start an exchange of `partition` that repairs at most `budget` keys.
    pub fn start(partition: PartitionId, budget: usize) -> (AaeExchange<K>, AaeAsk) {
        let exchange = AaeExchange {
            partition,
            budget,
            repaired: 0,
            stage: Stage::Segments,
            comparing: BTreeSet::new(),
        };
        (exchange, AaeAsk::Segments)
    }

    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The segments whose leaves were asked for (this node's side of `on_leaves`).
    pub fn segments_asked(&self) -> &[u16] {
        match &self.stage {
            Stage::Leaves(segments) => segments,
            _ => &[],
        }
    }

    /// The leaves whose keys were asked for (this node's side of `on_keys`).
    pub fn leaves_asked(&self) -> &[u16] {
        match &self.stage {
            Stage::Keys(leaves) => leaves,
            _ => &[],
        }
    }

    fn done(&mut self) -> AaeStep<K> {
        self.stage = Stage::Done;
        self.comparing.clear();
        AaeStep::Done {
            repaired: self.repaired,
        }
    }

    /// Both sides' segment hashes; `peer_budget` is the repair budget the peer stated, if it
    /// states one (the exchange repairs at most the smaller budget).
    pub fn on_segments(
        &mut self,
        ours: &[Hash],
        theirs: &[Hash],
        peer_budget: Option<usize>,
    ) -> AaeStep<K> {
        if self.stage != Stage::Segments {
            return self.done();
        }
        if let Some(peer_budget) = peer_budget {
            self.budget = self.budget.min(peer_budget);
        }
        let segments = merkle::differing_segments(ours, theirs);
        if segments.is_empty() || self.budget == 0 {
            return self.done();
        }
        self.stage = Stage::Leaves(segments.clone());
        AaeStep::Ask(AaeAsk::Leaves(segments))
    }

    /// Both sides' leaf hashes of the segments asked for ([`Self::segments_asked`]).
    pub fn on_leaves(&mut self, ours: &[(u16, Hash)], theirs: &[(u16, Hash)]) -> AaeStep<K> {
        let Stage::Leaves(segments) = &self.stage else {
            return self.done();
        };
        // Only leaves of the segments asked for count, whatever else the peer sent.
        let asked: BTreeSet<u16> = segments.iter().copied().collect();
        let in_asked =
            |leaf: &u16| asked.contains(&((*leaf as usize / merkle::LEAVES_PER_SEGMENT) as u16));
        let ours: Vec<(u16, Hash)> = ours.iter().filter(|(l, _)| in_asked(l)).copied().collect();
        let theirs: Vec<(u16, Hash)> = theirs
            .iter()
            .filter(|(l, _)| in_asked(l))
            .copied()
            .collect();
        // A leaf either side lists and the other does not differs too.
        let mut leaves: BTreeSet<u16> = merkle::differing_leaves(&ours, &theirs)
            .into_iter()
            .collect();
        leaves.extend(merkle::differing_leaves(&theirs, &ours));
        if leaves.is_empty() {
            return self.done();
        }
        let leaves: Vec<u16> = leaves.into_iter().collect();
        self.stage = Stage::Keys(leaves.clone());
        AaeStep::Ask(AaeAsk::Keys(leaves))
    }

    /// Both sides' keys (with entry hashes) of the leaves asked for
    /// ([`Self::leaves_asked`]). `replicated_by_both` says whether both nodes replicate a key
    /// (a tree covers a partition, but a bucket's `n_val` decides a key's replicas): other
    /// keys are skipped.
    pub fn on_keys(
        &mut self,
        ours: &BTreeMap<K, Hash>,
        theirs: &BTreeMap<K, Hash>,
        replicated_by_both: impl Fn(&K) -> bool,
    ) -> AaeStep<K> {
        if !matches!(self.stage, Stage::Keys(_)) {
            return self.done();
        }
        let keys: Vec<K> = merkle::differing_keys(ours, theirs)
            .into_iter()
            .filter(|k| replicated_by_both(k))
            .take(self.budget - self.repaired)
            .collect();
        if keys.is_empty() {
            return self.done();
        }
        self.stage = Stage::Comparing;
        self.comparing = keys.iter().cloned().collect();
        AaeStep::Compare(keys)
    }

    /// Both versions of one key listed by [`AaeStep::Compare`]: the repair to perform (merge
    /// `merged` here when `store_local`, send it to the peer when `store_remote`), or `None`
    /// when there is nothing to do (neither holds it, the key was not listed or already
    /// compared, or the budget is spent).
    pub fn on_versions(
        &mut self,
        key: &K,
        local: Option<&Object>,
        remote: Option<&Object>,
    ) -> Option<KeyRepair> {
        if self.stage != Stage::Comparing
            || self.repaired >= self.budget
            || !self.comparing.remove(key)
        {
            return None;
        }
        let repair = KeyRepair::of(local, remote)?;
        if repair.repairs() {
            self.repaired += 1;
        }
        Some(repair)
    }

    /// A key listed by [`AaeStep::Compare`] whose versions could not be read (a failed fetch):
    /// it is left for a later round.
    pub fn skip(&mut self, key: &K) {
        self.comparing.remove(key);
    }

    /// Keys listed for comparison and not compared yet.
    pub fn pending(&self) -> usize {
        self.comparing.len()
    }

    /// True when the driver should stop comparing keys: every listed key is compared, or the
    /// budget is spent. Then call [`Self::finish`].
    pub fn compared_all(&self) -> bool {
        self.stage == Stage::Comparing
            && (self.comparing.is_empty() || self.repaired >= self.budget)
    }

    /// End the exchange (after the comparisons, or when a step failed).
    pub fn finish(&mut self) -> AaeStep<K> {
        self.done()
    }

    /// Keys repaired so far.
    pub fn repaired(&self) -> usize {
        self.repaired
    }

    /// True once the exchange is over.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }
}

impl AaeAsk {
    /// The request that asks it of a peer, for `partition`.
    pub fn message(self, partition: PartitionId) -> PeerMessage {
        match self {
            AaeAsk::Segments => PeerMessage::AaeSegments { partition },
            AaeAsk::Leaves(segments) => PeerMessage::AaeLeaves {
                partition,
                segments,
            },
            AaeAsk::Keys(leaves) => PeerMessage::AaeKeys { partition, leaves },
        }
    }
}

/// A key of an exchange: bucket and key.
pub type BucketKey = (String, String);

impl AaeExchange<BucketKey> {
    /// Feed the peer's answer to the last question. This node's side: hashes from `trees`,
    /// and for a key listing `our_keys(leaves asked)` (the caller reads the index, perhaps
    /// ahead of the answer, perhaps off its async workers); `shared` says whether both nodes
    /// replicate a key (buckets with other `n_val`s differ legitimately). The server and the
    /// simulator both call this.
    ///
    /// # Errors
    /// The answer is not one to an anti-entropy question, or `our_keys` failed.
    pub fn on_answer(
        &mut self,
        trees: &AaeTrees,
        answer: PeerMessage,
        our_keys: impl FnOnce(&BTreeSet<u16>) -> Result<Vec<(String, String, Hash)>, String>,
        shared: impl Fn(&BucketKey) -> bool,
    ) -> Result<AaeStep<BucketKey>, String> {
        let partition = self.partition;
        match answer {
            PeerMessage::AaeHashes { hashes, budget } => {
                let ours = trees.segments(partition);
                Ok(self.on_segments(&ours, &hashes, Some(budget as usize)))
            }
            PeerMessage::AaeLeafHashes { leaves } => {
                let ours = trees.segment_leaves(partition, self.segments_asked());
                Ok(self.on_leaves(&ours, &leaves))
            }
            PeerMessage::AaeKeyHashes { entries, .. } => {
                let asked: BTreeSet<u16> = self.leaves_asked().iter().copied().collect();
                let ours: BTreeMap<BucketKey, Hash> = our_keys(&asked)?
                    .into_iter()
                    .map(|(b, k, h)| ((b, k), h))
                    .collect();
                let theirs: BTreeMap<BucketKey, Hash> =
                    entries.into_iter().map(|(b, k, h)| ((b, k), h)).collect();
                Ok(self.on_keys(&ours, &theirs, shared))
            }
            other => Err(format!("answered {}", other.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{MerkleTree, entry_hash, leaf_of};
    use crate::object::{Content, PrunePolicy};
    use crate::version::{ActorId, VersionVector};

    #[test]
    fn a_record_counts_completed_exchanges() {
        let mut record = AaeRecord::default();
        let peer = NodeId("b".into());
        record.completed(10, &peer, 3);
        record.completed(20, &peer, 0);
        assert_eq!(record.last_exchange_ms, Some(20));
        assert_eq!(record.last_peer, Some(peer));
        assert_eq!(record.keys_repaired_last, 0);
        assert_eq!(record.keys_repaired_total, 3);
        assert_eq!(record.exchanges, 2);
    }

    /// One side of an exchange: a tree and the entries it was built from.
    struct Side {
        tree: MerkleTree,
        keys: BTreeMap<String, Hash>,
        objects: BTreeMap<String, Object>,
    }

    impl Side {
        fn new() -> Self {
            Side {
                tree: MerkleTree::new(),
                keys: BTreeMap::new(),
                objects: BTreeMap::new(),
            }
        }

        fn put(&mut self, key: &str, object: Object) {
            let bytes = object.encode();
            let hash = entry_hash(b"b", key.as_bytes(), &bytes);
            let leaf = leaf_of(b"b", key.as_bytes());
            let old = self.keys.insert(key.to_owned(), hash);
            self.tree.update(leaf, old.as_ref(), Some(&hash));
            self.objects.insert(key.to_owned(), object);
        }

        fn leaf_keys(&self, leaves: &[u16]) -> BTreeMap<String, Hash> {
            self.keys
                .iter()
                .filter(|(k, _)| leaves.contains(&leaf_of(b"b", k.as_bytes())))
                .map(|(k, h)| (k.clone(), *h))
                .collect()
        }
    }

    fn object(actor: u64, value: &str) -> Object {
        let content = Content {
            value: value.as_bytes().to_vec(),
            ..Content::default()
        };
        Object::new()
            .update(
                &VersionVector::default(),
                content,
                ActorId(actor),
                1,
                PrunePolicy::default(),
            )
            .unwrap_or_else(|e| panic!("a first write succeeds: {e:?}"))
    }

    /// Drive one exchange between `a` (this node) and `b` (the peer) to the end, applying
    /// every repair to both sides, and return what the driver was asked along the way.
    fn run(a: &mut Side, b: &mut Side, budget: usize) -> (usize, Vec<AaeAsk>) {
        let (mut exchange, ask) = AaeExchange::<String>::start(0, budget);
        let mut asks = vec![ask];
        let mut step = exchange.on_segments(&a.tree.segments(), &b.tree.segments(), None);
        loop {
            step = match step {
                AaeStep::Ask(AaeAsk::Leaves(segments)) => {
                    asks.push(AaeAsk::Leaves(segments.clone()));
                    let ours = a.tree.segment_leaves(exchange.segments_asked());
                    exchange.on_leaves(&ours, &b.tree.segment_leaves(&segments))
                }
                AaeStep::Ask(AaeAsk::Keys(leaves)) => {
                    asks.push(AaeAsk::Keys(leaves.clone()));
                    let ours = a.leaf_keys(exchange.leaves_asked());
                    exchange.on_keys(&ours, &b.leaf_keys(&leaves), |_| true)
                }
                AaeStep::Compare(keys) => {
                    for key in keys {
                        if exchange.compared_all() {
                            break;
                        }
                        let local = a.objects.get(&key).cloned();
                        let remote = b.objects.get(&key).cloned();
                        if let Some(repair) =
                            exchange.on_versions(&key, local.as_ref(), remote.as_ref())
                        {
                            if repair.store_local {
                                a.put(&key, repair.merged.clone());
                            }
                            if repair.store_remote {
                                b.put(&key, repair.merged);
                            }
                        }
                    }
                    exchange.finish()
                }
                AaeStep::Ask(AaeAsk::Segments) => unreachable!("asked once, at start"),
                AaeStep::Done { repaired } => return (repaired, asks),
            };
        }
    }

    #[test]
    fn equal_sides_stop_after_the_segment_hashes() {
        let (mut a, mut b) = (Side::new(), Side::new());
        for i in 0..50 {
            let o = object(1, &format!("v{i}"));
            a.put(&format!("k{i}"), o.clone());
            b.put(&format!("k{i}"), o);
        }
        let (repaired, asks) = run(&mut a, &mut b, 100);
        assert_eq!(repaired, 0);
        assert_eq!(asks, vec![AaeAsk::Segments]);
    }

    #[test]
    fn an_exchange_repairs_exactly_the_differing_keys_on_both_sides() {
        let (mut a, mut b) = (Side::new(), Side::new());
        for i in 0..200 {
            let o = object(1, &format!("v{i}"));
            a.put(&format!("k{i}"), o.clone());
            b.put(&format!("k{i}"), o);
        }
        a.put("only-a", object(2, "a"));
        b.put("only-b", object(3, "b"));
        // A concurrent write on each side of k7: both must end with both siblings.
        a.put("k7", a.objects["k7"].sync(&object(4, "x")));
        b.put("k7", b.objects["k7"].sync(&object(5, "y")));
        let (repaired, asks) = run(&mut a, &mut b, 100);
        assert_eq!(repaired, 3);
        // It descended: one leaves request and one keys request, each of a few entries only.
        assert_eq!(asks.len(), 3);
        let AaeAsk::Keys(leaves) = &asks[2] else {
            panic!("third ask is the keys: {asks:?}");
        };
        assert!(leaves.len() <= 3, "{leaves:?}");
        assert_eq!(a.keys, b.keys);
        assert_eq!(a.tree.root(), b.tree.root());
        assert_eq!(a.objects["k7"].siblings().len(), 3);
        // A second exchange finds nothing.
        assert_eq!(run(&mut a, &mut b, 100).0, 0);
    }

    #[test]
    fn the_budget_bounds_the_repairs_and_later_exchanges_finish_the_work() {
        let (mut a, mut b) = (Side::new(), Side::new());
        for i in 0..30 {
            a.put(&format!("k{i}"), object(1, &format!("v{i}")));
        }
        assert_eq!(run(&mut a, &mut b, 7).0, 7);
        assert_eq!(b.keys.len(), 7);
        let mut rounds = 1;
        while run(&mut a, &mut b, 7).0 > 0 {
            rounds += 1;
        }
        assert_eq!(rounds, 5);
        assert_eq!(a.keys, b.keys);
    }

    #[test]
    fn the_peers_budget_caps_the_exchange() {
        let (mut exchange, _) = AaeExchange::<String>::start(3, 100);
        let theirs = vec![[1u8; 16]; merkle::SEGMENTS];
        let ours = vec![[0u8; 16]; merkle::SEGMENTS];
        assert!(matches!(
            exchange.on_segments(&ours, &theirs, Some(0)),
            AaeStep::Done { repaired: 0 }
        ));
        assert!(exchange.is_done());
    }

    #[test]
    fn answers_out_of_order_end_the_exchange_and_repair_nothing() {
        let (mut exchange, _) = AaeExchange::<String>::start(0, 10);
        // Keys before the segments were compared: ignored, the exchange ends.
        let keys: BTreeMap<String, Hash> = [("k".to_owned(), [1; 16])].into();
        assert!(matches!(
            exchange.on_keys(&keys, &BTreeMap::new(), |_| true),
            AaeStep::Done { repaired: 0 }
        ));
        assert_eq!(
            exchange.on_versions(&"k".to_owned(), Some(&object(1, "v")), None),
            None
        );
        // A key that was never listed is not repaired either.
        let (mut exchange, _) = AaeExchange::<String>::start(0, 10);
        let segments = vec![[0u8; 16]; merkle::SEGMENTS];
        let mut other = segments.clone();
        other[0] = [9; 16];
        let step = exchange.on_segments(&segments, &other, None);
        assert_eq!(step, AaeStep::Ask(AaeAsk::Leaves(vec![0])));
        let step = exchange.on_leaves(&[(0, [0; 16])], &[(0, [1; 16])]);
        assert_eq!(step, AaeStep::Ask(AaeAsk::Keys(vec![0])));
        let ours: BTreeMap<String, Hash> = [("a".to_owned(), [1; 16])].into();
        assert_eq!(
            exchange.on_keys(&ours, &BTreeMap::new(), |_| true),
            AaeStep::Compare(vec!["a".to_owned()])
        );
        assert_eq!(
            exchange.on_versions(&"zzz".to_owned(), Some(&object(1, "v")), None),
            None
        );
        assert!(
            exchange
                .on_versions(&"a".to_owned(), Some(&object(1, "v")), None)
                .is_some()
        );
        // Compared once only.
        assert_eq!(
            exchange.on_versions(&"a".to_owned(), Some(&object(1, "v")), None),
            None
        );
        assert!(exchange.compared_all());
    }

    #[test]
    fn leaves_the_peer_sent_outside_the_asked_segments_are_ignored() {
        let (mut exchange, _) = AaeExchange::<String>::start(0, 10);
        let segments = vec![[0u8; 16]; merkle::SEGMENTS];
        let mut other = segments.clone();
        other[1] = [9; 16];
        assert_eq!(
            exchange.on_segments(&segments, &other, None),
            AaeStep::Ask(AaeAsk::Leaves(vec![1]))
        );
        // Leaf 0 is in segment 0, not asked for.
        assert!(matches!(
            exchange.on_leaves(&[], &[(0, [5; 16])]),
            AaeStep::Done { .. }
        ));
    }

    #[test]
    fn a_round_pairs_each_replicated_partition_with_an_up_peer_in_turn() {
        let me = NodeId("a".into());
        let state = crate::test_support::settled_cluster(&["a", "b", "c"], 8);
        let round0 = AaeRound::plan(&state, &me, &BucketProps::default(), 0, 10, |_| true);
        let round1 = AaeRound::plan(&state, &me, &BucketProps::default(), 1, 10, |_| true);
        assert_eq!(round0.remaining(), 8);
        let peers = |mut r: AaeRound| {
            let mut out = Vec::new();
            while let Some((peer, _, ask)) = r.next_exchange::<String>() {
                assert_eq!(ask, AaeAsk::Segments);
                out.push(peer);
            }
            out
        };
        let (p0, p1) = (peers(round0), peers(round1));
        assert!(p0.iter().zip(&p1).all(|(x, y)| x != y), "{p0:?} {p1:?}");
        // A down peer is never chosen; with every peer down there is nothing to do.
        let b = NodeId("b".into());
        assert!(
            peers(AaeRound::plan(
                &state,
                &me,
                &BucketProps::default(),
                0,
                10,
                |n| *n != b
            ))
            .iter()
            .all(|p| *p != b)
        );
        assert_eq!(
            AaeRound::plan(&state, &me, &BucketProps::default(), 0, 10, |_| false).remaining(),
            0
        );
        // The budget ends the round.
        let mut round = AaeRound::plan(&state, &me, &BucketProps::default(), 0, 2, |_| true);
        assert!(round.next_exchange::<String>().is_some());
        round.finished(2);
        assert!(round.next_exchange::<String>().is_none());
        assert_eq!(round.remaining(), 0);
    }

    /// Drift 2 of issue 18: the plan's replica count is the default properties' `n_val` (the
    /// server once planned with a literal 3 whatever its defaults): with one replica per key
    /// there is no other replica to compare with, with two each partition of this node has
    /// one peer, with three two.
    #[test]
    fn the_plan_uses_the_default_properties_n_val() {
        let me = NodeId("a".into());
        let state = crate::test_support::settled_cluster(&["a", "b", "c", "d"], 16);
        let mine = |n_val: u32| {
            (0..state.ring.current.partition_count())
                .filter(|p| state.preference_list(*p, n_val).contains(&me))
                .count()
        };
        for n_val in [1, 2, 3] {
            let props = BucketProps {
                n_val,
                ..BucketProps::default()
            };
            let plan = AaeRound::plan(&state, &me, &props, 0, 100, |_| true);
            let expected = if n_val == 1 { 0 } else { mine(n_val) };
            assert_eq!(plan.remaining(), expected, "n_val {n_val}");
        }
        assert_ne!(mine(2), mine(3), "the test tells the two apart");
    }
}
