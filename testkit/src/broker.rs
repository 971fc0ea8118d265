//! [`SimBroker`]: a sans-IO, seeded, simulated MQTT broker, the peer the publisher core is
//! tested against.
//!
//! It decodes what the client sends with rumqttc's embedded codec (MQTT 3.1.1 and 5), an
//! implementation independent of the core's, and hand-decodes the MQTT 3.1 (`MQIsdp`) CONNECT
//! that rumqttc does not know. Its replies are encoded with the same rumqttc codec, except the
//! few rumqttc cannot write: refused CONNACKs and PUBACK/PUBREC with an arbitrary reason byte,
//! and a v5 DISCONNECT carrying a reason code.
//!
//! No sockets, threads or clock reads: time comes in as `now`, randomness (ack loss and ack
//! order) from a splitmix64 stream seeded by [`SimBroker::new`]. Same seed and same calls give
//! the same bytes.
//!
//! # Driving it
//! 1. [`SimBroker::handle_connect`] when the simulated transport opens.
//! 2. [`SimBroker::handle_input`] with whatever bytes the client wrote, in any chunking.
//! 3. After every `handle_*` or [`SimBroker::disconnect_client`] call, drain
//!    [`SimBroker::poll_transmit`] until it returns `None`, then read
//!    [`SimBroker::poll_timeout`] and call `poll_transmit` again when that instant is reached.
//! 4. When [`SimBroker::wants_close`] turns true (after draining), or the client closes, close
//!    the transport and call [`SimBroker::handle_disconnect`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5 as m5;

/// Largest remaining length an MQTT fixed header can express.
const MAX_REMAINING: usize = 268_435_455;

/// Behaviour of the simulated broker. [`Default`] is a healthy broker: no delay, no loss, no
/// refusals, sessions kept, pings answered, nothing advertised.
#[derive(Debug, Clone)]
pub struct BrokerKnobs {
    /// Each PUBACK/PUBREC/PUBCOMP becomes due this long after the packet it answers arrived.
    pub ack_delay: Duration,
    /// Probability (0.0..=1.0) that one PUBACK/PUBREC/PUBCOMP is never sent. The broker's state
    /// advances as if it had been sent, like a packet lost on the wire.
    pub ack_loss: f64,
    /// When several acks are due at once, emit them in a seeded random order.
    pub reorder_acks: bool,
    /// Refuse this many CONNECTs, then accept. Decremented by each refusal it causes.
    pub refuse_connects: u32,
    /// CONNACK code for `refuse_connects` (v4: 1..=5; v5: e.g. 0x86). 0 means 5 (v4) / 0x87 (v5).
    pub refusal_code: u8,
    /// If set, CONNECTs with other credentials are refused (4 on v4, 0x86 on v5).
    pub require_password: Option<(String, String)>,
    /// v5 only: PUBACK (QoS 1) / PUBREC (QoS 2) reason for publishes to this exact topic. A code
    /// >= 0x80 rejects the message: it is not delivered and a QoS 2 flow ends at the PUBREC.
    pub topic_reason_codes: BTreeMap<String, u8>,
    /// v5: advertised in CONNACK, and a larger packet from the client after the CONNACK is
    /// a violation (DISCONNECT 0x95). 3.1/3.1.1, where the broker cannot announce it: the
    /// connection closes without a reason and without the answers not yet written (as
    /// Mosquitto does), not a violation.
    pub max_packet_size: Option<u32>,
    /// v5: advertised in CONNACK; more unacknowledged QoS > 0 publishes than this is a violation
    /// (DISCONNECT 0x93). A publish stays unacknowledged until [`SimBroker::poll_transmit`]
    /// returned (or lost) its PUBACK, or its PUBCOMP / rejecting PUBREC for QoS 2.
    pub receive_maximum: Option<u16>,
    /// v5: advertised in CONNACK; a topic alias above it is a violation (DISCONNECT 0x94).
    pub topic_alias_maximum: Option<u16>,
    /// v5: advertised in CONNACK (0 or 1); a publish above it is a violation (DISCONNECT 0x9B).
    pub maximum_qos: Option<u8>,
    /// v5: advertised in CONNACK; a retained publish when false is a violation (DISCONNECT 0x9A).
    pub retain_available: Option<bool>,
    /// v5: advertised in CONNACK.
    pub server_keep_alive: Option<u16>,
    /// v5: identifier assigned (and advertised) to a CONNECT with an empty client id;
    /// `None` assigns `sim-<connection index>`.
    pub assigned_client_id: Option<String>,
    /// Keep sessions that ask to persist (clean session / clean start false; v5 also needs a
    /// session expiry > 0) across connections and answer `session_present` when resumed.
    pub keep_sessions: bool,
    /// Answer PINGREQ with PINGRESP; false never answers.
    pub answer_pings: bool,
    /// Close the connection, without a reason and without answering, on a PUBLISH to
    /// one of these topics (a broker refusing something it does not explain: a poison
    /// record). Not a violation. Like Mosquitto, the answers it had not written yet (to
    /// the publishes read with the poison) are lost with the connection.
    pub close_on_topics: BTreeSet<String>,
    /// Mosquitto's strictness: a PUBLISH whose topic or property strings hold a character
    /// MQTT lets a receiver refuse (U+0001-U+001F, U+007F-U+009F, non-characters) closes
    /// the connection (a violation: the sink should have refused it first).
    pub refuse_control_chars: bool,
    /// RabbitMQ's MQTT plugin: a QoS 2 PUBLISH is handled as QoS 1 (delivered, answered
    /// with PUBACK).
    pub qos2_as_qos1: bool,
    /// v5: after answering a publish with a reason >= 0x80 (see `topic_reason_codes`),
    /// close the connection, without a reason, unread publishes lost (Mosquitto 2.0 does so
    /// with `max_queued_messages 0`; AWS IoT Core hangs up on a denied publish). The first
    /// this many of those answers are lost with the connection (a reset: the peer's kernel
    /// discards data its reader had not taken yet); the later ones arrive before the close.
    /// `None`: rejections keep the connection.
    pub close_after_rejection: Option<u32>,
}

