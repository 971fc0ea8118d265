//! Scenario tests: each behaviour of the core, on the simulated broker, link and clock.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_core::{
    ConnectFailure, ErrorPolicy, Event, LostReason, MqttVersion, PublishProperties, PushError,
    Record, RecordMapper, RejectReason, TopicPartition,
};
use mqtt_sink_testkit::broker::BrokerKnobs;
use mqtt_sink_testkit::checker::{check, Expected};
use mqtt_sink_testkit::sim::{record, test_config, Harness, LinkKnobs};

const VERSIONS: [MqttVersion; 3] = [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5];

fn harness(version: MqttVersion, qos: u8, knobs: BrokerKnobs) -> Harness {
    Harness::new(test_config(version, qos), knobs, LinkKnobs::default(), 1)
}

fn assert_no_violations(h: &Harness) {
    assert!(
        h.broker.violations().is_empty(),
        "{:?}",
        h.broker.violations()
    );
}

fn connected(h: &mut Harness) {
    assert!(
        h.run_until(Duration::from_secs(30), |h| h.sink.is_connected()),
        "never connected: {:?}",
        h.transcript
    );
}

fn expected(records: &[Record]) -> Vec<Expected> {
    records
        .iter()
        .map(|r| Expected {
            topic: format!(
                "sensors/{}",
                std::str::from_utf8(r.key.as_ref().unwrap()).unwrap()
            ),
            payload: r.value.clone().unwrap(),
        })
        .collect()
}

/// What the broker received: (topic, payload, retain), in order.
fn delivered_with_retain(h: &Harness) -> Vec<(String, Bytes, bool)> {
    h.broker
        .delivered()
        .iter()
        .map(|p| (p.topic.clone(), p.payload.clone(), p.retain))
        .collect()
}

fn records(n: i64, partitions: i32) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let p = (i % i64::from(partitions)) as i32;
            record(
                "readings",
                p,
                i / i64::from(partitions),
                &format!("k{}", i % 7),
                &format!("v{i}"),
            )
        })
        .collect()
}

/// The sink's rejections so far, as it states them.
fn rejections(h: &Harness) -> Vec<String> {
    h.events
        .iter()
        .filter(|(_, e)| matches!(e, Event::RecordRejected { .. }))
        .map(|(_, e)| e.to_string())
        .collect()
}

fn delivered(h: &Harness) -> Vec<(String, Bytes)> {
    h.broker
        .delivered()
        .iter()
        .map(|d| (d.topic.clone(), d.payload.clone()))
        .collect()
}

#[test]
fn every_version_and_qos_delivers_and_commits_end_offsets() {
    for version in VERSIONS {
        for qos in 0..=2u8 {
            let mut h = harness(version, qos, BrokerKnobs::default());
            connected(&mut h);
            let recs = records(60, 3);
            for r in recs.clone() {
                h.push(r).unwrap();
            }
            let outcome = h.flush();
            let Event::FlushCompleted { offsets } = outcome else {
                panic!("{version} qos {qos}: {outcome:?}");
            };
            let want: Vec<_> = (0..3)
                .map(|p| (TopicPartition::new("readings", p), 20))
                .collect();
            assert_eq!(offsets, want, "{version} qos {qos}");
            let report = check(&expected(&recs), &delivered(&h), false).unwrap();
            assert_eq!(report.arrived, 60);
            let c = &h.broker.connects()[0];
            let (level, name) = match version {
                MqttVersion::V31 => (3, "MQIsdp"),
                MqttVersion::V311 => (4, "MQTT"),
                _ => (5, "MQTT"),
            };
            assert_eq!((c.protocol_level, c.protocol_name.as_str()), (level, name));
            assert!(h.broker.received().iter().all(|r| r.qos == qos));
            assert_no_violations(&h);
        }
    }
}

#[test]
fn connected_is_reported_only_after_connack_and_refusals_back_off() {
    for (version, code) in [(MqttVersion::V311, 5u8), (MqttVersion::V5, 0x87)] {
        let knobs = BrokerKnobs {
            refuse_connects: 2,
            refusal_code: code,
            ..BrokerKnobs::default()
        };
        let mut h = harness(version, 1, knobs);
        connected(&mut h);
        let kinds: Vec<_> = h
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::ConnectFailed(ConnectFailure::Refused { code, .. }) => Some((*t, *code)),
                Event::Connected(_) => Some((*t, 0)),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds.iter().map(|k| k.1).collect::<Vec<_>>(),
            vec![code, code, 0]
        );
        // Backoff: min 50 ms doubling with equal jitter, so at least 25 ms then 50 ms.
        assert!(kinds[1].0 - kinds[0].0 >= Duration::from_millis(25));
        assert!(kinds[2].0 - kinds[1].0 >= Duration::from_millis(50));
        let accepted: Vec<_> = h.broker.connects().iter().map(|c| c.accepted).collect();
        assert_eq!(accepted, vec![false, false, true]);
    }
}

#[test]
fn bad_password_fails_every_attempt_and_never_connects() {
    for version in VERSIONS {
        let mut cfg = test_config(version, 1);
        cfg.username = Some("user".into());
        cfg.password = Some(mqtt_sink_core::Secret::new("wrong"));
        let knobs = BrokerKnobs {
            require_password: Some(("user".into(), "right".into())),
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 3);
        h.run_for(Duration::from_secs(10));
        assert!(!h.sink.is_connected());
        assert_eq!(h.count_events(|e| matches!(e, Event::Connected(_))), 0);
        let want = if version == MqttVersion::V5 { 0x86 } else { 4 };
        let refusals = h.count_events(|e| {
            matches!(e, Event::ConnectFailed(ConnectFailure::Refused { code, .. }) if *code == want)
        });
        assert!(refusals >= 3, "{version}: {refusals} refusals");
        let text = h
            .events
            .iter()
            .find_map(|(_, e)| matches!(e, Event::ConnectFailed(_)).then(|| e.to_string()))
            .unwrap();
        assert!(text.contains("bad user name or password"), "{text}");
        assert!(!text.contains("wrong"), "the password leaked: {text}");
    }
}

fn rejecting_broker() -> BrokerKnobs {
    BrokerKnobs {
        topic_reason_codes: BTreeMap::from([
            ("sensors/denied".to_string(), 0x87u8),
            ("sensors/lonely".to_string(), 0x10u8),
        ]),
        ..BrokerKnobs::default()
    }
}

fn push_with_denied(h: &mut Harness) -> TopicPartition {
    let tp = TopicPartition::new("readings", 0);
    for (off, key) in [(0, "a"), (1, "lonely"), (2, "denied"), (3, "b")] {
        h.push(record("readings", 0, off, key, &format!("v{off}")))
            .unwrap();
    }
    tp
}

#[test]
fn v5_reason_codes_reject_records_per_policy() {
    for qos in [1u8, 2] {
        // fail: the flush fails at the denied record, and nothing past it is committed.
        let mut h = harness(MqttVersion::V5, qos, rejecting_broker());
        connected(&mut h);
        let tp = push_with_denied(&mut h);
        match h.flush() {
            Event::FlushFailed {
                coords,
                reason,
                offsets,
            } => {
                assert_eq!((coords.tp.clone(), coords.offset), (tp.clone(), 2));
                assert_eq!(reason, RejectReason::Broker { code: 0x87 });
                assert_eq!(offsets, vec![(tp.clone(), 2)]);
                assert!(reason.to_string().contains("not authorized"));
            }
            other => panic!("qos {qos}: {other:?}"),
        }
        assert_eq!(h.committed_of(&tp), Some(2));
        // 0x10 "no matching subscribers" counted as success.
        assert!(h
            .broker
            .delivered()
            .iter()
            .any(|d| d.topic == "sensors/lonely"));

        // skip: the offset passes.
        let mut cfg = test_config(MqttVersion::V5, qos);
        cfg.error_policy = ErrorPolicy::Skip;
        let mut h = Harness::new(cfg, rejecting_broker(), LinkKnobs::default(), 1);
        connected(&mut h);
        let tp = push_with_denied(&mut h);
        assert_eq!(
            h.flush(),
            Event::FlushCompleted {
                offsets: vec![(tp.clone(), 4)]
            }
        );
        assert_eq!(
            h.count_events(|e| matches!(
                e,
                Event::RecordRejected {
                    policy: ErrorPolicy::Skip,
                    ..
                }
            )),
            1
        );

        // dead-letter: the record goes to the runtime, the offset passes once confirmed.
        let mut cfg = test_config(MqttVersion::V5, qos);
        cfg.error_policy = ErrorPolicy::DeadLetter;
        cfg.dead_letter_topic = Some("readings-dlq".into());
        let mut h = Harness::new(cfg, rejecting_broker(), LinkKnobs::default(), 1);
        connected(&mut h);
        let tp = push_with_denied(&mut h);
        assert_eq!(
            h.flush(),
            Event::FlushCompleted {
                offsets: vec![(tp, 4)]
            }
        );
        assert_eq!(h.dead_letters.len(), 1);
        assert_eq!(h.dead_letters[0].offset, 2);
        assert_eq!(h.dead_letters[0].value.as_deref(), Some(&b"v2"[..]));
    }
}

