//! The front door: listening sockets, the accept loop, and one file per
//! listener mode (`tcp`, `passthrough`, `offload`) that serves an
//! accepted connection. `spawn` dispatches by mode, after the PROXY
//! protocol header where the listener takes one.
//!
//! Dependencies go one way: the runtime builds a `ListenerShared` per
//! listener and runs `accept::accept_loop`; this module reads pools
//! (`balance`), serves offloaded HTTP through `http`, and imports nothing
//! that imports it back.

pub mod accept;
pub mod bind;
pub mod metrics;
pub mod offload;
pub mod passthrough;
pub mod proxy_header;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use crate::balance::Pool;
use crate::config::ListenerPlan;
use crate::logging::RateLimit;
use crate::source_limits::SourceLimits;

pub use accept::accept_loop;
pub use bind::bind_group;
pub use metrics::ListenerMetrics;

/// Everything a connection needs from the current plan. Swapped whole on
/// reload; a connection keeps the `Arc` it started with, whose pools are
/// live (they follow discovery) and whose offload routes it looks up
/// again per request.
pub struct ListenerShared {
    pub plan: ListenerPlan,
    pub mode: ModeRuntime,
    pub metrics: ListenerMetrics,
    /// Kept across reloads, so that a reload does not reopen the flood
    /// of messages it holds back.
    pub reject_log: Arc<RateLimit>,
    /// `None` unless `[listener.per_source]` is configured.
    pub source_limits: Option<SourceLimits>,
    /// `None` unless the listener has `access_log`.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}

/// The listener mode with its pools resolved for this plan.
pub enum ModeRuntime {
    Tcp(Arc<Pool>),
    Passthrough(passthrough::Passthrough),
    /// The slot a reload stores the listener's new routes in; connections
    /// read it per request.
    Offload(Arc<ArcSwap<crate::http::Offload>>),
}

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
        return proxy_header::refuse_untrusted(peer, &ctx);
    }
    tokio::spawn(async move {
        let Some(pp) = &ctx.plan.proxy_protocol else {
            unreachable!("checked above")
        };
        if let Some(d) = proxy_header::declared(&client, peer, &ctx, pp).await {
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
        ModeRuntime::Tcp(_) => {
            let client = tcp::Client {
                stream: client,
                peer,
                destination,
            };
            tokio::spawn(tcp::serve(client, ctx, guard))
        }
        ModeRuntime::Passthrough(_) => {
            let client = tcp::Client {
                stream: client,
                peer,
                destination,
            };
            tokio::spawn(passthrough::serve(client, ctx, guard))
        }
        ModeRuntime::Offload(slot) => {
            let slot = slot.clone();
            // The offload path needs only its offload state (which has
            // the listener's name), not the whole plan.
            drop(ctx);
            offload::spawn(client, peer, slot, guard)
        }
    };
}
