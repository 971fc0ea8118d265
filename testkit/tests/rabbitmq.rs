//! The private RabbitMQ fixture: it starts, routes MQTT 3.1.1 QoS 1 messages, answers a
//! QoS 2 PUBLISH with a PUBACK (it does not honour QoS 2), and leaves no process behind.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mqtt_sink_testkit::rabbitmq::{
    mqtt311_connect, mqtt_packet, processes_of, read_mqtt_packet, RabbitMq,
};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// Listening TCP sockets on `ports` as (address, port), from /proc/net/tcp{,6}.
fn listeners(ports: &[u16]) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // f[1] = local "ADDR:PORT" in hex, f[3] = state (0A = LISTEN).
            let (Some(local), Some(&"0A")) = (f.get(1), f.get(3)) else {
                continue;
            };
            let Some((addr, port)) = local.split_once(':') else {
                continue;
            };
            let Ok(port) = u16::from_str_radix(port, 16) else {
                continue;
            };
            if !ports.contains(&port) {
                continue;
            }
            let addr = match addr {
                "0100007F" => "127.0.0.1".to_string(),
                "00000000000000000000000001000000" => "::1".to_string(),
                other => other.to_string(),
            };
            out.push((addr, port));
        }
    }
    out
}

/// A raw MQTT 3.1.1 connection (CONNACK checked).
fn raw_connect(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&mqtt311_connect(id)).unwrap();
    let (first, body) = read_mqtt_packet(&mut s).expect("CONNACK");
    assert_eq!((first, body), (0x20, vec![0, 0]), "CONNACK");
    s
}

/// A QoS `qos` PUBLISH with packet id `pid`.
fn publish_packet(qos: u8, pid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(payload);
    mqtt_packet(0x30 | (qos << 1), &body)
}

#[test]
fn rabbitmq_routes_mqtt_and_downgrades_qos2() {
    let Some(broker) = RabbitMq::start_or_skip("rabbitmq_routes_mqtt_and_downgrades_qos2") else {
        return;
    };
    println!(
        "RabbitMQ {} up in {:.1} s: mqtt {}, amqp {}, dist {}, epmd {}, dir {}",
        broker.node,
        broker.startup.as_secs_f64(),
        broker.port,
        broker.amqp_port,
        broker.dist_port,
        broker.epmd_port,
        broker.dir.display()
    );
    let node = broker.node.clone();
    let procs = processes_of(&node);
    let comm = |p: &u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let names: Vec<String> = procs
        .iter()
        .map(|p| format!("{p} {}", comm(p).trim()))
        .collect();
    println!("its processes: {names:?}");
    assert!(
        names.iter().any(|n| n.ends_with("beam.smp")),
        "no beam.smp of {node}"
    );
    assert!(
        names.iter().any(|n| n.ends_with("epmd")),
        "no private epmd of {node}"
    );

    // Everything listens on loopback only (epmd adds ::1 to 127.0.0.1 by itself).
    let ports = [
        broker.port,
        broker.amqp_port,
        broker.dist_port,
        broker.epmd_port,
    ];
    let listeners = listeners(&ports);
    println!("listeners: {listeners:?}");
    for port in ports {
        assert!(
            listeners
                .iter()
                .any(|(a, p)| *p == port && a == "127.0.0.1"),
            "nothing on 127.0.0.1:{port}"
        );
    }
    for (a, p) in &listeners {
        assert!(a == "127.0.0.1" || a == "::1", "listening on {a}:{p}");
    }

    // Subscriber: MQTT 3.1.1 (rumqttc v4). `SyncSubscriber` speaks MQTT 5, which RabbitMQ
    // 3.10 does not: see the MQTT 5 probe below.
    let mut opts = MqttOptions::new("rabbitmq-test-sub", "127.0.0.1", broker.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (sub, mut conn) = Client::new(opts, 64);
    sub.subscribe("sensors/#", QoS::ExactlyOnce).unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let granted = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Packet::SubAck(a)) => break a.return_codes,
            Ok(_) => {}
            Err(e) => panic!("no SUBACK within 10 s ({e})"),
        }
    };
    println!("SUBACK for sensors/# at QoS 2: {granted:?}");

    // QoS 1 messages from a second client.
    let mut opts = MqttOptions::new("rabbitmq-test-pub", "127.0.0.1", broker.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (publ, mut pconn) = Client::new(opts, 64);
    let want: Vec<String> = (0..5).map(|i| format!("reading-{i}")).collect();
    for (i, w) in want.iter().enumerate() {
        publ.publish(
            format!("sensors/s{i}"),
            QoS::AtLeastOnce,
            false,
            w.as_bytes().to_vec(),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pubacks = 0;
    while pubacks < want.len() {
        match pconn.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => pubacks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher: {e}"),
            Err(_) => panic!("only {pubacks} PUBACKs within 10 s"),
        }
    }

    // QoS 2 by hand: RabbitMQ answers with a PUBACK (0x40), not a PUBREC (0x50).
    let mut raw = raw_connect(broker.port, "rabbitmq-test-raw");
    raw.write_all(&publish_packet(2, 7, "sensors/qos2", b"exactly-once?"))
        .unwrap();
    let (first, body) = read_mqtt_packet(&mut raw).expect("reply to QoS 2 PUBLISH");
    println!("reply to a QoS 2 PUBLISH: {first:#04x} {body:02x?} (0x40 PUBACK, 0x50 PUBREC)");
    assert_eq!(first, 0x40, "expected a PUBACK for QoS 2");
    assert_eq!(body, vec![0, 7], "PUBACK for packet id 7");

    // Everything arrives (QoS 2 subscriptions are served at QoS 1 at most).
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want.len() + 1 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Packet::Publish(p)) => {
                assert!(p.topic.starts_with("sensors/"), "topic {}", p.topic);
                assert!(p.qos <= QoS::AtLeastOnce, "delivered at {:?}", p.qos);
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    for w in want.iter().map(String::as_str).chain(["exactly-once?"]) {
        assert!(got.iter().any(|g| g == w), "{w} missing from {got:?}");
    }

    // MQTT 5 (what `SyncSubscriber` speaks): RabbitMQ 3.10 closes without a CONNACK.
    let mut v5 = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    v5.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Protocol level 5, clean start, keep alive 30 s, no properties, client id "v5".
    let connect = [
        0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0, 0, 2, b'v', b'5',
    ];
    v5.write_all(&mqtt_packet(0x10, &connect)).unwrap();
    println!(
        "reply to an MQTT 5 CONNECT: {:?}",
        read_mqtt_packet(&mut v5).map_err(|e| e.kind())
    );

    let _ = publ.disconnect();
    let _ = sub.disconnect();
    drop((rx, reader, raw, v5)); // the reader thread ends when its connection does

    // Nothing of it survives the drop.
    let (dir, epmd_port) = (broker.dir.clone(), broker.epmd_port);
    let t = Instant::now();
    drop(broker);
    println!("dropped in {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(
        processes_of(&node),
        Vec::<u32>::new(),
        "processes of {node} left"
    );
    let left: Vec<u32> = procs
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
        .collect();
    assert_eq!(left, Vec::<u32>::new(), "processes of {node} left");
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(
        TcpStream::connect(("127.0.0.1", epmd_port)).is_err(),
        "private epmd still listening"
    );
}
