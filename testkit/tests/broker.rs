//! Scenario and property tests of `SimBroker`. Client packets are encoded with rumqttc (the
//! MQTT 3.1 CONNECT by hand); broker replies are decoded with rumqttc.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mqtt_sink_testkit::broker::{BrokerError, BrokerKnobs, Delivered, Received, SimBroker};
use proptest::prelude::*;
use rumqttc::mqttbytes::{v4, QoS};
use rumqttc::v5::mqttbytes::{v5 as m5, QoS as QoS5};

// ---- client packets ----

fn v4_connect(id: &str, clean: bool, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut c = v4::Connect::new(id);
    c.clean_session = clean;
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    b.to_vec()
}

fn v5_connect(id: &str, clean: bool, expiry: Option<u32>, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut props = m5::ConnectProperties::new();
    props.session_expiry_interval = expiry;
    props.receive_maximum = Some(100);
    let c = m5::Connect {
        keep_alive: 30,
        client_id: id.to_owned(),
        clean_start: clean,
        properties: Some(props),
    };
    let login = login.map(|(u, p)| m5::Login::new(u, p));
    let mut b = BytesMut::new();
    m5::Packet::Connect(c, None, login)
        .write(&mut b, None)
        .unwrap();
    b.to_vec()
}

/// MQTT 3.1 CONNECT: rumqttc cannot write protocol name "MQIsdp".
fn v31_connect(id: &str, clean: bool, login: Option<(&str, &str)>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQIsdp");
    let flags = u8::from(clean) << 1 | if login.is_some() { 0xC0 } else { 0 };
    body.extend_from_slice(&[3, flags, 0, 60]);
    string(&mut body, id);
    if let Some((u, p)) = login {
        string(&mut body, u);
        string(&mut body, p);
    }
    let mut out = vec![0x10, u8::try_from(body.len()).unwrap()];
    out.extend_from_slice(&body);
    out
}

fn v4_pub(topic: &str, qos: u8, pkid: u16, dup: bool) -> Vec<u8> {
    let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(qos)];
    let mut p = v4::Publish::new(topic, qos, format!("payload-{pkid}"));
    p.pkid = pkid;
    p.dup = dup;
    let mut b = BytesMut::new();
    p.write(&mut b).unwrap();
    b.to_vec()
}

fn v5_pub_with(topic: &str, qos: u8, pkid: u16, props: Option<m5::PublishProperties>) -> Vec<u8> {
    let qos = [QoS5::AtMostOnce, QoS5::AtLeastOnce, QoS5::ExactlyOnce][usize::from(qos)];
    let mut p = m5::Publish::new(topic, qos, format!("payload-{pkid}"), props);
    p.pkid = pkid;
    let mut b = BytesMut::new();
    p.write(&mut b).unwrap();
    b.to_vec()
}

fn v5_pub(topic: &str, qos: u8, pkid: u16) -> Vec<u8> {
    v5_pub_with(topic, qos, pkid, None)
}

fn v5_pub_dup(topic: &str, qos: u8, pkid: u16) -> Vec<u8> {
    let mut b = v5_pub(topic, qos, pkid);
    b[0] |= 0x08;
    b
}

fn v4_pubrel(pkid: u16) -> Vec<u8> {
    let mut b = BytesMut::new();
    v4::PubRel::new(pkid).write(&mut b).unwrap();
    b.to_vec()
}

fn v5_pubrel(pkid: u16) -> Vec<u8> {
    let mut b = BytesMut::new();
    m5::PubRel::new(pkid, None).write(&mut b).unwrap();
    b.to_vec()
}

// ---- broker replies ----

fn v4_packets(bytes: &[u8]) -> Vec<v4::Packet> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(v4::Packet::read(&mut buf, 1 << 20).unwrap());
    }
    out
}

fn v5_packets(bytes: &[u8]) -> Vec<m5::Packet> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(m5::Packet::read(&mut buf, None).unwrap());
    }
    out
}

