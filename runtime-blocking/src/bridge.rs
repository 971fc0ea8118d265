//! The Kafka bridge on a thread: a `BaseConsumer` in a consumer group feeding an
//! [`MqttSink`]. It executes `mqtt_sink_core::BridgeFlow`'s actions (checkpoint, commit,
//! rewind, pause, resume); every decision is the core's.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqtt_sink_core::{
    BridgeFlow, BridgeStats, Config, ErrorPolicy, FlowAction, FlushOutcome, KafkaConfig, Record,
    RecordMapper,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset};

use crate::kafka::{self, partitions, tpl};
use crate::{MqttSink, MqttSinkBuilder, SinkClient, TrySendError};

type TransformFn = Box<dyn FnMut(Record) -> Option<Record> + Send>;

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

struct Ctx {
    sink: SinkClient,
    flow: Arc<Mutex<BridgeFlow>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // Flush and commit before the partitions go to another instance.
            let revoked = partitions(list);
            tracing::info!("partitions revoked: {}; flushing", kafka::names(&revoked));
            let flushed = FlushOutcome::from_flush(self.sink.flush());
            let Ok(mut flow) = self.flow.lock() else {
                return;
            };
            if let Some(FlowAction::Commit(offsets)) = flow.revoking(&revoked, flushed) {
                let result = kafka::commit(consumer, &offsets);
                match &result {
                    Ok(()) => tracing::info!("committed on revoke: {offsets:?}"),
                    Err(e) => tracing::warn!("commit on revoke failed: {e}"),
                }
                if result.is_ok() {
                    let _ = self.sink.committed(offsets.clone());
                }
                flow.committed(&offsets, result);
            }
            let _ = self.sink.revoke(revoked);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let parts = partitions(list);
            tracing::info!("partitions assigned: {}", kafka::names(&parts));
            let _ = self
                .sink
                .assign(parts.iter().map(|tp| (tp.clone(), None)).collect());
            let Ok(mut flow) = self.flow.lock() else {
                return;
            };
            match flow.assigned(&parts) {
                FlowAction::Pause(p) => drop(consumer.pause(&tpl(&p))),
                FlowAction::Resume(p) => drop(consumer.resume(&tpl(&p))),
                _ => {}
            }
        }
    }
}

/// Reads a running bridge's stats.
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Mutex<BridgeFlow>>);

impl StatsHandle {
    /// A handle on a flow (for other runtimes' bridges).
    pub fn new(flow: Arc<Mutex<BridgeFlow>>) -> Self {
        Self(flow)
    }

    /// The stats now.
    pub fn snapshot(&self) -> BridgeStats {
        self.0.lock().map(|f| f.stats.clone()).unwrap_or_default()
    }
}

/// Builds a [`Bridge`].
pub struct BridgeBuilder {
    kafka: KafkaConfig,
    mqtt: Config,
    customize: Option<Box<dyn FnOnce(MqttSinkBuilder) -> MqttSinkBuilder>>,
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

    /// Customizes the MQTT sink (its callbacks) before it starts.
    #[must_use]
    pub fn sink(mut self, f: impl FnOnce(MqttSinkBuilder) -> MqttSinkBuilder + 'static) -> Self {
        self.customize = Some(Box::new(f));
        self
    }

