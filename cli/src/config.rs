//! The daemon's config file: `[kafka]`, `[mqtt]` (every option of the library),
//! `[http]` and `[log]`. Any key can be overridden by `MQTT_SINK_<SECTION>_<KEY>`
//! (e.g. `MQTT_SINK_MQTT_PASSWORD`); secrets can come from files (`password_file`).
//! Errors name the key, the value and the allowed form; secrets are never shown.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use mqtt_sink_core::{
    Config as MqttConfig, ConfigError, ConfigErrors, HeaderSelection, KafkaConfig,
};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone)]
pub(crate) struct DaemonConfig {
    /// Kafka side.
    pub kafka: KafkaConfig,
    /// MQTT side (the library's config).
    pub mqtt: MqttConfig,
    /// Metrics and health endpoints.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// The tokio runtime (`--runtime tokio`).
    pub tokio: TokioConfig,
    /// What an operator should know before it runs: certificate verification off, a
    /// secret file others can read. `run` logs them at start-up, `check` prints them.
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    kafka: KafkaSection,
    mqtt: toml::Table,
    #[serde(default)]
    policy: Option<PolicySection>,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    tokio: TokioConfig,
}

/// `[policy]`: what to do with records that cannot be delivered (also accepted in `[mqtt]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    error_policy: Option<String>,
    dead_letter_topic: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaSection {
    brokers: String,
    group_id: String,
    topics: Vec<String>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    commit_interval: Duration,
    #[serde(default)]
    commit_every: Option<u64>,
    #[serde(default = "default_commit_min_interval", with = "humantime_serde")]
    commit_min_interval: Duration,
}

/// Keys with every value masked: the `[mqtt]` table holds the password, librdkafka
/// properties may hold `sasl.password`, `ssl.key.password`.
fn masked<'a>(keys: impl Iterator<Item = &'a String>) -> BTreeMap<&'a str, &'static str> {
    keys.map(|k| (k.as_str(), "***")).collect()
}

impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("kafka", &self.kafka)
            .field("mqtt", &masked(self.mqtt.keys()))
            .field("policy", &self.policy)
            .field("http", &self.http)
            .field("log", &self.log)
            .field("tokio", &self.tokio)
            .finish()
    }
}

impl std::fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props = masked(self.properties.keys());
        f.debug_struct("KafkaSection")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("properties", &props)
            .field("commit_interval", &self.commit_interval)
            .field("commit_every", &self.commit_every)
            .field("commit_min_interval", &self.commit_min_interval)
            .finish()
    }
}

fn default_commit_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_commit_min_interval() -> Duration {
    Duration::from_millis(100)
}

/// `[http]`: Prometheus `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    /// Listen address; empty disables the endpoints. Default: 127.0.0.1:9464.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

/// `[tokio]`: the runtime of `--runtime tokio`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokioConfig {
    /// Worker threads. Default: 1. One MQTT connection is one task, and one worker drives
    /// it at well over 100k records/s; a second worker mostly costs cross-thread wake-ups
    /// (about a microsecond of CPU per record at QoS 1, see BENCHMARKS.md). librdkafka
    /// decodes on its own threads either way.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

impl Default for TokioConfig {
    fn default() -> Self {
        Self {
            worker_threads: default_worker_threads(),
        }
    }
}

fn default_worker_threads() -> usize {
    1
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// "text" (default) or "json".
    #[serde(default = "default_format")]
    pub format: String,
    /// A tracing filter, e.g. "info" or "mqtt_sink=debug". Default: "info".
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: default_format(),
            level: default_level(),
        }
    }
}

fn default_format() -> String {
    "text".into()
}
fn default_level() -> String {
    "info".into()
}

/// Config errors, each naming the key.
#[derive(Debug)]
pub(crate) struct LoadError(pub Vec<String>);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

fn from_config_errors(e: ConfigErrors, prefix: &str) -> Vec<String> {
    e.with_prefix(prefix)
        .0
        .iter()
        .map(ConfigError::to_string)
        .collect()
}

