//! A TCP fault proxy between Vigil and the cloud (or between devices and
//! Vigil). It forwards bytes both ways and misbehaves on command; the mode
//! can change while it runs, and a change applies to open connections at
//! their next chunk.
//!
//! A plain proxy passes TLS through untouched (it never sees plaintext).
//! [`Proxy::start_tls`] terminates TLS on both sides instead (presenting a
//! certificate the client trusts, and a client certificate upstream), so the
//! faults act on whole MQTT packets and `drop-pubacks` can drop the cloud's
//! PUBACKs. A reset there still sends RST.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Close new connections at once; open ones carry on.
    Refuse,
    /// Reset every connection, open and new (TCP RST).
    Reset,
    /// Accept and stall: nothing is forwarded either way until the mode
    /// changes (then what was held goes on).
    Blackhole,
    /// Delay every chunk by this much.
    Latency(Duration),
    /// At most this many bytes per second, each direction, each connection.
    Bandwidth(u64),
    /// Forward one byte per write.
    OneByte,
    /// Drop every PUBACK from the cloud (TLS-terminating proxies only:
    /// a plain TCP proxy cannot see MQTT inside TLS and forwards them).
    DropPubacks,
}

impl std::str::FromStr for Mode {
    type Err = String;

    /// `pass`, `refuse`, `reset`, `blackhole`, `latency=200ms`,
    /// `bandwidth=10000` (bytes/s), `one-byte`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, arg) = match s.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        match (name, arg) {
            ("pass", None) => Ok(Mode::Pass),
            ("refuse", None) => Ok(Mode::Refuse),
            ("reset", None) => Ok(Mode::Reset),
            ("blackhole", None) => Ok(Mode::Blackhole),
            ("one-byte", None) => Ok(Mode::OneByte),
            ("drop-pubacks", None) => Ok(Mode::DropPubacks),
            ("latency", Some(d)) => humantime::parse_duration(d)
                .map(Mode::Latency)
                .map_err(|e| format!("latency={d}: {e}")),
            ("bandwidth", Some(b)) => match b.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Mode::Bandwidth(n)),
                _ => Err(format!("bandwidth={b}: give bytes per second above 0")),
            },
            _ => Err(format!(
                "unknown proxy mode {s:?}: use pass, refuse, reset, blackhole, \
                 latency=<duration>, bandwidth=<bytes/s>, one-byte or drop-pubacks"
            )),
        }
    }
}

/// Both TLS ends of a TLS-terminating proxy.
pub struct TlsEnds {
    /// Presented to clients (e.g. the cloud's own certificate).
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Used towards the upstream (with a client certificate it accepts).
    pub connector: tokio_rustls::TlsConnector,
    /// The name the upstream's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsEnds").finish_non_exhaustive()
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    upstream: watch::Sender<SocketAddr>,
    cancel: CancellationToken,
}

impl Proxy {
    /// Listens on `listen` and forwards bytes to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(listen, upstream, None).await
    }

    /// Like [`Proxy::start`], but terminating TLS on both sides, so faults
    /// can act on whole MQTT packets (`drop-pubacks`).
    pub async fn start_tls(
        listen: SocketAddr,
        upstream: SocketAddr,
        tls: TlsEnds,
    ) -> std::io::Result<Self> {
        Self::start_with(listen, upstream, Some(Arc::new(tls))).await
    }

    async fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        tls: Option<Arc<TlsEnds>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let (upstream, _) = watch::channel(upstream);
        let cancel = CancellationToken::new();
        let (modes, stop, target) = (mode.clone(), cancel.clone(), upstream.clone());
        tokio::spawn(async move {
            loop {
                let (socket, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(_) => continue,
                    },
                };
                let _ = socket.set_nodelay(true);
                match *modes.borrow() {
                    Mode::Refuse => continue,
                    Mode::Reset => {
                        reset(socket);
                        continue;
                    }
                    _ => {}
                }
                let upstream = *target.borrow();
                tokio::spawn(connection(
                    socket,
                    upstream,
                    tls.clone(),
                    modes.subscribe(),
                    stop.clone(),
                ));
            }
        });
        Ok(Self {
            addr,
            mode,
            upstream,
            cancel,
        })
    }

    /// Points new connections at another upstream (e.g. a restarted cloud
    /// on a new port); open ones keep theirs.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.upstream.send_replace(upstream);
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the mode for new and open connections.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The mode in force.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Closes with RST rather than FIN.
fn reset(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}

/// A connection end the proxy can read, write and reset.
trait Link: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP socket underneath (to reset it).
    fn tcp(&self) -> &TcpStream;
}

