//! The embedded rumqttd: loaded from `broker-config/rumqttd.toml`, run on
//! Vigil's runtime, listening only on loopback.
//!
//! The file has rumqttd's own layout, but it is read into the structs below,
//! which refuse unknown keys (rumqttd's own `Config` ignores them, so a typo
//! would silently fall back to a default), and which leave out what must not
//! be enabled here: the console, Prometheus, TLS, auth, bridges, clustering,
//! websockets.
//!
//! rumqttd's router runs on its own thread. Each listener (`rumqttd::Server`)
//! runs on its own thread too, on a single-threaded runtime, as rumqttd's own
//! `Broker::start` does, and for two reasons: rumqttd blocks its thread while
//! the router registers a connection (a synchronous channel receive inside an
//! async function), which must not stall Vigil's runtime; and with its
//! connection tasks on two threads, two CONNECTs with one client id can race
//! inside rumqttd, leave a dead will handle behind, and panic every later
//! CONNECT on that listener (bytebeamio/rumqtt#1062). Stopping the gate
//! cancels the listener runtimes, which drops their connections. The start
//! waits for each listener's own bind before probing it: a port held by
//! another socket (another Vigil's embedded broker included) would otherwise
//! answer the probe, and the gate would relay its devices there. rumqttd has
//! no shutdown for the router thread (rumqtt#771); it parks until the process
//! exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::GateError;

/// The built-in copy of `broker-config/rumqttd.toml`.
pub const BUILT_IN: &str = include_str!("../../../broker-config/rumqttd.toml");

/// The settings file, as Vigil accepts it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    /// Router id (always 0 for a single broker).
    #[serde(default)]
    pub id: usize,
    /// Router limits.
    pub router: RouterSection,
    /// The MQTT 3.1.1 listener (exactly one).
    pub v4: HashMap<String, ListenerSection>,
    /// The MQTT 5 listener (exactly one).
    pub v5: HashMap<String, ListenerSection>,
}

/// `[router]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// Connections rumqttd accepts.
    pub max_connections: usize,
    /// Packets queued per connection.
    pub max_outgoing_packet_count: u64,
    /// Bytes per in-memory log segment (at least 1024).
    pub max_segment_size: usize,
    /// Segments kept per subscribed filter.
    pub max_segment_count: usize,
    /// Per-filter segment overrides.
    #[serde(default)]
    pub custom_segment: Option<HashMap<String, SegmentSection>>,
}

/// `[router.custom_segment.'filter']`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSection {
    /// Bytes per segment.
    pub max_segment_size: usize,
    /// Segments kept.
    pub max_segment_count: usize,
}

/// `[v4.<name>]` / `[v5.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    /// Listener name in rumqttd's logs.
    pub name: String,
    /// Loopback address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Pause after each accept.
    #[serde(default)]
    pub next_connection_delay_ms: u64,
    /// Per-connection limits.
    pub connections: ConnectionsSection,
}

/// `[v4.<name>.connections]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsSection {
    /// Time for the CONNECT to arrive.
    pub connection_timeout_ms: u16,
    /// Largest packet (remaining length) rumqttd reads.
    pub max_payload_size: usize,
    /// Packets read per batch from one connection.
    pub max_inflight_count: usize,
}

