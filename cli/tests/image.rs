//! The container image (issue 13 points 4 and 5), built from the root `Dockerfile` and run
//! where a Docker engine answers; otherwise each test says SKIPPED and why. The image is the
//! one `MQTT_SINK_IMAGE` names (e.g. one built with `docker build .` from the public
//! bases), or else one the test builds once from this test's binary with
//! `testkit/images/build.sh mqtt-sink` (local stand-ins for the bases: no registry here).
//!
//! The containers share the host's network (`--network host`), so that they reach the
//! in-process Kafka (rdkafka's MockCluster: a group coordinator that hands a leaving
//! member's partitions over; Tansu 0.6's does not reliably) and a Mosquitto process on
//! 127.0.0.1; like deploy/compose.yaml, each replica has its own client id suffix and
//! metrics port, and they share deploy/sink.toml (brokers and broker address overridden
//! by the environment, as a user would).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{free_port, Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

const IMAGE_ENV: &str = "MQTT_SINK_IMAGE";

/// The image to test, or `None` after a SKIPPED line.
fn image(test: &str) -> Option<String> {
    if let Ok(image) = std::env::var(IMAGE_ENV) {
        docker(&["image", "inspect", "--format", "{{.Id}}", &image])
            .unwrap_or_else(|e| panic!("{IMAGE_ENV}={image}: {e}"));
        return Some(image);
    }
    if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        eprintln!("SKIPPED: {test}: no Docker engine answers `docker info`: {e}");
        return None;
    }
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let o = Command::new("bash")
            .arg(root.join("testkit/images/build.sh"))
            .args(["mqtt-sink", env!("CARGO_BIN_EXE_mqtt-sink")])
            .output()
            .map_err(|e| format!("build.sh: {e}"))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    });
    match built {
        Ok(tag) => Some(tag.clone()),
        Err(e) => panic!("building the image from the Dockerfile failed:\n{e}"),
    }
}

