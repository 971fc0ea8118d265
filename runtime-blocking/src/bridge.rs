//! The Kafka bridge: a `BaseConsumer` in a consumer group, on the calling thread, feeding an
//! [`MqttSink`]. Checkpoints follow the core's [`Checkpoints`] schedule: flush, then commit
//! exactly the sink's positions. A failed flush rewinds (seek) to the last commit and backs
//! off. A revoke flushes and commits before it returns. A full sink pauses the partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_core::{
    Checkpoints, CommitOffsets, Config, ErrorPolicy, Header, Record, RecordMapper, TopicPartition,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header as KHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::{MqttSink, MqttSinkBuilder, SinkClient, SinkError, TrySendError};

type TransformFn = Box<dyn FnMut(Record) -> Option<Record> + Send>;

/// Kafka side of a bridge.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `group.id`.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Other librdkafka consumer properties, passed through (auto commit and auto offset
    /// store are forced off).
    pub properties: BTreeMap<String, String>,
    /// Checkpoint at least this often. Default: 5 s.
    pub commit_interval: Duration,
    /// Also checkpoint after this many records.
    pub commit_every: Option<u64>,
}

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
        }
    }
}

/// Why a bridge stopped with an error.
#[derive(Debug)]
#[non_exhaustive]
pub enum BridgeError {
    /// Kafka client setup or a fatal Kafka error.
    Kafka(String),
    /// The MQTT sink could not start or stopped.
    Sink(String),
}

impl fmt::Display for BridgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kafka(e) => write!(f, "Kafka: {e}"),
            Self::Sink(e) => write!(f, "MQTT sink: {e}"),
        }
    }
}

impl std::error::Error for BridgeError {}

/// What a bridge did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Records consumed from Kafka.
    pub consumed: u64,
    /// Records dropped by the transform.
    pub filtered: u64,
    /// Checkpoints committed.
    pub commits: u64,
    /// Checkpoints that failed and rewound.
    pub rewinds: u64,
    /// The last positions committed.
    pub committed: CommitOffsets,
    /// Consumer errors seen (librdkafka retries them).
    pub kafka_errors: u64,
    /// The last of them.
    pub last_kafka_error: Option<String>,
    /// Commits Kafka refused (the next checkpoint commits again).
    pub commit_errors: u64,
    /// The last refusal.
    pub last_commit_error: Option<String>,
}

/// State shared between the consume loop and the rebalance callbacks.
#[derive(Debug, Default)]
struct Shared {
    /// Partitions paused because the sink is full (pauses survive rebalances, so the set is
    /// the truth, re-applied on assign).
    paused: BTreeSet<(String, i32)>,
    /// The sink is full: newly assigned partitions start paused too.
    holding: bool,
    committed: CommitOffsets,
    commits: u64,
    commit_errors: u64,
    last_commit_error: Option<String>,
}

struct Ctx {
    sink: SinkClient,
    shared: Arc<Mutex<Shared>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Flush and commit before the partitions go to another instance.
            let offsets = match self.sink.flush() {
                Ok(o) => o,
                Err(
                    SinkError::FlushTimedOut { offsets, .. }
                    | SinkError::FlushFailed { offsets, .. },
                ) => offsets,
                Err(_) => Vec::new(),
            };
            let revoked = partitions(tpl);
            let mine: CommitOffsets = offsets
                .into_iter()
                .filter(|(tp, _)| revoked.contains(tp))
                .collect();
            // A refused commit (a rebalance already in progress) loses nothing: the next
            // owner consumes again from the last commit (duplicates, never losses).
            match commit(consumer, &mine) {
                Ok(()) => {
                    let _ = self.sink.committed(mine.clone());
                    if let Ok(mut s) = self.shared.lock() {
                        merge(&mut s.committed, &mine);
                        s.commits += 1;
                    }
                }
                Err(e) => {
                    if let Ok(mut s) = self.shared.lock() {
                        s.commit_errors += 1;
                        s.last_commit_error = Some(e);
                    }
                }
            }
            let _ = self.sink.revoke(revoked.clone());
            if let Ok(mut s) = self.shared.lock() {
                for tp in &revoked {
                    s.paused.remove(&(tp.topic.to_string(), tp.partition));
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = partitions(tpl);
            let _ = self
                .sink
                .assign(parts.iter().map(|tp| (tp.clone(), None)).collect());
            let Ok(mut s) = self.shared.lock() else {
                return;
            };
            if s.holding {
                let _ = consumer.pause(tpl);
                for tp in &parts {
                    s.paused.insert((tp.topic.to_string(), tp.partition));
                }
            } else {
                // A partition paused before it was revoked comes back paused: resume it.
                let _ = consumer.resume(tpl);
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn merge(into: &mut CommitOffsets, offsets: &CommitOffsets) {
    for (tp, off) in offsets {
        match into.iter_mut().find(|(t, _)| t == tp) {
            Some((_, o)) => *o = (*o).max(*off),
            None => into.push((tp.clone(), *off)),
        }
    }
}

fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    offsets: &CommitOffsets,
) -> Result<(), String> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, off) in offsets {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*off))
            .map_err(|e| e.to_string())?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| e.to_string())
}

