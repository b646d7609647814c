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
use vigil::event::{Ingest, Kind, Qos, Timestamp};
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
    let payload = if i % 2 == 0 {
        Bytes::from(format!("{{\"i\":{i},\"hr\":72}}"))
    } else {
        Bytes::from(vec![0xff, (i % 251) as u8, 0, b'x'])
    };
    Ingest {
        kind: if priority == 0 {
            Kind::Alert
        } else {
            Kind::Measurement
        },
        priority,
        device: "bed-1".into(),
        topic: format!("devices/bed-1/p{priority}"),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at: Timestamp::now(),
        content_type: None,
        user_properties: Vec::new(),
        payload,
    }
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
            assert!(prev < k, "priority {} reordered: {prev} then {k}", r.priority);
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
        self.subscriber =
            Some(Subscriber::start(&self.pki, cloud.v4, self.arrivals.clone()).await);
        self.cloud = Some(cloud);
    }
}

async fn deliver_in_priority_order(protocol: Protocol) {
    let rig = Rig::new().await;
    // A backlog before the forwarder starts, so strict priority shows.
    let mut sent = append(&rig.store, 300, 0).await;
    let proxy = Proxy::start(&rig.pki, rig.cloud().addr(protocol)).await;
    let mut config = rig.config(protocol);
    config.port = proxy.addr.port();
    config.window = 16;
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
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "not in priority order: {order:?}");
    let mut link = fwd.link_state();
    tokio::time::timeout(LONG, link.wait_for(|s| *s == LinkState::Online))
        .await
        .unwrap()
        .unwrap();
    let counters = fwd.counters();
    assert_eq!(
        counters.delivered.load(std::sync::atomic::Ordering::Relaxed),
        sent.len() as u64
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
