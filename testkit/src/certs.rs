//! A throwaway PKI for TLS tests: a CA, a server certificate for localhost/127.0.0.1, a
//! client certificate for mutual TLS, and an unrelated CA (the wrong one).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM files written into a directory.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing here.
    pub wrong_ca: PathBuf,
    /// Server certificate (localhost, 127.0.0.1).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// A server certificate for `localhost` only, and its key.
    pub localhost_only: (PathBuf, PathBuf),
    /// A server certificate for `127.0.0.1` only, and its key: with `localhost_only`, a
    /// client that checks one address's certificate against the other's name fails.
    pub ip_only: (PathBuf, PathBuf),
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

impl TestPki {
    /// Generates the PKI into `dir` (created if needed), readable by every user (Mosquitto
    /// started as root reads its keys as user `mosquitto`).
    pub fn generate(dir: &Path) -> Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("test PKI: {e}");
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let ca_issuer = ca("mqtt-sink test CA").map_err(|e| err(&e))?;
        let wrong = ca("some other CA").map_err(|e| err(&e))?;
        let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String), rcgen::Error> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &ca_issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost").map_err(|e| err(&e))?;
        let (localhost_pem, localhost_key) =
            leaf(vec!["localhost".into()], "localhost").map_err(|e| err(&e))?;
        let (ip_pem, ip_key) = leaf(vec!["127.0.0.1".into()], "127.0.0.1").map_err(|e| err(&e))?;
        let (client_pem, client_key) =
            leaf(vec!["mqtt-sink-client".into()], "mqtt-sink-client").map_err(|e| err(&e))?;
        let pki = Self {
            ca: dir.join("ca.pem"),
            wrong_ca: dir.join("wrong-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            localhost_only: (dir.join("localhost.pem"), dir.join("localhost.key")),
            ip_only: (dir.join("ip.pem"), dir.join("ip.key")),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, pem) in [
            (&pki.ca, ca_issuer.pem()),
            (&pki.wrong_ca, wrong.pem()),
            (&pki.server_cert, server_pem),
            (&pki.server_key, server_key),
            (&pki.localhost_only.0, localhost_pem),
            (&pki.localhost_only.1, localhost_key),
            (&pki.ip_only.0, ip_pem),
            (&pki.ip_only.1, ip_key),
            (&pki.client_cert, client_pem),
            (&pki.client_key, client_key),
        ] {
            std::fs::write(path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let _ = std::process::Command::new("chmod")
            .arg("-R")
            .arg("a+rX")
            .arg(dir)
            .status();
        Ok(pki)
    }
}