/// The per-instance suffix (`mqtt.client_id_suffix`, default: process id and a nonce) is
/// added to `mqtt.client_id` here, so that `check` validates the client id `run` uses (review
/// L8: MQTT 3.1 allows 23 bytes, and `check` used to accept an id that `run` refused once
/// suffixed). The bridges are then told to add none.
fn apply_client_id_suffix(mqtt: &mut toml::Table, problems: &mut Vec<String>) {
    let suffix = match mqtt.remove("client_id_suffix") {
        None => mqtt_sink_kafka::default_client_id_suffix(),
        Some(toml::Value::String(s)) => s,
        Some(_) => {
            problems.push("mqtt.client_id_suffix: must be a string (\"\" for none)".into());
            return;
        }
    };
    let Some(toml::Value::String(id)) = mqtt.get("client_id") else {
        return; // missing or mistyped: the Config's own error says so
    };
    if suffix.is_empty() || id.is_empty() {
        return;
    }
    let full = format!("{id}-{suffix}");
    let v31 = mqtt.get("version").and_then(toml::Value::as_str) == Some("3.1");
    if v31 && full.len() > 23 && id.len() <= 23 {
        problems.push(format!(
            "mqtt.client_id = {id:?}: with the per-instance suffix it is {full:?} ({} bytes), and \
             MQTT 3.1 allows 23; shorten client_id to {} bytes, set mqtt.client_id_suffix to a \
             shorter per-instance value (\"\" for none: then no two instances may share the \
             client id), or use version \"3.1.1\"/\"5\"",
            full.len(),
            23usize.saturating_sub(suffix.len() + 1),
        ));
        return;
    }
    mqtt.insert("client_id".into(), toml::Value::String(full));
}

/// The config file's path, for `run`, `check` and `health` without `--config` (the
/// container image sets it). Not a `MQTT_SINK_<SECTION>_<KEY>` override.
pub(crate) const CONFIG_ENV: &str = "MQTT_SINK_CONFIG";

/// Keys whose values are never printed.
const SECRETS: [&str; 2] = ["password", "password_file"];

/// Loads `path`, applies `env` overrides (`MQTT_SINK_<SECTION>_<KEY>`), reads secret files,
/// and validates everything.
pub(crate) fn load(path: &Path, env: &[(String, String)]) -> Result<DaemonConfig, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadError(vec![format!(
            "--config {}: cannot read: {e}",
            path.display()
        )])
    })?;
    parse(&text, env, path.parent().unwrap_or(Path::new(".")))
}

