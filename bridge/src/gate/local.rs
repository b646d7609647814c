//! Local subscriptions: the topic filters clients hold in the embedded
//! broker, so that a publish no local client can receive skips it.
//!
//! rumqttd only routes device messages to local subscribers (displays on the
//! ward); the store keeps them and the forwarder reads them from the store.
//! A publish that matches no local filter would be parsed, matched against
//! nothing and dropped by rumqttd, at the cost of a loopback write, two relay
//! tasks, rumqttd's connection task and its router thread. The gate skips
//! that hop for such publishes when they are QoS 0 or 1, not retained, and use
//! no topic alias; everything else (retained messages, QoS 2, whose PUBREC is
//! rumqttd's, publishes that set or use a topic alias, which rumqttd must
//! learn) always passes.
//!
//! The set errs on the side of routing: a filter is added before its
//! SUBSCRIBE reaches rumqttd and removed when an UNSUBSCRIBE for it passes or
//! when the session that holds it ends. rumqttd keeps a persistent session's
//! subscriptions after its client disconnects (and queues for it), so those
//! stay here until the client id connects with a clean session; a clean
//! session's filters go when its connection ends. Past [`MAX_FILTERS`]
//! filters or [`MAX_FILTER_BYTES`] of them the set stops telling and every
//! publish is routed (for the rest of the process's life).
//!
//! A publish is matched through an index of the distinct filters by level,
//! so its cost does not grow with the number of filters, and each device
//! connection remembers its topics' answers until the filters change
//! ([`MatchMemo`]).

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Filters tracked before the set gives up and routes everything.
pub const MAX_FILTERS: usize = 100_000;
/// Bytes of filters tracked (summed over the sessions that hold them)
/// before the set gives up and routes everything: what bounds its memory,
/// since a filter may be up to 64 KiB long.
pub const MAX_FILTER_BYTES: usize = 16 << 20;
/// Topics one connection's [`MatchMemo`] remembers before it starts afresh.
pub const MEMO_TOPICS: usize = 32;
/// Longest topic a [`MatchMemo`] remembers (longer ones are matched each time).
pub const MEMO_TOPIC_BYTES: usize = 128;

/// Which topics some local client subscribes to.
#[derive(Debug, Default)]
pub struct LocalSubscriptions {
    /// Filters held, over all sessions (read without the lock on every
    /// publish: zero means "route nothing").
    filters: AtomicUsize,
    /// Set once [`MAX_FILTERS`] or [`MAX_FILTER_BYTES`] was passed:
    /// everything is routed from then.
    overflowed: AtomicBool,
    /// Bumped after every change to the filters: a [`MatchMemo`]'s answers
    /// hold only for the generation they were found in.
    generation: AtomicU64,
    /// Written on (rare) subscription changes; read on every publish that
    /// may be routed, by any number of device connections at once.
    sessions: RwLock<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    next_connection: u64,
    by_client: HashMap<String, Session>,
    /// Filters over all sessions, kept as they change.
    filters: usize,
    /// Their bytes, likewise.
    bytes: usize,
    /// Each distinct filter and how many sessions hold it (ten displays on
    /// one filter put it in the index once, not ten times).
    distinct: HashMap<String, usize>,
    /// The distinct filters by level: what a publish is matched against.
    index: FilterIndex,
}

impl Sessions {
    /// One more session holds `filter`.
    fn hold(&mut self, filter: &str) {
        self.filters += 1;
        self.bytes += filter.len();
        match self.distinct.get_mut(filter) {
            Some(n) => *n += 1,
            None => {
                self.distinct.insert(filter.to_string(), 1);
                self.index.insert(filter);
            }
        }
    }

    /// One session fewer holds `filter`.
    fn release(&mut self, filter: &str) {
        self.filters = self.filters.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(filter.len());
        if let Some(n) = self.distinct.get_mut(filter) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.distinct.remove(filter);
                self.index.remove(filter);
            }
        }
    }
}

