//! Broker failover on real processes (issue 14 point 3): `servers = [A, B]`; Mosquitto A is
//! killed while records flow (the rate limit keeps them flowing for seconds); the daemon
//! moves on to B, says so, and every record arrives at A or B and is committed. Both
//! runtimes, over TCP and over TLS; over TLS, A's certificate names only `localhost` and B's
//! only `127.0.0.1`, so the failover connects only if the name checked (and sent as SNI)
//! follows the address in use.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_testkit::certs::TestPki;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{free_port, Mosquitto, MosquittoOptions, TlsListener};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";

fn broker(tls: Option<(&Path, &(std::path::PathBuf, std::path::PathBuf))>) -> Mosquitto {
    Mosquitto::start(MosquittoOptions {
        tls: tls.map(|(ca, (cert, key))| TlsListener {
            cafile: ca.to_path_buf(),
            certfile: cert.clone(),
            keyfile: key.clone(),
            require_certificate: false,
        }),
        ..MosquittoOptions::default()
    })
    .unwrap()
}

fn fails_over(runtime: &str, pki: Option<&TestPki>) {
    let bin = env!("CARGO_BIN_EXE_mqtt-sink");
    let n = 2000usize;
    let mut a = broker(pki.map(|p| (p.ca.as_path(), &p.localhost_only)));
    let b = broker(pki.map(|p| (p.ca.as_path(), &p.ip_only)));
    let kind = if pki.is_some() { "tls" } else { "tcp" };
    let root = format!("failover-{kind}-{runtime}");
    // Subscribers on the plain listeners.
    let sub_a = SyncSubscriber::start(a.port, &format!("{root}/#"));
    let sub_b = SyncSubscriber::start(b.port, &format!("{root}/#"));
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic(TOPIC, 1).unwrap();
    let recs: Vec<_> = (0..n)
        .map(|i| (0, format!("dev{}", i % 5), format!("{root}-{i}")))
        .collect();
    kafka.produce(TOPIC, &recs).unwrap();
    let (servers, to_a, to_b) = match pki {
        Some(_) => (
            format!(
                "[\"localhost:{}\", \"127.0.0.1:{}\"]",
                a.tls_port, b.tls_port
            ),
            format!("connected to localhost:{}", a.tls_port),
            format!("connected to 127.0.0.1:{}", b.tls_port),
        ),
        None => (
            format!("[\"127.0.0.1:{}\", \"127.0.0.1:{}\"]", a.port, b.port),
            format!("connected to 127.0.0.1:{}", a.port),
            format!("connected to 127.0.0.1:{}", b.port),
        ),
    };
    let tls = match pki {
        Some(p) => format!("tls_enabled = true\ntls_ca_file = \"{}\"", p.ca.display()),
        None => "tls_enabled = false".into(),
    };
    // The simple form (server, port) gives way to the list.
    let cfg = daemon::config(
        &kafka.bootstrap(),
        (&root, TOPIC),
        (0, &root),
        &format!("servers = {servers}\nmax_publish_rate = 500"),
        "",
    )
    .replace("server = \"127.0.0.1\"\nport = 0\n", "")
    .replace("tls_enabled = false", &tls);
    let mut d = Daemon::start(bin, runtime, &cfg);
    // Kill A mid-run: some records reached it, most did not yet.
    assert!(
        sub_a.wait_for(300, Duration::from_secs(30)) >= 300,
        "{}",
        d.log()
    );
    a.kill();
    let at_a: BTreeSet<Bytes> = sub_a.messages().into_iter().map(|m| m.payload).collect();
    assert!(at_a.len() < n, "A had them all before it was killed");
    let missing: Vec<Bytes> = recs
        .iter()
        .map(|r| Bytes::from(r.2.clone()))
        .filter(|p| !at_a.contains(p))
        .collect();
    let at_b = sub_b.wait_for_all(&missing, Duration::from_secs(60));
    assert_eq!(
        at_b,
        missing.len(),
        "{kind}: records lost in the failover:\n{}",
        d.log()
    );
    let committed = daemon::wait_committed(
        &kafka,
        (&root, TOPIC),
        n as i64,
        &sub_b,
        Duration::from_secs(30),
    );
    assert_eq!(committed, Some(n as i64), "{}", d.log());
    let log = d.log();
    assert!(log.contains(&to_a) && log.contains(&to_b), "{log}");
    assert_eq!(d.stop().and_then(|s| s.code()), Some(0), "{}", d.log());
}

#[test]
fn the_daemon_fails_over_to_the_next_server_when_one_is_killed() {
    each_runtime(|runtime| fails_over(runtime, None));
}

#[test]
fn over_tls_the_certificate_is_checked_against_the_address_in_use() {
    let dir = std::env::temp_dir().join(format!("mqtt-sink-failover-pki-{}", free_port()));
    let pki = TestPki::generate(&dir).unwrap();
    each_runtime(|runtime| fails_over(runtime, Some(&pki)));
    let _ = std::fs::remove_dir_all(&dir);
}