/// A broker plus a simulated clock.
struct Sim {
    broker: SimBroker,
    now: Instant,
}

impl Sim {
    fn new(seed: u64, knobs: BrokerKnobs) -> Self {
        let mut broker = SimBroker::new(seed, knobs);
        let now = Instant::now();
        broker.handle_connect(now);
        Self { broker, now }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), BrokerError> {
        self.broker.handle_input(self.now, bytes)
    }

    /// Everything due now.
    fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = self.broker.poll_transmit(self.now) {
            out.extend(b);
        }
        out
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn reconnect(&mut self) {
        self.broker.handle_disconnect(self.now);
        self.broker.handle_connect(self.now);
    }
}

fn connected_v4(knobs: BrokerKnobs, clean: bool) -> Sim {
    let mut sim = Sim::new(1, knobs);
    sim.send(&v4_connect("c1", clean, None)).unwrap();
    assert_eq!(sim.drain(), [0x20, 2, 0, 0]);
    sim
}

fn connected_v5(knobs: BrokerKnobs) -> Sim {
    let mut sim = Sim::new(1, knobs);
    sim.send(&v5_connect("c5", false, Some(3600), None))
        .unwrap();
    let packets = v5_packets(&sim.drain());
    assert!(
        matches!(&packets[..], [m5::Packet::ConnAck(a)] if a.code == m5::ConnectReturnCode::Success)
    );
    sim
}

// ---- CONNECT ----

#[test]
fn mqtt31_connect_is_accepted_and_then_speaks_v4() {
    let mut sim = Sim::new(1, BrokerKnobs::default());
    sim.send(&v31_connect("old", true, Some(("u", "p"))))
        .unwrap();
    assert_eq!(sim.drain(), [0x20, 2, 0, 0]);
    let c = &sim.broker.connects()[0];
    assert_eq!((c.protocol_level, c.protocol_name.as_str()), (3, "MQIsdp"));
    assert_eq!(
        (c.client_id.as_str(), c.clean, c.keep_alive),
        ("old", true, 60)
    );
    assert_eq!(
        (c.username.as_deref(), c.password.as_deref()),
        (Some("u"), Some("p"))
    );
    assert!(c.accepted && sim.broker.is_connected());

    sim.send(&v4_pub("a/b", 1, 9, false)).unwrap();
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubAck(v4::PubAck::new(9))]
    );
    assert_eq!(sim.broker.delivered().len(), 1);
}

#[test]
fn mqtt311_connect_is_accepted() {
    let mut sim = Sim::new(1, BrokerKnobs::default());
    sim.send(&v4_connect("c1", true, Some(("user", "pw"))))
        .unwrap();
    let connack = v4::ConnAck::new(v4::ConnectReturnCode::Success, false);
    assert_eq!(v4_packets(&sim.drain()), [v4::Packet::ConnAck(connack)]);
    let c = &sim.broker.connects()[0];
    assert_eq!((c.protocol_level, c.protocol_name.as_str()), (4, "MQTT"));
    assert_eq!(c.username.as_deref(), Some("user"));
    assert!(sim.broker.is_connected() && !sim.broker.wants_close());
}

#[test]
fn mqtt5_connect_advertises_the_knobs_and_assigns_an_id() {
    let knobs = BrokerKnobs {
        receive_maximum: Some(10),
        max_packet_size: Some(1000),
        topic_alias_maximum: Some(5),
        maximum_qos: Some(1),
        retain_available: Some(false),
        server_keep_alive: Some(20),
        ..BrokerKnobs::default()
    };
    let mut sim = Sim::new(1, knobs);
    sim.send(&v5_connect("", true, Some(60), None)).unwrap();
    let [m5::Packet::ConnAck(ack)] = &v5_packets(&sim.drain())[..] else {
        panic!("no CONNACK")
    };
    assert_eq!(
        (ack.code, ack.session_present),
        (m5::ConnectReturnCode::Success, false)
    );
    let p = ack.properties.as_ref().unwrap();
    assert_eq!(
        (p.receive_max, p.max_packet_size, p.topic_alias_max),
        (Some(10), Some(1000), Some(5))
    );
    assert_eq!(
        (p.max_qos, p.retain_available, p.server_keep_alive),
        (Some(1), Some(0), Some(20))
    );
    assert_eq!(p.assigned_client_identifier.as_deref(), Some("sim-1"));
    let c = &sim.broker.connects()[0];
    assert_eq!(
        (c.protocol_level, c.session_expiry, c.receive_maximum),
        (5, Some(60), Some(100))
    );
    assert_eq!(c.assigned_client_id.as_deref(), Some("sim-1"));
}

