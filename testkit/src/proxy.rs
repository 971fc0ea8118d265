//! A chaos proxy between the sink and a real broker, on 127.0.0.1: cut every connection,
//! blackhole (accept, never answer), add latency, and, decoding MQTT frames from the broker,
//! drop a share of PUBACK / PUBREC packets. Std threads only; everything is bounded and
//! stops when the proxy is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::rng::SplitMix;

#[derive(Debug, Default)]
struct State {
    blackhole: AtomicBool,
    latency_ms: AtomicU64,
    drop_acks_percent: AtomicU32,
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

    /// Delay each forwarded chunk by this much.
    pub fn set_latency(&self, d: Duration) {
        self.state
            .latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
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
    std::thread::spawn(move || pump_up(client, s2, &up));
    std::thread::spawn(move || pump_down(server, c2, &st, seed));
}

fn delay(st: &State) {
    let ms = st.latency_ms.load(Ordering::Relaxed);
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms)); // the latency being simulated
    }
}

/// Client to broker: bytes as they come.
fn pump_up(mut from: TcpStream, mut to: TcpStream, st: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if st.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        delay(st);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Broker to client: whole MQTT frames, some acknowledgements dropped.
fn pump_down(mut from: TcpStream, mut to: TcpStream, st: &State, seed: u64) {
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
        let mut out = Vec::with_capacity(pending.len());
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
                out.extend_from_slice(frame);
            }
            at += len;
        }
        pending.drain(..at);
        if out.is_empty() {
            continue;
        }
        delay(st);
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
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
    use super::frame_len;

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
