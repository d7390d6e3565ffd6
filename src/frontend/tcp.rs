//! Plain L4 (`tcp`) listeners, and the last step of TLS passthrough:
//! pick a backend, connect (retrying the next backend on failure), then
//! pump bytes.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::ListenerShared;
use crate::balance::{connect, Pool};
use crate::l4::{self, PumpConfig, PumpEnd};
use crate::proxy_protocol;

/// Connect to a backend of `pool` and pump bytes until the connection
/// ends. Also the last step of TLS passthrough.
///
/// A pool with `send_proxy` gets a PROXY header first, naming `peer` and
/// `destination` (or, without a declared one, the listener address the
/// client reached).
pub async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    destination: Option<SocketAddr>,
    ctx: &ListenerShared,
    pool: &Pool,
) {
    // The member set as it is now: a discovery change publishes a new
    // one for the next connection.
    let set = pool.members();
    let header = match set.plan.send_proxy {
        None => None,
        Some(version) => match destination.map_or_else(|| client.local_addr(), Ok) {
            Ok(dst) => Some(proxy_protocol::encode(version, peer, dst)),
            Err(e) => {
                tracing::debug!(listener = %ctx.plan.name, %peer, "connection ended: no local address for the PROXY header: {e}");
                return;
            }
        },
    };
    let (set, header) = (&*set, header.as_deref());
    let connected = connect::first_success(set, peer.ip(), |b| async move {
        connect::tcp_with_header(set, &b, header).await
    })
    .await;
    let Ok((backend, upstream)) = connected else {
        ctx.metrics.rejected_no_backend.inc();
        if let Some(held) = ctx.reject_log.allow() {
            // During a descriptor shortage the backends are fine: say so,
            // or an operator goes looking for a dead server.
            let why = if crate::shortage::remaining().is_some() {
                "no descriptor for a backend connection"
            } else {
                "no backend available"
            };
            tracing::warn!(listener = %ctx.plan.name, pool = %pool.name(), %peer, "connection closed: {why} ({held} rejections suppressed)");
        }
        return;
    };
    let _open = backend.track();
    let _ = upstream.set_nodelay(ctx.plan.socket.nodelay);
    let cfg = PumpConfig {
        idle_timeout: ctx.plan.idle_timeout,
        splice: ctx.plan.splice,
    };
    let report = l4::pump(&client, &upstream, cfg, &ctx.metrics.bytes).await;
    match &report.end {
        PumpEnd::Closed => {}
        PumpEnd::IdleTimeout => {
            tracing::debug!(listener = %ctx.plan.name, %peer, backend = %backend.addr, "closed after idle timeout")
        }
        PumpEnd::Error(e) => {
            tracing::debug!(listener = %ctx.plan.name, %peer, backend = %backend.addr, "connection ended: {e}")
        }
    }
}
