//! The bridge model's oracle: what every broker received and accepted, what the dead-letter
//! topic holds, and what Kafka committed, checked against the invariants after every step
//! (and every commit request at the moment it is made).
//!
//! - (a) a commit position never passes a record that is neither accepted by a broker nor
//!   handled by the policy (`skip`: the record cannot be published, or a broker rejected it;
//!   `dead-letter`: the dead-letter topic holds it, i.e. its delivery report was a success);
//! - (b) no member asks to commit a partition it does not own at the moment of the request
//!   (whether Kafka accepts it or not);
//! - (e) per MQTT topic, records reach the brokers in offset order: a record never arrives
//!   while an earlier record of its topic has never arrived anywhere, and an arrival at or
//!   below the highest offset that topic has seen (a replay) needs an earlier fault.
//!
//! (c) and (d) are the harness's: it knows when the run is quiet and what the flows report.
//!
//! Records are recognised by their value, `{partition}:{offset}:{padding}`
//! ([`record_value`]); each record's MQTT topic is `{topic_root}/{key}`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use mqtt_sink_core::{ErrorPolicy, RecordCoords, TopicPartition};

use crate::broker::SimBroker;
use crate::sim_kafka::SimKafka;

/// The value of the model's record at `offset` of partition `p`.
pub fn record_value(p: i32, offset: i64, pad: usize) -> Bytes {
    Bytes::from(format!("{p}:{offset}:{}", "x".repeat(pad)))
}

fn parse_value(topic: &str, payload: &[u8]) -> Option<RecordCoords> {
    let s = std::str::from_utf8(payload).ok()?;
    let mut it = s.split(':');
    let p = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    Some(RecordCoords {
        tp: TopicPartition::new(topic, p),
        offset,
    })
}

/// Per record of a partition: its offset and its MQTT topic (`None`: it cannot be published).
type LogIndex = Vec<(i64, Option<String>)>;

/// The oracle. See the module docs.
#[derive(Debug)]
pub(crate) struct Invariants {
    kafka_topic: String,
    topic_root: String,
    policy: ErrorPolicy,
    logs: BTreeMap<TopicPartition, LogIndex>,
    /// Per MQTT topic: its partition and its records' offsets, in order.
    topics: BTreeMap<String, (TopicPartition, Vec<i64>)>,
    delivered: BTreeSet<RecordCoords>,
    received: BTreeSet<RecordCoords>,
    dead_lettered: BTreeSet<RecordCoords>,
    seen_received: Vec<usize>,
    seen_delivered: Vec<usize>,
    seen_dead_letters: usize,
    seen_commits: usize,
    /// Per partition: index of the first record not handled (it only grows).
    safe: BTreeMap<TopicPartition, usize>,
    /// Per MQTT topic: index of the first record that never arrived (it only grows).
    arrived: BTreeMap<String, usize>,
    highest: BTreeMap<String, i64>,
    /// Arrivals whose order is checked at the end of the step: (topic, offset, member).
    pending: Vec<(String, i64, usize)>,
    /// A fault happened: replays are allowed from now on.
    pub(crate) faulty: bool,
    /// Arrivals at or below a topic's highest offset.
    pub(crate) replays: u64,
    violations: Vec<String>,
    skip: BTreeSet<char>,
}

impl Invariants {
    pub(crate) fn new(kafka_topic: &str, topic_root: &str, policy: ErrorPolicy) -> Self {
        Self {
            kafka_topic: kafka_topic.to_owned(),
            topic_root: topic_root.to_owned(),
            policy,
            logs: BTreeMap::new(),
            topics: BTreeMap::new(),
            delivered: BTreeSet::new(),
            received: BTreeSet::new(),
            dead_lettered: BTreeSet::new(),
            seen_received: Vec::new(),
            seen_delivered: Vec::new(),
            seen_dead_letters: 0,
            seen_commits: 0,
            safe: BTreeMap::new(),
            arrived: BTreeMap::new(),
            highest: BTreeMap::new(),
            pending: Vec::new(),
            faulty: false,
            replays: 0,
            violations: Vec::new(),
            skip: BTreeSet::new(),
        }
    }

    /// Invariants not to check, by letter (to look past a known failure).
    pub(crate) fn skip(&mut self, letters: &str) {
        self.skip = letters.chars().filter(char::is_ascii_lowercase).collect();
    }

    /// Records a violation (once), unless its invariant is skipped.
    pub(crate) fn violation(&mut self, v: String) {
        let letter = v
            .strip_prefix('(')
            .and_then(|r| r.chars().next())
            .filter(|_| v.as_bytes().get(2) == Some(&b')'));
        if letter.is_some_and(|l| self.skip.contains(&l)) {
            return;
        }
        if !self.violations.contains(&v) {
            self.violations.push(v);
        }
    }

