//! Bridge a Kafka topic to an MQTT broker with the tokio runtime.
//!
//!     cargo run -p mqtt-sink-tokio --example tokio_bridge -- <kafka-brokers> <group> <topic> <mqtt-host> <mqtt-port>
//!
//! Records go to `sensors/{key}` (MQTT 5, QoS 1, no TLS: a local Mosquitto). Ctrl-C stops
//! it gracefully: flush, commit, DISCONNECT.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use mqtt_sink_tokio::{Bridge, Config, KafkaConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 5 {
        eprintln!("usage: tokio_bridge <kafka-brokers> <group> <topic> <mqtt-host> <mqtt-port>");
        std::process::exit(2);
    }
    let port: u16 = a[4].parse().unwrap_or_else(|_| {
        eprintln!("mqtt-port {:?} is not a port number", a[4]);
        std::process::exit(2)
    });
    let kafka = KafkaConfig::new(&a[0], &a[1], vec![a[2].clone()]);
    let mut mqtt = Config::new("mqtt-sink-example", &a[3], port, "sensors");
    mqtt.tls_enabled = false;
    mqtt.version = mqtt_sink_tokio::core::MqttVersion::V5;
    let bridge = Bridge::builder(kafka, mqtt)
        .sink(|s| {
            s.on_client_connect_success(|c| println!("connected: {c:?}"))
                .on_client_connect_failure(|e| eprintln!("connect failed: {e}"))
        })
        .start()
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match bridge.run(stop).await {
        Ok(stats) => println!("stopped: {stats:?}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
