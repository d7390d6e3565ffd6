//! TLS offload through the real binary: client-certificate policy,
//! certificate forwarding, header stripping, path routing, WebSocket,
//! re-encryption.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::pki::{client_config, server_config, Ca, Leaf};
use common::web::{echo_backend, https_get, tls_connect, websocket_backend, Seen};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Fixture {
    _dir: tempfile::TempDir,
    server_ca: Ca,
    device: Leaf,
    intruder: Leaf,
    lb: Balancer,
    front: SocketAddr,
}

fn decode_percent(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// An offload listener like the vendor's recommended nginx setup: the
/// WebSocket endpoints to one pool, everything else to another.
async fn fixture(client_auth: &str, extra_listener: &str, pools: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let device_ca = Ca::new(d, "device");
    let other_ca = Ca::new(d, "other");
    let server = server_ca.server(d, "server", &["device.example", "localhost"]);
    let device = device_ca.client(d, "device-1", "device-1");
    let intruder = other_ca.client(d, "intruder", "intruder");
    let ums = echo_backend("ums", None).await;
    let ws = websocket_backend().await;
    let front = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "device-tls"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{}", key = "{}", client_auth = "{client_auth}", client_ca = "{}", forward_cert_header = "X-SSL-CERT" }}
{extra_listener}

  [[listener.route]]
  path_regex = "^/device-connector/device/(ws-connect|portforwarding)"
  pool = "ums-ws"

  [[listener.route]]
  path_prefix = "/"
  pool = "ums"

[[pool]]
name = "ums"
backends = [{{ address = "{ums}" }}]

[[pool]]
name = "ums-ws"
backends = [{{ address = "{ws}" }}]
{pools}
"#,
        server.cert_path.display(),
        server.key_path.display(),
        device_ca.pem_path.display(),
    );
    let lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        server_ca,
        device,
        intruder,
        lb,
        front,
    }
}

impl Fixture {
    fn client(&self, cert: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        client_config(&self.server_ca, cert, &[b"http/1.1"])
    }

    async fn get(
        &self,
        cert: Option<&Leaf>,
        path: &str,
        extra: &[(&str, &str)],
    ) -> std::io::Result<(u16, String)> {
        https_get(self.front, "device.example", self.client(cert), path, extra).await
    }
}

