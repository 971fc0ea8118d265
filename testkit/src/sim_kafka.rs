//! [`SimKafka`]: a simulated Kafka cluster for bridge tests: partition logs, one consumer
//! group of one or more members, committed offsets, and a dead-letter topic with its
//! producer. Sans-IO and seeded like [`SimBroker`](crate::broker::SimBroker): no clock (time
//! comes in as `now`), no threads; the same calls give the same answers.
//!
//! # What it models
//! - **Logs**: per partition, records in offset order from 0, with gaps where
//!   [`append`](SimKafka::append) is given one (compaction, transaction markers).
//! - **The group**: [`rebalance`](SimKafka::rebalance) sets a target assignment. Under
//!   [`Protocol::Eager`] every member revokes everything it owns, then takes its whole target;
//!   under [`Protocol::Cooperative`] a member revokes only what it loses and takes additions.
//!   A partition is handed to its new owner only once the old owner's revoke callback has
//!   returned (as the group protocol guarantees), so ownership never overlaps.
//! - **Callbacks**: a member learns of a rebalance only when its runtime polls:
//!   [`next_callback`](SimKafka::next_callback) is the rebalance callback librdkafka runs inside
//!   `poll`, and [`callback_done`](SimKafka::callback_done) is its return. A revoked partition
//!   stays owned, and committable, until then.
//! - **Fetching**: per member fetch positions, set at assignment from the committed offset
//!   (or the log start), moved by [`fetch`](SimKafka::fetch) and [`seek`](SimKafka::seek). Pauses
//!   survive revokes and reassignments, as librdkafka's do.
//! - **Faults**: seeks and commits fail while [`KafkaKnobs`] say so (a failed seek leaves the
//!   position where it was); dead-letter deliveries fail, retriably (retried until healed or
//!   timed out) or not, and their delivery report arrives later, never at send.
//! - **Crashes**: [`crash`](SimKafka::crash) removes a member without callbacks: its
//!   partitions, positions, pauses and queued dead letters are gone.
//!
//! Commits are applied like the classic group protocol does (it checks the member, not
//! partition ownership), and every commit is logged with the partitions the member did not
//! own at that moment: that log is what an invariant checks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_core::{CommitOffsets, Record, RecordCoords, TopicPartition};

/// A group member's id.
pub type MemberId = usize;

/// How a rebalance moves partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Revoke everything, then assign (classic `range` / `roundrobin`, librdkafka's default).
    Eager,
    /// Revoke only what moves away; assign additions (cooperative-sticky, KIP-848).
    Cooperative,
}

/// How dead-letter deliveries fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DlqFault {
    /// Deliveries succeed.
    #[default]
    None,
    /// The cluster answers with a retriable error: the producer retries until the fault
    /// heals (then the delivery succeeds) or `dlq_message_timeout` passes (then it fails).
    Retriable,
    /// The cluster refuses for good (authorization, record too large): the delivery fails.
    Fatal,
}

/// Behaviour of the simulated cluster; change it mid-run with [`SimKafka::knobs_mut`].
#[derive(Debug, Clone)]
pub struct KafkaKnobs {
    /// Fail this many seeks (each failure decrements it).
    pub fail_seeks: u32,
    /// Fail this many commits (each failure decrements it).
    pub fail_commits: u32,
    /// Dead-letter deliveries fail so.
    pub dlq_fault: DlqFault,
    /// Time from a dead-letter send to its delivery report (or to its first retry).
    pub dlq_latency: Duration,
    /// Time between retries of a retriable dead-letter failure.
    pub dlq_retry_backoff: Duration,
    /// A dead letter not delivered this long after its send fails (librdkafka's
    /// `message.timeout.ms`).
    pub dlq_message_timeout: Duration,
    /// At most this many records per [`fetch`](SimKafka::fetch).
    pub max_poll_records: usize,
}

impl Default for KafkaKnobs {
    fn default() -> Self {
        Self {
            fail_seeks: 0,
            fail_commits: 0,
            dlq_fault: DlqFault::None,
            dlq_latency: Duration::from_millis(5),
            dlq_retry_backoff: Duration::from_millis(100),
            dlq_message_timeout: Duration::from_secs(3),
            max_poll_records: 500,
        }
    }
}

