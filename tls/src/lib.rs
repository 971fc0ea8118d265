//! What the runtimes share about the transport: the rustls client configuration from the
//! sink's TLS options (ring is the only provider) and the WebSocket upgrade request.

use std::sync::Arc;

use mqtt_sink_core::{Config, ConfigErrors};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

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

/// The WebSocket upgrade request for `server`:`port` with `transport = "ws"`:
/// `ws://` (`wss://` with TLS, which the runtime has already set up underneath) at
/// `ws_path`, subprotocol `mqtt`, plus `ws_headers`. Errors name the options.
pub fn ws_request(
    cfg: &Config,
    server: &str,
    port: u16,
) -> Result<tungstenite::handshake::client::Request, String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_request_names_the_path_the_subprotocol_and_the_headers() {
        let mut cfg = Config::new("c", "broker.example", 443, "t");
        cfg.transport = mqtt_sink_core::Transport::Ws;
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
