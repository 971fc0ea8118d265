//! Operations endpoints on `[http] listen`: `/metrics` (OpenMetrics text, by
//! `prometheus-client`), `/healthz` (the process serves) and `/readyz` (connected to the MQTT
//! broker and a member of the Kafka group, with or without partitions).
//!
//! The server is hyper 1 with axum routing on a thread and tokio runtime of its own, so it
//! answers whatever the sink's runtime is doing: each connection is a task (a slow client
//! holds only its own), a request's head must arrive within [`HEADER_TIMEOUT`] and fit in
//! [`MAX_REQUEST_HEAD`] bytes, a connection lasts at most [`CONNECTION_DEADLINE`], and at
//! most [`MAX_CONNECTIONS`] are served at once (more are closed at once). `/metrics` is
//! rendered off the server's runtime, and the consumer lag (one Kafka request per
//! partition) is computed every [`LAG_INTERVAL`] by a thread of its own and served from the
//! last value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mqtt_sink_core::{BridgeStats, CommitOffsets, Event, RejectReason};
use mqtt_sink_kafka::StatsHandle;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// How long a client may take to send a request's line and headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a request's line and headers may take (hyper's read buffer; larger requests are
/// refused).
pub(crate) const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// The longest a connection is served, keep-alive included.
pub(crate) const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How often the consumer lag is read from Kafka.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// The longest `/metrics` waits for the sink's own numbers.
const RENDER_TIMEOUT: Duration = Duration::from_secs(2);

type SinkStatsFn = Box<dyn Fn() -> Option<mqtt_sink_core::Stats> + Send + Sync>;
type Label = [(&'static str, &'static str); 1];

/// What the scrape reads besides the event counters: the bridge's and the sink's stats, the
/// last consumer lag, the connection state.
#[derive(Default)]
struct Shared {
    /// MQTT connections up (of `mqtt.connections`).
    connected: AtomicU64,
    /// The broker address of the last connection (one of `servers` when several).
    server: Mutex<String>,
    stats: Mutex<Option<StatsHandle>>,
    sink: Mutex<Option<SinkStatsFn>>,
    lag: Mutex<CommitOffsets>,
}

