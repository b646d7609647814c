// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use crate::{SeqNo, UserKey, ValueType};

#[derive(Clone, Eq)]
pub struct InternalKey {
    pub user_key: UserKey,
    pub seqno: SeqNo,
    pub value_type: ValueType,
}

impl PartialEq for InternalKey {
    fn eq(&self, other: &Self) -> bool {
        self.user_key == other.user_key && self.seqno == other.seqno
    }
}

#[cfg_attr(coverage_nightly, coverage(off))]
impl std::fmt::Debug for InternalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}:{}:{}",
            self.user_key,
            self.seqno,
            match self.value_type {
                ValueType::Value => "V",
                ValueType::Tombstone => "T",
                ValueType::WeakTombstone => "W",
                ValueType::Indirection => "Vb",
            },
        )
    }
}

impl InternalKey {
    pub fn new<K: Into<UserKey>>(user_key: K, seqno: SeqNo, value_type: ValueType) -> Self {
        let user_key = user_key.into();

        assert!(
            u16::try_from(user_key.len()).is_ok(),
            "keys can be 65535 bytes in length",
        );

        Self {
            user_key,
            seqno,
            value_type,
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.value_type.is_tombstone()
    }
}

impl PartialOrd for InternalKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

// Order by user key ascending, THEN by sequence number descending
// This is one of the most important functions
// Otherwise queries will not match expected behaviour
impl Ord for InternalKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // VIGIL-PATCH: user keys through `cmp_user_keys` (the same order, see
        // there), then the sequence number descending, as upstream.
        cmp_user_keys(&self.user_key, &other.user_key).then_with(|| other.seqno.cmp(&self.seqno))
    }
}

// VIGIL-PATCH: the lexicographic order of two user keys, as `[u8]`'s `Ord`
// (and `Slice`'s) gives it, with a fast path for two keys of 8 bytes: one
// comparison of two big-endian integers orders them exactly as their bytes
// do. `Slice`'s own `Ord` compares a 4-byte prefix first, then the whole
// keys, through two `memcmp` calls (about 100 instructions); 8-byte
// big-endian sequence numbers, Vigil's keys, share that prefix (their high
// bytes are zero), so every comparison in the memtable's skiplist took both.
#[inline]
fn cmp_user_keys(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if let (Ok(a), Ok(b)) = (<[u8; 8]>::try_from(a), <[u8; 8]>::try_from(b)) {
        return u64::from_be_bytes(a).cmp(&u64::from_be_bytes(b));
    }
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_log::test;

    // VIGIL-PATCH: `cmp_user_keys` orders every pair of keys as `[u8]` does,
    // the 8-byte fast path included (keys of 0 to 9 bytes, every byte value
    // at the ends).
    #[test]
    fn user_keys_order_as_their_bytes() {
        let mut keys: Vec<Vec<u8>> = vec![];
        for len in 0..=9usize {
            for fill in [0u8, 1, 0x7f, 0x80, 0xfe, 0xff] {
                for last in [0u8, 1, 0x80, 0xff] {
                    let mut k = vec![fill; len];
                    if let Some(l) = k.last_mut() {
                        *l = last;
                    }
                    keys.push(k);
                }
            }
        }
        for a in &keys {
            for b in &keys {
                assert_eq!(cmp_user_keys(a, b), a.as_slice().cmp(b.as_slice()), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn key_order_smoke_test() {
        use ValueType::Value as V;

        let mut keys = [
            InternalKey::new(b"d", 3, V),
            InternalKey::new(b"a", 0, V),
            InternalKey::new(b"b", 0, V),
            InternalKey::new(b"a", 2, V),
            InternalKey::new(b"b", 1, V),
            InternalKey::new(b"a", 1, V),
            InternalKey::new(b"c", 3, V),
        ];
        keys.sort();

        assert_eq!(
            [
                InternalKey::new(b"a", 2, V),
                InternalKey::new(b"a", 1, V),
                InternalKey::new(b"a", 0, V),
                InternalKey::new(b"b", 1, V),
                InternalKey::new(b"b", 0, V),
                InternalKey::new(b"c", 3, V),
                InternalKey::new(b"d", 3, V),
            ],
            keys,
        );
    }
}
