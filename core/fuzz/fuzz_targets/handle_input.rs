//! Arbitrary broker bytes into `Sink::handle_input`, in each version and QoS, before and
//! after CONNACK, with records in flight. Nothing may panic; outputs must stay drainable.
//!
//!     cargo install cargo-fuzz && cd core/fuzz && cargo +nightly fuzz run handle_input
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mqtt_sink_core::{Config, MqttVersion, Record, Sink, TopicPartition};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let version = [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5][usize::from(sel % 3)];
    let mut cfg = Config::new("fuzz", "localhost", 1883, "t");
    cfg.version = version;
    cfg.qos = (sel / 3) % 3;
    cfg.tls_enabled = false;
    let now = Instant::now();
    let Ok(mut sink) = Sink::with_config(cfg, now) else { return };
    let mut out = Vec::new();
    while sink.poll_event().is_some() {}
    sink.handle_connected(now);
    transmit(&mut sink, now, &mut out);
    // Optionally accept the connection first, so that acks reach the session.
    let rest = if sel & 0x80 != 0 {
        let _ = sink.handle_input(now, &[0x20, 0x02, 0x00, 0x00]);
        for off in 0..5 {
            let tp = TopicPartition::new("k", 0);
            let _ = sink.push_record(now, Record::new(tp, off, Some("key"), Some("v")));
        }
        transmit(&mut sink, now, &mut out);
        rest
    } else {
        rest
    };
    for chunk in rest.chunks(7) {
        let _ = sink.handle_input(now, chunk);
        transmit(&mut sink, now, &mut out);
        while sink.poll_event().is_some() {}
        sink.handle_timeout(now + Duration::from_secs(100));
    }
});

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
