//! `max_publish_rate` on real processes (issue 14 point 5): the daemon holds Mosquitto to
//! the rate (a lower bound on how long the records take to arrive: the limit must hold
//! whatever the machine's speed), every record arrives and every offset is committed. Both
//! runtimes. How close to the rate it runs over 30 s is the benchmark's
//! (`mqtt-sink-bench --rate`; BENCHMARKS.md).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";

#[test]
fn the_daemon_holds_the_broker_to_max_publish_rate() {
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    let (n, rate, burst) = (120usize, 40.0, 4usize);
    each_runtime(|runtime| {
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic(TOPIC, 1).unwrap();
        let root = format!("rate-{runtime}");
        let recs: Vec<_> = (0..n)
            .map(|i| (0, format!("dev{}", i % 3), format!("{root}-{i}")))
            .collect();
        kafka.produce(TOPIC, &recs).unwrap();
        let want: Vec<Bytes> = recs.iter().map(|r| Bytes::from(r.2.clone())).collect();
        let sub = SyncSubscriber::start(broker.port, &format!("{root}/#"));
        let mqtt = format!("max_publish_rate = {rate}\nmax_publish_burst = {burst}");
        let cfg = daemon::config(
            &kafka.bootstrap(),
            (&root, TOPIC),
            (broker.port, &root),
            &mqtt,
            "",
        );
        let mut d = Daemon::start(bin, runtime, &cfg);
        // (The whole first burst may be in by the time the wait returns.)
        assert!(sub.wait_for(1, Duration::from_secs(30)) >= 1, "{}", d.log());
        let first = Instant::now();
        let arrived = sub.wait_for_all(&want, Duration::from_secs(60));
        let span = first.elapsed();
        assert_eq!(arrived, n, "{}", d.log());
        // After the first, n - 1 more; at most `burst - 1` of them at once, the rest at the
        // rate: (n - burst) / rate seconds at least. 80 % of it allows for the subscriber
        // seeing the first one late.
        let least = Duration::from_secs_f64((n - burst) as f64 / rate * 0.8);
        assert!(
            span >= least,
            "{runtime}: {n} publishes at {rate}/s (burst {burst}) arrived within {span:?}"
        );
        let committed = daemon::wait_committed(
            &kafka,
            (&root, TOPIC),
            n as i64,
            &sub,
            Duration::from_secs(30),
        );
        assert_eq!(committed, Some(n as i64), "{}", d.log());
        assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log());
    });
}
