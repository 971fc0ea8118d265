//! Regression cases of the December 2026 review on real processes (MockCluster + Mosquitto):
//! C1 (held records after an eager revoke), H1 (a rewind with held records of a partition
//! never pushed), H2 (a failed seek), H3 (a dead letter Kafka refuses), M2 (the dead-letter
//! producer takes `[kafka.properties]`), M5 (`commit_every` counts records).
//!
//! Each case knows every record's partition and offset (one producer, so offsets follow the
//! produce order; [`Log::verify`] reads the topic back to make sure) and checks, besides
//! what arrived, that no committed position ever passed a record the subscriber did not
//! receive ([`CommitWatch`] samples the group's commits while the case runs). Conditions
//! are waited on with deadlines; a [`Probe`] transform shows what the bridge consumed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_core::{BridgeStats, Config, ErrorPolicy, KafkaConfig, MqttVersion};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::{acl_broker, BridgeRuntime, RunningBridge, Transform};
use crate::checker::{check, Expected};
use crate::kafka::{
    classic_group_properties, committed_offsets, fast_group_properties, GroupMember, MockKafka,
};
use crate::mosquitto::{Mosquitto, MosquittoOptions};
use crate::subscriber::SyncSubscriber;
use crate::suite::config;

/// Cases whose bridges rewind (and so seek) share this lock; the failed-seek case takes it
/// alone, because `mqtt_sink_kafka::fail_next_seeks` fails the next seeks of the whole
/// process, whichever bridge asks.
pub(super) static REWINDS: RwLock<()> = RwLock::new(());

/// Shared with the other cases that rewind.
pub(super) fn rewinds_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    REWINDS.read().unwrap_or_else(|p| p.into_inner())
}

fn rewinds_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    REWINDS.write().unwrap_or_else(|p| p.into_inner())
}

/// Injected seek failures, withdrawn when dropped (so none is left for the next case).
struct SeekFaults;

impl SeekFaults {
    fn inject(n: u32) -> Self {
        mqtt_sink_kafka::fail_next_seeks(n);
        Self
    }
}

impl Drop for SeekFaults {
    fn drop(&mut self) {
        mqtt_sink_kafka::fail_next_seeks(0);
    }
}

/// What a case produced: per partition, (key, payload) in offset order.
struct Log {
    topic: String,
    parts: BTreeMap<i32, Vec<(String, String)>>,
}