/// Builds a [`Bridge`].
pub struct BridgeBuilder {
    kafka: KafkaConfig,
    mqtt: Config,
    sink: Option<MqttSinkBuilder>,
    mapper: Option<RecordMapper>,
    transform: Option<TransformFn>,
    client_id_suffix: Option<String>,
}

impl fmt::Debug for BridgeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeBuilder")
            .field("kafka", &self.kafka)
            .field("mqtt", &self.mqtt)
            .finish_non_exhaustive()
    }
}

impl BridgeBuilder {
    /// Replaces the record mapper (serializers, retain, properties).
    #[must_use]
    pub fn mapper(mut self, mapper: RecordMapper) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// A per-record transform: return `None` to drop the record (its offset passes).
    #[must_use]
    pub fn transform(mut self, f: impl FnMut(Record) -> Option<Record> + Send + 'static) -> Self {
        self.transform = Some(Box::new(f));
        self
    }

    /// Customizes the MQTT sink (callbacks) before it starts.
    #[must_use]
    pub fn sink(mut self, f: impl FnOnce(MqttSinkBuilder) -> MqttSinkBuilder) -> Self {
        let b = self
            .sink
            .take()
            .unwrap_or_else(|| MqttSink::builder(self.mqtt.clone()));
        self.sink = Some(f(b));
        self
    }

    /// The suffix added to the MQTT client id (`{client_id}-{suffix}`), so that instances
    /// of one group never share a client id (the broker would evict one). Default: the
    /// process id and a timestamp.
    #[must_use]
    pub fn client_id_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.client_id_suffix = Some(suffix.into());
        self
    }

    /// Creates the consumer (and the dead-letter producer), subscribes, starts the sink.
    pub fn start(self) -> Result<Bridge, BridgeError> {
        let suffix = self.client_id_suffix.unwrap_or_else(default_suffix);
        let mut mqtt = self.mqtt;
        if !suffix.is_empty() && !mqtt.client_id.is_empty() {
            mqtt.client_id = format!("{}-{suffix}", mqtt.client_id);
        }
        let producer: Option<Arc<BaseProducer>> =
            match (&mqtt.error_policy, &mqtt.dead_letter_topic) {
                (ErrorPolicy::DeadLetter, Some(_)) => Some(Arc::new(
                    ClientConfig::new()
                        .set("bootstrap.servers", &self.kafka.brokers)
                        .set("enable.idempotence", "true")
                        .create()
                        .map_err(|e| BridgeError::Kafka(format!("dead-letter producer: {e}")))?,
                )),
                _ => None,
            };
        let mut builder = match self.sink {
            Some(b) => b,
            None => MqttSink::builder(mqtt.clone()),
        };
        builder.config = mqtt.clone();
        if let Some(m) = self.mapper {
            builder = builder.mapper(m);
        }
        if let (Some(p), Some(topic)) = (producer.clone(), mqtt.dead_letter_topic.clone()) {
            builder = builder.dead_letter(move |record, reason| {
                produce_dead_letter(&p, &topic, record, &reason.to_string())
            });
        }
        let sink = builder
            .start()
            .map_err(|e| BridgeError::Sink(e.to_string()))?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut cc = ClientConfig::new();
        for (k, v) in &self.kafka.properties {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &self.kafka.brokers)
            .set("group.id", &self.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let consumer: BaseConsumer<Ctx> = cc
            .create_with_context(Ctx {
                sink: sink.client(),
                shared: shared.clone(),
            })
            .map_err(|e| BridgeError::Kafka(e.to_string()))?;
        let topics: Vec<&str> = self.kafka.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| BridgeError::Kafka(format!("subscribe {topics:?}: {e}")))?;
        let now = Instant::now();
        Ok(Bridge {
            checkpoints: Checkpoints::new(self.kafka.commit_interval, self.kafka.commit_every, now),
            kafka: self.kafka,
            sink,
            consumer,
            shared,
            transform: self.transform,
            stats: BridgeStats::default(),
            topics: BTreeMap::new(),
        })
    }
}

