//! The cloud's side of Vigil's envelope (version 1, documented in the
//! README): parse it, recover the payload bytes exactly as the device sent
//! them, and check them against `sha256`. Written from the documentation,
//! independently of Vigil's encoder, so the oracle does not trust the code it
//! judges.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// The envelope version this checker understands.
pub const VERSION: u8 = 1;

/// The device name of Vigil's own gap notices.
pub const VIGIL_DEVICE: &str = "$vigil";

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The `kind` of Vigil's gap notices.
pub const GAP_NOTICE_KIND: &str = "gap-notice";

/// A gap notice's payload (README, "Gap notices"): messages of one device at
/// one priority that Vigil evicted because its store quota was full. Read
/// from the documented JSON, not with Vigil's types.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GapNotice {
    /// The device whose messages were evicted.
    pub device: String,
    /// Their priority.
    pub priority: u8,
    /// The first evicted device sequence number.
    pub first_seq: u64,
    /// The last.
    pub last_seq: u64,
    /// How many of the device's messages in `first_seq..=last_seq` were
    /// evicted (messages of other priorities interleave and were not).
    pub count: u64,
}

impl GapNotice {
    /// Whether it can be true: seqs from 1, `first_seq <= last_seq`, and a
    /// `count` from 1 to the numbers in that range.
    pub fn is_consistent(&self) -> bool {
        self.first_seq >= 1
            && self.last_seq >= self.first_seq
            && self.count >= 1
            && self.count - 1 <= self.last_seq - self.first_seq
    }
}

/// Parses a gap notice's payload and checks that it is consistent
/// ([`GapNotice::is_consistent`]).
pub fn gap_notice(payload: &[u8]) -> Result<GapNotice, EnvelopeError> {
    let bad = |m: String| EnvelopeError::Malformed(format!("gap notice: {m}"));
    let n: GapNotice = serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
    if !n.is_consistent() {
        return Err(bad(format!(
            "count {} of seqs {}..={} cannot be (seqs start at 1; count from 1 to the range's size)",
            n.count, n.first_seq, n.last_seq
        )));
    }
    Ok(n)
}

/// A cloud's view of an envelope: what a subscriber needs to verify it. A reference
/// for cloud teams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `id`.
    pub id: String,
    /// `device`.
    pub device: String,
    /// `seq`.
    pub seq: u64,
    /// `priority`.
    pub priority: u8,
    /// `kind`.
    pub kind: String,
    /// The payload bytes as the device sent them.
    pub payload: Vec<u8>,
}

/// Why an envelope does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a JSON object with the version-1 members.
    #[error("not a version-{VERSION} envelope: {0}")]
    Malformed(String),
    /// The payload does not hash to `sha256`.
    #[error("payload does not match its sha256 (envelope {id})")]
    Digest {
        /// The envelope's id.
        id: String,
    },
}

/// Parses an envelope and checks its payload against `sha256`.
pub fn verify(envelope: &[u8]) -> Result<Received, EnvelopeError> {
    #[derive(serde::Deserialize)]
    struct Members {
        v: u8,
        id: String,
        device: String,
        seq: u64,
        priority: u8,
        kind: String,
        sha256: String,
        payload_encoding: String,
        payload: serde_json::Value,
    }
    let bad = |m: String| EnvelopeError::Malformed(m);
    let m: Members = serde_json::from_slice(envelope).map_err(|e| bad(e.to_string()))?;
    if m.v != VERSION {
        return Err(bad(format!("version {}", m.v)));
    }
    let payload = match m.payload_encoding.as_str() {
        "json" => {
            const MARK: &[u8] = b",\"payload\":";
            let start = envelope
                .windows(MARK.len())
                .position(|w| w == MARK)
                .ok_or_else(|| bad("no payload member".into()))?
                + MARK.len();
            let end = envelope.len().saturating_sub(1);
            envelope
                .get(start..end)
                .ok_or_else(|| bad("truncated".into()))?
                .to_vec()
        }
        "base64" => {
            let text = m
                .payload
                .as_str()
                .ok_or_else(|| bad("base64 payload is not a string".into()))?;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| bad(format!("payload: {e}")))?
        }
        other => return Err(bad(format!("payload_encoding {other:?}"))),
    };
    if hex(&Sha256::digest(&payload)) != m.sha256 {
        return Err(EnvelopeError::Digest { id: m.id });
    }
    Ok(Received {
        id: m.id,
        device: m.device,
        seq: m.seq,
        priority: m.priority,
        kind: m.kind,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_gap_notice_parses() {
        let n = gap_notice(
            br#"{"device":"bed-4","priority":3,"first_seq":120,"last_seq":388,"count":200,
 "first_received_at":"2026-11-22T10:00:00.000000Z","last_received_at":"2026-11-22T10:04:27.000000Z",
 "reason":"evicted: the store quota was full"}"#,
        )
        .unwrap();
        assert_eq!(
            n,
            GapNotice {
                device: "bed-4".into(),
                priority: 3,
                first_seq: 120,
                last_seq: 388,
                count: 200,
            }
        );
    }

    #[test]
    fn an_inconsistent_gap_notice_is_refused() {
        for bad in [
            r#"{"device":"b","priority":3,"first_seq":9,"last_seq":8,"count":1}"#,
            r#"{"device":"b","priority":3,"first_seq":8,"last_seq":9,"count":3}"#,
            r#"{"device":"b","priority":3,"first_seq":8,"last_seq":9,"count":0}"#,
            r#"{"device":"b","priority":3,"first_seq":0,"last_seq":9,"count":1}"#,
            r#"{"device":"b","priority":3,"first_seq":8}"#,
            "not json",
        ] {
            let e = gap_notice(bad.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("gap notice"), "{bad}: {e}");
        }
    }
}
