//! Reconnect backoff: exponential with seeded "equal jitter" (half fixed, half random), so
//! that replicas started together do not reconnect in lockstep, yet a seed replays exactly.

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max,
            attempt: 0,
            rng: seed,
        }
    }

    /// The delay before the next attempt; each call doubles the base up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let jitter_ns = half.as_nanos() as u64;
        let r = if jitter_ns == 0 {
            0
        } else {
            self.next_u64() % (jitter_ns + 1)
        };
        half + Duration::from_nanos(r)
    }

    /// A connection succeeded: start again from `min`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A jitter seed from a client id (FNV-1a): replicas have distinct ids (the runtimes add
/// a per-instance suffix), so distinct jitter sequences.
pub(crate) fn seed_from(client_id: &str) -> u64 {
    client_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_draw_different_jitter_by_default() {
        let delays = |id: &str| {
            let mut b = Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(30),
                seed_from(id),
            );
            (0..6).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_ne!(delays("sink-101-a"), delays("sink-102-b"));
        assert_eq!(delays("sink-101-a"), delays("sink-101-a"));
    }

    #[test]
    fn grows_to_max_within_jitter_and_replays_by_seed() {
        let mut a = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 7);
        let mut bases = vec![];
        for i in 0..8u32 {
            let d = a.next_delay();
            assert_eq!(d, b.next_delay());
            let base = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(1));
            assert!(d >= base / 2 && d <= base, "{d:?} vs {base:?}");
            bases.push(d);
        }
        a.reset();
        assert!(a.next_delay() <= Duration::from_millis(100));
    }
}
