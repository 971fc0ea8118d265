//! MQTT over WebSocket on tokio (`transport = "ws"`, feature `tokio`): tokio-tungstenite
//! behind a byte stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket upgrade over `stream` (TCP, or TLS already set up): the MQTT byte stream
/// on top. The error names the path and the cause.
pub async fn ws_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    request: Request,
) -> Result<WsIo<S>, String> {
    let path = request.uri().path().to_string();
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, None)
        .await
        .map_err(|e| crate::ws::upgrade_failed(&path, &e))?;
    Ok(WsIo {
        ws,
        read: Bytes::new(),
        unflushed: false,
    })
}

/// MQTT bytes over a WebSocket, as a byte stream for the driver: written bytes go out in
/// binary frames of at most [`crate::WS_MAX_FRAME`] bytes; read bytes are the
/// payloads of the broker's binary frames (pings are answered by tungstenite).
#[allow(missing_debug_implementations)]
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
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

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(self.ws.poll_flush_unpin(cx)).map_err(ws_error)?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
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
                    return Poll::Ready(Err(io::Error::other(crate::ws::TEXT_FRAME)));
                }
                Some(Ok(Message::Close(frame))) => {
                    let e = crate::ws::closed(frame.as_ref());
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

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What an earlier write accepted goes out before anything more is taken.
        ready!(this.poll_push(cx))?;
        ready!(this.ws.poll_ready_unpin(cx)).map_err(ws_error)?;
        let n = buf.len().min(crate::WS_MAX_FRAME);
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
