//! [`WallClock`]: the node's wall clock (ms since the Unix epoch), with an offset tests use to
//! give one node of a cluster a clock that is wrong.
//!
//! Wall-clock time is only ever compared with another node's after converting it by the
//! offset measured for that node (the peer handshake carries the sender's clock, see
//! `transport`), so nodes whose clocks disagree (no NTP, a clock stepped by hand) still accept
//! each other's forwarded writes. Other uses are local: `Last-Modified`, last-write-wins
//! timestamps, tombstone ages.

/// A wall clock, shifted by `skew_ms` (0 outside tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    skew_ms: i64,
}

impl WallClock {
    /// The system clock shifted by `skew_ms` (a test hook: `ServerConfig::clock_skew_ms`).
    pub fn skewed(skew_ms: i64) -> Self {
        WallClock { skew_ms }
    }

    /// Milliseconds since the Unix epoch (0 if the system clock is before it).
    pub fn now_ms(&self) -> u64 {
        let system = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        system.saturating_add_signed(self.skew_ms)
    }
}

/// `theirs - mine`, saturating: how far a peer's clock is ahead of this node's.
pub fn offset_ms(theirs: u64, mine: u64) -> i64 {
    let diff = i128::from(theirs) - i128::from(mine);
    i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_shifted_by_its_skew() {
        let real = WallClock::default().now_ms();
        let ahead = WallClock::skewed(10_000).now_ms();
        let behind = WallClock::skewed(-10_000).now_ms();
        assert!(
            (9_000..=11_000).contains(&(ahead - real)),
            "{ahead} vs {real}"
        );
        assert!(
            (9_000..=11_000).contains(&(real - behind)),
            "{behind} vs {real}"
        );
        assert_eq!(WallClock::skewed(i64::MIN).now_ms(), 0);
    }

    #[test]
    fn offsets_are_signed_and_saturate() {
        assert_eq!(offset_ms(1_000, 400), 600);
        assert_eq!(offset_ms(400, 1_000), -600);
        assert_eq!(offset_ms(u64::MAX, 0), i64::MAX);
        assert_eq!(offset_ms(0, u64::MAX), i64::MIN);
    }
}
