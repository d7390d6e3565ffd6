//! Listening sockets and the accept loop: ACL, connection limit,
//! descriptor reserve and per-source limits are checked before anything
//! else, and no accept error ever ends the loop.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::balance::Pool;
use crate::config::{ListenerPlan, SocketOptions};
use crate::l4::ByteCounters;
use crate::logging::RateLimit;
use crate::metrics::{reject, Metrics};
use crate::runtime::ConnectionTracker;
use crate::source_limits::{Refusal, SourceGuard, SourceLimits};

/// Label handles for one listener, resolved when the plan is applied.
pub struct ListenerMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub rejected_acl: IntCounter,
    pub rejected_limit: IntCounter,
    pub rejected_no_backend: IntCounter,
    pub rejected_source_rate: IntCounter,
    pub rejected_source_connections: IntCounter,
    pub rejected_descriptor_reserve: IntCounter,
    pub accept_emfile: IntCounter,
    pub accept_other: IntCounter,
    pub bytes: ByteCounters,
    pub proxy_protocol: crate::proxy_protocol::accept::Rejections,
}

impl ListenerMetrics {
    pub fn new(m: &Metrics, name: &str) -> Self {
        let rej = |r| m.connections_rejected.with_label_values(&[name, r]);
        ListenerMetrics {
            accepted: m.connections_accepted.with_label_values(&[name]),
            active: m.connections_active.with_label_values(&[name]),
            rejected_acl: rej(reject::ACL),
            rejected_limit: rej(reject::LIMIT),
            rejected_no_backend: rej(reject::NO_BACKEND),
            rejected_source_rate: rej(reject::SOURCE_RATE),
            rejected_source_connections: rej(reject::SOURCE_CONNECTIONS),
            rejected_descriptor_reserve: rej(reject::DESCRIPTOR_RESERVE),
            accept_emfile: m.accept_errors.with_label_values(&[name, "emfile"]),
            accept_other: m.accept_errors.with_label_values(&[name, "other"]),
            bytes: ByteCounters {
                upstream: m.bytes.with_label_values(&[name, "upstream"]),
                downstream: m.bytes.with_label_values(&[name, "downstream"]),
            },
            proxy_protocol: crate::proxy_protocol::accept::Rejections::new(m, name),
        }
    }
}

/// Everything a connection needs from the current plan. Swapped whole on
/// reload; a connection keeps the `Arc` it started with.
pub struct ListenerShared {
    pub plan: ListenerPlan,
    pub mode: ModeRuntime,
    pub metrics: ListenerMetrics,
    pub reject_log: RateLimit,
    /// `None` unless `[listener.per_source]` is configured.
    pub source_limits: Option<SourceLimits>,
}

/// The listener mode with its pools resolved for this plan.
pub enum ModeRuntime {
    Tcp(Arc<Pool>),
    Passthrough(crate::passthrough::Passthrough),
    Offload(Arc<crate::http::Offload>),
}

/// Bind a listener's sockets, one per connection worker. With more than
/// one they form an SO_REUSEPORT group: the kernel spreads new connections
/// over the workers, and no worker is woken for a connection another one
/// takes. A port that is taken by a socket without SO_REUSEPORT (another
/// program) still fails the first bind.
pub fn bind_group(
    addr: SocketAddr,
    opts: &SocketOptions,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let reuse_port = opts.reuse_port || workers > 1;
    let first = bind(addr, opts, reuse_port)?;
    // Port 0 binds an ephemeral port: the rest of the group joins that one.
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..workers {
        group.push(bind(bound, opts, true)?);
    }
    Ok(group)
}

