//! Load shedding with an adaptive limit on client data requests in flight.
//!
//! A data request is admitted while fewer than `limit` are being served; past it the node
//! answers 503 at once. `max_in_flight_requests` is the ceiling; the limit moves below it
//! from the node's own measurement: every window (`LIMIT_WINDOW_MS`) [`LoadLimiter::adjust`]
//! looks at the p99 service time of the requests admitted in it and at whether the limit was
//! reached (a request shed, or the in-flight peak at the limit).
//!
//! - Saturated and p99 above the target (`overload_latency_target_ms`): requests are queueing
//!   inside the node, so the limit shrinks by a quarter (never under `MIN_LIMIT`). Fewer
//!   admitted requests wait less for CPU, disk and replicas; the excess gets its 503 fast.
//! - Otherwise it grows by an eighth (at least one) back toward the ceiling: at the limit with
//!   p99 under target there is room, and below the limit with no pressure it drifts back so a
//!   burst after a quiet period is not shed by a limit learned during an earlier overload.
//!
//! A node that is slow while not saturated (a slow disk, a slow replica) keeps its limit: a
//! lower one would not make it faster, only refuse requests it can hold. The limit is
//! multiplicative decrease, additive-or-proportional increase, as TCP's congestion window.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// How often the limit is adjusted, in ms.
pub const LIMIT_WINDOW_MS: u64 = 500;
/// The limit never goes below this (or the ceiling, if that is lower): enough concurrency to
/// keep a node's cores and its replicas' busy.
pub const MIN_LIMIT: usize = 8;
/// Fewer admitted requests than this in a window say nothing about latency.
const MIN_SAMPLES: u64 = 20;
/// Highest service time tracked, in microseconds (longer ones count as this).
const MAX_TRACKED_US: u64 = 60_000_000;

/// What one adjustment saw and did (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjustment {
    pub p99_us: u64,
    pub samples: u64,
    pub saturated: bool,
    pub limit: usize,
}

/// The shared admission state of a node's HTTP API.
#[derive(Debug)]
pub struct LoadLimiter {
    ceiling: usize,
    floor: usize,
    target_us: u64,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    /// Highest in-flight count in this window, and requests shed in it.
    peak: AtomicUsize,
    shed: AtomicU64,
    /// Service times of the requests admitted in this window.
    window: Mutex<Histogram<u64>>,
}

/// An admitted request; dropping it ends the request and records its service time.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<LoadLimiter>,
    started: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.limiter
            .window
            .lock()
            .saturating_record(us.clamp(1, MAX_TRACKED_US));
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LoadLimiter {
    /// A limiter starting at `ceiling` (`max_in_flight_requests`) that aims at a p99 service
    /// time of `target_ms` under saturation; `target_ms` 0 keeps the limit at the ceiling.
    pub fn new(ceiling: usize, target_ms: u64) -> Result<Self, hdrhistogram::CreationError> {
        let ceiling = ceiling.max(1);
        Ok(LoadLimiter {
            ceiling,
            floor: MIN_LIMIT.min(ceiling),
            target_us: target_ms.saturating_mul(1000),
            limit: AtomicUsize::new(ceiling),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
            window: Mutex::new(Histogram::new_with_bounds(1, MAX_TRACKED_US, 2)?),
        })
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// The configured ceiling (`max_in_flight_requests`).
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Admit a request, or `None` when the limit is reached (the caller answers 503).
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit();
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current >= limit {
                self.shed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.peak.fetch_max(current + 1, Ordering::Relaxed);
        Some(Permit {
            limiter: Arc::clone(self),
            started: Instant::now(),
        })
    }

    /// End a window: move the limit from what it saw (see the module documentation).
    pub fn adjust(&self) -> Adjustment {
        let (p99_us, samples) = {
            let mut window = self.window.lock();
            let seen = (window.value_at_quantile(0.99), window.len());
            window.reset();
            seen
        };
        let limit = self.limit();
        let peak = self.peak.swap(self.in_flight(), Ordering::Relaxed);
        let shed = self.shed.swap(0, Ordering::Relaxed);
        let saturated = shed > 0 || peak >= limit;
        let next = if self.target_us == 0 {
            self.ceiling
        } else if saturated && samples >= MIN_SAMPLES && p99_us > self.target_us {
            (limit - limit / 4).max(self.floor)
        } else {
            (limit + (limit / 8).max(1)).min(self.ceiling)
        };
        self.limit.store(next, Ordering::Relaxed);
        Adjustment {
            p99_us,
            samples,
            saturated,
            limit: next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Three times: `n` requests arrive at once (so the window is saturated when `n` reaches
    /// the limit) and each admitted one takes `service`. Then end the window.
    fn window(limiter: &Arc<LoadLimiter>, n: usize, service: Duration) -> Adjustment {
        for _ in 0..3 {
            let permits: Vec<Permit> = (0..n).filter_map(|_| limiter.try_admit()).collect();
            std::thread::sleep(service);
            drop(permits);
        }
        limiter.adjust()
    }

    #[test]
    fn admits_up_to_the_limit_and_sheds_the_rest() {
        let limiter = Arc::new(LoadLimiter::new(3, 50).unwrap());
        let held: Vec<Permit> = (0..5).filter_map(|_| limiter.try_admit()).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(limiter.in_flight(), 3);
        drop(held);
        assert_eq!(limiter.in_flight(), 0);
        assert!(limiter.try_admit().is_some());
    }

    #[test]
    fn saturated_and_slow_shrinks_to_the_floor_then_recovers_when_fast() {
        let limiter = Arc::new(LoadLimiter::new(64, 5).unwrap());
        let mut limits = Vec::new();
        for _ in 0..12 {
            // More requests than the limit, each slower than the 5 ms target.
            limits.push(window(&limiter, 200, Duration::from_millis(8)).limit);
        }
        assert!(
            limits.windows(2).all(|w| w[1] <= w[0]),
            "the limit only shrinks while saturated and slow: {limits:?}"
        );
        assert_eq!(limiter.limit(), MIN_LIMIT, "{limits:?}");
        // Fast again (service well under target): back to the ceiling.
        for _ in 0..40 {
            window(&limiter, 200, Duration::from_micros(100));
        }
        assert_eq!(limiter.limit(), 64);
    }

    #[test]
    fn slow_but_not_saturated_keeps_the_limit() {
        let limiter = Arc::new(LoadLimiter::new(64, 5).unwrap());
        for _ in 0..5 {
            // 30 requests at once against a limit of 64: slow, but nothing queues at the door.
            let adjustment = window(&limiter, 30, Duration::from_millis(8));
            assert!(!adjustment.saturated);
            assert!(adjustment.p99_us > 5_000);
        }
        assert_eq!(limiter.limit(), 64);
    }

    #[test]
    fn a_target_of_zero_keeps_the_ceiling() {
        let limiter = Arc::new(LoadLimiter::new(16, 0).unwrap());
        for _ in 0..5 {
            window(&limiter, 100, Duration::from_millis(2));
        }
        assert_eq!(limiter.limit(), 16);
    }

    #[test]
    fn too_few_samples_do_not_shrink_the_limit() {
        let limiter = Arc::new(LoadLimiter::new(4, 1).unwrap());
        for _ in 0..5 {
            // Saturated (4 of 4, more shed) and slow, but only 12 samples per window.
            let adjustment = window(&limiter, 10, Duration::from_millis(3));
            assert!(adjustment.saturated && adjustment.samples < MIN_SAMPLES);
        }
        assert_eq!(limiter.limit(), 4);
    }
}
