//! At-rest encryption of stored records.
//!
//! Only the store calls this module. It owns three things:
//!
//! * [`MasterKey`]: the 32-byte secret the operator provides (environment or key
//!   file, see [`key`]). It never leaves this module except through HKDF.
//! * [`DataKey`]: the per-store AES-256-GCM key, derived with HKDF-SHA256 from the
//!   master key and the store's random id. Two stores under one master key never
//!   share a data key.
//! * [`Nonce`] construction: `boot epoch (u32 BE) || sequence number (u64 BE)`, the
//!   NIST SP 800-38D §8.2.1 deterministic construction. The store bumps and syncs
//!   the epoch at every open and never hands out a sequence number twice within an
//!   epoch, so no (key, nonce) pair repeats.
//!
//! The associated data ([`RecordContext`]) binds the store id, the keyspace, the
//! sequence number and the record format version, so a sealed value copied to
//! another key, keyspace or store fails to authenticate.

pub mod key;

use aes_gcm::aead::Tag;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce as GcmNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

pub use key::{KeySource, MasterKey};

/// Length of the AES-GCM authentication tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// HKDF `info` label for the record encryption key. Changing it changes every key.
const DATA_KEY_INFO: &[u8] = b"vigil/v1/store-data-key";
/// HKDF `info` label for the key-check value kept in the store's identity file.
const KEY_CHECK_INFO: &[u8] = b"vigil/v1/key-check";

/// Errors from sealing and opening records.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A sealed value failed to authenticate: it was modified on disk, moved to
    /// another key or keyspace, or sealed under another key. The store moves such
    /// records to quarantine; they are never forwarded.
    #[error(
        "record failed authentication (tampered, moved between keys/keyspaces, or sealed under another key)"
    )]
    Authentication,
    /// A sealed value is shorter than its tag: a truncated or foreign value.
    #[error("sealed value is {len} bytes, shorter than the {TAG_LEN}-byte tag")]
    Truncated {
        /// Length of the value found.
        len: usize,
    },
    /// A record could not be sealed: AES-GCM refused (only for plaintexts
    /// beyond 64 GiB, which the store's packet limits make impossible), or
    /// the buffer given had no room for the tag after the header, or the
    /// record's encoding did not fill the size computed for it (both bugs in
    /// the caller, never caused by input). Nothing is stored.
    #[error("cannot seal a record of {len} bytes (AES-GCM refused, or the buffer was sized wrong)")]
    SealFailed {
        /// Length of the plaintext.
        len: usize,
    },
}

/// The 12-byte AES-GCM nonce: `epoch || seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce {
    /// Boot epoch of the store when the record was sealed.
    pub epoch: u32,
    /// Store-wide sequence number of the record.
    pub seq: u64,
}

impl Nonce {
    fn to_bytes(self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.epoch.to_be_bytes());
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        n
    }
}

/// Where a record lives: the associated data bound into its tag.
#[derive(Debug, Clone, Copy)]
pub struct RecordContext<'a> {
    /// The store's random id (from its identity file).
    pub store_id: &'a [u8; 16],
    /// The fjall keyspace name the record is stored under.
    pub keyspace: &'a str,
    /// The record's key (store-wide sequence number).
    pub seq: u64,
    /// The record format version written in the record header.
    pub format: u8,
}

/// Associated data up to this long is built on the stack (every keyspace
/// name Vigil uses is far shorter than the 64 bytes this leaves for it).
const AAD_INLINE: usize = 8 + 16 + 1 + 64 + 8 + 1;

/// A record's associated data: on the stack when it fits, which it does for
/// every keyspace Vigil names (one allocation fewer per record sealed or
/// opened).
enum Aad {
    Inline([u8; AAD_INLINE], usize),
    Heap(Vec<u8>),
}

impl Aad {
    fn as_slice(&self) -> &[u8] {
        match self {
            Aad::Inline(buf, len) => buf.get(..*len).unwrap_or_default(),
            Aad::Heap(v) => v,
        }
    }
}

