//! rdkafka glue shared by both runtimes' bridges: client configs, record conversion, the
//! dead-letter producer (asynchronous, confirmed by delivery reports), executing the core's
//! consumer actions, and the rebalance callbacks that hand the group's facts to
//! [`BridgeFlow`]. No policy here: every decision is `mqtt_sink_core::BridgeFlow`'s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_core::{
    ActionReport, BridgeAction, BridgeError, BridgeFlow, BridgeParts, BridgeRuntime, BridgeStats,
    CommitOffsets, DeadLetterDone, DeadLetterFn, ErrorPolicy, Header, KafkaConfig, OffsetList,
    Record, RejectReason, SinkRuntime, TopicPartition,
};
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{DeliveryResult, Header as KHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// How often librdkafka reports its statistics, unless the user set
/// `statistics.interval.ms`: they say whether the consumer is a member of its group (a
/// member without partitions gets no rebalance callback under KIP-848).
pub const STATISTICS_INTERVAL_MS: &str = "1000";

/// librdkafka consumer properties the sink sets unless the user sets them
/// (`kafka.properties`); measured in BENCHMARKS.md ("Memory at the defaults"):
/// - `statistics.interval.ms`: [`STATISTICS_INTERVAL_MS`].
/// - `queued.max.messages.kbytes` 8 MiB (librdkafka: 64 MiB): the prefetch queue. librdkafka
///   also caps a fetch response at this size (`fetch.max.bytes`, unless set), and a
///   response's buffer lives until its last record is taken, so the prefetch costs up to
///   about twice this, plus librdkafka's own few hundred bytes per queued record. Smaller
///   fetches cost throughput where a fetch is slow: 1 MiB fetches cut Tansu's rate to a third.
/// - `queued.min.messages` 20000 (librdkafka: 100000): the prefetch queue's bound in records
///   (librdkafka fetches while the queue holds fewer records than this and fewer bytes than
///   the above). It binds for small records, whose cost is mostly librdkafka's per-record
///   overhead rather than their bytes: at 200 B the 8 MiB queue held ~40k records, and
///   the daemon peaked ~12 MiB higher than with 20000. 10000 saved 6 MiB more but read
///   Tansu (slow fetches) 17-19 % slower.
/// - `fetch.queue.backoff.ms` 20 (librdkafka: 1000): how long a partition waits to fetch
///   again after finding the queue full. A small queue is often full, and a 1 s pause
///   starved the sink (-11 % msg/s at 64 partitions).
pub const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
    ("queued.max.messages.kbytes", "8192"),
    ("queued.min.messages", "20000"),
    ("fetch.queue.backoff.ms", "20"),
];

/// The consumer's client config: [`CONSUMER_DEFAULTS`], then the user's properties (which
/// replace them), then ours (auto commit and auto offset store off).
pub fn consumer_config(k: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (key, v) in CONSUMER_DEFAULTS {
        cc.set(key, v);
    }
    for (key, v) in &k.properties {
        cc.set(key, v);
    }
    cc.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    cc
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

/// Assigned partitions for a log line, in topic and partition order:
/// `t/0 (committed @1000), t/1 (no committed position)`.
pub fn assigned_names(parts: &[(TopicPartition, Option<i64>)]) -> String {
    let mut sorted: Vec<_> = parts.iter().collect();
    sorted.sort_by(|a, b| (&a.0.topic, a.0.partition).cmp(&(&b.0.topic, b.0.partition)));
    sorted
        .into_iter()
        .map(|(tp, pos)| match pos {
            Some(o) => format!("{tp} (committed @{o})"),
            None => format!("{tp} (no committed position)"),
        })
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

/// The flow, shared by a bridge's loop, its rebalance callbacks and its stats handle.
pub type SharedFlow = Arc<Mutex<BridgeFlow>>;

/// Locks the flow. A poisoned lock means a callback panicked mid-way; the flow's state is
/// still consistent (every method leaves it so), so the bridge goes on with it.
pub fn lock(flow: &Mutex<BridgeFlow>) -> MutexGuard<'_, BridgeFlow> {
    flow.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a running bridge's stats.
#[derive(Debug, Clone)]
pub struct StatsHandle(SharedFlow);

impl StatsHandle {
    /// A handle on a bridge's flow.
    pub fn new(flow: SharedFlow) -> Self {
        Self(flow)
    }

    /// The stats now.
    pub fn snapshot(&self) -> BridgeStats {
        lock(&self.0).stats().clone()
    }
}

/// The dead-letter producer's client config: the user's properties less the consumer-only
/// ones (so SASL and TLS apply), then idempotence.
pub fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (key, v) in k.producer_properties() {
        cc.set(key, v);
    }
    cc.set("bootstrap.servers", &k.brokers)
        .set("enable.idempotence", "true");
    cc
}

/// Delivery reports of dead letters: each produce carries its completion.
struct DeadLetterContext;

impl ClientContext for DeadLetterContext {}

impl ProducerContext for DeadLetterContext {
    type DeliveryOpaque = Box<Mutex<Option<DeadLetterDone>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, m)) => Err(format!("delivery to {} failed: {e}", m.topic())),
        };
        let done = done
            .lock()
            .map(|mut d| d.take())
            .unwrap_or_else(|p| p.into_inner().take());
        if let Some(done) = done {
            done(outcome);
        }
    }
}

