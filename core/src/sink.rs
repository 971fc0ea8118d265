//! [`Sink`]: records in, PUBLISH bytes out, acknowledgements in, commit positions out.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use crate::backoff::Backoff;
use crate::bridge::{ActionReport, BridgeAction};
use crate::config::{
    Config, ConfigError, ConfigErrors, ErrorPolicy, MqttVersion, PublishProperties, StringPolicy,
    TombstonePolicy,
};
use crate::event::{CommitOffsets, Event, FlushInProgress, PushError, PushRefusal, RejectReason};
use crate::ledger::{FlushStatus, FlushTarget, Ledger, RecordId};
use crate::mapper::RecordMapper;
use crate::rate::RateLimit;
use crate::record::{Record, RecordCoords, TopicPartition};
use crate::send_order::SendOrder;
use crate::session::{Conn, Inflight, Msg, Output, SessionStep, Suspect};
use crate::timer::{Timer, TimerTable};
use crate::topic;
use crate::transform::Publish;
use crate::wire::{self, Decoder, PublishParts};
use crate::QoS;

/// The sans-IO MQTT publisher session and Kafka offset ledger.
///
/// A `Sink` never touches a socket, a clock or a thread. Its runtime feeds it facts and
/// commands and drains its outputs:
///
/// * facts: [`handle_connected`](Self::handle_connected),
///   [`handle_input`](Self::handle_input), [`handle_disconnected`](Self::handle_disconnected),
///   [`handle_timeout`](Self::handle_timeout), [`handle_committed`](Self::handle_committed),
///   [`handle_dead_lettered`](Self::handle_dead_lettered);
/// * commands: [`push_record`](Self::push_record), [`begin_flush`](Self::begin_flush),
///   [`assign`](Self::assign), [`revoke`](Self::revoke), [`rewind`](Self::rewind),
///   [`close`](Self::close);
/// * outputs, drained in this order after **every** fact or command:
///   1. [`poll_transmit`](Self::poll_transmit) until it returns `false` (bytes to write);
///   2. [`poll_event`](Self::poll_event) until `None` (act on each: open/close the
///      transport, commit, dead-letter, callbacks); acting may call the sink again, so
///      loop back to 1 until both are empty;
///   3. [`poll_timeout`](Self::poll_timeout): call `handle_timeout` when it passes.
///
/// Every time-sensitive call takes `now`; the sink reads no clock, so a seeded test replays
/// it exactly.
pub struct Sink {
    pub(crate) cfg: Config,
    pub(crate) mapper: RecordMapper,
    /// The QoS of a publish that names none (`qos`; lowered by `qos_downgrade`).
    pub(crate) qos: QoS,
    /// The highest QoS any publish goes at: `ExactlyOnce` until `qos_downgrade` lowered
    /// publishes to what a broker honours; a transform's (route's) QoS above it is capped.
    pub(crate) qos_ceiling: QoS,

    // The MQTT session (see session.rs).
    pub(crate) conn: Conn,
    pub(crate) decoder: Decoder,
    /// Control packets (CONNECT, PUBREL, PINGREQ, acks, DISCONNECT) to write next.
    pub(crate) control: Vec<u8>,
    /// Records accepted, not yet sent, in push order.
    pub(crate) pending: VecDeque<Msg>,
    /// QoS 1/2 publishes awaiting their acknowledgement flow, by send order.
    pub(crate) inflight: SendOrder<Inflight>,
    pub(crate) by_pkid: BTreeMap<u16, u64>,
    /// In-flight entries to resend (DUP PUBLISH or PUBREL) after a session resumed.
    pub(crate) resend: VecDeque<u64>,
    pub(crate) next_seq: u64,
    pub(crate) next_pkid: u16,
    pub(crate) window: u16,
    pub(crate) broker_max_packet: Option<u32>,
    /// The broker's MQTT 5 Maximum QoS on this connection (`ExactlyOnce` when it says none).
    pub(crate) broker_max_qos: QoS,
    pub(crate) retain_available: bool,
    /// MQTT 5 topic aliases of this connection: how many the broker allows, and the
    /// topics that have one.
    pub(crate) alias_max: u16,
    pub(crate) aliases: BTreeMap<Vec<u8>, u16>,
    pub(crate) keepalive_secs: u16,
    pub(crate) ping_outstanding: bool,
    pub(crate) connected_once: bool,
    pub(crate) client_id: String,
    pub(crate) backoff: Backoff,
    pub(crate) timers: TimerTable,
    /// When the current connection's CONNACK arrived.
    pub(crate) connected_at: Option<Instant>,
    /// This connection's output, written or not.
    pub(crate) output: Output,
    /// The publishes one of which made the broker close the last connections (see
    /// `poison_after` and [`Suspect`]).
    pub(crate) suspect: Option<Suspect>,
    /// The last packet the broker sent on this connection refused a publish (a PUBACK or
    /// PUBREC reason >= 0x80): a close right after it is the broker hanging up on that
    /// publish, not evidence against the ones handed out since.
    pub(crate) refused_last: bool,
    /// The newest publish handed out on this connection.
    pub(crate) last_handed: Option<RecordId>,
    /// While probing (see [`Sink::probing`]): the in-flight entry sent alone.
    pub(crate) probe: Option<u64>,
    /// MQTT 3.1/3.1.1 persistent sessions: the step this connection is for.
    pub(crate) session_step: SessionStep,
    /// `close` wants the persistent session ended after its DISCONNECT.
    pub(crate) end_session: bool,
    /// This connection's CONNECT asked for a clean session (so CONNACK must not say
    /// "session present").
    pub(crate) sent_clean: bool,
    /// When the broker last answered the oldest in-flight entry on this connection (the
    /// next one's ack timeout counts from then at the earliest).
    pub(crate) head_since: Option<Instant>,
    /// Why the sink stopped for good (see `Event::Fatal`).
    pub(crate) fatal: Option<String>,

