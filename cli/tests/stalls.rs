//! The stream never stalls: the cases that stopped the whole pipeline for good, on real
//! processes (the `mqtt-sink` daemon on each runtime, MockCluster, a real broker). In each,
//! the broker would answer one record's publish by closing the connection; the daemon used
//! to reconnect, resend it first and be disconnected again, forever. Now the record is
//! handled by the error policy once (dead-lettered here), the rest arrive, the broker sees
//! at most `poison_after` + 1 connections and the log names the record.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_testkit::checker::{check, Expected};
use mqtt_sink_testkit::daemon::{self, each_runtime, Daemon};
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::proxy::ChaosProxy;
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const TOPIC: &str = "readings";
const DLQ: &str = "readings-dlq";
const POISON_AFTER: usize = 3;

/// Starts the daemon on `runtime` reading [`TOPIC`] into the broker at `port`,
/// dead-lettering to [`DLQ`]; `mqtt` is appended to the `[mqtt]` section.
fn start(runtime: &str, kafka: &MockKafka, group: &str, port: u16, mqtt: &str) -> Daemon {
    let mqtt = format!("reconnect_backoff_max = \"500ms\"\n{mqtt}");
    let policy = format!("[policy]\nerror_policy = \"dead-letter\"\ndead_letter_topic = \"{DLQ}\"");
    let cfg = daemon::config(
        &kafka.bootstrap(),
        (group, TOPIC),
        (port, "sensors"),
        &mqtt,
        &policy,
    );
    Daemon::start(env!("CARGO_BIN_EXE_mqtt-sink"), runtime, &cfg)
}

/// Until the group committed `end` on partition 0 (at most 60 s).
fn wait_committed(kafka: &MockKafka, group: &str, end: i64, sub: &SyncSubscriber) -> Option<i64> {
    daemon::wait_committed(kafka, (group, TOPIC), end, sub, Duration::from_secs(60))
}

/// `n` records on one partition; the one at `bad` has `bad_record`'s key and value.
fn produce(kafka: &MockKafka, tag: &str, n: usize, bad: usize, bad_record: (&str, &str)) {
    kafka.create_topic(TOPIC, 1).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let recs: Vec<_> = (0..n)
        .map(|i| match i == bad {
            true => (0, bad_record.0.to_string(), bad_record.1.to_string()),
            false => (0, format!("dev{}", i % 8), format!("{tag}-{i}")),
        })
        .collect();
    kafka.produce(TOPIC, &recs).unwrap();
}

/// Every record but the one at `bad` arrived, in order per topic; the end offset is
/// committed; the bad record is in the dead-letter topic exactly once; the log names it.
fn assert_handled_once(
    kafka: &MockKafka,
    sub: &SyncSubscriber,
    daemon: &mut Daemon,
    (group, tag, n, bad): (&str, &str, usize, usize),
    reason: &str,
) {
    let expected: Vec<Expected> = (0..n)
        .filter(|i| *i != bad)
        .map(|i| Expected {
            topic: format!("sensors/dev{}", i % 8),
            payload: Bytes::from(format!("{tag}-{i}")),
        })
        .collect();
    let want: Vec<Bytes> = expected.iter().map(|e| e.payload.clone()).collect();
    let arrived = sub.wait_for_all(&want, Duration::from_secs(60));
    let committed = wait_committed(kafka, group, n as i64, sub);
    let dead = kafka.end_offset(DLQ, 0).unwrap();
    let status = daemon.stop();
    let log = daemon.log();
    assert_eq!(arrived, n - 1, "records stuck behind the bad one:\n{log}");
    assert_eq!(
        committed,
        Some(n as i64),
        "end offset not committed:\n{log}"
    );
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{log}");
    assert_eq!(dead, 1, "dead-lettered {dead} times:\n{log}");
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    check(&expected, &arrivals, true).unwrap();
    let named = format!("{TOPIC}/0@{bad}");
    let line = log
        .lines()
        .find(|l| l.contains(&named) && l.contains(reason));
    assert!(
        line.is_some(),
        "no log line names {named} and {reason:?}:\n{log}"
    );
}

