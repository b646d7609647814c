//! Vigil's configuration: built-in defaults, then a `vigil.toml`, then
//! environment variables `VIGIL__SECTION__KEY` (e.g. `VIGIL__FORWARD__HOST`).
//!
//! Every table refuses unknown keys. Sections are read one by one and then
//! checked as a whole, so one run reports every problem it can find, each
//! naming the key, where its value came from, and the fix.
//! `broker-config/vigil.toml` is the annotated example (parsed by a test).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::forward::config::ForwardConfig;
use crate::gate::GateConfig;
use crate::gate::rules::validate_filter;
use crate::store::{MAX_PRIORITIES, StoreOptions};

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "VIGIL_CONFIG";
/// Prefix (and separator) of the environment overrides.
pub const ENV_PREFIX: &str = "VIGIL";

/// Everything Vigil reads at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VigilConfig {
    /// `[store]`: where and how messages are kept.
    pub store: StoreConfig,
    /// `[gate]`: where devices connect.
    pub gate: GateConfig,
    /// `[forward]`: the cloud.
    pub forward: ForwardConfig,
    /// `[http]`: health, status and metrics.
    pub http: crate::operator::HttpConfig,
    /// `[run]`: the daemon itself.
    pub run: RunConfig,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Data directory (created with mode 0700).
    pub dir: PathBuf,
    /// File holding the base64 storage key. Without it the key comes from
    /// the environment variable `VIGIL_STORAGE_KEY`.
    pub key_file: Option<PathBuf>,
    /// Priority lanes (0 is the highest), 1 to 16.
    pub priorities: u8,
    /// Bytes all stored records may take; past it the oldest low-priority
    /// messages are evicted (counted, and reported by gap notices).
    pub quota_bytes: u64,
    /// Longest time appends are gathered into one fsynced commit.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Most commands in one commit.
    pub max_batch: usize,
    /// Commands that may wait for the writer.
    pub queue_depth: usize,
    /// fjall block cache (bytes).
    pub cache_bytes: u64,
    /// Free space to keep on the data directory's file system; new device
    /// messages that would go below it are refused (not acknowledged) until
    /// space comes back. 0 turns the check off.
    pub min_free_bytes: u64,
    /// **Deliberately broken, debug builds only.** Acknowledge appends once
    /// written to the OS, before the fsync, so the power-cut test can show it
    /// catches the loss (its negative control). A release build refuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub testing_only_ack_before_fsync: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let o = StoreOptions::new("vigil-data");
        Self {
            dir: o.dir,
            key_file: None,
            priorities: o.priorities,
            quota_bytes: o.quota_bytes,
            commit_interval: o.commit_interval,
            max_batch: o.max_batch,
            queue_depth: o.queue_depth,
            cache_bytes: o.cache_bytes,
            min_free_bytes: o.min_free_bytes,
            testing_only_ack_before_fsync: false,
        }
    }
}

impl StoreConfig {
    /// The store's options.
    pub fn options(&self) -> StoreOptions {
        let mut o = StoreOptions::new(&self.dir);
        o.priorities = self.priorities;
        o.quota_bytes = self.quota_bytes;
        o.eviction_step_bytes = (self.quota_bytes / 256).min(4 << 20);
        o.commit_interval = self.commit_interval;
        o.max_batch = self.max_batch;
        o.queue_depth = self.queue_depth;
        o.cache_bytes = self.cache_bytes;
        o.min_free_bytes = self.min_free_bytes;
        // Compiled out of release builds, whose configuration check refuses
        // the setting anyway.
        if cfg!(debug_assertions) && self.testing_only_ack_before_fsync {
            o.durability = crate::store::Durability::UnsafeBuffered;
        }
        o
    }
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// How long a graceful stop (SIGTERM, Ctrl-C) may take before Vigil
    /// exits anyway; unacknowledged messages stay stored either way.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// The configuration cannot be used; every problem found is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the configuration has {} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// Where a setting's value came from.
struct Sources {
    file: Option<(PathBuf, config::Config)>,
    env: HashMap<String, String>,
}

impl Sources {
    /// `key` is dotted, e.g. `forward.window`.
    fn describe(&self, key: &str) -> String {
        let var = env_var(key);
        if self.env.contains_key(&var) {
            return format!("set by the environment variable {var}");
        }
        if let Some((path, file)) = &self.file
            && file.get::<config::Value>(key).is_ok()
        {
            return format!("set in {}", path.display());
        }
        "the built-in default".into()
    }
}

/// The environment variable overriding `key` (`forward.tls.ca` →
/// `VIGIL__FORWARD__TLS__CA`).
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase())
}

