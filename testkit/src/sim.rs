//! A simulated world: clock, link and broker around one [`Sink`], driven exactly as a
//! runtime drives it (drain transmit, drain events, honour `poll_timeout`). A sink with
//! several connections (`connections`) gets a link and a broker side per connection:
//! [`Harness::broker`] is connection 0's, where tests inject broker faults;
//! [`Harness::others`] are the rest, with the same knobs.
//!
//! Time is simulated: [`Harness::step`] jumps to the next deadline (the sink's, the
//! broker's, a delivery on the link, or room on a bandwidth-limited link), so a test of
//! minutes runs in microseconds and no test ever sleeps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_core::{
    CommitOffsets, Config, Event, PushError, Record, RecordMapper, Sink, TopicPartition,
};

use crate::broker::{BrokerKnobs, Delivered, Received, SimBroker};
use crate::rng::SplitMix;

/// How the simulated link between sink and broker behaves.
#[derive(Debug, Clone)]
pub struct LinkKnobs {
    /// One-way latency.
    pub latency: Duration,
    /// Bytes are delivered in chunks of 1..=`max_chunk` bytes (random, seeded); 0 delivers
    /// each write whole.
    pub max_chunk: usize,
    /// Transport opens that fail (as a refused TCP connect) before one succeeds.
    pub failing_opens: u32,
    /// Bandwidth from sink to broker, in bytes per millisecond of simulated time; `None`
    /// (the default) is unlimited: every write is accepted, and reported written, at once.
    ///
    /// With a limit the harness plays a runtime whose socket is full: what `poll_transmit`
    /// returns waits in the runtime's buffer, the link takes it at this rate (capacity
    /// unused while the buffer is empty is not saved up), and only bytes the link took are
    /// reported with `Sink::handle_written`. While bytes wait the harness wakes each time
    /// another millisecond's worth (or the rest) can go. A closed or cut link drops what
    /// was unwritten (a graceful close first writes what the link carries in a second, as
    /// the tokio runtime does). `Some(0)` takes nothing: a socket stalled for good. The
    /// broker-to-sink direction is never limited.
    pub bytes_per_ms: Option<u32>,
    /// With `bytes_per_ms`: a kernel send buffer of this many bytes. Bytes the link has
    /// not taken yet are reported written as soon as they fit in it (as a socket write
    /// returns once the kernel holds the bytes), so "written" runs up to this far ahead
    /// of what reached the broker. 0 (the default): reported only when the link takes them.
    pub send_buffer: usize,
}

impl Default for LinkKnobs {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(1),
            max_chunk: 0,
            failing_opens: 0,
            bytes_per_ms: None,
            send_buffer: 0,
        }
    }
}

#[derive(Debug)]
struct Packet {
    due: Instant,
    bytes: Vec<u8>,
}

/// One connection's link: bytes on their way each way, and what the runtime holds
/// unwritten.
#[derive(Debug)]
struct Line {
    to_broker: VecDeque<Packet>,
    to_sink: VecDeque<Packet>,
    /// Bytes `poll_transmit` returned that the link has not taken yet (only with
    /// `LinkKnobs::bytes_per_ms`).
    unwritten: VecDeque<u8>,
    /// How many of the first `unwritten` bytes were reported written already (they sit in
    /// the simulated kernel send buffer, `LinkKnobs::send_buffer`).
    buffered: usize,
    /// With `bytes_per_ms`: the link's capacity is used up to this instant.
    link_free_at: Instant,
    open: bool,
}

impl Line {
    fn new(now: Instant) -> Self {
        Self {
            to_broker: VecDeque::new(),
            to_sink: VecDeque::new(),
            unwritten: VecDeque::new(),
            buffered: 0,
            link_free_at: now,
            open: false,
        }
    }
}

