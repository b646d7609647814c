//! Malformed input from raw sockets (fault-testing B8, B9, B10): each bad
//! connection is closed without a panic, and Vigil keeps serving devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::gate::{self as g, CONNACK_OK, WAIT, connect_v4, connected_raw};
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil::gate::GateCounters;

/// Sends `bytes` and reads until the gate closes the connection. Returns what
/// the gate sent; panics if it keeps the connection open.
async fn closed_after(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {bytes:02x?}; got {got:02x?}"),
        }
    }
}

#[tokio::test]
async fn malformed_packets_close_only_their_connection() {
    let t = g::start(|_| {}, |c| c.frame_timeout = Duration::from_millis(500)).await;
    let addr = t.addr();
    // A healthy device stays connected throughout.
    let mut dev = g::v4_device(g::v4_options(addr, "steady"));
    dev.connected().await;

    let after_connect = |tail: &[u8]| {
        let mut v = connect_v4("rogue", 30);
        v.extend_from_slice(tail);
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "5-byte remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
        (
            "PUBLISH before CONNECT",
            vec![0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
        ),
        (
            "SUBSCRIBE before CONNECT",
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        (
            "wrong protocol name",
            vec![0x10, 0x0c, 0, 4, b'M', b'Q', b'X', b'X', 4, 2, 0, 30, 0, 0],
        ),
        (
            "CONNECT claiming more than it sends",
            vec![0x10, 0x7f, 0, 4, b'M'],
        ),
        (
            "huge remaining-length claim then a stall",
            vec![0x30, 0xff, 0xff, 0xff, 0x7f, 0x00],
        ),
        (
            "PUBLISH with QoS 3",
            after_connect(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
        ),
        (
            "QoS 1 PUBLISH with packet id 0",
            after_connect(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]),
        ),
        (
            "PUBLISH to a wildcard topic",
            after_connect(&[0x30, 0x03, 0x00, 0x01, b'#']),
        ),
        (
            "topic length past the packet",
            after_connect(&[0x30, 0x03, 0x00, 0x09, b'a']),
        ),
        (
            "SUBSCRIBE with no filters",
            after_connect(&[0x82, 0x02, 0x00, 0x01]),
        ),
        ("a second CONNECT", after_connect(&connect_v4("rogue", 30))),
        ("packet type 0", after_connect(&[0x00, 0x00])),
        (
            "PUBLISH within the limit, then a stall",
            after_connect(&[0x30, 0xff, 0x7f, 0x00]),
        ),
    ];
    for (name, bytes) in &cases {
        let got = closed_after(addr, bytes).await;
        // Cases after a valid CONNECT see its CONNACK first, then the close.
        if bytes.starts_with(&connect_v4("rogue", 30)) {
            assert!(got.starts_with(&CONNACK_OK), "{name}: {got:02x?}");
        } else {
            assert!(
                got.is_empty(),
                "{name}: nothing is sent before CONNECT: {got:02x?}"
            );
        }
    }
    // MQTT 3.1 (level 3) gets CONNACK "unacceptable protocol version".
    let v31 = [
        0x10, 0x11, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 30, 0, 3, b'o', b'l', b'd',
    ];
    assert_eq!(closed_after(addr, &v31).await, vec![0x20, 0x02, 0x00, 0x01]);

    // An MQTT 5 device that sends a packet over the limit is told why.
    let mut v5 = vec![
        0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 0, 0, 4,
    ];
    v5.extend_from_slice(b"big5");
    v5[1] = (v5.len() - 2) as u8;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&v5).await.unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x20, "CONNACK first");
    let mut rest = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut rest).await.unwrap();
    s.write_all(&[0x30, 0xff, 0xff, 0x7f]).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![0xe0, 0x01, 0x95],
        "DISCONNECT 0x95 (packet too large)"
    );

    // The healthy device still publishes and is acknowledged.
    dev.client
        .publish("devices/steady/vitals/hr", QoS::AtLeastOnce, false, "70")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    let c = t.gate.counters();
    assert!(GateCounters::get(&c.protocol_errors) >= 10, "{c:?}");
    assert!(GateCounters::get(&c.oversized) >= 2, "{c:?}");
    assert_eq!(
        t.store.stats().queued(),
        1,
        "only the healthy device's message"
    );
}

