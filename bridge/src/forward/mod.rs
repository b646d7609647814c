//! Forward: stored messages to the cloud over mutual-TLS MQTT at QoS 1,
//! deleted from the store only on the cloud's PUBACK.
//!
//! One task (the driver, here) owns the rumqttc client and event loop
//! ([`uplink`]); the in-flight window, packet ids and replay rules are plain
//! state in [`session`]. The loop:
//!
//! 1. Connect (TLS files and the password file re-read each time, [`tls`],
//!    [`login`]); on CONNACK the window is
//!    capped by the cloud's Receive Maximum and envelopes by its Maximum
//!    Packet Size (MQTT 5).
//! 2. Fill the window in strict priority order: lane 0 until it is empty,
//!    then lane 1, ...; FIFO within a lane. Each event is wrapped in the
//!    [`envelope`] and published at QoS 1 to `<topic_prefix>/<device topic>`.
//!    One too large for the cloud goes to dead-letter instead.
//! 3. On each PUBACK the message is deleted from the store (acks are batched;
//!    a lane's cursor only ever passes acknowledged messages). An MQTT 5
//!    refusal (reason >= 0x80) sends it to dead-letter.
//! 4. On any connection error, or no PUBACK within `ack_timeout`: the whole
//!    rumqttc client is dropped (its pending queue, stale events and collision
//!    state with it), the session forgets what was in flight, and after an
//!    exponential backoff with jitter a new connection replays every lane from
//!    the store's cursor. So a fault costs at most one window of duplicates.
//!    A message at the head of the window while the cloud closed
//!    `max_head_failures` connections in a row goes to dead-letter.
//!
//! The link state ([`crate::state`]) is published on a watch channel and its
//! changes logged (online ↔ syncing flips after the first catch-up at debug
//! level only); the last connection error, explained, on another.

pub mod config;
pub mod envelope;
pub mod login;
pub mod session;
pub mod tls;
pub mod uplink;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::config::{ForwardConfig, Protocol};
use self::session::{AckOutcome, InFlight, Session};
use self::uplink::{Failure, Happened, Publisher};
use crate::state::{IllegalTransition, LinkState, StateMachine};
use crate::store::{Store, StoreError, StoredEvent};

/// Most events read from the store at once (and so most read ahead per lane).
const READ_BATCH: usize = 256;
/// Acknowledged seqs collected before they are deleted in one store call.
const ACK_BATCH: usize = 256;

/// Why the forwarder cannot start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `[forward]` settings are unusable; every problem is listed.
    #[error("invalid [forward] configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// The store failed (read, ack or dead-letter): forwarding stops, nothing
    /// is deleted that the cloud did not acknowledge.
    #[error("the store failed while forwarding: {0}")]
    Store(#[from] StoreError),
    /// A bug: the link state machine refused a transition.
    #[error(transparent)]
    State(#[from] IllegalTransition),
    /// The forwarder task panicked or was aborted.
    #[error("the forwarder task ended abnormally: {0}")]
    Task(String),
}

/// Counters since the forwarder started.
#[derive(Debug)]
pub struct ForwardCounters {
    /// Publishes handed to the cloud connection (resends included).
    pub published: AtomicU64,
    /// Messages the cloud acknowledged and the store deleted.
    pub delivered: AtomicU64,
    /// Messages moved to dead-letter (refused, too large, or poison).
    pub dead_lettered: AtomicU64,
    /// The same, by [`DeadLetterReason`] (indexed by `reason as usize`).
    pub dead_lettered_by_reason: [AtomicU64; DeadLetterReason::ALL.len()],
    /// Connections that reached CONNACK.
    pub connections: AtomicU64,
    /// Connection attempts or connections that failed.
    pub failures: AtomicU64,
    /// Publishes in flight now (a gauge).
    pub in_flight: AtomicU64,
    /// When the last PUBACK arrived (microseconds since the Unix epoch; 0:
    /// never).
    pub last_ack_micros: AtomicU64,
    /// For each message the cloud acknowledged: seconds from the gate reading
    /// it to the cloud's PUBACK (a backlog's messages count their time queued).
    /// Wall-clock based: a clock stepped back counts as 0.
    pub delivery_seconds: Histogram,
    /// For each publish written to the cloud connection (resends included):
    /// seconds from the gate reading the message to then. Vigil's own share
    /// of a delivery, without the network and the cloud.
    pub sent_seconds: Histogram,
}

impl Default for ForwardCounters {
    fn default() -> Self {
        Self {
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            dead_lettered_by_reason: Default::default(),
            connections: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_ack_micros: AtomicU64::new(0),
            // 100 µs to about 55 min in powers of two.
            delivery_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 26)),
            sent_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 26)),
        }
    }
}

