//! The daemon's `/metrics`, `/healthz` and `/readyz` under abuse (review M4 and L12), on real
//! processes: two daemons (one per runtime) in one consumer group over a one-partition
//! topic, so one of them owns no partition.
//!
//! The endpoints used to be a hand-written HTTP/1.1 responder on one thread: a client that
//! sent its request slowly, or a huge one, held every other client (a Kubernetes liveness
//! probe included) until it was done, and `/readyz` never said ready without a partition.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mqtt_sink_testkit::daemon::{self, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{free_port, Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";
const N: usize = 300;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Status and body of `GET http://{addr}{path}`.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut r = agent().get(&format!("http://{addr}{path}")).call().ok()?;
    let body = r.body_mut().read_to_string().ok()?;
    Some((r.status().as_u16(), body))
}

/// The samples of an exposition, read with a Prometheus text parser.
fn samples(body: &str) -> Vec<prometheus_parse::Sample> {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap()
        .samples
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

/// Until `cond` holds for `GET path` (at most `timeout`).
fn wait_for(addr: &str, path: &str, timeout: Duration, cond: impl Fn(u16, &str) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if get(addr, path).is_some_and(|(code, body)| cond(code, &body)) {
            return true;
        }
        // Polling another process's state: nothing to wait on but the clock.
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn health_answers_while_clients_abuse_the_port_and_metrics_match_the_subscriber() {
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic(TOPIC, 1).unwrap();
    let group = "http-group";
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let addrs = [free_port(), free_port()].map(|p| format!("127.0.0.1:{p}"));
    let mut daemons: Vec<Daemon> = ["tokio", "blocking"]
        .iter()
        .zip(&addrs)
        .map(|(runtime, addr)| {
            let http = format!("[http]\nlisten = \"{addr}\"");
            let cfg = daemon::config(
                &kafka.bootstrap(),
                (group, TOPIC),
                (broker.port, "sensors"),
                "",
                "",
            )
            .replace("[http]\nlisten = \"\"", &http);
            Daemon::start(env!("CARGO_BIN_EXE_mqtt-sink"), runtime, &cfg)
        })
        .collect();
    let logs = |ds: &[Daemon]| ds.iter().map(Daemon::log).collect::<Vec<_>>().join("\n");

    // Both ready, though only one owns the partition (L12).
    for addr in &addrs {
        let ready = wait_for(addr, "/readyz", Duration::from_secs(60), |c, _| c == 200);
        assert!(ready, "{addr} never ready:\n{}", logs(&daemons));
    }
    let recs: Vec<_> = (0..N)
        .map(|i| (0, format!("dev{}", i % 4), format!("http-{i}")))
        .collect();
    kafka.produce(TOPIC, &recs).unwrap();
    assert_eq!(
        sub.wait_for(N, Duration::from_secs(60)),
        N,
        "{}",
        logs(&daemons)
    );
    let committed = daemon::wait_committed(
        &kafka,
        (group, TOPIC),
        N as i64,
        &sub,
        Duration::from_secs(30),
    );
    assert_eq!(committed, Some(N as i64), "{}", logs(&daemons));

    // The abuse, on the first daemon's port: a 10 MB request line, and a client that sends
    // one byte every 4 s.
    let target = addrs[0].clone();
    let huge = std::thread::spawn({
        let target = target.clone();
        move || {
            let mut s = TcpStream::connect(&target).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = s.write_all(b"GET /").map_or(0, |()| 5);
            while sent < 10 * 1024 * 1024 {
                match s.write(&chunk) {
                    Ok(n) if n > 0 => sent += n,
                    _ => break,
                }
            }
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            (sent, String::from_utf8_lossy(&answer).into_owned())
        }
    });
    let slow = std::thread::spawn({
        let target = target.clone();
        move || {
            let mut s = TcpStream::connect(&target).unwrap();
            let started = Instant::now();
            for b in b"GET /healthz HTTP/1.1\r\n\r\n" {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                // The slow client's pace is the point: one byte every 4 s.
                std::thread::sleep(Duration::from_secs(4));
                if started.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            (
                started.elapsed(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        }
    });
    // Meanwhile, the health probe answers at once, every time.
    let mut slowest = Duration::ZERO;
    let probing = Instant::now();
    while probing.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        let answer = get(&target, "/healthz");
        slowest = slowest.max(t.elapsed());
        assert_eq!(answer.map(|a| a.0), Some(200), "{}", logs(&daemons));
        // Probing at a probe's pace.
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        slowest < Duration::from_secs(1),
        "/healthz took {slowest:?} while the port was abused"
    );
    let (sent, answer) = huge.join().unwrap();
    assert!(
        sent < 10 * 1024 * 1024 || answer.starts_with("HTTP/1.1 431"),
        "the 10 MB request line was read whole ({sent} bytes), answer {answer:?}"
    );
    let (took, answer) = slow.join().unwrap();
    assert!(
        !answer.contains("200 OK") && took < Duration::from_secs(20),
        "the slow client was served after {took:?}: {answer:?}"
    );

    // /metrics parses, and its counts match what the subscriber saw.
    let arrived = sub.messages().len() as f64;
    let mut acknowledged = 0.0;
    for addr in &addrs {
        let (code, body) = get(addr, "/metrics").unwrap();
        assert_eq!(code, 200, "{addr}");
        let s = samples(&body);
        assert!(s.len() > 10, "{addr}: too few samples parsed from:\n{body}");
        // Each metric is described once (two families of one name are invalid OpenMetrics).
        let mut types: Vec<&str> = body.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let described = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(
            types.len(),
            described,
            "{addr}: a metric described twice:\n{body}"
        );
        let find = |name: &str| s.iter().find(|x| x.metric == name).map(value);
        acknowledged += find("mqtt_sink_records_acknowledged_total").unwrap_or(0.0);
        // Connected, and to which broker (the address in use, of `servers` when several).
        let conn = s
            .iter()
            .find(|x| x.metric == "mqtt_sink_mqtt_connected")
            .unwrap_or_else(|| panic!("{addr}: no mqtt_sink_mqtt_connected:\n{body}"));
        let server = format!("127.0.0.1:{}", broker.port);
        assert_eq!(conn.labels.get("server"), Some(server.as_str()), "{body}");
        assert_eq!(value(conn), 1.0, "{addr}:\n{body}");
        let owner = find("mqtt_sink_assigned_partitions") == Some(1.0);
        let committed: Vec<f64> = s
            .iter()
            .filter(|x| x.metric == "mqtt_sink_committed_offset")
            .map(value)
            .collect();
        if owner {
            assert_eq!(committed, vec![N as f64], "{addr}:\n{body}");
        } else {
            assert!(committed.is_empty(), "{addr} owns no partition:\n{body}");
        }
    }
    assert_eq!(acknowledged, arrived, "acknowledged vs subscriber");
    for d in &mut daemons {
        assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log());
    }
}
