//! One round of the expiry sweep as a sans-IO machine (issue 21), driven by `Node` in the
//! simulator and in the server alike.
//!
//! A value written with a time to live (a bucket's `ttl_secs`, a write's own) is answered
//! as not found once expired (`Object::unexpired`, at both drivers' client boundary), and
//! removed by a tombstone written through the normal put path with the causal context of a
//! quorum read, so that reaping, anti-entropy, read repair and hinted handoff treat it as a
//! delete and an expired value can never be repaired back (riak_kv#1649).
//!
//! A round pages through this node's `expiry` table (kept with every object write by
//! `AaeTrees`, ordered by expiry time) for the keys due by this node's wall clock. A key is
//! swept by the first of its primaries that this node believes up ([`sweeps_here`]), so one
//! node writes its tombstone while the others' entries go when the tombstone reaches them.
//! For each key: a quorum read (expired values included); when every live value of what it
//! returns has expired by this node's clock, a tombstone with the read's clock as its
//! context. A write the read did not see is concurrent with the tombstone and survives it as
//! a sibling; a write it saw is one the tombstone may replace only because it expired.
//!
//! Invariants: one key at a time (one request in flight); at most
//! [`MAX_EXPIRY_REMOVALS_PER_ROUND`] tombstones attempted and
//! [`MAX_EXPIRY_SCANNED_PER_ROUND`] table entries read per round; a failed read or write
//! skips the key (the next round finds it again, its entry is still there).
//!
//! Skew: a node whose clock is ahead by `s` removes values up to `s` early; one behind
//! answers them as found for up to `s` longer. With every clock within `s` of true time, no
//! read issued later than `s` after a value's true expiry returns it (the simulator's
//! expiry checker holds this, with the write's stamp taken within `s` too).

use crate::object::Object;
use crate::request::PutOp;
use crate::ring::NodeId;
use std::collections::VecDeque;

/// Most tombstones one round attempts (the rest wait for the next round).
pub const MAX_EXPIRY_REMOVALS_PER_ROUND: usize = 1000;
/// Entries of the `expiry` table read per scan step.
pub const EXPIRY_SCAN_PAGE: usize = 100;
/// Most entries of the `expiry` table one round reads (due keys swept by another node are
/// read and skipped; this bounds the work a round spends on them).
pub const MAX_EXPIRY_SCANNED_PER_ROUND: usize = 10_000;

/// What an expiry round asks its driver to do.
#[derive(Debug, Clone)]
pub enum ExpiryStep {
    /// Read the next page of the `expiry` table's due entries after `after` (at most
    /// `limit`, `Replica::expired_keys` by this node's wall clock); feed them back as
    /// [`ExpiryEvent::Scanned`].
    Scan {
        after: Option<Vec<u8>>,
        limit: usize,
    },
    /// A quorum read of the key as stored (expired values included); feed the object back
    /// as [`ExpiryEvent::Read`].
    Read { bucket: String, key: String },
    /// Write this tombstone through the put path; feed the outcome back as
    /// [`ExpiryEvent::Written`].
    Write(Box<PutOp>),
}

/// An outcome fed back to an expiry round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiryEvent {
    /// A page of due entries: `(table key, bucket, key)`, earliest first.
    Scanned(Vec<(Vec<u8>, String, String)>),
    /// The read's object (`None`: the read failed or found nothing).
    Read(Option<Object>),
    /// Whether the tombstone was written.
    Written(bool),
}

/// Whether this node sweeps a key: it is the first of the key's primaries (`primaries`, its
/// preference list) that this node believes up. No primary up, or this node not the first:
/// another node sweeps it (or a later round here does, once the view changes).
pub fn sweeps_here(primaries: &[NodeId], me: &NodeId, is_up: impl Fn(&NodeId) -> bool) -> bool {
    primaries.iter().find(|n| *n == me || is_up(n)) == Some(me)
}

/// Whether `object` (as a quorum read returned it) is to be removed at `now_ms`: it has
/// live values and every one of them expired.
pub fn is_due(object: &Object, now_ms: u64) -> bool {
    object.expires_ms().is_some_and(|at| at <= now_ms)
}

/// One round of the sweep.
#[derive(Debug)]
pub struct ExpiryRound {
    /// Where the next scan starts (the last table key read).
    after: Option<Vec<u8>>,
    /// The table has no more due entries (a page came back short).
    exhausted: bool,
    scanned: usize,
    attempted: usize,
    /// Keys to sweep here, in expiry order.
    queue: VecDeque<(String, String)>,
    /// The key whose read or write is in flight.
    current: Option<(String, String)>,
    /// Tombstones written this round.
    removed: u64,
}

