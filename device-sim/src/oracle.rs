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
//!   are announced by gap notices, so a gap no notice covers is
//!   **unannounced**, and fails the run like a loss (Vigil stored a message,
//!   gave it a number, and it never arrived).
//! - **evicted**: acknowledged, never received, and announced by Vigil's gap
//!   notices (the contract's one loss path: the store quota was full). Per
//!   device and priority, at most as many as the notices for it count;
//!   beyond that, and always at priority 0 (alarms, which Vigil never
//!   evicts), a missing message is lost.
//!
//! Gap notices (device `$vigil`) are counted apart; they must verify, and
//! their payload must parse.

use std::collections::{HashMap, HashSet};

use crate::envelope::{GAP_NOTICE_KIND, GapNotice, VIGIL_DEVICE};

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
    /// Acknowledged but never received, and announced as evicted by a gap
    /// notice for its device and priority (within the notices' counts).
    pub evicted: u64,
    /// Device sequence numbers missing below the highest received.
    pub sequence_gaps: u64,
    /// Of those, numbers no gap notice for the device covers. Must be 0.
    pub unannounced_gaps: u64,
    /// Gap notices received.
    pub gap_notices: u64,
    /// Messages the gap notices announce as evicted (a notice and the one
    /// that replaced it, or a notice that arrived twice, counted once).
    pub announced: u64,
    /// Vigil's own count of evictions (`vigil_evicted_total`), when the run
    /// could read it: it must equal `announced` (every eviction announced,
    /// none made up).
    pub evicted_by_vigil: Option<u64>,
    /// Up to 10 lost messages, as `device#counter`, for the report.
    pub lost_examples: Vec<String>,
}

impl Report {
    /// The fault tier's one-line summary:
    /// `fault=<name> lost=<n> recovered=<n> unexpected=<n> duplicated=<n>`.
    pub fn fault_line(&self, name: &str) -> String {
        format!(
            "fault={name} lost={} recovered={} unexpected={} duplicated={} evicted={}",
            self.lost, self.recovered, self.unexpected, self.duplicated, self.evicted
        )
    }