impl BrokerKnobs {
    /// Strict mode: the limits of the most demanding brokers at once, each enforced (a
    /// breach is a violation, or closes the connection like the broker that has it): MQTT 5
    /// Receive Maximum 2 and Topic Alias Maximum 2, Maximum Packet Size 256 (announced in
    /// MQTT 5; 3.1/3.1.1 cannot say, the broker closes the connection), a QoS 2 PUBLISH
    /// handled as QoS 1 and answered with PUBACK (RabbitMQ), and the connection closed on a
    /// character MQTT lets a receiver refuse (Mosquitto).
    #[must_use]
    pub fn strict() -> Self {
        Self {
            receive_maximum: Some(2),
            max_packet_size: Some(256),
            topic_alias_maximum: Some(2),
            qos2_as_qos1: true,
            refuse_control_chars: true,
            ..Self::default()
        }
    }
}

impl Default for BrokerKnobs {
    fn default() -> Self {
        Self {
            ack_delay: Duration::ZERO,
            ack_loss: 0.0,
            reorder_acks: false,
            refuse_connects: 0,
            refusal_code: 0,
            require_password: None,
            topic_reason_codes: BTreeMap::new(),
            max_packet_size: None,
            receive_maximum: None,
            topic_alias_maximum: None,
            maximum_qos: None,
            retain_available: None,
            server_keep_alive: None,
            assigned_client_id: None,
            keep_sessions: true,
            answer_pings: true,
            close_on_topics: BTreeSet::new(),
            refuse_control_chars: false,
            qos2_as_qos1: false,
            close_after_rejection: None,
        }
    }
}

/// One CONNECT the broker read, and how it answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectInfo {
    /// [`SimBroker::connection_index`] of the transport it arrived on.
    pub connection: u32,
    /// 3 (MQTT 3.1), 4 (3.1.1) or 5.
    pub protocol_level: u8,
    /// `MQIsdp` or `MQTT`.
    pub protocol_name: String,
    /// Client id as sent (possibly empty).
    pub client_id: String,
    /// v5: the id the broker assigned because `client_id` was empty.
    pub assigned_client_id: Option<String>,
    /// Clean session (v3/v4) or clean start (v5).
    pub clean: bool,
    /// Keep alive in seconds.
    pub keep_alive: u16,
    /// User name, if present and non-empty.
    pub username: Option<String>,
    /// Password, if present and non-empty.
    pub password: Option<String>,
    /// Topic of the will, if any.
    pub will_topic: Option<String>,
    /// v5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    /// v5 Receive Maximum.
    pub receive_maximum: Option<u16>,
    /// v5 Maximum Packet Size.
    pub maximum_packet_size: Option<u32>,
    /// Whether the CONNACK accepted it.
    pub accepted: bool,
    /// The CONNACK return / reason code.
    pub return_code: u8,
    /// The CONNACK session-present flag.
    pub session_present: bool,
}

/// The v5 PUBLISH properties the broker records (all empty for v3/v4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProps {
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// Content Type.
    pub content_type: Option<String>,
    /// Message Expiry Interval in seconds.
    pub message_expiry_interval: Option<u32>,
    /// Payload Format Indicator.
    pub payload_format_indicator: Option<u8>,
    /// Response Topic.
    pub response_topic: Option<String>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// Topic Alias, as sent.
    pub topic_alias: Option<u16>,
}

/// The next number of a process-wide count of publishes read or delivered by simulated
/// brokers: one harness runs on one thread, so its brokers' numbers are in the order things
/// happened across all of them.
pub fn arrival() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One PUBLISH packet as the broker read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Arrival order across every simulated broker of this process ([`arrival`]): what
    /// orders the publishes of several connections' brokers.
    pub seq: u64,
    /// [`SimBroker::connection_index`] of the transport it arrived on.
    pub connection: u32,
    /// Client id of the session (the assigned one if the client sent none).
    pub client_id: String,
    /// Topic, with a v5 topic alias resolved.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// Packet id (0 at QoS 0).
    pub pkid: u16,
    /// v5 properties.
    pub properties: PublishProps,
}

/// One message the broker accepted for routing to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Arrival order across every simulated broker of this process ([`arrival`]): a
    /// topic's publishes that moved between connections are in order by it.
    pub seq: u64,
    /// [`SimBroker::connection_index`] of the transport it arrived on.
    pub connection: u32,
    /// Client id of the publishing session.
    pub client_id: String,
    /// Topic, with a v5 topic alias resolved.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// v5 properties.
    pub properties: PublishProps,
}

/// Why [`SimBroker::handle_input`] rejected the client's bytes. The same text is recorded in
/// [`SimBroker::violations`], and the broker wants to close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerError {
    /// The bytes are not a valid MQTT packet.
    Malformed(String),
    /// A well-formed packet the client was not allowed to send.
    Violation(String),
}

impl BrokerError {
    fn message(&self) -> &str {
        match self {
            Self::Malformed(m) | Self::Violation(m) => m,
        }
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(m) => write!(f, "malformed packet from client: {m}"),
            Self::Violation(m) => write!(f, "protocol violation by client: {m}"),
        }
    }
}

