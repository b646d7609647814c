//! [`Rig`]: the real `vigil` binary against a loopback mutual-TLS cloud.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vigil_sim::cloud::{self, Subscriber};
use vigil_sim::ledger::Sent;
use vigil_sim::pki::{self, DevPki};

use super::process::{VigilChild as Vigil, free_port, monitors, spawn_vigil};

/// A loopback mutual-TLS cloud (rumqttd and the simulator's verifying
/// subscriber), a development PKI, and what it takes to run the real `vigil`
/// binary against them.
pub struct Rig {
    _dir: tempfile::TempDir,
    pub work: PathBuf,
    pub pki: DevPki,
    pub gate: SocketAddr,
    pub http: SocketAddr,
    pub subscriber: Subscriber,
    /// The data directory (default `<work>/store`).
    pub store: PathBuf,
    /// Extra `[store]` lines for the configuration.
    pub store_extra: String,
}

impl Rig {
    pub async fn new() -> (Self, cloud::Listeners) {
        Self::with_certificates_valid_for(None).await
    }

    /// A rig whose certificates (not the CA) are valid for `days` from today.
    pub async fn with_certificates_valid_for(days: Option<u32>) -> (Self, cloud::Listeners) {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().to_path_buf();
        let pki = pki::loopback_valid_for(&work.join("pki"), days).unwrap();
        let listeners = cloud::start_broker(&pki).unwrap();
        let subscriber = Subscriber::start(&pki, listeners.v4, "vigil", None).unwrap();
        assert!(subscriber.subscribed(Duration::from_secs(20)).await);
        let rig = Self {
            _dir: dir,
            pki,
            gate: SocketAddr::from(([127, 0, 0, 1], free_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            subscriber,
            store: work.join("store"),
            store_extra: String::new(),
            work,
        };
        (rig, listeners)
    }

    /// Writes `vigil.toml` for a cloud at `cloud_port` with extra
    /// `[forward]` lines.
    pub fn config(&self, cloud_port: u16, forward_extra: &str) -> PathBuf {
        let path = self.work.join("vigil.toml");
        let p = |f: &str| self.pki.path(f).display().to_string();
        std::fs::write(
            &path,
            format!(
                "[store]\ndir = {store:?}\n{store_extra}\n\n[gate]\ntcp_listen = \"{gate}\"\n\n[http]\n\
                 listen = \"{http}\"\n\n[forward]\nhost = \"127.0.0.1\"\nport = {cloud_port}\n\
                 backoff_min = \"100ms\"\nbackoff_max = \"1s\"\n{forward_extra}\n\n\
                 [forward.tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
                store = self.store.display().to_string(),
                store_extra = self.store_extra,
                gate = self.gate,
                http = self.http,
                ca = p("ca.pem"),
                cert = p("vigil.pem"),
                key = p("vigil.key"),
            ),
        )
        .unwrap();
        path
    }

    /// Starts `vigil run` with extra environment (e.g. libfaketime's), its
    /// log in `vigil.log`; waits until devices can connect.
    pub async fn start(&self, config: &Path, env: &[(&str, &str)]) -> Vigil {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
        command
            .envs(env.iter().copied())
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        spawn_vigil(command, config, &self.work.join("vigil.log"), self.gate)
            .await
            .0
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("vigil.log")).unwrap_or_default()
    }

    /// Monitors publishing until the returned token is cancelled.
    pub fn devices(&self, prefix: &str) -> (CancellationToken, tokio::task::JoinHandle<Vec<Sent>>) {
        monitors(self.gate, prefix, 5, 10.0, Duration::from_secs(5))
    }

    pub async fn status(&self) -> Option<vigil::operator::Status> {
        vigil::operator::fetch_status(self.http, Duration::from_secs(2))
            .await
            .ok()
    }

    /// Waits (at most `limit`) until every acknowledged message of `sent`
    /// has arrived, then returns the oracle's report.
    pub async fn judge(&self, sent: &[Sent], limit: Duration) -> vigil_sim::oracle::Report {
        let want: HashSet<&str> = sent
            .iter()
            .filter(|s| s.acked)
            .map(|s| s.sha256.as_str())
            .collect();
        let deadline = Instant::now() + limit;
        loop {
            let have: HashSet<String> = self
                .subscriber
                .arrived()
                .into_iter()
                .filter(|a| a.verified)
                .map(|a| a.sha256)
                .collect();
            if want.iter().all(|w| have.contains(*w)) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        vigil_sim::oracle::judge(sent, &self.subscriber.arrived())
    }
}
