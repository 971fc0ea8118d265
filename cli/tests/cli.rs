//! The `mqtt-sink` binary, driven as users drive it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt_sink_testkit::kafka::MockKafka;
use mqtt_sink_testkit::mosquitto::{free_port, Mosquitto, MosquittoOptions};
use mqtt_sink_testkit::subscriber::SyncSubscriber;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqtt-sink"))
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "mqtt-sink-cli-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(d: &Path, name: &str, text: &str) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
topics = ["readings"]

[mqtt]
client_id = "sink"
server = "127.0.0.1"
port = 1883
topic_root = "sensors"
tls_enabled = false
username = "user"
password = "s3cret-value"
"#;

fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// SIGTERM to `child`, then its exit status once it exited, or `None` after `within` (the
/// subscriber's wait is the pause between looks).
fn terminate(child: &mut Child, sub: &SyncSubscriber, within: Duration) -> Option<ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        sub.wait_for(usize::MAX, Duration::from_millis(100));
    }
}

/// The payloads of `(partition, key, value)` records.
fn payloads(recs: &[(i32, String, String)]) -> Vec<Bytes> {
    recs.iter()
        .map(|(_, _, v)| Bytes::from(v.clone()))
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_accepts_a_good_config() {
    let d = dir();
    let cfg = write(&d, "good.toml", GOOD);
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("config ok") && !out.contains("s3cret"),
        "{out}"
    );
}

