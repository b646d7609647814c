//! Benchmark-only ablations of the ingest path: cargo feature `ablation`, off
//! by default, so no production build contains this module. The library's
//! own unit tests compile it too (`cfg(test)`), so `cargo test` type-checks
//! every ablation branch and runs the test below: the code cannot rot unseen
//! between the sessions that measure with it.
//!
//! Row 2 of `vigil-sim bench` compares Vigil's durable ingest with a bare
//! rumqttd that stores nothing. To say what the gap is made of (a measurement,
//! not a guess), an ablation build takes one stage out of the path when
//! `VIGIL_ABLATE` is set in its environment:
//!
//! * `gate`: [`super::Store::submit`] acknowledges at once and drops the
//!   message. What is left is the gate: device connections, MQTT decoding,
//!   topic rules, the PUBACK.
//! * `engine`: the writer does everything (device sequence numbers, ids,
//!   sealing, the batch, the replies) except hand the batch to fjall: no
//!   journal write, memtable, fsync, flush or compaction.
//! * `log`: the writer does everything, and instead of fjall's commit writes
//!   each batch's records (key and sealed value, the device counters and the
//!   state, as fjall would get them) once to a plain append-only file and
//!   fdatasyncs it, as the cheapest append-only segment log would: no
//!   skiplist, no second write into a table, no compaction. It measures the
//!   floor of a storage engine other than fjall's LSM tree, not that engine:
//!   no index, no reads, no reclaim, and the file starts over at
//!   [`SEGMENT_BYTES`] so a long fill does not fill the disk.
//! * `log-preallocated`: as `log`, with the file written through with zeros
//!   (and fsynced) at open, as a log that recycles its segments would have
//!   it: the fill's writes then allocate no blocks and change no file size,
//!   so each fdatasync flushes data alone.
//!
//! Either way nothing is kept that Vigil could read back; the store logs that
//! at open, loudly.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use super::StoreError;

/// The variable an ablation build reads at [`super::Store::open`].
pub const VAR: &str = "VIGIL_ABLATE";

/// Which stage is taken out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ablation {
    /// Acknowledge at submit; nothing reaches the writer.
    Gate,
    /// Everything but fjall's commit.
    Engine,
    /// fjall's commit replaced by one write and fdatasync of a plain file;
    /// `preallocated`: the file written through with zeros at open, so that
    /// the fill's writes allocate no blocks and change no file size.
    Log { preallocated: bool },
}

impl Ablation {
    /// The ablation `VIGIL_ABLATE` asks for: `None` when unset.
    pub(super) fn from_env() -> Result<Option<Self>, StoreError> {
        let ablation = Self::parse(std::env::var_os(VAR).as_deref())?;
        if let Some(ablation) = ablation {
            tracing::warn!(
                ablation = ?ablation,
                "BENCHMARK-ONLY ABLATION ({VAR}): nothing is stored on disk; every message \
                 acknowledged is lost at exit. Never run this build on a ward"
            );
        }
        Ok(ablation)
    }

    fn parse(value: Option<&std::ffi::OsStr>) -> Result<Option<Self>, StoreError> {
        let Some(value) = value else {
            return Ok(None);
        };
        match value.to_str() {
            Some("gate") => Ok(Some(Self::Gate)),
            Some("engine") => Ok(Some(Self::Engine)),
            Some("log") => Ok(Some(Self::Log {
                preallocated: false,
            })),
            Some("log-preallocated") => Ok(Some(Self::Log { preallocated: true })),
            _ => Err(StoreError::Options(format!(
                "{VAR}={value:?} is not an ablation: this benchmark-only build takes \
                 {VAR}=gate, {VAR}=engine, {VAR}=log or {VAR}=log-preallocated, or the \
                 variable unset"
            ))),
        }
    }
}

/// Where the `log` ablation's file starts over.
pub(super) const SEGMENT_BYTES: u64 = 256 << 20;