/// Distinct topic filters arranged by level, so that matching a topic walks
/// the topic's levels (at each: the level by name, `+`, and `#`) instead of
/// trying every filter: its cost grows with the topic's depth and the
/// wildcards that fit it, not with the number of filters held.
///
/// Matches exactly as trying each filter with the ACL's `covers` would (a
/// property test compares the two): `#` matches its parent level too, a
/// first-level wildcard does not match a topic that starts with `$`, a
/// shared subscription matches as its filter does, and anything after a `#`
/// in a malformed filter is ignored, as `covers` ignores it. Every walk is a
/// loop with its own stack, never recursion: a filter or topic may have tens
/// of thousands of levels. A match visits each level of the index at most
/// once, so it never costs more than trying every filter would.
#[derive(Debug)]
struct FilterIndex {
    /// The levels; the first is the root, before a topic's first level.
    nodes: Vec<Level>,
    /// Slots of `nodes` no filter uses any more, reused first.
    free: Vec<usize>,
    /// Shared subscriptions without a filter (`$share/<group>`): they match
    /// every topic.
    everything: usize,
}

/// One level of the index: the filters that end here and the levels below.
#[derive(Debug, Default)]
struct Level {
    /// Filters that end at this level.
    ends: usize,
    /// Filters whose next level is `#`: they match this level and all below.
    rest: usize,
    /// The next level, by name (never `+` or `#`).
    named: HashMap<String, usize>,
    /// The next level when the filter has `+` there.
    any: Option<usize>,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.ends == 0 && self.rest == 0 && self.named.is_empty() && self.any.is_none()
    }
}

/// A filter as the index files it.
enum Shape<'a> {
    /// `$share/<group>` with no filter after it: matches everything.
    Everything,
    /// The levels before the filter's end, or before a `#` (`rest`).
    Levels { levels: Vec<&'a str>, rest: bool },
}

impl<'a> Shape<'a> {
    fn of(filter: &'a str) -> Self {
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_group, f)) => f,
                None => return Shape::Everything,
            },
            None => filter,
        };
        let mut levels = Vec::new();
        for level in filter.split('/') {
            if level == "#" {
                return Shape::Levels { levels, rest: true };
            }
            levels.push(level);
        }
        Shape::Levels {
            levels,
            rest: false,
        }
    }
}

impl Default for FilterIndex {
    fn default() -> Self {
        Self {
            nodes: vec![Level::default()],
            free: Vec::new(),
            everything: 0,
        }
    }
}