#[test]
fn refused_connects_then_accepted() {
    let knobs = BrokerKnobs {
        refuse_connects: 2,
        refusal_code: 4,
        ..BrokerKnobs::default()
    };
    let mut sim = Sim::new(1, knobs);
    for _ in 0..2 {
        sim.send(&v4_connect("c1", true, None)).unwrap();
        let refused = v4::ConnAck::new(v4::ConnectReturnCode::BadUserNamePassword, false);
        assert_eq!(v4_packets(&sim.drain()), [v4::Packet::ConnAck(refused)]);
        assert!(sim.broker.wants_close() && !sim.broker.is_connected());
        sim.reconnect();
    }
    sim.send(&v4_connect("c1", true, None)).unwrap();
    assert_eq!(sim.drain(), [0x20, 2, 0, 0]);
    let accepted: Vec<_> = sim
        .broker
        .connects()
        .iter()
        .map(|c| (c.accepted, c.return_code))
        .collect();
    assert_eq!(accepted, [(false, 4), (false, 4), (true, 0)]);
}

#[test]
fn refusal_code_zero_means_not_authorized() {
    let knobs = BrokerKnobs {
        refuse_connects: 1,
        ..BrokerKnobs::default()
    };
    let mut sim = Sim::new(1, knobs.clone());
    sim.send(&v4_connect("c1", true, None)).unwrap();
    assert_eq!(sim.drain(), [0x20, 2, 0, 5]);
    let mut sim = Sim::new(1, knobs);
    sim.send(&v5_connect("c1", true, None, None)).unwrap();
    let [m5::Packet::ConnAck(ack)] = &v5_packets(&sim.drain())[..] else {
        panic!("no CONNACK")
    };
    assert_eq!(ack.code, m5::ConnectReturnCode::NotAuthorized);
}

#[test]
fn required_password_refuses_others_with_0x86_on_v5() {
    let knobs = BrokerKnobs {
        require_password: Some(("me".into(), "secret".into())),
        ..BrokerKnobs::default()
    };
    let mut sim = Sim::new(1, knobs);
    sim.send(&v5_connect("c1", true, None, Some(("me", "wrong"))))
        .unwrap();
    let out = sim.drain();
    assert_eq!(out, [0x20, 3, 0, 0x86, 0]);
    let [m5::Packet::ConnAck(ack)] = &v5_packets(&out)[..] else {
        panic!("no CONNACK")
    };
    assert_eq!(ack.code, m5::ConnectReturnCode::BadUserNamePassword);
    assert!(sim.broker.wants_close());
    sim.reconnect();
    sim.send(&v5_connect("c1", true, None, Some(("me", "secret"))))
        .unwrap();
    sim.drain();
    assert!(sim.broker.is_connected());
    assert_eq!(sim.broker.connects()[0].password.as_deref(), Some("wrong"));
}

// ---- PUBLISH flows ----