#[test]
fn oversized_records_are_rejected_once_before_sending() {
    // The broker's MQTT 5 Maximum Packet Size.
    let knobs = BrokerKnobs {
        max_packet_size: Some(200),
        ..BrokerKnobs::default()
    };
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.error_policy = ErrorPolicy::Skip;
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    h.push(record("readings", 0, 0, "a", "small")).unwrap();
    h.push(record("readings", 0, 1, "a", &"x".repeat(500)))
        .unwrap();
    h.push(record("readings", 0, 2, "a", "small too")).unwrap();
    let tp = TopicPartition::new("readings", 0);
    assert_eq!(
        h.flush(),
        Event::FlushCompleted {
            offsets: vec![(tp.clone(), 3)]
        }
    );
    h.run_for(Duration::from_secs(60));
    let rejected: Vec<_> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RecordRejected { coords, reason, .. } => Some((coords.offset, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejected,
        vec![(
            1,
            RejectReason::PacketTooLarge {
                size: 517,
                limit: 200,
                by_broker: true
            }
        )]
    );
    assert_eq!(
        h.broker.received().len(),
        2,
        "the large record was never sent"
    );
    assert!(h.broker.violations().is_empty());

    // The configured limit, any version: rejected at push.
    let mut cfg = test_config(MqttVersion::V311, 1);
    cfg.max_packet_size = 100;
    let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 1);
    connected(&mut h);
    h.push(record("readings", 0, 0, "a", &"x".repeat(200)))
        .unwrap();
    match h.flush() {
        Event::FlushFailed {
            reason:
                RejectReason::PacketTooLarge {
                    by_broker: false,
                    limit: 100,
                    ..
                },
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert!(h.broker.received().is_empty());
}

#[test]
fn window_is_min_of_config_and_receive_maximum() {
    let knobs = BrokerKnobs {
        receive_maximum: Some(3),
        ack_delay: Duration::from_millis(100),
        ..BrokerKnobs::default()
    };
    let mut h = harness(MqttVersion::V5, 1, knobs);
    connected(&mut h);
    let window = h.events.iter().find_map(|(_, e)| match e {
        Event::Connected(c) => Some(c.window),
        _ => None,
    });
    assert_eq!(window, Some(3));
    for r in records(30, 1) {
        h.push(r).unwrap();
        assert!(h.sink.stats().inflight <= 3);
    }
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert_no_violations(&h);
}

#[test]
fn keepalive_pings_and_a_missing_pingresp_loses_the_connection() {
    for version in VERSIONS {
        keepalive_case(version);
    }
}

fn keepalive_case(version: MqttVersion) {
    let mut h = harness(version, 1, BrokerKnobs::default());
    connected(&mut h);
    h.run_for(Duration::from_secs(100));
    assert!(h.sink.is_connected(), "pings answered: still connected");
    assert_eq!(h.broker.connects().len(), 1);

    let knobs = BrokerKnobs {
        answer_pings: false,
        ..BrokerKnobs::default()
    };
    let mut h = harness(version, 1, knobs);
    connected(&mut h);
    let t0 = h.elapsed();
    assert!(
        h.run_until(Duration::from_secs(60), |h| h.count_events(|e| matches!(
            e,
            Event::ConnectionLost(LostReason::PingTimeout)
        )) > 0)
    );
    // keepalive 30 s + ping_timeout 5 s (+ one link latency).
    let lost = h.elapsed() - t0;
    assert!(
        lost >= Duration::from_secs(35) && lost <= Duration::from_millis(35_010),
        "{lost:?}"
    );
    connected(&mut h);
    assert_eq!(h.broker.connects().len(), 2);
}

#[test]
fn server_disconnect_bodiless_or_with_reason_reconnects() {
    for code in [0u8, 0x8B] {
        let mut h = harness(MqttVersion::V5, 1, BrokerKnobs::default());
        connected(&mut h);
        let now = h.now;
        h.broker.disconnect_client(now, code);
        h.run_until(Duration::from_secs(1), |h| !h.sink.is_connected());
        let lost = h.events.iter().find_map(|(_, e)| match e {
            Event::ConnectionLost(LostReason::ServerDisconnect { code, .. }) => Some(*code),
            _ => None,
        });
        assert_eq!(lost, Some(code));
        assert!(h.protocol_errors.is_empty(), "{:?}", h.protocol_errors);
        connected(&mut h);
    }
}

/// Sends records with acks lost, cuts the link, and returns the harness reconnected.
fn lose_acks_then_cut(
    version: MqttVersion,
    qos: u8,
    keep_sessions: bool,
) -> (Harness, Vec<Record>) {
    let mut cfg = test_config(version, qos);
    cfg.clean_session = false;
    let knobs = BrokerKnobs {
        keep_sessions,
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 5);
    connected(&mut h);
    h.broker.knobs_mut().ack_loss = 1.0;
    let recs = records(10, 1);
    for r in recs.clone() {
        h.push(r).unwrap();
    }
    h.run_for(Duration::from_millis(100));
    assert_eq!(h.sink.stats().inflight, 10);
    h.broker.knobs_mut().ack_loss = 0.0;
    h.cut();
    connected(&mut h);
    (h, recs)
}

#[test]
fn resumed_session_resends_with_dup_same_ids_in_order() {
    for (version, qos) in VERSIONS.into_iter().flat_map(|v| [(v, 1), (v, 2)]) {
        let (mut h, recs) = lose_acks_then_cut(version, qos, true);
        assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
        let rx = h.broker.received();
        let (first, second): (Vec<_>, Vec<_>) =
            rx.iter().partition(|r| r.connection == rx[0].connection);
        assert_eq!(first.len(), 10);
        assert!(first.iter().all(|r| !r.dup));
        assert!(second.iter().all(|r| r.dup), "resent with DUP");
        let ids = |v: &[&mqtt_sink_testkit::broker::Received]| {
            v.iter()
                .map(|r| (r.pkid, r.payload.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&first), ids(&second), "same ids, same order");
        check(&expected(&recs), &delivered(&h), true).unwrap();
        assert!(h.sink.stats().resent >= 10);
    }
}

#[test]
fn lost_session_republishes_as_new_publishes_in_order() {
    for (version, qos) in VERSIONS.into_iter().flat_map(|v| [(v, 1), (v, 2)]) {
        lost_session_case(version, qos);
    }
}

fn lost_session_case(version: MqttVersion, qos: u8) {
    let (mut h, recs) = lose_acks_then_cut(version, qos, false);
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    let last = h.broker.received().last().unwrap().connection;
    let second: Vec<_> = h
        .broker
        .received()
        .iter()
        .filter(|r| r.connection == last)
        .collect();
    assert_eq!(second.len(), 10);
    assert!(second.iter().all(|r| !r.dup));
    let payloads: Vec<_> = second.iter().map(|r| r.payload.clone()).collect();
    let want: Vec<_> = recs.iter().map(|r| r.value.clone().unwrap()).collect();
    assert_eq!(payloads, want);
}

/// A QoS 2 publish whose PUBREC arrived and whose PUBREL was sent, cut before PUBCOMP, on
/// the sink's first connection (which is persistent: review M3).
fn released_then_cut(version: MqttVersion, keep_sessions: bool) -> Harness {
    let mut cfg = test_config(version, 2);
    cfg.clean_session = false;
    let knobs = BrokerKnobs {
        keep_sessions,
        ack_delay: Duration::from_millis(200),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 9);
    connected(&mut h);
    h.push(record("readings", 0, 0, "a", "once")).unwrap();
    // PUBLISH reaches the broker, PUBREC comes back, PUBREL reaches the broker; PUBCOMP is
    // still 200 ms away when the link is cut.
    assert!(h.run_until(Duration::from_secs(2), |h| h.broker.pubrels() == 1));
    assert_eq!(
        h.count_events(|e| matches!(e, Event::RecordAcknowledged(_))),
        0,
        "a QoS 2 record counts as delivered at PUBCOMP, not at PUBREC"
    );
    h.cut();
    connected(&mut h);
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert_eq!(
        h.count_events(|e| matches!(e, Event::RecordAcknowledged(_))),
        1
    );
    assert_eq!(h.sink.stats().inflight, 0, "PUBCOMP completed the flow");
    assert_no_violations(&h);
    h
}

/// Review M3: with `clean_session = false` the first connection is already persistent
/// (MQTT 3.1/3.1.1 used to send CleanSession=1 on it, so the broker dropped the session
/// with the first connection and the sink published the released message again: a QoS 2
/// duplicate after the first network failure of every process).
#[test]
fn qos2_resume_sends_pubrel_not_publish_and_delivers_once() {
    for version in VERSIONS {
        let h = released_then_cut(version, true);
        let connects = h.broker.connects();
        // MQTT 5: Clean Start with a Session Expiry persists too.
        let persistent = !connects[0].clean || connects[0].session_expiry.is_some_and(|e| e > 0);
        assert!(
            persistent && connects[1].session_present,
            "{version:?}: {connects:?}"
        );
        assert_eq!(
            h.broker.received().len(),
            1,
            "{version:?}: no PUBLISH resent after PUBREC"
        );
        assert_eq!(h.broker.pubrels(), 2, "{version:?}: PUBREL resent");
        assert_eq!(h.broker.delivered().len(), 1, "{version:?}");
    }
}

/// A broker that lost the session after PUBREC may have lost the message with it (as
/// Mosquitto does when killed between snapshots): the sink publishes it again. A duplicate
/// is possible; a loss is not.
#[test]
fn qos2_released_publish_is_republished_when_the_session_is_lost() {
    let h = released_then_cut(MqttVersion::V5, false);
    let rx = h.broker.received();
    assert_eq!(rx.len(), 2, "published again as a new publish");
    assert!(!rx[1].dup);
    assert_eq!(rx[0].payload, rx[1].payload);
}

#[test]
fn flush_times_out_at_its_deadline_and_rewinds_to_committed() {
    for (version, qos) in VERSIONS.into_iter().flat_map(|v| [(v, 1), (v, 2)]) {
        flush_timeout_case(version, qos);
    }
}

fn flush_timeout_case(version: MqttVersion, qos: u8) {
    let knobs = BrokerKnobs {
        ack_loss: 1.0,
        ..BrokerKnobs::default()
    };
    let mut h = harness(version, qos, knobs);
    connected(&mut h);
    let tp = TopicPartition::new("readings", 0);
    h.sink.assign(tp.clone(), Some(0));
    for r in records(5, 1) {
        h.push(r).unwrap();
    }
    let deadline = h.now + Duration::from_secs(3);
    let outcome = h.flush_with_deadline(deadline);
    assert_eq!(
        outcome,
        Event::FlushTimedOut {
            unacked: 5,
            offsets: vec![(tp.clone(), 0)]
        }
    );
    let at = h.events.iter().find(|(_, e)| *e == outcome).unwrap().0;
    assert_eq!(h.now, deadline, "fired at the deadline, not later ({at:?})");
    assert_eq!(h.sink.rewind(), vec![(tp.clone(), 0)]);
    // Pushing again from the rewind point is accepted.
    h.push(record("readings", 0, 0, "k", "again")).unwrap();
}

#[test]
fn a_full_buffer_returns_the_record() {
    let mut cfg = test_config(MqttVersion::V311, 1);
    cfg.max_buffered_records = 10;
    let knobs = BrokerKnobs {
        ack_loss: 1.0,
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    for r in records(10, 1) {
        h.sink.push_record(h.now, r).unwrap();
    }
    let r = record("readings", 0, 10, "k", "eleventh");
    match h.sink.push_record(h.now, r.clone()) {
        Err(PushError::Full(back)) => assert_eq!(back, r),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.sink.stats().buffered_records, 10);
}

/// While the window is nearly full, new publishes wait for an eighth of it to be free (one
/// write for many records, not one per acknowledgement) or for 1 ms, whichever is first;
/// meanwhile the sink tells the runtime that reading may wait as long.
#[test]
fn a_nearly_full_window_refills_in_batches() {
    for qos in [1, 2] {
        refill_case(qos);
    }
}

fn refill_case(qos: u8) {
    let mut cfg = test_config(MqttVersion::V311, qos);
    cfg.max_inflight = 80; // batches of 10
    let knobs = BrokerKnobs {
        ack_loss: 1.0, // the test acknowledges by hand
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    for r in records(200, 1) {
        h.sink.push_record(h.now, r).unwrap();
    }
    h.drain();
    assert_eq!(h.sink.stats().inflight, 80);
    // Packet ids are handed out in order from 1. QoS 2 completes with PUBREC + PUBCOMP.
    let ack = |h: &mut Harness, ids: std::ops::RangeInclusive<u16>| {
        for id in ids {
            let [hi, lo] = id.to_be_bytes();
            if qos == 2 {
                h.sink.handle_input(h.now, &[0x50, 2, hi, lo]).unwrap();
                h.drain();
                h.sink.handle_input(h.now, &[0x70, 2, hi, lo]).unwrap();
            } else {
                h.sink.handle_input(h.now, &[0x40, 2, hi, lo]).unwrap();
            }
            h.drain();
        }
    };
    ack(&mut h, 1..=9);
    assert_eq!(h.sink.stats().inflight, 71, "nine slots free: held");
    let until = h.sink.defer_input_until().expect("waiting for a batch");
    assert!(until > h.now && until <= h.now + Duration::from_millis(1));
    h.run_for(Duration::from_micros(500));
    assert_eq!(
        h.sink.stats().inflight,
        71,
        "still held before the deadline"
    );
    ack(&mut h, 10..=10);
    assert_eq!(
        h.sink.stats().inflight,
        80,
        "a batch of ten free: sent at once"
    );
    assert_eq!(h.sink.defer_input_until(), None);
    // A lone acknowledgement goes out when the wait ends, at 1 ms.
    ack(&mut h, 11..=11);
    assert_eq!(h.sink.stats().inflight, 79);
    let start = h.now;
    assert!(h.run_until(Duration::from_millis(5), |h| h.sink.stats().inflight == 80));
    assert!(
        h.now - start <= Duration::from_millis(1),
        "{:?}",
        h.now - start
    );
    assert_no_violations(&h);
}

/// Once full, the buffer takes records again only at its low watermark (three quarters),
/// not one acknowledgement later: a waiting producer is woken once per batch.
#[test]
fn a_full_buffer_takes_records_again_at_three_quarters() {
    let mut cfg = test_config(MqttVersion::V311, 1);
    cfg.max_buffered_records = 8;
    cfg.max_inflight = 1; // one acknowledgement at a time
    let knobs = BrokerKnobs {
        ack_delay: Duration::from_millis(10),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    let mut recs = records(20, 1).into_iter();
    for r in recs.by_ref().take(8) {
        h.sink.push_record(h.now, r).unwrap();
    }
    h.drain();
    let ninth = recs.next().unwrap();
    let back = match h.sink.push_record(h.now, ninth) {
        Err(PushError::Full(back)) => back,
        other => panic!("{other:?}"),
    };
    assert!(h.sink.is_full());
    // One acknowledged: 7 held, under the limit but above the watermark of 6.
    assert!(
        h.run_until(Duration::from_secs(5), |h| h.sink.stats().buffered_records
            == 7)
    );
    assert!(h.sink.is_full(), "woken after a single acknowledgement");
    let back = match h.sink.push_record(h.now, back) {
        Err(PushError::Full(back)) => back,
        other => panic!("{other:?}"),
    };
    assert!(
        h.run_until(Duration::from_secs(5), |h| h.sink.stats().buffered_records
            == 6)
    );
    assert!(!h.sink.is_full());
    // Room again, and up to the limit as before.
    h.sink.push_record(h.now, back).unwrap();
    h.sink.push_record(h.now, recs.next().unwrap()).unwrap();
    assert_eq!(h.sink.stats().buffered_records, 8);
    assert!(h.sink.is_full());
}

#[test]
fn bad_keys_and_topics_are_rejected_with_coordinates() {
    for (version, qos) in VERSIONS.into_iter().flat_map(|v| [(v, 0), (v, 1), (v, 2)]) {
        bad_keys_case(version, qos);
    }
}

fn bad_keys_case(version: MqttVersion, qos: u8) {
    let mut cfg = test_config(version, qos);
    cfg.error_policy = ErrorPolicy::Skip;
    let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 1);
    connected(&mut h);
    let tp = TopicPartition::new("readings", 4);
    let keys: [Option<&[u8]>; 6] = [
        None,
        Some(&[0xff, 0xfe]),
        Some(b"a+b"),
        Some(b"a/#"),
        Some(b"nul\0"),
        Some(b"fine"),
    ];
    for (off, key) in keys.into_iter().enumerate() {
        let r = Record::new(
            tp.clone(),
            off as i64,
            key.map(Bytes::copy_from_slice),
            Some("v"),
        );
        h.push(r).unwrap();
    }
    assert_eq!(
        h.flush(),
        Event::FlushCompleted {
            offsets: vec![(tp, 6)]
        }
    );
    let rejected = rejections(&h);
    assert_eq!(rejected.len(), 5, "{rejected:?}");
    for (i, text) in rejected.iter().enumerate() {
        assert!(text.contains(&format!("readings/4@{i}")), "{text}");
    }
    assert!(rejected[0].contains("no key"));
    assert!(rejected[1].contains("not UTF-8"));
    assert!(rejected[2].contains("wildcard '+'"));
    assert!(rejected[3].contains("wildcard '#'"));
    assert!(rejected[4].contains("NUL"));
    assert_eq!(h.broker.received().len(), 1);
}

#[test]
fn retain_and_properties_static_and_per_record() {
    // Static, from config.
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.retain = true;
    cfg.properties = Some(PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("source".into(), "kafka".into())],
        ..PublishProperties::default()
    });
    let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 1);
    connected(&mut h);
    h.push(record("readings", 0, 0, "a", "1")).unwrap();
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    let rx = &h.broker.received()[0];
    assert!(rx.retain);
    assert_eq!(
        rx.properties.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(
        rx.properties.user_properties,
        vec![("source".into(), "kafka".into())]
    );

    // Per record, from the whole record: retain from a header, properties from the
    // coordinates and key.
    let cfg = test_config(MqttVersion::V5, 1);
    let mapper = RecordMapper::from_config(&cfg)
        .retain_with(|r| r.headers.iter().any(|h| h.key == "retain"))
        .properties_with(|r| {
            Some(PublishProperties {
                user_properties: vec![
                    ("offset".into(), r.offset.to_string()),
                    (
                        "key".into(),
                        String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into(),
                    ),
                ],
                ..PublishProperties::default()
            })
        });
    let mut h = Harness::with_mapper(cfg, mapper, BrokerKnobs::default(), LinkKnobs::default(), 1);
    connected(&mut h);
    let mut r = record("readings", 0, 7, "dev", "1");
    r.headers.push(mqtt_sink_core::Header {
        key: "retain".into(),
        value: None,
    });
    h.push(r).unwrap();
    h.push(record("readings", 0, 8, "dev", "2")).unwrap();
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    let rx = h.broker.received();
    assert_eq!((rx[0].retain, rx[1].retain), (true, false));
    assert_eq!(
        rx[1].properties.user_properties,
        vec![("offset".into(), "8".into()), ("key".into(), "dev".into())]
    );
}

#[test]
fn v5_assigned_client_id_is_reused_on_reconnect() {
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.client_id = String::new();
    let knobs = BrokerKnobs {
        assigned_client_id: Some("broker-given".into()),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    h.cut();
    connected(&mut h);
    let ids: Vec<_> = h
        .broker
        .connects()
        .iter()
        .map(|c| c.client_id.clone())
        .collect();
    assert_eq!(ids, vec!["".to_string(), "broker-given".to_string()]);
}

#[test]
fn broker_limits_maximum_qos_and_retain_available() {
    let knobs = BrokerKnobs {
        maximum_qos: Some(0),
        ..BrokerKnobs::default()
    };
    // Maximum QoS 0 under qos = 1: stops (never a silent or an at-most-once downgrade).
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.qos_downgrade = true;
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    h.run_for(Duration::from_secs(5));
    assert!(h.sink.is_closed());
    assert_eq!(h.broker.connects().len(), 1);
    let fatal: Vec<String> = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Fatal(_)))
        .map(|(_, e)| e.to_string())
        .collect();
    assert_eq!(fatal.len(), 1, "{fatal:?}");
    assert!(fatal[0].contains("Maximum QoS 0"), "{}", fatal[0]);

    let knobs = BrokerKnobs {
        retain_available: Some(false),
        ..BrokerKnobs::default()
    };
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.retain = true;
    cfg.error_policy = ErrorPolicy::Skip;
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    h.push(record("readings", 0, 0, "a", "1")).unwrap();
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert!(
        h.count_events(|e| matches!(
            e,
            Event::RecordRejected {
                reason: RejectReason::RetainNotSupported,
                ..
            }
        )) == 1
    );
    assert!(h.broker.received().is_empty());
}

#[test]
fn transport_failures_back_off_and_recover() {
    let link = LinkKnobs {
        failing_opens: 3,
        ..LinkKnobs::default()
    };
    let mut h = Harness::new(
        test_config(MqttVersion::V311, 1),
        BrokerKnobs::default(),
        link,
        1,
    );
    connected(&mut h);
    let failures: Vec<_> = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ConnectFailed(ConnectFailure::Transport(_))))
        .collect();
    assert_eq!(failures.len(), 3);
    assert!(failures[0].1.to_string().contains("connection refused"));
}

