//! Gate test helpers: a store and gate on loopback, real rumqttc devices
//! (MQTT 3.1.1 and 5) whose events arrive on a channel, and an rcgen PKI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::rustls;
use tokio::sync::mpsc;
use vigil::gate::{Gate, GateConfig};
use vigil::store::{Store, StoreOptions};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestGate {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub gate: Gate,
}

impl TestGate {
    pub fn addr(&self) -> SocketAddr {
        self.gate.tcp_addr().expect("tcp listener")
    }
}

/// A gate on a free loopback port. Subscriptions are open to everyone here
/// (the default is nobody), so local-subscriber tests need no rules; the ACL
/// test sets its own.
pub fn config() -> GateConfig {
    GateConfig {
        tcp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        subscribe: vec![vigil::gate::config::SubscribeRule {
            clients: vec!["*".into()],
            filters: vec!["#".into()],
        }],
        ..GateConfig::default()
    }
}

pub async fn start(
    tweak_store: impl FnOnce(&mut StoreOptions),
    tweak_gate: impl FnOnce(&mut GateConfig),
) -> TestGate {
    super::log_to_test();
    let dir = tempfile::tempdir().unwrap();
    let store = super::open_with(dir.path(), tweak_store);
    let mut cfg = config();
    tweak_gate(&mut cfg);
    let gate = Gate::start(cfg, store.clone()).await.expect("gate starts");
    TestGate { dir, store, gate }
}

/// A device: its client, and every event (or the first error) of its loop,
/// which runs in its own task.
pub struct Device<C, E> {
    pub client: C,
    pub events: mpsc::UnboundedReceiver<Result<E, String>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// An MQTT 3.1.1 device.
pub type V4Device = Device<rumqttc::AsyncClient, rumqttc::Event>;
/// An MQTT 5 device.
pub type V5Device = Device<rumqttc::v5::AsyncClient, rumqttc::v5::Event>;

/// Polls an event loop until it fails, sending what it yields.
macro_rules! spawn_loop {
    ($eventloop:ident, $tx:ident) => {
        tokio::spawn(async move {
            loop {
                let sent = match $eventloop.poll().await {
                    Ok(e) => $tx.send(Ok(e)).is_ok(),
                    Err(e) => {
                        let _ = $tx.send(Err(format!("{e:?}")));
                        false
                    }
                };
                if !sent {
                    return;
                }
            }
        })
    };
}

pub fn v4_options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(512 * 1024, 512 * 1024);
    o
}

pub fn v4_device(options: rumqttc::MqttOptions) -> V4Device {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 256);
    let (tx, events) = mpsc::unbounded_channel();
    let task = spawn_loop!(eventloop, tx);
    Device {
        client,
        events,
        task,
    }
}

pub fn v5_options(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

pub fn v5_device(options: rumqttc::v5::MqttOptions) -> V5Device {
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 256);
    let (tx, events) = mpsc::unbounded_channel();
    let task = spawn_loop!(eventloop, tx);
    Device {
        client,
        events,
        task,
    }
}

impl<C, E> Device<C, E> {
    /// Waits for the first event `f` accepts; an error on timeout, when the
    /// loop ends, or with the loop's error (e.g. a refused CONNACK).
    pub async fn until<T>(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&E) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err("timeout".into()),
                Ok(None) => return Err("event loop ended".into()),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(e))) => {
                    if let Some(t) = f(&e) {
                        return Ok(t);
                    }
                }
            }
        }
    }
}

impl V4Device {
    pub async fn connected(&mut self) {
        self.until(WAIT, |e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Some(()),
            _ => None,
        })
        .await
        .expect("CONNACK");
    }

    /// Subscribes and waits for the SUBACK, so nothing published afterwards
    /// can race the subscription.
    pub async fn subscribed(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.until(WAIT, |e| {
            matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))).then_some(())
        })
        .await
        .expect("SUBACK");
    }

    /// The return codes of the next SUBACK.
    pub async fn suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
        self.until(WAIT, |e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await
        .expect("SUBACK")
    }

    pub async fn puback(&mut self, timeout: Duration) -> Result<u16, String> {
        self.until(timeout, |e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => Some(a.pkid),
            _ => None,
        })
        .await
    }

    pub async fn publish(&mut self, timeout: Duration) -> Result<rumqttc::Publish, String> {
        self.until(timeout, |e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await
    }
}

