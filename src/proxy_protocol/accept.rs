//! Accepting PROXY headers on a listener: who may send one, and the step
//! in a connection's task that reads it and swaps in the declared client.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use prometheus::IntCounter;

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
