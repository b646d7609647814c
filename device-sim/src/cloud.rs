//! The loopback cloud: rumqttd with mutual TLS (client certificates checked
//! against the development CA) and a verifying subscriber that checks each
//! envelope's sha256 and writes the cloud's ledger.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::envelope::{self, hex};
use crate::ledger::{Arrived, LedgerError, Writer};
use crate::pki::DevPki;

/// Why the cloud could not start.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// No free loopback port, or the listeners never answered.
    #[error("the loopback cloud did not start: {0}")]
    Start(String),
    /// A certificate or key of the development PKI is unusable.
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
    /// The ledger could not be written.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The broker's two mutual-TLS listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// MQTT 3.1.1.
    pub v4: SocketAddr,
    /// MQTT 5.
    pub v5: SocketAddr,
}

/// Starts rumqttd on a thread of its own with the PKI's `cloud` certificate,
/// trusting client certificates from its CA, and waits until both listeners
/// accept connections. rumqttd cannot be stopped: the thread lives as long as
/// the process (run it in a child process to kill it).
pub fn start_broker(pki: &DevPki) -> Result<Listeners, CloudError> {
    let port = || -> Result<u16, CloudError> {
        crate::ports::free_loopback_port().map_err(|e| CloudError::Start(e.to_string()))
    };
    let (v4, v5) = (port()?, port()?);
    let tls = rumqttd::TlsConfig::Rustls {
        capath: Some(pki.path("ca.pem").display().to_string()),
        certpath: pki.path("cloud.pem").display().to_string(),
        keypath: pki.path("cloud.key").display().to_string(),
    };
    let server = |name: &str, port: u16| rumqttd::ServerSettings {
        name: name.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: Some(tls.clone()),
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 4 * 1024 * 1024,
            max_inflight_count: 1000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 1000,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 20,
            ..Default::default()
        },
        v4: Some(HashMap::from([(
            "cloud-v4".to_string(),
            server("cloud-v4", v4),
        )])),
        v5: Some(HashMap::from([(
            "cloud-v5".to_string(),
            server("cloud-v5", v5),
        )])),
        ..Default::default()
    };
    run_broker(config, "cloud", &[v4, v5]).map_err(CloudError::Start)?;
    Ok(Listeners {
        v4: SocketAddr::from(([127, 0, 0, 1], v4)),
        v5: SocketAddr::from(([127, 0, 0, 1], v5)),
    })
}

