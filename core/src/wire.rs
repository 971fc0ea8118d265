//! The MQTT wire codec: `mqttbytes` behind guards for its known bugs.
//!
//! `mqttbytes` 0.6 is used to encode CONNECT (3.1.1, 5) and PUBLISH and to read MQTT 5
//! CONNACK and DISCONNECT properties. Its known defects, and the guard for each:
//! - no MQTT 3.1 CONNECT: [`encode_connect`] hand-encodes it ("MQIsdp", level 3);
//! - a bodiless MQTT 5 DISCONNECT (legal) is rejected: DISCONNECT is decoded here;
//! - topics and strings over 65535 bytes get a truncated length prefix (corrupt packet):
//!   every string is checked before encoding;
//! - a failed write leaves partial bytes in the buffer: every encode goes to a scratch
//!   buffer that is discarded on error;
//! - `valid_topic("")` is true and `matches` panics on non-ASCII: neither is called; topics
//!   are checked by [`crate::topic`];
//! - reason codes outside its enums fail the whole packet: acknowledgements, whose reason
//!   byte is all the core needs, are decoded here.
//!
//! Nothing outside this module names an `mqttbytes` type.

use bytes::{Buf, Bytes, BytesMut};
use mqttbytes::{v4, v5};

use crate::config::{MqttVersion, PublishProperties};
use crate::topic;
use crate::QoS;

/// Largest remaining length MQTT can encode.
const MAX_REMAINING: usize = 268_435_455;

/// Encoding or decoding failed; the message says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireError(pub(crate) String);

impl From<mqttbytes::Error> for WireError {
    fn from(e: mqttbytes::Error) -> Self {
        WireError(format!("{e:?}"))
    }
}

fn str_ok(what: &str, s: &str) -> Result<(), WireError> {
    if s.len() > 65_535 {
        return Err(WireError(format!(
            "{what} is {} bytes; MQTT strings hold at most 65535",
            s.len()
        )));
    }
    Ok(())
}

/// Runs an mqttbytes writer on a scratch buffer, so that a failure leaves `out` untouched.
fn guarded(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>,
) -> Result<(), WireError> {
    let mut scratch = BytesMut::with_capacity(64);
    write(&mut scratch)?;
    out.extend_from_slice(&scratch);
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// What goes into CONNECT (its `Debug` leaves the password out).
pub(crate) struct ConnectParams<'a> {
    pub(crate) version: MqttVersion,
    pub(crate) client_id: &'a str,
    pub(crate) clean: bool,
    pub(crate) keepalive_secs: u16,
    pub(crate) username: Option<&'a str>,
    pub(crate) password: Option<&'a str>,
    /// MQTT 5: Session Expiry Interval.
    pub(crate) session_expiry: u32,
    /// MQTT 5: the largest packet the client accepts.
    pub(crate) max_incoming_packet: u32,
}