impl ExpiryRound {
    /// Start a round: its first step is a scan.
    pub fn start() -> (ExpiryRound, Vec<ExpiryStep>) {
        let mut round = ExpiryRound {
            after: None,
            exhausted: false,
            scanned: 0,
            attempted: 0,
            queue: VecDeque::new(),
            current: None,
            removed: 0,
        };
        let steps = round.next();
        (round, steps)
    }

    /// Feed an outcome; `now_ms` is this node's wall clock, `sweeps` tells whether a key is
    /// this node's to sweep ([`sweeps_here`]).
    pub fn handle(
        &mut self,
        event: ExpiryEvent,
        now_ms: u64,
        sweeps: impl Fn(&str, &str) -> bool,
    ) -> Vec<ExpiryStep> {
        match event {
            ExpiryEvent::Scanned(page) => {
                self.exhausted = page.len() < EXPIRY_SCAN_PAGE;
                self.scanned = self.scanned.saturating_add(page.len());
                if let Some((last, ..)) = page.last() {
                    self.after = Some(last.clone());
                } else {
                    self.exhausted = true;
                }
                for (_, bucket, key) in page {
                    if sweeps(&bucket, &key) {
                        self.queue.push_back((bucket, key));
                    }
                }
                self.next()
            }
            ExpiryEvent::Read(object) => {
                let Some((bucket, key)) = self.current.take() else {
                    return self.next();
                };
                match object {
                    Some(object) if is_due(&object, now_ms) => {
                        let op = PutOp::tombstone(&bucket, &key, object.clock().clone());
                        self.current = Some((bucket, key));
                        vec![ExpiryStep::Write(Box::new(op))]
                    }
                    _ => self.next(),
                }
            }
            ExpiryEvent::Written(ok) => {
                if self.current.take().is_some() && ok {
                    self.removed = self.removed.saturating_add(1);
                }
                self.next()
            }
        }
    }

    /// The next key's read, or the next scan, or nothing (the round is over).
    fn next(&mut self) -> Vec<ExpiryStep> {
        if self.current.is_some() || self.attempted >= MAX_EXPIRY_REMOVALS_PER_ROUND {
            return Vec::new();
        }
        if let Some((bucket, key)) = self.queue.pop_front() {
            self.attempted += 1;
            self.current = Some((bucket.clone(), key.clone()));
            return vec![ExpiryStep::Read { bucket, key }];
        }
        if self.exhausted || self.scanned >= MAX_EXPIRY_SCANNED_PER_ROUND {
            return Vec::new();
        }
        vec![ExpiryStep::Scan {
            after: self.after.clone(),
            limit: EXPIRY_SCAN_PAGE,
        }]
    }

    /// Whether the round is over: nothing in flight and nothing more to do.
    pub fn finished(&self) -> bool {
        self.current.is_none()
            && (self.attempted >= MAX_EXPIRY_REMOVALS_PER_ROUND
                || (self.queue.is_empty()
                    && (self.exhausted || self.scanned >= MAX_EXPIRY_SCANNED_PER_ROUND)))
    }

    /// Tombstones written this round.
    pub fn removed(&self) -> u64 {
        self.removed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId(name.into())
    }

    /// An object holding one value per `expiry` (`None`: it does not expire), written blind.
    fn object(expiries: &[Option<u64>]) -> Object {
        let values: Vec<(&[u8], Option<u64>)> =
            expiries.iter().map(|e| (b"v".as_slice(), *e)).collect();
        crate::test_support::siblings(&values)
    }

    fn entry(at: u64, key: &str) -> (Vec<u8>, String, String) {
        let mut table_key = at.to_be_bytes().to_vec();
        table_key.extend_from_slice(key.as_bytes());
        (table_key, "b".into(), key.into())
    }

    #[test]
    fn the_first_primary_believed_up_sweeps() {
        let primaries = [node("a"), node("b"), node("c")];
        assert!(sweeps_here(&primaries, &node("a"), |_| true));
        assert!(!sweeps_here(&primaries, &node("b"), |_| true));
        // `a` down in `b`'s view: `b` sweeps; `c` still sees `b` up.
        assert!(sweeps_here(&primaries, &node("b"), |n| n != &node("a")));
        assert!(!sweeps_here(&primaries, &node("c"), |n| n != &node("a")));
        // A node that is not a primary never sweeps (its copy goes with the tombstone).
        assert!(!sweeps_here(&primaries, &node("z"), |_| false));
    }

    #[test]
    fn a_value_is_due_only_once_every_live_value_expired() {
        assert!(is_due(&object(&[Some(10)]), 10));
        assert!(!is_due(&object(&[Some(10)]), 9));
        assert!(!is_due(&object(&[Some(10), Some(20)]), 15));
        assert!(is_due(&object(&[Some(10), Some(20)]), 20));
        // A sibling without a time to live keeps the key.
        assert!(!is_due(&object(&[Some(10), None]), u64::MAX));
        assert!(!is_due(&Object::new(), u64::MAX));
    }

