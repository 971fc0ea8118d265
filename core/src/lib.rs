//! The sans-IO core of mqtt-sink: the MQTT publisher session, the Kafka offset ledger and
//! the Kafka side of a bridge.
//!
//! [`Sink`] decides everything: it encodes records as PUBLISH packets (MQTT 3.1, 3.1.1 and
//! 5; QoS 0, 1 and 2), keeps the in-flight window and packet ids, follows every
//! acknowledgement flow, sends keep-alives, resends after a reconnect, backs off, and knows
//! per Kafka partition which offset may be committed: one past the highest offset below
//! which every record was acknowledged, or rejected and handled by the error policy.
//!
//! It reads no clock, opens no socket and starts no thread: a runtime (tokio, std threads,
//! or a test's simulated network) moves bytes, records and time in and out.
//!
//! # The drive loop
//!
//! After every fact (`handle_*`) or command, drain `poll_transmit`, then `poll_event`
//! (acting on each event may feed the sink again: loop until both are empty), then read
//! `poll_timeout` and call `handle_timeout` when it passes. Optionally, leave the socket
//! unread until `defer_input_until` (at most a millisecond, while the sink waits for a batch
//! of acknowledgements): fewer, larger reads, the same outcome. Report every write with
//! `handle_written` (bytes written, in order): the sink hands out at most
//! [`MAX_UNWRITTEN`] bytes of publishes ahead of the transport, and a publish's ack timeout
//! starts when its last byte was written, so a slow link is not mistaken for a dead broker.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use mqtt_sink_core::{Config, Event, Record, Sink, TopicPartition};
//!
//! let mut cfg = Config::new("sink-1", "localhost", 1883, "sensors");
//! cfg.tls_enabled = false;
//! let now = Instant::now(); // the runtime's clock, never the core's
//! let mut sink = Sink::with_config(cfg, now).expect("valid config");
//!
//! // Drain: the first event asks the runtime to open the transport.
//! let mut out = Vec::new();
//! assert!(!sink.poll_transmit(now, &mut out));
//! assert_eq!(sink.poll_event(), Some(Event::OpenTransport { connection: 0 }));
//!
//! // The runtime connected the socket: the sink writes CONNECT.
//! sink.handle_connected(now);
//! assert!(sink.poll_transmit(now, &mut out));
//! assert_eq!(&out[..2], &[0x10, 18]); // CONNECT, 18 bytes follow: socket.write_all(&out)
//! sink.handle_written(now, out.len());
//! out.clear();
//!
//! // The broker answers CONNACK (accepted): the sink is connected.
//! sink.handle_input(now, &[0x20, 0x02, 0x00, 0x00]).expect("valid input");
//! assert!(matches!(sink.poll_event(), Some(Event::Connected(_))));
//!
//! // A Kafka record: the sink writes PUBLISH sensors/device-7 at QoS 1, packet id 1.
//! let tp = TopicPartition::new("readings", 0);
//! let record = Record::new(tp.clone(), 42, Some("device-7"), Some(r#"{"t":21.5}"#));
//! sink.push_record(now, record).expect("room in the buffer");
//! sink.begin_flush(now, sink.flush_deadline(now)).expect("no flush running");
//! assert!(sink.poll_transmit(now, &mut out));
//! sink.handle_written(now, out.len());
//!
//! // PUBACK for packet id 1: the record is acknowledged and the flush completes with
//! // the position to commit, one past offset 42.
//! sink.handle_input(now, &[0x40, 0x02, 0x00, 0x01]).expect("valid input");
//! let mut events = Vec::new();
//! while let Some(e) = sink.poll_event() {
//!     events.push(e);
//! }
//! assert!(events.contains(&Event::FlushCompleted { offsets: vec![(tp, 43)] }));
//!
//! // Keep-alive and flush deadlines come from poll_timeout.
//! let next = sink.poll_timeout().expect("keep-alive armed");
//! assert!(next <= now + Duration::from_secs(60));
//! ```
//!
//! # Several connections
//!
//! With `connections = N` the sink keeps N MQTT sessions, each a value of its own (its
//! packet ids, window, acknowledgement flows, keep-alive, resend and backoff), around one
//! offset ledger and buffer. A publish goes on the connection its topic hashes to, so one
//! topic's publishes keep their order; a record's offset passes once its own connection has
//! it acknowledged. The runtime keeps one transport per connection: `OpenTransport` and
//! `CloseTransport` name theirs, and the per-connection calls take its index
//! (`handle_connected_on`, `handle_input_on`, `handle_disconnected_on`, `poll_transmit_on`,
//! `handle_written_on`, `defer_input_until_on`, `quick_ack_wanted_on`, `server_on`). The
//! calls without `_on` are connection 0's, all a runtime needs with one connection. Drain
//! `poll_transmit_on` for every connection, then the events.
//!
//! # The bridge's drive loop
//!
//! [`BridgeFlow`] is the Kafka half, in the same style: the consumer loop reports facts
//! (partitions assigned or revoked, records delivered, the sink has room) and executes
//! each [`BridgeAction`] it polls, reporting the result before it polls the next. Consumer
//! actions go to the Kafka client; sink actions to the `Sink` above (through its runtime).
//!
//! ```
//! use std::collections::VecDeque;
//! use std::time::Instant;
//! use mqtt_sink_core::{
//!     ActionReport, BridgeAction, BridgeFlow, FlushOutcome, KafkaConfig, Record, TopicPartition,
//! };
//!
//! // Executes every action, reporting each before polling the next; returns the records
//! // pushed. Here the sink takes everything and Kafka accepts everything.
//! fn drain(flow: &mut BridgeFlow, now: Instant) -> usize {
//!     let mut pushed = 0;
//!     while let Some(action) = flow.poll_action(now) {
//!         let report = match action {
//!             // `Sink::push_batch`: none is left over.
//!             BridgeAction::Push(records) => {
//!                 pushed += records.len();
//!                 ActionReport::Pushed(VecDeque::new(), None)
//!             }
//!             BridgeAction::Flush => ActionReport::Flushed(FlushOutcome::from_flush(Ok(vec![]))),
//!             BridgeAction::Commit(offsets) => ActionReport::Committed(offsets, Ok(())),
//!             BridgeAction::Seek { tp, offset } => ActionReport::Sought(tp, offset, Ok(())),
//!             // `Sink::commit_positions` (between checkpoints): nothing acknowledged here.
//!             BridgeAction::Positions => ActionReport::Positions(vec![]),
//!             // Pause, resume, and the sink's assign, revoke, rewind and committed.
//!             _ => ActionReport::Done,
//!         };
//!         flow.handle_report(now, report);
//!     }
//!     pushed
//! }
//!
//! let kafka = KafkaConfig::new("localhost:9092", "mqtt-sink", vec!["readings".into()]);
//! let now = Instant::now(); // the runtime's clock
//! let mut flow = BridgeFlow::new(&kafka, now);
//! let tp = TopicPartition::new("readings", 0);
//!
//! // A rebalance callback: partition 0 assigned, committed position 42. The callback
//! // drains before it returns (a revoke's flush and commit happen in there).
//! flow.handle_assigned(vec![(tp.clone(), Some(42))]);
//! drain(&mut flow, now);
//!
//! // The consumer delivered a record (poll only while `may_poll_consumer`, at most
//! // `room()` records), then drain.
//! assert!(flow.may_poll_consumer(now));
//! flow.handle_records(now, [Record::new(tp.clone(), 42, Some("device-7"), Some("21.5"))]);
//! assert_eq!(drain(&mut flow, now), 1);
//!
//! // Then wait for the consumer (`may_poll_consumer`), for room in the sink
//! // (`waits_for_room`, then `handle_room`), or until `poll_timeout` (the next checkpoint).
//! assert!(flow.poll_timeout() > now);
//! ```
//!
//! # Guarantees
//!
//! - A commit position never passes a record that is not acknowledged (or handled by the
//!   `skip` / `dead-letter` policy).
//! - "Connected" is reported only after a successful CONNACK.
//! - An MQTT 5 PUBACK/PUBREC reason code >= 0x80 rejects the record; 0x10 is success.
//! - A QoS 2 record counts as delivered at PUBCOMP, not PUBREC: if the broker loses the
//!   session in between (a broker killed between snapshots loses the message with it), the
//!   record is published again. A duplicate is possible then; a loss is not.
//! - A record too large for the configured or the broker's limit is rejected once, before
//!   sending, never resent.
//! - Memory is bounded: `push_record` refuses records beyond the configured buffer.
//! - A flush ends at its deadline at the latest.
//! - A bridge commits only partitions it owns, never pushes a record of a partition after
//!   its revoke or rewind, seeks every partition its consumer moved on back to the rewind
//!   point after a failed checkpoint (retrying a failed seek, never skipping it), and lets a
//!   dead letter's offset pass only on a successful delivery report.