/// [`load`] from text; relative secret-file paths resolve against `base`.
pub(crate) fn parse(
    text: &str,
    env: &[(String, String)],
    base: &Path,
) -> Result<DaemonConfig, LoadError> {
    let mut doc: toml::Table =
        toml::from_str(text).map_err(|e| LoadError(vec![toml_error(text, &e)]))?;
    apply_env(&mut doc, env)?;
    let file: FileConfig = FileConfig::deserialize(toml::Value::Table(doc))
        .map_err(|e: toml::de::Error| LoadError(vec![format!("config: {}", e.message())]))?;
    let mut problems = Vec::new();

    // [mqtt]: the library's Config, plus `password_file`; [policy] folds into it.
    let mut mqtt_table = file.mqtt;
    if let Some(p) = file.policy {
        for (k, v) in [
            ("error_policy", p.error_policy),
            ("dead_letter_topic", p.dead_letter_topic),
        ] {
            if let Some(v) = v {
                if mqtt_table.contains_key(k) {
                    problems.push(format!("policy.{k}: also set as mqtt.{k}; keep one"));
                }
                mqtt_table.insert(k.into(), toml::Value::String(v));
            }
        }
    }
    let mut password_file = None;
    if let Some(v) = mqtt_table.remove("password_file") {
        match v.as_str() {
            Some(p) => {
                let p = base.join(p);
                password_file = Some(p.clone());
                match std::fs::read_to_string(&p) {
                    Ok(s) => {
                        mqtt_table.insert(
                            "password".into(),
                            toml::Value::String(s.trim_end_matches(['\n', '\r']).to_string()),
                        );
                    }
                    Err(e) => problems.push(format!(
                        "mqtt.password_file = {}: cannot read: {e}",
                        p.display()
                    )),
                }
            }
            None => problems.push("mqtt.password_file: must be a path (a string)".into()),
        }
    }
    apply_client_id_suffix(&mut mqtt_table, &mut problems);
    // Through text, so that a type error's span names its key.
    let mqtt_text = toml::to_string(&mqtt_table).unwrap_or_default();
    let mqtt = match toml::from_str::<MqttConfig>(&mqtt_text) {
        Ok(c) => match c.validate() {
            Ok(()) => Some(c),
            Err(e) => {
                problems.extend(from_config_errors(e, "mqtt."));
                None
            }
        },
        Err(e) => {
            let key = e
                .span()
                .and_then(|sp| mqtt_text.get(..sp.start))
                .and_then(|before| before.lines().last())
                .and_then(|l| l.split('=').next())
                .map(str::trim)
                .filter(|k| !k.is_empty());
            let what = e.message();
            let what = if SECRETS.iter().any(|s| key == Some(*s)) {
                "invalid value (not shown)".to_string()
            } else {
                what.to_string()
            };
            problems.push(match key {
                Some(k) => format!("mqtt.{k}: {what}"),
                None => format!("mqtt: {what}"),
            });
            None
        }
    };

    // [kafka]
    let k = file.kafka;
    if k.brokers.trim().is_empty() {
        problems.push("kafka.brokers = \"\": list at least one host:port".into());
    }
    if k.group_id.trim().is_empty() {
        problems.push("kafka.group_id = \"\": set the consumer group id".into());
    }
    if k.topics.is_empty() {
        problems.push("kafka.topics = []: list at least one topic to consume".into());
    }
    if k.commit_interval.is_zero() {
        problems.push("kafka.commit_interval = 0s: must be greater than zero".into());
    }
    if k.commit_interval > mqtt_sink_core::MAX_DURATION {
        problems.push(format!(
            "kafka.commit_interval = {}: must be at most 365 days",
            humantime_serde::re::humantime::format_duration(k.commit_interval)
        ));
    }
    if k.commit_min_interval > k.commit_interval {
        problems.push(format!(
            "kafka.commit_min_interval = {}: must be at most kafka.commit_interval ({}); \
             0s commits at checkpoints only",
            humantime_serde::re::humantime::format_duration(k.commit_min_interval),
            humantime_serde::re::humantime::format_duration(k.commit_interval)
        ));
    }
    let mut properties = BTreeMap::new();
    for (key, v) in k.properties {
        let s = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                problems.push(format!(
                    "kafka.properties.{key} = {other}: must be a string, number or boolean"
                ));
                continue;
            }
        };
        if matches!(
            key.as_str(),
            "enable.auto.commit" | "enable.auto.offset.store"
        ) && s != "false"
        {
            problems.push(format!(
                "kafka.properties.{key} = {s}: the sink commits exactly the acknowledged offsets; remove this property"
            ));
        }
        properties.insert(key, s);
    }
    if !matches!(file.log.format.as_str(), "text" | "json") {
        problems.push(format!(
            "log.format = {:?}: must be \"text\" or \"json\"",
            file.log.format
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&file.log.level) {
        problems.push(format!(
            "log.level = {:?}: not a log filter ({e}); use e.g. \"info\", \"debug\" or \
             \"info,mqtt_sink_kafka=debug\"",
            file.log.level
        ));
    }
    if !file.http.listen.is_empty() && file.http.listen.parse::<std::net::SocketAddr>().is_err() {
        problems.push(format!(
            "http.listen = {:?}: must be an address like \"127.0.0.1:9464\" (or \"\" to disable)",
            file.http.listen
        ));
    }
    if !(1..=256).contains(&file.tokio.worker_threads) {
        problems.push(format!(
            "tokio.worker_threads = {}: must be from 1 to 256",
            file.tokio.worker_threads
        ));
    }
    match (mqtt, problems.is_empty()) {
        (Some(mqtt), true) => {
            let mut warnings = warnings(&mqtt, &properties, env);
            if let Some(p) = &password_file {
                warnings.extend(readable_by_others("mqtt.password_file", p));
            }
            let mut kafka = KafkaConfig::new(k.brokers, k.group_id, k.topics);
            kafka.properties = properties;
            kafka.commit_interval = k.commit_interval;
            kafka.commit_every = k.commit_every;
            kafka.commit_min_interval = k.commit_min_interval;
            Ok(DaemonConfig {
                kafka,
                mqtt,
                http: file.http,
                log: file.log,
                tokio: file.tokio,
                warnings,
            })
        }
        _ => Err(LoadError(problems)),
    }
}

/// Start-up warnings: verification switched off, secret files others can read (review L11).
fn warnings(
    mqtt: &MqttConfig,
    properties: &BTreeMap<String, String>,
    env: &[(String, String)],
) -> Vec<String> {
    let mut out = Vec::new();
    let from_env = |name: &str| {
        if env.iter().any(|(k, _)| k == name) {
            format!(" (set by the environment variable {name})")
        } else {
            String::new()
        }
    };
    if mqtt.tls_enabled && mqtt.tls_insecure_skip_verify {
        out.push(format!(
            "MQTT TLS CERTIFICATE VERIFICATION IS OFF: mqtt.tls_insecure_skip_verify = true{}. \
             Any host on the path can pose as the broker and read the password and every \
             message. For tests only; for a private CA set mqtt.tls_ca_file instead",
            from_env("MQTT_SINK_MQTT_TLS_INSECURE_SKIP_VERIFY")
        ));
    }
    if properties
        .get("enable.ssl.certificate.verification")
        .is_some_and(|v| v == "false")
    {
        out.push(
            "KAFKA TLS CERTIFICATE VERIFICATION IS OFF: \
             kafka.properties.\"enable.ssl.certificate.verification\" = false. Any host on the \
             path can pose as the brokers. For tests only; for a private CA set \
             \"ssl.ca.location\" instead"
                .into(),
        );
    }
    if let Some(key) = &mqtt.tls_client_key {
        out.extend(readable_by_others("mqtt.tls_client_key", key));
    }
    for prop in ["ssl.key.location", "ssl.keystore.location"] {
        if let Some(p) = properties.get(prop) {
            out.extend(readable_by_others(
                &format!("kafka.properties.\"{prop}\""),
                Path::new(p),
            ));
        }
    }
    out
}

/// A warning when users other than the owner may read the secret file at `path`.
fn readable_by_others(key: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| {
        format!(
            "{key} = {}: the file holds a secret and users other than its owner can read it \
             (mode {mode:04o}); chmod 600 it (Kubernetes: defaultMode: 0400 on the secret volume)",
            path.display()
        )
    })
}

