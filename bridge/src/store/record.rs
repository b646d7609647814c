//! The on-disk record format: keys, sealed values, and the bodies they carry.
//!
//! ```text
//! key   = seq: u64, big-endian (so fjall's byte order is sequence order)
//! value = format: u8 (= RECORD_FORMAT)
//!         epoch:  u32, big-endian (the boot epoch the record was sealed in)
//!         AES-256-GCM( body_format: u8 || postcard(body) ) || tag[16]
//!           nonce = epoch || seq
//!           aad   = store id, keyspace name, seq, RECORD_FORMAT (crypto::RecordContext)
//! ```
//!
//! Bodies ([`Body`]): an [`Event`] in the priority lanes ([`EVENT_FORMAT`]), a
//! [`DeadLetterEntry`] in `dead-letter` ([`DEAD_LETTER_FORMAT`]). Quarantine
//! entries are not sealed again: they keep the original sealed bytes as found,
//! with a cleartext note of where they were and why they were moved.
//!
//! Body formats written before 2026-11-30 ([`EVENT_FORMAT_WITH_DIGEST`],
//! [`DEAD_LETTER_FORMAT_WITH_DIGEST`]) also carried the event's SHA-256 of its
//! canonical encoding, right after its fields. It protected nothing the
//! AES-GCM tag does not (the tag authenticates every byte of the body) and cost
//! the store writer a tenth of its time and 32 bytes a record; those records
//! are still read, and their digest is checked when they are.
//!
//! **Warning.** These layouts are on disk. Never change a field's order or type:
//! add a new format version and keep reading the old ones.

use byteview::ByteView;
use fjall::Slice;
use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, DataKey, Nonce, RecordContext};
use crate::event::{Event, Timestamp};

/// Version of the sealed value layout (header + ciphertext).
pub const RECORD_FORMAT: u8 = 1;
/// Body format: a postcard-encoded [`Event`].
pub const EVENT_FORMAT: u8 = 2;
/// Body format: a postcard-encoded [`DeadLetterEntry`].
pub const DEAD_LETTER_FORMAT: u8 = 0x82;
/// Body format written until 2026-11-30, still read: the event's fields as in
/// [`EVENT_FORMAT`], then the 32-byte SHA-256 of its canonical encoding
/// ([`Event::compute_sha256`]).
pub const EVENT_FORMAT_WITH_DIGEST: u8 = 1;
/// Body format written until 2026-11-30, still read: a [`DeadLetterEntry`]
/// whose event is followed by its 32-byte digest, as in
/// [`EVENT_FORMAT_WITH_DIGEST`].
pub const DEAD_LETTER_FORMAT_WITH_DIGEST: u8 = 0x81;
/// Format of a (cleartext) [`QuarantineEntry`].
pub const QUARANTINE_FORMAT: u8 = 1;
/// Bytes before the ciphertext: format byte and epoch.
pub const HEADER_LEN: usize = 5;
/// Bytes a key takes.
pub const KEY_LEN: usize = 8;

/// Why a stored value could not be turned back into its body.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The value is shorter than the header.
    #[error("value of {len} bytes is shorter than the {HEADER_LEN}-byte record header")]
    TooShort {
        /// Length found.
        len: usize,
    },
    /// The header names a record format this build does not know.
    #[error("unknown record format {0} (this build reads format {RECORD_FORMAT})")]
    UnknownFormat(u8),
    /// Authentication failed: see [`CryptoError`].
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The plaintext carries a body format other than the one expected here.
    #[error("body format {found:#x} where {expected:#x} was expected")]
    WrongBody {
        /// Found.
        found: u8,
        /// Expected.
        expected: u8,
    },
    /// The plaintext authenticated but does not decode (a bug, or a newer writer).
    #[error("authenticated body does not decode: {0}")]
    Decode(#[from] postcard::Error),
    /// A key is not 8 bytes.
    #[error("key of {0} bytes is not an 8-byte sequence number")]
    BadKey(usize),
    /// A record of an old body format authenticated, but the digest stored
    /// with its event does not match the event's fields: the event was
    /// damaged before it was sealed (a bug in the Vigil that wrote it).
    #[error(
        "the SHA-256 stored with the event (body format {format:#x}) does not match its fields"
    )]
    DigestMismatch {
        /// The body format.
        format: u8,
    },
}