impl RecordContext<'_> {
    fn aad(&self) -> Aad {
        // Length-prefix the name so ("p1", seq) can never alias ("p", ...).
        let name_len = [u8::try_from(self.keyspace.len()).unwrap_or(u8::MAX)];
        let seq = self.seq.to_be_bytes();
        let format = [self.format];
        let parts: [&[u8]; 6] = [
            b"vigil-v1",
            self.store_id,
            &name_len,
            self.keyspace.as_bytes(),
            &seq,
            &format,
        ];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > AAD_INLINE {
            return Aad::Heap(parts.concat());
        }
        let mut buf = [0u8; AAD_INLINE];
        let mut at = 0;
        for part in parts {
            if let Some(dst) = buf.get_mut(at..at + part.len()) {
                dst.copy_from_slice(part);
            }
            at += part.len();
        }
        Aad::Inline(buf, total)
    }
}

/// The per-store record key. Cheap to share behind an `Arc`.
pub struct DataKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    /// Derives the data key of the store with id `store_id`.
    pub fn derive(master: &MasterKey, store_id: &[u8; 16]) -> Self {
        let okm = hkdf32(master, store_id, DATA_KEY_INFO);
        let key = Key::<Aes256Gcm>::from(*okm);
        Self {
            cipher: Aes256Gcm::new(&key),
        }
    }

    /// Encrypts `buf[start..buf.len() - TAG_LEN]` in place and writes the tag
    /// into the last [`TAG_LEN`] bytes.
    ///
    /// `buf[..start]` is left as is (the caller's cleartext header). The
    /// caller sizes `buf` exactly, so a sealed record costs one allocation.
    pub fn seal_in_place(
        &self,
        nonce: Nonce,
        ctx: &RecordContext<'_>,
        buf: &mut [u8],
        start: usize,
    ) -> Result<(), CryptoError> {
        let len = buf.len().saturating_sub(start);
        let gcm_nonce = GcmNonce::<aes_gcm::aead::consts::U12>::from(nonce.to_bytes());
        let end = buf
            .len()
            .checked_sub(TAG_LEN)
            .filter(|end| *end >= start)
            .ok_or(CryptoError::SealFailed { len })?;
        let (sealed, tag_out) = buf.split_at_mut(end);
        let body = sealed
            .get_mut(start..)
            .ok_or(CryptoError::SealFailed { len })?;
        let tag = self
            .cipher
            .encrypt_inout_detached(&gcm_nonce, ctx.aad().as_slice(), body.into())
            .map_err(|_| CryptoError::SealFailed { len })?;
        tag_out.copy_from_slice(tag.as_slice());
        Ok(())
    }

    /// Decrypts `sealed` (ciphertext followed by the tag) and returns the plaintext.
    pub fn open(
        &self,
        nonce: Nonce,
        ctx: &RecordContext<'_>,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let split = sealed
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(CryptoError::Truncated { len: sealed.len() })?;
        let (ciphertext, tag) = sealed.split_at(split);
        let tag = Tag::<Aes256Gcm>::try_from(tag)
            .map_err(|_| CryptoError::Truncated { len: sealed.len() })?;
        let mut plain = ciphertext.to_vec();
        let gcm_nonce = GcmNonce::<aes_gcm::aead::consts::U12>::from(nonce.to_bytes());
        self.cipher
            .decrypt_inout_detached(
                &gcm_nonce,
                ctx.aad().as_slice(),
                plain.as_mut_slice().into(),
                &tag,
            )
            .map_err(|_| CryptoError::Authentication)?;
        Ok(plain)
    }
}

/// The key-check value stored in a store's identity file: an HKDF output under a
/// label of its own, so it reveals nothing about the data key. A different master
/// key gives a different value, which makes a wrong key a clear error at open.
pub fn key_check_value(master: &MasterKey, store_id: &[u8; 16]) -> [u8; 32] {
    *hkdf32(master, store_id, KEY_CHECK_INFO)
}

