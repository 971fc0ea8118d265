//! The MQTT session of [`Sink`]: connect, CONNACK, publish window and packet ids,
//! acknowledgement flows, keep-alive, resend after reconnect, close.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::{Config, MqttVersion};
use crate::event::{ConnectFailure, Connected, Event, LostReason, ProtocolError, RejectReason};
use crate::ledger::RecordId;
use crate::record::{Record, RecordCoords};
use crate::send_order::SendOrder;
use crate::sink::{connect_limit, incoming_limit, Shared, MAX_UNWRITTEN, TRANSMIT_BUDGET};
use crate::timer::{Timer, TimerTable};
use crate::wire::{self, ConnectParams, Decoder, EncodedPublish, Incoming};
use crate::QoS;

/// How long new publishes wait for a batch of free window slots (see `hold_for_batch`).
pub(crate) const REFILL_DELAY: Duration = Duration::from_millis(1);

/// A connection that lived at least this long resets the reconnect backoff when it ends;
/// one that a broker closes sooner (a refused publish, a session takeover) does not, so a
/// broker that hangs up right after CONNACK is not hammered at the minimum delay.
pub(crate) const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conn {
    /// Waiting for the reconnect timer.
    Backoff,
    /// `OpenTransport` was emitted; waiting for `handle_connected`.
    Opening,
    /// CONNECT queued or sent; waiting for CONNACK.
    AwaitConnAck,
    /// CONNACK accepted.
    Connected,
    /// `close` was called; DISCONNECT is queued.
    Closing,
    /// Closed for good.
    Closed,
}

/// Sessions with `clean_session = false` (review M3). MQTT 3.1/3.1.1: a persistent
/// session is the only kind that survives its connection, and CleanSession=1 the only way
/// to end one, so the first connection and the close take extra steps. MQTT 5: Clean
/// Start with a Session Expiry does both on the first connection, and the DISCONNECT of
/// `close` ends the session (Session Expiry 0); only a close between connections takes
/// an extra one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SessionStep {
    /// Connections are persistent (CleanSession=0).
    #[default]
    Persistent,
    /// The first connection found a session this sink did not make: this connection is
    /// CleanSession=1, to discard it; a persistent one follows at once.
    Discarding,
    /// `close` after a persistent session: this connection is CleanSession=1 (MQTT 5:
    /// Clean Start, Session Expiry 0), to end the session on the broker (nothing resumes it: the next instance has its own client id
    /// or discards it); `Closed` follows its CONNACK, or its failure.
    Ending,
}

/// A record encoded as a PUBLISH.
#[derive(Debug)]
pub(crate) struct Msg {
    /// This publish's id: in push order, unique.
    pub(crate) id: RecordId,
    /// The id the ledger knows its record by (`id`, unless a route fanned the record out
    /// into several publishes: then the first one's).
    pub(crate) record_id: RecordId,
    pub(crate) coords: RecordCoords,
    /// Its topic's key with the router (`Router::key`).
    pub(crate) route: u64,
    pub(crate) packet: EncodedPublish,
    /// The QoS `packet` is encoded at: the configured one, or the one a transform (route)
    /// gave this publish; lowered with the packet under `qos_downgrade`.
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    /// The record itself, kept only under the dead-letter policy.
    pub(crate) record: Option<Box<Record>>,
    /// Bytes counted against `max_buffered_bytes`.
    pub(crate) size: usize,
}

impl Msg {
    /// Lowers this publish to QoS `to` (1 or 2) if it is above it (`qos_downgrade`).
    fn lower_qos(&mut self, to: QoS) {
        debug_assert!(
            to != QoS::AtMostOnce,
            "a downgrade never drops the packet id"
        );
        if self.qos > to {
            wire::set_qos(&mut self.packet, to);
            self.qos = to;
        }
    }
}

/// A QoS 1/2 publish awaiting its acknowledgement flow.
#[derive(Debug)]
pub(crate) struct Inflight {
    pub(crate) msg: Msg,
    pub(crate) pkid: u16,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    pub(crate) released: bool,
    /// When the last byte of its PUBLISH (or PUBREL) was last written to the transport
    /// (`None` while it waits in the runtime's buffer); in send order, so the first entry
    /// is the oldest. The ack timeout counts from here.
    pub(crate) sent_at: Option<Instant>,
    /// When its PUBLISH was last handed to the runtime (written or not).
    pub(crate) handed_at: Option<Instant>,
    /// Where its last packet handed out (PUBLISH or PUBREL) ends in this connection's
    /// output (`Output::handed`).
    pub(crate) end: u64,
}

/// The publishes, one of which made the broker close the last `closes` connections:
/// `first..=last` by record id. A broker reads publishes in order and hangs up on the one
/// it refuses (the poison), so the poison is the oldest unacknowledged publish or one sent
/// after it on that connection; and a publish the broker answered came before the poison.
/// Each close narrows the range to what it has in common with the new one, each answer
/// cuts off its front. Answers to publishes read just before the poison are often lost
/// with the connection (Mosquitto drops what it has not written yet), so a range does not
/// shrink to one record by itself: the last close before giving up is provoked with one
/// publish in flight at a time (see [`Sink::probing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Suspect {
    pub(crate) first: RecordId,
    pub(crate) last: RecordId,
    pub(crate) closes: u32,
}

/// What this connection's output became: bytes handed to the runtime by `poll_transmit`,
/// bytes it reported written (`handle_written`), and the publishes waiting to be written.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub(crate) handed: u64,
    pub(crate) written: u64,
    /// Since when bytes wait unwritten with no progress (`None`: all written).
    pub(crate) stalled_since: Option<Instant>,
    /// In-flight entries (send-order key) and where their packet ends in the output.
    pub(crate) unwritten: VecDeque<(u64, u64)>,
    /// QoS 0 publishes handed out, and where each ends: done once written.
    pub(crate) qos0: VecDeque<(u64, Msg)>,
    /// In-flight entries whose PUBREL waits in the control queue.
    pub(crate) releases: Vec<u64>,
}

impl Output {
    pub(crate) fn unwritten_bytes(&self) -> u64 {
        self.handed - self.written
    }
}

/// One MQTT connection of a [`Sink`](crate::Sink): its state, packet ids, in-flight window,
/// acknowledgement flows, keep-alive, resend after a reconnect, backoff, and the publishes
/// routed to it that wait for the window. What outlives a connection's publishes (the
/// offset ledger, the buffer's accounting, the error policy) is the sink's [`Shared`]
/// part, which every session method that resolves a publish is handed.
pub(crate) struct Session {
    /// This connection's index (`Event::OpenTransport { connection }`).
    pub(crate) idx: usize,
    pub(crate) cfg: Config,
    pub(crate) conn: Conn,
    pub(crate) decoder: Decoder,
    /// Control packets (CONNECT, PUBREL, PINGREQ, acks, DISCONNECT) to write next.
    pub(crate) control: Vec<u8>,
    /// Publishes routed here, not yet sent, in push order.
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
    /// While probing (see [`Session::probing`]): the in-flight entry sent alone.
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
    /// The refill timer fired: send into the window whatever is free.
    pub(crate) refill_due: bool,
    /// The broker addresses (`servers`, or `server` and `port`) and the one in use.
    pub(crate) addresses: Vec<(String, u16)>,
    pub(crate) address: usize,
}

