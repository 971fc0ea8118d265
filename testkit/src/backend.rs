//! The brokers a suite runs against, chosen by environment, behind one interface each.
//!
//! | variable | values | default |
//! |---|---|---|
//! | `TESTKIT_MQTT` | `mosquitto` (a process), `external`, `container` | `mosquitto` |
//! | `TESTKIT_MQTT_ADDR` | `host:port` of the external broker | |
//! | `TESTKIT_MOSQUITTO_IMAGE` | image for `container` | `eclipse-mosquitto:2.0.18` |
//! | `TESTKIT_KAFKA` | `mock` (MockCluster), `tansu` (a process), `external`, `container` | `mock` |
//! | `TESTKIT_KAFKA_BOOTSTRAP` | `bootstrap.servers` of the external cluster | |
//! | `TESTKIT_TANSU_BIN` | the `tansu` binary | `tansu` on `PATH`, then `~/.cargo/bin/tansu` |
//! | `TESTKIT_KAFKA_IMAGE` | image for `container` (`apache/kafka…` or a Tansu image) | `apache/kafka:3.8.0` |
//!
//! (Not `MQTT_SINK_…`: the daemon reads that prefix as its own configuration.)
//!
//! A backend that cannot run here (no Docker engine answers, an image cannot be had, no
//! `tansu` binary) is [`Unavailable`]: the test says it skipped and why. A backend that
//! starts and then misbehaves is a failure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext};
use testcontainers::core::{ContainerPort, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

use crate::kafka::{
    classic_group_properties, committed_offsets, fast_group_properties, produce_all,
};
use crate::mosquitto::{free_port, Mosquitto, MosquittoOptions};

/// Why a backend cannot run on this machine (the test skips and prints this).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Starting a backend failed: it cannot run here, or it broke.
#[derive(Debug)]
pub enum StartError {
    /// Not available here: skip, saying why.
    Unavailable(Unavailable),
    /// Available but broken: fail.
    Failed(String),
}

impl From<String> for StartError {
    fn from(s: String) -> Self {
        StartError::Failed(s)
    }
}

/// Returns the backend, or prints why the test skipped and returns from the test.
#[macro_export]
macro_rules! or_skip {
    ($start:expr) => {
        match $start {
            Ok(b) => b,
            Err($crate::backend::StartError::Unavailable(why)) => {
                eprintln!("SKIPPED: {why}");
                return;
            }
            Err($crate::backend::StartError::Failed(e)) => panic!("{e}"),
        }
    };
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether a Docker engine answers (`docker info`), or why not.
pub fn docker_available() -> Result<(), Unavailable> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(Unavailable(format!(
            "no Docker engine answers `docker info`: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(Unavailable(format!("no `docker` command ({e})"))),
    }
}

fn split_image(image: &str) -> (String, String) {
    match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n.to_string(), t.to_string()),
        _ => (image.to_string(), "latest".to_string()),
    }
}

/// A container start error: a missing image that cannot be pulled is [`Unavailable`].
fn container_error(image: &str, e: testcontainers::TestcontainersError) -> StartError {
    let msg = e.to_string();
    let local = Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if local {
        StartError::Failed(format!("container {image}: {msg}"))
    } else {
        StartError::Unavailable(Unavailable(format!(
            "image {image} is not on this machine and could not be pulled ({msg}); \
             build a local one with testkit/images/build.sh and name it in the image variable"
        )))
    }
}

// ---------------------------------------------------------------------------------------
// MQTT

enum MqttKind {
    Process(Mosquitto),
    External,
    Container {
        container: Box<Container<GenericImage>>,
        image: String,
    },
}

/// The MQTT broker of a run.
pub struct MqttBroker {
    kind: MqttKind,
    /// Host the sink and subscribers connect to.
    pub host: String,
    /// Port the sink and subscribers connect to.
    pub port: u16,
}

impl std::fmt::Debug for MqttBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl MqttBroker {
    /// The broker `TESTKIT_MQTT` names, with persistence on where the backend can.
    pub fn from_env() -> Result<Self, StartError> {
        match env("TESTKIT_MQTT").as_deref().unwrap_or("mosquitto") {
            "mosquitto" | "process" => Self::process(),
            "external" => {
                let addr = env("TESTKIT_MQTT_ADDR").ok_or_else(|| {
                    StartError::Failed(
                        "TESTKIT_MQTT=external needs TESTKIT_MQTT_ADDR=host:port".into(),
                    )
                })?;
                Self::external(&addr)
            }
            "container" => Self::container(
                &env("TESTKIT_MOSQUITTO_IMAGE")
                    .unwrap_or_else(|| "eclipse-mosquitto:2.0.18".into()),
            ),
            other => Err(StartError::Failed(format!(
                "TESTKIT_MQTT={other}: use mosquitto, external or container"
            ))),
        }
    }

    /// A Mosquitto process on 127.0.0.1 with persistence.
    pub fn process() -> Result<Self, StartError> {
        let m = Mosquitto::start(MosquittoOptions {
            persistence: true,
            ..Default::default()
        })
        .map_err(|e| {
            if e.contains("cannot start mosquitto") {
                StartError::Unavailable(Unavailable(e))
            } else {
                StartError::Failed(e)
            }
        })?;
        Ok(Self {
            port: m.port,
            host: "127.0.0.1".into(),
            kind: MqttKind::Process(m),
        })
    }

    /// A broker someone else runs (`host:port`, no TLS, anonymous).
    pub fn external(addr: &str) -> Result<Self, StartError> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
            .ok_or_else(|| {
                StartError::Failed(format!("TESTKIT_MQTT_ADDR={addr}: expected host:port"))
            })?;
        Ok(Self {
            kind: MqttKind::External,
            host,
            port,
        })
    }

    /// A Mosquitto container from `image` (the public `eclipse-mosquitto`, or a local one
    /// from `testkit/images/build.sh mosquitto`), persistence on, published on a fixed
    /// 127.0.0.1 port so that a restart keeps the address.
    pub fn container(image: &str) -> Result<Self, StartError> {
        docker_available().map_err(StartError::Unavailable)?;
        let port = free_port();
        let (name, tag) = split_image(image);
        let conf = "listener 1883 0.0.0.0\nallow_anonymous true\nlog_dest stderr\n\
                    log_type all\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                    persistence true\npersistence_location /mosquitto/data/\n";
        let container = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::message_on_stderr(" running"))
            .with_copy_to("/mosquitto/config/mosquitto.conf", conf.as_bytes().to_vec())
            .with_mapped_port(port, ContainerPort::Tcp(1883))
            .with_startup_timeout(Duration::from_secs(60))
            .start()
            .map_err(|e| container_error(image, e))?;
        Ok(Self {
            kind: MqttKind::Container {
                container: Box::new(container),
                image: image.to_string(),
            },
            host: "127.0.0.1".into(),
            port,
        })
    }

    /// What it is, for messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            MqttKind::Process(_) => format!("mosquitto process on 127.0.0.1:{}", self.port),
            MqttKind::External => format!("external MQTT broker {}:{}", self.host, self.port),
            MqttKind::Container { image, .. } => {
                format!("container {image} on 127.0.0.1:{}", self.port)
            }
        }
    }

    /// Whether [`MqttBroker::kill_and_restart`] can be done (not on an external broker).
    pub fn can_restart(&self) -> bool {
        !matches!(self.kind, MqttKind::External)
    }

    /// Kills the broker hard (SIGKILL) and starts it again on the same address with its
    /// persisted state.
    pub fn kill_and_restart(&mut self) -> Result<(), String> {
        match &mut self.kind {
            MqttKind::Process(m) => m.restart(),
            MqttKind::External => Err("an external broker cannot be restarted".into()),
            MqttKind::Container { container, image } => {
                kill_and_start(container, image)?;
                wait_for_tcp(&self.host, self.port, Duration::from_secs(30))
            }
        }
    }
}

