//! Quorum accounting for one client request, apart from the async fan-out (Garage's split):
//! the shell sends to the replicas and feeds each reply in; these trackers say when the
//! request can be answered and with what.
//!
//! Invariants:
//! - a get answers only after `r` replicas replied (a reply that the key is absent counts),
//!   and fails as soon as `r` replies can no longer arrive;
//! - a put succeeds only after `w` acknowledgements from the current preference list and, during
//!   a ring transition, also `w` from the next one; it fails as soon as that is impossible;
//! - the result of a get is the `sync` of every reply, so every causally unrelated version is
//!   returned, and the replicas whose reply differs from it are the read-repair targets.

use crate::object::Object;
use crate::ring::NodeId;
use std::collections::BTreeSet;

/// Progress of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<T> {
    Waiting,
    Done(T),
}

/// Too few replicas answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{replied} of {needed} required replicas answered ({asked} asked{})", because(.why.as_deref()))]
pub struct QuorumFailure {
    pub replied: usize,
    pub needed: usize,
    pub asked: usize,
    /// Why the last replica that failed did (`node: reason`), when the request knows: what
    /// an operator needs to act on a 503.
    pub why: Option<String>,
}

fn because(why: Option<&str>) -> String {
    why.map(|why| format!("; {why}")).unwrap_or_default()
}

/// One replica slot of a sloppy quorum: the node written to, and the primary it stands in for
/// when it is a fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub node: NodeId,
    pub stands_in_for: Option<NodeId>,
}

/// The sloppy quorum of a key: the first `n` nodes of the extended preference list that are
/// up. Each primary that is up gets its own slot; each primary that is down is replaced by the
/// next up node past the first `n` (a fallback, which keeps the write as a hint for it). A down
/// primary with no fallback left is returned in the second list (the coordinator keeps a hint).
pub fn sloppy_slots(
    extended: &[NodeId],
    n: usize,
    is_up: impl Fn(&NodeId) -> bool,
) -> (Vec<Slot>, Vec<NodeId>) {
    let n = n.min(extended.len());
    let (primaries, rest) = extended.split_at(n);
    let mut fallbacks = rest.iter().filter(|node| is_up(node));
    let mut slots = Vec::with_capacity(n);
    let mut unplaced = Vec::new();
    for primary in primaries {
        if is_up(primary) {
            slots.push(Slot {
                node: primary.clone(),
                stands_in_for: None,
            });
        } else if let Some(fallback) = fallbacks.next() {
            slots.push(Slot {
                node: fallback.clone(),
                stands_in_for: Some(primary.clone()),
            });
        } else {
            unplaced.push(primary.clone());
        }
    }
    (slots, unplaced)
}

/// Tracks the replies of a get.
#[derive(Debug, Clone)]
pub struct GetQuorum {
    replicas: Vec<NodeId>,
    needed: usize,
    primaries: Vec<NodeId>,
    needed_primaries: usize,
    replies: Vec<(NodeId, Option<Object>)>,
    failed: BTreeSet<NodeId>,
    answered: bool,
}

impl GetQuorum {
    /// A get over `replicas` needing `r` replies (at least 1). The caller clamps `r` to the
    /// key's `n_val`; when fewer replicas than `r` can be asked, the get fails at its first
    /// reply.
    pub fn new(replicas: Vec<NodeId>, r: usize) -> Self {
        let needed = r.max(1);
        GetQuorum {
            primaries: replicas.clone(),
            needed_primaries: 0,
            replicas,
            needed,
            replies: Vec::new(),
            failed: BTreeSet::new(),
            answered: false,
        }
    }

    pub fn replicas(&self) -> &[NodeId] {
        &self.replicas
    }

    /// Also require `pr` replies from `primaries` (clamped to their number).
    #[must_use]
    pub fn with_primaries(mut self, primaries: Vec<NodeId>, pr: usize) -> Self {
        self.needed_primaries = pr.min(primaries.len());
        self.primaries = primaries;
        self
    }

    fn primary_replies(&self) -> usize {
        self.replies
            .iter()
            .filter(|(n, _)| self.primaries.contains(n))
            .count()
    }

