//! The operator's HTTP endpoints, on a loopback listener (axum):
//!
//! - `GET /health`: 200 while the store is writable and the forwarder is
//!   alive, 503 otherwise; a small JSON body says which.
//! - `GET /status`: JSON: link state, backlog per priority (messages, bytes,
//!   oldest age), dead-letter and quarantine, in flight, last cloud PUBACK
//!   age, and the counters.
//! - `GET /metrics`: Prometheus text (prometheus-client); the names are in
//!   the README's metrics table.
//!
//! Every figure is read from what the store, gate and forwarder already keep;
//! a request never scans the store. No payload or key is ever exposed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::event::Timestamp;
use crate::forward::ForwardCounters;
use crate::gate::GateCounters;
use crate::state::LinkState;
use crate::store::Store;

/// `[http]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve `/health`, `/status` and `/metrics`.
    pub enabled: bool,
    /// Where they listen. Keep it on loopback (or a management network).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9731)),
        }
    }
}

/// Why the endpoints could not start.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The listen address is taken or not allowed.
    #[error("http.listen {addr}: {source}; pick a free address or set http.enabled = false")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// `vigil status` (or the demo) could not read a running Vigil's
    /// `/status`.
    #[error(
        "cannot read http://{addr}/status: {reason}; is Vigil running with [http] enabled \
         and listening there? (see http.listen, or pass --addr)"
    )]
    Fetch {
        /// The address asked.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// The most `fetch_status` reads: a status body is a few KiB.
const MAX_STATUS_BYTES: u64 = 1 << 20;

/// Reads a running Vigil's `/status` (HTTP/1.0 on loopback, at most 1 MiB,
/// within `limit`).
pub async fn fetch_status(
    addr: SocketAddr,
    limit: std::time::Duration,
) -> Result<Status, OperatorError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fail = |reason: String| OperatorError::Fetch { addr, reason };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        stream
            .write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_STATUS_BYTES)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok::<_, OperatorError>(raw)
    };
    let raw = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {limit:?}")))??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail("not an HTTP response".into()))?;
    let (head, body) = raw.split_at(split);
    let head = String::from_utf8_lossy(head);
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    if code != "200" {
        return Err(fail(format!("HTTP status {code}")));
    }
    serde_json::from_slice(body.get(4..).unwrap_or_default())
        .map_err(|e| fail(format!("not a Vigil status body: {e}")))
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Observed {
    /// The store (its figures and health).
    pub store: Store,
    /// The gate's counters.
    pub gate: Arc<GateCounters>,
    /// The forwarder's counters.
    pub forward: Arc<ForwardCounters>,
    /// The link state (its sender lives as long as the forwarder).
    pub link: watch::Receiver<LinkState>,
}

/// The running listener.
#[derive(Debug)]
pub struct Operator {
    addr: SocketAddr,
    cancel: CancellationToken,
}

/// The operator's port, bound but not yet served. Vigil binds it before the
/// gate starts the embedded broker, whose loopback listeners take free ports:
/// bound first, the configured port cannot be one of them.
#[derive(Debug)]
pub struct OperatorListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl OperatorListener {
    /// Binds `listen` (port 0 picks a free port).
    pub async fn bind(listen: SocketAddr) -> Result<Self, OperatorError> {
        let bind_err = |source| OperatorError::Bind {
            addr: listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self { listener, addr })
    }
}

impl Operator {
    /// Serves the endpoints on the bound `listener`.
    pub fn start(listener: OperatorListener, observed: Observed) -> Self {
        let OperatorListener { listener, addr } = listener;
        let app = Router::new()
            .route("/health", get(health))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .with_state(observed);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the operator HTTP listener stopped");
            }
        });
        tracing::info!(%addr, "operator endpoints: /health, /status, /metrics");
        Self { addr, cancel }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The `/health` body.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// `ok` or `failing`.
    pub status: String,
    /// `None` while the store can persist; the reason once it cannot.
    pub store_failure: Option<String>,
    /// Whether the forwarder task is running.
    pub forwarder_alive: bool,
    /// The link state.
    pub link: LinkState,
}

async fn health(State(o): State<Observed>) -> Response {
    let store_failure = o.store.fatal().borrow().clone();
    let forwarder_alive = o.link.has_changed().is_ok();
    let ok = store_failure.is_none() && forwarder_alive;
    let body = Health {
        status: if ok { "ok" } else { "failing" }.into(),
        store_failure,
        forwarder_alive,
        link: *o.link.borrow(),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// One priority's backlog in `/status`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LaneStatus {
    /// The priority.
    pub priority: u8,
    /// Messages queued.
    pub messages: u64,
    /// Bytes they take.
    pub bytes: u64,
    /// Age of the oldest, seconds (`None`: empty).
    pub oldest_age_seconds: Option<f64>,
}

/// The `/status` body.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The link state.
    pub link: LinkState,
    /// Backlog per priority.
    pub backlog: Vec<LaneStatus>,
    /// Messages in dead-letter.
    pub dead_letter: u64,
    /// Records in quarantine.
    pub quarantine: u64,
    /// Publishes in flight to the cloud.
    pub in_flight: u64,
    /// Seconds since the cloud's last PUBACK (`None`: none yet).
    pub last_cloud_ack_age_seconds: Option<f64>,
    /// Counters, by name (the same as the metrics, without the prefix).
    pub counters: std::collections::BTreeMap<String, u64>,
}

