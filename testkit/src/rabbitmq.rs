//! A real, private RabbitMQ broker (the Debian package) with the MQTT plugin on random free
//! 127.0.0.1 ports, with a generated config, its own node name, Erlang cookie, data dir and
//! `epmd`; the whole process tree is killed when dropped.
//!
//! RabbitMQ 3.10 (Debian 12) speaks MQTT 3.1 and 3.1.1 only (an MQTT 5 CONNECT gets no
//! CONNACK: the connection is closed) and does not honour QoS 2: a QoS 2 PUBLISH is answered
//! with a PUBACK, and QoS 2 subscriptions are granted QoS 1.
//!
//! The server is started as `/usr/lib/rabbitmq/bin/rabbitmq-server` (the real start script,
//! not the Debian `/usr/sbin` wrapper, which `su`s to user `rabbitmq` and loses the
//! environment) as the current user, in a fresh process group shared with a private `epmd`
//! on its own port (`ERL_EPMD_PORT`), so the system's `epmd`/RabbitMQ (if any) is never
//! touched.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mosquitto::free_port;

/// How long [`RabbitMq::start`] waits for the MQTT listener.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How many of the server's last output lines are kept (for error messages).
const LOG_LINES: usize = 400;

/// A running private RabbitMQ with the MQTT plugin.
#[derive(Debug)]
pub struct RabbitMq {
    server: Option<Child>,
    epmd: Option<Child>,
    /// The process group of the server and its `epmd`.
    pgid: Option<u32>,
    /// Its MQTT listener port on 127.0.0.1 (anonymous clients log in as guest/guest).
    pub port: u16,
    /// Its AMQP 0-9-1 listener port on 127.0.0.1.
    pub amqp_port: u16,
    /// Its Erlang distribution port on 127.0.0.1.
    pub dist_port: u16,
    /// Its private `epmd` port on 127.0.0.1 (`ERL_EPMD_PORT`).
    pub epmd_port: u16,
    /// Its Erlang node name, e.g. `mqttsink41883@localhost`.
    pub node: String,
    /// Its working directory (config, cookie, database).
    pub dir: PathBuf,
    /// How long [`RabbitMq::start`] took until the MQTT listener answered a CONNECT.
    pub startup: Duration,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// The real start script: a `rabbitmq-server` that is not the Debian wrapper (which switches
/// to user `rabbitmq` with `su` and drops the environment).
fn server_script() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.exists() {
        return Some(debian);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("rabbitmq-server"))
        .filter(|p| p.exists())
        .find(|p| {
            let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            real.file_name().and_then(|n| n.to_str()) != Some("rabbitmq-script-wrapper")
        })
}

/// `epmd` (comes with Erlang, a dependency of `rabbitmq-server`).
fn epmd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/bin"),
            PathBuf::from("/usr/lib/erlang/bin"),
        ])
        .map(|d| d.join("epmd"))
        .find(|p| p.exists())
}

/// Drops ANSI colour escapes (`ESC [ ... m`) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
            l.push_back(format!("{tag}{}", strip_ansi(&line)));
        }
    });
}

/// Parent pid of every process (from `/proc/<pid>/stat`).
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// `roots` and all their descendants (e.g. beam.smp, erl_child_setup, inet_gethost, which
/// run in process groups of their own).
fn descendants(roots: &[u32]) -> Vec<u32> {
    let parents = parents();
    let mut all: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        for (&c, &pp) in &parents {
            if pp == p && !all.contains(&c) {
                all.push(c);
            }
        }
        i += 1;
    }
    all
}

/// The environment variable (set to the node name) that marks every process of a fixture:
/// the server's command lines do not contain the node name (RabbitMQ starts distribution
/// itself), but the environment is inherited by everything it spawns.
const MARKER: &str = "MQTT_SINK_RABBITMQ_NODE";