impl BrokerFile {
    /// Reads and checks a settings file (`None`: the built-in copy).
    pub fn load(path: Option<&Path>) -> Result<Self, GateError> {
        let shown = path.map_or_else(
            || PathBuf::from("(built-in broker-config/rumqttd.toml)"),
            Path::to_path_buf,
        );
        let bad = |reason: String| GateError::BrokerConfig {
            path: shown.clone(),
            reason,
        };
        let builder = config::Config::builder();
        let builder = match path {
            Some(p) => builder.add_source(
                config::File::from(p)
                    .format(config::FileFormat::Toml)
                    .required(true),
            ),
            None => builder.add_source(config::File::from_str(BUILT_IN, config::FileFormat::Toml)),
        };
        let file: BrokerFile = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| bad(e.to_string()))?;
        file.validate().map_err(bad)?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), String> {
        if self.router.max_segment_size < 1024 {
            return Err(
                "router.max_segment_size must be at least 1024 (rumqttd panics below)".into(),
            );
        }
        if self.router.max_segment_count == 0 {
            return Err("router.max_segment_count must be at least 1".into());
        }
        for (table, map) in [("v4", &self.v4), ("v5", &self.v5)] {
            if map.len() != 1 {
                return Err(format!(
                    "[{table}] must hold exactly one listener (found {}); the gate relays \
                     every device of that MQTT version to it",
                    map.len()
                ));
            }
            for (name, l) in map {
                if !l.listen.ip().is_loopback() {
                    return Err(format!(
                        "{table}.{name}.listen = {} is not a loopback address; the embedded \
                         broker must be reachable only through the gate",
                        l.listen
                    ));
                }
            }
        }
        Ok(())
    }

    /// The v4 and v5 listener sections.
    fn listeners(&self) -> Result<(&ListenerSection, &ListenerSection), String> {
        match (self.v4.values().next(), self.v5.values().next()) {
            (Some(v4), Some(v5)) => Ok((v4, v5)),
            _ => Err("a v4 and a v5 listener are required".into()),
        }
    }

    /// The smallest `max_payload_size` of the two listeners.
    pub fn max_payload_size(&self) -> usize {
        self.v4
            .values()
            .chain(self.v5.values())
            .map(|l| l.connections.max_payload_size)
            .min()
            .unwrap_or(0)
    }
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    v4: SocketAddr,
    v5: SocketAddr,
    listeners: Vec<Listener>,
}

impl EmbeddedBroker {
    /// Starts the router thread and both loopback listeners, and waits until
    /// each answers an MQTT CONNECT.
    ///
    /// A listener answers only once its own bind has succeeded: a port held by
    /// someone else (another Vigil's embedded broker, any program) fails its
    /// bind, and the probe would otherwise reach that other listener and take
    /// it for this one. A port Vigil chose (`listen` port 0) can be taken
    /// between the choice and the bind; then another is chosen, up to
    /// [`PORT_ATTEMPTS`] in all.
    pub async fn start(file: &BrokerFile) -> Result<Self, GateError> {
        Self::start_with(file, resolve_port).await
    }

    /// [`Self::start`], with the port choice given (tests hand out taken ports).
    async fn start_with(
        file: &BrokerFile,
        mut pick: impl FnMut(SocketAddr) -> std::io::Result<SocketAddr>,
    ) -> Result<Self, GateError> {
        let start_err = |reason: String| GateError::Broker(reason);
        let (v4, v5) = file.listeners().map_err(start_err)?;
        let router = rumqttd::RouterConfig {
            max_connections: file.router.max_connections,
            max_outgoing_packet_count: file.router.max_outgoing_packet_count,
            max_segment_size: file.router.max_segment_size,
            max_segment_count: file.router.max_segment_count,
            custom_segment: file.router.custom_segment.as_ref().map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            rumqttd::SegmentConfig {
                                max_segment_size: v.max_segment_size,
                                max_segment_count: v.max_segment_count,
                            },
                        )
                    })
                    .collect()
            }),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = rumqttd::Router::new(file.id, router).spawn();
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for (section, level) in [(v4, 4u8), (v5, 5u8)] {
            let mut attempt = 1;
            let (listener, listen) = loop {
                let listen = pick(section.listen).map_err(|e| {
                    start_err(format!("no free loopback port for {}: {e}", section.name))
                })?;
                let settings = server_settings(section, listen);
                let name = section.name.clone();
                let tx = router_tx.clone();
                let bound = if level == 4 {
                    spawn_listener(
                        name,
                        rumqttd::Server::new(settings, tx, rumqttd::protocol::v4::V4),
                    )
                    .await
                } else {
                    spawn_listener(
                        name,
                        rumqttd::Server::new(settings, tx, rumqttd::protocol::v5::V5),
                    )
                    .await
                };
                match bound {
                    Ok(listener) => break (listener, listen),
                    Err(ListenerError::Bind(e))
                        if section.listen.port() == 0 && attempt < PORT_ATTEMPTS =>
                    {
                        tracing::warn!(listener = %section.name, %listen, error = %e, "the free port chosen for the embedded broker was taken before it could bind it; choosing another");
                        attempt += 1;
                    }
                    Err(ListenerError::Bind(e)) if section.listen.port() == 0 => {
                        return Err(start_err(format!(
                            "listener {} cannot listen on a free loopback port: each of the \
                             {PORT_ATTEMPTS} chosen was taken before it could be bound, the \
                             last {listen}: {e}",
                            section.name
                        )));
                    }
                    Err(ListenerError::Bind(e)) => {
                        return Err(start_err(format!(
                            "listener {} cannot listen on {listen}: {e}; another program holds \
                             that port: set another port in its `listen`, or 0 for a free one",
                            section.name
                        )));
                    }
                    Err(ListenerError::Thread(e)) => return Err(start_err(e)),
                }
            };
            listeners.push(listener);
            addrs.push((listen, level, section.name.clone()));
        }
        let broker = Self {
            v4: addrs[0].0,
            v5: addrs[1].0,
            listeners,
        };
        for (addr, level, name) in addrs {
            if let Err(e) = probe(addr, level).await {
                broker.stop();
                return Err(start_err(format!(
                    "listener {name} on {addr} did not answer a CONNECT: {e}"
                )));
            }
        }
        tracing::info!(v4 = %broker.v4, v5 = %broker.v5, "embedded broker listening on loopback");
        Ok(broker)
    }

    /// The MQTT 3.1.1 loopback listener.
    pub fn v4_addr(&self) -> SocketAddr {
        self.v4
    }

    /// The MQTT 5 loopback listener.
    pub fn v5_addr(&self) -> SocketAddr {
        self.v5
    }

    /// Stops both listeners and drops their connections.
    pub fn stop(&self) {
        for l in &self.listeners {
            l.cancel.cancel();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Free ports a listener configured with port 0 tries before the start fails.
pub const PORT_ATTEMPTS: usize = 5;

/// One rumqttd listener on its own thread; dropping it stops the listener.
#[derive(Debug)]
struct Listener {
    cancel: CancellationToken,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Why a listener did not start.
#[derive(Debug)]
enum ListenerError {
    /// Its address could not be bound (held by another socket).
    Bind(String),
    /// No runtime or thread for it.
    Thread(String),
}

/// rumqttd's settings for one listener on `listen`.
fn server_settings(section: &ListenerSection, listen: SocketAddr) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: section.name.clone(),
        listen,
        tls: None,
        next_connection_delay_ms: section.next_connection_delay_ms,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: section.connections.connection_timeout_ms,
            max_payload_size: section.connections.max_payload_size,
            max_inflight_count: section.connections.max_inflight_count,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        },
    }
}