/// Wall-clock seconds from `at` to `now`; 0 if the clock was stepped back
/// in between.
fn seconds_between(at: crate::event::Timestamp, now: crate::event::Timestamp) -> f64 {
    let micros = now.0.saturating_sub(at.0).max(0);
    micros as f64 / 1e6
}

/// Why the forwarder moved a message to dead-letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// An MQTT 5 PUBACK with a reason code of 0x80 or above.
    Refused = 0,
    /// The envelope exceeds the cloud's maximum packet size.
    TooLarge = 1,
    /// The cloud closed `max_head_failures` connections in a row while the
    /// message headed the window.
    HeadFailures = 2,
}

impl DeadLetterReason {
    /// Every reason, in index order.
    pub const ALL: [DeadLetterReason; 3] = [Self::Refused, Self::TooLarge, Self::HeadFailures];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::TooLarge => "too_large",
            Self::HeadFailures => "head_failures",
        }
    }
}

/// A running forwarder.
#[derive(Debug)]
pub struct Forwarder {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ForwardError>>,
    link: watch::Receiver<LinkState>,
    last_error: watch::Receiver<Option<String>>,
    counters: Arc<ForwardCounters>,
}

impl Forwarder {
    /// Checks the configuration and starts forwarding from `store`. Certificate
    /// files are read on each connection attempt, so a bad one is reported
    /// (on [`Forwarder::last_error`] and in the log) while messages keep
    /// being stored.
    pub fn start(config: ForwardConfig, store: Store) -> Result<Self, ForwardError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ForwardError::Config(problems));
        }
        if let Some(refused) = config.negative_control_refused(!cfg!(debug_assertions)) {
            return Err(ForwardError::Config(vec![refused]));
        }
        if config.testing_only_delete_on_send {
            tracing::error!(
                "forward.testing_only_delete_on_send is ON: messages are deleted when sent, not \
                 when the cloud acknowledges them. THIS VIGIL LOSES DATA ON EVERY FAULT. It exists \
                 only to test the loss oracle"
            );
        }
        if config.tls.cert.is_none() {
            tracing::warn!(
                "forward.tls.cert is not set: connecting to the cloud without a client certificate"
            );
        }
        let state = StateMachine::new();
        let link = state.subscribe();
        let (error_tx, last_error) = watch::channel(None);
        let counters = Arc::new(ForwardCounters::default());
        let cancel = CancellationToken::new();
        let lanes = store.priorities();
        let driver = Driver {
            session: Session::new(lanes, config.window(), config.max_head_failures),
            max_packet: config.max_packet_size as usize,
            appends: store.appends(),
            exhausted: vec![None; usize::from(lanes)],
            prefetched: vec![VecDeque::new(); usize::from(lanes)],
            acked: vec![Vec::new(); usize::from(lanes)],
            acks_pending: 0,
            deleting: None,
            lanes,
            config,
            store,
            state,
            last_error: error_tx,
            counters: counters.clone(),
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(driver.run());
        Ok(Self {
            cancel,
            task,
            link,
            last_error,
            counters,
        })
    }

    /// The link state, for health checks and metrics.
    pub fn link_state(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    /// The last connection failure, explained; `None` once connected.
    pub fn last_error(&self) -> watch::Receiver<Option<String>> {
        self.last_error.clone()
    }

    /// Counters since start (shared: they keep counting).
    pub fn counters(&self) -> Arc<ForwardCounters> {
        self.counters.clone()
    }

    /// Whether the driver has stopped (only on a store failure or `stop`).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops: the connection is dropped, acknowledged messages are deleted,
    /// and everything unacknowledged stays in the store for next time.
    pub async fn stop(self) -> Result<(), ForwardError> {
        self.cancel.cancel();
        self.task
            .await
            .map_err(|e| ForwardError::Task(e.to_string()))?
    }
}

