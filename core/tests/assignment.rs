//! C1 at the sink: once assignments are in use, a record of a partition that is not
//! assigned (revoked since, or never assigned) is refused, so it can never re-create the
//! partition in the ledger and be committed by a member that no longer owns it.
#![allow(clippy::disallowed_methods)] // the test plays the runtime

use std::time::Instant;

use mqtt_sink_core::{Config, PushError, Record, Sink, TopicPartition};

fn sink(now: Instant) -> Sink {
    let mut cfg = Config::new("c1", "localhost", 1883, "sensors");
    cfg.tls_enabled = false;
    Sink::with_config(cfg, now).expect("valid config")
}

#[test]
fn a_push_after_a_revoke_is_refused_and_never_committable() {
    let now = Instant::now();
    let mut s = sink(now);
    let tp = TopicPartition::new("t", 0);
    s.assign(tp.clone(), Some(150));
    s.revoke(&tp);
    let r = Record::new(tp.clone(), 150, Some("k"), Some("v"));
    match s.push_record(now, r) {
        Err(PushError::NotAssigned(r)) => assert_eq!(r.offset, 150),
        other => panic!("a push for a revoked partition was not refused: {other:?}"),
    }
    assert_eq!(s.commit_positions(), vec![]);
    // A partition never assigned is refused too, once assignments are in use.
    let other = Record::new(TopicPartition::new("t", 1), 0, Some("k"), Some("v"));
    assert!(matches!(
        s.push_record(now, other),
        Err(PushError::NotAssigned(_))
    ));
}

#[test]
fn without_assignments_every_partition_is_taken() {
    let now = Instant::now();
    let mut s = sink(now);
    let r = Record::new(TopicPartition::new("t", 0), 0, Some("k"), Some("v"));
    assert!(s.push_record(now, r).is_ok());
}