/// The keys of every section, with what the config holds after defaults, the environment
/// and the per-instance suffix, in TOML notation; secrets are shown as `"***"`, unset
/// options as `unset`. `run` logs it at start-up; docs/configuration.md is tested
/// against it.
pub(crate) fn effective(cfg: &DaemonConfig) -> Vec<(String, String)> {
    let s = |v: &str| toml::Value::String(v.to_string()).to_string();
    let d = |v: Duration| s(&humantime_serde::re::humantime::format_duration(v).to_string());
    let opt = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
    let list = |v: &[String]| {
        format!(
            "[{}]",
            v.iter().map(|a| s(a)).collect::<Vec<_>>().join(", ")
        )
    };
    let path =
        |v: &Option<std::path::PathBuf>| opt(v.as_ref().map(|p| s(&p.display().to_string())));
    let k = &cfg.kafka;
    let m = &cfg.mqtt;
    let mut out = vec![
        ("kafka.brokers", s(&k.brokers)),
        ("kafka.group_id", s(&k.group_id)),
        (
            "kafka.topics",
            toml::Value::Array(
                k.topics
                    .iter()
                    .map(|t| toml::Value::String(t.clone()))
                    .collect(),
            )
            .to_string(),
        ),
        ("kafka.commit_interval", d(k.commit_interval)),
        (
            "kafka.commit_every",
            opt(k.commit_every.map(|n| n.to_string())),
        ),
        ("kafka.commit_min_interval", d(k.commit_min_interval)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect::<Vec<_>>();
    for (key, v) in &k.properties {
        let shown = if secret_property(key) { s("***") } else { s(v) };
        out.push((format!("kafka.properties.{}", s(key)), shown));
    }
    let headers = match &m.headers_as_user_properties {
        HeaderSelection::All => s("all"),
        HeaderSelection::Only(names) => toml::Value::Array(
            names
                .iter()
                .map(|n| toml::Value::String(n.clone()))
                .collect(),
        )
        .to_string(),
        _ => s("none"),
    };
    let mqtt = [
        ("client_id", s(&m.client_id)),
        ("server", s(&m.server)),
        ("servers", list(&m.servers)),
        ("port", m.port.to_string()),
        ("topic_root", s(&m.topic_root)),
        ("topic_template", opt(m.topic_template.as_deref().map(s))),
        ("escape_placeholders", m.escape_placeholders.to_string()),
        ("headers_as_user_properties", headers),
        ("topic_aliases", m.topic_aliases.to_string()),
        (
            "coordinates_as_user_properties",
            m.coordinates_as_user_properties.to_string(),
        ),
        ("username", opt(m.username.as_deref().map(s))),
        ("password", opt(m.password.as_ref().map(|_| s("***")))),
        ("version", s(&m.version.to_string())),
        ("tls_enabled", m.tls_enabled.to_string()),
        ("tls_ca_file", path(&m.tls_ca_file)),
        ("tls_client_cert", path(&m.tls_client_cert)),
        ("tls_client_key", path(&m.tls_client_key)),
        (
            "tls_insecure_skip_verify",
            m.tls_insecure_skip_verify.to_string(),
        ),
        ("tls_alpn", list(&m.tls_alpn)),
        ("transport", s(&m.transport.to_string())),
        ("ws_path", s(m.ws_path())),
        (
            "ws_headers",
            // Names only: the values may be credentials.
            if m.ws_headers.is_empty() {
                "{}".to_string()
            } else {
                let names: Vec<String> = m
                    .ws_headers
                    .keys()
                    .map(|k| format!("{} = \"***\"", s(k)))
                    .collect();
                format!("{{ {} }}", names.join(", "))
            },
        ),
        ("qos", m.qos.to_string()),
        ("flush_timeout", d(m.flush_timeout)),
        ("retain", m.retain.to_string()),
        (
            "properties",
            opt(m.properties.as_ref().map(publish_properties)),
        ),
        ("keepalive", d(m.keepalive)),
        ("ping_timeout", d(m.ping_timeout)),
        ("ack_timeout", d(m.ack_timeout)),
        ("connect_timeout", d(m.connect_timeout)),
        ("clean_session", m.clean_session.to_string()),
        ("session_expiry", d(m.session_expiry)),
        ("max_inflight", m.max_inflight.to_string()),
        ("connections", m.connections.to_string()),
        ("max_buffered_records", m.max_buffered_records.to_string()),
        ("max_buffered_bytes", m.max_buffered_bytes.to_string()),
        ("reconnect_backoff_min", d(m.reconnect_backoff_min)),
        ("reconnect_backoff_max", d(m.reconnect_backoff_max)),
        (
            "reconnect_jitter_seed",
            opt(m.reconnect_jitter_seed.map(|n| n.to_string())),
        ),
        ("max_packet_size", m.max_packet_size.to_string()),
        ("error_policy", s(&m.error_policy.to_string())),
        ("poison_after", m.poison_after.to_string()),
        ("qos_downgrade", m.qos_downgrade.to_string()),
        ("string_policy", s(&m.string_policy.to_string())),
        ("tombstone", s(&m.tombstone.to_string())),
        ("transform", opt(m.transform.as_deref().map(s))),
        (
            "max_publish_rate",
            opt(m.max_publish_rate.map(|r| r.to_string())),
        ),
        (
            "max_publish_burst",
            opt(m.max_publish_rate.map(|_| m.publish_burst().to_string())),
        ),
        (
            "dead_letter_topic",
            opt(m.dead_letter_topic.as_deref().map(s)),
        ),
    ];
    out.extend(mqtt.into_iter().map(|(k, v)| (format!("mqtt.{k}"), v)));
    out.push(("http.listen".into(), s(&cfg.http.listen)));
    out.push(("log.format".into(), s(&cfg.log.format)));
    out.push(("log.level".into(), s(&cfg.log.level)));
    out.push((
        "tokio.worker_threads".into(),
        cfg.tokio.worker_threads.to_string(),
    ));
    out
}

/// `[mqtt.properties]` as a TOML inline table.
fn publish_properties(p: &mqtt_sink_core::PublishProperties) -> String {
    let mut t = toml::Table::new();
    let mut put = |k: &str, v: Option<toml::Value>| {
        if let Some(v) = v {
            t.insert(k.into(), v);
        }
    };
    put(
        "payload_format_indicator",
        p.payload_format_indicator.map(|v| i64::from(v).into()),
    );
    put(
        "message_expiry_interval",
        p.message_expiry_interval.map(|v| i64::from(v).into()),
    );
    put("content_type", p.content_type.clone().map(Into::into));
    put("response_topic", p.response_topic.clone().map(Into::into));
    put(
        "correlation_data",
        p.correlation_data
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned().into()),
    );
    if !p.user_properties.is_empty() {
        let pairs = p
            .user_properties
            .iter()
            .map(|(k, v)| toml::Value::Array(vec![k.clone().into(), v.clone().into()]))
            .collect();
        put("user_properties", Some(toml::Value::Array(pairs)));
    }
    toml::Value::Table(t).to_string()
}

/// librdkafka properties whose values are secrets (the ones its documentation marks
/// sensitive, and anything named like a password or a secret).
fn secret_property(key: &str) -> bool {
    [
        "password",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|w| key.contains(w))
}

fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|sp| text[..sp.start.min(text.len())].lines().count().max(1));
    match line {
        Some(l) => format!("config line {l}: {}", e.message()),
        None => format!("config: {}", e.message()),
    }
}

