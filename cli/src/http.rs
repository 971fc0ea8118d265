//! Operations endpoints on `[http] listen`: Prometheus `/metrics`, `/healthz` (process
//! up) and `/readyz` (connected to the MQTT broker and assigned by Kafka). A minimal
//! HTTP/1.1 responder on one thread: scrapes are rare and small.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqtt_sink_core::{Event, RejectReason};
use mqtt_sink_kafka::StatsHandle;

/// Counters fed by the sink's events.
#[derive(Default)]
pub(crate) struct Metrics {
    acknowledged: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    dead_lettered: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    connection_losses: AtomicU64,
    flushes: Mutex<BTreeMap<&'static str, u64>>,
    connected: AtomicBool,
    stats: Mutex<Option<StatsHandle>>,
    sink: Mutex<Option<SinkStatsFn>>,
    watermarks: Mutex<Option<rdkafka::consumer::BaseConsumer>>,
}

type SinkStatsFn = Box<dyn Fn() -> Option<mqtt_sink_core::Stats> + Send + Sync>;

fn reason_label(r: &RejectReason) -> &'static str {
    match r {
        RejectReason::MissingKey => "missing_key",
        RejectReason::KeyNotUtf8 => "key_not_utf8",
        RejectReason::KeySerializer(_) => "key_serializer",
        RejectReason::ValueSerializer(_) => "value_serializer",
        RejectReason::InvalidTopic { .. } => "invalid_topic",
        RejectReason::PacketTooLarge { .. } => "packet_too_large",
        RejectReason::RetainNotSupported => "retain_not_supported",
        RejectReason::InvalidProperties(_) => "invalid_properties",
        RejectReason::Broker { .. } => "broker_reason_code",
        RejectReason::DeadLetterFailed(_) => "dead_letter_failed",
        RejectReason::Poison { .. } => "poison",
        _ => "other",
    }
}

