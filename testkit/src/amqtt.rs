//! A real, private amqtt broker (the Python package `amqtt` 0.12.1, in a venv) on a random
//! free 127.0.0.1 port, with a generated YAML config in a fresh temp dir; the process (a
//! single Python interpreter, no children) is killed by pid when dropped.
//!
//! amqtt 0.12.1 speaks MQTT 3.1.1 only: a CONNECT with any other protocol level (MQTT 5, or
//! level 3) gets CONNACK 0x01 (unacceptable protocol version), and MQTT 3.1's `MQIsdp` name
//! gets no CONNACK at all. It honours QoS 0, 1 and 2 (PUBACK; PUBREC, PUBREL, PUBCOMP), with
//! these deviations from the specification:
//!
//! - a message is forwarded at the *subscription's* QoS, not the minimum of the publish and
//!   subscription QoS: a QoS 0 PUBLISH reaches a QoS 2 subscriber as a QoS 2 PUBLISH;
//! - a PUBREL for a packet id it does not know gets no PUBCOMP (only a log line);
//! - with `allow_anonymous: true` every client counts as anonymous, and anonymous sessions
//!   are not persistent: a `clean session = 0` session is dropped about a second after the
//!   client disconnects (a quicker reconnect gets session present = 1), and no QoS 1/2
//!   messages are queued for it while it is offline;
//! - an empty client id is accepted with `clean session = 1` (it gets a random
//!   `amqtt/...` id) and rejected (CONNACK 0x02) with `clean session = 0`;
//! - a client id that is taken over does not get its old connection closed, and idle
//!   clients are not disconnected after 1.5 keep-alive periods;
//! - there is no broker-side packet size limit beyond MQTT's 256 MB (a 10 MB QoS 1 PUBLISH
//!   is accepted) and no client id length limit.
//!
//! With [`Amqtt::start_with`] it also serves MQTT over WebSocket (`type: ws`: Python's
//! `websockets`, subprotocol `mqtt`, any path, messages up to 1 MiB), in plain text and/or
//! over TLS (`wss`) with a given certificate.
//!
//! If the listener cannot bind, the broker logs `Broker startup failed` but keeps running;
//! [`Amqtt::start`] watches for that line (and retries on a fresh port if the port was taken
//! in the meantime).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mosquitto::free_port;
use crate::rabbitmq::mqtt_handshake;

/// How long [`Amqtt::start`] waits for the MQTT listener (each attempt).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of the broker's last output lines are kept (for error messages).
const LOG_LINES: usize = 400;
/// How many ports [`Amqtt::start`] tries when the one it picked is taken before amqtt binds it.
const ATTEMPTS: usize = 3;
/// The environment variable that names the `amqtt` broker script to run.
pub const BINARY_ENV: &str = "MQTT_SINK_AMQTT";

/// A running private amqtt broker.
#[derive(Debug)]
pub struct Amqtt {
    child: Option<Child>,
    /// Its MQTT 3.1.1 listener port on 127.0.0.1 (anonymous access).
    pub port: u16,
    /// Its MQTT-over-WebSocket listener port (`ws://`), with [`AmqttOptions::ws`].
    pub ws_port: Option<u16>,
    /// Its MQTT-over-WebSocket-over-TLS listener port (`wss://`), with
    /// [`AmqttOptions::wss`].
    pub wss_port: Option<u16>,
    options: AmqttOptions,
    /// Its working directory (the generated `broker.yaml`); removed when dropped.
    pub dir: PathBuf,
    /// How long [`Amqtt::start`] took until the listener answered a CONNECT with a CONNACK.
    pub startup: Duration,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// The `amqtt` broker script: `$MQTT_SINK_AMQTT` if set, else
/// `$HOME/.cache/mqtt-sink/amqtt-venv/bin/amqtt` (the venv `.ci/run` installs).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os(BINARY_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/mqtt-sink/amqtt-venv/bin/amqtt")
}