/// How one connection ended.
enum Ended {
    Shutdown,
    Failed {
        failure: Failure,
        /// The cloud (not a timeout, not Vigil) ended a connection that was
        /// up: counted against the message at the head of the window.
        blame_head: bool,
        /// At least one PUBACK arrived on it: the backoff starts over.
        progressed: bool,
    },
}

struct Driver {
    config: ForwardConfig,
    store: Store,
    session: Session,
    state: StateMachine,
    last_error: watch::Sender<Option<String>>,
    counters: Arc<ForwardCounters>,
    cancel: CancellationToken,
    appends: watch::Receiver<u64>,
    /// Per lane: the append signal's value when a read found the lane empty.
    exhausted: Vec<Option<u64>>,
    /// Per lane: events read from the store and not yet handed to the client,
    /// in seq order, all after the session's `read_after` (at most one read
    /// batch; only the lane being sent from keeps any).
    prefetched: Vec<VecDeque<StoredEvent>>,
    /// Per lane: acknowledged seqs not yet deleted.
    acked: Vec<Vec<u64>>,
    acks_pending: usize,
    /// The deletion of acknowledged messages in progress (at most one).
    deleting: Option<JoinHandle<Result<(), StoreError>>>,
    /// Largest packet allowed on this connection.
    max_packet: usize,
    lanes: u8,
}

