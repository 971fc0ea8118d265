//! `mqtt-sink check`: after validation, connect to Kafka (topic metadata) and to the MQTT
//! broker (CONNECT/CONNACK and the limits it negotiated) without consuming anything.

use std::sync::mpsc;
use std::time::Duration;

use mqtt_sink_blocking::MqttSink;
use mqtt_sink_core::Event;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::DaemonConfig;

/// One line per finding; `Err` when something does not work.
pub(crate) fn probe(cfg: &DaemonConfig) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    match kafka(cfg) {
        Ok(found) => lines.extend(found),
        Err(e) => {
            ok = false;
            lines.push(format!("Kafka {}: FAILED: {e}", cfg.kafka.brokers));
        }
    }
    // Each broker address on its own (with `servers`, every one of them).
    for (host, port) in cfg.mqtt.addresses() {
        let mut one = cfg.mqtt.clone();
        (one.server, one.port, one.servers) = (host, port, Vec::new());
        let addr = mqtt_sink_core::format_address(&one.server, port);
        match mqtt(&one) {
            Ok(found) => lines.push(format!("MQTT {addr}: {found}")),
            Err(e) => {
                ok = false;
                lines.push(format!("MQTT {addr}: FAILED: {e}"));
            }
        }
    }
    (lines, ok)
}

fn kafka(cfg: &DaemonConfig) -> Result<Vec<String>, String> {
    let consumer: BaseConsumer = mqtt_sink_kafka::consumer_config(&cfg.kafka)
        .create()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for topic in &cfg.kafka.topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("metadata for topic {topic:?}: {e}"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| format!("topic {topic:?} not in the metadata"))?;
        if let Some(e) = t.error() {
            return Err(format!("topic {topic:?}: {e:?}"));
        }
        out.push(format!(
            "Kafka {}: topic {topic} has {} partition(s) (brokers: {})",
            cfg.kafka.brokers,
            t.partitions().len(),
            md.brokers().len()
        ));
    }
    Ok(out)
}

fn mqtt(cfg: &mqtt_sink_core::Config) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let sink = MqttSink::builder(cfg.clone())
        .on_event(move |e| {
            if matches!(e, Event::Connected(_) | Event::ConnectFailed(_)) {
                let _ = tx.lock().map(|t| t.send(e.clone()));
            }
        })
        .start()
        .map_err(|e| e.to_string())?;
    let wait = cfg.connect_timeout + Duration::from_secs(1);
    let result = match rx.recv_timeout(wait) {
        Ok(Event::Connected(c)) => Ok(format!(
            "CONNACK accepted (MQTT {}, TLS {}{}): window {}, max packet {}, topic aliases {}, max QoS {}, retain {}, session present {}",
            cfg.version,
            if cfg.tls_enabled { "on" } else { "off" },
            match cfg.transport {
                mqtt_sink_core::Transport::Ws => format!(", WebSocket {}", cfg.ws_path()),
                _ => String::new(),
            },
            c.window,
            c.broker_max_packet.map_or("unlimited".into(), |n| n.to_string()),
            c.topic_alias_maximum.unwrap_or(0),
            c.maximum_qos.map_or("2".into(), |q| q.to_string()),
            if c.retain_available == Some(false) { "not available" } else { "available" },
            c.session_present,
        )),
        Ok(Event::ConnectFailed(f)) => Err(f.to_string()),
        Ok(_) | Err(_) => Err(format!("no answer within {}s", wait.as_secs())),
    };
    let _ = sink.close();
    result
}
