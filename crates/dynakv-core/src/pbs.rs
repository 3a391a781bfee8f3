//! Probabilistically bounded staleness (issue 22; Bailis et al., "Probabilistically Bounded
//! Staleness for Practical Partial Quorums", VLDB 2012): how likely a read issued `t` ms
//! after a write was acknowledged returns it, for a given N, R and W, predicted from the
//! latencies this node measured of its own replica requests.
//!
//! The WARS model: a write reaches replica i after `W_i` and its acknowledgement comes back
//! after `A_i` more; a read reaches replica i after `R_i` and its answer comes back after
//! `S_i`. The write is acknowledged at the W-th smallest `W_i + A_i`; a read issued `t`
//! later is answered by the R replicas whose `R_i + S_i` are smallest, and returns the
//! write if one of them had it when the read reached it (`W_i <= commit + t + R_i`).
//!
//! Measured without synchronised clocks: a coordinator times each replica write and read
//! as a round trip (its own monotonic clock). A write's round trip is `W_i + A_i` (it
//! includes the replica's sync); a read's is `R_i + S_i`, and since a replica answers a read
//! at once, its halves stand for the one-way network delays `W_i`, `R_i` and `S_i`. So a
//! trial draws, per replica, a write round trip (for the acknowledgement) and read halves
//! (for when the write lands and the read arrives), clamping `W_i` to the write's round trip.
//! dynakv's coordinators are replicas themselves: the write's coordinator holds the value at
//! once, and a read coordinated by a replica reads its own copy at once (`local`: the chance
//! that the node a client talks to is one of the key's replicas, N over the cluster's nodes).
//! A write sent to another node is forwarded to a replica, and its client hears of the
//! acknowledgement one network delay later than the coordinator.
//!
//! Where the model breaks: sloppy quorum. With a replica down, a write is acknowledged by a
//! fallback that holds a hint, which reads of the primaries do not consult; the prediction
//! then overstates consistency until the hint is delivered. It also assumes delays are
//! independent from request to request, which a queueing node is not.

use crate::rng::SeededRng;
use std::collections::VecDeque;

/// Round trips kept per kind (the most recent).
pub const MAX_SAMPLES: usize = 2000;
/// Trials per predicted point.
pub const TRIALS: usize = 20_000;
/// Largest N a prediction is asked for.
pub const MAX_N: usize = 16;

/// What a round trip was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A replica write (`ReplicaPut`) to its acknowledgement.
    Write,
    /// A replica read (`ReplicaGet`) to its answer.
    Read,
}

/// Which round trip a request to a replica is timed as (`None`: not one PBS models).
pub fn kind_of(message: &crate::message::PeerMessage) -> Option<Kind> {
    match message {
        crate::message::PeerMessage::ReplicaPut { .. } => Some(Kind::Write),
        crate::message::PeerMessage::ReplicaGet { .. } => Some(Kind::Read),
        _ => None,
    }
}

/// Whether `reply` answers a request of `kind` (a refusal or a failure is not timed).
pub fn answered(kind: Kind, reply: &crate::message::PeerMessage) -> bool {
    matches!(
        (kind, reply),
        (Kind::Write, crate::message::PeerMessage::Ack)
            | (
                Kind::Read,
                crate::message::PeerMessage::ReplicaObject { .. }
            )
    )
}

/// The most recent replica round trips of a node, in µs.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    writes: VecDeque<u64>,
    reads: VecDeque<u64>,
}

impl Samples {
    /// Record one round trip (the oldest is dropped past [`MAX_SAMPLES`]).
    pub fn record(&mut self, kind: Kind, rtt_us: u64) {
        let samples = match kind {
            Kind::Write => &mut self.writes,
            Kind::Read => &mut self.reads,
        };
        if samples.len() >= MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(rtt_us);
    }

    /// Write and read round trips held.
    pub fn counts(&self) -> (usize, usize) {
        (self.writes.len(), self.reads.len())
    }

    /// Add another node's samples (the simulator pools its nodes').
    pub fn extend(&mut self, other: &Samples) {
        for w in &other.writes {
            self.record(Kind::Write, *w);
        }
        for r in &other.reads {
            self.record(Kind::Read, *r);
        }
    }
}

/// Why no prediction could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PbsError {
    #[error("n, r and w must be 1 <= r, w <= n <= {MAX_N}")]
    Quorums,
    #[error(
        "no replica round trips measured yet (writes {writes}, reads {reads}): send some traffic first"
    )]
    NoSamples { writes: usize, reads: usize },
}

/// One predicted point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t_ms: f64,
    /// The probability that a read issued `t_ms` after a write's acknowledgement returns it.
    pub consistent: f64,
}

