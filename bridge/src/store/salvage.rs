//! Finding the tables fjall cannot read whole, so the writer can take them
//! out.
//!
//! A table block whose checksum fails (a flipped bit, a bad sector) is read
//! around by [`super::scan`]: its records are quarantined and the rest of the
//! lane is delivered. But the table itself stays, and an LSM tree must one day
//! merge it: as soon as deletions (the cloud's acknowledgements, the
//! quarantine's own tombstones) lie over its keys, a compaction has to read
//! it, and cannot. fjall 3.1 answered that by poisoning the whole database:
//! every later write failed, Vigil stopped, and after a restart the same
//! compaction stopped it again. The vendored fjall now counts the failure
//! instead (`vendor/fjall/VIGIL-PATCH.md`), and the store writer takes the
//! damaged table out (`Writer::take_out`): the records it can still read are
//! written again under their own keys (same seq, same sealed bytes, same place
//! in the lane), the ones it cannot are quarantined, and fjall drops every
//! table lying wholly inside the damaged one's key range.
//!
//! The same holds for the dead-letter and quarantine areas (keyed by seq like
//! the lanes); `meta` is not covered. A table whose index or filter block no
//! longer reads fails every point read in its range, though its records may
//! all be intact: it is found the same way (its index and filter blocks are
//! read too), or by the read that meets it ([`unsound_index_covering`]), and
//! the writer settles the keys it cannot read from the table's data blocks
//! (`Writer::rescue`). This module only reads: each table is read through
//! once, block by block, straight from its file.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::{Duration, Instant};

use fjall::AbstractTree as _;
use tokio::sync::mpsc;

use super::Shared;
use super::record;
use super::writer::{Area, Command};

/// A table that cannot be read whole, in one of the seq-keyed areas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DamagedTable {
    /// A lane, dead-letter or quarantine.
    pub(super) area: Area,
    /// fjall's id of the table (for the log).
    pub(super) id: u64,
    /// The smallest and largest seq the table holds (records or tombstones).
    pub(super) first: u64,
    pub(super) last: u64,
    /// Its file (read again block by block when its index or filter does
    /// not read).
    pub(super) path: std::path::PathBuf,
    /// Its index or filter blocks do not read: every point read in its range
    /// fails, so its keys are settled from its data blocks alone.
    pub(super) index_unsound: bool,
    /// What reading it ran into.
    pub(super) why: String,
}

/// Reads every table of the lanes, dead-letter and quarantine and returns
/// those that fail to read whole. Costs one sequential read of those tables,
/// so it runs on a thread of its own (see [`start_look`]), and only after
/// damage has shown itself (a failed compaction, an unreadable record).
/// `meta` (string keys: the state, device counters) is not covered. It holds
/// the store only while it lists the tables (a closed store is not kept
/// open); the tables themselves stay readable while it reads them.
pub(super) fn damaged_tables(shared: &Weak<Shared>) -> Vec<DamagedTable> {
    let mut tables = Vec::new();
    {
        let Some(shared) = shared.upgrade() else {
            return Vec::new();
        };
        let lanes = shared
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(p, ks)| Some((Area::Lane(u8::try_from(p).ok()?), ks)));
        let others = [
            (Area::DeadLetter, &shared.dead_letter),
            (Area::Quarantine, &shared.quarantine),
        ];
        for (area, ks) in lanes.chain(others) {
            let version = ks.tree.current_version();
            tables.extend(version.iter_tables().map(|t| (area, t.clone())));
        }
    }
    let mut out = Vec::new();
    for (area, table) in tables {
        let range = &table.metadata.key_range;
        let (Ok(first), Ok(last)) = (
            record::seq_of(range.min().as_ref()),
            record::seq_of(range.max().as_ref()),
        ) else {
            // Not keys Vigil writes: nothing it could take out by seq.
            continue;
        };
        let data = match table.scan() {
            Err(e) => Some(format!("{e:?}")),
            Ok(mut items) => items.find_map(|item| item.err().map(|e| format!("{e:?}"))),
        };
        let index = unsound_index(&table);
        let index_unsound = index.is_some();
        if let Some(why) = data.or(index) {
            out.push(DamagedTable {
                area,
                id: table.id(),
                first,
                last,
                path: table.path.as_ref().clone(),
                index_unsound,
                why,
            });
        }
    }
    out
}