#[test]
fn each_kind_of_mistake_names_the_key_and_exits_2() {
    let d = dir();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            GOOD.replace("topic_root", "topic_roots"),
            "topic_roots",
        ),
        (
            "bad value",
            GOOD.replace("port = 1883", "port = 1883\nqos = 3"),
            "mqtt.qos = 3: must be 0, 1 or 2",
        ),
        (
            "bad type",
            GOOD.replace("port = 1883", "port = \"ten\""),
            "port",
        ),
        (
            "missing section",
            GOOD.replace("[kafka]", "[kafkaa]"),
            "kafka",
        ),
        (
            "bad duration",
            GOOD.replace(
                "tls_enabled = false",
                "tls_enabled = false\nflush_timeout = \"ten\"",
            ),
            "flush_timeout",
        ),
        (
            "rate",
            GOOD.replace("port = 1883", "port = 1883\nmax_publish_rate = 0"),
            "mqtt.max_publish_rate = 0: must be 0.001..=1000000 publishes per second",
        ),
        (
            "burst without a rate",
            GOOD.replace("port = 1883", "port = 1883\nmax_publish_burst = 5"),
            "mqtt.max_publish_burst = 5: needs max_publish_rate",
        ),
        (
            "servers and server",
            GOOD.replace("port = 1883", "port = 1883\nservers = [\"a:1883\"]"),
            "mqtt.servers = [\"a:1883\"]: set either server and port, or servers, not both",
        ),
        (
            "a server without a port",
            GOOD.replace(
                "server = \"127.0.0.1\"\nport = 1883",
                "servers = [\"a:1883\", \"b\"]",
            ),
            "mqtt.servers = \"b\": must be \"host:port\"",
        ),
        (
            "alpn without TLS",
            GOOD.replace("port = 1883", "port = 1883\ntls_alpn = [\"mqtt\"]"),
            "mqtt.tls_enabled = false: TLS options are set (tls_ca_file, tls_client_cert, tls_insecure_skip_verify or tls_alpn) but TLS is off",
        ),
        (
            "transport",
            GOOD.replace("port = 1883", "port = 1883\ntransport = \"websocket\""),
            "mqtt.transport: unknown variant `websocket`, expected `tcp` or `ws`",
        ),
        (
            "a WebSocket path with TCP",
            GOOD.replace("port = 1883", "port = 1883\nws_path = \"/mqtt\""),
            "mqtt.ws_path = \"/mqtt\": is only used with transport = \"ws\"",
        ),
        (
            "a WebSocket path without its slash",
            GOOD.replace("port = 1883", "port = 1883\ntransport = \"ws\"\nws_path = \"mqtt\""),
            "mqtt.ws_path = \"mqtt\": must be an HTTP path starting with \"/\"",
        ),
        (
            "a WebSocket header the upgrade sets",
            GOOD.replace(
                "port = 1883",
                "port = 1883\ntransport = \"ws\"\nws_headers = { Host = \"x\" }",
            ),
            "mqtt.ws_headers = \"Host\": is set by the WebSocket upgrade itself",
        ),
        (
            "a WebSocket header value with a line break",
            GOOD.replace(
                "port = 1883",
                "port = 1883\ntransport = \"ws\"\nws_headers = { Authorization = \"a\\r\\nX: y\" }",
            ),
            "mqtt.ws_headers.Authorization = (set): a header value must not hold control characters",
        ),
        (
            "a transform that does not compile",
            GOOD.replace("port = 1883", "port = 1883\ntransform = '.value | {'"),
            "mqtt.transform = \".value | {\": the jq program does not compile: expected",
        ),
        (
            "a transform calling an unknown function",
            GOOD.replace("port = 1883", "port = 1883\ntransform = 'nosuch(.)'"),
            "mqtt.transform = \"nosuch(.)\": the jq program does not compile: undefined filter nosuch",
        ),
        (
            "tombstone",
            GOOD.replace("port = 1883", "port = 1883\ntombstone = \"clear\""),
            "mqtt.tombstone: unknown variant `clear`, expected one of `publish-null`, `skip`, `clear-retained`, `publish-empty`",
        ),
        (
            "version",
            GOOD.replace(
                "tls_enabled = false",
                "tls_enabled = false\nversion = \"4.2\"",
            ),
            "\"3.1\", \"3.1.1\" or \"5\"",
        ),
        (
            "auto commit",
            GOOD.replace(
                "topics = [\"readings\"]",
                "topics = [\"readings\"]\n[kafka.properties]\n\"enable.auto.commit\" = true",
            ),
            "kafka.properties.enable.auto.commit",
        ),
        (
            "syntax",
            GOOD.replace("group_id = \"g\"", "group_id = \"g"),
            "config line",
        ),
        (
            "empty topics",
            GOOD.replace("topics = [\"readings\"]", "topics = []"),
            "kafka.topics",
        ),
        (
            "tokio workers",
            format!("{GOOD}\n[tokio]\nworker_threads = 0\n"),
            "tokio.worker_threads = 0: must be from 1 to 256",
        ),
        // Review L1: an empty username with a password was sent as a password flag
        // without the username flag.
        (
            "empty username",
            GOOD.replace("username = \"user\"", "username = \"\""),
            "mqtt.password",
        ),
        // Review L5: a duration this long used to pass and then panic computing a deadline.
        (
            "huge duration",
            GOOD.replace(
                "tls_enabled = false",
                "tls_enabled = false\nack_timeout = \"500000000y\"",
            ),
            "mqtt.ack_timeout",
        ),
        (
            "huge commit interval",
            GOOD.replace(
                "topics = [\"readings\"]",
                "topics = [\"readings\"]\ncommit_interval = \"500000000y\"",
            ),
            "kafka.commit_interval",
        ),
        // Review L8: `check` accepted a 3.1 client id that `run` refused once suffixed.
        (
            "3.1 client id with the suffix",
            GOOD.replace(
                "client_id = \"sink\"",
                "client_id = \"sink-of-plant-7\"\nversion = \"3.1\"",
            ),
            "with the per-instance suffix",
        ),
    ];
    for (what, text, needle) in cases {
        let cfg = write(&d, "bad.toml", &text);
        for cmd in ["check", "run"] {
            let o = run_with(&[cmd, "--config", cfg.to_str().unwrap()], &[]);
            assert_eq!(o.status.code(), Some(2), "{what} ({cmd}): {}", stderr(&o));
            let e = stderr(&o);
            assert!(
                e.contains(needle),
                "{what} ({cmd}): expected {needle:?} in:\n{e}"
            );
            assert!(!e.contains("s3cret"), "{what}: the password leaked:\n{e}");
        }
    }
    let o = run_with(
        &["check", "--offline", "--config", "/nonexistent/sink.toml"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/sink.toml"));
    let o = run_with(&["run"], &[]);
    assert_eq!(o.status.code(), Some(2), "usage error");
}

#[test]
fn environment_overrides_and_secret_files() {
    let d = dir();
    let cfg = write(&d, "good.toml", GOOD);
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[
            ("MQTT_SINK_MQTT_QOS", "3"),
            ("MQTT_SINK_MQTT_PASSWORD", "env-secret"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("mqtt.qos = 3"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("env-secret"));
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[("MQTT_SINK_MQTT_PORT", "8883")],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(":8883"),
        "{}",
        stderr(&o)
    );
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[("MQTT_SINK_NOPE_X", "1")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("MQTT_SINK_NOPE_X"), "{}", stderr(&o));
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[("MQTT_SINK_TOKIO_WORKER_THREADS", "300")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("tokio.worker_threads = 300"),
        "{}",
        stderr(&o)
    );
    // password_file: read, and a missing file is named.
    let with_file = GOOD.replace("password = \"s3cret-value\"", "password_file = \"pw.txt\"");
    let cfg = write(&d, "file.toml", &with_file);
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("mqtt.password_file") && stderr(&o).contains("pw.txt"),
        "{}",
        stderr(&o)
    );
    write(&d, "pw.txt", "from-file\n");
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut r = agent.get(&format!("http://{addr}{path}")).call().ok()?;
    let body = r.body_mut().read_to_string().ok()?;
    Some((r.status().as_u16(), body))
}

/// The value of the unlabelled sample `name` in an exposition, read with a Prometheus
/// text parser.
fn metric(body: &str, name: &str) -> Option<u64> {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()?;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.is_empty())
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v as u64),
            _ => None,
        })
}

