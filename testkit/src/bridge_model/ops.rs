//! The bridge model's operations, their proptest strategies, and a whole run.

use std::time::Duration;

use mqtt_sink_core::{ErrorPolicy, MqttVersion};
use proptest::prelude::*;

use super::{BridgeHarness, Defects, Setup};
use crate::sim_kafka::{DlqFault, Protocol};

/// One step of a run. Member and partition numbers are taken modulo the counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Passes of one member's loop, without time passing (consume, push, callbacks).
    Poll {
        /// The member.
        member: u8,
        /// How many passes at most (it stops early when nothing happens).
        passes: u8,
    },
    /// This many ms pass for every member (each runs its loop).
    Advance(u16),
    /// A member runs until its checkpoint by time is due and taken.
    Checkpoint(u8),
    /// An eager rebalance to a random assignment (seeded).
    RebalanceEager(u64),
    /// An eager rebalance that gives every partition back to its owner.
    RebalanceSame,
    /// Cooperative: a partition moves to a member, both run for a few ms, and it moves
    /// back to its owner.
    AwayAndBack {
        /// The partition.
        partition: u8,
        /// The member it visits.
        via: u8,
        /// How long it stays (ms).
        ms: u16,
    },
    /// A cooperative rebalance: one partition moves to a member.
    Move {
        /// The partition.
        partition: u8,
        /// Its new owner.
        to: u8,
    },
    /// Records are produced to a partition.
    Append {
        /// The partition.
        partition: u8,
        /// How many.
        count: u8,
        /// Offsets skipped before the first.
        gap: u8,
    },
    /// A member stops gracefully (and stays down until a restart).
    Stop(u8),
    /// A member that is down starts again.
    Restart(u8),
    /// A member's process crashes and starts again from the committed offsets.
    Crash {
        /// The member.
        member: u8,
        /// The new process reuses the MQTT client id (the broker may resume its session).
        same_client_id: bool,
    },
    /// The next this many seeks fail.
    FailSeeks(u8),
    /// The next this many commits fail.
    FailCommits(u8),
    /// Dead-letter deliveries fail so from now on.
    Dlq(DlqFault),
    /// A member's MQTT connection is cut.
    Cut(u8),
    /// A member's broker disconnects it (MQTT 5: DISCONNECT 0x8B).
    ServerDisconnect(u8),
    /// A member's broker loses this percentage of acks from now on.
    AckLoss {
        /// The member.
        member: u8,
        /// Percent.
        percent: u8,
    },
    /// A member's broker sends due acks in a random order (or not) from now on (legal, so
    /// not a fault).
    ReorderAcks {
        /// The member.
        member: u8,
        /// On or off.
        on: bool,
    },
    /// A member's broker delays acks by this many ms from now on.
    AckDelay {
        /// The member.
        member: u8,
        /// Milliseconds.
        ms: u16,
    },
    /// A member's broker goes down: the connection is cut and this many reconnects are
    /// refused.
    BrokerDown {
        /// The member.
        member: u8,
        /// Refused CONNECTs.
        refusals: u8,
    },
    /// Every broker rejects publishes to one record key's topic with this MQTT 5 reason
    /// code from now on (no-op before MQTT 5).
    Reject {
        /// The partition of the key.
        partition: u8,
        /// The key's index.
        key: u8,
        /// The reason code (>= 0x80).
        code: u8,
    },
    /// Every fault is healed.
    Heal,
}

/// One record of an initial log: partition, key index (`None`: no key), gap before it,
/// padding.
pub type LogRecord = (u8, Option<u8>, u8, u8);

/// The shape of one run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Seed, versions, policy, sizes.
    pub setup: Setup,
    /// The initial log: per record, (partition, key index or `None` for a record without a
    /// key, gap before it, padding).
    pub log: Vec<LogRecord>,
    /// The operations.
    pub ops: Vec<Op>,
}

/// What a run observed, for comparisons between runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The cluster's transcript (rebalances, callbacks, commits, dead letters).
    pub kafka: Vec<String>,
    /// Per member, the payloads its broker received, in order.
    pub received: Vec<Vec<bytes::Bytes>>,
    /// Replays seen.
    pub replays: u64,
}

