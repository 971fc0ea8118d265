//! mqtt-sink driver for the tokio runtime.
//!
//! [`MqttSink`] publishes records to an MQTT broker over TCP or TLS (rustls, ring). It is a
//! thin driver of [`mqtt_sink_core::Sink`]: one task moves socket bytes, records and time in
//! and out of the core; every MQTT decision (packets, timeouts, resends) stays in the core.
//!
//! [`Bridge`] consumes Kafka (a `StreamConsumer` in a consumer group) into an `MqttSink`,
//! checkpointing (flush, then commit) on the core's schedule and on every revoke. It needs a
//! multi-thread runtime (rebalance callbacks flush synchronously).

pub mod bridge;
mod transport;

/// TLS client configuration (shared with the blocking runtime).
pub use mqtt_sink_blocking::tls;

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant as StdInstant;

use mqtt_sink_core::{
    CommitOffsets, ConfigErrors, ConnectFailure, Connected, Event, PushError, Record, RecordMapper,
    Sink, TopicPartition,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use bridge::{Bridge, BridgeBuilder, BridgeError};
pub use mqtt_sink_core as core;
pub use mqtt_sink_core::Config;
pub use mqtt_sink_core::{BridgeStats, KafkaConfig};
pub use mqtt_sink_core::{SinkError, TrySendError};

use transport::{open, Stream};

type SuccessFn = Box<dyn Fn(&Connected) + Send + Sync>;
type FailureFn = Box<dyn Fn(&ConnectFailure) + Send + Sync>;
type EventFn = Box<dyn Fn(&Event) + Send + Sync>;
type DeadLetterFn =
    Box<dyn Fn(&Record, &mqtt_sink_core::RejectReason) -> Result<(), String> + Send + Sync>;

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

    /// Produces dead letters (error policy `dead-letter`): called on the sink's task with
    /// each rejected record; return `Ok` only once Kafka confirmed the produce. Without it,
    /// dead-lettering fails the record (as the `fail` policy does).
    #[must_use]
    pub fn dead_letter(
        mut self,
        f: impl Fn(&Record, &mqtt_sink_core::RejectReason) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Box::new(f));
        self
    }

    /// Validates the config, then starts the sink's task on the current tokio runtime. It
    /// connects at once and reconnects with the core's backoff.
    pub fn start(self) -> Result<MqttSink, ConfigErrors> {
        let tls = if self.config.tls_enabled {
            let cfg = tls::client_config(&self.config).map_err(|rule| {
                ConfigErrors(vec![mqtt_sink_core::ConfigError {
                    option: "tls".into(),
                    value: String::new(),
                    rule,
                }])
            })?;
            Some(cfg)
        } else {
            None
        };
        let mapper = self
            .mapper
            .unwrap_or_else(|| RecordMapper::from_config(&self.config));
        let server = self.config.server.clone();
        let port = self.config.port;
        let sink = Sink::new(self.config, mapper, StdInstant::now())?;
        let (tx, rx) = mpsc::channel(64);
        let driver = Driver {
            sink,
            server,
            port,
            tls,
            rx,
            on_success: self.on_success,
            on_failure: self.on_failure,
            on_event: self.on_event,
            dead_letter: self.dead_letter,
            room_waiters: Vec::new(),
            flush_waiters: Vec::new(),
            flush_queued: Vec::new(),
            close_waiter: None,
        };
        let task = tokio::spawn(driver.run());
        Ok(MqttSink {
            client: SinkClient { tx },
            task,
        })
    }
}

enum Cmd {
    Send(Record, oneshot::Sender<Result<(), SinkError>>),
    TrySend(Record, oneshot::Sender<Result<(), TrySendError>>),
    TrySendBatch(VecDeque<Record>, oneshot::Sender<VecDeque<Record>>),
    Room(oneshot::Sender<()>),
    Assign(Vec<(TopicPartition, Option<i64>)>, oneshot::Sender<()>),
    Revoke(Vec<TopicPartition>, oneshot::Sender<()>),
    Committed(CommitOffsets),
    Rewind(oneshot::Sender<CommitOffsets>),
    Stats(oneshot::Sender<mqtt_sink_core::Stats>),
    Flush(oneshot::Sender<Result<CommitOffsets, SinkError>>),
    Close(oneshot::Sender<()>),
}

