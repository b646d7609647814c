//! Helpers shared by the store tests: build a store changing one setting at a
//! time, make ingests, and reach into fjall directly to damage records.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use vigil::crypto::MasterKey;
use vigil::event::{Ingest, Kind, Qos, Timestamp};
use vigil::store::{Store, StoreOptions};

pub const KEY: [u8; 32] = [0x42; 32];

/// Sends Vigil's tracing to the test harness, which prints it with a failing
/// test's output only (`info`, or what `RUST_LOG` says). Once per process;
/// later calls do nothing.
pub fn log_to_test() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rumqttd=off,fjall=off,lsm_tree=off")
    });
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init();
}

pub fn key() -> MasterKey {
    MasterKey::from_bytes(KEY)
}

pub fn options(dir: &Path) -> StoreOptions {
    StoreOptions::new(dir)
}

pub fn open(dir: &Path) -> Store {
    Store::open(options(dir), &key()).expect("open store")
}

pub fn open_with(dir: &Path, tweak: impl FnOnce(&mut StoreOptions)) -> Store {
    let mut o = options(dir);
    tweak(&mut o);
    Store::open(o, &key()).expect("open store")
}

pub fn ingest(device: &str, priority: u8, payload_len: usize) -> Ingest {
    Ingest {
        kind: if priority == 0 {
            Kind::Alert
        } else {
            Kind::Measurement
        },
        priority,
        device: device.to_string(),
        topic: format!("devices/{device}/vitals/p{priority}"),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at: Timestamp::now(),
        content_type: None,
        user_properties: vec![("unit".into(), "bpm".into())],
        payload: Bytes::from(vec![b'x'; payload_len]),
    }
}

/// Opens the store's fjall database directly (the store must be closed).
pub fn raw_db(dir: &Path) -> fjall::Database {
    fjall::Database::builder(dir.join("db"))
        .open()
        .expect("open fjall")
}

pub fn raw_keyspace(db: &fjall::Database, name: &str) -> fjall::Keyspace {
    db.keyspace(name, fjall::KeyspaceCreateOptions::default)
        .expect("keyspace")
}

/// Every file under `dir` with its length and content hash, to prove that an
/// operation changed nothing on disk.
pub fn snapshot(dir: &Path) -> Vec<(String, u64, [u8; 32])> {
    use sha2::Digest as _;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                let hash: [u8; 32] = sha2::Sha256::digest(&bytes).into();
                out.push((
                    path.strip_prefix(dir).unwrap().display().to_string(),
                    bytes.len() as u64,
                    hash,
                ));
            }
        }
    }
    out.sort();
    out
}
/// Flips one bit in the largest table file under `dir` (a fjall store's
/// `tables/` files), `at` of the way in (0.0 to 1.0). Returns the table's
/// length. Below the record layer: fjall's block checksum catches it.
pub fn flip_bit_in_largest_table(dir: &Path, at: f64) -> u64 {
    let mut tables = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.parent().is_some_and(|p| p.ends_with("tables")) {
                tables.push((std::fs::metadata(&p).unwrap().len(), p));
            }
        }
    }
    tables.sort();
    let (len, table) = tables.last().expect("a table file").clone();
    flip_bit_at(&table, at);
    len
}

/// Flips one bit `at` (a fraction of its length) into the file `path`.
fn flip_bit_at(path: &Path, at: f64) {
    let len = std::fs::metadata(path).unwrap().len();
    flip_bit_at_byte(path, ((len as f64 * at) as u64).min(len - 1));
}

/// Flips one bit of byte `at` of the file `path` (twice puts it back).
pub fn flip_bit_at_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// Flips one bit `at` (a fraction) into the largest table of the keyspace
/// `name` of a closed store (fjall's own keyspace of keyspace names, whose
/// table may be larger, is left alone).
pub fn flip_bit_in_table_of(dir: &Path, name: &str, at: f64) {
    use fjall::AbstractTree as _;
    let path = {
        let db = raw_db(dir);
        let ks = raw_keyspace(&db, name);
        let version = ks.tree.current_version();
        let largest = version
            .iter_tables()
            .max_by_key(|t| t.metadata.file_size)
            .expect("a table in the keyspace");
        largest.path.as_ref().clone()
    };
    flip_bit_at(&path, at);
}

/// A part of a table file that fjall reads when it opens the database (past
/// the data blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablePart {
    /// The (top-level) index block.
    Index,
    /// The filter block.
    Filter,
    /// The metadata block.
    Meta,
    /// The table of contents (where each of the above is).
    Contents,
    /// The file's trailer (where the table of contents is, and its checksum).
    Trailer,
}