impl VigilConfig {
    /// Loads defaults, then `file` (if any), then the `VIGIL__*` entries of
    /// `env`, and checks the result.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let overrides: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut problems = Vec::new();
        let file_only = match file {
            None => None,
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError(vec![format!(
                        "configuration file {} does not exist: check --config or {CONFIG_ENV}",
                        path.display()
                    )]));
                }
                match config::Config::builder()
                    .add_source(config::File::from(path).format(config::FileFormat::Toml))
                    .build()
                {
                    Ok(c) => Some((path.to_path_buf(), c)),
                    Err(e) => return Err(ConfigError(vec![format!("{}: {e}", path.display())])),
                }
            }
        };
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(overrides.clone())),
        );
        let merged = builder
            .build()
            .map_err(|e| ConfigError(vec![e.to_string()]))?;
        let sources = Sources {
            file: file_only,
            env: overrides,
        };

        // Unknown sections.
        let known = ["store", "gate", "forward", "http", "run"];
        if let Ok(table) = merged
            .clone()
            .try_deserialize::<HashMap<String, config::Value>>()
        {
            let mut unknown: Vec<_> = table
                .keys()
                .filter(|k| !known.contains(&k.as_str()))
                .collect();
            unknown.sort();
            for k in unknown {
                problems.push(format!(
                    "unknown section or key `{k}` ({}); the sections are {}",
                    sources.describe(k),
                    known.join(", ")
                ));
            }
        }
        // Each section on its own, so a mistake in one does not hide another's.
        fn section<T: serde::de::DeserializeOwned + Default>(
            merged: &config::Config,
            name: &str,
            problems: &mut Vec<String>,
        ) -> T {
            match merged.get::<T>(name) {
                Ok(v) => v,
                Err(config::ConfigError::NotFound(_)) => T::default(),
                Err(e) => {
                    problems.push(format!("[{name}]: {e}"));
                    T::default()
                }
            }
        }
        let config = VigilConfig {
            store: section(&merged, "store", &mut problems),
            gate: section(&merged, "gate", &mut problems),
            forward: section(&merged, "forward", &mut problems),
            http: section(&merged, "http", &mut problems),
            run: section(&merged, "run", &mut problems),
        };
        for p in config.problems() {
            let key = p.split_whitespace().next().unwrap_or_default();
            let key = key.trim_end_matches([':', ',']);
            problems.push(format!("{p} ({})", sources.describe(key)));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(problems))
        }
    }

    /// The deliberately broken settings that are set, when `release` (a
    /// release build refuses them; debug builds run the negative-control
    /// tests with them).
    fn negative_controls_refused(&self, release: bool) -> Vec<String> {
        let mut p = Vec::new();
        if release && self.store.testing_only_ack_before_fsync {
            p.push(
                "store.testing_only_ack_before_fsync exists only in debug builds, for the \
                 power-cut test's negative control; remove it"
                    .into(),
            );
        }
        p.extend(self.forward.negative_control_refused(release));
        p
    }

    /// Semantic checks across sections. Each message starts with the key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.forward.problems();
        let s = &self.store;
        if s.priorities == 0 || s.priorities > MAX_PRIORITIES {
            p.push(format!(
                "store.priorities is {}; it must be 1 to {MAX_PRIORITIES}",
                s.priorities
            ));
        }
        if s.quota_bytes < 1 << 20 {
            p.push(format!(
                "store.quota_bytes is {}; give the store at least 1 MiB (1048576)",
                s.quota_bytes
            ));
        }
        if s.max_batch == 0 || s.queue_depth == 0 {
            p.push("store.max_batch and store.queue_depth must be at least 1".into());
        }
        if s.commit_interval > Duration::from_secs(1) {
            p.push(
                "store.commit_interval above 1s would hold every device's PUBACK that long; \
                 use e.g. 2ms"
                    .into(),
            );
        }
        // The deliberately broken settings of the negative-control tests
        // exist only in debug (test) builds.
        p.extend(self.negative_controls_refused(!cfg!(debug_assertions)));
        let g = &self.gate;
        if g.tcp_listen.is_none() && g.tls.is_none() {
            p.push(
                "gate.tcp_listen is off and gate.tls is not set: no device could connect".into(),
            );
        }
        if g.max_connections == 0 || g.max_inflight == 0 {
            p.push("gate.max_connections and gate.max_inflight must be at least 1".into());
        }
        for (i, rule) in g.rules.iter().enumerate() {
            if let Err(e) = validate_filter(&rule.filter) {
                p.push(format!("gate.rules[{i}].filter {:?}: {e}", rule.filter));
            }
            if rule.priority >= s.priorities {
                p.push(format!(
                    "gate.rules[{i}].priority {} is not below store.priorities ({})",
                    rule.priority, s.priorities
                ));
            }
        }
        for (i, rule) in g.subscribe.iter().enumerate() {
            if rule.clients.is_empty() || rule.clients.iter().any(String::is_empty) {
                p.push(format!(
                    "gate.subscribe[{i}].clients: name at least one client id (exact, `prefix*`, or `*` for everyone)"
                ));
            }
            for f in &rule.filters {
                if let Err(e) = validate_filter(f) {
                    p.push(format!("gate.subscribe[{i}].filters {f:?}: {e}"));
                }
            }
        }
        if g.unmatched.priority >= s.priorities {
            p.push(format!(
                "gate.unmatched.priority {} is not below store.priorities ({})",
                g.unmatched.priority, s.priorities
            ));
        }
        if self.run.shutdown_timeout.is_zero() {
            p.push("run.shutdown_timeout must be above 0, e.g. 10s".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vigil.toml");
        std::fs::write(
            &path,
            "[forward]\nhost = \"cloud.example\"\nwindow = 32\nack_timeout = \"5s\"\n",
        )
        .unwrap();
        let c = VigilConfig::load(Some(&path), &env(&[("VIGIL__FORWARD__WINDOW", "8")])).unwrap();
        assert_eq!(c.forward.host, "cloud.example");
        assert_eq!(c.forward.window, Some(8));
        assert_eq!(c.forward.window(), 8);
        assert_eq!(c.forward.ack_timeout, Duration::from_secs(5));
        assert_eq!(c.store, StoreConfig::default());
        assert_eq!(
            VigilConfig::load(None, &env(&[])).unwrap(),
            VigilConfig::default()
        );
    }

    /// A release build refuses the negative controls' settings, naming each
    /// and the fix; a debug build (the tests' Vigil) takes them.
    #[test]
    fn a_release_build_refuses_the_deliberately_broken_settings() {
        let mut c = VigilConfig::default();
        assert!(c.negative_controls_refused(true).is_empty());
        c.store.testing_only_ack_before_fsync = true;
        c.forward.testing_only_delete_on_send = true;
        let refused = c.negative_controls_refused(true);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with("store.testing_only_ack_before_fsync exists only"));
        assert!(refused[1].starts_with("forward.testing_only_delete_on_send exists only"));
        assert!(refused.iter().all(|m| m.ends_with("remove it")));
        assert!(c.negative_controls_refused(false).is_empty());
        // This (debug) build takes them: the negative-control tests need it.
        assert!(c.problems().iter().all(|m| !m.contains("testing_only")));
    }

    #[test]
    fn every_mistake_is_reported_at_once_with_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vigil.toml");
        std::fs::write(
            &path,
            "[forward]\nwindow = 0\ntopic_prefix = \"a/#\"\n\n[store]\npriorities = 2\nquota = 5\n\n\
             [gate]\nmax_inflight = \"many\"\n\n[metrics]\nport = 1\n",
        )
        .unwrap();
        let err = VigilConfig::load(
            Some(&path),
            &env(&[
                ("VIGIL__FORWARD__HOST", ""),
                ("VIGIL__RUN__SHUTDOWN_TIMEOUT", "soon"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "unknown section or key `metrics`",
            "[store]",
            "quota",
            "[gate]",
            "[run]",
            "forward.window is 0",
            "forward.topic_prefix",
            "forward.host is empty",
            "VIGIL__FORWARD__HOST",
            &format!("set in {}", path.display()),
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(err.0.len() >= 7, "{text}");
    }

    #[test]
    fn the_annotated_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/vigil.toml");
        let c = VigilConfig::load(Some(&path), &env(&[])).unwrap();
        // Left to the protocol's default, as documented there.
        assert_eq!(c.forward.window, None);
        assert_eq!(c.forward.window(), 256);
        assert!(!c.gate.rules.is_empty());
    }
}
