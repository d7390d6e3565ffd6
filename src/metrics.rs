//! Prometheus metrics. Families are created once; the connection path uses
//! label handles resolved at plan time (one atomic add per event).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub connections_rejected: IntCounterVec,
    pub accept_errors: IntCounterVec,
    pub bytes: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_active: IntGaugeVec,
    pub backend_connect_failures: IntCounterVec,
    pub backend_connect_seconds: HistogramVec,
    pub pool_selections: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub reloads: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_versions: IntCounterVec,
    pub tls_alpn: IntCounterVec,
    pub client_certs: IntCounterVec,
    pub hello_rejected: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_request_seconds: HistogramVec,
    pub http_errors: IntCounterVec,
    pub upgraded_active: IntGaugeVec,
    pub heartbeats_accepted: prometheus::IntCounter,
    pub heartbeats_rejected: IntCounterVec,
    pub discovery_nodes: IntGaugeVec,
    pub discovery_heartbeat_age: prometheus::GaugeVec,
    /// notAfter of each certificate in use (see `tls::inventory`).
    pub tls_certificate_expiry: prometheus::GaugeVec,
    pub http_hardening: HttpHardening,
    /// Access-log lines queued, and dropped (queue full or write error).
    pub access_log_lines: IntCounterVec,
    pub access_log_dropped: IntCounterVec,
}

/// Request hardening on offload listeners: what was dropped, retried or
/// cut off rather than answered with an error.
pub struct HttpHardening {
    pub headers_dropped: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub http2_closed: IntCounterVec,
}

impl HttpHardening {
    fn new(r: &Registry) -> Self {
        HttpHardening {
            headers_dropped: counter(
                r,
                "http_headers_dropped_total",
                "Client request headers removed, by reason (underscore, lookalike).",
                &["listener", "reason"],
            ),
            upstream_retries: counter(
                r,
                "http_upstream_retries_total",
                "Requests sent again to another backend after a connection failed before any response byte.",
                &["listener"],
            ),
            http2_closed: counter(
                r,
                "http2_connections_closed_total",
                "HTTP/2 client connections closed for exceeding a bound, by reason.",
                &["listener", "reason"],
            ),
        }
    }
}

