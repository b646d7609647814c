//! The forwarder's session logic, with no I/O: which stored messages are in
//! flight, which packet id carries which one, what a PUBACK means, and what to
//! resend after a connection error. The driver (one task owning rumqttc's
//! client and event loop) feeds it events and does what it says.
//!
//! How rumqttc is driven (`notes/libraries.md` section 2.3): publishes are
//! handed to the client in order; the event loop emits
//! `Outgoing::Publish(pkid)` for each, in the same order, so the oldest
//! unassigned message gets that pkid ([`Session::outgoing`]). A collision
//! shows as `Outgoing::AwaitAck`, which must *not* assign anything. After any
//! connection error everything in flight is forgotten
//! ([`Session::connection_lost`]) and the driver replays each lane from the
//! store's cursor, which still holds every unacknowledged message.

use std::collections::{HashMap, VecDeque};

/// One stored message handed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InFlight {
    /// Its lane.
    pub priority: u8,
    /// Its store sequence number.
    pub seq: u64,
    /// When the gate read it (for the delivery-time histogram).
    pub received_at: crate::event::Timestamp,
}

/// What a PUBACK means for the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The cloud has it: delete it from the store.
    Delivered(InFlight),
    /// The cloud refused it for good (MQTT 5 reason code >= 0x80): move it to
    /// dead-letter with this reason code.
    Refused(InFlight, u8),
    /// A pkid not in flight (a stale ack from before a reconnect): ignore.
    Unknown(u16),
}

/// The in-flight window and replay positions of one cloud connection.
#[derive(Debug)]
pub struct Session {
    configured_window: usize,
    window: usize,
    max_head_failures: u32,
    /// Per lane: the last seq handed out on this connection (`None`: read
    /// from the store's cursor).
    read_after: Vec<Option<u64>>,
    /// Handed to the client, waiting for `Outgoing::Publish(pkid)`.
    unassigned: VecDeque<InFlight>,
    /// Published, waiting for PUBACK.
    by_pkid: HashMap<u16, InFlight>,
    /// Consecutive connection failures while this message headed its lane's
    /// in-flight messages. Only current heads are kept (at most one per lane).
    head_failures: HashMap<u8, (u64, u32)>,
}

impl Session {
    /// A session for `lanes` priorities, `window` publishes in flight, and
    /// dead-lettering a lane head after `max_head_failures` failed connections.
    pub fn new(lanes: u8, window: u16, max_head_failures: u32) -> Self {
        let window = usize::from(window.max(1));
        Self {
            configured_window: window,
            window,
            max_head_failures: max_head_failures.max(1),
            read_after: vec![None; usize::from(lanes)],
            unassigned: VecDeque::new(),
            by_pkid: HashMap::new(),
            head_failures: HashMap::new(),
        }
    }

    /// A new connection: MQTT 5 brokers may announce a Receive Maximum, which
    /// caps the window.
    pub fn connected(&mut self, receive_max: Option<u16>) {
        self.window = match receive_max {
            Some(r) => self.configured_window.min(usize::from(r.max(1))),
            None => self.configured_window,
        };
    }

    /// The window in force.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Messages in flight (handed to the client and not yet acknowledged).
    pub fn in_flight(&self) -> usize {
        self.unassigned.len() + self.by_pkid.len()
    }

