//! The daemon's config file: `[kafka]`, `[mqtt]` (every option of the library),
//! `[http]` and `[log]`. Any key can be overridden by `MQTT_SINK_<SECTION>_<KEY>`
//! (e.g. `MQTT_SINK_MQTT_PASSWORD`); secrets can come from files (`password_file`).
//! Errors name the key, the value and the allowed form; secrets are never shown.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use mqtt_sink_core::{Config as MqttConfig, ConfigError, ConfigErrors, KafkaConfig};
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
            .finish()
    }
}

fn default_commit_interval() -> Duration {
    Duration::from_secs(5)
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
    if let Some(v) = mqtt_table.remove("password_file") {
        match v.as_str() {
            Some(p) => {
                let p = base.join(p);
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
            let mut kafka = KafkaConfig::new(k.brokers, k.group_id, k.topics);
            kafka.properties = properties;
            kafka.commit_interval = k.commit_interval;
            kafka.commit_every = k.commit_every;
            Ok(DaemonConfig {
                kafka,
                mqtt,
                http: file.http,
                log: file.log,
                tokio: file.tokio,
            })
        }
        _ => Err(LoadError(problems)),
    }
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
            .filter(|v| !matches!(v, toml::Value::Table(_)));
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
"#;

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