impl V5Device {
    pub async fn connack(&mut self) -> rumqttc::v5::mqttbytes::v5::ConnAck {
        self.until(WAIT, |e| match e {
            rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(a)) => Some(a.clone()),
            _ => None,
        })
        .await
        .expect("CONNACK")
    }

    pub async fn puback(
        &mut self,
        timeout: Duration,
    ) -> Result<rumqttc::v5::mqttbytes::v5::PubAck, String> {
        self.until(timeout, |e| match e {
            rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(a)) => Some(a.clone()),
            _ => None,
        })
        .await
    }
}

/// A development PKI made with rcgen: a CA, a server certificate for
/// 127.0.0.1, and client certificates on demand.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Vigil test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, key);
        let pki = Self {
            dir,
            ca_pem,
            issuer,
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem).unwrap();
        let (cert, key) = pki.leaf("127.0.0.1", true);
        std::fs::write(pki.path("server.pem"), cert).unwrap();
        write_private(&pki.path("server.key"), &key);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A certificate (PEM) and key (PKCS#8 PEM) with CN `name`.
    pub fn leaf(&self, name: &str, server: bool) -> (String, String) {
        self.leaf_with(name, server, |_| {})
    }

    /// A certificate (PEM) and key with CN `name` and serial number `serial`.
    pub fn leaf_with_serial(&self, name: &str, server: bool, serial: u64) -> (String, String) {
        self.leaf_with(name, server, |p| {
            p.serial_number = Some(rcgen::SerialNumber::from(serial));
        })
    }

    /// A CRL (PEM) from this CA revoking `serials`.
    pub fn crl_revoking(&self, serials: &[u64]) -> String {
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let params = rcgen::CertificateRevocationListParams {
            this_update: (now - day).into(),
            next_update: (now + 30 * day).into(),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: (now - day).into(),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    /// A server certificate for `name` signed by an intermediate CA (itself
    /// signed by this CA): `(leaf, intermediate, key)` as PEM.
    pub fn leaf_via_intermediate(&self, name: &str) -> (String, String, String) {
        let mut ica = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ica.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ica.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ica.distinguished_name
            .push(rcgen::DnType::CommonName, "Vigil test intermediate CA");
        ica.use_authority_key_identifier_extension = true;
        let ica_key = rcgen::KeyPair::generate().unwrap();
        let ica_pem = ica.signed_by(&ica_key, &self.issuer).unwrap().pem();
        let intermediate = rcgen::Issuer::new(ica, ica_key);
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.use_authority_key_identifier_extension = true;
        p.extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &intermediate).unwrap();
        (cert.pem(), ica_pem, key.serialize_pem())
    }

    /// Like [`Pki::leaf`], but valid only in 2020: long expired.
    pub fn expired_leaf(&self, name: &str, server: bool) -> (String, String) {
        self.leaf_with(name, server, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        })
    }

    fn leaf_with(
        &self,
        name: &str,
        server: bool,
        tweak: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.use_authority_key_identifier_extension = true;
        p.extended_key_usages.push(if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        });
        tweak(&mut p);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A rustls client config trusting this CA, with an optional client
    /// certificate `(cert, key)`.
    pub fn client(&self, cert: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let b = rustls::ClientConfig::builder().with_root_certificates(roots);
        Arc::new(match cert {
            None => b.with_no_client_auth(),
            Some((c, k)) => b
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
                )
                .unwrap(),
        })
    }
}

pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A valid MQTT 3.1.1 CONNECT for `id` with keep-alive `ka` (clean session).
pub fn connect_v4(id: &str, ka: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&ka.to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

pub const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// A raw MQTT 3.1.1 connection with keep-alive `ka`, past its CONNACK.
pub async fn connected_raw(addr: SocketAddr, id: &str, ka: u16) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_v4(id, ka)).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut ack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ack, CONNACK_OK, "CONNACK for {id} (keep-alive {ka})");
    s
}
