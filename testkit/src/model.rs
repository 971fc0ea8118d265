//! The proptest model: a simulated Kafka log consumed into a [`Harness`] under random
//! operations and faults, with the core's invariants checked after every step.
//!
//! Invariants (numbered as in the core issue):
//! 1. a committed offset never passes a record the broker has not acknowledged;
//! 2. with a healthy broker every record is eventually acknowledged and committed;
//! 3. per MQTT topic the broker receives records in offset order, except replays;
//! 4. in-flight count <= window, and packet ids are unique in flight (the broker checks);
//! 5. how input bytes are chunked never changes the events;
//! 6. the same seed gives the same transcript;
//! 7. a flush with missing acks times out at its deadline, not later;
//! 8. QoS 2 delivers each record to the broker once per session.
//!
//! With [`Scenario::connections`] = 3 the sink publishes on three MQTT connections (records
//! routed by topic); the faults (cuts, DISCONNECTs, ack loss and delay, reordering) hit
//! connection 0 only, and every invariant holds across all three.
//!
//! With [`Scenario::mixed_qos`] a transform gives each record its own QoS (its offset
//! modulo 3): the delivery invariants hold for its QoS 1/2 records, and every publish
//! reaches the broker at its record's QoS, resends included.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_core::{Config, Event, MqttVersion, PushError, Record, TopicPartition};
use proptest::prelude::*;

use crate::broker::BrokerKnobs;
use crate::checker::{check, Expected};
use crate::sim::{is_flush_outcome, test_config, Harness, LinkKnobs};

/// Kafka topic of the model's log.
pub const TOPIC: &str = "events";

/// One operation of a run.
#[derive(Debug, Clone)]
pub enum Op {
    /// Consume and push up to this many records (stops when the sink is full).
    Produce(u8),
    /// Begin a flush with this timeout (ms) and run until its outcome.
    Flush(u16),
    /// Cut the connection.
    Cut,
    /// The broker sends DISCONNECT.
    ServerDisconnect,
    /// Let simulated time pass (ms).
    Advance(u16),
    /// Drop this percentage of acknowledgements from now on.
    AckLoss(u8),
    /// Delay acknowledgements by this many ms from now on.
    AckDelay(u16),
    /// Emit due acknowledgements in random order across packet ids (or not).
    Reorder(bool),
}

/// Operation strategy; faults are rarer than traffic.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (50u16..3000).prop_map(Op::Flush),
        12 => op_without_flush(),
    ]
}

/// Operations without flushes (so without rewinds).
pub fn op_without_flush() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40).prop_map(Op::Produce),
        1 => Just(Op::Cut),
        1 => Just(Op::ServerDisconnect),
        3 => (1u16..2000).prop_map(Op::Advance),
        1 => prop_oneof![Just(0u8), Just(5), Just(30), Just(100)].prop_map(Op::AckLoss),
        1 => (0u16..300).prop_map(Op::AckDelay),
        1 => any::<bool>().prop_map(Op::Reorder),
    ]
}

/// The shape of one run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Seed of the broker, link and backoff.
    pub seed: u64,
    /// MQTT version.
    pub version: MqttVersion,
    /// QoS 1 or 2 (0 too, for the properties that do not check delivery: QoS 0 may lose
    /// records on a cut by design).
    pub qos: u8,
    /// Partitions of the log.
    pub partitions: i32,
    /// The log: per record, (partition, key index, payload padding).
    pub log: Vec<(i32, u8, u8)>,
    /// Operations.
    pub ops: Vec<Op>,
    /// Link chunking (0: whole writes).
    pub max_chunk: usize,
    /// MQTT 5 broker Receive Maximum.
    pub receive_maximum: Option<u16>,
    /// Configured in-flight window.
    pub max_inflight: u32,
    /// Buffer limit in records.
    pub max_buffered: usize,
    /// A transform sets each record's QoS to its offset modulo 3, over `qos`.
    pub mixed_qos: bool,
    /// MQTT connections (1 or 3); faults hit connection 0 only.
    pub connections: usize,
}

impl Scenario {
    /// The QoS of the record at `offset`.
    pub fn qos_of(&self, offset: i64) -> u8 {
        if self.mixed_qos {
            (offset % 3) as u8
        } else {
            self.qos
        }
    }
}