    // The ledger.
    pub(crate) ledger: Ledger,
    pub(crate) next_id: RecordId,
    pub(crate) flush: Option<FlushTarget>,
    pub(crate) flush_dirty: bool,
    pub(crate) dead_lettering: BTreeMap<RecordCoords, RecordId>,
    /// Records routed to several publishes, by record id: what is left of each.
    pub(crate) fanouts: BTreeMap<RecordId, FanOut>,
    /// `assign` was called: pushes for partitions not assigned are refused.
    pub(crate) assignments_used: bool,

    pub(crate) buffered_bytes: usize,
    /// The buffer filled and has not yet drained to its low watermark: `push_record`
    /// refuses until it has (see [`Sink::is_full`]).
    pub(crate) refilling: bool,
    /// The refill timer fired: send into the window whatever is free.
    pub(crate) refill_due: bool,
    /// `max_publish_rate`, when set.
    pub(crate) rate: Option<RateLimit>,
    /// The broker addresses (`servers`, or `server` and `port`) and the one in use.
    pub(crate) addresses: Vec<(String, u16)>,
    pub(crate) address: usize,
    pub(crate) events: VecDeque<Event>,
    pub(crate) stats: Stats,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("conn", &self.conn)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Counters and gauges, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Records held (queued or in flight).
    pub buffered_records: usize,
    /// Bytes held.
    pub buffered_bytes: usize,
    /// QoS 1/2 publishes awaiting acknowledgement.
    pub inflight: usize,
    /// The in-flight window in force.
    pub window: u16,
    /// Bytes handed to the runtime and not yet reported written (at most about
    /// [`MAX_UNWRITTEN`] plus a control packet or two).
    pub unwritten_bytes: u64,
    /// Records pushed.
    pub pushed: u64,
    /// Records acknowledged by the broker.
    pub acknowledged: u64,
    /// Records rejected (any policy).
    pub rejected: u64,
    /// Tombstones not published (`tombstone = "skip"`); their offsets pass.
    pub tombstones_skipped: u64,
    /// Records a transform (or route) turned into no publish; their offsets pass.
    pub filtered: u64,
    /// Publishes beyond the first of records a transform (or route) fanned out.
    pub fanned_out: u64,
    /// PUBLISH packets resent with DUP after a session resumed.
    pub resent: u64,
    /// Successful CONNACKs.
    pub connects: u64,
}

/// One publish encoded, not yet queued.
pub(crate) struct Encoded {
    packet: wire::EncodedPublish,
    qos: QoS,
    retain: bool,
}

/// What is left of a record that became several publishes.
#[derive(Debug)]
pub(crate) struct FanOut {
    pub(crate) tp: TopicPartition,
    /// Publishes not yet done; a dead letter being produced counts as one.
    pub(crate) remaining: usize,
    /// The error policy handled one of its publishes (it applies once per record).
    pub(crate) handled: bool,
}

/// Publishes per `poll_transmit` call are coalesced up to about this many bytes.
const TRANSMIT_BUDGET: usize = 64 * 1024;

