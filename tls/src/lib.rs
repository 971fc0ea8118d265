//! What the runtimes share about the transport: the rustls client configuration from the
//! sink's TLS options (ring is the only provider), the WebSocket upgrade request, and the
//! sans-IO layers between the core's MQTT bytes and a socket ([`Layers`]: WebSocket, TLS).

use std::io::{Read, Write};
use std::sync::Arc;

#[cfg(feature = "tokio")]
mod quick_ack_tokio;
mod ws;
#[cfg(feature = "tokio")]
mod ws_tokio;
#[cfg(feature = "tokio")]
pub use quick_ack_tokio::QuickAckTcp;
pub use tungstenite::handshake::client::Request as WsRequest;
pub use ws::WsLayer;
#[cfg(feature = "tokio")]
pub use ws_tokio::{ws_connect, WsIo};

use mqtt_sink_core::{Config, ConfigErrors};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConnection, DigitallySignedStruct, SignatureScheme};

/// Asks the kernel to acknowledge what arrives on `tcp` at once (TCP_QUICKACK), as the
/// runtimes do after a read of the broker connection while the core's
/// `Sink::quick_ack_wanted` holds. Linux leaves quick-ack mode on its own, hence once per
/// read. Why: Mosquitto (and any broker with Nagle's algorithm on, its default) holds a
/// PUBACK while an earlier one is unacknowledged; when the sink has nothing to send (a
/// checkpoint waiting for the last acks, a lull) no data carries its ACK, so the
/// delayed-ACK timer (40 ms) paced the last acks of every checkpoint: 45-50 ms latency
/// spikes at each `commit_interval` (BENCHMARKS.md, latency). Best effort: other systems
/// have no such option and keep their delayed ACKs.
pub fn quick_ack<S: std::os::fd::AsFd>(tcp: &S) {
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
}

/// The client config a sink's runtime starts with: `None` when `tls_enabled` is off; a
/// problem is a config error of `tls` (as a sink builder's `start` reports it).
pub fn sink_client_config(cfg: &Config) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigErrors> {
    let made = cfg.tls_enabled.then(|| client_config(cfg)).transpose();
    made.map_err(|rule| ConfigErrors::one("tls", rule))
}