impl Log {
    fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            parts: BTreeMap::new(),
        }
    }

    /// Produces `(partition, key, payload)` records and notes their offsets.
    fn produce(&mut self, kafka: &MockKafka, recs: Vec<(i32, String, String)>) {
        kafka.produce(&self.topic, &recs).expect("test fixture");
        for (p, k, v) in recs {
            self.parts.entry(p).or_default().push((k, v));
        }
    }

    fn len(&self) -> usize {
        self.parts.values().map(Vec::len).sum()
    }

    /// Every record but the `exempt` (partition, offset) ones, as the subscriber must see
    /// them (per partition in offset order; each key lives on one partition).
    fn expected(&self, exempt: &[(i32, i64)]) -> Vec<Expected> {
        self.parts
            .iter()
            .flat_map(|(p, recs)| {
                recs.iter()
                    .enumerate()
                    .filter(move |(o, _)| !exempt.contains(&(*p, *o as i64)))
                    .map(|(_, (k, v))| Expected {
                        topic: format!("sensors/{k}"),
                        payload: Bytes::from(v.clone()),
                    })
            })
            .collect()
    }

    /// Records below `to` in partition `p` but the exempt ones: (offset, payload).
    fn below(&self, p: i32, to: i64, exempt: &[(i32, i64)]) -> Vec<(i64, Bytes)> {
        self.parts
            .get(&p)
            .map(|recs| {
                recs.iter()
                    .enumerate()
                    .map(|(o, (_, v))| (o as i64, Bytes::from(v.clone())))
                    .filter(|(o, _)| *o < to && !exempt.contains(&(p, *o)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Reads the topic back: every record sits at the offset this log gave it.
    fn verify(&self, kafka: &MockKafka) {
        let read = kafka
            .read_records(&self.topic, self.len(), Duration::from_secs(60))
            .expect("test fixture");
        assert_eq!(
            read.len(),
            self.len(),
            "test fixture: {} read back",
            self.topic
        );
        for r in read {
            let want = self
                .parts
                .get(&r.partition)
                .and_then(|v| v.get(r.offset as usize));
            assert_eq!(
                want.map(|(k, v)| (k.as_str(), v.as_str())),
                Some((r.key.as_str(), r.value.as_str())),
                "test fixture: {}/{}@{} is not where the log put it",
                self.topic,
                r.partition,
                r.offset
            );
        }
    }
}

/// A transform that lets every record through and notes each (partition, offset) the
/// bridge consumed and kept (a record its flow drops is never transformed).
#[derive(Clone, Default)]
struct Probe(Arc<Consumed>);

#[derive(Default)]
struct Consumed {
    seen: Mutex<Vec<(i32, i64)>>,
    changed: Condvar,
}

impl Probe {
    fn transform(&self) -> Transform {
        let me = self.clone();
        Box::new(move |r| {
            let Consumed { seen, changed } = &*me.0;
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((r.tp.partition, r.offset));
            changed.notify_all();
            Some(r)
        })
    }

    fn seen(&self) -> Vec<(i32, i64)> {
        self.0
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (at most `timeout`) until `done` holds for what was consumed so far.
    fn wait(&self, timeout: Duration, done: impl Fn(&[(i32, i64)]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let Consumed { seen, changed } = &*self.0;
        let mut g = seen.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if done(&g) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Samples a group's committed positions in the background (every 250 ms).
struct CommitWatch {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Vec<Vec<Option<i64>>>>,
}

impl CommitWatch {
    fn start(kafka: &MockKafka, group: &str, topic: &str, partitions: i32) -> Self {
        let (stop, rx) = mpsc::channel::<()>();
        let (bootstrap, group, topic) = (kafka.bootstrap(), group.to_string(), topic.to_string());
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                if let Ok(c) = committed_offsets(&bootstrap, &group, &topic, partitions) {
                    samples.push(c);
                }
                match rx.recv_timeout(Duration::from_millis(250)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return samples,
                }
            }
        });
        Self { stop, thread }
    }

    /// Stops sampling; the samples in time order.
    fn finish(self) -> Samples {
        let _ = self.stop.send(());
        Samples(self.thread.join().expect("commit watch"))
    }
}

struct Samples(Vec<Vec<Option<i64>>>);

impl Samples {
    /// The highest position each partition was ever seen committed at.
    fn max(&self) -> BTreeMap<i32, i64> {
        let mut m = BTreeMap::new();
        for s in &self.0 {
            for (p, c) in s.iter().enumerate() {
                if let Some(c) = c {
                    let e = m.entry(p as i32).or_insert(*c);
                    *e = (*e).max(*c);
                }
            }
        }
        m
    }

    /// Where a committed position went back, if it ever did.
    fn went_back(&self) -> Option<String> {
        let mut last: BTreeMap<usize, i64> = BTreeMap::new();
        for (i, s) in self.0.iter().enumerate() {
            for (p, c) in s.iter().enumerate() {
                let Some(c) = *c else { continue };
                if let Some(prev) = last.insert(p, c) {
                    if c < prev {
                        return Some(format!("partition {p}: {prev} then {c} (sample {i})"));
                    }
                }
            }
        }
        None
    }
}

/// The max over the samples and the final positions.
fn highest(samples: &Samples, last: &[Option<i64>]) -> BTreeMap<i32, i64> {
    let mut m = samples.max();
    for (p, c) in last.iter().enumerate() {
        if let Some(c) = c {
            let e = m.entry(p as i32).or_insert(*c);
            *e = (*e).max(*c);
        }
    }
    m
}

/// Asserts that every record below each committed position (but the `exempt` ones, which
/// the error policy holds) reached the subscriber; waits at most `timeout` for records
/// still on their way to it.
fn assert_commits_delivered(
    what: &str,
    log: &Log,
    committed: &BTreeMap<i32, i64>,
    exempt: &[(i32, i64)],
    sub: &SyncSubscriber,
    timeout: Duration,
) {
    let below: Vec<(i32, i64, Bytes)> = committed
        .iter()
        .flat_map(|(p, to)| {
            log.below(*p, *to, exempt)
                .into_iter()
                .map(move |(o, v)| (*p, o, v))
        })
        .collect();
    let want: Vec<Bytes> = below.iter().map(|(_, _, v)| v.clone()).collect();
    if sub.wait_for_all(&want, timeout) == want.len() {
        return;
    }
    let got: BTreeSet<Bytes> = sub.messages().into_iter().map(|m| m.payload).collect();
    let missing: Vec<String> = below
        .iter()
        .filter(|(_, _, v)| !got.contains(v))
        .map(|(p, o, _)| format!("{}/{p}@{o}", log.topic))
        .collect();
    panic!(
        "{what}: committed {committed:?} passes {} record(s) the subscriber never received, \
         e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Polls `f` every 200 ms until it returns `Some`, at most `timeout`.
fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (at most `timeout`) until the group's positions satisfy `done`; returns the last
/// positions read.
fn wait_committed(
    kafka: &MockKafka,
    group: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
    done: impl Fn(&[Option<i64>]) -> bool,
) -> Vec<Option<i64>> {
    let mut last = Vec::new();
    let _ = poll_until(timeout, || {
        last = kafka
            .committed(group, topic, partitions)
            .expect("test fixture");
        done(&last).then_some(())
    });
    last
}

/// Stops a bridge, at most `limit`: a bridge that failed while running fails here (its
/// error was printed when its task or thread ended).
fn stop_within<B: RunningBridge + Send + 'static>(
    b: B,
    limit: Duration,
    what: &str,
) -> BridgeStats {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.stop()));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(stats)) => stats,
        Ok(Err(_)) => panic!("{what}: the bridge failed (its error is printed above)"),
        Err(_) => panic!("{what}: the bridge did not stop within {limit:?}"),
    }
}

fn kafka_config(
    kafka: &MockKafka,
    group: &str,
    topic: &str,
    properties: BTreeMap<String, String>,
) -> KafkaConfig {
    let mut kc = KafkaConfig::new(kafka.bootstrap(), group, vec![topic.to_string()]);
    kc.properties = properties;
    kc.commit_interval = Duration::from_millis(500);
    kc
}

/// A small sink: 10 records buffered, 5 in flight.
fn small_sink(port: u16) -> Config {
    let mut mqtt = config(port, MqttVersion::V5, 1);
    mqtt.max_buffered_records = 10;
    mqtt.max_inflight = 5;
    mqtt
}

fn arrivals(sub: &SyncSubscriber) -> Vec<(String, Bytes)> {
    sub.messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect()
}

fn payloads(expected: &[Expected]) -> Vec<Bytes> {
    expected.iter().map(|e| e.payload.clone()).collect()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "mqtt-sink-{tag}-{}-{}",
        std::process::id(),
        crate::mosquitto::free_port()
    ))
}