impl Driver {
    async fn run(mut self) -> Result<(), ForwardError> {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let result = loop {
            let ended = match self.connection().await {
                Ok(ended) => ended,
                Err(e) => break Err(e),
            };
            self.prefetched.iter_mut().for_each(VecDeque::clear);
            if let Err(e) = self.finish_acks().await {
                break Err(e);
            }
            if let Err(e) = self.state.set(LinkState::Offline) {
                break Err(e.into());
            }
            let Ended::Failed {
                failure,
                blame_head,
                progressed,
            } = ended
            else {
                self.session.connection_lost(false);
                break Ok(());
            };
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            let explained = tls::explain(&failure.text, &failure.debug);
            for head in self.session.connection_lost(blame_head) {
                let reason = format!(
                    "the cloud closed {} connections in a row while this message headed \
                     priority {}; last error: {explained}",
                    self.config.max_head_failures, head.priority
                );
                self.dead_letter(head, DeadLetterReason::HeadFailures, reason)
                    .await?;
            }
            if progressed {
                backoff.reset();
            }
            let delay = backoff.next();
            tracing::warn!(
                host = %self.config.host,
                port = self.config.port,
                retry_in = ?delay,
                queued = self.store.stats().queued(),
                "cloud connection failed; messages stay in the store: {explained}"
            );
            self.last_error.send_replace(Some(explained));
            tokio::select! {
                _ = self.cancel.cancelled() => break Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        let flushed = self.finish_acks().await;
        result.and(flushed)
    }

    /// One connection attempt, from TLS set-up to its end.
    async fn connection(&mut self) -> Result<Ended, ForwardError> {
        // A file that cannot be used fails the attempt before any byte is
        // sent; the message names the setting and the fix.
        let not_sent = |text: String| Ended::Failed {
            failure: Failure {
                text,
                debug: String::new(),
                timeout: false,
            },
            blame_head: false,
            progressed: false,
        };
        let tls = match tls::client_config(&self.config.tls, &self.config.host) {
            Ok(tls) => tls,
            Err(e) => return Ok(not_sent(e.to_string())),
        };
        let login = match login::load(&self.config) {
            Ok(login) => login,
            Err(e) => return Ok(not_sent(e.to_string())),
        };
        let (publisher, mut events) = uplink::connect(&self.config, tls, login);
        let mut connected = false;
        let mut progressed = false;
        let mut last_progress = Instant::now();
        // Half-open detection: the last packet heard from the cloud, and
        // whether a PINGREQ is unanswered. With anything outstanding, 1.5
        // keep-alives of silence mean the connection is dead even though TCP
        // has not noticed (rumqttc alone takes up to two keep-alives idle,
        // and never notices while publishes keep its own timer busy).
        let silence_limit = self.config.keep_alive.max(Duration::from_secs(5)) * 3 / 2;
        let mut last_heard = Instant::now();
        let mut ping_outstanding = false;
        // Built once, not for every event: each turn of the loop handles one
        // event (two per message: its publish written, its PUBACK), and
        // building the shutdown future and two timers every time cost the
        // drain a timer-wheel insert and removal each. The two checks share
        // one timer, armed at the earliest deadline and moved only when a
        // deadline comes before it (while a connection lasts they only move
        // later); when it fires early the deadlines are looked at again.
        let cancel = self.cancel.clone();
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let check = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
        tokio::pin!(check);
        let mut armed: Option<Instant> = None;
        loop {
            if connected {
                let before = self.session.in_flight();
                self.fill(&publisher).await?;
                if before == 0 && self.session.in_flight() > 0 {
                    last_progress = Instant::now();
                }
                self.state.set(if self.caught_up() {
                    LinkState::Online
                } else {
                    LinkState::Syncing
                })?;
            }
            self.counters
                .in_flight
                .store(self.session.in_flight() as u64, Ordering::Relaxed);
            let hungry = connected && self.wants_more();
            let waiting = connected && self.session.in_flight() > 0;
            let deadline = last_progress + self.config.ack_timeout;
            let silent_at = last_heard + silence_limit;
            let listening = connected && (ping_outstanding || self.session.in_flight() > 0);
            let due = [listening.then_some(silent_at), waiting.then_some(deadline)]
                .into_iter()
                .flatten()
                .min();
            if let Some(due) = due
                && armed.is_none_or(|at| at > due)
            {
                check.as_mut().reset(due);
                armed = Some(due);
            }
            // poll() is raced against shutdown, the ack timeout (after both
            // this event loop is dropped) and the append signal while the
            // window has room. rumqttc keeps its state across a cancelled
            // poll (events queued in `state.events`, bytes in the framed
            // buffer); the one cost is a publish left unflushed if the
            // cancel lands mid-flush, and the wake-up is always followed by
            // new publishes whose flush sends it (keep-alive and the ack
            // timeout are the backstops). `notes/libraries.md` 2.5.
            let happened = tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(Ended::Shutdown),
                r = events.poll() => r,
                _ = self.appends.changed(), if hungry => continue,
                _ = &mut check, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    let text = if listening && now >= silent_at {
                        format!(
                            "the cloud sent nothing for {silence_limit:?} (1.5 keep-alives) \
                             with {} messages in flight{}: the connection is half-open; \
                             reconnecting",
                            self.session.in_flight(),
                            if ping_outstanding { " and a ping unanswered" } else { "" }
                        )
                    } else if waiting && now >= deadline {
                        format!(
                            "no PUBACK for {:?} with {} messages in flight; reconnecting \
                             to send them again",
                            self.config.ack_timeout,
                            self.session.in_flight()
                        )
                    } else {
                        // Fired for a deadline that has since moved on.
                        continue;
                    };
                    // A timeout: the head of the window is not blamed.
                    Err(Failure { text, debug: String::new(), timeout: true })
                }
            };
            match happened {
                Err(failure) => {
                    return Ok(Ended::Failed {
                        blame_head: connected && !failure.timeout,
                        failure,
                        progressed,
                    });
                }
                Ok(Happened::Connected {
                    receive_max,
                    max_packet_size,
                }) => {
                    connected = true;
                    last_progress = Instant::now();
                    last_heard = Instant::now();
                    self.session.connected(receive_max);
                    // Every lane is read again from its cursor.
                    self.exhausted.fill(None);
                    self.prefetched.iter_mut().for_each(VecDeque::clear);
                    let configured = self.config.max_packet_size;
                    self.max_packet =
                        max_packet_size.map_or(configured, |m| m.min(configured)) as usize;
                    self.counters.connections.fetch_add(1, Ordering::Relaxed);
                    self.last_error.send_replace(None);
                    self.state.set(LinkState::Syncing)?;
                    tracing::info!(
                        host = %self.config.host,
                        window = self.session.window(),
                        max_packet = self.max_packet,
                        queued = self.store.stats().queued(),
                        "connected to the cloud"
                    );
                }
                Ok(Happened::Published(pkid)) => {
                    if let Some(m) = self.session.outgoing(pkid) {
                        self.counters.published.fetch_add(1, Ordering::Relaxed);
                        self.counters.sent_seconds.observe(seconds_between(
                            m.received_at,
                            crate::event::Timestamp::now(),
                        ));
                        // Compiled out of release builds (refused by
                        // `start` there).
                        if cfg!(debug_assertions) && self.config.testing_only_delete_on_send {
                            // The deliberate bug: forget it before the PUBACK.
                            self.session.withdraw(m);
                            self.ack(m).await?;
                        }
                    }
                }
                Ok(Happened::PubAck { pkid, reason }) => {
                    last_progress = Instant::now();
                    last_heard = last_progress;
                    // One wall-clock reading per PUBACK, for both figures.
                    let now = crate::event::Timestamp::now();
                    self.counters
                        .last_ack_micros
                        .store(u64::try_from(now.0).unwrap_or(0), Ordering::Relaxed);
                    match self.session.puback(pkid, reason) {
                        AckOutcome::Delivered(m) => {
                            progressed = true;
                            self.counters
                                .delivery_seconds
                                .observe(seconds_between(m.received_at, now));
                            self.ack(m).await?;
                        }
                        AckOutcome::Refused(m, code) => {
                            progressed = true;
                            let reason = format!(
                                "the cloud refused it: PUBACK reason code 0x{code:02x} ({})",
                                uplink::reason_name(code)
                            );
                            self.dead_letter(m, DeadLetterReason::Refused, reason)
                                .await?;
                        }
                        AckOutcome::Unknown(pkid) => {
                            tracing::debug!(pkid, "PUBACK for a packet id not in flight");
                        }
                    }
                }
                // rumqttc pings one keep-alive after the last packet it
                // sent; the PINGRESP then has half a keep-alive before the
                // silence limit, counted from the last packet heard.
                Ok(Happened::PingSent) => ping_outstanding = true,
                Ok(Happened::Heard) => {
                    last_heard = Instant::now();
                    ping_outstanding = false;
                }
                Ok(Happened::Other) => {}
            }
        }
    }

