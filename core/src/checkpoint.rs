//! When a Kafka bridge checkpoints (flush, then commit): every `commit_interval`, or after
//! `commit_every` records, whichever comes first; after a failed checkpoint, consumption
//! resumes only after a backoff. Sans-IO like the rest of the core: time is an argument.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

/// The checkpoint schedule of a bridge.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    interval: Duration,
    every: Option<u64>,
    next: Instant,
    since: u64,
    resume_at: Option<Instant>,
    backoff: Backoff,
}

impl Checkpoints {
    /// A schedule starting at `now`. `every` of 0 or `None` means by time only.
    pub fn new(interval: Duration, every: Option<u64>, now: Instant) -> Self {
        // Bounded (review L5): `now + interval` must not overflow.
        let interval = interval.min(crate::config::MAX_DURATION);
        Self {
            interval,
            every: every.filter(|n| *n > 0),
            next: now + interval,
            since: 0,
            resume_at: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30), 0),
        }
    }

    /// `n` records were pushed into the sink (`commit_every` counts records, not batches).
    pub fn records_pushed(&mut self, n: u64) {
        self.since += n;
    }

    /// How many more records may be pushed before `commit_every` makes a checkpoint due
    /// (`None`: no count, only time).
    pub fn records_until_due(&self) -> Option<u64> {
        self.every.map(|n| n.saturating_sub(self.since))
    }

    /// True when a checkpoint should begin now.
    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.next || self.every.is_some_and(|n| self.since >= n)
    }

    /// When the next checkpoint is due by time (wake up then).
    pub fn next_deadline(&self) -> Instant {
        match self.resume_at {
            Some(r) => r.min(self.next),
            None => self.next,
        }
    }

    /// A checkpoint completed: the schedule restarts and the backoff resets.
    pub fn completed(&mut self, now: Instant) {
        self.next = now + self.interval;
        self.since = 0;
        self.resume_at = None;
        self.backoff.reset();
    }

    /// A checkpoint failed (the caller rewound): consumption pauses until
    /// [`may_consume`](Self::may_consume), with a growing backoff.
    pub fn failed(&mut self, now: Instant) {
        let delay = self.backoff.next_delay();
        self.resume_at = Some(now + delay);
        self.next = now + delay + self.interval;
        self.since = 0;
    }

    /// Ends the backoff once its time has come (so that `next_deadline` moves on to the
    /// next checkpoint instead of staying in the past).
    pub fn resume_if_due(&mut self, now: Instant) {
        if self.resume_at.is_some_and(|r| now >= r) {
            self.resume_at = None;
        }
    }

    /// False while backing off after a failed checkpoint.
    pub fn may_consume(&self, now: Instant) -> bool {
        self.resume_at.is_none_or(|r| now >= r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // the test plays the runtime
    fn due_by_time_or_count_and_backs_off_after_failure() {
        let t0 = Instant::now();
        let mut c = Checkpoints::new(Duration::from_secs(5), Some(3), t0);
        assert!(!c.is_due(t0));
        assert!(c.is_due(t0 + Duration::from_secs(5)));
        c.records_pushed(2);
        assert!(!c.is_due(t0));
        c.records_pushed(1);
        assert!(c.is_due(t0));
        c.completed(t0);
        assert!(!c.is_due(t0));
        c.failed(t0);
        assert!(!c.may_consume(t0));
        assert!(c.may_consume(t0 + Duration::from_secs(1)));
        assert!(c.next_deadline() <= t0 + Duration::from_millis(200));
    }
}