/// Runs a rumqttd `Broker` on a thread of its own (named after `what`) for
/// the rest of the process, and waits (at most 10 s) until each loopback
/// port in `ports` accepts connections.
pub(crate) fn run_broker(config: rumqttd::Config, what: &str, ports: &[u16]) -> Result<(), String> {
    let name = what.to_string();
    std::thread::Builder::new()
        .name(format!("vigil-sim-{what}"))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("vigil-sim: the {name} broker stopped: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    for &port in ports {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!("port {port} never accepted"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// A rustls client configuration trusting the PKI's CA, presenting the
/// client certificate `<stem>.pem`.
pub fn client_tls(pki: &DevPki, stem: &str) -> Result<Arc<rustls::ClientConfig>, CloudError> {
    tls_from_files(
        &pki.path("ca.pem"),
        &pki.path(&format!("{stem}.pem")),
        &pki.path(&format!("{stem}.key")),
    )
}

/// A rustls client configuration from a CA bundle, a client certificate and
/// its key (PEM files).
pub fn tls_from_files(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, CloudError> {
    let roots = crate::pem::load_roots(ca, "--ca")?;
    let chain = crate::pem::load_certs(cert, "--cert")?;
    let key = crate::pem::load_key(key, "--key")?;
    let stem = cert.display();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
        })
        .map_err(|e| CloudError::Start(format!("client TLS for {stem}: {e}")))?;
    Ok(Arc::new(config))
}

/// The verifying subscriber: subscribes to `<prefix>/#` at QoS 1 over mutual
/// TLS, verifies each envelope, and appends it to the ledger. It reconnects
/// and resubscribes on its own.
pub struct Subscriber {
    arrived: Arc<Mutex<Vec<Arrived>>>,
    subscribed: watch::Receiver<bool>,
    cancel: CancellationToken,
}

impl Subscriber {
    /// Starts subscribing at `cloud` (MQTT 3.1.1 listener); records go to
    /// `ledger` if given, and are always kept in memory.
    pub fn start(
        pki: &DevPki,
        cloud: SocketAddr,
        prefix: &str,
        ledger: Option<&Path>,
    ) -> Result<Self, CloudError> {
        let tls = client_tls(pki, "subscriber")?;
        Self::connect(tls, &cloud.ip().to_string(), cloud.port(), prefix, ledger)
    }

    /// Subscribes at any broker (`host` is also the name its certificate
    /// must carry), e.g. a real cloud, with the given TLS configuration.
    pub fn connect(
        tls: Arc<rustls::ClientConfig>,
        host: &str,
        port: u16,
        prefix: &str,
        ledger: Option<&Path>,
    ) -> Result<Self, CloudError> {
        let mut writer = ledger.map(Writer::create).transpose()?;
        let mut o = rumqttc::MqttOptions::new(
            format!("vigil-sim-subscriber-{}", std::process::id()),
            host,
            port,
        );
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        o.set_max_packet_size(8 * 1024 * 1024, 64 * 1024);
        o.set_keep_alive(Duration::from_secs(5));
        // A persistent session: if this connection drops (a loaded machine,
        // a restarted test step), the cloud broker keeps what Vigil sends
        // meanwhile instead of acknowledging it to Vigil and dropping it,
        // which the oracle would count against Vigil as lost.
        o.set_clean_session(false);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        let (tx, subscribed) = watch::channel(false);
        let cancel = CancellationToken::new();
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let (stop, sink, filter) = (cancel.clone(), arrived.clone(), format!("{prefix}/#"));
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        tx.send_replace(true);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let record = check(&p.payload);
                        if let Some(w) = writer.as_mut()
                            && let Err(e) = w.append(&record)
                        {
                            eprintln!("vigil-sim: {e}");
                        }
                        if let Ok(mut a) = sink.lock() {
                            a.push(record);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if *tx.borrow() {
                            eprintln!(
                                "vigil-sim: the verifying subscriber lost its connection ({e}); \
                                 reconnecting to its persistent session"
                            );
                        }
                        tx.send_replace(false);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self {
            arrived,
            subscribed,
            cancel,
        })
    }

    /// Waits until the subscription is in place (at most `limit`).
    pub async fn subscribed(&self, limit: Duration) -> bool {
        let mut rx = self.subscribed.clone();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// Everything received so far, in order.
    pub fn arrived(&self) -> Vec<Arrived> {
        self.arrived.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Verifies one envelope into a ledger record.
pub fn check(envelope_bytes: &[u8]) -> Arrived {
    match envelope::verify(envelope_bytes) {
        Ok(r) => Arrived {
            sha256: hex(&Sha256::digest(&r.payload)),
            notice: (r.device == envelope::VIGIL_DEVICE && r.kind == envelope::GAP_NOTICE_KIND)
                .then(|| envelope::gap_notice(&r.payload).ok())
                .flatten(),
            id: r.id,
            device: r.device,
            seq: r.seq,
            priority: r.priority,
            kind: r.kind,
            verified: true,
        },
        Err(e) => Arrived {
            id: match &e {
                envelope::EnvelopeError::Digest { id } => id.clone(),
                envelope::EnvelopeError::Malformed(_) => String::new(),
            },
            device: String::new(),
            seq: 0,
            priority: 0,
            kind: String::new(),
            sha256: String::new(),
            verified: false,
            notice: None,
        },
    }
}

/// The proxy's TLS ends: it presents the cloud's certificate to Vigil and
/// the `device` client certificate to the cloud.
pub fn proxy_tls(pki: &DevPki) -> Result<crate::proxy::TlsEnds, CloudError> {
    let chain = crate::pem::load_certs(&pki.path("cloud.pem"), "cloud.pem")?;
    let key = crate::pem::load_key(&pki.path("cloud.key"), "cloud.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| CloudError::Start(format!("proxy TLS: {e}")))?;
    Ok(crate::proxy::TlsEnds {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(client_tls(pki, "device")?),
        server_name: rustls::pki_types::ServerName::IpAddress(
            std::net::IpAddr::from([127, 0, 0, 1]).into(),
        ),
    })
}