impl TablePart {
    pub const ALL: [TablePart; 5] = [
        Self::Index,
        Self::Filter,
        Self::Meta,
        Self::Contents,
        Self::Trailer,
    ];
}

/// The tables of the keyspace `name` of a closed store, oldest first: each
/// one's file and where its data blocks end.
pub fn tables_of(dir: &Path, name: &str) -> Vec<(PathBuf, u64)> {
    use fjall::AbstractTree as _;
    let db = raw_db(dir);
    let ks = raw_keyspace(&db, name);
    let version = ks.tree.current_version();
    let mut tables: Vec<_> = version
        .iter_tables()
        .map(|t| (t.id(), t.path.as_ref().clone(), *t.regions.tli.offset()))
        .collect();
    tables.sort();
    tables.into_iter().map(|(_, p, end)| (p, end)).collect()
}

/// Flips one bit in the middle of `part` of the table file `path` of a
/// closed store; returns where.
pub fn flip_bit_in_part(dir: &Path, name: &str, path: &Path, part: TablePart) -> u64 {
    use fjall::AbstractTree as _;
    let (offset, len) = {
        let db = raw_db(dir);
        let ks = raw_keyspace(&db, name);
        let version = ks.tree.current_version();
        let table = version
            .iter_tables()
            .find(|t| t.path.as_ref() == path)
            .expect("the table");
        let handle = |h: fjall::salvage::BlockHandle| (*h.offset(), u64::from(h.size()));
        match part {
            TablePart::Index => handle(table.regions.tli),
            TablePart::Filter => handle(table.regions.filter.expect("a filter block")),
            TablePart::Meta => handle(table.regions.metadata),
            // The table of contents ends where the 38-byte trailer starts
            // (magic, version, checksum type, the contents' checksum, their
            // position and length); the trailer's checksum is 6 bytes in.
            TablePart::Contents => (std::fs::metadata(path).unwrap().len() - 38 - 8, 8),
            TablePart::Trailer => (std::fs::metadata(path).unwrap().len() - 38 + 6, 16),
        }
    };
    let at = offset + len / 2;
    flip_bit_at_byte(path, at);
    at
}

/// How many tables of a closed store's lanes, dead-letter and quarantine
/// fail to read whole (fjall's own sequential read of each table file).
pub fn unreadable_tables(dir: &Path) -> usize {
    use fjall::AbstractTree as _;
    let db = raw_db(dir);
    let names: Vec<String> = db
        .list_keyspace_names()
        .into_iter()
        .map(|n| n.to_string())
        .filter(|n| n.starts_with("priority-") || n == "dead-letter" || n == "quarantine")
        .collect();
    let mut bad = 0;
    for name in names {
        let ks = raw_keyspace(&db, &name);
        let version = ks.tree.current_version();
        for table in version.iter_tables() {
            let whole = table
                .scan()
                .map(|mut items| items.all(|i| i.is_ok()))
                .unwrap_or(false);
            if !whole {
                bad += 1;
            }
        }
    }
    bad
}

pub mod cloud;
pub mod gate;
pub mod process;
pub mod rig;

/// The store's fjall journal files, with where each one's data ends (fjall
/// preallocates them with zeros; every batch ends with a non-zero trailer).
pub fn journals(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("db")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "jnl") {
            // Read up to the first all-zero 64 KiB (the files are 64 MiB).
            use std::io::Read as _;
            let mut file = std::fs::File::open(&p).unwrap();
            let mut bytes = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                let n = file.read(&mut chunk).unwrap();
                bytes.extend_from_slice(&chunk[..n]);
                if n == 0 || chunk[..n].iter().all(|b| *b == 0) {
                    break;
                }
            }
            let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            out.push((p, end as u64));
        }
    }
    out.sort();
    out
}

/// Copies a closed store, each journal only up to where its data ends.
pub fn copy_store(from: &Path, to: &Path) {
    let ends: std::collections::HashMap<_, _> = journals(from).into_iter().collect();
    let mut stack = vec![from.to_path_buf()];
    while let Some(d) = stack.pop() {
        let target = to.join(d.strip_prefix(from).unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = match ends.get(&p) {
                Some(end) => {
                    use std::io::Read as _;
                    let mut bytes = vec![0u8; *end as usize];
                    std::fs::File::open(&p)
                        .unwrap()
                        .read_exact(&mut bytes)
                        .unwrap();
                    bytes
                }
                None => std::fs::read(&p).unwrap(),
            };
            std::fs::write(target.join(p.file_name().unwrap()), bytes).unwrap();
        }
    }
}
