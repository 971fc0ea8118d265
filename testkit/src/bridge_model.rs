//! The bridge model: a [`SimKafka`] consumer group whose members each run a [`BridgeFlow`]
//! and a [`Harness`] (sink, simulated MQTT broker, link and clock), glued exactly as the
//! runtimes glue them, driven by random operations and faults; the invariants are checked
//! after every step.
//!
//! # The glue (what a runtime does, pass by pass)
//! 1. Drain the flow: `poll_action` until `None`, executing each action and reporting it
//!    ([`BridgeHarness::pass`]). Flush is `begin_flush` with the sink's deadline, then the
//!    sink is driven (MQTT I/O, time, dead-letter reports) until its outcome event.
//! 2. Stop if the flow stopped (close the consumer: a last revoke; close the sink) or failed.
//! 3. If the flow waits for room: report it if the sink has room. Then, if the flow may poll
//!    the consumer: run the rebalance callbacks (each drains the flow before it returns),
//!    then hand over up to `room()` records. This is the blocking runtime's order (the tokio
//!    runtime selects on both); the brief's `if may_poll {..} else if waits {..}` stalls
//!    ([`Defects::poll_before_room`]).
//! 4. Time passes to the earliest of the flow's, the sink's and the dead-letter producer's
//!    deadlines ([`BridgeHarness::run_member`]).
//!
//! Dead letters are produced to the simulated cluster as the sink asks and confirmed (or
//! failed) when their delivery report arrives.
//!
//! # Invariants
//! - (a) a committed offset never passes a record that no broker accepted and the policy
//!   did not handle (`skip`; `dead-letter`: a successful delivery report);
//! - (b) no member commits a partition it does not own at the moment of the commit;
//! - (c) with every fault healed, every record is delivered (or handled) and committed
//!   within a bounded run ([`BridgeHarness::run_to_quiescence`]);
//! - (d) no panic and no fatal error, whatever the rebalances; a revoke callback never
//!   returns mid-revoke;
//! - (e) per MQTT topic, offset order, except replays after a fault;
//! - (f) a stop ends within the flush timeout (plus the time to say DISCONNECT);
//! - (g) the flow's `poll_timeout` never stays in the past with nothing to do (a runtime
//!   would spin).
//!
//! # Re-created defects
//! [`Defects`] switches re-create, at the glue level, the defects of the December 2026 review,
//! to show that the invariants catch them.

mod glue;
mod invariants;
mod ops;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_core::{
    BridgeFlow, Config, ErrorPolicy, KafkaConfig, MqttVersion, Record, RecordCoords, TopicPartition,
};

pub use invariants::record_value;
pub use ops::{
    group_scenario, key, op, rebalance_op, replay, run, scenario, LogRecord, Op, Outcome, Scenario,
    SKIP_ENV, TRACE_ENV,
};

use crate::broker::{BrokerKnobs, SimBroker};
use crate::rng::SplitMix;
use crate::sim::{test_config, Harness, LinkKnobs};
use crate::sim_kafka::{DlqFault, KafkaKnobs, MemberId, Protocol, SimKafka};
use invariants::Invariants;

/// The Kafka topic the bridge consumes.
pub const TOPIC: &str = "events";
/// The dead-letter topic.
pub const DLQ_TOPIC: &str = "events-dlq";
/// The MQTT topic root (records go to `sensors/{key}`).
pub const TOPIC_ROOT: &str = "sensors";

/// Passes of one member's loop per call before the model calls it a livelock.
const MAX_PASSES: usize = 200_000;
/// Actions drained in a row before the model calls it a livelock.
const MAX_ACTIONS: usize = 100_000;
/// The smallest step of time when a member waits on nothing in particular.
const MIN_STEP: Duration = Duration::from_millis(1);