#[test]
fn qos1_publish_gets_a_puback_v4_and_v5() {
    let mut sim = connected_v4(BrokerKnobs::default(), true);
    sim.send(&v4_pub("a/b", 1, 7, false)).unwrap();
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubAck(v4::PubAck::new(7))]
    );
    let d = &sim.broker.delivered()[0];
    assert_eq!(
        (d.topic.as_str(), d.qos, &d.payload[..]),
        ("a/b", 1, &b"payload-7"[..])
    );

    let mut sim = connected_v5(BrokerKnobs::default());
    let props = m5::PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        message_expiry_interval: Some(30),
        ..Default::default()
    };
    sim.send(&v5_pub_with("a/b", 1, 8, Some(props))).unwrap();
    assert_eq!(
        v5_packets(&sim.drain()),
        [m5::Packet::PubAck(m5::PubAck::new(8, None))]
    );
    let r = &sim.broker.received()[0];
    assert_eq!((r.pkid, r.dup, r.client_id.as_str()), (8, false, "c5"));
    assert_eq!(
        r.properties.user_properties,
        [("k".to_owned(), "v".to_owned())]
    );
    assert_eq!(r.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        sim.broker.delivered()[0].properties.message_expiry_interval,
        Some(30)
    );
}

#[test]
fn qos0_gets_no_reply_and_pings_are_answered_unless_disabled() {
    let mut sim = connected_v4(BrokerKnobs::default(), true);
    sim.send(&v4_pub("a", 0, 0, false)).unwrap();
    sim.send(&[0xC0, 0]).unwrap();
    assert_eq!(sim.drain(), [0xD0, 0]);
    sim.broker.knobs_mut().answer_pings = false;
    sim.send(&[0xC0, 0]).unwrap();
    assert!(sim.drain().is_empty());
    assert_eq!(sim.broker.delivered().len(), 1);
}

#[test]
fn v5_reason_codes_per_topic() {
    let knobs = BrokerKnobs {
        topic_reason_codes: [("denied", 0x87), ("nobody", 0x10), ("odd", 0x9F)]
            .into_iter()
            .map(|(t, c)| (t.to_owned(), c))
            .collect(),
        ..BrokerKnobs::default()
    };
    let mut sim = connected_v5(knobs);
    sim.send(&v5_pub("denied", 1, 1)).unwrap();
    sim.send(&v5_pub("nobody", 1, 2)).unwrap();
    let packets = v5_packets(&sim.drain());
    let reasons: Vec<_> = packets
        .iter()
        .map(|p| match p {
            m5::Packet::PubAck(a) => (a.pkid, a.reason),
            p => panic!("unexpected {p:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (1, m5::PubAckReason::NotAuthorized),
            (2, m5::PubAckReason::NoMatchingSubscribers)
        ]
    );
    sim.send(&v5_pub("odd", 1, 3)).unwrap();
    assert_eq!(sim.drain(), [0x40, 4, 0, 3, 0x9F, 0]);

    // QoS 2 rejected: PUBREC carries the code and the flow ends there.
    sim.send(&v5_pub("denied", 2, 4)).unwrap();
    let [m5::Packet::PubRec(rec)] = &v5_packets(&sim.drain())[..] else {
        panic!("no PUBREC")
    };
    assert_eq!((rec.pkid, rec.reason), (4, m5::PubRecReason::NotAuthorized));
    sim.send(&v5_pubrel(4)).unwrap();
    let [m5::Packet::PubComp(comp)] = &v5_packets(&sim.drain())[..] else {
        panic!("no PUBCOMP")
    };
    assert_eq!(comp.reason, m5::PubCompReason::PacketIdentifierNotFound);
    assert!(sim.broker.violations()[0].contains("PUBREL for unknown pkid 4"));

    let delivered: Vec<_> = sim
        .broker
        .delivered()
        .iter()
        .map(|d| d.topic.as_str())
        .collect();
    assert_eq!(delivered, ["nobody"]);
    assert_eq!(sim.broker.received().len(), 4);
}

#[test]
fn qos2_flow_and_dedup_of_a_dup_resend_after_reconnect_with_a_kept_session() {
    let mut sim = connected_v4(BrokerKnobs::default(), false);
    sim.send(&v4_pub("t", 2, 5, false)).unwrap();
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubRec(v4::PubRec::new(5))]
    );

    // Connection drops before the PUBREL; the client resends the PUBLISH with DUP.
    sim.reconnect();
    sim.send(&v4_connect("c1", false, None)).unwrap();
    assert_eq!(sim.drain(), [0x20, 2, 1, 0], "session present");
    sim.send(&v4_pub("t", 2, 5, true)).unwrap();
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubRec(v4::PubRec::new(5))]
    );
    sim.send(&v4_pubrel(5)).unwrap();
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubComp(v4::PubComp::new(5))]
    );
    assert_eq!(
        (sim.broker.received().len(), sim.broker.delivered().len()),
        (2, 1)
    );

    // The PUBCOMP for 6 never leaves (connection drops): a resent PUBREL still completes.
    sim.send(&v4_pub("t", 2, 6, false)).unwrap();
    sim.drain();
    sim.send(&v4_pubrel(6)).unwrap();
    sim.reconnect();
    sim.send(&v4_connect("c1", false, None)).unwrap();
    sim.drain();
    sim.send(&v4_pubrel(6)).unwrap();
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubComp(v4::PubComp::new(6))]
    );
    assert_eq!(sim.broker.delivered().len(), 2);
    assert_eq!(sim.broker.violations(), [] as [String; 0]);
}

