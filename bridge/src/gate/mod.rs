//! The gate: where devices connect, and where a PUBACK comes to mean "on disk".
//!
//! rumqttd acknowledges a QoS 1 publish the moment it reads it, before anything
//! is stored, and has no hook to change that. So devices never talk to rumqttd
//! directly: they connect to the gate's listeners (plain TCP, and TLS with
//! optional client certificates), which authenticate them, give each message
//! its kind and priority from the topic rules, submit it to the store, and relay
//! to an embedded rumqttd on loopback everything a local client may need (a
//! publish no local subscription matches skips it). The device's acknowledgement
//! waits for the store's commit: for QoS 1 the gate sends its own PUBACK (and
//! drops rumqttd's), for QoS 2 it holds rumqttd's PUBREC. rumqttd stays the
//! broker for local subscribers, retained messages, wills and sessions.
//!
//! * [`config`]: the `[gate]` settings.
//! * [`broker`]: the embedded rumqttd and its checked settings file.
//! * `relay`: one device connection (the ack-holding relay).
//! * [`frame`]: bounded MQTT framing.
//! * [`rules`]: topic filters to kind and priority.
//! * [`auth`]: password hashes, client certificates, CONNACK codes.
//! * [`acl`]: who may subscribe to what on the embedded broker.
//! * [`local`]: what local clients subscribe to, so other publishes skip it.
//! * [`resend`]: a device's re-delivery of a publish already committed is
//!   acknowledged, not stored twice.
//! * [`tls`]: the TLS listener's rustls configuration.
//!
//! Bounds: connections (`max_connections`), unacknowledged publishes per
//! device (`max_inflight`, then the gate stops reading that device), packet
//! size (checked before reading), handshake, CONNECT and per-packet time,
//! the relay's queues (bounded channels), topic aliases per device.

pub mod acl;
pub mod auth;
pub mod broker;
pub mod config;
pub mod frame;
pub mod local;
mod relay;
pub mod resend;
pub mod rules;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::auth::{Authenticator, PeerCert};
use self::broker::{BrokerFile, EmbeddedBroker};
pub use self::config::GateConfig;
use self::rules::TopicRules;
use crate::store::{Appended, Store, StoreError};