/// Which listeners besides the MQTT one ([`Amqtt::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct AmqttOptions {
    /// A plain WebSocket listener (`ws://127.0.0.1:<ws_port>/<any path>`).
    pub ws: bool,
    /// A WebSocket listener over TLS with this certificate chain and key (PEM files).
    pub wss: Option<(PathBuf, PathBuf)>,
}

/// The config: one TCP listener on 127.0.0.1:`port`, anonymous access, and no other plugin
/// (no `$SYS` topics, no packet logging). amqtt rejects unknown keys.
pub fn config_yaml(port: u16) -> String {
    format!(
        "listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n\
         plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
    )
}

/// [`config_yaml`] plus the WebSocket listeners on `ws` and `wss` (port, and for `wss` the
/// certificate and key).
fn config_yaml_with(port: u16, ws: Option<u16>, wss: Option<(u16, &PathBuf, &PathBuf)>) -> String {
    let mut yaml = config_yaml(port);
    let mut extra = String::new();
    if let Some(p) = ws {
        extra.push_str(&format!("  ws:\n    type: ws\n    bind: 127.0.0.1:{p}\n"));
    }
    if let Some((p, cert, key)) = wss {
        extra.push_str(&format!(
            "  wss:\n    type: ws\n    bind: 127.0.0.1:{p}\n    ssl: true\n    certfile: {}\n    keyfile: {}\n",
            cert.display(),
            key.display()
        ));
    }
    let at = yaml.find("plugins:").expect("listeners come first");
    yaml.insert_str(at, &extra);
    yaml
}

/// Appends every line of `r` to `log` (keeping the last [`LOG_LINES`]) on its own thread.
fn capture(r: impl Read + Send + 'static, tag: &'static str, log: &Arc<Mutex<VecDeque<String>>>) {
    let log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut l = log.lock().expect("lock");
            if l.len() == LOG_LINES {
                l.pop_front();
            }
            l.push_back(format!("{tag}{line}"));
        }
    });
}

/// Why an attempt to start failed.
enum Failure {
    /// The port was taken before amqtt could bind it: worth another port.
    PortTaken(String),
    /// Anything else.
    Fatal(String),
}

