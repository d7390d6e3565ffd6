//! The PROXY protocol header on listeners that take one: refusing a
//! source that may not send one, and reading the declared client.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::ListenerShared;
use crate::proxy_protocol::accept::AcceptPlan;
use crate::proxy_protocol::read::{read_header, ReadError};

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
