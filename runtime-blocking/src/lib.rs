//! mqtt-sink driver for plain std threads (no async runtime).
//!
//! **Placeholder.** This crate compiles so that the workspace has its final shape; the
//! driver itself (TCP + rustls TLS, the `MqttSink` and the rdkafka `Bridge`) is built by the
//! runtimes issue. It will only move bytes, records and time between std threads and
//! [`mqtt_sink_core::Sink`]: every decision stays in the core.

pub use mqtt_sink_core as core;
