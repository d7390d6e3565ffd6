//! One offloaded HTTP request: check the host, find the route, forward to
//! the route's pool, and answer errors with a short body and a counter.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, HOST, STRICT_TRANSPORT_SECURITY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode, Version};

use super::activity::BodyWatch;
use super::at_end::AtEnd;
use super::headers::{self, strip_hop_by_hop};
use super::route::request_host;
use super::upstream::{Body, GiveBack, PooledBody, Upstream};
use super::{ConnInfo, Offload, RouteRuntime, TargetRuntime};
use crate::balance::connect::Unreachable;

pub async fn handle(
    offload: Arc<Offload>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
    body_watch: BodyWatch,
) -> Response<Body> {
    let started = Instant::now();
    let host = request_host(&req);
    if let Some(allowed) = &offload.http.allowed_hosts {
        if !allowed.iter().any(|h| h.matches(&host)) {
            offload.metrics.bad_host.inc();
            return finish(
                &offload,
                None,
                started,
                error(StatusCode::MISDIRECTED_REQUEST, "unknown host\n"),
            );
        }
    }
    let path = req.uri().path();
    let Some(route) = offload.routes.iter().find(|r| r.plan.matches(&host, path)) else {
        offload.metrics.no_route.inc();
        return finish(
            &offload,
            None,
            started,
            error(StatusCode::NOT_FOUND, "no route\n"),
        );
    };
    let resp = match &route.target {
        TargetRuntime::Pool(up) => proxy(&offload, route, up, &conn, req, body_watch, &host).await,
        TargetRuntime::Module(module) => {
            // The module reads the body itself, so its end is not seen
            // here: the watch keeps the connection with hyper.
            drop(body_watch);
            let mut req = req;
            offload.cert_headers.strip(req.headers_mut());
            let ctx = crate::module::RequestContext {
                peer: conn.peer,
                listener: conn.listener.to_string(),
                route: route.plan.name.clone(),
                sni: conn.sni.clone(),
                client_cert: conn.client_cert.clone(),
            };
            module.handle(req, ctx).await
        }
    };
    finish(&offload, Some(route), started, resp)
}

/// Count the answer and add listener-wide response headers.
fn finish(
    offload: &Offload,
    route: Option<&RouteRuntime>,
    started: Instant,
    mut resp: Response<Body>,
) -> Response<Body> {
    if let Some(r) = route {
        let class = (resp.status().as_u16() / 100).clamp(1, 5) as usize - 1;
        r.requests[class].inc();
        r.duration.observe(started.elapsed().as_secs_f64());
    }
    if let Some(hsts) = &offload.http.hsts {
        resp.headers_mut()
            .insert(STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    resp
}

pub fn error(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A reused connection idle this long may be closed by its backend while
/// a request is being written to it; common servers' keep-alive timeouts
/// are several seconds (nginx 75 s, Apache and Node.js 5 s).
const RACY_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A body-less copy of a request's head, to send it again.
fn copy_head<B>(req: &Request<B>) -> Request<Body> {
    let mut copy = Request::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    copy
}

async fn proxy(
    offload: &Offload,
    route: &RouteRuntime,
    up: &Arc<Upstream>,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    body_watch: BodyWatch,
    host: &str,
) -> Response<Body> {
    let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    offload.cert_headers.strip(&mut parts.headers);
    if route.plan.forward_cert {
        if let Some(cert) = &conn.client_cert {
            offload.cert_headers.set(&mut parts.headers, cert);
        }
    }
    let peer = conn.peer.ip();
    let trusted = offload.http.trusts(peer);
    headers::set_forwarded(&mut parts.headers, &conn.peer_value, trusted, host);
    if !parts.headers.contains_key(HOST) {
        // HTTP/2 carries the host in :authority; HTTP/1.1 needs Host.
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(HOST, v);
        }
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        // Absolute form (HTTP/2, or a proxy-style HTTP/1.1 request): the
        // backend gets the origin form. An HTTP/1.1 request in origin form
        // is left as it is, without a copy.
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = None;
        uri.authority = None;
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = hyper::Uri::from_parts(uri).unwrap_or_default();
    }
    parts.version = Version::HTTP_11;

    // A request without a body can be sent again if a reused keep-alive
    // connection turns out to have been closed by the backend.
    let resendable = body.is_end_stream() && idempotent(&parts.method);
    let body = AtEnd::new(body, body_watch);
    let mut request = Request::from_parts(parts, body.boxed());

    let mut checkout = match up.checkout(peer, upgrade, upgrade).await {
        Ok(c) => c,
        Err(Unreachable::NoBackend) => {
            offload.metrics.no_backend.inc();
            return error(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n");
        }
        Err(Unreachable::AllFailed) => {
            offload.metrics.upstream_failed.inc();
            return error(StatusCode::BAD_GATEWAY, "backend unreachable\n");
        }
    };
    let backend = up.pool.members[checkout.index].backend.clone();
    let _open = backend.track();
    let timeout = offload.http.response_timeout;
    // hyper hands back a request it did not start writing (the connection
    // was found closed first), so that case needs no copy. A copy is kept
    // only for the race where the backend closes a connection while the
    // request is on its way: that happens to a connection that sat idle
    // about as long as the backend's keep-alive timeout, not to one given
    // back a moment ago, and copying every request's headers for it cost
    // an allocation per header map.
    let template = match checkout.idled {
        Some(idled) if resendable && idled >= RACY_IDLE => Some(copy_head(&request)),
        _ => None,
    };
    let result = loop {
        let sent = tokio::time::timeout(timeout, checkout.sender.try_send_request(request)).await;
        let again = match sent {
            Ok(Err(mut e)) if checkout.idled.is_some() => match e.take_message() {
                Some(unsent) => unsent,
                None => {
                    let closed = e.error().is_canceled() || e.error().is_incomplete_message();
                    match &template {
                        Some(t) if closed => copy_head(t),
                        _ => break Ok(Err(e.into_error())),
                    }
                }
            },
            Ok(r) => break Ok(r.map_err(|e| e.into_error())),
            Err(elapsed) => break Err(elapsed),
        };
        tracing::debug!(backend = %backend.addr, "reused connection was closed by the backend; resending on a new one");
        match up.checkout(peer, true, false).await {
            Ok(c) => checkout = c,
            Err(_) => {
                offload.metrics.upstream_failed.inc();
                return error(StatusCode::BAD_GATEWAY, "backend unreachable\n");
            }
        }
        request = again;
    };
    let mut resp = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(backend = %backend.addr, "upstream request failed: {e}");
            offload.metrics.upstream_failed.inc();
            return error(StatusCode::BAD_GATEWAY, "backend failed\n");
        }
        Err(_) => {
            offload.metrics.upstream_timeout.inc();
            return error(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n");
        }
    };

    if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status()) {
        let backend_side = hyper::upgrade::on(&mut resp);
        let websocket = resp
            .headers()
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        super::upgrade::spawn_relay(client_side, backend_side, websocket, offload, conn);
        let (mut parts, _) = resp.into_parts();
        // Keep Upgrade/Connection: they are the point of a 101.
        let up_hdr = parts.headers.get(UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers, true);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = up_hdr {
            parts.headers.insert(UPGRADE, u);
        }
        return Response::from_parts(
            parts,
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    if upgrade {
        // A refused upgrade: the connection was opened for it alone.
        return Response::from_parts(parts, body.boxed());
    }
    let body = PooledBody::new(body, GiveBack::new(up.clone(), checkout));
    Response::from_parts(parts, body.boxed())
}
