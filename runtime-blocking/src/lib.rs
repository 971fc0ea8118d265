//! mqtt-sink driver for plain std threads: no async runtime.
//!
//! [`MqttSink`] publishes records to an MQTT broker over TCP or TLS (rustls, ring), or over
//! WebSocket (tungstenite) on either. It is a thin driver of [`mqtt_sink_core::Sink`]: one
//! thread owns the core and the TLS and WebSocket state and moves bytes, records and time
//! in and out; a thread per connection only connects and reads the socket. Every MQTT
//! decision (packets, timeouts, resends) stays in the core.
//!
//! [`Bridge`] consumes Kafka (a `BaseConsumer` in a consumer group) into an `MqttSink`,
//! executing the actions of [`mqtt_sink_core::BridgeFlow`]; every decision is the core's.

pub mod bridge;
mod sink;

pub use bridge::{Bridge, BridgeBuilder};
pub use mqtt_sink_core as core;
pub use mqtt_sink_core::{BridgeError, BridgeStats, Config, KafkaConfig, SinkError, TrySendError};
pub use sink::{MqttSink, SinkClient};

/// The std-thread runtime, for the builders of `mqtt_sink_core`: a sink runs on a thread
/// of its own; a bridge consumes on the thread that calls [`Bridge::run`].
#[derive(Debug, Clone, Copy)]
pub struct Blocking;

/// Builds an [`MqttSink`]: config, record mapper and the seed's callbacks.
pub type MqttSinkBuilder = mqtt_sink_core::SinkBuilder<Blocking>;