/// At most this many bytes of publishes wait in the runtime's output unwritten: the rest
/// of the window waits in the core, unsent, its ack timeouts not running, so that a slow
/// link never makes a whole window look unacknowledged.
pub const MAX_UNWRITTEN: usize = 64 * 1024;

impl Sink {
    /// Validates `cfg` (and that per-record properties come with MQTT 5) and creates the
    /// sink. Its first event asks the runtime to open the transport.
    pub fn new(cfg: Config, mapper: RecordMapper, now: Instant) -> Result<Self, ConfigErrors> {
        let mut errs = match cfg.validate() {
            Ok(()) => ConfigErrors::default(),
            Err(e) => e,
        };
        if mapper.has_properties() && cfg.version != MqttVersion::V5 && cfg.properties.is_none() {
            errs.0.push(ConfigError {
                option: "properties".into(),
                value: "(per-record function)".into(),
                rule: format!(
                    "MQTT properties need version = \"5\" (version is \"{}\")",
                    cfg.version
                ),
            });
        }
        if !errs.0.is_empty() {
            return Err(errs);
        }
        let window = cfg.max_inflight as u16;
        let mut sink = Self {
            qos: cfg.qos(),
            qos_ceiling: QoS::ExactlyOnce,
            decoder: Decoder::new(incoming_limit(&cfg) as usize),
            control: Vec::new(),
            pending: VecDeque::new(),
            inflight: SendOrder::default(),
            by_pkid: BTreeMap::new(),
            resend: VecDeque::new(),
            next_seq: 0,
            next_pkid: 1,
            window,
            broker_max_packet: None,
            broker_max_qos: QoS::ExactlyOnce,
            retain_available: true,
            alias_max: 0,
            aliases: BTreeMap::new(),
            keepalive_secs: cfg.keepalive.as_secs() as u16,
            ping_outstanding: false,
            connected_once: false,
            client_id: cfg.client_id.clone(),
            backoff: Backoff::new(
                cfg.reconnect_backoff_min,
                cfg.reconnect_backoff_max,
                cfg.reconnect_jitter_seed
                    .unwrap_or_else(|| crate::backoff::seed_from(&cfg.client_id)),
            ),
            timers: TimerTable::default(),
            connected_at: None,
            output: Output::default(),
            suspect: None,
            refused_last: false,
            last_handed: None,
            probe: None,
            head_since: None,
            session_step: SessionStep::default(),
            end_session: false,
            sent_clean: false,
            fatal: None,
            ledger: Ledger::default(),
            next_id: 0,
            flush: None,
            flush_dirty: false,
            dead_lettering: BTreeMap::new(),
            fanouts: BTreeMap::new(),
            assignments_used: false,
            buffered_bytes: 0,
            refilling: false,
            refill_due: false,
            addresses: cfg.addresses(),
            address: 0,
            rate: cfg
                .max_publish_rate
                .map(|r| RateLimit::new(r, cfg.publish_burst())),
            events: VecDeque::new(),
            stats: Stats::default(),
            conn: Conn::Backoff,
            cfg,
            mapper,
        };
        sink.open_transport(now);
        Ok(sink)
    }

    /// Shorthand for [`Sink::new`] with [`RecordMapper::from_config`].
    pub fn with_config(cfg: Config, now: Instant) -> Result<Self, ConfigErrors> {
        let mapper = RecordMapper::from_config(&cfg);
        Self::new(cfg, mapper, now)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        Stats {
            buffered_records: self.buffered_records(),
            buffered_bytes: self.buffered_bytes,
            inflight: self.inflight.len(),
            window: self.window,
            unwritten_bytes: self.output.unwritten_bytes(),
            ..self.stats
        }
    }

    pub(crate) fn buffered_records(&self) -> usize {
        self.pending.len() + self.inflight.len()
    }

    /// True when `push_record` would return [`PushError::Full`]: the buffer reached
    /// `max_buffered_records` or `max_buffered_bytes`, or it did and has not yet drained to
    /// three quarters of both (the low watermark).
    ///
    /// The hysteresis is what makes a full sink cheap: without it, every acknowledgement
    /// would free one slot, wake the producer for one record and fill the buffer again (a
    /// bridge would resume and re-pause its Kafka partitions each time, and librdkafka
    /// drops what it prefetched on a pause). With it, a producer waiting for room wakes once
    /// per quarter of the buffer and hands over a batch, while the broker still has three
    /// quarters of the buffer queued to work on.
    pub fn is_full(&self) -> bool {
        self.at_limit() || (self.refilling && !self.below_low_watermark())
    }