/// Appends a CONNECT packet to `out`.
pub(crate) fn encode_connect(p: &ConnectParams<'_>, out: &mut Vec<u8>) -> Result<(), WireError> {
    str_ok("client id", p.client_id)?;
    str_ok("username", p.username.unwrap_or(""))?;
    str_ok("password", p.password.unwrap_or(""))?;
    match p.version {
        MqttVersion::V31 => {
            // mqttbytes cannot write 3.1: protocol name "MQIsdp", level 3.
            let mut flags = 0u8;
            if p.clean {
                flags |= 0x02;
            }
            let mut body = Vec::with_capacity(32 + p.client_id.len());
            put_str(&mut body, b"MQIsdp");
            body.push(3);
            let flags_at = body.len();
            body.push(0);
            body.extend_from_slice(&p.keepalive_secs.to_be_bytes());
            put_str(&mut body, p.client_id.as_bytes());
            if let Some(u) = p.username {
                flags |= 0x80;
                put_str(&mut body, u.as_bytes());
                if let Some(pw) = p.password {
                    flags |= 0x40;
                    put_str(&mut body, pw.as_bytes());
                }
            }
            body[flags_at] = flags;
            out.push(0x10);
            put_varint(out, body.len());
            out.extend_from_slice(&body);
            Ok(())
        }
        MqttVersion::V311 => {
            // mqttbytes omits empty user names; 3.1.1 needs the username flag with a
            // password, so an empty username is not sent (validated in config).
            let login = p.username.map(|u| v4::Login {
                username: u.to_string(),
                password: p.password.unwrap_or("").to_string(),
            });
            let c = v4::Connect {
                protocol: mqttbytes::Protocol::V4,
                keep_alive: p.keepalive_secs,
                client_id: p.client_id.to_string(),
                clean_session: p.clean,
                last_will: None,
                login,
            };
            guarded(out, |b| c.write(b))
        }
        MqttVersion::V5 => {
            let login = (p.username.is_some() || p.password.is_some()).then(|| v5::Login {
                username: p.username.unwrap_or("").to_string(),
                password: p.password.unwrap_or("").to_string(),
            });
            let props = v5::ConnectProperties {
                session_expiry_interval: (p.session_expiry > 0).then_some(p.session_expiry),
                receive_maximum: None,
                max_packet_size: Some(p.max_incoming_packet),
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            };
            let c = v5::Connect {
                protocol: mqttbytes::Protocol::V5,
                keep_alive: p.keepalive_secs,
                client_id: p.client_id.to_string(),
                clean_session: p.clean,
                last_will: None,
                login,
                properties: Some(props),
            };
            guarded(out, |b| c.write(b))
        }
    }
}

/// An encoded PUBLISH, kept until acknowledged so that resends cost no re-encoding.
#[derive(Debug, Clone)]
pub(crate) struct EncodedPublish {
    /// The packet; for QoS > 0 its packet id is patched in with [`set_pkid`].
    pub(crate) bytes: Vec<u8>,
    /// Where the packet id sits (QoS > 0).
    pub(crate) pkid_at: Option<usize>,
}

/// The parts of a PUBLISH.
#[derive(Debug)]
pub(crate) struct PublishParts<'a> {
    pub(crate) version: MqttVersion,
    pub(crate) topic: &'a str,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) properties: Option<&'a PublishProperties>,
    pub(crate) payload: Bytes,
}

/// Remaining length of the PUBLISH these parts encode to.
fn publish_remaining(p: &PublishParts<'_>) -> usize {
    let mut remaining = 2 + p.topic.len() + p.payload.len();
    if p.qos != QoS::AtMostOnce {
        remaining += 2;
    }
    if p.version == MqttVersion::V5 {
        let props = p.properties.map_or(0, PublishProperties::wire_len);
        remaining += varint_len(props) + props;
    }
    remaining
}

/// Size of the PUBLISH packet these parts encode to, without encoding it.
pub(crate) fn publish_len(p: &PublishParts<'_>) -> usize {
    let remaining = publish_remaining(p);
    1 + varint_len(remaining) + remaining
}