impl Link for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Link for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl Link for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    tls: Option<Arc<TlsEnds>>,
    modes: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    let Some(tls) = tls else {
        relay(client, server, false, modes, stop).await;
        return;
    };
    let Ok(Ok(client)) =
        tokio::time::timeout(Duration::from_secs(10), tls.acceptor.accept(client)).await
    else {
        return;
    };
    let name = tls.server_name.clone();
    let Ok(Ok(server)) =
        tokio::time::timeout(Duration::from_secs(10), tls.connector.connect(name, server)).await
    else {
        return;
    };
    relay(client, server, true, modes, stop).await;
}

/// Most bytes held per direction while they wait (e.g. in a blackhole).
const HELD: usize = 4 << 20;

/// The length of the first complete MQTT packet in `buf`, if there is one.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 1 + i + 1 + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// Carries bytes both ways as the mode says, until either side closes, the
/// mode is `reset`, or the proxy stops. With `mqtt`, whole MQTT packets are
/// the unit (so `drop-pubacks` can drop the cloud's PUBACKs); otherwise
/// whatever each read returned.
async fn relay<C: Link, S: Link>(
    mut client: C,
    mut server: S,
    mqtt: bool,
    mut modes: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    let mut up = Vec::new(); // client -> server, not yet forwarded
    let mut down = Vec::new(); // server -> client
    let mut a = vec![0u8; 16 * 1024];
    let mut b = vec![0u8; 16 * 1024];
    // A side that closed while the link was a blackhole: like a dropped
    // FIN, the other side hears nothing until the mode changes (then both
    // close), so a half-open connection stays half-open.
    let mut silenced = false;
    loop {
        let blackhole = *modes.borrow() == Mode::Blackhole;
        tokio::select! {
            _ = stop.cancelled() => return,
            // Past HELD bytes waiting in one direction (a blackhole), that
            // side is not read: TCP flow control holds the sender back.
            r = client.read(&mut a), if up.len() < HELD && !silenced => match r {
                Ok(0) | Err(_) if blackhole => silenced = true,
                Ok(0) | Err(_) => return,
                Ok(n) => up.extend_from_slice(&a[..n]),
            },
            r = server.read(&mut b), if down.len() < HELD && !silenced => match r {
                Ok(0) | Err(_) if blackhole => silenced = true,
                Ok(0) | Err(_) => return,
                Ok(n) => down.extend_from_slice(&b[..n]),
            },
            changed = modes.changed() => {
                if changed.is_err() || (silenced && *modes.borrow() != Mode::Blackhole) {
                    return;
                }
                // Reset means every open connection, idle ones too, at once.
                if *modes.borrow() == Mode::Reset {
                    let _ = client.tcp().set_zero_linger();
                    let _ = server.tcp().set_zero_linger();
                    return;
                }
            }
        }
        // Apply the mode to what has arrived, unit by unit.
        for upward in [true, false] {
            loop {
                let buf = if upward { &mut up } else { &mut down };
                let unit = if mqtt {
                    packet_len(buf)
                } else {
                    Some(buf.len())
                };
                let Some(n) = unit.filter(|n| *n > 0) else {
                    break;
                };
                let mode = *modes.borrow_and_update();
                match mode {
                    Mode::Reset => {
                        let _ = client.tcp().set_zero_linger();
                        let _ = server.tcp().set_zero_linger();
                        return;
                    }
                    // Held until the mode changes (the select wakes on it).
                    Mode::Blackhole => break,
                    Mode::Latency(d) => tokio::time::sleep(d).await,
                    Mode::Bandwidth(bps) => {
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
                    }
                    Mode::Pass | Mode::Refuse | Mode::OneByte | Mode::DropPubacks => {}
                }
                let unit: Vec<u8> = buf.drain(..n).collect();
                if mode == Mode::DropPubacks && !upward && unit.first().is_some_and(|f| f >> 4 == 4)
                {
                    continue;
                }
                let ok = if upward {
                    write(&mut server, &unit, mode == Mode::OneByte).await
                } else {
                    write(&mut client, &unit, mode == Mode::OneByte).await
                };
                if !ok {
                    return;
                }
            }
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(to: &mut W, bytes: &[u8], one_by_one: bool) -> bool {
    let written = if one_by_one {
        let mut ok = true;
        for byte in bytes {
            if to.write_all(std::slice::from_ref(byte)).await.is_err() || to.flush().await.is_err()
            {
                ok = false;
                break;
            }
        }
        ok
    } else {
        to.write_all(bytes).await.is_ok()
    };
    written && to.flush().await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("pass".parse::<Mode>(), Ok(Mode::Pass));
        assert_eq!(
            "latency=250ms".parse::<Mode>(),
            Ok(Mode::Latency(Duration::from_millis(250)))
        );
        assert_eq!("bandwidth=1000".parse::<Mode>(), Ok(Mode::Bandwidth(1000)));
        assert!("bandwidth=0".parse::<Mode>().is_err());
        let err = "slow".parse::<Mode>().unwrap_err();
        assert!(err.contains("blackhole"), "{err}");
    }
}
