//! TLS passthrough through the real binary: SNI routing to backends that
//! terminate TLS themselves (their own certificates reach the client),
//! the no-SNI policy, ClientHellos arriving in tiny pieces, rejection of
//! garbage / oversized / stalled hellos without harm to other clients,
//! a real OpenSSL client, and failover past a dead backend.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{client_config, server_config, Ca, Leaf};
use common::web::{echo_backend, https_get, tls_connect, Seen};
use common::*;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTENER: &str = "device-passthrough";
/// Bound on every network wait, so that a hang fails instead of blocking.
const WAIT: Duration = Duration::from_secs(10);

/// Three HTTPS echo backends, each with its own certificate, behind one
/// passthrough listener: `a.example` → a, `*.b.example` → b, anything
/// else (and no SNI) → c.
struct Fixture {
    _dir: tempfile::TempDir,
    ca: Ca,
    a: Leaf,
    b: Leaf,
    c: Leaf,
    lb: Balancer,
    front: SocketAddr,
}

async fn fixture(listener_extra: &str) -> Fixture {
    fixture_with(&format!("pool = \"c\"\n{listener_extra}"), "").await
}

/// `listener_keys` go into the passthrough listener's table (without a
/// `pool` line it has no default); `more` (further listeners, say) goes
/// between the listener and the pools a, b and c.
async fn fixture_with(listener_keys: &str, more: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "backends");
    let a = ca.server(d, "a", &["a.example"]);
    let b = ca.server(d, "b", &["x.b.example"]);
    // The IP SAN lets a client that sends no SNI (it dialled an IP)
    // verify the default backend.
    let c = ca.server(d, "c", &["c.example", "127.0.0.1"]);
    let addr_a = echo_backend("a", Some(server_config(&a, false))).await;
    let addr_b = echo_backend("b", Some(server_config(&b, true))).await;
    let addr_c = echo_backend("c", Some(server_config(&c, false))).await;
    let front = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "{LISTENER}"
bind = "{front}"
mode = "passthrough"
{listener_keys}

  [[listener.sni]]
  server_name = "a.example"
  pool = "a"

  [[listener.sni]]
  server_name = "*.b.example"
  pool = "b"

{more}

[[pool]]
name = "a"
backends = [{{ address = "{addr_a}" }}]

[[pool]]
name = "b"
backends = [{{ address = "{addr_b}" }}]

[[pool]]
name = "c"
backends = [{{ address = "{addr_c}" }}]
"#
    );
    let lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        ca,
        a,
        b,
        c,
        lb,
        front,
    }
}

impl Fixture {
    fn client(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca, None, &[b"http/1.1"])
    }

    /// The rejection counter for `reason` on the passthrough listener.
    async fn rejected(&self, reason: &str) -> f64 {
        rejected(self.lb.admin, LISTENER, reason).await
    }

    /// Wait (up to 5 s) until the rejection counter for `reason` is `want`.
    async fn expect_rejected(&self, reason: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.rejected(reason).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rejected{{reason={reason:?}}} is {got}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn metrics_text(admin: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        let resp = http_get(admin, "/metrics").expect("GET /metrics");
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    })
    .await
    .unwrap()
}

async fn rejected(admin: SocketAddr, listener: &str, reason: &str) -> f64 {
    let series = format!(
        "fleetgate_tls_client_hello_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
    );
    metric_value(&metrics_text(admin).await, &series)
}

fn seen(body: &str) -> Seen {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo: {e}: {body}"))
}

/// The leaf certificate the server presented on `tls`.
fn peer_leaf(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("server certificate")[0].to_vec()
}