/// The sink, a simulated broker and the link between them, with a simulated clock.
#[derive(Debug)]
pub struct Harness {
    /// Simulated time now.
    pub now: Instant,
    start: Instant,
    /// The sink under test.
    pub sink: Sink,
    /// The simulated broker (connection 0's side of it).
    pub broker: SimBroker,
    /// The broker's side of connections 1.. (none with one connection).
    pub others: Vec<SimBroker>,
    /// Link behaviour; tests may change it mid-run.
    pub link: LinkKnobs,
    rng: SplitMix,
    lines: Vec<Line>,
    /// Every event the sink emitted, with the simulated time since start.
    pub events: Vec<(Duration, Event)>,
    /// Protocol errors `handle_input` returned.
    pub protocol_errors: Vec<String>,
    /// Commit positions confirmed so far (what a Kafka consumer would have committed).
    pub committed: CommitOffsets,
    /// Dead letters produced (the runtime's job, simulated as always succeeding).
    pub dead_letters: Vec<Record>,
    /// Confirm each dead letter at once (a produce that always succeeds). When false, the
    /// records wait in [`dead_letter_requests`](Self::dead_letter_requests) for the caller to
    /// produce and to report with `handle_dead_lettered` / `handle_dead_letter_failed`.
    pub auto_dead_letter: bool,
    /// Dead letters the sink asked for while `auto_dead_letter` is false, oldest first.
    pub dead_letter_requests: Vec<Record>,
    /// Transcript of everything observable, for determinism checks.
    pub transcript: Vec<String>,
    /// Commit automatically on `FlushCompleted` (and the safe positions of a failed or
    /// timed-out flush).
    pub auto_commit: bool,
}

impl Harness {
    /// A harness around a sink built from `cfg` (TLS is irrelevant here) with the default
    /// record mapper.
    pub fn new(cfg: Config, knobs: BrokerKnobs, link: LinkKnobs, seed: u64) -> Self {
        let mapper = RecordMapper::from_config(&cfg);
        Self::with_mapper(cfg, mapper, knobs, link, seed)
    }

