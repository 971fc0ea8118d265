//! mqtt-sink driver for plain std threads: no async runtime.
//!
//! [`MqttSink`] publishes records to an MQTT broker over TCP or TLS (rustls, ring). It is a
//! thin driver of [`mqtt_sink_core::Sink`]: one thread owns the core and the TLS state and
//! moves bytes, records and time in and out; a reader thread per connection only reads the
//! socket. Every MQTT decision (packets, timeouts, resends) stays in the core.
//!
//! [`Bridge`] consumes Kafka (a `BaseConsumer` in a consumer group) into an `MqttSink`,
//! checkpointing (flush, then commit) on the core's schedule and on every revoke.

pub mod bridge;
pub mod kafka;
pub mod tls;

pub use bridge::{Bridge, BridgeBuilder, BridgeError};
pub use mqtt_sink_core::{BridgeStats, KafkaConfig};

use std::collections::VecDeque;
use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mqtt_sink_core::{
    CommitOffsets, ConfigErrors, ConnectFailure, Connected, Event, PushError, Record, RecordMapper,
    RejectReason, Sink, TopicPartition,
};

pub use mqtt_sink_core as core;
pub use mqtt_sink_core::Config;
pub use mqtt_sink_core::{SinkError, TrySendError};

type SuccessFn = Box<dyn Fn(&Connected) + Send + Sync>;
type FailureFn = Box<dyn Fn(&ConnectFailure) + Send + Sync>;
type EventFn = Box<dyn Fn(&Event) + Send + Sync>;
type DeadLetterFn = Box<dyn Fn(&Record, &RejectReason) -> Result<(), String> + Send + Sync>;

/// A write that cannot make progress for this long counts as a lost connection, so that a
/// stalled peer never blocks the driver thread (and its timers) for longer.
const WRITE_STALL: Duration = Duration::from_secs(1);

/// Builds an [`MqttSink`]: config, record mapper and the seed's callbacks.
pub struct MqttSinkBuilder {
    config: Config,
    mapper: Option<RecordMapper>,
    on_success: Option<SuccessFn>,
    on_failure: Option<FailureFn>,
    on_event: Option<EventFn>,
    dead_letter: Option<DeadLetterFn>,
}

impl fmt::Debug for MqttSinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSinkBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MqttSinkBuilder {
    /// Replaces the default record mapper (serializers, retain, properties).
    #[must_use]
    pub fn mapper(mut self, mapper: RecordMapper) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// Called after each successful CONNACK (never before).
    #[must_use]
    pub fn on_client_connect_success(
        mut self,
        f: impl Fn(&Connected) + Send + Sync + 'static,
    ) -> Self {
        self.on_success = Some(Box::new(f));
        self
    }

    /// Called when a connection attempt fails: refusal code or transport error.
    #[must_use]
    pub fn on_client_connect_failure(
        mut self,
        f: impl Fn(&ConnectFailure) + Send + Sync + 'static,
    ) -> Self {
        self.on_failure = Some(Box::new(f));
        self
    }

    /// Sees every event of the core (for logs and metrics).
    #[must_use]
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Box::new(f));
        self
    }

    /// Produces dead letters (error policy `dead-letter`): called on the sink's thread with
    /// each rejected record; return `Ok` only once Kafka confirmed the produce. Without it,
    /// dead-lettering fails the record (as the `fail` policy does).
    #[must_use]
    pub fn dead_letter(
        mut self,
        f: impl Fn(&Record, &RejectReason) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Box::new(f));
        self
    }

    /// Validates the config, then starts the sink's thread. It connects at once and
    /// reconnects with the core's backoff.
    pub fn start(self) -> Result<MqttSink, ConfigErrors> {
        let tls = if self.config.tls_enabled {
            Some(tls::client_config(&self.config).map_err(|rule| {
                ConfigErrors(vec![mqtt_sink_core::ConfigError {
                    option: "tls".into(),
                    value: String::new(),
                    rule,
                }])
            })?)
        } else {
            None
        };
        let mapper = self
            .mapper
            .unwrap_or_else(|| RecordMapper::from_config(&self.config));
        let server = self.config.server.clone();
        let port = self.config.port;
        let sink = Sink::new(self.config, mapper, Instant::now())?;
        let (tx, rx) = mpsc::sync_channel(256);
        let driver = Driver {
            sink,
            server,
            port,
            tls,
            tx: tx.clone(),
            rx,
            on_success: self.on_success,
            on_failure: self.on_failure,
            on_event: self.on_event,
            dead_letter: self.dead_letter,
            conn: None,
            attempt: 0,
            out: Vec::with_capacity(64 * 1024),
            blocked: VecDeque::new(),
            flush_waiters: Vec::new(),
            flush_queued: Vec::new(),
            close_waiter: None,
            read_after: ReadGate::default(),
            room_waiters: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("mqtt-sink".into())
            .spawn(move || driver.run())
            .map_err(|e| {
                ConfigErrors(vec![mqtt_sink_core::ConfigError {
                    option: "(thread)".into(),
                    value: String::new(),
                    rule: format!("cannot start the sink thread: {e}"),
                }])
            })?;
        Ok(MqttSink {
            client: SinkClient { tx },
            thread: Some(thread),
        })
    }
}

