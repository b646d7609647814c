//! A real cloud on loopback for the forwarder's end-to-end tests: rumqttd
//! with client-certificate verification in a child process (so it can be
//! SIGKILLed and restarted), a subscriber that verifies every envelope, and
//! a TLS-terminating, MQTT-aware fault proxy between Vigil and the cloud.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use vigil::forward::config::{ForwardConfig, Protocol, UplinkTls};
use vigil_sim::envelope::{self, Received};

use super::gate::{Pki, write_private};

/// Environment variable naming the cloud child's directory.
pub const CLOUD_CHILD_ENV: &str = "VIGIL_CLOUD_CHILD_DIR";

/// Certificates for one cloud: CA, the cloud's server certificate, Vigil's
/// and the subscriber's client certificates.
pub fn cloud_pki() -> Pki {
    let pki = Pki::new(); // ca.pem, server.pem/.key for 127.0.0.1
    for name in ["vigil", "subscriber", "proxy"] {
        let (c, k) = pki.leaf(name, false);
        std::fs::write(pki.path(&format!("{name}.pem")), c).unwrap();
        write_private(&pki.path(&format!("{name}.key")), &k);
    }
    pki
}

/// Runs rumqttd with mutual TLS from the files in `dir` (ca.pem, server.pem,
/// server.key), writes `ports` ("v4 v5") and serves until stdin closes.
/// Called in the child process.
pub fn serve_cloud(dir: &Path) {
    let (v4, v5) = start_broker(dir);
    std::fs::write(
        dir.join("ports.tmp"),
        format!("{} {}", v4.port(), v5.port()),
    )
    .unwrap();
    std::fs::rename(dir.join("ports.tmp"), dir.join("ports")).unwrap();
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    std::process::exit(0);
}

/// Starts rumqttd (MQTT 3.1.1 and 5 listeners, mutual TLS with the files in
/// `dir`) on a thread of its own, and returns once both accept connections.
pub fn start_broker(dir: &Path) -> (SocketAddr, SocketAddr) {
    let v4 = free_port();
    let v5 = free_port();
    let tls = rumqttd::TlsConfig::Rustls {
        capath: Some(dir.join("ca.pem").display().to_string()),
        certpath: dir.join("server.pem").display().to_string(),
        keypath: dir.join("server.key").display().to_string(),
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
            max_connections: 100,
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
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    // Wait for both listeners before announcing the ports.
    for port in [v4, v5] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "cloud listener did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    (
        SocketAddr::from(([127, 0, 0, 1], v4)),
        SocketAddr::from(([127, 0, 0, 1], v5)),
    )
}

use super::process::free_port;

/// The cloud broker in a child process (this test binary re-run with
/// `--exact child_cloud --ignored`).
pub struct Cloud {
    child: Child,
    pub v4: SocketAddr,
    pub v5: SocketAddr,
}

