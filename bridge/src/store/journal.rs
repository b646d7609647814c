//! A check of fjall's journal before fjall replays it: damage inside the
//! journal costs the records of the damaged batch, counted and quarantined,
//! never the batches after it, and never stops Vigil.
//!
//! # Why
//!
//! Every record lives in fjall's journal (`<db>/<id>.jnl`) until its memtable
//! is flushed to a table. fjall 3 replays the journal at open and cannot tell
//! a damaged batch from a torn tail (fjall-rs/fjall#311): at the first entry
//! that does not parse it truncates the file there, so one flipped bit in the
//! middle of the journal silently drops every later batch, acknowledged ones
//! included; a flip in a length field trips a `debug_assert` (a panic at open);
//! a batch whose checksum fails is an error that stops the open.
//!
//! # What this does
//!
//! Before fjall opens the database (under its lock, so nothing else writes),
//! [`inspect`] parses every journal file with the fjall 3.1 format (pinned in
//! `Cargo.toml`). A batch is valid when its start, items and end marker parse
//! and its xxh3 checksum holds. When a batch is not valid but a valid one
//! follows, the bytes in between are damage: they are cut out of the file
//! (rewritten beside it, fsynced, renamed over it) so fjall replays every
//! other batch. A complete batch at the end that fails its checksum is cut off
//! too. An incomplete one at the end (a write torn by a crash before its
//! fsync, so never acknowledged) is left to fjall, which discards it as
//! before.
//!
//! What the damaged batch held is worked out from its neighbours: each of
//! Vigil's commits writes the store state, whose `next_seq` says which store
//! seqs the commits before it gave out. The seqs the damaged batch gave out
//! are those between the state before it and the state after it that the
//! batches after it did not give out themselves. After fjall has opened,
//! [`settle`] puts back every record of the damaged batch that still parses
//! and authenticates (AES-GCM binds each value to its keyspace and seq, so a
//! damaged one cannot pass), quarantines each of its seqs that is neither
//! recovered, nor in a table already, nor deleted by a later batch (delivered
//! and acknowledged before the restart), counts them, and recounts the
//! backlog figures. When the damaged batch has no state after it (the last
//! one), its seqs are not known: it is quarantined as one entry naming the
//! batch, with the count of items it declared.
//!
//! Nothing here trusts a length it reads: every read is bounded by the file.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write as _;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use fjall::{Keyspace, PersistMode};

use super::record::{self, KEY_LEN};
use super::scan::is_damage;
use super::{
    AreaFigures, DEAD_LETTER, DeadLetterEntry, QuarantineEntry, STATE_KEY, Shared, StoreError,
    StoreStats,
};
use crate::event::{Event, Timestamp};

/// fjall's journal entry tags.
const TAG_START: u8 = 1;
const TAG_ITEM: u8 = 2;
const TAG_END: u8 = 3;
const TAG_CLEAR: u8 = 4;
/// The trailer after every end marker.
const MAGIC: [u8; 4] = [b'F', b'J', b'L', 3];
/// Start: tag, item count u32, seqno u64.
const START_LEN: u64 = 1 + 4 + 8;
/// Item header: tag, value type, compression, keyspace u64, key len u16,
/// value len u32, on-disk value len u32.
const ITEM_HEADER_LEN: u64 = 1 + 1 + 1 + 8 + 2 + 4 + 4;
/// End: tag, checksum u64, magic.
const END_LEN: u64 = 1 + 8 + 4;
/// Clear: tag, keyspace u64.
const CLEAR_LEN: u64 = 1 + 8;
/// Value types (lsm-tree): a value, a tombstone, a weak tombstone.
const VALUE: u8 = 0;
const TOMBSTONE: u8 = 1;
const WEAK_TOMBSTONE: u8 = 2;
/// Bytes read from a journal at a time.
const WINDOW: usize = 1 << 20;

