//! Request and response header rules for the offload proxy: hop-by-hop
//! headers (RFC 9110 §7.6.1), X-Forwarded-*, client-certificate headers,
//! HSTS.

use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::ClientCert;

/// Headers that describe one connection, never forwarded. Names, not
/// strings: removing by a string parses and hashes it on every request.
const HOP_BY_HOP: [HeaderName; 8] = [
    hyper::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::PROXY_AUTHENTICATE,
    hyper::header::PROXY_AUTHORIZATION,
    hyper::header::TE,
    hyper::header::TRAILER,
    hyper::header::TRANSFER_ENCODING,
];

/// Remove hop-by-hop headers, including any named in `Connection`.
/// `Upgrade` goes too unless this request is being upgraded.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if h.contains_key(hyper::header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            if !(keep_upgrade && n == hyper::header::UPGRADE) {
                h.remove(n);
            }
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(hyper::header::UPGRADE);
    }
}

/// Is this an HTTP/1.1 WebSocket (or other) upgrade request?
pub fn wants_upgrade(h: &HeaderMap) -> bool {
    let connection_upgrade = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && h.contains_key(hyper::header::UPGRADE)
}

/// The names of the certificate headers this listener sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertHeaders {
    pub cert: Option<HeaderName>,
    pub subject: Option<HeaderName>,
    pub fingerprint: Option<HeaderName>,
}

impl CertHeaders {
    /// Remove any copy the client sent: always, on every route, so that a
    /// backend that trusts these headers can never be fooled.
    pub fn strip(&self, h: &mut HeaderMap) {
        for n in [&self.cert, &self.subject, &self.fingerprint]
            .into_iter()
            .flatten()
        {
            h.remove(n);
        }
    }

    pub fn set(&self, h: &mut HeaderMap, cert: &ClientCert) {
        let pairs = [
            (&self.cert, &cert.escaped_pem),
            (&self.subject, &cert.subject),
            (&self.fingerprint, &cert.sha256),
        ];
        for (name, value) in pairs {
            if let (Some(n), Ok(v)) = (name, HeaderValue::from_str(value)) {
                h.insert(n.clone(), v);
            }
        }
    }
}

/// A peer address as an X-Forwarded-For value; made once per connection.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::try_from(peer.to_string()).expect("an IP address is a valid header value")
}

/// X-Forwarded-For/-Proto/-Host. Incoming values are kept only from a
/// trusted proxy; from anyone else they are replaced, so a device cannot
/// claim another address. `peer` is [`peer_value`] of the client.
pub fn set_forwarded(h: &mut HeaderMap, peer: &HeaderValue, trusted: bool, host: &str) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let proto = HeaderName::from_static("x-forwarded-proto");
    let xhost = HeaderName::from_static("x-forwarded-host");
    let chain = match h.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted && !prev.trim().is_empty() => {
            let peer = peer.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{prev}, {peer}")).ok()
        }
        // A clone of the connection's value: no allocation per request.
        _ => Some(peer.clone()),
    };
    if let Some(v) = chain {
        h.insert(xff, v);
    }
    if !(trusted && h.contains_key(&proto)) {
        h.insert(proto, HeaderValue::from_static("https"));
    }
    if !(trusted && h.contains_key(&xhost)) {
        if let Ok(v) = HeaderValue::from_str(host) {
            h.insert(xhost, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let peer = peer_value("192.0.2.1".parse().unwrap());
        set_forwarded(&mut h, &peer, false, "a.example");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        set_forwarded(&mut h, &peer, true, "a.example");
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 192.0.2.1");
    }

    #[test]
    fn connection_named_headers_go_but_upgrade_stays_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("upgrade, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
        assert_eq!(h["upgrade"], "websocket");
    }
}
