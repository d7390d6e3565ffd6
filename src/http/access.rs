//! Access-log entries of offloaded requests: what is known when a
//! request arrives, filled in as it is routed and forwarded, and written
//! when its response body has been sent (or, for a WebSocket, when the
//! session ends). Only listeners with `access_log` make entries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{HeaderValue, HOST, REFERER, USER_AGENT};
use hyper::{Method, Uri, Version};

use super::at_end::EndHook;
use super::{ConnInfo, Offload};
use crate::access_log::{AccessLog, Kind, Record};

pub struct Entry {
    log: Arc<AccessLog>,
    offload: Arc<Offload>,
    conn: Arc<ConnInfo>,
    started: Instant,
    method: Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    pub status: u16,
    /// Index into the offload's routes.
    pub route: Option<usize>,
    pub upstream: Option<SocketAddr>,
    pub upstream_connect: Option<Duration>,
    pub upstream_response: Option<Duration>,
    pub retries: u32,
    /// Request body bytes, counted as the backend reads them; only for
    /// requests that have a body.
    pub bytes_in: Option<Arc<AtomicU64>>,
    pub bytes_out: u64,
}

/// The entry a request gets, if its listener logs.
pub type Slot = Option<Box<Entry>>;

impl Entry {
    /// An entry for a request on `offload`'s listener, if it logs. Header
    /// values are shared (no copy of their bytes).
    pub fn begin<B: hyper::body::Body>(
        offload: &Arc<Offload>,
        conn: &Arc<ConnInfo>,
        req: &hyper::Request<B>,
    ) -> Slot {
        let log = offload.access_log.as_ref()?;
        let h = req.headers();
        let host = h.get(HOST).cloned().or_else(|| {
            let a = req.uri().authority()?;
            HeaderValue::from_str(a.as_str()).ok()
        });
        Some(Box::new(Entry {
            log: log.clone(),
            offload: offload.clone(),
            conn: conn.clone(),
            started: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            host,
            referer: h.get(REFERER).cloned(),
            user_agent: h.get(USER_AGENT).cloned(),
            status: 0,
            route: None,
            upstream: None,
            upstream_connect: None,
            upstream_response: None,
            retries: 0,
            bytes_in: (!req.body().is_end_stream()).then(Arc::default),
            bytes_out: 0,
        }))
    }

    /// Write the line: for a plain request when its response has been
    /// sent; for a WebSocket when the session ends, with its bytes each
    /// way and why it ended.
    pub fn finish(&self, websocket: Option<(u64, u64, &str)>) {
        let c = &*self.conn;
        let kind = if websocket.is_some() {
            Kind::WebSocket
        } else {
            Kind::Http
        };
        let mut r = Record::new(kind, &c.listener, c.peer);
        r.tls_version = Some(c.tls_version);
        r.tls_cipher = Some(c.tls_cipher);
        r.sni = c.sni.as_deref();
        if let Some(cert) = &c.client_cert {
            r.client_cert_subject = Some(&cert.subject);
            r.client_cert_sha256 = Some(&cert.sha256);
        }
        r.host = self.host.as_ref().map(HeaderValue::as_bytes);
        r.method = Some(self.method.as_str());
        r.path = Some(
            self.uri
                .path_and_query()
                .map_or_else(|| self.uri.path(), |p| p.as_str()),
        );
        r.protocol = Some(match self.version {
            Version::HTTP_09 => "HTTP/0.9",
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2.0",
            Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        });
        r.status = self.status;
        match websocket {
            Some((up, down, close)) => {
                r.bytes_in = up;
                r.bytes_out = down;
                r.close = Some(close);
            }
            None => {
                r.bytes_in = self.bytes_in.as_ref().map_or(0, |n| n.load(Relaxed));
                r.bytes_out = self.bytes_out;
            }
        }
        r.duration = self.started.elapsed();
        r.upstream = self.upstream;
        r.upstream_connect = self.upstream_connect;
        r.upstream_response = self.upstream_response;
        r.route = self
            .route
            .and_then(|i| self.offload.routes.get(i))
            .map(|rt| rt.plan.name.as_str());
        r.retries = self.retries;
        r.referer = self.referer.as_ref().map(HeaderValue::as_bytes);
        r.user_agent = self.user_agent.as_ref().map(HeaderValue::as_bytes);
        self.log.emit(&r);
    }
}

/// A forwarded request body's end hook, counting its bytes for the
/// access log when there is a counter.
pub struct Counted<H: EndHook> {
    pub hook: H,
    pub bytes: Option<Arc<AtomicU64>>,
}

impl<H: EndHook> EndHook for Counted<H> {
    fn ended(&mut self) {
        self.hook.ended()
    }

    fn data(&mut self, n: usize) {
        if let Some(b) = &self.bytes {
            b.fetch_add(n as u64, Relaxed);
        }
    }
}