impl Session {
    /// Connection `idx` of a sink with `cfg`: client id `<client_id>-<idx>` when the sink
    /// has several (`connections`), the configured one when it has one.
    pub(crate) fn new(idx: usize, cfg: &Config) -> Self {
        // An empty client id asks the broker to assign one (to each connection).
        let client_id = if cfg.connections > 1 && !cfg.client_id.is_empty() {
            format!("{}-{idx}", cfg.client_id)
        } else {
            cfg.client_id.clone()
        };
        // Validation keeps it non-empty: `server`, or `servers` that all parse.
        let addresses = cfg.addresses();
        Self {
            idx,
            decoder: Decoder::new(incoming_limit(cfg) as usize),
            control: Vec::new(),
            pending: VecDeque::new(),
            inflight: SendOrder::default(),
            by_pkid: BTreeMap::new(),
            resend: VecDeque::new(),
            next_seq: 0,
            next_pkid: 1,
            window: cfg.max_inflight as u16,
            broker_max_packet: None,
            broker_max_qos: QoS::ExactlyOnce,
            retain_available: true,
            alias_max: 0,
            aliases: BTreeMap::new(),
            keepalive_secs: cfg.keepalive.as_secs() as u16,
            ping_outstanding: false,
            connected_once: false,
            backoff: Backoff::new(
                cfg.reconnect_backoff_min,
                cfg.reconnect_backoff_max,
                cfg.reconnect_jitter_seed
                    .map(|s| s.wrapping_add(idx as u64))
                    .unwrap_or_else(|| crate::backoff::seed_from(&client_id)),
            ),
            client_id,
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
            refill_due: false,
            addresses,
            address: 0,
            conn: Conn::Backoff,
            cfg: cfg.clone(),
        }
    }

    /// Records held: queued here or in flight.
    pub(crate) fn held(&self) -> usize {
        self.pending.len() + self.inflight.len()
    }

    /// The broker address to open (and the one in use while connected).
    pub(crate) fn server(&self) -> (&str, u16) {
        let (h, p) = &self.addresses[self.address];
        (h.as_str(), *p)
    }

    /// [`server`](Self::server) as `host:port` (`[v6]:port`), for logs and metrics.
    pub(crate) fn server_address(&self) -> String {
        let (host, port) = self.server();
        crate::config::format_address(host, port)
    }

    /// Time passed: fires this connection's timers due at `now`.
    pub(crate) fn handle_timeout(&mut self, sh: &mut Shared, now: Instant) {
        while let Some(t) = self.timers.expired(now) {
            match t {
                Timer::Reconnect => self.on_reconnect_timer(sh, now),
                Timer::ConnAck => self.on_connack_timeout(sh, now),
                Timer::Keepalive => self.on_keepalive(now),
                Timer::PingResp => self.on_ping_timeout(sh, now),
                Timer::Ack => self.on_ack_timeout(sh, now),
                Timer::Refill => self.refill_due = true,
                // The next poll_transmit may send again; the flush timer is the sink's.
                Timer::Rate | Timer::Flush => {}
            }
        }
    }

    /// See [`Sink::poll_transmit`](crate::Sink::poll_transmit).
    pub(crate) fn poll_transmit(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        buf: &mut Vec<u8>,
    ) -> bool {
        let start = buf.len();
        let room = MAX_UNWRITTEN.saturating_sub(self.output.unwritten_bytes() as usize);
        self.transmit(sh, now, buf, start, start + room.min(TRANSMIT_BUDGET));
        let wrote = buf.len() > start;
        if wrote {
            let o = &mut self.output;
            if o.handed == o.written {
                o.stalled_since = Some(now);
            }
            o.handed += (buf.len() - start) as u64;
            self.on_transmitted(sh, now);
        }
        self.arm_ack_timer();
        wrote
    }

    /// See [`Sink::defer_input_until`](crate::Sink::defer_input_until).
    pub(crate) fn defer_input_until(&self) -> Option<Instant> {
        self.timers
            .get(Timer::Refill)
            .filter(|_| self.conn == Conn::Connected)
    }

    /// See [`Sink::quick_ack_wanted`](crate::Sink::quick_ack_wanted).
    pub(crate) fn quick_ack_wanted(&self) -> bool {
        self.conn == Conn::Connected && self.pending.is_empty() && self.inflight.len() > 0
    }

    pub(crate) fn open_transport(&mut self, sh: &mut Shared, now: Instant) {
        self.conn = Conn::Opening;
        // One deadline covers opening the transport and the CONNACK.
        self.timers
            .set(Timer::ConnAck, now + self.cfg.connect_timeout);
        sh.events.push_back(Event::OpenTransport {
            connection: self.idx,
        });
    }

    /// The transport the sink asked for (`Event::OpenTransport`) is open: the sink queues
    /// CONNECT.
    pub(crate) fn handle_connected(&mut self, sh: &mut Shared, _now: Instant) {
        if self.conn != Conn::Opening {
            return;
        }
        self.reset_output();
        self.decoder.reset();
        self.control.clear();
        self.refused_last = false;
        let ending = self.session_step == SessionStep::Ending;
        let clean = if self.cfg.version == MqttVersion::V5 {
            // Clean Start with a Session Expiry: discards what an earlier instance left
            // and persists.
            !self.connected_once || self.cfg.clean_session || ending
        } else {
            self.cfg.clean_session || self.session_step != SessionStep::Persistent
        };
        self.sent_clean = clean;
        let params = ConnectParams {
            version: self.cfg.version,
            client_id: &self.client_id,
            clean,
            keepalive_secs: self.cfg.keepalive.as_secs() as u16,
            username: self.cfg.username.as_deref(),
            password: self.cfg.password.as_ref().map(|p| p.expose()),
            session_expiry: if self.cfg.clean_session || ending {
                0
            } else {
                self.cfg.session_expiry.as_secs() as u32
            },
            max_incoming_packet: connect_limit(&self.cfg),
        };
        match wire::encode_connect(&params, &mut self.control) {
            Ok(()) => self.conn = Conn::AwaitConnAck,
            Err(e) => {
                // Validation makes this unreachable; report it rather than panic.
                sh.events
                    .push_back(Event::ConnectFailed(ConnectFailure::Protocol(e.0)));
                self.drop_connection(sh, _now, true);
            }
        }
    }