/// What a sealed record carries: the format this build writes it in, and how
/// every format of it that was ever written is read.
pub trait Body: Serialize + Sized {
    /// The body format [`Seal::seal`] writes.
    const FORMAT: u8;
    /// Decodes `bytes`, written in body format `format`.
    fn decode(format: u8, bytes: &[u8]) -> Result<Self, RecordError>;
}

impl Body for Event {
    const FORMAT: u8 = EVENT_FORMAT;

    fn decode(format: u8, bytes: &[u8]) -> Result<Self, RecordError> {
        match format {
            EVENT_FORMAT => Ok(postcard::from_bytes(bytes)?),
            EVENT_FORMAT_WITH_DIGEST => Ok(event_with_digest(format, bytes)?.0),
            found => Err(RecordError::WrongBody {
                found,
                expected: EVENT_FORMAT,
            }),
        }
    }
}

impl Body for DeadLetterEntry {
    const FORMAT: u8 = DEAD_LETTER_FORMAT;

    fn decode(format: u8, bytes: &[u8]) -> Result<Self, RecordError> {
        match format {
            DEAD_LETTER_FORMAT => Ok(postcard::from_bytes(bytes)?),
            DEAD_LETTER_FORMAT_WITH_DIGEST => {
                let (event, rest) = event_with_digest(format, bytes)?;
                let (original_seq, reason, dead_lettered_at) = postcard::from_bytes(rest)?;
                Ok(DeadLetterEntry {
                    event,
                    original_seq,
                    reason,
                    dead_lettered_at,
                })
            }
            found => Err(RecordError::WrongBody {
                found,
                expected: DEAD_LETTER_FORMAT,
            }),
        }
    }
}

/// Reads an event followed by its digest (the old body formats), checks the
/// digest, and returns the event and the bytes after it.
fn event_with_digest(format: u8, bytes: &[u8]) -> Result<(Event, &[u8]), RecordError> {
    let (event, rest) = postcard::take_from_bytes::<Event>(bytes)?;
    let (digest, rest) = postcard::take_from_bytes::<[u8; 32]>(rest)?;
    if event.compute_sha256() != digest {
        return Err(RecordError::DigestMismatch { format });
    }
    Ok((event, rest))
}

/// A record moved out of the queue for good, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterEntry {
    /// The event as it was queued.
    pub event: Event,
    /// The store sequence number it had in its lane.
    pub original_seq: u64,
    /// Why it was moved (e.g. the cloud's PUBACK reason code).
    pub reason: String,
    /// When it was moved.
    pub dead_lettered_at: Timestamp,
}

/// A stored value that failed to authenticate or decode, kept as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The keyspace the value was found in.
    pub keyspace: String,
    /// The key it was found under.
    pub seq: u64,
    /// What was wrong with it.
    pub reason: String,
    /// When it was moved.
    pub quarantined_at: Timestamp,
    /// The value exactly as it was on disk.
    pub raw: Vec<u8>,
}

/// Encodes a sequence number as a key.
pub fn key(seq: u64) -> [u8; KEY_LEN] {
    seq.to_be_bytes()
}

