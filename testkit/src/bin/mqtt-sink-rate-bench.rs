//! How closely the daemon holds `max_publish_rate` (issue 14 point 5): for each runtime, a
//! preloaded MockCluster topic, one Mosquitto, the release `mqtt-sink` daemon at the rate,
//! and a subscriber that counts arrivals over `--seconds` after the first second (the
//! initial burst). Prints the rate held and its deviation from the configured one; the
//! target is within 2 % over 30 s. Not a test.
//!
//!     cargo build --release -p mqtt-sink-cli -p mqtt-sink-testkit
//!     target/release/mqtt-sink-rate-bench [--rate 500] [--burst N] [--seconds 30] [--qos 1]
//!         [--only tokio|blocking]
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mqtt_sink_testkit::daemon::{self, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let rate: f64 = opt("--rate").and_then(|v| v.parse().ok()).unwrap_or(500.0);
    let burst: Option<u32> = opt("--burst").and_then(|v| v.parse().ok());
    let seconds: u64 = opt("--seconds").and_then(|v| v.parse().ok()).unwrap_or(30);
    let qos: u8 = opt("--qos").and_then(|v| v.parse().ok()).unwrap_or(1);
    let only = opt("--only");
    let bin = std::env::current_exe()
        .expect("current exe")
        .parent()
        .expect("dir")
        .join("mqtt-sink");
    assert!(
        bin.exists(),
        "{} not built: cargo build --release -p mqtt-sink-cli",
        bin.display()
    );
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("mosquitto");
    // Enough records for the whole run and then some: the sink never runs dry.
    let n = (rate * (seconds + 5) as f64 * 1.2) as usize + 1000;
    println!(
        "max_publish_rate = {rate}, burst {}, QoS {qos}, {seconds} s measured after the first second, {n} records preloaded",
        burst.map_or("default".into(), |b| b.to_string())
    );
    for runtime in ["tokio", "blocking"] {
        if only.as_deref().is_some_and(|o| o != runtime) {
            continue;
        }
        let kafka = MockKafka::start().expect("kafka");
        kafka.create_topic("readings", 4).expect("topic");
        let recs: Vec<_> = (0..n)
            .map(|i| ((i % 4) as i32, format!("dev{}", i % 100), format!("r{i}")))
            .collect();
        kafka.produce("readings", &recs).expect("produce");
        let root = format!("rate-{runtime}");
        let sub = SyncSubscriber::start(broker.port, &format!("{root}/#"));
        let mut mqtt = format!("qos = {qos}\nmax_publish_rate = {rate}\nmax_inflight = 1000");
        if let Some(b) = burst {
            mqtt.push_str(&format!("\nmax_publish_burst = {b}"));
        }
        let cfg = daemon::config(
            &kafka.bootstrap(),
            (&root, "readings"),
            (broker.port, &root),
            &mqtt,
            "",
        );
        let mut d = Daemon::start(bin.to_str().expect("path"), runtime, &cfg);
        if sub.wait_for(1, Duration::from_secs(60)) == 0 {
            println!("{runtime}: nothing arrived in 60 s:\n{}", d.log());
            continue;
        }
        // Pass the initial burst, then count over the window (the waits time it: nothing
        // more is awaited than the clock).
        sub.wait_for(usize::MAX, Duration::from_secs(1));
        let (c1, t1) = (sub.messages().len(), Instant::now());
        sub.wait_for(usize::MAX, Duration::from_secs(seconds));
        let (c2, t2) = (sub.messages().len(), Instant::now());
        let span = t2.duration_since(t1).as_secs_f64();
        let held = (c2 - c1) as f64 / span;
        let dev = (held / rate - 1.0) * 100.0;
        println!(
            "{runtime:>8}: {} publishes in {span:.2} s = {held:.2}/s, {dev:+.2} % of {rate}/s: {}",
            c2 - c1,
            if dev.abs() <= 2.0 {
                "within 2 %"
            } else {
                "OUTSIDE 2 %"
            }
        );
        let _ = d.stop();
    }
}
