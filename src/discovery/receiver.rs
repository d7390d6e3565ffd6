//! The balancer's side of the wire: one UDP socket, one loop, decode →
//! registry. Junk is cheap by construction: the receive buffer is the only
//! allocation, a datagram without a valid MAC costs one HMAC, and log lines
//! about rejections are limited per source, so a flood can neither starve
//! valid heartbeats of CPU nor fill the disk.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::registry::{Applied, Registry};
use super::token::Token;
use super::wire::{self, Heartbeat};
use super::{unix_ms, Reason};

/// Larger than any valid heartbeat, so an oversized datagram is seen as
/// oversized rather than silently cut to a valid-looking length.
const RECV_BUF: usize = 2048;
/// Room for bursts (a whole fleet restarting at once) while the loop is
/// busy; the kernel may clamp it to net.core.rmem_max.
const SOCKET_RCVBUF: usize = 1 << 20;
/// One rejection line per source and reason class per minute...
const LOG_PERIOD: Duration = Duration::from_secs(60);
/// ...for at most this many sources at once (spoofed floods have many).
const LOG_SOURCES: usize = 256;

/// Bind the discovery socket: SO_REUSEADDR so a restart never waits and
/// several listeners on one host each get a copy of broadcasts, and
/// SO_BROADCAST on IPv4. With `multicast`, join that IPv4 group on the
/// interface the routing table picks (bind must then be IPv4).
pub fn bind(addr: SocketAddr, multicast: Option<Ipv4Addr>) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_broadcast(true)?;
    }
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(SOCKET_RCVBUF);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if let Some(group) = multicast {
        if !group.is_multicast() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{group} is not an IPv4 multicast group (224.0.0.0/4)"),
            ));
        }
        if !addr.is_ipv4() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "joining IPv4 multicast group {group} needs an IPv4 bind address, not {addr}"
                ),
            ));
        }
        socket.join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)?;
    }
    UdpSocket::from_std(socket.into())
}

/// Heartbeats accepted and rejected by reason since start, for /status
/// and tests (the Prometheus counters, when given, count the same).
#[derive(Debug, Default)]
pub struct ReceiverStats {
    accepted: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
}

impl ReceiverStats {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected
            .get(reason as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn rejected_total(&self) -> u64 {
        Reason::ALL.iter().map(|&r| self.rejected(r)).sum()
    }
}

/// Where outcomes are counted: always the atomics, and Prometheus
/// counters when the balancer passes them (label handles resolved once).
pub struct Rejections {
    stats: Arc<ReceiverStats>,
    prom: Vec<(Reason, IntCounter)>,
    accepted: Option<IntCounter>,
}

impl Rejections {
    /// `rejected` must have exactly one label (the reason); a vector with
    /// other labels is ignored with a warning rather than panicking.
    pub fn new(
        stats: Arc<ReceiverStats>,
        rejected: Option<IntCounterVec>,
        accepted: Option<IntCounter>,
    ) -> Rejections {
        let mut prom = Vec::new();
        if let Some(vec) = rejected {
            for r in Reason::ALL {
                match vec.get_metric_with_label_values(&[r.as_str()]) {
                    Ok(c) => prom.push((r, c)),
                    Err(e) => {
                        tracing::warn!("discovery rejection counter unusable: {e}");
                        prom.clear();
                        break;
                    }
                }
            }
        }
        Rejections {
            stats,
            prom,
            accepted,
        }
    }

    fn reject(&self, reason: Reason) {
        if let Some(c) = self.stats.rejected.get(reason as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((_, c)) = self.prom.iter().find(|(r, _)| *r == reason) {
            c.inc();
        }
    }

    fn accept(&self) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.accepted {
            c.inc();
        }
    }
}

/// Allows one log line per source per period, remembering a bounded
/// number of sources in a map allocated once.
struct LogLimiter {
    last: HashMap<IpAddr, Instant>,
    last_sweep: Option<Instant>,
}

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            last: HashMap::with_capacity(LOG_SOURCES),
            last_sweep: None,
        }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if let Some(t) = self.last.get_mut(&ip) {
            if now.saturating_duration_since(*t) >= LOG_PERIOD {
                *t = now;
                return true;
            }
            return false;
        }
        if self.last.len() >= LOG_SOURCES {
            // Sweep at most once a second: with many spoofed sources every
            // datagram would otherwise pay for a full pass.
            let due = self
                .last_sweep
                .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1));
            if due {
                self.last_sweep = Some(now);
                self.last
                    .retain(|_, t| now.saturating_duration_since(*t) < LOG_PERIOD);
            }
            if self.last.len() >= LOG_SOURCES {
                return false;
            }
        }
        self.last.insert(ip, now);
        true
    }
}

pub struct Receiver {
    socket: UdpSocket,
    token: Token,
    registry: Arc<Registry>,
    counts: Rejections,
    log: LogLimiter,
}