/// Applies `MQTT_SINK_<SECTION>_<KEY>=value` (the value is read as TOML when it parses as
/// a number, boolean or array, else as a string).
fn apply_env(doc: &mut toml::Table, env: &[(String, String)]) -> Result<(), LoadError> {
    let mut problems = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("MQTT_SINK_") else {
            continue;
        };
        if name == CONFIG_ENV {
            continue;
        }
        let Some((section, key)) = rest.split_once('_') else {
            problems.push(format!("{name}: expected MQTT_SINK_<SECTION>_<KEY>"));
            continue;
        };
        let section = section.to_ascii_lowercase();
        if !matches!(
            section.as_str(),
            "kafka" | "mqtt" | "http" | "log" | "tokio"
        ) {
            problems.push(format!(
                "{name}: unknown section {section:?} (kafka, mqtt, http, log, tokio)"
            ));
            continue;
        }
        let key = key.to_ascii_lowercase();
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            // An inline table only where one is meant: the WebSocket upgrade's headers.
            .filter(|v| key == "ws_headers" || !matches!(v, toml::Value::Table(_)));
        let v = parsed.unwrap_or_else(|| toml::Value::String(value.clone()));
        let v = if SECRETS.contains(&key.as_str())
            || key == "client_id"
            || key == "server"
            || key == "brokers"
            || key == "group_id"
        {
            // Always text, even if it looks like a number.
            toml::Value::String(value.clone())
        } else {
            v
        };
        let table = doc
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table.as_table_mut() {
            Some(t) => {
                t.insert(key, v);
            }
            None => problems.push(format!("{name}: [{section}] is not a table in the config")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LoadError(problems))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const WITH_SECRETS: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
topics = ["t"]
[kafka.properties]
"sasl.password" = "kafka-s3cret"
"ssl.key.password" = "key-s3cret"

[mqtt]
client_id = "sink"
server = "127.0.0.1"
port = 1883
topic_root = "sensors"
username = "user"
password = "mqtt-s3cret"
transport = "ws"
ws_headers = { Authorization = "Bearer ws-s3cret" }
"#;

    /// Rows of docs/configuration.md: (key, default, environment, rule).
    fn reference() -> Vec<[String; 4]> {
        include_str!("../../docs/configuration.md")
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<String> = l
                    .trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect();
                assert_eq!(cells.len(), 4, "a reference row has 4 cells: {l}");
                let unquote = |c: &str| c.trim_matches('`').to_string();
                [
                    unquote(&cells[0]),
                    unquote(&cells[1]),
                    unquote(&cells[2]),
                    cells[3].clone(),
                ]
            })
            .collect()
    }

    const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
