//! `mqtt-sink demo`: everything in one process, no external service. An in-process Kafka
//! (rdkafka's MockCluster) holds sample sensor readings; an in-process MQTT broker
//! (rumqttd) receives them; the bridge moves them, committing as the broker acknowledges;
//! a subscriber on the broker counts what arrives. Progress is printed live, then a summary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_sink_core::{Config, Event, KafkaConfig, MqttVersion};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const TOPIC: &str = "demo-readings";
const PARTITIONS: i32 = 4;

#[allow(clippy::print_stdout)]
fn say(s: &str) {
    println!("{s}");
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

/// Starts rumqttd on a free 127.0.0.1 port (MQTT 3.1.1 or 5 listener) with a local
/// subscriber to `demo/#`; returns (port, received counter). A port taken between choosing
/// and binding it is retried with another.
fn start_broker(version: MqttVersion) -> Result<(u16, Arc<AtomicU64>), String> {
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        match try_broker(version, port) {
            Ok(received) => return Ok((port, received)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn try_broker(version: MqttVersion, port: u16) -> Result<Arc<AtomicU64>, String> {
    let name = if version == MqttVersion::V5 {
        "v5"
    } else {
        "v4"
    };
    let text = format!(
        "id = 0\n[router]\nid = 0\nmax_connections = 100\nmax_outgoing_packet_count = 1000\n\
         max_segment_size = 104857600\nmax_segment_count = 10\n\
         [{name}.1]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 1\n\
         [{name}.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 65536\n\
         max_inflight_count = 1000\ndynamic_filters = true\n"
    );
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| format!("broker config: {e}"))?;
    let mut broker = rumqttd::Broker::new(config);
    let (mut link_tx, mut link_rx) = broker
        .link("demo-subscriber")
        .map_err(|e| format!("broker link: {e}"))?;
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            let _ = broker.start();
        })
        .map_err(|e| e.to_string())?;
    // Ready when it accepts a connection (bounded: 3 s).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the in-process MQTT broker did not listen on 127.0.0.1:{port}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20)); // readiness poll of a background thread
    }
    link_tx
        .subscribe("demo/#")
        .map_err(|e| format!("subscribe: {e}"))?;
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    std::thread::Builder::new()
        .name("demo-subscriber".into())
        .spawn(move || {
            // When the router unschedules a slow link it waits for Ready (rumqttd's network
            // links do the same): without it, delivery stalls under load.
            while let Ok(n) = link_rx.recv() {
                match n {
                    Some(rumqttd::Notification::Forward(_)) => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(rumqttd::Notification::Unschedule) if link_rx.ready().is_err() => return,
                    _ => {}
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(received)
}

/// Produces `n` sensor readings: 20 sensors, each on one partition (key = sensor id).
fn produce(bootstrap: &str, n: u64) -> Result<(), String> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .map_err(|e| format!("producer: {e}"))?;
    for i in 0..n {
        let sensor = i % 20;
        let key = format!("sensor-{sensor:02}");
        let value = format!(
            r#"{{"sensor":"{key}","seq":{i},"temperature":{:.1},"humidity":{}}}"#,
            18.0 + (i % 70) as f64 / 10.0,
            40 + i % 30
        );
        let mut rec = BaseRecord::to(TOPIC)
            .partition((sensor % PARTITIONS as u64) as i32)
            .key(&key)
            .payload(&value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(10));
                    rec = r;
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .map_err(|e| format!("produce: {e}"))
}

/// Runs the demo; returns whether every record arrived and was committed.
pub(crate) fn run(n: u64, version: MqttVersion) -> Result<bool, String> {
    say(&format!(
        "mqtt-sink demo: {n} sensor readings, in-process Kafka and MQTT broker, MQTT {version}"
    ));
    let cluster = MockCluster::new(1).map_err(|e| format!("in-process Kafka: {e}"))?;
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .map_err(|e| format!("create topic: {e}"))?;
    let bootstrap = cluster.bootstrap_servers();
    produce(&bootstrap, n)?;
    say(&format!(
        "  Kafka {bootstrap}: topic {TOPIC} ({PARTITIONS} partitions) holds {n} records"
    ));
    let (port, received) = start_broker(version)?;
    say(&format!(
        "  MQTT broker on 127.0.0.1:{port}; records go to demo/{{key}}, e.g. demo/sensor-07"
    ));

    let mut kafka = KafkaConfig::new(bootstrap, "mqtt-sink-demo", vec![TOPIC.to_string()]);
    kafka.properties = HashMap::from([
        ("group.protocol", "consumer"),
        ("auto.offset.reset", "earliest"),
    ])
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    kafka.commit_interval = Duration::from_millis(500);
    let mut mqtt = Config::new("mqtt-sink-demo", "127.0.0.1", port, "demo");
    mqtt.tls_enabled = false;
    mqtt.version = version;
    mqtt.reconnect_backoff_min = Duration::from_millis(50);
    let acknowledged = Arc::new(AtomicU64::new(0));
    let acks = acknowledged.clone();
    let bridge = mqtt_sink_blocking::Bridge::builder(kafka, mqtt)
        .sink(move |s| {
            s.on_event(move |e| {
                if matches!(e, Event::RecordAcknowledged(_)) {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .start()
        .map_err(|e| e.to_string())?;
    let stats = bridge.stats_handle();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let worker = std::thread::spawn(move || bridge.run(&s));

    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let end = n / PARTITIONS as u64;
    let mut last = (Instant::now(), 0u64);
    let done = loop {
        std::thread::sleep(Duration::from_millis(500)); // progress display interval
        let st = stats.snapshot();
        let committed: i64 = st.committed.iter().map(|(_, o)| *o).sum();
        let got = received.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (got - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, got);
        say(&format!(
            "  {:>5.1}s  consumed {:>7}  acknowledged {:>7}  committed {:>7}  received {:>7}  {:>8.0} msg/s",
            started.elapsed().as_secs_f64(),
            st.consumed,
            acknowledged.load(Ordering::Relaxed),
            committed,
            got,
            rate
        ));
        let all_committed = st.committed.len() == PARTITIONS as usize
            && st.committed.iter().all(|(_, o)| *o as u64 == end);
        if got >= n && all_committed {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    stop.store(true, Ordering::Relaxed);
    let st = worker
        .join()
        .map_err(|_| "the bridge thread panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    say(&format!(
        "summary: {} consumed, {} acknowledged by the broker, {} received by the subscriber, \
         committed {} (end offsets {end} per partition), {} commits, {:.1}s, {:.0} msg/s",
        st.consumed,
        acknowledged.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        mqtt_sink_core::OffsetList(&st.committed),
        st.commits,
        secs,
        st.consumed as f64 / secs
    ));
    Ok(done)
}
