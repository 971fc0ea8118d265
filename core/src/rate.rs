//! The publish rate limit (`max_publish_rate`, `max_publish_burst`): a generic cell rate
//! algorithm on the `now` the runtime gives. A publish may go when its theoretical
//! arrival time is at most `burst - 1` intervals ahead of `now`; each one sent moves that
//! time one interval on. Over any span `T`, at most `burst + T * rate` publishes go.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(crate) struct RateLimit {
    interval: Duration,
    /// How far ahead of `now` the theoretical arrival time may be: `(burst - 1) * interval`.
    tolerance: Duration,
    /// When the next publish would be due at exactly the rate.
    tat: Option<Instant>,
}

impl RateLimit {
    /// `rate` publishes per second (finite, > 0; validated by the config), bursts of up to
    /// `burst` (at least 1).
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
        Self {
            interval,
            tolerance: interval.saturating_mul(burst.max(1) - 1),
            tat: None,
        }
    }

    /// Takes one publish's allowance if one is free at `now`; else `Err(when)`: the
    /// earliest instant it will be.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let tat = self.tat.map_or(now, |t| t.max(now));
        let allowed_from = tat.checked_sub(self.tolerance).unwrap_or(now);
        if allowed_from > now {
            return Err(allowed_from);
        }
        self.tat = Some(tat + self.interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over every window of the run, at most `burst + T * rate` publishes went, and when
    /// always sending at the earliest instant allowed, the count over 30 s is the rate's.
    #[test]
    #[allow(clippy::disallowed_methods)] // the test plays the runtime
    fn no_window_exceeds_burst_plus_rate() {
        let start = Instant::now();
        for (rate, burst) in [(10.0, 1u32), (33.3, 5), (1000.0, 100), (0.5, 2)] {
            let mut r = RateLimit::new(rate, burst);
            let mut now = start;
            let mut sent = Vec::new();
            let end = start + Duration::from_secs(30);
            while now < end {
                match r.take(now) {
                    Ok(()) => sent.push(now),
                    Err(at) => {
                        assert!(at > now, "{rate}: a wait that does not move");
                        now = at;
                    }
                }
            }
            for (i, a) in sent.iter().enumerate() {
                for (j, b) in sent.iter().enumerate().skip(i) {
                    let span = b.duration_since(*a).as_secs_f64();
                    let allowed = f64::from(burst) + span * rate;
                    assert!(
                        (j - i + 1) as f64 <= allowed + 1e-6,
                        "{rate}/{burst}: {} in {span} s",
                        j - i + 1
                    );
                }
                if i > 2000 {
                    break;
                }
            }
            let want = f64::from(burst) + 30.0 * rate;
            let got = sent.len() as f64;
            assert!(
                (got - want).abs() <= 1.0,
                "{rate}/{burst}: {got} sent in 30 s, want {want}"
            );
        }
    }
}
