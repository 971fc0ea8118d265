//! rumqttd (the `rumqttd` crate, 0.20) run in-process on random free 127.0.0.1 ports: one
//! MQTT 3.1.1 listener and one MQTT 5 listener, anonymous, QoS 0/1/2. Another broker
//! implementation than Mosquitto, for the cross-broker delivery tests.
//!
//! rumqttd has no shutdown: the broker's threads run until the test process exits (each
//! test binary is its own process), so start one per test and let it go.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::mosquitto::free_port;

/// How long [`Rumqttd::start`] waits for the listeners.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running in-process rumqttd.
#[derive(Debug, Clone, Copy)]
pub struct Rumqttd {
    /// Its MQTT 3.1.1 listener on 127.0.0.1.
    pub port_v311: u16,
    /// Its MQTT 5 listener on 127.0.0.1.
    pub port_v5: u16,
}

impl Rumqttd {
    /// Starts it; ready when both listeners accept connections. A port taken between
    /// choosing and binding it is retried with other ports.
    pub fn start() -> Result<Self, String> {
        let mut last = String::new();
        for _ in 0..5 {
            let (port_v311, port_v5) = (free_port(), free_port());
            if port_v311 == port_v5 {
                continue;
            }
            match try_start(port_v311, port_v5) {
                Ok(()) => return Ok(Self { port_v311, port_v5 }),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn try_start(port_v311: u16, port_v5: u16) -> Result<(), String> {
    let listener = |name: &str, port: u16| {
        format!(
            "[{name}.1]\nname = \"{name}-1\"\nlisten = \"127.0.0.1:{port}\"\n\
             next_connection_delay_ms = 1\n\
             [{name}.1.connections]\nconnection_timeout_ms = 60000\n\
             max_payload_size = 1048576\nmax_inflight_count = 1000\ndynamic_filters = true\n"
        )
    };
    let text = format!(
        "id = 0\n[router]\nid = 0\nmax_connections = 1000\nmax_outgoing_packet_count = 1000\n\
         max_segment_size = 104857600\nmax_segment_count = 10\n{}{}",
        listener("v4", port_v311),
        listener("v5", port_v5)
    );
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| format!("rumqttd config: {e}"))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let _ = broker.start();
        })
        .map_err(|e| format!("rumqttd thread: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    for port in [port_v311, port_v5] {
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("rumqttd did not listen on 127.0.0.1:{port}"));
            }
            // Readiness of a listener on a background thread: nothing to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