/// Why the gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// A listener address is taken or not allowed.
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Bind {
        /// The setting that names the address.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The embedded broker's settings file is missing, unreadable, has an
    /// unknown key or an unsafe value.
    #[error("embedded broker settings {path}: {reason}")]
    BrokerConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The embedded broker did not start.
    #[error("the embedded broker did not start: {0}")]
    Broker(String),
    /// A TLS file is missing, unreadable, too widely readable or unusable.
    #[error(transparent)]
    Tls(#[from] crate::pem::PemError),
    /// The accounts in `gate.auth` are unusable.
    #[error("{0}")]
    Auth(String),
    /// A topic rule is invalid.
    #[error("gate.{rule}: {reason}")]
    Rule {
        /// Which rule (`rules[2]`, `unmatched`).
        rule: String,
        /// What is wrong.
        reason: String,
    },
    /// Settings that contradict each other.
    #[error("{0}")]
    Config(String),
}

/// Counters since start. Connection counts are cumulative; `open` is current.
#[derive(Debug, Default)]
pub struct GateCounters {
    /// Device connections accepted (TCP, before TLS and CONNECT).
    pub accepted: AtomicU64,
    /// Device connections open now.
    pub open: AtomicU64,
    /// Connections that completed CONNECT and are relayed.
    pub sessions: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub over_limit: AtomicU64,
    /// TLS handshakes that failed or timed out (bad or missing certificate...).
    pub tls_failures: AtomicU64,
    /// Connections that sent no CONNECT within `connect_timeout`.
    pub connect_timeouts: AtomicU64,
    /// Refused: wrong or missing credentials or certificate.
    pub refused_auth: AtomicU64,
    /// Refused: unusable client id.
    pub refused_client_id: AtomicU64,
    /// Refused: MQTT level other than 3.1.1 and 5.
    pub refused_protocol: AtomicU64,
    /// Connections closed for a malformed or out-of-order packet.
    pub protocol_errors: AtomicU64,
    /// Connections closed for a packet over `max_packet_size`.
    pub oversized: AtomicU64,
    /// Device messages committed to the store.
    pub stored: AtomicU64,
    /// Device messages the store refused because it is full of what cannot be
    /// evicted (MQTT 5: PUBACK 0x97; 3.1.1: no PUBACK and a disconnect).
    pub refused_full: AtomicU64,
    /// Device messages the store could not take for another reason (closed,
    /// failed); never acknowledged.
    pub store_failures: AtomicU64,
    /// Messages on topics no rule matched (stored with the `unmatched` class).
    pub unmatched_topics: AtomicU64,
    /// Devices refused because the embedded broker could not be reached.
    pub broker_unavailable: AtomicU64,
    /// Device messages refused because the disk was nearly full
    /// (`store.min_free_bytes`).
    pub refused_disk_low: AtomicU64,
    /// Publishes under another device's `devices/<client id>/` (connection
    /// closed, nothing stored).
    pub refused_topic: AtomicU64,
    /// Retained publishes and wills relayed as not retained because of
    /// `max_retained_topics` or `max_retained_bytes`.
    pub retain_capped: AtomicU64,
    /// SUBSCRIBE packets refused because no `gate.subscribe` rule allows
    /// every filter in them.
    pub refused_subscribe: AtomicU64,
    /// Connections with a client id that was already connected: the broker
    /// closes the older one (MQTT session takeover).
    pub takeovers: AtomicU64,
    /// Device publishes not relayed to the embedded broker because no local
    /// subscription matches them (stored and forwarded as every other).
    pub not_routed_locally: AtomicU64,
    /// QoS 1 re-deliveries (DUP) of a publish already committed: acknowledged,
    /// not stored again ([`resend`]).
    pub resends_acknowledged: AtomicU64,
}

impl GateCounters {
    fn inc(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What every connection of one gate shares.
struct Context {
    config: GateConfig,
    store: Store,
    rules: TopicRules,
    subscribe: acl::SubscribeAcl,
    /// Topics holding a retained message in the embedded broker, as far as
    /// the gate has relayed them (bounded by `max_retained_topics`).
    retained: std::sync::Mutex<std::collections::HashSet<String>>,
    auth: Authenticator,
    broker_v4: SocketAddr,
    broker_v5: SocketAddr,
    counters: Arc<GateCounters>,
    cancel: CancellationToken,
    /// When a refusal was last logged (seconds since the gate started), so a
    /// full store or disk logs a line every [`REFUSAL_LOG_EVERY`], not one
    /// per message.
    refusal_logged: AtomicU64,
    started: std::time::Instant,
    /// Connections per client id (bounded by `max_connections`), to tell a
    /// session takeover when it happens.
    live: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// What local clients subscribe to in the embedded broker.
    local: local::LocalSubscriptions,
    /// The committed QoS 1 publishes of each client id lately seen, so a
    /// re-delivery of one is not stored again.
    resends: resend::Resends,
}

/// Counts one live connection of a client id until dropped.
struct LiveSession<'a> {
    ctx: &'a Context,
    client_id: String,
}

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        let mut live = self
            .ctx
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = live.get_mut(&self.client_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                live.remove(&self.client_id);
            }
        }
    }
}

