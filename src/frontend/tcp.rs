//! Plain L4 (`tcp`) listeners, and the last step of TLS passthrough:
//! pick a backend, connect (retrying the next backend on failure), then
//! pump bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{ListenerShared, ModeRuntime};
use crate::access_log::{Kind, Record};
use crate::balance::{connect, Backend, Pool};
use crate::l4::{self, PumpConfig, PumpEnd, PumpReport};
use crate::proxy_protocol;

/// What the access line of an L4 connection says besides how it ended.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub kind: Kind,
    pub started: Instant,
    /// Passthrough: the ClientHello's server name.
    pub sni: Option<&'a str>,
}

/// How an L4 connection went, for its access-log line.
pub struct Outcome<'a> {
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub connect: Option<Duration>,
    pub retries: u32,
    pub report: Option<&'a PumpReport>,
    pub close: &'a str,
}

/// Write the connection's access-log line, if the listener logs.
pub fn log(ctx: &ListenerShared, peer: SocketAddr, seen: &Seen, o: Outcome) {
    let Some(log) = &ctx.access_log else { return };
    let mut r = Record::new(seen.kind, &ctx.plan.name, peer);
    r.sni = seen.sni;
    r.status = o.status;
    if let Some(report) = o.report {
        r.bytes_in = report.upstream_bytes;
        r.bytes_out = report.downstream_bytes;
    }
    r.duration = seen.started.elapsed();
    r.upstream = o.upstream;
    r.upstream_connect = o.connect;
    r.retries = o.retries;
    r.close = Some(o.close);
    log.emit(&r);
}

/// An accepted connection: the socket, the client, and the address it
/// connected to if a PROXY header declared one.
pub struct Client {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub destination: Option<SocketAddr>,
}

/// Serve a connection of a `tcp` listener; `guard` counts it as open
/// until it ends.
///
/// A plain fn returning an `async move` block, here and below: an `async
/// fn` moves its arguments into locals, and its future then holds both
/// copies for the connection's whole life.
// Not an `async fn`: see the doc comment.
#[allow(clippy::manual_async_fn)]
pub fn serve<G: Send + 'static>(
    client: Client,
    ctx: Arc<ListenerShared>,
    guard: G,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let ModeRuntime::Tcp(pool) = &ctx.mode else {
            unreachable!("only tcp listeners spawn this")
        };
        let seen = Seen {
            kind: Kind::Tcp,
            started: Instant::now(),
            sni: None,
        };
        forward(&client, &ctx, pool, &seen).await;
        drop(guard);
    }
}

/// Connect to a backend of `pool` and pump bytes until the connection
/// ends. Also the last step of TLS passthrough.
///
/// A pool with `send_proxy` gets a PROXY header first, naming `peer` and
/// `destination` (or, without a declared one, the listener address the
/// client reached).
///
/// Everything comes by reference: the arguments of an async fn stay in
/// its future for the connection's life, next to the caller's copy.
pub fn forward<'a>(
    client: &'a Client,
    ctx: &'a ListenerShared,
    pool: &'a Pool,
    seen: &'a Seen<'_>,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        // Boxed: the connect's state (the member set, the PROXY header,
        // the attempts) lives only until it returns, while an unboxed one
        // would size the connection's task for its whole life.
        let connect = Box::pin(connect_backend(client, ctx, pool, seen));
        let Some(connected) = connect.await else {
            return;
        };
        let backend = &connected.backend;
        let _open = backend.track();
        let _ = connected.upstream.set_nodelay(ctx.plan.socket.nodelay);
        let cfg = PumpConfig {
            idle_timeout: ctx.plan.idle_timeout,
            splice: ctx.plan.splice,
        };
        let report = l4::pump(&client.stream, &connected.upstream, cfg, &ctx.metrics.bytes).await;
        let outcome = Outcome {
            status: 200,
            upstream: Some(backend.addr),
            connect: Some(connected.connect_time),
            retries: connected.retries,
            report: Some(&report),
            close: report.end.reason(),
        };
        let peer = client.peer;
        log(ctx, peer, seen, outcome);
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
}

/// A backend connection made for a client.
struct Connected {
    backend: Arc<Backend>,
    upstream: TcpStream,
    /// Attempts that failed before this one.
    retries: u32,
    connect_time: Duration,
}

/// Connect to a backend of `pool` (with its PROXY header), retrying the
/// next one on failure. None when no backend took the connection, which
/// is then counted and logged.
async fn connect_backend(
    client: &Client,
    ctx: &ListenerShared,
    pool: &Pool,
    seen: &Seen<'_>,
) -> Option<Connected> {
    let peer = client.peer;
    let refused = |close| Outcome {
        status: 502,
        upstream: None,
        connect: None,
        retries: 0,
        report: None,
        close,
    };
    // The member set as it is now: a discovery change publishes a new
    // one for the next connection.
    let set = pool.members();
    let header = match set.plan.send_proxy {
        None => None,
        Some(version) => match client
            .destination
            .map_or_else(|| client.stream.local_addr(), Ok)
        {
            Ok(dst) => Some(proxy_protocol::encode(version, peer, dst)),
            Err(e) => {
                tracing::debug!(listener = %ctx.plan.name, %peer, "connection ended: no local address for the PROXY header: {e}");
                log(ctx, peer, seen, refused("error"));
                return None;
            }
        },
    };
    let (set, header) = (&*set, header.as_deref());
    let asked = Instant::now();
    let mut attempts = 0u32;
    let connected = connect::first_success(set, peer.ip(), |b| {
        attempts += 1;
        async move { connect::tcp_with_header(set, &b, header).await }
    })
    .await;
    match connected {
        Ok((backend, upstream)) => Some(Connected {
            backend,
            upstream,
            retries: attempts - 1,
            connect_time: asked.elapsed(),
        }),
        Err(_) => {
            ctx.metrics.rejected_no_backend.inc();
            if let Some(held) = ctx.reject_log.allow() {
                // During a descriptor shortage the backends are fine: say
                // so, or an operator goes looking for a dead server.
                let why = if crate::shortage::remaining().is_some() {
                    "no descriptor for a backend connection"
                } else {
                    "no backend available"
                };
                tracing::warn!(listener = %ctx.plan.name, pool = %pool.name(), %peer, "connection closed: {why} ({held} rejections suppressed)");
            }
            let outcome = Outcome {
                retries: attempts.saturating_sub(1),
                ..refused("no_backend")
            };
            log(ctx, peer, seen, outcome);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future a `serve` fn returns, from the fn alone.
    fn future_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The guard the accept loop hands over.
    type Guard = super::super::accept::OpenConnection;

    /// A connection's task is allocated once, at its future's largest
    /// state, for the connection's whole life, and an idle device's L4 or
    /// passthrough connection is mostly that allocation (plus the two
    /// sockets' registrations with the reactor). The connect and the
    /// ClientHello peek are boxed, the pump is a small state machine, and
    /// no async fn takes its arguments by value: 776 and 1,024 bytes with
    /// Rust 1.95 (2,904 and 3,296 before). The L4 task fits tokio's task
    /// cell in 1 KiB: 1.3 KiB of RSS per idle L4 connection in all.
    #[test]
    fn the_connection_tasks_stay_small() {
        let tcp = future_size(super::serve::<Guard>);
        assert!(
            tcp <= 800,
            "the tcp connection task's future is {tcp} bytes"
        );
        let passthrough = future_size(super::super::passthrough::serve::<Guard>);
        assert!(
            passthrough <= 1100,
            "the passthrough connection task's future is {passthrough} bytes"
        );
    }
}