/// Live processes (not zombies) of the fixture whose node is `node`: those carrying its
/// marker in their environment (readable for our own processes) or its name on their command
/// line. Empty once it is dropped.
pub fn processes_of(node: &str) -> Vec<u32> {
    let marker = format!("{MARKER}={node}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter(|pid| {
            let has = |file: &str, needle: &str| {
                std::fs::read(format!("/proc/{pid}/{file}")).is_ok_and(|b| {
                    b.split(|&c| c == 0)
                        .any(|w| String::from_utf8_lossy(w).contains(needle))
                })
            };
            has("environ", &marker) || has("cmdline", node)
        })
        .collect()
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits (at most `timeout`) until something accepts TCP connections on 127.0.0.1:`port`.
fn wait_listening(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// An MQTT 3.1.1 CONNECT (clean session, keep alive 30 s, no credentials).
pub fn mqtt311_connect(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    mqtt_packet(0x10, &body)
}

/// A fixed header (`first` byte, remaining length) followed by `body`.
pub fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Reads one MQTT packet (fixed header byte and body) from `s`.
pub fn read_mqtt_packet(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 || shift > 21 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((first[0], body))
}

/// Connects with MQTT 3.1.1 to the broker at 127.0.0.1:`port` (client id naming `who`) and
/// checks for a successful CONNACK: the readiness probe of the broker fixtures.
pub(crate) fn mqtt_handshake(port: u16, who: &str) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    let id = format!("mqtt-sink-{who}-probe-{}", std::process::id());
    s.write_all(&mqtt311_connect(&id))
        .map_err(|e| e.to_string())?;
    let (first, body) = read_mqtt_packet(&mut s).map_err(|e| format!("no CONNACK: {e}"))?;
    let _ = s.write_all(&[0xe0, 0]); // DISCONNECT
    if first == 0x20 && body.len() == 2 && body[1] == 0 {
        Ok(())
    } else {
        Err(format!("unexpected reply {first:#04x} {body:02x?}"))
    }
}

