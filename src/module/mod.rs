//! The plug for in-process backends. A route can name a module wherever it
//! can name a pool; the proxy core knows nothing of what a module does.
//!
//! A module receives each HTTP request with the context of its connection
//! (peer address, listener, SNI, the verified client certificate) and
//! returns a response. To take over an upgraded stream (WebSocket), it
//! answers `101 Switching Protocols` and awaits `hyper::upgrade::on(&mut
//! request)` in a task of its own. Modules may also serve an
//! administration API on the admin listener under `/modules/NAME/`.

pub mod builtin;
pub mod devices;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

pub use crate::http::ClientCert;

/// Response bodies: anything that streams `Bytes`.
pub type Body = BoxBody<Bytes, hyper::Error>;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a module knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub peer: SocketAddr,
    pub listener: String,
    pub route: String,
    pub sni: Option<String>,
    /// The client certificate verified at the TLS handshake, if any.
    pub client_cert: Option<Arc<ClientCert>>,
}

pub trait Module: Send + Sync + 'static {
    /// Serve one request arriving on a listener route.
    fn handle(&self, req: Request<Incoming>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>>;

    /// Serve one request under `/modules/NAME/` on the admin listener
    /// (the path is passed unchanged). `None`: the module has no admin API.
    fn admin(&self, _req: Request<Incoming>) -> Option<BoxFuture<'_, Response<Body>>> {
        None
    }

    /// What the status page shows of the module: a small JSON object of
    /// counts, never a list of what it serves (that may be thousands of
    /// devices). `None`: nothing to show beyond its name.
    fn status(&self) -> BoxFuture<'_, Option<serde_json::Value>> {
        Box::pin(async { None })
    }

    /// Whether the module can do its work now: `Err(reason)` while
    /// something it depends on is out of reach (the devices module's
    /// database). While a module that is `required` (the default, see
    /// `ModulePlan::required`) is not ready, `/healthz` answers 503 with
    /// `NAME: reason`, so that a health checker in front moves the
    /// traffic to a balancer that can serve it; the status page shows it
    /// either way. Called on every health check: answer from memory.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Called once when the graceful shutdown starts: close the module's
    /// long-lived streams (WebSockets), spreading the closes over
    /// `spread` so that clients do not all reconnect at once, and return
    /// once they are closed. The process exits when this and every
    /// connection are done, or at `drain_timeout`.
    fn drain(&self, _spread: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// `drain`, for a drain that tells WebSockets `reason` (an upgrade
    /// says 1012, "service restart": come back to the same address).
    /// Modules that close streams of their own use the reason's code;
    /// the default is `drain`.
    fn drain_with(
        &self,
        spread: std::time::Duration,
        _reason: crate::drain::CloseReason,
    ) -> BoxFuture<'_, ()> {
        self.drain(spread)
    }

    /// A binary upgrade (`fleetgate upgrade`) is handing the process over:
    /// release what only one process may hold at a time (an embedded
    /// database), finishing the work in flight first, and return once it
    /// is released; the new process opens it next. This process keeps
    /// serving its established connections until its drain, without what
    /// it released. `Err` stops the upgrade (the old process stays).
    /// Default: nothing to release (a shared database is shared by design).
    fn handover(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// The upgrade failed after `handover`: take back what was released
    /// and serve as before.
    fn resume(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Called once when the process is stopping, after the drain.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// What a module is given when it is built.
#[derive(Debug, Clone)]
pub struct ModuleEnv {
    /// The module's name (its key under `[module]`).
    pub name: String,
    /// Directory for the module's own files (`global.data_dir`/NAME).
    pub data_dir: PathBuf,
    /// The certificates this module revokes. Offload listeners whose
    /// `client_ca` is `module:NAME` check every handshake against this
    /// same list (validation hands it to them; a reload keeps it), so a
    /// module that issues client certificates keeps it up to date. Other
    /// modules leave it alone.
    pub revocations: crate::tls::revocation::RevocationList,
    /// The balancer's metrics registry: series a module registers here
    /// appear in `/metrics` with the `fleetgate_` prefix. Label them with
    /// the module's name (a const label) so that two instances can share it.
    pub metrics: prometheus::Registry,
}

/// Builds a module from its TOML table. An error names what is wrong; the
/// caller adds the file and key.
pub type Factory = Arc<
    dyn Fn(&toml::Value, &ModuleEnv) -> BoxFuture<'static, anyhow::Result<Arc<dyn Module>>>
        + Send
        + Sync,
>;

/// Module kinds by name. `fleetgate run` registers the built-in ones; a
/// program embedding fleetgate can register its own.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<String, Factory>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register(&mut self, kind: &str, factory: Factory) {
        self.kinds.insert(kind.to_string(), factory);
    }

    pub fn get(&self, kind: &str) -> Option<&Factory> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }
}
