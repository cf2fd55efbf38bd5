//! Reconnect delays: exponential with full jitter, so that a thousand volunteers whose
//! coordinator restarts do not all knock on its door in the same millisecond.

use std::time::Duration;

/// Delay before the first retry (ceiling of the first jittered wait).
pub const FIRST: Duration = Duration::from_millis(100);
/// Largest ceiling: a worker never waits longer than this between attempts.
pub const CAP: Duration = Duration::from_secs(5);

/// Exponential backoff with "full jitter": each wait is uniform in `[0, ceiling]`, where
/// the ceiling doubles per failed attempt up to a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            failures: 0,
        }
    }

    /// Ceiling of the next wait; advances the attempt count.
    pub fn next_ceiling(&mut self) -> Duration {
        // 2^20 x 100 ms is already far past any sensible cap; stop doubling there.
        let factor = 1u32 << self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        self.first.saturating_mul(factor).min(self.cap)
    }

    /// The next wait, `unit · ceiling`, where `unit` is a uniform random number in
    /// `[0, 1)` from the caller's generator (`rand` natively, `Math.random()` in a
    /// browser); values outside that range are clamped.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self.next_ceiling();
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(FIRST, CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::default();
        let ceilings: Vec<u128> = (0..9).map(|_| backoff.next_ceiling().as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        for _ in 0..100 {
            backoff.next_ceiling();
        }
        assert_eq!(backoff.next_ceiling(), CAP);
        backoff.reset();
        assert_eq!(backoff.next_ceiling(), FIRST);
    }

    #[test]
    fn out_of_range_units_are_clamped() {
        assert_eq!(Backoff::default().next_delay(7.0), FIRST);
        assert_eq!(Backoff::default().next_delay(-1.0), Duration::ZERO);
    }

    #[test]
    fn delays_stay_under_their_ceiling() {
        let mut backoff = Backoff::default();
        for attempt in 0..50u32 {
            let ceiling = FIRST.saturating_mul(1 << attempt.min(20)).min(CAP);
            let unit = f64::from(attempt) / 50.0;
            assert!(backoff.next_delay(unit) <= ceiling);
        }
    }
}