    /// The suffix added to the MQTT client id (`{client_id}-{suffix}`), so that instances
    /// of one group never share a client id (the broker would evict one). Default: the
    /// process id and a nonce. An empty suffix keeps the client id as configured.
    #[must_use]
    pub fn client_id_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.client_id_suffix = Some(suffix.into());
        self
    }

    /// Starts the sink, creates the consumer (and the dead-letter producer), subscribes.
    pub fn start(self) -> Result<Bridge, BridgeError> {
        let mut mqtt = self.mqtt;
        let suffix = self
            .client_id_suffix
            .unwrap_or_else(kafka::default_client_id_suffix);
        if !suffix.is_empty() && !mqtt.client_id.is_empty() {
            mqtt.client_id = format!("{}-{suffix}", mqtt.client_id);
        }
        let mut builder = MqttSink::builder(mqtt.clone());
        if let Some(f) = self.customize {
            builder = f(builder);
        }
        if let Some(m) = self.mapper {
            builder = builder.mapper(m);
        }
        if let (ErrorPolicy::DeadLetter, Some(topic)) =
            (mqtt.error_policy, mqtt.dead_letter_topic.clone())
        {
            let p = kafka::dead_letter_producer(&self.kafka).map_err(BridgeError::Kafka)?;
            builder = builder.dead_letter(move |r, why| {
                kafka::produce_dead_letter(&p, &topic, r, &why.to_string())
            });
        }
        let sink = builder
            .start()
            .map_err(|e| BridgeError::Sink(e.to_string()))?;
        let flow = Arc::new(Mutex::new(BridgeFlow::new(
            self.kafka.commit_interval,
            self.kafka.commit_every,
            Instant::now(),
        )));
        let ctx = Ctx {
            sink: sink.client(),
            flow: flow.clone(),
        };
        let consumer: BaseConsumer<Ctx> = kafka::consumer_config(&self.kafka)
            .create_with_context(ctx)
            .map_err(|e| BridgeError::Kafka(e.to_string()))?;
        let topics: Vec<&str> = self.kafka.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| BridgeError::Kafka(format!("subscribe {topics:?}: {e}")))?;
        Ok(Bridge {
            kafka: self.kafka,
            sink,
            consumer,
            flow,
            transform: self.transform,
            topics: BTreeMap::new(),
        })
    }
}

/// A running bridge. [`run`](Self::run) consumes until told to stop.
pub struct Bridge {
    kafka: KafkaConfig,
    sink: MqttSink,
    consumer: BaseConsumer<Ctx>,
    flow: Arc<Mutex<BridgeFlow>>,
    transform: Option<TransformFn>,
    topics: BTreeMap<String, Arc<str>>,
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("kafka", &self.kafka)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Starts building a bridge from the Kafka and MQTT configs.
    pub fn builder(kafka: KafkaConfig, mqtt: Config) -> BridgeBuilder {
        BridgeBuilder {
            kafka,
            mqtt,
            customize: None,
            mapper: None,
            transform: None,
            client_id_suffix: None,
        }
    }

    /// A handle to the bridge's MQTT sink (for its stats).
    pub fn sink_client(&self) -> SinkClient {
        self.sink.client()
    }