enum Msg {
    Send(Record, SyncSender<Result<(), SinkError>>),
    TrySend(Record, SyncSender<Result<(), TrySendError>>),
    TrySendBatch(VecDeque<Record>, SyncSender<VecDeque<Record>>),
    Assign(Vec<(TopicPartition, Option<i64>)>, SyncSender<()>),
    Revoke(Vec<TopicPartition>, SyncSender<()>),
    Committed(CommitOffsets),
    Rewind(SyncSender<CommitOffsets>),
    Stats(SyncSender<mqtt_sink_core::Stats>),
    Room(SyncSender<()>),
    Flush(SyncSender<Result<CommitOffsets, SinkError>>),
    Close(SyncSender<()>),
    Opened(u64, TcpStream),
    OpenFailed(u64, String),
    Bytes(u64, Vec<u8>),
    ReadClosed(u64, String),
}

/// A cloneable handle to a running sink. All methods block the calling thread.
#[derive(Debug, Clone)]
pub struct SinkClient {
    tx: SyncSender<Msg>,
}

impl SinkClient {
    fn call<T>(&self, make: impl FnOnce(SyncSender<T>) -> Msg) -> Result<T, SinkError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx.send(make(tx)).map_err(|_| SinkError::Closed)?;
        rx.recv().map_err(|_| SinkError::Closed)
    }

    /// Waits until the buffer has room (see `Sink::is_full`: after a refusal, a quarter of it
    /// drained), at most `timeout`. True when there is room.
    pub fn wait_room(&self, timeout: Duration) -> Result<bool, SinkError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx.send(Msg::Room(tx)).map_err(|_| SinkError::Closed)?;
        match rx.recv_timeout(timeout) {
            Ok(()) => Ok(true),
            Err(RecvTimeoutError::Timeout) => Ok(false),
            Err(RecvTimeoutError::Disconnected) => Err(SinkError::Closed),
        }
    }

    /// Hands a record to the sink. Blocks while the sink's buffer is full: this is the
    /// backpressure. Records sent while the broker is unreachable are queued (bounded) and
    /// published after it returns.
    pub fn send(&self, record: Record) -> Result<(), SinkError> {
        self.call(|tx| Msg::Send(record, tx))?
    }

    /// Like [`send`](Self::send) but returns the record at once when the buffer is full.
    pub fn try_send(&self, record: Record) -> Result<(), TrySendError> {
        match self.call(|tx| Msg::TrySend(record, tx)) {
            Ok(r) => r,
            Err(e) => Err(TrySendError::Refused(e)),
        }
    }

    /// Takes records in order until the buffer is full or one is refused, in one round
    /// trip; returns those not taken (the first of them is the one that did not fit or
    /// was refused: [`try_send`](Self::try_send) it to learn which).
    pub fn try_send_batch(&self, records: VecDeque<Record>) -> Result<VecDeque<Record>, SinkError> {
        self.call(|tx| Msg::TrySendBatch(records, tx))
    }

    /// Blocks until every record sent before this call is acknowledged (or handled by the
    /// error policy), at most `flush_timeout`; returns the positions to commit.
    pub fn flush(&self) -> Result<CommitOffsets, SinkError> {
        self.call(Msg::Flush)?
    }

    /// Kafka assigned these partitions (with their committed positions, if known).
    pub fn assign(&self, partitions: Vec<(TopicPartition, Option<i64>)>) -> Result<(), SinkError> {
        self.call(|tx| Msg::Assign(partitions, tx))
    }

    /// Kafka revoked these partitions (flush and commit them first).
    pub fn revoke(&self, partitions: Vec<TopicPartition>) -> Result<(), SinkError> {
        self.call(|tx| Msg::Revoke(partitions, tx))
    }

    /// Kafka confirmed a commit of these positions.
    pub fn committed(&self, offsets: CommitOffsets) -> Result<(), SinkError> {
        self.tx
            .send(Msg::Committed(offsets))
            .map_err(|_| SinkError::Closed)
    }

    /// After a failed flush: forgets what was not committed and returns the positions to
    /// seek the consumer to.
    pub fn rewind(&self) -> Result<CommitOffsets, SinkError> {
        self.call(Msg::Rewind)
    }

    /// The core's counters and gauges (buffered, in flight, window, ...).
    pub fn stats(&self) -> Result<mqtt_sink_core::Stats, SinkError> {
        self.call(Msg::Stats)
    }
}

