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
//!
//! Either way nothing reaches the disk; the store logs that at open, loudly.

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
            _ => Err(StoreError::Options(format!(
                "{VAR}={value:?} is not an ablation: this benchmark-only build takes \
                 {VAR}=gate or {VAR}=engine, or the variable unset"
            ))),
        }
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
        for bad in ["", "Gate", "fjall", "engine "] {
            let err = parse(Some(bad)).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("VIGIL_ABLATE=gate")),
                "{bad:?}: {err:?}"
            );
        }
    }
}