/// One parsed journal item.
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub(super) keyspace_id: u64,
    pub(super) value_type: u8,
    /// The key as a store seq, when it has a seq's length.
    pub(super) seq: Option<u64>,
    /// Whether the key is the store state's.
    pub(super) state: bool,
    pub(super) value: Vec<u8>,
}

impl Item {
    fn seq(&self) -> Option<u64> {
        self.seq
    }

    fn is_tombstone(&self) -> bool {
        matches!(self.value_type, TOMBSTONE | WEAK_TOMBSTONE)
    }
}

/// A damaged stretch of a journal, and what is known of the batch it held.
#[derive(Debug)]
pub(super) struct Damage {
    /// The journal file.
    pub(super) file: PathBuf,
    /// Where the damage starts in it, and how many bytes were cut.
    pub(super) offset: u64,
    pub(super) len: u64,
    /// Items the batch declared, if its start marker parsed.
    pub(super) declared: Option<u32>,
    /// Items that parsed before the damage (values still unverified).
    pub(super) parsed: Vec<Item>,
    /// `next_seq` of the last state before the damage.
    before: Option<u64>,
    /// `next_seq` of the first state after it.
    after: Option<u64>,
    /// Seqs the batches after it gave out before (and with) that state.
    given_out_later: HashSet<u64>,
    /// Seqs deleted by a batch after it.
    deleted_later: HashSet<u64>,
}

impl Damage {
    /// The store seqs the damaged batch gave out, when both neighbours' states
    /// are known.
    pub(super) fn seqs(&self) -> Option<Vec<u64>> {
        let range: Range<u64> = self.before?..self.after?;
        // A range wider than any one batch means the neighbours are not what
        // they seem; do not guess.
        if range.end.saturating_sub(range.start) > 1 << 20 {
            return None;
        }
        Some(
            range
                .filter(|s| !self.given_out_later.contains(s))
                .collect(),
        )
    }

    /// Whether a batch after the damage deleted `seq` (the record was
    /// delivered and acknowledged before the restart).
    pub(super) fn deleted_later(&self, seq: u64) -> bool {
        self.deleted_later.contains(&seq)
    }
}

/// What [`inspect`] found and did.
#[derive(Debug, Default)]
pub(super) struct Inspection {
    /// Valid batches read.
    pub(super) batches: u64,
    /// Damage cut out of the journal.
    pub(super) damage: Vec<Damage>,
}

/// Parses the journal files in `db_dir` and cuts out damage (see the module
/// docs). Takes fjall's lock for the duration, so it never touches a journal
/// another process has open.
pub(super) fn inspect(db_dir: &Path) -> Result<Inspection, StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let mut journals = Vec::new();
    let entries = match std::fs::read_dir(db_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Inspection::default()),
        Err(e) => return Err(io(db_dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io(db_dir))?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            journals.push((id, path));
        }
    }
    if journals.is_empty() {
        return Ok(Inspection::default());
    }
    journals.sort();

    let lock_path = db_dir.join("lock");
    let lock = File::options()
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StoreError::Locked {
                dir: db_dir.to_path_buf(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
    }

    let mut walk = Walk::default();
    for (_, path) in &journals {
        walk.file(path).map_err(io(path))?;
    }
    // Only repair what a parser that understood the journal found: at least one
    // valid batch read means the format is the one this code knows.
    if walk.inspection.batches == 0 {
        if !walk.cuts.is_empty() {
            tracing::warn!(
                dir = %db_dir.display(),
                "fjall's journal holds no batch this version of Vigil can read; leaving it to fjall"
            );
        }
        return Ok(Inspection::default());
    }
    walk.finish();
    for (path, offset, seqno) in &walk.patches {
        patch_seqno(path, *offset, *seqno).map_err(io(path))?;
    }
    for (path, cuts) in &walk.cuts {
        cut(path, cuts).map_err(io(path))?;
    }
    drop(lock);
    Ok(walk.inspection)
}

