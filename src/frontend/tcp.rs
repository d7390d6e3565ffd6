//! Plain L4 (`tcp`) listeners, and the last step of TLS passthrough:
//! pick a backend, connect (retrying the next backend on failure), then
//! pump bytes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::ListenerShared;
use crate::access_log::{Kind, Record};
use crate::balance::{connect, Pool};
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
    seen: Seen<'_>,
) {
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
        Some(version) => match destination.map_or_else(|| client.local_addr(), Ok) {
            Ok(dst) => Some(proxy_protocol::encode(version, peer, dst)),
            Err(e) => {
                tracing::debug!(listener = %ctx.plan.name, %peer, "connection ended: no local address for the PROXY header: {e}");
                log(ctx, peer, &seen, refused("error"));
                return;
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
    let connect_time = asked.elapsed();
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
        let outcome = Outcome {
            retries: attempts.saturating_sub(1),
            ..refused("no_backend")
        };
        log(ctx, peer, &seen, outcome);
        return;
    };
    let _open = backend.track();
    let _ = upstream.set_nodelay(ctx.plan.socket.nodelay);
    let cfg = PumpConfig {
        idle_timeout: ctx.plan.idle_timeout,
        splice: ctx.plan.splice,
    };
    let report = l4::pump(&client, &upstream, cfg, &ctx.metrics.bytes).await;
    let outcome = Outcome {
        status: 200,
        upstream: Some(backend.addr),
        connect: Some(connect_time),
        retries: attempts - 1,
        report: Some(&report),
        close: report.end.reason(),
    };
    log(ctx, peer, &seen, outcome);
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