#[test]
fn v5_session_needs_expiry_and_clean_start_discards_it() {
    let mut sim = connected_v5(BrokerKnobs::default());
    sim.send(&v5_pub("t", 2, 1)).unwrap();
    sim.drain();
    sim.reconnect();
    sim.send(&v5_connect("c5", false, Some(3600), None))
        .unwrap();
    let [m5::Packet::ConnAck(ack)] = &v5_packets(&sim.drain())[..] else {
        panic!("no CONNACK")
    };
    assert!(ack.session_present);
    sim.send(&v5_pub_dup("t", 2, 1)).unwrap();
    sim.drain();
    assert_eq!(sim.broker.delivered().len(), 1, "deduplicated");

    // This connection asks for expiry 0, so nothing is kept after it.
    sim.reconnect();
    sim.send(&v5_connect("c5", false, None, None)).unwrap();
    let [m5::Packet::ConnAck(ack)] = &v5_packets(&sim.drain())[..] else {
        panic!("no CONNACK")
    };
    assert!(
        ack.session_present,
        "the session kept from the previous connection"
    );
    sim.reconnect();
    sim.send(&v5_connect("c5", false, None, None)).unwrap();
    let [m5::Packet::ConnAck(ack)] = &v5_packets(&sim.drain())[..] else {
        panic!("no CONNACK")
    };
    assert!(
        !ack.session_present,
        "expiry 0 on the last connection dropped it"
    );
    // The DUP resend is now a new message.
    sim.send(&v5_pub_dup("t", 2, 1)).unwrap();
    sim.drain();
    assert_eq!(sim.broker.delivered().len(), 2);
}

#[test]
fn qos1_dup_resend_is_delivered_again_and_reuse_without_dup_is_noted() {
    let knobs = BrokerKnobs {
        ack_delay: Duration::from_secs(1),
        ..BrokerKnobs::default()
    };
    let mut sim = connected_v4(knobs, true);
    sim.send(&v4_pub("t", 1, 3, false)).unwrap();
    sim.send(&v4_pub("t", 1, 3, true)).unwrap();
    assert!(sim.broker.violations().is_empty());
    sim.send(&v4_pub("t", 1, 3, false)).unwrap();
    assert!(
        sim.broker.violations()[0].contains("PUBLISH pkid 3 reused while in flight without DUP")
    );
    assert!(!sim.broker.wants_close());
    assert_eq!(sim.broker.delivered().len(), 3);
}

