//! The PROXY protocol through the real binary: headers accepted on tcp,
//! offload and passthrough listeners (the declared client is what the
//! backend, X-Forwarded-For and the ACL see), sent to backends of a pool
//! with `send_proxy`, and refused from untrusted sources or when
//! malformed, with the refusals counted.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{client_config, server_config, Ca};
use common::web::{echo_backend, Seen};
use common::*;
use fleetgate::proxy_protocol::{encode, read_header, Version};
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Bound on every network wait, so that a hang fails instead of blocking.
const WAIT: Duration = Duration::from_secs(10);
const DECLARED: &str = "203.0.113.7:40000";
const DECLARED_DST: &str = "198.51.100.1:443";

/// A backend that parses the PROXY header fleetgate sends, answers with
/// a line naming what it declared, then echoes the rest of the stream.
struct HeaderBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn header_backend() -> HeaderBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let line = match read_header(&tcp, WAIT).await {
                    Ok(h) => match h.addresses {
                        Some(a) => format!("v{} {} {}\n", h.version, a.source, a.destination),
                        None => format!("v{} none\n", h.version),
                    },
                    Err(e) => format!("error {}\n", e.reason()),
                };
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest).await;
                let _ = tcp.write_all(line.as_bytes()).await;
                let _ = tcp.write_all(&rest).await;
            });
        }
    });
    HeaderBackend { addr, connections }
}

/// A TCP connection to `front`, from `source` when given.
async fn connect_from(front: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    tokio::time::timeout(WAIT, sock.connect(front)).await?
}

/// Send `bytes`, close our side, and read everything that comes back.
async fn exchange(
    front: SocketAddr,
    source: Option<IpAddr>,
    bytes: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut s = connect_from(front, source).await?;
    s.write_all(bytes).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await??;
    Ok(out)
}

fn v1(source: &str, destination: &str) -> Vec<u8> {
    encode(
        Version::V1,
        source.parse().unwrap(),
        destination.parse().unwrap(),
    )
}

fn payload(n: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    (0..n).map(|_| rng.u8(..)).collect()
}

async fn metric(lb: &Balancer, series: String) -> f64 {
    let admin = lb.admin;
    tokio::task::spawn_blocking(move || {
        let resp = http_get(admin, "/metrics").expect("GET /metrics");
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        metric_value(body, &series)
    })
    .await
    .unwrap()
}

fn rejected(listener: &str, reason: &str) -> String {
    format!("fleetgate_connections_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}}")
}