fn default_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos:08x}", std::process::id())
}

/// Produces a dead letter and waits for Kafka's confirmation.
fn produce_dead_letter(
    p: &BaseProducer,
    topic: &str,
    r: &Record,
    reason: &str,
) -> Result<(), String> {
    let mut headers = OwnedHeaders::new();
    for h in &r.headers {
        headers = headers.insert(KHeader {
            key: &h.key,
            value: h.value.as_deref(),
        });
    }
    let origin = r.coords().to_string();
    headers = headers
        .insert(KHeader {
            key: "mqtt-sink.error",
            value: Some(reason.as_bytes()),
        })
        .insert(KHeader {
            key: "mqtt-sink.origin",
            value: Some(origin.as_bytes()),
        });
    let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
    if let Some(k) = &r.key {
        rec = rec.key(k.as_ref());
    }
    if let Some(v) = &r.value {
        rec = rec.payload(v.as_ref());
    }
    p.send(rec)
        .map_err(|(e, _)| format!("dead-letter produce to {topic}: {e}"))?;
    p.flush(Duration::from_secs(10))
        .map_err(|e| format!("dead-letter produce to {topic} not confirmed: {e}"))
}

/// A running bridge. [`run`](Self::run) consumes until told to stop.
pub struct Bridge {
    kafka: KafkaConfig,
    sink: MqttSink,
    consumer: BaseConsumer<Ctx>,
    shared: Arc<Mutex<Shared>>,
    checkpoints: Checkpoints,
    transform: Option<TransformFn>,
    stats: BridgeStats,
    topics: BTreeMap<String, Arc<str>>,
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("kafka", &self.kafka)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Starts building a bridge from the Kafka and MQTT configs.
    pub fn builder(kafka: KafkaConfig, mqtt: Config) -> BridgeBuilder {
        BridgeBuilder {
            kafka,
            mqtt,
            sink: None,
            mapper: None,
            transform: None,
            client_id_suffix: None,
        }
    }