#[test]
fn run_delivers_serves_metrics_and_stops_cleanly_on_sigterm() {
    for runtime in ["tokio", "blocking"] {
        let kafka = MockKafka::start().unwrap();
        kafka.create_topic("readings", 2).unwrap();
        let n = 500;
        let recs: Vec<_> = (0..n)
            .map(|i| (i % 2, format!("k{}", i % 2), format!("{runtime}-{i}")))
            .collect();
        kafka.produce("readings", &recs).unwrap();
        let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
        let sub = SyncSubscriber::start(broker.port, "sensors/#");
        let http = format!("127.0.0.1:{}", free_port());
        let d = dir();
        let cfg = write(
            &d,
            "run.toml",
            &format!(
                r#"
[kafka]
brokers = "{}"
group_id = "cli-{runtime}"
topics = ["readings"]
commit_interval = "500ms"
[kafka.properties]
"group.protocol" = "consumer"
"auto.offset.reset" = "earliest"

[mqtt]
client_id = "cli-sink"
server = "127.0.0.1"
port = {}
topic_root = "sensors"
tls_enabled = false
version = "5"

[http]
listen = "{http}"

[log]
format = "json"
"#,
                kafka.bootstrap(),
                broker.port
            ),
        );
        let log = std::fs::File::create(d.join("stderr.log")).unwrap();
        let mut child = bin()
            .args([
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--runtime",
                runtime,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let want = payloads(&recs);
        let got = sub.wait_for_all(&want, Duration::from_secs(60));
        let logs = || std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
        assert_eq!(got, n as usize, "{runtime}: {}", logs());
        // /metrics parses and agrees with the subscriber; the sink is ready.
        // The subscriber may see a message before its PUBACK reaches the sink: wait (bounded)
        // for the counter to catch up.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (code, body) = loop {
            let r = http_get(&http, "/metrics").expect("metrics endpoint");
            if metric(&r.1, "mqtt_sink_records_acknowledged_total") == Some(n as u64)
                || Instant::now() > deadline
            {
                break r;
            }
            sub.wait_for(usize::MAX, Duration::from_millis(100));
        };
        assert_eq!(code, 200);
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.rsplitn(2, ' ');
            let value = parts.next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "not Prometheus text: {line}");
        }
        assert_eq!(
            metric(&body, "mqtt_sink_records_acknowledged_total"),
            Some(n as u64),
            "{body}"
        );
        assert_eq!(
            metric(&body, "mqtt_sink_records_consumed_total"),
            Some(n as u64),
            "{body}"
        );
        assert_eq!(http_get(&http, "/healthz").map(|r| r.0), Some(200));
        assert_eq!(http_get(&http, "/readyz").map(|r| r.0), Some(200));
        // SIGTERM: flush, commit, DISCONNECT, exit 0 within the flush timeout.
        let status = terminate(&mut child, &sub, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{runtime}: no exit within 15 s after SIGTERM"));
        assert_eq!(status.code(), Some(0), "{runtime}: {}", logs());
        assert_eq!(
            kafka
                .committed(&format!("cli-{runtime}"), "readings", 2)
                .unwrap(),
            vec![Some(250), Some(250)]
        );
        let l = logs();
        assert!(
            l.contains("mqtt-sink stopped") && l.contains("\"level\""),
            "json logs: {l}"
        );
    }
}