/// What is wrong with `table`'s index or filter blocks, if any (its data
/// blocks may all be sound: every point read in its key range fails all the
/// same).
fn unsound_index(table: &fjall::salvage::Table) -> Option<String> {
    fjall::salvage::verify(table)
        .err()
        .map(|e| format!("index or filter: {e:?}"))
}

/// The table of `ks` (the area `area`) covering `seq` whose index or filter
/// blocks do not read, if there is one, skipping the tables in `sound` and
/// adding those found sound. Reads the index and filter blocks of each table
/// covering `seq` (about 1-2 % of a table); called only after a read of
/// `seq` failed.
fn unsound_index_covering(
    area: Area,
    ks: &fjall::Keyspace,
    seq: u64,
    sound: &mut HashSet<(Area, u64)>,
) -> Option<DamagedTable> {
    let key = record::key(seq);
    let version = ks.tree.current_version();
    version
        .iter_tables()
        .filter(|t| t.metadata.key_range.contains_key(&key))
        .find_map(|table| {
            if sound.contains(&(area, table.id())) {
                return None;
            }
            let Some(why) = unsound_index(table) else {
                if sound.len() < MAX_REMEMBERED {
                    sound.insert((area, table.id()));
                }
                return None;
            };
            let range = &table.metadata.key_range;
            Some(DamagedTable {
                area,
                id: table.id(),
                first: record::seq_of(range.min().as_ref()).ok()?,
                last: record::seq_of(range.max().as_ref()).ok()?,
                path: table.path.as_ref().clone(),
                index_unsound: true,
                why,
            })
        })
}

/// Starts a look for damaged tables on its own thread; what it finds comes
/// back to the store writer as a command (`found`), unless the store has
/// closed meanwhile. Returns whether the thread started.
pub(super) fn start_look(
    shared: Weak<Shared>,
    writer: mpsc::WeakSender<Command>,
    found: fn(Vec<DamagedTable>) -> Command,
) -> bool {
    std::thread::Builder::new()
        .name("vigil-damage-look".into())
        .spawn(move || {
            let tables = damaged_tables(&shared);
            if let Some(tx) = writer.upgrade() {
                let _ = tx.blocking_send(found(tables));
            }
        })
        .is_ok()
}

/// Whether the table `id` is still part of `ks`'s tree (a look's answer may
/// arrive after a take-out or a compaction changed it).
pub(super) fn still_holds(ks: &fjall::Keyspace, id: u64) -> bool {
    ks.tree
        .current_version()
        .iter_tables()
        .any(|t| t.id() == id)
}

/// Damaged tables are looked for at most this often (each look reads every
/// table once); after a look that found nothing to take out, or a take-out
/// that failed, the wait doubles, up to [`MAX_INTERVAL`] (damage in `meta`
/// keeps fjall's compactions failing, and a look cannot mend it).
const INTERVAL: Duration = Duration::from_secs(30);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The store writer's watch for damage: when a look is due, whether one is
/// running, and what the last one found.
#[derive(Debug)]
pub(super) struct Watch {
    /// fjall's failed background compactions as last seen.
    failed_seen: u64,
    /// A record fjall cannot read was quarantined since the last look.
    suspected: bool,
    /// When the last look started, and the wait before the next.
    last_look: Option<Instant>,
    interval: Duration,
    /// A look is running on its own thread.
    looking: bool,
    /// What the last look found, to take out after the current batch.
    found: Option<Vec<DamagedTable>>,
    /// Tables whose take-out failed (bounded): a read that meets them
    /// quarantines what it cannot read rather than wait for them.
    given_up: HashSet<(Area, u64)>,
    /// Tables whose index and filter blocks were read whole (bounded).
    sound: HashSet<(Area, u64)>,
}

