//! End-to-end latency at a steady offered load (`--latency`).
//!
//! A producer in this process sends records at a fixed rate; a record's latency runs from the
//! acknowledgement of its append (the producer's delivery report) to its first arrival at
//! the subscriber, both in this process (same clock). The
//! sink reads a fresh, empty topic as a new group with `fetch.wait.max.ms = 5` by default
//! (`--latency-fetch-wait`): with the
//! default (500) the MockCluster answers an empty fetch late and that wait, not the sink,
//! dominates (p50 ~300 ms). rumqttc publishes the same paced records itself (no Kafka): its
//! latency runs from the publish call (the send time in the payload).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mqtt_sink_testkit::mosquitto::free_port;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::{subscribe_with, Daemon, Setup, KEYS, PAYLOAD};

/// Latencies of one run, in microseconds, sorted.
pub(crate) struct Latency {
    pub(crate) expected: usize,
    pub(crate) us: Vec<u64>,
}

impl Latency {
    fn pct(&self, p: f64) -> f64 {
        if self.us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.us.len() as f64 * p).ceil() as usize).clamp(1, self.us.len()) - 1;
        self.us[i] as f64 / 1000.0
    }

    /// `p50 | p99 | max` in milliseconds, with the count when records are missing.
    pub(crate) fn cells(&self) -> String {
        let missing = self.expected.saturating_sub(self.us.len());
        let note = if missing > 0 {
            format!(" ({missing} of {} never arrived)", self.expected)
        } else {
            String::new()
        };
        format!(
            "{:.2} | {:.2} | {:.2}{note}",
            self.pct(0.50),
            self.pct(0.99),
            self.pct(1.0)
        )
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Record `seq`: key, and a payload of [`PAYLOAD`] bytes carrying its sequence number and
/// send time.
fn record(seq: usize) -> (String, String) {
    let key = seq % KEYS;
    let mut v = format!(
        "{{\"seq\":{seq},\"ts\":{},\"sensor\":\"k{key}\",\"reading\":",
        now_us()
    );
    while v.len() < PAYLOAD - 2 {
        v.push('7');
    }
    v.push_str("}\n");
    (format!("k{key}"), v)
}

/// A number field of a payload made by [`record`].
fn field(payload: &[u8], name: &str) -> Option<u64> {
    let s = std::str::from_utf8(payload).ok()?;
    let at = s.find(&format!("\"{name}\":"))? + name.len() + 3;
    let digits: String = s[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Calls `send(i)` for `i` in `range`, `rate` per second, on a 200 us tick (pacing the
/// offered load, not waiting for anything).
fn pace(rate: usize, range: std::ops::Range<usize>, mut send: impl FnMut(usize)) {
    let start = Instant::now();
    let mut i = range.start;
    while i < range.end {
        let due = (range.start + (start.elapsed().as_secs_f64() * rate as f64) as usize + 1)
            .min(range.end);
        while i < due {
            send(i);
            i += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Per sequence number: when the record became available (its append acknowledged to the
/// producer, or, for a publisher without Kafka, its send time) and its first arrival at
/// the subscriber, in microseconds of the wall clock (0: not yet).
struct Stamps {
    from: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
    /// Arrivals of sequence numbers below `load` (the measured records).
    count: AtomicUsize,
    load: usize,
}

impl Stamps {
    fn new(load: usize, warm: usize) -> Arc<Stamps> {
        let zeros = || (0..load + warm).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Stamps {
            from: zeros(),
            arrived: zeros(),
            count: AtomicUsize::new(0),
            load,
        })
    }

    /// A record arrived at the subscriber (`from_payload`: its send time is the start).
    fn arrive(&self, payload: &[u8], from_payload: bool) {
        let now = now_us();
        let Some(seq) = field(payload, "seq").map(|s| s as usize) else {
            return;
        };
        let Some(slot) = self.arrived.get(seq) else {
            return;
        };
        if slot
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            if from_payload {
                self.from[seq].store(field(payload, "ts").unwrap_or(0), Ordering::Relaxed);
            }
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until `n` records have arrived (at most `timeout`); whether they did.
    fn wait(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5)); // polling a counter, bounded
        }
        true
    }

    /// The measured records' latencies.
    fn latency(&self) -> Latency {
        let mut us: Vec<u64> = (0..self.load)
            .filter_map(|i| {
                let a = self.arrived[i].load(Ordering::Relaxed);
                let f = self.from[i].load(Ordering::Relaxed);
                (a > 0 && f > 0).then(|| a.saturating_sub(f))
            })
            .collect();
        // `BENCH_LATENCY_CSV=PATH`: every record's `seq,available_us,arrived_us` (wall clock)
        // to `PATH-<n>`, one file per run, to see how latency moves over a run.
        if let Ok(path) = std::env::var("BENCH_LATENCY_CSV") {
            let rows: String = (0..self.load)
                .map(|i| {
                    format!(
                        "{i},{},{}\n",
                        self.from[i].load(Ordering::Relaxed),
                        self.arrived[i].load(Ordering::Relaxed)
                    )
                })
                .collect();
            let _ = std::fs::write(format!("{path}-{}", free_port()), rows);
        }
        us.sort_unstable();
        Latency {
            expected: self.load,
            us,
        }
    }
}

/// A subscriber on `root/#` (QoS 1) stamping arrivals.
fn collect(port: u16, root: &str, stamps: &Arc<Stamps>, from_payload: bool) {
    let s = stamps.clone();
    subscribe_with(port, &format!("{root}/#"), 1, move |payload| {
        s.arrive(payload, from_payload);
    });
}

/// Stamps the acknowledgement of each append (the delivery report, served by `poll` on the
/// producing thread).
struct Acks(Arc<Stamps>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<usize>) {
        if result.is_ok() {
            self.0.from[*seq].store(now_us(), Ordering::Relaxed);
        }
    }
}

/// Produces records `range` at `rate` per second to `topic`: a record of the load
/// (below `stamps.load`) to the partition of its key, warm-up record `load + j` to
/// partition `j`. `linger.ms = 5`: at 0 the MockCluster falls behind 10k single-record
/// produce requests a second; the batching wait does not count, latency starts at the
/// append's acknowledgement.
fn produce_paced(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    rate: usize,
    range: std::ops::Range<usize>,
    stamps: &Arc<Stamps>,
) -> Result<(), String> {
    let producer: BaseProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create_with_context(Acks(stamps.clone()))
        .map_err(|e| format!("producer: {e}"))?;
    let mut failed = None;
    let load = stamps.load;
    pace(rate, range, |seq| {
        let (key, value) = record(seq);
        let partition = if seq >= load {
            (seq - load) as i32
        } else {
            ((seq % KEYS) as i32) % partitions
        };
        let rec = BaseRecord::with_opaque_to(topic, Box::new(seq))
            .partition(partition)
            .key(key.as_str())
            .payload(value.as_str());
        if let Err((e, _)) = producer.send(rec) {
            failed.get_or_insert_with(|| format!("produce {topic}/{partition}: {e}"));
        }
        producer.poll(Duration::ZERO);
    });
    producer
        .flush(Duration::from_secs(30))
        .map_err(|e| format!("producer flush: {e}"))?;
    failed.map_or(Ok(()), Err)
}

/// Warm-up (one record per partition, so that every partition is assigned and fetched
/// before the load starts), then the load; the latencies of the load.
fn run_load(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    rate: usize,
    stamps: &Arc<Stamps>,
) -> Result<Latency, String> {
    let load = stamps.load;
    let warm = load..load + partitions as usize;
    produce_paced(bootstrap, topic, partitions, rate, warm, stamps)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (load..load + partitions as usize).any(|s| stamps.arrived[s].load(Ordering::Relaxed) == 0)
    {
        if Instant::now() > deadline {
            return Err("the warm-up records did not arrive in 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5)); // polling stamps, bounded
    }
    produce_paced(bootstrap, topic, partitions, rate, 0..load, stamps)?;
    stamps.wait(load, Duration::from_secs(30));
    Ok(stamps.latency())
}

/// The sink on `runtime`, QoS 1, reading a new topic of `partitions` partitions with
/// `fetch.wait.max.ms = fetch_wait` while `rate` records per second are produced to it for
/// `seconds`.
pub(crate) fn sink(
    bin: &std::path::Path,
    runtime: &str,
    rate: usize,
    seconds: usize,
    partitions: i32,
    fetch_wait: u32,
    setup: &Setup<'_>,
) -> Result<Latency, String> {
    let topic = format!("lat-{runtime}-{rate}-{}", free_port());
    setup.kafka.create_topic(&topic, partitions)?;
    let root = format!("lat/{}", free_port());
    let stamps = Stamps::new(rate * seconds, partitions as usize);
    collect(setup.port, &root, &stamps, false);
    let setup = Setup {
        topic: &topic,
        ..*setup
    };
    let daemon = Daemon::start(
        bin,
        runtime,
        1,
        &root,
        &setup,
        &format!("\"fetch.wait.max.ms\" = \"{fetch_wait}\"\n"),
        "",
    );
    let lat = run_load(&setup.kafka.bootstrap(), &topic, partitions, rate, &stamps);
    daemon.stop();
    lat
}

/// A consumer in this process with the sink's consumer settings (`consumer_config`) and
/// `fetch.wait.max.ms = fetch_wait`, no MQTT: what reading from Kafka alone adds (append
/// acknowledged to consumed).
pub(crate) fn consume(
    rate: usize,
    seconds: usize,
    partitions: i32,
    fetch_wait: u32,
    setup: &Setup<'_>,
) -> Result<Latency, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let topic = format!("lat-consume-{rate}-{}", free_port());
    setup.kafka.create_topic(&topic, partitions)?;
    let mut kafka = mqtt_sink_core::KafkaConfig::new(
        setup.kafka.bootstrap(),
        format!("lat-consume-{}", free_port()),
        vec![topic.clone()],
    );
    kafka.properties = setup.kafka.group_properties();
    kafka
        .properties
        .insert("fetch.wait.max.ms".into(), fetch_wait.to_string());
    let consumer: BaseConsumer = mqtt_sink_kafka::consumer_config(&kafka)
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    consumer
        .subscribe(&[topic.as_str()])
        .map_err(|e| format!("subscribe: {e}"))?;
    let stamps = Stamps::new(rate * seconds, partitions as usize);
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (stop.clone(), stamps.clone());
    let reader = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                st.arrive(m.payload().unwrap_or_default(), false);
            }
        }
    });
    let lat = run_load(&setup.kafka.bootstrap(), &topic, partitions, rate, &stamps);
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    lat
}

/// rumqttc (a child process) publishing `rate` records per second for `seconds`, QoS 1.
pub(crate) fn rumqttc(port: u16, rate: usize, seconds: usize) -> Result<Latency, String> {
    let root = format!("lat/{}", free_port());
    let stamps = Stamps::new(rate * seconds, 0);
    collect(port, &root, &stamps, true);
    let total = stamps.load;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(me)
        .args([
            "child",
            "rumqttc-paced",
            &port.to_string(),
            &root,
            &rate.to_string(),
            &total.to_string(),
        ])
        .spawn()
        .map_err(|e| format!("child: {e}"))?;
    stamps.wait(total, Duration::from_secs(seconds as u64 + 60));
    let _ = child.kill();
    let _ = child.wait();
    Ok(stamps.latency())
}

/// The child of [`rumqttc`]: `port root rate total`.
pub(crate) fn rumqttc_child(args: &[String]) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let port: u16 = args[0].parse().expect("port");
    let root = args[1].clone();
    let rate: usize = args[2].parse().expect("rate");
    let total: usize = args[3].parse().expect("total");
    let mut opts = MqttOptions::new(format!("rumqttc-{}", std::process::id()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(1000);
    let (client, mut conn) = Client::new(opts, 10_000);
    let publisher = std::thread::spawn(move || {
        pace(rate, 0..total, |i| {
            let (key, value) = record(i);
            client
                .publish(format!("{root}/{key}"), QoS::AtLeastOnce, false, value)
                .expect("publish");
        });
        client
    });
    let mut acked = 0;
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Err(e) => panic!("rumqttc: {e}"),
            _ => {}
        }
        if acked >= total {
            break;
        }
    }
    let _client = publisher.join();
}
