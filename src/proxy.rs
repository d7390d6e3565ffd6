//! Serving one accepted connection: dispatch by listener mode; in `tcp`
//! mode pick a backend, connect (retrying the next backend on failure),
//! then pump bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::balance::{connect, Pool};
use crate::l4::{self, PumpConfig, PumpEnd};
use crate::listener::{ListenerShared, ModeRuntime};
use crate::proxy_protocol::{self, accept};

/// Serve an accepted (and admitted) connection according to its
/// listener's mode, in a task of its own that holds `guard` until the
/// connection ends.
///
/// On a listener with `proxy_protocol`, a source that may not send a
/// header is refused here (a list lookup), and a trusted one gets a task
/// that reads its header and then starts the mode's task with the
/// declared client. Listeners without the key pay one `None` check.
pub fn spawn<G: Send + 'static>(
    client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerShared>,
    guard: G,
) {
    let Some(pp) = &ctx.plan.proxy_protocol else {
        return spawn_mode(client, peer, None, ctx, guard);
    };
    if !pp.trusts(peer.ip()) {
        return accept::refuse_untrusted(peer, &ctx);
    }
    tokio::spawn(async move {
        let Some(pp) = &ctx.plan.proxy_protocol else {
            unreachable!("checked above")
        };
        if let Some(d) = accept::declared(&client, peer, &ctx, pp).await {
            spawn_mode(client, d.peer, d.destination, ctx, guard);
        }
    });
}

/// Start the task that serves the connection in its listener's mode.
/// `peer` is the client (as a PROXY header declared it, if there was
/// one), `destination` the address the header said it connected to.
///
/// Each mode gets its own task type rather than one task whose future is
/// a `match` over all three: a task is as large as its future, and an
/// idle offloaded connection (most of a device fleet) should not carry
/// the L4 pump's or the passthrough parser's state around.
fn spawn_mode<G: Send + 'static>(
    client: TcpStream,
    peer: SocketAddr,
    destination: Option<SocketAddr>,
    ctx: Arc<ListenerShared>,
    guard: G,
) {
    match &ctx.mode {
        ModeRuntime::Tcp(_) => tokio::spawn(async move {
            let ModeRuntime::Tcp(pool) = &ctx.mode else {
                unreachable!("matched above")
            };
            forward(client, peer, destination, &ctx, pool).await;
            drop(guard);
        }),
        ModeRuntime::Passthrough(_) => tokio::spawn(async move {
            let ModeRuntime::Passthrough(pt) = &ctx.mode else {
                unreachable!("matched above")
            };
            crate::passthrough::serve(client, peer, destination, &ctx, pt).await;
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
    let header = match pool.plan.send_proxy {
        None => None,
        Some(version) => match destination.map_or_else(|| client.local_addr(), Ok) {
            Ok(dst) => Some(proxy_protocol::encode(version, peer, dst)),
            Err(e) => {
                tracing::debug!(listener = %ctx.plan.name, %peer, "connection ended: no local address for the PROXY header: {e}");
                return;
            }
        },
    };
    let connected = connect::first_success(pool, peer.ip(), |i| {
        connect::tcp_with_header(pool, i, header.as_deref())
    })
    .await;
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
