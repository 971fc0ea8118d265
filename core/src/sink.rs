//! [`Sink`]: records in, PUBLISH bytes out, acknowledgements in, commit positions out.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use crate::bridge::{ActionReport, BridgeAction};
use crate::config::{
    Config, ConfigError, ConfigErrors, ErrorPolicy, MqttVersion, PublishProperties, StringPolicy,
    TombstonePolicy,
};
use crate::event::{
    CommitOffsets, Event, FlushInProgress, ProtocolError, PushError, PushRefusal, RejectReason,
    SinkError,
};
use crate::ledger::{FlushStatus, FlushTarget, Ledger, RecordId};
use crate::mapper::RecordMapper;
use crate::rate::RateLimit;
use crate::record::{Record, RecordCoords, TopicPartition};
use crate::router::Router;
use crate::session::{Conn, Msg, Session};
use crate::timer::{Timer, TimerTable};
use crate::topic;
use crate::transform::Publish;
use crate::wire::{self, PublishParts};
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
    pub(crate) sh: Shared,
    /// The MQTT connections (`connections`), each a [`Session`]; the router picks the one
    /// a publish goes on, so that publishes to one topic keep their order.
    pub(crate) sessions: Vec<Session>,
}

/// What the sink's connections share: the offset ledger, the buffer's accounting, the error
/// policy's bookkeeping, the flush, and the events. A [`Session`] is handed it to resolve a
/// publish ([`acknowledged`](Self::acknowledged), [`reject`](Self::reject),
/// [`free`](Self::free)) and to report; it holds no connection state.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) mapper: RecordMapper,
    /// The QoS of a publish that names none (`qos`; lowered by `qos_downgrade`).
    pub(crate) qos: QoS,
    /// The highest QoS any publish goes at: `ExactlyOnce` until `qos_downgrade` lowered
    /// publishes to what a broker honours; a transform's (route's) QoS above it is capped.
    pub(crate) qos_ceiling: QoS,
    /// `qos_downgrade` lowered the ceiling on one connection: the sink lowers the others'
    /// publishes (`Sink::settle`).
    pub(crate) lowered: Option<QoS>,
    /// Why the sink stopped for good (see `Event::Fatal`).
    pub(crate) fatal: Option<String>,
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
    /// Which connection each publish goes on.
    pub(crate) router: Router,
    /// `max_publish_rate`, when set: one allowance for all connections.
    pub(crate) rate: Option<RateLimit>,
    /// The flush deadline (the connections' timers are their own).
    pub(crate) timers: TimerTable,
    /// Connections closed for good, of `connections`: `Event::Closed` when all are.
    pub(crate) closed: usize,
    pub(crate) events: VecDeque<Event>,
    pub(crate) stats: Stats,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conns: Vec<_> = self.sessions.iter().map(|s| s.conn).collect();
        f.debug_struct("Sink")
            .field("connections", &conns)
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
pub(crate) const TRANSMIT_BUDGET: usize = 64 * 1024;

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
        let sessions = (0..cfg.connections.max(1))
            .map(|i| Session::new(i, &cfg))
            .collect();
        let mut sink = Self {
            sessions,
            sh: Shared {
                qos: cfg.qos(),
                qos_ceiling: QoS::ExactlyOnce,
                lowered: None,
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
                rate: cfg
                    .max_publish_rate
                    .map(|r| RateLimit::new(r, cfg.publish_burst())),
                timers: TimerTable::default(),
                router: Router::new(cfg.connections),
                closed: 0,
                events: VecDeque::new(),
                stats: Stats::default(),
                cfg,
                mapper,
            },
        };
        for session in &mut sink.sessions {
            session.open_transport(&mut sink.sh, now);
        }
        Ok(sink)
    }

    /// Shorthand for [`Sink::new`] with [`RecordMapper::from_config`].
    pub fn with_config(cfg: Config, now: Instant) -> Result<Self, ConfigErrors> {
        let mapper = RecordMapper::from_config(&cfg);
        Self::new(cfg, mapper, now)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.sh.cfg
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        Stats {
            buffered_records: self.buffered_records(),
            buffered_bytes: self.sh.buffered_bytes,
            inflight: self.sessions.iter().map(|s| s.inflight.len()).sum(),
            window: self
                .sessions
                .iter()
                .map(|s| s.window)
                .fold(0, u16::saturating_add),
            unwritten_bytes: self
                .sessions
                .iter()
                .map(|s| s.output.unwritten_bytes())
                .sum(),
            ..self.sh.stats
        }
    }

    pub(crate) fn buffered_records(&self) -> usize {
        self.sessions.iter().map(Session::held).sum()
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
        self.at_limit() || (self.sh.refilling && !self.below_low_watermark())
    }

    fn at_limit(&self) -> bool {
        self.buffered_records() >= self.sh.cfg.max_buffered_records
            || self.sh.buffered_bytes >= self.sh.cfg.max_buffered_bytes
    }

    /// At or under three quarters of both limits (under a quarter of a record's headroom,
    /// e.g. `max_buffered_records = 1`, that is an empty buffer).
    fn below_low_watermark(&self) -> bool {
        let low = |max: usize| max - (max / 4).max(1);
        self.buffered_records() <= low(self.sh.cfg.max_buffered_records)
            && self.sh.buffered_bytes <= low(self.sh.cfg.max_buffered_bytes)
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
        if self
            .sessions
            .iter()
            .any(|s| matches!(s.conn, Conn::Closing | Conn::Closed))
        {
            return Err(PushError::Closed(record));
        }
        if self.sh.assignments_used && !self.sh.ledger.is_assigned(&record.tp) {
            return Err(PushError::NotAssigned(record));
        }
        if let Err(o) = self.sh.ledger.check_order(&record.tp, record.offset) {
            return Err(PushError::OutOfOrder {
                record,
                last: o.last,
            });
        }
        if self.is_full() {
            self.sh.refilling = true;
            return Err(PushError::Full(record));
        }
        self.sh.refilling = false;
        let id = self.sh.next_id;
        self.sh.next_id += 1;
        self.sh.stats.pushed += 1;
        self.sh.ledger.push(&record.tp, record.offset, id);
        let tombstone = record.value.is_none();
        if tombstone && self.sh.cfg.tombstone == TombstonePolicy::Skip {
            self.sh.stats.tombstones_skipped += 1;
            self.sh.ledger.resolve(&record.tp, record.offset, id);
            self.sh.flush_dirty = true;
            return Ok(());
        }
        // A tombstone policy other than the default decides tombstones before any route.
        let routed = if tombstone && self.sh.cfg.tombstone != TombstonePolicy::PublishNull {
            None
        } else {
            self.sh.mapper.routed(&record)
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
                self.sh.stats.filtered += 1;
                self.sh.ledger.resolve(&record.tp, record.offset, id);
                self.sh.flush_dirty = true;
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
                self.sh.reject(coords, id, reason, Some(record));
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
        let keep = self.sh.cfg.error_policy == ErrorPolicy::DeadLetter;
        let coords = record.coords();
        let parts = packets.len();
        if parts > 1 {
            self.sh.stats.fanned_out += parts as u64 - 1;
            self.sh.fanouts.insert(
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
            self.sh.buffered_bytes += size;
            // The first publish carries the record's id; the others get ids of their own,
            // so that the session tells them apart.
            let msg_id = if i == 0 {
                id
            } else {
                self.sh.next_id += 1;
                self.sh.next_id - 1
            };
            let route = self.sh.router.key(wire::publish_topic(&e.packet));
            let to = self.sh.router.route(route, e.qos);
            self.sessions[to].pending.push_back(Msg {
                route,
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
        let topic = self.checked_topic(self.sh.mapper.topic(r)?)?;
        let tombstone = r.value.is_none();
        let (payload, retain) = match self.sh.cfg.tombstone {
            TombstonePolicy::ClearRetained if tombstone => (Bytes::new(), true),
            TombstonePolicy::PublishEmpty if tombstone => (Bytes::new(), self.sh.mapper.retain(r)),
            _ => (self.sh.mapper.payload(r)?, self.sh.mapper.retain(r)),
        };
        self.sh.mapper.with_properties(r, |props| {
            self.encode_publish(&topic, payload, self.sh.qos, retain, props)
        })
    }

    /// One publish of a transform's (or route's) output: unset fields as configured.
    fn encode_routed(&self, r: &Record, p: Publish) -> Result<Encoded, RejectReason> {
        let topic = match p.topic {
            Some(t) => t,
            None => self.sh.mapper.topic(r)?,
        };
        let topic = self.checked_topic(topic)?;
        let retain = p.retain.unwrap_or_else(|| self.sh.mapper.retain(r));
        // Above what `qos_downgrade` settled for: at that (it was said once).
        let qos = p.qos.unwrap_or(self.sh.qos).min(self.sh.qos_ceiling);
        match &p.properties {
            Some(props) => self.encode_publish(&topic, p.payload, qos, retain, Some(props)),
            None => self.sh.mapper.with_properties(r, |props| {
                self.encode_publish(&topic, p.payload, qos, retain, props)
            }),
        }
    }

    /// The topic after `string_policy`, or why it cannot be published to.
    fn checked_topic(&self, mut topic: String) -> Result<String, RejectReason> {
        let policy = self.sh.cfg.string_policy;
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
        let policy = self.sh.cfg.string_policy;
        let version = self.sh.cfg.version;
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
            if size > self.sh.cfg.max_packet_size as usize {
                return Err(RejectReason::PacketTooLarge {
                    size,
                    limit: self.sh.cfg.max_packet_size,
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

    /// The runtime produced a dead letter and Kafka confirmed it: its offset may pass (for
    /// a record of several publishes, once the others are done too).
    pub fn handle_dead_lettered(&mut self, coords: &RecordCoords) {
        if let Some(id) = self.sh.dead_lettering.remove(coords) {
            if self.sh.part_done(id) && self.sh.ledger.resolve(&coords.tp, coords.offset, id) {
                self.sh.flush_dirty = true;
            }
        }
    }

    /// The dead-letter produce failed: the record fails as under the `fail` policy.
    pub fn handle_dead_letter_failed(&mut self, coords: &RecordCoords, error: impl Into<String>) {
        if let Some(id) = self.sh.dead_lettering.remove(coords) {
            let reason = RejectReason::DeadLetterFailed(error.into());
            if self.sh.ledger.fail(&coords.tp, coords.offset, id, reason) {
                self.sh.flush_dirty = true;
            }
        }
    }

    /// Starts tracking a partition (Kafka assigned it); `committed` is its committed
    /// position if known. Without any `assign`, partitions are tracked on their first
    /// `push_record`; after the first, a push for a partition not assigned is refused
    /// ([`PushError::NotAssigned`]), so a revoked partition never reappears in the commit
    /// positions.
    pub fn assign(&mut self, tp: TopicPartition, committed: Option<i64>) {
        self.sh.assignments_used = true;
        self.sh.ledger.assign(tp, committed);
    }

    /// Stops tracking a partition (Kafka revoked it). Call after a flush and commit of it:
    /// its queued records are dropped, and acknowledgements of its in-flight ones no longer
    /// count.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.sh.ledger.revoke(tp);
        self.sh.dead_lettering.retain(|c, _| &c.tp != tp);
        self.sh.fanouts.retain(|_, f| &f.tp != tp);
        let sh = &mut self.sh;
        for session in &mut self.sessions {
            session.pending.retain(|m| {
                let keep = &m.coords.tp != tp;
                if !keep {
                    sh.free(m);
                }
                keep
            });
        }
        self.sh.flush_dirty = true;
    }

    /// Partitions the ledger tracks.
    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.sh.ledger.is_assigned(tp)
    }

    /// Kafka confirmed a commit of these positions.
    pub fn handle_committed(&mut self, offsets: &[(TopicPartition, i64)]) {
        for (tp, pos) in offsets {
            self.sh.ledger.committed(tp, *pos);
        }
    }

    /// After a failed or timed-out flush: forgets every record not yet committed, cancels
    /// the flush, and returns per partition the offset to seek the consumer to (the last
    /// committed position). Records then pushed again from there are new pushes; late
    /// acknowledgements of the old copies are ignored.
    pub fn rewind(&mut self) -> CommitOffsets {
        let to = self.sh.ledger.rewind();
        for session in &mut self.sessions {
            session.pending.drain(..).for_each(|m| self.sh.free(&m));
        }
        self.sh.dead_lettering.clear();
        self.sh.fanouts.clear();
        self.sh.flush = None;
        self.sh.timers.stop(Timer::Flush);
        to
    }

    /// Commit positions now: every record below each is resolved.
    pub fn commit_positions(&self) -> CommitOffsets {
        self.sh.ledger.positions()
    }

    /// Starts a checkpoint over every record pushed so far. It ends with exactly one of
    /// [`Event::FlushCompleted`], [`Event::FlushFailed`] or [`Event::FlushTimedOut`] (at
    /// `deadline`, not later, provided the runtime honours `poll_timeout`).
    pub fn begin_flush(&mut self, _now: Instant, deadline: Instant) -> Result<(), FlushInProgress> {
        if self.sh.flush.is_some() {
            return Err(FlushInProgress);
        }
        if let Some(reason) = &self.sh.fatal {
            // Stopped for good: the flush ends at once, as the one in progress did.
            self.sh.events.push_back(Event::Fatal(reason.clone()));
            return Ok(());
        }
        self.sh.flush = Some(self.sh.ledger.target());
        self.sh.flush_dirty = true;
        self.sh.timers.set(Timer::Flush, deadline);
        Ok(())
    }

    /// The deadline of a flush begun at `now` with the configured `flush_timeout`.
    pub fn flush_deadline(&self, now: Instant) -> Instant {
        now + self.sh.cfg.flush_timeout
    }

    /// True while a flush is running.
    pub fn is_flushing(&self) -> bool {
        self.sh.flush.is_some()
    }

    /// Ends the flush if its outcome is known (`timed_out`: the deadline passed).
    pub(crate) fn check_flush(&mut self, timed_out: bool) {
        self.sh.flush_dirty = false;
        let Some(target) = &self.sh.flush else {
            return;
        };
        let event = match self.sh.ledger.status(target) {
            FlushStatus::Complete => Event::FlushCompleted {
                offsets: self.sh.ledger.positions(),
            },
            FlushStatus::Failed(coords, reason) => Event::FlushFailed {
                coords,
                reason,
                offsets: self.sh.ledger.positions(),
            },
            FlushStatus::Pending if timed_out => Event::FlushTimedOut {
                unacked: self.sh.ledger.unresolved(target),
                offsets: self.sh.ledger.positions(),
            },
            FlushStatus::Pending => return,
        };
        self.sh.flush = None;
        self.sh.timers.stop(Timer::Flush);
        self.sh.events.push_back(event);
    }

    /// The next event, if any. See the drain order on [`Sink`].
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.sh.flush_dirty {
            self.check_flush(false);
        }
        self.sh.events.pop_front()
    }

    /// How many MQTT connections the sink keeps (`connections`): the `connection` of the
    /// per-connection calls (`*_on`) and of `Event::OpenTransport`/`CloseTransport` is
    /// below it. The calls without `_on` are connection 0's.
    pub fn connections(&self) -> usize {
        self.sessions.len()
    }

    /// Runs `f` on connection `i` with the shared part, then settles what it decided for
    /// all connections. An index past the last is ignored (returns `None`).
    fn on_session<R>(
        &mut self,
        i: usize,
        now: Instant,
        f: impl FnOnce(&mut Session, &mut Shared) -> R,
    ) -> Option<R> {
        let session = self.sessions.get_mut(i)?;
        let r = f(session, &mut self.sh);
        self.settle(now);
        Some(r)
    }

    /// What one connection decided for all: publishes above a ceiling `qos_downgrade`
    /// lowered go on lower everywhere; a sink stopped for good closes every connection.
    fn settle(&mut self, now: Instant) {
        if let Some(to) = self.sh.lowered.take() {
            for session in &mut self.sessions {
                session.lower_qos(to);
            }
        }
        if self.sh.fatal.is_some() {
            for session in &mut self.sessions {
                if !matches!(session.conn, Conn::Closing | Conn::Closed) {
                    session.close(&mut self.sh, now);
                }
            }
        }
    }

    /// The transport of connection 0 is open (see [`handle_connected_on`](Self::handle_connected_on)).
    pub fn handle_connected(&mut self, now: Instant) {
        self.handle_connected_on(0, now);
    }

    /// The transport the sink asked for (`Event::OpenTransport { connection }`) is open: the
    /// sink queues CONNECT on it.
    pub fn handle_connected_on(&mut self, connection: usize, now: Instant) {
        self.on_session(connection, now, |s, sh| s.handle_connected(sh, now));
    }

    /// Connection 0's transport closed (see [`handle_disconnected_on`](Self::handle_disconnected_on)).
    pub fn handle_disconnected(&mut self, now: Instant, reason: impl Into<String>) {
        self.handle_disconnected_on(0, now, reason);
    }

    /// The transport of `connection` closed or could not be opened (`reason`: the
    /// runtime's words, such as the DNS, TCP or TLS error with server and port).
    pub fn handle_disconnected_on(
        &mut self,
        connection: usize,
        now: Instant,
        reason: impl Into<String>,
    ) {
        let reason = reason.into();
        self.on_session(connection, now, |s, sh| {
            s.handle_disconnected(sh, now, reason)
        });
    }

    /// Bytes arrived on connection 0 (see [`handle_input_on`](Self::handle_input_on)).
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.handle_input_on(0, now, bytes)
    }

    /// Bytes arrived from the broker on `connection`, in any chunking. A protocol violation
    /// closes that connection (the events say so) and is returned once.
    pub fn handle_input_on(
        &mut self,
        connection: usize,
        now: Instant,
        bytes: &[u8],
    ) -> Result<(), ProtocolError> {
        self.on_session(connection, now, |s, sh| s.handle_input(sh, now, bytes))
            .unwrap_or(Ok(()))
    }

    /// Until when reading the transport may wait, if it may: while the window is nearly full
    /// and the sink is holding new publishes for a batch of free slots (at most 1 ms), an
    /// acknowledgement read now changes nothing it does before this instant but a wake-up.
    /// A runtime that leaves the socket unread until then reads many acknowledgements in
    /// one call instead of a few per call (the broker coalesces what queued meanwhile).
    /// Optional: reading at once is always correct. Re-read it after every drain.
    /// Connection 0's; see [`defer_input_until_on`](Self::defer_input_until_on).
    pub fn defer_input_until(&self) -> Option<Instant> {
        self.defer_input_until_on(0)
    }

    /// [`defer_input_until`](Self::defer_input_until) for `connection`.
    pub fn defer_input_until_on(&self, connection: usize) -> Option<Instant> {
        self.sessions
            .get(connection)
            .and_then(Session::defer_input_until)
    }

    /// Whether the runtime should have what it reads acknowledged at once (TCP_QUICKACK,
    /// `mqtt_sink_tls::quick_ack`): acknowledgements are awaited and no publish waits to be
    /// sent, so no data of ours would carry the TCP ACK, and a broker with Nagle's
    /// algorithm on (Mosquitto's default) holds its next acks until our delayed ACK (40 ms
    /// on Linux): the tail of every checkpoint, and every lull. While publishes wait for
    /// the window, ACKs ride on them and immediate ones would only cut the broker's
    /// segments smaller (measured: +2 us per record on the blocking runtime). Optional;
    /// re-read it after every drain. Connection 0's; see
    /// [`quick_ack_wanted_on`](Self::quick_ack_wanted_on).
    pub fn quick_ack_wanted(&self) -> bool {
        self.quick_ack_wanted_on(0)
    }

    /// [`quick_ack_wanted`](Self::quick_ack_wanted) for `connection`.
    pub fn quick_ack_wanted_on(&self, connection: usize) -> bool {
        self.sessions
            .get(connection)
            .is_some_and(Session::quick_ack_wanted)
    }

    /// The broker address to open on `Event::OpenTransport` (and the one in use while
    /// connected): with `servers`, the next one after each failed connect or lost
    /// connection. Connection 0's; see [`server_on`](Self::server_on).
    pub fn server(&self) -> (&str, u16) {
        self.server_on(0)
    }

    /// The broker address `connection` opens next (or is connected to).
    pub fn server_on(&self, connection: usize) -> (&str, u16) {
        let i = connection.min(self.sessions.len() - 1);
        self.sessions[i].server()
    }

    /// [`server`](Self::server) as `host:port` (`[v6]:port`), for logs and metrics.
    pub fn server_address(&self) -> String {
        self.sessions[0].server_address()
    }

    /// [`server_on`](Self::server_on) as `host:port` (`[v6]:port`).
    pub fn server_address_on(&self, connection: usize) -> String {
        self.sessions[connection.min(self.sessions.len() - 1)].server_address()
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let sessions = self.sessions.iter().filter_map(|s| s.timers.next());
        sessions.chain(self.sh.timers.next()).min()
    }

    /// Time passed: fires every timer due at `now`. Early, late or repeated calls are
    /// harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.sh.timers.expired(now).is_some() {
            self.check_flush(true);
        }
        for i in 0..self.sessions.len() {
            self.on_session(i, now, |s, sh| s.handle_timeout(sh, now));
        }
    }

    /// Writes the bytes to send next on connection 0 (see
    /// [`poll_transmit_on`](Self::poll_transmit_on)).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> bool {
        self.poll_transmit_on(0, now, buf)
    }

    /// Writes the bytes to send next on `connection` into `buf` (appending). Returns false
    /// when there is nothing to send now. Several publishes are coalesced into one call.
    /// Publishes are handed out only while less than [`MAX_UNWRITTEN`] bytes wait
    /// unwritten on that connection: report what reached the transport with
    /// [`handle_written_on`](Self::handle_written_on).
    pub fn poll_transmit_on(&mut self, connection: usize, now: Instant, buf: &mut Vec<u8>) -> bool {
        self.on_session(connection, now, |s, sh| s.poll_transmit(sh, now, buf))
            .unwrap_or(false)
    }

    /// Connection 0 wrote `n` more bytes (see [`handle_written_on`](Self::handle_written_on)).
    pub fn handle_written(&mut self, now: Instant, n: usize) {
        self.handle_written_on(0, now, n);
    }

    /// The runtime wrote `n` more bytes of what `poll_transmit_on(connection, ..)` returned
    /// to that transport (in order; a TLS runtime counts plaintext). A publish's ack
    /// timeout starts when its last byte is written; output that waits `ack_timeout` with
    /// no byte written loses the connection (`LostReason::WriteStalled`). Call it after
    /// every write, then drain.
    pub fn handle_written_on(&mut self, connection: usize, now: Instant, n: usize) {
        self.on_session(connection, now, |s, sh| s.on_written(sh, now, n));
    }

    /// Disconnects every connection cleanly: DISCONNECT is sent where connected, then
    /// `CloseTransport` and, once all are closed, `Closed`. Flush first: records not yet
    /// acknowledged are not committed.
    pub fn close(&mut self, now: Instant) {
        for i in 0..self.sessions.len() {
            self.on_session(i, now, |s, sh| s.close(sh, now));
        }
    }

    /// True once every connection is connected (CONNACK accepted).
    pub fn is_connected(&self) -> bool {
        self.sessions.iter().all(Session::is_connected)
    }

    /// True after `Event::Closed`.
    pub fn is_closed(&self) -> bool {
        self.sessions.iter().all(Session::is_closed)
    }

    /// Why the sink stopped for good, after `Event::Fatal`: the runtime ends and reports it.
    pub fn fatal_error(&self) -> Option<&str> {
        self.sh.fatal.as_deref()
    }

    /// What a runtime whose sink closed returns: `Err(Fatal)` when it stopped for good on
    /// its own, else `Ok`.
    pub fn stop_result(&self) -> Result<(), SinkError> {
        self.sh
            .fatal
            .as_ref()
            .map_or(Ok(()), |r| Err(SinkError::Fatal(r.clone())))
    }
}

impl Shared {
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
    pub(crate) fn part_done(&mut self, id: RecordId) -> bool {
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

    /// Releases a message's buffer accounting and its hold on its topic's connection.
    pub(crate) fn free(&mut self, msg: &Msg) {
        self.buffered_bytes -= msg.size;
        self.router.release(msg.route);
    }

    /// A QoS 1 PUBACK or a rejecting QoS 2 PUBREC ended a publiself.
    pub(crate) fn finish(&mut self, msg: Msg, reason: u8) {
        self.free(&msg);
        if reason >= 0x80 {
            self.reject(
                msg.coords,
                msg.record_id,
                RejectReason::Broker { code: reason },
                msg.record.map(|r| *r),
            );
        } else {
            self.acknowledged(msg.coords, msg.record_id);
        }
    }

    /// A connection closed for good: when it was the last, the sink is closed.
    pub(crate) fn session_closed(&mut self) {
        self.closed += 1;
        if self.closed == self.cfg.connections.max(1) {
            self.events.push_back(Event::Closed);
        }
    }
}

/// The largest packet we accept from the broker (announced in MQTT 5 CONNECT): acks are
/// tiny; publishes only come from subscriptions of an old session.
pub(crate) fn incoming_limit(cfg: &Config) -> u32 {
    cfg.max_packet_size.clamp(1 << 16, 1 << 20)
}

pub(crate) fn connect_limit(cfg: &Config) -> u32 {
    incoming_limit(cfg)
}
