//! Request hardening on an offload listener, through the runtime with a
//! real TLS client: one Host per request, one authority routed and
//! forwarded, underscore look-alikes of forwarded headers dropped on pool
//! and module routes, retries on the next backend, and a broken client
//! body answered as the client's error.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::free_addr;
use common::pki::{client_config, Ca, Leaf};
use common::web::{echo_backend, https_get, tls_connect, Seen};
use fleetgate::metrics::Metrics;
use fleetgate::module::{Body, BoxFuture, Module, Registry, RequestContext};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A module answering with the headers it was given, as the echo
/// backend does.
struct EchoModule;

impl Module for EchoModule {
    fn handle(
        &self,
        req: Request<Incoming>,
        _ctx: RequestContext,
    ) -> BoxFuture<'_, Response<Body>> {
        let mut headers = std::collections::BTreeMap::<String, Vec<String>>::new();
        for (k, v) in req.headers() {
            headers
                .entry(k.as_str().to_string())
                .or_default()
                .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        let body = serde_json::json!({ "backend": "module", "path": req.uri().path(), "headers": headers });
        Box::pin(async move {
            Response::new(
                Full::new(Bytes::from(body.to_string()))
                    .map_err(|never| match never {})
                    .boxed(),
            )
        })
    }
}

struct Lb {
    _dir: tempfile::TempDir,
    server_ca: Ca,
    device: Leaf,
    metrics: Arc<Metrics>,
    /// allow_underscores_in_headers = false (the default), and true.
    strict: SocketAddr,
    lenient: SocketAddr,
}

impl Lb {
    fn tls(&self, cert: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config(&self.server_ca, cert, alpn)
    }

    fn errors(&self, listener: &str, kind: &str) -> u64 {
        self.metrics
            .http_errors
            .with_label_values(&[listener, kind])
            .get()
    }

    fn dropped(&self, listener: &str, reason: &str) -> u64 {
        let h = &self.metrics.http_hardening.headers_dropped;
        h.with_label_values(&[listener, reason]).get()
    }

    fn retries(&self) -> u64 {
        let r = &self.metrics.http_hardening.upstream_retries;
        r.with_label_values(&["strict"]).get()
    }