impl std::error::Error for BrokerError {}

/// The simulated broker. See the module docs for the drive order.
#[derive(Debug)]
pub struct SimBroker {
    knobs: BrokerKnobs,
    rng: SplitMix64,
    buf: BytesMut,
    /// Set once a CONNECT was accepted on the current transport.
    conn: Option<Conn>,
    closing: bool,
    connection_index: u32,
    sessions: BTreeMap<String, Session>,
    out: Vec<Outgoing>,
    seq: u64,
    connects: Vec<ConnectInfo>,
    received: Vec<Received>,
    delivered: Vec<Delivered>,
    pubrels: usize,
    violations: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    V4,
    V5,
}

/// Session state that survives a transport when the session persists.
#[derive(Debug, Default)]
struct Session {
    /// QoS 2 ids whose PUBREC was sent and whose PUBREL has not arrived.
    awaiting_rel: BTreeSet<u16>,
    /// QoS 2 ids already released, so a resent PUBREL (after a lost PUBCOMP) is legitimate.
    released: BTreeSet<u16>,
    expires_at: Option<Instant>,
}

/// What the CONNACK promised; enforced for the rest of the connection.
#[derive(Debug)]
struct Limits {
    max_packet_size: Option<u32>,
    receive_maximum: Option<u16>,
    maximum_qos: Option<u8>,
    retain_available: bool,
    topic_alias_maximum: u16,
}

#[derive(Debug)]
struct Conn {
    codec: Codec,
    client_id: String,
    session: Session,
    /// Seconds the session outlives the transport; `None` = forever, `Some(0)` = not at all.
    expiry: Option<u32>,
    limits: Limits,
    aliases: BTreeMap<u16, String>,
    /// QoS 1 ids whose PUBACK has not left yet.
    inflight_q1: BTreeSet<u16>,
    /// QoS 2 ids published on this connection whose flow has not ended yet.
    inflight_q2: BTreeSet<u16>,
}

#[derive(Debug, Clone, Copy)]
enum Flight {
    Q1(u16),
    Q2(u16),
}

#[derive(Debug)]
struct Outgoing {
    due: Instant,
    seq: u64,
    bytes: Vec<u8>,
    is_ack: bool,
    lost: bool,
    completes: Option<Flight>,
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough for test decisions.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        match p {
            p if p <= 0.0 => false,
            p if p >= 1.0 => true,
            p => ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A client packet, decoded by either codec.
enum Inbound {
    Publish(Pub),
    PubRel(u16),
    PingReq,
    /// Client DISCONNECT, with a v5 Session Expiry Interval update if any.
    Disconnect(Option<u32>),
    Unexpected(u8),
}

struct Pub {
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
    props: PublishProps,
}

impl SimBroker {
    /// A broker whose random decisions all come from `seed`.
    pub fn new(seed: u64, knobs: BrokerKnobs) -> Self {
        Self {
            knobs,
            rng: SplitMix64(seed),
            buf: BytesMut::new(),
            conn: None,
            closing: false,
            connection_index: 0,
            sessions: BTreeMap::new(),
            out: Vec::new(),
            seq: 0,
            connects: Vec::new(),
            received: Vec::new(),
            delivered: Vec::new(),
            pubrels: 0,
            violations: Vec::new(),
        }
    }

    /// Change behaviour mid-run. Limits advertised in a CONNACK hold until the next CONNECT.
    pub fn knobs_mut(&mut self) -> &mut BrokerKnobs {
        &mut self.knobs
    }

    /// Call when a new transport connection was accepted: fresh parse buffer, no CONNECT yet,
    /// [`wants_close`](Self::wants_close) cleared. A connection still open is closed first.
    pub fn handle_connect(&mut self, now: Instant) {
        self.handle_disconnect(now);
        self.connection_index += 1;
        self.closing = false;
    }

    /// Call when the transport closed, whoever closed it. The session is stored if it
    /// persists; replies not yet returned by [`poll_transmit`](Self::poll_transmit) are lost.
    pub fn handle_disconnect(&mut self, now: Instant) {
        self.buf.clear();
        self.out.clear();
        let Some(conn) = self.conn.take() else { return };
        if self.knobs.keep_sessions && conn.expiry != Some(0) {
            let mut session = conn.session;
            session.expires_at = conn
                .expiry
                .and_then(|secs| now.checked_add(Duration::from_secs(secs.into())));
            self.sessions.insert(conn.client_id, session);
        }
    }

    /// Call with bytes the client wrote, in any chunking. A malformed packet or protocol
    /// violation returns `Err`, is recorded in [`violations`](Self::violations) and makes the
    /// broker [`wants_close`](Self::wants_close) (a v5 DISCONNECT is queued when possible).
    /// Bytes arriving after the broker decided to close are ignored.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), BrokerError> {
        if self.connection_index == 0 {
            self.handle_connect(now);
        }
        if self.closing {
            return Ok(());
        }
        self.buf.extend_from_slice(bytes);
        while !self.closing {
            let (header, remaining) = match frame_header(&self.buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(m) => return self.fail(now, 0x81, BrokerError::Malformed(m)),
            };
            let size = header + remaining;
            let max = self.conn.as_ref().and_then(|c| c.limits.max_packet_size);
            if let Some(max) = max.filter(|&max| size > max as usize) {
                let v5 = self.conn.as_ref().is_some_and(|c| c.codec == Codec::V5);
                if !v5 {
                    // Not announced: the client could not know. Hang up like Mosquitto.
                    self.out.clear();
                    self.close(now, None);
                    return Ok(());
                }
                let name = packet_name(self.buf[0]);
                let m = format!("{name} of {size} bytes exceeds maximum packet size {max}");
                return self.fail(now, 0x95, BrokerError::Violation(m));
            }
            if self.buf.len() < size {
                break;
            }
            let frame = self.buf.split_to(size);
            self.handle_frame(now, frame)?;
        }
        Ok(())
    }

    /// All bytes due at `now` (immediate replies and acks whose delay elapsed), concatenated in
    /// wire order; `None` when nothing is due. One call drains everything due.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.out)
            .into_iter()
            .partition(|o| o.due <= now);
        self.out = rest;
        due.sort_by_key(|o| (o.due, o.seq));
        if self.knobs.reorder_acks {
            let slots: Vec<usize> = (0..due.len()).filter(|&i| due[i].is_ack).collect();
            for i in (1..slots.len()).rev() {
                let j = self.rng.below(i + 1);
                due.swap(slots[i], slots[j]);
            }
        }
        let mut bytes = Vec::new();
        for o in due {
            if let (Some(flight), Some(conn)) = (o.completes, self.conn.as_mut()) {
                match flight {
                    Flight::Q1(pkid) => conn.inflight_q1.remove(&pkid),
                    Flight::Q2(pkid) => conn.inflight_q2.remove(&pkid),
                };
            }
            if !o.lost {
                bytes.extend_from_slice(&o.bytes);
            }
        }
        (!bytes.is_empty()).then_some(bytes)
    }