/// Decodes a key.
pub fn seq_of(key: &[u8]) -> Result<u64, RecordError> {
    let bytes: [u8; KEY_LEN] = key.try_into().map_err(|_| RecordError::BadKey(key.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Where a record is sealed: everything but the body.
#[derive(Debug, Clone, Copy)]
pub struct Seal<'a> {
    /// The store's data key.
    pub key: &'a DataKey,
    /// The store's id.
    pub store_id: &'a [u8; 16],
    /// The keyspace the value goes into.
    pub keyspace: &'a str,
    /// Its key.
    pub seq: u64,
}

impl Seal<'_> {
    fn context(&self) -> RecordContext<'_> {
        RecordContext {
            store_id: self.store_id,
            keyspace: self.keyspace,
            seq: self.seq,
            format: RECORD_FORMAT,
        }
    }

    /// Seals `body` under `epoch`, in the body format this build writes.
    pub fn seal<T: Body>(&self, epoch: u32, body: &T) -> Result<Slice, RecordError> {
        self.seal_as(epoch, T::FORMAT, body)
    }

    /// Seals `body` tagged as body format `body_format`: [`Self::seal`], and
    /// the known-answer tests of formats no longer written.
    ///
    /// Sealed in place in the one allocation fjall keeps: sized exactly
    /// once (growing a buffer by doubling cost a realloc and a copy per
    /// record on the writer thread), and not copied from a `Vec` into
    /// fjall's own buffer on insert (an allocation, a copy and a free).
    fn seal_as<T: Serialize>(
        &self,
        epoch: u32,
        body_format: u8,
        body: &T,
    ) -> Result<Slice, RecordError> {
        let body_len = postcard::experimental::serialized_size(body)?;
        let len = HEADER_LEN + 1 + body_len + crate::crypto::TAG_LEN;
        let mut value = ByteView::with_size(len);
        {
            // Only this function holds the new view.
            let mut buf = value
                .get_mut()
                .ok_or(RecordError::Crypto(CryptoError::SealFailed { len }))?;
            // The cleartext header, then the body's format (sealed with the body).
            let (head, plain) = buf.split_at_mut(HEADER_LEN + 1);
            let [e0, e1, e2, e3] = epoch.to_be_bytes();
            head.copy_from_slice(&[RECORD_FORMAT, e0, e1, e2, e3, body_format]);
            let written = postcard::to_slice(body, plain)?.len();
            if written != body_len {
                return Err(RecordError::Crypto(CryptoError::SealFailed { len }));
            }
            self.key.seal_in_place(
                Nonce {
                    epoch,
                    seq: self.seq,
                },
                &self.context(),
                &mut buf,
                HEADER_LEN,
            )?;
        }
        Ok(Slice::from(value))
    }

    /// Opens a sealed value and decodes its body, in any format of `T` ever
    /// written.
    pub fn open<T: Body>(&self, value: &[u8]) -> Result<T, RecordError> {
        let (header, sealed) = value
            .split_at_checked(HEADER_LEN)
            .ok_or(RecordError::TooShort { len: value.len() })?;
        let [format, e0, e1, e2, e3] = *header else {
            return Err(RecordError::TooShort { len: value.len() });
        };
        if format != RECORD_FORMAT {
            return Err(RecordError::UnknownFormat(format));
        }
        let epoch = u32::from_be_bytes([e0, e1, e2, e3]);
        let plain = self.key.open(
            Nonce {
                epoch,
                seq: self.seq,
            },
            &self.context(),
            sealed,
        )?;
        let (&format, body) = plain
            .split_first()
            .ok_or(RecordError::TooShort { len: 0 })?;
        T::decode(format, body)
    }
}

