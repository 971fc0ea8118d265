//! rdkafka glue shared by both runtimes' bridges: client configs, record conversion,
//! commits and dead-letter produces. No policy here: that is `mqtt_sink_core::BridgeFlow`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_core::{CommitOffsets, Header, KafkaConfig, Record, TopicPartition};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Header as KHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// The consumer's client config: the user's properties, then ours (auto commit and auto
/// offset store off).
pub fn consumer_config(k: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (key, v) in &k.properties {
        cc.set(key, v);
    }
    cc.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    cc
}

/// A producer for dead letters (idempotent).
pub fn dead_letter_producer(k: &KafkaConfig) -> Result<BaseProducer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .set("enable.idempotence", "true")
        .create()
        .map_err(|e| format!("dead-letter producer: {e}"))
}

/// The partitions of a list.
pub fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

/// Partitions for a log line: `t/0, t/1`.
pub fn names(parts: &[TopicPartition]) -> String {
    parts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A list of partitions.
pub fn tpl(parts: &[TopicPartition]) -> TopicPartitionList {
    let mut t = TopicPartitionList::new();
    for tp in parts {
        t.add_partition(&tp.topic, tp.partition);
    }
    t
}

/// Commits exactly `offsets` (positions: the next offset to consume), synchronously.
pub fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    offsets: &CommitOffsets,
) -> Result<(), String> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut t = TopicPartitionList::new();
    for (tp, off) in offsets {
        t.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*off))
            .map_err(|e| e.to_string())?;
    }
    consumer
        .commit(&t, CommitMode::Sync)
        .map_err(|e| e.to_string())
}

/// A Kafka message as a core record; topic names are shared per topic.
pub fn to_record<M: Message>(topics: &mut BTreeMap<String, Arc<str>>, m: &M) -> Record {
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

/// Produces a dead letter (key, value and headers of the record, plus
/// `mqtt-sink.error` and `mqtt-sink.origin` = topic/partition@offset) and waits for
/// Kafka's confirmation.
pub fn produce_dead_letter(
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

/// The default MQTT client-id suffix: process id and a time-derived nonce, so that
/// instances of one group never share a client id.
pub fn default_client_id_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos:08x}", std::process::id())
}

/// Consumer lag per committed partition: the high watermark (one small request per
/// partition, bounded by 1 s) minus the committed position. Call it off the consume loop
/// (a metrics scrape), with a client of its own.
pub fn lag<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    committed: &CommitOffsets,
) -> Vec<(TopicPartition, i64)> {
    committed
        .iter()
        .filter_map(|(tp, pos)| {
            let (_, high) = consumer
                .fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(1))
                .ok()?;
            (high >= 0).then(|| (tp.clone(), (high - pos).max(0)))
        })
        .collect()
}
