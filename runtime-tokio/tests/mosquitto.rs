//! The tokio `MqttSink` against a real Mosquitto (Debian package) on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqtt_sink_core::{ConnectFailure, MqttVersion, Secret, TopicPartition};
use mqtt_sink_testkit::checker::{check, Expected};
use mqtt_sink_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::sim::record;
use mqtt_sink_testkit::subscriber::Subscriber;
use mqtt_sink_tokio::{Config, MqttSink};

fn config(port: u16, version: MqttVersion, qos: u8) -> Config {
    let mut cfg = Config::new(
        format!("tokio-sink-{version}-{qos}"),
        "127.0.0.1",
        port,
        "sensors",
    );
    cfg.tls_enabled = false;
    cfg.version = version;
    cfg.qos = qos;
    cfg.reconnect_backoff_min = Duration::from_millis(50);
    cfg.reconnect_backoff_max = Duration::from_millis(500);
    cfg
}

async fn deliver(port: u16, version: MqttVersion, qos: u8, n: i64) {
    let sub = Subscriber::start(port, "sensors/#").await.unwrap();
    let sink = MqttSink::builder(config(port, version, qos))
        .start()
        .unwrap();
    let mut expected = Vec::new();
    for i in 0..n {
        let r = record(
            "readings",
            (i % 4) as i32,
            i / 4,
            &format!("k{}", i % 10),
            &format!("{version}-{qos}-{i}"),
        );
        expected.push(Expected {
            topic: format!("sensors/k{}", i % 10),
            payload: r.value.clone().unwrap(),
        });
        sink.send(r).await.unwrap();
    }
    let offsets = sink.flush().await.unwrap();
    let want: Vec<_> = (0..4)
        .map(|p| (TopicPartition::new("readings", p), n / 4))
        .collect();
    assert_eq!(
        offsets, want,
        "{version} qos {qos}: committed offsets equal end offsets"
    );
    let got = sub.wait_for(n as usize, Duration::from_secs(30)).await;
    assert_eq!(got, n as usize, "{version} qos {qos}");
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    check(&expected, &arrivals, false).unwrap();
    sink.close().await.unwrap();
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_delivers() {
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    for version in [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5] {
        deliver(broker.port, version, 1, 1000).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_delivers_10k_records() {
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    for qos in [0, 1, 2] {
        deliver(broker.port, MqttVersion::V311, qos, 10_000).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_password_calls_the_failure_callback_only() {
    let dir = std::env::temp_dir().join(format!("mqtt-sink-pw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pwfile = dir.join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pwfile)
        .args(["user", "right"])
        .status()
        .expect("mosquitto_passwd (apt-get install mosquitto)");
    assert!(status.success());
    let _ = std::process::Command::new("chmod")
        .arg("a+r")
        .arg(&pwfile)
        .status();
    let broker = Mosquitto::start(MosquittoOptions {
        extra: vec![
            "allow_anonymous false".into(),
            format!("password_file {}", pwfile.display()),
        ],
        ..MosquittoOptions::default()
    })
    .unwrap();
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let mut cfg = config(broker.port, version, 1);
        cfg.username = Some("user".into());
        cfg.password = Some(Secret::new("wrong"));
        let successes = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let s = successes.clone();
        let sink = MqttSink::builder(cfg)
            .on_client_connect_success(move |_| {
                s.fetch_add(1, Ordering::SeqCst);
            })
            .on_client_connect_failure(move |e| {
                let _ = tx.send(e.clone());
            })
            .start()
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let f = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            got.push(
                f.expect("a failure callback within 10 s")
                    .expect("sink alive"),
            );
        }
        let want = if version == MqttVersion::V5 { 0x86 } else { 5 };
        assert!(
            matches!(got[0], ConnectFailure::Refused { code, .. } if code == want || code == 4 || code == 0x87),
            "{version}: {got:?} (want code {want})"
        );
        assert_eq!(successes.load(Ordering::SeqCst), 0);
        sink.close().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_while_the_broker_is_down_arrive_after_it_returns() {
    let mut broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let port = broker.port;
    broker.kill();
    // Retained, one topic each: a subscriber that connects later still sees every record.
    let mut cfg = config(port, MqttVersion::V5, 1);
    cfg.retain = true;
    let sink = MqttSink::builder(cfg).start().unwrap();
    let mut expected = Vec::new();
    for i in 0..200 {
        let r = record("readings", 0, i, &format!("dev{i}"), &format!("down-{i}"));
        expected.push(Expected {
            topic: format!("sensors/dev{i}"),
            payload: r.value.clone().unwrap(),
        });
        sink.send(r).await.unwrap();
    }
    broker.restart().unwrap();
    let offsets = sink.flush().await.unwrap();
    assert_eq!(offsets, vec![(TopicPartition::new("readings", 0), 200)]);
    let sub = Subscriber::start(port, "sensors/#").await.unwrap();
    assert_eq!(sub.wait_for(200, Duration::from_secs(10)).await, 200);
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    check(&expected, &arrivals, false).unwrap();
    sink.close().await.unwrap();
    sub.stop().await;
}
