//! The core end to end on the simulated broker, with faults: Kafka records in, MQTT
//! publishes out, acknowledgements in, commit positions out. No network, no broker to
//! install; a few seconds of simulated time run in milliseconds.
//!
//!     cargo run -p mqtt-sink-testkit --example simulated [records] [qos] [version]
#![allow(clippy::print_stdout)]

use std::time::Duration;

use mqtt_sink_core::{Event, MqttVersion, TopicPartition};
use mqtt_sink_testkit::broker::BrokerKnobs;
use mqtt_sink_testkit::checker::{check, Expected};
use mqtt_sink_testkit::sim::{record, test_config, Harness, LinkKnobs};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let qos: u8 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let version = args
        .get(3)
        .and_then(|a| MqttVersion::parse(a))
        .unwrap_or(MqttVersion::V5);
    let partitions = 4;

    let mut cfg = test_config(version, qos);
    cfg.max_inflight = 100;
    let knobs = BrokerKnobs {
        ack_delay: Duration::from_millis(2),
        reorder_acks: true,
        ..BrokerKnobs::default()
    };
    let link = LinkKnobs {
        max_chunk: 64,
        ..LinkKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, link, 7);
    println!("mqtt-sink core on a simulated broker: {n} records, QoS {qos}, MQTT {version}");

    let mut expected = Vec::new();
    let mut flushes = 0;
    let mut cuts = 0;
    for i in 0..n {
        let p = (i % partitions) as i32;
        let key = format!("device-{}", i % 100);
        let r = record(
            "readings",
            p,
            i / partitions,
            &key,
            &format!("{{\"seq\":{i}}}"),
        );
        expected.push(Expected {
            topic: format!("sensors/{key}"),
            payload: r.value.clone().unwrap_or_default(),
        });
        if let Err(e) = h.push(r) {
            println!("push failed: {e}");
            std::process::exit(1);
        }
        if i > 0 && i % (n / 4).max(1) == 0 {
            h.cut(); // a network failure mid-run
            cuts += 1;
        }
        if i % 1000 == 999 {
            flushes += 1;
            let outcome = h.flush();
            println!(
                "  t={:>8.3}s pushed {:>7} acknowledged {:>7} | {outcome}",
                h.elapsed().as_secs_f64(),
                i + 1,
                h.sink.stats().acknowledged
            );
        }
    }
    let outcome = h.flush();
    println!("  final flush: {outcome}");
    let delivered: Vec<_> = h
        .broker
        .delivered()
        .iter()
        .map(|d| (d.topic.clone(), d.payload.clone()))
        .collect();
    let st = h.sink.stats();
    match check(&expected, &delivered, true) {
        Ok(report) => println!(
            "ok: {} of {n} records delivered at least once ({} duplicates after {} cuts), \
             {flushes} flushes, {} connects, {} resent; committed {:?}",
            report.arrived,
            report.duplicates,
            cuts,
            st.connects,
            st.resent,
            (0..partitions as i32)
                .map(|p| h.committed_of(&TopicPartition::new("readings", p)))
                .collect::<Vec<_>>()
        ),
        Err(e) => {
            println!("DELIVERY CHECK FAILED: {e}");
            std::process::exit(1);
        }
    }
    if !matches!(outcome, Event::FlushCompleted { .. }) {
        std::process::exit(1);
    }
}