/// Least time between two log lines about refused messages.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Context {
    /// Registers a connection of `client_id`; when the id is already
    /// connected, counts and logs the takeover (the broker then closes the
    /// older connection, as MQTT requires). A device that keeps taking over
    /// another's id shows up here.
    fn live_session(&self, client_id: &str, peer: SocketAddr) -> LiveSession<'_> {
        let already = {
            let mut live = self
                .live
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = live.entry(client_id.to_string()).or_insert(0);
            *n += 1;
            *n > 1
        };
        if already && !client_id.is_empty() {
            self.counters.inc(&self.counters.takeovers);
            tracing::info!(
                device = client_id,
                %peer,
                "a client id that is already connected connected again; the older connection is closed (session takeover)"
            );
        }
        LiveSession {
            ctx: self,
            client_id: client_id.to_string(),
        }
    }

    /// Whether the embedded broker may retain `payload_len` bytes on
    /// `topic`; an empty payload clears the topic and is always allowed.
    fn may_retain(&self, topic: &str, payload_len: usize) -> bool {
        let mut retained = self
            .retained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if payload_len == 0 {
            retained.remove(topic);
            return true;
        }
        if payload_len > self.config.max_retained_bytes {
            return false;
        }
        if retained.contains(topic) {
            return true;
        }
        if retained.len() >= self.config.max_retained_topics {
            return false;
        }
        retained.insert(topic.to_string());
        true
    }

    /// Whether a refusal may be logged now (true at most once per
    /// [`REFUSAL_LOG_EVERY`]).
    fn log_refusal_now(&self) -> bool {
        let now = self.started.elapsed().as_secs() + REFUSAL_LOG_EVERY.as_secs();
        let last = self.refusal_logged.load(Ordering::Relaxed);
        now >= last + REFUSAL_LOG_EVERY.as_secs()
            && self
                .refusal_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn count_commit(&self, device: &str, outcome: &Result<Appended, StoreError>) {
        match outcome {
            Ok(_) => self.counters.inc(&self.counters.stored),
            Err(StoreError::Full {
                priority,
                needed,
                quota,
                ..
            }) => {
                self.counters.inc(&self.counters.refused_full);
                if self.log_refusal_now() {
                    tracing::warn!(
                        device,
                        priority,
                        needed,
                        quota,
                        refused_so_far = GateCounters::get(&self.counters.refused_full),
                        "store full of messages that cannot be evicted: refusing device messages \
                         (not acknowledged; devices keep them); logged at most every 10 s"
                    );
                }
            }
            Err(e @ StoreError::DiskLow { .. }) => {
                self.counters.inc(&self.counters.refused_disk_low);
                if self.log_refusal_now() {
                    tracing::warn!(
                        device,
                        error = %e,
                        refused_so_far = GateCounters::get(&self.counters.refused_disk_low),
                        "refusing device messages (not acknowledged; devices keep them); logged \
                         at most every 10 s"
                    );
                }
            }
            Err(e) => {
                self.counters.inc(&self.counters.store_failures);
                tracing::error!(device, error = %e, "the store failed a device message (not acknowledged)");
            }
        }
    }
}