#![cfg_attr(not(test), warn(missing_docs))]

mod backoff;
mod bridge;
mod builder;
mod checkpoint;
mod config;
mod event;
mod kafka_config;
mod ledger;
mod mapper;
mod rate;
mod record;
mod router;
mod send_order;
mod session;
mod sink;
mod template;
mod timer;
pub mod topic;
mod transform;
mod wire;

pub use bridge::{
    ActionReport, BridgeAction, BridgeFlow, BridgeStats, FlushOutcome, Transform, HELD_MAX_BYTES,
    HELD_MAX_RECORDS, PAUSE_AFTER,
};
pub use builder::{
    BridgeBuilder, BridgeError, BridgeParts, BridgeRuntime, DeadLetterDone, DeadLetterFn, Hooks,
    SinkBuilder, SinkParts, SinkRuntime,
};
pub use checkpoint::Checkpoints;
pub use config::{
    format_address, Config, ConfigError, ConfigErrors, ErrorPolicy, HeaderSelection, MqttVersion,
    PublishProperties, Secret, StringPolicy, TombstonePolicy, Transport, DEFAULT_WS_PATH,
    MAX_DURATION, MAX_MQTT_PACKET,
};
pub use event::{
    connack_text, reason_text, CommitOffsets, ConnectFailure, Connected, Event, FlushInProgress,
    LostReason, OffsetList, ProtocolError, PushError, PushRefusal, RejectReason, SinkError,
    TrySendError,
};
pub use kafka_config::KafkaConfig;
pub use mapper::{KeySerializer, Properties, RecordMapper, Retain, Route, ValueSerializer};
pub use record::{Header, Record, RecordCoords, TopicPartition};
pub use router::connection_of;
pub use sink::{Sink, Stats, MAX_UNWRITTEN};
pub use transform::{JqTransform, Publish, MAX_OUTPUTS};

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum QoS {
    /// At most once: no acknowledgement.
    AtMostOnce = 0,
    /// At least once: PUBACK.
    AtLeastOnce = 1,
    /// Exactly once: PUBREC, PUBREL, PUBCOMP.
    ExactlyOnce = 2,
}
