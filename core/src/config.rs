//! Sink configuration: every option of the Quix Streams `MQTTSink`, plus ours.
//!
//! [`Config`] deserializes from TOML (or any serde format) and [`Config::validate`] reports
//! every problem at once, each naming the option, its value and the rule it breaks.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Deserializer};

use crate::topic;

/// MQTT protocol version. Deserializes from `"3.1"`, `"3.1.1"` or `"5"` (a TOML number `5`
/// or `3.1` works too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum MqttVersion {
    /// MQTT 3.1 (protocol name "MQIsdp", level 3).
    V31,
    /// MQTT 3.1.1 (level 4): the default, as in the Quix sink.
    #[default]
    V311,
    /// MQTT 5 (level 5).
    V5,
}

impl MqttVersion {
    /// Parses the forms users write: "3.1", "3.1.1", "5" (also "5.0", "4", "v5").
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().trim_start_matches(['v', 'V']) {
            "3.1" | "3" => Some(Self::V31),
            "3.1.1" | "4" => Some(Self::V311),
            "5" | "5.0" => Some(Self::V5),
            _ => None,
        }
    }
}

impl fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V31 => "3.1",
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        })
    }
}

impl<'de> Deserialize<'de> for MqttVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "\"3.1\", \"3.1.1\" or \"5\"";
        impl serde::de::Visitor<'_> for V {
            type Value = MqttVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MqttVersion, E> {
                MqttVersion::parse(v).ok_or_else(|| {
                    E::custom(format!("version {v:?} is not supported: use {EXPECTED}"))
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MqttVersion, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MqttVersion, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<MqttVersion, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// What to do with a record the sink cannot deliver: a bad key or topic, a packet too large,
/// or a broker rejection (an MQTT 5 reason code >= 0x80).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// The flush fails; nothing at or past the record is committed. The caller rewinds and
    /// stops or retries. The default: nothing is lost silently.
    #[default]
    Fail,
    /// The record is counted and reported, and its offset may be committed.
    Skip,
    /// The runtime produces the record to `dead_letter_topic`; the offset passes only once
    /// the runtime confirms that produce.
    DeadLetter,
}

impl fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fail => "fail",
            Self::Skip => "skip",
            Self::DeadLetter => "dead-letter",
        })
    }
}

/// How the MQTT byte stream reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Transport {
    /// MQTT over TCP (over TLS with `tls_enabled`): the default.
    #[default]
    Tcp,
    /// MQTT over WebSocket (RFC 6455 binary frames, subprotocol `mqtt`) at `ws_path`: `ws://`,
    /// or `wss://` with `tls_enabled`. For networks that only open port 80 or 443.
    Ws,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Ws => "ws",
        })
    }
}

/// The WebSocket path used when `ws_path` is not set: what EMQX, HiveMQ, AWS IoT Core and
/// most brokers serve MQTT on.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// What a Kafka tombstone (a record with no value: on a compacted topic, "this key is
/// gone") becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TombstonePolicy {
    /// Published like any record, its payload the value serializer's null: JSON `null`
    /// (the daemon's), an empty payload with the raw serializer, whatever a custom one
    /// makes of it. The default, as before this option.
    #[default]
    PublishNull,
    /// Not published; its offset passes like a delivered record's.
    Skip,
    /// A zero-byte retained publish to the key's topic: the broker deletes the retained
    /// message there, so it holds what the compacted topic holds, the latest value per key.
    ClearRetained,
    /// A zero-byte publish with the configured retain flag.
    PublishEmpty,
}

impl fmt::Display for TombstonePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PublishNull => "publish-null",
            Self::Skip => "skip",
            Self::ClearRetained => "clear-retained",
            Self::PublishEmpty => "publish-empty",
        })
    }
}

/// What the sink does with a string holding a character MQTT lets a broker refuse
/// (U+0001-U+001F, U+007F-U+009F, Unicode non-characters; U+0000 is always refused) in a
/// topic or an MQTT 5 property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StringPolicy {
    /// The record is rejected (the error policy applies), with the character and its
    /// position in the reason. The default: Mosquitto, for one, closes the connection on
    /// such a string, and the record would be resent forever.
    #[default]
    Reject,
    /// Topics: each such character is percent-escaped (`\t` becomes `%09`). Properties are
    /// still rejected.
    Escape,
    /// Sent as they are (for brokers known to accept them); U+0000 is still rejected.
    Allow,
}

impl fmt::Display for StringPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reject => "reject",
            Self::Escape => "escape",
            Self::Allow => "allow",
        })
    }
}