/// Wait (up to 5 s) until `series` reads `want`.
async fn expect_metric(lb: &Balancer, series: String, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = metric(lb, series.clone()).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(config: String) -> Balancer {
    tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap()
}

/// A tcp listener taking PROXY headers from 127.0.0.1, to a pool that
/// sends version 2 headers to a header-reading backend.
async fn tcp_fixture(listener_keys: &str) -> (Balancer, SocketAddr, HeaderBackend) {
    let backend = header_backend().await;
    let front = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "pp"
bind = "{front}"
pool = "p"
proxy_protocol = {{ from = ["10.0.0.0/8", "127.0.0.1"] }}
{listener_keys}

[[pool]]
name = "p"
send_proxy = "v2"
backends = [{{ address = "{}" }}]
"#,
        backend.addr
    );
    (start(config).await, front, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backend_sees_the_declared_client_then_the_payload_intact() {
    let (_lb, front, _backend) = tcp_fixture("").await;
    let body = payload(256 * 1024);
    let sent = [v1(DECLARED, DECLARED_DST), body.clone()].concat();
    let got = exchange(front, None, &sent).await.unwrap();
    let want = format!("v2 {DECLARED} {DECLARED_DST}\n");
    assert_eq!(
        String::from_utf8_lossy(&got[..want.len().min(got.len())]),
        want
    );
    assert!(got[want.len()..] == body[..], "payload changed on the way");

    // IPv6 in a version 2 header comes out as IPv6.
    let v6 = encode(
        Version::V2,
        "[2001:db8::7]:1234".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    let got = exchange(front, None, &[v6, b"six".to_vec()].concat())
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "v2 [2001:db8::7]:1234 [2001:db8::1]:443\nsix"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_unknown_headers_keep_the_real_client() {
    let (_lb, front, _backend) = tcp_fixture("").await;
    // Version 2 LOCAL: what a proxy sends for its own health checks.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend([0x20, 0x00, 0x00, 0x00]);
    for header in [local, b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut s = connect_from(front, None).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(&header).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut got))
            .await
            .unwrap()
            .unwrap();
        // The client's own address, and the listener address it reached.
        assert_eq!(got, format!("v2 {me} {front}\nhi"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_source_is_refused_and_counted() {
    let (lb, front, backend) = tcp_fixture("").await;
    let from_other = exchange(
        front,
        Some("127.0.0.2".parse().unwrap()),
        &v1(DECLARED, DECLARED_DST),
    )
    .await;
    // Closed without a byte (or reset, as the header was never read).
    assert!(
        from_other.as_ref().map_or(true, |b| b.is_empty()),
        "{from_other:?}"
    );
    expect_metric(&lb, rejected("pp", "proxy_protocol_untrusted"), 1.0).await;
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
    // The trusted source still gets through.
    let got = exchange(
        front,
        None,
        &[v1(DECLARED, DECLARED_DST), b"x".to_vec()].concat(),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("v2 {DECLARED} {DECLARED_DST}\nx")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_header_is_refused_and_counted_and_the_next_one_works() {
    let (lb, front, backend) = tcp_fixture(r#"hello_timeout = "300ms""#).await;
    for (garbage, reason, count) in [
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(),
            "proxy_protocol_invalid",
            1.0,
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            "proxy_protocol_invalid",
            2.0,
        ),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x41\x00\x00",
            "proxy_protocol_invalid",
            3.0,
        ),
    ] {
        let got = exchange(front, None, garbage).await;
        assert!(got.as_ref().map_or(true, |b| b.is_empty()), "{got:?}");
        expect_metric(&lb, rejected("pp", reason), count).await;
    }
    // A header that never completes runs into the timeout.
    let mut stalled = connect_from(front, None).await.unwrap();
    stalled.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, stalled.read(&mut buf))
        .await
        .unwrap();
    assert!(n.map_or(true, |n| n == 0));
    expect_metric(&lb, rejected("pp", "proxy_protocol_timeout"), 1.0).await;
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);

    let got = exchange(
        front,
        None,
        &[v1(DECLARED, DECLARED_DST), b"ok".to_vec()].concat(),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("v2 {DECLARED} {DECLARED_DST}\nok")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_applies_to_the_declared_client_too() {
    let (lb, front, backend) = tcp_fixture(r#"deny = ["203.0.113.0/24"]"#).await;
    let got = exchange(
        front,
        None,
        &[v1(DECLARED, DECLARED_DST), b"x".to_vec()].concat(),
    )
    .await;
    assert!(got.as_ref().map_or(true, |b| b.is_empty()), "{got:?}");
    expect_metric(&lb, rejected("pp", "acl"), 1.0).await;
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
    let got = exchange(
        front,
        None,
        &[v1("192.0.2.1:5", DECLARED_DST), b"x".to_vec()].concat(),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("v2 192.0.2.1:5 {DECLARED_DST}\nx")
    );
}

/// An HTTP/1.1 GET over `io`; returns the echo backend's view.
async fn get_over<IO>(io: IO, host: &str) -> Seen
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/who")
        .header("host", host)
        .header("x-forwarded-for", "6.6.6.6")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_behind_v1_forwards_the_declared_client() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "front");
    let leaf = ca.server(dir.path(), "front", &["device.example"]);
    let ums = echo_backend("ums", None).await;
    let front = free_addr();
    let _lb = start(format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "tls"
bind = "{front}"
mode = "offload"
pool = "ums"
tls = {{ cert = "{}", key = "{}" }}
proxy_protocol = {{ from = ["127.0.0.1"], timeout = "2s" }}

[[pool]]
name = "ums"
backends = [{{ address = "{ums}" }}]
"#,
        leaf.cert_path.display(),
        leaf.key_path.display()
    ))
    .await;
    let mut tcp = TcpStream::connect(front).await.unwrap();
    tcp.write_all(&v1(DECLARED, DECLARED_DST)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca, None, &[b"http/1.1"]))
        .connect("device.example".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let seen = get_over(tls, "device.example").await;
    assert_eq!(seen.backend, "ums");
    // The client's own X-Forwarded-For is not trusted; the declared
    // address replaces it.
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_sni_after_a_v2_header() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "backends");
    let a = ca.server(dir.path(), "a", &["a.example"]);
    let c = ca.server(dir.path(), "c", &["c.example"]);
    let addr_a = echo_backend("a", Some(server_config(&a, false))).await;
    let addr_c = echo_backend("c", Some(server_config(&c, false))).await;
    let front = free_addr();
    let lb = start(format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "pt"
bind = "{front}"
mode = "passthrough"
pool = "c"
proxy_protocol = {{ from = ["127.0.0.0/8"] }}

  [[listener.sni]]
  server_name = "a.example"
  pool = "a"

[[pool]]
name = "a"
backends = [{{ address = "{addr_a}" }}]

[[pool]]
name = "c"
backends = [{{ address = "{addr_c}" }}]
"#
    ))
    .await;
    let client = client_config(&ca, None, &[b"http/1.1"]);
    for (name, backend) in [("a.example", "a"), ("c.example", "c")] {
        let mut tcp = TcpStream::connect(front).await.unwrap();
        let header = encode(
            Version::V2,
            DECLARED.parse().unwrap(),
            DECLARED_DST.parse().unwrap(),
        );
        tcp.write_all(&header).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name.to_string().try_into().unwrap(), tcp)
            .await
            .unwrap();
        let seen = get_over(tls, name).await;
        assert_eq!(seen.backend, backend, "SNI {name}");
    }
    // Without a header, the ClientHello is refused as a header.
    let got = exchange(front, None, &[0x16, 0x03, 0x01, 0x00, 0x10]).await;
    assert!(got.as_ref().map_or(true, |b| b.is_empty()), "{got:?}");
    expect_metric(&lb, rejected("pt", "proxy_protocol_invalid"), 1.0).await;
}

#[test]
fn check_names_the_key_of_bad_proxy_protocol_settings() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"proxy_protocol = { from = ["10.0.0.0/8", "10.0.0.0/33"] }"#,
            "",
            "listener[0].proxy_protocol.from[1]",
            "\"10.0.0.0/33\" is not an IP address or CIDR network",
        ),
        (
            r#"proxy_protocol = { from = [] }"#,
            "",
            "listener[0].proxy_protocol.from",
            "an empty list would refuse every connection",
        ),
        (
            r#"proxy_protocol = { from = ["127.0.0.1"], timeout = "0s" }"#,
            "",
            "listener[0].proxy_protocol.timeout",
            "greater than zero",
        ),
        (
            r#"proxy_protocol = { form = ["127.0.0.1"] }"#,
            "",
            "listener[0].proxy_protocol.form",
            "unknown field `form`",
        ),
        (
            "",
            r#"send_proxy = "v3""#,
            "pool[0].send_proxy",
            "unknown variant `v3`, expected `v1` or `v2`",
        ),
    ];
    for (i, (listener_keys, pool_keys, key, says)) in cases.iter().enumerate() {
        let text = format!(
            r#"[[listener]]
name = "a"
bind = "127.0.0.1:7001"
pool = "p"
{listener_keys}

[[pool]]
name = "p"
backends = [{{ address = "127.0.0.1:7100" }}]
{pool_keys}
"#
        );
        expect_check_error(
            &write(dir.path(), &format!("case{i}.toml"), &text),
            key,
            says,
        );
    }

    // Offload backend connections are shared between clients.
    let offload = r#"[[listener]]
name = "web"
bind = "127.0.0.1:7443"
mode = "offload"
pool = "p"
tls = { cert = "auto" }

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:7100" }]
send_proxy = "v1"
"#;
    expect_check_error(
        &write(dir.path(), "offload.toml", offload),
        "pool[0].send_proxy",
        "send_proxy applies to pools of tcp and passthrough listeners",
    );
}

fn expect_check_error(path: &std::path::Path, key: &str, says: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("check")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
    assert!(
        stderr.contains(&format!("key `{key}`: ")),
        "{}: {stderr} does not name {key}",
        path.display()
    );
    assert!(
        stderr.contains(says),
        "{}: {stderr} does not say {says:?}",
        path.display()
    );
}