/// Kills a container hard (Docker sends SIGKILL at once with a zero timeout) and starts it
/// again with its filesystem and published ports.
fn kill_and_start(container: &Container<GenericImage>, image: &str) -> Result<(), String> {
    container
        .stop_with_timeout(Some(0))
        .map_err(|e| format!("stop {image}: {e}"))?;
    container.start().map_err(|e| format!("start {image}: {e}"))
}

fn wait_for_tcp(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect((host, port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{host}:{port} did not accept within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50)); // polling a port, bounded above
    }
}

// ---------------------------------------------------------------------------------------
// Kafka

/// A Tansu broker process (sqlite storage in its own directory) on 127.0.0.1.
pub struct Tansu {
    child: Option<Child>,
    /// Its Kafka port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl std::fmt::Debug for Tansu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tansu on 127.0.0.1:{} ({})",
            self.port,
            self.dir.display()
        )
    }
}

/// The `tansu` binary this machine has, or why not.
pub fn tansu_binary() -> Result<PathBuf, Unavailable> {
    let candidates: Vec<PathBuf> = env("TESTKIT_TANSU_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("tansu"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")))
        .collect();
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Unavailable(
            "no tansu binary: `cargo install tansu --version 0.6.0 --features libsql` \
                 (or set TESTKIT_TANSU_BIN)"
                .into(),
        )
    })
}