fn seen(body: &str) -> Seen {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo: {e}: {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn optional_client_certificates() {
    let f = fixture("optional", "", "").await;

    // A valid device certificate: served, and forwarded as nginx's
    // $ssl_client_escaped_cert would be (URL-escaped PEM).
    let (status, body) = f.get(Some(&f.device), "/api/x", &[]).await.unwrap();
    assert_eq!(status, 200);
    let s = seen(&body);
    let header = s.header("x-ssl-cert").expect("certificate header");
    assert!(
        !header.contains('\n') && !header.contains(' '),
        "header must be escaped: {header}"
    );
    assert_eq!(decode_percent(header).trim(), f.device.cert_pem.trim());
    assert_eq!(header, fleetgate::tls::forward::escaped_pem(&f.device.der));

    // No certificate (an onboarding device): still served, no header.
    let (status, body) = f.get(None, "/api/x", &[]).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(seen(&body).header("x-ssl-cert"), None);

    // A certificate from another CA: rejected at the handshake.
    let r = f.get(Some(&f.intruder), "/api/x", &[]).await;
    assert!(
        r.is_err(),
        "a certificate that does not verify must be refused: {r:?}"
    );
    assert!(eventually(Duration::from_secs(3), || {
        f.lb.metric(
            "fleetgate_tls_client_certificates_total{listener=\"device-tls\",state=\"rejected\"}",
        ) >= 1.0
    }));
}

#[tokio::test(flavor = "multi_thread")]
async fn required_client_certificates() {
    let f = fixture("required", "", "").await;
    assert_eq!(f.get(Some(&f.device), "/", &[]).await.unwrap().0, 200);
    assert!(
        f.get(None, "/", &[]).await.is_err(),
        "no certificate must be refused"
    );
    assert!(f.get(Some(&f.intruder), "/", &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn client_sent_certificate_headers_never_reach_the_backend() {
    let f = fixture("optional", "", "").await;
    let forged = [("X-SSL-CERT", "forged"), ("x-ssl-cert", "forged-again")];
    let (_, body) = f.get(None, "/", &forged).await.unwrap();
    assert_eq!(seen(&body).header("x-ssl-cert"), None);
    let (_, body) = f.get(Some(&f.device), "/", &forged).await.unwrap();
    let s = seen(&body);
    assert_eq!(s.headers["x-ssl-cert"].len(), 1);
    assert_eq!(
        s.header("x-ssl-cert").unwrap(),
        fleetgate::tls::forward::escaped_pem(&f.device.der)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_and_path_routing() {
    let f = fixture("optional", "", "").await;
    let (_, body) = f
        .get(None, "/api/v1/x", &[("X-Forwarded-For", "6.6.6.6")])
        .await
        .unwrap();
    let s = seen(&body);
    assert_eq!(s.backend, "ums");
    assert_eq!(s.path, "/api/v1/x");
    assert_eq!(
        s.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "an untrusted client cannot set XFF"
    );
    assert_eq!(s.header("x-forwarded-proto"), Some("https"));
    assert_eq!(s.header("x-forwarded-host"), Some("device.example"));
    assert_eq!(s.header("host"), Some("device.example"));
    // The WebSocket endpoints go to the other pool (a plain GET there is
    // refused by the WebSocket server, which proves where it went).
    let (status, body) = f
        .get(None, "/device-connector/device/ws-connect", &[])
        .await
        .unwrap();
    assert_ne!(status, 200, "{body}");
    assert!(
        f.lb.metric(
            "fleetgate_http_requests_total{class=\"2xx\",listener=\"device-tls\",route=\"route1\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_with_client_certificate_carries_10000_messages() {
    let f = fixture("optional", "header_timeout = \"500ms\"", "").await;
    let tls = tls_connect(f.front, "device.example", f.client(Some(&f.device)))
        .await
        .unwrap();
    let url = format!(
        "wss://device.example:{}/device-connector/device/ws-connect",
        f.front.port()
    );
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("websocket upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    // The backend first tells us the upgrade request's headers.
    let hello = ws.next().await.unwrap().unwrap().into_text().unwrap();
    let headers: std::collections::BTreeMap<String, String> = serde_json::from_str(&hello).unwrap();
    assert_eq!(
        headers["x-ssl-cert"],
        fleetgate::tls::forward::escaped_pem(&f.device.der)
    );

    // Idle past the HTTP header timeout: an upgraded stream has its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (mut tx, mut rx) = ws.split();
    let n = 10_000;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tx.send(Message::text(format!("message {i}")))
                .await
                .unwrap();
        }
        tx
    });
    for i in 0..n {
        let m = rx.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap(), format!("message {i}"));
    }
    let mut tx = sender.await.unwrap();
    tx.send(Message::Close(None)).await.unwrap();
    // The backend answers the close and hangs up; once the device closes
    // too, the relay ends and the stream is no longer counted.
    while let Some(Ok(m)) = rx.next().await {
        if m.is_close() {
            break;
        }
    }
    drop((tx, rx));
    assert!(eventually(Duration::from_secs(3), || {
        f.lb.metric("fleetgate_http_upgraded_streams_active{listener=\"device-tls\"}") == 0.0
    }));
}

async fn reencrypt_fixture(backend_leaf: impl FnOnce(&Path, &Ca) -> Leaf) -> (Fixture, SocketAddr) {
    // The backend's certificate comes from `backend_leaf`; the pool trusts
    // only the "upstream" CA.
    let dir = tempfile::tempdir().unwrap();
    let up_ca = Ca::new(dir.path(), "upstream");
    let leaf = backend_leaf(dir.path(), &up_ca);
    let backend = echo_backend("tls13", Some(server_config(&leaf, true))).await;
    let pools = format!(
        r#"
[[pool]]
name = "ums-reencrypt"
backends = [{{ address = "{backend}" }}]
tls = {{ ca = "{}", server_name = "ums.example", min_version = "1.3" }}
"#,
        up_ca.pem_path.display()
    );
    let extra =
        "\n  [[listener.route]]\n  path_prefix = \"/reencrypt\"\n  pool = \"ums-reencrypt\"\n";
    let f = fixture("optional", extra, &pools).await;
    // Keep the upstream CA's directory alive with the fixture.
    std::mem::forget(dir);
    (f, backend)
}

#[tokio::test(flavor = "multi_thread")]
async fn reencryption_to_a_tls13_backend() {
    let (f, _) = reencrypt_fixture(|d, ca| ca.server(d, "ums", &["ums.example"])).await;
    let (status, body) = f.get(Some(&f.device), "/reencrypt/x", &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let s = seen(&body);
    assert_eq!(s.backend, "tls13");
    assert!(s.header("x-ssl-cert").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_backend_certificate_gives_502() {
    let (f, _) =
        reencrypt_fixture(|d, _| Ca::new(d, "rogue").server(d, "ums", &["ums.example"])).await;
    let (status, _) = f.get(None, "/reencrypt/x", &[]).await.unwrap();
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_with_a_client_certificate() {
    let f = fixture("optional", "", "").await;
    let port = f.front.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&f.server_ca.pem_path)
        .arg("--cert")
        .arg(&f.device.cert_path)
        .arg("--key")
        .arg(&f.device.key_path)
        .arg("--resolve")
        .arg(format!("device.example:{port}:127.0.0.1"))
        .arg(format!("https://device.example:{port}/api/curl"))
        .output()
        .await
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = seen(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s.path, "/api/curl");
    assert_eq!(
        s.header("x-ssl-cert").unwrap(),
        fleetgate::tls::forward::escaped_pem(&f.device.der)
    );
}

/// Reads one HTTP/1.1 response with a Content-Length body (what the echo
/// backend sends) off a raw stream; returns (status, body).
async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("content-length");
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                    .await
                    .expect("response body in time")
                    .unwrap();
                assert!(n > 0, "connection closed mid-response");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            buf.drain(..end + 4 + len);
            return (status, body);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: device.example\r\n\r\n")
}

/// One keep-alive connection through idle pauses (where the balancer puts
/// its HTTP state away), pipelined requests, a request head split across
/// a pause and a request body trickling in: every response comes back, in
/// order, on the same connection.
#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_survives_idling_pipelining_and_split_requests() {
    use tokio::io::AsyncWriteExt;
    let f = fixture("optional", "", "").await;
    let mut s = tls_connect(f.front, "device.example", f.client(None))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let pause = Duration::from_millis(300);

    s.write_all(get_request("/first").as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, seen(&body).path.as_str()), (200, "/first"));

    tokio::time::sleep(pause).await;
    s.write_all(get_request("/after-idle").as_bytes())
        .await
        .unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, seen(&body).path.as_str()), (200, "/after-idle"));

    // Three requests in one write.
    let three = ["/p1", "/p2", "/p3"].map(get_request).concat();
    s.write_all(three.as_bytes()).await.unwrap();
    for p in ["/p1", "/p2", "/p3"] {
        let (status, body) = read_response(&mut s, &mut buf).await;
        assert_eq!((status, seen(&body).path.as_str()), (200, p));
    }

    // A full request followed by half of the next one, the rest after a pause.
    let split = get_request("/split");
    let (a, b) = split.split_at(20);
    s.write_all(format!("{}{a}", get_request("/before-split")).as_bytes())
        .await
        .unwrap();
    s.flush().await.unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, seen(&body).path.as_str()), (200, "/before-split"));
    tokio::time::sleep(pause).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, seen(&body).path.as_str()), (200, "/split"));

    // A POST whose body arrives in two parts, then a GET.
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: device.example\r\ncontent-length: 10\r\n\r\nhello",
    )
    .await
    .unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(pause).await;
    s.write_all(b"world").await.unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    let seen_post = seen(&body);
    assert_eq!((status, seen_post.path.as_str()), (200, "/upload"));
    assert_eq!(seen_post.header("content-length"), Some("10"));
    tokio::time::sleep(pause).await;
    s.write_all(get_request("/last").as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, seen(&body).path.as_str()), (200, "/last"));
}