    /// The transport closed or could not be opened (`reason`: the runtime's words, such as
    /// the DNS, TCP or TLS error with server and port).
    pub(crate) fn handle_disconnected(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        reason: impl Into<String>,
    ) {
        let reason = reason.into();
        match self.conn {
            Conn::Opening | Conn::AwaitConnAck => {
                sh.events
                    .push_back(Event::ConnectFailed(ConnectFailure::Transport(reason)));
                self.drop_connection(sh, now, false);
            }
            Conn::Connected => {
                sh.events
                    .push_back(Event::ConnectionLost(LostReason::Transport(reason)));
                self.broker_closed(sh, now);
                self.drop_connection(sh, now, false);
            }
            Conn::Closing => self.drop_connection(sh, now, false),
            Conn::Backoff | Conn::Closed => {}
        }
    }

    /// Bytes arrived from the broker, in any chunking. A protocol violation closes the
    /// connection (the events say so) and is returned once.
    pub(crate) fn handle_input(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        bytes: &[u8],
    ) -> Result<(), ProtocolError> {
        if !matches!(
            self.conn,
            Conn::AwaitConnAck | Conn::Connected | Conn::Closing
        ) {
            return Ok(());
        }
        self.decoder.push(bytes);
        loop {
            let packet = match self.decoder.next(self.cfg.version) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                // A packet that cannot be decoded is malformed (0x81).
                Err(e) => return Err(self.protocol_error(sh, now, 0x81, e.0)),
            };
            if let Err(e) = self.on_packet(sh, now, packet) {
                return Err(self.protocol_error(sh, now, 0x82, e));
            }
            self.arm_ack_timer();
            if !matches!(
                self.conn,
                Conn::AwaitConnAck | Conn::Connected | Conn::Closing
            ) {
                return Ok(());
            }
        }
    }

    /// The broker broke the protocol: MQTT 5 tells it why (`code`: 0x81 malformed packet,
    /// 0x82 protocol error), and the connection closes.
    fn protocol_error(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        code: u8,
        msg: String,
    ) -> ProtocolError {
        let event = if self.conn == Conn::AwaitConnAck {
            Event::ConnectFailed(ConnectFailure::Protocol(msg.clone()))
        } else {
            Event::ConnectionLost(LostReason::Protocol(msg.clone()))
        };
        if self.cfg.version == MqttVersion::V5 && self.conn != Conn::Closing {
            // Tell the broker why, best effort.
            wire::encode_disconnect(self.cfg.version, code, &mut self.control);
        }
        sh.events.push_back(event);
        self.drop_connection(sh, now, true);
        ProtocolError(msg)
    }

    fn on_packet(&mut self, sh: &mut Shared, now: Instant, p: Incoming) -> Result<(), String> {
        if self.conn == Conn::AwaitConnAck {
            return match p {
                Incoming::ConnAck {
                    session_present,
                    code,
                    props,
                } => {
                    if session_present && code == 0 && self.sent_clean {
                        // [MQTT-3.2.2-1]/[MQTT-3.2.2-2]: nothing to resume; resending on its
                        // word could repeat what the broker never had.
                        return Err("CONNACK with session present to a CONNECT that asked for \
                                    a clean session"
                            .into());
                    }
                    self.on_connack(sh, now, session_present, code, props);
                    Ok(())
                }
                other => Err(format!("expected CONNACK, got {other:?}")),
            };
        }
        self.refused_last = matches!(
            p,
            Incoming::PubAck { reason, .. } | Incoming::PubRec { reason, .. } if reason >= 0x80
        );
        if let Incoming::PubAck { pkid, .. }
        | Incoming::PubRec { pkid, .. }
        | Incoming::PubComp { pkid, .. } = &p
        {
            let acked = self
                .by_pkid
                .get(pkid)
                .and_then(|&seq| self.inflight.get(seq));
            // An answer to the oldest entry, or to one written before it: what was written
            // ahead of the oldest is getting through (see `ack_deadline`).
            let head_end = self.inflight.first().map(|h| h.end);
            if acked.zip(head_end).is_some_and(|(e, h)| e.end <= h) {
                self.head_since = Some(now);
            }
            if let (Some(e), Some(s)) = (acked, self.suspect.as_mut()) {
                // The broker read this publish: the poison came after it. (Answers to
                // publishes before the range prove nothing.)
                if e.msg.id >= s.last {
                    self.suspect = None;
                } else if e.msg.id >= s.first {
                    s.first = e.msg.id + 1;
                }
            }
        }
        match p {
            Incoming::ConnAck { .. } => return Err("a second CONNACK".into()),
            Incoming::PubAck { pkid, reason } => {
                let Some(seq) = self.by_pkid.get(&pkid).copied() else {
                    return Ok(()); // a late duplicate: nothing awaits it
                };
                let qos = self.inflight.get(seq).map(|e| e.msg.qos);
                if qos == Some(QoS::ExactlyOnce) {
                    // RabbitMQ's MQTT plugin answers QoS 2 with PUBACK: it does QoS 1.
                    let why = format!("it answered a QoS 2 PUBLISH (packet id {pkid}) with PUBACK");
                    if !self.qos_not_honoured(sh, now, QoS::ExactlyOnce, QoS::AtLeastOnce, why) {
                        return Ok(());
                    }
                }
                let e = self.take_inflight(seq);
                sh.finish(e.msg, reason);
            }
            Incoming::PubRec { pkid, reason } => {
                let Some(seq) = self.by_pkid.get(&pkid).copied() else {
                    if reason < 0x80 {
                        // Complete the broker's flow so it frees the id.
                        wire::encode_pubrel(pkid, &mut self.control);
                    }
                    return Ok(());
                };
                if self.inflight.get(seq).map(|e| e.msg.qos) != Some(QoS::ExactlyOnce) {
                    return Err(format!("PUBREC for QoS 1 packet id {pkid}"));
                }
                if reason >= 0x80 {
                    let e = self.take_inflight(seq);
                    sh.finish(e.msg, reason);
                } else {
                    wire::encode_pubrel(pkid, &mut self.control);
                    self.output.releases.push(seq);
                    let e = self.inflight.get_mut(seq).expect("indexed entry");
                    // Its ack timeout restarts when the PUBREL is written.
                    e.sent_at = None;
                    // MQTT says the broker owns the message from PUBREC on (4.3.3), but a
                    // broker that loses its state (Mosquitto killed between snapshots) loses
                    // it too, and Mosquitto forwards QoS 2 messages only at PUBREL. The
                    // record counts as delivered at PUBCOMP, when the flow is complete.
                    e.released = true;
                }
            }
            Incoming::PubComp { pkid, .. } => {
                if let Some(seq) = self.by_pkid.get(&pkid).copied() {
                    if self.inflight.get(seq).is_some_and(|e| e.released) {
                        // Any reason: PUBCOMP ends the flow. 0x92 (packet identifier not
                        // found) after a resumed session means the broker completed it
                        // before and the first PUBCOMP was lost.
                        let e = self.take_inflight(seq);
                        sh.finish(e.msg, 0);
                    } else {
                        return Err(format!("PUBCOMP before PUBREC for packet id {pkid}"));
                    }
                }
            }
            Incoming::PubRel { pkid } => wire::encode_pubcomp(pkid, &mut self.control),
            Incoming::Publish { qos, pkid } => match qos {
                1 => wire::encode_puback(pkid, &mut self.control),
                2 => wire::encode_pubrec(pkid, &mut self.control),
                _ => {}
            },
            Incoming::PingResp => {
                self.ping_outstanding = false;
                self.timers.stop(Timer::PingResp);
            }
            Incoming::Disconnect {
                reason,
                reason_string,
            } => {
                let lost = LostReason::ServerDisconnect {
                    code: reason,
                    reason_string,
                };
                if self.conn == Conn::Closing {
                    self.drop_connection(sh, now, true);
                } else {
                    sh.events.push_back(Event::ConnectionLost(lost));
                    self.broker_closed(sh, now);
                    self.drop_connection(sh, now, true);
                }
            }
        }
        Ok(())
    }

    fn on_connack(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        session_present: bool,
        code: u8,
        props: wire::ConnAckProps,
    ) {
        self.timers.stop(Timer::ConnAck);
        if code != 0 {
            sh.events
                .push_back(Event::ConnectFailed(ConnectFailure::Refused {
                    code,
                    reason_string: props.reason_string,
                }));
            self.drop_connection(sh, now, true);
            return;
        }
        if !self.cfg.clean_session {
            match self.session_step {
                SessionStep::Persistent
                    if self.v3_persistent() && session_present && !self.connected_once =>
                {
                    sh.events.push_back(Event::StaleSessionDiscarded {
                        client_id: self.client_id.clone(),
                    });
                    self.session_step = SessionStep::Discarding;
                    self.reconnect_now(sh, now);
                    return;
                }
                SessionStep::Discarding => {
                    self.session_step = SessionStep::Persistent;
                    self.reconnect_now(sh, now);
                    return;
                }
                SessionStep::Ending => {
                    self.session_step = SessionStep::Persistent;
                    wire::encode_disconnect(self.cfg.version, 0, &mut self.control);
                    self.conn = Conn::Closing;
                    return;
                }
                SessionStep::Persistent => {}
            }
        }
        self.broker_max_qos = match props.maximum_qos {
            Some(0) => QoS::AtMostOnce,
            Some(1) => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        // The configured QoS, and any above it that publishes held from before ask for (a
        // transform's); those pushed from now on are checked as they are sent.
        let held = self
            .pending
            .iter()
            .chain(self.inflight.values().map(|e| &e.msg));
        let wanted = held.map(|m| m.qos).fold(sh.qos, QoS::max);
        if wanted > self.broker_max_qos {
            let max = self.broker_max_qos;
            let why = format!("its CONNACK says Maximum QoS {}", max as u8);
            if !self.qos_not_honoured(sh, now, wanted, max, why) {
                return;
            }
        }
        self.conn = Conn::Connected;
        self.connected_at = Some(now);
        (self.last_handed, self.probe, self.head_since) = (None, None, None);
        sh.stats.connects += 1;
        self.window = props.receive_maximum.map_or(self.cfg.max_inflight, |r| {
            self.cfg.max_inflight.min(u32::from(r).max(1))
        }) as u16;
        self.broker_max_packet = props.maximum_packet_size;
        self.retain_available = props.retain_available.unwrap_or(true);
        // Aliases belong to one connection.
        self.aliases.clear();
        self.alias_max = if self.cfg.topic_aliases && self.cfg.version == MqttVersion::V5 {
            props.topic_alias_maximum.unwrap_or(0)
        } else {
            0
        };
        if let Some(id) = &props.assigned_client_id {
            // Reconnects must use the same id to resume the session.
            self.client_id = id.clone();
        }
        self.keepalive_secs = props
            .server_keep_alive
            .unwrap_or(self.cfg.keepalive.as_secs() as u16);
        self.restart_keepalive(now);
        let resumed = session_present && self.connected_once;
        self.connected_once = true;
        self.resume(sh, resumed);
        sh.events.push_back(Event::Connected(Connected {
            server: self.server_address(),
            session_present,
            assigned_client_id: props.assigned_client_id,
            window: self.window,
            broker_max_packet: props.maximum_packet_size,
            topic_alias_maximum: props.topic_alias_maximum,
            maximum_qos: props.maximum_qos,
            retain_available: props.retain_available,
            keepalive_secs: self.keepalive_secs,
        }));
    }

    /// After CONNACK: with the session resumed, resend every in-flight publish in order
    /// (PUBLISH with DUP and the same id, or PUBREL if released); without it, publish them
    /// again as new publishes ahead of the queue, released ones included (the broker that
    /// sent PUBREC may have lost them: a duplicate is possible, a loss is not).
    fn resume(&mut self, sh: &mut Shared, resumed: bool) {
        self.resend.clear();
        if resumed {
            self.resend.extend(self.inflight.keys());
            return;
        }
        self.by_pkid.clear();
        let old = std::mem::take(&mut self.inflight);
        let mut again = Vec::with_capacity(old.len());
        for e in old.into_values() {
            let tracked = sh.ledger.pending_id(&e.msg.coords.tp, e.msg.coords.offset)
                == Some(e.msg.record_id);
            if !tracked {
                // Revoked or rewound: consumed again anyway.
                sh.free(&e.msg);
            } else {
                let mut msg = e.msg;
                wire::set_dup(&mut msg.packet, false);
                again.push(msg);
            }
        }
        // QoS 0 publishes the lost connection left unwritten wait at the front of the queue
        // (`reset_output`); where a transform mixes QoS, they came between these: all go
        // out again in push order.
        if let Some(last) = again.iter().map(|m| m.id).max() {
            while self.pending.front().is_some_and(|m| m.id < last) {
                again.extend(self.pending.pop_front());
            }
            again.sort_by_key(|m| m.id);
        }
        for msg in again.into_iter().rev() {
            self.pending.push_front(msg);
        }
    }

    /// The broker closed a connected session (EOF, reset, DISCONNECT). If the oldest
    /// unacknowledged publish went out on this connection shortly before, the close is
    /// evidence against it and the publishes sent after it (a [`Suspect`] range);
    /// `poison_after` closes in a row whose ranges overlap, with the range down to one
    /// publish, give up on it: the error policy applies and the rest resend without it.
    fn broker_closed(&mut self, sh: &mut Shared, now: Instant) {
        if std::mem::take(&mut self.refused_last) {
            // It answered a publish with a refusal and hung up (Mosquitto 2.0 with
            // `max_queued_messages 0`, AWS IoT Core on a denied publish): the close is that
            // publish's, whose reason code the policy has. What was handed out after the
            // answer is no suspect (the broker likely never read it).
            return;
        }
        let limit = self.cfg.poison_after;
        let since = self.connected_at.unwrap_or(now);
        let oldest = self.inflight.keys().find_map(|seq| {
            let e = self.inflight.get(seq)?;
            (!e.released).then_some((seq, e))
        });
        let (Some((seq, e)), Some(last)) = (oldest, self.last_handed) else {
            self.suspect = None;
            return;
        };
        // Not handed out on this connection (a resend still queued), or long before (the
        // close is not "right after" it): no evidence either way. Handed out, not written:
        // a broker refusing a packet by its size hangs up after reading its header.
        let recent = e.handed_at.is_some_and(|t| {
            t >= since && now.saturating_duration_since(t) <= self.cfg.ack_timeout
        });
        if limit == 0 || !recent || last < e.msg.id {
            return;
        }
        let (first, id) = (e.msg.id, e.msg.id);
        let s = match self.suspect {
            Some(s) if s.first.max(first) <= s.last.min(last) => Suspect {
                first: s.first.max(first),
                last: s.last.min(last),
                closes: s.closes + 1,
            },
            _ => Suspect {
                first,
                last,
                closes: 1,
            },
        };
        if s.closes < limit || s.first != s.last || s.first != id {
            self.suspect = Some(s);
            return;
        }
        self.suspect = None;
        let e = self.take_inflight(seq);
        sh.free(&e.msg);
        sh.reject(
            e.msg.coords,
            e.msg.record_id,
            RejectReason::Poison { closes: s.closes },
            e.msg.record.map(|r| *r),
        );
    }

    /// One publish at a time on this connection: the next close, if it comes, is
    /// `poison_after`'th against the suspect range and must name one publish.
    pub(crate) fn probing(&self) -> bool {
        self.suspect
            .is_some_and(|s| s.closes + 1 >= self.cfg.poison_after && self.cfg.poison_after > 0)
    }

    /// Whether one more resent publish stays within the window: the broker's Receive
    /// Maximum counts every publish not yet answered with PUBACK or PUBCOMP, and it may
    /// have lowered it since they were first sent (review L2).
    fn resend_within_window(&self) -> bool {
        let window = usize::from(self.window);
        if self.inflight.len() <= window {
            return true;
        }
        let waiting = self
            .resend
            .iter()
            .filter(|s| self.inflight.get(**s).is_some_and(|e| !e.released))
            .count();
        self.inflight.len() - waiting < window
    }

    /// While probing, whether a publish may go out: the one sent alone was answered.
    fn probe_free(&self) -> bool {
        !self.probing()
            || self
                .probe
                .and_then(|seq| self.inflight.get(seq))
                .is_none_or(|e| e.released)
    }

    /// MQTT 3.1/3.1.1 sessions that outlive their connection (see [`SessionStep`]).
    fn v3_persistent(&self) -> bool {
        self.cfg.version != MqttVersion::V5 && !self.cfg.clean_session
    }

    /// `close` should end a persistent session this sink made (MQTT 3.1/3.1.1).
    fn wants_session_end(&self, sh: &Shared) -> bool {
        !self.cfg.clean_session
            && self.connected_once
            && sh.fatal.is_none()
            && self.session_step != SessionStep::Ending
    }

    /// Ends a connection opened for a session step (DISCONNECT) and opens the next one at
    /// once, without backoff.
    fn reconnect_now(&mut self, sh: &mut Shared, now: Instant) {
        wire::encode_disconnect(self.cfg.version, 0, &mut self.control);
        self.conn = Conn::Connected;
        self.drop_connection(sh, now, true);
        self.timers.set(Timer::Reconnect, now);
    }

    fn take_inflight(&mut self, seq: u64) -> Inflight {
        let e = self.inflight.remove(seq).expect("indexed entry");
        self.by_pkid.remove(&e.pkid);
        e
    }

    /// Leaves the connection: `close_transport` asks the runtime to close it (the core
    /// decided); otherwise the runtime reported it gone.
    pub(crate) fn drop_connection(&mut self, sh: &mut Shared, now: Instant, close_transport: bool) {
        if close_transport {
            sh.events.push_back(Event::CloseTransport {
                connection: self.idx,
            });
        }
        self.resend.clear();
        self.reset_output();
        self.decoder.reset();
        self.ping_outstanding = false;
        self.timers.stop(Timer::ConnAck);
        self.timers.stop(Timer::Keepalive);
        self.timers.stop(Timer::PingResp);
        self.timers.stop(Timer::Ack);
        let ending = self.session_step == SessionStep::Ending;
        if ending || matches!(self.conn, Conn::Closing | Conn::Closed) {
            if self.conn != Conn::Closed {
                sh.session_closed();
            }
            self.session_step = SessionStep::Persistent;
            self.control.clear();
            self.conn = Conn::Closed;
            return;
        }
        // A DISCONNECT queued by the core is still written before the close; anything
        // else belonged to the old connection.
        if !close_transport {
            self.control.clear();
        }
        if self
            .connected_at
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= STABLE_CONNECTION)
        {
            self.backoff.reset();
        }
        // With several broker addresses, the next one is tried.
        self.address = (self.address + 1) % self.addresses.len().max(1);
        self.conn = Conn::Backoff;
        let delay = self.backoff.next_delay();
        self.timers.set(Timer::Reconnect, now + delay);
    }

    pub(crate) fn on_reconnect_timer(&mut self, sh: &mut Shared, now: Instant) {
        if self.conn == Conn::Backoff {
            self.control.clear();
            self.open_transport(sh, now);
        }
    }

    pub(crate) fn on_connack_timeout(&mut self, sh: &mut Shared, now: Instant) {
        if matches!(self.conn, Conn::Opening | Conn::AwaitConnAck) {
            sh.events
                .push_back(Event::ConnectFailed(ConnectFailure::Timeout));
            self.drop_connection(sh, now, true);
        }
    }

    fn restart_keepalive(&mut self, now: Instant) {
        if self.keepalive_secs > 0 {
            let at = now + Duration::from_secs(u64::from(self.keepalive_secs));
            self.timers.set(Timer::Keepalive, at);
        }
    }

    pub(crate) fn on_keepalive(&mut self, now: Instant) {
        if self.conn != Conn::Connected {
            return;
        }
        if !self.ping_outstanding {
            wire::encode_pingreq(&mut self.control);
            self.ping_outstanding = true;
            self.timers
                .set(Timer::PingResp, now + self.cfg.ping_timeout);
        }
    }

    pub(crate) fn on_ping_timeout(&mut self, sh: &mut Shared, now: Instant) {
        if self.conn == Conn::Connected && self.ping_outstanding {
            sh.events
                .push_back(Event::ConnectionLost(LostReason::PingTimeout));
            self.drop_connection(sh, now, true);
        }
    }

    /// When the connection counts as lost, if nothing changes: the oldest in-flight
    /// publish unacknowledged `ack_timeout` after it was written and the one before it
    /// answered, or output waiting that long with no byte written.
    ///
    /// "Written" is handed to the kernel, whose send buffer can hold many seconds of a slow
    /// link (4 MB on Linux, 20 s at 200 KB/s); a broker that keeps answering in order is
    /// alive and the publish at the head of the line is on its way. A broker that stops
    /// answering, or skips one publish's answer while answering later ones, still times
    /// out `ack_timeout` after its last answer in order.
    fn ack_deadline(&self) -> Option<Instant> {
        let acked = self
            .inflight
            .first()
            .and_then(|e| e.sent_at)
            .map(|t| self.head_since.map_or(t, |h| h.max(t)));
        let t = acked.into_iter().chain(self.write_stalled_since()).min()?;
        Some(t + self.cfg.ack_timeout)
    }

    /// Since when output waits with no byte written and no answer from the broker. A
    /// kernel send buffer that is full wakes its writer only when a good part of it has
    /// drained (half of 4 MB: 10 s at 200 KB/s), while the broker answering shows the
    /// link is moving.
    fn write_stalled_since(&self) -> Option<Instant> {
        let t = self.output.stalled_since?;
        Some(self.head_since.map_or(t, |h| h.max(t)))
    }

    /// Arms the ack timer (or stops it).
    pub(crate) fn arm_ack_timer(&mut self) {
        match self.ack_deadline() {
            Some(t) if self.conn == Conn::Connected => self.timers.set(Timer::Ack, t),
            _ => self.timers.stop(Timer::Ack),
        }
    }

    pub(crate) fn on_ack_timeout(&mut self, sh: &mut Shared, now: Instant) {
        if self.conn != Conn::Connected {
            return;
        }
        if self.ack_deadline().is_none_or(|t| t > now) {
            self.arm_ack_timer();
            return;
        }
        let reason = match self.write_stalled_since() {
            Some(t) if t + self.cfg.ack_timeout <= now => LostReason::WriteStalled {
                unwritten: self.output.unwritten_bytes(),
                waited: now.saturating_duration_since(t),
            },
            _ => {
                let Some(e) = self.inflight.first() else {
                    return;
                };
                LostReason::AckTimeout {
                    coords: e.msg.coords.clone(),
                }
            }
        };
        wire::encode_disconnect(self.cfg.version, 0, &mut self.control);
        sh.events.push_back(Event::ConnectionLost(reason));
        self.drop_connection(sh, now, true);
    }

    /// A new connection's output starts empty; QoS 0 publishes that never left are sent
    /// again (first, in order) on the next one.
    fn reset_output(&mut self) {
        let old = std::mem::take(&mut self.output);
        for (_, msg) in old.qos0.into_iter().rev() {
            self.pending.push_front(msg);
        }
    }

    /// The runtime wrote `n` more bytes of the output: publishes whose last byte is out
    /// start their ack timeout now; QoS 0 ones are done.
    pub(crate) fn on_written(&mut self, sh: &mut Shared, now: Instant, n: usize) {
        if self.conn != Conn::Connected && self.conn != Conn::AwaitConnAck {
            return;
        }
        let o = &mut self.output;
        o.written = (o.written + n as u64).min(o.handed);
        if n > 0 {
            o.stalled_since = (o.written < o.handed).then_some(now);
        }
        while let Some(&(seq, end)) = o.unwritten.front() {
            if end > o.written {
                break;
            }
            o.unwritten.pop_front();
            if let Some(e) = self.inflight.get_mut(seq) {
                e.sent_at = Some(now);
            }
        }
        while self
            .output
            .qos0
            .front()
            .is_some_and(|(end, _)| *end <= self.output.written)
        {
            let Some((_, msg)) = self.output.qos0.pop_front() else {
                break;
            };
            sh.free(&msg);
            sh.acknowledged(msg.coords, msg.record_id);
        }
        self.arm_ack_timer();
    }

    /// Bytes went out at `now`: the keep-alive restarts, and a finished close ends.
    pub(crate) fn on_transmitted(&mut self, sh: &mut Shared, now: Instant) {
        if self.conn == Conn::Connected {
            self.restart_keepalive(now);
        }
        if self.conn == Conn::Closing && self.control.is_empty() && self.end_session {
            // The DISCONNECT goes out and the transport closes; then one more connection,
            // CleanSession=1, ends the session.
            self.end_session = false;
            sh.events.push_back(Event::CloseTransport {
                connection: self.idx,
            });
            self.timers.stop(Timer::Keepalive);
            self.timers.stop(Timer::PingResp);
            self.session_step = SessionStep::Ending;
            self.conn = Conn::Backoff;
            self.timers.set(Timer::Reconnect, now);
        } else if self.conn == Conn::Closing && self.control.is_empty() {
            sh.events.push_back(Event::CloseTransport {
                connection: self.idx,
            });
            sh.session_closed();
            self.conn = Conn::Closed;
            self.timers.stop(Timer::Keepalive);
            self.timers.stop(Timer::PingResp);
        }
    }

    /// Fills `buf` (from `start`, where this call's output begins) up to about `limit`
    /// bytes: control packets, then resends, then new publishes within the window.
    pub(crate) fn transmit(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        buf: &mut Vec<u8>,
        start: usize,
        limit: usize,
    ) {
        // Where a byte appended to `buf` ends up in this connection's output.
        let base = self.output.handed.wrapping_sub(start as u64);
        if !self.control.is_empty() {
            buf.append(&mut self.control);
            let end = base.wrapping_add(buf.len() as u64);
            for seq in std::mem::take(&mut self.output.releases) {
                if let Some(e) = self.inflight.get_mut(seq) {
                    e.end = end;
                }
                self.output.unwritten.push_back((seq, end));
            }
        }
        if self.conn != Conn::Connected {
            return;
        }
        while buf.len() < limit {
            let Some(&seq) = self.resend.front() else {
                break;
            };
            // A QoS 0 publish the lost connection left unwritten goes before the resends
            // pushed after it (a transform mixing QoS): in push order, as first sent.
            let next = self.inflight.get(seq).map(|e| e.msg.id);
            if self
                .pending
                .front()
                .is_some_and(|m| m.qos == QoS::AtMostOnce && next.is_some_and(|id| m.id < id))
            {
                if !self.rate_allows(sh, now) {
                    break;
                }
                self.send_front(sh, now, buf, base);
                continue;
            }
            let released = self.inflight.get(seq).map(|e| e.released);
            if released == Some(false) && (!self.probe_free() || !self.resend_within_window()) {
                break;
            }
            if released == Some(false) && !self.rate_allows(sh, now) {
                break;
            }
            self.resend.pop_front();
            let size = self
                .inflight
                .get(seq)
                .map_or(0, |e| e.msg.packet.bytes.len());
            let limit = self.broker_max_packet.filter(|l| size > *l as usize);
            if let (Some(false), Some(limit)) = (released, limit) {
                // The broker lowered its Maximum Packet Size since this was sent (review
                // L2): resending it would be refused on every connection.
                let e = self.take_inflight(seq);
                sh.free(&e.msg);
                let reason = RejectReason::PacketTooLarge {
                    size,
                    limit,
                    by_broker: true,
                };
                sh.reject(
                    e.msg.coords,
                    e.msg.record_id,
                    reason,
                    e.msg.record.map(|r| *r),
                );
                continue;
            }
            let Some(e) = self.inflight.get_mut(seq) else {
                continue;
            };
            e.sent_at = None;
            if e.released {
                wire::encode_pubrel(e.pkid, buf);
            } else {
                wire::set_dup(&mut e.msg.packet, true);
                buf.extend_from_slice(&e.msg.packet.bytes);
                sh.stats.resent += 1;
                e.handed_at = Some(now);
                self.last_handed = self.last_handed.max(Some(e.msg.id));
                self.probe = Some(seq);
            }
            let end = base.wrapping_add(buf.len() as u64);
            e.end = end;
            self.output.unwritten.push_back((seq, end));
        }
        if !self.resend.is_empty() {
            return; // resends go first, in order
        }
        if self.hold_for_batch(now) {
            return;
        }
        while buf.len() < limit {
            let Some(qos) = self.pending.front().map(|m| m.qos) else {
                break;
            };
            if qos > self.broker_max_qos {
                // Pushed since CONNACK at a QoS (a transform's) this broker does not allow.
                let max = self.broker_max_qos;
                let why = format!("its CONNACK says Maximum QoS {}", max as u8);
                if !self.qos_not_honoured(sh, now, qos, max, why) {
                    buf.append(&mut self.control); // the DISCONNECT
                    return;
                }
                continue; // lowered to `max`
            }
            // A QoS 1/2 publish waits for a window slot, and so does everything after it
            // (in order); a QoS 0 one needs none.
            if qos != QoS::AtMostOnce
                && (self.inflight.len() >= usize::from(self.window) || !self.probe_free())
            {
                break;
            }
            if !self.rate_allows(sh, now) {
                break;
            }
            self.send_front(sh, now, buf, base);
        }
    }

    /// Hands out the publish at the front of the queue (`base`: where `buf[0]` is in this
    /// connection's output), or rejects it when this broker cannot take it.
    fn send_front(&mut self, sh: &mut Shared, now: Instant, buf: &mut Vec<u8>, base: u64) {
        let Some(mut msg) = self.pending.pop_front() else {
            return;
        };
        let size = msg.packet.bytes.len();
        if let Some(limit) = self.broker_max_packet.filter(|l| size > *l as usize) {
            sh.free(&msg);
            let reason = RejectReason::PacketTooLarge {
                size,
                limit,
                by_broker: true,
            };
            sh.reject(msg.coords, msg.record_id, reason, msg.record.map(|r| *r));
            return;
        }
        if msg.retain && !self.retain_available {
            sh.free(&msg);
            sh.reject(
                msg.coords,
                msg.record_id,
                RejectReason::RetainNotSupported,
                msg.record.map(|r| *r),
            );
            return;
        }
        if msg.qos == QoS::AtMostOnce {
            // Done once written (`on_written`); memory stays bounded by the buffer.
            self.write_publish(&msg.packet, buf);
            let end = base.wrapping_add(buf.len() as u64);
            self.output.qos0.push_back((end, msg));
            return;
        }
        let pkid = self.alloc_pkid();
        wire::set_pkid(&mut msg.packet, pkid);
        self.write_publish(&msg.packet, buf);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_pkid.insert(pkid, seq);
        let end = base.wrapping_add(buf.len() as u64);
        self.output.unwritten.push_back((seq, end));
        self.last_handed = self.last_handed.max(Some(msg.id));
        self.probe = Some(seq);
        self.inflight.insert(
            seq,
            Inflight {
                msg,
                pkid,
                released: false,
                sent_at: None,
                handed_at: Some(now),
                end,
            },
        );
    }

    /// Takes one publish's allowance under `max_publish_rate`; when none is free, arms the
    /// timer for when one will be and says no.
    fn rate_allows(&mut self, sh: &mut Shared, now: Instant) -> bool {
        let Some(rate) = sh.rate.as_mut() else {
            return true;
        };
        match rate.take(now) {
            Ok(()) => {
                self.timers.stop(Timer::Rate);
                true
            }
            Err(at) => {
                self.timers.set(Timer::Rate, at);
                false
            }
        }
    }

    /// True when new publishes should wait for more of the window to free up: the window
    /// is nearly full (acknowledgements are coming), fewer than an eighth of its slots are
    /// free, and more records wait than would fit. Sending into every slot as soon as it
    /// frees locks publisher and broker into a ping-pong of a few packets per segment (a
    /// read, a wake-up and a write for every two or three records, on both sides); waiting
    /// for a batch keeps writes and the broker's reads large. The wait is bounded by
    /// [`REFILL_DELAY`]: a broker with Nagle's algorithm holds its next acks until our TCP
    /// ACK, which a silent receiver delays (40 ms on Linux), so waiting on acks alone could
    /// stall.
    fn hold_for_batch(&mut self, now: Instant) -> bool {
        let batch = usize::from(self.window) / 8;
        let free = usize::from(self.window).saturating_sub(self.inflight.len());
        // A QoS 0 publish at the front needs no slot: nothing to wait for.
        let hold = self
            .pending
            .front()
            .is_some_and(|m| m.qos != QoS::AtMostOnce)
            && !self.refill_due
            && free > 0
            && free < batch
            && free < self.pending.len();
        if hold {
            if self.timers.get(Timer::Refill).is_none() {
                self.timers.set(Timer::Refill, now + REFILL_DELAY);
            }
        } else {
            self.refill_due = false;
            self.timers.stop(Timer::Refill);
        }
        hold
    }

    /// Writes a first transmission of a PUBLISH, with a topic alias when the broker allows
    /// (MQTT 5). Resends after a reconnect go out plain: aliases belong to one connection.
    /// Writes a new publish, with a topic alias where the broker allows them. The alias
    /// property adds 3 bytes (or more, with longer length fields) to the packet that
    /// sets it up, and may add to one that uses it (a topic shorter than 3 bytes): a packet
    /// that would then exceed the broker's Maximum Packet Size goes out plain, as
    /// checked (review L2).
    fn write_publish(&mut self, p: &EncodedPublish, buf: &mut Vec<u8>) {
        if self.alias_max == 0 {
            buf.extend_from_slice(&p.bytes);
            return;
        }
        let start = buf.len();
        let fits = |buf: &Vec<u8>, limit: Option<u32>| {
            limit.is_none_or(|l| buf.len() - start <= l as usize)
        };
        let topic = wire::publish_topic(p);
        if let Some(&alias) = self.aliases.get(topic) {
            wire::write_aliased(p, alias, false, buf);
        } else if self.aliases.len() < usize::from(self.alias_max) {
            let alias = self.aliases.len() as u16 + 1;
            wire::write_aliased(p, alias, true, buf);
            if fits(buf, self.broker_max_packet) {
                self.aliases.insert(topic.to_vec(), alias);
            }
        } else {
            buf.extend_from_slice(&p.bytes);
        }
        if !fits(buf, self.broker_max_packet) {
            buf.truncate(start);
            buf.extend_from_slice(&p.bytes);
        }
    }

    /// The next packet id not in flight; the window (<= 65535) guarantees one is free.
    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.by_pkid.contains_key(&id) {
                return id;
            }
        }
    }

    /// Disconnects cleanly: DISCONNECT is sent if connected, then `CloseTransport` and
    /// `Closed`. Flush first: records not yet acknowledged are not committed.
    pub(crate) fn close(&mut self, sh: &mut Shared, now: Instant) {
        match self.conn {
            Conn::Connected => {
                self.control.clear();
                if self.cfg.version == MqttVersion::V5 && !self.cfg.clean_session {
                    // Session Expiry Interval 0: the broker ends the session now rather
                    // than keep it for `session_expiry` for nobody (the next instance has
                    // its own client id, or starts clean).
                    wire::encode_disconnect_ending_session(&mut self.control);
                } else {
                    wire::encode_disconnect(self.cfg.version, 0, &mut self.control);
                }
                // MQTT 3.1/3.1.1: a persistent session lasts until a CleanSession=1
                // connection ends it; one more connection does, after this one (not after
                // a fatal error: no more connections to a broker that broke the rules).
                self.end_session = self.v3_persistent() && self.wants_session_end(sh);
                self.conn = Conn::Closing;
                self.timers.stop(Timer::Keepalive);
                self.timers.stop(Timer::PingResp);
            }
            Conn::Opening | Conn::AwaitConnAck | Conn::Backoff if self.wants_session_end(sh) => {
                // Between connections, or opening one that would resume the session: the
                // session is still on the broker; a CleanSession=1 connection ends it.
                if self.conn != Conn::Backoff {
                    sh.events.push_back(Event::CloseTransport {
                        connection: self.idx,
                    });
                    self.control.clear();
                    self.decoder.reset();
                    self.reset_output();
                    self.timers.stop(Timer::ConnAck);
                }
                self.session_step = SessionStep::Ending;
                self.conn = Conn::Backoff;
                self.timers.set(Timer::Reconnect, now);
            }
            Conn::Opening | Conn::AwaitConnAck => {
                self.conn = Conn::Closing;
                self.drop_connection(sh, now, true);
            }
            Conn::Backoff if self.session_step == SessionStep::Ending => {
                self.timers.stop(Timer::Reconnect);
                self.drop_connection(sh, now, false);
            }
            Conn::Backoff => {
                self.timers.stop(Timer::Reconnect);
                self.conn = Conn::Closed;
                sh.session_closed();
            }
            Conn::Closing | Conn::Closed => {}
        }
    }

    /// True once connected and CONNACK accepted.
    pub(crate) fn is_connected(&self) -> bool {
        self.conn == Conn::Connected
    }

    /// True after `Event::Closed`.
    pub(crate) fn is_closed(&self) -> bool {
        self.conn == Conn::Closed
    }

    /// Queued and in-flight publishes above `to` go on (and are resent) at `to`.
    pub(crate) fn lower_qos(&mut self, to: QoS) {
        for msg in self.pending.iter_mut() {
            msg.lower_qos(to);
        }
        for e in self.inflight.values_mut() {
            e.msg.lower_qos(to);
        }
    }

    /// The broker gives QoS `to` at most where publishes ask for `from`: the configured
    /// QoS, or a higher one a transform (route) gave publishes. With `qos_downgrade` (and
    /// `to` at least 1) publishes above `to` go on at `to`, and so do those pushed later:
    /// true. Otherwise the sink stops for good (never a silent downgrade, never a reconnect
    /// loop): false.
    fn qos_not_honoured(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        from: QoS,
        to: QoS,
        why: String,
    ) -> bool {
        if sh.fatal.is_some() {
            return false; // said once; the rest of the window's answers change nothing
        }
        let addr = self.server_address();
        let (from_n, to_n) = (from as u8, to as u8);
        if self.cfg.qos_downgrade && to != QoS::AtMostOnce && sh.qos_ceiling <= to {
            // Another connection found it out and said so: only this one's publishes.
            self.lower_qos(to);
            return true;
        }
        if self.cfg.qos_downgrade && to != QoS::AtMostOnce {
            sh.events.push_back(Event::QosDowngraded {
                from: from_n,
                to: to_n,
                why: format!("the MQTT broker at {addr} does not honour QoS {from_n}: {why}"),
            });
            sh.qos = sh.qos.min(to);
            sh.qos_ceiling = sh.qos_ceiling.min(to);
            // The other connections' publishes are lowered by the sink (`Sink::settle`).
            sh.lowered = Some(sh.qos_ceiling);
            self.lower_qos(to);
            return true;
        }
        // Above the configured QoS: a transform's (route's) `qos` asked for it.
        let by_transform = from > sh.qos;
        let asked = if by_transform {
            format!("QoS {from_n} (the transform's qos)")
        } else {
            format!("qos = {from_n}")
        };
        let fix = match (to, by_transform) {
            (QoS::AtMostOnce, false) => {
                "allow QoS 1 on the broker, or set qos = 0 if at-most-once is acceptable"
                    .to_string()
            }
            (QoS::AtMostOnce, true) => format!(
                "allow QoS {from_n} on the broker, or have the transform publish at qos 0 if \
                 at-most-once is acceptable"
            ),
            (_, false) => {
                format!("set qos = {to_n}, or qos_downgrade = true to continue at QoS {to_n}")
            }
            (_, true) => format!(
                "have the transform publish at qos {to_n} at most, or set qos_downgrade = true \
                 to continue at QoS {to_n}"
            ),
        };
        let reason = format!("the MQTT broker at {addr} does not honour {asked}: {why}; {fix}");
        sh.fatal = Some(reason.clone());
        sh.events.push_back(Event::Fatal(reason));
        sh.flush = None;
        sh.timers.stop(Timer::Flush);
        if self.conn == Conn::AwaitConnAck {
            // Close from here, as `close` does once connected (DISCONNECT, then Closed).
            self.conn = Conn::Connected;
        }
        self.close(sh, now);
        false
    }
}
