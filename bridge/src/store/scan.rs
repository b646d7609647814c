//! Reads: range scans from a lane's cursor, decoding as they go.
//!
//! Reads run on the caller's thread (the async API wraps them in
//! `spawn_blocking`) and never write: a corrupt record is reported to the caller,
//! which asks the writer to quarantine it. Damage below the record layer (a
//! table block whose checksum fails, so fjall cannot even return the keys in
//! it) ends the scan and is reported as the seq where the unreadable region
//! begins; the writer then finds and quarantines the seqs it cannot read, so
//! one bad block costs the records in it, not the lane.

use fjall::Keyspace;

use super::record::{self, Body, KEY_LEN};
use super::{
    DEAD_LETTER, DeadLetterEntry, QuarantineEntry, Shared, StoreError, StoreStats, Stored,
};
use crate::event::Event;

/// Most corrupt records one read reports before returning what it has, so a
/// badly damaged lane costs bounded work per call.
const MAX_CORRUPT_PER_READ: usize = 256;

/// A record that could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    /// Its key.
    pub seq: u64,
    /// Why it could not be opened.
    pub reason: String,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scanned<T> {
    /// Records that opened, in key order.
    pub events: Vec<Stored<T>>,
    /// Records that did not.
    pub corrupt: Vec<Corrupt>,
    /// Seqs fjall cannot read at all (a damaged table block), with why.
    pub unreadable: Vec<(u64, String)>,
}

/// Most keys one read probes one by one past a damaged block.
const MAX_PROBES_PER_READ: u64 = 4096;

/// Whether an engine error means damaged data (a checksum or format failure
/// in a table or block), as opposed to an I/O error or a closed store.
pub(super) fn is_damage(e: &fjall::Error) -> bool {
    use fjall::LsmError as L;
    matches!(
        e,
        fjall::Error::Storage(
            L::ChecksumMismatch { .. }
                | L::Decompress(_)
                | L::InvalidTag(_)
                | L::InvalidTrailer
                | L::InvalidHeader(_)
                | L::Utf8(_)
        ) | fjall::Error::Decompress(_)
            | fjall::Error::InvalidTrailer
            | fjall::Error::InvalidTag(_)
    )
}

/// What a lane scan found.
pub type ScannedLane = Scanned<Event>;

/// A scan reduced to what verification needs.
pub(super) struct Outline {
    pub(super) checked: u64,
    pub(super) corrupt: Vec<Corrupt>,
    pub(super) unreadable: Vec<(u64, String)>,
    pub(super) last: Option<u64>,
}

impl<T> Scanned<T> {
    pub(super) fn outline(self) -> Outline {
        let last = self
            .events
            .iter()
            .map(|e| e.seq)
            .chain(self.corrupt.iter().map(|c| c.seq))
            .chain(self.unreadable.iter().map(|u| u.0))
            .max();
        Outline {
            checked: (self.events.len() + self.corrupt.len() + self.unreadable.len()) as u64,
            corrupt: self.corrupt,
            unreadable: self.unreadable,
            last,
        }
    }
}

fn start_key(cursor: u64, after: Option<u64>) -> [u8; KEY_LEN] {
    let from = match after {
        Some(a) => cursor.max(a.saturating_add(1)),
        None => cursor,
    };
    record::key(from)
}

fn scan<T: Body>(
    shared: &Shared,
    ks: &Keyspace,
    keyspace: &str,
    start: [u8; KEY_LEN],
    limit: usize,
) -> Result<Scanned<T>, StoreError> {
    let mut out = Scanned {
        events: Vec::with_capacity(limit.min(1024)),
        corrupt: Vec::new(),
        unreadable: Vec::new(),
    };
    let mut next = record::seq_of(&start).unwrap_or(0);
    for guard in ks.range(start..) {
        if out.events.len() >= limit || out.corrupt.len() >= MAX_CORRUPT_PER_READ {
            break;
        }
        let (k, v) = match guard.into_inner() {
            Ok(kv) => kv,
            Err(e) if is_damage(&e) => {
                // The range cannot go on through this block; point reads may
                // still reach keys in and after it. Read on one key at a time.
                tracing::warn!(
                    keyspace,
                    from = next,
                    error = ?e,
                    "damaged table block in the store; reading on key by key"
                );
                probe(shared, ks, keyspace, next, limit, &mut out)?;
                break;
            }
            Err(e) => return Err(StoreError::engine(&shared.dir, e)),
        };
        let seq = match record::seq_of(&k) {
            Ok(seq) => seq,
            // A key we never write: leave it alone, it cannot be addressed by seq.
            Err(_) => continue,
        };
        next = seq.saturating_add(1);
        open_into(shared, keyspace, seq, &v, &mut out);
    }
    Ok(out)
}

/// Opens one stored value into `out`: an event, or a corrupt record.
fn open_into<T: Body>(
    shared: &Shared,
    keyspace: &str,
    seq: u64,
    value: &[u8],
    out: &mut Scanned<T>,
) {
    match shared.seal_for(keyspace, seq).open::<T>(value) {
        Ok(body) => out.events.push(Stored {
            seq,
            stored_bytes: (KEY_LEN + value.len()) as u64,
            body,
        }),
        Err(e) => out.corrupt.push(Corrupt {
            seq,
            reason: e.to_string(),
        }),
    }
}

