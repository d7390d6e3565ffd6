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
/// listener's mode, in a task of its own that holds `guard` until the
/// connection ends.
///
/// Each mode gets its own task type rather than one task whose future is
/// a `match` over all three: a task is as large as its future, and an
/// idle offloaded connection (most of a device fleet) should not carry
/// the L4 pump's or the passthrough parser's state around.
pub fn spawn<G: Send + 'static>(
    client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerShared>,
    guard: G,
) {
    match &ctx.mode {
        ModeRuntime::Tcp(_) => tokio::spawn(async move {
            let ModeRuntime::Tcp(pool) = &ctx.mode else {
                unreachable!("matched above")
            };
            forward(client, peer, &ctx, pool).await;
            drop(guard);
        }),
        ModeRuntime::Passthrough(_) => tokio::spawn(async move {
            let ModeRuntime::Passthrough(pt) = &ctx.mode else {
                unreachable!("matched above")
            };
            crate::passthrough::serve(client, peer, &ctx, pt).await;
            drop(guard);
        }),
        ModeRuntime::Offload(offload) => {
            let offload = offload.clone();
            // The offload path needs only its offload state (which has
            // the listener's name), not the whole plan.
            drop(ctx);
            tokio::spawn(async move {
                crate::http::server::serve(client, peer, offload).await;
                drop(guard);
            })
        }
    };
}

/// Connect to a backend of `pool` and pump bytes until the connection
/// ends. Also the last step of TLS passthrough.
pub async fn forward(client: TcpStream, peer: SocketAddr, ctx: &ListenerShared, pool: &Pool) {
    let connected = connect::first_success(pool, peer.ip(), |i| connect::tcp(pool, i)).await;
    let Ok((index, upstream)) = connected else {
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