/// A secret string (the password). Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the CONNECT packet (or the WebSocket upgrade) only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// MQTT 5 PUBLISH properties, static (from config) or computed per record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishProperties {
    /// 0: unspecified bytes; 1: UTF-8 payload.
    pub payload_format_indicator: Option<u8>,
    /// Seconds after which the broker drops the message if undelivered.
    pub message_expiry_interval: Option<u32>,
    /// MIME type of the payload, e.g. "application/json".
    pub content_type: Option<String>,
    /// Topic for a response (request/response pattern).
    pub response_topic: Option<String>,
    /// Correlation data for a response (a string in TOML).
    #[serde(default, deserialize_with = "bytes_from_str")]
    pub correlation_data: Option<Bytes>,
    /// User properties, in order; a name may repeat. TOML: `[["name", "value"], ...]`.
    #[serde(default)]
    pub user_properties: Vec<(String, String)>,
}

fn bytes_from_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Bytes::from))
}

impl PublishProperties {
    /// Problems with these properties, each as (field, value, rule). Strings holding a
    /// [`topic::refusable`] character are problems unless `allow_refusable` (NUL always).
    pub(crate) fn problems(&self, allow_refusable: bool) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        if let Some(p) = self.payload_format_indicator {
            if p > 1 {
                out.push((
                    "payload_format_indicator",
                    p.to_string(),
                    "must be 0 (bytes) or 1 (UTF-8)".into(),
                ));
            }
        }
        if let Some(t) = &self.response_topic {
            if let Err(e) = topic::check_topic_allowing(t, allow_refusable) {
                out.push((
                    "response_topic",
                    format!("{:?}", truncate(t, 40)),
                    e.to_string(),
                ));
            }
        }
        let refused = |c: char| c == '\0' || (!allow_refusable && topic::refusable(c));
        let mut strings: Vec<(&'static str, &str)> = Vec::new();
        if let Some(c) = &self.content_type {
            strings.push(("content_type", c));
        }
        for (k, v) in &self.user_properties {
            strings.push(("user_properties", k));
            strings.push(("user_properties", v));
        }
        for (field, s) in strings {
            if let Some((at, c)) = s.char_indices().find(|&(_, c)| refused(c)) {
                out.push((
                    field,
                    format!("{:?}", truncate(s, 40)),
                    format!(
                        "contains {} at byte {at}; {}",
                        topic::describe(c),
                        topic::REFUSABLE_WHY
                    ),
                ));
            }
        }
        let long = |s: &str| s.len() > 65_535;
        if self.content_type.as_deref().is_some_and(long) {
            out.push((
                "content_type",
                "…".into(),
                "must be at most 65535 bytes".into(),
            ));
        }
        if self
            .correlation_data
            .as_ref()
            .is_some_and(|b| b.len() > 65_535)
        {
            out.push((
                "correlation_data",
                "…".into(),
                "must be at most 65535 bytes".into(),
            ));
        }
        for (k, v) in &self.user_properties {
            if long(k) || long(v) {
                out.push((
                    "user_properties",
                    format!("{:?}", truncate(k, 40)),
                    "each name and value must be at most 65535 bytes".into(),
                ));
            }
        }
        out
    }

    /// Encoded size of these properties on the wire, a bound used for packet-size checks.
    pub(crate) fn wire_len(&self) -> usize {
        let mut n = 0;
        n += self.payload_format_indicator.map_or(0, |_| 2);
        n += self.message_expiry_interval.map_or(0, |_| 5);
        n += self.content_type.as_ref().map_or(0, |s| 3 + s.len());
        n += self.response_topic.as_ref().map_or(0, |s| 3 + s.len());
        n += self.correlation_data.as_ref().map_or(0, |s| 3 + s.len());
        n += self
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>();
        n
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Which Kafka headers become MQTT 5 user properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeaderSelection {
    /// None.
    #[default]
    None,
    /// Every header (a header with a non-UTF-8 value is skipped).
    All,
    /// Only these names.
    Only(Vec<String>),
}

impl<'de> Deserialize<'de> for HeaderSelection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "none" => Ok(Self::None),
            Raw::Word(w) if w == "all" => Ok(Self::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "{w:?} is not allowed: use \"none\", \"all\" or a list of header names"
            ))),
            Raw::List(l) => Ok(Self::Only(l)),
        }
    }
}

/// The largest packet MQTT can express: a 268,435,455-byte remaining length plus a
/// 5-byte fixed header.
pub const MAX_MQTT_PACKET: u32 = 268_435_460;

