//! A QoS the broker does not honour, on real processes: RabbitMQ's MQTT plugin answers a
//! QoS 2 PUBLISH with PUBACK. The daemon used to take that as a protocol error and
//! reconnect forever (797 connections in 66 s, 350,466 copies of 500 records at the
//! subscriber, nothing committed). Now it says so once, naming the broker, and exits 1
//! having committed nothing unacknowledged; with `qos_downgrade = true` it goes on at
//! QoS 1 and says so once. Both runtimes, one RabbitMQ (skipped, saying so, where
//! RabbitMQ is not installed; `.ci/run` installs it).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_testkit::checker::{check, Expected};
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::rabbitmq::RabbitMq;
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";

fn config(kafka: &MockKafka, group: &str, port: u16, extra: &str) -> String {
    let mqtt = format!("version = \"3.1.1\"\nqos = 2\n{extra}");
    daemon::config(
        &kafka.bootstrap(),
        (group, TOPIC),
        (port, "sensors"),
        &mqtt,
        "",
    )
}

fn produce(kafka: &MockKafka, tag: &str, n: usize) -> Vec<Expected> {
    kafka.create_topic(TOPIC, 1).unwrap();
    let recs: Vec<_> = (0..n)
        .map(|i| (0, format!("dev{}", i % 4), format!("{tag}-{i}")))
        .collect();
    kafka.produce(TOPIC, &recs).unwrap();
    recs.into_iter()
        .map(|(_, k, v)| Expected {
            topic: format!("sensors/{k}"),
            payload: Bytes::from(v),
        })
        .collect()
}

#[test]
fn qos_2_against_a_broker_that_answers_puback_stops_once_or_downgrades_once() {
    let test = "qos_2_against_a_broker_that_answers_puback_stops_once_or_downgrades_once";
    let Some(broker) = RabbitMq::start_or_skip(test) else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    let addr = format!("127.0.0.1:{}", broker.port);
    each_runtime(|runtime| {
        // Without qos_downgrade: stops for good, once, naming the broker; exit 1.
        let kafka = MockKafka::start().unwrap();
        let group = format!("qos-stop-{runtime}");
        produce(&kafka, &group, 500);
        let mut d = Daemon::start(bin, runtime, &config(&kafka, &group, broker.port, ""));
        let status = d.wait(Duration::from_secs(60));
        let log = d.log();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
        let said: Vec<&str> = log.lines().filter(|l| l.contains("QoS 2")).collect();
        assert!(
            said.iter()
                .any(|l| l.contains("ERROR") && l.contains(&addr)),
            "no error naming {addr} and QoS 2:\n{log}"
        );
        let connects = log
            .matches(&format!("connected to {addr} (session"))
            .count();
        assert_eq!(connects, 1, "reconnected after the refusal:\n{log}");
        assert!(!log.contains("protocol error"), "{log}");
        let committed = kafka.committed(&group, TOPIC, 1).unwrap()[0];
        assert!(
            committed.unwrap_or(0) == 0,
            "committed {committed:?} though nothing was acknowledged at QoS 2:\n{log}"
        );

        // With qos_downgrade = true: every record arrives, at QoS 1, said once.
        let kafka = MockKafka::start().unwrap();
        let group = format!("qos-down-{runtime}");
        let expected = produce(&kafka, &group, 500);
        let sub = SyncSubscriber::start_v311(broker.port, "sensors/#");
        let cfg = config(&kafka, &group, broker.port, "qos_downgrade = true");
        let mut d = Daemon::start(bin, runtime, &cfg);
        let want: Vec<Bytes> = expected.iter().map(|e| e.payload.clone()).collect();
        let arrived = sub.wait_for_all(&want, Duration::from_secs(60));
        let committed =
            daemon::wait_committed(&kafka, (&group, TOPIC), 500, &sub, Duration::from_secs(30));
        let status = d.stop();
        let log = d.log();
        assert_eq!(arrived, 500, "{log}");
        assert_eq!(committed, Some(500), "{log}");
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
        let warned = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("QoS 1") && l.contains(&addr))
            .count();
        assert_eq!(warned, 1, "the downgrade must be said once:\n{log}");
        assert_eq!(
            log.matches(&format!("connected to {addr} (session"))
                .count(),
            1,
            "{log}"
        );
        let arrivals: Vec<_> = sub
            .messages()
            .into_iter()
            .filter(|m| m.payload.starts_with(group.as_bytes()))
            .map(|m| (m.topic, m.payload))
            .collect();
        check(&expected, &arrivals, false).unwrap();
    });
}
