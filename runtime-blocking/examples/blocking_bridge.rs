//! Bridge a Kafka topic to an MQTT broker with plain threads (no async runtime).
//!
//!     cargo run -p mqtt-sink-blocking --example blocking_bridge -- <kafka-brokers> <group> <topic> <mqtt-host> <mqtt-port> [seconds]
//!
//! Records go to `sensors/{key}` (MQTT 3.1.1, QoS 1, no TLS: a local Mosquitto). It runs
//! for `seconds` (default 60), then stops gracefully: flush, commit, DISCONNECT.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtt_sink_blocking::{Bridge, Config, KafkaConfig};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 5 {
        eprintln!("usage: blocking_bridge <kafka-brokers> <group> <topic> <mqtt-host> <mqtt-port> [seconds]");
        std::process::exit(2);
    }
    let port: u16 = a[4].parse().unwrap_or_else(|_| {
        eprintln!("mqtt-port {:?} is not a port number", a[4]);
        std::process::exit(2)
    });
    let seconds: u64 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(60);
    let kafka = KafkaConfig::new(&a[0], &a[1], vec![a[2].clone()]);
    let mut mqtt = Config::new("mqtt-sink-example", &a[3], port, "sensors");
    mqtt.tls_enabled = false;
    let bridge = Bridge::builder(kafka, mqtt)
        .sink(|s| s.on_client_connect_failure(|e| eprintln!("connect failed: {e}")))
        .start()
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        s.store(true, Ordering::Relaxed);
    });
    match bridge.run(&stop) {
        Ok(stats) => println!("stopped: {stats:?}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
