//! A real Mosquitto broker (the Debian package) on a random free 127.0.0.1 port, with a
//! generated config; killed (by pid) when dropped.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// What to put in the generated `mosquitto.conf`.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// `max_packet_size` in bytes (the broker's MQTT 5 Maximum Packet Size).
    pub max_packet_size: Option<u32>,
    /// Keep messages and sessions on disk across restarts.
    pub persistence: bool,
    /// Extra lines appended to the config.
    pub extra: Vec<String>,
    /// A second listener with TLS on [`Mosquitto::tls_port`].
    pub tls: Option<TlsListener>,
}

/// A TLS listener's files.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// CA file (also verifies client certificates).
    pub cafile: PathBuf,
    /// Server certificate.
    pub certfile: PathBuf,
    /// Server key.
    pub keyfile: PathBuf,
    /// Demand a client certificate (mutual TLS).
    pub require_certificate: bool,
}

/// A running Mosquitto.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    /// Its plain listener port on 127.0.0.1.
    pub port: u16,
    /// Its TLS listener port on 127.0.0.1 (0 without [`MosquittoOptions::tls`]).
    pub tls_port: u16,
    /// Its working directory (config, persistence).
    pub dir: PathBuf,
    opts: MosquittoOptions,
    /// Every line it logged, across restarts.
    log: Arc<Mutex<Vec<String>>>,
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl Mosquitto {
    /// Starts Mosquitto and waits (at most 10 s) until it listens.
    pub fn start(opts: MosquittoOptions) -> Result<Self, String> {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("mqtt-sink-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tls_port = if opts.tls.is_some() { free_port() } else { 0 };
        let mut m = Self {
            child: None,
            port,
            tls_port,
            dir,
            opts,
            log: Arc::default(),
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let conf = self.dir.join("mosquitto.conf");
        let mut lines = vec![
            format!("listener {} 127.0.0.1", self.port),
            "allow_anonymous true".to_string(),
            "log_dest stderr".to_string(),
            "log_type error".to_string(),
            "log_type warning".to_string(),
            "log_type notice".to_string(),
            "log_type information".to_string(),
            // Never drop messages queued for a slow subscriber: the tests count them all.
            "max_queued_messages 0".to_string(),
            "max_inflight_messages 0".to_string(),
            format!("persistence {}", self.opts.persistence),
            format!("persistence_location {}/", self.dir.display()),
        ];
        if let Some(n) = self.opts.max_packet_size {
            lines.push(format!("max_packet_size {n}"));
        }
        lines.extend(self.opts.extra.iter().cloned());
        if let Some(t) = &self.opts.tls {
            lines.push(format!("listener {} 127.0.0.1", self.tls_port));
            lines.push(format!("cafile {}", t.cafile.display()));
            lines.push(format!("certfile {}", t.certfile.display()));
            lines.push(format!("keyfile {}", t.keyfile.display()));
            lines.push(format!("require_certificate {}", t.require_certificate));
        }
        let mut f = std::fs::File::create(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        f.write_all((lines.join("\n") + "\n").as_bytes())
            .map_err(|e| format!("{}: {e}", conf.display()))?;
        // Running as root, Mosquitto drops to user `mosquitto`: let it read and write here.
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("a+rwX")
            .arg(&self.dir)
            .status();
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot start mosquitto ({e}): install it with `apt-get install mosquitto`")
            })?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        let kept = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = kept.lock() {
                    l.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let mut log = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) => {
                    let ready = line.contains(" running");
                    log.push(line);
                    if ready {
                        return Ok(());
                    }
                }
                Err(_) => {
                    self.kill();
                    return Err(format!(
                        "mosquitto did not start within 10 s:\n{}",
                        log.join("\n")
                    ));
                }
            }
        }
    }

    /// Stops it hard (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same config (and persistence).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }

    /// Every line it logged so far (notice and information included), across restarts.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many connections it accepted from clients whose id starts with `client_id`
    /// (its "New client connected ... as <id>" lines).
    pub fn connections(&self, client_id: &str) -> usize {
        let tag = format!(" as {client_id}");
        self.log()
            .iter()
            .filter(|l| l.contains("New client connected") && l.contains(&tag))
            .count()
    }

    /// How many of those connections were CleanSession=1 (`c1` in the log): with
    /// `clean_session = false` the sink makes one only to end or discard a session.
    pub fn clean_connections(&self, client_id: &str) -> usize {
        let tag = format!(" as {client_id}");
        self.log()
            .iter()
            .filter(|l| l.contains("New client connected") && l.contains(&tag))
            .filter(|l| l.contains(", c1,"))
            .count()
    }

    /// Its process id (`None` while it is not running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes it (SIGSTOP): connections stay open and the kernel still accepts new ones
    /// and buffers what clients send, but nothing is read, acknowledged or forwarded until
    /// [`resume`](Self::resume). A dropped `Mosquitto` is resumed before it is killed.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a [`pause`](Self::pause)d broker run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
