//! The bridge's link state toward the cloud: `offline`, `syncing`, `online`.
//!
//! - `offline`: no cloud connection (start, or after any connection error).
//! - `syncing`: connected, with a backlog to drain or acknowledgements pending.
//! - `online`: connected, backlog empty, nothing in flight.
//!
//! Legal transitions: offline → syncing (CONNACK), syncing ↔ online (backlog
//! becomes empty / a message arrives), syncing/online → offline (connection
//! lost). A connection always starts in `syncing`, because whatever was in
//! flight must be confirmed before Vigil calls itself caught up; so
//! offline → online is illegal. The forwarder publishes the state on a watch
//! channel (health and metrics read it, so they always show the current
//! state) and logs changes: going offline or coming back, and the first time
//! a connection catches up (syncing → online), at INFO. Under a steady load
//! the link flips between online and syncing with nearly every message (each
//! one makes a backlog of one until its PUBACK), so those later flips are
//! logged at DEBUG only.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where the cloud link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// No cloud connection.
    Offline,
    /// Connected, draining a backlog.
    Syncing,
    /// Connected, nothing left to send.
    Online,
}

impl LinkState {
    /// The name used in logs, `/status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Offline => "offline",
            LinkState::Syncing => "syncing",
            LinkState::Online => "online",
        }
    }

    /// Whether moving from `self` to `to` is allowed (staying put is).
    pub fn can_become(self, to: LinkState) -> bool {
        use LinkState::*;
        matches!(
            (self, to),
            (Offline, Offline)
                | (Syncing, Syncing)
                | (Online, Online)
                | (Offline, Syncing)
                | (Syncing, Online)
                | (Online, Syncing)
                | (Syncing, Offline)
                | (Online, Offline)
        )
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An illegal transition: a bug in the forwarder, reported rather than hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal link state transition {from} -> {to}")]
pub struct IllegalTransition {
    /// The state before.
    pub from: LinkState,
    /// The state asked for.
    pub to: LinkState,
}

/// Owns the state and its watch channel.
#[derive(Debug)]
pub struct StateMachine {
    tx: watch::Sender<LinkState>,
    /// This connection has been `online` once (reset when it goes offline).
    caught_up: AtomicBool,
}

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMachine {
    /// Starts `offline`.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(LinkState::Offline),
            caught_up: AtomicBool::new(false),
        }
    }

    /// The current state.
    pub fn get(&self) -> LinkState {
        *self.tx.borrow()
    }

    /// A receiver for health checks and metrics.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.tx.subscribe()
    }

    /// Moves to `to` if legal, logging a change; an illegal move changes
    /// nothing and is returned as an error.
    pub fn set(&self, to: LinkState) -> Result<(), IllegalTransition> {
        let from = self.get();
        if !from.can_become(to) {
            return Err(IllegalTransition { from, to });
        }
        if from != to {
            self.tx.send_replace(to);
            if self.notable(from, to) {
                tracing::info!(from = %from, to = %to, "cloud link state changed");
            } else {
                tracing::debug!(from = %from, to = %to, "cloud link state changed");
            }
        }
        Ok(())
    }

    /// Whether a change is worth an INFO line: anything to or from
    /// `offline`, and a connection's first `online`; not the online ↔
    /// syncing flips that follow on a connection already caught up.
    fn notable(&self, from: LinkState, to: LinkState) -> bool {
        match (from, to) {
            (_, LinkState::Offline) => {
                self.caught_up.store(false, Ordering::Relaxed);
                true
            }
            (LinkState::Offline, _) => true,
            (_, LinkState::Online) => !self.caught_up.swap(true, Ordering::Relaxed),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LinkState::*;
    use super::*;

    #[test]
    fn transitions() {
        let all = [Offline, Syncing, Online];
        let legal: Vec<_> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert!(!Offline.can_become(Online), "a connection starts syncing");
        assert_eq!(legal.len(), 8, "{legal:?}");
    }

    #[test]
    fn machine_publishes_and_refuses() {
        let m = StateMachine::new();
        let rx = m.subscribe();
        assert_eq!(
            m.set(Online),
            Err(IllegalTransition {
                from: Offline,
                to: Online
            })
        );
        assert_eq!(*rx.borrow(), Offline);
        m.set(Syncing).unwrap();
        m.set(Online).unwrap();
        assert_eq!(*rx.borrow(), Online);
        m.set(Offline).unwrap();
        assert_eq!(m.get(), Offline);
        assert_eq!(serde_json::to_string(&Syncing).unwrap(), "\"syncing\"");
    }

    #[test]
    fn online_syncing_flips_are_not_notable_once_caught_up() {
        let m = StateMachine::new();
        assert!(m.notable(Offline, Syncing), "connected");
        assert!(m.notable(Syncing, Online), "caught up the first time");
        for _ in 0..3 {
            assert!(!m.notable(Online, Syncing));
            assert!(!m.notable(Syncing, Online));
        }
        assert!(m.notable(Syncing, Offline), "connection lost");
        assert!(m.notable(Offline, Syncing));
        assert!(
            m.notable(Syncing, Online),
            "caught up again after a reconnect"
        );
        assert!(!m.notable(Online, Syncing));
        assert!(m.notable(Online, Offline));
    }
}
