//! What the core tells its runtime: events (facts and requests) and errors.

use std::fmt;
use std::time::Duration;

use crate::config::ErrorPolicy;
use crate::record::{Record, RecordCoords, TopicPartition};
use crate::topic::TopicError;

/// A commit position: the next offset to consume on a partition.
pub type CommitOffsets = Vec<(TopicPartition, i64)>;

/// Something the runtime must act on or report. Drain with [`Sink::poll_event`].
///
/// [`Sink::poll_event`]: crate::Sink::poll_event
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
#[must_use]
pub enum Event {
    /// Open a transport (TCP, TLS) for MQTT connection `connection` (0 with one
    /// connection) to its server and port (`Sink::server_on`), then call
    /// `handle_connected_on`, or `handle_disconnected_on` if it fails.
    OpenTransport {
        /// Which connection (`0..Sink::connections()`).
        connection: usize,
    },
    /// Close that connection's transport after writing what `poll_transmit_on` returned.
    CloseTransport {
        /// Which connection (`0..Sink::connections()`).
        connection: usize,
    },
    /// The broker accepted the CONNECT (a successful CONNACK): the runtime's
    /// "connect success" callback.
    Connected(Connected),
    /// A connection attempt failed: the "connect failure" callback. The core retries after
    /// its backoff.
    ConnectFailed(ConnectFailure),
    /// An established connection was lost; the core reconnects after its backoff.
    ConnectionLost(LostReason),
    /// The broker acknowledged a record (QoS 1 PUBACK, QoS 2 PUBCOMP, or QoS 0 written).
    RecordAcknowledged(RecordCoords),
    /// A record cannot be delivered; `policy` says what happens to its offset.
    RecordRejected {
        /// The record.
        coords: RecordCoords,
        /// Why.
        reason: RejectReason,
        /// The policy applied.
        policy: ErrorPolicy,
    },
    /// Produce this record to the dead-letter topic, then call `handle_dead_lettered`
    /// (or `handle_dead_letter_failed`). Its offset passes only after that.
    DeadLetter {
        /// The record as it was pushed.
        record: Record,
        /// Why it was rejected.
        reason: RejectReason,
    },
    /// The flush begun by `begin_flush` completed: commit exactly these positions.
    FlushCompleted {
        /// Positions to commit.
        offsets: CommitOffsets,
    },
    /// The flush failed: a record was rejected under the `fail` policy. `offsets` may
    /// still be committed (they stop before the record); then `rewind`.
    FlushFailed {
        /// The record that failed.
        coords: RecordCoords,
        /// Why.
        reason: RejectReason,
        /// Positions that are safe to commit.
        offsets: CommitOffsets,
    },
    /// The flush deadline passed with records unacknowledged. `offsets` may still be
    /// committed; then `rewind` and consume again from the returned positions.
    FlushTimedOut {
        /// Records up to the flush point that were not acknowledged.
        unacked: usize,
        /// Positions that are safe to commit.
        offsets: CommitOffsets,
    },
    /// `close` finished: DISCONNECT was sent (if connected) and the sink takes no records.
    Closed,
    /// The sink cannot go on (a broker that does not honour the QoS asked for, without
    /// `qos_downgrade`): it closes for good (`Closed` follows), takes no more records, and a
    /// flush in progress ends with this. Nothing unacknowledged is committed.
    Fatal(String),
    /// MQTT 3.1/3.1.1 with `clean_session = false`: the broker held a session under this
    /// client id that this sink did not make (an earlier instance with the same id that
    /// did not stop cleanly). Its QoS 2 packet ids would swallow new publishes, so the sink
    /// discarded it (one connection with CleanSession=1) and started a persistent one.
    StaleSessionDiscarded {
        /// The client id.
        client_id: String,
    },
    /// The broker does not honour the configured QoS (or one a transform gave publishes)
    /// and `qos_downgrade = true`: publishes above QoS `to` continue at `to` (reported once).
    QosDowngraded {
        /// The QoS asked for: the configured one, or a transform's above it.
        from: u8,
        /// The QoS publishes continue at.
        to: u8,
        /// What the broker (named by address) did.
        why: String,
    },
}

