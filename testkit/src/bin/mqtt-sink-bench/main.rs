//! End-to-end benchmark: mqtt-sink (both runtimes) against the broker's ceiling and a
//! hand-written rumqttc publisher, on one Mosquitto and one preloaded Kafka topic.
//!
//!     cargo build --release -p mqtt-sink-cli -p mqtt-sink-testkit
//!     target/release/mqtt-sink-bench [--records 200000] [--runs 3] [--qos 0,1,2] [--kafka mock|tansu]
//!         [--partitions 16] [--only tokio|blocking|rumqttc] [--subscriber yes|no|both]
//!         [--broker-nodelay]
//!         [--latency [--latency-rates 10000,20000] [--latency-seconds 10]
//!         [--latency-fetch-wait 5] [--latency-partitions 1]]
//!         [--latency-bound [--connections 1,2,4,8]]
//!
//! Every contender runs as its own process, so that its CPU time (user + sys, from
//! `/proc/<pid>/stat`) and peak RSS (`VmHWM`) are its own. Throughput is end to end: from the
//! first record consumed (the sink's metrics) or the first publish, to the last record
//! received by the subscriber, or, without one, to the last acknowledgement. The raw ceiling
//! writes pre-encoded PUBLISH packets in large writes and counts acknowledgements: the best
//! any sink can do on this broker. Each cell is the median of `--runs` runs. Not a test.
//!
//! `--latency` adds end-to-end latency (send to arrival, p50 / p99 / max) at a steady offered
//! load, QoS 1: at 10k msg/s and at half of the contender's QoS 1 rate with a subscriber
//! measured in the same run (or at `--latency-rates`), see `latency.rs`.
//!
//! `--latency-bound` runs only the sink against a distant broker that limits each
//! connection's window (20 ms each way, window 20), with 1, 2, 4 and 8 connections, and
//! checks per-topic order, see `latency_bound.rs`.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod latency;
mod latency_bound;

use mqtt_sink_testkit::backend::KafkaCluster;
use mqtt_sink_testkit::mosquitto::{free_port, Mosquitto, MosquittoOptions};

