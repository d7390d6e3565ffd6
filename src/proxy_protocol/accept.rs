//! Accepting PROXY headers on a listener: who may send one, and the step
//! in a connection's task that reads it and swaps in the declared client.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use prometheus::IntCounter;
use tokio::net::TcpStream;

use super::read::{read_header, ReadError};
use crate::listener::ListenerShared;
use crate::metrics::Metrics;

/// A listener's `proxy_protocol` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptPlan {
    /// Sources that must send a header; every other source is refused.
    pub from: Vec<IpNet>,
    /// How long a trusted source has to send its whole header.
    pub timeout: Duration,
}

impl AcceptPlan {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.from.iter().any(|n| n.contains(&ip))
    }
}

/// `fleetgate_connections_rejected_total` reasons.
pub mod reason {
    /// A source not in `from` (it could otherwise claim any address).
    pub const UNTRUSTED: &str = "proxy_protocol_untrusted";
    /// A trusted source sent bytes that are not a valid header.
    pub const INVALID: &str = "proxy_protocol_invalid";
    /// A trusted source sent no complete header in time.
    pub const TIMEOUT: &str = "proxy_protocol_timeout";
    /// A trusted source closed before a complete header (load balancer
    /// health checks that only connect end this way).
    pub const CLOSED: &str = "proxy_protocol_closed";
}

/// A listener's rejection counters for PROXY headers.
pub struct Rejections {
    pub untrusted: IntCounter,
    pub invalid: IntCounter,
    pub timeout: IntCounter,
    pub closed: IntCounter,
}

impl Rejections {
    pub fn new(m: &Metrics, listener: &str) -> Self {
        let rej = |r| m.connections_rejected.with_label_values(&[listener, r]);
        Rejections {
            untrusted: rej(reason::UNTRUSTED),
            invalid: rej(reason::INVALID),
            timeout: rej(reason::TIMEOUT),
            closed: rej(reason::CLOSED),
        }
    }
}

/// Refuse a source that is not allowed to send a header: counted, and
/// logged at a limited rate.
pub fn refuse_untrusted(peer: SocketAddr, ctx: &ListenerShared) {
    ctx.metrics.proxy_protocol.untrusted.inc();
    if let Some(held) = ctx.reject_log.allow() {
        tracing::info!(listener = %ctx.plan.name, %peer, "connection rejected: source may not send a PROXY header ({held} rejections suppressed)");
    }
}

/// Who the connection is from and to once its header is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    /// The declared client, or the socket's own peer when the header
    /// carries no address (LOCAL, UNKNOWN).
    pub peer: SocketAddr,
    /// The address the client connected to, when the header says.
    pub destination: Option<SocketAddr>,
}

/// Read the header a trusted source must send, then apply the listener's
/// ACL to the declared client as well. `None`: the connection is refused
/// (counted and logged here) and is to be closed.
pub async fn declared(
    client: &TcpStream,
    peer: SocketAddr,
    ctx: &ListenerShared,
    plan: &AcceptPlan,
) -> Option<Declared> {
    let listener = ctx.plan.name.as_str();
    let header = match read_header(client, plan.timeout).await {
        Ok(h) => h,
        Err(e) => {
            let counters = &ctx.metrics.proxy_protocol;
            match &e {
                ReadError::Parse(_) => counters.invalid.inc(),
                ReadError::Timeout(_) => counters.timeout.inc(),
                ReadError::Closed | ReadError::Io(_) => counters.closed.inc(),
            }
            if matches!(e, ReadError::Closed) {
                tracing::debug!(listener, %peer, "connection closed before its PROXY header");
            } else if let Some(held) = ctx.reject_log.allow() {
                let reason = e.reason();
                tracing::info!(listener, %peer, reason, "connection rejected: {e} ({held} rejections suppressed)");
            }
            return None;
        }
    };
    let Some(addrs) = header.addresses else {
        return Some(Declared {
            peer,
            destination: None,
        });
    };
    // The ACL saw the proxy at accept; a deny list written for clients
    // must hold behind a proxy too.
    if !ctx.plan.acl.admits(addrs.source.ip()) {
        ctx.metrics.rejected_acl.inc();
        if let Some(held) = ctx.reject_log.allow() {
            tracing::info!(listener, %peer, client = %addrs.source, "connection rejected: declared client denied by ACL ({held} rejections suppressed)");
        }
        return None;
    }
    Some(Declared {
        peer: addrs.source,
        destination: Some(addrs.destination),
    })
}
