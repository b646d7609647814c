//! The loss oracle (`DESIGN.md` section 4).
//!
//! - **lost**: acknowledged by Vigil, never received by the cloud. Must be 0.
//! - **unexpected**: received but never sent, or failing its sha256. Must be 0.
//! - **duplicated**: arrivals beyond the first of the same message.
//! - **reordered**: first arrivals of a device's messages at one priority that
//!   came after a later message of the same device and priority.
//! - **sequence gaps**: numbers missing from a device's envelope `seq`s
//!   (Vigil numbers each device's stored messages 1, 2, ... without gaps), up
//!   to the highest that arrived. A gap is a loss or an eviction; evictions
//!   are announced by gap notices.
//!
//! Gap notices (device `$vigil`) are counted apart; they must verify too.

use std::collections::{HashMap, HashSet};

use crate::envelope::VIGIL_DEVICE;

use crate::ledger::{Arrived, Sent};

/// The verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Messages the devices published.
    pub sent: u64,
    /// Of those, acknowledged by Vigil.
    pub acknowledged: u64,
    /// Envelopes the cloud received (duplicates included, gap notices not).
    pub received: u64,
    /// Acknowledged but never received. Must be 0.
    pub lost: u64,
    /// Received but never sent, or failing verification. Must be 0.
    pub unexpected: u64,
    /// Arrivals beyond the first of each message.
    pub duplicated: u64,
    /// First arrivals out of order within a device and priority.
    pub reordered: u64,
    /// Sent without an acknowledgement, and not received either (the device
    /// knows it was not accepted; not a loss).
    pub unacknowledged: u64,
    /// Sent without an acknowledgement but received all the same (Vigil
    /// stored it and was stopped before its PUBACK left). Allowed.
    pub recovered: u64,
    /// Device sequence numbers missing below the highest received.
    pub sequence_gaps: u64,
    /// Gap notices received.
    pub gap_notices: u64,
    /// Up to 10 lost messages, as `device#counter`, for the report.
    pub lost_examples: Vec<String>,
}

impl Report {
    /// The fault tier's one-line summary:
    /// `fault=<name> lost=<n> recovered=<n> unexpected=<n> duplicated=<n>`.
    pub fn fault_line(&self, name: &str) -> String {
        format!(
            "fault={name} lost={} recovered={} unexpected={} duplicated={}",
            self.lost, self.recovered, self.unexpected, self.duplicated
        )
    }