impl Metrics {
    /// Counts one event of the sink.
    pub(crate) fn observe(&self, e: &Event) {
        let bump = |m: &Mutex<BTreeMap<&'static str, u64>>, k: &'static str| {
            if let Ok(mut m) = m.lock() {
                *m.entry(k).or_insert(0) += 1;
            }
        };
        match e {
            Event::RecordAcknowledged(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Event::RecordRejected { reason, .. } => bump(&self.rejected, reason_label(reason)),
            Event::DeadLetter { .. } => {
                self.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Event::Connected(_) => {
                self.connects.fetch_add(1, Ordering::Relaxed);
                self.connected.store(true, Ordering::Relaxed);
            }
            Event::ConnectFailed(_) => {
                self.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            Event::ConnectionLost(_) => {
                self.connection_losses.fetch_add(1, Ordering::Relaxed);
                self.connected.store(false, Ordering::Relaxed);
            }
            Event::Closed => self.connected.store(false, Ordering::Relaxed),
            Event::FlushCompleted { .. } => bump(&self.flushes, "completed"),
            Event::FlushFailed { .. } => bump(&self.flushes, "failed"),
            Event::FlushTimedOut { .. } => bump(&self.flushes, "timed_out"),
            _ => {}
        }
    }

    /// A Kafka client (no group) used at scrape time to read high watermarks for the lag.
    pub(crate) fn attach_watermarks(&self, kafka: &mqtt_sink_core::KafkaConfig) {
        let mut cc = rdkafka::config::ClientConfig::new();
        for (k, v) in &kafka.properties {
            if !k.starts_with("group.")
                && !k.starts_with("partition.assignment")
                && !k.contains("session")
                && !k.contains("heartbeat")
                && !k.contains("offset")
            {
                cc.set(k, v);
            }
        }
        cc.set("bootstrap.servers", &kafka.brokers);
        if let (Ok(c), Ok(mut w)) = (cc.create(), self.watermarks.lock()) {
            *w = Some(c);
        }
    }

    /// Reads the bridge's and the sink's stats from now on.
    pub(crate) fn attach(
        &self,
        stats: StatsHandle,
        sink: impl Fn() -> Option<mqtt_sink_core::Stats> + Send + Sync + 'static,
    ) {
        if let Ok(mut s) = self.stats.lock() {
            *s = Some(stats);
        }
        if let Ok(mut s) = self.sink.lock() {
            *s = Some(Box::new(sink));
        }
    }

    /// Connected to the MQTT broker and assigned partitions by Kafka.
    fn ready(&self) -> bool {
        let assigned = self
            .stats
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|h| h.snapshot().assigned))
            .unwrap_or(0);
        self.connected.load(Ordering::Relaxed) && assigned > 0
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut o = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let stats = self
            .stats
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(StatsHandle::snapshot))
            .unwrap_or_default();
        counter(
            "mqtt_sink_records_consumed_total",
            "Records consumed from Kafka.",
            stats.consumed,
        );
        counter(
            "mqtt_sink_records_filtered_total",
            "Records dropped by the transform.",
            stats.filtered,
        );
        counter(
            "mqtt_sink_records_acknowledged_total",
            "Records acknowledged by the MQTT broker.",
            self.acknowledged.load(Ordering::Relaxed),
        );
        counter(
            "mqtt_sink_dead_letters_total",
            "Records sent to the dead-letter topic.",
            self.dead_lettered.load(Ordering::Relaxed),
        );
        counter(
            "mqtt_sink_connects_total",
            "Successful MQTT connections (CONNACK).",
            self.connects.load(Ordering::Relaxed),
        );
        counter(
            "mqtt_sink_connect_failures_total",
            "Failed MQTT connection attempts.",
            self.connect_failures.load(Ordering::Relaxed),
        );
        counter(
            "mqtt_sink_reconnects_total",
            "MQTT connections lost (each followed by a reconnect).",
            self.connection_losses.load(Ordering::Relaxed),
        );
        counter(
            "mqtt_sink_commits_total",
            "Kafka commits accepted.",
            stats.commits,
        );
        counter(
            "mqtt_sink_commit_errors_total",
            "Kafka commits refused.",
            stats.commit_errors,
        );
        counter(
            "mqtt_sink_rewinds_total",
            "Checkpoints that failed and rewound.",
            stats.rewinds,
        );
        counter(
            "mqtt_sink_kafka_errors_total",
            "Kafka consumer errors.",
            stats.kafka_errors,
        );
        let _ = writeln!(o, "# HELP mqtt_sink_records_rejected_total Records the sink could not deliver, by reason.\n# TYPE mqtt_sink_records_rejected_total counter");
        if let Ok(m) = self.rejected.lock() {
            for (k, v) in m.iter() {
                let _ = writeln!(o, "mqtt_sink_records_rejected_total{{reason=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(o, "# HELP mqtt_sink_flushes_total Checkpoint flushes, by outcome.\n# TYPE mqtt_sink_flushes_total counter");
        if let Ok(m) = self.flushes.lock() {
            for (k, v) in m.iter() {
                let _ = writeln!(o, "mqtt_sink_flushes_total{{outcome=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(o, "# HELP mqtt_sink_committed_offset Last committed position per partition.\n# TYPE mqtt_sink_committed_offset gauge");
        for (tp, off) in &stats.committed {
            let _ = writeln!(
                o,
                "mqtt_sink_committed_offset{{topic=\"{}\",partition=\"{}\"}} {off}",
                tp.topic, tp.partition
            );
        }
        let _ = writeln!(o, "# HELP mqtt_sink_consumer_lag Records between the committed position and the high watermark.\n# TYPE mqtt_sink_consumer_lag gauge");
        let lag = self
            .watermarks
            .lock()
            .ok()
            .and_then(|w| {
                w.as_ref()
                    .map(|c| mqtt_sink_kafka::lag(c, &stats.committed))
            })
            .unwrap_or_default();
        for (tp, lag) in &lag {
            let _ = writeln!(
                o,
                "mqtt_sink_consumer_lag{{topic=\"{}\",partition=\"{}\"}} {lag}",
                tp.topic, tp.partition
            );
        }
        let _ = writeln!(
            o,
            "# HELP mqtt_sink_last_flush_seconds Duration of the last checkpoint flush.\n# TYPE mqtt_sink_last_flush_seconds gauge\nmqtt_sink_last_flush_seconds {}",
            stats.last_flush_ms as f64 / 1000.0
        );
        let sink = self
            .sink
            .lock()
            .ok()
            .and_then(|f| f.as_ref().and_then(|f| f()));
        if let Some(st) = sink {
            let _ = writeln!(o, "# HELP mqtt_sink_inflight QoS 1/2 publishes awaiting acknowledgement.\n# TYPE mqtt_sink_inflight gauge\nmqtt_sink_inflight {}", st.inflight);
            let _ = writeln!(o, "# HELP mqtt_sink_buffered_records Records held by the sink (queued or in flight).\n# TYPE mqtt_sink_buffered_records gauge\nmqtt_sink_buffered_records {}", st.buffered_records);
            let _ = writeln!(o, "# HELP mqtt_sink_buffered_bytes Bytes held by the sink.\n# TYPE mqtt_sink_buffered_bytes gauge\nmqtt_sink_buffered_bytes {}", st.buffered_bytes);
            let _ = writeln!(o, "# HELP mqtt_sink_records_published_total Records handed to the broker connection.\n# TYPE mqtt_sink_records_published_total counter\nmqtt_sink_records_published_total {}", st.pushed);
        }
        let _ = writeln!(
            o,
            "# HELP mqtt_sink_mqtt_connected 1 while connected to the MQTT broker.\n# TYPE mqtt_sink_mqtt_connected gauge\nmqtt_sink_mqtt_connected {}\n# HELP mqtt_sink_assigned_partitions Kafka partitions assigned to this instance.\n# TYPE mqtt_sink_assigned_partitions gauge\nmqtt_sink_assigned_partitions {}",
            u8::from(self.connected.load(Ordering::Relaxed)),
            stats.assigned
        );
        o
    }
}

/// Serves the endpoints on `listen` from a background thread.
pub(crate) fn serve(listen: &str, metrics: Arc<Metrics>) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .map_err(|e| format!("http.listen = {listen:?}: cannot listen: {e}"))?;
    std::thread::Builder::new()
        .name("mqtt-sink-http".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(&conn);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Drain the headers.
                let mut h = String::new();
                while reader.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                    h.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/readyz" if metrics.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                    "/readyz" => (
                        "503 Service Unavailable",
                        "text/plain",
                        "not ready: waiting for the MQTT broker (CONNACK) or a Kafka assignment\n".to_string(),
                    ),
                    _ => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
                };
                let mut w = &conn;
                let _ = write!(
                    w,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| format!("cannot start the http thread: {e}"))?;
    Ok(())
}
