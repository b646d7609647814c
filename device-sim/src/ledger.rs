//! The two ledgers, as JSON lines: devices record each message they sent and
//! whether Vigil acknowledged it; the verifying cloud records each envelope
//! that arrived. The payload's SHA-256 joins them (the envelope's `sha256`
//! covers the payload exactly as the device sent it, and every simulated
//! payload is unique).

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::envelope::GapNotice;

/// One message a device published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// MQTT client id.
    pub device: String,
    /// The device's own counter (1, 2, ...), across all its topics.
    pub counter: u64,
    /// The priority its topic maps to.
    pub priority: u8,
    /// Hex SHA-256 of the payload.
    pub sha256: String,
    /// Whether Vigil's PUBACK arrived.
    pub acked: bool,
}

/// One envelope the cloud received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrived {
    /// Envelope `id`.
    pub id: String,
    /// Envelope `device`.
    pub device: String,
    /// Envelope `seq` (Vigil's per-device sequence number).
    pub seq: u64,
    /// Envelope `priority`.
    pub priority: u8,
    /// Envelope `kind`.
    pub kind: String,
    /// The payload's hex SHA-256 as recomputed by the cloud (empty when the
    /// envelope did not parse).
    pub sha256: String,
    /// Whether the payload matched the envelope's `sha256`.
    pub verified: bool,
    /// For a gap notice (device `$vigil`, kind `gap-notice`): its payload,
    /// when it parsed and was consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<GapNotice>,
}

impl Arrived {
    /// The record a faithful cloud makes of `sent`'s envelope, with Vigil's
    /// `seq` taken to be the device's counter (true when the device publishes
    /// on one connection and nothing is evicted). For tests and examples.
    pub fn as_sent(sent: &Sent) -> Self {
        Arrived {
            id: format!("id-{}", sent.sha256),
            device: sent.device.clone(),
            seq: sent.counter,
            priority: sent.priority,
            kind: "measurement".into(),
            sha256: sent.sha256.clone(),
            verified: true,
            notice: None,
        }
    }
}

/// A ledger file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Opening, writing or reading failed.
    #[error("ledger {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a ledger record.
    #[error("ledger {path} line {line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// serde_json's message.
        reason: String,
    },
}

/// Appends records to a ledger file, flushing each one.
#[derive(Debug)]
pub struct Writer {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Writer {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, LedgerError> {
        let file = std::fs::File::create(path).map_err(|source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        })
    }

    /// Writes one record as a line.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), LedgerError> {
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        let line = serde_json::to_string(record).map_err(|e| LedgerError::Malformed {
            path: self.path.clone(),
            line: 0,
            reason: e.to_string(),
        })?;
        writeln!(self.file, "{line}").map_err(io)?;
        self.file.flush().map_err(io)
    }
}

/// Reads every record of a ledger.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, LedgerError> {
    let file = std::fs::File::open(path).map_err(|source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| LedgerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| LedgerError::Malformed {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sent.jsonl");
        let rec = Sent {
            device: "bed-1".into(),
            counter: 1,
            priority: 0,
            sha256: "ab".into(),
            acked: true,
        };
        let mut w = Writer::create(&path).unwrap();
        w.append(&rec).unwrap();
        w.append(&rec).unwrap();
        assert_eq!(read::<Sent>(&path).unwrap(), vec![rec.clone(), rec]);
        std::fs::write(&path, "{\"device\":1}\n").unwrap();
        let err = read::<Sent>(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