const KEYS: usize = 100;
const PAYLOAD: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child")
        && args.get(2).map(String::as_str) == Some("rumqttc-paced")
    {
        latency::rumqttc_child(&args[3..]);
        return;
    }
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2..]);
        return;
    }
    if args.get(1).map(String::as_str) == Some("consume") {
        consume(&args[2..]);
        return;
    }
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let n: usize = opt("--records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let runs: usize = opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(3);
    let qoses: Vec<u8> = opt("--qos")
        .unwrap_or_else(|| "0,1,2".into())
        .split(',')
        .filter_map(|q| q.trim().parse().ok())
        .collect();
    // MockCluster keeps at most 5 MiB per partition: 16 hold 200k records of 200 B; a
    // 1,000,000-record run needs 64.
    let partitions: i32 = opt("--partitions")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let kafka_kind = opt("--kafka").unwrap_or_else(|| "mock".into());
    let only: Option<String> = opt("--only");
    // `--subscriber yes|no`: only the runs with (without) a subscriber; default both.
    let subscribers: Vec<bool> = match opt("--subscriber").as_deref() {
        None | Some("both") => vec![true, false],
        Some("yes") => vec![true],
        Some("no") => vec![false],
        Some(other) => panic!("--subscriber {other}: yes, no or both"),
    };
    let sink_bin = sibling("mqtt-sink");
    assert!(
        sink_bin.is_file(),
        "{} not found: cargo build --release -p mqtt-sink-cli",
        sink_bin.display()
    );

    let kafka = match kafka_kind.as_str() {
        "tansu" => KafkaCluster::tansu(),
        _ => KafkaCluster::mock(),
    }
    .unwrap_or_else(|e| panic!("kafka: {e:?}"));
    let topic = "bench";
    kafka.create_topic(topic, partitions).expect("topic");
    let records: Vec<(i32, String, String)> = (0..n)
        .map(|i| {
            let key = i % KEYS;
            let mut v = format!("{{\"seq\":{i},\"sensor\":\"k{key}\",\"reading\":");
            while v.len() < PAYLOAD - 2 {
                v.push('7');
            }
            v.push_str("}\n");
            ((key as i32) % partitions, format!("k{key}"), v)
        })
        .collect();
    eprintln!("preloading {n} records into {}", kafka.describe());
    kafka.produce(topic, &records).expect("preload");
    // `--broker-nodelay`: Mosquitto with TCP_NODELAY on its client sockets (default off:
    // Nagle's algorithm holds small writes, such as PUBACKs, until the peer ACKs).
    let broker_nodelay = args.iter().any(|a| a == "--broker-nodelay");
    let broker = Mosquitto::start(MosquittoOptions {
        extra: broker_nodelay
            .then(|| "set_tcp_nodelay true".to_string())
            .into_iter()
            .collect(),
        ..MosquittoOptions::default()
    })
    .expect("mosquitto");
    let clk_tck = clock_ticks();

    let setup = Setup {
        kafka: &kafka,
        topic,
        port: broker.port,
        n,
        clk_tck,
    };
    if args.iter().any(|a| a == "--latency-bound") {
        let connections: Vec<usize> = opt("--connections")
            .unwrap_or_else(|| "1,2,4,8".into())
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        println!(
            "\n{n} records of {PAYLOAD} B, {KEYS} keys, {partitions} partitions, {}; Mosquitto {} \
             (max_inflight_messages 20) behind a proxy adding 20 ms each way; QoS 1, \
             max_inflight = 20 per connection\n",
            kafka.describe(),
            mosquitto_version()
        );
        println!("| runtime | connections | msg/s | x 1 connection | out of order |");
        println!("|---|---:|---:|---:|---:|");
        for runtime in ["tokio", "blocking"] {
            if only.as_ref().is_some_and(|o| !runtime.contains(o.as_str())) {
                continue;
            }
            let rows = latency_bound::run(&sink_bin, runtime, &connections, &setup);
            let one = rows.first().map_or(1.0, |r| r.rate);
            for r in rows {
                println!(
                    "| {runtime} | {} | {:.0} | {:.2} | {} of {} |",
                    r.connections,
                    r.rate,
                    r.rate / one,
                    r.out_of_order,
                    r.received
                );
            }
        }
        return;
    }
    // How fast records can be consumed from this Kafka at all, with the sink's consumer
    // settings: the sink cannot beat it, whatever the broker takes.
    let source: Vec<Measure> = (0..runs)
        .map(|run| {
            let m = consume_only(run, &setup);
            eprintln!(
                "kafka consume only run {run}: {:.0} msg/s, {:.2} us/rec",
                m.rate,
                m.cpu_s * 1e6 / n as f64
            );
            m
        })
        .collect();
    let source = Measure::median(&source);
    let quix_python = quix_python();
    let mut contenders = vec!["raw", "mqtt-sink tokio", "mqtt-sink blocking", "rumqttc"];
    match &quix_python {
        Ok(_) => contenders.push("quix streams"),
        Err(why) => eprintln!("quix streams: not run ({why})"),
    }
    let mut rows = Vec::new();
    for &qos in &qoses {
        for &with_sub in &subscribers {
            let mut ceiling = 0.0;
            for &name in &contenders {
                if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) && name != "raw" {
                    continue;
                }
                if name == "quix streams" && qos == 2 {
                    continue; // its MQTTSink refuses QoS 2
                }
                let mut samples = Vec::new();
                let mut failure = None;
                for run in 0..runs {
                    let m = match name {
                        "raw" | "rumqttc" => {
                            publisher(name, qos, with_sub, n, broker.port, clk_tck)
                        }
                        "quix streams" => {
                            let python = quix_python.as_ref().expect("checked above");
                            match quix(python, qos, with_sub, run, &setup) {
                                Ok(m) => m,
                                Err(e) => {
                                    eprintln!("qos {qos} sub {with_sub} {name} run {run}: {e}");
                                    failure = Some(e);
                                    break; // a defect, not noise: once is enough
                                }
                            }
                        }
                        _ => sink(
                            &sink_bin,
                            name.trim_start_matches("mqtt-sink "),
                            qos,
                            with_sub,
                            &setup,
                        ),
                    };
                    eprintln!(
                        "qos {qos} sub {with_sub} {name} run {run}: {:.0} msg/s, {:.2} us/rec, {} MiB",
                        m.rate,
                        m.cpu_s * 1e6 / n as f64,
                        m.rss_kb / 1024
                    );
                    samples.push(m);
                }
                if let Some(e) = failure {
                    rows.push((qos, with_sub, name, Err(e), 0.0));
                    continue;
                }
                let med = Measure::median(&samples);
                if name == "raw" {
                    ceiling = med.rate;
                }
                rows.push((qos, with_sub, name, Ok(med), med.rate / ceiling.max(1.0)));
            }
        }
    }
    println!(
        "\n{n} records of {PAYLOAD} B, {KEYS} keys, {partitions} partitions, {}; Mosquitto {}; median of {runs}\n",
        kafka.describe(),
        mosquitto_version()
    );
    println!(
        "Kafka consume only (rdkafka BaseConsumer, the sink's consumer settings, no MQTT): {:.0} msg/s, {:.2} us/record, peak RSS {:.1} MiB\n",
        source.rate,
        source.cpu_s * 1e6 / n as f64,
        source.rss_kb as f64 / 1024.0
    );
    let rows_kept: Vec<(u8, bool, &str, Option<f64>)> = rows
        .iter()
        .map(|(q, sub, name, m, _)| (*q, *sub, *name, m.as_ref().ok().map(|m| m.rate)))
        .collect();
    println!(
        "| QoS | subscriber | contender | msg/s | x ceiling | CPU s | us/record | peak RSS MiB |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for (qos, sub, name, m, ratio) in rows {
        let sub = if sub { "yes" } else { "no" };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                println!("| {qos} | {sub} | {name} | failed: {e} | | | | |");
                continue;
            }
        };
        println!(
            "| {qos} | {sub} | {name} | {:.0} | {ratio:.2} | {:.2} | {:.2} | {:.1} |",
            m.rate,
            m.cpu_s,
            m.cpu_s * 1e6 / n as f64,
            m.rss_kb as f64 / 1024.0
        );
    }
    if args.iter().any(|a| a == "--latency") {
        let seconds: usize = opt("--latency-seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        // One partition by default: the MockCluster finds a fetch's offset by walking the
        // partition's message sets (rdkafka_mock.c: "FIXME: Maintain an index"), and paced
        // production makes thousands of small ones; over 16 partitions its own latency
        // grows by the second (10k msg/s: p99 past 1 s after 12 s), over one it stays flat.
        let lat_partitions: i32 = opt("--latency-partitions")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let fetch_wait: u32 = opt("--latency-fetch-wait")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        let fixed: Option<Vec<usize>> = opt("--latency-rates")
            .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect());
        let mut lines = Vec::new();
        for name in [
            "kafka consume only",
            "mqtt-sink tokio",
            "mqtt-sink blocking",
            "rumqttc",
        ] {
            if name != "kafka consume only"
                && only.as_ref().is_some_and(|o| !name.contains(o.as_str()))
            {
                continue;
            }
            // 10k msg/s and half this contender's QoS 1 rate with a subscriber, if measured.
            let rates = fixed.clone().unwrap_or_else(|| {
                if name == "kafka consume only" {
                    return vec![10_000];
                }
                let max = measured(&rows_kept, name);
                std::iter::once(10_000)
                    .chain(max.map(|m| (m / 2.0) as usize))
                    .collect()
            });
            for rate in rates {
                let lat = match name {
                    "rumqttc" => latency::rumqttc(broker.port, rate, seconds),
                    "kafka consume only" => {
                        latency::consume(rate, seconds, lat_partitions, fetch_wait, &setup)
                    }
                    _ => latency::sink(
                        &sink_bin,
                        name.trim_start_matches("mqtt-sink "),
                        rate,
                        seconds,
                        lat_partitions,
                        fetch_wait,
                        &setup,
                    ),
                };
                let cells = match lat {
                    Ok(l) => l.cells(),
                    Err(e) => format!("failed: {e} | |"),
                };
                eprintln!("latency {name} at {rate} msg/s: {cells}");
                lines.push(format!("| {name} | {rate} | {cells} |"));
            }
        }
        println!(
            "\nEnd-to-end latency, QoS 1, {seconds} s at a steady offered load (from the append's \
             acknowledgement to the producer, rumqttc: from its publish call, to the first \
             arrival at the subscriber, same clock; the sink's consumer with \
             fetch.wait.max.ms = {fetch_wait}), {lat_partitions} partition(s)\n"
        );
        println!("| contender | offered msg/s | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|");
        for l in lines {
            println!("{l}");
        }
    }
}