/// The `log` ablation's file: `<store>/ablation-segment.log`, each entry a
/// u32 BE key length, the key, a u32 BE value length, the value (the sealed
/// value is authenticated by its AES-GCM tag, so a torn tail shows).
pub(super) struct SegmentLog {
    file: File,
    at: u64,
    buf: Vec<u8>,
}

impl SegmentLog {
    pub(super) fn open(dir: &Path, preallocated: bool) -> Result<Self, StoreError> {
        let path = dir.join("ablation-segment.log");
        let file = File::options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Persist(format!("cannot open {}: {e}", path.display())))?;
        let mut log = Self {
            file,
            at: 0,
            buf: Vec::new(),
        };
        if preallocated {
            let fail = |e: std::io::Error| StoreError::Persist(format!("ablation log: {e}"));
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..SEGMENT_BYTES / (1 << 20) {
                log.file.write_all(&zeros).map_err(fail)?;
            }
            log.file.sync_all().map_err(fail)?;
            log.file.seek(SeekFrom::Start(0)).map_err(fail)?;
        }
        Ok(log)
    }

    /// Frames one entry into the pending write.
    pub(super) fn push(&mut self, key: &[u8], value: &[u8]) {
        for part in [key, value] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            self.buf.extend_from_slice(&len.to_be_bytes());
            self.buf.extend_from_slice(part);
        }
    }

    /// Writes what was pushed in one `write`, then fdatasyncs when `sync`.
    pub(super) fn commit(&mut self, sync: bool) -> Result<(), StoreError> {
        let fail = |e: std::io::Error| StoreError::Persist(format!("ablation log: {e}"));
        if self.at >= SEGMENT_BYTES {
            self.file.seek(SeekFrom::Start(0)).map_err(fail)?;
            self.at = 0;
        }
        self.file.write_all(&self.buf).map_err(fail)?;
        self.at += self.buf.len() as u64;
        self.buf.clear();
        if sync {
            self.file.sync_data().map_err(fail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn names_parse_and_anything_else_is_refused() {
        let parse = |v: Option<&str>| Ablation::parse(v.map(OsStr::new));
        assert_eq!(parse(None).ok(), Some(None));
        assert_eq!(parse(Some("gate")).ok(), Some(Some(Ablation::Gate)));
        assert_eq!(parse(Some("engine")).ok(), Some(Some(Ablation::Engine)));
        assert_eq!(
            parse(Some("log")).ok(),
            Some(Some(Ablation::Log {
                preallocated: false
            }))
        );
        assert_eq!(
            parse(Some("log-preallocated")).ok(),
            Some(Some(Ablation::Log { preallocated: true }))
        );
        for bad in ["", "Gate", "fjall", "engine "] {
            let err = parse(Some(bad)).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("VIGIL_ABLATE=gate")),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn the_log_writes_each_entry_once_and_starts_over_past_a_segment() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut log = SegmentLog::open(dir.path(), false)?;
        log.push(b"k1", b"sealed");
        log.push(b"", b"state");
        log.commit(true)?;
        let path = dir.path().join("ablation-segment.log");
        let written = std::fs::read(&path)?;
        let expected: Vec<u8> = [
            &2u32.to_be_bytes()[..],
            b"k1",
            &6u32.to_be_bytes(),
            b"sealed",
            &0u32.to_be_bytes(),
            &5u32.to_be_bytes(),
            b"state",
        ]
        .concat();
        assert_eq!(written, expected);
        // Past a segment the next commit writes from the start again.
        log.at = SEGMENT_BYTES;
        log.push(b"k2", b"x");
        log.commit(false)?;
        let again = std::fs::read(&path)?;
        assert_eq!(
            &again[..11],
            &[&2u32.to_be_bytes()[..], b"k2", &1u32.to_be_bytes(), b"x"].concat()[..]
        );
        assert_eq!(again.len(), expected.len());
        Ok(())
    }
}
