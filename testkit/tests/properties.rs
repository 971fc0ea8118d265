//! Property tests of the core on the simulated broker: random records, chunkings, ack
//! orders, losses, disconnects and timeouts, with the invariants of `model` checked after
//! every step. 256 cases each by default; set PROPTEST_CASES for a longer run.

use mqtt_sink_testkit::model::{op_without_flush, run, scenario, Scenario};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    // ProptestConfig::default() reads PROPTEST_CASES; 256 is its default.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Invariants 1, 2, 3, 4 and 7 under random traffic and faults.
    #[test]
    fn invariants_hold_under_faults(s in scenario()) {
        run(&s, false)?;
    }

    /// Invariant 5: chunking the byte stream differently never changes the events.
    #[test]
    fn chunking_never_changes_events(s in scenario(), chunk in 1usize..9, qos in 0u8..=2) {
        let whole = run(&Scenario { max_chunk: 0, qos, ..s.clone() }, false)?;
        let chunked = run(&Scenario { max_chunk: chunk, qos, ..s }, false)?;
        prop_assert_eq!(whole.events, chunked.events);
    }

    /// Invariant 6: the same seed gives the same transcript.
    #[test]
    fn same_seed_same_transcript(s in scenario(), qos in 0u8..=2) {
        let s = Scenario { qos, ..s };
        let a = run(&s, false)?;
        let b = run(&s, false)?;
        prop_assert_eq!(a.transcript, b.transcript);
    }

    /// Invariant 8: QoS 2 delivers each record once per session, even when PUBREC, PUBREL
    /// and PUBCOMP are lost or resent across reconnects (no flush timeouts, so no rewinds).
    #[test]
    fn qos2_delivers_once_per_session(
        s in scenario(),
        ops in prop::collection::vec(op_without_flush(), 1..60),
    ) {
        run(&Scenario { qos: 2, ops, ..s }, true)?;
    }
}

/// Poison detection (issue 12, point 2): a broker that hangs up on every publish to some
/// topics, anywhere in the stream, with any window, version and QoS 1/2. Each poison record
/// is rejected exactly once (skip policy), every other record arrives (replays allowed, no
/// gap), the flush completes at the end offset, and the broker sees a bounded number of
/// connections. Shown to catch: with `poison_after = 0` the flush never completes.
mod poison {
    use std::time::Duration;

    use bytes::Bytes;
    use mqtt_sink_core::{ErrorPolicy, Event, MqttVersion, TopicPartition};
    use mqtt_sink_testkit::broker::BrokerKnobs;
    use mqtt_sink_testkit::checker::{check, Expected};
    use mqtt_sink_testkit::sim::{record, test_config, Harness, LinkKnobs};
    use proptest::prelude::*;

    fn version() -> impl Strategy<Value = MqttVersion> {
        prop_oneof![
            Just(MqttVersion::V31),
            Just(MqttVersion::V311),
            Just(MqttVersion::V5)
        ]
    }

    proptest! {
        #![proptest_config(super::config())]

        #[test]
        fn poison_records_are_given_up_once_and_the_rest_arrive(
            version in version(),
            qos in 1u8..=2,
            window in 1u32..=8,
            max_chunk in 0usize..6,
            poison in prop::collection::btree_set(0i64..30, 1..3),
            n in 1i64..30,
            seed in any::<u64>(),
        ) {
            let poison: Vec<i64> = poison.into_iter().filter(|p| *p < n).collect();
            let mut cfg = test_config(version, qos);
            cfg.error_policy = ErrorPolicy::Skip;
            cfg.max_inflight = window;
            cfg.reconnect_jitter_seed = Some(seed);
            let knobs = BrokerKnobs {
                close_on_topics: poison.iter().map(|o| format!("sensors/bad{o}")).collect(),
                ..BrokerKnobs::default()
            };
            let link = LinkKnobs { max_chunk, ..LinkKnobs::default() };
            let mut h = Harness::new(cfg, knobs, link, seed);
            prop_assert!(h.run_until(Duration::from_secs(30), |h| h.sink.is_connected()));
            let key = |o: i64| if poison.contains(&o) { format!("bad{o}") } else { format!("k{}", o % 3) };
            for o in 0..n {
                h.push(record("readings", 0, o, &key(o), &format!("v{o}"))).map_err(|e| TestCaseError::fail(format!("push: {e}")))?;
            }
            let tp = TopicPartition::new("readings", 0);
            prop_assert_eq!(
                h.flush_with_deadline(h.now + Duration::from_secs(3600)),
                Event::FlushCompleted { offsets: vec![(tp, n)] }
            );
            let rejected: Vec<String> = h.events.iter().filter_map(|(_, e)| match e {
                Event::RecordRejected { coords, .. } => Some(coords.to_string()),
                _ => None,
            }).collect();
            let want: Vec<String> = poison.iter().map(|o| format!("readings/0@{o}")).collect();
            prop_assert_eq!(rejected, want);
            let expected: Vec<Expected> = (0..n).filter(|o| !poison.contains(o)).map(|o| Expected {
                topic: format!("sensors/{}", key(o)),
                payload: Bytes::from(format!("v{o}")),
            }).collect();
            let delivered: Vec<_> = h.broker.delivered().iter()
                .filter(|d| !d.topic.starts_with("sensors/bad"))
                .map(|d| (d.topic.clone(), d.payload.clone())).collect();
            check(&expected, &delivered, true).map_err(TestCaseError::fail)?;
            // The first connection and poison_after closes per poison record, plus the
            // few a publish ahead of it can cost while still unacknowledged.
            let connects = h.broker.connects().len();
            let bound = 1 + poison.len() * (3 + window as usize);
            prop_assert!(connects <= bound, "{} connections > {}", connects, bound);
            prop_assert!(h.broker.violations().is_empty(), "{:?}", h.broker.violations());
        }
    }
}