    fn at_limit(&self) -> bool {
        self.buffered_records() >= self.cfg.max_buffered_records
            || self.buffered_bytes >= self.cfg.max_buffered_bytes
    }

    /// At or under three quarters of both limits (under a quarter of a record's headroom,
    /// e.g. `max_buffered_records = 1`, that is an empty buffer).
    fn below_low_watermark(&self) -> bool {
        let low = |max: usize| max - (max / 4).max(1);
        self.buffered_records() <= low(self.cfg.max_buffered_records)
            && self.buffered_bytes <= low(self.cfg.max_buffered_bytes)
    }

    /// Takes a record to publish. Returns it in [`PushError::Full`] when the buffer is full
    /// (drive the sink and push again once [`is_full`](Self::is_full) is false: after a
    /// refusal that is when a quarter of the buffer has drained): memory stays bounded by
    /// `max_buffered_records` and `max_buffered_bytes` (plus one record) whatever the
    /// broker does.
    ///
    /// A record that cannot be published (no key, bad topic, too large, ...) is accepted and
    /// reported with [`Event::RecordRejected`]; the error policy decides its offset.
    pub fn push_record(&mut self, _now: Instant, record: Record) -> Result<(), PushError> {
        if matches!(self.conn, Conn::Closing | Conn::Closed) {
            return Err(PushError::Closed(record));
        }
        if self.assignments_used && !self.ledger.is_assigned(&record.tp) {
            return Err(PushError::NotAssigned(record));
        }
        if let Err(o) = self.ledger.check_order(&record.tp, record.offset) {
            return Err(PushError::OutOfOrder {
                record,
                last: o.last,
            });
        }
        if self.is_full() {
            self.refilling = true;
            return Err(PushError::Full(record));
        }
        self.refilling = false;
        let id = self.next_id;
        self.next_id += 1;
        self.stats.pushed += 1;
        self.ledger.push(&record.tp, record.offset, id);
        let tombstone = record.value.is_none();
        if tombstone && self.cfg.tombstone == TombstonePolicy::Skip {
            self.stats.tombstones_skipped += 1;
            self.ledger.resolve(&record.tp, record.offset, id);
            self.flush_dirty = true;
            return Ok(());
        }
        // A tombstone policy other than the default decides tombstones before any route.
        let routed = if tombstone && self.cfg.tombstone != TombstonePolicy::PublishNull {
            None
        } else {
            self.mapper.routed(&record)
        };
        let encoded: Result<Vec<_>, _> = match routed {
            // The plain path: one publish, no allocation for a list of them.
            None => match self.encode(&record) {
                Ok(p) => {
                    self.enqueue(id, record, std::iter::once(p));
                    return Ok(());
                }
                Err(reason) => Err(reason),
            },
            Some(Ok(publishes)) if publishes.is_empty() => {
                self.stats.filtered += 1;
                self.ledger.resolve(&record.tp, record.offset, id);
                self.flush_dirty = true;
                return Ok(());
            }
            Some(Ok(publishes)) => publishes
                .into_iter()
                .map(|p| self.encode_routed(&record, p))
                .collect(),
            Some(Err(reason)) => Err(reason),
        };
        match encoded {
            Ok(packets) => self.enqueue(id, record, packets.into_iter()),
            Err(reason) => {
                let coords = record.coords();
                self.reject(coords, id, reason, Some(record));
            }
        }
        Ok(())
    }

    /// Queues the publishes of one record (pushed as `id`): all or none of them.
    fn enqueue(
        &mut self,
        id: RecordId,
        record: Record,
        packets: impl ExactSizeIterator<Item = Encoded>,
    ) {
        let keep = self.cfg.error_policy == ErrorPolicy::DeadLetter;
        let coords = record.coords();
        let parts = packets.len();
        if parts > 1 {
            self.stats.fanned_out += parts as u64 - 1;
            self.fanouts.insert(
                id,
                FanOut {
                    tp: coords.tp.clone(),
                    remaining: parts,
                    handled: false,
                },
            );
        }
        let mut record = Some(record);
        for (i, e) in packets.into_iter().enumerate() {
            let kept = if !keep {
                None
            } else if i + 1 == parts {
                record.take().map(Box::new)
            } else {
                record.clone().map(Box::new)
            };
            let size = e.packet.bytes.len() + kept.as_ref().map_or(0, |r| r.size());
            self.buffered_bytes += size;
            // The first publish carries the record's id; the others get ids of their own,
            // so that the session tells them apart.
            let msg_id = if i == 0 {
                id
            } else {
                self.next_id += 1;
                self.next_id - 1
            };
            self.pending.push_back(Msg {
                id: msg_id,
                record_id: id,
                coords: coords.clone(),
                packet: e.packet,
                qos: e.qos,
                retain: e.retain,
                record: kept,
                size,
            });
        }
    }

