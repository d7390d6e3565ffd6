//! TLS offload: terminate TLS, route HTTP requests by host and path, and
//! forward them (with the verified client certificate) to a pool.

pub mod access;
pub mod activity;
pub mod at_end;
pub mod h2_guard;
pub mod head;
pub mod headers;
pub mod route;
pub mod server;
pub mod service;
pub mod upgrade;
pub mod upstream;
pub mod ws_relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use ipnet::IpNet;
use prometheus::{Histogram, IntCounter, IntGauge};

use crate::metrics::Metrics;
use crate::tls::refusal::Reason;
pub use route::{HostMatch, PathMatch, RoutePlan, Target};

/// A verified client certificate and the forms it is forwarded in,
/// computed once per connection rather than per request.
#[derive(Debug)]
pub struct ClientCert {
    pub der: Vec<u8>,
    pub escaped_pem: String,
    pub subject: String,
    pub sha256: String,
}

impl ClientCert {
    pub fn from_der(der: &[u8]) -> ClientCert {
        ClientCert {
            der: der.to_vec(),
            escaped_pem: crate::tls::forward::escaped_pem(der),
            subject: crate::tls::forward::subject_dn(der).unwrap_or_default(),
            sha256: crate::tls::forward::sha256_fingerprint(der),
        }
    }
}

/// What a request knows about the connection it came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `peer`'s address as an X-Forwarded-For value.
    pub peer_value: HeaderValue,
    pub listener: Arc<str>,
    pub sni: Option<String>,
    /// ALPN chose HTTP/2.
    pub h2: bool,
    pub client_cert: Option<Arc<ClientCert>>,
    /// For the access log: `TLSv1.3`, and rustls' name of the cipher suite.
    pub tls_version: &'static str,
    pub tls_cipher: &'static str,
}

/// HTTP behaviour of an offload listener.
#[derive(Debug, Clone)]
pub struct HttpPlan {
    /// Proxies whose X-Forwarded-* headers are kept (appended to).
    pub trusted_proxies: Vec<IpNet>,
    /// When set, other Host values get 421.
    pub allowed_hosts: Option<Vec<HostMatch>>,
    /// The Strict-Transport-Security value, when HSTS is on.
    pub hsts: Option<HeaderValue>,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Time allowed for a request's headers to arrive (slow clients), and
    /// for an idle keep-alive connection to send its next request.
    pub header_timeout: Duration,
    /// Time allowed for a backend's response headers (504 after).
    pub response_timeout: Duration,
    /// Idle timeout of upgraded (WebSocket) streams: devices hold them for
    /// hours, so it is separate from the HTTP timeouts.
    pub upgrade_idle_timeout: Duration,
    /// Idle keep-alive connections kept per backend.
    pub upstream_keepalive: usize,
    pub upstream_idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Keep request headers whose names contain `_` (look-alikes of the
    /// headers the balancer sets still go).
    pub allow_underscores_in_headers: bool,
    pub http2: h2_guard::Http2Plan,
    /// Largest ClientHello taken, record headers included.
    pub hello_max_bytes: usize,
}

impl HttpPlan {
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// A route with its target resolved for this run.
pub struct RouteRuntime {
    pub plan: RoutePlan,
    pub target: TargetRuntime,
    pub requests: [IntCounter; 5],
    pub duration: Histogram,
}

pub enum TargetRuntime {
    Pool(Arc<upstream::Upstream>),
    Module(Arc<dyn crate::module::Module>),
}

/// Metrics of one offload listener, resolved when the plan is applied.
pub struct OffloadMetrics {
    /// `fleetgate_tls_handshakes_total{result="ok",reason="none"}`.
    pub handshake_ok: IntCounter,
    /// `{result="timeout",reason="timeout"}`.
    pub handshake_timeout: IntCounter,
    /// `{result="failed"}` by reason, indexed by `Reason::failure_index`.
    handshake_failed: Vec<IntCounter>,
    /// One refused-handshake log line per second per listener, as for
    /// rejected connections.
    pub refusal_log: crate::logging::RateLimit,
    /// `fleetgate_tls_client_hello_rejected_total{reason="too_large"}`.
    pub hello_too_large: IntCounter,
    pub certs_none: IntCounter,
    pub certs_verified: IntCounter,
    pub certs_rejected: IntCounter,
    pub upgraded: IntGauge,
    pub no_route: IntCounter,
    pub bad_host: IntCounter,
    pub no_backend: IntCounter,
    pub upstream_failed: IntCounter,
    pub upstream_timeout: IntCounter,
    /// Several, missing or invalid Host (400).
    pub bad_host_header: IntCounter,
    /// A request body the client broke off or framed wrongly (400).
    pub bad_request_body: IntCounter,
    pub dropped_underscore: IntCounter,
    pub dropped_lookalike: IntCounter,
    pub upstream_retries: IntCounter,
    pub h2_control_flood: IntCounter,
    /// `fleetgate_tls_versions_total` for 1.3, 1.2 and other.
    versions: [IntCounter; 3],
    /// `fleetgate_tls_alpn_total` for h2, http/1.1, none and other.
    alpn: [IntCounter; 4],
    metrics: Arc<Metrics>,
    listener: String,
}

impl OffloadMetrics {
    pub fn new(m: &Arc<Metrics>, listener: &str) -> Self {
        let hs = |result, reason: Reason| {
            m.tls_handshakes
                .with_label_values(&[listener, result, reason.label()])
        };
        let cert = |s| m.client_certs.with_label_values(&[listener, s]);
        let err = |k| m.http_errors.with_label_values(&[listener, k]);
        let hard = &m.http_hardening;
        OffloadMetrics {
            handshake_ok: hs("ok", Reason::None),
            handshake_timeout: hs("timeout", Reason::Timeout),
            handshake_failed: Reason::FAILURES.iter().map(|&r| hs("failed", r)).collect(),
            refusal_log: crate::logging::RateLimit::new(1000),
            hello_too_large: m.hello_rejected.with_label_values(&[listener, "too_large"]),
            certs_none: cert("none"),
            certs_verified: cert("verified"),
            certs_rejected: cert("rejected"),
            upgraded: m.upgraded_active.with_label_values(&[listener]),
            no_route: err("no_route"),
            bad_host: err("host_not_allowed"),
            no_backend: err("no_backend"),
            upstream_failed: err("upstream_failed"),
            upstream_timeout: err("upstream_timeout"),
            bad_host_header: err("bad_host_header"),
            bad_request_body: err("bad_request_body"),
            dropped_underscore: hard
                .headers_dropped
                .with_label_values(&[listener, "underscore"]),
            dropped_lookalike: hard
                .headers_dropped
                .with_label_values(&[listener, "lookalike"]),
            upstream_retries: hard.upstream_retries.with_label_values(&[listener]),
            h2_control_flood: hard
                .http2_closed
                .with_label_values(&[listener, "control_frames"]),
            versions: ["1.3", "1.2", "other"]
                .map(|v| m.tls_versions.with_label_values(&[listener, v])),
            alpn: ["h2", "http/1.1", "none", "other"]
                .map(|a| m.tls_alpn.with_label_values(&[listener, a])),
            metrics: m.clone(),
            listener: listener.to_string(),
        }
    }