/// The key of record key index `k` of partition `p` (a key maps to one partition).
pub fn key(p: u8, k: u8) -> String {
    format!("p{p}k{k}")
}

fn member_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u8>(), 1u8..40).prop_map(|(member, passes)| Op::Poll { member, passes }),
        5 => (1u16..2500).prop_map(Op::Advance),
        2 => any::<u8>().prop_map(Op::Checkpoint),
        3 => (any::<u8>(), 1u8..60, prop_oneof![6 => Just(0u8), 1 => 1u8..4])
            .prop_map(|(partition, count, gap)| Op::Append { partition, count, gap }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(member, on)| Op::ReorderAcks { member, on }),
    ]
}

/// Rebalances, stops and restarts: no fault among them.
pub fn rebalance_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => any::<u64>().prop_map(Op::RebalanceEager),
        2 => Just(Op::RebalanceSame),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(partition, to)| Op::Move { partition, to }),
        2 => (any::<u8>(), any::<u8>(), 0u16..300)
            .prop_map(|(partition, via, ms)| Op::AwayAndBack { partition, via, ms }),
        1 => any::<u8>().prop_map(Op::Stop),
        1 => any::<u8>().prop_map(Op::Restart),
    ]
}

fn fault_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<u8>(), any::<bool>())
            .prop_map(|(member, same_client_id)| Op::Crash { member, same_client_id }),
        2 => (0u8..4).prop_map(Op::FailSeeks),
        1 => (0u8..3).prop_map(Op::FailCommits),
        2 => prop_oneof![Just(DlqFault::None), Just(DlqFault::Retriable), Just(DlqFault::Fatal)]
            .prop_map(Op::Dlq),
        2 => any::<u8>().prop_map(Op::Cut),
        1 => any::<u8>().prop_map(Op::ServerDisconnect),
        1 => (any::<u8>(), prop_oneof![Just(0u8), Just(10), Just(50), Just(100)])
            .prop_map(|(member, percent)| Op::AckLoss { member, percent }),
        1 => (any::<u8>(), prop_oneof![Just(0u16), 1u16..500, 2000u16..4000])
            .prop_map(|(member, ms)| Op::AckDelay { member, ms }),
        1 => (any::<u8>(), 1u8..20).prop_map(|(member, refusals)| Op::BrokerDown { member, refusals }),
        4 => (any::<u8>(), 0u8..3, prop_oneof![Just(0x80u8), Just(0x87), Just(0x97)])
            .prop_map(|(partition, key, code)| Op::Reject { partition, key, code }),
        1 => Just(Op::Heal),
    ]
}

/// Any operation: traffic, rebalances and faults.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => member_op(),
        3 => rebalance_op(),
        4 => fault_op(),
    ]
}