impl Shared {
    fn snapshot(&self) -> BridgeStats {
        self.stats
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(StatsHandle::snapshot))
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The daemon's metrics: counters fed by the sink's events, and the rest read at scrape
/// time.
pub(crate) struct Metrics {
    registry: Registry,
    shared: Arc<Shared>,
    acknowledged: Counter,
    dead_lettered: Counter,
    connects: Counter,
    connect_failures: Counter,
    connection_losses: Counter,
    rejected: Family<Label, Counter>,
    flushes: Family<Label, Counter>,
}

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
        RejectReason::Transform(_) => "transform",
        _ => "other",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let shared = Arc::new(Shared::default());
        let m = Self {
            shared: shared.clone(),
            acknowledged: Counter::default(),
            dead_lettered: Counter::default(),
            connects: Counter::default(),
            connect_failures: Counter::default(),
            connection_losses: Counter::default(),
            rejected: Family::default(),
            flushes: Family::default(),
            registry: Registry::default(),
        };
        let counters = [
            (
                "mqtt_sink_records_acknowledged",
                "Records acknowledged by the MQTT broker.",
                &m.acknowledged,
            ),
            (
                "mqtt_sink_dead_letters",
                "Records sent to the dead-letter topic.",
                &m.dead_lettered,
            ),
            (
                "mqtt_sink_connects",
                "Successful MQTT connections (CONNACK).",
                &m.connects,
            ),
            (
                "mqtt_sink_connect_failures",
                "Failed MQTT connection attempts.",
                &m.connect_failures,
            ),
            (
                "mqtt_sink_reconnects",
                "MQTT connections lost (each followed by a reconnect).",
                &m.connection_losses,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "mqtt_sink_records_rejected",
            "Records the sink could not deliver, by reason.",
            m.rejected.clone(),
        );
        registry.register(
            "mqtt_sink_flushes",
            "Checkpoint flushes, by outcome.",
            m.flushes.clone(),
        );
        registry.register_collector(Box::new(Scraped(shared)));
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts one event of the sink.
    pub(crate) fn observe(&self, e: &Event) {
        let connected = &self.shared.connected;
        match e {
            Event::RecordAcknowledged(_) => _ = self.acknowledged.inc(),
            Event::RecordRejected { reason, .. } => {
                _ = self
                    .rejected
                    .get_or_create(&[("reason", reason_label(reason))])
                    .inc();
            }
            Event::DeadLetter { .. } => _ = self.dead_lettered.inc(),
            Event::Connected(c) => {
                self.connects.inc();
                if let Ok(mut s) = self.shared.server.lock() {
                    s.clone_from(&c.server);
                }
                connected.fetch_add(1, Ordering::Relaxed);
            }
            Event::ConnectFailed(_) => _ = self.connect_failures.inc(),
            Event::ConnectionLost(_) => {
                self.connection_losses.inc();
                let down = |n: u64| Some(n.saturating_sub(1));
                let _ = connected.fetch_update(Ordering::Relaxed, Ordering::Relaxed, down);
            }
            Event::Closed => connected.store(0, Ordering::Relaxed),
            Event::FlushCompleted { .. } => self.flush("completed"),
            Event::FlushFailed { .. } => self.flush("failed"),
            Event::FlushTimedOut { .. } => self.flush("timed_out"),
            _ => {}
        }
    }

    fn flush(&self, outcome: &'static str) {
        self.flushes.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Reads the consumer lag every [`LAG_INTERVAL`] from now on, with a Kafka client of its
    /// own (no group), on a thread of its own: a scrape never waits on Kafka.
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
        let consumer: rdkafka::consumer::BaseConsumer = match cc.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("consumer lag will not be reported: {e}");
                return;
            }
        };
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mqtt-sink-lag".into())
            .spawn(move || loop {
                let committed = shared.snapshot().committed;
                let lag = mqtt_sink_kafka::lag(&consumer, &committed);
                if let Ok(mut l) = shared.lag.lock() {
                    *l = lag;
                }
                // A periodic refresh for the life of the process.
                std::thread::sleep(LAG_INTERVAL);
            });
        if let Err(e) = spawned {
            tracing::warn!("consumer lag will not be reported: {e}");
        }
    }

    /// Reads the bridge's and the sink's stats from now on.
    pub(crate) fn attach(
        &self,
        stats: StatsHandle,
        sink: impl Fn() -> Option<mqtt_sink_core::Stats> + Send + Sync + 'static,
    ) {
        if let Ok(mut s) = self.shared.stats.lock() {
            *s = Some(stats);
        }
        if let Ok(mut s) = self.shared.sink.lock() {
            *s = Some(Box::new(sink));
        }
    }

    /// Connected to the MQTT broker and a member of the Kafka group, with or without
    /// partitions (more replicas than partitions is normal).
    pub(crate) fn ready(&self) -> bool {
        let stats = self.shared.snapshot();
        self.shared.connected.load(Ordering::Relaxed) > 0 && (stats.member || stats.assigned > 0)
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn render(&self) -> String {
        let mut o = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut o, &self.registry) {
            tracing::warn!("cannot encode the metrics: {e}");
        }
        o
    }
}

/// What is read at scrape time: the bridge's counts, the sink's state, and the committed
/// position and last lag of each partition this instance owns now (a revoked partition's
/// series go away).
#[derive(Debug)]
struct Scraped(Arc<Shared>);

