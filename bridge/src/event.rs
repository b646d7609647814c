//! The event: one device message as Vigil stores and forwards it.
//!
//! The gate turns an MQTT PUBLISH into an [`Ingest`]; the store gives it its
//! identity ([`Event::id`], [`Event::device_seq`]) in the same commit that
//! makes it durable; the forwarder wraps the [`Event`] in the cloud envelope.
//!
//! # Canonical encoding (what [`Event::compute_sha256`] covers)
//!
//! The digest covers every field, in this order, so any consumer can
//! recompute it without knowing Rust or postcard. Integers are big-endian,
//! strings are UTF-8, and `len` is a u32 byte count:
//!
//! ```text
//! u8    canonical encoding version (1)
//! [16]  id (UUID v7 bytes)
//! u8    kind          (0 measurement, 1 alert, 2 gap notice)
//! u8    priority
//! len + device        (MQTT client id)
//! u64   device_seq
//! len + topic
//! u8    qos           (0, 1 or 2)
//! u8    retain        (0 or 1)
//! i64   received_at   (microseconds since the Unix epoch, UTC)
//! u8    content type present (0/1), then len + content type if present
//! u32   number of user properties, then len + key, len + value for each
//! len + payload
//! ```

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Version of the canonical encoding hashed by [`Event::compute_sha256`].
pub const CANONICAL_VERSION: u8 = 1;

/// The client id under which Vigil itself emits events (gap notices). The gate
/// refuses devices that claim it.
pub const VIGIL_DEVICE: &str = "$vigil";

/// What a message is. Topic rules in the gate decide it for device messages.
///
/// Serde names are kebab-case (`measurement`, `alert`, `gap-notice`), as in the
/// configuration; postcard stores the variant index, so names never reach disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A periodic reading (vital signs, waveforms, status).
    Measurement,
    /// An alarm: never evicted when it is at priority 0.
    Alert,
    /// Emitted by the store when eviction removed device messages.
    GapNotice,
}

impl Kind {
    /// The kind's code in the canonical encoding.
    pub fn code(self) -> u8 {
        match self {
            Kind::Measurement => 0,
            Kind::Alert => 1,
            Kind::GapNotice => 2,
        }
    }

    /// The kind's name in the envelope and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Measurement => "measurement",
            Kind::Alert => "alert",
            Kind::GapNotice => "gap-notice",
        }
    }
}

