//! Topic rules: which kind and priority a device message gets.
//!
//! The default scheme, documented in the README:
//!
//! | filter                   | kind        | priority |
//! |--------------------------|-------------|----------|
//! | `devices/+/alarms/#`     | alert       | 0        |
//! | `devices/+/vitals/#`     | measurement | 1        |
//! | `devices/+/status/#`     | measurement | 2        |
//! | `devices/+/waveforms/#`  | measurement | 3        |
//!
//! Anything else gets the configured `unmatched` kind and priority and is
//! counted, so a device publishing to an unexpected topic is visible.

use serde::{Deserialize, Serialize};

use super::GateError;
use super::config::Unmatched;
use crate::event::Kind;

/// One rule: a topic filter with the kind and priority of what matches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    /// MQTT topic filter (`+` and `#` wildcards).
    pub filter: String,
    /// `measurement` or `alert`.
    pub kind: Kind,
    /// 0 is the highest; below the store's priority count.
    pub priority: u8,
}

impl TopicRule {
    /// The documented default scheme.
    pub fn defaults() -> Vec<TopicRule> {
        let rule = |filter: &str, kind, priority| TopicRule {
            filter: filter.into(),
            kind,
            priority,
        };
        vec![
            rule("devices/+/alarms/#", Kind::Alert, 0),
            rule("devices/+/vitals/#", Kind::Measurement, 1),
            rule("devices/+/status/#", Kind::Measurement, 2),
            rule("devices/+/waveforms/#", Kind::Measurement, 3),
        ]
    }
}

/// What the rules decided for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// Kind to store.
    pub kind: Kind,
    /// Lane to store in.
    pub priority: u8,
    /// No rule matched; the `unmatched` default was used.
    pub unmatched: bool,
}

/// Validated rules, ready to match.
#[derive(Debug, Clone)]
pub struct TopicRules {
    rules: Vec<(Vec<String>, TopicRule)>,
    unmatched: Unmatched,
}

impl TopicRules {
    /// Checks every filter, kind and priority against the store's priority count.
    pub fn new(
        rules: &[TopicRule],
        unmatched: &Unmatched,
        priorities: u8,
    ) -> Result<Self, GateError> {
        let bad = |index: Option<usize>, reason: String| GateError::Rule {
            rule: index.map_or("unmatched".to_string(), |i| format!("rules[{i}]")),
            reason,
        };
        let check = |index: Option<usize>, kind: Kind, priority: u8| {
            if kind == Kind::GapNotice {
                return Err(bad(
                    index,
                    "kind `gap-notice` is Vigil's own; use `measurement` or `alert`".into(),
                ));
            }
            if priority >= priorities {
                return Err(bad(
                    index,
                    format!(
                        "priority {priority} does not exist: the store has priorities 0 to {}",
                        priorities.saturating_sub(1)
                    ),
                ));
            }
            Ok(())
        };
        let mut out = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            check(Some(i), rule.kind, rule.priority)?;
            validate_filter(&rule.filter)
                .map_err(|reason| bad(Some(i), format!("filter `{}`: {reason}", rule.filter)))?;
            out.push((
                rule.filter.split('/').map(str::to_string).collect(),
                rule.clone(),
            ));
        }
        check(None, unmatched.kind, unmatched.priority)?;
        Ok(Self {
            rules: out,
            unmatched: unmatched.clone(),
        })
    }

    /// Kind and priority for `topic`: the first matching rule, else `unmatched`.
    pub fn classify(&self, topic: &str) -> Class {
        for (levels, rule) in &self.rules {
            if matches(levels, topic) {
                return Class {
                    kind: rule.kind,
                    priority: rule.priority,
                    unmatched: false,
                };
            }
        }
        Class {
            kind: self.unmatched.kind,
            priority: self.unmatched.priority,
            unmatched: true,
        }
    }
}