/// Issue 13 point 2: a log written to a file has no colour codes (a pipe or a container
/// log is no terminal), names partitions and positions in plain text (no Rust `Debug`),
/// shows the effective configuration without its secret, and warns of a secret file
/// others can read. Before: ANSI codes in the file, `partitions assigned:
/// [(TopicPartition { topic: "readings", partition: 0 }, None), ...]` and `committed=[(...)]`.
#[test]
fn text_logs_are_plain_and_name_partitions_and_positions() {
    use std::os::unix::fs::PermissionsExt;
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic("readings", 2).unwrap();
    let n = 100;
    let recs: Vec<_> = (0..n)
        .map(|i| (i % 2, format!("k{}", i % 2), format!("log-{i}")))
        .collect();
    kafka.produce("readings", &recs).unwrap();
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let d = dir();
    let pw = write(&d, "pw.txt", "file-s3cret\n");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = write(
        &d,
        "logs.toml",
        &format!(
            r#"
[kafka]
brokers = "{}"
group_id = "logs"
topics = ["readings"]
commit_interval = "500ms"
[kafka.properties]
"group.protocol" = "consumer"
"auto.offset.reset" = "earliest"

[mqtt]
client_id = "log-sink"
server = "127.0.0.1"
port = {}
topic_root = "sensors"
tls_enabled = false
username = "user"
password_file = "pw.txt"

[http]
listen = ""
"#,
            kafka.bootstrap(),
            broker.port
        ),
    );
    let log = std::fs::File::create(d.join("stderr.log")).unwrap();
    // No NO_COLOR: the file alone must turn colour off.
    let mut child = bin()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let want = payloads(&recs);
    let got = sub.wait_for_all(&want, Duration::from_secs(60));
    let logs = || std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
    assert_eq!(got, n as usize, "{}", logs());
    let status = terminate(&mut child, &sub, Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no exit within 15 s after SIGTERM:\n{}", logs()));
    let l = logs();
    assert_eq!(status.code(), Some(0), "{l}");
    assert!(!l.contains('\u{1b}'), "colour codes in a log file:\n{l}");
    assert!(!l.contains("TopicPartition"), "Rust Debug in the log:\n{l}");
    assert!(
        l.contains("partitions assigned: readings/0 (no committed position), readings/1 (no committed position)"),
        "{l}"
    );
    assert!(
        l.contains("committed=readings/0@50, readings/1@50"),
        "the stop line names the positions:\n{l}"
    );
    let effective = l
        .lines()
        .find(|x| x.contains("effective configuration"))
        .unwrap_or_else(|| panic!("no effective configuration line:\n{l}"));
    assert!(effective.contains(r#"mqtt.password="***""#), "{effective}");
    assert!(effective.contains("mqtt.qos=1 "), "{effective}");
    assert!(!l.contains("file-s3cret"), "a secret in the log:\n{l}");
    assert!(
        l.lines()
            .any(|x| x.contains("WARN") && x.contains("mqtt.password_file") && x.contains("0644")),
        "no warning about the readable password file:\n{l}"
    );
}

/// `check` prints the same warnings, and says loudly when certificate verification is off,
/// also when only the environment switched it off (review L11).
#[test]
fn check_warns_when_certificate_verification_is_off() {
    let d = dir();
    let cfg = write(
        &d,
        "tls.toml",
        &GOOD.replace("tls_enabled = false", "tls_enabled = true"),
    );
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[("MQTT_SINK_MQTT_TLS_INSECURE_SKIP_VERIFY", "true")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning: MQTT TLS CERTIFICATE VERIFICATION IS OFF")
            && e.contains("MQTT_SINK_MQTT_TLS_INSECURE_SKIP_VERIFY"),
        "{e}"
    );
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert!(
        !stderr(&o).contains("VERIFICATION IS OFF"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn every_example_config_is_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        n += 1;
        // Secret files are deployment-specific: supply the password through the environment.
        let original = std::fs::read_to_string(&p).unwrap();
        let text = original.replace("password_file = \"/run/secrets/mqtt-password\"", "");
        let env: &[(&str, &str)] = if text == original {
            &[]
        } else {
            &[("MQTT_SINK_MQTT_PASSWORD", "x")]
        };
        let d = dir();
        let cfg = write(&d, "example.toml", &text);
        let o = run_with(
            &["check", "--offline", "--config", cfg.to_str().unwrap()],
            env,
        );
        assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
    }
    assert_eq!(n, 11, "eleven example configs");
}

#[test]
fn check_connects_to_both_sides_and_reports() {
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic("readings", 3).unwrap();
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let d = dir();
    let text = GOOD
        .replace("127.0.0.1:9092", &kafka.bootstrap())
        .replace(
            "port = 1883",
            &format!("port = {}\nversion = \"5\"", broker.port),
        )
        .replace("username = \"user\"\npassword = \"s3cret-value\"\n", "");
    let cfg = write(&d, "live.toml", &text);
    let o = run_with(&["check", "--config", cfg.to_str().unwrap()], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("topic readings has 3 partition(s)"), "{out}");
    assert!(out.contains("CONNACK accepted (MQTT 5"), "{out}");
    // The MQTT side down: exit 3, naming server and port.
    let dead = free_port();
    let text = text.replace(
        &format!("port = {}", broker.port),
        &format!("port = {dead}"),
    );
    let cfg = write(&d, "dead.toml", &(text + "\n"));
    let cfg_text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("topic_root", "connect_timeout = \"2s\"\ntopic_root");
    let cfg = write(&d, "dead.toml", &cfg_text);
    let o = run_with(&["check", "--config", cfg.to_str().unwrap()], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.contains(&format!("MQTT 127.0.0.1:{dead}: FAILED")),
        "{out}"
    );
}

#[test]
fn demo_runs_to_completion() {
    let o = run_with(&["demo", "--records", "2000"], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("summary: 2000 consumed, 2000 acknowledged by the broker, 2000 received"),
        "{out}"
    );
    assert!(out.contains("demo-readings/0@500"), "{out}");
}

#[test]
fn policy_section_sets_the_error_policy() {
    let d = dir();
    let text = format!("{GOOD}\n[policy]\nerror_policy = \"dead-letter\"\n");
    let cfg = write(&d, "policy.toml", &text);
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "dead-letter needs a topic");
    assert!(
        stderr(&o).contains("mqtt.dead_letter_topic"),
        "{}",
        stderr(&o)
    );
    let cfg = write(
        &d,
        "policy.toml",
        &format!("{text}dead_letter_topic = \"dlq\"\n"),
    );
    let o = run_with(
        &["check", "--offline", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The sink process killed with -9 mid-run and started again: every record arrives at least
/// once (duplicates allowed after the fault), and the end offsets are committed.
#[test]
fn sink_killed_with_sigkill_and_restarted_loses_nothing() {
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic("readings", 4).unwrap();
    let n = 20_000usize;
    let recs: Vec<_> = (0..n)
        .map(|i| ((i % 4) as i32, format!("k{}", i % 4), format!("kill-{i}")))
        .collect();
    kafka.produce("readings", &recs).unwrap();
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let d = dir();
    let cfg = write(
        &d,
        "kill.toml",
        &format!(
            r#"
[kafka]
brokers = "{}"
group_id = "cli-kill"
topics = ["readings"]
commit_interval = "200ms"
[kafka.properties]
"group.protocol" = "classic"
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"auto.offset.reset" = "earliest"

[mqtt]
client_id = "cli-kill"
server = "127.0.0.1"
port = {}
topic_root = "sensors"
tls_enabled = false
max_inflight = 20

[http]
listen = ""
"#,
            kafka.bootstrap(),
            broker.port
        ),
    );
    let start = || {
        bin()
            .args([
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--runtime",
                "blocking",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = start();
    // Kill it once some, but not all, records went through.
    assert!(sub.wait_for(2000, Duration::from_secs(60)) >= 2000);
    let _ = first.kill(); // SIGKILL
    let _ = first.wait();
    let arrived_before = sub.messages().len();
    assert!(arrived_before < n, "killed too late to matter");
    let mut second = start();
    let want = payloads(&recs);
    assert_eq!(
        sub.wait_for_all(&want, Duration::from_secs(120)),
        n,
        "records lost"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while kafka.committed("cli-kill", "readings", 4).unwrap() != vec![Some(5000); 4]
        && Instant::now() < deadline
    {
        sub.wait_for(usize::MAX, Duration::from_millis(200));
    }
    let status =
        terminate(&mut second, &sub, Duration::from_secs(20)).expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        kafka.committed("cli-kill", "readings", 4).unwrap(),
        vec![Some(5000); 4]
    );
    // Order per topic holds except replays of a suffix after the fault.
    let expected: Vec<_> = recs
        .iter()
        .map(|(_, k, v)| mqtt_sink_testkit::checker::Expected {
            topic: format!("sensors/{k}"),
            payload: Bytes::from(v.clone()),
        })
        .collect();
    let arrivals: Vec<_> = sub
        .messages()
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    let report = mqtt_sink_testkit::checker::check(&expected, &arrivals, true).unwrap();
    assert_eq!(report.arrived, n);
}

/// M6: SIGTERM while the sink is full and the broker is unreachable (Mosquitto frozen with
/// SIGSTOP after the first records were acknowledged): the daemon must still exit 0 within
/// `flush_timeout` + 2 s, having committed nothing past an acknowledged record. Both
/// runtimes; each is run even if the other fails.
#[test]
fn sigterm_with_a_full_sink_and_a_frozen_broker_exits_within_the_flush_timeout() {
    let failures: Vec<String> = ["tokio", "blocking"]
        .into_iter()
        .filter_map(|runtime| {
            std::panic::catch_unwind(|| sigterm_with_a_full_sink(runtime))
                .err()
                .map(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("{runtime}: {msg}")
                })
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn sigterm_with_a_full_sink(runtime: &str) {
    let flush_timeout = Duration::from_secs(3);
    let (topic, group) = ("held", format!("cli-m6-{runtime}"));
    let kafka = MockKafka::start().unwrap();
    kafka.create_topic(topic, 2).unwrap();
    let rec = |p: i32, o: usize| (p, format!("m6/{p}"), format!("m6-{runtime}-{p}-{o}"));
    kafka.produce(topic, &[rec(0, 0), rec(1, 0)]).unwrap();
    let broker = Mosquitto::start(MosquittoOptions::default()).unwrap();
    let sub = SyncSubscriber::start(broker.port, "sensors/#");
    let http = format!("127.0.0.1:{}", free_port());
    let d = dir();
    let cfg = write(
        &d,
        "m6.toml",
        &format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{group}"
topics = ["{topic}"]
commit_interval = "500ms"
[kafka.properties]
"group.protocol" = "consumer"
"auto.offset.reset" = "earliest"

[mqtt]
client_id = "cli-m6"
server = "127.0.0.1"
port = {}
topic_root = "sensors"
tls_enabled = false
version = "5"
max_buffered_records = 10
max_inflight = 5
flush_timeout = "{}s"
ack_timeout = "60s"

[http]
listen = "{http}"
"#,
            kafka.bootstrap(),
            broker.port,
            flush_timeout.as_secs()
        ),
    );
    let log = std::fs::File::create(d.join("stderr.log")).unwrap();
    let mut child = bin()
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--runtime",
            runtime,
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
    let kill = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    // Acknowledged: the first record of each partition, and nothing after it.
    if sub.wait_for(2, Duration::from_secs(60)) < 2 {
        kill(&mut child);
        panic!("the first records never arrived: {}", logs());
    }
    broker.pause();
    let held: Vec<_> = (1..=400).flat_map(|o| [rec(0, o), rec(1, o)]).collect();
    kafka.produce(topic, &held).unwrap();
    // The sink is full (10 unacknowledged records) and the rest were consumed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let full = loop {
        let m = http_get(&http, "/metrics").map(|r| r.1).unwrap_or_default();
        let consumed = metric(&m, "mqtt_sink_records_consumed_total").unwrap_or(0);
        let buffered = metric(&m, "mqtt_sink_buffered_records").unwrap_or(0);
        if consumed >= 802 && buffered >= 10 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        sub.wait_for(usize::MAX, Duration::from_millis(200));
    };
    if !full {
        kill(&mut child);
        panic!("the sink never filled up: {}", logs());
    }
    let acknowledged: std::collections::BTreeSet<Bytes> =
        sub.messages().into_iter().map(|m| m.payload).collect();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let sent = Instant::now();
    let limit = flush_timeout + Duration::from_secs(2);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if sent.elapsed() > limit + Duration::from_secs(20) {
            break None;
        }
        sub.wait_for(usize::MAX, Duration::from_millis(50));
    };
    let took = sent.elapsed();
    // Read before the broker runs again (the drop resumes it).
    let committed = kafka.committed(&group, topic, 2).unwrap();
    let Some(status) = status else {
        kill(&mut child);
        panic!("no exit {took:?} after SIGTERM: {}", logs());
    };
    assert!(
        took <= limit,
        "exited {took:?} after SIGTERM, more than flush_timeout + 2 s: {}",
        logs()
    );
    assert_eq!(status.code(), Some(0), "{}", logs());
    for (p, c) in committed.iter().enumerate() {
        let c = c.unwrap_or(0);
        let passed: Vec<usize> = (0..c as usize)
            .filter(|o| !acknowledged.contains(rec(p as i32, *o).2.as_bytes()))
            .collect();
        assert!(
            passed.is_empty(),
            "{topic}/{p} committed at {c}, past unacknowledged offsets {passed:?}: {}",
            logs()
        );
    }
}