#[test]
fn records_pushed_while_disconnected_are_delivered_after_reconnect() {
    let link = LinkKnobs {
        failing_opens: 5,
        ..LinkKnobs::default()
    };
    let mut h = Harness::new(
        test_config(MqttVersion::V311, 1),
        BrokerKnobs::default(),
        link,
        1,
    );
    let recs = records(20, 2);
    for r in recs.clone() {
        h.push(r).unwrap();
    }
    assert!(!h.sink.is_connected());
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    check(&expected(&recs), &delivered(&h), false).unwrap();
}

/// `servers`: the first address first; each failed connect or lost connection moves on to
/// the next, round and round; the Connected event names the address in use (issue 14
/// point 3).
#[test]
fn failed_connects_and_lost_connections_move_on_to_the_next_server() {
    let mut cfg = test_config(MqttVersion::V311, 1);
    (cfg.server, cfg.port) = (String::new(), 0);
    cfg.servers = vec![
        "mqtt-a:1883".into(),
        "[::1]:1884".into(),
        "mqtt-c:8883".into(),
    ];
    let link = LinkKnobs {
        failing_opens: 1,
        ..LinkKnobs::default()
    };
    let mut h = Harness::new(cfg, BrokerKnobs::default(), link, 3);
    // The first open (mqtt-a) fails: the second address connects.
    connected(&mut h);
    assert_eq!(h.sink.server(), ("::1", 1884));
    let servers: Vec<String> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Connected(c) => Some(c.server.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(servers, ["[::1]:1884"]);
    // A lost connection: the third, then round to the first.
    h.cut();
    connected(&mut h);
    assert_eq!(h.sink.server_address(), "mqtt-c:8883");
    h.cut();
    connected(&mut h);
    assert_eq!(h.sink.server_address(), "mqtt-a:1883");
    // Records pushed meanwhile all arrive.
    let recs = records(50, 2);
    for r in recs.clone() {
        h.push(r).unwrap();
    }
    h.cut();
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    check(&expected(&recs), &delivered(&h), false).unwrap();
}

#[test]
fn revoked_partitions_drop_queued_records_and_leave_the_ledger() {
    let link = LinkKnobs {
        failing_opens: 1,
        ..LinkKnobs::default()
    };
    let mut h = Harness::new(
        test_config(MqttVersion::V311, 1),
        BrokerKnobs::default(),
        link,
        1,
    );
    for r in records(10, 2) {
        h.push(r).unwrap();
    }
    let gone = TopicPartition::new("readings", 1);
    h.sink.revoke(&gone);
    assert!(!h.sink.is_assigned(&gone));
    assert_eq!(h.sink.stats().buffered_records, 5);
    match h.flush() {
        Event::FlushCompleted { offsets } => {
            assert_eq!(offsets, vec![(TopicPartition::new("readings", 0), 5)]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.broker.received().len(), 5);
}

/// Review M3: no orphan session is left on the broker. Each instance has its own client id
/// (a per-process suffix), so nothing would ever resume a session left behind: MQTT 5
/// ends it with the DISCONNECT (Session Expiry Interval 0; one that crashed expires after
/// `session_expiry`), MQTT 3.1/3.1.1 (no expiry) with one more connection, CleanSession=1.
/// Before: one persistent session per process that ever reconnected, kept for ever (3.1.1)
/// or for an hour (5).
#[test]
fn close_ends_the_persistent_session() {
    let cases = VERSIONS.into_iter().flat_map(|v| [(v, true), (v, false)]);
    for (version, reconnected) in cases {
        let mut cfg = test_config(version, 2);
        cfg.clean_session = false;
        let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 3);
        connected(&mut h);
        let recs = records(10, 1);
        for r in recs.clone() {
            h.push(r).unwrap();
        }
        h.run_for(Duration::from_millis(5));
        h.cut();
        assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
        // Closed while connected again, or between connections (the broker keeps the
        // session of the connection that was cut).
        if reconnected {
            connected(&mut h);
        } else {
            assert_eq!(h.broker.stored_sessions(), vec!["sim-sink".to_string()]);
        }
        let now = h.now;
        h.sink.close(now);
        h.drain();
        assert!(h.run_until(Duration::from_secs(10), |h| h.sink.is_closed()));
        assert_eq!(
            h.broker.stored_sessions(),
            Vec::<String>::new(),
            "{version:?} reconnected={reconnected}: {:?}\n{:#?}",
            h.broker.connects(),
            h.transcript
        );
        check(&expected(&recs), &delivered(&h), false).unwrap();
        assert_no_violations(&h);
    }
}

/// With `clean_session = false` the first connection of MQTT 3.1/3.1.1 is persistent, so
/// a session left under the same client id by an earlier instance that crashed (a stable
/// `client_id_suffix`) would be resumed, and its QoS 2 packet ids awaiting PUBREL would
/// swallow new publishes with the same ids (the broker takes them for resends). The sink
/// discards such a session (one CleanSession=1 connection) and says so; every record
/// arrives once.
#[test]
fn a_session_left_by_a_crashed_instance_is_discarded() {
    for version in [MqttVersion::V31, MqttVersion::V311] {
        let mut cfg = test_config(version, 2);
        cfg.clean_session = false;
        let knobs = BrokerKnobs {
            ack_delay: Duration::from_millis(200),
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg.clone(), knobs, LinkKnobs::default(), 4);
        connected(&mut h);
        // The first instance's publishes reach the broker; it crashes before PUBREL.
        for r in records(5, 1) {
            h.push(r).unwrap();
        }
        assert!(h.run_until(Duration::from_secs(1), |h| h.broker.received().len() == 5));
        h.restart_sink(cfg.clone());
        h.broker.knobs_mut().ack_delay = Duration::ZERO;
        connected(&mut h);
        let recs: Vec<Record> = (0..5)
            .map(|i| record("readings", 0, i, "again", &format!("new{i}")))
            .collect();
        for r in recs.clone() {
            h.push(r).unwrap();
        }
        assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
        let fresh: Vec<(String, Bytes)> = delivered(&h)
            .into_iter()
            .filter(|(t, _)| t == "sensors/again")
            .collect();
        check(&expected(&recs), &fresh, false).unwrap();
        assert_eq!(
            h.count_events(|e| matches!(e, Event::StaleSessionDiscarded { .. })),
            1,
            "{version:?}"
        );
        assert_no_violations(&h);
    }
}

#[test]
fn close_sends_disconnect_and_refuses_records() {
    for version in VERSIONS {
        let mut h = harness(version, 1, BrokerKnobs::default());
        connected(&mut h);
        let now = h.now;
        h.sink.close(now);
        h.drain();
        h.run_for(Duration::from_millis(10));
        assert!(h.sink.is_closed());
        assert_eq!(h.count_events(|e| *e == Event::Closed), 1);
        // MQTT 3.1/3.1.1: and the connection that ends the persistent session.
        let closes = if version == MqttVersion::V5 { 1 } else { 2 };
        assert_eq!(
            h.count_events(|e| matches!(e, Event::CloseTransport { .. })),
            closes
        );
        assert!(h.broker.violations().is_empty());
        assert!(matches!(
            h.sink
                .push_record(h.now, record("readings", 0, 0, "a", "1")),
            Err(PushError::Closed(_))
        ));
        assert_eq!(h.sink.poll_timeout(), None, "no timers after close");
    }
}

#[test]
fn out_of_order_offsets_are_refused() {
    let mut h = harness(MqttVersion::V311, 1, BrokerKnobs::default());
    h.push(record("readings", 0, 5, "a", "1")).unwrap();
    match h
        .sink
        .push_record(h.now, record("readings", 0, 5, "a", "dup"))
    {
        Err(e @ PushError::OutOfOrder { last: 5, .. }) => {
            assert!(e.to_string().contains("readings/0@5"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_per_record_properties_reject_the_record() {
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.error_policy = ErrorPolicy::Skip;
    let mapper = RecordMapper::from_config(&cfg).properties_with(|r| {
        Some(PublishProperties {
            response_topic: Some(format!(
                "replies/{}",
                if r.offset == 1 { "#" } else { "ok" }
            )),
            ..PublishProperties::default()
        })
    });
    let mut h = Harness::with_mapper(cfg, mapper, BrokerKnobs::default(), LinkKnobs::default(), 1);
    connected(&mut h);
    for off in 0..3 {
        h.push(record("readings", 0, off, "a", "v")).unwrap();
    }
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    let rejected: Vec<_> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RecordRejected {
                coords,
                reason: RejectReason::InvalidProperties(text),
                ..
            } => Some((coords.offset, text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, 1);
    assert!(
        rejected[0].1.contains("response_topic"),
        "{}",
        rejected[0].1
    );
    assert_eq!(h.broker.received().len(), 2);
}

#[test]
fn per_record_properties_need_mqtt5() {
    let cfg = test_config(MqttVersion::V311, 1);
    let mapper = RecordMapper::from_config(&cfg).properties_with(|_| None);
    let err = mqtt_sink_core::Sink::new(cfg, mapper, std::time::Instant::now()).unwrap_err();
    assert!(err.to_string().contains("properties"), "{err}");
}

#[test]
fn tombstones_follow_the_value_serializer() {
    use mqtt_sink_core::ValueSerializer;
    for (ser, want) in [
        (ValueSerializer::Json, &b"null"[..]),
        (ValueSerializer::Raw, &b""[..]),
    ] {
        let cfg = test_config(MqttVersion::V311, 1);
        let mapper = RecordMapper::from_config(&cfg).value_serializer(ser);
        let mut h =
            Harness::with_mapper(cfg, mapper, BrokerKnobs::default(), LinkKnobs::default(), 1);
        connected(&mut h);
        let tp = TopicPartition::new("readings", 0);
        h.push(Record::new(tp, 0, Some("k"), None::<Bytes>))
            .unwrap();
        assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
        assert_eq!(h.broker.delivered()[0].payload.as_ref(), want);
    }
}

/// `tombstone` decides what a record without a value becomes; the offset of a skipped one
/// passes, so the commit position covers all three records whatever the policy.
#[test]
fn tombstone_policy_decides_what_a_tombstone_becomes() {
    use mqtt_sink_core::TombstonePolicy;
    let tp = TopicPartition::new("readings", 0);
    for (policy, want) in [
        (TombstonePolicy::PublishNull, Some((&b"null"[..], false))),
        (TombstonePolicy::PublishEmpty, Some((&b""[..], false))),
        (TombstonePolicy::ClearRetained, Some((&b""[..], true))),
        (TombstonePolicy::Skip, None),
    ] {
        let mut cfg = test_config(MqttVersion::V5, 1);
        cfg.tombstone = policy;
        let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 1);
        connected(&mut h);
        h.push(Record::new(tp.clone(), 0, Some("k"), Some("1")))
            .unwrap();
        h.push(Record::new(tp.clone(), 1, Some("k"), None::<Bytes>))
            .unwrap();
        h.push(Record::new(tp.clone(), 2, Some("j"), Some("2")))
            .unwrap();
        let Event::FlushCompleted { offsets } = h.flush() else {
            panic!("{policy}: the flush did not complete");
        };
        assert_eq!(offsets, vec![(tp.clone(), 3)], "{policy}");
        let got = delivered_with_retain(&h);
        let mut expected = vec![("sensors/k".to_string(), Bytes::from("1"), false)];
        if let Some((payload, retain)) = want {
            expected.push((
                "sensors/k".to_string(),
                Bytes::copy_from_slice(payload),
                retain,
            ));
        }
        expected.push(("sensors/j".to_string(), Bytes::from("2"), false));
        assert_eq!(got, expected, "{policy}");
        let skipped = u64::from(policy == TombstonePolicy::Skip);
        assert_eq!(h.sink.stats().tombstones_skipped, skipped, "{policy}");
    }
}

/// `max_publish_rate` holds the broker to `burst + T * rate` publishes, and a flush
/// deadline still fires on time while the sink is throttled (issue 14 point 5).
#[test]
fn the_publish_rate_is_held_and_flush_deadlines_fire_while_throttled() {
    for qos in [0u8, 1, 2] {
        let mut cfg = test_config(MqttVersion::V5, qos);
        cfg.max_publish_rate = Some(10.0);
        cfg.max_publish_burst = Some(2);
        cfg.flush_timeout = Duration::from_secs(3);
        let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 7);
        connected(&mut h);
        for r in records(100, 1) {
            h.push(r).unwrap();
        }
        let started = h.elapsed();
        let outcome = h.flush();
        let took = h.elapsed() - started;
        assert!(
            matches!(outcome, Event::FlushTimedOut { .. }),
            "qos {qos}: {outcome:?}"
        );
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_millis(3050),
            "qos {qos}: the flush deadline fired after {took:?}, not at 3 s"
        );
        // At most burst + 3 s * rate reached the broker by then, and not far fewer.
        let by_deadline = h.broker.delivered().len();
        assert!(
            (28..=32).contains(&by_deadline),
            "qos {qos}: {by_deadline} publishes in 3 s at 10/s, burst 2"
        );
        // The rest follow at the rate: 98 after the burst take at least 9.8 s.
        let all = h.run_until(Duration::from_secs(30), |h| {
            h.broker.delivered().len() >= 100
        });
        assert!(all, "qos {qos}: {} delivered", h.broker.delivered().len());
        let total = h.elapsed() - started;
        assert!(
            total >= Duration::from_millis(9_800),
            "qos {qos}: 100 publishes at 10/s (burst 2) took only {total:?}"
        );
    }
}

#[test]
fn custom_key_serializer_sees_the_whole_record() {
    let cfg = test_config(MqttVersion::V311, 1);
    let mapper = RecordMapper::from_config(&cfg)
        .key_serializer(|r| Ok(format!("{}/{}/{}", r.tp.topic, r.tp.partition, r.offset)));
    let mut h = Harness::with_mapper(cfg, mapper, BrokerKnobs::default(), LinkKnobs::default(), 1);
    connected(&mut h);
    h.push(Record::new(
        TopicPartition::new("readings", 3),
        9,
        None::<Bytes>,
        Some("v"),
    ))
    .unwrap();
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert_eq!(h.broker.delivered()[0].topic, "sensors/readings/3/9");
}

#[test]
fn lost_acks_are_recovered_by_reconnect_and_resend() {
    for qos in [1u8, 2] {
        let mut cfg = test_config(MqttVersion::V5, qos);
        cfg.clean_session = false;
        let knobs = BrokerKnobs {
            ack_loss: 0.2,
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 11);
        let recs = records(200, 2);
        for r in recs.clone() {
            h.push(r).unwrap();
        }
        h.run_for(Duration::from_millis(200));
        h.broker.knobs_mut().ack_loss = 0.0;
        assert!(h.sink.stats().inflight > 0, "some acks were lost");
        // Lost acks stall in-flight publishes until ack_timeout (5 s) reconnects and resends.
        let outcome = h.flush_with_deadline(h.now + Duration::from_secs(60));
        assert!(
            matches!(outcome, Event::FlushCompleted { .. }),
            "qos {qos}: {outcome:?}"
        );
        assert!(
            h.count_events(|e| matches!(e, Event::ConnectionLost(LostReason::AckTimeout { .. })))
                >= 1
        );
        check(&expected(&recs), &delivered(&h), true).unwrap();
    }
}

/// A publish's ack timeout waits for the publish before it to be answered (slow links),
/// but answers to later publishes do not keep it alive: a broker that skips one answer
/// while answering the rest (AWS IoT drops over-limit publishes without a PUBACK) costs
/// the connection `ack_timeout` after that publish was written, not when traffic stops.
#[test]
fn a_skipped_answer_times_out_while_later_ones_arrive() {
    for qos in [1u8, 2] {
        let mut h = harness(MqttVersion::V311, qos, BrokerKnobs::default());
        connected(&mut h);
        let timeout = h.sink.config().ack_timeout;
        h.broker.knobs_mut().ack_loss = 1.0;
        h.push(record("readings", 0, 0, "k0", "v0")).unwrap();
        assert!(h.run_until(Duration::from_secs(1), |h| h.broker.received().len() == 1));
        h.broker.knobs_mut().ack_loss = 0.0;
        let deadline = h.elapsed() + timeout;
        // One record every 100 ms for twice the ack timeout, each answered.
        let step = Duration::from_millis(100);
        let n = 2 * (timeout.as_millis() / step.as_millis()) as i64;
        for offset in 1..=n {
            h.push(record("readings", 0, offset, "k1", &format!("v{offset}")))
                .unwrap();
            h.run_for(step);
        }
        let losses: Vec<(Duration, String)> = h
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::ConnectionLost(_)))
            .map(|(t, e)| (*t, e.to_string()))
            .collect();
        assert!(!losses.is_empty(), "qos {qos}: no connection lost");
        let (at, why) = &losses[0];
        assert!(
            why.contains("readings/0@0 unacknowledged for ack_timeout"),
            "qos {qos}: {why}"
        );
        assert!(
            *at <= deadline + Duration::from_millis(50),
            "qos {qos}: lost at {at:?}, the deadline was {deadline:?}"
        );
    }
}

#[test]
fn v5_topic_aliases_within_the_broker_maximum() {
    let knobs = BrokerKnobs {
        topic_alias_maximum: Some(2),
        ..BrokerKnobs::default()
    };
    let mut h = harness(MqttVersion::V5, 1, knobs);
    connected(&mut h);
    // Three topics, two aliases: the third topic always goes out plain.
    let recs: Vec<Record> = (0..12)
        .map(|i| record("readings", 0, i, &format!("k{}", i % 3), &format!("v{i}")))
        .collect();
    for r in recs.clone() {
        h.push(r).unwrap();
    }
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    check(&expected(&recs), &delivered(&h), false).unwrap();
    let aliased = h
        .broker
        .received()
        .iter()
        .filter(|r| r.properties.topic_alias.is_some())
        .count();
    assert_eq!(aliased, 8, "k0 and k1 use aliases, k2 does not");
    assert!(h
        .broker
        .received()
        .iter()
        .all(|r| r.properties.topic_alias.unwrap_or(0) <= 2));
    assert_no_violations(&h);
    // After a reconnect the aliases start over (the broker forgot them).
    h.cut();
    connected(&mut h);
    h.push(record("readings", 0, 12, "k1", "after")).unwrap();
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert_eq!(h.broker.delivered().last().unwrap().topic, "sensors/k1");
    assert_no_violations(&h);
}

/// Review L2: the Topic Alias property adds 3 bytes to the packet that sets it up. Records
/// whose plain PUBLISH is just under, at or just over the broker's Maximum Packet Size
/// (each on its own topic, so each would set up an alias): those that fit plain arrive
/// (plain when the alias would not fit), the others are rejected as too large, and the
/// broker never sees an oversized packet (it used to: 0x95 and a disconnect, again on
/// every connection that did not resume the session).
#[test]
fn v5_an_alias_never_makes_a_packet_exceed_the_broker_maximum() {
    const LIMIT: u32 = 105;
    let knobs = BrokerKnobs {
        topic_alias_maximum: Some(100),
        max_packet_size: Some(LIMIT),
        ..BrokerKnobs::default()
    };
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.error_policy = ErrorPolicy::Skip;
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 2);
    connected(&mut h);
    let recs: Vec<Record> = (0..12)
        .map(|i| {
            let value = "x".repeat(80 + i as usize);
            record("readings", 0, i, &format!("key{i:02}"), &value)
        })
        .collect();
    for r in recs.clone() {
        h.push(r).unwrap();
    }
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert_no_violations(&h);
    let rejected = h.count_events(|e| {
        matches!(
            e,
            Event::RecordRejected {
                reason: RejectReason::PacketTooLarge { .. },
                ..
            }
        )
    });
    let arrived = h.broker.delivered().len();
    assert_eq!(arrived + rejected, 12);
    assert!(
        arrived >= 3 && rejected >= 1,
        "{arrived} arrived, {rejected} rejected"
    );
    let plain = h
        .broker
        .received()
        .iter()
        .filter(|r| r.properties.topic_alias.is_none())
        .count();
    assert!(
        plain >= 3,
        "the last ones that fit went out plain ({plain})"
    );
}

/// Review L2: after a resumed session the broker's Receive Maximum and Maximum Packet
/// Size may be lower than when the publishes were first sent. Resends stay within the new
/// Receive Maximum (they used to go out all at once: 0x93 and a disconnect, again on every
/// connection), and a publish now too large is rejected rather than resent.
#[test]
fn v5_resends_respect_limits_the_broker_lowered() {
    for qos in [1u8, 2] {
        let mut cfg = test_config(MqttVersion::V5, qos);
        cfg.clean_session = false;
        cfg.error_policy = ErrorPolicy::Skip;
        let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 6);
        connected(&mut h);
        h.broker.knobs_mut().ack_loss = 1.0;
        let recs: Vec<Record> = (0..10)
            .map(|i| {
                let value = if i == 3 {
                    "y".repeat(300)
                } else {
                    format!("v{i}")
                };
                record("readings", 0, i, &format!("k{}", i % 3), &value)
            })
            .collect();
        for r in recs.clone() {
            h.push(r).unwrap();
        }
        h.run_for(Duration::from_millis(100));
        assert_eq!(h.sink.stats().inflight, 10);
        let knobs = h.broker.knobs_mut();
        knobs.ack_loss = 0.0;
        knobs.receive_maximum = Some(2);
        knobs.max_packet_size = Some(200);
        h.cut();
        connected(&mut h);
        assert!(
            matches!(h.flush(), Event::FlushCompleted { .. }),
            "qos {qos}"
        );
        assert_no_violations(&h);
        // Record 3 may have reached the broker before (its answer lost): not resent.
        let want: Vec<Record> = recs.iter().filter(|r| r.offset != 3).cloned().collect();
        let big = recs[3].value.clone().unwrap();
        let arrivals: Vec<(String, Bytes)> = delivered(&h)
            .into_iter()
            .filter(|(_, p)| *p != big)
            .collect();
        check(&expected(&want), &arrivals, true).unwrap();
        let too_large: Vec<String> = h
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::RecordRejected {
                    coords,
                    reason: RejectReason::PacketTooLarge { .. },
                    ..
                } => Some(coords.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(too_large, vec!["readings/0@3".to_string()], "qos {qos}");
        assert_eq!(h.broker.connects().len(), 2, "qos {qos}: no reconnect loop");
    }
}

/// H4: strings MQTT lets a broker refuse (Mosquitto closes the connection on them) are
/// refused by the sink first, with the record and the character's position, and the
/// records after them are delivered; with `string_policy = "escape"` topics are escaped.
#[test]
fn refusable_characters_are_rejected_before_sending_or_escaped() {
    use mqtt_sink_core::{HeaderSelection, StringPolicy};
    let keys: [&[u8]; 5] = [
        b"dev\t7",
        b"\x01\x02\x03\x04",
        b"a\x7f",
        "x\u{85}".as_bytes(),
        b"fine",
    ];
    for policy in [StringPolicy::Reject, StringPolicy::Escape] {
        let mut cfg = test_config(MqttVersion::V5, 1);
        cfg.error_policy = ErrorPolicy::Skip;
        cfg.string_policy = policy;
        cfg.headers_as_user_properties = HeaderSelection::All;
        // Mosquitto's strictness: had the sink sent one, the broker would hang up (and
        // note a violation).
        let knobs = BrokerKnobs {
            refuse_control_chars: true,
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
        connected(&mut h);
        let tp = TopicPartition::new("readings", 2);
        for (off, key) in keys.iter().enumerate() {
            h.push(Record::new(
                tp.clone(),
                off as i64,
                Some(Bytes::copy_from_slice(key)),
                Some("v"),
            ))
            .unwrap();
        }
        // A header value in the ASCII range holding control characters and a NUL.
        let mut bad_header = Record::new(tp.clone(), 5, Some("ok"), Some("v"));
        bad_header.headers.push(mqtt_sink_core::Header {
            key: "h".into(),
            value: Some(Bytes::from_static(b"\x01\x00\x02")),
        });
        h.push(bad_header).unwrap();
        h.push(Record::new(tp.clone(), 6, Some("last"), Some("v")))
            .unwrap();
        assert_eq!(
            h.flush(),
            Event::FlushCompleted {
                offsets: vec![(tp.clone(), 7)]
            }
        );
        let rejected = rejections(&h);
        let topics: Vec<String> = h
            .broker
            .received()
            .iter()
            .map(|d| d.topic.clone())
            .collect();
        match policy {
            StringPolicy::Reject => {
                assert_eq!(rejected.len(), 5, "{rejected:?}");
                for (i, at) in [
                    (0, "U+0009 (a control character) at byte 11"),
                    (1, "U+0001"),
                    (2, "U+007F"),
                    (3, "U+0085"),
                ] {
                    assert!(
                        rejected[i].contains(&format!("readings/2@{i}")),
                        "{}",
                        rejected[i]
                    );
                    assert!(rejected[i].contains(at), "{}", rejected[i]);
                }
                assert!(
                    rejected[4].contains("readings/2@5") && rejected[4].contains("user_properties"),
                    "{}",
                    rejected[4]
                );
                assert_eq!(topics, ["sensors/fine", "sensors/last"]);
            }
            _ => {
                assert_eq!(rejected.len(), 1, "{rejected:?}");
                assert!(rejected[0].contains("readings/2@5"), "{}", rejected[0]);
                assert_eq!(
                    topics,
                    [
                        "sensors/dev%097",
                        "sensors/%01%02%03%04",
                        "sensors/a%7F",
                        "sensors/x%C2%85",
                        "sensors/fine",
                        "sensors/last"
                    ]
                );
            }
        }
        assert_no_violations(&h);
    }
}

/// Pushes one record per key to readings/0 (offsets 0, 1, ...) and flushes; returns the
/// position the flush completed at (it must complete).
fn push_keys_and_flush(h: &mut Harness, keys: &[&str]) -> i64 {
    for (off, key) in keys.iter().enumerate() {
        h.push(record("readings", 0, off as i64, key, &format!("v{off}")))
            .unwrap();
    }
    match h.flush() {
        Event::FlushCompleted { offsets } => {
            assert_eq!(offsets.len(), 1, "{offsets:?}");
            offsets[0].1
        }
        other => panic!("the flush did not complete: {other:?}"),
    }
}

/// The topics the broker delivered to, each once, sorted.
fn delivered_topics(h: &Harness) -> Vec<String> {
    let mut topics: Vec<String> = delivered(h).into_iter().map(|d| d.0).collect();
    topics.sort();
    topics.dedup();
    topics
}

/// H4's defence in depth: a broker that hangs up right after one publish, without a
/// reason, gets it `poison_after` times; then the sink gives up on it (the policy applies
/// once, the reason names the record) and the rest are delivered. Without the rule the
/// sink reconnects and resends it forever.
#[test]
fn a_publish_the_broker_hangs_up_on_is_given_up_after_poison_after_closes() {
    for (version, qos) in [
        (MqttVersion::V311, 1),
        (MqttVersion::V5, 2),
        (MqttVersion::V31, 1),
    ] {
        let mut cfg = test_config(version, qos);
        cfg.error_policy = ErrorPolicy::Skip;
        let knobs = BrokerKnobs {
            close_on_topics: ["sensors/bad".to_string()].into(),
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
        connected(&mut h);
        let keys = ["k0", "k1", "bad", "k2", "k3", "k4"];
        assert_eq!(push_keys_and_flush(&mut h, &keys), 6, "{version:?}");
        let rejected = rejections(&h);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].contains("readings/0@2"), "{}", rejected[0]);
        assert!(
            rejected[0].contains("closed the connection 3 times right after"),
            "{}",
            rejected[0]
        );
        assert_eq!(
            delivered_topics(&h),
            ["k0", "k1", "k2", "k3", "k4"].map(|k| format!("sensors/{k}"))
        );
        // The first connection and one per close: poison_after + 1.
        assert_eq!(h.broker.connects().len(), 4, "{version:?}");
        assert_no_violations(&h);
    }
}

/// A broker that hangs up right after it refused a publish with a reason code (Mosquitto
/// 2.0 with `max_queued_messages 0`, AWS IoT Core on a denied publish), losing its answer
/// with the connection twice. The closes are the refused record's doing: its own reason
/// code applies, once, and no record handed out after its answer is given up as poison.
/// Before: on the third connection the sink probed with the refused record alone, took its
/// 0x87 and handed out the next record, then saw the close and counted it as the
/// `poison_after`th against that innocent record (the blocking bridge's H2 test lost its
/// order this way, about once in 40 runs against Mosquitto).
#[test]
fn a_close_right_after_a_refusal_is_not_held_against_the_next_publish() {
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.error_policy = ErrorPolicy::Skip;
    let knobs = BrokerKnobs {
        topic_reason_codes: [("sensors/denied".to_string(), 0x87)].into(),
        close_after_rejection: Some(2),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    let keys = ["k0", "k1", "denied", "k2", "k3", "k4"];
    assert_eq!(push_keys_and_flush(&mut h, &keys), 6);
    let rejected = rejections(&h);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].contains("readings/0@2"), "{}", rejected[0]);
    assert!(rejected[0].contains("0x87"), "{}", rejected[0]);
    // Every other record arrived (k0 and k1 more than once: their answers were lost with
    // the connection).
    assert_eq!(
        delivered_topics(&h),
        ["k0", "k1", "k2", "k3", "k4"].map(|k| format!("sensors/{k}"))
    );
    // The first connection and one per close.
    assert_eq!(h.broker.connects().len(), 4);
    assert_no_violations(&h);
}

/// L6: a broker that hangs up right after every CONNACK is not hammered at the minimum
/// delay: a connection shorter than 10 s does not reset the backoff. (Before: every
/// CONNACK reset it, 50-100 ms apart here, hundreds of connections in 20 s.)
#[test]
fn connections_that_die_right_after_connack_keep_backing_off() {
    let mut cfg = test_config(MqttVersion::V311, 1);
    cfg.poison_after = 0; // never give up: the broker keeps hanging up
    let knobs = BrokerKnobs {
        close_on_topics: ["sensors/bad".to_string()].into(),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 1);
    connected(&mut h);
    h.push(record("readings", 0, 0, "bad", "v")).unwrap();
    h.run_for(Duration::from_secs(20));
    let n = h.broker.connects().len();
    // 50 ms doubling to the 2 s maximum (with jitter): about a dozen in 20 s.
    assert!((5..=20).contains(&n), "{n} connections in 20 s");
}

/// Point 4 of the "never stalls" issue: a broker that does not honour qos = 2 (RabbitMQ
/// answers a QoS 2 PUBLISH with PUBACK; an MQTT 5 Maximum QoS of 1). Before: "protocol
/// error: PUBACK for QoS 2", a reconnect and a resend of the window, forever (hundreds of
/// connections, hundreds of thousands of copies, nothing committed); a Maximum QoS below
/// the configured one was a connect failure retried forever. Now the sink stops once with
/// an error naming the broker, or with `qos_downgrade` goes on at QoS 1 and says so once.
#[test]
fn a_broker_that_does_not_honour_qos_2_stops_the_sink_or_downgrades_once() {
    let cases = [
        (
            MqttVersion::V311,
            BrokerKnobs {
                qos2_as_qos1: true,
                ..BrokerKnobs::default()
            },
            "answered a QoS 2 PUBLISH",
        ),
        (
            MqttVersion::V5,
            BrokerKnobs {
                maximum_qos: Some(1),
                ..BrokerKnobs::default()
            },
            "Maximum QoS 1",
        ),
    ];
    let tp = TopicPartition::new("readings", 0);
    for (version, knobs, why) in cases {
        for downgrade in [false, true] {
            let mut cfg = test_config(version, 2);
            cfg.qos_downgrade = downgrade;
            let addr = format!("{}:{}", cfg.server, cfg.port);
            let mut h = Harness::new(cfg, knobs.clone(), LinkKnobs::default(), 1);
            h.run_until(Duration::from_secs(5), |h| {
                h.sink.is_connected() || h.sink.is_closed()
            });
            for off in 0..50 {
                match h.push(record("readings", 0, off, "k", &format!("v{off}"))) {
                    Ok(()) => {}
                    Err(_) if !downgrade => break,
                    Err(e) => panic!("{e}"),
                }
            }
            let outcome = h.flush();
            h.run_for(Duration::from_secs(60));
            let mut said: Vec<String> = h
                .events
                .iter()
                .filter(|(_, e)| matches!(e, Event::Fatal(_) | Event::QosDowngraded { .. }))
                .map(|(_, e)| e.to_string())
                .collect();
            // A flush begun after the sink stopped ends with the same Fatal event.
            said.dedup();
            let case = format!("{version:?} downgrade={downgrade}");
            assert_eq!(said.len(), 1, "{case}: {said:?}");
            assert!(
                said[0].contains(why) && said[0].contains(&addr),
                "{case}: {}",
                said[0]
            );
            assert_eq!(
                h.broker.connects().len(),
                1,
                "{case}: one connection, no loop"
            );
            if downgrade {
                assert!(matches!(
                    &h.events
                        .iter()
                        .find(|(_, e)| matches!(e, Event::QosDowngraded { .. }))
                        .unwrap()
                        .1,
                    Event::QosDowngraded { from: 2, to: 1, .. }
                ));
                assert_eq!(
                    outcome,
                    Event::FlushCompleted {
                        offsets: vec![(tp.clone(), 50)]
                    },
                    "{case}"
                );
                let delivered = h.broker.delivered().len();
                assert_eq!(delivered, 50, "{case}: each record once");
            } else {
                assert!(matches!(outcome, Event::Fatal(_)), "{case}: {outcome:?}");
                assert!(
                    said[0].contains("qos_downgrade = true"),
                    "{case}: {}",
                    said[0]
                );
                assert!(h.sink.is_closed(), "{case}");
                assert!(
                    h.committed_of(&tp).is_none()
                        && h.sink.commit_positions().iter().all(|(_, o)| *o == 0),
                    "{case}: nothing committed"
                );
            }
            assert_no_violations(&h);
        }
    }
}

/// The jq `transform` shapes, filters and fans out (issue 14 point 1): a record with no
/// output passes; one with several publishes passes only when every one is acknowledged.
#[test]
fn a_transform_shapes_filters_and_fans_out_and_the_offset_waits_for_every_publish() {
    let tp = TopicPartition::new("readings", 0);
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.transform = Some(
        r#"if .value.n % 3 == 0 then empty
           elif .value.n % 3 == 1 then {topic: "one/\(.key)", payload: {n: .value.n, at: .offset}}
           else (.value.n, {topic: "two/\(.key)", payload: "x\(.value.n)", retain: true},
                 {topic: "three", payload: .value}) end"#
            .into(),
    );
    // One publish in flight at a time, each answered after 100 ms.
    cfg.max_inflight = 1;
    let knobs = BrokerKnobs {
        ack_delay: Duration::from_millis(100),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 3);
    connected(&mut h);
    let value = |n: i64| format!(r#"{{"n":{n}}}"#);
    // n = 0: filtered; 1: one shaped publish; 2: three publishes.
    for n in 0..3 {
        h.push(Record::new(tp.clone(), n, Some("k"), Some(value(n))))
            .unwrap();
    }
    // The fan-out's second publish goes only after its first was answered: the record
    // must still hold the position then.
    assert!(h.run_until(Duration::from_secs(5), |h| h.broker.delivered().len() >= 3));
    assert_eq!(
        h.sink.commit_positions(),
        vec![(tp.clone(), 2)],
        "offset 2 passed before all of its publishes were acknowledged"
    );
    let Event::FlushCompleted { offsets } = h.flush() else {
        panic!("the flush did not complete");
    };
    assert_eq!(offsets, vec![(tp.clone(), 3)]);
    let got = delivered_with_retain(&h);
    assert_eq!(
        got,
        vec![
            ("one/k".into(), Bytes::from(r#"{"n":1,"at":1}"#), false),
            ("sensors/k".into(), Bytes::from("2"), false),
            ("two/k".into(), Bytes::from("x2"), true),
            ("three".into(), Bytes::from(r#"{"n":2}"#), false),
        ]
    );
    let stats = h.sink.stats();
    assert_eq!((stats.filtered, stats.fanned_out), (1, 2));
    assert_eq!(stats.acknowledged, 2, "records acknowledged, not publishes");
}

/// A record fanned out into several publishes is handled by the error policy once, however
/// many of its publishes are refused, and under `fail` holds its offset although the others
/// were acknowledged; a program error follows the policy with the record's coordinates.
#[test]
fn a_fanned_out_record_meets_the_error_policy_once() {
    use mqtt_sink_core::ErrorPolicy;
    let tp = TopicPartition::new("readings", 0);
    for policy in [
        ErrorPolicy::Fail,
        ErrorPolicy::Skip,
        ErrorPolicy::DeadLetter,
    ] {
        let mut cfg = test_config(MqttVersion::V5, 1);
        cfg.error_policy = policy;
        if policy == ErrorPolicy::DeadLetter {
            cfg.dead_letter_topic = Some("dlq".into());
        }
        // Four publishes per record: two to topics the broker refuses (0x87).
        cfg.transform = Some(
            r#"if .value == "boom" then error("no \(.key)") else
               ("ok/1", "no/1", "ok/2", "no/2") as $t | {topic: $t, payload: .value} end"#
                .into(),
        );
        let knobs = BrokerKnobs {
            topic_reason_codes: [("no/1".to_string(), 0x87), ("no/2".to_string(), 0x87)].into(),
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 5);
        connected(&mut h);
        h.push(Record::new(tp.clone(), 0, Some("a"), Some("v")))
            .unwrap();
        h.push(Record::new(tp.clone(), 1, Some("b"), Some("boom")))
            .unwrap();
        let outcome = h.flush();
        let mut rejected: Vec<String> = h
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::RecordRejected { coords, reason, .. } => Some(format!("{coords}: {reason}")),
                _ => None,
            })
            .collect();
        rejected.sort();
        assert_eq!(rejected.len(), 2, "{policy}: {rejected:?}");
        assert!(
            rejected[0].starts_with("readings/0@0: the broker rejected it"),
            "{rejected:?}"
        );
        assert_eq!(
            rejected[1],
            "readings/0@1: the transform failed: jq error: no b"
        );
        let delivered: Vec<_> = h
            .broker
            .delivered()
            .iter()
            .map(|d| d.topic.clone())
            .collect();
        assert_eq!(delivered, ["ok/1", "ok/2"], "{policy}");
        match policy {
            ErrorPolicy::Fail => {
                let Event::FlushFailed { offsets, .. } = outcome else {
                    panic!("fail: {outcome:?}");
                };
                assert!(
                    offsets.iter().all(|(_, o)| *o == 0),
                    "fail: the refused record's offset passed: {offsets:?}"
                );
            }
            _ => {
                let Event::FlushCompleted { offsets } = outcome else {
                    panic!("{policy}: {outcome:?}");
                };
                assert_eq!(offsets, vec![(tp.clone(), 2)], "{policy}");
            }
        }
        let mut letters: Vec<i64> = h.dead_letters.iter().map(|r| r.offset).collect();
        letters.sort_unstable();
        let want: &[i64] = if policy == ErrorPolicy::DeadLetter {
            &[0, 1]
        } else {
            &[]
        };
        assert_eq!(letters, want, "{policy}: one dead letter per record");
    }
}

/// Four publishes per record, one per QoS and one at the configured QoS, each to a topic
/// that names it and with the record's offset as its payload.
const QOS_FAN_OUT: &str = r#"{topic: "q/0", payload: "\(.offset)", qos: 0},
    {topic: "q/1", payload: "\(.offset)", qos: 1},
    {topic: "q/2", payload: "\(.offset)", qos: 2},
    {topic: "q/default", payload: "\(.offset)"}"#;

/// What the broker read, as (topic, payload, QoS), in order.
fn received_qos(h: &Harness) -> Vec<(String, String, u8)> {
    h.broker
        .received()
        .iter()
        .map(|r| {
            let payload = String::from_utf8(r.payload.to_vec()).unwrap();
            (r.topic.clone(), payload, r.qos)
        })
        .collect()
}

/// What `QOS_FAN_OUT` sends for offsets `offsets` under `qos = default`, where the broker
/// allows QoS `max` at most.
fn qos_fan_out(offsets: std::ops::Range<i64>, default: u8, max: u8) -> Vec<(String, String, u8)> {
    offsets
        .flat_map(|off| {
            [("q/0", 0), ("q/1", 1), ("q/2", 2), ("q/default", default)]
                .map(|(t, q)| (t.to_string(), off.to_string(), q.min(max)))
        })
        .collect()
}

/// A transform's `qos` key sets the QoS of its publish over the configured `qos`: each
/// publish reaches the broker at its own QoS and takes its own acknowledgement flow (a QoS 0
/// one is done once written and needs no window slot; a PUBACK answers a QoS 1 one under
/// `qos = 2`, a PUBREC a QoS 2 one under `qos = 1`), in push order with one slot in the
/// window, and a record's offset passes only when all of its publishes are done.
#[test]
fn a_transform_sets_qos_per_publish() {
    let tp = TopicPartition::new("readings", 0);
    for version in VERSIONS {
        for qos in 0..=2u8 {
            let case = format!("{version:?} qos = {qos}");
            let mut cfg = test_config(version, qos);
            cfg.transform = Some(QOS_FAN_OUT.into());
            cfg.max_inflight = 1;
            let knobs = BrokerKnobs {
                ack_delay: Duration::from_millis(50),
                ..BrokerKnobs::default()
            };
            let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 7);
            connected(&mut h);
            for off in 0..5 {
                h.push(Record::new(tp.clone(), off, Some("k"), Some("v")))
                    .unwrap();
            }
            let seen = |h: &Harness, topic: &str, off: &str| {
                h.broker
                    .received()
                    .iter()
                    .any(|r| r.topic == topic && r.payload == off)
            };
            // While record 0's last publish waits for its answer (50 ms), record 1's QoS 0
            // publish is not held for the window's one slot.
            let sent = h.run_until(Duration::from_secs(5), |h| seen(h, "q/default", "0"));
            assert!(sent, "{case}: {:?}", h.events);
            h.run_for(Duration::from_millis(10));
            assert!(seen(&h, "q/0", "1"), "{case}: {:?}", received_qos(&h));
            assert!(!seen(&h, "q/1", "1"), "{case}: window 1 exceeded");
            // Record 1's QoS 2 publish is in flight: record 0 passed, record 1 waits.
            let sent = h.run_until(Duration::from_secs(5), |h| seen(h, "q/2", "1"));
            assert!(sent, "{case}: {:?}", h.events);
            assert_eq!(
                h.sink.commit_positions(),
                vec![(tp.clone(), 1)],
                "{case}: an offset passed before all of its publishes were done"
            );
            let outcome = h.flush();
            assert_eq!(
                outcome,
                Event::FlushCompleted {
                    offsets: vec![(tp.clone(), 5)]
                },
                "{case}"
            );
            assert_eq!(received_qos(&h), qos_fan_out(0..5, qos, 2), "{case}");
            assert_eq!(h.broker.delivered().len(), 20, "{case}: each once");
            let qos2 = if qos == 2 { 10 } else { 5 };
            assert_eq!(
                h.broker.pubrels(),
                qos2,
                "{case}: one PUBREL per QoS 2 publish"
            );
            assert_eq!(h.sink.stats().acknowledged, 5, "{case}");
            assert!(
                h.protocol_errors.is_empty(),
                "{case}: {:?}",
                h.protocol_errors
            );
            let trouble = h.count_events(|e| {
                matches!(
                    e,
                    Event::Fatal(_) | Event::QosDowngraded { .. } | Event::ConnectionLost(_)
                )
            });
            assert_eq!(trouble, 0, "{case}: {:?}", h.events);
            assert_eq!(h.broker.connects().len(), 1, "{case}");
            assert_no_violations(&h);
        }
    }

    // Any other value fails the record, named by its coordinates.
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.transform = Some(r#"{payload: .value, qos: (if .offset == 1 then 3 else 1 end)}"#.into());
    cfg.error_policy = ErrorPolicy::Skip;
    let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 7);
    connected(&mut h);
    for off in 0..3 {
        h.push(Record::new(tp.clone(), off, Some("k"), Some("v")))
            .unwrap();
    }
    assert!(matches!(h.flush(), Event::FlushCompleted { .. }));
    assert_eq!(
        rejections(&h),
        [
            "record readings/0@1 rejected (skip): the transform failed: output 1: qos must be \
             0, 1 or 2, got 3"
        ]
    );
    assert_eq!(h.broker.delivered().len(), 2);
}

/// A QoS 0 publish at the head of the queue needs no window slot, so it is not held back
/// while the sink waits for a batch of free slots (`REFILL_DELAY`) either.
#[test]
fn a_qos_0_publish_is_not_held_for_a_batch_of_window_slots() {
    let tp = TopicPartition::new("readings", 0);
    let mut cfg = test_config(MqttVersion::V5, 1);
    // 16 slots: the sink holds QoS 1/2 publishes while fewer than 2 are free.
    cfg.max_inflight = 16;
    cfg.transform = Some(
        r#"if .offset == 0 then range(15) as $i | {topic: "w/\($i)", payload: "x"}
           else ({payload: "a", qos: 0}, {payload: "b", qos: 0}) end"#
            .into(),
    );
    let knobs = BrokerKnobs {
        ack_delay: Duration::from_millis(50),
        ..BrokerKnobs::default()
    };
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 5);
    connected(&mut h);
    h.push(Record::new(tp.clone(), 0, Some("k"), Some("v")))
        .unwrap();
    assert_eq!(h.sink.stats().inflight, 15);
    h.push(Record::new(tp.clone(), 1, Some("k"), Some("v")))
        .unwrap();
    // Both went out (and were written) at once: nothing queued, no refill wait.
    assert_eq!(h.sink.stats().buffered_records, 15);
    assert_eq!(h.sink.defer_input_until(), None);
    let Event::FlushCompleted { offsets } = h.flush() else {
        panic!("the flush did not complete");
    };
    assert_eq!(offsets, vec![(tp, 2)]);
}

/// A broker whose CONNACK says Maximum QoS 1, with `qos_downgrade = true`: only the
/// publishes a transform gives QoS 2 go at QoS 1 (said once); QoS 0 ones stay at 0, and so
/// does `qos = 0` (a downgrade never raises a QoS). Publishes held at the CONNACK are
/// lowered then; ones pushed after it, as they are sent. Without `qos_downgrade` the sink
/// stops at the first QoS 2 publish, naming the transform's `qos`, and commits nothing
/// unacknowledged.
#[test]
fn a_broker_maximum_qos_of_1_downgrades_only_the_qos_2_publishes() {
    let tp = TopicPartition::new("readings", 0);
    let knobs = BrokerKnobs {
        maximum_qos: Some(1),
        ..BrokerKnobs::default()
    };
    for qos in [0u8, 1] {
        for held in [false, true] {
            let case = format!("qos = {qos}, records held at CONNACK: {held}");
            let mut cfg = test_config(MqttVersion::V5, qos);
            cfg.transform = Some(QOS_FAN_OUT.into());
            cfg.qos_downgrade = true;
            let mut h = Harness::new(cfg, knobs.clone(), LinkKnobs::default(), 3);
            let push = |h: &mut Harness, off: i64| {
                h.push(Record::new(tp.clone(), off, Some("k"), Some("v")))
                    .unwrap();
            };
            if held {
                assert!(!h.sink.is_connected());
                push(&mut h, 0);
                push(&mut h, 1);
            }
            connected(&mut h);
            for off in if held { 2..5 } else { 0..5 } {
                push(&mut h, off);
            }
            let outcome = h.flush();
            assert_eq!(
                outcome,
                Event::FlushCompleted {
                    offsets: vec![(tp.clone(), 5)]
                },
                "{case}"
            );
            assert_eq!(received_qos(&h), qos_fan_out(0..5, qos, 1), "{case}");
            let said: Vec<_> = h
                .events
                .iter()
                .filter(|(_, e)| matches!(e, Event::QosDowngraded { .. } | Event::Fatal(_)))
                .map(|(_, e)| e.clone())
                .collect();
            assert_eq!(said.len(), 1, "{case}: {said:?}");
            assert!(
                matches!(said[0], Event::QosDowngraded { from: 2, to: 1, .. }),
                "{case}: {said:?}"
            );
            assert_eq!(h.broker.connects().len(), 1, "{case}");
            assert_no_violations(&h);
        }
    }

    // QoS 2 publishes in flight in a session resumed on a broker that now allows QoS 1:
    // lowered at the CONNACK, resent at QoS 1 (DUP, same packet ids).
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.transform = Some(QOS_FAN_OUT.into());
    cfg.qos_downgrade = true;
    cfg.clean_session = false;
    let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), 3);
    connected(&mut h);
    h.broker.knobs_mut().ack_loss = 1.0;
    h.push(Record::new(tp.clone(), 0, Some("k"), Some("v")))
        .unwrap();
    h.run_for(Duration::from_millis(100));
    assert_eq!(h.sink.stats().inflight, 3);
    *h.broker.knobs_mut() = BrokerKnobs {
        maximum_qos: Some(1),
        ..BrokerKnobs::default()
    };
    h.cut();
    connected(&mut h);
    assert!(
        matches!(h.events.iter().rev().find(|(_, e)| matches!(e, Event::Connected(_))),
            Some((_, Event::Connected(c))) if c.session_present),
        "the session was not resumed"
    );
    let Event::FlushCompleted { offsets } = h.flush() else {
        panic!("the flush did not complete: {:?}", h.events);
    };
    assert_eq!(offsets, vec![(tp.clone(), 1)]);
    let resent: Vec<_> = h
        .broker
        .received()
        .iter()
        .filter(|r| r.connection == h.broker.connection_index())
        .map(|r| (r.topic.as_str(), r.qos, r.dup))
        .collect();
    assert_eq!(
        resent,
        [("q/1", 1, true), ("q/2", 1, true), ("q/default", 1, true)]
    );
    assert_eq!(
        h.count_events(|e| matches!(e, Event::QosDowngraded { from: 2, to: 1, .. })),
        1
    );
    assert_no_violations(&h);

    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.transform = Some(QOS_FAN_OUT.into());
    let addr = format!("{}:{}", cfg.server, cfg.port);
    let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 3);
    connected(&mut h);
    for off in 0..3 {
        // Refused once the sink stopped.
        let _ = h.push(Record::new(tp.clone(), off, Some("k"), Some("v")));
    }
    let outcome = h.flush();
    assert!(matches!(outcome, Event::Fatal(_)), "{outcome:?}");
    let fatal: Vec<String> = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Fatal(_)))
        .map(|(_, e)| e.to_string())
        .collect();
    assert!(
        fatal[0].contains(&format!(
            "the MQTT broker at {addr} does not honour QoS 2 (the transform's qos): its \
             CONNACK says Maximum QoS 1; have the transform publish at qos 1 at most, or set \
             qos_downgrade = true"
        )),
        "{}",
        fatal[0]
    );
    assert!(h.sink.is_closed());
    assert_eq!(received_qos(&h), qos_fan_out(0..1, 1, 1)[..2]);
    assert!(h.sink.commit_positions().iter().all(|(_, o)| *o == 0));
    assert!(h.committed_of(&tp).is_none());
    assert_no_violations(&h);
}