/// Glue-level re-creations of the review's defects (all off: the runtimes' glue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defects {
    /// H2: a failed seek is reported to the flow as a success.
    pub seek_failure_reported_ok: bool,
    /// H3: a dead letter is confirmed to the sink when it is sent, not at its delivery
    /// report (which is then ignored).
    pub dead_letter_confirmed_at_send: bool,
    /// C1: records the flow held for a partition being revoked are kept by the glue and
    /// pushed to the sink as soon as it takes them (the old runtimes' own `held`).
    pub push_revoked_held: bool,
    /// For (b): a commit action commits every position the sink reports instead of the
    /// flow's.
    pub commit_sink_positions: bool,
    /// L9: the sink is never told of a revoke (the old callback returned early on a
    /// poisoned lock).
    pub skip_sink_revoke: bool,
    /// The loop of the bridge brief: `if may_poll_consumer { poll } else if
    /// waits_for_room { room }`. While the flow may poll (it holds fewer than its limit, or
    /// its partitions are paused), room is never reported. The runtimes check room first.
    pub poll_before_room: bool,
    /// `pos`: between checkpoints, the glue answers the flow's `Positions` with where the
    /// records pushed to the sink end, not with what the broker acknowledged.
    pub positions_pushed: bool,
}

impl Defects {
    /// The environment variable [`from_env`](Self::from_env) reads.
    pub const ENV: &'static str = "MQTT_SINK_BRIDGE_DEFECTS";

    /// Switches named in `MQTT_SINK_BRIDGE_DEFECTS`, comma-separated: `h2`, `h3`, `c1`, `b`,
    /// `l9`, `loop`, `pos`. Unset: none. An unknown name panics (a typo must not pass as a clean run).
    pub fn from_env() -> Self {
        let mut d = Self::default();
        let Ok(v) = std::env::var(Self::ENV) else {
            return d;
        };
        for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "h2" => d.seek_failure_reported_ok = true,
                "h3" => d.dead_letter_confirmed_at_send = true,
                "c1" => d.push_revoked_held = true,
                "b" => d.commit_sink_positions = true,
                "l9" => d.skip_sink_revoke = true,
                "loop" => d.poll_before_room = true,
                "pos" => d.positions_pushed = true,
                other => panic!(
                    "{}: unknown defect {other:?} (h2, h3, c1, b, l9, loop)",
                    Self::ENV
                ),
            }
        }
        d
    }
}

/// The shape of a bridge model run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Seed of the brokers, links and backoffs.
    pub seed: u64,
    /// MQTT version (reason-code rejections need 5).
    pub version: MqttVersion,
    /// QoS 1 or 2.
    pub qos: u8,
    /// The sink's error policy.
    pub policy: ErrorPolicy,
    /// Group members.
    pub members: usize,
    /// Partitions of [`TOPIC`].
    pub partitions: i32,
    /// How the group rebalances when a member joins or leaves.
    pub protocol: Protocol,
    /// The sink's `max_buffered_records`.
    pub max_buffered: usize,
    /// The sink's `max_inflight`.
    pub max_inflight: u32,
    /// The sink's `flush_timeout`.
    pub flush_timeout: Duration,
    /// The bridge's `commit_interval`.
    pub commit_interval: Duration,
    /// The bridge's `commit_every`.
    pub commit_every: Option<u64>,
    /// The bridge's `commit_min_interval` (zero: commits at checkpoints only).
    pub commit_min_interval: Duration,
    /// Records per consumer poll at most.
    pub max_poll_records: usize,
    /// Defects to re-create.
    pub defects: Defects,
}

impl Setup {
    /// One member, one partition, MQTT 5 at QoS 1, `fail`, small buffers, fast timeouts.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            version: MqttVersion::V5,
            qos: 1,
            policy: ErrorPolicy::Fail,
            members: 1,
            partitions: 1,
            protocol: Protocol::Eager,
            max_buffered: 20,
            max_inflight: 10,
            flush_timeout: Duration::from_secs(2),
            commit_interval: Duration::from_secs(1),
            commit_every: None,
            commit_min_interval: Duration::from_millis(100),
            max_poll_records: 500,
            defects: Defects::default(),
        }
    }
}

/// What the model did, for reports and coverage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Rebalance callbacks run.
    pub callbacks: u64,
    /// Revoke callbacks that found records held by the flow.
    pub revokes_with_held: u64,
    /// Flushes executed, and how many did not complete.
    pub flushes: u64,
    /// Flushes that timed out or failed.
    pub incomplete_flushes: u64,
    /// Commits Kafka accepted.
    pub commits: u64,
    /// Member crashes and restarts.
    pub crashes: u64,
    /// Graceful stops that finished.
    pub stops: u64,
}