/// A dead-letter producer for the sink (`SinkBuilder::dead_letter`): it hands each record
/// to an idempotent producer built from the bridge's Kafka properties and returns at once;
/// the record's completion runs on the producer's thread with the delivery report (only a
/// successful delivery lets its offset pass). The record goes to `topic` with its key,
/// value and headers plus `mqtt-sink.error` and `mqtt-sink.origin` (topic/partition@offset).
pub fn dead_letter_producer(k: &KafkaConfig, topic: String) -> Result<DeadLetterFn, String> {
    let p: ThreadedProducer<DeadLetterContext> = producer_config(k)
        .create_with_context(DeadLetterContext)
        .map_err(|e| format!("dead-letter producer: {e}"))?;
    Ok(Box::new(
        move |r: &Record, why: &RejectReason, done: DeadLetterDone| {
            let mut headers = OwnedHeaders::new();
            for h in &r.headers {
                headers = headers.insert(KHeader {
                    key: &h.key,
                    value: h.value.as_deref(),
                });
            }
            let (reason, origin) = (why.to_string(), r.coords().to_string());
            headers = headers
                .insert(KHeader {
                    key: "mqtt-sink.error",
                    value: Some(reason.as_bytes()),
                })
                .insert(KHeader {
                    key: "mqtt-sink.origin",
                    value: Some(origin.as_bytes()),
                });
            let opaque = Box::new(Mutex::new(Some(done)));
            let mut rec: BaseRecord<'_, [u8], [u8], _> =
                BaseRecord::with_opaque_to(&topic, opaque).headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_ref());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_ref());
            }
            if let Err((e, rec)) = p.send(rec) {
                // Not queued (queue full, too large, ...): no report will come.
                let done = rec.delivery_opaque.lock().ok().and_then(|mut d| d.take());
                if let Some(done) = done {
                    done(Err(format!("dead-letter produce to {topic}: {e}")));
                }
            }
        },
    ))
}

/// Test seam: the next `n` seeks fail as if librdkafka refused them (for the regression
/// tests of a failed seek; nothing else calls it).
#[doc(hidden)]
pub fn fail_next_seeks(n: u32) {
    FAIL_SEEKS.store(n, Ordering::SeqCst);
}

static FAIL_SEEKS: AtomicU32 = AtomicU32::new(0);

/// Executes a consumer action of the flow (pause, resume, seek, commit) and returns its
/// report; `None` for a sink action (the runtime executes those).
pub fn execute<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    action: &BridgeAction,
) -> Option<ActionReport> {
    match action {
        BridgeAction::Pause(p) => {
            if let Err(e) = consumer.pause(&tpl(p)) {
                tracing::warn!("pause {}: {e}", names(p));
            }
        }
        BridgeAction::Resume(p) => {
            if let Err(e) = consumer.resume(&tpl(p)) {
                tracing::warn!("resume {}: {e}", names(p));
            }
        }
        BridgeAction::Seek { tp, offset } => {
            let injected = FAIL_SEEKS
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let result = if injected {
                Err("injected seek failure".to_string())
            } else {
                consumer
                    .seek(
                        &tp.topic,
                        tp.partition,
                        Offset::Offset(*offset),
                        Duration::from_secs(5),
                    )
                    .map_err(|e| e.to_string())
            };
            match &result {
                Ok(()) => tracing::info!("rewound {tp} to offset {offset}"),
                Err(e) => tracing::warn!("seek {tp} to offset {offset} failed: {e}; retrying"),
            }
            return Some(ActionReport::Sought(tp.clone(), *offset, result));
        }
        BridgeAction::Commit(offsets) => {
            let result = commit(consumer, offsets);
            if let Err(e) = &result {
                tracing::warn!("commit {} failed: {e}", OffsetList(offsets));
            }
            return Some(ActionReport::Committed(offsets.clone(), result));
        }
        _ => return None,
    }
    Some(ActionReport::Done)
}