/// Publishes of mixed QoS cut off unwritten go out again after the reconnect in push
/// order: a QoS 0 one (sent again as new) between two QoS 1 ones, whether these are resent
/// in a resumed session (with DUP) or published again as new after a lost one.
#[test]
fn mixed_qos_publishes_cut_off_go_out_again_in_push_order() {
    let tp = TopicPartition::new("readings", 0);
    for keep_sessions in [true, false] {
        let mut cfg = test_config(MqttVersion::V311, 1);
        cfg.clean_session = false;
        cfg.transform = Some(
            r#"{topic: "a", payload: "\(.offset)", qos: 1}, {topic: "b", payload: "\(.offset)", qos: 0},
               {topic: "c", payload: "\(.offset)"}"#
                .into(),
        );
        let knobs = BrokerKnobs {
            keep_sessions,
            ..BrokerKnobs::default()
        };
        let mut h = Harness::new(cfg, knobs, LinkKnobs::default(), 11);
        connected(&mut h);
        // A socket that takes nothing: all three wait in the runtime's buffer.
        h.link.bytes_per_ms = Some(0);
        for off in 0..2 {
            h.push(Record::new(tp.clone(), off, Some("k"), Some("v")))
                .unwrap();
        }
        h.run_for(Duration::from_millis(10));
        assert_eq!(h.sink.stats().inflight, 4, "keep_sessions {keep_sessions}");
        h.cut();
        h.link.bytes_per_ms = None;
        connected(&mut h);
        let Event::FlushCompleted { offsets } = h.flush() else {
            panic!("keep_sessions {keep_sessions}: the flush did not complete");
        };
        assert_eq!(offsets, vec![(tp.clone(), 2)]);
        let got: Vec<_> = h
            .broker
            .received()
            .iter()
            .map(|r| {
                (
                    format!("{}{}", r.topic, String::from_utf8_lossy(&r.payload)),
                    r.qos,
                    r.dup,
                )
            })
            .collect();
        let dup = keep_sessions;
        assert_eq!(
            got,
            [
                ("a0".to_string(), 1, dup),
                ("b0".into(), 0, false),
                ("c0".into(), 1, dup),
                ("a1".into(), 1, dup),
                ("b1".into(), 0, false),
                ("c1".into(), 1, dup),
            ],
            "keep_sessions {keep_sessions}"
        );
        assert_no_violations(&h);
    }
}