/// C1: an eager rebalance (classic `range`) while the sink is full. Bridge A owns both
/// partitions; Mosquitto is frozen (SIGSTOP), so nothing is acknowledged: A's sink is full
/// and the rest of the records wait in its flow. A second member B joins (A loses both
/// partitions and gets one back), then leaves (A gets both back), then Mosquitto runs
/// again. A must not fail, every record arrives, the end offsets are committed, and no
/// committed position ever passes a record the subscriber did not receive or goes back.
pub fn eager_rebalance_while_the_sink_is_full_loses_nothing<R: BridgeRuntime>()
where
    R::Running: Send + 'static,
{
    let (topic, group, n) = ("c1", "g-c1", 300i64);
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic(topic, 2).expect("test fixture");
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("test fixture");
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let props = classic_group_properties("range");
    let mut log = Log::new(topic);
    let rec = |p: i32, o: i64| (p, format!("c1/{p}"), format!("c1-{p}-{o}"));
    log.produce(&kafka, vec![rec(0, 0), rec(1, 0)]);
    let mut mqtt = small_sink(broker.port);
    mqtt.flush_timeout = Duration::from_secs(2);
    // The broker stays frozen for several rebalances: no ack timeouts meanwhile.
    mqtt.ack_timeout = Duration::from_secs(120);
    let probe = Probe::default();
    let watch = CommitWatch::start(&kafka, group, topic, 2);
    let a = R::start_with(
        kafka_config(&kafka, group, topic, props.clone()),
        mqtt,
        "c1-a",
        Some(probe.transform()),
    );
    // A is connected and owns both partitions: the first record of each arrived.
    assert_eq!(
        sub.wait_for(2, Duration::from_secs(60)),
        2,
        "A never started"
    );
    broker.pause();
    log.produce(
        &kafka,
        (1..=n)
            .flat_map(|o| [rec(0, o), rec(1, o)])
            .collect::<Vec<_>>(),
    );
    // A consumed everything: 10 records in its sink, unacknowledged; the rest held.
    let total = log.len();
    assert!(
        probe.wait(Duration::from_secs(30), |s| s.len() >= total),
        "A consumed only {} of {total} records",
        probe.seen().len()
    );
    let before = probe.seen().len();
    let b = GroupMember::join(&kafka.bootstrap(), group, topic, &props).expect("test fixture");
    let taken = b.wait_assigned(Duration::from_secs(60));
    assert!(!taken.is_empty(), "B never got a partition");
    let kept: Vec<i32> = (0..2).filter(|p| !taken.contains(p)).collect();
    // A lost both partitions and got `kept` back: it reads it again from its commit.
    assert!(
        kept.is_empty()
            || probe.wait(Duration::from_secs(60), |s| {
                s[before..].iter().any(|(p, _)| kept.contains(p))
            }),
        "A did not read {kept:?} again after the rebalance"
    );
    b.leave(Duration::from_secs(30)).expect("test fixture");
    // A loses `kept` and gets both partitions: it reads `kept` from its commit a third
    // time, or B's partition a second time (which comes first is librdkafka's choice; A
    // pauses both once its full sink has held records for a second).
    let first = |p: i32| (p, 1i64);
    assert!(
        probe.wait(Duration::from_secs(60), |s| {
            let n = |r: (i32, i64)| s.iter().filter(|x| **x == r).count();
            kept.iter().any(|p| n(first(*p)) >= 3) || taken.iter().any(|p| n(first(*p)) >= 2)
        }),
        "A did not get its partitions back after B left"
    );
    broker.resume();
    let expected = log.expected(&[]);
    let arrived = sub.wait_for_all(&payloads(&expected), Duration::from_secs(90));
    let end = vec![Some(n + 1); 2];
    let last = wait_committed(&kafka, group, topic, 2, Duration::from_secs(30), |c| {
        c == end.as_slice()
    });
    let stats = stop_within(a, Duration::from_secs(30), "A");
    let samples = watch.finish();
    assert_eq!(arrived, expected.len(), "records lost: {stats:?}");
    assert_eq!(last, end, "end offsets not committed: {stats:?}");
    assert_eq!(samples.went_back(), None, "a commit went back");
    // The case did what it is for: A held records when its partitions were revoked.
    assert!(
        stats.dropped > 0,
        "test setup: nothing held at the revoke: {stats:?}"
    );
    assert_commits_delivered(
        "C1",
        &log,
        &highest(&samples, &last),
        &[],
        &sub,
        Duration::from_secs(10),
    );
    check(&expected, &arrivals(&sub), true).unwrap_or_else(|e| panic!("{e}"));
    log.verify(&kafka);
}