/// The longest duration any option takes (365 days): deadlines are computed as `now +
/// duration`, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Sink configuration.
///
/// The first four fields are required; the rest have the defaults documented on each.
/// Durations are written as in `"10s"`, `"500ms"`, `"1h"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// MQTT client identifier. Replicas of one consumer group must not share it (the broker
    /// evicts the older connection): the runtimes add a per-instance suffix.
    pub client_id: String,
    /// Broker host name or address (with `port`); or leave both out and list `servers`.
    #[serde(default)]
    pub server: String,
    /// Broker port.
    #[serde(default)]
    pub port: u16,
    /// Broker addresses, `"host:port"` (`"[::1]:1883"` for IPv6), instead of `server` and
    /// `port`: the sink connects to the first; after a failed connect or a lost connection
    /// it tries the next (after the reconnect backoff), round and round. They should share
    /// one session store (a cluster) or the sink's session starts afresh on each switch
    /// (unacknowledged publishes are resent, as after any restart of the broker).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Root of the published topics: a record goes to `{topic_root}/{key}`.
    pub topic_root: String,
    /// A topic template instead of `{topic_root}/{key}`, e.g.
    /// `"plant/{topic}/{header:site}/{key}"`. Placeholders: `{key}`, `{topic}` (Kafka topic),
    /// `{partition}`, `{header:NAME}`, `{json:FIELD}` (a field of a JSON value; dots for
    /// nesting, e.g. `{json:device.id}`). It must start with static text.
    #[serde(default)]
    pub topic_template: Option<String>,
    /// Escape `/`, `+` and `#` in placeholder values (as `%2F`, `%2B`, `%23`) instead of
    /// letting a `/` in a key add topic levels (the Quix behaviour). Default: false.
    #[serde(default)]
    pub escape_placeholders: bool,
    /// MQTT 5: Kafka headers as user properties: `"none"` (default), `"all"`, or a list of
    /// header names.
    #[serde(default)]
    pub headers_as_user_properties: HeaderSelection,
    /// MQTT 5: use topic aliases when the broker allows them (Topic Alias Maximum > 0), so
    /// that a topic's name crosses the wire once per connection. Default: true.
    #[serde(default = "default_true")]
    pub topic_aliases: bool,
    /// MQTT 5: add `kafka.topic`, `kafka.partition`, `kafka.offset` user properties, so that
    /// subscribers can drop duplicates. Default: false.
    #[serde(default)]
    pub coordinates_as_user_properties: bool,
    /// User name for the broker.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the broker. Never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// MQTT version: "3.1", "3.1.1" (default) or "5".
    #[serde(default)]
    pub version: MqttVersion,
    /// Use TLS. Default: true.
    #[serde(default = "default_true")]
    pub tls_enabled: bool,
    /// PEM file of the CA(s) that sign the broker's certificate; default: the system roots.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM file of the client certificate chain, for mutual TLS (with `tls_client_key`).
    #[serde(default)]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// PEM file of the client private key, for mutual TLS (with `tls_client_cert`).
    #[serde(default)]
    pub tls_client_key: Option<std::path::PathBuf>,
    /// Accept any broker certificate. For tests only: it disables server authentication.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// ALPN protocol names offered in the TLS handshake, e.g. `["x-amzn-mqtt-ca"]` for AWS
    /// IoT Core on port 443. Default: none offered.
    #[serde(default)]
    pub tls_alpn: Vec<String>,
    /// `"tcp"` (default) or `"ws"`: MQTT over WebSocket (`wss` with `tls_enabled`).
    #[serde(default)]
    pub transport: Transport,
    /// The HTTP path of the WebSocket upgrade, with `transport = "ws"`. Default: `/mqtt`.
    #[serde(default)]
    pub ws_path: Option<String>,
    /// Extra HTTP headers of the WebSocket upgrade request (e.g. an `Authorization` a
    /// gateway wants), with `transport = "ws"`. Their values are not printed.
    #[serde(default)]
    pub ws_headers: std::collections::BTreeMap<String, Secret>,
    /// QoS of every publish: 0 at-most-once, 1 at-least-once (default), 2 exactly-once.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// How long a flush waits for acknowledgements before it fails. Default: 10 s.
    #[serde(default = "default_flush_timeout", with = "humantime_serde")]
    pub flush_timeout: Duration,
    /// Static retain flag for every publish (a per-record function can replace it).
    /// Default: false.
    #[serde(default)]
    pub retain: bool,
    /// Static MQTT 5 PUBLISH properties (MQTT 5 only; a per-record function can replace it).
    #[serde(default)]
    pub properties: Option<PublishProperties>,
    /// Keep-alive interval sent in CONNECT; a PINGREQ goes out when nothing else has been
    /// sent for this long. Zero disables keep-alive. Default: 60 s.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// How long to wait for PINGRESP before the connection counts as lost. Default: 10 s.
    #[serde(default = "default_ping_timeout", with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// How long a QoS 1/2 publish may wait for its acknowledgement before the connection
    /// counts as broken: the sink reconnects and resends it (MQTT resends only on a new
    /// connection, so a lost PUBACK is recovered this way). Default: 5 s.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// How long to wait for CONNACK after the transport is up. Default: 30 s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Ask the broker to discard the session on every connect. Default: false, so that a
    /// reconnect resumes the session and unacknowledged publishes are resent with DUP
    /// (required for QoS 2 to stay exactly-once across reconnects), from the first
    /// connection on. A session found on the first connect was left by an earlier
    /// instance with the same client id: it is discarded (MQTT 5: Clean Start; 3.1/3.1.1:
    /// one CleanSession=1 connection, see `Event::StaleSessionDiscarded`). `close` ends the
    /// session (MQTT 5: Session Expiry 0 on DISCONNECT; 3.1/3.1.1: one more connection,
    /// CleanSession=1), so that none is left on the broker for nobody.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT 5 Session Expiry Interval sent when `clean_session` is false. Default: 1 h.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// Most QoS 1/2 publishes awaiting acknowledgement at once on each connection; the
    /// broker's MQTT 5 Receive Maximum lowers it. 1..=65535. Default: 1000.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u32,
    /// MQTT connections (sessions) to the broker, 1..=64. A publish to a topic with
    /// publishes unacknowledged goes on their connection, so that publishes to one topic
    /// keep their order; a topic with none goes on the least-loaded connection (after a
    /// QoS 0 publish: the one its topic hashes to). Each connection has its own window (`max_inflight`), and client id
    /// `<client_id>-<i>` (i = 0..connections-1) when there are several. The offset ledger,
    /// the buffer and `max_publish_rate` are shared: a record's offset passes when its own
    /// connection has it acknowledged. Several connections lift the ceiling of
    /// window / round trip that one connection has against a distant or per-connection
    /// limited broker. Default: 1.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Most records held (queued or in flight) before `push_record` refuses more; once it
    /// has refused, it takes records again when three quarters or fewer are held.
    /// Default: 5000 (five times the default `max_inflight`: the window refills from the
    /// buffer, not from Kafka; docs/configuration.md "Memory" says what it costs).
    #[serde(default = "default_max_buffered_records")]
    pub max_buffered_records: usize,
    /// Most bytes of encoded publishes held before `push_record` refuses more (with the
    /// same low watermark of three quarters). Default: 16 MiB.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// First reconnect delay; doubled per failed attempt up to the maximum. Default: 100 ms.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub reconnect_backoff_min: Duration,
    /// Longest reconnect delay. Default: 30 s.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// Seed of the reconnect jitter (a given seed replays the same delays). Default: none,
    /// the seed is derived from the client id with its per-instance suffix, so replicas
    /// do not reconnect in lockstep.
    #[serde(default)]
    pub reconnect_jitter_seed: Option<u64>,
    /// Largest PUBLISH packet the sink sends, in bytes; larger records are rejected before
    /// sending. The broker's MQTT 5 Maximum Packet Size lowers it. Default: MQTT's maximum.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    /// What to do with records that cannot be delivered: "fail" (default), "skip",
    /// "dead-letter".
    #[serde(default)]
    pub error_policy: ErrorPolicy,
    /// Give up on a QoS 1/2 record when the broker closed the connection this many times in
    /// a row right after it was sent, with no acknowledgement of it or anything after it in
    /// between (from the second close on, publishes go one at a time to tell which one the
    /// broker refuses; see README "Poison records"): the error policy
    /// applies to it (a broker that refuses a string or a size without a reason code would
    /// otherwise get it resent forever). 0 never gives up. Default: 3.
    #[serde(default = "default_poison_after")]
    pub poison_after: u32,
    /// A broker that does not honour `qos = 2` (it answers a QoS 2 PUBLISH with PUBACK, or
    /// its MQTT 5 Maximum QoS is 1): `false` (default) stops the sink with an error naming
    /// the broker; `true` continues at QoS 1 and says so once. Never lowers to QoS 0: that
    /// would give up at-least-once (set `qos = 0` for that).
    #[serde(default)]
    pub qos_downgrade: bool,
    /// Strings holding characters MQTT lets a broker refuse (control characters, Unicode
    /// non-characters): `"reject"` the record (default), `"escape"` them in topics (`%09`),
    /// or `"allow"` them (U+0000 is always rejected).
    #[serde(default)]
    pub string_policy: StringPolicy,
    /// What a Kafka tombstone (a record with no value) becomes: `"publish-null"` (default:
    /// the value serializer's null, JSON `null`), `"skip"`, `"clear-retained"` (a
    /// zero-byte retained publish that deletes the key's retained message) or
    /// `"publish-empty"`.
    #[serde(default)]
    pub tombstone: TombstonePolicy,
    /// A jq program that shapes and routes each record (run by jaq): its input is the
    /// record as JSON (`key`, `value`, `headers`, `topic`, `partition`, `offset`,
    /// `timestamp`); each output is a publish, either the payload itself or
    /// `{payload, topic?, retain?, properties?}`; no output filters the record out, several
    /// fan out. Unset (default): one publish per record, as configured.
    #[serde(default)]
    pub transform: Option<String>,
    /// At most this many publishes per second (fractions allowed, e.g. `0.5`), resends
    /// included; unset (default): no limit. For brokers that throttle (AWS IoT Core drops
    /// over-limit QoS 1 publishes without a PUBACK).
    #[serde(default)]
    pub max_publish_rate: Option<f64>,
    /// How many publishes may go at once after a pause, with `max_publish_rate`. Default: a
    /// tenth of a second's worth, at least 1.
    #[serde(default)]
    pub max_publish_burst: Option<u32>,
    /// Kafka topic for dead letters; required with `error_policy = "dead-letter"`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