impl Status {
    /// A counter by name (0 when absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

fn age_text(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_string(), |s| format!("{s:.1} s"))
}

/// The readable table `vigil status` prints.
impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "link            {}", self.link)?;
        writeln!(f, "in flight       {}", self.in_flight)?;
        writeln!(
            f,
            "last cloud ack  {}",
            self.last_cloud_ack_age_seconds
                .map_or_else(|| "never".to_string(), |s| format!("{s:.1} s ago"))
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<10} {:>10} {:>12} {:>12}",
            "priority", "messages", "bytes", "oldest age"
        )?;
        for lane in &self.backlog {
            writeln!(
                f,
                "{:<10} {:>10} {:>12} {:>12}",
                lane.priority,
                lane.messages,
                lane.bytes,
                age_text(lane.oldest_age_seconds)
            )?;
        }
        writeln!(
            f,
            "dead-letter {}, quarantine {}",
            self.dead_letter, self.quarantine
        )?;
        writeln!(f)?;
        let mut first = true;
        for (name, value) in &self.counters {
            if !first {
                writeln!(f)?;
            }
            first = false;
            write!(f, "{name:<26} {value:>12}")?;
        }
        Ok(())
    }
}

fn age_seconds(micros: i64, now: Timestamp) -> f64 {
    Timestamp(micros).age(now).as_secs_f64()
}