    /// Pushes records in order until one is refused: returns those not taken (the first of
    /// them is the refused one) and why. One call for a batch: a runtime hands a consumer's
    /// ready records over in one round trip.
    pub fn push_batch(
        &mut self,
        now: Instant,
        mut records: VecDeque<Record>,
    ) -> (VecDeque<Record>, Option<PushRefusal>) {
        while let Some(r) = records.pop_front() {
            if let Err(e) = self.push_record(now, r) {
                let why = e.refusal();
                records.push_front(e.into_record());
                return (records, Some(why));
            }
        }
        (records, None)
    }

    /// Executes a bridge's sink action (from `BridgeFlow::poll_action`) and returns its
    /// report, so that both runtimes map actions to sink calls alike. `Flush` (and any
    /// consumer action) comes back unexecuted: the runtime begins the flush and reports
    /// how it ended with `FlushOutcome::from_flush`.
    pub fn execute(
        &mut self,
        now: Instant,
        action: BridgeAction,
    ) -> Result<ActionReport, BridgeAction> {
        match action {
            BridgeAction::Push(records) => {
                let (rest, refusal) = self.push_batch(now, records);
                return Ok(ActionReport::Pushed(rest, refusal));
            }
            BridgeAction::AssignSink(parts) => {
                for (tp, committed) in parts {
                    self.assign(tp, committed);
                }
            }
            BridgeAction::RevokeSink(parts) => parts.iter().for_each(|tp| self.revoke(tp)),
            // The flow seeks the consumer itself.
            BridgeAction::RewindSink => drop(self.rewind()),
            BridgeAction::CommittedSink(offsets) => self.handle_committed(&offsets),
            BridgeAction::Positions => return Ok(ActionReport::Positions(self.commit_positions())),
            other => return Err(other),
        }
        Ok(ActionReport::Done)
    }

    fn encode(&self, r: &Record) -> Result<Encoded, RejectReason> {
        let topic = self.checked_topic(self.mapper.topic(r)?)?;
        let tombstone = r.value.is_none();
        let (payload, retain) = match self.cfg.tombstone {
            TombstonePolicy::ClearRetained if tombstone => (Bytes::new(), true),
            TombstonePolicy::PublishEmpty if tombstone => (Bytes::new(), self.mapper.retain(r)),
            _ => (self.mapper.payload(r)?, self.mapper.retain(r)),
        };
        self.mapper.with_properties(r, |props| {
            self.encode_publish(&topic, payload, self.qos, retain, props)
        })
    }

    /// One publish of a transform's (or route's) output: unset fields as configured.
    fn encode_routed(&self, r: &Record, p: Publish) -> Result<Encoded, RejectReason> {
        let topic = match p.topic {
            Some(t) => t,
            None => self.mapper.topic(r)?,
        };
        let topic = self.checked_topic(topic)?;
        let retain = p.retain.unwrap_or_else(|| self.mapper.retain(r));
        // Above what `qos_downgrade` settled for: at that (it was said once).
        let qos = p.qos.unwrap_or(self.qos).min(self.qos_ceiling);
        match &p.properties {
            Some(props) => self.encode_publish(&topic, p.payload, qos, retain, Some(props)),
            None => self.mapper.with_properties(r, |props| {
                self.encode_publish(&topic, p.payload, qos, retain, props)
            }),
        }
    }

    /// The topic after `string_policy`, or why it cannot be published to.
    fn checked_topic(&self, mut topic: String) -> Result<String, RejectReason> {
        let policy = self.cfg.string_policy;
        if policy == StringPolicy::Escape {
            if let Some(escaped) = topic::escape_refusable(&topic) {
                topic = escaped;
            }
        }
        if let Err(error) = topic::check_topic_allowing(&topic, policy == StringPolicy::Allow) {
            let mut cut = topic;
            if cut.len() > 200 {
                let mut end = 200;
                while !cut.is_char_boundary(end) {
                    end -= 1;
                }
                cut.truncate(end);
            }
            return Err(RejectReason::InvalidTopic { topic: cut, error });
        }
        Ok(topic)
    }