impl Amqtt {
    /// [`start`](Self::start), or `None` after printing a `SKIPPED:` line when the amqtt
    /// venv is not installed here (`.ci/run` installs it); any other failure panics.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        Self::start_with_or_skip(test, AmqttOptions::default())
    }

    /// [`start_with`](Self::start_with), or `None` after printing a `SKIPPED:` line when
    /// the amqtt venv is not installed here.
    pub fn start_with_or_skip(test: &str, options: AmqttOptions) -> Option<Self> {
        let bin = binary();
        if !bin.exists() {
            eprintln!(
                "SKIPPED: {test}: amqtt is not installed at {} (set {BINARY_ENV}, or: python3 -m venv \
                 ~/.cache/mqtt-sink/amqtt-venv && ~/.cache/mqtt-sink/amqtt-venv/bin/pip install amqtt==0.12.1)",
                bin.display()
            );
            return None;
        }
        match Self::start_with(options) {
            Ok(b) => Some(b),
            Err(e) => panic!("{test}: amqtt did not start: {e}"),
        }
    }

    /// Starts a private amqtt broker ([`binary`]) on a free 127.0.0.1 port and waits (at most
    /// 30 s) until it answers an MQTT 3.1.1 CONNECT with a successful CONNACK. On failure
    /// the error carries the last lines of its output.
    pub fn start() -> Result<Self, String> {
        Self::start_with(AmqttOptions::default())
    }

    /// [`start`](Self::start) with WebSocket listeners too (each on a free port of its own;
    /// the broker is ready when its MQTT listener answers, and amqtt opens every listener
    /// before that one answers or logs `Broker startup failed`).
    pub fn start_with(options: AmqttOptions) -> Result<Self, String> {
        let t0 = Instant::now();
        let bin = binary();
        if !bin.exists() {
            return Err(format!(
                "{} not found: install amqtt 0.12.1 in a venv there, or set {BINARY_ENV}",
                bin.display()
            ));
        }
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("mqtt-sink-amqtt-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut a = Self {
                child: None,
                port,
                ws_port: options.ws.then(free_port),
                wss_port: options.wss.as_ref().map(|_| free_port()),
                options: options.clone(),
                dir,
                startup: Duration::ZERO,
                log: Arc::new(Mutex::new(VecDeque::new())),
            };
            // On error, `a` is dropped: that kills the broker and removes the dir.
            match a.spawn(&bin).and_then(|()| a.wait_ready()) {
                Ok(()) => {
                    a.startup = t0.elapsed();
                    return Ok(a);
                }
                Err(Failure::PortTaken(e)) => last = e,
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
        Err(last)
    }

    fn spawn(&mut self, bin: &std::path::Path) -> Result<(), Failure> {
        let conf = self.dir.join("broker.yaml");
        let wss = self.options.wss.as_ref().zip(self.wss_port);
        let wss = wss.map(|((cert, key), p)| (p, cert, key));
        std::fs::write(&conf, config_yaml_with(self.port, self.ws_port, wss))
            .map_err(|e| Failure::Fatal(format!("{}: {e}", conf.display())))?;
        let mut c = Command::new(bin);
        c.arg("-c")
            .arg(&conf)
            // Hermetic: nothing from the caller's Python environment.
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env_remove("PYTHONSTARTUP")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("NO_COLOR", "1")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| Failure::Fatal(format!("cannot start {} ({e})", bin.display())))?;
        if let Some(o) = child.stdout.take() {
            capture(o, "", &self.log);
        }
        if let Some(o) = child.stderr.take() {
            capture(o, "", &self.log);
        }
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), Failure> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("not listening");
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                std::thread::sleep(Duration::from_millis(200)); // let the readers catch up
                return Err(Failure::Fatal(format!(
                    "amqtt exited ({status}) before its listener came up:\n{}",
                    self.log_tail(60).join("\n")
                )));
            }
            // A failed bind does not end the process: it logs and idles.
            let failed = {
                let l = self.log.lock().expect("lock");
                l.iter().any(|x| x.contains("Broker startup failed"))
            };
            if failed {
                std::thread::sleep(Duration::from_millis(200)); // the traceback follows
                let tail = self.log_tail(60).join("\n");
                let msg = format!(
                    "amqtt could not start its listener on 127.0.0.1:{}:\n{tail}",
                    self.port
                );
                return Err(if tail.contains("address already in use") {
                    Failure::PortTaken(msg)
                } else {
                    Failure::Fatal(msg)
                });
            }
            // Ready when MQTT answers and every WebSocket listener accepts connections.
            let ws_down = [self.ws_port, self.wss_port]
                .into_iter()
                .flatten()
                .find(|p| {
                    std::net::TcpStream::connect_timeout(
                        &std::net::SocketAddr::from(([127, 0, 0, 1], *p)),
                        Duration::from_secs(1),
                    )
                    .is_err()
                });
            match (mqtt_handshake(self.port, "amqtt"), ws_down) {
                (Ok(()), None) => return Ok(()),
                (Ok(()), Some(p)) => last = format!("WebSocket listener on {p} not accepting"),
                (Err(e), _) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Failure::Fatal(format!(
            "amqtt's listener on 127.0.0.1:{} was not ready within {} s ({last}):\n{}",
            self.port,
            START_TIMEOUT.as_secs(),
            self.log_tail(60).join("\n")
        )))
    }

    /// The last `n` lines the broker printed (stdout and stderr, interleaved).
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let l = self.log.lock().expect("lock");
        l.iter().skip(l.len().saturating_sub(n)).cloned().collect()
    }

    /// The pid of the broker's Python process (`None` once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops it hard (SIGKILL to its pid, as a crash would) and reaps it (waiting at most
    /// 10 s). The dir is kept until the drop.
    pub fn kill(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = c.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match c.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
    }
}

impl Drop for Amqtt {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