    /// When the next queued reply becomes due; `None` when nothing is queued.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.out.iter().map(|o| o.due).min()
    }

    /// True once the broker decided to close this connection (any DISCONNECT it sends is
    /// queued first). Cleared by [`handle_connect`](Self::handle_connect).
    #[must_use]
    pub fn wants_close(&self) -> bool {
        self.closing
    }

    /// Server-initiated disconnect: v5 sends DISCONNECT with `reason_code` (0 sends the
    /// bodiless `e0 00`), v3/v4 just close. Acks not yet due are dropped.
    pub fn disconnect_client(&mut self, now: Instant, reason_code: u8) {
        let v5 = self.conn.as_ref().is_some_and(|c| c.codec == Codec::V5);
        self.close(now, v5.then_some(reason_code));
    }

    /// Every CONNECT read, in order.
    #[must_use]
    pub fn connects(&self) -> &[ConnectInfo] {
        &self.connects
    }

    /// PUBREL packets read (resends included).
    #[must_use]
    pub fn pubrels(&self) -> usize {
        self.pubrels
    }

    /// Client ids of the sessions the broker keeps for clients not connected now
    /// (persistent sessions, unexpired as of their disconnect).
    #[must_use]
    pub fn stored_sessions(&self) -> Vec<String> {
        self.sessions.keys().cloned().collect()
    }

    /// Every PUBLISH packet read, in order, including duplicates and rejected ones.
    #[must_use]
    pub fn received(&self) -> &[Received] {
        &self.received
    }

    /// What the broker accepted for routing: QoS 2 deduplicated per session like a real
    /// broker, QoS 1 resends delivered again, rejected (reason >= 0x80) publishes left out.
    #[must_use]
    pub fn delivered(&self) -> &[Delivered] {
        &self.delivered
    }

    /// Protocol violations by the client, in order, each naming its connection. Most close the
    /// connection; a reused packet id and a PUBREL for an unknown id are only recorded.
    #[must_use]
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// How many transport connections were opened so far (the current one's index).
    #[must_use]
    pub fn connection_index(&self) -> u32 {
        self.connection_index
    }

    /// True when a CONNECT was accepted on the current transport.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    fn handle_frame(&mut self, now: Instant, frame: BytesMut) -> Result<(), BrokerError> {
        let Some(codec) = self.conn.as_ref().map(|c| c.codec) else {
            return self.handle_connect_frame(now, frame);
        };
        if frame[0] >> 4 == 1 {
            let m = "second CONNECT on one connection".to_owned();
            return self.fail(now, 0x82, BrokerError::Violation(m));
        }
        let decoded = match codec {
            Codec::V4 => decode_v4(frame),
            Codec::V5 => decode_v5(frame),
        };
        match decoded {
            Err(e) => self.fail(now, 0x81, e),
            Ok(Inbound::Publish(p)) => self.on_publish(now, p),
            Ok(Inbound::PubRel(pkid)) => {
                self.on_pubrel(now, codec, pkid);
                Ok(())
            }
            Ok(Inbound::PingReq) => {
                if self.knobs.answer_pings {
                    let resp = match codec {
                        Codec::V4 => encode(|b| v4::PingResp.write(b)),
                        Codec::V5 => encode(m5::PingResp::write),
                    };
                    self.push(now, resp, None);
                }
                Ok(())
            }
            Ok(Inbound::Disconnect(expiry)) => {
                if let (Some(secs), Some(conn)) = (expiry, self.conn.as_mut()) {
                    conn.expiry = (secs != u32::MAX).then_some(secs);
                }
                self.closing = true;
                self.buf.clear();
                Ok(())
            }
            Ok(Inbound::Unexpected(byte1)) => {
                let m = format!("unexpected {} from a publishing client", packet_name(byte1));
                self.fail(now, 0x82, BrokerError::Violation(m))
            }
        }
    }

    fn handle_connect_frame(&mut self, now: Instant, frame: BytesMut) -> Result<(), BrokerError> {
        if frame[0] != 0x10 {
            let m = format!("{} before CONNECT", packet_name(frame[0]));
            return self.fail(now, 0, BrokerError::Violation(m));
        }
        let (name, level) = match peek_protocol(&frame) {
            Ok(p) => p,
            Err(e) => return self.fail(now, 0, e),
        };
        let parsed = match (name.as_str(), level) {
            ("MQIsdp", 3) => parse_connect_31(&frame),
            ("MQTT", 4) => parse_connect_v4(frame),
            ("MQTT", 5) => parse_connect_v5(frame),
            _ => {
                self.push(now, vec![0x20, 2, 0, 1], None);
                let m = format!("unsupported protocol {name:?} level {level}");
                return self.fail(now, 0, BrokerError::Violation(m));
            }
        };
        match parsed {
            Ok(mut info) => {
                info.connection = self.connection_index;
                self.on_connect(now, info);
                Ok(())
            }
            Err(e) => self.fail(now, 0, e),
        }
    }

    fn on_connect(&mut self, now: Instant, mut info: ConnectInfo) {
        let v5 = info.protocol_level == 5;
        let knobs = &mut self.knobs;
        let mut refusal = None;
        if knobs.refuse_connects > 0 {
            knobs.refuse_connects -= 1;
            refusal = Some(match knobs.refusal_code {
                0 if v5 => 0x87,
                0 => 5,
                code => code,
            });
        } else if let Some((user, pass)) = &knobs.require_password {
            if info.username.as_ref() != Some(user) || info.password.as_ref() != Some(pass) {
                refusal = Some(if v5 { 0x86 } else { 4 });
            }
        }
        if refusal.is_none() && !v5 && info.client_id.is_empty() && !info.clean {
            refusal = Some(2); // identifier rejected: v3/v4 need a clean session without an id
        }
        if let Some(code) = refusal {
            // Hand-encoded: the refusal code is an arbitrary byte rumqttc may not have a name for.
            let bytes = if v5 {
                vec![0x20, 3, 0, code, 0]
            } else {
                vec![0x20, 2, 0, code]
            };
            self.push(now, bytes, None);
            info.return_code = code;
            self.connects.push(info);
            self.closing = true;
            return;
        }

        let assigned = (v5 && info.client_id.is_empty()).then(|| {
            let n = self.connection_index;
            knobs
                .assigned_client_id
                .clone()
                .unwrap_or_else(|| format!("sim-{n}"))
        });
        let client_id = assigned.clone().unwrap_or_else(|| info.client_id.clone());
        let stored = self.sessions.remove(&client_id);
        let resumed = stored
            .filter(|s| !info.clean && knobs.keep_sessions && s.expires_at.is_none_or(|t| now < t));
        let session_present = resumed.is_some();
        let expiry = match (v5, info.session_expiry) {
            // v5: absent means 0, u32::MAX means the session never expires.
            (true, Some(u32::MAX)) => None,
            (true, secs) => Some(secs.unwrap_or(0)),
            (false, _) => (info.clean).then_some(0),
        };
        let limits = Limits {
            max_packet_size: knobs.max_packet_size,
            receive_maximum: knobs.receive_maximum.filter(|_| v5),
            maximum_qos: knobs.maximum_qos.filter(|_| v5),
            retain_available: !v5 || knobs.retain_available.unwrap_or(true),
            topic_alias_maximum: knobs.topic_alias_maximum.filter(|_| v5).unwrap_or(0),
        };
        let connack = if v5 {
            let props = m5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: knobs.receive_maximum,
                max_qos: knobs.maximum_qos,
                retain_available: knobs.retain_available.map(u8::from),
                max_packet_size: knobs.max_packet_size,
                assigned_client_identifier: assigned.clone(),
                topic_alias_max: knobs.topic_alias_maximum,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: knobs.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            let ack = m5::ConnAck {
                session_present,
                code: m5::ConnectReturnCode::Success,
                // Encodes exactly like `None` when every property is absent.
                properties: Some(props),
            };
            encode(|b| ack.write(b))
        } else {
            let ack = v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present);
            encode(|b| ack.write(b))
        };
        self.push(now, connack, None);
        info.accepted = true;
        info.session_present = session_present;
        info.assigned_client_id = assigned;
        self.connects.push(info);
        self.conn = Some(Conn {
            codec: if v5 { Codec::V5 } else { Codec::V4 },
            client_id,
            session: resumed.unwrap_or_default(),
            expiry,
            limits,
            aliases: BTreeMap::new(),
            inflight_q1: BTreeSet::new(),
            inflight_q2: BTreeSet::new(),
        });
    }

    fn on_publish(&mut self, now: Instant, mut p: Pub) -> Result<(), BrokerError> {
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("PUBLISH is only decoded after an accepted CONNECT")
        };
        let v5 = conn.codec == Codec::V5;
        let mut problem = None;
        if let Some(alias) = p.props.topic_alias.filter(|_| v5) {
            let max = conn.limits.topic_alias_maximum;
            if alias == 0 || alias > max {
                problem = Some((0x94, format!("topic alias {alias} outside 1..={max}")));
            } else if p.topic.is_empty() {
                match conn.aliases.get(&alias) {
                    Some(topic) => p.topic = topic.clone(),
                    None => problem = Some((0x82, format!("topic alias {alias} used before set"))),
                }
            } else {
                conn.aliases.insert(alias, p.topic.clone());
            }
        }
        self.received.push(Received {
            seq: arrival(),
            connection: self.connection_index,
            client_id: conn.client_id.clone(),
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            properties: p.props.clone(),
        });
        let problem = problem.or_else(|| publish_problem(&p, &conn.limits));
        if let Some((code, m)) = problem {
            return self.fail(now, code, BrokerError::Violation(m));
        }
        if self.knobs.refuse_control_chars {
            if let Some(m) = refusable_string(&p) {
                self.note(m);
                self.close(now, None);
                return Ok(());
            }
        }
        if self.knobs.close_on_topics.contains(&p.topic) {
            self.out.clear();
            self.close(now, None);
            return Ok(());
        }
        if self.knobs.qos2_as_qos1 && p.qos == 2 {
            p.qos = 1;
        }

        let in_flight = conn.inflight_q1.contains(&p.pkid)
            || conn.inflight_q2.contains(&p.pkid)
            || conn.session.awaiting_rel.contains(&p.pkid);
        if p.qos > 0 && !p.dup && in_flight {
            self.note(format!(
                "PUBLISH pkid {} reused while in flight without DUP",
                p.pkid
            ));
        }
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("checked above")
        };
        match p.qos {
            1 => conn.inflight_q1.insert(p.pkid),
            2 => conn.inflight_q2.insert(p.pkid),
            _ => false,
        };
        let unacked = conn.inflight_q1.len() + conn.inflight_q2.len();
        if let Some(max) = conn.limits.receive_maximum.filter(|&m| unacked > m.into()) {
            let m = format!("receive maximum {max} exceeded: {unacked} QoS>0 publishes unacked");
            return self.fail(now, 0x93, BrokerError::Violation(m));
        }

        let reason = match v5 {
            true => self
                .knobs
                .topic_reason_codes
                .get(&p.topic)
                .copied()
                .unwrap_or(0),
            false => 0,
        };
        let accepted = reason < 0x80;
        let fresh = p.qos < 2 || !conn.session.awaiting_rel.contains(&p.pkid);
        if p.qos == 2 && accepted {
            conn.session.awaiting_rel.insert(p.pkid);
            conn.session.released.remove(&p.pkid);
        }
        if accepted && fresh {
            self.delivered.push(Delivered {
                seq: arrival(),
                connection: self.connection_index,
                client_id: conn.client_id.clone(),
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: p.props,
            });
        }
        let codec = conn.codec;
        match p.qos {
            1 => self.push_ack(
                now,
                ack_bytes(codec, 0x40, p.pkid, reason),
                Flight::Q1(p.pkid),
            ),
            2 => {
                let ends = (!accepted).then_some(Flight::Q2(p.pkid));
                self.push_ack_opt(now, ack_bytes(codec, 0x50, p.pkid, reason), ends);
            }
            _ => {}
        }
        if let Some(lost) = self.knobs.close_after_rejection.filter(|_| !accepted) {
            if lost > 0 {
                self.knobs.close_after_rejection = Some(lost - 1);
                self.out.clear();
            }
            self.close(now, None);
        }
        Ok(())
    }

    fn on_pubrel(&mut self, now: Instant, codec: Codec, pkid: u16) {
        self.pubrels += 1;
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let session = &mut conn.session;
        let known = if session.awaiting_rel.remove(&pkid) {
            session.released.insert(pkid);
            true
        } else {
            session.released.contains(&pkid)
        };
        if !known {
            self.note(format!("PUBREL for unknown pkid {pkid}"));
        }
        let reason = if known { 0 } else { 0x92 };
        self.push_ack(now, ack_bytes(codec, 0x70, pkid, reason), Flight::Q2(pkid));
    }

    /// Records a violation that a real broker would tolerate; the connection stays open.
    fn note(&mut self, m: String) {
        let n = self.connection_index;
        self.violations.push(format!("{m} (connection {n})"));
    }

    /// Records a fatal violation, queues a v5 DISCONNECT with `v5_reason` when connected, closes.
    fn fail(&mut self, now: Instant, v5_reason: u8, e: BrokerError) -> Result<(), BrokerError> {
        self.note(e.message().to_owned());
        let v5 = self.conn.as_ref().is_some_and(|c| c.codec == Codec::V5);
        self.close(now, v5.then_some(v5_reason));
        Err(e)
    }

    fn close(&mut self, now: Instant, v5_reason: Option<u8>) {
        self.out.retain(|o| o.due <= now);
        if let Some(code) = v5_reason {
            let bytes = match code {
                0 => encode(|b| {
                    m5::Disconnect::new(m5::DisconnectReasonCode::NormalDisconnection).write(b)
                }),
                // Hand-encoded: rumqttc 0.25.1 writes a reason code without properties with a
                // remaining length of 1 followed by 2 bytes, which desynchronises the peer.
                code => vec![0xE0, 2, code, 0],
            };
            self.push(now, bytes, None);
        }
        self.buf.clear();
        self.closing = true;
    }

    fn push(&mut self, due: Instant, bytes: Vec<u8>, completes: Option<Flight>) {
        self.seq += 1;
        self.out.push(Outgoing {
            due,
            seq: self.seq,
            bytes,
            is_ack: false,
            lost: false,
            completes,
        });
    }

    fn push_ack(&mut self, now: Instant, bytes: Vec<u8>, completes: Flight) {
        self.push_ack_opt(now, bytes, Some(completes));
    }

    fn push_ack_opt(&mut self, now: Instant, bytes: Vec<u8>, completes: Option<Flight>) {
        let lost = self.rng.chance(self.knobs.ack_loss);
        self.push(now + self.knobs.ack_delay, bytes, completes);
        if let Some(o) = self.out.last_mut() {
            o.is_ack = true;
            o.lost = lost;
        }
    }
}