/// Assigned partitions with their committed positions (the flow's rewind floor), read
/// from the group coordinator; a partition whose position cannot be read has none.
pub fn with_committed<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    list: &TopicPartitionList,
) -> Vec<(TopicPartition, Option<i64>)> {
    let committed = consumer
        .committed_offsets(list.clone(), Duration::from_secs(10))
        .map_err(|e| tracing::warn!("reading committed offsets: {e}"))
        .ok();
    partitions(list)
        .into_iter()
        .map(|tp| {
            let pos = committed.as_ref().and_then(|c| {
                match c.find_partition(&tp.topic, tp.partition)?.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                }
            });
            (tp, pos)
        })
        .collect()
}

/// Executes the flow's sink actions for the rebalance callbacks (which run synchronously
/// inside the consumer's poll).
pub trait SinkPort: Send + Sync {
    /// Executes a sink action (push, flush, assign, revoke, rewind, committed) to the end.
    fn execute(&self, action: BridgeAction) -> ActionReport;
}

/// Executes the flow's actions until it has none: consumer actions here, sink actions
/// through `port`. The flow is locked only between actions, never while one runs.
pub fn drain<C: Consumer<X>, X: ConsumerContext>(
    flow: &Mutex<BridgeFlow>,
    consumer: &C,
    port: &impl SinkPort,
) {
    loop {
        let Some(action) = lock(flow).poll_action(Instant::now()) else {
            return;
        };
        let report = match execute(consumer, &action) {
            Some(r) => r,
            None => port.execute(action),
        };
        lock(flow).handle_report(Instant::now(), report);
    }
}

/// The consumer context of a bridge: rebalance callbacks become flow facts, and the
/// flow's actions run before the callback returns (a revoke's flush and commit complete
/// before the partitions go).
pub struct FlowContext<P> {
    flow: SharedFlow,
    port: P,
    /// `group.protocol = consumer` (KIP-848).
    kip848: bool,
}

impl<P> std::fmt::Debug for FlowContext<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowContext").finish_non_exhaustive()
    }
}

impl<P> FlowContext<P> {
    /// A context for `flow`, executing sink actions through `port`.
    pub fn new(flow: SharedFlow, port: P) -> Self {
        Self {
            flow,
            port,
            kip848: false,
        }
    }

    /// The group protocol is KIP-848's `consumer` (see [`ClientContext::stats`] here).
    #[must_use]
    pub fn kip848(self, kip848: bool) -> Self {
        Self { kip848, ..self }
    }
}

impl<P: SinkPort> ClientContext for FlowContext<P> {
    /// librdkafka's statistics: whether the consumer is a member of its group now. The
    /// classic protocol hands a member without partitions an empty assignment (join state
    /// "steady"); under KIP-848 such a member heartbeats with its coordinator ("up") and
    /// its join state stays "init".
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(g) = statistics.cgrp {
            let member = g.state == "up" && (g.join_state == "steady" || self.kip848);
            lock(&self.flow).handle_group_state(member);
        }
    }
}

impl<P: SinkPort> ConsumerContext for FlowContext<P> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = partitions(list);
            tracing::info!("partitions revoked: {}; flushing", names(&revoked));
            lock(&self.flow).handle_revoked(Instant::now(), revoked);
            drain(&self.flow, consumer, &self.port);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let parts = with_committed(consumer, list);
            tracing::info!("partitions assigned: {}", assigned_names(&parts));
            lock(&self.flow).handle_assigned(parts);
            drain(&self.flow, consumer, &self.port);
        }
    }
}