/// H1: a rewind while records of partitions never pushed are held. Fail policy; an
/// ACL-denied record at partition 0 offset 1; 8 partitions. Mosquitto is frozen while
/// partition 0's records fill the sink (the denied one among them) and 130 records of each
/// other partition wait in the bridge; once it runs again, the checkpoint after 400 pushes
/// fails at the denied record and rewinds, while most partitions were never pushed. Each
/// must be read again from where it started: every record below each committed position
/// reaches the subscriber (the denied one is never passed), and partitions 1..7 are
/// delivered and committed to their ends.
pub fn rewind_re_reads_partitions_never_pushed<R: BridgeRuntime>()
where
    R::Running: Send + 'static,
{
    let _rewinds = rewinds_shared();
    let (topic, group) = ("h1", "g-h1");
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic(topic, 8).expect("test fixture");
    let dir = temp_dir("h1");
    let broker = acl_broker(&dir);
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let mut log = Log::new(topic);
    let ok = |p: i32, o: i64| (p, format!("ok/{p}"), format!("h1-{p}-{o}"));
    log.produce(&kafka, vec![ok(0, 0)]);
    let mut mqtt = small_sink(broker.port);
    mqtt.error_policy = ErrorPolicy::Fail;
    mqtt.flush_timeout = Duration::from_secs(2);
    mqtt.ack_timeout = Duration::from_secs(60);
    let mut kc = kafka_config(&kafka, group, topic, fast_group_properties());
    kc.commit_interval = Duration::from_secs(10);
    kc.commit_every = Some(400);
    let probe = Probe::default();
    let watch = CommitWatch::start(&kafka, group, topic, 8);
    let b = R::start_with(kc, mqtt, "h1", Some(probe.transform()));
    assert_eq!(sub.wait_for(1, Duration::from_secs(60)), 1, "never started");
    broker.pause();
    let denied = (0, 1);
    let mut p0 = vec![(0, "denied".to_string(), "h1-0-1".to_string())];
    p0.extend((2..=10).map(|o| ok(0, o)));
    log.produce(&kafka, p0);
    assert!(
        probe.wait(Duration::from_secs(30), |s| s.contains(&(0, 10))),
        "partition 0 not consumed"
    );
    // Behind the full sink: consumed within PAUSE_AFTER (1 s), before the pause.
    log.produce(
        &kafka,
        (1..8)
            .flat_map(|p| (0..130).map(move |o| ok(p, o)))
            .collect::<Vec<_>>(),
    );
    assert!(
        probe.wait(Duration::from_secs(30), |s| {
            s.iter().filter(|(p, _)| *p > 0).count() >= 7 * 130
        }),
        "partitions 1..7 not consumed"
    );
    broker.resume();
    // The failed checkpoint rewound: the denied record is read again.
    assert!(
        probe.wait(Duration::from_secs(60), |s| {
            s.iter().filter(|r| **r == denied).count() >= 2
        }),
        "no rewind"
    );
    let arrived: BTreeSet<String> = sub.messages().into_iter().map(|m| m.topic).collect();
    let never_pushed: Vec<i32> = (1..8)
        .filter(|p| !arrived.contains(&format!("sensors/ok/{p}")))
        .collect();
    // New records behind the dropped ones: a partition not read again would commit them.
    log.produce(
        &kafka,
        (1..8)
            .flat_map(|p| (130..140).map(move |o| ok(p, o)))
            .collect::<Vec<_>>(),
    );
    let last = wait_committed(&kafka, group, topic, 8, Duration::from_secs(90), |c| {
        c[1..].iter().all(|c| *c == Some(140))
    });
    let stats = stop_within(b, Duration::from_secs(30), "bridge");
    let samples = watch.finish();
    let highest = highest(&samples, &last);
    assert!(
        !never_pushed.is_empty(),
        "test setup: every partition had records delivered before the rewind"
    );
    assert!(
        highest.get(&0).is_none_or(|c| *c <= 1),
        "the denied record 0@1 was committed past: {highest:?}"
    );
    assert_commits_delivered(
        "H1",
        &log,
        &highest,
        &[denied],
        &sub,
        Duration::from_secs(15),
    );
    assert_eq!(
        &last[1..],
        &[Some(140); 7],
        "partitions 1..7 not delivered and committed (never pushed at the rewind: \
         {never_pushed:?}): {stats:?}"
    );
    assert!(stats.rewinds >= 1 && stats.dropped > 0, "{stats:?}");
    log.verify(&kafka);
    let _ = std::fs::remove_dir_all(&dir);
}