/// Checks MQTT filter syntax: `#` only as the whole last level, `+` only as a
/// whole level.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("a filter cannot be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole level and the last one".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level".into());
        }
    }
    Ok(())
}

/// Checks a topic a device publishes to: non-empty, no wildcards, no NUL.
pub fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("empty topic");
    }
    if topic.contains(['+', '#']) {
        return Err("wildcard in a publish topic");
    }
    if topic.contains('\0') {
        return Err("NUL in topic");
    }
    Ok(())
}

/// MQTT matching; topics starting with `$` do not match leading wildcards.
fn matches(filter: &[String], topic: &str) -> bool {
    if topic.starts_with('$') && filter.first().is_some_and(|l| l == "+" || l == "#") {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> TopicRules {
        TopicRules::new(&TopicRule::defaults(), &Unmatched::default(), 4).unwrap()
    }

    #[test]
    fn default_scheme() {
        let r = rules();
        let c = r.classify("devices/bed-12/alarms/spo2-low");
        assert_eq!((c.kind, c.priority, c.unmatched), (Kind::Alert, 0, false));
        assert_eq!(
            r.classify("devices/bed-12/alarms").priority,
            0,
            "# matches the parent"
        );
        assert_eq!(r.classify("devices/bed-12/vitals/hr").priority, 1);
        assert_eq!(r.classify("devices/bed-12/status").priority, 2);
        assert_eq!(r.classify("devices/bed-12/waveforms/ecg/ii").priority, 3);
        let c = r.classify("devices/bed-12/unknown");
        assert_eq!(
            (c.kind, c.priority, c.unmatched),
            (Kind::Measurement, 2, true)
        );
        assert!(
            r.classify("devices/alarms/x").unmatched,
            "+ is exactly one level"
        );
        assert!(r.classify("other/bed-12/alarms/x").unmatched);
    }

    #[test]
    fn first_match_wins_and_dollar_topics_skip_wildcards() {
        let rule = |filter: &str, priority| TopicRule {
            filter: filter.into(),
            kind: Kind::Measurement,
            priority,
        };
        let r = TopicRules::new(
            &[rule("a/b", 1), rule("a/+", 2), rule("#", 3)],
            &Unmatched::default(),
            4,
        )
        .unwrap();
        assert_eq!(r.classify("a/b").priority, 1);
        assert_eq!(r.classify("a/c").priority, 2);
        assert_eq!(r.classify("x/y/z").priority, 3);
        assert!(r.classify("$SYS/x").unmatched);
    }

    #[test]
    fn bad_rules_are_named() {
        let rule = |filter: &str, kind, priority| TopicRule {
            filter: filter.into(),
            kind,
            priority,
        };
        let err = |rules: &[TopicRule]| {
            TopicRules::new(rules, &Unmatched::default(), 4)
                .unwrap_err()
                .to_string()
        };
        let e = err(&[rule("a/#/b", Kind::Alert, 0)]);
        assert!(e.contains("rules[0]") && e.contains("`#`"), "{e}");
        let e = err(&[rule("a", Kind::Alert, 0), rule("a/b+", Kind::Alert, 0)]);
        assert!(e.contains("rules[1]") && e.contains("`+`"), "{e}");
        let e = err(&[rule("a", Kind::Alert, 4)]);
        assert!(e.contains("priority 4") && e.contains("0 to 3"), "{e}");
        let e = err(&[rule("a", Kind::GapNotice, 0)]);
        assert!(e.contains("gap-notice"), "{e}");
        let e = TopicRules::new(
            &[],
            &Unmatched {
                kind: Kind::Measurement,
                priority: 9,
            },
            4,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unmatched"), "{e}");
    }

    #[test]
    fn topics() {
        assert!(validate_topic("a/b").is_ok());
        assert!(validate_topic("").is_err());
        assert!(validate_topic("a/+").is_err());
        assert!(validate_topic("a/#").is_err());
        assert!(validate_filter("+/a/#").is_ok());
        assert!(validate_filter("").is_err());
    }
}