impl Receiver {
    pub fn new(
        socket: UdpSocket,
        token: Token,
        registry: Arc<Registry>,
        counts: Rejections,
    ) -> Receiver {
        Receiver {
            socket,
            token,
            registry,
            counts,
            log: LogLimiter::new(),
        }
    }

    /// Receive until the task is aborted.
    pub async fn run(mut self) {
        let mut buf = vec![0u8; RECV_BUF];
        let mut errors = 0u32;
        loop {
            match self.socket.recv_from(&mut buf).await {
                Ok((n, src)) => {
                    errors = 0;
                    let data = buf.get(..n).unwrap_or(&buf);
                    let _ = self.handle(data, src, Instant::now(), unix_ms());
                }
                Err(e) => {
                    // Should not happen on a bound UDP socket; never spin.
                    errors += 1;
                    if errors == 1 || errors.is_power_of_two() {
                        tracing::warn!("discovery socket: receive failed ({errors} in a row): {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Handle one datagram: count it, apply it, log what deserves a line.
    pub fn handle(
        &mut self,
        data: &[u8],
        src: SocketAddr,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Applied, Reason> {
        let hb = match wire::decode(data, &self.token) {
            Ok(hb) => hb,
            Err(e) => {
                let reason = e.reason();
                self.counts.reject(reason);
                if self.log.allow(src.ip(), now) {
                    log_rejection(reason, src, &e.to_string(), None);
                }
                return Err(reason);
            }
        };
        match self.registry.apply(&hb, src.ip(), now, wall_ms) {
            Ok(applied) => {
                self.counts.accept();
                log_applied(applied, &hb, src);
                Ok(applied)
            }
            Err(e) => {
                let reason = e.reason();
                self.counts.reject(reason);
                if self.log.allow(src.ip(), now) {
                    log_rejection(reason, src, &e.to_string(), Some(&hb));
                }
                Err(reason)
            }
        }
    }
}

fn log_rejection(reason: Reason, src: SocketAddr, why: &str, hb: Option<&Heartbeat>) {
    let node = hb.map_or("", |h| h.node.as_str());
    let cluster = hb.map_or("", |h| h.cluster.as_str());
    let note = "(further rejections from this source are counted, not logged, for a minute)";
    match reason {
        Reason::BadMac => {
            tracing::warn!(%src, %reason, "heartbeat refused: {why}: is the sender using this cluster's network token? {note}")
        }
        Reason::Stale | Reason::Conflict => {
            tracing::warn!(%src, %reason, node, "heartbeat refused: {why} {note}")
        }
        Reason::Malformed | Reason::UnsupportedVersion => {
            tracing::info!(%src, %reason, "datagram on the discovery port refused: {why} (a legacy discovery broadcast or another program?) {note}")
        }
        Reason::OtherCluster => {
            tracing::info!(%src, %reason, node, cluster, "heartbeat for another cluster ignored {note}")
        }
        // Reordering on the network makes the odd replay routine.
        Reason::Replay => tracing::debug!(%src, %reason, node, "heartbeat refused: {why}"),
    }
}

fn log_applied(applied: Applied, hb: &Heartbeat, src: SocketAddr) {
    let addr = hb.addr.unwrap_or(src.ip());
    match applied {
        Applied::Joined => tracing::info!(
            node = %hb.node, %addr, state = %hb.state, weight = hb.weight,
            services = hb.services.len(), "node joined"
        ),
        Applied::Changed { previous } if previous != hb.state => tracing::info!(
            node = %hb.node, %addr, "node state {previous} → {}", hb.state
        ),
        Applied::Changed { .. } => tracing::info!(
            node = %hb.node, %addr, weight = hb.weight, services = hb.services.len(),
            "node changed address, weight or services"
        ),
        Applied::Restarted => tracing::info!(node = %hb.node, %addr, "node restarted"),
        Applied::Left => tracing::info!(node = %hb.node, "node left"),
        Applied::Refreshed | Applied::AlreadyGone => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::registry::DEFAULT_MAX_SKEW;
    use crate::discovery::wire::tests::{sample, token};
    use crate::discovery::wire::NodeState;

    fn receiver(prom: Option<IntCounterVec>) -> (Receiver, Arc<ReceiverStats>) {
        // Needs a runtime context: callers are #[tokio::test]s.
        let socket = bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let stats = Arc::new(ReceiverStats::default());
        let reg = Arc::new(Registry::new("fleet", DEFAULT_MAX_SKEW));
        let counts = Rejections::new(stats.clone(), prom, None);
        (Receiver::new(socket, token(), reg, counts), stats)
    }

    #[tokio::test]
    async fn counts_every_outcome() {
        let vec = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["reason"]).unwrap();
        let (mut rx, stats) = receiver(Some(vec.clone()));
        let src: SocketAddr = "192.0.2.1:6155".parse().unwrap();
        let now = Instant::now();
        let hb = sample();
        let wall = hb.sent_at_ms;
        let good = wire::encode(&hb, &token()).unwrap();
        assert_eq!(rx.handle(&good, src, now, wall), Ok(Applied::Joined));
        assert_eq!(rx.handle(&good, src, now, wall), Err(Reason::Replay));
        assert_eq!(rx.handle(b"junk", src, now, wall), Err(Reason::Malformed));
        let mut bad = good.clone();
        bad[40] ^= 1;
        assert_eq!(rx.handle(&bad, src, now, wall), Err(Reason::BadMac));
        let mut old = hb.clone();
        old.seq += 1;
        let old = wire::encode(&old, &token()).unwrap();
        assert_eq!(rx.handle(&old, src, now, wall + 61_000), Err(Reason::Stale));
        let mut other = hb.clone();
        other.cluster = "lab".into();
        let other = wire::encode(&other, &token()).unwrap();
        assert_eq!(rx.handle(&other, src, now, wall), Err(Reason::OtherCluster));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(
            rx.handle(&v2, src, now, wall),
            Err(Reason::UnsupportedVersion)
        );
        assert_eq!(stats.accepted(), 1);
        assert_eq!(stats.rejected_total(), 6);
        for r in [
            Reason::Replay,
            Reason::Malformed,
            Reason::BadMac,
            Reason::Stale,
            Reason::OtherCluster,
            Reason::UnsupportedVersion,
        ] {
            assert_eq!(stats.rejected(r), 1, "{r}");
            assert_eq!(vec.with_label_values(&[r.as_str()]).get(), 1, "{r}");
        }
        assert_eq!(stats.rejected(Reason::Conflict), 0);
        assert_eq!(
            rx.registry.snapshot().node("ums-01").unwrap().state,
            NodeState::Normal
        );
    }

    #[tokio::test]
    async fn a_wrongly_labelled_counter_vector_is_ignored_not_a_panic() {
        let vec = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["a", "b"]).unwrap();
        let (mut rx, stats) = receiver(Some(vec));
        rx.handle(b"x", "192.0.2.1:1".parse().unwrap(), Instant::now(), 0)
            .unwrap_err();
        assert_eq!(stats.rejected(Reason::Malformed), 1);
    }

    #[test]
    fn log_limiter_is_per_source_and_bounded() {
        let mut l = LogLimiter::new();
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.allow(a, t));
        assert!(!l.allow(a, t + Duration::from_secs(59)));
        assert!(l.allow(a, t + Duration::from_secs(60)));
        let cap = l.last.capacity();
        for i in 0..10_000u32 {
            l.allow(IpAddr::V4(Ipv4Addr::from(i)), t + Duration::from_secs(61));
        }
        assert_eq!(l.last.len(), LOG_SOURCES);
        assert_eq!(l.last.capacity(), cap, "no growth under a spoofed flood");
        // Old entries make room again once their minute is over.
        assert!(l.allow(
            "198.51.100.1".parse().unwrap(),
            t + Duration::from_secs(200)
        ));
    }

    /// Junk must be cheap: a burst of garbage and of datagrams with a
    /// wrong token is processed fast, and a valid heartbeat behind it is
    /// still applied.
    #[tokio::test]
    async fn junk_flood_does_not_starve_valid_heartbeats() {
        let (mut rx, stats) = receiver(None);
        let now = Instant::now();
        let hb = sample();
        let wall = hb.sent_at_ms;
        let wrong = wire::encode(&hb, &Token::from_bytes([9; 32])).unwrap();
        let mut junk = vec![0u8; 1200];
        junk[..5].copy_from_slice(b"FGHB\x01");
        let start = Instant::now();
        for i in 0..20_000u32 {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(i)), 6155);
            let d: &[u8] = if i % 2 == 0 { &wrong } else { &junk };
            assert_eq!(rx.handle(d, src, now, wall), Err(Reason::BadMac));
        }
        let spent = start.elapsed();
        let good = wire::encode(&hb, &token()).unwrap();
        assert!(rx
            .handle(&good, "192.0.2.9:1".parse().unwrap(), now, wall)
            .is_ok());
        assert_eq!(stats.rejected(Reason::BadMac), 20_000);
        // ~2 µs each in release; generous for debug builds on a busy box.
        assert!(spent < Duration::from_secs(10), "{spent:?}");
    }

    #[tokio::test]
    async fn bind_options() {
        let s = bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let port = s.local_addr().unwrap().port();
        // SO_REUSEADDR: a second socket may share the port.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        bind(addr, None).unwrap();
        assert!(bind(addr, Some("10.0.0.1".parse().unwrap())).is_err());
        assert!(bind(
            "[::1]:0".parse().unwrap(),
            Some("239.1.2.3".parse().unwrap())
        )
        .is_err());
    }
}
