//! MQTT over WebSocket on a real broker (issue 14 point 4): amqtt's WebSocket listeners,
//! `ws://` and `wss://` (TLS with the test CA), both runtimes. Every record arrives at a
//! subscriber on amqtt's plain MQTT listener and every offset is committed; amqtt's
//! WebSocket ports answer plain MQTT with an HTTP error, so a delivery proves the upgrade.
//! `mqtt-sink check` connects over WebSocket too, and names the failed upgrade when a web
//! server does not serve MQTT at the path.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_testkit::amqtt::{Amqtt, AmqttOptions};
use mqtt_sink_testkit::certs::TestPki;
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::free_port;
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";
const N: usize = 400;

fn ws_config(kafka: &MockKafka, group: &str, port: u16, tls: Option<&TestPki>) -> String {
    let tls = match tls {
        Some(p) => format!("tls_enabled = true\ntls_ca_file = \"{}\"", p.ca.display()),
        None => "tls_enabled = false".into(),
    };
    // amqtt serves any path; the headers go with the upgrade request.
    let mqtt = "version = \"3.1.1\"\nqos = 1\ntransport = \"ws\"\nws_path = \"/mqtt\"\n\
                ws_headers = { \"X-Sink\" = \"mqtt-sink\" }";
    daemon::config(&kafka.bootstrap(), (group, TOPIC), (port, group), mqtt, "")
        .replace("tls_enabled = false", &tls)
}

fn deliver(runtime: &str, broker: &Amqtt, pki: Option<&TestPki>) {
    let (kind, port) = match pki {
        Some(_) => ("wss", broker.wss_port.unwrap()),
        None => ("ws", broker.ws_port.unwrap()),
    };
    let group = format!("websocket-{kind}-{runtime}");
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic(TOPIC, 1).unwrap();
    let recs: Vec<_> = (0..N)
        .map(|i| (0, format!("dev{}", i % 4), format!("{group}-{i}")))
        .collect();
    kafka.produce(TOPIC, &recs).unwrap();
    let want: Vec<Bytes> = recs.iter().map(|r| Bytes::from(r.2.clone())).collect();
    let sub = SyncSubscriber::start_v311(broker.port, &format!("{group}/#"));
    let cfg = ws_config(&kafka, &group, port, pki);
    let mut d = Daemon::start(env!("CARGO_BIN_EXE_mqtt-sink"), runtime, &cfg);
    let arrived = sub.wait_for_all(&want, Duration::from_secs(60));
    let committed = daemon::wait_committed(
        &kafka,
        (&group, TOPIC),
        N as i64,
        &sub,
        Duration::from_secs(30),
    );
    let status = d.stop();
    let log = d.log();
    assert_eq!(arrived, N, "{kind} ({runtime}): arrived\n{log}");
    assert_eq!(
        committed,
        Some(N as i64),
        "{kind} ({runtime}): committed\n{log}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(
        log.contains(&format!("connected to 127.0.0.1:{port}")),
        "{kind} ({runtime}):\n{log}"
    );
    // Per key, in order, each once.
    let msgs = sub.messages();
    for dev in 0..4 {
        let got: Vec<Bytes> = msgs
            .iter()
            .filter(|m| m.topic == format!("{group}/dev{dev}"))
            .map(|m| m.payload.clone())
            .collect();
        let sent: Vec<Bytes> = recs
            .iter()
            .filter(|r| r.1 == format!("dev{dev}"))
            .map(|r| Bytes::from(r.2.clone()))
            .collect();
        assert_eq!(got, sent, "{kind} ({runtime}): dev{dev}");
    }
}

#[test]
fn records_travel_over_ws_and_wss_to_a_real_broker_on_both_runtimes() {
    let dir = std::env::temp_dir().join(format!("mqtt-sink-ws-pki-{}", free_port()));
    let pki = TestPki::generate(&dir).unwrap();
    let options = AmqttOptions {
        ws: true,
        wss: Some((pki.server_cert.clone(), pki.server_key.clone())),
    };
    let Some(broker) = Amqtt::start_with_or_skip("websocket", options) else {
        return;
    };
    each_runtime(|runtime| {
        deliver(runtime, &broker, None);
        deliver(runtime, &broker, Some(&pki));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_connects_over_websocket_and_names_a_failed_upgrade() {
    let Some(broker) = Amqtt::start_with_or_skip(
        "check over websocket",
        AmqttOptions {
            ws: true,
            wss: None,
        },
    ) else {
        return;
    };
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic(TOPIC, 1).unwrap();
    let dir = std::env::temp_dir().join(format!("mqtt-sink-ws-check-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |port: u16| {
        let path = dir.join(format!("{port}.toml"));
        std::fs::write(&path, ws_config(&kafka, "ws-check", port, None)).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_mqtt-sink"))
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let out =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), out)
    };
    let (ok, out) = check(broker.ws_port.unwrap());
    assert!(ok, "{out}");
    assert!(
        out.contains("CONNACK accepted (MQTT 3.1.1, TLS off, WebSocket /mqtt)"),
        "{out}"
    );
    // A web server that does not serve MQTT at this path (answers 404, as gateways do).
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = http.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        String::from_utf8_lossy(&req).into_owned()
    });
    let (ok, out) = check(http_port);
    let request = server.join().unwrap().to_ascii_lowercase();
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("MQTT 127.0.0.1:{http_port}: FAILED"))
            && out.contains("WebSocket upgrade of /mqtt failed")
            && out.contains("404")
            && out.contains("check ws_path"),
        "{out}"
    );
    // The upgrade asked for the path, the subprotocol and the extra header.
    assert!(request.starts_with("get /mqtt http/1.1\r\n"), "{request}");
    assert!(
        request.contains("sec-websocket-protocol: mqtt\r\n"),
        "{request}"
    );
    assert!(request.contains("x-sink: mqtt-sink\r\n"), "{request}");
    let _ = std::fs::remove_dir_all(&dir);
}