    /// Whether everything stored has been sent and acknowledged.
    fn caught_up(&self) -> bool {
        let current = *self.appends.borrow();
        self.session.in_flight() == 0 && self.exhausted.iter().all(|e| *e == Some(current))
    }

    /// Whether the window has room. It is refilled as soon as any slot is
    /// free, not in batches: a cloud that leaves Nagle's algorithm on (rumqttd,
    /// Mosquitto's default) holds its next PUBACKs until Vigil's TCP ACKs the
    /// last one, and Vigil's kernel delays that ACK (40 ms) unless a publish
    /// goes out to carry it. Waiting for half the window to free up stalled
    /// every few windows for 40 ms and capped a 64-message window at about
    /// 6,000 msg/s. Store reads stay batched through `prefetched`.
    fn wants_more(&self) -> bool {
        self.session.room() > 0
    }

    /// Hands stored messages to the client, highest priority first, while the
    /// window has room. Reads the store a batch at a time into `prefetched`
    /// and hands messages over from there one by one.
    async fn fill(&mut self, publisher: &Publisher) -> Result<(), ForwardError> {
        // A whole read batch even when the window is smaller: each read is a
        // round trip to a blocking thread, and the driver waits for it.
        let read_batch = READ_BATCH;
        for lane in 0..self.lanes {
            let slot = usize::from(lane);
            loop {
                if self.session.room() == 0 {
                    return Ok(());
                }
                let next = self.prefetched.get_mut(slot).and_then(VecDeque::pop_front);
                if let Some(stored) = next {
                    if !self.hand_over(publisher, lane, stored).await? {
                        return Ok(());
                    }
                    // Lower lanes wait behind this one: what they read ahead
                    // would only grow stale (evicted, say) meanwhile.
                    for lower in self.prefetched.iter_mut().skip(slot + 1) {
                        lower.clear();
                    }
                    continue;
                }
                let generation = *self.appends.borrow_and_update();
                if self.exhausted.get(slot).copied().flatten() == Some(generation) {
                    break;
                }
                // Nothing read ahead: read on from the last message handed over.
                let events = self
                    .store
                    .read(lane, self.session.read_after(lane), read_batch)
                    .await?;
                if events.len() < read_batch
                    && let Some(e) = self.exhausted.get_mut(slot)
                {
                    *e = Some(generation);
                }
                if events.is_empty() {
                    break;
                }
                if let Some(buffer) = self.prefetched.get_mut(slot) {
                    buffer.extend(events);
                }
            }
        }
        Ok(())
    }

