//! The builders of a sink and of a bridge, written once for every runtime: a runtime names
//! itself with [`SinkRuntime`] / [`BridgeRuntime`] and receives the finished parts in its
//! `start`. No IO here: only what the user chose.

use std::fmt;
use std::marker::PhantomData;

use crate::bridge::Transform;
use crate::config::{Config, ConfigErrors};
use crate::event::{ConnectFailure, Connected, Event, RejectReason, SinkError};
use crate::kafka_config::KafkaConfig;
use crate::mapper::RecordMapper;
use crate::record::Record;

type SuccessFn = Box<dyn Fn(&Connected) + Send + Sync>;
type FailureFn = Box<dyn Fn(&ConnectFailure) + Send + Sync>;
type EventFn = Box<dyn Fn(&Event) + Send + Sync>;

/// Reports how a dead-letter produce ended, once Kafka's delivery report arrived: `Ok` only
/// for a successful delivery. Call it exactly once, from any thread.
pub type DeadLetterDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Produces a dead letter without blocking: the record, why it was rejected, and the
/// completion to call with the delivery report.
pub type DeadLetterFn = Box<dyn Fn(&Record, &RejectReason, DeadLetterDone) + Send + Sync>;

/// The user's callbacks on a sink's events.
#[derive(Default)]
pub struct Hooks {
    on_success: Option<SuccessFn>,
    on_failure: Option<FailureFn>,
    on_event: Option<EventFn>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

impl Hooks {
    /// Calls the callbacks that want `e` (every event; a CONNACK; a failed connect).
    pub fn event(&self, e: &Event) {
        if let Some(f) = &self.on_event {
            f(e);
        }
        match e {
            Event::Connected(c) => self.on_success.iter().for_each(|f| f(c)),
            Event::ConnectFailed(c) => self.on_failure.iter().for_each(|f| f(c)),
            _ => {}
        }
    }
}

/// A runtime that runs sinks.
pub trait SinkRuntime: Sized {
    /// Its running sink.
    type Sink;
    /// Starts a sink from validated-to-be parts.
    fn start(parts: SinkParts) -> Result<Self::Sink, ConfigErrors>;
}

/// What a runtime needs to start a sink.
#[non_exhaustive]
pub struct SinkParts {
    /// The MQTT options.
    pub config: Config,
    /// The record mapper (the config's unless replaced).
    pub mapper: RecordMapper,
    /// The user's callbacks.
    pub hooks: Hooks,
    /// The dead-letter producer, if any.
    pub dead_letter: Option<DeadLetterFn>,
}

impl fmt::Debug for SinkParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkParts")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds a sink for the runtime `R`: config, record mapper and the seed's callbacks.
pub struct SinkBuilder<R> {
    config: Config,
    mapper: Option<RecordMapper>,
    hooks: Hooks,
    dead_letter: Option<DeadLetterFn>,
    runtime: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for SinkBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<R: SinkRuntime> SinkBuilder<R> {
    /// A builder for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            mapper: None,
            hooks: Hooks::default(),
            dead_letter: None,
            runtime: PhantomData,
        }
    }

    /// The MQTT options (a bridge adjusts the client id before the start).
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Replaces the default record mapper (serializers, retain, properties).
    #[must_use]
    pub fn mapper(mut self, mapper: RecordMapper) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// Called after each successful CONNACK (never before).
    #[must_use]
    pub fn on_client_connect_success(
        mut self,
        f: impl Fn(&Connected) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_success = Some(Box::new(f));
        self
    }

    /// Called when a connection attempt fails: refusal code or transport error.
    #[must_use]
    pub fn on_client_connect_failure(
        mut self,
        f: impl Fn(&ConnectFailure) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_failure = Some(Box::new(f));
        self
    }