/// Bind one listening socket with the configured options.
fn bind(
    addr: SocketAddr,
    opts: &SocketOptions,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only; bind `0.0.0.0` separately for IPv4.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Linux hands these to every accepted socket, which saves three or
    // four setsockopt calls per connection; elsewhere `tune` sets them.
    #[cfg(target_os = "linux")]
    tune(SockRef::from(&socket), opts)?;
    socket.bind(&addr.into())?;
    socket.listen(opts.backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Per-connection socket options: on the listening socket where accepted
/// sockets inherit them (Linux), on each accepted socket elsewhere.
fn tune(sock: SockRef<'_>, opts: &SocketOptions) -> io::Result<()> {
    sock.set_nodelay(opts.nodelay)?;
    if opts.keepalive {
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10));
        sock.set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

/// The accept loop of one listening address. Runs until `stop` flips.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<ArcSwap<ListenerShared>>,
    active: Arc<AtomicUsize>,
    tracker: Arc<ConnectionTracker>,
    mut stop: watch::Receiver<bool>,
) {
    let error_log = RateLimit::new(1000);
    loop {
        if let Some(pause) = crate::shortage::remaining() {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                let ctx = shared.load();
                let out_of_files = crate::shortage::is_shortage(&e);
                if out_of_files {
                    crate::shortage::note();
                    ctx.metrics.accept_emfile.inc();
                } else {
                    ctx.metrics.accept_other.inc();
                }
                if let Some(held) = error_log.allow() {
                    tracing::warn!(listener = %ctx.plan.name, "accept failed: {e} ({held} similar errors suppressed)");
                }
                // Out of descriptors, the shortage pause above applies to
                // every listener; other errors get a short pause of their
                // own rather than a spin.
                if !out_of_files {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                continue;
            }
        };
        let ctx = shared.load_full();
        ctx.metrics.accepted.inc();
        if !ctx.plan.acl.admits(peer.ip()) {
            ctx.metrics.rejected_acl.inc();
            if let Some(held) = ctx.reject_log.allow() {
                tracing::info!(listener = %ctx.plan.name, %peer, "connection rejected: denied by ACL ({held} rejections suppressed)");
            }
            continue;
        }
        let limit = ctx.plan.max_connections;
        if limit > 0 && active.load(Ordering::Relaxed) >= limit {
            ctx.metrics.rejected_limit.inc();
            if let Some(held) = ctx.reject_log.allow() {
                tracing::info!(listener = %ctx.plan.name, %peer, limit, "connection rejected: connection limit reached ({held} rejections suppressed)");
            }
            continue;
        }
        if crate::shortage::in_reserve(&stream) {
            // The descriptors left are the admin listener's and the
            // established connections' (their backend sockets): refuse,
            // and pause accepting as on a shortage so that the queue
            // waits instead of draining into refusals.
            crate::shortage::note();
            ctx.metrics.rejected_descriptor_reserve.inc();
            if let Some(held) = ctx.reject_log.allow() {
                tracing::warn!(listener = %ctx.plan.name, %peer, "connection rejected: descriptor reserve reached ({held} rejections suppressed)");
            }
            continue;
        }
        let source = match &ctx.source_limits {
            None => None,
            Some(limits) => match limits.admit(peer.ip()) {
                Ok(g) => Some(g),
                Err(why) => {
                    let (counter, what) = match why {
                        Refusal::Rate => (&ctx.metrics.rejected_source_rate, "rate"),
                        Refusal::Connections => {
                            (&ctx.metrics.rejected_source_connections, "connections")
                        }
                    };
                    counter.inc();
                    if let Some(held) = ctx.reject_log.allow() {
                        tracing::info!(listener = %ctx.plan.name, %peer, "connection rejected: per-source {what} limit reached ({held} rejections suppressed)");
                    }
                    continue;
                }
            },
        };
        #[cfg(not(target_os = "linux"))]
        let _ = tune(SockRef::from(&stream), &ctx.plan.socket);
        let guard = OpenConnection::new(active.clone(), &ctx, tracker.clone(), source);
        crate::proxy::spawn(stream, peer, ctx, guard);
    }
}

/// Counts a connection in the listener's limit, its gauge and the
/// process-wide drain tracker for as long as it lives.
struct OpenConnection {
    listener_active: Arc<AtomicUsize>,
    gauge: IntGauge,
    _tracked: crate::runtime::TrackedConnection,
    _source: Option<SourceGuard>,
}

impl OpenConnection {
    fn new(
        listener_active: Arc<AtomicUsize>,
        ctx: &ListenerShared,
        tracker: Arc<ConnectionTracker>,
        source: Option<SourceGuard>,
    ) -> Self {
        listener_active.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.active.inc();
        OpenConnection {
            listener_active,
            gauge: ctx.metrics.active.clone(),
            _tracked: ConnectionTracker::track(tracker),
            _source: source,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.listener_active.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// The accept path relies on accepted sockets inheriting TCP_NODELAY
    /// and the keep-alive settings from the listening socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listener_options() {
        for (nodelay, keepalive) in [(true, true), (false, false)] {
            let opts = SocketOptions {
                reuse_port: false,
                backlog: 16,
                nodelay,
                keepalive,
            };
            let group = bind_group("127.0.0.1:0".parse().unwrap(), &opts, 2).unwrap();
            assert_eq!(group.len(), 2);
            let addr = group[0].local_addr().unwrap();
            assert_eq!(
                group[1].local_addr().unwrap(),
                addr,
                "one port for the group"
            );
            let listeners: Vec<TcpListener> = group
                .into_iter()
                .map(|l| TcpListener::from_std(l).unwrap())
                .collect();
            let _client = TcpStream::connect(addr).await.unwrap();
            // The kernel puts the connection in one of the group's queues.
            let (accepted, _) = tokio::select! {
                r = listeners[0].accept() => r.unwrap(),
                r = listeners[1].accept() => r.unwrap(),
            };
            let sock = SockRef::from(&accepted);
            assert_eq!(sock.nodelay().unwrap(), nodelay);
            assert_eq!(sock.keepalive().unwrap(), keepalive);
            if keepalive {
                assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(60));
                assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(10));
            }
        }
    }
}
