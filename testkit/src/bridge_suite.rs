//! The Kafka bridge suite, written once and run for every runtime (MockCluster + Mosquitto).
//!
//! A runtime's test file implements [`BridgeRuntime`] and expands
//! [`bridge_suite!`](crate::bridge_suite).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use mqtt_sink_core::{BridgeStats, Config, ErrorPolicy, KafkaConfig, MqttVersion};

use crate::checker::{check, Expected};
use crate::kafka::{classic_group_properties, fast_group_properties, MockKafka};
use crate::mosquitto::{Mosquitto, MosquittoOptions};
use crate::subscriber::SyncSubscriber;
use crate::suite::config;

mod regressions;
pub use regressions::{
    commit_every_counts_records, dead_letter_producer_takes_the_kafka_properties,
    eager_rebalance_while_the_sink_is_full_loses_nothing,
    failed_seek_is_retried_and_never_skips_records, refused_dead_letter_fails_like_the_fail_policy,
    rewind_re_reads_partitions_never_pushed,
};

/// A bridge running in the background.
pub trait RunningBridge {
    /// Stops it gracefully (flush, commit, DISCONNECT) and returns its stats.
    fn stop(self) -> BridgeStats;
}

/// The runtime under test.
pub trait BridgeRuntime {
    /// Its running bridge.
    type Running: RunningBridge;
    /// Starts a bridge with this MQTT client-id suffix.
    fn start(kafka: KafkaConfig, mqtt: Config, suffix: &str) -> Self::Running {
        Self::start_with(kafka, mqtt, suffix, None)
    }
    /// Starts a bridge with a per-record transform.
    fn start_with(
        kafka: KafkaConfig,
        mqtt: Config,
        suffix: &str,
        transform: Option<Transform>,
    ) -> Self::Running;
}

/// A per-record transform for [`BridgeRuntime::start_with`].
pub type Transform =
    Box<dyn FnMut(mqtt_sink_core::Record) -> Option<mqtt_sink_core::Record> + Send>;

fn run<R: BridgeRuntime>(
    kafka: &MockKafka,
    group: &str,
    topic: &str,
    mqtt: Config,
    suffix: &str,
) -> R::Running {
    run_with::<R>(kafka, group, topic, mqtt, suffix, fast_group_properties())
}

fn run_with<R: BridgeRuntime>(
    kafka: &MockKafka,
    group: &str,
    topic: &str,
    mqtt: Config,
    suffix: &str,
    properties: BTreeMap<String, String>,
) -> R::Running {
    let mut kc = KafkaConfig::new(kafka.bootstrap(), group, vec![topic.to_string()]);
    kc.properties = properties;
    kc.commit_interval = Duration::from_millis(500);
    R::start(kc, mqtt, suffix)
}

fn records(n: usize, partitions: i32, tag: &str) -> (Vec<(i32, String, String)>, Vec<Expected>) {
    // As in Kafka, a key lives on one partition (8 keys spread evenly).
    let recs: Vec<_> = (0..n)
        .map(|i| {
            (
                ((i % 8) as i32) % partitions,
                format!("k{}", i % 8),
                format!("{tag}-{i}"),
            )
        })
        .collect();
    let exp = recs
        .iter()
        .map(|(_, k, v)| Expected {
            topic: format!("sensors/{k}"),
            payload: Bytes::from(v.clone()),
        })
        .collect();
    (recs, exp)
}

/// A bridge delivers every record and commits the end offsets.
pub fn bridge_delivers_and_commits_end_offsets<R: BridgeRuntime>() {
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic("readings", 4).expect("test fixture");
    let (recs, expected) = records(2000, 4, "d");
    kafka.produce("readings", &recs).expect("test fixture");
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("test fixture");
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let b = run::<R>(
        &kafka,
        "g-deliver",
        "readings",
        config(broker.port, MqttVersion::V5, 1),
        "a",
    );
    assert_eq!(sub.wait_for(2000, Duration::from_secs(60)), 2000);
    let stats = b.stop();
    assert_eq!(stats.consumed, 2000);
    assert_eq!(
        kafka
            .committed("g-deliver", "readings", 4)
            .expect("test fixture"),
        vec![Some(500); 4]
    );
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    check(&expected, &arrivals, false).unwrap_or_else(|e| panic!("{e}"));
}

fn acl_broker(dir: &std::path::Path) -> Mosquitto {
    std::fs::create_dir_all(dir).expect("test fixture");
    let acl = dir.join("acl");
    std::fs::write(&acl, "topic read sensors/#\ntopic write sensors/ok/#\n").expect("test fixture");
    let _ = std::process::Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(dir)
        .status();
    Mosquitto::start(MosquittoOptions {
        extra: vec![format!("acl_file {}", acl.display())],
        ..MosquittoOptions::default()
    })
    .expect("test fixture")
}