fn three_connections(seed: u64) -> Harness {
    let mut cfg = test_config(MqttVersion::V5, 1);
    cfg.connections = 3;
    let mut h = Harness::new(cfg, BrokerKnobs::default(), LinkKnobs::default(), seed);
    connected(&mut h);
    h
}

/// Issue 15 point 1: `connections = 3` opens three sessions (client ids `<id>-0..2`); the
/// topics pushed while none is acknowledged stay each on one of them, in offset order, spread
/// over all three, and the flush commits the end.
#[test]
fn three_connections_route_each_topic_to_one_session_in_order() {
    let mut h = three_connections(3);
    let ids: Vec<_> = h
        .brokers()
        .map(|b| b.connects()[0].client_id.clone())
        .collect();
    assert_eq!(ids, ["sim-sink-0", "sim-sink-1", "sim-sink-2"]);
    let tp = TopicPartition::new("readings", 0);
    for o in 0..60 {
        let key = format!("k{}", o % 10);
        h.push(record("readings", 0, o, &key, &format!("v{o}")))
            .unwrap();
    }
    let outcome = h.flush();
    assert_eq!(
        outcome,
        Event::FlushCompleted {
            offsets: vec![(tp, 60)]
        }
    );
    let mut home: BTreeMap<String, usize> = BTreeMap::new();
    for (i, b) in h.brokers().enumerate() {
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        for d in b.delivered() {
            let o: i64 = std::str::from_utf8(&d.payload).unwrap()[1..]
                .parse()
                .unwrap();
            assert_eq!(
                *home.entry(d.topic.clone()).or_insert(i),
                i,
                "{} split",
                d.topic
            );
            let prev = last.insert(&d.topic, o);
            assert!(
                prev.is_none_or(|p| p < o),
                "{} out of order at {o}",
                d.topic
            );
        }
    }
    assert_eq!(home.len(), 10, "every topic arrived");
    let used: std::collections::BTreeSet<_> = home.values().collect();
    assert_eq!(
        used.len(),
        3,
        "10 topics spread over the 3 connections: {home:?}"
    );
    for b in h.brokers() {
        assert!(b.violations().is_empty(), "{:?}", b.violations());
    }
}

