//! Serving one accepted connection: dispatch by listener mode; in `tcp`
//! mode pick a backend, connect (retrying the next backend on failure),
//! then pump bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::balance::{connect, Pool};
use crate::l4::{self, PumpConfig, PumpEnd};
use crate::listener::{ListenerShared, ModeRuntime};

/// Serve an accepted (and admitted) connection according to its
/// listener's mode.
pub async fn serve(client: TcpStream, peer: SocketAddr, ctx: Arc<ListenerShared>) {
    match &ctx.mode {
        ModeRuntime::Tcp(pool) => forward(client, peer, &ctx, pool).await,
        ModeRuntime::Passthrough(pt) => crate::passthrough::serve(client, peer, &ctx, pt).await,
        ModeRuntime::Offload(offload) => {
            crate::http::server::serve(client, peer, &ctx.plan.name, offload.clone()).await
        }
    }
}

/// Connect to a backend of `pool` and pump bytes until the connection
/// ends. Also the last step of TLS passthrough.
pub async fn forward(client: TcpStream, peer: SocketAddr, ctx: &ListenerShared, pool: &Pool) {
    let connected = connect::first_success(pool, peer.ip(), |i| connect::tcp(pool, i)).await;
    let Ok((index, upstream)) = connected else {
        ctx.metrics.rejected_no_backend.inc();
        if let Some(held) = ctx.reject_log.allow() {
            tracing::warn!(listener = %ctx.plan.name, pool = %pool.name(), %peer, "connection closed: no backend available ({held} rejections suppressed)");
        }
        return;
    };
    let backend = &pool.members[index].backend;
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
