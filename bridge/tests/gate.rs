//! The gate with real MQTT clients (rumqttc, MQTT 3.1.1 and 5) against its
//! real listeners, the embedded rumqttd behind it, and a real store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::gate::{self as g, WAIT};
use rumqttc::QoS;
use vigil::event::Kind;
use vigil::gate::GateCounters;
use vigil::gate::config::{AuthRequire, ClientCertificates, TlsConfig, User};

/// Events in the store's lanes, as (priority, device, topic, payload).
fn stored(store: &vigil::store::Store) -> Vec<(u8, String, String, Vec<u8>, Kind, u64)> {
    let mut out = Vec::new();
    for p in 0..store.priorities() {
        for e in store.scan_lane(p, None, 10_000).unwrap().events {
            let ev = e.body;
            out.push((
                p,
                ev.device,
                ev.topic,
                ev.payload.to_vec(),
                ev.kind,
                ev.device_seq,
            ));
        }
    }
    out
}

#[tokio::test]
async fn v4_puback_waits_for_the_store_commit() {
    let t = g::start(|_| {}, |_| {}).await;
    // A local subscriber on the embedded broker (through the gate, like a
    // nurse-station display).
    let mut display = g::v4_device(g::v4_options(t.addr(), "nurse-station"));
    display.connected().await;
    display.subscribed("devices/#", QoS::AtLeastOnce).await;

    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-1"));
    dev.connected().await;
    let hold = t.store.hold_commits();
    dev.client
        .publish("devices/bed-1/vitals/hr", QoS::AtLeastOnce, false, "72")
        .await
        .unwrap();
    // rumqttd has it at once: the display receives it while the commit is held.
    let got = display.publish(WAIT).await.unwrap();
    assert_eq!(&got.payload[..], b"72");
    // ... but the device gets no PUBACK while the commit is held.
    let early = dev.puback(Duration::from_millis(700)).await;
    assert_eq!(early, Err("timeout".into()), "PUBACK before the commit");
    assert!(stored(&t.store).is_empty(), "nothing is committed yet");
    drop(hold);
    dev.puback(WAIT).await.expect("PUBACK after the commit");
    let s = stored(&t.store);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (
            s[0].0,
            s[0].1.as_str(),
            s[0].2.as_str(),
            &s[0].3[..],
            s[0].4,
            s[0].5
        ),
        (
            1,
            "bed-1",
            "devices/bed-1/vitals/hr",
            &b"72"[..],
            Kind::Measurement,
            1
        )
    );
    assert_eq!(GateCounters::get(&t.gate.counters().stored), 1);
}

#[tokio::test]
async fn v5_puback_waits_for_the_store_commit_and_connack_carries_limits() {
    let t = g::start(|_| {}, |c| c.max_inflight = 16).await;
    let mut dev = g::v5_device(g::v5_options(t.addr(), "pump-7"));
    let ack = dev.connack().await;
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(16));
    assert_eq!(props.topic_alias_max, Some(32));
    assert_eq!(props.max_packet_size, Some(256 * 1024 + 5));

    let hold = t.store.hold_commits();
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "ml/h".into())],
        ..Default::default()
    };
    dev.client
        .publish_with_properties(
            "devices/pump-7/alarms/occlusion",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"alarm":"occlusion"}"#,
            props,
        )
        .await
        .unwrap();
    let early = dev.puback(Duration::from_millis(700)).await;
    assert_eq!(early.unwrap_err(), "timeout", "PUBACK before the commit");
    drop(hold);
    let ack = dev.puback(WAIT).await.unwrap();
    assert_eq!(
        ack.reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::Success
    );
    let lane0 = t.store.scan_lane(0, None, 10).unwrap().events;
    assert_eq!(lane0.len(), 1);
    let ev = &lane0[0].body;
    assert_eq!(ev.kind, Kind::Alert);
    assert_eq!(ev.content_type.as_deref(), Some("application/json"));
    assert_eq!(ev.user_properties, vec![("unit".into(), "ml/h".into())]);
}