impl Tansu {
    /// Starts Tansu with sqlite storage in a fresh directory and waits (at most 30 s) until
    /// it answers a metadata request.
    pub fn start() -> Result<Self, StartError> {
        let bin = tansu_binary().map_err(StartError::Unavailable)?;
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("mqtt-sink-tansu-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut t = Self {
            child: None,
            port,
            dir,
            bin,
        };
        t.spawn()?;
        Ok(t)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .map_err(|e| format!("tansu log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("tansu log: {e}"))?;
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let bootstrap = format!("127.0.0.1:{}", self.port);
        wait_for_metadata(&bootstrap, Duration::from_secs(30)).map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default();
            format!("tansu did not answer: {e}\n{log}")
        })
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it hard and starts it again on the same port with the same storage.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_metadata(bootstrap: &str, timeout: Duration) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.fetch_metadata(None, Duration::from_secs(2)) {
            Ok(m) if !m.brokers().is_empty() => return Ok(()),
            Ok(_) => {}
            Err(e) if Instant::now() > deadline => return Err(format!("{bootstrap}: {e}")),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Err(format!("{bootstrap}: no brokers in metadata"));
        }
    }
}

enum KafkaKind {
    Mock(MockCluster<'static, DefaultProducerContext>),
    Tansu(Tansu),
    External,
    Container {
        container: Box<Container<GenericImage>>,
        image: String,
    },
}

/// The Kafka cluster of a run, with a producer and an admin view.
pub struct KafkaCluster {
    kind: KafkaKind,
    bootstrap: String,
    producer: BaseProducer,
}

impl std::fmt::Debug for KafkaCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KafkaCluster {
    /// The cluster `TESTKIT_KAFKA` names.
    pub fn from_env() -> Result<Self, StartError> {
        match env("TESTKIT_KAFKA").as_deref().unwrap_or("mock") {
            "mock" => Self::mock(),
            "tansu" => Self::tansu(),
            "external" => {
                let b = env("TESTKIT_KAFKA_BOOTSTRAP").ok_or_else(|| {
                    StartError::Failed(
                        "TESTKIT_KAFKA=external needs TESTKIT_KAFKA_BOOTSTRAP".into(),
                    )
                })?;
                Self::with(KafkaKind::External, b)
            }
            "container" => Self::container(
                &env("TESTKIT_KAFKA_IMAGE").unwrap_or_else(|| "apache/kafka:3.8.0".into()),
            ),
            other => Err(StartError::Failed(format!(
                "TESTKIT_KAFKA={other}: use mock, tansu, external or container"
            ))),
        }
    }

    /// rdkafka's in-process MockCluster (one broker).
    pub fn mock() -> Result<Self, StartError> {
        let cluster = MockCluster::new(1).map_err(|e| format!("MockCluster: {e}"))?;
        let b = cluster.bootstrap_servers();
        Self::with(KafkaKind::Mock(cluster), b)
    }

    /// A Tansu process with sqlite storage.
    pub fn tansu() -> Result<Self, StartError> {
        let t = Tansu::start()?;
        let b = format!("127.0.0.1:{}", t.port);
        Self::with(KafkaKind::Tansu(t), b)
    }

    /// A Kafka-compatible broker in a container: `apache/kafka…` (configured as the
    /// public image expects) or an image whose entrypoint is `tansu` (from
    /// `testkit/images/build.sh tansu`). Published on a fixed 127.0.0.1 port, advertised
    /// as such, so that a restart keeps the address.
    pub fn container(image: &str) -> Result<Self, StartError> {
        docker_available().map_err(StartError::Unavailable)?;
        let port = free_port();
        let (name, tag) = split_image(image);
        let url = format!("tcp://127.0.0.1:{port}");
        let req = if name.contains("tansu") {
            GenericImage::new(name, tag)
                .with_wait_for(WaitFor::seconds(0))
                .with_cmd([
                    "broker",
                    "--listener-url",
                    "tcp://0.0.0.0:9092",
                    "--advertised-listener-url",
                    &url,
                    "--storage-engine",
                    "sqlite://data/tansu.db",
                ])
                .with_mapped_port(port, ContainerPort::Tcp(9092))
        } else {
            // The public apache/kafka image in KRaft mode, one node, advertised on the
            // host port.
            let mut req = GenericImage::new(name, tag)
                .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
                .with_mapped_port(port, ContainerPort::Tcp(9092));
            for (k, v) in [
                ("KAFKA_NODE_ID", "1".to_string()),
                ("KAFKA_PROCESS_ROLES", "broker,controller".into()),
                (
                    "KAFKA_LISTENERS",
                    "PLAINTEXT://0.0.0.0:9092,CONTROLLER://0.0.0.0:9093".into(),
                ),
                (
                    "KAFKA_ADVERTISED_LISTENERS",
                    format!("PLAINTEXT://127.0.0.1:{port}"),
                ),
                ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER".into()),
                (
                    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                    "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".into(),
                ),
                ("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093".into()),
                ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1".into()),
                ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1".into()),
                ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1".into()),
                ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0".into()),
            ] {
                req = req.with_env_var(k, v);
            }
            req
        };
        let container = req
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .map_err(|e| container_error(image, e))?;
        let bootstrap = format!("127.0.0.1:{port}");
        wait_for_metadata(&bootstrap, Duration::from_secs(60))?;
        Self::with(
            KafkaKind::Container {
                container: Box::new(container),
                image: image.to_string(),
            },
            bootstrap,
        )
    }