    /// Sees every event of the core (for logs and metrics).
    #[must_use]
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.hooks.on_event = Some(Box::new(f));
        self
    }

    /// Produces dead letters (error policy `dead-letter`): called on the sink's task or
    /// thread with each rejected record and a completion. It must not block: hand the
    /// record to a producer and call the completion from its delivery report (`Ok` only
    /// for a successful delivery). Without it, dead-lettering fails the record (as the
    /// `fail` policy does). A Kafka bridge sets it up itself.
    #[must_use]
    pub fn dead_letter(
        mut self,
        f: impl Fn(&Record, &RejectReason, DeadLetterDone) + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Box::new(f));
        self
    }

    /// The parts, with the default mapper where none was set.
    pub fn into_parts(self) -> SinkParts {
        let mapper = self
            .mapper
            .unwrap_or_else(|| RecordMapper::from_config(&self.config));
        SinkParts {
            config: self.config,
            mapper,
            hooks: self.hooks,
            dead_letter: self.dead_letter,
        }
    }

    /// Validates the config, then starts the sink on the runtime. It connects at once and
    /// reconnects with the core's backoff.
    pub fn start(self) -> Result<R::Sink, ConfigErrors> {
        R::start(self.into_parts())
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

impl BridgeError {
    /// The sink stopped under the bridge, which saw `seen`; `closed` is what closing the
    /// sink returned. The sink's own fatal error (why it stopped for good, naming the
    /// broker) says more than what the bridge saw.
    pub fn sink_stopped(closed: Result<(), SinkError>, seen: String) -> Self {
        match closed {
            Err(fatal @ SinkError::Fatal(_)) => Self::Sink(fatal.to_string()),
            _ => Self::Sink(seen),
        }
    }
}

/// A runtime that runs Kafka bridges.
pub trait BridgeRuntime: Sized {
    /// The runtime of its sink.
    type Sink: SinkRuntime;
    /// Its bridge, started.
    type Bridge;
    /// Starts a bridge.
    fn start(parts: BridgeParts<Self>) -> Result<Self::Bridge, BridgeError>;
}

/// What a runtime needs to start a bridge.
#[non_exhaustive]
pub struct BridgeParts<R: BridgeRuntime> {
    /// The Kafka options.
    pub kafka: KafkaConfig,
    /// The sink, customized; its client id takes the suffix given by
    /// [`client_id_suffix`](Self::client_id_suffix).
    pub sink: SinkBuilder<R::Sink>,
    /// The per-record transform.
    pub transform: Option<Transform>,
    suffix: Option<String>,
}

impl<R: BridgeRuntime> fmt::Debug for BridgeParts<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeParts")
            .field("kafka", &self.kafka)
            .finish_non_exhaustive()
    }
}

impl<R: BridgeRuntime> BridgeParts<R> {
    /// Adds the client-id suffix to the sink's client id (`{client_id}-{suffix}`), so that
    /// instances of one group never share a client id (the broker would evict one): the
    /// user's suffix, else `default` (a runtime's process id and nonce). An empty suffix
    /// keeps the client id as configured.
    pub fn apply_client_id_suffix(&mut self, default: impl FnOnce() -> String) {
        let suffix = self.suffix.take().unwrap_or_else(default);
        let cfg = self.sink.config_mut();
        if !suffix.is_empty() && !cfg.client_id.is_empty() {
            cfg.client_id = format!("{}-{suffix}", cfg.client_id);
        }
    }
}

type Customize<R> = Box<
    dyn FnOnce(SinkBuilder<<R as BridgeRuntime>::Sink>) -> SinkBuilder<<R as BridgeRuntime>::Sink>,
>;

/// Builds a Kafka bridge for the runtime `R`.
pub struct BridgeBuilder<R: BridgeRuntime> {
    kafka: KafkaConfig,
    mqtt: Config,
    customize: Option<Customize<R>>,
    mapper: Option<RecordMapper>,
    transform: Option<Transform>,
    client_id_suffix: Option<String>,
}

impl<R: BridgeRuntime> fmt::Debug for BridgeBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeBuilder")
            .field("kafka", &self.kafka)
            .field("mqtt", &self.mqtt)
            .finish_non_exhaustive()
    }
}

impl<R: BridgeRuntime> BridgeBuilder<R> {
    /// A bridge of `kafka` into an MQTT sink with `mqtt`.
    pub fn new(kafka: KafkaConfig, mqtt: Config) -> Self {
        Self {
            kafka,
            mqtt,
            customize: None,
            mapper: None,
            transform: None,
            client_id_suffix: None,
        }
    }

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
    pub fn sink(
        mut self,
        f: impl FnOnce(SinkBuilder<R::Sink>) -> SinkBuilder<R::Sink> + 'static,
    ) -> Self {
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
    pub fn start(self) -> Result<R::Bridge, BridgeError> {
        let mut sink = SinkBuilder::new(self.mqtt);
        if let Some(f) = self.customize {
            sink = f(sink);
        }
        if let Some(m) = self.mapper {
            sink = sink.mapper(m);
        }
        R::start(BridgeParts {
            kafka: self.kafka,
            sink,
            transform: self.transform,
            suffix: self.client_id_suffix,
        })
    }
}