/// Scenario strategy.
pub fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        prop_oneof![
            Just(MqttVersion::V31),
            Just(MqttVersion::V311),
            Just(MqttVersion::V5)
        ],
        1u8..=2,
        1i32..=4,
        prop::collection::vec((0i32..4, 0u8..6, 0u8..64), 1..300),
        prop::collection::vec(op(), 1..60),
        prop_oneof![Just(0usize), 1usize..8, Just(1)],
        prop::option::of(1u16..20),
        1u32..50,
        5usize..200,
        prop::bool::weighted(0.25),
        prop_oneof![Just(1usize), Just(3)],
    )
        .prop_map(
            |(
                seed,
                version,
                qos,
                partitions,
                log,
                ops,
                max_chunk,
                rm,
                max_inflight,
                max_buffered,
                mixed_qos,
                connections,
            )| {
                // As in Kafka, a key always maps to the same partition.
                let log = log
                    .into_iter()
                    .map(|(_, k, pad)| (i32::from(k) % partitions, k, pad))
                    .collect();
                Scenario {
                    seed,
                    version,
                    qos,
                    partitions,
                    log,
                    ops,
                    max_chunk,
                    receive_maximum: rm,
                    max_inflight,
                    max_buffered,
                    mixed_qos,
                    connections,
                }
            },
        )
}

/// The simulated Kafka side: per-partition logs and consumer positions.
#[derive(Debug)]
struct Kafka {
    logs: Vec<Vec<Record>>,
    next: Vec<usize>,
    rr: usize,
}

impl Kafka {
    fn new(s: &Scenario) -> Self {
        let mut logs: Vec<Vec<Record>> = vec![Vec::new(); s.partitions as usize];
        for &(p, k, pad) in &s.log {
            let log = &mut logs[p as usize];
            let offset = log.len() as i64;
            let payload = format!("p{p}-o{offset}-{}", "x".repeat(pad as usize));
            log.push(Record::new(
                TopicPartition::new(TOPIC, p),
                offset,
                Some(Bytes::from(format!("key{k}"))),
                Some(Bytes::from(payload)),
            ));
        }
        Self {
            next: vec![0; logs.len()],
            logs,
            rr: 0,
        }
    }

    /// The next record to consume, round-robin over partitions.
    fn peek(&self) -> Option<Record> {
        let n = self.logs.len();
        (0..n)
            .map(|i| (self.rr + i) % n)
            .find_map(|p| self.logs[p].get(self.next[p]).cloned())
    }

    fn advance(&mut self, r: &Record) {
        let p = r.tp.partition as usize;
        self.next[p] = r.offset as usize + 1;
        self.rr = p + 1;
    }

    fn seek(&mut self, tp: &TopicPartition, offset: i64) {
        self.next[tp.partition as usize] = offset as usize;
    }

    fn end_offsets(&self) -> Vec<(TopicPartition, i64)> {
        self.logs
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(p, l)| (TopicPartition::new(TOPIC, p as i32), l.len() as i64))
            .collect()
    }

    /// The records that must arrive: those at QoS 1/2.
    fn expected(&self, s: &Scenario) -> Vec<Expected> {
        self.logs
            .iter()
            .flatten()
            .filter(|r| s.qos_of(r.offset) > 0)
            .map(|r| Expected {
                topic: format!(
                    "sensors/{}",
                    std::str::from_utf8(r.key.as_deref().unwrap_or_default()).unwrap_or("?")
                ),
                payload: r.value.clone().unwrap_or_default(),
            })
            .collect()
    }
}

/// What a run observed, for comparisons between runs.
#[derive(Debug)]
pub struct Outcome {
    /// Every event with its simulated time.
    pub events: Vec<(Duration, Event)>,
    /// The full transcript.
    pub transcript: Vec<String>,
}

fn config(s: &Scenario) -> Config {
    let mut cfg = test_config(s.version, s.qos);
    cfg.max_inflight = s.max_inflight;
    cfg.max_buffered_records = s.max_buffered;
    cfg.clean_session = false;
    cfg.reconnect_jitter_seed = Some(s.seed);
    // The cuts here are link faults at random moments, not a broker refusing a publish:
    // with poison detection on, three cuts in a row after the same publish would give up on
    // a healthy record. Poison detection has its own property (`poison_records_are_...`).
    cfg.poison_after = 0;
    cfg.flush_timeout = Duration::from_secs(30);
    cfg.connections = s.connections;
    if s.mixed_qos {
        // The payload and topic as without it (the value is not JSON: its text).
        cfg.transform = Some("{payload: .value, qos: (.offset % 3)}".into());
    }
    cfg
}