    /// Publishes one stored message (or moves it to dead-letter if it is too
    /// large for the cloud). False if the client would not take it: it is not
    /// marked as sent, so it is read again on the next fill.
    async fn hand_over(
        &mut self,
        publisher: &Publisher,
        lane: u8,
        stored: StoredEvent,
    ) -> Result<bool, ForwardError> {
        let m = InFlight {
            priority: lane,
            seq: stored.seq,
            received_at: stored.body.received_at,
        };
        let body = envelope::encode(&stored.body);
        let topic = format!("{}/{}", self.config.topic_prefix, stored.body.topic);
        let size = packet_size(self.config.protocol, &topic, body.len());
        if size > self.max_packet {
            let reason = format!(
                "too large for the cloud: a {size}-byte packet, the limit is {} \
                 (forward.max_packet_size, or what the cloud announced)",
                self.max_packet
            );
            self.dead_letter(m, DeadLetterReason::TooLarge, reason)
                .await?;
            return Ok(true);
        }
        if let Err(f) = publisher.publish(topic, body) {
            // Not expected: the request channel holds the window. What was
            // read ahead is dropped, so the next fill reads from the last
            // message handed over.
            tracing::warn!(error = %f.text, "could not hand a publish to the client");
            self.prefetched.iter_mut().for_each(VecDeque::clear);
            return Ok(false);
        }
        self.session.sent(m);
        Ok(true)
    }

    /// Records a delivery; deletes a batch of them from the store when enough
    /// have gathered or nothing else is in flight.
    async fn ack(&mut self, m: InFlight) -> Result<(), ForwardError> {
        if let Some(lane) = self.acked.get_mut(usize::from(m.priority)) {
            lane.push(m.seq);
            self.acks_pending += 1;
        }
        if self.acks_pending >= ACK_BATCH || self.session.in_flight() == 0 {
            self.flush_acks().await?;
        }
        Ok(())
    }