/// One journal file cut: the byte ranges to remove, and where its data ends.
#[derive(Debug, Default)]
struct Cuts {
    /// Damage between valid batches.
    remove: Vec<Range<u64>>,
    /// Where the last valid batch ends.
    keep_until: u64,
    /// Something other than fjall's zero fill follows it.
    truncate: bool,
}

#[derive(Default)]
struct Walk {
    inspection: Inspection,
    cuts: Vec<(PathBuf, Cuts)>,
    /// `next_seq` of the last valid state.
    last_state: Option<u64>,
    /// fjall's id of the meta keyspace, once seen (its keys are not seqs).
    meta: Option<u64>,
    /// The last three valid batches: file, offset, fjall sequence number.
    recent: Vec<(PathBuf, u64, u64)>,
    /// Sequence numbers to correct: file, offset of the batch, right value.
    patches: Vec<(PathBuf, u64, u64)>,
}

impl Walk {
    fn file(&mut self, path: &Path) -> std::io::Result<()> {
        let mut reader = Reader::open(path)?;
        let mut cuts = Cuts::default();
        let mut pos = 0;
        loop {
            match parse_batch(&mut reader, pos, Values::State)? {
                Parsed::Batch { end, seqno, items } => {
                    self.valid(&items);
                    self.order(path, pos, seqno);
                    pos = end;
                }
                Parsed::End => break,
                Parsed::Bad { .. } => {
                    // Again, keeping every value: they may be put back.
                    let (declared, items) = match parse_batch(&mut reader, pos, Values::All)? {
                        Parsed::Bad { declared, items } => (declared, items),
                        _ => (None, Vec::new()),
                    };
                    let Some(next) = resync(&mut reader, pos + 1)? else {
                        // Nothing valid follows. A complete batch that failed
                        // (its end marker is there) was damaged after it was
                        // written; an incomplete one was torn by a crash before
                        // its fsync (never acknowledged). Either way the file
                        // ends here, as fjall would make it.
                        if reader.contains_end_marker(pos)? {
                            self.damaged(path, pos, reader.len - pos, declared, items);
                        }
                        cuts.truncate = true;
                        break;
                    };
                    self.damaged(path, pos, next - pos, declared, items);
                    cuts.remove.push(pos..next);
                    pos = next;
                }
            }
        }
        cuts.keep_until = pos;
        if cuts.truncate || !cuts.remove.is_empty() {
            self.cuts.push((path.to_path_buf(), cuts));
        }
        Ok(())
    }

    /// Checks fjall's sequence numbers, which increase from batch to batch
    /// and which the batch checksum does not cover: a flipped bit there makes
    /// fjall replay the batch as newer (or older) than its neighbours, so an
    /// old value would shadow later writes. A batch out of line with two
    /// neighbours that agree is given the number after its predecessor.
    fn order(&mut self, path: &Path, pos: u64, seqno: u64) {
        self.recent.push((path.to_path_buf(), pos, seqno));
        if self.recent.len() > 3 {
            self.recent.remove(0);
        }
        let s: Vec<u64> = self.recent.iter().map(|r| r.2).collect();
        let fix = match s[..] {
            // The very first batch read, out of line with the two after it.
            [a, b, c] if self.inspection.batches == 3 && a >= b && b < c && b > 0 => {
                Some((0, b - 1))
            }
            [a, b, c] if !(a < b && b < c) && a < c && c - a >= 2 => Some((1, a + 1)),
            _ => None,
        };
        self.correct(fix);
    }

    /// The last batch read, out of line with the two before it.
    fn finish(&mut self) {
        let s: Vec<u64> = self.recent.iter().map(|r| r.2).collect();
        let fix = match s[..] {
            [a, b, c] if a < b && c <= b => Some((2, b + 1)),
            _ => None,
        };
        self.correct(fix);
    }