    /// Consumes, publishes and checkpoints until `stop` is set; then stops gracefully:
    /// flush, commit, DISCONNECT (bounded by the flush timeout).
    pub fn run(mut self, stop: &AtomicBool) -> Result<BridgeStats, BridgeError> {
        let mut held: Option<Record> = None;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if self.checkpoints.is_due(now) {
                if !self.checkpoint(now) {
                    held = None; // rewound: it is consumed again
                }
                continue;
            }
            if let Some(r) = held.take() {
                match self.sink.try_send(r) {
                    Ok(()) => {
                        self.checkpoints.record_pushed();
                        self.set_holding(false);
                    }
                    Err(TrySendError::Full(r)) => {
                        held = Some(r);
                        // Keep the group session alive while paused; acks free the buffer.
                        let _ = self.consumer.poll(Duration::from_millis(5));
                        continue;
                    }
                    Err(TrySendError::Refused(e)) => return Err(BridgeError::Sink(e.to_string())),
                }
            }
            if !self.checkpoints.may_consume(now) {
                let _ = self.consumer.poll(Duration::from_millis(10));
                continue;
            }
            let wait = self
                .checkpoints
                .next_deadline()
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            let record = match self.consumer.poll(wait) {
                None => continue,
                Some(Err(e)) => {
                    // Transient consumer errors (broker down, rebalance) are retried by
                    // librdkafka; count them and keep going.
                    self.stats.kafka_errors += 1;
                    self.stats.last_kafka_error = Some(e.to_string());
                    continue;
                }
                Some(Ok(m)) => to_record(&mut self.topics, &m),
            };
            self.stats.consumed += 1;
            let record = match self.transform.as_mut() {
                Some(t) => match t(record) {
                    Some(r) => r,
                    None => {
                        self.stats.filtered += 1;
                        continue;
                    }
                },
                None => record,
            };
            match self.sink.try_send(record) {
                Ok(()) => self.checkpoints.record_pushed(),
                Err(TrySendError::Full(r)) => {
                    held = Some(r);
                    self.set_holding(true);
                }
                Err(TrySendError::Refused(e)) => return Err(BridgeError::Sink(e.to_string())),
            }
        }
        // Graceful stop: what was taken is flushed and committed, then DISCONNECT.
        if let Some(r) = held.take() {
            let _ = self.sink.send(r);
        }
        self.checkpoint(Instant::now());
        self.consumer.unsubscribe();
        let shared = self
            .shared
            .lock()
            .map(|s| (s.committed.clone(), s.commits))
            .unwrap_or_default();
        self.stats.committed = shared.0;
        self.stats.commits = shared.1;
        let stats = self.stats.clone();
        self.sink
            .close()
            .map_err(|e| BridgeError::Sink(e.to_string()))?;
        Ok(stats)
    }

    /// Flush, then commit exactly the sink's positions. On failure: commit what is safe,
    /// rewind to the last commit, back off. Returns whether it completed.
    fn checkpoint(&mut self, now: Instant) -> bool {
        let (offsets, ok) = match self.sink.flush() {
            Ok(o) => (o, true),
            Err(
                SinkError::FlushTimedOut { offsets, .. } | SinkError::FlushFailed { offsets, .. },
            ) => (offsets, false),
            Err(_) => (Vec::new(), false),
        };
        match commit(&self.consumer, &offsets) {
            Ok(()) => {
                let _ = self.sink.committed(offsets.clone());
                if let Ok(mut s) = self.shared.lock() {
                    merge(&mut s.committed, &offsets);
                    s.commits += 1;
                }
            }
            Err(e) => {
                self.stats.commit_errors += 1;
                self.stats.last_commit_error = Some(e);
            }
        }
        if ok {
            self.checkpoints.completed(now);
            return true;
        }
        self.stats.rewinds += 1;
        if let Ok(seek) = self.sink.rewind() {
            for (tp, off) in seek {
                let _ = self.consumer.seek(
                    &tp.topic,
                    tp.partition,
                    Offset::Offset(off),
                    Duration::from_secs(5),
                );
            }
        }
        self.set_holding(false);
        self.checkpoints.failed(Instant::now());
        false
    }

    fn set_holding(&mut self, holding: bool) {
        let Ok(mut s) = self.shared.lock() else {
            return;
        };
        if s.holding == holding {
            return;
        }
        s.holding = holding;
        let Ok(assigned) = self.consumer.assignment() else {
            return;
        };
        if holding {
            let _ = self.consumer.pause(&assigned);
            for e in assigned.elements() {
                s.paused.insert((e.topic().to_string(), e.partition()));
            }
        } else {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in std::mem::take(&mut s.paused) {
                tpl.add_partition(&t, p);
            }
            let _ = self.consumer.resume(&tpl);
        }
    }
}

/// A Kafka message as a core record (topic names shared per topic).
fn to_record<M: Message>(topics: &mut BTreeMap<String, Arc<str>>, m: &M) -> Record {
    let topic = topics
        .entry(m.topic().to_string())
        .or_insert_with(|| Arc::from(m.topic()))
        .clone();
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    key: h.key.to_string(),
                    value: h.value.map(Bytes::copy_from_slice),
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        tp: TopicPartition {
            topic,
            partition: m.partition(),
        },
        offset: m.offset(),
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
    }
}