/// A running sink: send records, flush, close. All methods block the calling thread.
#[derive(Debug)]
pub struct MqttSink {
    client: SinkClient,
    thread: Option<JoinHandle<()>>,
}

impl std::ops::Deref for MqttSink {
    type Target = SinkClient;
    fn deref(&self) -> &SinkClient {
        &self.client
    }
}

impl MqttSink {
    /// Starts building a sink from `config`.
    pub fn builder(config: Config) -> MqttSinkBuilder {
        MqttSinkBuilder {
            config,
            mapper: None,
            on_success: None,
            on_failure: None,
            on_event: None,
            dead_letter: None,
        }
    }

    /// A cloneable handle (for a rebalance callback, say).
    pub fn client(&self) -> SinkClient {
        self.client.clone()
    }

    /// Sends DISCONNECT and stops the thread. Flush first: unacknowledged records are
    /// dropped.
    pub fn close(mut self) -> Result<(), SinkError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), SinkError> {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.client.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| SinkError::Closed),
            None => Ok(()),
        }
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Conn {
    id: u64,
    tcp: TcpStream,
    tls: Option<rustls::ClientConnection>,
    /// TCP up and, with TLS, the handshake done: the core has been told.
    ready: bool,
}

struct Driver {
    sink: Sink,
    server: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    tx: SyncSender<Msg>,
    rx: Receiver<Msg>,
    on_success: Option<SuccessFn>,
    on_failure: Option<FailureFn>,
    on_event: Option<EventFn>,
    dead_letter: Option<DeadLetterFn>,
    conn: Option<Conn>,
    attempt: u64,
    out: Vec<u8>,
    blocked: VecDeque<(Record, SyncSender<Result<(), SinkError>>)>,
    flush_waiters: Vec<SyncSender<Result<CommitOffsets, SinkError>>>,
    flush_queued: Vec<SyncSender<Result<CommitOffsets, SinkError>>>,
    close_waiter: Option<SyncSender<()>>,
    /// Shared with the reader thread: the core's `defer_input_until`.
    read_after: ReadGate,
    /// Callers of `wait_room` (answered once the buffer has room; a caller that gave up
    /// finds its answer unread, which costs nothing).
    room_waiters: Vec<SyncSender<()>>,
}

/// When the reader thread may read next (the core is waiting for a batch of acks).
type ReadGate = Arc<std::sync::Mutex<Option<Instant>>>;