/// The epoch a sealed value was written in, read from its cleartext header.
pub fn epoch_of(value: &[u8]) -> Option<u32> {
    let bytes = value.get(1..HEADER_LEN)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// Encodes a quarantine entry (cleartext: its `raw` is still ciphertext).
pub fn encode_quarantine(entry: &QuarantineEntry) -> Result<Vec<u8>, RecordError> {
    Ok(postcard::to_extend(entry, vec![QUARANTINE_FORMAT])?)
}

/// Decodes a quarantine entry.
pub fn decode_quarantine(value: &[u8]) -> Result<QuarantineEntry, RecordError> {
    match value.split_first() {
        Some((&QUARANTINE_FORMAT, body)) => Ok(postcard::from_bytes(body)?),
        Some((&other, _)) => Err(RecordError::UnknownFormat(other)),
        None => Err(RecordError::TooShort { len: 0 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    /// The event the known-answer tests seal.
    fn kat_event() -> Event {
        Event {
            id: uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001),
            kind: crate::event::Kind::Alert,
            priority: 0,
            device: "pump-12".into(),
            device_seq: 40_001,
            topic: "ward-7/bed-3/alarm".into(),
            qos: crate::event::Qos::AtLeastOnce,
            retain: false,
            received_at: Timestamp(1_764_000_000_000_000),
            content_type: Some("application/json".into()),
            user_properties: vec![("unit".into(), "bpm".into())],
            payload: bytes::Bytes::from_static(b"{\"hr\":180}"),
        }
    }

    fn kat_key() -> ([u8; 16], DataKey) {
        let id = *b"vigil-kat-store!";
        (id, DataKey::derive(&MasterKey::from_bytes([0x5a; 32]), &id))
    }

    fn kat_seal<'a>(id: &'a [u8; 16], key: &'a DataKey) -> Seal<'a> {
        Seal {
            key,
            store_id: id,
            keyspace: "p3",
            seq: 0x0102_0304,
        }
    }

    /// The on-disk format, pinned: a record sealed with a fixed key, store,
    /// keyspace, seq and epoch has these exact bytes (`KAT_SEALED`: computed
    /// by the code of 2026-11-22, before any change to how a value is built;
    /// `KAT_EVENT`: body format 2, from 2026-11-30). A change here would leave
    /// every stored record unreadable after an upgrade.
    #[test]
    fn a_sealed_record_has_the_bytes_every_earlier_vigil_wrote() {
        let (id, key) = kat_key();
        let seal = kat_seal(&id, &key);
        let body = ("ward-7/bed-3/spo2".to_string(), 97u64, vec![1u8, 2, 3]);
        let value = seal
            .seal_as(0x0a0b, EVENT_FORMAT_WITH_DIGEST, &body)
            .unwrap();
        assert_eq!(crate::event::hex(&value), KAT_SEALED);

        // A stored event: its fields' order and encoding are the format too.
        let event = kat_event();
        let value = seal.seal(0x0a0b, &event).unwrap();
        assert_eq!(crate::event::hex(&value), KAT_EVENT);
        assert_eq!(seal.open::<Event>(&value).unwrap(), event);
    }
    const KAT_EVENT: &str = "0100000a0ba3426b2cc4880c16efb8e4267da142c5c4a3aa88f8e03cb1ca4ab95d58d63aee994d6518d213a481fc7a8fdc7472f59079f4765f407e92341560eb4c6e13ffdddccc0e2614cb867a0e9a4e60c464dbf161bb59271a03dfdf7e928151a73dc8a40cc3b3d9f5912b6861110f042eac92f0359288";
    const KAT_SEALED: &str = "0100000a0ba0431dddb6ec2121b0da014250926db6b4cd99e9fc914bdf27f06cb76418d612a458ad44223232e0";

    /// Events and dead letters written until 2026-11-30 (their digest after
    /// the event's fields) still open, their digest checked: the bytes are
    /// the ones that code wrote.
    #[test]
    fn records_with_the_old_digest_still_open() {
        let (id, key) = kat_key();
        let seal = kat_seal(&id, &key);
        let event = kat_event();
        // The event as body format 1 wrote it, followed by `digest`.
        let with_digest = |digest: [u8; 32]| {
            seal.seal_as(0x0a0b, EVENT_FORMAT_WITH_DIGEST, &(&event, digest))
                .unwrap()
        };
        let old = with_digest(event.compute_sha256());
        assert_eq!(crate::event::hex(&old), KAT_EVENT_WITH_DIGEST);
        assert_eq!(seal.open::<Event>(&old).unwrap(), event);

        let entry = DeadLetterEntry {
            event: event.clone(),
            original_seq: 77,
            reason: "cloud refused it: 0x99 payload format invalid".into(),
            dead_lettered_at: Timestamp(1_764_000_000_500_000),
        };
        let old = seal
            .seal_as(
                0x0a0b,
                DEAD_LETTER_FORMAT_WITH_DIGEST,
                &(
                    &event,
                    event.compute_sha256(),
                    entry.original_seq,
                    &entry.reason,
                    entry.dead_lettered_at,
                ),
            )
            .unwrap();
        assert_eq!(seal.open::<DeadLetterEntry>(&old).unwrap(), entry);
        let new = seal.seal(0x0a0b, &entry).unwrap();
        assert_eq!(seal.open::<DeadLetterEntry>(&new).unwrap(), entry);
        assert_eq!(new.len() + 32, old.len(), "the new format drops the digest");

        // A digest that does not match the fields: refused, to quarantine.
        let mut other = event.clone();
        other.device_seq += 1;
        assert!(matches!(
            seal.open::<Event>(&with_digest(other.compute_sha256())),
            Err(RecordError::DigestMismatch { format: 1 })
        ));
        let wrong = seal
            .seal_as(
                0x0a0b,
                DEAD_LETTER_FORMAT_WITH_DIGEST,
                &(&event, [0u8; 32], 1u64, "r", Timestamp(0)),
            )
            .unwrap();
        assert!(matches!(
            seal.open::<DeadLetterEntry>(&wrong),
            Err(RecordError::DigestMismatch { format: 0x81 })
        ));
    }
    const KAT_EVENT_WITH_DIGEST: &str = "0100000a0ba0426b2cc4880c16efb8e4267da142c5c4a3aa88f8e03cb1ca4ab95d58d63aee994d6518d213a481fc7a8fdc7472f59079f4765f407e92341560eb4c6e13ffdddccc0e2614cb867a0e9a4e60c464dbf161bb59271a03dfdf7e928151a73dc8a40cc3b339a13e333aee08357d3cf7617d5c7a8b2c9536307145bcb8116712f33d3ff43633c82443443882ce1c8b96dd357dfdaf";

    #[test]
    fn sealed_values_open_only_where_they_were_sealed() {
        let id = [3u8; 16];
        let key = DataKey::derive(&MasterKey::from_bytes([1; 32]), &id);
        let here = Seal {
            key: &key,
            store_id: &id,
            keyspace: "p1",
            seq: 9,
        };
        let event = kat_event();
        let value = here.seal(7, &event).unwrap();
        assert_eq!(value[0], RECORD_FORMAT);
        assert_eq!(epoch_of(&value), Some(7));
        assert_eq!(here.open::<Event>(&value).unwrap(), event);

        let moved = Seal {
            keyspace: "p2",
            ..here
        };
        assert!(matches!(
            moved.open::<Event>(&value),
            Err(RecordError::Crypto(CryptoError::Authentication))
        ));
        assert!(matches!(
            here.open::<DeadLetterEntry>(&value),
            Err(RecordError::WrongBody {
                found: EVENT_FORMAT,
                expected: DEAD_LETTER_FORMAT
            })
        ));
        let mut flipped = value.to_vec();
        flipped[HEADER_LEN + 2] ^= 0x10;
        assert!(here.open::<Event>(&flipped).is_err());
        assert!(matches!(
            here.open::<Event>(&value[..3]),
            Err(RecordError::TooShort { len: 3 })
        ));
        let mut future = value.to_vec();
        future[0] = 9;
        assert!(matches!(
            here.open::<Event>(&future),
            Err(RecordError::UnknownFormat(9))
        ));
    }

    #[test]
    fn keys_sort_in_sequence_order() {
        let mut keys: Vec<_> = [300u64, 2, 70_000, 1].iter().map(|s| key(*s)).collect();
        keys.sort();
        let seqs: Vec<u64> = keys.iter().map(|k| seq_of(k).unwrap()).collect();
        assert_eq!(seqs, vec![1, 2, 300, 70_000]);
        assert!(seq_of(&[1, 2]).is_err());
    }
}
