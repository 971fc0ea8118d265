//! Sessions as configured (review M3), on real processes: the `mqtt-sink` daemon on each
//! runtime, MockCluster, Mosquitto. With `clean_session = false` (the default) on MQTT
//! 3.1.1, every instance (each has its own client id) used to leave its persistent session
//! on the broker for ever once it had reconnected: Mosquitto keeps it (and whatever it
//! queues for it) until `persistent_client_expiration`, unset by default. Now a stopped
//! daemon ends its session (one more connection, CleanSession=1).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::proxy::ChaosProxy;
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";
const RUNS: usize = 3;
/// Mosquitto's count of persistent sessions whose client is not connected.
const ORPHANS: &str = "$SYS/broker/clients/disconnected";

fn config(kafka: &MockKafka, group: &str, port: u16) -> String {
    let mqtt = "version = \"3.1.1\"\nqos = 2\nreconnect_backoff_max = \"200ms\"";
    daemon::config(
        &kafka.bootstrap(),
        (group, TOPIC),
        (port, "sensors"),
        mqtt,
        "",
    )
}

/// Three daemons in turn, each cut off from the broker once mid-run (so that it
/// reconnects and resumes its session), each stopped with SIGTERM once its records
/// arrived: afterwards the broker holds no session of theirs. Before: 3.
#[test]
fn stopped_daemons_leave_no_session_on_the_broker() {
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    each_runtime(|runtime| {
        let broker = Mosquitto::start(MosquittoOptions {
            extra: vec!["sys_interval 1".into()],
            ..MosquittoOptions::default()
        })
        .unwrap();
        let proxy = ChaosProxy::start(broker.port, 7).unwrap();
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic(TOPIC, 1).unwrap();
        let group = format!("sessions-{runtime}");
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let mut logs = String::new();
        for run in 0..RUNS {
            let recs: Vec<_> = (0..200)
                .map(|i| (0, format!("dev{}", i % 4), format!("{run}-{i}")))
                .collect();
            let want: Vec<Bytes> = recs.iter().map(|r| Bytes::from(r.2.clone())).collect();
            kafka.produce(TOPIC, &recs[..100]).unwrap();
            let mut d = Daemon::start(bin, runtime, &config(&kafka, &group, proxy.port));
            assert_eq!(
                sub.wait_for_all(&want[..100], Duration::from_secs(60)),
                100,
                "{}",
                d.log()
            );
            proxy.cut_all();
            kafka.produce(TOPIC, &recs[100..]).unwrap();
            let arrived = sub.wait_for_all(&want, Duration::from_secs(60));
            let end = ((run + 1) * 200) as i64;
            let committed =
                daemon::wait_committed(&kafka, (&group, TOPIC), end, &sub, Duration::from_secs(30));
            let status = d.stop();
            let log = d.log();
            assert_eq!(arrived, 200, "run {run}:\n{log}");
            assert_eq!(committed, Some(end), "run {run}:\n{log}");
            assert_eq!(status.and_then(|s| s.code()), Some(0), "run {run}:\n{log}");
            assert!(
                log.matches("session present: true").count() >= 1,
                "run {run}: never resumed its session:\n{log}"
            );
            logs.push_str(&log);
        }
        // Every process had its own client id: one session each, resumed after the cut.
        let ids = broker.connections(&group);
        assert!(ids >= 2 * RUNS, "{ids} connections:\n{logs}");
        assert_eq!(broker.clean_connections(&group), RUNS, "{logs}");
        // Mosquitto publishes its counters every second (retained): wait for a count of
        // 0, and report the last one if it never comes.
        let sys = SyncSubscriber::start(broker.port, ORPHANS);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        while Instant::now() < deadline {
            sys.wait_for(usize::MAX, Duration::from_millis(200));
            last = sys.messages().last().map(|m| m.payload.clone());
            if last.as_deref() == Some(b"0".as_slice()) {
                break;
            }
        }
        assert_eq!(
            last.as_deref(),
            Some(b"0".as_slice()),
            "persistent sessions left on the broker (last {ORPHANS} {last:?}):\n{logs}"
        );
    });
}
