//! The sink's thread and its handles. One thread owns the core and the connections' TLS
//! state and runs the jobs sent to it: requests of [`SinkClient`]s, what a connection's
//! thread read, delivery reports of dead letters; between jobs, the core's timers. A
//! thread per connection attempt connects, then reads the socket.

use std::collections::VecDeque;
use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mqtt_sink_core::{
    ActionReport, BridgeAction, CommitOffsets, ConfigErrors, DeadLetterFn, Event, FlushOutcome,
    Hooks, PushRefusal, Record, Sink, SinkParts, SinkRuntime,
};
use mqtt_sink_tls::Layers;

use crate::{Blocking, Config, MqttSinkBuilder, SinkError, TrySendError};

/// A write that cannot make progress for this long counts as a lost connection, so that a
/// stalled peer never blocks the sink's thread (and its timers) for longer.
const WRITE_STALL: Duration = Duration::from_secs(1);

/// Work for the sink's thread.
type Job = Box<dyn FnOnce(&mut Driver, Instant) + Send>;
type Reply<T> = SyncSender<T>;
/// When the reader may read next (the core is waiting for a batch of acks).
type ReadGate = Arc<Mutex<(Option<Instant>, bool)>>;

impl SinkRuntime for Blocking {
    type Sink = MqttSink;

    /// Starts the sink's thread.
    fn start(parts: SinkParts) -> Result<MqttSink, ConfigErrors> {
        let SinkParts {
            config,
            mapper,
            hooks,
            dead_letter,
            ..
        } = parts;
        let tls = mqtt_sink_tls::sink_client_config(&config)?;
        let (tx, rx) = mpsc::channel();
        let sink = Sink::new(config, mapper, Instant::now())?;
        let n = sink.connections();
        let driver = Driver {
            sink,
            tls,
            tx: tx.clone(),
            hooks,
            dead_letter,
            conns: (0..n).map(|_| None).collect(),
            attempts: vec![0; n],
            out: Vec::with_capacity(64 * 1024),
            flush_waiters: Vec::new(),
            flush_queued: Vec::new(),
            room_waiters: Vec::new(),
            read_after: (0..n).map(|_| ReadGate::default()).collect(),
        };
        let thread = std::thread::Builder::new()
            .name("mqtt-sink".into())
            .spawn(move || driver.run(&rx))
            .map_err(|e| {
                ConfigErrors::one("(thread)", format!("cannot start the sink thread: {e}"))
            })?;
        Ok(MqttSink {
            client: SinkClient { tx },
            thread: Some(thread),
        })
    }
}

/// A cloneable handle to a running sink. All methods block the calling thread.
#[derive(Debug, Clone)]
pub struct SinkClient {
    tx: Sender<Job>,
}