    fn correct(&mut self, fix: Option<(usize, u64)>) {
        if let Some((i, right)) = fix
            && let Some(r) = self.recent.get_mut(i)
        {
            tracing::warn!(
                file = %r.0.display(),
                offset = r.1,
                found = r.2,
                right,
                "a batch in the store's journal had a damaged sequence number; corrected"
            );
            r.2 = right;
            self.patches.push((r.0.clone(), r.1, right));
        }
    }

    fn damaged(
        &mut self,
        file: &Path,
        offset: u64,
        len: u64,
        declared: Option<u32>,
        parsed: Vec<Item>,
    ) {
        // Two damaged stretches with no valid state between them are one.
        if let Some(last) = self.inspection.damage.last_mut()
            && last.after.is_none()
        {
            last.parsed.extend(parsed);
            last.declared = match (last.declared, declared) {
                (Some(a), Some(b)) => Some(a.saturating_add(b)),
                _ => None,
            };
            // Reported from where the first starts; the bytes cut add up.
            last.len += len;
            return;
        }
        self.inspection.damage.push(Damage {
            file: file.to_path_buf(),
            offset,
            len,
            declared,
            parsed,
            before: self.last_state,
            after: None,
            given_out_later: HashSet::new(),
            deleted_later: HashSet::new(),
        });
    }

    fn valid(&mut self, items: &[Item]) {
        self.inspection.batches += 1;
        let mut state = None;
        for item in items {
            if item.state && item.value_type == VALUE {
                self.meta = Some(item.keyspace_id);
                if let Ok(s) = postcard::from_bytes::<StoreStats>(&item.value) {
                    state = Some(s.next_seq);
                }
            }
        }
        let meta = self.meta;
        for damage in &mut self.inspection.damage {
            let upper = damage.after.or(state).unwrap_or(u64::MAX);
            let lower = damage.before.unwrap_or(0);
            for item in items.iter().filter(|i| Some(i.keyspace_id) != meta) {
                let Some(seq) = item.seq() else { continue };
                if item.is_tombstone() {
                    // Only the damaged batch's own seqs matter (bounded memory).
                    if (lower..upper).contains(&seq) {
                        damage.deleted_later.insert(seq);
                    }
                } else if damage.after.is_none() {
                    damage.given_out_later.insert(seq);
                }
            }
            if damage.after.is_none() {
                damage.after = state;
            }
        }
        if state.is_some() {
            self.last_state = state;
        }
    }
}

enum Parsed {
    /// A valid batch ending at `end`, with fjall's sequence number.
    Batch {
        end: u64,
        seqno: u64,
        items: Vec<Item>,
    },
    /// No more data (end of file, or fjall's zero-filled preallocation).
    End,
    /// Not a valid batch; what parsed of it.
    Bad {
        declared: Option<u32>,
        items: Vec<Item>,
    },
}

/// Which item values a parse keeps (copying all of them costs at every open).
#[derive(Clone, Copy, PartialEq)]
enum Values {
    /// None: only whether the batch verifies matters.
    None,
    /// The store state's (what the walk needs from a valid batch).
    State,
    /// All (a damaged batch's, to be put back).
    All,
}