#[derive(Debug)]
struct Member {
    h: Harness,
    flow: BridgeFlow,
    /// The process runs (not stopped, not crashed and waiting for a restart).
    up: bool,
    incarnation: u32,
    /// Defect C1: records handed to the flow and not yet pushed (what it holds).
    unpushed: BTreeMap<RecordCoords, Record>,
    /// Defect C1: records of revoked partitions the glue kept.
    stale: VecDeque<Record>,
    /// Defect `pos`: per partition, the position after the last record pushed.
    pushed_to: BTreeMap<TopicPartition, i64>,
    /// Consecutive idle passes with the flow's `poll_timeout` in the past.
    spinning: u32,
}

/// The composed model. See the module docs.
#[derive(Debug)]
pub struct BridgeHarness {
    /// The simulated cluster.
    pub kafka: SimKafka,
    members: Vec<Member>,
    setup: Setup,
    kafka_cfg: KafkaConfig,
    target: BTreeMap<MemberId, BTreeSet<TopicPartition>>,
    inv: Invariants,
    /// What the model did.
    pub stats: ModelStats,
    /// Every action and callback, with its member and time, when `tracing` is on.
    pub trace: Vec<String>,
    /// Record [`trace`](Self::trace).
    pub tracing: bool,
}

impl BridgeHarness {
    /// A group of `setup.members` members, all joined and given a balanced assignment
    /// (eager), none polled yet; the topic is empty.
    pub fn new(setup: Setup) -> Self {
        let mut kafka = SimKafka::new(KafkaKnobs {
            max_poll_records: setup.max_poll_records.max(1),
            ..KafkaKnobs::default()
        });
        kafka.create_topic(TOPIC, setup.partitions);
        let mut kafka_cfg = KafkaConfig::new("sim", "bridge", vec![TOPIC.into()]);
        kafka_cfg.commit_interval = setup.commit_interval;
        kafka_cfg.commit_every = setup.commit_every;
        kafka_cfg.commit_min_interval = setup.commit_min_interval;
        let inv = Invariants::new(TOPIC, TOPIC_ROOT, setup.policy);
        let mut b = Self {
            kafka,
            members: Vec::new(),
            kafka_cfg,
            target: BTreeMap::new(),
            inv,
            stats: ModelStats::default(),
            trace: Vec::new(),
            tracing: false,
            setup,
        };
        for m in 0..b.setup.members {
            let mut h = Harness::new(
                b.mqtt_config(m, 0),
                BrokerKnobs::default(),
                LinkKnobs::default(),
                b.setup.seed.wrapping_add(m as u64),
            );
            h.auto_commit = false;
            h.auto_dead_letter = false;
            let flow = BridgeFlow::new(&b.kafka_cfg, h.now);
            b.members.push(Member {
                h,
                flow,
                up: true,
                incarnation: 0,
                unpushed: BTreeMap::new(),
                pushed_to: BTreeMap::new(),
                stale: VecDeque::new(),
                spinning: 0,
            });
            b.kafka.join(m);
        }
        if let Ok(letters) = std::env::var(SKIP_ENV) {
            b.skip_invariants(&letters);
        }
        b.rebalance_balanced(Protocol::Eager);
        b
    }

    fn mqtt_config(&self, m: usize, incarnation: u32) -> Config {
        let s = &self.setup;
        let mut cfg = test_config(s.version, s.qos);
        cfg.client_id = format!("bridge-{m}-{incarnation}");
        cfg.topic_root = TOPIC_ROOT.into();
        cfg.max_buffered_records = s.max_buffered.max(1);
        cfg.max_inflight = s.max_inflight.max(1);
        cfg.flush_timeout = s.flush_timeout;
        cfg.ack_timeout = Duration::from_secs(1);
        cfg.reconnect_jitter_seed = Some(s.seed.wrapping_add(u64::from(incarnation)));
        cfg.error_policy = s.policy;
        if s.policy == ErrorPolicy::DeadLetter {
            cfg.dead_letter_topic = Some(DLQ_TOPIC.into());
        }
        cfg
    }