#[test]
fn topic_alias_is_resolved() {
    let knobs = BrokerKnobs {
        topic_alias_maximum: Some(2),
        ..BrokerKnobs::default()
    };
    let mut sim = connected_v5(knobs);
    let alias = |a| {
        Some(m5::PublishProperties {
            topic_alias: Some(a),
            ..Default::default()
        })
    };
    sim.send(&v5_pub_with("long/topic", 1, 1, alias(1)))
        .unwrap();
    sim.send(&v5_pub_with("", 1, 2, alias(1))).unwrap();
    let topics: Vec<_> = sim
        .broker
        .delivered()
        .iter()
        .map(|d| d.topic.as_str())
        .collect();
    assert_eq!(topics, ["long/topic", "long/topic"]);
    assert!(sim.send(&v5_pub_with("x", 1, 3, alias(3))).is_err());
    sim.drain();
    assert!(sim.broker.violations()[0].contains("topic alias 3"));
}

// ---- violations ----

fn v5_disconnect_reason(out: &[u8]) -> m5::DisconnectReasonCode {
    match v5_packets(out).last() {
        Some(m5::Packet::Disconnect(d)) => d.reason_code,
        p => panic!("expected DISCONNECT, got {p:?}"),
    }
}

#[test]
fn receive_maximum_exceeded_disconnects_with_0x93() {
    let knobs = BrokerKnobs {
        receive_maximum: Some(2),
        ack_delay: Duration::from_millis(50),
        ..BrokerKnobs::default()
    };
    let mut sim = connected_v5(knobs);
    sim.send(&v5_pub("t", 1, 1)).unwrap();
    sim.send(&v5_pub("t", 2, 2)).unwrap();
    let err = sim.send(&v5_pub("t", 1, 3)).unwrap_err();
    assert!(matches!(err, BrokerError::Violation(_)), "{err}");
    let out = sim.drain();
    assert_eq!(
        out,
        [0xE0, 2, 0x93, 0],
        "pending acks dropped, DISCONNECT sent"
    );
    assert_eq!(
        v5_disconnect_reason(&out),
        m5::DisconnectReasonCode::ReceiveMaximumExceeded
    );
    assert!(sim.broker.wants_close());
    assert!(sim.broker.violations()[0].contains("receive maximum 2 exceeded"));
    assert_eq!(sim.broker.poll_timeout(), None);
}

#[test]
fn receive_maximum_respected_when_acks_are_drained() {
    let knobs = BrokerKnobs {
        receive_maximum: Some(1),
        ..BrokerKnobs::default()
    };
    let mut sim = connected_v5(knobs);
    for pkid in 1..=5 {
        sim.send(&v5_pub("t", 2, pkid)).unwrap();
        sim.drain();
        sim.send(&v5_pubrel(pkid)).unwrap();
        sim.drain();
    }
    assert!(sim.broker.violations().is_empty());
}

