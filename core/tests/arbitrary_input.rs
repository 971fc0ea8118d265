//! Stable-toolchain companion of the cargo-fuzz target: arbitrary broker bytes never panic
//! the sink, in any version or QoS, before or after CONNACK.
// This test plays the runtime, which owns the clock.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use mqtt_sink_core::{Config, MqttVersion, Record, Sink, TopicPartition};
use proptest::prelude::*;

proptest! {
    #[test]
    fn arbitrary_broker_bytes_never_panic(
        sel in 0u8..=255,
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..16,
    ) {
        let version = [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5][usize::from(sel % 3)];
        let mut cfg = Config::new("fuzz", "localhost", 1883, "t");
        cfg.version = version;
        cfg.qos = (sel / 3) % 3;
        let now = Instant::now();
        let mut sink = Sink::with_config(cfg, now).expect("valid config");
        let mut out = Vec::new();
        while sink.poll_event().is_some() {}
        sink.handle_connected(now);
        transmit(&mut sink, now, &mut out);
        if sel & 0x80 != 0 {
            let _ = sink.handle_input(now, &[0x20, 0x02, 0x00, 0x00]);
            for off in 0..5 {
                let r = Record::new(TopicPartition::new("k", 0), off, Some("key"), Some("v"));
                let _ = sink.push_record(now, r);
            }
            transmit(&mut sink, now, &mut out);
        }
        for c in bytes.chunks(chunk) {
            let _ = sink.handle_input(now, c);
            transmit(&mut sink, now, &mut out);
            while sink.poll_event().is_some() {}
            sink.handle_timeout(now + Duration::from_secs(100));
        }
    }
}

/// Drains the sink's output as a runtime that writes everything at once does.
fn transmit(sink: &mut Sink, now: Instant, out: &mut Vec<u8>) {
    for _ in 0..10_000 {
        let before = out.len();
        if !sink.poll_transmit(now, out) {
            return;
        }
        sink.handle_written(now, out.len() - before);
    }
}