/// The QoS 1 rate of `name` with a subscriber, if this run measured it.
fn measured(rows: &[(u8, bool, &str, Option<f64>)], name: &str) -> Option<f64> {
    rows.iter()
        .find(|(q, sub, n, _)| *q == 1 && *sub && *n == name)
        .and_then(|r| r.3)
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    rate: f64,
    cpu_s: f64,
    rss_kb: u64,
}

impl Measure {
    fn median(v: &[Measure]) -> Measure {
        let mid = |mut x: Vec<f64>| {
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        Measure {
            rate: mid(v.iter().map(|m| m.rate).collect()),
            cpu_s: mid(v.iter().map(|m| m.cpu_s).collect()),
            rss_kb: mid(v.iter().map(|m| m.rss_kb as f64).collect()) as u64,
        }
    }
}

/// A binary next to this one (Cargo puts workspace binaries in one directory).
fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    me.parent().expect("dir").join(name)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn mosquitto_version() -> String {
    Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default()
}

/// (CPU seconds, peak RSS in KiB) of a live process.
fn usage(pid: u32, clk_tck: f64) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks / clk_tck, hwm)
}

// ---------------------------------------------------------------------------------------
// A counting subscriber on raw MQTT 3.1.1 (the cheapest possible, so it takes little of
// the machine from the contenders).

