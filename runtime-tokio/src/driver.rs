//! The sink's task: moves socket bytes, commands and time in and out of the core.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use mqtt_sink_core::{
    ActionReport, CommitOffsets, ConfigErrors, DeadLetterFn, Event, Hooks, PushError, Sink,
    SinkParts,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::transport::{open, Stream};
use crate::{tls, Cmd, Reply, SinkError, TrySendError};

type FlushReply = Reply<Result<CommitOffsets, SinkError>>;
type Connecting = Pin<Box<dyn Future<Output = Result<Stream, String>> + Send>>;

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
        let n = self.sink.connections();
        let mut links: Vec<Link> = (0..n).map(|_| Link::default()).collect();
        let mut rbuf = vec![0u8; 16 * 1024];
        let mut turn = 0;
        loop {
            // Drain the core: bytes, then events (which may feed it again).
            let now = self.now();
            loop {
                let mut any = false;
                for (i, l) in links.iter_mut().enumerate() {
                    let before = l.out.len();
                    while self.sink.poll_transmit_on(i, now, &mut l.out) {}
                    any |= l.out.len() > before;
                }
                while let Some(e) = self.sink.poll_event() {
                    any = true;
                    match e {
                        Event::OpenTransport { connection: i } => {
                            let l = &mut links[i];
                            (l.stream, l.out_pos) = (None, 0);
                            l.out.clear();
                            let ((host, port), tls) = (self.sink.server_on(i), self.tls.clone());
                            let ws = tls::ws_request_for(self.sink.config(), host, port);
                            let (host, quick) = (host.to_string(), l.quick_ack.clone());
                            let opening = async move { open(host, port, tls, ws?, quick).await };
                            l.connecting = Some(Box::pin(opening));
                        }
                        Event::CloseTransport { connection: i } => {
                            (links[i].connecting, links[i].close) = (None, true);
                        }
                        _ => {}
                    }
                    self.on_event(e, now);
                }
                if !any {
                    break;
                }
            }
            for (i, l) in links.iter_mut().enumerate() {
                // The DISCONNECT (if any) goes out before the close; bounded by a second.
                if let Some(mut s) = l.stream.take_if(|_| l.close) {
                    let pending = &l.out[l.out_pos..];
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        s.write_all(pending).await?;
                        s.shutdown().await
                    })
                    .await;
                }
                l.close = false;
                if l.stream.is_none() && l.connecting.is_none() {
                    (l.out_pos, _) = (0, l.out.clear());
                }
                l.quick_ack
                    .store(self.sink.quick_ack_wanted_on(i), Ordering::Relaxed);
                // The core is waiting for a batch of acks: read them all at once, then.
                let after = self
                    .sink
                    .defer_input_until_on(i)
                    .map(|t| self.tokio_time(t));
                l.read_after = after.map(|t| Box::pin(tokio::time::sleep_until(t)));
            }
            if !self.sink.is_full() {
                self.room_waiters.drain(..).for_each(|w| _ = w.send(()));
            }
            if self.sink.is_closed() && (self.closing || self.sink.fatal_error().is_some()) {
                return self.sink.stop_result();
            }
            let deadline = self.sink.poll_timeout().map(|t| self.tokio_time(t));
            turn += 1;
            tokio::select! {
                (i, io) = std::future::poll_fn(|cx| poll_links(&mut links, turn, &mut rbuf, cx)) => {
                    let (now, l) = (self.now(), &mut links[i]);
                    match io {
                        Io::Opened(Ok(s)) => {
                            l.stream = Some(s);
                            self.sink.handle_connected_on(i, now);
                        }
                        Io::Opened(Err(e)) => self.sink.handle_disconnected_on(i, now, e),
                        Io::Wrote(Ok(n)) if n > 0 => {
                            l.out_pos += n;
                            if l.out_pos == l.out.len() {
                                (l.out_pos, _) = (0, l.out.clear());
                            }
                            self.sink.handle_written_on(i, now, n);
                        }
                        Io::Wrote(Ok(_)) => self.lose(l, i, now, "write failed: wrote 0 bytes".into()),
                        Io::Wrote(Err(e)) => self.lose(l, i, now, format!("write failed: {e}")),
                        Io::Read(Ok(0)) => self.lose(l, i, now, "the broker closed the connection".into()),
                        Io::Read(Ok(n)) => _ = self.sink.handle_input_on(i, now, &rbuf[..n]),
                        Io::Read(Err(e)) => self.lose(l, i, now, format!("read failed: {e}")),
                    }
                }
                cmd = self.rx.recv(), if !self.closing => self.command(cmd),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.sink.handle_timeout(self.now());
                }
            }
        }
    }

    /// Connection `i` failed (`why`): the sink hears it, naming the broker.
    fn lose(&mut self, link: &mut Link, i: usize, now: StdInstant, why: String) {
        link.stream = None;
        let why = format!("{}: {why}", self.sink.server_address_on(i));
        self.sink.handle_disconnected_on(i, now, why);
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

/// One MQTT connection's transport: being opened, open, or neither; and its output.
#[derive(Default)]
struct Link {
    stream: Option<Stream>,
    connecting: Option<Connecting>,
    /// What the core handed out for it; written from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// The core closed it: write what is left (a DISCONNECT), then shut it down.
    close: bool,
    /// The core's `quick_ack_wanted_on`, for the connection's reads.
    quick_ack: Arc<AtomicBool>,
    /// The core's `defer_input_until_on`: reading waits until then.
    read_after: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What became ready on a link.
enum Io {
    Opened(Result<Stream, String>),
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Polls every link's open, write and read (a read only once its deferral passed), taking
/// turns at which link goes first; reads land in `rbuf`.
fn poll_links(
    links: &mut [Link],
    turn: usize,
    rbuf: &mut [u8],
    cx: &mut Context<'_>,
) -> Poll<(usize, Io)> {
    for k in 0..links.len() {
        let i = (turn + k) % links.len();
        let l = &mut links[i];
        if let Some(Poll::Ready(r)) = l.connecting.as_mut().map(|c| c.as_mut().poll(cx)) {
            l.connecting = None;
            return Poll::Ready((i, Io::Opened(r)));
        }
        let Some(s) = l.stream.as_mut() else {
            continue;
        };
        if l.out_pos < l.out.len() {
            if let Poll::Ready(r) = Pin::new(&mut *s).poll_write(cx, &l.out[l.out_pos..]) {
                return Poll::Ready((i, Io::Wrote(r)));
            }
        }
        if l.read_after
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_pending())
        {
            continue;
        }
        let mut buf = ReadBuf::new(&mut *rbuf);
        if let Poll::Ready(r) = Pin::new(s).poll_read(cx, &mut buf) {
            return Poll::Ready((i, Io::Read(r.map(|()| buf.filled().len()))));
        }
    }
    Poll::Pending
}