/// Parses the batch at `pos`.
fn parse_batch(r: &mut Reader, pos: u64, values: Values) -> std::io::Result<Parsed> {
    let bad = |declared, items| Ok(Parsed::Bad { declared, items });
    let Some(start) = r.bytes(pos, START_LEN)? else {
        return Ok(if r.zero_from(pos)? {
            Parsed::End
        } else {
            Parsed::Bad {
                declared: None,
                items: Vec::new(),
            }
        });
    };
    let tag = start[0];
    let count = u32::from_le_bytes([start[1], start[2], start[3], start[4]]);
    let seqno = u64::from_le_bytes([
        start[5], start[6], start[7], start[8], start[9], start[10], start[11], start[12],
    ]);
    if tag != TAG_START {
        if tag == 0 && r.zero_from(pos)? {
            return Ok(Parsed::End);
        }
        return bad(None, Vec::new());
    }
    let mut at = pos + START_LEN;
    let mut items = Vec::new();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for _ in 0..count {
        let Some(tag) = r.bytes(at, 1)?.map(|b| b[0]) else {
            return bad(Some(count), items);
        };
        match tag {
            TAG_ITEM => {
                let Some(h) = r.bytes(at, ITEM_HEADER_LEN)? else {
                    return bad(Some(count), items);
                };
                let h: [u8; ITEM_HEADER_LEN as usize] = match h.try_into() {
                    Ok(h) => h,
                    Err(_) => return bad(Some(count), items),
                };
                let value_type = h[1];
                let compression = h[2];
                let keyspace_id =
                    u64::from_le_bytes([h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10]]);
                let key_len = u64::from(u16::from_le_bytes([h[11], h[12]]));
                let value_len = u64::from(u32::from_le_bytes([h[13], h[14], h[15], h[16]]));
                let on_disk = u64::from(u32::from_le_bytes([h[17], h[18], h[19], h[20]]));
                if !matches!(value_type, VALUE | TOMBSTONE | WEAK_TOMBSTONE)
                    || compression != 0
                    || value_len != on_disk
                {
                    return bad(Some(count), items);
                }
                let len = ITEM_HEADER_LEN + key_len + value_len;
                let Some(whole) = r.bytes(at, len)? else {
                    return bad(Some(count), items);
                };
                hasher.update(whole);
                let body = &whole[ITEM_HEADER_LEN as usize..];
                let (key, value) = body.split_at(key_len as usize);
                let keep = match values {
                    Values::None => false,
                    Values::State => key == STATE_KEY,
                    Values::All => true,
                };
                if values != Values::None {
                    items.push(Item {
                        keyspace_id,
                        value_type,
                        seq: record::seq_of(key).ok(),
                        state: key == STATE_KEY,
                        value: if keep { value.to_vec() } else { Vec::new() },
                    });
                }
                at += len;
            }
            TAG_CLEAR => {
                let Some(whole) = r.bytes(at, CLEAR_LEN)? else {
                    return bad(Some(count), items);
                };
                hasher.update(whole);
                at += CLEAR_LEN;
            }
            _ => return bad(Some(count), items),
        }
    }
    let Some(end) = r.bytes(at, END_LEN)? else {
        return bad(Some(count), items);
    };
    let checksum = u64::from_le_bytes([
        end[1], end[2], end[3], end[4], end[5], end[6], end[7], end[8],
    ]);
    if end[0] != TAG_END || end[9..13] != MAGIC || checksum != hasher.digest() {
        return bad(Some(count), items);
    }
    Ok(Parsed::Batch {
        end: at + END_LEN,
        seqno,
        items,
    })
}

/// The first position at or after `from` where a valid batch starts.
fn resync(r: &mut Reader, from: u64) -> std::io::Result<Option<u64>> {
    let mut pos = from;
    while let Some(candidate) = r.find(pos, TAG_START)? {
        if let Parsed::Batch { .. } = parse_batch(r, candidate, Values::None)? {
            return Ok(Some(candidate));
        }
        pos = candidate + 1;
    }
    Ok(None)
}

/// Writes a batch's sequence number in place (it is not checksummed).
fn patch_seqno(path: &Path, batch: u64, seqno: u64) -> std::io::Result<()> {
    let file = File::options().write(true).open(path)?;
    file.write_all_at(&seqno.to_le_bytes(), batch + 1 + 4)?;
    file.sync_all()
}