struct Counter {
    count: Arc<AtomicU64>,
    last_ns: Arc<AtomicU64>,
    epoch: Instant,
}

fn subscribe(port: u16, filter: &str, qos: u8) -> Counter {
    subscribe_with(port, filter, qos, |_| {})
}

/// [`subscribe`], calling `on_publish` with the payload of every PUBLISH received.
fn subscribe_with(
    port: u16,
    filter: &str,
    qos: u8,
    mut on_publish: impl FnMut(&[u8]) + Send + 'static,
) -> Counter {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("subscriber connect");
    s.set_nodelay(true).ok();
    let id = format!("bench-sub-{}", free_port());
    let mut pkt = Vec::new();
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    put_str(&mut body, &id);
    pkt.push(0x10);
    put_len(&mut pkt, body.len());
    pkt.extend_from_slice(&body);
    let mut sub = vec![0, 1];
    put_str(&mut sub, filter);
    sub.push(qos);
    pkt.push(0x82);
    put_len(&mut pkt, sub.len());
    pkt.extend_from_slice(&sub);
    s.write_all(&pkt).expect("subscribe");
    // CONNACK (4 bytes) and SUBACK (5 bytes).
    let mut ack = [0u8; 9];
    s.read_exact(&mut ack).expect("suback");
    let count = Arc::new(AtomicU64::new(0));
    let last_ns = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let (c, l) = (count.clone(), last_ns.clone());
    std::thread::spawn(move || {
        let mut w = s.try_clone().expect("clone");
        let mut buf = vec![0u8; 1 << 20];
        let mut have = 0usize;
        let mut out = Vec::new();
        loop {
            let r = match s.read(&mut buf[have..]) {
                Ok(0) | Err(_) => return,
                Ok(r) => r,
            };
            have += r;
            let mut at = 0;
            let mut got = 0;
            while let Some((kind, start, len)) = frame(&buf[at..have]) {
                let p = &buf[at + start..at + start + len];
                match kind >> 4 {
                    3 => {
                        got += 1;
                        let q = (kind >> 1) & 3;
                        let tl = usize::from(u16::from_be_bytes([p[0], p[1]]));
                        if q > 0 {
                            let id = [p[2 + tl], p[3 + tl]];
                            out.extend_from_slice(&[if q == 1 { 0x40 } else { 0x50 }, 2]);
                            out.extend_from_slice(&id);
                            on_publish(&p[4 + tl..]);
                        } else {
                            on_publish(&p[2 + tl..]);
                        }
                    }
                    6 => out.extend_from_slice(&[0x70, 2, p[0], p[1]]), // PUBREL -> PUBCOMP
                    _ => {}
                }
                at += start + len;
            }
            buf.copy_within(at..have, 0);
            have -= at;
            if have == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            if !out.is_empty() {
                let _ = w.write_all(&out);
                out.clear();
            }
            if got > 0 {
                c.fetch_add(got, Ordering::Relaxed);
                l.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    });
    Counter {
        count,
        last_ns,
        epoch,
    }
}

impl Counter {
    fn wait(&self, n: u64, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while self.count.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2)); // polling a counter, bounded
        }
        Some(self.epoch + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed)))
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_len(b: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        b.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// (first byte, body start, body length) of the first whole frame in `b`.
fn frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    for i in 1..5 {
        let byte = *b.get(i)?;
        len += usize::from(byte & 0x7f) * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            return (b.len() >= i + 1 + len).then_some((b[0], i + 1, len));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Contenders

/// What every sink run shares.
struct Setup<'a> {
    kafka: &'a KafkaCluster,
    topic: &'a str,
    port: u16,
    n: usize,
    clk_tck: f64,
}

/// A running `mqtt-sink` daemon of the benchmark.
struct Daemon {
    child: Child,
    http: String,
    dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `runtime` reading `topic` as a new group into `root/...` on the
    /// broker at `port`, `mqtt` added to its `[mqtt]` table (`max_inflight = 1000` when
    /// empty), defaults otherwise; `props` are added to the Kafka properties (after
    /// `BENCH_KAFKA_EXTRA`).
    fn start(
        bin: &Path,
        runtime: &str,
        qos: u8,
        root: &str,
        setup: &Setup<'_>,
        props: &str,
        mqtt: &str,
    ) -> Daemon {
        let Setup {
            kafka, topic, port, ..
        } = *setup;
        let http = format!("127.0.0.1:{}", free_port());
        let props: String = kafka
            .group_properties()
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .chain(std::env::var("BENCH_KAFKA_EXTRA").ok())
            .chain(Some(props.to_string()))
            .collect();
        let dir = std::env::temp_dir().join(format!("mqtt-sink-bench-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = dir.join("sink.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"[kafka]
brokers = "{}"
group_id = "bench-{runtime}-{qos}-{}"
topics = ["{topic}"]
[kafka.properties]
{props}
[mqtt]
client_id = "bench"
server = "127.0.0.1"
port = {port}
topic_root = "{root}"
tls_enabled = false
qos = {qos}
{mqtt}
{mqtt_extra}
[http]
listen = "{http}"
[log]
level = "{log}"
"#,
                kafka.bootstrap(),
                free_port(),
                log = std::env::var("BENCH_SINK_LOG").unwrap_or_else(|_| "warn".into()),
                mqtt = if mqtt.is_empty() {
                    "max_inflight = 1000"
                } else {
                    mqtt
                },
                mqtt_extra = std::env::var("BENCH_MQTT_EXTRA").unwrap_or_default(),
            ),
        )
        .expect("config");
        let child: Child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .args(["--runtime", runtime])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mqtt-sink");
        Daemon { child, http, dir }
    }

    /// The sum of a metric's samples (None: the metrics endpoint did not answer).
    fn metric(&self, name: &str) -> Option<u64> {
        let mut s = TcpStream::connect(&self.http).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(
            body.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }

    /// Stops it with SIGTERM and removes its directory.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sink(bin: &Path, runtime: &str, qos: u8, with_sub: bool, setup: &Setup<'_>) -> Measure {
    let Setup {
        port, n, clk_tck, ..
    } = *setup;
    let root = format!("bench/{}", free_port());
    let counter = with_sub.then(|| subscribe(port, &format!("{root}/#"), qos));
    let daemon = Daemon::start(bin, runtime, qos, &root, setup, "", "");
    let metric = |name: &str| daemon.metric(name);
    let deadline = Instant::now() + Duration::from_secs(120);
    let t0 = loop {
        if metric("mqtt_sink_records_consumed_total").unwrap_or(0) > 0 {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the sink consumed nothing in 120 s"
        );
        std::thread::sleep(Duration::from_millis(2)); // polling metrics, bounded
    };
    // CPU over the measured interval only (not start-up and the group join).
    let cpu_start = usage(daemon.child.id(), clk_tck).0;
    let end = match &counter {
        Some(c) => c
            .wait(n as u64, Duration::from_secs(600))
            .expect("the subscriber did not receive every record"),
        None => loop {
            let acked = if qos == 0 {
                metric("mqtt_sink_records_published_total")
            } else {
                metric("mqtt_sink_records_acknowledged_total")
            };
            if acked.unwrap_or(0) >= n as u64 {
                break Instant::now();
            }
            assert!(
                Instant::now() < deadline + Duration::from_secs(480),
                "the sink stalled"
            );
            // Every poll is an HTTP request the sink serves: 25 ms keeps that cost out of
            // its CPU figure at a 0.5% timing error on a 5 s run.
            std::thread::sleep(Duration::from_millis(25));
        },
    };
    let (cpu_end, rss_kb) = usage(daemon.child.id(), clk_tck);
    let cpu_s = cpu_end - cpu_start;
    daemon.stop();
    Measure {
        rate: n as f64 / end.saturating_duration_since(t0).as_secs_f64().max(1e-9),
        cpu_s,
        rss_kb,
    }
}

/// Consumes the preloaded topic in a child process with no MQTT at all (the Kafka ceiling).
fn consume_only(run: usize, setup: &Setup<'_>) -> Measure {
    let me = std::env::current_exe().expect("exe");
    let mut cmd = Command::new(me);
    cmd.args([
        "consume",
        &setup.kafka.bootstrap(),
        setup.topic,
        &setup.n.to_string(),
        &format!("bench-consume-{run}-{}", free_port()),
    ]);
    for (k, v) in setup.kafka.group_properties() {
        cmd.arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("consume child");
    let mut out = child.stdout.take().expect("stdout");
    let mut line = [0u8; 6];
    out.read_exact(&mut line).expect("consume start");
    let t0 = Instant::now();
    let cpu_start = usage(child.id(), setup.clk_tck).0;
    out.read_exact(&mut line[..5]).expect("consume done");
    let end = Instant::now();
    let (cpu_end, rss_kb) = usage(child.id(), setup.clk_tck);
    let _ = child.kill();
    let _ = child.wait();
    Measure {
        rate: setup.n as f64 / end.saturating_duration_since(t0).as_secs_f64().max(1e-9),
        cpu_s: cpu_end - cpu_start,
        rss_kb,
    }
}

/// The Python that runs the Quix Streams contender: `BENCH_QUIX_PYTHON`, else `python3`,
/// if it imports `quixstreams` with its MQTT sink (`pip install 'quixstreams[mqtt]'`).
fn quix_python() -> Result<String, String> {
    let python = std::env::var("BENCH_QUIX_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import quixstreams.sinks.community.mqtt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(s) if s.success() => Ok(python),
        Ok(_) => Err(format!(
            "{python} cannot import quixstreams' MQTT sink: pip install 'quixstreams[mqtt]', or set BENCH_QUIX_PYTHON"
        )),
        Err(e) => Err(format!("{python}: {e}")),
    }
}

/// The Quix Streams `MQTTSink` (`testkit/bench/quix_sink.py`) consuming the same topic.
/// A run fails when the sink makes no progress for 20 s (its QoS 0 network thread dies).
fn quix(
    python: &str,
    qos: u8,
    with_sub: bool,
    run: usize,
    setup: &Setup<'_>,
) -> Result<Measure, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/quix_sink.py");
    let root = format!("bench/{}", free_port());
    let counter = with_sub.then(|| subscribe(setup.port, &format!("{root}/#"), qos));
    let mut cmd = Command::new(python);
    if setup.kafka.describe().starts_with("MockCluster") {
        cmd.env("QUIX_BENCH_MOCK_CLUSTER", "1");
    }
    cmd.arg(script).args([
        setup.kafka.bootstrap(),
        setup.topic.to_string(),
        format!("bench-quix-{qos}-{with_sub}-{run}-{}", free_port()),
        setup.n.to_string(),
        setup.port.to_string(),
        root,
        qos.to_string(),
    ]);
    // Quix sets `partition.assignment.strategy`, which the KIP-848 protocol refuses: it
    // joins with the classic protocol (the rest of the group settings as the sink's).
    for (k, v) in setup.kafka.group_properties() {
        if !k.starts_with("group.protocol") && k != "group.remote.assignor" {
            cmd.arg(format!("{k}={v}"));
        }
    }
    let log = std::env::temp_dir().join(format!("mqtt-sink-bench-quix-{}.log", free_port()));
    let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{python} {script}: {e}"))?;
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let pid = child.id();
    let result = (|| {
        let stall = Duration::from_secs(20);
        let mut t0 = None;
        let mut cpu_start = 0.0;
        let mut acked = 0u64;
        let mut progressed = Instant::now();
        let done = loop {
            // Start-up (Python imports, the group join) gets longer.
            let limit = if t0.is_some() { stall } else { 3 * stall };
            if progressed.elapsed() > limit {
                return Err(format!(
                    "no progress for {} s: {acked} of {} acknowledged{}",
                    limit.as_secs(),
                    setup.n,
                    if t0.is_some() {
                        ""
                    } else {
                        ", no record reached the sink"
                    }
                ));
            }
            let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("exited ({status}) after {acked} acknowledged"));
                }
                continue;
            };
            match line.as_str() {
                "start" => {
                    t0 = Some(Instant::now());
                    cpu_start = usage(pid, setup.clk_tck).0;
                    progressed = Instant::now();
                }
                "done" => break Instant::now(),
                l => {
                    if let Some(now) = l.strip_prefix("acked ").and_then(|v| v.parse().ok()) {
                        if now > acked {
                            acked = now;
                            progressed = Instant::now();
                        }
                    }
                }
            }
        };
        let t0 = t0.ok_or("finished without starting")?;
        let end = match &counter {
            Some(c) => c
                .wait(setup.n as u64, Duration::from_secs(120))
                .ok_or("the subscriber did not receive every record")?,
            None => done,
        };
        let (cpu_end, rss_kb) = usage(pid, setup.clk_tck);
        Ok(Measure {
            rate: setup.n as f64 / end.saturating_duration_since(t0).as_secs_f64().max(1e-9),
            cpu_s: cpu_end - cpu_start,
            rss_kb,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    // On failure, the last lines Python printed say why (a traceback, usually).
    let tail = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    result.map_err(|e: String| {
        let last: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = last[last.len().saturating_sub(2)..].join(" / ");
        if last.is_empty() {
            format!("Quix Streams MQTTSink: {e}")
        } else {
            format!("Quix Streams MQTTSink: {e}; its stderr ends: {last}")
        }
    })
}

/// The child of [`consume_only`]: `consume <bootstrap> <topic> <n> <group> [k=v ...]`.
fn consume(args: &[String]) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let n: usize = args[2].parse().expect("n");
    // As the sink's consumer (mqtt_sink_kafka::consumer_config: its defaults, the given
    // properties, no auto commit, offsets stored by hand), from the start of the topic.
    let mut kafka = mqtt_sink_core::KafkaConfig::new(&args[0], &args[3], vec![args[1].clone()]);
    kafka.properties = args[4..]
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut cc = mqtt_sink_kafka::consumer_config(&kafka);
    cc.set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = cc.create().expect("consumer");
    consumer.subscribe(&[args[1].as_str()]).expect("subscribe");
    let mut stdout = std::io::stdout();
    let mut got = 0usize;
    let mut bytes = 0usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < n && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.expect("consume");
        if got == 0 {
            let _ = stdout.write_all(b"start\n");
            let _ = stdout.flush();
        }
        // Owned copies, as the sink makes of every record.
        let key = bytes::Bytes::copy_from_slice(m.key().unwrap_or_default());
        let value = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
        bytes += key.len() + value.len();
        got += 1;
    }
    assert_eq!(got, n, "consumed {got} of {n} in 300 s ({bytes} B)");
    let _ = stdout.write_all(b"done\n");
    let _ = stdout.flush();
    std::thread::sleep(Duration::from_secs(600)); // until the parent kills us (bounded)
}

/// Runs `raw` or `rumqttc` as a child process of this binary and measures it.
fn publisher(kind: &str, qos: u8, with_sub: bool, n: usize, port: u16, clk_tck: f64) -> Measure {
    let root = format!("bench/{}", free_port());
    let counter = with_sub.then(|| subscribe(port, &format!("{root}/#"), qos));
    let me = std::env::current_exe().expect("exe");
    let mut child = Command::new(me)
        .args([
            "child",
            kind,
            &qos.to_string(),
            &n.to_string(),
            &port.to_string(),
            &root,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child");
    // The child prints "start" when it begins publishing, "done" after the last ack, then
    // waits for its stdin to close (so its usage can be read while it lives).
    let mut out = child.stdout.take().expect("stdout");
    let mut line = [0u8; 6];
    out.read_exact(&mut line).expect("child start");
    let t0 = Instant::now();
    // CPU over the measured interval only (not encoding the payloads beforehand).
    let cpu_start = usage(child.id(), clk_tck).0;
    out.read_exact(&mut line[..5]).expect("child done");
    let acked = Instant::now();
    let end = match &counter {
        Some(c) => c
            .wait(n as u64, Duration::from_secs(600))
            .expect("the subscriber did not receive every record"),
        None => acked,
    };
    let (cpu_end, rss_kb) = usage(child.id(), clk_tck);
    let cpu_s = cpu_end - cpu_start;
    let _ = child.kill();
    let _ = child.wait();
    Measure {
        rate: n as f64 / end.saturating_duration_since(t0).as_secs_f64().max(1e-9),
        cpu_s,
        rss_kb,
    }
}

fn child(args: &[String]) {
    let kind = args[0].as_str();
    let qos: u8 = args[1].parse().expect("qos");
    let n: usize = args[2].parse().expect("n");
    let port: u16 = args[3].parse().expect("port");
    let root = args[4].clone();
    let payloads: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let key = i % KEYS;
            let mut v = format!("{{\"seq\":{i},\"sensor\":\"k{key}\",\"reading\":");
            while v.len() < PAYLOAD - 2 {
                v.push('7');
            }
            v.push_str("}\n");
            (format!("{root}/k{key}"), v.into_bytes())
        })
        .collect();
    let mut stdout = std::io::stdout();
    match kind {
        "raw" => raw(qos, port, &payloads, &mut stdout),
        _ => with_rumqttc(qos, port, &payloads, &mut stdout),
    }
    // Stay alive (bounded) until the parent has read our usage and kills us.
    std::thread::sleep(Duration::from_secs(600));
}

/// Pre-encoded PUBLISH packets written in large batches; a reader thread counts acks.
fn raw(qos: u8, port: u16, payloads: &[(String, Vec<u8>)], stdout: &mut std::io::Stdout) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).ok();
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    put_str(&mut body, &format!("raw-{}", std::process::id()));
    let mut pkt = vec![0x10];
    put_len(&mut pkt, body.len());
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).expect("connect");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("connack");
    let n = payloads.len();
    // Encode everything first (not timed): ids cycle through 1..=65535 under a window.
    let window = 1000usize;
    let encoded: Vec<Vec<u8>> = payloads
        .iter()
        .enumerate()
        .map(|(i, (topic, p))| {
            let mut v = Vec::with_capacity(p.len() + topic.len() + 8);
            v.push(0x30 | (qos << 1));
            let extra = if qos > 0 { 2 } else { 0 };
            put_len(&mut v, 2 + topic.len() + extra + p.len());
            put_str(&mut v, topic);
            if qos > 0 {
                v.extend_from_slice(&(((i % 65535) + 1) as u16).to_be_bytes());
            }
            v.extend_from_slice(p);
            v
        })
        .collect();
    // (acknowledged count, PUBRELs to send): one writer only, the publishing thread, so
    // that PUBRELs never interleave with a partially written batch.
    let acked = Arc::new((
        std::sync::Mutex::new((0u64, Vec::<u8>::new())),
        std::sync::Condvar::new(),
    ));
    let a = acked.clone();
    let mut r = s.try_clone().expect("clone");
    let reader = (qos > 0).then(|| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut have = 0;
            let mut out = Vec::new();
            while a.0.lock().expect("lock").0 < n as u64 {
                let got = match r.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => return,
                    Ok(g) => g,
                };
                have += got;
                let mut at = 0;
                let mut done = 0;
                while let Some((kind, start, len)) = frame(&buf[at..have]) {
                    let p = &buf[at + start..at + start + len];
                    match kind >> 4 {
                        4 | 7 => done += 1,                                 // PUBACK / PUBCOMP
                        5 => out.extend_from_slice(&[0x62, 2, p[0], p[1]]), // PUBREC -> PUBREL
                        _ => {}
                    }
                    at += start + len;
                }
                buf.copy_within(at..have, 0);
                have -= at;
                if done > 0 || !out.is_empty() {
                    let mut g = a.0.lock().expect("lock");
                    g.0 += done;
                    g.1.append(&mut out);
                    a.1.notify_one();
                }
            }
        })
    });
    let _ = stdout.write_all(b"start\n");
    let _ = stdout.flush();
    let mut batch = Vec::with_capacity(256 * 1024);
    let mut sent = 0usize;
    while sent < n {
        // Keep at most `window` unacknowledged (QoS 1/2), as a real client must; wait on
        // the reader, never spin (two cores: a spinning publisher starves the broker).
        // Write as soon as any slot is free: waiting for more (it once waited for a quarter
        // of the window) leaves our ACKs to the delayed-ACK timer while Mosquitto's Nagle
        // holds its acks for them, and the run stalls at window / 40 ms.
        let limit = if qos > 0 {
            let mut g = acked.0.lock().expect("lock");
            while sent - g.0 as usize >= window && g.1.is_empty() {
                g = acked.1.wait(g).expect("wait");
            }
            batch.append(&mut g.1);
            (g.0 as usize + window).min(n)
        } else {
            n
        };
        while sent < limit && batch.len() < 256 * 1024 {
            batch.extend_from_slice(&encoded[sent]);
            sent += 1;
        }
        s.write_all(&batch).expect("write");
        batch.clear();
    }
    if let Some(r) = reader {
        // QoS 2: keep sending the PUBRELs the last PUBRECs asked for.
        loop {
            let mut g = acked.0.lock().expect("lock");
            if g.0 >= n as u64 {
                break;
            }
            if g.1.is_empty() {
                g = acked.1.wait(g).expect("wait");
            }
            let rel = std::mem::take(&mut g.1);
            drop(g);
            if !rel.is_empty() {
                s.write_all(&rel).expect("write");
            }
        }
        let _ = r.join();
    } else {
        // QoS 0: a PINGREQ round trip marks the broker having read everything.
        s.write_all(&[0xC0, 0]).expect("ping");
        let mut pong = [0u8; 2];
        let _ = s.read_exact(&mut pong);
    }
    let _ = stdout.write_all(b"done\n");
    let _ = stdout.flush();
}

/// What a user writes by hand with rumqttc: publish in a loop, count acks on the event loop.
fn with_rumqttc(qos: u8, port: u16, payloads: &[(String, Vec<u8>)], stdout: &mut std::io::Stdout) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(format!("rumqttc-{}", std::process::id()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(1000);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 10_000);
    let q = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let n = payloads.len();
    let owned: Vec<(String, Vec<u8>)> = payloads.to_vec();
    let _ = stdout.write_all(b"start\n");
    let _ = stdout.flush();
    let publisher = std::thread::spawn(move || {
        for (t, p) in owned {
            client.publish(t, q, false, p).expect("publish");
        }
        client
    });
    let mut done = 0usize;
    let mut published = 0usize;
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => done += 1,
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => published += 1,
            Err(e) => panic!("rumqttc: {e}"),
            _ => {}
        }
        if (qos == 0 && published >= n) || (qos > 0 && done >= n) {
            break;
        }
    }
    let _client = publisher.join();
    let _ = stdout.write_all(b"done\n");
    let _ = stdout.flush();
}
