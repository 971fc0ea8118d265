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
