//! The Kafka bridge on tokio: a `StreamConsumer` in a consumer group feeding an
//! [`MqttSink`]. It executes `mqtt_sink_core::BridgeFlow`'s actions (checkpoint, commit,
//! rewind, pause, resume); every decision is the core's.
//!
//! Rebalance callbacks run inside `recv()` and must flush and commit before returning, so
//! they block their worker with `block_in_place`: run the bridge on a multi-thread runtime.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqtt_sink_blocking::kafka::{self, partitions, tpl};
use mqtt_sink_core::{
    BridgeFlow, BridgeStats, Config, ErrorPolicy, FlowAction, FlushOutcome, KafkaConfig, Record,
    RecordMapper,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset};

use crate::{MqttSink, MqttSinkBuilder, SinkClient, TrySendError};

pub use mqtt_sink_blocking::bridge::StatsHandle;
pub use mqtt_sink_blocking::BridgeError;

type TransformFn = Box<dyn FnMut(Record) -> Option<Record> + Send>;

/// Runs `f` to completion from synchronous code inside the runtime (rebalance callbacks).
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

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
            let flushed = FlushOutcome::from_flush(block_on(self.sink.flush()));
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
                    let _ = block_on(self.sink.committed(offsets.clone()));
                }
                flow.committed(&offsets, result);
            }
            drop(flow);
            let _ = block_on(self.sink.revoke(revoked));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let parts = partitions(list);
            tracing::info!("partitions assigned: {}", kafka::names(&parts));
            let _ = block_on(
                self.sink
                    .assign(parts.iter().map(|tp| (tp.clone(), None)).collect()),
            );
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
    /// of one group never share a client id. Default: the process id and a nonce. An empty
    /// suffix keeps the client id as configured.
    #[must_use]
    pub fn client_id_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.client_id_suffix = Some(suffix.into());
        self
    }

    /// Starts the sink (on the current runtime), creates the consumer, subscribes.
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
            // Runs on the sink's task: the produce confirmation is awaited there.
            builder = builder.dead_letter(move |r, why| {
                tokio::task::block_in_place(|| {
                    kafka::produce_dead_letter(&p, &topic, r, &why.to_string())
                })
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
        let consumer: StreamConsumer<Ctx> = kafka::consumer_config(&self.kafka)
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

/// A running bridge. [`run`](Self::run) consumes until its stop future resolves.
pub struct Bridge {
    kafka: KafkaConfig,
    sink: MqttSink,
    consumer: StreamConsumer<Ctx>,
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
        self.flow.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn execute(&mut self, actions: Vec<FlowAction>, held: &mut VecDeque<Record>) {
        for a in actions {
            match a {
                FlowAction::Pause(p) => drop(self.consumer.pause(&tpl(&p))),
                FlowAction::Resume(p) => drop(self.consumer.resume(&tpl(&p))),
                FlowAction::Commit(offsets) => {
                    let result =
                        tokio::task::block_in_place(|| kafka::commit(&self.consumer, &offsets));
                    if result.is_ok() {
                        let _ = self.sink.committed(offsets.clone()).await;
                    }
                    self.flow().committed(&offsets, result);
                }
                FlowAction::Rewind => {
                    held.clear(); // consumed again from the rewind point
                    if let Ok(seek) = self.sink.rewind().await {
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

    async fn checkpoint(&mut self, held: &mut VecDeque<Record>) {
        self.flow().checkpoint_started(Instant::now());
        let done = FlushOutcome::from_flush(self.sink.flush().await);
        let actions = self.flow().checkpoint_done(Instant::now(), done);
        self.execute(actions, held).await;
    }

    /// Offers the held records, oldest first, until the sink is full.
    /// A consumed record (or a consumer error): through the transform into `held`.
    fn take(&mut self, msg: Result<Record, KafkaError>, held: &mut VecDeque<Record>) {
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

    async fn offer(&mut self, held: &mut VecDeque<Record>) -> Result<(), BridgeError> {
        // One round trip for everything that fits; the record that did not (if any) goes
        // through `try_send` below, which says whether the sink is full or refused it.
        if held.len() > 1 {
            let before = held.len();
            let rest = self
                .sink
                .try_send_batch(std::mem::take(held))
                .await
                .map_err(|e| BridgeError::Sink(e.to_string()))?;
            *held = rest;
            if held.len() < before {
                let a = self.flow().pushed();
                self.execute(a.into_iter().collect(), held).await;
            }
        }
        while let Some(r) = held.pop_front() {
            match self.sink.try_send(r).await {
                Ok(()) => {
                    let a = self.flow().pushed();
                    self.execute(a.into_iter().collect(), held).await;
                }
                Err(TrySendError::Full(r)) => {
                    held.push_front(r);
                    let assigned = self
                        .consumer
                        .assignment()
                        .map(|l| partitions(&l))
                        .unwrap_or_default();
                    let a = self.flow().sink_full(Instant::now(), &assigned);
                    self.execute(a.into_iter().collect(), held).await;
                    return Ok(());
                }
                Err(TrySendError::Refused(e)) => return Err(BridgeError::Sink(e.to_string())),
            }
        }
        Ok(())
    }

    /// Consumes, publishes and checkpoints until `stop` resolves; then stops gracefully:
    /// flush, commit, DISCONNECT (bounded by the flush timeout).
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<BridgeStats, BridgeError> {
        tokio::pin!(stop);
        // Records consumed but not yet taken by the sink, in order: never dropped.
        let mut held: VecDeque<Record> = VecDeque::new();
        let sink = self.sink.client();
        loop {
            let now = Instant::now();
            let (due, may, deadline) = {
                let f = self.flow();
                (f.checkpoint_due(now), f.may_consume(now), f.next_deadline())
            };
            if due {
                self.checkpoint(&mut held).await;
                continue;
            }
            let until = tokio::time::Instant::now() + deadline.saturating_duration_since(now);
            if !may {
                // Backing off after a failed checkpoint: take nothing until then.
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => continue,
                    _ = &mut stop => break,
                }
            }
            self.offer(&mut held).await?;
            if !held.is_empty() {
                // Full: the partitions are paused; wait for room (or the next checkpoint).
                tokio::select! {
                    _ = sink.room() => continue,
                    _ = tokio::time::sleep_until(until) => continue,
                    _ = &mut stop => break,
                }
            }
            let msg = tokio::select! {
                m = self.consumer.recv() => m.map(|m| kafka::to_record(&mut self.topics, &m)),
                _ = tokio::time::sleep_until(until) => continue,
                _ = &mut stop => break,
            };
            let took = msg.is_ok();
            self.take(msg, &mut held);
            if took {
                // Take what else Kafka has ready (bounded), to hand the sink a batch.
                for _ in 0..1024 {
                    let Ok(m) = tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await
                    else {
                        break;
                    };
                    let m = m.map(|m| kafka::to_record(&mut self.topics, &m));
                    self.take(m, &mut held);
                }
                self.offer(&mut held).await?;
            }
        }
        // Graceful stop: what was taken is flushed and committed, then DISCONNECT.
        for r in held.drain(..) {
            let _ = self.sink.send(r).await;
        }
        self.checkpoint(&mut held).await;
        self.consumer.unsubscribe();
        let stats = self.flow().stats.clone();
        self.sink
            .close()
            .await
            .map_err(|e| BridgeError::Sink(e.to_string()))?;
        Ok(stats)
    }
}