    fn encode_publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        props: Option<&PublishProperties>,
    ) -> Result<Encoded, RejectReason> {
        let policy = self.cfg.string_policy;
        let version = self.cfg.version;
        {
            let props = props.filter(|_| version == MqttVersion::V5);
            if let Some(p) = props {
                if let Some((field, value, rule)) =
                    p.problems(policy == StringPolicy::Allow).into_iter().next()
                {
                    return Err(RejectReason::InvalidProperties(format!(
                        "{field} = {value}: {rule}"
                    )));
                }
            }
            let parts = PublishParts {
                version,
                topic,
                qos,
                retain,
                properties: props,
                payload,
            };
            let size = wire::publish_len(&parts);
            if size > self.cfg.max_packet_size as usize {
                return Err(RejectReason::PacketTooLarge {
                    size,
                    limit: self.cfg.max_packet_size,
                    by_broker: false,
                });
            }
            let packet = wire::encode_publish(parts).map_err(|e| RejectReason::Unencodable(e.0))?;
            Ok(Encoded {
                packet,
                qos,
                retain,
            })
        }
    }

    /// Applies the error policy to a rejected record.
    pub(crate) fn reject(
        &mut self,
        coords: RecordCoords,
        id: RecordId,
        reason: RejectReason,
        record: Option<Record>,
    ) {
        if let Some(f) = self.fanouts.get_mut(&id) {
            if f.handled {
                // Another publish of a record the policy already handled: once per record.
                if self.part_done(id) {
                    self.ledger.resolve(&coords.tp, coords.offset, id);
                    self.flush_dirty = true;
                }
                return;
            }
            f.handled = true;
        }
        self.stats.rejected += 1;
        let policy = self.cfg.error_policy;
        self.events.push_back(Event::RecordRejected {
            coords: coords.clone(),
            reason: reason.clone(),
            policy,
        });
        let tracked = self.ledger.pending_id(&coords.tp, coords.offset) == Some(id);
        if !tracked {
            // Revoked or rewound since it was pushed: its offset is no longer ours.
            return;
        }
        self.flush_dirty = true;
        match policy {
            ErrorPolicy::Fail => {
                self.ledger.fail(&coords.tp, coords.offset, id, reason);
            }
            ErrorPolicy::Skip => {
                if self.part_done(id) {
                    self.ledger.resolve(&coords.tp, coords.offset, id);
                }
            }
            ErrorPolicy::DeadLetter => match record {
                Some(record) => {
                    self.dead_lettering.insert(coords, id);
                    self.events.push_back(Event::DeadLetter { record, reason });
                }
                None => {
                    // Records are kept under this policy; a missing one is a broken invariant.
                    panic!("record {coords} was not kept for dead-lettering");
                }
            },
        }
    }

    /// A record reached the broker (or, at QoS 0, the transport).
    pub(crate) fn acknowledged(&mut self, coords: RecordCoords, id: RecordId) {
        if !self.part_done(id) {
            return;
        }
        if self.ledger.resolve(&coords.tp, coords.offset, id) {
            self.stats.acknowledged += 1;
            self.flush_dirty = true;
            self.events.push_back(Event::RecordAcknowledged(coords));
        }
    }

    /// One publish of record `id` is done (acknowledged, or handled by the policy): true
    /// when that was the record's last (always, for a record of one publish).
    fn part_done(&mut self, id: RecordId) -> bool {
        if self.fanouts.is_empty() {
            return true;
        }
        let Some(f) = self.fanouts.get_mut(&id) else {
            return true;
        };
        f.remaining -= 1;
        if f.remaining > 0 {
            return false;
        }
        self.fanouts.remove(&id);
        true
    }

    /// The runtime produced a dead letter and Kafka confirmed it: its offset may pass (for
    /// a record of several publishes, once the others are done too).
    pub fn handle_dead_lettered(&mut self, coords: &RecordCoords) {
        if let Some(id) = self.dead_lettering.remove(coords) {
            if self.part_done(id) && self.ledger.resolve(&coords.tp, coords.offset, id) {
                self.flush_dirty = true;
            }
        }
    }

    /// The dead-letter produce failed: the record fails as under the `fail` policy.
    pub fn handle_dead_letter_failed(&mut self, coords: &RecordCoords, error: impl Into<String>) {
        if let Some(id) = self.dead_lettering.remove(coords) {
            let reason = RejectReason::DeadLetterFailed(error.into());
            if self.ledger.fail(&coords.tp, coords.offset, id, reason) {
                self.flush_dirty = true;
            }
        }
    }

    /// Starts tracking a partition (Kafka assigned it); `committed` is its committed
    /// position if known. Without any `assign`, partitions are tracked on their first
    /// `push_record`; after the first, a push for a partition not assigned is refused
    /// ([`PushError::NotAssigned`]), so a revoked partition never reappears in the commit
    /// positions.
    pub fn assign(&mut self, tp: TopicPartition, committed: Option<i64>) {
        self.assignments_used = true;
        self.ledger.assign(tp, committed);
    }

    /// Stops tracking a partition (Kafka revoked it). Call after a flush and commit of it:
    /// its queued records are dropped, and acknowledgements of its in-flight ones no longer
    /// count.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.ledger.revoke(tp);
        self.dead_lettering.retain(|c, _| &c.tp != tp);
        self.fanouts.retain(|_, f| &f.tp != tp);
        let mut freed = 0;
        self.pending.retain(|m| {
            let keep = &m.coords.tp != tp;
            if !keep {
                freed += m.size;
            }
            keep
        });
        self.buffered_bytes -= freed;
        self.flush_dirty = true;
    }

    /// Partitions the ledger tracks.
    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.ledger.is_assigned(tp)
    }

    /// Kafka confirmed a commit of these positions.
    pub fn handle_committed(&mut self, offsets: &[(TopicPartition, i64)]) {
        for (tp, pos) in offsets {
            self.ledger.committed(tp, *pos);
        }
    }

    /// After a failed or timed-out flush: forgets every record not yet committed, cancels
    /// the flush, and returns per partition the offset to seek the consumer to (the last
    /// committed position). Records then pushed again from there are new pushes; late
    /// acknowledgements of the old copies are ignored.
    pub fn rewind(&mut self) -> CommitOffsets {
        let to = self.ledger.rewind();
        let freed: usize = self.pending.iter().map(|m| m.size).sum();
        self.pending.clear();
        self.buffered_bytes -= freed;
        self.dead_lettering.clear();
        self.fanouts.clear();
        self.flush = None;
        self.timers.stop(Timer::Flush);
        to
    }

    /// Commit positions now: every record below each is resolved.
    pub fn commit_positions(&self) -> CommitOffsets {
        self.ledger.positions()
    }

    /// Starts a checkpoint over every record pushed so far. It ends with exactly one of
    /// [`Event::FlushCompleted`], [`Event::FlushFailed`] or [`Event::FlushTimedOut`] (at
    /// `deadline`, not later, provided the runtime honours `poll_timeout`).
    pub fn begin_flush(&mut self, _now: Instant, deadline: Instant) -> Result<(), FlushInProgress> {
        if self.flush.is_some() {
            return Err(FlushInProgress);
        }
        if let Some(reason) = &self.fatal {
            // Stopped for good: the flush ends at once, as the one in progress did.
            self.events.push_back(Event::Fatal(reason.clone()));
            return Ok(());
        }
        self.flush = Some(self.ledger.target());
        self.flush_dirty = true;
        self.timers.set(Timer::Flush, deadline);
        Ok(())
    }

    /// The deadline of a flush begun at `now` with the configured `flush_timeout`.
    pub fn flush_deadline(&self, now: Instant) -> Instant {
        now + self.cfg.flush_timeout
    }

    /// True while a flush is running.
    pub fn is_flushing(&self) -> bool {
        self.flush.is_some()
    }

    /// Ends the flush if its outcome is known (`timed_out`: the deadline passed).
    pub(crate) fn check_flush(&mut self, timed_out: bool) {
        self.flush_dirty = false;
        let Some(target) = &self.flush else {
            return;
        };
        let event = match self.ledger.status(target) {
            FlushStatus::Complete => Event::FlushCompleted {
                offsets: self.ledger.positions(),
            },
            FlushStatus::Failed(coords, reason) => Event::FlushFailed {
                coords,
                reason,
                offsets: self.ledger.positions(),
            },
            FlushStatus::Pending if timed_out => Event::FlushTimedOut {
                unacked: self.ledger.unresolved(target),
                offsets: self.ledger.positions(),
            },
            FlushStatus::Pending => return,
        };
        self.flush = None;
        self.timers.stop(Timer::Flush);
        self.events.push_back(event);
    }

    /// The next event, if any. See the drain order on [`Sink`].
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.flush_dirty {
            self.check_flush(false);
        }
        self.events.pop_front()
    }

    /// Until when reading the transport may wait, if it may: while the window is nearly full
    /// and the sink is holding new publishes for a batch of free slots (at most 1 ms), an
    /// acknowledgement read now changes nothing it does before this instant but a wake-up.
    /// A runtime that leaves the socket unread until then reads many acknowledgements in
    /// one call instead of a few per call (the broker coalesces what queued meanwhile).
    /// Optional: reading at once is always correct. Re-read it after every drain.
    pub fn defer_input_until(&self) -> Option<Instant> {
        self.timers
            .get(Timer::Refill)
            .filter(|_| self.conn == Conn::Connected)
    }

    /// Whether the runtime should have what it reads acknowledged at once (TCP_QUICKACK,
    /// `mqtt_sink_tls::quick_ack`): acknowledgements are awaited and no publish waits to be
    /// sent, so no data of ours would carry the TCP ACK, and a broker with Nagle's
    /// algorithm on (Mosquitto's default) holds its next acks until our delayed ACK (40 ms
    /// on Linux): the tail of every checkpoint, and every lull. While publishes wait for
    /// the window, ACKs ride on them and immediate ones would only cut the broker's
    /// segments smaller (measured: +2 us per record on the blocking runtime). Optional;
    /// re-read it after every drain.
    pub fn quick_ack_wanted(&self) -> bool {
        self.conn == Conn::Connected && self.pending.is_empty() && self.inflight.len() > 0
    }

    /// The broker address to open on `Event::OpenTransport` (and the one in use while
    /// connected): with `servers`, the next one after each failed connect or lost
    /// connection.
    pub fn server(&self) -> (&str, u16) {
        // Validation makes `addresses` non-empty.
        self.addresses
            .get(self.address)
            .map_or((self.cfg.server.as_str(), self.cfg.port), |(h, p)| (h, *p))
    }

    /// [`server`](Self::server) as `host:port` (`[v6]:port`), for logs and metrics.
    pub fn server_address(&self) -> String {
        let (host, port) = self.server();
        crate::config::format_address(host, port)
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Time passed: fires every timer due at `now`. Early, late or repeated calls are
    /// harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(t) = self.timers.expired(now) {
            match t {
                Timer::Flush => self.check_flush(true),
                Timer::Reconnect => self.on_reconnect_timer(now),
                Timer::ConnAck => self.on_connack_timeout(now),
                Timer::Keepalive => self.on_keepalive(now),
                Timer::PingResp => self.on_ping_timeout(now),
                Timer::Ack => self.on_ack_timeout(now),
                Timer::Refill => self.refill_due = true,
                // The next poll_transmit may send again.
                Timer::Rate => {}
            }
        }
    }

    /// Writes the bytes to send next into `buf` (appending). Returns false when there is
    /// nothing to send now. Several publishes are coalesced into one call. Publishes are
    /// handed out only while less than [`MAX_UNWRITTEN`] bytes wait unwritten: report
    /// what reached the transport with [`handle_written`](Self::handle_written).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> bool {
        let start = buf.len();
        let room = MAX_UNWRITTEN.saturating_sub(self.output.unwritten_bytes() as usize);
        self.transmit(now, buf, start, start + room.min(TRANSMIT_BUDGET));
        let wrote = buf.len() > start;
        if wrote {
            let o = &mut self.output;
            if o.handed == o.written {
                o.stalled_since = Some(now);
            }
            o.handed += (buf.len() - start) as u64;
            self.on_transmitted(now);
        }
        self.arm_ack_timer();
        wrote
    }

    /// The runtime wrote `n` more bytes of what `poll_transmit` returned to the
    /// transport (in order; a TLS runtime counts plaintext). A publish's ack timeout
    /// starts when its last byte is written; output that waits `ack_timeout` with no byte
    /// written loses the connection (`LostReason::WriteStalled`). Call it after every
    /// write, then drain.
    pub fn handle_written(&mut self, now: Instant, n: usize) {
        self.on_written(now, n);
    }
}

/// The largest packet we accept from the broker (announced in MQTT 5 CONNECT): acks are
/// tiny; publishes only come from subscriptions of an old session.
fn incoming_limit(cfg: &Config) -> u32 {
    cfg.max_packet_size.clamp(1 << 16, 1 << 20)
}

pub(crate) fn connect_limit(cfg: &Config) -> u32 {
    incoming_limit(cfg)
}