    /// Raw bytes over TLS (HTTP/1.1); the whole answer until the close.
    async fn raw(&self, front: SocketAddr, request: &[u8], shutdown: bool) -> String {
        let mut tls = tls_connect(front, "localhost", self.tls(None, &[b"http/1.1"]))
            .await
            .unwrap();
        tls.write_all(request).await.unwrap();
        tls.flush().await.unwrap();
        if shutdown {
            let _ = tls.shutdown().await;
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A backend that reads a request head and closes without answering, as
/// a backend killed with the request in flight.
async fn closing_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf).await {
                        Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    addr
}

async fn start() -> Lb {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let device_ca = Ca::new(d, "device");
    server_ca.server(d, "server", &["localhost", "device.example"]);
    let device = device_ca.client(d, "device-1", "device-1");
    let echo = echo_backend("echo", None).await;
    let closer = closing_backend().await;
    let (strict, lenient, admin) = (free_addr(), free_addr(), free_addr());
    let listener = |name: &str, bind: SocketAddr, extra: &str| {
        format!(
            r#"
[[listener]]
name = "{name}"
bind = "{bind}"
mode = "offload"
allowed_hosts = ["localhost", "device.example"]
tls = {{ cert = "server.pem", key = "server.key", client_auth = "optional", client_ca = "device-ca.pem", forward_cert_header = "X-SSL-CERT", forward_subject_header = "X-SSL-SUBJECT", forward_fingerprint_header = "X-SSL-FINGERPRINT" }}
{extra}

  [[listener.route]]
  path_prefix = "/module"
  module = "echo"

  [[listener.route]]
  path_prefix = "/flaky"
  pool = "flaky"

  [[listener.route]]
  path_prefix = "/"
  pool = "one"
"#
        )
    };
    let config = format!(
        r#"[admin]
bind = "{admin}"
{}
{}
[[pool]]
name = "one"
backends = [{{ address = "{echo}" }}]

[[pool]]
name = "flaky"
algorithm = "round_robin"
backends = [{{ address = "{closer}" }}, {{ address = "{echo}" }}]

[module.echo]
kind = "echo"
"#,
        listener("strict", strict, ""),
        listener("lenient", lenient, "allow_underscores_in_headers = true"),
    );
    let path = d.join("fleetgate.toml");
    std::fs::write(&path, config).unwrap();
    let mut registry = Registry::new();
    registry.register(
        "echo",
        Arc::new(|_, _| Box::pin(async { Ok(Arc::new(EchoModule) as Arc<dyn Module>) })),
    );
    let plan = fleetgate::config::load_with(&path, &registry).expect("config loads");
    let metrics = Arc::new(Metrics::new());
    let rt = fleetgate::runtime::Runtime::start_with_modules(plan, metrics.clone(), &registry)
        .await
        .unwrap();
    // The runtime lives as long as the test's tokio runtime.
    std::mem::forget(rt);
    Lb {
        _dir: dir,
        server_ca,
        device,
        metrics,
        strict,
        lenient,
    }
}

fn seen(body: &str) -> Seen {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo: {e}: {body}"))
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_missing_or_invalid_hosts_are_400() {
    let lb = start().await;
    let bad: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@localhost\r\nConnection: close\r\n\r\n",
    ];
    for req in bad {
        let resp = lb.raw(lb.strict, req, false).await;
        assert_eq!(
            status(&resp),
            400,
            "{}: {resp}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(lb.errors("strict", "bad_host_header"), 5);
    let ok = lb
        .raw(
            lb.strict,
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
    assert_eq!(status(&ok), 200, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_is_routed_and_forwarded() {
    let lb = start().await;
    // HTTP/1.1 absolute form: the target's authority is checked against
    // allowed_hosts, whatever Host says.
    let resp = lb
        .raw(
            lb.strict,
            b"GET http://internal.example/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
    assert_eq!(status(&resp), 421, "{resp}");
    // ...and is what the backend gets as Host.
    let resp = lb
        .raw(
            lb.strict,
            b"GET https://device.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
    assert_eq!(status(&resp), 200, "{resp}");
    let s = seen(resp.split_once("\r\n\r\n").unwrap().1);
    assert_eq!(s.headers["host"], ["device.example"]);
    assert_eq!(s.header("x-forwarded-host"), Some("device.example"));

    // HTTP/2: :authority wins over Host the same way.
    let h2 = |authority: &'static str| {
        let tls = lb.tls(None, &[b"h2"]);
        let front = lb.strict;
        async move {
            let stream = tls_connect(front, "localhost", tls).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("https://{authority}/x"))
                .header("host", "evil.example")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (code, body) = h2("device.example").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(seen(&body).headers["host"], ["device.example"]);
    let (code, _) = h2("internal.example").await;
    assert_eq!(code, 421);
}

/// Underscore look-alikes of every header the balancer sets, a forged
/// real one, and an ordinary underscore header.
const FORGED: [(&str, &str); 8] = [
    ("x_ssl_cert", "forged"),
    ("x_ssl_subject", "CN=forged"),
    ("x_ssl_fingerprint", "forged"),
    ("x_forwarded_for", "6.6.6.6"),
    ("x_forwarded_proto", "http"),
    ("x_forwarded_host", "evil.example"),
    ("x-ssl-cert", "forged"),
    ("my_header", "kept?"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_lookalikes_never_reach_a_backend() {
    let lb = start().await;
    for (listener, front, lenient) in [("strict", lb.strict, false), ("lenient", lb.lenient, true)]
    {
        for cert in [None, Some(&lb.device)] {
            for path in ["/pool", "/module"] {
                let tls = lb.tls(cert, &[b"http/1.1"]);
                let (code, body) = https_get(front, "localhost", tls, path, &FORGED)
                    .await
                    .unwrap();
                assert_eq!(code, 200, "{body}");
                let s = seen(&body);
                let what = format!("{listener} {path} cert={}: {body}", cert.is_some());
                for (name, _) in &FORGED[..6] {
                    assert!(!s.headers.contains_key(*name), "{name} reached {what}");
                }
                assert_eq!(s.header("my_header").is_some(), lenient, "{what}");
                let real = s.headers.get("x-ssl-cert");
                if path == "/pool" {
                    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"), "{what}");
                    assert_eq!(s.header("x-forwarded-proto"), Some("https"), "{what}");
                    assert_eq!(s.header("x-forwarded-host"), Some("localhost"), "{what}");
                    match cert {
                        Some(_) => {
                            let v = real.unwrap_or_else(|| panic!("no certificate: {what}"));
                            assert_eq!(v.len(), 1, "{what}");
                            assert_ne!(v[0], "forged", "{what}");
                            assert!(s.header("x-ssl-subject").unwrap().contains("device-1"));
                            assert_eq!(s.header("x-ssl-fingerprint").unwrap().len(), 64);
                        }
                        None => assert!(real.is_none(), "{what}"),
                    }
                } else {
                    // A module gets the certificate from its context only.
                    assert!(real.is_none(), "{what}");
                    assert!(s.header("x-ssl-subject").is_none(), "{what}");
                }
            }
        }
        // 4 requests, 6 look-alikes each; my_header goes only when strict.
        assert_eq!(lb.dropped(listener, "lookalike"), 24, "{listener}");
        assert_eq!(
            lb.dropped(listener, "underscore"),
            if lenient { 0 } else { 4 }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_without_answering_costs_no_get() {
    let lb = start().await;
    let tls = lb.tls(None, &[b"http/1.1"]);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (tls, front) = (tls.clone(), lb.strict);
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..10 {
                    let (code, body) = https_get(front, "localhost", tls.clone(), "/flaky", &[])
                        .await
                        .unwrap();
                    codes.push((code, body));
                }
                codes
            })
        })
        .collect();
    for t in tasks {
        for (code, body) in t.await.unwrap() {
            assert_eq!(code, 200, "{body}");
            assert_eq!(seen(&body).backend, "echo");
        }
    }
    assert!(lb.retries() >= 1, "the closing backend was never tried");
    assert_eq!(lb.errors("strict", "upstream_failed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_client_body_is_the_clients_400() {
    let lb = start().await;
    let resp = lb
        .raw(
            lb.strict,
            b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n5\r\nhello\r\nzz\r\n\r\n",
            false,
        )
        .await;
    assert_eq!(status(&resp), 400, "{resp}");
    assert_eq!(lb.errors("strict", "bad_request_body"), 1);
    // Shorter than its Content-Length, then the client stops sending:
    // the answer may not reach it, but it is counted as its error.
    let resp = lb
        .raw(
            lb.strict,
            b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly ten..",
            true,
        )
        .await;
    assert!(resp.is_empty() || status(&resp) == 400, "{resp}");
    for _ in 0..250 {
        if lb.errors("strict", "bad_request_body") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lb.errors("strict", "bad_request_body"), 2);
    assert_eq!(lb.errors("strict", "upstream_failed"), 0);
}