/// Routing by load, not by a fixed hash: while connection 0's broker holds its acks, a
/// topic with a publish outstanding there stays there (its order), and topics with nothing
/// outstanding go on the other, idle connections even when their hash connection is 0. With
/// a fixed hash every one of these topics queued behind connection 0.
#[test]
fn an_idle_topic_avoids_a_slow_connection_a_busy_one_stays_on_it() {
    let mut h = three_connections(11);
    h.broker.knobs_mut().ack_delay = Duration::from_secs(20);
    let homed_on_0: Vec<String> = (0..1000)
        .map(|k| format!("k{k}"))
        .filter(|k| mqtt_sink_core::connection_of(&format!("sensors/{k}"), 3) == 0)
        .take(10)
        .collect();
    let busy = &homed_on_0[0];
    let mut offset = 0;
    let mut push = |h: &mut Harness, key: &str| {
        h.push(record("readings", 0, offset, key, &format!("v{offset}")))
            .unwrap();
        offset += 1;
        h.run_for(Duration::from_millis(200));
    };
    push(&mut h, busy);
    for key in &homed_on_0[1..] {
        push(&mut h, key);
        push(&mut h, busy);
    }
    let on_0: Vec<&str> = h
        .broker
        .received()
        .iter()
        .map(|r| r.topic.as_str())
        .collect();
    assert_eq!(
        on_0,
        vec![format!("sensors/{busy}"); 10],
        "connection 0 holds the busy topic's 10 publishes and nothing else"
    );
    let elsewhere: usize = h.others.iter().map(|b| b.delivered().len()).sum();
    assert_eq!(
        elsewhere, 9,
        "the 9 idle topics were acknowledged elsewhere"
    );
    h.broker.knobs_mut().ack_delay = Duration::ZERO;
    let outcome = h.flush();
    assert_eq!(
        outcome,
        Event::FlushCompleted {
            offsets: vec![(TopicPartition::new("readings", 0), 19)]
        }
    );
    // In order at first arrival (20 s without an ack timed the window out: it was resent).
    let mut seen = BTreeSet::new();
    let order: Vec<i64> = h
        .delivered()
        .iter()
        .filter(|d| d.topic == format!("sensors/{busy}"))
        .map(|d| {
            std::str::from_utf8(&d.payload).unwrap()[1..]
                .parse()
                .unwrap()
        })
        .filter(|o| seen.insert(*o))
        .collect();
    assert_eq!(order, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]);
}