/// A successful CONNACK and what it negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Connected {
    /// The broker's address, `host:port` (one of `servers` when several are listed).
    pub server: String,
    /// The broker resumed an earlier session.
    pub session_present: bool,
    /// MQTT 5: the client id the broker assigned (when ours was empty).
    pub assigned_client_id: Option<String>,
    /// Publishes allowed in flight: min(max_inflight, broker's Receive Maximum).
    pub window: u16,
    /// Largest packet the broker accepts, if it said.
    pub broker_max_packet: Option<u32>,
    /// MQTT 5 Topic Alias Maximum, if the broker said.
    pub topic_alias_maximum: Option<u16>,
    /// MQTT 5 Maximum QoS, if the broker said.
    pub maximum_qos: Option<u8>,
    /// MQTT 5 Retain Available, if the broker said.
    pub retain_available: Option<bool>,
    /// Keep-alive in force (the broker's Server Keep Alive wins).
    pub keepalive_secs: u16,
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// The broker refused the CONNECT with this CONNACK code.
    Refused {
        /// CONNACK return code (3.1/3.1.1: 1..=5) or reason code (5: >= 0x80).
        code: u8,
        /// MQTT 5 reason string, if the broker sent one.
        reason_string: Option<String>,
    },
    /// The transport could not be opened (the runtime's words: DNS, TCP, TLS).
    Transport(String),
    /// No CONNACK within `connect_timeout`.
    Timeout,
    /// The broker sent something other than a valid CONNACK.
    Protocol(String),
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused {
                code,
                reason_string,
            } => {
                write!(
                    f,
                    "the broker refused the connection: {}",
                    connack_text(*code)
                )?;
                if let Some(r) = reason_string {
                    write!(f, " ({r})")?;
                }
                Ok(())
            }
            Self::Transport(e) => write!(f, "could not reach the broker: {e}"),
            Self::Timeout => f.write_str("no CONNACK from the broker within connect_timeout"),
            Self::Protocol(e) => write!(f, "protocol error during connect: {e}"),
        }
    }
}

/// Text of a CONNACK code (3.1.1 return codes and MQTT 5 reason codes).
pub fn connack_text(code: u8) -> String {
    let t = match code {
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8C => "bad authentication method",
        0x90 => "topic name invalid",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9F => "connection rate exceeded",
        _ => "unknown code",
    };
    format!("code {code} (0x{code:02X}) {t}")
}

/// Text of an MQTT 5 PUBACK/PUBREC/DISCONNECT reason code.
pub fn reason_text(code: u8) -> String {
    let t = match code {
        0x00 => "success",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x89 => "server busy",
        0x8B => "server shutting down",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        _ => "unknown reason",
    };
    format!("reason 0x{code:02X} {t}")
}

