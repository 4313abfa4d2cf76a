//! Exponential backoff with jitter, shared by the config stream's reconnects and the
//! certificate requests. Pure: the caller supplies the random number, so tests pin it.
use std::time::Duration;

/// `base · 2^failures`, capped at `max`, then "equal jitter": half of it fixed and half
/// random, so that many nodes retrying after the same outage spread out while none retries
/// sooner than half the nominal delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// The wait before the next attempt after `failures` consecutive failures (0 for the
    /// first retry after a connection that had been working). `random` is in `[0, 1)`.
    pub fn delay(&self, failures: u32, random: f64) -> Duration {
        let factor = 2u32.saturating_pow(failures.min(31));
        let nominal = self.base.saturating_mul(factor).min(self.max);
        let random = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        nominal / 2 + nominal.mul_f64(random / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let cases = [
            (0, 0.0, 50 * MS),
            (0, 0.999_999, 100 * MS),
            (1, 0.0, 100 * MS),
            (2, 0.5, 300 * MS),
            (3, 0.0, 400 * MS),
            (4, 0.0, 500 * MS),
            (4, 1.0, 1000 * MS),
            (40, 0.0, 500 * MS),
            (u32::MAX, 1.0, 1000 * MS),
        ];
        for (failures, random, want) in cases {
            let got = b.delay(failures, random);
            let diff = got.abs_diff(want);
            assert!(
                diff <= MS,
                "failures {failures} random {random}: {got:?} != {want:?}"
            );
        }
    }

    #[test]
    fn odd_randoms_stay_in_range() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        for r in [-1.0, 2.0, f64::NAN, f64::INFINITY] {
            let d = b.delay(1, r);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{r}: {d:?}"
            );
        }
    }
}
