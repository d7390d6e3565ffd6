//! The admin listener: `/metrics` (Prometheus text), `/healthz`, the
//! status page at `/` and its JSON twin `/status`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};

use crate::module::Body;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::logging::RateLimit;
use crate::runtime::Runtime;

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin: cannot bind {addr}: {e}"))
}

/// The admin listener: the socket handed over by the process being
/// upgraded, if there is one for `addr`, else a fresh bind.
pub async fn adopt_or_bind(
    addr: SocketAddr,
    inherited: Option<std::net::TcpListener>,
) -> anyhow::Result<TcpListener> {
    match inherited {
        None => bind(addr).await,
        Some(sock) => {
            sock.set_nonblocking(true)?;
            TcpListener::from_std(sock)
                .map_err(|e| anyhow::anyhow!("admin: cannot use the socket for {addr}: {e}"))
        }
    }
}

/// Serve until the process exits. While an upgrade has paused accepting
/// (`Runtime::pause_accepting`), connections wait in the socket's queue,
/// for the new process or for this one if the upgrade fails.
pub async fn serve(listener: TcpListener, rt: Arc<Runtime>) {
    // Out of descriptors, accept fails every few milliseconds: one line a
    // second says so without flooding the log.
    let error_log = RateLimit::new(1000);
    let mut accepting = rt.accepting();
    loop {
        if !*accepting.borrow_and_update() {
            if accepting.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = accepting.changed() => continue,
        };
        let (stream, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                if let Some(held) = error_log.allow() {
                    tracing::warn!("admin accept failed: {e} ({held} similar errors suppressed)");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, Infallible>(dispatch(rt, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn dispatch(rt: Arc<Runtime>, req: Request<Incoming>) -> Response<Body> {
    // `/modules/NAME/...` belongs to the module NAME's admin API.
    if let Some(rest) = req.uri().path().strip_prefix("/modules/") {
        let name = rest.split('/').next().unwrap_or("");
        return match rt.modules.get(name).and_then(|m| m.admin(req)) {
            Some(fut) => fut.await,
            None => boxed(text(StatusCode::NOT_FOUND, "no such module admin API\n")),
        };
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/") => {
            let doc = crate::status::document(&rt).await;
            boxed(status_page(&doc))
        }
        (&Method::GET, "/status") => {
            let doc = crate::status::document(&rt).await;
            boxed(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(
                        serde_json::to_vec_pretty(&doc).expect("JSON of plain values"),
                    )))
                    .expect("static response"),
            )
        }
        _ => boxed(route(&rt, req)),
    }
}

/// The page loads nothing from anywhere: the policy says so to the
/// browser, which then also refuses anything injected into it.
fn status_page(doc: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .header(
            "content-security-policy",
            crate::status::page::CONTENT_SECURITY_POLICY,
        )
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(crate::status::page::render(doc))))
        .expect("static response")
}

fn boxed(r: Response<Full<Bytes>>) -> Response<Body> {
    r.map(|b| b.map_err(|never| match never {}).boxed())
}

fn route(rt: &Runtime, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => Response::builder()
            .header("content-type", prometheus::TEXT_FORMAT)
            .body(Full::new(Bytes::from(rt.metrics.render())))
            .expect("static response"),
        // A draining process still answers (it serves its connections
        // to the end) but must not be sent new ones: a health checker in
        // front (keepalived, a cloud load balancer) moves traffic away.
        (&Method::GET, "/healthz") if rt.drain.is_announced() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        (&Method::GET, "/healthz") => match not_ready(rt) {
            Some(why) => Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header("content-type", "text/plain; charset=utf-8")
                .body(Full::new(Bytes::from(why)))
                .expect("static response"),
            None => text(StatusCode::OK, "ok\n"),
        },
        (_, "/" | "/metrics" | "/healthz" | "/status") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Why the balancer is not ready, one `NAME: reason` line per required
/// module that cannot do its work (its database is out of reach): it
/// would answer its clients with errors, so a health checker in front
/// should send them to a balancer that can serve them. `None`: ready.
fn not_ready(rt: &Runtime) -> Option<String> {
    let plan = rt.plan();
    let why: String = plan
        .modules
        .iter()
        .filter(|m| m.required)
        .filter_map(|m| {
            let reason = rt.modules.get(&m.name)?.ready().err()?;
            Some(format!("{}: {reason}\n", m.name))
        })
        .collect();
    (!why.is_empty()).then_some(why)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response")
}