/// Encodes a PUBLISH with packet id 1 as a placeholder (QoS > 0).
pub(crate) fn encode_publish(p: PublishParts<'_>) -> Result<EncodedPublish, WireError> {
    // The sink applied `string_policy` to the topic before; here only what MQTT forbids.
    topic::check_topic_allowing(p.topic, true).map_err(|e| WireError(e.to_string()))?;
    let remaining = publish_remaining(&p);
    if remaining > MAX_REMAINING {
        return Err(WireError(format!(
            "the PUBLISH would hold {remaining} bytes after its header; MQTT allows at most {MAX_REMAINING}"
        )));
    }
    let total = 1 + varint_len(remaining) + remaining;
    let topic_len = p.topic.len();
    let qos = match p.qos {
        QoS::AtMostOnce => mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => mqttbytes::QoS::ExactlyOnce,
    };
    let pkid = if p.qos == QoS::AtMostOnce { 0 } else { 1 };
    let mut buf = BytesMut::with_capacity(total);
    match p.version {
        MqttVersion::V31 | MqttVersion::V311 => v4::Publish {
            dup: false,
            qos,
            retain: p.retain,
            topic: p.topic.to_string(),
            pkid,
            payload: p.payload,
        }
        .write(&mut buf)?,
        MqttVersion::V5 => {
            let properties = match p.properties {
                Some(pp) => {
                    if let Some((field, _, rule)) = pp.problems(true).into_iter().next() {
                        return Err(WireError(format!("property {field}: {rule}")));
                    }
                    Some(v5::PublishProperties {
                        payload_format_indicator: pp.payload_format_indicator,
                        message_expiry_interval: pp.message_expiry_interval,
                        topic_alias: None,
                        response_topic: pp.response_topic.clone(),
                        correlation_data: pp.correlation_data.clone(),
                        user_properties: pp.user_properties.clone(),
                        subscription_identifiers: Vec::new(),
                        content_type: pp.content_type.clone(),
                    })
                }
                None => None,
            };
            v5::Publish {
                dup: false,
                qos,
                retain: p.retain,
                topic: p.topic.to_string(),
                pkid,
                properties,
                payload: p.payload,
            }
            .write(&mut buf)?
        }
    };
    debug_assert_eq!(buf.len(), total);
    let pkid_at = (p.qos != QoS::AtMostOnce).then(|| 1 + varint_len(remaining) + 2 + topic_len);
    Ok(EncodedPublish {
        bytes: buf.to_vec(),
        pkid_at,
    })
}

/// Writes the packet id into an encoded PUBLISH (QoS > 0).
pub(crate) fn set_pkid(p: &mut EncodedPublish, pkid: u16) {
    if let Some(at) = p.pkid_at {
        p.bytes[at..at + 2].copy_from_slice(&pkid.to_be_bytes());
    }
}

/// The topic of an encoded PUBLISH.
pub(crate) fn publish_topic(p: &EncodedPublish) -> &[u8] {
    let (hdr, _) = match frame(&p.bytes) {
        Ok(Some(f)) => f,
        _ => return &[],
    };
    let len = u16::from_be_bytes([p.bytes[hdr], p.bytes[hdr + 1]]) as usize;
    &p.bytes[hdr + 2..hdr + 2 + len]
}

/// Writes an encoded MQTT 5 PUBLISH with a Topic Alias property: with the topic (to set
/// up the alias) or with an empty topic (to use it). The stored packet is not changed, so
/// a resend on a new connection goes out plain.
pub(crate) fn write_aliased(p: &EncodedPublish, alias: u16, with_topic: bool, out: &mut Vec<u8>) {
    let b = &p.bytes;
    let Ok(Some((hdr, _))) = frame(b) else {
        out.extend_from_slice(b);
        return;
    };
    let tlen = u16::from_be_bytes([b[hdr], b[hdr + 1]]) as usize;
    let topic = &b[hdr + 2..hdr + 2 + tlen];
    let mut at = hdr + 2 + tlen;
    let pkid = if p.pkid_at.is_some() {
        at += 2;
        &b[at - 2..at]
    } else {
        &[][..]
    };
    // The properties length varint, then the properties, then the payload.
    let Ok(Some((vlen, plen))) = frame(&b[at - 1..]).map(|f| f.map(|(h, r)| (h - 1, r))) else {
        out.extend_from_slice(b);
        return;
    };
    let props = &b[at + vlen..at + vlen + plen];
    let payload = &b[at + vlen + plen..];
    let topic = if with_topic { topic } else { &[][..] };
    let new_plen = plen + 3;
    let remaining = 2 + topic.len() + pkid.len() + varint_len(new_plen) + new_plen + payload.len();
    out.push(b[0]);
    put_varint(out, remaining);
    put_str(out, topic);
    out.extend_from_slice(pkid);
    put_varint(out, new_plen);
    out.push(0x23);
    out.extend_from_slice(&alias.to_be_bytes());
    out.extend_from_slice(props);
    out.extend_from_slice(payload);
}

