//! Reads: range scans from a lane's cursor, decoding as they go.
//!
//! Reads run on the caller's thread (the async API wraps them in
//! `spawn_blocking`) and never write: a corrupt record is reported to the caller,
//! which asks the writer to quarantine it.

use fjall::Keyspace;

use super::record::{self, DEAD_LETTER_FORMAT, EVENT_FORMAT, KEY_LEN};
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
}

/// What a lane scan found.
pub type ScannedLane = Scanned<Event>;

/// A scan reduced to what verification needs.
pub(super) struct Outline {
    pub(super) checked: u64,
    pub(super) corrupt: Vec<Corrupt>,
    pub(super) last: Option<u64>,
}

impl<T> Scanned<T> {
    pub(super) fn outline(self) -> Outline {
        let last = self
            .events
            .iter()
            .map(|e| e.seq)
            .chain(self.corrupt.iter().map(|c| c.seq))
            .max();
        Outline {
            checked: (self.events.len() + self.corrupt.len()) as u64,
            corrupt: self.corrupt,
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

fn scan<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    ks: &Keyspace,
    keyspace: &str,
    body_format: u8,
    start: [u8; KEY_LEN],
    limit: usize,
) -> Result<Scanned<T>, StoreError> {
    let mut out = Scanned {
        events: Vec::with_capacity(limit.min(1024)),
        corrupt: Vec::new(),
    };
    for guard in ks.range(start..) {
        if out.events.len() >= limit || out.corrupt.len() >= MAX_CORRUPT_PER_READ {
            break;
        }
        let (k, v) = guard
            .into_inner()
            .map_err(|e| StoreError::engine(&shared.dir, e))?;
        let seq = match record::seq_of(&k) {
            Ok(seq) => seq,
            // A key we never write: leave it alone, it cannot be addressed by seq.
            Err(_) => continue,
        };
        match shared.seal_for(keyspace, seq).open::<T>(body_format, &v) {
            Ok(body) => out.events.push(Stored {
                seq,
                stored_bytes: (KEY_LEN + v.len()) as u64,
                body,
            }),
            Err(e) => out.corrupt.push(Corrupt {
                seq,
                reason: e.to_string(),
            }),
        }
    }
    Ok(out)
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
    scan(shared, ks, name, EVENT_FORMAT, start, limit)
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
        DEAD_LETTER_FORMAT,
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

/// Finds a lane's head after deletions: one seek from the cursor. Sets the
/// lane's cursor and oldest `received_at`. Corrupt records at the head are
/// skipped here (they are quarantined when the forwarder reads them).
pub(super) fn refresh_head(
    shared: &Shared,
    state: &mut StoreStats,
    priority: u8,
) -> Result<(), StoreError> {
    let (ks, name) = shared.lane(priority)?;
    let next_seq = state.next_seq;
    let Some(lane) = state.lanes.get_mut(usize::from(priority)) else {
        return Ok(());
    };
    let mut head = None;
    for guard in ks
        .range(record::key(lane.cursor)..)
        .take(MAX_CORRUPT_PER_READ)
    {
        let (k, v) = guard
            .into_inner()
            .map_err(|e| StoreError::engine(&shared.dir, e))?;
        let Ok(seq) = record::seq_of(&k) else {
            continue;
        };
        if head.is_none() {
            head = Some(seq);
        }
        if let Ok(event) = shared.seal_for(name, seq).open::<Event>(EVENT_FORMAT, &v) {
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
