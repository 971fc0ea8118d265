//! Kafka for tests: rdkafka's in-process `MockCluster`, a producer, and a reader of
//! committed offsets. The mock keeps at most 5 MiB per partition (older data is dropped).
//! Its classic group protocol waits 3 s before the first assignment and
//! `session.timeout.ms - 1 s` per rebalance (and never completes a join with sessions
//! under 6 s here); its KIP-848 protocol (`group.protocol=consumer`) assigns in ~150 ms,
//! so tests use that unless they exercise the classic (eager, cooperative) protocols.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
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

    /// Produces a tombstone (a record with `key` and no value) and waits for its ack.
    pub fn produce_tombstone(&self, topic: &str, partition: i32, key: &str) -> Result<(), String> {
        let rec: BaseRecord<'_, str, ()> = BaseRecord::to(topic).partition(partition).key(key);
        self.producer
            .send(rec)
            .map_err(|(e, _)| format!("produce a tombstone to {topic}: {e}"))?;
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(|e| format!("produce flush: {e}"))
    }

    /// The end offset (high watermark) of `topic`/`partition`: how many records it holds.
    pub fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, String> {
        self.producer
            .client()
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map(|(_, high)| high)
            .map_err(|e| format!("watermarks of {topic}/{partition}: {e}"))
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

    /// Makes the next requests of `api` fail with `errors`, one error per request, first
    /// to last. Every client of the cluster gets them (this fixture's producer too), so a
    /// test sets them once its own records are produced.
    pub fn request_errors(&self, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        self.cluster.request_errors(api, errors);
    }

    /// Drops the errors [`request_errors`](Self::request_errors) left for `api`.
    pub fn clear_request_errors(&self, api: RDKafkaApiKey) {
        self.cluster.clear_request_errors(api);
    }

    /// Every record on `topic` (key, value), read from the beginning by a fresh consumer
    /// (at most `timeout`).
    pub fn read_all(
        &self,
        topic: &str,
        expect: usize,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, String> {
        Ok(self
            .read_records(topic, expect, timeout)?
            .into_iter()
            .map(|r| (r.key, r.value))
            .collect())
    }

    /// [`read_all`](Self::read_all) with each record's partition and offset.
    pub fn read_records(
        &self,
        topic: &str,
        expect: usize,
        timeout: Duration,
    ) -> Result<Vec<ReadRecord>, String> {
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
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let value = m
                    .payload()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                out.push(ReadRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key,
                    value,
                });
            }
        }
        Ok(out)
    }

    /// The partition a producer with `properties` (e.g. a `partitioner`) puts each of
    /// `keys` in, on a topic of `partitions` partitions: the keys are produced without a
    /// partition to a new probe topic and read back.
    pub fn partitions_for_keys(
        &self,
        keys: &[&str],
        partitions: i32,
        properties: &BTreeMap<String, String>,
    ) -> Result<Vec<i32>, String> {
        static PROBES: AtomicU32 = AtomicU32::new(0);
        let topic = format!("probe-{}", PROBES.fetch_add(1, Ordering::Relaxed));
        self.create_topic(&topic, partitions)?;
        let mut cc = ClientConfig::new();
        for (k, v) in properties {
            cc.set(k, v);
        }
        let producer: BaseProducer = cc
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .map_err(|e| format!("probe producer: {e}"))?;
        for k in keys {
            producer
                .send(BaseRecord::to(&topic).key(*k).payload(*k))
                .map_err(|(e, _)| format!("probe produce: {e}"))?;
        }
        producer
            .flush(Duration::from_secs(30))
            .map_err(|e| format!("probe flush: {e}"))?;
        let read = self.read_records(&topic, keys.len(), Duration::from_secs(30))?;
        keys.iter()
            .map(|k| {
                read.iter()
                    .find(|r| r.key == *k)
                    .map(|r| r.partition)
                    .ok_or_else(|| format!("probe key {k} not read back from {topic}"))
            })
            .collect()
    }
}

/// A record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key (lossy UTF-8; empty if none).
    pub key: String,
    /// Its value (lossy UTF-8; empty if none).
    pub value: String,
}

/// A plain consumer in a group, next to the bridges under test: it joins, takes what the
/// group assigns it, discards what it reads, commits nothing, and leaves (closing its
/// consumer) on [`leave`](Self::leave) or drop. Tests use it to force rebalances and to
/// see when one has completed.
#[derive(Debug)]
pub struct GroupMember {
    stop: Arc<AtomicBool>,
    assigned: Arc<Mutex<Vec<i32>>>,
    left: mpsc::Receiver<()>,
}

impl GroupMember {
    /// Joins `group` on `bootstrap`, subscribed to `topic`, with the consumer `properties`
    /// (the group protocol and assignor of the members it joins).
    pub fn join(
        bootstrap: &str,
        group: &str,
        topic: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut cc = ClientConfig::new();
        for (k, v) in properties {
            cc.set(k, v);
        }
        let consumer: BaseConsumer = cc
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| format!("group member: {e}"))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| format!("group member subscribe {topic}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let (tx, left) = mpsc::channel();
        let (s, a) = (stop.clone(), assigned.clone());
        std::thread::spawn(move || {
            // Polling serves the group's rebalances (the default context assigns).
            while !s.load(Ordering::SeqCst) {
                let _ = consumer.poll(Duration::from_millis(100));
                if let Ok(tpl) = consumer.assignment() {
                    let parts = tpl.elements().iter().map(|e| e.partition()).collect();
                    *a.lock().unwrap_or_else(|p| p.into_inner()) = parts;
                }
            }
            drop(consumer);
            let _ = tx.send(());
        });
        Ok(Self {
            stop,
            assigned,
            left,
        })
    }

    /// The partitions assigned to it now.
    pub fn assigned(&self) -> Vec<i32> {
        self.assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (at most `timeout`) until it has partitions; returns them (empty: none came).
    pub fn wait_assigned(&self, timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let a = self.assigned();
            if !a.is_empty() || Instant::now() >= deadline {
                return a;
            }
            // Its thread updates the assignment after every poll (100 ms).
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Leaves the group (closes the consumer) and waits, at most `timeout`, until it has.
    pub fn leave(self, timeout: Duration) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        self.left
            .recv_timeout(timeout)
            .map_err(|_| format!("group member did not leave within {timeout:?}"))
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
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