impl SinkClient {
    /// Sends `job` to the sink's thread with a reply to answer, at once or later.
    fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Driver, Instant, Reply<T>) + Send + 'static,
    ) -> Result<Receiver<T>, SinkError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |d, now| job(d, now, tx));
        self.tx.send(job).map_err(|_| SinkError::Closed)?;
        Ok(rx)
    }

    /// Runs `f` with the core on the sink's thread and returns its answer.
    fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sink, Instant) -> T + Send + 'static,
    ) -> Result<T, SinkError> {
        let rx = self.call(|d, now, reply| drop(reply.send(f(&mut d.sink, now))))?;
        rx.recv().map_err(|_| SinkError::Closed)
    }

    /// Waits until the buffer has room (see `Sink::is_full`: after a refusal, a quarter of it
    /// drained), at most `timeout`. True when there is room.
    pub fn wait_room(&self, timeout: Duration) -> Result<bool, SinkError> {
        // A caller that gave up leaves its answer unread, which costs nothing.
        let rx = self.call(|d, _, reply| d.room_waiters.push(reply))?;
        match rx.recv_timeout(timeout) {
            Ok(()) => Ok(true),
            Err(RecvTimeoutError::Timeout) => Ok(false),
            Err(RecvTimeoutError::Disconnected) => Err(SinkError::Closed),
        }
    }

    /// Hands a record to the sink. Blocks while the sink's buffer is full: this is the
    /// backpressure. Records sent while the broker is unreachable are queued (bounded) and
    /// published after it returns.
    pub fn send(&self, mut record: Record) -> Result<(), SinkError> {
        loop {
            record = match self.try_send(record) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(r)) => r,
                Err(TrySendError::Refused(e)) => return Err(e),
            };
            self.wait_room(Duration::MAX)?;
        }
    }

    /// Like [`send`](Self::send) but returns the record at once when the buffer is full.
    pub fn try_send(&self, record: Record) -> Result<(), TrySendError> {
        match self.ask(|sink, now| sink.push_record(now, record)) {
            Ok(pushed) => pushed.map_err(TrySendError::from),
            Err(e) => Err(TrySendError::Refused(e)),
        }
    }

    /// Blocks until every record sent before this call is acknowledged (or handled by the
    /// error policy), at most `flush_timeout`; returns the positions to commit.
    pub fn flush(&self) -> Result<CommitOffsets, SinkError> {
        let rx = self.call(|d, _, reply| d.flush_queued.push(reply))?;
        rx.recv().map_err(|_| SinkError::Closed)?
    }

    /// Executes a sink action of a bridge's flow (push a batch, flush, assign, revoke,
    /// rewind, committed, positions; see `Sink::execute`) and returns its report. A closed
    /// sink takes nothing: a push reports the refusal (the flow then stops the bridge).
    pub fn execute(&self, action: BridgeAction) -> ActionReport {
        if matches!(action, BridgeAction::Flush) {
            return ActionReport::Flushed(FlushOutcome::from_flush(self.flush()));
        }
        let push = matches!(action, BridgeAction::Push(_));
        let report = self.ask(|sink, now| sink.execute(now, action).unwrap_or(ActionReport::Done));
        report.unwrap_or_else(|_| match push {
            true => ActionReport::Pushed(VecDeque::new(), Some(PushRefusal::Closed)),
            false => ActionReport::Done,
        })
    }

    /// The core's counters and gauges (buffered, in flight, window, ...).
    pub fn stats(&self) -> Result<mqtt_sink_core::Stats, SinkError> {
        self.ask(|sink, _| sink.stats())
    }
}

/// A running sink: send records, flush, close. All methods block the calling thread.
#[derive(Debug)]
pub struct MqttSink {
    client: SinkClient,
    thread: Option<JoinHandle<Result<(), SinkError>>>,
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
        MqttSinkBuilder::new(config)
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
        let close: Job = Box::new(|d, now| d.sink.close(now));
        let _ = self.client.tx.send(close);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| SinkError::Closed)?,
            None => Ok(()),
        }
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The sink's thread: the core, the connections (by index), and who waits for what.
struct Driver {
    sink: Sink,
    tls: Option<Arc<rustls::ClientConfig>>,
    tx: Sender<Job>,
    hooks: Hooks,
    dead_letter: Option<DeadLetterFn>,
    conns: Vec<Option<Conn>>,
    /// Per connection, its latest attempt: what an older one's threads report is ignored.
    attempts: Vec<u64>,
    out: Vec<u8>,
    flush_waiters: Vec<Reply<Result<CommitOffsets, SinkError>>>,
    /// Flushes asked since the running one began: they begin together after it.
    flush_queued: Vec<Reply<Result<CommitOffsets, SinkError>>>,
    room_waiters: Vec<Reply<()>>,
    /// Shared with each connection's reader: the core's `defer_input_until_on` and
    /// `quick_ack_wanted_on`.
    read_after: Vec<ReadGate>,
}

