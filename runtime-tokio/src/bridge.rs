//! The Kafka bridge on tokio: a `StreamConsumer` in a consumer group feeding an
//! [`MqttSink`]. It reports facts to `mqtt_sink_core::BridgeFlow` and executes its actions;
//! every decision (what to push, hold, pause, commit, seek) is the flow's.
//!
//! Rebalance callbacks run inside `recv()` and must flush and commit before returning, so
//! they block their worker with `block_in_place`: run the bridge on a multi-thread runtime.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use mqtt_sink_core::{
    ActionReport, BridgeAction, BridgeParts, BridgeRuntime, BridgeStats, Config, KafkaConfig,
};
use mqtt_sink_kafka::{execute, lock, offer, FlowContext, SharedFlow, SinkPort};
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::task::block_in_place;

use crate::{BridgeError, MqttSink, SinkClient, Tokio};

pub use mqtt_sink_kafka::StatsHandle;

/// Builds a [`Bridge`] on the current tokio runtime.
pub type BridgeBuilder = mqtt_sink_core::BridgeBuilder<Tokio>;

/// The sink, for the rebalance callbacks: they run synchronously inside `recv()`, so each
/// call blocks its worker until the sink's task answered.
struct Port(SinkClient);

impl SinkPort for Port {
    fn execute(&self, action: BridgeAction) -> ActionReport {
        let handle = tokio::runtime::Handle::current();
        block_in_place(|| handle.block_on(self.0.execute(action)))
    }
}

impl BridgeRuntime for Tokio {
    type Sink = Tokio;
    type Bridge = Bridge;

    /// Starts the sink (on the current runtime), creates the consumer (and the dead-letter
    /// producer), subscribes.
    fn start(parts: BridgeParts<Tokio>) -> Result<Bridge, BridgeError> {
        let port = |sink: &MqttSink| Port(sink.client());
        let (sink, consumer, flow) = mqtt_sink_kafka::start_bridge(parts, port)?;
        Ok(Bridge {
            sink,
            consumer,
            flow,
        })
    }
}

/// A running bridge. [`run`](Self::run) consumes until its stop future resolves.
pub struct Bridge {
    sink: MqttSink,
    consumer: StreamConsumer<FlowContext<Port>>,
    flow: SharedFlow,
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge").finish_non_exhaustive()
    }
}

impl Bridge {
    /// Starts building a bridge from the Kafka and MQTT configs.
    pub fn builder(kafka: KafkaConfig, mqtt: Config) -> BridgeBuilder {
        BridgeBuilder::new(kafka, mqtt)
    }

    /// A handle to the bridge's MQTT sink (for its stats).
    pub fn sink_client(&self) -> SinkClient {
        self.sink.client()
    }

    /// A handle that reads the bridge's stats while it runs (for metrics).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle::new(self.flow.clone())
    }

    /// Executes the flow's actions until it has none (the lock is never held across one).
    async fn drain(&self) {
        loop {
            let Some(action) = lock(&self.flow).poll_action(Instant::now()) else {
                return;
            };
            let report = match &action {
                // Synchronous calls into librdkafka: off the worker while they wait.
                BridgeAction::Commit(_) | BridgeAction::Seek { .. } => {
                    block_in_place(|| execute(&self.consumer, &action))
                }
                _ => execute(&self.consumer, &action),
            };
            let report = match report {
                Some(r) => r,
                None => self.sink.execute(action).await,
            };
            lock(&self.flow).handle_report(Instant::now(), report);
        }
    }

    /// Consumes, publishes and checkpoints until `stop` resolves; then stops gracefully:
    /// flush, commit, DISCONNECT (bounded by the flush timeout).
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<BridgeStats, BridgeError> {
        tokio::pin!(stop);
        let mut topics = BTreeMap::new();
        loop {
            self.drain().await;
            let (fatal, may_poll, waits, deadline) = {
                let f = lock(&self.flow);
                let fatal = f.fatal_error().map(str::to_string);
                let may_poll = f.may_poll_consumer(Instant::now());
                (fatal, may_poll, f.waits_for_room(), f.poll_timeout())
            };
            if let Some(e) = fatal {
                return Err(BridgeError::sink_stopped(self.sink.close().await, e));
            }
            // While paused, `recv()` delivers nothing but still serves the group's callbacks.
            tokio::select! {
                _ = &mut stop => break,
                m = self.consumer.recv(), if may_poll => {
                    offer(&mut lock(&self.flow), &mut topics, Instant::now(), m);
                    // Take what else Kafka has ready, as much as the flow holds.
                    let room = lock(&self.flow).room();
                    for _ in 0..room {
                        let recv = tokio::time::timeout(Duration::ZERO, self.consumer.recv());
                        let Ok(m) = recv.await else { break };
                        offer(&mut lock(&self.flow), &mut topics, Instant::now(), m);
                    }
                }
                _ = self.sink.room(), if waits => lock(&self.flow).handle_room(),
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        lock(&self.flow).stop(Instant::now());
        self.drain().await;
        self.consumer.unsubscribe();
        let stats = lock(&self.flow).stats().clone();
        let closed = self.sink.close().await;
        closed.map_err(|e| BridgeError::Sink(e.to_string()))?;
        Ok(stats)
    }
}