/// A point in time, as microseconds since the Unix epoch (UTC).
///
/// A wall-clock reading is only a label: ordering always comes from sequence
/// numbers, so a gateway booting at 1970 mislabels messages but never reorders
/// or drops them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system(std::time::SystemTime::now())
    }

    /// Converts a `SystemTime`, saturating far outside ±292,000 years.
    pub fn from_system(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// Converts back to a `SystemTime`.
    pub fn to_system(self) -> std::time::SystemTime {
        let magnitude = std::time::Duration::from_micros(self.0.unsigned_abs());
        if self.0 >= 0 {
            std::time::UNIX_EPOCH + magnitude
        } else {
            std::time::UNIX_EPOCH - magnitude
        }
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-22T10:00:00.000123Z`.
    pub fn to_rfc3339(self) -> String {
        self.rfc3339().to_string()
    }

    /// [`Self::to_rfc3339`] without the `String`: formats where it is written.
    pub fn rfc3339(self) -> impl std::fmt::Display {
        humantime::format_rfc3339_micros(self.to_system())
    }

    /// How long ago this was, or zero if it is in the future.
    pub fn age(self, now: Timestamp) -> std::time::Duration {
        std::time::Duration::from_micros(u64::try_from(now.0.saturating_sub(self.0)).unwrap_or(0))
    }
}

/// MQTT quality of service of the device's publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Qos {
    /// At most once.
    AtMostOnce,
    /// At least once.
    AtLeastOnce,
    /// Exactly once.
    ExactlyOnce,
}

impl Qos {
    /// 0, 1 or 2.
    pub fn level(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        }
    }
}

/// What the gate hands the store: a device message before the store gives it
/// its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingest {
    /// Measurement or alert (from the topic rules).
    pub kind: Kind,
    /// 0 is the highest; must be below the store's configured priority count.
    pub priority: u8,
    /// The device's MQTT client id.
    pub device: String,
    /// The topic the device published to.
    pub topic: String,
    /// The device's QoS.
    pub qos: Qos,
    /// The device's retain flag.
    pub retain: bool,
    /// When the gate read the publish.
    pub received_at: Timestamp,
    /// MQTT 5 content type, if the device set one.
    pub content_type: Option<String>,
    /// MQTT 5 user properties, in the device's order.
    pub user_properties: Vec<(String, String)>,
    /// The payload, opaque to Vigil.
    pub payload: Bytes,
}

/// A stored event. Field order is the postcard encoding: see the warning below.
///
/// **On-disk format.** This struct is encoded with postcard behind
/// [`crate::store::record::EVENT_FORMAT`]. Do not reorder, remove or retype
/// fields; add a new format version instead and keep decoding the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable identity (UUID v7) for cloud-side de-duplication.
    pub id: Uuid,
    /// Measurement, alert or gap notice.
    pub kind: Kind,
    /// 0 is the highest.
    pub priority: u8,
    /// The device's MQTT client id ([`VIGIL_DEVICE`] for gap notices).
    pub device: String,
    /// Per-device sequence number: starts at 1, never repeats, survives restarts.
    pub device_seq: u64,
    /// The device's topic.
    pub topic: String,
    /// The device's QoS.
    pub qos: Qos,
    /// The device's retain flag.
    pub retain: bool,
    /// When the gate read the publish.
    pub received_at: Timestamp,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
    /// The payload.
    pub payload: Bytes,
}

impl Event {
    /// Gives an ingested message its identity.
    pub fn from_ingest(ingest: Ingest, id: Uuid, device_seq: u64) -> Self {
        Event {
            id,
            kind: ingest.kind,
            priority: ingest.priority,
            device: ingest.device,
            device_seq,
            topic: ingest.topic,
            qos: ingest.qos,
            retain: ingest.retain,
            received_at: ingest.received_at,
            content_type: ingest.content_type,
            user_properties: ingest.user_properties,
            payload: ingest.payload,
        }
    }

    /// The SHA-256 of the canonical encoding (see the module docs): a
    /// fingerprint of every field, printed by `vigil inspect --events`.
    /// Computed when asked for, not stored: the AES-GCM tag already
    /// authenticates every stored field (body format 1 stored it; see
    /// [`crate::store::record::EVENT_FORMAT_WITH_DIGEST`]).
    pub fn compute_sha256(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut bytes = |b: &[u8]| h.update(b);
        bytes(&[CANONICAL_VERSION]);
        bytes(self.id.as_bytes());
        bytes(&[self.kind.code(), self.priority]);
        let text = |b: &[u8], h: &mut Sha256| {
            h.update(u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
            h.update(b);
        };
        text(self.device.as_bytes(), &mut h);
        h.update(self.device_seq.to_be_bytes());
        text(self.topic.as_bytes(), &mut h);
        h.update([self.qos.level(), u8::from(self.retain)]);
        h.update(self.received_at.0.to_be_bytes());
        match &self.content_type {
            Some(ct) => {
                h.update([1]);
                text(ct.as_bytes(), &mut h);
            }
            None => h.update([0]),
        }
        h.update(
            u32::try_from(self.user_properties.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for (k, v) in &self.user_properties {
            text(k.as_bytes(), &mut h);
            text(v.as_bytes(), &mut h);
        }
        text(&self.payload, &mut h);
        h.finalize().into()
    }

    /// [`Self::compute_sha256`] as lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex(&self.compute_sha256())
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Ingest {
        Ingest {
            kind: Kind::Measurement,
            priority: 1,
            device: "monitor-7".into(),
            topic: "devices/monitor-7/vitals/hr".into(),
            qos: Qos::AtLeastOnce,
            retain: false,
            received_at: Timestamp(1_763_800_000_000_000),
            content_type: Some("application/json".into()),
            user_properties: vec![("unit".into(), "bpm".into())],
            payload: Bytes::from_static(br#"{"hr":72}"#),
        }
    }

    #[test]
    fn digest_covers_every_field() {
        let base = Event::from_ingest(sample(), Uuid::nil(), 1);
        let digest = base.compute_sha256();
        assert_eq!(base.clone().compute_sha256(), digest);
        type Mutation = Box<dyn Fn(&mut Event)>;
        let mutations: Vec<Mutation> = vec![
            Box::new(|e| e.id = Uuid::max()),
            Box::new(|e| e.kind = Kind::Alert),
            Box::new(|e| e.priority = 0),
            Box::new(|e| e.device.push('x')),
            Box::new(|e| e.device_seq = 2),
            Box::new(|e| e.topic.push('x')),
            Box::new(|e| e.qos = Qos::AtMostOnce),
            Box::new(|e| e.retain = true),
            Box::new(|e| e.received_at = Timestamp(0)),
            Box::new(|e| e.content_type = None),
            Box::new(|e| e.user_properties.clear()),
            Box::new(|e| e.payload = Bytes::from_static(b"{}")),
        ];
        for m in mutations {
            let mut e = base.clone();
            m(&mut e);
            assert_ne!(e.compute_sha256(), digest, "{e:?}");
        }
    }

    #[test]
    fn length_prefixes_prevent_field_aliasing() {
        let mut a = sample();
        a.device = "ab".into();
        a.topic = "c".into();
        let mut b = sample();
        b.device = "a".into();
        b.topic = "bc".into();
        let ea = Event::from_ingest(a, Uuid::nil(), 1);
        let eb = Event::from_ingest(b, Uuid::nil(), 1);
        assert_ne!(ea.compute_sha256(), eb.compute_sha256());
    }

    #[test]
    fn timestamps_round_trip_and_format() {
        let t = Timestamp(1_763_800_000_123_456);
        assert_eq!(Timestamp::from_system(t.to_system()), t);
        assert_eq!(t.to_rfc3339(), "2025-11-22T08:26:40.123456Z");
        let before = Timestamp(-5);
        assert_eq!(Timestamp::from_system(before.to_system()), before);
    }
}