impl Driver {
    /// Ends when the sink closed: `Err(Fatal)` when it stopped for good on its own.
    fn run(mut self, rx: &Receiver<Job>) -> Result<(), SinkError> {
        loop {
            self.drain(Instant::now());
            for (i, gate) in self.read_after.iter().enumerate() {
                if let Ok(mut g) = gate.lock() {
                    *g = (
                        self.sink.defer_input_until_on(i),
                        self.sink.quick_ack_wanted_on(i),
                    );
                }
            }
            if self.sink.is_closed() {
                return self.sink.stop_result();
            }
            let job = match self.sink.poll_timeout() {
                Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let now = Instant::now();
            match job {
                Ok(job) => job(&mut self, now),
                Err(RecvTimeoutError::Timeout) => self.sink.handle_timeout(now),
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Drains the core (bytes to the socket, events to their handlers) until quiet, then
    /// answers who waits for room.
    fn drain(&mut self, now: Instant) {
        loop {
            let mut any = false;
            for i in 0..self.conns.len() {
                while self.sink.poll_transmit_on(i, now, &mut self.out) {}
                any |= !self.out.is_empty();
                // Dropped while not connected: the core sends it again after a reconnect.
                let written = self.conns[i].as_mut().map(|c| c.write(&self.out));
                let n = self.out.len();
                self.out.clear();
                match written {
                    Some(Ok(())) => self.sink.handle_written_on(i, Instant::now(), n),
                    Some(Err(e)) => self.lose(now, i, e),
                    None => {}
                }
            }
            while let Some(e) = self.sink.poll_event() {
                any = true;
                self.on_event(now, e);
            }
            if !self.flush_queued.is_empty() && !self.sink.is_flushing() {
                any = true;
                self.flush_waiters = std::mem::take(&mut self.flush_queued);
                let _ = self.sink.begin_flush(now, self.sink.flush_deadline(now));
            }
            if !any {
                break;
            }
        }
        if !self.sink.is_full() {
            for w in self.room_waiters.drain(..) {
                let _ = w.try_send(());
            }
        }
    }

    fn on_event(&mut self, now: Instant, e: Event) {
        self.hooks.event(&e);
        if let Some(result) = e.flush_result() {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(result.clone());
            }
        }
        match e {
            Event::OpenTransport { connection } => self.open(now, connection),
            Event::CloseTransport { connection } => self.close_transport(connection),
            // Handed to the producer; its delivery report comes back as a job.
            Event::DeadLetter { record, reason } => {
                let (coords, tx) = (record.coords(), self.tx.clone());
                let Some(produce) = &self.dead_letter else {
                    let why = "no dead-letter producer: use the Kafka Bridge (or MqttSinkBuilder::dead_letter) with error_policy = \"dead-letter\"";
                    return self.sink.handle_dead_letter_failed(&coords, why);
                };
                let done = move |r: Result<(), String>| {
                    let job: Job = Box::new(move |d, _| match r {
                        Ok(()) => d.sink.handle_dead_lettered(&coords),
                        Err(e) => d.sink.handle_dead_letter_failed(&coords, e),
                    });
                    let _ = tx.send(job);
                };
                produce(&record, &reason, Box::new(done));
            }
            _ => {}
        }
    }

    /// Connects connection `i`, then reads it, on a thread of its own.
    fn open(&mut self, now: Instant, i: usize) {
        if let Some(c) = self.conns[i].take() {
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        self.attempts[i] += 1;
        let (id, tx, gate) = (
            self.attempts[i],
            self.tx.clone(),
            self.read_after[i].clone(),
        );
        let (server, port) = self.sink.server_on(i);
        let server = server.to_string();
        let spawned = std::thread::Builder::new()
            .name("mqtt-sink-conn".into())
            .spawn(move || {
                let (opened, reader) = match connect(&server, port) {
                    Ok((tcp, reader)) => (Ok(tcp), Some(reader)),
                    Err(e) => (Err(e), None),
                };
                let job: Job = Box::new(move |d, now| d.on_opened(now, i, id, opened));
                if let (Ok(()), Some(reader)) = (tx.send(job), reader) {
                    read_loop(i, id, reader, &tx, &gate);
                }
            });
        if let Err(e) = spawned {
            let why = format!("cannot start a connection thread: {e}");
            self.sink.handle_disconnected_on(i, now, why);
        }
    }

    /// The transport is up: the core may write CONNECT (with TLS, rustls holds it until
    /// the handshake is done; a failed handshake fails the connect as a lost transport).
    fn on_opened(&mut self, now: Instant, i: usize, id: u64, opened: Result<TcpStream, String>) {
        if id != self.attempts[i] {
            // Given up since: the shutdown ends its reader too.
            return drop(opened.map(|tcp| tcp.shutdown(Shutdown::Both)));
        }
        let tcp = match opened {
            Ok(tcp) => tcp,
            Err(e) => return self.sink.handle_disconnected_on(i, now, e),
        };
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_write_timeout(Some(WRITE_STALL));
        // SNI and the certificate check follow the address in use; with WebSocket, the
        // upgrade request goes first and the CONNECT the core writes next waits for its
        // answer (with TLS, in rustls until the handshake is done).
        let (server, port) = self.sink.server_on(i);
        let mut conn = match Layers::new(self.sink.config(), self.tls.clone(), server, port) {
            Ok(layers) => Conn { id, tcp, layers },
            Err(e) => {
                let _ = tcp.shutdown(Shutdown::Both);
                return self.lose(now, i, e);
            }
        };
        let first = conn.write(&[]);
        self.conns[i] = Some(conn);
        match first {
            Ok(()) => self.sink.handle_connected_on(i, now),
            Err(e) => self.lose(now, i, e),
        }
    }

    fn on_read(&mut self, now: Instant, i: usize, id: u64, read: Result<Vec<u8>, String>) {
        let Some(conn) = self.conns[i].as_mut().filter(|c| c.id == id) else {
            return; // from a connection given up since
        };
        match read.and_then(|data| conn.read(data)) {
            Ok(plain) => drop(self.sink.handle_input_on(i, now, &plain)),
            Err(e) => self.lose(now, i, e),
        }
    }

    /// Closes connection `i`; pending bytes (a DISCONNECT) were written by `drain` before.
    fn close_transport(&mut self, i: usize) {
        self.attempts[i] += 1;
        if let Some(mut c) = self.conns[i].take() {
            c.layers.close(&mut c.tcp);
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
    }

    /// Connection `i` is lost (`why`, without the address): the core decides what next.
    fn lose(&mut self, now: Instant, i: usize, why: String) {
        if let Some(c) = self.conns[i].take() {
            let _ = c.tcp.shutdown(Shutdown::Both);
        }
        self.out.clear();
        let why = format!("{}: {why}", self.sink.server_address_on(i));
        self.sink.handle_disconnected_on(i, now, why);
    }
}

struct Conn {
    id: u64,
    tcp: TcpStream,
    /// WebSocket and TLS, as configured: what the core writes before their handshakes are
    /// done waits in them.
    layers: Layers,
}

impl Conn {
    /// Writes the core's bytes and whatever the layers have pending.
    fn write(&mut self, mqtt: &[u8]) -> Result<(), String> {
        self.layers.write(mqtt, &mut self.tcp)
    }

    /// Bytes read from the socket: the MQTT bytes they carry (the layers' answers are
    /// written).
    fn read(&mut self, data: Vec<u8>) -> Result<Vec<u8>, String> {
        self.layers.read(data, &mut self.tcp)
    }
}

/// Resolves and connects; returns the stream twice (to write, to read). Errors name
/// server, port and cause.
fn connect(server: &str, port: u16) -> Result<(TcpStream, TcpStream), String> {
    let tcp = TcpStream::connect((server, port)).and_then(|s| Ok((s.try_clone()?, s)));
    tcp.map_err(|e| format!("{server}:{port}: TCP connect failed: {e}"))
}

fn read_loop(i: usize, id: u64, mut tcp: TcpStream, tx: &Sender<Job>, gate: &ReadGate) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // The core asked for acknowledgements in a batch: let them queue up first. The
        // core bounds the wait (a millisecond); the cap guards a stale value.
        let after = gate.lock().ok().and_then(|g| g.0);
        let wait = after.map(|t| t.saturating_duration_since(Instant::now()));
        if let Some(wait) = wait.filter(|w| !w.is_zero()) {
            std::thread::sleep(wait.min(Duration::from_millis(10)));
        }
        let read = match tcp.read(&mut buf) {
            Ok(0) => Err("the broker closed the connection".to_string()),
            Ok(n) => {
                if gate.lock().is_ok_and(|g| g.1) {
                    mqtt_sink_tls::quick_ack(&tcp);
                }
                Ok(buf[..n].to_vec())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(format!("read failed: {e}")),
        };
        let end = read.is_err();
        let job: Job = Box::new(move |d, now| d.on_read(now, i, id, read));
        if tx.send(job).is_err() || end {
            return;
        }
    }
}