/// Reads keys `from`, `from + 1`, ... one at a time (after a range failed on
/// a damaged block), until `limit` events, the store's next seq, or
/// [`MAX_PROBES_PER_READ`]. Keys fjall cannot read are reported as unreadable.
fn probe<T: Body>(
    shared: &Shared,
    ks: &Keyspace,
    keyspace: &str,
    from: u64,
    limit: usize,
    out: &mut Scanned<T>,
) -> Result<(), StoreError> {
    let end = shared
        .stats()
        .next_seq
        .min(from.saturating_add(MAX_PROBES_PER_READ));
    for seq in from..end {
        if out.events.len() >= limit || out.corrupt.len() >= MAX_CORRUPT_PER_READ {
            break;
        }
        match ks.get(record::key(seq)) {
            Ok(None) => {}
            Ok(Some(v)) => open_into(shared, keyspace, seq, &v, out),
            Err(e) if is_damage(&e) => out.unreadable.push((seq, format!("{e:?}"))),
            Err(e) => return Err(StoreError::engine(&shared.dir, e)),
        }
    }
    Ok(())
}

/// Scans a lane from its cursor (or after `after`).
pub(super) fn lane(
    shared: &Shared,
    priority: u8,
    after: Option<u64>,
    limit: usize,
) -> Result<ScannedLane, StoreError> {
    let cursor = shared
        .stats()
        .lanes
        .get(usize::from(priority))
        .map_or(0, |l| l.cursor);
    lane_from(shared, priority, start_key(cursor, after), limit)
}

/// Scans a lane from an explicit key, ignoring the cursor (verification).
pub(super) fn lane_from(
    shared: &Shared,
    priority: u8,
    start: [u8; KEY_LEN],
    limit: usize,
) -> Result<ScannedLane, StoreError> {
    let (ks, name) = shared.lane(priority)?;
    scan(shared, ks, name, start, limit)
}

/// Scans the dead-letter area.
pub(super) fn dead_letters(
    shared: &Shared,
    after: Option<u64>,
    limit: usize,
) -> Result<Scanned<DeadLetterEntry>, StoreError> {
    scan(
        shared,
        &shared.dead_letter,
        DEAD_LETTER,
        start_key(0, after),
        limit,
    )
}

/// Lists quarantined records.
pub(super) fn quarantine(
    shared: &Shared,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<Stored<QuarantineEntry>>, StoreError> {
    let mut out = Vec::new();
    for guard in shared.quarantine.range(start_key(0, after)..).take(limit) {
        let (k, v) = guard
            .into_inner()
            .map_err(|e| StoreError::engine(&shared.dir, e))?;
        let seq = record::seq_of(&k).map_err(|source| StoreError::Record {
            keyspace: super::QUARANTINE.into(),
            seq: 0,
            source,
        })?;
        let body = record::decode_quarantine(&v).map_err(|source| StoreError::Record {
            keyspace: super::QUARANTINE.into(),
            seq,
            source,
        })?;
        out.push(Stored {
            seq,
            stored_bytes: (KEY_LEN + v.len()) as u64,
            body,
        });
    }
    Ok(out)
}

/// Whether lane `priority` holds no key at or after `from`. Nothing is
/// decrypted; a key fjall cannot read counts as something there.
pub(super) fn nothing_from(shared: &Shared, priority: u8, from: u64) -> Result<bool, StoreError> {
    let (ks, _) = shared.lane(priority)?;
    Ok(ks.range(record::key(from)..).next().is_none())
}

/// Finds a lane's head after deletions: one seek from the cursor, or past it
/// over the seqs `gone` says were just deleted (a commit's acknowledged run:
/// seeking from the old cursor would step over each of their tombstones).
/// Sets the lane's cursor and oldest `received_at`. Corrupt records at the
/// head are skipped here (they are quarantined when the forwarder reads them).
pub(super) fn refresh_head(
    shared: &Shared,
    state: &mut StoreStats,
    priority: u8,
    gone: impl Fn(u64) -> bool,
) -> Result<(), StoreError> {
    let (ks, name) = shared.lane(priority)?;
    let next_seq = state.next_seq;
    let Some(lane) = state.lanes.get_mut(usize::from(priority)) else {
        return Ok(());
    };
    let mut from = lane.cursor;
    while from < next_seq && gone(from) {
        from += 1;
    }
    let mut head = None;
    for guard in ks.range(record::key(from)..).take(MAX_CORRUPT_PER_READ) {
        let (k, v) = guard
            .into_inner()
            .map_err(|e| StoreError::engine(&shared.dir, e))?;
        let Ok(seq) = record::seq_of(&k) else {
            continue;
        };
        if head.is_none() {
            head = Some(seq);
        }
        if let Ok(event) = shared.seal_for(name, seq).open::<Event>(&v) {
            lane.cursor = head.unwrap_or(seq);
            lane.oldest = Some(event.received_at);
            return Ok(());
        }
    }
    match head {
        // Only corrupt records at the head: keep the cursor on them.
        Some(seq) => lane.cursor = seq,
        None => {
            lane.cursor = next_seq;
            lane.oldest = None;
        }
    }
    Ok(())
}