/// Compares two key-check values without an early exit.
pub fn key_check_matches(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn hkdf32(master: &MasterKey, salt: &[u8; 16], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), master.expose());
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 255 * 32 byte limit: this cannot fail.
    if hk.expand(info, okm.as_mut()).is_err() {
        unreachable!("HKDF-SHA256 expand of 32 bytes is always within bounds");
    }
    okm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(id: &'a [u8; 16], ks: &'a str, seq: u64) -> RecordContext<'a> {
        RecordContext {
            store_id: id,
            keyspace: ks,
            seq,
            format: 1,
        }
    }

    /// The associated data is part of the on-disk format: records sealed by
    /// any earlier Vigil must still open. This is its definition, written out.
    #[test]
    fn associated_data_keeps_its_layout() {
        let id = [7u8; 16];
        let (inline_max, long, longer) = ("x".repeat(64), "y".repeat(65), "z".repeat(300));
        for name in [
            "p0",
            "dead-letter",
            "quarantine",
            "",
            &inline_max,
            &long,
            &longer,
        ] {
            let c = RecordContext {
                store_id: &id,
                keyspace: name,
                seq: 0x0102_0304_0506_0708,
                format: 3,
            };
            let mut want = b"vigil-v1".to_vec();
            want.extend_from_slice(&id);
            want.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
            want.extend_from_slice(name.as_bytes());
            want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
            want.push(3);
            assert_eq!(c.aad().as_slice(), want, "name {name:?}");
        }
    }

    fn seal(key: &DataKey, n: Nonce, c: &RecordContext<'_>, msg: &[u8]) -> Vec<u8> {
        let mut buf = msg.to_vec();
        buf.resize(msg.len() + TAG_LEN, 0);
        key.seal_in_place(n, c, &mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn a_buffer_without_room_for_the_tag_is_refused_not_sealed() {
        let key = DataKey::derive(&MasterKey::from_bytes([7u8; 32]), &[1u8; 16]);
        let n = Nonce { epoch: 1, seq: 1 };
        let id = [1u8; 16];
        let mut short = vec![0u8; TAG_LEN - 1];
        assert!(matches!(
            key.seal_in_place(n, &ctx(&id, "p1", 1), &mut short, 0),
            Err(CryptoError::SealFailed { .. })
        ));
        // The header would overlap the tag.
        let mut overlap = vec![0u8; TAG_LEN + 2];
        assert!(matches!(
            key.seal_in_place(n, &ctx(&id, "p1", 1), &mut overlap, 3),
            Err(CryptoError::SealFailed { .. })
        ));
        assert_eq!(overlap, vec![0u8; TAG_LEN + 2], "left as it was");
    }

    #[test]
    fn round_trip_and_every_context_field_is_bound() {
        let master = MasterKey::from_bytes([7u8; 32]);
        let id = [1u8; 16];
        let key = DataKey::derive(&master, &id);
        let n = Nonce { epoch: 3, seq: 42 };
        let sealed = seal(&key, n, &ctx(&id, "p1", 42), b"heart rate 72");
        assert_eq!(sealed.len(), 13 + TAG_LEN);
        assert_eq!(
            key.open(n, &ctx(&id, "p1", 42), &sealed).unwrap(),
            b"heart rate 72"
        );

        let other_id = [2u8; 16];
        for bad in [
            ctx(&id, "p2", 42),
            ctx(&id, "p1", 43),
            ctx(&other_id, "p1", 42),
            RecordContext {
                format: 2,
                ..ctx(&id, "p1", 42)
            },
        ] {
            assert!(matches!(
                key.open(n, &bad, &sealed),
                Err(CryptoError::Authentication)
            ));
        }
        assert!(matches!(
            key.open(Nonce { epoch: 4, seq: 42 }, &ctx(&id, "p1", 42), &sealed),
            Err(CryptoError::Authentication)
        ));
        assert!(matches!(
            key.open(n, &ctx(&id, "p1", 42), &sealed[..5]),
            Err(CryptoError::Truncated { len: 5 })
        ));
    }

    #[test]
    fn data_keys_differ_per_store_and_per_master() {
        let id = [1u8; 16];
        let n = Nonce { epoch: 1, seq: 1 };
        let c = ctx(&id, "p0", 1);
        let a = DataKey::derive(&MasterKey::from_bytes([7u8; 32]), &id);
        let b = DataKey::derive(&MasterKey::from_bytes([8u8; 32]), &id);
        let sealed = seal(&a, n, &c, b"x");
        assert!(b.open(n, &c, &sealed).is_err());
        let id2 = [9u8; 16];
        let a2 = DataKey::derive(&MasterKey::from_bytes([7u8; 32]), &id2);
        assert_ne!(seal(&a2, n, &c, b"x"), sealed);
    }

    #[test]
    fn key_check_value_tells_keys_apart() {
        let id = [5u8; 16];
        let a = key_check_value(&MasterKey::from_bytes([1u8; 32]), &id);
        let b = key_check_value(&MasterKey::from_bytes([2u8; 32]), &id);
        assert!(key_check_matches(&a, &a));
        assert!(!key_check_matches(&a, &b));
    }
}
