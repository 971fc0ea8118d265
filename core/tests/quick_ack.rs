//! `Sink::quick_ack_wanted`: the runtimes acknowledge broker data at once (TCP_QUICKACK)
//! exactly while acknowledgements are awaited and nothing of ours waits to be sent. Without
//! it, a broker with Nagle's algorithm held the last PUBACKs of every checkpoint for our
//! 40 ms delayed ACK; with it always on, the blocking runtime spent 2 us more per record
//! under load (BENCHMARKS.md, latency).
#![allow(clippy::disallowed_methods, clippy::unwrap_used)] // the test plays the runtime

use std::time::Instant;

use mqtt_sink_core::{Config, Record, Sink, TopicPartition};

fn transmit(sink: &mut Sink, now: Instant) -> usize {
    let mut out = Vec::new();
    while sink.poll_transmit(now, &mut out) {}
    sink.handle_written(now, out.len());
    out.len()
}

#[test]
fn quick_ack_is_wanted_only_while_acks_are_awaited_and_nothing_waits() {
    let now = Instant::now();
    let mut cfg = Config::new("qa", "localhost", 1883, "t");
    cfg.tls_enabled = false;
    cfg.max_inflight = 1;
    let mut sink = Sink::with_config(cfg, now).unwrap();
    while sink.poll_event().is_some() {}
    assert!(!sink.quick_ack_wanted(), "not connected");
    sink.handle_connected(now);
    transmit(&mut sink, now);
    sink.handle_input(now, &[0x20, 0x02, 0x00, 0x00]).unwrap();
    assert!(!sink.quick_ack_wanted(), "connected, nothing in flight");
    let tp = TopicPartition::new("k", 0);
    for offset in 0..2 {
        let r = Record::new(tp.clone(), offset, Some("key"), Some("v"));
        sink.push_record(now, r).unwrap();
    }
    assert!(transmit(&mut sink, now) > 0);
    assert!(
        !sink.quick_ack_wanted(),
        "one in flight and one waiting for the window: its write carries our ACK"
    );
    sink.handle_input(now, &[0x40, 0x02, 0x00, 0x01]).unwrap();
    assert!(transmit(&mut sink, now) > 0);
    assert!(
        sink.quick_ack_wanted(),
        "the last one in flight, nothing waits: its PUBACK must not wait for a delayed ACK"
    );
    sink.handle_input(now, &[0x40, 0x02, 0x00, 0x02]).unwrap();
    assert!(!sink.quick_ack_wanted(), "nothing awaited");
}