/// Fatal problems of a decoded PUBLISH with its topic resolved: `(v5 reason, message)`.
fn publish_problem(p: &Pub, limits: &Limits) -> Option<(u8, String)> {
    if p.topic.is_empty() {
        Some((0x82, "PUBLISH with an empty topic".to_owned()))
    } else if p.topic.contains(['+', '#']) {
        Some((
            0x90,
            format!("PUBLISH to topic {:?} with wildcards", p.topic),
        ))
    } else if let Some(max) = limits.maximum_qos.filter(|&max| p.qos > max) {
        Some((
            0x9B,
            format!("PUBLISH at QoS {} above maximum QoS {max}", p.qos),
        ))
    } else if p.retain && !limits.retain_available {
        Some((
            0x9A,
            "retained PUBLISH while retain is not available".to_owned(),
        ))
    } else {
        None
    }
}

/// The first string of a PUBLISH holding a character Mosquitto refuses, described.
fn refusable_string(p: &Pub) -> Option<String> {
    let bad = |s: &str| s.chars().any(mqtt_sink_core::topic::refusable);
    let pr = &p.props;
    let mut strings: Vec<(&str, &str)> = vec![("topic", &p.topic)];
    strings.extend(pr.content_type.as_deref().map(|c| ("content type", c)));
    strings.extend(pr.response_topic.as_deref().map(|c| ("response topic", c)));
    for (k, v) in &pr.user_properties {
        strings.push(("user property", k));
        strings.push(("user property", v));
    }
    let (what, s) = strings.into_iter().find(|(_, s)| bad(s))?;
    Some(format!(
        "PUBLISH with a refusable character in its {what}: {s:?}"
    ))
}