/// One ledger across the connections: while connection 0's broker holds its acks, the
/// commit position stops at the first record routed to it, whatever the other two
/// acknowledged after it; once it acknowledges, the position reaches the end.
#[test]
fn a_record_unacknowledged_on_one_connection_holds_the_commit_of_the_others() {
    let mut h = three_connections(5);
    h.broker.knobs_mut().ack_delay = Duration::from_secs(20);
    let tp = TopicPartition::new("readings", 0);
    // Keys in an order whose first goes on another connection than 0.
    let on = |k: usize| mqtt_sink_core::connection_of(&format!("sensors/k{k}"), 3);
    let first = (0..12).find(|&k| on(k) != 0).unwrap();
    assert!((0..12).any(|k| on(k) == 0), "some key goes on connection 0");
    for o in 0..60 {
        let key = format!("k{}", (first + o as usize) % 12);
        h.push(record("readings", 0, o, &key, &format!("v{o}")))
            .unwrap();
    }
    h.run_for(Duration::from_secs(2));
    let held = h
        .broker
        .received()
        .iter()
        .map(|r| {
            std::str::from_utf8(&r.payload).unwrap()[1..]
                .parse::<i64>()
                .unwrap()
        })
        .min()
        .expect("some topics go on connection 0");
    let others: usize = h.others.iter().map(|b| b.delivered().len()).sum();
    assert!(
        others > 0 && held > 0 && held < 59,
        "held {held}, others delivered {others}"
    );
    assert_eq!(h.sink.commit_positions(), vec![(tp.clone(), held)]);
    h.broker.knobs_mut().ack_delay = Duration::ZERO;
    let outcome = h.flush();
    assert_eq!(
        outcome,
        Event::FlushCompleted {
            offsets: vec![(tp, 60)]
        }
    );
}

