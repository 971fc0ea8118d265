//! A chaos proxy between the sink and a real broker, on 127.0.0.1: cut every connection,
//! blackhole (accept, never answer), add latency, and, decoding MQTT frames from the broker,
//! drop a share of PUBACK / PUBREC packets, and cap the bandwidth (a slow link). Std threads
//! only; everything is bounded and stops when the proxy is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rng::SplitMix;

#[derive(Debug, Default)]
struct State {
    blackhole: AtomicBool,
    latency_ms: AtomicU64,
    drop_acks_percent: AtomicU32,
    /// Bytes per second in each direction of each connection; 0 = unlimited.
    bandwidth: AtomicU64,
    dropped: AtomicU64,
    stopped: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// The proxy; its listener is `127.0.0.1:{port}`, forwarding to `127.0.0.1:{upstream}`.
#[derive(Debug)]
pub struct ChaosProxy {
    /// Where clients connect.
    pub port: u16,
    state: Arc<State>,
}

impl ChaosProxy {
    /// Starts forwarding to `127.0.0.1:upstream`.
    pub fn start(upstream: u16, seed: u64) -> Result<Self, String> {
        Self::start_to("127.0.0.1", upstream, seed)
    }

    /// Starts forwarding to `host:upstream`.
    pub fn start_to(host: &str, upstream: u16, seed: u64) -> Result<Self, String> {
        let upstream = format!("{host}:{upstream}");
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("proxy bind: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !st.stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        n += 1;
                        let _ = client.set_nonblocking(false);
                        connect(client, &upstream, st.clone(), seed ^ n);
                    }
                    // Poll the flag between accepts (the listener is non-blocking).
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { port, state })
    }

    /// Closes every current connection (both sides see a reset/EOF).
    pub fn cut_all(&self) {
        if let Ok(mut c) = self.state.conns.lock() {
            for s in c.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// While on, bytes in both directions are swallowed: connections stay open, nothing
    /// is answered.
    pub fn set_blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::Relaxed);
    }

    /// Delay each forwarded chunk by this much (a delay line: chunks in flight overlap, as
    /// on a real link). Connections accepted while it is zero stay undelayed.
    pub fn set_latency(&self, d: Duration) {
        self.state
            .latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Caps the bandwidth at `bytes_per_sec` in each direction of each connection (`None`:
    /// unlimited, the default): a slow link. The forwarding threads write at most ~20 ms
    /// worth of bytes at a time (1 byte to 8 KiB) and sleep between writes to keep the
    /// pace, and read nothing while they sleep, so the sender feels the backpressure once
    /// the kernel socket buffers in front of the proxy are full (they still hold some
    /// data, as on a real link). Takes effect from the next write; `Some(0)` is treated as
    /// 1 byte/s.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        let rate = bytes_per_sec.map_or(0, |r| r.max(1));
        self.state.bandwidth.store(rate, Ordering::Relaxed);
    }

    /// Drop this percentage of PUBACK and PUBREC packets from the broker.
    pub fn drop_acks(&self, percent: u32) {
        self.state
            .drop_acks_percent
            .store(percent.min(100), Ordering::Relaxed);
    }

    /// How many acknowledgements were dropped so far.
    pub fn dropped_acks(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::Relaxed);
        self.cut_all();
    }
}

fn connect(client: TcpStream, upstream: &str, st: Arc<State>, seed: u64) {
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    // Forward each chunk as it comes: Nagle's algorithm would hold small packets (acks)
    // behind the peer's delayed ACK, a delay no real link adds.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    if let Ok(mut c) = st.conns.lock() {
        if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
            c.push(a);
            c.push(b);
        }
    }
    let up = st.clone();
    std::thread::spawn(move || {
        let out = Out::new(s2, &client, &up);
        pump_up(client, out, &up);
    });
    std::thread::spawn(move || {
        let out = Out::new(c2, &server, &st);
        pump_down(server, out, &st, seed);
    });
}