/// Runs one rumqttd listener on a thread of its own, on a single-threaded
/// runtime that ends (dropping its connections) when the listener is stopped,
/// and returns once it is bound.
///
/// rumqttd's `Server::start` binds before anything it awaits can be pending
/// (the address is a `SocketAddr`, resolved without waiting), so its first
/// poll either fails with the bind's error or is pending in its accept loop,
/// bound. The gate test `an_embedded_broker_port_held_by_another_broker_fails_the_start`
/// fails if a later rumqttd stops doing so.
async fn spawn_listener<P>(
    name: String,
    mut server: rumqttd::Server<P>,
) -> Result<Listener, ListenerError>
where
    P: rumqttd::protocol::Protocol + Clone + Send + Sync + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ListenerError::Thread(format!("no runtime for listener {name}: {e}")))?;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let thread_name = format!("broker-{name}");
    let what = format!("no thread for listener {name}");
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            runtime.block_on(async move {
                let mut serving = std::pin::pin!(server.start(rumqttd::LinkType::Remote));
                let first =
                    std::future::poll_fn(|cx| Poll::Ready(serving.as_mut().poll(cx))).await;
                if let Poll::Ready(outcome) = first {
                    let why = match outcome {
                        Err(e) => e.to_string(),
                        Ok(()) => "rumqttd's listener ended as soon as it started".into(),
                    };
                    let _ = bound_tx.send(Err(why));
                    return;
                }
                let _ = bound_tx.send(Ok(()));
                tokio::select! {
                    outcome = serving => {
                        if let Err(e) = outcome {
                            tracing::error!(listener = %name, error = %e, "embedded broker listener stopped");
                        }
                    }
                    _ = stop.cancelled() => {}
                }
            });
        })
        .map_err(|e| ListenerError::Thread(format!("{what}: {e}")))?;
    let listener = Listener { cancel };
    match bound_rx.await {
        Ok(Ok(())) => Ok(listener),
        Ok(Err(why)) => Err(ListenerError::Bind(why)),
        Err(_) => Err(ListenerError::Thread(
            "the listener's thread ended before it bound its address".into(),
        )),
    }
}

/// Port 0 becomes a free port now (rumqttd cannot report the port it bound).
fn resolve_port(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr)?;
    l.local_addr()
}

