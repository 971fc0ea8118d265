//! Broker failover on real processes (issue 14 point 3): `servers = [A, B]`; Mosquitto A is
//! killed while records flow (the rate limit keeps them flowing for seconds); the daemon
//! moves on to B, says so, and every record arrives at A or B and is committed. Both
//! runtimes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";

#[test]
fn the_daemon_fails_over_to_the_next_server_when_one_is_killed() {
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    let n = 2000usize;
    each_runtime(|runtime| {
        let mut a = Mosquitto::start(MosquittoOptions::default()).unwrap();
        let b = Mosquitto::start(MosquittoOptions::default()).unwrap();
        let root = format!("failover-{runtime}");
        let sub_a = SyncSubscriber::start(a.port, &format!("{root}/#"));
        let sub_b = SyncSubscriber::start(b.port, &format!("{root}/#"));
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic(TOPIC, 1).unwrap();
        let recs: Vec<_> = (0..n)
            .map(|i| (0, format!("dev{}", i % 5), format!("{root}-{i}")))
            .collect();
        kafka.produce(TOPIC, &recs).unwrap();
        // The simple form (server, port) gives way to the list.
        let cfg = daemon::config(
            &kafka.bootstrap(),
            (&root, TOPIC),
            (0, &root),
            &format!(
                "servers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\nmax_publish_rate = 500",
                a.port, b.port
            ),
            "",
        )
        .replace("server = \"127.0.0.1\"\nport = 0\n", "");
        let mut d = Daemon::start(bin, runtime, &cfg);
        // Kill A mid-run: some records reached it, most did not yet.
        assert!(
            sub_a.wait_for(300, Duration::from_secs(30)) >= 300,
            "{}",
            d.log()
        );
        a.kill();
        let at_a: BTreeSet<Bytes> = sub_a.messages().into_iter().map(|m| m.payload).collect();
        assert!(at_a.len() < n, "A had them all before it was killed");
        let missing: Vec<Bytes> = recs
            .iter()
            .map(|r| Bytes::from(r.2.clone()))
            .filter(|p| !at_a.contains(p))
            .collect();
        let at_b = sub_b.wait_for_all(&missing, Duration::from_secs(60));
        assert_eq!(
            at_b,
            missing.len(),
            "records lost in the failover:\n{}",
            d.log()
        );
        let committed = daemon::wait_committed(
            &kafka,
            (&root, TOPIC),
            n as i64,
            &sub_b,
            Duration::from_secs(30),
        );
        assert_eq!(committed, Some(n as i64), "{}", d.log());
        let log = d.log();
        let to_a = format!("connected to 127.0.0.1:{}", a.port);
        let to_b = format!("connected to 127.0.0.1:{}", b.port);
        assert!(log.contains(&to_a) && log.contains(&to_b), "{log}");
        assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log());
    });
}