/// Why an established connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The transport closed or failed (the runtime's words).
    Transport(String),
    /// The broker sent DISCONNECT (MQTT 5 reason code; 0 for 3.1.1 or a bodiless one).
    ServerDisconnect {
        /// Reason code.
        code: u8,
        /// Reason string, if any.
        reason_string: Option<String>,
    },
    /// No PINGRESP within `ping_timeout`.
    PingTimeout,
    /// A publish went unacknowledged for `ack_timeout`; it is resent on the new connection.
    AckTimeout {
        /// The record waiting longest.
        coords: RecordCoords,
    },
    /// Output waited `ack_timeout` with no byte written: the link or the broker stalled.
    WriteStalled {
        /// Bytes the runtime held unwritten.
        unwritten: u64,
        /// How long no byte was written and nothing answered.
        waited: Duration,
    },
    /// The broker broke the protocol.
    Protocol(String),
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "transport lost: {e}"),
            Self::ServerDisconnect {
                code,
                reason_string,
            } => {
                write!(f, "the broker disconnected: {}", reason_text(*code))?;
                if let Some(r) = reason_string {
                    write!(f, " ({r})")?;
                }
                Ok(())
            }
            Self::PingTimeout => f.write_str("no PINGRESP within ping_timeout"),
            Self::AckTimeout { coords } => write!(
                f,
                "record {coords} unacknowledged for ack_timeout; reconnecting to resend it"
            ),
            Self::WriteStalled { unwritten, waited } => write!(
                f,
                "no byte could be written and nothing was answered for {waited:.1?} \
                 ({unwritten} bytes waiting, more than ack_timeout): the link or the broker \
                 stalled; reconnecting"
            ),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// Why a record cannot be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The record has no key and the key serializer needs one.
    MissingKey,
    /// The key is not UTF-8.
    KeyNotUtf8,
    /// A custom key serializer failed.
    KeySerializer(String),
    /// The value serializer failed.
    ValueSerializer(String),
    /// The topic the record maps to is not a valid MQTT topic.
    InvalidTopic {
        /// The topic (cut to 200 bytes).
        topic: String,
        /// The rule it breaks.
        error: TopicError,
    },
    /// The PUBLISH is larger than allowed.
    PacketTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: u32,
        /// True if the limit is the broker's Maximum Packet Size, false if `max_packet_size`.
        by_broker: bool,
    },
    /// The record asks for retain but the broker has Retain Available = 0.
    RetainNotSupported,
    /// MQTT 5 per-record properties are invalid.
    InvalidProperties(String),
    /// The broker answered with an MQTT 5 reason code >= 0x80.
    Broker {
        /// The reason code.
        code: u8,
    },
    /// The dead-letter produce failed.
    DeadLetterFailed(String),
    /// The PUBLISH could not be encoded.
    Unencodable(String),
    /// The topic template cannot render for this record.
    Template(String),
    /// The `transform` program (or route function) failed on this record, or one of its
    /// outputs is not a publish.
    Transform(String),
    /// The broker closed the connection this many times in a row right after this publish,
    /// with no acknowledgement in between (`poison_after`): a string or size it refuses
    /// without saying so.
    Poison {
        /// How many connections ended right after it.
        closes: u32,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingKey => f.write_str(
                "the record has no key; the topic is {topic_root}/{key}: give records a key or set a key serializer",
            ),
            Self::KeyNotUtf8 => f.write_str(
                "the record key is not UTF-8; set a key serializer that maps it to text",
            ),
            Self::KeySerializer(e) => write!(f, "the key serializer failed: {e}"),
            Self::ValueSerializer(e) => write!(f, "the value serializer failed: {e}"),
            Self::InvalidTopic { topic, error } => write!(f, "topic {topic:?}: {error}"),
            Self::PacketTooLarge {
                size,
                limit,
                by_broker,
            } => write!(
                f,
                "the PUBLISH is {size} bytes, over the {} of {limit} bytes",
                if *by_broker {
                    "broker's Maximum Packet Size"
                } else {
                    "configured max_packet_size"
                }
            ),
            Self::RetainNotSupported => {
                f.write_str("the record asks for retain but the broker does not support it")
            }
            Self::InvalidProperties(e) => write!(f, "invalid MQTT 5 properties: {e}"),
            Self::Broker { code } => write!(f, "the broker rejected it: {}", reason_text(*code)),
            Self::DeadLetterFailed(e) => write!(f, "the dead-letter produce failed: {e}"),
            Self::Unencodable(e) => write!(f, "the PUBLISH cannot be encoded: {e}"),
            Self::Template(e) => write!(f, "the topic template cannot render: {e}"),
            Self::Transform(e) => write!(f, "the transform failed: {e}"),
            Self::Poison { closes } => write!(
                f,
                "the broker closed the connection {closes} times right after this publish \
                 (poison_after = {closes}); it refuses something in it without saying what \
                 (a character, the size, a property)"
            ),
        }
    }
}