/// Reasons a connection is closed before it reaches a backend.
pub mod reject {
    pub const ACL: &str = "acl";
    pub const LIMIT: &str = "limit";
    pub const NO_BACKEND: &str = "no_backend";
    pub const DRAINING: &str = "draining";
    pub const SOURCE_RATE: &str = "source_rate";
    pub const SOURCE_CONNECTIONS: &str = "source_connections";
    pub const DESCRIPTOR_RESERVE: &str = "descriptor_reserve";
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registration");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registration");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("fleetgate".into()), None).expect("registry");
        let connect = HistogramVec::new(
            HistogramOpts::new(
                "backend_connect_duration_seconds",
                "Time to establish a TCP connection to a backend.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
            &["pool", "backend"],
        )
        .expect("metric definition");
        r.register(Box::new(connect.clone()))
            .expect("metric registration");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from request to response headers, per route.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["listener", "route"],
        )
        .expect("metric definition");
        r.register(Box::new(request_seconds.clone()))
            .expect("metric registration");
        let accepted = prometheus::IntCounter::new(
            "discovery_heartbeats_total",
            "Heartbeats that verified and were applied to the registry.",
        )
        .expect("metric definition");
        r.register(Box::new(accepted.clone()))
            .expect("metric registration");
        let age = prometheus::GaugeVec::new(
            Opts::new(
                "discovery_last_heartbeat_age_seconds",
                "Seconds since a node's last valid heartbeat.",
            ),
            &["node"],
        )
        .expect("metric definition");
        r.register(Box::new(age.clone()))
            .expect("metric registration");
        crate::syslog::register_metrics(&r);
        let expiry = prometheus::GaugeVec::new(
            Opts::new(
                "tls_certificate_expiry_timestamp_seconds",
                "notAfter (unix seconds) of each certificate in use, by listener or pool and role (server, client_ca, pool_ca, pool_client).",
            ),
            &["listener", "pool", "role", "fingerprint"],
        )
        .expect("metric definition");
        r.register(Box::new(expiry.clone()))
            .expect("metric registration");
        Metrics {
            tls_certificate_expiry: expiry,
            heartbeats_accepted: accepted,
            discovery_heartbeat_age: age,
            http_hardening: HttpHardening::new(&r),
            access_log_lines: counter(
                &r,
                "access_log_lines_total",
                "Access-log lines queued for writing.",
                &["listener"],
            ),
            access_log_dropped: counter(
                &r,
                "access_log_dropped_total",
                "Access-log lines dropped: the queue was full or the destination refused them.",
                &["listener"],
            ),
            heartbeats_rejected: counter(
                &r,
                "discovery_heartbeats_rejected_total",
                "Heartbeats refused, by reason (malformed, bad_mac, replay, stale, other_cluster, ...).",
                &["reason"],
            ),
            discovery_nodes: gauge(
                &r,
                "discovery_nodes",
                "Nodes known by discovery, by announced state.",
                &["state"],
            ),
            tls_handshakes: counter(
                &r,
                "tls_handshakes_total",
                "TLS handshakes on offload listeners, by result (ok, failed, timeout) and reason (none when ok).",
                &["listener", "result", "reason"],
            ),
            tls_versions: counter(
                &r,
                "tls_connections_total",
                "Completed TLS handshakes by protocol version.",
                &["listener", "version"],
            ),
            tls_alpn: counter(
                &r,
                "tls_alpn_total",
                "Completed TLS handshakes by negotiated ALPN protocol (none when absent).",
                &["listener", "protocol"],
            ),
            client_certs: counter(
                &r,
                "tls_client_certificates_total",
                "Client certificates at the handshake: none, verified, rejected.",
                &["listener", "state"],
            ),
            hello_rejected: counter(
                &r,
                "tls_client_hello_rejected_total",
                "Passthrough and offload connections closed because of their ClientHello, by reason.",
                &["listener", "reason"],
            ),
            http_requests: counter(
                &r,
                "http_requests_total",
                "HTTP requests answered, by route and status class (2xx..5xx).",
                &["listener", "route", "class"],
            ),
            http_request_seconds: request_seconds,
            http_errors: counter(
                &r,
                "http_errors_total",
                "Requests answered by the balancer itself with an error, by kind.",
                &["listener", "kind"],
            ),
            upgraded_active: gauge(
                &r,
                "http_upgraded_streams_active",
                "Upgraded (WebSocket) streams currently open.",
                &["listener"],
            ),
            connections_accepted: counter(
                &r,
                "connections_accepted_total",
                "Connections accepted by a listener.",
                &["listener"],
            ),
            connections_active: gauge(
                &r,
                "connections_active",
                "Connections currently open on a listener.",
                &["listener"],
            ),
            connections_rejected: counter(
                &r,
                "connections_rejected_total",
                "Connections closed before reaching a backend, by reason.",
                &["listener", "reason"],
            ),
            accept_errors: counter(
                &r,
                "accept_errors_total",
                "Errors returned by accept(2), by kind (emfile, other).",
                &["listener", "kind"],
            ),
            bytes: counter(
                &r,
                "proxied_bytes_total",
                "Bytes forwarded, by direction (upstream: client to backend; downstream: backend to client).",
                &["listener", "direction"],
            ),
            backend_up: gauge(
                &r,
                "backend_up",
                "1 while a backend is eligible for new connections, 0 while it is out.",
                &["pool", "backend"],
            ),
            backend_active: gauge(
                &r,
                "backend_connections_active",
                "Connections currently open to a backend.",
                &["pool", "backend"],
            ),
            backend_connect_failures: counter(
                &r,
                "backend_connect_failures_total",
                "Failed or timed-out connection attempts to a backend.",
                &["pool", "backend"],
            ),
            backend_connect_seconds: connect,
            pool_selections: counter(
                &r,
                "pool_selections_total",
                "Times the balancing algorithm chose a backend.",
                &["pool", "backend"],
            ),
            health_checks: counter(
                &r,
                "health_checks_total",
                "Active health-check probes, by result (ok, fail).",
                &["pool", "backend", "result"],
            ),
            reloads: {
                let c = counter(
                    &r,
                    "config_reloads_total",
                    "Configuration reloads, by result (ok, error).",
                    &["result"],
                );
                // Both series exist from the start: a series that first
                // appears at 1 hides that increase from rate() and
                // increase(), so the first failed reload would never alert.
                for result in ["ok", "error"] {
                    c.with_label_values(&[result]);
                }
                c
            },
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails on a Vec");
        out
    }

    /// Forget the series of a backend that is no longer configured.
    pub fn forget_backend(&self, pool: &str, backend: &str) {
        let l = &[pool, backend];
        let _ = self.backend_up.remove_label_values(l);
        let _ = self.backend_active.remove_label_values(l);
        let _ = self.backend_connect_failures.remove_label_values(l);
        let _ = self.backend_connect_seconds.remove_label_values(l);
        let _ = self.pool_selections.remove_label_values(l);
        for result in ["ok", "fail"] {
            let _ = self
                .health_checks
                .remove_label_values(&[pool, backend, result]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