    /// A round: scan, keep this node's keys, read each, tombstone (with the read's clock as
    /// its context) only what expired by the time the read came back, one key at a time.
    #[test]
    fn a_round_reads_then_tombstones_with_the_reads_context_only_what_expired() {
        let (mut round, steps) = ExpiryRound::start();
        assert!(matches!(
            steps.as_slice(),
            [ExpiryStep::Scan { after: None, limit }] if *limit == EXPIRY_SCAN_PAGE
        ));
        let mine = |_: &str, key: &str| key != "theirs";
        let page = vec![entry(5, "k1"), entry(6, "theirs"), entry(7, "k2")];
        let steps = round.handle(ExpiryEvent::Scanned(page), 100, mine);
        assert!(matches!(
            steps.as_slice(),
            [ExpiryStep::Read { bucket, key }] if bucket == "b" && key == "k1"
        ));
        let expired = object(&[Some(5), Some(50)]);
        let steps = round.handle(ExpiryEvent::Read(Some(expired.clone())), 100, mine);
        let [ExpiryStep::Write(op)] = steps.as_slice() else {
            panic!("expected a tombstone, got {steps:?}");
        };
        assert_eq!((op.bucket.as_str(), op.key.as_str()), ("b", "k1"));
        assert!(op.content.deleted);
        assert_eq!(op.context.as_ref(), Some(expired.clock()));
        let steps = round.handle(ExpiryEvent::Written(true), 100, mine);
        assert!(matches!(
            steps.as_slice(),
            [ExpiryStep::Read { key, .. }] if key == "k2"
        ));
        assert_eq!(round.removed(), 1);
        // A newer write the table did not know of yet: nothing is written.
        let steps = round.handle(ExpiryEvent::Read(Some(object(&[Some(500)]))), 100, mine);
        assert!(steps.is_empty(), "{steps:?}");
        assert!(round.finished());
        assert_eq!(round.removed(), 1);
    }

    #[test]
    fn a_failed_read_or_write_skips_the_key_and_a_full_page_scans_on() {
        let (mut round, _) = ExpiryRound::start();
        let page: Vec<_> = (0..EXPIRY_SCAN_PAGE as u64)
            .map(|i| entry(i, &format!("k{i:03}")))
            .collect();
        let last = page.last().unwrap().0.clone();
        let all = |_: &str, _: &str| true;
        let mut steps = round.handle(ExpiryEvent::Scanned(page), 1_000, all);
        for i in 0..EXPIRY_SCAN_PAGE {
            assert!(
                matches!(steps.as_slice(), [ExpiryStep::Read { .. }]),
                "{i}: {steps:?}"
            );
            steps = if i % 2 == 0 {
                round.handle(ExpiryEvent::Read(None), 1_000, all)
            } else {
                let steps = round.handle(ExpiryEvent::Read(Some(object(&[Some(1)]))), 1_000, all);
                assert!(matches!(steps.as_slice(), [ExpiryStep::Write(_)]));
                round.handle(ExpiryEvent::Written(i % 4 == 1), 1_000, all)
            };
        }
        // The page was full: the next scan starts after its last entry.
        assert!(matches!(
            steps.as_slice(),
            [ExpiryStep::Scan { after: Some(after), limit }]
                if *after == last && *limit == EXPIRY_SCAN_PAGE
        ));
        assert_eq!(round.removed(), EXPIRY_SCAN_PAGE as u64 / 4);
        assert!(!round.finished());
        assert!(
            round
                .handle(ExpiryEvent::Scanned(Vec::new()), 1_000, all)
                .is_empty()
        );
        assert!(round.finished());
    }

    #[test]
    fn a_round_stops_at_its_budget() {
        let (mut round, _) = ExpiryRound::start();
        let all = |_: &str, _: &str| true;
        let mut reads = 0;
        let mut steps = Vec::new();
        while reads <= MAX_EXPIRY_REMOVALS_PER_ROUND {
            if !matches!(steps.as_slice(), [ExpiryStep::Read { .. }]) {
                let page: Vec<_> = (0..EXPIRY_SCAN_PAGE as u64)
                    .map(|i| entry(i, &format!("k{reads}-{i}")))
                    .collect();
                steps = round.handle(ExpiryEvent::Scanned(page), 1_000, all);
                if steps.is_empty() {
                    break;
                }
                continue;
            }
            reads += 1;
            steps = round.handle(ExpiryEvent::Read(None), 1_000, all);
        }
        assert_eq!(reads, MAX_EXPIRY_REMOVALS_PER_ROUND);
        assert!(round.finished());
    }
}