/// An idle keep-alive connection is closed once the header timeout has
/// passed without a next request.
#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connection_closes_after_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture("optional", "header_timeout = \"500ms\"", "").await;
    let mut s = tls_connect(f.front, "device.example", f.client(None))
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.write_all(get_request("/one").as_bytes()).await.unwrap();
    let (status, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "idle connection still open after 5 s");
    assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
}

/// A client that negotiates `h2` by ALPN is served HTTP/2; the backend
/// still gets HTTP/1.1 with a Host header.
#[tokio::test(flavor = "multi_thread")]
async fn http2_chosen_by_alpn() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let f = fixture("optional", "", "").await;
    let config = client_config(&f.server_ca, None, &[b"h2", b"http/1.1"]);
    let tls = tls_connect(f.front, "device.example", config)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for path in ["/h2/a", "/h2/b"] {
        let req = hyper::Request::get(format!("https://device.example{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let s = seen(&String::from_utf8_lossy(&body));
        assert_eq!(s.path, path);
        assert_eq!(s.header("host"), Some("device.example"));
    }
}

/// An HTTP/1.1 backend answering "ok" that counts the TCP connections it
/// accepted.
async fn counting_backend(accepted: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok\n")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Requests from successive client connections share one kept-alive
/// backend connection: with one worker there is one idle list, and a
/// connection goes back to it once its response has been read.
#[tokio::test(flavor = "multi_thread")]
async fn backend_connections_are_kept_alive_across_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let server = server_ca.server(d, "server", &["device.example"]);
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = counting_backend(accepted.clone()).await;
    let front = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[global]
worker_threads = 1

[[listener]]
name = "web"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{}", key = "{}" }}

  [[listener.route]]
  path_prefix = "/"
  pool = "web"

[[pool]]
name = "web"
backends = [{{ address = "{backend}" }}]
"#,
        server.cert_path.display(),
        server.key_path.display(),
    );
    let _lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap();
    let client = client_config(&server_ca, None, &[b"http/1.1"]);
    for i in 0..20 {
        let (status, body) = https_get(
            front,
            "device.example",
            client.clone(),
            &format!("/r{i}"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!((status, body.as_str()), (200, "ok\n"));
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "20 sequential requests opened more than one backend connection"
    );
}

/// Bytes that are not a TLS handshake (plain HTTP, garbage, a truncated or
/// corrupted ClientHello, a record claiming 16 MiB) end only their own
/// connection, are counted as failed handshakes, and a device that
/// connects meanwhile is served.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_handshakes_are_refused_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture("optional", "", "").await;
    // A held connection: it must keep working while the others fail.
    let mut held = tls_connect(f.front, "device.example", f.client(Some(&f.device)))
        .await
        .unwrap();
    let hello = {
        // A real ClientHello, captured from a rustls client.
        let mut conn =
            rustls::ClientConnection::new(f.client(None), "device.example".try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    };
    let mut corrupted = hello.clone();
    for b in corrupted.iter_mut().skip(9).step_by(7) {
        *b ^= 0x5a;
    }
    let inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: device.example\r\n\r\n".to_vec(),
        (0..3000u32)
            .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
            .collect(),
        hello[..hello.len() / 2].to_vec(),
        corrupted,
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff],
    ];
    // Failed handshakes of every reason.
    let failed = || -> f64 {
        f.lb.metrics()
            .lines()
            .filter(|l| {
                l.starts_with("fleetgate_tls_handshakes_total{")
                    && l.contains("listener=\"device-tls\"")
                    && l.contains("result=\"failed\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let before = failed();
    for (i, input) in inputs.iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(f.front).await.unwrap();
        s.write_all(input).await.unwrap();
        if i == 2 {
            // Half a hello, then the client gives up.
            s.shutdown().await.unwrap();
        }
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "input {i}: the connection was not closed");
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
            "input {i}: answered as if it were a request"
        );
    }
    assert!(
        eventually(Duration::from_secs(3), || failed() >= before + 5.0),
        "failed handshakes counted: {}",
        failed() - before
    );
    // The held connection and a new one still work.
    held.write_all(b"GET /still HTTP/1.1\r\nHost: device.example\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    assert_eq!(f.get(Some(&f.device), "/", &[]).await.unwrap().0, 200);
}