/// A rebalance callback, as librdkafka runs it inside a consumer poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callback {
    /// These partitions are being revoked (still owned until the callback returns).
    Revoke(Vec<TopicPartition>),
    /// These partitions are assigned, with their committed positions where known.
    Assign(Vec<(TopicPartition, Option<i64>)>),
}

/// One commit request and Kafka's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEntry {
    /// The member that committed.
    pub member: MemberId,
    /// The positions.
    pub offsets: CommitOffsets,
    /// Kafka's answer.
    pub result: Result<(), String>,
    /// Partitions of `offsets` the member did not own when it committed.
    pub not_owned: Vec<TopicPartition>,
}

#[derive(Debug)]
struct Delivery {
    record: Record,
    sent: Instant,
    due: Instant,
}

#[derive(Debug, Default)]
struct Member {
    in_group: bool,
    owned: BTreeSet<TopicPartition>,
    positions: BTreeMap<TopicPartition, i64>,
    paused: BTreeSet<TopicPartition>,
    /// An eager rebalance: revoke everything owned, then take the target.
    rejoin: bool,
    /// The callback running (returned by `next_callback`, not yet `callback_done`).
    in_callback: Option<Callback>,
    deliveries: VecDeque<Delivery>,
    /// Where the next fetch starts, round-robin over partitions.
    rr: usize,
}

/// The simulated cluster. See the module docs.
#[derive(Debug)]
pub struct SimKafka {
    knobs: KafkaKnobs,
    logs: BTreeMap<TopicPartition, Vec<Record>>,
    committed: BTreeMap<TopicPartition, i64>,
    members: BTreeMap<MemberId, Member>,
    target: BTreeMap<MemberId, BTreeSet<TopicPartition>>,
    commit_log: Vec<CommitEntry>,
    dead_letters: Vec<Record>,
    /// Everything the group did, for determinism checks and failure reports.
    pub transcript: Vec<String>,
}

impl SimKafka {
    /// An empty cluster.
    pub fn new(knobs: KafkaKnobs) -> Self {
        Self {
            knobs,
            logs: BTreeMap::new(),
            committed: BTreeMap::new(),
            members: BTreeMap::new(),
            target: BTreeMap::new(),
            commit_log: Vec::new(),
            dead_letters: Vec::new(),
            transcript: Vec::new(),
        }
    }

    /// Changes behaviour mid-run.
    pub fn knobs_mut(&mut self) -> &mut KafkaKnobs {
        &mut self.knobs
    }

    /// The behaviour in force.
    pub fn knobs(&self) -> &KafkaKnobs {
        &self.knobs
    }

    // ---- logs ----

    /// Creates `topic` with `partitions` empty partitions.
    pub fn create_topic(&mut self, topic: &str, partitions: i32) {
        for p in 0..partitions {
            self.logs.entry(TopicPartition::new(topic, p)).or_default();
        }
    }

    /// Appends a record to `tp`, `gap` offsets after the previous one (0: contiguous), with
    /// the value `value(offset)`; returns its offset. Panics if `tp` does not exist.
    pub fn append(
        &mut self,
        tp: &TopicPartition,
        gap: i64,
        key: Option<Bytes>,
        value: impl FnOnce(i64) -> Bytes,
    ) -> i64 {
        let Some(log) = self.logs.get_mut(tp) else {
            panic!("test error: partition {tp} does not exist");
        };
        let offset = log.last().map_or(0, |r| r.offset + 1) + gap.max(0);
        let mut r = Record::new(tp.clone(), offset, key, Some(value(offset)));
        r.timestamp_ms = Some(offset);
        log.push(r);
        offset
    }

