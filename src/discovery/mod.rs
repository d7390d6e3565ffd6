//! Discovery: management servers announce themselves with signed UDP
//! heartbeats and balancers build their pools from what they hear.
//!
//! Layers, each usable alone:
//! - `wire`: the datagram (encode/decode, HMAC-SHA256 under the token);
//! - `token`: the shared network token and its file;
//! - `registry`: the nodes heard, with replay protection, read by pools
//!   through a lock-free snapshot and a change counter;
//! - `receiver`: the UDP loop that feeds the registry;
//! - `announcer`: the sending side (the `fleetgate agent` sidecar, in the
//!   binary's src/cli/agent.rs, is built on it).
//!
//! `Discovery` bundles a registry, its receiver and its expiry loop for the
//! balancer. The spec is docs/heartbeat.md.

pub mod announcer;
pub mod members;
pub mod receiver;
pub mod registry;
pub mod token;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};
use tokio::task::JoinHandle;

pub use announcer::{Announcer, AnnouncerOptions};
pub use members::DiscoveredMembers;
pub use receiver::{ReceiverStats, Rejections};
pub use registry::{Endpoint, Node, Registry, Snapshot};
pub use token::Token;
pub use wire::{DecodeError, Heartbeat, NodeState, Service};

/// The port the field has always used for discovery broadcasts.
pub const DEFAULT_PORT: u16 = 6155;

/// Why a datagram was not applied: the `reason` label of the rejection
/// counter. Every value is listed in `Reason::ALL` so counters can be
/// created up front (a series that appears only on the first attack is
/// hard to alert on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a heartbeat of any version we know, or a broken one.
    Malformed,
    /// A heartbeat of a version this build does not speak.
    UnsupportedVersion,
    /// Wrong network token, or altered on the way.
    BadMac,
    /// Authentic but already seen (or older than what was seen).
    Replay,
    /// Sent-at time outside the allowed clock window.
    Stale,
    /// Authentic, but for another cluster sharing the token.
    OtherCluster,
    /// Two live senders claim the same node id (e.g. cloned machines).
    Conflict,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Malformed,
        Reason::UnsupportedVersion,
        Reason::BadMac,
        Reason::Replay,
        Reason::Stale,
        Reason::OtherCluster,
        Reason::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::BadMac => "bad_mac",
            Reason::Replay => "replay",
            Reason::Stale => "stale",
            Reason::OtherCluster => "other_cluster",
            Reason::Conflict => "conflict",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the balancer needs to run discovery, as plain values (the
/// config layer turns `[discovery]` into this).
pub struct DiscoveryOptions {
    /// Where heartbeats arrive, e.g. 0.0.0.0:6155.
    pub bind: SocketAddr,
    /// Only heartbeats for this cluster are applied.
    pub cluster: String,
    pub token: Token,
    /// The announcers' interval: sets how often silent nodes are looked for.
    pub interval: Duration,
    /// A node silent for `miss_limit × interval` is removed.
    pub miss_limit: u32,
    /// Join this IPv4 multicast group as well (broadcast is always heard).
    pub multicast: Option<Ipv4Addr>,
    /// Largest accepted difference between a heartbeat's sent-at time and
    /// the local clock (the field's clocks agree within a minute).
    pub max_clock_skew: Duration,
    /// Rejections by reason, with a single `reason` label; optional so
    /// tests and tools need no Prometheus registry.
    pub rejected: Option<IntCounterVec>,
    /// Heartbeats applied.
    pub accepted: Option<IntCounter>,
}

impl DiscoveryOptions {
    /// Options with the documented defaults: interval 1 s, miss limit 3,
    /// no multicast, ±60 s clock window, no Prometheus counters.
    pub fn new(bind: SocketAddr, cluster: impl Into<String>, token: Token) -> Self {
        DiscoveryOptions {
            bind,
            cluster: cluster.into(),
            token,
            interval: Duration::from_secs(1),
            miss_limit: 3,
            multicast: None,
            max_clock_skew: registry::DEFAULT_MAX_SKEW,
            rejected: None,
            accepted: None,
        }
    }
}

/// A running discovery: the registry, the receiver feeding it and the loop
/// expiring silent nodes. Dropping it stops both tasks; the registry lives
/// on while pools hold it (it just stops changing).
pub struct Discovery {
    registry: Arc<Registry>,
    stats: Arc<ReceiverStats>,
    local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Discovery {
    /// Bind the socket and start receiving. Fails only if the socket cannot
    /// be set up (address in use, bad multicast group...).
    pub async fn start(opts: DiscoveryOptions) -> std::io::Result<Discovery> {
        let socket = receiver::bind(opts.bind, opts.multicast)?;
        let local_addr = socket.local_addr()?;
        let registry = Arc::new(Registry::new(opts.cluster.clone(), opts.max_clock_skew));
        let stats = Arc::new(ReceiverStats::default());
        let rejections = Rejections::new(stats.clone(), opts.rejected, opts.accepted);
        let rx = receiver::Receiver::new(socket, opts.token, registry.clone(), rejections);
        let max_silence = opts.interval.saturating_mul(opts.miss_limit.max(1));
        let expiry = tokio::spawn(expire_loop(registry.clone(), opts.interval, max_silence));
        tracing::info!(
            bind = %local_addr,
            cluster = %opts.cluster,
            multicast = ?opts.multicast,
            "discovery listening for heartbeats"
        );
        Ok(Discovery {
            registry,
            stats,
            local_addr,
            tasks: vec![tokio::spawn(rx.run()), expiry],
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Accepted and rejected counts, for /status.
    pub fn stats(&self) -> &Arc<ReceiverStats> {
        &self.stats
    }

    /// The bound address (useful when binding port 0 in tests).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Look for silent nodes twice per interval, so a node is removed at most
/// half an interval after its deadline.
async fn expire_loop(registry: Arc<Registry>, interval: Duration, max_silence: Duration) {
    let period = (interval / 2).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for id in registry.expire(std::time::Instant::now(), max_silence) {
            tracing::warn!(node = %id, "node silent for {max_silence:?}: removed");
        }
    }
}

/// Wall-clock milliseconds for heartbeat send times (see clock.rs).
pub use crate::clock::unix_ms;
