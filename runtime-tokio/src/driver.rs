//! The sink's task: moves socket bytes, commands and time in and out of the core.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use mqtt_sink_core::{
    ActionReport, CommitOffsets, ConfigErrors, DeadLetterFn, Event, Hooks, PushError, Sink,
    SinkParts,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::transport::{open, Stream};
use crate::{tls, Cmd, Reply, SinkError, TrySendError};

type FlushReply = Reply<Result<CommitOffsets, SinkError>>;
type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Stream, String>> + Send>>;

pub(crate) struct Driver {
    sink: Sink,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    /// For dead letters' delivery reports; weak, so that the task still ends when the
    /// last client is dropped.
    tx: mpsc::WeakUnboundedSender<Cmd>,
    hooks: Hooks,
    dead_letter: Option<DeadLetterFn>,
    room_waiters: Vec<Reply<()>>,
    flush_waiters: Vec<FlushReply>,
    /// Flushes asked while one runs: they start when it ends.
    flush_queued: Vec<FlushReply>,
    /// `close` was asked, or every client is gone: the task ends once the sink is closed.
    closing: bool,
    /// The core's std clock mapped onto tokio's (which tests may pause).
    base: (StdInstant, Instant),
}

const NO_DEAD_LETTER: &str = "no dead-letter producer: use the Kafka Bridge (or \
    MqttSinkBuilder::dead_letter) with error_policy = \"dead-letter\"";

impl Driver {
    /// Validates the config and builds the TLS config; the task runs with [`run`](Self::run).
    pub(crate) fn new(
        parts: SinkParts,
        tx: mpsc::WeakUnboundedSender<Cmd>,
        rx: mpsc::UnboundedReceiver<Cmd>,
    ) -> Result<Self, ConfigErrors> {
        let tls = tls::sink_client_config(&parts.config)?;
        Ok(Self {
            sink: Sink::new(parts.config, parts.mapper, StdInstant::now())?,
            tls,
            rx,
            tx,
            hooks: parts.hooks,
            dead_letter: parts.dead_letter,
            room_waiters: Vec::new(),
            flush_waiters: Vec::new(),
            flush_queued: Vec::new(),
            closing: false,
            base: (StdInstant::now(), Instant::now()),
        })
    }

    fn now(&self) -> StdInstant {
        self.base.0 + (Instant::now() - self.base.1)
    }

    fn tokio_time(&self, t: StdInstant) -> Instant {
        self.base.1 + t.saturating_duration_since(self.base.0)
    }