impl Event {
    /// The answer for a runtime's `flush` callers: `Some` for the three events that end a
    /// flush (`FlushCompleted`, `FlushTimedOut`, `FlushFailed`), `None` for the others.
    pub fn flush_result(&self) -> Option<Result<CommitOffsets, SinkError>> {
        match self {
            Self::FlushCompleted { offsets } => Some(Ok(offsets.clone())),
            Self::FlushTimedOut { unacked, offsets } => Some(Err(SinkError::FlushTimedOut {
                unacked: *unacked,
                offsets: offsets.clone(),
            })),
            Self::FlushFailed { offsets, .. } => Some(Err(SinkError::FlushFailed {
                message: self.to_string(),
                offsets: offsets.clone(),
            })),
            Self::Fatal(reason) => Some(Err(SinkError::Fatal(reason.clone()))),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OpenTransport { connection } => write!(f, "open transport {connection}"),
            Self::CloseTransport { connection } => write!(f, "close transport {connection}"),
            Self::Connected(c) => write!(
                f,
                "connected to {} (session present: {}, window {})",
                c.server, c.session_present, c.window
            ),
            Self::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            Self::ConnectionLost(e) => write!(f, "connection lost: {e}"),
            Self::RecordAcknowledged(c) => write!(f, "record {c} acknowledged"),
            Self::RecordRejected {
                coords,
                reason,
                policy,
            } => write!(f, "record {coords} rejected ({policy}): {reason}"),
            Self::DeadLetter { record, reason } => {
                write!(
                    f,
                    "record {} to the dead-letter topic: {reason}",
                    record.coords()
                )
            }
            Self::FlushCompleted { offsets } => {
                write!(f, "flush completed; commit {}", fmt_offsets(offsets))
            }
            Self::FlushFailed {
                coords,
                reason,
                offsets,
            } => write!(
                f,
                "flush failed at record {coords}: {reason}; safe to commit {}",
                fmt_offsets(offsets)
            ),
            Self::FlushTimedOut { unacked, offsets } => write!(
                f,
                "flush timed out with {unacked} record(s) unacknowledged; safe to commit {}",
                fmt_offsets(offsets)
            ),
            Self::Closed => f.write_str("closed"),
            Self::Fatal(reason) => write!(f, "the sink stops: {reason}"),
            Self::StaleSessionDiscarded { client_id } => write!(
                f,
                "discarded the session an earlier instance left under client id {client_id:?} \
                 (its QoS 2 packet ids would have swallowed new publishes); a new one starts"
            ),
            Self::QosDowngraded { from, to, why } => write!(
                f,
                "{why}; qos_downgrade = true: publishing at QoS {to} instead of {from} from now on"
            ),
        }
    }
}

fn fmt_offsets(o: &CommitOffsets) -> OffsetList<'_> {
    OffsetList(o)
}

/// Positions for a log line, in plain text: `readings/0@1000, readings/1@998` (`nothing`
/// when empty). The `Debug` of the list would print Rust tuples.
#[derive(Debug, Clone, Copy)]
pub struct OffsetList<'a>(pub &'a [(TopicPartition, i64)]);

impl fmt::Display for OffsetList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("nothing");
        }
        for (i, (tp, off)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{tp}@{off}")?;
        }
        Ok(())
    }
}

/// The broker broke the protocol; the connection is closed (the core has already emitted
/// `CloseTransport` and `ConnectionLost`) and will be reopened after the backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MQTT protocol error from the broker: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// `push_record` could not take the record; it comes back.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
#[must_use]
pub enum PushError {
    /// The buffer is full (`max_buffered_records` / `max_buffered_bytes`): wait for acks
    /// (drive the sink) until `Sink::is_full` is false, then push it again. This is the
    /// backpressure; once refused, pushes resume when a quarter of the buffer has drained.
    Full(Record),
    /// The offset is not above the last one pushed for its partition: rewind first, or
    /// push in offset order.
    OutOfOrder {
        /// The record.
        record: Record,
        /// The last offset pushed on its partition.
        last: i64,
    },
    /// The sink is closed.
    Closed(Record),
    /// Assignments are in use (`Sink::assign` was called) and the record's partition is not
    /// assigned (never, or revoked since): its offsets belong to another group member.
    NotAssigned(Record),
}