    pub fn needed(&self) -> usize {
        self.needed
    }

    /// Feed one replica's outcome: `Ok(object or none)` or `Err(())` for a failure/timeout.
    /// Returns `Done` exactly once: the merged object, or the quorum failure.
    pub fn on_reply(
        &mut self,
        from: &NodeId,
        reply: Result<Option<Object>, ()>,
    ) -> Progress<Result<Object, QuorumFailure>> {
        if !self.replicas.contains(from)
            || self.failed.contains(from)
            || self.replies.iter().any(|(n, _)| n == from)
        {
            return Progress::Waiting;
        }
        match reply {
            Ok(object) => self.replies.push((from.clone(), object)),
            Err(()) => {
                self.failed.insert(from.clone());
            }
        }
        if self.answered {
            return Progress::Waiting;
        }
        if self.replies.len() >= self.needed && self.primary_replies() >= self.needed_primaries {
            self.answered = true;
            return Progress::Done(Ok(self.merged()));
        }
        let possible_primaries = self
            .primaries
            .iter()
            .filter(|n| self.replicas.contains(n) && !self.failed.contains(n))
            .count();
        if self.replicas.len() - self.failed.len() < self.needed
            || possible_primaries < self.needed_primaries
        {
            self.answered = true;
            return Progress::Done(Err(QuorumFailure {
                replied: self.replies.len(),
                needed: self.needed,
                asked: self.replicas.len(),
                why: None,
            }));
        }
        Progress::Waiting
    }

    /// Whether every replica has replied or failed.
    pub fn complete(&self) -> bool {
        self.replies.len() + self.failed.len() >= self.replicas.len()
    }

    /// The sync of every reply so far.
    pub fn merged(&self) -> Object {
        self.replies
            .iter()
            .filter_map(|(_, o)| o.as_ref())
            .fold(Object::new(), |acc, o| acc.sync(o))
    }

