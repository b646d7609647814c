//! The simulator's verifying cloud against the real forwarder: every stored
//! message is judged delivered by the oracle; a tampered envelope is caught.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use vigil::event::{Ingest, Kind, Qos, Timestamp, hex};
use vigil::forward::Forwarder;
use vigil::forward::config::{ForwardConfig, Protocol, UplinkTls};
use vigil::store::{Store, StoreOptions};
use vigil_sim::ledger::Sent;
use vigil_sim::{cloud, oracle, pki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_messages_are_judged_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::loopback(&dir.path().join("pki")).unwrap();
    let listeners = cloud::start_broker(&pki).unwrap();
    let ledger = dir.path().join("received.jsonl");
    let sub = cloud::Subscriber::start(&pki, listeners.v4, "vigil", Some(&ledger)).unwrap();
    assert!(sub.subscribed(Duration::from_secs(20)).await);

    let key = vigil::crypto::MasterKey::from_bytes([7; 32]);
    let store = Store::open(StoreOptions::new(dir.path().join("store")), &key).unwrap();
    let mut sent = Vec::new();
    for i in 1..=200u64 {
        let priority = (i % 3) as u8;
        let payload = format!("{{\"bed\":1,\"n\":{i}}}");
        sent.push(Sent {
            device: "bed-1".into(),
            counter: i,
            priority,
            sha256: hex(&Sha256::digest(payload.as_bytes())),
            acked: true,
        });
        store
            .append(Ingest {
                kind: Kind::Measurement,
                priority,
                device: "bed-1".into(),
                topic: format!("devices/bed-1/vitals/p{priority}"),
                qos: Qos::AtLeastOnce,
                retain: false,
                received_at: Timestamp::now(),
                content_type: None,
                user_properties: Vec::new(),
                payload: Bytes::from(payload),
            })
            .await
            .unwrap();
    }
    let config = ForwardConfig {
        host: "127.0.0.1".into(),
        port: listeners.v5.port(),
        protocol: Protocol::V5,
        tls: UplinkTls {
            ca: pki.path("ca.pem"),
            cert: Some(pki.path("vigil.pem")),
            key: Some(pki.path("vigil.key")),
            server_name: None,
            crl: None,
        },
        ..ForwardConfig::default()
    };
    let fwd = Forwarder::start(config, store.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats().queued() > 0 || sub.arrived().len() < 200 {
        assert!(Instant::now() < deadline, "not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fwd.stop().await.unwrap();

    let arrived: Vec<vigil_sim::ledger::Arrived> = vigil_sim::ledger::read(&ledger).unwrap();
    let report = oracle::judge(&sent, &arrived);
    assert!(report.passed(), "{report}");
    assert_eq!(
        (report.lost, report.unexpected, report.reordered),
        (0, 0, 0)
    );

    // The oracle has teeth: drop one arrival, tamper with another.
    let mut damaged = arrived.clone();
    damaged.remove(10);
    let forged = vigil::forward::envelope::encode(&vigil::event::Event::from_ingest(
        Ingest {
            kind: Kind::Measurement,
            priority: 1,
            device: "bed-1".into(),
            topic: "devices/bed-1/vitals/p1".into(),
            qos: Qos::AtLeastOnce,
            retain: false,
            received_at: Timestamp::now(),
            content_type: None,
            user_properties: Vec::new(),
            payload: Bytes::from_static(b"{\"n\":72}"),
        },
        uuid::Uuid::now_v7(),
        1,
    ));
    let forged = String::from_utf8(forged).unwrap().replace("72", "73");
    damaged.push(cloud::check(forged.as_bytes()));
    let report = oracle::judge(&sent, &damaged);
    assert_eq!((report.lost, report.unexpected), (1, 1), "{report}");
    assert!(!report.passed());
}
