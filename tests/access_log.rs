//! The access log through the real binary: JSON lines for offloaded
//! requests (with and without a client certificate), a WebSocket session,
//! an L4 connection and a passthrough connection, every field checked
//! against what was sent; nginx's `combined` format; rotation with `mv`
//! and SIGUSR1; a destination that blocks (lines dropped and counted,
//! requests still served); a reload that turns the log on.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::pki::{client_config, server_config, Ca, Leaf};
use common::web::{echo_backend, https_get, websocket_backend};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(15);

struct Fixture {
    dir: tempfile::TempDir,
    server_ca: Ca,
    device: Leaf,
    lb: Balancer,
    web: SocketAddr,
    raw: SocketAddr,
    pt: SocketAddr,
    app: SocketAddr,
    ws: SocketAddr,
    named: NamedBackend,
    tls_app: SocketAddr,
}

impl Fixture {
    fn log(&self) -> PathBuf {
        self.dir.path().join("logs/access.log")
    }
}

/// An offload listener (client certificates optional), a `tcp` listener
/// and a `passthrough` listener, all logging JSON to one file, whose
/// directory does not exist yet; `web_log` replaces the offload
/// listener's `access_log`.
async fn fixture(web_log: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let device_ca = Ca::new(d, "device");
    let server = server_ca.server(d, "server", &["device.example", "a.example"]);
    let device = device_ca.client(d, "device-1", "device-1");
    let app = echo_backend("app", None).await;
    let ws = websocket_backend().await;
    let tls_app = echo_backend("tls-app", Some(server_config(&server, false))).await;
    let named = NamedBackend::start("raw-backend");
    let (web, raw, pt) = (free_addr(), free_addr(), free_addr());
    let log = d.join("logs/access.log");
    let shared_log = format!("access_log = {{ path = \"{}\" }}", log.display());
    let web_log = web_log.map_or(shared_log.clone(), str::to_string);
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "web"
bind = "{web}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}", client_auth = "optional", client_ca = "{ca}" }}
{web_log}

  [[listener.route]]
  name = "sockets"
  path_prefix = "/ws"
  pool = "ws"

  [[listener.route]]
  name = "app"
  path_prefix = "/"
  pool = "app"

[[listener]]
name = "raw"
bind = "{raw}"
mode = "tcp"
pool = "named"
{shared_log}

[[listener]]
name = "pt"
bind = "{pt}"
mode = "passthrough"
pool = "tls-app"
{shared_log}

[[pool]]
name = "app"
backends = [{{ address = "{app}" }}]

[[pool]]
name = "ws"
backends = [{{ address = "{ws}" }}]

[[pool]]
name = "named"
backends = [{{ address = "{named}" }}]

[[pool]]
name = "tls-app"
backends = [{{ address = "{tls_app}" }}]
"#,
        cert = server.cert_path.display(),
        key = server.key_path.display(),
        ca = device_ca.pem_path.display(),
        named = named.addr,
    );
    let lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap();
    Fixture {
        dir,
        server_ca,
        device,
        lb,
        web,
        raw,
        pt,
        app,
        ws,
        named,
        tls_app,
    }
}

/// A keep-alive HTTPS/1.1 client connection, and what its TLS session is.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    port: u16,
    version: String,
    cipher: String,
}

fn tls_names(c: &rustls::ClientConnection) -> (String, String) {
    let version = match c.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        other => panic!("unexpected TLS version {other:?}"),
    };
    let cipher = c.negotiated_cipher_suite().unwrap().suite();
    (version.to_string(), cipher.as_str().unwrap().to_string())
}

impl Client {
    fn tls(&self) -> (&str, &str) {
        (&self.version, &self.cipher)
    }

    async fn connect(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        let (version, cipher) = tls_names(tls.get_ref().1);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client {
            sender,
            port,
            version,
            cipher,
        }
    }