/// Builds the rustls client config for `cfg`; errors name the option and file.
pub fn client_config(cfg: &Config) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = if cfg.tls_insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.tls_ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        format!(
                            "tls_ca_file = {}: cannot read PEM certificates: {e}",
                            path.display()
                        )
                    })?;
                if certs.is_empty() {
                    return Err(format!(
                        "tls_ca_file = {}: no certificate in the file",
                        path.display()
                    ));
                }
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| format!("tls_ca_file = {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err("no system CA certificates found: install ca-certificates or set tls_ca_file".into());
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match (&cfg.tls_client_cert, &cfg.tls_client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    format!(
                        "tls_client_cert = {}: cannot read PEM certificates: {e}",
                        cert.display()
                    )
                })?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                format!(
                    "tls_client_key = {}: cannot read a PEM private key: {e}",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("tls_client_cert / tls_client_key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = config;
    config.alpn_protocols = cfg.tls_alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The server name for SNI and verification: `server` from the config.
pub fn server_name(server: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(server.to_string())
        .map_err(|e| format!("server = {server:?} is not a valid TLS server name: {e}"))
}

/// `tls_insecure_skip_verify`: signatures are checked, the certificate chain is not.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The most MQTT bytes sent in one WebSocket frame. MQTT over WebSocket lets packets span
/// frames (MQTT 5 6.0, 3.1.1 6.0); brokers' WebSocket servers cap a message (Python's
/// `websockets`, under amqtt, at 1 MiB), and the core hands over batches larger than that.
pub const WS_MAX_FRAME: usize = 64 * 1024;

/// The upgrade request when `cfg` asks for WebSocket (`transport = "ws"`), else `None`: the
/// one place that decides, for the sans-IO [`Layers`] and the tokio stream alike.
pub fn ws_request_for(cfg: &Config, server: &str, port: u16) -> Result<Option<WsRequest>, String> {
    match cfg.transport {
        mqtt_sink_core::Transport::Ws => ws_request(cfg, server, port).map(Some),
        _ => Ok(None),
    }
}

/// The WebSocket upgrade request for `server`:`port` with `transport = "ws"`:
/// `ws://` (`wss://` with TLS, which the runtime has already set up underneath) at
/// `ws_path`, subprotocol `mqtt`, plus `ws_headers`. Errors name the options.
pub fn ws_request(cfg: &Config, server: &str, port: u16) -> Result<WsRequest, String> {
    use tungstenite::client::{ClientRequestBuilder, IntoClientRequest};
    let scheme = if cfg.tls_enabled { "wss" } else { "ws" };
    let url = format!(
        "{scheme}://{}{}",
        mqtt_sink_core::format_address(server, port),
        cfg.ws_path()
    );
    let uri: tungstenite::http::Uri = url.parse().map_err(|e| {
        format!("{url} (from server, port and ws_path) is not a valid WebSocket URL: {e}")
    })?;
    let mut request = ClientRequestBuilder::new(uri).with_sub_protocol("mqtt");
    for (name, value) in &cfg.ws_headers {
        request = request.with_header(name, value.expose());
    }
    request
        .into_client_request()
        .map_err(|e| format!("ws_headers: cannot build the WebSocket upgrade request: {e}"))
}

/// What lies between the core's MQTT bytes and a socket, sans-IO: a WebSocket
/// (`transport = "ws"`) over TLS (`tls_enabled`), either or both or neither. What the core
/// writes before the handshakes are done waits in them.
#[allow(missing_debug_implementations)]
pub struct Layers {
    tls: Option<ClientConnection>,
    ws: Option<WsLayer>,
}

impl Layers {
    /// The layers of a connection to `server`:`port` (SNI and the certificate check follow
    /// `server`); with WebSocket, [`write`](Self::write) of nothing sends the upgrade.
    pub fn new(
        cfg: &Config,
        tls: Option<Arc<rustls::ClientConfig>>,
        server: &str,
        port: u16,
    ) -> Result<Self, String> {
        let tls = match tls {
            Some(c) => {
                let mut t = ClientConnection::new(c, server_name(server)?)
                    .map_err(|e| format!("TLS setup failed: {e}"))?;
                // `write` hands rustls all the core transmitted, then drains it; the default
                // limit (64 KiB) would refuse a larger batch.
                t.set_buffer_limit(None);
                Some(t)
            }
            None => None,
        };
        let ws = match ws_request_for(cfg, server, port)? {
            Some(request) => Some(WsLayer::start(request)?),
            None => None,
        };
        Ok(Self { tls, ws })
    }

    /// Writes the core's bytes (in WebSocket frames, encrypted) to `sock`, with whatever
    /// the layers have pending.
    pub fn write(&mut self, mqtt: &[u8], sock: &mut impl Write) -> Result<(), String> {
        match self.ws.as_mut() {
            Some(ws) => {
                ws.write(mqtt)?;
                let frames = ws.take_output();
                self.write_tls(&frames, sock)
            }
            None => self.write_tls(mqtt, sock),
        }
    }

    /// Bytes read from the socket: the MQTT bytes they carry (the layers' answers are
    /// written to `sock`).
    pub fn read(&mut self, data: Vec<u8>, sock: &mut impl Write) -> Result<Vec<u8>, String> {
        let plain = self.read_tls(data, sock)?;
        let Some(ws) = self.ws.as_mut() else {
            return Ok(plain);
        };
        let mut mqtt = Vec::new();
        let read = ws.read(&plain, &mut mqtt);
        let answers = ws.take_output();
        self.write_tls(&answers, sock)?;
        read.map(|()| mqtt)
    }

    /// Closes the WebSocket and TLS sessions (their goodbyes are written to `sock`).
    pub fn close(&mut self, sock: &mut impl Write) {
        if let Some(ws) = self.ws.as_mut() {
            ws.close();
            let _ = self.write(&[], sock);
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.write_tls(&[], sock);
        }
    }

    fn write_tls(&mut self, plain: &[u8], sock: &mut impl Write) -> Result<(), String> {
        let written = match &mut self.tls {
            None => sock.write_all(plain),
            Some(tls) => tls.writer().write_all(plain).and_then(|()| {
                while tls.wants_write() {
                    tls.write_tls(sock)?;
                }
                Ok(())
            }),
        };
        written.map_err(|e| format!("write failed: {e}"))
    }

    fn read_tls(&mut self, data: Vec<u8>, sock: &mut impl Write) -> Result<Vec<u8>, String> {
        let Some(tls) = &mut self.tls else {
            return Ok(data);
        };
        let (mut rd, mut plain) = (&data[..], Vec::new());
        let failed = |e: std::io::Error| format!("TLS read failed: {e}");
        while !rd.is_empty() {
            tls.read_tls(&mut rd).map_err(failed)?;
            let state = tls
                .process_new_packets()
                .map_err(|e| format!("TLS failed: {e}"))?;
            let start = plain.len();
            plain.resize(start + state.plaintext_bytes_to_read(), 0);
            tls.reader()
                .read_exact(&mut plain[start..])
                .map_err(failed)?;
        }
        self.write_tls(&[], sock)?;
        Ok(plain)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Linux drops quick-ack mode by itself; a freshly connected socket may already be in
    /// it, so the test first clears it and checks that `quick_ack` sets it again.
    #[cfg(target_os = "linux")]
    #[test]
    fn quick_ack_turns_on_tcp_quickack() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&tcp);
        sock.set_tcp_quickack(false).unwrap();
        assert!(!sock.tcp_quickack().unwrap());
        quick_ack(&tcp);
        assert!(sock.tcp_quickack().unwrap(), "TCP_QUICKACK not set");
    }

    #[test]
    fn the_upgrade_request_names_the_path_the_subprotocol_and_the_headers() {
        let mut cfg = Config::new("c", "broker.example", 443, "t");
        assert!(ws_request_for(&cfg, "broker.example", 443)
            .unwrap()
            .is_none());
        cfg.transport = mqtt_sink_core::Transport::Ws;
        assert!(ws_request_for(&cfg, "broker.example", 443)
            .unwrap()
            .is_some());
        let r = ws_request(&cfg, "broker.example", 443).unwrap();
        assert_eq!(r.uri().to_string(), "wss://broker.example:443/mqtt");
        assert_eq!(r.headers()["Sec-WebSocket-Protocol"], "mqtt");
        cfg.tls_enabled = false;
        cfg.ws_path = Some("/ws?x=1".into());
        cfg.ws_headers.insert(
            "Authorization".into(),
            mqtt_sink_core::Secret::new("Bearer t"),
        );
        let r = ws_request(&cfg, "::1", 8080).unwrap();
        assert_eq!(r.uri().to_string(), "ws://[::1]:8080/ws?x=1");
        assert_eq!(r.headers()["Authorization"], "Bearer t");
        assert_eq!(r.headers()["Host"], "[::1]:8080");
    }
}