/// Encodes with rumqttc; its writers only fail on impossible sizes here.
fn encode<E: fmt::Debug>(write: impl FnOnce(&mut BytesMut) -> Result<usize, E>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    write(&mut buf).expect("rumqttc encodes a broker reply of bounded size");
    buf.to_vec()
}

/// PUBACK (0x40), PUBREC (0x50) or PUBCOMP (0x70) for `pkid` with a v5 `reason` (v4 has none).
fn ack_bytes(codec: Codec, kind: u8, pkid: u16, reason: u8) -> Vec<u8> {
    use m5::{PubAckReason as A, PubRecReason as R};
    if codec == Codec::V4 {
        return match kind {
            0x40 => encode(|b| v4::PubAck::new(pkid).write(b)),
            0x50 => encode(|b| v4::PubRec::new(pkid).write(b)),
            _ => encode(|b| v4::PubComp::new(pkid).write(b)),
        };
    }
    const KNOWN: [(u8, A, R); 9] = [
        (0x00, A::Success, R::Success),
        (0x10, A::NoMatchingSubscribers, R::NoMatchingSubscribers),
        (0x80, A::UnspecifiedError, R::UnspecifiedError),
        (
            0x83,
            A::ImplementationSpecificError,
            R::ImplementationSpecificError,
        ),
        (0x87, A::NotAuthorized, R::NotAuthorized),
        (0x90, A::TopicNameInvalid, R::TopicNameInvalid),
        (0x91, A::PacketIdentifierInUse, R::PacketIdentifierInUse),
        (0x97, A::QuotaExceeded, R::QuotaExceeded),
        (0x99, A::PayloadFormatInvalid, R::PayloadFormatInvalid),
    ];
    let known = KNOWN.iter().find(|k| k.0 == reason);
    match (kind, known, reason) {
        (0x40, Some(&(_, reason, _)), _) => {
            let mut ack = m5::PubAck::new(pkid, None);
            ack.reason = reason;
            encode(|b| ack.write(b))
        }
        (0x50, Some(&(_, _, reason)), _) => {
            let mut ack = m5::PubRec::new(pkid, None);
            ack.reason = reason;
            encode(|b| ack.write(b))
        }
        (0x70, _, 0 | 0x92) => {
            let mut ack = m5::PubComp::new(pkid, None);
            if reason == 0x92 {
                ack.reason = m5::PubCompReason::PacketIdentifierNotFound;
            }
            encode(|b| ack.write(b))
        }
        // Hand-encoded: a reason byte rumqttc has no name for; property length 0.
        _ => {
            let [hi, lo] = pkid.to_be_bytes();
            vec![kind, 4, hi, lo, reason, 0]
        }
    }
}