    /// Nothing lost and nothing unexpected.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.unexpected == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sent          {}", self.sent)?;
        writeln!(f, "acknowledged  {}", self.acknowledged)?;
        writeln!(f, "received      {}", self.received)?;
        writeln!(f, "lost          {}", self.lost)?;
        writeln!(f, "unexpected    {}", self.unexpected)?;
        writeln!(f, "duplicated    {}", self.duplicated)?;
        writeln!(f, "recovered     {}", self.recovered)?;
        writeln!(f, "reordered     {}", self.reordered)?;
        writeln!(f, "seq gaps      {}", self.sequence_gaps)?;
        writeln!(f, "gap notices   {}", self.gap_notices)?;
        if !self.lost_examples.is_empty() {
            writeln!(f, "lost, e.g.    {}", self.lost_examples.join(", "))?;
        }
        write!(
            f,
            "verdict       {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// Compares what devices sent with what the cloud received.
pub fn judge(sent: &[Sent], arrived: &[Arrived]) -> Report {
    let mut r = Report {
        sent: sent.len() as u64,
        acknowledged: sent.iter().filter(|s| s.acked).count() as u64,
        ..Report::default()
    };
    let by_sha: HashMap<&str, &Sent> = sent.iter().map(|s| (s.sha256.as_str(), s)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut seqs: HashMap<&str, HashSet<u64>> = HashMap::new();
    // Highest counter seen so far per (device, priority).
    let mut high: HashMap<(&str, u8), u64> = HashMap::new();
    for a in arrived {
        if a.device == VIGIL_DEVICE {
            r.gap_notices += 1;
            if !a.verified {
                r.unexpected += 1;
            }
            continue;
        }
        r.received += 1;
        let Some(s) = by_sha.get(a.sha256.as_str()).filter(|_| a.verified) else {
            r.unexpected += 1;
            continue;
        };
        seqs.entry(a.device.as_str()).or_default().insert(a.seq);
        if !seen.insert(s.sha256.as_str()) {
            r.duplicated += 1;
            continue;
        }
        let h = high.entry((s.device.as_str(), s.priority)).or_insert(0);
        if s.counter < *h {
            r.reordered += 1;
        } else {
            *h = s.counter;
        }
    }
    for got in seqs.values() {
        let top = got.iter().copied().max().unwrap_or(0);
        r.sequence_gaps += top - got.len() as u64;
    }
    for s in sent {
        if seen.contains(s.sha256.as_str()) {
            if !s.acked {
                r.recovered += 1;
            }
            continue;
        }
        if s.acked {
            r.lost += 1;
            if r.lost_examples.len() < 10 {
                r.lost_examples.push(format!("{}#{}", s.device, s.counter));
            }
        } else {
            r.unacknowledged += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(device: &str, counter: u64, priority: u8, acked: bool) -> Sent {
        Sent {
            device: device.into(),
            counter,
            priority,
            sha256: format!("{device}-{counter}"),
            acked,
        }
    }

    fn arrived(s: &Sent) -> Arrived {
        Arrived {
            id: format!("id-{}", s.sha256),
            device: s.device.clone(),
            seq: s.counter,
            priority: s.priority,
            kind: "measurement".into(),
            sha256: s.sha256.clone(),
            verified: true,
        }
    }

    #[test]
    fn a_clean_run_passes() {
        let s: Vec<_> = (1..=5).map(|i| sent("bed-1", i, 1, true)).collect();
        let a: Vec<_> = s.iter().map(arrived).collect();
        let r = judge(&s, &a);
        assert!(r.passed(), "{r}");
        assert_eq!((r.sent, r.acknowledged, r.received), (5, 5, 5));
        assert_eq!((r.lost, r.duplicated, r.reordered), (0, 0, 0));
    }

    #[test]
    fn missing_sequence_numbers_are_counted() {
        let s: Vec<_> = (1..=6).map(|i| sent("bed-1", i, 1, true)).collect();
        let a: Vec<_> = [0, 1, 4, 5].iter().map(|&i| arrived(&s[i])).collect();
        let r = judge(&s, &a);
        assert_eq!((r.lost, r.sequence_gaps), (2, 2), "{r}");
    }

    #[test]
    fn losses_duplicates_reorders_and_forgeries_are_counted() {
        let s: Vec<_> = (1..=5)
            .map(|i| sent("bed-1", i, 1, i != 5))
            .chain([sent("bed-2", 1, 0, true)])
            .collect();
        // 2 arrives before 1 (reordered), 3 twice, 4 never (lost),
        // 5 was never acknowledged and never arrived (not a loss), a forgery,
        // and bed-2's message failed its digest.
        let mut forged = arrived(&sent("bed-9", 1, 1, true));
        forged.sha256 = "nobody-sent-this".into();
        let mut corrupt = arrived(&s[5]);
        corrupt.verified = false;
        let a = vec![
            arrived(&s[1]),
            arrived(&s[0]),
            arrived(&s[2]),
            arrived(&s[2]),
            forged,
            corrupt,
        ];
        let r = judge(&s, &a);
        assert!(!r.passed());
        assert_eq!(
            r.lost, 2,
            "bed-1#4, and bed-2#1 whose only copy was corrupt"
        );
        assert_eq!(r.unexpected, 2);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.reordered, 1);
        assert_eq!(r.unacknowledged, 1);
        assert_eq!(
            r.sequence_gaps, 0,
            "4 and 5 are missing above the highest seq"
        );
        assert_eq!(r.lost_examples, vec!["bed-1#4", "bed-2#1"]);
        assert!(r.to_string().contains("FAIL"));
    }
}
