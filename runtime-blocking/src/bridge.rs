//! The Kafka bridge on a thread: a `BaseConsumer` in a consumer group feeding an
//! [`MqttSink`]. The loop reports facts to `mqtt_sink_core::BridgeFlow` and executes its
//! actions (push, checkpoint, commit, rewind, seek, pause, resume); every decision is the
//! core's. It only waits: on the consumer, on the sink's room, or for the flow's timeout.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_sink_core::{
    ActionReport, BridgeAction, BridgeError, BridgeParts, BridgeRuntime, BridgeStats, Config,
    KafkaConfig, SinkError,
};
use mqtt_sink_kafka::{drain, lock, offer, FlowContext, SharedFlow, SinkPort};
use rdkafka::consumer::{BaseConsumer, Consumer};

pub use mqtt_sink_kafka::StatsHandle;

use crate::{Blocking, MqttSink, SinkClient};

/// Builds a [`Bridge`].
pub type BridgeBuilder = mqtt_sink_core::BridgeBuilder<Blocking>;

/// The longest the loop waits in one go, so that it sees the stop flag a few times a second.
const MAX_WAIT: Duration = Duration::from_millis(100);

impl BridgeRuntime for Blocking {
    type Sink = Blocking;
    type Bridge = Bridge;

    /// Starts the sink (with the dead-letter producer its error policy asks for), creates
    /// the consumer and subscribes.
    fn start(parts: BridgeParts<Self>) -> Result<Bridge, BridgeError> {
        let (sink, consumer, flow) = mqtt_sink_kafka::start_bridge(parts, MqttSink::client)?;
        Ok(Bridge {
            consumer,
            sink,
            flow,
            topics: BTreeMap::new(),
        })
    }
}

/// Executes the flow's sink actions on the sink's thread, from the bridge's loop and from
/// the rebalance callbacks (which run inside the consumer's poll).
impl SinkPort for SinkClient {
    fn execute(&self, action: BridgeAction) -> ActionReport {
        SinkClient::execute(self, action)
    }
}

/// A running bridge. [`run`](Self::run) consumes until told to stop.
pub struct Bridge {
    consumer: BaseConsumer<FlowContext<SinkClient>>,
    sink: MqttSink,
    flow: SharedFlow,
    topics: BTreeMap<String, Arc<str>>,
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("flow", &self.flow)
            .finish_non_exhaustive()
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

    /// Consumes, publishes and checkpoints until `stop` is set; then stops gracefully:
    /// flush, commit, DISCONNECT (bounded by the flush timeout).
    pub fn run(mut self, stop: &AtomicBool) -> Result<BridgeStats, BridgeError> {
        loop {
            drain(&self.flow, &self.consumer, &*self.sink);
            let now = Instant::now();
            let f = lock(&self.flow);
            if let Some(e) = f.fatal_error() {
                let e = e.to_string();
                drop(f);
                return Err(self.stopped(e));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let (may_poll, waits, room) = (f.may_poll_consumer(now), f.waits_for_room(), f.room());
            let wait = f
                .poll_timeout()
                .saturating_duration_since(now)
                .min(MAX_WAIT);
            drop(f);
            // Records wait for the sink: wait for its room first; the consumer (if it may
            // be polled: to hold more, or paused, to serve the group's callbacks) then
            // takes only what is ready. With neither, wait out the flow's timeout (a
            // backoff after a failed checkpoint: the consumer must not deliver meanwhile).
            let room_now = match waits.then(|| self.sink.wait_room(wait)) {
                Some(Err(e)) => return Err(self.stopped(e.to_string())),
                r => r.is_some_and(|r| r.is_ok_and(|r| r)),
            };
            if room_now {
                lock(&self.flow).handle_room();
            }
            if may_poll {
                self.poll(if waits { Duration::ZERO } else { wait }, room);
            } else if !waits {
                std::thread::sleep(wait);
            }
        }
        lock(&self.flow).stop(Instant::now());
        drain(&self.flow, &self.consumer, &*self.sink);
        self.consumer.unsubscribe();
        let stats = lock(&self.flow).stats().clone();
        self.sink.close().map_err(sink_error)?;
        Ok(stats)
    }

    /// The sink stopped under the flow, which saw `e`.
    fn stopped(self, e: String) -> BridgeError {
        BridgeError::sink_stopped(self.sink.close(), e)
    }

    /// Polls the consumer, waiting up to `wait` for the first message, then takes what
    /// else is ready, up to `room` in all. Each goes to the flow as it comes, so that a
    /// rebalance callback inside the next poll finds the flow up to date.
    fn poll(&mut self, mut wait: Duration, room: usize) {
        for _ in 0..room.max(1) {
            let Some(m) = self.consumer.poll(wait) else {
                return;
            };
            offer(&mut lock(&self.flow), &mut self.topics, Instant::now(), m);
            wait = Duration::ZERO;
        }
    }
}

fn sink_error(e: SinkError) -> BridgeError {
    BridgeError::Sink(e.to_string())
}
