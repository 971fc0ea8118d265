//! The private amqtt fixture: it starts, accepts an MQTT 3.1.1 CONNECT, acknowledges QoS 1
//! (PUBACK) and QoS 2 (PUBREC, then PUBCOMP for the PUBREL) publishes, routes them to a
//! subscriber, refuses MQTT 5, and leaves no process behind.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mqtt_sink_testkit::amqtt::Amqtt;
use mqtt_sink_testkit::rabbitmq::{mqtt311_connect, mqtt_packet, read_mqtt_packet};

/// A raw MQTT 3.1.1 connection (CONNACK checked: accepted, no session present).
fn raw_connect(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&mqtt311_connect(id)).unwrap();
    let (first, body) = read_mqtt_packet(&mut s).expect("CONNACK");
    assert_eq!((first, body), (0x20, vec![0, 0]), "CONNACK");
    s
}

/// A QoS `qos` (1 or 2) PUBLISH with packet id `pid`.
fn publish_packet(qos: u8, pid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(payload);
    mqtt_packet(0x30 | (qos << 1), &body)
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with(['Z', 'X'])
    })
}

#[test]
fn amqtt_acks_qos1_and_qos2() {
    let Some(broker) = Amqtt::start_or_skip("amqtt_acks_qos1_and_qos2") else {
        return;
    };
    let pid = broker.pid().unwrap();
    println!(
        "amqtt (pid {pid}) up in {:.2} s on 127.0.0.1:{}, dir {}",
        broker.startup.as_secs_f64(),
        broker.port,
        broker.dir.display()
    );

    // A subscriber at QoS 2 on amqtt/#.
    let mut sub = raw_connect(broker.port, "amqtt-test-sub");
    let filter = b"amqtt/#";
    let mut body = 1u16.to_be_bytes().to_vec(); // packet id
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter);
    body.push(2); // requested QoS
    sub.write_all(&mqtt_packet(0x82, &body)).unwrap();
    let (first, body) = read_mqtt_packet(&mut sub).expect("SUBACK");
    assert_eq!(
        (first, body),
        (0x90, vec![0, 1, 2]),
        "SUBACK granting QoS 2"
    );

    let mut publ = raw_connect(broker.port, "amqtt-test-pub");

    // QoS 1: PUBACK with the packet id.
    publ.write_all(&publish_packet(1, 11, "amqtt/q1", b"at-least-once"))
        .unwrap();
    let (first, body) = read_mqtt_packet(&mut publ).expect("reply to QoS 1 PUBLISH");
    println!("reply to a QoS 1 PUBLISH: {first:#04x} {body:02x?}");
    assert_eq!(
        (first, body),
        (0x40, vec![0, 11]),
        "PUBACK for packet id 11"
    );

    // QoS 2: PUBREC, then PUBREL -> PUBCOMP.
    publ.write_all(&publish_packet(2, 12, "amqtt/q2", b"exactly-once"))
        .unwrap();
    let (first, body) = read_mqtt_packet(&mut publ).expect("reply to QoS 2 PUBLISH");
    println!("reply to a QoS 2 PUBLISH: {first:#04x} {body:02x?} (0x50 PUBREC)");
    assert_eq!(
        (first, body),
        (0x50, vec![0, 12]),
        "PUBREC for packet id 12"
    );
    publ.write_all(&mqtt_packet(0x62, &12u16.to_be_bytes()))
        .unwrap();
    let (first, body) = read_mqtt_packet(&mut publ).expect("reply to PUBREL");
    println!("reply to the PUBREL: {first:#04x} {body:02x?} (0x70 PUBCOMP)");
    assert_eq!(
        (first, body),
        (0x70, vec![0, 12]),
        "PUBCOMP for packet id 12"
    );

    // Both reach the subscriber, at QoS 2: amqtt forwards at the subscription's QoS, not
    // min(publish QoS, subscription QoS).
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 2 && Instant::now() < deadline {
        let (first, body) = read_mqtt_packet(&mut sub).expect("PUBLISH to the subscriber");
        match first >> 4 {
            3 => {
                let qos = (first >> 1) & 3;
                let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
                let mut rest = &body[2 + tlen..];
                if qos > 0 {
                    let id = [rest[0], rest[1]];
                    rest = &rest[2..];
                    let ack = if qos == 1 { 0x40 } else { 0x50 };
                    sub.write_all(&mqtt_packet(ack, &id)).unwrap();
                }
                println!(
                    "subscriber got {topic} at QoS {qos}: {}",
                    String::from_utf8_lossy(rest)
                );
                assert_eq!(qos, 2, "amqtt 0.12.1 forwards at the subscription's QoS");
                got.push((topic, rest.to_vec()));
            }
            6 => sub.write_all(&mqtt_packet(0x70, &body)).unwrap(), // PUBREL -> PUBCOMP
            _ => {}
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("amqtt/q1".to_string(), b"at-least-once".to_vec()),
            ("amqtt/q2".to_string(), b"exactly-once".to_vec()),
        ]
    );

    // MQTT 5 (what `SyncSubscriber` speaks): CONNACK 0x01, unacceptable protocol version.
    let mut v5 = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    v5.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let connect = [
        0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0, 0, 2, b'v', b'5',
    ];
    v5.write_all(&mqtt_packet(0x10, &connect)).unwrap();
    let reply = read_mqtt_packet(&mut v5).expect("reply to an MQTT 5 CONNECT");
    println!("reply to an MQTT 5 CONNECT: {reply:02x?}");
    assert_eq!(reply, (0x20, vec![0, 1]), "CONNACK 0x01 for MQTT 5");

    let _ = publ.write_all(&[0xe0, 0]);
    let _ = sub.write_all(&[0xe0, 0]);
    drop((publ, sub, v5));

    // Nothing of it survives the drop.
    let (dir, port) = (broker.dir.clone(), broker.port);
    let t = Instant::now();
    drop(broker);
    println!("dropped in {:.2} s", t.elapsed().as_secs_f64());
    assert!(!alive(pid), "amqtt (pid {pid}) still running");
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on 127.0.0.1:{port}"
    );
}