impl FilterIndex {
    /// A new, empty level's slot.
    fn level(&mut self) -> usize {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.nodes.push(Level::default());
                self.nodes.len() - 1
            }
        }
    }

    /// The level below `at` that a filter's level `name` leads to, if filed.
    fn child(&self, at: usize, name: &str) -> Option<usize> {
        if name == "+" {
            self.nodes[at].any
        } else {
            self.nodes[at].named.get(name).copied()
        }
    }

    /// Files one more distinct `filter`.
    fn insert(&mut self, filter: &str) {
        let Shape::Levels { levels, rest } = Shape::of(filter) else {
            self.everything += 1;
            return;
        };
        let mut at = 0;
        for name in levels {
            at = match self.child(at, name) {
                Some(next) => next,
                None => {
                    let next = self.level();
                    if name == "+" {
                        self.nodes[at].any = Some(next);
                    } else {
                        self.nodes[at].named.insert(name.to_string(), next);
                    }
                    next
                }
            };
        }
        let level = &mut self.nodes[at];
        if rest {
            level.rest += 1;
        } else {
            level.ends += 1;
        }
    }

    /// Removes one distinct `filter` (filed before), and the levels it
    /// leaves holding nothing.
    fn remove(&mut self, filter: &str) {
        let Shape::Levels { levels, rest } = Shape::of(filter) else {
            self.everything = self.everything.saturating_sub(1);
            return;
        };
        let mut path = Vec::with_capacity(levels.len() + 1);
        path.push(0);
        let mut at = 0;
        for &name in &levels {
            let Some(next) = self.child(at, name) else {
                return; // never filed: nothing to remove
            };
            at = next;
            path.push(at);
        }
        let level = &mut self.nodes[at];
        if rest {
            level.rest = level.rest.saturating_sub(1);
        } else {
            level.ends = level.ends.saturating_sub(1);
        }
        // Deepest first: a level left empty goes, and its parent may follow.
        for (depth, &name) in levels.iter().enumerate().rev() {
            let (parent, child) = (path[depth], path[depth + 1]);
            if !self.nodes[child].is_empty() {
                break;
            }
            if name == "+" {
                self.nodes[parent].any = None;
            } else {
                self.nodes[parent].named.remove(name);
            }
            // Empty already; this also gives back its map's memory.
            self.nodes[child] = Level::default();
            self.free.push(child);
        }
    }

    /// Whether some filed filter matches `topic`.
    fn any_match(&self, topic: &str) -> bool {
        if self.everything > 0 {
            return true;
        }
        let dollar = topic.starts_with('$');
        // Where a walk stands: a level of the index, and the topic's levels
        // from there on (None: past its last level). `pending` holds the
        // other branch wherever both a name and `+` fit, so a walk allocates
        // only when the filters branch.
        let mut pending: Vec<(usize, Option<&str>)> = Vec::new();
        let mut at = (0, Some(topic));
        loop {
            let (i, topic_rest) = at;
            let level = &self.nodes[i];
            // A wildcard in a filter's first level does not match `$` topics.
            let wild = !(i == 0 && dollar);
            if wild && level.rest > 0 {
                return true;
            }
            let next = match topic_rest {
                None => {
                    if level.ends > 0 {
                        return true;
                    }
                    None
                }
                Some(topic_rest) => {
                    let (name, below) = match topic_rest.split_once('/') {
                        Some((name, below)) => (name, Some(below)),
                        None => (topic_rest, None),
                    };
                    let named = level.named.get(name).map(|&n| (n, below));
                    let any = level
                        .any
                        .filter(|_| wild && name != "#")
                        .map(|n| (n, below));
                    match (named, any) {
                        (Some(named), Some(any)) => {
                            pending.push(any);
                            Some(named)
                        }
                        (named, any) => named.or(any),
                    }
                }
            };
            match next.or_else(|| pending.pop()) {
                Some(next) => at = next,
                None => return false,
            }
        }
    }
}

#[derive(Debug, Default)]
struct Session {
    /// The connection that holds the session now.
    connection: u64,
    filters: HashSet<String>,
}

/// One relayed connection's hold on its client id's session, from
/// [`LocalSubscriptions::connected`]; dropping it ends the connection.
#[derive(Debug)]
pub struct Connected<'a> {
    local: &'a LocalSubscriptions,
    client_id: String,
    id: u64,
    clean: bool,
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.local
            .disconnected(&self.client_id, self.id, self.clean);
    }
}