    /// A harness with a custom record mapper.
    pub fn with_mapper(
        cfg: Config,
        mapper: RecordMapper,
        knobs: BrokerKnobs,
        link: LinkKnobs,
        seed: u64,
    ) -> Self {
        let start = base_instant();
        let sink = match Sink::new(cfg, mapper, start) {
            Ok(s) => s,
            Err(e) => panic!("test config is invalid: {e}"),
        };
        let n = sink.connections();
        let others = (1..n as u64)
            .map(|i| SimBroker::new(seed ^ 0xB40C_E200 ^ (i << 32), knobs.clone()))
            .collect();
        let mut h = Self {
            now: start,
            start,
            sink,
            broker: SimBroker::new(seed ^ 0xB40C_E200, knobs),
            others,
            link,
            rng: SplitMix::new(seed),
            lines: (0..n).map(|_| Line::new(start)).collect(),
            events: Vec::new(),
            protocol_errors: Vec::new(),
            committed: Vec::new(),
            dead_letters: Vec::new(),
            auto_dead_letter: true,
            dead_letter_requests: Vec::new(),
            transcript: Vec::new(),
            auto_commit: true,
        };
        h.drain();
        h
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Drains the sink's outputs and acts on its events, as a runtime does, until quiet.
    pub fn drain(&mut self) {
        for _ in 0..1_000_000 {
            let mut progressed = false;
            for i in 0..self.lines.len() {
                let mut buf = Vec::new();
                while self.sink.poll_transmit_on(i, self.now, &mut buf) {
                    progressed = true;
                }
                if !buf.is_empty() {
                    self.hand_to_link(i, buf);
                }
                if self.write_unwritten(i) {
                    progressed = true;
                }
            }
            while let Some(e) = self.sink.poll_event() {
                progressed = true;
                self.on_event(e);
            }
            if !progressed {
                return;
            }
        }
        panic!("the sink kept producing output without time passing");
    }

    fn on_event(&mut self, e: Event) {
        self.transcript
            .push(format!("{:?} sink {e}", self.elapsed()));
        match &e {
            Event::OpenTransport { connection: i } => {
                let i = *i;
                if self.link.failing_opens > 0 {
                    self.link.failing_opens -= 1;
                    let why = "connection refused (simulated)";
                    self.sink.handle_disconnected_on(i, self.now, why);
                } else {
                    self.lines[i].open = true;
                    let now = self.now;
                    self.broker_at(i).handle_connect(now);
                    self.sink.handle_connected_on(i, now);
                }
            }
            Event::CloseTransport { connection: i } => {
                // What was written before the close still reaches the broker, and the
                // runtime's last write (bounded by a second) may carry some of the rest.
                self.flush_link_to_broker(*i);
                self.write_before_close(*i);
                self.close_link(*i);
            }
            Event::FlushCompleted { offsets }
            | Event::FlushFailed { offsets, .. }
            | Event::FlushTimedOut { offsets, .. }
                if self.auto_commit =>
            {
                let offsets = offsets.clone();
                self.commit(&offsets);
            }
            Event::DeadLetter { record, .. } if !self.auto_dead_letter => {
                self.dead_letter_requests.push(record.clone());
            }
            Event::DeadLetter { record, .. } => {
                self.dead_letters.push(record.clone());
                let coords = record.coords();
                self.sink.handle_dead_lettered(&coords);
            }
            _ => {}
        }
        self.events.push((self.elapsed(), e));
    }

    /// Records a Kafka commit of `offsets` and tells the sink.
    pub fn commit(&mut self, offsets: &[(TopicPartition, i64)]) {
        for (tp, off) in offsets {
            match self.committed.iter_mut().find(|(t, _)| t == tp) {
                Some((_, o)) => *o = (*o).max(*off),
                None => self.committed.push((tp.clone(), *off)),
            }
        }
        self.sink.handle_committed(offsets);
    }

    /// The broker side of connection `i` (0: [`broker`](Self::broker)).
    pub fn broker_at(&mut self, i: usize) -> &mut SimBroker {
        match i {
            0 => &mut self.broker,
            i => &mut self.others[i - 1],
        }
    }

    /// The broker sides of every connection, connection 0's first.
    pub fn brokers(&self) -> impl Iterator<Item = &SimBroker> {
        std::iter::once(&self.broker).chain(&self.others)
    }

    /// What every connection's broker delivered, in the order it happened across them (a
    /// topic moves between connections when it has nothing outstanding).
    pub fn delivered(&self) -> Vec<&Delivered> {
        let mut all: Vec<_> = self.brokers().flat_map(|b| b.delivered()).collect();
        all.sort_by_key(|d| d.seq);
        all
    }

    /// Every PUBLISH the brokers read, in the order they read them across connections.
    pub fn received(&self) -> Vec<&Received> {
        let mut all: Vec<_> = self.brokers().flat_map(|b| b.received()).collect();
        all.sort_by_key(|r| r.seq);
        all
    }

    /// The committed position of a partition, if any.
    pub fn committed_of(&self, tp: &TopicPartition) -> Option<i64> {
        self.committed
            .iter()
            .find(|(t, _)| t == tp)
            .map(|(_, o)| *o)
    }

    fn chunks(&mut self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        if self.link.max_chunk == 0 || bytes.len() <= 1 {
            return vec![bytes];
        }
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = 1 + (self.rng.next() as usize % self.link.max_chunk);
            let n = n.min(rest.len());
            out.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        out
    }

    fn due(&self, queue: &VecDeque<Packet>) -> Instant {
        let at = self.now + self.link.latency;
        queue.back().map_or(at, |p| p.due.max(at))
    }

    fn send_to_broker(&mut self, i: usize, bytes: Vec<u8>) {
        if !self.lines[i].open {
            return;
        }
        let due = self.due(&self.lines[i].to_broker);
        for c in self.chunks(bytes) {
            self.lines[i].to_broker.push_back(Packet { due, bytes: c });
        }
    }

    fn send_to_sink(&mut self, i: usize, bytes: Vec<u8>) {
        let due = self.due(&self.lines[i].to_sink);
        for c in self.chunks(bytes) {
            self.lines[i].to_sink.push_back(Packet { due, bytes: c });
        }
    }

    /// Bytes `poll_transmit` returned: without a bandwidth limit the link takes them at
    /// once; with one they wait in the runtime's buffer for [`write_unwritten`].
    ///
    /// [`write_unwritten`]: Self::write_unwritten
    fn hand_to_link(&mut self, i: usize, bytes: Vec<u8>) {
        if self.link.bytes_per_ms.is_none() || !self.lines[i].open {
            let n = bytes.len();
            self.send_to_broker(i, bytes);
            self.sink.handle_written_on(i, self.now, n);
            return;
        }
        let (now, l) = (self.now, &mut self.lines[i]);
        if l.unwritten.is_empty() {
            // An idle link saves no capacity for later.
            l.link_free_at = l.link_free_at.max(now);
        }
        l.unwritten.extend(bytes);
        self.fill_send_buffer(i);
    }

    /// Reports written what fits in the simulated kernel send buffer.
    fn fill_send_buffer(&mut self, i: usize) {
        let l = &mut self.lines[i];
        let room = self.link.send_buffer.saturating_sub(l.buffered);
        let n = room.min(l.unwritten.len() - l.buffered);
        if n > 0 && l.open {
            l.buffered += n;
            self.sink.handle_written_on(i, self.now, n);
        }
    }

    /// The link takes what its bandwidth allows of the unwritten bytes by now, and the
    /// sink learns they were written. Returns whether any were.
    fn write_unwritten(&mut self, i: usize) -> bool {
        let (now, l) = (self.now, &mut self.lines[i]);
        if l.unwritten.is_empty() {
            return false;
        }
        let n = match self.link.bytes_per_ms {
            None => l.unwritten.len(),
            Some(0) => return false,
            Some(rate) => {
                let rate = u128::from(rate);
                let elapsed = now.saturating_duration_since(l.link_free_at);
                let can = elapsed.as_nanos() * rate / 1_000_000;
                let n = can.min(l.unwritten.len() as u128);
                // Rounded down, so the link never runs ahead of `now`.
                let took = u64::try_from(n * 1_000_000 / rate).unwrap_or(u64::MAX);
                l.link_free_at += Duration::from_nanos(took);
                n as usize
            }
        };
        if n == 0 {
            return false;
        }
        let bytes: Vec<u8> = l.unwritten.drain(..n).collect();
        let already = n.min(l.buffered);
        l.buffered -= already;
        self.send_to_broker(i, bytes);
        if n > already {
            self.sink.handle_written_on(i, now, n - already);
        }
        self.fill_send_buffer(i);
        true
    }

    /// When the link can take another millisecond's worth of the unwritten bytes (or all
    /// of them, if fewer), if any wait.
    fn write_deadline(&self, i: usize) -> Option<Instant> {
        let l = &self.lines[i];
        if l.unwritten.is_empty() {
            return None;
        }
        let rate = match self.link.bytes_per_ms {
            None => return Some(self.now),
            Some(0) => return None,
            Some(rate) => u128::from(rate),
        };
        let want = rate.min(l.unwritten.len() as u128);
        // Rounded up, so that at the deadline at least `want` bytes fit.
        let nanos = (want * 1_000_000).div_ceil(rate);
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        Some(l.link_free_at + Duration::from_nanos(nanos))
    }

    /// A graceful close: the runtime writes what it still holds for at most a second
    /// (what the link carries in that time reaches the broker), then drops the rest.
    fn write_before_close(&mut self, i: usize) {
        let rate = self.link.bytes_per_ms.map_or(usize::MAX, |r| r as usize);
        let (now, l) = (self.now, &mut self.lines[i]);
        let n = rate.saturating_mul(1000).min(l.unwritten.len());
        let bytes: Vec<u8> = l.unwritten.drain(..n).collect();
        let open = l.open;
        (l.unwritten, l.buffered) = (VecDeque::new(), 0);
        if n > 0 && open {
            let _ = self.broker_at(i).handle_input(now, &bytes);
        }
    }

    fn flush_link_to_broker(&mut self, i: usize) {
        let now = self.now;
        while let Some(p) = self.lines[i].to_broker.pop_front() {
            let _ = self.broker_at(i).handle_input(now, &p.bytes);
        }
    }

    fn close_link(&mut self, i: usize) {
        let (now, l) = (self.now, &mut self.lines[i]);
        if l.open {
            *l = Line::new(l.link_free_at);
            self.broker_at(i).handle_disconnect(now);
        }
    }

    /// Cuts connection 0 as a network failure would: both sides learn it now, bytes on
    /// the link are lost.
    pub fn cut(&mut self) {
        self.cut_on(0);
    }

    /// Cuts connection `i` (see [`cut`](Self::cut)).
    pub fn cut_on(&mut self, i: usize) {
        if self.lines[i].open {
            self.transcript
                .push(format!("{:?} link {i} cut", self.elapsed()));
            self.close_link(i);
            let why = "connection reset (simulated)";
            self.sink.handle_disconnected_on(i, self.now, why);
            self.drain();
        }
    }

    /// The sink's process crashes and starts again with `cfg`: the transport dies with the
    /// bytes on the link (the broker sees the connection drop and keeps the session if it
    /// persists), dead letters not yet produced are gone, and a new sink starts with nothing
    /// in memory. The broker, the clock, the events and the transcript carry on.
    pub fn restart_sink(&mut self, cfg: Config) {
        self.transcript
            .push(format!("{:?} sink process restarted", self.elapsed()));
        for i in 0..self.lines.len() {
            self.close_link(i);
            self.lines[i] = Line::new(self.now);
        }
        self.dead_letter_requests.clear();
        let mapper = RecordMapper::from_config(&cfg);
        self.sink = match Sink::new(cfg, mapper, self.now) {
            Ok(s) => s,
            Err(e) => panic!("test config is invalid: {e}"),
        };
        self.drain();
    }

    /// The next moment anything happens, if anything will.
    pub fn next_deadline(&self) -> Option<Instant> {
        let lines = self.lines.iter().enumerate().flat_map(|(i, l)| {
            [
                l.to_broker.front().map(|p| p.due),
                l.to_sink.front().map(|p| p.due),
                self.write_deadline(i),
            ]
        });
        let brokers = self.brokers().map(SimBroker::poll_timeout);
        [self.sink.poll_timeout()]
            .into_iter()
            .chain(brokers)
            .chain(lines)
            .flatten()
            .min()
    }

    /// Advances to the next deadline (but not past `limit`) and processes everything due.
    /// Returns false if nothing is scheduled before `limit`.
    pub fn step_until(&mut self, limit: Instant) -> bool {
        let Some(next) = self.next_deadline() else {
            self.now = self.now.max(limit);
            return false;
        };
        if next > limit {
            self.now = self.now.max(limit);
            return false;
        }
        self.now = self.now.max(next);
        self.process_due();
        true
    }

    fn process_due(&mut self) {
        let now = self.now;
        for i in 0..self.lines.len() {
            while self.lines[i]
                .to_broker
                .front()
                .is_some_and(|p| p.due <= now)
            {
                let Some(p) = self.lines[i].to_broker.pop_front() else {
                    break;
                };
                if let Err(e) = self.broker_at(i).handle_input(now, &p.bytes) {
                    self.transcript
                        .push(format!("{:?} broker error {e}", self.elapsed()));
                }
            }
            self.pump_broker(i);
            // Every chunk due now is fed before draining: chunking is how bytes were
            // split, not when they arrived.
            while self.lines[i].to_sink.front().is_some_and(|p| p.due <= now) {
                let Some(p) = self.lines[i].to_sink.pop_front() else {
                    break;
                };
                if let Err(e) = self.sink.handle_input_on(i, now, &p.bytes) {
                    self.protocol_errors.push(e.to_string());
                }
            }
        }
        self.drain();
        if self.sink.poll_timeout().is_some_and(|t| t <= now) {
            self.sink.handle_timeout(now);
        }
        self.drain();
        for i in 0..self.lines.len() {
            self.pump_broker(i);
        }
    }

    fn pump_broker(&mut self, i: usize) {
        let now = self.now;
        while let Some(bytes) = self.broker_at(i).poll_transmit(now) {
            if self.lines[i].open {
                self.send_to_sink(i, bytes);
            }
        }
        if self.lines[i].open && self.broker_at(i).wants_close() {
            // The broker closes: the sink reads the rest, then sees the close.
            while let Some(p) = self.lines[i].to_sink.pop_front() {
                if let Err(e) = self.sink.handle_input_on(i, now, &p.bytes) {
                    self.protocol_errors.push(e.to_string());
                }
            }
            self.drain();
            if self.lines[i].open {
                self.close_link(i);
                self.sink
                    .handle_disconnected_on(i, now, "closed by the broker");
            }
            self.drain();
        }
    }

    /// Runs until `done` holds or `max` simulated time passes; returns whether it held.
    pub fn run_until(&mut self, max: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let limit = self.now + max;
        for _ in 0..10_000_000 {
            if done(self) {
                return true;
            }
            if !self.step_until(limit) && self.now >= limit {
                return done(self);
            }
        }
        panic!("run_until: step budget exhausted");
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step_until(limit) {}
    }

    /// Pushes a record, driving the sink while the buffer is full (up to `max` simulated
    /// time). Returns the push error if it never got in.
    pub fn push(&mut self, record: Record) -> Result<(), PushError> {
        let mut record = record;
        let limit = self.now + Duration::from_secs(600);
        loop {
            match self.sink.push_record(self.now, record) {
                Ok(()) => {
                    self.drain();
                    return Ok(());
                }
                Err(PushError::Full(r)) => {
                    record = r;
                    if !self.step_until(limit) {
                        return Err(PushError::Full(record));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Begins a flush with the configured timeout and runs until its outcome.
    pub fn flush(&mut self) -> Event {
        let deadline = self.sink.flush_deadline(self.now);
        self.flush_with_deadline(deadline)
    }

    /// Begins a flush ending at `deadline` and runs until its outcome.
    pub fn flush_with_deadline(&mut self, deadline: Instant) -> Event {
        if let Err(e) = self.sink.begin_flush(self.now, deadline) {
            panic!("{e}");
        }
        let seen = self.events.len();
        if self.sink.is_closed() {
            self.drain(); // a sink that stopped answers at once; nothing else will step
        }
        let limit = deadline.saturating_duration_since(self.now) + Duration::from_secs(1);
        let found = self.run_until(limit, |h| {
            h.events[seen..].iter().any(|(_, e)| is_flush_outcome(e))
        });
        assert!(found, "no flush outcome by the deadline");
        self.events[seen..]
            .iter()
            .find(|(_, e)| is_flush_outcome(e))
            .map(|(_, e)| e.clone())
            .expect("found above")
    }

    /// Events of one kind since the start.
    pub fn count_events(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| pred(e)).count()
    }
}

/// True for the three outcomes of a flush.
pub fn is_flush_outcome(e: &Event) -> bool {
    e.flush_result().is_some()
}

/// A fixed origin for simulated time. `Instant` has no constructor other than `now`; the
/// value itself never matters, only durations from it, so transcripts stay deterministic.
fn base_instant() -> Instant {
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// A keyed record for tests.
pub fn record(topic: &str, partition: i32, offset: i64, key: &str, value: &str) -> Record {
    Record::new(
        TopicPartition::new(topic, partition),
        offset,
        Some(Bytes::copy_from_slice(key.as_bytes())),
        Some(Bytes::copy_from_slice(value.as_bytes())),
    )
}

/// A plain-TCP test config (no TLS) with small, fast timeouts.
pub fn test_config(version: mqtt_sink_core::MqttVersion, qos: u8) -> Config {
    let mut cfg = Config::new("sim-sink", "127.0.0.1", 1883, "sensors");
    cfg.version = version;
    cfg.qos = qos;
    cfg.tls_enabled = false;
    cfg.flush_timeout = Duration::from_secs(5);
    cfg.keepalive = Duration::from_secs(30);
    cfg.ping_timeout = Duration::from_secs(5);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.reconnect_backoff_min = Duration::from_millis(50);
    cfg.reconnect_backoff_max = Duration::from_secs(2);
    cfg.max_inflight = 20;
    cfg
}