/// The writing half of one direction of one connection. Without latency (when the
/// connection was accepted) the reading thread writes each chunk itself, paced. With it, a
/// delay line: each chunk is stamped when read and written by a thread of its own once
/// `latency` has passed since, so that chunks in flight overlap as on a real link (sleeping
/// before each write instead would also cap the link at one chunk per `latency`).
enum Out {
    Direct(TcpStream, Pacer),
    Line(std::sync::mpsc::SyncSender<(Instant, Vec<u8>)>),
}

/// Chunks (up to 16 KiB each) a delay line holds before its reader stops reading.
const LINE_CHUNKS: usize = 256;

impl Out {
    fn new(to: TcpStream, from: &TcpStream, st: &Arc<State>) -> Self {
        if st.latency_ms.load(Ordering::Relaxed) == 0 {
            return Self::Direct(to, Pacer::new());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(LINE_CHUNKS);
        let st = st.clone();
        let from = from.try_clone();
        std::thread::spawn(move || {
            let mut to = to;
            let mut pacer = Pacer::new();
            // Ends when the reader hangs up (after what it queued) or a write fails.
            while let Ok((read_at, chunk)) = rx.recv() {
                let due = read_at + Duration::from_millis(st.latency_ms.load(Ordering::Relaxed));
                let now = Instant::now();
                if due > now {
                    // The latency being simulated: at most `latency` after the read.
                    std::thread::sleep(due - now);
                }
                if pacer.write(&st, &mut to, &chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Both);
            if let Ok(from) = from {
                let _ = from.shutdown(Shutdown::Both);
            }
        });
        Self::Line(tx)
    }

    /// Forwards `data` (now, or `latency` after now); `Err` when the connection is done.
    fn send(&mut self, st: &State, data: &[u8]) -> Result<(), ()> {
        match self {
            Self::Direct(to, pacer) => pacer.write(st, to, data).map_err(drop),
            Self::Line(tx) => tx.send((Instant::now(), data.to_vec())).map_err(drop),
        }
    }

    /// The reader is done: a direct writer closes both sockets now; a delay line writes what
    /// it holds first.
    fn finish(self, from: &TcpStream) {
        if let Self::Direct(to, _) = self {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        }
    }
}

/// Paces one direction of one connection at [`State::bandwidth`]: a virtual clock that
/// each write advances by its length / rate; a write waits until the clock is due. An idle
/// link does not save up credit (the clock is never behind now), so there are no bursts.
struct Pacer {
    next: Instant,
}

impl Pacer {
    fn new() -> Self {
        Self {
            next: Instant::now(),
        }
    }

    /// Writes `data` to `to`, at most the configured rate; `Err` if the write fails.
    fn write(&mut self, st: &State, to: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let rate = st.bandwidth.load(Ordering::Relaxed);
            if rate == 0 {
                self.next = Instant::now();
                return to.write_all(data);
            }
            // About 20 ms worth per write, so the pace is smooth.
            let chunk = usize::try_from(rate / 50)
                .unwrap_or(usize::MAX)
                .clamp(1, 8192);
            let (now_part, rest) = data.split_at(chunk.min(data.len()));
            let now = Instant::now();
            if self.next > now {
                // The bandwidth cap being simulated: at most one chunk's time (~20 ms).
                std::thread::sleep(self.next - now);
            } else {
                self.next = now;
            }
            if st.stopped.load(Ordering::Relaxed) {
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
            to.write_all(now_part)?;
            let nanos = (now_part.len() as u128 * 1_000_000_000) / u128::from(rate);
            self.next += Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            data = rest;
        }
        Ok(())
    }
}

/// Client to broker: bytes as they come (paced by the bandwidth cap).
fn pump_up(mut from: TcpStream, mut out: Out, st: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if st.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        if out.send(st, &buf[..n]).is_err() {
            break;
        }
    }
    out.finish(&from);
}

/// Broker to client: whole MQTT frames, some acknowledgements dropped (paced by the
/// bandwidth cap).
fn pump_down(mut from: TcpStream, mut out: Out, st: &State, seed: u64) {
    let mut rng = SplitMix::new(seed);
    let mut buf = [0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if st.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        let mut frames = Vec::with_capacity(pending.len());
        let mut at = 0;
        while let Some(len) = frame_len(&pending[at..]) {
            let frame = &pending[at..at + len];
            let kind = frame[0] >> 4;
            let percent = st.drop_acks_percent.load(Ordering::Relaxed);
            let drop =
                matches!(kind, 4 | 5) && percent > 0 && rng.next() % 100 < u64::from(percent);
            if drop {
                st.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                frames.extend_from_slice(frame);
            }
            at += len;
        }
        pending.drain(..at);
        if frames.is_empty() {
            continue;
        }
        if out.send(st, &frames).is_err() {
            break;
        }
    }
    out.finish(&from);
}

/// The length of the complete frame at the start of `b`, if it is all there.
fn frame_len(b: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *b.get(1 + i)?;
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 2 + i + remaining;
            return (b.len() >= total).then_some(total);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{frame_len, ChaosProxy};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// 60,000 bytes through a 200,000 B/s cap: 15 writes of 4,000 bytes, 20 ms apart, so
    /// about 0.3 s (the sender's write returns at once: the kernel buffers take it all).
    #[test]
    fn the_bandwidth_cap_paces_the_bytes() {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = server.local_addr().expect("local addr").port();
        server.set_nonblocking(true).expect("non-blocking");
        let proxy = ChaosProxy::start(upstream, 1).expect("proxy");
        proxy.set_bandwidth(Some(200_000));
        let reader = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match server.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        // Polling the listener: nothing to wait on but the clock.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("the proxy never connected: {e}"),
                }
            };
            s.set_nonblocking(false).expect("blocking");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let (mut got, mut buf) = (0usize, [0u8; 8192]);
            while got < 60_000 && Instant::now() < deadline {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
        let start = Instant::now();
        c.write_all(&[7u8; 60_000]).expect("write");
        let got = reader.join().expect("reader");
        let took = start.elapsed();
        assert_eq!(got, 60_000);
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    /// Latency is a delay line, not a sleep per chunk: three writes 100 ms apart through
    /// 500 ms of latency arrive about 500, 600 and 700 ms after the first was sent. A sleep
    /// before each forwarded chunk (the old proxy) delivered the last at 1,000 ms or later.
    #[test]
    fn latency_delays_every_chunk_without_serialising_them() {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = server.local_addr().expect("local addr").port();
        let proxy = ChaosProxy::start(upstream, 1).expect("proxy");
        proxy.set_latency(Duration::from_millis(500));
        let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
        let (mut s, _) = server.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let start = Instant::now();
        let writer = std::thread::spawn(move || {
            for b in 1..=3u8 {
                c.write_all(&[b]).expect("write");
                // The stimulus: three chunks 100 ms apart (not a wait for anything).
                std::thread::sleep(Duration::from_millis(100));
            }
            c
        });
        let (mut got, mut first) = (Vec::new(), None);
        let mut buf = [0u8; 16];
        while got.len() < 3 && start.elapsed() < Duration::from_secs(10) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(|| start.elapsed());
                    got.extend_from_slice(&buf[..n]);
                }
            }
        }
        let last = start.elapsed();
        drop(writer.join());
        assert_eq!(got, [1, 2, 3]);
        let first = first.expect("something arrived");
        assert!(first >= Duration::from_millis(500), "first after {first:?}");
        assert!(last < Duration::from_millis(950), "last after {last:?}");
    }

    #[test]
    fn frames_are_delimited() {
        assert_eq!(frame_len(&[0x40, 0x02, 0, 1]), Some(4));
        assert_eq!(frame_len(&[0x40, 0x02, 0]), None);
        assert_eq!(frame_len(&[0x30, 0x80, 0x01]), None);
        let mut big = vec![0x30, 0x80, 0x01];
        big.resize(3 + 128, 0);
        assert_eq!(frame_len(&big), Some(131));
    }
}