/// `(fixed header length, remaining length)` once the fixed header is complete.
fn frame_header(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err("remaining length longer than 4 bytes".to_owned())
}

fn packet_name(byte1: u8) -> &'static str {
    const NAMES: &str = "reserved CONNECT CONNACK PUBLISH PUBACK PUBREC PUBREL PUBCOMP SUBSCRIBE \
                         SUBACK UNSUBSCRIBE UNSUBACK PINGREQ PINGRESP DISCONNECT AUTH";
    NAMES.split(' ').nth(usize::from(byte1 >> 4)).unwrap_or("?")
}

fn decode_v4(mut frame: BytesMut) -> Result<Inbound, BrokerError> {
    let byte1 = frame[0];
    let packet = v4::Packet::read(&mut frame, MAX_REMAINING).map_err(|e| match e {
        rumqttc::mqttbytes::Error::PacketIdZero => pkid_zero(),
        e => BrokerError::Malformed(format!("{}: {e}", packet_name(byte1))),
    })?;
    Ok(match packet {
        v4::Packet::Publish(p) => Inbound::Publish(Pub {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            props: PublishProps::default(),
        }),
        v4::Packet::PubRel(r) => Inbound::PubRel(r.pkid),
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect(None),
        _ => Inbound::Unexpected(byte1),
    })
}