    /// The setup in force.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// Members, up or not.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The member's sink harness (sink, broker, link, clock).
    pub fn harness(&self, m: MemberId) -> &Harness {
        &self.members[m].h
    }

    /// The member's sink harness, to change its broker's or link's behaviour.
    pub fn harness_mut(&mut self, m: MemberId) -> &mut Harness {
        &mut self.members[m].h
    }

    /// The member's flow.
    pub fn flow(&self, m: MemberId) -> &BridgeFlow {
        &self.members[m].flow
    }

    /// True while the member's process runs.
    pub fn is_up(&self, m: MemberId) -> bool {
        self.members[m].up
    }

    /// Every violation seen so far.
    pub fn violations(&self) -> &[String] {
        self.inv.violations()
    }

    /// Replays seen (arrivals at or below a topic's highest offset).
    pub fn replays(&self) -> u64 {
        self.inv.replays
    }

    /// Invariants not to check, by letter (`"g"`, `"eg"`, ...): to look past a known
    /// failure for others. [`new`](Self::new) reads them from `MQTT_SINK_BRIDGE_SKIP`.
    pub fn skip_invariants(&mut self, letters: &str) {
        self.inv.skip(letters);
    }

    /// Marks that a fault happened: from now on replays are allowed.
    pub fn note_fault(&mut self) {
        self.inv.faulty = true;
    }

    /// Appends a record to partition `p` of [`TOPIC`] with key `key` (`None`: a record that
    /// cannot be published), `gap` offsets after the previous one, with `pad` bytes of
    /// padding in its value. Returns its offset.
    pub fn append(&mut self, p: i32, key: Option<&str>, gap: i64, pad: usize) -> i64 {
        let tp = TopicPartition::new(TOPIC, p);
        let key = key.map(|k| Bytes::from(k.to_owned()));
        self.kafka
            .append(&tp, gap, key, |offset| record_value(p, offset, pad))
    }

    // ---- the group ----

    /// The group rebalances to `target` (members not up are left out).
    pub fn rebalance(
        &mut self,
        protocol: Protocol,
        target: BTreeMap<MemberId, BTreeSet<TopicPartition>>,
    ) {
        self.target = target
            .into_iter()
            .filter(|(m, _)| self.members.get(*m).is_some_and(|x| x.up))
            .collect();
        self.kafka.rebalance(protocol, &self.target);
    }

    /// The group rebalances to the current target again (under `Eager`, every partition
    /// goes back to its owner after a revoke).
    pub fn rebalance_same(&mut self, protocol: Protocol) {
        let t = self.target.clone();
        self.rebalance(protocol, t);
    }

    /// Partitions round-robin over the members that are up.
    pub fn rebalance_balanced(&mut self, protocol: Protocol) {
        let up: Vec<_> = (0..self.members.len())
            .filter(|m| self.members[*m].up)
            .collect();
        let mut t: BTreeMap<MemberId, BTreeSet<TopicPartition>> = BTreeMap::new();
        if !up.is_empty() {
            for (i, tp) in self.kafka.partitions().into_iter().enumerate() {
                t.entry(up[i % up.len()]).or_default().insert(tp);
            }
        }
        self.rebalance(protocol, t);
    }

    /// Each partition to a random member that is up (eager).
    pub fn rebalance_random(&mut self, seed: u64) {
        let up: Vec<_> = (0..self.members.len())
            .filter(|m| self.members[*m].up)
            .collect();
        if up.is_empty() {
            return;
        }
        let mut rng = SplitMix::new(seed);
        let mut t: BTreeMap<MemberId, BTreeSet<TopicPartition>> = BTreeMap::new();
        for tp in self.kafka.partitions() {
            t.entry(up[rng.next() as usize % up.len()])
                .or_default()
                .insert(tp);
        }
        self.rebalance(Protocol::Eager, t);
    }

