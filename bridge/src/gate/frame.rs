//! MQTT framing on the raw byte stream, and the few packets the gate writes
//! itself.
//!
//! Frames are cut from the stream here rather than by a decoder so that:
//! - the remaining length is checked against the limit *before* anything is
//!   read or allocated for it (a 256 MB claim costs nothing);
//! - the buffer grows only as bytes actually arrive (at most 64 KiB ahead);
//! - a packet must arrive within `frame_timeout` of its first byte, and a
//!   device silent for longer than its keep-alive allows is cut off;
//! - the original bytes can be passed on to the broker unchanged while the
//!   decoded packet is inspected.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// MQTT control packet types (upper nibble of the first byte).
pub mod kind {
    /// CONNECT
    pub const CONNECT: u8 = 1;
    /// CONNACK
    pub const CONNACK: u8 = 2;
    /// PUBLISH
    pub const PUBLISH: u8 = 3;
    /// PUBACK
    pub const PUBACK: u8 = 4;
    /// PUBREC
    pub const PUBREC: u8 = 5;
    /// PUBCOMP
    pub const PUBCOMP: u8 = 7;
    /// SUBSCRIBE
    pub const SUBSCRIBE: u8 = 8;
    /// UNSUBSCRIBE
    pub const UNSUBSCRIBE: u8 = 10;
    /// PINGREQ
    pub const PINGREQ: u8 = 12;
    /// PINGRESP
    pub const PINGRESP: u8 = 13;
    /// DISCONNECT
    pub const DISCONNECT: u8 = 14;
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The remaining-length field is longer than 4 bytes.
    #[error("malformed remaining length")]
    MalformedLength,
    /// A packet claims more bytes than allowed; nothing of it was read.
    #[error("packet of {claimed} bytes is over the {max}-byte limit (gate.max_packet_size)")]
    TooLarge {
        /// The claimed remaining length.
        claimed: usize,
        /// The limit.
        max: usize,
    },
    /// The peer closed the connection in the middle of a packet.
    #[error("connection closed in the middle of a packet")]
    Truncated,
    /// Nothing arrived within the keep-alive allowance (1.5 × keep-alive).
    #[error("no packet for {0:?} (1.5 x the keep-alive)")]
    Idle(Duration),
    /// A packet did not complete within `gate.frame_timeout` of its first byte.
    #[error("packet not complete {0:?} after its first byte (gate.frame_timeout)")]
    Stalled(Duration),
}

/// One whole MQTT packet as it came off the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Fixed header, variable header and payload.
    pub bytes: Bytes,
    /// Length of the fixed header (2 to 5).
    pub header_len: usize,
}

impl Frame {
    /// The packet type (1 = CONNECT ... 15 = AUTH).
    pub fn kind(&self) -> u8 {
        self.bytes.first().map_or(0, |b| b >> 4)
    }

    /// The packet id that starts the variable header of PUBACK, PUBREC,
    /// PUBREL and PUBCOMP.
    pub fn ack_pkid(&self) -> Option<u16> {
        let b = self.bytes.get(self.header_len..self.header_len + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A copy the rumqttc decoders can consume.
    pub fn to_buf(&self) -> BytesMut {
        BytesMut::from(&self.bytes[..])
    }
}

/// Parses a fixed header: `Ok(None)` if more bytes are needed, else
/// `(header length, remaining length)`.
pub fn parse_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(FrameError::MalformedLength)
}

/// Reads frames from one side of a connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_packet: usize,
    frame_timeout: Duration,
    idle: Option<Duration>,
}

/// How far the buffer may grow ahead of the bytes that arrived.
const READ_AHEAD: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader allowing packets of up to `max_packet` remaining bytes.
    pub fn new(inner: R, max_packet: usize, frame_timeout: Duration) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(4096),
            max_packet,
            frame_timeout,
            idle: None,
        }
    }

    /// Sets how long the peer may stay silent between packets (`None`: forever).
    pub fn set_idle(&mut self, idle: Option<Duration>) {
        self.idle = idle;
    }

    /// The next frame, or `None` when the peer closed cleanly between packets.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut started = (!self.buf.is_empty()).then(Instant::now);
        loop {
            if let Some((header_len, remaining)) = parse_header(&self.buf)? {
                if remaining > self.max_packet {
                    return Err(FrameError::TooLarge {
                        claimed: remaining,
                        max: self.max_packet,
                    });
                }
                let len = header_len + remaining;
                if self.buf.len() >= len {
                    let bytes = self.buf.split_to(len).freeze();
                    return Ok(Some(Frame { bytes, header_len }));
                }
                self.buf.reserve((len - self.buf.len()).min(READ_AHEAD));
            } else {
                self.buf.reserve(64);
            }
            let read = self.inner.read_buf(&mut self.buf);
            let n = match started {
                Some(at) => {
                    let deadline = at + self.frame_timeout;
                    match tokio::time::timeout_at(deadline, read).await {
                        Ok(n) => n?,
                        Err(_) => return Err(FrameError::Stalled(self.frame_timeout)),
                    }
                }
                None => match self.idle {
                    Some(idle) => match tokio::time::timeout(idle, read).await {
                        Ok(n) => n?,
                        Err(_) => return Err(FrameError::Idle(idle)),
                    },
                    None => read.await?,
                },
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            started.get_or_insert_with(Instant::now);
        }
    }
}

