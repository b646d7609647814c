//! The forwarder end to end, against a real cloud broker on loopback: rumqttd
//! with client-certificate verification (certificates made here with rcgen),
//! in a child process so it can be killed; a subscriber that checks every
//! envelope's sha256; and, where faults are needed, a TLS-terminating proxy
//! that parses MQTT between Vigil and the cloud.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::cloud::{self as c, Arrivals, Cloud, Proxy, Subscriber};
use vigil::event::Ingest;
use vigil::forward::Forwarder;
use vigil::forward::config::{ForwardConfig, Protocol};
use vigil::state::LinkState;
use vigil::store::Store;

const LONG: Duration = Duration::from_secs(60);

#[test]
#[ignore = "run by the tests below as their cloud broker process"]
fn child_cloud() {
    if let Ok(dir) = std::env::var(c::CLOUD_CHILD_ENV) {
        c::serve_cloud(std::path::Path::new(&dir));
    }
}

/// One message per lane topic; even ones carry JSON, odd ones binary.
fn message(priority: u8, i: usize) -> Ingest {
    let mut m = common::ingest("bed-1", priority, 0);
    m.topic = format!("devices/bed-1/p{priority}");
    m.user_properties.clear();
    m.payload = if i.is_multiple_of(2) {
        Bytes::from(format!("{{\"i\":{i},\"hr\":72}}"))
    } else {
        Bytes::from(vec![0xff, (i % 251) as u8, 0, b'x'])
    };
    m
}

/// Appends `n` messages spread over lanes 0..3; returns (id, priority) in
/// append order.
async fn append(store: &Store, n: usize, from: usize) -> Vec<(String, u8)> {
    let mut out = Vec::new();
    for i in from..from + n {
        let priority = (i % 3) as u8;
        let a = store.append(message(priority, i)).await.unwrap();
        out.push((a.id.to_string(), priority));
    }
    out
}

/// Every id arrived; in each lane, first arrivals follow the append order.
fn check_delivery(sent: &[(String, u8)], arrivals: &Arrivals, also_acked: &[String]) {
    assert!(arrivals.bad.is_empty(), "bad envelopes: {:?}", arrivals.bad);
    let missing: Vec<_> = sent
        .iter()
        .filter(|(id, _)| !arrivals.count.contains_key(id) && !also_acked.contains(id))
        .collect();
    assert!(missing.is_empty(), "{} lost: {missing:?}", missing.len());
    let rank: HashMap<&str, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<u8, usize> = HashMap::new();
    for r in &arrivals.all {
        if !seen.insert(r.id.clone()) {
            continue;
        }
        let Some(&k) = rank.get(r.id.as_str()) else {
            continue;
        };
        if let Some(prev) = last.insert(r.priority, k) {
            assert!(
                prev < k,
                "priority {} reordered: {prev} then {k}",
                r.priority
            );
        }
    }
}

async fn drained(store: &Store) {
    c::eventually(LONG, "store to drain", || store.stats().queued() == 0).await;
}

struct Rig {
    _dir: tempfile::TempDir,
    pki: common::gate::Pki,
    store: Store,
    cloud: Option<Cloud>,
    cloud_dir: std::path::PathBuf,
    arrivals: Arc<Mutex<Arrivals>>,
    subscriber: Option<Subscriber>,
}

impl Rig {
    async fn new() -> Self {
        common::log_to_test();
        let dir = tempfile::tempdir().unwrap();
        let store = common::open(&dir.path().join("store"));
        let pki = c::cloud_pki();
        let cloud_dir = c::cloud_dir(&pki, "cloud");
        let cloud = Cloud::start(&cloud_dir);
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let subscriber = Subscriber::start(&pki, cloud.v4, arrivals.clone()).await;
        Self {
            _dir: dir,
            pki,
            store,
            cloud: Some(cloud),
            cloud_dir,
            arrivals,
            subscriber: Some(subscriber),
        }
    }

    fn cloud(&self) -> &Cloud {
        self.cloud.as_ref().unwrap()
    }

    fn config(&self, protocol: Protocol) -> ForwardConfig {
        c::forward_config(&self.pki, self.cloud().addr(protocol), protocol)
    }