/// H2: a seek that fails. Fail policy, an ACL-denied record at offset 2 of 300; the first
/// three seeks of the process fail (`mqtt_sink_kafka::fail_next_seeks`), so the first
/// rewind's seek back to the denied record fails and is retried. Records produced meanwhile
/// (offsets 300..399) must not move the commit: it stays at the denied record for good (the
/// policy keeps failing there), the consumer goes back to it (read again, twice), and every
/// other record, those 100 included, is delivered.
pub fn failed_seek_is_retried_and_never_skips_records<R: BridgeRuntime>()
where
    R::Running: Send + 'static,
{
    let _alone = rewinds_alone();
    let _faults = SeekFaults::inject(3);
    let (topic, group) = ("h2", "g-h2");
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic(topic, 1).expect("test fixture");
    let dir = temp_dir("h2");
    let broker = acl_broker(&dir);
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let mut log = Log::new(topic);
    let denied = (0, 2);
    let rec = |o: i64| {
        let key = if (0, o) == denied { "denied" } else { "ok/h2" };
        (0, key.to_string(), format!("h2-{o}"))
    };
    log.produce(&kafka, (0..300).map(rec).collect());
    let mut mqtt = small_sink(broker.port);
    mqtt.error_policy = ErrorPolicy::Fail;
    let probe = Probe::default();
    let watch = CommitWatch::start(&kafka, group, topic, 1);
    let b = R::start_with(
        kafka_config(&kafka, group, topic, fast_group_properties()),
        mqtt,
        "h2",
        Some(probe.transform()),
    );
    // The first failed checkpoint commits up to the denied record, then rewinds.
    let first = wait_committed(&kafka, group, topic, 1, Duration::from_secs(60), |c| {
        c == [Some(2)]
    });
    assert_eq!(
        first,
        vec![Some(2)],
        "no checkpoint up to the denied record"
    );
    log.produce(&kafka, (300..400).map(rec).collect());
    let reread = probe.wait(Duration::from_secs(60), |s| {
        s.iter().filter(|r| **r == denied).count() >= 3
    });
    let expected = log.expected(&[denied]);
    let arrived = sub.wait_for_all(&payloads(&expected), Duration::from_secs(60));
    let stats = stop_within(b, Duration::from_secs(30), "bridge");
    let samples = watch.finish();
    let last = kafka.committed(group, topic, 1).expect("test fixture");
    assert!(stats.seek_errors > 0, "no seek failed: {stats:?}");
    assert!(
        reread,
        "the consumer never went back to the denied record twice: {stats:?}"
    );
    assert_eq!(
        last,
        vec![Some(2)],
        "committed past the denied record: {stats:?}"
    );
    let highest = highest(&samples, &last);
    assert_eq!(
        highest.get(&0),
        Some(&2),
        "a commit passed the denied record"
    );
    assert_commits_delivered(
        "H2",
        &log,
        &highest,
        &[denied],
        &sub,
        Duration::from_secs(10),
    );
    assert_eq!(arrived, expected.len(), "records lost: {stats:?}");
    check(&expected, &arrivals(&sub), true).unwrap_or_else(|e| panic!("{e}"));
    log.verify(&kafka);
    let _ = std::fs::remove_dir_all(&dir);
}