impl RabbitMq {
    /// [`start`](Self::start), or `None` after printing a `SKIPPED:` line when RabbitMQ is
    /// not installed here (`.ci/run` installs it); any other failure panics.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        if server_script().is_none() || epmd_binary().is_none() {
            eprintln!("SKIPPED: {test}: rabbitmq-server is not installed (apt-get install rabbitmq-server)");
            return None;
        }
        match Self::start() {
            Ok(b) => Some(b),
            Err(e) => panic!("{test}: RabbitMQ did not start: {e}"),
        }
    }

    /// Starts a private RabbitMQ with the MQTT plugin and waits (at most 60 s) until its MQTT
    /// listener answers an MQTT 3.1.1 CONNECT with a successful CONNACK.
    pub fn start() -> Result<Self, String> {
        let t0 = Instant::now();
        let script = server_script().ok_or(
            "rabbitmq-server not found: install it with `apt-get install rabbitmq-server`",
        )?;
        let epmd = epmd_binary().ok_or(
            "epmd not found (comes with Erlang): install it with `apt-get install rabbitmq-server`",
        )?;
        // Four distinct free ports: MQTT, AMQP, Erlang distribution, epmd.
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 4 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let port = ports[0];
        let dir =
            std::env::temp_dir().join(format!("mqtt-sink-rabbitmq-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("conf.d"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut r = Self {
            server: None,
            epmd: None,
            pgid: None,
            port,
            amqp_port: ports[1],
            dist_port: ports[2],
            epmd_port: ports[3],
            node: format!("mqttsink{port}@localhost"),
            dir,
            startup: Duration::ZERO,
            log: Arc::new(Mutex::new(VecDeque::new())),
        };
        // On error, `r` is dropped: that kills whatever was started and removes the dir.
        r.write_config()?;
        r.spawn(&script, &epmd)?;
        r.wait_ready(t0 + START_TIMEOUT)?;
        r.startup = t0.elapsed();
        Ok(r)
    }

    fn write_config(&self) -> Result<(), String> {
        let write = |name: &str, text: &str, mode: u32| -> Result<(), String> {
            let path = self.dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        let conf = [
            format!("mqtt.listeners.tcp.default = 127.0.0.1:{}", self.port),
            "mqtt.listeners.ssl = none".to_string(),
            "mqtt.allow_anonymous = true".to_string(),
            "mqtt.default_user = guest".to_string(),
            "mqtt.default_pass = guest".to_string(),
            "mqtt.vhost = /".to_string(),
            "mqtt.exchange = amq.topic".to_string(),
            // guest may log in from anywhere (it is only reachable on 127.0.0.1 anyway).
            "loopback_users = none".to_string(),
            // Log to stdout only (captured for error messages), without colours.
            "log.console = true".to_string(),
            "log.console.level = info".to_string(),
            "log.console.use_colors = off".to_string(),
            "log.file = false".to_string(),
            // A small tmpfs must not raise the disk alarm (which blocks publishers).
            "disk_free_limit.absolute = 10MB".to_string(),
        ];
        write("rabbitmq.conf", &(conf.join("\n") + "\n"), 0o644)?;
        write("enabled_plugins", "[rabbitmq_mqtt].\n", 0o644)?;
        // Erlang insists that the cookie is readable by its owner only.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let cookie = format!("MQTTSINK{}X{}X{nanos}", std::process::id(), self.port);
        write(".erlang.cookie", &cookie, 0o400)
    }

    fn spawn(&mut self, script: &Path, epmd: &Path) -> Result<(), String> {
        let dir = &self.dir;
        let p = |name: &str| dir.join(name);
        // A private epmd, leader of the process group the server joins.
        let mut e = Command::new(epmd);
        e.arg("-port")
            .arg(self.epmd_port.to_string())
            .arg("-address")
            .arg("127.0.0.1")
            .env(MARKER, &self.node)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut epmd_child = e
            .spawn()
            .map_err(|err| format!("cannot start {} ({err})", epmd.display()))?;
        let pgid = epmd_child.id();
        self.pgid = Some(pgid);
        if let Some(o) = epmd_child.stdout.take() {
            capture(o, "epmd: ", &self.log);
        }
        if let Some(o) = epmd_child.stderr.take() {
            capture(o, "epmd: ", &self.log);
        }
        self.epmd = Some(epmd_child);
        if !wait_listening(self.epmd_port, Duration::from_secs(10)) {
            return Err(format!(
                "epmd did not listen on 127.0.0.1:{} within 10 s:\n{}",
                self.epmd_port,
                self.log_tail(50).join("\n")
            ));
        }

        let mut c = Command::new(script);
        // Hermetic: nothing from the caller's RabbitMQ/Erlang/systemd environment.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") || k == "NOTIFY_SOCKET" {
                c.env_remove(&*k);
            }
        }
        c.env(MARKER, &self.node)
            .env("HOME", dir)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            // Distribution on 127.0.0.1 only; never start (and daemonize) an epmd of its own.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_CONFIG_FILES", p("conf.d"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", p("plugins-expand"))
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_PID_FILE", p("rabbitmq.pid"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(pgid as i32);
        let mut child = c.spawn().map_err(|err| {
            format!(
                "cannot start {} ({err}): install it with `apt-get install rabbitmq-server`",
                script.display()
            )
        })?;
        if let Some(o) = child.stdout.take() {
            capture(o, "", &self.log);
        }
        if let Some(o) = child.stderr.take() {
            capture(o, "stderr: ", &self.log);
        }
        self.server = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        let mut last = String::from("not listening");
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.server.as_mut().map(Child::try_wait) {
                std::thread::sleep(Duration::from_millis(200)); // let the readers catch up
                return Err(format!(
                    "rabbitmq-server exited ({status}) before its MQTT listener came up:\n{}",
                    self.log_tail(60).join("\n")
                ));
            }
            match mqtt_handshake(self.port, "rabbitmq") {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "RabbitMQ's MQTT listener on 127.0.0.1:{} was not ready within {} s ({last}):\n{}",
            self.port,
            START_TIMEOUT.as_secs(),
            self.log_tail(60).join("\n")
        ))
    }

    /// The last `n` lines the server (and its epmd) printed, colour escapes removed.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let l = self.log.lock().expect("lock");
        l.iter().skip(l.len().saturating_sub(n)).cloned().collect()
    }

    /// The pid of the `rabbitmq-server` start script (`None` once killed). The Erlang VM
    /// (`beam.smp`) is its child; both are in process group [`RabbitMq::pgid`].
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// The process group of the server and its private epmd (`None` once killed).
    pub fn pgid(&self) -> Option<u32> {
        self.pgid
    }

    /// Stops it hard (SIGKILL), as a crash would: its process group (the start script, the
    /// Erlang VM and the private epmd), and every descendant or process carrying its marker
    /// (`erl_child_setup`, `inet_gethost`, which run in sessions of their own). Waits (at
    /// most 10 s) until they are gone. The dir is kept.
    pub fn kill(&mut self) {
        let Some(pgid) = self.pgid.take() else {
            return;
        };
        let roots: Vec<u32> = [&self.epmd, &self.server]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect();
        let mut all = descendants(&roots);
        for p in processes_of(&self.node) {
            if !all.contains(&p) {
                all.push(p);
            }
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{pgid}"))
            .args(all.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status();
        for mut c in [self.server.take(), self.epmd.take()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while all.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A helper forked while we were listing (e.g. a `df` run) still carries the marker.
        for _ in 0..3 {
            let late = processes_of(&self.node);
            if late.is_empty() {
                break;
            }
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(late.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(2);
            while late.iter().any(|&p| alive(p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
