//! The decisions taken on a request head before anything is forwarded:
//! which single authority the request is for (RFC 9112 §3.2, RFC 9113
//! §8.3.1), whether the listener serves it, which route takes it, and
//! which client headers must not reach a backend. Pure: no I/O, no
//! metrics, so it can be fuzzed ([`fuzz_request_head`]).

use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::request::Parts;
use hyper::Version;

use super::headers::CertHeaders;
use super::route::RoutePlan;
use super::HttpPlan;

/// Why a request is answered by the balancer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Several Host headers, none on HTTP/1.1 or HTTP/2, or an invalid
    /// one (400).
    BadHost,
    /// Not in `allowed_hosts` (421).
    HostNotAllowed,
    /// No route matches (404).
    NoRoute,
}

/// A request that goes on to a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Index into the listener's routes.
    pub route: usize,
    /// The authority's host, lowercase, without port.
    pub host: String,
}

/// Client headers removed from the head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Names with `_`, with `allow_underscores_in_headers = false`.
    pub underscore: u64,
    /// Names that read as a header the balancer sets once `_` is `-`.
    pub lookalike: u64,
}

#[derive(Debug)]
pub struct Decision {
    pub outcome: Result<Routed, Rejected>,
    pub dropped: Dropped,
}

/// Decide about one request head, rewriting it on the way: `Host` is set
/// to the one authority the request is routed by, and headers that a
/// backend could take for one the balancer sets are removed.
pub fn decide<'r>(
    parts: &mut Parts,
    http: &HttpPlan,
    cert_headers: &CertHeaders,
    routes: impl IntoIterator<Item = &'r RoutePlan>,
) -> Decision {
    let mut dropped = Dropped::default();
    let outcome = route(parts, http, routes);
    if outcome.is_ok() {
        dropped = drop_underscore_headers(parts, http.allow_underscores_in_headers, cert_headers);
    }
    Decision { outcome, dropped }
}

fn route<'r>(
    parts: &mut Parts,
    http: &HttpPlan,
    routes: impl IntoIterator<Item = &'r RoutePlan>,
) -> Result<Routed, Rejected> {
    let host = authority(parts)?;
    if let Some(allowed) = &http.allowed_hosts {
        if !allowed.iter().any(|h| h.matches(&host)) {
            return Err(Rejected::HostNotAllowed);
        }
    }
    let path = parts.uri.path();
    let route = routes
        .into_iter()
        .position(|r| r.matches(&host, path))
        .ok_or(Rejected::NoRoute)?;
    Ok(Routed { route, host })
}

/// The request's one authority, lowercase host without port. An
/// absolute-form target (every HTTP/2 request with `:authority`) wins
/// over `Host`, which is rewritten to match, so the backend sees the
/// authority the request was routed by.
fn authority(parts: &mut Parts) -> Result<String, Rejected> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejected::BadHost);
    }
    if let Some(a) = parts.uri.authority() {
        let text = a.as_str();
        let host = host_of(text).ok_or(Rejected::BadHost)?.to_ascii_lowercase();
        if first.is_none_or(|h| h.as_bytes() != text.as_bytes()) {
            let v = HeaderValue::from_str(text).map_err(|_| Rejected::BadHost)?;
            parts.headers.insert(HOST, v);
        }
        return Ok(host);
    }
    match first {
        Some(v) => {
            let text = v.to_str().map_err(|_| Rejected::BadHost)?;
            Ok(host_of(text).ok_or(Rejected::BadHost)?.to_ascii_lowercase())
        }
        // HTTP/1.0 predates Host.
        None if parts.version <= Version::HTTP_10 => Ok(String::new()),
        None => Err(Rejected::BadHost),
    }
}

/// The host of `uri-host [":" port]` (RFC 9110 §7.2), or `None` when the
/// value is not one: empty, user info, stray characters, a bad port.
fn host_of(value: &str) -> Option<&str> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let ok = !v6.is_empty()
            && v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !ok {
            return None;
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (v6, port)
    } else {
        let (host, port) = match value.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        };
        let ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        if !ok {
            return None;
        }
        (host, port)
    };
    if let Some(p) = port {
        if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    Some(host)
}