impl Collector for Scraped {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.0.snapshot();
        let sink = self
            .0
            .sink
            .lock()
            .ok()
            .and_then(|f| f.as_ref().and_then(|f| f()));
        let counters = [
            (
                "mqtt_sink_records_consumed",
                "Records consumed from Kafka.",
                stats.consumed,
            ),
            (
                // The bridge's Rust transform and the sink's jq `transform` alike.
                "mqtt_sink_records_filtered",
                "Records a transform turned into no publish (their offsets pass).",
                stats.filtered + sink.as_ref().map_or(0, |s| s.filtered),
            ),
            (
                "mqtt_sink_commits",
                "Kafka commits accepted.",
                stats.commits,
            ),
            (
                "mqtt_sink_commit_errors",
                "Kafka commits refused.",
                stats.commit_errors,
            ),
            (
                "mqtt_sink_rewinds",
                "Checkpoints that failed and rewound.",
                stats.rewinds,
            ),
            (
                "mqtt_sink_kafka_errors",
                "Kafka consumer errors.",
                stats.kafka_errors,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        // The address as a label: which of `servers` is (or was last) in use.
        let server = self.0.server.lock().map(|s| s.clone()).unwrap_or_default();
        let up = self.0.connected.load(Ordering::Relaxed);
        let connected = ConstGauge::new(i64::try_from(up).unwrap_or(i64::MAX));
        let mut family = enc.encode_descriptor(
            "mqtt_sink_mqtt_connected",
            "MQTT connections up (1 while connected with mqtt.connections = 1) to the broker at the server label (the last one connected; no label before the first connection).",
            None,
            connected.metric_type(),
        )?;
        if server.is_empty() {
            connected.encode(family)?; // never connected yet: no address to name
        } else {
            connected.encode(family.encode_family(&[("server", server.as_str())])?)?;
        }
        let mut gauges = vec![(
            "mqtt_sink_assigned_partitions",
            "Kafka partitions assigned to this instance.",
            i64::try_from(stats.assigned).unwrap_or(i64::MAX),
        )];
        if let Some(st) = &sink {
            let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            gauges.extend([
                (
                    "mqtt_sink_inflight",
                    "QoS 1/2 publishes awaiting acknowledgement.",
                    n(st.inflight),
                ),
                (
                    "mqtt_sink_buffered_records",
                    "Records held by the sink (queued or in flight).",
                    n(st.buffered_records),
                ),
                (
                    "mqtt_sink_buffered_bytes",
                    "Bytes held by the sink.",
                    n(st.buffered_bytes),
                ),
            ]);
        }
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        if let Some(st) = &sink {
            for (name, help, v) in [
                (
                    "mqtt_sink_records_published",
                    "Records handed to the broker connection.",
                    st.pushed - st.tombstones_skipped - st.filtered,
                ),
                (
                    "mqtt_sink_publishes_fanned_out",
                    "Publishes beyond the first of records the transform fanned out.",
                    st.fanned_out,
                ),
                (
                    "mqtt_sink_tombstones_skipped",
                    "Kafka tombstones not published (tombstone = \"skip\").",
                    st.tombstones_skipped,
                ),
            ] {
                let c = ConstCounter::new(v);
                c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
        }
        let g = ConstGauge::new(stats.last_flush_ms as f64 / 1000.0);
        g.encode(enc.encode_descriptor(
            "mqtt_sink_last_flush_seconds",
            "Duration of the last checkpoint flush.",
            None,
            g.metric_type(),
        )?)?;
        let per_partition = |enc: &mut DescriptorEncoder<'_>,
                             (name, help): (&str, &str),
                             values: &[(String, String, i64)]|
         -> Result<(), std::fmt::Error> {
            let mut family = enc.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (topic, partition, v) in values {
                let labels = [("topic", topic.as_str()), ("partition", partition.as_str())];
                ConstGauge::new(*v).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        };
        let owned = |offsets: &CommitOffsets| -> Vec<(String, String, i64)> {
            offsets
                .iter()
                .filter(|(tp, _)| stats.committed.iter().any(|(c, _)| c == tp))
                .map(|(tp, v)| (tp.topic.to_string(), tp.partition.to_string(), *v))
                .collect()
        };
        per_partition(
            &mut enc,
            (
                "mqtt_sink_committed_offset",
                "Last committed position per partition.",
            ),
            &owned(&stats.committed),
        )?;
        let lag = self.0.lag.lock().map(|l| l.clone()).unwrap_or_default();
        per_partition(
            &mut enc,
            (
                "mqtt_sink_consumer_lag",
                "Records between the committed position and the high watermark (read every 5 s).",
            ),
            &owned(&lag),
        )
    }
}

/// Serves the endpoints on `listen` from a thread and tokio runtime of their own.
pub(crate) fn serve(listen: &str, metrics: Arc<Metrics>) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("http.listen = {listen:?}: cannot listen: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the http runtime: {e}"))?;
    std::thread::Builder::new()
        .name("mqtt-sink-http".into())
        .spawn(move || rt.block_on(accept(listener, metrics)))
        .map_err(|e| format!("cannot start the http thread: {e}"))?;
    Ok(())
}

async fn accept(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!("http: {e}"),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(metrics);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: back off a little rather than spin.
                tracing::warn!("http: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // too many connections: this one is closed at once
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
            drop(slot);
        });
    }
}

async fn metrics_page(State(m): State<Arc<Metrics>>) -> Response {
    let render = tokio::task::spawn_blocking(move || m.render());
    match tokio::time::timeout(RENDER_TIMEOUT, render).await {
        Ok(Ok(body)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the metrics could not be read in time\n",
        )
            .into_response(),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> Response {
    if m.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the MQTT broker (CONNACK) or to join the Kafka group\n",
        )
            .into_response()
    }
}

/// `mqtt-sink health`: GET `/healthz` of the daemon listening on `listen`, at most 3 s.
pub(crate) fn probe_health(listen: &str) -> Result<(), String> {
    let mut addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        format!("http.listen = {listen:?}: the endpoints are off or the address is not valid")
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/healthz");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    match agent.get(&url).call() {
        Ok(r) if r.status() == 200 => Ok(()),
        Ok(r) => Err(format!("{url} answered {}", r.status())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}
