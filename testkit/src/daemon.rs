//! The `mqtt-sink` daemon as a child process, for real-process tests: started from a TOML
//! config on a chosen runtime, its log kept in a file, stopped with SIGTERM, killed (by
//! pid) when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::mosquitto::free_port;

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