impl Driver {
    fn run(mut self) {
        loop {
            self.drain(Instant::now());
            if let Ok(mut g) = self.read_after.lock() {
                *g = self.sink.defer_input_until();
            }
            if self.sink.is_closed() {
                if let Some(w) = self.close_waiter.take() {
                    let _ = w.send(());
                }
                for (_, reply) in self.blocked.drain(..) {
                    let _ = reply.send(Err(SinkError::Closed));
                }
                return;
            }
            let msg = match self.sink.poll_timeout() {
                Some(t) => match self
                    .rx
                    .recv_timeout(t.saturating_duration_since(Instant::now()))
                {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match self.rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            let now = Instant::now();
            match msg {
                None => self.sink.handle_timeout(now),
                Some(m) => self.on_msg(now, m),
            }
        }
    }

    fn on_msg(&mut self, now: Instant, m: Msg) {
        match m {
            Msg::Send(r, reply) => {
                if self.blocked.is_empty() {
                    match self.sink.push_record(now, r) {
                        Ok(()) => {
                            let _ = reply.send(Ok(()));
                        }
                        Err(PushError::Full(r)) => self.blocked.push_back((r, reply)),
                        Err(e) => {
                            let _ = reply.send(Err(SinkError::Push(e.to_string())));
                        }
                    }
                } else {
                    self.blocked.push_back((r, reply));
                }
            }
            Msg::TrySend(r, reply) => {
                let result = if self.blocked.is_empty() {
                    match self.sink.push_record(now, r) {
                        Ok(()) => Ok(()),
                        Err(PushError::Full(r)) => Err(TrySendError::Full(r)),
                        Err(e) => Err(TrySendError::Refused(SinkError::Push(e.to_string()))),
                    }
                } else {
                    Err(TrySendError::Full(r))
                };
                let _ = reply.send(result);
            }
            Msg::TrySendBatch(mut records, reply) => {
                if self.blocked.is_empty() {
                    while let Some(r) = records.pop_front() {
                        if let Err(e) = self.sink.push_record(now, r) {
                            // Back in front; `try_send` tells the caller why.
                            records.push_front(e.into_record());
                            break;
                        }
                    }
                }
                let _ = reply.send(records);
            }
            Msg::Assign(parts, reply) => {
                for (tp, committed) in parts {
                    self.sink.assign(tp, committed);
                }
                let _ = reply.send(());
            }
            Msg::Revoke(parts, reply) => {
                for tp in &parts {
                    self.sink.revoke(tp);
                }
                let _ = reply.send(());
            }
            Msg::Committed(offsets) => self.sink.handle_committed(&offsets),
            Msg::Rewind(reply) => {
                let _ = reply.send(self.sink.rewind());
            }
            Msg::Stats(reply) => {
                let _ = reply.send(self.sink.stats());
            }
            Msg::Room(reply) => self.room_waiters.push(reply),
            Msg::Flush(reply) => {
                if self.sink.is_flushing() || !self.blocked.is_empty() {
                    self.flush_queued.push(reply);
                } else {
                    self.flush_waiters.push(reply);
                    let deadline = self.sink.flush_deadline(now);
                    let _ = self.sink.begin_flush(now, deadline);
                }
            }
            Msg::Close(reply) => {
                self.close_waiter = Some(reply);
                self.sink.close(now);
            }
            Msg::Opened(id, tcp) if id == self.attempt => self.on_opened(now, id, tcp),
            Msg::OpenFailed(id, e) if id == self.attempt => self.sink.handle_disconnected(now, e),
            Msg::Bytes(id, data) if self.conn.as_ref().is_some_and(|c| c.id == id) => {
                self.on_bytes(now, &data)
            }
            Msg::ReadClosed(id, why) if self.conn.as_ref().is_some_and(|c| c.id == id) => {
                let why = format!("{}:{}: {why}", self.server, self.port);
                self.lose(now, why)
            }
            // From an attempt or connection given up since.
            Msg::Opened(..) | Msg::OpenFailed(..) | Msg::Bytes(..) | Msg::ReadClosed(..) => {}
        }
    }

    fn on_opened(&mut self, now: Instant, id: u64, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_write_timeout(Some(WRITE_STALL));
        let reader = match tcp.try_clone() {
            Ok(r) => r,
            Err(e) => {
                let why = format!("{}:{}: {e}", self.server, self.port);
                self.sink.handle_disconnected(now, why);
                return;
            }
        };
        let tx = self.tx.clone();
        let gate = self.read_after.clone();
        let spawned = std::thread::Builder::new()
            .name("mqtt-sink-reader".into())
            .spawn(move || read_loop(id, reader, tx, &gate));
        if let Err(e) = spawned {
            let why = format!("cannot start a reader thread: {e}");
            self.sink.handle_disconnected(now, why);
            return;
        }
        let tls = match &self.tls {
            None => None,
            Some(cfg) => {
                let made = tls::server_name(&self.server).and_then(|name| {
                    rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| {
                        format!("{}:{}: TLS setup failed: {e}", self.server, self.port)
                    })
                });
                match made {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let _ = tcp.shutdown(Shutdown::Both);
                        self.sink.handle_disconnected(now, e);
                        return;
                    }
                }
            }
        };
        let ready = tls.is_none();
        self.conn = Some(Conn {
            id,
            tcp,
            tls,
            ready,
        });
        if ready {
            self.sink.handle_connected(now);
        } else if let Err(e) = self.flush_tls() {
            self.lose(now, e);
        }
    }