    /// A handle that reads the bridge's stats while it runs (for metrics).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle::new(self.flow.clone())
    }

    fn flow(&self) -> std::sync::MutexGuard<'_, BridgeFlow> {
        // A poisoned lock means a callback panicked: keep the state, it is still consistent.
        self.flow.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn execute(&mut self, actions: Vec<FlowAction>, held: &mut VecDeque<Record>) {
        for a in actions {
            match a {
                FlowAction::Pause(p) => drop(self.consumer.pause(&tpl(&p))),
                FlowAction::Resume(p) => drop(self.consumer.resume(&tpl(&p))),
                FlowAction::Commit(offsets) => {
                    let result = kafka::commit(&self.consumer, &offsets);
                    if result.is_ok() {
                        let _ = self.sink.committed(offsets.clone());
                    }
                    self.flow().committed(&offsets, result);
                }
                FlowAction::Rewind => {
                    held.clear(); // consumed again from the rewind point
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
                }
                _ => {}
            }
        }
    }

    fn checkpoint(&mut self, held: &mut VecDeque<Record>) {
        self.flow().checkpoint_started(Instant::now());
        let done = FlushOutcome::from_flush(self.sink.flush());
        let actions = self.flow().checkpoint_done(Instant::now(), done);
        self.execute(actions, held);
    }

    /// A consumed record (or a consumer error): through the transform into `held`.
    fn take(&mut self, msg: KafkaResult<Record>, held: &mut VecDeque<Record>) {
        match msg {
            Err(e) => self.flow().kafka_error(e.to_string()),
            Ok(record) => {
                let record = match self.transform.as_mut() {
                    Some(t) => t(record),
                    None => Some(record),
                };
                self.flow().consumed(record.is_some());
                held.extend(record);
            }
        }
    }

    /// Offers the held records, oldest first, until the sink is full.
    fn offer(&mut self, held: &mut VecDeque<Record>) -> Result<(), BridgeError> {
        // One round trip for everything that fits; the record that did not (if any) goes
        // through `try_send` below, which says whether the sink is full or refused it.
        if held.len() > 1 {
            let before = held.len();
            *held = self
                .sink
                .try_send_batch(std::mem::take(held))
                .map_err(|e| BridgeError::Sink(e.to_string()))?;
            if held.len() < before {
                let a = self.flow().pushed();
                self.execute(a.into_iter().collect(), held);
            }
        }
        while let Some(r) = held.pop_front() {
            match self.sink.try_send(r) {
                Ok(()) => {
                    let a = self.flow().pushed();
                    self.execute(a.into_iter().collect(), held);
                }
                Err(TrySendError::Full(r)) => {
                    held.push_front(r);
                    let assigned = self
                        .consumer
                        .assignment()
                        .map(|l| partitions(&l))
                        .unwrap_or_default();
                    let a = self.flow().sink_full(Instant::now(), &assigned);
                    self.execute(a.into_iter().collect(), held);
                    return Ok(());
                }
                Err(TrySendError::Refused(e)) => return Err(BridgeError::Sink(e.to_string())),
            }
        }
        Ok(())
    }

    /// Consumes, publishes and checkpoints until `stop` is set; then stops gracefully:
    /// flush, commit, DISCONNECT (bounded by the flush timeout).
    pub fn run(mut self, stop: &AtomicBool) -> Result<BridgeStats, BridgeError> {
        // Records consumed but not yet taken by the sink, in order: a consumed record is
        // never dropped (the ledger could otherwise commit past it).
        let mut held: VecDeque<Record> = VecDeque::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let (due, may, deadline) = {
                let f = self.flow();
                (f.checkpoint_due(now), f.may_consume(now), f.next_deadline())
            };
            if due {
                self.checkpoint(&mut held);
                continue;
            }
            if !may {
                // Backing off after a failed checkpoint (at most 30 s): take nothing.
                let left = deadline.saturating_duration_since(now);
                std::thread::sleep(left.min(Duration::from_millis(100)));
                continue;
            }
            self.offer(&mut held)?;
            let wait = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            if !held.is_empty() {
                // Full: take nothing until the sink has room (or the next deadline, when the
                // flow may pause the partitions). Once paused, poll the consumer to serve
                // its callbacks: it hands out no records then.
                self.sink
                    .wait_room(wait)
                    .map_err(|e| BridgeError::Sink(e.to_string()))?;
                if !self.flow().is_paused() {
                    continue;
                }
            }
            let wait = if held.is_empty() {
                wait
            } else {
                Duration::ZERO
            };
            let Some(first) = self.consumer.poll(wait) else {
                continue;
            };
            let took = first.is_ok();
            let first = first.map(|m| kafka::to_record(&mut self.topics, &m));
            self.take(first, &mut held);
            if took {
                // Take what else Kafka has ready (bounded), to hand the sink a batch.
                for _ in 0..1024 {
                    let Some(m) = self.consumer.poll(Duration::ZERO) else {
                        break;
                    };
                    let m = m.map(|m| kafka::to_record(&mut self.topics, &m));
                    self.take(m, &mut held);
                }
            }
            self.offer(&mut held)?;
        }
        // Graceful stop: what was taken is flushed and committed, then DISCONNECT.
        for r in held.drain(..) {
            let _ = self.sink.send(r);
        }
        self.checkpoint(&mut held);
        self.consumer.unsubscribe();
        let stats = self.flow().stats.clone();
        self.sink
            .close()
            .map_err(|e| BridgeError::Sink(e.to_string()))?;
        Ok(stats)
    }
}