impl LocalSubscriptions {
    fn sessions(&self) -> std::sync::RwLockWriteGuard<'_, Sessions> {
        // Plain map operations: a poisoned lock is recovered.
        self.sessions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes the count for the lock-free check and ends the memos'
    /// generation (called under the write lock, after every change).
    fn publish(&self, sessions: &Sessions) {
        if sessions.filters > MAX_FILTERS || sessions.bytes > MAX_FILTER_BYTES {
            self.overflowed.store(true, Ordering::Release);
        }
        self.filters.store(sessions.filters, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A connection of `client_id` was accepted by rumqttd. A clean session
    /// starts with nothing (rumqttd discards what the id held); a persistent
    /// one keeps the id's filters.
    pub fn connected(&self, client_id: &str, clean: bool) -> Connected<'_> {
        let mut s = self.sessions();
        s.next_connection += 1;
        let id = s.next_connection;
        let session = s.by_client.entry(client_id.to_string()).or_default();
        session.connection = id;
        let dropped = if clean {
            std::mem::take(&mut session.filters)
        } else {
            HashSet::new()
        };
        for f in &dropped {
            s.release(f);
        }
        self.publish(&s);
        Connected {
            local: self,
            client_id: client_id.to_string(),
            id,
            clean,
        }
    }

    /// Connection `id` ended. A clean session's filters go with it, unless a
    /// newer connection of the same id holds the session by now.
    fn disconnected(&self, client_id: &str, id: u64, clean: bool) {
        let mut s = self.sessions();
        let ends = s.by_client.get(client_id).is_some_and(|session| {
            session.connection == id && (clean || session.filters.is_empty())
        });
        if ends && let Some(session) = s.by_client.remove(client_id) {
            for f in &session.filters {
                s.release(f);
            }
            self.publish(&s);
        }
    }

    /// `client_id` subscribes to `filters` (called before the SUBSCRIBE
    /// reaches rumqttd).
    pub fn subscribed(&self, client_id: &str, filters: &[String]) {
        if self.overflowed.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.sessions();
        let session = s.by_client.entry(client_id.to_string()).or_default();
        let added: Vec<&String> = filters
            .iter()
            .filter(|f| session.filters.insert((*f).clone()))
            .collect();
        for f in added {
            s.hold(f);
        }
        self.publish(&s);
    }

    /// `client_id` unsubscribes from `filters`.
    pub fn unsubscribed(&self, client_id: &str, filters: &[String]) {
        let mut s = self.sessions();
        if let Some(session) = s.by_client.get_mut(client_id) {
            let removed: Vec<&String> = filters
                .iter()
                .filter(|f| session.filters.remove(*f))
                .collect();
            for f in removed {
                s.release(f);
            }
            self.publish(&s);
        }
    }

    /// The answer for any topic when it needs no matching: past the bound
    /// (route), or nothing held (skip). Lock-free.
    fn settled(&self) -> Option<bool> {
        if self.overflowed.load(Ordering::Acquire) {
            return Some(true);
        }
        (self.filters.load(Ordering::Acquire) == 0).then_some(false)
    }

    /// Whether some local filter may match `topic` (a valid topic name).
    pub fn any_match(&self, topic: &str) -> bool {
        if let Some(answer) = self.settled() {
            return answer;
        }
        // A read lock: device connections match concurrently; only a
        // subscription change waits for them.
        self.sessions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .index
            .any_match(topic)
    }
}

/// One device connection's answers of [`LocalSubscriptions::any_match`], by
/// topic, while the filters do not change: a device publishes on a handful
/// of topics, so with local subscribers each topic is matched once per
/// change instead of once per publish, and without the shared lock (whose
/// reader count bounces between CPUs when two connections ask at once). Bounded: [`MEMO_TOPICS`] topics of at most
/// [`MEMO_TOPIC_BYTES`] each, about 6 KiB per connection at most (6 MiB
/// over `gate.max_connections` = 1,000).
#[derive(Debug, Default)]
pub struct MatchMemo {
    generation: u64,
    answers: HashMap<String, bool>,
}

impl MatchMemo {
    /// What [`LocalSubscriptions::any_match`] answers for `topic`.
    pub fn any_match(&mut self, local: &LocalSubscriptions, topic: &str) -> bool {
        if let Some(answer) = local.settled() {
            return answer;
        }
        // Read before matching: a change from here on bumps it, so an answer
        // found under the old filters is never kept past that change.
        let generation = local.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.answers.clear();
            self.generation = generation;
        }
        if let Some(&answer) = self.answers.get(topic) {
            return answer;
        }
        let answer = local.any_match(topic);
        if topic.len() <= MEMO_TOPIC_BYTES {
            if self.answers.len() >= MEMO_TOPICS {
                self.answers.clear();
            }
            self.answers.insert(topic.to_owned(), answer);
        }
        answer
    }
}

