//! A minimal fleetgate module, built outside the crate: it answers every
//! request with JSON naming the peer address and the verified client
//! certificate's subject, and serves a one-endpoint admin API.
//!
//! Run fleetgate with it (the config routes to `module = "hello"` and has
//! a `[module.hello]` table, optionally with `greeting = "..."`):
//!
//! ```text
//! cargo run --example hello_module -- fleetgate.toml
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetgate::module::{Body, BoxFuture, Factory, Module, Registry, RequestContext};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

/// The module: its configuration plus a request counter for the admin API.
pub struct Hello {
    greeting: String,
    served: AtomicU64,
}

impl Hello {
    /// The answer for a request, separate from hyper's types so that it is
    /// easy to test.
    pub fn answer(&self, path: &str, ctx: &RequestContext) -> serde_json::Value {
        self.served.fetch_add(1, Ordering::Relaxed);
        serde_json::json!({
            "greeting": self.greeting,
            "path": path,
            "peer": ctx.peer.to_string(),
            "listener": ctx.listener,
            "route": ctx.route,
            "sni": ctx.sni,
            "client_subject": ctx.client_cert.as_ref().map(|c| c.subject.clone()),
            "client_sha256": ctx.client_cert.as_ref().map(|c| c.sha256.clone()),
        })
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let body = Full::new(Bytes::from(v.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

impl Module for Hello {
    fn handle(&self, req: Request<Incoming>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>> {
        let answer = self.answer(req.uri().path(), &ctx);
        Box::pin(async move { json(StatusCode::OK, &answer) })
    }

    fn admin(&self, _req: Request<Incoming>) -> Option<BoxFuture<'_, Response<Body>>> {
        let served = self.served.load(Ordering::Relaxed);
        Some(Box::pin(async move {
            json(StatusCode::OK, &serde_json::json!({ "served": served }))
        }))
    }
}

/// Builds `Hello` from its `[module.NAME]` table.
pub fn factory() -> Factory {
    Arc::new(|value, _env| {
        let greeting = value
            .get("greeting")
            .and_then(|g| g.as_str())
            .unwrap_or("hello")
            .to_string();
        Box::pin(async move {
            if greeting.is_empty() {
                anyhow::bail!("greeting must not be empty");
            }
            Ok(Arc::new(Hello {
                greeting,
                served: AtomicU64::new(0),
            }) as Arc<dyn Module>)
        })
    })
}

/// The built-in kinds plus `hello`.
pub fn registry() -> Registry {
    let mut r = fleetgate::module::builtin::registry();
    r.register("hello", factory());
    r
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fleetgate.toml".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let registry = registry();
        let plan = fleetgate::config::load_with(std::path::Path::new(&path), &registry)?;
        let admin = fleetgate::admin::bind(plan.admin_bind).await?;
        let metrics = Arc::new(fleetgate::metrics::Metrics::new());
        let runtime =
            fleetgate::runtime::Runtime::start_with_modules(plan, metrics, &registry).await?;
        tokio::spawn(fleetgate::admin::serve(admin, runtime));
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