#[test]
fn fatal_violations_close_with_the_right_v5_reason() {
    type Case = (BrokerKnobs, Vec<u8>, m5::DisconnectReasonCode, &'static str);
    let cases: Vec<Case> = vec![
        (
            BrokerKnobs {
                max_packet_size: Some(20),
                ..BrokerKnobs::default()
            },
            v5_pub("a/long/topic/name", 1, 1),
            m5::DisconnectReasonCode::PacketTooLarge,
            "exceeds maximum packet size 20",
        ),
        (
            BrokerKnobs {
                retain_available: Some(false),
                ..BrokerKnobs::default()
            },
            {
                let mut b = v5_pub("t", 1, 1);
                b[0] |= 1;
                b
            },
            m5::DisconnectReasonCode::RetainNotSupported,
            "retained PUBLISH",
        ),
        (
            BrokerKnobs {
                maximum_qos: Some(1),
                ..BrokerKnobs::default()
            },
            v5_pub("t", 2, 1),
            m5::DisconnectReasonCode::QoSNotSupported,
            "above maximum QoS 1",
        ),
        (
            BrokerKnobs::default(),
            v5_pub("a/+", 1, 1),
            m5::DisconnectReasonCode::TopicNameInvalid,
            "wildcards",
        ),
        (
            BrokerKnobs::default(),
            v5_connect("again", true, None, None),
            m5::DisconnectReasonCode::ProtocolError,
            "second CONNECT",
        ),
        (
            BrokerKnobs::default(),
            vec![0x32, 5, 0, 1, b't', 0, 0],
            m5::DisconnectReasonCode::MalformedPacket,
            "packet id 0",
        ),
    ];
    for (knobs, bytes, reason, text) in cases {
        let mut sim = connected_v5(knobs);
        assert!(sim.send(&bytes).is_err(), "{text}");
        assert_eq!(v5_disconnect_reason(&sim.drain()), reason, "{text}");
        assert!(sim.broker.wants_close(), "{text}");
        assert!(
            sim.broker.violations()[0].contains(text),
            "{:?}",
            sim.broker.violations()
        );
        assert!(sim.broker.delivered().is_empty(), "{text}");
        // Bytes after the decision are ignored.
        assert!(sim.send(&v5_pub("t", 1, 9)).is_ok());
        assert!(sim.drain().is_empty());
    }
}

#[test]
fn v4_violations_just_close() {
    let knobs = BrokerKnobs {
        max_packet_size: Some(20),
        ..BrokerKnobs::default()
    };
    // MQTT 3.1.1 cannot announce a Maximum Packet Size: a larger packet makes the broker
    // hang up (as Mosquitto does), without counting it as the client's violation.
    let mut sim = connected_v4(knobs, true);
    assert!(sim.send(&v4_pub("a/long/topic/name", 1, 1, false)).is_ok());
    assert!(sim.drain().is_empty());
    assert!(sim.broker.wants_close());
    assert!(sim.broker.violations().is_empty());

    let mut sim = Sim::new(1, BrokerKnobs::default());
    assert!(sim.send(&v4_pub("t", 1, 1, false)).is_err());
    assert!(sim.broker.violations()[0].contains("PUBLISH before CONNECT"));
    assert!(sim.drain().is_empty());
}

// ---- DISCONNECT ----

#[test]
fn bodiless_v5_disconnect_is_accepted() {
    let mut sim = connected_v5(BrokerKnobs::default());
    sim.send(&[0xE0, 0]).unwrap();
    assert!(sim.broker.wants_close());
    assert!(sim.broker.violations().is_empty());
    assert!(sim.drain().is_empty());

    let mut sim = connected_v5(BrokerKnobs::default());
    sim.send(&[0xE0, 1, 0x04]).unwrap();
    assert!(sim.broker.wants_close() && sim.broker.violations().is_empty());
}

#[test]
fn server_initiated_disconnect() {
    let mut sim = connected_v5(BrokerKnobs::default());
    sim.broker.disconnect_client(sim.now, 0);
    assert_eq!(sim.drain(), [0xE0, 0]);
    assert!(sim.broker.wants_close());

    let mut sim = connected_v5(BrokerKnobs::default());
    sim.broker.disconnect_client(sim.now, 0x8B);
    let reason = v5_disconnect_reason(&sim.drain());
    assert_eq!(reason, m5::DisconnectReasonCode::ServerShuttingDown);

    let mut sim = connected_v4(BrokerKnobs::default(), true);
    sim.broker.disconnect_client(sim.now, 0x8B);
    assert!(sim.drain().is_empty());
    assert!(sim.broker.wants_close());
    sim.reconnect();
    assert!(!sim.broker.wants_close());
    assert_eq!(sim.broker.connection_index(), 2);
}

// ---- time, chunking, determinism ----

#[test]
fn ack_delay_is_respected() {
    let delay = Duration::from_millis(100);
    let mut sim = connected_v4(
        BrokerKnobs {
            ack_delay: delay,
            ..BrokerKnobs::default()
        },
        true,
    );
    let t0 = sim.now;
    sim.send(&v4_pub("t", 1, 1, false)).unwrap();
    sim.send(&[0xC0, 0]).unwrap();
    assert_eq!(sim.drain(), [0xD0, 0], "PINGRESP is not delayed");
    assert_eq!(sim.broker.poll_timeout(), Some(t0 + delay));
    sim.advance(Duration::from_millis(99));
    assert!(sim.drain().is_empty());
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        v4_packets(&sim.drain()),
        [v4::Packet::PubAck(v4::PubAck::new(1))]
    );
    assert_eq!(sim.broker.poll_timeout(), None);
}

