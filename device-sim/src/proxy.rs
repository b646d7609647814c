//! A TCP fault proxy between Vigil and the cloud (or between devices and
//! Vigil). It forwards bytes both ways and misbehaves on command; the mode
//! can change while it runs, and a change applies to open connections at
//! their next chunk.
//!
//! TLS passes through untouched (the proxy never sees plaintext); faults
//! that need MQTT packets (dropping PUBACKs) need a TLS-terminating proxy,
//! which Vigil's own tests have (`bridge/tests/common/cloud.rs`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
            ("latency", Some(d)) => humantime::parse_duration(d)
                .map(Mode::Latency)
                .map_err(|e| format!("latency={d}: {e}")),
            ("bandwidth", Some(b)) => match b.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Mode::Bandwidth(n)),
                _ => Err(format!("bandwidth={b}: give bytes per second above 0")),
            },
            _ => Err(format!(
                "unknown proxy mode {s:?}: use pass, refuse, reset, blackhole, \
                 latency=<duration>, bandwidth=<bytes/s> or one-byte"
            )),
        }
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
    /// Listens on `listen` and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
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

/// Makes both sockets of a pump close with RST when their halves drop.
fn reset_halves(from: &tokio::net::tcp::OwnedReadHalf, to: &tokio::net::tcp::OwnedWriteHalf) {
    let _ = AsRef::<TcpStream>::as_ref(from).set_zero_linger();
    let _ = AsRef::<TcpStream>::as_ref(to).set_zero_linger();
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    modes: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, modes.clone());
    let down = pump(sr, cw, modes);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = up => {}
        _ = down => {}
    }
}

/// Copies one direction, chunk by chunk, as the mode says. Returns when
/// either side closes or the mode is `reset`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut modes: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = modes.changed() => {
                if changed.is_err() || *modes.borrow() == Mode::Reset {
                    reset_halves(&from, &to);
                    return;
                }
                continue;
            }
        };
        let chunk = &buf[..n];
        loop {
            let mode = *modes.borrow_and_update();
            match mode {
                Mode::Reset => {
                    reset_halves(&from, &to);
                    return;
                }
                Mode::Blackhole => {
                    if modes.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Mode::Latency(d) => tokio::time::sleep(d).await,
                Mode::Bandwidth(bps) => {
                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
                }
                Mode::Pass | Mode::Refuse | Mode::OneByte => {}
            }
            break;
        }
        let written = if *modes.borrow() == Mode::OneByte {
            let mut ok = true;
            for b in chunk {
                if to.write_all(std::slice::from_ref(b)).await.is_err() {
                    ok = false;
                    break;
                }
            }
            ok
        } else {
            to.write_all(chunk).await.is_ok()
        };
        if !written {
            return;
        }
    }
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
