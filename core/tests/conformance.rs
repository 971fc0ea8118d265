//! Protocol conformance of the sink towards a broker that breaks the rules (review L10),
//! byte by byte: the test plays both the runtime and the broker.
// This test plays the runtime, which owns the clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

use std::time::Instant;

use mqtt_sink_core::{Config, ConnectFailure, Event, LostReason, MqttVersion, Sink};

fn sink(version: MqttVersion, clean_session: bool) -> (Sink, Instant) {
    let mut cfg = Config::new("conf", "localhost", 1883, "t");
    cfg.version = version;
    cfg.clean_session = clean_session;
    cfg.tls_enabled = false;
    let now = Instant::now();
    let mut sink = Sink::with_config(cfg, now).unwrap();
    while sink.poll_event().is_some() {}
    sink.handle_connected(now);
    let mut out = Vec::new();
    while sink.poll_transmit(now, &mut out) {}
    sink.handle_written(now, out.len());
    (sink, now)
}

fn events(sink: &mut Sink) -> Vec<Event> {
    std::iter::from_fn(|| sink.poll_event()).collect()
}

/// [MQTT-3.2.2-1], [MQTT-3.2.2-2]: a CONNACK that says "session present" to a CONNECT
/// that asked for a clean session is a protocol error; the sink used to believe it and
/// resend as if the broker had its session.
#[test]
fn session_present_after_a_clean_connect_is_refused() {
    for version in [MqttVersion::V31, MqttVersion::V311] {
        let (mut sink, now) = sink(version, true);
        let err = sink
            .handle_input(now, &[0x20, 0x02, 0x01, 0x00])
            .unwrap_err();
        assert!(err.0.contains("session present"), "{version:?}: {err:?}");
        let failed = events(&mut sink).into_iter().any(|e| {
            matches!(e, Event::ConnectFailed(ConnectFailure::Protocol(m)) if m.contains("clean"))
        });
        assert!(failed, "{version:?}");
        assert!(!sink.is_connected());
    }
}

/// A packet that cannot be decoded is malformed: MQTT 5 says so with DISCONNECT 0x81
/// (it used to say 0x82, protocol error, which is for well-formed packets out of place).
#[test]
fn a_malformed_packet_is_answered_with_0x81_and_a_misplaced_one_with_0x82() {
    for (packet, code) in [
        (&[0x41u8, 0x02, 0x00, 0x01][..], 0x81u8), // PUBACK with flags
        (&[0x20, 0x03, 0x00, 0x00, 0x00][..], 0x82), // a second CONNACK
    ] {
        let (mut sink, now) = sink(MqttVersion::V5, false);
        sink.handle_input(now, &[0x20, 0x03, 0x00, 0x00, 0x00])
            .unwrap();
        assert!(sink.is_connected());
        let _ = events(&mut sink);
        assert!(sink.handle_input(now, packet).is_err());
        let mut out = Vec::new();
        while sink.poll_transmit(now, &mut out) {}
        assert_eq!(out, [0xE0, 0x02, code, 0x00], "{packet:02x?}");
        let lost = events(&mut sink)
            .into_iter()
            .any(|e| matches!(e, Event::ConnectionLost(LostReason::Protocol(_))));
        assert!(lost, "{packet:02x?}");
    }
}