    /// Count a refused handshake (a timeout is `handshake_timeout`).
    pub fn handshake_refused(&self, reason: Reason) {
        self.handshake_failed[reason.failure_index()].inc();
        if reason.is_client_cert() {
            self.certs_rejected.inc();
        }
    }

    /// Count a handshake's version and ALPN protocol (handles resolved
    /// once per listener: no label lookup per handshake).
    pub fn handshake_version(&self, version: &str, alpn: Option<&[u8]>) {
        let v = match version {
            "1.3" => 0,
            "1.2" => 1,
            _ => 2,
        };
        self.versions[v].inc();
        let a = match alpn {
            Some(b"h2") => 0,
            Some(b"http/1.1") => 1,
            None => 2,
            Some(_) => 3,
        };
        self.alpn[a].inc();
    }

    pub fn route(&self, route: &str) -> ([IntCounter; 5], Histogram) {
        let l = self.listener.as_str();
        let c = |class| {
            self.metrics
                .http_requests
                .with_label_values(&[l, route, class])
        };
        (
            [c("1xx"), c("2xx"), c("3xx"), c("4xx"), c("5xx")],
            self.metrics
                .http_request_seconds
                .with_label_values(&[l, route]),
        )
    }
}

/// Everything an offload listener needs, rebuilt on reload.
pub struct Offload {
    /// The listener's name, shared by its connections.
    pub name: Arc<str>,
    pub tls: Arc<rustls::ServerConfig>,
    pub revocation: Option<crate::tls::revocation::RevocationList>,
    pub http: HttpPlan,
    pub cert_headers: headers::CertHeaders,
    pub routes: Vec<RouteRuntime>,
    pub metrics: OffloadMetrics,
    /// The listener's byte counters, for upgraded streams.
    pub bytes: crate::l4::ByteCounters,
    /// The process's drain signal.
    pub drain: crate::drain::Drain,
    /// `None` unless the listener has `access_log`.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}