    /// Ends when the sink closed: `Err(Fatal)` when it stopped for good on its own.
    pub(crate) async fn run(mut self) -> Result<(), SinkError> {
        // Read and write halves: acknowledgements are read while a write waits.
        let mut conn: Option<(ReadHalf<Stream>, WriteHalf<Stream>)> = None;
        let mut connecting: Option<Connecting> = None;
        let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
        // The core's `quick_ack_wanted`, for the connection's reads.
        let quick_ack = Arc::new(AtomicBool::new(false));
        let mut out_pos = 0;
        let mut rbuf = vec![0u8; 16 * 1024];
        let mut close = false;
        loop {
            // Drain the core: bytes, then events (which may feed it again).
            let now = self.now();
            loop {
                let before = out.len();
                while self.sink.poll_transmit(now, &mut out) {}
                let mut any = out.len() > before;
                while let Some(e) = self.sink.poll_event() {
                    any = true;
                    match &e {
                        Event::OpenTransport => {
                            (conn, out_pos) = (None, 0);
                            out.clear();
                            let ((host, port), tls) = (self.sink.server(), self.tls.clone());
                            let cfg = self.sink.config();
                            let ws = tls::ws_request_for(cfg, host, port);
                            let (host, quick) = (host.to_string(), quick_ack.clone());
                            connecting =
                                Some(Box::pin(
                                    async move { open(host, port, tls, ws?, quick).await },
                                ));
                        }
                        Event::CloseTransport => (connecting, close) = (None, true),
                        _ => {}
                    }
                    self.on_event(e, now);
                }
                if !any {
                    break;
                }
            }
            // The DISCONNECT (if any) goes out before the close; bounded by a second.
            if let Some((_, mut s)) = conn.take_if(|_| close) {
                let pending = &out[out_pos..];
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    s.write_all(pending).await?;
                    s.shutdown().await
                })
                .await;
            }
            close = false;
            if !self.sink.is_full() {
                self.room_waiters.drain(..).for_each(|w| _ = w.send(()));
            }
            if self.sink.is_closed() && (self.closing || self.sink.fatal_error().is_some()) {
                return self.sink.stop_result();
            }
            if conn.is_none() && connecting.is_none() {
                (out_pos, _) = (0, out.clear());
            }
            let deadline = self.sink.poll_timeout().map(|t| self.tokio_time(t));
            let (mut rd, mut wr) = match conn.as_mut() {
                Some((r, w)) => (Some(r), Some(w)),
                None => (None, None),
            };
            let writing = wr.is_some() && out_pos < out.len();
            quick_ack.store(self.sink.quick_ack_wanted(), Ordering::Relaxed);
            // The core is waiting for a batch of acks: read them all at once, then.
            let read_after = self.sink.defer_input_until().map(|t| self.tokio_time(t));
            tokio::select! {
                res = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match res {
                        Ok(s) => {
                            conn = Some(tokio::io::split(s));
                            self.sink.handle_connected(self.now());
                        }
                        Err(e) => self.sink.handle_disconnected(self.now(), e),
                    }
                }
                res = async { wr.as_mut().expect("guarded").write(&out[out_pos..]).await }, if writing => {
                    let now = self.now();
                    match res {
                        Ok(n) if n > 0 => {
                            out_pos += n;
                            if out_pos == out.len() {
                                (out_pos, _) = (0, out.clear());
                            }
                            self.sink.handle_written(now, n);
                        }
                        Ok(_) => self.lose(&mut conn, now, "write failed: wrote 0 bytes".into()),
                        Err(e) => self.lose(&mut conn, now, format!("write failed: {e}")),
                    }
                }
                res = async {
                    if let Some(t) = read_after {
                        tokio::time::sleep_until(t).await;
                    }
                    rd.as_mut().expect("guarded").read(&mut rbuf).await
                }, if rd.is_some() => {
                    let now = self.now();
                    match res {
                        Ok(0) => self.lose(&mut conn, now, "the broker closed the connection".into()),
                        Ok(n) => _ = self.sink.handle_input(now, &rbuf[..n]),
                        Err(e) => self.lose(&mut conn, now, format!("read failed: {e}")),
                    }
                }
                cmd = self.rx.recv(), if !self.closing => self.command(cmd),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.sink.handle_timeout(self.now());
                }
            }
        }
    }

    /// The connection failed (`why`): the sink hears it, naming the broker.
    fn lose<C>(&mut self, conn: &mut Option<C>, now: StdInstant, why: String) {
        *conn = None;
        let why = format!("{}: {why}", self.sink.server_address());
        self.sink.handle_disconnected(now, why);
    }

    fn command(&mut self, cmd: Option<Cmd>) {
        let (now, sink) = (self.now(), &mut self.sink);
        // Every client gone: close as if asked.
        match cmd.unwrap_or(Cmd::Close) {
            Cmd::TrySend(r, reply) => {
                let result = sink.push_record(now, r).map_err(|e| match e {
                    PushError::Full(r) => TrySendError::Full(r),
                    e => TrySendError::Refused(SinkError::Push(e.to_string())),
                });
                let _ = reply.send(result);
            }
            Cmd::TrySendBatch(records, reply) => drop(reply.send(sink.push_batch(now, records))),
            Cmd::Room(reply) => self.room_waiters.push(reply),
            // Push and flush have commands of their own; a consumer action is not the
            // sink's.
            Cmd::Act(action, reply) => {
                let report = sink.execute(now, action).unwrap_or(ActionReport::Done);
                let _ = reply.send(report);
            }
            Cmd::Stats(reply) => drop(reply.send(sink.stats())),
            Cmd::Flush(reply) if sink.is_flushing() => self.flush_queued.push(reply),
            Cmd::Flush(reply) => {
                self.flush_waiters.push(reply);
                let _ = sink.begin_flush(now, sink.flush_deadline(now));
            }
            Cmd::DeadLettered(coords, Ok(())) => sink.handle_dead_lettered(&coords),
            Cmd::DeadLettered(coords, Err(e)) => sink.handle_dead_letter_failed(&coords, e),
            Cmd::Close => {
                self.closing = true;
                sink.close(now);
            }
        }
    }

    fn on_event(&mut self, e: Event, now: StdInstant) {
        self.hooks.event(&e);
        if let Some(flushed) = e.flush_result() {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(flushed.clone());
            }
            if !self.flush_queued.is_empty() {
                self.flush_waiters = std::mem::take(&mut self.flush_queued);
                let _ = self.sink.begin_flush(now, self.sink.flush_deadline(now));
            }
        }
        if let Event::DeadLetter { record, reason } = e {
            let coords = record.coords();
            let Some(produce) = &self.dead_letter else {
                return self.sink.handle_dead_letter_failed(&coords, NO_DEAD_LETTER);
            };
            let tx = self.tx.clone();
            let done = Box::new(move |r| {
                tx.upgrade().map(|tx| tx.send(Cmd::DeadLettered(coords, r)));
            });
            produce(&record, &reason, done);
        }
    }
}