    /// Partition `p` moves to member `to` (cooperative); nothing if `to` is not up.
    pub fn move_partition(&mut self, p: i32, to: MemberId) {
        if !self.members.get(to).is_some_and(|x| x.up) {
            return;
        }
        let tp = TopicPartition::new(TOPIC, p);
        let mut t = self.target.clone();
        for set in t.values_mut() {
            set.remove(&tp);
        }
        t.entry(to).or_default().insert(tp);
        self.rebalance(Protocol::Cooperative, t);
    }

    // ---- running ----

    /// Every member that is up runs for `d` of its own time, one after the other.
    pub fn advance(&mut self, d: Duration) {
        for m in 0..self.members.len() {
            let until = self.members[m].h.now + d;
            self.run_member(m, until);
        }
    }

    /// Member `m` runs until its next checkpoint by time has passed.
    pub fn run_to_checkpoint(&mut self, m: MemberId) {
        let until = self.members[m].h.now + self.setup.commit_interval + MIN_STEP;
        self.run_member(m, until);
    }

    /// A graceful stop of member `m`: the flow stops, the loop runs until it has stopped
    /// (then the consumer closes and the sink disconnects), and the group rebalances. (f):
    /// it ends within the flush timeout, plus a second for the DISCONNECT.
    pub fn stop(&mut self, m: MemberId) {
        if !self.members[m].up {
            return;
        }
        let start = self.members[m].h.now;
        self.members[m].flow.stop(start);
        let limit = start + self.setup.flush_timeout + Duration::from_secs(1);
        self.run_member(m, limit);
        if self.members[m].up {
            let v = format!(
                "(f) member {m}: the stop did not end within flush_timeout ({:?}) + 1 s: {:?}",
                self.setup.flush_timeout, self.members[m].flow
            );
            self.inv.violation(v);
        }
    }

    /// Member `m`'s process crashes and starts again from the committed offsets (its sink
    /// keeps its MQTT client id, so the broker may resume the session, when `same_client_id`).
    pub fn crash(&mut self, m: MemberId, same_client_id: bool) {
        self.stats.crashes += 1;
        if self.members[m].up {
            self.kafka.crash(m);
        }
        self.start_process(m, same_client_id);
    }

    /// Starts member `m` again if it is down (stopped, or failed).
    pub fn restart(&mut self, m: MemberId) {
        if !self.members[m].up {
            self.start_process(m, false);
        }
    }

    fn start_process(&mut self, m: MemberId, same_client_id: bool) {
        let incarnation = self.members[m].incarnation + u32::from(!same_client_id);
        let cfg = self.mqtt_config(m, incarnation);
        let mb = &mut self.members[m];
        mb.incarnation = incarnation;
        mb.h.restart_sink(cfg);
        mb.flow = BridgeFlow::new(&self.kafka_cfg, mb.h.now);
        mb.up = true;
        mb.unpushed.clear();
        mb.stale.clear();
        mb.pushed_to.clear();
        mb.spinning = 0;
        self.kafka.join(m);
        let mut t = self.target.clone();
        let old = t.remove(&m).unwrap_or_default();
        if old.is_empty() {
            self.rebalance_balanced(self.setup.protocol);
        } else {
            t.insert(m, old);
            self.rebalance(self.setup.protocol, t);
        }
    }

    /// Every fault off: brokers, links, Kafka.
    pub fn heal(&mut self) {
        for mb in &mut self.members {
            let k = mb.h.broker.knobs_mut();
            k.ack_loss = 0.0;
            k.ack_delay = Duration::ZERO;
            k.reorder_acks = false;
            k.refuse_connects = 0;
            k.topic_reason_codes.clear();
            mb.h.link.failing_opens = 0;
        }
        let k = self.kafka.knobs_mut();
        k.fail_seeks = 0;
        k.fail_commits = 0;
        k.dlq_fault = DlqFault::None;
    }

    /// True when every non-empty partition is committed at its end.
    pub fn all_committed(&self) -> bool {
        self.kafka.partitions().iter().all(|tp| {
            let end = self.kafka.end_offset(tp);
            end == 0 || self.kafka.committed(tp) == Some(end)
        })
    }