/// An ACL-denied MQTT 5 publish (0x87): `fail` stops the commit before it, `skip` passes
/// it, `dead-letter` produces it to the dead-letter topic.
pub fn acl_denied_publish_follows_the_error_policy<R: BridgeRuntime>() {
    let _rewinds = regressions::rewinds_shared();
    let kafka = MockKafka::start().expect("test fixture");
    let dir = std::env::temp_dir().join(format!("mqtt-sink-acl-{}", std::process::id()));
    let broker = acl_broker(&dir);
    for (i, policy) in [
        ErrorPolicy::Skip,
        ErrorPolicy::DeadLetter,
        ErrorPolicy::Fail,
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("acl-{i}");
        kafka.create_topic(&topic, 1).expect("test fixture");
        kafka
            .create_topic(&format!("{topic}-dlq"), 1)
            .expect("test fixture");
        let recs: Vec<_> = ["ok/1", "ok/2", "denied", "ok/3"]
            .iter()
            .map(|k| (0, k.to_string(), format!("{policy}-{k}")))
            .collect();
        kafka.produce(&topic, &recs).expect("test fixture");
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let mut mqtt = config(broker.port, MqttVersion::V5, 1);
        mqtt.error_policy = policy;
        if policy == ErrorPolicy::DeadLetter {
            mqtt.dead_letter_topic = Some(format!("{topic}-dlq"));
        }
        let group = format!("g-acl-{i}");
        let b = run::<R>(&kafka, &group, &topic, mqtt, "acl");
        assert_eq!(sub.wait_for(3, Duration::from_secs(30)), 3, "{policy}");
        // Let a few checkpoints pass (the fail policy rewinds and retries meanwhile).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let want = if policy == ErrorPolicy::Fail {
            Some(2)
        } else {
            Some(4)
        };
        // Under `fail`, commits between checkpoints reach the denied record before the
        // first checkpoint fails: wait for the rewind too (the record after the denied one
        // arrives a second time once the consumer is sought back).
        let after_denied = bytes::Bytes::from(format!("{policy}-ok/3"));
        let rewound = || {
            policy != ErrorPolicy::Fail
                || sub
                    .messages()
                    .iter()
                    .filter(|m| m.payload == after_denied)
                    .count()
                    >= 2
        };
        while (kafka.committed(&group, &topic, 1).expect("test fixture")[0] != want || !rewound())
            && std::time::Instant::now() < deadline
        {
            sub.wait_for(usize::MAX, Duration::from_millis(200));
        }
        let stats = b.stop();
        let committed = kafka.committed(&group, &topic, 1).expect("test fixture")[0];
        assert_eq!(
            committed, want,
            "{policy}: committed {committed:?} ({stats:?})"
        );
        if policy == ErrorPolicy::Fail {
            assert!(stats.rewinds >= 1, "{stats:?}");
        }
        if policy == ErrorPolicy::DeadLetter {
            let dlq = kafka
                .read_all(&format!("{topic}-dlq"), 1, Duration::from_secs(20))
                .expect("test fixture");
            assert_eq!(
                dlq,
                vec![("denied".to_string(), "dead-letter-denied".to_string())]
            );
        }
        let got: Vec<_> = sub.messages().into_iter().map(|m| m.topic).collect();
        assert!(!got.contains(&"sensors/denied".to_string()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two bridges in one group share the partitions; stopping one hands its partitions over
/// after a commit (KIP-848, classic eager, classic cooperative-sticky).
pub fn two_bridges_share_a_group_and_hand_over_on_stop<R: BridgeRuntime>() {
    // KIP-848, classic eager (range) and classic incremental (cooperative-sticky).
    let protocols = [
        ("consumer", fast_group_properties()),
        ("eager", classic_group_properties("range")),
        (
            "cooperative",
            classic_group_properties("cooperative-sticky"),
        ),
    ];
    for (name, props) in protocols {
        two_bridges::<R>(name, props);
    }
}

fn two_bridges<R: BridgeRuntime>(name: &str, props: BTreeMap<String, String>) {
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic("shared", 4).expect("test fixture");
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("test fixture");
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let group = format!("g-two-{name}");
    let (first, mut expected) = records(1000, 4, "one");
    kafka.produce("shared", &first).expect("test fixture");
    let mqtt = || config(broker.port, MqttVersion::V311, 1);
    let a = run_with::<R>(&kafka, &group, "shared", mqtt(), "a", props.clone());
    assert_eq!(sub.wait_for(1000, Duration::from_secs(60)), 1000, "{name}");
    let b = run_with::<R>(&kafka, &group, "shared", mqtt(), "b", props);
    let (second, exp2) = records(1000, 4, "two");
    kafka.produce("shared", &second).expect("test fixture");
    expected.extend(exp2);
    // Stopping A hands its partitions to B after A committed them.
    let stats_a = a.stop();
    let (third, exp3) = records(1000, 4, "three");
    kafka.produce("shared", &third).expect("test fixture");
    expected.extend(exp3);
    let all = expected.len();
    let want: Vec<Bytes> = expected.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(
        sub.wait_for_all(&want, Duration::from_secs(90)),
        all,
        "{name}"
    );
    // B commits everything at its next checkpoint (a rebalance may delay it).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while kafka.committed(&group, "shared", 4).expect("test fixture") != vec![Some(750); 4]
        && std::time::Instant::now() < deadline
    {
        sub.wait_for(usize::MAX, Duration::from_millis(250));
    }
    let stats_b = b.stop();
    assert_eq!(
        kafka.committed(&group, "shared", 4).expect("test fixture"),
        vec![Some(750); 4],
        "{name}: A {stats_a:?} B {stats_b:?}"
    );
    assert!(stats_b.consumed > 0, "{name}: B took part: {stats_b:?}");
    assert!(stats_a.consumed + stats_b.consumed >= all as u64, "{name}");
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    check(&expected, &arrivals, true).unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// A sink whose buffer holds 10 records stays full: the bridge pauses and resumes its
/// partitions throughout, and a transform drops every tenth record (whose offsets still
/// pass). Everything kept arrives; the end offsets are committed.
pub fn full_sink_pauses_and_transform_filters<R: BridgeRuntime>() {
    let kafka = MockKafka::start().expect("test fixture");
    kafka.create_topic("pressure", 4).expect("test fixture");
    let (recs, expected) = records(400, 4, "p");
    kafka.produce("pressure", &recs).expect("test fixture");
    let broker = Mosquitto::start(MosquittoOptions::default()).expect("test fixture");
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let mut mqtt = config(broker.port, MqttVersion::V5, 1);
    mqtt.max_buffered_records = 10;
    mqtt.max_inflight = 5;
    let mut kc = KafkaConfig::new(
        kafka.bootstrap(),
        "g-pressure",
        vec!["pressure".to_string()],
    );
    kc.properties = fast_group_properties();
    kc.commit_interval = Duration::from_millis(500);
    let drop_every_tenth: Transform = Box::new(|r| {
        let n: usize = std::str::from_utf8(r.value.as_deref().unwrap_or_default())
            .ok()
            .and_then(|v| v.strip_prefix("p-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        (n % 10 != 0).then_some(r)
    });
    let b = R::start_with(kc, mqtt, "pressure", Some(drop_every_tenth));
    let kept: Vec<Expected> = expected
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 0)
        .map(|(_, e)| e)
        .collect();
    let want: Vec<Bytes> = kept.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(sub.wait_for_all(&want, Duration::from_secs(90)), kept.len());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while kafka
        .committed("g-pressure", "pressure", 4)
        .expect("test fixture")
        != vec![Some(100); 4]
        && std::time::Instant::now() < deadline
    {
        sub.wait_for(usize::MAX, Duration::from_millis(250));
    }
    let stats = b.stop();
    assert_eq!(
        kafka
            .committed("g-pressure", "pressure", 4)
            .expect("test fixture"),
        vec![Some(100); 4],
        "{stats:?}"
    );
    assert_eq!(stats.filtered, 40, "{stats:?}");
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    check(&kept, &arrivals, false).unwrap_or_else(|e| panic!("{e}"));
}

/// Expands to one `#[test]` per bridge case for the runtime type `$rt`.
#[macro_export]
macro_rules! bridge_suite {
    ($rt:ty) => {
        #[test]
        fn bridge_delivers_and_commits_end_offsets() {
            $crate::bridge_suite::bridge_delivers_and_commits_end_offsets::<$rt>();
        }
        #[test]
        fn acl_denied_publish_follows_the_error_policy() {
            $crate::bridge_suite::acl_denied_publish_follows_the_error_policy::<$rt>();
        }
        #[test]
        fn full_sink_pauses_and_transform_filters() {
            $crate::bridge_suite::full_sink_pauses_and_transform_filters::<$rt>();
        }
        #[test]
        fn two_bridges_share_a_group_and_hand_over_on_stop() {
            $crate::bridge_suite::two_bridges_share_a_group_and_hand_over_on_stop::<$rt>();
        }
        #[test]
        fn c1_eager_rebalance_while_the_sink_is_full_loses_nothing() {
            $crate::bridge_suite::eager_rebalance_while_the_sink_is_full_loses_nothing::<$rt>();
        }
        #[test]
        fn h1_rewind_re_reads_partitions_never_pushed() {
            $crate::bridge_suite::rewind_re_reads_partitions_never_pushed::<$rt>();
        }
        #[test]
        fn h2_failed_seek_is_retried_and_never_skips_records() {
            $crate::bridge_suite::failed_seek_is_retried_and_never_skips_records::<$rt>();
        }
        #[test]
        fn h3_refused_dead_letter_fails_like_the_fail_policy() {
            $crate::bridge_suite::refused_dead_letter_fails_like_the_fail_policy::<$rt>();
        }
        #[test]
        fn m2_dead_letter_producer_takes_the_kafka_properties() {
            $crate::bridge_suite::dead_letter_producer_takes_the_kafka_properties::<$rt>();
        }
        #[test]
        fn m5_commit_every_counts_records() {
            $crate::bridge_suite::commit_every_counts_records::<$rt>();
        }
    };
}