    /// SIGKILL the cloud and start a new one (new ports), with the
    /// subscriber resubscribed there before Vigil may reach it.
    async fn restart_cloud(&mut self) {
        self.subscriber = None;
        self.cloud.take().unwrap().kill();
        let cloud = Cloud::start(&self.cloud_dir);
        self.subscriber = Some(Subscriber::start(&self.pki, cloud.v4, self.arrivals.clone()).await);
        self.cloud = Some(cloud);
    }
}

/// The count and sum of a histogram, read from its OpenMetrics text.
fn histogram_count_sum(h: &prometheus_client::metrics::histogram::Histogram) -> (u64, f64) {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("h", "test", h.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(suffix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {suffix} in:\n{text}"))
    };
    (value("h_count ") as u64, value("h_sum "))
}

async fn deliver_in_priority_order(protocol: Protocol) {
    let started = std::time::Instant::now();
    let rig = Rig::new().await;
    // A backlog before the forwarder starts, so strict priority shows.
    let mut sent = append(&rig.store, 300, 0).await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().addr(protocol)).await;
    let mut config = rig.config(protocol);
    config.port = proxy.addr.port();
    config.window = Some(16);
    let fwd = Forwarder::start(config, rig.store.clone()).unwrap();
    // And some while it runs.
    sent.extend(append(&rig.store, 60, 300).await);
    drained(&rig.store).await;
    c::eventually(LONG, "every message at the subscriber", || {
        rig.arrivals.lock().unwrap().unique() == sent.len()
    })
    .await;
    {
        let a = rig.arrivals.lock().unwrap();
        check_delivery(&sent, &a, &[]);
        assert_eq!(a.duplicates(), 0, "no fault, no duplicate");
    }
    // Strict priority in what Vigil published: the 300-message backlog went
    // out lane 0 first, then 1, then 2.
    let published = proxy.control.lock().unwrap().published.clone();
    let backlog: std::collections::HashSet<&str> =
        sent[..300].iter().map(|(id, _)| id.as_str()).collect();
    let order: Vec<u8> = published
        .iter()
        .filter(|(id, _)| backlog.contains(id.as_str()))
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(order.len(), 300);
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "not in priority order: {order:?}"
    );
    let mut link = fwd.link_state();
    tokio::time::timeout(LONG, link.wait_for(|s| *s == LinkState::Online))
        .await
        .unwrap()
        .unwrap();
    // The counter is bumped once the store reports the deletion, just after
    // the backlog reads empty.
    let counters = fwd.counters();
    let delivered = || {
        counters
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    c::eventually(LONG, "the delivered counter to catch up", || {
        delivered() >= sent.len() as u64
    })
    .await;
    assert_eq!(delivered(), sent.len() as u64);
    // Each delivery's time from the gate's read (here: the append) to the
    // cloud's PUBACK was observed once, and none is longer than the test.
    let (count, sum) = histogram_count_sum(&counters.delivery_seconds);
    assert_eq!(count, sent.len() as u64, "one observation per delivery");
    let bound = started.elapsed().as_secs_f64();
    assert!(
        sum > 0.0 && sum <= count as f64 * bound,
        "delivery seconds: sum {sum} over {count} messages, test ran {bound} s"
    );
    // And one per publish written (no fault: no resend), each before its
    // PUBACK.
    let (sent_count, sent_sum) = histogram_count_sum(&counters.sent_seconds);
    assert_eq!(sent_count, sent.len() as u64, "one observation per publish");
    assert!(
        sent_sum > 0.0 && sent_sum <= sum,
        "sent seconds: sum {sent_sum}, delivery seconds: sum {sum}"
    );
    fwd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_in_priority_order_mqtt5() {
    deliver_in_priority_order(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_in_priority_order_mqtt311() {
    deliver_in_priority_order(Protocol::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_killed_and_restarted_mid_stream_loses_nothing() {
    let mut rig = Rig::new().await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().v5).await;
    let mut config = rig.config(Protocol::V5);
    config.port = proxy.addr.port();
    let window = 32;
    config.window = Some(window);
    let fwd = Forwarder::start(config, rig.store.clone()).unwrap();
    let faults = 3;
    let mut sent = Vec::new();
    let mut acked_by_killed = Vec::new();
    for round in 0..faults {
        // The round is appended while it is forwarded (the forwarder keeps up
        // with one-at-a-time appends), so the cloud dies mid-stream.
        let target = rig.arrivals.lock().unwrap().unique() + 100;
        let store = rig.store.clone();
        let appending = tokio::spawn(async move { append(&store, 400, round * 500).await });
        c::eventually(LONG, "a part of the round to arrive", || {
            rig.arrivals.lock().unwrap().unique() >= target
        })
        .await;
        // Mid-stream: kill the cloud; Vigil keeps storing meanwhile.
        proxy.set(|p| p.refuse = true);
        rig.restart_cloud().await;
        // Every PUBACK so far came from a broker that is now dead (the proxy
        // refuses until it points at the new one): what one of those
        // acknowledged but had not yet passed to the subscriber is the broker's
        // loss, not Vigil's.
        acked_by_killed = proxy.control.lock().unwrap().acked.clone();
        sent.extend(appending.await.unwrap());
        sent.extend(append(&rig.store, 100, round * 500 + 400).await);
        let v5 = rig.cloud().v5;
        proxy.set(|p| {
            p.upstream = Some(v5);
            p.refuse = false;
        });
    }
    drained(&rig.store).await;
    // The live cloud acknowledged the rest; wait for its subscriber to have
    // them all (a PUBACK reaches Vigil before the broker passes the message on).
    let killed: std::collections::HashSet<&str> =
        acked_by_killed.iter().map(String::as_str).collect();
    c::eventually(LONG, "every message not lost by a killed broker", || {
        let a = rig.arrivals.lock().unwrap();
        sent.iter()
            .all(|(id, _)| a.count.contains_key(id) || killed.contains(id.as_str()))
    })
    .await;
    {
        let a = rig.arrivals.lock().unwrap();
        let lost_by_broker = sent
            .iter()
            .filter(|(id, _)| !a.count.contains_key(id))
            .count();
        eprintln!(
            "{} sent, {} unique at the subscriber, {} duplicates, {} acknowledged by a broker \
         that was then killed and never passed on",
            sent.len(),
            a.unique(),
            a.duplicates(),
            lost_by_broker
        );
        // Nothing is missing that a broker still alive acknowledged, and
        // nothing is missing that no broker acknowledged.
        check_delivery(&sent, &a, &acked_by_killed);
        assert!(
            a.duplicates() <= usize::from(window) * faults,
            "{} duplicates for {faults} faults with a window of {window}",
            a.duplicates()
        );
    }
    fwd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_pubacks_keep_the_cursor_and_messages_are_resent() {
    let rig = Rig::new().await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().v5).await;
    proxy.set(|p| p.drop_pubacks = true);
    let mut config = rig.config(Protocol::V5);
    config.port = proxy.addr.port();
    config.ack_timeout = Duration::from_secs(2);
    let sent = append(&rig.store, 50, 0).await;
    let before = rig.store.stats();
    let fwd = Forwarder::start(config, rig.store.clone()).unwrap();
    c::eventually(LONG, "the cloud to receive everything", || {
        rig.arrivals.lock().unwrap().unique() == sent.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rig.store.stats();
    assert_eq!(during.queued(), 50, "nothing acknowledged, nothing deleted");
    for (b, d) in before.lanes.iter().zip(&during.lanes) {
        assert_eq!(b.cursor, d.cursor, "a cursor moved without a PUBACK");
    }
    proxy.set(|p| p.drop_pubacks = false);
    drained(&rig.store).await;
    // The second copies were acknowledged; the subscriber gets them just after.
    c::eventually(LONG, "every message sent again after the reconnect", || {
        let a = rig.arrivals.lock().unwrap();
        sent.iter()
            .all(|(id, _)| a.count.get(id).is_some_and(|n| *n >= 2))
    })
    .await;
    check_delivery(&sent, &rig.arrivals.lock().unwrap(), &[]);
    assert!(
        fwd.counters()
            .failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    fwd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_refused_messages_go_to_dead_letter_and_the_rest_flow() {
    let rig = Rig::new().await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().v5).await;
    proxy.set(|p| p.refuse_topic = Some("forbidden".into()));
    let mut config = rig.config(Protocol::V5);
    config.port = proxy.addr.port();
    config.max_packet_size = 4096;
    // All in lane 1, so the two bad ones sit in front of the good ones.
    let mut ids = Vec::new();
    for (topic, size) in [
        ("devices/bed-1/p1", 10),
        ("devices/bed-1/p1", 8000),
        ("devices/bed-1/forbidden", 10),
        ("devices/bed-1/p1", 10),
    ] {
        let mut m = message(1, 0);
        m.topic = topic.into();
        m.payload = Bytes::from(vec![b'a'; size]);
        ids.push(rig.store.append(m).await.unwrap().id.to_string());
    }
    let fwd = Forwarder::start(config, rig.store.clone()).unwrap();
    drained(&rig.store).await;
    c::eventually(LONG, "the good messages", || {
        let a = rig.arrivals.lock().unwrap();
        a.count.contains_key(&ids[0]) && a.count.contains_key(&ids[3])
    })
    .await;
    let dead = rig.store.dead_letters(None, 10).await.unwrap();
    let reasons: HashMap<String, String> = dead
        .iter()
        .map(|d| (d.body.event.id.to_string(), d.body.reason.clone()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[&ids[1]].contains("too large"), "{reasons:?}");
    assert!(reasons[&ids[2]].contains("0x87"), "{reasons:?}");
    // Counted once the store has moved it, just after the lane reads empty.
    c::eventually(LONG, "both dead letters counted", || {
        fwd.counters()
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    assert_eq!(
        fwd.counters()
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let by_reason: Vec<u64> = fwd
        .counters()
        .dead_lettered_by_reason
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(by_reason, [1, 1, 0], "refused, too_large, head_failures");
    fwd.stop().await.unwrap();
}

/// A cloud that announces a Maximum Packet Size in its MQTT 5 CONNACK smaller
/// than `forward.max_packet_size`: Vigil never sends it a bigger packet (the
/// cloud would close the connection, again at every reconnect); a message
/// too large for it goes to dead letter with the limit in its reason, and the
/// rest flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clouds_announced_maximum_packet_size_is_honoured() {
    const ANNOUNCED: u32 = 2048;
    let rig = Rig::new().await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().v5).await;
    proxy.set(|p| p.announce_max_packet = Some(ANNOUNCED));
    let mut config = rig.config(Protocol::V5);
    config.port = proxy.addr.port();
    assert!(
        config.max_packet_size > 4 * ANNOUNCED,
        "the announced limit is the smaller"
    );
    let mut ids = Vec::new();
    for size in [10, 1000, 3000, 10] {
        let mut m = message(1, 0);
        m.payload = Bytes::from(vec![b'a'; size]);
        ids.push(rig.store.append(m).await.unwrap().id.to_string());
    }
    let fwd = Forwarder::start(config, rig.store.clone()).unwrap();
    drained(&rig.store).await;
    c::eventually(LONG, "the messages that fit", || {
        let a = rig.arrivals.lock().unwrap();
        [0, 1, 3].iter().all(|i| a.count.contains_key(&ids[*i]))
    })
    .await;
    let dead = rig.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "only the 3,000-byte payload is too large");
    assert_eq!(dead[0].body.event.id.to_string(), ids[2]);
    let reason = &dead[0].body.reason;
    assert!(
        reason.contains("too large") && reason.contains(&ANNOUNCED.to_string()),
        "{reason}"
    );
    let (largest, published) = {
        let c = proxy.control.lock().unwrap();
        (c.largest_publish, c.published.len())
    };
    assert!(published >= 3, "{published} publishes");
    assert!(
        largest <= ANNOUNCED as usize && largest > 1336,
        "the largest publish was {largest} bytes, the cloud announced {ANNOUNCED}"
    );
    assert!(!rig.arrivals.lock().unwrap().count.contains_key(&ids[2]));
    fwd.stop().await.unwrap();
}

/// Starts a forwarder that cannot connect, waits for the explanation, checks
/// the messages are still buffered, and stops it.
async fn fails_with(rig: &Rig, config: ForwardConfig, needle: &str) -> Forwarder {
    let fwd = Forwarder::start(config, rig.store.clone()).unwrap();
    let mut err = fwd.last_error();
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        err.wait_for(|e| e.as_deref().is_some_and(|e| e.contains(needle))),
    )
    .await
    .map(|_| ());
    let last = fwd.last_error().borrow().clone();
    assert!(
        got.is_ok(),
        "expected an error containing {needle:?}, last: {last:?}"
    );
    assert_eq!(*fwd.link_state().borrow(), LinkState::Offline);
    eprintln!("explained: {}", last.unwrap_or_default());
    fwd
}

/// A cloud that checks a user name and password (the proxy plays that part,
/// answering a wrong login with the spec's CONNACK refusal): Vigil sends
/// `forward.username` and the password file's content, says what a refusal
/// means while it keeps buffering, and uses a rotated password file on its
/// next attempt, without a restart, losing nothing.
async fn a_login_is_sent_and_a_refused_one_is_explained(protocol: Protocol) {
    let rig = Rig::new().await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().addr(protocol)).await;
    proxy.set(|p| p.require_login = Some(("ward-3".into(), "correct horse".into())));
    let password = rig.pki.path("cloud.pass");
    common::gate::write_private(&password, "battery staple\n");
    let mut config = rig.config(protocol);
    config.port = proxy.addr.port();
    config.username = Some("ward-3".into());
    config.password_file = Some(password.clone());
    let mut sent = append(&rig.store, 20, 0).await;
    let fwd = fails_with(&rig, config, "refused Vigil's user name or password").await;
    sent.extend(append(&rig.store, 5, 20).await);
    assert_eq!(rig.store.stats().queued(), 25, "still buffering");
    common::gate::write_private(&password, "correct horse\n");
    drained(&rig.store).await;
    c::eventually(LONG, "every message at the subscriber", || {
        rig.arrivals.lock().unwrap().unique() == sent.len()
    })
    .await;
    check_delivery(&sent, &rig.arrivals.lock().unwrap(), &[]);
    let logins = proxy.control.lock().unwrap().logins.clone();
    let login = |p: &str| (Some("ward-3".to_string()), Some(p.to_string()));
    assert!(logins.contains(&login("battery staple")), "{logins:?}");
    assert_eq!(logins.last(), Some(&login("correct horse")), "{logins:?}");
    fwd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_is_sent_and_a_refused_one_is_explained_mqtt5() {
    a_login_is_sent_and_a_refused_one_is_explained(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_is_sent_and_a_refused_one_is_explained_mqtt311() {
    a_login_is_sent_and_a_refused_one_is_explained(Protocol::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_failures_are_explained_while_vigil_keeps_buffering() {
    let rig = Rig::new().await;
    let mut sent = append(&rig.store, 20, 0).await;
    let good = rig.config(Protocol::V5);

    // Wrong CA: fixed in place, picked up without a restart.
    let other = common::gate::Pki::new();
    let mut wrong_ca = good.clone();
    wrong_ca.tls.ca = other.path("ca.pem");
    let fwd = fails_with(&rig, wrong_ca, "not signed by a CA in forward.tls.ca").await;
    sent.extend(append(&rig.store, 5, 20).await);
    assert_eq!(rig.store.stats().queued(), 25, "still buffering");
    std::fs::copy(rig.pki.path("ca.pem"), other.path("ca.pem")).unwrap();
    drained(&rig.store).await;
    fwd.stop().await.unwrap();

    // Hostname mismatch.
    sent.extend(append(&rig.store, 5, 25).await);
    let mut mismatch = good.clone();
    mismatch.tls.server_name = Some("cloud.example.org".into());
    fails_with(&rig, mismatch, "not valid for the name")
        .await
        .stop()
        .await
        .unwrap();

    // No client certificate.
    let mut anonymous = good.clone();
    anonymous.tls.cert = None;
    anonymous.tls.key = None;
    fails_with(&rig, anonymous, "requires a client certificate")
        .await
        .stop()
        .await
        .unwrap();

    // Vigil's own certificate expired.
    let (cert, key) = rig.pki.expired_leaf("vigil", false);
    std::fs::write(rig.pki.path("old.pem"), cert).unwrap();
    common::gate::write_private(&rig.pki.path("old.key"), &key);
    let mut expired = good.clone();
    expired.tls.cert = Some(rig.pki.path("old.pem"));
    expired.tls.key = Some(rig.pki.path("old.key"));
    fails_with(&rig, expired, "client certificate expired")
        .await
        .stop()
        .await
        .unwrap();

    // The cloud's certificate expired.
    let stale_dir = c::cloud_dir(&rig.pki, "stale-cloud");
    let (cert, key) = rig.pki.expired_leaf("127.0.0.1", true);
    std::fs::write(stale_dir.join("server.pem"), cert).unwrap();
    common::gate::write_private(&stale_dir.join("server.key"), &key);
    let stale = Cloud::start(&stale_dir);
    let mut stale_config = good.clone();
    stale_config.port = stale.v5.port();
    fails_with(&rig, stale_config, "the cloud's certificate has expired")
        .await
        .stop()
        .await
        .unwrap();

    // C4: the cloud presents a client certificate (wrong extended key usage).
    let eku_dir = c::cloud_dir(&rig.pki, "eku-cloud");
    let (cert, key) = rig.pki.leaf("127.0.0.1", false);
    std::fs::write(eku_dir.join("server.pem"), cert).unwrap();
    common::gate::write_private(&eku_dir.join("server.key"), &key);
    let eku = Cloud::start(&eku_dir);
    let mut eku_config = good.clone();
    eku_config.port = eku.v5.port();
    fails_with(&rig, eku_config, "not a TLS server certificate")
        .await
        .stop()
        .await
        .unwrap();

    // C7: the cloud's certificate comes from an intermediate CA the cloud
    // does not send.
    let chain_dir = c::cloud_dir(&rig.pki, "chain-cloud");
    let (leaf, _intermediate, key) = rig.pki.leaf_via_intermediate("127.0.0.1");
    std::fs::write(chain_dir.join("server.pem"), leaf).unwrap();
    common::gate::write_private(&chain_dir.join("server.key"), &key);
    let chain = Cloud::start(&chain_dir);
    let mut chain_config = good.clone();
    chain_config.port = chain.v5.port();
    fails_with(&rig, chain_config, "intermediate certificates")
        .await
        .stop()
        .await
        .unwrap();

    // C8: the cloud's certificate is revoked, and forward.tls.crl says so.
    let revoked_dir = c::cloud_dir(&rig.pki, "revoked-cloud");
    let (cert, key) = rig.pki.leaf_with_serial("127.0.0.1", true, 4242);
    std::fs::write(revoked_dir.join("server.pem"), cert).unwrap();
    common::gate::write_private(&revoked_dir.join("server.key"), &key);
    let revoked = Cloud::start(&revoked_dir);
    std::fs::write(rig.pki.path("crl.pem"), rig.pki.crl_revoking(&[4242])).unwrap();
    let mut revoked_config = good.clone();
    revoked_config.port = revoked.v5.port();
    revoked_config.tls.crl = Some(rig.pki.path("crl.pem"));
    fails_with(&rig, revoked_config, "has been revoked")
        .await
        .stop()
        .await
        .unwrap();

    // A key file others can read is refused.
    let mut open_key = good.clone();
    std::fs::copy(rig.pki.path("vigil.key"), rig.pki.path("open.key")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            rig.pki.path("open.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    open_key.tls.key = Some(rig.pki.path("open.key"));
    fails_with(&rig, open_key, "chmod 600")
        .await
        .stop()
        .await
        .unwrap();

    assert_eq!(rig.store.stats().queued(), 5, "nothing lost while failing");
    // Configuration fixed: everything goes.
    let fwd = Forwarder::start(good, rig.store.clone()).unwrap();
    drained(&rig.store).await;
    c::eventually(LONG, "all at the subscriber", || {
        rig.arrivals.lock().unwrap().unique() == sent.len()
    })
    .await;
    check_delivery(&sent, &rig.arrivals.lock().unwrap(), &[]);
    fwd.stop().await.unwrap();
}
