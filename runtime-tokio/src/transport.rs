//! Opening the byte stream to the broker: TCP, optionally TLS, optionally WebSocket on
//! top (`transport = "ws"`). Errors name server, port and cause.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::WebSocketStream;

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
    ws: Option<Request>,
) -> Result<Stream, String> {
    let stream = open_tls(&server, port, tls).await?;
    let Some(request) = ws else {
        return Ok(stream);
    };
    let path = request.uri().path().to_string();
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, None)
        .await
        .map_err(|e| {
            format!(
                "{server}:{port}: WebSocket upgrade of {path} failed: {e}; check ws_path and that this port serves MQTT over WebSocket"
            )
        })?;
    Ok(Box::new(WsIo {
        ws,
        read: Bytes::new(),
        unflushed: false,
    }))
}

async fn open_tls(
    server: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Stream, String> {
    let tcp = TcpStream::connect((server, port))
        .await
        .map_err(|e| format!("{server}:{port}: TCP connect failed: {e}"))?;
    let _ = tcp.set_nodelay(true);
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

/// MQTT bytes over a WebSocket, as a byte stream for the driver: written bytes go out in
/// binary frames of at most [`crate::tls::WS_MAX_FRAME`] bytes; read bytes are the
/// payloads of the broker's binary frames (pings are answered by tungstenite).
struct WsIo {
    ws: WebSocketStream<Stream>,
    /// What is left of the last frame read.
    read: Bytes,
    /// A frame accepted by `poll_write` is not all written yet: `poll_read` (always being
    /// polled while connected) and the next `poll_write` push it out.
    unflushed: bool,
}

fn ws_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(format!("WebSocket: {e}")),
    }
}

impl WsIo {
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(self.ws.poll_flush_unpin(cx)).map_err(ws_error)?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(Err(e)) = this.poll_push(cx) {
            return Poll::Ready(Err(e));
        }
        while this.read.is_empty() {
            match ready!(this.ws.poll_next_unpin(cx)) {
                // The stream ended: the driver reads 0 bytes as the broker closing.
                None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => this.read = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    let e = "the broker sent a WebSocket text frame; MQTT travels in binary frames";
                    return Poll::Ready(Err(io::Error::other(e)));
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map_or_else(
                        || "no reason given".to_string(),
                        |f| format!("code {}, {:?}", u16::from(f.code), f.reason.as_str()),
                    );
                    let e = format!("the broker closed the WebSocket ({why})");
                    return Poll::Ready(Err(io::Error::other(e)));
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What an earlier write accepted goes out before anything more is taken.
        ready!(this.poll_push(cx))?;
        ready!(this.ws.poll_ready_unpin(cx)).map_err(ws_error)?;
        let n = buf.len().min(crate::tls::WS_MAX_FRAME);
        let frame = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
        this.ws.start_send_unpin(frame).map_err(ws_error)?;
        this.unflushed = true;
        if let Poll::Ready(Err(e)) = this.poll_push(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.ws.poll_flush_unpin(cx)).map_err(ws_error)?;
        this.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().ws.poll_close_unpin(cx).map_err(ws_error)
    }
}