impl Cloud {
    /// Starts a cloud serving the certificates in `dir`.
    pub fn start(dir: &Path) -> Self {
        let _ = std::fs::remove_file(dir.join("ports"));
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_cloud", "--ignored", "--test-threads=1"])
            .env(CLOUD_CHILD_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let ports = loop {
            if let Ok(p) = std::fs::read_to_string(dir.join("ports")) {
                break p;
            }
            assert!(Instant::now() < deadline, "cloud child did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut it = ports.split(' ').map(|p| p.parse::<u16>().unwrap());
        let (v4, v5) = (it.next().unwrap(), it.next().unwrap());
        Self {
            child,
            v4: SocketAddr::from(([127, 0, 0, 1], v4)),
            v5: SocketAddr::from(([127, 0, 0, 1], v5)),
        }
    }

    pub fn addr(&self, protocol: Protocol) -> SocketAddr {
        match protocol {
            Protocol::V311 => self.v4,
            Protocol::V5 => self.v5,
        }
    }

    /// SIGKILL: whatever it held in memory is gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwarder settings for `addr` with Vigil's certificate from `pki`.
pub fn forward_config(pki: &Pki, addr: SocketAddr, protocol: Protocol) -> ForwardConfig {
    ForwardConfig {
        host: addr.ip().to_string(),
        port: addr.port(),
        protocol,
        client_id: "vigil-test".into(),
        tls: UplinkTls {
            ca: pki.path("ca.pem"),
            cert: Some(pki.path("vigil.pem")),
            key: Some(pki.path("vigil.key")),
            server_name: None,
            crl: None,
        },
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(3),
        ..ForwardConfig::default()
    }
}

/// What the verifying subscriber saw.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// Every verified envelope, in arrival order (duplicates included).
    pub all: Vec<Received>,
    /// Envelopes whose sha256 or format did not verify.
    pub bad: Vec<String>,
    /// Count per id.
    pub count: HashMap<String, u32>,
}

impl Arrivals {
    pub fn unique(&self) -> usize {
        self.count.len()
    }
    pub fn duplicates(&self) -> usize {
        self.all.len() - self.count.len()
    }
}

/// A subscriber on `<prefix>/#` at QoS 1 over mutual TLS, checking each
/// envelope's sha256. It reconnects (and resubscribes) on its own.
pub struct Subscriber {
    pub arrivals: Arc<Mutex<Arrivals>>,
    subscribed: tokio::sync::watch::Receiver<bool>,
    cancel: CancellationToken,
}

impl Subscriber {
    pub async fn start(pki: &Pki, cloud: SocketAddr, arrivals: Arc<Mutex<Arrivals>>) -> Self {
        let tls = client_tls(pki, "subscriber");
        let mut o = rumqttc::MqttOptions::new("cloud-subscriber", "127.0.0.1", cloud.port());
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        o.set_max_packet_size(8 * 1024 * 1024, 64 * 1024);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let (tx, subscribed) = tokio::sync::watch::channel(false);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let sink = arrivals.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("vigil/#", rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        tx.send_replace(true);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let mut a = sink.lock().unwrap();
                        match envelope::verify(&p.payload) {
                            Ok(r) => {
                                *a.count.entry(r.id.clone()).or_default() += 1;
                                a.all.push(r);
                            }
                            Err(e) => a.bad.push(e.to_string()),
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tx.send_replace(false);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        let s = Self {
            arrivals,
            subscribed,
            cancel,
        };
        s.wait_subscribed().await;
        s
    }

    pub async fn wait_subscribed(&self) {
        let mut rx = self.subscribed.clone();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| *s))
            .await
            .expect("subscriber did not subscribe")
            .unwrap();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A rustls client config trusting the cloud CA, with client cert `name`.
pub fn client_tls(pki: &Pki, name: &str) -> Arc<rustls::ClientConfig> {
    let cert = std::fs::read_to_string(pki.path(&format!("{name}.pem"))).unwrap();
    let key = std::fs::read_to_string(pki.path(&format!("{name}.key"))).unwrap();
    pki.client(Some((cert, key)))
}

/// What the proxy does to traffic.
#[derive(Debug, Default)]
pub struct ProxyControl {
    /// Drop every PUBACK from the cloud to Vigil.
    pub drop_pubacks: bool,
    /// Refuse new connections (accept and close at once).
    pub refuse: bool,
    /// Answer a PUBLISH whose topic contains this with an MQTT 5 PUBACK
    /// reason 0x87 (not authorized) instead of passing it on.
    pub refuse_topic: Option<String>,
    /// Add this Maximum Packet Size (property 0x27) to the cloud's MQTT 5
    /// CONNACK, as a cloud with a limit would announce it (rumqttd announces
    /// none).
    pub announce_max_packet: Option<u32>,
    /// The largest PUBLISH packet Vigil sent, whole (fixed header included),
    /// in bytes.
    pub largest_publish: usize,
    /// Check each CONNECT's login as a cloud with accounts does (rumqttd
    /// behind the proxy checks none): any other user name and password get
    /// a CONNACK refusing them (MQTT 3.1.1 return code 4, MQTT 5 reason
    /// 0x86, "bad user name or password") and the connection is closed.
    pub require_login: Option<(String, String)>,
    /// The user name and password of every CONNECT seen (`None`: not sent).
    pub logins: Vec<(Option<String>, Option<String>)>,
    /// Where the cloud is.
    pub upstream: Option<SocketAddr>,
    /// Ids (from the envelopes) in the order Vigil published them.
    pub published: Vec<(String, u8)>,
    /// Ids whose success PUBACK from the cloud reached Vigil.
    pub acked: Vec<String>,
}

/// A TLS-terminating MQTT proxy: Vigil connects to it (it presents a
/// certificate from the same CA), it connects to the cloud with its own
/// client certificate, and it parses MQTT packets both ways.
pub struct Proxy {
    pub addr: SocketAddr,
    pub control: Arc<Mutex<ProxyControl>>,
    connections: Arc<Mutex<CancellationToken>>,
    cancel: CancellationToken,
}

impl Proxy {
    pub async fn start(pki: &Pki, upstream: SocketAddr) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from_pem_file(pki.path("server.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(client_tls(pki, "proxy"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let control = Arc::new(Mutex::new(ProxyControl {
            upstream: Some(upstream),
            ..Default::default()
        }));
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let cancel = CancellationToken::new();
        let (ctl, conns, stop) = (control.clone(), connections.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (refuse, upstream) = {
                    let c = ctl.lock().unwrap();
                    (c.refuse, c.upstream)
                };
                let Some(upstream) = upstream.filter(|_| !refuse) else {
                    drop(tcp);
                    continue;
                };
                let token = conns.lock().unwrap().clone();
                let (acceptor, connector, ctl) = (acceptor.clone(), connector.clone(), ctl.clone());
                tokio::spawn(async move {
                    let Ok(down) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(up_tcp) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                    let Ok(up) = connector.connect(name, up_tcp).await else {
                        return;
                    };
                    let (dr, dw) = tokio::io::split(down);
                    let (ur, uw) = tokio::io::split(up);
                    let dw = Arc::new(tokio::sync::Mutex::new(dw));
                    let pkids: Arc<Mutex<HashMap<u16, String>>> = Arc::default();
                    let v5 = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let a = pump_up(dr, uw, dw.clone(), ctl.clone(), pkids.clone(), v5.clone());
                    let b = pump_down(ur, dw, ctl, pkids, v5);
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = a => {}
                        _ = b => {}
                    }
                });
            }
        });
        Self {
            addr,
            control,
            connections,
            cancel,
        }
    }

