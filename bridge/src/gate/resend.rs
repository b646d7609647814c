//! A device's re-delivery of a QoS 1 publish the store already committed.
//!
//! A device sends a QoS 1 PUBLISH again, with DUP set and the same packet id,
//! when it did not get the PUBACK: typically its connection dropped after the
//! gate committed the message and before the PUBACK reached it (ward Wi-Fi).
//! Stored a second time, the message would reach the cloud as a new one, with
//! a new `id` and device sequence number, which the cloud cannot tell from a
//! new reading (delivery contract, point 3: "at least once, with identity").
//!
//! So the gate remembers, per client id and across its connections, the
//! packet id and a fingerprint (a 128-bit XXH3 of the packet with the DUP bit
//! cleared: topic, properties, payload) of the last `gate.max_inflight` QoS 1
//! publishes the store committed. A DUP PUBLISH whose packet id and bytes
//! match one of them is acknowledged (in order, after everything before it)
//! and neither stored nor relayed again; counted as
//! `vigil_resends_acknowledged_total`.
//!
//! No false match, so no loss: only a QoS 1 PUBLISH with DUP set, from the
//! same client id, with the same packet id and the same bytes as the newest
//! publish committed under that id, and only once that commit succeeded
//! (recorded by the task that writes its PUBACK, after the commit). A
//! re-delivery that finds nothing (the first copy was never committed, Vigil
//! restarted since, the client id was forgotten) is stored as before: a
//! duplicate, never a gap.
//!
//! "The same bytes" is the same 128-bit fingerprint: two different packets
//! agree by accident with a chance of 2^-128. XXH3 is not a cryptographic
//! hash, so a device could craft two packets that agree; all it could do
//! with them is have its own second message taken for a resend of its first
//! (windows are per client id), which it could as well not have sent.
//! SHA-256 would close that too, but costs 196 ns per 256-byte publish
//! against XXH3's 25 (`cargo bench -p vigil --bench resend`); a SHA-256
//! build ingested 9 % slower.
//!
//! Bounded: `gate.max_inflight` entries of 32 bytes per client id (only the
//! publishes still in the device's window can be re-delivered), for at most
//! twice `gate.max_connections` client ids; past that, the client id unused
//! for longest (and not connected) is forgotten.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// The DUP flag: bit 3 of a PUBLISH's first byte.
pub const DUP: u8 = 0x08;

/// What identifies a publish's content: XXH3-128 of the whole packet with
/// the DUP bit cleared.
pub type Fingerprint = u128;

/// The fingerprint of a PUBLISH packet (fixed header included): the bytes
/// after the first hashed with the first (DUP cleared) as the seed.
pub fn fingerprint(packet: &[u8]) -> Fingerprint {
    match packet.split_first() {
        Some((first, rest)) => xxhash_rust::xxh3::xxh3_128_with_seed(rest, u64::from(first & !DUP)),
        None => 0,
    }
}

/// Whether a PUBLISH packet has DUP set.
pub fn is_dup(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b & DUP != 0)
}

/// One client id's last committed QoS 1 publishes, oldest first.
#[derive(Debug, Default)]
pub struct Window {
    entries: VecDeque<(u16, Fingerprint)>,
    /// Entries kept; 0 remembers nothing.
    cap: usize,
}