    /// Every partition, in order.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        self.logs.keys().cloned().collect()
    }

    /// The records of a partition, in offset order.
    pub fn log(&self, tp: &TopicPartition) -> &[Record] {
        self.logs.get(tp).map_or(&[], Vec::as_slice)
    }

    /// One past the last record's offset (0 for an empty partition): where a consumer that
    /// read everything commits.
    pub fn end_offset(&self, tp: &TopicPartition) -> i64 {
        self.log(tp).last().map_or(0, |r| r.offset + 1)
    }

    // ---- the group ----

    /// A member joins the group (a new process: nothing owned, nothing paused). It gets
    /// partitions at the next [`rebalance`](Self::rebalance) that targets it.
    pub fn join(&mut self, m: MemberId) {
        self.transcript.push(format!("member {m} joins"));
        self.members.insert(
            m,
            Member {
                in_group: true,
                ..Member::default()
            },
        );
        self.target.entry(m).or_default();
    }

    /// The group rebalances to `target` (members left out get nothing; members not in the
    /// group are ignored). The callbacks reach each member at its next polls.
    pub fn rebalance(
        &mut self,
        protocol: Protocol,
        target: &BTreeMap<MemberId, BTreeSet<TopicPartition>>,
    ) {
        self.transcript
            .push(format!("rebalance {protocol:?} to {target:?}"));
        for (m, member) in &mut self.members {
            if !member.in_group {
                continue;
            }
            self.target
                .insert(*m, target.get(m).cloned().unwrap_or_default());
            if protocol == Protocol::Eager {
                member.rejoin = true;
            }
        }
    }

    /// The member closes its consumer (after a graceful stop): returns the partitions of its
    /// last revoke callback (the runtime runs it now), then it leaves the group and its
    /// partitions are free.
    pub fn leave(&mut self, m: MemberId) -> Vec<TopicPartition> {
        self.transcript.push(format!("member {m} leaves"));
        self.target.remove(&m);
        let Some(member) = self.members.get_mut(&m) else {
            return Vec::new();
        };
        let owned = std::mem::take(&mut member.owned).into_iter().collect();
        *member = Member::default();
        owned
    }

    /// The member's process dies: it leaves the group without any callback (the group
    /// notices its session timing out), and everything it had in memory is gone.
    pub fn crash(&mut self, m: MemberId) {
        self.transcript.push(format!("member {m} crashes"));
        self.target.remove(&m);
        if let Some(member) = self.members.get_mut(&m) {
            *member = Member::default();
        }
    }

    /// True while the member is in the group.
    pub fn in_group(&self, m: MemberId) -> bool {
        self.members.get(&m).is_some_and(|x| x.in_group)
    }

    /// The member owning `tp`, if any.
    pub fn owner(&self, tp: &TopicPartition) -> Option<MemberId> {
        self.members
            .iter()
            .find(|(_, x)| x.owned.contains(tp))
            .map(|(m, _)| *m)
    }

    /// The partitions the member owns now.
    pub fn owned(&self, m: MemberId) -> Vec<TopicPartition> {
        self.members
            .get(&m)
            .map(|x| x.owned.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// True when no rebalance callback is waiting for any member: every member owns
    /// exactly its target.
    pub fn is_settled(&self) -> bool {
        self.members.iter().all(|(m, x)| {
            !x.in_group || (!x.rejoin && self.target.get(m).is_none_or(|t| *t == x.owned))
        })
    }

    /// The rebalance callback the member's next poll runs, if any. Call
    /// [`callback_done`](Self::callback_done) when the callback returns. An assignment is
    /// effective at once (the callback's commits are the member's); a revoke only at
    /// `callback_done`.
    pub fn next_callback(&mut self, m: MemberId) -> Option<Callback> {
        let owned_elsewhere: BTreeSet<TopicPartition> = self
            .members
            .iter()
            .filter(|(id, _)| **id != m)
            .flat_map(|(_, x)| x.owned.iter().cloned())
            .collect();
        let target = self.target.get(&m).cloned().unwrap_or_default();
        let member = self.members.get_mut(&m)?;
        if !member.in_group || member.in_callback.is_some() {
            return None;
        }
        let cb = if member.rejoin {
            if !member.owned.is_empty() {
                Callback::Revoke(member.owned.iter().cloned().collect())
            } else if target.iter().all(|tp| !owned_elsewhere.contains(tp)) {
                member.rejoin = false;
                if target.is_empty() {
                    return None;
                }
                Callback::Assign(target.iter().map(|tp| (tp.clone(), None)).collect())
            } else {
                // Waits for the previous owners to revoke.
                return None;
            }
        } else {
            let lose: Vec<_> = member.owned.difference(&target).cloned().collect();
            if !lose.is_empty() {
                Callback::Revoke(lose)
            } else {
                let add: Vec<_> = target
                    .difference(&member.owned)
                    .filter(|tp| !owned_elsewhere.contains(*tp))
                    .map(|tp| (tp.clone(), None))
                    .collect();
                if add.is_empty() {
                    return None;
                }
                Callback::Assign(add)
            }
        };
        let cb = match cb {
            Callback::Assign(parts) => {
                let parts: Vec<_> = parts
                    .into_iter()
                    .map(|(tp, _)| {
                        let c = self.committed.get(&tp).copied();
                        (tp, c)
                    })
                    .collect();
                let member = self.members.get_mut(&m)?;
                for (tp, c) in &parts {
                    member.owned.insert(tp.clone());
                    member.positions.insert(tp.clone(), c.unwrap_or(0));
                }
                Callback::Assign(parts)
            }
            revoke => revoke,
        };
        self.transcript.push(format!("member {m} callback {cb:?}"));
        if let Some(member) = self.members.get_mut(&m) {
            member.in_callback = Some(cb.clone());
        }
        Some(cb)
    }

    /// The rebalance callback returned: a revoke takes effect.
    pub fn callback_done(&mut self, m: MemberId) {
        let Some(member) = self.members.get_mut(&m) else {
            return;
        };
        if let Some(Callback::Revoke(tps)) = member.in_callback.take() {
            for tp in &tps {
                member.owned.remove(tp);
                member.positions.remove(tp);
            }
        }
    }

    // ---- the consumer ----

    /// Up to `max` records (and at most `max_poll_records`) from the member's owned,
    /// unpaused partitions, round-robin, each partition in offset order from its position.
    pub fn fetch(&mut self, m: MemberId, max: usize) -> Vec<Record> {
        let max = max.min(self.knobs.max_poll_records);
        let Some(member) = self.members.get_mut(&m) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let parts: Vec<_> = member
            .owned
            .iter()
            .filter(|tp| !member.paused.contains(*tp))
            .cloned()
            .collect();
        if parts.is_empty() || max == 0 {
            return out;
        }
        for i in 0..parts.len() {
            if out.len() >= max {
                break;
            }
            let tp = &parts[(member.rr + i) % parts.len()];
            let Some(pos) = member.positions.get_mut(tp) else {
                continue;
            };
            let log = self.logs.get(tp).map_or(&[][..], Vec::as_slice);
            let start = log.partition_point(|r| r.offset < *pos);
            let take = (max - out.len()).min(log.len() - start);
            if take == 0 {
                continue;
            }
            out.extend_from_slice(&log[start..start + take]);
            *pos = log[start + take - 1].offset + 1;
            member.rr = (member.rr + i + 1) % parts.len();
        }
        out
    }

    /// Pauses fetching from these partitions (owned or not: the flag stays).
    pub fn pause(&mut self, m: MemberId, tps: &[TopicPartition]) {
        if let Some(member) = self.members.get_mut(&m) {
            member.paused.extend(tps.iter().cloned());
        }
    }

    /// Resumes fetching from these partitions.
    pub fn resume(&mut self, m: MemberId, tps: &[TopicPartition]) {
        if let Some(member) = self.members.get_mut(&m) {
            for tp in tps {
                member.paused.remove(tp);
            }
        }
    }

    /// Moves the member's fetch position; a failure leaves it where it was.
    pub fn seek(&mut self, m: MemberId, tp: &TopicPartition, offset: i64) -> Result<(), String> {
        if self.knobs.fail_seeks > 0 {
            self.knobs.fail_seeks -= 1;
            self.transcript
                .push(format!("member {m} seek {tp} to {offset} fails"));
            return Err("Local: Erroneous state (simulated)".into());
        }
        let Some(member) = self.members.get_mut(&m) else {
            return Err("Local: Unknown member (simulated)".into());
        };
        if !member.owned.contains(tp) {
            return Err(format!("Local: Unknown partition {tp} (simulated)"));
        }
        member.positions.insert(tp.clone(), offset);
        Ok(())
    }

    /// The partitions the member has paused (owned or not).
    pub fn paused(&self, m: MemberId) -> Vec<TopicPartition> {
        self.members
            .get(&m)
            .map(|x| x.paused.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The member's fetch position on `tp`, if it owns it.
    pub fn position(&self, m: MemberId, tp: &TopicPartition) -> Option<i64> {
        self.members.get(&m)?.positions.get(tp).copied()
    }

    /// Commits positions for the member, synchronously. Refused when the member is not in
    /// the group, or while `fail_commits` says so; otherwise applied as given (Kafka lets a
    /// commit go backwards), and logged with the partitions the member did not own.
    pub fn commit(&mut self, m: MemberId, offsets: &[(TopicPartition, i64)]) -> Result<(), String> {
        let owned = self
            .members
            .get(&m)
            .filter(|x| x.in_group)
            .map(|x| &x.owned);
        let not_owned = offsets
            .iter()
            .filter(|(tp, _)| owned.is_none_or(|o| !o.contains(tp)))
            .map(|(tp, _)| tp.clone())
            .collect();
        let result = if owned.is_none() {
            Err("Broker: Unknown member (simulated)".to_owned())
        } else if self.knobs.fail_commits > 0 {
            self.knobs.fail_commits -= 1;
            Err("Broker: Request timed out (simulated)".to_owned())
        } else {
            for (tp, off) in offsets {
                self.committed.insert(tp.clone(), *off);
            }
            Ok(())
        };
        self.transcript
            .push(format!("member {m} commit {offsets:?}: {result:?}"));
        self.commit_log.push(CommitEntry {
            member: m,
            offsets: offsets.to_vec(),
            result: result.clone(),
            not_owned,
        });
        result
    }

    /// The committed position of a partition, if any.
    pub fn committed(&self, tp: &TopicPartition) -> Option<i64> {
        self.committed.get(tp).copied()
    }

    /// Every commit request so far, in order.
    pub fn commit_log(&self) -> &[CommitEntry] {
        &self.commit_log
    }

    // ---- the dead-letter producer ----

    /// The member's producer sends a dead letter; its report comes from
    /// [`poll_delivery_reports`](Self::poll_delivery_reports) later.
    pub fn produce_dead_letter(&mut self, m: MemberId, now: Instant, record: Record) {
        let due = now + self.knobs.dlq_latency;
        if let Some(member) = self.members.get_mut(&m) {
            member.deliveries.push_back(Delivery {
                record,
                sent: now,
                due,
            });
        }
    }

    /// Delivery reports due at `now` for the member's dead letters, in send order.
    pub fn poll_delivery_reports(
        &mut self,
        m: MemberId,
        now: Instant,
    ) -> Vec<(RecordCoords, Result<(), String>)> {
        let knobs = self.knobs.clone();
        let Some(member) = self.members.get_mut(&m) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        for mut d in std::mem::take(&mut member.deliveries) {
            if d.due > now {
                keep.push_back(d);
                continue;
            }
            let coords = d.record.coords();
            match knobs.dlq_fault {
                DlqFault::None => {
                    self.dead_letters.push(d.record);
                    out.push((coords, Ok(())));
                }
                DlqFault::Fatal => out.push((
                    coords,
                    Err("Broker: Topic authorization failed (simulated)".into()),
                )),
                DlqFault::Retriable if now >= d.sent + knobs.dlq_message_timeout => {
                    out.push((coords, Err("Local: Message timed out (simulated)".into())));
                }
                DlqFault::Retriable => {
                    d.due = now + knobs.dlq_retry_backoff;
                    keep.push_back(d);
                }
            }
        }
        member.deliveries = keep;
        for (c, r) in &out {
            self.transcript
                .push(format!("member {m} dead letter {c}: {r:?}"));
        }
        out
    }

    /// When the member's next delivery report is due, if any.
    pub fn next_delivery_due(&self, m: MemberId) -> Option<Instant> {
        self.members.get(&m)?.deliveries.iter().map(|d| d.due).min()
    }

    /// Dead letters the dead-letter topic holds (successful deliveries), in order.
    pub fn dead_letters(&self) -> &[Record] {
        &self.dead_letters
    }
}