/// H3: Kafka refuses the dead letter (every Produce answers TOPIC_AUTHORIZATION_FAILED once
/// the source topic is loaded). Dead-letter policy, one ACL-denied record at offset 2: it
/// must fail as under `fail`: the checkpoint rewinds and the record is read (and refused)
/// again, the commit stays at it, and the dead-letter topic stays empty.
pub fn refused_dead_letter_fails_like_the_fail_policy<R: BridgeRuntime>()
where
    R::Running: Send + 'static,
{
    let _rewinds = rewinds_shared();
    let (topic, dlq, group) = ("h3", "h3-dlq", "g-h3");
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic(topic, 1).expect("test fixture");
    kafka.create_topic(dlq, 1).expect("test fixture");
    let dir = temp_dir("h3");
    let broker = acl_broker(&dir);
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let mut log = Log::new(topic);
    log.produce(
        &kafka,
        ["ok/1", "ok/2", "denied", "ok/3"]
            .iter()
            .map(|k| (0, k.to_string(), format!("h3-{k}")))
            .collect(),
    );
    // One error per Produce request: enough for every retry of the test.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
    );
    let mut mqtt = config(broker.port, MqttVersion::V5, 1);
    mqtt.error_policy = ErrorPolicy::DeadLetter;
    mqtt.dead_letter_topic = Some(dlq.to_string());
    let probe = Probe::default();
    let watch = CommitWatch::start(&kafka, group, topic, 1);
    let b = R::start_with(
        kafka_config(&kafka, group, topic, fast_group_properties()),
        mqtt,
        "h3",
        Some(probe.transform()),
    );
    assert_eq!(sub.wait_for(3, Duration::from_secs(60)), 3);
    // Each refused dead letter fails its checkpoint, which rewinds to the record.
    let reread = probe.wait(Duration::from_secs(60), |s| {
        s.iter().filter(|r| **r == (0, 2)).count() >= 3
    });
    let stats = stop_within(b, Duration::from_secs(30), "bridge");
    let samples = watch.finish();
    let last = kafka.committed(group, topic, 1).expect("test fixture");
    let dead = kafka
        .read_all(dlq, 1, Duration::from_secs(5))
        .expect("test fixture");
    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    assert!(
        reread,
        "the refused dead letter counted as delivered (no rewind to it): {stats:?}"
    );
    assert_eq!(last, vec![Some(2)], "committed past the record: {stats:?}");
    assert_eq!(samples.max().get(&0).copied().unwrap_or(2), 2);
    assert!(stats.rewinds >= 1, "{stats:?}");
    assert_eq!(dead, vec![], "the dead-letter topic got records");
    let _ = std::fs::remove_dir_all(&dir);
}