/// A key with a TAB makes Mosquitto close the connection (MQTT lets a receiver refuse
/// control characters). Before: 813 connections in 60 s, 75 of 2,000 records delivered.
#[test]
fn a_key_with_a_control_character_is_dead_lettered_once_and_the_rest_arrive() {
    each_runtime(|runtime| {
        let (n, bad, tag) = (2000, 700, format!("tab-{runtime}"));
        let group = format!("stall-tab-{runtime}");
        let kafka = MockKafka::start().unwrap();
        produce(&kafka, &tag, n, bad, ("dev\t7", "has a tab"));
        let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let mut d = start(runtime, &kafka, &group, broker.port, "");
        assert_handled_once(&kafka, &sub, &mut d, (&group, &tag, n, bad), "U+0009");
        // Connections that carried publishes; the daemon's stop adds one, CleanSession=1,
        // that ends its session on the broker (review M3).
        let ended = broker.clean_connections(&group);
        assert_eq!(ended, 1, "sessions ended at stop:\n{}", d.log());
        let conns = broker.connections(&group) - ended;
        assert!(
            (1..=POISON_AFTER + 1).contains(&conns),
            "{conns} connections:\n{}",
            d.log()
        );
    });
}

/// One record larger than the broker's `max_packet_size` on MQTT 3.1.1, where the broker
/// cannot announce its limit: Mosquitto closes the connection on it. Before: 826
/// connections, 150 of 1,000 records stuck behind it.
#[test]
fn an_oversized_record_on_mqtt_3_1_1_is_given_up_after_poison_after_closes() {
    each_runtime(|runtime| {
        let (n, bad, tag) = (1000, 300, format!("big-{runtime}"));
        let group = format!("stall-big-{runtime}");
        let kafka = MockKafka::start().unwrap();
        let big = "x".repeat(20_000);
        produce(&kafka, &tag, n, bad, ("dev4", &big));
        let broker = Mosquitto::start(MosquittoOptions {
            max_packet_size: Some(8192),
            ..MosquittoOptions::default()
        })
        .unwrap();
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let mqtt = format!("version = \"3.1.1\"\npoison_after = {POISON_AFTER}");
        let mut d = start(runtime, &kafka, &group, broker.port, &mqtt);
        assert_handled_once(
            &kafka,
            &sub,
            &mut d,
            (&group, &tag, n, bad),
            "closed the connection 3 times",
        );
        // Connections that carried publishes; the daemon's stop adds one, CleanSession=1,
        // that ends its session on the broker (review M3).
        let ended = broker.clean_connections(&group);
        assert_eq!(ended, 1, "sessions ended at stop:\n{}", d.log());
        let conns = broker.connections(&group) - ended;
        assert!(
            conns <= POISON_AFTER + 1,
            "{conns} connections:\n{}",
            d.log()
        );
    });
}

/// `n` records of `size` bytes for partition 0 of [`TOPIC`], keys `dev0`..`dev7`; each
/// value starts with `{tag}-{i}-` (unique) and is padded to `size`.
fn sized_records(tag: &str, n: usize, size: usize) -> Vec<(i32, String, String)> {
    (0..n)
        .map(|i| {
            let mut v = format!("{tag}-{i}-");
            v.extend(std::iter::repeat_n('x', size.saturating_sub(v.len())));
            (0, format!("dev{}", i % 8), v)
        })
        .collect()
}

/// Produces `recs` to [`TOPIC`] in batches of [`BATCH`], keeping at most [`AHEAD`] records
/// beyond those the subscriber has seen, until all arrived or `deadline`; returns how many
/// distinct ones arrived.
///
/// MockCluster keeps at most 5 MiB per partition and deletes the oldest message sets
/// beyond that: 2,000 records of 4 kB produced at once would start the log at offset ~730.
/// A record the sink has not consumed yet is among the last `AHEAD` (4.5 MB) produced,
/// and the cluster keeps the last ~1,220 (5 MiB less one batch), so none is deleted
/// unread. `AHEAD` is more than the default window (1000), which therefore fills.
fn produce_paced(
    kafka: &MockKafka,
    sub: &SyncSubscriber,
    recs: &[(i32, String, String)],
    want: &[Bytes],
    deadline: Instant,
) -> usize {
    const BATCH: usize = 50;
    const AHEAD: usize = 1100;
    let (mut produced, mut arrived) = (0, 0);
    loop {
        while produced < recs.len() && produced + BATCH <= arrived + AHEAD {
            let end = (produced + BATCH).min(recs.len());
            kafka.produce(TOPIC, &recs[produced..end]).unwrap();
            produced = end;
        }
        if arrived == recs.len() || Instant::now() > deadline {
            return arrived;
        }
        // Returns early once everything produced so far arrived.
        arrived = sub.wait_for_all(&want[..produced], Duration::from_millis(250));
    }
}

