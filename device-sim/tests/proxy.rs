//! The fault proxy's modes against a TCP echo server. Only lower bounds on
//! time are checked (an injected delay cannot be undercut on a busy machine).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vigil_sim::proxy::{Mode, Proxy};

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn proxy() -> Proxy {
    let upstream = echo_server().await;
    Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap()
}

async fn round_trip(s: &mut TcpStream, data: &[u8], limit: Duration) -> Result<Vec<u8>, String> {
    s.write_all(data).await.map_err(|e| e.to_string())?;
    let mut got = vec![0u8; data.len()];
    match tokio::time::timeout(limit, s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Ok(got),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn pass_and_one_byte_deliver_everything_intact() {
    let p = proxy().await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    assert_eq!(round_trip(&mut s, b"hello", LIMIT).await.unwrap(), b"hello");
    p.set(Mode::OneByte);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(&mut s, &data, LIMIT).await.unwrap(), data);
}

#[tokio::test]
async fn blackhole_holds_bytes_until_the_mode_changes() {
    let p = proxy().await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    p.set(Mode::Blackhole);
    assert_eq!(
        round_trip(&mut s, b"held", Duration::from_millis(300)).await,
        Err("timed out".into())
    );
    p.set(Mode::Pass);
    let mut got = [0u8; 4];
    tokio::time::timeout(LIMIT, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"held");
}

#[tokio::test]
async fn refuse_closes_new_connections_and_reset_kills_open_ones() {
    let p = proxy().await;
    let mut open = TcpStream::connect(p.addr()).await.unwrap();
    assert!(round_trip(&mut open, b"a", LIMIT).await.is_ok());
    p.set(Mode::Refuse);
    let mut refused = TcpStream::connect(p.addr()).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(LIMIT, refused.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "refused connection got {r:?}");
    assert!(
        round_trip(&mut open, b"b", LIMIT).await.is_ok(),
        "open ones carry on"
    );
    p.set(Mode::Reset);
    let r = round_trip(&mut open, b"c", LIMIT).await;
    assert!(r.is_err(), "a reset connection still echoed: {r:?}");
}

/// A reset reaches an idle connection at once: its client hears the reset
/// without sending anything (a device waiting for a PUBACK).
#[tokio::test]
async fn reset_kills_idle_connections_at_once() {
    let p = proxy().await;
    let mut idle = TcpStream::connect(p.addr()).await.unwrap();
    assert!(round_trip(&mut idle, b"a", LIMIT).await.is_ok());
    p.set(Mode::Reset);
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(LIMIT, idle.read(&mut buf))
        .await
        .expect("the idle connection was not reset");
    assert!(matches!(r, Ok(0) | Err(_)), "an idle connection got {r:?}");
}

#[tokio::test]
async fn latency_and_bandwidth_slow_the_link_down() {
    let p = proxy().await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    p.set(Mode::Latency(Duration::from_millis(150)));
    let t = Instant::now();
    round_trip(&mut s, b"x", LIMIT).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    p.set(Mode::Bandwidth(20_000));
    let data = vec![7u8; 10_000];
    let t = Instant::now();
    assert_eq!(round_trip(&mut s, &data, LIMIT).await.unwrap(), data);
    // 10 kB each way at 20 kB/s.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}
