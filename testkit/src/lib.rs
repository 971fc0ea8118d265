//! Test kit for mqtt-sink: a simulated MQTT broker, a simulated clock and link, the harness
//! that drives [`mqtt_sink_core::Sink`] against them, a simulated Kafka and the bridge model
//! that drives [`mqtt_sink_core::BridgeFlow`] against it, and the delivery checker.
//!
//! Everything here is sans-IO and seeded: a test is a pure function of its seed.

pub mod alpn;
pub mod amqtt;
pub mod backend;
pub mod bridge_model;
pub mod bridge_suite;
pub mod broker;
pub mod certs;
pub mod checker;
pub mod daemon;
pub mod faults;
pub mod kafka;
pub mod model;
pub mod mosquitto;
pub mod proxy;
pub mod rabbitmq;
pub mod rng;
pub mod rumqttd;
pub mod sim;
pub mod sim_kafka;
pub mod subscriber;
pub mod suite;
