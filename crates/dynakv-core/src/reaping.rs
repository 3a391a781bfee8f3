//! One round of tombstone reaping as a sans-IO machine, driven by the simulator's `Node` and
//! by the server: for each tombstone this node may reap (its first primary, past the grace
//! period: [`reap_candidates`](crate::coordinator::reap_candidates)), the core's
//! [`ReapCheck`] asks every other member (each primary must hold exactly these bytes, no member
//! a hint of the key, no non-primary a copy); once it is clear, every other primary is asked
//! to delete the tombstone if unchanged (`Reap`), and this node deletes its own.
//!
//! Invariants: a tombstone is removed only after a clear verdict; a hint this node cannot read
//! blocks the reap of its key; the checks of one round run together, and a round ends once
//! every check has a verdict.

use crate::coordinator::{ReapAnswer, ReapCheck, reap_check_members, reaper_primaries};
use crate::keys;
use crate::membership::ClusterState;
use crate::merkle::{Hash, entry_hash};
use crate::message::PeerMessage;
use crate::ring::NodeId;
use crate::storage::Entry;
use std::collections::BTreeMap;

/// What a reaping round asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReapStep {
    /// Whether this node holds a hint of the key; feed it back as [`ReapEvent::Hinted`]
    /// (`None`: it could not be read).
    ReadHinted {
        id: u64,
        bucket: String,
        key: String,
    },
    /// Ask `to` for its copy of the key and its hint (`ReapCheck`); feed the answer back as
    /// [`ReapEvent::Reply`].
    Check {
        id: u64,
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    },
    /// Ask `to` to delete the tombstone if unchanged (`Reap`); its outcome does not matter
    /// (a copy left there is reaped by a later round).
    Reap {
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    },
    /// Delete this node's copy if it still hashes to `expected` (durably); count it when
    /// deleted.
    RemoveLocal {
        bucket: String,
        key: String,
        expected: Hash,
    },
}

/// An outcome fed back to a reaping round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReapEvent {
    Hinted {
        id: u64,
        hinted: Option<bool>,
    },
    /// `from`'s answer to check `id` (`None`: it failed, timed out or answered something
    /// else).
    Reply {
        id: u64,
        from: NodeId,
        answer: Option<ReapAnswer<Vec<u8>>>,
    },
}

#[derive(Debug)]
struct Candidate {
    bucket: String,
    key: String,
    tombstone: Vec<u8>,
    primaries: Vec<NodeId>,
    check: Option<ReapCheck<Vec<u8>>>,
}

/// One reaping round.
#[derive(Debug)]
pub struct ReapRound {
    candidates: BTreeMap<u64, Candidate>,
    timeout_ms: u64,
}

impl ReapRound {
    /// Start the round over `candidates` (`(storage key, stored bytes)` of the tombstones
    /// past the grace period): the keys this node is the first primary of are checked.
    /// `primaries_only` is the simulator's old rule (only the primaries are asked, hints are
    /// not looked at). No round runs during a ring transition.
    pub fn start(
        state: &ClusterState,
        me: &NodeId,
        candidates: Vec<Entry>,
        n_val: impl Fn(&str) -> u32,
        (primaries_only, timeout_ms): (bool, u64),
    ) -> (ReapRound, Vec<ReapStep>) {
        let mut round = ReapRound {
            candidates: BTreeMap::new(),
            timeout_ms,
        };
        let mut steps = Vec::new();
        if state.ring.next.is_some() {
            return (round, steps);
        }
        for (id, (storage_key, tombstone)) in (0..).zip(candidates) {
            let Some((bucket, key)) = keys::split_object_key(&storage_key) else {
                continue;
            };
            let (bucket, key) = (
                String::from_utf8_lossy(bucket).into_owned(),
                String::from_utf8_lossy(key).into_owned(),
            );
            let partition = state
                .ring
                .current
                .partition_of(bucket.as_bytes(), key.as_bytes());
            let Some(primaries) = reaper_primaries(state, me, partition, n_val(&bucket)) else {
                continue;
            };
            round.candidates.insert(
                id,
                Candidate {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    tombstone,
                    primaries,
                    check: None,
                },
            );
            if primaries_only {
                // The old rule: the primaries' copies only.
                let members = round.candidates[&id]
                    .primaries
                    .iter()
                    .map(|n| (n.clone(), false))
                    .collect::<Vec<_>>();
                round.start_check(me, id, members, false, &mut steps);
            } else {
                steps.push(ReapStep::ReadHinted { id, bucket, key });
            }
        }
        (round, steps)
    }

    /// Feed one outcome.
    pub fn handle(&mut self, state: &ClusterState, me: &NodeId, event: ReapEvent) -> Vec<ReapStep> {
        let mut steps = Vec::new();
        match event {
            ReapEvent::Hinted { id, hinted } => {
                let Some(hinted) = hinted else {
                    // An unreadable hint: never reap past it.
                    self.candidates.remove(&id);
                    return steps;
                };
                if self.candidates.contains_key(&id) {
                    let members = reap_check_members(state);
                    self.start_check(me, id, members, hinted, &mut steps);
                }
            }
            ReapEvent::Reply { id, from, answer } => {
                let verdict = self
                    .candidates
                    .get_mut(&id)
                    .and_then(|c| c.check.as_mut())
                    .and_then(|check| check.on_reply(&from, answer));
                if let Some(verdict) = verdict {
                    self.finish(me, id, verdict, &mut steps);
                }
            }
        }
        steps
    }

    /// Every check has its verdict.
    pub fn finished(&self) -> bool {
        self.candidates.is_empty()
    }