    /// Cuts every open connection (both sides see a TCP close).
    pub fn cut(&self) {
        let mut t = self.connections.lock().unwrap();
        t.cancel();
        *t = CancellationToken::new();
    }

    pub fn set(&self, f: impl FnOnce(&mut ProxyControl)) {
        f(&mut self.control.lock().unwrap());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.cut();
    }
}

/// One MQTT packet: first byte and body (after the remaining length).
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Option<(u8, Vec<u8>)> {
    let first = r.read_u8().await.ok()?;
    let mut len: usize = 0;
    for i in 0..4 {
        let b = r.read_u8().await.ok()?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some((first, body))
}

fn encode_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, b) in buf.iter().take(4).enumerate() {
        v |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Topic, pkid and payload of a QoS 1 PUBLISH body.
fn parse_publish(first: u8, body: &[u8], v5: bool) -> Option<(String, u16, &[u8])> {
    let tl = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = String::from_utf8(body.get(2..2 + tl)?.to_vec()).ok()?;
    let mut at = 2 + tl;
    let qos = (first >> 1) & 3;
    let pkid = if qos > 0 {
        let p = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
        p
    } else {
        0
    };
    if v5 {
        let (plen, n) = varint(body.get(at..)?)?;
        at += n + plen;
    }
    Some((topic, pkid, body.get(at..)?))
}

/// The user name and password of a CONNECT body (MQTT 3.1.1 or 5).
fn parse_login(body: &[u8], v5: bool) -> Option<(Option<String>, Option<String>)> {
    let flags = *body.get(7)?;
    let mut at = 10;
    let field = |at: &mut usize| -> Option<Vec<u8>> {
        let len = usize::from(u16::from_be_bytes([*body.get(*at)?, *body.get(*at + 1)?]));
        let v = body.get(*at + 2..*at + 2 + len)?.to_vec();
        *at += 2 + len;
        Some(v)
    };
    let skip_props = |at: &mut usize| -> Option<()> {
        let (len, n) = varint(body.get(*at..)?)?;
        *at += n + len;
        Some(())
    };
    if v5 {
        skip_props(&mut at)?;
    }
    field(&mut at)?; // client id
    if flags & 0x04 != 0 {
        if v5 {
            skip_props(&mut at)?;
        }
        field(&mut at)?; // will topic
        field(&mut at)?; // will payload
    }
    let text = |v: Vec<u8>| String::from_utf8(v).ok();
    let user = if flags & 0x80 != 0 {
        text(field(&mut at)?)
    } else {
        None
    };
    let pass = if flags & 0x40 != 0 {
        text(field(&mut at)?)
    } else {
        None
    };
    Some((user, pass))
}

fn envelope_id_priority(payload: &[u8]) -> Option<(String, u8)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((v["id"].as_str()?.to_string(), v["priority"].as_u64()? as u8))
}