fn docker(args: &[&str]) -> Result<String, String> {
    let o: Output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

/// A replica container, removed (by its id) when dropped.
struct Replica {
    id: String,
    http: String,
}

impl Replica {
    fn start(image: &str, config: &Path, env: &[(&str, String)], http_port: u16) -> Self {
        let http = format!("127.0.0.1:{http_port}");
        let mount = format!("{}:/etc/mqtt-sink/sink.toml:ro", config.display());
        let mut args: Vec<String> = ["run", "-d", "--network", "host", "-v", &mount]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["-e".into(), format!("MQTT_SINK_HTTP_LISTEN={http}")]);
        for (k, v) in env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        args.push(image.into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&refs).unwrap_or_else(|e| panic!("docker run {image}: {e}"));
        Self { id, http }
    }

    fn inspect(&self, format: &str) -> String {
        docker(&["inspect", "--format", format, &self.id]).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let o = Command::new("docker")
            .args(["logs", &self.id])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// `docker stop` (SIGTERM, then SIGKILL after 30 s); the exit code.
    fn stop(&self) -> i64 {
        docker(&["stop", "-t", "30", &self.id]).unwrap();
        self.inspect("{{.State.ExitCode}}").parse().unwrap()
    }

    fn metrics(&self) -> Option<String> {
        ureq::get(&format!("http://{}/metrics", self.http))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    }

    /// `mqtt_sink_assigned_partitions`, when the endpoint answers.
    fn assigned(&self) -> Option<u64> {
        self.metrics()?
            .lines()
            .find(|l| l.starts_with("mqtt_sink_assigned_partitions "))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
    }
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "mqtt-sink-image-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// deploy/sink.toml with the fast group properties of the mock cluster.
fn replica_config(d: &Path) -> PathBuf {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sink.toml");
    let text = std::fs::read_to_string(deploy).unwrap().replace(
        "[kafka.properties]\n",
        "[kafka.properties]\n\"group.protocol\" = \"consumer\"\n\"topic.metadata.refresh.interval.ms\" = \"500\"\n",
    );
    let p = d.join("sink.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A Kafka topic `readings`, Mosquitto, a subscriber to `sensors/#`, and the replicas'
/// config in a directory of the test's own.
struct Setup {
    kafka: MockKafka,
    broker: Mosquitto,
    sub: SyncSubscriber,
    dir: PathBuf,
    cfg: PathBuf,
}

impl Setup {
    fn new(partitions: i32) -> Self {
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic("readings", partitions).unwrap();
        let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let dir = dir();
        let cfg = replica_config(&dir);
        Self {
            kafka,
            broker,
            sub,
            dir,
            cfg,
        }
    }
}

fn env_for(kafka: &MockKafka, mqtt_port: u16, suffix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MQTT_SINK_KAFKA_BROKERS", kafka.bootstrap()),
        ("MQTT_SINK_MQTT_SERVER", "127.0.0.1".into()),
        ("MQTT_SINK_MQTT_PORT", mqtt_port.to_string()),
        ("MQTT_SINK_MQTT_CLIENT_ID_SUFFIX", suffix.into()),
    ]
}

fn batch(from: usize, n: usize, partitions: i32) -> Vec<(i32, String, String)> {
    (from..from + n)
        .map(|i| {
            let p = i as i32 % partitions;
            (p, format!("dev{p}"), format!("reading-{i}"))
        })
        .collect()
}

fn payloads(recs: &[(i32, String, String)]) -> Vec<Bytes> {
    recs.iter()
        .map(|(_, _, v)| Bytes::from(v.clone()))
        .collect()
}

/// Point 4: the image's entrypoint runs the daemon as user 65532, its HEALTHCHECK (`mqtt-sink
/// health` on /healthz) turns healthy, records flow, its log has no colour codes, and
/// SIGTERM (`docker stop`) ends it with exit code 0.
#[test]
fn the_image_runs_as_non_root_and_reports_healthy() {
    let Some(image) = image("the_image_runs_as_non_root_and_reports_healthy") else {
        return;
    };
    let Setup {
        kafka,
        broker,
        sub,
        dir: d,
        cfg,
    } = Setup::new(2);
    let r = Replica::start(
        &image,
        &cfg,
        &env_for(&kafka, broker.port, "solo"),
        free_port(),
    );
    assert_eq!(r.inspect("{{.Config.User}}"), "65532:65532");
    let recs = batch(0, 100, 2);
    kafka.produce("readings", &recs).unwrap();
    assert_eq!(
        sub.wait_for_all(&payloads(&recs), Duration::from_secs(60)),
        100,
        "{}",
        r.logs()
    );
    // The process itself runs as 65532 (not only the image's metadata says so).
    // (`docker top` needs the pid column.)
    let top = docker(&["top", &r.id, "-o", "pid,uid,args"]).unwrap();
    let uids: Vec<&str> = top
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        !uids.is_empty() && uids.iter().all(|u| *u == "65532"),
        "{top}"
    );
    // Docker runs the HEALTHCHECK every 10 s: wait (bounded) for its verdict.
    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        let h = r.inspect("{{.State.Health.Status}}");
        if h != "starting" || Instant::now() > deadline {
            break h;
        }
        sub.wait_for(usize::MAX, Duration::from_millis(500));
    };
    assert_eq!(health, "healthy", "{}", r.inspect("{{json .State.Health}}"));
    assert_eq!(r.stop(), 0, "{}", r.logs());
    let logs = r.logs();
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a container log:\n{logs}"
    );
    assert!(logs.contains("mqtt-sink stopped"), "{logs}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Point 5: the compose group's equivalent. Three replicas of the image in one consumer
/// group share the 6 partitions and deliver every record; stopping one (SIGTERM) commits
/// what it delivered before its partitions go to the others, so nothing it delivered
/// arrives twice, and every later record arrives.
#[test]
fn three_replicas_share_partitions_and_hand_over_after_a_commit() {
    let Some(image) = image("three_replicas_share_partitions_and_hand_over_after_a_commit") else {
        return;
    };
    let Setup {
        kafka,
        broker,
        sub,
        dir: d,
        cfg,
    } = Setup::new(6);
    let replicas: Vec<Replica> = (1..=3)
        .map(|i| {
            let env = env_for(&kafka, broker.port, &format!("sink-{i}"));
            Replica::start(&image, &cfg, &env, free_port())
        })
        .collect();
    let logs = |rs: &[&Replica]| {
        rs.iter()
            .map(|r| format!("--- {}\n{}", r.id, r.logs()))
            .collect::<String>()
    };
    let all: Vec<&Replica> = replicas.iter().collect();
    // Wait (bounded) until the group settled: every replica owns partitions, 6 in all.
    let settled = |rs: &[&Replica], want_each: bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let owned: Vec<Option<u64>> = rs.iter().map(|r| r.assigned()).collect();
            let sum: u64 = owned.iter().flatten().sum();
            if sum == 6 && (!want_each || owned.iter().all(|o| o.is_some_and(|n| n > 0))) {
                return owned;
            }
            assert!(
                Instant::now() < deadline,
                "partitions owned {owned:?}\n{}",
                logs(rs)
            );
            sub.wait_for(usize::MAX, Duration::from_millis(250));
        }
    };
    let owned = settled(&all, true);
    assert_eq!(
        owned,
        vec![Some(2), Some(2), Some(2)],
        "three replicas share 6 partitions"
    );

    let first = batch(0, 600, 6);
    kafka.produce("readings", &first).unwrap();
    assert_eq!(
        sub.wait_for_all(&payloads(&first), Duration::from_secs(60)),
        600,
        "{}",
        logs(&all)
    );

    // Stop sink-2: it flushes and commits its partitions, then leaves the group.
    let stopped = &replicas[1];
    assert_eq!(stopped.stop(), 0, "{}", stopped.logs());
    let stop_line = stopped
        .logs()
        .lines()
        .find(|l| l.contains("mqtt-sink stopped"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no stop line:\n{}", stopped.logs()));
    // committed=readings/1@100, readings/4@100: each of its partitions at its end.
    let committed: BTreeMap<i32, i64> = stop_line
        .split("committed=")
        .nth(1)
        .unwrap()
        .split(", ")
        .filter_map(|tp| {
            let (tp, off) = tp.split_once('@')?;
            let p = tp.strip_prefix("readings/")?.parse().ok()?;
            let off = off.split_whitespace().next()?.parse().ok()?;
            Some((p, off))
        })
        .collect();
    assert_eq!(committed.len(), 2, "{stop_line}");
    let in_kafka = kafka.committed("mqtt-sink", "readings", 6).unwrap();
    for (p, off) in &committed {
        assert_eq!(*off, 100, "{stop_line}");
        assert_eq!(
            in_kafka[*p as usize],
            Some(100),
            "partition {p} committed in Kafka"
        );
    }

    let rest: Vec<&Replica> = vec![&replicas[0], &replicas[2]];
    let owned = settled(&rest, true);
    assert_eq!(
        owned.iter().flatten().sum::<u64>(),
        6,
        "the two others own all 6"
    );
    let second = batch(600, 600, 6);
    kafka.produce("readings", &second).unwrap();
    assert_eq!(
        sub.wait_for_all(&payloads(&second), Duration::from_secs(60)),
        600,
        "{}",
        logs(&rest)
    );
    // Nothing delivered before the hand-over was delivered again.
    let mut seen: BTreeMap<Bytes, usize> = BTreeMap::new();
    for m in sub.messages() {
        *seen.entry(m.payload).or_default() += 1;
    }
    let twice: Vec<_> = payloads(&first)
        .into_iter()
        .filter(|p| seen.get(p).copied().unwrap_or(0) > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "delivered twice after the hand-over: {twice:?}"
    );
    drop(replicas);
    let _ = std::fs::remove_dir_all(&d);
}
