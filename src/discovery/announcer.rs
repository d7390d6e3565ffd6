//! The sending side: a node's heartbeat, every interval ±10 % (jitter keeps
//! a fleet that booted together from sending in lockstep), to each target.
//! A state change is sent at once rather than at the next tick, so a
//! balancer stops sending new connections to a draining node within a
//! round trip.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::token::Token;
use super::unix_ms;
use super::wire::{self, EncodeError, Heartbeat, NodeState, Service};
use crate::logging::RateLimit;

/// `leave()` sends this many `leaving` datagrams: UDP may lose one.
pub const LEAVE_REPEATS: u32 = 3;
const LEAVE_SPACING: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct AnnouncerOptions {
    pub cluster: String,
    pub node: String,
    /// Advertised address; `None` lets receivers use the source address.
    pub addr: Option<IpAddr>,
    pub weight: u16,
    pub services: Vec<Service>,
    /// Broadcast (255.255.255.255:6155 or a subnet's), multicast group or
    /// unicast balancer addresses, in any mix.
    pub targets: Vec<SocketAddr>,
    pub interval: Duration,
    /// The state of the first heartbeat.
    pub state: NodeState,
    pub token: Token,
}

#[derive(Debug, thiserror::Error)]
pub enum AnnouncerError {
    #[error(transparent)]
    Invalid(#[from] EncodeError),
    #[error("no targets to send heartbeats to")]
    NoTargets,
    #[error("interval must be more than zero")]
    ZeroInterval,
    #[error("random boot id: the operating system's random generator failed")]
    Random,
    #[error("heartbeat socket: {0}")]
    Io(#[from] std::io::Error),
}

struct Shared {
    /// Everything but sequence and sent-at, which each send fills in.
    heartbeat: Mutex<Heartbeat>,
    seq: AtomicU64,
    sent: AtomicU64,
    token: Token,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    targets: Vec<SocketAddr>,
    interval: Duration,
    wake: Notify,
    errors_log: RateLimit,
}

/// A running announcer. Dropping it stops the heartbeats silently (the
/// node then expires after miss_limit × interval); `leave()` says goodbye.
pub struct Announcer {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Announcer {
    /// Check the heartbeat against the format's limits, open the sockets
    /// and send the first heartbeat right away.
    pub fn start(opts: AnnouncerOptions) -> Result<Announcer, AnnouncerError> {
        if opts.targets.is_empty() {
            return Err(AnnouncerError::NoTargets);
        }
        if opts.interval.is_zero() {
            return Err(AnnouncerError::ZeroInterval);
        }
        let mut boot = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut boot)
            .map_err(|_| AnnouncerError::Random)?;
        let heartbeat = Heartbeat {
            cluster: opts.cluster,
            node: opts.node,
            boot_id: u64::from_be_bytes(boot),
            seq: 0,
            sent_at_ms: 0,
            state: opts.state,
            weight: opts.weight,
            load: None,
            addr: opts.addr,
            services: opts.services,
        };
        // Fail now, not on every tick.
        wire::encode(&heartbeat, &opts.token)?;
        let want = |v4: bool| opts.targets.iter().any(|t| t.is_ipv4() == v4);
        let shared = Arc::new(Shared {
            heartbeat: Mutex::new(heartbeat),
            seq: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            token: opts.token,
            v4: want(true).then(|| sender(true)).transpose()?,
            v6: want(false).then(|| sender(false)).transpose()?,
            targets: opts.targets,
            interval: opts.interval,
            wake: Notify::new(),
            errors_log: RateLimit::new(60_000),
        });
        let task = tokio::spawn(run(shared.clone()));
        Ok(Announcer { shared, task })
    }

    /// Change the announced state; sent immediately when it differs.
    pub fn set_state(&self, state: NodeState) {
        let changed = {
            let mut hb = self.lock();
            std::mem::replace(&mut hb.state, state) != state
        };
        if changed {
            self.shared.wake.notify_one();
        }
    }

    pub fn state(&self) -> NodeState {
        self.lock().state
    }

    /// Report a load figure (permille, clamped to 1000) with the next
    /// heartbeat; `None` stops reporting.
    pub fn set_load(&self, load: Option<u16>) {
        self.lock().load = load.map(|l| l.min(1000));
    }

    pub fn boot_id(&self) -> u64 {
        self.lock().boot_id
    }

    /// Datagrams handed to the kernel so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Stop the heartbeats and announce `leaving` a few times, spaced out
    /// a little, so balancers drop the node at once instead of waiting for
    /// it to go silent.
    pub async fn leave(self) {
        self.task.abort();
        self.lock().state = NodeState::Leaving;
        for i in 0..LEAVE_REPEATS {
            if i > 0 {
                tokio::time::sleep(LEAVE_SPACING).await;
            }
            self.shared.send_round().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Heartbeat> {
        self.shared
            .heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An unbound-port sender that may broadcast. Multicast keeps the default
/// TTL of 1: heartbeats are meant for the local network segment.
fn sender(v4: bool) -> std::io::Result<UdpSocket> {
    let (domain, any): (Domain, SocketAddr) = if v4 {
        (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
    } else {
        (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v4 {
        socket.set_broadcast(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&any.into())?;
    UdpSocket::from_std(socket.into())
}

async fn run(shared: Arc<Shared>) {
    loop {
        shared.send_round().await;
        let pause = shared.interval.mul_f64(0.9 + 0.2 * fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

impl Shared {
    /// One heartbeat to every target, each with its own sequence number:
    /// a receiver that hears two targets' copies (broadcast and unicast)
    /// then takes both instead of counting one as a replay.
    async fn send_round(&self) {
        for &target in &self.targets {
            let bytes = {
                let mut hb = self.heartbeat.lock().unwrap_or_else(|e| e.into_inner());
                hb.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
                hb.sent_at_ms = unix_ms();
                wire::encode(&hb, &self.token)
            };
            let socket = if target.is_ipv4() { &self.v4 } else { &self.v6 };
            let result = match (bytes, socket) {
                (Ok(b), Some(s)) => s.send_to(&b, target).await.map(|_| ()),
                (Err(e), _) => Err(std::io::Error::other(e)),
                (_, None) => Err(std::io::Error::other("no socket for this address family")),
            };
            match result {
                Ok(()) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // An interface going down must not flood the log.
                    if let Some(suppressed) = self.errors_log.allow() {
                        tracing::warn!(%target, suppressed, "heartbeat not sent: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::wire::tests::{sample, token};
    use crate::discovery::{Discovery, DiscoveryOptions, Registry};

    pub(crate) fn options(target: SocketAddr, interval: Duration) -> AnnouncerOptions {
        let hb = sample();
        AnnouncerOptions {
            cluster: hb.cluster,
            node: hb.node,
            addr: None,
            weight: hb.weight,
            services: hb.services,
            targets: vec![target],
            interval,
            state: NodeState::Normal,
            token: token(),
        }
    }

    async fn wait_for(
        reg: &Registry,
        within: Duration,
        what: impl Fn(&crate::discovery::Snapshot) -> bool,
    ) -> bool {
        let mut rx = reg.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if what(&reg.snapshot()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return what(&reg.snapshot());
            }
        }
    }

    /// End to end on loopback: the registry learns the node within one
    /// interval, hears a state change at once and forgets the node on
    /// leave.
    #[tokio::test]
    async fn announcer_to_receiver_over_udp() {
        let mut opts = DiscoveryOptions::new("127.0.0.1:0".parse().unwrap(), "fleet", token());
        let interval = Duration::from_millis(500);
        opts.interval = interval;
        let disc = Discovery::start(opts).await.unwrap();
        let reg = disc.registry().clone();

        let a = Announcer::start(options(disc.local_addr(), interval)).unwrap();
        assert!(
            wait_for(&reg, interval, |s| s.nodes.len() == 1).await,
            "not learned"
        );
        let eps = reg.endpoints("device-tls");
        assert_eq!(eps.len(), 1);
        assert_eq!(
            eps[0].addr,
            "127.0.0.1:8443".parse().unwrap(),
            "source address used"
        );
        assert_eq!(eps[0].state, NodeState::Normal);
        assert_eq!(reg.snapshot().nodes[0].boot_id, a.boot_id());

        // Long before the next tick.
        a.set_state(NodeState::Draining);
        assert!(
            wait_for(&reg, interval / 4, |s| s
                .node("ums-01")
                .is_some_and(|n| n.state == NodeState::Draining))
            .await
        );
        a.set_load(Some(5000));
        assert_eq!(a.state(), NodeState::Draining);

        a.leave().await;
        assert!(
            wait_for(&reg, interval, |s| s.nodes.is_empty()).await,
            "not removed"
        );
        let stats = disc.stats();
        assert!(stats.accepted() >= 3, "{}", stats.accepted());
        assert_eq!(stats.rejected(crate::discovery::Reason::BadMac), 0);
    }

    #[tokio::test]
    async fn heartbeats_keep_coming_and_silence_expires() {
        let mut opts = DiscoveryOptions::new("127.0.0.1:0".parse().unwrap(), "fleet", token());
        let interval = Duration::from_millis(100);
        opts.interval = interval;
        opts.miss_limit = 3;
        let disc = Discovery::start(opts).await.unwrap();
        let reg = disc.registry().clone();
        let a = Announcer::start(options(disc.local_addr(), interval)).unwrap();
        assert!(wait_for(&reg, interval, |s| s.nodes.len() == 1).await);
        tokio::time::sleep(interval * 5).await;
        let seq = reg.snapshot().nodes[0].seq;
        assert!((3..=8).contains(&seq), "about one per interval, got {seq}");
        assert_eq!(reg.snapshot().nodes.len(), 1, "kept while heard");
        drop(a); // silent, no goodbye
        assert!(
            wait_for(&reg, interval * 6, |s| s.nodes.is_empty()).await,
            "not expired"
        );
    }

    #[tokio::test]
    async fn wrong_token_is_never_learned() {
        let disc = Discovery::start(DiscoveryOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            "fleet",
            token(),
        ))
        .await
        .unwrap();
        let mut o = options(disc.local_addr(), Duration::from_millis(50));
        o.token = Token::from_bytes([1; 32]);
        let _a = Announcer::start(o).unwrap();
        let stats = disc.stats().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while stats.rejected(crate::discovery::Reason::BadMac) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "nothing arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(disc.registry().snapshot().nodes.is_empty());
        assert_eq!(stats.accepted(), 0);
    }

    #[tokio::test]
    async fn start_refuses_bad_options() {
        let t: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut o = options(t, Duration::from_secs(1));
        o.targets.clear();
        assert!(matches!(
            Announcer::start(o),
            Err(AnnouncerError::NoTargets)
        ));
        let mut o = options(t, Duration::from_secs(1));
        o.weight = 0;
        assert!(matches!(
            Announcer::start(o),
            Err(AnnouncerError::Invalid(_))
        ));
        let o = options(t, Duration::ZERO);
        assert!(matches!(
            Announcer::start(o),
            Err(AnnouncerError::ZeroInterval)
        ));
    }
}
