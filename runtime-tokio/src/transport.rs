//! Opening the byte stream to the broker: TCP, optionally TLS. Errors name server, port
//! and cause.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream to the broker.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub(crate) type Stream = Box<dyn Io>;

/// Resolves `server`, connects TCP (with NODELAY: publishes are already coalesced by the
/// core), then performs the TLS handshake with SNI = `server` if `tls` is set.
pub(crate) async fn open(
    server: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Stream, String> {
    let tcp = TcpStream::connect((server.as_str(), port))
        .await
        .map_err(|e| format!("{server}:{port}: TCP connect failed: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = crate::tls::server_name(&server)?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{server}:{port}: TLS handshake failed: {e}"))?;
    Ok(Box::new(stream))
}