fn snapshot(o: &Observed) -> Status {
    let now = Timestamp::now();
    let stats = o.store.stats();
    let last = o.forward.last_ack_micros.load(Ordering::Relaxed);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = &stats.counters;
    let counters = [
        ("ingested", c.appended),
        ("acknowledged", c.acked),
        ("forwarded", get(&o.forward.published)),
        ("reconnects", get(&o.forward.failures)),
        ("cloud_connections", get(&o.forward.connections)),
        ("dead_lettered", c.dead_lettered),
        ("quarantined", c.quarantined),
        ("gap_notices", c.gap_notices),
        ("refused_store_full", c.refused_full),
        ("refused_auth", get(&o.gate.refused_auth)),
        ("device_connections_open", get(&o.gate.open)),
        ("device_protocol_errors", get(&o.gate.protocol_errors)),
        (
            "refused_broker_unavailable",
            get(&o.gate.broker_unavailable),
        ),
        ("not_routed_locally", get(&o.gate.not_routed_locally)),
        ("resends_acknowledged", get(&o.gate.resends_acknowledged)),
        ("refused_disk_low", get(&o.store.metrics().refused_disk_low)),
        ("reclaims", get(&o.store.metrics().reclaims)),
        ("lane_disk_reads", get(&o.store.metrics().lane_disk_reads)),
        (
            "damaged_tables_removed",
            get(&o.store.metrics().damaged_tables_removed),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Status {
        link: *o.link.borrow(),
        backlog: stats
            .lanes
            .iter()
            .enumerate()
            .map(|(p, l)| LaneStatus {
                priority: u8::try_from(p).unwrap_or(u8::MAX),
                messages: l.messages,
                bytes: l.bytes,
                oldest_age_seconds: l.oldest.map(|t| age_seconds(t.0, now)),
            })
            .collect(),
        dead_letter: stats.dead_letter.messages,
        quarantine: stats.quarantine.messages,
        in_flight: get(&o.forward.in_flight),
        last_cloud_ack_age_seconds: (last > 0)
            .then(|| age_seconds(i64::try_from(last).unwrap_or(i64::MAX), now)),
        counters,
    }
}

async fn status(State(o): State<Observed>) -> Response {
    axum::Json(snapshot(&o)).into_response()
}

type Labels = Vec<(String, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inner().store(value, Ordering::Relaxed);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The Prometheus text for the current figures.
pub fn render_metrics(o: &Observed) -> String {
    let s = snapshot(o);
    let stats = o.store.stats();
    let mut r = Registry::with_prefix("vigil");
    let by_priority = |r: &mut Registry, name: &str, help: &str, f: &dyn Fn(&LaneStatus) -> i64| {
        let family = Family::<Labels, Gauge>::default();
        for lane in &s.backlog {
            family
                .get_or_create(&vec![("priority".into(), lane.priority.to_string())])
                .set(f(lane));
        }
        r.register(name, help, family);
    };
    by_priority(
        &mut r,
        "backlog_messages",
        "Messages queued, per priority",
        &|l| i64::try_from(l.messages).unwrap_or(i64::MAX),
    );
    by_priority(
        &mut r,
        "backlog_bytes",
        "Bytes queued, per priority",
        &|l| i64::try_from(l.bytes).unwrap_or(i64::MAX),
    );
    by_priority(
        &mut r,
        "oldest_age_seconds",
        "Age of the oldest queued message, per priority (0 when empty)",
        &|l| l.oldest_age_seconds.unwrap_or(0.0) as i64,
    );
    let ingested = Family::<Labels, Counter>::default();
    for (p, n) in o.store.metrics().ingested.iter().enumerate() {
        ingested
            .get_or_create(&vec![("priority".into(), p.to_string())])
            .inner()
            .store(n.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    r.register(
        "ingested_by_priority",
        "Device messages stored since start, per priority",
        ingested,
    );
    r.register(
        "commit_seconds",
        "Duration of each durable store commit (write batch and fsync)",
        o.store.metrics().commit_seconds.clone(),
    );
    r.register(
        "delivery_seconds",
        "For each message the cloud acknowledged, seconds from the gate reading it to the cloud's PUBACK (time queued included)",
        o.forward.delivery_seconds.clone(),
    );
    r.register(
        "sent_seconds",
        "For each publish written to the cloud connection (resends included), seconds from the gate reading the message to then",
        o.forward.sent_seconds.clone(),
    );
    let dead = Family::<Labels, Counter>::default();
    for why in crate::forward::DeadLetterReason::ALL {
        let n = o
            .forward
            .dead_lettered_by_reason
            .get(why as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed));
        dead.get_or_create(&vec![("reason".into(), why.as_str().into())])
            .inner()
            .store(n, Ordering::Relaxed);
    }
    r.register(
        "dead_lettered_by_reason",
        "Messages the forwarder moved to dead-letter since start, by reason \
         (refused: PUBACK reason >= 0x80; too_large; head_failures)",
        dead,
    );
    let evicted = Family::<Labels, Counter>::default();
    for (p, n) in stats.counters.evicted.iter().enumerate() {
        evicted
            .get_or_create(&vec![("priority".into(), p.to_string())])
            .inner()
            .store(*n, Ordering::Relaxed);
    }
    r.register(
        "evicted",
        "Messages evicted under the store quota, per priority (each reported by a gap notice)",
        evicted,
    );
    let state = Family::<Labels, Gauge>::default();
    for st in [LinkState::Offline, LinkState::Syncing, LinkState::Online] {
        state
            .get_or_create(&vec![("state".into(), st.as_str().into())])
            .set(i64::from(s.link == st));
    }
    r.register("link_state", "1 for the cloud link's current state", state);
    gauge(
        &mut r,
        "cloud_connected",
        "1 while connected to the cloud",
        i64::from(s.link != LinkState::Offline),
    );
    gauge(
        &mut r,
        "in_flight",
        "Publishes to the cloud awaiting PUBACK",
        i64::try_from(s.in_flight).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "last_cloud_ack_age_seconds",
        "Seconds since the cloud's last PUBACK (-1: none yet)",
        s.last_cloud_ack_age_seconds.map_or(-1, |a| a as i64),
    );
    gauge(
        &mut r,
        "dead_letter_messages",
        "Messages held in dead-letter",
        i64::try_from(s.dead_letter).unwrap_or(i64::MAX),
    );
    for (name, help) in [
        ("ingested", "Device messages stored"),
        (
            "acknowledged",
            "Messages the cloud acknowledged and the store deleted",
        ),
        ("forwarded", "Publishes sent to the cloud, resends included"),
        (
            "reconnects",
            "Cloud connection failures (each followed by a reconnect)",
        ),
        ("dead_lettered", "Messages moved to dead-letter"),
        (
            "quarantined",
            "Stored records that failed authentication, moved to quarantine",
        ),
        ("gap_notices", "Gap notices emitted for evictions"),
        (
            "refused_store_full",
            "Device messages refused because the store was full",
        ),
        (
            "refused_auth",
            "Device connections refused for credentials or certificate",
        ),
        (
            "refused_disk_low",
            "Device messages refused because the disk was nearly full (store.min_free_bytes)",
        ),
        (
            "reclaims",
            "Disk space reclaims (memtables flushed and lanes compacted after a drain or on a low disk)",
        ),
        (
            "lane_disk_reads",
            "Forwarder reads of a lane answered from disk, not from the records kept in memory (a caught-up forwarder makes none)",
        ),
        (
            "damaged_tables_removed",
            "Damaged store tables taken out (lanes, dead-letter, quarantine): their readable records written again, the unreadable ones quarantined (a disk error: check the disk)",
        ),
        (
            "refused_broker_unavailable",
            "Device connections refused because the embedded broker did not accept their CONNECT",
        ),
        (
            "not_routed_locally",
            "Device publishes not relayed to the embedded broker because no local subscription matched them (stored and forwarded as usual)",
        ),
        (
            "resends_acknowledged",
            "Device QoS 1 re-deliveries (DUP) of a publish already committed: acknowledged, not stored again",
        ),
    ] {
        counter(
            &mut r,
            name,
            help,
            s.counters.get(name).copied().unwrap_or(0),
        );
    }
    gauge(
        &mut r,
        "device_connections",
        "Device connections open",
        i64::try_from(
            s.counters
                .get("device_connections_open")
                .copied()
                .unwrap_or(0),
        )
        .unwrap_or(i64::MAX),
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

async fn metrics(State(o): State<Observed>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render_metrics(&o),
    )
        .into_response()
}
