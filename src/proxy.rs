//! Serving one accepted connection in `tcp` mode: pick a backend, connect
//! (retrying the next backend on failure), then pump bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::l4::{self, PumpConfig, PumpEnd};
use crate::listener::ListenerShared;

pub async fn serve(client: TcpStream, peer: SocketAddr, ctx: Arc<ListenerShared>) {
    let pool = &ctx.pool;
    let Some((index, upstream)) = connect(&ctx, peer).await else {
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

/// Connect to a backend, trying up to `retries` further backends when a
/// connect fails, so a client sees no error while any backend is up.
async fn connect(ctx: &ListenerShared, peer: SocketAddr) -> Option<(usize, TcpStream)> {
    let pool = &ctx.pool;
    let policy = pool.passive_policy();
    let attempts = pool.plan.retries as usize + 1;
    let mut tried: Vec<usize> = Vec::with_capacity(attempts);
    while tried.len() < attempts {
        let index = pool.pick(peer.ip(), &tried)?;
        tried.push(index);
        let backend = &pool.members[index].backend;
        let started = Instant::now();
        match tokio::time::timeout(pool.plan.connect_timeout, TcpStream::connect(backend.addr))
            .await
        {
            Ok(Ok(stream)) => {
                backend
                    .metrics
                    .connect_seconds
                    .observe(started.elapsed().as_secs_f64());
                return Some((index, stream));
            }
            Ok(Err(e)) => {
                tracing::debug!(pool = %pool.name(), backend = %backend.addr, "connect failed: {e}");
                backend.record_failure(policy);
            }
            Err(_) => {
                tracing::debug!(pool = %pool.name(), backend = %backend.addr, "connect timed out");
                backend.record_failure(policy);
            }
        }
    }
    None
}