/// Headers the balancer itself sets on a forwarded request (besides the
/// configured certificate headers): a client's look-alike of one must
/// not reach a backend that folds `_` into `-`.
const SET_BY_BALANCER: [&str; 7] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "connection",
    "content-length",
    "transfer-encoding",
];

fn drop_underscore_headers(parts: &mut Parts, allow: bool, cert_headers: &CertHeaders) -> Dropped {
    let mut dropped = Dropped::default();
    // Most requests have none: one scan without allocating.
    if !parts.headers.keys().any(|k| k.as_str().contains('_')) {
        return dropped;
    }
    let doomed: Vec<(HeaderName, bool)> = parts
        .headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter_map(|k| {
            let folded = k.as_str().replace('_', "-");
            let lookalike = SET_BY_BALANCER.contains(&folded.as_str())
                || [
                    &cert_headers.cert,
                    &cert_headers.subject,
                    &cert_headers.fingerprint,
                ]
                .into_iter()
                .flatten()
                .any(|n| n.as_str() == folded);
            (!allow || lookalike).then(|| (k.clone(), lookalike))
        })
        .collect();
    for (name, lookalike) in doomed {
        let n = match parts.headers.entry(name) {
            hyper::header::Entry::Occupied(e) => e.remove_entry_mult().1.count() as u64,
            hyper::header::Entry::Vacant(_) => 0,
        };
        if lookalike {
            dropped.lookalike += n;
        } else {
            dropped.underscore += n;
        }
    }
    dropped
}