fn setup(members: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Setup> {
    (
        (
            any::<u64>(),
            prop_oneof![1 => Just(MqttVersion::V311), 3 => Just(MqttVersion::V5)],
            1u8..=2,
            prop_oneof![
                2 => Just(ErrorPolicy::Fail),
                1 => Just(ErrorPolicy::Skip),
                2 => Just(ErrorPolicy::DeadLetter)
            ],
            members,
            1i32..=4,
        ),
        (
            prop_oneof![Just(Protocol::Eager), Just(Protocol::Cooperative)],
            2usize..40,
            1u32..20,
            prop::option::of(1u64..60),
            prop_oneof![Just(500usize), 1usize..64],
            prop_oneof![
                1 => Just(Duration::ZERO),
                2 => Just(Duration::from_millis(100)),
                1 => (1u64..500).prop_map(Duration::from_millis)
            ],
        ),
    )
        .prop_map(
            |(
                (seed, version, qos, policy, members, partitions),
                (protocol, max_buffered, max_inflight, commit_every, max_poll_records, commit_min),
            )| Setup {
                version,
                qos,
                policy,
                members,
                partitions,
                protocol,
                max_buffered,
                max_inflight,
                commit_every,
                commit_min_interval: commit_min,
                max_poll_records,
                ..Setup::new(seed)
            },
        )
}

fn log() -> impl Strategy<Value = Vec<LogRecord>> {
    prop::collection::vec(
        (
            0u8..4,
            prop_oneof![12 => (0u8..3).prop_map(Some), 1 => Just(None)],
            prop_oneof![8 => Just(0u8), 1 => 1u8..4],
            0u8..32,
        ),
        0..300,
    )
}

/// A run of one to three members under traffic, rebalances and every fault.
pub fn scenario() -> impl Strategy<Value = Scenario> {
    (setup(1..=3), log(), prop::collection::vec(op(), 1..80)).prop_map(build)
}

/// A run of two or three members under traffic, rebalances, stops and restarts, without
/// any fault: no replay may happen at all.
pub fn group_scenario() -> impl Strategy<Value = Scenario> {
    let ops = prop::collection::vec(prop_oneof![3 => member_op(), 2 => rebalance_op()], 1..80);
    (setup(2..=3), log(), ops).prop_map(build)
}

fn build((setup, log, ops): (Setup, Vec<LogRecord>, Vec<Op>)) -> Scenario {
    // Under `fail` a record that can never be published would stop the pipeline for good:
    // every record has a key there.
    let fail = setup.policy == ErrorPolicy::Fail;
    let log = log
        .into_iter()
        .map(|(p, k, gap, pad)| (p, if fail { k.or(Some(0)) } else { k }, gap, pad))
        .collect();
    Scenario { setup, log, ops }
}

/// Set (to anything) to record every action, callback and operation of a run and print
/// the last of them with a failure.
pub const TRACE_ENV: &str = "MQTT_SINK_BRIDGE_TRACE";

/// Invariant letters not to check (`g`, `e,g`, ...), to look past a known failure.
pub const SKIP_ENV: &str = "MQTT_SINK_BRIDGE_SKIP";

/// Runs a scenario with `defects`: the invariants after every operation, then (c).
pub fn run(s: &Scenario, defects: Defects) -> Result<Outcome, TestCaseError> {
    execute(s, defects, true)
}

/// Runs a scenario without checking anything: what it did, for comparisons between runs.
pub fn replay(s: &Scenario, defects: Defects) -> Outcome {
    match execute(s, defects, false) {
        Ok(o) => o,
        Err(e) => unreachable!("nothing is checked: {e}"),
    }
}

fn execute(s: &Scenario, defects: Defects, check: bool) -> Result<Outcome, TestCaseError> {
    let setup = Setup {
        defects,
        ..s.setup.clone()
    };
    let partitions = setup.partitions;
    let mut b = BridgeHarness::new(setup);
    b.tracing = check && std::env::var_os(TRACE_ENV).is_some();
    for &(p, k, gap, pad) in &s.log {
        let p = i32::from(p) % partitions;
        let key = k.map(|k| key(p as u8, k));
        b.append(p, key.as_deref(), i64::from(gap), usize::from(pad));
    }
    let checked = |b: &mut BridgeHarness| {
        if !check {
            return Ok(());
        }
        b.check().map_err(|e| {
            let trace = b.trace[b.trace.len().saturating_sub(400)..].join("\n");
            TestCaseError::fail(format!("{e}\n{trace}"))
        })
    };
    for op in &s.ops {
        b.apply(op);
        checked(&mut b)?;
    }
    b.run_to_quiescence(Duration::from_secs(600));
    checked(&mut b)?;
    Ok(Outcome {
        kafka: b.kafka.transcript.clone(),
        received: (0..b.member_count())
            .map(|m| {
                b.harness(m)
                    .broker
                    .received()
                    .iter()
                    .map(|r| r.payload.clone())
                    .collect()
            })
            .collect(),
        replays: b.replays(),
    })
}

pub(super) fn apply(b: &mut BridgeHarness, op: &Op) {
    if b.tracing {
        b.trace.push(format!("op {op:?}"));
    }
    let n = b.member_count();
    let member = |x: u8| usize::from(x) % n;
    let partitions = b.setup().partitions;
    let v5 = b.setup().version == MqttVersion::V5;
    match *op {
        Op::Poll { member: x, passes } => {
            let m = member(x);
            for _ in 0..passes {
                if !b.pass(m) {
                    break;
                }
            }
        }
        Op::Advance(ms) => b.advance(Duration::from_millis(u64::from(ms))),
        Op::Checkpoint(x) => b.run_to_checkpoint(member(x)),
        Op::RebalanceEager(seed) => b.rebalance_random(seed),
        Op::RebalanceSame => b.rebalance_same(Protocol::Eager),
        Op::Move { partition, to } => {
            b.move_partition(i32::from(partition) % partitions, member(to));
        }
        Op::AwayAndBack { partition, via, ms } => {
            let p = i32::from(partition) % partitions;
            let tp = mqtt_sink_core::TopicPartition::new(super::TOPIC, p);
            if let Some(home) = b.kafka.owner(&tp) {
                b.move_partition(p, member(via));
                b.advance(Duration::from_millis(u64::from(ms)));
                b.move_partition(p, home);
            }
        }
        Op::Append {
            partition,
            count,
            gap,
        } => {
            let p = i32::from(partition) % partitions;
            for i in 0..count {
                let k = key(p as u8, i % 3);
                let gap = if i == 0 { i64::from(gap) } else { 0 };
                b.append(p, Some(&k), gap, usize::from(i));
            }
        }
        Op::Stop(x) => b.stop(member(x)),
        Op::Restart(x) => b.restart(member(x)),
        Op::Crash {
            member: x,
            same_client_id,
        } => {
            b.note_fault();
            b.crash(member(x), same_client_id);
        }
        Op::FailSeeks(k) => {
            if k > 0 {
                b.note_fault();
            }
            b.kafka.knobs_mut().fail_seeks = u32::from(k);
        }
        Op::FailCommits(k) => {
            if k > 0 {
                b.note_fault();
            }
            b.kafka.knobs_mut().fail_commits = u32::from(k);
        }
        Op::Dlq(fault) => {
            if fault != DlqFault::None {
                b.note_fault();
            }
            b.kafka.knobs_mut().dlq_fault = fault;
        }
        Op::Cut(x) => {
            b.note_fault();
            b.harness_mut(member(x)).cut();
        }
        Op::ServerDisconnect(x) => {
            let h = b.harness_mut(member(x));
            if h.sink.is_connected() {
                let now = h.now;
                h.broker.disconnect_client(now, 0x8B);
                b.note_fault();
            }
        }
        Op::AckLoss { member: x, percent } => {
            if percent > 0 {
                b.note_fault();
            }
            b.harness_mut(member(x)).broker.knobs_mut().ack_loss = f64::from(percent) / 100.0;
        }
        Op::ReorderAcks { member: x, on } => {
            // Legal for a broker, and harmless: not a fault.
            b.harness_mut(member(x)).broker.knobs_mut().reorder_acks = on;
        }
        Op::AckDelay { member: x, ms } => {
            if ms > 0 {
                b.note_fault();
            }
            b.harness_mut(member(x)).broker.knobs_mut().ack_delay =
                Duration::from_millis(u64::from(ms));
        }
        Op::BrokerDown {
            member: x,
            refusals,
        } => {
            b.note_fault();
            let h = b.harness_mut(member(x));
            h.broker.knobs_mut().refuse_connects = u32::from(refusals);
            h.cut();
        }
        Op::Reject {
            partition,
            key: k,
            code,
        } => {
            if v5 {
                b.note_fault();
                let p = (i32::from(partition) % partitions) as u8;
                let topic = format!("{}/{}", super::TOPIC_ROOT, key(p, k));
                for m in 0..n {
                    b.harness_mut(m)
                        .broker
                        .knobs_mut()
                        .topic_reason_codes
                        .insert(topic.clone(), code);
                }
            }
        }
        Op::Heal => b.heal(),
    }
}