#[tokio::test]
async fn retained_messages_wills_and_qos0_and_qos2_work() {
    let t = g::start(|_| {}, |_| {}).await;
    // Retained: published before anyone subscribes.
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-2"));
    dev.connected().await;
    dev.client
        .publish("devices/bed-2/status", QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    dev.client
        .publish("devices/bed-2/vitals/spo2", QoS::AtMostOnce, false, "97")
        .await
        .unwrap();
    dev.client
        .publish("devices/bed-2/waveforms/ecg", QoS::ExactlyOnce, false, "~~")
        .await
        .unwrap();
    dev.until(WAIT, |e| {
        matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_))).then_some(())
    })
    .await
    .expect("QoS 2 completes through the gate");

    let mut late = g::v4_device(g::v4_options(t.addr(), "display-late"));
    late.connected().await;
    late.client
        .subscribe("devices/+/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    let retained = late.publish(WAIT).await.unwrap();
    assert!(
        retained.retain,
        "the retained flag reaches a late subscriber"
    );
    assert_eq!(&retained.payload[..], b"online");

    // Will: a device with a last will drops without DISCONNECT.
    late.subscribed("devices/+/will", QoS::AtLeastOnce).await;
    let mut o = g::v4_options(t.addr(), "bed-3");
    o.set_last_will(rumqttc::LastWill::new(
        "devices/bed-3/will",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut doomed = g::v4_device(o);
    doomed.connected().await;
    doomed.task.abort();
    drop(doomed);
    let will = late.publish(WAIT).await.unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("devices/bed-3/will", &b"gone"[..])
    );

    // QoS 0 and QoS 2 were stored too.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = stored(&t.store);
        if s.len() == 3 {
            let topics: Vec<_> = s.iter().map(|e| (e.0, e.2.as_str())).collect();
            assert!(topics.contains(&(1, "devices/bed-2/vitals/spo2")));
            assert!(topics.contains(&(3, "devices/bed-2/waveforms/ecg")));
            assert!(topics.contains(&(2, "devices/bed-2/status")));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn unmatched_topics_get_the_default_class_and_are_counted() {
    let t = g::start(|_| {}, |_| {}).await;
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-4"));
    dev.connected().await;
    dev.client
        .publish("ward/7/misc", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    let s = stored(&t.store);
    assert_eq!((s[0].0, s[0].4), (2, Kind::Measurement));
    assert_eq!(GateCounters::get(&t.gate.counters().unmatched_topics), 1);
}

#[tokio::test]
async fn device_sequence_numbers_follow_publish_order() {
    let t = g::start(|_| {}, |_| {}).await;
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-5"));
    dev.connected().await;
    for i in 0..200u32 {
        dev.client
            .publish(
                "devices/bed-5/vitals/hr",
                QoS::AtLeastOnce,
                false,
                i.to_string(),
            )
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < 200 {
        dev.puback(WAIT).await.unwrap();
        acks += 1;
    }
    let lane = t.store.scan_lane(1, None, 1000).unwrap().events;
    assert_eq!(lane.len(), 200);
    for (i, e) in lane.iter().enumerate() {
        assert_eq!(e.body.device_seq, i as u64 + 1);
        assert_eq!(e.body.payload, i.to_string().as_bytes());
    }
}

#[tokio::test]
async fn unacknowledged_publishes_per_device_are_bounded() {
    let t = g::start(|_| {}, |c| c.max_inflight = 8).await;
    let mut display = g::v4_device(g::v4_options(t.addr(), "display"));
    display.connected().await;
    display.subscribed("devices/#", QoS::AtMostOnce).await;
    let hold = t.store.hold_commits();
    let mut o = g::v4_options(t.addr(), "chatty");
    o.set_inflight(100);
    let mut dev = g::v4_device(o);
    dev.connected().await;
    for _ in 0..40 {
        dev.client
            .publish("devices/chatty/vitals/x", QoS::AtLeastOnce, false, "v")
            .await
            .unwrap();
    }
    // While commits are held, only max_inflight publishes get past the gate:
    // the display gets 8 (however slowly), then nothing more.
    for n in 0..8 {
        display
            .publish(WAIT)
            .await
            .unwrap_or_else(|e| panic!("relayed {n} of the first 8: {e}"));
    }
    let ninth = display.publish(Duration::from_millis(500)).await;
    assert!(
        ninth.is_err(),
        "the gate reads no further than max_inflight: a 9th was relayed: {ninth:?}"
    );
    drop(hold);
    for _ in 0..40 {
        dev.puback(WAIT).await.unwrap();
    }
    // The PUBACKs do not mean the display has them all yet (rumqttd
    // acknowledges and passes a publish on in either order): wait for each
    // of the other 32, then make sure no more come.
    for n in 8..40 {
        display
            .publish(WAIT)
            .await
            .unwrap_or_else(|e| panic!("relayed {n} of 40: {e}"));
    }
    let extra = display.publish(Duration::from_millis(300)).await;
    assert!(extra.is_err(), "more than 40 relayed: {extra:?}");
}

fn users() -> Vec<User> {
    vec![User {
        username: "monitor".into(),
        password_hash: vigil::gate::auth::hash_password("s3cret").unwrap(),
    }]
}

#[tokio::test]
async fn wrong_passwords_get_the_right_connack_codes() {
    let users = users();
    let t = g::start(
        |_| {},
        |c| {
            c.auth.require = AuthRequire::Password;
            c.auth.users = users;
        },
    )
    .await;
    let mut o = g::v4_options(t.addr(), "bed-6");
    o.set_credentials("monitor", "wrong");
    let mut dev = g::v4_device(o);
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(err.contains("BadUserNamePassword"), "{err}");

    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-6"));
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(err.contains("NotAuthorized"), "no credentials: {err}");

    let mut o = g::v5_options(t.addr(), "bed-6");
    o.set_credentials("monitor", "wrong");
    let mut dev = g::v5_device(o);
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(err.contains("BadUserNamePassword"), "{err}");

    let mut o = g::v5_options(t.addr(), "bed-6");
    o.set_credentials("monitor", "s3cret");
    let mut dev = g::v5_device(o);
    dev.connack().await;
    assert_eq!(GateCounters::get(&t.gate.counters().refused_auth), 3);
}

#[tokio::test]
async fn bad_client_ids_are_refused_with_a_code() {
    let t = g::start(|_| {}, |_| {}).await;
    for id in ["", "$vigil", "a/b"] {
        let mut dev = g::v4_device(g::v4_options(t.addr(), id));
        let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
        assert!(err.contains("BadClientId"), "{id:?}: {err}");
    }
}

fn tls_gate(pki: &g::Pki, mode: ClientCertificates, cn: bool) -> TlsConfig {
    TlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
        client_certificates: mode,
        require_cn_match: cn,
    }
}

fn tls_options(
    addr: std::net::SocketAddr,
    id: &str,
    cfg: std::sync::Arc<rumqttc::tokio_rustls::rustls::ClientConfig>,
) -> rumqttc::MqttOptions {
    let mut o = g::v4_options(addr, id);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(cfg),
    ));
    o
}

#[tokio::test]
async fn tls_client_certificates_are_checked() {
    let pki = g::Pki::new();
    let tls = tls_gate(&pki, ClientCertificates::Required, true);
    let t = g::start(
        |_| {},
        |c| {
            c.tcp_listen = None;
            c.tls = Some(tls);
            c.auth.require = AuthRequire::Certificate;
        },
    )
    .await;
    let addr = t.gate.tls_addr().unwrap();

    // A device with a certificate from the CA, CN = client id: accepted and stored.
    let mut dev = g::v4_device(tls_options(
        addr,
        "bed-9",
        pki.client(Some(pki.leaf("bed-9", false))),
    ));
    dev.connected().await;
    dev.client
        .publish("devices/bed-9/vitals/hr", QoS::AtLeastOnce, false, "61")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    assert_eq!(stored(&t.store).len(), 1);

    // No certificate: the handshake is refused.
    let mut dev = g::v4_device(tls_options(addr, "bed-9", pki.client(None)));
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate")
            || err.contains("reset")
            || err.contains("closed"),
        "{err}"
    );

    // A certificate from another CA: refused.
    let other = g::Pki::new();
    let mut dev = g::v4_device(tls_options(
        addr,
        "bed-9",
        pki.client(Some(other.leaf("bed-9", false))),
    ));
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(!err.is_empty());

    // Right CA and CN, but the certificate expired: refused at the handshake.
    let mut dev = g::v4_device(tls_options(
        addr,
        "bed-9",
        pki.client(Some(pki.expired_leaf("bed-9", false))),
    ));
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(!err.is_empty());

    // Right CA, wrong CN: CONNACK "not authorized".
    let mut dev = g::v4_device(tls_options(
        addr,
        "bed-10",
        pki.client(Some(pki.leaf("bed-9", false))),
    ));
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(err.contains("NotAuthorized"), "{err}");
    assert_eq!(stored(&t.store).len(), 1, "nothing from refused devices");
    let c = t.gate.counters();
    assert!(GateCounters::get(&c.tls_failures) >= 3);
    assert_eq!(GateCounters::get(&c.refused_auth), 1);
}

#[tokio::test]
async fn tls_optional_certificates_fall_back_to_passwords() {
    let pki = g::Pki::new();
    let tls = tls_gate(&pki, ClientCertificates::Optional, false);
    let users = users();
    let t = g::start(
        |_| {},
        |c| {
            c.tcp_listen = None;
            c.tls = Some(tls);
            c.auth.require = AuthRequire::PasswordOrCertificate;
            c.auth.users = users;
        },
    )
    .await;
    let addr = t.gate.tls_addr().unwrap();
    let mut o = tls_options(addr, "bed-11", pki.client(None));
    o.set_credentials("monitor", "s3cret");
    g::v4_device(o).connected().await;
    let mut dev = g::v4_device(tls_options(addr, "bed-11", pki.client(None)));
    let err = dev.until(WAIT, |_| None::<()>).await.unwrap_err();
    assert!(err.contains("NotAuthorized"), "{err}");
}

#[tokio::test]
async fn a_world_readable_tls_key_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = g::Pki::new();
    std::fs::set_permissions(
        pki.path("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path());
    let mut cfg = g::config();
    cfg.tls = Some(tls_gate(&pki, ClientCertificates::Required, false));
    let err = vigil::gate::Gate::start(cfg, store)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gate.tls.key") && err.contains("chmod 600"),
        "{err}"
    );
}

#[tokio::test]
async fn a_full_store_refuses_with_0x97_on_v5_and_no_puback_on_v4() {
    // A tiny quota filled with alarms, which are never evicted.
    let t = g::start(|o| o.quota_bytes = 8 * 1024, |_| {}).await;
    let mut dev = g::v5_device(g::v5_options(t.addr(), "alarm-box"));
    dev.connack().await;
    let mut refused = None;
    for _ in 0..100 {
        dev.client
            .publish(
                "devices/alarm-box/alarms/x",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                vec![b'a'; 400],
            )
            .await
            .unwrap();
        let ack = dev.puback(WAIT).await.unwrap();
        if ack.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::QuotaExceeded {
            refused = Some(ack);
            break;
        }
    }
    assert!(
        refused.is_some(),
        "the store filled up and the gate said 0x97"
    );
    let before = stored(&t.store).len();

    let mut v4 = g::v4_device(g::v4_options(t.addr(), "alarm-box-4"));
    v4.connected().await;
    v4.client
        .publish(
            "devices/alarm-box-4/alarms/x",
            QoS::AtLeastOnce,
            false,
            vec![b'a'; 400],
        )
        .await
        .unwrap();
    let outcome = v4.puback(WAIT).await;
    assert!(
        outcome.is_err(),
        "no PUBACK for a refused 3.1.1 publish: {outcome:?}"
    );
    assert_eq!(
        stored(&t.store).len(),
        before,
        "nothing acknowledged that was not stored"
    );
    assert!(GateCounters::get(&t.gate.counters().refused_full) >= 2);
}

/// Fault catalogue B4: a second CONNECT with a connected device's client id.
/// The policy is MQTT's: the newer connection takes the session over and the
/// broker closes the older one. The gate counts and logs each takeover (a
/// device stealing another's id shows up), what the older connection had
/// acknowledged is stored, and the newer one works.
#[tokio::test]
async fn a_second_connection_with_a_connected_client_id_takes_over_and_is_counted() {
    let t = g::start(|_| {}, |_| {}).await;
    let mut first = g::v4_device(g::v4_options(t.addr(), "bed-9"));
    first.connected().await;
    first
        .client
        .publish("devices/bed-9/vitals/hr", QoS::AtLeastOnce, false, "70")
        .await
        .unwrap();
    first.puback(WAIT).await.unwrap();

    let mut second = g::v4_device(g::v4_options(t.addr(), "bed-9"));
    second.connected().await;
    // The older connection is closed by the broker.
    let ended = first.until(WAIT, |_| None::<()>).await;
    assert!(
        ended.is_err() && ended != Err("timeout".into()),
        "{ended:?}"
    );
    second
        .client
        .publish("devices/bed-9/vitals/hr", QoS::AtLeastOnce, false, "71")
        .await
        .unwrap();
    second.puback(WAIT).await.unwrap();
    assert_eq!(GateCounters::get(&t.gate.counters().takeovers), 1);
    let payloads: Vec<Vec<u8>> = stored(&t.store).into_iter().map(|s| s.3).collect();
    assert_eq!(payloads, vec![b"70".to_vec(), b"71".to_vec()]);
    // A third device with another id is not affected.
    let mut other = g::v4_device(g::v4_options(t.addr(), "bed-10"));
    other.connected().await;
    assert_eq!(GateCounters::get(&t.gate.counters().takeovers), 1);
}

/// Fault catalogue B7 (subscriptions): nobody may subscribe unless a
/// `gate.subscribe` rule allows it, since every device's readings pass
/// through the embedded broker. A bedside device subscribing to `#` is
/// refused (MQTT 3.1.1 SUBACK 0x80, MQTT 5 0x87) and counted, stays
/// connected, and receives nothing; the nurse station's allowed filter works;
/// a filter wider than the rule is refused as a whole.
#[tokio::test]
async fn subscriptions_need_a_rule_and_wider_filters_are_refused() {
    use vigil::gate::config::SubscribeRule;
    let t = g::start(
        |_| {},
        |c| {
            c.subscribe = vec![SubscribeRule {
                clients: vec!["nurse-station".into()],
                filters: vec!["devices/+/vitals/#".into()],
            }];
        },
    )
    .await;
    // A bedside device tries to read everything: refused, still connected.
    let mut snoop = g::v4_device(g::v4_options(t.addr(), "bed-1"));
    snoop.connected().await;
    snoop.client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    let codes = snoop.suback().await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);
    // MQTT 5: "not authorized".
    let mut snoop5 = g::v5_device(g::v5_options(t.addr(), "bed-2"));
    snoop5.connack().await;
    snoop5
        .client
        .subscribe("devices/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = snoop5
        .until(WAIT, |e| match e {
            rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::SubAck(a)) => {
                Some(a.return_codes.clone())
            }
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(
        codes,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]
    );
    // The nurse station: its filter works, a wider one is refused.
    let mut station = g::v4_device(g::v4_options(t.addr(), "nurse-station"));
    station.connected().await;
    station
        .subscribed("devices/+/vitals/#", QoS::AtLeastOnce)
        .await;
    station
        .client
        .subscribe("devices/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = station.suback().await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);
    // A reading reaches the station and not the snooping device.
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-3"));
    dev.connected().await;
    dev.client
        .publish("devices/bed-3/vitals/hr", QoS::AtLeastOnce, false, "64")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    assert_eq!(&station.publish(WAIT).await.unwrap().payload[..], b"64");
    assert!(snoop.publish(Duration::from_millis(500)).await.is_err());
    assert_eq!(GateCounters::get(&t.gate.counters().refused_subscribe), 3);
}

/// Fault catalogue B13: retained messages are bounded in the embedded broker
/// (topics and bytes). Past a bound a retained publish is relayed as not
/// retained, counted, and still stored for the cloud; a will with a wildcard
/// topic is refused.
#[tokio::test]
async fn retained_messages_are_capped_and_still_stored() {
    let t = g::start(
        |_| {},
        |c| {
            c.max_retained_topics = 2;
            c.max_retained_bytes = 100;
        },
    )
    .await;
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-4"));
    dev.connected().await;
    for (topic, payload) in [
        ("devices/bed-4/status/a", "1".repeat(10)),
        ("devices/bed-4/status/b", "2".repeat(10)),
        ("devices/bed-4/status/c", "3".repeat(10)),
        ("devices/bed-4/status/a", "4".repeat(200)),
    ] {
        dev.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
        dev.puback(WAIT).await.unwrap();
    }
    assert_eq!(stored(&t.store).len(), 4, "all stored for the cloud");
    assert_eq!(GateCounters::get(&t.gate.counters().retain_capped), 2);
    // A late subscriber gets the two retained topics, with their first values.
    let mut late = g::v4_device(g::v4_options(t.addr(), "display-1"));
    late.connected().await;
    late.subscribed("devices/bed-4/status/#", QoS::AtLeastOnce)
        .await;
    // Wait for two (however slowly), then make sure no third comes.
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = late.publish(WAIT).await.expect("a retained message");
        got.push((p.topic.clone(), p.payload.len()));
    }
    while let Ok(p) = late.publish(Duration::from_millis(700)).await {
        got.push((p.topic.clone(), p.payload.len()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("devices/bed-4/status/a".to_string(), 10),
            ("devices/bed-4/status/b".to_string(), 10)
        ]
    );
    // A will on a wildcard topic: the connection is refused.
    let mut o = g::v4_options(t.addr(), "bed-5");
    o.set_last_will(rumqttc::LastWill::new(
        "devices/+/status",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut bad = g::v4_device(o);
    let ended = bad.until(WAIT, |_| None::<()>).await;
    assert!(
        ended.is_err() && ended != Err("timeout".into()),
        "closed, not left waiting: {ended:?}"
    );
}

/// Fault catalogue B3 (topics): a device publishes under another device's
/// `devices/<client id>/`: refused (connection closed, MQTT 5 DISCONNECT
/// 0x87), counted, nothing stored; its own topics work.
#[tokio::test]
async fn a_device_cannot_publish_as_another_device() {
    let t = g::start(|_| {}, |_| {}).await;
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-7"));
    dev.connected().await;
    dev.client
        .publish("devices/bed-7/vitals/hr", QoS::AtLeastOnce, false, "66")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    dev.client
        .publish("devices/bed-8/vitals/hr", QoS::AtLeastOnce, false, "99")
        .await
        .unwrap();
    let ended = dev.puback(WAIT).await;
    assert!(
        ended.is_err() && ended != Err("timeout".into()),
        "closed: {ended:?}"
    );
    let mut dev5 = g::v5_device(g::v5_options(t.addr(), "bed-9"));
    dev5.connack().await;
    dev5.client
        .publish(
            "devices/bed-8/alarms/spo2",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    let ended = dev5.puback(WAIT).await;
    assert!(
        ended.as_ref().is_err_and(|e| e.contains("NotAuthorized")
            || e.contains("ConnectionAborted")
            || e.contains("closed")
            || e.contains("Io")),
        "{ended:?}"
    );
    let payloads: Vec<Vec<u8>> = stored(&t.store).into_iter().map(|s| s.3).collect();
    assert_eq!(payloads, vec![b"66".to_vec()]);
    assert_eq!(GateCounters::get(&t.gate.counters().refused_topic), 2);
}

/// A publish no local client subscribes to is stored and acknowledged but not
/// relayed to the embedded broker (nobody there could receive it); once a
/// local client subscribes, matching publishes reach it, and after it
/// unsubscribes they skip the broker again. Retained publishes always go.
#[tokio::test]
async fn publishes_reach_the_embedded_broker_only_when_a_local_client_may_want_them() {
    let t = g::start(|_| {}, |_| {}).await;
    let counters = t.gate.counters();
    let skipped = || GateCounters::get(&counters.not_routed_locally);
    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-1"));
    dev.connected().await;
    let mut publish = async |topic: &str, retain: bool, payload: &str| {
        dev.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
            .await
            .unwrap();
        dev.puback(WAIT).await.unwrap();
    };
    for _ in 0..5 {
        publish("devices/bed-1/vitals/hr", false, "64").await;
    }
    assert_eq!(skipped(), 5, "nobody local subscribes yet");

    let mut station = g::v4_device(g::v4_options(t.addr(), "nurse-station"));
    station.connected().await;
    station
        .subscribed("devices/+/alarms/#", QoS::AtLeastOnce)
        .await;
    publish("devices/bed-1/vitals/hr", false, "65").await;
    assert_eq!(skipped(), 6, "the station's filter does not match vitals");
    publish("devices/bed-1/alarms/spo2", false, "88").await;
    assert_eq!(skipped(), 6);
    let alarm = station.publish(WAIT).await.unwrap();
    assert_eq!(
        (alarm.topic.as_str(), &alarm.payload[..]),
        ("devices/bed-1/alarms/spo2", &b"88"[..])
    );

    station
        .client
        .unsubscribe("devices/+/alarms/#")
        .await
        .unwrap();
    station
        .until(WAIT, |e| {
            matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::UnsubAck(_))).then_some(())
        })
        .await
        .unwrap();
    publish("devices/bed-1/alarms/spo2", false, "87").await;
    assert_eq!(skipped(), 7, "unsubscribed: the alarm skips the broker");
    assert!(station.publish(Duration::from_millis(300)).await.is_err());

    // Retained: kept by the broker for whoever subscribes later.
    publish("devices/bed-1/status", true, "online").await;
    assert_eq!(skipped(), 7);
    station
        .subscribed("devices/+/status", QoS::AtLeastOnce)
        .await;
    let retained = station.publish(WAIT).await.unwrap();
    assert!(retained.retain);
    assert_eq!(&retained.payload[..], b"online");

    // Every one of them is stored, skipped or not.
    assert_eq!(stored(&t.store).len(), 9);
}

/// rumqttd keeps a persistent session's subscriptions while its client is
/// away and queues matching messages for it; the gate keeps routing them.
#[tokio::test]
async fn a_persistent_local_subscriber_gets_what_was_published_while_it_was_away() {
    let t = g::start(|_| {}, |_| {}).await;
    let persistent = || {
        let mut o = g::v4_options(t.addr(), "nurse-station");
        o.set_clean_session(false);
        o
    };
    let mut station = g::v4_device(persistent());
    station.connected().await;
    station.subscribed("devices/#", QoS::AtLeastOnce).await;
    station.client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, station.task).await;

    let mut dev = g::v4_device(g::v4_options(t.addr(), "bed-1"));
    dev.connected().await;
    dev.client
        .publish("devices/bed-1/alarms/spo2", QoS::AtLeastOnce, false, "88")
        .await
        .unwrap();
    dev.puback(WAIT).await.unwrap();
    assert_eq!(
        GateCounters::get(&t.gate.counters().not_routed_locally),
        0,
        "the away session's filter still matches"
    );

    let mut station = g::v4_device(persistent());
    station.connected().await;
    let missed = station.publish(WAIT).await.unwrap();
    assert_eq!(&missed.payload[..], b"88");
}

/// The embedded broker's port is someone else's: another Vigil's embedded
/// broker here (tests in one process, or a second daemon on the gateway).
/// Its bind fails, and the start must fail and say so, not probe the other
/// broker, find it answering, and relay this gate's devices into it.
#[tokio::test]
async fn an_embedded_broker_port_held_by_another_broker_fails_the_start() {
    let a = g::start(|_| {}, |_| {}).await;
    let taken = a.gate.broker_v4_addr();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rumqttd.toml");
    let text = vigil::gate::broker::BUILT_IN.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{taken}\""),
        1,
    );
    assert!(text.contains(&taken.to_string()), "the v4 listener moved");
    std::fs::write(&file, text).unwrap();
    let store = common::open_with(&dir.path().join("store"), |_| {});
    let mut cfg = g::config();
    cfg.broker_config = Some(file);
    let started = std::time::Instant::now();
    let err = match vigil::gate::Gate::start(cfg, store).await {
        Ok(b) => panic!(
            "gate B started with its v4 listener on gate A's port {taken} (B relays to {})",
            b.broker_v4_addr()
        ),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("internal-v4"), "names the listener: {err}");
    assert!(err.contains(&taken.to_string()), "names the address: {err}");
    assert!(err.contains("in use"), "says why: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fails at once, not after the probe's retries: {:?}",
        started.elapsed()
    );
    // Gate A is untouched.
    let mut dev = g::v4_device(g::v4_options(a.addr(), "bed-1"));
    dev.connected().await;
}

