//! MQTT over WebSocket (`transport = "ws"`), sans-IO: tungstenite run over an in-memory
//! pipe, so that the thread that owns the core and the TLS state also owns the WebSocket
//! state and never blocks on it (the blocking runtime's sink thread). Bytes read from the connection go in; MQTT
//! bytes come out; what tungstenite wants written (the upgrade request, frames, pongs, the
//! close) is taken out and written below (TLS or TCP).

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use tungstenite::handshake::client::{ClientHandshake, Request};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::{Bytes, Message, WebSocket};

/// tungstenite's side of the connection: what was read waits in `rx`, what it writes
/// collects in `tx`. Reading an empty pipe is `WouldBlock`: "wait for more bytes".
#[derive(Debug, Default)]
struct Pipe {
    rx: VecDeque<u8>,
    tx: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rx.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.rx.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum State {
    /// The upgrade request is out; the MQTT bytes written meanwhile wait for the answer.
    Upgrading {
        handshake: Box<MidHandshake<ClientHandshake<Pipe>>>,
        queued: Vec<u8>,
    },
    Open(Box<WebSocket<Pipe>>),
    /// Failed or closed: nothing more goes in or out.
    Done,
}

/// Why a WebSocket upgrade failed, for both the sans-IO layer and the tokio stream.
pub(crate) fn upgrade_failed(path: &str, e: &tungstenite::Error) -> String {
    format!(
        "WebSocket upgrade of {path} failed: {e}; check ws_path and that this port serves MQTT over WebSocket"
    )
}

/// A text frame from the broker ends the connection with this.
pub(crate) const TEXT_FRAME: &str =
    "the broker sent a WebSocket text frame; MQTT travels in binary frames";

/// A close frame from the broker ends the connection with this (code and reason).
pub(crate) fn closed(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    let why = frame.map_or_else(
        || "no reason given".to_string(),
        |f| format!("code {}, {:?}", u16::from(f.code), f.reason.as_str()),
    );
    format!("the broker closed the WebSocket ({why})")
}

/// One connection's WebSocket.
#[allow(missing_debug_implementations)]
pub struct WsLayer {
    state: State,
    /// The path asked for, for error messages.
    path: String,
}

impl WsLayer {
    /// Starts the upgrade: [`take_output`](Self::take_output) has the request.
    pub fn start(request: Request) -> Result<Self, String> {
        let path = request.uri().path().to_string();
        let failed = |e: tungstenite::Error| format!("WebSocket upgrade failed: {e}");
        let handshake = match ClientHandshake::start(Pipe::default(), request, None)
            .map_err(failed)?
            .handshake()
        {
            Err(HandshakeError::Interrupted(h)) => Box::new(h),
            Err(HandshakeError::Failure(e)) => return Err(failed(e)),
            Ok(_) => return Err("WebSocket upgrade failed: done before any answer".into()),
        };
        let queued = Vec::new();
        let state = State::Upgrading { handshake, queued };
        Ok(Self { state, path })
    }

    fn pipe(&mut self) -> Option<&mut Pipe> {
        match &mut self.state {
            State::Upgrading { handshake, .. } => Some(handshake.get_mut().get_mut()),
            State::Open(ws) => Some(ws.get_mut()),
            State::Done => None,
        }
    }

    /// What is to be written to the connection now.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.pipe()
            .map(|p| std::mem::take(&mut p.tx))
            .unwrap_or_default()
    }

    /// MQTT bytes to send: binary frames of at most [`crate::WS_MAX_FRAME`] bytes,
    /// once the upgrade is done (until then they wait).
    pub fn write(&mut self, mqtt: &[u8]) -> Result<(), String> {
        match &mut self.state {
            State::Upgrading { queued, .. } => queued.extend_from_slice(mqtt),
            State::Open(ws) => {
                let failed = |e: tungstenite::Error| format!("WebSocket write failed: {e}");
                for chunk in mqtt.chunks(crate::WS_MAX_FRAME) {
                    let frame = Message::Binary(Bytes::copy_from_slice(chunk));
                    ws.write(frame).map_err(failed)?;
                }
                ws.flush().map_err(failed)?;
            }
            State::Done => return Err("the WebSocket is closed".into()),
        }
        Ok(())
    }