fn decode_v5(mut frame: BytesMut) -> Result<Inbound, BrokerError> {
    let byte1 = frame[0];
    // rumqttc rejects a DISCONNECT without properties (remaining length 0 or 1): read by hand.
    if byte1 == 0xE0 && frame.len() < 4 {
        return Ok(Inbound::Disconnect(None));
    }
    let malformed = |e: String| BrokerError::Malformed(format!("{}: {e}", packet_name(byte1)));
    let packet = m5::Packet::read(&mut frame, None).map_err(|e| match e {
        rumqttc::v5::mqttbytes::Error::PacketIdZero => pkid_zero(),
        e => malformed(e.to_string()),
    })?;
    Ok(match packet {
        m5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| malformed("topic is not UTF-8".to_owned()))?;
            let pr = p.properties.unwrap_or_default();
            Inbound::Publish(Pub {
                topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                props: PublishProps {
                    user_properties: pr.user_properties,
                    content_type: pr.content_type,
                    message_expiry_interval: pr.message_expiry_interval,
                    payload_format_indicator: pr.payload_format_indicator,
                    response_topic: pr.response_topic,
                    correlation_data: pr.correlation_data,
                    topic_alias: pr.topic_alias,
                },
            })
        }
        m5::Packet::PubRel(r) => Inbound::PubRel(r.pkid),
        m5::Packet::PingReq(_) => Inbound::PingReq,
        m5::Packet::Disconnect(d) => {
            Inbound::Disconnect(d.properties.and_then(|p| p.session_expiry_interval))
        }
        _ => Inbound::Unexpected(byte1),
    })
}

fn pkid_zero() -> BrokerError {
    BrokerError::Violation("PUBLISH with packet id 0 at QoS > 0".to_owned())
}

/// Big-endian reader over a CONNECT body, for what rumqttc does not parse.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BrokerError> {
        if self.0.len() < n {
            return Err(BrokerError::Malformed("CONNECT: truncated".to_owned()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, BrokerError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, BrokerError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], BrokerError> {
        let n = self.u16()?;
        self.take(n.into())
    }

    fn string(&mut self) -> Result<String, BrokerError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec())
            .map_err(|_| BrokerError::Malformed("CONNECT: string is not UTF-8".to_owned()))
    }
}

/// A reader positioned after the fixed header of a complete frame.
fn body(frame: &[u8]) -> Reader<'_> {
    let header = frame_header(frame)
        .ok()
        .flatten()
        .map_or(frame.len(), |(h, _)| h);
    Reader(&frame[header..])
}

fn peek_protocol(frame: &[u8]) -> Result<(String, u8), BrokerError> {
    let mut r = body(frame);
    Ok((r.string()?, r.u8()?))
}

fn blank_connect(level: u8, name: &str) -> ConnectInfo {
    ConnectInfo {
        protocol_level: level,
        protocol_name: name.to_owned(),
        ..ConnectInfo::default()
    }
}

/// MQTT 3.1 CONNECT, by hand: rumqttc only knows protocol name `MQTT`.
fn parse_connect_31(frame: &[u8]) -> Result<ConnectInfo, BrokerError> {
    let mut r = body(frame);
    let mut info = blank_connect(3, &r.string()?);
    r.u8()?; // level, already peeked
    let flags = r.u8()?;
    info.clean = flags & 0x02 != 0;
    info.keep_alive = r.u16()?;
    info.client_id = r.string()?;
    if flags & 0x04 != 0 {
        info.will_topic = Some(r.string()?);
        r.bytes()?;
    }
    if flags & 0x80 != 0 {
        info.username = Some(r.string()?);
    }
    if flags & 0x40 != 0 {
        info.password = Some(r.string()?);
    }
    Ok(info)
}

fn connect_error(e: impl fmt::Display) -> BrokerError {
    BrokerError::Malformed(format!("CONNECT: {e}"))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn parse_connect_v4(mut frame: BytesMut) -> Result<ConnectInfo, BrokerError> {
    let v4::Packet::Connect(c) =
        v4::Packet::read(&mut frame, MAX_REMAINING).map_err(connect_error)?
    else {
        return Err(connect_error("not a CONNECT"));
    };
    let mut info = blank_connect(4, "MQTT");
    info.client_id = c.client_id;
    info.clean = c.clean_session;
    info.keep_alive = c.keep_alive;
    info.will_topic = c.last_will.map(|w| w.topic);
    if let Some(login) = c.login {
        info.username = non_empty(login.username);
        info.password = non_empty(login.password);
    }
    Ok(info)
}

fn parse_connect_v5(mut frame: BytesMut) -> Result<ConnectInfo, BrokerError> {
    let m5::Packet::Connect(c, will, login) =
        m5::Packet::read(&mut frame, None).map_err(connect_error)?
    else {
        return Err(connect_error("not a CONNECT"));
    };
    let mut info = blank_connect(5, "MQTT");
    info.client_id = c.client_id;
    info.clean = c.clean_start;
    info.keep_alive = c.keep_alive;
    info.will_topic = will.map(|w| String::from_utf8_lossy(&w.topic).into_owned());
    if let Some(login) = login {
        info.username = non_empty(login.username);
        info.password = non_empty(login.password);
    }
    if let Some(p) = c.properties {
        info.session_expiry = p.session_expiry_interval;
        info.receive_maximum = p.receive_maximum;
        info.maximum_packet_size = p.max_packet_size;
    }
    Ok(info)
}