/// M2: the dead-letter producer takes the user's `[kafka.properties]`. librdkafka's mock
/// cluster cannot require SASL: it has no SaslHandshake or SaslAuthenticate handler
/// (`rdkafka_mock_handlers.c`), and a client created with `test.mock.num.brokers` has its
/// `security.protocol` reset to plaintext (`rd_kafka_new`). So the case shows (1) that the
/// producer's config carries the SASL settings (and none of the consumer-only ones), and
/// (2) end to end, with a producer property the mock can show: a `partitioner` in the
/// properties decides which partition of the dead-letter topic the record lands in, and
/// its offset is committed.
pub fn dead_letter_producer_takes_the_kafka_properties<R: BridgeRuntime>()
where
    R::Running: Send + 'static,
{
    let _rewinds = rewinds_shared();
    let (topic, dlq, group) = ("m2", "m2-dlq", "g-m2");
    let kafka = MockKafka::start().expect("test fixture");
    let mut secured = kafka_config(&kafka, group, topic, fast_group_properties());
    for (k, v) in [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanisms", "PLAIN"),
        ("sasl.username", "sink"),
        ("sasl.password", "sink-secret"),
    ] {
        secured.properties.insert(k.into(), v.into());
    }
    let pc = mqtt_sink_kafka::producer_config(&secured);
    for (k, v) in &secured.properties {
        let consumer_only = ["group.protocol", "auto.offset.reset"].contains(&k.as_str());
        let want = (!consumer_only).then_some(v.as_str());
        assert_eq!(pc.get(k), want, "dead-letter producer property {k}");
    }
    // End to end: find a denied key that murmur2 and the default partitioner place apart.
    kafka.create_topic(topic, 1).expect("test fixture");
    kafka.create_topic(dlq, 8).expect("test fixture");
    let candidates: Vec<String> = (0..16).map(|i| format!("denied-{i}")).collect();
    let keys: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let murmur2: BTreeMap<String, String> = [("partitioner".to_string(), "murmur2".to_string())]
        .into_iter()
        .collect();
    let by_default = kafka
        .partitions_for_keys(&keys, 8, &BTreeMap::new())
        .expect("test fixture");
    let by_murmur2 = kafka
        .partitions_for_keys(&keys, 8, &murmur2)
        .expect("test fixture");
    let i = (0..keys.len())
        .find(|i| by_default[*i] != by_murmur2[*i])
        .expect("test fixture: the partitioners agree on every key");
    let key = keys[i];
    let dir = temp_dir("m2");
    let broker = acl_broker(&dir);
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let recs: Vec<_> = ["ok/1", "ok/2", key, "ok/3"]
        .iter()
        .map(|k| (0, k.to_string(), format!("m2-{k}")))
        .collect();
    kafka.produce(topic, &recs).expect("test fixture");
    let mut mqtt = config(broker.port, MqttVersion::V5, 1);
    mqtt.error_policy = ErrorPolicy::DeadLetter;
    mqtt.dead_letter_topic = Some(dlq.to_string());
    let mut kc = kafka_config(&kafka, group, topic, fast_group_properties());
    kc.properties.extend(murmur2);
    let b = R::start(kc, mqtt, "m2");
    assert_eq!(sub.wait_for(3, Duration::from_secs(60)), 3);
    let last = wait_committed(&kafka, group, topic, 1, Duration::from_secs(30), |c| {
        c == [Some(4)]
    });
    let stats = stop_within(b, Duration::from_secs(30), "bridge");
    let dead = kafka
        .read_records(dlq, 1, Duration::from_secs(20))
        .expect("test fixture");
    assert_eq!(last, vec![Some(4)], "the dead letter's offset: {stats:?}");
    assert_eq!(
        dead.iter()
            .map(|r| (r.partition, r.key.as_str(), r.value.as_str()))
            .collect::<Vec<_>>(),
        vec![(by_murmur2[i], key, format!("m2-{key}").as_str())],
        "the dead letter did not follow the properties' partitioner (default: partition {})",
        by_default[i]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// M5: `commit_every = 100` counts records, not batches: 10,000 preloaded records (which
/// arrive in batches of up to 1024) with a one-hour `commit_interval` make at least 90
/// commits.
pub fn commit_every_counts_records<R: BridgeRuntime>()
where
    R::Running: Send + 'static,
{
    let (topic, group) = ("m5", "g-m5");
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic(topic, 4).expect("test fixture");
    let (recs, expected) = super::records(10_000, 4, "m5");
    kafka.produce(topic, &recs).expect("test fixture");
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("test fixture");
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let mut kc = kafka_config(&kafka, group, topic, fast_group_properties());
    kc.commit_interval = Duration::from_secs(3600);
    kc.commit_every = Some(100);
    let b = R::start(kc, config(broker.port, MqttVersion::V5, 1), "m5");
    let arrived = sub.wait_for_all(&payloads(&expected), Duration::from_secs(120));
    let stats = stop_within(b, Duration::from_secs(30), "bridge");
    assert_eq!(arrived, expected.len(), "{stats:?}");
    assert!(
        stats.commits >= 90,
        "{} commits for 10,000 records with commit_every = 100: {stats:?}",
        stats.commits
    );
    assert_eq!(
        kafka.committed(group, topic, 4).expect("test fixture"),
        vec![Some(2500); 4]
    );
    check(&expected, &arrivals(&sub), false).unwrap_or_else(|e| panic!("{e}"));
}
