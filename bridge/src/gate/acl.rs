//! Subscriptions: which clients may subscribe to which topic filters on the
//! embedded broker.
//!
//! Every reading any device publishes is relayed to the embedded broker for
//! local displays, so a device that may subscribe to `#` reads every
//! patient's data. Subscriptions are therefore refused unless a rule in
//! `gate.subscribe` allows them: a rule names client ids (exact, or a prefix
//! ending in `*`; `*` alone is everyone) and the filters they may subscribe
//! to. A requested filter is allowed only if every topic it can match is
//! matched by an allowed filter (`devices/+/vitals/#` allows
//! `devices/bed-1/vitals/hr`, not `devices/#`). A SUBSCRIBE with any filter
//! not allowed is refused as a whole (each filter gets a failure in the
//! SUBACK: 0x80 in MQTT 3.1.1, 0x87 "not authorized" in MQTT 5), is not passed
//! to the broker, and is counted; the connection stays open.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::config::SubscribeRule;
use super::frame::{Frame, Protocol};

/// The rules, ready to check.
#[derive(Debug, Clone, Default)]
pub struct SubscribeAcl {
    rules: Vec<SubscribeRule>,
}

impl SubscribeAcl {
    /// From the configured rules (already validated).
    pub fn new(rules: &[SubscribeRule]) -> Self {
        Self {
            rules: rules.to_vec(),
        }
    }

    /// Whether `client_id` may subscribe to `filter`.
    pub fn allows(&self, client_id: &str, filter: &str) -> bool {
        self.rules.iter().any(|r| {
            r.clients.iter().any(|c| client_matches(c, client_id))
                && r.filters.iter().any(|a| covers(a, filter))
        })
    }
}

/// `*` is everyone; `prefix*` every id starting with `prefix`; anything else
/// that exact id.
fn client_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