    /// Send one request; returns (status, response body).
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static [u8],
    ) -> (u16, Vec<u8>) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "device.example");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from_static(body))).unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn json_lines(path: &Path) -> Vec<Value> {
    lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Wait until `path` has a line for which `pick` holds; return it.
async fn wait_line(path: &Path, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = json_lines(path).into_iter().find(&pick) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no such line in {}:\n{}",
            path.display(),
            lines(path).join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn by_path(path: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["path"] == path
}

/// The exact key set of a line.
const KEYS: [&str; 27] = [
    "time",
    "type",
    "listener",
    "client_addr",
    "client_port",
    "tls_version",
    "tls_cipher",
    "sni",
    "client_cert_subject",
    "client_cert_sha256",
    "host",
    "method",
    "path",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream",
    "upstream_connect_ms",
    "upstream_response_ms",
    "route",
    "retries",
    "close",
    "referer",
    "user_agent",
    "duration_ms",
];

fn check_common(v: &Value, kind: &str, listener: &str, port: u16) {
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    let mut want: Vec<&str> = KEYS.to_vec();
    want.sort();
    want.dedup();
    assert_eq!(keys, want, "{v}");
    let time = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$").unwrap();
    assert!(time.is_match(v["time"].as_str().unwrap()), "{v}");
    assert_eq!(v["type"], kind, "{v}");
    assert_eq!(v["listener"], listener, "{v}");
    assert_eq!(v["client_addr"], "127.0.0.1", "{v}");
    assert_eq!(v["client_port"], port, "{v}");
    assert!(v["duration_ms"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(v["retries"], 0, "{v}");
}

/// The fields of an offloaded request: `tls` is the client's (version,
/// cipher), `host` what it sent as Host.
fn check_http(v: &Value, tls: (&str, &str), host: &str, cert: Option<&Leaf>) {
    assert_eq!(v["tls_version"], tls.0, "{v}");
    assert_eq!(v["tls_cipher"], tls.1, "{v}");
    assert_eq!(v["sni"], "device.example", "{v}");
    match cert {
        Some(leaf) => {
            assert_eq!(v["client_cert_subject"], "CN=device-1", "{v}");
            let digest = ring::digest::digest(&ring::digest::SHA256, &leaf.der);
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(v["client_cert_sha256"], hex.as_str(), "{v}");
        }
        None => {
            assert!(v["client_cert_subject"].is_null(), "{v}");
            assert!(v["client_cert_sha256"].is_null(), "{v}");
        }
    }
    assert_eq!(v["host"], host, "{v}");
    assert_eq!(v["protocol"], "HTTP/1.1", "{v}");
    assert!(v["upstream_connect_ms"].as_f64().unwrap() >= 0.0, "{v}");
    assert!(v["upstream_response_ms"].as_f64().unwrap() >= 0.0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_for_offload_websocket_l4_and_passthrough() {
    let f = fixture(None).await;
    let log = f.log();

    // Without a client certificate: a GET with a query, a referer and a
    // user agent.
    let anonymous = client_config(&f.server_ca, None, &[b"http/1.1"]);
    let mut c = Client::connect(f.web, "device.example", anonymous).await;
    let ua = "test-agent/1.0 (\"quoted\")";
    let headers = [("user-agent", ua), ("referer", "https://ref.example/page")];
    let (status, body) = c.send("GET", "/plain/get?x=1&y=2", &headers, b"").await;
    assert_eq!(status, 200);
    let v = wait_line(&log, by_path("/plain/get?x=1&y=2")).await;
    check_common(&v, "http", "web", c.port);
    check_http(&v, c.tls(), "device.example", None);
    assert_eq!(v["method"], "GET", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["bytes_in"], 0, "{v}");
    assert_eq!(v["bytes_out"], body.len(), "{v}");
    assert_eq!(v["upstream"], f.app.to_string(), "{v}");
    assert_eq!(v["route"], "app", "{v}");
    assert!(v["close"].is_null(), "{v}");
    assert_eq!(v["referer"], "https://ref.example/page", "{v}");
    assert_eq!(v["user_agent"], ua, "{v}");

    // With a client certificate: a POST with a body.
    let device = client_config(&f.server_ca, Some(&f.device), &[b"http/1.1"]);
    let mut c = Client::connect(f.web, "device.example", device.clone()).await;
    let (status, body) = c.send("POST", "/cert/post", &[], b"hello, body").await;
    assert_eq!(status, 200);
    let v = wait_line(&log, by_path("/cert/post")).await;
    check_common(&v, "http", "web", c.port);
    check_http(&v, c.tls(), "device.example", Some(&f.device));
    assert_eq!(v["method"], "POST", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["bytes_in"], 11, "{v}");
    assert_eq!(v["bytes_out"], body.len(), "{v}");
    assert_eq!(v["upstream"], f.app.to_string(), "{v}");
    assert!(v["referer"].is_null() && v["user_agent"].is_null(), "{v}");

    // A WebSocket session: one line when it ends, not when it starts.
    let tcp = TcpStream::connect(f.web).await.unwrap();
    let ws_port = tcp.local_addr().unwrap().port();
    let name = rustls::pki_types::ServerName::try_from("device.example").unwrap();
    let tls = tokio_rustls::TlsConnector::from(device)
        .connect(name, tcp)
        .await
        .unwrap();
    let (version, cipher) = tls_names(tls.get_ref().1);
    let url = format!("wss://device.example:{}/ws/session", f.web.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    let hello = ws.next().await.unwrap().unwrap().into_data();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "ping"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !json_lines(&log).iter().any(by_path("/ws/session")),
        "logged before the session ended"
    );
    ws.send(Message::Close(None)).await.unwrap();
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            break;
        }
    }
    drop(ws);
    let v = wait_line(&log, by_path("/ws/session")).await;
    check_common(&v, "websocket", "web", ws_port);
    // The Host tungstenite sends names the port.
    let host = format!("device.example:{}", f.web.port());
    check_http(&v, (&version, &cipher), &host, Some(&f.device));
    assert_eq!(v["method"], "GET", "{v}");
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["route"], "sockets", "{v}");
    assert_eq!(v["upstream"], f.ws.to_string(), "{v}");
    // Client frames are masked: "ping" is 2 + 4 + 4 bytes, the empty
    // Close 2 + 4.
    assert_eq!(v["bytes_in"], 16, "{v}");
    // The backend's hello and the echo (2 + 4); the backend hangs up
    // on the Close, its reply (2 to 4 bytes) may or may not go first.
    let hello_frame = 2 + if hello.len() > 125 { 2 } else { 0 } + hello.len();
    let out = v["bytes_out"].as_u64().unwrap() as usize;
    assert!((hello_frame + 6..=hello_frame + 10).contains(&out), "{v}");
    assert_eq!(v["close"], "closed", "{v}");

    // An L4 connection: one line when it closes.
    let mut s = std::net::TcpStream::connect(f.raw).unwrap();
    let raw_port = s.local_addr().unwrap().port();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut s, &mut got).unwrap();
    assert_eq!(got, "raw-backend\n");
    drop(s);
    let v = wait_line(&log, |v| v["type"] == "tcp").await;
    check_common(&v, "tcp", "raw", raw_port);
    for k in [
        "tls_version",
        "tls_cipher",
        "sni",
        "client_cert_subject",
        "client_cert_sha256",
        "host",
        "method",
        "path",
        "protocol",
        "route",
        "referer",
        "user_agent",
    ] {
        assert!(v[k].is_null(), "{k}: {v}");
    }
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["bytes_in"], 0, "{v}");
    assert_eq!(v["bytes_out"], "raw-backend\n".len(), "{v}");
    assert_eq!(v["upstream"], f.named.addr.to_string(), "{v}");
    assert!(v["upstream_connect_ms"].as_f64().unwrap() >= 0.0, "{v}");
    assert!(v["upstream_response_ms"].is_null(), "{v}");
    assert_eq!(v["close"], "closed", "{v}");

    // A passthrough connection: the name from its ClientHello.
    let (status, _) = https_get(
        f.pt,
        "a.example",
        client_config(&f.server_ca, None, &[b"http/1.1"]),
        "/through",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let v = wait_line(&log, |v| v["type"] == "passthrough").await;
    assert_eq!(v["listener"], "pt", "{v}");
    assert_eq!(v["sni"], "a.example", "{v}");
    assert!(v["tls_version"].is_null() && v["path"].is_null(), "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["upstream"], f.tls_app.to_string(), "{v}");
    // A TLS session both ways: at least a ClientHello and a response.
    assert!(v["bytes_in"].as_u64().unwrap() > 100, "{v}");
    assert!(v["bytes_out"].as_u64().unwrap() > 100, "{v}");

    // Every line was counted per listener; none dropped.
    let lb = &f.lb;
    let m = lb.metrics();
    let count = |name: &str, l: &str| metric_value(&m, &format!("{name}{{listener=\"{l}\"}}"));
    assert_eq!(count("fleetgate_access_log_lines_total", "web"), 3.0, "{m}");
    assert_eq!(count("fleetgate_access_log_lines_total", "raw"), 1.0, "{m}");
    assert_eq!(count("fleetgate_access_log_lines_total", "pt"), 1.0, "{m}");
    assert_eq!(
        count("fleetgate_access_log_dropped_total", "web"),
        0.0,
        "{m}"
    );
    assert_eq!(lines(&log).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_format_is_nginx_combined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("combined.log");
    let setting = format!(
        "access_log = {{ path = \"{}\", format = \"combined\" }}",
        path.display()
    );
    let f = fixture(Some(&setting)).await;
    let client = client_config(&f.server_ca, None, &[b"http/1.1"]);
    let mut c = Client::connect(f.web, "device.example", client).await;
    let headers = [
        ("user-agent", "agent \"x\" \\ y"),
        ("referer", "https://r.example/"),
    ];
    let (status, body) = c.send("GET", "/combined/a?b=c", &headers, b"").await;
    assert_eq!(status, 200);
    let (status, _) = c.send("DELETE", "/combined/nothing", &[], b"").await;
    assert_eq!(status, 200);
    assert!(eventually(WAIT, || lines(&path).len() >= 2));
    let all = lines(&path);
    // nginx: log_format combined '$remote_addr - $remote_user [$time_local] '
    //   '"$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"';
    let combined = regex::Regex::new(
        r#"^(\S+) - (\S+) \[(\d{2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-]\d{4})\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)"$"#,
    )
    .unwrap();
    let first = combined
        .captures(&all[0])
        .unwrap_or_else(|| panic!("not combined: {}", all[0]));
    assert_eq!(&first[1], "127.0.0.1");
    assert_eq!(&first[2], "-");
    assert!(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
            .contains(&&first[4])
    );
    assert_eq!(&first[10], "GET /combined/a?b=c HTTP/1.1");
    assert_eq!(&first[11], "200");
    assert_eq!(first[12].parse::<usize>().unwrap(), body.len());
    assert_eq!(&first[13], "https://r.example/");
    // nginx escapes `"` and `\` as \xHH.
    assert_eq!(&first[14], r"agent \x22x\x22 \x5C y");
    let second = combined.captures(&all[1]).unwrap();
    assert_eq!(&second[10], "DELETE /combined/nothing HTTP/1.1");
    assert_eq!((&second[13], &second[14]), ("-", "-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_mv_and_sigusr1_loses_and_repeats_nothing() {
    let f = Arc::new(fixture(None).await);
    let log = f.log();
    let rotated = f.dir.path().join("logs/access.log.1");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients sending requests back to back, each path unique.
    let mut load = Vec::new();
    for client in 0..2 {
        let (f, stop) = (f.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let cfg = client_config(&f.server_ca, None, &[b"http/1.1"]);
            let mut c = Client::connect(f.web, "device.example", cfg).await;
            let mut sent = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 50 {
                let path = format!("/rotate/{client}/{i}");
                let (status, _) = c.send("GET", &path, &[], b"").await;
                assert_eq!(status, 200);
                sent.push(path);
                i += 1;
            }
            sent
        }));
    }
    let count = |p: &Path| lines(p).len();
    assert!(eventually(WAIT, || count(&log) >= 100));
    std::fs::rename(&log, &rotated).unwrap();
    // Lines go on into the renamed file until the signal.
    let before = count(&rotated);
    assert!(eventually(WAIT, || count(&rotated) >= before + 100));
    f.lb.signal("USR1");
    assert!(eventually(WAIT, || count(&log) >= 100), "no new file");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = Vec::new();
    for l in load {
        sent.extend(l.await.unwrap());
    }
    let total = sent.len();
    assert!(
        eventually(WAIT, || count(&log) + count(&rotated) >= total),
        "lines lost: {} + {} of {total}",
        count(&log),
        count(&rotated)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for v in json_lines(&rotated).into_iter().chain(json_lines(&log)) {
        *seen
            .entry(v["path"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for p in &sent {
        assert_eq!(seen.get(p), Some(&1), "{p}");
    }
    assert_eq!(seen.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_destination_drops_and_counts_lines_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("nobody-reads");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo");
    // Opening a FIFO nobody reads blocks: the writer never writes.
    let setting = format!("access_log = {{ path = \"{}\" }}", fifo.display());
    let f = fixture(Some(&setting)).await;
    let client = client_config(&f.server_ca, None, &[b"http/1.1"]);
    let mut c = Client::connect(f.web, "device.example", client).await;
    // Each line is several hundred bytes: more than the queue holds.
    let n = 2_500;
    let long = "/blocked/".to_string() + &"x".repeat(300);
    for i in 0..n {
        let (status, _) = c.send("GET", &format!("{long}/{i}"), &[], b"").await;
        assert_eq!(status, 200, "request {i}");
    }
    let series = |name: &str| format!("{name}{{listener=\"web\"}}");
    let lines_queued = series("fleetgate_access_log_lines_total");
    let dropped = series("fleetgate_access_log_dropped_total");
    let lb = &f.lb;
    assert!(eventually(WAIT, || lb.metric(&lines_queued)
        + lb.metric(&dropped)
        >= n as f64));
    let (q, d) = (lb.metric(&lines_queued), lb.metric(&dropped));
    assert_eq!(q + d, n as f64);
    assert!(d > 0.0, "nothing dropped: {q} queued");
    assert!(
        q * 500.0 <= fleetgate::access_log::QUEUE_BYTES as f64 + 1.0,
        "{q}"
    );
    // Still serving.
    let (status, _) = c.send("GET", "/after", &[], b"").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_access_log_on_and_off() {
    let f = fixture(Some("")).await;
    let dir = f.dir.path();
    let web_log = dir.join("web.log");
    let client = client_config(&f.server_ca, None, &[b"http/1.1"]);
    let ask = |path: &'static str| {
        let client = client.clone();
        let web = f.web;
        async move {
            let (status, _) = https_get(web, "device.example", client, path, &[])
                .await
                .unwrap();
            assert_eq!(status, 200);
        }
    };
    ask("/before").await;
    let config = std::fs::read_to_string(&f.lb.config).unwrap();
    let on = config.replacen(
        "mode = \"offload\"",
        &format!(
            "mode = \"offload\"\naccess_log = {{ path = \"{}\" }}",
            web_log.display()
        ),
        1,
    );
    std::fs::write(&f.lb.config, &on).unwrap();
    let reloads = "fleetgate_config_reloads_total{result=\"ok\"}";
    f.lb.signal("HUP");
    assert!(eventually(WAIT, || f.lb.metric(reloads) >= 1.0));
    ask("/during").await;
    let v = wait_line(&web_log, by_path("/during")).await;
    assert_eq!(v["listener"], "web");
    std::fs::write(&f.lb.config, &config).unwrap();
    f.lb.signal("HUP");
    assert!(eventually(WAIT, || f.lb.metric(reloads) >= 2.0));
    ask("/after").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paths: Vec<Value> = json_lines(&web_log)
        .iter()
        .map(|v| v["path"].clone())
        .collect();
    assert_eq!(paths, vec![Value::from("/during")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_a_file_refuses_are_counted_against_their_listener() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: every open fails.
    let taken = dir.path().join("is-a-directory");
    std::fs::create_dir(&taken).unwrap();
    let setting = format!("access_log = {{ path = \"{}\" }}", taken.display());
    let f = fixture(Some(&setting)).await;
    let client = client_config(&f.server_ca, None, &[b"http/1.1"]);
    let mut c = Client::connect(f.web, "device.example", client).await;
    let n = 20;
    for i in 0..n {
        let (status, _) = c.send("GET", &format!("/refused/{i}"), &[], b"").await;
        assert_eq!(status, 200, "request {i}");
    }
    let dropped = |l: &str| format!("fleetgate_access_log_dropped_total{{listener=\"{l}\"}}");
    let lb = &f.lb;
    assert!(
        eventually(WAIT, || lb.metric(&dropped("web")) >= n as f64),
        "{}",
        lb.metrics()
    );
    assert_eq!(lb.metric(&dropped("web")), n as f64);
    // The other listeners log to a file that works.
    let mut s = std::net::TcpStream::connect(f.raw).unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut s, &mut got).unwrap();
    assert_eq!(got, "raw-backend\n");
    drop(s);
    wait_line(&f.log(), |v| v["type"] == "tcp").await;
    assert_eq!(lb.metric(&dropped("raw")), 0.0);
}