/// A cloneable handle to a running sink.
#[derive(Debug, Clone)]
pub struct SinkClient {
    tx: mpsc::Sender<Cmd>,
}

impl SinkClient {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, SinkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| SinkError::Closed)?;
        rx.await.map_err(|_| SinkError::Closed)
    }

    /// Hands a record to the sink. Waits while the sink's buffer is full: this is the
    /// backpressure. Records sent while the broker is unreachable are queued (bounded) and
    /// published after it returns.
    pub async fn send(&self, record: Record) -> Result<(), SinkError> {
        self.call(|tx| Cmd::Send(record, tx)).await?
    }

    /// Like [`send`](Self::send) but returns the record at once when the buffer is full.
    pub async fn try_send(&self, record: Record) -> Result<(), TrySendError> {
        match self.call(|tx| Cmd::TrySend(record, tx)).await {
            Ok(r) => r,
            Err(e) => Err(TrySendError::Refused(e)),
        }
    }

    /// Takes records in order until the buffer is full or one is refused, in one round
    /// trip; returns those not taken (the first of them is the one that did not fit or
    /// was refused: [`try_send`](Self::try_send) it to learn which).
    pub async fn try_send_batch(
        &self,
        records: VecDeque<Record>,
    ) -> Result<VecDeque<Record>, SinkError> {
        self.call(|tx| Cmd::TrySendBatch(records, tx)).await
    }

    /// Resolves when the buffer has room (cancellation-safe).
    pub async fn room(&self) -> Result<(), SinkError> {
        self.call(Cmd::Room).await
    }

    /// Waits until every record sent before this call is acknowledged (or handled by the
    /// error policy), at most `flush_timeout`; returns the positions to commit.
    pub async fn flush(&self) -> Result<CommitOffsets, SinkError> {
        self.call(Cmd::Flush).await?
    }

    /// Kafka assigned these partitions (with their committed positions, if known).
    pub async fn assign(
        &self,
        partitions: Vec<(TopicPartition, Option<i64>)>,
    ) -> Result<(), SinkError> {
        self.call(|tx| Cmd::Assign(partitions, tx)).await
    }

    /// Kafka revoked these partitions (flush and commit them first).
    pub async fn revoke(&self, partitions: Vec<TopicPartition>) -> Result<(), SinkError> {
        self.call(|tx| Cmd::Revoke(partitions, tx)).await
    }

    /// Kafka confirmed a commit of these positions.
    pub async fn committed(&self, offsets: CommitOffsets) -> Result<(), SinkError> {
        self.tx
            .send(Cmd::Committed(offsets))
            .await
            .map_err(|_| SinkError::Closed)
    }

    /// After a failed flush: forgets what was not committed and returns the positions to
    /// seek the consumer to.
    pub async fn rewind(&self) -> Result<CommitOffsets, SinkError> {
        self.call(Cmd::Rewind).await
    }

    /// The core's counters and gauges. Callable from any thread outside the runtime
    /// (it blocks), e.g. a metrics endpoint.
    pub fn stats_blocking(&self) -> Result<mqtt_sink_core::Stats, SinkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .blocking_send(Cmd::Stats(tx))
            .map_err(|_| SinkError::Closed)?;
        rx.blocking_recv().map_err(|_| SinkError::Closed)
    }
}

/// A running sink: send records, flush, close.
#[derive(Debug)]
pub struct MqttSink {
    client: SinkClient,
    task: JoinHandle<()>,
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

    /// Sends DISCONNECT and stops the task. Flush first: unacknowledged records are dropped.
    pub async fn close(self) -> Result<(), SinkError> {
        let (tx, rx) = oneshot::channel();
        if self.client.tx.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.task.await.map_err(|_| SinkError::Closed)
    }
}

struct Driver {
    sink: Sink,
    server: String,
    port: u16,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    rx: mpsc::Receiver<Cmd>,
    on_success: Option<SuccessFn>,
    on_failure: Option<FailureFn>,
    on_event: Option<EventFn>,
    dead_letter: Option<DeadLetterFn>,
    room_waiters: Vec<oneshot::Sender<()>>,
    flush_waiters: Vec<oneshot::Sender<Result<CommitOffsets, SinkError>>>,
    flush_queued: Vec<oneshot::Sender<Result<CommitOffsets, SinkError>>>,
    close_waiter: Option<oneshot::Sender<()>>,
}

enum IoDone {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
}