/// The indices of `expected` that are not among `msgs`, as ranges ("12-40, 77").
fn missing(expected: &[Expected], msgs: &[mqtt_sink_testkit::subscriber::Message]) -> String {
    let got: std::collections::BTreeSet<&Bytes> = msgs.iter().map(|m| &m.payload).collect();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (i, e) in expected.iter().enumerate() {
        if got.contains(&e.payload) {
            continue;
        }
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => ranges.push((i, i)),
        }
    }
    let ranges: Vec<String> = ranges
        .iter()
        .map(|(a, b)| match a == b {
            true => a.to_string(),
            false => format!("{a}-{b}"),
        })
        .collect();
    ranges.join(", ")
}

/// A slow link (a proxy capped at 200 KB/s) in front of Mosquitto, 2,000 records of 4 kB,
/// the default window (`max_inflight` = 1000: 4 MB, 20 s of link) and the default
/// `ack_timeout` (5 s). The sink used to queue the whole window into its output buffer;
/// writing it took longer than `ack_timeout`, so every connection ended in an ack timeout
/// and resent the same window: 282 distinct records of 2,000 in 42 s, each many times
/// (review H5). Now it keeps at most 64 KiB ahead of the socket and starts a publish's
/// ack timer when its last byte is written and the publish before it was answered: one
/// connection, each record once, in order.
///
/// Between the two: with the timer starting when the last byte was written, the daemon's
/// own kernel send buffer (4 MB on loopback, `ss -tmi`: 3.77 MB unsent, ~19 s of this
/// link) held publishes counted as written past `ack_timeout`: all 2,000 arrived in ~44 s
/// on both runtimes, but with 7 ack timeouts, 8 connections and 17-55 duplicates.
#[test]
fn a_slow_link_delivers_every_record_once() {
    each_runtime(|runtime| {
        let (n, size, tag) = (2000, 4096, format!("slow-{runtime}"));
        let group = format!("slow-link-{runtime}");
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic(TOPIC, 1).unwrap();
        kafka.create_topic(DLQ, 1).unwrap();
        let recs = sized_records(&tag, n, size);
        let expected: Vec<Expected> = recs
            .iter()
            .map(|(_, key, value)| Expected {
                topic: format!("sensors/{key}"),
                payload: Bytes::from(value.clone()),
            })
            .collect();
        let want: Vec<Bytes> = expected.iter().map(|e| e.payload.clone()).collect();
        let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let proxy = ChaosProxy::start(broker.port, 5).unwrap();
        proxy.set_bandwidth(Some(200_000));
        let started = Instant::now();
        let mut d = start(runtime, &kafka, &group, proxy.port, "");
        // ~8.3 MB at 200 KB/s: ~42 s.
        let arrived = produce_paced(
            &kafka,
            &sub,
            &recs,
            &want,
            started + Duration::from_secs(120),
        );
        let took = started.elapsed();
        let committed = wait_committed(&kafka, &group, n as i64, &sub);
        let status = d.stop();
        let log = d.log();
        let msgs = sub.messages();
        let distinct: std::collections::BTreeSet<&Bytes> =
            msgs.iter().map(|m| &m.payload).collect();
        // Connections that carried publishes; the daemon's stop adds one, CleanSession=1,
        // that ends its session on the broker (review M3).
        let ended = broker.clean_connections(&group);
        assert_eq!(ended, 1, "sessions ended at stop:\n{}", d.log());
        let conns = broker.connections(&group) - ended;
        let timeouts = log.matches("unacknowledged for ack_timeout").count();
        eprintln!(
            "{runtime}: {arrived} of {n} in {took:?}, {} messages, {} distinct, \
             {conns} connections, {timeouts} ack timeouts",
            msgs.len(),
            distinct.len()
        );
        let gaps = missing(&expected, &msgs);
        assert_eq!(
            (arrived, msgs.len(), distinct.len()),
            (n, n, n),
            "(arrived, messages, distinct) after {took:?}, {conns} connections, {timeouts} \
             ack timeouts, missing [{gaps}]:\n{log}"
        );
        let arrivals: Vec<_> = msgs.into_iter().map(|m| (m.topic, m.payload)).collect();
        if let Err(e) = check(&expected, &arrivals, false) {
            panic!("{e}:\n{log}");
        }
        assert_eq!(
            committed,
            Some(n as i64),
            "end offset not committed:\n{log}"
        );
        assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{log}");
        for bad in ["unacknowledged for ack_timeout", "connection lost"] {
            assert!(!log.contains(bad), "the log has {bad:?}:\n{log}");
        }
        assert_eq!(conns, 1, "{conns} connections:\n{log}");
    });
}