    fn start_check(
        &mut self,
        me: &NodeId,
        id: u64,
        members: Vec<(NodeId, bool)>,
        me_hinted: bool,
        steps: &mut Vec<ReapStep>,
    ) {
        let Some(candidate) = self.candidates.get_mut(&id) else {
            return;
        };
        let (check, ask) = ReapCheck::start(
            me,
            members,
            candidate.primaries.clone(),
            candidate.tombstone.clone(),
            me_hinted,
        );
        if let Some(verdict) = check.verdict() {
            candidate.check = Some(check);
            self.finish(me, id, verdict, steps);
            return;
        }
        candidate.check = Some(check);
        for to in ask {
            steps.push(ReapStep::Check {
                id,
                to,
                message: PeerMessage::ReapCheck {
                    bucket: candidate.bucket.clone(),
                    key: candidate.key.clone(),
                },
                timeout_ms: self.timeout_ms,
            });
        }
    }

    /// The verdict of check `id`: when clear, the other primaries are asked to reap and this
    /// node removes its copy.
    fn finish(&mut self, me: &NodeId, id: u64, verdict: bool, steps: &mut Vec<ReapStep>) {
        let Some(candidate) = self.candidates.remove(&id) else {
            return;
        };
        if !verdict {
            return;
        }
        let expected = entry_hash(
            candidate.bucket.as_bytes(),
            candidate.key.as_bytes(),
            &candidate.tombstone,
        );
        for to in candidate.primaries.iter().filter(|n| *n != me) {
            steps.push(ReapStep::Reap {
                to: to.clone(),
                message: PeerMessage::Reap {
                    bucket: candidate.bucket.clone(),
                    key: candidate.key.clone(),
                    expected,
                },
                timeout_ms: self.timeout_ms,
            });
        }
        steps.push(ReapStep::RemoveLocal {
            bucket: candidate.bucket,
            key: candidate.key,
            expected,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{id, settled_cluster};

    /// A tombstone of a key `a` is the first primary of, as `(storage key, bytes)`.
    fn candidate(state: &ClusterState) -> (String, Entry) {
        let key = (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| {
                let partition = state.ring.current.partition_of(b"b", k.as_bytes());
                reaper_primaries(state, &id("a"), partition, 3).is_some()
            })
            .unwrap_or_else(|| panic!("a is the first primary of some key"));
        let bytes = b"tombstone".to_vec();
        (key.clone(), (keys::object_key(b"b", key.as_bytes()), bytes))
    }

    fn checks(steps: &[ReapStep]) -> Vec<(u64, NodeId)> {
        steps
            .iter()
            .filter_map(|s| match s {
                ReapStep::Check { id, to, .. } => Some((*id, to.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_tombstone_is_reaped_only_when_every_member_is_clear() {
        let state = settled_cluster(&["a", "b", "c", "d"], 16);
        let a = id("a");
        let (key, entry) = candidate(&state);
        for spoiler in [None, Some("hinted"), Some("different"), Some("silent")] {
            let (mut round, steps) =
                ReapRound::start(&state, &a, vec![entry.clone()], |_| 3, (false, 100));
            assert_eq!(
                steps,
                [ReapStep::ReadHinted {
                    id: 0,
                    bucket: "b".into(),
                    key: key.clone()
                }]
            );
            let event = ReapEvent::Hinted {
                id: 0,
                hinted: Some(false),
            };
            let primaries = round.candidates[&0].primaries.clone();
            let asked = checks(&round.handle(&state, &a, event));
            assert_eq!(asked.len(), 3, "every other member is asked");
            let mut last = Vec::new();
            for (i, (check, node)) in asked.iter().enumerate() {
                let primary = primaries.contains(node);
                let mut answer = Some(ReapAnswer {
                    stored: primary.then(|| entry.1.clone()),
                    hinted: false,
                });
                if i == 0 {
                    match spoiler {
                        Some("hinted") => answer = answer.map(|a| ReapAnswer { hinted: true, ..a }),
                        Some("different") => {
                            answer = Some(ReapAnswer {
                                stored: Some(b"older".to_vec()),
                                hinted: false,
                            });
                        }
                        Some("silent") => answer = None,
                        _ => {}
                    }
                }
                let event = ReapEvent::Reply {
                    id: *check,
                    from: node.clone(),
                    answer,
                };
                last.extend(round.handle(&state, &a, event));
            }
            let removed = last
                .iter()
                .any(|s| matches!(s, ReapStep::RemoveLocal { .. }));
            let reaps = last
                .iter()
                .filter(|s| matches!(s, ReapStep::Reap { .. }))
                .count();
            assert_eq!(removed, spoiler.is_none(), "{spoiler:?}: {last:?}");
            assert_eq!(reaps, if spoiler.is_none() { 2 } else { 0 }, "{spoiler:?}");
            assert!(round.finished());
        }
    }

    #[test]
    fn an_unreadable_hint_or_a_transition_means_no_reap() {
        let mut state = settled_cluster(&["a", "b", "c", "d"], 16);
        let a = id("a");
        let (_, entry) = candidate(&state);
        let (mut round, _) = ReapRound::start(&state, &a, vec![entry.clone()], |_| 3, (false, 100));
        let steps = round.handle(
            &state,
            &a,
            ReapEvent::Hinted {
                id: 0,
                hinted: None,
            },
        );
        assert!(steps.is_empty());
        assert!(round.finished());
        state.ring.next = Some(state.ring.current.clone());
        let (round, steps) = ReapRound::start(&state, &a, vec![entry], |_| 3, (false, 100));
        assert!(steps.is_empty() && round.finished());
    }
}