    /// (c): heals every fault, starts every member that is down (the group rebalances) and
    /// runs for at most `max` of simulated time until everything is committed. Returns whether
    /// it was (and records a violation if not).
    pub fn run_to_quiescence(&mut self, max: Duration) -> bool {
        self.heal();
        for m in 0..self.members.len() {
            self.restart(m);
        }
        // No rebalance of its own unless a partition has no owner to be: a revoke and an
        // assignment would reset what a flow got stuck in (a pause, a consumer position).
        let targeted: BTreeSet<_> = self.target.values().flatten().cloned().collect();
        if self
            .kafka
            .partitions()
            .iter()
            .any(|tp| !targeted.contains(tp))
        {
            self.rebalance_balanced(Protocol::Cooperative);
        }
        let rounds = max.as_millis() / 500;
        let (mut last, mut still) = (self.fingerprint(), Duration::ZERO);
        for _ in 0..rounds {
            self.advance(Duration::from_millis(500));
            if self.all_committed() && self.kafka.is_settled() {
                return true;
            }
            // Backoffs are at most 30 s: two minutes without a publish or a commit that
            // moves is a stall.
            let now = self.fingerprint();
            still = if now == last {
                still + Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
            last = now;
            if still >= Duration::from_secs(120) {
                break;
            }
        }
        let left: Vec<_> = self
            .kafka
            .partitions()
            .into_iter()
            .map(|tp| {
                let c = self.kafka.committed(&tp);
                let end = self.kafka.end_offset(&tp);
                format!("{tp}: committed {c:?} of {end}")
            })
            .collect();
        let v = format!(
            "(c) healed, yet not everything was committed (within {max:?}, or 2 min without \
             progress): {left:?}\n{}",
            self.describe()
        );
        self.inv.violation(v);
        false
    }

    /// What moves when the pipeline does: publishes received, dead letters, commit
    /// positions.
    fn fingerprint(&self) -> (usize, usize, Vec<Option<i64>>) {
        let received = self
            .members
            .iter()
            .map(|x| x.h.broker.received().len())
            .sum();
        let committed = self
            .kafka
            .partitions()
            .iter()
            .map(|tp| self.kafka.committed(tp))
            .collect();
        (received, self.kafka.dead_letters().len(), committed)
    }

    /// Checks the invariants at the end of a step; `Err` lists every violation so far.
    pub fn check(&mut self) -> Result<(), String> {
        self.observe();
        self.inv.end_step(&self.kafka);
        for (m, mb) in self.members.iter().enumerate() {
            for v in mb.h.broker.violations() {
                let v = format!("member {m}'s broker saw a protocol violation: {v}");
                self.inv.violation(v);
            }
            for e in &mb.h.protocol_errors {
                let v = format!("member {m}'s sink saw a protocol error: {e}");
                self.inv.violation(v);
            }
        }
        match self.inv.violations() {
            [] => Ok(()),
            v => Err(v.join("\n")),
        }
    }

    /// The state of every member, for failure reports.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (m, mb) in self.members.iter().enumerate() {
            let now = mb.h.now;
            let positions: Vec<_> = self
                .kafka
                .owned(m)
                .into_iter()
                .map(|tp| {
                    let pos = self.kafka.position(m, &tp);
                    (tp.to_string(), pos)
                })
                .collect();
            out.push_str(&format!(
                "member {m} (up {}): {:?}; may poll {}, waits for room {}, room {}; \
                 sink full {}, connected {}, {:?}; owned+positions {positions:?}, \
                 paused {:?}; sink commit positions {:?}\n",
                mb.up,
                mb.flow,
                mb.flow.may_poll_consumer(now),
                mb.flow.waits_for_room(),
                mb.flow.room(),
                mb.h.sink.is_full(),
                mb.h.sink.is_connected(),
                mb.h.sink.stats(),
                self.kafka.paused(m),
                mb.h.sink.commit_positions(),
            ));
        }
        out
    }

    fn observe(&mut self) {
        let brokers: Vec<&SimBroker> = self.members.iter().map(|x| &x.h.broker).collect();
        self.inv.observe(&self.kafka, &brokers);
    }

    /// Applies one operation (see [`Op`]).
    pub fn apply(&mut self, op: &Op) {
        ops::apply(self, op);
    }
}