/// What the select loop waits on besides the socket.
type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Stream, String>> + Send>>;

impl Driver {
    async fn run(mut self) {
        let mut conn: Option<Stream> = None;
        let mut connecting: Option<Connecting> = None;
        let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut out_pos = 0;
        let mut rbuf = vec![0u8; 16 * 1024];
        let mut blocked: Option<(Record, oneshot::Sender<Result<(), SinkError>>)> = None;
        let mut close_after_write = false;
        let mut rx_open = true;
        // Map the core's std Instants onto tokio's clock (which tests may pause).
        let base_std = StdInstant::now();
        let base_tokio = Instant::now();
        let now_std = |t: Instant| base_std + (t - base_tokio);

        loop {
            let now = now_std(Instant::now());
            // Drain the core: bytes, then events (which may feed it again).
            loop {
                let before = out.len();
                while self.sink.poll_transmit(now, &mut out) {}
                let mut any = out.len() > before;
                while let Some(e) = self.sink.poll_event() {
                    any = true;
                    match &e {
                        Event::OpenTransport => {
                            conn = None;
                            out.clear();
                            out_pos = 0;
                            connecting = Some(Box::pin(open(
                                self.server.clone(),
                                self.port,
                                self.tls.clone(),
                            )));
                        }
                        Event::CloseTransport => {
                            connecting = None;
                            close_after_write = true;
                        }
                        _ => {}
                    }
                    self.on_event(&e, now);
                }
                if let Some((r, reply)) = blocked.take() {
                    match self.sink.push_record(now, r) {
                        Ok(()) => {
                            let _ = reply.send(Ok(()));
                            any = true;
                        }
                        Err(PushError::Full(r)) => blocked = Some((r, reply)),
                        Err(e) => {
                            let _ = reply.send(Err(SinkError::Push(e.to_string())));
                        }
                    }
                }
                if !any {
                    break;
                }
            }
            if !self.room_waiters.is_empty() && !self.sink.is_full() {
                for w in self.room_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            if close_after_write {
                if let Some(mut s) = conn.take() {
                    // The DISCONNECT (if any) goes out before the close; bounded by a second.
                    let pending = &out[out_pos..];
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                        s.write_all(pending).await?;
                        s.shutdown().await
                    })
                    .await;
                }
                out.clear();
                out_pos = 0;
                close_after_write = false;
            }
            if self.sink.is_closed() && self.close_waiter.is_none() && !rx_open {
                return;
            }
            if self.sink.is_closed() {
                if let Some(w) = self.close_waiter.take() {
                    let _ = w.send(());
                    return;
                }
            }
            if conn.is_none() && connecting.is_none() {
                out.clear();
                out_pos = 0;
            }
            let deadline = self.sink.poll_timeout().map(|t| {
                let d = t.saturating_duration_since(base_std);
                base_tokio + d
            });
            let can_take = rx_open && blocked.is_none() && !self.sink.is_closed();
            let writing = conn.is_some() && out_pos < out.len();
            // The core is waiting for a batch of acks: read them all at once, then.
            let read_after = self
                .sink
                .defer_input_until()
                .map(|t| base_tokio + t.saturating_duration_since(base_std));

            tokio::select! {
                res = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    let now = now_std(Instant::now());
                    match res {
                        Ok(s) => {
                            conn = Some(s);
                            self.sink.handle_connected(now);
                        }
                        Err(e) => self.sink.handle_disconnected(now, e),
                    }
                }
                res = async {
                    let c = conn.as_mut().expect("guarded");
                    if writing {
                        IoDone::Wrote(c.write(&out[out_pos..]).await)
                    } else {
                        if let Some(t) = read_after {
                            tokio::time::sleep_until(t).await;
                        }
                        IoDone::Read(c.read(&mut rbuf).await)
                    }
                }, if conn.is_some() => {
                    let now = now_std(Instant::now());
                    let lost = match res {
                        IoDone::Read(Ok(0)) => Some("the broker closed the connection".to_string()),
                        IoDone::Read(Ok(n)) => {
                            let _ = self.sink.handle_input(now, &rbuf[..n]);
                            None
                        }
                        IoDone::Wrote(Ok(n)) if n > 0 => {
                            out_pos += n;
                            if out_pos == out.len() {
                                out.clear();
                                out_pos = 0;
                            }
                            None
                        }
                        IoDone::Wrote(Ok(_)) => Some("write failed: wrote 0 bytes".to_string()),
                        IoDone::Read(Err(e)) => Some(format!("read failed: {e}")),
                        IoDone::Wrote(Err(e)) => Some(format!("write failed: {e}")),
                    };
                    if let Some(why) = lost {
                        conn = None;
                        self.sink.handle_disconnected(now, format!("{}:{}: {why}", self.server, self.port));
                    }
                }
                cmd = self.rx.recv(), if can_take => {
                    let now = now_std(Instant::now());
                    match cmd {
                        None => {
                            rx_open = false;
                            self.sink.close(now);
                        }
                        Some(Cmd::Send(r, reply)) => match self.sink.push_record(now, r) {
                            Ok(()) => { let _ = reply.send(Ok(())); }
                            Err(PushError::Full(r)) => blocked = Some((r, reply)),
                            Err(e) => { let _ = reply.send(Err(SinkError::Push(e.to_string()))); }
                        },
                        Some(Cmd::TrySend(r, reply)) => {
                            let result = match self.sink.push_record(now, r) {
                                Ok(()) => Ok(()),
                                Err(PushError::Full(r)) => Err(TrySendError::Full(r)),
                                Err(e) => Err(TrySendError::Refused(SinkError::Push(e.to_string()))),
                            };
                            let _ = reply.send(result);
                        }
                        Some(Cmd::TrySendBatch(mut records, reply)) => {
                            while let Some(r) = records.pop_front() {
                                match self.sink.push_record(now, r) {
                                    Ok(()) => {}
                                    Err(e) => {
                                        // Back in front; `try_send` tells the caller why.
                                        records.push_front(e.into_record());
                                        break;
                                    }
                                }
                            }
                            let _ = reply.send(records);
                        }
                        Some(Cmd::Room(reply)) => self.room_waiters.push(reply),
                        Some(Cmd::Assign(parts, reply)) => {
                            for (tp, committed) in parts {
                                self.sink.assign(tp, committed);
                            }
                            let _ = reply.send(());
                        }
                        Some(Cmd::Revoke(parts, reply)) => {
                            for tp in &parts {
                                self.sink.revoke(tp);
                            }
                            let _ = reply.send(());
                        }
                        Some(Cmd::Committed(offsets)) => self.sink.handle_committed(&offsets),
                        Some(Cmd::Rewind(reply)) => {
                            let _ = reply.send(self.sink.rewind());
                        }
                        Some(Cmd::Stats(reply)) => {
                            let _ = reply.send(self.sink.stats());
                        }
                        Some(Cmd::Flush(reply)) => {
                            if self.sink.is_flushing() {
                                self.flush_queued.push(reply);
                            } else {
                                self.flush_waiters.push(reply);
                                let deadline = self.sink.flush_deadline(now);
                                let _ = self.sink.begin_flush(now, deadline);
                            }
                        }
                        Some(Cmd::Close(reply)) => {
                            self.close_waiter = Some(reply);
                            self.sink.close(now);
                        }
                    }
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.sink.handle_timeout(now_std(Instant::now()));
                }
            }
        }
    }

    fn on_event(&mut self, e: &Event, now: StdInstant) {
        if let Some(f) = &self.on_event {
            f(e);
        }
        match e {
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
            Event::FlushCompleted { offsets } => self.finish_flush(Ok(offsets.clone()), now),
            Event::FlushTimedOut { unacked, offsets } => self.finish_flush(
                Err(SinkError::FlushTimedOut {
                    unacked: *unacked,
                    offsets: offsets.clone(),
                }),
                now,
            ),
            Event::FlushFailed { .. } => {
                let offsets = match e {
                    Event::FlushFailed { offsets, .. } => offsets.clone(),
                    _ => Vec::new(),
                };
                self.finish_flush(
                    Err(SinkError::FlushFailed {
                        message: e.to_string(),
                        offsets,
                    }),
                    now,
                );
            }
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

    fn finish_flush(&mut self, result: Result<CommitOffsets, SinkError>, now: StdInstant) {
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(result.clone());
        }
        if !self.flush_queued.is_empty() {
            self.flush_waiters = std::mem::take(&mut self.flush_queued);
            let deadline = self.sink.flush_deadline(now);
            let _ = self.sink.begin_flush(now, deadline);
        }
    }
}