impl PushError {
    /// The record, back to the caller.
    pub fn into_record(self) -> Record {
        match self {
            Self::Full(r)
            | Self::Closed(r)
            | Self::NotAssigned(r)
            | Self::OutOfOrder { record: r, .. } => r,
        }
    }

    /// Why, without the record.
    pub fn refusal(&self) -> PushRefusal {
        match self {
            Self::Full(_) => PushRefusal::Full,
            Self::Closed(_) => PushRefusal::Closed,
            Self::NotAssigned(_) => PushRefusal::NotAssigned,
            Self::OutOfOrder { last, .. } => PushRefusal::OutOfOrder { last: *last },
        }
    }
}

/// Why `Sink::push_batch` stopped before the end of its batch (the first record left is
/// the one refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushRefusal {
    /// The buffer is full: push again once `Sink::is_full` is false.
    Full,
    /// The sink is closed.
    Closed,
    /// The offset is not above the last one pushed for its partition.
    OutOfOrder {
        /// The last offset pushed on its partition.
        last: i64,
    },
    /// The record's partition is not assigned.
    NotAssigned,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(r) => write!(f, "record {}: the sink buffer is full", r.coords()),
            Self::OutOfOrder { record, last } => write!(
                f,
                "record {}: offset not above the last pushed offset {last} of its partition; rewind first",
                record.coords()
            ),
            Self::Closed(r) => write!(f, "record {}: the sink is closed", r.coords()),
            Self::NotAssigned(r) => write!(
                f,
                "record {}: its partition is not assigned to this sink (revoked, or never assigned)",
                r.coords()
            ),
        }
    }
}

impl std::error::Error for PushError {}

/// `begin_flush` while a flush is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushInProgress;

impl fmt::Display for FlushInProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a flush is already in progress; wait for its outcome event")
    }
}

impl std::error::Error for FlushInProgress {}

/// Errors of a runtime's `MqttSink` operations (the same for every runtime).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SinkError {
    /// The flush timed out: this many records were not acknowledged in time.
    FlushTimedOut {
        /// Records not acknowledged.
        unacked: usize,
        /// Positions that are safe to commit nevertheless.
        offsets: CommitOffsets,
    },
    /// The flush failed on a rejected record (error policy `fail`): the message names it.
    FlushFailed {
        /// What failed, naming the record by topic/partition@offset.
        message: String,
        /// Positions that are safe to commit nevertheless.
        offsets: CommitOffsets,
    },
    /// The record was refused (closed sink, offset out of order).
    Push(String),
    /// The sink's task or thread has stopped.
    Closed,
    /// The sink stopped for good (see [`Event::Fatal`]).
    Fatal(String),
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FlushTimedOut { unacked, .. } => write!(
                f,
                "flush timed out: {unacked} record(s) not acknowledged by the broker within flush_timeout"
            ),
            Self::FlushFailed { message, .. } => write!(f, "flush failed: {message}"),
            Self::Push(e) => write!(f, "{e}"),
            Self::Closed => f.write_str("the sink is closed"),
            Self::Fatal(reason) => write!(f, "the sink stopped: {reason}"),
        }
    }
}

impl std::error::Error for SinkError {}

/// A runtime's `try_send` could not take the record.
#[derive(Debug, Clone, PartialEq)]
pub enum TrySendError {
    /// The buffer is full: here is the record back; retry once acknowledgements free room.
    Full(Record),
    /// Refused for good (closed sink, offset out of order).
    Refused(SinkError),
}

impl From<PushError> for TrySendError {
    /// A full buffer hands the record back; any other refusal is final.
    fn from(e: PushError) -> Self {
        match e {
            PushError::Full(r) => Self::Full(r),
            e => Self::Refused(SinkError::Push(e.to_string())),
        }
    }
}