/// Sets or clears the DUP flag of an encoded PUBLISH.
pub(crate) fn set_dup(p: &mut EncodedPublish, dup: bool) {
    if dup {
        p.bytes[0] |= 0x08;
    } else {
        p.bytes[0] &= !0x08;
    }
}

/// Lowers an encoded QoS 2 PUBLISH to QoS 1 (or raises it back): the packet id stays.
/// QoS 0 has no packet id, so a packet never changes to or from it here.
pub(crate) fn set_qos(p: &mut EncodedPublish, qos: QoS) {
    if p.pkid_at.is_some() && qos != QoS::AtMostOnce {
        p.bytes[0] = (p.bytes[0] & !0x06) | ((qos as u8) << 1);
    }
}

/// Appends a PUBREL.
pub(crate) fn encode_pubrel(pkid: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x62, 0x02]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends a PUBACK (QoS 1 publish received from the broker).
pub(crate) fn encode_puback(pkid: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x40, 0x02]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends a PUBREC (QoS 2 publish received from the broker).
pub(crate) fn encode_pubrec(pkid: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x50, 0x02]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends a PUBCOMP (answer to the broker's PUBREL).
pub(crate) fn encode_pubcomp(pkid: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x70, 0x02]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends a PINGREQ.
pub(crate) fn encode_pingreq(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xC0, 0x00]);
}

/// Appends a DISCONNECT; MQTT 5 with a reason code (0 = normal, sent bodiless).
pub(crate) fn encode_disconnect(version: MqttVersion, reason: u8, out: &mut Vec<u8>) {
    if version == MqttVersion::V5 && reason != 0 {
        out.extend_from_slice(&[0xE0, 0x02, reason, 0x00]);
    } else {
        out.extend_from_slice(&[0xE0, 0x00]);
    }
}

impl std::fmt::Debug for ConnectParams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean", &self.clean)
            .field("keepalive_secs", &self.keepalive_secs)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "***"))
            .field("session_expiry", &self.session_expiry)
            .field("max_incoming_packet", &self.max_incoming_packet)
            .finish()
    }
}

/// MQTT 5 DISCONNECT (normal) with Session Expiry Interval 0: the session ends with the
/// connection (allowed whatever the CONNECT's expiry was, since the value is 0).
pub(crate) fn encode_disconnect_ending_session(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0]);
}

/// What the broker's CONNACK told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConnAckProps {
    pub(crate) receive_maximum: Option<u16>,
    pub(crate) maximum_packet_size: Option<u32>,
    pub(crate) topic_alias_maximum: Option<u16>,
    pub(crate) maximum_qos: Option<u8>,
    pub(crate) retain_available: Option<bool>,
    pub(crate) assigned_client_id: Option<String>,
    pub(crate) server_keep_alive: Option<u16>,
    pub(crate) reason_string: Option<String>,
}

/// A packet from the broker, reduced to what the publisher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    ConnAck {
        session_present: bool,
        code: u8,
        props: ConnAckProps,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
        reason: u8,
    },
    /// A PUBLISH from the broker (from subscriptions of an old session): the core
    /// acknowledges it and otherwise ignores it.
    Publish {
        qos: u8,
        pkid: u16,
    },
    PingResp,
    Disconnect {
        reason: u8,
        reason_string: Option<String>,
    },
}

/// Frames and decodes packets from the broker, in any chunking.
#[derive(Debug)]
pub(crate) struct Decoder {
    buf: BytesMut,
    max_packet: usize,
}