/// Client bytes of a session exercising every packet kind.
fn script() -> Vec<Vec<u8>> {
    let mut s = vec![v5_connect("c5", false, Some(10), None)];
    for pkid in 1..=6 {
        s.push(v5_pub(
            &format!("t/{pkid}"),
            u8::try_from(pkid % 3).unwrap(),
            pkid,
        ));
    }
    s.push(v5_pubrel(2));
    s.push(vec![0xC0, 0]);
    s.push(v5_pubrel(5));
    s.push(vec![0xE0, 0]);
    s
}

/// Feeds `bytes` in the given chunk sizes, draining after each; returns everything observable.
fn run_chunked(bytes: &[u8], chunks: &[usize]) -> (Vec<u8>, String) {
    let mut sim = Sim::new(3, BrokerKnobs::default());
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        sim.send(chunk).unwrap();
        out.extend(sim.drain());
        rest = tail;
    }
    let b = &sim.broker;
    // Arrival numbers are process-wide (they order several brokers): not compared.
    let received: Vec<_> = b
        .received()
        .iter()
        .map(|r| Received {
            seq: 0,
            ..r.clone()
        })
        .collect();
    let delivered: Vec<_> = b
        .delivered()
        .iter()
        .map(|d| Delivered {
            seq: 0,
            ..d.clone()
        })
        .collect();
    let seen = format!(
        "{:?}{:?}{:?}{:?}",
        b.connects(),
        received,
        delivered,
        b.violations()
    );
    (out, seen)
}

#[test]
fn byte_by_byte_chunking_gives_the_same_result_as_one_chunk() {
    let bytes = script().concat();
    let whole = run_chunked(&bytes, &[bytes.len()]);
    assert_eq!(run_chunked(&bytes, &[1]), whole);
    let packets = v5_packets(&whole.0);
    assert_eq!(
        packets.len(),
        1 + 4 + 2 + 1,
        "CONNACK, 4 PUBACK/PUBREC, 2 PUBCOMP, PINGRESP"
    );
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_result(chunks in prop::collection::vec(1usize..40, 1..20)) {
        let bytes = script().concat();
        prop_assert_eq!(run_chunked(&bytes, &chunks), run_chunked(&bytes, &[bytes.len()]));
    }
}

fn lossy_run(seed: u64) -> Vec<u8> {
    let knobs = BrokerKnobs {
        ack_loss: 0.3,
        reorder_acks: true,
        ack_delay: Duration::from_millis(10),
        ..BrokerKnobs::default()
    };
    let mut sim = Sim::new(seed, knobs);
    sim.send(&v4_connect("c1", true, None)).unwrap();
    let mut out = sim.drain();
    for pkid in 1..=40 {
        sim.send(&v4_pub("t", 1, pkid, false)).unwrap();
    }
    sim.advance(Duration::from_millis(10));
    out.extend(sim.drain());
    out
}

#[test]
fn same_seed_same_output_with_loss_and_reorder() {
    let a = lossy_run(7);
    assert_eq!(a, lossy_run(7));
    assert_ne!(a, lossy_run(8));
    let acked: Vec<u16> = v4_packets(&a[4..])
        .into_iter()
        .map(|p| match p {
            v4::Packet::PubAck(a) => a.pkid,
            p => panic!("unexpected {p:?}"),
        })
        .collect();
    assert!(
        acked.len() < 40 && acked.len() > 10,
        "some lost: {}",
        acked.len()
    );
    assert!(
        acked.windows(2).any(|w| w[0] > w[1]),
        "reordered: {acked:?}"
    );
}

#[test]
fn payloads_are_kept_as_bytes() {
    let mut sim = connected_v4(BrokerKnobs::default(), true);
    sim.send(&v4_pub("t", 0, 0, false)).unwrap();
    assert_eq!(
        sim.broker.received()[0].payload,
        Bytes::from_static(b"payload-0")
    );
}