/// Whether every topic `filter` can match is matched by `allowed` too.
/// Topics starting with `$` are not matched by a leading wildcard (MQTT).
///
/// Walks both level by level without allocating: the gate asks this of every
/// local filter for each device publish that may be routed
/// (`cargo bench -p vigil --bench local`).
pub fn covers(allowed: &str, filter: &str) -> bool {
    let mut a = allowed.split('/');
    let mut f = filter.split('/');
    let mut first = true;
    loop {
        let (x, y) = (a.next(), f.next());
        if first && filter.starts_with('$') && matches!(x, Some("#" | "+")) {
            return false;
        }
        first = false;
        match (x, y) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y && y != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The packet id and filters of a SUBSCRIBE.
pub fn subscribe_filters(protocol: Protocol, frame: &Frame) -> Result<(u16, Vec<String>), String> {
    let mut buf = frame.to_buf();
    match protocol {
        Protocol::V5 => match v5::Packet::read(&mut buf, None) {
            Ok(v5::Packet::Subscribe(s)) => {
                Ok((s.pkid, s.filters.into_iter().map(|f| f.path).collect()))
            }
            Ok(_) => Err("not a SUBSCRIBE".into()),
            Err(e) => Err(format!("{e:?}")),
        },
        _ => match v4::Packet::read(&mut buf, usize::MAX) {
            Ok(v4::Packet::Subscribe(s)) => {
                Ok((s.pkid, s.filters.into_iter().map(|f| f.path).collect()))
            }
            Ok(_) => Err("not a SUBSCRIBE".into()),
            Err(e) => Err(format!("{e:?}")),
        },
    }
}

/// The filters of an UNSUBSCRIBE.
pub fn unsubscribe_filters(protocol: Protocol, frame: &Frame) -> Result<Vec<String>, String> {
    let mut buf = frame.to_buf();
    match protocol {
        Protocol::V5 => match v5::Packet::read(&mut buf, None) {
            Ok(v5::Packet::Unsubscribe(u)) => Ok(u.filters),
            Ok(_) => Err("not an UNSUBSCRIBE".into()),
            Err(e) => Err(format!("{e:?}")),
        },
        _ => match v4::Packet::read(&mut buf, usize::MAX) {
            Ok(v4::Packet::Unsubscribe(u)) => Ok(u.topics),
            Ok(_) => Err("not an UNSUBSCRIBE".into()),
            Err(e) => Err(format!("{e:?}")),
        },
    }
}

/// A SUBACK refusing `n` filters.
pub fn suback_refusal(protocol: Protocol, pkid: u16, n: usize) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    let written = match protocol {
        Protocol::V5 => v5::SubAck {
            pkid,
            return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; n],
            properties: None,
        }
        .write(&mut buf)
        .is_ok(),
        _ => v4::SubAck::new(pkid, vec![v4::SubscribeReasonCode::Failure; n])
            .write(&mut buf)
            .is_ok(),
    };
    written.then(|| buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_of_filters() {
        for (allowed, filter, ok) in [
            ("#", "devices/bed-1/vitals/hr", true),
            ("#", "#", true),
            ("#", "$SYS/x", false),
            ("devices/#", "devices", true),
            ("devices/#", "devices/+/vitals/#", true),
            ("devices/+/vitals/#", "devices/bed-1/vitals/hr", true),
            ("devices/+/vitals/#", "devices/bed-1/vitals", true),
            ("devices/+/vitals/#", "devices/#", false),
            ("devices/+/vitals/#", "devices/+/+/hr", false),
            ("devices/+/vitals/#", "#", false),
            ("devices/bed-1/#", "devices/+/vitals", false),
            ("devices/+", "devices/+", true),
            ("devices/+", "devices/a/b", false),
            ("devices/+", "devices", false),
            ("devices/a", "devices/a", true),
            ("devices/a", "devices/+", false),
            ("$SYS/#", "$SYS/broker", true),
        ] {
            assert_eq!(covers(allowed, filter), ok, "{allowed} covers {filter}");
        }
    }

    /// The definition `covers` had before it stopped allocating: both
    /// split into vectors, compared level by level.
    fn covers_by_vectors(allowed: &str, filter: &str) -> bool {
        let a: Vec<&str> = allowed.split('/').collect();
        let f: Vec<&str> = filter.split('/').collect();
        let dollar = f.first().is_some_and(|l| l.starts_with('$'));
        if dollar && a.first().is_some_and(|l| *l == "#" || *l == "+") {
            return false;
        }
        let mut i = 0;
        loop {
            match (a.get(i).copied(), f.get(i).copied()) {
                (Some("#"), _) => return true,
                (Some(_), Some("#")) => return false,
                (Some("+"), Some(_)) => {}
                (Some(x), Some(y)) if x == y && y != "+" => {}
                (None, None) => return true,
                _ => return false,
            }
            i += 1;
        }
    }

    proptest::proptest! {
        /// Topic-like strings from a small alphabet, so levels, wildcards,
        /// `$` and empty levels meet often.
        #[test]
        fn covers_agrees_with_the_vector_definition(
            allowed in "[ab#+$/]{0,12}",
            filter in "[ab#+$/]{0,12}",
        ) {
            proptest::prop_assert_eq!(
                covers(&allowed, &filter),
                covers_by_vectors(&allowed, &filter),
                "{} covers {}", allowed, filter
            );
        }
    }

    #[test]
    fn rules_name_clients_exactly_or_by_prefix() {
        let acl = SubscribeAcl::new(&[
            SubscribeRule {
                clients: vec!["nurse-station".into(), "display-*".into()],
                filters: vec!["devices/#".into()],
            },
            SubscribeRule {
                clients: vec!["*".into()],
                filters: vec!["wards/announcements".into()],
            },
        ]);
        assert!(acl.allows("nurse-station", "devices/#"));
        assert!(acl.allows("display-3", "devices/bed-1/vitals/#"));
        assert!(!acl.allows("nurse-station-2", "devices/#"));
        assert!(!acl.allows("bed-1", "devices/#"));
        assert!(acl.allows("bed-1", "wards/announcements"));
        assert!(!SubscribeAcl::default().allows("anyone", "x"));
    }
}
