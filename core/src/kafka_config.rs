//! The Kafka side of a bridge: what to consume, how often to commit, and which of the
//! user's librdkafka properties the dead-letter producer shares with the consumer.

use std::collections::BTreeMap;
use std::time::Duration;

/// The Kafka side of a bridge.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `group.id`.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Other librdkafka properties (security, timeouts, ...), passed to the consumer, and
    /// to the dead-letter producer less the consumer-only ones (see
    /// [`producer_properties`](Self::producer_properties)). Auto commit and auto offset
    /// store are forced off: the bridge commits exactly the acknowledged positions.
    pub properties: BTreeMap<String, String>,
    /// Checkpoint at least this often. Default: 5 s.
    pub commit_interval: Duration,
    /// Also checkpoint after this many records pushed to the sink.
    pub commit_every: Option<u64>,
    /// Between checkpoints, commit the acknowledged positions as they advance, at most this
    /// often (without a flush: what is committed is only what the broker acknowledged or
    /// the error policy handled), so that a crash replays about what was in flight rather
    /// than everything since the last checkpoint. Zero: commit at checkpoints only.
    /// A commit that takes `d` puts the next at least `9 d` later (where Kafka answers
    /// slowly, these commits take at most a tenth of the consumer loop's time).
    /// Default: 100 ms.
    pub commit_min_interval: Duration,
}

impl std::fmt::Debug for KafkaConfig {
    /// Property values are masked: they may hold `sasl.password` or `ssl.key.password`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .keys()
            .map(|k| (k.as_str(), "***"))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("properties", &props)
            .field("commit_interval", &self.commit_interval)
            .field("commit_every", &self.commit_every)
            .field("commit_min_interval", &self.commit_min_interval)
            .finish()
    }
}

/// librdkafka properties that only a consumer reads (CONFIGURATION.md, column C/P = C):
/// a producer given them warns and ignores them, so they are left out of its config.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "allow.auto.create.topics",
    "auto.offset.reset",
    "consume.callback.max.messages",
];

impl KafkaConfig {
    /// A config with the defaults.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            properties: BTreeMap::new(),
            commit_interval: Duration::from_secs(5),
            commit_every: None,
            commit_min_interval: Duration::from_millis(100),
        }
    }

    /// The properties the dead-letter producer takes from [`properties`](Self::properties):
    /// all but the consumer-only ones, so that it reaches the same cluster the same way
    /// (SASL, TLS, client id, timeouts).
    pub fn producer_properties(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .filter(|(k, _)| !CONSUMER_ONLY.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_shares_security_but_not_group_properties() {
        let mut k = KafkaConfig::new("b:9092", "g", vec!["t".into()]);
        for (key, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.password", "secret"),
            ("group.protocol", "consumer"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "6000"),
        ] {
            k.properties.insert(key.into(), v.into());
        }
        let p = k.producer_properties();
        assert_eq!(
            p.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["sasl.password", "security.protocol"]
        );
        assert!(!format!("{k:?}").contains("secret"));
    }
}