impl Window {
    fn new(cap: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// Records a publish whose commit succeeded (every publish pays this:
    /// no search).
    pub fn committed(&mut self, pkid: u16, fingerprint: Fingerprint) {
        if self.cap == 0 {
            return;
        }
        while self.entries.len() >= self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back((pkid, fingerprint));
    }

    /// Whether a re-delivery is the publish last committed under its packet
    /// id (a packet id the device used again stands for its newest publish).
    pub fn holds(&self, pkid: u16, fingerprint: &Fingerprint) -> bool {
        self.entries
            .iter()
            .rev()
            .find(|(p, _)| *p == pkid)
            .is_some_and(|(_, f)| f == fingerprint)
    }
}

/// Locks a window. Its operations cannot leave it inconsistent, so a poisoned
/// lock is recovered.
pub fn lock(window: &Mutex<Window>) -> MutexGuard<'_, Window> {
    window.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Client {
    window: Arc<Mutex<Window>>,
    touched: Instant,
}

/// The windows of the client ids seen lately, kept across their connections.
pub struct Resends {
    clients: Mutex<HashMap<Arc<str>, Client>>,
    max_clients: usize,
    per_client: usize,
}

impl Resends {
    /// Up to `max_clients` client ids, `per_client` publishes each.
    pub fn new(max_clients: usize, per_client: usize) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            max_clients,
            per_client,
        }
    }

    /// The window of `client` for a new connection. When every slot holds a
    /// connected client, the window is this connection's alone (nothing is
    /// remembered past it).
    pub fn window(&self, client: &str) -> Arc<Mutex<Window>> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(c) = clients.get_mut(client) {
            c.touched = now;
            return c.window.clone();
        }
        if clients.len() >= self.max_clients {
            // The least recently connected client id that no connection uses.
            let idle = clients
                .iter()
                .filter(|(_, c)| Arc::strong_count(&c.window) == 1)
                .min_by_key(|(_, c)| c.touched)
                .map(|(k, _)| k.clone());
            match idle {
                Some(k) => {
                    clients.remove(&k);
                }
                None => return Arc::new(Mutex::new(Window::new(self.per_client))),
            }
        }
        let window = Arc::new(Mutex::new(Window::new(self.per_client)));
        clients.insert(
            Arc::from(client),
            Client {
                window: window.clone(),
                touched: now,
            },
        );
        window
    }

    /// Client ids remembered.
    pub fn clients(&self) -> usize {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from(b)
    }

    #[test]
    fn the_fingerprint_ignores_only_the_dup_bit() {
        let first = [0x32, 5, 0, 1, b't', 0, 7, b'x'];
        let mut dup = first;
        dup[0] |= DUP;
        assert!(!is_dup(&first) && is_dup(&dup));
        assert_eq!(fingerprint(&first), fingerprint(&dup));
        let mut retained = first;
        retained[0] |= 0x01;
        assert_ne!(fingerprint(&first), fingerprint(&retained));
        let mut other = first;
        other[7] = b'y';
        assert_ne!(fingerprint(&first), fingerprint(&other));
    }

    #[test]
    fn a_window_holds_the_last_commits_by_packet_id() {
        let mut w = Window::new(3);
        w.committed(1, fp(1));
        w.committed(2, fp(2));
        assert!(w.holds(1, &fp(1)) && w.holds(2, &fp(2)));
        assert!(!w.holds(1, &fp(2)), "same id, other bytes");
        assert!(!w.holds(3, &fp(1)), "same bytes, other id");
        // A packet id used again stands for its newest publish.
        w.committed(1, fp(9));
        assert!(!w.holds(1, &fp(1)) && w.holds(1, &fp(9)));
        // Past the cap the oldest goes.
        w.committed(3, fp(3));
        assert!(!w.holds(1, &fp(1)) && w.holds(2, &fp(2)));
        w.committed(4, fp(4));
        assert!(!w.holds(2, &fp(2)));
        assert!(w.holds(1, &fp(9)) && w.holds(3, &fp(3)) && w.holds(4, &fp(4)));
        // Cap 0 remembers nothing.
        let mut none = Window::default();
        none.committed(1, fp(1));
        assert!(!none.holds(1, &fp(1)));
    }

    #[test]
    fn client_ids_are_remembered_across_connections_and_bounded() {
        let r = Resends::new(2, 4);
        let a = r.window("a");
        lock(&a).committed(7, fp(7));
        drop(a);
        // The next connection of "a" finds what the last one committed.
        assert!(lock(&r.window("a")).holds(7, &fp(7)));
        let b = r.window("b");
        // Full, and both in use: a third client id gets a window of its own.
        let a = r.window("a");
        let c = r.window("c");
        lock(&c).committed(1, fp(1));
        assert_eq!(r.clients(), 2);
        assert!(!lock(&r.window("c")).holds(1, &fp(1)));
        // With "b" disconnected, "c" takes its place.
        drop(b);
        drop(c);
        let c = r.window("c");
        assert_eq!(r.clients(), 2);
        lock(&c).committed(1, fp(1));
        drop(c);
        assert!(lock(&r.window("c")).holds(1, &fp(1)));
        assert!(lock(&a).holds(7, &fp(7)), "a, connected, is kept");
    }
}