/// A fault on one connection leaves the others publishing: connection 1 is cut and its
/// broker refuses the reconnects for a while; records on connections 0 and 2 keep being
/// acknowledged meanwhile, and after it heals every record arrives.
#[test]
fn a_cut_connection_does_not_stop_the_others() {
    let mut h = three_connections(9);
    h.others[0].knobs_mut().refuse_connects = 1_000;
    h.cut_on(1);
    let before: Vec<usize> = h.brokers().map(|b| b.delivered().len()).collect();
    for o in 0..60 {
        let key = format!("k{}", o % 12);
        h.push(record("readings", 0, o, &key, &format!("v{o}")))
            .unwrap();
    }
    h.run_for(Duration::from_secs(2));
    let after: Vec<usize> = h.brokers().map(|b| b.delivered().len()).collect();
    assert!(
        after[0] > before[0] && after[2] > before[2],
        "{before:?} -> {after:?}"
    );
    assert_eq!(after[1], before[1], "connection 1 is down");
    assert!(!h.sink.is_connected());
    h.others[0].knobs_mut().refuse_connects = 0;
    let outcome = h.flush();
    assert!(
        matches!(outcome, Event::FlushCompleted { .. }),
        "{outcome:?}"
    );
    let total: usize = h.brokers().map(|b| b.delivered().len()).sum();
    assert!(total >= 60, "{total}");
}