    /// Starts deleting the acknowledged messages gathered so far, in the
    /// background: the driver goes on publishing and reading PUBACKs while
    /// the store commits. At most one such deletion runs at a time (the
    /// previous one is awaited first), so acks are applied in order and
    /// nothing piles up.
    async fn flush_acks(&mut self) -> Result<(), ForwardError> {
        self.settle_acks().await?;
        let mut batch = Vec::new();
        for lane in 0..self.lanes {
            if let Some(pending) = self.acked.get_mut(usize::from(lane))
                && !pending.is_empty()
            {
                batch.push((lane, std::mem::take(pending)));
            }
        }
        self.acks_pending = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let counters = self.counters.clone();
        self.deleting = Some(tokio::spawn(async move {
            for (lane, seqs) in batch {
                let report = store.ack(lane, seqs).await?;
                counters
                    .delivered
                    .fetch_add(report.deleted, Ordering::Relaxed);
            }
            Ok(())
        }));
        Ok(())
    }

    /// Waits for the deletion in progress, if any. Before a lane is read from
    /// its cursor again (a new connection) every acknowledged message must be
    /// gone from the store, or it would be sent again.
    async fn settle_acks(&mut self) -> Result<(), ForwardError> {
        if let Some(job) = self.deleting.take() {
            job.await.map_err(|e| ForwardError::Task(e.to_string()))??;
        }
        Ok(())
    }

    /// Deletes every acknowledged message now and waits until it is done.
    async fn finish_acks(&mut self) -> Result<(), ForwardError> {
        self.flush_acks().await?;
        self.settle_acks().await
    }

    async fn dead_letter(
        &mut self,
        m: InFlight,
        why: DeadLetterReason,
        reason: String,
    ) -> Result<(), ForwardError> {
        self.session.withdraw(m);
        tracing::warn!(
            priority = m.priority,
            seq = m.seq,
            reason = %reason,
            "message moved to dead-letter; the rest of its lane goes on"
        );
        if self
            .store
            .dead_letter(m.priority, m.seq, reason)
            .await?
            .is_some()
        {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = self.counters.dead_lettered_by_reason.get(why as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Upper bound of the PUBLISH packet's size: fixed header (at most 5 bytes),
/// topic, packet id, MQTT 5 property length, payload.
fn packet_size(protocol: Protocol, topic: &str, payload: usize) -> usize {
    let properties = match protocol {
        Protocol::V311 => 0,
        Protocol::V5 => 1,
    };
    5 + 2 + topic.len() + 2 + properties + payload
}

/// Exponential backoff with up to 25 % random jitter, capped.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut bytes = [0u8; 4];
        let jitter = match getrandom::fill(&mut bytes) {
            Ok(()) => u32::from_le_bytes(bytes) as f64 / u32::MAX as f64,
            Err(_) => 0.5,
        };
        base.mul_f64(1.0 + 0.25 * jitter)
            .min(self.max.mul_f64(1.25))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let mut b = Backoff::new(min, max);
        let seen: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        for (i, d) in seen.iter().enumerate() {
            let base = (min * 2u32.pow(i as u32)).min(max);
            assert!(*d >= base && *d <= base.mul_f64(1.25), "{i}: {d:?}");
        }
        b.reset();
        assert!(b.next() <= min.mul_f64(1.25));
    }

    #[test]
    fn packet_size_bounds_the_encoding() {
        // A real encoding of a 100-byte payload on "a/b" is 2 + 2 + 3 + 2 + 100.
        assert!(packet_size(Protocol::V311, "a/b", 100) >= 109);
        assert_eq!(
            packet_size(Protocol::V5, "a/b", 100),
            packet_size(Protocol::V311, "a/b", 100) + 1
        );
    }
}
