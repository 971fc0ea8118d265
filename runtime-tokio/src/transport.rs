//! Opening the byte stream to the broker: TCP, optionally TLS, optionally WebSocket on
//! top (`transport = "ws"`). Errors name server, port and cause.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mqtt_sink_tls::WsRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream to the broker.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub(crate) type Stream = Box<dyn Io>;

/// Resolves `server`, connects TCP (with NODELAY: publishes are already coalesced by the
/// core), performs the TLS handshake with SNI = `server` if `tls` is set, then the
/// WebSocket upgrade if `ws` is set.
pub(crate) async fn open(
    server: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    ws: Option<WsRequest>,
    quick_ack: Arc<AtomicBool>,
) -> Result<Stream, String> {
    let stream = open_tls(&server, port, tls, quick_ack).await?;
    let Some(request) = ws else {
        return Ok(stream);
    };
    let ws = mqtt_sink_tls::ws_connect(stream, request).await;
    Ok(Box::new(ws.map_err(|e| format!("{server}:{port}: {e}"))?))
}

async fn open_tls(
    server: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    wanted: Arc<AtomicBool>,
) -> Result<Stream, String> {
    let tcp = TcpStream::connect((server, port))
        .await
        .map_err(|e| format!("{server}:{port}: TCP connect failed: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tcp = mqtt_sink_tls::QuickAckTcp { tcp, wanted };
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = crate::tls::server_name(server)?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{server}:{port}: TLS handshake failed: {e}"))?;
    Ok(Box::new(stream))
}