/// TLS to the listener with `sni` (an IP means no SNI at all), then one
/// GET; returns the certificate seen and what the backend echoed.
async fn fetch(f: &Fixture, sni: &str, path: &str) -> (Vec<u8>, Seen) {
    let tls = tokio::time::timeout(WAIT, tls_connect(f.front, sni, f.client()))
        .await
        .unwrap_or_else(|_| panic!("{sni}: handshake timed out"))
        .unwrap_or_else(|e| panic!("{sni}: handshake failed: {e}"));
    let der = peer_leaf(&tls);
    let mut sender = http1(tls).await;
    let (status, body) = get(&mut sender, sni, path).await;
    assert_eq!(status, 200, "{sni}: {body}");
    (der, seen(&body))
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

async fn http1(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

/// One GET on a kept-alive HTTP/1.1 connection; returns (status, body).
async fn get(sender: &mut Sender, host: &str, path: &str) -> (u16, String) {
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let exchange = async {
        sender.ready().await.expect("connection usable");
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} timed out"))
}

/// The bytes a rustls client sends first, and the connection that sent
/// them (to finish the handshake with).
fn client_hello(
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> (rustls::ClientConnection, Vec<u8>) {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    (conn, hello)
}

/// Read until the peer closes or resets; returns what arrived and how.
async fn read_until_closed(s: &mut tokio::net::TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => panic!("connection was not closed within {WAIT:?}"),
            Ok(Ok(0)) => return (got, Ok(())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (got, Err(e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_sni_with_the_backends_own_certificates() {
    let f = fixture("").await;

    let (der, echo) = fetch(&f, "a.example", "/one").await;
    assert_eq!(der, f.a.der, "a.example must get a's certificate");
    assert_eq!(echo.backend, "a");
    assert_eq!(echo.path, "/one");

    let (der, echo) = fetch(&f, "x.b.example", "/two").await;
    assert_eq!(der, f.b.der, "x.b.example must get b's certificate");
    assert_eq!(echo.backend, "b");

    // The wildcard is one label deep and case does not matter.
    let (der, echo) = fetch(&f, "X.B.Example", "/").await;
    assert_eq!((der == f.b.der, echo.backend.as_str()), (true, "b"));

    // The default pool's own name has no rule either.
    let (der, echo) = fetch(&f, "c.example", "/three").await;
    assert_eq!(der, f.c.der);
    assert_eq!(echo.backend, "c");
    // A name no rule knows goes to the default pool too; c's certificate
    // does not cover it, so this client skips verification.
    let (der, echo) = fetch_unverified(&f, "unknown.example").await;
    assert_eq!(der, f.c.der, "unknown.example goes to the default pool");
    assert_eq!(echo.backend, "c");

    // No SNI at all (rustls sends none for an IP address): the default.
    let (der, echo) = fetch(&f, "127.0.0.1", "/four").await;
    assert_eq!(der, f.c.der);
    assert_eq!(echo.backend, "c");

    for reason in ["not_tls", "malformed", "no_sni", "no_route", "timeout"] {
        assert_eq!(f.rejected(reason).await, 0.0, "{reason}");
    }
}

/// A client config that accepts any server certificate, for routing
/// checks where the name asked for is not on the certificate served: the
/// balancer's own TLS health-probe config, which judges no certificate.
fn trust_anything() -> Arc<rustls::ClientConfig> {
    let mut c = fleetgate::balance::health::tls_probe_config();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

async fn fetch_unverified(f: &Fixture, sni: &str) -> (Vec<u8>, Seen) {
    let tls = tokio::time::timeout(WAIT, tls_connect(f.front, sni, trust_anything()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{sni}: handshake failed: {e}"));
    let der = peer_leaf(&tls);
    let mut sender = http1(tls).await;
    let (status, body) = get(&mut sender, sni, "/").await;
    assert_eq!(status, 200, "{body}");
    (der, seen(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_reject_closes_hellos_without_a_name() {
    let f = fixture(r#"no_sni = "reject""#).await;

    for _ in 0..2 {
        let result = tokio::time::timeout(WAIT, tls_connect(f.front, "127.0.0.1", f.client()))
            .await
            .expect("a hello without SNI must be closed, not left hanging");
        assert!(
            result.is_err(),
            "a hello without SNI must not reach a backend"
        );
    }
    f.expect_rejected("no_sni", 2.0).await;

    // Names still route; a name without a rule still takes the default.
    let (der, echo) = fetch(&f, "a.example", "/").await;
    assert_eq!((der == f.a.der, echo.backend.as_str()), (true, "a"));
    let (der, echo) = fetch(&f, "c.example", "/").await;
    assert_eq!((der == f.c.der, echo.backend.as_str()), (true, "c"));
    assert_eq!(f.rejected("no_sni").await, 2.0);
    assert_eq!(f.rejected("no_route").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_in_tiny_tcp_writes_still_routes() {
    let f = fixture("").await;
    for (sni, want, leaf) in [
        ("x.b.example", "b", f.b.der.clone()),
        ("a.example", "a", f.a.der.clone()),
    ] {
        let (front, config) = (f.front, f.client());
        let (backend, der) = tokio::task::spawn_blocking(move || {
            let (conn, hello) = client_hello(config, sni);
            slow_exchange(front, sni, conn, &hello)
        })
        .await
        .unwrap();
        assert_eq!(backend, want, "{sni}");
        assert_eq!(der, leaf, "{sni}: certificate");
    }
    for reason in ["not_tls", "malformed", "timeout", "closed"] {
        assert_eq!(f.rejected(reason).await, 0.0, "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hellos_are_closed_and_counted_without_harming_others() {
    let f = fixture(r#"hello_timeout = "500ms""#).await;

    // A good client, kept alive across everything below.
    let tls = tls_connect(f.front, "a.example", f.client()).await.unwrap();
    let mut good = http1(tls).await;
    let (status, body) = get(&mut good, "a.example", "/before").await;
    assert_eq!((status, seen(&body).backend.as_str()), (200, "a"));

    // A truncated hello from a client that then goes silent.
    let stalled_at = Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(f.front).await.unwrap();
    let (_conn, hello) = client_hello(f.client(), "a.example");
    stalled.write_all(&hello[..hello.len() / 2]).await.unwrap();

    // While it is pending, others are served: on the kept-alive connection
    // and on a new one.
    let (status, body) = get(&mut good, "a.example", "/pending").await;
    assert_eq!((status, seen(&body).backend.as_str()), (200, "a"));
    let (der, echo) = fetch(&f, "x.b.example", "/pending").await;
    assert_eq!((der == f.b.der, echo.backend.as_str()), (true, "b"));
    assert!(
        stalled_at.elapsed() < Duration::from_millis(500),
        "too slow to test concurrency"
    );

    // Plaintext HTTP: closed at once, long before the hello timeout.
    let started = Instant::now();
    let mut garbage = tokio::net::TcpStream::connect(f.front).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (got, _) = read_until_closed(&mut garbage).await;
    assert!(got.is_empty(), "nothing may answer garbage: {got:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(450),
        "garbage closed after {took:?}"
    );
    f.expect_rejected("not_tls", 1.0).await;

    // A record announcing a 60000-byte handshake message (over the 16 KiB
    // cap), then that many bytes: closed from the header on.
    let big = tokio::net::TcpStream::connect(f.front).await.unwrap();
    let mut oversized = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01];
    oversized.extend_from_slice(&60000u32.to_be_bytes()[1..]);
    oversized.extend_from_slice(&[0u8; 60000]);
    let (mut rd, mut wr) = big.into_split();
    // The balancer may close before all of it is written.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&oversized).await;
        wr
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(WAIT, rd.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an oversized hello must be closed: {closed:?}"
    );
    let _ = writer.await;
    f.expect_rejected("too_large", 1.0).await;

    // Other clients are unaffected: the kept-alive connection and a new
    // one both work.
    let (status, body) = get(&mut good, "a.example", "/during").await;
    assert_eq!((status, seen(&body).backend.as_str()), (200, "a"));
    let (der, echo) = fetch(&f, "x.b.example", "/during").await;
    assert_eq!((der == f.b.der, echo.backend.as_str()), (true, "b"));

    // The stalled client is closed once hello_timeout has passed.
    let (got, _) = read_until_closed(&mut stalled).await;
    let took = stalled_at.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "stalled hello closed after {took:?}, hello_timeout is 500ms"
    );
    f.expect_rejected("timeout", 1.0).await;

    // The good connection outlived all of it.
    let (status, body) = get(&mut good, "a.example", "/after").await;
    assert_eq!((status, seen(&body).backend.as_str()), (200, "a"));
    assert_eq!(f.rejected("not_tls").await, 1.0);
    assert_eq!(f.rejected("too_large").await, 1.0);
    assert_eq!(f.rejected("timeout").await, 1.0);
    assert_eq!(f.rejected("malformed").await, 0.0);
}

/// `openssl s_client` with `-servername`; returns its output.
async fn s_client(f: &Fixture, sni: &str) -> String {
    let (front, ca) = (f.front.to_string(), f.ca.pem_path.clone());
    let sni = sni.to_string();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("timeout")
            .args([
                "10",
                "openssl",
                "s_client",
                "-connect",
                &front,
                "-servername",
                &sni,
            ])
            .arg("-CAfile")
            .arg(&ca)
            .args(["-verify_hostname", &sni, "-verify_return_error"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "openssl s_client failed ({}):\n{text}",
            out.status
        );
        text
    })
    .await
    .unwrap()
}

/// The `subject=` line of s_client's output, spaces removed.
fn subject(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no subject line in:\n{output}"))
        .replace(' ', "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_sees_the_chosen_backends_certificate() {
    let f = fixture("").await;

    let out = s_client(&f, "a.example").await;
    assert_eq!(subject(&out), "CN=a.example", "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");

    let out = s_client(&f, "x.b.example").await;
    assert_eq!(subject(&out), "CN=x.b.example", "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    // b speaks TLS 1.3 only: the protocol is the backend's choice.
    assert!(out.contains("TLSv1.3"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_past_a_dead_backend() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "backends");
    let leaf = ca.server(d, "live", &["a.example"]);
    let live = echo_backend("live", Some(server_config(&leaf, false))).await;
    let dead = free_addr(); // nothing listens here
    let front = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "failover"
bind = "{front}"
mode = "passthrough"
pool = "f"

[[pool]]
name = "f"
backends = [{{ address = "{dead}" }}, {{ address = "{live}" }}]
retries = 2
max_fails = 1
"#
    );
    let lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap();
    let client = client_config(&ca, None, &[b"http/1.1"]);
    for i in 0..8 {
        let got = tokio::time::timeout(
            WAIT,
            https_get(front, "a.example", client.clone(), "/", &[]),
        )
        .await
        .unwrap_or_else(|_| panic!("connection {i} timed out"));
        let (status, body) = got.unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(seen(&body).backend, "live", "connection {i}");
    }
    let text = metrics_text(lb.admin).await;
    // The dead backend was tried (the hello was only peeked, so the retry
    // could replay it to the live one) and is out.
    let failures =
        format!("fleetgate_backend_connect_failures_total{{backend=\"{dead}\",pool=\"f\"}}");
    assert!(metric_value(&text, &failures) >= 1.0, "{failures}\n{text}");
    let up = format!("fleetgate_backend_up{{backend=\"{dead}\",pool=\"f\"}}");
    assert!(text.contains(&format!("{up} 0")), "{up}\n{text}");
    assert!(
        !text.lines().any(
            |l| l.starts_with("fleetgate_tls_client_hello_rejected_total") && !l.ends_with(" 0")
        ),
        "{text}"
    );
}

/// Re-frame a hello sent as one record into records of `size` payload
/// bytes, as clients with big hellos (or odd stacks) do.
fn reframe(wire: &[u8], size: usize) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
    assert_eq!(wire.len(), 5 + len, "one record expected");
    let mut out = Vec::new();
    for chunk in wire[5..].chunks(size) {
        out.extend_from_slice(&wire[..3]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Send `first` (the hello, possibly reworked) in writes of 1–5 bytes,
/// finish the handshake with `conn`, GET /; returns (backend, leaf DER).
fn slow_exchange(
    front: SocketAddr,
    sni: &str,
    mut conn: rustls::ClientConnection,
    first: &[u8],
) -> (String, Vec<u8>) {
    let mut tcp = std::net::TcpStream::connect_timeout(&front, WAIT).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut writes = 0;
    let mut rest = first;
    while !rest.is_empty() {
        let n = (1 + writes % 5).min(rest.len());
        tcp.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
        writes += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(writes > 50, "the hello went out in {writes} writes only");
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "GET /slow HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            // A close without close_notify ends the read as well.
            Err(_) if !response.is_empty() => break,
            Err(e) => panic!("{sni}: {e}"),
        }
    }
    let der = conn.peer_certificates().unwrap()[0].to_vec();
    let text = String::from_utf8_lossy(&response).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (seen(&body).backend, der)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_fragmented_over_records_and_writes_still_routes() {
    let f = fixture("").await;
    let (front, config) = (f.front, f.client());
    let (backend, der) = tokio::task::spawn_blocking(move || {
        let (conn, hello) = client_hello(config, "x.b.example");
        let framed = reframe(&hello, 40);
        assert!(framed.len() >= hello.len() + 4 * 5, "several records");
        slow_exchange(front, "x.b.example", conn, &framed)
    })
    .await
    .unwrap();
    assert_eq!((backend.as_str(), der == f.b.der), ("b", true));
    assert_eq!(f.rejected("malformed").await, 0.0);
}

/// A client whose ClientHello is padded to about `size` bytes with ALPN
/// names the backends do not know (so they negotiate none).
fn padded_client(f: &Fixture, size: usize) -> Arc<rustls::ClientConfig> {
    let mut c = (*f.client()).clone();
    c.alpn_protocols = (0..size / 251)
        .map(|i| {
            let mut p = format!("x-pad-{i:04}-").into_bytes();
            p.resize(250, b'p');
            p
        })
        .collect();
    Arc::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_hellos_route_up_to_the_cap() {
    let big_front = free_addr();
    let more = format!(
        r#"[[listener]]
name = "big-hellos"
bind = "{big_front}"
mode = "passthrough"
hello_max_bytes = 32768

  [[listener.sni]]
  server_name = "a.example"
  pool = "a"
"#
    );
    let f = fixture_with(r#"pool = "c""#, &more).await;

    // ~10 KiB: well over the first peek, under the default 16 KiB cap.
    let medium = padded_client(&f, 10_000);
    let wire = client_hello(medium.clone(), "a.example").1;
    assert!((9_000..16_000).contains(&wire.len()), "{}", wire.len());
    let tls = tls_connect(f.front, "a.example", medium).await.unwrap();
    assert_eq!(peer_leaf(&tls), f.a.der);
    let mut sender = http1(tls).await;
    let (status, body) = get(&mut sender, "a.example", "/medium").await;
    assert_eq!((status, seen(&body).backend.as_str()), (200, "a"));

    // ~20 KiB, which rustls sends as two records: over the default cap...
    let large = padded_client(&f, 20_000);
    let wire = client_hello(large.clone(), "a.example").1;
    assert!(wire.len() > 17_000, "{}", wire.len());
    assert_eq!(wire[0], 0x16);
    assert!(
        usize::from(u16::from_be_bytes([wire[3], wire[4]])) < wire.len() - 5,
        "more than one record"
    );
    let refused = tokio::time::timeout(WAIT, tls_connect(f.front, "a.example", large.clone()))
        .await
        .expect("an oversized hello must be closed, not left hanging");
    assert!(refused.is_err());
    f.expect_rejected("too_large", 1.0).await;

    // ...and reassembled and routed where the cap allows it.
    let tls = tls_connect(big_front, "a.example", large).await.unwrap();
    assert_eq!(peer_leaf(&tls), f.a.der);
    let mut sender = http1(tls).await;
    let (status, body) = get(&mut sender, "a.example", "/large").await;
    assert_eq!((status, seen(&body).backend.as_str()), (200, "a"));
    for reason in ["too_large", "malformed", "no_route", "timeout"] {
        assert_eq!(
            rejected(f.lb.admin, "big-hellos", reason).await,
            0.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_pool_unmatched_hellos_are_rejected() {
    // Only the two SNI rules: no `pool`.
    let f = fixture_with("", "").await;

    let (der, echo) = fetch(&f, "a.example", "/").await;
    assert_eq!((der == f.a.der, echo.backend.as_str()), (true, "a"));

    let unknown = tokio::time::timeout(
        WAIT,
        tls_connect(f.front, "unknown.example", trust_anything()),
    )
    .await
    .expect("closed, not left hanging");
    assert!(unknown.is_err(), "no rule and no default: no backend");
    f.expect_rejected("no_route", 1.0).await;

    let no_sni = tokio::time::timeout(WAIT, tls_connect(f.front, "127.0.0.1", trust_anything()))
        .await
        .expect("closed, not left hanging");
    assert!(no_sni.is_err(), "no SNI and no default: no backend");
    f.expect_rejected("no_sni", 1.0).await;

    // Clients that leave mid-hello, or before saying anything.
    let mut gone = tokio::net::TcpStream::connect(f.front).await.unwrap();
    let (_conn, hello) = client_hello(f.client(), "a.example");
    gone.write_all(&hello[..10]).await.unwrap();
    gone.shutdown().await.unwrap();
    let (got, _) = read_until_closed(&mut gone).await;
    assert!(got.is_empty());
    drop(tokio::net::TcpStream::connect(f.front).await.unwrap());
    f.expect_rejected("closed", 2.0).await;

    // None of it disturbed routing.
    let (der, echo) = fetch(&f, "x.b.example", "/").await;
    assert_eq!((der == f.b.der, echo.backend.as_str()), (true, "b"));
    assert_eq!(f.rejected("not_tls").await, 0.0);
    assert_eq!(f.rejected("malformed").await, 0.0);
}