/// The offset a model payload (`p{partition}-o{offset}-...`) names.
fn offset_of(payload: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(payload).ok()?;
    text.split('-').nth(1)?.strip_prefix('o')?.parse().ok()
}

/// Runs a scenario, checking invariants 1, 3, 4 and 7 after every step, and 2 at the end
/// (after healing every fault). With `exactly_once_check`, also invariant 8 (the caller
/// makes sure no rewind happens).
pub fn run(s: &Scenario, exactly_once_check: bool) -> Result<Outcome, TestCaseError> {
    let knobs = BrokerKnobs {
        receive_maximum: s.receive_maximum.filter(|_| s.version == MqttVersion::V5),
        ..BrokerKnobs::default()
    };
    let link = LinkKnobs {
        max_chunk: s.max_chunk,
        ..LinkKnobs::default()
    };
    let mut h = Harness::new(config(s), knobs, link, s.seed);
    if exactly_once_check {
        // The first connection of a process is clean; a second one holds a session that
        // the broker keeps across the cuts to come.
        h.run_until(Duration::from_secs(30), |h| h.sink.is_connected());
        h.cut();
        h.run_until(Duration::from_secs(30), |h| h.sink.is_connected());
    }
    let mut kafka = Kafka::new(s);
    let mut acked = BTreeSet::new();
    let mut faults = false;
    let mut rewinds = 0;

    for op in &s.ops {
        match op {
            Op::Produce(n) => {
                for _ in 0..*n {
                    let Some(r) = kafka.peek() else { break };
                    match h.sink.push_record(h.now, r.clone()) {
                        Ok(()) => kafka.advance(&r),
                        Err(PushError::Full(_)) => break,
                        Err(e) => return Err(TestCaseError::fail(format!("push: {e}"))),
                    }
                    h.drain();
                }
            }
            Op::Flush(ms) => {
                if !h.sink.is_flushing() {
                    let deadline = h.now + Duration::from_millis(u64::from(*ms));
                    let before = h.events.len();
                    h.sink
                        .begin_flush(h.now, deadline)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    h.drain();
                    let start = h.elapsed();
                    h.run_until(Duration::from_millis(u64::from(*ms) + 1000), |h| {
                        h.events[before..].iter().any(|(_, e)| is_flush_outcome(e))
                    });
                    let outcome = h.events[before..]
                        .iter()
                        .find(|(_, e)| is_flush_outcome(e))
                        .cloned();
                    let Some((at, outcome)) = outcome else {
                        return Err(TestCaseError::fail("a flush never ended"));
                    };
                    let deadline_at = start + Duration::from_millis(u64::from(*ms));
                    // Invariant 7.
                    prop_assert!(at <= deadline_at, "flush ended after its deadline");
                    if matches!(outcome, Event::FlushTimedOut { .. }) {
                        prop_assert_eq!(at, deadline_at, "timed out before its deadline");
                    }
                    if !matches!(outcome, Event::FlushCompleted { .. }) {
                        rewinds += 1;
                        for (tp, off) in h.sink.rewind() {
                            kafka.seek(&tp, off);
                        }
                    }
                }
            }
            Op::Cut => {
                faults = true;
                h.cut();
            }
            Op::ServerDisconnect => {
                if h.sink.is_connected() {
                    faults = true;
                    let now = h.now;
                    h.broker.disconnect_client(now, 0x8B);
                    h.run_for(Duration::from_millis(5));
                }
            }
            Op::Advance(ms) => h.run_for(Duration::from_millis(u64::from(*ms))),
            Op::AckLoss(p) => {
                if *p > 0 {
                    faults = true;
                }
                h.broker.knobs_mut().ack_loss = f64::from(*p) / 100.0;
            }
            Op::AckDelay(ms) => {
                h.broker.knobs_mut().ack_delay = Duration::from_millis(u64::from(*ms));
            }
            Op::Reorder(b) => h.broker.knobs_mut().reorder_acks = *b,
        }
        check_step(&mut h, &mut acked, s)?;
    }

    // Heal, then everything must be acknowledged and committed (invariant 2).
    h.broker.knobs_mut().ack_loss = 0.0;
    for round in 0..50 {
        while let Some(r) = kafka.peek() {
            match h.push(r.clone()) {
                Ok(()) => kafka.advance(&r),
                Err(e) => return Err(TestCaseError::fail(format!("push while healing: {e}"))),
            }
        }
        // Healed: the flush may take long (a slow broker, a window of 1) but must complete.
        let outcome = h.flush_with_deadline(h.now + Duration::from_secs(3600));
        check_step(&mut h, &mut acked, s)?;
        if matches!(outcome, Event::FlushCompleted { .. }) {
            break;
        }
        prop_assert!(
            round < 49,
            "never completed a flush after healing: {:?}",
            outcome
        );
        rewinds += 1;
        for (tp, off) in h.sink.rewind() {
            kafka.seek(&tp, off);
        }
    }
    for (tp, end) in kafka.end_offsets() {
        prop_assert_eq!(
            h.committed_of(&tp),
            Some(end),
            "partition {} not fully committed",
            tp
        );
    }
    // Every publish at its record's QoS (invariant 8's QoS 2 included).
    for r in h.brokers().flat_map(|b| b.received()) {
        let want = offset_of(&r.payload).map(|o| s.qos_of(o));
        prop_assert_eq!(Some(r.qos), want, "QoS of {:?}", r.payload);
    }
    if !s.mixed_qos && s.qos == 0 {
        // At-most-once: what was written before a cut may be lost; nothing more to check.
        return Ok(Outcome {
            events: h.events,
            transcript: h.transcript,
        });
    }
    let faulty = faults || rewinds > 0;
    // QoS 0 records may be lost on a cut by design: only the others are checked.
    let at_least_once = |p: &Bytes| offset_of(p).is_some_and(|o| s.qos_of(o) > 0);
    // Per topic in order, across the connections (a topic moves when it is idle).
    let delivered: Vec<_> = h
        .delivered()
        .into_iter()
        .filter(|d| at_least_once(&d.payload))
        .map(|d| (d.topic.clone(), d.payload.clone()))
        .collect();
    let expected = kafka.expected(s);
    let report = check(&expected, &delivered, faulty).map_err(TestCaseError::fail)?;
    // Invariant 3 on the raw PUBLISH stream (rejections and DUP resends included).
    let received: Vec<_> = h
        .received()
        .into_iter()
        .filter(|r| at_least_once(&r.payload))
        .map(|r| (r.topic.clone(), r.payload.clone()))
        .collect();
    check(&expected, &received, true).map_err(TestCaseError::fail)?;
    if exactly_once_check {
        prop_assert_eq!(rewinds, 0, "test setup: no rewinds in an exactly-once run");
        let qos2 = |p: &Bytes| offset_of(p).is_some_and(|o| s.qos_of(o) == 2);
        let twice = if s.mixed_qos {
            let delivered: Vec<_> = delivered.into_iter().filter(|(_, p)| qos2(p)).collect();
            let expected: Vec<_> = expected.into_iter().filter(|e| qos2(&e.payload)).collect();
            check(&expected, &delivered, faulty)
                .map_err(TestCaseError::fail)?
                .duplicates
        } else {
            report.duplicates
        };
        prop_assert_eq!(twice, 0, "QoS 2 delivered a record twice");
    }
    Ok(Outcome {
        events: h.events,
        transcript: h.transcript,
    })
}