    /// Bytes read from the connection: the MQTT bytes they carry go to `mqtt`.
    pub fn read(&mut self, data: &[u8], mqtt: &mut Vec<u8>) -> Result<(), String> {
        let Some(pipe) = self.pipe() else {
            return Err("the WebSocket is closed".into());
        };
        pipe.rx.extend(data);
        if let State::Upgrading { .. } = self.state {
            let State::Upgrading { handshake, queued } =
                std::mem::replace(&mut self.state, State::Done)
            else {
                unreachable!("matched above")
            };
            match (*handshake).handshake() {
                Err(HandshakeError::Interrupted(h)) => {
                    let handshake = Box::new(h);
                    self.state = State::Upgrading { handshake, queued };
                    return Ok(());
                }
                Err(HandshakeError::Failure(e)) => return Err(upgrade_failed(&self.path, &e)),
                Ok((ws, _)) => {
                    self.state = State::Open(Box::new(ws));
                    self.write(&queued)?;
                }
            }
        }
        let State::Open(ws) = &mut self.state else {
            return Ok(());
        };
        loop {
            match ws.read() {
                Ok(Message::Binary(b)) => mqtt.extend_from_slice(&b),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Text(_)) => {
                    self.state = State::Done;
                    return Err(TEXT_FRAME.into());
                }
                Ok(Message::Close(frame)) => {
                    self.state = State::Done;
                    return Err(closed(frame.as_ref()));
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.state = State::Done;
                    return Err(format!("WebSocket read failed: {e}"));
                }
            }
        }
        // Pongs answering pings go out with the next write.
        ws.flush()
            .map_err(|e| format!("WebSocket write failed: {e}"))
    }

    /// Starts the closing handshake: the close frame is in [`take_output`](Self::take_output).
    pub fn close(&mut self) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tungstenite::handshake::server::{Request as ServerRequest, Response};

    /// A tungstenite server on its own pipe, answering with subprotocol `mqtt`.
    fn server_accepting(request: &[u8]) -> (WebSocket<Pipe>, Vec<u8>) {
        let mut pipe = Pipe::default();
        pipe.rx.extend(request);
        let callback = |_: &ServerRequest, mut r: Response| {
            r.headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
            Ok(r)
        };
        let mut ws = tungstenite::accept_hdr(pipe, callback).unwrap();
        let answer = std::mem::take(&mut ws.get_mut().tx);
        (ws, answer)
    }

    fn request() -> Request {
        let mut cfg = mqtt_sink_core::Config::new("c", "127.0.0.1", 80, "t");
        cfg.transport = mqtt_sink_core::Transport::Ws;
        cfg.tls_enabled = false;
        crate::ws_request(&cfg, "127.0.0.1", 80).unwrap()
    }

    #[test]
    fn mqtt_bytes_written_during_the_upgrade_follow_it_in_binary_frames_both_ways() {
        let mut ws = WsLayer::start(request()).unwrap();
        let upgrade = ws.take_output();
        assert!(upgrade.starts_with(b"GET /mqtt HTTP/1.1\r\n"));
        assert!(String::from_utf8_lossy(&upgrade)
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqtt"));
        ws.write(b"CONNECT").unwrap();
        assert!(ws.take_output().is_empty(), "nothing before the answer");
        let (mut server, answer) = server_accepting(&upgrade);
        let mut mqtt = Vec::new();
        // The answer arrives in two pieces: nothing happens until it is whole.
        ws.read(&answer[..10], &mut mqtt).unwrap();
        assert!(ws.take_output().is_empty());
        ws.read(&answer[10..], &mut mqtt).unwrap();
        server.get_mut().rx.extend(ws.take_output());
        assert_eq!(server.read().unwrap(), Message::binary(&b"CONNECT"[..]));
        // A large batch goes in frames of at most WS_MAX_FRAME bytes.
        let big = vec![7u8; crate::WS_MAX_FRAME * 2 + 1];
        ws.write(&big).unwrap();
        server.get_mut().rx.extend(ws.take_output());
        let mut got = Vec::new();
        for _ in 0..3 {
            let Message::Binary(b) = server.read().unwrap() else {
                panic!("binary frames")
            };
            assert!(b.len() <= crate::WS_MAX_FRAME);
            got.extend_from_slice(&b);
        }
        assert_eq!(got, big);
        // The broker's frames (and a ping between them) come out as one byte stream.
        server.send(Message::binary(&b"CONN"[..])).unwrap();
        server
            .send(Message::Ping(Bytes::from_static(b"p")))
            .unwrap();
        server.send(Message::binary(&b"ACK"[..])).unwrap();
        let frames = std::mem::take(&mut server.get_mut().tx);
        ws.read(&frames, &mut mqtt).unwrap();
        assert_eq!(mqtt, b"CONNACK");
        server.get_mut().rx.extend(ws.take_output());
        assert_eq!(
            server.read().unwrap(),
            Message::Pong(Bytes::from_static(b"p"))
        );
    }

    #[test]
    fn a_refused_upgrade_names_the_path_and_the_status() {
        let mut ws = WsLayer::start(request()).unwrap();
        let _ = ws.take_output();
        let answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        let e = ws.read(answer, &mut Vec::new()).unwrap_err();
        assert!(e.contains("WebSocket upgrade of /mqtt failed"), "{e}");
        assert!(e.contains("404"), "{e}");
        assert!(e.contains("check ws_path"), "{e}");
    }

    #[test]
    fn a_text_frame_or_a_close_ends_the_connection_with_the_reason() {
        for (frame, want) in [
            (Message::text("hello"), "text frame"),
            (
                Message::Close(Some(tungstenite::protocol::CloseFrame {
                    code: tungstenite::protocol::frame::coding::CloseCode::Away,
                    reason: "bye".into(),
                })),
                "the broker closed the WebSocket (code 1001, \"bye\")",
            ),
        ] {
            let mut ws = WsLayer::start(request()).unwrap();
            let (mut server, answer) = server_accepting(&ws.take_output());
            ws.read(&answer, &mut Vec::new()).unwrap();
            server.send(frame).unwrap();
            let frames = std::mem::take(&mut server.get_mut().tx);
            let e = ws.read(&frames, &mut Vec::new()).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(ws.write(b"x").is_err());
        }
    }
}