    pub(crate) fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Takes in what Kafka and the brokers did since the last call.
    pub(crate) fn observe(&mut self, kafka: &SimKafka, brokers: &[&SimBroker]) {
        for tp in kafka.partitions() {
            let known = self.logs.entry(tp.clone()).or_default();
            for r in &kafka.log(&tp)[known.len()..] {
                let topic = r
                    .key
                    .as_ref()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .map(|k| format!("{}/{k}", self.topic_root));
                if let Some(t) = &topic {
                    let entry = self
                        .topics
                        .entry(t.clone())
                        .or_insert_with(|| (tp.clone(), Vec::new()));
                    entry.1.push(r.offset);
                }
                known.push((r.offset, topic));
            }
        }
        self.seen_received.resize(brokers.len(), 0);
        self.seen_delivered.resize(brokers.len(), 0);
        for (i, b) in brokers.iter().enumerate() {
            for r in &b.received()[self.seen_received[i]..] {
                let Some(c) = parse_value(&self.kafka_topic, &r.payload) else {
                    self.violation(format!(
                        "member {i}'s broker received an unknown payload {:?} on {}",
                        r.payload, r.topic
                    ));
                    continue;
                };
                self.received.insert(c.clone());
                let highest = self.highest.get(&r.topic).copied().unwrap_or(-1);
                if c.offset <= highest {
                    self.replays += 1;
                    if !self.faulty {
                        let v = format!(
                            "(e) {}: {c} reached member {i}'s broker after offset {highest} \
                             had, without any fault (a replay or reordering)",
                            r.topic
                        );
                        self.violation(v);
                    }
                }
                self.highest.insert(r.topic.clone(), highest.max(c.offset));
                self.pending.push((r.topic.clone(), c.offset, i));
            }
            self.seen_received[i] = b.received().len();
            for d in &b.delivered()[self.seen_delivered[i]..] {
                if let Some(c) = parse_value(&self.kafka_topic, &d.payload) {
                    self.delivered.insert(c);
                }
            }
            self.seen_delivered[i] = b.delivered().len();
        }
        for r in &kafka.dead_letters()[self.seen_dead_letters..] {
            self.dead_lettered.insert(r.coords());
        }
        self.seen_dead_letters = kafka.dead_letters().len();
    }

    fn handled(&self, tp: &TopicPartition, offset: i64, topic: Option<&String>) -> bool {
        let c = RecordCoords {
            tp: tp.clone(),
            offset,
        };
        self.delivered.contains(&c)
            || self.dead_lettered.contains(&c)
            || (self.policy == ErrorPolicy::Skip && (topic.is_none() || self.received.contains(&c)))
    }

    /// The highest commit position of `tp` that passes only handled records.
    pub(crate) fn safe_position(&mut self, tp: &TopicPartition) -> i64 {
        let Some(log) = self.logs.get(tp) else {
            return 0;
        };
        let mut i = self.safe.get(tp).copied().unwrap_or(0);
        while let Some((offset, topic)) = log.get(i) {
            if !self.handled(tp, *offset, topic.as_ref()) {
                break;
            }
            i += 1;
        }
        self.safe.insert(tp.clone(), i);
        log.get(i).map_or(i64::MAX, |(offset, _)| *offset)
    }

    /// Invariant (a) on a commit request, at the moment it is made (call
    /// [`observe`](Self::observe) first).
    pub(crate) fn check_commit(&mut self, member: usize, offsets: &[(TopicPartition, i64)]) {
        for (tp, pos) in offsets {
            let safe = self.safe_position(tp);
            if *pos > safe {
                let v = format!(
                    "(a) member {member} commits {tp} at {pos}, past record {tp}@{safe}, which \
                     no broker accepted and the {} policy did not handle",
                    self.policy
                );
                self.violation(v);
            }
        }
    }

    /// The end of a step: invariants (a) on Kafka's committed offsets, (b) on the commits
    /// since the last step, and (e) on the arrivals since the last step.
    pub(crate) fn end_step(&mut self, kafka: &SimKafka) {
        for (topic, offset, member) in std::mem::take(&mut self.pending) {
            let Some((tp, offsets)) = self.topics.get(&topic) else {
                self.violation(format!("(e) {topic}: no record maps to it"));
                continue;
            };
            let mut i = self.arrived.get(&topic).copied().unwrap_or(0);
            while offsets.get(i).is_some_and(|o| {
                self.received.contains(&RecordCoords {
                    tp: tp.clone(),
                    offset: *o,
                })
            }) {
                i += 1;
            }
            let first_missing = offsets.get(i).copied();
            self.arrived.insert(topic.clone(), i);
            if let Some(missing) = first_missing.filter(|m| *m < offset) {
                self.violation(format!(
                    "(e) {topic}: offset {offset} reached member {member}'s broker while \
                     offset {missing} of that topic had reached none"
                ));
            }
        }
        for tp in kafka.partitions() {
            if let Some(pos) = kafka.committed(&tp) {
                let safe = self.safe_position(&tp);
                if pos > safe {
                    let v = format!(
                        "(a) {tp} is committed at {pos}, past record {tp}@{safe}, which no \
                         broker accepted and the {} policy did not handle",
                        self.policy
                    );
                    self.violation(v);
                }
            }
        }
        for e in &kafka.commit_log()[self.seen_commits..] {
            // Every request counts, accepted or not: refusing it is Kafka's luck, not the
            // member's merit.
            if !e.not_owned.is_empty() {
                let v = format!(
                    "(b) member {} committed {:?} ({:?}) for {:?}, which it did not own",
                    e.member, e.offsets, e.result, e.not_owned
                );
                self.violation(v);
            }
        }
        self.seen_commits = kafka.commit_log().len();
    }
}