    /// Nothing lost, nothing unexpected, every sequence gap announced, and
    /// (when known) exactly Vigil's evictions announced.
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// Why the run fails, one phrase per broken rule; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("{} acknowledged lost", self.lost));
        }
        if self.unexpected > 0 {
            why.push(format!("{} unexpected", self.unexpected));
        }
        if self.unannounced_gaps > 0 {
            why.push(format!(
                "sequence numbers missing without a gap notice: {}",
                self.unannounced_gaps
            ));
        }
        if let Some(n) = self.evicted_by_vigil.filter(|n| *n != self.announced) {
            why.push(format!(
                "Vigil counted {n} evictions, its gap notices announce {}",
                self.announced
            ));
        }
        why
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
        writeln!(
            f,
            "evicted       {} (announced by gap notices)",
            self.evicted
        )?;
        writeln!(
            f,
            "seq gaps      {} ({} not announced)",
            self.sequence_gaps, self.unannounced_gaps
        )?;
        write!(
            f,
            "gap notices   {} announcing {} evicted",
            self.gap_notices, self.announced
        )?;
        match self.evicted_by_vigil {
            Some(n) => writeln!(f, " (Vigil counted {n})")?,
            None => writeln!(f)?,
        }
        if !self.lost_examples.is_empty() {
            writeln!(f, "lost, e.g.    {}", self.lost_examples.join(", "))?;
        }
        let why = self.failures();
        if why.is_empty() {
            write!(f, "verdict       PASS")
        } else {
            write!(f, "verdict       FAIL: {}", why.join("; "))
        }
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
    let mut notices: Vec<&GapNotice> = Vec::new();
    for a in arrived {
        if a.device == VIGIL_DEVICE {
            r.gap_notices += 1;
            match &a.notice {
                _ if !a.verified => r.unexpected += 1,
                // A ledger written elsewhere may hold anything.
                Some(n) if !n.is_consistent() => r.unexpected += 1,
                Some(n) => notices.push(n),
                // A notice whose payload does not parse explains nothing.
                None if a.kind == GAP_NOTICE_KIND => r.unexpected += 1,
                None => {}
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
    let Announced {
        mut may_excuse,
        ranges: announced,
        total,
    } = announcements(&notices, &seqs);
    r.announced = total;
    for (device, got) in &seqs {
        let top = got.iter().copied().max().unwrap_or(0);
        let ranges = announced.get(device).map(Vec::as_slice).unwrap_or_default();
        for seq in (1..top).filter(|q| !got.contains(q)) {
            r.sequence_gaps += 1;
            if !ranges
                .iter()
                .any(|(first, last)| (*first..=*last).contains(&seq))
            {
                r.unannounced_gaps += 1;
            }
        }
    }
    for s in sent {
        if seen.contains(s.sha256.as_str()) {
            if !s.acked {
                r.recovered += 1;
            }
            continue;
        }
        if s.acked
            && s.priority != 0
            && let Some(n) = may_excuse
                .get_mut(&(s.device.as_str(), s.priority))
                .filter(|n| **n > 0)
        {
            *n -= 1;
            r.evicted += 1;
        } else if s.acked {
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

/// What the gap notices announce.
struct Announced<'a> {
    /// Per (device, priority): how many missing messages they may explain.
    may_excuse: HashMap<(&'a str, u8), u64>,
    /// Per device: the seq ranges they cover.
    ranges: HashMap<&'a str, Vec<(u64, u64)>>,
    /// Evictions they announce in all.
    total: u64,
}

/// Reads the notices.
///
/// A notice not yet acknowledged is replaced by one that includes it when
/// more of the same device's messages at that priority are evicted, and a
/// notice can arrive more than once; so notices whose ranges overlap count
/// as the largest of them, not their sum. And a range explains no more
/// messages than it has numbers that did not arrive (`seqs`: each device's
/// numbers that did), so a notice over messages that arrived excuses nothing.
fn announcements<'a>(
    notices: &[&'a GapNotice],
    seqs: &HashMap<&str, HashSet<u64>>,
) -> Announced<'a> {
    let mut by_lane: HashMap<(&str, u8), Vec<&GapNotice>> = HashMap::new();
    let mut ranges: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for n in notices {
        by_lane
            .entry((n.device.as_str(), n.priority))
            .or_default()
            .push(n);
        ranges
            .entry(n.device.as_str())
            .or_default()
            .push((n.first_seq, n.last_seq));
    }
    let mut counts = HashMap::new();
    let mut announced = 0u64;
    for (lane, mut list) in by_lane {
        let arrived = seqs.get(lane.0);
        // At most the count, and at most the numbers in range not arrived.
        let explains = |(first, last, count): (u64, u64, u64)| {
            let here = arrived.map_or(0, |got| {
                got.iter().filter(|q| (first..=last).contains(*q)).count() as u64
            });
            count.min(
                last.saturating_sub(first)
                    .saturating_add(1)
                    .saturating_sub(here),
            )
        };
        list.sort_by_key(|n| (n.first_seq, n.last_seq));
        let mut total = 0u64;
        // (first seq, last seq, largest count) of overlapping notices.
        let mut cluster: Option<(u64, u64, u64)> = None;
        for n in list {
            cluster = match cluster {
                Some((first, last, count)) if n.first_seq <= last => {
                    Some((first, last.max(n.last_seq), count.max(n.count)))
                }
                done => {
                    total = total.saturating_add(done.map_or(0, explains));
                    announced = announced.saturating_add(done.map_or(0, |c| c.2));
                    Some((n.first_seq, n.last_seq, n.count))
                }
            };
        }
        total = total.saturating_add(cluster.map_or(0, explains));
        announced = announced.saturating_add(cluster.map_or(0, |c| c.2));
        counts.insert(lane, total);
    }
    Announced {
        may_excuse: counts,
        ranges,
        total: announced,
    }
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
        Arrived::as_sent(s)
    }

    /// A gap notice as the cloud records it.
    fn notice(device: &str, priority: u8, first_seq: u64, last_seq: u64, count: u64) -> Arrived {
        Arrived {
            id: format!("notice-{device}-{first_seq}-{last_seq}-{count}"),
            device: VIGIL_DEVICE.into(),
            seq: 1,
            priority: 0,
            kind: GAP_NOTICE_KIND.into(),
            sha256: format!("notice-{first_seq}"),
            verified: true,
            notice: Some(GapNotice {
                device: device.into(),
                priority,
                first_seq,
                last_seq,
                count,
            }),
        }
    }

    /// bed-1 sent 10 acknowledged messages at `priority` (seq = counter);
    /// 4 to 7 never arrived.
    fn four_missing(priority: u8) -> (Vec<Sent>, Vec<Arrived>) {
        let s: Vec<_> = (1..=10).map(|i| sent("bed-1", i, priority, true)).collect();
        let a = s
            .iter()
            .filter(|m| !(4..=7).contains(&m.counter))
            .map(arrived)
            .collect();
        (s, a)
    }

    #[test]
    fn evictions_announced_by_gap_notices_are_not_losses() {
        let (s, mut a) = four_missing(3);
        a.push(notice("bed-1", 3, 4, 7, 4));
        let r = judge(&s, &a);
        assert!(r.passed(), "{r}");
        assert_eq!((r.evicted, r.lost, r.gap_notices), (4, 0, 1), "{r}");
        assert_eq!((r.sequence_gaps, r.unannounced_gaps), (4, 0), "{r}");

        // Without the notice the same run fails: four lost, four gaps.
        let (s, a) = four_missing(3);
        let r = judge(&s, &a);
        assert!(!r.passed());
        assert_eq!((r.evicted, r.lost, r.unannounced_gaps), (0, 4, 4), "{r}");
    }

    #[test]
    fn a_notice_excuses_no_more_than_it_counts_nor_other_lanes() {
        // Counts 2 of the 4: two lost; the range still covers the gaps.
        let (s, mut a) = four_missing(3);
        a.push(notice("bed-1", 3, 4, 7, 2));
        let r = judge(&s, &a);
        assert_eq!((r.evicted, r.lost, r.unannounced_gaps), (2, 2, 0), "{r}");
        assert!(!r.passed());

        // A notice for another priority or another device excuses nothing.
        for other in [notice("bed-1", 2, 4, 7, 4), notice("bed-2", 3, 4, 7, 4)] {
            let (s, mut a) = four_missing(3);
            a.push(other);
            let r = judge(&s, &a);
            assert_eq!((r.evicted, r.lost), (0, 4), "{r}");
        }
    }

    #[test]
    fn a_replaced_notice_and_its_replacement_count_once() {
        // 4..5 (2) was replaced by 4..7 (4), and arrived twice; the 11th
        // message, also missing, is not covered by the largest count.
        let (mut s, mut a) = four_missing(3);
        s.push(sent("bed-1", 11, 3, true));
        a.extend([
            notice("bed-1", 3, 4, 5, 2),
            notice("bed-1", 3, 4, 5, 2),
            notice("bed-1", 3, 4, 7, 4),
        ]);
        let r = judge(&s, &a);
        assert_eq!((r.evicted, r.lost, r.gap_notices), (4, 1, 3), "{r}");
        assert_eq!(r.announced, 4, "{r}");

        // Two notices that do not overlap (the first acknowledged before the
        // second eviction) add up.
        let (mut s, mut a) = four_missing(3);
        s.push(sent("bed-1", 11, 3, true));
        a.extend([notice("bed-1", 3, 4, 5, 2), notice("bed-1", 3, 6, 11, 3)]);
        let r = judge(&s, &a);
        assert_eq!((r.evicted, r.lost, r.announced), (5, 0, 5), "{r}");
    }

    #[test]
    fn vigils_own_eviction_count_must_match_the_announcements() {
        let (s, mut a) = four_missing(3);
        a.push(notice("bed-1", 3, 4, 7, 4));
        let mut r = judge(&s, &a);
        for (counted, passes) in [
            (Some(4), true),
            (None, true),
            (Some(5), false),
            (Some(3), false),
        ] {
            r.evicted_by_vigil = counted;
            assert_eq!(r.passed(), passes, "{r}");
        }
        assert!(
            r.to_string()
                .contains("announcing 4 evicted (Vigil counted 3)"),
            "{r}"
        );
        assert!(
            r.to_string()
                .contains("FAIL: Vigil counted 3 evictions, its gap notices announce 4"),
            "{r}"
        );
    }

    #[test]
    fn a_notice_over_numbers_that_arrived_excuses_nothing() {
        // Messages 7 to 10 never arrived, but the notice names 2..5, which did.
        let s: Vec<_> = (1..=10).map(|i| sent("bed-1", i, 3, true)).collect();
        let mut a: Vec<_> = s.iter().take(6).map(arrived).collect();
        a.push(notice("bed-1", 3, 2, 5, 4));
        let r = judge(&s, &a);
        assert_eq!((r.evicted, r.lost), (0, 4), "{r}");

        // Half over: 4..7, of which 6 and 7 did not arrive, excuses two.
        let mut a: Vec<_> = s.iter().take(5).map(arrived).collect();
        a.push(notice("bed-1", 3, 4, 7, 4));
        let r = judge(&s, &a);
        assert_eq!((r.evicted, r.lost), (2, 3), "{r}");
    }

    #[test]
    fn alarms_are_never_excused() {
        let (s, mut a) = four_missing(0);
        a.push(notice("bed-1", 0, 4, 7, 4));
        let r = judge(&s, &a);
        assert_eq!((r.evicted, r.lost), (0, 4), "{r}");
        assert!(!r.passed());
    }

    #[test]
    fn an_unannounced_gap_fails_even_without_an_acknowledgement() {
        // Message 3 was stored (it has a seq) but its PUBACK never reached
        // the device, and it never arrived: not a loss the device can see,
        // but a stored message gone without a notice.
        let s: Vec<_> = (1..=5).map(|i| sent("bed-1", i, 1, i != 3)).collect();
        let a: Vec<_> = s.iter().filter(|m| m.counter != 3).map(arrived).collect();
        let r = judge(&s, &a);
        assert_eq!(
            (r.lost, r.unacknowledged, r.unannounced_gaps),
            (0, 1, 1),
            "{r}"
        );
        assert!(!r.passed());
        assert!(r.to_string().contains("1 not announced"), "{r}");
        assert!(
            r.to_string()
                .contains("FAIL: sequence numbers missing without a gap notice: 1"),
            "{r}"
        );
    }

    #[test]
    fn a_gap_notice_that_does_not_parse_is_unexpected() {
        let (s, mut a) = four_missing(3);
        let mut broken = notice("bed-1", 3, 4, 7, 4);
        broken.notice = None;
        a.push(broken);
        let r = judge(&s, &a);
        assert_eq!((r.unexpected, r.evicted, r.lost), (1, 0, 4), "{r}");

        // Nor does one that cannot be true, from a ledger written elsewhere.
        for (first, last, count) in [(7, 4, 4), (4, 7, 5), (0, 7, 4), (4, 7, 0)] {
            let (s, mut a) = four_missing(3);
            a.push(notice("bed-1", 3, first, last, count));
            let r = judge(&s, &a);
            assert_eq!((r.unexpected, r.evicted, r.lost), (1, 0, 4), "{r}");
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
        assert_eq!(
            (r.lost, r.sequence_gaps, r.unannounced_gaps),
            (2, 2, 2),
            "{r}"
        );
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
        assert!(
            r.to_string()
                .contains("verdict       FAIL: 2 acknowledged lost; 2 unexpected"),
            "{r}"
        );
    }
}
