//! One offloaded HTTP request: check the host, find the route, forward to
//! the route's pool, and answer errors with a short body and a counter.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, STRICT_TRANSPORT_SECURITY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode, Version};

use super::access::{Counted, Slot};
use super::activity::BodyWatch;
use super::at_end::AtEnd;
use super::head::{self, Rejected};
use super::headers::{self, strip_hop_by_hop};
use super::upstream::{Body, GiveBack, PooledBody, Upstream};
use super::{ConnInfo, Offload, RouteRuntime, TargetRuntime};
use crate::balance::connect::Unreachable;

pub async fn handle(
    offload: Arc<Offload>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
    body_watch: BodyWatch,
    entry: &mut Slot,
) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let routes = offload.routes.iter().map(|r| &r.plan);
    let decision = head::decide(&mut parts, &offload.http, &offload.cert_headers, routes);
    let m = &offload.metrics;
    m.dropped_underscore.inc_by(decision.dropped.underscore);
    m.dropped_lookalike.inc_by(decision.dropped.lookalike);
    let routed = match decision.outcome {
        Ok(r) => r,
        Err(rejected) => {
            let resp = match rejected {
                Rejected::BadHost => {
                    m.bad_host_header.inc();
                    error(StatusCode::BAD_REQUEST, "bad Host header\n")
                }
                Rejected::HostNotAllowed => {
                    m.bad_host.inc();
                    error(StatusCode::MISDIRECTED_REQUEST, "unknown host\n")
                }
                Rejected::NoRoute => {
                    m.no_route.inc();
                    error(StatusCode::NOT_FOUND, "no route\n")
                }
            };
            return finish(&offload, None, started, resp);
        }
    };
    let route = &offload.routes[routed.route];
    if let Some(e) = entry {
        e.route = Some(routed.route);
    }
    let req = Request::from_parts(parts, body);
    let resp = match &route.target {
        TargetRuntime::Pool(up) => {
            let to = Forward {
                offload: &offload,
                route,
                up,
                conn: &conn,
                host: &routed.host,
            };
            proxy(to, req, body_watch, entry).await
        }
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

/// Where a request is forwarded, and what it came with.
struct Forward<'a> {
    offload: &'a Offload,
    route: &'a RouteRuntime,
    up: &'a Arc<Upstream>,
    conn: &'a ConnInfo,
    host: &'a str,
}

async fn proxy(
    to: Forward<'_>,
    mut req: Request<Incoming>,
    body_watch: BodyWatch,
    entry: &mut Slot,
) -> Response<Body> {
    let Forward {
        offload,
        route,
        up,
        conn,
        host,
    } = to;
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
    let counted = Counted {
        hook: body_watch,
        bytes: entry.as_ref().and_then(|e| e.bytes_in.clone()),
    };
    let body = AtEnd::new(body, counted);
    let mut request = Request::from_parts(parts, body.boxed());

    let asked = Instant::now();
    let mut checkout = match up.checkout(peer, upgrade, upgrade, &[]).await {
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
    let timeout = offload.http.response_timeout;
    // hyper hands back a request it did not start writing (the connection
    // was found closed first), so that case needs no copy. A request that
    // was written when its connection failed can be sent again only from
    // a copy of its head: one is kept when the request has no body and
    // there is somewhere to send it again, another backend of the pool or
    // a new connection for one that sat idle about as long as a backend's
    // keep-alive timeout (one given back a moment ago is not closed under
    // it, and copying every request's headers cost an allocation per
    // header map on single-backend pools).
    let elsewhere = checkout.eligible > 1;
    let template = match checkout.idled {
        _ if !resendable => None,
        _ if elsewhere => Some(copy_head(&request)),
        Some(idled) if idled >= RACY_IDLE => Some(copy_head(&request)),
        _ => None,
    };
    // Backends this request failed on, each tried once at most.
    let mut failed_on: Vec<std::net::SocketAddr> = Vec::new();
    let mut stale_resent = false;
    let mut retries = checkout.attempts.saturating_sub(1);
    if let Some(e) = entry.as_deref_mut() {
        e.upstream_connect = Some(asked.elapsed());
    }
    let mut resp = loop {
        let backend = checkout.backend.clone();
        let sending = Instant::now();
        if let Some(e) = entry.as_deref_mut() {
            e.upstream = Some(backend.addr);
            e.retries = retries;
        }
        let sent = {
            let _open = backend.track();
            tokio::time::timeout(timeout, checkout.sender.try_send_request(request)).await
        };
        let (unsent, e) = match sent {
            Ok(Ok(r)) => {
                if let Some(e) = entry.as_deref_mut() {
                    e.upstream_response = Some(sending.elapsed());
                }
                break r;
            }
            Ok(Err(mut e)) => (e.take_message(), e.into_error()),
            Err(_) => {
                offload.metrics.upstream_timeout.inc();
                return error(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n");
            }
        };
        // hyper wraps an error of the request body it was sending (here
        // always the client's hyper body) as a user error.
        let body_failed =
            e.is_user() && std::error::Error::source(&e).is_some_and(|s| s.is::<hyper::Error>());
        if body_failed {
            // The client's body broke off or was badly framed: its fault,
            // not the backend's.
            tracing::debug!(backend = %backend.addr, "client request body failed: {e}");
            offload.metrics.bad_request_body.inc();
            return error(StatusCode::BAD_REQUEST, "bad request body\n");
        }
        let broken = !(e.is_parse() || e.is_timeout());
        let again = match (unsent, &template) {
            (Some(r), _) => Some(r),
            (None, Some(t)) if broken => Some(copy_head(t)),
            _ => None,
        };
        let Some(again) = again else {
            tracing::debug!(backend = %backend.addr, "upstream request failed: {e}");
            offload.metrics.upstream_failed.inc();
            return error(StatusCode::BAD_GATEWAY, "backend failed\n");
        };
        if checkout.idled.is_some() && !stale_resent {
            // A reused connection the backend had closed: not the
            // backend's fault, a new connection is tried once.
            stale_resent = true;
            tracing::debug!(backend = %backend.addr, "reused connection was closed by the backend; resending on a new one");
        } else {
            // Like nginx's `proxy_next_upstream error`: the next backend.
            tracing::debug!(backend = %backend.addr, "connection failed before a response: {e}; trying the next backend");
            backend.record_failure(checkout.policy);
            failed_on.push(backend.addr);
        }
        let asked = Instant::now();
        checkout = match up.checkout(peer, true, false, &failed_on).await {
            Ok(c) => c,
            Err(_) => {
                offload.metrics.upstream_failed.inc();
                return error(StatusCode::BAD_GATEWAY, "backend unreachable\n");
            }
        };
        offload.metrics.upstream_retries.inc();
        retries += checkout.attempts;
        if let Some(e) = entry.as_deref_mut() {
            e.upstream_connect = Some(asked.elapsed());
        }
        request = again;
    };

    if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status()) {
        let backend_side = hyper::upgrade::on(&mut resp);
        let websocket = resp
            .headers()
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        // The session is logged when it ends, with its bytes, instead
        // of when the 101 has been sent.
        let session = entry.take().map(|mut e| {
            e.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
            e
        });
        super::upgrade::spawn_relay(client_side, backend_side, websocket, offload, conn, session);
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