/// Whether `filter` (as a client sent it) matches `topic`, one filter at a
/// time: the reference [`FilterIndex`] is tested against. A shared
/// subscription (`$share/<group>/<filter>`) matches as its filter does.
#[cfg(test)]
fn matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((_group, f)) => f,
            None => return true,
        },
        None => filter,
    };
    super::acl::covers(filter, topic)
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy as _;

    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        for (filter, topic, ok) in [
            ("#", "devices/bed-1/vitals/hr", true),
            ("#", "$SYS/x", false),
            ("devices/+/alarms/#", "devices/bed-1/alarms/spo2", true),
            ("devices/+/alarms/#", "devices/bed-1/alarms", true),
            ("devices/+/alarms/#", "devices/bed-1/vitals/hr", false),
            ("devices/bed-1/vitals/hr", "devices/bed-1/vitals/hr", true),
            ("devices/bed-1/vitals/hr", "devices/bed-1/vitals", false),
            ("$share/ward/devices/#", "devices/bed-1/vitals/hr", true),
            ("$share/ward/devices/#", "wards/x", false),
        ] {
            assert_eq!(matches(filter, topic), ok, "{filter} matches {topic}");
        }
    }

    #[test]
    fn nothing_subscribed_routes_nothing() {
        let local = LocalSubscriptions::default();
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
        let c = local.connected("bed-1", true);
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
        drop(c);
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
    }

    #[test]
    fn a_clean_session_routes_while_subscribed() {
        let local = LocalSubscriptions::default();
        let c = local.connected("display", true);
        local.subscribed("display", &strings(&["devices/+/alarms/#"]));
        assert!(local.any_match("devices/bed-1/alarms/spo2"));
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
        local.unsubscribed("display", &strings(&["devices/+/alarms/#"]));
        assert!(!local.any_match("devices/bed-1/alarms/spo2"));
        local.subscribed("display", &strings(&["#"]));
        assert!(local.any_match("devices/bed-1/vitals/hr"));
        drop(c);
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
    }

    #[test]
    fn a_persistent_session_keeps_its_filters_until_a_clean_connect() {
        let local = LocalSubscriptions::default();
        let c = local.connected("display", false);
        local.subscribed("display", &strings(&["devices/#"]));
        drop(c);
        // rumqttd queues for the session while its client is away.
        assert!(local.any_match("devices/bed-1/vitals/hr"));
        let c = local.connected("display", false);
        assert!(local.any_match("devices/bed-1/vitals/hr"));
        drop(c);
        let c = local.connected("display", true);
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
        drop(c);
    }

    #[test]
    fn an_older_connection_ending_leaves_the_newer_ones_filters() {
        let local = LocalSubscriptions::default();
        let old = local.connected("display", true);
        let new = local.connected("display", true);
        local.subscribed("display", &strings(&["devices/#"]));
        drop(old);
        assert!(local.any_match("devices/bed-1/vitals/hr"));
        drop(new);
        assert!(!local.any_match("devices/bed-1/vitals/hr"));
    }

    /// Filters and topics from a small alphabet of levels, so that they meet
    /// often: names, the empty level, a `$` name, both wildcards (in topics
    /// too, where a device may not put them but a bad one might).
    fn levels(max: usize) -> impl proptest::strategy::Strategy<Value = String> {
        const NAMES: [&str; 6] = ["a", "b", "", "$s", "+", "#"];
        proptest::collection::vec(proptest::sample::select(NAMES.to_vec()), 1..=max)
            .prop_map(|levels| levels.join("/"))
    }

    fn filter() -> impl proptest::strategy::Strategy<Value = String> {
        (0u8..4, levels(4)).prop_map(|(share, f)| match share {
            0 => format!("$share/g/{f}"),
            1 if f.len() < 3 => "$share/g".to_string(),
            _ => f,
        })
    }

    proptest::proptest! {
        /// The index answers as trying every filter would, through any
        /// sequence of filing and removing (each distinct filter filed at
        /// most once, as `Sessions` does), and gives back every level once
        /// the last filter goes.
        #[test]
        fn the_index_matches_as_every_filter_would(
            ops in proptest::collection::vec((proptest::bool::ANY, filter()), 1..40),
            topics in proptest::collection::vec(levels(5), 1..12),
        ) {
            let mut index = FilterIndex::default();
            let mut filed: HashSet<String> = HashSet::new();
            for (add, f) in ops {
                if add && filed.insert(f.clone()) {
                    index.insert(&f);
                } else if !add && filed.remove(&f) {
                    index.remove(&f);
                }
                for topic in &topics {
                    let truth = filed.iter().any(|f| matches(f, topic));
                    proptest::prop_assert_eq!(index.any_match(topic), truth, "{} against {:?}", topic, filed);
                }
            }
            for f in std::mem::take(&mut filed) {
                index.remove(&f);
            }
            proptest::prop_assert_eq!(index.nodes.len() - index.free.len(), 1, "only the root is left");
            proptest::prop_assert!(index.nodes[0].is_empty());
            proptest::prop_assert_eq!(index.everything, 0);
        }

        /// Whatever clients do, the count the lock-free check reads is the
        /// number of filters held, so a publish skips the broker only when no
        /// held filter matches it.
        #[test]
        fn the_count_follows_the_filters(ops in proptest::collection::vec((0u8..5, 0usize..3, 0usize..4), 0..60)) {
            const CLIENTS: [&str; 3] = ["display", "station", "bed-1"];
            const FILTERS: [&str; 4] = ["devices/#", "devices/+/alarms/#", "wards/x", "devices/bed-1/vitals/hr"];
            const TOPICS: [&str; 3] = ["devices/bed-1/vitals/hr", "devices/bed-2/alarms/spo2", "wards/x"];
            let local = LocalSubscriptions::default();
            let mut memo = MatchMemo::default();
            let mut open: Vec<Connected<'_>> = Vec::new();
            for (op, c, f) in ops {
                let client = CLIENTS[c];
                let filter = vec![FILTERS[f].to_string()];
                match op {
                    0 => open.push(local.connected(client, true)),
                    1 => open.push(local.connected(client, false)),
                    2 => local.subscribed(client, &filter),
                    3 => local.unsubscribed(client, &filter),
                    _ => if !open.is_empty() { drop(open.remove(f % open.len())); },
                }
                let held: Vec<String> = local
                    .sessions()
                    .by_client
                    .values()
                    .flat_map(|s| s.filters.iter().cloned())
                    .collect();
                proptest::prop_assert_eq!(local.filters.load(Ordering::Acquire), held.len());
                let distinct: HashSet<&String> = held.iter().collect();
                let counted = local.sessions().distinct.clone();
                proptest::prop_assert_eq!(counted.len(), distinct.len());
                for f in &distinct {
                    let holders = held.iter().filter(|h| h == f).count();
                    proptest::prop_assert_eq!(counted.get(*f).copied(), Some(holders));
                }
                for topic in TOPICS {
                    let truth = held.iter().any(|f| matches(f, topic));
                    proptest::prop_assert_eq!(local.any_match(topic), truth);
                    // Asked twice: the second answer may come from the memo.
                    proptest::prop_assert_eq!(memo.any_match(&local, topic), truth);
                    proptest::prop_assert_eq!(memo.any_match(&local, topic), truth);
                }
            }
        }
    }

    /// A filter two clients hold is matched once and stays until both let go.
    #[test]
    fn a_filter_held_twice_routes_until_both_let_go() {
        let local = LocalSubscriptions::default();
        let (a, b) = (
            local.connected("display-a", true),
            local.connected("display-b", true),
        );
        let alarms = strings(&["devices/+/alarms/#"]);
        local.subscribed("display-a", &alarms);
        local.subscribed("display-b", &alarms);
        assert_eq!(local.sessions().distinct.len(), 1);
        local.unsubscribed("display-a", &alarms);
        assert!(local.any_match("devices/bed-1/alarms/spo2"));
        drop(b);
        assert!(!local.any_match("devices/bed-1/alarms/spo2"));
        drop(a);
        assert!(local.sessions().distinct.is_empty());
    }

    /// The memo stays within its bounds and right past them.
    #[test]
    fn a_memo_forgets_past_its_bounds_and_stays_right() {
        let local = LocalSubscriptions::default();
        let _c = local.connected("display", true);
        local.subscribed("display", &strings(&["devices/+/alarms/#"]));
        let mut memo = MatchMemo::default();
        for i in 0..3 * MEMO_TOPICS {
            let alarm = format!("devices/bed-{i}/alarms/spo2");
            let vital = format!("devices/bed-{i}/vitals/hr");
            assert!(memo.any_match(&local, &alarm));
            assert!(!memo.any_match(&local, &vital));
            assert!(memo.answers.len() <= MEMO_TOPICS);
        }
        let long = format!("devices/bed-1/alarms/{}", "x".repeat(MEMO_TOPIC_BYTES));
        memo.answers.clear();
        assert!(memo.any_match(&local, &long));
        assert!(memo.answers.is_empty(), "a long topic is not remembered");
        // A change of filters is seen at once, both ways, while the
        // remembered answer would say otherwise.
        let vitals = "devices/bed-1/vitals/hr";
        assert!(!memo.any_match(&local, vitals));
        let bed = strings(&["devices/bed-1/#"]);
        local.subscribed("display", &bed);
        assert!(memo.any_match(&local, vitals));
        local.unsubscribed("display", &bed);
        assert!(!memo.any_match(&local, vitals));
        let station = local.connected("station", true);
        local.subscribed("station", &bed);
        assert!(memo.any_match(&local, vitals));
        drop(station);
        assert!(!memo.any_match(&local, vitals));
    }

    /// Matching walks with its own stack: a filter and a topic of 30,000
    /// levels each, on a thread with a small stack, do not overflow it.
    #[test]
    fn deep_filters_and_topics_do_not_recurse() {
        let deep = vec!["a"; 30_000].join("/");
        let wild = vec!["+"; 30_000].join("/");
        let walked = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut index = FilterIndex::default();
                index.insert(&deep);
                index.insert(&wild);
                let answers = (
                    index.any_match(&deep),
                    index.any_match(&format!("{deep}/a")),
                );
                index.remove(&deep);
                index.remove(&wild);
                (answers, index.nodes.len() - index.free.len())
            })
            .map(|t| t.join());
        assert!(matches!(walked, Ok(Ok(((true, false), 1)))), "{walked:?}");
    }

    #[test]
    fn past_the_bound_everything_is_routed() {
        let local = LocalSubscriptions::default();
        let many: Vec<String> = (0..=MAX_FILTERS).map(|i| format!("x/{i}")).collect();
        local.subscribed("display", &many);
        assert!(local.any_match("devices/bed-1/vitals/hr"));
    }

    /// Long filters reach the byte bound long before the count's: from
    /// there nothing more is kept and everything is routed.
    #[test]
    fn past_the_byte_bound_everything_is_routed_and_nothing_more_is_kept() {
        let local = LocalSubscriptions::default();
        let long = |i: usize| format!("x/{i}/{}", "y".repeat(60_000));
        let mut held = 0;
        while held <= MAX_FILTER_BYTES {
            let f = long(held);
            held += f.len();
            assert!(
                !local.any_match("devices/bed-1/vitals/hr"),
                "{held} bytes held"
            );
            local.subscribed("display", &[f]);
        }
        assert!(local.any_match("devices/bed-1/vitals/hr"));
        let count = local.sessions().filters;
        local.subscribed("display", &[long(1), long(2)]);
        assert_eq!(
            local.sessions().filters,
            count,
            "nothing is added past the bound"
        );
        assert!(local.sessions().bytes <= MAX_FILTER_BYTES + 60_100);
    }
}