/// The prediction for `n`, `r`, `w` at each of `t_ms`, from `samples`, with `local` the
/// chance that a read's coordinator is one of the key's replicas. Deterministic for a seed.
///
/// # Errors
/// Bad quorums, or no samples of either kind.
pub fn predict(
    samples: &Samples,
    (n, r, w): (usize, usize, usize),
    t_ms: &[f64],
    local: f64,
    seed: u64,
) -> Result<Vec<Point>, PbsError> {
    if !(1..=MAX_N).contains(&n) || !(1..=n).contains(&r) || !(1..=n).contains(&w) {
        return Err(PbsError::Quorums);
    }
    let writes: Vec<u64> = samples.writes.iter().copied().collect();
    let reads: Vec<u64> = samples.reads.iter().copied().collect();
    if writes.is_empty() || reads.is_empty() {
        return Err(PbsError::NoSamples {
            writes: writes.len(),
            reads: reads.len(),
        });
    }
    let mut rng = SeededRng::new(seed);
    let draw = |from: &[u64], rng: &mut SeededRng| -> f64 {
        // `from` is never empty (checked above).
        from[rng.index(from.len())] as f64 / 1000.0
    };
    let mut hits = vec![0usize; t_ms.len()];
    let mut lands = vec![0.0; n];
    let mut acks = vec![0.0; n];
    let mut arrives = vec![0.0; n];
    let mut answers: Vec<(f64, usize)> = Vec::with_capacity(n);
    for _ in 0..TRIALS {
        for i in 0..n {
            let round_trip = draw(&writes, &mut rng);
            lands[i] = (draw(&reads, &mut rng) / 2.0).min(round_trip);
            acks[i] = round_trip;
        }
        // Replica 0 coordinates the write: it holds the value at once.
        lands[0] = 0.0;
        acks[0] = 0.0;
        let mut sorted = acks.clone();
        sorted.sort_by(f64::total_cmp);
        let mut commit = sorted[w - 1];
        // A write sent to a node that is not a replica is forwarded to one, and its client
        // learns of the acknowledgement one network delay later.
        if !rng.chance(local) {
            commit += draw(&reads, &mut rng) / 2.0;
        }
        // The read's coordinator: a replica (reading its own copy at once) with chance
        // `local`, the write's coordinator among them with chance 1/n.
        let reader = rng.chance(local).then(|| rng.index(n));
        answers.clear();
        for (i, arrive) in arrives.iter_mut().enumerate() {
            let there = if Some(i) == reader {
                0.0
            } else {
                draw(&reads, &mut rng) / 2.0
            };
            *arrive = there;
            answers.push((2.0 * there, i));
        }
        answers.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (k, t) in t_ms.iter().enumerate() {
            let fresh = answers[..r]
                .iter()
                .any(|(_, i)| lands[*i] <= commit + t + arrives[*i]);
            hits[k] += usize::from(fresh);
        }
    }
    Ok(t_ms
        .iter()
        .zip(hits)
        .map(|(t, h)| Point {
            t_ms: *t,
            consistent: h as f64 / TRIALS as f64,
        })
        .collect())
}

/// k-staleness without time (Bailis's closed form for non-expanding quorums): the
/// probability that a read returns one of the last `k` acknowledged versions,
/// `1 - (C(n-w, r) / C(n, r))^k` (1 when `r + w > n`).
pub fn k_staleness(n: usize, r: usize, w: usize, k: u32) -> f64 {
    if r + w > n {
        return 1.0;
    }
    let miss = choose(n - w, r) / choose(n, r);
    1.0 - miss.powi(i32::try_from(k).unwrap_or(i32::MAX))
}

fn choose(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn samples(writes: &[u64], reads: &[u64]) -> Samples {
        let mut s = Samples::default();
        for w in writes {
            s.record(Kind::Write, *w);
        }
        for r in reads {
            s.record(Kind::Read, *r);
        }
        s
    }

    #[test]
    fn strict_quorums_are_always_consistent_and_partial_ones_converge() {
        let s = samples(&[2_000, 10_000, 30_000], &[2_000, 8_000, 20_000]);
        let t = [0.0, 5.0, 50.0];
        for point in predict(&s, (3, 2, 2), &t, 1.0, 1).unwrap() {
            assert!((point.consistent - 1.0).abs() < f64::EPSILON, "{point:?}");
        }
        let partial = predict(&s, (3, 1, 1), &t, 0.0, 1).unwrap();
        assert!(partial[0].consistent < 0.9, "{partial:?}");
        assert!(partial[0].consistent <= partial[1].consistent);
        assert!(partial[1].consistent <= partial[2].consistent);
        // 50 ms after the acknowledgement every replica has it (the slowest lands by 15 ms).
        assert!(
            (partial[2].consistent - 1.0).abs() < f64::EPSILON,
            "{partial:?}"
        );
        // W = 1 is the coordinator's own write: acknowledged at once. A read with R = 1
        // coordinated by a replica answers from its own copy: fresh at t = 0 only on the
        // write's coordinator (1 in 3).
        let local = predict(&s, (3, 1, 1), &t, 1.0, 1).unwrap();
        assert!((local[0].consistent - 1.0 / 3.0).abs() < 0.02, "{local:?}");
    }

    #[test]
    fn k_staleness_has_the_closed_form() {
        assert!((k_staleness(3, 1, 1, 1) - 1.0 / 3.0).abs() < 1e-9);
        assert!((k_staleness(3, 1, 1, 2) - (1.0 - 4.0 / 9.0)).abs() < 1e-9);
        assert!((k_staleness(3, 2, 2, 1) - 1.0).abs() < 1e-9);
        assert!((k_staleness(5, 2, 1, 1) - 0.4).abs() < 1e-9);
    }

    #[test]
    fn bad_quorums_and_no_samples_are_refused_and_memory_is_bounded() {
        let mut s = Samples::default();
        assert!(matches!(
            predict(&s, (3, 1, 1), &[0.0], 1.0, 1),
            Err(PbsError::NoSamples { .. })
        ));
        for i in 0..(3 * MAX_SAMPLES as u64) {
            s.record(Kind::Write, i);
            s.record(Kind::Read, i);
        }
        assert_eq!(s.counts(), (MAX_SAMPLES, MAX_SAMPLES));
        for q in [(0, 1, 1), (3, 4, 1), (3, 1, 0), (MAX_N + 1, 1, 1)] {
            assert_eq!(predict(&s, q, &[0.0], 1.0, 1), Err(PbsError::Quorums));
        }
    }
}