/// The running gate: listeners, the embedded broker and every connection.
pub struct Gate {
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    broker: EmbeddedBroker,
    counters: Arc<GateCounters>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("tcp", &self.tcp)
            .field("tls", &self.tls)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// Checks the settings, starts the embedded broker and opens the device
    /// listeners. Every configuration problem is reported here, before any
    /// device can connect.
    pub async fn start(config: GateConfig, store: Store) -> Result<Self, GateError> {
        if config.max_packet_size == 0 || config.max_inflight == 0 || config.max_connections == 0 {
            return Err(GateError::Config(
                "gate.max_packet_size, gate.max_inflight and gate.max_connections must be above 0"
                    .into(),
            ));
        }
        let rules = TopicRules::new(&config.rules, &config.unmatched, store.priorities())?;
        let require_cn = config.tls.as_ref().is_some_and(|t| t.require_cn_match);
        let auth = Authenticator::new(&config.auth, require_cn)?;
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        let file = BrokerFile::load(config.broker_config.as_deref())?;
        if file.max_payload_size() < config.max_packet_size {
            return Err(GateError::Config(format!(
                "gate.max_packet_size ({}) is above the embedded broker's max_payload_size ({}); \
                 raise max_payload_size in the broker settings or lower gate.max_packet_size",
                config.max_packet_size,
                file.max_payload_size()
            )));
        }
        if file.router.max_connections < config.max_connections {
            return Err(GateError::Config(format!(
                "gate.max_connections ({}) is above the embedded broker's router.max_connections ({})",
                config.max_connections, file.router.max_connections
            )));
        }
        let bind = |setting, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| GateError::Bind {
                    setting,
                    addr,
                    source,
                })
        };
        let tcp_listener = match config.tcp_listen {
            Some(addr) => Some(bind("gate.tcp_listen", addr).await?),
            None => None,
        };
        let tls_listener = match &config.tls {
            Some(t) => Some(bind("gate.tls.listen", t.listen).await?),
            None => None,
        };
        if tcp_listener.is_none() && tls_listener.is_none() {
            return Err(GateError::Config(
                "no device listener: set gate.tcp_listen or gate.tls".into(),
            ));
        }
        if let Some(addr) = config.tcp_listen
            && !addr.ip().is_loopback()
            && config.auth.require == config::AuthRequire::None
        {
            tracing::warn!(%addr, "plain MQTT listener on a non-loopback address with gate.auth.require = none: any host can publish");
        }
        let broker = EmbeddedBroker::start(&file).await?;
        let counters = Arc::new(GateCounters::default());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ctx = Arc::new(Context {
            store,
            rules,
            subscribe: acl::SubscribeAcl::new(&config.subscribe),
            retained: std::sync::Mutex::new(std::collections::HashSet::new()),
            auth,
            broker_v4: broker.v4_addr(),
            broker_v5: broker.v5_addr(),
            counters: counters.clone(),
            cancel: cancel.clone(),
            refusal_logged: AtomicU64::new(0),
            started: std::time::Instant::now(),
            live: std::sync::Mutex::new(std::collections::HashMap::new()),
            local: local::LocalSubscriptions::default(),
            resends: resend::Resends::new(
                config.max_connections.saturating_mul(2),
                usize::from(config.max_inflight),
            ),
            config,
        });
        let limit = Arc::new(Semaphore::new(ctx.config.max_connections));
        let local = |l: &TcpListener| l.local_addr().ok();
        let tcp = tcp_listener.as_ref().and_then(local);
        let tls_addr = tls_listener.as_ref().and_then(local);
        if let Some(l) = tcp_listener {
            tracker.spawn(accept_loop(
                ctx.clone(),
                l,
                None,
                limit.clone(),
                tracker.clone(),
            ));
        }
        if let (Some(l), Some(tls)) = (tls_listener, tls) {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            tracker.spawn(accept_loop(
                ctx.clone(),
                l,
                Some(acceptor),
                limit,
                tracker.clone(),
            ));
        }
        tracing::info!(tcp = ?tcp, tls = ?tls_addr, "gate listening for devices");
        Ok(Self {
            tcp,
            tls: tls_addr,
            broker,
            counters,
            cancel,
            tracker,
        })
    }

    /// The plain MQTT listener's address (with the port actually bound).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// The embedded broker's MQTT 3.1.1 loopback listener (for local tools
    /// and benchmarks; devices use the gate).
    pub fn broker_v4_addr(&self) -> SocketAddr {
        self.broker.v4_addr()
    }

    /// The embedded broker's MQTT 5 loopback listener.
    pub fn broker_v5_addr(&self) -> SocketAddr {
        self.broker.v5_addr()
    }

    /// Live counters.
    pub fn counters(&self) -> Arc<GateCounters> {
        self.counters.clone()
    }

    /// Stops accepting, closes every device connection and the embedded
    /// broker's listeners. Messages already submitted still commit in the
    /// store; their devices simply do not get the acknowledgement and resend.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some device connections did not close within 10 s");
        }
        self.broker.stop();
    }
}

async fn accept_loop(
    ctx: Arc<Context>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        ctx.counters.inc(&ctx.counters.accepted);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.counters.inc(&ctx.counters.over_limit);
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                last_warning = Some(tokio::time::Instant::now());
                tracing::warn!(%peer, max = ctx.config.max_connections, "too many device connections (gate.max_connections); closing new ones");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            ctx.counters.open.fetch_add(1, Ordering::Relaxed);
            match tls {
                None => relay::serve(ctx.clone(), stream, peer, None).await,
                Some(acceptor) => {
                    let timeout = ctx.config.handshake_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let cert = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| PeerCert::from_der(c.as_ref()));
                            match cert {
                                Some(Err(e)) => {
                                    ctx.counters.inc(&ctx.counters.tls_failures);
                                    tracing::warn!(%peer, error = %e, "unusable client certificate");
                                }
                                Some(Ok(cert)) => {
                                    relay::serve(ctx.clone(), tls, peer, Some(cert)).await
                                }
                                None => relay::serve(ctx.clone(), tls, peer, None).await,
                            }
                        }
                        Ok(Err(e)) => {
                            ctx.counters.inc(&ctx.counters.tls_failures);
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            ctx.counters.inc(&ctx.counters.tls_failures);
                            tracing::info!(%peer, ?timeout, "TLS handshake timed out (gate.handshake_timeout)");
                        }
                    }
                }
            }
            ctx.counters.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}