/// Parse `data` as an HTTP/1.x request head (a leading `2` makes it an
/// HTTP/2 request with the same fields) and decide about it with a fixed
/// small plan, checking what the decision promises. Never panics on any
/// input unless a promise is broken.
pub fn fuzz_request_head(data: &[u8]) {
    let (h2, data) = match data.split_first() {
        Some((b'2', rest)) => (true, rest),
        _ => (false, data),
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let version = match (h2, req.version) {
        (true, _) => Version::HTTP_2,
        (false, Some(0)) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .version(version);
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    let (http, cert_headers, routes) = &*FUZZ_PLAN;
    let d = decide(&mut parts, http, cert_headers, routes);
    if let Ok(routed) = &d.outcome {
        let hosts: Vec<_> = parts.headers.get_all(HOST).iter().collect();
        assert!(hosts.len() <= 1, "one Host at most");
        if let Some(h) = hosts.first() {
            let seen = host_of(h.to_str().expect("checked host")).expect("valid host");
            assert_eq!(
                seen.to_ascii_lowercase(),
                routed.host,
                "Host is what was routed"
            );
        }
        let allowed = http
            .allowed_hosts
            .as_ref()
            .expect("fuzz plan has allowed_hosts");
        assert!(allowed.iter().any(|a| a.matches(&routed.host)));
        assert!(routes[routed.route].matches(&routed.host, parts.uri.path()));
        assert!(
            parts.headers.keys().all(|k| !k.as_str().contains('_')),
            "underscore names go"
        );
    }
}

type FuzzPlan = (HttpPlan, CertHeaders, Vec<RoutePlan>);

static FUZZ_PLAN: std::sync::LazyLock<FuzzPlan> = std::sync::LazyLock::new(|| {
    use super::route::{HostMatch, PathMatch, Target};
    use std::time::Duration;
    let http = HttpPlan {
        trusted_proxies: Vec::new(),
        allowed_hosts: Some(vec![
            HostMatch::parse("localhost").expect("host"),
            HostMatch::parse("*.device.example").expect("host"),
        ]),
        hsts: None,
        max_header_bytes: 16 * 1024,
        max_headers: 64,
        header_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(1),
        upgrade_idle_timeout: Duration::from_secs(1),
        upstream_keepalive: 1,
        upstream_idle_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(1),
        allow_underscores_in_headers: false,
        hello_max_bytes: 16 * 1024,
        http2: Default::default(),
    };
    let cert_headers = CertHeaders {
        cert: Some(HeaderName::from_static("x-ssl-cert")),
        subject: Some(HeaderName::from_static("x-ssl-subject")),
        fingerprint: None,
    };
    let route = |name: &str, host: Option<&str>, path: PathMatch| RoutePlan {
        name: name.into(),
        host: host.map(|h| HostMatch::parse(h).expect("host")),
        path,
        target: Target::Pool(name.into()),
        forward_cert: true,
    };
    let routes = vec![
        route(
            "ws",
            None,
            PathMatch::Regex(regex::Regex::new("^/device-connector/device/ws").expect("regex")),
        ),
        route(
            "api",
            Some("*.device.example"),
            PathMatch::Prefix("/api".into()),
        ),
        route("rest", None, PathMatch::Prefix("/".into())),
    ];
    (http, cert_headers, routes)
});

#[cfg(test)]
mod tests {
    use super::*;

    fn decide_on(raw: &str, allow: bool) -> (Decision, Parts) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(raw.as_bytes()).unwrap();
        let mut b = hyper::Request::builder()
            .method(req.method.unwrap())
            .uri(req.path.unwrap());
        for h in req.headers.iter() {
            b = b.header(h.name, h.value);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let (http, cert, routes) = &*FUZZ_PLAN;
        let mut http = http.clone();
        http.allow_underscores_in_headers = allow;
        (decide(&mut parts, &http, cert, routes), parts)
    }

    #[test]
    fn several_or_bad_hosts_are_400() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost:\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@localhost\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: localhost:80x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET http://user@localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ] {
            assert_eq!(
                decide_on(raw, false).0.outcome,
                Err(Rejected::BadHost),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn the_absolute_form_authority_wins_and_is_forwarded() {
        let raw = "GET http://internal.example/x HTTP/1.1\r\nHost: localhost\r\n\r\n";
        assert_eq!(
            decide_on(raw, false).0.outcome,
            Err(Rejected::HostNotAllowed)
        );
        let raw = "GET http://LOCALHOST:8443/x HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        let (d, parts) = decide_on(raw, false);
        assert_eq!(d.outcome.unwrap().host, "localhost");
        assert_eq!(parts.headers[HOST], "LOCALHOST:8443");
        assert_eq!(parts.headers.get_all(HOST).iter().count(), 1);
    }

    #[test]
    fn routes_by_host_and_path() {
        let raw = "GET /api/v1 HTTP/1.1\r\nHost: a.device.example:443\r\n\r\n";
        assert_eq!(decide_on(raw, false).0.outcome.unwrap().route, 1);
        let raw = "GET /api/v1 HTTP/1.1\r\nHost: localhost\r\n\r\n";
        assert_eq!(decide_on(raw, false).0.outcome.unwrap().route, 2);
        let raw = "GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n";
        assert_eq!(
            decide_on(raw, false).0.outcome,
            Err(Rejected::HostNotAllowed)
        );
    }

    #[test]
    fn underscore_headers_go_or_only_their_lookalikes() {
        let raw = "GET / HTTP/1.1\r\nHost: localhost\r\nX_SSL_CERT: forged\r\n\
                   X_Forwarded_For: 6.6.6.6\r\nMy_Header: 1\r\nMy_Header: 2\r\nX-Kept: 1\r\n\r\n";
        let (d, parts) = decide_on(raw, false);
        assert_eq!(
            d.dropped,
            Dropped {
                underscore: 2,
                lookalike: 2
            }
        );
        assert!(parts.headers.keys().all(|k| !k.as_str().contains('_')));
        assert!(parts.headers.contains_key("x-kept"));
        let (d, parts) = decide_on(raw, true);
        assert_eq!(
            d.dropped,
            Dropped {
                underscore: 0,
                lookalike: 2
            }
        );
        assert_eq!(parts.headers.get_all("my_header").iter().count(), 2);
        assert!(!parts.headers.contains_key("x_ssl_cert"));
    }

    #[test]
    fn seeds_do_not_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request_head");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            fuzz_request_head(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n >= 5);
    }
}