/// Cuts the file: only a tail is set_len'd away (as fjall itself does);
/// damage between batches is cut by rewriting the file beside it (fsynced,
/// renamed over it, directory fsynced).
fn cut(path: &Path, cuts: &Cuts) -> std::io::Result<()> {
    if cuts.remove.is_empty() {
        let file = File::options().write(true).open(path)?;
        file.set_len(cuts.keep_until)?;
        return file.sync_all();
    }
    let source = File::open(path)?;
    let tmp = path.with_extension("jnl.vigil-repair");
    let mut out = File::create(&tmp)?;
    let mut buf = vec![0u8; WINDOW];
    let mut keep = Vec::new();
    let mut pos = 0;
    for r in &cuts.remove {
        keep.push(pos..r.start);
        pos = r.end;
    }
    keep.push(pos..cuts.keep_until);
    for range in keep {
        let mut at = range.start;
        while at < range.end {
            let n = usize::try_from(range.end - at).map_or(WINDOW, |n| n.min(WINDOW));
            let chunk = buf.get_mut(..n).unwrap_or_default();
            source.read_exact_at(chunk, at)?;
            out.write_all(chunk)?;
            at += n as u64;
        }
    }
    out.sync_all()?;
    drop(out);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Positional reads of one journal file through a window.
struct Reader {
    file: File,
    len: u64,
    window: Vec<u8>,
    start: u64,
}

impl Reader {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            window: Vec::new(),
            start: 0,
        })
    }

    /// `n` bytes at `pos`, or `None` past the end of the file.
    fn bytes(&mut self, pos: u64, n: u64) -> std::io::Result<Option<&[u8]>> {
        let Some(end) = pos.checked_add(n).filter(|e| *e <= self.len) else {
            return Ok(None);
        };
        let window_end = self.start + self.window.len() as u64;
        if pos < self.start || end > window_end {
            // Bounded by the file's length (checked above).
            let size = usize::try_from((self.len - pos).min(n.max(WINDOW as u64)))
                .map_err(std::io::Error::other)?;
            self.window.resize(size, 0);
            self.file.read_exact_at(&mut self.window, pos)?;
            self.start = pos;
        }
        let from = usize::try_from(pos - self.start).map_err(std::io::Error::other)?;
        let to = usize::try_from(end - self.start).map_err(std::io::Error::other)?;
        Ok(self.window.get(from..to))
    }

    /// The first position at or after `from` holding `byte`.
    fn find(&mut self, from: u64, byte: u8) -> std::io::Result<Option<u64>> {
        let mut pos = from;
        while pos < self.len {
            let n = (self.len - pos).min(WINDOW as u64);
            let Some(chunk) = self.bytes(pos, n)? else {
                return Ok(None);
            };
            if let Some(i) = chunk.iter().position(|b| *b == byte) {
                return Ok(Some(pos + i as u64));
            }
            pos += n;
        }
        Ok(None)
    }

    /// Whether every byte from `from` to the end is zero (fjall preallocates
    /// journal files with zeros).
    fn zero_from(&mut self, from: u64) -> std::io::Result<bool> {
        let mut pos = from;
        while pos < self.len {
            let n = (self.len - pos).min(WINDOW as u64);
            let Some(chunk) = self.bytes(pos, n)? else {
                return Ok(true);
            };
            if chunk.iter().any(|b| *b != 0) {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }

    /// Whether an end marker (tag and magic) appears at or after `from`.
    fn contains_end_marker(&mut self, from: u64) -> std::io::Result<bool> {
        let mut pos = from;
        while let Some(m) = self.find(pos, MAGIC[0])? {
            if m >= from + 9
                && self.bytes(m, 4)? == Some(&MAGIC[..])
                && self.bytes(m - 9, 1)? == Some(&[TAG_END][..])
            {
                return Ok(true);
            }
            pos = m + 1;
        }
        Ok(false)
    }
}

/// Items of a damaged batch that may be store records: not in the meta
/// keyspace, keyed by a seq, values.
pub(super) fn record_items(damage: &Damage) -> impl Iterator<Item = (u64, &Item)> {
    damage
        .parsed
        .iter()
        .filter(|i| i.value_type == VALUE && !i.state)
        .filter_map(|i| i.seq().map(|s| (s, i)))
}

/// After fjall has opened: puts back each record of the damaged batches that
/// still authenticates, quarantines each one that is lost, counts them, and
/// recounts the backlog figures (the state written with a damaged batch is
/// gone, and the later ones counted its records).
pub(super) fn settle(
    shared: &Shared,
    state: &mut StoreStats,
    inspection: &Inspection,
) -> Result<(), StoreError> {
    let engine = |e| StoreError::engine(&shared.dir, e);
    let mut wb = shared.db.batch().durability(Some(PersistMode::SyncAll));
    let mut entries = Vec::new();
    for damage in &inspection.damage {
        let mut recovered = HashSet::new();
        for (seq, item) in record_items(damage) {
            if damage.deleted_later(seq) {
                continue;
            }
            let Some(ks) = authentic_area(shared, seq, &item.value) else {
                continue;
            };
            if ks.get(record::key(seq)).map_err(engine)?.is_none() {
                wb.insert(ks, record::key(seq), item.value.clone());
            }
            recovered.insert(seq);
            state.next_seq = state.next_seq.max(seq.saturating_add(1));
        }
        let place = format!(
            "fjall journal {} at byte {} ({} bytes cut)",
            damage.file.display(),
            damage.offset,
            damage.len
        );
        // Which seqs the batch gave out: from its neighbours' states, or from
        // its own items when every one it declared parsed.
        let given_out = damage.seqs().or_else(|| {
            let whole = damage
                .declared
                .is_some_and(|n| n as usize == damage.parsed.len());
            whole.then(|| record_items(damage).map(|(seq, _)| seq).collect())
        });
        match given_out {
            Some(seqs) => {
                let mut lost = Vec::new();
                for seq in seqs {
                    if recovered.contains(&seq)
                        || damage.deleted_later(seq)
                        || present(shared, seq)?
                    {
                        continue;
                    }
                    lost.push(seq);
                }
                tracing::error!(
                    place = %place,
                    recovered = recovered.len(),
                    lost = lost.len(),
                    "a damaged batch in the store's journal could not be replayed; every later \
                     batch was kept, its records that still authenticate were put back, the \
                     others are lost and quarantined (counted in vigil_store_quarantined)"
                );
                for seq in lost {
                    // The damaged value as found, when its item parsed.
                    let raw = record_items(damage)
                        .find(|(s, _)| *s == seq)
                        .map(|(_, item)| item.value.clone())
                        .unwrap_or_default();
                    entries.push(QuarantineEntry {
                        keyspace: JOURNAL.into(),
                        seq,
                        reason: format!(
                            "lost: its write batch was damaged in the {place} and could not be \
                             recovered"
                        ),
                        quarantined_at: Timestamp::now(),
                        raw,
                    });
                }
            }
            None => {
                let declared = damage
                    .declared
                    .map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
                tracing::error!(
                    place = %place,
                    recovered = recovered.len(),
                    "the last batch in the store's journal was damaged after it was written; \
                     its records that still authenticate were put back, the others are lost \
                     and quarantined as one entry (counted in vigil_store_quarantined)"
                );
                entries.push(QuarantineEntry {
                    keyspace: JOURNAL.into(),
                    seq: 0,
                    reason: format!(
                        "lost: the last write batch in the {place} was damaged; it held \
                         {declared} entries (records and bookkeeping), {} records were \
                         recovered, the seqs of the others are not known",
                        recovered.len()
                    ),
                    quarantined_at: Timestamp::now(),
                    raw: Vec::new(),
                });
            }
        }
    }
    record_losses(shared, state, wb, &entries)
}

/// Commits `wb` with `entries` added to the quarantine, counts every area
/// again and persists the state: the end of a repair at open.
pub(super) fn record_losses(
    shared: &Shared,
    state: &mut StoreStats,
    mut wb: fjall::OwnedWriteBatch,
    entries: &[QuarantineEntry],
) -> Result<(), StoreError> {
    for entry in entries {
        let encoded = record::encode_quarantine(entry)
            .map_err(|e| StoreError::Persist(format!("cannot encode a quarantine entry: {e}")))?;
        let qseq = state.next_seq;
        state.next_seq += 1;
        wb.insert(&shared.quarantine, record::key(qseq), encoded);
        state.counters.quarantined += 1;
    }
    wb.commit()
        .map_err(|e| StoreError::Persist(format!("{e:?}")))?;
    recount(shared, state)?;
    let encoded = postcard::to_allocvec(&*state)
        .map_err(|e| StoreError::Persist(format!("cannot encode the store state: {e}")))?;
    let mut wb = shared.db.batch().durability(Some(PersistMode::SyncAll));
    wb.insert(&shared.meta, STATE_KEY, encoded);
    wb.commit()
        .map_err(|e| StoreError::Persist(format!("{e:?}")))?;
    Ok(())
}

/// The keyspace of a lost record's quarantine entry: which lane it was in is
/// not known.
const JOURNAL: &str = "journal";

/// The area (lane or dead-letter) `value` authenticates in under `seq`.
fn authentic_area<'a>(shared: &'a Shared, seq: u64, value: &[u8]) -> Option<&'a Keyspace> {
    for (ks, name) in shared.lanes.iter().zip(&shared.lane_names) {
        if shared.seal_for(name, seq).open::<Event>(value).is_ok() {
            return Some(ks);
        }
    }
    shared
        .seal_for(DEAD_LETTER, seq)
        .open::<DeadLetterEntry>(value)
        .is_ok()
        .then_some(&shared.dead_letter)
}