    /// Primaries that replied with something other than `merged` (stale or missing): the
    /// read-repair targets. Replicas that failed, and fallbacks, are not included.
    pub fn repair_targets(&self, merged: &Object) -> Vec<NodeId> {
        if merged.is_empty() {
            return Vec::new();
        }
        self.replies
            .iter()
            .filter(|(n, o)| self.primaries.contains(n) && o.as_ref() != Some(merged))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn count(list: &[NodeId], set: &BTreeSet<NodeId>) -> usize {
    list.iter().filter(|n| set.contains(n)).count()
}

/// Tracks the acknowledgements of a put.
#[derive(Debug, Clone)]
pub struct PutQuorum {
    /// Nodes whose acknowledgements count towards W (primaries and fallbacks standing in).
    current: Vec<NodeId>,
    /// The key's primary replicas, and how many of them must acknowledge (`pw`).
    primaries: Vec<NodeId>,
    needed_primaries: usize,
    next: Option<Vec<NodeId>>,
    needed: usize,
    needed_next: usize,
    acked: BTreeSet<NodeId>,
    failed: BTreeSet<NodeId>,
    answered: bool,
}

impl PutQuorum {
    /// A put to the `current` replica slots (and the `next` preference list during a
    /// transition), needing `w` acknowledgements from each (at least 1; clamped to the next
    /// list's length). The caller clamps `w` to the key's `n_val`; when fewer slots than `w`
    /// exist, the put fails at its first reply.
    pub fn new(current: Vec<NodeId>, next: Option<Vec<NodeId>>, w: usize) -> Self {
        let needed = w.max(1);
        let needed_next = next.as_ref().map_or(0, |n| w.clamp(1, n.len().max(1)));
        PutQuorum {
            primaries: current.clone(),
            needed_primaries: 0,
            current,
            next,
            needed,
            needed_next,
            acked: BTreeSet::new(),
            failed: BTreeSet::new(),
            answered: false,
        }
    }

    /// Also require `pw` acknowledgements from `primaries` (Riak's `pw`; clamped to their
    /// number).
    #[must_use]
    pub fn with_primaries(mut self, primaries: Vec<NodeId>, pw: usize) -> Self {
        self.needed_primaries = pw.min(primaries.len());
        self.primaries = primaries;
        self
    }

    /// `fallback` stands in for `failed` (sloppy quorum): its acknowledgement counts where
    /// `failed`'s would have.
    pub fn substitute(&mut self, failed: &NodeId, fallback: &NodeId) {
        for node in &mut self.current {
            if node == failed {
                *node = fallback.clone();
            }
        }
        self.failed.remove(fallback);
        self.acked.remove(fallback);
        // It still failed: during a transition it may also be in the next list.
        self.failed.insert(failed.clone());
    }

    /// Every node the write must be sent to (current and next lists, without repeats).
    pub fn targets(&self) -> Vec<NodeId> {
        let mut all = self.current.clone();
        for node in self.next.iter().flatten() {
            if !all.contains(node) {
                all.push(node.clone());
            }
        }
        all
    }

    /// Feed one replica's outcome. Returns `Done` exactly once.
    pub fn on_reply(&mut self, from: &NodeId, ok: bool) -> Progress<Result<(), QuorumFailure>> {
        if self.acked.contains(from) || self.failed.contains(from) {
            return Progress::Waiting;
        }
        if ok {
            self.acked.insert(from.clone());
        } else {
            self.failed.insert(from.clone());
        }
        if self.answered {
            return Progress::Waiting;
        }
        let acked_current = count(&self.current, &self.acked);
        let possible_current = self.current.len() - count(&self.current, &self.failed);
        let (acked_next, possible_next) = match &self.next {
            Some(next) => (
                count(next, &self.acked),
                next.len() - count(next, &self.failed),
            ),
            None => (0, 0),
        };
        let acked_primaries = count(&self.primaries, &self.acked);
        let targets = self.targets();
        let possible_primaries = self
            .primaries
            .iter()
            .filter(|n| targets.contains(n) && !self.failed.contains(n))
            .count();
        if acked_current >= self.needed
            && acked_next >= self.needed_next
            && acked_primaries >= self.needed_primaries
        {
            self.answered = true;
            return Progress::Done(Ok(()));
        }
        if possible_current < self.needed
            || possible_next < self.needed_next
            || possible_primaries < self.needed_primaries
        {
            self.answered = true;
            return Progress::Done(Err(QuorumFailure {
                replied: acked_current.min(if self.next.is_some() {
                    acked_next
                } else {
                    acked_current
                }),
                needed: self.needed,
                asked: self.targets().len(),
                why: None,
            }));
        }
        Progress::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{Content, PrunePolicy};
    use crate::version::{ActorId, VersionVector};

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId((*n).to_owned())).collect()
    }

    fn object(value: &str, actor: u64) -> Object {
        Object::new()
            .update(
                &VersionVector::new(),
                Content {
                    value: value.as_bytes().to_vec(),
                    ..Content::default()
                },
                ActorId(actor),
                1,
                PrunePolicy::default(),
            )
            .unwrap()
    }

    #[test]
    fn get_answers_after_r_with_every_version_and_names_repairs() {
        let nodes = ids(&["a", "b", "c"]);
        let mut q = GetQuorum::new(nodes.clone(), 2);
        assert_eq!(
            q.on_reply(&nodes[0], Ok(Some(object("x", 1)))),
            Progress::Waiting
        );
        let Progress::Done(Ok(merged)) = q.on_reply(&nodes[1], Ok(Some(object("y", 2)))) else {
            panic!("expected an answer after 2 replies");
        };
        assert_eq!(merged.siblings().len(), 2, "both concurrent versions");
        assert_eq!(
            q.on_reply(&nodes[2], Ok(None)),
            Progress::Waiting,
            "answers once"
        );
        let all = q.merged();
        let mut targets = q.repair_targets(&all);
        targets.sort();
        assert_eq!(targets, nodes, "each of a, b, c lacks something");
    }

    #[test]
    fn get_fails_as_soon_as_r_is_impossible() {
        let nodes = ids(&["a", "b", "c"]);
        let mut q = GetQuorum::new(nodes.clone(), 2);
        assert_eq!(q.on_reply(&nodes[0], Err(())), Progress::Waiting);
        assert_eq!(
            q.on_reply(&nodes[1], Err(())),
            Progress::Done(Err(QuorumFailure {
                replied: 0,
                needed: 2,
                asked: 3,
                why: None,
            }))
        );
    }

    #[test]
    fn sloppy_slots_replace_down_primaries_with_the_next_up_nodes() {
        let extended = ids(&["a", "b", "c", "d", "e"]);
        let down = ids(&["b", "d"]);
        let (slots, unplaced) = sloppy_slots(&extended, 3, |n| !down.contains(n));
        let nodes: Vec<_> = slots.iter().map(|s| s.node.0.as_str()).collect();
        assert_eq!(nodes, ["a", "e", "c"]);
        assert_eq!(slots[1].stands_in_for, Some(NodeId("b".into())));
        assert!(unplaced.is_empty());
        let (slots, unplaced) = sloppy_slots(&extended[..3], 3, |n| n.0 != "c");
        assert_eq!(slots.len(), 2);
        assert_eq!(unplaced, ids(&["c"]));
    }

    #[test]
    fn pw_and_pr_count_primaries_only() {
        let slots = ids(&["a", "e", "c"]);
        let primaries = ids(&["a", "b", "c"]);
        let mut q = PutQuorum::new(slots.clone(), None, 2).with_primaries(primaries.clone(), 2);
        assert_eq!(q.on_reply(&NodeId("e".into()), true), Progress::Waiting);
        assert_eq!(
            q.on_reply(&NodeId("a".into()), true),
            Progress::Waiting,
            "w met, pw not"
        );
        assert_eq!(
            q.on_reply(&NodeId("c".into()), true),
            Progress::Done(Ok(()))
        );
        let mut g = GetQuorum::new(slots, 2).with_primaries(primaries, 2);
        assert_eq!(g.on_reply(&NodeId("e".into()), Ok(None)), Progress::Waiting);
        assert_eq!(g.on_reply(&NodeId("a".into()), Ok(None)), Progress::Waiting);
        assert!(matches!(
            g.on_reply(&NodeId("c".into()), Err(())),
            Progress::Done(Err(_))
        ));
    }

    #[test]
    fn a_substituted_primary_still_counts_as_failed_in_the_next_list() {
        // Transition: x is in both lists, fails, and spare s stands in for it.
        let mut q = PutQuorum::new(ids(&["a", "x", "c"]), Some(ids(&["a", "x", "d"])), 2);
        assert_eq!(q.on_reply(&NodeId("a".into()), true), Progress::Waiting);
        q.substitute(&NodeId("x".into()), &NodeId("s".into()));
        assert_eq!(q.on_reply(&NodeId("s".into()), true), Progress::Waiting);
        assert!(
            matches!(
                q.on_reply(&NodeId("d".into()), false),
                Progress::Done(Err(_))
            ),
            "next list can no longer reach 2: a decided failure, not a hang"
        );
    }

    #[test]
    fn put_needs_w_from_current_and_next_lists() {
        let current = ids(&["a", "b", "c"]);
        let next = ids(&["a", "b", "d"]);
        let mut q = PutQuorum::new(current.clone(), Some(next), 2);
        assert_eq!(q.targets(), ids(&["a", "b", "c", "d"]));
        assert_eq!(q.on_reply(&NodeId("c".into()), true), Progress::Waiting);
        assert_eq!(q.on_reply(&NodeId("d".into()), true), Progress::Waiting);
        assert_eq!(
            q.on_reply(&NodeId("a".into()), true),
            Progress::Done(Ok(()))
        );
        let mut q = PutQuorum::new(current, Some(ids(&["x", "y", "z"])), 2);
        q.on_reply(&NodeId("a".into()), true);
        q.on_reply(&NodeId("b".into()), true);
        q.on_reply(&NodeId("x".into()), false);
        assert!(matches!(
            q.on_reply(&NodeId("y".into()), false),
            Progress::Done(Err(_))
        ));
    }
}