    fn with(kind: KafkaKind, bootstrap: String) -> Result<Self, StartError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "120000")
            .create()
            .map_err(|e| format!("producer for {bootstrap}: {e}"))?;
        Ok(Self {
            kind,
            bootstrap,
            producer,
        })
    }

    /// What it is, for messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            KafkaKind::Mock(_) => format!("MockCluster at {}", self.bootstrap),
            KafkaKind::Tansu(_) => format!("tansu process at {}", self.bootstrap),
            KafkaKind::External => format!("external Kafka at {}", self.bootstrap),
            KafkaKind::Container { image, .. } => {
                format!("container {image} at {}", self.bootstrap)
            }
        }
    }

    /// `bootstrap.servers` for clients.
    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// Consumer properties for a group on this cluster: the KIP-848 protocol on the mock
    /// (fast joins), the classic protocol (range) elsewhere.
    pub fn group_properties(&self) -> BTreeMap<String, String> {
        match self.kind {
            KafkaKind::Mock(_) => fast_group_properties(),
            _ => classic_group_properties("range"),
        }
    }

    /// Whether the broker is Tansu (process, or a container image named `…tansu…`).
    pub fn is_tansu(&self) -> bool {
        match &self.kind {
            KafkaKind::Tansu(_) => true,
            KafkaKind::Container { image, .. } => image.contains("tansu"),
            _ => false,
        }
    }

    /// Whether [`KafkaCluster::kill_and_restart`] can be done (Tansu process, container).
    pub fn can_restart(&self) -> bool {
        matches!(self.kind, KafkaKind::Tansu(_) | KafkaKind::Container { .. })
    }

    /// Kills the broker hard and starts it again on the same address with its storage.
    pub fn kill_and_restart(&mut self) -> Result<(), String> {
        match &mut self.kind {
            KafkaKind::Tansu(t) => t.restart(),
            KafkaKind::Container { container, image } => {
                kill_and_start(container, image)?;
                wait_for_metadata(&self.bootstrap, Duration::from_secs(60))
            }
            _ => Err(format!("{} cannot be restarted", self.describe())),
        }
    }

    /// Creates a topic and waits until its metadata shows every partition.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        match &self.kind {
            KafkaKind::Mock(c) => c
                .create_topic(name, partitions, 1)
                .map_err(|e| format!("create topic {name}: {e}"))?,
            _ => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.bootstrap)
                    .create()
                    .map_err(|e| format!("admin client: {e}"))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("runtime: {e}"))?;
                let res = rt
                    .block_on(admin.create_topics(
                        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
                    ))
                    .map_err(|e| format!("create topic {name}: {e}"))?;
                for r in res {
                    r.map_err(|(t, e)| format!("create topic {t}: {e}"))?;
                }
            }
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .map_err(|e| format!("consumer: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = consumer.fetch_metadata(Some(name), Duration::from_secs(5)) {
                if m.topics()
                    .iter()
                    .any(|t| t.name() == name && t.partitions().len() == partitions as usize)
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("topic {name} not visible within 30 s"));
            }
        }
    }

    /// Produces keyed records to explicit partitions and waits for every ack.
    pub fn produce(&self, topic: &str, records: &[(i32, String, String)]) -> Result<(), String> {
        produce_all(&self.producer, topic, records)
    }

    /// The group's committed positions for `topic`'s partitions (None: nothing committed).
    pub fn committed(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<Option<i64>>, String> {
        committed_offsets(&self.bootstrap, group, topic, partitions)
    }

    /// The log end offsets of `topic`'s partitions.
    pub fn end_offsets(&self, topic: &str, partitions: i32) -> Result<Vec<i64>, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .map_err(|e| format!("consumer: {e}"))?;
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(_, hi)| hi)
                    .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))
            })
            .collect()
    }
}
