//! The core's hot path, with no IO: `push_record` -> `poll_transmit` -> the broker's acks
//! through `handle_input` -> events drained, as a runtime drives it.
//!
//! `cargo bench -p mqtt-sink-core --bench hot_path`: criterion reports the time per batch
//! of 256 records and records/s; ns per record = time / 256. Each case reuses one sink, so
//! the in-flight window, ledger and buffers are in steady state.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mqtt_sink_core::{Config, MqttVersion, Record, Sink, TopicPartition};

const BATCH: usize = 256;
const KEYS: usize = 100;

struct Bench {
    sink: Sink,
    now: Instant,
    tps: Vec<TopicPartition>,
    next: Vec<i64>,
    keys: Vec<Bytes>,
    value: Bytes,
    out: Vec<u8>,
    acks: Vec<u8>,
    seq: usize,
}

impl Bench {
    fn new(version: MqttVersion, qos: u8) -> Self {
        let mut cfg = Config::new("bench", "127.0.0.1", 1883, "bench");
        cfg.tls_enabled = false;
        cfg.version = version;
        cfg.qos = qos;
        // The benchmark is the runtime here: it supplies the (one, fixed) `now`.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let mut sink = Sink::with_config(cfg, now).unwrap();
        let tps: Vec<_> = (0..16)
            .map(|p| TopicPartition::new("bench-in", p))
            .collect();
        for tp in &tps {
            sink.assign(tp.clone(), Some(0));
        }
        let mut out = Vec::new();
        while sink.poll_event().is_some() {}
        sink.handle_connected(now);
        transmit(&mut sink, now, &mut out);
        // CONNACK accepted; MQTT 5 announces Topic Alias Maximum 100, as Mosquitto can.
        let connack: &[u8] = match version {
            MqttVersion::V5 => &[0x20, 0x06, 0x00, 0x00, 0x03, 0x22, 0x00, 100],
            _ => &[0x20, 0x02, 0x00, 0x00],
        };
        sink.handle_input(now, connack).unwrap();
        while sink.poll_event().is_some() {}
        Bench {
            sink,
            now,
            tps,
            next: vec![0; 16],
            keys: (0..KEYS).map(|k| Bytes::from(format!("key-{k}"))).collect(),
            value: Bytes::from(vec![b'v'; 200]),
            out,
            acks: Vec::new(),
            seq: 0,
        }
    }

    /// One batch of records end to end; returns the bytes written (to keep it observable).
    fn round(&mut self) -> usize {
        let now = self.now;
        for _ in 0..BATCH {
            let p = self.seq % 16;
            let key = self.keys[self.seq % KEYS].clone();
            self.seq += 1;
            let r = Record::new(
                self.tps[p].clone(),
                self.next[p],
                Some(key),
                Some(self.value.clone()),
            );
            self.next[p] += 1;
            self.sink.push_record(now, r).unwrap();
        }
        let mut written = 0;
        // Until the broker has nothing more to answer (QoS 2 takes two round trips).
        for _ in 0..8 {
            self.out.clear();
            transmit(&mut self.sink, now, &mut self.out);
            written += self.out.len();
            self.acks.clear();
            answer(&self.out, &mut self.acks);
            if self.acks.is_empty() {
                break;
            }
            self.sink.handle_input(now, &self.acks).unwrap();
            while let Some(e) = self.sink.poll_event() {
                drop(black_box(e));
            }
        }
        // Commit as the bridge does, so the ledger stays in steady state.
        let positions = self.sink.commit_positions();
        self.sink.handle_committed(&positions);
        written
    }
}

/// The broker's answers to what the sink wrote: PUBACK or PUBREC for each QoS 1/2 PUBLISH,
/// PUBCOMP for each PUBREL.
fn answer(mut out: &[u8], acks: &mut Vec<u8>) {
    while !out.is_empty() {
        let header = out[0];
        let (len, used) = remaining_length(&out[1..]);
        let body = &out[1 + used..1 + used + len];
        match header >> 4 {
            3 => {
                let qos = (header >> 1) & 3;
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let id = &body[2 + topic_len..4 + topic_len];
                match qos {
                    1 => acks.extend_from_slice(&[0x40, 2, id[0], id[1]]),
                    2 => acks.extend_from_slice(&[0x50, 2, id[0], id[1]]),
                    _ => {}
                }
            }
            6 => acks.extend_from_slice(&[0x70, 2, body[0], body[1]]),
            _ => {}
        }
        out = &out[1 + used + len..];
    }
}

fn remaining_length(b: &[u8]) -> (usize, usize) {
    let (mut len, mut shift) = (0usize, 0);
    for (i, byte) in b.iter().enumerate() {
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return (len, i + 1);
        }
        shift += 7;
    }
    panic!("truncated remaining length");
}

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("push_transmit_ack");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.measurement_time(Duration::from_secs(3));
    for (name, version, qos) in [
        ("v3.1.1", MqttVersion::V311, 0),
        ("v3.1.1", MqttVersion::V311, 1),
        ("v3.1.1", MqttVersion::V311, 2),
        ("v5-alias", MqttVersion::V5, 1),
    ] {
        let mut b = Bench::new(version, qos);
        g.bench_function(BenchmarkId::new(name, format!("qos{qos}")), |bch| {
            bch.iter(|| black_box(b.round()))
        });
    }
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);

/// Drains the sink's output as a runtime that writes everything at once does.
fn transmit(sink: &mut Sink, now: Instant, out: &mut Vec<u8>) {
    loop {
        let before = out.len();
        if !sink.poll_transmit(now, out) {
            return;
        }
        sink.handle_written(now, out.len() - before);
    }
}