/// Publishes one QoS 1 message with packet id `pkid` on `a/b` and waits for
/// its PUBACK (sent after the commit).
async fn publish_raw(s: &mut TcpStream, pkid: u8) {
    s.write_all(&[0x32, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, pkid, b'x'])
        .await
        .unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut puback))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(puback, [0x40, 0x02, 0x00, pkid]);
}

/// rumqttd alone refuses keep-alive 0 without a CONNACK.
#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    let t = g::start(|_| {}, |_| {}).await;
    let mut s = connected_raw(t.addr(), "no-keepalive", 0).await;
    publish_raw(&mut s, 5).await;
}

/// A device that only publishes sends no PINGREQ, and its publishes skip the
/// embedded broker when nobody local subscribes: rumqttd must not take that
/// silence for a dead client (the gate gives it a keep-alive of its own and
/// enforces the device's itself).
#[tokio::test]
async fn a_device_that_only_publishes_outlives_its_keep_alive() {
    let t = g::start(|_| {}, |_| {}).await;
    let mut s = connected_raw(t.addr(), "busy-monitor", 1).await;
    // QoS 1 publishes every 200 ms for 4 s: four times the 1.5 s rumqttd
    // would allow on a keep-alive of 1 s.
    for pkid in 1..=20u8 {
        publish_raw(&mut s, pkid).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(GateCounters::get(&t.gate.counters().not_routed_locally), 20);
    // The relay to rumqttd is still there: it answers a PINGREQ.
    s.write_all(&[0xc0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, [0xd0, 0x00]);
}

#[tokio::test]
async fn silent_connections_and_connection_floods_are_bounded() {
    let t = g::start(
        |_| {},
        |c| {
            c.connect_timeout = Duration::from_millis(300);
            c.max_connections = 3;
        },
    )
    .await;
    // Three idle sockets fill the limit; the fourth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(t.addr()).await.unwrap());
    }
    let open = || GateCounters::get(&t.gate.counters().open);
    common::cloud::eventually(WAIT, "the gate to hold the three idle sockets", || {
        open() == 3
    })
    .await;
    assert!(closed_after(t.addr(), &[]).await.is_empty());
    assert!(GateCounters::get(&t.gate.counters().over_limit) >= 1);
    // The idle ones are dropped after connect_timeout, freeing the slots.
    for mut s in idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    // Their slots are free once the gate has let go of them.
    common::cloud::eventually(WAIT, "the idle sockets' slots to be freed", || open() == 0).await;
    let mut dev = g::v4_device(g::v4_options(t.addr(), "after-flood"));
    dev.connected().await;
    assert_eq!(GateCounters::get(&t.gate.counters().connect_timeouts), 3);
}

/// rumqttd 0.20 keeps a will handle per client id and unwraps a send to it
/// while holding a mutex (bytebeamio/rumqtt#1062): when two CONNECTs with one
/// client id race inside rumqttd, or a connection ends before rumqttd has
/// written its CONNACK, a dead handle stays behind; the next CONNECT with that
/// id panics rumqttd's connection task, and every later CONNECT on that
/// listener panics on the poisoned mutex: no device could connect again. A
/// device that reconnects while its old connection is still open (flaky Wi-Fi)
/// or hangs up right after CONNECT must not be able to do that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_races_and_hang_ups_cannot_stop_the_gate_accepting_devices() {
    let t = g::start(|_| {}, |_| {}).await;
    let addr = t.addr();
    for round in 0..200 {
        let racers = (0..6).map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&connect_v4("flaky", 30)).await.unwrap();
                let mut ack = [0u8; 4];
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut ack)).await;
            })
        });
        for r in racers.collect::<Vec<_>>() {
            r.await.unwrap();
        }
        // And one that hangs up before any answer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect_v4("flaky", 30)).await.unwrap();
        drop(s);
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for id in ["flaky", "well-behaved"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect_v4(id, 30)).await.unwrap();
        let mut ack = [0u8; 4];
        let got = tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await;
        assert!(
            matches!(got, Ok(Ok(_))) && ack == CONNACK_OK,
            "{id}: no CONNACK after the reconnect races: {got:?} {ack:02x?}"
        );
    }
    let mut dev = g::v4_device(g::v4_options(addr, "after-races"));
    dev.connected().await;
}
