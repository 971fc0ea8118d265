//! Which connection a publish goes on (`connections` > 1): sticky while a topic has
//! publishes outstanding, least-loaded when it has none.

use std::collections::BTreeMap;

use crate::QoS;

/// Routes publishes over `n` connections so that one topic's publishes keep their order:
///
/// * a topic with publishes queued or in flight (not yet acknowledged, rejected or
///   dropped) goes where they are: one connection at a time holds a topic's publishes,
///   in push order;
/// * a topic with none goes on the connection with the fewest outstanding publishes,
///   its hash connection ([`connection_of`]) when that is among the fewest. Every earlier
///   publish of the topic was acknowledged by the broker, so a later one on another
///   connection cannot overtake it.
///
/// A fixed hash alone balances a few busy topics poorly (the busiest connection sets the
/// pace) and keeps queueing new topics behind a slow or cut connection. QoS 0 has no
/// acknowledgement: a written QoS 0 publish may still be unread by the broker, so once
/// any QoS 0 publish is routed, an idle topic goes on its hash connection (as before a
/// move, so nothing overtakes).
///
/// Topics are told apart by their 64-bit hash: two topics with one hash share their
/// stickiness, which costs balance, never order.
#[derive(Debug)]
pub(crate) struct Router {
    /// Outstanding publishes per connection.
    load: Vec<usize>,
    /// By topic hash, for topics with publishes outstanding: their connection and count.
    topics: BTreeMap<u64, (usize, usize)>,
    /// A QoS 0 publish was routed: idle topics go on their hash connection.
    hash_only: bool,
}

impl Router {
    pub(crate) fn new(connections: usize) -> Self {
        Self {
            load: vec![0; connections.max(1)],
            topics: BTreeMap::new(),
            hash_only: false,
        }
    }

    /// The key `release` is later called with, for a publish to `topic` (0 with one
    /// connection: nothing to track).
    pub(crate) fn key(&self, topic: &[u8]) -> u64 {
        match self.load.len() {
            1 => 0,
            _ => topic_hash(topic),
        }
    }

    /// The connection for a publish of the topic with `key`, at `qos`; counted outstanding
    /// until [`release`](Self::release).
    pub(crate) fn route(&mut self, key: u64, qos: QoS) -> usize {
        let n = self.load.len();
        if n == 1 {
            return 0;
        }
        self.hash_only |= qos == QoS::AtMostOnce;
        let (load, hash_only) = (&self.load, self.hash_only);
        let (to, count) = self.topics.entry(key).or_insert_with(|| {
            let home = (key % n as u64) as usize;
            let to = if hash_only {
                home
            } else {
                (0..n).fold(home, |best, i| if load[i] < load[best] { i } else { best })
            };
            (to, 0)
        });
        *count += 1;
        self.load[*to] += 1;
        *to
    }

    /// A publish routed with `key` left its connection (acknowledged, rejected, written at
    /// QoS 0, or dropped by a revoke or rewind).
    pub(crate) fn release(&mut self, key: u64) {
        if self.load.len() == 1 {
            return;
        }
        let Some((to, count)) = self.topics.get_mut(&key) else {
            debug_assert!(false, "release of a topic with nothing outstanding");
            return;
        };
        self.load[*to] -= 1;
        *count -= 1;
        if *count == 0 {
            self.topics.remove(&key);
        }
    }
}

/// The connection (of `connections`) a publish to `topic` goes on when no connection has
/// fewer publishes outstanding than it (the sink's first publish, or any while the sink
/// keeps up): for tools and tests that predict it.
pub fn connection_of(topic: &str, connections: usize) -> usize {
    match connections {
        0 | 1 => 0,
        n => (topic_hash(topic.as_bytes()) % n as u64) as usize,
    }
}

/// FNV-1a (64 bits) of a topic, then SplitMix64's finalizer: stable across runs, versions
/// and platforms, so that replicas and restarts route a topic alike. FNV-1a alone is weak
/// modulo small powers of two (its low bits depend only on the bytes' low bits: `dev/a` and
/// `dev/q` would always share a connection of 2, 4, 8 or 16); the finalizer mixes every bit
/// into every bit.
pub(crate) fn topic_hash(topic: &[u8]) -> u64 {
    let h = topic.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::{connection_of, topic_hash, Router};
    use crate::QoS;

    /// Topics that differ only in their bytes' high bits (`!`, `1`, `A`, `Q`, `a`, `q` share
    /// the low nibble 0x1) do not all land on one connection: FNV-1a alone put them all on
    /// the same one of 2, 4, 8 or 16.
    #[test]
    fn topics_differing_in_high_bits_spread_over_the_connections() {
        for n in [2, 4, 8, 16] {
            let on: std::collections::BTreeSet<_> = ["!", "1", "A", "Q", "a", "q"]
                .iter()
                .map(|c| connection_of(&format!("dev/{c}"), n))
                .collect();
            assert!(on.len() > 1, "{n} connections: all on {on:?}");
        }
        assert_eq!(connection_of("any/topic", 1), 0);
    }

    /// A topic with a publish outstanding stays on its connection however loaded; an idle
    /// one goes on the least-loaded connection, its hash connection on a tie.
    #[test]
    fn busy_topics_stay_idle_topics_go_to_the_least_loaded_connection() {
        let mut r = Router::new(4);
        let a = topic_hash(b"a");
        let home = connection_of("a", 4);
        assert_eq!(
            r.route(a, QoS::AtLeastOnce),
            home,
            "tie: the hash connection"
        );
        for _ in 0..5 {
            assert_eq!(r.route(a, QoS::AtLeastOnce), home, "outstanding: sticky");
        }
        // Another topic whose hash connection is `home` goes elsewhere now.
        let b = (0..1000)
            .map(|i| format!("b{i}"))
            .find(|t| connection_of(t, 4) == home)
            .expect("a topic hashing to the same connection");
        let other = r.route(topic_hash(b.as_bytes()), QoS::AtLeastOnce);
        assert_ne!(other, home, "least loaded, not the hash");
        for _ in 0..6 {
            r.release(a);
        }
        assert!(!r.topics.contains_key(&a), "idle topics are forgotten");
        assert_eq!(r.load[home], 0);
        r.release(topic_hash(b.as_bytes()));
        assert!(r.topics.is_empty() && r.load.iter().all(|&l| l == 0));
    }

    /// After a QoS 0 publish (unacknowledged: it may still be unread when written), idle
    /// topics go on their hash connection.
    #[test]
    fn after_a_qos0_publish_idle_topics_keep_their_hash_connection() {
        let mut r = Router::new(2);
        let busy = topic_hash(b"busy");
        let home = connection_of("busy", 2);
        for _ in 0..3 {
            r.route(busy, QoS::AtLeastOnce);
        }
        r.route(topic_hash(b"zero"), QoS::AtMostOnce);
        let t = (0..1000)
            .map(|i| format!("t{i}"))
            .find(|t| connection_of(t, 2) == home)
            .expect("a topic hashing to the same connection");
        assert_eq!(r.route(topic_hash(t.as_bytes()), QoS::AtLeastOnce), home);
    }
}