topics = ["t"]
[mqtt]
client_id = "sink"
client_id_suffix = ""
server = "127.0.0.1"
port = 1883
topic_root = "sensors"
"#;

    /// Issue 13 point 6: the reference cannot drift from the structs. Its keys are exactly
    /// the fields serde takes in each table (plus the daemon's own `[mqtt]` keys), each
    /// default is what a minimal config holds, each environment variable sets the key
    /// (set to the documented default, it parses to it).
    #[test]
    fn the_configuration_reference_lists_every_key_with_its_default() {
        use serde_aux::serde_introspection::serde_introspect;
        let rows = reference();
        let documented: std::collections::BTreeSet<&str> =
            rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(documented.len(), rows.len(), "a key is listed twice");
        let mut taken = std::collections::BTreeSet::new();
        let tables: [(&str, &[&str]); 5] = [
            ("kafka", serde_introspect::<KafkaSection>()),
            ("mqtt", serde_introspect::<MqttConfig>()),
            ("http", serde_introspect::<HttpConfig>()),
            ("log", serde_introspect::<LogConfig>()),
            ("tokio", serde_introspect::<TokioConfig>()),
        ];
        for (table, fields) in tables {
            assert!(!fields.is_empty(), "{table}: no fields found");
            for f in fields {
                taken.insert(format!("{table}.{f}"));
            }
        }
        // Read by the daemon before the library's Config sees the table.
        taken.insert("mqtt.password_file".into());
        taken.insert("mqtt.client_id_suffix".into());
        // [policy] only repeats two [mqtt] keys.
        for f in serde_introspect::<PolicySection>() {
            assert!(
                documented.contains(format!("mqtt.{f}").as_str()),
                "policy.{f}"
            );
        }
        let documented_owned: std::collections::BTreeSet<String> =
            documented.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            documented_owned, taken,
            "docs/configuration.md and the config structs differ"
        );

        let cfg = parse(MINIMAL, &[], Path::new(".")).unwrap();
        let shown: BTreeMap<String, String> = effective(&cfg).into_iter().collect();
        for [key, default, env, rule] in &rows {
            assert!(!rule.is_empty(), "{key}: no rule");
            let (table, field) = key.split_once('.').unwrap();
            let tables = ["kafka.properties", "mqtt.properties"];
            if tables.contains(&key.as_str()) {
                assert_eq!(env, "—", "{key} is a table: no environment variable");
            } else {
                assert_eq!(
                    env,
                    &format!("MQTT_SINK_{}_{}", table, field).to_ascii_uppercase(),
                    "{key}"
                );
            }
            if ["mqtt.password_file", "mqtt.client_id_suffix"].contains(&key.as_str()) {
                continue; // consumed while reading: not part of the effective config
            }
            if default == "required" {
                assert!(
                    shown.contains_key(key),
                    "{key} is not in the effective config"
                );
                continue;
            }
            if tables.contains(&key.as_str()) {
                assert_eq!(default, "unset");
                continue;
            }
            assert_eq!(shown.get(key), Some(default), "{key}: documented default");
            if default != "unset" {
                let mut env = vec![(env.clone(), default.clone())];
                if key.starts_with("mqtt.ws_") {
                    // The WebSocket options are refused without the WebSocket transport.
                    env.push(("MQTT_SINK_MQTT_TRANSPORT".into(), "\"ws\"".into()));
                }
                let set = parse(MINIMAL, &env, Path::new("."))
                    .unwrap_or_else(|e| panic!("{key} from {env:?}: {e}"));
                let shown: BTreeMap<String, String> = effective(&set).into_iter().collect();
                assert_eq!(shown.get(key), Some(default), "{key} from {env:?}");
            }
        }
        // Every effective key is documented (kafka.properties.* under kafka.properties).
        for k in shown.keys() {
            assert!(documented.contains(k.as_str()), "{k} is not documented");
        }
    }

    /// The start-up line shows what the sink runs with, and never a secret.
    #[test]
    fn the_effective_config_masks_secrets_and_names_every_property() {
        let cfg = parse(WITH_SECRETS, &[], Path::new(".")).unwrap();
        let shown: BTreeMap<String, String> = effective(&cfg).into_iter().collect();
        let all = format!("{shown:?}");
        assert!(!all.contains("s3cret"), "{all}");
        assert_eq!(shown["mqtt.password"], "\"***\"");
        assert_eq!(shown["kafka.properties.\"sasl.password\""], "\"***\"");
        assert_eq!(shown["mqtt.username"], "\"user\"");
        assert_eq!(shown["mqtt.ws_headers"], "{ \"Authorization\" = \"***\" }");
        assert_eq!(shown["mqtt.ws_path"], "\"/mqtt\"");
        assert!(shown["mqtt.client_id"].starts_with("\"sink-"), "suffixed");
    }

    /// Review L11: certificate verification off and readable secret files are warned about.
    #[test]
    fn insecure_tls_and_readable_secret_files_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mqtt-sink-warn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        let key = dir.join("key.pem");
        for f in [&pw, &key] {
            std::fs::write(f, "x").unwrap();
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let text = format!(
            "{MINIMAL}username = \"u\"\npassword_file = \"pw\"\ntls_client_key = {:?}\n\
             tls_client_cert = {:?}\n",
            key.display().to_string(),
            key.display().to_string()
        );
        let env = [(
            "MQTT_SINK_MQTT_TLS_INSECURE_SKIP_VERIFY".to_string(),
            "true".to_string(),
        )];
        let cfg = parse(&text, &env, &dir).unwrap();
        let w = cfg.warnings.join("\n");
        assert!(w.contains("CERTIFICATE VERIFICATION IS OFF"), "{w}");
        assert!(w.contains("MQTT_SINK_MQTT_TLS_INSECURE_SKIP_VERIFY"), "{w}");
        assert!(
            w.contains("mqtt.password_file") && w.contains("mode 0644"),
            "{w}"
        );
        assert!(w.contains("mqtt.tls_client_key"), "{w}");
        for f in [&pw, &key] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let cfg = parse(&text, &[], &dir).unwrap();
        assert_eq!(cfg.warnings, Vec::<String>::new());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review L4 and issue 13 point 3: no `Debug` of any config type prints a secret.
    #[test]
    fn no_config_type_prints_a_secret() {
        let file =
            FileConfig::deserialize(toml::Value::Table(toml::from_str(WITH_SECRETS).unwrap()))
                .unwrap();
        let daemon = parse(WITH_SECRETS, &[], Path::new(".")).unwrap();
        let shown = [
            format!("{file:?}"),
            format!("{file:#?}"),
            format!("{:?}", file.kafka),
            format!("{daemon:?}"),
            format!("{daemon:#?}"),
            format!("{:?}", daemon.kafka),
            format!("{:?}", daemon.mqtt),
            format!("{:?}", daemon.mqtt.password),
        ];
        for s in shown {
            assert!(!s.contains("s3cret"), "a secret is printed: {s}");
        }
    }
}