/// Connects with a CONNECT at `level`, expects a successful CONNACK, then
/// disconnects. Retries for up to 5 s while the listener binds.
async fn probe(addr: SocketAddr, level: u8) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), probe_once(addr, level)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last)
}

async fn probe_once(addr: SocketAddr, level: u8) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let id = format!("vigil-probe-{}", uuid::Uuid::new_v4().simple());
    let mut buf = BytesMut::new();
    if level == 4 {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
        c.keep_alive = 10;
        rumqttc::mqttbytes::v4::Packet::Connect(c)
            .write(&mut buf, 1024)
            .map_err(|e| e.to_string())?;
    } else {
        let c = rumqttc::v5::mqttbytes::v5::Connect {
            keep_alive: 10,
            client_id: id,
            clean_start: true,
            properties: None,
        };
        rumqttc::v5::mqttbytes::v5::Packet::Connect(c, None, None)
            .write(&mut buf, None)
            .map_err(|e| e.to_string())?;
    }
    s.write_all(&buf).await.map_err(|e| e.to_string())?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head[..2])
        .await
        .map_err(|e| e.to_string())?;
    if head[0] >> 4 != 2 {
        return Err(format!(
            "expected CONNACK, got packet type {}",
            head[0] >> 4
        ));
    }
    let mut rest = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut rest).await.map_err(|e| e.to_string())?;
    if rest.get(1).copied().unwrap_or(0xff) != 0 {
        return Err(format!("CONNACK refused the probe: {rest:?}"));
    }
    let disconnect: &[u8] = if level == 4 {
        &[0xe0, 0x00]
    } else {
        &[0xe0, 0x01, 0x00]
    };
    let _ = s.write_all(disconnect).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_file_loads() {
        let f = BrokerFile::load(None).unwrap();
        assert_eq!(
            f.router.max_segment_size * f.router.max_segment_count,
            512 * 1024
        );
        assert!(f.max_payload_size() >= 256 * 1024);
    }

    #[test]
    fn typos_and_unsafe_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| {
            let p = dir.path().join("rumqttd.toml");
            std::fs::write(&p, text).unwrap();
            BrokerFile::load(Some(&p)).unwrap_err().to_string()
        };
        let typo = BUILT_IN.replace("max_segment_count = 2", "max_segmnt_count = 2");
        let e = write(&typo);
        assert!(e.contains("max_segmnt_count"), "{e}");
        let e = write(&format!(
            "{BUILT_IN}\n[console]\nlisten = \"0.0.0.0:3030\"\n"
        ));
        assert!(e.contains("console"), "{e}");
        let e = write(&BUILT_IN.replacen("127.0.0.1:0", "0.0.0.0:1883", 1));
        assert!(e.contains("not a loopback"), "{e}");
        let e = write(&BUILT_IN.replace("max_segment_size = 262144", "max_segment_size = 10"));
        assert!(e.contains("1024"), "{e}");
    }

    /// A port Vigil chose, taken by someone else before rumqttd could bind
    /// it: another is chosen, and the broker listens where it says it does.
    #[tokio::test]
    async fn a_chosen_port_taken_before_the_bind_is_replaced() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap();
        let file = BrokerFile::load(None).unwrap();
        let mut picks = 0;
        let broker = EmbeddedBroker::start_with(&file, |addr| {
            picks += 1;
            if picks == 1 {
                Ok(taken_addr)
            } else {
                resolve_port(addr)
            }
        })
        .await
        .unwrap();
        assert_eq!(picks, 3, "v4 twice, v5 once");
        assert_ne!(broker.v4_addr(), taken_addr);
        for (addr, level) in [(broker.v4_addr(), 4), (broker.v5_addr(), 5)] {
            probe(addr, level).await.unwrap();
        }
    }

    /// Every chosen port taken: the start gives up after `PORT_ATTEMPTS` and
    /// says so.
    #[tokio::test]
    async fn a_start_gives_up_when_every_chosen_port_is_taken() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap();
        let file = BrokerFile::load(None).unwrap();
        let mut picks = 0;
        let e = EmbeddedBroker::start_with(&file, |_| {
            picks += 1;
            Ok(taken_addr)
        })
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(picks, PORT_ATTEMPTS);
        assert!(e.contains("internal-v4"), "{e}");
        assert!(e.contains(&format!("each of the {PORT_ATTEMPTS}")), "{e}");
        assert!(e.contains(&taken_addr.to_string()), "{e}");
    }
}