impl Decoder {
    pub(crate) fn new(max_packet: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_packet,
        }
    }

    /// Forgets buffered bytes (a new connection).
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete packet, `Ok(None)` when more bytes are needed.
    pub(crate) fn next(&mut self, version: MqttVersion) -> Result<Option<Incoming>, WireError> {
        let Some((hdr_len, remaining)) = frame(&self.buf)? else {
            return Ok(None);
        };
        let total = hdr_len + remaining;
        if total > self.max_packet {
            return Err(WireError(format!(
                "the broker sent a {total}-byte packet; the limit is {}",
                self.max_packet
            )));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let packet = self.buf.split_to(total).freeze();
        decode(version, packet, hdr_len).map(Some)
    }
}

/// Parses a fixed header: `(header length, remaining length)`, or `None` if incomplete.
fn frame(buf: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(WireError("malformed remaining length".into()))
}

fn decode(version: MqttVersion, packet: Bytes, hdr_len: usize) -> Result<Incoming, WireError> {
    let byte1 = packet[0];
    let mut body = packet.slice(hdr_len..);
    let need = |body: &Bytes, n: usize, what: &str| {
        if body.len() < n {
            Err(WireError(format!("{what} is truncated")))
        } else {
            Ok(())
        }
    };
    let v5 = version == MqttVersion::V5;
    match byte1 >> 4 {
        2 => {
            need(&body, 2, "CONNACK")?;
            let session_present = body[0] & 1 == 1;
            let code = body[1];
            let mut props = ConnAckProps::default();
            if v5 && body.len() > 2 {
                // mqttbytes rejects codes outside its enum; the code is read above, and the
                // properties are best taken from mqttbytes when it can parse them.
                let fh = mqttbytes::check(packet.iter(), usize::MAX)?;
                if let Ok(ack) = v5::ConnAck::read(fh, packet.clone()) {
                    if let Some(p) = ack.properties {
                        props = ConnAckProps {
                            receive_maximum: p.receive_max,
                            maximum_packet_size: p.max_packet_size,
                            topic_alias_maximum: p.topic_alias_max,
                            maximum_qos: p.max_qos,
                            retain_available: p.retain_available.map(|r| r != 0),
                            assigned_client_id: p.assigned_client_identifier,
                            server_keep_alive: p.server_keep_alive,
                            reason_string: p.reason_string,
                        };
                    }
                } else if code == 0 {
                    return Err(WireError("CONNACK properties are malformed".into()));
                }
            }
            Ok(Incoming::ConnAck {
                session_present,
                code,
                props,
            })
        }
        t @ (4..=7) => {
            // PUBREL's flags are 0010, PUBACK's, PUBREC's and PUBCOMP's 0000.
            let flags = if t == 6 { 0x02 } else { 0x00 };
            if byte1 & 0x0F != flags {
                let name = ["PUBACK", "PUBREC", "PUBREL", "PUBCOMP"][usize::from(t - 4)];
                return Err(WireError(format!("{name} has wrong fixed-header flags")));
            }
            need(&body, 2, "acknowledgement")?;
            let pkid = body.get_u16();
            if pkid == 0 {
                return Err(WireError("acknowledgement with packet id 0".into()));
            }
            let reason = if v5 && !body.is_empty() { body[0] } else { 0 };
            Ok(match t {
                4 => Incoming::PubAck { pkid, reason },
                5 => Incoming::PubRec { pkid, reason },
                6 => Incoming::PubRel { pkid },
                _ => Incoming::PubComp { pkid, reason },
            })
        }
        3 => {
            let qos = (byte1 >> 1) & 0x03;
            if qos == 3 {
                return Err(WireError("PUBLISH with QoS 3".into()));
            }
            need(&body, 2, "PUBLISH")?;
            let tlen = body.get_u16() as usize;
            need(&body, tlen, "PUBLISH topic")?;
            body.advance(tlen);
            let pkid = if qos > 0 {
                need(&body, 2, "PUBLISH")?;
                match body.get_u16() {
                    0 => return Err(WireError("PUBLISH with QoS > 0 and packet id 0".into())),
                    id => id,
                }
            } else {
                0
            };
            Ok(Incoming::Publish { qos, pkid })
        }
        13 if byte1 & 0x0F != 0 || !body.is_empty() => Err(WireError(
            "PINGRESP with flags or a body (its remaining length must be 0)".into(),
        )),
        13 => Ok(Incoming::PingResp),
        14 => {
            // A bodiless DISCONNECT is legal in MQTT 5 (reason 0); mqttbytes rejects it.
            let reason = body.first().copied().unwrap_or(0);
            let reason_string = if v5 && body.len() > 2 {
                let fh = mqttbytes::check(packet.iter(), usize::MAX)?;
                v5::Disconnect::read(fh, packet.clone())
                    .ok()
                    .and_then(|d| d.properties)
                    .and_then(|p| p.reason_string)
            } else {
                None
            };
            Ok(Incoming::Disconnect {
                reason,
                reason_string,
            })
        }
        t => Err(WireError(format!(
            "unexpected packet type {t} from the broker (a publisher never receives it)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Review L4: the CONNECT parameters' `Debug` never shows the password.
    #[test]
    fn connect_params_debug_masks_the_password() {
        let p = ConnectParams {
            version: MqttVersion::V311,
            client_id: "abc",
            clean: true,
            keepalive_secs: 60,
            username: Some("u"),
            password: Some("s3cret-value"),
            session_expiry: 0,
            max_incoming_packet: 1024,
        };
        let shown = format!("{p:?} {p:#?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    #[test]
    fn v31_connect_is_hand_encoded() {
        let mut out = Vec::new();
        let p = ConnectParams {
            version: MqttVersion::V31,
            client_id: "abc",
            clean: true,
            keepalive_secs: 60,
            username: Some("u"),
            password: Some("p"),
            session_expiry: 0,
            max_incoming_packet: 1024,
        };
        encode_connect(&p, &mut out).unwrap();
        let expected: Vec<u8> = [
            &[0x10, 23][..],
            &[0, 6],
            b"MQIsdp",
            &[3, 0xC2, 0, 60],
            &[0, 3],
            b"abc",
            &[0, 1],
            b"u",
            &[0, 1],
            b"p",
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn publish_pkid_patch_and_dup() {
        for version in [MqttVersion::V311, MqttVersion::V5] {
            for payload_len in [0usize, 100, 200, 20_000] {
                let props = PublishProperties {
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                let parts = PublishParts {
                    version,
                    topic: "a/b",
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Some(&props),
                    payload: Bytes::from(vec![7u8; payload_len]),
                };
                let len = publish_len(&parts);
                let mut p = encode_publish(parts).unwrap();
                assert_eq!(p.bytes.len(), len);
                set_pkid(&mut p, 0xBEEF);
                set_dup(&mut p, true);
                let at = p.pkid_at.unwrap();
                assert_eq!(&p.bytes[at..at + 2], &[0xBE, 0xEF]);
                assert_eq!(p.bytes[0], 0x3B);
            }
        }
    }

    #[test]
    fn aliased_publish_round_trips_through_mqttbytes() {
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        for (qos, with_topic) in [
            (QoS::AtLeastOnce, true),
            (QoS::AtLeastOnce, false),
            (QoS::AtMostOnce, true),
        ] {
            let mut p = encode_publish(PublishParts {
                version: MqttVersion::V5,
                topic: "a/b",
                qos,
                retain: false,
                properties: Some(&props),
                payload: Bytes::from_static(b"hello"),
            })
            .unwrap();
            set_pkid(&mut p, 9);
            assert_eq!(publish_topic(&p), b"a/b");
            let mut out = Vec::new();
            write_aliased(&p, 3, with_topic, &mut out);
            let mut buf = BytesMut::from(&out[..]);
            match v5::read(&mut buf, 1 << 20).unwrap() {
                v5::Packet::Publish(pb) => {
                    assert_eq!(pb.topic, if with_topic { "a/b" } else { "" });
                    let pr = pb.properties.unwrap();
                    assert_eq!(pr.topic_alias, Some(3));
                    assert_eq!(pr.content_type.as_deref(), Some("text/plain"));
                    assert_eq!(&pb.payload[..], b"hello");
                    assert_eq!(pb.pkid, if qos == QoS::AtMostOnce { 0 } else { 9 });
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Review L10: fixed-header flags of PUBACK, PUBREC and PUBCOMP, the remaining length
    /// of PINGRESP and the packet id of a QoS > 0 PUBLISH are checked (each used to decode).
    #[test]
    fn malformed_acks_pings_and_publishes_are_refused() {
        let cases: [(&[u8], &str); 6] = [
            (
                &[0x41, 0x02, 0x00, 0x01],
                "PUBACK has wrong fixed-header flags",
            ),
            (
                &[0x58, 0x02, 0x00, 0x01],
                "PUBREC has wrong fixed-header flags",
            ),
            (
                &[0x71, 0x02, 0x00, 0x01],
                "PUBCOMP has wrong fixed-header flags",
            ),
            (
                &[0x60, 0x02, 0x00, 0x01],
                "PUBREL has wrong fixed-header flags",
            ),
            (&[0xD0, 0x01, 0x00], "PINGRESP with flags or a body"),
            (
                &[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00],
                "PUBLISH with QoS > 0 and packet id 0",
            ),
        ];
        for version in [MqttVersion::V311, MqttVersion::V5] {
            for (bytes, want) in cases {
                let mut d = Decoder::new(1 << 20);
                d.push(bytes);
                let e = d.next(version).unwrap_err();
                assert!(e.0.contains(want), "{bytes:02x?}: {e:?}");
            }
            let mut d = Decoder::new(1 << 20);
            d.push(&[0x40, 0x02, 0x00, 0x01, 0xD0, 0x00, 0x62, 0x02, 0x00, 0x01]);
            for _ in 0..3 {
                assert!(
                    d.next(version).unwrap().is_some(),
                    "well-formed packets decode"
                );
            }
        }
    }

    #[test]
    fn decode_any_chunking_and_bodiless_disconnect() {
        let stream = [
            &[0x20, 0x02, 0x01, 0x00][..],
            &[0x40, 0x03, 0x00, 0x05, 0x87],
            &[0xE0, 0x00],
        ]
        .concat();
        for chunk in 1..stream.len() {
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                d.push(c);
                while let Some(p) = d.next(MqttVersion::V5).unwrap() {
                    got.push(p);
                }
            }
            assert_eq!(
                got,
                vec![
                    Incoming::ConnAck {
                        session_present: true,
                        code: 0,
                        props: ConnAckProps::default()
                    },
                    Incoming::PubAck {
                        pkid: 5,
                        reason: 0x87
                    },
                    Incoming::Disconnect {
                        reason: 0,
                        reason_string: None
                    },
                ]
            );
        }
    }

    #[test]
    fn failed_encode_leaves_nothing_behind() {
        let long = "x".repeat(70_000);
        let parts = PublishParts {
            version: MqttVersion::V311,
            topic: &long,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            payload: Bytes::new(),
        };
        assert!(encode_publish(parts).is_err());
        let mut out = vec![1, 2, 3];
        let p = ConnectParams {
            version: MqttVersion::V311,
            client_id: &long,
            clean: true,
            keepalive_secs: 0,
            username: None,
            password: None,
            session_expiry: 0,
            max_incoming_packet: 1024,
        };
        assert!(encode_connect(&p, &mut out).is_err());
        assert_eq!(out, vec![1, 2, 3]);
    }
}
