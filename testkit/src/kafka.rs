//! Kafka for tests: rdkafka's in-process `MockCluster`, a producer, and a reader of
//! committed offsets. The mock keeps at most 5 MiB per partition (older data is dropped).
//! Its classic group protocol waits 3 s before the first assignment and
//! `session.timeout.ms - 1 s` per rebalance (and never completes a join with sessions
//! under 6 s here); its KIP-848 protocol (`group.protocol=consumer`) assigns in ~150 ms,
//! so tests use that unless they exercise the classic (eager, cooperative) protocols.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// An in-process Kafka cluster.
pub struct MockKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
    producer: BaseProducer,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.cluster.bootstrap_servers())
            .finish()
    }
}

/// Consumer properties that keep group joins short on the mock cluster (KIP-848).
pub fn fast_group_properties() -> BTreeMap<String, String> {
    [
        ("group.protocol", "consumer"),
        ("auto.offset.reset", "earliest"),
        ("topic.metadata.refresh.interval.ms", "500"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Consumer properties for the classic group protocol with `strategy` (`range` is eager,
/// `cooperative-sticky` incremental); 6 s sessions, the shortest the mock completes.
pub fn classic_group_properties(strategy: &str) -> BTreeMap<String, String> {
    [
        ("group.protocol", "classic"),
        ("partition.assignment.strategy", strategy),
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("auto.offset.reset", "earliest"),
        ("topic.metadata.refresh.interval.ms", "500"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl MockKafka {
    /// A one-broker cluster.
    pub fn start() -> Result<Self, String> {
        let cluster = MockCluster::new(1).map_err(|e| format!("MockCluster: {e}"))?;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "5")
            .create()
            .map_err(|e| format!("producer: {e}"))?;
        Ok(Self { cluster, producer })
    }

    /// `bootstrap.servers` for clients.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        self.cluster
            .create_topic(name, partitions, 1)
            .map_err(|e| format!("create topic {name}: {e}"))
    }

    /// Produces keyed records to an explicit partition and waits for all acks.
    pub fn produce(&self, topic: &str, records: &[(i32, String, String)]) -> Result<(), String> {
        produce_all(&self.producer, topic, records)
    }

    /// The group's committed positions for `topic`'s partitions (None: nothing committed).
    pub fn committed(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<Option<i64>>, String> {
        committed_offsets(&self.bootstrap(), group, topic, partitions)
    }

    /// Every record on `topic` (key, value), read from the beginning by a fresh consumer
    /// (at most `timeout`).
    pub fn read_all(
        &self,
        topic: &str,
        expect: usize,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set(
                "group.id",
                format!("reader-{}", crate::mosquitto::free_port()),
            )
            .set("auto.offset.reset", "earliest")
            .set("group.protocol", "consumer")
            .create()
            .map_err(|e| format!("consumer: {e}"))?;
        consumer.subscribe(&[topic]).map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < expect && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                use rdkafka::Message;
                let k = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let v = m
                    .payload()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                out.push((k, v));
            }
        }
        Ok(out)
    }
}

/// Produces keyed records to explicit partitions with `producer` and waits for every ack
/// (a full client queue is waited out, at most 120 s).
pub fn produce_all(
    producer: &BaseProducer,
    topic: &str,
    records: &[(i32, String, String)],
) -> Result<(), String> {
    for (p, k, v) in records {
        let mut rec = BaseRecord::to(topic)
            .partition(*p)
            .key(k.as_str())
            .payload(v.as_str());
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        && std::time::Instant::now() < deadline =>
                {
                    producer.poll(Duration::from_millis(10));
                    rec = r;
                }
                Err((e, _)) => return Err(format!("produce to {topic}: {e}")),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| format!("produce flush: {e}"))
}

/// A group's committed positions for `topic`'s partitions on the cluster at `bootstrap`
/// (None: nothing committed).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<Option<i64>>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| format!("committed offsets of {group}: {e}"))?;
    Ok((0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect())
}
