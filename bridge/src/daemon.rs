//! `vigil run`: the bridge as a daemon. Opens the store, starts the gate and
//! the forwarder, and on a stop signal shuts down in data-flow order within
//! `run.shutdown_timeout`: stop taking devices (each pending commit completes
//! or fails its device's PUBACK), stop the cloud session (acknowledged
//! messages are deleted first), then close the store (fsync). Anything
//! unacknowledged simply stays stored for the next start.

use std::future::Future;

use crate::config::VigilConfig;
use crate::crypto::MasterKey;
use crate::forward::{ForwardError, Forwarder};
use crate::gate::{Gate, GateError};
use crate::store::{Store, StoreError};

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened or closed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The gate could not start (listener address, TLS files, rules, ...).
    #[error("gate: {0}")]
    Gate(#[from] GateError),
    /// The forwarder could not start or failed.
    #[error("forward: {0}")]
    Forward(#[from] ForwardError),
    /// The operator endpoints could not start.
    #[error(transparent)]
    Operator(#[from] crate::operator::OperatorError),
    /// The store failed to persist: Vigil stops rather than acknowledge what
    /// it cannot keep. A restart recovers everything acknowledged.
    #[error("the store failed and Vigil stopped: {0}")]
    StoreFailed(String),
    /// The graceful stop took longer than `run.shutdown_timeout`.
    #[error(
        "the graceful stop took longer than run.shutdown_timeout ({0:?}); unacknowledged \
         messages stay stored"
    )]
    ShutdownTimeout(std::time::Duration),
}

/// Runs until `stop` completes (or the store or forwarder fails), then shuts
/// down gracefully.
pub async fn run(
    config: VigilConfig,
    key: MasterKey,
    stop: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let options = config.store.options();
    if config.store.testing_only_ack_before_fsync {
        tracing::error!(
            "store.testing_only_ack_before_fsync is ON: devices get PUBACK before the fsync. \
             THIS VIGIL LOSES ACKNOWLEDGED DATA ON A POWER CUT. It exists only for the \
             power-cut test's negative control"
        );
    }
    let store = tokio::task::spawn_blocking(move || Store::open(options, &key))
        .await
        .map_err(|e| StoreError::Persist(format!("the store open task failed: {e}")))??;
    let mut fatal = store.fatal();
    // The configured ports are bound before the gate starts the embedded
    // broker, whose loopback listeners take free ports: one of those could
    // otherwise be the operator's port, free until Vigil binds it.
    let operator_listener = if config.http.enabled {
        match crate::operator::OperatorListener::bind(config.http.listen).await {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = store.close().await;
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let gate = match Gate::start(config.gate.clone(), store.clone()).await {
        Ok(g) => g,
        Err(e) => {
            let _ = store.close().await;
            return Err(e.into());
        }
    };
    let forwarder = match Forwarder::start(config.forward.clone(), store.clone()) {
        Ok(f) => f,
        Err(e) => {
            gate.shutdown().await;
            let _ = store.close().await;
            return Err(e.into());
        }
    };
    let operator = operator_listener.map(|listener| {
        let observed = crate::operator::Observed {
            store: store.clone(),
            gate: gate.counters(),
            forward: forwarder.counters(),
            link: forwarder.link_state(),
        };
        crate::operator::Operator::start(listener, observed)
    });
    tracing::info!(
        devices_tcp = ?gate.tcp_addr(),
        devices_tls = ?gate.tls_addr(),
        cloud = %format!("{}:{}", config.forward.host, config.forward.port),
        store = %config.store.dir.display(),
        queued = store.stats().queued(),
        "vigil running"
    );
    let mut link = forwarder.link_state();
    let outcome = {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break Ok(()),
                changed = fatal.changed() => {
                    let reason = fatal.borrow().clone();
                    match (changed, reason) {
                        (Ok(()), Some(reason)) => break Err(DaemonError::StoreFailed(reason)),
                        (Ok(()), None) => {}
                        (Err(_), _) => break Err(DaemonError::StoreFailed("the store stopped".into())),
                    }
                }
                changed = link.changed() => {
                    if changed.is_err() || forwarder.is_finished() {
                        break Ok(());
                    }
                }
            }
        }
    };
    tracing::info!("stopping: devices first, then the cloud session, then the store");
    drop(operator);
    let deadline = config.run.shutdown_timeout;
    let graceful = async {
        gate.shutdown().await;
        let forwarded = forwarder.stop().await;
        let closed = store.close().await;
        forwarded?;
        closed?;
        Ok::<(), DaemonError>(())
    };
    let stopped = match tokio::time::timeout(deadline, graceful).await {
        Ok(r) => r,
        Err(_) => Err(DaemonError::ShutdownTimeout(deadline)),
    };
    outcome.and(stopped)?;
    tracing::info!("stopped");
    Ok(())
}

/// A future that completes on SIGTERM or Ctrl-C. The handlers are
/// installed now, not when the future is first polled, so a signal that
/// arrives while the store is still opening is not the default "terminate
/// at once".
pub fn stop_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                    tracing::info!("{name} received");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = wait(term, "SIGTERM") => {}
            _ = wait(int, "SIGINT") => {}
        }
    }
}
