//! TLS passthrough: read the ClientHello without consuming it, route on
//! its SNI, then pump the untouched bytes (splice) to the chosen pool.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounterVec;

use super::tcp::{Client, Outcome, Seen};
use super::{ListenerShared, ModeRuntime};
use crate::access_log::Kind;
use crate::balance::Pool;
use crate::host_match::HostMatch;
use crate::tls::client_hello::peek_client_hello;

pub struct Passthrough {
    pub rules: Vec<(HostMatch, Arc<Pool>)>,
    /// For a name no rule matches, and (unless `reject_no_sni`) no name.
    pub default: Option<Arc<Pool>>,
    pub reject_no_sni: bool,
    pub hello_timeout: Duration,
    pub hello_max_bytes: usize,
    /// `fleetgate_tls_client_hello_rejected_total`, by reason.
    pub rejected: IntCounterVec,
}

impl Passthrough {
    /// The pool for a ClientHello's server name, if any.
    pub fn choose(&self, sni: Option<&str>) -> Result<&Arc<Pool>, &'static str> {
        match sni {
            Some(name) => self
                .rules
                .iter()
                .find(|(m, _)| m.matches(name))
                .map(|(_, p)| p)
                .or(self.default.as_ref())
                .ok_or("no_route"),
            None if self.reject_no_sni => Err("no_sni"),
            None => self.default.as_ref().ok_or("no_sni"),
        }
    }
}

/// Serve a connection of a passthrough listener; `guard` counts it as
/// open until it ends. A plain fn returning an `async move` block for the
/// reason given at `tcp::serve`.
// Not an `async fn`: see the doc comment.
#[allow(clippy::manual_async_fn)]
pub fn serve<G: Send + 'static>(
    client: Client,
    ctx: Arc<ListenerShared>,
    guard: G,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let ModeRuntime::Passthrough(pt) = &ctx.mode else {
            unreachable!("only passthrough listeners spawn this")
        };
        route(&client, &ctx, pt).await;
        drop(guard);
    }
}

/// Read the ClientHello, then forward to the pool its name routes to.
async fn route(client: &Client, ctx: &ListenerShared, pt: &Passthrough) {
    let peer = client.peer;
    let listener = ctx.plan.name.as_str();
    let started = std::time::Instant::now();
    let reject = |reason: &str, sni: Option<&str>, detail: &dyn std::fmt::Display| {
        pt.rejected.with_label_values(&[listener, reason]).inc();
        let seen = Seen {
            kind: Kind::Passthrough,
            started,
            sni,
        };
        // A ClientHello that could not be read is a bad request; a name
        // no rule takes is refused.
        let status = if sni.is_some() || reason == "no_sni" {
            403
        } else {
            400
        };
        let outcome = Outcome {
            status,
            upstream: None,
            connect: None,
            retries: 0,
            report: None,
            close: reason,
        };
        super::tcp::log(ctx, peer, &seen, outcome);
        if let Some(held) = ctx.reject_log.allow() {
            tracing::info!(listener, %peer, reason, "passthrough connection closed: {detail} ({held} rejections suppressed)");
        }
    };
    // Boxed: the peek's state lives only until the hello is read.
    let peek = Box::pin(peek_client_hello(
        &client.stream,
        pt.hello_max_bytes,
        pt.hello_timeout,
    ));
    let hello = match peek.await {
        Ok(h) => h,
        Err(e) => return reject(e.reason(), None, &e),
    };
    let sni = hello.sni.as_deref();
    match pt.choose(sni) {
        Ok(pool) => {
            let seen = Seen {
                kind: Kind::Passthrough,
                started,
                sni,
            };
            super::tcp::forward(client, ctx, pool, &seen).await
        }
        Err(reason) => reject(
            reason,
            sni,
            &format_args!("no pool for server name {:?}", hello.sni),
        ),
    }
}
