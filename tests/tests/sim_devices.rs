//! Simulated monitors through the real gate, store and forwarder to the
//! simulator's cloud, with the cloud unreachable for the first part of the
//! run: the oracle finds nothing lost, nothing unexpected, nothing reordered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vigil::forward::Forwarder;
use vigil::forward::config::{ForwardConfig, UplinkTls};
use vigil::gate::{Gate, GateConfig};
use vigil::store::{Store, StoreOptions};
use vigil_sim::devices::{self, DevicesConfig};
use vigil_sim::{cloud, ledger, oracle, pki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_through_vigil_during_an_outage_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::loopback(&dir.path().join("pki")).unwrap();
    let listeners = cloud::start_broker(&pki).unwrap();
    let sub = cloud::Subscriber::start(&pki, listeners.v4, "vigil", None).unwrap();
    assert!(sub.subscribed(Duration::from_secs(20)).await);

    let key = vigil::crypto::MasterKey::from_bytes([9; 32]);
    let store = Store::open(StoreOptions::new(dir.path().join("store")), &key).unwrap();
    let gate = Gate::start(
        GateConfig {
            tcp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..GateConfig::default()
        },
        store.clone(),
    )
    .await
    .unwrap();

    // Ten monitors at 20x real time for two seconds; the cloud link is down
    // (no forwarder yet) for the first second.
    let stop = CancellationToken::new();
    let sent_path = dir.path().join("sent.jsonl");
    let run = tokio::spawn(devices::run(
        DevicesConfig {
            gate: gate.tcp_addr().unwrap(),
            count: 10,
            rate: 20.0,
            prefix: "bed".into(),
            protocol: devices::DeviceProtocol::Mixed,
        },
        Some(ledger::Writer::create(&sent_path).unwrap()),
        stop.clone(),
        Duration::from_secs(5),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        store.stats().queued() > 0,
        "messages buffer during the outage"
    );
    let fwd = Forwarder::start(
        ForwardConfig {
            host: "127.0.0.1".into(),
            port: listeners.v5.port(),
            tls: UplinkTls {
                ca: pki.path("ca.pem"),
                cert: Some(pki.path("vigil.pem")),
                key: Some(pki.path("vigil.key")),
                server_name: None,
                crl: None,
            },
            ..ForwardConfig::default()
        },
        store.clone(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let sent = run.await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats().queued() > 0 {
        assert!(Instant::now() < deadline, "not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    fwd.stop().await.unwrap();
    gate.shutdown().await;

    assert_eq!(
        ledger::read::<ledger::Sent>(&sent_path).unwrap().len(),
        sent.len()
    );
    let report = oracle::judge(&sent, &sub.arrived());
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.acknowledged >= 300, "{report}");
    assert_eq!(report.reordered, 0, "{report}");
    // Every device, MQTT 3.1.1 (odd) and MQTT 5 (even), was acknowledged.
    for n in 1..=10 {
        let id = format!("bed-{n}");
        assert!(sent.iter().any(|s| s.device == id && s.acked), "{id}");
    }
    // Vitals and ECG chunks both went through.
    for kind in [1u8, 3] {
        assert!(sent.iter().any(|s| s.priority == kind && s.acked));
    }
}
