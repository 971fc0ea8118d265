//! mqtt-sink driver for the tokio runtime.
//!
//! [`MqttSink`] publishes records to an MQTT broker over TCP or TLS (rustls, ring), or over
//! WebSocket (tokio-tungstenite) on either. It is a thin driver of [`mqtt_sink_core::Sink`]:
//! one task moves socket bytes, records and time in and out of the core; every MQTT
//! decision (packets, timeouts, resends) stays in the core.
//!
//! [`Bridge`] consumes Kafka (a `StreamConsumer` in a consumer group) into an `MqttSink`,
//! executing the actions of [`mqtt_sink_core::BridgeFlow`]. It needs a multi-thread runtime
//! (rebalance callbacks flush synchronously).

pub mod bridge;
mod driver;
mod transport;

/// TLS client configuration (shared with the blocking runtime).
pub use mqtt_sink_tls as tls;

use std::collections::VecDeque;

use mqtt_sink_core::{
    ActionReport, BridgeAction, CommitOffsets, ConfigErrors, FlushOutcome, PushRefusal, Record,
    RecordCoords, SinkParts, SinkRuntime,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use bridge::{Bridge, BridgeBuilder};
pub use mqtt_sink_core as core;
pub use mqtt_sink_core::{BridgeError, BridgeStats, Config, KafkaConfig, SinkError, TrySendError};

/// The tokio runtime, for the builders of `mqtt_sink_core`: sinks and bridges start on the
/// current tokio runtime.
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

/// Builds an [`MqttSink`]: config, record mapper and the seed's callbacks.
pub type MqttSinkBuilder = mqtt_sink_core::SinkBuilder<Tokio>;

impl SinkRuntime for Tokio {
    type Sink = MqttSink;

    /// Starts the sink's task on the current tokio runtime.
    fn start(parts: SinkParts) -> Result<MqttSink, ConfigErrors> {
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = driver::Driver::new(parts, tx.downgrade(), rx)?;
        Ok(MqttSink {
            client: SinkClient { tx },
            task: tokio::spawn(driver.run()),
        })
    }
}

type Reply<T> = oneshot::Sender<T>;

/// What a [`SinkClient`] asks of the sink's task.
enum Cmd {
    TrySend(Record, Reply<Result<(), TrySendError>>),
    TrySendBatch(
        VecDeque<Record>,
        Reply<(VecDeque<Record>, Option<PushRefusal>)>,
    ),
    Room(Reply<()>),
    /// A sink action of the flow: assign, revoke, rewind, committed, positions.
    Act(BridgeAction, Reply<ActionReport>),
    Stats(Reply<mqtt_sink_core::Stats>),
    Flush(Reply<Result<CommitOffsets, SinkError>>),
    Close,
    /// A dead letter's delivery report (sent from the producer's thread).
    DeadLettered(RecordCoords, Result<(), String>),
}

/// A cloneable handle to a running sink. Its commands queue without bound, but each
/// caller waits for the answer.
#[derive(Debug, Clone)]
pub struct SinkClient {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl SinkClient {
    /// Queues a command; the task applies commands in order.
    fn tell(&self, cmd: Cmd) -> Result<(), SinkError> {
        self.tx.send(cmd).map_err(|_| SinkError::Closed)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, SinkError> {
        let (tx, rx) = oneshot::channel();
        self.tell(make(tx))?;
        rx.await.map_err(|_| SinkError::Closed)
    }

    /// Hands a record to the sink. Waits while the sink's buffer is full: this is the
    /// backpressure. Records sent while the broker is unreachable are queued (bounded) and
    /// published after it returns.
    pub async fn send(&self, mut record: Record) -> Result<(), SinkError> {
        loop {
            match self.try_send(record).await {
                Err(TrySendError::Full(r)) => record = r,
                Err(TrySendError::Refused(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
            self.room().await?;
        }
    }

    /// Like [`send`](Self::send) but returns the record at once when the buffer is full.
    pub async fn try_send(&self, record: Record) -> Result<(), TrySendError> {
        match self.call(|tx| Cmd::TrySend(record, tx)).await {
            Ok(r) => r,
            Err(e) => Err(TrySendError::Refused(e)),
        }
    }

    /// Takes records in order until one is refused (the buffer is full, say), in one round
    /// trip; returns those not taken (the first of them is the refused one) and why.
    pub async fn try_send_batch(
        &self,
        records: VecDeque<Record>,
    ) -> Result<(VecDeque<Record>, Option<PushRefusal>), SinkError> {
        self.call(|tx| Cmd::TrySendBatch(records, tx)).await
    }

    /// Resolves when the buffer has room (cancellation-safe).
    pub async fn room(&self) -> Result<(), SinkError> {
        self.call(Cmd::Room).await
    }

    /// Waits until every record sent before this call is acknowledged (or handled by the
    /// error policy), at most `flush_timeout`; returns the positions to commit.
    pub async fn flush(&self) -> Result<CommitOffsets, SinkError> {
        self.call(Cmd::Flush).await?
    }

    /// Executes a sink action of a [`BridgeFlow`](mqtt_sink_core::BridgeFlow) and returns
    /// its report (the consumer's actions are the caller's: `mqtt_sink_kafka::execute`).
    /// Commands apply in order: an assign or revoke is in force for every later call.
    pub async fn execute(&self, action: BridgeAction) -> ActionReport {
        match action {
            BridgeAction::Push(records) => match self.try_send_batch(records).await {
                Ok((rest, why)) => ActionReport::Pushed(rest, why),
                Err(_) => ActionReport::Pushed(VecDeque::new(), Some(PushRefusal::Closed)),
            },
            BridgeAction::Flush => {
                ActionReport::Flushed(FlushOutcome::from_flush(self.flush().await))
            }
            // A closed sink shows in the next push (fatal) or flush (failed).
            other => self
                .call(|tx| Cmd::Act(other, tx))
                .await
                .unwrap_or(ActionReport::Done),
        }
    }

    /// The core's counters and gauges. Callable from any thread outside the runtime
    /// (it blocks), e.g. a metrics endpoint.
    pub fn stats_blocking(&self) -> Result<mqtt_sink_core::Stats, SinkError> {
        let (tx, rx) = oneshot::channel();
        self.tell(Cmd::Stats(tx))?;
        rx.blocking_recv().map_err(|_| SinkError::Closed)
    }
}

/// A running sink: send records, flush, close.
#[derive(Debug)]
pub struct MqttSink {
    client: SinkClient,
    task: JoinHandle<Result<(), SinkError>>,
}

impl std::ops::Deref for MqttSink {
    type Target = SinkClient;
    fn deref(&self) -> &SinkClient {
        &self.client
    }
}

impl MqttSink {
    /// Starts building a sink from `config`.
    pub fn builder(config: Config) -> MqttSinkBuilder {
        MqttSinkBuilder::new(config)
    }

    /// A cloneable handle (for a rebalance callback, say).
    pub fn client(&self) -> SinkClient {
        self.client.clone()
    }

    /// Sends DISCONNECT and stops the task. Flush first: unacknowledged records are dropped.
    pub async fn close(self) -> Result<(), SinkError> {
        let _ = self.client.tell(Cmd::Close);
        self.task.await.map_err(|_| SinkError::Closed)?
    }
}
