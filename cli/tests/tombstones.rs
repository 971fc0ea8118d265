//! Kafka tombstones on real processes (issue 14 point 2): with `tombstone =
//! "clear-retained"` a tombstone for key k deletes the retained message of k's topic, so a
//! new subscriber sees the latest value of every key still in the compacted topic and
//! nothing for k; the default (`"publish-null"`) retains `null` for k, as before. Both
//! runtimes, one Mosquitto; every offset, the tombstone's too, is committed.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";

/// Retained messages a new subscriber to `root/#` is given: (topic, payload). A marker
/// record published after it subscribed bounds the wait: the broker sends the retained
/// messages before anything published later.
fn retained_for_a_new_subscriber(kafka: &MockKafka, port: u16, root: &str) -> Vec<(String, Bytes)> {
    let sub = SyncSubscriber::start(port, &format!("{root}/#"));
    assert_eq!(sub.wait_for_subacks(1, Duration::from_secs(10)), 1);
    kafka
        .produce(TOPIC, &[(0, "marker".into(), format!("marker-{root}"))])
        .unwrap();
    let marker = Bytes::from(format!("marker-{root}"));
    assert_eq!(
        sub.wait_for_all(std::slice::from_ref(&marker), Duration::from_secs(30)),
        1,
        "{root}: the marker never arrived"
    );
    sub.messages()
        .into_iter()
        .filter(|m| m.retain && m.payload != marker)
        .map(|m| (m.topic, m.payload))
        .collect()
}

#[test]
fn clear_retained_tombstones_delete_the_keys_retained_message() {
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    each_runtime(|runtime| {
        for (policy, want_k) in [
            ("clear-retained", None),
            ("publish-null", Some(Bytes::from("null"))),
        ] {
            let kafka = MockKafka::start().unwrap();
            kafka.create_topic(TOPIC, 1).unwrap();
            let root = format!("{policy}-{runtime}");
            let group = root.clone();
            kafka
                .produce(
                    TOPIC,
                    &[
                        (0, "k".into(), "{\"t\":1}".into()),
                        (0, "j".into(), "{\"t\":2}".into()),
                    ],
                )
                .unwrap();
            kafka.produce_tombstone(TOPIC, 0, "k").unwrap();
            let mqtt = format!("retain = true\ntombstone = \"{policy}\"");
            let cfg = daemon::config(
                &kafka.bootstrap(),
                (&group, TOPIC),
                (broker.port, &root),
                &mqtt,
                "",
            );
            let mut d = Daemon::start(bin, runtime, &cfg);
            let watcher = SyncSubscriber::start(broker.port, &format!("{root}/#"));
            let committed = daemon::wait_committed(
                &kafka,
                (&group, TOPIC),
                3,
                &watcher,
                Duration::from_secs(30),
            );
            assert_eq!(committed, Some(3), "{policy}: {}", d.log());

            let started = Instant::now();
            let mut retained = retained_for_a_new_subscriber(&kafka, broker.port, &root);
            retained.sort();
            let mut want = vec![(format!("{root}/j"), Bytes::from("{\"t\":2}"))];
            if let Some(k) = &want_k {
                want.push((format!("{root}/k"), k.clone()));
            }
            assert_eq!(
                retained,
                want,
                "{policy}: retained for a new subscriber ({:?} after the commit):\n{}",
                started.elapsed(),
                d.log()
            );
            assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log());
        }
    });
}
