//! The core's timers: one enum, one table; the next deadline is the earliest armed one.
//!
//! Firing is idempotent: `handle_timeout` fires only timers whose deadline is at or before
//! `now`, so an early, late or repeated call is harmless.

use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Reconnect after the backoff.
    Reconnect = 0,
    /// CONNACK must arrive by then.
    ConnAck = 1,
    /// Send PINGREQ if nothing was sent by then.
    Keepalive = 2,
    /// PINGRESP must arrive by then.
    PingResp = 3,
    /// The flush deadline.
    Flush = 4,
    /// The oldest in-flight publish must be acknowledged by then.
    Ack = 5,
    /// Stop waiting for a batch of free window slots; send into what is free.
    Refill = 6,
    /// The publish rate limit allows the next publish.
    Rate = 7,
}

const COUNT: usize = 8;
const ALL: [Timer; COUNT] = [
    Timer::Reconnect,
    Timer::ConnAck,
    Timer::Keepalive,
    Timer::PingResp,
    Timer::Flush,
    Timer::Ack,
    Timer::Refill,
    Timer::Rate,
];

#[derive(Debug, Default, Clone)]
pub(crate) struct TimerTable([Option<Instant>; COUNT]);

impl TimerTable {
    pub(crate) fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }

    pub(crate) fn get(&self, t: Timer) -> Option<Instant> {
        self.0[t as usize]
    }

    pub(crate) fn stop(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// Takes the earliest timer due at `now`, disarming it.
    pub(crate) fn expired(&mut self, now: Instant) -> Option<Timer> {
        let t = ALL
            .into_iter()
            .filter(|t| self.0[*t as usize].is_some_and(|at| at <= now))
            .min_by_key(|t| self.0[*t as usize])?;
        self.stop(t);
        Some(t)
    }
}
