//! The `mqtt-sink` daemon as a child process, for real-process tests: started from a TOML
//! config on a chosen runtime, its log kept in a file, stopped with SIGTERM, killed (by
//! pid) when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::kafka::MockKafka;
use crate::mosquitto::free_port;
use crate::subscriber::SyncSubscriber;

/// A running `mqtt-sink run`.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    /// Starts `bin run --config <config> --runtime <runtime>` (panics if it cannot: a test
    /// fixture). Colour is off, so the log reads as plain text.
    pub fn start(bin: &str, runtime: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mqtt-sink-daemon-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let cfg = dir.join("sink.toml");
        std::fs::write(&cfg, config).expect("daemon config");
        let log = std::fs::File::create(dir.join("stderr.log")).expect("daemon log");
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .args(["--runtime", runtime])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        Self { child, dir }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// SIGTERM, then its exit status (at most 20 s).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(Duration::from_secs(20))
    }

    /// Its exit status, if it exits within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            // Polling a child's exit: nothing to wait on but the clock.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `case` for each runtime of the daemon, each even if the other fails; fails with
/// every failure.
pub fn each_runtime(case: impl Fn(&str)) {
    let failures: Vec<String> = ["tokio", "blocking"]
        .into_iter()
        .filter_map(|runtime| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(runtime)))
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

/// A daemon config for the real-process tests: consume `topic` (from the start, KIP-848
/// group `group`, commit every 200 ms) from the Kafka at `bootstrap` into the broker at
/// 127.0.0.1:`port` without TLS, client id `group`, topics under `topic_root`, reconnecting
/// after 50 ms at first, no HTTP listener. `mqtt` is appended to `[mqtt]` (one key per
/// line); `sections` follow (whole TOML sections, e.g. `[policy]`).
#[must_use]
pub fn config(
    bootstrap: &str,
    (group, topic): (&str, &str),
    (port, topic_root): (u16, &str),
    mqtt: &str,
    sections: &str,
) -> String {
    format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "{group}"
topics = ["{topic}"]
commit_interval = "200ms"
[kafka.properties]
"group.protocol" = "consumer"
"auto.offset.reset" = "earliest"

[mqtt]
client_id = "{group}"
server = "127.0.0.1"
port = {port}
topic_root = "{topic_root}"
tls_enabled = false
reconnect_backoff_min = "50ms"
{mqtt}

[http]
listen = ""

{sections}
"#
    )
}

/// Until `group` committed `end` on partition 0 of `topic` (at most `timeout`), reading
/// what the subscriber receives meanwhile; the last committed position.
pub fn wait_committed(
    kafka: &MockKafka,
    (group, topic): (&str, &str),
    end: i64,
    sub: &SyncSubscriber,
    timeout: Duration,
) -> Option<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = kafka.committed(group, topic, 1).ok().and_then(|c| c[0]);
        if c == Some(end) || Instant::now() > deadline {
            return c;
        }
        sub.wait_for(usize::MAX, Duration::from_millis(200));
    }
}