    fn on_bytes(&mut self, now: Instant, data: &[u8]) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some(tls) = conn.tls.as_mut() else {
            let _ = self.sink.handle_input(now, data);
            return;
        };
        let mut rd = data;
        let mut plain = Vec::new();
        let mut failure = None;
        while !rd.is_empty() {
            if let Err(e) = tls.read_tls(&mut rd) {
                failure = Some(format!("TLS read failed: {e}"));
                break;
            }
            match tls.process_new_packets() {
                Ok(state) => {
                    let n = state.plaintext_bytes_to_read();
                    if n > 0 {
                        let start = plain.len();
                        plain.resize(start + n, 0);
                        if let Err(e) = tls.reader().read_exact(&mut plain[start..]) {
                            failure = Some(format!("TLS read failed: {e}"));
                            break;
                        }
                    }
                }
                Err(e) => {
                    failure = Some(format!("TLS handshake failed: {e}"));
                    break;
                }
            }
        }
        let became_ready = !conn.ready && !tls.is_handshaking() && failure.is_none();
        if let Err(e) = self.flush_tls() {
            failure.get_or_insert(e);
        }
        if let Some(e) = failure {
            let why = format!("{}:{}: {e}", self.server, self.port);
            self.lose(now, why);
            return;
        }
        if became_ready {
            if let Some(c) = self.conn.as_mut() {
                c.ready = true;
            }
            self.sink.handle_connected(now);
        }
        if !plain.is_empty() {
            let _ = self.sink.handle_input(now, &plain);
        }
    }

    /// Writes pending TLS records (handshake or encrypted data) to the socket.
    fn flush_tls(&mut self) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let Some(tls) = conn.tls.as_mut() else {
            return Ok(());
        };
        while tls.wants_write() {
            tls.write_tls(&mut conn.tcp)
                .map_err(|e| format!("write failed: {e}"))?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut().filter(|c| c.ready) else {
            return Ok(());
        };
        let result = match conn.tls.as_mut() {
            None => conn
                .tcp
                .write_all(&self.out)
                .map_err(|e| format!("write failed: {e}")),
            Some(tls) => tls
                .writer()
                .write_all(&self.out)
                .map_err(|e| format!("TLS write failed: {e}")),
        };
        self.out.clear();
        result?;
        self.flush_tls()
    }

    fn lose(&mut self, now: Instant, why: String) {
        if let Some(c) = self.conn.take() {
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        self.out.clear();
        self.sink.handle_disconnected(now, why);
    }

    /// Drains the core: bytes to the socket, events to their handlers, until quiet.
    fn drain(&mut self, now: Instant) {
        loop {
            while self.sink.poll_transmit(now, &mut self.out) {}
            let mut any = false;
            if !self.out.is_empty() {
                any = true;
                if self.conn.is_none() {
                    self.out.clear();
                } else if let Err(e) = self.write_out() {
                    let why = format!("{}:{}: {e}", self.server, self.port);
                    self.lose(now, why);
                }
            }
            while let Some(e) = self.sink.poll_event() {
                any = true;
                self.on_event(now, &e);
            }
            while let Some((r, reply)) = self.blocked.pop_front() {
                match self.sink.push_record(now, r) {
                    Ok(()) => {
                        any = true;
                        let _ = reply.send(Ok(()));
                    }
                    Err(PushError::Full(r)) => {
                        self.blocked.push_front((r, reply));
                        break;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(SinkError::Push(e.to_string())));
                    }
                }
            }
            if !self.room_waiters.is_empty() && !self.sink.is_full() {
                for w in self.room_waiters.drain(..) {
                    let _ = w.try_send(());
                }
            }
            if self.blocked.is_empty() && !self.flush_queued.is_empty() && !self.sink.is_flushing()
            {
                any = true;
                self.flush_waiters = std::mem::take(&mut self.flush_queued);
                let deadline = self.sink.flush_deadline(now);
                let _ = self.sink.begin_flush(now, deadline);
            }
            if !any {
                return;
            }
        }
    }

    fn on_event(&mut self, now: Instant, e: &Event) {
        if let Some(f) = &self.on_event {
            f(e);
        }
        match e {
            Event::OpenTransport => {
                if let Some(c) = self.conn.take() {
                    let _ = c.tcp.shutdown(Shutdown::Both);
                }
                self.attempt += 1;
                let (id, tx) = (self.attempt, self.tx.clone());
                let (server, port) = (self.server.clone(), self.port);
                let spawned = std::thread::Builder::new()
                    .name("mqtt-sink-connect".into())
                    .spawn(move || {
                        let msg = match connect(&server, port) {
                            Ok(s) => Msg::Opened(id, s),
                            Err(e) => Msg::OpenFailed(id, e),
                        };
                        let _ = tx.send(msg);
                    });
                if let Err(e) = spawned {
                    self.sink
                        .handle_disconnected(now, format!("cannot start a connect thread: {e}"));
                }
            }
            Event::CloseTransport => {
                // Pending bytes (a DISCONNECT) were written by drain before this event.
                self.attempt += 1;
                if let Some(mut c) = self.conn.take() {
                    if let Some(tls) = c.tls.as_mut() {
                        tls.send_close_notify();
                        while tls.wants_write() {
                            if tls.write_tls(&mut c.tcp).is_err() {
                                break;
                            }
                        }
                    }
                    let _ = c.tcp.shutdown(Shutdown::Both);
                }
            }
            Event::Connected(c) => {
                if let Some(f) = &self.on_success {
                    f(c);
                }
            }
            Event::ConnectFailed(c) => {
                if let Some(f) = &self.on_failure {
                    f(c);
                }
            }
            Event::FlushCompleted { offsets } => self.finish_flush(Ok(offsets.clone())),
            Event::FlushTimedOut { unacked, offsets } => {
                self.finish_flush(Err(SinkError::FlushTimedOut {
                    unacked: *unacked,
                    offsets: offsets.clone(),
                }))
            }
            Event::FlushFailed { offsets, .. } => self.finish_flush(Err(SinkError::FlushFailed {
                message: e.to_string(),
                offsets: offsets.clone(),
            })),
            Event::DeadLetter { record, reason } => {
                let coords = record.coords();
                match &self.dead_letter {
                    Some(produce) => match produce(record, reason) {
                        Ok(()) => self.sink.handle_dead_lettered(&coords),
                        Err(e) => self.sink.handle_dead_letter_failed(&coords, e),
                    },
                    None => self.sink.handle_dead_letter_failed(
                        &coords,
                        "no dead-letter producer: use the Kafka Bridge (or MqttSinkBuilder::dead_letter) with error_policy = \"dead-letter\"",
                    ),
                }
            }
            _ => {}
        }
    }

    fn finish_flush(&mut self, result: Result<CommitOffsets, SinkError>) {
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}

/// Resolves and connects; errors name server, port and cause.
fn connect(server: &str, port: u16) -> Result<TcpStream, String> {
    let addrs = (server, port)
        .to_socket_addrs()
        .map_err(|e| format!("{server}:{port}: cannot resolve: {e}"))?;
    let mut last = format!("{server}:{port}: no address");
    for a in addrs {
        match TcpStream::connect(a) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{server}:{port}: TCP connect failed: {e}"),
        }
    }
    Err(last)
}

fn read_loop(id: u64, mut tcp: TcpStream, tx: SyncSender<Msg>, gate: &ReadGate) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // The core asked for acknowledgements in a batch: let them queue up first. The
        // core bounds the wait (a millisecond); the cap guards a stale value.
        let after = gate.lock().ok().and_then(|g| *g);
        if let Some(wait) = after.map(|t| t.saturating_duration_since(Instant::now())) {
            if !wait.is_zero() {
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
        }
        match tcp.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Msg::ReadClosed(
                    id,
                    "the broker closed the connection".into(),
                ));
                return;
            }
            Ok(n) => {
                if tx.send(Msg::Bytes(id, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Msg::ReadClosed(id, format!("read failed: {e}")));
                return;
            }
        }
    }
}