async fn pump_up<R, W, D>(
    mut down: R,
    mut up: W,
    down_w: Arc<tokio::sync::Mutex<D>>,
    ctl: Arc<Mutex<ProxyControl>>,
    pkids: Arc<Mutex<HashMap<u16, String>>>,
    v5: Arc<std::sync::atomic::AtomicBool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    D: AsyncWrite + Unpin,
{
    use std::sync::atomic::Ordering::Relaxed;
    while let Some((first, body)) = read_packet(&mut down).await {
        match first >> 4 {
            1 => {
                // CONNECT: protocol level after the protocol name.
                let level5 = body.get(6) == Some(&5);
                v5.store(level5, Relaxed);
                let login = parse_login(&body, level5).unwrap_or_default();
                let refused = {
                    let mut c = ctl.lock().unwrap();
                    c.logins.push(login.clone());
                    c.require_login.as_ref().is_some_and(|(user, pass)| {
                        login != (Some(user.clone()), Some(pass.clone()))
                    })
                };
                if refused {
                    let ack = if level5 {
                        encode_packet(0x20, &[0, 0x86, 0])
                    } else {
                        encode_packet(0x20, &[0, 4])
                    };
                    let mut w = down_w.lock().await;
                    let _ = w.write_all(&ack).await;
                    let _ = w.flush().await;
                    let _ = w.shutdown().await;
                    return;
                }
            }
            3 => {
                if let Some((topic, pkid, payload)) = parse_publish(first, &body, v5.load(Relaxed))
                {
                    let refuse = {
                        let mut c = ctl.lock().unwrap();
                        let whole = encode_packet(first, &body).len();
                        c.largest_publish = c.largest_publish.max(whole);
                        if let Some((id, prio)) = envelope_id_priority(payload) {
                            c.published.push((id.clone(), prio));
                            pkids.lock().unwrap().insert(pkid, id);
                        }
                        c.refuse_topic
                            .as_ref()
                            .is_some_and(|m| topic.contains(m.as_str()))
                    };
                    if refuse {
                        // PUBACK, pkid, reason 0x87, no properties.
                        let [hi, lo] = pkid.to_be_bytes();
                        let ack = encode_packet(0x40, &[hi, lo, 0x87, 0]);
                        let mut w = down_w.lock().await;
                        if w.write_all(&ack).await.is_err() || w.flush().await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            _ => {}
        }
        if up.write_all(&encode_packet(first, &body)).await.is_err() || up.flush().await.is_err() {
            return;
        }
    }
}

async fn pump_down<R, D>(
    mut up: R,
    down_w: Arc<tokio::sync::Mutex<D>>,
    ctl: Arc<Mutex<ProxyControl>>,
    pkids: Arc<Mutex<HashMap<u16, String>>>,
    v5: Arc<std::sync::atomic::AtomicBool>,
) where
    R: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    while let Some((first, mut body)) = read_packet(&mut up).await {
        let announce = ctl.lock().unwrap().announce_max_packet;
        if first >> 4 == 2
            && v5.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(limit) = announce
        {
            body = with_max_packet(&body, limit).expect("an MQTT 5 CONNACK");
        }
        if first >> 4 == 4 {
            let mut c = ctl.lock().unwrap();
            if c.drop_pubacks {
                continue;
            }
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            let ok = body.get(2).is_none_or(|r| *r < 0x80);
            if let Some(id) = pkids.lock().unwrap().remove(&pkid).filter(|_| ok) {
                c.acked.push(id);
            }
        }
        let mut w = down_w.lock().await;
        if w.write_all(&encode_packet(first, &body)).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
}

/// An MQTT 5 CONNACK body with a Maximum Packet Size property added.
fn with_max_packet(body: &[u8], limit: u32) -> Option<Vec<u8>> {
    let (len, n) = varint(body.get(2..)?)?;
    let mut props = body.get(2 + n..2 + n + len)?.to_vec();
    props.push(0x27);
    props.extend_from_slice(&limit.to_be_bytes());
    let mut out = body.get(..2)?.to_vec();
    // The property length as a variable byte integer: the packet encoding's.
    let header = encode_packet(0, &props);
    out.extend_from_slice(header.get(1..)?);
    Some(out)
}

/// Waits until `f` holds, panicking with `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A directory for a cloud's files (a copy of the PKI's CA and server cert).
pub fn cloud_dir(pki: &Pki, name: &str) -> PathBuf {
    let dir = pki.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(pki.path(f), dir.join(f)).unwrap();
    }
    dir
}