    /// How many more messages may be handed to the client now.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.in_flight())
    }

    /// Where to read `lane` from: after this seq, or from the cursor.
    pub fn read_after(&self, lane: u8) -> Option<u64> {
        self.read_after.get(usize::from(lane)).copied().flatten()
    }

    /// Records that the driver handed this message to the client. Messages of
    /// one lane must be handed over in seq order.
    pub fn sent(&mut self, m: InFlight) {
        if let Some(pos) = self.read_after.get_mut(usize::from(m.priority)) {
            *pos = Some(m.seq);
        }
        self.unassigned.push_back(m);
    }

    /// rumqttc sent the oldest unassigned publish with `pkid`.
    pub fn outgoing(&mut self, pkid: u16) -> Option<InFlight> {
        let m = self.unassigned.pop_front()?;
        self.by_pkid.insert(pkid, m);
        Some(m)
    }

    /// A PUBACK arrived. `reason` is the MQTT 5 reason code (None on 3.1.1).
    pub fn puback(&mut self, pkid: u16, reason: Option<u8>) -> AckOutcome {
        let Some(m) = self.by_pkid.remove(&pkid) else {
            return AckOutcome::Unknown(pkid);
        };
        if self
            .head_failures
            .get(&m.priority)
            .is_some_and(|(seq, _)| *seq == m.seq)
        {
            self.head_failures.remove(&m.priority);
        }
        match reason {
            Some(code) if code >= 0x80 => AckOutcome::Refused(m, code),
            _ => AckOutcome::Delivered(m),
        }
    }

    /// Takes a message back out of flight without an ack (the driver found it
    /// too large to publish, and moves it to dead-letter itself).
    pub fn withdraw(&mut self, m: InFlight) {
        self.unassigned.retain(|x| *x != m);
        self.by_pkid.retain(|_, x| *x != m);
    }

    /// The connection ended: forget everything in flight and read every lane
    /// from the store's cursor again. With `blame_head` (the cloud closed a
    /// connection that was up), each lane's head in flight gets one more
    /// failure; the heads that have now failed `max_head_failures` times in a
    /// row are returned, for the driver to move to dead-letter so they stop
    /// blocking their lane. Without it (a timeout, a shutdown) the counts stay.
    pub fn connection_lost(&mut self, blame_head: bool) -> Vec<InFlight> {
        if !blame_head {
            self.forget();
            return Vec::new();
        }
        let mut heads: HashMap<u8, InFlight> = HashMap::new();
        for m in self.unassigned.iter().chain(self.by_pkid.values()) {
            let e = heads.entry(m.priority).or_insert(*m);
            if m.seq < e.seq {
                *e = *m;
            }
        }
        let mut give_up = Vec::new();
        let mut next = HashMap::new();
        for (lane, head) in heads {
            let failures = match self.head_failures.get(&lane) {
                Some((s, n)) if *s == head.seq => n + 1,
                _ => 1,
            };
            if failures >= self.max_head_failures {
                give_up.push(head);
            } else {
                next.insert(lane, (head.seq, failures));
            }
        }
        self.head_failures = next;
        self.forget();
        give_up.sort_by_key(|m| (m.priority, m.seq));
        give_up
    }

    fn forget(&mut self) {
        self.unassigned.clear();
        self.by_pkid.clear();
        for pos in &mut self.read_after {
            *pos = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(priority: u8, seq: u64) -> InFlight {
        InFlight {
            priority,
            seq,
            received_at: crate::event::Timestamp(0),
        }
    }

    #[test]
    fn window_and_pkid_mapping_with_reused_pkids() {
        let mut s = Session::new(4, 3, 3);
        assert_eq!(s.room(), 3);
        for seq in 1..=3 {
            s.sent(m(1, seq));
        }
        assert_eq!((s.room(), s.read_after(1)), (0, Some(3)));
        assert_eq!(s.outgoing(1), Some(m(1, 1)));
        assert_eq!(s.outgoing(2), Some(m(1, 2)));
        assert_eq!(s.outgoing(3), Some(m(1, 3)));
        // Out-of-order acks.
        assert_eq!(s.puback(2, None), AckOutcome::Delivered(m(1, 2)));
        assert_eq!(s.room(), 1);
        // pkid 2 is reused for the next message.
        s.sent(m(0, 9));
        assert_eq!(s.outgoing(2), Some(m(0, 9)));
        assert_eq!(s.puback(2, Some(0x10)), AckOutcome::Delivered(m(0, 9)));
        assert_eq!(
            s.puback(2, None),
            AckOutcome::Unknown(2),
            "stale duplicate ack"
        );
        assert_eq!(s.puback(1, Some(0x87)), AckOutcome::Refused(m(1, 1), 0x87));
        assert_eq!(s.puback(3, Some(0x00)), AckOutcome::Delivered(m(1, 3)));
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn receive_maximum_caps_the_window() {
        let mut s = Session::new(2, 64, 3);
        s.connected(Some(10));
        assert_eq!(s.window(), 10);
        s.connected(Some(1000));
        assert_eq!(s.window(), 64);
        s.connected(None);
        assert_eq!(s.window(), 64);
    }

    #[test]
    fn a_lost_connection_replays_from_the_cursor_and_acks_from_before_are_ignored() {
        let mut s = Session::new(2, 8, 3);
        s.sent(m(0, 5));
        s.sent(m(1, 6));
        s.outgoing(1);
        assert!(s.connection_lost(true).is_empty());
        assert_eq!(
            (s.in_flight(), s.read_after(0), s.read_after(1)),
            (0, None, None)
        );
        assert_eq!(s.puback(1, None), AckOutcome::Unknown(1));
        // Nothing left unassigned: a stale Outgoing::Publish assigns nothing.
        assert_eq!(s.outgoing(1), None);
    }

    #[test]
    fn a_head_failing_n_times_in_a_row_is_given_up() {
        let mut s = Session::new(2, 8, 3);
        for round in 1..=3 {
            s.sent(m(1, 40));
            s.sent(m(1, 41));
            s.sent(m(0, 7));
            s.outgoing(1);
            let give_up = s.connection_lost(true);
            if round < 3 {
                assert!(give_up.is_empty(), "round {round}");
            } else {
                assert_eq!(give_up, vec![m(0, 7), m(1, 40)]);
            }
        }
        // An ack of the head resets its count.
        let mut s = Session::new(1, 8, 2);
        s.sent(m(0, 1));
        s.connection_lost(true);
        s.sent(m(0, 1));
        s.outgoing(4);
        assert_eq!(s.puback(4, None), AckOutcome::Delivered(m(0, 1)));
        s.sent(m(0, 2));
        assert!(s.connection_lost(true).is_empty(), "a new head starts at 1");
    }

    #[test]
    fn withdraw_takes_a_message_out_of_flight() {
        let mut s = Session::new(1, 2, 3);
        s.sent(m(0, 1));
        s.sent(m(0, 2));
        s.withdraw(m(0, 1));
        assert_eq!(s.outgoing(7), Some(m(0, 2)));
        assert_eq!(s.room(), 1);
    }
}