/// An MQTT 3.1.1 QoS 1 PUBLISH, DUP set or not.
fn publish_v4(dup: bool, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![if dup { 0x3a } else { 0x32 }];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        p.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

/// Reads one PUBACK from a raw connection; its packet id.
async fn raw_puback(s: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut ack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut ack))
        .await
        .expect("a PUBACK")
        .unwrap();
    assert_eq!(ack[..2], [0x40, 0x02], "{ack:02x?}");
    u16::from_be_bytes([ack[2], ack[3]])
}

/// A device that did not get a PUBACK (its connection dropped) sends the
/// publish again with DUP set. If the gate had committed it, the resend is
/// acknowledged and not stored again, so the cloud gets one message with one
/// id, not two. Anything short of the same client id, packet id and bytes of
/// a committed publish is stored: a duplicate at worst, never a loss.
#[tokio::test]
async fn a_resent_publish_already_committed_is_acknowledged_not_stored_twice() {
    use tokio::io::AsyncWriteExt;
    let t = g::start(|_| {}, |_| {}).await;
    let topic = "wards/3/bed-7/vitals";
    let reading = br#"{"hr":72,"t":"2026-11-30T23:30:00Z"}"#;
    let queued = || t.store.stats().queued();
    let resends = || GateCounters::get(&t.gate.counters().resends_acknowledged);

    let mut s = g::connected_raw(t.addr(), "pump-3", 30).await;
    s.write_all(&publish_v4(false, 7, topic, reading))
        .await
        .unwrap();
    assert_eq!(raw_puback(&mut s).await, 7);
    assert_eq!(queued(), 1);
    // The connection drops; the device resends on its next connection.
    drop(s);
    let mut s = g::connected_raw(t.addr(), "pump-3", 30).await;
    s.write_all(&publish_v4(true, 7, topic, reading))
        .await
        .unwrap();
    assert_eq!(raw_puback(&mut s).await, 7);
    assert_eq!(queued(), 1, "the resend was stored again");
    assert_eq!(resends(), 1);

    // Same packet id and bytes, DUP not set: a new message, stored.
    s.write_all(&publish_v4(false, 7, topic, reading))
        .await
        .unwrap();
    assert_eq!(raw_puback(&mut s).await, 7);
    assert_eq!(queued(), 2);
    // Same packet id, DUP set, other bytes: stored.
    s.write_all(&publish_v4(true, 7, topic, br#"{"hr":73}"#))
        .await
        .unwrap();
    assert_eq!(raw_puback(&mut s).await, 7);
    assert_eq!(queued(), 3);
    // The bytes of a committed publish, DUP set, from another client id: stored.
    let mut other = g::connected_raw(t.addr(), "pump-4", 30).await;
    other
        .write_all(&publish_v4(true, 7, topic, br#"{"hr":73}"#))
        .await
        .unwrap();
    assert_eq!(raw_puback(&mut other).await, 7);
    assert_eq!(queued(), 4);
    assert_eq!(resends(), 1);

    // A resend's PUBACK keeps its place: behind the one before it.
    let mut both = publish_v4(false, 11, topic, br#"{"hr":74}"#);
    both.extend(publish_v4(true, 7, topic, br#"{"hr":73}"#));
    s.write_all(&both).await.unwrap();
    assert_eq!(raw_puback(&mut s).await, 11);
    assert_eq!(raw_puback(&mut s).await, 7);
    assert_eq!(queued(), 5);
    assert_eq!(resends(), 2);
}

/// The other side of the resend rule: a publish the store refused (full, so
/// an MQTT 3.1.1 device gets no PUBACK and is disconnected to resend it) was
/// never committed, so its resend is not taken for a duplicate: it is
/// refused again, not acknowledged.
#[tokio::test]
async fn a_resend_of_a_publish_the_store_refused_is_not_acknowledged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = g::start(|o| o.quota_bytes = 8 * 1024, |_| {}).await;
    let topic = "devices/alarm-box/alarms/x";
    let alarm = [b'a'; 400];
    let mut s = g::connected_raw(t.addr(), "alarm-box", 30).await;
    let mut refused = None;
    for pkid in 1..100u16 {
        s.write_all(&publish_v4(false, pkid, topic, &alarm))
            .await
            .unwrap();
        let mut ack = [0u8; 4];
        match tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await {
            Ok(Ok(_)) => assert_eq!(ack, [0x40, 0x02, 0, pkid as u8]),
            Ok(Err(_)) => {
                refused = Some(pkid);
                break;
            }
            Err(_) => panic!("neither a PUBACK nor a disconnect for {pkid}"),
        }
    }
    let pkid = refused.expect("the store filled up and the gate disconnected");
    assert!(pkid > 1, "the first alarms fit");
    assert_eq!(GateCounters::get(&t.gate.counters().refused_full), 1);
    let stored_before = t.store.stats().queued();

    let mut s = g::connected_raw(t.addr(), "alarm-box", 30).await;
    s.write_all(&publish_v4(true, pkid, topic, &alarm))
        .await
        .unwrap();
    let mut got = Vec::new();
    let outcome = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    assert!(
        outcome.is_ok() && got.is_empty(),
        "the refused publish's resend was acknowledged or left open: {got:02x?}"
    );
    assert_eq!(t.store.stats().queued(), stored_before);
    assert_eq!(
        GateCounters::get(&t.gate.counters().resends_acknowledged),
        0
    );
}

/// The same for an MQTT 5 device: its resend (DUP set, no properties) is
/// acknowledged once, not stored twice.
#[tokio::test]
async fn an_mqtt5_resend_of_a_committed_publish_is_acknowledged_not_stored_twice() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = g::start(|_| {}, |_| {}).await;
    let connect = |id: &str| {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    };
    // PUBLISH QoS 1: topic, packet id, no properties, payload.
    let publish = |dup: bool, pkid: u16| {
        let topic = b"wards/3/bed-8/vitals";
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic);
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0);
        body.extend_from_slice(br#"{"spo2":97}"#);
        let mut p = vec![if dup { 0x3a } else { 0x32 }, body.len() as u8];
        p.extend(body);
        p
    };
    let connected = || async {
        let mut s = tokio::net::TcpStream::connect(t.addr()).await.unwrap();
        s.write_all(&connect("monitor-8")).await.unwrap();
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x20, "CONNACK");
        let mut rest = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest[1], 0, "CONNACK success");
        s
    };
    let mut s = connected().await;
    s.write_all(&publish(false, 3)).await.unwrap();
    assert_eq!(raw_puback(&mut s).await, 3);
    drop(s);
    let mut s = connected().await;
    s.write_all(&publish(true, 3)).await.unwrap();
    assert_eq!(raw_puback(&mut s).await, 3);
    assert_eq!(t.store.stats().queued(), 1, "the resend was stored again");
    assert_eq!(
        GateCounters::get(&t.gate.counters().resends_acknowledged),
        1
    );
}

/// End to end with a real client: a rumqttc device (persistent session)
/// whose connection is reset after the gate read its publish and before the
/// PUBACK reached it. The commit completes; the device reconnects and
/// re-delivers the publish with DUP set (Vigil's rumqttc patch, as MQTT
/// asks), and the gate acknowledges it without storing a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resending_after_a_lost_puback_makes_no_second_copy() {
    use rumqttc::{Event, Outgoing, Packet};
    use vigil_sim::proxy::{Mode, Proxy};
    let t = g::start(|_| {}, |_| {}).await;
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), t.addr())
        .await
        .unwrap();
    let mut o = g::v4_options(proxy.addr(), "pump-7");
    o.set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 16);
    async fn until(
        eventloop: &mut rumqttc::EventLoop,
        what: &str,
        mut f: impl FnMut(&Result<Event, rumqttc::ConnectionError>) -> bool,
    ) {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = eventloop.poll().await;
                if f(&e) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }
    until(&mut eventloop, "the CONNACK", |e| {
        matches!(e, Ok(Event::Incoming(Packet::ConnAck(_))))
    })
    .await;

    let hold = t.store.hold_commits();
    client
        .publish("wards/3/pump-7/rate", QoS::AtLeastOnce, false, "12 ml/h")
        .await
        .unwrap();
    until(&mut eventloop, "the PUBLISH sent", |e| {
        matches!(e, Ok(Event::Outgoing(Outgoing::Publish(_))))
    })
    .await;
    // The gate has it (submitted, its commit held) when the link resets.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Mode::Reset);
    until(&mut eventloop, "the reset", |e| e.is_err()).await;
    drop(hold);
    let queued = || t.store.stats().queued();
    let deadline = std::time::Instant::now() + WAIT;
    while queued() < 1 {
        assert!(std::time::Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The old connection's writer records the commit just after it.
    tokio::time::sleep(Duration::from_millis(300)).await;

    proxy.set(Mode::Pass);
    until(&mut eventloop, "the resent publish's PUBACK", |e| {
        matches!(e, Ok(Event::Incoming(Packet::PubAck(_))))
    })
    .await;
    assert_eq!(queued(), 1, "the resend was stored as a second copy");
    assert_eq!(
        GateCounters::get(&t.gate.counters().resends_acknowledged),
        1
    );
}
