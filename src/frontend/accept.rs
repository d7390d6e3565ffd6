//! The accept loop: ACL, connection limit, descriptor reserve and
//! per-source limits are checked before anything else, and no accept
//! error ever ends the loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::ListenerShared;
use crate::drain::{ConnectionTracker, TrackedConnection};
use crate::logging::RateLimit;
use crate::source_limits::{Refusal, SourceGuard};

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
        let _ = super::bind::tune(socket2::SockRef::from(&stream), &ctx.plan.socket);
        let guard = OpenConnection::new(active.clone(), &ctx, tracker.clone(), source);
        super::spawn(stream, peer, ctx, guard);
    }
}

/// Counts a connection in the listener's limit, its gauge and the
/// process-wide drain tracker for as long as it lives.
pub(super) struct OpenConnection {
    listener_active: Arc<AtomicUsize>,
    gauge: IntGauge,
    _tracked: TrackedConnection,
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
