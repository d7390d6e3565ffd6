//! The process's two clocks, in milliseconds so that a reading fits in an
//! atomic: a monotonic one for intervals and deadlines (health state, log
//! rate limits, accept pauses) and the wall clock for what leaves the
//! process or outlives it (heartbeat send times, stored timestamps).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Monotonic milliseconds since the clock was first read, plus one: never
/// 0, so that 0 can stand for "never" in an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before
/// 1970, which every consumer then treats as out of range).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_starts_above_zero_and_never_goes_back() {
        let a = now_ms();
        assert!(a >= 1);
        std::thread::sleep(std::time::Duration::from_millis(3));
        assert!(now_ms() > a);
    }

    #[test]
    fn wall_clock_milliseconds_agree_with_seconds() {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ms = unix_ms();
        // 2020-01-01 or later, and the same second give or take one.
        assert!(ms > 1_577_836_800_000);
        assert!((ms / 1000).abs_diff(secs) <= 1, "{ms} vs {secs}");
    }
}