/// The protocol a CONNECT asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (level 4).
    V4,
    /// MQTT 5 (level 5).
    V5,
    /// MQTT 3.1 (`MQIsdp`, level 3) or another level: refused.
    Unsupported(u8),
}

/// Reads the protocol name and level from a CONNECT frame.
pub fn connect_protocol(frame: &Frame) -> Option<Protocol> {
    let mut b = frame.bytes.slice(frame.header_len..);
    if b.remaining() < 2 {
        return None;
    }
    let name_len = usize::from(b.get_u16());
    if b.remaining() < name_len + 1 {
        return None;
    }
    let name = b.split_to(name_len);
    let level = b.get_u8();
    match (&name[..], level) {
        (b"MQTT", 4) => Some(Protocol::V4),
        (b"MQTT", 5) => Some(Protocol::V5),
        (b"MQTT" | b"MQIsdp", other) => Some(Protocol::Unsupported(other)),
        _ => None,
    }
}

/// A PUBACK (or PUBREC when `qos2`) for `pkid`; with an MQTT 5 reason code
/// when `reason` is given.
pub fn ack(pkid: u16, qos2: bool, reason: Option<u8>) -> Bytes {
    let first = if qos2 { 0x50 } else { 0x40 };
    let [hi, lo] = pkid.to_be_bytes();
    match reason {
        None => Bytes::from(vec![first, 0x02, hi, lo]),
        Some(code) => Bytes::from(vec![first, 0x03, hi, lo, code]),
    }
}

/// A PUBACK for `pkid`, success, MQTT 3.1.1 and 5 alike: the gate's own
/// acknowledgement of a committed QoS 1 publish, built where it is written.
pub fn puback(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 0x02, hi, lo]
}

/// A PINGREQ.
pub fn pingreq() -> Bytes {
    Bytes::from_static(&[kind::PINGREQ << 4, 0])
}

/// A PUBREL for `pkid` (MQTT 3.1.1 and 5 both accept the short form).
pub fn pubrel(pkid: u16) -> Bytes {
    let [hi, lo] = pkid.to_be_bytes();
    Bytes::from(vec![0x62, 0x02, hi, lo])
}

/// A CONNACK refusing the connection with `code` (3.1.1 return code or
/// MQTT 5 reason code).
pub fn connack_refusal(protocol: Protocol, code: u8) -> Bytes {
    match protocol {
        Protocol::V5 => Bytes::from(vec![0x20, 0x03, 0x00, code, 0x00]),
        _ => Bytes::from(vec![0x20, 0x02, 0x00, code]),
    }
}

/// An MQTT 5 DISCONNECT with `reason`.
pub fn disconnect_v5(reason: u8) -> Bytes {
    Bytes::from(vec![0xe0, 0x01, reason])
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8], max: usize) -> Vec<Result<Option<Frame>, String>> {
        let mut r = FrameReader::new(bytes, max, Duration::from_secs(1));
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(Some(f)) => out.push(Ok(Some(f))),
                Ok(None) => {
                    out.push(Ok(None));
                    return out;
                }
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_are_cut_at_their_length() {
        let stream = [0xc0, 0x00, 0x40, 0x02, 0x00, 0x07, 0xd0, 0x00];
        let out = read_all(&stream, 100).await;
        assert_eq!(out.len(), 4);
        let f = out[1].as_ref().unwrap().as_ref().unwrap();
        assert_eq!((f.kind(), f.ack_pkid()), (kind::PUBACK, Some(7)));
        assert!(matches!(out[3], Ok(None)));
    }

    #[tokio::test]
    async fn oversized_claims_are_refused_before_reading() {
        // 0x30 PUBLISH claiming 268,435,455 bytes, then nothing.
        let out = read_all(&[0x30, 0xff, 0xff, 0xff, 0x7f], 1024).await;
        assert!(
            out[0].as_ref().unwrap_err().contains("268435455"),
            "{out:?}"
        );
        let out = read_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1024).await;
        assert!(
            out[0].as_ref().unwrap_err().contains("malformed"),
            "{out:?}"
        );
        let out = read_all(&[0x30, 0x05, 0x00], 1024).await;
        assert!(out[0].as_ref().unwrap_err().contains("middle"), "{out:?}");
    }

    #[tokio::test]
    async fn a_stalled_packet_times_out_without_allocating_its_claim() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, &[0x30, 0xff, 0xff, 0x7f])
            .await
            .unwrap();
        let mut r = FrameReader::new(server, 4 << 20, Duration::from_millis(100));
        let err = r.next().await.unwrap_err();
        assert!(matches!(err, FrameError::Stalled(_)), "{err}");
        assert!(
            r.buf.capacity() <= READ_AHEAD + 4096,
            "{}",
            r.buf.capacity()
        );
    }

    #[test]
    fn protocol_levels() {
        let frame = |b: &[u8]| Frame {
            bytes: Bytes::copy_from_slice(b),
            header_len: 2,
        };
        let v4 = frame(&[0x10, 0x0a, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60]);
        assert_eq!(connect_protocol(&v4), Some(Protocol::V4));
        let v5 = frame(&[0x10, 0x0a, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60]);
        assert_eq!(connect_protocol(&v5), Some(Protocol::V5));
        let v3 = frame(&[0x10, 0x0a, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3]);
        assert_eq!(connect_protocol(&v3), Some(Protocol::Unsupported(3)));
        assert_eq!(connect_protocol(&frame(&[0x10, 0x01, 0])), None);
    }
}