/// Whether any area holds `seq` (in a table already, or replayed).
fn present(shared: &Shared, seq: u64) -> Result<bool, StoreError> {
    for ks in shared
        .lanes
        .iter()
        .chain([&shared.dead_letter, &shared.quarantine])
    {
        match ks.get(record::key(seq)) {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            // Unreadable means present: the scan quarantines it when it gets there.
            Err(e) if is_damage(&e) => return Ok(true),
            Err(e) => return Err(StoreError::engine(&shared.dir, e)),
        }
    }
    Ok(false)
}

/// Counts every area's records and bytes again, and each lane's cursor.
fn recount(shared: &Shared, state: &mut StoreStats) -> Result<(), StoreError> {
    for (p, ks) in shared.lanes.iter().enumerate() {
        let Some(lane) = state.lanes.get_mut(p) else {
            continue;
        };
        if let Some((messages, bytes, first)) = count(shared, ks)? {
            lane.messages = messages;
            lane.bytes = bytes;
            lane.oldest = None;
            if let Some(first) = first {
                lane.cursor = first;
            }
        }
    }
    if let Some((messages, bytes, _)) = count(shared, &shared.dead_letter)? {
        state.dead_letter = AreaFigures { messages, bytes };
    }
    if let Some((messages, bytes, _)) = count(shared, &shared.quarantine)? {
        state.quarantine = AreaFigures { messages, bytes };
    }
    Ok(())
}

/// Records, bytes and first seq of one keyspace; `None` if a damaged table
/// stops the count (the figures kept are then the persisted ones).
fn count(shared: &Shared, ks: &Keyspace) -> Result<Option<(u64, u64, Option<u64>)>, StoreError> {
    let (mut messages, mut bytes, mut first) = (0u64, 0u64, None);
    for guard in ks.iter() {
        match guard.into_inner() {
            Ok((k, v)) => {
                let Ok(seq) = record::seq_of(&k) else {
                    continue;
                };
                first.get_or_insert(seq);
                messages += 1;
                bytes += (KEY_LEN + v.len()) as u64;
            }
            Err(e) if is_damage(&e) => return Ok(None),
            Err(e) => return Err(StoreError::engine(&shared.dir, e)),
        }
    }
    Ok(Some((messages, bytes, first)))
}