/// A consumer's delivery for the flow: records converted, errors counted.
pub fn offer<M: Message>(
    flow: &mut BridgeFlow,
    topics: &mut BTreeMap<String, Arc<str>>,
    now: Instant,
    msg: Result<M, rdkafka::error::KafkaError>,
) {
    match msg {
        Ok(m) => flow.handle_records(now, [to_record(topics, &m)]),
        Err(e) => flow.handle_kafka_error(e.to_string()),
    }
}

/// The sink a bridge runtime starts.
pub type SinkOf<R> = <<R as BridgeRuntime>::Sink as SinkRuntime>::Sink;

/// Starts what every runtime's bridge starts alike: the client-id suffix, the dead-letter
/// producer the error policy asks for, the sink, the flow (with the transform), and the
/// consumer `C`, whose rebalance callbacks reach the sink through `port(&sink)`,
/// subscribed to the topics.
pub fn start_bridge<R, P, C>(
    mut parts: BridgeParts<R>,
    port: impl FnOnce(&SinkOf<R>) -> P,
) -> Result<(SinkOf<R>, C, SharedFlow), BridgeError>
where
    R: BridgeRuntime,
    P: SinkPort,
    C: FromClientConfigAndContext<FlowContext<P>> + Consumer<FlowContext<P>>,
{
    parts.apply_client_id_suffix(default_client_id_suffix);
    let BridgeParts {
        kafka,
        mut sink,
        transform,
        ..
    } = parts;
    let mqtt = sink.config_mut();
    if let (ErrorPolicy::DeadLetter, Some(topic)) =
        (mqtt.error_policy, mqtt.dead_letter_topic.clone())
    {
        let produce = dead_letter_producer(&kafka, topic).map_err(BridgeError::Kafka)?;
        sink = sink.dead_letter(produce);
    }
    let sink = sink.start().map_err(|e| BridgeError::Sink(e.to_string()))?;
    let mut flow = BridgeFlow::new(&kafka, Instant::now());
    if let Some(t) = transform {
        flow.set_transform(t);
    }
    let flow = Arc::new(Mutex::new(flow));
    let kip848 = kafka
        .properties
        .get("group.protocol")
        .is_some_and(|p| p.eq_ignore_ascii_case("consumer"));
    let ctx = FlowContext::new(flow.clone(), port(&sink)).kip848(kip848);
    let consumer: C = consumer_config(&kafka)
        .create_with_context(ctx)
        .map_err(|e| BridgeError::Kafka(e.to_string()))?;
    let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| BridgeError::Kafka(format!("subscribe {topics:?}: {e}")))?;
    Ok((sink, consumer, flow))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L9: a callback that panicked while holding the flow poisons its lock; the bridge
    /// (and the next revoke callback) still reach the flow instead of skipping it.
    #[test]
    fn a_poisoned_flow_lock_is_still_taken() {
        let kafka = KafkaConfig::new("b", "g", vec!["t".into()]);
        #[allow(clippy::disallowed_methods)]
        let flow: SharedFlow = Arc::new(Mutex::new(BridgeFlow::new(&kafka, Instant::now())));
        let f = flow.clone();
        let panicked = std::thread::spawn(move || {
            let _g = f.lock();
            panic!("a callback panicked");
        })
        .join();
        assert!(panicked.is_err() && flow.is_poisoned());
        lock(&flow).handle_assigned(vec![(TopicPartition::new("t", 0), Some(3))]);
        assert_eq!(lock(&flow).assigned(), vec![TopicPartition::new("t", 0)]);
    }

    /// The prefetch defaults hold unless the user sets the property; the user's value wins.
    #[test]
    fn consumer_defaults_yield_to_the_users_properties() {
        let mut kafka = KafkaConfig::new("b", "g", vec!["t".into()]);
        let cc = consumer_config(&kafka);
        assert_eq!(cc.get("queued.max.messages.kbytes"), Some("8192"));
        assert_eq!(cc.get("queued.min.messages"), Some("20000"));
        assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(cc.get("statistics.interval.ms"), Some("1000"));
        kafka
            .properties
            .insert("queued.max.messages.kbytes".into(), "65536".into());
        let cc = consumer_config(&kafka);
        assert_eq!(cc.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(cc.get("fetch.queue.backoff.ms"), Some("20"));
        let _: BaseConsumer = cc.create().expect("a valid consumer config");
    }
}