/// A broker address for logs and metrics: `host:port`, or `[v6]:port`.
pub fn format_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `"host:port"` or `"[v6]:port"` as host and port.
fn parse_address(a: &str) -> Result<(String, u16), &'static str> {
    const RULE: &str = "must be \"host:port\" (\"[::1]:1883\" for IPv6), port 1..=65535";
    let (host, port) = a.rsplit_once(':').ok_or(RULE)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| RULE)?;
    if host.is_empty() || port == 0 || host.chars().any(char::is_whitespace) {
        return Err(RULE);
    }
    if host.contains(':') && !a.starts_with('[') {
        return Err(RULE);
    }
    Ok((host.to_string(), port))
}

fn default_true() -> bool {
    true
}
fn default_qos() -> u8 {
    1
}
fn default_flush_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(60)
}
fn default_ping_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(3600)
}
fn default_connections() -> usize {
    1
}

fn default_max_inflight() -> u32 {
    1000
}
fn default_max_buffered_records() -> usize {
    5_000
}
fn default_max_buffered_bytes() -> usize {
    16 << 20
}
fn default_backoff_min() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_poison_after() -> u32 {
    3
}
fn default_max_packet_size() -> u32 {
    MAX_MQTT_PACKET
}

impl Config {
    /// A config with the four required options and every default.
    pub fn new(
        client_id: impl Into<String>,
        server: impl Into<String>,
        port: u16,
        topic_root: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            server: server.into(),
            port,
            servers: Vec::new(),
            topic_root: topic_root.into(),
            topic_template: None,
            escape_placeholders: false,
            headers_as_user_properties: HeaderSelection::None,
            coordinates_as_user_properties: false,
            topic_aliases: true,
            username: None,
            password: None,
            version: MqttVersion::default(),
            tls_enabled: true,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
            tls_insecure_skip_verify: false,
            tls_alpn: Vec::new(),
            transport: Transport::Tcp,
            ws_path: None,
            ws_headers: std::collections::BTreeMap::new(),
            qos: default_qos(),
            flush_timeout: default_flush_timeout(),
            retain: false,
            properties: None,
            keepalive: default_keepalive(),
            ping_timeout: default_ping_timeout(),
            ack_timeout: default_ack_timeout(),
            connect_timeout: default_connect_timeout(),
            clean_session: false,
            session_expiry: default_session_expiry(),
            max_inflight: default_max_inflight(),
            connections: default_connections(),
            max_buffered_records: default_max_buffered_records(),
            max_buffered_bytes: default_max_buffered_bytes(),
            reconnect_backoff_min: default_backoff_min(),
            reconnect_backoff_max: default_backoff_max(),
            reconnect_jitter_seed: None,
            max_packet_size: default_max_packet_size(),
            error_policy: ErrorPolicy::default(),
            string_policy: StringPolicy::default(),
            tombstone: TombstonePolicy::default(),
            transform: None,
            max_publish_rate: None,
            max_publish_burst: None,
            poison_after: default_poison_after(),
            qos_downgrade: false,
            dead_letter_topic: None,
        }
    }

    /// The broker addresses in the order tried: `servers`, or `server` and `port`.
    /// Entries that do not parse are left out (validation names them).
    pub fn addresses(&self) -> Vec<(String, u16)> {
        if self.servers.is_empty() {
            vec![(self.server.clone(), self.port)]
        } else {
            self.servers
                .iter()
                .filter_map(|a| parse_address(a).ok())
                .collect()
        }
    }

    /// [`addresses`](Self::addresses) for a log line: `a:1883, b:1883`.
    pub fn addresses_text(&self) -> String {
        self.addresses()
            .iter()
            .map(|(h, p)| format_address(h, *p))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The publish burst in force with `max_publish_rate`: `max_publish_burst`, or a tenth
    /// of a second's worth (at least 1).
    pub fn publish_burst(&self) -> u32 {
        self.max_publish_burst.unwrap_or_else(|| {
            let tenth = self.max_publish_rate.unwrap_or(0.0) / 10.0;
            // Saturating float-to-int cast: the rate is at most 1e6.
            (tenth.ceil() as u32).max(1)
        })
    }

    /// Parses a TOML document holding exactly these options, then validates it.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigErrors> {
        let cfg: Self = toml_de(s)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The WebSocket path in use with `transport = "ws"`: `ws_path`, or `/mqtt`.
    pub fn ws_path(&self) -> &str {
        self.ws_path.as_deref().unwrap_or(DEFAULT_WS_PATH)
    }

    /// The WebSocket options: only with `transport = "ws"`; a path of URL characters
    /// starting with `/`; header names HTTP tokens, not those the upgrade itself sets;
    /// values without control characters.
    fn validate_ws(&self, bad: &mut impl FnMut(&str, String, &str)) {
        if self.transport != Transport::Ws {
            if let Some(p) = &self.ws_path {
                bad(
                    "ws_path",
                    format!("{p:?}"),
                    "is only used with transport = \"ws\"; set transport = \"ws\" or remove it",
                );
            }
            if !self.ws_headers.is_empty() {
                let names: Vec<&str> = self.ws_headers.keys().map(String::as_str).collect();
                bad(
                    "ws_headers",
                    names.join(", "),
                    "are only used with transport = \"ws\"; set transport = \"ws\" or remove them",
                );
            }
            return;
        }
        if let Some(p) = &self.ws_path {
            let url_char = |c: char| {
                c.is_ascii_graphic()
                    && !matches!(
                        c,
                        '#' | '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}'
                    )
            };
            if !p.starts_with('/') || !p.chars().all(url_char) {
                bad(
                    "ws_path",
                    format!("{p:?}"),
                    "must be an HTTP path starting with \"/\" (e.g. \"/mqtt\"), without spaces or control characters",
                );
            }
        }
        const SET_BY_UPGRADE: [&str; 7] = [
            "host",
            "connection",
            "upgrade",
            "sec-websocket-key",
            "sec-websocket-version",
            "sec-websocket-protocol",
            "sec-websocket-extensions",
        ];
        for (name, value) in &self.ws_headers {
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || !name.chars().all(token) {
                bad(
                    "ws_headers",
                    format!("{name:?}"),
                    "a header name must be an HTTP token (letters, digits, and !#$%&'*+-.^_`|~)",
                );
            } else if SET_BY_UPGRADE.contains(&name.to_ascii_lowercase().as_str()) {
                bad(
                    "ws_headers",
                    format!("{name:?}"),
                    "is set by the WebSocket upgrade itself (the host and path come from server, port and ws_path); remove it",
                );
            }
            if value.expose().chars().any(|c| c.is_control() && c != '\t') {
                bad(
                    &format!("ws_headers.{name}"),
                    "(set)".into(),
                    "a header value must not hold control characters (line breaks included)",
                );
            }
        }
    }

    /// Checks every option and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let mut bad = |option: &str, value: String, rule: &str| {
            errs.0.push(ConfigError {
                option: option.to_string(),
                value,
                rule: rule.to_string(),
            })
        };
        let id = &self.client_id;
        // With several connections, each adds `-<i>` to the client id.
        let longest = match self.connections {
            0 | 1 => id.len(),
            n => id.len() + 1 + (n - 1).to_string().len(),
        };
        match self.version {
            MqttVersion::V31 if id.is_empty() || id.len() > 23 => bad(
                "client_id",
                format!("{id:?}"),
                "MQTT 3.1 needs a client id of 1 to 23 bytes; shorten it or use version \"3.1.1\"/\"5\"",
            ),
            MqttVersion::V31 if longest > 23 => bad(
                "client_id",
                format!("{id:?}"),
                &format!(
                    "with connections = {} the client ids are {id}-0 to {id}-{} ({longest} \
                     bytes), and MQTT 3.1 allows 23; shorten it, use fewer connections, or \
                     use version \"3.1.1\"/\"5\"",
                    self.connections,
                    self.connections - 1
                ),
            ),
            MqttVersion::V311 if id.is_empty() && !self.clean_session => bad(
                "client_id",
                "\"\"".into(),
                "MQTT 3.1.1 allows an empty client id only with clean_session = true",
            ),
            _ if id.len() > 65_535 => bad(
                "client_id",
                format!("{:?}…", truncate(id, 40)),
                "must be at most 65535 bytes",
            ),
            _ => {}
        }
        if !self.servers.is_empty() {
            if !self.server.is_empty() || self.port != 0 {
                bad(
                    "servers",
                    format!("{:?}", self.servers),
                    "set either server and port, or servers, not both",
                );
            }
            for a in &self.servers {
                if let Err(rule) = parse_address(a) {
                    bad("servers", format!("{a:?}"), rule);
                }
            }
        } else {
            if self.server.trim().is_empty() || self.server.chars().any(char::is_whitespace) {
                bad(
                    "server",
                    format!("{:?}", self.server),
                    "must be a host name or address without spaces (or list servers)",
                );
            }
            if self.port == 0 {
                bad(
                    "port",
                    "0".into(),
                    "must be 1..=65535 (1883 plain, 8883 TLS)",
                );
            }
        }
        let allow_refusable = self.string_policy == StringPolicy::Allow;
        let connect_strings = [
            ("client_id", Some(&self.client_id)),
            ("username", self.username.as_ref()),
        ];
        for (option, value) in connect_strings {
            let Some(v) = value else { continue };
            let refused = |c: char| c == '\0' || (!allow_refusable && topic::refusable(c));
            if let Some((at, c)) = v.char_indices().find(|&(_, c)| refused(c)) {
                bad(
                    option,
                    format!("{v:?}"),
                    &format!(
                        "contains {} at byte {at}; {}",
                        topic::describe(c),
                        topic::REFUSABLE_WHY
                    ),
                );
            }
        }
        if let Err(e) = topic::check_topic_prefix(&self.topic_root, allow_refusable) {
            bad(
                "topic_root",
                format!("{:?}", self.topic_root),
                &e.to_string(),
            );
        }
        if let Some(t) = &self.topic_template {
            if let Err(rule) = crate::template::Template::parse(t) {
                bad("topic_template", format!("{t:?}"), &rule);
            }
        }
        let v5_only = self.headers_as_user_properties != HeaderSelection::None
            || self.coordinates_as_user_properties;
        if v5_only && self.version != MqttVersion::V5 {
            bad(
                "headers_as_user_properties / coordinates_as_user_properties",
                "(set)".into(),
                &format!(
                    "user properties need version = \"5\" (version is \"{}\")",
                    self.version
                ),
            );
        }
        if let Some(u) = &self.username {
            if u.len() > 65_535 {
                bad("username", "…".into(), "must be at most 65535 bytes");
            }
        }
        if let Some(p) = &self.password {
            if p.expose().len() > 65_535 {
                bad("password", "***".into(), "must be at most 65535 bytes");
            }
            // The 3.1.1 encoder leaves out an empty username and its flag, and a password
            // flag without the username flag breaks [MQTT-3.1.2-22] (review L1).
            if self.username.as_deref().is_none_or(str::is_empty) && self.version != MqttVersion::V5
            {
                bad(
                    "password",
                    "***".into(),
                    "MQTT 3.1/3.1.1 send a password only with a non-empty username: set username",
                );
            }
        }
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            let (option, missing) = if self.tls_client_cert.is_some() {
                ("tls_client_cert", "tls_client_key")
            } else {
                ("tls_client_key", "tls_client_cert")
            };
            bad(
                option,
                "(set)".into(),
                &format!("mutual TLS needs both files: set {missing} too"),
            );
        }
        let tls_only = self.tls_ca_file.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_insecure_skip_verify
            || !self.tls_alpn.is_empty();
        if tls_only && !self.tls_enabled {
            bad(
                "tls_enabled",
                "false".into(),
                "TLS options are set (tls_ca_file, tls_client_cert, tls_insecure_skip_verify or tls_alpn) but TLS is off; set tls_enabled = true or remove them",
            );
        }
        for p in &self.tls_alpn {
            if p.is_empty() || p.len() > 255 {
                bad(
                    "tls_alpn",
                    format!("{p:?}"),
                    "each protocol name must be 1 to 255 bytes",
                );
            }
        }
        self.validate_ws(&mut bad);
        if self.qos > 2 {
            bad("qos", self.qos.to_string(), "must be 0, 1 or 2");
        }
        // Deadlines are `now + duration`: bounded so that no sum overflows (review L5).
        for (option, d) in [
            ("flush_timeout", self.flush_timeout),
            ("ping_timeout", self.ping_timeout),
            ("ack_timeout", self.ack_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_backoff_min", self.reconnect_backoff_min),
            ("reconnect_backoff_max", self.reconnect_backoff_max),
        ] {
            if d > MAX_DURATION {
                bad(option, fmt_dur(d), "must be at most 365 days");
            }
        }
        if self.flush_timeout.is_zero() {
            bad("flush_timeout", "0s".into(), "must be greater than zero");
        }
        if let Some(props) = &self.properties {
            if self.version != MqttVersion::V5 {
                bad(
                    "properties",
                    "{…}".into(),
                    &format!(
                        "MQTT properties need version = \"5\" (version is \"{}\")",
                        self.version
                    ),
                );
            }
            let allow = self.string_policy == StringPolicy::Allow;
            for (field, value, rule) in props.problems(allow) {
                bad(&format!("properties.{field}"), value, &rule);
            }
        }
        if self.keepalive.as_secs() > 65_535 || self.keepalive.subsec_nanos() != 0 {
            bad(
                "keepalive",
                fmt_dur(self.keepalive),
                "must be whole seconds, at most 65535 s (0 disables keep-alive)",
            );
        }
        if self.ping_timeout.is_zero() {
            bad("ping_timeout", "0s".into(), "must be greater than zero");
        }
        if self.ack_timeout.is_zero() {
            bad("ack_timeout", "0s".into(), "must be greater than zero");
        }
        if self.connect_timeout.is_zero() {
            bad("connect_timeout", "0s".into(), "must be greater than zero");
        }
        if self.session_expiry.as_secs() > u64::from(u32::MAX) {
            bad(
                "session_expiry",
                fmt_dur(self.session_expiry),
                "must be at most 4294967295 s",
            );
        }
        if !(1..=65_535).contains(&self.max_inflight) {
            bad(
                "max_inflight",
                self.max_inflight.to_string(),
                "must be 1..=65535 (MQTT packet identifiers)",
            );
        }
        if !(1..=64).contains(&self.connections) {
            bad(
                "connections",
                self.connections.to_string(),
                "must be 1..=64 (MQTT connections to the broker)",
            );
        }
        if self.max_buffered_records == 0 {
            bad("max_buffered_records", "0".into(), "must be at least 1");
        }
        match self.max_publish_rate {
            Some(r) if !(r.is_finite() && (0.001..=1_000_000.0).contains(&r)) => bad(
                "max_publish_rate",
                r.to_string(),
                "must be 0.001..=1000000 publishes per second (leave it out for no limit)",
            ),
            None if self.max_publish_burst.is_some() => bad(
                "max_publish_burst",
                self.max_publish_burst.unwrap_or(0).to_string(),
                "needs max_publish_rate (a burst of what rate?)",
            ),
            _ => {}
        }
        if let Some(code) = &self.transform {
            if let Err(e) = crate::transform::JqTransform::compile(code) {
                bad(
                    "transform",
                    format!("{:?}", truncate(code, 60)),
                    &format!("the jq program does not compile: {e}"),
                );
            }
        }
        if self.max_publish_burst == Some(0) {
            bad("max_publish_burst", "0".into(), "must be at least 1");
        }
        if self.max_buffered_bytes < 1024 {
            bad(
                "max_buffered_bytes",
                self.max_buffered_bytes.to_string(),
                "must be at least 1024",
            );
        }
        if self.reconnect_backoff_min.is_zero() {
            bad(
                "reconnect_backoff_min",
                "0s".into(),
                "must be greater than zero",
            );
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min {
            bad(
                "reconnect_backoff_max",
                fmt_dur(self.reconnect_backoff_max),
                &format!(
                    "must not be less than reconnect_backoff_min ({})",
                    fmt_dur(self.reconnect_backoff_min)
                ),
            );
        }
        if !(64..=MAX_MQTT_PACKET).contains(&self.max_packet_size) {
            bad(
                "max_packet_size",
                self.max_packet_size.to_string(),
                &format!("must be 64..={MAX_MQTT_PACKET} bytes"),
            );
        }
        match (&self.error_policy, &self.dead_letter_topic) {
            (ErrorPolicy::DeadLetter, None) => bad(
                "dead_letter_topic",
                "(unset)".into(),
                "error_policy = \"dead-letter\" needs a Kafka topic here",
            ),
            (_, Some(t)) if t.trim().is_empty() => bad(
                "dead_letter_topic",
                format!("{t:?}"),
                "must be a Kafka topic name",
            ),
            _ => {}
        }
        if errs.0.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The configured QoS as an enum; call after [`validate`](Self::validate).
    pub(crate) fn qos(&self) -> crate::QoS {
        match self.qos {
            0 => crate::QoS::AtMostOnce,
            1 => crate::QoS::AtLeastOnce,
            _ => crate::QoS::ExactlyOnce,
        }
    }
}

fn fmt_dur(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

fn toml_de(s: &str) -> Result<Config, ConfigErrors> {
    toml::from_str(s).map_err(|e: toml::de::Error| {
        let option = e
            .span()
            .and_then(|sp| s.get(..sp.start))
            .and_then(|before| before.lines().last())
            .and_then(|line| line.split('=').next())
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "(config)".to_string());
        ConfigErrors(vec![ConfigError {
            option,
            value: String::new(),
            rule: e.message().to_string(),
        }])
    })
}

/// One problem with one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The option, as written in the config (e.g. `qos`, `properties.response_topic`).
    pub option: String,
    /// Its value as given (secrets shown as `***`).
    pub value: String,
    /// The rule it breaks and what to do.
    pub rule: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.option, self.rule)
        } else {
            write!(f, "{} = {}: {}", self.option, self.value, self.rule)
        }
    }
}

/// Every problem found in a config, in option order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// One problem with an option, its value not shown (a runtime's setup error: the TLS
    /// files, say).
    pub fn one(option: impl Into<String>, rule: impl Into<String>) -> Self {
        let (option, value, rule) = (option.into(), String::new(), rule.into());
        Self(vec![ConfigError {
            option,
            value,
            rule,
        }])
    }

    /// Prefixes every option name, e.g. with `mqtt.` for the daemon's config sections.
    #[must_use]
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        for e in &mut self.0 {
            e.option = format!("{prefix}{}", e.option);
        }
        self
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