fn check_step(
    h: &mut Harness,
    acked: &mut BTreeSet<Bytes>,
    s: &Scenario,
) -> Result<(), TestCaseError> {
    for d in h.brokers().flat_map(|b| b.delivered()) {
        acked.insert(d.payload.clone());
    }
    // Invariant 1: below every committed (and committable) position, all acknowledged.
    let positions = h
        .committed
        .iter()
        .chain(h.sink.commit_positions().iter())
        .cloned()
        .collect::<Vec<_>>();
    for (tp, pos) in positions {
        for offset in (0..pos).filter(|&o| s.qos_of(o) > 0) {
            let p = format!("p{}-o{offset}-", tp.partition);
            let ok = acked
                .range(Bytes::from(p.clone())..)
                .next()
                .is_some_and(|b| b.starts_with(p.as_bytes()));
            prop_assert!(
                ok,
                "position {} of {} passes unacknowledged offset {}",
                pos,
                tp,
                offset
            );
        }
    }
    // Invariant 4.
    let st = h.sink.stats();
    prop_assert!(
        st.inflight <= usize::from(st.window),
        "in flight {} > window {}",
        st.inflight,
        st.window
    );
    for b in h.brokers() {
        prop_assert!(
            b.violations().is_empty(),
            "broker saw violations: {:?}",
            b.violations()
        );
    }
    prop_assert!(
        h.protocol_errors.is_empty(),
        "protocol errors: {:?}",
        h.protocol_errors
    );
    Ok(())
}