/// How many tables [`Watch`] remembers as given up, and as sound.
const MAX_REMEMBERED: usize = 4096;

impl Watch {
    pub(super) fn new() -> Self {
        Self {
            failed_seen: 0,
            suspected: false,
            last_look: None,
            interval: INTERVAL,
            looking: false,
            found: None,
            given_up: HashSet::new(),
            sound: HashSet::new(),
        }
    }

    /// A record fjall cannot read was quarantined.
    pub(super) fn suspect(&mut self) {
        self.suspected = true;
    }

    /// A look's answer arrived.
    pub(super) fn answered(&mut self, tables: Vec<DamagedTable>) {
        self.looking = false;
        let found = self.found.get_or_insert_with(Vec::new);
        for table in tables {
            if !found
                .iter()
                .any(|t| (t.area, t.id) == (table.area, table.id))
            {
                found.push(table);
            }
        }
    }

    /// What the last look found, once, when it has answered, with the
    /// tables a read found since.
    pub(super) fn take_found(&mut self) -> Option<Vec<DamagedTable>> {
        self.found.take()
    }

    /// A read found `table` damaged: take it out after the current batch
    /// (once), unless taking it out failed before. Returns whether it will
    /// be (or already is to be) taken out.
    pub(super) fn take_out_next(&mut self, table: DamagedTable) -> bool {
        if self.given_up.contains(&(table.area, table.id)) {
            return false;
        }
        let found = self.found.get_or_insert_with(Vec::new);
        if !found
            .iter()
            .any(|t| (t.area, t.id) == (table.area, table.id))
        {
            found.push(table);
        }
        true
    }

    /// Taking out the table `id` of `area` failed: reads stop waiting for it.
    pub(super) fn give_up(&mut self, area: Area, id: u64) {
        if self.given_up.len() < MAX_REMEMBERED {
            self.given_up.insert((area, id));
        }
    }

    /// The table of `ks` (the area `area`) covering `seq` whose index or
    /// filter blocks do not read, if there is one ([`unsound_index_covering`]);
    /// tables found sound are remembered and not read again.
    pub(super) fn unsound_index_covering(
        &mut self,
        area: Area,
        ks: &fjall::Keyspace,
        seq: u64,
    ) -> Option<DamagedTable> {
        unsound_index_covering(area, ks, seq, &mut self.sound)
    }

    /// Whether a look should start now, given fjall's count of failed
    /// compactions: something new went wrong, no look is running and the
    /// wait is over. If so, the look counts as started.
    pub(super) fn start_if_due(&mut self, failed: u64) -> bool {
        if self.looking || (failed == self.failed_seen && !self.suspected) {
            return false;
        }
        if self.last_look.is_some_and(|t| t.elapsed() < self.interval) {
            return false;
        }
        self.failed_seen = failed;
        self.last_look = Some(Instant::now());
        self.looking = true;
        true
    }

    /// The look could not get a thread of its own (it runs in place).
    pub(super) fn look_ran_in_place(&mut self) {
        self.looking = false;
    }

    /// Failed compactions seen so far.
    pub(super) fn failed_seen(&self) -> u64 {
        self.failed_seen
    }

    /// A table was taken out: the next look may come soon.
    pub(super) fn took_out(&mut self) {
        self.interval = INTERVAL;
    }

    /// A look found nothing to take out, or a take-out failed: wait longer.
    /// Returns the new wait.
    pub(super) fn back_off(&mut self) -> Duration {
        self.interval = (self.interval * 2).min(MAX_INTERVAL);
        self.interval
    }

    /// After the take-outs: the compactions that failed meanwhile
    /// (`failed_now`, when tables were taken out) most likely failed on
    /// them, and only an overlapping damaged table calls for another look.
    pub(super) fn settled(&mut self, failed_now: Option<u64>, overlapped: bool) {
        if let Some(failed) = failed_now {
            self.failed_seen = failed;
        }
        self.suspected = overlapped;
    }
}
