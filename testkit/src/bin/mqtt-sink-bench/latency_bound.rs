//! `--latency-bound`: a broker far away that limits each connection's window. Mosquitto
//! with `max_inflight_messages 20` behind the chaos proxy adding 20 ms each way; the sink
//! at `max_inflight = 20` (as a broker's Receive Maximum or AWS IoT Core's 100 would cap
//! it), QoS 1, with `connections` = 1, 2, 4, 8 (or `--connections`). One connection moves
//! at most window / round trip; N connections N times that. The subscriber (on Mosquitto
//! directly) checks that every sensor's records arrive in `seq` order. `flush_timeout` is
//! 120 s: the default buffer takes longer than the default 10 s to drain at this pace.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqtt_sink_testkit::mosquitto::{free_port, Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::proxy::ChaosProxy;

use super::{subscribe_with, Daemon, Setup};

/// One row: connections, msg/s, records out of order.
pub(crate) struct Row {
    pub(crate) connections: usize,
    pub(crate) rate: f64,
    pub(crate) out_of_order: u64,
    pub(crate) received: u64,
}

/// Runs the case for each of `connections` on `runtime`.
pub(crate) fn run(bin: &Path, runtime: &str, connections: &[usize], setup: &Setup<'_>) -> Vec<Row> {
    let broker = Mosquitto::start(MosquittoOptions {
        // No Nagle on its acks either: the 20 ms each way is the proxy's.
        extra: vec![
            "max_inflight_messages 20".into(),
            "set_tcp_nodelay true".into(),
        ],
        ..MosquittoOptions::default()
    })
    .expect("mosquitto");
    let proxy = ChaosProxy::start(broker.port, 7).expect("proxy");
    proxy.set_latency(Duration::from_millis(20));
    connections
        .iter()
        .map(|&n| one(bin, runtime, n, &broker, &proxy, setup))
        .collect()
}

fn one(
    bin: &Path,
    runtime: &str,
    connections: usize,
    broker: &Mosquitto,
    proxy: &ChaosProxy,
    setup: &Setup<'_>,
) -> Row {
    let root = format!("far/{}", free_port());
    let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let out_of_order = Arc::new(AtomicU64::new(0));
    let (l, o) = (last.clone(), out_of_order.clone());
    let counter = subscribe_with(broker.port, &format!("{root}/#"), 1, move |p| {
        // `{"seq":123,"sensor":"k7",...`: per sensor, seq only grows.
        let text = String::from_utf8_lossy(p);
        let field = |name: &str| {
            let at = text.find(name)? + name.len();
            let rest = &text[at..];
            let end = rest.find([',', '"'])?;
            Some(rest[..end].to_string())
        };
        let (Some(seq), Some(sensor)) = (field("\"seq\":"), field("\"sensor\":\"")) else {
            o.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let seq: u64 = seq.parse().unwrap_or(0);
        let mut last = l.lock().expect("lock");
        if last.insert(sensor, seq).is_some_and(|prev| prev >= seq) {
            o.fetch_add(1, Ordering::Relaxed);
        }
    });
    let setup = Setup {
        port: proxy.port,
        ..*setup
    };
    // A checkpoint drains the buffer (5000 records by default) at this broker's pace, a
    // quarter of a minute with one connection: a flush that times out rewinds and
    // publishes again, which measures the rewinds, not the connections.
    let mqtt =
        format!("max_inflight = 20\nconnections = {connections}\nflush_timeout = \"120s\"\n");
    let daemon = Daemon::start(bin, runtime, 1, &root, &setup, "", &mqtt);
    let deadline = Instant::now() + Duration::from_secs(120);
    let t0 = loop {
        if daemon
            .metric("mqtt_sink_records_consumed_total")
            .unwrap_or(0)
            > 0
        {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the sink consumed nothing in 120 s"
        );
        std::thread::sleep(Duration::from_millis(2)); // polling metrics, bounded
    };
    let n = setup.n as u64;
    let end = counter.wait(n, Duration::from_secs(900));
    daemon.stop();
    let received = counter.count.load(Ordering::Relaxed);
    let end = end.unwrap_or_else(|| panic!("{connections} connections: {received} of {n} arrived"));
    Row {
        connections,
        rate: n as f64 / end.saturating_duration_since(t0).as_secs_f64().max(1e-9),
        out_of_order: out_of_order.load(Ordering::Relaxed),
        received,
    }
}
