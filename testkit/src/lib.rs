//! Test kit for mqtt-sink: a simulated MQTT broker, a simulated clock and link, the harness
//! that drives [`mqtt_sink_core::Sink`] against them, and proptest models.
//!
//! Everything here is sans-IO and seeded: a test is a pure function of its seed.

pub mod broker;
