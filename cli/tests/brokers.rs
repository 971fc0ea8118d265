//! Other brokers than Mosquitto, on real processes (issue 12, point 9): the `mqtt-sink`
//! daemon on each runtime delivers 500 records from MockCluster to each broker, in each
//! MQTT version and QoS the broker supports; every record arrives once, in order per topic,
//! the end offset is committed and the daemon exits 0 on SIGTERM.
//!
//! - rumqttd 0.20 (in-process): MQTT 3.1.1 and 5, QoS 0/1/2.
//! - amqtt 0.12.1 (PyPI, in a venv `.ci/run` makes): MQTT 3.1.1, QoS 0/1/2.
//! - RabbitMQ 3.10 MQTT plugin (Debian): MQTT 3.1.1, QoS 0/1 (QoS 2 it answers with PUBACK:
//!   `tests/qos.rs`).
//!
//! A broker that is not installed here says SKIPPED and why.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_testkit::amqtt::Amqtt;
use mqtt_sink_testkit::checker::{check, Expected};
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::rabbitmq::RabbitMq;
use mqtt_sink_testkit::rumqttd::Rumqttd;
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";
const N: usize = 500;

/// One delivery case: `N` records through the daemon on `runtime` to the broker at `port`.
fn deliver(runtime: &str, broker: &str, port: u16, version: &str, qos: u8) {
    let case = format!("{broker} MQTT {version} QoS {qos} ({runtime})");
    let tag = format!("{broker}-{}-{qos}-{runtime}", version.replace('.', ""));
    let group = format!("brokers-{tag}");
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic(TOPIC, 1).unwrap();
    let recs: Vec<_> = (0..N)
        .map(|i| (0, format!("dev{}", i % 4), format!("{tag}-{i}")))
        .collect();
    kafka.produce(TOPIC, &recs).unwrap();
    let expected: Vec<Expected> = recs
        .iter()
        .map(|(_, k, v)| Expected {
            topic: format!("sensors/{tag}/{k}"),
            payload: Bytes::from(v.clone()),
        })
        .collect();
    let want: Vec<Bytes> = expected.iter().map(|e| e.payload.clone()).collect();
    let filter = format!("sensors/{tag}/#");
    let sub = if version == "5" {
        SyncSubscriber::start(port, &filter)
    } else {
        SyncSubscriber::start_v311(port, &filter)
    };
    let mqtt = format!("version = \"{version}\"\nqos = {qos}");
    let root = format!("sensors/{tag}");
    let config = daemon::config(
        &kafka.bootstrap(),
        (&group, TOPIC),
        (port, &root),
        &mqtt,
        "",
    );
    let mut d = Daemon::start(env!("CARGO_BIN_EXE_mqtt-sink"), runtime, &config);
    let arrived = sub.wait_for_all(&want, Duration::from_secs(60));
    let committed = daemon::wait_committed(
        &kafka,
        (&group, TOPIC),
        N as i64,
        &sub,
        Duration::from_secs(30),
    );
    let status = d.stop();
    let log = d.log();
    assert_eq!(arrived, N, "{case}: arrived\n{log}");
    assert_eq!(committed, Some(N as i64), "{case}: committed\n{log}");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{case}: exit\n{log}"
    );
    let arrivals: Vec<(String, Bytes)> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    if let Err(e) = check(&expected, &arrivals, false) {
        panic!("{case}: {e}\n{log}");
    }
    for bad in ["connection lost", "protocol error", "rejected"] {
        assert!(!log.contains(bad), "{case}: the log has {bad:?}:\n{log}");
    }
}

#[test]
fn rumqttd_mqtt_311_and_5_at_qos_0_1_2() {
    let broker = Rumqttd::start().unwrap();
    each_runtime(|runtime| {
        for qos in 0..=2 {
            deliver(runtime, "rumqttd", broker.port_v311, "3.1.1", qos);
            deliver(runtime, "rumqttd", broker.port_v5, "5", qos);
        }
    });
}

#[test]
fn amqtt_mqtt_311_at_qos_0_1_2() {
    let Some(broker) = Amqtt::start_or_skip("amqtt_mqtt_311_at_qos_0_1_2") else {
        return;
    };
    each_runtime(|runtime| {
        for qos in 0..=2 {
            deliver(runtime, "amqtt", broker.port, "3.1.1", qos);
        }
    });
}

#[test]
fn rabbitmq_mqtt_311_at_qos_0_1() {
    let Some(broker) = RabbitMq::start_or_skip("rabbitmq_mqtt_311_at_qos_0_1") else {
        return;
    };
    each_runtime(|runtime| {
        for qos in 0..=1 {
            deliver(runtime, "rabbitmq", broker.port, "3.1.1", qos);
        }
    });
}
